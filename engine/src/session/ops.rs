//! Namespace operations: lookup, attributes, directories, links, renames and
//! extended attributes, with POSIX semantics for link counts and times.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::error::{EngineError, Result};
use crate::extent::ExtentMap;
use crate::format::record::MetaOp;
use crate::ids::Ino;
use crate::tree::{
    Attr, Content, DirEntry, FileKind, Inode, Owner, RenameMode, SetAttr, StatFs, TimeSet, Timestamp, XattrMode, NAME_MAX,
    SYMLINK_MAX, XATTR_VALUE_MAX,
};

use super::data::FILE_SIZE_MAX;
use crate::format::checkpoint::{StoredContent, INODES_PER_PAGE};

/// Inode numbers in one allocation block.
const INO_BLOCK: u64 = 1 << 24;
use super::{inode_from_record, Session, State};

/// Checks one directory entry name and returns its bytes.
pub(crate) fn validate_name(name: &OsStr) -> Result<Vec<u8>> {
    let bytes = name.as_bytes();
    let lossy = || name.to_string_lossy().into_owned();
    if bytes.is_empty() {
        return Err(EngineError::InvalidName { kind: "file", name: lossy(), reason: "empty name" });
    }
    if bytes.len() > NAME_MAX {
        return Err(EngineError::NameTooLong { name: lossy(), len: bytes.len() });
    }
    if bytes == b"." || bytes == b".." {
        return Err(EngineError::InvalidName { kind: "file", name: lossy(), reason: "'.' and '..' cannot be created or removed" });
    }
    if bytes.contains(&b'/') || bytes.contains(&0) {
        return Err(EngineError::InvalidName { kind: "file", name: lossy(), reason: "names cannot contain '/' or NUL" });
    }
    Ok(bytes.to_vec())
}

/// Name at the volume root that mounts reserve for their `.chalk` directory
/// of past versions; nothing can be created there.
pub const RESERVED_ROOT_NAME: &[u8] = b".chalk";

/// Checks the name of a new entry of directory `parent` and returns its bytes.
fn validate_new_name(parent: Ino, name: &OsStr) -> Result<Vec<u8>> {
    let bytes = validate_name(name)?;
    if parent == Ino::ROOT && bytes == RESERVED_ROOT_NAME {
        return Err(EngineError::InvalidName {
            kind: "file",
            name: name.to_string_lossy().into_owned(),
            reason: "'.chalk' at the volume root is reserved for the versions directory of mounts",
        });
    }
    Ok(bytes)
}

type Entries = BTreeMap<Vec<u8>, (Ino, FileKind)>;

impl State {
    pub(crate) fn entries_mut(&mut self, session: &Session, dir: Ino) -> Result<&mut Entries> {
        let inode = self.inode(&session.store, &session.volume, dir)?;
        match &mut inode.content {
            Content::Directory(entries) => Ok(entries),
            _ => Err(EngineError::NotDirectory { ino: dir }),
        }
    }

    fn child(&mut self, session: &Session, dir: Ino, name: &[u8]) -> Result<Option<(Ino, FileKind)>> {
        Ok(self.entries_mut(session, dir)?.get(name).copied())
    }

    fn touch(&mut self, ino: Ino, now: Timestamp, content_changed: bool) {
        let inode = self.inodes.get_mut(&ino).expect("touched inode is loaded");
        inode.attr.ctime = now;
        if content_changed {
            inode.attr.mtime = now;
        }
        self.dirty.insert(ino);
    }

    /// Allocates an inode number from a block of 2^24 numbers that this
    /// session picked at random among blocks with no inode in the base
    /// version. Sessions that start from one version and later merge therefore
    /// never give two different files the same number.
    fn allocate_ino(&mut self) -> Ino {
        if self.next_ino == self.block_end {
            let pages_per_block = INO_BLOCK / INODES_PER_PAGE;
            let block = loop {
                let block = u64::from(rand::random::<u32>().max(1));
                let first_page = block * pages_per_block;
                if self.root.pages.range(first_page..first_page + pages_per_block).next().is_none() {
                    break block;
                }
            };
            self.next_ino = block * INO_BLOCK;
            self.block_end = self.next_ino + INO_BLOCK;
        }
        let ino = Ino(self.next_ino);
        self.next_ino += 1;
        ino
    }

