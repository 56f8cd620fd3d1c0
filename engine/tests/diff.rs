//! Diffs between versions: additions, removals, renames by identity,
//! truncations, holes and attribute-only changes.

use std::ffi::OsStr;
use std::sync::Arc;

use chalk_engine::{
    Access, Change, ChangeKind, Ino, LineageName, Owner, RenameMode, Session, SessionBase, SetAttr, Store, StoreConfig,
    SyncOutcome, VersionId, VolumeName, XattrMode,
};

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    volume: VolumeName,
    session: Session,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    Fixture { _dir: dir, store, volume, session }
}

impl Fixture {
    fn put(&self, path: &str, data: &[u8]) {
        self.session.write_file_from(path, &mut &data[..], 0o644, Owner::current()).unwrap();
    }

    fn sync(&self) -> VersionId {
        match self.session.sync(None).unwrap() {
            SyncOutcome::Published(info) => info.id,
            other => panic!("nothing published: {other:?}"),
        }
    }

    fn ino(&self, path: &str) -> Ino {
        self.session.resolve_path(path).unwrap().ino
    }

    fn diff(&self, a: VersionId, b: VersionId) -> Vec<Change> {
        self.store.diff(&self.volume, a, b).unwrap()
    }
}

fn find<'a>(changes: &'a [Change], path: &str) -> &'a Change {
    changes.iter().find(|c| c.path == path).unwrap_or_else(|| panic!("no change at {path}: {changes:#?}"))
}

#[test]
fn additions_and_removals() {
    let f = fixture();
    f.put("keep.txt", b"k");
    f.put("gone.txt", b"g");
    let a = f.sync();
    f.session.unlink(Ino::ROOT, OsStr::new("gone.txt")).unwrap();
    f.put("dir/new.txt", b"new");
    let b = f.sync();
    let changes = f.diff(a, b);
    assert_eq!(find(&changes, "gone.txt").kind, ChangeKind::Removed);
    assert_eq!(find(&changes, "dir").kind, ChangeKind::Added);
    assert_eq!(find(&changes, "dir/new.txt").kind, ChangeKind::Added);
    assert!(changes.iter().all(|c| c.path != "keep.txt"), "unchanged file listed: {changes:#?}");
    assert_eq!(changes.len(), 3);
}

#[test]
fn rename_is_reported_by_identity() {
    let f = fixture();
    f.put("d/old.txt", b"same bytes");
    let a = f.sync();
    let d = f.ino("d");
    f.session.mkdir(Ino::ROOT, OsStr::new("e"), 0o755, Owner::current()).unwrap();
    let e = f.ino("e");
    f.session.rename(d, OsStr::new("old.txt"), e, OsStr::new("new.txt"), RenameMode::Replace).unwrap();
    let b = f.sync();
    let changes = f.diff(a, b);
    let renamed = find(&changes, "e/new.txt");
    assert_eq!(renamed.kind, ChangeKind::Renamed);
    assert_eq!(renamed.old_path.as_deref(), Some("d/old.txt"));
    assert!(!renamed.content_changed);
}

#[test]
fn directory_rename_reports_the_directory() {
    let f = fixture();
    f.put("src/a.rs", b"a");
    f.put("src/b.rs", b"b");
    let a = f.sync();
    f.session.rename(Ino::ROOT, OsStr::new("src"), Ino::ROOT, OsStr::new("lib"), RenameMode::Replace).unwrap();
    let b = f.sync();
    let changes = f.diff(a, b);
    let renamed = find(&changes, "lib");
    assert_eq!(renamed.kind, ChangeKind::Renamed);
    assert_eq!(renamed.old_path.as_deref(), Some("src"));
    assert_eq!(changes.len(), 1, "{changes:#?}");
}

#[test]
fn truncation_and_holes_give_byte_ranges() {
    let f = fixture();
    f.put("f.bin", &vec![1u8; 10_000]);
    let a = f.sync();
    let ino = f.ino("f.bin");
    f.session.setattr(ino, &SetAttr { size: Some(4_000), ..SetAttr::default() }).unwrap();
    f.session.write(ino, 20_000, b"tail").unwrap();
    let b = f.sync();
    let changes = f.diff(a, b);
    let modified = find(&changes, "f.bin");
    assert_eq!(modified.kind, ChangeKind::Modified);
    assert_eq!(modified.old_size, Some(10_000));
    assert_eq!(modified.new_size, Some(20_004));
    assert_eq!(modified.ranges, vec![(4_000, 20_004)]);
}

#[test]
fn xattr_only_change_is_modified() {
    let f = fixture();
    f.put("f", b"x");
    let a = f.sync();
    f.session.setxattr(f.ino("f"), OsStr::new("user.tag"), b"v", XattrMode::CreateOrReplace).unwrap();
    let b = f.sync();
    let changes = f.diff(a, b);
    let modified = find(&changes, "f");
    assert_eq!(modified.kind, ChangeKind::Modified);
    assert!(modified.ranges.is_empty(), "no bytes changed: {:?}", modified.ranges);
}

#[test]
fn sibling_forks_do_not_share_new_inodes() {
    let f = fixture();
    let base = f.sync_after(|f| f.put("base", b"b"));
    let a = f.store.open_session(&f.volume, SessionBase::Version(base), Access::Writable).unwrap();
    let b = f.store.open_session(&f.volume, SessionBase::Version(base), Access::Writable).unwrap();
    a.write_file_from("only-a", &mut &b"a"[..], 0o644, Owner::current()).unwrap();
    b.write_file_from("only-b", &mut &b"b"[..], 0o644, Owner::current()).unwrap();
    let va = match a.sync(None).unwrap() { SyncOutcome::Published(i) => i.id, o => panic!("{o:?}") };
    let vb = match b.sync(None).unwrap() { SyncOutcome::Published(i) => i.id, o => panic!("{o:?}") };
    let changes = f.diff(va, vb);
    assert_eq!(find(&changes, "only-a").kind, ChangeKind::Removed);
    assert_eq!(find(&changes, "only-b").kind, ChangeKind::Added);
    assert_eq!(changes.len(), 2, "{changes:#?}");
}

impl Fixture {
    fn sync_after(&self, change: impl FnOnce(&Fixture)) -> VersionId {
        change(self);
        self.sync()
    }
}
