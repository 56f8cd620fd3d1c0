//! Kill-and-recover: a child process (`chalk-kill-child`) writes,
//! overwrites, truncates, renames, removes and syncs on a seeded schedule
//! and is killed with SIGKILL at a random point, often in the middle of a
//! sync. After each kill the test reopens the store and checks it against
//! the same schedule replayed in memory:
//!
//! - the versions are exactly the earlier ones plus one per sync the child
//!   completed, in order, with none missing and none from a half-done sync;
//! - every new version contains byte for byte the files of its sync, so
//!   nothing written after the last sync is visible. It is read through a
//!   store on another local root that only ever fetched from the object
//!   store, as after the loss of the local disk;
//! - a sample of older versions still reads back unchanged through the
//!   child's local root, and all versions of a volume after its 50th kill,
//!   before the test moves to the next volume, and at the end;
//! - the killed session's directory is discarded, and a torn segment tail
//!   (found after the kill, or made by the test to imitate a power cut) is
//!   detected by the engine's recovery scan.
//!
//! Every 100 kills the test moves to a new volume, because listing a
//! lineage in the file object store takes time that grows with its length.
//!
//! `CHALK_KILLS` sets the number of kills (default 300) and
//! `CHALK_KILL_SEED` the first seed; a failure message names the seed of
//! the child run that broke.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chalk_engine::segment;
use chalk_engine::{
    Access, FileKind, Ino, LineageName, Owner, SessionBase, Store, StoreConfig, SyncOutcome, VersionId, VolumeName,
};
use chalk_tests::kill_workload::{sync_message, Step, Tree, Workload, SUBDIR};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const DEFAULT_KILLS: u64 = 300;
/// Steps a child run takes before it exits on its own.
const MAX_STEPS: u64 = 60;
/// Kills before the first check of all versions; the gap doubles after each.
const FIRST_FULL_CHECK: u64 = 50;
/// Older versions read back after each kill.
const SAMPLED_VERSIONS: usize = 2;
/// Kills on one volume before the test moves to a new one.
const KILLS_PER_VOLUME: u64 = 100;

/// Length and hash of each file of a tree: enough to compare a version
/// with its expected contents without keeping every byte of every version.
type Digest = BTreeMap<String, (usize, u64)>;

fn digest(tree: &Tree) -> Digest {
    tree.iter()
        .map(|(path, data)| {
            let mut hasher = DefaultHasher::new();
            data.hash(&mut hasher);
            (path.clone(), (data.len(), hasher.finish()))
        })
        .collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value.parse().unwrap_or_else(|e| panic!("invalid {name}={value:?}: {e}")),
        Err(_) => default,
    }
}

/// Where the test kills a child run.
#[derive(Clone, Copy, Debug)]
enum KillPoint {
    /// After the child announced step N, plus a delay.
    Step(u64),
    /// After the child announced the start of sync K, plus a delay.
    Sync(u64),
    /// Never: the run ends on its own.
    Never,
}

/// What the child printed before it died.
#[derive(Debug, Default)]
struct ChildLog {
    last_sync_begun: u64,
    /// Versions the child saw published, by sync number.
    synced: BTreeMap<u64, String>,
    killed: bool,
}

/// Totals reported at the end.
#[derive(Debug, Default)]
struct Stats {
    kills: u64,
    kills_after_sync_began: u64,
    runs_finished: u64,
    versions_published: u64,
    versions_checked: u64,
    torn_tails_found: u64,
    tears_made: u64,
}

struct Harness {
    home: TempDir,
    objects: TempDir,
    /// Local root of `reader`, apart from the child's.
    _reader_home: TempDir,
    /// A store that never shares the child's local root, kept open so it
    /// caches the immutable lineage entries instead of rereading them.
    reader: Arc<Store>,
    /// The volume the child runs on now.
    volume: VolumeName,
    /// Volumes created so far.
    volumes: u64,
    /// Every published version of `main` of `volume`, oldest first, with its digest.
    versions: Vec<(VersionId, Digest)>,
    rng: StdRng,
    stats: Stats,
    /// Mean time from `sync-begin` to `sync-end`, to aim kills inside syncs.
    sync_micros_mean: f64,
}

impl Harness {
    fn new(seed: u64) -> Harness {
        let home = tempfile::Builder::new().prefix("chalk-kill-home-").tempdir_in("/var/tmp").unwrap();
        let objects = tempfile::Builder::new().prefix("chalk-kill-objects-").tempdir_in("/var/tmp").unwrap();
        let reader_home = tempfile::Builder::new().prefix("chalk-kill-reader-").tempdir_in("/var/tmp").unwrap();
        let reader = open_store(reader_home.path(), objects.path());
        let mut harness = Harness {
            home,
            objects,
            _reader_home: reader_home,
            reader,
            volume: VolumeName::new("v0").unwrap(),
            volumes: 0,
            versions: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            stats: Stats::default(),
            sync_micros_mean: 5_000.0,
        };
        harness.start_volume();
        harness
    }

