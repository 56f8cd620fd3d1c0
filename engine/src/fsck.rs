//! `fsck`: checks that a store is whole, and repairs the local cache from
//! the object store.
//!
//! Checks, per volume:
//! 1. Lineages: every entry decodes, sequence numbers have no gaps that a
//!    gc run did not record, a sync entry's own sequence number matches its
//!    key, and every parent exists or was pruned by gc.
//! 2. Versions: every root, inode page and directory chunk reads and
//!    decodes.
//! 3. Segments: every segment an extent refers to exists in the object
//!    store, every extent lies inside its segment, and every extent's
//!    record CRC matches: in the local whole copy when there is one, and in
//!    the object store's copy with `deep`. Each whole copy is also scanned
//!    record by record, and a local copy must equal the store's.
//! 4. The disk tier's cached blocks: every slot's header and CRC, and the
//!    whole-file copies that mounts serve by passthrough: each copy's
//!    contents against the checksum it was made with.
//! 5. Orphans: data objects that no version or live lease refers to, with
//!    their bytes (what `gc` with no retention policy and no grace would
//!    free).
//!
//! And for the host: the sealed segments of sessions that no process holds.
//!
//! A request that the object store fails (unreachable, timed out after its
//! retries, access denied) stops the run with [`EngineError::ObjectStore`]:
//! the object may well be intact, so it is not reported as a problem. When
//! such a request fails during a repair's refetch, the run stops too and
//! leaves the damaged local copy as it was for the next run.
//!
//! Repair never writes to the object store. It replaces a damaged or
//! differing local whole segment with a copy fetched from the object store
//! (only when that copy scans clean and sealed), rewrites damaged cached
//! blocks from the store, removes damaged passthrough copies (the next open
//! copies the file again), and truncates torn tails of unpublished segments
//! of ended sessions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::fd::AsRawFd;
use std::path::Path;

use serde::Serialize;

use crate::cache::copies;
use crate::catalog::{Catalog, ChunkCheck, ExtentRef, ReadProblem, Walker};
use crate::error::{EngineError, Result};
use crate::format::record;
use crate::ids::{SegmentId, VersionId, VolumeName};
use crate::segment;
use crate::store::{segment_key, Store};

/// Scope and mode of one [`Store::fsck`] run.
#[derive(Clone, Debug, Default)]
pub struct FsckOptions {
    /// Check one volume; every volume of the store when `None`.
    pub volume: Option<VolumeName>,
    /// Check one version (id, prefix or tag) of that volume.
    pub version: Option<String>,
    /// Also download every segment from the object store and check it.
    pub deep: bool,
    pub repair: bool,
}

/// Copy of an object that a problem is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Copy {
    /// The local cache or a session directory on this host.
    Local,
    /// The object store.
    Remote,
}

/// One problem found by fsck.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    /// A short name: `unreadable-object`, `lineage-gap`, `sequence-mismatch`,
    /// `missing-parent`, `missing-segment`, `extent-out-of-bounds`,
    /// `corrupt-record`, `extent-crc-mismatch`, `cache-differs`,
    /// `corrupt-cached-block`, `damaged-passthrough-copy`, `torn-tail`.
    pub kind: &'static str,
    pub volume: Option<String>,
    pub version: Option<String>,
    pub path: Option<String>,
    pub segment: Option<String>,
    pub offset: Option<u64>,
    pub key: Option<String>,
    /// A file of this host that the problem is in, such as a passthrough
    /// copy or a segment of a session directory, which has no object key.
    pub file: Option<String>,
    pub copy: Option<Copy>,
    pub detail: String,
    /// Versions that cannot be read whole because of this problem.
    pub affected_versions: Vec<String>,
    pub repaired: bool,
}

impl Problem {
    fn new(kind: &'static str, volume: &VolumeName, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            volume: Some(volume.to_string()),
            version: None,
            path: None,
            segment: None,
            offset: None,
            key: None,
            file: None,
            copy: None,
            detail: detail.into(),
            affected_versions: Vec::new(),
            repaired: false,
        }
    }
}

/// Result of [`Store::fsck`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct FsckReport {
    pub volumes: u64,
    pub versions: u64,
    pub segments: u64,
    /// Records whose CRC was checked, in whole copies and through extents.
    pub records_checked: u64,
    pub problems: Vec<Problem>,
    /// Data objects no version or live lease refers to.
    pub orphaned_objects: u64,
    pub reclaimable_bytes: u64,
}

