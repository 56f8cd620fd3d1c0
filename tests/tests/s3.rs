//! The S3 object store against real servers on 127.0.0.1: Garage 2.5.0 for
//! the data path and moto server for conditional writes. `scripts/test.sh`
//! starts both with `scripts/s3-servers.sh` and sets `CHALK_TEST_S3=required`;
//! elsewhere, run `eval "$(scripts/s3-servers.sh env)"` first, or these tests
//! skip with a message.
//!
//! Faults between client and server come from [`FaultProxy`], a small HTTP
//! proxy that fails, delays, cuts or damages a share of the requests.
//!
//! Every test works under its own key prefix, and no test lets the AWS
//! credential chain reach instance metadata: engine-level tests pass a
//! static key, and `chalk` processes get the key in their environment with
//! `AWS_EC2_METADATA_DISABLED=true`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use chalk_engine::cache::CacheConfig;
use chalk_engine::gc::GcOptions;
use chalk_engine::metrics::Metrics;
use chalk_engine::object_store::{
    CachedStore, ConditionalWrites, ObjectStore, S3Endpoint, S3Settings, S3Store, PROBE_RECORD_KEY, SINGLE_WRITER_WARNING,
};
use chalk_engine::{
    Access, EngineError, IoMode, LineageName, Owner, Session, SessionBase, Store, StoreConfig, SyncOutcome, VersionInfo,
    VolumeName,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// Part size of the tests' uploads: the smallest that S3 accepts, so that
/// objects of a few MiB already have several parts.
const PART_BYTES: u64 = 5 * MIB;

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// One S3 server started by `scripts/s3-servers.sh`.
#[derive(Clone)]
struct Server {
    name: &'static str,
    endpoint: S3Endpoint,
    bucket: String,
}

/// Reads the settings of server `name` (`GARAGE` or `MOTO`), or explains
/// why the test cannot run: a failure in CI, a loud skip elsewhere.
fn server(name: &'static str) -> Option<Server> {
    let var = |field: &str| std::env::var(format!("CHALK_{name}_{field}")).ok().filter(|v| !v.is_empty());
    let found = (|| {
        Some(Server {
            name,
            endpoint: S3Endpoint {
                endpoint_url: var("ENDPOINT")?,
                region: var("REGION")?,
                access_key_id: var("ACCESS_KEY_ID")?,
                secret_access_key: var("SECRET_ACCESS_KEY")?,
            },
            bucket: var("BUCKET")?,
        })
    })();
    if found.is_none() {
        let message = format!(
            "CHALK_{name}_ENDPOINT and the other CHALK_{name}_* settings are not set: start the S3 test servers with \
             `scripts/s3-servers.sh start` and load them with `eval \"$(scripts/s3-servers.sh env)\"`"
        );
        if std::env::var("CHALK_TEST_S3").as_deref() == Ok("required") {
            panic!("{message}");
        }
        eprintln!("SKIPPED: {message}");
    }
    found
}

fn garage() -> Option<Server> {
    server("GARAGE")
}

fn moto() -> Option<Server> {
    server("MOTO")
}

/// Returns a fresh key prefix in the server's bucket.
fn fresh_url(server: &Server, test: &str) -> String {
    format!("s3://{}/{test}-{}", server.bucket, ulid_like())
}

/// Returns a unique lowercase suffix, from the clock and a counter.
fn ulid_like() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{nanos:x}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Settings for tests: small parts, short timeouts, quick retries.
fn test_settings() -> S3Settings {
    S3Settings {
        part_bytes: PART_BYTES,
        max_attempts: 8,
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(20),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(400),
        ..S3Settings::default()
    }
}

fn open_s3(server: &Server, url: &str, endpoint_url: Option<&str>, settings: S3Settings) -> Arc<S3Store> {
    let mut endpoint = server.endpoint.clone();
    if let Some(proxy) = endpoint_url {
        endpoint.endpoint_url = proxy.to_owned();
    }
    Arc::new(S3Store::open_at(url, settings, &endpoint).expect("opening the S3 store"))
}

fn temp_home() -> TempDir {
    tempfile::Builder::new().prefix("chalk-s3-home-").tempdir_in("/var/tmp").unwrap()
}

/// Opens a store with its own local root over `objects`.
fn store_on(home: &Path, url: &str, objects: Arc<dyn ObjectStore>) -> Arc<Store> {
    let config = StoreConfig { local_root: home.to_owned(), object_store_url: url.to_owned(), io_mode: IoMode::Auto };
    let mut cache = CacheConfig::defaults_for(&home.join("cache"));
    cache.memory_limit_bytes = 64 * MIB;
    // Test machines may have little free space left.
    cache.disk_free_min_bytes = 0;
    cache.readahead_max_bytes = 16 * MIB;
    Store::open_with_cache(config, objects, cache).expect("opening the store")
}

/// Bytes that differ at every offset, so a misplaced range shows.
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len).map(|i| ((i.wrapping_mul(2_654_435_761) >> 5) ^ seed.wrapping_mul(131)) as u8).collect()
}

fn main_lineage() -> SessionBase {
    SessionBase::Lineage(LineageName::main())
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

// ---------------------------------------------------------------------------
// The chalk binary
// ---------------------------------------------------------------------------

fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    [target.join("release/chalk"), target.join("debug/chalk")]
        .into_iter()
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("chalk binary not found; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN")
}

/// `chalk` on the S3 store `url`, with the server's key in the environment
/// and nothing else of the caller's AWS settings.
fn chalk(server: &Server, url: &str, home: &Path) -> Command {
    let mut command = Command::new(chalk_binary());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AWS_") {
            command.env_remove(name);
        }
    }
    command
        .env("CHALK_HOME", home)
        .env("CHALK_STORE", url)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_ENDPOINT_URL", &server.endpoint.endpoint_url)
        .env("AWS_REGION", &server.endpoint.region)
        .env("AWS_ACCESS_KEY_ID", &server.endpoint.access_key_id)
        .env("AWS_SECRET_ACCESS_KEY", &server.endpoint.secret_access_key)
        .env("CHALK_S3_PART_SIZE", PART_BYTES.to_string())
        .env("CHALK_CACHE_DISK_FREE", "0")
        .env_remove("CHALK_LOG")
        .stdin(Stdio::null());
    command
}

fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("running chalk");
    assert!(output.status.success(), "{command:?} failed: {}", describe(&output));
    String::from_utf8(output.stdout).unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("invalid JSON ({e}): {text}"))
}

/// Checks that `output` printed the single-writer warning once, as one
/// `warning:` line like every other command that publishes.
fn assert_single_writer_warning(command: &str, output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|line| line.contains("single-writer mode")).collect();
    let expected = format!("warning: {SINGLE_WRITER_WARNING}");
    assert_eq!(lines, [expected.as_str()], "{command} must print the single-writer warning once: {}", describe(output));
}

// ---------------------------------------------------------------------------
// Round trips, cold reads, ranges and multipart
// ---------------------------------------------------------------------------

