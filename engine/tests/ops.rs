//! Operator tools on the engine: fsck finds and repairs damage, gc keeps
//! what retention and leases protect, stops on unreadable checkpoints, and
//! never deletes what a concurrent sync publishes.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chalk_engine::fsck::FsckOptions;
use chalk_engine::gc::GcOptions;
use chalk_engine::object_store::{self, list_all, ListPage, ObjectStore};
use chalk_engine::{
    Access, EngineError, LineageName, OnConflict, Owner, Session, SessionBase, Store, StoreConfig, SyncOptions, SyncOutcome,
    VersionInfo, VolumeName,
};

fn setup(root: &Path) -> (Arc<Store>, VolumeName) {
    let store = Store::open(StoreConfig::with_local_root(root)).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    (store, volume)
}

fn writable(store: &Arc<Store>, volume: &VolumeName) -> Session {
    store.open_session(volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap()
}

fn put(session: &Session, path: &str, data: &[u8]) {
    session.write_file_from(path, &mut &data[..], 0o644, Owner::current()).unwrap();
}

fn read(session: &Session, path: &str) -> chalk_engine::Result<Vec<u8>> {
    let mut out = Vec::new();
    session.read_file_to(path, &mut out)?;
    Ok(out)
}

fn published(outcome: SyncOutcome) -> VersionInfo {
    match outcome {
        SyncOutcome::Published(info) => info,
        other => panic!("expected a published version, got {other:?}"),
    }
}

fn no_grace() -> GcOptions {
    GcOptions { grace: Duration::ZERO, ..GcOptions::default() }
}

fn objects(store: &Store) -> BTreeMap<String, u64> {
    list_all(store.objects().as_ref(), "volumes/").unwrap().into_iter().map(|o| (o.key, o.size)).collect()
}

fn fsck_volume(store: &Store, volume: &VolumeName, deep: bool) -> chalk_engine::fsck::FsckReport {
    store.fsck(&FsckOptions { volume: Some(volume.clone()), deep, ..FsckOptions::default() }).unwrap()
}

#[test]
fn gc_keeps_heads_tags_and_leased_versions() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let mut versions = Vec::new();
    for i in 0..5u8 {
        let session = writable(&store, &volume);
        put(&session, "f", &vec![i; 10_000 + i as usize]);
        versions.push(published(session.sync(None).unwrap()));
    }
    store.tag(&volume, versions[1].id, "keep").unwrap();
    let pinned = store.open_session(&volume, SessionBase::Version(versions[2].id), Access::ReadOnly).unwrap();
    pinned.hold_lease().unwrap();

    let report = store.gc(&volume, &GcOptions { keep_last: Some(1), ..no_grace() }).unwrap();
    let kept: Vec<_> = report.kept.keys().copied().collect();
    assert!(kept.contains(&versions[4].id), "head dropped");
    assert!(kept.contains(&versions[1].id), "tagged version dropped");
    assert!(kept.contains(&versions[2].id), "leased version dropped");
    assert!(!kept.contains(&versions[0].id), "version 1 kept without a reason");
    assert!(!kept.contains(&versions[3].id), "version 4 kept without a reason");
    assert!(report.deleted_bytes > 0);

    assert_eq!(read(&pinned, "f").unwrap(), vec![2u8; 10_002]);
    for (i, version) in [(1u8, versions[1].id), (4, versions[4].id)] {
        let reader = store.open_session(&volume, SessionBase::Version(version), Access::ReadOnly).unwrap();
        assert_eq!(read(&reader, "f").unwrap(), vec![i; 10_000 + i as usize]);
    }
    assert!(store.open_session(&volume, SessionBase::Version(versions[3].id), Access::ReadOnly).is_err());
    let check = fsck_volume(&store, &volume, true);
    assert!(check.is_whole(), "{:#?}", check.problems);
}

#[test]
fn gc_dry_run_deletes_nothing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    for i in 0..3u8 {
        let session = writable(&store, &volume);
        put(&session, "f", &[i; 100]);
        session.sync(None).unwrap();
    }
    let before = objects(&store);
    let report = store.gc(&volume, &GcOptions { keep_last: Some(1), dry_run: true, ..no_grace() }).unwrap();
    assert!(!report.deleted.is_empty(), "dry run found nothing to delete");
    assert_eq!(objects(&store), before);
}

