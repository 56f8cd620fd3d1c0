//! A volume as the operator tools see it: every object under its prefix,
//! its lineage entries, tags, leases and gc records, and what each version
//! refers to. `fsck`, `gc` and `inspect` build on this.
//!
//! Nothing here writes. Reading problems (an entry that does not decode, a
//! page that is missing) are collected, not raised, so that `fsck` can
//! report all of them. `gc` deletes nothing when there is one.
//!
//! Every listing and control record is read from the store itself, never
//! from the metadata copies of [`crate::object_store::CachedStore`]: a
//! decision to delete must not rest on a copy that may be out of date.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::extent::Extent;
use crate::format::checkpoint::{decode_chunk, decode_page, frame, unframe, InodeRecord, ObjectType, RootCheckpoint, StoredContent};
use crate::ids::{Ino, LineageName, SegmentId, VersionId, VolumeName};
use crate::lease::{lease_prefix, LeaseRecord};
use crate::object_store::{list_all, ObjectMeta};
use crate::store::{checkpoint_key, chunk_key, decode_entry, segment_key, volume_prefix, Store, VersionInfo};

/// One lineage entry.
#[derive(Clone, Debug)]
pub struct EntryInfo {
    pub key: String,
    pub lineage: LineageName,
    /// Sequence number from the key.
    pub seq: u64,
    pub version: VersionInfo,
    /// `None` for a sync, else `fork` or `promote`.
    pub kind: Option<String>,
    pub modified: Option<SystemTime>,
}

/// One lease object.
#[derive(Clone, Debug)]
pub struct LeaseInfo {
    pub key: String,
    pub record: LeaseRecord,
    pub modified: Option<SystemTime>,
}

/// Lineage entries that a gc run removed, as it recorded them before deleting.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrunedRecord {
    pub run: String,
    pub created_at_ns: i64,
    pub entries: Vec<PrunedEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrunedEntry {
    pub lineage: String,
    pub seq: u64,
    pub version: String,
}

pub(crate) fn pruned_prefix(volume: &VolumeName) -> String {
    format!("volumes/{volume}/gc/pruned/")
}

impl PrunedRecord {
    pub fn encode(&self) -> Vec<u8> {
        frame(ObjectType::PrunedRecord, &serde_json::to_vec(self).expect("serializable"))
    }

    pub fn decode(bytes: &[u8]) -> std::result::Result<Self, String> {
        let payload = unframe(ObjectType::PrunedRecord, bytes)?;
        serde_json::from_slice(payload).map_err(|e| e.to_string())
    }
}

/// A problem found while reading a volume's objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadProblem {
    pub key: String,
    pub detail: String,
    /// The request to the store failed, so the object may well be intact.
    pub unreachable: bool,
}

impl ReadProblem {
    fn bad(key: &str, detail: String) -> Self {
        ReadProblem { key: key.to_owned(), detail, unreachable: false }
    }

    fn failed(key: &str, error: &EngineError) -> Self {
        match error {
            // The store's URL goes into the error that reports the problem.
            EngineError::ObjectStore { detail, .. } => ReadProblem { key: key.to_owned(), detail: detail.clone(), unreachable: true },
            other => ReadProblem { key: key.to_owned(), detail: other.to_string(), unreachable: false },
        }
    }

    /// Converts the problem into the error of a command that cannot go on
    /// without the object: [`EngineError::ObjectStore`] when the request
    /// failed, so that an object that may be intact is not called damaged,
    /// and [`EngineError::CorruptObject`] otherwise. `next_step` ends the
    /// message of either.
    pub fn into_error(self, store: &Store, next_step: &str) -> EngineError {
        match self.unreachable {
            true => EngineError::ObjectStore {
                url: store.remote_objects().url(),
                detail: format!("reading {} failed ({}); {next_step}", self.key, self.detail),
            },
            false => EngineError::CorruptObject { key: self.key, detail: format!("{}; {next_step}", self.detail) },
        }
    }
}

