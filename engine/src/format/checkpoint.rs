//! Objects of a checkpoint, and the framing shared by every object the
//! engine stores (checkpoint roots, inode pages, directory chunks, version
//! and volume records).
//!
//! Every object starts with a 16-byte frame:
//!
//! | offset | size | field          | meaning                                |
//! |--------|------|----------------|----------------------------------------|
//! | 0      | 4    | magic          | `0x504B4843` (`"CHKP"` little-endian)  |
//! | 4      | 2    | format version | 2                                      |
//! | 6      | 2    | object type    | see [`ObjectType`]                     |
//! | 8      | 4    | payload length | bytes after the frame                  |
//! | 12     | 4    | payload CRC    | CRC32 of the payload                   |
//!
//! A checkpoint is a root object that lists inode pages by page number; a
//! page holds the records of up to [`INODES_PER_PAGE`] consecutive inode
//! numbers; a directory's entries live in content-addressed chunks whose
//! boundaries depend only on the names, so one changed entry rewrites one
//! chunk. A new checkpoint writes only the pages and chunks that changed and
//! refers to the parent's objects for the rest.

use std::collections::BTreeMap;

use crate::extent::{Extent, ExtentMap};
use crate::format::{DecodeError, Decoder, Encoder};
use crate::ids::{Ino, SegmentId};
use crate::tree::{Attr, FileKind, Timestamp};

pub const OBJECT_MAGIC: u32 = 0x504B_4843;
pub const OBJECT_FORMAT_VERSION: u16 = 2;
pub const FRAME_LEN: usize = 16;
/// Inode numbers per page: inode `n` lives in page `n / INODES_PER_PAGE`.
pub const INODES_PER_PAGE: u64 = 256;

/// Object types in the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ObjectType {
    CheckpointRoot = 1,
    InodePage = 2,
    DirChunk = 3,
    VersionRecord = 4,
    VolumeRecord = 5,
    TagRecord = 6,
    /// A session's lease: the versions it reads and the objects it is uploading.
    LeaseRecord = 7,
    /// A gc run's record of the lineage entries it removed.
    PrunedRecord = 8,
    /// Present while a gc run deletes objects.
    SweepMarker = 9,
}

/// Frames `payload` as an object of `object_type`.
pub fn frame(object_type: ObjectType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FRAME_LEN + payload.len());
    out.extend_from_slice(&OBJECT_MAGIC.to_le_bytes());
    out.extend_from_slice(&OBJECT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(object_type as u16).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Checks the frame of an object and returns its payload.
pub fn unframe(object_type: ObjectType, bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < FRAME_LEN {
        return Err(format!("object of {} bytes is shorter than its frame", bytes.len()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if u32_at(0) != OBJECT_MAGIC {
        return Err(format!("bad magic {:#010x}", u32_at(0)));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != OBJECT_FORMAT_VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let found_type = u16::from_le_bytes([bytes[6], bytes[7]]);
    if found_type != object_type as u16 {
        return Err(format!("object type {found_type}, expected {}", object_type as u16));
    }
    let len = u32_at(8) as usize;
    if bytes.len() != FRAME_LEN + len {
        return Err(format!("payload length {len} does not match the object size {}", bytes.len()));
    }
    let payload = &bytes[FRAME_LEN..];
    let computed = crc32fast::hash(payload);
    if computed != u32_at(12) {
        return Err(format!("payload CRC mismatch (stored {:#010x}, computed {computed:#010x})", u32_at(12)));
    }
    Ok(payload)
}

/// Root of one version's checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootCheckpoint {
    /// One past the highest inode number any version up to this one
    /// allocated. Informational: sessions allocate from random blocks.
    pub next_ino: u64,
    /// Regular files (inodes) in the tree.
    pub files: u64,
    /// Sum of the sizes of those files.
    pub bytes: u64,
    /// Object key of each inode page, by page number.
    pub pages: BTreeMap<u64, String>,
}

impl RootCheckpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u64(self.next_ino).u64(self.files).u64(self.bytes).u32(self.pages.len() as u32);
        for (page, key) in &self.pages {
            e.u64(*page).bytes(key.as_bytes());
        }
        frame(ObjectType::CheckpointRoot, &e.buf)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let payload = unframe(ObjectType::CheckpointRoot, bytes)?;
        let decode = || -> Result<Self, DecodeError> {
            let mut d = Decoder::new(payload);
            let next_ino = d.u64()?;
            let files = d.u64()?;
            let bytes = d.u64()?;
            let count = d.u32()?;
            let mut pages = BTreeMap::new();
            for _ in 0..count {
                let page = d.u64()?;
                let key = String::from_utf8(d.bytes()?.to_vec()).map_err(|_| d.error("page key is not UTF-8"))?;
                pages.insert(page, key);
            }
            d.finish()?;
            Ok(RootCheckpoint { next_ino, files, bytes, pages })
        };
        decode().map_err(|e| e.to_string())
    }
}

/// Reference from a directory record to one chunk of its entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub key: String,
    pub entries: u32,
}

/// Contents of an inode as stored in a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredContent {
    File(ExtentMap),
    Directory(Vec<ChunkRef>),
    Symlink(Vec<u8>),
    /// FIFO, socket or device node: no content beyond the attributes.
    Special,
}

