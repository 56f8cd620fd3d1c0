//! `chalk volume mount --metrics`: a real mount serving Prometheus metrics
//! on 127.0.0.1, scraped before and after the test writes, syncs and reads,
//! so each counter is checked against the bytes the test moved.
//!
//! Like `mount_posix.rs`, the tests run the built `chalk` binary (`CHALK_BIN`,
//! or the newer of `target/release/chalk` and `target/debug/chalk`), need
//! root or FUSE permissions, and unmount every mount when its guard drops.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const MOUNT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    [target.join("release/chalk"), target.join("debug/chalk")]
        .into_iter()
        .filter_map(|path| Some((fs::metadata(&path).ok()?.modified().ok()?, path)))
        .max()
        .map(|(_, path)| path)
        .expect("chalk binary not found; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN")
}

/// A private store: its own `CHALK_HOME` under /var/tmp (the engine uses O_DIRECT).
struct Store {
    home: TempDir,
}

impl Store {
    fn new() -> Store {
        let home = tempfile::Builder::new().prefix("chalk-metrics-home-").tempdir_in("/var/tmp").unwrap();
        Store { home }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(chalk_binary())
            .args(args)
            .env("CHALK_HOME", self.home.path())
            .env_remove("CHALK_STORE")
            .stdin(Stdio::null())
            .output()
            .expect("running chalk")
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "chalk {args:?} failed with {}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Mounts `volume` with `--daemon` and `extra` arguments, returning the
    /// guard before checking the result so that a failed check still unmounts.
    fn mount(&self, volume: &str, extra: &[&str]) -> (Mount, Output) {
        let dir = tempfile::Builder::new().prefix("chalk-metrics-mnt-").tempdir_in("/var/tmp").unwrap();
        let path = dir.path().to_str().unwrap().to_owned();
        let mut args = vec!["volume", "mount", volume, path.as_str(), "--daemon"];
        args.extend_from_slice(extra);
        let mut mount = Mount { dir, pid: None };
        let output = self.run(&args);
        mount.pid = self.mount_pid(mount.dir.path());
        (mount, output)
    }

    /// Pid of the process serving the mount at `dir`, from its registration.
    fn mount_pid(&self, dir: &Path) -> Option<u32> {
        let dir = fs::canonicalize(dir).ok()?;
        fs::read_dir(self.home.path().join("run"))
            .ok()?
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "json"))
            .filter_map(|entry| serde_json::from_slice::<serde_json::Value>(&fs::read(entry.path()).ok()?).ok())
            .find(|registration| registration["dir"].as_str().map(PathBuf::from) == Some(dir.clone()))
            .and_then(|registration| registration["pid"].as_u64())
            .map(|pid| pid as u32)
    }
}

/// A mount made by a test; dropping it unmounts and waits for its process.
struct Mount {
    dir: TempDir,
    pid: Option<u32>,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let path = self.dir.path();
        if is_mounted(path) {
            let unmounted = Command::new("fusermount3").arg("-u").arg(path).stderr(Stdio::null()).status();
            if !matches!(unmounted, Ok(status) if status.success()) || is_mounted(path) {
                let _ = Command::new("umount").arg("-l").arg(path).stderr(Stdio::null()).status();
            }
        }
        let Some(pid) = self.pid else { return };
        let deadline = Instant::now() + MOUNT_EXIT_TIMEOUT;
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            eprintln!("mount process {pid} did not exit after unmount; killing it");
            // SAFETY: kill has no memory effects; the pid is the mount process this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rfind(')').map(|end| stat[end + 1..].trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn is_mounted(path: &Path) -> bool {
    let Ok(path) = fs::canonicalize(path) else { return false };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo.lines().filter_map(|line| line.split(' ').nth(4)).any(|mount_point| Path::new(mount_point) == path)
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Sends `GET path` to 127.0.0.1:`port` and returns the status code and body.
fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("connecting to metrics port {port}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no header end in {response:?}"));
    let status = head.split_whitespace().nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_owned())
}

/// Value of the sample whose name and labels are exactly `series`, or 0
/// when the scrape has no such sample.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap_or_else(|_| panic!("{series} has a non-numeric value {value:?}")))
        .next()
        .unwrap_or(0.0)
}