    /// Creates the next volume and makes it the one the child runs on.
    /// Version 1 is empty; version 2 adds the subdirectory the workload writes into.
    fn start_volume(&mut self) {
        self.volume = VolumeName::new(&format!("v{}", self.volumes)).unwrap();
        self.volumes += 1;
        self.versions.clear();
        let store = self.open_store(self.home.path());
        let first = store.create_volume(&self.volume).unwrap();
        self.versions.push((first.id, Digest::new()));
        let session = store.open_session(&self.volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
        session.mkdir(Ino::ROOT, std::ffi::OsStr::new(SUBDIR), 0o755, Owner::current()).unwrap();
        let SyncOutcome::Published(second) = session.sync(Some("add the workload's subdirectory")).unwrap() else {
            panic!("creating {SUBDIR} published nothing");
        };
        self.versions.push((second.id, Digest::new()));
    }

    fn open_store(&self, local_root: &Path) -> Arc<Store> {
        open_store(local_root, self.objects.path())
    }

    fn spawn_child(&self, seed: u64) -> Child {
        Command::new(env!("CARGO_BIN_EXE_chalk-kill-child"))
            .arg(seed.to_string())
            .arg(MAX_STEPS.to_string())
            .arg(self.volume.as_str())
            .env("CHALK_HOME", self.home.path())
            .env("CHALK_STORE", format!("file://{}", self.objects.path().display()))
            .env_remove("CHALK_LOG")
            .env_remove("CHALK_IO")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting chalk-kill-child")
    }

    fn choose_kill_point(&mut self, syncs: u64) -> (KillPoint, Duration) {
        let roll = self.rng.gen_range(0..100);
        if roll < 10 {
            return (KillPoint::Never, Duration::ZERO);
        }
        if roll < 60 && syncs > 0 {
            let sync = self.rng.gen_range(1..=syncs);
            let delay_micros = self.rng.gen_range(0.0..self.sync_micros_mean * 1.5) as u64;
            return (KillPoint::Sync(sync), Duration::from_micros(delay_micros));
        }
        let step = self.rng.gen_range(1..=MAX_STEPS);
        (KillPoint::Step(step), Duration::from_micros(self.rng.gen_range(0..3_000)))
    }

    /// Runs one child with `seed`, kills it at `point`, and returns what it printed.
    fn run_child(&mut self, seed: u64, point: KillPoint, delay: Duration) -> ChildLog {
        let mut child = self.spawn_child(seed);
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut log = ChildLog::default();
        let mut sync_started = Instant::now();
        for line in stdout.lines() {
            let line = line.expect("reading the child's stdout");
            let mut words = line.split_whitespace();
            let (kind, number) = (words.next().unwrap_or(""), words.next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0));
            match kind {
                "sync-begin" => {
                    log.last_sync_begun = number;
                    sync_started = Instant::now();
                }
                "sync-end" => {
                    let micros = sync_started.elapsed().as_micros() as f64;
                    self.sync_micros_mean = 0.9 * self.sync_micros_mean + 0.1 * micros;
                    log.synced.insert(number, words.next().unwrap_or_default().to_owned());
                }
                _ => {}
            }

            let hit = match point {
                KillPoint::Step(step) => kind == "step" && number == step,
                KillPoint::Sync(sync) => kind == "sync-begin" && number == sync,
                KillPoint::Never => false,
            };
            if hit && !log.killed {
                std::thread::sleep(delay);
                // SIGKILL; the child may have exited on its own already.
                let _ = child.kill();
                log.killed = true;
                // Reading goes on to the end of the pipe: lines the child
                // printed before it died tell which syncs it began and ended.
            }
        }

        let status = child.wait().expect("waiting for the child");
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        let killed_by_us = log.killed && status.signal() == Some(libc::SIGKILL);
        assert!(status.success() || killed_by_us, "seed {seed}: chalk-kill-child failed with {status}: {stderr}");
        log.killed = killed_by_us;
        log
    }

    /// Segments left in the directories of sessions that died.
    fn leftover_segments(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for session in fs::read_dir(self.home.path().join("sessions")).unwrap() {
            for file in fs::read_dir(session.unwrap().path()).unwrap() {
                let path = file.unwrap().path();
                if path.extension().is_some_and(|e| e == "seg") {
                    out.push(path);
                }
            }
        }
        out
    }