#[test]
fn cli_round_trip_through_garage() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "cli-round-trip");
    let (home, other_home) = (temp_home(), temp_home());
    let tree = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::create_dir_all(tree.path().join("data/sub")).unwrap();
    let big = pattern(12 * MIB + 333, 1);
    std::fs::write(tree.path().join("data/big.bin"), &big).unwrap();
    std::fs::write(tree.path().join("data/sub/small.txt"), b"small").unwrap();
    std::fs::write(tree.path().join("data/empty"), b"").unwrap();

    // Garage ignores conditional writes, so each command that publishes prints the warning.
    let created = chalk(&garage, &url, home.path()).args(["volume", "create", "v"]).output().unwrap();
    assert!(created.status.success(), "{}", describe(&created));
    assert_single_writer_warning("create", &created);
    let put = chalk(&garage, &url, home.path()).args(["volume", "put", "v"]).arg(tree.path().join("data")).arg("data").output().unwrap();
    assert!(put.status.success(), "{}", describe(&put));
    assert_single_writer_warning("put", &put);

    // A second host, with an empty CHALK_HOME, lists the volume and reads it back.
    let listed = json(&run_ok(chalk(&garage, &url, other_home.path()).args(["volume", "list", "--json"])));
    assert_eq!(listed[0]["name"], "v");
    assert_eq!(listed[0]["latest_version"]["files"], 3);
    let versions = json(&run_ok(chalk(&garage, &url, other_home.path()).args(["volume", "versions", "v", "--json"])));
    assert_eq!(versions.as_array().unwrap().len(), 2);
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    run_ok(chalk(&garage, &url, other_home.path()).args(["volume", "get", "v", "data"]).arg(out.path().join("data")));
    assert_eq!(std::fs::read(out.path().join("data/big.bin")).unwrap(), big);
    assert_eq!(std::fs::read(out.path().join("data/sub/small.txt")).unwrap(), b"small");
    assert_eq!(std::fs::read(out.path().join("data/empty")).unwrap(), b"");

    // With the store gone (a port nothing listens on), the second host still
    // lists and reads what it read before, from its metadata and block copies.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let offline = |args: &[&str]| {
        let mut command = chalk(&garage, &url, other_home.path());
        command.env("AWS_ENDPOINT_URL", &dead_url).env("CHALK_S3_MAX_ATTEMPTS", "2").args(args);
        command
    };
    let versions = json(&run_ok(&mut offline(&["volume", "versions", "v", "--json"])));
    assert_eq!(versions.as_array().unwrap().len(), 2);
    let again = tempfile::tempdir_in("/var/tmp").unwrap();
    let got = offline(&["volume", "get", "v", "data/big.bin"]).arg(again.path().join("big.bin")).output().unwrap();
    assert!(got.status.success(), "{}", describe(&got));
    assert!(String::from_utf8_lossy(&got.stderr).contains("metadata cached on this host"), "{}", describe(&got));
    assert_eq!(std::fs::read(again.path().join("big.bin")).unwrap(), big);

    // gc reads the store itself, not this host's copies. With the store
    // down it stops, and reports the store as unreachable, not as damaged.
    run_ok(chalk(&garage, &url, other_home.path()).args(["gc", "v", "--dry-run"]));
    let gc = offline(&["gc", "v"]).output().unwrap();
    assert!(!gc.status.success(), "gc without a store must fail: {}", describe(&gc));
    let stderr = String::from_utf8_lossy(&gc.stderr);
    assert!(stderr.contains("once the store is reachable"), "{}", describe(&gc));
    assert!(!stderr.contains("damaged"), "{}", describe(&gc));

    // fsck too.
    let fsck = offline(&["fsck", "v"]).output().unwrap();
    assert!(!fsck.status.success(), "fsck without a store must fail: {}", describe(&fsck));
    let stderr = String::from_utf8_lossy(&fsck.stderr);
    assert!(stderr.contains("fsck of volume v stopped: run it again once the store is reachable"), "{}", describe(&fsck));
}

#[test]
fn new_home_reads_every_version_cold() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "cold-home");
    let home = temp_home();
    let store = store_on(home.path(), &url, open_s3(&garage, &url, None, test_settings()));
    let volumes = [VolumeName::new("alpha").unwrap(), VolumeName::new("beta").unwrap()];
    let mut expected: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for (n, volume) in volumes.iter().enumerate() {
        store.create_volume(volume).unwrap();
        let session = store.open_session(volume, main_lineage(), Access::Writable).unwrap();
        let mut files = BTreeMap::new();
        for round in 0..3u64 {
            for f in 0..4u64 {
                let data = pattern(f * 700_001 + round * 13 + n as u64, round * 10 + f);
                let path = format!("dir{}/file{f}", f % 2);
                put(&session, &path, &data);
                files.insert(path, data);
            }
            let version = published(session.sync(Some(&format!("round {round}"))).unwrap());
            expected.insert((volume.to_string(), version.id.to_string()), files.clone());
        }
    }
    drop(store);

    // Losing the local disk loses nothing: an empty local root lists and reads it all.
    let fresh = temp_home();
    let cold = store_on(fresh.path(), &url, open_s3(&garage, &url, None, test_settings()));
    let listed: Vec<String> = cold.list_volumes().unwrap().into_iter().map(|v| v.name.to_string()).collect();
    assert_eq!(listed, ["alpha", "beta"]);
    for volume in &volumes {
        let versions = cold.versions(volume, &LineageName::main()).unwrap();
        assert_eq!(versions.len(), 4, "the empty first version and three syncs of {volume}");
        for version in &versions[1..] {
            let files = &expected[&(volume.to_string(), version.id.to_string())];
            let session = cold.open_session(volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
            for (path, data) in files {
                assert_eq!(&read(&session, path), data, "{volume} {} {path}", version.id);
            }
        }
    }
    assert!(cold.cache_stats().counters.store_gets > 0, "the cold reads never reached the store");
}

#[test]
fn ranged_reads_at_odd_offsets_and_end() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "ranges");
    let objects = open_s3(&garage, &url, None, test_settings());
    // Multipart: three parts of 5 MiB and a short last one.
    let len = 3 * PART_BYTES + 12_345;
    let data = pattern(len, 2);
    objects.put("big", &data).unwrap();
    objects.put("tiny", b"0123456789").unwrap();

    for (offset, want) in [
        (0, 1),
        (1, 3),
        (PART_BYTES - 1, 2),
        (PART_BYTES - 7, 2 * PART_BYTES + 14),
        (2 * PART_BYTES + 4093, 8191),
        (len - 1, 1),
        (len - 100, 1000),
        (len, 10),
        (len + 10, 10),
    ] {
        let got = objects.get_range("big", offset, want).unwrap();
        let expected = if offset >= len { &[][..] } else { &data[offset as usize..(offset + want).min(len) as usize] };
        assert_eq!(got.len(), expected.len(), "length of {want} bytes at {offset}");
        assert!(got == expected, "bytes of {want} bytes at {offset}");
    }
    assert_eq!(objects.get_range("tiny", 3, 0).unwrap(), b"");
    assert_eq!(objects.get_range("tiny", 8, 5).unwrap(), b"89");

    // The same ranges through the engine, whose cache reads blocks of 1 MiB.
    let home = temp_home();
    let store = store_on(home.path(), &url, objects);
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let writer = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    put(&writer, "f", &data);
    published(writer.sync(None).unwrap());
    drop(writer);
    let cold_home = temp_home();
    let cold = store_on(cold_home.path(), &url, open_s3(&garage, &url, None, test_settings()));
    let reader = cold.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    let ino = reader.resolve_path("f").unwrap().ino;
    for (offset, want) in [(len - 1, 1u32), (MIB - 3, 6), (7 * MIB + 11, 300_000), (0, 1), (len - 4096, 8192), (len, 1)] {
        let got = reader.read(ino, offset, want).unwrap();
        let expected = if offset >= len { &[][..] } else { &data[offset as usize..(offset + want as u64).min(len) as usize] };
        assert!(got == expected, "engine read of {want} bytes at {offset}");
    }
}

#[test]
fn multipart_boundaries_round_trip() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "multipart");
    let objects = open_s3(&garage, &url, None, test_settings());
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let sizes = [0, 1, PART_BYTES - 1, PART_BYTES, PART_BYTES + 1, 2 * PART_BYTES, 2 * PART_BYTES + 1, 3 * PART_BYTES + 12_345];
    for (i, size) in sizes.into_iter().enumerate() {
        let data = pattern(size, i as u64);
        let source = dir.path().join(format!("source-{i}"));
        std::fs::write(&source, &data).unwrap();
        objects.put_file(&format!("file/{size}"), &source).unwrap();
        objects.put(&format!("memory/{size}"), &data).unwrap();
        for key in [format!("file/{size}"), format!("memory/{size}")] {
            let got = objects.get(&key).unwrap().expect("object exists");
            assert!(got == data, "{key}: whole-object download differs");
            let target = dir.path().join(format!("download-{i}"));
            assert!(objects.get_to_file(&key, &target).unwrap());
            assert!(std::fs::read(&target).unwrap() == data, "{key}: download to a file differs");
        }
    }
    let listed = chalk_engine::object_store::list_all(objects.as_ref(), "file/").unwrap();
    let mut listed_sizes: Vec<u64> = listed.iter().map(|o| o.size).collect();
    listed_sizes.sort();
    assert_eq!(listed_sizes, sizes);
    assert!(objects.get("missing").unwrap().is_none());
    assert!(!objects.get_to_file("missing", &dir.path().join("missing")).unwrap());
    objects.delete("missing").unwrap();
}