impl FsckReport {
    /// True when no problem remains unrepaired.
    pub fn is_whole(&self) -> bool {
        self.problems.iter().all(|p| p.repaired)
    }
}

/// Versions and paths that refer to one segment.
#[derive(Default)]
struct SegmentUsers {
    extents: Vec<(VersionId, String, ExtentRef)>,
}

impl SegmentUsers {
    fn versions(&self) -> Vec<String> {
        let set: BTreeSet<VersionId> = self.extents.iter().map(|(v, _, _)| *v).collect();
        set.into_iter().map(|v| v.to_string()).collect()
    }

    /// Versions and the first path whose record contains `offset`; all
    /// users when none does.
    fn at(&self, offset: u64) -> (Vec<String>, Option<String>) {
        let hits: Vec<&(VersionId, String, ExtentRef)> = self
            .extents
            .iter()
            .filter(|(_, _, e)| (e.extent.record_offset..e.extent.record_offset + e.extent.record_len as u64).contains(&offset))
            .collect();
        if hits.is_empty() {
            return (self.versions(), None);
        }
        let set: BTreeSet<VersionId> = hits.iter().map(|(v, _, _)| *v).collect();
        (set.into_iter().map(|v| v.to_string()).collect(), Some(hits[0].1.clone()))
    }
}

impl Store {
    /// Checks the store, or one volume or version of it; see the module
    /// documentation. Fails when the named volume or version does not exist,
    /// or when a request to the object store fails.
    pub fn fsck(&self, options: &FsckOptions) -> Result<FsckReport> {
        let mut report = FsckReport::default();
        let volumes = match &options.volume {
            Some(volume) => vec![volume.clone()],
            None => self.volumes_with_objects().map_err(|error| stopped_by_store(error, "fsck"))?,
        };
        for volume in &volumes {
            self.fsck_volume(volume, options, &mut report)?;
        }
        if options.volume.is_none() {
            self.fsck_sessions(options.repair, &mut report);
        }
        report.volumes = volumes.len() as u64;
        Ok(report)
    }

    fn fsck_volume(&self, volume: &VolumeName, options: &FsckOptions, report: &mut FsckReport) -> Result<()> {
        let catalog = Catalog::read(self, volume).map_err(|error| stopped_by_store(error, &format!("fsck of volume {volume}")))?;
        if options.volume.is_some() && !catalog.exists && catalog.objects.is_empty() {
            return Err(EngineError::not_found("volume", format!("{volume} (list them with `chalk volume list`)")));
        }
        self.stop_if_unreachable(volume, &catalog.problems)?;
        for problem in &catalog.problems {
            let mut found = Problem::new("unreadable-object", volume, &problem.detail);
            found.key = Some(problem.key.clone());
            found.copy = Some(Copy::Remote);
            report.problems.push(found);
        }

        // Step 1: lineages (for a whole volume only).
        let versions = catalog.versions();
        let selected: Vec<VersionId> = match &options.version {
            Some(wanted) => vec![self.resolve_version(volume, wanted)?.id],
            None => {
                check_lineages(&catalog, report);
                let mut all: BTreeSet<VersionId> = versions.keys().copied().collect();
                all.extend(catalog.tags.iter().map(|(_, v)| *v));
                all.into_iter().collect()
            }
        };

        // Step 2: versions.
        let mut walker = Walker::new(self, volume, ChunkCheck::Read);
        let mut users: BTreeMap<SegmentId, SegmentUsers> = BTreeMap::new();
        let mut referenced: BTreeSet<String> = BTreeSet::new();
        for version in &selected {
            report.versions += 1;
            let refs = walker.walk(*version);
            self.stop_if_unreachable(volume, &refs.problems)?;
            for problem in &refs.problems {
                let mut found = Problem::new("unreadable-object", volume, &problem.detail);
                found.version = Some(version.to_string());
                found.key = Some(problem.key.clone());
                found.copy = Some(Copy::Remote);
                found.affected_versions = vec![version.to_string()];
                report.problems.push(found);
            }
            self.fsck_passthrough_copies(volume, *version, &refs, options.repair, report);
            referenced.insert(refs.root_key.clone());
            referenced.extend(refs.page_keys.iter().cloned());
            referenced.extend(refs.chunk_keys.iter().cloned());
            for extent in &refs.extents {
                let path = refs.path_of(extent.ino);
                users.entry(extent.extent.segment).or_default().extents.push((*version, path, extent.clone()));
            }
        }

        // Steps 3 and 4: segments.
        for (segment, segment_users) in &users {
            report.segments += 1;
            referenced.insert(segment_key(volume, *segment));
            self.fsck_segment(volume, &catalog, *segment, segment_users, options, report)?;
        }

        // Step 5: orphans, only when every version was walked.
        if options.version.is_none() {
            let now = std::time::SystemTime::now();
            let leases: Vec<_> = catalog.leases.iter().filter(|l| l.record.is_live(l.modified, now)).collect();
            let prefix = crate::store::volume_prefix(volume);
            for meta in catalog.objects.values() {
                let rest = &meta.key[prefix.len()..];
                let data = ["checkpoints/", "pages/", "dirs/", "segments/"].iter().any(|p| rest.starts_with(p));
                if !data || referenced.contains(&meta.key) {
                    continue;
                }
                let leased = leases.iter().any(|l| {
                    l.record.versions.iter().any(|v| rest.starts_with(&format!("checkpoints/{v}")) || rest.starts_with(&format!("pages/{v}-")))
                        || l.record.pending_segments.iter().any(|s| rest == format!("segments/{s}.seg"))
                        || (l.record.syncing && rest.starts_with("dirs/"))
                });
                if !leased {
                    report.orphaned_objects += 1;
                    report.reclaimable_bytes += meta.size;
                }
            }
        }
        Ok(())
    }

