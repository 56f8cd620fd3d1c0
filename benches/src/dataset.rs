//! Workloads R1 to R8, W1 and W2: reads and writes of one generated dataset
//! through every system (see [`crate::systems`]).
//!
//! The dataset is one large file (`big.bin`) and one flat directory of small
//! files (`files/`), written once with incompressible bytes, then put into a
//! Chalk volume with `chalk volume put`. Every measurement mounts its system
//! afresh and unmounts it afterwards; only the step named in the workload's
//! description is timed.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::systems::{self, DatasetLocation, Mounted, DATASET_REMOTE_DIR};
use crate::{latest_version, time_put_dir, Bench, ReadCount, Size, System, Unit, Workload, READ_BUFFER_BYTES};

/// Name of the large file in the dataset.
const BIG_FILE: &str = "big.bin";
/// Name of the directory of small files in the dataset.
const FILES_DIR: &str = "files";
/// Size of each small file.
const SMALL_FILE_BYTES: usize = 64 * 1024;
/// Size of each random read of R6.
const RANDOM_READ_BYTES: usize = 4096;
/// Size of each file that R8 creates.
const CREATED_FILE_BYTES: usize = 4096;
/// Most timed passes of R1, whose figure is their mean. One hot pass of
/// 2 GiB lasts about 80 ms natively, so one stall would move a single-pass
/// ratio several times over.
const HOT_READ_PASSES: u32 = 8;
/// R1 stops adding passes once they took this long, so slow peers run one.
const HOT_READ_MIN_SECONDS: f64 = 0.5;
/// Size of each write of W1 and W2.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// How long R8 and W2 wait for a peer to show written files in the native
/// directory after the writer closed them.
const PEER_WRITE_BACK_TIMEOUT: Duration = Duration::from_secs(120);

/// Dimensions of the dataset and of the work of each workload.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dimensions {
    big_bytes: u64,
    small_files: usize,
    random_reads: usize,
    created_files: usize,
    write_bytes: u64,
}

impl Dimensions {
    /// Returns the dimensions of `size`. `full` is what the workloads are
    /// defined with, and `small` scales every step down for the smoke test.
    pub(crate) fn of(size: Size) -> Dimensions {
        match size {
            Size::Full => Dimensions {
                big_bytes: 2 << 30,
                small_files: 20_000,
                random_reads: 20_000,
                created_files: 5_000,
                write_bytes: 1 << 30,
            },
            Size::Small => Dimensions {
                big_bytes: 32 << 20,
                small_files: 500,
                random_reads: 1_000,
                created_files: 200,
                write_bytes: 32 << 20,
            },
        }
    }
}

/// The generated dataset, natively and in a Chalk volume.
pub(crate) struct Dataset {
    native: PathBuf,
    home: PathBuf,
    version: String,
    dims: Dimensions,
    /// Names of the small files, in creation order.
    names: Vec<String>,
}

impl Dataset {
    /// Writes the dataset under `work` and puts it into a new volume.
    pub(crate) fn create(bench: &Bench, size: Size) -> anyhow::Result<Dataset> {
        let dims = Dimensions::of(size);
        let native = bench.work.join("dataset");
        let files_dir = native.join(FILES_DIR);
        fs::create_dir_all(&files_dir).with_context(|| format!("failed to create {}", files_dir.display()))?;

        let mut random = XorShift::new(0x5eed_c4a1);
        let big_path = native.join(BIG_FILE);
        let mut big = File::create(&big_path).with_context(|| format!("failed to create {}", big_path.display()))?;
        let mut chunk = vec![0u8; WRITE_CHUNK_BYTES];
        let mut written = 0;
        while written < dims.big_bytes {
            random.fill(&mut chunk);
            let n = (dims.big_bytes - written).min(chunk.len() as u64) as usize;
            big.write_all(&chunk[..n]).with_context(|| format!("failed to write {}", big_path.display()))?;
            written += n as u64;
        }

        let names: Vec<String> = (0..dims.small_files).map(|i| format!("f{i:05}")).collect();
        let mut content = vec![0u8; SMALL_FILE_BYTES];
        for name in &names {
            random.fill(&mut content);
            let path = files_dir.join(name);
            fs::write(&path, &content).with_context(|| format!("failed to write {}", path.display()))?;
        }

        let home = bench.work.join("dataset-home");
        eprintln!(
            "putting the dataset ({} MiB file, {} files of {} KiB) into a volume",
            dims.big_bytes >> 20,
            dims.small_files,
            SMALL_FILE_BYTES / 1024
        );
        time_put_dir(bench, &home, &native, DATASET_REMOTE_DIR)?;
        let version = latest_version(bench, &home)?;
        Ok(Dataset { native, home, version, dims, names })
    }