#[test]
fn listing_paginates_under_the_prefix() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "listing");
    let objects = open_s3(&garage, &url, None, test_settings());
    for i in (0..23).rev() {
        objects.put(&format!("p/{i:03}"), b"x").unwrap();
    }
    objects.put("q/other", b"x").unwrap();
    let first = objects.list("p/", None, 10).unwrap();
    assert_eq!(first.objects.len(), 10);
    assert_eq!(first.objects[0].key, "p/000");
    assert_eq!(first.next_start_after.as_deref(), Some("p/009"));
    let all = chalk_engine::object_store::list_all(objects.as_ref(), "p/").unwrap();
    assert_eq!(all.len(), 23);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    objects.delete("p/000").unwrap();
    assert_eq!(chalk_engine::object_store::list_all(objects.as_ref(), "p/").unwrap().len(), 22);
}

// ---------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------

#[test]
fn damaged_download_is_retried_and_never_returned() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "damaged");
    let clean = open_s3(&garage, &url, None, test_settings());
    let data = pattern(PART_BYTES * 2 + 77, 3);
    clean.put("multi", &data).unwrap();
    clean.put("single", &data[..100_000]).unwrap();

    let proxy = FaultProxy::start(&garage);
    let through = open_s3(&garage, &url, Some(&proxy.url()), test_settings());
    let metrics = Arc::new(Metrics::new());
    through.attach_metrics(&metrics);
    let mut retries_before = 0.0;
    for key in ["multi", "single"] {
        let expected: &[u8] = if key == "multi" { &data } else { &data[..100_000] };
        // The first two downloads arrive damaged; the third is intact.
        proxy.set(FaultPlan { damage_bodies: 2, ..FaultPlan::default() });
        let got = through.get(key).unwrap().expect("object exists");
        assert!(got == expected, "{key}: a damaged download was returned");
        assert_eq!(proxy.damaged(), 2, "{key}: the proxy damaged {} bodies", proxy.damaged());
        // Each damaged body cost one retry, and the metrics count it.
        let retries = metric_value(&metrics.encode(), "chalk_object_store_retries_total{operation=\"get\"}");
        assert_eq!(retries - retries_before, 2.0, "{key}: retries counted");

        proxy.set(FaultPlan { damage_bodies: 2, ..FaultPlan::default() });
        let target = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        assert!(through.get_to_file(key, target.path()).unwrap());
        assert!(std::fs::read(target.path()).unwrap() == expected, "{key}: a damaged download reached the file");

        // Damage on every attempt: the download fails as corrupt and returns nothing.
        proxy.set(FaultPlan { damage_bodies: u64::MAX, ..FaultPlan::default() });
        match through.get(key) {
            Err(EngineError::CorruptObject { key: found, detail }) => {
                assert_eq!(found, key);
                assert!(detail.contains("CRC32"), "{detail}");
            }
            other => panic!("{key}: expected a corrupt object error, got {:?}", other.map(|o| o.map(|b| b.len()))),
        }
        retries_before = metric_value(&metrics.encode(), "chalk_object_store_retries_total{operation=\"get\"}");
    }
}

/// Returns the value of the sample `series` (name and labels) in Prometheus text, or 0 when absent.
fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).map(|rest| rest.trim().parse::<f64>().expect("numeric sample")))
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// Conditional writes
// ---------------------------------------------------------------------------

#[test]
fn probe_answers_right_on_both_servers() {
    let (Some(garage), Some(moto)) = (garage(), moto()) else { return };
    for (server, expected) in [(&garage, ConditionalWrites::Ignored), (&moto, ConditionalWrites::Honoured)] {
        let url = fresh_url(server, "probe");
        // A reader that never publishes never writes the probe record.
        let reader = open_s3(server, &url, None, test_settings());
        assert!(reader.get("volumes/none/volume").unwrap().is_none());
        assert!(chalk_engine::object_store::list_all(reader.as_ref(), "store/").unwrap().is_empty());

        let writer = open_s3(server, &url, None, test_settings());
        assert_eq!(writer.conditional_writes().unwrap(), expected, "{}", server.name);
        let record = writer.get(PROBE_RECORD_KEY).unwrap().expect("the probe's answer is recorded");
        let record = json(std::str::from_utf8(&record).unwrap());
        let word = if expected == ConditionalWrites::Honoured { "honoured" } else { "ignored" };
        assert_eq!(record["conditional_writes"], word, "{}", server.name);
        let left: Vec<String> =
            chalk_engine::object_store::list_all(writer.as_ref(), "store/").unwrap().into_iter().map(|o| o.key).collect();
        assert_eq!(left, [PROBE_RECORD_KEY], "{}: the probe left keys behind", server.name);

        // Another client reads the record and sends no conditional writes of its own.
        let proxy = FaultProxy::start(server);
        let other = open_s3(server, &url, Some(&proxy.url()), test_settings());
        assert_eq!(other.conditional_writes().unwrap(), expected, "{}", server.name);
        assert_eq!(proxy.requests_with_method("PUT"), 0, "{}: the recorded answer was probed again", server.name);

        // In both modes a second create of one key fails.
        assert!(other.put_if_absent("volumes/x/volume", b"one").unwrap());
        assert!(!other.put_if_absent("volumes/x/volume", b"two").unwrap());
        assert_eq!(other.get("volumes/x/volume").unwrap().unwrap(), b"one");
    }
}

