//! Read-only views of stored structures for `chalk inspect`: the records of
//! a segment, a checkpoint root, and a file's extent map.

use crate::error::{EngineError, Result};
use crate::extent::Extent;
use crate::format::checkpoint::RootCheckpoint;
use crate::format::record::{self, RecordType, SegmentHeader, DATA_PREFIX_LEN};
use crate::ids::{Ino, SegmentId, VersionId, VolumeName};
use crate::segment;
use crate::session::Session;
use crate::store::{checkpoint_key, segment_key, Store};
use crate::tree::{Attr, Content};

/// One record of a segment.
#[derive(Clone, Debug)]
pub struct RecordView {
    pub offset: u64,
    pub record_type: &'static str,
    pub len: u64,
    /// The record CRC stored in its header.
    pub crc: u32,
    /// For a data record: the inode, the file offset and the data length.
    pub data: Option<(Ino, u64, u64)>,
}

/// A segment's records, from the local cache or the object store.
#[derive(Clone, Debug)]
pub struct SegmentView {
    pub id: SegmentId,
    /// Source of the bytes: a local path or an object key.
    pub source: String,
    pub len: u64,
    pub header: Option<SegmentHeader>,
    pub sealed: bool,
    pub records: Vec<RecordView>,
    /// Offset and reason where the scan stopped at invalid bytes.
    pub invalid: Option<(u64, String)>,
}

impl Store {
    /// Names of the volumes that hold any object, deleted volumes included.
    pub fn volumes_with_objects(&self) -> Result<Vec<VolumeName>> {
        let mut names = std::collections::BTreeSet::new();
        for object in crate::object_store::list_all(self.objects().as_ref(), "volumes/")? {
            if let Some(name) = object.key.strip_prefix("volumes/").and_then(|k| k.split('/').next()) {
                if let Ok(name) = VolumeName::new(name) {
                    names.insert(name);
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Reads a segment's records from the local cache, else from the object store.
    pub fn inspect_segment(&self, id: SegmentId) -> Result<SegmentView> {
        let local = self.segments.path(id);
        let (source, bytes) = match std::fs::read(&local) {
            Ok(bytes) => (local.display().to_string(), bytes),
            Err(_) => {
                let mut found = None;
                for volume in self.volumes_with_objects()? {
                    let key = segment_key(&volume, id);
                    if let Some(bytes) = self.objects().get(&key)? {
                        found = Some((key, bytes));
                        break;
                    }
                }
                found.ok_or_else(|| {
                    EngineError::not_found("segment", format!("{id} (neither in {} nor in any volume of the object store)", local.display()))
                })?
            }
        };
        let scan = segment::scan(&bytes);
        let records = scan
            .records
            .iter()
            .map(|raw| {
                let header = &bytes[raw.offset..raw.offset + record::HEADER_LEN];
                let crc = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
                let payload = &bytes[raw.payload_offset..raw.end()];
                let data = (raw.record_type == RecordType::Data && payload.len() >= DATA_PREFIX_LEN).then(|| {
                    let ino = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
                    let file_offset = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
                    (Ino(ino), file_offset, (payload.len() - DATA_PREFIX_LEN) as u64)
                });
                let record_type = match raw.record_type {
                    RecordType::SegmentHeader => "header",
                    RecordType::Data => "data",
                    RecordType::Meta => "metadata",
                    RecordType::Seal => "seal",
                };
                RecordView { offset: raw.offset as u64, record_type, len: (raw.end() - raw.offset) as u64, crc, data }
            })
            .collect();
        Ok(SegmentView { id, source, len: bytes.len() as u64, header: scan.header, sealed: scan.sealed, records, invalid: scan.invalid })
    }

    /// Finds the volume that contains the checkpoint of `version`.
    pub fn volume_of_version(&self, version: VersionId) -> Result<VolumeName> {
        for volume in self.volumes_with_objects()? {
            if self.objects().get(&checkpoint_key(&volume, version))?.is_some() {
                return Ok(volume);
            }
        }
        Err(EngineError::not_found("version", format!("{version} (no volume of the store has its checkpoint)")))
    }

    /// Reads the checkpoint root of a version.
    pub fn inspect_checkpoint(&self, volume: &VolumeName, version: VersionId) -> Result<RootCheckpoint> {
        self.load_checkpoint(volume, version)
    }
}

impl Session {
    /// Returns the attributes and extent map of the regular file at
    /// `path`, as `(file offset, extent)` pairs in file order.
    pub fn file_extents(&self, path: &str) -> Result<(Attr, Vec<(u64, Extent)>)> {
        let attr = self.resolve_path(path)?;
        let mut state = self.state.lock();
        let inode = state.inode(&self.store, &self.volume, attr.ino)?;
        match &inode.content {
            Content::File(extents) => Ok((attr, extents.iter().collect())),
            _ => Err(EngineError::InvalidArgument(format!("{path} is not a regular file; only files have extents"))),
        }
    }
}
