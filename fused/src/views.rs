//! The read-only `.chalk` directory at the root of a mount.
//!
//! `.chalk/versions/<id>/` and `.chalk/tags/<tag>/` show the tree of every
//! version of the volume. Nothing is loaded until a path is looked up: a
//! version's read-only session opens on first use and stays open for the
//! mount's lifetime. `.chalk` is not listed in the root directory, so `find`
//! and `du` do not walk every version, but it is reachable by path.
//!
//! Inode numbers: engine inode numbers stay below 2^56, so numbers with the
//! top byte [`VIEW_TAG`] belong to this directory. They are handed out in
//! order as nodes are first seen and are never reused.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use chalk_engine::{
    Access, Attr, DirEntry, EngineError, FileKind, Ino, Session, SessionBase, Store, Timestamp, VersionInfo, VolumeName,
};
use parking_lot::Mutex;

/// Name of the directory at the root of every mount.
pub(crate) const RESERVED_NAME: &[u8] = b".chalk";

/// Top byte of the inode numbers of this directory's nodes.
const VIEW_TAG: u64 = 0xff;
const TAG_SHIFT: u32 = 56;
const CHALK_DIR: u64 = (VIEW_TAG << TAG_SHIFT) | 1;
const VERSIONS_DIR: u64 = (VIEW_TAG << TAG_SHIFT) | 2;
const TAGS_DIR: u64 = (VIEW_TAG << TAG_SHIFT) | 3;

/// True when `ino` is a node of the `.chalk` directory.
pub(crate) fn is_view(ino: u64) -> bool {
    ino >> TAG_SHIFT == VIEW_TAG
}

/// A node of the `.chalk` directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Node {
    Chalk,
    Versions,
    Tags,
    /// An inode of one version's tree; the tree's root directory is `.chalk/versions/<id>` itself.
    Inner { view: usize, ino: Ino },
}

/// One version shown under `.chalk`.
struct View {
    version: VersionInfo,
    session: Option<Arc<Session>>,
}

#[derive(Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    inos: HashMap<Node, u64>,
    next: u64,
    views: Vec<View>,
    /// View index by `versions/<id>` or `tags/<tag>`. A tag gets a view of
    /// its own, because a directory must not have two parents.
    by_label: HashMap<String, usize>,
}

impl Table {
    fn ino_of(&mut self, node: Node) -> u64 {
        match node {
            Node::Chalk => return CHALK_DIR,
            Node::Versions => return VERSIONS_DIR,
            Node::Tags => return TAGS_DIR,
            Node::Inner { .. } => {}
        }
        if let Some(ino) = self.inos.get(&node) {
            return *ino;
        }
        self.next = self.next.max(16) + 1;
        let ino = (VIEW_TAG << TAG_SHIFT) | self.next;
        self.inos.insert(node, ino);
        self.nodes.insert(ino, node);
        ino
    }

    fn node(&self, ino: u64) -> Option<Node> {
        match ino {
            CHALK_DIR => Some(Node::Chalk),
            VERSIONS_DIR => Some(Node::Versions),
            TAGS_DIR => Some(Node::Tags),
            _ => self.nodes.get(&ino).copied(),
        }
    }
}

/// The `.chalk` directory of one mount.
pub(crate) struct Views {
    store: Arc<Store>,
    volume: VolumeName,
    table: Mutex<Table>,
}

fn not_found(name: &OsStr) -> EngineError {
    EngineError::NotFound { what: "entry", name: name.to_string_lossy().into_owned() }
}

fn stale(ino: u64) -> EngineError {
    EngineError::NotFound { what: "inode", name: ino.to_string() }
}

impl Views {
    pub(crate) fn new(session: &Session) -> Views {
        Views { store: Arc::clone(session.store()), volume: session.volume().clone(), table: Mutex::new(Table::default()) }
    }

    /// Attributes of a directory of `.chalk` itself: read-only, owned like
    /// the mount's root, dated like the version it shows (or now).
    fn directory_attr(like: &Attr, ino: u64, time: Option<Timestamp>) -> Attr {
        let mut attr = like.clone();
        attr.ino = Ino(ino);
        attr.kind = FileKind::Directory;
        attr.perm = 0o555;
        attr.nlink = 2;
        attr.size = 0;
        if let Some(time) = time {
            (attr.atime, attr.mtime, attr.ctime) = (time, time, time);
        }
        attr
    }