#[test]
fn gc_stops_on_unreadable_checkpoint() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let mut last = None;
    for i in 0..3u8 {
        let session = writable(&store, &volume);
        put(&session, &format!("f{i}"), &[i; 100]);
        last = Some(published(session.sync(None).unwrap()));
    }
    let head = last.unwrap();
    let root = dir.path().join(format!("objects/volumes/v/checkpoints/{}", head.id));
    let mut bytes = std::fs::read(&root).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&root, &bytes).unwrap();

    let before = objects(&store);
    let err = store.gc(&volume, &GcOptions { keep_last: Some(1), ..no_grace() }).unwrap_err();
    assert!(matches!(err, EngineError::CorruptObject { .. }), "{err}");
    assert!(err.to_string().contains("stopped before deleting anything"), "{err}");
    assert_eq!(objects(&store), before, "gc deleted objects after a read error");
}

#[test]
fn deleted_volume_is_freed_by_gc() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let session = writable(&store, &volume);
    put(&session, "big", &vec![7u8; 300_000]);
    session.sync(None).unwrap();
    drop(session);
    store.delete_volume(&volume).unwrap();
    assert!(objects(&store).keys().any(|k| k.contains("/segments/")), "delete freed segments before gc");
    assert!(!store.volume_exists(&volume).unwrap());

    // Within the grace period nothing goes.
    let report = store.gc(&volume, &GcOptions::default()).unwrap();
    assert!(report.deleted.is_empty());
    let report = store.gc(&volume, &no_grace()).unwrap();
    assert!(report.deleted_bytes >= 300_000, "freed only {} bytes", report.deleted_bytes);
    assert_eq!(objects(&store), BTreeMap::new());
}

/// Flips `mask` in the byte at `at` of the copy at `path` alone, by writing
/// the damaged bytes to a new file that replaces it. The store in these tests
/// is on the same file system as the cache, so a cached segment and its
/// object are hard links to one file, which an in-place write would damage
/// in both places.
fn flip_copy(path: &Path, at: usize, mask: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= mask;
    let damaged = path.with_extension("damaged");
    std::fs::write(&damaged, &bytes).unwrap();
    std::fs::rename(&damaged, path).unwrap();
}

#[test]
fn fsck_finds_remote_damage_and_missing_segments() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let session = writable(&store, &volume);
    put(&session, "a/one", &vec![1u8; 50_000]);
    let first = published(session.sync(None).unwrap());
    put(&session, "b/two", &vec![2u8; 50_000]);
    let second = published(session.sync(None).unwrap());
    drop(session);
    assert!(fsck_volume(&store, &volume, true).is_whole());

    // A flipped byte in the object store's copy of the first segment.
    let segment = first.segments[0];
    let object = dir.path().join(format!("objects/volumes/v/segments/{segment}.seg"));
    flip_copy(&object, 1000, 1);
    let shallow = fsck_volume(&store, &volume, false);
    assert!(shallow.is_whole(), "without --deep the store's copy is not read: {:#?}", shallow.problems);
    let deep = fsck_volume(&store, &volume, true);
    let problem = deep.problems.iter().find(|p| p.kind == "corrupt-record").expect("damage not found");
    assert_eq!(problem.segment.as_deref(), Some(segment.to_string().as_str()));
    assert_eq!(problem.copy, Some(chalk_engine::fsck::Copy::Remote));
    assert!(problem.offset.unwrap() <= 1000, "offset {:?}", problem.offset);
    assert_eq!(problem.path.as_deref(), Some("a/one"));
    assert!(problem.affected_versions.contains(&first.id.to_string()));
    assert!(problem.affected_versions.contains(&second.id.to_string()));

    // The same segment missing from the store breaks both versions.
    std::fs::remove_file(&object).unwrap();
    let report = fsck_volume(&store, &volume, false);
    let missing = report.problems.iter().find(|p| p.kind == "missing-segment").expect("missing segment not found");
    assert_eq!(missing.affected_versions, {
        let mut both = vec![first.id.to_string(), second.id.to_string()];
        both.sort();
        both
    });
    assert!(!report.is_whole());
}

