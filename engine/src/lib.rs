//! The engine of Chalk volumes: an append-only segment log on local disk,
//! an in-memory extent index, incremental checkpoints, versions published
//! to an object store, and sessions that read and change one version.
//!
//! This crate knows nothing of FUSE; `chalk-fused` adapts [`Session`] to a
//! mounted file system and the `chalk` binary drives [`Store`].

pub mod cache;
pub mod catalog;
pub mod compact;
pub mod diff;
pub mod error;
pub mod extent;
pub mod format;
pub mod fsck;
pub mod gc;
pub mod ids;
pub mod inspect;
pub mod io;
pub mod lease;
pub mod lineage;
pub mod metrics;
pub mod object_store;
pub mod segment;
pub mod session;
pub mod space;
pub mod store;
pub mod tree;

pub use error::{EngineError, Result};

/// Blocks SIGPIPE on the calling thread and on the threads it starts later.
/// A write to a socket or pipe whose peer went away then fails with EPIPE
/// instead of ending the process. The CLI restores the default action at
/// start-up so that `chalk ... | head` ends quietly, so every thread that
/// writes to sockets must call this: the S3 runtime does, for its threads.
pub fn block_sigpipe_on_this_thread() {
    // SAFETY: the set is initialised by sigemptyset before use, and
    // pthread_sigmask only changes the calling thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
pub use ids::{Ino, LineageName, SegmentId, SessionId, VersionId, VolumeName};
pub use io::IoMode;
pub use metrics::Metrics;
pub use session::{
    normalize_path, Access, Invalidation, OnConflict, PathEntry, RetryAdvice, Session, SessionBase, SyncOptions, SyncOutcome,
};
pub use diff::{Change, ChangeKind};
pub use lineage::LineageSummary;
pub use store::{EntryKind, Store, StoreConfig, VersionInfo, VolumeSummary};
pub use tree::{Attr, DirEntry, FileKind, Owner, RenameMode, SetAttr, StatFs, TimeSet, Timestamp, XattrMode};
