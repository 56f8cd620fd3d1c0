//! Garbage collection of one volume: retention, then mark and sweep.
//!
//! Steps of [`Store::gc`]:
//! 1. List every object under the volume's prefix and decode its lineage
//!    entries, tags and leases. Any listing or decoding error stops the run.
//! 2. Retention: keep the head of every lineage, every tagged version,
//!    every version a live lease names, every version whose entry or whose
//!    successor's entry is younger than the grace period, and then what
//!    `--keep-last` and `--keep-within` ask for (everything when neither is
//!    given). The other versions are dropped.
//! 3. Mark: read the checkpoint of every kept version and collect the
//!    pages, directory chunks and segments it refers to. Any read error
//!    stops the run before anything is deleted.
//! 4. Candidates: unmarked checkpoints, pages, chunks and segments, the
//!    entries of dropped versions and expired leases, all older than the
//!    grace period. An object without a store time is never a candidate.
//! 5. Unless this is a dry run: write a sweep marker, read the leases again
//!    and spare what new leases name, record the dropped entries in
//!    `gc/pruned/<run>`, delete, and remove the marker.
//! 6. Abort the incomplete multipart uploads under the volume's prefix that
//!    started before the grace period and are not for an object a live
//!    lease names: a killed sync leaves them, and their parts take space.
//!
//! Invariants:
//! - Objects are deleted, never rewritten.
//! - Nothing is deleted once any read of step 1, 3 or 5 failed.
//! - An object a live session named in its lease before the sweep marker
//!   was written is not deleted, and a session that writes its lease after
//!   the marker waits for the sweep to end before it uploads or reads
//!   (see [`crate::lease`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use crate::catalog::{
    pruned_prefix, read_entries, read_leases, Catalog, ChunkCheck, LeaseInfo, PrunedEntry, PrunedRecord, ReadProblem, Walker,
};
use crate::error::{EngineError, Result};
use crate::format::checkpoint::{frame, ObjectType};
use crate::ids::{SegmentId, VersionId, VolumeName};
use crate::lease::{sweep_prefix, SWEEP_MARKER_TTL};
use crate::object_store::{IncompleteUpload, ObjectMeta};
use crate::store::{volume_prefix, Store};

/// Default time during which new objects are never deleted.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// Retention policy and mode of one [`Store::gc`] run.
#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Keep the last N entries of every lineage.
    pub keep_last: Option<usize>,
    /// Keep versions created within this long.
    pub keep_within: Option<Duration>,
    /// Never delete an object younger than this.
    pub grace: Duration,
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions { keep_last: None, keep_within: None, grace: DEFAULT_GRACE, dry_run: false }
    }
}

/// Reason a version was kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeepReason {
    Head,
    Tag,
    Lease,
    Young,
    Policy,
}

/// Result of a gc run.
#[derive(Clone, Debug, Default)]
pub struct GcReport {
    pub volume: String,
    pub dry_run: bool,
    /// Versions kept, with the first reason found.
    pub kept: BTreeMap<VersionId, KeepReason>,
    /// Lineage entries removed (or, in a dry run, that would be).
    pub pruned: Vec<PrunedEntry>,
    /// Objects deleted (or that would be).
    pub deleted: Vec<ObjectMeta>,
    pub deleted_bytes: u64,
    /// Unreferenced objects kept because they are younger than the grace period.
    pub young_kept: u64,
    /// Objects kept because a lease written during the run named them.
    pub lease_kept: u64,
    /// Incomplete multipart uploads aborted (or that would be): older than
    /// the grace period and named by no live lease.
    pub aborted_uploads: Vec<IncompleteUpload>,
}

