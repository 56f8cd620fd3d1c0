//! Sessions: one mount or one batch of puts on a base version. A session
//! loads the base version's checkpoint lazily, keeps its own changes in
//! memory and in its own segment log, and publishes them as one new version
//! at `sync`.
//!
//! Invariants:
//! - Nothing a session writes is visible to any other session before `sync`
//!   publishes it: its segments live in its own directory and its tree
//!   changes only in its memory.
//! - An inode is loaded from the base checkpoint at most once; after that the
//!   in-memory copy is the truth for this session.
//! - A session that ends without `sync` leaves nothing behind: its directory
//!   is deleted on drop, or by the next process that opens the store if this
//!   one was killed.

mod data;
mod ops;
mod paths;
mod publish;
mod rebase;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

pub use paths::{normalize_path, PathEntry};
pub(crate) use publish::publish_empty_version;
pub use publish::{RetryAdvice, SyncOptions};
pub use rebase::OnConflict;

use crate::error::{EngineError, Result};
use crate::format::checkpoint::{decode_chunk, decode_page, InodeRecord, RootCheckpoint, StoredContent, INODES_PER_PAGE};
use crate::ids::{Ino, LineageName, SessionId, VersionId, VolumeName};
use crate::io::DiskWriter;
use crate::lease::Lease;
use crate::metrics::SessionMetrics;
use crate::segment::OpenSegment;
use crate::store::{chunk_key, Store, VersionInfo};
use crate::tree::{Content, Inode};

/// What a session starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionBase {
    /// The head of a lineage; `sync` publishes onto that lineage.
    Lineage(LineageName),
    /// One specific version.
    Version(VersionId),
}

/// Whether a session may change its tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    Writable,
}

/// Result of [`Session::sync`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    Published(VersionInfo),
    /// The session had no changes; no version was created.
    NothingToPublish { base: VersionInfo },
}

/// A kernel cache entry that a mount drops after its session moved onto a
/// version with other writers' changes (a rebase, or a followed head).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Invalidation {
    /// The attributes and cached data of an inode (for a directory, its
    /// cached listing).
    Inode(Ino),
    /// The name `name` in directory `parent`.
    Entry { parent: Ino, name: Vec<u8> },
}

/// The segment log of a writable session.
pub(crate) struct Log {
    pub writer: DiskWriter,
    pub current: Option<OpenSegment>,
    /// Segments sealed by this session and not yet published, with their paths.
    pub sealed: Vec<(crate::ids::SegmentId, PathBuf)>,
}

/// Mutable state of a session, behind one lock.
pub(crate) struct State {
    pub base: VersionInfo,
    /// Lineage that `sync` publishes onto; `None` for a session opened on a
    /// pinned version, whose first sync forks a new lineage.
    pub lineage: Option<LineageName>,
    /// Sequence number, in `lineage`, of the entry this session builds on.
    pub base_entry_seq: u64,
    pub root: RootCheckpoint,
    /// Pages of the base checkpoint loaded so far.
    pub pages: HashMap<u64, Arc<BTreeMap<Ino, InodeRecord>>>,
    /// Inodes loaded or created by this session.
    pub inodes: HashMap<Ino, Inode>,
    /// Inodes changed since the base version.
    pub dirty: HashSet<Ino>,
    /// Next inode number to allocate, and the end of its block (equal when no block is picked yet).
    pub next_ino: u64,
    pub block_end: u64,
    pub log: Option<Log>,
    /// Open file handles per inode.
    pub open_handles: HashMap<Ino, u64>,
    /// Kernel lookup counts per inode.
    pub lookups: HashMap<Ino, u64>,
    /// A sync whose lineage entry write failed without saying whether the
    /// entry landed; the next sync finds out.
    pub unconfirmed: Option<publish::Unconfirmed>,
    /// Kernel cache entries made stale by other writers' changes since the
    /// last [`Session::take_invalidations`].
    pub invalidations: Vec<Invalidation>,
}

