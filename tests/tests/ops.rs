//! Operator tools through the real `chalk` binary: fsck names damaged
//! segments and repairs the local cache, reads of damaged bytes fail with
//! EIO, gc stops on an unreadable checkpoint, frees a deleted volume, and
//! never deletes what a concurrent put publishes.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    [target.join("release/chalk"), target.join("debug/chalk")]
        .into_iter()
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
        .expect("chalk binary not found; build it with `cargo build --release -p chalk-tools` or set CHALK_BIN")
}

/// A store with its own local root and a separate object store directory.
struct Env {
    home: TempDir,
    objects: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            home: tempfile::Builder::new().prefix("chalk-ops-home-").tempdir_in("/var/tmp").unwrap(),
            objects: tempfile::Builder::new().prefix("chalk-ops-objects-").tempdir_in("/var/tmp").unwrap(),
        }
    }

    fn run_in(&self, home: &Path, args: &[&str]) -> Output {
        Command::new(chalk_binary())
            .env("CHALK_HOME", home)
            .env("CHALK_STORE", format!("file://{}", self.objects.path().display()))
            .env_remove("CHALK_LOG")
            .args(args)
            .output()
            .expect("running chalk")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_in(self.home.path(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "chalk {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn put_file(&self, volume: &str, name: &str, data: &[u8]) -> String {
        let input = self.home.path().join(format!("input-{}", name.replace('/', "_")));
        fs::write(&input, data).unwrap();
        let out = self.ok(&["volume", "put", volume, input.to_str().unwrap(), name]);
        out.trim().rsplit(' ').next().unwrap().to_owned()
    }

    fn object_keys(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        walk(self.objects.path(), self.objects.path(), &mut out);
        out
    }

    fn segment_of(&self, volume: &str, path: &str) -> String {
        let json: serde_json::Value = serde_json::from_str(&self.ok(&["inspect", "path", volume, path, "--json"])).unwrap();
        json["extents"][0]["segment"].as_str().unwrap().to_owned()
    }
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != ".tmp") {
                walk(root, &path, out);
            }
        } else {
            out.insert(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// Damages the copy at `path` alone: the damaged bytes go to a new file that
/// replaces it. With the store on the same file system, a cached segment and
/// its object are hard links to one file, which an in-place write would
/// damage in both places.
fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x04;
    let damaged = path.with_extension("damaged");
    fs::write(&damaged, &bytes).unwrap();
    fs::rename(&damaged, path).unwrap();
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let unmounted = Command::new("fusermount3").arg("-u").arg(&self.0).stderr(Stdio::null()).status();
        if !unmounted.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).stderr(Stdio::null()).status();
        }
    }
}

fn fsck_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("fsck --json output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn local_flip_fails_reads_and_repair_restores() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    let version = env.put_file("v", "data.bin", &data);
    let segment = env.segment_of("v", "data.bin");
    assert!(env.ok(&["fsck"]).contains("the store is whole"));

    let local = env.home.path().join(format!("cache/segments/{segment}.seg"));
    flip(&local, 300_000);
    let out = env.run(&["fsck", "v", "--json"]);
    assert!(!out.status.success(), "fsck passed a damaged local segment");
    let report = fsck_json(&out);
    let problem = &report["problems"][0];
    assert_eq!(problem["segment"], segment.as_str());
    assert_eq!(problem["copy"], "local");
    assert_eq!(problem["path"], "data.bin");
    assert!(problem["offset"].as_u64().unwrap() <= 300_000);
    assert!(problem["affected_versions"].as_array().unwrap().iter().any(|v| v == version.as_str()), "{problem}");

    // The mount returns EIO, never the wrong bytes.
    let mnt = env.home.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["volume", "mount", "v", mnt.to_str().unwrap(), "--read-only", "--daemon"]);
    let guard = MountGuard(mnt.clone());
    let err = fs::read(mnt.join("data.bin")).expect_err("read through the mount returned corrupt bytes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    env.ok(&["volume", "unmount", mnt.to_str().unwrap()]);
    drop(guard);

    let out = env.ok(&["fsck", "v", "--repair"]);
    assert!(out.contains("REPAIRED"), "{out}");
    assert!(out.contains("the store is whole"), "{out}");
    assert!(env.ok(&["fsck", "v"]).contains("the store is whole"));
    let got = env.home.path().join("got.bin");
    env.ok(&["volume", "get", "v", "data.bin", got.to_str().unwrap()]);
    assert_eq!(fs::read(&got).unwrap(), data);
}

