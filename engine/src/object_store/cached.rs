//! Local copies of the metadata objects that opening a session reads, so
//! that a host keeps opening sessions on what it read before while its
//! object store is unreachable.
//!
//! [`CachedStore`] wraps a remote store (S3) and keeps a copy of each
//! volume record, version record, checkpoint root, inode page, directory
//! chunk and tag it reads, and of each page of the listings under
//! `volumes/`, in `$CHALK_HOME/cache/objects/`. Segment bytes go through
//! the block cache instead and pass through this layer untouched.
//!
//! Two rules, by key:
//! - Checkpoints and inode pages (named by version id) and directory chunks
//!   (named by hash) never change once written, so their copy is read first
//!   and the store is asked only on a miss.
//! - Volume records, lineage entries, tags and listings can change (a
//!   lineage deleted and forked again reuses its entry keys), so the store is asked
//!   first. Only when it fails (after its own retries) is the copy used, with
//!   a warning, and for [`OFFLINE_WINDOW`] after such a failure later reads
//!   of keys with a copy do not wait for the store again.
//!
//! Copy file (`<blake3 of the key, 32 hex digits>.obj`), integers little-endian:
//!
//! | offset | size | field                                   |
//! |--------|------|-----------------------------------------|
//! | 0      | 8    | magic `CHLKOBJ1`                        |
//! | 8      | 4    | key length K                            |
//! | 12     | 4    | CRC32 of the key and the payload        |
//! | 16     | K    | the key (a listing: `list:` and its query) |
//! | 16 + K | ...  | the payload                             |
//!
//! A copy is written to a temporary file and renamed into place. A copy that
//! fails its checks is deleted and counts as a miss. The disk tier's
//! eviction counts these files against the same limit as cached blocks.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{ConditionalWrites, IncompleteUpload, ListPage, ObjectMeta, ObjectStore};
use crate::error::{EngineError, Result};

const MAGIC: &[u8; 8] = b"CHLKOBJ1";
const HEADER_LEN: usize = 16;
/// After the store failed a request, reads of keys with a local copy use it
/// without asking the store, for this long.
pub const OFFLINE_WINDOW: Duration = Duration::from_secs(10);

/// Caching rule of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Never changes once written: the local copy is read first.
    Immutable,
    /// Can change: the local copy is read only when the store fails.
    Mutable,
}

fn kind_of(key: &str) -> Option<Kind> {
    let mut parts = key.split('/');
    if parts.next() != Some("volumes") {
        return None;
    }
    let _volume = parts.next()?;
    match (parts.next()?, parts.next(), parts.next(), parts.next()) {
        ("volume", None, _, _) => Some(Kind::Mutable),
        ("checkpoints" | "pages" | "dirs", Some(_), None, _) => Some(Kind::Immutable),
        // volumes/<volume>/lineages/<lineage>/<seq>: a deleted lineage can
        // be forked again under its name, with new entries at the same keys.
        ("lineages", Some(_), Some(_), None) => Some(Kind::Mutable),
        ("tags", Some(_), None, _) => Some(Kind::Mutable),
        _ => None,
    }
}

/// A page of a listing as kept on disk.
#[derive(Serialize, Deserialize)]
struct SavedPage {
    objects: Vec<SavedMeta>,
    next_start_after: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SavedMeta {
    key: String,
    size: u64,
    modified_unix_ms: Option<u64>,
}

/// Object store wrapper that keeps local copies of metadata objects (see the module documentation).
pub struct CachedStore {
    inner: Arc<dyn ObjectStore>,
    dir: PathBuf,
    /// Until when reads of keys with a copy skip the store.
    offline_until: Mutex<Option<Instant>>,
    warned: AtomicBool,
}

impl CachedStore {
    /// Wraps `inner`, keeping copies under `dir` (created if missing).
    pub fn new(inner: Arc<dyn ObjectStore>, dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| EngineError::io("creating metadata cache directory", dir, e))?;
        Ok(CachedStore { inner, dir: dir.to_owned(), offline_until: Mutex::new(None), warned: AtomicBool::new(false) })
    }

    /// The store this one wraps, for tools that must see only what it holds.
    pub fn remote(&self) -> &Arc<dyn ObjectStore> {
        &self.inner
    }