/// A mount's or a batch's view of a volume. All methods take `&self`; one
/// lock serialises changes.
pub struct Session {
    pub(crate) store: Arc<Store>,
    pub(crate) volume: VolumeName,
    pub(crate) id: SessionId,
    pub(crate) access: Access,
    /// Session directory (writable sessions only), holding the segment log and a lock file.
    pub(crate) dir: Option<PathBuf>,
    /// Held for the session's lifetime so other processes know it is alive.
    _lock: Option<File>,
    /// Set by [`Session::discard`].
    discarded: std::sync::atomic::AtomicBool,
    /// The lease that keeps `gc` from deleting what this session reads or
    /// uploads; writable sessions always hold one.
    pub(crate) lease: Mutex<Option<Lease>>,
    pub(crate) state: Mutex<State>,
    pub(crate) metrics: SessionMetrics,
    /// The `lineage` label of this session's metrics: the lineage it was
    /// opened on, kept after a sync forks a new one so that its series go on.
    metrics_lineage: String,
}

impl Store {
    /// Opens a session on a lineage head or a version. Costs one checkpoint
    /// root read, whatever the size of the volume.
    pub fn open_session(self: &Arc<Self>, volume: &VolumeName, base: SessionBase, access: Access) -> Result<Session> {
        let (base_version, lineage, base_entry_seq) = match &base {
            SessionBase::Lineage(lineage) => {
                let (seq, head) = self.head_entry(volume, lineage)?;
                (head, Some(lineage.clone()), seq)
            }
            SessionBase::Version(id) => (self.resolve_version(volume, &id.to_string())?, None, 0),
        };
        let id = SessionId::generate();
        // The lease comes before the first read of the base checkpoint, so
        // that a gc run either sees it or has finished deleting.
        let lease = match access {
            Access::Writable => match Lease::acquire(self.objects().clone(), volume, id, &[base_version.id]) {
                Ok(lease) => Some(lease),
                // The store is unreachable and the base came from local
                // metadata copies. Writes stay private, and the first sync
                // takes the lease before it uploads anything.
                Err(err @ EngineError::ObjectStore { .. }) => {
                    tracing::warn!(volume = %volume, session = %id, error = %err, "opened a writable session without a lease; the first sync takes it");
                    None
                }
                Err(err) => return Err(err),
            },
            Access::ReadOnly => None,
        };
        let root = self.load_checkpoint(volume, base_version.id)?;
        let (dir, lock, log) = match access {
            Access::ReadOnly => (None, None, None),
            Access::Writable => {
                // The directory is prepared under a hidden name and renamed
                // once its lock is held, so another process's cleanup never
                // sees it unlocked.
                let dir = self.sessions_dir().join(id.to_string());
                let staging = self.sessions_dir().join(format!(".{id}.new"));
                std::fs::create_dir_all(&staging)
                    .map_err(|e| EngineError::io("creating session directory", &staging, e))?;
                let lock = lock_session_dir(&staging)?;
                std::fs::rename(&staging, &dir).map_err(|e| EngineError::io("renaming session directory", &staging, e))?;
                let writer = DiskWriter::new(self.config().io_mode.clone())
                    .map_err(|e| EngineError::io("setting up io_uring for", &dir, e))?;
                (Some(dir), Some(lock), Some(Log { writer, current: None, sealed: Vec::new() }))
            }
        };
        let state = State {
            next_ino: 0,
            block_end: 0,
            base: base_version,
            lineage,
            base_entry_seq,
            root,
            pages: HashMap::new(),
            inodes: HashMap::new(),
            dirty: HashSet::new(),
            log,
            open_handles: HashMap::new(),
            lookups: HashMap::new(),
            unconfirmed: None,
            invalidations: Vec::new(),
        };
        // A session on a pinned version is labelled with that version's lineage.
        let metrics_lineage = state.lineage.as_ref().map_or_else(|| state.base.lineage.to_string(), |l| l.to_string());
        let metrics = self.metrics().session(volume.as_str(), &metrics_lineage);
        Ok(Session {
            store: self.clone(),
            volume: volume.clone(),
            id,
            access,
            dir,
            _lock: lock,
            discarded: Default::default(),
            lease: Mutex::new(lease),
            state: Mutex::new(state),
            metrics,
            metrics_lineage,
        })
    }
}

