//! Human-readable tables and `--json` output of the CLI.

use chalk_engine::{Change, FileKind, LineageSummary, PathEntry, Timestamp, VersionInfo, VolumeName, VolumeSummary};
use chalk_engine::space::{SpaceReport, SpaceUse};
use serde_json::json;

/// Formats a byte count with binary units (`1.5 MiB`).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Formats a count with its noun, singular for one: "1 file", "3 files".
pub fn count(n: u64, singular: &str, plural: &str) -> String {
    format!("{n} {}", if n == 1 { singular } else { plural })
}

/// Formats a timestamp as RFC 3339 in UTC with seconds precision.
pub fn rfc3339(t: Timestamp) -> String {
    let days = t.secs.div_euclid(86_400);
    let secs_of_day = t.secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn version_json(v: &VersionInfo) -> serde_json::Value {
    json!({
        "id": v.id.to_string(),
        "seq": v.seq,
        "parent": v.parent.map(|p| p.to_string()),
        "lineage": v.lineage.to_string(),
        "created_at": rfc3339(v.created_at),
        "message": v.message,
        "files": v.files,
        "bytes": v.bytes,
    })
}

pub fn print_volumes(volumes: &[VolumeSummary], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<_> = volumes
            .iter()
            .map(|v| json!({"name": v.name.to_string(), "latest_version": version_json(&v.latest)}))
            .collect();
        return print_json(&json!(list));
    }
    if volumes.is_empty() {
        println!("no volumes; create one with `chalk volume create NAME`");
        return Ok(());
    }
    println!("{:<24} {:<26} {:>8} {:>10}  UPDATED", "NAME", "LATEST VERSION", "FILES", "SIZE");
    for v in volumes {
        println!(
            "{:<24} {:<26} {:>8} {:>10}  {}",
            v.name.as_str(),
            v.latest.id.to_string(),
            v.latest.files,
            human_bytes(v.latest.bytes),
            rfc3339(v.latest.created_at)
        );
    }
    Ok(())
}

pub fn print_info(volume: &VolumeName, head: &VersionInfo, versions: usize, space: &SpaceReport, json: bool) -> anyhow::Result<()> {
    let usage_json = |u: &SpaceUse| json!({"bytes": u.bytes, "exclusive_bytes": u.exclusive_bytes, "shared_bytes": u.shared_bytes});
    if json {
        let lineages: Vec<_> = space.lineages.iter().map(|(name, u)| json!({"lineage": name.to_string(), "space": usage_json(u)})).collect();
        let per_version: Vec<_> = space
            .versions
            .iter()
            .map(|(v, u)| json!({"id": v.id.to_string(), "lineage": v.lineage.to_string(), "seq": v.seq, "space": usage_json(u)}))
            .collect();
        return print_json(&json!({"name": volume.to_string(), "versions": versions, "latest_version": version_json(head),
            "stored_bytes": space.total_bytes, "lineages": lineages, "version_space": per_version}));
    }
    println!("volume:         {volume}");
    println!("latest version: {} (seq {}, {})", head.id, head.seq, rfc3339(head.created_at));
    println!("files:          {}", head.files);
    println!("size:           {}", human_bytes(head.bytes));
    println!("versions:       {versions}");
    println!("stored:         {} in segment records of all versions", human_bytes(space.total_bytes));
    println!();
    println!("{:<20} {:>12} {:>12} {:>12}", "LINEAGE", "BYTES", "EXCLUSIVE", "SHARED");
    for (name, u) in &space.lineages {
        println!("{:<20} {:>12} {:>12} {:>12}", name.to_string(), human_bytes(u.bytes), human_bytes(u.exclusive_bytes), human_bytes(u.shared_bytes));
    }
    println!();
    println!("{:<26} {:<12} {:>5} {:>12} {:>12} {:>12}", "VERSION", "LINEAGE", "SEQ", "BYTES", "EXCLUSIVE", "SHARED");
    for (v, u) in &space.versions {
        println!(
            "{:<26} {:<12} {:>5} {:>12} {:>12} {:>12}",
            v.id.to_string(),
            v.lineage.to_string(),
            v.seq,
            human_bytes(u.bytes),
            human_bytes(u.exclusive_bytes),
            human_bytes(u.shared_bytes)
        );
    }
    Ok(())
}

