//! Contract tests of the engine, without FUSE: versions, privacy until sync,
//! discard on drop, durability without the local disk, integrity and the
//! cost of opening and syncing.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chalk_engine::object_store::{self, ListPage, ObjectStore};
use chalk_engine::{
    Access, EngineError, Ino, IoMode, LineageName, Owner, Session, SessionBase, Store, StoreConfig, SyncOutcome,
    VersionInfo, VolumeName,
};

fn store_at(root: &Path) -> Arc<Store> {
    Store::open(StoreConfig::with_local_root(root)).unwrap()
}

fn main_lineage() -> SessionBase {
    SessionBase::Lineage(LineageName::main())
}

fn writable(store: &Arc<Store>, volume: &VolumeName) -> Session {
    store.open_session(volume, main_lineage(), Access::Writable).unwrap()
}

fn put(session: &Session, path: &str, data: &[u8]) {
    session.write_file_from(path, &mut &data[..], 0o644, Owner::current()).unwrap();
}

fn read(session: &Session, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    session.read_file_to(path, &mut out).unwrap();
    out
}

fn published(outcome: SyncOutcome) -> VersionInfo {
    match outcome {
        SyncOutcome::Published(info) => info,
        other => panic!("expected a published version, got {other:?}"),
    }
}

fn new_volume(store: &Arc<Store>, name: &str) -> VolumeName {
    let volume = VolumeName::new(name).unwrap();
    store.create_volume(&volume).unwrap();
    volume
}

#[test]
fn create_publishes_empty_first_version() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let versions = store.versions(&volume, &LineageName::main()).unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].seq, 1);
    assert!(versions[0].parent.is_none());
    let session = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(session.readdir(Ino::ROOT).unwrap().is_empty());
    assert!(matches!(store.create_volume(&volume), Err(EngineError::AlreadyExists { .. })));
}

#[test]
fn writes_stay_private_until_sync() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let writer = writable(&store, &volume);
    let before = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    put(&writer, "a/b.txt", b"hello");
    assert_eq!(read(&writer, "a/b.txt"), b"hello");

    let other = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(matches!(other.resolve_path("a/b.txt"), Err(EngineError::NotFound { .. })));

    let version = published(writer.sync(Some("first")).unwrap());
    assert_eq!(version.seq, 2);
    assert_eq!(version.files, 1);
    assert_eq!(version.bytes, 5);
    // Sessions opened before the sync keep their snapshot.
    assert!(before.resolve_path("a/b.txt").is_err());
    let after = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert_eq!(read(&after, "a/b.txt"), b"hello");
}

#[test]
fn dropped_session_publishes_nothing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    {
        let session = writable(&store, &volume);
        put(&session, "lost.bin", &vec![7u8; 100_000]);
        session.fsync().unwrap();
    }
    assert_eq!(store.versions(&volume, &LineageName::main()).unwrap().len(), 1);
    let sessions: Vec<_> = std::fs::read_dir(dir.path().join("sessions")).unwrap().collect();
    assert!(sessions.is_empty(), "session directory left behind: {sessions:?}");
    let reader = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(reader.resolve_path("lost.bin").is_err());
}

#[test]
fn sync_without_changes_creates_no_version() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    match session.sync(None).unwrap() {
        SyncOutcome::NothingToPublish { base } => assert_eq!(base.seq, 1),
        other => panic!("expected nothing to publish, got {other:?}"),
    }
    put(&session, "x", b"1");
    published(session.sync(None).unwrap());
    assert!(matches!(session.sync(None).unwrap(), SyncOutcome::NothingToPublish { .. }));
    assert_eq!(store.versions(&volume, &LineageName::main()).unwrap().len(), 2);
}