#[test]
fn remote_flip_is_found_by_deep_fsck() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let data = vec![5u8; 400_000];
    let first = env.put_file("v", "a.bin", &data);
    let second = env.put_file("v", "b.bin", b"small");
    let segment = env.segment_of("v", "a.bin");
    flip(&env.objects.path().join(format!("volumes/v/segments/{segment}.seg")), 200_000);

    // A second host: an empty local root on the same object store.
    let other = tempfile::Builder::new().prefix("chalk-ops-other-").tempdir_in("/var/tmp").unwrap();
    let out = env.run_in(other.path(), &["fsck", "v", "--deep", "--json"]);
    assert!(!out.status.success(), "deep fsck passed a damaged remote segment");
    let report = fsck_json(&out);
    let problems = report["problems"].as_array().unwrap();
    let problem = problems.iter().find(|p| p["kind"] == "corrupt-record").expect("no corrupt-record problem");
    assert_eq!(problem["segment"], segment.as_str());
    assert_eq!(problem["copy"], "remote");
    assert!(problem["offset"].as_u64().unwrap() <= 200_000);
    let affected: Vec<&str> = problem["affected_versions"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(affected.contains(&first.as_str()), "{affected:?}");
    assert!(affected.contains(&second.as_str()), "{affected:?}");

    let got = other.path().join("got.bin");
    let out = env.run_in(other.path(), &["volume", "get", "v", "a.bin", got.to_str().unwrap()]);
    assert!(!out.status.success(), "get returned bytes of a damaged remote segment");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&segment));
    assert!(!got.exists(), "a partial download was left behind");

    // The object store is never rewritten, so repair cannot make the store whole.
    let out = env.run_in(other.path(), &["fsck", "v", "--deep", "--repair"]);
    assert!(!out.status.success(), "repair claimed to fix the object store's copy");
}

#[test]
fn missing_remote_segment_lists_broken_versions() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let first = env.put_file("v", "a.bin", &[1u8; 10_000]);
    let second = env.put_file("v", "b.bin", &[2u8; 10_000]);
    let segment = env.segment_of("v", "a.bin");
    fs::remove_file(env.objects.path().join(format!("volumes/v/segments/{segment}.seg"))).unwrap();

    let out = env.run(&["fsck", "v"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("missing-segment"), "{text}");
    assert!(text.contains(&segment), "{text}");
    assert!(text.contains(&first), "first broken version not listed: {text}");
    assert!(text.contains(&second), "second broken version not listed: {text}");
}

#[test]
fn gc_with_unreadable_checkpoint_deletes_nothing() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    env.put_file("v", "a", b"one");
    env.put_file("v", "b", b"two");
    let head = env.put_file("v", "c", b"three");
    flip(&env.objects.path().join(format!("volumes/v/checkpoints/{head}")), 18);
    let before = env.object_keys();
    let out = env.run(&["gc", "v", "--keep-last", "1", "--grace", "0"]);
    assert!(!out.status.success(), "gc succeeded with an unreadable checkpoint");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stopped before deleting anything"), "{stderr}");
    assert_eq!(env.object_keys(), before, "gc deleted objects");
}

#[test]
fn delete_then_gc_frees_the_volume() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    env.ok(&["volume", "create", "other"]);
    env.put_file("v", "big.bin", &vec![3u8; 500_000]);
    env.put_file("other", "keep.bin", b"keep");
    let out = env.ok(&["volume", "delete", "v"]);
    assert!(out.contains("chalk gc v"), "delete does not say how to free the objects: {out}");
    assert!(env.object_keys().iter().any(|k| k.starts_with("volumes/v/segments/")));

    let dry = env.ok(&["gc", "v", "--grace", "0", "--dry-run"]);
    assert!(dry.contains("would delete"), "{dry}");
    assert!(env.object_keys().iter().any(|k| k.starts_with("volumes/v/")), "dry run deleted objects");
    env.ok(&["gc", "v", "--grace", "0"]);
    let left: Vec<String> = env.object_keys().into_iter().filter(|k| k.starts_with("volumes/v/")).collect();
    assert!(left.is_empty(), "gc left objects of the deleted volume: {left:?}");
    let got = env.home.path().join("keep.out");
    env.ok(&["volume", "get", "other", "keep.bin", got.to_str().unwrap()]);
    assert_eq!(fs::read(&got).unwrap(), b"keep");
}

