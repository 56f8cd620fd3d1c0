//! `chalk-benches`: times Chalk volumes against the native file system and
//! the peer FUSE file systems bindfs and rclone.
//!
//! The harness stages one input tree (P1, R0) and one generated dataset (R1
//! to W2, see `dataset`), prepares each selected workload once, then runs
//! `--reps` repetitions. Within a repetition every system of a
//! workload runs back to back, so each per-repetition ratio compares runs made
//! under the same machine load. It prints a table, writes
//! `benches/results/latest.json`, draws `docs/benchmarks.svg` and regenerates
//! its section of `docs/benchmarks.md`. With `--output DIR` it writes the JSON
//! and the chart to DIR and leaves the docs alone.
//!
//! To add a workload, implement [`Workload`] and list it in [`all_workloads`].

use std::ffi::{c_int, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::dataset::{Dataset, DatasetWorkload, Kind};

mod chart;
mod dataset;
mod s3_cold_read;
mod systems;
mod targets;

/// Stdlib packages staged by `--size small`.
const SMALL_PACKAGES: [&str; 4] = ["json", "email", "asyncio", "unittest"];

/// Directory names left out when staging the stdlib: installed packages and
/// byte code, which change between machines and runs.
const EXCLUDED_NAMES: [&str; 2] = ["site-packages", "__pycache__"];

/// Minimum number of files in a `--size full` tree. The stdlib alone has
/// fewer (about 2,450 in Python 3.11), which is why /usr/include is added.
const MIN_FULL_TREE_FILES: u64 = 5000;

/// Buffer size of the cat-equivalent reader: the read size of GNU cat 9.1
/// on ext4, as shown by strace.
const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Name of the volume every workload creates in its own store.
const VOLUME: &str = "bench";

/// Path inside the volume under which the tree is put.
const REMOTE_DIR: &str = "src";

const DOCS_BEGIN_MARKER: &str = "<!-- bench:begin -->";
const DOCS_END_MARKER: &str = "<!-- bench:end -->";
/// Markers of the section of the workloads on an S3 server.
const DOCS_S3_BEGIN_MARKER: &str = "<!-- bench:s3:begin -->";
const DOCS_S3_END_MARKER: &str = "<!-- bench:s3:end -->";

/// Text written above the markers when `docs/benchmarks.md` does not exist yet.
const DOCS_INTRO: &str = "\
# Benchmarks

`chalk-benches` (in `benches/`) times Chalk volumes against the native file
system of the same machine and against two peer FUSE file systems over the
same native directory: bindfs, and `rclone mount` with `--vfs-cache-mode off`
and `full`. Each run writes its config and cache under the run's temporary
directory, never the user's. It stages its inputs once, then runs each
workload for a number of repetitions. Within a repetition, every system of a
workload runs back to back, so that each ratio compares runs made under the
same machine load. The ratio to native is the native time divided by the
system's time, so 1.0 is native speed and higher is faster; the ratio to the
best peer is computed the same way against the peer with the lowest median.
The tables give the median of the per-repetition ratios. On a busy machine
the absolute times can vary several times over between runs, so compare
ratios rather than seconds.

The harness runs as root: the cold workloads drop the page cache
(`echo 3 > /proc/sys/vm/drop_caches`). It needs bindfs, rclone and fio,
which `scripts/setup.sh` installs. Outside CI a missing peer is skipped
with a warning; in CI (`CI` set) it is an error. Build the `chalk` binary
first, then run the harness from the repository root:

```sh
cargo build --release -p chalk-tools
cargo run -p chalk-benches --release -- --size full --reps 3
cargo run -p chalk-benches --release -- R1 R3 --size small --reps 1
```

`--size small` runs every workload on a scaled-down dataset in about 30
seconds, and the test suite runs it once. Each run writes
`benches/results/latest.json` (one record per workload and system, with
`median`, `min`, `max`, `ratio_to_native` and `ratio_to_best_peer`), draws
`docs/benchmarks.svg` and replaces the text between the two marker comments
below. Text outside the markers is kept.
";

/// Signal number of the first SIGINT, SIGTERM or SIGHUP received, or 0.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

/// Times Chalk volumes against the native file system of this machine.
#[derive(Parser, Debug)]
#[command(name = "chalk-benches", about, long_about = None)]
struct Args {
    /// Workload ids to run, such as P1, R1 or W2 (default: all but S1).
    workloads: Vec<String>,

    /// Input size. `full`: the python3 stdlib plus /usr/include (about 10,000
    /// files) for P1 and R0, and a 2 GiB file plus 20,000 files of 64 KiB for
    /// R1 to W2. `small`: four stdlib packages, a 32 MiB file and 500 files.
    #[arg(long, value_enum, default_value_t = Size::Full)]
    size: Size,

    /// Repetitions of every workload and system.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    reps: u32,

    /// Write latest.json to this directory and do not update docs/benchmarks.md.
    #[arg(long, value_name = "DIR")]
    output: Option<PathBuf>,

    /// Directory for the staged tree, stores and mount points (default:
    /// $TMPDIR unless it is tmpfs, else /var/tmp). Must not be tmpfs, because
    /// the engine opens its segment log with O_DIRECT.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Size {
    Small,
    Full,
}

impl Size {
    fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Full => "full",
        }
    }
}

// ---------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------

/// A system that a workload measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    /// The native file system, read by this process.
    Native,
    /// A read-only mount of a version through the `chalk` FUSE driver.
    ChalkReadOnly,
    /// A writable mount of the volume's main lineage.
    ChalkWritable,
    /// bindfs over the native directory.
    Bindfs,
    /// `rclone mount` of the native directory with `--vfs-cache-mode off`.
    RcloneOff,
    /// `rclone mount` of the native directory with `--vfs-cache-mode full`.
    RcloneFull,
    /// The `chalk volume put` command.
    ChalkPut,
    /// A raw `aws-sdk-s3` client that reads objects with parallel ranged GETs.
    S3RangedGet,
    /// A read-only mount of a version in S3 on an empty local root.
    ChalkColdS3,
}

impl System {
    fn as_str(self) -> &'static str {
        match self {
            System::Native => "native",
            System::ChalkReadOnly => "chalk-ro",
            System::ChalkWritable => "chalk-rw",
            System::Bindfs => "bindfs",
            System::RcloneOff => "rclone-off",
            System::RcloneFull => "rclone-full",
            System::ChalkPut => "chalk-put",
            System::S3RangedGet => "s3-ranged-get",
            System::ChalkColdS3 => "chalk-s3-cold",
        }
    }
}

/// Unit of a workload's samples.
#[derive(Clone, Copy, Debug)]
enum Unit {
    /// Wall-clock seconds, where lower is better.
    Seconds,
}

impl Unit {
    fn symbol(self) -> &'static str {
        match self {
            Unit::Seconds => "s",
        }
    }

    /// Speed of `measured` relative to `baseline`: 1.0 is equal, higher is faster.
    fn speed_ratio(self, baseline: f64, measured: f64) -> f64 {
        match self {
            Unit::Seconds => baseline / measured,
        }
    }
}

