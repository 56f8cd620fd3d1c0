//! POSIX behaviour of a real FUSE mount served by the `chalk` binary.
//!
//! Each test creates its own store (`CHALK_HOME` in a temporary directory
//! under /var/tmp, because the engine writes with O_DIRECT, which tmpfs
//! rejects), creates a volume, mounts it with `chalk volume mount --daemon`
//! and checks one behaviour on the mount point. Every mount is unmounted when
//! its guard drops, so a failing test leaves no mount behind.
//!
//! The tests build nothing: they run the binary named by `CHALK_BIN`, or the
//! newer of `target/release/chalk` and `target/debug/chalk`. Build it first
//! with `cargo build -p chalk-tools`. They need root (or FUSE permissions for
//! the user) and `fusermount3`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use tempfile::TempDir;

const GIB: u64 = 1024 * 1024 * 1024;

/// How long a mount guard waits for the mount process to exit after
/// unmounting before it kills the process.
const MOUNT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// Path of the `chalk` binary under test.
fn chalk_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CHALK_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "CHALK_BIN={} is not a file", path.display());
        return path;
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent directory");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace.join("target"), PathBuf::from);
    let candidates = [target.join("release/chalk"), target.join("debug/chalk")];
    candidates
        .iter()
        .filter_map(|path| Some((fs::metadata(path).ok()?.modified().ok()?, path.clone())))
        .max()
        .map(|(_, path)| path)
        .unwrap_or_else(|| {
            panic!(
                "chalk binary not found at {} or {}; build it with `cargo build -p chalk-tools` or set CHALK_BIN",
                candidates[0].display(),
                candidates[1].display()
            )
        })
}

/// A private store: its own `CHALK_HOME` in a temporary directory.
struct Store {
    binary: PathBuf,
    home: TempDir,
}

impl Store {
    fn new() -> Store {
        let home = tempfile::Builder::new()
            .prefix("chalk-test-home-")
            .tempdir_in("/var/tmp")
            .expect("creating a temporary CHALK_HOME under /var/tmp");
        Store { binary: chalk_binary(), home }
    }

    fn home(&self) -> &Path {
        self.home.path()
    }

    /// Runs `chalk ARGS` against this store and returns its output.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .args(args)
            .env("CHALK_HOME", self.home())
            .env_remove("CHALK_STORE")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?}: {e}", self.binary.display()))
    }

    /// Runs `chalk ARGS`, asserts that it succeeded and returns its stdout.
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

    fn create_volume(&self, volume: &str) {
        self.run_ok(&["volume", "create", volume]);
    }

    /// Mounts `volume` on a new temporary directory with `--daemon` and any
    /// `extra` arguments (`--read-only`, `--version ID`).
    fn mount(&self, volume: &str, extra: &[&str]) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("chalk-test-mnt-")
            .tempdir_in("/var/tmp")
            .expect("creating a temporary mount point under /var/tmp");
        let path = dir.path().to_str().expect("temporary paths are UTF-8").to_owned();
        let mut args = vec!["volume", "mount", volume, path.as_str(), "--daemon"];
        args.extend_from_slice(extra);
        let mut mount = Mount { dir, pid: None };
        // The guard exists before the command runs, so even a mount that
        // half-succeeded is unmounted if the assertion below fails.
        self.run_ok(&args);
        mount.pid = self.mount_pid(mount.path());
        assert!(is_mounted(mount.path()), "{} is not a mount point after `chalk volume mount`", mount.path().display());
        mount
    }

    /// Pid of the process serving the mount at `dir`, from its registration.
    fn mount_pid(&self, dir: &Path) -> Option<u32> {
        self.registration(dir).and_then(|registration| registration["pid"].as_u64()).map(|pid| pid as u32)
    }

    /// Registration JSON of the mount at `dir` under `$CHALK_HOME/run/`.
    fn registration(&self, dir: &Path) -> Option<serde_json::Value> {
        let dir = fs::canonicalize(dir).ok()?;
        let entries = fs::read_dir(self.home().join("run")).ok()?;
        entries
            .filter_map(Result::ok)
            .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "json"))
            .filter_map(|entry| serde_json::from_slice::<serde_json::Value>(&fs::read(entry.path()).ok()?).ok())
            .find(|registration| registration["dir"].as_str().map(PathBuf::from) == Some(dir.clone()))
    }

    /// Runs `chalk volume sync TARGET` and returns the version id it printed.
    fn sync(&self, target: &Path) -> String {
        let stdout = self.run_ok(&["volume", "sync", target.to_str().expect("temporary paths are UTF-8")]);
        let id = stdout.split_whitespace().last().unwrap_or_default().to_owned();
        assert_eq!(id.len(), 26, "`chalk volume sync` printed {stdout:?}, expected a 26-character version id");
        id
    }

    /// Unmounts with `chalk volume unmount` and asserts that it succeeded.
    fn unmount(&self, mount: Mount) {
        self.run_ok(&["volume", "unmount", mount.path().to_str().expect("temporary paths are UTF-8")]);
        assert!(!is_mounted(mount.path()), "{} is still mounted after `chalk volume unmount`", mount.path().display());
    }
}

