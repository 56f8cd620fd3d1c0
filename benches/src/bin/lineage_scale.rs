//! Measures what lineages cost as a volume grows: fork time, session-open
//! time, and the time and bytes of a sync that changes one file, for
//! synthetic volumes of 1,000, 100,000 and 1,000,000 files.
//!
//! Usage: `cargo run -p chalk-benches --release --bin lineage-scale -- [FILES...]`

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chalk_engine::object_store::{self, ListPage, ObjectStore};
use chalk_engine::{Access, LineageName, Owner, SessionBase, Store, StoreConfig, SyncOutcome, VolumeName};

/// Object store wrapper that counts the bytes written.
struct Counting {
    inner: Arc<dyn ObjectStore>,
    put_bytes: AtomicU64,
    puts: AtomicU64,
}

impl Counting {
    fn count(&self, bytes: u64) {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.put_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl ObjectStore for Counting {
    fn url(&self) -> String {
        self.inner.url()
    }
    fn put(&self, key: &str, data: &[u8]) -> chalk_engine::Result<()> {
        self.count(data.len() as u64);
        self.inner.put(key, data)
    }
    fn put_file(&self, key: &str, path: &Path) -> chalk_engine::Result<()> {
        self.count(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
        self.inner.put_file(key, path)
    }
    fn put_if_absent(&self, key: &str, data: &[u8]) -> chalk_engine::Result<bool> {
        self.count(data.len() as u64);
        self.inner.put_if_absent(key, data)
    }
    fn get(&self, key: &str) -> chalk_engine::Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: u64) -> chalk_engine::Result<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn get_to_file(&self, key: &str, path: &Path) -> chalk_engine::Result<bool> {
        self.inner.get_to_file(key, path)
    }
    fn list(&self, prefix: &str, start_after: Option<&str>, limit: usize) -> chalk_engine::Result<ListPage> {
        self.inner.list(prefix, start_after, limit)
    }
    fn delete(&self, key: &str) -> chalk_engine::Result<()> {
        self.inner.delete(key)
    }
}

fn millis(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn measure(files: u64) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("chalk-lineage-scale-").tempdir_in("/var/tmp")?;
    let config = StoreConfig::with_local_root(dir.path());
    let counting = Arc::new(Counting {
        inner: object_store::open(&config.object_store_url)?,
        put_bytes: AtomicU64::new(0),
        puts: AtomicU64::new(0),
    });
    let store = Store::open_with(config, counting.clone())?;
    let volume = VolumeName::new("scale")?;
    store.create_volume(&volume)?;
    let main = SessionBase::Lineage(LineageName::main());

    let start = Instant::now();
    let session = store.open_session(&volume, main.clone(), Access::Writable)?;
    let owner = Owner::current();
    for i in 0..files {
        let path = format!("d{:04}/f{:07}", i / 1000, i);
        session.write_file_from(&path, &mut &b"x"[..], 0o644, owner)?;
    }
    let base = match session.sync(None)? {
        SyncOutcome::Published(info) => info,
        other => anyhow::bail!("building the volume published nothing: {other:?}"),
    };
    drop(session);
    let build_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let (lineage, _) = store.fork(&volume, base.id, None)?;
    let fork_ms = millis(start);

    let start = Instant::now();
    let forked = store.open_session(&volume, SessionBase::Lineage(lineage), Access::Writable)?;
    let open_ms = millis(start);

    forked.resolve_path(&format!("d{:04}/f{:07}", (files / 2) / 1000, files / 2))?;
    forked.write_file_from(&format!("d{:04}/f{:07}", (files / 2) / 1000, files / 2), &mut &b"changed"[..], 0o644, owner)?;
    counting.put_bytes.store(0, Ordering::Relaxed);
    counting.puts.store(0, Ordering::Relaxed);
    let start = Instant::now();
    forked.sync(None)?;
    let sync_ms = millis(start);
    let sync_bytes = counting.put_bytes.load(Ordering::Relaxed);
    let sync_puts = counting.puts.load(Ordering::Relaxed);
    println!(
        "| {files} | {build_s:.1} s | {fork_ms:.2} ms | {open_ms:.2} ms | {sync_ms:.1} ms | {sync_bytes} B in {sync_puts} objects |"
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() { vec![1_000, 100_000, 1_000_000] } else { sizes };
    println!("| files | build and first sync | fork | session open | sync of one changed file | bytes written by that sync |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for files in sizes {
        measure(files)?;
    }
    Ok(())
}