/// Object store that fails every request for a key or prefix containing
/// `cut`, once one is set, as a store that becomes unreachable mid-run.
struct Outage {
    inner: Arc<dyn ObjectStore>,
    cut: Mutex<Option<&'static str>>,
}

impl Outage {
    fn set(&self, cut: Option<&'static str>) {
        *self.cut.lock().unwrap() = cut;
    }

    fn check(&self, key: &str) -> chalk_engine::Result<()> {
        match *self.cut.lock().unwrap() {
            Some(cut) if key.contains(cut) => Err(EngineError::ObjectStore {
                url: self.inner.url(),
                detail: format!("request for {key} failed after 3 attempt(s): connection refused"),
            }),
            _ => Ok(()),
        }
    }
}

impl ObjectStore for Outage {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.check(key)?;
        self.inner.put(key, data)
    }
    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.check(key)?;
        self.inner.put_file(key, path)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        self.check(key)?;
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        self.check(key)?;
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.check(key)?;
        self.inner.get_range(key, offset, len)
    }
    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.check(key)?;
        self.inner.get_to_file(key, path)
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        self.check(prefix)?;
        self.inner.list(prefix, start_after, limit)
    }
    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.check(key)?;
        self.inner.delete(key)
    }
}

#[test]
fn fsck_stops_when_store_becomes_unreachable() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = StoreConfig::with_local_root(dir.path());
    let outage = Arc::new(Outage { inner: object_store::open(&config.object_store_url).unwrap(), cut: Mutex::new(None) });
    let store = Store::open_with(config, outage.clone()).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = writable(&store, &volume);
    put(&session, "a/one", &vec![1u8; 50_000]);
    let version = published(session.sync(None).unwrap());
    drop(session);
    store.tag(&volume, version.id, "baseline").unwrap();
    let deep = FsckOptions { volume: Some(volume.clone()), deep: true, ..FsckOptions::default() };
    assert!(store.fsck(&deep).unwrap().is_whole());

    // Reads of each kind of object fail after the listing, and the first
    // case fails the listing itself. Every object is intact, so fsck must
    // stop with the store's error instead of reporting damage.
    for cut in ["volumes/v/", "/lineages/", "/tags/", "/checkpoints/", "/pages/", "/dirs/", "/segments/"] {
        outage.set(Some(cut));
        let err = match store.fsck(&deep) {
            Ok(report) => panic!("fsck with requests for {cut} failing returned a report: {:#?}", report.problems),
            Err(err) => err,
        };
        assert!(matches!(err, EngineError::ObjectStore { .. }), "{cut}: {err}");
        assert!(err.to_string().contains(cut), "{cut}: the error does not name the failed request: {err}");
        assert!(err.to_string().contains("fsck of volume v stopped"), "{cut}: {err}");
        assert!(err.to_string().contains("run it again once the store is reachable"), "{cut}: {err}");
    }

    // gc reads pages too, and reports the store, not the page.
    outage.set(Some("/pages/"));
    let before = objects(&store);
    let err = store.gc(&volume, &no_grace()).unwrap_err();
    assert!(matches!(err, EngineError::ObjectStore { .. }), "{err}");
    assert!(err.to_string().contains("stopped before deleting anything"), "{err}");

    outage.set(None);
    assert_eq!(objects(&store), before, "gc deleted objects after a failed read");
    assert!(store.fsck(&deep).unwrap().is_whole());
}

/// Publishes one file `f`, 80,000 bytes of value 9, in volume `v` of a
/// store on `root`. Returns the version and the local copy of its segment.
fn publish_one_file(root: &Path) -> (VolumeName, VersionInfo, PathBuf) {
    let (store, volume) = setup(root);
    let session = writable(&store, &volume);
    put(&session, "f", &vec![9u8; 80_000]);
    let version = published(session.sync(None).unwrap());
    let local = root.join(format!("cache/segments/{}.seg", version.segments[0]));
    (volume, version, local)
}

