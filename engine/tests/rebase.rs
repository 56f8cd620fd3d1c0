//! Syncs onto a moved head: disjoint changes rebase, overlapping changes
//! conflict unless they end up identical, and the caller can fork or
//! overwrite instead.

use std::ffi::OsStr;
use std::sync::Arc;

use chalk_engine::{
    Access, EngineError, Ino, LineageName, OnConflict, Owner, RenameMode, Session, SessionBase, Store, StoreConfig,
    SyncOptions, SyncOutcome, VersionInfo, VolumeName,
};

fn setup() -> (tempfile::TempDir, Arc<Store>, VolumeName) {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
    let volume = VolumeName::new("v").unwrap();
    store.create_volume(&volume).unwrap();
    (dir, store, volume)
}

fn session(store: &Arc<Store>, volume: &VolumeName) -> Session {
    store.open_session(volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap()
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

fn head_reader(store: &Arc<Store>, volume: &VolumeName) -> Session {
    store.open_session(volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap()
}

#[test]
fn disjoint_changes_rebase() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "shared/keep.txt", b"keep");
    published(seed.sync(None).unwrap());
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    put(&a, "shared/a.txt", b"from a");
    put(&b, "shared/b.txt", b"from b");
    put(&b, "b-only/x", b"x");
    let first = published(a.sync(None).unwrap());
    let second = published(b.sync(None).unwrap());
    assert_eq!(second.parent, Some(first.id), "the rebased version's parent is the head");
    assert_eq!(second.seq, first.seq + 1);
    assert_eq!(second.files, 4);
    let reader = head_reader(&store, &volume);
    assert_eq!(read(&reader, "shared/a.txt"), b"from a");
    assert_eq!(read(&reader, "shared/b.txt"), b"from b");
    assert_eq!(read(&reader, "shared/keep.txt"), b"keep");
    assert_eq!(read(&reader, "b-only/x"), b"x");
    let names: Vec<String> = reader.walk("shared", false).unwrap().into_iter().map(|e| e.path).collect();
    assert_eq!(names, vec!["shared/a.txt", "shared/b.txt", "shared/keep.txt"]);
    assert_eq!(reader.resolve_path("shared").unwrap().nlink, 2);
    // The rebased session carries on from its new version.
    put(&b, "later.txt", b"l");
    assert_eq!(published(b.sync(None).unwrap()).parent, Some(second.id));
}

#[test]
fn directory_created_on_both_sides_conflicts() {
    let (_dir, store, volume) = setup();
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    put(&a, "new/a.txt", b"from a");
    put(&b, "new/b.txt", b"from b");
    let first = published(a.sync(None).unwrap());

    // Each session made its own inode for new/, and the merged root can hold
    // only one of them: publishing b's would drop new/a.txt.
    match b.sync(None) {
        Err(EngineError::Conflict { paths, .. }) => assert_eq!(paths, vec!["new".to_owned()]),
        other => panic!("expected a conflict on new, got {other:?}"),
    }
    let reader = head_reader(&store, &volume);
    assert_eq!(reader.base_version().id, first.id);
    assert_eq!(read(&reader, "new/a.txt"), b"from a");
    // The conflicting session keeps its writes.
    assert_eq!(read(&b, "new/b.txt"), b"from b");
}

#[test]
fn overlapping_change_conflicts_and_keeps_writes() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "config.toml", b"v1");
    published(seed.sync(None).unwrap());
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    put(&a, "config.toml", b"from a");
    put(&b, "config.toml", b"from b");
    put(&b, "other.txt", b"o");
    published(a.sync(None).unwrap());
    match b.sync(None) {
        Err(EngineError::Conflict { paths, .. }) => assert_eq!(paths, vec!["config.toml".to_owned()]),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(read(&b, "config.toml"), b"from b", "the session lost its write");
    assert_eq!(read(&head_reader(&store, &volume), "config.toml"), b"from a");

    let forked = published(b.sync_with(&SyncOptions { on_conflict: OnConflict::Fork, ..SyncOptions::default() }).unwrap());
    assert_ne!(forked.lineage.as_str(), "main");
    assert_eq!(read(&head_reader(&store, &volume), "config.toml"), b"from a");
    let fork_reader = store.open_session(&volume, SessionBase::Lineage(forked.lineage.clone()), Access::ReadOnly).unwrap();
    assert_eq!(read(&fork_reader, "config.toml"), b"from b");
}

#[test]
fn ours_overwrites_conflicting_paths() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "f", b"v1");
    published(seed.sync(None).unwrap());
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    put(&a, "f", b"a");
    put(&a, "a-only", b"a");
    put(&b, "f", b"b");
    published(a.sync(None).unwrap());
    published(b.sync_with(&SyncOptions { on_conflict: OnConflict::Ours, ..SyncOptions::default() }).unwrap());
    let reader = head_reader(&store, &volume);
    assert_eq!(read(&reader, "f"), b"b");
    assert_eq!(read(&reader, "a-only"), b"a");
}

#[test]
fn identical_result_is_not_a_conflict() {
    let (_dir, store, volume) = setup();
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    put(&a, "same.txt", b"identical");
    put(&b, "same.txt", b"identical");
    published(a.sync(None).unwrap());
    published(b.sync(None).unwrap());
    assert_eq!(read(&head_reader(&store, &volume), "same.txt"), b"identical");
}