/// One inode as stored in a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeRecord {
    pub attr: Attr,
    /// Directory entries that name this inode, as (parent, name); empty for the root.
    pub links: Vec<(Ino, Vec<u8>)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: StoredContent,
}

fn encode_time(e: &mut Encoder, t: Timestamp) {
    e.i64(t.secs).u32(t.nanos);
}

fn decode_time(d: &mut Decoder) -> Result<Timestamp, DecodeError> {
    let secs = d.i64()?;
    let nanos = d.u32()?;
    if nanos >= 1_000_000_000 {
        return Err(d.error(format!("nanoseconds {nanos} out of range")));
    }
    Ok(Timestamp { secs, nanos })
}

impl InodeRecord {
    fn encode(&self, e: &mut Encoder) {
        let a = &self.attr;
        e.u64(a.ino.0).u8(a.kind.code()).u16(a.perm).u32(a.uid).u32(a.gid).u64(a.size).u32(a.nlink).u32(a.rdev);
        encode_time(e, a.atime);
        encode_time(e, a.mtime);
        encode_time(e, a.ctime);
        e.u32(self.links.len() as u32);
        for (parent, name) in &self.links {
            e.u64(parent.0).bytes(name);
        }
        e.u32(self.xattrs.len() as u32);
        for (name, value) in &self.xattrs {
            e.bytes(name).bytes(value);
        }
        match &self.content {
            StoredContent::File(extents) => {
                e.u32(extents.len() as u32);
                for (offset, x) in extents.iter() {
                    e.u64(offset).u64(x.len).u128(x.segment.to_u128()).u64(x.data_offset).u64(x.record_offset).u32(x.record_len);
                }
            }
            StoredContent::Directory(chunks) => {
                e.u32(chunks.len() as u32);
                for chunk in chunks {
                    e.bytes(chunk.key.as_bytes()).u32(chunk.entries);
                }
            }
            StoredContent::Symlink(target) => {
                e.bytes(target);
            }
            StoredContent::Special => {}
        }
    }