#[test]
fn fsck_repairs_local_copy_from_store() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (volume, version, local) = publish_one_file(dir.path());
    flip_copy(&local, 2000, 0x80);

    // A new store handle reads the damaged file, as a new process would.
    let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let reader = store.open_session(&volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
    assert!(matches!(read(&reader, "f"), Err(EngineError::CorruptSegment { .. })));
    drop(reader);
    let report = store.fsck(&FsckOptions { volume: Some(volume.clone()), repair: true, ..FsckOptions::default() }).unwrap();
    assert!(report.problems.iter().any(|p| p.kind == "corrupt-record" && p.repaired), "{:#?}", report.problems);
    assert!(report.is_whole());

    let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let reader = store.open_session(&volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
    assert_eq!(read(&reader, "f").unwrap(), vec![9u8; 80_000]);
}

#[test]
fn fsck_repair_names_hard_linked_local_copy() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (volume, _, local) = publish_one_file(dir.path());
    // In a store kept in a local directory on the same file system, the
    // local copy and the store's object are one file: damage in place hits both.
    assert!(std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&local).unwrap()) > 1, "the local copy is not a hard link");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&local).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 2000).unwrap();
    file.write_all_at(&[byte[0] ^ 0x80], 2000).unwrap();
    drop(file);

    let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let report = store.fsck(&repair(&volume)).unwrap();
    let damaged: Vec<_> = report.problems.iter().filter(|p| p.kind == "corrupt-record").collect();
    assert_eq!(damaged.len(), 1, "{:#?}", report.problems);
    assert!(!damaged[0].repaired, "{:#?}", damaged[0]);
    assert!(damaged[0].detail.contains("same file as the store's object"), "{}", damaged[0].detail);
    assert!(damaged[0].detail.contains("restore that file from a backup of the store"), "{}", damaged[0].detail);
    assert!(!damaged[0].detail.contains("damaged too"), "fsck tried to fetch the same file again: {}", damaged[0].detail);
}

/// Opens a store on `root` whose requests go through an [`Outage`], and
/// publishes one file `f` in its volume `v`.
fn outage_setup(root: &Path) -> (Arc<Store>, Arc<Outage>, VolumeName, VersionInfo) {
    let config = StoreConfig::with_local_root(root);
    let outage = Arc::new(Outage { inner: object_store::open(&config.object_store_url).unwrap(), cut: Mutex::new(None) });
    let store = Store::open_with(config, outage.clone()).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = writable(&store, &volume);
    put(&session, "f", &vec![9u8; 80_000]);
    let version = published(session.sync(None).unwrap());
    (store, outage, volume, version)
}

fn repair(volume: &VolumeName) -> FsckOptions {
    FsckOptions { volume: Some(volume.clone()), repair: true, ..FsckOptions::default() }
}

/// Runs `fsck --repair` on `volume`, which must fail with an object store
/// error, and returns that error's message.
fn repair_error(store: &Store, volume: &VolumeName) -> String {
    let err = match store.fsck(&repair(volume)) {
        Ok(report) => panic!("fsck --repair with the store unreachable returned a report: {:#?}", report.problems),
        Err(err) => err,
    };
    assert!(matches!(err, EngineError::ObjectStore { .. }), "{err}");
    err.to_string()
}

#[test]
fn fsck_repair_stops_when_segment_refetch_fails() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, outage, volume, version) = outage_setup(dir.path());
    drop(store);
    let local = dir.path().join(format!("cache/segments/{}.seg", version.segments[0]));
    flip_copy(&local, 2000, 0x80);
    let damaged = std::fs::read(&local).unwrap();

    // Only the segment's object is unreachable, so the checks before the repair succeed.
    let store = Store::open_with(StoreConfig::with_local_root(dir.path()), outage.clone()).unwrap();
    outage.set(Some("/segments/"));
    let message = repair_error(&store, &volume);
    assert!(message.contains("/segments/"), "the error does not name the failed request: {message}");
    assert!(message.contains("fsck of volume v stopped"), "{message}");
    assert!(message.contains(&local.display().to_string()), "the error does not name the damaged copy: {message}");
    assert!(message.contains("run it again once the store is reachable"), "{message}");
    assert_eq!(std::fs::read(&local).unwrap(), damaged, "the failed repair changed the local copy");

    outage.set(None);
    let report = store.fsck(&repair(&volume)).unwrap();
    assert!(report.problems.iter().any(|p| p.kind == "corrupt-record" && p.repaired), "{:#?}", report.problems);
    assert_ne!(std::fs::read(&local).unwrap(), damaged);
}

