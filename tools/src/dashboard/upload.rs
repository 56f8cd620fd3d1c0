//! `POST /api/volumes/{volume}/upload`: files and folders from the browser
//! as one new version.
//!
//! The body is `multipart/form-data`. Each file part (field `file`) may be
//! preceded by a text part `path` that gives its path below `dir`. A file
//! part without one uses its file name as the path. An optional text part
//! `message` sets the version's message.
//!
//! The handler streams each part into a blocking worker that owns one
//! writable session on the lineage head; after the last part the worker
//! syncs once, so an upload creates exactly one version. Any failure (a
//! rejected path, a body over the limit, a client that goes away) drops the
//! session unsynced, which discards everything the upload wrote.

use std::io::{self, Read};

use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use chalk_engine::object_store::ConditionalWrites;
use chalk_engine::{normalize_path, Access, EngineError, LineageName, Owner, SessionBase, Store, SyncOutcome, VolumeName};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::api::parse_volume;
use super::error::ApiError;
use super::SharedState;
use crate::output::version_json;

/// Mode of uploaded files; browsers send no permissions.
const UPLOAD_FILE_MODE: u32 = 0o644;
/// Messages buffered between the request and the worker.
const CHANNEL_MESSAGES: usize = 8;

#[derive(Deserialize)]
pub struct UploadQuery {
    /// Lineage whose head the upload builds on (default `main`).
    lineage: Option<String>,
    /// Directory of the volume that the uploaded paths are relative to.
    dir: Option<String>,
    message: Option<String>,
}

enum Message {
    /// A new file at this path; its data follows.
    Start(String),
    Data(Bytes),
    Finish,
    /// The last message: publish everything as one version.
    Commit(String),
}

struct Published {
    version: Value,
}

/// Checks the `dir` query parameter the way the engine will.
fn check_upload_dir(dir: &str) -> Result<(), ApiError> {
    normalize_path(dir).map_err(|err| ApiError::bad_request(format!("rejected upload dir {dir:?}: {err}")))?;
    Ok(())
}

/// Checks an upload path the way the engine will, and joins it to `dir`.
fn upload_path(dir: &str, path: &str) -> Result<String, ApiError> {
    let bad = |err: chalk_engine::EngineError| ApiError::bad_request(format!("rejected upload path {path:?}: {err}"));
    let mut names = normalize_path(dir).map_err(bad)?;
    let file_names = normalize_path(path).map_err(bad)?;
    if file_names.is_empty() {
        return Err(ApiError::bad_request(format!("rejected upload path {path:?}: it names no file; give a file name")));
    }
    if path.ends_with('/') {
        return Err(ApiError::bad_request(format!(
            "rejected upload path {path:?}: it ends in '/', which names a directory; put the file name after the last '/'"
        )));
    }
    names.extend(file_names);
    Ok(names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/"))
}

/// Reads one file's data from the worker's channel until `Finish`.
struct PartReader<'a> {
    receiver: &'a mut mpsc::Receiver<Message>,
    chunk: Bytes,
    finished: bool,
}

impl Read for PartReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.finished {
                return Ok(0);
            }
            match self.receiver.blocking_recv() {
                Some(Message::Data(chunk)) => self.chunk = chunk,
                Some(Message::Finish) => self.finished = true,
                Some(Message::Start(_) | Message::Commit(_)) => {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "a new part started before this file ended"))
                }
                None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the upload ended in the middle of a file")),
            }
        }
        let n = self.chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

/// Writes the files the channel brings into one session, and syncs on `Commit`.
fn run_worker(store: std::sync::Arc<Store>, volume: VolumeName, lineage: LineageName, mut receiver: mpsc::Receiver<Message>) -> Result<Published, ApiError> {
    let session = store.open_session(&volume, SessionBase::Lineage(lineage.clone()), Access::Writable)?;
    let owner = Owner::current();
    loop {
        match receiver.blocking_recv() {
            Some(Message::Start(path)) => {
                let mut reader = PartReader { receiver: &mut receiver, chunk: Bytes::new(), finished: false };
                session
                    .write_file_from(&path, &mut reader, UPLOAD_FILE_MODE, owner)
                    .map_err(|err| ApiError::from(err).context(format!("failed to write {path}")))?;
            }
            Some(Message::Commit(message)) => {
                return match sync_retrying(&session, &message)? {
                    SyncOutcome::Published(version) => {
                        tracing::info!(volume = %volume, lineage = %lineage, version = %version.id, "dashboard upload published");
                        if matches!(session.store().objects().conditional_writes(), Ok(ConditionalWrites::Ignored)) {
                            crate::mount_cmd::log_single_writer_warning_once();
                        }
                        Ok(Published { version: version_json(&version) })
                    }
                    SyncOutcome::NothingToPublish { .. } => Err(ApiError::bad_request("the upload changed nothing, so no version was created")),
                };
            }
            Some(Message::Data(_) | Message::Finish) => return Err(ApiError::internal("upload data arrived outside a file")),
            // The request failed; dropping the session discards its writes.
            None => return Err(ApiError::bad_request("the upload ended before it was complete; nothing was published")),
        }
    }
}

/// Times an upload syncs again after another writer published between its
/// rebase and its head write, as the Python SDK's batches do.
const COMMIT_ATTEMPTS: u32 = 16;

