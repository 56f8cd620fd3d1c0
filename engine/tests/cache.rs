//! The tiered read cache without S3: a writer publishes files into a
//! `file://` object store, and a reader with its own local root reads them
//! through a recording wrapper that counts, delays, fails or damages the
//! ranged GETs the cache sends.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use chalk_engine::cache::{self, CacheConfig, BLOCK_BYTES, SLOT_BYTES, SLOT_HEADER_BYTES};
use chalk_engine::object_store::{self, ListPage, ObjectStore};
use chalk_engine::{
    Access, EngineError, Ino, IoMode, LineageName, Owner, Session, SessionBase, Store, StoreConfig, SyncOutcome,
    VolumeName,
};
use parking_lot::Mutex;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Object store wrapper that records ranged GETs and can delay, fail or damage them.
struct Recording {
    inner: Arc<dyn ObjectStore>,
    /// Offset and length of every ranged GET, in order.
    ranges: Mutex<Vec<(u64, u64)>>,
    delay: Mutex<Duration>,
    unreachable: AtomicBool,
    /// The next this many ranged GETs return their bytes with one bit flipped
    /// in every 64 KiB, so every record they touch is damaged.
    corrupt_next: AtomicUsize,
}

impl Recording {
    fn new(inner: Arc<dyn ObjectStore>) -> Arc<Self> {
        Arc::new(Recording {
            inner,
            ranges: Mutex::new(Vec::new()),
            delay: Mutex::new(Duration::ZERO),
            unreachable: AtomicBool::new(false),
            corrupt_next: AtomicUsize::new(0),
        })
    }

    fn gets(&self) -> usize {
        self.ranges.lock().len()
    }

    fn check_reachable(&self) -> chalk_engine::Result<()> {
        if self.unreachable.load(Ordering::SeqCst) {
            return Err(EngineError::ObjectStore { url: self.inner.url(), detail: "connection refused (injected)".into() });
        }
        Ok(())
    }
}

impl ObjectStore for Recording {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.check_reachable()?;
        self.inner.put(key, data)
    }
    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.check_reachable()?;
        self.inner.put_file(key, path)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        self.check_reachable()?;
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        self.check_reachable()?;
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.check_reachable()?;
        self.ranges.lock().push((offset, len));
        let delay = *self.delay.lock();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut bytes = self.inner.get_range(key, offset, len)?;
        let corrupt = self.corrupt_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if corrupt {
            for at in (1000..bytes.len()).step_by(64 * 1024) {
                bytes[at] ^= 0x04;
            }
        }
        Ok(bytes)
    }
    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.check_reachable()?;
        self.inner.get_to_file(key, path)
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        self.check_reachable()?;
        self.inner.list(prefix, start_after, limit)
    }
    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.check_reachable()?;
        self.inner.delete(key)
    }
}

/// An object store with one volume `v` published by a writer on its own local root.
struct Published {
    objects: TempDir,
    writer_home: TempDir,
    volume: VolumeName,
}

/// Bytes that differ at every offset, so a misplaced block shows.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) ^ seed) as u8).collect()
}

fn publish(files: &[(&str, Vec<u8>)]) -> Published {
    publish_with(files, Syncs::One)
}

/// Whether [`publish_with`] syncs once or after every file (which puts every
/// file in a segment of its own).
#[derive(PartialEq)]
enum Syncs {
    One,
    PerFile,
}

fn publish_with(files: &[(&str, Vec<u8>)], syncs: Syncs) -> Published {
    let objects = tempfile::tempdir_in("/var/tmp").unwrap();
    let writer_home = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = StoreConfig {
        local_root: writer_home.path().to_owned(),
        object_store_url: format!("file://{}", objects.path().display()),
        io_mode: IoMode::Auto,
    };
    let store = Store::open(config).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    for (path, data) in files {
        session.write_file_from(path, &mut &data[..], 0o644, Owner::current()).unwrap();
        if syncs == Syncs::PerFile {
            assert!(matches!(session.sync(None).unwrap(), SyncOutcome::Published(_)));
        }
    }
    if syncs == Syncs::One {
        assert!(matches!(session.sync(None).unwrap(), SyncOutcome::Published(_)));
    }
    Published { objects, writer_home, volume }
}

fn small_cache(home: &Path) -> CacheConfig {
    let mut config = CacheConfig::defaults_for(&home.join("cache"));
    config.memory_limit_bytes = 64 * MIB;
    config.disk_limit_bytes = 1 << 30;
    // Test machines may have little free space; the check has tests of its own.
    config.disk_free_min_bytes = 0;
    config.readahead_max_bytes = 16 * MIB;
    config
}

