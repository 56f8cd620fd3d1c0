//! Segment records.
//!
//! A segment is a sequence of records packed back to back, starting at offset
//! 0. Each record is a 24-byte header followed by its payload:
//!
//! | offset | size | field          | meaning                                          |
//! |--------|------|----------------|--------------------------------------------------|
//! | 0      | 4    | magic          | `0x4B4C4843` (`"CHLK"` in little-endian)         |
//! | 4      | 2    | format version | 1                                                |
//! | 6      | 2    | record type    | see [`RecordType`]                               |
//! | 8      | 4    | payload length | bytes after the header                           |
//! | 12     | 4    | record CRC     | CRC32 of bytes 0..12 followed by the payload     |
//! | 16     | 4    | header CRC     | CRC32 of bytes 0..16                             |
//! | 20     | 4    | reserved       | 0; a reader rejects any other value              |
//!
//! The header CRC lets a reader trust the payload length before it reads the
//! payload; the record CRC then covers header and payload together. A header
//! of zero bytes marks the end of the written part of a segment that is still
//! open: the log is zero-padded to the next 4 KiB block.

use crate::format::{Decoder, Encoder};
use crate::ids::{Ino, SegmentId, SessionId};

pub const MAGIC: u32 = 0x4B4C_4843;
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 24;
/// Largest payload a reader accepts; anything larger is treated as corrupt.
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;
/// Bytes of a data record's payload before the file data (inode, file offset).
pub const DATA_PREFIX_LEN: usize = 16;

/// Record types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordType {
    /// First record of every segment: which segment, session and volume it belongs to.
    SegmentHeader = 1,
    /// File data: inode, file offset, bytes.
    Data = 2,
    /// One namespace operation (create, mkdir, unlink, rename, ...).
    Meta = 3,
    /// Last record of a sealed segment.
    Seal = 4,
}

impl RecordType {
    pub fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(RecordType::SegmentHeader),
            2 => Some(RecordType::Data),
            3 => Some(RecordType::Meta),
            4 => Some(RecordType::Seal),
            _ => None,
        }
    }
}

/// Encodes the header of a record whose payload is the concatenation of `payload_parts`.
pub fn encode_header(record_type: RecordType, payload_parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let payload_len: usize = payload_parts.iter().map(|p| p.len()).sum();
    assert!(payload_len <= MAX_PAYLOAD_LEN, "record payload of {payload_len} bytes exceeds the maximum");
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[6..8].copy_from_slice(&(record_type as u16).to_le_bytes());
    header[8..12].copy_from_slice(&(payload_len as u32).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..12]);
    for part in payload_parts {
        hasher.update(part);
    }
    header[12..16].copy_from_slice(&hasher.finalize().to_le_bytes());
    let header_crc = crc32fast::hash(&header[0..16]);
    header[16..20].copy_from_slice(&header_crc.to_le_bytes());
    header
}

/// Encodes one record (header and payload) onto `out`.
pub fn encode_record(out: &mut Vec<u8>, record_type: RecordType, payload_parts: &[&[u8]]) {
    out.extend_from_slice(&encode_header(record_type, payload_parts));
    for part in payload_parts {
        out.extend_from_slice(part);
    }
}

/// Size of a record with a payload of `payload_len` bytes.
pub fn record_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len
}

/// A record found by [`parse_record`], by position inside the parsed buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRecord {
    pub record_type: RecordType,
    pub offset: usize,
    pub payload_offset: usize,
    pub payload_len: usize,
}

impl RawRecord {
    pub fn end(&self) -> usize {
        self.payload_offset + self.payload_len
    }
}

/// What [`parse_record`] found at an offset.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Record(RawRecord),
    /// Zero bytes, or fewer bytes than a header: the end of the written log.
    End,
    /// Bytes that are not a valid record: a torn write or corruption.
    Invalid(String),
}

