//! Mount lifecycle of the `chalk` binary: `volume mount`, `volume unmount`
//! and `volume sync`.
//!
//! A mount is served by one process. While it runs, that process registers
//! itself under `$CHALK_HOME/run/` (mode 0700) with two files named after its
//! pid:
//!
//! | file               | contents                                            |
//! |--------------------|-----------------------------------------------------|
//! | `mount-<pid>.sock` | Unix control socket (mode 0600)                     |
//! | `mount-<pid>.json` | [`Registration`]: volume, mount point, base version |
//!
//! The JSON file appears only once the mount is usable, and both files are
//! removed on every orderly exit. Files left by a process that died are
//! removed by the next command that finds them.
//!
//! Control protocol: one JSON object per line in each direction.
//! `{"op":"sync","message":null}` publishes the mount's writes and returns
//! `{"ok":true,"published":"<version>","single_writer":false}` (`true` when
//! the store ignores conditional writes), or
//! `{"ok":true,"nothing_to_publish":true,"base":"<version>"}`, or
//! `{"ok":false,"error":"<message>"}`. `{"op":"status"}` returns the
//! registration. Only the user who owns the mount, or root, may connect.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chalk_engine::object_store::{ConditionalWrites, SINGLE_WRITER_WARNING};
use chalk_engine::{Access, LineageName, OnConflict, Session, SessionBase, Store, SyncOptions, SyncOutcome, VolumeName};
use chalk_fused::{Invalidator, MountHandle, MountOptions};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::metrics_server;

/// Environment variable that marks the re-executed daemon process. Its
/// value is the number of the inherited file descriptor on which the child
/// reports `ready <summary>` or `error <message>` to the waiting parent.
const READY_FD_ENV: &str = "CHALK_MOUNT_READY_FD";

/// How often the serving process checks for a stop signal.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long `unmount` waits for the serving process to exit.
const UNMOUNT_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the control server waits for a client to send its request line.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most request bytes the control server reads from one connection.
const CONTROL_CONNECTION_MAX_BYTES: u64 = 64 * 1024;

/// Signal number of the first SIGINT, SIGTERM or SIGHUP received, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Contents of `run/mount-<pid>.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Registration {
    pid: u32,
    volume: String,
    /// Canonical path of the mount point.
    dir: PathBuf,
    read_only: bool,
    /// Version the mount currently builds on; updated after each sync.
    base_version: String,
    socket: PathBuf,
    /// Log file of a daemonized mount; `None` when serving in the foreground.
    log: Option<PathBuf>,
}

/// A request on the control socket.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum ControlRequest {
    Sync {
        #[serde(default)]
        message: Option<String>,
        /// `error` (default), `fork` or `ours`.
        #[serde(default)]
        on_conflict: Option<String>,
    },
    Status,
}

/// What `chalk volume mount` was asked to mount.
#[derive(Clone, Debug, Default)]
pub struct MountRequest {
    /// Version id, unique prefix or tag to mount.
    pub version: Option<String>,
    /// Lineage whose head to mount (default `main`).
    pub lineage: Option<String>,
    pub read_only: bool,
    /// Makes a `--version` mount writable; its first sync forks a new lineage.
    pub writable: bool,
    /// Read-only on a lineage, moving to each new head as it is published.
    pub follow: bool,
    /// Loopback address to serve `GET /metrics` on.
    pub metrics: Option<SocketAddr>,
}

/// Mounts `volume` on `dir` and serves it until it is unmounted or the
/// process gets SIGINT, SIGTERM or SIGHUP. Unsynced writes are discarded
/// when the mount ends.
///
/// With a version, the mount is read-only on that version unless
/// `writable`; otherwise it follows a lineage, writable unless `read_only`. With `daemon`,
/// the command re-executes itself in the background and returns once the
/// background process reports the mount ready.
pub fn run_mount(
    store: Arc<Store>,
    volume: &VolumeName,
    dir: &Path,
    request: &MountRequest,
    daemon: bool,
) -> anyhow::Result<()> {
    // Checked before mounting, because a daemon that failed here would have
    // reported the mount ready and then ended it.
    if request.follow {
        follow_interval()?;
    }
    if let Some(address) = request.metrics {
        metrics_server::check_loopback(address)?;
    }
    if !daemon {
        install_stop_handlers()?;
        let active = start_mount(&store, volume, dir, request, None)?;
        println!("{}", active.summary());
        return serve_until_stopped(active);
    }
    match std::env::var(READY_FD_ENV) {
        Ok(fd) => run_daemon_child(&store, volume, dir, request, &fd),
        Err(_) => spawn_daemon_and_wait(),
    }
}