/// A mount made by a test. Dropping it unmounts (`fusermount3 -u`, then
/// `umount -l`) and waits for the mount process, killing it if it hangs.
struct Mount {
    dir: TempDir,
    pid: Option<u32>,
}

impl Mount {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
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
        let Some(pid) = self.pid else {
            return;
        };
        let deadline = Instant::now() + MOUNT_EXIT_TIMEOUT;
        while process_running(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if process_running(pid) {
            eprintln!("mount process {pid} did not exit after unmount; killing it");
            // SAFETY: kill has no memory effects; the pid is the mount
            // process this test started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Returns whether `path` is a mount point in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let Ok(path) = fs::canonicalize(path).or_else(|_| std::path::absolute(path)) else {
        return false;
    };
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
    // Field 5 is the mount point; the temporary paths used here contain no
    // characters that mountinfo escapes.
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount_point| Path::new(mount_point) == path)
}

/// Returns whether `pid` exists and is not a zombie waiting for init to reap it.
fn process_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Creates a fresh store with volume `vol` and mounts it writable.
fn writable_mount() -> (Store, Mount) {
    let store = Store::new();
    store.create_volume("vol");
    let mount = store.mount("vol", &[]);
    (store, mount)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths contain no NUL bytes")
}

/// Returns the errno of the last failed libc call.
fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (from, to) = (c_path(from), c_path(to));
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let status = unsafe { libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), flags) };
    if status == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------
// Regular files
// ---------------------------------------------------------------------------

#[test]
fn random_writes_read_back() {
    let (_store, mount) = writable_mount();
    let path = mount.join("random.bin");
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; 0];
    for _ in 0..200 {
        let offset = rng.gen_range(0..4 * 1024 * 1024usize);
        let len = rng.gen_range(1..256 * 1024usize);
        let mut data = vec![0u8; len];
        rng.fill(&mut data[..]);
        file.write_all_at(&data, offset as u64).unwrap();
        if model.len() < offset + len {
            model.resize(offset + len, 0);
        }
        model[offset..offset + len].copy_from_slice(&data);
    }
    drop(file);

    let read_back = fs::read(&path).unwrap();
    assert_eq!(read_back.len(), model.len(), "file size after random writes");
    let first_difference = read_back.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "first offset where the file differs from the written data");
}

#[test]
fn truncate_grows_and_shrinks() {
    let (_store, mount) = writable_mount();
    let path = mount.join("t.bin");
    fs::write(&path, vec![0xabu8; 100]).unwrap();

    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(10).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 10, "size after ftruncate to 10");
    assert_eq!(fs::read(&path).unwrap(), vec![0xabu8; 10], "content kept below the new size");

    let c_path = c_path(&path);
    // SAFETY: the path is NUL-terminated and outlives the call.
    let status = unsafe { libc::truncate(c_path.as_ptr(), 1024 * 1024) };
    assert_eq!(status, 0, "truncate(2) to 1 MiB failed with errno {}", last_errno());
    let content = fs::read(&path).unwrap();
    assert_eq!(content.len(), 1024 * 1024, "size after truncate to 1 MiB");
    assert_eq!(&content[..10], &[0xabu8; 10], "content below the old size after growing");
    assert!(content[10..].iter().all(|&b| b == 0), "bytes beyond the old size read as zero after growing");

    // Shrinking and growing again must not resurrect the cut bytes.
    file.set_len(5).unwrap();
    file.set_len(10).unwrap();
    assert_eq!(fs::read(&path).unwrap(), [&[0xabu8; 5][..], &[0u8; 5][..]].concat(), "cut bytes read as zero");
}

#[test]
fn sparse_hole_reads_zero() {
    let (_store, mount) = writable_mount();
    let path = mount.join("sparse.bin");
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    file.write_all_at(b"start", 0).unwrap();
    file.write_all_at(b"end", 10 * 1024 * 1024).unwrap();

    assert_eq!(file.metadata().unwrap().len(), 10 * 1024 * 1024 + 3, "size of the sparse file");
    let mut hole = vec![0xffu8; 1024 * 1024];
    file.read_exact_at(&mut hole, 4 * 1024 * 1024).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "hole in the middle reads as zeros");
    let mut edge = [0u8; 8];
    file.read_exact_at(&mut edge, 0).unwrap();
    assert_eq!(&edge, b"start\0\0\0", "data then hole at the start");
}