fn lock_session_dir(dir: &std::path::Path) -> Result<File> {
    let path = dir.join("lock");
    let file = File::create(&path).map_err(|e| EngineError::io("creating session lock", &path, e))?;
    // SAFETY: flock on a valid descriptor owned by `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(EngineError::io("locking session", &path, std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Deletes the directories of sessions whose process died before `sync`, so
/// their writes are discarded; torn segment tails found there are logged.
pub(crate) fn discard_abandoned_sessions(store: &Store) {
    let Ok(entries) = std::fs::read_dir(store.sessions_dir()) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            // A directory still being prepared; one left by a killed process goes after a minute.
            let age = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > std::time::Duration::from_secs(60)) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            continue;
        }
        let Ok(lock) = File::open(dir.join("lock")) else {
            // A session creates its directory and then its lock file; only a
            // directory that stayed without one for a minute is abandoned.
            let age = entry.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > std::time::Duration::from_secs(60)) {
                let _ = std::fs::remove_dir_all(&dir);
            }
            continue;
        };
        // SAFETY: flock on a valid descriptor owned by `lock`.
        let free = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if !free {
            continue;
        }
        let mut records = 0;
        let mut torn = 0;
        if let Ok(files) = std::fs::read_dir(&dir) {
            for file in files.flatten() {
                if file.path().extension().is_some_and(|e| e == "seg") {
                    if let Ok(report) = crate::segment::recover(&file.path()) {
                        records += report.records.len();
                        torn += usize::from(report.invalid.is_some());
                    }
                }
            }
        }
        tracing::info!(session = %dir.display(), records, torn_tails = torn, "discarded the unsynced writes of an ended session");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.discard();
    }
}

impl Session {
    pub fn is_read_only(&self) -> bool {
        self.access == Access::ReadOnly
    }

    pub fn volume(&self) -> &VolumeName {
        &self.volume
    }

    /// The `lineage` label of this session's metrics, also used by the FUSE adaptor's.
    pub fn metrics_lineage(&self) -> &str {
        &self.metrics_lineage
    }

    /// The store this session reads from and publishes to.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The version this session builds on (after a sync, the one it published).
    pub fn base_version(&self) -> VersionInfo {
        self.state.lock().base.clone()
    }

    /// Lineage that `sync` publishes onto, or `None` before the first sync
    /// of a session opened on a pinned version.
    pub fn lineage(&self) -> Option<LineageName> {
        self.state.lock().lineage.clone()
    }

    /// Kernel cache entries made stale since the last call, by other
    /// writers' changes that a rebase or [`Session::follow_head`] brought in.
    pub fn take_invalidations(&self) -> Vec<Invalidation> {
        std::mem::take(&mut self.state.lock().invalidations)
    }

    /// Moves a read-only session on a lineage to the lineage's current head,
    /// if it moved. Inodes cached by the session are dropped, except those
    /// of open files that the new head removed, so an open file keeps
    /// reading. Returns the new base, or `None` when the head did not move.
    ///
    /// NOTE: an open file that the new head modified in place is not kept,
    /// so its next read returns bytes of the new version.
    pub fn follow_head(&self) -> Result<Option<VersionInfo>> {
        let Some(lineage) = self.lineage() else {
            return Err(EngineError::InvalidArgument(format!(
                "session {} on volume {} is on a pinned version, which has no head to follow",
                self.id, self.volume
            )));
        };
        if !self.is_read_only() {
            return Err(EngineError::InvalidArgument(format!(
                "session {} on volume {} is writable; only read-only sessions follow a lineage head",
                self.id, self.volume
            )));
        }
        let (seq, head) = self.store.head_entry(&self.volume, &lineage)?;
        let old = self.base_version();
        if head.id == old.id {
            return Ok(None);
        }
        let changes = self.store.diff(&self.volume, old.id, head.id)?;
        let root = self.store.load_checkpoint(&self.volume, head.id)?;
        let new_tree = self.store.open_session(&self.volume, SessionBase::Version(head.id), Access::ReadOnly)?;
        let invalidations = invalidations_for(&changes, self, &new_tree);

        let mut state = self.state.lock();
        let removed: HashSet<Ino> =
            changes.iter().filter(|c| c.kind == crate::diff::ChangeKind::Removed).map(|c| c.ino).collect();
        // Open files the new head removed keep their inode from the old tree.
        let open: Vec<Ino> = state.open_handles.keys().copied().filter(|ino| removed.contains(ino)).collect();
        let mut kept = HashMap::new();
        for ino in open {
            kept.insert(ino, state.inode(&self.store, &self.volume, ino)?.clone());
        }
        tracing::debug!(open = state.open_handles.len(), kept = kept.len(), removed = removed.len(), "inodes kept across the head move");
        state.inodes = kept;
        state.pages.clear();
        state.root = root;
        state.base = head.clone();
        state.base_entry_seq = seq;
        state.invalidations.extend(invalidations);
        drop(state);
        tracing::info!(volume = %self.volume, lineage = %lineage, from = %old.id, to = %head.id, changes = changes.len(), "followed the lineage head");
        Ok(Some(head))
    }