    fn location(&self) -> DatasetLocation<'_> {
        DatasetLocation { native: &self.native, home: &self.home, version: &self.version }
    }
}

/// Seeded xorshift64 generator: incompressible bytes and random offsets that
/// are the same in every run.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// The workloads that use the dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    R1,
    R2,
    R3,
    R4,
    R5,
    R6,
    R7,
    R8,
    W1,
    W2,
}

/// Systems of the read workloads, in the order they run.
const READ_SYSTEMS: [System; 6] = [
    System::Native,
    System::ChalkReadOnly,
    System::ChalkWritable,
    System::Bindfs,
    System::RcloneOff,
    System::RcloneFull,
];
/// Systems of the workloads that write through a mount: a read-only mount cannot.
const WRITE_SYSTEMS: [System; 5] = [
    System::Native,
    System::ChalkWritable,
    System::Bindfs,
    System::RcloneOff,
    System::RcloneFull,
];
/// W1 compares the engine's segment log with fio on the same disk.
const LOG_SYSTEMS: [System; 2] = [System::Native, System::ChalkWritable];

/// One of R1 to R8, W1 and W2.
pub(crate) struct DatasetWorkload {
    kind: Kind,
    runs: u32,
}

impl DatasetWorkload {
    pub(crate) fn new(kind: Kind) -> DatasetWorkload {
        DatasetWorkload { kind, runs: 0 }
    }
}

