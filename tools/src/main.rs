//! `chalk`: the command-line tool of Chalk volumes.

mod cache_cmd;
mod dashboard;
mod metrics_server;
mod mount_cmd;
mod ops_cmd;
mod output;
mod sandbox_cmd;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use chalk_engine::{Access, LineageName, RetryAdvice, Session, SessionBase, Store, StoreConfig, SyncOptions, SyncOutcome, VolumeName};
use clap::{Parser, Subcommand};

/// Persistent, versioned file storage for compute workloads.
#[derive(Parser)]
#[command(name = "chalk", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    cache: cache_cmd::CacheFlags,
}

#[derive(Subcommand)]
enum Command {
    /// Create, fill, mount and inspect volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Inspect the read cache of this host.
    #[command(subcommand)]
    Cache(cache_cmd::CacheCommand),
    /// Serve the web dashboard: browse, preview, upload, download and compare versions.
    Dashboard {
        /// Address and port to listen on; port 0 picks a free port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Largest upload request body, in bytes.
        #[arg(long, default_value_t = 16 << 30)]
        max_upload_bytes: u64,
    },
    /// Check that the store is whole: records, checkpoints, lineages and the local cache.
    Fsck(ops_cmd::FsckArgs),
    /// Show stored structures: segments, checkpoints, versions, volumes and extent maps.
    #[command(subcommand)]
    Inspect(ops_cmd::InspectCommand),
    /// Delete versions that retention drops and objects no kept version refers to.
    Gc(ops_cmd::GcArgs),
    /// Run commands in sandboxes with volumes mounted at /volumes/NAME.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
}

