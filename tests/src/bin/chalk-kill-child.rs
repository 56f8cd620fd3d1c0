//! Child process of the kill-and-recover test: applies the seeded workload
//! of `chalk_tests::kill_workload` to a writable session on the `main`
//! lineage of a volume, until the test kills it or the steps run out.
//!
//! Usage: `chalk-kill-child SEED MAX_STEPS VOLUME`, with `CHALK_HOME` and
//! `CHALK_STORE` naming the store. Before each step it prints one line and
//! flushes, so the test can time its SIGKILL: `step N`, followed by
//! `sync-begin K` when step N is sync K, and `sync-end K VERSION` after it.
//! Exit status 0 when the steps ran out, 2 on any error.

use std::ffi::OsStr;
use std::io::Write;
use std::process::ExitCode;

use chalk_engine::{
    Access, EngineError, FileKind, LineageName, Owner, RenameMode, Session, SessionBase, SetAttr, Store, StoreConfig,
    SyncOutcome, VolumeName,
};
use chalk_tests::kill_workload::{sync_message, Step, Tree, Workload};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("chalk-kill-child: {message}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [seed, max_steps, volume] = args.as_slice() else {
        return Err("usage: chalk-kill-child SEED MAX_STEPS VOLUME".into());
    };
    let seed: u64 = seed.parse().map_err(|e| format!("invalid SEED {seed:?}: {e}"))?;
    let max_steps: u64 = max_steps.parse().map_err(|e| format!("invalid MAX_STEPS {max_steps:?}: {e}"))?;

    let store = Store::open(StoreConfig::from_env().map_err(text)?).map_err(text)?;
    let volume = VolumeName::new(volume).map_err(text)?;
    let session =
        store.open_session(&volume, SessionBase::Lineage(LineageName::main()), Access::Writable).map_err(text)?;
    let mut workload = Workload::new(seed, read_tree(&session).map_err(text)?);

    let mut stdout = std::io::stdout().lock();
    for n in 1..=max_steps {
        let step = workload.next_step();
        let mut line = format!("step {n}");
        if let Step::Sync { number } = &step {
            line.push_str(&format!("\nsync-begin {number}"));
        }
        writeln!(stdout, "{line}").and_then(|()| stdout.flush()).map_err(text)?;
        apply(&session, seed, &step).map_err(|e| format!("step {n} ({}): {e}", describe(&step)))?;
        if let Step::Sync { number } = step {
            let base = session.base_version();
            writeln!(stdout, "sync-end {number} {}", base.id).and_then(|()| stdout.flush()).map_err(text)?;
        }
    }
    Ok(())
}

fn text(err: impl std::fmt::Display) -> String {
    err.to_string()
}

fn describe(step: &Step) -> String {
    match step {
        Step::Put { path, data } => format!("put {path}, {} bytes", data.len()),
        Step::Write { path, offset, data } => format!("write {path} at {offset}, {} bytes", data.len()),
        Step::Truncate { path, size } => format!("truncate {path} to {size}"),
        Step::Rename { from, to } => format!("rename {from} to {to}"),
        Step::Unlink { path } => format!("unlink {path}"),
        Step::Sync { number } => format!("sync {number}"),
    }
}

/// Reads every regular file of the session's tree.
fn read_tree(session: &Session) -> Result<Tree, EngineError> {
    let mut tree = Tree::new();
    for entry in session.walk("", true)? {
        if entry.attr.kind == FileKind::File {
            let mut data = Vec::new();
            session.read_file_to(&entry.path, &mut data)?;
            tree.insert(entry.path, data);
        }
    }
    Ok(tree)
}

/// Splits a path into its parent directory's inode and its last name.
fn parent_and_name<'a>(session: &Session, path: &'a str) -> Result<(chalk_engine::Ino, &'a OsStr), EngineError> {
    let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
    Ok((session.resolve_path(parent)?.ino, OsStr::new(name)))
}

fn apply(session: &Session, seed: u64, step: &Step) -> Result<(), EngineError> {
    match step {
        Step::Put { path, data } => {
            session.write_file_from(path, &mut &data[..], 0o644, Owner::current())?;
        }
        Step::Write { path, offset, data } => {
            let ino = session.resolve_path(path)?.ino;
            session.write(ino, *offset, data)?;
        }
        Step::Truncate { path, size } => {
            let ino = session.resolve_path(path)?.ino;
            session.setattr(ino, &SetAttr { size: Some(*size), ..SetAttr::default() })?;
        }
        Step::Rename { from, to } => {
            let (from_parent, from_name) = parent_and_name(session, from)?;
            let (to_parent, to_name) = parent_and_name(session, to)?;
            session.rename(from_parent, from_name, to_parent, to_name, RenameMode::Replace)?;
        }
        Step::Unlink { path } => {
            let (parent, name) = parent_and_name(session, path)?;
            session.unlink(parent, name)?;
        }
        Step::Sync { number } => match session.sync(Some(&sync_message(seed, *number)))? {
            SyncOutcome::Published(_) => {}
            // The workload syncs only after a change, so the session lost track of its changes.
            SyncOutcome::NothingToPublish { base } => {
                return Err(EngineError::InvalidArgument(format!("sync {number} found nothing to publish on {}", base.id)));
            }
        },
    }
    Ok(())
}
