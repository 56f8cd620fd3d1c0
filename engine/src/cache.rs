//! The local segment cache: sealed segments on the local disk, fetched from
//! the object store on first use and verified before they are used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{EngineError, Result};
use crate::ids::{SegmentId, VolumeName};
use crate::object_store::ObjectStore;
use crate::segment::{self, SealedSegment};
use crate::store::segment_key;

/// Sealed segments on the local disk, by id: published ones under
/// `cache/segments/`, unpublished ones in their session's directory.
pub(crate) struct SegmentCache {
    dir: PathBuf,
    objects: Arc<dyn ObjectStore>,
    open: Mutex<HashMap<SegmentId, Arc<SealedSegment>>>,
}

impl SegmentCache {
    pub fn new(dir: PathBuf, objects: Arc<dyn ObjectStore>) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::io("creating segment cache", &dir, e))?;
        Ok(SegmentCache { dir, objects, open: Mutex::new(HashMap::new()) })
    }

    pub fn path(&self, id: SegmentId) -> PathBuf {
        self.dir.join(segment::file_name(id))
    }

    /// Returns a sealed segment, fetching it from the object store into the
    /// local cache when it is not on the local disk.
    pub fn get(&self, volume: &VolumeName, id: SegmentId) -> Result<Arc<SealedSegment>> {
        if let Some(found) = self.open.lock().get(&id) {
            return Ok(found.clone());
        }
        let path = self.path(id);
        if !path.exists() {
            self.fetch(volume, id, &path)?;
        }
        let sealed = Arc::new(SealedSegment::open(id, &path)?);
        Ok(self.open.lock().entry(id).or_insert(sealed).clone())
    }

    fn fetch(&self, volume: &VolumeName, id: SegmentId, path: &Path) -> Result<()> {
        let key = segment_key(volume, id);
        let tmp = self.dir.join(format!("{}.fetch-{}", segment::file_name(id), ulid::Ulid::new()));
        let found = self.objects.get_to_file(&key, &tmp)?;
        if !found {
            return Err(EngineError::CorruptObject {
                key,
                detail: format!("segment is referenced by a version but missing from {}", self.objects.url()),
            });
        }
        let bytes = std::fs::read(&tmp).map_err(|e| EngineError::io("reading fetched segment", &tmp, e))?;
        let report = segment::scan(&bytes);
        if let Some((offset, detail)) = report.invalid {
            let _ = std::fs::remove_file(&tmp);
            return Err(EngineError::CorruptSegment { object: "fetched segment", segment: id, offset, detail });
        }
        if !report.sealed {
            let _ = std::fs::remove_file(&tmp);
            return Err(EngineError::CorruptSegment {
                object: "fetched segment",
                segment: id,
                offset: report.valid_end,
                detail: "segment does not end with a seal record".into(),
            });
        }
        std::fs::rename(&tmp, path).map_err(|e| EngineError::io("renaming fetched segment", path, e))?;
        Ok(())
    }

    /// Registers a sealed segment that still lives in a session directory.
    pub fn insert_unpublished(&self, id: SegmentId, path: &Path) -> Result<Arc<SealedSegment>> {
        let sealed = Arc::new(SealedSegment::open(id, path)?);
        self.open.lock().insert(id, sealed.clone());
        Ok(sealed)
    }

    /// Moves a published segment from its session directory into the cache.
    /// The open memory map stays valid across the rename.
    pub fn adopt(&self, from: &Path, id: SegmentId) -> Result<()> {
        let to = self.path(id);
        std::fs::rename(from, &to).map_err(|e| EngineError::io("moving segment into the cache", &to, e))
    }

    pub fn forget(&self, id: SegmentId) {
        self.open.lock().remove(&id);
    }
}
