//! File data: appending writes to the session's segment log and resolving
//! reads through the extent index.

use bytes::Bytes;

use crate::cache::SEGMENT_READAHEAD_FILE_MAX_BYTES;
use crate::error::{EngineError, Result};
use crate::extent::{Extent, Piece};
use crate::format::record::{encode_data_prefix, MetaOp, RecordType, SegmentHeader, DATA_PREFIX_LEN, HEADER_LEN};
use crate::ids::{Ino, SegmentId};
use crate::segment::{Appended, OpenSegment};
use crate::tree::{Content, FileKind, Timestamp};

use super::{Log, Session, State};

/// The plan of a read: where it gets its bytes once the session lock is released.
enum ReadPlan {
    /// The whole read lies in this sealed extent, for this many bytes.
    Sealed(Extent, usize),
    /// The result with holes and open-segment bytes filled in, and the
    /// sealed pieces still to copy into it, as (result offset, length, extent).
    Pieces(Vec<u8>, Vec<(usize, usize, Extent)>),
}

impl ReadPlan {
    fn last_sealed(&self) -> Option<&Extent> {
        match self {
            ReadPlan::Sealed(extent, _) => Some(extent),
            ReadPlan::Pieces(_, sealed) => sealed.last().map(|(_, _, extent)| extent),
        }
    }
}

/// A segment is sealed and a new one started once it grows past this size.
const SEGMENT_MAX_BYTES: u64 = 64 << 20;
/// Largest piece of file data in one record.
const DATA_RECORD_MAX_BYTES: usize = 4 << 20;
/// Largest file size: offsets stay far from `u64` overflow and inside `i64` for `lseek`.
pub(crate) const FILE_SIZE_MAX: u64 = 1 << 60;

impl Log {
    /// Makes sure a segment is open for appending, rolling a full one.
    fn ensure_current(&mut self, session: &Session) -> Result<()> {
        if self.current.as_ref().is_some_and(|s| s.end() >= SEGMENT_MAX_BYTES) {
            self.roll(session)?;
        }
        if self.current.is_none() {
            let header = SegmentHeader {
                segment: SegmentId::generate(),
                session: session.id,
                volume: session.volume.to_string(),
            };
            let dir = session.dir.as_ref().expect("writable sessions have a directory");
            self.current = Some(OpenSegment::create(dir, &header)?);
        }
        Ok(())
    }

    /// Seals the current segment, keeping it in the session directory until it is published.
    pub(crate) fn roll(&mut self, session: &Session) -> Result<()> {
        if let Some(segment) = self.current.as_mut() {
            let id = segment.id;
            // A segment that fails to seal stays current, so no later sync can publish without it.
            let (path, _len) = segment.seal(&mut self.writer)?;
            self.current = None;
            session.store.segments.insert_unpublished(id, &path)?;
            self.sealed.push((id, path));
        }
        Ok(())
    }

    pub(crate) fn append(&mut self, session: &Session, record_type: RecordType, parts: &[&[u8]]) -> Result<Appended> {
        self.ensure_current(session)?;
        let Log { writer, current, .. } = self;
        current.as_mut().expect("opened above").push_record(Some(writer), record_type, parts)
    }
}

impl Session {
    pub(crate) fn log_meta(&self, state: &mut State, op: MetaOp) -> Result<()> {
        let log = state.log.as_mut().expect("writable sessions have a log");
        log.append(self, RecordType::Meta, &[&op.encode()])?;
        Ok(())
    }