/// A reader store on `home` over the published objects, through a recording wrapper.
fn reader(published: &Published, home: &Path, cache: CacheConfig) -> (Arc<Store>, Arc<Recording>) {
    let url = format!("file://{}", published.objects.path().display());
    let recording = Recording::new(object_store::open(&url).unwrap());
    let config = StoreConfig { local_root: home.to_owned(), object_store_url: url, io_mode: IoMode::Auto };
    let store = Store::open_with_cache(config, recording.clone(), cache).unwrap();
    (store, recording)
}

fn read_session(store: &Arc<Store>, volume: &VolumeName) -> Session {
    store.open_session(volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap()
}

/// Reads a whole file in `chunk`-byte reads, like `cat`.
fn read_all(session: &Session, path: &str, chunk: u32) -> Vec<u8> {
    let attr = session.resolve_path(path).unwrap();
    let mut out = Vec::with_capacity(attr.size as usize);
    while (out.len() as u64) < attr.size {
        let bytes = session.read(attr.ino, out.len() as u64, chunk).unwrap();
        assert!(!bytes.is_empty(), "short read at {} of {path}", out.len());
        out.extend_from_slice(&bytes);
    }
    out
}

fn ino_of(session: &Session, path: &str) -> Ino {
    session.resolve_path(path).unwrap().ino
}

#[test]
fn disk_cache_survives_restart() {
    let data = pattern(5 * MIB + 123, 1);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    {
        let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
        assert_eq!(read_all(&read_session(&store, &published.volume), "f", 128 * 1024), data);
        assert!(recording.gets() > 0);
        assert!(store.cache_stats().counters.store_bytes >= data.len() as u64);
    }

    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    assert_eq!(read_all(&read_session(&store, &published.volume), "f", 128 * 1024), data);
    assert_eq!(recording.gets(), 0, "a restarted reader fetched blocks that the disk cache holds");
    let counters = store.cache_stats().counters;
    assert!(counters.disk_hits >= 6, "{counters:?}");
    assert_eq!(counters.disk_misses, 0, "{counters:?}");
}

#[test]
fn disk_cache_stays_within_limit() {
    let files: Vec<(String, Vec<u8>)> = (0..6).map(|i| (format!("f{i}"), pattern(4 * MIB, i))).collect();
    let refs: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    // The disk tier evicts whole segments, so each file gets its own.
    let published = publish_with(&refs, Syncs::PerFile);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut config = small_cache(home.path());
    config.disk_limit_bytes = 6 * MIB;
    let (store, _recording) = reader(&published, home.path(), config.clone());
    let session = read_session(&store, &published.volume);
    for (path, data) in &files {
        assert_eq!(&read_all(&session, path, MIB as u32), data, "{path}");
    }
    store.flush_cache();

    let stats = cache::host_stats(&home.path().join("cache"), &config).unwrap();
    assert!(stats.disk.bytes <= config.disk_limit_bytes, "disk tier holds {} bytes", stats.disk.bytes);
    assert!(stats.disk.bytes > 0);
    assert!(store.cache_stats().counters.disk_evictions > 0);
    // The most recently read file is the one still cached.
    drop(session);
    let (store, recording) = reader(&published, home.path(), config);
    let session = read_session(&store, &published.volume);
    assert_eq!(read_all(&session, "f5", MIB as u32), files[5].1);
    assert_eq!(recording.gets(), 0, "the newest file was evicted before older ones");
}

#[test]
fn disk_stats_leave_out_linked_segments() {
    let data = pattern(4 * MIB, 1);
    let published = publish(&[("f", data)]);
    let cache_root = published.writer_home.path().join("cache");
    let config = small_cache(published.writer_home.path());

    let stats = cache::host_stats(&cache_root, &config).unwrap();
    assert_eq!(stats.disk.whole_segments, 1, "{:?}", stats.disk);
    assert_eq!(stats.disk.shared_segments, 1, "the published segment was copied, not linked: {:?}", stats.disk);
    assert!(stats.disk.shared_bytes >= 4 * MIB, "{:?}", stats.disk);
    assert!(stats.disk.bytes < MIB, "the disk tier counts the store's bytes: {:?}", stats.disk);
}

#[test]
fn passthrough_copies_count_against_disk_limit() {
    let published = publish(&[("f", pattern(MIB, 1))]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut config = small_cache(home.path());
    config.disk_limit_bytes = 6 * MIB;
    let (store, _recording) = reader(&published, home.path(), config);
    let version_dir = home.path().join("cache").join(cache::PASSTHROUGH_DIR).join("01version");
    std::fs::create_dir_all(&version_dir).unwrap();
    let copies: Vec<_> = (0..4).map(|i| version_dir.join(i.to_string())).collect();
    for (i, copy) in copies.iter().enumerate() {
        std::fs::write(copy, pattern(2 * MIB, i as u64)).unwrap();
        // Modification times order eviction; keep them apart.
        let age = std::time::Duration::from_secs(100 - i as u64 * 10);
        std::fs::File::options().write(true).open(copy).unwrap().set_modified(std::time::SystemTime::now() - age).unwrap();
        store.note_cache_file(copy);
    }
    // 8 MiB of copies against a 6 MiB limit: the oldest go until usage is at most 90%.
    assert!(!copies[0].exists(), "the least recently used copy was kept");
    assert!(copies[3].exists(), "the newest copy was evicted");
}

#[test]
fn corrupt_disk_block_is_fetched_again() {
    let data = pattern(3 * MIB, 2);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    {
        let (store, _) = reader(&published, home.path(), small_cache(home.path()));
        assert_eq!(read_all(&read_session(&store, &published.volume), "f", MIB as u32), data);
    }
    // Flip one byte of block 1 in the segment's file of cached blocks.
    let blocks_dir = home.path().join("cache/blocks");
    let file = std::fs::read_dir(&blocks_dir).unwrap().next().unwrap().unwrap().path();
    let at = SLOT_BYTES + SLOT_HEADER_BYTES + 4000;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[at as usize] ^= 0x80;
    std::fs::write(&file, &bytes).unwrap();

    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    assert_eq!(read_all(&read_session(&store, &published.volume), "f", MIB as u32), data);
    assert_eq!(recording.gets(), 1, "only the damaged block is fetched again");
    assert_eq!(store.cache_stats().counters.corrupt_blocks, 1);
}

#[test]
fn concurrent_reads_share_one_get() {
    let data = pattern(8 * MIB, 3);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    *recording.delay.lock() = Duration::from_millis(300);
    let session = read_session(&store, &published.volume);
    let ino = ino_of(&session, "f");

    let threads = 8;
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                barrier.wait();
                // Far from the start of the file, so that readahead stays out of the way.
                let at = 5 * MIB as usize + 1000;
                assert_eq!(session.read(ino, at as u64, 5000).unwrap(), &data[at..at + 5000]);
            });
        }
    });
    assert_eq!(recording.gets(), 1, "concurrent reads of one range sent {} GETs", recording.gets());
    let counters = store.cache_stats().counters;
    assert!(counters.coalesced_waits >= 1, "{counters:?}");
    assert_eq!(counters.prefetched_blocks, 0, "{counters:?}");
}

