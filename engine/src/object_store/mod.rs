//! Object stores: where sealed segments, checkpoints and version records are
//! replicated. The trait is shaped like S3 (keys, whole puts, create-if-absent,
//! ranged gets, paginated listing) so that nothing above it assumes a local path.
//!
//! Two backends: [`FileStore`] (`file:///path`, the default) and [`S3Store`]
//! (`s3://bucket/prefix`, any S3-compatible store).

mod cached;
mod file;
mod s3;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

pub use cached::{CachedStore, OFFLINE_WINDOW};
pub use file::FileStore;
pub use s3::{S3Endpoint, S3Location, S3Settings, S3Store, PROBE_RECORD_KEY};

use crate::error::{EngineError, Result};
use crate::metrics::Metrics;

/// One object found by a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was last written, by the store's clock; `None` when
    /// the store did not say. `gc` never deletes an object without one.
    pub modified: Option<SystemTime>,
}

/// One page of a listing; `next_start_after` is set when more keys follow.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectMeta>,
    pub next_start_after: Option<String>,
}

/// Whether a store enforces `put_if_absent` atomically.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionalWrites {
    /// Of two concurrent creates of one key, exactly one succeeds.
    Honoured,
    /// The store ignores conditional writes: `put_if_absent` checks for the
    /// key, then writes it, so two concurrent creates can both succeed and
    /// one of the two objects is lost (single-writer mode).
    Ignored,
}

/// Warning for a store whose conditional writes are
/// [`ConditionalWrites::Ignored`], where the create-if-absent write of a
/// lineage entry cannot stop a second host.
pub const SINGLE_WRITER_WARNING: &str = "the object store ignores conditional writes (If-None-Match), so Chalk runs in \
     single-writer mode there: publishing to one lineage from more than one host at a time can lose a version";

/// An S3-shaped key-value store of immutable objects.
///
/// A wrapper (metrics, metadata copies, test faults) forwards every method,
/// those with a default body too, or the store it wraps loses that behaviour.
pub trait ObjectStore: Send + Sync {
    /// The store's URL, for messages.
    fn url(&self) -> String;

    /// Stores `data` under `key`, replacing any object there.
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;

    /// Stores the contents of a local file under `key`.
    fn put_file(&self, key: &str, path: &Path) -> Result<()>;

    /// Stores `data` under `key` only if no object exists there. Returns
    /// `false`, storing nothing, when one does. Atomic: of two concurrent
    /// callers at most one gets `true`.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool>;

    /// Returns the whole object, or `None` when it does not exist.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;

    /// Returns `len` bytes from `offset`; fewer only at the end of the object.
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// [`get_range`](Self::get_range) into a shared buffer. A store may
    /// return a buffer aligned to 4096 bytes, which the disk cache then
    /// writes with `O_DIRECT` without copying it.
    fn get_range_bytes(&self, key: &str, offset: u64, len: u64) -> Result<bytes::Bytes> {
        self.get_range(key, offset, len).map(bytes::Bytes::from)
    }

    /// Reads like [`get_range_bytes`](Self::get_range_bytes), with the CRC32
    /// of each `piece`-byte part of the result; the last part may be shorter.
    /// A store that hashes the bytes as they arrive returns the CRCs, because
    /// that costs less than a later pass over them. Others return `None`.
    fn get_range_pieces(&self, key: &str, offset: u64, len: u64, piece: usize) -> Result<(bytes::Bytes, Option<Vec<u32>>)> {
        let _ = piece;
        Ok((self.get_range_bytes(key, offset, len)?, None))
    }

    /// Returns the local file that contains the object, for a store kept in a
    /// local directory; `None` for a remote store. The file may not exist.
    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        let _ = key;
        None
    }

    /// Copies the whole object into a new local file. Returns `false` when it does not exist.
    fn get_to_file(&self, key: &str, path: &Path) -> Result<bool>;

    /// Lists keys that start with `prefix`, in byte order, after `start_after`.
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage>;

    /// Deletes one object; deleting a missing object succeeds.
    fn delete(&self, key: &str) -> Result<()>;

    /// Returns how `put_if_absent` is enforced. A store that depends on the
    /// server for this probes it once and records the result in the store
    /// (see [`S3Store`]).
    fn conditional_writes(&self) -> Result<ConditionalWrites> {
        Ok(ConditionalWrites::Honoured)
    }

    /// Lists the multipart uploads under `prefix` that were started and
    /// neither completed nor aborted. A store without multipart uploads has none.
    fn incomplete_uploads(&self, _prefix: &str) -> Result<Vec<IncompleteUpload>> {
        Ok(Vec::new())
    }

    /// Aborts an incomplete multipart upload, freeing its parts. Aborting
    /// one that is already gone succeeds.
    fn abort_upload(&self, _upload: &IncompleteUpload) -> Result<()> {
        Ok(())
    }

    /// Gives the store the registry to count its retries in. Stores that
    /// do not retry ignore it; wrappers pass it to the store they wrap.
    fn attach_metrics(&self, _metrics: &Arc<Metrics>) {}
}

/// A multipart upload that was started and neither completed nor aborted:
/// a killed sync leaves one, and its parts take space until it is aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncompleteUpload {
    pub key: String,
    pub upload_id: String,
    /// Start time of the upload by the store's clock, or `None` when the listing omitted it.
    pub initiated: Option<SystemTime>,
}

/// Lists every key under `prefix`, following pagination.
pub fn list_all(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    let mut start_after: Option<String> = None;
    loop {
        let page = store.list(prefix, start_after.as_deref(), 1000)?;
        out.extend(page.objects);
        match page.next_start_after {
            Some(next) => start_after = Some(next),
            None => return Ok(out),
        }
    }
}

/// Opens the object store named by `url`: `file:///absolute/path` or `s3://bucket/prefix`.
pub fn open(url: &str) -> Result<Arc<dyn ObjectStore>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(EngineError::InvalidArgument(format!(
                "object store URL {url:?} must name an absolute path, as in file:///var/lib/chalk/objects"
            )));
        }
        return Ok(Arc::new(FileStore::open(Path::new(path))?));
    }
    if url.starts_with("s3://") {
        return Ok(Arc::new(S3Store::open(url)?));
    }
    Err(EngineError::InvalidArgument(format!(
        "object store URL {url:?} is not supported; use file:///absolute/path or s3://bucket/prefix"
    )))
}

/// Checks that a key is a relative path of non-empty, non-dot components.
pub(crate) fn validate_key(key: &str) -> Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        || key.bytes().any(|b| b == 0);
    if bad {
        return Err(EngineError::InvalidArgument(format!("invalid object key {key:?}")));
    }
    Ok(())
}
