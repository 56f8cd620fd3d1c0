//! Readahead across small files: per session, a window over the segment
//! that grows while reads take the records of a segment in the order they
//! were written, and drops to nothing on any other read.
//!
//! `chalk volume put` and most writers store the files of a directory one
//! after the other, so reading a directory's small files in name order
//! walks a segment forward record by record. Each file is too small for the
//! per-file readahead of [`super::readahead`] to start, so this window
//! prefetches the segment bytes of the next files instead.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::extent::Extent;
use crate::ids::{SegmentId, SessionId};

/// A record that starts at most this far past the end of the previous one
/// still continues the stream. Between the data records of two files a
/// writer logs the second file's metadata, which takes a few hundred bytes.
const GAP_MAX_BYTES: u64 = 64 << 10;
/// Streams tracked at once; the table is cleared when it grows past this.
const STREAMS_MAX: usize = 1024;

/// Readahead state of one session.
#[derive(Clone, Copy, Debug)]
struct Stream {
    segment: SegmentId,
    /// Segment offset of the last record read.
    record_offset: u64,
    /// Segment offset where the next record is expected to start.
    next: u64,
    /// Current window in bytes; 0 means no readahead.
    window: u64,
    /// Segment offset up to which prefetches were already issued.
    issued_until: u64,
}

/// Segment-order readahead of every session of one store.
pub(crate) struct SegmentReadahead {
    initial_bytes: u64,
    max_bytes: u64,
    /// Prefetches smaller than this wait until more of the window is free.
    batch_bytes: u64,
    streams: Mutex<HashMap<SessionId, Stream>>,
}

impl SegmentReadahead {
    pub fn new(initial_bytes: u64, max_bytes: u64, batch_bytes: u64) -> Self {
        SegmentReadahead { initial_bytes, max_bytes, batch_bytes, streams: Mutex::new(HashMap::new()) }
    }

