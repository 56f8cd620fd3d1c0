//! The store: a local root directory plus an object store, and the volumes,
//! lineages and versions kept in it.
//!
//! Object keys, all under `volumes/<volume>/`:
//!
//! | key                               | contents                                   |
//! |-----------------------------------|--------------------------------------------|
//! | `volume`                          | volume record (created once, if absent)    |
//! | `lineages/<lineage>/<seq:020>`    | version record; created if absent          |
//! | `checkpoints/<version>`           | checkpoint root                            |
//! | `pages/<version>-<page>`          | inode page written by that version         |
//! | `dirs/<blake3>`                   | directory chunk, content-addressed         |
//! | `segments/<segment>.seg`          | sealed segment                             |
//!
//! The lineage head is the version record with the highest sequence number.
//! Because each record is created with create-if-absent, two writers can
//! never both publish the same sequence number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::format::checkpoint::{frame, unframe, ObjectType, RootCheckpoint};
use crate::ids::{LineageName, SegmentId, VersionId, VolumeName};
use crate::io::IoMode;
use crate::object_store::{self, list_all, CachedStore, ObjectStore};
use crate::cache::{CacheConfig, CacheCounters, SegmentCache};
use crate::metrics::{MeteredStore, Metrics};
use crate::segment;
use crate::tree::Timestamp;

/// Where the store lives and how it writes.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Local root (`CHALK_HOME`): segment cache, sessions, control sockets.
    pub local_root: PathBuf,
    /// Object store URL (`CHALK_STORE`).
    pub object_store_url: String,
    pub io_mode: IoMode,
}

impl StoreConfig {
    /// Reads `CHALK_HOME` (default `~/.local/share/chalk`), `CHALK_STORE`
    /// (default `file://$CHALK_HOME/objects`) and `CHALK_IO`.
    pub fn from_env() -> Result<Self> {
        let local_root = match std::env::var_os("CHALK_HOME") {
            Some(home) if !home.is_empty() => PathBuf::from(home),
            _ => {
                let home = std::env::var_os("HOME").ok_or_else(|| {
                    EngineError::InvalidArgument("neither CHALK_HOME nor HOME is set; set CHALK_HOME to a directory".into())
                })?;
                PathBuf::from(home).join(".local/share/chalk")
            }
        };
        let local_root = std::path::absolute(&local_root)
            .map_err(|e| EngineError::io("resolving CHALK_HOME", &local_root, e))?;
        let object_store_url = match std::env::var("CHALK_STORE") {
            Ok(url) if !url.is_empty() => url,
            _ => format!("file://{}", local_root.join("objects").display()),
        };
        let io_mode = IoMode::from_env().map_err(EngineError::InvalidArgument)?;
        Ok(StoreConfig { local_root, object_store_url, io_mode })
    }

    pub fn with_local_root(local_root: &Path) -> Self {
        StoreConfig {
            local_root: local_root.to_owned(),
            object_store_url: format!("file://{}", local_root.join("objects").display()),
            io_mode: IoMode::Auto,
        }
    }
}

/// One published version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VersionInfo {
    pub id: VersionId,
    /// Position in its lineage, starting at 1.
    pub seq: u64,
    pub parent: Option<VersionId>,
    pub lineage: LineageName,
    pub created_at: Timestamp,
    pub message: Option<String>,
    /// Regular files in the version.
    pub files: u64,
    /// Sum of their sizes.
    pub bytes: u64,
    /// Segments sealed by the epoch that created this version.
    pub segments: Vec<SegmentId>,
}

/// Version record as stored (JSON inside an object frame).
#[derive(Serialize, Deserialize)]
struct VersionRecord {
    id: String,
    seq: u64,
    parent: Option<String>,
    lineage: String,
    created_at_ns: i64,
    message: Option<String>,
    files: u64,
    bytes: u64,
    segments: Vec<String>,
    /// How the entry came to be in its lineage: absent for a sync, `fork` for
    /// the first entry of a forked lineage, `promote` for a fast-forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entry: Option<String>,
}

/// How a version became an entry of a lineage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Published by a sync onto this lineage.
    Commit,
    /// The first entry of a lineage forked from an existing version.
    Fork,
    /// An existing version made the head by `promote`.
    Promote,
}

