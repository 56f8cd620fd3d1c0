//! Reads of version mounts through FUSE passthrough and through the normal
//! read path, served by the `chalk` binary.
//!
//! Each test puts files into a new store under /var/tmp, mounts the version
//! with `chalk volume mount --version ID --daemon` and compares every byte
//! read through the mount with the bytes put. A guard unmounts on every
//! path. The tests need root: passthrough needs `CAP_SYS_ADMIN`, and a
//! kernel without passthrough (before Linux 6.9) fails the passthrough test
//! with the log line that reports it. They build nothing: they run the binary
//! named by `CHALK_BIN`, or `release/chalk` in the target directory.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Barrier};

use tempfile::TempDir;

/// Size of the large file: above the 1 MiB passthrough threshold and not a
/// multiple of the 1 MiB copy step, so the copy's last step is partial.
const LARGE_FILE_BYTES: usize = 5 * 1024 * 1024 + 12_345;
/// Size of the small file, which stays on the normal read path.
const SMALL_FILE_BYTES: usize = 64 * 1024;

/// Log line of the mount process when it copies a file for passthrough.
const COPIED_LOG: &str = "copied a file into the passthrough cache";
/// Start of the warning logged when the kernel rejects a backing file.
const REJECTED_LOG: &str = "registering a passthrough backing file failed";

fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHALK_BIN={} is not a file", path.display());
        return path;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let path = target.join("release/chalk");
    assert!(
        path.is_file(),
        "chalk binary not found at {}; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN",
        path.display()
    );
    path
}

/// Deterministic bytes that do not repeat within a file.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A store with one volume that contains `large.bin` and `small.bin` in one version.
struct Store {
    binary: PathBuf,
    home: TempDir,
    version: String,
    large: Vec<u8>,
    small: Vec<u8>,
}

impl Store {
    fn new() -> Store {
        let home = tempfile::Builder::new()
            .prefix("chalk-test-home-")
            .tempdir_in("/var/tmp")
            .expect("creating a temporary CHALK_HOME under /var/tmp");
        let input = tempfile::Builder::new()
            .prefix("chalk-test-input-")
            .tempdir_in("/var/tmp")
            .expect("creating a temporary input directory under /var/tmp");
        let large = pattern(LARGE_FILE_BYTES, 7);
        let small = pattern(SMALL_FILE_BYTES, 11);
        fs::write(input.path().join("large.bin"), &large).unwrap();
        fs::write(input.path().join("small.bin"), &small).unwrap();

        let mut store = Store { binary: chalk_binary(), home, version: String::new(), large, small };
        store.run_ok(&["volume", "create", "vol"], &[]);
        let input_path = input.path().to_str().expect("temporary paths are UTF-8");
        store.run_ok(&["volume", "put", "vol", input_path, "data"], &[]);
        let versions: serde_json::Value =
            serde_json::from_str(&store.run_ok(&["volume", "versions", "vol", "--json"], &[])).unwrap();
        store.version = versions.as_array().and_then(|list| list.last()).and_then(|v| v["id"].as_str()).unwrap().to_owned();
        store
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(&self.binary)
            .args(args)
            .env("CHALK_HOME", self.home.path())
            .env_remove("CHALK_STORE")
            .env_remove("CHALK_PASSTHROUGH")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", self.binary.display()))
    }