    /// Returns the session of a view, opening it on first use.
    fn session(&self, view: usize) -> Result<Arc<Session>, EngineError> {
        let version = {
            let table = self.table.lock();
            let entry = table.views.get(view).ok_or_else(|| stale(view as u64))?;
            if let Some(session) = &entry.session {
                return Ok(Arc::clone(session));
            }
            entry.version.id
        };
        // Opened without the lock, because it reads from the object store.
        let opened = Arc::new(self.store.open_session(&self.volume, SessionBase::Version(version), Access::ReadOnly)?);
        let mut table = self.table.lock();
        let entry = &mut table.views[view];
        Ok(Arc::clone(entry.session.get_or_insert(opened)))
    }

    /// Maps an inode of a view's tree to this directory's number; the tree's
    /// root maps to the view's own directory.
    fn map(&self, view: usize, attr: Attr) -> Attr {
        let mut attr = attr;
        attr.ino = Ino(self.table.lock().ino_of(Node::Inner { view, ino: attr.ino }));
        attr
    }

    /// True when `ino` is a node of a version's tree, which never changes,
    /// rather than `.chalk` or one of its listings of versions and tags.
    pub(crate) fn is_version_tree(&self, ino: u64) -> bool {
        matches!(self.table.lock().node(ino), Some(Node::Inner { .. }))
    }

    /// Returns the attributes of `.chalk` itself, for a lookup in the mount's root.
    pub(crate) fn chalk_dir(&self, root: &Attr) -> Attr {
        Self::directory_attr(root, CHALK_DIR, None)
    }

    fn view_for(&self, label: String, version: VersionInfo) -> usize {
        let mut table = self.table.lock();
        if let Some(view) = table.by_label.get(&label) {
            return *view;
        }
        table.views.push(View { version, session: None });
        let view = table.views.len() - 1;
        table.by_label.insert(label, view);
        view
    }

    pub(crate) fn lookup(&self, parent: u64, name: &OsStr, root: &Attr) -> Result<Attr, EngineError> {
        let node = self.table.lock().node(parent).ok_or_else(|| stale(parent))?;
        let text = name.to_string_lossy();
        match node {
            Node::Chalk => match name.as_bytes() {
                b"versions" => Ok(Self::directory_attr(root, VERSIONS_DIR, None)),
                b"tags" => Ok(Self::directory_attr(root, TAGS_DIR, None)),
                _ => Err(not_found(name)),
            },
            Node::Versions => {
                // Only full ids: a prefix would give one version many names.
                let version = match self.store.resolve_version(&self.volume, &text) {
                    Ok(version) if version.id.to_string() == text => version,
                    _ => return Err(not_found(name)),
                };
                let view = self.view_for(format!("versions/{text}"), version);
                self.view_root(view)
            }
            Node::Tags => {
                let Some(id) = self.store.tag_target(&self.volume, &text)? else { return Err(not_found(name)) };
                let version = self.store.resolve_version(&self.volume, &id.to_string())?;
                let view = self.view_for(format!("tags/{text}"), version);
                self.view_root(view)
            }
            Node::Inner { view, ino } => {
                let attr = self.session(view)?.lookup(ino, name)?;
                Ok(self.map(view, attr))
            }
        }
    }

    fn view_root(&self, view: usize) -> Result<Attr, EngineError> {
        let attr = self.session(view)?.getattr(Ino::ROOT)?;
        Ok(self.map(view, attr))
    }

    pub(crate) fn getattr(&self, ino: u64, root: &Attr) -> Result<Attr, EngineError> {
        // Bound first, so the table's lock is released before the arms run.
        let node = self.table.lock().node(ino).ok_or_else(|| stale(ino))?;
        match node {
            Node::Chalk | Node::Versions | Node::Tags => Ok(Self::directory_attr(root, ino, None)),
            Node::Inner { view, ino } => {
                let attr = self.session(view)?.getattr(ino)?;
                Ok(self.map(view, attr))
            }
        }
    }

    /// Session and engine inode behind a node of a version's tree.
    fn inner(&self, ino: u64) -> Result<(Arc<Session>, Ino), EngineError> {
        let node = self.table.lock().node(ino);
        match node {
            Some(Node::Inner { view, ino }) => Ok((self.session(view)?, ino)),
            Some(_) => Err(EngineError::IsDirectory { ino: Ino(ino) }),
            None => Err(stale(ino)),
        }
    }

