//! Contract points that need whole processes: an interrupted put publishes
//! nothing (atomic put), a synced version survives a killed mount and the
//! loss of the local disk (durability), and corrupt bytes are never returned
//! (integrity). Each test runs the real `chalk` binary on its own store.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A store with its own local root and, separately, its own object store
/// directory, so a test can throw the local root away.
struct Env {
    home: TempDir,
    objects: TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            home: tempfile::Builder::new().prefix("chalk-contract-home-").tempdir_in("/var/tmp").unwrap(),
            objects: tempfile::Builder::new().prefix("chalk-contract-objects-").tempdir_in("/var/tmp").unwrap(),
        }
    }

    fn command(&self, home: &Path) -> Command {
        let mut command = Command::new(chalk_binary());
        command
            .env("CHALK_HOME", home)
            .env("CHALK_STORE", format!("file://{}", self.objects.path().display()))
            .env_remove("CHALK_LOG");
        command
    }

    fn run_in(&self, home: &Path, args: &[&str]) -> Output {
        self.command(home).args(args).output().expect("running chalk")
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

    fn version_count(&self, volume: &str) -> usize {
        let json: serde_json::Value = serde_json::from_str(&self.ok(&["volume", "versions", volume, "--json"])).unwrap();
        json.as_array().unwrap().len()
    }
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

fn mount_pid(stdout: &str) -> i32 {
    let at = stdout.rfind("pid ").expect("mount output names the pid");
    stdout[at + 4..].trim_end_matches(|c: char| !c.is_ascii_digit()).parse().expect("pid is a number")
}

fn wait_for_exit(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn killed_put_publishes_nothing() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    // The put reads from a FIFO, so the test decides exactly when it is mid-way.
    let fifo = env.home.path().join("input.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    let mut put = env
        .command(env.home.path())
        .args(["volume", "put", "v"])
        .arg(&fifo)
        .arg("data/big.bin")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut writer = fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writer.write_all(&vec![42u8; 8 << 20]).unwrap();
    writer.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    put.kill().unwrap();
    assert!(wait_for_exit(&mut put, Duration::from_secs(10)), "killed put did not exit");
    drop(writer);

    assert_eq!(env.version_count("v"), 1, "an interrupted put published a version");
    let ls = env.ok(&["volume", "ls", "v", "--json"]);
    let entries: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(entries.as_array().unwrap().len(), 0, "partial tree visible: {ls}");
    let sessions: Vec<_> = fs::read_dir(env.home.path().join("sessions")).unwrap().collect();
    assert!(sessions.is_empty(), "the killed put's session was not discarded: {sessions:?}");
}

#[test]
fn synced_version_survives_killed_mount_and_lost_disk() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let mnt = env.home.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let stdout = env.ok(&["volume", "mount", "v", mnt.to_str().unwrap(), "--daemon"]);
    let guard = MountGuard(mnt.clone());
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 241) as u8).collect();
    fs::write(mnt.join("kept.bin"), &data).unwrap();
    env.ok(&["volume", "sync", mnt.to_str().unwrap()]);
    fs::write(mnt.join("unsynced.txt"), b"never published").unwrap();

    // SAFETY: kill sends a signal to the mount process this test started.
    assert_eq!(unsafe { libc::kill(mount_pid(&stdout), libc::SIGKILL) }, 0);
    std::thread::sleep(Duration::from_millis(200));
    drop(guard);

    // A new host: a fresh local root on the same object store.
    let fresh = tempfile::Builder::new().prefix("chalk-contract-fresh-").tempdir_in("/var/tmp").unwrap();
    let out = env.run_in(fresh.path(), &["volume", "get", "v", "kept.bin", fresh.path().join("got.bin").to_str().unwrap()]);
    assert!(out.status.success(), "get failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(fresh.path().join("got.bin")).unwrap(), data);
    let out = env.run_in(fresh.path(), &["volume", "get", "v", "unsynced.txt", fresh.path().join("u").to_str().unwrap()]);
    assert!(!out.status.success(), "unsynced write reached the volume");
}