    fn run_ok(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let output = self.run(args, env);
        assert!(
            output.status.success(),
            "chalk {args:?} failed with {}\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Mounts the version with debug logs of the FUSE adaptor and the extra
    /// environment `env`.
    fn mount_version(&self, env: &[(&str, &str)]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("chalk-test-mnt-")
            .tempdir_in("/var/tmp")
            .expect("creating a temporary mount point under /var/tmp");
        let path = dir.path().to_str().expect("temporary paths are UTF-8").to_owned();
        // The guard exists before the command runs, so a mount that
        // half-succeeded is unmounted too.
        let mount = Mount { dir };
        let mut env = env.to_vec();
        env.push(("CHALK_LOG", "warn,chalk_fused=debug"));
        self.run_ok(&["volume", "mount", "vol", &path, "--version", &self.version, "--daemon"], &env);
        mount
    }

    /// Text of every mount process log of this store.
    fn mount_logs(&self) -> String {
        let mut text = String::new();
        for entry in fs::read_dir(self.home.path().join("logs")).expect("listing $CHALK_HOME/logs") {
            text.push_str(&fs::read_to_string(entry.unwrap().path()).unwrap_or_default());
        }
        text
    }

    /// Backing files in the passthrough cache of this store.
    fn backing_files(&self) -> Vec<PathBuf> {
        let cache = self.home.path().join("cache/passthrough").join(&self.version);
        match fs::read_dir(&cache) {
            Ok(entries) => entries.map(|entry| entry.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// A mount made by a test; dropping it unmounts.
struct Mount {
    dir: TempDir,
}

impl Mount {
    fn join(&self, path: &str) -> PathBuf {
        self.dir.path().join(path)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(self.dir.path()).stderr(Stdio::null()).status();
    }
}

/// Reads the whole file, then every 4 KiB block at scattered offsets, and
/// checks each read against `expected`.
fn check_reads(path: &Path, expected: &[u8]) {
    let whole = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(whole.len(), expected.len(), "length of {}", path.display());
    assert!(whole == expected, "contents of {} differ from the bytes put", path.display());

    let file = fs::File::open(path).unwrap();
    let mut block = [0u8; 4096];
    for step in 0..64u64 {
        let offset = (step * 7_919 * 4096 + step * 13) % (expected.len() as u64 - block.len() as u64);
        file.read_exact_at(&mut block, offset).unwrap();
        let start = offset as usize;
        assert!(block[..] == expected[start..start + block.len()], "4 KiB at offset {offset} of {} differ", path.display());
    }
}

#[test]
fn large_file_reads_through_passthrough() {
    let store = Store::new();
    let mount = store.mount_version(&[]);

    check_reads(&mount.join("data/large.bin"), &store.large);
    // A second open reuses the registered backing file.
    check_reads(&mount.join("data/large.bin"), &store.large);
    check_reads(&mount.join("data/small.bin"), &store.small);

    let logs = store.mount_logs();
    assert!(!logs.contains(REJECTED_LOG), "the kernel rejected the backing file:\n{logs}");
    assert!(logs.contains("granted=true"), "the kernel did not grant passthrough:\n{logs}");
    assert_eq!(logs.matches(COPIED_LOG).count(), 1, "the large file was not copied exactly once:\n{logs}");
    let backing = store.backing_files();
    assert_eq!(backing.len(), 1, "expected one backing file, found {backing:?}");
    assert_eq!(fs::read(&backing[0]).unwrap(), store.large, "the backing file differs from the file put");

    // `chalk cache stats` lists the copy as part of the disk tier.
    let stats: serde_json::Value = serde_json::from_str(&store.run_ok(&["cache", "stats", "--json"], &[])).unwrap();
    let disk = &stats["disk"];
    assert_eq!(disk["passthrough_files"], 1, "{stats}");
    assert!(disk["passthrough_bytes"].as_u64().unwrap() >= store.large.len() as u64, "{stats}");
    assert!(disk["bytes"].as_u64().unwrap() >= disk["passthrough_bytes"].as_u64().unwrap(), "{stats}");
    let text = store.run_ok(&["cache", "stats"], &[]);
    assert!(text.contains("in 1 passthrough copy"), "the text output does not list the copy:\n{text}");
}

#[test]
fn concurrent_first_opens_copy_once() {
    let store = Store::new();
    let mount = store.mount_version(&[]);
    let path = mount.join("data/large.bin");

    // Eight readers open the file at once on a fresh mount, so their opens
    // reach the mount while the first copy is still being made.
    let start = Arc::new(Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (path, start) = (path.clone(), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            })
        })
        .collect();
    for reader in readers {
        assert!(reader.join().unwrap() == store.large, "a concurrent reader got other bytes than were put");
    }

    let logs = store.mount_logs();
    assert_eq!(logs.matches(COPIED_LOG).count(), 1, "concurrent first opens copied the file more than once:\n{logs}");
}

#[test]
fn unfinished_copies_of_stopped_mounts_are_removed() {
    let store = Store::new();
    let version_dir = store.home.path().join("cache/passthrough").join(&store.version);
    fs::create_dir_all(&version_dir).unwrap();
    // A copy left by a mount process that has ended, and one that a running
    // process (this test) could still be writing.
    let mut ended = Command::new("true").spawn().unwrap();
    let ended_pid = ended.id();
    ended.wait().unwrap();
    let abandoned = version_dir.join(format!("7.{ended_pid}.1f.tmp"));
    let in_progress = version_dir.join(format!("7.{}.2e.tmp", std::process::id()));
    fs::write(&abandoned, b"half a copy").unwrap();
    fs::write(&in_progress, b"half a copy").unwrap();

    let _mount = store.mount_version(&[]);
    assert!(!abandoned.exists(), "the mount kept the unfinished copy of an ended process");
    assert!(in_progress.exists(), "the mount removed a copy that a running process owns");
    let logs = store.mount_logs();
    assert!(logs.contains("removed an unfinished passthrough copy"), "the removal was not logged:\n{logs}");
}

#[test]
fn large_file_reads_without_passthrough() {
    let store = Store::new();
    let mount = store.mount_version(&[("CHALK_PASSTHROUGH", "off")]);

    check_reads(&mount.join("data/large.bin"), &store.large);
    check_reads(&mount.join("data/small.bin"), &store.small);

    let logs = store.mount_logs();
    assert!(logs.contains("passthrough turned off"), "the switch was not logged:\n{logs}");
    assert!(!logs.contains(COPIED_LOG), "a file was copied although passthrough is off:\n{logs}");
    assert!(store.backing_files().is_empty(), "backing files exist although passthrough is off");
}

#[test]
fn backing_file_survives_remount() {
    let store = Store::new();
    let first = store.mount_version(&[]);
    check_reads(&first.join("data/large.bin"), &store.large);
    drop(first);

    let second = store.mount_version(&[]);
    check_reads(&second.join("data/large.bin"), &store.large);

    let logs = store.mount_logs();
    assert_eq!(logs.matches(COPIED_LOG).count(), 1, "the second mount copied the file again:\n{logs}");
}

/// Flips one byte of `path` in place.
fn flip_byte(path: &Path, offset: u64) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
}

#[test]
fn damaged_backing_file_is_never_served() {
    let store = Store::new();
    let first = store.mount_version(&[]);
    check_reads(&first.join("data/large.bin"), &store.large);
    drop(first);
    let backing = store.backing_files();
    assert_eq!(
        backing.len(),
        1,
        "expected one backing file, found {backing:?}"
    );
    flip_byte(&backing[0], 3 * 1024 * 1024 + 17);

    // fsck finds the damage and names the file.
    let output = store.run(&["fsck"], &[]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "fsck passed a damaged passthrough copy:\n{text}"
    );
    assert!(
        text.contains("damaged-passthrough-copy"),
        "fsck did not name the problem:\n{text}"
    );
    assert!(
        text.contains("data/large.bin"),
        "fsck did not name the file:\n{text}"
    );

    // A new mount checks the copy before it serves it, and copies the file again.
    let second = store.mount_version(&[]);
    check_reads(&second.join("data/large.bin"), &store.large);
    drop(second);
    let logs = store.mount_logs();
    assert!(
        logs.contains("passthrough copy is damaged"),
        "the mount did not report the damaged copy:\n{logs}"
    );
    assert_eq!(
        logs.matches(COPIED_LOG).count(),
        2,
        "the damaged copy was not replaced:\n{logs}"
    );
    assert_eq!(
        fs::read(&store.backing_files()[0]).unwrap(),
        store.large,
        "the new copy differs from the file put"
    );
    store.run_ok(&["fsck"], &[]);

    // fsck --repair removes a damaged copy, and fsck then passes.
    flip_byte(&store.backing_files()[0], 12);
    let output = store.run(&["fsck", "--repair"], &[]);
    assert!(
        output.status.success(),
        "fsck --repair did not repair the copy: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        store.backing_files().is_empty(),
        "fsck --repair left the damaged copy"
    );
    store.run_ok(&["fsck"], &[]);
}
