//! `VolumeCore`: a handle on one volume, bound either to a lineage (reads see
//! its head at each call, writes publish onto it) or to one pinned version
//! (read-only).

use std::sync::Arc;

use chalk_engine::{
    Access, FileKind, LineageName, Session, SessionBase, Store, VersionInfo, VolumeName,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::batch::Batch;
use crate::errors::{engine_error, engine_error_at, new_error};
use crate::reader::Reader;
use crate::{convert, mounts, open_store};

/// The lineage or version a handle reads from and writes to.
#[derive(Clone)]
pub(crate) enum Binding {
    Lineage(LineageName),
    /// A pinned version: reads only.
    Version(VersionInfo),
}

#[pyclass(frozen, module = "chalkcompute._native")]
pub struct VolumeCore {
    pub(crate) store: Arc<Store>,
    pub(crate) volume: VolumeName,
    pub(crate) binding: Binding,
}

fn volume_name(name: &str) -> PyResult<VolumeName> {
    VolumeName::new(name).map_err(engine_error)
}

fn lineage_name(name: &str) -> PyResult<LineageName> {
    LineageName::new(name).map_err(engine_error)
}

fn volume_not_found(volume: &VolumeName, store: &Store) -> PyErr {
    let quoted = format!("{:?}", volume.as_str());
    new_error(
        "NotFound",
        format!(
            "volume {quoted} not found in the store at {}; create it with Volume.create({quoted}) \
             or Volume({quoted}, create_if_missing=True)",
            store.local_root().display()
        ),
    )
}

/// Opens a handle on `lineage` of volume `name`, creating the volume first
/// when it is missing and `create_if_missing` is true.
#[pyfunction]
#[pyo3(signature = (name, lineage = "main", create_if_missing = false))]
pub fn open_volume(py: Python<'_>, name: &str, lineage: &str, create_if_missing: bool) -> PyResult<VolumeCore> {
    let volume = volume_name(name)?;
    let lineage = lineage_name(lineage)?;
    let store = open_store(py)?;
    let exists = py.allow_threads(|| store.volume_exists(&volume)).map_err(engine_error)?;
    if !exists {
        if !create_if_missing {
            return Err(volume_not_found(&volume, &store));
        }
        // Another process may create it between the check and here, which is fine.
        match py.allow_threads(|| store.create_volume(&volume)) {
            Ok(_) | Err(chalk_engine::EngineError::AlreadyExists { .. }) => {}
            Err(err) => return Err(engine_error(err)),
        }
    }
    py.allow_threads(|| store.head(&volume, &lineage)).map_err(engine_error)?;
    Ok(VolumeCore { store, volume, binding: Binding::Lineage(lineage) })
}

/// Creates volume `name` with an empty first version and returns a handle on `main`.
#[pyfunction]
pub fn create_volume(py: Python<'_>, name: &str) -> PyResult<VolumeCore> {
    let volume = volume_name(name)?;
    let store = open_store(py)?;
    match py.allow_threads(|| store.create_volume(&volume)) {
        Ok(_) => Ok(VolumeCore { store, volume, binding: Binding::Lineage(LineageName::main()) }),
        Err(chalk_engine::EngineError::AlreadyExists { .. }) => Err(new_error(
            "AlreadyExists",
            format!("volume {0:?} already exists; open it with Volume({0:?})", volume.as_str()),
        )),
        Err(err) => Err(engine_error(err)),
    }
}

/// Lists the volumes of the store as `(name, latest version on main)`, by name.
#[pyfunction]
pub fn list_volumes<'py>(py: Python<'py>) -> PyResult<Vec<(String, Bound<'py, PyDict>)>> {
    let store = open_store(py)?;
    let volumes = py.allow_threads(|| store.list_volumes()).map_err(engine_error)?;
    volumes.iter().map(|v| Ok((v.name.to_string(), convert::version(py, &v.latest)?))).collect()
}

impl VolumeCore {
    /// Opens a read-only session on what this handle reads now.
    fn reader_session(&self) -> chalk_engine::Result<Session> {
        let base = match &self.binding {
            Binding::Lineage(lineage) => SessionBase::Lineage(lineage.clone()),
            Binding::Version(info) => SessionBase::Version(info.id),
        };
        self.store.open_session(&self.volume, base, Access::ReadOnly)
    }

    fn with_binding(&self, binding: Binding) -> VolumeCore {
        VolumeCore { store: self.store.clone(), volume: self.volume.clone(), binding }
    }

    fn resolve(&self, py: Python<'_>, id: &str) -> PyResult<VersionInfo> {
        py.allow_threads(|| self.store.resolve_version(&self.volume, id)).map_err(engine_error)
    }

