//! Engine values as Python dicts, which the pure-Python layer turns into
//! dataclasses. Times are POSIX seconds as floats.

use chalk_engine::{Change, PathEntry, Timestamp, VersionInfo};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn seconds(time: Timestamp) -> f64 {
    time.secs as f64 + f64::from(time.nanos) / 1e9
}

pub(crate) fn version<'py>(py: Python<'py>, info: &VersionInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("id", info.id.to_string())?;
    dict.set_item("seq", info.seq)?;
    dict.set_item("parent", info.parent.map(|p| p.to_string()))?;
    dict.set_item("lineage", info.lineage.as_str())?;
    dict.set_item("created_at", seconds(info.created_at))?;
    dict.set_item("message", info.message.clone())?;
    dict.set_item("files", info.files)?;
    dict.set_item("bytes", info.bytes)?;
    Ok(dict)
}

pub(crate) fn entry<'py>(py: Python<'py>, entry: &PathEntry) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("path", entry.path.as_str())?;
    dict.set_item("size", entry.attr.size)?;
    dict.set_item("type", entry.attr.kind.as_str())?;
    dict.set_item("mtime", seconds(entry.attr.mtime))?;
    dict.set_item("mode", entry.attr.perm)?;
    dict.set_item("target", entry.target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()))?;
    Ok(dict)
}

pub(crate) fn change<'py>(py: Python<'py>, change: &Change) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("path", change.path.as_str())?;
    dict.set_item("kind", change.kind.as_str())?;
    dict.set_item("old_path", change.old_path.clone())?;
    dict.set_item("type", change.file_kind.as_str())?;
    dict.set_item("old_size", change.old_size)?;
    dict.set_item("new_size", change.new_size)?;
    Ok(dict)
}