#[test]
fn old_versions_stay_readable_and_read_only() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "f", b"one");
    let first = published(session.sync(None).unwrap());
    put(&session, "f", b"two, longer");
    session.remove_path("f", false).unwrap();
    put(&session, "f", b"three");
    let second = published(session.sync(None).unwrap());
    assert_eq!(second.parent, Some(first.id));

    let versions = store.versions(&volume, &LineageName::main()).unwrap();
    assert_eq!(versions.iter().map(|v| v.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    let old = store.open_session(&volume, SessionBase::Version(first.id), Access::ReadOnly).unwrap();
    assert_eq!(read(&old, "f"), b"one");
    let ino = old.resolve_path("f").unwrap().ino;
    assert!(matches!(old.write(ino, 0, b"x"), Err(EngineError::ReadOnly { .. })));
    assert!(matches!(old.unlink(Ino::ROOT, OsStr::new("f")), Err(EngineError::ReadOnly { .. })));
    let prefix = &first.id.to_string()[..20];
    assert_eq!(store.resolve_version(&volume, prefix).unwrap().id, first.id);
}

#[test]
fn second_writer_conflicts_and_keeps_writes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let a = writable(&store, &volume);
    let b = writable(&store, &volume);
    put(&a, "same", b"from a");
    put(&b, "same", b"from b");
    published(a.sync(None).unwrap());
    let err = b.sync(None).unwrap_err();
    assert!(matches!(err, EngineError::Conflict { .. }), "{err}");
    assert_eq!(read(&b, "same"), b"from b");
    assert_eq!(store.versions(&volume, &LineageName::main()).unwrap().len(), 2);
}

#[test]
fn synced_version_survives_loss_of_local_disk() {
    let objects = tempfile::tempdir_in("/var/tmp").unwrap();
    let url = format!("file://{}", objects.path().display());
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let volume = VolumeName::new("v").unwrap();
    {
        let local = tempfile::tempdir_in("/var/tmp").unwrap();
        let config = StoreConfig { local_root: local.path().to_owned(), object_store_url: url.clone(), io_mode: IoMode::Auto };
        let store = Store::open(config).unwrap();
        store.create_volume(&volume).unwrap();
        let session = writable(&store, &volume);
        put(&session, "big.bin", &data);
        put(&session, "dir/small.txt", b"small");
        published(session.sync(None).unwrap());
        // The local root, with its segment cache, is deleted here.
    }
    let fresh = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = StoreConfig { local_root: fresh.path().to_owned(), object_store_url: url, io_mode: IoMode::Auto };
    let store = Store::open(config).unwrap();
    let reader = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert_eq!(read(&reader, "big.bin"), data);
    assert_eq!(read(&reader, "dir/small.txt"), b"small");
}

#[test]
fn synced_segments_outlive_local_copies() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "big.bin", &data);
    let version = published(session.sync(None).unwrap());
    drop(session);
    drop(store);
    let cached: Vec<_> = version.segments.iter().map(|s| dir.path().join(format!("cache/segments/{s}.seg"))).collect();
    for path in &cached {
        // The default store is on the same file system, so put_file linked the segment.
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(path).unwrap()), 2, "{} is not linked", path.display());
    }

    // Local copies replaced by other bytes: a store with a fresh local root reads the objects.
    for path in &cached {
        let len = std::fs::metadata(path).unwrap().len() as usize;
        let replacement = path.with_extension("new");
        std::fs::write(&replacement, vec![0x5a; len]).unwrap();
        std::fs::rename(&replacement, path).unwrap();
    }
    let fresh = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = StoreConfig {
        local_root: fresh.path().to_owned(),
        object_store_url: format!("file://{}", dir.path().join("objects").display()),
        io_mode: IoMode::Auto,
    };
    let reader = Store::open(config).unwrap().open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(read(&reader, "big.bin") == data, "a version read from the store after its local copies were replaced has other bytes");

    // Local copies deleted: the same local root fetches the segments again.
    for path in &cached {
        std::fs::remove_file(path).unwrap();
    }
    let reader = store_at(dir.path()).open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(read(&reader, "big.bin") == data, "a version read after its local copies were deleted has other bytes");
}

