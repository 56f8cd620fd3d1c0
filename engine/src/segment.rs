//! Segments: the append-only log files that hold every record a session
//! writes, and the readers that validate them.
//!
//! Write order inside a session:
//! 1. Records are encoded into an aligned in-memory chunk. A record that
//!    does not fit the rest of the chunk continues in the next one, so every
//!    byte is copied once and every chunk is written whole.
//! 2. A full chunk is submitted to the disk writer, which reuses the buffers
//!    of completed writes for the next chunks. `flush` leaves the partial
//!    last block in memory, to be rewritten later.
//! 3. `flush` writes the partial block zero-padded and waits, so every
//!    record so far is on disk; `fsync` adds `fdatasync`.
//! 4. `seal` appends a seal record, flushes, truncates the file's
//!    preallocated space past the last block and syncs. A sealed segment
//!    never changes again.
//!
//! Invariants:
//! - Records are contiguous from offset 0; the first is a segment header.
//! - Two writes to the same block are never in flight together: only whole
//!   blocks are submitted without waiting, and a padded partial block is
//!   written only after every earlier write completed.
//! - A reader never trusts a length before its header CRC matched, and never
//!   returns bytes of a sealed segment before the record CRC matched.
//! - After a failed write or fsync the file may not hold every record
//!   appended, so the open segment rejects every read, flush and seal until
//!   a repair succeeds (see [`OpenSegment::repair`]). A repair that finds a
//!   record lost leaves the segment unusable for good, so its records are
//!   never published.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use memmap2::Mmap;
use parking_lot::RwLock;

use crate::error::{EngineError, Result};
use crate::format::record::{
    self, encode_header, parse_record, Parsed, RawRecord, RecordType, Seal, SegmentHeader, HEADER_LEN,
};
use crate::ids::SegmentId;
use crate::io::{AlignedBuf, DiskWriter, BLOCK_SIZE};

/// Size of the in-memory chunk that collects records before they are
/// submitted, and so of each write of the segment log. It is a multiple of
/// [`BLOCK_SIZE`].
const CHUNK_BYTES: usize = 1 << 20;

/// Size that the first full chunk preallocates: a session's 64 MiB segment
/// plus one record of at most 4 MiB, so the writes of a whole segment land
/// inside the file's size. On ext4 a direct write that extends the file is
/// not queued asynchronously: fio 3.33 with `--fallocate=none` wrote 1 GiB
/// at about half the speed of its default preallocation (2-core VM, ext4 on
/// virtio). Each later preallocation doubles the size.
const PREALLOCATE_BYTES: u64 = 68 << 20;

/// File name of a segment inside a session or cache directory.
pub fn file_name(id: SegmentId) -> String {
    format!("{id}.seg")
}

static BUFFERED_LOGGED: AtomicBool = AtomicBool::new(false);

/// Opens `path` for direct writes, falling back to buffered writes on file
/// systems without `O_DIRECT` (tmpfs, for one).
fn open_for_append(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.create_new(true).write(true).read(true);
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(file),
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            if !BUFFERED_LOGGED.swap(true, Ordering::Relaxed) {
                tracing::warn!(path = %path.display(), "file system rejects O_DIRECT, so segments are written through the page cache");
            }
            let _ = std::fs::remove_file(path);
            options.open(path)
        }
        Err(err) => Err(err),
    }
}

/// Where a record landed in its segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub segment: SegmentId,
    pub record_offset: u64,
    pub record_len: u32,
}

/// A segment that a session is still appending to.
pub struct OpenSegment {
    pub id: SegmentId,
    pub path: PathBuf,
    file: File,
    read_file: File,
    /// Bytes from `chunk_offset` on that are not yet on disk in full blocks.
    chunk: AlignedBuf,
    chunk_offset: u64,
    records: u64,
    /// The first write or fsync error since the last repair.
    failure: Option<Failure>,
    /// End of the seal record once `seal` appended it, so that a seal
    /// retried after a failed fsync does not append a second one.
    seal_end: Option<u64>,
    /// File size set by `fallocate`, past the end of the log; 0 before the
    /// first preallocation. `seal` truncates the file back to the log.
    allocated: u64,
    /// False once `fallocate` failed, for instance on a file system without it.
    preallocate: bool,
}

