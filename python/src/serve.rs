//! Serving one mount of a volume in this process, for sandboxes.
//!
//! `chalkcompute` starts one helper process per sandbox volume
//! (`python -m chalkcompute._mount`), which calls [`serve_mount`]. The mount
//! is registered under `$CHALK_HOME/run/` exactly as `chalk volume mount`
//! registers its mounts (`mount-<pid>.json` and a control socket
//! `mount-<pid>.sock`), so `chalk volume sync` and `vol.sync()` reach it.
//!
//! Lifetime: the helper requests SIGTERM from the kernel when its parent ends
//! (`PR_SET_PDEATHSIG`). On SIGTERM, SIGINT or SIGHUP it removes its
//! registration, unmounts and discards the session's unsynced writes.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chalk_engine::{Access, LineageName, OnConflict, Session, SessionBase, SyncOptions, SyncOutcome, VolumeName};
use parking_lot::Mutex;
use pyo3::prelude::*;

use crate::errors::{engine_error, new_error};
use crate::open_store;

/// Signal number of the first stop signal received, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_stop_signal(signal: libc::c_int) {
    let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

fn io_error(context: &str, path: &Path, err: std::io::Error) -> PyErr {
    new_error("StoreUnavailable", format!("{context} {} failed: {err}", path.display()))
}

/// Writes the registration file atomically: a temporary file, then a rename.
fn write_registration(path: &Path, registration: &serde_json::Value) -> std::io::Result<()> {
    let temporary = path.with_extension("json.tmp");
    let mut file = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)?;
    file.write_all(format!("{registration:#}\n").as_bytes())?;
    drop(file);
    fs::rename(&temporary, path)
}

fn parse_on_conflict(value: Option<&str>) -> Result<OnConflict, String> {
    match value {
        None | Some("error") => Ok(OnConflict::Error),
        Some("fork") => Ok(OnConflict::Fork),
        Some("ours") => Ok(OnConflict::Ours),
        Some(other) => Err(format!("invalid on_conflict value {other:?}; use error, fork or ours")),
    }
}

/// Replies to one control request, with the same messages as `chalk volume mount`.
fn handle_request(line: &str, session: &Session, registration: &Mutex<serde_json::Value>, json: &Path) -> serde_json::Value {
    let request: serde_json::Value = match serde_json::from_str(line) {
        Ok(request) => request,
        Err(err) => return serde_json::json!({"ok": false, "error": format!("invalid control request: {err}")}),
    };
    match request["op"].as_str() {
        Some("status") => {
            let mut reply = registration.lock().clone();
            reply["ok"] = serde_json::Value::Bool(true);
            reply
        }
        Some("sync") => {
            let on_conflict = match parse_on_conflict(request["on_conflict"].as_str()) {
                Ok(on_conflict) => on_conflict,
                Err(error) => return serde_json::json!({"ok": false, "error": error}),
            };
            let options = SyncOptions { message: request["message"].as_str().map(str::to_owned), on_conflict, ..SyncOptions::default() };
            match session.sync_with(&options) {
                Ok(SyncOutcome::Published(version)) => {
                    let id = version.id.to_string();
                    let mut registration = registration.lock();
                    registration["base_version"] = serde_json::Value::String(id.clone());
                    if let Err(err) = write_registration(json, &registration) {
                        eprintln!("chalkcompute mount: updating {} failed: {err}", json.display());
                    }
                    serde_json::json!({"ok": true, "published": id})
                }
                Ok(SyncOutcome::NothingToPublish { base }) => {
                    serde_json::json!({"ok": true, "nothing_to_publish": true, "base": base.id.to_string()})
                }
                Err(err) => serde_json::json!({"ok": false, "error": err.to_string()}),
            }
        }
        _ => serde_json::json!({"ok": false, "error": format!("unknown control request {line:?}; use op sync or status")}),
    }
}

fn serve_client(stream: UnixStream, session: &Session, registration: &Mutex<serde_json::Value>, json: &Path) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_request(line.trim(), session, registration, json);
        writeln!(writer, "{reply}")?;
    }
}

