//! FUSE adaptor that serves a Chalk volume session as a mounted directory.
//!
//! The adaptor is thin: each FUSE operation opens a tracing span, calls the
//! engine [`Session`](chalk_engine::Session), maps a failure to errno in one
//! exhaustive match and replies. The engine owns all file system state; the
//! adaptor keeps only its open-handle tables.
//!
//! Caching: read-only sessions give the kernel long entry and attribute
//! timeouts, keep the page cache across opens, allow 1 MiB readahead and
//! serve files of 1 MiB or more through FUSE passthrough from a copy in the
//! local cache where the kernel and privileges allow. Writable sessions use
//! one-second timeouts and plain page-cache I/O without writeback caching,
//! so all processes using the mount share one coherent page cache, shared
//! writable `mmap` works, and `O_APPEND` writes land at the engine's end of
//! file. File locks (`flock`, `fcntl`) are left to the kernel, which keeps
//! them local to this mount.
//!
//! Threads: a read-only mount reads its requests with one thread. It hands
//! the ones that can wait long to worker threads (`workers.rs`): reads from
//! a remote store, and opens that copy or check a passthrough file.
//! Writable mounts read requests with several threads, each of which serves
//! what it reads.

mod attr;
mod errno;
mod fs;
mod mount;
mod passthrough;
mod views;
mod workers;

/// Returns whether `session`'s object store is a local directory, whose
/// reads wait at most on this host's disk.
pub(crate) fn store_is_local(session: &chalk_engine::Session) -> bool {
    session.store().config().object_store_url.starts_with("file://")
}

pub use mount::{default_threads, mount, READ_WORKERS, Invalidator, MountHandle, MountOptions};