#[test]
fn append_writes_at_end_of_file() {
    let (_store, mount) = writable_mount();
    let path = mount.join("log.txt");
    fs::write(&path, b"first\n").unwrap();

    let mut appender = OpenOptions::new().append(true).open(&path).unwrap();
    let mut other = OpenOptions::new().append(true).open(&path).unwrap();
    appender.write_all(b"second\n").unwrap();
    other.write_all(b"third\n").unwrap();
    // Seeking does not move O_APPEND writes away from the end.
    appender.seek(SeekFrom::Start(0)).unwrap();
    appender.write_all(b"fourth\n").unwrap();

    assert_eq!(fs::read_to_string(&path).unwrap(), "first\nsecond\nthird\nfourth\n");
}

#[test]
fn offset_beyond_4gib_round_trips() {
    let (_store, mount) = writable_mount();
    let path = mount.join("large.bin");
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    let offset = 5 * GIB + 3;
    file.write_all_at(b"beyond four GiB", offset).unwrap();

    assert_eq!(file.metadata().unwrap().len(), offset + 15, "size after a write at 5 GiB + 3");
    let mut read_back = [0u8; 15];
    file.read_exact_at(&mut read_back, offset).unwrap();
    assert_eq!(&read_back, b"beyond four GiB");
    let mut below = [0xffu8; 16];
    file.read_exact_at(&mut below, 4 * GIB).unwrap();
    assert_eq!(below, [0u8; 16], "hole at exactly 4 GiB reads as zeros");
}

#[test]
fn unlinked_file_stays_readable_through_open_descriptor() {
    let (_store, mount) = writable_mount();
    let path = mount.join("doomed.txt");
    fs::write(&path, b"still here").unwrap();
    let mut file = File::open(&path).unwrap();

    fs::remove_file(&path).unwrap();
    assert!(!path.exists(), "the name is gone after unlink");
    let mut content = String::new();
    file.read_to_string(&mut content).unwrap();
    assert_eq!(content, "still here");
    assert_eq!(file.metadata().unwrap().nlink(), 0, "fstat of an unlinked file reports no links");
}

#[test]
fn shared_mmap_writes_are_read_back() {
    let (_store, mount) = writable_mount();
    let path = mount.join("mapped.bin");
    let len = 3 * 4096usize;
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    file.set_len(len as u64).unwrap();

    // SAFETY: a new shared mapping of an open file descriptor, used only
    // within this block and unmapped before the descriptor closes.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap MAP_SHARED failed with errno {}", last_errno());
        let bytes = std::slice::from_raw_parts_mut(map.cast::<u8>(), len);
        bytes[..5].copy_from_slice(b"hello");
        bytes[len - 5..].copy_from_slice(b"world");
        assert_eq!(libc::msync(map, len, libc::MS_SYNC), 0, "msync failed with errno {}", last_errno());
        assert_eq!(libc::munmap(map, len), 0, "munmap failed with errno {}", last_errno());
    }
    drop(file);

    let content = fs::read(&path).unwrap();
    assert_eq!(content.len(), len, "size after writing through the mapping");
    assert_eq!(&content[..5], b"hello");
    assert_eq!(&content[len - 5..], b"world");
    assert!(content[5..len - 5].iter().all(|&b| b == 0), "untouched mapped bytes stay zero");
}

#[test]
fn fsync_succeeds_after_writes() {
    let (_store, mount) = writable_mount();
    let path = mount.join("durable.txt");
    let mut file = File::create(&path).unwrap();
    file.write_all(b"durable").unwrap();
    file.sync_all().unwrap();
    file.sync_data().unwrap();
    let directory = File::open(mount.path()).unwrap();
    directory.sync_all().unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"durable");
}

// ---------------------------------------------------------------------------
// Directories, names and links
// ---------------------------------------------------------------------------