/// Mounts `volume` at `dir` and serves it until a stop signal arrives.
///
/// The session starts on `version` when given (its first sync forks a new
/// lineage), else on the head of `lineage` (default `main`). Prints `ready`
/// on standard output once the mount is usable and registered.
#[pyfunction]
///
/// With `watch_stdin`, the end of standard input also stops the mount: the
/// parent holds the pipe's other end, so its death closes the pipe even in
/// cases where the parent-death signal is not delivered.
#[pyo3(signature = (volume, dir, lineage = None, version = None, writable = true, watch_stdin = false))]
pub fn serve_mount(
    py: Python<'_>,
    volume: &str,
    dir: PathBuf,
    lineage: Option<&str>,
    version: Option<&str>,
    writable: bool,
    watch_stdin: bool,
) -> PyResult<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, record_stop_signal as *const () as libc::sighandler_t) };
    }

    let store = open_store(py)?;
    let volume = VolumeName::new(volume).map_err(engine_error)?;
    let base = match (version, lineage) {
        (Some(id), _) => SessionBase::Version(store.resolve_version(&volume, id).map_err(engine_error)?.id),
        (None, Some(name)) => SessionBase::Lineage(LineageName::new(name).map_err(engine_error)?),
        (None, None) => SessionBase::Lineage(LineageName::main()),
    };
    let access = if writable { Access::Writable } else { Access::ReadOnly };
    let session = Arc::new(store.open_session(&volume, base, access).map_err(engine_error)?);

    let run_dir = store.local_root().join("run");
    fs::create_dir_all(&run_dir).map_err(|err| io_error("creating", &run_dir, err))?;
    fs::set_permissions(&run_dir, fs::Permissions::from_mode(0o700)).map_err(|err| io_error("setting mode 0700 on", &run_dir, err))?;
    let pid = std::process::id();
    let socket = run_dir.join(format!("mount-{pid}.sock"));
    let json = run_dir.join(format!("mount-{pid}.json"));
    let _ = fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(|err| io_error("creating the control socket", &socket, err))?;
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).map_err(|err| io_error("setting mode 0600 on", &socket, err))?;

    let mount_point = fs::canonicalize(&dir).map_err(|err| io_error("resolving the mount point", &dir, err))?;
    let options = chalk_fused::MountOptions {
        read_only: session.is_read_only(),
        // SAFETY: geteuid cannot fail and touches no memory.
        allow_other: unsafe { libc::geteuid() } == 0,
        threads: 0,
        fs_name: format!("chalk:{volume}"),
    };
    let handle = chalk_fused::mount(Arc::clone(&session), &mount_point, &options)
        .map_err(|err| new_error("StoreUnavailable", format!("mounting volume {volume} at {} failed: {err}", mount_point.display())))?;

    let registration = Arc::new(Mutex::new(serde_json::json!({
        "pid": pid,
        "volume": volume.as_str(),
        "dir": mount_point,
        "read_only": session.is_read_only(),
        "base_version": session.base_version().id.to_string(),
        "socket": socket,
        "log": null,
    })));
    write_registration(&json, &registration.lock()).map_err(|err| io_error("writing", &json, err))?;

    {
        let session = Arc::clone(&session);
        let registration = Arc::clone(&registration);
        let json = json.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let session = Arc::clone(&session);
                let registration = Arc::clone(&registration);
                let json = json.clone();
                std::thread::spawn(move || {
                    if let Err(err) = serve_client(stream, &session, &registration, &json) {
                        eprintln!("chalkcompute mount: control connection failed: {err}");
                    }
                });
            }
        });
    }

    if watch_stdin {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(std::io::Read::read(&mut stdin, &mut sink), Ok(n) if n > 0) {}
            let _ = STOP_SIGNAL.compare_exchange(0, libc::SIGTERM, Ordering::SeqCst, Ordering::SeqCst);
        });
    }

    println!("ready");
    std::io::stdout().flush().map_err(|err| new_error("ChalkError", format!("writing to standard output failed: {err}")))?;

    py.allow_threads(|| {
        while STOP_SIGNAL.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    // Registration first, so no client reaches a mount that is going away.
    for path in [&json, &socket] {
        let _ = fs::remove_file(path);
    }
    let unmounted = handle.unmount();
    session.discard();
    unmounted.map_err(|err| new_error("StoreUnavailable", format!("unmounting {} failed: {err}", mount_point.display())))
}

/// Sends a sync request to the mount whose control socket is `socket`.
/// Returns the version published, or `None` when it had nothing to publish.
#[pyfunction]
#[pyo3(signature = (socket, message = None, on_conflict = "error"))]
pub fn sync_mount_socket<'py>(
    py: Python<'py>,
    socket: PathBuf,
    message: Option<&str>,
    on_conflict: &str,
) -> PyResult<Option<Bound<'py, pyo3::types::PyDict>>> {
    let store = open_store(py)?;
    let published = py.allow_threads(|| crate::mounts::sync_one(&store, &socket, message, on_conflict))?;
    published.map(|info| crate::convert::version(py, &info)).transpose()
}