#[test]
fn racing_writers_on_moto_have_one_winner() {
    let Some(moto) = moto() else { return };
    let url = fresh_url(&moto, "race");
    let objects = open_s3(&moto, &url, None, test_settings());
    assert_eq!(objects.conditional_writes().unwrap(), ConditionalWrites::Honoured);

    // Raw creates of one key from many threads.
    for round in 0..5 {
        let key = format!("race/{round}");
        let barrier = Barrier::new(8);
        let winners: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (objects, barrier, key) = (&objects, &barrier, &key);
                    scope.spawn(move || {
                        barrier.wait();
                        objects.put_if_absent(key, format!("writer {i}").as_bytes()).unwrap() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1, "round {round}: {winners} writers created {key}");
    }

    // Two hosts publish onto one lineage from the same base.
    let volume = VolumeName::new("v").unwrap();
    let (home_a, home_b) = (temp_home(), temp_home());
    let store_a = store_on(home_a.path(), &url, open_s3(&moto, &url, None, test_settings()));
    let store_b = store_on(home_b.path(), &url, open_s3(&moto, &url, None, test_settings()));
    store_a.create_volume(&volume).unwrap();
    for round in 0..4 {
        let a = store_a.open_session(&volume, main_lineage(), Access::Writable).unwrap();
        let b = store_b.open_session(&volume, main_lineage(), Access::Writable).unwrap();
        put(&a, "shared", format!("a{round}").as_bytes());
        put(&b, "shared", format!("b{round}").as_bytes());
        let barrier = Barrier::new(2);
        let sync = |session: &Session| {
            barrier.wait();
            session.sync(None)
        };
        let (result_a, result_b) = std::thread::scope(|scope| {
            let handle_a = scope.spawn(|| sync(&a));
            let handle_b = scope.spawn(|| sync(&b));
            (handle_a.join().unwrap(), handle_b.join().unwrap())
        });
        let wins: Vec<&VersionInfo> = [&result_a, &result_b]
            .into_iter()
            .filter_map(|r| match r {
                Ok(SyncOutcome::Published(info)) => Some(info),
                _ => None,
            })
            .collect();
        assert_eq!(wins.len(), 1, "round {round}: a={result_a:?} b={result_b:?}");
        for result in [&result_a, &result_b] {
            if let Err(err) = result {
                // The loser either lost the conditional write (HeadMoved) or
                // read the winner's head first and found the same path changed.
                let lost = matches!(err, EngineError::HeadMoved { .. } | EngineError::Conflict { .. });
                assert!(lost, "round {round}: the loser failed with {err}");
            }
        }
        let head = store_a.head(&volume, &LineageName::main()).unwrap();
        assert_eq!(head.id, wins[0].id, "round {round}: the head is not the winner's version");
        let winner_text = if matches!(result_a, Ok(SyncOutcome::Published(_))) { "a" } else { "b" };
        let check = store_b.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
        assert_eq!(read(&check, "shared"), format!("{winner_text}{round}").as_bytes());
    }
    assert_eq!(store_a.versions(&volume, &LineageName::main()).unwrap().len(), 5);
}

// ---------------------------------------------------------------------------
// Faults between client and server
// ---------------------------------------------------------------------------

/// Syncs through a proxy that fails, delays, cuts and damages a share of
/// the requests: each sync publishes its whole change or fails and leaves
/// the head alone, and every read returns the written bytes or an error.
fn faults_never_publish_partially(server: &Server, seed: u64) {
    let url = fresh_url(server, "faults");
    let proxy = FaultProxy::start(server);
    let volume = VolumeName::new("v").unwrap();
    let (home, check_home) = (temp_home(), temp_home());
    let mut settings = test_settings();
    settings.max_attempts = 3;
    let store = store_on(home.path(), &url, open_s3(server, &url, Some(&proxy.url()), settings.clone()));
    let checker = store_on(check_home.path(), &url, open_s3(server, &url, None, test_settings()));
    store.create_volume(&volume).unwrap();

    let mut rng = StdRng::seed_from_u64(seed);
    let mut committed: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let session = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let mut pending: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let (mut publishes, mut failures) = (0, 0);
    for round in 0..8u64 {
        for _ in 0..rng.gen_range(1..4) {
            let path = format!("f{}", rng.gen_range(0..6));
            let data = pattern(rng.gen_range(0..3 * PART_BYTES), seed * 100 + round);
            put(&session, &path, &data);
            pending.insert(path, data);
        }
        let head_before = checker.head(&volume, &LineageName::main()).unwrap();
        // Odd rounds are stormy enough that some syncs use up their attempts.
        let rate = if round % 2 == 0 { 100 } else { 600 };
        proxy.set(FaultPlan::flaky(seed * 1000 + round, rate));
        let result = session.sync(Some(&format!("round {round}")));
        proxy.set(FaultPlan::default());
        let head_after = checker.head(&volume, &LineageName::main()).unwrap();
        match result {
            Ok(SyncOutcome::Published(info)) => {
                publishes += 1;
                assert_eq!(head_after.id, info.id, "seed {seed} round {round}: the head is not the published version");
                committed.append(&mut pending);
            }
            Ok(other) => panic!("seed {seed} round {round}: unexpected {other:?}"),
            Err(err) => {
                failures += 1;
                // A failed sync either left the head alone or published the
                // whole change (its response lost on the way back).
                if head_after.id != head_before.id {
                    committed.extend(pending.clone());
                    pending.clear();
                }
                eprintln!("seed {seed} round {round}: sync failed cleanly: {err}");
            }
        }
        // Whatever the head is, it contains exactly the committed files.
        let reader = checker.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
        for (path, data) in &committed {
            assert!(&read(&reader, path) == data, "seed {seed} round {round}: {path} differs in the head");
        }
    }
    // With the faults gone, the session publishes what is left.
    if !pending.is_empty() {
        match session.sync(Some("after faults")) {
            Ok(SyncOutcome::Published(_)) | Ok(SyncOutcome::NothingToPublish { .. }) => committed.append(&mut pending),
            Err(err) => panic!("seed {seed}: the session cannot publish once the faults stop: {err}"),
        }
    }
    eprintln!("seed {seed}: {publishes} syncs published, {failures} failed");
    assert!(publishes > 0, "seed {seed}: no sync got through the faults");

    // Reads through the faulty proxy return the right bytes or an error.
    let read_home = temp_home();
    let reader_store = store_on(read_home.path(), &url, open_s3(server, &url, Some(&proxy.url()), settings));
    let reader = checker.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    let head = reader.base_version().id;
    let faulty_reader = reader_store.open_session(&volume, SessionBase::Version(head), Access::ReadOnly).unwrap();
    proxy.set(FaultPlan::flaky(seed, 150));
    let (mut good, mut errors) = (0, 0);
    for (path, data) in &committed {
        let mut got = Vec::new();
        match faulty_reader.read_file_to(path, &mut got) {
            Ok(_) => {
                assert!(&got == data, "seed {seed}: a read through faults returned wrong bytes for {path}");
                good += 1;
            }
            Err(_) => errors += 1,
        }
    }
    proxy.set(FaultPlan::default());
    eprintln!("seed {seed}: {good} reads through faults succeeded, {errors} failed cleanly");
    assert!(proxy.faults() > 0, "seed {seed}: the proxy injected no faults");
}

#[test]
fn faults_never_publish_partially_on_garage() {
    let Some(garage) = garage() else { return };
    for seed in 1..=2 {
        faults_never_publish_partially(&garage, seed);
    }
}

#[test]
fn faults_never_publish_partially_on_moto() {
    let Some(moto) = moto() else { return };
    for seed in 11..=12 {
        faults_never_publish_partially(&moto, seed);
    }
}

#[test]
fn unreachable_store_keeps_cached_reads_and_fails_sync() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "unreachable");
    let proxy = FaultProxy::start(&garage);
    let volume = VolumeName::new("v").unwrap();
    let mut settings = test_settings();
    settings.max_attempts = 3;
    settings.connect_timeout = Duration::from_millis(500);
    settings.read_timeout = Duration::from_secs(2);
    let (home, read_home) = (temp_home(), temp_home());
    let store = store_on(home.path(), &url, open_s3(&garage, &url, Some(&proxy.url()), settings.clone()));
    store.create_volume(&volume).unwrap();
    let writer = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let cached = pattern(6 * MIB, 4);
    put(&writer, "cached", &cached);
    published(writer.sync(None).unwrap());

    let reader_store = store_on(read_home.path(), &url, open_s3(&garage, &url, Some(&proxy.url()), settings));
    let reader = reader_store.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap();
    assert!(read(&reader, "cached") == cached);

    for plan in [FaultPlan { refuse_all: true, ..FaultPlan::default() }, FaultPlan { hang_all: true, ..FaultPlan::default() }] {
        proxy.set(plan.clone());
        // Cached bytes still read.
        assert!(read(&reader, "cached") == cached, "cached reads failed with the store down ({plan:?})");
        // A sync fails after its retries, in bounded time, and keeps the writes.
        put(&writer, "later", format!("{plan:?}").as_bytes());
        let started = Instant::now();
        let err = writer.sync(None).expect_err("a sync without a store must fail");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(60), "the failed sync took {took:?} ({plan:?})");
        assert!(matches!(err, EngineError::ObjectStore { .. }), "unexpected error {err} ({plan:?})");
        assert!(err.to_string().contains("attempt"), "the error does not say it retried: {err}");
        assert!(err.to_string().contains("keeps its writes"), "the error does not say the writes are kept: {err}");

        // Once the store is back, the same session publishes its writes.
        proxy.set(FaultPlan::default());
        let version = published(writer.sync(None).unwrap());
        let check = store.open_session(&volume, SessionBase::Version(version.id), Access::ReadOnly).unwrap();
        assert_eq!(read(&check, "later"), format!("{plan:?}").as_bytes());
    }
}

/// Unmounts a mount point when dropped, on failure paths too.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3").arg("-u").arg(&self.0).stderr(Stdio::null()).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).status();
        }
    }
}

