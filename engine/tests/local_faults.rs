//! Local write faults below the engine: the segment log of a session is
//! written through `IoMode::Faulty`, whose seeded injector fails, delays,
//! tears, reorders or rejects with `ENOSPC` 10% of the writes and fsyncs.
//! The object store is a plain local directory, so every fault here is a
//! fault of the local disk.
//!
//! Checks, for every seed:
//! - a sync either publishes a version that a store with a fresh local
//!   root (which reads only the object store) reads back exactly, or fails
//!   and leaves the lineage head where it was;
//! - after the faults stop, the same session publishes everything that its
//!   successful calls wrote;
//! - a read returns the bytes of a successful write, or an error, never
//!   other bytes.
//!
//! A call that failed may have taken effect or not, so the model keeps both
//! contents of a file until a read or a published version shows which.
//! `CHALK_LOCAL_FAULT_SEEDS` (default 6) sets the number of seeds and
//! `CHALK_LOCAL_FAULT_SEED` (default 1) the first; a failure prints its seed.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;

use chalk_engine::format::record::RecordType;
use chalk_engine::io::{LocalFault, LocalFaultCounts, LocalFaults};
use chalk_engine::{
    Access, EngineError, FileKind, Ino, IoMode, LineageName, Owner, Session, SessionBase, Store, StoreConfig, SyncOutcome,
    VersionId, VolumeName,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FAULT_RATE: f64 = 0.10;
const DEFAULT_SEEDS: u64 = 6;
const STEPS_PER_SEED: usize = 250;
const FILES: usize = 6;
/// Largest single write; several write calls fill a 1 MiB chunk, so whole
/// blocks, partial blocks and rolls all meet faults.
const WRITE_MAX_BYTES: usize = 600_000;

/// Possible contents of each file: `None` is "absent". One entry when the
/// file is known; two after a call on it failed and nothing showed which.
type Model = BTreeMap<String, Vec<Option<Vec<u8>>>>;

fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/var/tmp").unwrap()
}

/// Prints the seed when a check panics, so the run can be repeated.
struct SeedGuard(u64);

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("local fault test failed with seed {}; rerun with CHALK_LOCAL_FAULT_SEED={} CHALK_LOCAL_FAULT_SEEDS=1", self.0, self.0);
        }
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text.parse().unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Opens a store whose segment log is written through `faults`, on the object store at `objects`.
fn faulty_store(local_root: &std::path::Path, objects: &std::path::Path, faults: &LocalFaults) -> Arc<Store> {
    let config = StoreConfig {
        object_store_url: format!("file://{}", objects.display()),
        io_mode: IoMode::Faulty(faults.clone()),
        ..StoreConfig::with_local_root(local_root)
    };
    Store::open(config).unwrap()
}

/// Opens a store with a fresh local root that reads only what reached `objects`.
/// Bind the result as `(_home, store)`: the store, dropped first, flushes its
/// disk cache into the root before the root is deleted.
fn clean_store(objects: &std::path::Path) -> (tempfile::TempDir, Arc<Store>) {
    let home = temp_dir("chalk-local-faults-clean-");
    let config = StoreConfig { object_store_url: format!("file://{}", objects.display()), ..StoreConfig::with_local_root(home.path()) };
    let store = Store::open(config).unwrap();
    (home, store)
}

fn main_lineage() -> SessionBase {
    SessionBase::Lineage(LineageName::main())
}

fn read_tree(store: &Arc<Store>, volume: &VolumeName, version: VersionId) -> BTreeMap<String, Vec<u8>> {
    let session = store.open_session(volume, SessionBase::Version(version), Access::ReadOnly).unwrap();
    let mut tree = BTreeMap::new();
    for entry in session.walk("", true).unwrap() {
        assert_eq!(entry.attr.kind, FileKind::File, "the workload creates only files, found {entry:?}");
        let mut data = Vec::new();
        session
            .read_file_to(&entry.path, &mut data)
            .unwrap_or_else(|err| panic!("published version {version} cannot be read at {}: {err}", entry.path));
        tree.insert(entry.path, data);
    }
    tree
}

/// Checks that `tree`, a published version or a session's view, is one of
/// the trees `model` allows, and narrows the model to it.
fn settle(model: &mut Model, tree: &BTreeMap<String, Vec<u8>>, source: &str) {
    for name in tree.keys() {
        assert!(model.contains_key(name), "{source} has a file {name} that no call created");
    }
    for (name, candidates) in model.iter_mut() {
        let actual = tree.get(name).cloned();
        assert!(
            candidates.contains(&actual),
            "{source} has {name} as {}, which no successful or failed call wrote",
            describe(&actual)
        );
        *candidates = vec![actual];
    }
}

