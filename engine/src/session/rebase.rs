//! Syncing onto a lineage whose head moved: the conflict check and the
//! rebase.
//!
//! Rules:
//! - The paths this session changed and the paths the lineage changed since
//!   the session's base are compared. Both names of a rename count, and a
//!   removed or renamed directory covers every path under it.
//! - A path changed on both sides that ends up identical (kind, mode,
//!   owner, extended attributes and bytes) is not a conflict.
//! - Without conflicts, the session's changes are applied on top of the
//!   head: its changed files replace the head's, and directory entries are
//!   merged as deltas from the base, so entries the other side added stay.
//! - A name both sides created names the session's inode afterwards, and
//!   the head's inode loses that link (and goes when it has no other).

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;

use crate::diff::{Change, ChangeKind};
use crate::error::{EngineError, Result};
use crate::format::checkpoint::{decode_page, RootCheckpoint, StoredContent};
use crate::ids::{Ino, LineageName};
use crate::store::VersionInfo;
use crate::tree::{Content, FileKind, Inode};

use super::{inode_from_record, invalidations_for, Access, Session, SessionBase, State};

/// Policy of a sync when the session and the lineage changed the same paths.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnConflict {
    /// Fail with [`EngineError::Conflict`], and the session keeps its writes.
    #[default]
    Error,
    /// Publish into a new lineage forked from the session's base.
    Fork,
    /// Rebase anyway; the session's version of each conflicting path wins.
    Ours,
}

/// Result of comparing a session's changes with a moved head.
pub(crate) enum Rebase {
    /// The session now builds on the head.
    Rebased,
    /// Conflicts, and the caller asked to publish into a new lineage.
    Fork,
}

/// Paths one side changed. `covering` contains removed or renamed
/// directories, which also cover every path below them.
#[derive(Default)]
struct Changed {
    paths: BTreeSet<String>,
    covering: BTreeSet<String>,
}

impl Changed {
    fn overlaps(&self, other: &Changed) -> BTreeSet<String> {
        let mut out: BTreeSet<String> = self.paths.intersection(&other.paths).cloned().collect();
        for (covering, paths) in [(&self.covering, &other.paths), (&other.covering, &self.paths)] {
            for dir in covering {
                let prefix = format!("{dir}/");
                out.extend(paths.iter().filter(|p| p.starts_with(&prefix)).cloned());
            }
        }
        out
    }
}

fn lineage_changes(changes: &[Change]) -> Changed {
    let mut out = Changed::default();
    for change in changes {
        out.paths.insert(change.path.clone());
        if let Some(old) = &change.old_path {
            out.paths.insert(old.clone());
        }
        if change.file_kind == FileKind::Directory {
            match change.kind {
                ChangeKind::Removed => {
                    out.covering.insert(change.path.clone());
                }
                ChangeKind::Renamed => {
                    out.covering.insert(change.path.clone());
                    out.covering.extend(change.old_path.clone());
                }
                ChangeKind::Added | ChangeKind::Modified => {}
            }
        }
    }
    out
}

/// True when an inode changed more than the times and entries of a directory.
fn meaningful_change(inode: &Inode, base: &crate::format::checkpoint::InodeRecord) -> bool {
    let (x, y) = (&inode.attr, &base.attr);
    if x.kind != y.kind || x.perm != y.perm || x.uid != y.uid || x.gid != y.gid || x.rdev != y.rdev {
        return true;
    }
    if inode.xattrs != base.xattrs || inode.links != base.links || x.nlink == 0 {
        return true;
    }
    match (&inode.content, &base.content) {
        (Content::File(ours), StoredContent::File(theirs)) => x.size != y.size || x.mtime != y.mtime || ours != theirs,
        (Content::Symlink(ours), StoredContent::Symlink(theirs)) => ours != theirs,
        (Content::Directory(_), StoredContent::Directory(_)) | (Content::Special, StoredContent::Special) => false,
        _ => true,
    }
}