    fn decode(d: &mut Decoder) -> Result<Self, DecodeError> {
        let ino = Ino(d.u64()?);
        let kind_code = d.u8()?;
        let kind = FileKind::from_code(kind_code).ok_or_else(|| d.error(format!("unknown inode kind {kind_code}")))?;
        let perm = d.u16()?;
        let uid = d.u32()?;
        let gid = d.u32()?;
        let size = d.u64()?;
        let nlink = d.u32()?;
        let rdev = d.u32()?;
        let atime = decode_time(d)?;
        let mtime = decode_time(d)?;
        let ctime = decode_time(d)?;
        let attr = Attr { ino, kind, perm, uid, gid, size, nlink, rdev, atime, mtime, ctime };
        let mut links = Vec::new();
        for _ in 0..d.u32()? {
            let parent = Ino(d.u64()?);
            links.push((parent, d.bytes()?.to_vec()));
        }
        let mut xattrs = BTreeMap::new();
        for _ in 0..d.u32()? {
            let name = d.bytes()?.to_vec();
            let value = d.bytes()?.to_vec();
            xattrs.insert(name, value);
        }
        let content = match kind {
            FileKind::File => {
                let mut extents = ExtentMap::new();
                for _ in 0..d.u32()? {
                    let offset = d.u64()?;
                    let len = d.u64()?;
                    let segment = SegmentId::from_u128(d.u128()?);
                    let data_offset = d.u64()?;
                    let record_offset = d.u64()?;
                    let record_len = d.u32()?;
                    if len == 0 || offset.checked_add(len).is_none() {
                        return Err(d.error(format!("invalid extent at file offset {offset} of length {len}")));
                    }
                    extents.insert(offset, Extent { len, segment, data_offset, record_offset, record_len });
                }
                StoredContent::File(extents)
            }
            FileKind::Directory => {
                let mut chunks = Vec::new();
                for _ in 0..d.u32()? {
                    let key = String::from_utf8(d.bytes()?.to_vec()).map_err(|_| d.error("chunk key is not UTF-8"))?;
                    chunks.push(ChunkRef { key, entries: d.u32()? });
                }
                StoredContent::Directory(chunks)
            }
            FileKind::Symlink => StoredContent::Symlink(d.bytes()?.to_vec()),
            FileKind::Fifo | FileKind::Socket | FileKind::CharDevice | FileKind::BlockDevice => StoredContent::Special,
        };
        Ok(InodeRecord { attr, links, xattrs, content })
    }
}

/// Encodes an inode page from its records, in inode order.
pub fn encode_page(records: &BTreeMap<Ino, InodeRecord>) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(records.len() as u32);
    for record in records.values() {
        record.encode(&mut e);
    }
    frame(ObjectType::InodePage, &e.buf)
}

pub fn decode_page(bytes: &[u8]) -> Result<BTreeMap<Ino, InodeRecord>, String> {
    let payload = unframe(ObjectType::InodePage, bytes)?;
    let decode = || -> Result<BTreeMap<Ino, InodeRecord>, DecodeError> {
        let mut d = Decoder::new(payload);
        let mut records = BTreeMap::new();
        for _ in 0..d.u32()? {
            let record = InodeRecord::decode(&mut d)?;
            records.insert(record.attr.ino, record);
        }
        d.finish()?;
        Ok(records)
    };
    decode().map_err(|e| e.to_string())
}

/// One directory entry as stored in a chunk.
pub type StoredEntry = (Vec<u8>, Ino, FileKind);

pub fn encode_chunk(entries: &[StoredEntry]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u32(entries.len() as u32);
    for (name, ino, kind) in entries {
        e.bytes(name).u64(ino.0).u8(kind.code());
    }
    frame(ObjectType::DirChunk, &e.buf)
}

pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<StoredEntry>, String> {
    let payload = unframe(ObjectType::DirChunk, bytes)?;
    let decode = || -> Result<Vec<StoredEntry>, DecodeError> {
        let mut d = Decoder::new(payload);
        let mut entries = Vec::new();
        for _ in 0..d.u32()? {
            let name = d.bytes()?.to_vec();
            let ino = Ino(d.u64()?);
            let code = d.u8()?;
            let kind = FileKind::from_code(code).ok_or_else(|| d.error(format!("unknown entry kind {code}")))?;
            entries.push((name, ino, kind));
        }
        d.finish()?;
        Ok(entries)
    };
    decode().map_err(|e| e.to_string())
}