    fn fsck_segment(
        &self,
        volume: &VolumeName,
        catalog: &Catalog,
        segment: SegmentId,
        users: &SegmentUsers,
        options: &FsckOptions,
        report: &mut FsckReport,
    ) -> Result<()> {
        let key = segment_key(volume, segment);
        let problem = |kind: &'static str, copy: Option<Copy>, offset: Option<u64>, detail: String| {
            let (affected, path) = match offset {
                Some(offset) => users.at(offset),
                None => (users.versions(), None),
            };
            let mut found = Problem::new(kind, volume, detail);
            found.segment = Some(segment.to_string());
            found.key = Some(key.clone());
            found.offset = offset;
            found.copy = copy;
            found.path = path;
            found.version = affected.first().cloned();
            found.affected_versions = affected;
            found
        };

        // The object store's copy: present, and large enough for every extent.
        let Some(remote) = catalog.objects.get(&key) else {
            let paths: BTreeSet<&str> = users.extents.iter().map(|(_, p, _)| p.as_str()).collect();
            let list: Vec<&str> = paths.into_iter().take(5).collect();
            let mut found = problem(
                "missing-segment",
                Some(Copy::Remote),
                None,
                format!("segment object {key} is missing from the object store; files: {}", list.join(", ")),
            );
            found.path = list.first().map(|p| p.to_string());
            report.problems.push(found);
            return Ok(());
        };
        for (_, path, extent) in &users.extents {
            let x = &extent.extent;
            let record_end = x.record_offset + x.record_len as u64;
            let data_inside = x.data_offset >= x.record_offset && x.data_offset + x.len <= record_end;
            if record_end > remote.size || !data_inside || x.record_len == 0 {
                let mut found = problem(
                    "extent-out-of-bounds",
                    Some(Copy::Remote),
                    Some(x.record_offset),
                    format!(
                        "extent of {path} at file offset {} (data [{}, {}) in record [{}, {record_end})) lies outside its record or the segment of {} bytes",
                        extent.file_offset,
                        x.data_offset,
                        x.data_offset + x.len,
                        x.record_offset,
                        remote.size
                    ),
                );
                found.path = Some(path.clone());
                report.problems.push(found);
            }
        }

