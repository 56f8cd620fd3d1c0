//! Lineages: forks that copy nothing, sessions on pinned versions that
//! publish into lineages of their own, tags, renames and deletes.

use std::path::Path;
use std::sync::Arc;

use chalk_engine::object_store::list_all;
use chalk_engine::{
    Access, EngineError, LineageName, OnConflict, Owner, Session, SessionBase, Store, StoreConfig, SyncOptions, SyncOutcome,
    VersionInfo, VolumeName,
};

fn setup(root: &Path) -> (Arc<Store>, VolumeName) {
    let store = Store::open(StoreConfig::with_local_root(root)).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    (store, volume)
}

fn lineage(name: &str) -> LineageName {
    LineageName::new(name).unwrap()
}

fn put(session: &Session, path: &str, data: &[u8]) {
    session.write_file_from(path, &mut &data[..], 0o644, Owner::current()).unwrap();
}

fn read(session: &Session, path: &str) -> Vec<u8> {
    let mut out = Vec::new();
    session.read_file_to(path, &mut out).unwrap();
    out
}

fn published(outcome: SyncOutcome) -> VersionInfo {
    match outcome {
        SyncOutcome::Published(info) => info,
        other => panic!("expected a published version, got {other:?}"),
    }
}

fn object_count(store: &Store) -> usize {
    list_all(store.objects().as_ref(), "volumes/").unwrap().len()
}

#[test]
fn fork_writes_one_object() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    for i in 0..300 {
        put(&session, &format!("d/f{i}"), b"data");
    }
    let base = published(session.sync(None).unwrap());
    let before = object_count(&store);
    let (name, version) = store.fork(&volume, base.id, Some(lineage("exp"))).unwrap();
    assert_eq!(name.as_str(), "exp");
    assert_eq!(version.id, base.id);
    assert_eq!(object_count(&store), before + 1);
    assert_eq!(store.head(&volume, &name).unwrap().id, base.id);
    assert!(matches!(store.fork(&volume, base.id, Some(lineage("exp"))), Err(EngineError::AlreadyExists { .. })));
}

#[test]
fn forked_lineage_diverges_from_main() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    put(&main, "shared.txt", b"base");
    let base = published(main.sync(None).unwrap());
    store.fork(&volume, base.id, Some(lineage("exp"))).unwrap();

    let fork = store.open_session(&volume, SessionBase::Lineage(lineage("exp")), Access::Writable).unwrap();
    put(&fork, "shared.txt", b"fork");
    let forked = published(fork.sync(Some("on exp")).unwrap());
    assert_eq!(forked.lineage.as_str(), "exp");
    assert_eq!(forked.seq, 2);
    assert_eq!(forked.parent, Some(base.id));

    put(&main, "main-only.txt", b"main");
    let on_main = published(main.sync(None).unwrap());
    assert_eq!(on_main.parent, Some(base.id));

    let exp_versions: Vec<_> = store.versions(&volume, &lineage("exp")).unwrap().iter().map(|v| v.id).collect();
    assert_eq!(exp_versions, vec![base.id, forked.id]);
    let reader = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap();
    assert_eq!(read(&reader, "shared.txt"), b"base");
    assert!(reader.resolve_path("main-only.txt").is_ok());
    let all = store.all_versions(&volume).unwrap();
    assert_eq!(all.len(), 4, "create, base, fork commit and main commit, each once");
}

#[test]
fn pinned_session_publishes_into_new_lineage() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    put(&main, "f", b"base");
    let base = published(main.sync(None).unwrap());

    let a = store.open_session(&volume, SessionBase::Version(base.id), Access::Writable).unwrap();
    let b = store.open_session(&volume, SessionBase::Version(base.id), Access::Writable).unwrap();
    assert!(a.lineage().is_none());
    put(&a, "a.txt", b"approach a");
    put(&b, "b.txt", b"approach b");
    let from_a = published(a.sync(None).unwrap());
    let from_b = published(b.sync(None).unwrap());
    assert_ne!(from_a.lineage, from_b.lineage);
    assert!(from_a.lineage.as_str().starts_with("fork-"), "{}", from_a.lineage);
    assert_eq!(from_a.parent, Some(base.id));
    assert_eq!(a.lineage(), Some(from_a.lineage.clone()));

    // The base version and main are unchanged.
    assert_eq!(store.head(&volume, &LineageName::main()).unwrap().id, base.id);
    let pinned = store.open_session(&volume, SessionBase::Version(base.id), Access::ReadOnly).unwrap();
    assert!(pinned.resolve_path("a.txt").is_err());
    assert!(pinned.resolve_path("b.txt").is_err());

    // A second sync continues on the session's own lineage.
    put(&a, "a2.txt", b"more");
    let again = published(a.sync(None).unwrap());
    assert_eq!(again.lineage, from_a.lineage);
    assert_eq!(again.seq, 3);
    assert_eq!(store.lineages(&volume).unwrap().len(), 3);
}