#[test]
fn mkdir_readdir_and_rmdir() {
    let (_store, mount) = writable_mount();
    let dir = mount.join("d");
    fs::create_dir(&dir).unwrap();
    fs::create_dir(dir.join("sub")).unwrap();
    for name in ["b.txt", "a.txt", "c.txt"] {
        fs::write(dir.join(name), name).unwrap();
    }

    let mut names: Vec<String> =
        fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["a.txt", "b.txt", "c.txt", "sub"]);
    assert_eq!(fs::metadata(&dir).unwrap().nlink(), 3, "a directory with one subdirectory has 3 links");

    let error = fs::remove_dir(&dir).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOTEMPTY), "rmdir of a non-empty directory");
    fs::remove_dir(dir.join("sub")).unwrap();
    for name in ["a.txt", "b.txt", "c.txt"] {
        fs::remove_file(dir.join(name)).unwrap();
    }
    fs::remove_dir(&dir).unwrap();
    assert!(!dir.exists(), "directory is gone after rmdir");
}

#[test]
fn readdir_lists_many_entries() {
    let (_store, mount) = writable_mount();
    let dir = mount.join("many");
    fs::create_dir(&dir).unwrap();
    // Enough entries to need several readdir replies.
    let count = 2000;
    for i in 0..count {
        File::create(dir.join(format!("file-{i:05}-with-a-longer-name"))).unwrap();
    }
    let mut names: Vec<String> =
        fs::read_dir(&dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let expected: Vec<String> = (0..count).map(|i| format!("file-{i:05}-with-a-longer-name")).collect();
    assert_eq!(names, expected);
}

#[test]
fn rename_replaces_existing_file() {
    let (_store, mount) = writable_mount();
    let (source, target) = (mount.join("new.txt"), mount.join("current.txt"));
    fs::write(&source, b"new").unwrap();
    fs::write(&target, b"old").unwrap();

    fs::rename(&source, &target).unwrap();
    assert!(!source.exists(), "source name is gone after rename");
    assert_eq!(fs::read(&target).unwrap(), b"new", "target has the source's content");
}

#[test]
fn rename_noreplace_rejects_existing_target() {
    let (_store, mount) = writable_mount();
    let (source, target) = (mount.join("a.txt"), mount.join("b.txt"));
    fs::write(&source, b"a").unwrap();
    fs::write(&target, b"b").unwrap();

    let error = renameat2(&source, &target, libc::RENAME_NOREPLACE).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EEXIST), "RENAME_NOREPLACE onto an existing name");
    assert_eq!(fs::read(&source).unwrap(), b"a", "source unchanged");
    assert_eq!(fs::read(&target).unwrap(), b"b", "target unchanged");

    let free = mount.join("c.txt");
    renameat2(&source, &free, libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(&free).unwrap(), b"a", "RENAME_NOREPLACE onto a free name moves the file");
}

#[test]
fn rename_exchange_swaps_files() {
    let (_store, mount) = writable_mount();
    let dir = mount.join("d");
    fs::create_dir(&dir).unwrap();
    let (first, second) = (mount.join("file"), dir.join("other"));
    fs::write(&first, b"one").unwrap();
    fs::write(&second, b"two").unwrap();

    renameat2(&first, &second, libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(&first).unwrap(), b"two");
    assert_eq!(fs::read(&second).unwrap(), b"one");

    let missing = mount.join("missing");
    let error = renameat2(&first, &missing, libc::RENAME_EXCHANGE).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "RENAME_EXCHANGE with a missing target");
}

#[test]
fn hard_links_share_content_and_count_links() {
    let (_store, mount) = writable_mount();
    let (original, link) = (mount.join("original"), mount.join("link"));
    fs::write(&original, b"shared").unwrap();

    fs::hard_link(&original, &link).unwrap();
    let (a, b) = (fs::metadata(&original).unwrap(), fs::metadata(&link).unwrap());
    assert_eq!(a.ino(), b.ino(), "both names refer to one inode");
    assert_eq!(a.nlink(), 2, "nlink of the original after link");
    assert_eq!(b.nlink(), 2, "nlink of the new name after link");

    OpenOptions::new().append(true).open(&link).unwrap().write_all(b" data").unwrap();
    assert_eq!(fs::read(&original).unwrap(), b"shared data", "a write through one name shows through the other");

    fs::remove_file(&original).unwrap();
    assert_eq!(fs::metadata(&link).unwrap().nlink(), 1, "nlink after unlinking one name");
    assert_eq!(fs::read(&link).unwrap(), b"shared data");
}

#[test]
fn symlinks_resolve_and_read_back() {
    let (_store, mount) = writable_mount();
    fs::create_dir(mount.join("dir")).unwrap();
    fs::write(mount.join("dir/target.txt"), b"pointed at").unwrap();
    let link = mount.join("link");

    std::os::unix::fs::symlink("dir/target.txt", &link).unwrap();
    assert_eq!(fs::read_link(&link).unwrap(), Path::new("dir/target.txt"), "readlink returns the target as given");
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "lstat reports a symlink");
    assert_eq!(fs::read(&link).unwrap(), b"pointed at", "opening the link opens the target");

    let dangling = mount.join("dangling");
    std::os::unix::fs::symlink("nowhere", &dangling).unwrap();
    let error = fs::read(&dangling).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::ENOENT), "opening a dangling symlink");
}

