//! Size classes: 512 B, then four per power of two up to [`MAX_CACHED`] (waste below
//! 25%). A cached block keeps its class size for life; a request may be served by a
//! block up to [`crate::CacheConfig::class_reach`] classes larger.

/// Largest block the cache keeps; larger ones go straight back to the driver.
pub(crate) const MAX_CACHED: u64 = 64 << 20;
/// Size classes: 512 B, then four per power of two up to `MAX_CACHED`.
pub(crate) const CLASSES: usize = 1 + 4 * 17;

/// The size class of `size` (1..=MAX_CACHED): its index and the class's block size.
/// The benchmark's sizes (512 B, 4 KiB, 64 KiB, 256 KiB, 1 MiB, 1.5 MiB) are classes
/// exactly.
#[inline]
pub(crate) fn class_of(size: u64) -> Option<(usize, u64)> {
    if size == 0 || size > MAX_CACHED {
        return None;
    }
    if size <= 512 {
        return Some((0, 512));
    }
    let k = 63 - (size - 1).leading_zeros() as u64; // 2^k < size <= 2^(k+1), k >= 9
    let step = 1u64 << (k - 2);
    // ceil(size / step) by a shift: a division would not be (the hit path runs this).
    let m = (size + step - 1) >> (k - 2); // 5..=8
    Some((1 + 4 * (k as usize - 9) + (m as usize - 5), m * step))
}

/// The size of class `idx` (a table read: the hit path and every put use it).
#[inline]
pub(crate) fn class_size(idx: usize) -> u64 {
    CLASS_SIZES[idx]
}

/// Class sizes by index, computed once at compile time.
const CLASS_SIZES: [u64; CLASSES] = {
    let mut t = [512u64; CLASSES];
    let mut idx = 1;
    while idx < CLASSES {
        let k = (idx - 1) / 4 + 9;
        let m = (idx - 1) % 4 + 5;
        t[idx] = (m as u64) << (k - 2);
        idx += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_monotonic_and_bound_waste() {
        let mut last = 0;
        for idx in 0..CLASSES {
            let s = class_size(idx);
            assert!(s > last, "class {idx}");
            assert_eq!(class_of(s), Some((idx, s)));
            last = s;
        }
        assert_eq!(last, MAX_CACHED);
        for size in (1..5000u64).chain((1..1800).map(|i| i * 37_171)) {
            let (idx, cs) = class_of(size).unwrap();
            assert!(cs >= size && (size <= 512 || (cs - size) * 4 < cs), "{size} -> {cs}");
            assert_eq!(class_size(idx), cs);
        }
        for s in [512u64, 4096, 65536, 262_144, 1 << 20, 3 << 19] {
            assert_eq!(class_of(s).unwrap().1, s, "bench size {s} is exact");
        }
        assert_eq!(class_of(MAX_CACHED + 1), None);
        assert_eq!(class_of(0), None);
    }
}