impl Session {
    /// Takes as this session's changes everything that differs between its
    /// base and the version whose checkpoint root is `source`, and makes the
    /// session publish onto `lineage`, where its base is entry `base_seq`.
    /// A sync then applies those changes to the lineage head by the usual
    /// rebase-or-conflict rules; this is how a diverged lineage is promoted.
    pub(crate) fn stage_version(&self, source: &RootCheckpoint, lineage: LineageName, base_seq: u64) -> Result<()> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let state = &mut *state;
        let page_nos: BTreeSet<u64> = state.root.pages.keys().chain(source.pages.keys()).copied().collect();
        for page_no in page_nos {
            let source_key = source.pages.get(&page_no);
            if state.root.pages.get(&page_no) == source_key {
                continue;
            }
            let theirs = match source_key {
                Some(key) => {
                    let bytes = self.store.read_object(key)?;
                    decode_page(&bytes).map_err(|detail| EngineError::CorruptObject { key: key.clone(), detail })?
                }
                None => BTreeMap::new(),
            };
            let base = state.base_page(&self.store, page_no)?.unwrap_or_default();
            for (ino, record) in &theirs {
                if base.get(ino) != Some(record) {
                    let inode = inode_from_record(&self.store, &self.volume, record)?;
                    state.inodes.insert(*ino, inode);
                    state.dirty.insert(*ino);
                }
            }
            for ino in base.keys().filter(|ino| !theirs.contains_key(ino)) {
                // Removed in the source: kept unlinked, as an unlink leaves it.
                state.inode(&self.store, &self.volume, *ino)?.attr.nlink = 0;
                state.dirty.insert(*ino);
            }
        }
        state.lineage = Some(lineage);
        state.base_entry_seq = base_seq;
        Ok(())
    }

    /// Paths this session changed since its base.
    fn own_changes(&self, state: &mut State, base_tree: &Session) -> Result<Changed> {
        let mut out = Changed::default();
        let dirty: Vec<Ino> = state.dirty.iter().copied().collect();
        for ino in dirty {
            let base = state.base_record(&self.store, ino)?;
            let Some(inode) = state.inodes.get(&ino).cloned() else { continue };
            let old_paths = match &base {
                Some(record) if !meaningful_change(&inode, record) => continue,
                Some(_) => base_tree.paths_of(ino)?,
                None => Vec::new(),
            };
            let new_paths = if inode.attr.nlink > 0 { state.paths_of(&self.store, &self.volume, ino)? } else { Vec::new() };
            let structural = inode.attr.kind == FileKind::Directory && base.is_some() && old_paths != new_paths;
            if structural {
                out.covering.extend(old_paths.iter().cloned());
                out.covering.extend(new_paths.iter().cloned());
            }
            out.paths.extend(old_paths);
            out.paths.extend(new_paths);
        }
        Ok(out)
    }

    /// True when `path` ends up the same in this session (whose locked
    /// state is `state`) and in `head_tree`.
    fn same_in_state(&self, state: &mut State, path: &str, head_tree: &Session) -> Result<bool> {
        let ours = state.resolve(&self.store, &self.volume, path)?;
        let theirs = head_tree.resolve_path(path).ok();
        let (ours, theirs) = match (ours, theirs) {
            (None, None) => return Ok(true),
            (Some(ours), Some(theirs)) => (ours, theirs),
            _ => return Ok(false),
        };
        let our_inode = state.inode(&self.store, &self.volume, ours)?.clone();
        let (a, b) = (&our_inode.attr, &theirs);
        let same_attrs = a.kind == b.kind && a.perm == b.perm && a.uid == b.uid && a.gid == b.gid && a.size == b.size;
        let their_xattrs = head_tree.listxattr(theirs.ino)?;
        let our_xattrs: Vec<Vec<u8>> = our_inode.xattrs.keys().cloned().collect();
        if !same_attrs || our_xattrs != their_xattrs {
            return Ok(false);
        }
        for name in &our_xattrs {
            let value = head_tree.getxattr(theirs.ino, std::ffi::OsStr::from_bytes(name))?;
            if our_inode.xattrs.get(name) != Some(&value) {
                return Ok(false);
            }
        }
        match &our_inode.content {
            Content::File(_) => {
                let mut offset = 0;
                while offset < a.size {
                    let mine = self.read_in(state, ours, offset, 1 << 20)?;
                    let other = head_tree.read(theirs.ino, offset, 1 << 20)?;
                    if mine != other || mine.is_empty() {
                        return Ok(mine == other);
                    }
                    offset += mine.len() as u64;
                }
                Ok(true)
            }
            Content::Symlink(target) => Ok(*target == head_tree.readlink(theirs.ino)?),
            // Directories made apart at one path are different inodes, and the
            // merged parent keeps only one of them, so the files in the other would
            // be lost. Only the same directory, changed on both sides, is merged.
            Content::Directory(_) => Ok(ours == theirs.ino),
            Content::Special => Ok(true),
        }
    }

    /// Checks the session's changes against the lineage's since the base and,
    /// unless they conflict, moves the session onto the head.
    pub(crate) fn rebase_onto(
        &self,
        state: &mut State,
        lineage: &LineageName,
        head_seq: u64,
        head: VersionInfo,
        on_conflict: OnConflict,
    ) -> Result<Rebase> {
        let base = state.base.clone();
        let their_changes = self.store.diff(&self.volume, base.id, head.id)?;
        let theirs = lineage_changes(&their_changes);
        let base_tree = self.store.open_session(&self.volume, SessionBase::Version(base.id), Access::ReadOnly)?;
        let head_tree = self.store.open_session(&self.volume, SessionBase::Version(head.id), Access::ReadOnly)?;
        let ours = self.own_changes(state, &base_tree)?;
        let overlapping = ours.overlaps(&theirs);

        let mut conflicts = Vec::new();
        for path in overlapping {
            if !self.same_in_state(state, &path, &head_tree)? {
                conflicts.push(path);
            }
        }
        if !conflicts.is_empty() {
            match on_conflict {
                OnConflict::Error => {
                    return Err(EngineError::Conflict {
                        volume: self.volume.to_string(),
                        lineage: lineage.to_string(),
                        head: head.id.to_string(),
                        paths: conflicts,
                        promoted: None,
                    })
                }
                OnConflict::Fork => return Ok(Rebase::Fork),
                OnConflict::Ours => {
                    tracing::warn!(volume = %self.volume, lineage = %lineage, paths = conflicts.len(), "sync overwrites paths the lineage changed");
                }
            }
        }

        let mut head_state = head_tree.state.lock();
        let dirty: Vec<Ino> = state.dirty.iter().copied().collect();
        let mut merged = Vec::new();
        // Head inodes whose name the session's entry took: (directory, name, inode).
        let mut displaced = Vec::new();
        for ino in dirty {
            let Some(ours) = state.inodes.get(&ino).cloned() else { continue };
            let base_record = state.base_record(&self.store, ino)?;
            let in_head = head_state.base_record(&self.store, ino)?.is_some();
            let inode = match (&ours.content, base_record, in_head) {
                (Content::Directory(entries), Some(base_record), true) => {
                    let base_entries = base_tree.state.lock().inode(&self.store, &self.volume, ino)?.clone();
                    let theirs = head_state.inode(&self.store, &self.volume, ino)?.clone();
                    let (inode, replaced) = merge_directory(&ours, entries, &base_record, &base_entries, theirs);
                    displaced.extend(replaced.into_iter().map(|(name, target)| (ino, name, target)));
                    inode
                }
                (_, Some(base_record), true) => {
                    let theirs = head_state.inode(&self.store, &self.volume, ino)?.clone();
                    merge_inode(ours, &base_record, theirs)
                }
                _ => ours,
            };
            merged.push((ino, inode));
        }
        // A name both sides created (the same file, or any file with
        // --on-conflict ours) now names the session's inode. The head's
        // inode loses that link, and is removed when it has no other, so no
        // unreachable file stays in the version.
        // NOTE: a displaced directory keeps its children, which become
        // unreachable. Two directories made apart at one path are a
        // conflict, so only --on-conflict ours reaches this case.
        let mut unlinked = Vec::new();
        for (dir, name, (target, kind)) in displaced {
            if kind == FileKind::Directory || merged.iter().any(|(ino, _)| *ino == target) {
                continue;
            }
            let mut inode = head_state.inode(&self.store, &self.volume, target)?.clone();
            inode.links.retain(|(parent, link)| !(*parent == dir && *link == name));
            inode.attr.nlink = inode.links.len() as u32;
            merged.push((target, inode));
            unlinked.push(target);
        }
        drop(head_state);

        let root = self.store.load_checkpoint(&self.volume, head.id)?;
        let open = state.open_handles.clone();
        state.inodes.retain(|ino, _| open.contains_key(ino));
        state.inodes.extend(merged);
        state.dirty.extend(unlinked);
        state.pages.clear();
        state.root = root;
        state.base = head;
        state.base_entry_seq = head_seq;
        state.invalidations.extend(invalidations_for(&their_changes, &base_tree, &head_tree));
        tracing::info!(volume = %self.volume, lineage = %lineage, head = %state.base.id, "rebased session onto the moved head");
        Ok(Rebase::Rebased)
    }
}

