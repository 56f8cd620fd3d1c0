//! Sequential readahead: per open file of a session, a window that doubles
//! on every sequential read and drops to nothing on a random one.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::ids::{Ino, SessionId};

/// A read that starts this close to where the previous one ended still
/// counts as sequential: concurrent FUSE threads deliver the kernel's
/// readahead requests slightly out of order.
const SEQUENTIAL_SLACK_BYTES: u64 = 2 << 20;
/// Streams tracked at once; the table is cleared when it grows past this.
const STREAMS_MAX: usize = 4096;

/// Readahead state of one file in one session.
#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    /// Offset where the next sequential read is expected to start.
    next: u64,
    /// Current window in bytes; 0 means no readahead.
    window: u64,
    /// File offset up to which prefetches were already issued.
    issued_until: u64,
}

pub(crate) struct Readahead {
    initial_bytes: u64,
    max_bytes: u64,
    /// Prefetches smaller than this wait until more of the window is free,
    /// so that GETs stay large.
    batch_bytes: u64,
    streams: Mutex<HashMap<(SessionId, Ino), Stream>>,
}

impl Readahead {
    pub fn new(initial_bytes: u64, max_bytes: u64, batch_bytes: u64) -> Self {
        Readahead { initial_bytes, max_bytes, batch_bytes, streams: Mutex::new(HashMap::new()) }
    }

    /// Records a read of `len` bytes at `offset` of a file of `size` bytes
    /// and returns the file range to prefetch, as `(offset, len)`, if any.
    pub fn advise(&self, session: SessionId, ino: Ino, offset: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut streams = self.streams.lock();
        if streams.len() >= STREAMS_MAX && !streams.contains_key(&(session, ino)) {
            streams.clear();
        }
        let stream = streams.entry((session, ino)).or_default();
        let end = offset.saturating_add(len).min(size);
        let sequential = offset.abs_diff(stream.next) <= SEQUENTIAL_SLACK_BYTES;
        if sequential && end <= stream.next {
            // A read behind the stream (a repeated read, or one that another
            // thread delivered late) neither grows nor resets the window.
            return None;
        }
        if sequential {
            stream.window = match stream.window {
                0 => self.initial_bytes.min(self.max_bytes),
                window => window.saturating_mul(2).min(self.max_bytes),
            };
            stream.next = stream.next.max(end);
        } else {
            stream.window = 0;
            stream.next = end;
            stream.issued_until = end;
            return None;
        }

        let from = stream.issued_until.max(end);
        let to = end.saturating_add(stream.window).min(size);
        let enough = to.saturating_sub(from) >= self.batch_bytes.min(stream.window) || to == size;
        if to <= from || !enough {
            return None;
        }
        stream.issued_until = to;
        Some((from, to - from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn window_grows_on_sequential_reads() {
        let readahead = Readahead::new(MIB, 64 * MIB, 8 * MIB);
        let (session, ino) = (SessionId::generate(), Ino(5));
        let size = 1 << 30;
        let read = 128 * 1024;
        let mut issued = Vec::new();
        for i in 0..200u64 {
            if let Some(range) = readahead.advise(session, ino, i * read, read, size) {
                issued.push(range);
            }
        }
        assert!(!issued.is_empty());
        // Issued ranges follow each other without gaps or overlaps.
        for pair in issued.windows(2) {
            assert_eq!(pair[0].0 + pair[0].1, pair[1].0, "{issued:?}");
        }
        // After 25 MiB of reads the window is at its 64 MiB maximum, and the
        // prefetch runs at most one 8 MiB batch short of it.
        let (last_offset, last_len) = *issued.last().unwrap();
        let ahead = last_offset + last_len - 200 * read;
        assert!((56 * MIB..=64 * MIB).contains(&ahead), "prefetch runs {ahead} bytes ahead");
    }

    #[test]
    fn random_read_stops_readahead() {
        let readahead = Readahead::new(MIB, 64 * MIB, MIB);
        let (session, ino) = (SessionId::generate(), Ino(5));
        assert!(readahead.advise(session, ino, 0, MIB, 1 << 30).is_some());
        assert_eq!(readahead.advise(session, ino, 500 * MIB, 4096, 1 << 30), None);
        assert_eq!(readahead.advise(session, ino, 100 * MIB, 4096, 1 << 30), None);
        // Sequential again from the last read: the window starts small.
        let (offset, len) = readahead.advise(session, ino, 100 * MIB + 4096, MIB, 1 << 30).unwrap();
        assert_eq!(offset, 101 * MIB + 4096);
        assert_eq!(len, MIB);
    }

    #[test]
    fn repeated_read_changes_nothing() {
        let readahead = Readahead::new(MIB, 64 * MIB, MIB);
        let (session, ino) = (SessionId::generate(), Ino(5));
        assert!(readahead.advise(session, ino, 0, MIB, 1 << 30).is_some());
        assert_eq!(readahead.advise(session, ino, 0, MIB, 1 << 30), None);
        assert_eq!(readahead.advise(session, ino, 4096, 4096, 1 << 30), None);
        // The stream goes on where it was, with a doubled window.
        let (offset, len) = readahead.advise(session, ino, MIB, MIB, 1 << 30).unwrap();
        assert_eq!((offset, offset + len), (2 * MIB, 4 * MIB));
    }

    #[test]
    fn prefetch_stops_at_end_of_file() {
        let readahead = Readahead::new(MIB, 64 * MIB, 8 * MIB);
        let (session, ino) = (SessionId::generate(), Ino(9));
        let size = 3 * MIB + 17;
        let (offset, len) = readahead.advise(session, ino, 0, 4096, size).unwrap();
        assert_eq!((offset, len), (4096, MIB));
        // 1 MiB more is less than a batch, and the end of the file is not reached yet.
        assert_eq!(readahead.advise(session, ino, 4096, 4096, size), None);
        let (offset, len) = readahead.advise(session, ino, 8192, 4096, size).unwrap();
        assert_eq!((offset, offset + len), (MIB + 4096, size));
        assert_eq!(readahead.advise(session, ino, 12288, 4096, size), None);
    }
}