/// Group of workloads, which decides the results file and docs section they report to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Group {
    /// Workloads on the local machine alone, measured against native reads.
    Local,
    /// Workloads that need the S3 test server, measured against a raw S3
    /// client. They run only when named on the command line.
    S3,
}

impl Group {
    /// Returns the system that every workload of the group measures first.
    fn baseline(self) -> System {
        match self {
            Group::Local => System::Native,
            Group::S3 => System::S3RangedGet,
        }
    }

    fn json_name(self) -> &'static str {
        match self {
            Group::Local => "latest.json",
            Group::S3 => "s3-latest.json",
        }
    }

    /// File name of the group's bar chart.
    fn chart_name(self) -> &'static str {
        match self {
            Group::Local => "benchmarks.svg",
            Group::S3 => "benchmarks-s3.svg",
        }
    }

    fn docs_markers(self) -> (&'static str, &'static str) {
        match self {
            Group::Local => (DOCS_BEGIN_MARKER, DOCS_END_MARKER),
            Group::S3 => (DOCS_S3_BEGIN_MARKER, DOCS_S3_END_MARKER),
        }
    }
}

/// One benchmark. The harness calls `prepare` once, then `measure` once per
/// repetition for each of `systems`, in order, then `finish`.
trait Workload {
    /// Short id used on the command line and in the results, such as `P1`.
    fn id(&self) -> &'static str;

    /// Returns what is timed and against what, for the table and the docs.
    fn description(&self) -> &'static str;

    fn unit(&self) -> Unit;

    /// Systems in the order they run within a repetition. The first one is
    /// the baseline of the ratios and must be the group's [`Group::baseline`].
    fn systems(&self) -> &'static [System];

    fn group(&self) -> Group {
        Group::Local
    }

    /// Returns whether the workload reads or writes the generated dataset,
    /// which the harness then creates before any workload is prepared.
    fn uses_dataset(&self) -> bool {
        false
    }

    /// Files and bytes one repetition reads or writes, for the results.
    fn work_size(&self, bench: &Bench) -> ReadCount {
        bench.tree.count
    }

    /// Sets up state shared by all repetitions. Not timed.
    fn prepare(&mut self, _bench: &Bench) -> anyhow::Result<()> {
        Ok(())
    }

    /// Runs one repetition of `system` and returns its sample in [`Workload::unit`].
    fn measure(&mut self, system: System, bench: &Bench) -> anyhow::Result<f64>;

    /// Removes what `prepare` set up outside the work directory. Not timed.
    fn finish(&mut self, _bench: &Bench) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Returns every workload, in the order they run.
fn all_workloads() -> Vec<Box<dyn Workload>> {
    vec![
        Box::new(PutTree::default()),
        Box::new(ReadVersionMount::default()),
        Box::new(DatasetWorkload::new(Kind::R1)),
        Box::new(DatasetWorkload::new(Kind::R2)),
        Box::new(DatasetWorkload::new(Kind::R3)),
        Box::new(DatasetWorkload::new(Kind::R4)),
        Box::new(DatasetWorkload::new(Kind::R5)),
        Box::new(DatasetWorkload::new(Kind::R6)),
        Box::new(DatasetWorkload::new(Kind::R7)),
        Box::new(DatasetWorkload::new(Kind::R8)),
        Box::new(DatasetWorkload::new(Kind::W1)),
        Box::new(DatasetWorkload::new(Kind::W2)),
        Box::new(s3_cold_read::ColdS3Read::default()),
    ]
}

/// P1: `chalk volume put` of the tree into a new volume.
#[derive(Default)]
struct PutTree {
    runs: u32,
}

impl Workload for PutTree {
    fn id(&self) -> &'static str {
        "P1"
    }

    fn description(&self) -> &'static str {
        "Put the tree into a new volume. Timed: the whole `chalk volume put NAME TREE src` process, each \
         repetition in a fresh CHALK_HOME. Compared with reading every file of the tree natively."
    }

    fn unit(&self) -> Unit {
        Unit::Seconds
    }

    fn systems(&self) -> &'static [System] {
        &[System::Native, System::ChalkPut]
    }

    fn measure(&mut self, system: System, bench: &Bench) -> anyhow::Result<f64> {
        match system {
            System::Native => bench.time_native_read(),
            System::ChalkPut => {
                self.runs += 1;
                let home = bench.work.join(format!("p1-home-{}", self.runs));
                let seconds = time_put(bench, &home);
                // Every repetition starts from an empty store, and the stores
                // would otherwise fill the disk on large trees.
                fs::remove_dir_all(&home).with_context(|| format!("failed to remove the store {}", home.display()))?;
                seconds
            }
            _ => bail!("P1 does not measure {}", system.as_str()),
        }
    }
}

fn time_put(bench: &Bench, home: &Path) -> anyhow::Result<f64> {
    time_put_dir(bench, home, &bench.tree.path, REMOTE_DIR)
}

/// Creates a store at `home` with an empty volume, then times `chalk volume
/// put` of the local directory `local` to `remote` in the volume.
fn time_put_dir(bench: &Bench, home: &Path, local: &Path, remote: &str) -> anyhow::Result<f64> {
    fs::create_dir(home).with_context(|| format!("failed to create the store directory {}", home.display()))?;
    bench
        .chalk
        .run(home, [OsStr::new("volume"), "create".as_ref(), VOLUME.as_ref()])?;
    let start = Instant::now();
    bench.chalk.run(
        home,
        [
            OsStr::new("volume"),
            "put".as_ref(),
            VOLUME.as_ref(),
            local.as_os_str(),
            remote.as_ref(),
        ],
    )?;
    Ok(start.elapsed().as_secs_f64())
}

/// Returns the id of the newest version of the volume in the store at `home`.
fn latest_version(bench: &Bench, home: &Path) -> anyhow::Result<String> {
    let versions = bench.chalk.run(
        home,
        [
            OsStr::new("volume"),
            "versions".as_ref(),
            VOLUME.as_ref(),
            "--json".as_ref(),
        ],
    )?;
    let versions: serde_json::Value =
        serde_json::from_str(&versions).context("`chalk volume versions --json` printed invalid JSON")?;
    // Versions are listed oldest first.
    let id = versions
        .as_array()
        .and_then(|list| list.last())
        .and_then(|version| version["id"].as_str())
        .with_context(|| format!("`chalk volume versions --json` printed no version id: {versions}"))?
        .to_owned();
    Ok(id)
}

/// R0: reading the tree through a read-only mount of the version that the
/// P1 command creates.
#[derive(Default)]
struct ReadVersionMount {
    /// Store and version id, set by `prepare`.
    prepared: Option<(PathBuf, String)>,
    runs: u32,
}

