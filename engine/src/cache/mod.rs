//! The tiered read cache of sealed segments: memory, then the local disk,
//! then ranged GETs from the object store.
//!
//! A read of a sealed segment takes one of two paths:
//! 1. Whole local segments: a segment that this host wrote (in its session
//!    directory until it is published, then under `cache/segments/`) or
//!    fetched whole is read through a memory map.
//! 2. Blocks: any other segment is read in blocks of [`BLOCK_BYTES`] at
//!    block-aligned offsets. A block comes from the memory tier, else the
//!    disk tier, else from one ranged GET that also covers the missing
//!    blocks next to it, up to `request_max_bytes`. A block that is already
//!    being fetched is waited for and never requested twice.
//!
//! Sequential reads of a file grow a readahead window ([`readahead`]); the
//! blocks ahead are fetched by a pool of threads while the reader works.
//! Reads of small files that follow a segment's record order grow a window
//! over the segment ([`segment_readahead`]) that prefetches the next files'
//! bytes. Blocks go through the same pool. For whole local segments the
//! kernel reads the pages of the memory map in the background.
//!
//! Invariants:
//! - Bytes are returned only after the CRC of the record that holds them
//!   matched, checked against the very block instances the bytes are copied
//!   from: a block remembers the records it has checked, and a block fetched
//!   again starts with none.
//! - A record that fails its CRC is fetched once more from the object store,
//!   past the disk tier. If it fails again, the read fails with
//!   [`EngineError::CorruptSegment`] naming the segment and record offset.
//! - Every in-flight block is completed, with bytes or with an error, even
//!   when the thread fetching it unwinds, so a waiting reader never hangs.

mod config;
pub mod copies;
mod disk;
mod memory;
mod readahead;
mod segment_readahead;
mod stats;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

pub use config::{parse_size, CacheConfig};
pub use disk::{DiskUsage, PASSTHROUGH_DIR, SLOT_BYTES, SLOT_HEADER_BYTES};
pub use stats::{CacheCounters, CacheStats, DiskTierStats, HostCacheStats, MemoryTierStats, StoreStats};

use crate::error::{EngineError, Result};
use crate::extent::Extent;
use crate::format::record;
use crate::ids::{Ino, SegmentId, SessionId, VolumeName};
use crate::object_store::ObjectStore;
use crate::segment::{self, SealedSegment};
use crate::store::{segment_key, Store};
use disk::{DiskTier, Evicted, Load};
use memory::MemoryTier;
use readahead::Readahead;
use segment_readahead::SegmentReadahead;
use stats::{Counters, StatsWriter};

/// Size of a cache block, the unit of the memory and disk tiers. Part of the
/// disk tier's layout: block `i` of a segment holds its bytes from `i * BLOCK_BYTES`.
pub const BLOCK_BYTES: u64 = 1 << 20;

/// First readahead window of a sequential stream; it doubles on every sequential read.
const READAHEAD_INITIAL_BYTES: u64 = BLOCK_BYTES;

/// Largest segment-order readahead window. It stays small because it is
/// spent on files that the reader may never open, and one 1 MiB batch
/// already covers 16 files of 64 KiB.
const SEGMENT_READAHEAD_MAX_BYTES: u64 = 8 * BLOCK_BYTES;
/// Files of at least this size are left to the per-file readahead.
pub(crate) const SEGMENT_READAHEAD_FILE_MAX_BYTES: u64 = BLOCK_BYTES;

/// The negative cache of segments without a whole local file is cleared at this size.
const REMOTE_ONLY_MAX: usize = 100_000;

/// Blocks waiting for the disk writer; a fetch that finds the queue full waits.
const WRITE_BEHIND_BLOCKS: usize = 128;
/// Nice value of the disk writer thread.
const WRITER_NICE: libc::c_int = 10;

/// Identifies block `index` of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct BlockKey {
    pub segment: SegmentId,
    pub index: u64,
}

/// Bytes of one block, immutable once made. Blocks fetched by one GET
/// share its buffer, which lives until the last of them is dropped.
pub(crate) struct Block {
    data: Bytes,
    /// For a block cut from a GET's response: the whole response and the
    /// block's start in it. A read that spans blocks of one response is
    /// then served as one slice of it, without a copy.
    response: Option<(Bytes, usize)>,
    /// CRC32 of `data`, when the fetch computed it as the bytes arrived.
    crc: Option<u32>,
    /// Offsets of the records whose CRC was checked against these bytes.
    verified: Mutex<HashSet<u64>>,
}

impl Block {
    pub fn new(data: impl Into<Bytes>) -> Self {
        Block { data: data.into(), response: None, crc: None, verified: Mutex::new(HashSet::new()) }
    }