#[test]
fn corrupt_segment_read_fails_with_eio() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let input = env.home.path().join("input.bin");
    fs::write(&input, vec![9u8; 1 << 20]).unwrap();
    env.ok(&["volume", "put", "v", input.to_str().unwrap(), "f.bin"]);
    let segments: Vec<PathBuf> = fs::read_dir(env.home.path().join("cache/segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "expected one cached segment: {segments:?}");
    let segment_id = segments[0].file_stem().unwrap().to_string_lossy().into_owned();
    let mut bytes = fs::read(&segments[0]).unwrap();
    bytes[512 * 1024] ^= 0x01;
    fs::write(&segments[0], &bytes).unwrap();

    let out = env.run(&["volume", "get", "v", "f.bin", env.home.path().join("got").to_str().unwrap()]);
    assert!(!out.status.success(), "get returned corrupt bytes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&segment_id), "error does not name segment {segment_id}: {stderr}");
    assert!(!env.home.path().join("got").exists(), "a partial download was left behind");

    let mnt = env.home.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["volume", "mount", "v", mnt.to_str().unwrap(), "--read-only", "--daemon"]);
    let _guard = MountGuard(mnt.clone());
    let err = fs::read(mnt.join("f.bin")).expect_err("read through the mount returned corrupt bytes");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let logs: String = fs::read_dir(env.home.path().join("logs"))
        .unwrap()
        .map(|e| fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(logs.contains(&segment_id), "mount log does not name segment {segment_id}: {logs}");
}

#[test]
fn dotdot_paths_are_rejected() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let input = env.home.path().join("input.txt");
    fs::write(&input, b"x").unwrap();
    for bad in ["../escape.txt", "a/../../b", "/.."] {
        let out = env.run(&["volume", "put", "v", input.to_str().unwrap(), bad]);
        assert!(!out.status.success(), "put to {bad} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("'..'"), "error for {bad} does not explain the rejection: {stderr}");
    }
    assert_eq!(env.version_count("v"), 1);
}

#[test]
fn pwrite_fallback_serves_cli_round_trip() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let input = env.home.path().join("input.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 199) as u8).collect();
    fs::write(&input, &data).unwrap();
    let out = env.command(env.home.path()).env("CHALK_IO", "pwrite").args(["volume", "put", "v"]).arg(&input).arg("f").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = env.home.path().join("got");
    env.ok(&["volume", "get", "v", "f", got.to_str().unwrap()]);
    assert_eq!(fs::read(got).unwrap(), data);
}

#[test]
fn unmount_refuses_other_file_systems() {
    let env = Env::new();
    let dir = env.home.path().join("tmpfs");
    fs::create_dir(&dir).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(&dir).status().unwrap();
    assert!(mounted.success(), "mounting a tmpfs for the test failed");
    let _guard = MountGuard(dir.clone());
    let out = env.run(&["volume", "unmount", dir.to_str().unwrap()]);
    assert!(!out.status.success(), "unmount of a tmpfs succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a chalk mount"));
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(mountinfo.contains(dir.to_str().unwrap()), "the tmpfs was unmounted");
}

#[test]
fn get_writes_through_devices_and_stdout() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let input = env.home.path().join("input.txt");
    fs::write(&input, b"payload").unwrap();
    env.ok(&["volume", "put", "v", input.to_str().unwrap(), "dir/"]);
    assert_eq!(env.ok(&["volume", "get", "v", "dir/input.txt", "-"]), "payload");
    env.ok(&["volume", "get", "v", "dir/input.txt", "/dev/null"]);
    let meta = fs::metadata("/dev/null").unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&meta.file_type()), "/dev/null was replaced");
}

#[test]
fn missing_store_directory_is_an_error() {
    let env = Env::new();
    let out = env
        .command(env.home.path())
        .env("CHALK_STORE", format!("file://{}/no-such-store", env.objects.path().display()))
        .args(["volume", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a missing CHALK_STORE directory was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("object store directory not found"));
    assert!(!env.objects.path().join("no-such-store").exists(), "the missing directory was created");
}

#[test]
fn delete_refuses_a_mounted_volume() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let mnt = env.home.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["volume", "mount", "v", mnt.to_str().unwrap(), "--daemon"]);
    let _guard = MountGuard(mnt.clone());
    let out = env.run(&["volume", "delete", "v"]);
    assert!(!out.status.success(), "a mounted volume was deleted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unmount it first"));
    env.ok(&["volume", "unmount", mnt.to_str().unwrap()]);
    let sessions: Vec<_> = fs::read_dir(env.home.path().join("sessions")).unwrap().collect();
    assert!(sessions.is_empty(), "unmount left the session directory: {sessions:?}");
    env.ok(&["volume", "delete", "v"]);
}

#[test]
fn cp_a_into_mount_keeps_modes() {
    let env = Env::new();
    env.ok(&["volume", "create", "v"]);
    let src = env.home.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("script.sh"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(src.join("script.sh"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mnt = env.home.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    env.ok(&["volume", "mount", "v", mnt.to_str().unwrap(), "--daemon"]);
    let _guard = MountGuard(mnt.clone());
    let copied = Command::new("cp").arg("-a").arg(&src).arg(mnt.join("copy")).status().unwrap();
    assert!(copied.success());
    let mode = std::os::unix::fs::PermissionsExt::mode(&fs::metadata(mnt.join("copy/script.sh")).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o755);
}