        // The local whole copy, then the store's copy with --deep.
        let local_path = self.segments.path(segment);
        let local = std::fs::read(&local_path).ok();
        // In a store kept in a local directory, the local copy is usually
        // the store's object itself, under a second name (a hard link).
        let local_is_object = self.remote_objects().local_file(&key).is_some_and(|object| same_file(&local_path, &object));
        let remote_bytes = if options.deep {
            match self.remote_objects().get(&key) {
                Ok(Some(bytes)) => Some(bytes),
                Ok(None) => None,
                Err(EngineError::ObjectStore { detail, .. }) => {
                    let problem = ReadProblem { key: key.clone(), detail, unreachable: true };
                    return self.stop_if_unreachable(volume, &[problem]);
                }
                Err(err) => {
                    report.problems.push(problem("unreadable-object", Some(Copy::Remote), None, format!("reading {key} failed: {err}")));
                    None
                }
            }
        } else {
            None
        };
        let mut local_bad = false;
        for (copy, bytes) in [(Copy::Local, local.as_deref()), (Copy::Remote, remote_bytes.as_deref())] {
            let Some(bytes) = bytes else { continue };
            let where_ = match copy {
                Copy::Local if local_is_object => {
                    format!("local copy {}, which is the same file as the store's object {key}", local_path.display())
                }
                Copy::Local => format!("local copy {}", local_path.display()),
                Copy::Remote => format!("object {key}"),
            };
            let scan = segment::scan(bytes);
            report.records_checked += scan.records.len() as u64;
            if let Some((offset, detail)) = &scan.invalid {
                report.problems.push(problem("corrupt-record", Some(copy), Some(*offset), format!("{where_}: {detail}")));
                local_bad |= copy == Copy::Local;
            } else if !scan.sealed {
                report.problems.push(problem("corrupt-record", Some(copy), Some(scan.valid_end), format!("{where_}: no valid seal record at the end")));
                local_bad |= copy == Copy::Local;
            }
            for (_, path, extent) in &users.extents {
                let x = &extent.extent;
                let end = x.record_offset + x.record_len as u64;
                if end > bytes.len() as u64 {
                    continue;
                }
                report.records_checked += 1;
                if let Err(detail) = record::verify_record(&bytes[x.record_offset as usize..end as usize]) {
                    // A damaged record is reported once, by the scan, when the scan stopped there.
                    if scan.invalid.as_ref().is_some_and(|(at, _)| *at == x.record_offset) {
                        continue;
                    }
                    let mut found = problem("extent-crc-mismatch", Some(copy), Some(x.record_offset), format!("{where_}: record of {path}: {detail}"));
                    found.path = Some(path.clone());
                    report.problems.push(found);
                    local_bad |= copy == Copy::Local;
                }
            }
        }
        if let Some(local) = &local {
            let differs = match &remote_bytes {
                Some(remote) => remote != local,
                None => local.len() as u64 != remote.size,
            };
            if differs && !local_bad {
                report.problems.push(problem(
                    "cache-differs",
                    Some(Copy::Local),
                    None,
                    format!("local copy {} ({} bytes) differs from {key} ({} bytes)", local_path.display(), local.len(), remote.size),
                ));
            }
            if (differs || local_bad) && options.repair && local_is_object {
                let outcome = Err(format!(
                    "the store has no other copy of {key} to fetch, because the local copy is its object; \
                     restore that file from a backup of the store, without which the affected versions cannot be read whole"
                ));
                mark_repaired(report, segment, outcome, "");
            } else if (differs || local_bad) && options.repair {
                let outcome = match self.refetch_segment(&key, &local_path) {
                    Ok(()) => Ok(()),
                    // The copy stays as it was, so the next run finds it again.
                    Err(RefetchError::Store(detail)) => {
                        let not_repaired = format!("the local copy {}", local_path.display());
                        return Err(self.stopped_before_repair(volume, &key, detail, &not_repaired));
                    }
                    Err(RefetchError::Other(detail)) => Err(detail),
                };
                mark_repaired(report, segment, outcome, "refetched the local copy from the object store");
            }
        }