    /// Counts torn tails among the leftover segments and, one time in
    /// four, tears the last record of the longest one as a power cut
    /// would, then checks that recovery finds and cuts the tear.
    fn check_torn_tails(&mut self, seed: u64) {
        let segments = self.leftover_segments();
        for path in &segments {
            let report = segment::scan(&fs::read(path).unwrap());
            self.stats.torn_tails_found += u64::from(report.invalid.is_some());
        }
        let Some(longest) = segments.iter().max_by_key(|p| fs::metadata(p).unwrap().len()) else { return };
        if !self.rng.gen_bool(0.25) {
            return;
        }
        let bytes = fs::read(longest).unwrap();
        let before = segment::scan(&bytes);
        if before.invalid.is_some() || before.records.len() < 2 {
            return;
        }
        let last = *before.records.last().unwrap();
        let cut = last.offset as u64 + self.rng.gen_range(1..(last.end() - last.offset) as u64);
        if self.rng.gen_bool(0.5) {
            // The last write reached the disk only in part.
            OpenOptions::new().write(true).open(longest).unwrap().set_len(cut).unwrap();
        } else {
            // A sector of the last write contains other bytes.
            let garbage: Vec<u8> = (0..64).map(|_| self.rng.gen_range(1..=255)).collect();
            OpenOptions::new().write(true).open(longest).unwrap().write_all_at(&garbage, cut).unwrap();
        }
        self.stats.tears_made += 1;

        // Recovery runs on a copy, because opening the store deletes the session.
        let copy = self.home.path().join("torn-copy.seg");
        fs::copy(longest, &copy).unwrap();
        let recovered = segment::recover(&copy).unwrap();
        let (offset, detail) = recovered.invalid.clone().unwrap_or_else(|| panic!("seed {seed}: tear at {cut} not detected"));
        assert_eq!(offset, last.offset as u64, "seed {seed}: tear detected at the wrong record: {detail}");
        assert_eq!(recovered.records.len(), before.records.len() - 1, "seed {seed}: records kept after the tear");
        assert_eq!(fs::metadata(&copy).unwrap().len(), last.offset as u64, "seed {seed}: torn tail not cut off");
        fs::remove_file(&copy).unwrap();
    }

    /// Reads every regular file of `version` through `store`.
    fn read_digest(&self, store: &Arc<Store>, version: VersionId) -> Digest {
        let session = store.open_session(&self.volume, SessionBase::Version(version), Access::ReadOnly).unwrap();
        let mut tree = Tree::new();
        for entry in session.walk("", true).unwrap() {
            match entry.attr.kind {
                FileKind::File => {
                    let mut data = Vec::new();
                    session.read_file_to(&entry.path, &mut data).unwrap();
                    tree.insert(entry.path, data);
                }
                FileKind::Directory if entry.path == SUBDIR => {}
                other => panic!("version {version}: unexpected {other:?} at {}", entry.path),
            }
        }
        digest(&tree)
    }

    fn check_version(&mut self, store: &Arc<Store>, index: usize, context: &str) {
        let (version, expected) = self.versions[index].clone();
        let found = self.read_digest(store, version);
        self.stats.versions_checked += 1;
        if found != expected {
            let differs: Vec<&String> =
                found.keys().chain(expected.keys()).filter(|path| found.get(*path) != expected.get(*path)).collect();
            panic!("{context}: version {version} (index {index}) differs from its sync at {differs:?}");
        }
    }