/// Everything under one volume's prefix, with its control records decoded.
pub struct Catalog {
    pub volume: VolumeName,
    /// Whether the volume record exists; a deleted volume has none.
    pub exists: bool,
    /// Every object under `volumes/<volume>/`, by key.
    pub objects: BTreeMap<String, ObjectMeta>,
    /// Lineage entries in key order (by lineage, then sequence number).
    pub entries: Vec<EntryInfo>,
    pub tags: Vec<(String, VersionId)>,
    pub leases: Vec<LeaseInfo>,
    pub pruned: Vec<PrunedEntry>,
    pub problems: Vec<ReadProblem>,
}

impl Catalog {
    /// Lists the volume's objects and decodes its entries, tags, leases and
    /// gc records. Fails only when the listing fails.
    pub fn read(store: &Store, volume: &VolumeName) -> Result<Catalog> {
        let prefix = volume_prefix(volume);
        let listing = list_all(store.remote_objects().as_ref(), &prefix)?;
        let objects: BTreeMap<String, ObjectMeta> = listing.into_iter().map(|o| (o.key.clone(), o)).collect();
        let mut catalog = Catalog {
            volume: volume.clone(),
            exists: objects.contains_key(&format!("{prefix}volume")),
            objects,
            entries: Vec::new(),
            tags: Vec::new(),
            leases: Vec::new(),
            pruned: Vec::new(),
            problems: Vec::new(),
        };
        let keys: Vec<ObjectMeta> = catalog.objects.values().cloned().collect();
        for meta in keys {
            let rest = &meta.key[prefix.len()..];
            if rest.starts_with("lineages/") {
                catalog.read_entry(store, &meta);
            } else if let Some(tag) = rest.strip_prefix("tags/") {
                match store.tag_target(volume, tag) {
                    Ok(Some(version)) => catalog.tags.push((tag.to_owned(), version)),
                    Ok(None) => {}
                    Err(err) => catalog.problems.push(ReadProblem::failed(&meta.key, &err)),
                }
            } else if rest.starts_with("leases/") {
                match read_lease(store, &meta) {
                    Ok(Some(lease)) => catalog.leases.push(lease),
                    Ok(None) => {}
                    Err(err) => catalog.problems.push(ReadProblem::failed(&meta.key, &err)),
                }
            } else if rest.starts_with("gc/pruned/") {
                match store.remote_objects().get(&meta.key) {
                    Ok(Some(bytes)) => match PrunedRecord::decode(&bytes) {
                        Ok(record) => catalog.pruned.extend(record.entries),
                        Err(detail) => catalog.problem(&meta.key, detail),
                    },
                    Ok(None) => {}
                    Err(err) => catalog.problems.push(ReadProblem::failed(&meta.key, &err)),
                }
            }
        }
        Ok(catalog)
    }

    fn problem(&mut self, key: &str, detail: String) {
        self.problems.push(ReadProblem::bad(key, detail));
    }

    fn read_entry(&mut self, store: &Store, meta: &ObjectMeta) {
        let rest = &meta.key[volume_prefix(&self.volume).len() + "lineages/".len()..];
        let Some((lineage, seq)) = rest.split_once('/') else {
            return self.problem(&meta.key, "not a lineage entry key".into());
        };
        let (Ok(lineage), Ok(seq)) = (LineageName::new(lineage), seq.parse::<u64>()) else {
            return self.problem(&meta.key, "not a lineage entry key".into());
        };
        let decoded = match store.remote_objects().get(&meta.key) {
            Ok(Some(bytes)) => decode_entry(&meta.key, &bytes),
            // Deleted between the listing and the read.
            Ok(None) => return,
            Err(err) => Err(err),
        };
        match decoded {
            Ok((version, kind)) => {
                self.entries.push(EntryInfo { key: meta.key.clone(), lineage, seq, version, kind, modified: meta.modified })
            }
            Err(err) => self.problems.push(ReadProblem::failed(&meta.key, &err)),
        }
    }