#[test]
fn mounted_sync_through_an_outage() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "mounted-outage");
    let proxy = FaultProxy::start(&garage);
    let (home, check_home) = (temp_home(), temp_home());
    let mnt = tempfile::tempdir_in("/var/tmp").unwrap();
    let through_proxy = |args: &[&str]| {
        let mut command = chalk(&garage, &url, home.path());
        command
            .env("AWS_ENDPOINT_URL", proxy.url())
            .env("CHALK_S3_MAX_ATTEMPTS", "2")
            .env("CHALK_S3_CONNECT_TIMEOUT_MS", "500")
            .args(args);
        command
    };
    run_ok(&mut through_proxy(&["volume", "create", "v"]));
    let mount_point = mnt.path().to_str().unwrap();
    let _unmount = Unmount(mnt.path().to_path_buf());
    run_ok(&mut through_proxy(&["volume", "mount", "v", mount_point, "--daemon"]));

    // Garage ignores conditional writes, so each sync of the mount prints a warning.
    std::fs::write(mnt.path().join("first"), b"before the outage").unwrap();
    let synced = through_proxy(&["volume", "sync", mount_point]).output().unwrap();
    assert!(synced.status.success(), "{}", describe(&synced));
    assert_single_writer_warning("sync", &synced);

    // With the store down, the sync fails and reports that the writes are
    // kept, and the mount still serves them.
    proxy.set(FaultPlan { refuse_all: true, ..FaultPlan::default() });
    std::fs::write(mnt.path().join("second"), b"during the outage").unwrap();
    let failed = through_proxy(&["volume", "sync", mount_point]).output().unwrap();
    assert!(!failed.status.success(), "a sync without a store must fail: {}", describe(&failed));
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("keeps its writes"), "{}", describe(&failed));
    assert!(stderr.contains("sync again"), "{}", describe(&failed));
    assert_eq!(std::fs::read(mnt.path().join("second")).unwrap(), b"during the outage");

    // The mount's log names the volume and lineage of the failed sync.
    let logs: Vec<PathBuf> = std::fs::read_dir(home.path().join("logs")).unwrap().map(|e| e.unwrap().path()).collect();
    let log = logs.iter().map(|path| std::fs::read_to_string(path).unwrap()).collect::<Vec<_>>().join("");
    let line = log.lines().find(|line| line.contains("sync failed")).unwrap_or_else(|| panic!("no `sync failed` line in {logs:?}: {log}"));
    assert!(line.contains("volume=v"), "{line}");
    assert!(line.contains("lineage=main"), "{line}");

    // Once the store is reachable again, the same mount publishes both files.
    proxy.set(FaultPlan::default());
    run_ok(&mut through_proxy(&["volume", "sync", mount_point]));
    let out = tempfile::tempdir_in("/var/tmp").unwrap();
    for (name, bytes) in [("first", &b"before the outage"[..]), ("second", b"during the outage")] {
        run_ok(chalk(&garage, &url, check_home.path()).args(["volume", "get", "v", name]).arg(out.path().join(name)));
        assert_eq!(std::fs::read(out.path().join(name)).unwrap(), bytes, "{name} as a new host reads it");
    }
}

/// A read-only mount of a volume in Garage, through a fault proxy, on a new
/// host, with the default of one thread that reads FUSE requests. The
/// volume contains `small/first`, `small/second` and the 8 MiB `big.bin`.
/// The mount has read `small/first`, so it has the metadata and blocks of
/// both small files in memory.
struct HungStoreMount {
    // Fields drop in this order: unmount first, then the mount point, the
    // proxy and the homes.
    _unmount: Unmount,
    mnt: TempDir,
    proxy: FaultProxy,
    _homes: (TempDir, TempDir),
    big: Vec<u8>,
}

impl HungStoreMount {
    fn start(garage: &Server, test: &str) -> HungStoreMount {
        let url = fresh_url(garage, test);
        let proxy = FaultProxy::start(garage);
        let (home, mount_home) = (temp_home(), temp_home());
        let tree = tempfile::tempdir_in("/var/tmp").unwrap();
        std::fs::create_dir_all(tree.path().join("small")).unwrap();
        for name in ["first", "second"] {
            std::fs::write(tree.path().join("small").join(name), name.repeat(100)).unwrap();
        }
        let big = pattern(8 * MIB, 9);
        std::fs::write(tree.path().join("big.bin"), &big).unwrap();
        // Two puts, so the large file's bytes and inode page sit in objects
        // of their own, and no readahead of the small files fetches them.
        run_ok(chalk(garage, &url, home.path()).args(["volume", "create", "v"]));
        run_ok(chalk(garage, &url, home.path()).args(["volume", "put", "v"]).arg(tree.path().join("small")).arg("small"));
        run_ok(chalk(garage, &url, home.path()).args(["volume", "put", "v"]).arg(tree.path().join("big.bin")).arg("big.bin"));

        let mnt = tempfile::tempdir_in("/var/tmp").unwrap();
        let unmount = Unmount(mnt.path().to_path_buf());
        let mut mount = chalk(garage, &url, mount_home.path());
        mount
            .env("AWS_ENDPOINT_URL", proxy.url())
            .env("CHALK_S3_MAX_ATTEMPTS", "2")
            .env("CHALK_S3_READ_TIMEOUT_MS", "2000")
            .env_remove("CHALK_FUSE_THREADS")
            .args(["volume", "mount", "v"])
            .arg(mnt.path())
            .args(["--read-only", "--daemon"]);
        run_ok(&mut mount);
        assert_eq!(std::fs::read(mnt.path().join("small/first")).unwrap(), "first".repeat(100).as_bytes());
        HungStoreMount { proxy, mnt, big, _homes: (home, mount_home), _unmount: unmount }
    }

    /// Hangs the store and runs `request`, named `name` in messages, on a
    /// thread of its own. Checks that it waits on the store while
    /// `small/second` reads within 1 s, and that it ends after at least 1 s.
    /// Then brings the store back, checks that `big.bin` reads whole, and
    /// returns what the request returned.
    fn wait_on_hung_store<T: Send + 'static>(&self, name: &str, request: impl FnOnce() -> T + Send + 'static) -> T {
        self.proxy.set(FaultPlan { hang_all: true, ..FaultPlan::default() });
        let waiting = Arc::new(AtomicBool::new(true));
        let thread = {
            let waiting = Arc::clone(&waiting);
            std::thread::spawn(move || {
                let started = Instant::now();
                let result = request();
                waiting.store(false, Ordering::SeqCst);
                (result, started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(500));
        assert!(waiting.load(Ordering::SeqCst), "{name} did not wait on the hanging store");

        // Meanwhile the mount looks up and reads a file it has not served yet,
        // from the metadata and blocks it fetched when it read small/first.
        let started = Instant::now();
        let second = std::fs::read(self.mnt.path().join("small/second"));
        let took = started.elapsed();
        let still_waiting = waiting.load(Ordering::SeqCst);
        assert_eq!(second.unwrap(), "second".repeat(100).as_bytes());
        assert!(still_waiting, "{name} ended before the read of small/second could show it waited alongside ({took:?})");
        assert!(took < Duration::from_secs(1), "a cached file took {took:?} to read while {name} waited on the store");

        let (result, waited) = thread.join().unwrap();
        assert!(waited >= Duration::from_secs(1), "{name} waited only {waited:?}");
        // A request that failed left no wrong bytes and no negative entry behind.
        self.proxy.set(FaultPlan::default());
        assert!(std::fs::read(self.mnt.path().join("big.bin")).unwrap() == self.big, "big.bin read wrong once the store was back");
        result
    }
}

#[test]
fn hung_store_read_leaves_mount_responsive() {
    let Some(garage) = garage() else { return };
    let setup = HungStoreMount::start(&garage, "waiting-read");
    let path = setup.mnt.path().join("big.bin");
    // The large file is looked up before the store hangs, so that only its read waits.
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 8 * MIB);

    // With the store hanging, a read of the large file waits for its retries.
    let tail = setup.wait_on_hung_store("the read of big.bin", move || {
        std::fs::File::open(&path).and_then(|mut file| {
            let mut tail = vec![0; MIB as usize];
            file.seek(SeekFrom::Start(7 * MIB))?;
            file.read_exact(&mut tail).map(|()| tail)
        })
    });
    // The waiting read fails or succeeds, and never returns wrong bytes.
    if let Ok(tail) = tail {
        assert!(tail == setup.big[7 * MIB as usize..], "the read of big.bin returned wrong bytes");
    }
}

#[test]
fn hung_store_lookup_leaves_mount_responsive() {
    let Some(garage) = garage() else { return };
    let setup = HungStoreMount::start(&garage, "waiting-lookup");
    let path = setup.mnt.path().join("big.bin");

    // The mount has not loaded the inode page of big.bin, so with the store
    // hanging, looking the file up waits for the page's retries.
    let len = setup.wait_on_hung_store("the lookup of big.bin", move || std::fs::metadata(&path).map(|meta| meta.len()));
    // The waiting lookup fails or finds the file with its real size.
    if let Ok(len) = len {
        assert_eq!(len, 8 * MIB, "the lookup of big.bin found a wrong size");
    }
}

#[test]
fn hung_store_listing_leaves_mount_responsive() {
    let Some(garage) = garage() else { return };
    let setup = HungStoreMount::start(&garage, "waiting-listing");
    let root = setup.mnt.path().to_path_buf();

    // Listing the root with attributes, as `ls -l` does, needs the inode
    // page of big.bin, which the mount has not loaded: with the store
    // hanging, the listing waits for the page's retries.
    let sizes = setup.wait_on_hung_store("the listing of the root", move || {
        std::fs::read_dir(&root).and_then(|entries| {
            entries
                .map(|entry| entry.and_then(|entry| Ok((entry.file_name(), entry.metadata()?.len()))))
                .collect::<std::io::Result<Vec<_>>>()
        })
    });
    // The waiting listing fails or has big.bin with its real size.
    if let Ok(sizes) = sizes {
        let big = sizes.iter().find(|(name, _)| name == "big.bin");
        assert_eq!(big.map(|(_, len)| *len), Some(8 * MIB), "{sizes:?}");
    }
}

/// Starts a forwarder to `server` on 127.0.0.1 that resets each connection
/// once the client has sent `cut_after` bytes on it, as a store that dies in
/// the middle of an upload. Returns its endpoint URL.
fn start_cutting_forwarder(server: &Server, cut_after: usize) -> String {
    let upstream = server.endpoint.endpoint_url.trim_start_matches("http://").trim_end_matches('/').to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let Ok(server_side) = TcpStream::connect(&upstream) else { continue };
            let (mut from_server, mut to_client) = (server_side.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
            });
            std::thread::spawn(move || {
                let mut to_server = server_side;
                let mut buf = vec![0u8; 64 << 10];
                let mut sent = 0;
                while sent < cut_after {
                    match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if to_server.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            sent += n;
                        }
                    }
                }
                // A zero linger time makes close send a reset rather than a FIN.
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: the option value is a valid `linger` of the size given.
                unsafe {
                    use std::os::fd::AsRawFd;
                    libc::setsockopt(
                        client.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                let _ = to_server.shutdown(Shutdown::Both);
            });
        }
    });
    url
}

