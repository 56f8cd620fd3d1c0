//! Mounting a session on a directory and tearing the mount down again.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use chalk_engine::{Invalidation, Session};
use fuser::{Config, INodeNo, MountOption, SessionACL, SessionUnmounter};
use parking_lot::{Condvar, Mutex};

use crate::fs::ChalkFs;
use crate::workers::Workers;

/// Readahead of read-only mounts, in KiB, set through the mount's backing
/// device in sysfs. The kernel's default for FUSE is 128 KiB.
const READ_ONLY_READ_AHEAD_KIB: u32 = 1024;

/// How long `unmount` waits for the serving threads after a lazy unmount
/// that could not abort the FUSE connection.
const DETACHED_JOIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of one mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Mount with the `ro` flag. A read-only session is mounted read-only
    /// even when this is false.
    pub read_only: bool,
    /// Let users other than the one who mounted use the mount. A mount by a
    /// user other than root needs `user_allow_other` in `/etc/fuse.conf`.
    pub allow_other: bool,
    /// Number of threads that read FUSE requests; 0 picks the default: one
    /// for a read-only session, [`default_threads`] for a writable one. A
    /// read-only session read by one thread serves reads and slow opens on
    /// [`READ_WORKERS`] worker threads, and everything else on that one
    /// thread.
    pub threads: usize,
    /// File system name shown by `mount` and `/proc/mounts`; when empty,
    /// `chalk:<volume>`.
    pub fs_name: String,
}

/// State shared between the serving thread and the handle.
struct ServeState {
    /// `Some` once the FUSE session has ended, with its error if it failed.
    outcome: Mutex<Option<Result<(), String>>>,
    ended: Condvar,
}

impl ServeState {
    fn finish(&self, outcome: Result<(), String>) {
        *self.outcome.lock() = Some(outcome);
        self.ended.notify_all();
    }
}

/// Drops the kernel's cached names, attributes and data of a mount that its
/// session's rebase or head move made stale. Cheap to clone; safe to use
/// from any thread except those serving FUSE requests.
#[derive(Clone)]
pub struct Invalidator {
    notifier: fuser::Notifier,
    session: Arc<Session>,
}

impl Invalidator {
    /// Applies every invalidation the session queued since the last call and
    /// returns how many the kernel took. Entries the kernel never cached are
    /// not an error.
    pub fn apply(&self) -> usize {
        let mut applied = 0;
        for item in self.session.take_invalidations() {
            let result = match &item {
                Invalidation::Inode(ino) => self.notifier.inval_inode(INodeNo(ino.0), 0, 0),
                Invalidation::Entry { parent, name } => {
                    self.notifier.inval_entry(INodeNo(parent.0), std::ffi::OsStr::from_bytes(name))
                }
            };
            match result {
                Ok(()) => applied += 1,
                Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(error) => tracing::debug!(?item, %error, "kernel cache invalidation failed"),
            }
        }
        applied
    }
}

/// A live mount. Dropping the handle unmounts, like [`MountHandle::unmount`].
pub struct MountHandle {
    invalidator: Invalidator,
    mount_point: PathBuf,
    /// Device number of the mounted file system (`st_dev` of its root).
    mounted_dev: u64,
    /// `None` once this handle has unmounted.
    unmounter: Option<SessionUnmounter>,
    state: Arc<ServeState>,
    thread: Option<JoinHandle<()>>,
    /// Opens that the adaptor served through FUSE passthrough.
    passthrough_opens: Arc<AtomicU64>,
}

