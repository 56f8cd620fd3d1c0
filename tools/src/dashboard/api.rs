//! JSON endpoints: volumes, lineages, versions, directory listings and diffs.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::Json;
use chalk_engine::{
    normalize_path, Access, ChangeKind, FileKind, LineageName, PathEntry, Session, SessionBase, Store, VersionInfo,
    VolumeName,
};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{blocking, ApiError};
use super::SharedState;
use crate::output::{rfc3339, version_json};

/// Largest file, in bytes, that the diff view compares line by line.
pub const TEXT_DIFF_MAX_BYTES: u64 = 256 * 1024;
/// Lines of context around each changed block of a text diff.
const TEXT_DIFF_CONTEXT_LINES: usize = 3;

/// Query parameters that name a version and a path. `version` (id, prefix or
/// tag) wins over `lineage`, and without either the head of `main` is read.
#[derive(Deserialize, Default)]
pub struct VersionQuery {
    pub version: Option<String>,
    pub lineage: Option<String>,
    pub path: Option<String>,
}

pub fn parse_volume(name: &str) -> Result<VolumeName, ApiError> {
    Ok(VolumeName::new(name)?)
}

/// Resolves the version a query names.
pub fn resolve_version(store: &Store, volume: &VolumeName, query: &VersionQuery) -> Result<VersionInfo, ApiError> {
    match (query.version.as_deref().filter(|v| !v.is_empty()), query.lineage.as_deref().filter(|l| !l.is_empty())) {
        (Some(version), _) => Ok(store.resolve_version(volume, version)?),
        (None, Some(lineage)) => Ok(store.head(volume, &LineageName::new(lineage)?)?),
        (None, None) => Ok(store.head(volume, &LineageName::main())?),
    }
}

/// Opens a read-only session on the version a query names.
pub fn open_version(store: &Arc<Store>, volume: &VolumeName, query: &VersionQuery) -> Result<(Session, VersionInfo), ApiError> {
    let info = resolve_version(store, volume, query)?;
    let session = store.open_session(volume, SessionBase::Version(info.id), Access::ReadOnly)?;
    Ok((session, info))
}

/// Returns a query path in canonical form: names joined by `/`, no leading `/`.
pub fn canonical_path(path: Option<&str>) -> Result<String, ApiError> {
    let names = normalize_path(path.unwrap_or(""))?;
    Ok(names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>().join("/"))
}

fn entry_json(entry: &PathEntry) -> Value {
    let name = entry.path.rsplit('/').next().unwrap_or(&entry.path);
    json!({
        "name": name,
        "path": entry.path,
        "type": entry.attr.kind.as_str(),
        "size": entry.attr.size,
        "mode": format!("{:04o}", entry.attr.perm),
        "mtime": rfc3339(entry.attr.mtime),
        "mtime_ns": entry.attr.mtime.as_nanos().to_string(),
        "target": entry.target.as_ref().map(|t| String::from_utf8_lossy(t).into_owned()),
    })
}

/// `GET /api/volumes`: every volume with its latest version on `main`.
pub async fn volumes(State(state): State<SharedState>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let list: Vec<Value> = store
            .list_volumes()?
            .iter()
            .map(|v| {
                json!({
                    "name": v.name.to_string(),
                    "files": v.latest.files,
                    "bytes": v.latest.bytes,
                    "latest_version": version_json(&v.latest),
                })
            })
            .collect();
        Ok(Json(json!({ "volumes": list })))
    })
    .await
}

/// `GET /api/volumes/{volume}/lineages`: lineages with their heads.
pub async fn lineages(State(state): State<SharedState>, Path(volume): Path<String>) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let list: Vec<Value> = store
            .lineages(&volume)?
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
        let tags: Vec<Value> = store
            .tags(&volume)?
            .into_iter()
            .map(|(tag, version)| json!({ "tag": tag, "version": version.to_string() }))
            .collect();
        Ok(Json(json!({ "volume": volume.to_string(), "lineages": list, "tags": tags })))
    })
    .await
}

#[derive(Deserialize)]
pub struct VersionsQuery {
    lineage: Option<String>,
}

/// `GET /api/volumes/{volume}/versions[?lineage=NAME]`: the entries of one
/// lineage, or every version of the volume, oldest first.
pub async fn versions(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<VersionsQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let versions = match query.lineage.as_deref().filter(|l| !l.is_empty()) {
            Some(lineage) => store.versions(&volume, &LineageName::new(lineage)?)?,
            None => store.all_versions(&volume)?,
        };
        let list: Vec<Value> = versions.iter().map(version_json).collect();
        Ok(Json(json!({ "volume": volume.to_string(), "lineage": query.lineage, "versions": list })))
    })
    .await
}