    /// Records a read from the record of `extent` and returns the segment
    /// range to prefetch, as `(offset, len)`, if any. The range may pass
    /// the end of the segment; the caller clips it.
    pub fn advise(&self, session: SessionId, extent: &Extent) -> Option<(u64, u64)> {
        if self.max_bytes == 0 {
            return None;
        }
        let record_end = extent.record_offset + extent.record_len as u64;
        let mut streams = self.streams.lock();
        if streams.len() >= STREAMS_MAX && !streams.contains_key(&session) {
            streams.clear();
        }
        let fresh = Stream {
            segment: extent.segment,
            record_offset: extent.record_offset,
            next: record_end,
            window: 0,
            issued_until: record_end,
        };
        let stream = streams.entry(session).or_insert(fresh);
        if stream.segment != extent.segment {
            *stream = fresh;
            return None;
        }
        if extent.record_offset == stream.record_offset {
            // Another read of the same record (a file read in several
            // requests, or the first read of a new stream) changes nothing.
            return None;
        }
        let follows = extent.record_offset >= stream.next && extent.record_offset - stream.next <= GAP_MAX_BYTES;
        if !follows {
            *stream = fresh;
            return None;
        }
        stream.window = match stream.window {
            0 => self.initial_bytes.min(self.max_bytes),
            window => window.saturating_mul(2).min(self.max_bytes),
        };
        stream.record_offset = extent.record_offset;
        stream.next = record_end;

        let from = stream.issued_until.max(record_end);
        let to = record_end.saturating_add(stream.window);
        if to <= from || to - from < self.batch_bytes.min(stream.window) {
            return None;
        }
        stream.issued_until = to;
        Some((from, to - from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;

    /// Returns the extent of a 64 KiB file whose record starts at `record_offset`.
    fn file_at(segment: SegmentId, record_offset: u64) -> Extent {
        Extent { len: 64 * KIB, segment, data_offset: record_offset + 64, record_offset, record_len: 64 * 1024 + 64 }
    }

    /// Record offsets of files written one after the other, each record
    /// followed by a 200-byte metadata record.
    fn packed_offsets(count: u64) -> Vec<u64> {
        (0..count).map(|i| i * (64 * KIB + 64 + 200)).collect()
    }

    #[test]
    fn window_grows_over_consecutive_files() {
        let readahead = SegmentReadahead::new(MIB, 8 * MIB, MIB);
        let (session, segment) = (SessionId::generate(), SegmentId::generate());
        let mut issued = Vec::new();
        for offset in packed_offsets(400) {
            if let Some(range) = readahead.advise(session, &file_at(segment, offset)) {
                issued.push(range);
            }
        }
        assert!(issued.len() >= 3, "{issued:?}");
        // Issued ranges follow each other without gaps or overlaps.
        for pair in issued.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "{issued:?}");
        }
        // The window reached its maximum: the last prefetch ends at most
        // 8 MiB past the last record read, and at most one batch short of it.
        let last_end = packed_offsets(400)[399] + 64 * KIB + 64;
        let (offset, len) = *issued.last().unwrap();
        let ahead = offset + len - last_end;
        assert!((7 * MIB..=8 * MIB).contains(&ahead), "prefetch runs {ahead} bytes ahead");
    }

    #[test]
    fn jump_stops_readahead() {
        let readahead = SegmentReadahead::new(MIB, 8 * MIB, MIB);
        let (session, segment) = (SessionId::generate(), SegmentId::generate());
        let offsets = packed_offsets(10);
        assert_eq!(readahead.advise(session, &file_at(segment, offsets[0])), None);
        assert!(readahead.advise(session, &file_at(segment, offsets[1])).is_some());
        // Backwards, far forwards and into another segment: no prefetch.
        assert_eq!(readahead.advise(session, &file_at(segment, offsets[0])), None);
        assert_eq!(readahead.advise(session, &file_at(segment, 100 * MIB)), None);
        assert_eq!(readahead.advise(session, &file_at(SegmentId::generate(), offsets[2])), None);
        // In order again: the window starts from nothing, so the second
        // read in order is the first to prefetch.
        assert_eq!(readahead.advise(session, &file_at(segment, offsets[5])), None);
        let (offset, len) = readahead.advise(session, &file_at(segment, offsets[6])).unwrap();
        assert_eq!((offset, len), (offsets[6] + 64 * KIB + 64, MIB));
    }

    #[test]
    fn repeated_record_changes_nothing() {
        let readahead = SegmentReadahead::new(MIB, 8 * MIB, MIB);
        let (session, segment) = (SessionId::generate(), SegmentId::generate());
        let offsets = packed_offsets(3);
        assert_eq!(readahead.advise(session, &file_at(segment, offsets[0])), None);
        assert!(readahead.advise(session, &file_at(segment, offsets[1])).is_some());
        assert_eq!(readahead.advise(session, &file_at(segment, offsets[1])), None);
        // The stream goes on with a doubled window.
        let (offset, len) = readahead.advise(session, &file_at(segment, offsets[2])).unwrap();
        assert_eq!(offset + len, offsets[2] + 64 * KIB + 64 + 2 * MIB);
    }

    #[test]
    fn sessions_keep_their_own_streams() {
        let readahead = SegmentReadahead::new(MIB, 8 * MIB, MIB);
        let (first, second) = (SessionId::generate(), SessionId::generate());
        let segment = SegmentId::generate();
        let offsets = packed_offsets(4);
        assert_eq!(readahead.advise(first, &file_at(segment, offsets[0])), None);
        assert_eq!(readahead.advise(second, &file_at(segment, 40 * MIB)), None);
        assert!(readahead.advise(first, &file_at(segment, offsets[1])).is_some());
    }

    #[test]
    fn zero_maximum_turns_readahead_off() {
        let readahead = SegmentReadahead::new(MIB, 0, MIB);
        let (session, segment) = (SessionId::generate(), SegmentId::generate());
        for offset in packed_offsets(20) {
            assert_eq!(readahead.advise(session, &file_at(segment, offset)), None);
        }
    }
}