#[test]
fn tags_resolve_like_ids() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let first = store.head(&volume, &LineageName::main()).unwrap();
    store.tag(&volume, first.id, "empty").unwrap();
    assert_eq!(store.resolve_version(&volume, "empty").unwrap().id, first.id);
    assert!(matches!(store.tag(&volume, first.id, "empty"), Err(EngineError::AlreadyExists { .. })));
    assert!(matches!(store.tag(&volume, first.id, "../x"), Err(EngineError::InvalidName { .. })));
    let session = store.open_session(&volume, SessionBase::Version(store.resolve_version(&volume, "empty").unwrap().id), Access::ReadOnly);
    assert!(session.is_ok());
}

#[test]
fn lineage_rename_and_delete() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let first = store.head(&volume, &LineageName::main()).unwrap();
    store.fork(&volume, first.id, Some(lineage("tmp"))).unwrap();
    store.rename_lineage(&volume, &lineage("tmp"), &lineage("kept")).unwrap();
    assert!(matches!(store.head(&volume, &lineage("tmp")), Err(EngineError::NotFound { .. })));
    assert_eq!(store.head(&volume, &lineage("kept")).unwrap().id, first.id);
    store.delete_lineage(&volume, &lineage("kept")).unwrap();
    assert!(matches!(store.versions(&volume, &lineage("kept")), Err(EngineError::NotFound { .. })));
    assert!(matches!(store.delete_lineage(&volume, &LineageName::main()), Err(EngineError::NotPermitted(_))));
    // The version stays readable by id.
    assert_eq!(store.resolve_version(&volume, &first.id.to_string()).unwrap().id, first.id);
}

#[test]
fn copy_shares_extents_and_restores_old_files() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap();
    let data = vec![7u8; 3 << 20];
    put(&main, "data/big.bin", &data);
    put(&main, "data/small.txt", b"small");
    let first = published(main.sync(None).unwrap());
    main.remove_path("data", true).unwrap();
    published(main.sync(None).unwrap());

    let before = object_count(&store);
    let old = store.open_session(&volume, SessionBase::Version(first.id), Access::ReadOnly).unwrap();
    let copied = main.copy_path(&old, "data", "restored", true, Owner::current()).unwrap();
    assert_eq!(copied, 2);
    let restored = published(main.sync(None).unwrap());
    assert_eq!(read(&main, "restored/big.bin"), data);
    assert_eq!(read(&main, "restored/small.txt"), b"small");
    // Only metadata objects were written: no segment larger than a few KiB.
    let new_bytes: u64 = list_all(store.objects().as_ref(), "volumes/v/segments/")
        .unwrap()
        .iter()
        .filter(|o| restored.segments.iter().any(|s| o.key.contains(&s.to_string())))
        .map(|o| o.size)
        .sum();
    assert!(new_bytes < 64 * 1024, "the copy wrote {new_bytes} bytes of segments");
    assert!(object_count(&store) - before < 12);

    main.move_path("restored/small.txt", "moved/small.txt", Owner::current()).unwrap();
    assert!(main.resolve_path("restored/small.txt").is_err());
    assert_eq!(read(&main, "moved/small.txt"), b"small");
}

#[test]
fn promote_fast_forwards_unmoved_target() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let base = store.head(&volume, &LineageName::main()).unwrap();
    store.fork(&volume, base.id, Some(lineage("exp"))).unwrap();
    let exp = store.open_session(&volume, SessionBase::Lineage(lineage("exp")), Access::Writable).unwrap();
    put(&exp, "winner.txt", b"w");
    let winner = published(exp.sync(None).unwrap());
    store.promote(&volume, winner.id, &LineageName::main()).unwrap();
    assert_eq!(store.head(&volume, &LineageName::main()).unwrap().id, winner.id);

    store.fork(&volume, base.id, Some(lineage("stale"))).unwrap();
    let stale = store.open_session(&volume, SessionBase::Lineage(lineage("stale")), Access::Writable).unwrap();
    put(&stale, "late.txt", b"l");
    let late = published(stale.sync(None).unwrap());
    // main moved to `winner` since `stale` forked, so this is a rebase.
    let merged = store.promote(&volume, late.id, &LineageName::main()).unwrap();
    assert_eq!(merged.parent, Some(winner.id));
    let main = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap();
    assert_eq!(read(&main, "winner.txt"), b"w");
    assert_eq!(read(&main, "late.txt"), b"l");
}

