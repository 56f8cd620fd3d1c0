//! Path-level helpers on top of the inode operations, for the CLI and the
//! SDK: normalising volume paths, creating parent directories, streaming a
//! file in or out, removing trees and walking them.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;

use crate::error::{EngineError, Result};
use crate::ids::Ino;
use crate::tree::{Attr, FileKind, Owner, SetAttr};

use super::Session;

/// Bytes read from a source and written as one record at a time.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Splits a path inside a volume into its names. Empty components and `.`
/// are dropped and a leading `/` means the volume root; `..` is rejected so
/// a path can never leave the volume.
pub fn normalize_path(path: &str) -> Result<Vec<Vec<u8>>> {
    let invalid = |reason: &str| EngineError::InvalidPath { path: path.to_owned(), reason: reason.to_owned() };
    if path.contains('\0') {
        return Err(invalid("paths cannot contain NUL"));
    }
    let mut names = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err(invalid("'..' is not allowed in volume paths; give the path from the volume root")),
            name if name.len() > crate::tree::NAME_MAX => return Err(invalid("a component is longer than 255 bytes")),
            name => names.push(name.as_bytes().to_vec()),
        }
    }
    Ok(names)
}

/// One entry found by [`Session::walk`].
#[derive(Clone, Debug)]
pub struct PathEntry {
    /// Path relative to the volume root, with `/` separators and no leading `/`.
    pub path: String,
    pub attr: Attr,
    /// Target of a symbolic link.
    pub target: Option<Vec<u8>>,
}

fn join(parent: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if parent.is_empty() {
        name.into_owned()
    } else {
        format!("{parent}/{name}")
    }
}

impl super::State {
    /// Looks up a path from the volume root without following symlinks;
    /// `None` when a component does not exist.
    pub(crate) fn resolve(&mut self, store: &crate::store::Store, volume: &crate::ids::VolumeName, path: &str) -> Result<Option<Ino>> {
        let mut ino = Ino::ROOT;
        for name in normalize_path(path)? {
            let next = match &self.inode(store, volume, ino)?.content {
                crate::tree::Content::Directory(entries) => entries.get(&name).map(|(child, _)| *child),
                _ => None,
            };
            match next {
                Some(child) => ino = child,
                None => return Ok(None),
            }
        }
        Ok(Some(ino))
    }

    /// Returns every path that names `ino`, one per hard link, from its links
    /// and its ancestors' links. The root's path is the empty string.
    pub(crate) fn paths_of(&mut self, store: &crate::store::Store, volume: &crate::ids::VolumeName, ino: Ino) -> Result<Vec<String>> {
        if ino == Ino::ROOT {
            return Ok(vec![String::new()]);
        }
        let links = self.inode(store, volume, ino)?.links.clone();
        let mut out = Vec::with_capacity(links.len());
        for (parent, name) in links {
            let mut names = vec![name];
            let mut dir = parent;
            // A directory chain longer than this is a loop, which the engine never creates.
            for _ in 0..4096 {
                if dir == Ino::ROOT {
                    break;
                }
                let inode = self.inode(store, volume, dir)?;
                let Some((up, name)) = inode.links.first().cloned() else { break };
                names.push(name);
                dir = up;
            }
            names.reverse();
            let parts: Vec<String> = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
            out.push(parts.join("/"));
        }
        out.sort();
        Ok(out)
    }
}

impl Session {
    /// Returns the paths that name an inode, sorted; more than one for hard links.
    pub fn paths_of(&self, ino: Ino) -> Result<Vec<String>> {
        let mut state = self.state.lock();
        state.paths_of(&self.store, &self.volume, ino)
    }

    /// Looks up a path from the volume root without following symlinks.
    pub fn resolve_path(&self, path: &str) -> Result<Attr> {
        let mut attr = self.getattr(Ino::ROOT)?;
        let mut walked = String::new();
        for name in normalize_path(path)? {
            if attr.kind != FileKind::Directory {
                return Err(EngineError::InvalidPath { path: path.to_owned(), reason: format!("{walked} is not a directory") });
            }
            attr = self.lookup(attr.ino, OsStr::from_bytes(&name)).map_err(|err| match err {
                EngineError::NotFound { .. } => EngineError::not_found("path", format!("{path} in volume {}", self.volume)),
                other => other,
            })?;
            walked = join(&walked, &name);
        }
        Ok(attr)
    }