/// Unmounts the chalk mount at `dir` and waits up to 10 s for its serving
/// process to exit.
pub fn run_unmount(store: &Store, dir: &Path) -> anyhow::Result<()> {
    let mount_point = mount_point_path(dir)?;
    let run_dir = run_dir(store);
    let registration = live_registrations(&run_dir)?.into_iter().find(|r| r.dir == mount_point);
    if registration.is_none() && !is_chalk_mount(&mount_point) {
        bail!("{} is not a chalk mount; nothing was unmounted", mount_point.display());
    }

    unmount_dir(&mount_point, registration.is_some())?;

    let Some(registration) = registration else {
        return Ok(());
    };
    let deadline = Instant::now() + UNMOUNT_EXIT_TIMEOUT;
    while process_alive(registration.pid) {
        if Instant::now() >= deadline {
            let log_hint = match &registration.log {
                Some(log) => format!("; see {}", log.display()),
                None => String::new(),
            };
            bail!(
                "{} is unmounted, but its mount process {} did not exit within {} s{log_hint}",
                mount_point.display(),
                registration.pid,
                UNMOUNT_EXIT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    remove_registration_files(&run_dir, registration.pid);
    Ok(())
}

/// Publishes the writes of live writable mounts: the mount at `target` if it
/// is a mounted directory, otherwise every writable mount of the volume named
/// `target` on this host. Returns one line per mount: the new version id, or
/// a sentence saying there was nothing to publish.
pub fn run_sync(store: &Store, target: &str, message: Option<&str>, on_conflict: Option<&str>) -> anyhow::Result<Vec<String>> {
    parse_on_conflict(on_conflict)?;
    let registrations = live_registrations(&run_dir(store))?;
    let target_path = Path::new(target);
    let target_dir = if target_path.is_dir() { Some(mount_point_path(target_path)?) } else { None };

    if let Some(dir) = &target_dir {
        if let Some(registration) = registrations.iter().find(|r| &r.dir == dir) {
            if registration.read_only {
                bail!(
                    "the mount at {} is read-only, so it has nothing to sync; \
                     mount the volume without --read-only, --version or --follow to write to it",
                    dir.display()
                );
            }
            let synced = sync_mount(registration, message, on_conflict)
                .with_context(|| format!("sync of the mount at {} failed", dir.display()))?;
            if synced.single_writer {
                print_single_writer_warning();
            }
            return Ok(vec![synced.line]);
        }
    }

    let volume = match VolumeName::new(target) {
        Ok(volume) => volume,
        Err(error) => match &target_dir {
            Some(dir) => bail!("no live mount at {}; mount one with `chalk volume mount NAME DIR`", dir.display()),
            None => bail!("{target:?} is neither a mounted directory nor a valid volume name: {error}"),
        },
    };
    let writable: Vec<&Registration> = registrations
        .iter()
        .filter(|r| r.volume == volume.as_str() && !r.read_only)
        .collect();
    if writable.is_empty() {
        let prefix = match &target_dir {
            Some(dir) => format!("no live mount at {}, and ", dir.display()),
            None => String::new(),
        };
        bail!("{prefix}no live writable mount of volume {volume} on this host; mount one with `chalk volume mount {volume} DIR`");
    }

    let mut lines = Vec::new();
    let mut failures = Vec::new();
    let mut single_writer = false;
    for registration in writable {
        match sync_mount(registration, message, on_conflict) {
            Ok(synced) => {
                lines.push(synced.line);
                single_writer |= synced.single_writer;
            }
            Err(error) => failures.push(format!("the mount at {}: {error:#}", registration.dir.display())),
        }
    }
    if single_writer {
        print_single_writer_warning();
    }
    if !failures.is_empty() {
        let mut message = format!("sync failed for {} of {} mounts of volume {volume}", failures.len(), failures.len() + lines.len());
        for failure in &failures {
            message.push_str("\n  ");
            message.push_str(failure);
        }
        for line in &lines {
            message.push_str("\n  succeeded: ");
            message.push_str(line);
        }
        bail!(message);
    }
    Ok(lines)
}

// ---------------------------------------------------------------------------
// Serving a mount
// ---------------------------------------------------------------------------

/// A mounted, registered session.
struct ActiveMount {
    handle: MountHandle,
    session: Arc<Session>,
    follow: bool,
    registration: Arc<Mutex<Registration>>,
    files: RegistrationFiles,
    listener: UnixListener,
    /// Where `GET /metrics` is served, with `--metrics`.
    metrics_address: Option<SocketAddr>,
}

impl ActiveMount {
    fn summary(&self) -> String {
        let registration = self.registration.lock();
        let mut summary = format!(
            "mounted volume {} at {} ({}, base version {}, pid {})",
            registration.volume,
            registration.dir.display(),
            if registration.read_only { "read-only" } else { "writable" },
            registration.base_version,
            registration.pid
        );
        if let Some(address) = self.metrics_address {
            summary.push_str(&format!("; metrics at http://{address}/metrics"));
        }
        summary
    }
}

/// Removes a mount's socket and JSON file when dropped.
struct RegistrationFiles {
    json: PathBuf,
    socket: PathBuf,
}

impl Drop for RegistrationFiles {
    fn drop(&mut self) {
        for path in [&self.json, &self.socket] {
            if let Err(error) = fs::remove_file(path) {
                if error.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), %error, "cannot remove mount registration file");
                }
            }
        }
    }
}