impl Workload for DatasetWorkload {
    fn id(&self) -> &'static str {
        match self.kind {
            Kind::R1 => "R1",
            Kind::R2 => "R2",
            Kind::R3 => "R3",
            Kind::R4 => "R4",
            Kind::R5 => "R5",
            Kind::R6 => "R6",
            Kind::R7 => "R7",
            Kind::R8 => "R8",
            Kind::W1 => "W1",
            Kind::W2 => "W2",
        }
    }

    fn description(&self) -> &'static str {
        match self.kind {
            Kind::R1 => "Sequential read of the large file (2 GiB in full runs) with 128 KiB reads, hot: one untimed read, then timed re-reads that each open the file again. The passes stop after 0.5 s or 8 passes, and the figure is their mean.",
            Kind::R2 => "The same read, cold: the system is mounted afresh and the page, dentry and inode caches are dropped (`echo 3 > /proc/sys/vm/drop_caches`) before the timed read. Chalk reads from the segments of its local cache on disk.",
            Kind::R3 => "Open, read and close each of the small files (20,000 of 64 KiB in full runs) of one directory, warm: one untimed pass, then the timed pass.",
            Kind::R4 => "The same reads, cold: mounted afresh, caches dropped before the timed pass.",
            Kind::R5 => "`lstat` of each of the small files, warm: one untimed pass, then the timed pass.",
            Kind::R6 => "Random 4 KiB `pread`s at 4 KiB-aligned offsets of the large file (20,000 in full runs, same seeded offsets in every run), warm: one untimed pass of the same offsets, then the timed pass.",
            Kind::R7 => "`readdir` of the directory of small files (20,000 entries in full runs) without stat, warm: one untimed listing, then the timed listing.",
            Kind::R8 => "Create and write small files of 4 KiB (5,000 in full runs) in a new directory, then sync. Sync is `syncfs` for native; `chalk volume sync` of the mount for chalk-rw; for the peers, `syncfs` of the native directory once every file shows there at full size (rclone-full runs with `--vfs-write-back 0s`).",
            Kind::W1 => "Append 1 GiB (full runs) in 1 MiB records to a new segment of the engine's log with O_DIRECT io_uring, then fdatasync (chalk-rw: the engine's `OpenSegment` and `DiskWriter` called in this process). native is fio on the same disk: `--rw=write --bs=1M --ioengine=io_uring --direct=1 --iodepth=16 --end_fsync=1`, timed by fio's reported bandwidth.",
            Kind::W2 => "Write one 1 GiB file (full runs) in 1 MiB writes through the mount, then sync: `fsync` for native and the peers (which then wait until the native file has every byte), `chalk volume sync` for chalk-rw.",
        }
    }

    fn unit(&self) -> Unit {
        Unit::Seconds
    }

    fn systems(&self) -> &'static [System] {
        match self.kind {
            Kind::R8 | Kind::W2 => &WRITE_SYSTEMS,
            Kind::W1 => &LOG_SYSTEMS,
            _ => &READ_SYSTEMS,
        }
    }

    fn uses_dataset(&self) -> bool {
        true
    }

    fn work_size(&self, bench: &Bench) -> ReadCount {
        let Some(dataset) = bench.dataset.as_ref() else {
            return ReadCount::default();
        };
        let dims = dataset.dims;
        let small_files = dims.small_files as u64;
        match self.kind {
            Kind::R1 | Kind::R2 => ReadCount { files: 1, bytes: dims.big_bytes },
            Kind::R3 | Kind::R4 => ReadCount { files: small_files, bytes: small_files * SMALL_FILE_BYTES as u64 },
            Kind::R5 | Kind::R7 => ReadCount { files: small_files, bytes: 0 },
            Kind::R6 => ReadCount { files: 1, bytes: (dims.random_reads * RANDOM_READ_BYTES) as u64 },
            Kind::R8 => ReadCount {
                files: dims.created_files as u64,
                bytes: (dims.created_files * CREATED_FILE_BYTES) as u64,
            },
            Kind::W1 | Kind::W2 => ReadCount { files: 1, bytes: dims.write_bytes },
        }
    }

    fn measure(&mut self, system: System, bench: &Bench) -> anyhow::Result<f64> {
        let dataset = bench.dataset.as_ref().context("the dataset was not created before the workloads ran")?;
        self.runs += 1;
        let label = format!("{}-{}", self.id().to_ascii_lowercase(), self.runs);
        if self.kind == Kind::W1 {
            return match system {
                System::Native => time_fio_write(bench, dataset.dims.write_bytes, &label),
                _ => time_log_append(bench, dataset.dims.write_bytes, &label),
            };
        }

        let mounted = systems::mount_system(bench, system, &dataset.location(), &label)?;
        let result = self.measure_mounted(system, bench, dataset, &mounted, &label);
        let unmounted = mounted.unmount(bench);
        let seconds = result?;
        unmounted?;
        if matches!(self.kind, Kind::R8 | Kind::W2) {
            // Remove what the peers and native wrote, so every repetition
            // starts from the same native directory. Chalk writes stay in the
            // volume's lineage, which the read-only mounts do not see.
            let written = dataset.native.join(&label);
            if written.exists() {
                fs::remove_dir_all(&written).with_context(|| format!("failed to remove {}", written.display()))?;
            }
        }
        Ok(seconds)
    }
}

impl DatasetWorkload {
    fn measure_mounted(
        &self,
        system: System,
        bench: &Bench,
        dataset: &Dataset,
        mounted: &Mounted,
        label: &str,
    ) -> anyhow::Result<f64> {
        let root = &mounted.root;
        let big = root.join(BIG_FILE);
        let files = root.join(FILES_DIR);
        let dims = dataset.dims;
        match self.kind {
            Kind::R1 => {
                read_big(&big, dims.big_bytes)?;
                let mut total = 0.0;
                let mut passes = 0;
                while passes < HOT_READ_PASSES && total < HOT_READ_MIN_SECONDS {
                    total += timed(|| read_big(&big, dims.big_bytes))?;
                    passes += 1;
                }
                Ok(total / f64::from(passes))
            }
            Kind::R2 => {
                systems::drop_caches()?;
                timed(|| read_big(&big, dims.big_bytes))
            }
            Kind::R3 => {
                read_small_files(&files, &dataset.names)?;
                timed(|| read_small_files(&files, &dataset.names))
            }
            Kind::R4 => {
                systems::drop_caches()?;
                timed(|| read_small_files(&files, &dataset.names))
            }
            Kind::R5 => {
                stat_files(&files, &dataset.names)?;
                timed(|| stat_files(&files, &dataset.names))
            }
            Kind::R6 => {
                let offsets = random_offsets(dims.big_bytes, dims.random_reads);
                random_reads(&big, &offsets)?;
                timed(|| random_reads(&big, &offsets))
            }
            Kind::R7 => {
                list_dir(&files, dims.small_files)?;
                timed(|| list_dir(&files, dims.small_files))
            }
            Kind::R8 => {
                let dir = root.join(label);
                timed(|| {
                    create_files(&dir, dims.created_files)?;
                    sync_written(bench, system, dataset, mounted, label, &written_sizes_r8(dims.created_files))
                })
            }
            Kind::W2 => {
                let dir = root.join(label);
                timed(|| {
                    write_large_file(&dir, dims.write_bytes, system != System::ChalkWritable)?;
                    sync_written(bench, system, dataset, mounted, label, &[(large_name(), dims.write_bytes)])
                })
            }
            Kind::W1 => bail!("W1 does not mount a system"),
        }
    }
}