#[test]
fn fsck_repair_stops_when_block_refetch_fails() {
    let writer_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (writer, outage, volume, version) = outage_setup(writer_dir.path());
    drop(writer);

    // A reader on its own local root caches the file's blocks, not the whole segment.
    let reader_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let config = StoreConfig { local_root: reader_dir.path().to_owned(), ..StoreConfig::with_local_root(writer_dir.path()) };
    let store = Store::open_with(config, outage.clone()).unwrap();
    let session = store.open_session(&volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
    assert_eq!(read(&session, "f").unwrap(), vec![9u8; 80_000]);
    drop(session);
    store.flush_cache();
    let blocks = reader_dir.path().join(format!("cache/blocks/{}.blk", version.segments[0]));
    flip_copy(&blocks, chalk_engine::cache::SLOT_HEADER_BYTES as usize + 1000, 0x80);
    let damaged = std::fs::read(&blocks).unwrap();

    outage.set(Some("/segments/"));
    let message = repair_error(&store, &volume);
    assert!(message.contains("fsck of volume v stopped"), "{message}");
    assert!(message.contains("cached blocks"), "the error does not name the damaged blocks: {message}");
    assert!(message.contains("run it again once the store is reachable"), "{message}");
    assert_eq!(std::fs::read(&blocks).unwrap(), damaged, "the failed repair changed the cached blocks");

    outage.set(None);
    let report = store.fsck(&repair(&volume)).unwrap();
    assert!(report.problems.iter().any(|p| p.kind == "corrupt-cached-block" && p.repaired), "{:#?}", report.problems);
    assert!(report.is_whole(), "{:#?}", report.problems);
}

#[test]
fn gc_racing_syncs_loses_nothing() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let done = Arc::new(AtomicBool::new(false));
    let collector = {
        let (store, volume, done) = (store.clone(), volume.clone(), done.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            let mut deleted = 0;
            while !done.load(Ordering::SeqCst) {
                let report = store.gc(&volume, &GcOptions { keep_last: Some(1), ..no_grace() }).unwrap();
                deleted += report.deleted.len();
                runs += 1;
            }
            (runs, deleted)
        })
    };

    // One long-lived session that syncs again and again, and short ones beside it.
    let long = writable(&store, &volume);
    let rounds = 40;
    for round in 0..rounds {
        let data = format!("round {round} ").repeat(500 + round);
        put(&long, "long/file", data.as_bytes());
        put(&long, &format!("long/f{round}"), data.as_bytes());
        let options = SyncOptions { on_conflict: OnConflict::Ours, ..SyncOptions::default() };
        let mut synced = None;
        for _ in 0..20 {
            match long.sync_with(&options) {
                Ok(outcome) => {
                    synced = Some(outcome);
                    break;
                }
                Err(EngineError::HeadMoved { .. }) => continue,
                Err(err) => panic!("sync of round {round} failed: {err}"),
            }
        }
        published(synced.expect("sync never won the head"));
        assert_eq!(read(&long, "long/file").unwrap(), data.as_bytes());

        let short = writable(&store, &volume);
        put(&short, &format!("short/f{round}"), data.as_bytes());
        let version = published(short.sync_with(&options).unwrap());
        drop(short);
        let reader = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap();
        assert_eq!(read(&reader, &format!("short/f{round}")).unwrap(), data.as_bytes(), "version {} lost data", version.id);
        assert_eq!(read(&reader, "long/file").unwrap(), data.as_bytes());
    }
    done.store(true, Ordering::SeqCst);
    let (runs, deleted) = collector.join().unwrap();
    assert!(runs > 5, "gc ran only {runs} times");
    assert!(deleted > 0, "gc never deleted anything, so it never raced");

    let reader = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap();
    for round in 0..rounds {
        let data = format!("round {round} ").repeat(500 + round);
        assert_eq!(read(&reader, &format!("long/f{round}")).unwrap(), data.as_bytes());
        assert_eq!(read(&reader, &format!("short/f{round}")).unwrap(), data.as_bytes());
    }
    drop(reader);
    drop(long);
    let check = fsck_volume(&store, &volume, true);
    assert!(check.is_whole(), "{:#?}", check.problems);
}