#[test]
fn upload_reset_fails_without_a_signal() {
    use std::os::unix::process::ExitStatusExt;

    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "upload-reset");
    let home = temp_home();
    run_ok(chalk(&garage, &url, home.path()).args(["volume", "create", "v"]));
    let tree = tempfile::tempdir_in("/var/tmp").unwrap();
    std::fs::write(tree.path().join("big.bin"), pattern(24 * MIB, 9)).unwrap();

    // Every connection is reset mid-body, so the put fails after its
    // attempts. It must fail with an error, not die of SIGPIPE.
    let forwarder = start_cutting_forwarder(&garage, MIB as usize);
    let put = chalk(&garage, &url, home.path())
        .env("AWS_ENDPOINT_URL", &forwarder)
        .env("CHALK_S3_MAX_ATTEMPTS", "3")
        .args(["volume", "put", "v"])
        .arg(tree.path().join("big.bin"))
        .arg("big.bin")
        .output()
        .unwrap();
    assert_eq!(put.status.signal(), None, "the put was killed by a signal: {}", describe(&put));
    assert!(!put.status.success(), "a put through a store that resets every upload succeeded: {}", describe(&put));
    let stderr = String::from_utf8_lossy(&put.stderr);
    assert!(stderr.contains("nothing was published"), "{}", describe(&put));
    // The put's session ends with the command, so syncing is no way out.
    assert!(stderr.contains("run `chalk volume put` again once the store is reachable"), "{}", describe(&put));
    assert!(!stderr.contains("sync again"), "{}", describe(&put));

    // At most one retry warning per object, with a short cause; the final
    // error keeps the whole cause.
    let mut warnings: BTreeMap<String, usize> = BTreeMap::new();
    for line in stderr.lines().filter(|line| line.contains("object store request failed")) {
        let key = line.split_whitespace().find_map(|field| field.strip_prefix("key=")).unwrap_or_else(|| panic!("no key in {line}"));
        *warnings.entry(key.to_owned()).or_default() += 1;
        assert!(!line.contains("DispatchFailure"), "the retry warning carries the SDK's debug output: {line}");
        assert!(line.len() < 600, "the retry warning is {} characters long: {line}", line.len());
    }
    assert!(!warnings.is_empty(), "the put retried without a warning: {}", describe(&put));
    assert!(warnings.values().all(|&count| count == 1), "more than one retry warning for an object: {warnings:?}");
    let error = stderr.lines().find(|line| line.starts_with("error:")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(error.contains("failed after 3 attempt(s)"), "{error}");
}

#[test]
fn deep_fsck_stops_when_store_goes_down() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "fsck-outage");
    let proxy = FaultProxy::start(&garage);
    let (home, check_home) = (temp_home(), temp_home());
    run_ok(chalk(&garage, &url, home.path()).args(["volume", "create", "v"]));
    let tree = tempfile::tempdir_in("/var/tmp").unwrap();
    for n in 0..3u64 {
        let file = tree.path().join(format!("f{n}"));
        std::fs::write(&file, pattern(MIB + n, n)).unwrap();
        run_ok(chalk(&garage, &url, home.path()).args(["volume", "put", "v"]).arg(&file).arg(format!("f{n}")));
    }
    let fsck = |args: &[&str]| {
        let mut command = chalk(&garage, &url, check_home.path());
        command
            .env("AWS_ENDPOINT_URL", proxy.url())
            .env("CHALK_S3_MAX_ATTEMPTS", "2")
            .env("CHALK_S3_CONNECT_TIMEOUT_MS", "500")
            .args(["fsck", "v"])
            .args(args);
        command
    };

    // The listing and the metadata reads pass, and then the store stops
    // responding: every segment read fails. The segments are intact, so
    // fsck must stop with the store's error and report no damage.
    proxy.set(FaultPlan { close_paths_containing: Some("/segments/"), ..FaultPlan::default() });
    let failed = fsck(&["--deep"]).output().unwrap();
    assert!(!failed.status.success(), "fsck --deep without segment reads succeeded: {}", describe(&failed));
    let (stdout, stderr) = (String::from_utf8_lossy(&failed.stdout), String::from_utf8_lossy(&failed.stderr));
    assert!(stderr.contains("fsck of volume v stopped: run it again once the store is reachable"), "{}", describe(&failed));
    assert!(!stdout.contains("unreadable-object"), "{}", describe(&failed));
    assert!(!stderr.contains("--repair"), "{}", describe(&failed));

    // Once the store is reachable again, the same check passes.
    proxy.set(FaultPlan::default());
    run_ok(&mut fsck(&["--deep"]));
}

#[test]
fn offline_store_opens_from_copies() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "offline-open");
    let proxy = FaultProxy::start(&garage);
    let volume = VolumeName::new("v").unwrap();
    let mut settings = test_settings();
    settings.max_attempts = 2;
    settings.connect_timeout = Duration::from_millis(500);
    let (home, offline_home) = (temp_home(), temp_home());
    let store = store_on(home.path(), &url, open_s3(&garage, &url, None, test_settings()));
    store.create_volume(&volume).unwrap();
    let writer = store.open_session(&volume, main_lineage(), Access::Writable).unwrap();
    let data = pattern(3 * MIB, 9);
    put(&writer, "data", &data);
    let first = published(writer.sync(None).unwrap());

    // A host reads the volume once through the proxy, then loses the store.
    let remote = open_s3(&garage, &url, Some(&proxy.url()), settings);
    let copies = Arc::new(CachedStore::new(remote, &offline_home.path().join("cache/objects")).unwrap());
    let offline = store_on(offline_home.path(), &url, copies);
    assert!(read(&offline.open_session(&volume, main_lineage(), Access::ReadOnly).unwrap(), "data") == data);
    // Finding a version by id lists every lineage, which this host does once
    // here, because offline only listings made before are available.
    offline.open_session(&volume, SessionBase::Version(first.id), Access::ReadOnly).unwrap();
    proxy.set(FaultPlan { refuse_all: true, ..FaultPlan::default() });

    let started = Instant::now();
    let by_lineage = offline.open_session(&volume, main_lineage(), Access::ReadOnly).expect("open on main with the store down");
    assert_eq!(by_lineage.base_version().id, first.id);
    assert!(read(&by_lineage, "data") == data, "cached bytes differ with the store down");
    let by_version = offline.open_session(&volume, SessionBase::Version(first.id), Access::ReadOnly).unwrap();
    assert!(read(&by_version, "data") == data);
    assert_eq!(offline.versions(&volume, &LineageName::main()).unwrap().len(), 2);

    // A writable session opens too; its writes wait for the store.
    let private = offline.open_session(&volume, main_lineage(), Access::Writable).expect("writable open with the store down");
    put(&private, "written-offline", b"kept until the store is back");
    let err = private.sync(None).expect_err("a sync without a store must fail");
    assert!(matches!(err, EngineError::ObjectStore { .. }), "unexpected error {err}");
    assert!(started.elapsed() < Duration::from_secs(60), "offline opens took {:?}", started.elapsed());
    // Nothing the store has not seen is readable elsewhere.
    let never = offline.open_session(&volume, SessionBase::Version(first.id), Access::ReadOnly).unwrap();
    assert!(never.read_file_to("written-offline", &mut Vec::new()).is_err());

    proxy.set(FaultPlan::default());
    let second = published(private.sync(None).expect("the sync after the store came back"));
    let check = store.open_session(&volume, SessionBase::Version(second.id), Access::ReadOnly).unwrap();
    assert_eq!(read(&check, "written-offline"), b"kept until the store is back");
    assert!(read(&check, "data") == data);
}

