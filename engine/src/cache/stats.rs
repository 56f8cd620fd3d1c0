//! Cache statistics: counters of one process, and the host-wide view that
//! `chalk cache stats` prints.
//!
//! Each process that uses the cache writes its counters and memory tier size
//! to `stats/<pid>-<start>-<n>.json` under the cache directory, at most once
//! a second while they change and once more when its store closes. A reader
//! adds up the files; the files of processes that have exited are folded
//! into `stats/totals.json` under a lock, so the directory stays small.
//! Counters of the last second before a process is killed are lost.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::disk::DiskUsage;
use crate::error::{EngineError, Result};

/// How often a process writes its stats file while the counters change.
const WRITE_INTERVAL: Duration = Duration::from_secs(1);
const TOTALS_FILE: &str = "totals.json";
const LOCK_FILE: &str = ".lock";

/// Distinguishes the stats files of several stores opened by one process.
static NEXT_FILE_NUMBER: AtomicU64 = AtomicU64::new(0);

/// Counts of cache events. All counts are of blocks except `store_bytes`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheCounters {
    pub memory_hits: u64,
    pub memory_misses: u64,
    pub disk_hits: u64,
    pub disk_misses: u64,
    /// Ranged GETs sent to the object store.
    pub store_gets: u64,
    pub store_bytes: u64,
    /// Blocks fetched by readahead rather than by a waiting read.
    pub prefetched_blocks: u64,
    /// Reads that waited for a GET already in flight instead of sending their own.
    pub coalesced_waits: u64,
    /// Prefetches of the segment bytes past a small file whose read followed
    /// the segment's record order (see `segment_readahead`).
    pub segment_prefetches: u64,
    /// Bytes those prefetches asked for: blocks claimed for the readahead
    /// threads, or memory-map pages advised to the kernel.
    pub segment_prefetch_bytes: u64,
    /// Blocks dropped because their bytes failed a CRC check (disk file or record).
    pub corrupt_blocks: u64,
    pub memory_evictions: u64,
    /// Files deleted from the disk tier to keep it under its limit.
    pub disk_evictions: u64,
}

impl CacheCounters {
    fn add(&mut self, other: &CacheCounters) {
        self.memory_hits += other.memory_hits;
        self.memory_misses += other.memory_misses;
        self.disk_hits += other.disk_hits;
        self.disk_misses += other.disk_misses;
        self.store_gets += other.store_gets;
        self.store_bytes += other.store_bytes;
        self.prefetched_blocks += other.prefetched_blocks;
        self.coalesced_waits += other.coalesced_waits;
        self.segment_prefetches += other.segment_prefetches;
        self.segment_prefetch_bytes += other.segment_prefetch_bytes;
        self.corrupt_blocks += other.corrupt_blocks;
        self.memory_evictions += other.memory_evictions;
        self.disk_evictions += other.disk_evictions;
    }
}

/// Live counters of one process, updated without locks.
#[derive(Default)]
pub(crate) struct Counters {
    pub memory_hits: AtomicU64,
    pub memory_misses: AtomicU64,
    pub disk_hits: AtomicU64,
    pub disk_misses: AtomicU64,
    pub store_gets: AtomicU64,
    pub store_bytes: AtomicU64,
    pub prefetched_blocks: AtomicU64,
    pub coalesced_waits: AtomicU64,
    pub segment_prefetches: AtomicU64,
    pub segment_prefetch_bytes: AtomicU64,
    pub corrupt_blocks: AtomicU64,
    pub memory_evictions: AtomicU64,
    pub disk_evictions: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CacheCounters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheCounters {
            memory_hits: load(&self.memory_hits),
            memory_misses: load(&self.memory_misses),
            disk_hits: load(&self.disk_hits),
            disk_misses: load(&self.disk_misses),
            store_gets: load(&self.store_gets),
            store_bytes: load(&self.store_bytes),
            prefetched_blocks: load(&self.prefetched_blocks),
            coalesced_waits: load(&self.coalesced_waits),
            segment_prefetches: load(&self.segment_prefetches),
            segment_prefetch_bytes: load(&self.segment_prefetch_bytes),
            corrupt_blocks: load(&self.corrupt_blocks),
            memory_evictions: load(&self.memory_evictions),
            disk_evictions: load(&self.disk_evictions),
        }
    }
}

/// Statistics of the cache in one process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheStats {
    pub memory_bytes: u64,
    pub memory_blocks: u64,
    pub counters: CacheCounters,
}