impl Store {
    /// Collects the garbage of one volume (a deleted one too): see the
    /// module documentation for the steps.
    pub fn gc(&self, volume: &VolumeName, options: &GcOptions) -> Result<GcReport> {
        let now = SystemTime::now();
        let cutoff = now.checked_sub(options.grace).unwrap_or(SystemTime::UNIX_EPOCH);

        // Step 1.
        let catalog = Catalog::read(self, volume).map_err(|error| match error {
            EngineError::ObjectStore { url, detail } => EngineError::ObjectStore {
                url,
                detail: format!("{detail}; gc of volume {volume} stopped before deleting anything: run it again once the store is reachable"),
            },
            other => other,
        })?;
        if catalog.objects.is_empty() {
            return Err(EngineError::NotFound {
                what: "volume",
                name: format!("{volume} (the object store has no objects under volumes/{volume}/; list volumes with `chalk volume list`)"),
            });
        }
        stop_on_problems(self, volume, &catalog.problems)?;

        // Step 2.
        let kept = retain(&catalog, options, now, cutoff);
        let live_leases: Vec<&LeaseInfo> = catalog.leases.iter().filter(|l| l.record.is_live(l.modified, now)).collect();

        // Step 3.
        let mut marked = Marked::default();
        let mut walker = Walker::new(self, volume, ChunkCheck::NameOnly);
        for version in kept.keys() {
            marked.mark_version(&mut walker, &catalog, *version)?;
        }
        for lease in &live_leases {
            marked.mark_lease(&mut walker, &catalog, &lease.record)?;
        }

        // Step 4.
        let dropped: BTreeSet<VersionId> = catalog.versions().keys().filter(|v| !kept.contains_key(v)).copied().collect();
        let mut report = GcReport { volume: volume.to_string(), dry_run: options.dry_run, kept, ..GcReport::default() };
        let mut candidates: Vec<ObjectMeta> = Vec::new();
        let prefix = volume_prefix(volume);
        for meta in catalog.objects.values() {
            let rest = &meta.key[prefix.len()..];
            let old = meta.modified.is_some_and(|m| m < cutoff);
            let collectable = match class_of(rest) {
                ObjectClass::Data => !marked.protects(&meta.key),
                ObjectClass::Entry => catalog.entries.iter().any(|e| e.key == meta.key && dropped.contains(&e.version.id)),
                ObjectClass::Lease => catalog
                    .leases
                    .iter()
                    .any(|l| l.key == meta.key && !l.record.is_live(l.modified, cutoff)),
                // Tags and gc records go with a deleted volume only.
                ObjectClass::Tag | ObjectClass::GcRecord => !catalog.exists,
                // The marker of a gc run that died; sessions already ignore it.
                ObjectClass::SweepMarker => meta.modified.is_some_and(|m| m + SWEEP_MARKER_TTL < now),
                ObjectClass::VolumeRecord | ObjectClass::Other => false,
            };
            if !collectable {
                continue;
            }
            if !old {
                report.young_kept += 1;
                continue;
            }
            candidates.push(meta.clone());
        }
        report.pruned = catalog
            .entries
            .iter()
            .filter(|e| dropped.contains(&e.version.id))
            .map(|e| PrunedEntry { lineage: e.lineage.to_string(), seq: e.seq, version: e.version.id.to_string() })
            .collect();

        let uploads = self.abandoned_uploads(&prefix, &marked, cutoff);

        if options.dry_run {
            report.deleted_bytes = candidates.iter().map(|c| c.size).sum();
            report.deleted = candidates;
            report.aborted_uploads = uploads;
            return Ok(report);
        }

        // Step 5.
        self.sweep(volume, &catalog, &mut walker, marked, candidates, &mut report)?;
        for upload in uploads {
            match self.objects().abort_upload(&upload) {
                Ok(()) => report.aborted_uploads.push(upload),
                Err(err) => tracing::warn!(key = %upload.key, upload_id = %upload.upload_id, error = %err, "failed to abort an incomplete multipart upload; the next gc run retries it"),
            }
        }
        Ok(report)
    }