/// Opens the session, mounts it and registers the mount.
fn start_mount(
    store: &Arc<Store>,
    volume: &VolumeName,
    dir: &Path,
    request: &MountRequest,
    log: Option<PathBuf>,
) -> anyhow::Result<ActiveMount> {
    let run_dir = run_dir(store);
    create_private_dir(&run_dir)?;
    let mount_point = fs::canonicalize(dir)
        .with_context(|| format!("mount point {} not found; create the directory first", dir.display()))?;
    if let Some(other) = live_registrations(&run_dir)?.into_iter().find(|r| r.dir == mount_point) {
        bail!(
            "{} is already a chalk mount of volume {} (pid {}); unmount it first with `chalk volume unmount {}`",
            mount_point.display(),
            other.volume,
            other.pid,
            mount_point.display()
        );
    }

    let (base, access) = match (&request.version, &request.lineage) {
        (Some(_), Some(_)) => bail!("give either --version or --lineage, not both"),
        (Some(version), None) => {
            let info = store
                .resolve_version(volume, version)
                .with_context(|| format!("version {version:?} of volume {volume} not found; list versions with `chalk volume versions {volume}`"))?;
            // A version mount is read-only unless asked otherwise; its syncs fork a new lineage.
            let access = if request.writable && !request.read_only { Access::Writable } else { Access::ReadOnly };
            (SessionBase::Version(info.id), access)
        }
        (None, lineage) => {
            let lineage = match lineage {
                Some(name) => LineageName::new(name)?,
                None => LineageName::main(),
            };
            let access = if request.read_only { Access::ReadOnly } else { Access::Writable };
            (SessionBase::Lineage(lineage), access)
        }
    };
    let session = Arc::new(
        store
            .open_session(volume, base, access)
            .with_context(|| format!("opening a session on volume {volume} failed"))?,
    );
    let read_only = session.is_read_only();
    if read_only {
        // A lease keeps gc from collecting the mounted version; a store this
        // host cannot write to still mounts, without that protection.
        if let Err(err) = session.hold_lease() {
            tracing::warn!(volume = %volume, error = %err, "failed to take a lease on the mounted version; gc may collect it while mounted");
        }
    }

    let pid = std::process::id();
    let socket = run_dir.join(format!("mount-{pid}.sock"));
    let json = run_dir.join(format!("mount-{pid}.json"));
    let files = RegistrationFiles { json, socket: socket.clone() };
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("creating the control socket {} failed", socket.display()))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {} failed", socket.display()))?;

    // Bound before mounting, so that a port in use fails the mount.
    let metrics_address = match request.metrics {
        Some(address) => Some(metrics_server::start(address, Arc::clone(store.metrics()))?),
        None => None,
    };

    let options = MountOptions {
        read_only,
        // As root, let workloads running as other users in, subject to the
        // kernel's permission checks (`default_permissions`).
        allow_other: nix::unistd::geteuid().is_root(),
        threads: fuse_threads()?,
        fs_name: format!("chalk:{volume}"),
    };
    let handle = chalk_fused::mount(Arc::clone(&session), &mount_point, &options)
        .with_context(|| format!("mounting volume {volume} at {} failed", mount_point.display()))?;

    let registration = Registration {
        pid,
        volume: volume.to_string(),
        dir: mount_point,
        read_only,
        base_version: session.base_version().id.to_string(),
        socket,
        log,
    };
    write_registration(&files.json, &registration)?;
    tracing::info!(
        volume = %registration.volume,
        mount_point = %registration.dir.display(),
        read_only,
        base_version = %registration.base_version,
        "mount registered"
    );
    Ok(ActiveMount {
        handle,
        session,
        follow: request.follow,
        registration: Arc::new(Mutex::new(registration)),
        files,
        listener,
        metrics_address,
    })
}

