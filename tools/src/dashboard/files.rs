//! File bytes: downloads of files (streamed, with `Content-Length` and
//! single range requests), downloads of directories as tar streams, and raw
//! reads for image previews.
//!
//! A blocking task reads from the engine and sends chunks through a bounded
//! channel, so memory per download stays at a few chunks whatever the file
//! size, and a client that goes away stops the reader at its next send.

use std::io::{self, Read, Write};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use chalk_engine::{Attr, FileKind, Session, VersionInfo};
use tokio::sync::mpsc;

use super::api::{canonical_path, open_version, parse_volume, VersionQuery};
use super::auth::FILE_CSP;
use super::error::{blocking, ApiError};
use super::SharedState;

/// Bytes read from the engine per chunk.
const CHUNK_BYTES: u64 = 1 << 20;
/// Chunks buffered between the engine reader and the connection.
const CHANNEL_CHUNKS: usize = 4;
/// Bytes of tar output gathered before one send.
const TAR_FLUSH_BYTES: usize = 256 * 1024;

type ChunkSender = mpsc::Sender<io::Result<Bytes>>;

/// Raster image types the raw endpoint serves inline, by extension, with the
/// magic bytes each must start with. SVG is not here because it can carry script.
const INLINE_IMAGES: &[(&str, &str, &[u8])] = &[
    ("png", "image/png", b"\x89PNG\r\n\x1a\n"),
    ("jpg", "image/jpeg", b"\xff\xd8\xff"),
    ("jpeg", "image/jpeg", b"\xff\xd8\xff"),
    ("gif", "image/gif", b"GIF8"),
    ("webp", "image/webp", b"RIFF"),
    ("bmp", "image/bmp", b"BM"),
    ("ico", "image/x-icon", b"\x00\x00\x01\x00"),
];

/// Returns the image type and magic bytes of a path by its extension, if it previews inline.
pub fn image_type(path: &str) -> Option<(&'static str, &'static [u8])> {
    let extension = path.rsplit_once('.')?.1.to_ascii_lowercase();
    INLINE_IMAGES.iter().find(|(ext, _, _)| *ext == extension).map(|(_, mime, magic)| (*mime, *magic))
}

/// `Content-Disposition: attachment` with an ASCII fallback name and the
/// UTF-8 name (RFC 6266).
fn attachment(name: &str) -> HeaderValue {
    let fallback: String =
        name.chars().map(|c| if c.is_ascii_graphic() && !"\"\\/".contains(c) || c == ' ' { c } else { '_' }).collect();
    let encoded: String = name
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    HeaderValue::from_str(&format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"))
        .expect("ASCII-only header value")
}

/// A requested byte range, inclusive at both ends as in the `Range` header.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: send the whole file.
    Whole,
    Satisfiable { first: u64, last: u64 },
    Unsatisfiable,
}

/// Parses a `Range` header for a file of `size` bytes. Multiple ranges and
/// malformed headers are ignored, which RFC 9110 allows, so the whole file is sent.
pub fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else { return RangeRequest::Whole };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((start, end)) = spec.trim().split_once('-') else { return RangeRequest::Whole };
    let (start, end) = (start.trim(), end.trim());
    if start.is_empty() {
        // A suffix range: the last N bytes.
        let Ok(suffix) = end.parse::<u64>() else { return RangeRequest::Whole };
        if suffix == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Satisfiable { first: size.saturating_sub(suffix), last: size - 1 };
    }
    let Ok(first) = start.parse::<u64>() else { return RangeRequest::Whole };
    let last = match end {
        "" => u64::MAX,
        end => match end.parse::<u64>() {
            Ok(last) if last >= first => last,
            _ => return RangeRequest::Whole,
        },
    };
    if first >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Satisfiable { first, last: last.min(size - 1) }
}

fn chunk_stream(receiver: mpsc::Receiver<io::Result<Bytes>>) -> Body {
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    Body::from_stream(stream)
}

/// Sends `len` bytes of a file from `offset` into the channel.
fn send_file_range(session: &Session, attr: &Attr, offset: u64, len: u64, sender: &ChunkSender) -> io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let want = (end - at).min(CHUNK_BYTES) as u32;
        let data = session.read(attr.ino, at, want).map_err(io::Error::other)?;
        if data.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("file ended at byte {at} of {end}")));
        }
        at += data.len() as u64;
        if sender.blocking_send(Ok(Bytes::from(data))).is_err() {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the client closed the connection"));
        }
    }
    Ok(())
}

/// Streams part of a file on a blocking task; a read error ends the body with an error.
fn spawn_file_reader(state: &SharedState, session: Session, attr: Attr, offset: u64, len: u64, path: String) -> Body {
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let metrics = state.clone();
    tokio::task::spawn_blocking(move || {
        match send_file_range(&session, &attr, offset, len, &sender) {
            Ok(()) => {
                metrics.metrics.downloaded_bytes.inc_by(len);
            }
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
            Err(err) => {
                tracing::error!(volume = %session.volume(), path, error = %err, "download failed");
                let _ = sender.blocking_send(Err(err));
            }
        }
    });
    chunk_stream(receiver)
}

