//! The S3 object store (`s3://bucket/prefix`), built on `aws-sdk-s3`.
//!
//! Configuration comes from the standard AWS chain of `aws-config`: region
//! from `AWS_REGION` or the profile, endpoint from `AWS_ENDPOINT_URL` (or
//! `AWS_ENDPOINT_URL_S3`), credentials from the environment, profiles, SSO,
//! web identity, the container endpoint or instance metadata. A custom
//! endpoint switches to path-style addressing, which S3-compatible servers
//! such as Garage need. [`S3Settings`] reads the `CHALK_S3_*` settings.
//!
//! Integrity:
//! - Every upload request carries `x-amz-checksum-crc32` (per part for a
//!   multipart upload), so the server rejects bytes damaged on the way.
//! - Every object also carries the CRC32 of its whole contents in the user
//!   metadata `chalk-crc32`. A whole-object download (`get`, `get_to_file`)
//!   checks it before returning anything. A mismatch is retried like a
//!   network error, and reported as [`EngineError::CorruptObject`] once the
//!   attempts are used up.
//! - Ranged reads return unchecked bytes: the engine checks the CRC of each
//!   segment record it reads.
//!
//! Requests: at most `concurrency` are in flight per store, every request
//! has connect, first-byte and attempt timeouts, stalled downloads are cut,
//! and failed attempts are retried with exponential backoff and full jitter
//! up to `max_attempts`. The engine API is synchronous, so the store owns a
//! small tokio runtime and blocks on it.
//!
//! Conditional writes: `put_if_absent` sends `If-None-Match: *`. Some
//! S3-compatible stores accept that header and ignore it (Garage 2.5 does).
//! Before its first `put_if_absent`, the store reads the probe record
//! [`PROBE_RECORD_KEY`]. When the record is missing, the store probes: it
//! creates one new key twice with `If-None-Match: *`, and the second create
//! must fail. It then records the result, so clients that only read never write. On a store that ignores
//! conditional writes, `put_if_absent` checks for the key and then writes it,
//! which is safe only while one host at a time publishes to a lineage
//! (single-writer mode).

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{validate_key, ConditionalWrites, IncompleteUpload, ListPage, ObjectMeta, ObjectStore, SINGLE_WRITER_WARNING};
use crate::cache::parse_size;
use crate::error::{EngineError, Result};
use crate::metrics::Metrics;

/// Key, under the store's prefix, of the recorded result of the conditional-write probe.
pub const PROBE_RECORD_KEY: &str = "store/conditional-writes";

/// Prefix of the keys that the probe creates and deletes again.
const PROBE_KEY_PREFIX: &str = "store/probes/";

/// User metadata key of the whole-object CRC32 (sent as `x-amz-meta-chalk-crc32`).
const CRC_METADATA_KEY: &str = "chalk-crc32";

/// S3 rejects multipart parts smaller than this, except the last one.
const PART_MIN_BYTES: u64 = 5 << 20;

/// S3 allows at most this many parts in one multipart upload.
const PARTS_MAX: u64 = 10_000;

/// Page-aligned buffer of a ranged GET's body, so that the disk cache can
/// write its blocks with `O_DIRECT`. Buffers come from a small pool of
/// mappings: a fresh mapping costs a page fault and a zeroed page per 4 KiB,
/// which was the largest cost of the fetch threads in a cold read. Fresh
/// mappings ask for 2 MiB pages, which cut that cost where the kernel grants them.
struct ResponseBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
    /// CRC32s of the buffer's pieces, when asked for: the piece size, the
    /// CRCs of the full pieces so far and the state of the current one.
    /// Hashing each chunk right after copying it finds it in the CPU cache.
    pieces: Option<(usize, Vec<u32>, crc32fast::Hasher)>,
}

// SAFETY: the buffer is plain owned memory, written only through `&mut self`.
unsafe impl Send for ResponseBuf {}
// SAFETY: `&self` only reads.
unsafe impl Sync for ResponseBuf {}

/// Idle response buffers, as (capacity, address) pairs.
static IDLE_RESPONSE_BUFFERS: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
/// Idle response buffers kept for reuse; more are unmapped.
const IDLE_RESPONSE_BUFFERS_MAX: usize = 8;
/// Buffer capacities are multiples of this, so that buffers are reused
/// across requests. The memory tier counts a block of this size for each,
/// so a larger granule would hold memory that the limit does not see.
const RESPONSE_BUF_GRANULE: usize = 1 << 20;
/// Buffers start at a multiple of this: the size of a transparent huge
/// page on x86-64 and on arm64 with 4 KiB pages.
const HUGE_PAGE_BYTES: usize = 2 << 20;

impl ResponseBuf {
    fn with_capacity(len: usize) -> std::result::Result<Self, Failure> {
        let cap = len.max(1).next_multiple_of(RESPONSE_BUF_GRANULE);
        {
            let mut idle = IDLE_RESPONSE_BUFFERS.lock();
            if let Some(at) = idle.iter().position(|(c, _)| *c == cap) {
                let (_, addr) = idle.swap_remove(at);
                let ptr = std::ptr::NonNull::new(addr as *mut u8).expect("pooled buffers are mapped");
                return Ok(ResponseBuf { ptr, cap, len: 0, pieces: None });
            }
        }
        let ptr = map_huge_aligned(cap)
            .map_err(|err| Failure::transient(format!("failed to map a {cap}-byte response buffer: {err}")))?;
        Ok(ResponseBuf { ptr, cap, len: 0, pieces: None })
    }

    /// Makes the buffer hash each `piece` bytes as they are added.
    fn hash_pieces(&mut self, piece: usize) {
        assert!(piece > 0, "a piece holds at least one byte");
        assert_eq!(self.len, 0, "pieces are hashed from an empty buffer");
        self.pieces = Some((piece, Vec::new(), crc32fast::Hasher::new()));
    }

    /// CRC32s of the pieces, the last one possibly shorter, when asked for.
    fn piece_crcs(&mut self) -> Option<Vec<u32>> {
        let (piece, mut crcs, hasher) = self.pieces.take()?;
        if self.len % piece != 0 {
            crcs.push(hasher.finalize());
        }
        Some(crcs)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(self.len + data.len() <= self.cap, "response buffer overflow");
        // SAFETY: the destination lies inside the mapping and cannot overlap the borrowed `data`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), data.len()) };
        let start = self.len;
        self.len += data.len();
        if let Some((piece, crcs, hasher)) = self.pieces.as_mut() {
            let (piece, mut at) = (*piece, start);
            // SAFETY: `start..self.len` was written just above.
            let copied = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), data.len()) };
            let mut rest = copied;
            while !rest.is_empty() {
                let take = (piece - at % piece).min(rest.len());
                hasher.update(&rest[..take]);
                at += take;
                rest = &rest[take..];
                if at % piece == 0 {
                    crcs.push(std::mem::replace(hasher, crc32fast::Hasher::new()).finalize());
                }
            }
        }
    }
}

