//! Session leases and gc sweep markers: how live sessions and `gc` keep out
//! of each other's way through the object store alone.
//!
//! A writable session (and a read-only mount, through `Session::hold_lease`) keeps a lease object
//! at `volumes/<volume>/leases/<session>`. It names the versions the session
//! reads, and during a sync the segments and the version id it is about to
//! upload. A background thread rewrites it every third of its time to live,
//! and the session deletes it when it ends. `gc` keeps everything a live
//! lease names.
//!
//! A gc run writes a sweep marker at `volumes/<volume>/gc/sweeps/<ulid>`
//! before it reads the leases a last time and deletes, and removes it after.
//!
//! Protocol (see `docs/design/0005-fsck-and-gc.md` for the argument):
//! 1. A session writes its lease, then lists the sweep markers and waits
//!    while a live one exists.
//! 2. Only then does it read its base checkpoint (at open) or upload (at sync).
//!
//! So a gc either read the lease before deleting, or finished deleting
//! before the session touched the objects.

use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::format::checkpoint::{frame, unframe, ObjectType};
use crate::ids::{SegmentId, SessionId, VersionId, VolumeName};
use crate::object_store::{list_all, ObjectStore};

/// Time to live of a lease that is not renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(600);
/// A sweep marker older than this belongs to a gc run that died, so
/// sessions stop waiting for it. A gc run stops deleting before its marker
/// is half this old.
pub const SWEEP_MARKER_TTL: Duration = Duration::from_secs(900);
/// Pause between two looks at the sweep markers while one is live.
const SWEEP_POLL: Duration = Duration::from_millis(50);

pub(crate) fn lease_prefix(volume: &VolumeName) -> String {
    format!("volumes/{volume}/leases/")
}

pub(crate) fn sweep_prefix(volume: &VolumeName) -> String {
    format!("volumes/{volume}/gc/sweeps/")
}

/// A lease as stored (JSON inside an object frame).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    pub session: String,
    pub host: String,
    pub pid: u32,
    /// Versions the session reads: its base, and during a sync the version
    /// it is publishing.
    pub versions: Vec<String>,
    /// Segments the session has sealed and not yet published.
    pub pending_segments: Vec<String>,
    /// Set from the start of a sync until the next renewal: the session may
    /// be writing directory chunks, which are content-addressed.
    pub syncing: bool,
    pub ttl_ms: u64,
    pub written_at_ns: i64,
}

impl LeaseRecord {
    pub fn encode(&self) -> Vec<u8> {
        frame(ObjectType::LeaseRecord, &serde_json::to_vec(self).expect("serializable"))
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let corrupt = |detail: String| EngineError::CorruptObject { key: key.to_owned(), detail };
        let payload = unframe(ObjectType::LeaseRecord, bytes).map_err(corrupt)?;
        serde_json::from_slice(payload).map_err(|e| corrupt(e.to_string()))
    }

    pub fn version_ids(&self) -> Vec<VersionId> {
        self.versions.iter().filter_map(|v| v.parse().ok()).collect()
    }

    pub fn segment_ids(&self) -> Vec<SegmentId> {
        self.pending_segments.iter().filter_map(|v| v.parse().ok()).collect()
    }

    /// True when the lease, written at `modified` by the store's clock, has
    /// not expired by `now`.
    pub fn is_live(&self, modified: Option<SystemTime>, now: SystemTime) -> bool {
        // Without a store time the lease counts as live: keeping too much is safe.
        let Some(modified) = modified else { return true };
        modified + Duration::from_millis(self.ttl_ms) > now
    }
}

struct Shared {
    objects: Arc<dyn ObjectStore>,
    key: String,
    record: Mutex<LeaseRecord>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn write(&self) -> Result<()> {
        let bytes = {
            let mut record = self.record.lock();
            record.written_at_ns = crate::store::now_ns();
            record.encode()
        };
        self.objects.put(&self.key, &bytes)
    }
}