    fn adjust_nlink(&mut self, ino: Ino, by: i64) {
        let inode = self.inodes.get_mut(&ino).expect("linked inode is loaded");
        inode.attr.nlink = (inode.attr.nlink as i64 + by).max(0) as u32;
        self.dirty.insert(ino);
    }

    /// Returns true when `ancestor` is `dir` or one of its ancestors.
    fn is_ancestor(&mut self, session: &Session, ancestor: Ino, mut dir: Ino) -> Result<bool> {
        loop {
            if dir == ancestor {
                return Ok(true);
            }
            if dir == Ino::ROOT {
                return Ok(false);
            }
            dir = self.inode(&session.store, &session.volume, dir)?.parent();
        }
    }

    /// Inserts a new inode under `parent/name`, which must not exist.
    fn insert_new(&mut self, session: &Session, parent: Ino, name: Vec<u8>, inode: Inode) -> Result<Attr> {
        let ino = inode.attr.ino;
        let kind = inode.attr.kind;
        let now = inode.attr.ctime;
        self.entries_mut(session, parent)?.insert(name, (ino, kind));
        if kind == FileKind::Directory {
            self.adjust_nlink(parent, 1);
        }
        self.touch(parent, now, true);
        let attr = inode.attr.clone();
        self.inodes.insert(ino, inode);
        self.dirty.insert(ino);
        Ok(attr)
    }

    /// Removes the entry `parent/name`: a file or symlink loses one link, a
    /// directory (already checked empty) drops to zero links.
    fn remove_entry(&mut self, session: &Session, parent: Ino, name: &[u8], now: Timestamp) -> Result<()> {
        let (ino, kind) = self.entries_mut(session, parent)?.remove(name).expect("caller checked the entry");
        self.inode(&session.store, &session.volume, ino)?.remove_link(parent, name);
        if kind == FileKind::Directory {
            self.adjust_nlink(parent, -1);
            let inode = self.inodes.get_mut(&ino).expect("loaded above");
            inode.attr.nlink = 0;
            self.dirty.insert(ino);
        } else {
            self.adjust_nlink(ino, -1);
        }
        self.touch(ino, now, false);
        self.touch(parent, now, true);
        Ok(())
    }

    fn check_empty_dir(&mut self, session: &Session, ino: Ino) -> Result<()> {
        if !self.entries_mut(session, ino)?.is_empty() {
            return Err(EngineError::DirectoryNotEmpty { ino });
        }
        Ok(())
    }
}

fn new_inode(ino: Ino, kind: FileKind, mode: u32, owner: Owner, link: (Ino, Vec<u8>), content: Content) -> Inode {
    let now = Timestamp::now();
    let nlink = if kind == FileKind::Directory { 2 } else { 1 };
    Inode {
        attr: Attr {
            ino,
            kind,
            perm: (mode & 0o7777) as u16,
            uid: owner.uid,
            gid: owner.gid,
            size: 0,
            nlink,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
        },
        links: vec![link],
        xattrs: BTreeMap::new(),
        content,
    }
}

fn resolve_time(time: TimeSet, now: Timestamp) -> Timestamp {
    match time {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    }
}