impl Workload for ReadVersionMount {
    fn id(&self) -> &'static str {
        "R0"
    }

    fn description(&self) -> &'static str {
        "Read the tree through a read-only mount (`chalk volume mount NAME DIR --version ID --daemon`) of the \
         version that the P1 command creates. Timed: walking the mount and reading every file, without mount and \
         unmount. Each repetition mounts afresh, so the kernel caches start cold, while the local segment cache is \
         warm. Compared with the same walk natively."
    }

    fn unit(&self) -> Unit {
        Unit::Seconds
    }

    fn systems(&self) -> &'static [System] {
        &[System::Native, System::ChalkReadOnly]
    }

    fn prepare(&mut self, bench: &Bench) -> anyhow::Result<()> {
        let home = bench.work.join("r0-home");
        time_put(bench, &home)?;
        let id = latest_version(bench, &home)?;
        eprintln!("R0: mounting version {id} of the store {}", home.display());
        self.prepared = Some((home, id));
        Ok(())
    }

    fn measure(&mut self, system: System, bench: &Bench) -> anyhow::Result<f64> {
        match system {
            System::Native => bench.time_native_read(),
            System::ChalkReadOnly => {
                let (home, version) = self
                    .prepared
                    .as_ref()
                    .context("R0 was measured before it was prepared")?;
                self.runs += 1;
                let mount_point = bench.work.join(format!("r0-mnt-{}", self.runs));
                let seconds = time_mounted_read(bench, home, version, &mount_point);
                fs::remove_dir(&mount_point)
                    .with_context(|| format!("failed to remove the mount point {}", mount_point.display()))?;
                seconds
            }
            _ => bail!("R0 does not measure {}", system.as_str()),
        }
    }
}

fn time_mounted_read(bench: &Bench, home: &Path, version: &str, mount_point: &Path) -> anyhow::Result<f64> {
    fs::create_dir(mount_point)
        .with_context(|| format!("failed to create the mount point {}", mount_point.display()))?;
    // The guard exists before the mount command runs, so a mount that
    // half-succeeded is removed on every exit path.
    let guard = MountGuard {
        dir: mount_point.to_owned(),
    };
    bench.chalk.run(
        home,
        [
            OsStr::new("volume"),
            "mount".as_ref(),
            VOLUME.as_ref(),
            mount_point.as_os_str(),
            "--version".as_ref(),
            version.as_ref(),
            "--daemon".as_ref(),
        ],
    )?;
    ensure!(
        is_mounted(mount_point)?,
        "`chalk volume mount` succeeded but {} is not a mount point",
        mount_point.display()
    );

    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let start = Instant::now();
    let count = read_tree(&mount_point.join(REMOTE_DIR), &mut buffer)?;
    let seconds = start.elapsed().as_secs_f64();
    bench.tree.check_read(count, "the mount")?;

    bench.chalk.run(
        home,
        [OsStr::new("volume"), "unmount".as_ref(), mount_point.as_os_str()],
    )?;
    ensure!(
        !is_mounted(mount_point)?,
        "{} is still mounted after `chalk volume unmount`",
        mount_point.display()
    );
    drop(guard);
    Ok(seconds)
}

// ---------------------------------------------------------------------------
// Shared state: the chalk binary, the work directory and the tree
// ---------------------------------------------------------------------------

/// State shared by all workloads of one run.
struct Bench {
    chalk: Chalk,
    /// Canonical work directory, which contains the stores and mount points.
    work: PathBuf,
    tree: Tree,
    /// The dataset of R1 to W2, created only when one of them runs.
    dataset: Option<Dataset>,
}

impl Bench {
    /// Times one native walk and read of the tree.
    fn time_native_read(&self) -> anyhow::Result<f64> {
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        let start = Instant::now();
        let count = read_tree(&self.tree.path, &mut buffer)?;
        let seconds = start.elapsed().as_secs_f64();
        self.tree.check_read(count, "the native tree")?;
        Ok(seconds)
    }
}

/// The `chalk` binary under test.
struct Chalk {
    binary: PathBuf,
}

impl Chalk {
    /// Finds the binary: `CHALK_BIN`, else `release/chalk` in the target
    /// directory that contains this harness, else `target/release/chalk` of the
    /// workspace.
    fn locate() -> anyhow::Result<Chalk> {
        if let Some(path) = std::env::var_os("CHALK_BIN") {
            let binary = PathBuf::from(path);
            ensure!(binary.is_file(), "CHALK_BIN={} is not a file", binary.display());
            return Ok(Chalk { binary });
        }
        let mut candidates = Vec::new();
        // This harness runs from <target>/<profile>/chalk-benches.
        if let Some(target) = std::env::current_exe()
            .ok()
            .as_deref()
            .and_then(Path::parent)
            .and_then(Path::parent)
        {
            candidates.push(target.join("release/chalk"));
        }
        let workspace_binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/chalk");
        candidates.push(workspace_binary);
        match candidates.iter().find(|path| path.is_file()) {
            Some(binary) => Ok(Chalk { binary: binary.clone() }),
            None => bail!(
                "chalk binary not found at {}. Run `cargo build --release -p chalk-tools` first, or set CHALK_BIN",
                candidates
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        }
    }

    /// Runs `chalk ARGS` on the store at `home` and returns its stdout.
    fn run<'a>(&self, home: &Path, args: impl IntoIterator<Item = &'a OsStr>) -> anyhow::Result<String> {
        self.run_with_env(home, args, &[])
    }

    /// Runs `chalk ARGS` on the store at `home` with the variables of `env`
    /// added to its environment, and returns its stdout.
    fn run_with_env<'a>(
        &self,
        home: &Path,
        args: impl IntoIterator<Item = &'a OsStr>,
        env: &[(&str, String)],
    ) -> anyhow::Result<String> {
        let args: Vec<&OsStr> = args.into_iter().collect();
        let command_line = format!(
            "chalk {}",
            args.iter()
                .map(|arg| arg.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let output = Command::new(&self.binary)
            .args(&args)
            .env("CHALK_HOME", home)
            // The default object store is file://$CHALK_HOME/objects.
            .env_remove("CHALK_STORE")
            .envs(env.iter().map(|(name, value)| (*name, value)))
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("failed to start {}", self.binary.display()))?;
        if !output.status.success() {
            bail!(
                "`{command_line}` with CHALK_HOME={} failed with {}: {}",
                home.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        String::from_utf8(output.stdout).with_context(|| format!("`{command_line}` printed invalid UTF-8"))
    }
}

/// Files and bytes found by one walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ReadCount {
    files: u64,
    bytes: u64,
}

/// The staged input tree.
struct Tree {
    path: PathBuf,
    /// Regular files and their total size.
    count: ReadCount,
    directories: u64,
    /// Symbolic links, which are copied as links and never read.
    symlinks: u64,
    /// Description of the source directories, for the docs.
    origin: String,
}

impl Tree {
    /// Fails unless a walk of `source` found exactly the staged files and bytes.
    fn check_read(&self, count: ReadCount, source: &str) -> anyhow::Result<()> {
        ensure!(
            count == self.count,
            "reading {source} found {} files and {} bytes, expected {} files and {} bytes",
            count.files,
            count.bytes,
            self.count.files,
            self.count.bytes
        );
        Ok(())
    }
}

/// Walks `root` and reads every regular file like `cat`: open, read to the
/// end into `buffer`, close, in one thread. Symbolic links are not followed.
fn read_tree(root: &Path, buffer: &mut [u8]) -> anyhow::Result<ReadCount> {
    let mut count = ReadCount::default();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))? {
            let entry = entry.with_context(|| format!("failed to list {}", dir.display()))?;
            let file_type = entry
                .file_type()
                .with_context(|| format!("failed to stat {}", entry.path().display()))?;
            if file_type.is_dir() {
                pending.push(entry.path());
            } else if file_type.is_file() {
                count.bytes += read_file(&entry.path(), buffer)?;
                count.files += 1;
            }
        }
    }
    Ok(count)
}