/// Bytes that differ from file to file and block to block.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn mount_counters_match_test_io() {
    let store = Store::new();
    store.run_ok(&["volume", "create", "vol"]);
    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let (mount, output) = store.mount("vol", &["--metrics", &address]);
    assert!(output.status.success(), "mount failed: {}", String::from_utf8_lossy(&output.stderr));
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(summary.contains(&format!("metrics at http://{address}/metrics")), "{summary}");

    let (status, before) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{before}");
    assert!(before.ends_with("# EOF\n"), "{before}");
    let labels = "volume=\"vol\",lineage=\"main\"";
    let read_series = format!("chalk_read_bytes_total{{{labels}}}");
    let written_series = format!("chalk_written_bytes_total{{{labels}}}");
    let published_series = format!("chalk_sync_published_bytes_total{{{labels}}}");
    let syncs_series = format!("chalk_sync_duration_seconds_count{{{labels},outcome=\"published\"}}");
    assert_eq!(sample(&before, &written_series), 0.0);

    // Two files in several write requests each (the kernel splits at 1 MiB at most).
    let sizes = [3_000_001usize, 70_000];
    let mut total = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        fs::write(mount.dir.path().join(format!("file-{i}")), pattern(*size, i as u64)).unwrap();
        total += *size as u64;
    }
    store.run_ok(&["volume", "sync", mount.dir.path().to_str().unwrap()]);

    // A writable mount opens files without FOPEN_KEEP_CACHE, so each read below reaches the daemon.
    let mut read_total = 0u64;
    for (i, size) in sizes.iter().enumerate() {
        let bytes = fs::read(mount.dir.path().join(format!("file-{i}"))).unwrap();
        assert_eq!(bytes, pattern(*size, i as u64), "file-{i} read back wrong");
        read_total += bytes.len() as u64;
    }

    let (status, after) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&after, &written_series), total as f64, "{after}");
    assert_eq!(sample(&after, &read_series), read_total as f64, "{after}");
    assert_eq!(sample(&after, &syncs_series), 1.0, "{after}");
    let published = sample(&after, &published_series);
    assert!(published >= total as f64, "published {published} bytes, wrote {total}");
    // Segments hold record headers and block padding, not much more than the data.
    assert!(published < (total * 2) as f64, "published {published} bytes, wrote {total}");
    assert!(sample(&after, "chalk_object_store_requests_total{operation=\"put_file\"}") >= 1.0, "{after}");

    for op in ["create", "write", "read", "lookup", "getattr"] {
        let count = sample(&after, &format!("chalk_fuse_operation_duration_seconds_count{{{labels},op=\"{op}\"}}"));
        assert!(count >= 1.0, "no {op} requests counted:\n{after}");
    }
    let writes = sample(&after, &format!("chalk_fuse_operation_duration_seconds_count{{{labels},op=\"write\"}}"));
    assert!(writes >= sizes.len() as f64, "{writes} write requests for {} files", sizes.len());
    let reads = sample(&after, &format!("chalk_fuse_operation_duration_seconds_count{{{labels},op=\"read\"}}"));
    let reads_in_last_bucket = sample(&after, &format!("chalk_fuse_operation_duration_seconds_bucket{{le=\"+Inf\",{labels},op=\"read\"}}"));
    assert_eq!(reads_in_last_bucket, reads, "{after}");
    for tier in ["memory", "disk"] {
        assert!(after.contains(&format!("chalk_cache_hits_total{{tier=\"{tier}\"}}")), "{after}");
        assert!(after.contains(&format!("chalk_cache_misses_total{{tier=\"{tier}\"}}")), "{after}");
    }

    let (status, body) = http_get(port, "/other");
    assert_eq!(status, 404, "{body}");
    drop(mount);
}

#[test]
fn non_loopback_address_is_rejected() {
    let store = Store::new();
    store.run_ok(&["volume", "create", "vol"]);
    for address in ["0.0.0.0:9464", "192.0.2.1:9464"] {
        let (mount, output) = store.mount("vol", &["--metrics", address]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "mount with --metrics {address} succeeded");
        assert!(stderr.contains(&format!("--metrics address {address} is not a loopback address")), "{stderr}");
        assert!(!is_mounted(mount.dir.path()), "a mount was left at {}", mount.dir.path().display());
    }
}

#[test]
fn metrics_port_in_use_fails_mount() {
    let store = Store::new();
    store.run_ok(&["volume", "create", "vol"]);
    let occupied = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = occupied.local_addr().unwrap().to_string();
    let (mount, output) = store.mount("vol", &["--metrics", &address]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mount on a taken metrics port succeeded");
    assert!(stderr.contains(&format!("failed to listen on --metrics address {address}")), "{stderr}");
    assert!(!is_mounted(mount.dir.path()));
}

#[test]
fn passthrough_copy_is_not_counted_as_read() {
    let store = Store::new();
    store.run_ok(&["volume", "create", "vol"]);
    // Above the 1 MiB passthrough threshold, so opening it copies it into a backing file.
    let large = pattern(8 * 1024 * 1024 + 4_321, 1);
    let small = pattern(64 * 1024, 2);
    let input = tempfile::Builder::new().prefix("chalk-metrics-input-").tempdir_in("/var/tmp").unwrap();
    fs::write(input.path().join("large.bin"), &large).unwrap();
    fs::write(input.path().join("small.bin"), &small).unwrap();
    store.run_ok(&["volume", "put", "vol", input.path().to_str().unwrap(), "data"]);
    let versions: serde_json::Value = serde_json::from_str(&store.run_ok(&["volume", "versions", "vol", "--json"])).unwrap();
    let version = versions.as_array().and_then(|list| list.last()).and_then(|v| v["id"].as_str()).unwrap().to_owned();

    let port = free_port();
    let address = format!("127.0.0.1:{port}");
    let (mount, output) = store.mount("vol", &["--version", &version, "--metrics", &address]);
    assert!(output.status.success(), "mount failed: {}", String::from_utf8_lossy(&output.stderr));
    let read_series = "chalk_read_bytes_total{volume=\"vol\",lineage=\"main\"}";

    // Open without reading: the mount copies the whole file for passthrough.
    let opened = fs::File::open(mount.dir.path().join("data/large.bin")).unwrap();
    let backing_dir = store.home.path().join("cache/passthrough").join(&version);
    let backing: Vec<u64> = fs::read_dir(&backing_dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", backing_dir.display()))
        .map(|entry| entry.unwrap().metadata().unwrap().len())
        .collect();
    assert_eq!(backing, vec![large.len() as u64], "the open did not copy the file into one backing file");
    let (status, after_open) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{after_open}");
    assert!(after_open.contains(read_series), "{after_open}");
    assert_eq!(sample(&after_open, read_series), 0.0, "the passthrough copy counted as bytes read:\n{after_open}");
    drop(opened);

    // A small file takes the normal read path, and its bytes count.
    let bytes = fs::read(mount.dir.path().join("data/small.bin")).unwrap();
    assert!(bytes == small, "small.bin read back wrong");
    let (_, after_read) = http_get(port, "/metrics");
    assert_eq!(sample(&after_read, read_series), small.len() as f64, "{after_read}");
    drop(mount);
}
