//! Extent index of one file: which byte ranges of the file live where in
//! which segment.
//!
//! Invariants:
//! - Extents never overlap and are never empty; the map is keyed by file offset.
//! - Bytes not covered by an extent are a hole and read as zeros.
//! - Trimming or splitting an extent keeps the record it came from, so a read
//!   can still verify that record's CRC.

use std::collections::BTreeMap;

use crate::ids::SegmentId;

/// A range of a file mapped to bytes in a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub segment: SegmentId,
    /// Offset in the segment of the extent's first byte.
    pub data_offset: u64,
    /// Offset in the segment of the record that holds the bytes.
    pub record_offset: u64,
    /// Length of that whole record, header included.
    pub record_len: u32,
}

impl Extent {
    /// Drops the first `by` bytes.
    fn skip(mut self, by: u64) -> Self {
        debug_assert!(by < self.len);
        self.len -= by;
        self.data_offset += by;
        self
    }

    fn keep(mut self, len: u64) -> Self {
        debug_assert!(len > 0 && len <= self.len);
        self.len = len;
        self
    }
}

/// One piece of a read: either bytes of an extent or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub file_offset: u64,
    pub len: u64,
    /// `None` for a hole. For data, an extent trimmed to exactly this piece.
    pub extent: Option<Extent>,
}