fn read_file(path: &Path, buffer: &mut [u8]) -> anyhow::Result<u64> {
    let mut file = File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    let mut bytes = 0;
    loop {
        let n = file
            .read(buffer)
            .with_context(|| format!("failed to read {}", path.display()))?;
        if n == 0 {
            return Ok(bytes);
        }
        bytes += n as u64;
    }
}

// ---------------------------------------------------------------------------
// Staging the tree
// ---------------------------------------------------------------------------

/// Copies the input tree of `size` to `dest` and counts it.
fn stage_tree(size: Size, dest: &Path) -> anyhow::Result<Tree> {
    let stdlib = python_stdlib()?;
    fs::create_dir(dest).with_context(|| format!("failed to create {}", dest.display()))?;
    match size {
        Size::Small => {
            for package in SMALL_PACKAGES {
                copy_tree(&stdlib.join(package), &dest.join(package))?;
            }
        }
        Size::Full => {
            copy_tree(&stdlib, dest)?;
            let include = Path::new("/usr/include");
            ensure!(include.is_dir(), "/usr/include is missing; install libc6-dev");
            copy_tree(include, &dest.join("usr-include"))?;
        }
    }

    let mut tree = count_tree(dest)?;
    tree.origin = match size {
        Size::Full => format!(
            "the python3 stdlib at {} without site-packages and __pycache__, plus /usr/include as usr-include/",
            stdlib.display()
        ),
        Size::Small => format!(
            "the {} packages of the python3 stdlib at {}, without __pycache__",
            SMALL_PACKAGES.join(", "),
            stdlib.display()
        ),
    };
    ensure!(tree.count.files > 0, "no files were staged from {}", stdlib.display());
    if size == Size::Full {
        ensure!(
            tree.count.files >= MIN_FULL_TREE_FILES,
            "{} and /usr/include have {} files, fewer than the {MIN_FULL_TREE_FILES} of the full tree",
            stdlib.display(),
            tree.count.files
        );
    }
    Ok(tree)
}

/// Returns the stdlib directory of the machine's `python3`.
fn python_stdlib() -> anyhow::Result<PathBuf> {
    let output = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"])
        .stdin(Stdio::null())
        .output()
        .context("failed to run python3, which names the stdlib to stage; install python3")?;
    ensure!(
        output.status.success(),
        "python3 failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let stdlib = PathBuf::from(
        String::from_utf8(output.stdout)
            .context("python3 printed a non-UTF-8 stdlib path")?
            .trim(),
    );
    ensure!(
        stdlib.is_dir(),
        "python3 names the stdlib {}, which is not a directory",
        stdlib.display()
    );
    Ok(stdlib)
}

/// Copies files, directories and symbolic links from `source` to `dest`,
/// skipping [`EXCLUDED_NAMES`] at any depth and other file types.
fn copy_tree(source: &Path, dest: &Path) -> anyhow::Result<()> {
    let mut pending = vec![(source.to_owned(), dest.to_owned())];
    while let Some((from, to)) = pending.pop() {
        if !to.exists() {
            fs::create_dir(&to).with_context(|| format!("failed to create {}", to.display()))?;
        }
        for entry in fs::read_dir(&from).with_context(|| format!("failed to list {}", from.display()))? {
            let entry = entry.with_context(|| format!("failed to list {}", from.display()))?;
            let name = entry.file_name();
            if EXCLUDED_NAMES.iter().any(|excluded| name == OsStr::new(excluded)) {
                continue;
            }
            let (entry_from, entry_to) = (entry.path(), to.join(&name));
            let file_type = entry
                .file_type()
                .with_context(|| format!("failed to stat {}", entry_from.display()))?;
            if file_type.is_dir() {
                pending.push((entry_from, entry_to));
            } else if file_type.is_file() {
                fs::copy(&entry_from, &entry_to)
                    .with_context(|| format!("failed to copy {} to {}", entry_from.display(), entry_to.display()))?;
            } else if file_type.is_symlink() {
                let target = fs::read_link(&entry_from)
                    .with_context(|| format!("failed to read the link {}", entry_from.display()))?;
                std::os::unix::fs::symlink(&target, &entry_to)
                    .with_context(|| format!("failed to create the link {}", entry_to.display()))?;
            }
        }
    }
    Ok(())
}

/// Counts regular files, bytes, directories and links under `root`, without
/// reading file contents.
fn count_tree(root: &Path) -> anyhow::Result<Tree> {
    let mut tree = Tree {
        path: root.to_owned(),
        count: ReadCount::default(),
        directories: 0,
        symlinks: 0,
        origin: String::new(),
    };
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("failed to list {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("failed to list {}", dir.display()))?
                .path();
            let metadata = fs::symlink_metadata(&path).with_context(|| format!("failed to stat {}", path.display()))?;
            if metadata.is_dir() {
                tree.directories += 1;
                pending.push(path);
            } else if metadata.is_file() {
                tree.count.files += 1;
                tree.count.bytes += metadata.len();
            } else if metadata.is_symlink() {
                tree.symlinks += 1;
            }
        }
    }
    Ok(tree)
}

// ---------------------------------------------------------------------------
// Mounts, the work directory and signals
// ---------------------------------------------------------------------------

/// A mount point this harness mounted. Dropping it unmounts whatever is
/// still mounted there (`fusermount3 -u`, then `umount -l`).
struct MountGuard {
    dir: PathBuf,
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if !is_mounted(&self.dir).unwrap_or(true) {
            return;
        }
        eprintln!("unmounting {}", self.dir.display());
        let unmounted = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
        if matches!(unmounted, Ok(status) if status.success()) && !is_mounted(&self.dir).unwrap_or(true) {
            return;
        }
        let status = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(status) if status.success()) {
            eprintln!(
                "error: failed to unmount {}; run `umount -l {}`",
                self.dir.display(),
                self.dir.display()
            );
        }
    }
}

/// The temporary work directory. Dropping it removes it, unless something is
/// still mounted below it: removing files through a mount would reach the
/// volume, so the directory is then kept and reported.
struct WorkDir {
    dir: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn path(&self) -> &Path {
        self.dir.as_ref().expect("the work directory exists until drop").path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        match mounts_under(dir.path()) {
            Ok(mounts) if mounts.is_empty() => {
                if let Err(error) = dir.close() {
                    eprintln!("warning: failed to remove the work directory: {error}");
                }
            }
            Ok(mounts) => {
                let kept = dir.keep();
                eprintln!(
                    "error: keeping {} because {} is still mounted",
                    kept.display(),
                    mounts[0].display()
                );
            }
            Err(error) => {
                let kept = dir.keep();
                eprintln!(
                    "error: keeping {} because its mounts cannot be listed: {error:#}",
                    kept.display()
                );
            }
        }
    }
}