/// Maps `cap` bytes (a multiple of [`RESPONSE_BUF_GRANULE`]) of zeroed
/// anonymous memory at an address aligned to [`HUGE_PAGE_BYTES`], requests
/// huge pages there and faults the whole range in. Each whole 2 MiB of the
/// range can get a huge page, and the rest gets 4 KiB pages, as does all of
/// it without transparent huge pages. Unmapping `cap` bytes at the result frees it.
fn map_huge_aligned(cap: usize) -> std::io::Result<std::ptr::NonNull<u8>> {
    debug_assert_eq!(cap % RESPONSE_BUF_GRANULE, 0);
    let span = cap + HUGE_PAGE_BYTES;
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let raw = unsafe {
        libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
    let (head, tail) = (aligned - start, start + span - (aligned + cap));
    // SAFETY: both ranges lie inside the mapping made above and outside `aligned..aligned + cap`.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + cap) as *mut libc::c_void, tail);
        }
    }
    let ptr = aligned as *mut libc::c_void;
    // Both calls are hints: a kernel without huge pages, or older than 5.14
    // for MADV_POPULATE_WRITE, leaves the pages to be faulted in on first write.
    // SAFETY: madvise on the range mapped above.
    unsafe {
        libc::madvise(ptr, cap, libc::MADV_HUGEPAGE);
        libc::madvise(ptr, cap, libc::MADV_POPULATE_WRITE);
    }
    Ok(std::ptr::NonNull::new(ptr.cast()).expect("mmap never returns null"))
}

impl AsRef<[u8]> for ResponseBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by `extend_from_slice`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for ResponseBuf {
    fn drop(&mut self) {
        let mut idle = IDLE_RESPONSE_BUFFERS.lock();
        if idle.len() < IDLE_RESPONSE_BUFFERS_MAX {
            idle.push((self.cap, self.ptr.as_ptr() as usize));
            return;
        }
        drop(idle);
        // SAFETY: ptr and cap are those of a mapping made by `with_capacity`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.cap) };
    }
}

/// Tuning of the S3 store. Every field has a `CHALK_S3_*` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Settings {
    /// Requests in flight at once, per store (`CHALK_S3_CONCURRENCY`, default 16).
    pub concurrency: usize,
    /// Objects larger than this are uploaded in parts of this size
    /// (`CHALK_S3_PART_SIZE`, default 8 MiB, at least 5 MiB).
    pub part_bytes: u64,
    /// Attempts per request before it fails (`CHALK_S3_MAX_ATTEMPTS`, default 6).
    pub max_attempts: u32,
    /// Limit on opening a connection (`CHALK_S3_CONNECT_TIMEOUT_MS`, default 3000).
    pub connect_timeout: Duration,
    /// Limit on the first byte of a response, counted from the start of the
    /// request (`CHALK_S3_READ_TIMEOUT_MS`, default 30000).
    pub read_timeout: Duration,
    /// Limit on one attempt up to its response headers
    /// (`CHALK_S3_ATTEMPT_TIMEOUT_MS`, default 60000).
    pub attempt_timeout: Duration,
    /// First retry delay; each later one doubles, up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            concurrency: 16,
            part_bytes: 8 << 20,
            max_attempts: 6,
            connect_timeout: Duration::from_millis(3000),
            read_timeout: Duration::from_millis(30_000),
            attempt_timeout: Duration::from_millis(60_000),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

impl S3Settings {
    /// Reads the `CHALK_S3_*` settings, using the default for each one that is unset.
    pub fn from_env() -> Result<Self> {
        let mut settings = S3Settings::default();
        if let Some(value) = env_setting("CHALK_S3_CONCURRENCY") {
            settings.concurrency = parse_number("CHALK_S3_CONCURRENCY", &value, 1, 1024)? as usize;
        }
        if let Some(value) = env_setting("CHALK_S3_PART_SIZE") {
            let bytes = parse_size(&value).map_err(|e| invalid_setting("CHALK_S3_PART_SIZE", &value, &e))?;
            if bytes < PART_MIN_BYTES {
                return Err(invalid_setting("CHALK_S3_PART_SIZE", &value, "S3 needs parts of at least 5 MiB"));
            }
            settings.part_bytes = bytes;
        }
        if let Some(value) = env_setting("CHALK_S3_MAX_ATTEMPTS") {
            settings.max_attempts = parse_number("CHALK_S3_MAX_ATTEMPTS", &value, 1, 100)? as u32;
        }
        for (name, field) in [
            ("CHALK_S3_CONNECT_TIMEOUT_MS", &mut settings.connect_timeout),
            ("CHALK_S3_READ_TIMEOUT_MS", &mut settings.read_timeout),
            ("CHALK_S3_ATTEMPT_TIMEOUT_MS", &mut settings.attempt_timeout),
        ] {
            if let Some(value) = env_setting(name) {
                *field = Duration::from_millis(parse_number(name, &value, 1, 3_600_000)?);
            }
        }
        Ok(settings)
    }
}

fn env_setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.trim().is_empty())
}

fn invalid_setting(name: &str, value: &str, reason: &str) -> EngineError {
    EngineError::InvalidArgument(format!("{name}={value:?} is invalid: {reason}"))
}

fn parse_number(name: &str, value: &str, min: u64, max: u64) -> Result<u64> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid_setting(name, value, &format!("expected a whole number from {min} to {max}"))),
    }
}