/// The cause of an open segment's pending repair.
#[derive(Clone, Debug)]
struct Failure {
    cause: String,
    /// An fsync failed, so bytes the kernel had accepted may not be on the
    /// device: the repair writes them again.
    fsync_failed: bool,
    /// A repair found records missing from the file; no repair can help.
    records_lost: bool,
}

impl OpenSegment {
    /// Creates the segment file and writes its header record.
    pub fn create(dir: &Path, header: &SegmentHeader) -> Result<Self> {
        let path = dir.join(file_name(header.segment));
        let file = open_for_append(&path).map_err(|e| EngineError::io("creating segment", &path, e))?;
        let read_file = File::open(&path).map_err(|e| EngineError::io("opening segment", &path, e))?;
        let mut segment = OpenSegment {
            id: header.segment,
            path,
            file,
            read_file,
            chunk: AlignedBuf::with_capacity(CHUNK_BYTES),
            chunk_offset: 0,
            records: 0,
            failure: None,
            seal_end: None,
            allocated: 0,
            preallocate: true,
        };
        let payload = header.encode();
        segment.push_record(None, RecordType::SegmentHeader, &[&payload])?;
        Ok(segment)
    }

    /// Offset where the next record goes.
    pub fn end(&self) -> u64 {
        self.chunk_offset + self.chunk.len() as u64
    }

    /// Appends one record. With a writer, each chunk is submitted once it is
    /// full.
    ///
    /// A failed write of a full chunk does not stop the append: the record
    /// is still appended whole, so the log stays a sequence of whole
    /// records, and the writer keeps the failed chunk for the repair. The
    /// first such error is returned and the segment needs a repair.
    pub fn push_record(
        &mut self,
        mut writer: Option<&mut DiskWriter>,
        record_type: RecordType,
        parts: &[&[u8]],
    ) -> Result<Appended> {
        if let Some(failure) = &self.failure {
            if failure.records_lost {
                return Err(self.unusable_error(failure));
            }
        }
        let header = encode_header(record_type, parts);
        let len = HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
        let record_offset = self.end();
        let mut first_error = None;
        for part in std::iter::once(&header[..]).chain(parts.iter().copied()) {
            if let Err(err) = self.append_bytes(writer.as_deref_mut(), part) {
                first_error.get_or_insert(err);
            }
        }
        self.records += 1;
        match first_error {
            Some(err) => Err(err),
            None => Ok(Appended { segment: self.id, record_offset, record_len: len as u32 }),
        }
    }