/// `GET /api/volumes/{volume}/tree?version=&lineage=&path=`: one directory
/// of one version (or the file itself when `path` names a file).
pub async fn tree(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<VersionQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let path = canonical_path(query.path.as_deref())?;
        let (session, info) = open_version(&store, &volume, &query)?;
        let attr = session.resolve_path(&path)?;
        let entries = session.walk(&path, false)?;
        Ok(Json(json!({
            "volume": volume.to_string(),
            "version": version_json(&info),
            "path": path,
            "type": attr.kind.as_str(),
            "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
        })))
    })
    .await
}

#[derive(Deserialize)]
pub struct DiffQuery {
    a: String,
    b: String,
    path: Option<String>,
}

/// `GET /api/volumes/{volume}/diff?a=&b=`: what changed from version `a` to `b`.
pub async fn diff(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<DiffQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let a = store.resolve_version(&volume, &query.a)?;
        let b = store.resolve_version(&volume, &query.b)?;
        let changes = store.diff(&volume, a.id, b.id)?;
        let list: Vec<Value> = changes
            .iter()
            .map(|c| {
                let small = |size: Option<u64>| size.is_none_or(|s| s <= TEXT_DIFF_MAX_BYTES);
                let text_diff = c.file_kind == FileKind::File
                    && c.kind != ChangeKind::Renamed
                    && small(c.old_size)
                    && small(c.new_size);
                json!({
                    "path": c.path,
                    "change": c.kind.as_str(),
                    "old_path": c.old_path,
                    "type": c.file_kind.as_str(),
                    "old_size": c.old_size,
                    "new_size": c.new_size,
                    "content_changed": c.content_changed,
                    "text_diff": text_diff,
                })
            })
            .collect();
        Ok(Json(json!({ "a": version_json(&a), "b": version_json(&b), "changes": list })))
    })
    .await
}

/// Reads a whole file of at most [`TEXT_DIFF_MAX_BYTES`] as UTF-8 text;
/// `None` when the path does not exist in that version.
fn read_small_text(session: &Session, path: &str) -> Result<Option<String>, ApiError> {
    let attr = match session.resolve_path(path) {
        Ok(attr) => attr,
        Err(chalk_engine::EngineError::NotFound { .. }) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if attr.kind != FileKind::File {
        return Err(ApiError::bad_request(format!("{path} is a {}, not a regular file", attr.kind.as_str())));
    }
    if attr.size > TEXT_DIFF_MAX_BYTES {
        return Err(ApiError::new(
            axum::http::StatusCode::UNPROCESSABLE_ENTITY,
            format!("{path} has {} bytes; the text diff covers files of up to {TEXT_DIFF_MAX_BYTES} bytes, download both versions instead", attr.size),
        ));
    }
    let mut bytes = Vec::with_capacity(attr.size as usize);
    session.read_file_to(path, &mut bytes)?;
    if bytes.contains(&0) {
        return Err(binary_error(path));
    }
    String::from_utf8(bytes).map(Some).map_err(|_| binary_error(path))
}

fn binary_error(path: &str) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        format!("{path} is not UTF-8 text, so it has no line diff; download both versions to compare them"),
    )
}

/// `GET /api/volumes/{volume}/diff/text?a=&b=&path=`: a line diff of one
/// small text file between two versions, as hunks with context lines.
pub async fn text_diff(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<DiffQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let path = canonical_path(query.path.as_deref())?;
        if path.is_empty() {
            return Err(ApiError::bad_request("missing path: give the file to compare as ?path=FILE"));
        }
        let a = VersionQuery { version: Some(query.a.clone()), ..VersionQuery::default() };
        let b = VersionQuery { version: Some(query.b.clone()), ..VersionQuery::default() };
        let (session_a, info_a) = open_version(&store, &volume, &a)?;
        let (session_b, info_b) = open_version(&store, &volume, &b)?;
        let old = read_small_text(&session_a, &path)?;
        let new = read_small_text(&session_b, &path)?;
        if old.is_none() && new.is_none() {
            return Err(ApiError::not_found(format!("{path} exists in neither version {} nor {}", info_a.id, info_b.id)));
        }
        let (old, new) = (old.unwrap_or_default(), new.unwrap_or_default());
        let diff = similar::TextDiff::from_lines(&old, &new);
        let mut hunks = Vec::new();
        for group in diff.grouped_ops(TEXT_DIFF_CONTEXT_LINES) {
            let mut lines = Vec::new();
            for op in &group {
                for change in diff.iter_changes(op) {
                    let tag = match change.tag() {
                        similar::ChangeTag::Equal => "equal",
                        similar::ChangeTag::Delete => "delete",
                        similar::ChangeTag::Insert => "insert",
                    };
                    lines.push(json!({
                        "tag": tag,
                        "old_line": change.old_index().map(|i| i + 1),
                        "new_line": change.new_index().map(|i| i + 1),
                        "text": change.value().trim_end_matches(['\n', '\r']),
                    }));
                }
            }
            hunks.push(json!({ "lines": lines }));
        }
        Ok(Json(json!({ "path": path, "a": info_a.id.to_string(), "b": info_b.id.to_string(), "hunks": hunks })))
    })
    .await
}
