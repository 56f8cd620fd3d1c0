//! Previews of one file as JSON, which the app renders as text and never as
//! HTML. A preview is text (shown with line numbers), a table of the first
//! rows of a CSV or JSON file, a hex dump of binary data, or an image that
//! the app loads from the raw endpoint.

use axum::extract::{Path, Query, State};
use axum::Json;
use chalk_engine::{FileKind, Session};
use serde_json::{json, Map, Value};

use super::api::{canonical_path, open_version, parse_volume, VersionQuery};
use super::error::{blocking, ApiError};
use super::files::image_type;
use super::SharedState;
use crate::output::version_json;

/// Bytes of a file read for a text, table or JSON preview.
pub const PREVIEW_MAX_BYTES: u64 = 256 * 1024;
/// Largest image, in bytes, that the app shows inline.
pub const IMAGE_PREVIEW_MAX_BYTES: u64 = 32 << 20;
/// Rows of a CSV or JSON table preview.
pub const TABLE_ROWS_MAX: usize = 100;
/// Bytes shown in a hex dump.
pub const HEX_BYTES_MAX: usize = 4096;

/// `GET /api/volumes/{volume}/preview?version=&lineage=&path=`.
pub async fn preview(
    State(state): State<SharedState>,
    Path(volume): Path<String>,
    Query(query): Query<VersionQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = state.store.clone();
    blocking(move || {
        let volume = parse_volume(&volume)?;
        let path = canonical_path(query.path.as_deref())?;
        let (session, info) = open_version(&store, &volume, &query)?;
        let mut body = preview_file(&session, &path)?;
        body.insert("path".into(), json!(path));
        body.insert("version".into(), version_json(&info));
        Ok(Json(Value::Object(body)))
    })
    .await
}

fn preview_file(session: &Session, path: &str) -> Result<Map<String, Value>, ApiError> {
    let attr = session.resolve_path(path)?;
    if attr.kind != FileKind::File {
        return Err(ApiError::bad_request(format!("{path} is a {}; only regular files have previews", attr.kind.as_str())));
    }
    let mut out = Map::new();
    out.insert("size".into(), json!(attr.size));
    if let Some((mime, magic)) = image_type(path) {
        let head = session.read(attr.ino, 0, 16)?;
        if head.starts_with(magic) {
            out.insert("kind".into(), json!("image"));
            out.insert("content_type".into(), json!(mime));
            out.insert("too_large".into(), json!(attr.size > IMAGE_PREVIEW_MAX_BYTES));
            return Ok(out);
        }
    }
    let read_len = attr.size.min(PREVIEW_MAX_BYTES);
    let mut bytes = Vec::with_capacity(read_len as usize);
    while (bytes.len() as u64) < read_len {
        let data = session.read(attr.ino, bytes.len() as u64, (read_len - bytes.len() as u64) as u32)?;
        if data.is_empty() {
            break;
        }
        bytes.extend_from_slice(&data);
    }
    let truncated = attr.size > bytes.len() as u64;
    out.insert("truncated".into(), json!(truncated));
    out.insert("preview_bytes".into(), json!(bytes.len()));
    let Some(text) = as_text(&bytes, truncated) else {
        out.insert("kind".into(), json!("binary"));
        out.insert("hex".into(), json!(hex_dump(&bytes[..bytes.len().min(HEX_BYTES_MAX)])));
        return Ok(out);
    };
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    // Spreadsheet programs start their CSV exports with a byte order mark,
    // which would otherwise become part of the first column's name.
    let data = text.strip_prefix('\u{feff}').unwrap_or(text);
    let table = match extension.as_str() {
        "csv" => Some(csv_table(data, b',', truncated)),
        "tsv" => Some(csv_table(data, b'\t', truncated)),
        "json" if !truncated => serde_json::from_str::<Value>(data).ok().map(|v| json_table(&v)),
        "jsonl" | "ndjson" => Some(json_lines_table(data, truncated)),
        _ => None,
    };
    match table {
        Some((columns, rows)) if !columns.is_empty() => {
            out.insert("kind".into(), json!("table"));
            out.insert("columns".into(), json!(columns));
            out.insert("rows".into(), json!(rows));
        }
        _ => {
            out.insert("kind".into(), json!("text"));
            out.insert("text".into(), json!(text));
        }
    }
    Ok(out)
}

/// Returns the bytes as UTF-8 text, or `None` for binary data: a NUL byte, or
/// invalid UTF-8 other than a character cut at the end of a truncated read.
fn as_text(bytes: &[u8], truncated: bool) -> Option<&str> {
    if bytes.contains(&0) {
        return None;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => Some(text),
        Err(err) if truncated && err.error_len().is_none() => std::str::from_utf8(&bytes[..err.valid_up_to()]).ok(),
        Err(_) => None,
    }
}

/// Formats bytes as `hexdump -C` does: offset, 16 hex bytes, printable ASCII.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (row, chunk) in bytes.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}  ", row * 16));
        for i in 0..16 {
            match chunk.get(i) {
                Some(b) => out.push_str(&format!("{b:02x} ")),
                None => out.push_str("   "),
            }
            if i == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }));
        out.push_str("|\n");
    }
    out
}

type Table = (Vec<String>, Vec<Vec<Value>>);

