//! Compaction: a new version of a lineage with the same content as its
//! head, in which the live bytes of mostly dead segments are copied into
//! new segments. `gc` then frees the old segments once retention drops the
//! versions that still use them.
//!
//! A segment's live ratio is the bytes of its records that any version in
//! a lineage refers to, divided by the size of its object. The compaction
//! version is an ordinary sync of a session on the lineage head: only
//! extents move, attributes (times included) stay, and its message starts
//! with `compaction of`. A writer that changed the same files meanwhile
//! makes it fail with a conflict, and nothing is published.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::catalog::{Catalog, ChunkCheck, Walker};
use crate::error::{EngineError, Result};
use crate::extent::Extent;
use crate::format::record::{encode_data_prefix, RecordType, DATA_PREFIX_LEN, HEADER_LEN};
use crate::ids::{Ino, LineageName, SegmentId, VolumeName};
use crate::session::{Access, RetryAdvice, Session, SessionBase, SyncOptions, SyncOutcome};
use crate::store::{segment_key, Store, VersionInfo};
use crate::tree::Content;

/// Dead bytes below which a segment is not worth copying out of: small
/// segments of a few records and their block padding would otherwise be
/// compacted on every run.
pub const COMPACT_MIN_DEAD_BYTES: u64 = 64 << 10;

/// Outcome of compacting one lineage.
#[derive(Clone, Debug)]
pub struct Compaction {
    pub lineage: LineageName,
    /// Segments of the head whose live ratio was below the threshold.
    pub segments: Vec<SegmentId>,
    /// Bytes copied into new segments.
    pub copied_bytes: u64,
    /// The compaction version; `None` when no segment was below the threshold.
    pub version: Option<VersionInfo>,
}

impl Store {
    /// Compacts the head of every lineage of `volume` whose segments have a
    /// live ratio below `threshold` (between 0 and 1).
    pub fn compact(self: &std::sync::Arc<Self>, volume: &VolumeName, threshold: f64) -> Result<Vec<Compaction>> {
        if !(0.0..=1.0).contains(&threshold) {
            return Err(EngineError::InvalidArgument(format!("compaction threshold {threshold} is not between 0 and 1")));
        }
        let catalog = Catalog::read(self, volume)?;
        let mut walker = Walker::new(self, volume, ChunkCheck::NameOnly);

        // Live bytes per segment, from every version of every lineage.
        let mut live: HashMap<SegmentId, BTreeMap<u64, u64>> = HashMap::new();
        let mut extents_of = HashMap::new();
        for version in catalog.versions().keys() {
            let refs = walker.walk(*version);
            if let Some(problem) = refs.problems.into_iter().next() {
                let next_step = match problem.unreachable {
                    true => "compaction stopped before changing anything: run it again once the store is reachable".to_owned(),
                    false => format!("compaction stopped before changing anything: run `chalk fsck {volume}`"),
                };
                return Err(problem.into_error(self, &next_step));
            }
            for extent in &refs.extents {
                live.entry(extent.extent.segment).or_default().insert(extent.extent.record_offset, extent.extent.record_len as u64);
            }
            extents_of.insert(*version, refs.extents);
        }
        // A segment qualifies when its live ratio is below the threshold and
        // compacting it frees at least COMPACT_MIN_DEAD_BYTES.
        let qualifies = |segment: &SegmentId| -> bool {
            let Some(size) = catalog.objects.get(&segment_key(volume, *segment)).map(|o| o.size) else { return false };
            let bytes: u64 = live.get(segment).map(|records| records.values().sum()).unwrap_or(0);
            size > 0 && (bytes as f64 / size as f64) < threshold && size.saturating_sub(bytes) >= COMPACT_MIN_DEAD_BYTES
        };

        let mut out = Vec::new();
        for (lineage, entries) in catalog.lineages() {
            let head = &entries.last().expect("a lineage has entries").version;
            let head_extents = &extents_of[&head.id];
            let low: BTreeSet<SegmentId> = head_extents
                .iter()
                .map(|e| e.extent.segment)
                .filter(|s| qualifies(s))
                .collect();
            let mut compaction = Compaction { lineage: lineage.clone(), segments: low.iter().copied().collect(), copied_bytes: 0, version: None };
            if !low.is_empty() {
                let inodes: BTreeSet<Ino> = head_extents.iter().filter(|e| low.contains(&e.extent.segment)).map(|e| e.ino).collect();
                let session = self.open_session(volume, SessionBase::Lineage(lineage.clone()), Access::Writable)?;
                if session.base_version().id != head.id {
                    return Err(EngineError::HeadMoved {
                        volume: volume.to_string(),
                        lineage: lineage.to_string(),
                        base: head.id.to_string(),
                        head: session.base_version().id.to_string(),
                    });
                }
                for ino in inodes {
                    compaction.copied_bytes += session.rewrite_extents(ino, &low)?;
                }
                let message = format!("compaction of {}", head.id);
                let options = SyncOptions {
                    message: Some(message),
                    // The session ends with the compaction.
                    retry: RetryAdvice::Repeat("run the compaction again".to_owned()),
                    ..SyncOptions::default()
                };
                match session.sync_with(&options)? {
                    SyncOutcome::Published(version) => compaction.version = Some(version),
                    SyncOutcome::NothingToPublish { .. } => {}
                }
                tracing::info!(volume = %volume, lineage = %lineage, segments = low.len(), bytes = compaction.copied_bytes, "published a compaction version");
            }
            out.push(compaction);
        }
        Ok(out)
    }
}

impl Session {
    /// Copies the bytes of a file's extents that lie in `segments` into this
    /// session's log, leaving the file's attributes as they are. Returns the
    /// bytes copied.
    pub(crate) fn rewrite_extents(&self, ino: Ino, segments: &BTreeSet<SegmentId>) -> Result<u64> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let state = &mut *state;
        let moving: Vec<(u64, Extent)> = match &state.inode(&self.store, &self.volume, ino)?.content {
            Content::File(extents) => extents.iter().filter(|(_, x)| segments.contains(&x.segment)).collect(),
            _ => return Ok(0),
        };
        let mut copied = 0;
        for (file_offset, extent) in moving {
            let mut data = vec![0u8; extent.len as usize];
            self.store.segments.read(&self.volume, &extent, &mut data)?;
            let prefix = encode_data_prefix(ino, file_offset);
            let log = state.log.as_mut().expect("writable sessions have a log");
            let appended = log.append(self, RecordType::Data, &[&prefix, &data])?;
            let inode = state.inodes.get_mut(&ino).expect("loaded above");
            let Content::File(extents) = &mut inode.content else { unreachable!("checked above") };
            extents.insert(
                file_offset,
                Extent {
                    len: extent.len,
                    segment: appended.segment,
                    data_offset: appended.record_offset + (HEADER_LEN + DATA_PREFIX_LEN) as u64,
                    record_offset: appended.record_offset,
                    record_len: appended.record_len,
                },
            );
            copied += extent.len;
        }
        if copied > 0 {
            state.dirty.insert(ino);
        }
        Ok(copied)
    }
}
