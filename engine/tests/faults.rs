//! Fault injection below the engine: an object store wrapper that fails,
//! delays, drops and corrupts requests, and a full local disk.
//!
//! Every fault is drawn from a seed, so a failing run reproduces. A draw
//! depends on the seed, the request kind, the object key with its random
//! ids (ULIDs) masked, and how many times that masked key was requested
//! before, never on thread timing. Set `CHALK_FAULT_SEEDS` to a number of
//! seeds to run more of them (the soak script does).
//!
//! What the tests hold the engine to, at a 10% fault rate:
//! - a sync either publishes a complete version or fails and leaves the
//!   head where it was. After a failed sync, the session can still publish
//!   once the faults stop;
//! - a read returns exactly the bytes that were written, or an error;
//! - a full local disk fails writes with `NoSpace`, and nothing that was
//!   published before is damaged.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use chalk_engine::object_store::{self, ListPage, ObjectStore};
use chalk_engine::{
    Access, EngineError, FileKind, Ino, LineageName, Owner, RenameMode, Session, SessionBase, SetAttr, Store,
    StoreConfig, SyncOutcome, VersionId, VersionInfo, VolumeName,
};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Faults per 1000 requests in the tests that model a flaky network.
const FAULT_RATE_PER_MILLE: u64 = 100;

/// Seeds run by default; `CHALK_FAULT_SEEDS` overrides the count.
const DEFAULT_SEEDS: u64 = 6;

/// Sync attempts with faults on before the test turns them off.
const SYNC_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------
// The fault-injecting object store
// ---------------------------------------------------------------------------

/// A fault the wrapper can inject into one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// The store returns 503 and does nothing.
    ServerError,
    /// No response in time, and a write may or may not have been applied.
    Timeout,
    /// The connection drops after the store applied the request.
    ConnectionDropped,
    /// A read returns its payload with one bit flipped.
    CorruptPayload,
    /// A read returns only a prefix of its payload.
    TruncatedPayload,
    /// The request succeeds after a short delay, which reorders parallel writes.
    Delay,
}

/// Which faults a [`FaultyStore`] draws from.
#[derive(Clone, Copy, Debug)]
enum FaultMix {
    /// Every fault kind: a flaky network in front of a correct store.
    Network,
    /// Only corrupt or truncated read payloads.
    CorruptReads,
}

/// Object store wrapper that injects faults drawn from a seed.
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    seed: u64,
    rate_per_mille: u64,
    mix: FaultMix,
    enabled: Mutex<bool>,
    /// Requests seen per (request kind, masked key), for the draw.
    requests: Mutex<HashMap<(&'static str, String), u64>>,
    injected: Mutex<BTreeMap<Fault, u64>>,
}

impl FaultyStore {
    fn new(inner: Arc<dyn ObjectStore>, seed: u64, rate_per_mille: u64, mix: FaultMix) -> Arc<Self> {
        Arc::new(FaultyStore {
            inner,
            seed,
            rate_per_mille,
            mix,
            enabled: Mutex::new(true),
            requests: Mutex::new(HashMap::new()),
            injected: Mutex::new(BTreeMap::new()),
        })
    }

    fn set_enabled(&self, enabled: bool) {
        *self.enabled.lock() = enabled;
    }

    fn injected_total(&self) -> u64 {
        self.injected.lock().values().sum()
    }

    fn injected(&self) -> BTreeMap<Fault, u64> {
        self.injected.lock().clone()
    }

