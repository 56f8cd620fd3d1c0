//! Publishing: `sync` turns a session's changes into one new version.
//!
//! Publish order (a crash between steps leaves only garbage, never a
//! visible partial version):
//! 1. Seal the open segment: seal record, flush, `fdatasync`.
//! 2. Upload every segment the session sealed.
//! 3. Write the changed directory chunks and inode pages, then the
//!    checkpoint root.
//! 4. Create the version record for the next sequence number with
//!    create-if-absent. Only this step makes the version visible; if another
//!    writer took that number first, the sync fails and the session keeps
//!    its writes. If the write fails and reading the entry back does not
//!    settle whether it landed, the sync fails and the next sync checks the
//!    lineage head: a landed entry is adopted instead of published twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::format::checkpoint::{
    chunk_hash, encode_chunk, encode_page, split_chunks, ChunkRef, InodeRecord, RootCheckpoint, StoredContent, StoredEntry,
    INODES_PER_PAGE,
};
use crate::ids::{Ino, LineageName, VersionId, VolumeName};
use crate::metrics::SyncResult;
use crate::store::{checkpoint_key, chunk_key, page_key, segment_key, EntryKind, Store, VersionInfo};
use crate::tree::{Attr, Content, FileKind, Inode, Owner, Timestamp};

use super::{Access, Session, State, SyncOutcome};
use crate::lease::Lease;

/// A publish whose lineage entry write returned an error, so the entry may
/// or may not exist. Everything it refers to was written before.
pub(crate) struct Unconfirmed {
    info: VersionInfo,
    lineage: LineageName,
    seq: u64,
    root: RootCheckpoint,
    new_pages: HashMap<u64, Arc<BTreeMap<Ino, InodeRecord>>>,
}

/// Whether a session changed anything after the version it carries on from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChangesSince {
    None,
    Some,
}

/// Publishes the empty first version of a new volume: a root directory owned
/// by the calling user.
pub(crate) fn publish_empty_version(store: &Arc<Store>, volume: &VolumeName) -> Result<VersionInfo> {
    let id = VersionId::generate();
    let now = Timestamp::now();
    let owner = Owner::current();
    let root_dir = InodeRecord {
        attr: Attr {
            ino: Ino::ROOT,
            kind: FileKind::Directory,
            perm: 0o755,
            uid: owner.uid,
            gid: owner.gid,
            size: 0,
            nlink: 2,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
        },
        links: Vec::new(),
        xattrs: BTreeMap::new(),
        content: StoredContent::Directory(Vec::new()),
    };
    let page = page_key(volume, id, 0);
    store.objects().put(&page, &encode_page(&BTreeMap::from([(Ino::ROOT, root_dir)])))?;
    let root = RootCheckpoint { next_ino: 2, files: 0, bytes: 0, pages: BTreeMap::from([(0, page)]) };
    store.objects().put(&checkpoint_key(volume, id), &root.encode())?;
    let info = VersionInfo {
        id,
        seq: 1,
        parent: None,
        lineage: LineageName::main(),
        created_at: now,
        message: Some("create volume".into()),
        files: 0,
        bytes: 0,
        segments: Vec::new(),
    };
    if !store.publish_entry(volume, &LineageName::main(), 1, &info, crate::store::EntryKind::Commit)? {
        return Err(EngineError::exists("volume", volume.as_str()));
    }
    Ok(info)
}

/// Options of [`Session::sync_with`].
#[derive(Clone, Debug, Default)]
pub struct SyncOptions {
    /// Message stored with the new version.
    pub message: Option<String>,
    pub on_conflict: super::OnConflict,
    pub retry: RetryAdvice,
}

/// Next step that the error of a sync gives the user when the object store
/// failed it: what to do once the store is reachable again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RetryAdvice {
    /// Sync the same session again: it stays open and keeps its writes (a
    /// mount, an SDK batch).
    #[default]
    SyncAgain,
    /// Repeat the request that opened the session, because the session ends
    /// with it and its writes go too. The text is the instruction, as in
    /// "run `chalk volume put` again".
    Repeat(String),
}

impl Session {
    /// Publishes every change of this session as one new version on its
    /// lineage, rebasing onto a moved head when the changes do not overlap,
    /// then carries on from that version.
    pub fn sync(&self, message: Option<&str>) -> Result<SyncOutcome> {
        self.sync_with(&SyncOptions { message: message.map(str::to_owned), ..SyncOptions::default() })
    }

