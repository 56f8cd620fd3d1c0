//! `Reader`: random-access reads of one file of one version. The session is
//! pinned when the reader opens, so later publishes never change what it reads.

use chalk_engine::{Ino, Session};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::engine_error_at;

/// Largest read served by one call; larger requests return short reads.
const READ_MAX_BYTES: usize = 16 << 20;

#[pyclass(frozen, module = "chalkcompute._native")]
pub struct Reader {
    session: Session,
    ino: Ino,
    size: u64,
    path: String,
    volume: String,
}

impl Reader {
    pub(crate) fn new(session: Session, ino: Ino, size: u64, path: String, volume: String) -> Self {
        Reader { session, ino, size, path, volume }
    }
}

#[pymethods]
impl Reader {
    /// Size of the file in bytes.
    #[getter]
    fn size(&self) -> u64 {
        self.size
    }

    /// Version id the reader reads from.
    #[getter]
    fn version(&self) -> String {
        self.session.base_version().id.to_string()
    }

    /// Reads up to `len` bytes at `offset`; returns fewer only at the end of
    /// the file or above 16 MiB per call.
    fn read_at<'py>(&self, py: Python<'py>, offset: u64, len: usize) -> PyResult<Bound<'py, PyBytes>> {
        let len = len.min(READ_MAX_BYTES);
        if offset >= self.size || len == 0 {
            return Ok(PyBytes::new(py, b""));
        }
        let data = py
            .allow_threads(|| self.session.read(self.ino, offset, len as u32))
            .map_err(|err| engine_error_at(err, &self.volume, &self.path))?;
        Ok(PyBytes::new(py, &data))
    }
}