/// True when an inode's kind, attributes, extended attributes or content
/// differ from its base record. Links and times other than a file's mtime
/// are not compared.
fn content_changed(inode: &Inode, base: &crate::format::checkpoint::InodeRecord) -> bool {
    let (x, y) = (&inode.attr, &base.attr);
    if x.kind != y.kind || x.perm != y.perm || x.uid != y.uid || x.gid != y.gid || x.rdev != y.rdev {
        return true;
    }
    if inode.xattrs != base.xattrs {
        return true;
    }
    match (&inode.content, &base.content) {
        (Content::File(ours), StoredContent::File(theirs)) => x.size != y.size || x.mtime != y.mtime || ours != theirs,
        (Content::Symlink(ours), StoredContent::Symlink(theirs)) => ours != theirs,
        (Content::Special, StoredContent::Special) => false,
        _ => true,
    }
}

/// Merges a file, symlink or special inode that both the session and the
/// head may have changed since the base. The session's links added and
/// removed since the base are applied to the head's links, so a name the
/// head gave the inode survives the session's unlink of another name. The
/// content and attributes are the session's when it changed them, and
/// otherwise the head's. An inode left without links is removed.
fn merge_inode(ours: Inode, base: &crate::format::checkpoint::InodeRecord, theirs: Inode) -> Inode {
    let removed: Vec<&(Ino, Vec<u8>)> = base.links.iter().filter(|link| !ours.links.contains(link)).collect();
    let added: Vec<&(Ino, Vec<u8>)> = ours.links.iter().filter(|link| !base.links.contains(link)).collect();
    let mut links: Vec<(Ino, Vec<u8>)> = theirs.links.iter().filter(|link| !removed.contains(link)).cloned().collect();
    for link in added {
        if !links.contains(link) {
            links.push(link.clone());
        }
    }
    let mut merged = if content_changed(&ours, base) { ours } else { theirs };
    merged.attr.nlink = links.len() as u32;
    merged.links = links;
    merged
}

