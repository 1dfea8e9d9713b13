//! Vector clocks over the simulator's streams.
//!
//! Component `s` of a stream's clock is the last operation of stream `s` that the stream
//! is known to be ordered after. A stream's own component is its operation count.

/// Dense index of a simulated stream (not its CUDA handle).
pub(crate) type Sid = usize;

/// A vector clock: one tick per stream, missing components read as 0.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct VClock(Vec<u64>);

impl VClock {
    /// The component of stream `s`.
    pub(crate) fn get(&self, s: Sid) -> u64 {
        self.0.get(s).copied().unwrap_or(0)
    }

    /// Raises component `s` to at least `t`.
    pub(crate) fn raise(&mut self, s: Sid, t: u64) {
        if self.0.len() <= s {
            self.0.resize(s + 1, 0);
        }
        if self.0[s] < t {
            self.0[s] = t;
        }
    }

    /// Advances component `s` by one and returns the new tick.
    pub(crate) fn advance(&mut self, s: Sid) -> u64 {
        let t = self.get(s).saturating_add(1);
        self.raise(s, t);
        t
    }

    /// Component-wise maximum with `other`.
    pub(crate) fn join(&mut self, other: &VClock) {
        for (s, &t) in other.0.iter().enumerate() {
            if t > 0 {
                self.raise(s, t);
            }
        }
    }

    /// The non-zero components, as (stream, tick).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Sid, u64)> + '_ {
        self.0.iter().enumerate().filter(|&(_, &t)| t > 0).map(|(s, &t)| (s, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_advance() {
        let mut a = VClock::default();
        assert_eq!(a.advance(2), 1);
        assert_eq!(a.advance(2), 2);
        let mut b = VClock::default();
        b.raise(0, 5);
        b.join(&a);
        assert_eq!(b.get(0), 5);
        assert_eq!(b.get(2), 2);
        assert_eq!(b.get(9), 0);
        assert_eq!(b.entries().collect::<Vec<_>>(), vec![(0, 5), (2, 2)]);
    }
}