#[derive(Subcommand)]
enum SandboxCommand {
    /// Run CMD in a bubblewrap sandbox; its volume writes are discarded unless --sync.
    Run {
        /// Volume to mount at /volumes/NAME; NAME@VERSION mounts a version writable, and its sync forks a lineage.
        #[arg(long = "volume", value_name = "NAME[@VERSION]")]
        volumes: Vec<String>,
        /// Root file system: debian-slim (built once with debootstrap) or host.
        #[arg(long, default_value = "debian-slim", value_parser = ["debian-slim", "host"])]
        image: String,
        /// Directory the command starts in, created empty when missing.
        #[arg(long, default_value = "/workspace")]
        workdir: String,
        /// Environment variable KEY=VALUE for the command (repeatable).
        #[arg(long)]
        env: Vec<String>,
        /// Share the host network instead of a loopback-only one.
        #[arg(long)]
        network: bool,
        /// Publish each volume's writes when the command exits with status 0.
        #[arg(long)]
        sync: bool,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Create a volume with an empty first version.
    Create { name: String },
    /// List volumes with their latest version.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's latest version, file count and size, and the stored
    /// bytes per lineage and version, exclusive and shared.
    Info {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// List a directory of a volume (the root by default).
    Ls {
        name: String,
        path: Option<String>,
        /// Version id or unique prefix (default: the latest version).
        #[arg(long)]
        version: Option<String>,
        /// List every level below PATH.
        #[arg(short, long)]
        recursive: bool,
        #[arg(long)]
        json: bool,
    },
    /// Upload a local file or directory tree as one new version.
    Put {
        name: String,
        local: PathBuf,
        /// Path in the volume (default: the local file or directory name).
        remote: Option<String>,
        /// Message stored with the new version.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Download a file or directory tree from a volume.
    Get {
        name: String,
        remote: String,
        /// Local destination (default: the remote name in the current directory).
        local: Option<PathBuf>,
        #[arg(long)]
        version: Option<String>,
    },
    /// Remove a path from a volume, as one new version.
    Rm {
        name: String,
        path: String,
        /// Remove directories and everything under them.
        #[arg(short, long)]
        recursive: bool,
    },
    /// List the versions of a lineage (main by default), oldest first.
    Versions {
        name: String,
        /// Lineage to list.
        #[arg(long, conflicts_with = "all")]
        lineage: Option<String>,
        /// List the versions of every lineage.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the lineages of a volume with their heads.
    Lineages {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Create a lineage whose first version is VERSION; copies no data.
    Fork {
        name: String,
        /// Version id, unique prefix or tag to fork from.
        #[arg(long)]
        from: String,
        /// Name of the new lineage (default: fork-<8 characters>).
        #[arg(long)]
        lineage: Option<String>,
    },
    /// Rename or delete a lineage.
    #[command(subcommand)]
    Lineage(LineageCommand),
    /// Show what changed from version A to version B (ids, prefixes or tags).
    Diff {
        name: String,
        a: String,
        b: String,
        #[arg(long)]
        json: bool,
    },
    /// Copy a path inside a volume as one new version, sharing data instead of copying it.
    Cp {
        name: String,
        src: String,
        dst: String,
        #[arg(short, long)]
        recursive: bool,
        /// Copy from this version (id, prefix or tag) instead of the latest.
        #[arg(long)]
        from_version: Option<String>,
    },
    /// Move a path inside a volume as one new version.
    Mv { name: String, src: String, dst: String },
    /// Publish a lineage's head or a version onto another lineage: a
    /// fast-forward when possible, otherwise a rebase that fails on conflicts.
    Promote {
        name: String,
        /// Lineage name or version id, prefix or tag.
        source: String,
        #[arg(long, default_value = "main")]
        onto: String,
    },
    /// Give a version a tag, usable wherever a version id is.
    Tag { name: String, version: String, tag: String },
    /// Mount a volume as a directory (in the foreground unless --daemon).
    Mount {
        name: String,
        dir: PathBuf,
        /// Mount this version (id, unique prefix or tag), read-only unless --writable.
        #[arg(long)]
        version: Option<String>,
        /// Mount the head of this lineage (default: main).
        #[arg(long, conflicts_with = "version")]
        lineage: Option<String>,
        /// With --version: make the mount writable; its first sync forks a new lineage.
        #[arg(long, requires = "version", conflicts_with = "read_only")]
        writable: bool,
        /// Mount the latest version read-only.
        #[arg(long)]
        read_only: bool,
        /// Read-only, and move to each new head of the lineage as it is
        /// published (checked every CHALK_FOLLOW_INTERVAL_MS, default 1000).
        #[arg(long, conflicts_with_all = ["version", "writable"])]
        follow: bool,
        /// Return once the mount is ready and keep serving it in the background.
        #[arg(long)]
        daemon: bool,
        /// Serve Prometheus metrics at http://ADDRESS/metrics; a loopback
        /// address and port such as 127.0.0.1:9464 (port 0 picks a free port).
        #[arg(long, value_name = "ADDRESS")]
        metrics: Option<std::net::SocketAddr>,
    },
    /// Unmount a mounted volume, discarding writes that were not synced.
    Unmount { dir: PathBuf },
    /// Publish the writes of a mount (DIR), or of every writable mount of a volume (NAME).
    Sync {
        target: String,
        /// Message stored with each new version.
        #[arg(short, long)]
        message: Option<String>,
        /// When the lineage changed the same paths: error (default), fork
        /// (publish into a new lineage) or ours (overwrite them).
        #[arg(long, value_parser = ["error", "fork", "ours"])]
        on_conflict: Option<String>,
    },
    /// Delete a volume and all its versions; `chalk gc NAME` then frees its objects.
    Delete { name: String },
    /// Fetch files into the local disk cache ahead of a job (the whole volume without PATH).
    Warm {
        name: String,
        paths: Vec<String>,
        /// Version id or unique prefix (default: the latest version).
        #[arg(long)]
        version: Option<String>,
    },
}

#[derive(Subcommand)]
enum LineageCommand {
    /// Rename a lineage.
    Rename { name: String, from: String, to: String },
    /// Delete a lineage; its versions stay readable by id until gc.
    Delete { name: String, lineage: String },
}

fn open_store() -> anyhow::Result<Arc<Store>> {
    let config = StoreConfig::from_env()?;
    Store::open(config.clone()).with_context(|| {
        format!("failed to open the store at {} ({})", config.local_root.display(), config.object_store_url)
    })
}

fn volume_name(name: &str) -> anyhow::Result<VolumeName> {
    Ok(VolumeName::new(name)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    cli.cache.export();
    let command = match cli.command {
        Command::Volume(command) => command,
        Command::Cache(command) => return cache_cmd::run_cache(command),
        Command::Dashboard { listen, max_upload_bytes } => {
            let options = dashboard::DashboardOptions { listen, max_upload_bytes };
            return dashboard::run(open_store()?, options);
        }
        Command::Sandbox(SandboxCommand::Run { volumes, image, workdir, env, network, sync, command }) => {
            let store = open_store()?;
            let request = sandbox_cmd::RunRequest { volumes, image, workdir, env, network, sync, command };
            let code = sandbox_cmd::run(&store, &request)?;
            if code != 0 {
                // The command's own status; the mounts have ended by now.
                std::process::exit(code);
            }
            return Ok(());
        }
        Command::Fsck(args) => return ops_cmd::run_fsck(&*open_store()?, args),
        Command::Inspect(command) => return ops_cmd::run_inspect(&open_store()?, command),
        Command::Gc(args) => return ops_cmd::run_gc(&open_store()?, args),
    };
    match command {
        VolumeCommand::Create { name } => {
            let volume = volume_name(&name)?;
            let store = open_store()?;
            let version = store.create_volume(&volume)?;
            println!("created volume {volume} at version {}", version.id);
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::List { json } => {
            let store = open_store()?;
            output::print_volumes(&store.list_volumes()?, json)?;
        }
        VolumeCommand::Info { name, json } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let head = store.head(&volume, &LineageName::main())?;
            let count = store.versions(&volume, &LineageName::main())?.len();
            let space = store.space(&volume)?;
            output::print_info(&volume, &head, count, &space, json)?;
        }
        VolumeCommand::Ls { name, path, version, recursive, json } => {
            let store = open_store()?;
            let session = transfer::open_reader(&store, &volume_name(&name)?, version.as_deref())?;
            let entries = session.walk(path.as_deref().unwrap_or(""), recursive)?;
            output::print_entries(&entries, json)?;
        }
        VolumeCommand::Put { name, local, remote, message } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable)?;
            let summary = transfer::put(&session, &local, remote.as_deref())?;
            // A put at the volume's root has an empty remote path.
            let remote_shown = if summary.remote.is_empty() { "/" } else { summary.remote.as_str() };
            let message = message.unwrap_or_else(|| format!("put {remote_shown}"));
            match sync_once(&session, message, "put")? {
                SyncOutcome::Published(version) => {
                    println!(
                        "uploaded {} ({}) to {}:{} as version {}",
                        output::count(summary.files as u64, "file", "files"),
                        output::human_bytes(summary.bytes),
                        volume,
                        remote_shown,
                        version.id
                    );
                    mount_cmd::warn_if_single_writer(&store);
                }
                SyncOutcome::NothingToPublish { .. } => println!("nothing to upload: {} is empty", local.display()),
            }
        }
        VolumeCommand::Get { name, remote, local, version } => {
            let store = open_store()?;
            let session = transfer::open_reader(&store, &volume_name(&name)?, version.as_deref())?;
            let summary = transfer::get(&session, &remote, local.as_deref())?;
            // With `-` the file went to stdout, so the summary must not.
            if summary.local != std::path::Path::new("-") {
                println!("downloaded {} ({}) to {}", output::count(summary.files as u64, "file", "files"), output::human_bytes(summary.bytes), summary.local.display());
            }
        }
        VolumeCommand::Rm { name, path, recursive } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable)?;
            session.remove_path(&path, recursive)?;
            match sync_once(&session, format!("rm {path}"), "rm")? {
                SyncOutcome::Published(version) => println!("removed {path} from {volume} as version {}", version.id),
                SyncOutcome::NothingToPublish { .. } => bail!("nothing removed"),
            }
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::Versions { name, lineage, all, json } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let versions = match (all, lineage) {
                (true, _) => store.all_versions(&volume)?,
                (false, Some(lineage)) => store.versions(&volume, &LineageName::new(&lineage)?)?,
                (false, None) => store.versions(&volume, &LineageName::main())?,
            };
            output::print_versions(&versions, json)?;
        }
        VolumeCommand::Lineages { name, json } => {
            let store = open_store()?;
            output::print_lineages(&store.lineages(&volume_name(&name)?)?, json)?;
        }
        VolumeCommand::Fork { name, from, lineage } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let from = store.resolve_version(&volume, &from)?;
            let lineage = lineage.map(|l| LineageName::new(&l)).transpose()?;
            let (lineage, version) = store.fork(&volume, from.id, lineage)?;
            println!("created lineage {lineage} of {volume} at version {}", version.id);
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::Lineage(LineageCommand::Rename { name, from, to }) => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            store.rename_lineage(&volume, &LineageName::new(&from)?, &LineageName::new(&to)?)?;
            println!("renamed lineage {from} of {volume} to {to}");
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::Lineage(LineageCommand::Delete { name, lineage }) => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            store.delete_lineage(&volume, &LineageName::new(&lineage)?)?;
            println!("deleted lineage {lineage} of {volume}");
        }
        VolumeCommand::Diff { name, a, b, json } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let a = store.resolve_version(&volume, &a)?;
            let b = store.resolve_version(&volume, &b)?;
            output::print_diff(&store.diff(&volume, a.id, b.id)?, json)?;
        }
        VolumeCommand::Cp { name, src, dst, recursive, from_version } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable)?;
            let copied = match from_version {
                Some(version) => {
                    let from = transfer::open_reader(&store, &volume, Some(&version))?;
                    session.copy_path(&from, &src, &dst, recursive, chalk_engine::Owner::current())?
                }
                None => session.copy_path(&session, &src, &dst, recursive, chalk_engine::Owner::current())?,
            };
            match sync_once(&session, format!("cp {src} {dst}"), "cp")? {
                SyncOutcome::Published(version) => {
                    println!("copied {} to {dst} as version {}", output::count(copied as u64, "file", "files"), version.id);
                    mount_cmd::warn_if_single_writer(&store);
                }
                SyncOutcome::NothingToPublish { .. } => println!("nothing copied"),
            }
        }
        VolumeCommand::Mv { name, src, dst } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable)?;
            session.move_path(&src, &dst, chalk_engine::Owner::current())?;
            match sync_once(&session, format!("mv {src} {dst}"), "mv")? {
                SyncOutcome::Published(version) => {
                    println!("moved {src} to {dst} as version {}", version.id);
                    mount_cmd::warn_if_single_writer(&store);
                }
                SyncOutcome::NothingToPublish { .. } => println!("nothing moved"),
            }
        }
        VolumeCommand::Promote { name, source, onto } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let onto = LineageName::new(&onto)?;
            let version = match LineageName::new(&source).ok().map(|l| store.head(&volume, &l)) {
                Some(Ok(head)) => head,
                _ => store.resolve_version(&volume, &source)?,
            };
            let promoted = store.promote(&volume, version.id, &onto)?;
            println!("{onto} of {volume} is now at version {}", promoted.id);
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::Tag { name, version, tag } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let version = store.resolve_version(&volume, &version)?;
            store.tag(&volume, version.id, &tag)?;
            println!("tagged version {} of {volume} as {tag}", version.id);
            mount_cmd::warn_if_single_writer(&store);
        }
        VolumeCommand::Mount { name, dir, version, lineage, writable, read_only, follow, daemon, metrics } => {
            // A mount serves until unmounted, so a control client or metrics
            // scraper that goes away must not end it with SIGPIPE. The
            // threads started from here on inherit the blocked signal.
            chalk_engine::block_sigpipe_on_this_thread();
            let store = open_store()?;
            let request = mount_cmd::MountRequest { version, lineage, read_only: read_only || follow, writable, follow, metrics };
            mount_cmd::run_mount(store, &volume_name(&name)?, &dir, &request, daemon)?;
        }
        VolumeCommand::Unmount { dir } => {
            let store = open_store()?;
            mount_cmd::run_unmount(&store, &dir)?;
        }
        VolumeCommand::Sync { target, message, on_conflict } => {
            let store = open_store()?;
            for line in mount_cmd::run_sync(&store, &target, message.as_deref(), on_conflict.as_deref())? {
                println!("{line}");
            }
        }
        VolumeCommand::Delete { name } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let mounts = mount_cmd::live_mounts_of(&store, &volume)?;
            if !mounts.is_empty() {
                let list: Vec<String> = mounts.iter().map(|m| m.display().to_string()).collect();
                bail!("volume {volume} is mounted at {}; unmount it first with `chalk volume unmount DIR`", list.join(", "));
            }
            store.delete_volume(&volume)?;
            println!("deleted volume {volume}; run `chalk gc {volume}` to free its objects in the store");
        }
        VolumeCommand::Warm { name, paths, version } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let summary = cache_cmd::run_warm(&store, &volume, &paths, version.as_deref())?;
            println!(
                "warmed {} ({}) of {volume} into the cache under {}",
                output::count(summary.files as u64, "file", "files"),
                output::human_bytes(summary.bytes),
                store.local_root().join("cache").display()
            );
        }
    }
    Ok(())
}

/// Syncs the session of a `chalk volume` command, which ends with the
/// command. After a failure of the object store, the error gives running
/// the command again as the next step, not a sync.
fn sync_once(session: &Session, message: String, command: &str) -> chalk_engine::Result<SyncOutcome> {
    let options = SyncOptions {
        message: Some(message),
        retry: RetryAdvice::Repeat(format!("run `chalk volume {command}` again")),
        ..SyncOptions::default()
    };
    session.sync_with(&options)
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHALK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Like other Unix tools, end quietly when the reader of stdout goes away (`| head`).
    // SAFETY: restoring the default SIGPIPE action at start-up, before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
