//! Syncing the live mounts of a volume from the SDK.
//!
//! `chalk volume mount` registers each mount under `$CHALK_HOME/run/` as
//! `mount-<pid>.json` (volume, mount point, `read_only`, control socket) and
//! serves one JSON request per line on the socket:
//! `{"op":"sync","message":...,"on_conflict":...}` returns
//! `{"ok":true,"published":"<version>"}`,
//! `{"ok":true,"nothing_to_publish":true,...}` or `{"ok":false,"error":"..."}`.
//! This module is a client of that protocol.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chalk_engine::{Store, VersionInfo, VolumeName};

use crate::errors::SdkError;

/// How long one mount may take to reply to a sync request.
const SYNC_TIMEOUT: Duration = Duration::from_secs(600);

/// A live mount as its registration file describes it.
struct Mount {
    pid: u32,
    volume: String,
    dir: String,
    read_only: bool,
    socket: PathBuf,
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Registrations of live mounts of `volume`, by mount point. Files left by
/// dead processes are ignored; the CLI removes them.
fn live_mounts(store: &Store, volume: &VolumeName) -> Vec<Mount> {
    let Ok(entries) = fs::read_dir(store.local_root().join("run")) else { return Vec::new() };
    let mut mounts = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("mount-") && name.ends_with(".json")) {
            continue;
        }
        let Ok(bytes) = fs::read(entry.path()) else { continue };
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        if record["volume"].as_str() != Some(volume.as_str()) {
            continue;
        }
        let (Some(pid), Some(socket)) = (record["pid"].as_u64(), record["socket"].as_str()) else { continue };
        let pid = pid as u32;
        if !process_alive(pid) {
            continue;
        }
        mounts.push(Mount {
            pid,
            volume: volume.to_string(),
            dir: record["dir"].as_str().unwrap_or_default().to_owned(),
            read_only: record["read_only"].as_bool().unwrap_or(true),
            socket: PathBuf::from(socket),
        });
    }
    mounts.sort_by(|a, b| a.dir.cmp(&b.dir));
    mounts
}

/// Mount points of the live mounts of `volume` on this host.
pub(crate) fn live_mount_dirs(store: &Store, volume: &VolumeName) -> Vec<String> {
    live_mounts(store, volume).into_iter().map(|m| m.dir).collect()
}

fn request(mount: &Mount, request: &serde_json::Value) -> Result<serde_json::Value, String> {
    let stream = UnixStream::connect(&mount.socket)
        .map_err(|err| format!("connecting to mount process {} at {} failed: {err}", mount.pid, mount.socket.display()))?;
    stream.set_read_timeout(Some(SYNC_TIMEOUT)).map_err(|err| err.to_string())?;
    let mut writer = stream.try_clone().map_err(|err| err.to_string())?;
    writeln!(writer, "{request}").map_err(|err| format!("sending to mount process {} failed: {err}", mount.pid))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|err| format!("reading from mount process {} failed: {err}", mount.pid))?;
    serde_json::from_str(&line).map_err(|err| format!("invalid response from mount process {}: {err}: {line:?}", mount.pid))
}

/// Paths named by a conflict message of the engine: the list in brackets
/// after "changed the same paths".
fn conflict_paths(message: &str) -> Vec<String> {
    let Some(start) = message.find("changed the same paths (") else { return Vec::new() };
    let rest = &message[start + "changed the same paths (".len()..];
    let Some(end) = rest.find(')') else { return Vec::new() };
    rest[..end].split(", ").filter(|p| !p.is_empty()).map(str::to_owned).collect()
}

/// Sends one sync request to `mount` and returns the version it published,
/// or `None` when it had nothing to publish.
fn sync_mount(store: &Store, mount: &Mount, body: &serde_json::Value) -> Result<Option<VersionInfo>, SdkError> {
    let reply = request(mount, body)
        .map_err(|message| SdkError::new("StoreUnavailable", format!("sync of the mount at {} failed: {message}", mount.dir)))?;
    if reply["ok"].as_bool() != Some(true) {
        let error = reply["error"].as_str().unwrap_or("the mount process gave no reason").to_owned();
        let paths = conflict_paths(&error);
        let kind = if error.starts_with("sync conflicts with") || error.contains("another writer published first") {
            "Conflict"
        } else {
            "ChalkError"
        };
        return Err(SdkError { kind, message: format!("sync of the mount at {} failed: {error}", mount.dir), paths });
    }
    let Some(id) = reply["published"].as_str() else { return Ok(None) };
    let volume = VolumeName::new(&mount.volume).map_err(|err| SdkError::new("ChalkError", err.to_string()))?;
    store.resolve_version(&volume, id).map(Some).map_err(|err| SdkError::new("StoreUnavailable", err.to_string()))
}

fn sync_body(message: Option<&str>, on_conflict: &str) -> serde_json::Value {
    serde_json::json!({"op": "sync", "message": message, "on_conflict": on_conflict})
}

/// Syncs the mount whose control socket is `socket`.
pub(crate) fn sync_one(store: &Store, socket: &Path, message: Option<&str>, on_conflict: &str) -> Result<Option<VersionInfo>, SdkError> {
    let registration = socket.with_extension("json");
    let bytes = fs::read(&registration).map_err(|err| {
        SdkError::new("NotFound", format!("mount registration {} not found ({err}); the mount has ended", registration.display()))
    })?;
    let record: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|err| SdkError::new("ChalkError", format!("invalid mount registration {}: {err}", registration.display())))?;
    let mount = Mount {
        pid: record["pid"].as_u64().unwrap_or_default() as u32,
        volume: record["volume"].as_str().unwrap_or_default().to_owned(),
        dir: record["dir"].as_str().unwrap_or_default().to_owned(),
        read_only: record["read_only"].as_bool().unwrap_or(true),
        socket: socket.to_owned(),
    };
    if mount.read_only {
        return Ok(None);
    }
    sync_mount(store, &mount, &sync_body(message, on_conflict))
}

/// Syncs every live writable mount of `volume` and returns the versions
/// published, by mount point. Every mount is tried; the first failure is
/// raised after the others were synced.
pub(crate) fn sync_mounts(
    store: &Store,
    volume: &VolumeName,
    message: Option<&str>,
    on_conflict: &str,
) -> Result<Vec<VersionInfo>, SdkError> {
    let body = sync_body(message, on_conflict);
    let mut published = Vec::new();
    let mut failures: Vec<SdkError> = Vec::new();
    for mount in live_mounts(store, volume).into_iter().filter(|m| !m.read_only) {
        match sync_mount(store, &mount, &body) {
            Ok(Some(info)) => published.push(info),
            Ok(None) => {}
            Err(err) => failures.push(err),
        }
    }
    match failures.into_iter().next() {
        Some(mut first) if !published.is_empty() => {
            let ids: Vec<String> = published.iter().map(|v| v.id.to_string()).collect();
            first.message.push_str(&format!(" (other mounts published {})", ids.join(", ")));
            Err(first)
        }
        Some(first) => Err(first),
        None => Ok(published),
    }
}