fn etag(info: &VersionInfo, attr: &Attr) -> String {
    format!("\"{}-{}\"", info.id, attr.ino)
}

struct Opened {
    session: Session,
    info: VersionInfo,
    attr: Attr,
    path: String,
    /// True when the request named a version, so the response never changes.
    pinned: bool,
}

async fn open_path(state: &SharedState, volume: String, query: VersionQuery) -> Result<Opened, ApiError> {
    let store: Arc<chalk_engine::Store> = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let path = canonical_path(query.path.as_deref())?;
        let pinned = query.version.as_deref().is_some_and(|v| !v.is_empty());
        let (session, info) = open_version(&store, &volume, &query)?;
        let attr = session.resolve_path(&path)?;
        Ok(Opened { session, info, attr, path, pinned })
    })
    .await
}

/// `GET /api/volumes/{volume}/download?version=&lineage=&path=`: a file as
/// an attachment (with range requests), or a directory as a tar stream.
pub async fn download(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<VersionQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let opened = open_path(&state, volume, query).await?;
    match opened.attr.kind {
        FileKind::File => Ok(file_response(&state, opened, &headers, Disposition::Attachment)),
        FileKind::Directory => Ok(tar_response(&state, opened)),
        FileKind::Symlink => {
            let (path, target) = blocking(move || {
                let target = opened.session.readlink(opened.attr.ino)?;
                Ok((opened.path, String::from_utf8_lossy(&target).into_owned()))
            })
            .await?;
            Err(ApiError::bad_request(format!("{path} is a symbolic link to {target}; download its target instead")))
        }
        other => Err(ApiError::bad_request(format!("{} is a {} node, which has no data to download", opened.path, other.as_str()))),
    }
}

/// `GET /api/volumes/{volume}/raw?version=&path=`: a file for the app's image
/// preview. A raster image whose first bytes match its extension is sent
/// inline with its image type; anything else goes out as an attachment.
pub async fn raw(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<VersionQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let opened = open_path(&state, volume, query).await?;
    if opened.attr.kind != FileKind::File {
        return Err(ApiError::bad_request(format!("{} is a {}, not a regular file", opened.path, opened.attr.kind.as_str())));
    }
    let (opened, disposition) = blocking(move || {
        let disposition = match image_type(&opened.path) {
            Some((mime, magic)) if opened.session.read(opened.attr.ino, 0, 16)?.starts_with(magic) => Disposition::InlineImage(mime),
            _ => Disposition::Attachment,
        };
        Ok((opened, disposition))
    })
    .await?;
    Ok(file_response(&state, opened, &headers, disposition))
}

enum Disposition {
    Attachment,
    InlineImage(&'static str),
}

fn file_response(state: &SharedState, opened: Opened, headers: &HeaderMap, disposition: Disposition) -> Response {
    let size = opened.attr.size;
    let tag = etag(&opened.info, &opened.attr);
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // If-Range with another validator requests the whole file.
    let if_range_matches = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()).is_none_or(|v| v == tag);
    let range = if if_range_matches { parse_range(range_header, size) } else { RangeRequest::Whole };
    let name = opened.path.rsplit('/').next().unwrap_or(&opened.path).to_owned();

    // The content of a path in a version never changes, but a request
    // without a version reads the head of a lineage, which moves.
    let cache_control = if opened.pinned { "private, max-age=31536000, immutable" } else { "no-cache" };
    let mut builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &tag)
        .header(header::CONTENT_SECURITY_POLICY, FILE_CSP)
        .header(header::CACHE_CONTROL, cache_control);
    builder = match disposition {
        Disposition::Attachment => builder
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_DISPOSITION, attachment(&name)),
        Disposition::InlineImage(mime) => builder.header(header::CONTENT_TYPE, mime).header(header::CONTENT_DISPOSITION, "inline"),
    };
    let (status, offset, len) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, size),
        RangeRequest::Satisfiable { first, last } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {first}-{last}/{size}"));
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        RangeRequest::Unsatisfiable => {
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::from(format!("range {} is outside the file's {size} bytes\n", range_header.unwrap_or(""))))
                .expect("valid response");
        }
    };
    let body = spawn_file_reader(state, opened.session, opened.attr, offset, len, opened.path);
    builder.status(status).header(header::CONTENT_LENGTH, len).body(body).expect("valid response")
}

/// A `Write` that gathers bytes and sends them into the channel in chunks.
struct ChannelWriter {
    sender: ChunkSender,
    buffer: Vec<u8>,
}

impl ChannelWriter {
    fn send_buffer(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client closed the connection"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= TAR_FLUSH_BYTES {
            self.send_buffer()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffer()
    }
}

/// A `Read` over one file of a session.
struct FileReader<'a> {
    session: &'a Session,
    attr: &'a Attr,
    offset: u64,
}