    /// Like [`Session::sync`], with a choice of what to do on conflicts.
    pub fn sync_with(&self, options: &SyncOptions) -> Result<SyncOutcome> {
        let started = std::time::Instant::now();
        let outcome = self.publish(options);
        let result = match &outcome {
            Ok(SyncOutcome::Published(_)) => SyncResult::Published,
            Ok(SyncOutcome::NothingToPublish { .. }) => SyncResult::NothingToPublish,
            Err(_) => SyncResult::Failed,
        };
        self.metrics.record_sync(result, started.elapsed());
        outcome.map_err(|error| match error {
            // The store error names the failed request. The user also needs
            // to know whether the writes are kept, and what to do next.
            EngineError::ObjectStore { url, detail } => {
                let next_step = match &options.retry {
                    RetryAdvice::SyncAgain => "nothing was published and this session keeps its writes: sync again".to_owned(),
                    RetryAdvice::Repeat(instruction) => format!("nothing was published: {instruction}"),
                };
                EngineError::ObjectStore { url, detail: format!("{detail}; {next_step} once the store is reachable") }
            }
            other => other,
        })
    }

    fn publish(&self, options: &SyncOptions) -> Result<SyncOutcome> {
        let message = options.message.as_deref();
        self.check_writable()?;
        let mut state = self.state.lock();
        let state = &mut *state;
        if let Some(outcome) = self.settle_unconfirmed(state)? {
            return Ok(outcome);
        }
        // Inodes created and unlinked since the base (kept only while open)
        // change nothing that a version would hold.
        let dirty: Vec<Ino> = state.dirty.iter().copied().collect();
        let mut effective = false;
        for ino in dirty {
            let linked = state.inodes.get(&ino).is_some_and(|i| i.attr.nlink > 0);
            if linked || state.base_record(&self.store, ino)?.is_some() {
                effective = true;
                break;
            }
        }
        if !effective {
            return Ok(SyncOutcome::NothingToPublish { base: state.base.clone() });
        }
        // Another writer can take the next entry between the head check and
        // the head write. The sync then checks and rebases again, up to
        // PUBLISH_ATTEMPTS times, before it reports the moved head.
        let mut uploaded: HashSet<crate::ids::SegmentId> = HashSet::new();
        let mut attempt = 0;
        let (info, lineage, seq, root, new_pages, segments) = loop {
            attempt += 1;
            if let Some(lineage) = state.lineage.clone() {
                let (seq, head) = self.store.head_entry(&self.volume, &lineage)?;
                if seq != state.base_entry_seq {
                    match self.rebase_onto(state, &lineage, seq, head, options.on_conflict)? {
                        super::rebase::Rebase::Rebased => {}
                        // Publishing without a lineage forks one from the base below.
                        super::rebase::Rebase::Fork => state.lineage = None,
                    }
                }
            }

            // Step 1: seal.
            let log = state.log.as_mut().expect("writable sessions have a log");
            log.roll(self)?;
            let segments = log.sealed.clone();
            let version = VersionId::generate();
            self.announce_sync(state, version, &segments)?;

            // Step 2: upload the segments that no earlier attempt uploaded.
            let uploads: Vec<(String, &std::path::Path)> = segments
                .iter()
                .filter(|(segment, _)| !uploaded.contains(segment))
                .map(|(segment, path)| (segment_key(&self.volume, *segment), path.as_path()))
                .collect();
            parallel_puts(&uploads, |(key, path)| self.store.objects().put_file(key, path))?;
            self.metrics.record_published(uploads.iter().map(|(_, path)| std::fs::metadata(path).map_or(0, |m| m.len())).sum());
            uploaded.extend(segments.iter().map(|(segment, _)| *segment));

            // Step 3: checkpoint.
            let (root, new_pages) = self.write_checkpoint(state, version)?;

            // Step 4: the conditional head write. A session on a pinned version
            // first forks its own lineage from that version.
            let (lineage, seq) = match &state.lineage {
                Some(lineage) => (lineage.clone(), state.base_entry_seq + 1),
                None => (self.store.fork(&self.volume, state.base.id, None)?.0, 2),
            };
            let info = VersionInfo {
                id: version,
                seq,
                parent: Some(state.base.id),
                lineage: lineage.clone(),
                created_at: Timestamp::now(),
                message: message.map(str::to_owned),
                files: root.files,
                bytes: root.bytes,
                segments: segments.iter().map(|(id, _)| *id).collect(),
            };
            let landed = match self.store.publish_entry(&self.volume, &lineage, seq, &info, EntryKind::Commit) {
                Ok(landed) => landed,
                Err(err) => {
                    state.unconfirmed = Some(Unconfirmed { info, lineage, seq, root, new_pages });
                    return Err(err);
                }
            };
            if landed {
                break (info, lineage, seq, root, new_pages, segments);
            }
            let head = self.store.head(&self.volume, &lineage)?;
            if state.lineage.is_none() || attempt >= PUBLISH_ATTEMPTS {
                return Err(self.head_moved(state, &lineage, &head));
            }
            tracing::debug!(volume = %self.volume, lineage = %lineage, attempt, head = %head.id, "another writer published first; checking the head again");
        };
        tracing::info!(volume = %self.volume, version = %info.id, seq = info.seq, segments = segments.len(), "published version");
        self.carry_on(state, Unconfirmed { info: info.clone(), lineage, seq, root, new_pages }, ChangesSince::None);
        Ok(SyncOutcome::Published(info))
    }

