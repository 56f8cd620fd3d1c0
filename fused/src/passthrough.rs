//! FUSE passthrough for large files of read-only sessions.
//!
//! The first open of such a file copies its contents into a backing file in
//! the local cache (`$CHALK_HOME/cache/passthrough/<version>/<ino>`), then
//! registers that file with the kernel, which serves reads from it directly:
//! the mount process receives no read requests. Registering needs Linux 6.9 or
//! later and `CAP_SYS_ADMIN`. Where either is missing, or the copy fails,
//! the open falls back to normal reads through the session.
//!
//! The kernel checks no record CRC on these reads, so each copy carries the
//! CRC32 of its contents ([`chalk_engine::cache::copies`]). Before a mount
//! first serves a copy it did not make, it reads the copy whole and checks
//! it. A damaged copy is replaced by a new one.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use chalk_engine::cache::copies::{self, CopyDamage};
use chalk_engine::{Ino, Session, VersionId};
use fuser::{BackingId, ReplyOpen};
use parking_lot::Mutex;

/// Smallest file served through passthrough. Smaller files are read through
/// the session, so that opening many small files copies none of them.
pub(crate) const MIN_FILE_BYTES: u64 = 1 << 20;

/// A reused copy older than this gets a new modification time, which orders eviction.
const REUSE_TOUCH_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Bytes read from the session per step of a copy.
const COPY_CHUNK_BYTES: u32 = 1 << 20;

/// Environment variable that turns passthrough off (`off`) or on (`on`).
/// Unset, it is on for local object stores and off for remote ones.
pub(crate) const SWITCH_ENV: &str = "CHALK_PASSTHROUGH";

/// A backing file registered with the kernel, shared by every open handle
/// of its inode: the kernel needs the same backing id for all of them.
struct Registered {
    id: BackingId,
    /// Open handles that use `id`; the registration is dropped at zero.
    opens: usize,
}

/// Passthrough state of one mount.
pub(crate) struct Passthrough {
    /// Directory of the backing files.
    dir: PathBuf,
    /// True once the kernel granted passthrough in `init`, and until a
    /// registration fails (no `CAP_SYS_ADMIN`, say).
    active: AtomicBool,
    registered: Mutex<HashMap<u64, Registered>>,
    /// Copies this mount made or checked, by version and inode: each is
    /// checked once per mount.
    checked: Mutex<HashSet<(VersionId, u64)>>,
    /// One lock for each inode whose backing file opens are making or
    /// checking, so that concurrent first opens of a file copy it once.
    copying: Mutex<HashMap<u64, Arc<Mutex<()>>>>,
    /// Opens served through passthrough since the mount began.
    opens: Arc<AtomicU64>,
}

impl Passthrough {
    /// Returns the passthrough state for `session`: usable only by read-only
    /// sessions, and set by [`SWITCH_ENV`].
    ///
    /// With a remote store (S3) passthrough is off unless asked for: the
    /// first open would download the whole file before it returns, where
    /// normal reads start at once and fetch ahead of the reader.
    pub(crate) fn new(session: &Session, opens: Arc<AtomicU64>) -> Option<Passthrough> {
        if !session.is_read_only() {
            return None;
        }
        let setting = std::env::var(SWITCH_ENV).unwrap_or_default();
        if setting == "off" {
            tracing::info!("passthrough turned off by {SWITCH_ENV}=off");
            return None;
        }
        let local_store = crate::store_is_local(session);
        if !local_store && setting != "on" {
            tracing::info!("passthrough is off for a remote object store; set {SWITCH_ENV}=on to copy large files on open");
            return None;
        }
        let dir = session.store().local_root().join("cache").join(chalk_engine::cache::PASSTHROUGH_DIR);
        remove_abandoned_copies(&dir);
        Some(Passthrough {
            dir,
            active: AtomicBool::new(false),
            registered: Mutex::new(HashMap::new()),
            checked: Mutex::new(HashSet::new()),
            copying: Mutex::new(HashMap::new()),
            opens,
        })
    }