/// Serves control requests until the mount is unmounted from outside or a
/// stop signal arrives, then unmounts and removes the registration. The
/// caller installs the stop handlers first, with [`install_stop_handlers`].
fn serve_until_stopped(active: ActiveMount) -> anyhow::Result<()> {
    let ActiveMount { handle, session, follow, registration, files, listener, metrics_address: _ } = active;
    let invalidator = handle.invalidator();
    {
        let control = Control { session: Arc::clone(&session), registration: Arc::clone(&registration), json: files.json.clone(), invalidator: invalidator.clone() };
        std::thread::Builder::new()
            .name("chalk-control".to_owned())
            .spawn(move || serve_control(listener, control))
            .context("starting the control socket thread failed")?;
    }

    let mount_point = registration.lock().dir.clone();
    let follow_interval = if follow { follow_interval()? } else { Duration::MAX };
    let mut last_follow = Instant::now();
    loop {
        if handle.wait_timeout(STOP_POLL_INTERVAL) {
            tracing::info!(mount_point = %mount_point.display(), "file system was unmounted; exiting");
            break;
        }
        let signal = STOP_SIGNAL.load(Ordering::SeqCst);
        if signal != 0 {
            tracing::info!(signal, mount_point = %mount_point.display(), "stop signal received; unmounting");
            break;
        }
        if follow && last_follow.elapsed() >= follow_interval {
            last_follow = Instant::now();
            follow_head(&session, &invalidator, &registration, &files.json);
        }
    }

    // Stop taking control requests before the mount goes away.
    drop(files);
    handle
        .unmount()
        .with_context(|| format!("unmounting {} failed", mount_point.display()))?;
    // The control thread still holds a handle, so dropping ours would not end the session.
    session.discard();
    drop(session);
    Ok(())
}

/// State that the control socket's threads share with the mount.
#[derive(Clone)]
struct Control {
    session: Arc<Session>,
    registration: Arc<Mutex<Registration>>,
    json: PathBuf,
    invalidator: Invalidator,
}

/// Interval between checks of a `--follow` mount for a new head.
fn follow_interval() -> anyhow::Result<Duration> {
    match std::env::var("CHALK_FOLLOW_INTERVAL_MS") {
        Err(_) => Ok(Duration::from_millis(1000)),
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
            _ => bail!("CHALK_FOLLOW_INTERVAL_MS={text:?} is not a positive number of milliseconds; unset it for the default of 1000"),
        },
    }
}

/// Moves a `--follow` mount to its lineage's new head, if there is one, and
/// drops what the kernel cached of the paths that changed. A failure (the
/// store unreachable, say) is logged and the mount stays where it is.
fn follow_head(session: &Session, invalidator: &Invalidator, registration: &Mutex<Registration>, json: &Path) {
    match session.follow_head() {
        Ok(None) => {}
        Ok(Some(head)) => {
            let dropped = invalidator.apply();
            tracing::info!(version = %head.id, invalidated = dropped, "mount moved to the new head");
            let mut registration = registration.lock();
            registration.base_version = head.id.to_string();
            if let Err(error) = write_registration(json, &registration) {
                tracing::warn!(error = %format!("{error:#}"), "cannot update the mount registration after a head move");
            }
        }
        Err(error) => tracing::warn!(%error, "checking the lineage for a new head failed; the mount stays on its version"),
    }
}

fn serve_control(listener: UnixListener, control: Control) {
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "accepting a control connection failed");
                continue;
            }
        };
        let control = control.clone();
        let spawned = std::thread::Builder::new()
            .name("chalk-control-client".to_owned())
            .spawn(move || {
                if let Err(error) = serve_control_client(stream, &control) {
                    tracing::warn!(%error, "control connection failed");
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "starting a control connection thread failed");
        }
    }
}

fn serve_control_client(stream: UnixStream, control: &Control) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    let own_uid = nix::unistd::geteuid().as_raw();
    if peer.uid() != own_uid && peer.uid() != 0 {
        tracing::warn!(peer_uid = peer.uid(), peer_pid = peer.pid(), "rejected control connection from another user");
        let reply = serde_json::json!({"ok": false, "error": "permission denied: this mount belongs to another user"});
        return writeln!(writer, "{reply}");
    }

    stream.set_read_timeout(Some(CONTROL_READ_TIMEOUT))?;
    let mut reader = BufReader::new(stream.take(CONTROL_CONNECTION_MAX_BYTES));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<ControlRequest>(&line) {
            Ok(request) => handle_control_request(request, control),
            Err(error) => serde_json::json!({"ok": false, "error": format!("invalid control request: {error}")}),
        };
        writeln!(writer, "{reply}")?;
    }
}