impl EntryKind {
    fn label(self) -> Option<String> {
        match self {
            EntryKind::Commit => None,
            EntryKind::Fork => Some("fork".into()),
            EntryKind::Promote => Some("promote".into()),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct VolumeRecord {
    name: String,
    created_at_ns: i64,
}

/// A volume as `chalk volume list` shows it.
#[derive(Clone, Debug)]
pub struct VolumeSummary {
    pub name: VolumeName,
    pub latest: VersionInfo,
}

pub(crate) fn volume_prefix(volume: &VolumeName) -> String {
    format!("volumes/{volume}/")
}

pub(crate) fn checkpoint_key(volume: &VolumeName, version: VersionId) -> String {
    format!("volumes/{volume}/checkpoints/{version}")
}

pub(crate) fn page_key(volume: &VolumeName, version: VersionId, page: u64) -> String {
    format!("volumes/{volume}/pages/{version}-{page:x}")
}

pub(crate) fn chunk_key(volume: &VolumeName, hash: &str) -> String {
    format!("volumes/{volume}/dirs/{hash}")
}

pub(crate) fn segment_key(volume: &VolumeName, segment: SegmentId) -> String {
    format!("volumes/{volume}/segments/{}", segment::file_name(segment))
}

pub(crate) fn lineage_prefix(volume: &VolumeName, lineage: &LineageName) -> String {
    format!("volumes/{volume}/lineages/{lineage}/")
}

pub(crate) fn version_key(volume: &VolumeName, lineage: &LineageName, seq: u64) -> String {
    format!("volumes/{volume}/lineages/{lineage}/{seq:020}")
}

/// Directory under the cache that contains [`CachedStore`]'s metadata copies.
pub const METADATA_CACHE_DIR: &str = "objects";

/// Store handle shared by every session of a process.
pub struct Store {
    config: StoreConfig,
    /// The object store, through local metadata copies when it is remote.
    objects: Arc<dyn ObjectStore>,
    /// The object store itself.
    remote: Arc<dyn ObjectStore>,
    pub(crate) segments: SegmentCache,
    /// Version records by key; they are immutable once created.
    versions: Mutex<HashMap<String, VersionInfo>>,
    metrics: Arc<Metrics>,
    /// Reads the cache counters for `metrics`, which holds only a weak reference.
    _cache_counters: Arc<dyn Fn() -> CacheCounters + Send + Sync>,
}

impl Store {
    /// Opens the store, creating its local directories.
    pub fn open(config: StoreConfig) -> Result<Arc<Store>> {
        for dir in ["cache/segments", "sessions"] {
            let path = config.local_root.join(dir);
            std::fs::create_dir_all(&path).map_err(|e| EngineError::io("creating store directory", &path, e))?;
        }
        // Only the default object store is created on first use: a missing
        // directory named by CHALK_STORE is more likely a typo or an unmounted disk.
        let default_url = format!("file://{}", config.local_root.join("objects").display());
        if let Some(path) = config.object_store_url.strip_prefix("file://") {
            if config.object_store_url != default_url && !Path::new(path).is_dir() {
                return Err(EngineError::NotFound {
                    what: "object store directory",
                    name: format!(
                        "{path} (create it, or unset CHALK_STORE to use {default_url})"
                    ),
                });
            }
        }
        let remote = object_store::open(&config.object_store_url)?;
        let cache = CacheConfig::from_env(&config.local_root.join("cache"))?;
        // A remote store gets local copies of the metadata that opening a
        // session reads, so that sessions still open while it is unreachable.
        let copies = (config.object_store_url.starts_with("s3://") && cache.disk_limit_bytes > 0)
            .then(|| config.local_root.join("cache").join(METADATA_CACHE_DIR));
        Self::assemble(config, remote, copies, cache)
    }

    /// Opens the store on an object store the caller built (tests use this to
    /// inject faults), with the cache sizes of the `CHALK_CACHE_*` settings.
    pub fn open_with(config: StoreConfig, objects: Arc<dyn ObjectStore>) -> Result<Arc<Store>> {
        let cache = CacheConfig::from_env(&config.local_root.join("cache"))?;
        Self::open_with_cache(config, objects, cache)
    }

    /// Opens the store on an object store the caller built, with the given cache sizes.
    pub fn open_with_cache(config: StoreConfig, objects: Arc<dyn ObjectStore>, cache: CacheConfig) -> Result<Arc<Store>> {
        Self::assemble(config, objects, None, cache)
    }

    /// Builds the store over `remote`: counted by the store's metrics, and
    /// with metadata copies under `copies` when set (see [`CachedStore`]).
    fn assemble(config: StoreConfig, remote: Arc<dyn ObjectStore>, copies: Option<PathBuf>, cache: CacheConfig) -> Result<Arc<Store>> {
        let metrics = Arc::new(Metrics::new());
        let remote: Arc<dyn ObjectStore> = Arc::new(MeteredStore::new(remote, Arc::clone(&metrics)));
        let objects: Arc<dyn ObjectStore> = match copies {
            Some(dir) => Arc::new(CachedStore::new(remote.clone(), &dir)?),
            None => remote.clone(),
        };
        let segments = SegmentCache::new(&config.local_root.join("cache"), remote.clone(), cache)?;
        let cache_counters = segments.counters_reader();
        metrics.register_cache(Arc::downgrade(&cache_counters));
        let store = Arc::new(Store {
            config,
            objects,
            remote,
            segments,
            versions: Mutex::new(HashMap::new()),
            metrics,
            _cache_counters: cache_counters,
        });
        crate::session::discard_abandoned_sessions(&store);
        Ok(store)
    }

    pub fn local_root(&self) -> &Path {
        &self.config.local_root
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// Counts a file written under `$CHALK_HOME/cache` outside the engine
    /// (a passthrough copy) against the disk cache limit, which may evict
    /// least recently used cache files.
    pub fn note_cache_file(&self, path: &Path) {
        self.segments.note_file_added(path);
    }

    /// The object store without the local metadata copies of
    /// [`CachedStore`], for checks that must see what the store holds.
    pub fn remote_objects(&self) -> &Arc<dyn ObjectStore> {
        &self.remote
    }

    /// The metrics registry of this store, which sessions, mounts and the
    /// dashboard record into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn sessions_dir(&self) -> PathBuf {
        self.config.local_root.join("sessions")
    }

    /// Creates a volume and publishes its empty first version on `main`.
    pub fn create_volume(self: &Arc<Self>, volume: &VolumeName) -> Result<VersionInfo> {
        let record = VolumeRecord { name: volume.to_string(), created_at_ns: now_ns() };
        let bytes = frame(ObjectType::VolumeRecord, &serde_json::to_vec(&record).expect("serializable"));
        if !self.objects.put_if_absent(&format!("{}volume", volume_prefix(volume)), &bytes)? {
            return Err(EngineError::exists("volume", volume.as_str()));
        }
        crate::session::publish_empty_version(self, volume)
    }

    pub fn volume_exists(&self, volume: &VolumeName) -> Result<bool> {
        Ok(self.objects.get(&format!("{}volume", volume_prefix(volume)))?.is_some())
    }

    fn require_volume(&self, volume: &VolumeName) -> Result<()> {
        if !self.volume_exists(volume)? {
            return Err(EngineError::NotFound {
                what: "volume",
                name: format!("{volume} (create it with `chalk volume create {volume}`)"),
            });
        }
        Ok(())
    }

    /// Lists volumes with their latest version on `main`, by name.
    pub fn list_volumes(&self) -> Result<Vec<VolumeSummary>> {
        let mut out = Vec::new();
        for object in list_all(self.objects.as_ref(), "volumes/")? {
            let Some(name) = object.key.strip_prefix("volumes/").and_then(|k| k.strip_suffix("/volume")) else {
                continue;
            };
            if name.contains('/') {
                continue;
            }
            let name = VolumeName::new(name)?;
            if let Some((_, latest)) = self.head_opt(&name, &LineageName::main())? {
                out.push(VolumeSummary { name, latest });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes a volume: its record, lineage entries and tags, so that no
    /// version of it is visible any more. Its segments and checkpoints stay
    /// until `gc` of the volume frees them, which waits for the leases of
    /// sessions still reading it and for the grace period.
    pub fn delete_volume(&self, volume: &VolumeName) -> Result<()> {
        self.require_volume(volume)?;
        // The volume record goes first, so a volume half deleted by a crash is already gone for readers.
        self.objects.delete(&format!("{}volume", volume_prefix(volume)))?;
        for prefix in ["lineages/", "tags/"] {
            for object in list_all(self.objects.as_ref(), &format!("{}{prefix}", volume_prefix(volume)))? {
                self.objects.delete(&object.key)?;
            }
        }
        self.versions.lock().retain(|key, _| !key.starts_with(&volume_prefix(volume)));
        Ok(())
    }

    /// Versions of one lineage, oldest first. A forked lineage starts with
    /// the version it was forked from, which keeps its own lineage and seq.
    pub fn versions(&self, volume: &VolumeName, lineage: &LineageName) -> Result<Vec<VersionInfo>> {
        self.require_volume(volume)?;
        let keys = list_all(self.objects.as_ref(), &lineage_prefix(volume, lineage))?;
        if keys.is_empty() {
            return Err(self.lineage_not_found(volume, lineage));
        }
        keys.iter().map(|o| self.version_at_key(&o.key)).collect()
    }

    /// Every version of every lineage of a volume, each once, oldest first.
    pub fn all_versions(&self, volume: &VolumeName) -> Result<Vec<VersionInfo>> {
        self.require_volume(volume)?;
        let keys = list_all(self.objects.as_ref(), &format!("volumes/{volume}/lineages/"))?;
        let mut out: Vec<VersionInfo> = keys.iter().map(|o| self.version_at_key(&o.key)).collect::<Result<_>>()?;
        out.sort_by_key(|v| v.id);
        out.dedup_by_key(|v| v.id);
        Ok(out)
    }

    /// The latest version of a lineage.
    pub fn head(&self, volume: &VolumeName, lineage: &LineageName) -> Result<VersionInfo> {
        Ok(self.head_entry(volume, lineage)?.1)
    }

    /// The latest entry of a lineage: its sequence number in that lineage and its version.
    pub fn head_entry(&self, volume: &VolumeName, lineage: &LineageName) -> Result<(u64, VersionInfo)> {
        self.require_volume(volume)?;
        self.head_opt(volume, lineage)?.ok_or_else(|| self.lineage_not_found(volume, lineage))
    }

    pub(crate) fn lineage_not_found(&self, volume: &VolumeName, lineage: &LineageName) -> EngineError {
        EngineError::NotFound {
            what: "lineage",
            name: format!("{lineage} of volume {volume} (list them with `chalk volume lineages {volume}`)"),
        }
    }

    pub(crate) fn head_opt(&self, volume: &VolumeName, lineage: &LineageName) -> Result<Option<(u64, VersionInfo)>> {
        let keys = list_all(self.objects.as_ref(), &lineage_prefix(volume, lineage))?;
        let Some(last) = keys.last() else { return Ok(None) };
        let seq = entry_seq(&last.key)?;
        Ok(Some((seq, self.version_at_key(&last.key)?)))
    }

    /// Finds a version by tag, by id or by a unique prefix of its id.
    pub fn resolve_version(&self, volume: &VolumeName, id_or_prefix: &str) -> Result<VersionInfo> {
        let wanted = id_or_prefix.trim().to_lowercase();
        if wanted.is_empty() {
            return Err(EngineError::InvalidArgument("empty version id".into()));
        }
        let all = self.all_versions(volume)?;
        let mut matches: Vec<VersionInfo> = all.iter().filter(|v| v.id.to_string().starts_with(&wanted)).cloned().collect();
        // Ids and id prefixes come first, so a tag can never hide a version id.
        // A tag names a version by its full id, which is looked up without tags.
        if matches.is_empty() {
            if let Some(tagged) = self.tag_target(volume, id_or_prefix.trim())? {
                matches = all.into_iter().filter(|v| v.id == tagged).collect();
            }
        }
        match matches.len() {
            1 => Ok(matches.into_iter().next().expect("one match")),
            0 => Err(EngineError::NotFound {
                what: "version",
                name: format!("{id_or_prefix} in volume {volume} (list them with `chalk volume versions {volume}`)"),
            }),
            n => Err(EngineError::InvalidArgument(format!(
                "version prefix {id_or_prefix:?} matches {n} versions of {volume}; give more characters"
            ))),
        }
    }

    pub(crate) fn version_at_key(&self, key: &str) -> Result<VersionInfo> {
        if let Some(found) = self.versions.lock().get(key) {
            return Ok(found.clone());
        }
        let bytes = self.objects.get(key)?.ok_or_else(|| EngineError::not_found("version record", key))?;
        let info = decode_version(key, &bytes)?;
        self.versions.lock().insert(key.to_owned(), info.clone());
        Ok(info)
    }

    /// Creates entry `seq` of `lineage` for the version `info`; returns
    /// `false` when another writer already published that sequence number.
    pub(crate) fn publish_entry(
        &self,
        volume: &VolumeName,
        lineage: &LineageName,
        seq: u64,
        info: &VersionInfo,
        kind: EntryKind,
    ) -> Result<bool> {
        let record = VersionRecord {
            id: info.id.to_string(),
            seq: info.seq,
            parent: info.parent.map(|p| p.to_string()),
            lineage: info.lineage.to_string(),
            created_at_ns: info.created_at.as_nanos() as i64,
            message: info.message.clone(),
            files: info.files,
            bytes: info.bytes,
            segments: info.segments.iter().map(|s| s.to_string()).collect(),
            entry: kind.label(),
        };
        let bytes = frame(ObjectType::VersionRecord, &serde_json::to_vec(&record).expect("serializable"));
        let key = version_key(volume, lineage, seq);
        // Only a commit names a version that no other entry can name, so
        // only a commit entry found at `key` is known to be this write's.
        let created = match (self.objects.put_if_absent(&key, &bytes), kind) {
            (Ok(created), EntryKind::Fork | EntryKind::Promote) => created,
            (Err(err), EntryKind::Fork | EntryKind::Promote) => return Err(err),
            (Ok(true), EntryKind::Commit) => true,
            // A retried request may find the entry its first attempt wrote.
            (Ok(false), EntryKind::Commit) => matches!(self.entry_names(&key, info.id), Ok(Some(true))),
            // The store may have applied the write and lost the answer, so
            // the entry is read back. Only an absent entry leaves the error as is.
            (Err(err), EntryKind::Commit) => match self.entry_names(&key, info.id) {
                Ok(Some(ours)) => ours,
                Ok(None) | Err(_) => return Err(err),
            },
        };
        if created {
            self.versions.lock().insert(key, info.clone());
        }
        Ok(created)
    }

    /// Reads the lineage entry at `key`: `None` when it does not exist,
    /// otherwise whether it names `version`.
    fn entry_names(&self, key: &str, version: VersionId) -> Result<Option<bool>> {
        match self.objects.get(key)? {
            None => Ok(None),
            Some(bytes) => Ok(Some(decode_version(key, &bytes)?.id == version)),
        }
    }

    /// Reads and checks an object that must exist.
    pub(crate) fn read_object(&self, key: &str) -> Result<Vec<u8>> {
        self.objects.get(key)?.ok_or_else(|| EngineError::CorruptObject {
            key: key.to_owned(),
            detail: format!("missing from {}", self.objects.url()),
        })
    }

    /// Checks that the store itself, not a local copy, still contains the
    /// checkpoint of `version`: a gc run may have removed it.
    pub(crate) fn check_checkpoint_in_store(&self, volume: &VolumeName, version: VersionId) -> Result<()> {
        let key = checkpoint_key(volume, version);
        match self.remote.get(&key)? {
            Some(bytes) => match RootCheckpoint::decode(&bytes) {
                Ok(_) => Ok(()),
                Err(detail) => Err(EngineError::CorruptObject { key, detail }),
            },
            None => Err(EngineError::CorruptObject { key, detail: format!("missing from {}", self.remote.url()) }),
        }
    }

    pub(crate) fn load_checkpoint(&self, volume: &VolumeName, version: VersionId) -> Result<RootCheckpoint> {
        let key = checkpoint_key(volume, version);
        let bytes = self.read_object(&key)?;
        RootCheckpoint::decode(&bytes).map_err(|detail| EngineError::CorruptObject { key, detail })
    }
}

/// Sequence number of a lineage entry from its key.
pub(crate) fn entry_seq(key: &str) -> Result<u64> {
    key.rsplit('/')
        .next()
        .and_then(|last| last.parse().ok())
        .ok_or_else(|| EngineError::CorruptObject { key: key.to_owned(), detail: "not a lineage entry key".into() })
}

pub(crate) fn now_ns() -> i64 {
    Timestamp::now().as_nanos() as i64
}

fn decode_version(key: &str, bytes: &[u8]) -> Result<VersionInfo> {
    Ok(decode_entry(key, bytes)?.0)
}

/// Decodes a lineage entry: the version it names and how it entered the
/// lineage (`None` for a sync, else `fork` or `promote`).
pub(crate) fn decode_entry(key: &str, bytes: &[u8]) -> Result<(VersionInfo, Option<String>)> {
    let corrupt = |detail: String| EngineError::CorruptObject { key: key.to_owned(), detail };
    let payload = unframe(ObjectType::VersionRecord, bytes).map_err(corrupt)?;
    let record: VersionRecord = serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))?;
    let entry = record.entry.clone();
    let id = record.id.parse::<VersionId>().map_err(|e| corrupt(e.to_string()))?;
    let parent = record.parent.map(|p| p.parse::<VersionId>()).transpose().map_err(|e| corrupt(e.to_string()))?;
    let segments =
        record.segments.iter().map(|s| s.parse::<SegmentId>()).collect::<Result<Vec<_>>>().map_err(|e| corrupt(e.to_string()))?;
    let secs = record.created_at_ns.div_euclid(1_000_000_000);
    let nanos = record.created_at_ns.rem_euclid(1_000_000_000) as u32;
    let info = VersionInfo {
        id,
        seq: record.seq,
        parent,
        lineage: LineageName::new(&record.lineage)?,
        created_at: Timestamp { secs, nanos },
        message: record.message,
        files: record.files,
        bytes: record.bytes,
        segments,
    };
    Ok((info, entry))
}