/// Mounts `session` on `dir` and serves it on background threads.
///
/// Returns once the kernel has completed the FUSE handshake and a `stat` of
/// `dir` reports the new file system's device, so the mount is usable as
/// soon as this returns.
pub fn mount(session: Arc<Session>, dir: &Path, options: &MountOptions) -> io::Result<MountHandle> {
    let before = std::fs::metadata(dir).map_err(|e| mount_point_error(e, "reading the mount point", dir))?;
    if !before.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mount point {} is not a directory; create a directory and mount there", dir.display()),
        ));
    }

    let read_only = options.read_only || session.is_read_only();
    let volume = session.volume().to_string();
    let fs_name = if options.fs_name.is_empty() { format!("chalk:{volume}") } else { options.fs_name.clone() };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fs_name.clone()),
        MountOption::Subtype("chalk".to_owned()),
        MountOption::DefaultPermissions,
        // Volumes hold user data that anyone with write access to the volume
        // may have written: setuid bits and device nodes are not honoured.
        MountOption::NoSuid,
        MountOption::NoDev,
        if read_only { MountOption::RO } else { MountOption::RW },
    ];
    config.acl = if options.allow_other { SessionACL::All } else { SessionACL::Owner };
    let threads = match options.threads {
        0 if read_only => 1,
        0 => default_threads(),
        threads => threads,
    };
    config.n_threads = Some(threads);
    config.clone_fd = true;
    let workers = match read_only && threads == 1 {
        true => Some(Workers::start(READ_WORKERS).map_err(|e| context(e, "starting the FUSE worker threads for", dir))?),
        false => None,
    };
    let worker_count = workers.as_ref().map_or(0, Workers::count);

    // Session::new mounts and completes the INIT handshake before it returns.
    let passthrough_opens = Arc::new(AtomicU64::new(0));
    let filesystem = ChalkFs::new(Arc::clone(&session), read_only, Arc::clone(&passthrough_opens), workers);
    let mut fuse_session =
        fuser::Session::new(filesystem, dir, &config).map_err(|e| mount_point_error(e, "mounting FUSE at", dir))?;
    let unmounter = fuse_session.unmount_callable();
    let invalidator = Invalidator { notifier: fuse_session.notifier(), session: Arc::clone(&session) };

    let state = Arc::new(ServeState { outcome: Mutex::new(None), ended: Condvar::new() });
    let thread_state = Arc::clone(&state);
    let thread = std::thread::Builder::new()
        .name("chalk-fuse".to_owned())
        .spawn(move || {
            let outcome = fuse_session.run().map_err(|e| e.to_string());
            if let Err(error) = &outcome {
                tracing::error!(%error, "FUSE session ended with an error");
            }
            thread_state.finish(outcome);
        })
        .map_err(|e| context(e, "starting the FUSE thread for", dir))?;

    let mut handle = MountHandle {
        invalidator,
        mount_point: dir.to_path_buf(),
        mounted_dev: before.dev(),
        unmounter: Some(unmounter),
        state,
        thread: Some(thread),
        passthrough_opens,
    };

    // The serving threads run now, so the adaptor's getattr serves this stat.
    let after = std::fs::metadata(dir).map_err(|e| context(e, "checking the new mount at", dir))?;
    if after.dev() == before.dev() {
        let _ = handle.shutdown();
        return Err(io::Error::other(format!(
            "mounting at {} did not take effect: the directory still shows its old file system",
            dir.display()
        )));
    }
    handle.mounted_dev = after.dev();
    if read_only {
        raise_read_ahead(after.dev());
    }
    tracing::info!(
        %volume,
        mount_point = %dir.display(),
        fs_name,
        read_only,
        threads,
        workers = worker_count,
        "mounted"
    );
    Ok(handle)
}

/// Worker threads of a read-only session whose requests one thread reads.
/// They mostly wait on the disk or the store, so there are enough that reads
/// waiting on a slow store leave some to serve reads of cached data.
pub const READ_WORKERS: usize = 16;

/// Default number of threads that serve a mount's requests: the CPU count
/// clamped to 2 to 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

/// Raises the readahead of the mount with device number `dev` to
/// [`READ_ONLY_READ_AHEAD_KIB`]. Only root may write the sysfs file, so a
/// failure is logged and the kernel's default stays.
fn raise_read_ahead(dev: u64) {
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    match std::fs::write(&path, READ_ONLY_READ_AHEAD_KIB.to_string()) {
        Ok(()) => tracing::debug!(path, kib = READ_ONLY_READ_AHEAD_KIB, "raised the mount's readahead"),
        Err(error) => tracing::debug!(path, %error, "cannot raise the mount's readahead; keeping the kernel's default"),
    }
}

impl MountHandle {
    /// Returns how many opens the mount served through FUSE passthrough.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }

    /// Directory the volume is mounted on.
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Returns the mount's [`Invalidator`], to call after a sync or a head move.
    pub fn invalidator(&self) -> Invalidator {
        self.invalidator.clone()
    }