fn handle_control_request(request: ControlRequest, control: &Control) -> serde_json::Value {
    let (session, registration, json) = (&control.session, &control.registration, &control.json);
    match request {
        ControlRequest::Status => {
            let registration = registration.lock().clone();
            serde_json::json!({
                "ok": true,
                "pid": registration.pid,
                "volume": registration.volume,
                "dir": registration.dir,
                "read_only": registration.read_only,
                "base": registration.base_version,
            })
        }
        ControlRequest::Sync { message, on_conflict } => match parse_on_conflict(on_conflict.as_deref())
            .and_then(|on_conflict| Ok(session.sync_with(&SyncOptions { message, on_conflict, ..SyncOptions::default() })?))
        {
            Ok(SyncOutcome::Published(version)) => {
                // A rebase brought in other writers' changes; the kernel
                // must not keep serving the old names and bytes.
                control.invalidator.apply();
                let id = version.id.to_string();
                tracing::info!(volume = %session.volume(), version = %id, lineage = %version.lineage, "sync published a version");
                let mut registration = registration.lock();
                registration.base_version = id.clone();
                if let Err(error) = write_registration(json, &registration) {
                    tracing::warn!(error = %format!("{error:#}"), "cannot update the mount registration after sync");
                }
                // The publish ran the conditional-write probe, so its cached
                // result is read here without a request.
                let single_writer =
                    matches!(session.store().objects().conditional_writes(), Ok(ConditionalWrites::Ignored));
                if single_writer {
                    log_single_writer_warning_once();
                }
                serde_json::json!({"ok": true, "published": id, "single_writer": single_writer})
            }
            Ok(SyncOutcome::NothingToPublish { base }) => {
                serde_json::json!({"ok": true, "nothing_to_publish": true, "base": base.id.to_string()})
            }
            Err(error) => {
                // A mount on a pinned version has no lineage until its first sync forks one.
                let lineage = session.lineage().map_or_else(|| "none".to_owned(), |l| l.to_string());
                tracing::error!(volume = %session.volume(), lineage = %lineage, %error, "sync failed");
                serde_json::json!({"ok": false, "error": error.to_string()})
            }
        },
    }
}