/// Entries after which a chunk ends when no name-defined boundary came earlier.
pub const CHUNK_MAX_ENTRIES: usize = 1024;

/// Splits sorted entries into chunks. A chunk ends after a name whose CRC32
/// is 0 modulo 128 (about 128 entries per chunk on average), or after
/// [`CHUNK_MAX_ENTRIES`], so an insertion or removal changes only the chunk
/// it falls into.
pub fn split_chunks(entries: &[StoredEntry]) -> Vec<&[StoredEntry]> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, (name, _, _)) in entries.iter().enumerate() {
        if crc32fast::hash(name) % 128 == 0 || i + 1 - start >= CHUNK_MAX_ENTRIES {
            out.push(&entries[start..=i]);
            start = i + 1;
        }
    }
    if start < entries.len() {
        out.push(&entries[start..]);
    }
    out
}

/// Content address of an encoded chunk.
pub fn chunk_hash(encoded: &[u8]) -> String {
    blake3::hash(encoded).to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ino: u64, kind: FileKind) -> Attr {
        Attr {
            ino: Ino(ino),
            kind,
            perm: 0o644,
            uid: 1,
            gid: 2,
            size: 5 << 32,
            nlink: 1,
            rdev: 0,
            atime: Timestamp { secs: 1, nanos: 2 },
            mtime: Timestamp { secs: -3, nanos: 999_999_999 },
            ctime: Timestamp { secs: 5, nanos: 0 },
        }
    }

    #[test]
    fn page_round_trips() {
        let mut extents = ExtentMap::new();
        let segment = SegmentId::generate();
        extents.insert(1 << 33, Extent { len: 10, segment, data_offset: 64, record_offset: 24, record_len: 80 });
        let mut records = BTreeMap::new();
        let mut xattrs = BTreeMap::new();
        xattrs.insert(b"user.a".to_vec(), vec![1, 2]);
        records.insert(Ino(3), InodeRecord { attr: attr(3, FileKind::File), links: vec![(Ino(4), b"a".to_vec())], xattrs, content: StoredContent::File(extents) });
        records.insert(
            Ino(4),
            InodeRecord {
                attr: attr(4, FileKind::Directory),
                links: vec![(Ino(1), b"d".to_vec())],
                xattrs: BTreeMap::new(),
                content: StoredContent::Directory(vec![ChunkRef { key: "k".into(), entries: 3 }]),
            },
        );
        records.insert(
            Ino(5),
            InodeRecord { attr: attr(5, FileKind::Symlink), links: Vec::new(), xattrs: BTreeMap::new(), content: StoredContent::Symlink(b"t".to_vec()) },
        );
        let encoded = encode_page(&records);
        assert_eq!(decode_page(&encoded).unwrap(), records);
        let mut bad = encoded.clone();
        bad[FRAME_LEN + 3] ^= 1;
        assert!(decode_page(&bad).unwrap_err().contains("CRC"));
    }

    #[test]
    fn one_insert_changes_one_chunk() {
        let entries: Vec<StoredEntry> =
            (0..5000).map(|i| (format!("file-{i:05}").into_bytes(), Ino(i + 2), FileKind::File)).collect();
        let before: Vec<String> = split_chunks(&entries).iter().map(|c| chunk_hash(&encode_chunk(c))).collect();
        let mut changed = entries.clone();
        changed.insert(2500, (b"file-02499a".to_vec(), Ino(99999), FileKind::File));
        let after: Vec<String> = split_chunks(&changed).iter().map(|c| chunk_hash(&encode_chunk(c))).collect();
        let new_chunks = after.iter().filter(|h| !before.contains(h)).count();
        assert!(before.len() > 10, "only {} chunks", before.len());
        assert!(new_chunks <= 2, "{new_chunks} chunks changed");
    }
}