        // Cached blocks of the segment.
        let bad_blocks = match self.segments.check_blocks(segment, options.repair.then_some(key.as_str())) {
            Ok(bad_blocks) => bad_blocks,
            Err(EngineError::ObjectStore { detail, .. }) => {
                let not_repaired = format!("the damaged cached blocks of segment {segment}");
                return Err(self.stopped_before_repair(volume, &key, detail, &not_repaired));
            }
            Err(other) => return Err(other),
        };
        for bad in bad_blocks {
            let mut found = problem("corrupt-cached-block", Some(Copy::Local), Some(bad.offset), bad.detail);
            found.repaired = bad.repaired;
            report.problems.push(found);
        }
        Ok(())
    }

    /// Fails with the store's error when one of `problems` is a request
    /// that the object store failed.
    fn stop_if_unreachable(&self, volume: &VolumeName, problems: &[ReadProblem]) -> Result<()> {
        match problems.iter().find(|p| p.unreachable) {
            Some(problem) => Err(problem.clone().into_error(
                self,
                &format!("fsck of volume {volume} stopped: run it again once the store is reachable"),
            )),
            None => Ok(()),
        }
    }

    /// Returns the error that stops a repair because the object store failed
    /// the request for `key`: the usual unreachable-store error, naming the
    /// local files left damaged.
    fn stopped_before_repair(&self, volume: &VolumeName, key: &str, detail: String, not_repaired: &str) -> EngineError {
        let problem = ReadProblem { key: key.to_owned(), detail, unreachable: true };
        problem.into_error(
            self,
            &format!("fsck of volume {volume} stopped with {not_repaired} not repaired: run it again once the store is reachable"),
        )
    }

    /// Checks the passthrough copies of `version`'s files on this host, and
    /// removes damaged ones when repairing.
    fn fsck_passthrough_copies(
        &self,
        volume: &VolumeName,
        version: VersionId,
        refs: &crate::catalog::VersionRefs,
        repair: bool,
        report: &mut FsckReport,
    ) {
        let dir = copies::version_dir(self.local_root(), version);
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            // Copies still being written end in `.tmp`; their names are not inode numbers.
            let Some(ino) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let damage = match std::fs::File::open(&path) {
                Ok(file) => match copies::check_copy(&file) {
                    Ok(()) => continue,
                    Err(damage) => damage.to_string(),
                },
                Err(error) => format!("opening the copy failed: {error}"),
            };
            let mut found = Problem::new(
                "damaged-passthrough-copy",
                volume,
                format!("{damage}; mounts would serve it as the file's contents"),
            );
            found.version = Some(version.to_string());
            found.path = Some(refs.path_of(crate::ids::Ino(ino)));
            found.file = Some(path.display().to_string());
            found.copy = Some(Copy::Local);
            found.affected_versions = vec![version.to_string()];
            if repair {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        found.repaired = true;
                        found.detail = format!("{}; removed it, so the next open copies the file again", found.detail);
                    }
                    Err(error) => found.detail = format!("{}; removing it failed: {error}", found.detail),
                }
            }
            report.problems.push(found);
        }
    }

    /// Replaces the local whole copy of a segment with the object store's,
    /// if that copy scans clean and sealed.
    fn refetch_segment(&self, key: &str, local_path: &Path) -> std::result::Result<(), RefetchError> {
        let temp = local_path.with_extension(format!("seg.fetch-{}", ulid::Ulid::new().to_string().to_lowercase()));
        let result = (|| -> std::result::Result<(), RefetchError> {
            let found = match self.remote_objects().get_to_file(key, &temp) {
                Ok(found) => found,
                Err(EngineError::ObjectStore { detail, .. }) => return Err(RefetchError::Store(detail)),
                Err(other) => return Err(RefetchError::Other(other.to_string())),
            };
            if !found {
                return Err(format!("{key} is missing from the object store").into());
            }
            let bytes = std::fs::read(&temp).map_err(|e| format!("reading {}: {e}", temp.display()))?;
            let scan = segment::scan(&bytes);
            if let Some((offset, detail)) = scan.invalid {
                return Err(format!("the object store's copy is damaged too, at offset {offset}: {detail}").into());
            }
            if !scan.sealed {
                return Err("the object store's copy has no seal record".to_owned().into());
            }
            let file = std::fs::File::open(&temp).map_err(|e| e.to_string())?;
            // SAFETY: fsync on a valid descriptor owned by `file`.
            unsafe { libc::fsync(file.as_raw_fd()) };
            std::fs::rename(&temp, local_path).map_err(|e| format!("renaming into {}: {e}", local_path.display()).into())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Checks the sealed segments of session directories that no live
    /// process holds, and truncates torn tails when repairing.
    fn fsck_sessions(&self, repair: bool, report: &mut FsckReport) {
        let Ok(entries) = std::fs::read_dir(self.sessions_dir()) else { return };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(lock) = std::fs::File::open(dir.join("lock")) else { continue };
            // SAFETY: flock on a valid descriptor owned by `lock`.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            let Ok(files) = std::fs::read_dir(&dir) else { continue };
            for file in files.flatten() {
                let path = file.path();
                if path.extension().is_none_or(|e| e != "seg") {
                    continue;
                }
                let Ok(bytes) = std::fs::read(&path) else { continue };
                let scan = segment::scan(&bytes);
                let Some((offset, detail)) = scan.invalid else { continue };
                let mut found = Problem::new("torn-tail", &VolumeName::new("unknown").expect("valid name"), detail);
                found.volume = scan.header.as_ref().map(|h| h.volume.clone());
                found.segment = scan.header.as_ref().map(|h| h.segment.to_string());
                found.offset = Some(offset);
                found.file = Some(path.display().to_string());
                found.copy = Some(Copy::Local);
                if repair {
                    found.repaired = segment::recover(&path).is_ok();
                }
                report.problems.push(found);
            }
        }
    }
}

/// Cause of a failed refetch of a local whole segment.
enum RefetchError {
    /// The object store failed the request (unreachable, timed out after its
    /// retries, access denied), which stops the run as it does for reads.
    Store(String),
    /// Anything else, reported with the damaged copy.
    Other(String),
}

impl From<String> for RefetchError {
    fn from(detail: String) -> Self {
        RefetchError::Other(detail)
    }
}

/// Adds what stopped and what to do next to an error of the object store.
fn stopped_by_store(error: EngineError, run: &str) -> EngineError {
    match error {
        EngineError::ObjectStore { url, detail } => {
            EngineError::ObjectStore { url, detail: format!("{detail}; {run} stopped: run it again once the store is reachable") }
        }
        other => other,
    }
}

/// Returns whether two paths name the same file (one inode under two names).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn mark_repaired(report: &mut FsckReport, segment: SegmentId, outcome: std::result::Result<(), String>, done: &str) {
    let id = segment.to_string();
    for problem in report.problems.iter_mut() {
        let local = problem.copy == Some(Copy::Local) && problem.segment.as_deref() == Some(id.as_str());
        if !local || problem.kind == "corrupt-cached-block" {
            continue;
        }
        match &outcome {
            Ok(()) => {
                problem.repaired = true;
                problem.detail = format!("{}; {done}", problem.detail);
            }
            Err(err) => problem.detail = format!("{}; repair failed: {err}", problem.detail),
        }
    }
}