    /// Copies `bytes` to the end of the log, submitting each chunk that fills
    /// up. Every byte is appended even when a submit fails, and the first
    /// error is returned.
    fn append_bytes(&mut self, mut writer: Option<&mut DiskWriter>, mut bytes: &[u8]) -> Result<()> {
        let mut first_error = None;
        while !bytes.is_empty() {
            if self.chunk.len() == self.chunk.capacity() {
                if let Err(err) = self.submit_chunk(writer.as_deref_mut()) {
                    first_error.get_or_insert(err);
                }
            }
            let n = bytes.len().min(self.chunk.capacity() - self.chunk.len());
            self.chunk.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Submits the full chunk and starts the next one.
    fn submit_chunk(&mut self, writer: Option<&mut DiskWriter>) -> Result<()> {
        let full = self.chunk.len();
        debug_assert_eq!(full % BLOCK_SIZE, 0, "a full chunk is whole blocks");
        let offset = self.chunk_offset;
        self.chunk_offset += full as u64;
        if self.chunk_offset > self.allocated {
            self.preallocate(self.chunk_offset);
        }
        let written = match writer {
            Some(writer) => {
                let next = writer.buffer(CHUNK_BYTES);
                let done = std::mem::replace(&mut self.chunk, next);
                writer.submit(&self.file, done, offset)
            }
            None => {
                let mut done = std::mem::replace(&mut self.chunk, AlignedBuf::with_capacity(CHUNK_BYTES));
                self.file.write_all_at(done.padded(), offset)
            }
        };
        written.map_err(|e| self.record_failure("writing segment", e))
    }

    /// Extends the file with `fallocate` to at least `needed` bytes, so that
    /// later writes do not extend it. A failure only ends preallocation.
    fn preallocate(&mut self, needed: u64) {
        if !self.preallocate {
            return;
        }
        let target = needed.max(PREALLOCATE_BYTES).max(self.allocated.saturating_mul(2));
        let start = self.allocated;
        // SAFETY: fallocate on a valid descriptor owned by `self.file`; mode 0 only allocates and extends.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), 0, start as libc::off_t, (target - start) as libc::off_t) };
        if rc == 0 {
            self.allocated = target;
        } else {
            let err = std::io::Error::last_os_error();
            tracing::debug!(segment = %self.id, path = %self.path.display(), error = %err, "fallocate failed, so the segment grows write by write");
            self.preallocate = false;
        }
    }

    /// Truncates a preallocated file to the log's last block.
    fn trim_preallocation(&mut self) -> Result<()> {
        let end = self.end().next_multiple_of(BLOCK_SIZE as u64);
        if self.allocated > end {
            self.file.set_len(end).map_err(|e| EngineError::io("truncating preallocated segment", &self.path, e))?;
            self.allocated = end;
        }
        Ok(())
    }

    /// Writes every record so far to the file (not yet synced).
    pub fn flush(&mut self, writer: &mut DiskWriter) -> Result<()> {
        self.repair(writer)?;
        writer.wait_all().map_err(|e| self.record_failure("writing segment", e))?;
        if self.chunk.is_empty() {
            return Ok(());
        }
        writer
            .write_now(&self.file, &mut self.chunk, self.chunk_offset)
            .map_err(|e| self.record_failure("writing segment", e))?;
        let full = self.chunk.len() / BLOCK_SIZE * BLOCK_SIZE;
        self.chunk.keep_tail(full);
        self.chunk_offset += full as u64;
        Ok(())
    }

    /// Flushes and makes the records durable on the local disk.
    pub fn fsync(&mut self, writer: &mut DiskWriter) -> Result<()> {
        self.flush(writer)?;
        writer.sync_data(&self.file).map_err(|e| {
            let err = self.record_failure("syncing segment", e);
            if let Some(failure) = self.failure.as_mut() {
                failure.fsync_failed = true;
            }
            err
        })
    }

    /// Appends the seal record and makes the segment durable. Returns its
    /// path and length in bytes. On failure the segment stays open and
    /// unusable, so the caller keeps it and cannot publish without it.
    pub fn seal(&mut self, writer: &mut DiskWriter) -> Result<(PathBuf, u64)> {
        let len = match self.seal_end {
            Some(len) => len,
            None => {
                let seal = Seal { records_before: self.records };
                self.push_record(Some(writer), RecordType::Seal, &[&seal.encode()])?;
                self.seal_end = Some(self.end());
                self.end()
            }
        };
        self.flush(writer)?;
        self.trim_preallocation()?;
        self.fsync(writer)?;
        Ok((self.path.clone(), len))
    }

    fn unusable_error(&self, failure: &Failure) -> EngineError {
        EngineError::Io {
            context: "using segment",
            path: self.path.clone(),
            source: std::io::Error::other(format!(
                "records were lost after a failed write ({}), so the session's unsynced changes cannot be published; \
                 end the session (unmount), free the cause and write them again",
                failure.cause
            )),
        }
    }

    /// Remembers the first write or fsync failure since the last repair and wraps it.
    fn record_failure(&mut self, context: &'static str, err: std::io::Error) -> EngineError {
        if self.failure.is_none() {
            self.failure = Some(Failure { cause: err.to_string(), fsync_failed: false, records_lost: false });
        }
        tracing::error!(segment = %self.id, path = %self.path.display(), error = %err, "segment write failed; the next flush or sync repairs the segment");
        EngineError::io(context, &self.path, err)
    }

    /// Brings the file back to holding every record appended, after a
    /// failed write or fsync:
    /// 1. the writer writes its failed buffers again (a full disk fails here
    ///    with `ENOSPC` until space is freed, and the segment stays failed);
    /// 2. the bytes on disk, followed by the unwritten chunk, are read back
    ///    and must scan as valid records up to [`end`](Self::end);
    /// 3. after a failed fsync, the bytes on disk are written again, so the
    ///    next fsync covers them whatever the kernel did with its dirty pages.
    ///
    /// Returns an error naming the cause while the segment stays failed.
    fn repair(&mut self, writer: &mut DiskWriter) -> Result<()> {
        let Some(failure) = self.failure.clone() else { return Ok(()) };
        if failure.records_lost {
            return Err(self.unusable_error(&failure));
        }

        // Step 1.
        if let Err(err) = writer.retry_failed(&self.file) {
            return Err(EngineError::io("writing segment again after a failed write", &self.path, err));
        }

        // Step 2.
        let on_disk = self.chunk_offset as usize;
        let mut bytes = vec![0u8; on_disk];
        self.read_file
            .read_exact_at(&mut bytes, 0)
            .map_err(|e| EngineError::io("reading segment back after a failed write", &self.path, e))?;
        bytes.extend_from_slice(self.chunk.as_slice());
        let report = scan(&bytes);
        if report.valid_end != self.end() {
            let detail = report.invalid.map_or_else(String::new, |(offset, reason)| format!(" at offset {offset}: {reason}"));
            let lost = Failure { cause: format!("{}; the file is valid to offset {} of {}{detail}", failure.cause, report.valid_end, self.end()), records_lost: true, ..failure };
            tracing::error!(segment = %self.id, path = %self.path.display(), cause = %lost.cause, "segment lost records; the session can no longer publish");
            let err = self.unusable_error(&lost);
            self.failure = Some(lost);
            return Err(err);
        }

        // Step 3.
        if failure.fsync_failed && on_disk > 0 {
            let mut disk = AlignedBuf::with_capacity(on_disk);
            disk.extend_from_slice(&bytes[..on_disk]);
            writer.write_now(&self.file, &mut disk, 0).map_err(|e| EngineError::io("writing segment again after a failed fsync", &self.path, e))?;
        }
        tracing::info!(segment = %self.id, path = %self.path.display(), cause = %failure.cause, "segment repaired after a failed write");
        self.failure = None;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`; the bytes must already have been appended.
    pub fn read_at(&mut self, writer: &mut DiskWriter, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.repair(writer)?;
        let end = offset + buf.len() as u64;
        assert!(end <= self.end(), "read past the end of open segment {}", self.id);
        let on_disk = end.min(self.chunk_offset).saturating_sub(offset) as usize;
        if on_disk > 0 {
            // A read may overlap a block that is still being written.
            writer.wait_all().map_err(|e| self.record_failure("writing segment", e))?;
            self.read_file
                .read_exact_at(&mut buf[..on_disk], offset)
                .map_err(|e| EngineError::io("reading segment", &self.path, e))?;
        }
        if on_disk < buf.len() {
            let from = (offset + on_disk as u64 - self.chunk_offset) as usize;
            let n = buf.len() - on_disk;
            buf[on_disk..].copy_from_slice(&self.chunk.as_slice()[from..from + n]);
        }
        Ok(())
    }
}

/// Result of scanning a segment's bytes record by record.
#[derive(Debug, Default)]
pub struct ScanReport {
    pub records: Vec<RawRecord>,
    /// Offset just past the last valid record.
    pub valid_end: u64,
    pub header: Option<SegmentHeader>,
    /// Set when the last valid record is a seal whose count matches.
    pub sealed: bool,
    /// Offset and reason of the first invalid bytes, when the scan stopped at some.
    pub invalid: Option<(u64, String)>,
}

/// Validates records from offset 0 and stops at the end of the log or at the
/// first invalid record.
pub fn scan(bytes: &[u8]) -> ScanReport {
    let mut report = ScanReport::default();
    let mut offset = 0usize;
    loop {
        match parse_record(bytes, offset) {
            Parsed::End => {
                // Only zero padding may follow the last record.
                if let Some(pos) = bytes[offset.min(bytes.len())..].iter().position(|&b| b != 0) {
                    let at = offset + pos;
                    report.invalid = Some((at as u64, "non-zero bytes after the end of the log".to_owned()));
                }
                break;
            }
            Parsed::Invalid(detail) => {
                report.invalid = Some((offset as u64, detail));
                break;
            }
            Parsed::Record(raw) => {
                let payload = &bytes[raw.payload_offset..raw.end()];
                match raw.record_type {
                    RecordType::SegmentHeader if offset == 0 => report.header = SegmentHeader::decode(payload).ok(),
                    RecordType::Seal => {
                        report.sealed = Seal::decode(payload)
                            .map(|s| s.records_before == report.records.len() as u64)
                            .unwrap_or(false);
                    }
                    _ => report.sealed = false,
                }
                report.records.push(raw);
                offset = raw.end();
                report.valid_end = offset as u64;
            }
        }
    }
    report
}

/// Opens a segment left by a session that did not seal it, validates every
/// record and truncates a torn tail at the last valid record.
///
/// A file with other hard links (a segment that the `file://` object store
/// linked as an object) is not truncated in place, which would change the
/// object too: the valid records are copied to a new file that replaces
/// `path`.
pub fn recover(path: &Path) -> Result<ScanReport> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io("reading segment", path, e))?;
    let report = scan(&bytes);
    if report.valid_end < bytes.len() as u64 {
        if let Some((offset, detail)) = &report.invalid {
            tracing::warn!(path = %path.display(), offset, detail = %detail, "truncating torn segment tail");
        }
        let links = std::fs::metadata(path).map_err(|e| EngineError::io("reading segment metadata", path, e))?.nlink();
        if links > 1 {
            replace_with_prefix(path, &bytes[..report.valid_end as usize])?;
        } else {
            let file = OpenOptions::new().write(true).open(path).map_err(|e| EngineError::io("opening segment", path, e))?;
            file.set_len(report.valid_end).map_err(|e| EngineError::io("truncating segment", path, e))?;
            file.sync_all().map_err(|e| EngineError::io("syncing segment", path, e))?;
        }
    }
    Ok(report)
}

/// Writes `prefix` to a new file and renames it over `path`, leaving the
/// other links of the old file as they were.
fn replace_with_prefix(path: &Path, prefix: &[u8]) -> Result<()> {
    let temp = path.with_extension(format!("seg.recover-{}", ulid::Ulid::new().to_string().to_lowercase()));
    let written = File::create(&temp)
        .and_then(|mut file| {
            std::io::Write::write_all(&mut file, prefix)?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(err) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(EngineError::io("replacing segment with its valid records", path, err));
    }
    Ok(())
}

/// A sealed, immutable segment on the local disk, read through a memory map.
pub struct SealedSegment {
    pub id: SegmentId,
    pub path: PathBuf,
    map: Mmap,
    /// Record offsets whose CRC has been checked since this segment was opened.
    verified: RwLock<HashSet<u64>>,
}

impl SealedSegment {
    /// Maps a sealed segment file. Its records are verified lazily, one
    /// record the first time a read touches it.
    pub fn open(id: SegmentId, path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| EngineError::io("opening segment", path, e))?;
        // SAFETY: sealed segments are immutable and only ever replaced by rename, never
        // modified in place, so the mapped bytes do not change under the map.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| EngineError::io("mapping segment", path, e))?;
        Ok(SealedSegment { id, path: path.to_owned(), map, verified: RwLock::new(HashSet::new()) })
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Copies `buf.len()` bytes at `offset`, after checking the CRC of the
    /// record `[record_offset, record_offset + record_len)` that holds them.
    /// Asks the kernel to read the segment bytes `[offset, offset + len)`
    /// into the page cache in the background (`MADV_WILLNEED`), clipped to
    /// the segment. Returns how many bytes were advised; 0 when the range
    /// lies past the end or the kernel rejected the advice.
    pub fn will_need(&self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len).min(self.len());
        if offset >= end {
            return 0;
        }
        let advised = (end - offset) as usize;
        match self.map.advise_range(memmap2::Advice::WillNeed, offset as usize, advised) {
            Ok(()) => advised as u64,
            Err(error) => {
                tracing::debug!(segment = %self.id, offset, len = advised, %error, "MADV_WILLNEED failed");
                0
            }
        }
    }

    pub fn read_verified(&self, record_offset: u64, record_len: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let record_end = record_offset + record_len as u64;
        let end = offset + buf.len() as u64;
        if offset < record_offset || end > record_end || record_end > self.len() {
            return Err(EngineError::CorruptSegment {
                object: "extent",
                segment: self.id,
                offset,
                detail: format!(
                    "extent [{offset}, {end}) is outside its record [{record_offset}, {record_end}) or the segment ({} bytes)",
                    self.len()
                ),
            });
        }
        if !self.verified.read().contains(&record_offset) {
            let bytes = &self.map[record_offset as usize..record_end as usize];
            record::verify_record(bytes).map_err(|detail| {
                tracing::error!(segment = %self.id, offset = record_offset, detail = %detail, "corrupt record");
                EngineError::CorruptSegment { object: "record", segment: self.id, offset: record_offset, detail }
            })?;
            self.verified.write().insert(record_offset);
        }
        buf.copy_from_slice(&self.map[offset as usize..end as usize]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::encode_data_prefix;
    use crate::ids::{Ino, SessionId};
    use crate::io::IoMode;

    fn header() -> SegmentHeader {
        SegmentHeader { segment: SegmentId::generate(), session: SessionId::generate(), volume: "v".into() }
    }

    fn write_segment(mode: IoMode, dir: &Path, records: usize, record_bytes: usize) -> (PathBuf, Vec<Appended>) {
        let mut writer = DiskWriter::new(mode).unwrap();
        let mut segment = OpenSegment::create(dir, &header()).unwrap();
        let mut appended = Vec::new();
        for i in 0..records {
            let data = vec![(i % 251) as u8; record_bytes];
            let prefix = encode_data_prefix(Ino(2), (i * record_bytes) as u64);
            appended.push(segment.push_record(Some(&mut writer), RecordType::Data, &[&prefix, &data]).unwrap());
        }
        let (path, _) = segment.seal(&mut writer).unwrap();
        (path, appended)
    }

    #[test]
    fn sealed_segment_scans_clean_in_both_io_modes() {
        for mode in [IoMode::Auto, IoMode::Pwrite] {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            let (path, appended) = write_segment(mode.clone(), dir.path(), 300, 9000);
            let report = scan(&std::fs::read(&path).unwrap());
            assert!(report.invalid.is_none(), "{mode:?}: {:?}", report.invalid);
            assert!(report.sealed, "{mode:?}: segment not sealed");
            assert_eq!(report.records.len(), 302);
            let sealed = SealedSegment::open(SegmentId::generate(), &path).unwrap();
            let last = appended[299];
            let data_offset = last.record_offset + (HEADER_LEN + 16) as u64;
            let mut buf = vec![0u8; 9000];
            sealed.read_verified(last.record_offset, last.record_len, data_offset, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == (299 % 251) as u8));
        }
    }

    #[test]
    fn records_larger_than_a_chunk_span_chunks() {
        for mode in [IoMode::Auto, IoMode::Pwrite] {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            let mut writer = DiskWriter::new(mode.clone()).unwrap();
            let mut segment = OpenSegment::create(dir.path(), &header()).unwrap();
            let mut appended = Vec::new();
            // Sizes around the chunk size, so records start and end at
            // several positions inside chunks.
            for (i, len) in [CHUNK_BYTES, CHUNK_BYTES - HEADER_LEN, 3 * CHUNK_BYTES + 17, 100, CHUNK_BYTES].into_iter().enumerate() {
                let data: Vec<u8> = (0..len).map(|j| ((i * 31 + j) % 251) as u8).collect();
                appended.push((segment.push_record(Some(&mut writer), RecordType::Data, &[&data]).unwrap(), data));
            }
            for (record, data) in &appended {
                let mut buf = vec![0u8; data.len()];
                segment.read_at(&mut writer, record.record_offset + HEADER_LEN as u64, &mut buf).unwrap();
                assert!(buf == *data, "{mode:?}: open segment read back other bytes at {}", record.record_offset);
            }
            let preallocated = std::fs::metadata(&segment.path).unwrap().len();
            assert!(preallocated >= PREALLOCATE_BYTES, "{mode:?}: the open segment file has {preallocated} bytes, no preallocation");
            let (path, len) = segment.seal(&mut writer).unwrap();
            let file_len = std::fs::metadata(&path).unwrap().len();
            assert_eq!(file_len, len.next_multiple_of(BLOCK_SIZE as u64), "{mode:?}: seal left the preallocated size");
            let report = scan(&std::fs::read(&path).unwrap());
            assert!(report.invalid.is_none(), "{mode:?}: {:?}", report.invalid);
            assert!(report.sealed, "{mode:?}: segment not sealed");
            assert_eq!(report.records.len(), appended.len() + 2);
            let sealed = SealedSegment::open(SegmentId::generate(), &path).unwrap();
            for (record, data) in &appended {
                let mut buf = vec![0u8; data.len()];
                sealed.read_verified(record.record_offset, record.record_len, record.record_offset + HEADER_LEN as u64, &mut buf).unwrap();
                assert!(buf == *data, "{mode:?}: sealed segment read back other bytes at {}", record.record_offset);
            }
        }
    }

    #[test]
    fn recover_keeps_other_links_intact() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let (path, appended) = write_segment(IoMode::Pwrite, dir.path(), 10, 500);
        // Tear the 8th record and add garbage after it, then link the file
        // as the file:// object store does.
        let torn_at = appended[7].record_offset + appended[7].record_len as u64 / 2;
        let mut torn = std::fs::read(&path).unwrap()[..torn_at as usize].to_vec();
        torn.extend_from_slice(&[0xee; 300]);
        std::fs::write(&path, &torn).unwrap();
        let link = dir.path().join("linked-object");
        std::fs::hard_link(&path, &link).unwrap();

        let report = recover(&path).unwrap();
        assert_eq!(report.records.len(), 8);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), report.valid_end);
        assert_eq!(std::fs::read(&link).unwrap(), torn, "recover changed another link of the segment");
        assert_eq!(std::fs::metadata(&path).unwrap().nlink(), 1);
    }