    /// Settles a publish left unconfirmed by the previous sync. When its
    /// entry is the lineage head, the session carries on from that version,
    /// which is this sync's result unless changes were made since. Returns
    /// `None` when the caller should go on publishing.
    fn settle_unconfirmed(&self, state: &mut State) -> Result<Option<SyncOutcome>> {
        let Some(pending) = &state.unconfirmed else { return Ok(None) };
        let (seq, head) = self.store.head_entry(&self.volume, &pending.lineage)?;
        let pending = state.unconfirmed.take().expect("checked above");
        // NOTE: an entry that landed and was then overtaken by another
        // writer is not adopted; the sync reports a moved head, and the
        // landed version stays in the lineage.
        if seq != pending.seq || head.id != pending.info.id {
            return Ok(None);
        }
        tracing::info!(volume = %self.volume, version = %head.id, seq, "a sync whose answer was lost had published");
        // Every change appends a record, which opens a segment, so no open
        // segment means no change since the unconfirmed sync sealed its own.
        let changes = match state.log.as_ref().is_some_and(|log| log.current.is_some()) {
            true => ChangesSince::Some,
            false => ChangesSince::None,
        };
        let info = pending.info.clone();
        self.carry_on(state, pending, changes);
        Ok(match changes {
            ChangesSince::None => Some(SyncOutcome::Published(info)),
            ChangesSince::Some => None,
        })
    }

    /// Makes a published version the session's base. Its segments move into
    /// the segment cache; with [`ChangesSince::Some`] the changed inodes stay
    /// dirty, so the next publish includes the changes made after it.
    fn carry_on(&self, state: &mut State, published: Unconfirmed, changes: ChangesSince) {
        let log = state.log.as_mut().expect("writable sessions have a log");
        let (adopted, later): (Vec<_>, Vec<_>) =
            log.sealed.drain(..).partition(|(segment, _)| published.info.segments.contains(segment));
        log.sealed = later;
        for (segment, path) in adopted {
            if let Err(err) = self.store.segments.adopt(&path, segment) {
                tracing::warn!(segment = %segment, error = %err, "published segment stays in the session directory");
            }
        }
        if let Some(lease) = self.lease.lock().as_ref() {
            let unpublished: Vec<_> = log.sealed.iter().map(|(segment, _)| *segment).collect();
            lease.end_sync(published.info.id, &unpublished);
        }
        state.base = published.info;
        state.lineage = Some(published.lineage);
        state.base_entry_seq = published.seq;
        state.root = published.root;
        state.pages.extend(published.new_pages);
        if changes == ChangesSince::None {
            state.dirty.clear();
            let open = &state.open_handles;
            state.inodes.retain(|ino, inode| inode.attr.nlink > 0 || open.contains_key(ino));
        }
    }

    /// Names the base, the version about to be published and the segments
    /// about to be uploaded in the session's lease, waits for any gc run
    /// that is deleting, and checks that the base survived it.
    fn announce_sync(&self, state: &State, version: VersionId, segments: &[(crate::ids::SegmentId, std::path::PathBuf)]) -> Result<()> {
        let mut lease = self.lease.lock();
        if lease.is_none() && self.access == Access::Writable {
            // The session opened while the store was unreachable.
            *lease = Some(Lease::acquire(self.store.objects().clone(), &self.volume, self.id, &[state.base.id])?);
        }
        let Some(lease) = lease.as_ref() else { return Ok(()) };
        let ids: Vec<_> = segments.iter().map(|(segment, _)| *segment).collect();
        lease.begin_sync(&self.volume, &[state.base.id, version], &ids)?;
        self.store.check_checkpoint_in_store(&self.volume, state.base.id).map_err(|err| EngineError::CorruptObject {
            key: crate::store::checkpoint_key(&self.volume, state.base.id),
            detail: format!(
                "the base version of this session is unreadable ({err}); gc may have removed it; \
                 the session keeps its writes: copy them out, unmount and mount again"
            ),
        })?;
        Ok(())
    }

    fn head_moved(&self, state: &State, lineage: &LineageName, head: &VersionInfo) -> EngineError {
        EngineError::HeadMoved {
            volume: self.volume.to_string(),
            lineage: lineage.to_string(),
            base: state.base.id.to_string(),
            head: head.id.to_string(),
        }
    }