/// Parses up to [`TABLE_ROWS_MAX`] records of RFC 4180 CSV (quoted fields
/// with `""` escapes and line breaks); the first record is the header. A
/// truncated read drops its last, possibly cut, record.
pub fn csv_table(text: &str, separator: u8, truncated: bool) -> Table {
    let mut records: Vec<Vec<String>> = Vec::new();
    let mut record = Vec::new();
    let mut field = Vec::<u8>::new();
    let mut quoted = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    let mut complete = true;
    while i < bytes.len() && records.len() <= TABLE_ROWS_MAX {
        let b = bytes[i];
        complete = false;
        if quoted {
            if b == b'"' && bytes.get(i + 1) == Some(&b'"') {
                field.push(b'"');
                i += 1;
            } else if b == b'"' {
                quoted = false;
            } else {
                field.push(b);
            }
        } else if b == b'"' && field.is_empty() {
            quoted = true;
        } else if b == separator {
            record.push(String::from_utf8_lossy(&field).into_owned());
            field.clear();
        } else if b == b'\n' || b == b'\r' {
            if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                i += 1;
            }
            record.push(String::from_utf8_lossy(&field).into_owned());
            field.clear();
            records.push(std::mem::take(&mut record));
            complete = true;
        } else {
            field.push(b);
        }
        i += 1;
    }
    if !complete && !truncated && records.len() <= TABLE_ROWS_MAX {
        record.push(String::from_utf8_lossy(&field).into_owned());
        records.push(record);
    }
    let mut records = records.into_iter();
    let columns = records.next().unwrap_or_default();
    let rows = records.take(TABLE_ROWS_MAX).map(|r| r.into_iter().map(Value::String).collect()).collect();
    (columns, rows)
}

/// Builds a table from a JSON document. An array of objects gives one row per
/// object and one column per key. An object gives key and value columns.
fn json_table(value: &Value) -> Table {
    match value {
        Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => objects_table(items.iter().take(TABLE_ROWS_MAX)),
        Value::Array(items) if !items.is_empty() => {
            let rows = items.iter().take(TABLE_ROWS_MAX).enumerate().map(|(i, v)| vec![json!(i), cell(v)]).collect();
            (vec!["index".into(), "value".into()], rows)
        }
        Value::Object(map) => {
            let rows = map.iter().take(TABLE_ROWS_MAX).map(|(k, v)| vec![json!(k), cell(v)]).collect();
            (vec!["key".into(), "value".into()], rows)
        }
        _ => (Vec::new(), Vec::new()),
    }
}

fn json_lines_table(text: &str, truncated: bool) -> Table {
    let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if truncated {
        lines.pop();
    }
    let values: Vec<Value> = lines.iter().take(TABLE_ROWS_MAX).filter_map(|l| serde_json::from_str(l).ok()).collect();
    if values.len() < lines.len().min(TABLE_ROWS_MAX) {
        return (Vec::new(), Vec::new());
    }
    json_table(&Value::Array(values))
}

fn objects_table<'a>(items: impl Iterator<Item = &'a Value> + Clone) -> Table {
    let mut columns: Vec<String> = Vec::new();
    for item in items.clone() {
        for key in item.as_object().expect("checked by the caller").keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
    }
    let rows = items
        .map(|item| columns.iter().map(|c| item.get(c).map(cell).unwrap_or(Value::Null)).collect())
        .collect();
    (columns, rows)
}

/// Converts a value to a table cell: scalars as they are, nested values as compact JSON text.
fn cell(value: &Value) -> Value {
    match value {
        Value::Array(_) | Value::Object(_) => Value::String(value.to_string()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_handles_quotes_and_line_breaks() {
        let (columns, rows) = csv_table("a,b\n1,\"x, \"\"y\"\"\"\n2,\"two\nlines\"\n", b',', false);
        assert_eq!(columns, vec!["a", "b"]);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0][1], json!("x, \"y\""));
        assert_eq!(rows[1][1], json!("two\nlines"));
    }

    #[test]
    fn csv_keeps_last_line_without_newline() {
        let (_, rows) = csv_table("a\n1\n2", b',', false);
        assert_eq!(rows, vec![vec![json!("1")], vec![json!("2")]]);
        let (_, rows) = csv_table("a\n1\n2", b',', true);
        assert_eq!(rows, vec![vec![json!("1")]]);
    }

    #[test]
    fn json_array_of_objects_becomes_columns() {
        let (columns, rows) = json_table(&json!([{"a": 1}, {"b": [2]}]));
        assert_eq!(columns, vec!["a", "b"]);
        assert_eq!(rows, vec![vec![json!(1), Value::Null], vec![Value::Null, json!("[2]")]]);
    }

    #[test]
    fn binary_detection() {
        assert!(as_text(b"plain\n", false).is_some());
        assert!(as_text(b"a\0b", false).is_none());
        assert!(as_text(&[0xff, 0xfe], false).is_none());
        // A multi-byte character cut by the preview limit is still text.
        assert_eq!(as_text("é".as_bytes()[..1].as_ref(), true), Some(""));
    }

    #[test]
    fn hex_dump_format() {
        assert_eq!(hex_dump(b"AB\0"), "00000000  41 42 00                                          |AB.|\n");
    }
}