    /// True when the session holds changes that `sync` would publish.
    pub fn has_changes(&self) -> bool {
        !self.state.lock().dirty.is_empty()
    }

    /// Ends the session without publishing: its unsynced writes and its
    /// directory are deleted, and later changes fail. Dropping the last
    /// handle does the same; a mount calls this because other threads may
    /// still hold handles when the process exits.
    pub fn discard(&self) {
        self.discarded.store(true, std::sync::atomic::Ordering::SeqCst);
        drop(self.lease.lock().take());
        let mut state = self.state.lock();
        if let Some(log) = state.log.take() {
            for (segment, _) in &log.sealed {
                self.store.segments.forget(*segment);
            }
            drop(log);
        }
        if let Some(dir) = &self.dir {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => tracing::warn!(session = %self.id, error = %err, "failed to delete the directory of an ended session"),
            }
        }
    }

    /// Takes a lease on this session's base version, so that `gc` keeps it
    /// while the session lives; writable sessions hold one from the start.
    /// A read-only mount calls this; it needs write access to the store.
    pub fn hold_lease(&self) -> Result<()> {
        let mut lease = self.lease.lock();
        if lease.is_none() {
            let base = self.state.lock().base.id;
            *lease = Some(Lease::acquire(self.store.objects().clone(), &self.volume, self.id, &[base])?);
            // The base may have been collected between the open and the lease.
            self.store.check_checkpoint_in_store(&self.volume, base)?;
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.discarded.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::ReadOnly { reason: format!("session {} on volume {} has ended", self.id, self.volume) });
        }
        match self.access {
            Access::Writable => Ok(()),
            Access::ReadOnly => Err(EngineError::ReadOnly {
                reason: format!("session on version {} of volume {} is read-only", self.state.lock().base.id, self.volume),
            }),
        }
    }
}

impl Session {
    /// Loads inode `ino` of a read-only session from the base checkpoint,
    /// unless it is loaded already, without holding the session lock while
    /// it fetches the inode's page and directory listing. The result is kept
    /// only if the session still has the same page of the same checkpoint,
    /// which a move to a new lineage head may have replaced meanwhile.
    /// An inode that the checkpoint does not have is left to the caller.
    pub(crate) fn preload(&self, ino: Ino) -> Result<()> {
        debug_assert!(self.is_read_only(), "only a read-only session never changes its inodes");
        let page_no = ino.0 / INODES_PER_PAGE;
        let (key, page) = {
            let state = self.state.lock();
            if state.inodes.contains_key(&ino) {
                return Ok(());
            }
            let Some(key) = state.root.pages.get(&page_no).cloned() else { return Ok(()) };
            let page = state.pages.get(&page_no).cloned();
            (key, page)
        };
        let page = match page {
            Some(page) => page,
            None => {
                let bytes = self.store.read_object(&key)?;
                Arc::new(decode_page(&bytes).map_err(|detail| EngineError::CorruptObject { key: key.clone(), detail })?)
            }
        };
        let inode = match page.get(&ino) {
            Some(record) => Some(inode_from_record(&self.store, &self.volume, record)?),
            None => None,
        };
        let mut state = self.state.lock();
        if state.root.pages.get(&page_no) != Some(&key) {
            return Ok(());
        }
        state.pages.entry(page_no).or_insert(page);
        if let Some(inode) = inode {
            state.inodes.entry(ino).or_insert(inode);
        }
        Ok(())
    }
}

impl State {
    /// Returns the inode, loading it from the base checkpoint on first use.
    pub fn inode(&mut self, store: &Store, volume: &VolumeName, ino: Ino) -> Result<&mut Inode> {
        if !self.inodes.contains_key(&ino) {
            let inode = self.load_inode(store, volume, ino)?;
            self.inodes.insert(ino, inode);
        }
        Ok(self.inodes.get_mut(&ino).expect("inserted above"))
    }