#[test]
fn promote_diverged_lineage_rebases() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main_lineage = SessionBase::Lineage(LineageName::main());
    let seed = store.open_session(&volume, main_lineage.clone(), Access::Writable).unwrap();
    put(&seed, "shared/keep.txt", b"keep");
    put(&seed, "shared/drop.txt", b"drop");
    put(&seed, "edit.txt", b"old");
    let base = published(seed.sync(None).unwrap());
    drop(seed);

    store.fork(&volume, base.id, Some(lineage("exp"))).unwrap();
    let exp = store.open_session(&volume, SessionBase::Lineage(lineage("exp")), Access::Writable).unwrap();
    put(&exp, "edit.txt", b"new from exp");
    put(&exp, "shared/added.txt", b"added");
    exp.remove_path("shared/drop.txt", false).unwrap();
    let exp_head = published(exp.sync(None).unwrap());

    let main = store.open_session(&volume, main_lineage.clone(), Access::Writable).unwrap();
    put(&main, "shared/main-only.txt", b"main");
    let main_head = published(main.sync(None).unwrap());

    let merged = store.promote(&volume, exp_head.id, &LineageName::main()).unwrap();
    assert_eq!(merged.parent, Some(main_head.id));
    assert_eq!(store.head(&volume, &LineageName::main()).unwrap().id, merged.id);
    let view = store.open_session(&volume, main_lineage.clone(), Access::ReadOnly).unwrap();
    assert_eq!(read(&view, "edit.txt"), b"new from exp");
    assert_eq!(read(&view, "shared/added.txt"), b"added");
    assert_eq!(read(&view, "shared/main-only.txt"), b"main");
    assert_eq!(read(&view, "shared/keep.txt"), b"keep");
    assert!(view.resolve_path("shared/drop.txt").is_err());
    // The source lineage is left as it was.
    assert_eq!(store.head(&volume, &lineage("exp")).unwrap().id, exp_head.id);
}

/// Publishes model.bin on main, forks `exp` there, and rewrites model.bin
/// on both lineages. Returns the heads of `exp` and main.
fn diverged_on_model(store: &Arc<Store>, volume: &VolumeName) -> (VersionInfo, VersionInfo) {
    let main_lineage = SessionBase::Lineage(LineageName::main());
    let seed = store.open_session(volume, main_lineage.clone(), Access::Writable).unwrap();
    put(&seed, "model.bin", b"v1");
    let base = published(seed.sync(None).unwrap());
    drop(seed);

    store.fork(volume, base.id, Some(lineage("exp"))).unwrap();
    let exp = store.open_session(volume, SessionBase::Lineage(lineage("exp")), Access::Writable).unwrap();
    put(&exp, "model.bin", b"exp");
    let exp_head = published(exp.sync(None).unwrap());
    let main = store.open_session(volume, main_lineage, Access::Writable).unwrap();
    put(&main, "model.bin", b"main");
    (exp_head, published(main.sync(None).unwrap()))
}

#[test]
fn promote_overlap_conflicts() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let (exp_head, main_head) = diverged_on_model(&store, &volume);

    match store.promote(&volume, exp_head.id, &LineageName::main()) {
        Err(EngineError::Conflict { paths, .. }) => assert_eq!(paths, vec!["model.bin".to_owned()]),
        other => panic!("expected a conflict on model.bin, got {other:?}"),
    }
    assert_eq!(store.head(&volume, &LineageName::main()).unwrap().id, main_head.id);
}

