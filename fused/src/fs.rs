//! The `fuser::Filesystem` implementation: one method per FUSE operation,
//! each of which opens a tracing span, calls the session, maps a failure once
//! and replies.
//!
//! Invariants:
//! - Every reply that gives the kernel an inode reference is preceded by
//!   `Session::remember(ino, 1)`, and every `forget` is passed on, so the
//!   engine's lookup counts equal the kernel's. Such replies are lookup,
//!   create, mknod, mkdir, symlink, link and readdirplus entries other than
//!   `.` and `..`. Counts go up before the reply is sent because the kernel
//!   may send `forget` as soon as it has the reply.
//! - Every successful `open` or `create` is matched by exactly one
//!   `Session::release` when the kernel releases the handle, which keeps an
//!   unlinked file readable while a descriptor is open.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use chalk_engine::metrics::FUSE_OPERATIONS;
use chalk_engine::{
    Attr, DirEntry, EngineError, FileKind, Ino, Owner, RenameMode, Session, SetAttr, XattrMode,
};
use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use prometheus_client::metrics::histogram::Histogram;
use tracing::span::EnteredSpan;

use crate::attr::{file_attr, file_type, time_set, timestamp, BLOCK_SIZE_BYTES};
use crate::errno::{log_failure, log_rejected};
use crate::passthrough::{self, Passthrough};
use crate::views::{self, Views};
use crate::workers::Workers;

/// Entry and attribute timeout for read-only sessions. Nothing can change
/// their tree through this mount, so the kernel may cache for long.
const READ_ONLY_TTL: Duration = Duration::from_secs(3600);

/// Entry and attribute timeout of `.chalk`, `.chalk/versions` and
/// `.chalk/tags`, whose listings grow as versions are published.
const VIEW_DIR_TTL: Duration = Duration::from_secs(1);

/// Entry and attribute timeout for writable sessions.
const WRITABLE_TTL: Duration = Duration::from_secs(1);

/// Largest write request the kernel may send, in bytes.
const MAX_WRITE_BYTES: u32 = BLOCK_SIZE_BYTES;

/// Readahead requested in INIT, in bytes. The kernel may offer less, and
/// then the nearest value is used. The mount's `read_ahead_kb` also caps
/// readahead, and [`crate::mount`] raises it for read-only sessions when it can.
const MAX_READAHEAD_BYTES: u32 = 1 << 20;

/// Inode numbers are never reused within a session, so one generation fits
/// every inode.
const GENERATION: Generation = Generation(0);

/// One open regular file.
struct OpenFile {
    ino: Ino,
    /// Flags given to `open(2)` or `creat(2)`.
    flags: i32,
    /// Whether the kernel serves this handle's reads from a backing file.
    passthrough: bool,
}

/// One entry of a directory listing as returned by readdir, `.` and `..`
/// included. Entry `i` of a listing has the directory offset `i + 1`.
struct ListedEntry {
    name: Vec<u8>,
    ino: Ino,
    kind: FileKind,
}

/// The FUSE adaptor over one engine session.
pub(crate) struct ChalkFs {
    session: Arc<Session>,
    read_only: bool,
    ttl: Duration,
    next_handle: AtomicU64,
    files: Arc<Mutex<HashMap<u64, OpenFile>>>,
    /// Listings by directory handle, taken when a read starts at offset 0
    /// so that later pages of the same pass see one consistent listing.
    dirs: Arc<Mutex<HashMap<u64, Option<Arc<Vec<ListedEntry>>>>>>,
    /// Serializes `O_APPEND` writes, so that reading the file size and
    /// writing at it are one step for every appender of this mount.
    append_lock: Mutex<()>,
    /// The read-only `.chalk` directory of past versions.
    views: Arc<Views>,
    /// Passthrough of large files; `None` for writable sessions.
    passthrough: Option<Arc<Passthrough>>,
    /// Threads that serve slow opens and reads from a remote store. Only a
    /// read-only session whose requests one thread reads has them; `None`
    /// serves every request on the thread that read it.
    workers: Option<Workers>,
    /// Whether reads go to `workers`: only when the store is remote, because
    /// a read of a local store waits at most on this host's disk, and
    /// handing it over costs a wake-up per read.
    reads_to_workers: bool,
    /// Latency histograms by operation name, resolved when the mount starts.
    op_latency: HashMap<&'static str, Histogram>,
}

/// Logs and returns the error for a change under `.chalk`, which is read-only.
fn read_only_view(op: &'static str, ino: u64) -> Errno {
    log_rejected(op, ino, Errno::EROFS, "the .chalk directory of past versions is read-only")
}