/// Contents of one process's stats file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProcessFile {
    pid: u32,
    /// Start time of the process in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`), which distinguishes a live process from a reused pid.
    start_ticks: u64,
    memory_bytes: u64,
    memory_limit_bytes: u64,
    counters: CacheCounters,
}

/// Tier sizes, limits, hits and misses for the whole host.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HostCacheStats {
    pub memory: MemoryTierStats,
    pub disk: DiskTierStats,
    pub store: StoreStats,
    /// Every counter, added up over all processes since the cache was created.
    pub counters: CacheCounters,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct MemoryTierStats {
    /// Bytes held by the processes running now.
    pub bytes: u64,
    /// Limit of each process.
    pub limit_bytes_per_process: u64,
    pub processes: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DiskTierStats {
    /// Space the tier's files take on disk, without the whole segments
    /// counted in `shared_bytes`. This is what the limit bounds.
    pub bytes: u64,
    pub limit_bytes: u64,
    /// Files of cached blocks, one per segment.
    pub block_files: u64,
    /// Space the files of cached blocks take.
    pub block_bytes: u64,
    /// Whole segment files, shared ones included.
    pub whole_segments: u64,
    /// Space the whole segment files take, without the shared ones.
    pub whole_segment_bytes: u64,
    /// Backing files of FUSE passthrough, which read-only mounts make of
    /// large files.
    pub passthrough_files: u64,
    pub passthrough_bytes: u64,
    /// Local copies of metadata objects, read when the store is unreachable.
    pub metadata_files: u64,
    pub metadata_bytes: u64,
    /// Whole segment files that are hard links to objects of a `file://`
    /// store, so their bytes belong to the store and are left out of `bytes`.
    pub shared_segments: u64,
    /// Space those shared segment files take on disk.
    pub shared_bytes: u64,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StoreStats {
    pub gets: u64,
    pub bytes: u64,
}

/// Background thread that keeps this process's stats file current.
pub(crate) struct StatsWriter {
    stop: Option<crossbeam::channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatsWriter {
    /// Starts the writer. `snapshot` returns the memory tier size and the counters.
    pub fn start(stats_dir: PathBuf, memory_limit_bytes: u64, snapshot: Arc<dyn Fn() -> (u64, CacheCounters) + Send + Sync>) -> Self {
        let (stop, stopped) = crossbeam::channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("chalk-cache-stats".into())
            .spawn(move || {
                let me = ProcessFile { pid: std::process::id(), start_ticks: start_ticks(std::process::id()).unwrap_or(0), memory_limit_bytes, ..Default::default() };
                let path = stats_dir.join(format!(
                    "{}-{}-{}.json",
                    me.pid,
                    me.start_ticks,
                    NEXT_FILE_NUMBER.fetch_add(1, Ordering::Relaxed)
                ));
                if let Err(err) = fold_exited(&stats_dir) {
                    tracing::debug!(error = %err, "failed to fold the stats of exited processes");
                }
                let mut written = ProcessFile::default();
                loop {
                    let stopping = !matches!(
                        stopped.recv_timeout(WRITE_INTERVAL),
                        Err(crossbeam::channel::RecvTimeoutError::Timeout)
                    );
                    let (memory_bytes, counters) = snapshot();
                    let changed = counters != written.counters || memory_bytes != written.memory_bytes;
                    if changed {
                        written = ProcessFile { memory_bytes, counters, ..me.clone() };
                        if let Err(err) = write_json(&path, &written) {
                            tracing::debug!(path = %path.display(), error = %err, "failed to write cache stats");
                        }
                    }
                    if stopping {
                        // The process's memory tier is gone, but its counters stay in the totals.
                        if changed || written.memory_bytes > 0 {
                            let _ = write_json(&path, &ProcessFile { memory_bytes: 0, ..written });
                        }
                        return;
                    }
                }
            })
            .ok();
        StatsWriter { stop: Some(stop), thread }
    }
}

impl Drop for StatsWriter {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Adds up the stats of every process that used the cache under `cache_root`.
pub fn host_stats(cache_root: &Path, disk: DiskUsage, disk_limit_bytes: u64, memory_limit_bytes: u64) -> Result<HostCacheStats> {
    let stats_dir = cache_root.join("stats");
    fs::create_dir_all(&stats_dir).map_err(|e| EngineError::io("creating cache stats directory", &stats_dir, e))?;
    let (totals, live) = fold_exited(&stats_dir).map_err(|e| EngineError::io("reading cache stats", &stats_dir, e))?;

    let mut counters = totals;
    let mut memory_bytes = 0;
    for file in &live {
        counters.add(&file.counters);
        memory_bytes += file.memory_bytes;
    }
    Ok(HostCacheStats {
        memory: MemoryTierStats {
            bytes: memory_bytes,
            limit_bytes_per_process: memory_limit_bytes,
            processes: live.iter().filter(|f| f.memory_bytes > 0).count() as u64,
            hits: counters.memory_hits,
            misses: counters.memory_misses,
        },
        disk: DiskTierStats {
            bytes: disk.bytes,
            limit_bytes: disk_limit_bytes,
            block_files: disk.block_files,
            block_bytes: disk.block_bytes,
            whole_segments: disk.segments,
            whole_segment_bytes: disk.segment_bytes,
            passthrough_files: disk.passthrough_files,
            passthrough_bytes: disk.passthrough_bytes,
            metadata_files: disk.metadata_files,
            metadata_bytes: disk.metadata_bytes,
            shared_segments: disk.shared_segments,
            shared_bytes: disk.shared_bytes,
            hits: counters.disk_hits,
            misses: counters.disk_misses,
        },
        store: StoreStats { gets: counters.store_gets, bytes: counters.store_bytes },
        counters,
    })
}

/// Under the stats lock, moves the counters of exited processes into the
/// totals file. Returns the totals and the files of live processes.
fn fold_exited(stats_dir: &Path) -> std::io::Result<(CacheCounters, Vec<ProcessFile>)> {
    fs::create_dir_all(stats_dir)?;
    let lock = File::create(stats_dir.join(LOCK_FILE))?;
    // SAFETY: flock on a valid descriptor owned by `lock`, which outlives the lock.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let totals_path = stats_dir.join(TOTALS_FILE);
    let mut totals: CacheCounters = read_json(&totals_path).unwrap_or_default();
    let mut live = Vec::new();
    let mut exited = Vec::new();
    for entry in fs::read_dir(stats_dir)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let is_process_file =
            path.extension().is_some_and(|e| e == "json") && name != TOTALS_FILE && !name.to_string_lossy().starts_with('.');
        if !is_process_file {
            continue;
        }
        let Some(file) = read_json::<ProcessFile>(&path) else { continue };
        if start_ticks(file.pid) == Some(file.start_ticks) {
            live.push(file);
        } else {
            totals.add(&file.counters);
            exited.push(path);
        }
    }
    if !exited.is_empty() {
        // The totals are written before the folded files go, so a crash in
        // between counts them twice rather than losing them.
        write_json(&totals_path, &totals)?;
        for path in exited {
            let _ = fs::remove_file(path);
        }
    }
    Ok((totals, live))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", ulid::Ulid::new()));
    fs::write(&tmp, serde_json::to_vec(value).expect("serializable"))?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// Start time of process `pid` in clock ticks since boot, or `None` when it is not running.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 22 is the 20th after the name.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_ticks_are_readable() {
        assert!(start_ticks(std::process::id()).is_some());
        assert_eq!(start_ticks(u32::MAX), None);
    }

    #[test]
    fn exited_processes_fold_into_totals() {
        let dir = tempfile::tempdir().unwrap();
        let stats_dir = dir.path().join("stats");
        fs::create_dir_all(&stats_dir).unwrap();
        let counters = CacheCounters { memory_hits: 3, store_gets: 2, ..Default::default() };
        let gone = ProcessFile { pid: u32::MAX, start_ticks: 1, memory_bytes: 100, counters, ..Default::default() };
        write_json(&stats_dir.join("gone.json"), &gone).unwrap();
        let me = ProcessFile {
            pid: std::process::id(),
            start_ticks: start_ticks(std::process::id()).unwrap(),
            memory_bytes: 50,
            counters,
            ..Default::default()
        };
        write_json(&stats_dir.join("me.json"), &me).unwrap();

        let stats = host_stats(dir.path(), DiskUsage::default(), 10, 20).unwrap();
        assert_eq!(stats.memory.hits, 6);
        assert_eq!(stats.store.gets, 4);
        assert_eq!(stats.memory.bytes, 50, "an exited process holds no memory");
        assert!(!stats_dir.join("gone.json").exists());
        // Folding twice counts nothing twice.
        let again = host_stats(dir.path(), DiskUsage::default(), 10, 20).unwrap();
        assert_eq!(again.memory.hits, 6);
    }
}