    /// Writes the pages that hold changed inodes and a new root that refers
    /// to the parent's pages for everything else.
    fn write_checkpoint(
        &self,
        state: &mut State,
        version: VersionId,
    ) -> Result<(RootCheckpoint, HashMap<u64, Arc<BTreeMap<Ino, InodeRecord>>>)> {
        let mut by_page: BTreeMap<u64, Vec<Ino>> = BTreeMap::new();
        for ino in &state.dirty {
            by_page.entry(ino.0 / INODES_PER_PAGE).or_default().push(*ino);
        }
        let mut root = state.root.clone();
        root.next_ino = root.next_ino.max(state.next_ino);
        let mut files = root.files as i128;
        let mut bytes = root.bytes as i128;
        let mut new_pages = HashMap::new();
        let mut objects: Vec<(String, Vec<u8>)> = Vec::new();
        for (page_no, inos) in by_page {
            state.base_record(&self.store, Ino(page_no * INODES_PER_PAGE))?;
            let mut records: BTreeMap<Ino, InodeRecord> =
                state.pages.get(&page_no).map(|page| (**page).clone()).unwrap_or_default();
            for ino in inos {
                let old = records.remove(&ino);
                if let Some(old) = &old {
                    if old.attr.kind == FileKind::File {
                        files -= 1;
                        bytes -= old.attr.size as i128;
                    }
                }
                let Some(inode) = state.inodes.get(&ino) else { continue };
                if inode.attr.nlink == 0 {
                    continue;
                }
                if inode.attr.kind == FileKind::File {
                    files += 1;
                    bytes += inode.attr.size as i128;
                }
                records.insert(ino, self.stored_record(inode, old.as_ref(), &mut objects));
            }
            if records.is_empty() {
                root.pages.remove(&page_no);
            } else {
                let key = page_key(&self.volume, version, page_no);
                objects.push((key.clone(), encode_page(&records)));
                root.pages.insert(page_no, key);
            }
            new_pages.insert(page_no, Arc::new(records));
        }
        root.files = files.max(0) as u64;
        root.bytes = bytes.max(0) as u64;
        // Pages and chunks first, so the root never refers to a missing object.
        parallel_puts(&objects, |(key, bytes)| self.store.objects().put(key, bytes))?;
        self.store.objects().put(&checkpoint_key(&self.volume, version), &root.encode())?;
        Ok((root, new_pages))
    }

    /// Builds the stored record of an inode, queueing the directory chunks
    /// that its parent version does not already have onto `objects`.
    fn stored_record(&self, inode: &Inode, old: Option<&InodeRecord>, objects: &mut Vec<(String, Vec<u8>)>) -> InodeRecord {
        let content = match &inode.content {
            Content::File(extents) => StoredContent::File(extents.clone()),
            Content::Symlink(target) => StoredContent::Symlink(target.clone()),
            Content::Special => StoredContent::Special,
            Content::Directory(entries) => {
                let known: HashSet<&str> = match old.map(|o| &o.content) {
                    Some(StoredContent::Directory(chunks)) => chunks.iter().map(|c| c.key.as_str()).collect(),
                    _ => HashSet::new(),
                };
                let sorted: Vec<StoredEntry> =
                    entries.iter().map(|(name, (ino, kind))| (name.clone(), *ino, *kind)).collect();
                let mut chunks = Vec::new();
                for chunk in split_chunks(&sorted) {
                    let encoded = encode_chunk(chunk);
                    let hash = chunk_hash(&encoded);
                    if !known.contains(hash.as_str()) {
                        objects.push((chunk_key(&self.volume, &hash), encoded));
                    }
                    chunks.push(ChunkRef { key: hash, entries: chunk.len() as u32 });
                }
                StoredContent::Directory(chunks)
            }
        };
        InodeRecord { attr: inode.attr.clone(), links: inode.links.clone(), xattrs: inode.xattrs.clone(), content }
    }
}

/// Head writes a sync tries before it reports that the head moved.
const PUBLISH_ATTEMPTS: u32 = 16;

/// Object writes in flight at once during a sync.
const PARALLEL_PUTS: usize = 8;

/// Runs `put` on every item with up to [`PARALLEL_PUTS`] threads and returns
/// the first error after all of them finished.
fn parallel_puts<T: Sync>(items: &[T], put: impl Fn(&T) -> Result<()> + Sync) -> Result<()> {
    if items.len() <= 1 {
        return items.iter().try_for_each(&put);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = parking_lot::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_PUTS.min(items.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                if let Err(err) = put(item) {
                    first_error.lock().get_or_insert(err);
                    return;
                }
            });
        }
    });
    match first_error.into_inner() {
        Some(err) => Err(err),
        None => Ok(()),
    }
}
