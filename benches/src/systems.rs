//! The systems that the R and W workloads compare: the native directory, Chalk
//! read-only and writable mounts of a volume that holds the same files, and
//! the peers bindfs and rclone mounted over the native directory.
//!
//! Every mount is made for one measurement and unmounted afterwards. A
//! [`Mounted`] unmounts on drop, so a failed measurement leaves no mount behind.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::{is_mounted, Bench, MountGuard, System, VOLUME};

/// How long a peer's daemon may take before its mount shows in mountinfo.
const PEER_MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// Path inside the volume under which the dataset is put.
pub(crate) const DATASET_REMOTE_DIR: &str = "data";

/// The peers and the programs they need.
const PEER_PROGRAMS: [(System, &str); 3] = [
    (System::Bindfs, "bindfs"),
    (System::RcloneOff, "rclone"),
    (System::RcloneFull, "rclone"),
];

/// Returns whether `system` is a FUSE file system that is not Chalk.
pub(crate) fn is_peer(system: System) -> bool {
    matches!(system, System::Bindfs | System::RcloneOff | System::RcloneFull)
}

/// Finds which peers are installed. A missing peer is an error when `CI` is
/// set, because CI must compare every system; elsewhere it is skipped with a
/// warning on stderr.
pub(crate) fn available_peers() -> anyhow::Result<Vec<System>> {
    let in_ci = std::env::var_os("CI").is_some_and(|value| !value.is_empty());
    let mut available = Vec::new();
    for (system, program) in PEER_PROGRAMS {
        if program_exists(program) {
            available.push(system);
        } else if in_ci {
            bail!("{program} is not installed, so {} cannot run; run scripts/setup.sh", system.as_str());
        } else {
            eprintln!(
                "WARNING: {program} is not installed, so {} is SKIPPED in every workload; run scripts/setup.sh",
                system.as_str()
            );
        }
    }
    Ok(available)
}

fn program_exists(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// A system made ready for one measurement: `root` is the directory that
/// shows the dataset's files (`big.bin`, `files/`).
pub(crate) struct Mounted {
    pub root: PathBuf,
    /// `None` for the native directory.
    mount: Option<ActiveMount>,
}

struct ActiveMount {
    /// Declared before `guard`, so that it is removed after the unmount.
    guard: MountGuard,
    system: System,
    /// CHALK_HOME of a Chalk mount, for `chalk volume unmount`.
    home: Option<PathBuf>,
}

impl Mounted {
    /// Unmounts, reporting a failure, then removes the mount point. Dropping
    /// a `Mounted` without calling this still unmounts, through its guard.
    pub fn unmount(mut self, bench: &Bench) -> anyhow::Result<()> {
        let Some(active) = self.mount.take() else {
            return Ok(());
        };
        let dir = active.guard.dir.clone();
        match (&active.home, active.system) {
            (Some(home), _) => {
                bench
                    .chalk
                    .run(home, [OsStr::new("volume"), "unmount".as_ref(), dir.as_os_str()])?;
            }
            (None, system) => {
                let status = Command::new("fusermount3")
                    .arg("-u")
                    .arg(&dir)
                    .stdin(Stdio::null())
                    .status()
                    .context("failed to run fusermount3")?;
                ensure!(status.success(), "`fusermount3 -u {}` for {} failed with {status}", dir.display(), system.as_str());
            }
        }
        ensure!(!is_mounted(&dir)?, "{} is still mounted after unmounting it", dir.display());
        drop(active);
        fs::remove_dir(&dir).with_context(|| format!("failed to remove the mount point {}", dir.display()))
    }
}

/// Where the dataset lives natively and in the Chalk store.
pub(crate) struct DatasetLocation<'a> {
    /// Native directory with `big.bin` and `files/`.
    pub native: &'a Path,
    /// CHALK_HOME of the store whose volume holds the dataset under [`DATASET_REMOTE_DIR`].
    pub home: &'a Path,
    /// Version that `chalk volume put` created.
    pub version: &'a str,
}

