//! `Batch`: one writable session on a lineage head. Writes stay in the
//! session until `commit` publishes them all as one version; `discard`
//! (or dropping the batch) throws them away.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chalk_engine::{normalize_path, EngineError, Ino, Owner, Session, SetAttr, SyncOutcome, TimeSet, Timestamp};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert;
use crate::errors::{engine_error, engine_error_at, new_error};

/// Mode of files written from bytes or file objects.
const FILE_MODE: u32 = 0o644;

#[pyclass(frozen, module = "chalkcompute._native")]
pub struct Batch {
    /// `None` once the batch was committed or discarded.
    session: Mutex<Option<Arc<Session>>>,
}

impl Batch {
    pub(crate) fn new(session: Session) -> Self {
        Batch { session: Mutex::new(Some(Arc::new(session))) }
    }

    fn session(&self) -> PyResult<Arc<Session>> {
        self.session.lock().clone().ok_or_else(|| {
            new_error("ChalkError", "this batch was already committed or discarded; start a new one with batch_upload()".into())
        })
    }
}

fn volume_of(session: &Session) -> String {
    session.volume().to_string()
}

/// Creates the file at `path` (and its parents), or truncates the file there,
/// and returns its inode.
fn create_or_truncate(session: &Session, path: &str, mode: u32) -> chalk_engine::Result<Ino> {
    session.write_file_from(path, &mut std::io::empty(), mode, Owner::current())?;
    Ok(session.resolve_path(path)?.ino)
}

/// Copies one local file to `path` with its mode and modification time; returns its size.
fn upload_one(session: &Session, local: &Path, path: &str) -> Result<u64, PyErr> {
    let volume = volume_of(session);
    let meta = fs::metadata(local).map_err(|err| local_error(local, &err))?;
    if !meta.is_file() {
        return Err(new_error("InvalidPath", format!("local path {} is not a regular file", local.display())));
    }
    let mut file = fs::File::open(local).map_err(|err| local_error(local, &err))?;
    let mode = meta.permissions().mode() & 0o7777;
    let written = session.write_file_from(path, &mut file, mode, Owner::current()).map_err(|err| engine_error_at(err, &volume, path))?;
    let mtime = Timestamp { secs: meta.mtime(), nanos: meta.mtime_nsec() as u32 };
    let ino = session.resolve_path(path).map_err(|err| engine_error_at(err, &volume, path))?.ino;
    session
        .setattr(ino, &SetAttr { mtime: Some(TimeSet::At(mtime)), ..SetAttr::default() })
        .map_err(|err| engine_error_at(err, &volume, path))?;
    Ok(written)
}

fn local_error(local: &Path, err: &std::io::Error) -> PyErr {
    let kind = match err.kind() {
        std::io::ErrorKind::NotFound => "NotFound",
        _ => "ChalkError",
    };
    new_error(kind, format!("cannot read local path {}: {err}", local.display()))
}

fn join(base: &str, name: &str) -> String {
    let base = base.trim_matches('/');
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}/{name}")
    }
}

/// Result of uploading a directory tree.
struct TreeUpload {
    files: u64,
    bytes: u64,
    /// Local paths that are neither files, directories nor symlinks.
    skipped: Vec<PathBuf>,
}

fn upload_tree(session: &Session, local_root: &Path, remote_root: &str) -> Result<TreeUpload, PyErr> {
    let volume = volume_of(session);
    let owner = Owner::current();
    let mut done = TreeUpload { files: 0, bytes: 0, skipped: Vec::new() };
    session.make_dirs(remote_root, owner).map_err(|err| engine_error_at(err, &volume, remote_root))?;
    let mut stack = vec![(local_root.to_owned(), remote_root.trim_matches('/').to_owned())];
    while let Some((dir, remote_dir)) = stack.pop() {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(&dir)
            .and_then(|entries| entries.collect())
            .map_err(|err| local_error(&dir, &err))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let local = entry.path();
            let meta = fs::symlink_metadata(&local).map_err(|err| local_error(&local, &err))?;
            let remote = join(&remote_dir, &entry.file_name().to_string_lossy());
            if meta.is_dir() {
                let ino = session.make_dirs(&remote, owner).map_err(|err| engine_error_at(err, &volume, &remote))?;
                let mode = SetAttr { mode: Some(meta.permissions().mode() & 0o7777), ..SetAttr::default() };
                session.setattr(ino, &mode).map_err(|err| engine_error_at(err, &volume, &remote))?;
                stack.push((local, remote));
            } else if meta.is_file() {
                done.bytes += upload_one(session, &local, &remote)?;
                done.files += 1;
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&local).map_err(|err| local_error(&local, &err))?;
                let parent = session.resolve_path(&remote_dir).map_err(|err| engine_error_at(err, &volume, &remote_dir))?.ino;
                let name = entry.file_name();
                match session.lookup(parent, name.as_os_str()) {
                    Ok(old) => {
                        if old.kind == chalk_engine::FileKind::Directory {
                            return Err(engine_error_at(EngineError::IsDirectory { ino: old.ino }, &volume, &remote));
                        }
                        session.unlink(parent, name.as_os_str()).map_err(|err| engine_error_at(err, &volume, &remote))?;
                    }
                    Err(EngineError::NotFound { .. }) => {}
                    Err(err) => return Err(engine_error_at(err, &volume, &remote)),
                }
                session
                      .symlink(parent, name.as_os_str(), target.as_os_str().as_bytes(), owner)
                    .map_err(|err| engine_error_at(err, &volume, &remote))?;
            } else {
                done.skipped.push(local);
            }
        }
    }
    Ok(done)
}