    /// Creates every missing directory of `path` (like `mkdir -p`) and returns the last one.
    pub fn make_dirs(&self, path: &str, owner: Owner) -> Result<Ino> {
        let mut dir = Ino::ROOT;
        for name in normalize_path(path)? {
            let name = OsStr::from_bytes(&name);
            dir = match self.lookup(dir, name) {
                Ok(attr) if attr.kind == FileKind::Directory => attr.ino,
                Ok(_) => {
                    return Err(EngineError::InvalidPath {
                        path: path.to_owned(),
                        reason: format!("{} exists and is not a directory", name.to_string_lossy()),
                    })
                }
                Err(EngineError::NotFound { .. }) => self.mkdir(dir, name, 0o755, owner)?.ino,
                Err(err) => return Err(err),
            };
        }
        Ok(dir)
    }

    /// Writes a whole file at `path` from `source`, creating parent
    /// directories and replacing an existing file. Returns the bytes written.
    pub fn write_file_from(&self, path: &str, source: &mut dyn Read, mode: u32, owner: Owner) -> Result<u64> {
        let mut names = normalize_path(path)?;
        let Some(name) = names.pop() else {
            return Err(EngineError::InvalidPath { path: path.to_owned(), reason: "a file path needs a name".into() });
        };
        if path.ends_with('/') {
            return Err(EngineError::InvalidPath {
                path: path.to_owned(),
                reason: "it ends in '/', which names a directory; put the file name after the last '/'".into(),
            });
        }
        let parent_path: Vec<String> = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let parent = self.make_dirs(&parent_path.join("/"), owner)?;
        let name = OsStr::from_bytes(&name);
        let ino = match self.lookup(parent, name) {
            Ok(attr) if attr.kind == FileKind::File => {
                self.setattr(attr.ino, &SetAttr { size: Some(0), mode: Some(mode), ..SetAttr::default() })?;
                attr.ino
            }
            Ok(attr) => return Err(EngineError::IsDirectory { ino: attr.ino }),
            Err(EngineError::NotFound { .. }) => self.create(parent, name, mode, owner)?.ino,
            Err(err) => return Err(err),
        };
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let mut offset = 0u64;
        loop {
            let n = read_full(source, &mut buf).map_err(|e| EngineError::io("reading input for", path, e))?;
            if n == 0 {
                break;
            }
            self.write(ino, offset, &buf[..n])?;
            offset += n as u64;
        }
        Ok(offset)
    }

    /// Streams the file at `path` into `sink`. Returns the bytes copied.
    pub fn read_file_to(&self, path: &str, sink: &mut dyn Write) -> Result<u64> {
        let attr = self.resolve_path(path)?;
        if attr.kind != FileKind::File {
            return Err(EngineError::InvalidPath { path: path.to_owned(), reason: "not a regular file".into() });
        }
        let mut offset = 0u64;
        while offset < attr.size {
            let data = self.read(attr.ino, offset, COPY_CHUNK_BYTES as u32)?;
            if data.is_empty() {
                break;
            }
            sink.write_all(&data).map_err(|e| EngineError::io("writing output for", path, e))?;
            offset += data.len() as u64;
        }
        Ok(offset)
    }