    /// Draws 64 random bits for this request from the seed, the request
    /// kind, the masked key and the number of earlier identical requests.
    fn draw(&self, kind: &'static str, key: &str) -> u64 {
        let masked = mask_ids(key);
        let nth = {
            let mut requests = self.requests.lock();
            let count = requests.entry((kind, masked.clone())).or_insert(0);
            *count += 1;
            *count
        };
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.seed.to_le_bytes());
        hasher.update(kind.as_bytes());
        hasher.update(&[0]);
        hasher.update(masked.as_bytes());
        hasher.update(&nth.to_le_bytes());
        u64::from_le_bytes(hasher.finalize().as_bytes()[..8].try_into().unwrap())
    }

    /// Decides the fault for one request, if any. `is_read` requests can
    /// also get corrupt or truncated payloads.
    fn decide(&self, kind: &'static str, key: &str, is_read: bool) -> (Option<Fault>, u64) {
        if !*self.enabled.lock() {
            return (None, 0);
        }
        let bits = self.draw(kind, key);
        if bits % 1000 >= self.rate_per_mille {
            return (None, bits);
        }
        let pick = (bits >> 16) % 100;
        let fault = match self.mix {
            FaultMix::CorruptReads if !is_read => return (None, bits),
            FaultMix::CorruptReads if pick < 70 => Fault::CorruptPayload,
            FaultMix::CorruptReads => Fault::TruncatedPayload,
            FaultMix::Network if pick < 25 => Fault::ServerError,
            FaultMix::Network if pick < 40 => Fault::Timeout,
            FaultMix::Network if pick < 60 => Fault::ConnectionDropped,
            FaultMix::Network if pick < 75 && is_read => Fault::CorruptPayload,
            FaultMix::Network if pick < 85 && is_read => Fault::TruncatedPayload,
            FaultMix::Network => Fault::Delay,
        };
        *self.injected.lock().entry(fault).or_insert(0) += 1;
        (Some(fault), bits)
    }

    fn error(&self, fault: Fault, kind: &str, key: &str) -> EngineError {
        let detail = match fault {
            Fault::ServerError => "injected fault: 503 Slow Down",
            Fault::Timeout => "injected fault: request timed out",
            _ => "injected fault: connection reset by peer",
        };
        EngineError::ObjectStore { url: self.inner.url(), detail: format!("{kind} {key}: {detail}") }
    }

    /// Runs a write request under the fault drawn for it.
    fn write<T>(&self, kind: &'static str, key: &str, apply: impl FnOnce() -> chalk_engine::Result<T>) -> chalk_engine::Result<T> {
        let (fault, bits) = self.decide(kind, key, false);
        match fault {
            None => apply(),
            Some(Fault::Delay) => {
                std::thread::sleep(Duration::from_micros(bits >> 40 & 0xfff));
                apply()
            }
            Some(Fault::Timeout) => {
                std::thread::sleep(Duration::from_millis(2));
                // Half of the timed-out writes reached the store.
                if bits >> 32 & 1 == 1 {
                    apply()?;
                }
                Err(self.error(Fault::Timeout, kind, key))
            }
            Some(Fault::ConnectionDropped) => {
                apply()?;
                Err(self.error(Fault::ConnectionDropped, kind, key))
            }
            Some(other) => Err(self.error(other, kind, key)),
        }
    }

    /// Runs a read request under the fault drawn for it; `damage` applies
    /// a payload fault to the successful result.
    fn read<T>(
        &self,
        kind: &'static str,
        key: &str,
        fetch: impl FnOnce() -> chalk_engine::Result<T>,
        damage: impl FnOnce(T, Fault, u64) -> T,
    ) -> chalk_engine::Result<T> {
        let (fault, bits) = self.decide(kind, key, true);
        match fault {
            None => fetch(),
            Some(Fault::Delay) => {
                std::thread::sleep(Duration::from_micros(bits >> 40 & 0xfff));
                fetch()
            }
            Some(fault @ (Fault::CorruptPayload | Fault::TruncatedPayload)) => Ok(damage(fetch()?, fault, bits)),
            Some(Fault::Timeout) => {
                std::thread::sleep(Duration::from_millis(2));
                Err(self.error(Fault::Timeout, kind, key))
            }
            Some(other) => Err(self.error(other, kind, key)),
        }
    }
}

/// Flips one bit, or cuts the payload short, as `fault` selects.
fn damage_bytes(mut bytes: Vec<u8>, fault: Fault, bits: u64) -> Vec<u8> {
    if bytes.is_empty() {
        return bytes;
    }
    let at = (bits >> 24) as usize % bytes.len();
    match fault {
        Fault::TruncatedPayload => bytes.truncate(at),
        _ => bytes[at] ^= 1 << (bits >> 56 & 7),
    }
    bytes
}

