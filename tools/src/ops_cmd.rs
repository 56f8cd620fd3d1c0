//! Operator commands: `chalk fsck`, `chalk inspect` and `chalk gc`.

use std::collections::BTreeMap;

use anyhow::{bail, Context};
use chalk_engine::catalog::Catalog;
use chalk_engine::fsck::{FsckOptions, FsckReport};
use chalk_engine::gc::{parse_duration, GcOptions, GcReport};
use chalk_engine::{Access, SegmentId, SessionBase, Store, VersionId, VolumeName};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::output::{count, human_bytes, rfc3339};

/// Flags of `chalk fsck`.
#[derive(Args)]
pub struct FsckArgs {
    /// Volume to check (every volume of the store by default).
    name: Option<String>,
    /// Check only this version (id, unique prefix or tag) of NAME.
    #[arg(long, requires = "name")]
    version: Option<String>,
    /// Also download every segment from the object store and check every record.
    #[arg(long)]
    deep: bool,
    /// Refetch damaged local cache entries from the object store and truncate
    /// torn tails of ended sessions' segments; never changes the object store.
    #[arg(long)]
    repair: bool,
    #[arg(long)]
    json: bool,
}

/// Flags of `chalk gc`.
#[derive(Args)]
pub struct GcArgs {
    /// Volume to collect; a deleted volume's name frees all its objects.
    name: String,
    /// Keep the last N versions of every lineage.
    #[arg(long, value_name = "N")]
    keep_last: Option<usize>,
    /// Keep versions created within this long (as in 30m, 12h, 7d).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Never delete objects younger than this (as in 1h or 0).
    #[arg(long, value_name = "DURATION", default_value = "1h")]
    grace: String,
    /// Print what would be deleted, and delete nothing.
    #[arg(long)]
    dry_run: bool,
    /// After collecting, publish a compaction version on every lineage whose
    /// head uses segments with a live ratio below --compact-threshold.
    #[arg(long, conflicts_with = "dry_run")]
    compact: bool,
    /// Live ratio (bytes still referenced / segment size) below which a
    /// segment's live bytes are copied by --compact.
    #[arg(long, value_name = "RATIO", default_value_t = 0.5, requires = "compact")]
    compact_threshold: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum InspectCommand {
    /// List the records of a segment.
    Segment {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the checkpoint root of a version: counts and inode pages.
    Checkpoint {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a version: its record, lineage entries and segments.
    Version {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's lineages, tags, leases and objects by kind.
    Volume {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the extent map of a file: offsets, lengths, segments, CRCs.
    Path {
        name: String,
        path: String,
        /// Version id, unique prefix or tag (default: the head of main).
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Runs `chalk fsck`; returns an error (exit status 1) unless the store is whole.
pub fn run_fsck(store: &Store, args: FsckArgs) -> anyhow::Result<()> {
    let options = FsckOptions {
        volume: args.name.as_deref().map(VolumeName::new).transpose()?,
        version: args.version,
        deep: args.deep,
        repair: args.repair,
    };
    let report = store.fsck(&options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_fsck(&report);
    }
    let open = report.problems.iter().filter(|p| !p.repaired).count();
    if open > 0 {
        let found = count(open as u64, "problem", "problems");
        let (remain, them) = if open == 1 { ("remains", "it") } else { ("remain", "them") };
        let next = match (args.repair, args.deep) {
            (false, false) => " (run with --repair to fix the local cache, --deep to check the object store's copies)".to_owned(),
            (false, true) => " (run with --repair to fix the local cache)".to_owned(),
            (true, false) => {
                format!(": --repair could not fix {them}, and each says what to do (run with --deep to check the object store's copies)")
            }
            (true, true) => format!(": --repair could not fix {them}, and each says what to do"),
        };
        bail!("fsck found {found} that {remain}; see the list above{next}");
    }
    Ok(())
}

fn print_fsck(report: &FsckReport) {
    for p in &report.problems {
        let mut fields = Vec::new();
        let mut add = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                fields.push(format!("{name}={value}"));
            }
        };
        add("volume", p.volume.clone());
        add("version", p.version.clone());
        add("path", p.path.clone());
        add("segment", p.segment.clone());
        add("offset", p.offset.map(|o| o.to_string()));
        add("copy", p.copy.map(|c| format!("{c:?}").to_lowercase()));
        add("key", p.key.clone());
        add("file", p.file.clone());
        let state = if p.repaired { "REPAIRED" } else { "PROBLEM" };
        println!("{state} {}: {}", p.kind, fields.join(" "));
        println!("    {}", p.detail);
        if !p.affected_versions.is_empty() {
            println!("    affected versions: {}", p.affected_versions.join(", "));
        }
    }
    let open = report.problems.iter().filter(|p| !p.repaired).count();
    println!(
        "checked {}, {}, {}, {}: {} ({} repaired); {}, {} reclaimable",
        count(report.volumes as u64, "volume", "volumes"),
        count(report.versions as u64, "version", "versions"),
        count(report.segments as u64, "segment", "segments"),
        count(report.records_checked as u64, "record", "records"),
        count(report.problems.len() as u64, "problem", "problems"),
        report.problems.len() - open,
        count(report.orphaned_objects as u64, "orphaned object", "orphaned objects"),
        human_bytes(report.reclaimable_bytes)
    );
    if open == 0 {
        println!("the store is whole");
    }
}

/// Runs `chalk gc`.
pub fn run_gc(store: &std::sync::Arc<Store>, args: GcArgs) -> anyhow::Result<()> {
    let volume = VolumeName::new(&args.name)?;
    let options = GcOptions {
        keep_last: args.keep_last,
        keep_within: args.keep_within.as_deref().map(parse_duration).transpose()?,
        grace: parse_duration(&args.grace)?,
        dry_run: args.dry_run,
    };
    if options.keep_last == Some(0) {
        bail!("--keep-last 0 keeps nothing beyond heads, tags and leases; give at least 1");
    }
    let report = store.gc(&volume, &options).with_context(|| format!("gc of volume {volume} failed"))?;
    if args.json {
        print_gc_json(&report)?;
    } else {
        print_gc(&report);
    }
    if args.compact {
        let compactions = store
            .compact(&volume, args.compact_threshold)
            .with_context(|| format!("compaction of volume {volume} failed; nothing was published"))?;
        for c in &compactions {
            match &c.version {
                Some(version) => println!(
                    "compacted lineage {}: copied {} from {} segments into version {}",
                    c.lineage,
                    human_bytes(c.copied_bytes),
                    c.segments.len(),
                    version.id
                ),
                None => println!("lineage {} needs no compaction", c.lineage),
            }
        }
    }
    Ok(())
}

fn print_gc(report: &GcReport) {
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    for object in &report.deleted {
        println!("{verb} {} ({})", object.key, human_bytes(object.size));
    }
    for entry in &report.pruned {
        println!("{} version {} (lineage {} entry {})", if report.dry_run { "would prune" } else { "pruned" }, entry.version, entry.lineage, entry.seq);
    }
    for upload in &report.aborted_uploads {
        println!("{} incomplete multipart upload of {}", if report.dry_run { "would abort" } else { "aborted" }, upload.key);
    }
    println!(
        "{} {}: {} objects, {}; kept {} versions, {} unreferenced objects younger than the grace period{}",
        report.volume,
        verb,
        report.deleted.len(),
        human_bytes(report.deleted_bytes),
        report.kept.len(),
        report.young_kept,
        if report.lease_kept > 0 { format!(", {} objects named by new leases", report.lease_kept) } else { String::new() }
    );
}

fn print_gc_json(report: &GcReport) -> anyhow::Result<()> {
    let kept: BTreeMap<String, String> = report.kept.iter().map(|(v, r)| (v.to_string(), format!("{r:?}").to_lowercase())).collect();
    let value = json!({
        "volume": report.volume,
        "dry_run": report.dry_run,
        "kept_versions": kept,
        "pruned": report.pruned.iter().map(|p| json!({"version": p.version, "lineage": p.lineage, "seq": p.seq})).collect::<Vec<_>>(),
        "deleted": report.deleted.iter().map(|o| json!({"key": o.key, "bytes": o.size})).collect::<Vec<_>>(),
        "deleted_objects": report.deleted.len(),
        "deleted_bytes": report.deleted_bytes,
        "young_kept": report.young_kept,
        "lease_kept": report.lease_kept,
        "aborted_uploads": report.aborted_uploads.iter().map(|u| json!({"key": u.key, "upload_id": u.upload_id})).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

fn parse_version_id(text: &str) -> anyhow::Result<VersionId> {
    Ok(text.parse::<VersionId>()?)
}

/// Runs `chalk inspect`.
pub fn run_inspect(store: &std::sync::Arc<Store>, command: InspectCommand) -> anyhow::Result<()> {
    match command {
        InspectCommand::Segment { id, json } => inspect_segment(store, &id, json),
        InspectCommand::Checkpoint { id, json } => {
            let version = parse_version_id(&id)?;
            let volume = store.volume_of_version(version)?;
            let root = store.inspect_checkpoint(&volume, version)?;
            if json {
                let pages: Vec<_> = root.pages.iter().map(|(n, k)| json!({"page": n, "key": k})).collect();
                let value = json!({"volume": volume.to_string(), "version": version.to_string(), "next_inode": root.next_ino,
                    "files": root.files, "bytes": root.bytes, "pages": pages});
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("checkpoint of version {version} (volume {volume})");
                println!("files {}  bytes {} ({})  next inode {}  pages {}", root.files, root.bytes, human_bytes(root.bytes), root.next_ino, root.pages.len());
                println!("{:>16}  KEY", "PAGE");
                for (page, key) in &root.pages {
                    println!("{page:>16}  {key}");
                }
            }
            Ok(())
        }
        InspectCommand::Version { id, json } => inspect_version(store, &id, json),
        InspectCommand::Volume { name, json } => inspect_volume(store, &name, json),
        InspectCommand::Path { name, path, version, json } => {
            let volume = VolumeName::new(&name)?;
            let session = crate::transfer::open_reader(store, &volume, version.as_deref())?;
            let (attr, extents) = session.file_extents(&path)?;
            let base = session.base_version();
            if json {
                let list: Vec<_> = extents
                    .iter()
                    .map(|(offset, x)| {
                        json!({"file_offset": offset, "len": x.len, "segment": x.segment.to_string(), "data_offset": x.data_offset,
                            "record_offset": x.record_offset, "record_len": x.record_len, "crc": record_crc(store, &volume, x)})
                    })
                    .collect();
                let value = json!({"volume": volume.to_string(), "version": base.id.to_string(), "path": path, "inode": attr.ino.0,
                    "size": attr.size, "extents": list});
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                println!("{path} in version {} of {volume}: inode {}, {} bytes, {} extents", base.id, attr.ino, attr.size, extents.len());
                println!("{:>14} {:>10} {:<26} {:>12} {:>10} {:>10}", "FILE OFFSET", "LENGTH", "SEGMENT", "RECORD AT", "RECORD LEN", "CRC");
                for (offset, x) in &extents {
                    let crc = record_crc(store, &volume, x).map(|c| format!("{c:08x}")).unwrap_or_else(|| "?".into());
                    println!("{offset:>14} {:>10} {:<26} {:>12} {:>10} {crc:>10}", x.len, x.segment.to_string(), x.record_offset, x.record_len);
                }
            }
            Ok(())
        }
    }
}

/// Reads the record CRC from the header of an extent's record: from the
/// local whole segment when there is one, else with a ranged GET.
fn record_crc(store: &Store, volume: &VolumeName, extent: &chalk_engine::extent::Extent) -> Option<u32> {
    let key = format!("volumes/{volume}/segments/{}.seg", extent.segment);
    let local = store.local_root().join("cache/segments").join(format!("{}.seg", extent.segment));
    let header = match std::fs::File::open(&local) {
        Ok(file) => {
            let mut buf = [0u8; 16];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, extent.record_offset).ok()?;
            buf.to_vec()
        }
        Err(_) => store.objects().get_range(&key, extent.record_offset, 16).ok()?,
    };
    (header.len() == 16).then(|| u32::from_le_bytes(header[12..16].try_into().expect("4 bytes")))
}

fn inspect_segment(store: &Store, id: &str, json: bool) -> anyhow::Result<()> {
    let id: SegmentId = id.parse()?;
    let view = store.inspect_segment(id)?;
    if json {
        let records: Vec<_> = view
            .records
            .iter()
            .map(|r| {
                json!({"offset": r.offset, "type": r.record_type, "len": r.len, "crc": format!("{:08x}", r.crc),
                    "inode": r.data.map(|d| d.0 .0), "file_offset": r.data.map(|d| d.1), "data_len": r.data.map(|d| d.2)})
            })
            .collect();
        let value = json!({"segment": id.to_string(), "source": view.source, "bytes": view.len,
            "volume": view.header.as_ref().map(|h| h.volume.clone()), "session": view.header.as_ref().map(|h| h.session.to_string()),
            "sealed": view.sealed, "invalid": view.invalid.as_ref().map(|(o, d)| json!({"offset": o, "detail": d})), "records": records});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("segment {id} from {} ({} bytes)", view.source, view.len);
    if let Some(header) = &view.header {
        println!("volume {}  session {}  sealed {}", header.volume, header.session, view.sealed);
    }
    println!("{:>12} {:<9} {:>10} {:>10} {:>18} {:>14} {:>10}", "OFFSET", "TYPE", "LENGTH", "CRC", "INODE", "FILE OFFSET", "DATA");
    for r in &view.records {
        let (ino, offset, len) = match r.data {
            Some((ino, offset, len)) => (ino.to_string(), offset.to_string(), len.to_string()),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("{:>12} {:<9} {:>10} {:>10} {ino:>18} {offset:>14} {len:>10}", r.offset, r.record_type, r.len, format!("{:08x}", r.crc));
    }
    if let Some((offset, detail)) = &view.invalid {
        println!("invalid bytes at offset {offset}: {detail}");
    }
    Ok(())
}

fn inspect_version(store: &std::sync::Arc<Store>, id: &str, json: bool) -> anyhow::Result<()> {
    let version = parse_version_id(id)?;
    let volume = store.volume_of_version(version)?;
    let catalog = Catalog::read(store, &volume)?;
    let entries: Vec<_> = catalog.entries.iter().filter(|e| e.version.id == version).collect();
    let Some(info) = entries.first().map(|e| e.version.clone()) else {
        bail!("version {version} of volume {volume} has a checkpoint but no lineage entry; gc may have pruned it");
    };
    let session = store.open_session(&volume, SessionBase::Version(version), Access::ReadOnly)?;
    drop(session);
    let sizes: BTreeMap<String, u64> = info
        .segments
        .iter()
        .map(|s| {
            let key = format!("volumes/{volume}/segments/{s}.seg");
            (s.to_string(), catalog.objects.get(&key).map(|o| o.size).unwrap_or(0))
        })
        .collect();
    if json {
        let value = json!({"volume": volume.to_string(), "id": version.to_string(), "seq": info.seq, "lineage": info.lineage.to_string(),
            "parent": info.parent.map(|p| p.to_string()), "created_at": rfc3339(info.created_at), "message": info.message,
            "files": info.files, "bytes": info.bytes, "segments": sizes,
            "entries": entries.iter().map(|e| json!({"lineage": e.lineage.to_string(), "seq": e.seq, "kind": e.kind.clone().unwrap_or_else(|| "sync".into())})).collect::<Vec<_>>()});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("version {version} of volume {volume}");
    println!("lineage {} seq {}  parent {}  created {}", info.lineage, info.seq, info.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()), rfc3339(info.created_at));
    println!("files {}  bytes {} ({})  message {}", info.files, info.bytes, human_bytes(info.bytes), info.message.as_deref().unwrap_or("-"));
    println!("{:<12} {:>8} KIND", "LINEAGE", "ENTRY");
    for e in &entries {
        println!("{:<12} {:>8} {}", e.lineage.to_string(), e.seq, e.kind.as_deref().unwrap_or("sync"));
    }
    println!("{:<26} {:>12}", "SEGMENT", "BYTES");
    for (segment, bytes) in &sizes {
        println!("{segment:<26} {bytes:>12}");
    }
    Ok(())
}

fn inspect_volume(store: &Store, name: &str, json: bool) -> anyhow::Result<()> {
    let volume = VolumeName::new(name)?;
    let catalog = Catalog::read(store, &volume)?;
    if catalog.objects.is_empty() {
        bail!("volume {volume} has no objects in the store; list volumes with `chalk volume list`");
    }
    let prefix = format!("volumes/{volume}/");
    let mut kinds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for meta in catalog.objects.values() {
        let kind = meta.key[prefix.len()..].split('/').next().unwrap_or_default().to_owned();
        let slot = kinds.entry(kind).or_default();
        slot.0 += 1;
        slot.1 += meta.size;
    }
    let lineages: Vec<_> = catalog
        .lineages()
        .into_iter()
        .map(|(name, entries)| {
            let head = entries.last().expect("a lineage has entries");
            (name.to_string(), entries.len(), head.seq, head.version.id.to_string())
        })
        .collect();
    if json {
        let value = json!({"volume": volume.to_string(), "exists": catalog.exists,
            "lineages": lineages.iter().map(|(n, c, s, h)| json!({"name": n, "entries": c, "head_seq": s, "head": h})).collect::<Vec<_>>(),
            "tags": catalog.tags.iter().map(|(t, v)| json!({"tag": t, "version": v.to_string()})).collect::<Vec<_>>(),
            "leases": catalog.leases.iter().map(|l| json!({"session": l.record.session, "host": l.record.host, "pid": l.record.pid,
                "versions": l.record.versions, "syncing": l.record.syncing})).collect::<Vec<_>>(),
            "pruned_entries": catalog.pruned.len(),
            "objects": kinds.iter().map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b}))).collect::<serde_json::Map<_, _>>()});
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("volume {volume}{}", if catalog.exists { "" } else { " (deleted; `chalk gc` frees its objects)" });
    println!("{:<20} {:>8} {:>8} HEAD", "LINEAGE", "ENTRIES", "HEAD SEQ");
    for (name, count, seq, head) in &lineages {
        println!("{name:<20} {count:>8} {seq:>8} {head}");
    }
    for (tag, version) in &catalog.tags {
        println!("tag {tag} -> {version}");
    }
    for lease in &catalog.leases {
        println!("lease of session {} on {} (pid {}): versions {}{}", lease.record.session, lease.record.host, lease.record.pid,
            lease.record.versions.join(", "), if lease.record.syncing { ", syncing" } else { "" });
    }
    println!("{:<12} {:>8} {:>14}", "OBJECTS", "COUNT", "BYTES");
    for (kind, (count, bytes)) in &kinds {
        println!("{kind:<12} {count:>8} {:>14}", human_bytes(*bytes));
    }
    if !catalog.pruned.is_empty() {
        println!("{} lineage entries pruned by gc", catalog.pruned.len());
    }
    Ok(())
}