fn describe(content: &Option<Vec<u8>>) -> String {
    match content {
        None => "absent".to_owned(),
        Some(bytes) => format!("{} bytes", bytes.len()),
    }
}

fn file_name(index: usize) -> String {
    format!("f{index}")
}

/// What one seed did.
#[derive(Debug, Default)]
struct SeedReport {
    faults: LocalFaultCounts,
    published: u64,
    failed_syncs: u64,
    failed_calls: u64,
    exact_reads: u64,
    failed_reads: u64,
}

/// Writes `data` at `offset` of file `name`, creating it when absent, and
/// updates the model. Returns whether the calls succeeded.
fn write_at(session: &Session, model: &mut Model, name: &str, offset: usize, data: &[u8]) -> bool {
    let candidates = model.get(name).cloned().unwrap_or_else(|| vec![None]);
    let ino = match session.lookup(Ino::ROOT, OsStr::new(name)) {
        Ok(attr) => attr.ino,
        Err(EngineError::NotFound { .. }) if !candidates.contains(&None) => panic!("{name} is missing after a successful create"),
        Err(EngineError::NotFound { .. }) => match session.create(Ino::ROOT, OsStr::new(name), 0o644, Owner::current()) {
            Ok(attr) => attr.ino,
            Err(_) => {
                // The create may have taken effect in the session or not.
                let mut both = candidates.clone();
                both.push(Some(Vec::new()));
                both.dedup();
                model.insert(name.to_owned(), both);
                return false;
            }
        },
        Err(err) => panic!("lookup of {name} failed: {err}"),
    };
    let before: Vec<Option<Vec<u8>>> = candidates.into_iter().map(|c| Some(c.unwrap_or_default())).collect();
    let after: Vec<Option<Vec<u8>>> = before
        .iter()
        .map(|content| {
            let mut bytes = content.clone().unwrap_or_default();
            if bytes.len() < offset + data.len() {
                bytes.resize(offset + data.len(), 0);
            }
            bytes[offset..offset + data.len()].copy_from_slice(data);
            Some(bytes)
        })
        .collect();
    match session.write(ino, offset as u64, data) {
        Ok(written) => {
            assert_eq!(written as usize, data.len(), "short write of {name}");
            model.insert(name.to_owned(), after);
            true
        }
        Err(_) => {
            let mut both = before;
            both.extend(after);
            both.dedup();
            model.insert(name.to_owned(), both);
            false
        }
    }
}

/// Reads file `name` through the session; the bytes must be one of the
/// model's contents. Returns whether the read succeeded.
fn check_read(session: &Session, model: &mut Model, name: &str) -> bool {
    let mut bytes = Vec::new();
    match session.read_file_to(name, &mut bytes) {
        Ok(_) => {
            let candidates = model.get_mut(name).expect("only files in the model are read");
            let actual = Some(bytes);
            assert!(candidates.contains(&actual), "a read of {name} returned {}, which no call wrote", describe(&actual));
            *candidates = vec![actual];
            true
        }
        Err(EngineError::NotFound { .. }) if model[name].contains(&None) => {
            model.insert(name.to_owned(), vec![None]);
            true
        }
        Err(_) => false,
    }
}

