//! Space accounting: the stored bytes each version and each lineage refers
//! to, split into bytes no other version (or lineage) refers to and bytes
//! shared with others.
//!
//! A byte is counted once per segment record: the unit is the whole record
//! (header, data prefix and data) that an extent points into, because that
//! is what stays in the object store while anything refers to it. Exclusive
//! bytes of a lineage are what deleting that lineage and collecting it with
//! `gc` would free, unless a tag or a lease keeps its versions.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::catalog::{Catalog, ChunkCheck, Walker};
use crate::error::{EngineError, Result};
use crate::ids::{LineageName, SegmentId, VersionId, VolumeName};
use crate::store::{Store, VersionInfo};

/// Stored bytes of one version or lineage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpaceUse {
    /// Bytes of every record referred to.
    pub bytes: u64,
    /// Bytes of records nothing outside this version or lineage refers to.
    pub exclusive_bytes: u64,
    /// Bytes of records something else refers to as well.
    pub shared_bytes: u64,
}

/// Space accounting of a volume.
#[derive(Clone, Debug, Default)]
pub struct SpaceReport {
    pub versions: Vec<(VersionInfo, SpaceUse)>,
    pub lineages: Vec<(LineageName, SpaceUse)>,
    /// Bytes of every record any version refers to, each once.
    pub total_bytes: u64,
}

type RecordKey = (SegmentId, u64);

impl Store {
    /// Computes the bytes per version and per lineage. Reads every inode
    /// page of every version, so it costs as much as a full walk.
    pub fn space(&self, volume: &VolumeName) -> Result<SpaceReport> {
        let catalog = Catalog::read(self, volume)?;
        if !catalog.exists {
            return Err(EngineError::not_found("volume", format!("{volume} (list them with `chalk volume list`)")));
        }
        let mut walker = Walker::new(self, volume, ChunkCheck::NameOnly);
        let mut records: BTreeMap<VersionId, HashMap<RecordKey, u64>> = BTreeMap::new();
        let mut users: HashMap<RecordKey, BTreeSet<VersionId>> = HashMap::new();
        let versions = catalog.versions();
        for id in versions.keys() {
            let refs = walker.walk(*id);
            if let Some(problem) = refs.problems.into_iter().next() {
                let next_step = match problem.unreachable {
                    true => "run the command again once the store is reachable".to_owned(),
                    false => format!("run `chalk fsck {volume}`"),
                };
                return Err(problem.into_error(self, &next_step));
            }
            let mine = records.entry(*id).or_default();
            for extent in &refs.extents {
                let key = (extent.extent.segment, extent.extent.record_offset);
                mine.insert(key, extent.extent.record_len as u64);
                users.entry(key).or_default().insert(*id);
            }
        }

        let mut report = SpaceReport::default();
        let mut all: HashMap<RecordKey, u64> = HashMap::new();
        for (id, mine) in &records {
            let mut usage = SpaceUse::default();
            for (key, len) in mine {
                usage.bytes += len;
                if users[key].len() == 1 {
                    usage.exclusive_bytes += len;
                } else {
                    usage.shared_bytes += len;
                }
                all.insert(*key, *len);
            }
            report.versions.push((versions[id].clone(), usage));
        }
        report.total_bytes = all.values().sum();

        // A version in several lineages (a fork's first entry) belongs to each,
        // so its records are exclusive to none of them.
        let mut lineages_of: HashMap<VersionId, BTreeSet<LineageName>> = HashMap::new();
        for entry in &catalog.entries {
            lineages_of.entry(entry.version.id).or_default().insert(entry.lineage.clone());
        }
        for (lineage, entries) in catalog.lineages() {
            let members: BTreeSet<VersionId> = entries.iter().map(|e| e.version.id).collect();
            let only_here = |id: &VersionId| lineages_of.get(id).is_some_and(|set| set.len() == 1 && set.contains(&lineage));
            let mut keys: HashMap<RecordKey, u64> = HashMap::new();
            for id in &members {
                keys.extend(records[id].iter().map(|(k, v)| (*k, *v)));
            }
            let mut usage = SpaceUse::default();
            for (key, len) in &keys {
                usage.bytes += len;
                if users[key].iter().all(only_here) {
                    usage.exclusive_bytes += len;
                } else {
                    usage.shared_bytes += len;
                }
            }
            report.lineages.push((lineage, usage));
        }
        Ok(report)
    }
}