    /// Removes a file, a symlink or (with `recursive`) a directory tree.
    pub fn remove_path(&self, path: &str, recursive: bool) -> Result<()> {
        let mut names = normalize_path(path)?;
        let Some(name) = names.pop() else {
            return Err(EngineError::InvalidPath { path: path.to_owned(), reason: "cannot remove the volume root".into() });
        };
        let parent_path: Vec<String> = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let parent = self.resolve_path(&parent_path.join("/"))?;
        let name = OsStr::from_bytes(&name);
        let attr = self.lookup(parent.ino, name).map_err(|err| match err {
            EngineError::NotFound { .. } => EngineError::not_found("path", format!("{path} in volume {}", self.volume)),
            other => other,
        })?;
        if attr.kind != FileKind::Directory {
            return self.unlink(parent.ino, name);
        }
        if !recursive {
            return Err(EngineError::InvalidPath {
                path: path.to_owned(),
                reason: "is a directory; remove it and everything under it with `chalk volume rm -r` \
                         or, in Python, remove(path, recursive=True)"
                    .into(),
            });
        }
        self.remove_tree(attr.ino)?;
        self.rmdir(parent.ino, name)
    }

    fn remove_tree(&self, dir: Ino) -> Result<()> {
        for entry in self.readdir(dir)? {
            let name = OsStr::from_bytes(&entry.name);
            if entry.kind == FileKind::Directory {
                self.remove_tree(entry.ino)?;
                self.rmdir(dir, name)?;
            } else {
                self.unlink(dir, name)?;
            }
        }
        Ok(())
    }

