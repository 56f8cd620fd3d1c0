//! Prometheus metrics of one [`Store`](crate::Store): a registry that the
//! engine, the FUSE adaptor and the `chalk` binary record into, and that a
//! scrape encodes in the OpenMetrics text format.
//!
//! Each store owns its own [`Metrics`], so two stores in one process (as in
//! tests) never share counters. Names and labels:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `chalk_fuse_operation_duration_seconds` | histogram | `volume`, `lineage`, `op` |
//! | `chalk_read_bytes_total`, `chalk_written_bytes_total` | counter | `volume`, `lineage` |
//! | `chalk_sync_duration_seconds` | histogram | `volume`, `lineage`, `outcome` |
//! | `chalk_sync_published_bytes_total` | counter | `volume`, `lineage` |
//! | `chalk_object_store_requests_total`, `chalk_object_store_errors_total` | counter | `operation` |
//! | `chalk_object_store_retries_total` | counter | `operation` |
//! | `chalk_cache_hits_total`, `chalk_cache_misses_total` | counter | `tier` |
//! | `chalk_cache_store_fetches_total`, `chalk_cache_store_fetched_bytes_total` | counter | none |
//!
//! Hot path: a session resolves its labelled counters once, when it opens
//! ([`SessionMetrics`]), so a read or write adds one atomic increment. A
//! FUSE operation also observes a histogram, which takes one uncontended
//! lock inside `prometheus-client`. The cache counters are the cache's own
//! atomics, read only when a scrape encodes them.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::encoding::{text, DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

use crate::cache::CacheCounters;
use crate::error::Result;
use crate::object_store::{ListPage, ObjectStore};

/// Content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The FUSE operations that `chalk-fused` times. A histogram for each is
/// made when a mount starts, so every one of them is listed from the first scrape.
/// `flush`, `releasedir`, `access` and `forget` only reply and are not timed.
pub const FUSE_OPERATIONS: &[&str] = &[
    "lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
    "open", "read", "write", "release", "fsync", "opendir", "readdir", "readdirplus", "fsyncdir", "statfs",
    "setxattr", "getxattr", "listxattr", "removexattr", "create", "fallocate",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    volume: String,
    lineage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    volume: String,
    lineage: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncLabels {
    volume: String,
    lineage: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabels {
    operation: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// FUSE operations take from a few microseconds (cached `getattr`) to
/// seconds (`fsync` of a large file): 1 µs to about 16 s in powers of 4,
/// few enough buckets that each of the 27 operations costs 16 lines a scrape.
fn operation_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-6, 4.0, 13))
}

/// Syncs take from about a millisecond (a local store, no data) to minutes
/// (large uploads to S3): 1 ms to about 1,000 s in powers of 2.
fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-3, 2.0, 21))
}

/// The result of one sync, as the `outcome` label names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncResult {
    Published,
    NothingToPublish,
    Failed,
}

impl SyncResult {
    fn label(self) -> &'static str {
        match self {
            SyncResult::Published => "published",
            SyncResult::NothingToPublish => "nothing_to_publish",
            SyncResult::Failed => "failed",
        }
    }
}

/// The metrics registry of one store and the families the engine records into.
pub struct Metrics {
    registry: Mutex<Registry>,
    fuse_operations: HistogramFamily<OperationLabels>,
    read_bytes: Family<SessionLabels, Counter>,
    written_bytes: Family<SessionLabels, Counter>,
    sync_duration: HistogramFamily<SyncLabels>,
    published_bytes: Family<SessionLabels, Counter>,
    object_requests: Family<ObjectLabels, Counter>,
    object_errors: Family<ObjectLabels, Counter>,
    object_retries: Family<ObjectLabels, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Makes an empty registry with the engine's families registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let fuse_operations = HistogramFamily::<OperationLabels>::new_with_constructor(operation_histogram as fn() -> Histogram);
        let read_bytes = Family::<SessionLabels, Counter>::default();
        let written_bytes = Family::<SessionLabels, Counter>::default();
        let sync_duration = HistogramFamily::<SyncLabels>::new_with_constructor(sync_histogram as fn() -> Histogram);
        let published_bytes = Family::<SessionLabels, Counter>::default();
        let object_requests = Family::<ObjectLabels, Counter>::default();
        let object_errors = Family::<ObjectLabels, Counter>::default();
        let object_retries = Family::<ObjectLabels, Counter>::default();