#[test]
fn loaded_lookup_builds_neighbours_from_their_page() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "d/one", b"first");
    put(&session, "d/two", b"second file");
    put(&session, "d/sub/three", b"3");
    let version = published(session.sync(None).unwrap());
    drop(session);

    let store = store_at(dir.path());
    let reader = store.open_session(&volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
    let d = reader.lookup(Ino::ROOT, OsStr::new("d")).unwrap().ino;

    // One sync put the files of `d` on the page that the lookup of `d` loaded.
    let one = reader.lookup_loaded(d, OsStr::new("one")).expect("the page of one is loaded").unwrap();
    assert_eq!(one.size, 5);
    let two = reader.lookup_loaded(d, OsStr::new("two")).expect("the page of two is loaded").unwrap();
    assert_eq!(two.size, 11);
    let missing = reader.lookup_loaded(d, OsStr::new("absent")).expect("the listing of d is loaded");
    assert!(matches!(missing, Err(EngineError::NotFound { .. })), "{missing:?}");

    // A directory also needs its listing, which the page does not hold.
    assert!(reader.lookup_loaded(d, OsStr::new("sub")).is_none());
    let sub = reader.lookup(d, OsStr::new("sub")).unwrap().ino;
    assert_eq!(sub, reader.resolve_path("d/sub").unwrap().ino);
    let three = reader.lookup_loaded(sub, OsStr::new("three")).expect("the listing of sub is loaded now").unwrap();
    assert_eq!(three.size, 1);
}

#[test]
fn pwrite_fallback_round_trips() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let mut config = StoreConfig::with_local_root(dir.path());
    config.io_mode = IoMode::Pwrite;
    let store = Store::open(config).unwrap();
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    put(&session, "f", &data);
    assert_eq!(read(&session, "f"), data);
    published(session.sync(None).unwrap());
    assert_eq!(read(&session, "f"), data);
    let reader = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert_eq!(read(&reader, "f"), data);
}

#[test]
fn corrupt_cached_segment_fails_read() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "f", &vec![1u8; 50_000]);
    let version = published(session.sync(None).unwrap());
    drop(session);
    drop(store);
    let segment = version.segments[0];
    let path = dir.path().join("cache/segments").join(format!("{segment}.seg"));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();

    let store = store_at(dir.path());
    let reader = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    let ino = reader.resolve_path("f").unwrap().ino;
    match reader.read(ino, 0, 50_000) {
        Err(EngineError::CorruptSegment { segment: found, .. }) => assert_eq!(found, segment),
        other => panic!("expected a corruption error, got {other:?}"),
    }
}

#[test]
fn corrupt_checkpoint_object_is_reported() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "f", b"data");
    let version = published(session.sync(None).unwrap());
    let key = format!("volumes/v/checkpoints/{}", version.id);
    let mut bytes = store.objects().get(&key).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    store.objects().put(&key, &bytes).unwrap();
    let err = store.open_session(&volume, main_lineage(), Access::ReadOnly).err().expect("open must fail");
    match err {
        EngineError::CorruptObject { key: found, detail } => {
            assert_eq!(found, key);
            assert!(detail.contains("CRC"), "{detail}");
        }
        other => panic!("expected a corrupt object error, got {other}"),
    }
}

/// Object store wrapper that counts reads and writes.
struct Counting {
    inner: Arc<dyn ObjectStore>,
    gets: AtomicUsize,
    puts: AtomicUsize,
    put_bytes: AtomicUsize,
}

impl ObjectStore for Counting {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.put_bytes.fetch_add(data.len(), Ordering::SeqCst);
        self.inner.put(key, data)
    }
    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.put_bytes.fetch_add(std::fs::metadata(path).unwrap().len() as usize, Ordering::SeqCst);
        self.inner.put_file(key, path)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.put_bytes.fetch_add(data.len(), Ordering::SeqCst);
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_range(key, offset, len)
    }
    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_to_file(key, path)
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        self.inner.list(prefix, start_after, limit)
    }
    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.inner.delete(key)
    }
}