/// Checks lineage entries against each other and against the pruned records.
fn check_lineages(catalog: &Catalog, report: &mut FsckReport) {
    let volume = &catalog.volume;
    let versions = catalog.versions();
    let pruned_versions: BTreeSet<&str> = catalog.pruned.iter().map(|p| p.version.as_str()).collect();
    let pruned_seqs: HashMap<&str, BTreeSet<u64>> = catalog.pruned.iter().fold(HashMap::new(), |mut map, p| {
        map.entry(p.lineage.as_str()).or_default().insert(p.seq);
        map
    });
    for (lineage, entries) in catalog.lineages() {
        let present: BTreeSet<u64> = entries.iter().map(|e| e.seq).collect();
        let last = entries.last().map(|e| e.seq).unwrap_or(0);
        let pruned = pruned_seqs.get(lineage.as_str());
        for seq in 1..=last {
            if !present.contains(&seq) && !pruned.is_some_and(|p| p.contains(&seq)) {
                let mut found = Problem::new(
                    "lineage-gap",
                    volume,
                    format!("lineage {lineage} has no entry {seq} and no gc run recorded removing it"),
                );
                found.key = Some(crate::store::version_key(volume, &lineage, seq));
                found.copy = Some(Copy::Remote);
                report.problems.push(found);
            }
        }
        for entry in entries {
            let v = &entry.version;
            if entry.kind.is_none() && v.lineage == lineage && v.seq != entry.seq {
                let mut found = Problem::new(
                    "sequence-mismatch",
                    volume,
                    format!("entry {} of lineage {lineage} holds version {} with sequence number {}", entry.seq, v.id, v.seq),
                );
                found.version = Some(v.id.to_string());
                found.key = Some(entry.key.clone());
                found.copy = Some(Copy::Remote);
                report.problems.push(found);
            }
            if let Some(parent) = v.parent {
                if !versions.contains_key(&parent) && !pruned_versions.contains(parent.to_string().as_str()) {
                    let mut found = Problem::new(
                        "missing-parent",
                        volume,
                        format!("version {} names parent {parent}, which no lineage holds and no gc run removed", v.id),
                    );
                    found.version = Some(v.id.to_string());
                    found.key = Some(entry.key.clone());
                    found.copy = Some(Copy::Remote);
                    found.affected_versions = vec![v.id.to_string()];
                    report.problems.push(found);
                }
            }
        }
    }
}