#[test]
fn gc_aborts_abandoned_multipart_uploads() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "abandoned-upload");
    let home = temp_home();
    let store = store_on(home.path(), &url, open_s3(&garage, &url, None, test_settings()));
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let key = "volumes/v/segments/0000000000000000000000000000000a.seg";
    // A sync killed mid-upload leaves a started upload with a part.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (client, bucket, full_key) = raw_client(&garage, &url, key);
    let upload_id = runtime.block_on(async {
        let started = client.create_multipart_upload().bucket(&bucket).key(&full_key).send().await.unwrap();
        let upload_id = started.upload_id().unwrap().to_owned();
        let part = aws_sdk_s3::primitives::ByteStream::from(vec![7u8; 5 * MIB as usize]);
        client.upload_part().bucket(&bucket).key(&full_key).upload_id(&upload_id).part_number(1).body(part).send().await.unwrap();
        upload_id
    });
    let listed = store.objects().incomplete_uploads("volumes/v/").unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].key, key);
    assert_eq!(listed[0].upload_id, upload_id);

    // Within the grace period the upload is left alone.
    let report = store.gc(&volume, &GcOptions::default()).unwrap();
    assert!(report.aborted_uploads.is_empty(), "{:?}", report.aborted_uploads);
    let no_grace = GcOptions { grace: Duration::ZERO, ..GcOptions::default() };
    let dry = store.gc(&volume, &GcOptions { dry_run: true, ..no_grace.clone() }).unwrap();
    assert_eq!(dry.aborted_uploads.len(), 1);
    assert_eq!(store.objects().incomplete_uploads("volumes/v/").unwrap().len(), 1, "a dry run aborted the upload");

    std::thread::sleep(Duration::from_millis(1100));
    let report = store.gc(&volume, &no_grace).unwrap();
    assert_eq!(report.aborted_uploads.len(), 1);
    assert!(store.objects().incomplete_uploads("volumes/v/").unwrap().is_empty(), "the upload is still listed");
}

/// Builds an SDK client of `server`, and returns it with the bucket and full key of `key` in the store at `url`.
fn raw_client(server: &Server, url: &str, key: &str) -> (aws_sdk_s3::Client, String, String) {
    let endpoint = &server.endpoint;
    let credentials = aws_sdk_s3::config::Credentials::new(&endpoint.access_key_id, &endpoint.secret_access_key, None, None, "chalk-test");
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .endpoint_url(&endpoint.endpoint_url)
        .region(aws_sdk_s3::config::Region::new(endpoint.region.clone()))
        .credentials_provider(credentials)
        .force_path_style(true)
        .build();
    let (bucket, prefix) = url.strip_prefix("s3://").unwrap().split_once('/').unwrap();
    (aws_sdk_s3::Client::from_conf(config), bucket.to_owned(), format!("{prefix}/{key}"))
}

#[test]
fn killed_put_leaves_no_visible_version() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "killed-put");
    let home = temp_home();
    let source = tempfile::tempdir_in("/var/tmp").unwrap();
    let data = pattern(24 * MIB, 5);
    std::fs::write(source.path().join("big"), &data).unwrap();
    run_ok(chalk(&garage, &url, home.path()).args(["volume", "create", "v"]));

    let mut rng = StdRng::seed_from_u64(5);
    let mut versions_seen = 1;
    for attempt in 0..6 {
        let mut child = chalk(&garage, &url, home.path())
            .args(["volume", "put", "v"])
            .arg(source.path().join("big"))
            .arg(format!("big-{attempt}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..1500)));
        let _ = child.kill();
        let status = child.wait().unwrap();

        let other = temp_home();
        let versions = json(&run_ok(chalk(&garage, &url, other.path()).args(["volume", "versions", "v", "--json"])));
        let count = versions.as_array().unwrap().len();
        assert!(count == versions_seen || count == versions_seen + 1, "attempt {attempt}: {count} versions after {versions_seen}");
        if count == versions_seen + 1 {
            // The put finished before the kill: its file is whole.
            let out = tempfile::tempdir_in("/var/tmp").unwrap();
            run_ok(chalk(&garage, &url, other.path()).args(["volume", "get", "v", &format!("big-{attempt}")]).arg(out.path().join("f")));
            assert!(std::fs::read(out.path().join("f")).unwrap() == data, "attempt {attempt}: a published file differs");
        } else {
            assert!(!status.success(), "attempt {attempt}: the put succeeded but published nothing");
            let listing = run_ok(chalk(&garage, &url, other.path()).args(["volume", "ls", "v", "--json"]));
            assert!(!listing.contains(&format!("big-{attempt}")), "attempt {attempt}: a killed put is visible");
        }
        versions_seen = count;
    }
}

#[test]
fn warm_fills_the_disk_cache() {
    let Some(garage) = garage() else { return };
    let url = fresh_url(&garage, "warm");
    let (home, reader_home) = (temp_home(), temp_home());
    let source = tempfile::tempdir_in("/var/tmp").unwrap();
    let data = pattern(9 * MIB, 6);
    std::fs::create_dir_all(source.path().join("d")).unwrap();
    std::fs::write(source.path().join("d/one"), &data).unwrap();
    std::fs::write(source.path().join("d/two"), b"two").unwrap();
    std::fs::write(source.path().join("skipped"), pattern(3 * MIB, 7)).unwrap();
    run_ok(chalk(&garage, &url, home.path()).args(["volume", "create", "v"]));
    run_ok(chalk(&garage, &url, home.path()).args(["volume", "put", "v"]).arg(source.path()).arg("src"));

    let out = run_ok(chalk(&garage, &url, reader_home.path()).args(["volume", "warm", "v", "src/d"]));
    assert!(out.contains("warmed 2 files"), "{out}");
    let stats = json(&run_ok(chalk(&garage, &url, reader_home.path()).args(["cache", "stats", "--json"])));
    let disk_bytes = stats["disk"]["bytes"].as_u64().unwrap();
    assert!(disk_bytes >= data.len() as u64, "the disk cache holds {disk_bytes} bytes: {stats}");
    let gets_before = stats["store"]["gets"].as_u64().unwrap();
    assert!(gets_before > 0, "{stats}");

    // Reading the warmed files sends no ranged GET.
    let target = tempfile::tempdir_in("/var/tmp").unwrap();
    run_ok(chalk(&garage, &url, reader_home.path()).args(["volume", "get", "v", "src/d"]).arg(target.path().join("d")));
    assert!(std::fs::read(target.path().join("d/one")).unwrap() == data);
    let stats = json(&run_ok(chalk(&garage, &url, reader_home.path()).args(["cache", "stats", "--json"])));
    assert_eq!(stats["store"]["gets"].as_u64().unwrap(), gets_before, "reading warmed files fetched blocks: {stats}");
    assert!(stats["disk"]["hits"].as_u64().unwrap() > 0, "{stats}");
}

// ---------------------------------------------------------------------------
// The fault-injecting proxy
// ---------------------------------------------------------------------------

/// What the proxy does to the requests that pass through it.
#[derive(Clone, Debug, Default)]
struct FaultPlan {
    /// Seed of the random draws of `fault_per_mille`.
    seed: u64,
    /// Share of requests, per 1000, that get one of the random faults.
    fault_per_mille: u64,
    /// The next this many responses with a body have one byte of it flipped.
    damage_bodies: u64,
    /// Every connection is closed at once, as if nothing listened.
    refuse_all: bool,
    /// Every request is read and gets no response.
    hang_all: bool,
    /// Every request whose target contains this has its connection closed
    /// without a response, as if the store stopped responding after the
    /// requests before it.
    close_paths_containing: Option<&'static str>,
}

impl FaultPlan {
    fn flaky(seed: u64, fault_per_mille: u64) -> Self {
        FaultPlan { seed, fault_per_mille, ..FaultPlan::default() }
    }
}

/// A fault drawn for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Respond 503 without forwarding.
    ServerError,
    /// Close the connection without forwarding.
    CutBefore,
    /// Forward, then close the connection instead of responding, so the
    /// request took effect but the client never learns it.
    CutAfter,
    /// Wait before forwarding.
    Delay,
    /// Forward and flip one byte of the response body.
    DamageBody,
    /// Forward and send only part of the response body, then close.
    Truncate,
}