#[test]
fn sequential_read_prefetches_in_large_gets() {
    let data = pattern(48 * MIB, 4);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    *recording.delay.lock() = Duration::from_millis(20);
    let session = read_session(&store, &published.volume);

    assert_eq!(read_all(&session, "f", 128 * 1024), data);
    let counters = store.cache_stats().counters;
    assert!(counters.prefetched_blocks >= 32, "{counters:?}");
    let ranges = recording.ranges.lock().clone();
    let large = ranges.iter().filter(|(_, len)| *len >= 4 * MIB).count();
    assert!(large * 2 >= ranges.len(), "most GETs should be large: {ranges:?}");
    // Every block was fetched once.
    let fetched: u64 = ranges.iter().map(|(_, len)| len).sum();
    assert!(fetched < data.len() as u64 + 4 * BLOCK_BYTES, "fetched {fetched} bytes for {}", data.len());
}

#[test]
fn random_reads_fetch_only_their_blocks() {
    let data = pattern(40 * MIB, 5);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    let session = read_session(&store, &published.volume);
    let ino = ino_of(&session, "f");
    for offset in [37 * MIB + 11, 3 * MIB + 5, 20 * MIB - 7, 9 * MIB] {
        assert_eq!(session.read(ino, offset, 4096).unwrap(), &data[offset as usize..offset as usize + 4096]);
    }
    // A record is at most 4 MiB, so each read needs at most 5 blocks.
    let fetched: u64 = recording.ranges.lock().iter().map(|(_, len)| len).sum();
    assert!(fetched <= 4 * 5 * BLOCK_BYTES, "four small reads fetched {fetched} bytes");
    assert_eq!(store.cache_stats().counters.prefetched_blocks, 0);
}

