//! Differences between two versions, computed from their checkpoints.
//!
//! Only inode pages whose object keys differ between the two checkpoints are
//! read, so the cost follows what changed, not the size of the volume. Paths
//! come from each changed inode's links and its ancestors' links.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::{EngineError, Result};
use crate::extent::ExtentMap;
use crate::format::checkpoint::{decode_page, InodeRecord, StoredContent};
use crate::ids::{Ino, VersionId, VolumeName};
use crate::session::{Access, Session, SessionBase};
use crate::store::Store;
use crate::tree::FileKind;

/// Kind of difference of one path between two versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Removed,
    /// Content or attributes changed (for directories: mode, owner or extended attributes).
    Modified,
    /// The same inode under another path; it may also be modified.
    Renamed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "added",
            ChangeKind::Removed => "removed",
            ChangeKind::Modified => "modified",
            ChangeKind::Renamed => "renamed",
        }
    }
}

/// One changed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Path in the newer version, or in the older one for a removal.
    pub path: String,
    pub kind: ChangeKind,
    /// Previous path of a renamed inode.
    pub old_path: Option<String>,
    pub file_kind: FileKind,
    pub ino: Ino,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
    /// True when a renamed inode's content or attributes changed too.
    pub content_changed: bool,
    /// Byte ranges `[start, end)` of a file that differ, from the extent maps.
    pub ranges: Vec<(u64, u64)>,
}

/// True when two records of one inode differ in what a user would call a change.
/// Times other than a file's mtime and a directory's entry list are not compared:
/// entries show up as changes of the children.
fn content_differs(a: &InodeRecord, b: &InodeRecord) -> bool {
    let (x, y) = (&a.attr, &b.attr);
    if x.kind != y.kind || x.perm != y.perm || x.uid != y.uid || x.gid != y.gid || a.xattrs != b.xattrs || x.rdev != y.rdev {
        return true;
    }
    match (&a.content, &b.content) {
        (StoredContent::File(ea), StoredContent::File(eb)) => x.size != y.size || x.mtime != y.mtime || ea != eb,
        (StoredContent::Symlink(ta), StoredContent::Symlink(tb)) => ta != tb,
        (StoredContent::Directory(_), StoredContent::Directory(_)) => false,
        (StoredContent::Special, StoredContent::Special) => false,
        _ => true,
    }
}

/// Byte ranges where two files' extent maps or sizes differ.
pub fn differing_ranges(a: &ExtentMap, a_size: u64, b: &ExtentMap, b_size: u64) -> Vec<(u64, u64)> {
    let end = a_size.max(b_size);
    let mut bounds: BTreeSet<u64> = BTreeSet::from([0, end, a_size.min(b_size)]);
    for (offset, extent) in a.iter().chain(b.iter()) {
        bounds.insert(offset.min(end));
        bounds.insert((offset + extent.len).min(end));
    }
    let source = |map: &ExtentMap, size: u64, at: u64, len: u64| {
        if at >= size {
            return None;
        }
        let piece = map.pieces(at, len.min(size - at)).into_iter().next()?;
        Some(piece.extent.map(|e| (e.segment, e.data_offset)))
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let bounds: Vec<u64> = bounds.into_iter().collect();
    for window in bounds.windows(2) {
        let (start, stop) = (window[0], window[1]);
        if start >= stop {
            continue;
        }
        if source(a, a_size, start, stop - start) != source(b, b_size, start, stop - start) {
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = stop,
                _ => out.push((start, stop)),
            }
        }
    }
    out
}

impl Store {
    /// Lists what changed from version `a` to version `b`, sorted by path.
    pub fn diff(self: &std::sync::Arc<Self>, volume: &VolumeName, a: VersionId, b: VersionId) -> Result<Vec<Change>> {
        let root_a = self.load_checkpoint(volume, a)?;
        let root_b = self.load_checkpoint(volume, b)?;
        let tree_a = self.open_session(volume, SessionBase::Version(a), Access::ReadOnly)?;
        let tree_b = self.open_session(volume, SessionBase::Version(b), Access::ReadOnly)?;
        let page_numbers: BTreeSet<u64> = root_a.pages.keys().chain(root_b.pages.keys()).copied().collect();
        let mut out = Vec::new();
        for page in page_numbers {
            let (key_a, key_b) = (root_a.pages.get(&page), root_b.pages.get(&page));
            if key_a == key_b {
                continue;
            }
            let records_a = self.page_records(key_a)?;
            let records_b = self.page_records(key_b)?;
            let inos: BTreeSet<Ino> = records_a.keys().chain(records_b.keys()).copied().collect();
            for ino in inos {
                let (ra, rb) = (records_a.get(&ino), records_b.get(&ino));
                if ra == rb {
                    continue;
                }
                self.describe(&tree_a, &tree_b, ino, ra, rb, &mut out)?;
            }
        }
        out.sort_by(|x, y| x.path.cmp(&y.path));
        Ok(out)
    }