    /// Every version named by an entry, each once, by id.
    pub fn versions(&self) -> BTreeMap<VersionId, VersionInfo> {
        self.entries.iter().map(|e| (e.version.id, e.version.clone())).collect()
    }

    /// Entries grouped by lineage, each group in sequence order.
    pub fn lineages(&self) -> BTreeMap<LineageName, Vec<&EntryInfo>> {
        let mut out: BTreeMap<LineageName, Vec<&EntryInfo>> = BTreeMap::new();
        for entry in &self.entries {
            out.entry(entry.lineage.clone()).or_default().push(entry);
        }
        for group in out.values_mut() {
            group.sort_by_key(|e| e.seq);
        }
        out
    }
}

/// Lists and decodes the lineage entries of a volume; any entry that does
/// not decode fails the call.
pub(crate) fn read_entries(store: &Store, volume: &VolumeName) -> Result<Vec<EntryInfo>> {
    let mut catalog = Catalog {
        volume: volume.clone(),
        exists: true,
        objects: BTreeMap::new(),
        entries: Vec::new(),
        tags: Vec::new(),
        leases: Vec::new(),
        pruned: Vec::new(),
        problems: Vec::new(),
    };
    for meta in list_all(store.remote_objects().as_ref(), &format!("volumes/{volume}/lineages/"))? {
        catalog.read_entry(store, &meta);
    }
    if let Some(problem) = catalog.problems.into_iter().next() {
        return Err(match problem.unreachable {
            true => EngineError::ObjectStore { url: store.remote_objects().url(), detail: problem.detail },
            false => EngineError::CorruptObject { key: problem.key, detail: problem.detail },
        });
    }
    Ok(catalog.entries)
}

/// Reads the lease at `meta`; `None` when it was deleted since the listing.
pub(crate) fn read_lease(store: &Store, meta: &ObjectMeta) -> Result<Option<LeaseInfo>> {
    let Some(bytes) = store.remote_objects().get(&meta.key)? else { return Ok(None) };
    let record = LeaseRecord::decode(&meta.key, &bytes)?;
    Ok(Some(LeaseInfo { key: meta.key.clone(), record, modified: meta.modified }))
}

/// Lists and reads the leases of a volume.
pub(crate) fn read_leases(store: &Store, volume: &VolumeName) -> Result<Vec<LeaseInfo>> {
    let mut out = Vec::new();
    for meta in list_all(store.remote_objects().as_ref(), &lease_prefix(volume))? {
        out.extend(read_lease(store, &meta)?);
    }
    Ok(out)
}

/// One extent of one file of a version.
#[derive(Clone, Debug)]
pub struct ExtentRef {
    pub ino: Ino,
    pub file_offset: u64,
    pub extent: Extent,
}

/// Objects and extents that one version refers to.
#[derive(Clone, Debug, Default)]
pub struct VersionRefs {
    pub root_key: String,
    pub page_keys: Vec<String>,
    pub chunk_keys: BTreeSet<String>,
    pub extents: Vec<ExtentRef>,
    /// The first link of each inode, to build paths.
    pub links: HashMap<Ino, (Ino, Vec<u8>)>,
    pub problems: Vec<ReadProblem>,
}

impl VersionRefs {
    pub fn segments(&self) -> BTreeSet<SegmentId> {
        self.extents.iter().map(|e| e.extent.segment).collect()
    }

    /// The path of an inode in this version, from its links.
    pub fn path_of(&self, ino: Ino) -> String {
        let mut parts = Vec::new();
        let mut at = ino;
        while at != Ino::ROOT && parts.len() < 4096 {
            let Some((parent, name)) = self.links.get(&at) else {
                parts.push(format!("<inode {at}>"));
                break;
            };
            parts.push(String::from_utf8_lossy(name).into_owned());
            at = *parent;
        }
        parts.reverse();
        parts.join("/")
    }
}

/// How much of each object a walk reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkCheck {
    /// Directory chunks are only named, not read (gc).
    NameOnly,
    /// Directory chunks are read and decoded (fsck).
    Read,
}