    fn path(&self, name: &str) -> PathBuf {
        let hash = blake3::hash(name.as_bytes()).to_hex();
        self.dir.join(format!("{}.obj", &hash[..32]))
    }

    fn recall(&self, name: &str) -> Option<Vec<u8>> {
        let path = self.path(name);
        let bytes = fs::read(&path).ok()?;
        match decode(name, &bytes) {
            Ok(payload) => Some(payload.to_vec()),
            Err(detail) => {
                tracing::warn!(path = %path.display(), key = name, detail, "dropping a damaged metadata copy");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    fn remember(&self, name: &str, payload: &[u8]) {
        let path = self.path(name);
        let temp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = fs::write(&temp, encode(name, payload)).and_then(|()| fs::rename(&temp, &path));
        if let Err(err) = written {
            let _ = fs::remove_file(&temp);
            tracing::debug!(path = %path.display(), error = %err, "failed to keep a metadata copy");
        }
    }

    fn forget(&self, name: &str) {
        let _ = fs::remove_file(self.path(name));
    }

    fn offline(&self) -> bool {
        self.offline_until.lock().is_some_and(|until| Instant::now() < until)
    }

    /// Records that the store failed and the local copy of `name` is used instead.
    fn fell_back(&self, name: &str, err: &EngineError) {
        *self.offline_until.lock() = Some(Instant::now() + OFFLINE_WINDOW);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                url = %self.inner.url(), key = name, error = %err,
                "the object store failed; using metadata cached on this host, which may be out of date, until it answers again"
            );
        }
    }

    /// Reads a key that can change: the store first, the copy when it fails.
    fn get_mutable(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if self.offline() {
            if let Some(copy) = self.recall(key) {
                return Ok(Some(copy));
            }
        }
        match self.inner.get(key) {
            Ok(Some(bytes)) => {
                *self.offline_until.lock() = None;
                self.remember(key, &bytes);
                Ok(Some(bytes))
            }
            Ok(None) => {
                self.forget(key);
                Ok(None)
            }
            Err(err @ EngineError::ObjectStore { .. }) => match self.recall(key) {
                Some(copy) => {
                    self.fell_back(key, &err);
                    Ok(Some(copy))
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }
}

impl ObjectStore for CachedStore {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.inner.put(key, data)?;
        if kind_of(key).is_some() {
            self.remember(key, data);
        }
        Ok(())
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        self.inner.put_file(key, path)
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        let created = self.inner.put_if_absent(key, data)?;
        if created && kind_of(key).is_some() {
            self.remember(key, data);
        }
        Ok(created)
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        match kind_of(key) {
            None => self.inner.get(key),
            Some(Kind::Mutable) => self.get_mutable(key),
            Some(Kind::Immutable) => {
                if let Some(copy) = self.recall(key) {
                    return Ok(Some(copy));
                }
                let bytes = self.inner.get(key)?;
                if let Some(bytes) = &bytes {
                    self.remember(key, bytes);
                }
                Ok(bytes)
            }
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }

    fn get_range_bytes(&self, key: &str, offset: u64, len: u64) -> Result<bytes::Bytes> {
        self.inner.get_range_bytes(key, offset, len)
    }

    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_file(key)
    }

    fn get_range_pieces(&self, key: &str, offset: u64, len: u64, piece: usize) -> Result<(bytes::Bytes, Option<Vec<u32>>)> {
        self.inner.get_range_pieces(key, offset, len, piece)
    }

    fn get_to_file(&self, key: &str, path: &Path) -> Result<bool> {
        self.inner.get_to_file(key, path)
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        if !prefix.starts_with("volumes/") {
            return self.inner.list(prefix, start_after, limit);
        }
        let name = format!("list:{prefix}\0{}\0{limit}", start_after.unwrap_or(""));
        let saved = || self.recall(&name).and_then(|bytes| serde_json::from_slice::<SavedPage>(&bytes).ok());
        if self.offline() {
            if let Some(page) = saved() {
                return Ok(page.into_page());
            }
        }
        match self.inner.list(prefix, start_after, limit) {
            Ok(page) => {
                *self.offline_until.lock() = None;
                if let Ok(bytes) = serde_json::to_vec(&SavedPage::from_page(&page)) {
                    self.remember(&name, &bytes);
                }
                Ok(page)
            }
            Err(err @ EngineError::ObjectStore { .. }) => match saved() {
                Some(page) => {
                    self.fell_back(prefix, &err);
                    Ok(page.into_page())
                }
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key)?;
        if kind_of(key).is_some() {
            self.forget(key);
        }
        Ok(())
    }

    fn conditional_writes(&self) -> Result<ConditionalWrites> {
        self.inner.conditional_writes()
    }

    fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<IncompleteUpload>> {
        self.inner.incomplete_uploads(prefix)
    }

    fn abort_upload(&self, upload: &IncompleteUpload) -> Result<()> {
        self.inner.abort_upload(upload)
    }

    fn attach_metrics(&self, metrics: &Arc<crate::metrics::Metrics>) {
        self.inner.attach_metrics(metrics);
    }
}

impl SavedPage {
    fn from_page(page: &ListPage) -> Self {
        let objects = page
            .objects
            .iter()
            .map(|o| SavedMeta {
                key: o.key.clone(),
                size: o.size,
                modified_unix_ms: o
                    .modified
                    .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as u64),
            })
            .collect();
        SavedPage { objects, next_start_after: page.next_start_after.clone() }
    }

    fn into_page(self) -> ListPage {
        let objects = self
            .objects
            .into_iter()
            .map(|o| ObjectMeta {
                key: o.key,
                size: o.size,
                modified: o.modified_unix_ms.map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
            })
            .collect();
        ListPage { objects, next_start_after: self.next_start_after }
    }
}

fn encode(name: &str, payload: &[u8]) -> Vec<u8> {
    let mut crc = crc32fast::Hasher::new();
    crc.update(name.as_bytes());
    crc.update(payload);
    let mut out = Vec::with_capacity(HEADER_LEN + name.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(payload);
    out
}

fn decode<'a>(name: &str, bytes: &'a [u8]) -> std::result::Result<&'a [u8], String> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err("the file is too short or lacks the CHLKOBJ1 magic".into());
    }
    let key_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let stored_crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let Some(key) = bytes.get(HEADER_LEN..HEADER_LEN + key_len) else {
        return Err(format!("the key length {key_len} runs past the end of the file"));
    };
    let payload = &bytes[HEADER_LEN + key_len..];
    let mut crc = crc32fast::Hasher::new();
    crc.update(key);
    crc.update(payload);
    let found = crc.finalize();
    if found != stored_crc {
        return Err(format!("CRC32 {found:08x} does not match {stored_crc:08x}"));
    }
    if key != name.as_bytes() {
        return Err(format!("the file holds the copy of {:?}", String::from_utf8_lossy(key)));
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_classified_by_whether_they_change() {
        assert_eq!(kind_of("volumes/v/checkpoints/01abc"), Some(Kind::Immutable));
        assert_eq!(kind_of("volumes/v/pages/01abc-3f"), Some(Kind::Immutable));
        assert_eq!(kind_of("volumes/v/dirs/abcdef"), Some(Kind::Immutable));
        assert_eq!(kind_of("volumes/v/lineages/main/00000000000000000001"), Some(Kind::Mutable));
        assert_eq!(kind_of("volumes/v/volume"), Some(Kind::Mutable));
        assert_eq!(kind_of("volumes/v/tags/best"), Some(Kind::Mutable));
        assert_eq!(kind_of("volumes/v/segments/x.seg"), None);
        assert_eq!(kind_of("volumes/v/leases/x"), None);
        assert_eq!(kind_of("store/conditional-writes"), None);
        assert_eq!(kind_of("volumes/v/lineages/main"), None);
    }

    #[test]
    fn wrong_or_damaged_copy_rejected() {
        let encoded = encode("volumes/v/volume", b"payload");
        assert_eq!(decode("volumes/v/volume", &encoded).unwrap(), b"payload");
        assert!(decode("volumes/w/volume", &encoded).unwrap_err().contains("holds the copy"));
        let mut damaged = encoded.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert!(decode("volumes/v/volume", &damaged).unwrap_err().contains("CRC32"));
        assert!(decode("volumes/v/volume", &encoded[..10]).is_err());
    }
}