    /// Unmounts and waits for the serving threads to end.
    ///
    /// If files in the mount are still open (`EBUSY`), the mount is detached
    /// lazily and its FUSE connection aborted, so processes that still use
    /// it get errors. That is the same outcome as the serving process dying,
    /// and unsynced writes are discarded either way.
    pub fn unmount(mut self) -> io::Result<()> {
        self.shutdown()
    }

    /// Blocks until the file system is unmounted from outside this handle
    /// (`fusermount3 -u`, `umount`) or its FUSE session ends.
    pub fn wait(&self) {
        let mut outcome = self.state.outcome.lock();
        while outcome.is_none() {
            self.state.ended.wait(&mut outcome);
        }
    }

    /// Like [`MountHandle::wait`], but gives up after `timeout`. Returns
    /// whether the session has ended.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let mut outcome = self.state.outcome.lock();
        if outcome.is_none() {
            self.state.ended.wait_for(&mut outcome, timeout);
        }
        outcome.is_some()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(mut unmounter) = self.unmounter.take() else {
            return Ok(());
        };
        let already_ended = self.state.outcome.lock().is_some();
        let mut detached = false;
        if !already_ended {
            // NOTE: fuser 0.18 checks whether the mount is still live by
            // polling /dev/fuse, but it counts POLLERR (connection gone) as
            // live. So if the file system was unmounted from outside and a
            // new mount appeared on the same directory before the serving
            // thread noticed, this would unmount the new one. fuser's own
            // drop of the session after an outside unmount hits the same
            // check and logs a harmless "Failed to umount" warning.
            match unmounter.unmount() {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                    self.detach()?;
                    let aborted = self.abort_connection();
                    tracing::warn!(
                        mount_point = %self.mount_point.display(),
                        aborted,
                        "mount was busy, so it was detached lazily; files still open in it keep it alive unless its FUSE connection was aborted"
                    );
                    detached = !aborted;
                }
                Err(error) => return Err(context(error, "unmounting", &self.mount_point)),
            }
        }

        if detached && !self.wait_timeout(DETACHED_JOIN_TIMEOUT) {
            // Open files keep the detached connection alive; its threads end
            // when the last file closes or this process exits.
            tracing::warn!(
                mount_point = %self.mount_point.display(),
                "detached mount still has open files; not waiting for its FUSE threads"
            );
            return Ok(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                return Err(io::Error::other("the FUSE serving thread panicked"));
            }
        }
        tracing::info!(mount_point = %self.mount_point.display(), "unmounted");
        Ok(())
    }

    /// Detaches the mount from the file tree (`umount2(MNT_DETACH)`).
    fn detach(&self) -> io::Result<()> {
        let path = std::ffi::CString::new(self.mount_point.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount point contains a NUL byte"))?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        let status = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        if status != 0 {
            return Err(context(io::Error::last_os_error(), "detaching", &self.mount_point));
        }
        Ok(())
    }

    /// Aborts the FUSE connection through the fusectl file system, which
    /// ends every pending and future request of the mount. Returns whether
    /// it did; fusectl is not mounted on every machine.
    fn abort_connection(&self) -> bool {
        // FUSE mounts use anonymous devices (major 0), and fusectl names
        // each connection by that device number.
        if libc::major(self.mounted_dev) != 0 {
            return false;
        }
        let path = format!("/sys/fs/fuse/connections/{}/abort", libc::minor(self.mounted_dev));
        match std::fs::write(&path, b"1") {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(path, %error, "cannot abort the FUSE connection through fusectl");
                false
            }
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            tracing::error!(mount_point = %self.mount_point.display(), %error, "unmount failed");
        }
    }
}

/// Adds context like [`context`]. When `dir` is still the mount of a
/// process that has ended, which fails every request with ENOTCONN, the
/// error gives the unmount command to run first.
fn mount_point_error(error: io::Error, action: &str, dir: &Path) -> io::Error {
    if error.raw_os_error() != Some(libc::ENOTCONN) {
        return context(error, action, dir);
    }
    let dir = dir.display();
    io::Error::new(
        error.kind(),
        format!("{dir} is still mounted by a mount process that has ended; run `chalk volume unmount {dir}` and mount again"),
    )
}

fn context(error: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{action} {}: {error}", path.display()))
}