    /// Lists the multipart uploads under `prefix` that a killed sync left:
    /// started before `cutoff` and not for an object a live lease names.
    /// A store that cannot list them (some S3-compatible servers) gets a
    /// warning, and the rest of the run goes on.
    fn abandoned_uploads(&self, prefix: &str, marked: &Marked, cutoff: SystemTime) -> Vec<IncompleteUpload> {
        match self.objects().incomplete_uploads(prefix) {
            Ok(uploads) => uploads
                .into_iter()
                .filter(|u| u.initiated.is_some_and(|t| t < cutoff) && !marked.protects(&u.key))
                .collect(),
            Err(err) => {
                tracing::warn!(prefix, error = %err, "failed to list incomplete multipart uploads; none are aborted in this run");
                Vec::new()
            }
        }
    }

    /// Step 5 of [`Store::gc`]: the only part that deletes.
    fn sweep(
        &self,
        volume: &VolumeName,
        catalog: &Catalog,
        walker: &mut Walker,
        mut marked: Marked,
        mut candidates: Vec<ObjectMeta>,
        report: &mut GcReport,
    ) -> Result<()> {
        if candidates.is_empty() {
            return Ok(());
        }
        let run = ulid::Ulid::new().to_string().to_lowercase();
        let marker = format!("{}{run}", sweep_prefix(volume));
        self.objects().put(&marker, &frame(ObjectType::SweepMarker, run.as_bytes()))?;
        let started = Instant::now();
        let result = self.sweep_marked(volume, catalog, walker, &mut marked, &mut candidates, report, &run, started);
        if let Err(err) = self.objects().delete(&marker) {
            tracing::warn!(key = %marker, error = %err, "failed to remove the gc sweep marker; sessions ignore it once it is stale");
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn sweep_marked(
        &self,
        volume: &VolumeName,
        catalog: &Catalog,
        walker: &mut Walker,
        marked: &mut Marked,
        candidates: &mut Vec<ObjectMeta>,
        report: &mut GcReport,
        run: &str,
        started: Instant,
    ) -> Result<()> {
        // Leases written since step 1 name versions and uploads to spare.
        let now = SystemTime::now();
        for lease in read_leases(self, volume)? {
            if lease.record.is_live(lease.modified, now) {
                marked.mark_lease(walker, catalog, &lease.record)?;
            }
        }
        // Versions published since step 1 stay whole. Their sessions held
        // leases until their entries existed, so reading the entries after
        // the leases misses none of them.
        let known: BTreeSet<String> = catalog.entries.iter().map(|e| e.key.clone()).collect();
        for entry in read_entries(self, volume)? {
            if !known.contains(&entry.key) && marked.versions.insert(entry.version.id) {
                marked.mark_version(walker, catalog, entry.version.id)?;
            }
        }
        let before = candidates.len();
        let leased: BTreeSet<String> = marked.versions.iter().map(|v| v.to_string()).collect();
        candidates.retain(|c| !marked.protects(&c.key));
        // An entry of a version that a lease now names stays.
        let spared_entries: BTreeSet<String> =
            catalog.entries.iter().filter(|e| leased.contains(&e.version.id.to_string())).map(|e| e.key.clone()).collect();
        candidates.retain(|c| !spared_entries.contains(&c.key));
        report.pruned.retain(|p| !leased.contains(&p.version));
        report.lease_kept = (before - candidates.len()) as u64;

        if !report.pruned.is_empty() {
            let record = PrunedRecord { run: run.to_owned(), created_at_ns: crate::store::now_ns(), entries: report.pruned.clone() };
            self.objects().put(&format!("{}{run}", pruned_prefix(volume)), &record.encode())?;
        }
        // Entries first, so a version is no longer listed before its objects go;
        // then roots before pages, so a half-deleted version has no root.
        candidates.sort_by_key(|c| delete_order(&c.key[volume_prefix(volume).len()..]));
        for candidate in candidates.iter() {
            if started.elapsed() > SWEEP_MARKER_TTL / 2 {
                return Err(EngineError::ObjectStore {
                    url: self.objects().url(),
                    detail: format!(
                        "gc of volume {volume} stopped after deleting {} objects because the sweep outlived its marker; run it again",
                        report.deleted.len()
                    ),
                });
            }
            if let Err(error) = self.objects().delete(&candidate.key) {
                return Err(EngineError::ObjectStore {
                    url: self.objects().url(),
                    detail: format!(
                        "gc of volume {volume} stopped after deleting {} objects: deleting {} failed ({error}); run it again",
                        report.deleted.len(),
                        candidate.key
                    ),
                });
            }
            report.deleted_bytes += candidate.size;
            report.deleted.push(candidate.clone());
        }
        tracing::info!(volume = %volume, objects = report.deleted.len(), bytes = report.deleted_bytes, "gc deleted objects");
        Ok(())
    }
}

fn stop_on_problems(store: &Store, volume: &VolumeName, problems: &[ReadProblem]) -> Result<()> {
    if problems.is_empty() {
        return Ok(());
    }
    // An object that the store failed to return may be intact, so report the
    // store as unreachable rather than the object as damaged.
    if let Some(unreached) = problems.iter().find(|p| p.unreachable) {
        return Err(EngineError::ObjectStore {
            url: store.objects().url(),
            detail: format!(
                "gc of volume {volume} stopped before deleting anything: reading {} failed ({}); run gc again once the store is reachable",
                unreached.key, unreached.detail
            ),
        });
    }
    let list: Vec<String> = problems.iter().take(5).map(|p| format!("{}: {}", p.key, p.detail)).collect();
    Err(EngineError::CorruptObject {
        key: problems[0].key.clone(),
        detail: format!(
            "gc of volume {volume} stopped before deleting anything: {} unreadable objects ({}); run `chalk fsck {volume}`",
            problems.len(),
            list.join("; ")
        ),
    })
}

/// Decides which versions stay, and why.
fn retain(catalog: &Catalog, options: &GcOptions, now: SystemTime, cutoff: SystemTime) -> BTreeMap<VersionId, KeepReason> {
    let mut kept: BTreeMap<VersionId, KeepReason> = BTreeMap::new();
    let mut keep = |id: VersionId, reason: KeepReason| {
        kept.entry(id).or_insert(reason);
    };
    for entries in catalog.lineages().values() {
        let Some(head) = entries.last() else { continue };
        keep(head.version.id, KeepReason::Head);
        for (i, entry) in entries.iter().enumerate() {
            // A version stays while its entry, or the entry that superseded
            // it, is younger than the grace period: a session may have read
            // it as the head a moment ago and not yet named it in its lease.
            let young = |e: &crate::catalog::EntryInfo| e.modified.is_none_or(|m| m >= cutoff);
            if young(entry) || entries.get(i + 1).is_some_and(|next| young(next)) {
                keep(entry.version.id, KeepReason::Young);
            }
        }
        if let Some(n) = options.keep_last {
            for entry in entries.iter().rev().take(n) {
                keep(entry.version.id, KeepReason::Policy);
            }
        }
    }
    for (_, version) in &catalog.tags {
        keep(*version, KeepReason::Tag);
    }
    for lease in catalog.leases.iter().filter(|l| l.record.is_live(l.modified, now)) {
        for version in lease.record.version_ids() {
            if catalog.entries.iter().any(|e| e.version.id == version) {
                keep(version, KeepReason::Lease);
            }
        }
    }
    for entry in &catalog.entries {
        let policy = match (options.keep_last, options.keep_within) {
            (None, None) => true,
            (_, Some(within)) => now.duration_since(entry.version.created_at.to_system_time()).unwrap_or_default() <= within,
            (Some(_), None) => false,
        };
        if policy {
            keep(entry.version.id, KeepReason::Policy);
        }
    }
    kept
}

/// Keys that must not be deleted.
#[derive(Default)]
struct Marked {
    keys: BTreeSet<String>,
    /// Versions a lease names, marked or pending.
    versions: BTreeSet<VersionId>,
    /// Prefixes of a version being published: its root and its pages.
    prefixes: Vec<String>,
    segments: BTreeSet<SegmentId>,
    /// A lease announced a sync, so directory chunks are all kept.
    all_chunks: bool,
}

impl Marked {
    fn mark_version(&mut self, walker: &mut Walker, catalog: &Catalog, version: VersionId) -> Result<()> {
        let refs = walker.walk(version);
        stop_on_problems(walker.store(), &catalog.volume, &refs.problems)?;
        self.keys.insert(refs.root_key.clone());
        self.keys.extend(refs.page_keys.iter().cloned());
        self.keys.extend(refs.chunk_keys.iter().cloned());
        for segment in refs.segments() {
            self.segments.insert(segment);
        }
        Ok(())
    }

    /// Marks what a live lease names. A version without a root yet is being
    /// published: its root and pages are kept by prefix.
    fn mark_lease(&mut self, walker: &mut Walker, catalog: &Catalog, lease: &crate::lease::LeaseRecord) -> Result<()> {
        let volume = &catalog.volume;
        for version in lease.version_ids() {
            if !self.versions.insert(version) {
                continue;
            }
            let root = crate::store::checkpoint_key(volume, version);
            self.prefixes.push(root.clone());
            self.prefixes.push(format!("volumes/{volume}/pages/{version}-"));
            // A root written after the listing is known to exist too.
            let exists = catalog.objects.contains_key(&root) || walker.object_exists(&root);
            if exists {
                self.mark_version(walker, catalog, version)?;
            }
        }
        self.segments.extend(lease.segment_ids());
        self.all_chunks |= lease.syncing;
        Ok(())
    }

    fn protects(&self, key: &str) -> bool {
        if self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str())) {
            return true;
        }
        if self.all_chunks && key.contains("/dirs/") {
            return true;
        }
        segment_of(key).is_some_and(|s| self.segments.contains(&s))
    }
}