#[test]
fn special_nodes_survive_sync() {
    let (store, mount) = writable_mount();
    let fifo = c_path(&mount.join("fifo"));
    let device = c_path(&mount.join("null-copy"));
    let device_number = libc::makedev(1, 3);
    // SAFETY: both paths are NUL-terminated and outlive the calls.
    unsafe {
        assert_eq!(libc::mkfifo(fifo.as_ptr(), 0o640), 0, "mkfifo: {}", io::Error::last_os_error());
        assert_eq!(libc::mknod(device.as_ptr(), libc::S_IFCHR | 0o600, device_number), 0, "mknod: {}", io::Error::last_os_error());
    }
    store.sync(mount.path());
    store.unmount(mount);

    let remount = store.mount("vol", &[]);
    let fifo_meta = fs::symlink_metadata(remount.join("fifo")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo_meta.file_type()), "fifo kind after remount");
    assert_eq!(fifo_meta.mode() & 0o7777, 0o640);
    let device_meta = fs::symlink_metadata(remount.join("null-copy")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&device_meta.file_type()), "device kind after remount");
    assert_eq!(device_meta.rdev(), device_number, "device number after remount");
}

// ---------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------

#[test]
fn chmod_changes_permission_bits() {
    let (_store, mount) = writable_mount();
    let path = mount.join("mode.txt");
    fs::write(&path, b"x").unwrap();

    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o4755, "setuid bit is stored");
}

#[test]
fn chown_changes_owner_and_group() {
    let (_store, mount) = writable_mount();
    let path = mount.join("owned.txt");
    fs::write(&path, b"x").unwrap();

    std::os::unix::fs::chown(&path, Some(1234), Some(5678)).unwrap();
    let metadata = fs::metadata(&path).unwrap();
    assert_eq!(metadata.uid(), 1234);
    assert_eq!(metadata.gid(), 5678);
}

#[test]
fn utimens_sets_only_mtime() {
    let (_store, mount) = writable_mount();
    let path = mount.join("times.txt");
    fs::write(&path, b"x").unwrap();
    let before = fs::metadata(&path).unwrap();

    let times = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        libc::timespec { tv_sec: 1_000_000_000, tv_nsec: 123_456_789 },
    ];
    let c_path = c_path(&path);
    // SAFETY: the path is NUL-terminated and `times` contains two timespecs,
    // both outliving the call.
    let status = unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), times.as_ptr(), 0) };
    assert_eq!(status, 0, "utimensat failed with errno {}", last_errno());

    let after = fs::metadata(&path).unwrap();
    assert_eq!((after.mtime(), after.mtime_nsec()), (1_000_000_000, 123_456_789), "mtime set to the requested time");
    assert_eq!((after.atime(), after.atime_nsec()), (before.atime(), before.atime_nsec()), "atime left alone");

    let now = [
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
    ];
    // SAFETY: as above.
    let status = unsafe { libc::utimensat(libc::AT_FDCWD, c_path.as_ptr(), now.as_ptr(), 0) };
    assert_eq!(status, 0, "utimensat with UTIME_NOW failed with errno {}", last_errno());
    let latest = fs::metadata(&path).unwrap();
    assert!(latest.atime() >= before.atime(), "atime moved to now");
    assert_eq!(latest.mtime(), 1_000_000_000, "mtime left alone by an atime-only change");
}

