//! Native part of the `chalkcompute` Python SDK: volume handles, batches of
//! writes, readers and syncs of live mounts, calling the engine directly.
//!
//! The pure-Python package `chalkcompute` wraps these classes; this module
//! returns plain dicts, lists and bytes and raises the exception classes of
//! `chalkcompute.errors`.
//!
//! Invariants:
//! - Every engine call runs with the GIL released (`Python::allow_threads`),
//!   so other Python threads run during I/O. Nothing that needs the GIL is
//!   touched inside those closures.
//! - One store is opened per `(CHALK_HOME, CHALK_STORE)` pair and shared by
//!   every handle of the process, as sessions of one store share its caches.

mod batch;
mod convert;
mod errors;
mod mounts;
mod reader;
mod serve;
mod volume;

use std::path::PathBuf;
use std::sync::Arc;

use chalk_engine::{Store, StoreConfig};
use parking_lot::Mutex;
use pyo3::prelude::*;

/// Stores opened by this process, by local root and object store URL.
static STORES: Mutex<Vec<(PathBuf, String, Arc<Store>)>> = Mutex::new(Vec::new());

/// Opens the store that `CHALK_HOME` and `CHALK_STORE` name now, or returns
/// the one this process already opened for them.
pub(crate) fn open_store(py: Python<'_>) -> PyResult<Arc<Store>> {
    let config = StoreConfig::from_env().map_err(errors::engine_error)?;
    // The lock is taken with the GIL released: opening a store does I/O, and
    // a thread waiting for the lock while holding the GIL would deadlock.
    let opened: chalk_engine::Result<Arc<Store>> = py.allow_threads(|| {
        let mut stores = STORES.lock();
        if let Some((_, _, store)) =
            stores.iter().find(|(root, url, _)| *root == config.local_root && *url == config.object_store_url)
        {
            return Ok(store.clone());
        }
        let store = Store::open(config.clone())?;
        stores.push((config.local_root.clone(), config.object_store_url.clone(), store.clone()));
        Ok(store)
    });
    opened.map_err(|err| {
        errors::new_error(
            "StoreUnavailable",
            format!(
                "failed to open the store at {} ({}): {err}; check CHALK_HOME and CHALK_STORE",
                config.local_root.display(),
                config.object_store_url
            ),
        )
    })
}

/// Location of the current store as `(local_root, object_store_url)`.
#[pyfunction]
fn store_location(py: Python<'_>) -> PyResult<(String, String)> {
    let store = open_store(py)?;
    Ok((store.local_root().display().to_string(), store.config().object_store_url.clone()))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<volume::VolumeCore>()?;
    m.add_class::<batch::Batch>()?;
    m.add_class::<reader::Reader>()?;
    m.add_function(wrap_pyfunction!(volume::open_volume, m)?)?;
    m.add_function(wrap_pyfunction!(volume::create_volume, m)?)?;
    m.add_function(wrap_pyfunction!(volume::list_volumes, m)?)?;
    m.add_function(wrap_pyfunction!(store_location, m)?)?;
    m.add_function(wrap_pyfunction!(serve::serve_mount, m)?)?;
    m.add_function(wrap_pyfunction!(serve::sync_mount_socket, m)?)?;
    Ok(())
}
