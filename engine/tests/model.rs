//! Model-based test of sessions: random writes, truncates, renames,
//! creates, removals, syncs, reopenings and dropped sessions, compared after
//! every step with a plain in-memory tree.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::Arc;

use chalk_engine::{
    Access, EngineError, FileKind, Ino, LineageName, Owner, RenameMode, Session, SessionBase, SetAttr, Store, StoreConfig,
    SyncOutcome, VolumeName,
};
use proptest::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    File(Vec<u8>),
    Dir,
}

type Model = BTreeMap<String, Node>;

#[derive(Clone, Debug)]
enum Op {
    Write { file: usize, offset: usize, len: usize, byte: u8 },
    Truncate { file: usize, size: usize },
    Unlink { file: usize },
    Mkdir { dir: usize },
    Rmdir { dir: usize },
    Rename { from: usize, to: usize },
    Sync,
    Reopen,
    DropUnsynced,
}

const DIRS: usize = 3;
const FILES: usize = 12;

fn dir_path(dir: usize) -> String {
    format!("d{dir}")
}

/// Files 0..4 live in the root, the rest in the directories.
fn file_path(file: usize) -> String {
    if file < 4 {
        format!("f{file}")
    } else {
        format!("d{}/f{file}", (file - 4) % DIRS)
    }
}

fn parent_of(path: &str) -> Option<&str> {
    path.rsplit_once('/').map(|(parent, _)| parent)
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..FILES, 0usize..300_000, 1usize..70_000, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        2 => (0..FILES, 0usize..400_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        2 => (0..FILES).prop_map(|file| Op::Unlink { file }),
        2 => (0..DIRS).prop_map(|dir| Op::Mkdir { dir }),
        1 => (0..DIRS).prop_map(|dir| Op::Rmdir { dir }),
        2 => (0..FILES, 0..FILES).prop_map(|(from, to)| Op::Rename { from, to }),
        2 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => Just(Op::DropUnsynced),
    ]
}

struct Harness {
    store: Arc<Store>,
    volume: VolumeName,
    session: Session,
    model: Model,
    synced: Model,
}

impl Harness {
    fn open(store: &Arc<Store>, volume: &VolumeName) -> Session {
        store.open_session(volume, SessionBase::Lineage(LineageName::main()), Access::Writable).unwrap()
    }

    fn lookup_parent(&self, path: &str) -> Option<Ino> {
        match parent_of(path) {
            None => Some(Ino::ROOT),
            Some(parent) => self.session.resolve_path(parent).ok().filter(|a| a.kind == FileKind::Directory).map(|a| a.ino),
        }
    }