/// Makes `system` ready and returns where it shows the dataset. `label`
/// names the mount point, which is created under the work directory.
pub(crate) fn mount_system(
    bench: &Bench,
    system: System,
    dataset: &DatasetLocation,
    label: &str,
) -> anyhow::Result<Mounted> {
    if system == System::Native {
        return Ok(Mounted { root: dataset.native.to_owned(), mount: None });
    }
    let dir = bench.work.join(format!("mnt-{label}-{}", system.as_str()));
    fs::create_dir(&dir).with_context(|| format!("failed to create the mount point {}", dir.display()))?;
    // The guard exists before the mount command runs, so that a mount that
    // half-succeeded is removed on every exit path.
    let mut active = ActiveMount { guard: MountGuard { dir: dir.clone() }, system, home: None };
    let root = match system {
        System::ChalkReadOnly | System::ChalkWritable => {
            let mut args = vec![OsStr::new("volume"), "mount".as_ref(), VOLUME.as_ref(), dir.as_os_str()];
            if system == System::ChalkReadOnly {
                args.extend([OsStr::new("--version"), dataset.version.as_ref()]);
            }
            args.push("--daemon".as_ref());
            active.home = Some(dataset.home.to_owned());
            bench.chalk.run(dataset.home, args)?;
            dir.join(DATASET_REMOTE_DIR)
        }
        System::Bindfs => {
            run_peer(bench, Command::new("bindfs").arg(dataset.native).arg(&dir), system)?;
            dir.clone()
        }
        System::RcloneOff | System::RcloneFull => {
            let mode = if system == System::RcloneOff { "off" } else { "full" };
            // rclone reads its config and cache from the run's directory only,
            // never from the user's home. A local path needs no remote.
            let config = bench.work.join("rclone.conf");
            if !config.exists() {
                fs::write(&config, "").with_context(|| format!("failed to create {}", config.display()))?;
            }
            let cache = bench.work.join(format!("rclone-cache-{mode}"));
            // Full mode uploads a closed file after --vfs-write-back (5 s by
            // default); 0 s makes R8 and W2 time the writes, not that wait.
            let write_back = if mode == "full" { "0s" } else { "5s" };
            run_peer(
                bench,
                Command::new("rclone")
                    .arg("mount")
                    .arg(dataset.native)
                    .arg(&dir)
                    .args(["--vfs-cache-mode", mode, "--vfs-write-back", write_back, "--daemon"])
                    .arg("--config")
                    .arg(&config)
                    .arg("--cache-dir")
                    .arg(&cache)
                    .arg("--log-file")
                    .arg(bench.work.join(format!("rclone-{mode}.log"))),
                system,
            )?;
            dir.clone()
        }
        System::Native | System::ChalkPut | System::S3RangedGet | System::ChalkColdS3 => {
            bail!("{} is not a system of the R and W workloads", system.as_str())
        }
    };
    wait_for_mount(&dir, system)?;
    Ok(Mounted { root, mount: Some(active) })
}

/// Runs a peer's mount command, which leaves a daemon behind. The daemon
/// inherits stdout and stderr, so they go to a file: a pipe would stay open
/// until the daemon exits.
fn run_peer(bench: &Bench, command: &mut Command, system: System) -> anyhow::Result<()> {
    let log_path = bench.work.join(format!("{}.out", system.as_str()));
    let log = fs::File::create(&log_path).with_context(|| format!("failed to create {}", log_path.display()))?;
    let log_for_stderr = log.try_clone().with_context(|| format!("failed to duplicate {}", log_path.display()))?;
    let status = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_for_stderr)
        .status()
        .with_context(|| format!("failed to start the {} mount", system.as_str()))?;
    if !status.success() {
        let output = fs::read_to_string(&log_path).unwrap_or_default();
        bail!("the {} mount failed with {status}: {}", system.as_str(), output.trim());
    }
    Ok(())
}

fn wait_for_mount(dir: &Path, system: System) -> anyhow::Result<()> {
    let start = Instant::now();
    while !is_mounted(dir)? {
        ensure!(
            start.elapsed() < PEER_MOUNT_TIMEOUT,
            "{} did not appear as a mount at {} within {} s",
            system.as_str(),
            dir.display(),
            PEER_MOUNT_TIMEOUT.as_secs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Writes back dirty pages and drops the page, dentry and inode caches, so
/// that the next read comes from disk. Needs root.
pub(crate) fn drop_caches() -> anyhow::Result<()> {
    nix::unistd::sync();
    fs::write("/proc/sys/vm/drop_caches", "3").context(
        "failed to write /proc/sys/vm/drop_caches, which the cold workloads R2 and R4 need; \
         run the harness as root or leave R2 and R4 out",
    )
}

/// Flushes the file system that contains `path` to disk (syncfs(2)).
pub(crate) fn sync_file_system(path: &Path) -> anyhow::Result<()> {
    let dir = fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir))
        .with_context(|| format!("syncfs of {} failed", path.display()))
}