impl Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.offset >= self.attr.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (self.attr.size - self.offset).min(buf.len() as u64).min(CHUNK_BYTES) as u32;
        let data = self.session.read(self.attr.ino, self.offset, want).map_err(io::Error::other)?;
        buf[..data.len()].copy_from_slice(&data);
        self.offset += data.len() as u64;
        Ok(data.len())
    }
}

/// Writes the tree under `opened.path` as a tar archive whose entries start
/// with the directory's name (the volume's name for the root).
fn write_tar(opened: &Opened, top: &str, writer: ChannelWriter) -> io::Result<u64> {
    let mut builder = tar::Builder::new(writer);
    let mut bytes = 0;
    let entries = opened.session.walk(&opened.path, true).map_err(io::Error::other)?;
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(u32::from(opened.attr.perm));
    header.set_mtime(opened.attr.mtime.secs.max(0) as u64);
    header.set_size(0);
    builder.append_data(&mut header, format!("{top}/"), io::empty())?;
    for entry in entries {
        let relative = entry.path.strip_prefix(&opened.path).unwrap_or(&entry.path).trim_start_matches('/');
        let name = format!("{top}/{relative}");
        let mut header = tar::Header::new_gnu();
        header.set_mode(u32::from(entry.attr.perm));
        header.set_mtime(entry.attr.mtime.secs.max(0) as u64);
        header.set_uid(u64::from(entry.attr.uid));
        header.set_gid(u64::from(entry.attr.gid));
        match entry.attr.kind {
            FileKind::Directory => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder.append_data(&mut header, format!("{name}/"), io::empty())?;
            }
            FileKind::File => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_size(entry.attr.size);
                let reader = FileReader { session: &opened.session, attr: &entry.attr, offset: 0 };
                builder.append_data(&mut header, &name, reader)?;
                bytes += entry.attr.size;
            }
            FileKind::Symlink => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                let target = String::from_utf8_lossy(entry.target.as_deref().unwrap_or_default()).into_owned();
                builder.append_link(&mut header, &name, target)?;
            }
            // FIFOs, sockets and device nodes have no data; tar could hold
            // them, but a browser download is no place to create device nodes.
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => {}
        }
    }
    let mut writer = builder.into_inner()?;
    writer.flush()?;
    Ok(bytes)
}

fn tar_response(state: &SharedState, opened: Opened) -> Response {
    let top = match opened.path.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_owned(),
        _ => opened.session.volume().to_string(),
    };
    let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
    let shared = state.clone();
    let archive_top = top.clone();
    tokio::task::spawn_blocking(move || {
        let writer = ChannelWriter { sender: sender.clone(), buffer: Vec::with_capacity(TAR_FLUSH_BYTES) };
        match write_tar(&opened, &archive_top, writer) {
            Ok(bytes) => {
                shared.metrics.downloaded_bytes.inc_by(bytes);
            }
            Err(err) if err.kind() == io::ErrorKind::BrokenPipe => {}
            Err(err) => {
                tracing::error!(volume = %opened.session.volume(), path = opened.path, error = %err, "tar download failed");
                let _ = sender.blocking_send(Err(err));
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-tar")
        .header(header::CONTENT_DISPOSITION, attachment(&format!("{top}.tar")))
        .header(header::CONTENT_SECURITY_POLICY, FILE_CSP)
        .body(chunk_stream(receiver))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_forms() {
        assert_eq!(parse_range(Some("bytes=0-9"), 100), RangeRequest::Satisfiable { first: 0, last: 9 });
        assert_eq!(parse_range(Some("bytes=90-"), 100), RangeRequest::Satisfiable { first: 90, last: 99 });
        assert_eq!(parse_range(Some("bytes=-10"), 100), RangeRequest::Satisfiable { first: 90, last: 99 });
        assert_eq!(parse_range(Some("bytes=-500"), 100), RangeRequest::Satisfiable { first: 0, last: 99 });
        assert_eq!(parse_range(Some("bytes=50-500"), 100), RangeRequest::Satisfiable { first: 50, last: 99 });
    }

    #[test]
    fn range_unsatisfiable_and_ignored() {
        assert_eq!(parse_range(Some("bytes=100-"), 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse_range(None, 100), RangeRequest::Whole);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), RangeRequest::Whole);
        assert_eq!(parse_range(Some("bytes=9-2"), 100), RangeRequest::Whole);
        assert_eq!(parse_range(Some("items=0-1"), 100), RangeRequest::Whole);
    }

    #[test]
    fn attachment_escapes_names() {
        let value = attachment("a \"b\"/é.txt");
        assert_eq!(value.to_str().unwrap(), "attachment; filename=\"a _b___.txt\"; filename*=UTF-8''a%20%22b%22%2F%C3%A9.txt");
    }

    #[test]
    fn image_types_exclude_svg() {
        assert_eq!(image_type("x/photo.PNG").map(|t| t.0), Some("image/png"));
        assert!(image_type("drawing.svg").is_none());
        assert!(image_type("noext").is_none());
    }
}