#[test]
fn xattrs_set_get_list_remove() {
    let (_store, mount) = writable_mount();
    let path = mount.join("attrs.txt");
    fs::write(&path, b"x").unwrap();
    let c_path = c_path(&path);
    let name = CString::new("user.colour").unwrap();
    let other = CString::new("user.size").unwrap();

    // SAFETY: the path, names and buffers passed to every call below are
    // valid for the lengths passed and outlive each call.
    unsafe {
        assert_eq!(libc::setxattr(c_path.as_ptr(), name.as_ptr(), b"blue".as_ptr().cast(), 4, 0), 0, "setxattr: errno {}", last_errno());
        assert_eq!(libc::setxattr(c_path.as_ptr(), other.as_ptr(), b"9".as_ptr().cast(), 1, 0), 0, "setxattr: errno {}", last_errno());

        let size = libc::getxattr(c_path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0);
        assert_eq!(size, 4, "size probe of getxattr");
        let mut small = [0u8; 2];
        let status = libc::getxattr(c_path.as_ptr(), name.as_ptr(), small.as_mut_ptr().cast(), small.len());
        assert_eq!((status, last_errno()), (-1, libc::ERANGE), "getxattr into a too-small buffer");
        let mut value = [0u8; 16];
        let len = libc::getxattr(c_path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len());
        assert_eq!(&value[..len as usize], b"blue");

        let mut list = [0u8; 64];
        let len = libc::listxattr(c_path.as_ptr(), list.as_mut_ptr().cast(), list.len());
        assert!(len > 0, "listxattr failed with errno {}", last_errno());
        let mut names: Vec<&[u8]> = list[..len as usize].split(|&b| b == 0).filter(|n| !n.is_empty()).collect();
        names.sort();
        assert_eq!(names, [&b"user.colour"[..], &b"user.size"[..]]);

        let status = libc::setxattr(c_path.as_ptr(), name.as_ptr(), b"red".as_ptr().cast(), 3, libc::XATTR_CREATE);
        assert_eq!((status, last_errno()), (-1, libc::EEXIST), "XATTR_CREATE on an existing attribute");

        assert_eq!(libc::removexattr(c_path.as_ptr(), name.as_ptr()), 0, "removexattr: errno {}", last_errno());
        let status = libc::getxattr(c_path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len());
        assert_eq!((status, last_errno()), (-1, libc::ENODATA), "getxattr after removexattr");
    }
}

#[test]
fn statfs_reports_sizes() {
    let (_store, mount) = writable_mount();
    let c_path = c_path(mount.path());
    // SAFETY: statvfs writes only into `stats`, which is a valid statvfs.
    let stats = unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c_path.as_ptr(), &mut stats), 0, "statvfs failed with errno {}", last_errno());
        stats
    };
    assert_eq!(stats.f_namemax, 255, "maximum name length");
    assert!(stats.f_bsize > 0, "block size is reported");
    assert!(stats.f_blocks >= stats.f_bfree, "free blocks do not exceed total blocks");
}

// ---------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------