    /// Writes `data` at `offset` of a regular file; returns the bytes written.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> Result<u32> {
        self.check_writable()?;
        let end = offset.checked_add(data.len() as u64).filter(|&end| end <= FILE_SIZE_MAX).ok_or_else(|| {
            EngineError::TooLarge(format!("write at offset {offset} of {} bytes passes the maximum file size", data.len()))
        })?;
        let mut state = self.state.lock();
        let state = &mut *state;
        let kind = state.inode(&self.store, &self.volume, ino)?.attr.kind;
        if kind != FileKind::File {
            return Err(match kind {
                FileKind::Directory => EngineError::IsDirectory { ino },
                _ => EngineError::InvalidArgument(format!("inode {ino} is not a regular file")),
            });
        }
        let mut placed = Vec::new();
        let log = state.log.as_mut().expect("writable sessions have a log");
        for (i, chunk) in data.chunks(DATA_RECORD_MAX_BYTES).enumerate() {
            let file_offset = offset + (i * DATA_RECORD_MAX_BYTES) as u64;
            let prefix = encode_data_prefix(ino, file_offset);
            let appended = log.append(self, RecordType::Data, &[&prefix, chunk])?;
            placed.push((file_offset, chunk.len() as u64, appended));
        }
        let inode = state.inodes.get_mut(&ino).expect("loaded above");
        let Content::File(extents) = &mut inode.content else { unreachable!("kind checked above") };
        for (file_offset, len, appended) in placed {
            extents.insert(
                file_offset,
                Extent {
                    len,
                    segment: appended.segment,
                    data_offset: appended.record_offset + (HEADER_LEN + DATA_PREFIX_LEN) as u64,
                    record_offset: appended.record_offset,
                    record_len: appended.record_len,
                },
            );
        }
        let now = Timestamp::now();
        inode.attr.size = inode.attr.size.max(end);
        inode.attr.mtime = now;
        inode.attr.ctime = now;
        state.dirty.insert(ino);
        self.metrics.record_write(data.len() as u64);
        Ok(data.len() as u32)
    }

    /// Reads up to `len` bytes at `offset`; the result is short only at the end of the file.
    /// The bytes count in `chalk_read_bytes_total`.
    pub fn read(&self, ino: Ino, offset: u64, len: u32) -> Result<Vec<u8>> {
        Ok(Vec::from(self.read_bytes(ino, offset, len)?))
    }

    /// Reads like [`Session::read`]. When the bytes lie in one response of
    /// the object store held by the read cache, the result shares that
    /// buffer instead of copying it: for a mount's read replies.
    pub fn read_bytes(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes> {
        let out = self.read_shared(ino, offset, len)?;
        self.metrics.record_read(out.len() as u64);
        Ok(out)
    }

    /// Reads like [`Session::read`] without counting the bytes in
    /// `chalk_read_bytes_total`. For copies that a mount makes for itself,
    /// such as a passthrough backing file, which no reader has asked for.
    pub fn read_uncounted(&self, ino: Ino, offset: u64, len: u32) -> Result<Vec<u8>> {
        Ok(Vec::from(self.read_shared(ino, offset, len)?))
    }

    fn read_shared(&self, ino: Ino, offset: u64, len: u32) -> Result<Bytes> {
        let (plan, size) = {
            let mut state = self.state.lock();
            let size = state.inode(&self.store, &self.volume, ino)?.attr.size;
            (self.plan_read(&mut state, ino, offset, len)?, size)
        };
        // Reading a directory's small files one after the other walks their
        // segment forward, so the next files' bytes are fetched ahead. Only
        // read-only sessions do this, because rewrites scatter the records
        // of a writable session's files.
        if self.is_read_only() && size < SEGMENT_READAHEAD_FILE_MAX_BYTES {
            if let Some(extent) = plan.last_sealed() {
                self.store.segments.segment_readahead(&self.volume, self.id, extent);
            }
        }
        self.finish_read(plan)
    }

    /// Reads like [`Session::read`] with the session lock already held.
    pub(crate) fn read_in(&self, state: &mut State, ino: Ino, offset: u64, len: u32) -> Result<Vec<u8>> {
        let plan = self.plan_read(state, ino, offset, len)?;
        Ok(Vec::from(self.finish_read(plan)?))
    }

    /// Reads the sealed bytes that a plan left for after the session lock.
    fn finish_read(&self, plan: ReadPlan) -> Result<Bytes> {
        match plan {
            ReadPlan::Sealed(extent, len) => self.store.segments.read_bytes(&self.volume, &extent, len),
            ReadPlan::Pieces(mut out, sealed) => {
                self.read_sealed(&mut out, sealed)?;
                Ok(Bytes::from(out))
            }
        }
    }

    /// Plans a read. A read that lies in one sealed extent is left whole to
    /// the read cache. Otherwise holes and bytes of the open segment are
    /// copied into the result, and the pieces in sealed segments are listed.
    fn plan_read(&self, state: &mut State, ino: Ino, offset: u64, len: u32) -> Result<ReadPlan> {
        let inode = state.inode(&self.store, &self.volume, ino)?;
        let size = inode.attr.size;
        let extents = match &inode.content {
            Content::File(extents) => extents,
            Content::Directory(_) => return Err(EngineError::IsDirectory { ino }),
            Content::Symlink(_) | Content::Special => {
                return Err(EngineError::InvalidArgument(format!("inode {ino} is not a regular file")))
            }
        };
        if offset >= size {
            return Ok(ReadPlan::Pieces(Vec::new(), Vec::new()));
        }
        let want = (len as u64).min(size - offset);
        let pieces = extents.pieces(offset, want);
        // A sequential reader gets the sealed extents ahead of this read prefetched.
        let mut ahead: Vec<Extent> = Vec::new();
        if let Some((from, len)) = self.store.segments.readahead(self.id, ino, offset, want, size) {
            ahead.extend(extents.pieces(from, len).into_iter().filter_map(|piece| piece.extent));
        }
        let open = state.log.as_mut().and_then(|log| log.current.as_ref().map(|s| s.id));
        ahead.retain(|extent| Some(extent.segment) != open);
        if !ahead.is_empty() {
            self.store.segments.prefetch(&self.volume, &ahead);
        }
        if let [Piece { len, extent: Some(extent), .. }] = pieces.as_slice() {
            if *len == want && Some(extent.segment) != open {
                return Ok(ReadPlan::Sealed(*extent, want as usize));
            }
        }
        let mut out = vec![0u8; want as usize];
        let mut sealed = Vec::new();
        for piece in pieces {
            let at = (piece.file_offset - offset) as usize;
            match piece.extent {
                None => {}
                Some(extent) if Some(extent.segment) == open => {
                    let log = state.log.as_mut().expect("open segment implies a log");
                    let segment = log.current.as_mut().expect("open segment exists");
                    segment.read_at(&mut log.writer, extent.data_offset, &mut out[at..at + piece.len as usize])?;
                }
                Some(extent) => sealed.push((at, piece.len as usize, extent)),
            }
        }
        Ok(ReadPlan::Pieces(out, sealed))
    }

    fn read_sealed(&self, out: &mut [u8], sealed: Vec<(usize, usize, Extent)>) -> Result<()> {
        for (at, len, extent) in sealed {
            self.store.segments.read(&self.volume, &extent, &mut out[at..at + len])?;
        }
        Ok(())
    }

    /// Current size of a file, for `O_APPEND` writes.
    pub fn file_size(&self, ino: Ino) -> Result<u64> {
        let mut state = self.state.lock();
        Ok(state.inode(&self.store, &self.volume, ino)?.attr.size)
    }

    /// Makes this session's log durable on the local disk. Publishes nothing:
    /// only `sync` makes writes visible and durable in the object store.
    pub fn fsync(&self) -> Result<()> {
        let mut state = self.state.lock();
        if let Some(log) = state.log.as_mut() {
            if let Some(segment) = log.current.as_mut() {
                segment.fsync(&mut log.writer)?;
            }
        }
        Ok(())
    }
}