/// Applies this session's entry changes (base to ours) to the head's
/// entries, and the session's own attribute changes to the head's attributes.
/// Also returns the head's entries that the session's replaced: names the
/// head had added or changed since the base, with the inode they named.
fn merge_directory(
    ours: &Inode,
    our_entries: &BTreeMap<Vec<u8>, (Ino, FileKind)>,
    base_record: &crate::format::checkpoint::InodeRecord,
    base: &Inode,
    mut theirs: Inode,
) -> (Inode, Vec<(Vec<u8>, (Ino, FileKind))>) {
    let empty = BTreeMap::new();
    let base_entries = match &base.content {
        Content::Directory(entries) => entries,
        _ => &empty,
    };
    let mut displaced = Vec::new();
    if let Content::Directory(entries) = &mut theirs.content {
        for (name, target) in our_entries {
            if base_entries.get(name) != Some(target) {
                if let Some(previous) = entries.insert(name.clone(), *target) {
                    if previous != *target && base_entries.get(name) != Some(&previous) {
                        displaced.push((name.clone(), previous));
                    }
                }
            }
        }
        for (name, target) in base_entries {
            if !our_entries.contains_key(name) && entries.get(name) == Some(target) {
                entries.remove(name);
            }
        }
        let subdirs = entries.values().filter(|(_, kind)| *kind == FileKind::Directory).count() as u32;
        theirs.attr.nlink = 2 + subdirs;
    }
    let (o, b) = (&ours.attr, &base_record.attr);
    if o.perm != b.perm {
        theirs.attr.perm = o.perm;
    }
    if o.uid != b.uid {
        theirs.attr.uid = o.uid;
    }
    if o.gid != b.gid {
        theirs.attr.gid = o.gid;
    }
    if ours.xattrs != base_record.xattrs {
        theirs.xattrs = ours.xattrs.clone();
    }
    if ours.links != base_record.links {
        theirs.links = ours.links.clone();
    }
    theirs.attr.mtime = theirs.attr.mtime.max(o.mtime);
    theirs.attr.ctime = theirs.attr.ctime.max(o.ctime);
    (theirs, displaced)
}