/// One endpoint, region and static key that replace the AWS environment,
/// for tools and tests that talk to one known server.
#[derive(Clone)]
pub struct S3Endpoint {
    pub endpoint_url: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// Bucket and key prefix of an `s3://bucket/prefix` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Location {
    pub bucket: String,
    /// Empty, or ends with `/`.
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix` (a trailing `/` is optional).
    pub fn parse(url: &str) -> Result<Self> {
        let invalid = |reason: &str| {
            EngineError::InvalidArgument(format!(
                "object store URL {url:?} {reason}; use s3://bucket or s3://bucket/prefix"
            ))
        };
        let rest = url.strip_prefix("s3://").ok_or_else(|| invalid("does not start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(invalid("names an invalid bucket (3 to 63 characters of a-z, 0-9, '.' and '-')"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() {
            validate_key(prefix).map_err(|_| invalid("has an invalid prefix"))?;
        }
        let prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        Ok(S3Location { bucket: bucket.to_owned(), prefix })
    }
}

/// Contents of the probe record.
#[derive(Serialize, Deserialize)]
struct ProbeRecord {
    /// `honoured` or `ignored`.
    conditional_writes: String,
    probed_at_unix_ms: u64,
}

/// Result of a create with `If-None-Match: *`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Conditional {
    Created,
    /// The key exists: another writer created it first.
    Exists,
    /// The store rejected the header with 501 Not Implemented.
    Unsupported,
}

/// Cause of one failed attempt, and whether another attempt may succeed.
#[derive(Debug)]
struct Failure {
    kind: FailureKind,
    /// The whole cause, for the final error and debug logs.
    detail: String,
    /// One short line, for the warning that a request is retried.
    summary: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FailureKind {
    /// Network errors, timeouts, throttling and server errors.
    Transient,
    /// Bytes that do not match their checksum; retried, then reported as corruption.
    Corrupt,
    /// Errors another attempt cannot fix: access denied, missing bucket, bad request.
    Permanent,
}

impl Failure {
    fn transient(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Failure { kind: FailureKind::Transient, summary: detail.clone(), detail }
    }

    fn corrupt(detail: impl Into<String>) -> Self {
        let detail = detail.into();
        Failure { kind: FailureKind::Corrupt, summary: detail.clone(), detail }
    }

    /// Returns the failure of a response body that broke off while it was read.
    fn body(error: &(dyn std::error::Error + 'static)) -> Self {
        Failure {
            kind: FailureKind::Transient,
            detail: format!("response body failed: {}", DisplayErrorContext(error)),
            summary: format!("response body failed: {}", root_cause(error)),
        }
    }

    /// Classifies an SDK error. `status` is the HTTP status when a response arrived.
    fn from_sdk<E, R>(error: &SdkError<E, R>, status: Option<u16>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
    {
        let detail = describe(error, status);
        let summary = summarize(error, status);
        let kind = match error {
            SdkError::ConstructionFailure(_) => FailureKind::Permanent,
            SdkError::TimeoutError(_) | SdkError::ResponseError(_) => FailureKind::Transient,
            SdkError::DispatchFailure(failure) if failure.is_user() => FailureKind::Permanent,
            SdkError::DispatchFailure(_) => FailureKind::Transient,
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or_default();
                match status {
                    Some(408 | 409 | 429) | Some(500..=599) => FailureKind::Transient,
                    _ if matches!(code, "SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable") => {
                        FailureKind::Transient
                    }
                    _ => FailureKind::Permanent,
                }
            }
            _ => FailureKind::Transient,
        };
        Failure { kind, detail, summary }
    }
}

/// Describes an SDK error in a few words: the HTTP status and S3 error code
/// of a response, else the innermost cause, as in "connection refused".
fn summarize<E, R>(error: &SdkError<E, R>, status: Option<u16>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    match error {
        SdkError::TimeoutError(_) => "request timed out".to_owned(),
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("no error code");
            match status {
                Some(status) => format!("HTTP {status} {code}"),
                None => code.to_owned(),
            }
        }
        SdkError::ResponseError(_) => format!("invalid response: {}", root_cause(error)),
        _ => root_cause(error),
    }
}

/// Returns the message of the last error in the source chain of `error`.
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Describes an SDK error in one line: the HTTP status, the S3 error code and the cause chain.
fn describe<E, R>(error: &SdkError<E, R>, status: Option<u16>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let mut text = String::new();
    if let Some(status) = status {
        text.push_str(&format!("HTTP {status}: "));
    }
    match error {
        SdkError::TimeoutError(_) => text.push_str("request timed out"),
        _ => text.push_str(&DisplayErrorContext(error).to_string()),
    }
    text
}

/// HTTP status of the response that an SDK error carries, if any.
fn status_of<E>(error: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    error.raw_response().map(|response| response.status().as_u16())
}

/// Formats a CRC32 as the base64 of its big-endian bytes, as `x-amz-checksum-crc32` expects.
fn crc_header(crc: u32) -> String {
    aws_smithy_types::base64::encode(crc.to_be_bytes())
}

fn crc_metadata(crc: u32) -> String {
    format!("{crc:08x}")
}

/// State shared by the store and the tasks it spawns.
struct Inner {
    client: Client,
    location: S3Location,
    url: String,
    settings: S3Settings,
    permits: Semaphore,
    /// Where retries are counted, once the store that opened this one attaches it.
    metrics: std::sync::OnceLock<Arc<Metrics>>,
}

/// Object store in an S3 bucket, under an optional key prefix.
pub struct S3Store {
    /// `Some` until drop. Dropping a runtime inside another runtime panics,
    /// so `Drop` shuts it down in the background instead.
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
    /// The probe's result, once this process has it.
    conditional_writes: Mutex<Option<ConditionalWrites>>,
}

impl S3Store {
    /// Opens `s3://bucket/prefix` with the AWS configuration of the environment
    /// and the `CHALK_S3_*` settings. Sends no request: a wrong endpoint or
    /// missing credentials show up on the first request.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, S3Settings::from_env()?)
    }

    pub fn open_with(url: &str, settings: S3Settings) -> Result<Self> {
        Self::open_inner(url, settings, None)
    }

    /// Opens `s3://bucket/prefix` on one endpoint with a static key, reading
    /// nothing from the AWS environment.
    pub fn open_at(url: &str, settings: S3Settings, endpoint: &S3Endpoint) -> Result<Self> {
        Self::open_inner(url, settings, Some(endpoint))
    }

    fn open_inner(url: &str, settings: S3Settings, endpoint: Option<&S3Endpoint>) -> Result<Self> {
        let location = S3Location::parse(url)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chalk-s3")
            // hyper writes request bodies with writev, which raises SIGPIPE
            // when the server resets the connection.
            .on_thread_start(crate::block_sigpipe_on_this_thread)
            .enable_all()
            .build()
            .map_err(|e| EngineError::ObjectStore { url: url.to_owned(), detail: format!("failed to start the S3 runtime: {e}") })?;

        let timeouts = TimeoutConfig::builder()
            .connect_timeout(settings.connect_timeout)
            .read_timeout(settings.read_timeout)
            .operation_attempt_timeout(settings.attempt_timeout)
            .build();
        // Retries happen in this module, which also retries failed checksums
        // and broken response bodies; SDK retries would multiply the attempts.
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled().grace_period(Duration::from_secs(10)).build(),
            );
        // The region comes from the environment or the AWS profile only. The
        // default chain would ask the EC2 instance metadata service last,
        // which off EC2 costs a timeout and names no S3 endpoint anyway.
        let region = aws_config::meta::region::RegionProviderChain::first_try(
            aws_config::environment::EnvironmentVariableRegionProvider::new(),
        )
        .or_else(aws_config::profile::ProfileFileRegionProvider::new());
        loader = loader.region(region);
        if let Some(endpoint) = endpoint {
            let key = Credentials::new(&endpoint.access_key_id, &endpoint.secret_access_key, None, None, "chalk-static");
            loader = loader
                .endpoint_url(&endpoint.endpoint_url)
                .region(Region::new(endpoint.region.clone()))
                .credentials_provider(key);
        }

        let sdk_config = block_on_runtime(&runtime, loader.load());
        if sdk_config.region().is_none() {
            return Err(EngineError::InvalidArgument(format!(
                "no AWS region is configured for {url}; set AWS_REGION (Garage uses the region `garage`)"
            )));
        }
        let custom_endpoint = sdk_config.endpoint_url().is_some() || env_setting("AWS_ENDPOINT_URL_S3").is_some();
        let config = aws_sdk_s3::config::Builder::from(&sdk_config)
            .force_path_style(custom_endpoint)
            // This module computes, sends and checks every checksum itself.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();

        let inner = Inner {
            client: Client::from_conf(config),
            url: format!("s3://{}/{}", location.bucket, location.prefix),
            location,
            permits: Semaphore::new(settings.concurrency),
            settings,
            metrics: std::sync::OnceLock::new(),
        };
        tracing::debug!(url = %inner.url, path_style = custom_endpoint, "opened S3 object store");
        Ok(S3Store { runtime: Some(runtime), inner: Arc::new(inner), conditional_writes: Mutex::new(None) })
    }

    pub fn settings(&self) -> &S3Settings {
        &self.inner.settings
    }

    /// Runs `future` to completion on the store's runtime. From inside
    /// another tokio runtime, where blocking on a runtime panics, it blocks a
    /// separate thread instead.
    fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        block_on_runtime(self.runtime.as_ref().expect("the runtime lives until drop"), future)
    }

    /// Runs `future` as a task of the store's runtime and waits for its
    /// result. A ranged GET's body arrives in many chunks. The runtime
    /// thread that reads the socket then also copies each chunk, and the
    /// caller is woken once, not once per chunk as with `block_on`.
    fn run_as_task<T: Send + 'static>(&self, request: &str, future: impl Future<Output = Result<T>> + Send + 'static) -> Result<T> {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        runtime.spawn(async move {
            let _ = done.send(future.await);
        });
        result.recv().unwrap_or_else(|_| {
            Err(EngineError::ObjectStore {
                url: self.inner.url.clone(),
                detail: format!("the {request} task ended without a result; the S3 runtime stopped or the task panicked"),
            })
        })
    }

    /// Runs a ranged GET as a task of the runtime.
    fn get_range_task(&self, key: &str, offset: u64, len: u64, piece: Option<usize>) -> Result<ResponseBuf> {
        let (inner, key) = (Arc::clone(&self.inner), key.to_owned());
        self.run_as_task("ranged GET", async move { inner.get_range(&key, offset, len, piece).await })
    }

    /// Creates `key` with `If-None-Match: *`, whatever the probe found.
    fn put_conditional(&self, key: &str, data: &[u8]) -> Result<Conditional> {
        validate_key(key)?;
        let body = Bytes::copy_from_slice(data);
        self.block_on(self.inner.put_conditional(key, body))
    }

    /// Returns whether an object exists at `key`.
    fn exists(&self, key: &str) -> Result<bool> {
        validate_key(key)?;
        self.block_on(self.inner.exists(key))
    }

    /// Finds out whether the store honours `If-None-Match: *`, from the probe
    /// record or, when there is none yet, by probing and recording the result.
    fn probe(&self) -> Result<ConditionalWrites> {
        if let Some(bytes) = self.get(PROBE_RECORD_KEY)? {
            let record: ProbeRecord = serde_json::from_slice(&bytes).map_err(|e| EngineError::CorruptObject {
                key: PROBE_RECORD_KEY.to_owned(),
                detail: format!("invalid probe record: {e}"),
            })?;
            return match record.conditional_writes.as_str() {
                "honoured" => Ok(ConditionalWrites::Honoured),
                "ignored" => Ok(ConditionalWrites::Ignored),
                other => Err(EngineError::CorruptObject {
                    key: PROBE_RECORD_KEY.to_owned(),
                    detail: format!("unknown probe answer {other:?}"),
                }),
            };
        }

        // Create one new key twice: a store that honours the header refuses the second create.
        let key = format!("{PROBE_KEY_PREFIX}{}", ulid::Ulid::new());
        let answer = match self.put_conditional(&key, b"first")? {
            Conditional::Created => match self.put_conditional(&key, b"second")? {
                Conditional::Exists => ConditionalWrites::Honoured,
                Conditional::Created | Conditional::Unsupported => ConditionalWrites::Ignored,
            },
            // A store that rejects the header outright has no conditional writes either.
            Conditional::Unsupported => ConditionalWrites::Ignored,
            Conditional::Exists => {
                return Err(EngineError::ObjectStore {
                    url: self.url(),
                    detail: format!("the new probe key {key} already exists; retry the command"),
                })
            }
        };
        if let Err(err) = self.delete(&key) {
            tracing::warn!(key = %key, error = %err, "failed to delete the conditional-write probe key");
        }

        let record = ProbeRecord {
            conditional_writes: match answer {
                ConditionalWrites::Honoured => "honoured".into(),
                ConditionalWrites::Ignored => "ignored".into(),
            },
            probed_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        };
        self.put(PROBE_RECORD_KEY, &serde_json::to_vec(&record).expect("serializable"))?;
        tracing::info!(url = %self.url(), conditional_writes = %record.conditional_writes, "probed the object store for conditional writes");
        Ok(answer)
    }
}

