//! Cache sizes: defaults, `CHALK_CACHE_*` settings and the size syntax they use.

use std::path::Path;

use crate::error::{EngineError, Result};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Default memory tier limit of one process.
const MEMORY_DEFAULT_BYTES: u64 = 512 * MIB;
/// The default disk limit is this fraction of the file system that contains
/// the cache, at most [`DISK_DEFAULT_MAX_BYTES`].
const DISK_DEFAULT_FRACTION: u64 = 4;
const DISK_DEFAULT_MAX_BYTES: u64 = 64 * GIB;
/// Disk limit used when the file system size cannot be read.
const DISK_FALLBACK_BYTES: u64 = 16 * GIB;
/// By default the disk tier leaves this fraction of its file system free,
/// at most [`FREE_DEFAULT_MAX_BYTES`].
const FREE_DEFAULT_FRACTION: u64 = 20;
const FREE_DEFAULT_MAX_BYTES: u64 = 4 * GIB;
const READAHEAD_DEFAULT_MAX_BYTES: u64 = 128 * MIB;

/// Limits and tuning of the tiered read cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Blocks kept in memory by one process (`CHALK_CACHE_MEMORY`, default 512 MiB).
    pub memory_limit_bytes: u64,
    /// Bytes kept under `$CHALK_HOME/cache` by all processes that use it
    /// (`CHALK_CACHE_DISK`, default a quarter of that file system, at most 64 GiB).
    pub disk_limit_bytes: u64,
    /// The disk tier writes nothing while its file system has less than
    /// this free (`CHALK_CACHE_DISK_FREE`, default 5% of the file system, at
    /// most 4 GiB; 0 turns the check off).
    pub disk_free_min_bytes: u64,
    /// Largest sequential readahead window (`CHALK_CACHE_READAHEAD`, default
    /// 128 MiB); never more than half of the memory limit.
    pub readahead_max_bytes: u64,
    /// Threads that fetch readahead blocks, so the most readahead GETs in flight.
    pub fetch_threads: usize,
    /// Largest ranged GET: contiguous missing blocks are fetched together up to this size.
    pub request_max_bytes: u64,
}

impl CacheConfig {
    /// Defaults for a cache under `cache_root`, which need not exist yet.
    pub fn defaults_for(cache_root: &Path) -> Self {
        let size = filesystem_size(cache_root);
        let disk_limit_bytes = match size {
            Some(size) => (size / DISK_DEFAULT_FRACTION).min(DISK_DEFAULT_MAX_BYTES),
            None => DISK_FALLBACK_BYTES,
        };
        let disk_free_min_bytes = size.map_or(0, |size| (size / FREE_DEFAULT_FRACTION).min(FREE_DEFAULT_MAX_BYTES));
        CacheConfig {
            memory_limit_bytes: MEMORY_DEFAULT_BYTES,
            disk_limit_bytes,
            disk_free_min_bytes,
            readahead_max_bytes: READAHEAD_DEFAULT_MAX_BYTES,
            fetch_threads: 16,
            request_max_bytes: 8 * MIB,
        }
        .clamped()
    }

    /// Defaults for `cache_root`, changed by `CHALK_CACHE_MEMORY`,
    /// `CHALK_CACHE_DISK`, `CHALK_CACHE_DISK_FREE` and `CHALK_CACHE_READAHEAD`
    /// where they are set.
    pub fn from_env(cache_root: &Path) -> Result<Self> {
        let mut config = Self::defaults_for(cache_root);
        for (name, field) in [
            ("CHALK_CACHE_MEMORY", &mut config.memory_limit_bytes),
            ("CHALK_CACHE_DISK", &mut config.disk_limit_bytes),
            ("CHALK_CACHE_DISK_FREE", &mut config.disk_free_min_bytes),
            ("CHALK_CACHE_READAHEAD", &mut config.readahead_max_bytes),
        ] {
            if let Ok(value) = std::env::var(name) {
                if value.trim().is_empty() {
                    continue;
                }
                *field = parse_size(&value).map_err(|reason| {
                    EngineError::InvalidArgument(format!("{name}={value:?} is invalid: {reason}"))
                })?;
            }
        }
        Ok(config.clamped())
    }

    /// Keeps the readahead window within half of the memory tier, so that
    /// prefetched blocks are not evicted before they are read.
    fn clamped(mut self) -> Self {
        self.readahead_max_bytes = self.readahead_max_bytes.min(self.memory_limit_bytes / 2);
        self.fetch_threads = self.fetch_threads.max(1);
        self.request_max_bytes = self.request_max_bytes.max(super::BLOCK_BYTES);
        self
    }
}

/// Size of the file system that contains `path` or its nearest existing ancestor.
fn filesystem_size(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists())?;
    filesystem_space(existing).map(|(total, _available)| total)
}

/// Total and available bytes of the file system that contains `path`.
pub(crate) fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a NUL-terminated path and `stat` points to writable
    // memory of the right size, which statvfs fills when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized `stat`.
    let stat = unsafe { stat.assume_init() };
    let fragment = stat.f_frsize as u64;
    Some((stat.f_blocks as u64 * fragment, stat.f_bavail as u64 * fragment))
}

/// Parses a byte size: a whole number with an optional unit, such as
/// `1048576`, `512MiB`, `512M`, `20GiB` or `1.5G`. Units are binary
/// (`K` = `KiB` = 1024 bytes); `B` alone means bytes.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * 1024,
        other => return Err(format!("unknown unit {other:?}; use B, KiB, MiB, GiB or TiB")),
    };
    let value: f64 = number.parse().map_err(|_| format!("expected a size such as 512MiB, found {text:?}"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 * MIB));
        assert_eq!(parse_size("512m"), Ok(512 * MIB));
        assert_eq!(parse_size(" 20 GiB "), Ok(20 * GIB));
        assert_eq!(parse_size("1.5G"), Ok(3 * GIB / 2));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn readahead_stays_within_half_the_memory() {
        let mut config = CacheConfig::defaults_for(Path::new("/"));
        config.memory_limit_bytes = 64 * MIB;
        config.readahead_max_bytes = 1 << 40;
        assert_eq!(config.clamped().readahead_max_bytes, 32 * MIB);
    }
}
