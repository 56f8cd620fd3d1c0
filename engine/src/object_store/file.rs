//! The embedded object store: one file per object under a local directory.
//!
//! Durability: a put writes a temporary file, syncs it, renames it into
//! place and syncs the directory, so a crash leaves either the old object or
//! the new one. A create-if-absent put links the synced temporary file to its
//! key, which fails atomically with `EEXIST` when the key exists.
//!
//! `put_file` hard-links its source in place of the temporary file when the
//! source is on the same file system, so a sealed segment is not written a
//! second time. The object and the source then share one inode: callers
//! pass only files that are never modified in place afterwards (sealed
//! segments), and deleting or renaming the source leaves the object intact.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{validate_key, ListPage, ObjectMeta, ObjectStore};
use crate::error::{EngineError, Result};

/// Object store in a local directory (`file:///path`).
pub struct FileStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl FileStore {
    pub fn open(root: &Path) -> Result<Self> {
        let tmp = root.join(".tmp");
        fs::create_dir_all(&tmp).map_err(|e| EngineError::io("creating object store directory", &tmp, e))?;
        Ok(FileStore { root: root.to_owned(), tmp })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }

    fn temp_path(&self) -> PathBuf {
        self.tmp.join(format!("{}.tmp", ulid::Ulid::new()))
    }

    fn write_temp(&self, data: &[u8]) -> Result<PathBuf> {
        let tmp = self.temp_path();
        let written = File::create(&tmp)
            .map_err(|e| EngineError::io("creating object", &tmp, e))
            .and_then(|mut file| {
                file.write_all(data).map_err(|e| EngineError::io("writing object", &tmp, e))?;
                file.sync_all().map_err(|e| EngineError::io("syncing object", &tmp, e))
            });
        if let Err(err) = written {
            let _ = fs::remove_file(&tmp);
            return Err(err);
        }
        Ok(tmp)
    }

    /// Creates the directories above an object and syncs the parent of each
    /// one it created, so a new directory survives a crash with its object.
    fn prepare_parent(&self, path: &Path) -> Result<PathBuf> {
        let parent = path.parent().expect("object path has a parent").to_owned();
        if parent.is_dir() {
            return Ok(parent);
        }
        let mut missing = Vec::new();
        let mut dir = parent.as_path();
        while !dir.exists() && dir != self.root {
            missing.push(dir.to_owned());
            dir = dir.parent().expect("object directories lie under the root");
        }
        fs::create_dir_all(&parent).map_err(|e| EngineError::io("creating object directory", &parent, e))?;
        for created in missing.iter().rev() {
            sync_dir(created.parent().expect("created directories have a parent"))?;
        }
        Ok(parent)
    }

    fn commit(&self, tmp: &Path, path: &Path) -> Result<()> {
        let parent = self.prepare_parent(path)?;
        fs::rename(tmp, path).map_err(|e| EngineError::io("renaming object into place", path, e))?;
        sync_dir(&parent)
    }
}