extern "C" fn record_stop_signal(signal: libc::c_int) {
    // Keep the first signal; later ones change nothing.
    let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// Installs handlers that record SIGINT, SIGTERM and SIGHUP in
/// [`STOP_SIGNAL`], which the serving loop polls.
fn install_stop_handlers() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

    let action = SigAction::new(SigHandler::Handler(record_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only performs an atomic compare-and-swap, which
        // is async-signal-safe, and it replaces no handler that other code
        // relies on.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("installing a handler for {signal} failed"))?;
    }
    Ok(())
}

/// Environment variable that sets how many threads serve FUSE requests.
const FUSE_THREADS_ENV: &str = "CHALK_FUSE_THREADS";

/// Returns how many threads read FUSE requests: [`FUSE_THREADS_ENV`] when
/// set, else 0, which picks the default of [`MountOptions::threads`].
fn fuse_threads() -> anyhow::Result<usize> {
    parse_fuse_threads(std::env::var(FUSE_THREADS_ENV).ok().as_deref())
}

/// Returns the thread count that `setting`, the value of [`FUSE_THREADS_ENV`], requests.
fn parse_fuse_threads(setting: Option<&str>) -> anyhow::Result<usize> {
    match setting {
        Some(text) => match text.trim().parse::<usize>() {
            Ok(threads) if (1..=64).contains(&threads) => Ok(threads),
            _ => anyhow::bail!("{FUSE_THREADS_ENV}={text:?} is invalid: set a whole number from 1 to 64, or unset it"),
        },
        None => Ok(0),
    }
}

// ---------------------------------------------------------------------------
// Daemon mode
// ---------------------------------------------------------------------------

/// Parent side of `--daemon`: re-executes this command with [`READY_FD_ENV`]
/// set and waits until the child reports the mount ready or fails.
fn spawn_daemon_and_wait() -> anyhow::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

    let (ready_read, ready_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).context("creating the readiness pipe failed")?;
    // The child must inherit the write end, so it loses close-on-exec here.
    // NOTE: a process spawned by another thread at this moment would inherit
    // it too; this command spawns nothing else while it waits.
    fcntl(ready_write.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
        .context("clearing close-on-exec on the readiness pipe failed")?;

    let exe = std::env::current_exe().context("locating the chalk executable failed")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = Command::new(&exe)
        .args(&args)
        .env(READY_FD_ENV, ready_write.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting the background mount process {} failed", exe.display()))?;
    drop(ready_write);

    let mut report = String::new();
    File::from(ready_read)
        .read_to_string(&mut report)
        .context("reading the background mount process's readiness report failed")?;
    let report = report.trim_end();
    if let Some(summary) = report.strip_prefix("ready ") {
        println!("{summary}");
        return Ok(());
    }
    if let Some(message) = report.strip_prefix("error ") {
        let _ = child.wait();
        bail!("{message}");
    }
    let status = child.wait().context("waiting for the background mount process failed")?;
    bail!(
        "background mount process {} exited ({status}) before the mount was ready; see its log under $CHALK_HOME/logs/",
        child.id()
    );
}

/// Child side of `--daemon`: detaches from the terminal, sends logs to
/// `$CHALK_HOME/logs/mount-<pid>.log`, mounts, reports to the parent on the
/// inherited descriptor `ready_fd`, and serves.
fn run_daemon_child(
    store: &Arc<Store>,
    volume: &VolumeName,
    dir: &Path,
    request: &MountRequest,
    ready_fd: &str,
) -> anyhow::Result<()> {
    let ready_fd: i32 = ready_fd
        .parse()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| anyhow!("{READY_FD_ENV}={ready_fd:?} is not a file descriptor number; it is set only by `chalk volume mount --daemon`"))?;
    nix::fcntl::fcntl(ready_fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .with_context(|| format!("file descriptor {ready_fd} from {READY_FD_ENV} is not open"))?;
    // SAFETY: the descriptor was checked to be open above, and nothing else
    // in this process owns it: the parent created it for this child alone.
    let mut ready = File::from(unsafe { OwnedFd::from_raw_fd(ready_fd) });

    let log = match redirect_stderr_to_log(store) {
        Ok(log) => log,
        Err(error) => {
            let _ = writeln!(ready, "error {error:#}");
            return Err(error);
        }
    };
    // A new session leaves the terminal's process group, so the terminal's
    // SIGINT and SIGHUP no longer reach the mount.
    if let Err(error) = nix::unistd::setsid() {
        tracing::warn!(%error, "setsid failed; the mount stays in the caller's session");
    }
    if let Err(error) = install_stop_handlers() {
        let _ = writeln!(ready, "error {error:#}");
        return Err(error);
    }

    let active = match start_mount(store, volume, dir, request, Some(log)) {
        Ok(active) => active,
        Err(error) => {
            let _ = writeln!(ready, "error {error:#}");
            return Err(error);
        }
    };
    // Do not keep the caller's working directory busy.
    if let Err(error) = std::env::set_current_dir("/") {
        tracing::warn!(%error, "cannot change the working directory to /");
    }
    let summary = active.summary();
    if let Err(error) = writeln!(ready, "ready {summary}") {
        tracing::warn!(%error, "cannot report readiness to the parent process");
    }
    drop(ready);
    serve_until_stopped(active)
}

/// Points standard error at a new log file and returns its path.
fn redirect_stderr_to_log(store: &Store) -> anyhow::Result<PathBuf> {
    let logs = store.local_root().join("logs");
    create_private_dir(&logs)?;
    let path = logs.join(format!("mount-{}.log", std::process::id()));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the log file {} failed", path.display()))?;
    // SAFETY: dup2 on two open descriptors touches no memory; fd 2 is
    // replaced atomically and `file` stays owned by this function.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("redirecting standard error to {} failed", path.display()));
    }
    Ok(path)
}

// ---------------------------------------------------------------------------
// Registrations and clients
// ---------------------------------------------------------------------------

fn run_dir(store: &Store) -> PathBuf {
    store.local_root().join("run")
}

fn create_private_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {} failed", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting mode 0700 on {} failed", path.display()))
}

/// Writes `registration` to `path` atomically (temporary file, then rename),
/// so readers never see a partial file.
fn write_registration(path: &Path, registration: &Registration) -> anyhow::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .with_context(|| format!("creating {} failed", temporary.display()))?;
    serde_json::to_writer_pretty(&mut file, registration)?;
    file.write_all(b"\n")?;
    drop(file);
    fs::rename(&temporary, path).with_context(|| format!("renaming {} to {} failed", temporary.display(), path.display()))
}