/// Runs `future` on `runtime`, from a separate thread when the caller is
/// itself inside a tokio runtime (where `Runtime::block_on` panics).
fn block_on_runtime<F>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    if tokio::runtime::Handle::try_current().is_err() {
        return runtime.block_on(future);
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| runtime.block_on(future))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl Drop for S3Store {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Inner {
    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.location.prefix)
    }

    fn error(&self, detail: String) -> EngineError {
        EngineError::ObjectStore { url: self.url.clone(), detail }
    }

    /// Runs `attempt` until it succeeds, fails for good or uses up the
    /// attempts, sleeping an exponential, fully jittered delay in between.
    async fn retry<T, F, Fut>(&self, operation: &'static str, key: &str, attempt: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = std::result::Result<T, Failure>>,
    {
        self.retry_warning_once(operation, key, &AtomicBool::new(false), attempt).await
    }

    /// [`retry`](Self::retry), where `warned` is shared by the requests of
    /// one object (the parts of a multipart upload). The first failed
    /// attempt among them logs a WARN with a short cause, and every failed
    /// attempt logs the whole cause at DEBUG, so that an outage does not
    /// flood the log. The error returned keeps the whole cause.
    async fn retry_warning_once<T, F, Fut>(&self, operation: &'static str, key: &str, warned: &AtomicBool, mut attempt: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = std::result::Result<T, Failure>>,
    {
        let mut number = 1;
        loop {
            let failure = match attempt(number).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            let retry = failure.kind != FailureKind::Permanent && number < self.settings.max_attempts;
            if !retry {
                let detail = format!("{operation} {key} failed after {number} attempt(s): {}", failure.detail);
                return Err(match failure.kind {
                    FailureKind::Corrupt => EngineError::CorruptObject { key: key.to_owned(), detail },
                    FailureKind::Transient | FailureKind::Permanent => self.error(detail),
                });
            }
            if let Some(metrics) = self.metrics.get() {
                metrics.record_object_retry(operation);
            }
            let delay = backoff(&self.settings, number);
            tracing::debug!(
                url = %self.url, operation, key, attempt = number, delay_ms = delay.as_millis() as u64,
                error = %failure.detail, "object store request failed; retrying"
            );
            if !warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    url = %self.url, operation, key, attempt = number, max_attempts = self.settings.max_attempts,
                    error = %failure.summary, "object store request failed; retrying, and logging further failures for this object at DEBUG"
                );
            }
            tokio::time::sleep(delay).await;
            number += 1;
        }
    }

    async fn permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.permits.acquire().await.expect("the request semaphore is never closed")
    }

    async fn put_single(&self, key: &str, body: Bytes) -> Result<()> {
        let full_key = self.full_key(key);
        let crc = crc32fast::hash(&body);
        self.retry("PUT", key, |_| {
            let request = self
                .client
                .put_object()
                .bucket(&self.location.bucket)
                .key(&full_key)
                .checksum_crc32(crc_header(crc))
                .metadata(CRC_METADATA_KEY, crc_metadata(crc))
                .body(ByteStream::from(body.clone()));
            async move {
                let _permit = self.permit().await;
                request.send().await.map(|_| ()).map_err(|e| Failure::from_sdk(&e, status_of(&e)))
            }
        })
        .await
    }

    async fn put_conditional(&self, key: &str, body: Bytes) -> Result<Conditional> {
        let full_key = self.full_key(key);
        let crc = crc32fast::hash(&body);
        // Set once an attempt was sent. A failed attempt may still have
        // created the object, so a later 412 may be this writer's own success.
        let mut maybe_created = false;
        let created = self
            .retry("conditional PUT", key, |_| {
                let request = self
                    .client
                    .put_object()
                    .bucket(&self.location.bucket)
                    .key(&full_key)
                    .if_none_match("*")
                    .checksum_crc32(crc_header(crc))
                    .metadata(CRC_METADATA_KEY, crc_metadata(crc))
                    .body(ByteStream::from(body.clone()));
                let earlier_attempt_may_have_created = maybe_created;
                let outcome = async move {
                    let _permit = self.permit().await;
                    match request.send().await {
                        Ok(_) => Ok(Some(Conditional::Created)),
                        Err(e) => match status_of(&e) {
                            Some(412) if earlier_attempt_may_have_created => Ok(None),
                            Some(412) => Ok(Some(Conditional::Exists)),
                            Some(501) => Ok(Some(Conditional::Unsupported)),
                            status => Err(Failure::from_sdk(&e, status)),
                        },
                    }
                };
                maybe_created = true;
                outcome
            })
            .await?;
        match created {
            Some(outcome) => Ok(outcome),
            // The object is this writer's if it contains exactly these bytes.
            None => match self.get_whole(key).await? {
                Some(stored) if stored == body => Ok(Conditional::Created),
                _ => Ok(Conditional::Exists),
            },
        }
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let full_key = self.full_key(key);
        self.retry("HEAD", key, |_| {
            let request = self.client.head_object().bucket(&self.location.bucket).key(&full_key);
            async move {
                let _permit = self.permit().await;
                match request.send().await {
                    Ok(_) => Ok(true),
                    Err(e) if status_of(&e) == Some(404) => Ok(false),
                    Err(e) => Err(Failure::from_sdk(&e, status_of(&e))),
                }
            }
        })
        .await
    }

    /// Downloads a whole object and checks its CRC32. `None` when it does not exist.
    async fn get_whole(&self, key: &str) -> Result<Option<Bytes>> {
        let full_key = self.full_key(key);
        self.retry("GET", key, |_| {
            let request = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(&full_key);
            async move {
                let _permit = self.permit().await;
                let output = match request.send().await {
                    Ok(output) => output,
                    Err(e) if status_of(&e) == Some(404) => return Ok(None),
                    Err(e) => return Err(Failure::from_sdk(&e, status_of(&e))),
                };
                let expected = expected_crc(output.metadata(), output.checksum_crc32());
                let body = output
                    .body
                    .collect()
                    .await
                    .map_err(|e| Failure::body(&e))?
                    .into_bytes();
                check_crc(expected, crc32fast::hash(&body), body.len() as u64)?;
                Ok(Some(body))
            }
        })
        .await
    }

    /// Reads a range into a page-aligned buffer, hashing each `piece` bytes if asked.
    async fn get_range(&self, key: &str, offset: u64, len: u64, piece: Option<usize>) -> Result<ResponseBuf> {
        let full_key = self.full_key(key);
        let last = offset + len - 1;
        self.retry("ranged GET", key, |_| {
            let request = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(&full_key)
                .range(format!("bytes={offset}-{last}"));
            async move {
                let _permit = self.permit().await;
                let output = match request.send().await {
                    Ok(output) => output,
                    // The range starts at or past the end of the object.
                    Err(e) if status_of(&e) == Some(416) => return ResponseBuf::with_capacity(0),
                    Err(e) => return Err(Failure::from_sdk(&e, status_of(&e))),
                };
                let expected_len = match output.content_range().and_then(total_from_content_range) {
                    Some(total) => total.saturating_sub(offset).min(len),
                    None => output.content_length().map_or(len, |n| n.max(0) as u64),
                };
                // One copy, from the response buffers into the result.
                let mut body = ResponseBuf::with_capacity(expected_len as usize)?;
                if let Some(piece) = piece {
                    body.hash_pieces(piece);
                }
                let mut stream = output.body;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk
                        .map_err(|e| Failure::body(&e))?;
                    if (body.len() + chunk.len()) as u64 > expected_len {
                        return Err(Failure::transient(format!("response body is longer than the {expected_len} bytes expected")));
                    }
                    body.extend_from_slice(&chunk);
                }
                if body.len() as u64 != expected_len {
                    return Err(Failure::transient(format!(
                        "response body has {} bytes, expected {expected_len}",
                        body.len()
                    )));
                }
                Ok(body)
            }
        })
        .await
    }

    /// Streams a whole object into `path` and checks its CRC32. `false` when it does not exist.
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<bool> {
        let full_key = self.full_key(key);
        self.retry("GET", key, |_| {
            let request = self
                .client
                .get_object()
                .bucket(&self.location.bucket)
                .key(&full_key);
            async move {
                let _permit = self.permit().await;
                let mut output = match request.send().await {
                    Ok(output) => output,
                    Err(e) if status_of(&e) == Some(404) => return Ok(false),
                    Err(e) => return Err(Failure::from_sdk(&e, status_of(&e))),
                };
                let expected = expected_crc(output.metadata(), output.checksum_crc32());
                let local = |e: std::io::Error| {
                    let detail = format!("writing {}: {e}", path.display());
                    Failure { kind: FailureKind::Permanent, summary: detail.clone(), detail }
                };
                let mut file = File::create(path).map_err(local)?;
                let mut hasher = crc32fast::Hasher::new();
                let mut len = 0u64;
                while let Some(chunk) = output.body.next().await {
                    let chunk = chunk
                        .map_err(|e| Failure::body(&e))?;
                    hasher.update(&chunk);
                    len += chunk.len() as u64;
                    file.write_all(&chunk).map_err(local)?;
                }
                check_crc(expected, hasher.finalize(), len)?;
                file.sync_all().map_err(local)?;
                Ok(true)
            }
        })
        .await
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        let full_prefix = self.full_key(prefix);
        let full_start_after = start_after.map(|key| self.full_key(key));
        let max_keys = limit.clamp(1, 1000) as i32;
        let output = self
            .retry("LIST", prefix, |_| {
                let request = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.location.bucket)
                    .prefix(&full_prefix)
                    .set_start_after(full_start_after.clone())
                    .max_keys(max_keys);
                async move {
                    let _permit = self.permit().await;
                    request.send().await.map_err(|e| Failure::from_sdk(&e, status_of(&e)))
                }
            })
            .await?;
        let objects: Vec<ObjectMeta> = output
            .contents()
            .iter()
            .filter_map(|object| {
                let key = object.key()?.strip_prefix(&self.location.prefix)?;
                let modified = object.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                Some(ObjectMeta { key: key.to_owned(), size: object.size().unwrap_or(0).max(0) as u64, modified })
            })
            .collect();
        let next_start_after = match output.is_truncated() {
            Some(true) => output.contents().last().and_then(|o| o.key()).map(|k| {
                k.strip_prefix(&self.location.prefix).unwrap_or(k).to_owned()
            }),
            _ => None,
        };
        Ok(ListPage { objects, next_start_after })
    }

    async fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<IncompleteUpload>> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        loop {
            let output = self
                .retry("LIST uploads", prefix, |_| {
                    let request = self
                        .client
                        .list_multipart_uploads()
                        .bucket(&self.location.bucket)
                        .prefix(&full_prefix)
                        .set_key_marker(markers.0.clone())
                        .set_upload_id_marker(markers.1.clone());
                    async move {
                        let _permit = self.permit().await;
                        request.send().await.map_err(|e| Failure::from_sdk(&e, status_of(&e)))
                    }
                })
                .await?;
            for upload in output.uploads() {
                let (Some(key), Some(upload_id)) = (upload.key(), upload.upload_id()) else { continue };
                let Some(key) = key.strip_prefix(&self.location.prefix) else { continue };
                let initiated = upload.initiated().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                out.push(IncompleteUpload { key: key.to_owned(), upload_id: upload_id.to_owned(), initiated });
            }
            let next = (output.next_key_marker().map(str::to_owned), output.next_upload_id_marker().map(str::to_owned));
            if output.is_truncated() != Some(true) || next.0.is_none() || next == markers {
                return Ok(out);
            }
            markers = next;
        }
    }

    async fn abort_upload(&self, upload: &IncompleteUpload) -> Result<()> {
        let full_key = self.full_key(&upload.key);
        self.retry("abort upload", &upload.key, |_| {
            let request = self
                .client
                .abort_multipart_upload()
                .bucket(&self.location.bucket)
                .key(&full_key)
                .upload_id(&upload.upload_id);
            async move {
                let _permit = self.permit().await;
                match request.send().await {
                    Ok(_) => Ok(()),
                    Err(e) if status_of(&e) == Some(404) => Ok(()),
                    Err(e) => Err(Failure::from_sdk(&e, status_of(&e))),
                }
            }
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full_key = self.full_key(key);
        self.retry("DELETE", key, |_| {
            let request = self.client.delete_object().bucket(&self.location.bucket).key(&full_key);
            async move {
                let _permit = self.permit().await;
                match request.send().await {
                    Ok(_) => Ok(()),
                    Err(e) if status_of(&e) == Some(404) => Ok(()),
                    Err(e) => Err(Failure::from_sdk(&e, status_of(&e))),
                }
            }
        })
        .await
    }
}

/// Expected CRC32 of a whole object: the `chalk-crc32` metadata, else a
/// full-object `x-amz-checksum-crc32` when the server sent one (a multipart
/// object's composite checksum, which ends in `-N`, is not a CRC of the contents).
fn expected_crc(metadata: Option<&HashMap<String, String>>, checksum: Option<&str>) -> Option<u32> {
    if let Some(value) = metadata.and_then(|m| m.get(CRC_METADATA_KEY)) {
        return u32::from_str_radix(value, 16).ok();
    }
    let checksum = checksum?;
    if checksum.contains('-') {
        return None;
    }
    let bytes: [u8; 4] = aws_smithy_types::base64::decode(checksum).ok()?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

fn check_crc(expected: Option<u32>, computed: u32, len: u64) -> std::result::Result<(), Failure> {
    match expected {
        Some(expected) if expected != computed => Err(Failure::corrupt(format!(
            "CRC32 mismatch in the downloaded object: stored {expected:08x}, computed {computed:08x} over {len} bytes"
        ))),
        Some(_) => Ok(()),
        None => {
            // Objects written by Chalk always carry the metadata; others are returned unchecked.
            tracing::debug!(len, "downloaded object carries no CRC32 to check");
            Ok(())
        }
    }
}

/// Delay before the attempt after attempt `failed`: uniform in
/// `[0, min(backoff_max, backoff_initial * 2^(failed - 1))]` (full jitter).
fn backoff(settings: &S3Settings, failed: u32) -> Duration {
    let exponent = failed.saturating_sub(1).min(20);
    let ceiling = settings.backoff_initial.saturating_mul(1 << exponent).min(settings.backoff_max);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
}

/// Total object size from a `Content-Range: bytes a-b/total` header.
fn total_from_content_range(value: &str) -> Option<u64> {
    value.rsplit('/').next()?.trim().parse().ok()
}

/// One part of a multipart upload: its number (from 1) and its byte range in the object.
#[derive(Clone, Copy, Debug)]
struct Part {
    number: i32,
    offset: u64,
    size: usize,
}

// Multipart uploads.
impl Inner {
    /// Uploads `len` bytes that `read_part(offset, len)` returns, in parts of
    /// `part_bytes` uploaded in parallel, each with its CRC32. The whole-object
    /// CRC32 `crc` goes into the metadata. A failed upload is aborted.
    async fn put_multipart<R>(self: &Arc<Self>, key: &str, len: u64, crc: u32, read_part: R) -> Result<()>
    where
        R: Fn(u64, usize) -> std::io::Result<Vec<u8>> + Send + Sync + 'static,
    {
        let full_key = self.full_key(key);
        let part_bytes = self.settings.part_bytes.max(len.div_ceil(PARTS_MAX));
        let warned = Arc::new(AtomicBool::new(false));
        let upload_id = self
            .retry_warning_once("create multipart upload", key, &warned, |_| {
                let request = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.location.bucket)
                    .key(&full_key)
                    .checksum_algorithm(ChecksumAlgorithm::Crc32)
                    .metadata(CRC_METADATA_KEY, crc_metadata(crc));
                async move {
                    let _permit = self.permit().await;
                    request.send().await.map_err(|e| Failure::from_sdk(&e, status_of(&e)))
                }
            })
            .await?
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| self.error(format!("create multipart upload {key}: the response has no upload id")))?;

        let read_part = Arc::new(read_part);
        let mut tasks = tokio::task::JoinSet::new();
        let parts = len.div_ceil(part_bytes);
        for index in 0..parts {
            let inner = Arc::clone(self);
            let read_part = Arc::clone(&read_part);
            let (key, full_key, upload_id, warned) = (key.to_owned(), full_key.clone(), upload_id.clone(), Arc::clone(&warned));
            let offset = index * part_bytes;
            let size = part_bytes.min(len - offset) as usize;
            tasks.spawn(async move {
                let part = Part { number: index as i32 + 1, offset, size };
                inner.upload_part(&key, &full_key, &upload_id, part, &warned, read_part.as_ref()).await
            });
        }
        let mut completed = Vec::with_capacity(parts as usize);
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(part)) => completed.push(part),
                Ok(Err(err)) => {
                    first_error.get_or_insert(err);
                    tasks.abort_all();
                }
                Err(join_error) if join_error.is_cancelled() => {}
                Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
            }
        }
        if let Some(err) = first_error {
            self.abort_multipart(key, &upload_id).await;
            return Err(err);
        }

        completed.sort_by_key(|part| part.part_number());
        let upload = CompletedMultipartUpload::builder().set_parts(Some(completed)).build();
        let result = self
            .retry_warning_once("complete multipart upload", key, &warned, |_| {
                let request = self
                    .client
                    .complete_multipart_upload()
                    .bucket(&self.location.bucket)
                    .key(&full_key)
                    .upload_id(&upload_id)
                    .multipart_upload(upload.clone());
                async move {
                    let _permit = self.permit().await;
                    request.send().await.map(|_| ()).map_err(|e| Failure::from_sdk(&e, status_of(&e)))
                }
            })
            .await;
        if let Err(err) = result {
            // An attempt whose response was lost, or came back unreadable (moto
            // 5.2 names the root element of its response wrongly), may still
            // have completed the upload.
            if self.holds_object(key, len, crc).await {
                tracing::debug!(key, error = %err, "multipart upload completed although its response was lost or invalid");
                return Ok(());
            }
            self.abort_multipart(key, &upload_id).await;
            return Err(err);
        }
        Ok(())
    }

    /// Returns whether `key` contains an object of `len` bytes whose recorded CRC32 is `crc`.
    async fn holds_object(&self, key: &str, len: u64, crc: u32) -> bool {
        let full_key = self.full_key(key);
        let found = self
            .retry("HEAD", key, |_| {
                let request = self.client.head_object().bucket(&self.location.bucket).key(&full_key);
                async move {
                    let _permit = self.permit().await;
                    match request.send().await {
                        Ok(output) => Ok(Some(output)),
                        Err(e) if status_of(&e) == Some(404) => Ok(None),
                        Err(e) => Err(Failure::from_sdk(&e, status_of(&e))),
                    }
                }
            })
            .await;
        match found {
            Ok(Some(output)) => {
                output.content_length() == Some(len as i64)
                    && output.metadata().and_then(|m| m.get(CRC_METADATA_KEY)).is_some_and(|v| *v == crc_metadata(crc))
            }
            Ok(None) | Err(_) => false,
        }
    }

    /// Reads and uploads one part. The request permit is held from the read
    /// to the last attempt, so part buffers in memory stay within `concurrency`.
    async fn upload_part<R>(
        &self,
        key: &str,
        full_key: &str,
        upload_id: &str,
        part: Part,
        warned: &AtomicBool,
        read_part: &R,
    ) -> Result<CompletedPart>
    where
        R: Fn(u64, usize) -> std::io::Result<Vec<u8>> + Send + Sync,
    {
        let Part { number, offset, size } = part;
        let _permit = self.permit().await;
        let body = Bytes::from(tokio::task::block_in_place(|| read_part(offset, size)).map_err(|e| {
            self.error(format!("reading part {number} of {key} at offset {offset}: {e}"))
        })?);
        if body.len() != size {
            return Err(self.error(format!("part {number} of {key} has {} bytes, expected {size}", body.len())));
        }
        let crc = crc_header(crc32fast::hash(&body));
        let output = self
            .retry_warning_once("upload part", key, warned, |_| {
                let request = self
                    .client
                    .upload_part()
                    .bucket(&self.location.bucket)
                    .key(full_key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .checksum_crc32(&crc)
                    .body(ByteStream::from(body.clone()));
                async move { request.send().await.map_err(|e| Failure::from_sdk(&e, status_of(&e))) }
            })
            .await?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(output.e_tag().map(str::to_owned))
            .checksum_crc32(crc)
            .build())
    }

    /// Aborts the multipart upload of `key` once, without retries. Parts
    /// left behind by a failed abort are garbage for `gc`.
    async fn abort_multipart(&self, key: &str, upload_id: &str) {
        let full_key = self.full_key(key);
        let request =
            self.client.abort_multipart_upload().bucket(&self.location.bucket).key(&full_key).upload_id(upload_id);
        if let Err(e) = request.send().await {
            tracing::warn!(url = %self.url, key, upload_id, error = %summarize(&e, status_of(&e)), "failed to abort multipart upload; gc aborts it later");
            tracing::debug!(url = %self.url, key, upload_id, error = %DisplayErrorContext(&e), "abort of multipart upload failed");
        }
    }
}