impl Session {
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        let bytes = name.as_bytes();
        if bytes.len() > NAME_MAX {
            return Err(EngineError::NameTooLong { name: name.to_string_lossy().into_owned(), len: bytes.len() });
        }
        // A read-only session fetches the metadata first, without the
        // session lock, so that other requests go on while the store is slow.
        if self.is_read_only() {
            self.preload(parent)?;
            let child = {
                let mut state = self.state.lock();
                match bytes {
                    b"." | b".." => None,
                    _ => state.child(self, parent, bytes)?.map(|(ino, _)| ino),
                }
            };
            if let Some(child) = child {
                self.preload(child)?;
            }
        }
        let mut state = self.state.lock();
        let child = match bytes {
            b"." => Some(parent),
            b".." => Some(state.inode(&self.store, &self.volume, parent)?.parent()),
            _ => state.child(self, parent, bytes)?.map(|(ino, _)| ino),
        };
        let Some(child) = child else {
            return Err(EngineError::not_found("entry", name.to_string_lossy()));
        };
        Ok(state.inode(&self.store, &self.volume, child)?.attr.clone())
    }

    /// Looks up like [`Session::lookup`], from loaded metadata only.
    /// Returns `None` when the lookup would have to fetch an inode page or a
    /// directory listing from the object store, so the caller can leave it to
    /// a thread that may wait.
    pub fn lookup_loaded(&self, parent: Ino, name: &OsStr) -> Option<Result<Attr>> {
        let bytes = name.as_bytes();
        if bytes.len() > NAME_MAX {
            return Some(self.lookup(parent, name));
        }
        let mut state = self.state.lock();
        let dir = state.inodes.get(&parent)?;
        let child = match (bytes, &dir.content) {
            (b".", _) => Some(parent),
            (b"..", _) => Some(dir.parent()),
            (_, Content::Directory(entries)) => entries.get(bytes).map(|(ino, _)| *ino),
            _ => return Some(Err(EngineError::NotDirectory { ino: parent })),
        };
        let Some(child) = child else {
            return Some(Err(EngineError::not_found("entry", name.to_string_lossy())));
        };
        if let Some(inode) = state.inodes.get(&child) {
            return Some(Ok(inode.attr.clone()));
        }
        // A lookup of a neighbour may have loaded the child's page. The
        // inode of a file or symlink is then built from it without the
        // store, while a directory's also needs its listing.
        let record = state.pages.get(&(child.0 / INODES_PER_PAGE))?.get(&child)?;
        if matches!(record.content, StoredContent::Directory(_)) {
            return None;
        }
        let inode = inode_from_record(&self.store, &self.volume, record).ok()?;
        let attr = inode.attr.clone();
        state.inodes.insert(child, inode);
        Some(Ok(attr))
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        if self.is_read_only() {
            self.preload(ino)?;
        }
        let mut state = self.state.lock();
        Ok(state.inode(&self.store, &self.volume, ino)?.attr.clone())
    }

    /// Applies `chmod`, `chown`, `truncate` and `utimensat` changes.
    pub fn setattr(&self, ino: Ino, change: &SetAttr) -> Result<Attr> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let now = Timestamp::now();
        let inode = state.inode(&self.store, &self.volume, ino)?;
        if let Some(size) = change.size {
            match &mut inode.content {
                Content::File(extents) => {
                    if size > FILE_SIZE_MAX {
                        return Err(EngineError::TooLarge(format!("size {size} passes the maximum file size")));
                    }
                    if size < inode.attr.size {
                        extents.truncate(size);
                    }
                    inode.attr.size = size;
                    inode.attr.mtime = now;
                }
                Content::Directory(_) => return Err(EngineError::IsDirectory { ino }),
                Content::Symlink(_) | Content::Special => {
                    return Err(EngineError::InvalidArgument(format!("inode {ino} is not a regular file")))
                }
            }
        }
        if let Some(mode) = change.mode {
            inode.attr.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = change.uid {
            inode.attr.uid = uid;
        }
        if let Some(gid) = change.gid {
            inode.attr.gid = gid;
        }
        if let Some(atime) = change.atime {
            inode.attr.atime = resolve_time(atime, now);
        }
        if let Some(mtime) = change.mtime {
            inode.attr.mtime = resolve_time(mtime, now);
        }
        inode.attr.ctime = change.ctime.unwrap_or(now);
        let attr = inode.attr.clone();
        state.dirty.insert(ino);
        let op = MetaOp::SetAttr { ino, mode: change.mode, uid: change.uid, gid: change.gid, size: change.size };
        self.log_meta(&mut state, op)?;
        Ok(attr)
    }

    /// Lists a directory by name, without `.` and `..`.
    pub fn readdir(&self, ino: Ino) -> Result<Vec<DirEntry>> {
        if self.is_read_only() {
            self.preload(ino)?;
        }
        let mut state = self.state.lock();
        let entries = state.entries_mut(self, ino)?;
        Ok(entries.iter().map(|(name, (ino, kind))| DirEntry { name: name.clone(), ino: *ino, kind: *kind }).collect())
    }

    /// Parent of a directory; the root is its own parent.
    pub fn parent_of(&self, dir: Ino) -> Result<Ino> {
        if self.is_read_only() {
            self.preload(dir)?;
        }
        let mut state = self.state.lock();
        Ok(state.inode(&self.store, &self.volume, dir)?.parent())
    }

    fn create_node(
        &self,
        parent: Ino,
        name: &OsStr,
        kind: FileKind,
        mode: u32,
        owner: Owner,
        content: Content,
        rdev: u32,
    ) -> Result<Attr> {
        self.check_writable()?;
        let name = validate_new_name(parent, name)?;
        let mut state = self.state.lock();
        if state.child(self, parent, &name)?.is_some() {
            return Err(EngineError::exists("entry", String::from_utf8_lossy(&name)));
        }
        let ino = state.allocate_ino();
        let mut inode = new_inode(ino, kind, mode, owner, (parent, name.clone()), content);
        inode.attr.rdev = rdev;
        if let Content::Symlink(target) = &inode.content {
            inode.attr.size = target.len() as u64;
        }
        let op = match &inode.content {
            Content::File(_) => MetaOp::Create { parent, name: name.clone(), ino, mode },
            Content::Directory(_) => MetaOp::Mkdir { parent, name: name.clone(), ino, mode },
            Content::Symlink(target) => MetaOp::Symlink { parent, name: name.clone(), ino, target: target.clone() },
            Content::Special => MetaOp::Mknod { parent, name: name.clone(), ino, mode, kind: kind.code(), rdev },
        };
        let attr = state.insert_new(self, parent, name, inode)?;
        self.log_meta(&mut state, op)?;
        Ok(attr)
    }

    /// Creates an empty regular file; fails with `AlreadyExists` if the name is taken.
    pub fn create(&self, parent: Ino, name: &OsStr, mode: u32, owner: Owner) -> Result<Attr> {
        self.create_node(parent, name, FileKind::File, mode, owner, Content::File(ExtentMap::new()), 0)
    }

    /// Creates a FIFO, socket or device node. Regular files go through [`Session::create`].
    pub fn mknod(&self, parent: Ino, name: &OsStr, kind: FileKind, mode: u32, rdev: u32, owner: Owner) -> Result<Attr> {
        if matches!(kind, FileKind::File | FileKind::Directory | FileKind::Symlink) {
            return Err(EngineError::InvalidArgument(format!("mknod cannot create a {}", kind.as_str())));
        }
        self.create_node(parent, name, kind, mode, owner, Content::Special, rdev)
    }

    pub fn mkdir(&self, parent: Ino, name: &OsStr, mode: u32, owner: Owner) -> Result<Attr> {
        self.create_node(parent, name, FileKind::Directory, mode, owner, Content::Directory(BTreeMap::new()), 0)
    }

    pub fn symlink(&self, parent: Ino, name: &OsStr, target: &[u8], owner: Owner) -> Result<Attr> {
        if target.is_empty() {
            return Err(EngineError::InvalidArgument("empty symbolic link target".into()));
        }
        if target.len() > SYMLINK_MAX {
            return Err(EngineError::NameTooLong { name: String::from_utf8_lossy(target).into_owned(), len: target.len() });
        }
        self.create_node(parent, name, FileKind::Symlink, 0o777, owner, Content::Symlink(target.to_vec()), 0)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        let mut state = self.state.lock();
        match &state.inode(&self.store, &self.volume, ino)?.content {
            Content::Symlink(target) => Ok(target.clone()),
            _ => Err(EngineError::InvalidArgument(format!("inode {ino} is not a symbolic link"))),
        }
    }

    /// Adds a hard link `new_parent/new_name` to a file or symlink.
    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &OsStr) -> Result<Attr> {
        self.check_writable()?;
        let name = validate_new_name(new_parent, new_name)?;
        let mut state = self.state.lock();
        let kind = state.inode(&self.store, &self.volume, ino)?.attr.kind;
        if kind == FileKind::Directory {
            return Err(EngineError::NotPermitted(format!("hard link to directory {ino}")));
        }
        if state.child(self, new_parent, &name)?.is_some() {
            return Err(EngineError::exists("entry", String::from_utf8_lossy(&name)));
        }
        let now = Timestamp::now();
        state.entries_mut(self, new_parent)?.insert(name.clone(), (ino, kind));
        state.inodes.get_mut(&ino).expect("loaded above").links.push((new_parent, name.clone()));
        state.adjust_nlink(ino, 1);
        state.touch(ino, now, false);
        state.touch(new_parent, now, true);
        self.log_meta(&mut state, MetaOp::Link { ino, new_parent, new_name: name })?;
        Ok(state.inodes[&ino].attr.clone())
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let name = validate_name(name)?;
        let mut state = self.state.lock();
        match state.child(self, parent, &name)? {
            None => return Err(EngineError::not_found("entry", String::from_utf8_lossy(&name))),
            Some((ino, FileKind::Directory)) => return Err(EngineError::IsDirectory { ino }),
            Some(_) => {}
        }
        state.remove_entry(self, parent, &name, Timestamp::now())?;
        self.log_meta(&mut state, MetaOp::Unlink { parent, name })
    }

    pub fn rmdir(&self, parent: Ino, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let name = validate_name(name)?;
        let mut state = self.state.lock();
        match state.child(self, parent, &name)? {
            None => return Err(EngineError::not_found("entry", String::from_utf8_lossy(&name))),
            Some((ino, FileKind::Directory)) => state.check_empty_dir(self, ino)?,
            Some((ino, _)) => return Err(EngineError::NotDirectory { ino }),
        }
        state.remove_entry(self, parent, &name, Timestamp::now())?;
        self.log_meta(&mut state, MetaOp::Rmdir { parent, name })
    }

    /// Renames atomically, as `renameat2` with the given mode.
    pub fn rename(&self, parent: Ino, name: &OsStr, new_parent: Ino, new_name: &OsStr, mode: RenameMode) -> Result<()> {
        self.check_writable()?;
        let name = validate_name(name)?;
        let new_name = validate_new_name(new_parent, new_name)?;
        let mut state = self.state.lock();
        let state = &mut *state;
        let Some((src, src_kind)) = state.child(self, parent, &name)? else {
            return Err(EngineError::not_found("entry", String::from_utf8_lossy(&name)));
        };
        // Every directory involved must exist before anything changes.
        state.entries_mut(self, new_parent)?;
        let dst = state.child(self, new_parent, &new_name)?;
        if src_kind == FileKind::Directory && state.is_ancestor(self, src, new_parent)? {
            return Err(EngineError::InvalidArgument("cannot move a directory into itself".into()));
        }
        let now = Timestamp::now();
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => {
                return Err(EngineError::exists("entry", String::from_utf8_lossy(&new_name)));
            }
            (RenameMode::Exchange, None) => {
                return Err(EngineError::not_found("entry", String::from_utf8_lossy(&new_name)));
            }
            (RenameMode::Exchange, Some((dst_ino, dst_kind))) => {
                if dst_kind == FileKind::Directory && state.is_ancestor(self, dst_ino, parent)? {
                    return Err(EngineError::InvalidArgument("cannot move a directory into itself".into()));
                }
                state.entries_mut(self, parent)?.insert(name.clone(), (dst_ino, dst_kind));
                state.entries_mut(self, new_parent)?.insert(new_name.clone(), (src, src_kind));
                self.relink(state, src, src_kind, (parent, &name), (new_parent, &new_name))?;
                self.relink(state, dst_ino, dst_kind, (new_parent, &new_name), (parent, &name))?;
                state.touch(src, now, false);
                state.touch(dst_ino, now, false);
            }
            (_, Some((dst_ino, _))) if dst_ino == src => {
                // Both names are links to the same inode: POSIX says do nothing.
                return Ok(());
            }
            (_, dst) => {
                if let Some((dst_ino, dst_kind)) = dst {
                    match (src_kind == FileKind::Directory, dst_kind == FileKind::Directory) {
                        (true, true) => state.check_empty_dir(self, dst_ino)?,
                        (true, false) => return Err(EngineError::NotDirectory { ino: dst_ino }),
                        (false, true) => return Err(EngineError::IsDirectory { ino: dst_ino }),
                        (false, false) => {}
                    }
                    state.remove_entry(self, new_parent, &new_name, now)?;
                }
                state.entries_mut(self, parent)?.remove(&name);
                state.entries_mut(self, new_parent)?.insert(new_name.clone(), (src, src_kind));
                self.relink(state, src, src_kind, (parent, &name), (new_parent, &new_name))?;
                state.touch(src, now, false);
            }
        }
        state.touch(parent, now, true);
        state.touch(new_parent, now, true);
        let mode_code = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => 1,
            RenameMode::Exchange => 2,
        };
        self.log_meta(state, MetaOp::Rename { parent, name, new_parent, new_name, mode: mode_code })
    }

    /// Moves one link of `ino` from `from` to `to`, and moves a directory's
    /// contribution to its parents' link counts.
    fn relink(&self, state: &mut State, ino: Ino, kind: FileKind, from: (Ino, &[u8]), to: (Ino, &[u8])) -> Result<()> {
        let inode = state.inode(&self.store, &self.volume, ino)?;
        inode.remove_link(from.0, from.1);
        inode.links.push((to.0, to.1.to_vec()));
        state.dirty.insert(ino);
        if kind == FileKind::Directory && from.0 != to.0 {
            state.adjust_nlink(from.0, -1);
            state.adjust_nlink(to.0, 1);
        }
        Ok(())
    }

    pub fn getxattr(&self, ino: Ino, name: &OsStr) -> Result<Vec<u8>> {
        let mut state = self.state.lock();
        let inode = state.inode(&self.store, &self.volume, ino)?;
        inode
            .xattrs
            .get(name.as_bytes())
            .cloned()
            .ok_or_else(|| EngineError::NoXattr { ino, name: name.to_string_lossy().into_owned() })
    }

    /// Names of the extended attributes of an inode, without terminating NULs.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        let mut state = self.state.lock();
        Ok(state.inode(&self.store, &self.volume, ino)?.xattrs.keys().cloned().collect())
    }

    pub fn setxattr(&self, ino: Ino, name: &OsStr, value: &[u8], mode: XattrMode) -> Result<()> {
        self.check_writable()?;
        let key = name.as_bytes();
        if key.is_empty() || key.len() > NAME_MAX {
            return Err(EngineError::NameTooLong { name: name.to_string_lossy().into_owned(), len: key.len() });
        }
        if value.len() > XATTR_VALUE_MAX {
            return Err(EngineError::TooLarge(format!(
                "extended attribute value of {} bytes exceeds the limit of {XATTR_VALUE_MAX}",
                value.len()
            )));
        }
        let mut state = self.state.lock();
        let inode = state.inode(&self.store, &self.volume, ino)?;
        let exists = inode.xattrs.contains_key(key);
        match (mode, exists) {
            (XattrMode::CreateOnly, true) => return Err(EngineError::exists("extended attribute", name.to_string_lossy())),
            (XattrMode::ReplaceOnly, false) => {
                return Err(EngineError::NoXattr { ino, name: name.to_string_lossy().into_owned() })
            }
            _ => {}
        }
        inode.xattrs.insert(key.to_vec(), value.to_vec());
        state.touch(ino, Timestamp::now(), false);
        self.log_meta(&mut state, MetaOp::SetXattr { ino, name: key.to_vec(), value: value.to_vec() })
    }

    pub fn removexattr(&self, ino: Ino, name: &OsStr) -> Result<()> {
        self.check_writable()?;
        let mut state = self.state.lock();
        let inode = state.inode(&self.store, &self.volume, ino)?;
        if inode.xattrs.remove(name.as_bytes()).is_none() {
            return Err(EngineError::NoXattr { ino, name: name.to_string_lossy().into_owned() });
        }
        state.touch(ino, Timestamp::now(), false);
        self.log_meta(&mut state, MetaOp::RemoveXattr { ino, name: name.as_bytes().to_vec() })
    }

    /// Space figures of the disk that holds the local root, and file counts of the volume.
    pub fn statfs(&self) -> Result<StatFs> {
        let root = self.store.local_root();
        let path = std::ffi::CString::new(root.as_os_str().as_bytes())
            .map_err(|_| EngineError::InvalidArgument(format!("local root {} contains NUL", root.display())))?;
        // SAFETY: statvfs writes only into the zeroed struct we pass; the path is NUL-terminated.
        let mut raw: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut raw) } != 0 {
            return Err(EngineError::io("reading file system statistics of", root, std::io::Error::last_os_error()));
        }
        let state = self.state.lock();
        let files = state.root.files;
        Ok(StatFs {
            blocks: raw.f_blocks as u64 * raw.f_frsize as u64 / 4096,
            blocks_free: raw.f_bfree as u64 * raw.f_frsize as u64 / 4096,
            blocks_available: raw.f_bavail as u64 * raw.f_frsize as u64 / 4096,
            files: files + raw.f_ffree as u64,
            files_free: raw.f_ffree as u64,
            block_size: 4096,
            name_max: NAME_MAX as u32,
        })
    }

    /// Counts an open handle, which keeps an unlinked inode readable until [`Session::release`].
    pub fn open(&self, ino: Ino) -> Result<()> {
        let mut state = self.state.lock();
        state.inode(&self.store, &self.volume, ino)?;
        *state.open_handles.entry(ino).or_default() += 1;
        Ok(())
    }

    pub fn release(&self, ino: Ino) {
        let mut state = self.state.lock();
        if let Some(count) = state.open_handles.get_mut(&ino) {
            *count -= 1;
            if *count == 0 {
                state.open_handles.remove(&ino);
            }
        }
    }

    /// Adds to the kernel's lookup count of an inode.
    pub fn remember(&self, ino: Ino, lookups: u64) {
        *self.state.lock().lookups.entry(ino).or_default() += lookups;
    }

    /// Subtracts from the kernel's lookup count. An inode no longer known to
    /// the kernel, unchanged and unopened, is dropped from memory; it is
    /// reloaded from the checkpoint if needed again.
    pub fn forget(&self, ino: Ino, lookups: u64) {
        let mut state = self.state.lock();
        let remaining = match state.lookups.get_mut(&ino) {
            Some(count) => {
                *count = count.saturating_sub(lookups);
                *count
            }
            None => 0,
        };
        if remaining == 0 {
            state.lookups.remove(&ino);
            let idle = !state.dirty.contains(&ino) && !state.open_handles.contains_key(&ino) && ino != Ino::ROOT;
            if idle {
                state.inodes.remove(&ino);
            }
        }
    }
}