/// Parses the record at `offset` of `buf`. The payload length is used only
/// after the header CRC matched, and the payload only after the record CRC
/// matched.
pub fn parse_record(buf: &[u8], offset: usize) -> Parsed {
    if buf.len() < offset + HEADER_LEN {
        return Parsed::End;
    }
    let header: &[u8; HEADER_LEN] = buf[offset..offset + HEADER_LEN].try_into().expect("header length");
    if header.iter().all(|&b| b == 0) {
        return Parsed::End;
    }
    let (record_type, payload_len) = match check_header(header) {
        Ok(found) => found,
        Err(detail) => return Parsed::Invalid(detail),
    };
    let payload_offset = offset + HEADER_LEN;
    if buf.len() < payload_offset + payload_len {
        return Parsed::Invalid(format!("payload of {payload_len} bytes runs past the end of the segment"));
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..12]);
    hasher.update(&buf[payload_offset..payload_offset + payload_len]);
    let computed = hasher.finalize();
    let stored = header_u32(header, 12);
    if stored != computed {
        return Parsed::Invalid(format!("record CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    Parsed::Record(RawRecord { record_type, offset, payload_offset, payload_len })
}

fn header_u32(header: &[u8; HEADER_LEN], at: usize) -> u32 {
    u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks every header field that the header CRC covers and returns the
/// record type and payload length. The payload is not looked at.
fn check_header(header: &[u8; HEADER_LEN]) -> Result<(RecordType, usize), String> {
    let magic = header_u32(header, 0);
    if magic != MAGIC {
        return Err(format!("bad magic {magic:#010x}"));
    }
    let header_crc = header_u32(header, 16);
    let computed = crc32fast::hash(&header[0..16]);
    if header_crc != computed {
        return Err(format!("header CRC mismatch (stored {header_crc:#010x}, computed {computed:#010x})"));
    }
    if header_u32(header, 20) != 0 {
        return Err("reserved header bytes are not zero".to_owned());
    }
    let version = u16::from_le_bytes([header[4], header[5]]);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported format version {version}"));
    }
    let type_code = u16::from_le_bytes([header[6], header[7]]);
    let Some(record_type) = RecordType::from_u16(type_code) else {
        return Err(format!("unknown record type {type_code}"));
    };
    let payload_len = header_u32(header, 8) as usize;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(format!("payload length {payload_len} exceeds the maximum"));
    }
    Ok((record_type, payload_len))
}

/// Verifies the record CRC of one record whose bytes are `record`, as found
/// through an extent. Returns a description of the mismatch.
pub fn verify_record(record: &[u8]) -> Result<(), String> {
    verify_record_parts(&[record])
}

/// Like [`verify_record`], for a record whose bytes are the concatenation
/// of `parts`, as when it spans several cached blocks. Hashes the parts in
/// place rather than joining them.
pub fn verify_record_parts(parts: &[&[u8]]) -> Result<(), String> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    for part in parts {
        if filled == HEADER_LEN {
            break;
        }
        let take = part.len().min(HEADER_LEN - filled);
        header[filled..filled + take].copy_from_slice(&part[..take]);
        filled += take;
    }
    if filled < HEADER_LEN || header.iter().all(|&b| b == 0) {
        return Err("zero bytes where a record was expected".to_owned());
    }
    let (_, payload_len) = check_header(&header)?;
    if HEADER_LEN + payload_len != total {
        return Err(format!("record length {} does not match the extent's {total}", HEADER_LEN + payload_len));
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..12]);
    let mut skip = HEADER_LEN;
    for part in parts {
        let from = skip.min(part.len());
        skip -= from;
        hasher.update(&part[from..]);
    }
    let computed = hasher.finalize();
    let stored = header_u32(&header, 12);
    if stored != computed {
        return Err(format!("record CRC mismatch (stored {stored:#010x}, computed {computed:#010x})"));
    }
    Ok(())
}