fn kind_name(kind: FileKind) -> &'static str {
    kind.as_str()
}

pub fn print_entries(entries: &[PathEntry], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({
                    "path": e.path,
                    "type": kind_name(e.attr.kind),
                    "size": e.attr.size,
                    "mode": format!("{:04o}", e.attr.perm),
                    "mtime": rfc3339(e.attr.mtime),
                    "target": e.target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
                })
            })
            .collect();
        return print_json(&json!(list));
    }
    for e in entries {
        let suffix = match (&e.attr.kind, &e.target) {
            (FileKind::Directory, _) => "/".to_owned(),
            (FileKind::Symlink, Some(target)) => format!(" -> {}", String::from_utf8_lossy(target)),
            _ => String::new(),
        };
        println!("{:<8} {:>10}  {}  {}{}", kind_name(e.attr.kind), human_bytes(e.attr.size), rfc3339(e.attr.mtime), e.path, suffix);
    }
    Ok(())
}

pub fn print_diff(changes: &[Change], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<_> = changes
            .iter()
            .map(|c| {
                json!({
                    "path": c.path,
                    "change": c.kind.as_str(),
                    "old_path": c.old_path,
                    "type": c.file_kind.as_str(),
                    "old_size": c.old_size,
                    "new_size": c.new_size,
                    "content_changed": c.content_changed,
                    "ranges": c.ranges.iter().map(|(start, end)| json!([start, end])).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_json(&json!(list));
    }
    if changes.is_empty() {
        println!("no differences");
    }
    for c in changes {
        let marker = match c.kind {
            chalk_engine::ChangeKind::Added => "A",
            chalk_engine::ChangeKind::Removed => "D",
            chalk_engine::ChangeKind::Modified => "M",
            chalk_engine::ChangeKind::Renamed => "R",
        };
        let sizes = match (c.old_size, c.new_size) {
            _ if c.file_kind != FileKind::File => String::new(),
            (Some(old), Some(new)) if old != new => format!("  {} -> {}", human_bytes(old), human_bytes(new)),
            (None, Some(new)) => format!("  {}", human_bytes(new)),
            _ => String::new(),
        };
        match &c.old_path {
            Some(old) => println!("{marker}  {old} -> {}{sizes}", c.path),
            None => println!("{marker}  {}{sizes}", c.path),
        }
    }
    Ok(())
}

pub fn print_lineages(lineages: &[LineageSummary], json: bool) -> anyhow::Result<()> {
    if json {
        let list: Vec<_> = lineages
            .iter()
            .map(|l| {
                json!({
                    "name": l.name.to_string(),
                    "entries": l.entries,
                    "head": version_json(&l.head),
                    "forked_from": l.forked_from.map(|v| v.to_string()),
                })
            })
            .collect();
        return print_json(&json!(list));
    }
    println!("{:<24} {:<26} {:>8}  FORKED FROM", "LINEAGE", "HEAD", "VERSIONS");
    for l in lineages {
        let forked = l.forked_from.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        println!("{:<24} {:<26} {:>8}  {forked}", l.name.as_str(), l.head.id.to_string(), l.entries);
    }
    Ok(())
}

pub fn print_versions(versions: &[VersionInfo], json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&json!(versions.iter().map(version_json).collect::<Vec<_>>()));
    }
    println!(
        "{:>4}  {:<26}  {:<12}  {:<26}  {:<20}  {:>8} {:>10}  MESSAGE",
        "SEQ", "ID", "LINEAGE", "PARENT", "CREATED", "FILES", "SIZE"
    );
    for v in versions {
        println!(
            "{:>4}  {:<26}  {:<12}  {:<26}  {:<20}  {:>8} {:>10}  {}",
            v.seq,
            v.id.to_string(),
            v.lineage.as_str(),
            v.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            rfc3339(v.created_at),
            v.files,
            human_bytes(v.bytes),
            v.message.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_singular_only_for_one() {
        assert_eq!(count(0, "file", "files"), "0 files");
        assert_eq!(count(1, "file", "files"), "1 file");
        assert_eq!(count(2, "process", "processes"), "2 processes");
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(Timestamp { secs: 0, nanos: 0 }), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(Timestamp { secs: 951_782_400, nanos: 5 }), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(Timestamp { secs: 1_796_342_400, nanos: 0 }), "2026-12-04T00:00:00Z");
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