#[test]
fn reads_at_odd_offsets_and_end_of_file() {
    let len = 9 * MIB + 4097;
    let data = pattern(len, 6);
    let published = publish(&[("f", data.clone()), ("empty", Vec::new()), ("tiny", b"x".to_vec())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, _) = reader(&published, home.path(), small_cache(home.path()));
    let session = read_session(&store, &published.volume);
    let ino = ino_of(&session, "f");
    for (offset, want) in [(0, 1), (1, 4095), (MIB - 1, 2), (4 * MIB - 3, 7), (len - 10, 100), (len - 1, 1), (len, 10), (len + 5, 1)] {
        let got = session.read(ino, offset, want as u32).unwrap();
        let end = (offset + want).min(len);
        let expected = if offset >= len { &[][..] } else { &data[offset as usize..end as usize] };
        assert_eq!(got, expected, "read of {want} bytes at {offset}");
    }
    assert_eq!(read_all(&session, "tiny", 10), b"x");
    assert!(session.read(ino_of(&session, "empty"), 0, 10).unwrap().is_empty());
}

#[test]
fn memory_tier_stays_within_limit() {
    let data = pattern(24 * MIB, 7);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut config = small_cache(home.path());
    config.memory_limit_bytes = 6 * MIB;
    let (store, _) = reader(&published, home.path(), config);
    assert_eq!(read_all(&read_session(&store, &published.volume), "f", MIB as u32), data);
    let stats = store.cache_stats();
    assert!(stats.memory_bytes <= 6 * MIB, "memory tier holds {} bytes", stats.memory_bytes);
    assert!(stats.counters.memory_evictions > 0);
}

#[test]
fn damaged_object_bytes_are_fetched_again() {
    let data = pattern(2 * MIB, 8);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    recording.corrupt_next.store(1, Ordering::SeqCst);
    let session = read_session(&store, &published.volume);
    assert_eq!(read_all(&session, "f", MIB as u32), data);
    assert!(store.cache_stats().counters.corrupt_blocks >= 1);
}

#[test]
fn persistently_damaged_bytes_are_never_returned() {
    let data = pattern(2 * MIB, 9);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    recording.corrupt_next.store(usize::MAX, Ordering::SeqCst);
    let session = read_session(&store, &published.volume);
    let ino = ino_of(&session, "f");
    match session.read(ino, 100, 1000) {
        Err(EngineError::CorruptSegment { object, .. }) => assert_eq!(object, "record"),
        other => panic!("expected a corruption error, got {other:?}"),
    }
    // Once the store serves good bytes again, the same read succeeds.
    recording.corrupt_next.store(0, Ordering::SeqCst);
    assert_eq!(session.read(ino, 100, 1000).unwrap(), &data[100..1100]);
}

#[test]
fn unreachable_store_serves_cached_blocks() {
    let cached = pattern(3 * MIB, 10);
    let other = pattern(MIB, 11);
    let published = publish(&[("cached", cached.clone()), ("other", other)]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    let session = read_session(&store, &published.volume);
    let other_ino = ino_of(&session, "other");
    assert_eq!(read_all(&session, "cached", MIB as u32), cached);

    recording.unreachable.store(true, Ordering::SeqCst);
    assert_eq!(read_all(&session, "cached", MIB as u32), cached);
    let started = Instant::now();
    // The first file's last record may share a block with the second file.
    // Reading past it needs a block that was never fetched.
    let result = session.read(other_ino, MIB - 4096, 4096);
    assert!(result.is_err(), "a read of uncached bytes succeeded without the store");
    assert!(started.elapsed() < Duration::from_secs(10), "the failed read took {:?}", started.elapsed());
}

/// Files `d/f000`, `d/f001`, ... of 64 KiB, each with its own bytes.
fn small_files(count: usize) -> Vec<(String, Vec<u8>)> {
    (0..count).map(|i| (format!("d/f{i:03}"), pattern(64 * 1024, 100 + i as u64))).collect()
}

fn publish_small_files(files: &[(String, Vec<u8>)]) -> Published {
    let borrowed: Vec<(&str, Vec<u8>)> = files.iter().map(|(path, data)| (path.as_str(), data.clone())).collect();
    publish(&borrowed)
}

/// Reads the files at `order` like `cat` does and checks every byte.
fn read_in_order(session: &Session, files: &[(String, Vec<u8>)], order: impl IntoIterator<Item = usize>) {
    for i in order {
        let (path, data) = &files[i];
        assert!(read_all(session, path, 128 * 1024) == *data, "{path} read back different bytes");
    }
}

#[test]
fn small_files_in_order_are_prefetched() {
    let files = small_files(200);
    let published = publish_small_files(&files);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, recording) = reader(&published, home.path(), small_cache(home.path()));
    *recording.delay.lock() = Duration::from_millis(5);
    let session = read_session(&store, &published.volume);

    read_in_order(&session, &files, 0..files.len());
    let counters = store.cache_stats().counters;
    // 200 files of 64 KiB take 13 blocks of 1 MiB. Without the segment
    // readahead the reader fetches every one of them itself.
    assert!(counters.segment_prefetches >= 3, "{counters:?}");
    assert!(counters.prefetched_blocks >= 10, "{counters:?}");
    let total: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();
    assert!(counters.segment_prefetch_bytes <= total + 8 * MIB, "{counters:?}");
    // Every block of the segment was requested once. The readahead does not
    // know where the segment ends, so its last batches request up to its
    // 8 MiB window past the end, for which the store returns no bytes.
    let ranges = recording.ranges.lock().clone();
    let requested: u64 = ranges.iter().map(|(_, len)| len).sum();
    assert!(requested <= total + 10 * MIB, "requested {requested} bytes for {total}: {ranges:?}");
    let mut starts: Vec<u64> = ranges
        .iter()
        .flat_map(|&(offset, len)| (offset..offset + len).step_by(BLOCK_BYTES as usize))
        .filter(|&start| start < total)
        .collect();
    let count = starts.len();
    starts.sort_unstable();
    starts.dedup();
    assert_eq!(starts.len(), count, "a block was requested twice: {ranges:?}");
}

#[test]
fn small_files_out_of_order_are_not_prefetched() {
    let files = small_files(200);
    let published = publish_small_files(&files);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, _) = reader(&published, home.path(), small_cache(home.path()));
    let session = read_session(&store, &published.volume);

    // Steps of 7 files: every read jumps past the next records.
    read_in_order(&session, &files, (0..files.len()).map(|i| i * 7 % files.len()));
    let counters = store.cache_stats().counters;
    assert_eq!(counters.segment_prefetches, 0, "{counters:?}");
    assert_eq!(counters.segment_prefetch_bytes, 0, "{counters:?}");
    assert_eq!(counters.prefetched_blocks, 0, "{counters:?}");
}

