//! The rebase-or-conflict decision of a sync onto a moved head, checked
//! against a model. Two sessions start from one version and change a small
//! tree of files; one publishes first and the other syncs onto the moved
//! head. The model predicts which paths conflict (changed on both sides and
//! not identical at the end). Without conflicts it predicts the merged tree.
//! There each path names the file that the side which changed the path gave
//! it, and each file has the content of the side that rewrote it. Files are identities, as inodes
//! are, so a file renamed on both sides ends up with both names. The syncing
//! session reads the other side's changes only from its published version, so
//! a file the other side rewrote and then removed keeps the syncing session's
//! content.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chalk_engine::{
    Access, EngineError, LineageName, Owner, Session, SessionBase, Store, StoreConfig, SyncOutcome, VolumeName,
};
use proptest::prelude::*;

/// Paths the operations pick from. `d` is a directory in every version.
const PATHS: [&str; 6] = ["a", "b", "c", "d/x", "d/y", "d/z"];

#[derive(Clone, Debug)]
enum Op {
    Write { path: usize, byte: u8, len: usize },
    Remove { path: usize },
    Rename { from: usize, to: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..PATHS.len(), any::<u8>(), 1..64usize).prop_map(|(path, byte, len)| Op::Write { path, byte, len }),
        1 => (0..PATHS.len()).prop_map(|path| Op::Remove { path }),
        1 => (0..PATHS.len(), 0..PATHS.len()).prop_map(|(from, to)| Op::Rename { from, to }),
    ]
}

/// Content of a file in the model: a stamp that changes with every write
/// (the bytes of a rewrite may repeat, but the engine still counts it as a
/// change) and the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Content {
    stamp: u64,
    bytes: Vec<u8>,
}

/// One side's tree: which file each path names, and each file's content.
#[derive(Clone, Debug, Default)]
struct Tree {
    paths: BTreeMap<&'static str, u64>,
    files: BTreeMap<u64, Content>,
}

impl Tree {
    /// Returns the file and content at `path`; a change to either changes the path.
    fn at(&self, path: &str) -> Option<(u64, &Content)> {
        self.paths.get(path).map(|id| (*id, &self.files[id]))
    }

    fn bytes(&self, path: &str) -> Option<Vec<u8>> {
        self.at(path).map(|(_, content)| content.bytes.clone())
    }
}

/// Applies `ops` to the model and to `session`, skipping operations that do
/// not apply (removing or renaming a missing path, renaming onto a file).
/// A write to an existing path rewrites that file, as the engine does.
fn apply(ops: &[Op], tree: &mut Tree, session: &Session, next_stamp: &mut u64) {
    for op in ops {
        match *op {
            Op::Write { path, byte, len } => {
                let bytes = vec![byte; len];
                *next_stamp += 1;
                let id = *tree.paths.entry(PATHS[path]).or_insert(*next_stamp);
                tree.files.insert(id, Content { stamp: *next_stamp, bytes: bytes.clone() });
                session.write_file_from(PATHS[path], &mut &bytes[..], 0o644, Owner::current()).unwrap();
            }
            Op::Remove { path } => {
                if tree.paths.remove(PATHS[path]).is_some() {
                    session.remove_path(PATHS[path], false).unwrap();
                }
            }
            Op::Rename { from, to } => {
                if from == to || !tree.paths.contains_key(PATHS[from]) || tree.paths.contains_key(PATHS[to]) {
                    continue;
                }
                let id = tree.paths.remove(PATHS[from]).unwrap();
                tree.paths.insert(PATHS[to], id);
                session.move_path(PATHS[from], PATHS[to], Owner::current()).unwrap();
            }
        }
    }
}

/// Paths whose file or content differs between `base` and `tree`.
fn changed(base: &Tree, tree: &Tree) -> BTreeSet<&'static str> {
    PATHS.iter().copied().filter(|path| base.at(path) != tree.at(path)).collect()
}

/// Checks that `session` shows exactly the files of `expected`, listings
/// included, and that paths name one inode exactly when they name one file
/// of the model, with a link count to match.
fn assert_tree(session: &Session, expected: &BTreeMap<&'static str, (u64, Vec<u8>)>) -> Result<(), TestCaseError> {
    for path in PATHS {
        match expected.get(path) {
            Some((_, bytes)) => {
                let mut out = Vec::new();
                session.read_file_to(path, &mut out).map_err(|e| TestCaseError::fail(format!("reading {path}: {e}")))?;
                prop_assert_eq!(&out, bytes, "contents of {}", path);
            }
            None => prop_assert!(session.resolve_path(path).is_err(), "{} exists but the model removed it", path),
        }
    }
    let mut listed: BTreeSet<String> = BTreeSet::new();
    for dir in ["", "d"] {
        for entry in session.walk(dir, false).map_err(|e| TestCaseError::fail(format!("listing {dir:?}: {e}")))? {
            if entry.path != "d" {
                listed.insert(entry.path);
            }
        }
    }
    let wanted: BTreeSet<String> = expected.keys().map(|p| p.to_string()).collect();
    prop_assert_eq!(listed, wanted, "directory listings");

    for (path, (id, _)) in expected {
        let attr = session.resolve_path(path).unwrap();
        let names: Vec<&str> = expected.iter().filter(|(_, (other, _))| other == id).map(|(p, _)| *p).collect();
        prop_assert_eq!(attr.nlink as usize, names.len(), "link count of {} (named {:?})", path, names);
        for name in names {
            prop_assert_eq!(session.resolve_path(name).unwrap().ino, attr.ino, "{} and {} name one file", path, name);
        }
    }
    Ok(())
}