#[test]
fn renamed_directory_covers_its_children() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "src/lib.rs", b"lib");
    published(seed.sync(None).unwrap());
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    a.rename(Ino::ROOT, OsStr::new("src"), Ino::ROOT, OsStr::new("crate"), RenameMode::Replace).unwrap();
    put(&b, "src/new.rs", b"new");
    published(a.sync(None).unwrap());
    match b.sync(None) {
        Err(EngineError::Conflict { paths, .. }) => assert!(paths.contains(&"src/new.rs".to_owned()), "{paths:?}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
}

#[test]
fn removal_rebases_when_disjoint() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "old.txt", b"old");
    put(&seed, "d/kept.txt", b"kept");
    published(seed.sync(None).unwrap());
    let a = session(&store, &volume);
    let b = session(&store, &volume);
    a.unlink(Ino::ROOT, OsStr::new("old.txt")).unwrap();
    put(&b, "d/new.txt", b"new");
    published(a.sync(None).unwrap());
    let merged = published(b.sync(None).unwrap());
    assert_eq!(merged.files, 2);
    let reader = head_reader(&store, &volume);
    assert!(reader.resolve_path("old.txt").is_err(), "the other side's removal was undone");
    assert_eq!(read(&reader, "d/new.txt"), b"new");
}

#[test]
fn rename_against_rewrite_then_removal() {
    let (_dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "d/x", &[1; 8]);
    published(seed.sync(None).unwrap());
    let ours = session(&store, &volume);
    let theirs = session(&store, &volume);
    ours.move_path("d/x", "a", Owner::current()).unwrap();
    put(&theirs, "d/x", &[9]);
    theirs.remove_path("d/x", false).unwrap();
    let head = published(theirs.sync(None).unwrap());

    // Both sides end without `d/x`, so it is no conflict. The head never
    // contained the one byte theirs wrote before the removal, so `a` keeps the
    // base bytes that ours renamed.
    let merged = published(ours.sync(None).unwrap());
    assert_eq!(merged.parent, Some(head.id), "the rebased version's parent is the head");
    let reader = head_reader(&store, &volume);
    assert!(reader.resolve_path("d/x").is_err(), "d/x is back after both sides dropped it");
    assert_eq!(read(&reader, "a"), vec![1; 8], "contents of a");
    assert_eq!(reader.resolve_path("a").unwrap().nlink, 1, "link count of a");
    assert_eq!(read(&ours, "a"), vec![1; 8], "contents of a in the rebased session");
}

#[test]
fn concurrent_syncs_lose_nothing() {
    let (dir, store, volume) = setup();
    let seed = session(&store, &volume);
    put(&seed, "shared.txt", b"base");
    published(seed.sync(None).unwrap());
    drop(store);
    // Eight writers with separate store handles: even ones write their own
    // file, odd ones also overwrite shared.txt, so odd ones may conflict.
    let root = dir.path().to_owned();
    // Every writer opens its session before any of them syncs, so all of them
    // start from the same base and at most one shared.txt writer can win.
    let opened = std::sync::Barrier::new(8);
    let results: Vec<(usize, Result<VersionInfo, EngineError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let root = root.clone();
                let volume = volume.clone();
                let opened = &opened;
                scope.spawn(move || {
                    let store = Store::open(StoreConfig::with_local_root(&root)).unwrap();
                    let s = session(&store, &volume);
                    put(&s, &format!("own-{i}.txt"), format!("writer {i}").as_bytes());
                    if i % 2 == 1 {
                        put(&s, "shared.txt", format!("writer {i}").as_bytes());
                    }
                    opened.wait();
                    let mut result = s.sync(None).map(published);
                    // A writer that lost the race for a sequence number retries.
                    for _ in 0..20 {
                        match &result {
                            Err(EngineError::HeadMoved { .. }) => result = s.sync(None).map(published),
                            _ => break,
                        }
                    }
                    (i, result)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let store = Store::open(StoreConfig::with_local_root(&root)).unwrap();
    let history = store.versions(&volume, &LineageName::main()).unwrap();
    let reader = head_reader(&store, &volume);
    let mut shared_writers = 0;
    for (i, result) in &results {
        match result {
            Ok(info) => {
                assert!(history.iter().any(|v| v.id == info.id), "writer {i}'s version is missing from the history");
                assert_eq!(read(&reader, &format!("own-{i}.txt")), format!("writer {i}").as_bytes(), "writer {i}'s file");
                shared_writers += usize::from(i % 2 == 1);
            }
            Err(EngineError::Conflict { paths, .. }) => {
                assert_eq!(i % 2, 1, "writer {i} touched no shared path but conflicted");
                assert_eq!(paths, &vec!["shared.txt".to_owned()]);
            }
            Err(other) => panic!("writer {i} failed: {other}"),
        }
    }
    assert!(shared_writers <= 1, "{shared_writers} writers of shared.txt were all accepted");
    assert_eq!(history.len(), 2 + results.iter().filter(|(_, r)| r.is_ok()).count());
}