fn timed(step: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let start = Instant::now();
    step()?;
    Ok(start.elapsed().as_secs_f64())
}

fn read_big(path: &Path, expected: u64) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let bytes = crate::read_file(path, &mut buffer)?;
    ensure!(bytes == expected, "read {bytes} bytes from {}, expected {expected}", path.display());
    Ok(())
}

fn read_small_files(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    for name in names {
        let path = dir.join(name);
        let bytes = crate::read_file(&path, &mut buffer)?;
        ensure!(
            bytes == SMALL_FILE_BYTES as u64,
            "read {bytes} bytes from {}, expected {SMALL_FILE_BYTES}",
            path.display()
        );
    }
    Ok(())
}

fn stat_files(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        let path = dir.join(name);
        let metadata = fs::symlink_metadata(&path).with_context(|| format!("failed to stat {}", path.display()))?;
        ensure!(
            metadata.len() == SMALL_FILE_BYTES as u64,
            "{} has {} bytes, expected {SMALL_FILE_BYTES}",
            path.display(),
            metadata.len()
        );
    }
    Ok(())
}

fn random_offsets(file_bytes: u64, count: usize) -> Vec<u64> {
    let blocks = file_bytes / RANDOM_READ_BYTES as u64;
    let mut random = XorShift::new(0x0ff5_e75);
    (0..count).map(|_| random.next() % blocks * RANDOM_READ_BYTES as u64).collect()
}

fn random_reads(path: &Path, offsets: &[u64]) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let mut buffer = [0u8; RANDOM_READ_BYTES];
    for &offset in offsets {
        file.read_exact_at(&mut buffer, offset)
            .with_context(|| format!("failed to read {RANDOM_READ_BYTES} bytes at {offset} of {}", path.display()))?;
    }
    Ok(())
}

fn list_dir(dir: &Path, expected: usize) -> anyhow::Result<()> {
    let mut entries = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        entry.with_context(|| format!("failed to list {}", dir.display()))?;
        entries += 1;
    }
    ensure!(entries == expected, "{} lists {entries} entries, expected {expected}", dir.display());
    Ok(())
}

fn created_name(index: usize) -> String {
    format!("c{index:05}")
}

fn large_name() -> String {
    "large.bin".to_owned()
}

fn written_sizes_r8(count: usize) -> Vec<(String, u64)> {
    (0..count).map(|i| (created_name(i), CREATED_FILE_BYTES as u64)).collect()
}