#[test]
fn promote_conflict_message_fits_promote() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let (exp_head, _) = diverged_on_model(&store, &volume);

    let err = store.promote(&volume, exp_head.id, &LineageName::main()).unwrap_err();
    let message = err.to_string();
    assert!(message.starts_with(&format!("promote of version {}", exp_head.id)), "{message}");
    assert!(message.contains("(model.bin)"), "{message}");
    assert!(message.contains("nothing was published"), "{message}");
    assert!(message.contains("--from-version"), "{message}");
    // Promote has no session that keeps writes and no --on-conflict option.
    assert!(!message.contains("this session keeps its writes"), "{message}");
    assert!(!message.contains("--on-conflict"), "{message}");
}

#[test]
fn tag_cannot_shadow_a_version_id() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let first = store.head(&volume, &LineageName::main()).unwrap();
    let id = first.id.to_string();
    assert!(matches!(store.tag(&volume, first.id, &id), Err(EngineError::InvalidName { .. })));
    // A tag that looks like an id prefix resolves as the prefix, never as the tag.
    store.tag(&volume, first.id, &id[..6]).unwrap();
    assert_eq!(store.resolve_version(&volume, &id[..6]).unwrap().id, first.id);
}

#[test]
fn follow_head_keeps_open_removed_files() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main_lineage = SessionBase::Lineage(LineageName::main());
    let writer = store.open_session(&volume, main_lineage.clone(), Access::Writable).unwrap();
    put(&writer, "keep.txt", b"keep");
    put(&writer, "gone.txt", b"gone");
    published(writer.sync(None).unwrap());

    let follower = store.open_session(&volume, main_lineage, Access::ReadOnly).unwrap();
    assert_eq!(follower.follow_head().unwrap(), None);
    let gone = follower.resolve_path("gone.txt").unwrap().ino;
    follower.open(gone).unwrap();

    put(&writer, "keep.txt", b"changed");
    let first = published(writer.sync(None).unwrap());
    assert_eq!(follower.follow_head().unwrap().map(|v| v.id), Some(first.id));
    writer.remove_path("gone.txt", false).unwrap();
    put(&writer, "added.txt", b"added");
    let second = published(writer.sync(None).unwrap());
    assert_eq!(follower.follow_head().unwrap().map(|v| v.id), Some(second.id));

    assert_eq!(read(&follower, "keep.txt"), b"changed");
    assert_eq!(read(&follower, "added.txt"), b"added");
    assert!(follower.resolve_path("gone.txt").is_err());
    assert_eq!(follower.getattr(gone).unwrap().size, 4);
    assert_eq!(follower.read(gone, 0, 16).unwrap(), b"gone");
    let invalidations = follower.take_invalidations();
    assert!(invalidations.contains(&chalk_engine::Invalidation::Inode(gone)), "{invalidations:?}");
    assert!(follower.take_invalidations().is_empty());
}

/// Two sessions create one path; the second sync rebases onto the first.
/// The version must hold the path once, with no unreachable file left.
fn sync_same_new_path(same_bytes: bool) -> (tempfile::TempDir, Arc<Store>, VolumeName, VersionInfo, VersionInfo) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let (store, volume) = setup(dir.path());
    let main = || SessionBase::Lineage(LineageName::main());
    let first = store.open_session(&volume, main(), Access::Writable).unwrap();
    put(&first, "x.txt", b"x\n");
    let base = published(first.sync(None).unwrap());
    let a = store.open_session(&volume, main(), Access::Writable).unwrap();
    let b = store.open_session(&volume, main(), Access::Writable).unwrap();
    put(&a, "y.txt", b"same\n");
    put(&b, "y.txt", if same_bytes { b"same\n" } else { b"ours\n" });
    published(a.sync(None).unwrap());
    let options = SyncOptions { on_conflict: OnConflict::Ours, ..SyncOptions::default() };
    let head = published(b.sync_with(&options).unwrap());
    (dir, store, volume, base, head)
}

#[test]
fn same_new_file_stored_once() {
    for same_bytes in [true, false] {
        let (_dir, store, volume, base, head) = sync_same_new_path(same_bytes);
        assert_eq!(head.files, 2, "same bytes: {same_bytes}: the version counts an unreachable copy");
        let added: Vec<_> = store.diff(&volume, base.id, head.id).unwrap().into_iter().map(|c| c.path).collect();
        assert_eq!(added, vec!["y.txt".to_string()], "same bytes: {same_bytes}");
        let check = store.open_session(&volume, SessionBase::Version(head.id), Access::ReadOnly).unwrap();
        let expected: &[u8] = if same_bytes { b"same\n" } else { b"ours\n" };
        assert_eq!(read(&check, "y.txt"), expected);
    }
}