    /// Makes the block at `from..to` of a GET's response, with the CRC32 of those bytes if known.
    fn cut(response: &Bytes, from: usize, to: usize, crc: Option<u32>) -> Self {
        Block {
            data: response.slice(from..to),
            response: Some((response.clone(), from)),
            crc,
            verified: Mutex::new(HashSet::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }
}

/// A block being fetched, which other readers wait for.
struct Pending {
    result: Mutex<Option<std::result::Result<Arc<Block>, String>>>,
    ready: Condvar,
}

impl Pending {
    fn new() -> Self {
        Pending { result: Mutex::new(None), ready: Condvar::new() }
    }

    fn complete(&self, result: std::result::Result<Arc<Block>, String>) {
        let mut slot = self.result.lock();
        if slot.is_none() {
            *slot = Some(result);
            self.ready.notify_all();
        }
    }

    fn is_complete(&self) -> bool {
        self.result.lock().is_some()
    }

    fn wait(&self) -> std::result::Result<Arc<Block>, String> {
        let mut slot = self.result.lock();
        while slot.is_none() {
            self.ready.wait(&mut slot);
        }
        slot.clone().expect("completed above")
    }
}

/// Outcome of trying to claim a block for fetching.
enum Claim {
    /// This caller fetches the block and must complete the pending entry.
    Claimed(Arc<Pending>),
    /// Another caller is fetching it.
    InFlight(Arc<Pending>),
    /// It arrived in memory meanwhile.
    Ready(Arc<Block>),
}

/// Blocks of one segment that one caller claimed. Dropping it completes
/// every block still pending with an error, so waiters never hang.
struct Claims {
    core: Arc<Core>,
    volume: VolumeName,
    segment: SegmentId,
    /// Claimed block indexes, ascending, with their pending entries.
    items: Vec<(u64, Arc<Pending>)>,
}

impl Drop for Claims {
    fn drop(&mut self) {
        for (index, pending) in &self.items {
            if !pending.is_complete() {
                let key = BlockKey { segment: self.segment, index: *index };
                self.core.fail(&key, pending, "the fetch of this block was abandoned".into());
            }
        }
    }
}

/// State shared by readers and the readahead threads.
struct Core {
    objects: Arc<dyn ObjectStore>,
    config: CacheConfig,
    memory: MemoryTier,
    disk: DiskTier,
    inflight: Mutex<HashMap<BlockKey, Arc<Pending>>>,
    /// Whole local segments that are open, by id.
    whole: Mutex<HashMap<SegmentId, Arc<SealedSegment>>>,
    /// Segments known to have no whole local file.
    remote_only: Mutex<HashSet<SegmentId>>,
    readahead: Readahead,
    segment_readahead: SegmentReadahead,
    counters: Counters,
    write_behind: WriteBehind,
}

/// Blocks from the object store that one background thread writes to the
/// disk tier, so that no reader waits for the disk.
#[derive(Default)]
struct WriteBehind {
    /// Started by the first block to write.
    sender: OnceLock<crossbeam::channel::Sender<(BlockKey, Arc<Block>)>>,
    /// Blocks queued and not yet written.
    pending: Mutex<usize>,
    idle: Condvar,
}

/// A run of contiguous claimed blocks handed to a readahead thread.
type Job = Claims;

/// The read cache of one store: sealed segments on the local disk, blocks in
/// memory and on disk, and readahead.
pub(crate) struct SegmentCache {
    core: Arc<Core>,
    /// Readahead threads, started by the first prefetch. Dropping the sender stops them.
    pool: OnceLock<crossbeam::channel::Sender<Job>>,
    _stats: StatsWriter,
}

impl SegmentCache {
    /// Opens the cache under `cache_root` (`$CHALK_HOME/cache`).
    pub fn new(cache_root: &Path, objects: Arc<dyn ObjectStore>, config: CacheConfig) -> Result<Self> {
        let disk = DiskTier::new(cache_root, config.disk_limit_bytes, config.disk_free_min_bytes)?;
        let core = Arc::new(Core {
            objects,
            memory: MemoryTier::new(config.memory_limit_bytes),
            disk,
            inflight: Mutex::new(HashMap::new()),
            whole: Mutex::new(HashMap::new()),
            remote_only: Mutex::new(HashSet::new()),
            readahead: Readahead::new(READAHEAD_INITIAL_BYTES, config.readahead_max_bytes, config.request_max_bytes),
            segment_readahead: SegmentReadahead::new(
                BLOCK_BYTES,
                SEGMENT_READAHEAD_MAX_BYTES.min(config.readahead_max_bytes),
                BLOCK_BYTES,
            ),
            counters: Counters::default(),
            write_behind: WriteBehind::default(),
            config,
        });
        let snapshot_core = Arc::clone(&core);
        let stats = StatsWriter::start(
            cache_root.join("stats"),
            core.config.memory_limit_bytes,
            Arc::new(move || (snapshot_core.memory.usage().0, snapshot_core.counters.snapshot())),
        );
        Ok(SegmentCache { core, pool: OnceLock::new(), _stats: stats })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.core.config
    }

    pub fn path(&self, id: SegmentId) -> PathBuf {
        self.core.disk.segments_dir().join(segment::file_name(id))
    }

    /// Copies `buf.len()` bytes of a sealed extent, starting at its
    /// `data_offset`, after checking the CRC of the record that contains them.
    pub fn read(&self, volume: &VolumeName, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        if let Some(whole) = self.core.whole_segment(extent.segment)? {
            return whole.read_verified(extent.record_offset, extent.record_len, extent.data_offset, buf);
        }
        let (first, blocks) = self.core.verified_blocks(volume, extent, buf.len())?;
        Span { first, blocks: &blocks }.copy(extent.data_offset, buf);
        Ok(())
    }

    /// Returns `len` bytes of a sealed extent like [`SegmentCache::read`].
    /// When the bytes lie in one GET's response, the result is a slice of
    /// it instead of a copy.
    pub fn read_bytes(&self, volume: &VolumeName, extent: &Extent, len: usize) -> Result<Bytes> {
        if let Some(whole) = self.core.whole_segment(extent.segment)? {
            let mut out = vec![0u8; len];
            whole.read_verified(extent.record_offset, extent.record_len, extent.data_offset, &mut out)?;
            return Ok(Bytes::from(out));
        }
        let (first, blocks) = self.core.verified_blocks(volume, extent, len)?;
        let span = Span { first, blocks: &blocks };
        if let Some(shared) = span.shared(extent.data_offset, len) {
            return Ok(shared);
        }
        let mut out = vec![0u8; len];
        span.copy(extent.data_offset, &mut out);
        Ok(Bytes::from(out))
    }

    /// Records a read of `len` bytes at `offset` of a file of `size` bytes
    /// and returns the file range to prefetch, as `(offset, len)`, if any.
    pub fn readahead(&self, session: SessionId, ino: Ino, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        self.core.readahead.advise(session, ino, offset, len, size)
    }

    /// Starts fetching the blocks that hold `extents` in the background.
    pub fn prefetch(&self, volume: &VolumeName, extents: &[Extent]) {
        let mut by_segment: BTreeMap<SegmentId, BTreeSet<u64>> = BTreeMap::new();
        for extent in extents {
            if matches!(self.core.whole_segment(extent.segment), Ok(Some(_))) {
                continue;
            }
            let (first, last) = record_blocks(extent);
            by_segment.entry(extent.segment).or_default().extend(first..=last);
        }
        for (segment, indexes) in by_segment {
            self.prefetch_blocks(volume, segment, indexes);
        }
    }

    /// Records a read of the record of `extent`, part of a file smaller than
    /// [`SEGMENT_READAHEAD_FILE_MAX_BYTES`], and prefetches the segment
    /// bytes past it while such reads follow the segment's record order.
    pub fn segment_readahead(&self, volume: &VolumeName, session: SessionId, extent: &Extent) {
        let Some((offset, len)) = self.core.segment_readahead.advise(session, extent) else {
            return;
        };
        let whole = match self.core.whole_segment(extent.segment) {
            Ok(whole) => whole,
            Err(err) => {
                tracing::debug!(segment = %extent.segment, error = %err, "segment readahead skipped");
                return;
            }
        };
        let advised = match whole {
            Some(whole) => whole.will_need(offset, len),
            // The end of the segment object is not known here; blocks past
            // it come back empty and fail, and no reader waits for them.
            None => {
                let end = offset + len;
                self.prefetch_blocks(volume, extent.segment, (offset / BLOCK_BYTES)..=((end - 1) / BLOCK_BYTES));
                len
            }
        };
        if advised > 0 {
            Counters::add(&self.core.counters.segment_prefetches, 1);
            Counters::add(&self.core.counters.segment_prefetch_bytes, advised);
        }
    }

    /// Claims the blocks `indexes` of `segment` that are neither in memory
    /// nor in flight, and hands them to the readahead threads in runs of
    /// contiguous blocks of at most `request_max_bytes`.
    fn prefetch_blocks(&self, volume: &VolumeName, segment: SegmentId, indexes: impl IntoIterator<Item = u64>) {
        let request_blocks = (self.core.config.request_max_bytes / BLOCK_BYTES).max(1);
        let keys: Vec<BlockKey> = indexes
            .into_iter()
            .map(|index| BlockKey { segment, index })
            .filter(|key| !self.core.memory.contains(key))
            .collect();
        let mut run: Option<Claims> = None;
        for (key, claim) in self.core.claim_all(&keys) {
            let Claim::Claimed(pending) = claim else { continue };
            let index = key.index;
            let continues = run.as_ref().is_some_and(|r| {
                r.items.last().is_some_and(|(last, _)| last + 1 == index) && (r.items.len() as u64) < request_blocks
            });
            if !continues {
                if let Some(full) = run.take() {
                    self.submit(full);
                }
                run = Some(Claims { core: Arc::clone(&self.core), volume: volume.clone(), segment, items: Vec::new() });
            }
            run.as_mut().expect("set above").items.push((index, pending));
        }
        if let Some(last) = run {
            self.submit(last);
        }
    }

    fn submit(&self, job: Job) {
        let sender = self.pool.get_or_init(|| start_pool(&self.core));
        // A send fails only when every thread has exited; dropping the job
        // completes its blocks with an error, and readers fetch them themselves.
        let _ = sender.send(job);
    }

    /// Registers a sealed segment that still lives in a session directory.
    pub fn insert_unpublished(&self, id: SegmentId, path: &Path) -> Result<Arc<SealedSegment>> {
        let sealed = Arc::new(SealedSegment::open(id, path)?);
        self.core.whole.lock().insert(id, sealed.clone());
        Ok(sealed)
    }

    /// Moves a published segment from its session directory into the disk
    /// tier. The open memory map stays valid across the rename.
    pub fn adopt(&self, from: &Path, id: SegmentId) -> Result<()> {
        let to = self.path(id);
        std::fs::rename(from, &to).map_err(|e| EngineError::io("moving segment into the cache", &to, e))?;
        self.core.remote_only.lock().remove(&id);
        // A segment that the `file://` store hard-linked as its object adds no space.
        let bytes = std::fs::metadata(&to).map(|m| disk::owned_bytes(&m)).unwrap_or(0);
        self.core.note_disk_added(bytes, &to);
        Ok(())
    }

    pub fn forget(&self, id: SegmentId) {
        self.core.whole.lock().remove(&id);
    }

    /// Counts a file just written under the cache directory by another part
    /// of the system (a passthrough copy) against the disk tier's limit.
    pub fn note_file_added(&self, path: &Path) {
        let len = std::fs::metadata(path).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        self.core.note_disk_added(len, path);
    }

    /// Checks the disk tier's cached blocks of a segment. With `refetch`
    /// (the segment's object key), each damaged block is fetched again from
    /// the object store and replaces the damaged one.
    ///
    /// Fails with [`EngineError::ObjectStore`] when the store fails a
    /// refetch, leaving that block and the ones after it as they were.
    /// Any other failed refetch drops the damaged block and reports it unrepaired.
    pub fn check_blocks(&self, segment: SegmentId, refetch: Option<&str>) -> Result<Vec<BadBlock>> {
        let mut out = Vec::new();
        for (index, detail) in self.core.disk.check_file(segment) {
            let key = BlockKey { segment, index };
            let mut repaired = false;
            if let Some(object_key) = refetch {
                let fetched = match self.core.objects.get_range(object_key, index * BLOCK_BYTES, BLOCK_BYTES) {
                    Ok(bytes) => Some(bytes),
                    Err(err @ EngineError::ObjectStore { .. }) => return Err(err),
                    Err(_) => None,
                };
                self.core.memory.remove(&key);
                self.core.disk.remove(&key);
                if let Some(bytes) = fetched {
                    if !bytes.is_empty() {
                        let evicted = self.core.disk.store(&key, &bytes);
                        self.core.forget_evicted(evicted);
                    }
                    repaired = true;
                }
            }
            out.push(BadBlock { offset: index * BLOCK_BYTES, detail, repaired });
        }
        Ok(out)
    }

    /// Waits until every block fetched so far is written to the disk tier.
    pub fn flush(&self) {
        self.core.flush_disk_writes();
    }

    /// Returns a function that reads this cache's counters, for the metrics registry.
    pub(crate) fn counters_reader(&self) -> Arc<dyn Fn() -> CacheCounters + Send + Sync> {
        let core = Arc::clone(&self.core);
        Arc::new(move || core.counters.snapshot())
    }

    /// Statistics of the cache in this process.
    pub fn stats(&self) -> CacheStats {
        let (memory_bytes, memory_blocks) = self.core.memory.usage();
        CacheStats { memory_bytes, memory_blocks, counters: self.core.counters.snapshot() }
    }
}

impl Drop for SegmentCache {
    fn drop(&mut self) {
        // Blocks still queued would be lost; the queue is short.
        self.core.flush_disk_writes();
    }
}

/// Starts the thread that writes queued blocks to the disk tier. It keeps
/// only a weak reference to the cache, so that it ends with the cache.
fn start_disk_writer(core: std::sync::Weak<Core>) -> crossbeam::channel::Sender<(BlockKey, Arc<Block>)> {
    let (sender, receiver) = crossbeam::channel::bounded::<(BlockKey, Arc<Block>)>(WRITE_BEHIND_BLOCKS);
    let spawned = std::thread::Builder::new().name("chalk-cache-writer".into()).spawn(move || {
        // Readers come first when the CPU is busy; the queue bounds how far the writer lags.
        // SAFETY: setpriority with PRIO_PROCESS and this thread's id changes only this thread.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, WRITER_NICE) };
        for (key, block) in receiver {
            let Some(core) = core.upgrade() else { return };
            let evicted = match block.crc {
                Some(crc) => core.disk.store_with_crc(&key, &block.data, crc),
                None => core.disk.store(&key, &block.data),
            };
            core.forget_evicted(evicted);
            core.finish_disk_write();
        }
    });
    if let Err(err) = spawned {
        tracing::warn!(error = %err, "failed to start the disk cache writer; blocks are cached in memory only");
    }
    sender
}

fn start_pool(core: &Arc<Core>) -> crossbeam::channel::Sender<Job> {
    let (sender, receiver) = crossbeam::channel::unbounded::<Job>();
    for n in 0..core.config.fetch_threads {
        let core = Arc::clone(core);
        let receiver = receiver.clone();
        let spawned = std::thread::Builder::new().name(format!("chalk-readahead-{n}")).spawn(move || {
            for mut job in receiver {
                let blocks = job.items.len() as u64;
                let volume = job.volume.clone();
                match core.fetch(&volume, &mut job, Tiers::DiskAndStore) {
                    Ok(()) => Counters::add(&core.counters.prefetched_blocks, blocks),
                    // A reader that needs these blocks fetches them again and reports the error.
                    Err(err) => tracing::debug!(segment = %job.segment, error = %err, "readahead failed"),
                }
            }
        });
        if let Err(err) = spawned {
            tracing::warn!(error = %err, "failed to start a readahead thread");
        }
    }
    sender
}

/// Tiers a fetch may take blocks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tiers {
    DiskAndStore,
    /// Past the disk tier, for bytes that failed a check.
    StoreOnly,
}

/// First and last block index that hold the record of `extent`.
fn record_blocks(extent: &Extent) -> (u64, u64) {
    let end = extent.record_offset + extent.record_len as u64;
    (extent.record_offset / BLOCK_BYTES, (end.max(1) - 1) / BLOCK_BYTES)
}

impl Core {
    /// Returns the whole local file of a segment, opening it on first use.
    fn whole_segment(&self, id: SegmentId) -> Result<Option<Arc<SealedSegment>>> {
        if let Some(found) = self.whole.lock().get(&id) {
            return Ok(Some(found.clone()));
        }
        if self.remote_only.lock().contains(&id) {
            return Ok(None);
        }
        let path = self.disk.segments_dir().join(segment::file_name(id));
        match SealedSegment::open(id, &path) {
            Ok(sealed) => {
                self.disk.touch_segment(&path);
                Ok(Some(self.whole.lock().entry(id).or_insert(Arc::new(sealed)).clone()))
            }
            Err(EngineError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let mut remote_only = self.remote_only.lock();
                if remote_only.len() >= REMOTE_ONLY_MAX {
                    remote_only.clear();
                }
                remote_only.insert(id);
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// Returns the index of the first block that holds the record of an
    /// extent, and the blocks, after checking that they cover the record and
    /// that its CRC matches. The caller reads `len` bytes of the extent.
    fn verified_blocks(self: &Arc<Self>, volume: &VolumeName, extent: &Extent, len: usize) -> Result<(u64, Vec<Arc<Block>>)> {
        let record_start = extent.record_offset;
        let record_end = record_start + extent.record_len as u64;
        let data_end = extent.data_offset + len as u64;
        if extent.data_offset < record_start || data_end > record_end || extent.record_len == 0 {
            return Err(EngineError::CorruptSegment {
                object: "extent",
                segment: extent.segment,
                offset: extent.data_offset,
                detail: format!("extent [{}, {data_end}) is outside its record [{record_start}, {record_end})", extent.data_offset),
            });
        }
        let (first, last) = record_blocks(extent);
        for tiers in [Tiers::DiskAndStore, Tiers::StoreOnly] {
            let blocks = self.blocks(volume, extent.segment, first, last, tiers)?;
            let span = Span { first, blocks: &blocks };
            // A short or damaged response looks like a record cut by the end of
            // the object, or one that fails its CRC: both are fetched once more.
            match span.covers(record_end).and_then(|()| span.verify(record_start, record_end)) {
                Ok(()) => return Ok((first, blocks)),
                Err(detail) if tiers == Tiers::DiskAndStore => {
                    tracing::warn!(segment = %extent.segment, offset = record_start, detail = %detail, "record failed its checks; fetching it again");
                    Counters::add(&self.counters.corrupt_blocks, blocks.len() as u64);
                    for index in first..=last {
                        let key = BlockKey { segment: extent.segment, index };
                        self.memory.remove(&key);
                        self.disk.remove(&key);
                    }
                }
                Err(detail) => {
                    tracing::error!(segment = %extent.segment, offset = record_start, detail = %detail, "corrupt record in the object store");
                    return Err(EngineError::CorruptSegment { object: "record", segment: extent.segment, offset: record_start, detail });
                }
            }
        }
        unreachable!("the second pass returns")
    }

    /// Returns blocks `first..=last` of a segment from the tiers, fetching
    /// the missing ones with as few GETs as possible.
    fn blocks(self: &Arc<Self>, volume: &VolumeName, segment: SegmentId, first: u64, last: u64, tiers: Tiers) -> Result<Vec<Arc<Block>>> {
        let mut found: Vec<Option<Arc<Block>>> = vec![None; (last - first + 1) as usize];
        let mut missing = Vec::new();
        for index in first..=last {
            let key = BlockKey { segment, index };
            let in_memory = match tiers {
                Tiers::DiskAndStore => self.memory.get(&key),
                Tiers::StoreOnly => None,
            };
            match in_memory {
                Some(block) => {
                    Counters::add(&self.counters.memory_hits, 1);
                    found[(index - first) as usize] = Some(block);
                }
                None => {
                    Counters::add(&self.counters.memory_misses, 1);
                    missing.push(key);
                }
            }
        }

        let mut waits = Vec::new();
        let mut claims = Claims { core: Arc::clone(self), volume: volume.clone(), segment, items: Vec::new() };
        for (key, claim) in self.claim_all(&missing) {
            let slot = (key.index - first) as usize;
            match claim {
                Claim::Claimed(pending) => claims.items.push((key.index, pending)),
                Claim::InFlight(pending) => {
                    Counters::add(&self.counters.coalesced_waits, 1);
                    waits.push((slot, pending));
                }
                Claim::Ready(block) => found[slot] = Some(block),
            }
        }

        if !claims.items.is_empty() {
            self.fetch(volume, &mut claims, tiers)?;
            for (index, pending) in &claims.items {
                found[(index - first) as usize] = Some(pending.wait().map_err(|detail| self.fetch_error(segment, *index, detail))?);
            }
        }
        for (slot, pending) in waits {
            let index = first + slot as u64;
            found[slot] = Some(pending.wait().map_err(|detail| self.fetch_error(segment, index, detail))?);
        }
        Ok(found.into_iter().map(|block| block.expect("every slot is filled")).collect())
    }

    fn fetch_error(&self, segment: SegmentId, index: u64, detail: String) -> EngineError {
        EngineError::ObjectStore {
            url: self.objects.url(),
            detail: format!("fetching bytes {} of segment {segment} failed: {detail}", index * BLOCK_BYTES),
        }
    }

    /// Claims blocks for fetching, except those in flight or arrived
    /// meanwhile. One lock covers all of them, so that two readers of one
    /// range do not split it between them into smaller GETs.
    fn claim_all(&self, keys: &[BlockKey]) -> Vec<(BlockKey, Claim)> {
        let mut inflight = self.inflight.lock();
        keys.iter()
            .map(|key| {
                if let Some(pending) = inflight.get(key) {
                    return (*key, Claim::InFlight(pending.clone()));
                }
                // A fetch may have completed between the caller's memory lookup and this lock.
                if let Some(block) = self.memory.get(key) {
                    return (*key, Claim::Ready(block));
                }
                let pending = Arc::new(Pending::new());
                inflight.insert(*key, pending.clone());
                (*key, Claim::Claimed(pending))
            })
            .collect()
    }

    /// Fills the claimed blocks from the disk tier, then from the object
    /// store with one ranged GET per run of contiguous blocks. Every claimed
    /// block is completed; the first error is returned.
    fn fetch(self: &Arc<Self>, volume: &VolumeName, claims: &mut Claims, tiers: Tiers) -> Result<()> {
        let segment = claims.segment;
        let mut missing: Vec<(u64, Arc<Pending>)> = Vec::new();
        for (index, pending) in &claims.items {
            let key = BlockKey { segment, index: *index };
            if tiers == Tiers::DiskAndStore {
                match self.disk.load(&key) {
                    Load::Hit(data) => {
                        Counters::add(&self.counters.disk_hits, 1);
                        self.publish(&key, pending, Block::new(data), false);
                        continue;
                    }
                    Load::Corrupt => Counters::add(&self.counters.corrupt_blocks, 1),
                    Load::Miss => {}
                }
                Counters::add(&self.counters.disk_misses, 1);
            }
            missing.push((*index, pending.clone()));
        }

        let request_blocks = (self.config.request_max_bytes / BLOCK_BYTES).max(1) as usize;
        let mut first_error = None;
        let mut start = 0;
        while start < missing.len() {
            let mut end = start + 1;
            while end < missing.len() && missing[end].0 == missing[end - 1].0 + 1 && end - start < request_blocks {
                end += 1;
            }
            if let Err(err) = self.fetch_run(volume, segment, &missing[start..end]) {
                first_error.get_or_insert(err);
            }
            start = end;
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Fetches contiguous blocks with one ranged GET and publishes them.
    fn fetch_run(self: &Arc<Self>, volume: &VolumeName, segment: SegmentId, run: &[(u64, Arc<Pending>)]) -> Result<()> {
        let first = run[0].0;
        let offset = first * BLOCK_BYTES;
        let len = run.len() as u64 * BLOCK_BYTES;
        let (bytes, crcs) = match self.objects.get_range_pieces(&segment_key(volume, segment), offset, len, BLOCK_BYTES as usize) {
            Ok(fetched) => fetched,
            Err(err) => {
                for (index, pending) in run {
                    self.fail(&BlockKey { segment, index: *index }, pending, err.to_string());
                }
                return Err(err);
            }
        };
        Counters::add(&self.counters.store_gets, 1);
        Counters::add(&self.counters.store_bytes, bytes.len() as u64);
        for (index, pending) in run {
            let key = BlockKey { segment, index: *index };
            let from = ((index - first) * BLOCK_BYTES) as usize;
            if from >= bytes.len() {
                let detail = format!("the segment object ends at byte {}, before this block", offset + bytes.len() as u64);
                self.fail(&key, pending, detail);
                continue;
            }
            let to = (from + BLOCK_BYTES as usize).min(bytes.len());
            let crc = crcs.as_ref().and_then(|crcs| crcs.get((index - first) as usize).copied());
            self.publish(&key, pending, Block::cut(&bytes, from, to, crc), true);
        }
        Ok(())
    }

    /// Puts a fetched block in memory, wakes its waiters and, for a block
    /// from the object store, queues it for the disk tier.
    fn publish(self: &Arc<Self>, key: &BlockKey, pending: &Pending, block: Block, from_store: bool) {
        let block = Arc::new(block);
        let evicted = self.memory.insert(*key, block.clone());
        Counters::add(&self.counters.memory_evictions, evicted as u64);
        pending.complete(Ok(block.clone()));
        self.inflight.lock().remove(key);
        if from_store && self.config.disk_limit_bytes > 0 {
            let sender = self.write_behind.sender.get_or_init(|| start_disk_writer(Arc::downgrade(self)));
            *self.write_behind.pending.lock() += 1;
            if sender.send((*key, block)).is_err() {
                self.finish_disk_write();
            }
        }
    }

    fn finish_disk_write(&self) {
        let mut pending = self.write_behind.pending.lock();
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.write_behind.idle.notify_all();
        }
    }

    fn flush_disk_writes(&self) {
        let mut pending = self.write_behind.pending.lock();
        while *pending > 0 {
            self.write_behind.idle.wait(&mut pending);
        }
    }

    fn fail(&self, key: &BlockKey, pending: &Pending, detail: String) {
        pending.complete(Err(detail));
        self.inflight.lock().remove(key);
    }

    fn note_disk_added(&self, bytes: u64, written: &Path) {
        let evicted = self.disk.note_added(bytes, written);
        self.forget_evicted(evicted);
    }

    fn forget_evicted(&self, evicted: Evicted) {
        Counters::add(&self.counters.disk_evictions, evicted.files);
        if !evicted.segments.is_empty() {
            let mut whole = self.whole.lock();
            for id in evicted.segments {
                whole.remove(&id);
            }
        }
    }
}

/// A cached block that failed its checks.
#[derive(Clone, Debug)]
pub(crate) struct BadBlock {
    /// Segment offset of the block's first byte.
    pub offset: u64,
    pub detail: String,
    /// Dropped and fetched again from the object store.
    pub repaired: bool,
}

/// Consecutive blocks of one segment, starting at block `first`.
struct Span<'a> {
    first: u64,
    blocks: &'a [Arc<Block>],
}

impl Span<'_> {
    /// Checks that the blocks are contiguous bytes up to at least `end`.
    fn covers(&self, end: u64) -> std::result::Result<(), String> {
        let mut reached = self.first * BLOCK_BYTES;
        for (i, block) in self.blocks.iter().enumerate() {
            reached += block.len() as u64;
            if i + 1 < self.blocks.len() && block.len() as u64 != BLOCK_BYTES {
                return Err(format!("the segment object ends at byte {reached}, inside the record"));
            }
        }
        if reached < end {
            return Err(format!("the segment object ends at byte {reached}, before the record end {end}"));
        }
        Ok(())
    }

    /// Checks the CRC of the record `[start, end)`, unless every block has
    /// already checked it.
    fn verify(&self, start: u64, end: u64) -> std::result::Result<(), String> {
        if self.blocks.iter().all(|b| b.verified.lock().contains(&start)) {
            return Ok(());
        }
        let parts: Vec<&[u8]> =
            self.blocks.iter().enumerate().map(|(i, block)| self.slice(block, self.first + i as u64, start, end)).collect();
        record::verify_record_parts(&parts)?;
        for block in self.blocks {
            block.verified.lock().insert(start);
        }
        Ok(())
    }

    /// Returns the part of block `index` that falls in the segment range `[start, end)`.
    fn slice<'b>(&self, block: &'b Block, index: u64, start: u64, end: u64) -> &'b [u8] {
        let block_start = index * BLOCK_BYTES;
        let from = start.saturating_sub(block_start).min(block.len() as u64) as usize;
        let to = end.saturating_sub(block_start).min(block.len() as u64) as usize;
        &block.data[from..to.max(from)]
    }