    fn name(path: &str) -> &OsStr {
        OsStr::new(path.rsplit('/').next().unwrap())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write { file, offset, len, byte } => {
                let path = file_path(file);
                let parent_exists = parent_of(&path).is_none_or(|p| self.model.get(p) == Some(&Node::Dir));
                if !parent_exists {
                    return;
                }
                let parent = self.lookup_parent(&path).unwrap();
                let ino = match self.session.lookup(parent, Self::name(&path)) {
                    Ok(attr) => attr.ino,
                    Err(_) => self.session.create(parent, Self::name(&path), 0o644, Owner::current()).unwrap().ino,
                };
                self.session.write(ino, offset as u64, &vec![byte; len]).unwrap();
                let Node::File(data) = self.model.entry(path).or_insert(Node::File(Vec::new())) else { unreachable!() };
                if data.len() < offset + len {
                    data.resize(offset + len, 0);
                }
                data[offset..offset + len].fill(byte);
            }
            Op::Truncate { file, size } => {
                let path = file_path(file);
                if let Some(Node::File(data)) = self.model.get_mut(&path) {
                    let ino = self.session.resolve_path(&path).unwrap().ino;
                    self.session.setattr(ino, &SetAttr { size: Some(size as u64), ..SetAttr::default() }).unwrap();
                    data.resize(size, 0);
                }
            }
            Op::Unlink { file } => {
                let path = file_path(file);
                if self.model.remove(&path).is_some() {
                    let parent = self.lookup_parent(&path).unwrap();
                    self.session.unlink(parent, Self::name(&path)).unwrap();
                }
            }
            Op::Mkdir { dir } => {
                let path = dir_path(dir);
                let result = self.session.mkdir(Ino::ROOT, OsStr::new(&path), 0o755, Owner::current());
                if self.model.contains_key(&path) {
                    assert!(matches!(result, Err(EngineError::AlreadyExists { .. })), "{result:?}");
                } else {
                    result.unwrap();
                    self.model.insert(path, Node::Dir);
                }
            }
            Op::Rmdir { dir } => {
                let path = dir_path(dir);
                let empty = !self.model.keys().any(|k| parent_of(k) == Some(path.as_str()));
                let result = self.session.rmdir(Ino::ROOT, OsStr::new(&path));
                match (self.model.get(&path), empty) {
                    (Some(Node::Dir), true) => {
                        result.unwrap();
                        self.model.remove(&path);
                    }
                    (Some(Node::Dir), false) => assert!(matches!(result, Err(EngineError::DirectoryNotEmpty { .. }))),
                    _ => assert!(matches!(result, Err(EngineError::NotFound { .. }))),
                }
            }
            Op::Rename { from, to } => {
                let (from, to) = (file_path(from), file_path(to));
                let target_dir_exists = parent_of(&to).is_none_or(|p| self.model.get(p) == Some(&Node::Dir));
                if !self.model.contains_key(&from) || !target_dir_exists {
                    return;
                }
                let from_parent = self.lookup_parent(&from).unwrap();
                let to_parent = self.lookup_parent(&to).unwrap();
                self.session
                    .rename(from_parent, Self::name(&from), to_parent, Self::name(&to), RenameMode::Replace)
                    .unwrap();
                let node = self.model.remove(&from).unwrap();
                self.model.insert(to, node);
            }
            Op::Sync => self.sync(),
            Op::Reopen => {
                self.sync();
                self.session = Self::open(&self.store, &self.volume);
            }
            Op::DropUnsynced => {
                self.session = Self::open(&self.store, &self.volume);
                self.model = self.synced.clone();
            }
        }
    }

    fn sync(&mut self) {
        match self.session.sync(None).unwrap() {
            SyncOutcome::Published(info) => {
                let files = self.model.values().filter(|n| matches!(n, Node::File(_))).count() as u64;
                let bytes: u64 = self.model.values().map(|n| if let Node::File(d) = n { d.len() as u64 } else { 0 }).sum();
                assert_eq!(info.files, files, "file count of the published version");
                assert_eq!(info.bytes, bytes, "byte count of the published version");
            }
            SyncOutcome::NothingToPublish { .. } => {}
        }
        self.synced = self.model.clone();
    }

    fn check(&self, session: &Session, model: &Model) {
        let listed: Vec<(String, FileKind)> =
            session.walk("", true).unwrap().into_iter().map(|e| (e.path, e.attr.kind)).collect();
        let expected: Vec<(String, FileKind)> = model
            .iter()
            .map(|(path, node)| (path.clone(), if *node == Node::Dir { FileKind::Directory } else { FileKind::File }))
            .collect();
        assert_eq!(listed, expected);
        for (path, node) in model {
            if let Node::File(data) = node {
                let attr = session.resolve_path(path).unwrap();
                assert_eq!(attr.size, data.len() as u64, "size of {path}");
                assert_eq!(session.paths_of(attr.ino).unwrap(), vec![path.clone()], "links of {path}");
                let got = session.read(attr.ino, 0, data.len() as u32 + 10).unwrap();
                assert!(got == *data, "content of {path} differs");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn session_matches_model(ops in proptest::collection::vec(op_strategy(), 1..50)) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::open(StoreConfig::with_local_root(dir.path())).unwrap();
        let volume = VolumeName::new("m").unwrap();
        store.create_volume(&volume).unwrap();
        let session = Harness::open(&store, &volume);
        let mut harness = Harness { store: store.clone(), volume: volume.clone(), session, model: Model::new(), synced: Model::new() };
        for op in &ops {
            harness.apply(op);
            harness.check(&harness.session, &harness.model);
        }
        harness.sync();
        // A fresh reader of the head sees exactly the last synced model.
        let reader = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::ReadOnly).unwrap();
        harness.check(&reader, &harness.synced);
    }
}