impl ObjectStore for S3Store {
    fn url(&self) -> String {
        self.inner.url.clone()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        validate_key(key)?;
        if data.len() as u64 <= self.inner.settings.part_bytes {
            return self.block_on(self.inner.put_single(key, Bytes::copy_from_slice(data)));
        }
        let crc = crc32fast::hash(data);
        let shared = Bytes::copy_from_slice(data);
        let read_part = move |offset: u64, size: usize| Ok(shared.slice(offset as usize..offset as usize + size).to_vec());
        self.block_on(self.inner.put_multipart(key, data.len() as u64, crc, read_part))
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        validate_key(key)?;
        let file = File::open(path).map_err(|e| EngineError::io("opening file to upload", path, e))?;
        let len = file.metadata().map_err(|e| EngineError::io("reading size of", path, e))?.len();
        if len <= self.inner.settings.part_bytes {
            let data = std::fs::read(path).map_err(|e| EngineError::io("reading file to upload", path, e))?;
            return self.block_on(self.inner.put_single(key, Bytes::from(data)));
        }
        let crc = file_crc(&file, len).map_err(|e| EngineError::io("reading file to upload", path, e))?;
        let read_part = move |offset: u64, size: usize| {
            let mut buf = vec![0u8; size];
            file.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        };
        self.block_on(self.inner.put_multipart(key, len, crc, read_part))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        match self.conditional_writes()? {
            ConditionalWrites::Honoured => match self.put_conditional(key, data)? {
                Conditional::Created => Ok(true),
                Conditional::Exists => Ok(false),
                Conditional::Unsupported => Err(EngineError::ObjectStore {
                    url: self.url(),
                    detail: format!(
                        "creating {key}: the store rejects If-None-Match although the probe record {PROBE_RECORD_KEY} \
                         says it honours it; delete that record so that the next publish probes again"
                    ),
                }),
            },
            // Single-writer mode: a second writer between the check and the
            // write overwrites the object, and one of the two writes is lost.
            ConditionalWrites::Ignored => {
                if self.exists(key)? {
                    return Ok(false);
                }
                self.put(key, data)?;
                Ok(true)
            }
        }
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        validate_key(key)?;
        Ok(self.block_on(self.inner.get_whole(key))?.map(|bytes| bytes.to_vec()))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        validate_key(key)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(self.block_on(self.inner.get_range(key, offset, len, None))?.as_ref().to_vec())
    }