struct ProxyState {
    plan: FaultPlan,
    rng: StdRng,
    damaged: u64,
    faults: u64,
    methods: BTreeMap<String, u64>,
}

/// An HTTP/1.1 proxy on 127.0.0.1 in front of one S3 server. It forwards
/// the `Host` header as the client sent it, which the client signed.
struct FaultProxy {
    port: u16,
    state: Arc<Mutex<ProxyState>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    fn start(server: &Server) -> FaultProxy {
        let upstream = server.endpoint.endpoint_url.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ProxyState {
            plan: FaultPlan::default(),
            rng: StdRng::seed_from_u64(0),
            damaged: 0,
            faults: 0,
            methods: BTreeMap::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_state, thread_stop) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if thread_stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let (state, upstream, stop) = (thread_state.clone(), upstream.clone(), thread_stop.clone());
                std::thread::spawn(move || serve_connection(client, &upstream, &state, &stop));
            }
        });
        FaultProxy { port, state, stop }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set(&self, plan: FaultPlan) {
        let mut state = self.state.lock().unwrap();
        state.rng = StdRng::seed_from_u64(plan.seed);
        state.plan = plan;
        state.damaged = 0;
    }

    fn damaged(&self) -> u64 {
        self.state.lock().unwrap().damaged
    }

    fn faults(&self) -> u64 {
        self.state.lock().unwrap().faults
    }

    fn requests_with_method(&self, method: &str) -> u64 {
        self.state.lock().unwrap().methods.get(method).copied().unwrap_or(0)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it checks the stop flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// An HTTP message head and body as read from a socket.
struct Message {
    head: Vec<u8>,
    body: Vec<u8>,
    start_line: String,
    close: bool,
}

/// Reads one message. `bodyless` is set for responses to HEAD. Returns
/// `None` when the peer closed the connection before a message began.
fn read_message(reader: &mut BufReader<TcpStream>, bodyless: bool) -> std::io::Result<Option<Message>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return if head.is_empty() { Ok(None) } else { Err(std::io::ErrorKind::UnexpectedEof.into()) };
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let start_line = text.lines().next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        text.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    };
    let status: Option<u16> = start_line.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)?.parse().ok());
    let no_body = bodyless || matches!(status, Some(204 | 304) | Some(100..=199));
    let mut body = Vec::new();
    if !no_body {
        if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            // Keep the chunked framing as it is, reading up to the last chunk.
            loop {
                let mut size_line = Vec::new();
                reader.read_until(b'\n', &mut size_line)?;
                body.extend_from_slice(&size_line);
                let size_text = String::from_utf8_lossy(&size_line);
                let size = usize::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
                let mut chunk = vec![0u8; size + 2];
                reader.read_exact(&mut chunk)?;
                body.extend_from_slice(&chunk);
                if size == 0 {
                    break;
                }
            }
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(len, 0);
            reader.read_exact(&mut body)?;
        }
    }
    let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    Ok(Some(Message { head, body, start_line, close }))
}

fn draw_fault(state: &mut ProxyState) -> Option<Fault> {
    if state.plan.fault_per_mille == 0 || state.rng.gen_range(0..1000) >= state.plan.fault_per_mille {
        return None;
    }
    let all = [Fault::ServerError, Fault::CutBefore, Fault::CutAfter, Fault::Delay, Fault::DamageBody, Fault::Truncate];
    Some(all[state.rng.gen_range(0..all.len())])
}

fn serve_connection(client: TcpStream, upstream_addr: &str, state: &Mutex<ProxyState>, stop: &AtomicBool) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    let mut client_writer = client.try_clone().unwrap();
    let mut client_reader = BufReader::new(client);
    let mut upstream: Option<(TcpStream, BufReader<TcpStream>)> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if state.lock().unwrap().plan.refuse_all {
            let _ = client_writer.shutdown(Shutdown::Both);
            return;
        }
        let Ok(Some(request)) = read_message(&mut client_reader, false) else { return };
        let mut words = request.start_line.split(' ');
        let method = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or_default().to_owned();
        // Damage goes only into object downloads, which checksums protect; a
        // damaged listing is the transport's to catch (TLS in production).
        let object_get = method == "GET" && !target.contains("list-type=") && !target.contains("uploads");
        let (fault, plan) = {
            let mut state = state.lock().unwrap();
            *state.methods.entry(method.clone()).or_default() += 1;
            let fault = draw_fault(&mut state);
            if fault.is_some() {
                state.faults += 1;
            }
            (fault, state.plan.clone())
        };
        let closed = plan.close_paths_containing.is_some_and(|part| target.contains(part));
        if plan.refuse_all || closed {
            let _ = client_writer.shutdown(Shutdown::Both);
            return;
        }
        if plan.hang_all {
            // Hold the request until the plan changes or the client gives up.
            while state.lock().unwrap().plan.hang_all && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = client_writer.shutdown(Shutdown::Both);
            return;
        }
        match fault {
            Some(Fault::ServerError) => {
                let body = b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>";
                let head = format!("HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nContent-Type: application/xml\r\n\r\n", body.len());
                if client_writer.write_all(head.as_bytes()).and_then(|()| client_writer.write_all(body)).is_err() {
                    return;
                }
                continue;
            }
            Some(Fault::CutBefore) => {
                let _ = client_writer.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Delay) => std::thread::sleep(Duration::from_millis(300)),
            _ => {}
        }

        if upstream.is_none() {
            let Ok(stream) = TcpStream::connect(upstream_addr) else {
                let _ = client_writer.shutdown(Shutdown::Both);
                return;
            };
            let reader = BufReader::new(stream.try_clone().unwrap());
            upstream = Some((stream, reader));
        }
        let (upstream_writer, upstream_reader) = upstream.as_mut().unwrap();
        if upstream_writer.write_all(&request.head).and_then(|()| upstream_writer.write_all(&request.body)).is_err() {
            let _ = client_writer.shutdown(Shutdown::Both);
            return;
        }
        let Ok(Some(mut response)) = read_message(upstream_reader, method == "HEAD") else {
            let _ = client_writer.shutdown(Shutdown::Both);
            return;
        };

        let has_body = !response.body.is_empty();
        let damage = has_body && object_get && {
            let mut state = state.lock().unwrap();
            let planned = state.damaged < state.plan.damage_bodies;
            if planned {
                state.damaged += 1;
            }
            planned || fault == Some(Fault::DamageBody)
        };
        if damage {
            let at = response.body.len() / 2;
            response.body[at] ^= 0x20;
        }
        match fault {
            Some(Fault::CutAfter) => {
                let _ = client_writer.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Truncate) if has_body => {
                let keep = response.body.len() / 3;
                let _ = client_writer.write_all(&response.head);
                let _ = client_writer.write_all(&response.body[..keep]);
                let _ = client_writer.shutdown(Shutdown::Both);
                return;
            }
            _ => {}
        }
        if client_writer.write_all(&response.head).and_then(|()| client_writer.write_all(&response.body)).is_err() {
            return;
        }
        if response.close || request.start_line.is_empty() {
            return;
        }
    }
}