    /// Runs one child with `seed`, kills it, reopens the store and checks it.
    fn round(&mut self, seed: u64) {
        // Replay the schedule to know the tree after each sync.
        let mut workload = Workload::new(seed, self.head_tree());
        let mut expected_by_sync = Vec::new();
        for _ in 0..MAX_STEPS {
            if let Step::Sync { .. } = workload.next_step() {
                expected_by_sync.push(digest(workload.tree()));
            }
        }

        let (point, delay) = self.choose_kill_point(expected_by_sync.len() as u64);
        let log = self.run_child(seed, point, delay);
        if log.killed {
            self.stats.kills += 1;
            self.stats.kills_after_sync_began += u64::from(matches!(point, KillPoint::Sync(_)));
        } else {
            self.stats.runs_finished += 1;
        }
        self.check_torn_tails(seed);

        // Reopening the store discards the dead session.
        // A child killed before it created its lock file leaves an empty
        // directory, which the engine keeps for a minute in case its session
        // is still starting. Every other session directory must be gone.
        let store = self.open_store(self.home.path());
        for session in fs::read_dir(self.home.path().join("sessions")).unwrap() {
            let dir = session.unwrap().path();
            let files: Vec<_> = fs::read_dir(&dir).unwrap().map(|f| f.unwrap().file_name()).collect();
            assert!(files.is_empty(), "seed {seed}: the killed session {} was not discarded: {files:?}", dir.display());
        }

        // The versions are the old ones plus one per completed sync, in order.
        let listed = self.reader.versions(&self.volume, &LineageName::main()).unwrap();
        let old = self.versions.len();
        assert!(listed.len() >= old, "seed {seed}: {} versions listed, {old} were published", listed.len());
        for (index, (info, (id, _))) in listed.iter().zip(&self.versions).enumerate() {
            assert_eq!(info.id, *id, "seed {seed}: version {index} changed");
        }
        let new = &listed[old..];
        let context = format!("seed {seed}, {point:?} + {delay:?}");
        let messages: Vec<Option<&str>> = new.iter().map(|v| v.message.as_deref()).collect();
        assert!(
            new.len() as u64 <= log.last_sync_begun,
            "{context}: {} versions {messages:?} from {} syncs begun",
            new.len(),
            log.last_sync_begun
        );
        assert!(new.len() >= log.synced.len(), "{context}: {} syncs ended but {} versions listed", log.synced.len(), new.len());
        for (k, info) in new.iter().enumerate() {
            let number = k as u64 + 1;
            assert_eq!(info.message.as_deref(), Some(sync_message(seed, number).as_str()), "{context}: version {}", info.id);
            if let Some(id) = log.synced.get(&number) {
                assert_eq!(info.id.to_string(), *id, "{context}: sync {number} reported another version");
            }
            self.versions.push((info.id, expected_by_sync[k].clone()));
        }
        self.stats.versions_published += new.len() as u64;

        // New versions, read as a host that lost its local disk would.
        let reader = self.reader.clone();
        for index in old..self.versions.len() {
            self.check_version(&reader, index, &context);
        }
        let head = reader.head(&self.volume, &LineageName::main()).unwrap();
        assert_eq!(head.id, self.versions.last().unwrap().0, "{context}: head is not the last published version");

        // A sample of older versions, read through the child's local root.
        for _ in 0..SAMPLED_VERSIONS {
            let index = self.rng.gen_range(0..old);
            self.check_version(&store, index, &context);
        }
    }

    fn head_tree(&self) -> Tree {
        // The schedule starts from the head's files, which the child reads
        // from its session; the replay needs the same bytes.
        let head = self.versions.last().unwrap().0;
        let session = self.reader.open_session(&self.volume, SessionBase::Version(head), Access::ReadOnly).unwrap();
        let mut tree = Tree::new();
        for entry in session.walk("", true).unwrap() {
            if entry.attr.kind == FileKind::File {
                let mut data = Vec::new();
                session.read_file_to(&entry.path, &mut data).unwrap();
                tree.insert(entry.path, data);
            }
        }
        assert_eq!(digest(&tree), self.versions.last().unwrap().1, "the head's files changed since they were checked");
        tree
    }

    fn check_all_versions(&mut self, context: &str) {
        let store = self.open_store(self.home.path());
        for index in 0..self.versions.len() {
            self.check_version(&store, index, context);
        }
    }
}

/// Opens a store on `local_root` whose object store is the directory `objects`.
fn open_store(local_root: &Path, objects: &Path) -> Arc<Store> {
    let config =
        StoreConfig { object_store_url: format!("file://{}", objects.display()), ..StoreConfig::with_local_root(local_root) };
    Store::open(config).unwrap()
}

#[test]
fn killed_writers_lose_only_unsynced_changes() {
    let kills_planned = env_u64("CHALK_KILLS", DEFAULT_KILLS);
    let first_seed = env_u64("CHALK_KILL_SEED", 1);
    let mut harness = Harness::new(first_seed);
    let start = Instant::now();
    let mut seed = first_seed;
    let mut volume_start = 0;
    let mut next_full_check = FIRST_FULL_CHECK;
    while harness.stats.kills < kills_planned {
        harness.round(seed);
        let kills_on_volume = harness.stats.kills - volume_start;
        if kills_on_volume >= next_full_check || kills_on_volume >= KILLS_PER_VOLUME {
            harness.check_all_versions(&format!("full check of {} after seed {seed}", harness.volume));
            next_full_check *= 2;
        }
        if kills_on_volume >= KILLS_PER_VOLUME && harness.stats.kills < kills_planned {
            harness.start_volume();
            volume_start = harness.stats.kills;
            next_full_check = FIRST_FULL_CHECK;
        }
        seed += 1;
    }
    harness.check_all_versions("final full check");

    let stats = &harness.stats;
    eprintln!(
        "kill-recover: {} kills survived ({} aimed inside a sync), {} runs finished unkilled, {} versions published \
         on {} volumes, {} version reads checked, {} torn tails found after kills, {} tears made and detected, in {:.0} s",
        stats.kills,
        stats.kills_after_sync_began,
        stats.runs_finished,
        stats.versions_published,
        harness.volumes,
        stats.versions_checked,
        stats.torn_tails_found,
        stats.tears_made,
        start.elapsed().as_secs_f64()
    );
    assert!(stats.versions_published > 0, "no child run ever published, so nothing was checked");
    assert!(stats.tears_made > 0, "no tear was made, so recovery was not checked");
}