/// Walks versions' checkpoints, sharing decoded pages between versions.
pub struct Walker<'a> {
    store: &'a Store,
    volume: VolumeName,
    chunks: ChunkCheck,
    pages: HashMap<String, std::result::Result<Arc<BTreeMap<Ino, InodeRecord>>, ReadProblem>>,
    chunk_results: HashMap<String, Option<ReadProblem>>,
}

impl<'a> Walker<'a> {
    pub fn store(&self) -> &'a Store {
        self.store
    }

    pub fn new(store: &'a Store, volume: &VolumeName, chunks: ChunkCheck) -> Self {
        Walker { store, volume: volume.clone(), chunks, pages: HashMap::new(), chunk_results: HashMap::new() }
    }

    /// Reads a version's root and every page, and collects the chunks and
    /// extents they refer to. Problems are collected in the result.
    pub fn walk(&mut self, version: VersionId) -> VersionRefs {
        let mut refs = VersionRefs { root_key: checkpoint_key(&self.volume, version), ..VersionRefs::default() };
        let root = match self.store.read_object(&refs.root_key) {
            Ok(bytes) => RootCheckpoint::decode(&bytes).map_err(|detail| ReadProblem::bad(&refs.root_key, detail)),
            Err(err) => Err(ReadProblem::failed(&refs.root_key, &err)),
        };
        let root = match root {
            Ok(root) => root,
            Err(problem) => {
                refs.problems.push(problem);
                return refs;
            }
        };
        for key in root.pages.values() {
            refs.page_keys.push(key.clone());
            let page = self.page(key);
            let records = match page {
                Ok(records) => records,
                Err(problem) => {
                    refs.problems.push(problem);
                    continue;
                }
            };
            for (ino, record) in records.iter() {
                if let Some(link) = record.links.first() {
                    refs.links.insert(*ino, link.clone());
                }
                match &record.content {
                    StoredContent::File(extents) => {
                        for (file_offset, extent) in extents.iter() {
                            refs.extents.push(ExtentRef { ino: *ino, file_offset, extent });
                        }
                    }
                    StoredContent::Directory(chunks) => {
                        for chunk in chunks {
                            let key = chunk_key(&self.volume, &chunk.key);
                            if let Some(problem) = self.check_chunk(&key) {
                                refs.problems.push(problem);
                            }
                            refs.chunk_keys.insert(key);
                        }
                    }
                    StoredContent::Symlink(_) | StoredContent::Special => {}
                }
            }
        }
        refs
    }

    /// True unless a read shows the object is missing; a failed read counts
    /// as present, so the caller reads it and reports the failure.
    pub fn object_exists(&self, key: &str) -> bool {
        !matches!(self.store.remote_objects().get(key), Ok(None))
    }

    fn page(&mut self, key: &str) -> std::result::Result<Arc<BTreeMap<Ino, InodeRecord>>, ReadProblem> {
        if let Some(found) = self.pages.get(key) {
            return found.clone();
        }
        let loaded = match self.store.read_object(key) {
            Ok(bytes) => decode_page(&bytes).map(Arc::new).map_err(|detail| ReadProblem::bad(key, detail)),
            Err(err) => Err(ReadProblem::failed(key, &err)),
        };
        self.pages.insert(key.to_owned(), loaded.clone());
        loaded
    }

    fn check_chunk(&mut self, key: &str) -> Option<ReadProblem> {
        if self.chunks == ChunkCheck::NameOnly {
            return None;
        }
        if let Some(found) = self.chunk_results.get(key) {
            return found.clone();
        }
        let result = match self.store.read_object(key) {
            Ok(bytes) => decode_chunk(&bytes).err().map(|detail| ReadProblem::bad(key, detail)),
            Err(err) => Some(ReadProblem::failed(key, &err)),
        };
        self.chunk_results.insert(key.to_owned(), result.clone());
        result
    }
}

/// Object key of a segment of `volume`.
pub fn segment_object_key(volume: &VolumeName, segment: SegmentId) -> String {
    segment_key(volume, segment)
}