#[test]
fn space_splits_exclusive_and_shared_bytes() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let session = writable(&store, &volume);
    put(&session, "shared", &vec![1u8; 100_000]);
    let base = published(session.sync(None).unwrap());
    drop(session);
    let (fork, _) = store.fork(&volume, base.id, Some(LineageName::new("exp").unwrap())).unwrap();
    let session = store.open_session(&volume, SessionBase::Lineage(fork.clone()), Access::Writable).unwrap();
    put(&session, "mine", &vec![2u8; 50_000]);
    let forked = published(session.sync(None).unwrap());
    drop(session);

    let report = store.space(&volume).unwrap();
    let lineage = |name: &str| report.lineages.iter().find(|(l, _)| l.as_str() == name).unwrap().1.clone();
    let version = |id| report.versions.iter().find(|(v, _)| v.id == id).unwrap().1.clone();
    // Record bytes: 40 bytes of header and data prefix per record.
    assert_eq!(lineage("exp").exclusive_bytes, 50_040);
    assert_eq!(lineage("exp").shared_bytes, 100_040);
    assert_eq!(lineage("main").exclusive_bytes, 0);
    assert_eq!(lineage("main").shared_bytes, 100_040);
    assert_eq!(version(forked.id).bytes, 150_080);
    assert_eq!(version(forked.id).exclusive_bytes, 50_040);
    assert_eq!(version(base.id).exclusive_bytes, 0);
    assert_eq!(report.total_bytes, 150_080);
}

#[test]
fn compaction_copies_live_bytes_and_frees_old_segments() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let session = writable(&store, &volume);
    let a: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let b: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    put(&session, "a", &a);
    put(&session, "dir/b", &b);
    let first = published(session.sync(None).unwrap());
    put(&session, "a", &vec![1u8; 1000]);
    let second = published(session.sync(None).unwrap());
    drop(session);
    let old_segment = first.segments[0];

    // Nothing is below a low threshold while version 2 keeps "a" alive.
    let none = store.compact(&volume, 0.3).unwrap();
    assert!(none.iter().all(|c| c.version.is_none()), "{none:?}");

    store.gc(&volume, &GcOptions { keep_last: Some(1), ..no_grace() }).unwrap();
    let compactions = store.compact(&volume, 0.6).unwrap();
    let main = compactions.iter().find(|c| c.lineage.as_str() == "main").unwrap();
    assert_eq!(main.segments, vec![old_segment]);
    assert_eq!(main.copied_bytes, 200_000);
    let compacted = main.version.clone().expect("no compaction version");
    assert!(compacted.message.as_deref().unwrap().starts_with("compaction of"));
    assert_eq!(compacted.parent, Some(second.id));

    // The retained version and the compaction read the same bytes.
    for version in [second.id, compacted.id] {
        let reader = store.open_session(&volume, SessionBase::Version(version), Access::ReadOnly).unwrap();
        assert_eq!(read(&reader, "a").unwrap(), vec![1u8; 1000]);
        assert_eq!(read(&reader, "dir/b").unwrap(), b);
    }
    let before = store.open_session(&volume, SessionBase::Version(second.id), Access::ReadOnly).unwrap();
    let after = store.open_session(&volume, SessionBase::Version(compacted.id), Access::ReadOnly).unwrap();
    assert_eq!(before.resolve_path("dir/b").unwrap().mtime, after.resolve_path("dir/b").unwrap().mtime);
    drop((before, after));

    let key = format!("volumes/v/segments/{old_segment}.seg");
    assert!(objects(&store).contains_key(&key));
    store.gc(&volume, &GcOptions { keep_last: Some(1), ..no_grace() }).unwrap();
    assert!(!objects(&store).contains_key(&key), "the old segment outlived the versions that used it");
    let check = fsck_volume(&store, &volume, true);
    assert!(check.is_whole(), "{:#?}", check.problems);
}