/// Times a commit syncs again after another writer published between its
/// rebase and its head write.
const COMMIT_ATTEMPTS: u32 = 16;

/// Syncs `session`, trying again when the lineage head moved during the
/// sync. The next attempt rebases onto the new head, or fails with a
/// conflict naming the paths when both sides changed the same ones.
fn sync_retrying(session: &Session, message: Option<&str>) -> chalk_engine::Result<SyncOutcome> {
    let mut attempt = 1;
    loop {
        match session.sync(message) {
            Err(EngineError::HeadMoved { .. }) if attempt < COMMIT_ATTEMPTS => {
                // A short random pause keeps writers that collided from colliding again.
                let pause_ms = 1 + rand::random::<u64>() % 20;
                std::thread::sleep(std::time::Duration::from_millis(pause_ms));
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

#[pymethods]
impl Batch {
    /// Writes `data` as the whole file at `path`; returns the bytes written.
    fn put_bytes(&self, py: Python<'_>, path: &str, data: &[u8]) -> PyResult<u64> {
        let session = self.session()?;
        let volume = volume_of(&session);
        py.allow_threads(|| session.write_file_from(path, &mut &data[..], FILE_MODE, Owner::current()))
            .map_err(|err| engine_error_at(err, &volume, path))
    }

    /// Creates or truncates the file at `path` for [`Batch::write_at`]; returns its inode number.
    fn begin_file(&self, py: Python<'_>, path: &str) -> PyResult<u64> {
        let session = self.session()?;
        let volume = volume_of(&session);
        let ino = py
            .allow_threads(|| create_or_truncate(&session, path, FILE_MODE))
            .map_err(|err| engine_error_at(err, &volume, path))?;
        Ok(ino.0)
    }

    /// Writes `data` at `offset` of the file that [`Batch::begin_file`] returned.
    fn write_at(&self, py: Python<'_>, ino: u64, offset: u64, data: &[u8]) -> PyResult<()> {
        let session = self.session()?;
        py.allow_threads(|| session.write(Ino(ino), offset, data)).map_err(engine_error)?;
        Ok(())
    }

    /// Copies local file `local` to `path`; returns its size.
    fn upload_file(&self, py: Python<'_>, local: PathBuf, path: &str) -> PyResult<u64> {
        let session = self.session()?;
        py.allow_threads(|| upload_one(&session, &local, path))
    }

    /// Copies the tree under local directory `local` to `path`; returns
    /// `(files, bytes, skipped local paths)`.
    fn upload_directory(&self, py: Python<'_>, local: PathBuf, path: &str) -> PyResult<(u64, u64, Vec<PathBuf>)> {
        let session = self.session()?;
        if !local.is_dir() {
            let kind = if local.exists() { "InvalidPath" } else { "NotFound" };
            return Err(new_error(kind, format!("local path {} is not a directory", local.display())));
        }
        let done = py.allow_threads(|| upload_tree(&session, &local, path))?;
        Ok((done.files, done.bytes, done.skipped))
    }

    /// Removes a file, a symlink or, with `recursive`, a directory tree.
    #[pyo3(signature = (path, recursive = false))]
    fn remove(&self, py: Python<'_>, path: &str, recursive: bool) -> PyResult<()> {
        let session = self.session()?;
        let volume = volume_of(&session);
        py.allow_threads(|| session.remove_path(path, recursive)).map_err(|err| engine_error_at(err, &volume, path))
    }

    /// Creates a directory and its missing parents.
    fn make_dirs(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        let session = self.session()?;
        let volume = volume_of(&session);
        normalize_path(path).map_err(engine_error)?;
        py.allow_threads(|| session.make_dirs(path, Owner::current())).map_err(|err| engine_error_at(err, &volume, path))?;
        Ok(())
    }

    /// Returns whether the batch contains writes that `commit` would publish.
    fn has_changes(&self) -> PyResult<bool> {
        Ok(self.session()?.has_changes())
    }

    /// Publishes every write of the batch as one version and ends the batch.
    /// Returns the version, or `None` when the batch wrote nothing.
    #[pyo3(signature = (message = None))]
    fn commit<'py>(&self, py: Python<'py>, message: Option<&str>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let session = self.session()?;
        let outcome = py.allow_threads(|| sync_retrying(&session, message)).map_err(engine_error)?;
        // Only a successful publish ends the batch: after a conflict it keeps its writes.
        if let Some(session) = self.session.lock().take() {
            session.discard();
        }
        match outcome {
            SyncOutcome::Published(info) => Ok(Some(convert::version(py, &info)?)),
            SyncOutcome::NothingToPublish { .. } => Ok(None),
        }
    }

    /// Ends the batch without publishing; its writes are deleted.
    fn discard(&self, py: Python<'_>) {
        if let Some(session) = self.session.lock().take() {
            py.allow_threads(|| session.discard());
        }
    }

    #[getter]
    fn closed(&self) -> bool {
        self.session.lock().is_none()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(session) = self.session.get_mut().take() {
            session.discard();
        }
    }
}