/// Reads the registrations in `run_dir` whose process is alive, and removes
/// the files of processes that are gone.
/// True when /proc/self/mountinfo lists a chalk FUSE mount (source
/// `chalk:<volume>`) at `dir`, as a mount whose process died leaves behind.
fn is_chalk_mount(dir: &Path) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let wanted = dir.to_string_lossy();
    mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(separator) = fields.iter().position(|f| *f == "-") else { return false };
        let mount_point = fields.get(4).copied().unwrap_or_default().replace("\\040", " ");
        let source = fields.get(separator + 2).copied().unwrap_or_default();
        mount_point == wanted && source.starts_with("chalk:")
    })
}

/// Mount points of live mounts of `volume` on this host.
pub fn live_mounts_of(store: &Store, volume: &VolumeName) -> anyhow::Result<Vec<PathBuf>> {
    Ok(live_registrations(&run_dir(store))?.into_iter().filter(|r| r.volume == volume.as_str()).map(|r| r.dir).collect())
}

fn live_registrations(run_dir: &Path) -> anyhow::Result<Vec<Registration>> {
    let entries = match fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error).with_context(|| format!("listing {} failed", run_dir.display())),
    };
    let mut live = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {} failed", run_dir.display()))?;
        let name = entry.file_name();
        let Some(pid) = registration_pid(&name.to_string_lossy()) else {
            continue;
        };
        if !process_alive(pid) {
            tracing::info!(pid, "removing the registration of a mount process that is gone");
            remove_registration_files(run_dir, pid);
            continue;
        }
        let path = entry.path();
        if path.extension() != Some(std::ffi::OsStr::new("json")) {
            continue;
        }
        let registration: Registration =
            match fs::read(&path).map_err(anyhow::Error::from).and_then(|bytes| Ok(serde_json::from_slice(&bytes)?)) {
                Ok(registration) => registration,
                Err(error) => {
                    tracing::warn!(path = %path.display(), error = %format!("{error:#}"), "skipping an unreadable mount registration");
                    continue;
                }
            };
        // The pid may belong to an unrelated process by now. A registration
        // is written only after its socket listens, so a socket that refuses
        // connections marks a registration left by a process that is gone.
        if let Err(error) = UnixStream::connect(&registration.socket) {
            if matches!(error.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) {
                tracing::info!(pid, socket = %registration.socket.display(), "removing a registration whose control socket is gone");
                remove_registration_files(run_dir, pid);
                continue;
            }
        }
        live.push(registration);
    }
    live.sort_by(|a: &Registration, b| a.dir.cmp(&b.dir));
    Ok(live)
}

/// Pid in a registration file name (`mount-<pid>.json`, `.sock` or `.json.tmp`).
fn registration_pid(file_name: &str) -> Option<u32> {
    let rest = file_name.strip_prefix("mount-")?;
    let digits = rest.split('.').next()?;
    digits.parse().ok()
}

fn remove_registration_files(run_dir: &Path, pid: u32) {
    for suffix in ["json", "sock", "json.tmp"] {
        let _ = fs::remove_file(run_dir.join(format!("mount-{pid}.{suffix}")));
    }
}

/// Returns whether process `pid` exists and has not exited. A zombie counts
/// as exited, because init reaps a daemonized mount process and on some
/// machines does so a second or more after the process ended.
fn process_alive(pid: u32) -> bool {
    let Ok(raw_pid) = i32::try_from(pid) else {
        return false;
    };
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw_pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    };
    if !exists {
        return false;
    }
    // The state is the first field after the command name, which is in
    // parentheses and may itself contain spaces or parentheses.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')').and_then(|end| stat[end + 1..].split_whitespace().next()) {
            Some(state) => state != "Z" && state != "X",
            None => true,
        },
        Err(_) => true,
    }
}

/// Absolute, symlink-free path of a mount point. A mount whose serving
/// process died cannot be resolved itself (`ENOTCONN`), so only its parent
/// is resolved then.
fn mount_point_path(dir: &Path) -> anyhow::Result<PathBuf> {
    if let Ok(canonical) = fs::canonicalize(dir) {
        return Ok(canonical);
    }
    let absolute = std::path::absolute(dir).with_context(|| format!("resolving {} failed", dir.display()))?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = fs::canonicalize(parent).with_context(|| format!("directory {} not found", parent.display()))?;
            Ok(parent.join(name))
        }
        _ => Ok(absolute),
    }
}