        registry.register(
            "chalk_fuse_operation_duration_seconds",
            "Time from a FUSE request's arrival to its reply, by operation",
            fuse_operations.clone(),
        );
        registry.register("chalk_read_bytes", "File bytes returned by reads", read_bytes.clone());
        registry.register("chalk_written_bytes", "File bytes accepted by writes", written_bytes.clone());
        registry.register(
            "chalk_sync_duration_seconds",
            "Duration of each sync, by outcome (published, nothing_to_publish or failed)",
            sync_duration.clone(),
        );
        registry.register(
            "chalk_sync_published_bytes",
            "Bytes of segments that syncs uploaded to the object store",
            published_bytes.clone(),
        );
        registry.register(
            "chalk_object_store_requests",
            "Object store calls made by the engine, by operation; a call may send several HTTP requests",
            object_requests.clone(),
        );
        registry.register(
            "chalk_object_store_errors",
            "Object store calls that returned an error, by operation",
            object_errors.clone(),
        );
        registry.register(
            "chalk_object_store_retries",
            "Failed S3 attempts that were retried, by S3 operation",
            object_retries.clone(),
        );

        Metrics {
            registry: Mutex::new(registry),
            fuse_operations,
            read_bytes,
            written_bytes,
            sync_duration,
            published_bytes,
            object_requests,
            object_errors,
            object_retries,
        }
    }

    /// Registers another metric, such as the dashboard's request counters.
    /// `name` has no `_total` suffix: the encoder adds it to counters.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry.lock().register(name, help, metric);
    }

    /// Registers the read cache's counters, read at each scrape. The
    /// registry keeps only a weak reference to `counters`, so once the store
    /// that owns the cache is dropped, a scrape encodes no cache metrics.
    pub(crate) fn register_cache(&self, counters: Weak<dyn Fn() -> CacheCounters + Send + Sync>) {
        self.registry.lock().register_collector(Box::new(CacheCollector { counters }));
    }

    /// Encodes every registered metric in the OpenMetrics text format
    /// (content type [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        text::encode(&mut out, &self.registry.lock()).expect("writing to a String cannot fail");
        out
    }

    /// Resolves the counters of one session, labelled with its volume and lineage.
    pub fn session(&self, volume: &str, lineage: &str) -> SessionMetrics {
        let labels = SessionLabels { volume: volume.to_owned(), lineage: lineage.to_owned() };
        SessionMetrics {
            read_bytes: self.read_bytes.get_or_create_owned(&labels),
            written_bytes: self.written_bytes.get_or_create_owned(&labels),
            published_bytes: self.published_bytes.get_or_create_owned(&labels),
            sync_duration: [SyncResult::Published, SyncResult::NothingToPublish, SyncResult::Failed].map(|result| {
                self.sync_duration.get_or_create_owned(&SyncLabels {
                    volume: volume.to_owned(),
                    lineage: lineage.to_owned(),
                    outcome: result.label().to_owned(),
                })
            }),
        }
    }

    /// Resolves the latency histogram of FUSE operation `op` on one mount.
    pub fn fuse_operation(&self, volume: &str, lineage: &str, op: &str) -> Histogram {
        self.fuse_operations.get_or_create_owned(&OperationLabels {
            volume: volume.to_owned(),
            lineage: lineage.to_owned(),
            op: op.to_owned(),
        })
    }

    /// Counts one retried attempt of an S3 operation.
    pub fn record_object_retry(&self, operation: &str) {
        self.object_retries.get_or_create(&ObjectLabels { operation: operation.to_ascii_lowercase() }).inc();
    }

    fn record_object_call<T>(&self, operation: &'static str, result: &Result<T>) {
        let labels = ObjectLabels { operation: operation.to_owned() };
        self.object_requests.get_or_create(&labels).inc();
        if result.is_err() {
            self.object_errors.get_or_create(&labels).inc();
        }
    }
}