/// Replaces every run of exactly 26 lowercase base32 characters (a ULID as
/// the engine prints it) with `*`.
fn mask_ids(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() == 26 {
            out.push('*');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in key.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

impl ObjectStore for FaultyStore {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.write("put", key, || self.inner.put(key, data))
    }

    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.write("put_file", key, || self.inner.put_file(key, path))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        self.write("put_if_absent", key, || self.inner.put_if_absent(key, data))
    }

    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        self.read("get", key, || self.inner.get(key), |found, fault, bits| found.map(|b| damage_bytes(b, fault, bits)))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.read("get_range", key, || self.inner.get_range(key, offset, len), damage_bytes)
    }

    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.read(
            "get_to_file",
            key,
            || self.inner.get_to_file(key, path),
            |found, fault, bits| {
                if found {
                    let damaged = damage_bytes(std::fs::read(path).unwrap(), fault, bits);
                    std::fs::write(path, damaged).unwrap();
                }
                found
            },
        )
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        // A listing has no payload to damage; only network faults apply.
        let (fault, bits) = match self.mix {
            FaultMix::Network => self.decide("list", prefix, false),
            FaultMix::CorruptReads => (None, 0),
        };
        match fault {
            None => self.inner.list(prefix, start_after, limit),
            Some(Fault::Delay) => {
                std::thread::sleep(Duration::from_micros(bits >> 40 & 0xfff));
                self.inner.list(prefix, start_after, limit)
            }
            Some(other) => Err(self.error(other, "list", prefix)),
        }
    }

    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.write("delete", key, || self.inner.delete(key))
    }
}

// ---------------------------------------------------------------------------
// Stores, trees and the workload
// ---------------------------------------------------------------------------

/// Expected tree of a version: file name in the volume root to contents.
type Tree = BTreeMap<String, Vec<u8>>;

/// File names the workload uses, all in the volume root.
const FILE_NAMES: usize = 12;

/// Creates a temporary directory under /var/tmp, because the engine opens
/// segments with `O_DIRECT`, which tmpfs rejects.
fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/var/tmp").unwrap()
}

/// Opens a store with a fresh local root on the object store at `objects`,
/// without faults. Tests check what reached the object store through it.
fn clean_store(objects: &Path) -> (Arc<Store>, tempfile::TempDir) {
    let home = temp_dir("chalk-faults-clean-");
    let config = StoreConfig { object_store_url: format!("file://{}", objects.display()), ..StoreConfig::with_local_root(home.path()) };
    (Store::open(config).unwrap(), home)
}

/// Opens a store on `local_root` whose object store at `objects` injects faults.
fn faulty_store(local_root: &Path, objects: &Path, seed: u64, rate_per_mille: u64, mix: FaultMix) -> (Arc<Store>, Arc<FaultyStore>) {
    let config = StoreConfig { object_store_url: format!("file://{}", objects.display()), ..StoreConfig::with_local_root(local_root) };
    for dir in ["cache/segments", "sessions"] {
        std::fs::create_dir_all(local_root.join(dir)).unwrap();
    }
    let inner = object_store::open(&config.object_store_url).unwrap();
    let faulty = FaultyStore::new(inner, seed, rate_per_mille, mix);
    (Store::open_with(config, faulty.clone()).unwrap(), faulty)
}

fn main_lineage() -> SessionBase {
    SessionBase::Lineage(LineageName::main())
}

/// Reads the whole tree of `version`. Any read error is returned.
fn read_tree(store: &Arc<Store>, volume: &VolumeName, version: VersionId) -> chalk_engine::Result<Tree> {
    let session = store.open_session(volume, SessionBase::Version(version), Access::ReadOnly)?;
    let mut tree = Tree::new();
    for entry in session.walk("", true)? {
        assert_eq!(entry.attr.kind, FileKind::File, "the workload creates only files, found {entry:?}");
        let mut data = Vec::new();
        session.read_file_to(&entry.path, &mut data)?;
        tree.insert(entry.path, data);
    }
    Ok(tree)
}