    /// Lineage whose versions this handle lists: its own, or the pinned version's.
    fn lineage_of(&self) -> LineageName {
        match &self.binding {
            Binding::Lineage(lineage) => lineage.clone(),
            Binding::Version(info) => info.lineage.clone(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        match &self.binding {
            Binding::Lineage(lineage) => format!("lineage {lineage} of volume {}", self.volume),
            Binding::Version(info) => format!("version {} of volume {}", info.id, self.volume),
        }
    }
}

#[pymethods]
impl VolumeCore {
    #[getter]
    fn name(&self) -> String {
        self.volume.to_string()
    }

    /// The lineage of a lineage handle; `None` for a pinned version.
    #[getter]
    fn lineage(&self) -> Option<String> {
        match &self.binding {
            Binding::Lineage(lineage) => Some(lineage.to_string()),
            Binding::Version(_) => None,
        }
    }

    /// The pinned version of a read-only handle; `None` for a lineage handle.
    #[getter]
    fn pinned_version<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        match &self.binding {
            Binding::Lineage(_) => Ok(None),
            Binding::Version(info) => Ok(Some(convert::version(py, info)?)),
        }
    }

    fn delete(&self, py: Python<'_>) -> PyResult<()> {
        let mounted = mounts::live_mount_dirs(&self.store, &self.volume);
        if !mounted.is_empty() {
            return Err(new_error(
                "ChalkError",
                format!(
                    "volume {} is mounted at {}; unmount it first with `chalk volume unmount DIR`",
                    self.volume,
                    mounted.join(", ")
                ),
            ));
        }
        py.allow_threads(|| self.store.delete_volume(&self.volume)).map_err(engine_error)
    }

    fn read_file<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyBytes>> {
        let volume = self.volume.as_str();
        let (session, attr) = py
            .allow_threads(|| {
                let session = self.reader_session()?;
                let attr = session.resolve_path(path)?;
                Ok((session, attr))
            })
            .map_err(|err| engine_error_at(err, volume, path))?;
        if attr.kind != FileKind::File {
            return Err(new_error(
                "InvalidPath",
                format!("path {path:?} in volume {volume} is a {}, not a regular file", attr.kind.as_str()),
            ));
        }
        let size = usize::try_from(attr.size).map_err(|_| new_error("InvalidArgument", format!("{path:?} is too large to read whole; use open()")))?;
        PyBytes::new_with(py, size, |buffer| {
            py.allow_threads(|| read_into(&session, attr.ino, buffer)).map_err(|err| engine_error_at(err, volume, path))
        })
    }

    /// Returns the entry of one path (file, directory or symlink).
    fn stat<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyDict>> {
        let volume = self.volume.as_str();
        let entry = py
            .allow_threads(|| {
                let session = self.reader_session()?;
                let attr = session.resolve_path(path)?;
                let target = match attr.kind {
                    FileKind::Symlink => Some(session.readlink(attr.ino)?),
                    _ => None,
                };
                let names = chalk_engine::normalize_path(path)?;
                let path = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/");
                Ok(chalk_engine::PathEntry { path, attr, target })
            })
            .map_err(|err| engine_error_at(err, volume, path))?;
        convert::entry(py, &entry)
    }

    #[pyo3(signature = (path = "", recursive = false))]
    fn listdir<'py>(&self, py: Python<'py>, path: &str, recursive: bool) -> PyResult<Bound<'py, PyList>> {
        let volume = self.volume.as_str();
        let entries = py
            .allow_threads(|| {
                let session = self.reader_session()?;
                let attr = session.resolve_path(path)?;
                if attr.kind != FileKind::Directory {
                    return Ok(None);
                }
                session.walk(path, recursive).map(Some)
            })
            .map_err(|err| engine_error_at(err, volume, path))?;
        let Some(entries) = entries else {
            return Err(new_error(
                "InvalidPath",
                format!("path {path:?} in volume {volume} is not a directory; listdir takes a directory"),
            ));
        };
        let list = PyList::empty(py);
        for entry in &entries {
            list.append(convert::entry(py, entry)?)?;
        }
        Ok(list)
    }

    #[pyo3(signature = (all_lineages = false))]
    fn versions<'py>(&self, py: Python<'py>, all_lineages: bool) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let lineage = self.lineage_of();
        let versions = py
            .allow_threads(|| match all_lineages {
                true => self.store.all_versions(&self.volume),
                false => self.store.versions(&self.volume, &lineage),
            })
            .map_err(engine_error)?;
        versions.iter().map(|v| convert::version(py, v)).collect()
    }

    fn latest_version<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let info = match &self.binding {
            Binding::Lineage(lineage) => py.allow_threads(|| self.store.head(&self.volume, lineage)).map_err(engine_error)?,
            Binding::Version(info) => info.clone(),
        };
        convert::version(py, &info)
    }

    /// Finds a version by id, unique id prefix or tag.
    fn resolve_version<'py>(&self, py: Python<'py>, id: &str) -> PyResult<Bound<'py, PyDict>> {
        let info = self.resolve(py, id)?;
        convert::version(py, &info)
    }

    fn at_version(&self, py: Python<'_>, id: &str) -> PyResult<VolumeCore> {
        let info = self.resolve(py, id)?;
        Ok(self.with_binding(Binding::Version(info)))
    }

    fn with_lineage(&self, py: Python<'_>, lineage: &str) -> PyResult<VolumeCore> {
        let lineage = lineage_name(lineage)?;
        py.allow_threads(|| self.store.head(&self.volume, &lineage)).map_err(engine_error)?;
        Ok(self.with_binding(Binding::Lineage(lineage)))
    }

    fn diff<'py>(&self, py: Python<'py>, a: &str, b: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let a = self.resolve(py, a)?;
        let b = self.resolve(py, b)?;
        let changes = py.allow_threads(|| self.store.diff(&self.volume, a.id, b.id)).map_err(engine_error)?;
        changes.iter().map(|c| convert::change(py, c)).collect()
    }

    #[pyo3(signature = (version, lineage = None))]
    fn fork(&self, py: Python<'_>, version: &str, lineage: Option<&str>) -> PyResult<VolumeCore> {
        let from = self.resolve(py, version)?;
        let lineage = lineage.map(lineage_name).transpose()?;
        let (name, _) = py.allow_threads(|| self.store.fork(&self.volume, from.id, lineage)).map_err(engine_error)?;
        Ok(self.with_binding(Binding::Lineage(name)))
    }

    fn open_reader(&self, py: Python<'_>, path: &str) -> PyResult<Reader> {
        let volume = self.volume.as_str();
        let (session, attr) = py
            .allow_threads(|| {
                let session = self.reader_session()?;
                let attr = session.resolve_path(path)?;
                Ok((session, attr))
            })
            .map_err(|err| engine_error_at(err, volume, path))?;
        if attr.kind != FileKind::File {
            return Err(new_error(
                "InvalidPath",
                format!("path {path:?} in volume {volume} is a {}, not a regular file", attr.kind.as_str()),
            ));
        }
        Ok(Reader::new(session, attr.ino, attr.size, path.to_owned(), volume.to_owned()))
    }

    /// Starts a batch of writes onto this handle's lineage.
    fn begin_batch(&self, py: Python<'_>) -> PyResult<Batch> {
        let lineage = match &self.binding {
            Binding::Lineage(lineage) => lineage.clone(),
            Binding::Version(info) => {
                return Err(new_error(
                    "ReadOnly",
                    format!(
                        "version {} of volume {} is read-only; write through Volume({:?}) or fork a lineage with fork({:?})",
                        info.id, self.volume, self.volume.as_str(), info.id.to_string()
                    ),
                ))
            }
        };
        let session = py
            .allow_threads(|| self.store.open_session(&self.volume, SessionBase::Lineage(lineage), Access::Writable))
            .map_err(engine_error)?;
        Ok(Batch::new(session))
    }

    /// Publishes the writes of every live writable mount of this volume on this host.
    #[pyo3(signature = (message = None, on_conflict = "error"))]
    fn sync_mounts<'py>(&self, py: Python<'py>, message: Option<&str>, on_conflict: &str) -> PyResult<Vec<Bound<'py, PyDict>>> {
        if !matches!(on_conflict, "error" | "fork" | "ours") {
            return Err(new_error(
                "InvalidArgument",
                format!("invalid on_conflict value {on_conflict:?}; use \"error\", \"fork\" or \"ours\""),
            ));
        }
        let published = py.allow_threads(|| mounts::sync_mounts(&self.store, &self.volume, message, on_conflict))?;
        published.iter().map(|v| convert::version(py, v)).collect()
    }

    fn __repr__(&self) -> String {
        format!("<VolumeCore {}>", self.describe())
    }
}

/// Fills `buffer` from the start of file `ino`.
fn read_into(session: &Session, ino: chalk_engine::Ino, buffer: &mut [u8]) -> chalk_engine::Result<()> {
    const CHUNK_BYTES: usize = 4 << 20;
    let mut offset = 0;
    while offset < buffer.len() {
        let len = (buffer.len() - offset).min(CHUNK_BYTES);
        let data = session.read(ino, offset as u64, len as u32)?;
        if data.is_empty() {
            // The size came from the same pinned session, so this is a short file: zeros remain.
            buffer[offset..].fill(0);
            break;
        }
        buffer[offset..offset + data.len()].copy_from_slice(&data);
        offset += data.len();
    }
    Ok(())
}