/// Counters of one session, resolved once so that recording is an atomic increment.
#[derive(Clone, Debug)]
pub struct SessionMetrics {
    read_bytes: Counter,
    written_bytes: Counter,
    published_bytes: Counter,
    /// By [`SyncResult`], in declaration order.
    sync_duration: [Histogram; 3],
}

impl SessionMetrics {
    pub fn record_read(&self, len_bytes: u64) {
        self.read_bytes.inc_by(len_bytes);
    }

    pub fn record_write(&self, len_bytes: u64) {
        self.written_bytes.inc_by(len_bytes);
    }

    pub fn record_published(&self, len_bytes: u64) {
        self.published_bytes.inc_by(len_bytes);
    }

    pub fn record_sync(&self, result: SyncResult, duration: Duration) {
        let index = match result {
            SyncResult::Published => 0,
            SyncResult::NothingToPublish => 1,
            SyncResult::Failed => 2,
        };
        self.sync_duration[index].observe(duration.as_secs_f64());
    }
}

/// Encodes the read cache's counters at each scrape.
struct CacheCollector {
    counters: Weak<dyn Fn() -> CacheCounters + Send + Sync>,
}

impl fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheCollector").finish_non_exhaustive()
    }
}

impl prometheus_client::collector::Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::result::Result<(), fmt::Error> {
        let Some(counters) = self.counters.upgrade().map(|snapshot| snapshot()) else {
            return Ok(());
        };
        let by_tier = [
            ("chalk_cache_hits", "Cache blocks found in a tier (memory or disk)", counters.memory_hits, counters.disk_hits),
            ("chalk_cache_misses", "Cache blocks looked for in a tier and not found there", counters.memory_misses, counters.disk_misses),
        ];
        for (name, help, memory, disk) in by_tier {
            let counter_memory = ConstCounter::new(memory);
            let counter_disk = ConstCounter::new(disk);
            let mut family = encoder.encode_descriptor(name, help, None, counter_memory.metric_type())?;
            counter_memory.encode(family.encode_family(&[("tier", "memory")])?)?;
            counter_disk.encode(family.encode_family(&[("tier", "disk")])?)?;
        }
        let store = [
            ("chalk_cache_store_fetches", "Ranged GETs the cache sent to the object store for blocks missing from both tiers", counters.store_gets),
            ("chalk_cache_store_fetched_bytes", "Bytes those ranged GETs returned", counters.store_bytes),
            ("chalk_cache_corrupt_blocks", "Cache blocks dropped because their bytes failed a CRC check", counters.corrupt_blocks),
        ];
        for (name, help, value) in store {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// An object store that counts each call, and each failed call, in [`Metrics`].
pub(crate) struct MeteredStore {
    inner: Arc<dyn ObjectStore>,
    metrics: Arc<Metrics>,
}

impl MeteredStore {
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, metrics: Arc<Metrics>) -> Self {
        inner.attach_metrics(&metrics);
        MeteredStore { inner, metrics }
    }

    fn call<T>(&self, operation: &'static str, result: Result<T>) -> Result<T> {
        self.metrics.record_object_call(operation, &result);
        result
    }
}

impl ObjectStore for MeteredStore {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        self.call("put", self.inner.put(key, data))
    }

