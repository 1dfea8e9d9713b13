//! `STREAMALLOC_CONF`: the C ABI's configuration, in the style of PyTorch's
//! `PYTORCH_CUDA_ALLOC_CONF` (comma-separated `key:value` pairs), read once when the
//! global allocator is created.
//!
//! ```text
//! STREAMALLOC_CONF="cache:on,max_cache_mb:2048"
//! ```
//!
//! | key | values | default | meaning |
//! |---|---|---|---|
//! | `cache` | `on`/`off` (also `true`/`false`, `1`/`0`, `yes`/`no`) | `on` | the front cache; `off` is the seed's behaviour, every malloc and free reaches the driver |
//! | `max_cache_mb` | whole MiB | `2048` | bytes the cache may hold per device before it gives blocks back |
//!
//! An unknown key, a value that does not parse, a key given twice or a pair without a
//! `:` is an error naming the key and the accepted values; every C ABI call then fails
//! with code 7 (`STREAMALLOC_CONFIG_ERROR`) and that message. A key is one row of
//! [`KEYS`]: to add one, add a row (name, accepted values, how to apply it to
//! [`CacheConfig`], how to print it back).

use crate::cache::CacheConfig;
use std::fmt;

/// The environment variable read at creation of the C ABI's allocator.
pub const CONFIG_ENV: &str = "STREAMALLOC_CONF";

/// One configuration key.
pub struct ConfigKey {
    /// The key as written in `STREAMALLOC_CONF`.
    pub name: &'static str,
    /// The accepted values, for error messages and documentation.
    pub values: &'static str,
    /// Applies a value (trimmed) to the configuration; `Err` says what is expected.
    apply: fn(&mut CacheConfig, &str) -> Result<(), String>,
    /// The key's value in a configuration, as it would be written.
    show: fn(&CacheConfig) -> String,
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err("expected on or off".to_string()),
    }
}

fn parse_mib(v: &str) -> Result<u64, String> {
    let n: u64 = v.parse().map_err(|_| "expected a whole number of MiB".to_string())?;
    n.checked_mul(1 << 20).ok_or_else(|| format!("{n} MiB is too large"))
}

/// Every key `STREAMALLOC_CONF` accepts.
pub const KEYS: &[ConfigKey] = &[
    ConfigKey {
        name: "cache",
        values: "on|off",
        apply: |c, v| {
            c.enabled = parse_bool(v)?;
            Ok(())
        },
        show: |c| if c.enabled { "on" } else { "off" }.to_string(),
    },
    ConfigKey {
        name: "max_cache_mb",
        values: "a whole number of MiB",
        apply: |c, v| {
            c.max_bytes_per_device = parse_mib(v)?;
            Ok(())
        },
        show: |c| (c.max_bytes_per_device >> 20).to_string(),
    },
    ConfigKey {
        name: "release",
        values: "lean|fast",
        apply: |c, v| {
            c.idle_over_live_pct = match v {
                "lean" => CacheConfig::lean().idle_over_live_pct,
                "fast" => u32::MAX,
                _ => return Err("expected lean or fast".to_string()),
            };
            Ok(())
        },
        show: |c| if c.idle_over_live_pct == u32::MAX { "fast" } else { "lean" }.to_string(),
    },
    ConfigKey {
        name: "max_cached_kb",
        values: "KiB: larger requests are never cached (at most 65536)",
        apply: |c, v| {
            let kb: u64 = v.parse().map_err(|_| "expected a whole number of KiB".to_string())?;
            if kb > 65536 {
                return Err(format!("{kb} KiB is more than the largest size class (65536)"));
            }
            c.max_cached_size = kb << 10;
            Ok(())
        },
        show: |c| (c.max_cached_size >> 10).to_string(),
    },
    ConfigKey {
        name: "class_reach",
        values: "size classes a request may reach up (0..8)",
        apply: |c, v| {
            let n: usize = v.parse().map_err(|_| "expected a whole number".to_string())?;
            if n > 8 {
                return Err(format!("{n} is more than 8 classes"));
            }
            c.class_reach = n;
            Ok(())
        },
        show: |c| c.class_reach.to_string(),
    },
    ConfigKey {
        name: "idle_interval",
        values: "operations per stream between idle checks (0: off)",
        apply: |c, v| {
            c.idle_interval = v.parse().map_err(|_| "expected a whole number".to_string())?;
            Ok(())
        },
        show: |c| c.idle_interval.to_string(),
    },
];

/// Why a configuration string was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The offending `key:value` pair (or key), as written.
    pub item: String,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let known: Vec<String> =
            KEYS.iter().map(|k| format!("{}:<{}>", k.name, k.values)).collect();
        write!(
            f,
            "{CONFIG_ENV}: {:?}: {} (known keys: {})",
            self.item,
            self.reason,
            known.join(", ")
        )
    }
}