/// Hard-links `source` to `target`, or copies it when linking fails: across
/// file systems (`EXDEV`), on file systems without hard links, or for any
/// other reason, since the copy reports a real problem with the source.
fn link_or_copy(source: &Path, target: &Path) -> Result<()> {
    let Err(link_error) = fs::hard_link(source, target) else { return Ok(()) };
    tracing::debug!(source = %source.display(), error = %link_error, "hard link into the object store failed, so the file is copied");
    fs::copy(source, target).map(|_| ()).map_err(|e| EngineError::io("copying into object store", target, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| EngineError::io("syncing directory", dir, e))
}

impl ObjectStore for FileStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn local_file(&self, key: &str) -> Option<PathBuf> {
        self.path(key).ok()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        let path = self.path(key)?;
        let tmp = self.write_temp(data)?;
        self.commit(&tmp, &path)
    }

    /// Stores `source` under `key` by a hard link when the file systems
    /// allow it, else by a copy. The module doc says what the link requires
    /// of the source.
    fn put_file(&self, key: &str, source: &Path) -> Result<()> {
        let path = self.path(key)?;
        let tmp = self.temp_path();
        let stored = link_or_copy(source, &tmp)
            .and_then(|()| File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| EngineError::io("syncing object", &tmp, e)))
            .and_then(|()| self.commit(&tmp, &path));
        if stored.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        stored
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(key)?;
        let tmp = self.write_temp(data)?;
        let parent = self.prepare_parent(&path)?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&parent)?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(EngineError::io("creating object", &path, e)),
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io("reading object", &path, e)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let path = self.path(key)?;
        let file = File::open(&path).map_err(|e| EngineError::io("opening object", &path, e))?;
        let size = file.metadata().map_err(|e| EngineError::io("reading object size", &path, e))?.len();
        let end = offset.saturating_add(len).min(size);
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        file.read_exact_at(&mut buf, offset).map_err(|e| EngineError::io("reading object", &path, e))?;
        Ok(buf)
    }

    fn get_to_file(&self, key: &str, target: &Path) -> Result<bool> {
        let path = self.path(key)?;
        match fs::copy(&path, target) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => Ok(false),
            Err(e) => Err(EngineError::io("copying object", &path, e)),
        }
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        let dir_part = match prefix.rfind('/') {
            Some(at) => &prefix[..at],
            None => "",
        };
        let start = if dir_part.is_empty() { self.root.clone() } else { self.root.join(dir_part) };
        let mut keys = Vec::new();
        walk(&self.root, &start, &mut keys)?;
        keys.retain(|m| m.key.starts_with(prefix) && start_after.is_none_or(|after| m.key.as_str() > after));
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        let more = keys.len() > limit;
        keys.truncate(limit);
        let next_start_after = if more { keys.last().map(|m| m.key.clone()) } else { None };
        Ok(ListPage { objects: keys, next_start_after })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(EngineError::io("deleting object", &path, e)),
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectMeta>) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(EngineError::io("listing object store", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::io("listing object store", dir, e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| EngineError::io("listing object store", &path, e))?;
        if file_type.is_dir() {
            if dir == root && entry.file_name() == ".tmp" {
                continue;
            }
            walk(root, &path, out)?;
        } else if file_type.is_file() {
            // An object deleted while the listing runs is simply not listed.
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(EngineError::io("listing object store", &path, e)),
            };
            let key = path.strip_prefix(root).expect("walk stays under the root").to_string_lossy().into_owned();
            out.push(ObjectMeta { key, size: metadata.len(), modified: metadata.modified().ok() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn put_if_absent_wins_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        assert!(store.put_if_absent("a/b/head", b"one").unwrap());
        assert!(!store.put_if_absent("a/b/head", b"two").unwrap());
        assert_eq!(store.get("a/b/head").unwrap().unwrap(), b"one");
    }

    #[test]
    fn concurrent_put_if_absent_has_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FileStore::open(dir.path()).unwrap());
        let winners: usize = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || store.put_if_absent("race", format!("{i}").as_bytes()).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap() as usize)
            .sum();
        assert_eq!(winners, 1);
    }

    #[test]
    fn put_file_links_source_on_same_file_system() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = FileStore::open(&dir.path().join("objects")).unwrap();
        let source = dir.path().join("sealed.seg");
        fs::write(&source, b"sealed bytes").unwrap();
        store.put_file("v/segments/a.seg", &source).unwrap();
        assert_eq!(fs::metadata(&source).unwrap().nlink(), 2, "put_file copied instead of linking");

        // Deleting or replacing the source leaves the object as it was put.
        fs::remove_file(&source).unwrap();
        assert_eq!(store.get("v/segments/a.seg").unwrap().unwrap(), b"sealed bytes");
        fs::write(&source, b"other bytes").unwrap();
        store.put_file("v/segments/b.seg", &source).unwrap();
        let replacement = dir.path().join("replacement");
        fs::write(&replacement, b"replaced").unwrap();
        fs::rename(&replacement, &source).unwrap();
        assert_eq!(store.get("v/segments/a.seg").unwrap().unwrap(), b"sealed bytes");
        assert_eq!(store.get("v/segments/b.seg").unwrap().unwrap(), b"other bytes");
        assert_eq!(fs::read_dir(dir.path().join("objects/.tmp")).unwrap().count(), 0, "a temporary file was left behind");
    }

    #[test]
    fn put_file_copies_across_file_systems() {
        // /dev/shm is tmpfs, so a link from there to /var/tmp fails with EXDEV.
        let source_dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        assert_ne!(
            fs::metadata(source_dir.path()).unwrap().dev(),
            fs::metadata(dir.path()).unwrap().dev(),
            "the test needs /dev/shm and /var/tmp on different file systems"
        );
        let store = FileStore::open(dir.path()).unwrap();
        let source = source_dir.path().join("sealed.seg");
        fs::write(&source, b"sealed bytes").unwrap();
        store.put_file("k", &source).unwrap();
        assert_eq!(fs::metadata(&source).unwrap().nlink(), 1);
        assert_eq!(fs::metadata(dir.path().join("k")).unwrap().nlink(), 1);
        fs::remove_file(&source).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap(), b"sealed bytes");
    }

    #[test]
    fn put_file_of_missing_source_fails() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let err = store.put_file("k", &dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("copying into object store"), "{err}");
        assert!(store.get("k").unwrap().is_none());
        assert_eq!(fs::read_dir(dir.path().join(".tmp")).unwrap().count(), 0, "a temporary file was left behind");
    }

    #[test]
    fn list_paginates_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        for i in (0..25).rev() {
            store.put(&format!("p/{i:03}"), b"x").unwrap();
        }
        store.put("q/other", b"x").unwrap();
        let first = store.list("p/", None, 10).unwrap();
        assert_eq!(first.objects.len(), 10);
        assert_eq!(first.objects[0].key, "p/000");
        let all = super::super::list_all(&store, "p/").unwrap();
        assert_eq!(all.len(), 25);
        assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    }

    #[test]
    fn ranged_get_and_missing_objects() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        store.put("k", b"0123456789").unwrap();
        assert_eq!(store.get_range("k", 3, 4).unwrap(), b"3456");
        assert_eq!(store.get_range("k", 8, 10).unwrap(), b"89");
        assert!(store.get("missing").unwrap().is_none());
        store.delete("missing").unwrap();
        assert!(store.put("../escape", b"x").is_err());
    }
}