    fn put_file(&self, key: &str, path: &Path) -> Result<()> {
        self.call("put_file", self.inner.put_file(key, path))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool> {
        self.call("put_if_absent", self.inner.put_if_absent(key, data))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.call("get", self.inner.get(key))
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.call("get_range", self.inner.get_range(key, offset, len))
    }

    fn get_range_bytes(&self, key: &str, offset: u64, len: u64) -> Result<bytes::Bytes> {
        self.call("get_range", self.inner.get_range_bytes(key, offset, len))
    }

    fn local_file(&self, key: &str) -> Option<std::path::PathBuf> {
        self.inner.local_file(key)
    }

    fn get_range_pieces(&self, key: &str, offset: u64, len: u64, piece: usize) -> Result<(bytes::Bytes, Option<Vec<u32>>)> {
        self.call("get_range", self.inner.get_range_pieces(key, offset, len, piece))
    }

    fn get_to_file(&self, key: &str, path: &Path) -> Result<bool> {
        self.call("get_to_file", self.inner.get_to_file(key, path))
    }

    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> Result<ListPage> {
        self.call("list", self.inner.list(prefix, start_after, limit))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.call("delete", self.inner.delete(key))
    }

    fn conditional_writes(&self) -> Result<crate::object_store::ConditionalWrites> {
        self.inner.conditional_writes()
    }

    fn incomplete_uploads(&self, prefix: &str) -> Result<Vec<crate::object_store::IncompleteUpload>> {
        self.call("list_uploads", self.inner.incomplete_uploads(prefix))
    }

    fn abort_upload(&self, upload: &crate::object_store::IncompleteUpload) -> Result<()> {
        self.call("abort_upload", self.inner.abort_upload(upload))
    }

    fn attach_metrics(&self, metrics: &Arc<Metrics>) {
        self.inner.attach_metrics(metrics);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_counters_are_labelled() {
        let metrics = Metrics::new();
        let session = metrics.session("data", "main");
        session.record_read(10);
        session.record_read(5);
        session.record_sync(SyncResult::Published, Duration::from_millis(3));
        let text = metrics.encode();
        assert!(text.contains("chalk_read_bytes_total{volume=\"data\",lineage=\"main\"} 15"), "{text}");
        assert!(text.contains("chalk_sync_duration_seconds_count{volume=\"data\",lineage=\"main\",outcome=\"published\"} 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn object_store_calls_and_errors_counted() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let inner: Arc<dyn ObjectStore> = Arc::new(crate::object_store::FileStore::open(dir.path()).unwrap());
        let store = MeteredStore::new(inner, Arc::clone(&metrics));
        store.put("a/b", b"xyz").unwrap();
        assert_eq!(store.get("a/b").unwrap().as_deref(), Some(&b"xyz"[..]));
        assert!(store.put("../escape", b"x").is_err());
        let text = metrics.encode();
        assert!(text.contains("chalk_object_store_requests_total{operation=\"put\"} 2"), "{text}");
        assert!(text.contains("chalk_object_store_requests_total{operation=\"get\"} 1"), "{text}");
        assert!(text.contains("chalk_object_store_errors_total{operation=\"put\"} 1"), "{text}");
        assert!(!text.contains("chalk_object_store_errors_total{operation=\"get\"}"), "{text}");
    }

    #[test]
    fn cache_collector_stops_with_cache() {
        let metrics = Metrics::new();
        let source: Arc<dyn Fn() -> CacheCounters + Send + Sync> =
            Arc::new(|| CacheCounters { memory_hits: 7, disk_misses: 2, ..CacheCounters::default() });
        metrics.register_cache(Arc::downgrade(&source));
        let text = metrics.encode();
        assert!(text.contains("chalk_cache_hits_total{tier=\"memory\"} 7"), "{text}");
        assert!(text.contains("chalk_cache_misses_total{tier=\"disk\"} 2"), "{text}");
        drop(source);
        assert!(!metrics.encode().contains("chalk_cache_hits"));
    }
}