    fn page_records(&self, key: Option<&String>) -> Result<BTreeMap<Ino, InodeRecord>> {
        let Some(key) = key else { return Ok(BTreeMap::new()) };
        let bytes = self.read_object(key)?;
        decode_page(&bytes).map_err(|detail| EngineError::CorruptObject { key: key.clone(), detail })
    }

    fn describe(
        &self,
        tree_a: &Session,
        tree_b: &Session,
        ino: Ino,
        a: Option<&InodeRecord>,
        b: Option<&InodeRecord>,
        out: &mut Vec<Change>,
    ) -> Result<()> {
        let change = |path: String, kind: ChangeKind, record: &InodeRecord| Change {
            path,
            kind,
            old_path: None,
            file_kind: record.attr.kind,
            ino,
            old_size: a.map(|r| r.attr.size),
            new_size: b.map(|r| r.attr.size),
            content_changed: false,
            ranges: Vec::new(),
        };
        match (a, b) {
            (None, None) => {}
            (None, Some(rb)) => {
                for path in tree_b.paths_of(ino)? {
                    out.push(change(path, ChangeKind::Added, rb));
                }
            }
            (Some(ra), None) => {
                for path in tree_a.paths_of(ino)? {
                    out.push(change(path, ChangeKind::Removed, ra));
                }
            }
            (Some(ra), Some(rb)) => {
                let paths_a = tree_a.paths_of(ino)?;
                let paths_b = tree_b.paths_of(ino)?;
                let differs = content_differs(ra, rb);
                let ranges = match (&ra.content, &rb.content) {
                    (StoredContent::File(ea), StoredContent::File(eb)) if differs => {
                        differing_ranges(ea, ra.attr.size, eb, rb.attr.size)
                    }
                    _ => Vec::new(),
                };
                if paths_a != paths_b {
                    for (i, path) in paths_b.iter().enumerate() {
                        let mut renamed = change(path.clone(), ChangeKind::Renamed, rb);
                        renamed.old_path = paths_a.get(i).or(paths_a.first()).cloned();
                        renamed.content_changed = differs;
                        renamed.ranges = ranges.clone();
                        out.push(renamed);
                    }
                    for path in paths_a.iter().skip(paths_b.len()) {
                        out.push(change(path.clone(), ChangeKind::Removed, ra));
                    }
                } else if differs {
                    for path in paths_b {
                        let mut modified = change(path, ChangeKind::Modified, rb);
                        modified.content_changed = true;
                        modified.ranges = ranges.clone();
                        out.push(modified);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::Extent;
    use crate::ids::SegmentId;

    fn extent(segment: u128, data_offset: u64, len: u64) -> Extent {
        Extent { len, segment: SegmentId::from_u128(segment), data_offset, record_offset: 0, record_len: 0 }
    }

    #[test]
    fn ranges_cover_only_overwritten_bytes() {
        let mut a = ExtentMap::new();
        a.insert(0, extent(1, 0, 1000));
        let mut b = a.clone();
        b.insert(100, extent(2, 0, 50));
        assert_eq!(differing_ranges(&a, 1000, &b, 1000), vec![(100, 150)]);
    }

    #[test]
    fn ranges_include_growth_and_truncation() {
        let mut a = ExtentMap::new();
        a.insert(0, extent(1, 0, 100));
        let b = a.clone();
        assert_eq!(differing_ranges(&a, 100, &b, 300), vec![(100, 300)]);
        let mut c = a.clone();
        c.truncate(40);
        assert_eq!(differing_ranges(&a, 100, &c, 40), vec![(40, 100)]);
    }
}