fn run_case(base_files: &[(usize, u8)], ours_ops: &[Op], theirs_ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store: Arc<Store> = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    let main = || SessionBase::Lineage(LineageName::main());

    // The base version: `d` and some files.
    let mut next_stamp = 0;
    let mut base = Tree::default();
    let seed = store.open_session(&volume, main(), Access::Writable).unwrap();
    seed.make_dirs("d", Owner::current()).unwrap();
    let seed_ops: Vec<Op> = base_files.iter().map(|&(path, byte)| Op::Write { path, byte, len: 8 }).collect();
    apply(&seed_ops, &mut base, &seed, &mut next_stamp);
    seed.sync(None).unwrap();
    drop(seed);

    let ours_session = store.open_session(&volume, main(), Access::Writable).unwrap();
    let theirs_session = store.open_session(&volume, main(), Access::Writable).unwrap();
    let (mut ours, mut theirs) = (base.clone(), base.clone());
    apply(ours_ops, &mut ours, &ours_session, &mut next_stamp);
    apply(theirs_ops, &mut theirs, &theirs_session, &mut next_stamp);
    let theirs_head = match theirs_session.sync(None).unwrap() {
        SyncOutcome::Published(info) => info.id,
        SyncOutcome::NothingToPublish { base } => base.id,
    };

    let (ours_changed, theirs_changed) = (changed(&base, &ours), changed(&base, &theirs));
    let conflicts: Vec<String> = ours_changed
        .intersection(&theirs_changed)
        .filter(|path| ours.bytes(path) != theirs.bytes(path))
        .map(|path| path.to_string())
        .collect();

    let result = ours_session.sync(None);
    if !conflicts.is_empty() {
        match result {
            Err(EngineError::Conflict { paths, .. }) => {
                let paths: BTreeSet<String> = paths.into_iter().collect();
                prop_assert_eq!(paths, conflicts.iter().cloned().collect::<BTreeSet<_>>());
            }
            other => prop_assert!(false, "expected a conflict on {:?}, got {:?}", conflicts, other),
        }
        prop_assert_eq!(store.head(&volume, &LineageName::main()).unwrap().id, theirs_head);
        return Ok(());
    }
    let published = match result {
        Ok(SyncOutcome::Published(_)) => true,
        Ok(SyncOutcome::NothingToPublish { .. }) => false,
        Err(err) => return Err(TestCaseError::fail(format!("expected a rebase, got {err}"))),
    };

    // Without conflicts each path names the file of the side that changed
    // it, and each file has our content if we rewrote it, else theirs. A
    // file they rewrote and then removed keeps our content, because their
    // published version lacks it.
    let mut merged = BTreeMap::new();
    for path in PATHS {
        let source = if ours_changed.contains(path) { &ours } else { &theirs };
        let Some(&id) = source.paths.get(path) else { continue };
        let ours_rewrote = ours.files.get(&id).is_some_and(|c| base.files.get(&id) != Some(c));
        let theirs_published = theirs.paths.values().any(|&named| named == id).then(|| &theirs.files[&id]);
        let content = match (ours_rewrote, theirs_published) {
            (false, Some(content)) => content,
            _ => &ours.files[&id],
        };
        merged.insert(path, (id, content.bytes.clone()));
    }
    let view = store.open_session(&volume, main(), Access::ReadOnly).unwrap();
    assert_tree(&view, &merged)?;
    // A session that published carries on from the merged version.
    if published {
        assert_tree(&ours_session, &merged)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn rebase_decision_matches_model(
        base_files in proptest::collection::vec((0..PATHS.len(), any::<u8>()), 0..6),
        ours in proptest::collection::vec(op(), 0..6),
        theirs in proptest::collection::vec(op(), 1..6),
    ) {
        run_case(&base_files, &ours, &theirs)?;
    }
}

#[test]
fn removal_against_rename_of_same_file() {
    // Ours removes `a`; theirs renames `a` to `b`. Both end without `a`, so
    // `a` is no conflict, and `b` must keep its file.
    run_case(&[(0, 1)], &[Op::Remove { path: 0 }], &[Op::Rename { from: 0, to: 1 }]).unwrap();
}

#[test]
fn rename_against_removal_of_same_file() {
    run_case(&[(0, 1)], &[Op::Rename { from: 0, to: 1 }], &[Op::Remove { path: 0 }]).unwrap();
}

#[test]
fn rename_against_rewrite_then_removal() {
    // Ours renames `d/x` to `a`; theirs rewrites `d/x` to one byte and then
    // removes it. Their version never contained the one byte, so `a` keeps the
    // eight base bytes.
    let theirs = [Op::Write { path: 3, byte: 0, len: 1 }, Op::Remove { path: 3 }];
    run_case(&[(3, 0)], &[Op::Rename { from: 3, to: 0 }], &theirs).unwrap();
}

#[test]
fn rename_on_both_sides_keeps_both_names() {
    // Ours renames `a` to `c`; theirs renames it to `b` and rewrites it.
    // The file keeps both names and theirs' bytes.
    let theirs = [Op::Rename { from: 0, to: 1 }, Op::Write { path: 1, byte: 9, len: 3 }];
    run_case(&[(0, 1)], &[Op::Rename { from: 0, to: 2 }], &theirs).unwrap();
}