fn run_seed(seed: u64, kinds: &[LocalFault]) -> SeedReport {
    let _guard = SeedGuard(seed);
    let home = temp_dir("chalk-local-faults-home-");
    let objects = temp_dir("chalk-local-faults-objects-");
    let faults = LocalFaults::new(seed, FAULT_RATE, kinds);
    let store = faulty_store(home.path(), objects.path(), &faults);
    let (_clean_home, clean) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let mut head = clean.head(&volume, &LineageName::main()).unwrap().id;

    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = Model::new();
    let mut report = SeedReport::default();
    for _ in 0..STEPS_PER_SEED {
        let name = file_name(rng.gen_range(0..FILES));
        match rng.gen_range(0..12) {
            0..=7 => {
                let size = model.get(&name).and_then(|c| c.iter().flatten().map(Vec::len).min()).unwrap_or(0);
                let offset = rng.gen_range(0..=size);
                let len = rng.gen_range(1..=WRITE_MAX_BYTES);
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if !write_at(&session, &mut model, &name, offset, &data) {
                    report.failed_calls += 1;
                }
            }
            8..=9 if model.contains_key(&name) => {
                if check_read(&session, &mut model, &name) {
                    report.exact_reads += 1;
                } else {
                    report.failed_reads += 1;
                }
            }
            _ => match session.sync(None) {
                Ok(SyncOutcome::Published(info)) => {
                    assert_eq!(clean.head(&volume, &LineageName::main()).unwrap().id, info.id, "sync returned a version that is not the head");
                    settle(&mut model, &read_tree(&clean, &volume, info.id), &format!("published version {}", info.id));
                    head = info.id;
                    report.published += 1;
                }
                Ok(SyncOutcome::NothingToPublish { .. }) => {}
                Err(err) => {
                    assert_eq!(clean.head(&volume, &LineageName::main()).unwrap().id, head, "a failed sync ({err}) moved the head");
                    report.failed_syncs += 1;
                }
            },
        }
    }

    // The faults stop. The same session publishes what it holds.
    faults.set_rate(0.0);
    match session.sync(None).unwrap_or_else(|err| panic!("sync after the faults stopped failed: {err}")) {
        SyncOutcome::Published(info) => {
            settle(&mut model, &read_tree(&clean, &volume, info.id), &format!("version {} published after the faults", info.id));
            report.published += 1;
        }
        SyncOutcome::NothingToPublish { base } => {
            settle(&mut model, &read_tree(&clean, &volume, base.id), "the last version");
        }
    }
    for index in 0..FILES {
        let name = file_name(index);
        if model.contains_key(&name) {
            assert!(check_read(&session, &mut model, &name), "a read of {name} failed after the faults stopped");
        }
    }
    report.faults = faults.counts();
    report
}

#[test]
fn syncs_publish_whole_under_local_faults() {
    let first = env_number("CHALK_LOCAL_FAULT_SEED", 1);
    let seeds = env_number("CHALK_LOCAL_FAULT_SEEDS", DEFAULT_SEEDS);
    let mut total = SeedReport::default();
    for seed in first..first + seeds {
        let report = run_seed(seed, &LocalFault::ALL);
        assert!(report.faults.total() > 0, "seed {seed} injected no fault: {}", report.faults);
        total.faults = add_counts(total.faults, report.faults);
        total.published += report.published;
        total.failed_syncs += report.failed_syncs;
        total.failed_calls += report.failed_calls;
        total.exact_reads += report.exact_reads;
        total.failed_reads += report.failed_reads;
    }
    println!(
        "local faults, {seeds} seeds from {first}: {}; {} versions published, {} syncs failed cleanly, \
         {} writes or creates failed, {} reads exact, {} reads failed, none wrong",
        total.faults, total.published, total.failed_syncs, total.failed_calls, total.exact_reads, total.failed_reads
    );
    assert!(total.faults.failed > 0, "no write or fsync failed: {}", total.faults);
    assert!(total.faults.torn > 0, "no write tore: {}", total.faults);
    assert!(total.faults.reordered > 0, "no write was reordered: {}", total.faults);
    assert!(total.faults.no_space > 0, "no call met ENOSPC: {}", total.faults);
}

fn add_counts(a: LocalFaultCounts, b: LocalFaultCounts) -> LocalFaultCounts {
    LocalFaultCounts {
        writes: a.writes + b.writes,
        fsyncs: a.fsyncs + b.fsyncs,
        failed: a.failed + b.failed,
        delayed: a.delayed + b.delayed,
        torn: a.torn + b.torn,
        reordered: a.reordered + b.reordered,
        no_space: a.no_space + b.no_space,
    }
}

#[test]
fn no_space_error_names_cause() {
    let home = temp_dir("chalk-local-faults-home-");
    let objects = temp_dir("chalk-local-faults-objects-");
    // Every write and fsync fails with ENOSPC until the rate drops.
    let faults = LocalFaults::new(11, 1.0, &[LocalFault::NoSpace]);
    faults.set_rate(0.0);
    let store = faulty_store(home.path(), objects.path(), &faults);
    let (_clean_home, clean) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let first = vec![7u8; 200_000];
    session.write_file_from("first", &mut &first[..], 0o644, Owner::current()).unwrap();
    let SyncOutcome::Published(before) = session.sync(None).unwrap() else { panic!("the first sync published nothing") };

    // The disk is full: a write that reaches it, or the sync, fails with NoSpace.
    faults.set_rate(1.0);
    let second = vec![9u8; 3 << 20];
    let written = session.write_file_from("second", &mut &second[..], 0o644, Owner::current());
    let err = match written {
        Err(err) => err,
        Ok(_) => session.sync(None).expect_err("a sync on a full disk succeeded"),
    };
    assert!(matches!(err, EngineError::NoSpace { .. }), "expected NoSpace, got {err}");
    let message = err.to_string();
    assert!(message.contains("no space left"), "{message}");
    let err = session.sync(None).expect_err("a sync on a full disk succeeded");
    assert!(matches!(err, EngineError::NoSpace { .. }), "expected NoSpace from sync, got {err}");
    assert_eq!(clean.head(&volume, &LineageName::main()).unwrap().id, before.id, "a failed sync moved the head");
    assert!(faults.counts().no_space > 0);

    // Space comes back: the session publishes, and nothing earlier changed.
    faults.set_rate(0.0);
    let SyncOutcome::Published(after) = session.sync(None).unwrap() else { panic!("the sync after space came back published nothing") };
    let tree = read_tree(&clean, &volume, after.id);
    assert_eq!(tree["first"], first);
    let published_second = tree.get("second").cloned().unwrap_or_default();
    assert_eq!(published_second, second[..published_second.len()], "the published prefix of second has wrong bytes");
    assert_eq!(read_tree(&clean, &volume, before.id), BTreeMap::from([("first".to_owned(), first)]));
}

