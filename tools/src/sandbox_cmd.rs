//! `chalk sandbox run`: one command in a bubblewrap sandbox with volumes
//! mounted at `/volumes/<name>`, the shell form of the Python SDK's
//! `SandboxClient().create(...).exec(...)`.
//!
//! Each volume is mounted by a child `chalk volume mount` in the foreground,
//! which registers under `$CHALK_HOME/run/` and gets SIGTERM when this
//! process ends (`PR_SET_PDEATHSIG`), so its mount never outlives the run.
//! bwrap runs with `--die-with-parent`. The sandbox layout (tmpfs root, the
//! image's top-level directories bound read-only, `/volumes`, `/workspace`)
//! and the image cache are the SDK's, so both share one built image.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use chalk_engine::{Store, VolumeName};

/// Debian release of the `debian-slim` image.
const DEBIAN_SUITE: &str = "bookworm";
/// Top-level directories of an image that a sandbox gets fresh instead.
const OWN_DIRECTORIES: [&str; 7] = ["proc", "dev", "sys", "tmp", "run", "volumes", "lost+found"];

/// Options of one `chalk sandbox run`.
pub struct RunRequest {
    /// `NAME` or `NAME@VERSION` for each volume.
    pub volumes: Vec<String>,
    /// `debian-slim` or `host`.
    pub image: String,
    pub workdir: String,
    pub env: Vec<String>,
    pub network: bool,
    /// Publish each mount's writes after the command exits with status 0.
    pub sync: bool,
    pub command: Vec<String>,
}

/// Per-machine image cache, shared with the Python SDK.
fn image_cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CHALK_IMAGE_CACHE").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set CHALK_IMAGE_CACHE to a directory")?;
    Ok(PathBuf::from(home).join(".cache/chalk/images"))
}

/// Returns the root of `image`, building `debian-slim` with debootstrap the
/// first time. Falls back to the host root, with a warning, when it cannot be built.
fn image_root(image: &str) -> anyhow::Result<PathBuf> {
    match image {
        "host" => return Ok(PathBuf::from("/")),
        "debian-slim" => {}
        other => bail!("unknown image {other:?}; use debian-slim or host"),
    }
    let target = image_cache_dir()?.join(format!("debian-slim-{DEBIAN_SUITE}"));
    if target.join(".complete").exists() {
        return Ok(target.join("root"));
    }
    let parent = target.parent().expect("the cache path has a parent");
    fs::create_dir_all(parent).with_context(|| format!("creating {} failed", parent.display()))?;
    let building = parent.join(format!(".debian-slim-{}", std::process::id()));
    let _ = fs::remove_dir_all(&building);
    let mirror = std::env::var("CHALK_DEBIAN_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".to_owned());
    eprintln!("building the debian-slim image into {} with debootstrap (about 2 minutes)", target.display());
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3,python-is-python3", DEBIAN_SUITE])
        .arg(building.join("root"))
        .arg(&mirror)
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => {
            fs::write(building.join(".complete"), format!("debootstrap --variant=minbase {DEBIAN_SUITE} {mirror}\n"))?;
            let _ = fs::remove_dir_all(&target);
            fs::rename(&building, &target).with_context(|| format!("renaming {} failed", building.display()))?;
            Ok(target.join("root"))
        }
        outcome => {
            let _ = fs::remove_dir_all(&building);
            let reason = match outcome {
                Ok(status) => format!("debootstrap exited with {status}"),
                Err(err) => format!("running debootstrap failed: {err}; install it with `apt-get install debootstrap`"),
            };
            eprintln!("warning: {reason}; using the host root read-only instead of debian-slim");
            Ok(PathBuf::from("/"))
        }
    }
}

/// A `chalk volume mount` child serving one sandbox volume.
struct MountChild {
    child: Child,
    dir: PathBuf,
    name: String,
}