/// One line of /proc/self/mountinfo.
struct MountInfo {
    mount_point: PathBuf,
    fs_type: String,
}

fn mount_table() -> anyhow::Result<Vec<MountInfo>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("failed to read /proc/self/mountinfo")?;
    let mut mounts = Vec::new();
    for line in text.lines() {
        // Field 5 is the mount point. The file system type is the first field
        // after the " - " separator.
        let mount_point = line.split(' ').nth(4);
        let fs_type = line.split_once(" - ").and_then(|(_, rest)| rest.split(' ').next());
        if let (Some(mount_point), Some(fs_type)) = (mount_point, fs_type) {
            mounts.push(MountInfo {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                fs_type: fs_type.to_owned(),
            });
        }
    }
    Ok(mounts)
}

/// Decodes the octal escapes (`\040` for a space) that mountinfo uses in paths.
fn unescape_mountinfo(field: &str) -> OsString {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes.get(i + 1..i + 4).filter(|_| bytes[i] == b'\\');
        match escape.and_then(|digits| u8::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

/// Returns whether `dir` (a canonical path) is a mount point.
fn is_mounted(dir: &Path) -> anyhow::Result<bool> {
    Ok(mount_table()?.iter().any(|mount| mount.mount_point == dir))
}

fn mounts_under(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(mount_table()?
        .into_iter()
        .map(|mount| mount.mount_point)
        .filter(|mount_point| mount_point != dir && mount_point.starts_with(dir))
        .collect())
}

/// Returns the file system type of the mount that contains `path`.
fn filesystem_type(path: &Path) -> anyhow::Result<String> {
    let path = fs::canonicalize(path).with_context(|| format!("failed to resolve {}", path.display()))?;
    mount_table()?
        .into_iter()
        .filter(|mount| path.starts_with(&mount.mount_point))
        .max_by_key(|mount| mount.mount_point.as_os_str().len())
        .map(|mount| mount.fs_type)
        .with_context(|| format!("no mount in /proc/self/mountinfo contains {}", path.display()))
}

/// Creates the work directory under `--work-dir`, else under $TMPDIR unless it
/// is tmpfs, else under /var/tmp.
fn create_work_dir(requested: Option<&Path>) -> anyhow::Result<WorkDir> {
    let base = match requested {
        Some(dir) => {
            let fs_type = filesystem_type(dir)?;
            ensure!(
                fs_type != "tmpfs",
                "--work-dir {} is on tmpfs, which rejects O_DIRECT; choose a disk-backed directory",
                dir.display()
            );
            dir.to_owned()
        }
        None => match std::env::var_os("TMPDIR").map(PathBuf::from) {
            Some(dir) if filesystem_type(&dir).is_ok_and(|fs_type| fs_type != "tmpfs") => dir,
            _ => PathBuf::from("/var/tmp"),
        },
    };
    let dir = tempfile::Builder::new()
        .prefix("chalk-bench.")
        .tempdir_in(&base)
        .with_context(|| format!("failed to create a work directory under {}", base.display()))?;
    Ok(WorkDir { dir: Some(dir) })
}

extern "C" fn record_stop_signal(signal: c_int) {
    let _ = STOP_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
}

/// Records SIGINT, SIGTERM and SIGHUP instead of dying, so that the run stops
/// between measurements and the guards unmount and clean up.
fn install_stop_handlers() -> anyhow::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(record_stop_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores into an atomic, which is
        // async-signal-safe, and no other code in this process sets handlers.
        unsafe { sigaction(signal, &action) }.with_context(|| format!("failed to install a handler for {signal}"))?;
    }
    Ok(())
}

/// Fails once a stop signal has arrived.
fn check_stop_signal() -> anyhow::Result<()> {
    match STOP_SIGNAL.load(Ordering::SeqCst) {
        0 => Ok(()),
        signal => bail!("stopped by signal {signal}"),
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// One line of latest.json: a workload and system over all repetitions.
#[derive(Debug, Serialize)]
struct Record {
    workload: String,
    system: &'static str,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    /// Median over the repetitions of the speed ratio between the native
    /// sample and this system's sample of the same repetition, so 1.0 is
    /// native speed and higher is faster. `None` for the S3 workloads.
    ratio_to_native: Option<f64>,
    /// The fastest peer (bindfs or an rclone mode) by median, for workloads
    /// that measure peers.
    best_peer: Option<&'static str>,
    /// Median over the repetitions of the speed ratio between `best_peer`'s
    /// sample and this system's sample, so higher than 1.0 beats the peer.
    ratio_to_best_peer: Option<f64>,
    /// The system measured first in each repetition: `native`, or
    /// `s3-ranged-get` for the S3 workloads.
    baseline: &'static str,
    /// Like `ratio_to_native`, against `baseline`.
    ratio_to_baseline: f64,
    /// Files and bytes that one repetition reads or writes (0 bytes for
    /// workloads that only stat or list).
    files: u64,
    bytes: u64,
    reps: u32,
}

/// Samples of one workload, one list per system, in repetition order.
struct Samples {
    workload: Box<dyn Workload>,
    /// Systems that ran: the workload's systems without peers that are not installed.
    systems: Vec<System>,
    per_system: Vec<Vec<f64>>,
}

impl Samples {
    fn of(&self, system: System) -> Option<&[f64]> {
        let index = self.systems.iter().position(|&s| s == system)?;
        Some(&self.per_system[index])
    }

    /// Median over the repetitions of the speed ratio of `system` to the
    /// fastest of `others` in the same repetition, or `None` if a system did not run.
    fn ratio_to_fastest(&self, system: System, others: &[System]) -> Option<f64> {
        let values = self.of(system)?;
        let others: Vec<&[f64]> = others.iter().filter_map(|&other| self.of(other)).collect();
        if others.is_empty() {
            return None;
        }
        let unit = self.workload.unit();
        let ratios: Vec<f64> = values
            .iter()
            .enumerate()
            .map(|(rep, &value)| {
                let fastest = others
                    .iter()
                    .map(|samples| samples[rep])
                    .fold(None, |best: Option<f64>, sample| match best {
                        Some(best) if unit.speed_ratio(best, sample) <= 1.0 => Some(best),
                        _ => Some(sample),
                    })
                    .expect("others is not empty");
                unit.speed_ratio(fastest, value)
            })
            .collect();
        Some(median(&ratios))
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

fn summarize(samples: &[Samples], bench: &Bench, reps: u32) -> Vec<Record> {
    let mut records = Vec::new();
    for entry in samples {
        let workload = &entry.workload;
        let baseline_system = entry.systems[0];
        let peers: Vec<System> = entry.systems.iter().copied().filter(|&s| systems::is_peer(s)).collect();
        let best_peer = peers.iter().copied().min_by(|&a, &b| {
            let (a, b) = (median(entry.of(a).unwrap_or_default()), median(entry.of(b).unwrap_or_default()));
            workload.unit().speed_ratio(b, a).total_cmp(&1.0).reverse()
        });
        let work = workload.work_size(bench);
        for (&system, values) in entry.systems.iter().zip(&entry.per_system) {
            let ratio_to_baseline = entry.ratio_to_fastest(system, &[baseline_system]).unwrap_or(f64::NAN);
            records.push(Record {
                workload: workload.id().to_owned(),
                system: system.as_str(),
                unit: workload.unit().symbol(),
                median: median(values),
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                ratio_to_native: (baseline_system == System::Native).then_some(ratio_to_baseline),
                best_peer: best_peer.map(System::as_str),
                ratio_to_best_peer: best_peer.and_then(|peer| entry.ratio_to_fastest(system, &[peer])),
                baseline: baseline_system.as_str(),
                ratio_to_baseline,
                files: work.files,
                bytes: work.bytes,
                reps,
            });
        }
    }
    records
}

/// Formats the records as a Markdown table, which also reads well on a terminal.
fn results_table(records: &[Record]) -> String {
    let baseline = records.first().map_or("baseline", |r| r.baseline);
    let with_peers = records.iter().any(|r| r.best_peer.is_some());
    let mut table = format!("| workload | system | median | min | max | ratio to {baseline} |");
    if with_peers {
        table.push_str(" ratio to best peer |");
    }
    table.push_str("\n| --- | --- | ---: | ---: | ---: | ---: |");
    if with_peers {
        table.push_str(" ---: |");
    }
    table.push('\n');
    for r in records {
        let _ = write!(
            table,
            "| {} | {} | {} {unit} | {} {unit} | {} {unit} | {} |",
            r.workload,
            r.system,
            significant(r.median),
            significant(r.min),
            significant(r.max),
            significant(r.ratio_to_baseline),
            unit = r.unit
        );
        if with_peers {
            let cell = match (r.best_peer, r.ratio_to_best_peer) {
                (Some(peer), Some(ratio)) => format!("{} ({peer})", significant(ratio)),
                _ => String::new(),
            };
            let _ = write!(table, " {cell} |");
        }
        table.push('\n');
    }
    table
}

/// Formats `value` with 4 significant digits, so that milliseconds on the
/// small tree and minutes on a large one both stay readable.
fn significant(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let decimals = (3 - value.abs().log10().floor() as i32).max(0) as usize;
    format!("{value:.decimals$}")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn write_json(records: &[Record], path: &Path) -> anyhow::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let path = path.to_owned();
    let mut text = serde_json::to_string_pretty(records)?;
    text.push('\n');
    fs::write(&path, text).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

// ---------------------------------------------------------------------------
// docs/benchmarks.md
// ---------------------------------------------------------------------------

/// Facts about the machine and the run, for the docs.
struct RunInfo {
    command: String,
    date: Option<String>,
    revision: Option<String>,
    cores: String,
    kernel: String,
    cpu: Option<String>,
    memory: String,
    load_average: String,
    work_fs: String,
}

impl RunInfo {
    fn collect(work: &Path) -> RunInfo {
        let args: Vec<String> = std::env::args().skip(1).map(|arg| shell_quote(&arg)).collect();
        let mut command = String::from("cargo run -p chalk-benches --release");
        if !args.is_empty() {
            command.push_str(" -- ");
            command.push_str(&args.join(" "));
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        RunInfo {
            command,
            date: command_output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
            revision: command_output(
                Command::new("git")
                    .arg("-C")
                    .arg(&workspace)
                    .args(["describe", "--always", "--dirty"]),
            ),
            cores: command_output(&mut Command::new("nproc")).unwrap_or_else(|| "unknown".to_owned()),
            kernel: command_output(Command::new("uname").arg("-r")).unwrap_or_else(|| "unknown".to_owned()),
            cpu: cpu_model(),
            memory: memory_summary().unwrap_or_else(|| "unknown".to_owned()),
            load_average: load_average().unwrap_or_else(|| "unknown".to_owned()),
            work_fs: filesystem_type(work).unwrap_or_else(|_| "unknown".to_owned()),
        }
    }
}

/// Returns the 1, 5 and 15 minute load averages from /proc/loadavg.
fn load_average() -> Option<String> {
    let text = fs::read_to_string("/proc/loadavg").ok()?;
    Some(text.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
}

/// Returns the first "model name" of /proc/cpuinfo.
fn cpu_model() -> Option<String> {
    let text = fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|line| line.starts_with("model name"))?;
    let (_, name) = line.split_once(':')?;
    Some(name.trim().to_owned())
}

/// Returns a command's trimmed stdout, or `None` if it fails.
fn command_output(command: &mut Command) -> Option<String> {
    let output = command.stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}

/// Returns "X GiB total, Y GiB available" from /proc/meminfo.
fn memory_summary() -> Option<String> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    let field_gib = |name: &str| -> Option<f64> {
        let line = text.lines().find(|line| line.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / (1024.0 * 1024.0))
    };
    Some(format!(
        "{:.1} GiB total, {:.1} GiB available",
        field_gib("MemTotal:")?,
        field_gib("MemAvailable:")?
    ))
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Builds the text between the markers of docs/benchmarks.md. `input` is
/// the staged tree, which only the local group reads.
/// `chart_name` is the chart's file name next to the docs, if one was written.
fn docs_section(
    records: &[Record],
    samples: &[Samples],
    input: Option<(&Tree, Size)>,
    reps: u32,
    info: &RunInfo,
    chart_name: Option<&str>,
) -> String {
    let mut text = String::new();
    match input {
        Some(_) => {
            let _ = writeln!(text, "## Latest results\n");
        }
        None => {
            let _ = writeln!(text, "## Latest results on S3\n");
        }
    }
    let _ = writeln!(text, "Produced by `{}`", info.command);
    let mut context = Vec::new();
    if let Some(date) = &info.date {
        context.push(format!("on {date}"));
    }
    if let Some(revision) = &info.revision {
        context.push(format!("at source revision `{revision}`"));
    }
    if context.is_empty() {
        let _ = writeln!(text, "(regenerated by each run of the harness).\n");
    } else {
        let _ = writeln!(
            text,
            "{} (regenerated by each run of the harness).\n",
            context.join(" ")
        );
    }

    let _ = writeln!(text, "Machine:\n");
    let _ = writeln!(
        text,
        "- {} cores (`nproc`){}",
        info.cores,
        info.cpu.as_ref().map(|cpu| format!(", {cpu}")).unwrap_or_default()
    );
    let _ = writeln!(text, "- kernel {} (`uname -r`)", info.kernel);
    let _ = writeln!(text, "- memory: {} at the end of the run", info.memory);
    let _ = writeln!(
        text,
        "- load average at the end of the run (1, 5, 15 min): {}",
        info.load_average
    );
    let _ = writeln!(
        text,
        "- work directory (input tree, stores, mount points) on {}\n",
        info.work_fs
    );

    match input {
        Some((tree, size)) => {
            let _ = writeln!(
                text,
                "Input (`--size {}`): {}: {} files, {} bytes ({:.1} MiB), {} directories, {} symbolic links (not read). \
                 {reps} repetitions.\n",
                size.as_str(),
                tree.origin,
                tree.count.files,
                tree.count.bytes,
                mib(tree.count.bytes),
                tree.directories,
                tree.symlinks
            );
        }
        None => {
            let _ = writeln!(text, "{reps} repetitions.\n");
        }
    }

    text.push_str(&results_table(records));
    text.push('\n');
    let targets = targets::targets_table(samples);
    if !targets.is_empty() {
        let _ = writeln!(text, "Targets, as ratios from this run:\n");
        text.push_str(&targets);
        text.push('\n');
    }
    if let Some(chart) = chart_name {
        let _ = writeln!(text, "![Speed of each system relative to native]({chart})\n");
    }
    let _ = writeln!(text, "Workloads:\n");
    for entry in samples {
        let _ = writeln!(text, "- {}: {}", entry.workload.id(), entry.workload.description());
    }
    if samples.iter().any(|entry| entry.workload.id() == "P1" || entry.workload.id() == "R0") {
        let _ = writeln!(
            text,
            "- native (P1, R0): walk the tree with `readdir` and read every regular file with open, read into a \
             {} KiB buffer, close, in one thread, with the page cache warmed by one untimed pass.",
            READ_BUFFER_BYTES / 1024
        );
    }
    text
}

/// Replaces the text between the markers of the local group in `path` with
/// `section`; see [`update_docs_between`].
#[cfg(test)]
fn update_docs(path: &Path, section: &str) -> anyhow::Result<()> {
    update_docs_between(path, (DOCS_BEGIN_MARKER, DOCS_END_MARKER), section)
}

/// Replaces the text between the `markers` of `path` with `section`, creating
/// the file with an intro if it does not exist. Text outside the markers is kept.
fn update_docs_between(path: &Path, markers: (&str, &str), section: &str) -> anyhow::Result<()> {
    let (begin_marker, end_marker) = markers;
    let existing = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => DOCS_INTRO.to_owned(),
        Err(error) => return Err(error).with_context(|| format!("failed to read {}", path.display())),
    };
    let block = format!("{begin_marker}\n{section}{end_marker}");
    let updated = match (existing.find(begin_marker), existing.find(end_marker)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{block}{}",
                &existing[..begin],
                &existing[end + end_marker.len()..]
            )
        }
        (None, None) => {
            let separator = if existing.ends_with("\n\n") || existing.is_empty() {
                ""
            } else if existing.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{existing}{separator}{block}\n")
        }
        _ => bail!(
            "{} has a misplaced or missing {begin_marker} or {end_marker}; fix the markers and rerun",
            path.display()
        ),
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("failed to create {}", parent.display()))?;
    }
    fs::write(path, updated).with_context(|| format!("failed to write {}", path.display()))
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

/// Returns the workloads named on the command line, or every workload of
/// the local group.
fn select_workloads(ids: &[String]) -> anyhow::Result<Vec<Box<dyn Workload>>> {
    let mut available = all_workloads();
    if ids.is_empty() {
        available.retain(|workload| workload.group() == Group::Local);
        return Ok(available);
    }
    let known: Vec<&str> = available.iter().map(|workload| workload.id()).collect();
    for id in ids {
        ensure!(
            known.iter().any(|known| known.eq_ignore_ascii_case(id)),
            "unknown workload {id:?}; known workloads: {}",
            known.join(", ")
        );
    }
    // Keep the order of all_workloads, so that a run is the same whatever
    // order the ids were given in.
    available.retain(|workload| ids.iter().any(|id| id.eq_ignore_ascii_case(workload.id())));
    Ok(available)
}

fn run(args: Args) -> anyhow::Result<()> {
    let workloads = select_workloads(&args.workloads)?;
    for workload in &workloads {
        let baseline = workload.group().baseline();
        ensure!(
            workload.systems().first() == Some(&baseline),
            "workload {} must measure {} first",
            workload.id(),
            baseline.as_str()
        );
    }
    let chalk = Chalk::locate()?;
    install_stop_handlers()?;

    let work_dir = create_work_dir(args.work_dir.as_deref())?;
    // Mount points must match /proc/self/mountinfo, which shows resolved paths.
    let work = fs::canonicalize(work_dir.path()).context("failed to resolve the work directory")?;
    eprintln!("using {} and work directory {}", chalk.binary.display(), work.display());

    let tree = stage_tree(args.size, &work.join("tree"))?;
    eprintln!(
        "staged {} files, {} bytes ({:.1} MiB), {} directories, {} symbolic links in {}",
        tree.count.files,
        tree.count.bytes,
        mib(tree.count.bytes),
        tree.directories,
        tree.symlinks,
        tree.path.display()
    );
    let mut bench = Bench {
        chalk,
        work: work.clone(),
        tree,
        dataset: None,
    };
    let peers = if workloads.iter().any(|workload| workload.systems().iter().copied().any(systems::is_peer)) {
        systems::available_peers()?
    } else {
        Vec::new()
    };
    if workloads.iter().any(|workload| workload.uses_dataset()) {
        bench.dataset = Some(Dataset::create(&bench, args.size)?);
    }

    // Warm the page cache, so native reads measure cached reads.
    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let warm = read_tree(&bench.tree.path, &mut buffer)?;
    bench.tree.check_read(warm, "the native tree")?;

    let mut samples = Vec::new();
    for mut workload in workloads {
        check_stop_signal()?;
        eprintln!("preparing {}", workload.id());
        workload
            .prepare(&bench)
            .with_context(|| format!("preparing workload {} failed", workload.id()))?;
        let systems: Vec<System> = workload
            .systems()
            .iter()
            .copied()
            .filter(|&system| !systems::is_peer(system) || peers.contains(&system))
            .collect();
        let per_system = vec![Vec::new(); systems.len()];
        samples.push(Samples { workload, systems, per_system });
    }

    for rep in 1..=args.reps {
        for entry in &mut samples {
            for (index, &system) in entry.systems.clone().iter().enumerate() {
                check_stop_signal()?;
                let value = entry.workload.measure(system, &bench).with_context(|| {
                    format!(
                        "workload {} on {} failed in repetition {rep}",
                        entry.workload.id(),
                        system.as_str()
                    )
                })?;
                eprintln!(
                    "rep {rep}/{}: {} {}: {} {}",
                    args.reps,
                    entry.workload.id(),
                    system.as_str(),
                    significant(value),
                    entry.workload.unit().symbol()
                );
                entry.per_system[index].push(value);
            }
        }
    }

    for entry in &mut samples {
        entry
            .workload
            .finish(&bench)
            .with_context(|| format!("finishing workload {} failed", entry.workload.id()))?;
    }

    println!(
        "Input: --size {}, {} files, {} bytes ({:.1} MiB), {} repetitions\n",
        args.size.as_str(),
        bench.tree.count.files,
        bench.tree.count.bytes,
        mib(bench.tree.count.bytes),
        args.reps
    );
    let (local, s3): (Vec<Samples>, Vec<Samples>) =
        samples.into_iter().partition(|entry| entry.workload.group() == Group::Local);
    for (group, samples) in [(Group::Local, local), (Group::S3, s3)] {
        if !samples.is_empty() {
            report_group(group, &samples, &bench, &args, &work)?;
        }
    }
    Ok(())
}

/// Prints the results of one group, writes its JSON file and, unless
/// `--output` is given, its section of docs/benchmarks.md.
fn report_group(group: Group, samples: &[Samples], bench: &Bench, args: &Args, work: &Path) -> anyhow::Result<()> {
    let records = summarize(samples, bench, args.reps);
    print!("{}", results_table(&records));
    println!();
    for entry in samples {
        println!("{}: {}", entry.workload.id(), entry.workload.description());
    }

    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let results_dir = args.output.clone().unwrap_or_else(|| manifest_dir.join("results"));
    let json_path = write_json(&records, &results_dir.join(group.json_name()))?;
    println!("\nwrote {}", json_path.display());
    let targets = targets::targets_table(samples);
    if !targets.is_empty() {
        print!("\n{targets}");
    }

    // The chart goes next to the docs, or into --output with the JSON.
    let docs_dir = manifest_dir.parent().unwrap_or(manifest_dir).join("docs");
    let chart_dir = args.output.clone().unwrap_or_else(|| docs_dir.clone());
    let chart_name = group.chart_name();
    let chart_path = chart_dir.join(chart_name);
    let title = format!("chalk-benches --size {}, {} repetitions", args.size.as_str(), args.reps);
    fs::write(&chart_path, chart::ratio_chart(&records, &title))
        .with_context(|| format!("failed to write {}", chart_path.display()))?;
    println!("wrote {}", chart_path.display());

    if args.output.is_none() {
        let docs = docs_dir.join("benchmarks.md");
        let info = RunInfo::collect(work);
        let input = (group == Group::Local).then_some((&bench.tree, args.size));
        let section = docs_section(&records, samples, input, args.reps, &info, Some(chart_name));
        update_docs_between(&docs, group.docs_markers(), &section)?;
        println!("updated {}", docs.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            match STOP_SIGNAL.load(Ordering::SeqCst) {
                0 => ExitCode::FAILURE,
                signal => ExitCode::from(128u8.saturating_add(signal as u8)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
    }

    #[test]
    fn ratio_is_higher_when_faster() {
        assert_eq!(Unit::Seconds.speed_ratio(1.0, 2.0), 0.5);
        assert_eq!(Unit::Seconds.speed_ratio(2.0, 1.0), 2.0);
    }

    /// Samples of R3 (which has targets against bindfs and rclone) over two repetitions.
    fn r3_samples(per_system: Vec<Vec<f64>>) -> Samples {
        Samples {
            workload: Box::new(DatasetWorkload::new(Kind::R3)),
            systems: vec![System::Native, System::ChalkReadOnly, System::Bindfs, System::RcloneOff, System::RcloneFull],
            per_system,
        }
    }

    #[test]
    fn ratio_to_fastest_uses_each_repetition() {
        let samples = r3_samples(vec![
            vec![1.0, 1.0],
            vec![2.0, 4.0],
            vec![4.0, 4.0],
            vec![8.0, 2.0],
            vec![16.0, 16.0],
        ]);

        // Repetition 1: the fastest rclone takes 8 s, chalk 2 s, so 4x.
        // Repetition 2: rclone 2 s, chalk 4 s, so 0.5x. The median is 2.25.
        let ratio = samples.ratio_to_fastest(System::ChalkReadOnly, &[System::RcloneOff, System::RcloneFull]);
        assert_eq!(ratio, Some(2.25));
        assert_eq!(samples.ratio_to_fastest(System::ChalkReadOnly, &[System::Native]), Some(0.375));
        assert_eq!(samples.ratio_to_fastest(System::ChalkWritable, &[System::Native]), None);
    }

    #[test]
    fn targets_table_reports_shortfall() {
        let samples = r3_samples(vec![vec![1.0], vec![1.0], vec![2.0], vec![20.0], vec![30.0]]);

        let table = targets::targets_table(&[samples]);

        assert!(
            table.contains("| R3 | chalk-ro | at least 3x bindfs | 2.000x | missed: 33% short |"),
            "{table}"
        );
        assert!(
            table.contains("| R3 | chalk-ro | at least 10x the faster rclone mode | 20.00x | met |"),
            "{table}"
        );
        assert!(!table.contains("| R1 |"), "R1 did not run: {table}");
    }

    #[test]
    fn chart_has_one_bar_per_ratio() {
        let record = |system: &'static str, ratio: Option<f64>| Record {
            workload: "R1".to_owned(),
            system,
            unit: "s",
            median: 1.0,
            min: 1.0,
            max: 1.0,
            ratio_to_native: ratio,
            best_peer: None,
            ratio_to_best_peer: None,
            baseline: "native",
            ratio_to_baseline: ratio.unwrap_or(1.0),
            files: 1,
            bytes: 1,
            reps: 1,
        };
        let records = [record("native", Some(1.0)), record("chalk-ro", Some(0.5)), record("s3-ranged-get", None)];

        let svg = chart::ratio_chart(&records, "a < b");

        assert_eq!(svg.matches("<rect x=").count(), 2, "{svg}");
        assert!(svg.contains("a &lt; b"), "the title is not escaped: {svg}");
    }

    #[test]
    fn significant_keeps_four_digits() {
        assert_eq!(significant(0.000867721), "0.0008677");
        assert_eq!(significant(1.61), "1.610");
        assert_eq!(significant(123.456), "123.5");
        assert_eq!(significant(98765.4), "98765");
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/var/tmp/a\040b"), OsString::from("/var/tmp/a b"));
        assert_eq!(unescape_mountinfo(r"/plain\x"), OsString::from(r"/plain\x"));
    }

    #[test]
    fn docs_update_keeps_text_outside_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("benchmarks.md");
        fs::write(
            &path,
            format!("before\n{DOCS_BEGIN_MARKER}\nold\n{DOCS_END_MARKER}\nafter\n"),
        )
        .unwrap();

        update_docs(&path, "new\n").unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("before\n{DOCS_BEGIN_MARKER}\nnew\n{DOCS_END_MARKER}\nafter\n")
        );
    }

    #[test]
    fn docs_update_creates_file_with_intro() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs/benchmarks.md");

        update_docs(&path, "table\n").unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(DOCS_INTRO), "missing intro: {text}");
        assert!(
            text.ends_with(&format!("{DOCS_BEGIN_MARKER}\ntable\n{DOCS_END_MARKER}\n")),
            "missing section: {text}"
        );
    }

    #[test]
    fn docs_update_appends_section_without_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("benchmarks.md");
        fs::write(&path, "# Notes\n").unwrap();

        update_docs(&path, "table\n").unwrap();

        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            format!("# Notes\n\n{DOCS_BEGIN_MARKER}\ntable\n{DOCS_END_MARKER}\n")
        );
    }

    #[test]
    fn docs_update_rejects_reversed_markers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("benchmarks.md");
        let original = format!("{DOCS_END_MARKER}\n{DOCS_BEGIN_MARKER}\n");
        fs::write(&path, &original).unwrap();

        assert!(update_docs(&path, "table\n").is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), original);
    }

    #[test]
    fn selection_keeps_registry_order() {
        let ids: Vec<&str> = select_workloads(&["r0".to_owned(), "P1".to_owned()])
            .unwrap()
            .iter()
            .map(|w| w.id())
            .collect();
        assert_eq!(ids, ["P1", "R0"]);
        assert!(select_workloads(&["Z9".to_owned()]).is_err());
    }
}