#[test]
fn torn_block_is_written_again() {
    let home = temp_dir("chalk-local-faults-home-");
    let objects = temp_dir("chalk-local-faults-objects-");
    let faults = LocalFaults::new(3, 0.0, &[LocalFault::Tear]);
    let store = faulty_store(home.path(), objects.path(), &faults);
    let (_clean_home, clean) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();

    // The first file's write is acknowledged while its bytes are still in
    // the session's 1 MiB chunk.
    let first: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    session.write_file_from("first", &mut &first[..], 0o644, Owner::current()).unwrap();

    // The second file fills the chunk, whose write to disk tears: the call
    // that filled it fails, but the first file's bytes were acknowledged.
    faults.set_rate(1.0);
    let second = vec![3u8; 1 << 20];
    let err = session.write_file_from("second", &mut &second[..], 0o644, Owner::current()).expect_err("a torn write was reported as written");
    assert!(err.to_string().contains("writing segment"), "{err}");
    assert!(faults.counts().torn > 0);
    let mut read_back = Vec::new();
    assert!(session.read_file_to("first", &mut read_back).is_err(), "a read of a torn block succeeded before the repair");

    // Once writes succeed again, the torn block is written again and the
    // sync publishes the first file whole.
    faults.set_rate(0.0);
    let SyncOutcome::Published(info) = session.sync(None).unwrap() else { panic!("the sync published nothing") };
    let tree = read_tree(&clean, &volume, info.id);
    assert_eq!(tree["first"], first);
    let mut read_back = Vec::new();
    session.read_file_to("first", &mut read_back).unwrap();
    assert_eq!(read_back, first);
}

#[test]
fn failed_fsync_is_repaired_before_seal() {
    let home = temp_dir("chalk-local-faults-home-");
    let objects = temp_dir("chalk-local-faults-objects-");
    let faults = LocalFaults::new(5, 0.0, &[LocalFault::Fail]);
    let store = faulty_store(home.path(), objects.path(), &faults);
    let (_clean_home, clean) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let empty = clean.head(&volume, &LineageName::main()).unwrap().id;
    let data = vec![5u8; 1_500_000];
    session.write_file_from("data", &mut &data[..], 0o644, Owner::current()).unwrap();

    // Only the fsync of the seal fails: the sync fails and publishes nothing.
    faults.set_fsyncs_only(true);
    faults.set_rate(1.0);
    let err = session.sync(None).expect_err("a sync whose fsync failed succeeded");
    assert_eq!(faults.counts().failed, 1, "one fsync was expected to fail: {err}");
    assert_eq!(clean.head(&volume, &LineageName::main()).unwrap().id, empty, "a failed sync moved the head");

    faults.set_rate(0.0);
    let SyncOutcome::Published(info) = session.sync(None).unwrap() else { panic!("the sync published nothing") };
    assert_eq!(read_tree(&clean, &volume, info.id)["data"], data);
    // The retried seal appended no second seal record: the published segment scans as sealed.
    assert!(!info.segments.is_empty());
    for segment in &info.segments {
        let path = objects.path().join("volumes/v/segments").join(chalk_engine::segment::file_name(*segment));
        let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("published segment {} not found: {err}", path.display()));
        let report = chalk_engine::segment::scan(&bytes);
        assert!(report.sealed, "segment {segment} is not sealed after a retried seal");
        let seals = report.records.iter().filter(|record| record.record_type == RecordType::Seal).count();
        assert_eq!(seals, 1, "segment {segment} has {seals} seal records");
    }
}