#[test]
fn flock_excludes_other_descriptions() {
    let (_store, mount) = writable_mount();
    let path = mount.join("lock");
    fs::write(&path, b"").unwrap();
    let (first, second) = (File::open(&path).unwrap(), File::open(&path).unwrap());

    // SAFETY: flock only reads the descriptors, which stay open for the
    // whole test.
    unsafe {
        assert_eq!(libc::flock(first.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0, "first flock: errno {}", last_errno());
        let status = libc::flock(second.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB);
        assert_eq!((status, last_errno()), (-1, libc::EWOULDBLOCK), "second exclusive flock while the first holds it");
        assert_eq!(libc::flock(first.as_raw_fd(), libc::LOCK_UN), 0);
        assert_eq!(libc::flock(second.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB), 0, "flock after unlock: errno {}", last_errno());
    }
}

#[test]
fn fcntl_ofd_lock_excludes_other_descriptions() {
    let (_store, mount) = writable_mount();
    let path = mount.join("lock");
    fs::write(&path, b"0123456789").unwrap();
    let (first, second) = (
        OpenOptions::new().read(true).write(true).open(&path).unwrap(),
        OpenOptions::new().read(true).write(true).open(&path).unwrap(),
    );
    // SAFETY: an all-zero flock is a valid value that is filled in below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 5;

    // SAFETY: the descriptors stay open and `lock` is a valid flock for
    // every fcntl call below.
    unsafe {
        assert_eq!(libc::fcntl(first.as_raw_fd(), libc::F_OFD_SETLK, &lock), 0, "first lock: errno {}", last_errno());
        let status = libc::fcntl(second.as_raw_fd(), libc::F_OFD_SETLK, &lock);
        assert_eq!(status, -1, "an overlapping write lock from another open file description succeeded");
        assert!(matches!(last_errno(), libc::EAGAIN | libc::EACCES), "errno of a conflicting lock: {}", last_errno());
        lock.l_start = 5;
        assert_eq!(libc::fcntl(second.as_raw_fd(), libc::F_OFD_SETLK, &lock), 0, "lock of a disjoint range: errno {}", last_errno());
    }
}

// ---------------------------------------------------------------------------
// Sessions: privacy, sync, discard and versions
// ---------------------------------------------------------------------------

#[test]
fn writes_stay_private_until_sync() {
    let store = Store::new();
    store.create_volume("vol");
    let writer = store.mount("vol", &[]);
    let other = store.mount("vol", &[]);

    fs::write(writer.join("note.txt"), b"hello").unwrap();
    assert!(!other.join("note.txt").exists(), "a second mount sees another mount's unsynced write");

    store.sync(writer.path());
    let fresh = store.mount("vol", &[]);
    assert_eq!(fs::read(fresh.join("note.txt")).unwrap(), b"hello", "a mount made after sync sees the synced file");
}

#[test]
fn synced_contents_survive_remount() {
    let store = Store::new();
    store.create_volume("vol");
    let writer = store.mount("vol", &[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut expected = vec![0u8; 8 * 1024 * 1024];
    rng.fill(&mut expected[..]);
    let path = writer.join("data.bin");
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    file.write_all_at(&expected, 0).unwrap();
    // Overwrite a range and cut the tail, so the synced file differs from
    // what any single write produced.
    let patch = vec![0x5au8; 300_000];
    file.write_all_at(&patch, 1_000_000).unwrap();
    expected[1_000_000..1_300_000].copy_from_slice(&patch);
    file.set_len(7 * 1024 * 1024 + 5).unwrap();
    expected.truncate(7 * 1024 * 1024 + 5);
    drop(file);

    store.sync(writer.path());
    store.unmount(writer);
    let reader = store.mount("vol", &["--read-only"]);
    let content = fs::read(reader.join("data.bin")).unwrap();
    assert_eq!(content.len(), expected.len(), "size after sync and remount");
    let first_difference = content.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "first offset that differs after sync and remount");
}

#[test]
fn sync_by_volume_name_publishes_each_writable_mount() {
    let store = Store::new();
    store.create_volume("vol");
    let changed = store.mount("vol", &[]);
    let idle = store.mount("vol", &[]);
    fs::write(changed.join("one.txt"), b"1").unwrap();

    let stdout = store.run_ok(&["volume", "sync", "vol"]);
    let lines: Vec<&str> = stdout.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "one line per writable mount, got {stdout:?}");
    assert!(lines.iter().any(|l| l.contains("nothing to publish")), "idle mount not reported: {stdout:?}");

    let fresh = store.mount("vol", &[]);
    assert!(fresh.join("one.txt").exists(), "changed mount's file after sync by volume name");
    drop(idle);
}

#[test]
fn sync_by_volume_name_rebases_disjoint_mounts() {
    let store = Store::new();
    store.create_volume("vol");
    let first = store.mount("vol", &[]);
    let second = store.mount("vol", &[]);
    fs::write(first.join("one.txt"), b"1").unwrap();
    fs::write(second.join("two.txt"), b"2").unwrap();

    let stdout = store.run_ok(&["volume", "sync", "vol"]);
    let lines: Vec<&str> = stdout.lines().filter(|line| !line.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "one version per writable mount, got {stdout:?}");

    let fresh = store.mount("vol", &[]);
    assert!(fresh.join("one.txt").exists(), "first mount's file after sync by volume name");
    assert!(fresh.join("two.txt").exists(), "second mount's file after the rebase");
}

#[test]
fn sync_of_overlapping_mounts_reports_conflict() {
    let store = Store::new();
    store.create_volume("vol");
    let first = store.mount("vol", &[]);
    let second = store.mount("vol", &[]);
    fs::write(first.join("same.txt"), b"first").unwrap();
    fs::write(second.join("same.txt"), b"second").unwrap();

    store.sync(first.path());
    let output = store.run(&["volume", "sync", second.path().to_str().unwrap()]);
    assert!(!output.status.success(), "overlapping sync reported success");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("same.txt"), "conflict does not name the path: {stderr}");
    assert_eq!(fs::read(second.join("same.txt")).unwrap(), b"second", "the conflicting mount lost its write");

    let forked = store.run_ok(&["volume", "sync", second.path().to_str().unwrap(), "--on-conflict", "fork"]);
    assert_eq!(forked.trim().len(), 26, "sync --on-conflict fork printed {forked:?}");
    let lineages = store.run_ok(&["volume", "lineages", "vol", "--json"]);
    let lineages: serde_json::Value = serde_json::from_str(&lineages).unwrap();
    assert_eq!(lineages.as_array().unwrap().len(), 2, "main and the fork: {lineages}");
}