    fn get_range_bytes(&self, key: &str, offset: u64, len: u64) -> Result<Bytes> {
        validate_key(key)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let body = self.get_range_task(key, offset, len, None)?;
        Ok(Bytes::from_owner(body))
    }

    fn get_range_pieces(&self, key: &str, offset: u64, len: u64, piece: usize) -> Result<(Bytes, Option<Vec<u32>>)> {
        validate_key(key)?;
        if len == 0 {
            return Ok((Bytes::new(), Some(Vec::new())));
        }
        let mut body = self.get_range_task(key, offset, len, Some(piece.max(1)))?;
        let crcs = body.piece_crcs();
        Ok((Bytes::from_owner(body), crcs))
    }

    fn get_to_file(&self, key: &str, path: &Path) -> Result<bool> {
        validate_key(key)?;
        self.block_on(self.inner.get_to_file(key, path))
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        self.block_on(self.inner.list(prefix, start_after, limit))
    }

    fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.block_on(self.inner.delete(key))
    }

    fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<IncompleteUpload>> {
        self.block_on(self.inner.incomplete_uploads(prefix))
    }

    fn abort_upload(&self, upload: &IncompleteUpload) -> Result<()> {
        validate_key(&upload.key)?;
        self.block_on(self.inner.abort_upload(upload))
    }

    fn attach_metrics(&self, metrics: &Arc<Metrics>) {
        // A store attached twice keeps the first registry.
        let _ = self.inner.metrics.set(Arc::clone(metrics));
    }

    fn conditional_writes(&self) -> Result<ConditionalWrites> {
        let mut known = self.conditional_writes.lock();
        if let Some(answer) = *known {
            return Ok(answer);
        }
        let answer = self.probe()?;
        // INFO, because the callers tell the user: `chalk` prints it once
        // after a command that published, and a mount logs it once.
        if answer == ConditionalWrites::Ignored {
            tracing::info!(url = %self.url(), "{SINGLE_WRITER_WARNING}");
        }
        *known = Some(answer);
        Ok(answer)
    }
}