fn create_files(dir: &Path, count: usize) -> anyhow::Result<()> {
    fs::create_dir(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut content = vec![0u8; CREATED_FILE_BYTES];
    let mut random = XorShift::new(count as u64);
    for index in 0..count {
        random.fill(&mut content);
        let path = dir.join(created_name(index));
        fs::write(&path, &content).with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

fn write_large_file(dir: &Path, bytes: u64, fsync: bool) -> anyhow::Result<()> {
    fs::create_dir(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let path = dir.join(large_name());
    let mut file = File::create(&path).with_context(|| format!("failed to create {}", path.display()))?;
    let mut chunk = vec![0u8; WRITE_CHUNK_BYTES];
    let mut random = XorShift::new(bytes);
    let mut written = 0;
    while written < bytes {
        random.fill(&mut chunk);
        let n = (bytes - written).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n]).with_context(|| format!("failed to write {}", path.display()))?;
        written += n as u64;
    }
    if fsync {
        file.sync_all().with_context(|| format!("fsync of {} failed", path.display()))?;
    }
    Ok(())
}

/// Makes what a write workload wrote under `label` durable, the way each
/// system offers: see the descriptions of R8 and W2.
fn sync_written(
    bench: &Bench,
    system: System,
    dataset: &Dataset,
    mounted: &Mounted,
    label: &str,
    expected: &[(String, u64)],
) -> anyhow::Result<()> {
    match system {
        System::Native => systems::sync_file_system(&dataset.native),
        System::ChalkWritable => {
            let mount_point = mounted.root.parent().context("a Chalk mount root has a parent")?;
            bench.chalk.run(&dataset.home, [OsStr::new("volume"), "sync".as_ref(), mount_point.as_os_str()])?;
            Ok(())
        }
        _ => {
            let native_dir = dataset.native.join(label);
            let start = Instant::now();
            for (name, size) in expected {
                let path = native_dir.join(name);
                while fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < *size {
                    ensure!(
                        start.elapsed() < PEER_WRITE_BACK_TIMEOUT,
                        "{} did not write {} back to {} within {} s",
                        system.as_str(),
                        name,
                        native_dir.display(),
                        PEER_WRITE_BACK_TIMEOUT.as_secs()
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            systems::sync_file_system(&dataset.native)
        }
    }
}

/// Times the engine's segment log appending `bytes` in 1 MiB records, then
/// syncing. The segment is written under the work directory and removed.
fn time_log_append(bench: &Bench, bytes: u64, label: &str) -> anyhow::Result<f64> {
    use chalk_engine::format::record::{RecordType, SegmentHeader};
    use chalk_engine::io::{DiskWriter, IoMode};
    use chalk_engine::segment::OpenSegment;
    use chalk_engine::{SegmentId, SessionId};

    let dir = bench.work.join(label);
    fs::create_dir(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let mut record = vec![0u8; WRITE_CHUNK_BYTES];
    XorShift::new(bytes).fill(&mut record);
    let mode = IoMode::from_env().map_err(anyhow::Error::msg)?;
    let header = SegmentHeader {
        segment: SegmentId::generate(),
        session: SessionId::generate(),
        volume: crate::VOLUME.to_owned(),
    };

    let start = Instant::now();
    let mut writer = DiskWriter::new(mode).context("failed to set up the segment log's disk writer")?;
    let mut segment = OpenSegment::create(&dir, &header)?;
    let mut appended = 0;
    while appended < bytes {
        segment.push_record(Some(&mut writer), RecordType::Data, &[&record])?;
        appended += record.len() as u64;
    }
    segment.fsync(&mut writer)?;
    let seconds = start.elapsed().as_secs_f64();

    if !writer.uses_uring() {
        eprintln!("W1: io_uring is unavailable, so the segment log wrote with pwrite");
    }
    fs::remove_dir_all(&dir).with_context(|| format!("failed to remove {}", dir.display()))?;
    Ok(seconds)
}

/// Runs fio's direct io_uring sequential write of `bytes` and returns the
/// seconds that its reported bandwidth implies.
fn time_fio_write(bench: &Bench, bytes: u64, label: &str) -> anyhow::Result<f64> {
    let path = bench.work.join(format!("{label}-fio.dat"));
    let output = Command::new("fio")
        .arg("--name=w1")
        .arg(format!("--filename={}", path.display()))
        .args(["--rw=write", "--bs=1M", "--ioengine=io_uring", "--direct=1", "--iodepth=16", "--end_fsync=1"])
        .arg(format!("--size={bytes}"))
        .arg("--output-format=json")
        .stdin(Stdio::null())
        .output()
        .context("failed to run fio, which W1 compares against; run scripts/setup.sh")?;
    let _ = fs::remove_file(&path);
    ensure!(
        output.status.success(),
        "fio failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let mut stdout = String::new();
    output.stdout.as_slice().read_to_string(&mut stdout).context("fio printed invalid UTF-8")?;
    // fio may print warnings before the JSON document.
    let json_start = stdout.find('{').context("fio printed no JSON")?;
    let report: serde_json::Value = serde_json::from_str(&stdout[json_start..]).context("fio printed invalid JSON")?;
    let write = &report["jobs"][0]["write"];
    let io_bytes = write["io_bytes"].as_f64().context("fio's JSON has no jobs[0].write.io_bytes")?;
    let bandwidth = write["bw_bytes"].as_f64().context("fio's JSON has no jobs[0].write.bw_bytes")?;
    ensure!(
        io_bytes as u64 == bytes && bandwidth > 0.0,
        "fio wrote {io_bytes} bytes at {bandwidth} B/s, expected {bytes} bytes"
    );
    Ok(io_bytes / bandwidth)
}