/// Payload of the first record of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment: SegmentId,
    pub session: SessionId,
    pub volume: String,
}

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.u128(self.segment.to_u128()).u128(self.session.to_u128()).bytes(self.volume.as_bytes());
        e.buf
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::format::DecodeError> {
        let mut d = Decoder::new(payload);
        let segment = SegmentId::from_u128(d.u128()?);
        let session = SessionId::from_u128(d.u128()?);
        let volume = String::from_utf8_lossy(d.bytes()?).into_owned();
        d.finish()?;
        Ok(SegmentHeader { segment, session, volume })
    }
}

/// Payload of a seal record: how many records precede it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seal {
    pub records_before: u64,
}

impl Seal {
    pub fn encode(&self) -> Vec<u8> {
        self.records_before.to_le_bytes().to_vec()
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::format::DecodeError> {
        let mut d = Decoder::new(payload);
        let records_before = d.u64()?;
        d.finish()?;
        Ok(Seal { records_before })
    }
}

/// Prefix of a data record's payload: which inode and file offset the bytes belong to.
pub fn encode_data_prefix(ino: Ino, file_offset: u64) -> [u8; DATA_PREFIX_LEN] {
    let mut prefix = [0u8; DATA_PREFIX_LEN];
    prefix[0..8].copy_from_slice(&ino.0.to_le_bytes());
    prefix[8..16].copy_from_slice(&file_offset.to_le_bytes());
    prefix
}

/// A namespace operation as logged in a metadata record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaOp {
    Create { parent: Ino, name: Vec<u8>, ino: Ino, mode: u32 },
    Mkdir { parent: Ino, name: Vec<u8>, ino: Ino, mode: u32 },
    Unlink { parent: Ino, name: Vec<u8> },
    Rmdir { parent: Ino, name: Vec<u8> },
    Rename { parent: Ino, name: Vec<u8>, new_parent: Ino, new_name: Vec<u8>, mode: u8 },
    SetAttr { ino: Ino, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>, size: Option<u64> },
    Symlink { parent: Ino, name: Vec<u8>, ino: Ino, target: Vec<u8> },
    Link { ino: Ino, new_parent: Ino, new_name: Vec<u8> },
    SetXattr { ino: Ino, name: Vec<u8>, value: Vec<u8> },
    RemoveXattr { ino: Ino, name: Vec<u8> },
    /// A FIFO, socket or device node; `kind` is the inode kind code of the checkpoint format.
    Mknod { parent: Ino, name: Vec<u8>, ino: Ino, mode: u32, kind: u8, rdev: u32 },
}

fn opt_u32(e: &mut Encoder, v: Option<u32>) {
    match v {
        Some(v) => e.u8(1).u32(v),
        None => e.u8(0),
    };
}

fn read_opt_u32(d: &mut Decoder) -> Result<Option<u32>, crate::format::DecodeError> {
    Ok(if d.u8()? == 1 { Some(d.u32()?) } else { None })
}