    fn load_inode(&mut self, store: &Store, volume: &VolumeName, ino: Ino) -> Result<Inode> {
        let page_no = ino.0 / INODES_PER_PAGE;
        let page = match self.pages.get(&page_no) {
            Some(page) => page.clone(),
            None => {
                let Some(key) = self.root.pages.get(&page_no) else {
                    return Err(EngineError::not_found("inode", ino.to_string()));
                };
                let bytes = store.read_object(key)?;
                let records = decode_page(&bytes).map_err(|detail| EngineError::CorruptObject { key: key.clone(), detail })?;
                let page = Arc::new(records);
                self.pages.insert(page_no, page.clone());
                page
            }
        };
        let record = page.get(&ino).ok_or_else(|| EngineError::not_found("inode", ino.to_string()))?;
        inode_from_record(store, volume, record)
    }


    /// Loads one page of the base checkpoint, if it has that page.
    pub(crate) fn base_page(&mut self, store: &Store, page_no: u64) -> Result<Option<Arc<BTreeMap<Ino, InodeRecord>>>> {
        self.base_record(store, Ino(page_no * INODES_PER_PAGE))?;
        Ok(self.pages.get(&page_no).cloned())
    }

    /// The base checkpoint's record of an inode, if it has one.
    pub fn base_record(&mut self, store: &Store, ino: Ino) -> Result<Option<InodeRecord>> {
        let page_no = ino.0 / INODES_PER_PAGE;
        if !self.pages.contains_key(&page_no) {
            let Some(key) = self.root.pages.get(&page_no) else { return Ok(None) };
            let bytes = store.read_object(key)?;
            let records = decode_page(&bytes).map_err(|detail| EngineError::CorruptObject { key: key.clone(), detail })?;
            self.pages.insert(page_no, Arc::new(records));
        }
        Ok(self.pages[&page_no].get(&ino).cloned())
    }
}

/// Builds an inode from its stored record, reading its directory chunks.
pub(crate) fn inode_from_record(store: &Store, volume: &VolumeName, record: &InodeRecord) -> Result<Inode> {
    let content = match &record.content {
        StoredContent::File(extents) => Content::File(extents.clone()),
        StoredContent::Symlink(target) => Content::Symlink(target.clone()),
        StoredContent::Special => Content::Special,
        StoredContent::Directory(chunks) => {
            let mut entries = BTreeMap::new();
            for chunk in chunks {
                let key = chunk_key(volume, &chunk.key);
                let bytes = store.read_object(&key)?;
                let decoded = decode_chunk(&bytes).map_err(|detail| EngineError::CorruptObject { key, detail })?;
                for (name, child, kind) in decoded {
                    entries.insert(name, (child, kind));
                }
            }
            Content::Directory(entries)
        }
    };
    Ok(Inode { attr: record.attr.clone(), links: record.links.clone(), xattrs: record.xattrs.clone(), content })
}

/// Kernel cache entries that `changes` (from `old_tree` to `new_tree`) make
/// stale: each changed inode, its parent directories, and its names in both
/// trees. A name that no longer resolves is skipped.
pub(crate) fn invalidations_for(changes: &[crate::diff::Change], old_tree: &Session, new_tree: &Session) -> Vec<Invalidation> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut add = |out: &mut Vec<Invalidation>, item: Invalidation| {
        if seen.insert(item.clone()) {
            out.push(item);
        }
    };
    for change in changes {
        add(&mut out, Invalidation::Inode(change.ino));
        let names = [(Some(&change.path), old_tree), (Some(&change.path), new_tree), (change.old_path.as_ref(), old_tree)];
        for (path, tree) in names {
            let Some(path) = path else { continue };
            let (parent_path, name) = match path.rsplit_once('/') {
                Some((parent, name)) => (parent, name),
                None => ("", path.as_str()),
            };
            let Ok(parent) = tree.resolve_path(parent_path) else { continue };
            add(&mut out, Invalidation::Inode(parent.ino));
            add(&mut out, Invalidation::Entry { parent: parent.ino, name: name.as_bytes().to_vec() });
        }
    }
    out
}