/// Unmounts `dir` with `fusermount3 -u`, falling back to `umount`.
fn unmount_dir(dir: &Path, registered: bool) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for (program, args) in [("fusermount3", &["-u"][..]), ("umount", &[][..])] {
        match Command::new(program).args(args).arg(dir).stdin(Stdio::null()).output() {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => {
                // Both tools name themselves in their messages.
                let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                if message.is_empty() {
                    failures.push(format!("{program} exited with {}", output.status));
                } else {
                    failures.push(message);
                }
            }
            Err(error) => failures.push(format!("{program}: {error}")),
        }
    }
    let detail = failures.join("; ");
    if !registered {
        bail!("no chalk mount at {} ({detail})", dir.display());
    }
    if detail.contains("busy") {
        bail!(
            "unmounting {} failed because files in it are open ({detail}); close them and retry",
            dir.display()
        );
    }
    bail!("unmounting {} failed ({detail})", dir.display())
}

/// Sends a sync request to one mount and returns the line to print.
/// Reads an `--on-conflict` value.
pub fn parse_on_conflict(value: Option<&str>) -> anyhow::Result<OnConflict> {
    match value {
        None | Some("error") => Ok(OnConflict::Error),
        Some("fork") => Ok(OnConflict::Fork),
        Some("ours") => Ok(OnConflict::Ours),
        Some(other) => bail!("invalid --on-conflict value {other:?}; use error, fork or ours"),
    }
}

/// Prints the single-writer warning to stderr, as every command that
/// publishes to a store that ignores conditional writes does once.
pub fn print_single_writer_warning() {
    eprintln!("warning: {SINGLE_WRITER_WARNING}");
}

/// Prints the single-writer warning if the store ignores conditional
/// writes. Call it after the command published: the publish ran the probe,
/// so its result is known and no request is sent.
pub fn warn_if_single_writer(store: &Store) {
    if matches!(store.objects().conditional_writes(), Ok(ConditionalWrites::Ignored)) {
        print_single_writer_warning();
    }
}

/// Logs the single-writer warning at most once per process, for a
/// long-running process whose log is read rather than its terminal.
pub fn log_single_writer_warning_once() {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| tracing::warn!("{SINGLE_WRITER_WARNING}"));
}

/// Reply of a mount to a sync request that succeeded.
struct MountSynced {
    /// The new version id, or a note that there was nothing to publish.
    line: String,
    /// The store ignores conditional writes.
    single_writer: bool,
}

fn sync_mount(registration: &Registration, message: Option<&str>, on_conflict: Option<&str>) -> anyhow::Result<MountSynced> {
    let request = serde_json::json!({"op": "sync", "message": message, "on_conflict": on_conflict});
    let reply = control_request(registration, &request)?;
    if reply["ok"].as_bool() != Some(true) {
        let error = reply["error"].as_str().unwrap_or("the mount process gave no reason");
        bail!("{error}");
    }
    if let Some(version) = reply["published"].as_str() {
        let single_writer = reply["single_writer"].as_bool() == Some(true);
        return Ok(MountSynced { line: version.to_owned(), single_writer });
    }
    if reply["nothing_to_publish"].as_bool() == Some(true) {
        let base = reply["base"].as_str().unwrap_or("unknown");
        let line = format!("nothing to publish at {} (base version {base})", registration.dir.display());
        return Ok(MountSynced { line, single_writer: false });
    }
    bail!("unexpected response from mount process {}: {reply}", registration.pid)
}

fn control_request(registration: &Registration, request: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(&registration.socket).with_context(|| {
        format!(
            "connecting to mount process {} at {} failed; if the mount is gone, remount with `chalk volume mount {} DIR`",
            registration.pid,
            registration.socket.display(),
            registration.volume
        )
    })?;
    let mut writer = stream.try_clone()?;
    writeln!(writer, "{request}")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        bail!("mount process {} closed the control connection without a response", registration.pid);
    }
    serde_json::from_str(&line).with_context(|| format!("invalid response from mount process {}: {line:?}", registration.pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuse_threads_setting_is_parsed() {
        assert_eq!(parse_fuse_threads(Some("1")).unwrap(), 1);
        assert_eq!(parse_fuse_threads(Some(" 64 ")).unwrap(), 64);
        assert_eq!(parse_fuse_threads(None).unwrap(), 0, "unset must pick the mount's default");
    }

    #[test]
    fn fuse_threads_setting_rejects_bad_values() {
        for bad in ["0", "65", "two", "", "-1"] {
            let error = parse_fuse_threads(Some(bad)).unwrap_err().to_string();
            assert!(error.contains(&format!("{FUSE_THREADS_ENV}={bad:?} is invalid")), "{bad:?} gave: {error}");
        }
    }
}