    /// Records whether the kernel granted the capability in `init`.
    pub(crate) fn set_granted(&self, granted: bool) {
        self.active.store(granted, Ordering::Relaxed);
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Returns whether `ino` has a registered backing file.
    pub(crate) fn is_registered(&self, ino: Ino) -> bool {
        self.registered.lock().contains_key(&ino.0)
    }

    /// Replies to an open of `ino` (of `size` bytes) through passthrough and
    /// returns `None`, or hands `reply` back when the caller must serve the
    /// file with normal reads.
    // NOTE: on a `--follow` mount that moved to a new head, an open of an
    // inode that is still open from before reuses the old version's backing
    // file until every handle of that inode is released.
    pub(crate) fn open(
        &self,
        session: &Session,
        ino: Ino,
        size: u64,
        fh: fuser::FileHandle,
        flags: fuser::FopenFlags,
        reply: ReplyOpen,
    ) -> Option<ReplyOpen> {
        {
            let mut registered = self.registered.lock();
            if let Some(entry) = registered.get_mut(&ino.0) {
                entry.opens += 1;
                reply.opened_passthrough(fh, flags, &entry.id);
                self.opens.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }

        if !self.is_active() {
            return Some(reply);
        }
        // The copy runs without the registration lock, so opens of other
        // files go on. Opens of this file wait for one copy, then find it
        // sound and checked.
        let gate = Arc::clone(self.copying.lock().entry(ino.0).or_default());
        let copied = {
            let _one_copy = gate.lock();
            self.backing_file(session, ino, size)
        };
        {
            let mut copying = self.copying.lock();
            // Only the map and this open still hold the lock.
            if Arc::strong_count(&gate) == 2 {
                copying.remove(&ino.0);
            }
        }
        let file = match copied {
            Ok(file) => file,
            Err(error) => {
                tracing::warn!(ino = ino.0, %error, "copying a file into the passthrough cache failed; serving it with normal reads");
                return Some(reply);
            }
        };
        let mut registered = self.registered.lock();
        if let Some(entry) = registered.get_mut(&ino.0) {
            // Another open registered the file while this one copied it.
            entry.opens += 1;
            reply.opened_passthrough(fh, flags, &entry.id);
            self.opens.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match reply.open_backing(&file) {
            Ok(id) => {
                reply.opened_passthrough(fh, flags, &id);
                registered.insert(ino.0, Registered { id, opens: 1 });
                self.opens.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(error) => {
                // EPERM without CAP_SYS_ADMIN; every later open would fail alike.
                self.active.store(false, Ordering::Relaxed);
                tracing::warn!(ino = ino.0, %error, "registering a passthrough backing file failed, so this mount serves files not yet registered with normal reads");
                Some(reply)
            }
        }
    }

    /// Drops one open handle of `ino` that was served through passthrough.
    pub(crate) fn release(&self, ino: Ino) {
        let mut registered = self.registered.lock();
        if let Some(entry) = registered.get_mut(&ino.0) {
            entry.opens -= 1;
            if entry.opens == 0 {
                registered.remove(&ino.0);
            }
        }
    }

    /// Returns the backing file of `ino` in the session's version, copying
    /// the file from the session unless a sound copy exists. A version never
    /// changes, so a copy is sound when it has the file's size and matches
    /// its checksum. Copies are written under a temporary name with their
    /// checksum, synced, then renamed. A copy this mount did not make is read
    /// whole and checked once, and a damaged one is replaced.
    /// Copies count against the disk cache limit and are evicted with its
    /// blocks, least recently used first; open handles keep an evicted copy.
    fn backing_file(&self, session: &Session, ino: Ino, size: u64) -> std::io::Result<File> {
        let version = session.base_version().id;
        let dir = self.dir.join(version.to_string());
        let path = dir.join(ino.0.to_string());
        if let Ok(file) = File::open(&path) {
            let metadata = file.metadata()?;
            if metadata.len() == size && self.is_sound(&file, &path, version, ino) {
                // The disk tier evicts least recently modified files first.
                let now = std::time::SystemTime::now();
                if metadata.modified().is_ok_and(|m| now.duration_since(m).unwrap_or_default() > REUSE_TOUCH_AFTER) {
                    let _ = file.set_modified(now);
                }
                return Ok(file);
            }
        }

        fs::create_dir_all(&dir)?;
        let temporary = dir.join(format!("{}.{}.{:x}.tmp", ino.0, std::process::id(), unique_suffix()));
        let result = copy_from_session(session, ino, size, &temporary);
        if result.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        result?;
        fs::rename(&temporary, &path)?;
        self.checked.lock().insert((version, ino.0));
        session.store().note_cache_file(&path);
        tracing::debug!(ino = ino.0, size, path = %path.display(), "copied a file into the passthrough cache");
        File::open(&path)
    }

    /// Returns whether the existing copy `file` of `ino` can be served: this
    /// mount made or checked it, or it checks clean now. A damaged copy is
    /// removed, so the caller copies the file again.
    fn is_sound(&self, file: &File, path: &std::path::Path, version: VersionId, ino: Ino) -> bool {
        if self.checked.lock().contains(&(version, ino.0)) {
            return true;
        }
        match copies::check_copy(file) {
            Ok(()) => {
                self.checked.lock().insert((version, ino.0));
                true
            }
            Err(CopyDamage::NoChecksum) => {
                tracing::debug!(ino = ino.0, path = %path.display(), "a passthrough copy has no checksum; copying the file again");
                let _ = fs::remove_file(path);
                false
            }
            Err(damage) => {
                tracing::warn!(
                    ino = ino.0,
                    path = %path.display(),
                    "a passthrough copy is damaged: {damage}; removing it and copying the file again from the volume"
                );
                let _ = fs::remove_file(path);
                false
            }
        }
    }
}

/// Removes the unfinished copies under `dir` (one directory per version)
/// whose mount process no longer runs, such as one killed mid-copy. A
/// copy's temporary name carries the process id of its mount.
fn remove_abandoned_copies(dir: &std::path::Path) {
    let Ok(versions) = fs::read_dir(dir) else { return };
    for file in versions.flatten().filter_map(|version| fs::read_dir(version.path()).ok()).flatten().flatten() {
        let name = file.file_name();
        let pid = name.to_str().and_then(|name| name.strip_suffix(".tmp")).and_then(|stem| stem.split('.').nth(1));
        let Some(pid) = pid.and_then(|pid| pid.parse::<u32>().ok()) else { continue };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match fs::remove_file(file.path()) {
            Ok(()) => tracing::info!(path = %file.path().display(), pid, "removed an unfinished passthrough copy of a mount that stopped"),
            Err(error) => tracing::debug!(path = %file.path().display(), %error, "cannot remove an unfinished passthrough copy"),
        }
    }
}

/// Copies `size` bytes of `ino` into a new file at `path` and records their
/// checksum on it. On a file system without user extended attributes the
/// copy still serves this mount, and later mounts copy the file again.
fn copy_from_session(session: &Session, ino: Ino, size: u64, path: &std::path::Path) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    let mut hasher = crc32fast::Hasher::new();
    let mut offset = 0;
    while offset < size {
        // Uncounted: the kernel serves the copy's bytes to readers without
        // the mount, so counting them here would report reads that no one made.
        let data = session
            .read_uncounted(ino, offset, COPY_CHUNK_BYTES)
            .map_err(|error| std::io::Error::other(format!("reading inode {} at {offset}: {error}", ino.0)))?;
        if data.is_empty() {
            return Err(std::io::Error::other(format!(
                "inode {} ended at {offset} bytes, expected {size}",
                ino.0
            )));
        }
        file.write_all(&data)?;
        hasher.update(&data);
        offset += data.len() as u64;
    }
    match copies::set_checksum(&file, hasher.finalize()) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::Unsupported => {
            tracing::debug!(path = %path.display(), %error, "a passthrough copy gets no checksum");
        }
        Err(error) => return Err(error),
    }
    // Metadata too: the checksum attribute must be durable with the bytes.
    file.sync_all()
}

/// Returns a number that differs between calls, for temporary names.
fn unique_suffix() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos() as u64);
    (nanos << 16) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}
