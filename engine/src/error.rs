//! Errors of the engine.
//!
//! One enum for the whole engine. Every variant carries the ids a reader needs
//! to find the problem (volume, version, inode, segment, offset), and the FUSE
//! adaptor maps each variant to exactly one errno.

use std::path::PathBuf;

use crate::ids::{Ino, SegmentId};

/// Result alias used throughout the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{what} not found: {name}")]
    NotFound { what: &'static str, name: String },

    #[error("{what} already exists: {name}")]
    AlreadyExists { what: &'static str, name: String },

    #[error("not a directory: inode {ino}")]
    NotDirectory { ino: Ino },

    #[error("is a directory: inode {ino}")]
    IsDirectory { ino: Ino },

    #[error("operation not permitted: {0}")]
    NotPermitted(String),

    #[error("directory not empty: inode {ino}")]
    DirectoryNotEmpty { ino: Ino },

    #[error("read-only session: {reason}")]
    ReadOnly { reason: String },

    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What the name is for: `volume`, `lineage`, `tag` or `file`.
        kind: &'static str,
        name: String,
        reason: &'static str,
    },

    #[error("name too long ({len} bytes, the limit is 255): {name:?}")]
    NameTooLong { name: String, len: usize },

    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("extended attribute {name:?} not found on inode {ino}")]
    NoXattr { ino: Ino, name: String },

    #[error("value too large: {0}")]
    TooLarge(String),

    #[error("operation not supported: {0}")]
    Unsupported(String),

    #[error("symbolic link loop or too many levels at {path:?}")]
    TooManyLinks { path: String },

    #[error(
        "corrupt {object} in segment {segment} at offset {offset}: {detail}; \
         if the damaged copy is the local cache, `chalk fsck --repair` fetches it again from the object store"
    )]
    CorruptSegment { object: &'static str, segment: SegmentId, offset: u64, detail: String },

    #[error("corrupt object {key:?}: {detail}; the object store's copy is damaged or missing")]
    CorruptObject { key: String, detail: String },

    #[error("lineage {lineage:?} of volume {volume:?} moved to version {head} after this session started at {base}; another writer published first, and this session keeps its writes")]
    HeadMoved { volume: String, lineage: String, base: String, head: String },

    #[error(
        "{} conflicts with lineage {lineage:?} of volume {volume:?}: version {head} changed the same paths ({}); {}",
        conflict_action(promoted.as_deref()),
        paths.join(", "),
        conflict_next_step(volume, promoted.as_deref())
    )]
    Conflict {
        volume: String,
        lineage: String,
        head: String,
        paths: Vec<String>,
        /// The version a `promote` tried to apply; `None` for the sync of a session.
        promoted: Option<String>,
    },

    #[error("object store {url}: {detail}")]
    ObjectStore { url: String, detail: String },

    #[error("{context} {path}: {source}")]
    Io { context: &'static str, path: PathBuf, source: std::io::Error },

    #[error("no space left on device while {context} {path}; free space under the store's local root and retry")]
    NoSpace { context: &'static str, path: PathBuf },
}

fn conflict_action(promoted: Option<&str>) -> String {
    match promoted {
        Some(source) => format!("promote of version {source}"),
        None => "sync".to_owned(),
    }
}

fn conflict_next_step(volume: &str, promoted: Option<&str>) -> String {
    match promoted {
        Some(source) => format!(
            "nothing was published; copy the wanted paths from the source with \
             `chalk volume cp {volume} PATH PATH --from-version {source}`, or edit them in a writable mount of the target lineage"
        ),
        None => "this session keeps its writes; sync with --on-conflict fork to publish into a new lineage, or ours to overwrite".to_owned(),
    }
}

impl EngineError {
    /// Wraps an I/O error with what was being done and on which path; `ENOSPC`
    /// becomes [`EngineError::NoSpace`] so callers can report it plainly.
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return EngineError::NoSpace { context, path };
        }
        EngineError::Io { context, path, source }
    }

    pub fn not_found(what: &'static str, name: impl Into<String>) -> Self {
        EngineError::NotFound { what, name: name.into() }
    }

    pub fn exists(what: &'static str, name: impl Into<String>) -> Self {
        EngineError::AlreadyExists { what, name: name.into() }
    }
}