/// A session's lease, renewed by a background thread until it is dropped,
/// which deletes it.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    renewer: Option<JoinHandle<()>>,
}

impl Lease {
    /// Writes the lease of `session` naming `versions`, starts renewing it,
    /// and waits until no gc run is deleting objects of the volume.
    pub fn acquire(objects: Arc<dyn ObjectStore>, volume: &VolumeName, session: SessionId, versions: &[VersionId]) -> Result<Lease> {
        let record = LeaseRecord {
            session: session.to_string(),
            host: hostname(),
            pid: std::process::id(),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            pending_segments: Vec::new(),
            syncing: false,
            ttl_ms: LEASE_TTL.as_millis() as u64,
            written_at_ns: 0,
        };
        let shared = Arc::new(Shared {
            objects: objects.clone(),
            key: format!("{}{session}", lease_prefix(volume)),
            record: Mutex::new(record),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        shared.write()?;
        let weak = Arc::downgrade(&shared);
        let renewer = std::thread::Builder::new()
            .name("chalk-lease".into())
            .spawn(move || renew_until_stopped(weak))
            .map_err(|e| EngineError::io("starting the lease renewal thread for", format!("session {session}"), e))?;
        let lease = Lease { shared, renewer: Some(renewer) };
        wait_for_sweeps(objects.as_ref(), volume)?;
        Ok(lease)
    }

    /// Announces a sync: the versions it reads and publishes and the
    /// segments it uploads. Writes the lease at once and waits until no gc
    /// run is deleting, so the caller may upload when this returns.
    pub fn begin_sync(&self, volume: &VolumeName, versions: &[VersionId], segments: &[SegmentId]) -> Result<()> {
        {
            let mut record = self.shared.record.lock();
            record.versions = versions.iter().map(|v| v.to_string()).collect();
            record.pending_segments = segments.iter().map(|s| s.to_string()).collect();
            record.syncing = true;
        }
        self.shared.write()?;
        wait_for_sweeps(self.shared.objects.as_ref(), volume)
    }

    /// Records the session's new base after a sync; the next renewal writes it.
    pub fn end_sync(&self, base: VersionId, unpublished: &[SegmentId]) {
        let mut record = self.shared.record.lock();
        record.versions = vec![base.to_string()];
        record.pending_segments = unpublished.iter().map(|s| s.to_string()).collect();
        record.syncing = false;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        if let Err(err) = self.shared.objects.delete(&self.shared.key) {
            tracing::warn!(key = %self.shared.key, error = %err, "failed to delete a session lease; it expires on its own");
        }
    }
}

fn renew_until_stopped(shared: Weak<Shared>) {
    let period = LEASE_TTL / 3;
    loop {
        let Some(shared) = shared.upgrade() else { return };
        {
            let mut stop = shared.stop.lock();
            if !*stop {
                shared.wake.wait_for(&mut stop, period);
            }
            if *stop {
                return;
            }
        }
        if let Err(err) = shared.write() {
            tracing::warn!(key = %shared.key, error = %err, "failed to renew a session lease; retrying at the next renewal");
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// Waits while a gc run that started less than [`SWEEP_MARKER_TTL`] ago is
/// deleting objects of `volume`.
pub(crate) fn wait_for_sweeps(objects: &dyn ObjectStore, volume: &VolumeName) -> Result<()> {
    let started = Instant::now();
    let mut logged = false;
    loop {
        let now = SystemTime::now();
        let live = list_all(objects, &sweep_prefix(volume))?
            .into_iter()
            .filter(|marker| marker.modified.is_none_or(|m| m + SWEEP_MARKER_TTL > now))
            .count();
        if live == 0 || started.elapsed() > SWEEP_MARKER_TTL {
            return Ok(());
        }
        if !logged {
            tracing::info!(volume = %volume, "waiting for a gc run to finish deleting");
            logged = true;
        }
        std::thread::sleep(SWEEP_POLL);
    }
}