    pub(crate) fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>, EngineError> {
        let (session, ino) = self.inner(ino)?;
        session.read(ino, offset, size)
    }

    pub(crate) fn readlink(&self, ino: u64) -> Result<Vec<u8>, EngineError> {
        let (session, ino) = self.inner(ino)?;
        session.readlink(ino)
    }

    pub(crate) fn open(&self, ino: u64) -> Result<(), EngineError> {
        let (session, ino) = self.inner(ino)?;
        session.open(ino)
    }

    pub(crate) fn release(&self, ino: u64) {
        if let Ok((session, ino)) = self.inner(ino) {
            session.release(ino);
        }
    }

    pub(crate) fn getxattr(&self, ino: u64, name: &OsStr) -> Result<Vec<u8>, EngineError> {
        match self.inner(ino) {
            Ok((session, ino)) => session.getxattr(ino, name),
            Err(EngineError::IsDirectory { ino }) => {
                Err(EngineError::NoXattr { ino, name: name.to_string_lossy().into_owned() })
            }
            Err(error) => Err(error),
        }
    }

    pub(crate) fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>, EngineError> {
        match self.inner(ino) {
            Ok((session, ino)) => session.listxattr(ino),
            Err(EngineError::IsDirectory { .. }) => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// Lists a directory of `.chalk`, `.` and `..` included, with this
    /// directory's inode numbers.
    pub(crate) fn listing(&self, ino: u64) -> Result<Vec<DirEntry>, EngineError> {
        let node = self.table.lock().node(ino).ok_or_else(|| stale(ino))?;
        let dot = |name: &[u8], ino: u64| DirEntry { name: name.to_vec(), ino: Ino(ino), kind: FileKind::Directory };
        let mut out = Vec::new();
        match node {
            Node::Chalk => {
                out.push(dot(b".", CHALK_DIR));
                out.push(dot(b"..", Ino::ROOT.0));
                out.push(dot(b"versions", VERSIONS_DIR));
                out.push(dot(b"tags", TAGS_DIR));
            }
            Node::Versions => {
                out.push(dot(b".", VERSIONS_DIR));
                out.push(dot(b"..", CHALK_DIR));
                for version in self.store.all_versions(&self.volume)? {
                    let label = version.id.to_string();
                    let view = self.view_for(format!("versions/{label}"), version);
                    let ino = self.table.lock().ino_of(Node::Inner { view, ino: Ino::ROOT });
                    out.push(dot(label.as_bytes(), ino));
                }
            }
            Node::Tags => {
                out.push(dot(b".", TAGS_DIR));
                out.push(dot(b"..", CHALK_DIR));
                for (tag, id) in self.store.tags(&self.volume)? {
                    let version = self.store.resolve_version(&self.volume, &id.to_string())?;
                    let view = self.view_for(format!("tags/{tag}"), version);
                    let ino = self.table.lock().ino_of(Node::Inner { view, ino: Ino::ROOT });
                    out.push(dot(tag.as_bytes(), ino));
                }
            }
            Node::Inner { view, ino: dir } => {
                let session = self.session(view)?;
                let parent = match dir == Ino::ROOT {
                    true => self.holder_of(view),
                    false => self.table.lock().ino_of(Node::Inner { view, ino: session.parent_of(dir)? }),
                };
                let own = self.table.lock().ino_of(Node::Inner { view, ino: dir });
                out.push(dot(b".", own));
                out.push(dot(b"..", parent));
                for entry in session.readdir(dir)? {
                    let ino = self.table.lock().ino_of(Node::Inner { view, ino: entry.ino });
                    out.push(DirEntry { ino: Ino(ino), ..entry });
                }
            }
        }
        Ok(out)
    }

    /// Returns `.chalk/versions` or `.chalk/tags`, whichever lists the view.
    fn holder_of(&self, view: usize) -> u64 {
        let table = self.table.lock();
        let is_tag = table.by_label.iter().any(|(label, v)| *v == view && label.starts_with("tags/"));
        if is_tag {
            TAGS_DIR
        } else {
            VERSIONS_DIR
        }
    }
}