    #[test]
    fn open_segment_reads_its_unflushed_tail() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let mut writer = DiskWriter::new(IoMode::Auto).unwrap();
        let mut segment = OpenSegment::create(dir.path(), &header()).unwrap();
        let mut last = None;
        for i in 0..400u32 {
            let data = i.to_le_bytes().repeat(1000);
            last = Some((segment.push_record(Some(&mut writer), RecordType::Data, &[&data]).unwrap(), data));
        }
        let (appended, data) = last.unwrap();
        let mut buf = vec![0u8; data.len()];
        segment.read_at(&mut writer, appended.record_offset + HEADER_LEN as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
        segment.flush(&mut writer).unwrap();
        segment.read_at(&mut writer, appended.record_offset + HEADER_LEN as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn torn_tail_is_truncated_to_last_valid_record() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let (path, appended) = write_segment(IoMode::Pwrite, dir.path(), 10, 500);
        // Tear the 8th record: keep its header and half its payload, drop everything after.
        let torn_at = appended[7].record_offset + appended[7].record_len as u64 / 2;
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(torn_at).unwrap();
        let report = recover(&path).unwrap();
        assert_eq!(report.valid_end, appended[6].record_offset + appended[6].record_len as u64);
        assert!(!report.sealed);
        assert_eq!(report.invalid.as_ref().unwrap().0, appended[7].record_offset);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), report.valid_end);
        let again = recover(&path).unwrap();
        assert!(again.invalid.is_none());
        assert_eq!(again.records.len(), 8);
    }

    #[test]
    fn corrupt_byte_fails_read_with_segment_and_offset() {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let (path, appended) = write_segment(IoMode::Pwrite, dir.path(), 4, 300);
        let target = appended[2];
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(target.record_offset + 100) as usize] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let id = SegmentId::generate();
        let sealed = SealedSegment::open(id, &path).unwrap();
        let mut buf = vec![0u8; 10];
        let err = sealed.read_verified(target.record_offset, target.record_len, target.record_offset + 50, &mut buf).unwrap_err();
        match err {
            EngineError::CorruptSegment { segment, offset, .. } => {
                assert_eq!(segment, id);
                assert_eq!(offset, target.record_offset);
            }
            other => panic!("expected corruption, got {other}"),
        }
        let other = appended[1];
        sealed.read_verified(other.record_offset, other.record_len, other.record_offset + 40, &mut buf).unwrap();
    }
}