impl MetaOp {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        match self {
            MetaOp::Create { parent, name, ino, mode } => {
                e.u8(1).u64(parent.0).bytes(name).u64(ino.0).u32(*mode);
            }
            MetaOp::Mkdir { parent, name, ino, mode } => {
                e.u8(2).u64(parent.0).bytes(name).u64(ino.0).u32(*mode);
            }
            MetaOp::Unlink { parent, name } => {
                e.u8(3).u64(parent.0).bytes(name);
            }
            MetaOp::Rmdir { parent, name } => {
                e.u8(4).u64(parent.0).bytes(name);
            }
            MetaOp::Rename { parent, name, new_parent, new_name, mode } => {
                e.u8(5).u64(parent.0).bytes(name).u64(new_parent.0).bytes(new_name).u8(*mode);
            }
            MetaOp::SetAttr { ino, mode, uid, gid, size } => {
                e.u8(6).u64(ino.0);
                opt_u32(&mut e, *mode);
                opt_u32(&mut e, *uid);
                opt_u32(&mut e, *gid);
                match size {
                    Some(size) => e.u8(1).u64(*size),
                    None => e.u8(0),
                };
            }
            MetaOp::Symlink { parent, name, ino, target } => {
                e.u8(7).u64(parent.0).bytes(name).u64(ino.0).bytes(target);
            }
            MetaOp::Link { ino, new_parent, new_name } => {
                e.u8(8).u64(ino.0).u64(new_parent.0).bytes(new_name);
            }
            MetaOp::SetXattr { ino, name, value } => {
                e.u8(9).u64(ino.0).bytes(name).bytes(value);
            }
            MetaOp::RemoveXattr { ino, name } => {
                e.u8(10).u64(ino.0).bytes(name);
            }
            MetaOp::Mknod { parent, name, ino, mode, kind, rdev } => {
                e.u8(11).u64(parent.0).bytes(name).u64(ino.0).u32(*mode).u8(*kind).u32(*rdev);
            }
        }
        e.buf
    }

    pub fn decode(payload: &[u8]) -> Result<Self, crate::format::DecodeError> {
        let mut d = Decoder::new(payload);
        let ino = |d: &mut Decoder| d.u64().map(Ino);
        let op = match d.u8()? {
            1 => MetaOp::Create { parent: ino(&mut d)?, name: d.bytes()?.to_vec(), ino: ino(&mut d)?, mode: d.u32()? },
            2 => MetaOp::Mkdir { parent: ino(&mut d)?, name: d.bytes()?.to_vec(), ino: ino(&mut d)?, mode: d.u32()? },
            3 => MetaOp::Unlink { parent: ino(&mut d)?, name: d.bytes()?.to_vec() },
            4 => MetaOp::Rmdir { parent: ino(&mut d)?, name: d.bytes()?.to_vec() },
            5 => MetaOp::Rename {
                parent: ino(&mut d)?,
                name: d.bytes()?.to_vec(),
                new_parent: ino(&mut d)?,
                new_name: d.bytes()?.to_vec(),
                mode: d.u8()?,
            },
            6 => MetaOp::SetAttr {
                ino: ino(&mut d)?,
                mode: read_opt_u32(&mut d)?,
                uid: read_opt_u32(&mut d)?,
                gid: read_opt_u32(&mut d)?,
                size: if d.u8()? == 1 { Some(d.u64()?) } else { None },
            },
            7 => MetaOp::Symlink {
                parent: ino(&mut d)?,
                name: d.bytes()?.to_vec(),
                ino: ino(&mut d)?,
                target: d.bytes()?.to_vec(),
            },
            8 => MetaOp::Link { ino: ino(&mut d)?, new_parent: ino(&mut d)?, new_name: d.bytes()?.to_vec() },
            9 => MetaOp::SetXattr { ino: ino(&mut d)?, name: d.bytes()?.to_vec(), value: d.bytes()?.to_vec() },
            10 => MetaOp::RemoveXattr { ino: ino(&mut d)?, name: d.bytes()?.to_vec() },
            11 => MetaOp::Mknod {
                parent: ino(&mut d)?,
                name: d.bytes()?.to_vec(),
                ino: ino(&mut d)?,
                mode: d.u32()?,
                kind: d.u8()?,
                rdev: d.u32()?,
            },
            other => return Err(d.error(format!("unknown metadata operation {other}"))),
        };
        d.finish()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_record(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_record(&mut out, RecordType::Data, &[&encode_data_prefix(Ino(7), 4096), payload]);
        out
    }

    #[test]
    fn split_record_verifies_at_any_cut() {
        let payload: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let record = data_record(&payload);
        for cut in [0, 1, 5, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 1, 200, record.len() - 1, record.len()] {
            let (a, b) = record.split_at(cut);
            assert_eq!(verify_record_parts(&[a, b]), Ok(()), "cut at {cut}");
            let (b1, b2) = b.split_at(b.len() / 2);
            assert_eq!(verify_record_parts(&[a, b1, b2]), Ok(()), "cuts at {cut} and after");
        }

        let mut flipped = record.clone();
        flipped[HEADER_LEN + 150] ^= 0x10;
        let (a, b) = flipped.split_at(HEADER_LEN + 100);
        let error = verify_record_parts(&[a, b]).unwrap_err();
        assert!(error.contains("record CRC mismatch"), "{error}");

        let (a, _) = record.split_at(record.len() - 1);
        let error = verify_record_parts(&[&a[..10], &a[10..]]).unwrap_err();
        assert!(error.contains("does not match the extent"), "{error}");

        let zeros = [0u8; 64];
        let error = verify_record_parts(&[&zeros[..10], &zeros[10..]]).unwrap_err();
        assert!(error.contains("zero bytes"), "{error}");
    }

    #[test]
    fn record_round_trips() {
        let buf = data_record(b"hello");
        let Parsed::Record(raw) = parse_record(&buf, 0) else { panic!("record not parsed") };
        assert_eq!(raw.record_type, RecordType::Data);
        assert_eq!(raw.payload_len, DATA_PREFIX_LEN + 5);
        assert_eq!(&buf[raw.payload_offset + DATA_PREFIX_LEN..raw.end()], b"hello");
        assert_eq!(raw.end(), buf.len());
    }

    #[test]
    fn every_flipped_byte_is_rejected() {
        let buf = data_record(b"payload bytes");
        for at in 0..buf.len() {
            let mut bad = buf.clone();
            bad[at] ^= 0x40;
            assert!(
                !matches!(parse_record(&bad, 0), Parsed::Record(_)),
                "flipping byte {at} was not detected"
            );
        }
    }

    #[test]
    fn truncated_record_is_invalid() {
        let buf = data_record(b"0123456789");
        for cut in HEADER_LEN..buf.len() {
            assert!(matches!(parse_record(&buf[..cut], 0), Parsed::Invalid(_)), "cut at {cut} accepted");
        }
        assert_eq!(parse_record(&buf[..HEADER_LEN - 1], 0), Parsed::End);
    }

    #[test]
    fn huge_length_is_not_trusted() {
        let mut buf = data_record(b"x");
        buf[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        match parse_record(&buf, 0) {
            Parsed::Invalid(detail) => assert!(detail.contains("header CRC"), "{detail}"),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn zero_header_is_end() {
        assert_eq!(parse_record(&[0u8; 64], 0), Parsed::End);
    }

    #[test]
    fn meta_ops_round_trip() {
        let ops = vec![
            MetaOp::Create { parent: Ino(1), name: b"a".to_vec(), ino: Ino(2), mode: 0o644 },
            MetaOp::Mkdir { parent: Ino(1), name: b"d".to_vec(), ino: Ino(3), mode: 0o755 },
            MetaOp::Unlink { parent: Ino(1), name: b"a".to_vec() },
            MetaOp::Rmdir { parent: Ino(1), name: b"d".to_vec() },
            MetaOp::Rename { parent: Ino(1), name: b"a".to_vec(), new_parent: Ino(3), new_name: b"b".to_vec(), mode: 2 },
            MetaOp::SetAttr { ino: Ino(2), mode: Some(0o600), uid: None, gid: Some(5), size: Some(1 << 33) },
            MetaOp::Symlink { parent: Ino(1), name: b"l".to_vec(), ino: Ino(4), target: b"../x".to_vec() },
            MetaOp::Link { ino: Ino(2), new_parent: Ino(1), new_name: b"h".to_vec() },
            MetaOp::SetXattr { ino: Ino(2), name: b"user.k".to_vec(), value: vec![0, 1, 2] },
            MetaOp::RemoveXattr { ino: Ino(2), name: b"user.k".to_vec() },
            MetaOp::Mknod { parent: Ino(1), name: b"p".to_vec(), ino: Ino(9), mode: 0o600, kind: 4, rdev: 0x0801 },
        ];
        for op in ops {
            assert_eq!(MetaOp::decode(&op.encode()).unwrap(), op);
        }
    }
}