#[test]
fn small_files_of_local_segment_are_prefetched() {
    let files = small_files(100);
    let published = publish_small_files(&files);
    // The writer's own root contains the whole segment, which reads map.
    let config = StoreConfig {
        local_root: published.writer_home.path().to_owned(),
        object_store_url: format!("file://{}", published.objects.path().display()),
        io_mode: IoMode::Auto,
    };
    let store = Store::open(config).unwrap();
    let session = read_session(&store, &published.volume);

    read_in_order(&session, &files, 0..files.len());
    let counters = store.cache_stats().counters;
    assert!(counters.segment_prefetches >= 3, "{counters:?}");
    let total: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();
    // The advice is clipped to the segment, whose records hold the files.
    assert!(counters.segment_prefetch_bytes > MIB, "{counters:?}");
    assert!(counters.segment_prefetch_bytes <= total + MIB, "{counters:?}");
    assert_eq!(counters.store_gets, 0, "{counters:?}");

    // A writable session does not prefetch, because its records may be anywhere.
    let writable = store.open_session(&published.volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    read_in_order(&writable, &files, 0..files.len());
    assert_eq!(store.cache_stats().counters.segment_prefetches, counters.segment_prefetches);
}

#[test]
fn host_stats_count_every_tier() {
    let data = pattern(2 * MIB, 12);
    let published = publish(&[("f", data.clone())]);
    let home = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = small_cache(home.path());
    {
        let (store, _) = reader(&published, home.path(), config.clone());
        let session = read_session(&store, &published.volume);
        assert_eq!(read_all(&session, "f", MIB as u32), data);
        assert_eq!(read_all(&session, "f", MIB as u32), data);
    }
    let stats = cache::host_stats(&home.path().join("cache"), &config).unwrap();
    assert!(stats.memory.hits > 0, "{stats:?}");
    assert!(stats.memory.misses > 0, "{stats:?}");
    assert!(stats.disk.misses > 0, "{stats:?}");
    assert!(stats.store.gets > 0, "{stats:?}");
    assert!(stats.disk.bytes >= data.len() as u64, "{stats:?}");
    assert_eq!(stats.memory.bytes, 0, "a closed store holds no memory: {stats:?}");
    assert_eq!(stats.disk.limit_bytes, config.disk_limit_bytes);
}