/// The tracing span of one FUSE operation. Dropping it, after the reply,
/// records the operation's latency.
struct OpGuard<'a> {
    _span: EnteredSpan,
    started: Instant,
    latency: Option<&'a Histogram>,
}

impl OpGuard<'_> {
    /// Hands the operation to a worker thread: the returned value enters the
    /// same span there and records the latency when the work ends.
    fn hand_off(mut self) -> HandedOff {
        HandedOff { span: tracing::Span::current(), started: self.started, latency: self.latency.take().cloned() }
    }
}

/// An operation that a worker thread finishes.
struct HandedOff {
    span: tracing::Span,
    started: Instant,
    latency: Option<Histogram>,
}

impl HandedOff {
    fn run(self, work: impl FnOnce()) {
        self.span.in_scope(work);
        if let Some(histogram) = self.latency {
            histogram.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        if let Some(histogram) = self.latency {
            histogram.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

fn engine_ino(ino: INodeNo) -> Ino {
    Ino(ino.0)
}

impl ChalkFs {
    /// Creates the adaptor. `passthrough_opens` counts the opens served
    /// through FUSE passthrough; `workers`, if any, serve opens that copy or
    /// check a passthrough file, and reads from a remote store.
    pub(crate) fn new(
        session: Arc<Session>,
        read_only: bool,
        passthrough_opens: Arc<AtomicU64>,
        workers: Option<Workers>,
    ) -> Self {
        let read_only = read_only || session.is_read_only();
        let metrics = session.store().metrics();
        let (volume, lineage) = (session.volume().as_str(), session.metrics_lineage());
        let op_latency = FUSE_OPERATIONS.iter().map(|&op| (op, metrics.fuse_operation(volume, lineage, op))).collect();
        ChalkFs {
            passthrough: Passthrough::new(&session, passthrough_opens).map(Arc::new),
            views: Arc::new(Views::new(&session)),
            reads_to_workers: workers.is_some() && !crate::store_is_local(&session),
            workers,
            session,
            read_only,
            ttl: if read_only { READ_ONLY_TTL } else { WRITABLE_TTL },
            next_handle: AtomicU64::new(1),
            files: Arc::new(Mutex::new(HashMap::new())),
            dirs: Arc::new(Mutex::new(HashMap::new())),
            append_lock: Mutex::new(()),
            op_latency,
        }
    }

    fn op_span(&self, op: &'static str, req: &Request, ino: u64) -> OpGuard<'_> {
        OpGuard {
            _span: tracing::debug_span!("fuse", op, req = req.unique().0, ino, pid = req.pid()).entered(),
            started: Instant::now(),
            latency: self.op_latency.get(op),
        }
    }

    fn allocate_handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    /// Page-cache flags for a newly opened file. Read-only sessions keep the
    /// cache across opens because the contents change only when a `--follow`
    /// mount moves to a new head, which invalidates what changed. Writable
    /// sessions drop cached pages on open and never use direct I/O, so every
    /// process of the mount shares one page cache and shared `mmap` works.
    fn file_open_flags(&self) -> FopenFlags {
        if self.read_only {
            // Flush has nothing to push in a read-only session, so close(2)
            // skips that round trip.
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::empty()
        }
    }

    /// Returns the passthrough state and the size of `ino` when this open
    /// may be served through FUSE passthrough: a read-only open of a large
    /// file in a session that has passthrough.
    fn passthrough_candidate(&self, ino: Ino, flags: OpenFlags) -> Option<(&Arc<Passthrough>, u64)> {
        // An inode with a registered backing file must keep using it, even
        // after a later registration failed: the kernel fails a normal open
        // of an inode that has passthrough opens.
        let passthrough = self.passthrough.as_ref().filter(|p| p.is_active() || p.is_registered(ino))?;
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return None;
        }
        match self.session.getattr(ino) {
            Ok(attr) if attr.kind == FileKind::File && attr.size >= passthrough::MIN_FILE_BYTES => {
                Some((passthrough, attr.size))
            }
            _ => None,
        }
    }

    /// Owner of a new inode, and whether it inherits the setgid bit because
    /// `parent` has it (the BSD group rule that Linux applies to setgid
    /// directories).
    fn new_owner(&self, req: &Request, parent: Ino) -> Result<(Owner, bool), EngineError> {
        let parent_attr = self.session.getattr(parent)?;
        let setgid = u32::from(parent_attr.perm) & libc::S_ISGID != 0;
        let gid = if setgid { parent_attr.gid } else { req.gid() };
        Ok((Owner { uid: req.uid(), gid }, setgid))
    }

    /// Timeout of an entry or attributes under `.chalk`: short for the
    /// directories that list versions, long for the trees of versions.
    fn view_ttl(&self, attr: &Attr) -> Duration {
        view_ttl(&self.views, attr)
    }

    /// Counts the kernel's new reference to `attr.ino`, then sends the entry.
    fn reply_entry(&self, reply: ReplyEntry, attr: &Attr) {
        self.session.remember(attr.ino, 1);
        reply.entry(&self.ttl, &file_attr(attr), GENERATION);
    }

    /// Runs `work`, the rest of the operation of `span`, on a worker when
    /// the store is remote, because it may wait on the store. Otherwise it
    /// runs on this thread, which saves a wake-up.
    fn serve_off_thread_if_remote(&self, span: OpGuard<'_>, work: impl FnOnce() + Send + 'static) {
        match self.workers.as_ref().filter(|_| self.reads_to_workers) {
            Some(workers) => {
                let op = span.hand_off();
                workers.run(move || op.run(work));
            }
            None => work(),
        }
    }

    /// Returns the parts of the adaptor that directory listings use, for a worker thread.
    fn listings(&self) -> Listings {
        Listings { session: Arc::clone(&self.session), views: Arc::clone(&self.views), dirs: Arc::clone(&self.dirs), ttl: self.ttl }
    }
}

impl Filesystem for ChalkFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Request only what this adaptor implements. Locks are left to the
        // kernel (no FUSE_POSIX_LOCKS or FUSE_FLOCK_LOCKS). Writeback caching
        // stays off, so every write, O_APPEND included, reaches the engine
        // before write(2) returns. FUSE-over-io_uring and passthrough stay off.
        // Passthrough is requested only for read-only sessions.
        let mut wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS;
        if self.passthrough.is_some() {
            wanted |= InitFlags::FUSE_PASSTHROUGH;
        }
        let available = config.capabilities() & wanted;
        if let Err(unsupported) = config.add_capabilities(available) {
            tracing::warn!(?unsupported, "kernel rejected FUSE capabilities that it had offered");
        }
        if let Some(passthrough) = &self.passthrough {
            // A stacking depth of 1 lets backing files live on a plain file
            // system; the kernel rejects passthrough at depth 0.
            let granted = available.contains(InitFlags::FUSE_PASSTHROUGH) && config.set_max_stack_depth(1).is_ok();
            passthrough.set_granted(granted);
            tracing::debug!(granted, "FUSE passthrough for large files");
        }
        if let Err(nearest) = config.set_max_readahead(MAX_READAHEAD_BYTES) {
            tracing::debug!(nearest, "max_readahead of 1 MiB not accepted; using the nearest value");
            let _ = config.set_max_readahead(nearest);
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE_BYTES) {
            tracing::debug!(nearest, "max_write of 1 MiB not accepted; using the nearest value");
            let _ = config.set_max_write(nearest);
        }
        tracing::debug!(capabilities = ?available, read_only = self.read_only, "FUSE session initialized");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let span = self.op_span("lookup", req, parent.0);
        if parent.0 == Ino::ROOT.0 && name.as_bytes() == views::RESERVED_NAME {
            match self.session.getattr(Ino::ROOT) {
                Ok(root) => reply.entry(&VIEW_DIR_TTL, &file_attr(&self.views.chalk_dir(&root)), GENERATION),
                Err(error) => reply.error(log_failure("lookup", parent.0, &error)),
            }
            return;
        }
        if views::is_view(parent.0) {
            // A lookup under `.chalk` may open another version's tree, which
            // fetches its metadata, so a worker serves it when the store is remote.
            let (session, views, name) = (Arc::clone(&self.session), Arc::clone(&self.views), name.to_owned());
            let look_up = move || {
                let result = session.getattr(Ino::ROOT).and_then(|root| views.lookup(parent.0, &name, &root));
                match result {
                    Ok(attr) => reply.entry(&view_ttl(&views, &attr), &file_attr(&attr), GENERATION),
                    Err(error) => reply.error(log_failure("lookup", parent.0, &error)),
                }
            };
            return self.serve_off_thread_if_remote(span, look_up);
        }
        let (ttl, read_only) = (self.ttl, self.read_only);
        // A lookup that must fetch metadata from a remote store goes to a
        // worker, so that this thread goes on serving the other requests.
        let Some(workers) = self.workers.as_ref().filter(|_| self.reads_to_workers) else {
            let result = self.session.lookup(engine_ino(parent), name);
            return reply_lookup(&self.session, (ttl, read_only), parent, result, reply);
        };
        match self.session.lookup_loaded(engine_ino(parent), name) {
            Some(result) => reply_lookup(&self.session, (ttl, read_only), parent, result, reply),
            None => {
                let op = span.hand_off();
                let (session, name) = (Arc::clone(&self.session), name.to_owned());
                workers.run(move || {
                    op.run(|| {
                        let result = session.lookup(engine_ino(parent), &name);
                        reply_lookup(&session, (ttl, read_only), parent, result, reply);
                    })
                });
            }
        }
    }

    // fuser 0.18 does not export `ForgetOne`, so `batch_forget` cannot be
    // overridden; its default calls this method once per inode.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // NOTE: nodes of `.chalk` keep their numbers and sessions for the
        // mount's lifetime, so memory grows with the versions a user visits.
        if views::is_view(ino.0) {
            return;
        }
        self.session.forget(engine_ino(ino), nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _span = self.op_span("getattr", req, ino.0);
        if views::is_view(ino.0) {
            let result = self.session.getattr(Ino::ROOT).and_then(|root| self.views.getattr(ino.0, &root));
            match result {
                Ok(attr) => reply.attr(&self.view_ttl(&attr), &file_attr(&attr)),
                Err(error) => reply.error(log_failure("getattr", ino.0, &error)),
            }
            return;
        }
        match self.session.getattr(engine_ino(ino)) {
            Ok(attr) => reply.attr(&self.ttl, &file_attr(&attr)),
            Err(error) => reply.error(log_failure("getattr", ino.0, &error)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _span = self.op_span("setattr", req, ino.0);
        if views::is_view(ino.0) {
            reply.error(read_only_view("setattr", ino.0));
            return;
        }
        // A size from ftruncate(2) arrives with the handle and one from
        // truncate(2) or O_TRUNC without it; both truncate the inode.
        let change = SetAttr {
            mode: mode.map(|mode| mode & 0o7777),
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(timestamp),
        };
        match self.session.setattr(engine_ino(ino), &change) {
            Ok(attr) => reply.attr(&self.ttl, &file_attr(&attr)),
            Err(error) => reply.error(log_failure("setattr", ino.0, &error)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _span = self.op_span("readlink", req, ino.0);
        let result = match views::is_view(ino.0) {
            true => self.views.readlink(ino.0),
            false => self.session.readlink(engine_ino(ino)),
        };
        match result {
            Ok(target) => reply.data(&target),
            Err(error) => reply.error(log_failure("readlink", ino.0, &error)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _span = self.op_span("mknod", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("mknod", parent.0));
            return;
        }
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => None,
            libc::S_IFIFO => Some(FileKind::Fifo),
            libc::S_IFSOCK => Some(FileKind::Socket),
            libc::S_IFCHR => Some(FileKind::CharDevice),
            libc::S_IFBLK => Some(FileKind::BlockDevice),
            _ => {
                // mknod(2) documents EPERM for a node type the file system does not support.
                reply.error(log_rejected("mknod", parent.0, Errno::EPERM, "node type not supported"));
                return;
            }
        };
        let result = self.new_owner(req, engine_ino(parent)).and_then(|(owner, _)| match kind {
            None => self.session.create(engine_ino(parent), name, mode & 0o7777, owner),
            Some(kind) => self.session.mknod(engine_ino(parent), name, kind, mode & 0o7777, rdev, owner),
        });
        match result {
            Ok(attr) => self.reply_entry(reply, &attr),
            Err(error) => reply.error(log_failure("mknod", parent.0, &error)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let _span = self.op_span("mkdir", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("mkdir", parent.0));
            return;
        }
        let result = self.new_owner(req, engine_ino(parent)).and_then(|(owner, setgid)| {
            let mut mode = mode & 0o7777;
            if setgid {
                mode |= libc::S_ISGID;
            }
            self.session.mkdir(engine_ino(parent), name, mode, owner)
        });
        match result {
            Ok(attr) => self.reply_entry(reply, &attr),
            Err(error) => reply.error(log_failure("mkdir", parent.0, &error)),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = self.op_span("unlink", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("unlink", parent.0));
            return;
        }
        match self.session.unlink(engine_ino(parent), name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("unlink", parent.0, &error)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = self.op_span("rmdir", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("rmdir", parent.0));
            return;
        }
        match self.session.rmdir(engine_ino(parent), name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("rmdir", parent.0, &error)),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let _span = self.op_span("symlink", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("symlink", parent.0));
            return;
        }
        let result = self.new_owner(req, engine_ino(parent)).and_then(|(owner, _)| {
            self.session.symlink(engine_ino(parent), link_name, target.as_os_str().as_bytes(), owner)
        });
        match result {
            Ok(attr) => self.reply_entry(reply, &attr),
            Err(error) => reply.error(log_failure("symlink", parent.0, &error)),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _span = self.op_span("rename", req, parent.0);
        if views::is_view(parent.0) || views::is_view(newparent.0) {
            reply.error(read_only_view("rename", parent.0));
            return;
        }
        let mode = if flags.is_empty() {
            RenameMode::Replace
        } else if flags == RenameFlags::RENAME_NOREPLACE {
            RenameMode::NoReplace
        } else if flags == RenameFlags::RENAME_EXCHANGE {
            RenameMode::Exchange
        } else {
            // RENAME_WHITEOUT (overlayfs whiteouts need character devices,
            // which the engine cannot store) and any combination of flags.
            reply.error(log_rejected("rename", parent.0, Errno::EINVAL, "unsupported rename flags"));
            return;
        };
        match self.session.rename(engine_ino(parent), name, engine_ino(newparent), newname, mode) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("rename", parent.0, &error)),
        }
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let _span = self.op_span("link", req, ino.0);
        if views::is_view(ino.0) || views::is_view(newparent.0) {
            reply.error(read_only_view("link", ino.0));
            return;
        }
        match self.session.link(engine_ino(ino), engine_ino(newparent), newname) {
            Ok(attr) => self.reply_entry(reply, &attr),
            Err(error) => reply.error(log_failure("link", ino.0, &error)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let span = self.op_span("open", req, ino.0);
        if views::is_view(ino.0) {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                reply.error(read_only_view("open", ino.0));
                return;
            }
            if let Err(error) = self.views.open(ino.0) {
                reply.error(log_failure("open", ino.0, &error));
                return;
            }
            let fh = self.allocate_handle();
            self.files.lock().insert(fh, OpenFile { ino: engine_ino(ino), flags: flags.0, passthrough: false });
            reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE);
            return;
        }
        if let Err(error) = self.session.open(engine_ino(ino)) {
            reply.error(log_failure("open", ino.0, &error));
            return;
        }
        let fh = self.allocate_handle();
        let ino = engine_ino(ino);
        let candidate = self.passthrough_candidate(ino, flags);
        // The handle is recorded before any reply, because the kernel may
        // send its release as soon as it has the reply.
        self.files.lock().insert(fh, OpenFile { ino, flags: flags.0, passthrough: candidate.is_some() });
        let normal_flags = self.file_open_flags();
        let Some((passthrough, size)) = candidate else {
            reply.opened(FileHandle(fh), normal_flags);
            return;
        };
        match &self.workers {
            // Copying or checking a backing file reads the whole file.
            Some(workers) if !passthrough.is_registered(ino) => {
                let op = span.hand_off();
                let (passthrough, session, files) =
                    (Arc::clone(passthrough), Arc::clone(&self.session), Arc::clone(&self.files));
                workers.run(move || {
                    op.run(|| open_passthrough(&passthrough, &session, &files, (ino, size, fh), normal_flags, reply))
                });
            }
            _ => open_passthrough(passthrough, &self.session, &self.files, (ino, size, fh), normal_flags, reply),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let span = self.op_span("read", req, ino.0);
        let (session, views) = (Arc::clone(&self.session), Arc::clone(&self.views));
        self.serve_off_thread_if_remote(span, move || reply_read(&session, &views, ino, offset, size, reply));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _span = self.op_span("write", req, ino.0);
        if views::is_view(ino.0) {
            reply.error(read_only_view("write", ino.0));
            return;
        }
        let ino = engine_ino(ino);
        // The kernel sends the file's current flags with each write, so an
        // O_APPEND set or cleared by fcntl(2) counts. The flags remembered at
        // open stand in only if a kernel sends none. Page-cache writeback
        // (dirty mmap pages) carries FUSE_WRITE_CACHE and must land at its
        // own offset.
        let current_flags = if flags.0 != 0 {
            flags.0
        } else {
            self.files.lock().get(&fh.0).map_or(0, |file| file.flags)
        };
        let append = current_flags & libc::O_APPEND != 0 && !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let result = if append {
            let _append_guard = self.append_lock.lock();
            self.session
                .file_size(ino)
                .and_then(|end| self.session.write(ino, end, data))
        } else {
            self.session.write(ino, offset, data)
        };
        match result {
            Ok(written) => reply.written(written),
            Err(error) => reply.error(log_failure("write", ino.0, &error)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // Every write reaches the session before its reply is sent, so
        // close(2) has nothing left to push.
        reply.ok();
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _span = self.op_span("release", req, ino.0);
        let file = self.files.lock().remove(&fh.0);
        match file {
            Some(file) if views::is_view(file.ino.0) => self.views.release(file.ino.0),
            Some(file) => {
                if file.passthrough {
                    if let Some(passthrough) = &self.passthrough {
                        passthrough.release(file.ino);
                    }
                }
                self.session.release(file.ino)
            }
            None => tracing::warn!(op = "release", ino = ino.0, fh = fh.0, "release of an unknown file handle"),
        }
        reply.ok();
    }

    fn fsync(&self, req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _span = self.op_span("fsync", req, ino.0);
        match self.session.fsync() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("fsync", ino.0, &error)),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _span = self.op_span("opendir", req, ino.0);
        let fh = self.allocate_handle();
        self.dirs.lock().insert(fh, None);
        // The listings of `.chalk` grow as versions are published, so the
        // kernel must not cache them; the trees of versions never change.
        let view_dir = views::is_view(ino.0) && self.views.is_version_tree(ino.0);
        let flags = if (self.read_only && !views::is_view(ino.0)) || view_dir {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        let span = self.op_span("readdir", req, ino.0);
        // A listing of a remote store may fetch metadata.
        let listings = self.listings();
        self.serve_off_thread_if_remote(span, move || listings.readdir(ino, fh, offset, reply));
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectoryPlus) {
        let span = self.op_span("readdirplus", req, ino.0);
        let listings = self.listings();
        self.serve_off_thread_if_remote(span, move || listings.readdirplus(ino, fh, offset, reply));
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.dirs.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let _span = self.op_span("fsyncdir", req, ino.0);
        match self.session.fsync() {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("fsyncdir", ino.0, &error)),
        }
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let _span = self.op_span("statfs", req, ino.0);
        match self.session.statfs() {
            Ok(stats) => reply.statfs(
                stats.blocks,
                stats.blocks_free,
                stats.blocks_available,
                stats.files,
                stats.files_free,
                stats.block_size,
                stats.name_max,
                stats.block_size,
            ),
            Err(error) => reply.error(log_failure("statfs", ino.0, &error)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        position: u32,
        reply: ReplyEmpty,
    ) {
        let _span = self.op_span("setxattr", req, ino.0);
        if views::is_view(ino.0) {
            reply.error(read_only_view("setxattr", ino.0));
            return;
        }
        // POSIX ACLs would have to change the mode bits too, which the engine
        // does not do, so they are refused and tools such as `cp -a` fall back to chmod.
        if name.as_bytes().starts_with(b"system.posix_acl_") {
            reply.error(log_rejected("setxattr", ino.0, Errno::ENOTSUP, "POSIX ACLs are not supported"));
            return;
        }
        let mode = match flags {
            0 => XattrMode::CreateOrReplace,
            libc::XATTR_CREATE => XattrMode::CreateOnly,
            libc::XATTR_REPLACE => XattrMode::ReplaceOnly,
            _ => {
                reply.error(log_rejected("setxattr", ino.0, Errno::EINVAL, "unknown setxattr flags"));
                return;
            }
        };
        if position != 0 {
            // Only macOS resource forks use a position.
            reply.error(log_rejected("setxattr", ino.0, Errno::EINVAL, "nonzero xattr position"));
            return;
        }
        match self.session.setxattr(engine_ino(ino), name, value, mode) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("setxattr", ino.0, &error)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _span = self.op_span("getxattr", req, ino.0);
        let result = match views::is_view(ino.0) {
            true => self.views.getxattr(ino.0, name),
            false => self.session.getxattr(engine_ino(ino), name),
        };
        match result {
            Ok(value) => reply_xattr(reply, &value, size),
            Err(error) => reply.error(log_failure("getxattr", ino.0, &error)),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _span = self.op_span("listxattr", req, ino.0);
        let result = match views::is_view(ino.0) {
            true => self.views.listxattr(ino.0),
            false => self.session.listxattr(engine_ino(ino)),
        };
        match result {
            Ok(names) => {
                // The list is each name followed by a NUL byte.
                let mut list = Vec::with_capacity(names.iter().map(|name| name.len() + 1).sum());
                for name in names {
                    list.extend_from_slice(&name);
                    list.push(0);
                }
                reply_xattr(reply, &list, size);
            }
            Err(error) => reply.error(log_failure("listxattr", ino.0, &error)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _span = self.op_span("removexattr", req, ino.0);
        if views::is_view(ino.0) {
            reply.error(read_only_view("removexattr", ino.0));
            return;
        }
        match self.session.removexattr(engine_ino(ino), name) {
            Ok(()) => reply.ok(),
            Err(error) => reply.error(log_failure("removexattr", ino.0, &error)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The mount uses `default_permissions`, so the kernel checks modes
        // itself and an access request only checks that the inode exists.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _span = self.op_span("create", req, parent.0);
        if views::is_view(parent.0) {
            reply.error(read_only_view("create", parent.0));
            return;
        }
        let result = self.new_owner(req, engine_ino(parent)).and_then(|(owner, _)| {
            let attr = self.session.create(engine_ino(parent), name, mode & 0o7777, owner)?;
            self.session.open(attr.ino)?;
            Ok(attr)
        });
        match result {
            Ok(attr) => {
                let fh = self.allocate_handle();
                self.files.lock().insert(fh, OpenFile { ino: attr.ino, flags, passthrough: false });
                self.session.remember(attr.ino, 1);
                reply.created(&self.ttl, &file_attr(&attr), GENERATION, FileHandle(fh), self.file_open_flags());
            }
            Err(error) => reply.error(log_failure("create", parent.0, &error)),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        let _span = self.op_span("fallocate", req, ino.0);
        if views::is_view(ino.0) {
            reply.error(read_only_view("fallocate", ino.0));
            return;
        }
        // The engine cannot reserve space ahead of writes, so no fallocate
        // mode can keep its promise. With EOPNOTSUPP, posix_fallocate(3) in
        // glibc falls back to writing the range.
        reply.error(log_rejected("fallocate", ino.0, Errno::ENOTSUP, "fallocate not supported"));
    }

    // The three operations below reply ENOSYS, which the kernel records as
    // "not implemented" and stops sending them. lseek then falls back to the
    // kernel's generic lseek, where SEEK_DATA and SEEK_HOLE treat the whole
    // file as data. copy_file_range falls back to read and write, and ioctl
    // fails with ENOTTY. fuser's default methods reply the same errno but log
    // a warning.

    fn lseek(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _offset: i64, _whence: i32, reply: fuser::ReplyLseek) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }
}

/// Reads `size` bytes of `ino` at `offset` and replies.
fn reply_read(session: &Session, views: &Views, ino: INodeNo, offset: u64, size: u32, reply: ReplyData) {
    let result = match views::is_view(ino.0) {
        true => views.read(ino.0, offset, size).map(Bytes::from),
        false => session.read_bytes(engine_ino(ino), offset, size),
    };
    match result {
        Ok(data) => reply.data(&data),
        Err(error) => reply.error(log_failure("read", ino.0, &error)),
    }
}

/// The parts of the adaptor that directory listings need, so that a worker thread can serve them.
struct Listings {
    session: Arc<Session>,
    views: Arc<Views>,
    dirs: Arc<Mutex<HashMap<u64, Option<Arc<Vec<ListedEntry>>>>>>,
    ttl: Duration,
}

impl Listings {
    /// Returns the listing of `dir` for a read at `offset`: a fresh one when
    /// the read starts a pass (offset 0) or the handle has none yet.
    fn listing(&self, dir: Ino, fh: u64, offset: u64) -> Result<Arc<Vec<ListedEntry>>, EngineError> {
        if offset > 0 {
            if let Some(Some(listing)) = self.dirs.lock().get(&fh) {
                return Ok(Arc::clone(listing));
            }
        }
        let mut listing = Vec::new();
        if views::is_view(dir.0) {
            let entries = self.views.listing(dir.0)?;
            listing.extend(entries.into_iter().map(|DirEntry { name, ino, kind }| ListedEntry { name, ino, kind }));
        } else {
            let entries = self.session.readdir(dir)?;
            let parent = self.session.parent_of(dir)?;
            listing.reserve(entries.len() + 2);
            listing.push(ListedEntry { name: b".".to_vec(), ino: dir, kind: FileKind::Directory });
            listing.push(ListedEntry { name: b"..".to_vec(), ino: parent, kind: FileKind::Directory });
            listing.extend(entries.into_iter().map(|DirEntry { name, ino, kind }| ListedEntry { name, ino, kind }));
        }
        let listing = Arc::new(listing);
        if let Some(slot) = self.dirs.lock().get_mut(&fh) {
            *slot = Some(Arc::clone(&listing));
        }
        Ok(listing)
    }

    fn readdir(&self, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let listing = match self.listing(engine_ino(ino), fh.0, offset) {
            Ok(listing) => listing,
            Err(error) => {
                reply.error(log_failure("readdir", ino.0, &error));
                return;
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (index, entry) in listing.iter().enumerate().skip(start) {
            let name = OsStr::from_bytes(&entry.name);
            let buffer_full = reply.add(INodeNo(entry.ino.0), index as u64 + 1, file_type(entry.kind), name);
            if buffer_full {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let listing = match self.listing(engine_ino(ino), fh.0, offset) {
            Ok(listing) => listing,
            Err(error) => {
                reply.error(log_failure("readdirplus", ino.0, &error));
                return;
            }
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let mut added = 0usize;
        let in_views = views::is_view(ino.0);
        for (index, entry) in listing.iter().enumerate().skip(start) {
            let looked_up = match views::is_view(entry.ino.0) {
                true => self.session.getattr(Ino::ROOT).and_then(|root| self.views.getattr(entry.ino.0, &root)),
                false => self.session.getattr(entry.ino),
            };
            let attr = match looked_up {
                Ok(attr) => attr,
                // Removed since the listing was taken.
                Err(EngineError::NotFound { .. }) => continue,
                Err(error) => {
                    let errno = log_failure("readdirplus", ino.0, &error);
                    if added == 0 {
                        reply.error(errno);
                        return;
                    }
                    // Send what fits so far; the next read resumes here and
                    // reports the error then.
                    break;
                }
            };
            // The kernel takes no reference for `.` and `..` (entries 0 and 1).
            let counted = index >= 2 && !in_views;
            if counted {
                self.session.remember(attr.ino, 1);
            }
            let name = OsStr::from_bytes(&entry.name);
            let buffer_full = reply.add(INodeNo(attr.ino.0), index as u64 + 1, name, &self.ttl, &file_attr(&attr), GENERATION);
            if buffer_full {
                if counted {
                    self.session.forget(attr.ino, 1);
                }
                break;
            }
            added += 1;
        }
        reply.ok();
    }
}

/// Entry and attribute timeout of a name under `.chalk`: the trees of
/// versions never change, while the listings of versions grow.
fn view_ttl(views: &Views, attr: &Attr) -> Duration {
    match views.is_version_tree(attr.ino.0) {
        true => READ_ONLY_TTL,
        false => VIEW_DIR_TTL,
    }
}

/// Replies to a lookup of a name in `parent` with its result. `entry` is the
/// entry timeout and whether the mount is read-only: there a missing name
/// gets a negative entry, which the kernel caches for the timeout.
fn reply_lookup(session: &Session, entry: (Duration, bool), parent: INodeNo, result: Result<Attr, EngineError>, reply: ReplyEntry) {
    let (ttl, read_only) = entry;
    match result {
        Ok(attr) => {
            session.remember(attr.ino, 1);
            reply.entry(&ttl, &file_attr(&attr), GENERATION);
        }
        // A zero inode number is a negative entry.
        Err(EngineError::NotFound { .. }) if read_only => reply.entry(&ttl, &negative_entry_attr(), GENERATION),
        Err(error) => reply.error(log_failure("lookup", parent.0, &error)),
    }
}

/// Serves a read-only open of a large file through FUSE passthrough, or as
/// a normal open with `normal_flags` when the file cannot be. The tuple is
/// the inode, its size and the handle already recorded in `files`.
fn open_passthrough(
    passthrough: &Passthrough,
    session: &Session,
    files: &Mutex<HashMap<u64, OpenFile>>,
    (ino, size, fh): (Ino, u64, u64),
    normal_flags: FopenFlags,
    reply: ReplyOpen,
) {
    // Linux rejects any open flag but FOPEN_PASSTHROUGH, FOPEN_DIRECT_IO,
    // FOPEN_PARALLEL_DIRECT_WRITES and FOPEN_NOFLUSH on a passthrough open
    // (FOPEN_PASSTHROUGH_MASK in fs/fuse/iomode.c), and fails the open(2)
    // with EIO. The page cache is the backing file's.
    let Some(reply) = passthrough.open(session, ino, size, FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, reply) else {
        return;
    };
    if let Some(file) = files.lock().get_mut(&fh) {
        file.passthrough = false;
    }
    reply.opened(FileHandle(fh), normal_flags);
}

/// Replies to getxattr or listxattr: the size alone for a size-0 probe,
/// ERANGE when the caller's buffer is too small, or the bytes.
fn reply_xattr(reply: ReplyXattr, bytes: &[u8], size: u32) {
    let Ok(len) = u32::try_from(bytes.len()) else {
        reply.error(Errno::E2BIG);
        return;
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(bytes);
    }
}

/// Attributes sent with a negative lookup entry. The kernel reads only the
/// zero inode number and the timeout.
fn negative_entry_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE_BYTES,
        flags: 0,
    }
}