/// Syncs the upload's session. A head that moved during the sync is tried
/// again, which rebases onto it. Overlapping paths are a conflict, and the
/// dropped session publishes nothing.
fn sync_retrying(session: &chalk_engine::Session, message: &str) -> Result<SyncOutcome, ApiError> {
    let options = chalk_engine::SyncOptions {
        message: Some(message.to_owned()),
        // The session ends with the request.
        retry: chalk_engine::RetryAdvice::Repeat("upload again".to_owned()),
        ..chalk_engine::SyncOptions::default()
    };
    let mut attempt = 1;
    loop {
        match session.sync_with(&options) {
            Err(EngineError::HeadMoved { .. }) if attempt < COMMIT_ATTEMPTS => {
                // A short random pause keeps uploads that collided from colliding again.
                std::thread::sleep(std::time::Duration::from_millis(1 + rand::random::<u64>() % 20));
                attempt += 1;
            }
            Err(EngineError::Conflict { head, paths, .. }) => {
                tracing::info!(volume = %session.volume(), head, paths = paths.len(), "dashboard upload conflicts");
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!(
                        "the upload conflicts with version {head}, published while it ran, which changed the same paths ({}); \
                         nothing was published; upload again to replace them",
                        paths.join(", ")
                    ),
                ));
            }
            outcome => return Ok(outcome?),
        }
    }
}

fn multipart_error(err: MultipartError, limit: u64) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return too_large(limit);
    }
    ApiError::new(err.status(), format!("invalid upload body: {}", err.body_text()))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the upload is larger than the limit of {limit} bytes; restart `chalk dashboard` with a larger --max-upload-bytes"),
    )
}

/// Feeds the multipart parts to the worker; returns the number of files and bytes.
async fn send_parts(multipart: &mut Multipart, dir: &str, limit: u64, sender: &mpsc::Sender<Message>, message: &mut String) -> Result<(u64, u64), ApiError> {
    // A send fails only when the worker has dropped its receiver, which it does only on return.
    // The caller then reports the worker's error.
    let stopped = || ApiError::internal("the upload worker stopped");
    let mut pending_path: Option<String> = None;
    let (mut files, mut bytes) = (0u64, 0u64);
    while let Some(mut field) = multipart.next_field().await.map_err(|e| multipart_error(e, limit))? {
        let name = field.name().unwrap_or("").to_owned();
        match name.as_str() {
            "path" => {
                let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
                pending_path = Some(upload_path(dir, &text)?);
            }
            "message" => *message = field.text().await.map_err(|e| multipart_error(e, limit))?,
            "file" => {
                let path = match pending_path.take() {
                    Some(path) => path,
                    None => upload_path(dir, field.file_name().unwrap_or(""))?,
                };
                sender.send(Message::Start(path)).await.map_err(|_| stopped())?;
                while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
                    bytes += chunk.len() as u64;
                    sender.send(Message::Data(chunk)).await.map_err(|_| stopped())?;
                }
                sender.send(Message::Finish).await.map_err(|_| stopped())?;
                files += 1;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown upload field {other:?}; send `file` parts, each after an optional `path` part, and an optional `message`"
                )))
            }
        }
    }
    if files == 0 {
        return Err(ApiError::bad_request("the upload has no files; send at least one `file` part"));
    }
    Ok((files, bytes))
}

/// `POST /api/volumes/{volume}/upload?lineage=&dir=&message=`.
pub async fn upload(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Result<Json<Value>, ApiError> {
    let limit = state.max_upload_bytes;
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large(limit));
    }
    let volume = parse_volume(&volume)?;
    let lineage = LineageName::new(query.lineage.as_deref().filter(|l| !l.is_empty()).unwrap_or(LineageName::MAIN))?;
    let dir = query.dir.unwrap_or_default();
    check_upload_dir(&dir)?;

    let (sender, receiver) = mpsc::channel(CHANNEL_MESSAGES);
    let store = state.store.clone();
    let worker = tokio::task::spawn_blocking({
        let (volume, lineage) = (volume.clone(), lineage.clone());
        move || run_worker(store, volume, lineage, receiver)
    });
    let mut message = query.message.unwrap_or_default();
    let sent = send_parts(&mut multipart, &dir, limit, &sender, &mut message).await;
    let (files, bytes) = match sent {
        Ok(counts) => counts,
        Err(err) => {
            drop(sender);
            // A worker that failed first has the real cause (an engine error on a path).
            return Err(match worker.await? {
                Err(worker_err) if err.status == StatusCode::INTERNAL_SERVER_ERROR => worker_err,
                _ => err,
            });
        }
    };
    if message.is_empty() {
        message = format!("upload of {files} files from the dashboard");
    }
    let committed = sender.send(Message::Commit(message)).await;
    drop(sender);
    let outcome = worker.await?;
    if committed.is_err() && outcome.is_ok() {
        return Err(ApiError::internal("the upload worker stopped before the commit"));
    }
    let published = outcome?;
    state.metrics.uploads.inc();
    state.metrics.uploaded_bytes.inc_by(bytes);
    Ok(Json(json!({ "volume": volume.to_string(), "lineage": lineage.to_string(), "files": files, "bytes": bytes, "version": published.version })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_path_joins_and_rejects() {
        assert_eq!(upload_path("data", "a/b.txt").unwrap(), "data/a/b.txt");
        assert_eq!(upload_path("", "/x").unwrap(), "x");
        assert!(upload_path("", "../etc/passwd").is_err());
        assert!(upload_path("a/..", "x").is_err());
        assert!(upload_path("", "").is_err());
        assert!(upload_path("", &"n".repeat(256)).is_err());
        assert!(upload_path("", "a\0b").is_err());
    }
}