fn head(store: &Arc<Store>, volume: &VolumeName) -> VersionInfo {
    store.head(volume, &LineageName::main()).unwrap()
}

fn file_name(index: usize) -> String {
    format!("f{index:02}")
}

/// Applies one random change to `session` and to `model`, or nothing when
/// the drawn change does not apply; returns whether it changed anything.
/// Runs with faults off: it sets up what the sync publishes.
fn random_change(session: &Session, model: &mut Tree, rng: &mut StdRng) -> bool {
    let name = file_name(rng.gen_range(0..FILE_NAMES));
    let lookup = |name: &str| session.lookup(Ino::ROOT, OsStr::new(name)).ok().map(|attr| attr.ino);
    match rng.gen_range(0..10) {
        0..=3 => {
            let len = rng.gen_range(0..200_000);
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            session.write_file_from(&name, &mut &data[..], 0o644, Owner::current()).unwrap();
            model.insert(name, data);
        }
        4..=5 => {
            let Some(ino) = lookup(&name) else { return false };
            let contents = model.get_mut(&name).unwrap();
            let offset = rng.gen_range(0..=contents.len() + 4096);
            let patch: Vec<u8> = (0..rng.gen_range(1..50_000)).map(|_| rng.gen()).collect();
            session.write(ino, offset as u64, &patch).unwrap();
            if contents.len() < offset + patch.len() {
                contents.resize(offset + patch.len(), 0);
            }
            contents[offset..offset + patch.len()].copy_from_slice(&patch);
        }
        6 => {
            let Some(ino) = lookup(&name) else { return false };
            let size = rng.gen_range(0..300_000);
            session.setattr(ino, &SetAttr { size: Some(size as u64), ..SetAttr::default() }).unwrap();
            model.get_mut(&name).unwrap().resize(size, 0);
        }
        7 => {
            if model.remove(&name).is_none() {
                return false;
            }
            session.unlink(Ino::ROOT, OsStr::new(&name)).unwrap();
        }
        _ => {
            let target = file_name(rng.gen_range(0..FILE_NAMES));
            if name == target || !model.contains_key(&name) {
                return false;
            }
            session.rename(Ino::ROOT, OsStr::new(&name), Ino::ROOT, OsStr::new(&target), RenameMode::Replace).unwrap();
            let data = model.remove(&name).unwrap();
            model.insert(target, data);
        }
    }
    true
}

