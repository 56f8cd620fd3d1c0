//! Engine errors as the exception classes of `chalkcompute.errors`.
//!
//! Every engine error maps to exactly one class; the message is the engine's,
//! which names the volume, path or version involved.

use chalk_engine::EngineError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

/// Builds an exception of class `kind` from `chalkcompute.errors`.
pub(crate) fn new_error(kind: &str, message: String) -> PyErr {
    new_error_with(kind, message, Vec::new())
}

/// Like [`new_error`]; `paths` are the conflicting paths of a `Conflict`.
pub(crate) fn new_error_with(kind: &str, message: String, paths: Vec<String>) -> PyErr {
    Python::with_gil(|py| {
        let built = py.import("chalkcompute.errors").and_then(|module| {
            let class = module.getattr(kind)?;
            if kind == "Conflict" {
                class.call1((message.clone(), paths))
            } else {
                class.call1((message.clone(),))
            }
        });
        match built {
            Ok(instance) => PyErr::from_value(instance),
            Err(import_error) => PyRuntimeError::new_err(format!("{message} (and raising chalkcompute.errors.{kind} failed: {import_error})")),
        }
    })
}

/// Name of the exception class for an engine error.
fn class_of(err: &EngineError) -> &'static str {
    match err {
        EngineError::NotFound { .. } | EngineError::NoXattr { .. } => "NotFound",
        EngineError::AlreadyExists { .. } => "AlreadyExists",
        EngineError::Conflict { .. } | EngineError::HeadMoved { .. } => "Conflict",
        EngineError::ReadOnly { .. } => "ReadOnly",
        EngineError::InvalidPath { .. }
        | EngineError::NotDirectory { .. }
        | EngineError::IsDirectory { .. }
        | EngineError::NameTooLong { .. }
        | EngineError::DirectoryNotEmpty { .. }
        | EngineError::TooManyLinks { .. } => "InvalidPath",
        EngineError::InvalidName { .. } | EngineError::InvalidArgument(_) | EngineError::TooLarge(_) => "InvalidArgument",
        EngineError::ObjectStore { .. } | EngineError::Io { .. } | EngineError::NoSpace { .. } => "StoreUnavailable",
        EngineError::CorruptSegment { .. }
        | EngineError::CorruptObject { .. }
        | EngineError::NotPermitted(_)
        | EngineError::Unsupported(_) => "ChalkError",
    }
}

/// Converts an engine error into the matching Python exception.
pub(crate) fn engine_error(err: EngineError) -> PyErr {
    let paths = match &err {
        EngineError::Conflict { paths, .. } => paths.clone(),
        _ => Vec::new(),
    };
    new_error_with(class_of(&err), err.to_string(), paths)
}

/// Converts an engine error raised while working on `path` of `volume`. The
/// errors that name only an inode number get the path in their message.
pub(crate) fn engine_error_at(err: EngineError, volume: &str, path: &str) -> PyErr {
    let message = match &err {
        EngineError::IsDirectory { .. } => format!("path {path:?} in volume {volume} is a directory, not a file"),
        EngineError::NotDirectory { .. } => format!("a parent of path {path:?} in volume {volume} is not a directory"),
        EngineError::DirectoryNotEmpty { .. } => format!("directory {path:?} in volume {volume} is not empty"),
        _ => return engine_error(err),
    };
    new_error(class_of(&err), message)
}

/// An error built without the GIL, raised as `chalkcompute.errors.<kind>` later.
pub(crate) struct SdkError {
    pub kind: &'static str,
    pub message: String,
    pub paths: Vec<String>,
}

impl SdkError {
    pub(crate) fn new(kind: &'static str, message: String) -> Self {
        SdkError { kind, message, paths: Vec::new() }
    }
}

impl From<SdkError> for PyErr {
    fn from(err: SdkError) -> PyErr {
        new_error_with(err.kind, err.message, err.paths)
    }
}
