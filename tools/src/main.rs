//! `chalk`: the command-line tool of Chalk volumes.

mod mount_cmd;
mod output;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use chalk_engine::{Access, LineageName, SessionBase, Store, StoreConfig, SyncOutcome, VolumeName};
use clap::{Parser, Subcommand};

/// Persistent, versioned file storage for compute workloads.
#[derive(Parser)]
#[command(name = "chalk", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, fill, mount and inspect volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
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
    /// Show a volume's latest version, file count and size.
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
    /// List the versions of a volume, oldest first.
    Versions {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Mount a volume as a directory (in the foreground unless --daemon).
    Mount {
        name: String,
        dir: PathBuf,
        /// Mount this version, read-only.
        #[arg(long)]
        version: Option<String>,
        /// Mount the latest version read-only.
        #[arg(long)]
        read_only: bool,
        /// Return once the mount is ready and keep serving it in the background.
        #[arg(long)]
        daemon: bool,
    },
    /// Unmount a mounted volume, discarding writes that were not synced.
    Unmount { dir: PathBuf },
    /// Publish the writes of a mount (DIR), or of every writable mount of a volume (NAME).
    Sync { target: String },
    /// Delete a volume and all its versions.
    Delete { name: String },
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
    let Command::Volume(command) = cli.command;
    match command {
        VolumeCommand::Create { name } => {
            let volume = volume_name(&name)?;
            let store = open_store()?;
            let version = store.create_volume(&volume)?;
            println!("created volume {volume} at version {}", version.id);
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
            output::print_info(&volume, &head, count, json)?;
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
            let message = message.unwrap_or_else(|| format!("put {}", summary.remote));
            match session.sync(Some(&message))? {
                SyncOutcome::Published(version) => println!(
                    "uploaded {} files ({}) to {}:{} as version {}",
                    summary.files,
                    output::human_bytes(summary.bytes),
                    volume,
                    summary.remote,
                    version.id
                ),
                SyncOutcome::NothingToPublish { .. } => println!("nothing to upload: {} is empty", local.display()),
            }
        }
        VolumeCommand::Get { name, remote, local, version } => {
            let store = open_store()?;
            let session = transfer::open_reader(&store, &volume_name(&name)?, version.as_deref())?;
            let summary = transfer::get(&session, &remote, local.as_deref())?;
            println!("downloaded {} files ({}) to {}", summary.files, output::human_bytes(summary.bytes), summary.local.display());
        }
        VolumeCommand::Rm { name, path, recursive } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            let session = store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable)?;
            session.remove_path(&path, recursive)?;
            match session.sync(Some(&format!("rm {path}")))? {
                SyncOutcome::Published(version) => println!("removed {path} from {volume} as version {}", version.id),
                SyncOutcome::NothingToPublish { .. } => bail!("nothing removed"),
            }
        }
        VolumeCommand::Versions { name, json } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            output::print_versions(&store.versions(&volume, &LineageName::main())?, json)?;
        }
        VolumeCommand::Mount { name, dir, version, read_only, daemon } => {
            let store = open_store()?;
            mount_cmd::run_mount(store, &volume_name(&name)?, &dir, version.as_deref(), read_only, daemon)?;
        }
        VolumeCommand::Unmount { dir } => {
            let store = open_store()?;
            mount_cmd::run_unmount(&store, &dir)?;
        }
        VolumeCommand::Sync { target } => {
            let store = open_store()?;
            for line in mount_cmd::run_sync(&store, &target)? {
                println!("{line}");
            }
        }
        VolumeCommand::Delete { name } => {
            let store = open_store()?;
            let volume = volume_name(&name)?;
            store.delete_volume(&volume)?;
            println!("deleted volume {volume}");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHALK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fuser=error"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