impl std::error::Error for ConfigError {}

/// Parses a `STREAMALLOC_CONF` string over the defaults (an empty string is the
/// defaults).
pub fn parse_config(conf: &str) -> Result<CacheConfig, ConfigError> {
    // The C ABI serves PyTorch, whose users feel memory before speed: the lean preset.
    let mut config = CacheConfig::lean();
    let mut seen: Vec<&str> = Vec::new();
    for item in conf.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let fail = |reason: String| ConfigError { item: item.to_string(), reason };
        let Some((key, value)) = item.split_once(':') else {
            return Err(fail("expected key:value".to_string()));
        };
        let (key, value) = (key.trim(), value.trim());
        let Some(k) = KEYS.iter().find(|k| k.name == key) else {
            return Err(fail(format!("unknown key {key:?}")));
        };
        if seen.contains(&k.name) {
            return Err(fail(format!("key {key:?} given twice")));
        }
        seen.push(k.name);
        (k.apply)(&mut config, value).map_err(|e| fail(format!("bad value for {key}: {e}")))?;
    }
    Ok(config)
}

/// A configuration written back in `STREAMALLOC_CONF` form, every key included.
pub fn format_config(config: &CacheConfig) -> String {
    KEYS.iter().map(|k| format!("{}:{}", k.name, (k.show)(config))).collect::<Vec<_>>().join(",")
}

// ----- the C functions -----

/// Checks a `STREAMALLOC_CONF` string without applying it. Returns 0, or 7
/// (`STREAMALLOC_CONFIG_ERROR`) with the reason in the last error; 2 for NULL.
///
/// # Safety
/// `conf` is null (an error) or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_parse_config(
    conf: *const std::ffi::c_char,
) -> std::ffi::c_int {
    super::status(|| {
        if conf.is_null() {
            return Err(super::Failure::invalid("streamalloc_parse_config: conf is NULL"));
        }
        // Safety: a NUL-terminated string (caller).
        let conf = unsafe { std::ffi::CStr::from_ptr(conf) }.to_string_lossy();
        parse_config(&conf)
            .map(|_| ())
            .map_err(|e| super::Failure { code: super::ErrorCode::Config, message: e.to_string() })
    })
}

/// Writes the allocator's configuration in `STREAMALLOC_CONF` form into `buf` (at most
/// `len - 1` bytes and a NUL). Creates the allocator if needed. Returns the status code.
///
/// # Safety
/// `buf` is null or valid for `len` byte writes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn streamalloc_config(
    buf: *mut std::ffi::c_char,
    len: usize,
) -> std::ffi::c_int {
    super::status(|| {
        let text = format_config(&super::alloc()?.cache_config());
        // Safety: null or valid for len bytes (caller).
        unsafe { super::write_c_string(&text, buf, len) };
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_print_back() {
        assert_eq!(parse_config("").unwrap(), CacheConfig::lean());
        let c = parse_config(" cache:off , max_cache_mb:64 ").unwrap();
        assert!(!c.enabled);
        assert_eq!(c.max_bytes_per_device, 64 << 20);
        assert_eq!(
            format_config(&c),
            "cache:off,max_cache_mb:64,release:lean,max_cached_kb:1024,class_reach:2,idle_interval:16384"
        );
        assert_eq!(parse_config(&format_config(&c)).unwrap(), c);
        for on in ["on", "TRUE", "1", "yes"] {
            assert!(parse_config(&format!("cache:{on}")).unwrap().enabled);
        }
    }

    #[test]
    fn bad_input_names_the_key() {
        let e = parse_config("cache:on,bogus:1").unwrap_err();
        assert_eq!(e.item, "bogus:1");
        let msg = e.to_string();
        assert!(msg.contains("unknown key \"bogus\""), "{msg}");
        assert!(msg.contains("cache:<on|off>") && msg.contains("max_cache_mb:"), "{msg}");
        let e = parse_config("max_cache_mb:lots").unwrap_err();
        assert!(e.reason.contains("expected a whole number of MiB"), "{e}");
        let e = parse_config("cache:maybe").unwrap_err();
        assert!(e.reason.contains("expected on or off"), "{e}");
        assert!(parse_config("cache").unwrap_err().reason.contains("key:value"));
        assert!(parse_config("cache:on,cache:off").unwrap_err().reason.contains("twice"));
        let e = parse_config(&format!("max_cache_mb:{}", u64::MAX)).unwrap_err();
        assert!(e.reason.contains("too large"), "{e}");
    }
}
