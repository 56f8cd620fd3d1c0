//! The read cache from the command line: the `--cache-memory` and
//! `--cache-disk` flags, `chalk cache stats` and `chalk volume warm`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context;
use chalk_engine::cache::{self, CacheConfig, HostCacheStats};
use chalk_engine::{FileKind, Ino, Store, StoreConfig, VolumeName};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use parking_lot::Mutex;
use serde_json::json;

use crate::output::{count, human_bytes};

/// Files read at once by `volume warm`.
const WARM_THREADS: usize = 4;
/// Bytes asked for by one read of `volume warm`.
const WARM_READ_BYTES: u32 = 4 << 20;

/// Cache limits, accepted by every command.
#[derive(Args, Debug)]
pub struct CacheFlags {
    /// Memory cache limit of this process, such as 512MiB [default: 512MiB]
    #[arg(long, global = true, value_name = "SIZE", env = "CHALK_CACHE_MEMORY", value_parser = parse_size_arg)]
    cache_memory: Option<u64>,
    /// Disk cache limit shared by every process using this CHALK_HOME, such as
    /// 20GiB [default: a quarter of its file system, at most 64GiB]
    #[arg(long, global = true, value_name = "SIZE", env = "CHALK_CACHE_DISK", value_parser = parse_size_arg)]
    cache_disk: Option<u64>,
}

impl CacheFlags {
    /// Passes the flags on as `CHALK_CACHE_MEMORY` and `CHALK_CACHE_DISK`,
    /// where the engine and any background mount process read them. Call it
    /// before any thread starts, because it changes the environment.
    pub fn export(&self) {
        for (name, value) in [("CHALK_CACHE_MEMORY", self.cache_memory), ("CHALK_CACHE_DISK", self.cache_disk)] {
            if let Some(bytes) = value {
                std::env::set_var(name, bytes.to_string());
            }
        }
    }
}

fn parse_size_arg(text: &str) -> Result<u64, String> {
    cache::parse_size(text)
}

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// Show the size, limit, hits and misses of each cache tier on this host.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

pub fn run_cache(command: CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Stats { json } => {
            let config = StoreConfig::from_env()?;
            let cache_root = config.local_root.join("cache");
            let cache_config = CacheConfig::from_env(&cache_root)?;
            let stats = cache::host_stats(&cache_root, &cache_config)
                .with_context(|| format!("failed to read the cache statistics under {}", cache_root.display()))?;
            print_stats(&stats, &cache_root, json)
        }
    }
}

fn print_stats(stats: &HostCacheStats, cache_root: &std::path::Path, json: bool) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(stats)?;
        value["cache_dir"] = json!(cache_root.display().to_string());
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let (memory, disk) = (&stats.memory, &stats.disk);
    println!("cache directory: {}", cache_root.display());
    println!("{:<7} {:>10}  {:<22} {:>10} {:>10}", "TIER", "SIZE", "LIMIT", "HITS", "MISSES");
    println!(
        "{:<7} {:>10}  {:<22} {:>10} {:>10}",
        "memory",
        human_bytes(memory.bytes),
        format!("{} per process", human_bytes(memory.limit_bytes_per_process)),
        memory.hits,
        memory.misses
    );
    println!(
        "{:<7} {:>10}  {:<22} {:>10} {:>10}",
        "disk",
        human_bytes(disk.bytes),
        human_bytes(disk.limit_bytes),
        disk.hits,
        disk.misses
    );
    println!("store:  {} ranged GETs, {} fetched", stats.store.gets, human_bytes(stats.store.bytes));
    println!(
        "memory tier: {} {} blocks",
        count(memory.processes as u64, "running process", "running processes"),
        if memory.processes == 1 { "holds" } else { "hold" },
    );
    println!(
        "disk tier: {} in {} of blocks, {} in {}, {} in {}, {} in {}",
        human_bytes(disk.block_bytes),
        count(disk.block_files as u64, "file", "files"),
        human_bytes(disk.whole_segment_bytes),
        count(disk.whole_segments as u64, "whole segment", "whole segments"),
        human_bytes(disk.passthrough_bytes),
        count(disk.passthrough_files as u64, "passthrough copy", "passthrough copies"),
        human_bytes(disk.metadata_bytes),
        count(disk.metadata_files as u64, "metadata copy", "metadata copies"),
    );
    if disk.shared_segments > 0 {
        println!(
            "{} of the whole segments are hard links to objects of the local store; their {} count as the store's, not the disk tier's",
            disk.shared_segments,
            human_bytes(disk.shared_bytes)
        );
    }
    let counters = &stats.counters;
    println!(
        "readahead: {} blocks prefetched; {} reads waited for a GET in flight; {} corrupt blocks dropped",
        counters.prefetched_blocks, counters.coalesced_waits, counters.corrupt_blocks
    );
    println!(
        "segment readahead across small files: {} prefetches of {} in total",
        counters.segment_prefetches,
        human_bytes(counters.segment_prefetch_bytes)
    );
    Ok(())
}

/// Files and bytes that `volume warm` read.
pub struct WarmSummary {
    pub files: u64,
    pub bytes: u64,
}

/// Reads every regular file under `paths` (the whole volume when empty)
/// through the cache, so its blocks land in the disk tier.
pub fn run_warm(store: &Arc<Store>, volume: &VolumeName, paths: &[String], version: Option<&str>) -> anyhow::Result<WarmSummary> {
    let session = crate::transfer::open_reader(store, volume, version)?;
    let roots: Vec<&str> = if paths.is_empty() { vec![""] } else { paths.iter().map(String::as_str).collect() };
    let mut files: Vec<(String, Ino, u64)> = Vec::new();
    for root in roots {
        let entries = session.walk(root, true).with_context(|| format!("failed to list {root:?} in volume {volume}"))?;
        files.extend(entries.into_iter().filter(|e| e.attr.kind == FileKind::File).map(|e| (e.path, e.attr.ino, e.attr.size)));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    files.dedup_by(|a, b| a.0 == b.0);
    let total_bytes: u64 = files.iter().map(|f| f.2).sum();
    let disk_limit = store.cache_config().disk_limit_bytes;
    if total_bytes > disk_limit {
        eprintln!(
            "warning: the files hold {}, more than the disk cache limit of {}; the first files read will be evicted again \
             (raise it with --cache-disk or CHALK_CACHE_DISK)",
            human_bytes(total_bytes),
            human_bytes(disk_limit)
        );
    }

    let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("warming {bytes}/{total_bytes} {bar:40} {bytes_per_sec} {msg}").expect("valid template"),
    );
    let next = AtomicUsize::new(0);
    let done_bytes = AtomicU64::new(0);
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..WARM_THREADS.min(files.len()) {
            scope.spawn(|| loop {
                if first_error.lock().is_some() {
                    return;
                }
                let Some((path, ino, size)) = files.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                bar.set_message(path.clone());
                let mut offset = 0;
                while offset < *size {
                    match session.read(*ino, offset, WARM_READ_BYTES) {
                        Ok(bytes) if bytes.is_empty() => break,
                        Ok(bytes) => {
                            offset += bytes.len() as u64;
                            done_bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                            bar.inc(bytes.len() as u64);
                        }
                        Err(err) => {
                            let err = anyhow::Error::new(err).context(format!("failed to read {path} of volume {volume}"));
                            first_error.lock().get_or_insert(err);
                            return;
                        }
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(err) = first_error.into_inner() {
        return Err(err);
    }
    store.flush_cache();
    Ok(WarmSummary { files: files.len() as u64, bytes: done_bytes.into_inner() })
}