/// CRC32 of the first `len` bytes of `file`, read in 1 MiB pieces.
fn file_crc(file: &File, len: u64) -> std::io::Result<u32> {
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        let n = buf.len().min((len - offset) as usize);
        file.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_buffer_hashes_pieces_across_chunk_edges() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        // Chunks that start and end inside pieces, span whole pieces, and end on an edge.
        for chunks in [vec![1, 999, 4000, 5000], vec![3000, 3000, 3000, 1000], vec![10_000], vec![2048; 5]] {
            let mut buf = ResponseBuf::with_capacity(data.len()).unwrap();
            buf.hash_pieces(2048);
            let mut at = 0;
            for len in chunks {
                let len = len.min(data.len() - at);
                buf.extend_from_slice(&data[at..at + len]);
                at += len;
            }
            let expected: Vec<u32> = data[..at].chunks(2048).map(crc32fast::hash).collect();
            assert_eq!(buf.piece_crcs().unwrap(), expected);
            assert_eq!(buf.as_ref(), &data[..at]);
        }
        let mut unhashed = ResponseBuf::with_capacity(10).unwrap();
        unhashed.extend_from_slice(b"abc");
        assert_eq!(unhashed.piece_crcs(), None);
    }

    #[test]
    fn response_buffers_are_aligned_to_huge_pages() {
        for (len, cap) in [(1, 1 << 20), (4096, 1 << 20), (3 << 20, 3 << 20), ((8 << 20) - 5, 8 << 20)] {
            let buf = ResponseBuf::with_capacity(len).unwrap();
            assert_eq!(buf.ptr.as_ptr() as usize % HUGE_PAGE_BYTES, 0, "{len} bytes");
            assert_eq!(buf.cap, cap, "{len} bytes");
        }
    }

    #[test]
    fn location_parses_bucket_and_prefix() {
        let plain = S3Location::parse("s3://bucket").unwrap();
        assert_eq!(plain, S3Location { bucket: "bucket".into(), prefix: String::new() });
        let nested = S3Location::parse("s3://my-bucket/team/volumes/").unwrap();
        assert_eq!(nested.prefix, "team/volumes/");
        assert_eq!(S3Location::parse("s3://my.bucket/p").unwrap().prefix, "p/");
        for bad in ["s3://", "s3://B", "s3://ab", "s3://bucket/a//b", "s3://bucket/../x", "file:///x"] {
            assert!(S3Location::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn crc_header_is_base64_big_endian() {
        // CRC32 of "123456789" is cbf43926.
        let crc = crc32fast::hash(b"123456789");
        assert_eq!(crc, 0xcbf4_3926);
        assert_eq!(crc_header(crc), "y/Q5Jg==");
        assert_eq!(expected_crc(None, Some("y/Q5Jg==")), Some(crc));
        assert_eq!(expected_crc(None, Some("y/Q5Jg==-3")), None);
        let metadata = HashMap::from([(CRC_METADATA_KEY.to_owned(), crc_metadata(crc))]);
        assert_eq!(expected_crc(Some(&metadata), Some("AAAAAA==")), Some(crc));
    }

    #[test]
    fn content_range_total_is_parsed() {
        assert_eq!(total_from_content_range("bytes 0-9/100"), Some(100));
        assert_eq!(total_from_content_range("bytes */100"), Some(100));
        assert_eq!(total_from_content_range("bytes 0-9/*"), None);
    }

    #[test]
    fn backoff_stays_under_the_cap() {
        let settings = S3Settings::default();
        for failed in 1..40 {
            let delay = backoff(&settings, failed);
            assert!(delay <= settings.backoff_max, "attempt {failed}: {delay:?}");
        }
        let first: Vec<Duration> = (0..100).map(|_| backoff(&settings, 1)).collect();
        assert!(first.iter().all(|d| *d <= settings.backoff_initial), "{first:?}");
        assert!(first.iter().any(|d| *d != first[0]), "delays are not jittered: {first:?}");
    }
}
