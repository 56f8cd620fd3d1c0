//! `put` and `get`: copying files and directory trees between the local
//! disk and a volume, with files read in parallel and a progress bar for
//! transfers longer than a second.

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chalk_engine::{
    normalize_path, Access, FileKind, LineageName, Owner, Session, SessionBase, SetAttr, Store, TimeSet, Timestamp,
    VolumeName,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Files at most this large are read whole by the reader threads; larger ones are streamed.
const READ_WHOLE_MAX_BYTES: u64 = 8 << 20;
const READER_THREADS: usize = 4;

/// Opens a read-only session on a version, or on the latest version of `main`.
pub fn open_reader(store: &Arc<Store>, volume: &VolumeName, version: Option<&str>) -> anyhow::Result<Session> {
    let base = match version {
        Some(id) => SessionBase::Version(store.resolve_version(volume, id)?.id),
        None => SessionBase::Lineage(LineageName::main()),
    };
    Ok(store.open_session(volume, base, Access::ReadOnly)?)
}

/// Progress bar that stays hidden for the first second of a transfer.
struct Progress {
    bar: ProgressBar,
    started: Instant,
    shown: bool,
}

impl Progress {
    fn new(total_bytes: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template("{bytes}/{total_bytes} {bar:40} {bytes_per_sec} {msg}")
                .expect("valid template"),
        );
        Progress { bar, started: Instant::now(), shown: false }
    }

    fn advance(&mut self, bytes: u64, message: &str) {
        if !self.shown && self.started.elapsed() > Duration::from_secs(1) {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        self.bar.inc(bytes);
        if self.shown {
            self.bar.set_message(message.to_owned());
        }
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

pub struct PutSummary {
    pub remote: String,
    pub files: u64,
    pub bytes: u64,
}

/// One local item to upload, in walk order.
enum Item {
    Dir { remote: String, mode: u32 },
    File { local: PathBuf, remote: String, size: u64, mode: u32, mtime: Timestamp },
    Symlink { remote: String, target: Vec<u8> },
}

fn remote_join(base: &str, rel: &Path) -> String {
    let rel = rel.to_string_lossy();
    if base.is_empty() {
        rel.into_owned()
    } else if rel.is_empty() {
        base.to_owned()
    } else {
        format!("{base}/{rel}")
    }
}

fn mtime_of(meta: &fs::Metadata) -> Timestamp {
    Timestamp { secs: meta.mtime(), nanos: meta.mtime_nsec() as u32 }
}

fn collect(local_root: &Path, remote_root: &str, out: &mut Vec<Item>) -> anyhow::Result<()> {
    let mut stack = vec![local_root.to_owned()];
    while let Some(dir) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .with_context(|| format!("failed to list {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("failed to list {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).with_context(|| format!("failed to stat {}", path.display()))?;
            let remote = remote_join(remote_root, path.strip_prefix(local_root).expect("walk stays under the root"));
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push(Item::Dir { remote, mode });
                stack.push(path);
            } else if meta.is_file() {
                out.push(Item::File { local: path, remote, size: meta.len(), mode, mtime: mtime_of(&meta) });
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).with_context(|| format!("failed to read link {}", path.display()))?;
                out.push(Item::Symlink { remote, target: target.as_os_str().as_bytes().to_vec() });
            } else {
                eprintln!("warning: skipping {}: only files, directories and symlinks are uploaded", path.display());
            }
        }
    }
    Ok(())
}

/// Uploads `local` (a file or a directory tree) under `remote` in the session.
pub fn put(session: &Session, local: &Path, remote: Option<&str>) -> anyhow::Result<PutSummary> {
    let meta = fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?;
    let default_name = local
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let remote = match remote {
        // A trailing slash names the directory a file goes into, as with `cp`.
        Some(remote) if remote.ends_with('/') && !meta.is_dir() => format!("{remote}{default_name}"),
        Some(remote) => remote.to_owned(),
        None => default_name,
    };
    let names = normalize_path(&remote)?;
    let remote = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/");
    let owner = Owner::current();
    let mut items = Vec::new();
    if meta.is_dir() {
        session.make_dirs(&remote, owner)?;
        collect(local, &remote, &mut items)?;
    } else {
        if remote.is_empty() {
            bail!("give a path in the volume for file {}", local.display());
        }
        items.push(Item::File {
            local: local.to_owned(),
            remote: remote.clone(),
            size: meta.len(),
            mode: meta.permissions().mode() & 0o7777,
            mtime: mtime_of(&meta),
        });
    }
    let total: u64 = items.iter().map(|i| if let Item::File { size, .. } = i { *size } else { 0 }).sum();
    let mut progress = Progress::new(total);
    let mut files = 0u64;
    let mut bytes = 0u64;

    // Reader threads load small files in walk order; this thread writes them into the session.
    let small: Vec<(usize, PathBuf)> = items
        .iter()
        .enumerate()
        .filter_map(|(i, item)| match item {
            Item::File { local, size, .. } if *size <= READ_WHOLE_MAX_BYTES => Some((i, local.clone())),
            _ => None,
        })
        .collect();
    let (sender, receiver) = crossbeam::channel::bounded::<(usize, std::io::Result<Vec<u8>>)>(64);
    let (work_sender, work_receiver) = crossbeam::channel::unbounded::<(usize, PathBuf)>();
    for job in small {
        work_sender.send(job).expect("receiver alive");
    }
    drop(work_sender);
    let mut pending = std::collections::HashMap::new();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..READER_THREADS {
            let work = work_receiver.clone();
            let sender = sender.clone();
            scope.spawn(move || {
                for (i, path) in work.iter() {
                    if sender.send((i, fs::read(&path))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(sender);
        for (i, item) in items.iter().enumerate() {
            match item {
                Item::Dir { remote, mode } => {
                    let ino = session.make_dirs(remote, owner)?;
                    session.setattr(ino, &SetAttr { mode: Some(*mode), ..SetAttr::default() })?;
                }
                Item::Symlink { remote, target } => {
                    let (parent, name) = split_parent(session, remote, owner)?;
                    session.symlink(parent, std::ffi::OsStr::from_bytes(&name), target, owner)?;
                }
                Item::File { local, remote, size, mode, mtime } => {
                    let written = if *size <= READ_WHOLE_MAX_BYTES {
                        let data = loop {
                            if let Some(data) = pending.remove(&i) {
                                break data;
                            }
                            let (j, data) = receiver.recv().context("file reader threads stopped")?;
                            pending.insert(j, data);
                        };
                        let data = data.with_context(|| format!("failed to read {}", local.display()))?;
                        session.write_file_from(remote, &mut data.as_slice(), *mode, owner)?
                    } else {
                        let mut file = File::open(local).with_context(|| format!("failed to open {}", local.display()))?;
                        session.write_file_from(remote, &mut file, *mode, owner)?
                    };
                    let attr = session.resolve_path(remote)?;
                    session.setattr(attr.ino, &SetAttr { mtime: Some(TimeSet::At(*mtime)), ..SetAttr::default() })?;
                    files += 1;
                    bytes += written;
                    progress.advance(written, remote);
                }
            }
        }
        Ok(())
    })?;
    progress.finish();
    Ok(PutSummary { remote, files, bytes })
}

fn split_parent(session: &Session, remote: &str, owner: Owner) -> anyhow::Result<(chalk_engine::Ino, Vec<u8>)> {
    let mut names = normalize_path(remote)?;
    let name = names.pop().context("empty path")?;
    let parent = names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/");
    Ok((session.make_dirs(&parent, owner)?, name))
}

pub struct GetSummary {
    pub local: PathBuf,
    pub files: u64,
    pub bytes: u64,
}

/// Downloads `remote` (a file or a directory tree) to `local`. Each file is
/// written to a temporary name and renamed, so an interrupted download never
/// leaves a partial file under the final name.
pub fn get(session: &Session, remote: &str, local: Option<&Path>) -> anyhow::Result<GetSummary> {
    let attr = session.resolve_path(remote)?;
    let base_name = normalize_path(remote)?
        .last()
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .unwrap_or_else(|| session.volume().to_string());
    let target = match local {
        Some(path) if path.is_dir() && attr.kind != FileKind::Directory => path.join(&base_name),
        Some(path) => path.to_owned(),
        None => PathBuf::from(&base_name),
    };
    let entries = session.walk(remote, true)?;
    let total = entries.iter().filter(|e| e.attr.kind == FileKind::File).map(|e| e.attr.size).sum();
    let mut progress = Progress::new(total);
    let mut files = 0;
    let mut bytes = 0;
    if attr.kind != FileKind::Directory {
        bytes += download_file(session, remote, &target)?;
        files += 1;
    } else {
        fs::create_dir_all(&target).with_context(|| format!("failed to create {}", target.display()))?;
        let prefix = normalize_path(remote)?.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/");
        for entry in entries {
            let rel = entry.path.strip_prefix(&prefix).unwrap_or(&entry.path).trim_start_matches('/');
            let local_path = target.join(rel);
            match entry.attr.kind {
                FileKind::Directory => {
                    fs::create_dir_all(&local_path).with_context(|| format!("failed to create {}", local_path.display()))?
                }
                FileKind::Symlink => {
                    let link = std::ffi::OsStr::from_bytes(entry.target.as_deref().unwrap_or_default());
                    let _ = fs::remove_file(&local_path);
                    std::os::unix::fs::symlink(link, &local_path)
                        .with_context(|| format!("failed to create symlink {}", local_path.display()))?;
                }
                FileKind::File => {
                    let n = download_file(session, &entry.path, &local_path)?;
                    fs::set_permissions(&local_path, fs::Permissions::from_mode(entry.attr.perm as u32))
                        .with_context(|| format!("failed to set the mode of {}", local_path.display()))?;
                    bytes += n;
                    files += 1;
                    progress.advance(n, &entry.path);
                }
                FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => {
                    eprintln!("warning: skipping {}: {} nodes are not downloaded", entry.path, entry.attr.kind.as_str());
                }
            }
        }
    }
    progress.finish();
    Ok(GetSummary { local: target, files, bytes })
}

fn download_file(session: &Session, remote: &str, local: &Path) -> anyhow::Result<u64> {
    if local == Path::new("-") {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let n = session.read_file_to(remote, &mut out)?;
        std::io::Write::flush(&mut out).context("failed to write to standard output")?;
        return Ok(n);
    }
    // Devices, FIFOs and symlinks are written through, never replaced by a regular file.
    let through_link = fs::symlink_metadata(local).is_ok_and(|m| m.file_type().is_symlink());
    let special = fs::metadata(local).is_ok_and(|m| !m.is_file() && !m.is_dir());
    if through_link || special {
        let mut out = fs::OpenOptions::new()
            .write(true)
            .truncate(!special)
            .open(local)
            .with_context(|| format!("failed to open {} for writing", local.display()))?;
        return Ok(session.read_file_to(remote, &mut out)?);
    }
    let file_name = local.file_name().context("destination has no file name")?.to_string_lossy().into_owned();
    let tmp = local.with_file_name(format!(".{file_name}.chalk-partial"));
    let result = (|| -> anyhow::Result<u64> {
        let mut out = BufWriter::new(File::create(&tmp).with_context(|| format!("failed to create {}", tmp.display()))?);
        let n = session.read_file_to(remote, &mut out)?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all().map(|_| f))
            .with_context(|| format!("failed to write {}", tmp.display()))?;
        fs::rename(&tmp, local).with_context(|| format!("failed to rename {} to {}", tmp.display(), local.display()))?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