fn seeds() -> u64 {
    std::env::var("CHALK_FAULT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(DEFAULT_SEEDS)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// What one seed of the flaky-network test saw.
#[derive(Default)]
struct SeedReport {
    published: u64,
    failed_syncs: u64,
    reads_ok: u64,
    reads_failed: u64,
    injected: BTreeMap<Fault, u64>,
}

/// Runs rounds of random changes and syncs against a store that fails 10%
/// of its requests, and checks every outcome against the model.
fn run_flaky_network_seed(seed: u64) -> SeedReport {
    let home = temp_dir("chalk-faults-home-");
    let objects = temp_dir("chalk-faults-objects-");
    let (store, faulty) = faulty_store(home.path(), objects.path(), seed, FAULT_RATE_PER_MILLE, FaultMix::Network);
    let (clean, _clean_home) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    clean.create_volume(&volume).unwrap();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut report = SeedReport::default();
    let mut published: Vec<(VersionId, Tree)> = vec![(head(&clean, &volume).id, Tree::new())];
    let mut model = Tree::new();
    faulty.set_enabled(false);
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();

    for round in 0..10 {
        faulty.set_enabled(false);
        let planned = rng.gen_range(1..8);
        let mut changes = 0;
        while changes < planned {
            changes += usize::from(random_change(&session, &mut model, &mut rng));
        }

        faulty.set_enabled(true);
        let mut outcome = None;
        for attempt in 0..SYNC_ATTEMPTS {
            let before = head(&clean, &volume);
            match session.sync(Some(&format!("round {round}"))) {
                Ok(SyncOutcome::Published(info)) => {
                    outcome = Some(info);
                    break;
                }
                Ok(SyncOutcome::NothingToPublish { base }) => {
                    panic!("seed {seed} round {round}: a round with changes found nothing to publish on {base:?}");
                }
                Err(err) => {
                    report.failed_syncs += 1;
                    let after = head(&clean, &volume);
                    if after.id != before.id {
                        // The head write reached the store but its response
                        // was lost, so the version must be complete.
                        assert_eq!(after.parent, Some(before.id), "seed {seed} round {round} attempt {attempt}: {err}");
                        let tree = read_tree(&clean, &volume, after.id).unwrap();
                        assert_eq!(tree, model, "seed {seed} round {round}: a failed sync published a partial version");
                    }
                }
            }
        }
        let info = match outcome {
            Some(info) => info,
            None => {
                // The faults stop; the session must still be able to publish.
                faulty.set_enabled(false);
                match session.sync(Some(&format!("round {round}"))) {
                    Ok(SyncOutcome::Published(info)) => info,
                    other => panic!("seed {seed} round {round}: sync after the faults stopped returned {other:?}"),
                }
            }
        };
        report.published += 1;
        let head_now = head(&clean, &volume);
        assert_eq!(head_now.id, info.id, "seed {seed} round {round}: sync returned a version that is not the head");
        assert_eq!(read_tree(&clean, &volume, info.id).unwrap(), model, "seed {seed} round {round}: published tree");
        published.push((info.id, model.clone()));

        // Readers on a fresh local root fetch everything through the faults.
        faulty.set_enabled(true);
        let reader_home = temp_dir("chalk-faults-reader-");
        let (reader, _) = faulty_store(reader_home.path(), objects.path(), seed ^ round, FAULT_RATE_PER_MILLE, FaultMix::Network);
        let (version, expected) = &published[rng.gen_range(0..published.len())];
        match read_tree(&reader, &volume, *version) {
            Ok(tree) => {
                assert_eq!(&tree, expected, "seed {seed} round {round}: a read under faults returned wrong bytes");
                report.reads_ok += 1;
            }
            Err(_) => report.reads_failed += 1,
        }
    }

    faulty.set_enabled(false);
    let versions = clean.versions(&volume, &LineageName::main()).unwrap();
    for (version, tree) in &published {
        assert!(versions.iter().any(|v| v.id == *version), "seed {seed}: version {version} disappeared");
        assert_eq!(&read_tree(&clean, &volume, *version).unwrap(), tree, "seed {seed}: version {version} changed");
    }
    report.injected = faulty.injected();
    report
}

#[test]
fn syncs_publish_whole_under_network_faults() {
    let mut injected: BTreeMap<Fault, u64> = BTreeMap::new();
    let (mut published, mut failed, mut reads_ok, mut reads_failed) = (0, 0, 0, 0);
    for seed in 0..seeds() {
        let report = run_flaky_network_seed(seed);
        published += report.published;
        failed += report.failed_syncs;
        reads_ok += report.reads_ok;
        reads_failed += report.reads_failed;
        for (fault, count) in report.injected {
            *injected.entry(fault).or_insert(0) += count;
        }
    }
    let total: u64 = injected.values().sum();
    eprintln!(
        "network faults: {total} injected {injected:?}; {published} versions published, {failed} syncs failed cleanly; \
         {reads_ok} tree reads exact, {reads_failed} failed with an error"
    );
    assert!(total > 0, "no fault was injected");
    assert!(failed > 0, "no sync failed, so the test checked nothing about failures");
}

#[test]
fn corrupt_payloads_never_reach_readers() {
    let home = temp_dir("chalk-faults-home-");
    let objects = temp_dir("chalk-faults-objects-");
    let (clean, _clean_home) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    clean.create_volume(&volume).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = Tree::new();
    let writer = clean.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    for _ in 0..20 {
        random_change(&writer, &mut model, &mut rng);
    }
    let version = match writer.sync(None).unwrap() {
        SyncOutcome::Published(info) => info.id,
        other => panic!("expected a published version, got {other:?}"),
    };

    let (mut exact, mut refused) = (0, 0);
    let mut injected = 0;
    for seed in 0..seeds() * 5 {
        let reader_home = home.path().join(format!("reader-{seed}"));
        let (reader, faulty) = faulty_store(&reader_home, objects.path(), seed, 300, FaultMix::CorruptReads);
        match read_tree(&reader, &volume, version) {
            Ok(tree) => {
                assert_eq!(tree, model, "seed {seed}: corrupt payload returned as file data");
                exact += 1;
            }
            Err(err) => {
                assert!(
                    matches!(err, EngineError::CorruptObject { .. } | EngineError::CorruptSegment { .. }),
                    "seed {seed}: a corrupt payload gave {err}, expected a corruption error"
                );
                refused += 1;
            }
        }
        injected += faulty.injected_total();
    }
    eprintln!("corrupt payloads: {injected} injected; {exact} tree reads exact, {refused} refused as corrupt");
    assert!(refused > 0, "no corrupt payload was detected, so the test checked nothing");
}

/// Object store that can lose the answer to the next create-if-absent of a
/// lineage entry (the entry is written, the caller gets an error) and can
/// fail reads of lineage entries.
struct LostEntryResponse {
    inner: Arc<dyn ObjectStore>,
    /// Lose the answer of the next lineage entry write.
    armed: Mutex<bool>,
    /// Fail every read of a lineage entry while set.
    entry_reads_fail: Mutex<bool>,
}

impl ObjectStore for LostEntryResponse {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.inner.put(key, data)
    }
    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.inner.put_file(key, path)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        let created = self.inner.put_if_absent(key, data)?;
        if key.contains("/lineages/") && std::mem::take(&mut *self.armed.lock()) {
            return Err(EngineError::ObjectStore { url: self.url(), detail: format!("put {key}: connection reset") });
        }
        Ok(created)
    }
    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        if key.contains("/lineages/") && *self.entry_reads_fail.lock() {
            return Err(EngineError::ObjectStore { url: self.url(), detail: format!("get {key}: connection reset") });
        }
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.inner.get_to_file(key, path)
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        self.inner.list(prefix, start_after, limit)
    }
    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.inner.delete(key)
    }
}