    /// Lists `path`: a directory's entries (all levels with `recursive`), or
    /// the file itself. Entries are sorted by path.
    pub fn walk(&self, path: &str, recursive: bool) -> Result<Vec<PathEntry>> {
        let attr = self.resolve_path(path)?;
        let base: Vec<String> = normalize_path(path)?.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let base = base.join("/");
        let mut out = Vec::new();
        if attr.kind != FileKind::Directory {
            let target = self.target_of(&attr)?;
            out.push(PathEntry { path: base, attr, target });
            return Ok(out);
        }
        self.walk_dir(attr.ino, &base, recursive, &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    fn walk_dir(&self, dir: Ino, prefix: &str, recursive: bool, out: &mut Vec<PathEntry>) -> Result<()> {
        for entry in self.readdir(dir)? {
            let attr = self.getattr(entry.ino)?;
            let path = join(prefix, &entry.name);
            let target = self.target_of(&attr)?;
            let is_dir = attr.kind == FileKind::Directory;
            out.push(PathEntry { path: path.clone(), attr, target });
            if recursive && is_dir {
                self.walk_dir(entry.ino, &path, recursive, out)?;
            }
        }
        Ok(())
    }

    fn target_of(&self, attr: &Attr) -> Result<Option<Vec<u8>>> {
        if attr.kind == FileKind::Symlink {
            Ok(Some(self.readlink(attr.ino)?))
        } else {
            Ok(None)
        }
    }
}

fn read_full(source: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_rejects_parent_components() {
        for bad in ["..", "a/../b", "/../etc/passwd", "a/.."] {
            assert!(normalize_path(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn normalize_drops_empty_and_dot() {
        assert_eq!(normalize_path("/a//./b/").unwrap(), vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(normalize_path("").unwrap().is_empty());
        assert!(normalize_path("/").unwrap().is_empty());
    }
}

impl Session {
    /// Copies `src` of `from` (this session or a reader of another version
    /// of the same volume) to `dst` in this session, sharing extents: no file
    /// data is copied. Directories are copied whole when `recursive`.
    pub fn copy_path(&self, from: &Session, src: &str, dst: &str, recursive: bool, owner: Owner) -> Result<u64> {
        if from.volume != self.volume {
            return Err(EngineError::InvalidArgument(format!(
                "cannot copy from volume {} into volume {}",
                from.volume, self.volume
            )));
        }
        self.check_writable()?;
        let attr = from.resolve_path(src)?;
        if self.resolve_path(dst).is_ok() {
            return Err(EngineError::exists("path", format!("{dst} in volume {}", self.volume)));
        }
        match attr.kind {
            FileKind::Directory if !recursive => Err(EngineError::InvalidPath {
                path: src.to_owned(),
                reason: "is a directory; pass -r to copy it and everything under it".into(),
            }),
            FileKind::Directory => {
                let ino = self.make_dirs(dst, owner)?;
                self.setattr(ino, &SetAttr { mode: Some(attr.perm as u32), ..SetAttr::default() })?;
                let mut copied = 0;
                for entry in from.walk(src, false)? {
                    let name = entry.path.rsplit('/').next().unwrap_or_default().to_owned();
                    let child_dst = if dst.trim_matches('/').is_empty() { name } else { format!("{}/{name}", dst.trim_end_matches('/')) };
                    copied += self.copy_path(from, &entry.path, &child_dst, true, owner)?;
                }
                Ok(copied)
            }
            FileKind::Symlink => {
                let target = from.readlink(attr.ino)?;
                let (parent, name) = self.parent_and_name(dst, owner)?;
                self.symlink(parent, OsStr::from_bytes(&name), &target, owner)?;
                Ok(0)
            }
            FileKind::File => {
                let extents = from.extents_of(attr.ino)?;
                let xattrs = from.listxattr(attr.ino)?;
                let (parent, name) = self.parent_and_name(dst, owner)?;
                let created = self.create(parent, OsStr::from_bytes(&name), attr.perm as u32, owner)?;
                self.adopt_extents(created.ino, extents, attr.size, attr.mtime)?;
                for key in xattrs {
                    let value = from.getxattr(attr.ino, OsStr::from_bytes(&key))?;
                    self.setxattr(created.ino, OsStr::from_bytes(&key), &value, crate::tree::XattrMode::CreateOrReplace)?;
                }
                Ok(1)
            }
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => {
                let (parent, name) = self.parent_and_name(dst, owner)?;
                self.mknod(parent, OsStr::from_bytes(&name), attr.kind, attr.perm as u32, attr.rdev, owner)?;
                Ok(0)
            }
        }
    }

    /// Moves `src` to `dst` inside this session, creating missing parent directories of `dst`.
    pub fn move_path(&self, src: &str, dst: &str, owner: Owner) -> Result<()> {
        let mut names = normalize_path(src)?;
        let Some(src_name) = names.pop() else {
            return Err(EngineError::InvalidPath { path: src.to_owned(), reason: "cannot move the volume root".into() });
        };
        let src_parent: Vec<String> = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let src_parent = self.resolve_path(&src_parent.join("/"))?.ino;
        self.lookup(src_parent, OsStr::from_bytes(&src_name)).map_err(|err| match err {
            EngineError::NotFound { .. } => EngineError::not_found("path", format!("{src} in volume {}", self.volume)),
            other => other,
        })?;
        let (dst_parent, dst_name) = self.parent_and_name(dst, owner)?;
        self.rename(
            src_parent,
            OsStr::from_bytes(&src_name),
            dst_parent,
            OsStr::from_bytes(&dst_name),
            crate::tree::RenameMode::NoReplace,
        )
    }

    fn parent_and_name(&self, path: &str, owner: Owner) -> Result<(Ino, Vec<u8>)> {
        let mut names = normalize_path(path)?;
        let Some(name) = names.pop() else {
            return Err(EngineError::InvalidPath { path: path.to_owned(), reason: "a destination needs a name".into() });
        };
        let parent: Vec<String> = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        Ok((self.make_dirs(&parent.join("/"), owner)?, name))
    }

    fn extents_of(&self, ino: Ino) -> Result<crate::extent::ExtentMap> {
        let mut state = self.state.lock();
        match &state.inode(&self.store, &self.volume, ino)?.content {
            crate::tree::Content::File(extents) => Ok(extents.clone()),
            _ => Err(EngineError::InvalidArgument(format!("inode {ino} is not a regular file"))),
        }
    }

    /// Gives a new file the extents of another file, sharing its bytes.
    fn adopt_extents(&self, ino: Ino, extents: crate::extent::ExtentMap, size: u64, mtime: crate::tree::Timestamp) -> Result<()> {
        let mut state = self.state.lock();
        let inode = state.inode(&self.store, &self.volume, ino)?;
        inode.content = crate::tree::Content::File(extents);
        inode.attr.size = size;
        inode.attr.mtime = mtime;
        state.dirty.insert(ino);
        Ok(())
    }
}