    /// Returns the segment bytes `[offset, offset + len)` as one slice of a
    /// GET's response. Returns `None` unless every block they touch was cut
    /// from that response, in order.
    fn shared(&self, offset: u64, len: usize) -> Option<Bytes> {
        let end = offset + len as u64;
        // The response, where `offset` lies in it, and where the next block must start.
        let mut found: Option<(&Bytes, usize, usize)> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let block_start = (self.first + i as u64) * BLOCK_BYTES;
            if block_start + block.len() as u64 <= offset || block_start >= end {
                continue;
            }
            let (response, at) = block.response.as_ref()?;
            found = match found {
                None => Some((response, at + offset.checked_sub(block_start)? as usize, at + block.len())),
                Some((first, from, next)) if first.as_ptr() == response.as_ptr() && next == *at => {
                    Some((first, from, at + block.len()))
                }
                Some(_) => return None,
            };
        }
        let (response, from, next) = found?;
        (from + len <= next).then(|| response.slice(from..from + len))
    }

    /// Copies segment bytes from `offset` into `buf`.
    fn copy(&self, offset: u64, buf: &mut [u8]) {
        let end = offset + buf.len() as u64;
        let mut at = 0;
        for (i, block) in self.blocks.iter().enumerate() {
            let part = self.slice(block, self.first + i as u64, offset, end);
            buf[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        assert_eq!(at, buf.len(), "the span covers the copied range");
    }
}

/// Reads the host-wide statistics of the cache under `cache_root`, without
/// opening any object store.
pub fn host_stats(cache_root: &Path, config: &CacheConfig) -> Result<HostCacheStats> {
    let disk = DiskTier::new(cache_root, config.disk_limit_bytes, config.disk_free_min_bytes)?;
    stats::host_stats(cache_root, disk.usage(), config.disk_limit_bytes, config.memory_limit_bytes)
}

impl Store {
    /// Statistics of the read cache in this process.
    pub fn cache_stats(&self) -> CacheStats {
        self.segments.stats()
    }

    /// Sizes and tuning of this store's read cache.
    pub fn cache_config(&self) -> &CacheConfig {
        self.segments.config()
    }

    /// Waits until every block this process fetched is written to the disk cache.
    pub fn flush_cache(&self) {
        self.segments.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes a response of `blocks` full blocks from segment offset 0, whose byte `i` is `i % 251`.
    fn response(blocks: u64) -> Bytes {
        Bytes::from((0..blocks * BLOCK_BYTES).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
    }

    fn cut_all(response: &Bytes) -> Vec<Arc<Block>> {
        let block = BLOCK_BYTES as usize;
        (0..response.len() / block).map(|i| Arc::new(Block::cut(response, i * block, (i + 1) * block, None))).collect()
    }

    #[test]
    fn span_of_one_response_is_shared() {
        let whole = response(3);
        let blocks = cut_all(&whole);
        let span = Span { first: 0, blocks: &blocks };
        let (offset, len) = (BLOCK_BYTES - 100, BLOCK_BYTES as usize + 200);
        let shared = span.shared(offset, len).expect("one response holds the range");
        assert_eq!(&shared[..], &whole[offset as usize..offset as usize + len]);
        assert_eq!(shared.as_ptr(), whole[offset as usize..].as_ptr(), "the result is not a copy");
        // Past the last block there is nothing to share.
        assert_eq!(span.shared(3 * BLOCK_BYTES - 10, 20), None);
    }

    #[test]
    fn span_of_two_responses_is_copied() {
        let (one, two) = (response(1), response(1));
        let blocks = vec![Arc::new(Block::cut(&one, 0, one.len(), None)), Arc::new(Block::cut(&two, 0, two.len(), None))];
        let span = Span { first: 4, blocks: &blocks };
        let start = 4 * BLOCK_BYTES;
        assert!(span.shared(start + 10, 100).is_some(), "a range inside one block is shared");
        assert_eq!(span.shared(start + BLOCK_BYTES - 10, 20), None);

        let loaded = vec![Arc::new(Block::new(one.clone()))];
        assert_eq!(Span { first: 0, blocks: &loaded }.shared(0, 10), None);
    }
}