impl Drop for MountChild {
    fn drop(&mut self) {
        // SIGTERM makes the mount process unmount and discard unsynced writes.
        // SAFETY: kill with a pid this process spawned and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start_mount(volume: &str, dir: &Path) -> anyhow::Result<MountChild> {
    let (name, version) = match volume.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (volume, None),
    };
    VolumeName::new(name)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {} failed", dir.display()))?;
    let mut command = Command::new(std::env::current_exe().context("finding the chalk binary failed")?);
    command.args(["volume", "mount", name]).arg(dir);
    if let Some(version) = version {
        command.args(["--version", version, "--writable"]);
    }
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let mut child = command.spawn().context("starting chalk volume mount failed")?;
    // The foreground mount prints one summary line once it is mounted and registered.
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    BufReader::new(stdout).read_line(&mut line).context("reading from chalk volume mount failed")?;
    let mount = MountChild { child, dir: dir.to_owned(), name: name.to_owned() };
    if !line.starts_with("mounted volume") {
        bail!("mounting volume {volume} for the sandbox failed (see the error above)");
    }
    Ok(mount)
}

fn bwrap_command(root: &Path, mounts: &[MountChild], request: &RunRequest) -> anyhow::Result<Command> {
    let mut command = Command::new("bwrap");
    command.args(["--die-with-parent", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]);
    command.args(["--hostname", "sandbox", "--tmpfs", "/"]);
    if !request.network {
        command.arg("--unshare-net");
    }

    // The image: each top-level entry bound read-only on the tmpfs root.
    let mut entries: Vec<_> = fs::read_dir(root)
        .with_context(|| format!("listing image root {} failed", root.display()))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if OWN_DIRECTORIES.contains(&name.as_str()) {
            continue;
        }
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            command.arg("--symlink").arg(fs::read_link(&path)?).arg(format!("/{name}"));
        } else if meta.is_dir() || meta.is_file() {
            command.arg("--ro-bind").arg(&path).arg(format!("/{name}"));
        }
    }

    // The sandbox's own directories and the volume mounts.
    command.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--dir", "/volumes"]);
    for mount in mounts {
        command.arg("--bind").arg(&mount.dir).arg(format!("/volumes/{}", mount.name));
    }

    // The command, its directory and its environment.
    command.args(["--dir", &request.workdir, "--chdir", &request.workdir, "--clearenv"]);
    let mut variables = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        "HOME=/tmp".to_owned(),
        "LANG=C.UTF-8".to_owned(),
    ];
    variables.extend(request.env.iter().cloned());
    for variable in &variables {
        let Some((key, value)) = variable.split_once('=') else {
            bail!("invalid --env {variable:?}; write KEY=VALUE");
        };
        command.args(["--setenv", key, value]);
    }
    command.arg("--").args(&request.command);
    Ok(command)
}

/// Runs the command in a sandbox and returns its exit status (128 plus the
/// signal number when a signal ended it).
pub fn run(store: &Store, request: &RunRequest) -> anyhow::Result<i32> {
    if request.command.is_empty() {
        bail!("give the command after --, for example `chalk sandbox run --volume my-data -- ls /volumes/my-data`");
    }
    let root = image_root(&request.image)?;
    let id = format!("cli-{}", std::process::id());
    let sandbox_dir = store.local_root().join("sandboxes").join(&id);
    let result = (|| -> anyhow::Result<i32> {
        let mut mounts = Vec::new();
        for volume in &request.volumes {
            let name = volume.split('@').next().unwrap_or_default();
            if mounts.iter().any(|m: &MountChild| m.name == name) {
                bail!("volume {name} is given twice; a sandbox mounts each volume once");
            }
            mounts.push(start_mount(volume, &sandbox_dir.join("volumes").join(name))?);
        }
        let status = bwrap_command(&root, &mounts, request)?
            .status()
            .context("running bwrap failed; install it with `apt-get install bubblewrap`")?;
        if request.sync && status.success() {
            for mount in &mounts {
                let dir = mount.dir.to_string_lossy().into_owned();
                for line in crate::mount_cmd::run_sync(store, &dir, Some("chalk sandbox run"), None)? {
                    println!("{}: {line}", mount.name);
                }
            }
        } else if request.sync && !mounts.is_empty() {
            let names: Vec<&str> = mounts.iter().map(|m| m.name.as_str()).collect();
            eprintln!(
                "chalk sandbox run: the command failed ({status}), so --sync published nothing and the writes to {} were discarded",
                names.join(", ")
            );
        }
        drop(mounts);
        use std::os::unix::process::ExitStatusExt;
        Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    })();
    let _ = fs::remove_dir_all(&sandbox_dir);
    result
}