fn segment_of(key: &str) -> Option<SegmentId> {
    let (_, rest) = key.split_once("/segments/")?;
    rest.strip_suffix(".seg")?.parse().ok()
}

enum ObjectClass {
    VolumeRecord,
    Entry,
    Tag,
    Lease,
    GcRecord,
    SweepMarker,
    Data,
    Other,
}

fn class_of(rest: &str) -> ObjectClass {
    match rest.split('/').next().unwrap_or_default() {
        "volume" => ObjectClass::VolumeRecord,
        "lineages" => ObjectClass::Entry,
        "tags" => ObjectClass::Tag,
        "leases" => ObjectClass::Lease,
        "gc" if rest.starts_with("gc/sweeps/") => ObjectClass::SweepMarker,
        "gc" => ObjectClass::GcRecord,
        "checkpoints" | "pages" | "dirs" | "segments" => ObjectClass::Data,
        _ => ObjectClass::Other,
    }
}

fn delete_order(rest: &str) -> u8 {
    match rest.split('/').next().unwrap_or_default() {
        "lineages" => 0,
        "tags" => 1,
        "checkpoints" => 2,
        "pages" => 3,
        "dirs" => 4,
        "segments" => 5,
        _ => 6,
    }
}

/// Parses a duration such as `90s`, `15m`, `1h`, `7d` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let invalid = || {
        EngineError::InvalidArgument(format!(
            "invalid duration {text:?}; use a number with a unit: s, m, h or d (as in 30m or 7d), or 0"
        ))
    };
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(invalid)?;
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(invalid()),
    };
    number.checked_mul(seconds).map(Duration::from_secs).ok_or_else(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        for bad in ["", "h", "5", "5w", "-1h", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