fn lost_entry_response_store(root: &Path) -> (Arc<Store>, Arc<LostEntryResponse>) {
    let config = StoreConfig::with_local_root(root);
    for dir in ["cache/segments", "sessions"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    let inner = object_store::open(&config.object_store_url).unwrap();
    let wrapper = Arc::new(LostEntryResponse { inner, armed: Mutex::new(false), entry_reads_fail: Mutex::new(false) });
    (Store::open_with(config, wrapper.clone()).unwrap(), wrapper)
}

#[test]
fn lost_entry_write_response_is_detected() {
    let dir = temp_dir("chalk-faults-lost-response-");
    let (store, wrapper) = lost_entry_response_store(dir.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    session.write_file_from("a", &mut &b"first"[..], 0o644, Owner::current()).unwrap();

    *wrapper.armed.lock() = true;
    let info = match session.sync(None) {
        Ok(SyncOutcome::Published(info)) => info,
        other => panic!("a sync whose head write landed must report it as published, got {other:?}"),
    };
    assert_eq!(info.seq, 2);
    assert_eq!(head(&store, &volume).id, info.id);

    session.write_file_from("b", &mut &b"second"[..], 0o644, Owner::current()).unwrap();
    let next = match session.sync(None) {
        Ok(SyncOutcome::Published(next)) => next,
        other => panic!("the sync after a lost answer failed: {other:?}"),
    };
    assert_eq!(next.seq, 3);
    assert_eq!(next.parent, Some(info.id));
}

#[test]
fn unconfirmed_entry_write_is_adopted() {
    let dir = temp_dir("chalk-faults-unconfirmed-");
    let (store, wrapper) = lost_entry_response_store(dir.path());
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    session.write_file_from("a", &mut &b"first"[..], 0o644, Owner::current()).unwrap();

    // The head write lands, its answer is lost and so is the read-back.
    *wrapper.armed.lock() = true;
    *wrapper.entry_reads_fail.lock() = true;
    let err = session.sync(None).expect_err("the outcome of the head write is unknown, so the sync must fail");
    assert!(matches!(err, EngineError::ObjectStore { .. }), "{err}");
    *wrapper.entry_reads_fail.lock() = false;
    let landed = head(&store, &volume);
    assert_eq!(landed.seq, 2, "the injected fault did not let the head write land");

    // With nothing changed since, the next sync reports that version.
    match session.sync(None) {
        Ok(SyncOutcome::Published(info)) => assert_eq!(info.id, landed.id),
        other => panic!("the next sync must adopt the version that landed, got {other:?}"),
    }
    assert_eq!(store.versions(&volume, &LineageName::main()).unwrap().len(), 2, "a duplicate version was published");

    // Changes made after an unconfirmed sync are published on top of it.
    session.write_file_from("b", &mut &b"second"[..], 0o644, Owner::current()).unwrap();
    *wrapper.armed.lock() = true;
    *wrapper.entry_reads_fail.lock() = true;
    session.sync(None).expect_err("unknown outcome again");
    *wrapper.entry_reads_fail.lock() = false;
    session.write_file_from("c", &mut &b"third"[..], 0o644, Owner::current()).unwrap();
    let info = match session.sync(None) {
        Ok(SyncOutcome::Published(info)) => info,
        other => panic!("a sync with changes after an unconfirmed one failed: {other:?}"),
    };
    assert_eq!(info.seq, 4);
    let tree = read_tree(&store, &volume, info.id).unwrap();
    let expected: Tree =
        [("a", &b"first"[..]), ("b", b"second"), ("c", b"third")].into_iter().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
    assert_eq!(tree, expected);
}

// ---------------------------------------------------------------------------
// A full local disk
// ---------------------------------------------------------------------------

/// A small tmpfs mounted for one test and unmounted when dropped, also
/// when the test panics. Mounting needs root, as CI runs.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_bytes: u64) -> SmallDisk {
        let dir = temp_dir("chalk-faults-small-disk-");
        let target = CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let options = CString::new(format!("size={size_bytes},mode=0700")).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, options.as_ptr().cast()) };
        assert_eq!(rc, 0, "mounting a tmpfs on {} failed (this test needs root): {}", dir.path().display(), std::io::Error::last_os_error());
        SmallDisk { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let target = CString::new(self.dir.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: the pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!("unmounting {} failed: {}", self.dir.path().display(), std::io::Error::last_os_error());
        }
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

#[test]
fn full_local_disk_fails_writes_cleanly() {
    let disk = SmallDisk::mount(8 << 20);
    let objects = temp_dir("chalk-faults-objects-");
    let config = StoreConfig { object_store_url: format!("file://{}", objects.path().display()), ..StoreConfig::with_local_root(disk.path()) };
    let store = Store::open(config).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();

    let small = pattern(100_000, 1);
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    session.write_file_from("small", &mut &small[..], 0o644, Owner::current()).unwrap();
    let published_before = match session.sync(None).unwrap() {
        SyncOutcome::Published(info) => info,
        other => panic!("expected a published version, got {other:?}"),
    };

    // Another program fills most of the disk, then the session writes
    // more than is left. The error may come from the write itself or, as
    // with buffered writes, from the next fsync.
    let ballast = disk.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 6 << 20]).unwrap();
    let big = pattern(4 << 20, 2);
    let written = session.write_file_from("big", &mut &big[..], 0o644, Owner::current());
    let err = match written {
        Err(err) => err,
        Ok(_) => session.fsync().expect_err("4 MiB fit in less than 2 MiB of free space"),
    };
    assert!(matches!(err, EngineError::NoSpace { .. }), "expected NoSpace, got {err}");
    assert!(err.to_string().contains("no space left"), "{err}");

    // Reads through the session return the written bytes or an error.
    for (name, expected) in [("small", &small), ("big", &big)] {
        let mut got = Vec::new();
        if session.read_file_to(name, &mut got).is_ok() {
            assert_eq!(&got[..], &expected[..got.len()], "{name}: read after a failed write returned wrong bytes");
        }
    }

    // Space comes back. The session writes the failed blocks again, so a
    // sync now either fails and leaves the head alone, or publishes the
    // bytes of every write that succeeded: a prefix of `big`, never the
    // holes the failed writes left. A second attempt catches a first one
    // that failed half-way through.
    std::fs::remove_file(&ballast).unwrap();
    let (clean, _clean_home) = clean_store(objects.path());
    let mut published_after = None;
    for attempt in 0..2 {
        match session.sync(None) {
            Ok(SyncOutcome::Published(info)) => {
                let reader = clean.open_session(&volume, SessionBase::Version(info.id), Access::ReadOnly).unwrap();
                let mut got = Vec::new();
                if let Err(err) = reader.read_file_to("big", &mut got) {
                    panic!("attempt {attempt}: a version published after ENOSPC cannot be read: {err}");
                }
                assert_eq!(got, big[..got.len()], "attempt {attempt}: a version published after ENOSPC has wrong bytes");
                published_after = Some(info.id);
            }
            Ok(SyncOutcome::NothingToPublish { base }) => {
                assert_eq!(Some(base.id), published_after, "attempt {attempt}: nothing to publish before any sync after ENOSPC published");
            }
            Err(_) => assert_eq!(head(&clean, &volume).id, published_before.id, "attempt {attempt}: a failed sync moved the head"),
        }
    }
    assert!(published_after.is_some(), "no sync published after the space came back");
    drop(session);

    // What was published before is intact, and the disk is usable again.
    assert_eq!(read_tree(&clean, &volume, published_before.id).unwrap(), Tree::from([("small".to_owned(), small.clone())]));
    let again = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    again.write_file_from("after", &mut &b"ok"[..], 0o644, Owner::current()).unwrap();
    assert!(matches!(again.sync(None).unwrap(), SyncOutcome::Published(_)));
}