#[test]
fn gc_racing_puts_loses_nothing() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let objects = env.objects.path().to_owned();
    let home = env.home.path().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let out = Command::new(chalk_binary())
                    .env("CHALK_HOME", &home)
                    .env("CHALK_STORE", format!("file://{}", objects.display()))
                    .args(["gc", "v", "--keep-last", "1", "--grace", "0"])
                    .output()
                    .unwrap();
                assert!(out.status.success(), "gc failed: {}", String::from_utf8_lossy(&out.stderr));
                runs += 1;
            }
            runs
        })
    };
    for round in 0..25 {
        let data = format!("round {round}\n").repeat(2000 + round);
        env.put_file("v", "same.txt", data.as_bytes());
        env.put_file("v", &format!("dir/f{round}.txt"), data.as_bytes());
        let got = env.home.path().join("got.txt");
        env.ok(&["volume", "get", "v", "same.txt", got.to_str().unwrap()]);
        assert_eq!(fs::read(&got).unwrap(), data.as_bytes(), "round {round} read other bytes");
        fs::remove_file(&got).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = collector.join().unwrap();
    assert!(runs > 3, "gc ran only {runs} times");
    for round in 0..25 {
        let data = format!("round {round}\n").repeat(2000 + round);
        let got = env.home.path().join(format!("f{round}.txt"));
        env.ok(&["volume", "get", "v", &format!("dir/f{round}.txt"), got.to_str().unwrap()]);
        assert_eq!(fs::read(&got).unwrap(), data.as_bytes());
    }
    let out = env.ok(&["fsck", "v", "--deep"]);
    assert!(out.contains("the store is whole"), "{out}");
}

#[test]
fn gc_compact_keeps_content_identical() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let dir = env.home.path().join("tree");
    fs::create_dir(&dir).unwrap();
    let x: Vec<u8> = (0..300_000u32).map(|i| (i % 211) as u8).collect();
    let y: Vec<u8> = (0..300_000u32).map(|i| (i % 199) as u8).collect();
    fs::write(dir.join("x"), &x).unwrap();
    fs::write(dir.join("y"), &y).unwrap();
    env.ok(&["volume", "put", "v", dir.to_str().unwrap(), "d"]);
    let head = env.put_file("v", "d/x", b"tiny");

    let out = env.ok(&["gc", "v", "--keep-last", "1", "--grace", "0", "--compact", "--compact-threshold", "0.6"]);
    assert!(out.contains("compacted lineage main"), "{out}");
    let versions: serde_json::Value = serde_json::from_str(&env.ok(&["volume", "versions", "v", "--json"])).unwrap();
    let last = versions.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["message"], format!("compaction of {head}").as_str());
    for version in [head.as_str(), last["id"].as_str().unwrap()] {
        let got = env.home.path().join(format!("y-{version}"));
        env.ok(&["volume", "get", "v", "d/y", got.to_str().unwrap(), "--version", version]);
        assert_eq!(fs::read(&got).unwrap(), y, "d/y differs in version {version}");
        let got = env.home.path().join(format!("x-{version}"));
        env.ok(&["volume", "get", "v", "d/x", got.to_str().unwrap(), "--version", version]);
        assert_eq!(fs::read(&got).unwrap(), b"tiny", "d/x differs in version {version}");
    }
    assert!(env.ok(&["fsck", "v", "--deep"]).contains("the store is whole"));
}

#[test]
fn gc_of_unknown_volume_fails() {
    let env = Env::new();
    let out = env.run(&["gc", "no-such-volume"]);
    assert!(!out.status.success(), "gc of a volume without objects succeeded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-volume"), "{stderr}");
    assert!(stderr.contains("not found"), "{stderr}");
}