#[test]
fn sync_without_live_mount_fails() {
    let store = Store::new();
    store.create_volume("vol");
    let output = store.run(&["volume", "sync", "vol"]);
    assert!(!output.status.success(), "sync with no live mount succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("vol"), "error names the volume: {stderr}");
}

#[test]
fn unsynced_writes_discarded_on_unmount() {
    let store = Store::new();
    store.create_volume("vol");
    let mount = store.mount("vol", &[]);
    fs::write(mount.join("kept.txt"), b"kept").unwrap();
    store.sync(mount.path());
    fs::write(mount.join("lost.txt"), b"lost").unwrap();
    store.unmount(mount);

    let remount = store.mount("vol", &[]);
    assert!(remount.join("kept.txt").exists(), "synced file survives the unmount");
    assert!(!remount.join("lost.txt").exists(), "unsynced file reached the volume");
}

#[test]
fn unsynced_writes_discarded_when_mount_process_is_killed() {
    let store = Store::new();
    store.create_volume("vol");
    let mount = store.mount("vol", &[]);
    fs::write(mount.join("lost.txt"), b"lost").unwrap();
    let pid = mount.pid.expect("registration of the mount names its pid");
    // SAFETY: kill has no memory effects; the pid is the mount process
    // this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    drop(mount);

    let remount = store.mount("vol", &[]);
    assert!(!remount.join("lost.txt").exists(), "a write of a killed mount reached the volume");
}

#[test]
fn mount_over_killed_mount_says_unmount() {
    let store = Store::new();
    store.create_volume("vol");
    let mut mount = store.mount("vol", &[]);
    let pid = mount.pid.expect("registration of the mount names its pid");
    // SAFETY: kill has no memory effects; the pid is the mount process
    // this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + MOUNT_EXIT_TIMEOUT;
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    let dir = mount.path().to_str().unwrap().to_owned();
    let output = store.run(&["volume", "mount", "vol", &dir, "--daemon"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "mounting over a dead mount succeeded: {stderr}");
    assert!(stderr.contains("mount process that has ended"), "{stderr}");
    assert!(stderr.contains(&format!("run `chalk volume unmount {dir}`")), "{stderr}");

    // The advice works: after it, the same directory mounts again. The
    // guard unmounts it at the end.
    store.run_ok(&["volume", "unmount", &dir]);
    store.run_ok(&["volume", "mount", "vol", &dir, "--daemon"]);
    mount.pid = store.mount_pid(mount.path());
    assert!(is_mounted(mount.path()), "{dir} is not a mount point after the advised unmount and a new mount");
}

#[test]
fn sigterm_unmounts_and_removes_registration() {
    let store = Store::new();
    store.create_volume("vol");
    let mount = store.mount("vol", &[]);
    let pid = mount.pid.expect("registration of the mount names its pid");
    let run_dir = store.home().join("run");
    assert!(run_dir.join(format!("mount-{pid}.sock")).exists(), "control socket while mounted");

    // SAFETY: kill has no memory effects; the pid is the mount process
    // this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + MOUNT_EXIT_TIMEOUT;
    while process_running(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!process_running(pid), "mount process still runs {} s after SIGTERM", MOUNT_EXIT_TIMEOUT.as_secs());
    assert!(!is_mounted(mount.path()), "mount point still mounted after SIGTERM");
    assert!(!run_dir.join(format!("mount-{pid}.json")).exists(), "registration file left after SIGTERM");
    assert!(!run_dir.join(format!("mount-{pid}.sock")).exists(), "control socket left after SIGTERM");
}

#[test]
fn version_mount_is_read_only() {
    let store = Store::new();
    store.create_volume("vol");
    let writer = store.mount("vol", &[]);
    fs::write(writer.join("data.txt"), b"v1").unwrap();
    let version = store.sync(writer.path());
    fs::write(writer.join("data.txt"), b"v2").unwrap();
    store.sync(writer.path());

    let pinned = store.mount("vol", &["--version", &version]);
    assert_eq!(fs::read(pinned.join("data.txt")).unwrap(), b"v1", "a version mount shows that version");
    let error = File::create(pinned.join("new.txt")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "creating a file in a version mount");
    let error = OpenOptions::new().write(true).open(pinned.join("data.txt")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "opening a file for writing in a version mount");
}

#[test]
fn read_only_mount_rejects_writes() {
    let store = Store::new();
    store.create_volume("vol");
    let mount = store.mount("vol", &["--read-only"]);
    let error = fs::create_dir(mount.join("d")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(libc::EROFS), "mkdir in a read-only mount");
}

#[test]
fn unmount_of_unknown_directory_fails() {
    let store = Store::new();
    let dir = tempfile::Builder::new().prefix("chalk-test-plain-").tempdir_in("/var/tmp").unwrap();
    let output = store.run(&["volume", "unmount", dir.path().to_str().unwrap()]);
    assert!(!output.status.success(), "unmount of a directory that is not mounted succeeded");
}