#[test]
fn full_local_disk_still_serves_exact_reads() {
    let objects = temp_dir("chalk-faults-objects-");
    let (clean, _clean_home) = clean_store(objects.path());
    let volume = VolumeName::new("v").unwrap();
    clean.create_volume(&volume).unwrap();
    let big = pattern(12 << 20, 3);
    let writer = clean.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    writer.write_file_from("big", &mut &big[..], 0o644, Owner::current()).unwrap();
    let version = match writer.sync(None).unwrap() {
        SyncOutcome::Published(info) => info.id,
        other => panic!("expected a published version, got {other:?}"),
    };

    // A reader whose local disk is full before it reads anything: the
    // segment cache cannot keep a single block.
    let disk = SmallDisk::mount(4 << 20);
    let config = StoreConfig { object_store_url: format!("file://{}", objects.path().display()), ..StoreConfig::with_local_root(disk.path()) };
    let reader_store = Store::open(config).unwrap();
    let ballast = disk.path().join("ballast");
    let filled = std::fs::write(&ballast, vec![0u8; 5 << 20]);
    assert!(filled.is_err(), "5 MiB of ballast fit on a 4 MiB disk");
    let reader = reader_store.open_session(&volume, SessionBase::Version(version), Access::ReadOnly).unwrap();
    let mut got = Vec::new();
    match reader.read_file_to("big", &mut got) {
        Ok(_) => assert!(got == big, "a read on a full local disk returned wrong bytes"),
        Err(err) => assert!(matches!(err, EngineError::NoSpace { .. }), "expected NoSpace or the right bytes, got {err}"),
    }

    // No temporary file of a failed cache write is left behind.
    let mut left = Vec::new();
    let mut dirs = vec![disk.path().join("cache")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.file_name().unwrap().to_string_lossy().contains("tmp") {
                left.push(path);
            }
        }
    }
    assert!(left.is_empty(), "failed cache writes left temporary files: {left:?}");
}