/// Extents of one file, ordered by file offset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    map: BTreeMap<u64, Extent>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Iterates over `(file_offset, extent)` in file order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Extent)> {
        self.map.iter().map(|(k, v)| (*k, v))
    }

    /// Offset just past the last byte covered by an extent (0 when empty).
    pub fn end(&self) -> u64 {
        self.map.iter().next_back().map(|(k, v)| k + v.len).unwrap_or(0)
    }

    /// Maps `[file_offset, file_offset + extent.len)` to `extent`, trimming or
    /// splitting whatever it overwrites.
    pub fn insert(&mut self, file_offset: u64, extent: Extent) {
        if extent.len == 0 {
            return;
        }
        let end = file_offset.checked_add(extent.len).expect("extent end overflows u64");
        self.punch(file_offset, end);
        self.map.insert(file_offset, extent);
    }

    /// Removes every mapping inside `[start, end)`, splitting extents that
    /// straddle either boundary.
    fn punch(&mut self, start: u64, end: u64) {
        if let Some((&key, &before)) = self.map.range(..start).next_back() {
            let before_end = key + before.len;
            if before_end > start {
                self.map.insert(key, before.keep(start - key));
                if before_end > end {
                    self.map.insert(end, before.skip(end - key));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for key in inside {
            let extent = self.map.remove(&key).expect("key was just listed");
            let extent_end = key + extent.len;
            if extent_end > end {
                self.map.insert(end, extent.skip(end - key));
            }
        }
    }

    /// Drops everything at or beyond `size`.
    pub fn truncate(&mut self, size: u64) {
        self.punch(size, u64::MAX);
    }

    /// Splits `[offset, offset + len)` into extent pieces and holes, in order.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut cursor = offset;
        let first = self.map.range(..=offset).next_back().map(|(k, _)| *k).unwrap_or(offset);
        for (&key, &extent) in self.map.range(first..end) {
            let extent_end = key + extent.len;
            if extent_end <= cursor {
                continue;
            }
            if key > cursor {
                out.push(Piece { file_offset: cursor, len: key - cursor, extent: None });
                cursor = key;
            }
            let piece_end = extent_end.min(end);
            let trimmed = extent.skip(cursor - key).keep(piece_end - cursor);
            out.push(Piece { file_offset: cursor, len: piece_end - cursor, extent: Some(trimmed) });
            cursor = piece_end;
        }
        if cursor < end {
            out.push(Piece { file_offset: cursor, len: end - cursor, extent: None });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Writes and truncates applied to both the extent map and a plain model
    /// that remembers, for every byte, which write produced it.
    #[derive(Clone, Debug)]
    enum Op {
        Write { offset: u64, len: u64 },
        Truncate { size: u64 },
    }

    const FOUR_GIB: u64 = 1 << 32;

    fn op_strategy() -> impl Strategy<Value = Op> {
        // Offsets cluster in a small window so writes overlap, and that window
        // sits either at 0 or just below 4 GiB so offsets beyond it are covered.
        let base = prop_oneof![Just(0u64), Just(FOUR_GIB - 64)];
        prop_oneof![
            4 => (base.clone(), 0u64..200, 1u64..80).prop_map(|(b, o, l)| Op::Write { offset: b + o, len: l }),
            1 => (base, 0u64..260).prop_map(|(b, s)| Op::Truncate { size: b + s }),
        ]
    }

    /// The byte at `at` as the model sees it: `Some((write number, index in write))` or a hole.
    fn model_read(model: &HashMap<u64, (u64, u64)>, at: u64) -> Option<(u64, u64)> {
        model.get(&at).copied()
    }

    proptest! {
        #[test]
        fn extent_map_matches_byte_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
            let mut map = ExtentMap::new();
            let mut model: HashMap<u64, (u64, u64)> = HashMap::new();
            let segment = SegmentId::from_u128(1);
            for (n, op) in ops.iter().enumerate() {
                match *op {
                    Op::Write { offset, len } => {
                        // Each write lives at its own "segment offset": write n starts at n << 20.
                        let data_offset = (n as u64) << 20;
                        map.insert(offset, Extent { len, segment, data_offset, record_offset: data_offset, record_len: 0 });
                        for i in 0..len {
                            model.insert(offset + i, (n as u64, i));
                        }
                    }
                    Op::Truncate { size } => {
                        map.truncate(size);
                        model.retain(|&at, _| at < size);
                    }
                }
            }
            let mut previous_end = 0;
            for (key, extent) in map.iter() {
                prop_assert!(extent.len > 0);
                prop_assert!(key >= previous_end, "extents overlap at {key}");
                previous_end = key + extent.len;
            }
            for window in [0u64, FOUR_GIB - 64] {
                let pieces = map.pieces(window, 300);
                let covered: u64 = pieces.iter().map(|p| p.len).sum();
                prop_assert_eq!(covered, 300);
                for piece in pieces {
                    for i in 0..piece.len {
                        let at = piece.file_offset + i;
                        let got = piece.extent.map(|e| {
                            let from = e.data_offset + i;
                            (from >> 20, from & ((1 << 20) - 1))
                        });
                        prop_assert_eq!(got, model_read(&model, at), "byte {}", at);
                    }
                }
            }
        }
    }

    #[test]
    fn overwrite_in_middle_splits_extent() {
        let segment = SegmentId::from_u128(9);
        let mut map = ExtentMap::new();
        map.insert(0, Extent { len: 100, segment, data_offset: 1000, record_offset: 976, record_len: 140 });
        map.insert(40, Extent { len: 10, segment, data_offset: 5000, record_offset: 4976, record_len: 50 });
        let offsets: Vec<(u64, u64, u64)> = map.iter().map(|(k, e)| (k, e.len, e.data_offset)).collect();
        assert_eq!(offsets, vec![(0, 40, 1000), (40, 10, 5000), (50, 50, 1050)]);
        assert_eq!(map.iter().nth(2).unwrap().1.record_offset, 976);
    }

    #[test]
    fn hole_between_extents_reads_as_hole() {
        let segment = SegmentId::from_u128(9);
        let mut map = ExtentMap::new();
        map.insert(10, Extent { len: 5, segment, data_offset: 0, record_offset: 0, record_len: 0 });
        let pieces = map.pieces(0, 30);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0], Piece { file_offset: 0, len: 10, extent: None });
        assert!(pieces[1].extent.is_some());
        assert_eq!(pieces[2], Piece { file_offset: 15, len: 15, extent: None });
    }
}