fn counting_store(root: &Path) -> (Arc<Store>, Arc<Counting>) {
    let config = StoreConfig::with_local_root(root);
    let inner = object_store::open(&config.object_store_url).unwrap();
    let counting = Arc::new(Counting { inner, gets: AtomicUsize::new(0), puts: AtomicUsize::new(0), put_bytes: AtomicUsize::new(0) });
    (Store::open_with(config, counting.clone()).unwrap(), counting)
}

#[test]
fn sync_cost_follows_the_change() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, counting) = counting_store(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    for d in 0..20 {
        for f in 0..200 {
            put(&session, &format!("d{d:02}/f{f:03}"), format!("{d}-{f}").as_bytes());
        }
    }
    published(session.sync(None).unwrap());
    let first_puts = counting.puts.swap(0, Ordering::SeqCst);
    counting.put_bytes.store(0, Ordering::SeqCst);

    put(&session, "d07/f100", b"changed");
    published(session.sync(None).unwrap());
    let puts = counting.puts.load(Ordering::SeqCst);
    let bytes = counting.put_bytes.load(Ordering::SeqCst);
    assert!(first_puts > 40, "first sync wrote only {first_puts} objects");
    // Segment, one inode page, one checkpoint root, one version record.
    assert!(puts <= 5, "one changed file wrote {puts} objects");
    assert!(bytes < 64 * 1024, "one changed file wrote {bytes} bytes");
}

#[test]
fn opening_a_session_reads_only_the_root() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, counting) = counting_store(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    for d in 0..10 {
        for f in 0..300 {
            put(&session, &format!("d{d}/f{f}"), b"x");
        }
    }
    published(session.sync(None).unwrap());
    drop(session);
    let before = counting.gets.load(Ordering::SeqCst);
    let reader = store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    // The volume record and the checkpoint root; version records are cached in the process.
    assert_eq!(counting.gets.load(Ordering::SeqCst) - before, 2);
    let before = counting.gets.load(Ordering::SeqCst);
    reader.resolve_path("d3/f7").unwrap();
    let loads = counting.gets.load(Ordering::SeqCst) - before;
    assert!(loads <= 8, "one lookup loaded {loads} objects");
}

#[test]
fn abandoned_session_is_discarded_on_open() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "f", &vec![3u8; 20_000]);
    session.fsync().unwrap();
    // Copy the live session directory as a crashed process would leave it: no lock holder, torn tail.
    let live = std::fs::read_dir(dir.path().join("sessions")).unwrap().next().unwrap().unwrap().path();
    let crashed = dir.path().join("sessions/crashed");
    std::fs::create_dir(&crashed).unwrap();
    for entry in std::fs::read_dir(&live).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), crashed.join(entry.file_name())).unwrap();
    }
    let segment = std::fs::read_dir(&crashed)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let len = std::fs::metadata(&segment).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&segment).unwrap().set_len(len - 5000).unwrap();

    let _reopened = store_at(dir.path());
    assert!(!crashed.exists(), "abandoned session was not discarded");
    assert!(live.exists(), "live session was discarded");
}

#[test]
fn unlinked_file_stays_readable_while_open() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = store_at(dir.path());
    let volume = new_volume(&store, "v");
    let session = writable(&store, &volume);
    put(&session, "f", b"still here");
    let ino = session.resolve_path("f").unwrap().ino;
    session.open(ino).unwrap();
    session.unlink(Ino::ROOT, OsStr::new("f")).unwrap();
    assert_eq!(session.read(ino, 0, 100).unwrap(), b"still here");
    assert_eq!(session.getattr(ino).unwrap().nlink, 0);
    let version = published(session.sync(None).unwrap());
    assert_eq!(version.files, 0);
    assert_eq!(session.read(ino, 0, 100).unwrap(), b"still here");
    session.release(ino);
}
