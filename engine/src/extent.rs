//! Extent index of one file: which byte ranges of the file live where in
//! which segment.
//!
//! Invariants:
//! - Extents never overlap and are never empty; the map is keyed by file offset.
//! - Bytes not covered by an extent are a hole and read as zeros.
//! - Trimming or splitting an extent keeps the record it came from, so a read
//!   can still verify that record's CRC.
//!
//! Layout: the map stores packed 32-byte entries (see [`packed`]) in sorted
//! chunks of at most [`CHUNK_ENTRIES`]. Every chunk with room for more than
//! four entries stays at least half full, so a large index takes at most
//! about 65 bytes per extent: 32.3 after a million sequential inserts and
//! 39.5 after scattered ones (`benches/tests/extent_memory.rs`). A lookup
//! is a binary search over the chunks' first offsets, then one inside a
//! chunk.

mod packed;

use std::fmt;

use crate::ids::SegmentId;
use packed::{Entry, Tables};
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

/// Maximum entries in one chunk: 4 KiB of packed entries. Larger chunks
/// move more bytes on an insert in the middle, and smaller ones make the
/// chunk list longer, which every split shifts.
#[cfg(not(test))]
const CHUNK_ENTRIES: usize = 128;
/// Small chunks in unit tests, so that a few dozen writes split chunks.
#[cfg(test)]
const CHUNK_ENTRIES: usize = 4;

/// Place of one entry: a chunk and an index inside it. `(chunks.len(), 0)`
/// is the end of the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Position {
    chunk: usize,
    index: usize,
}

/// Extents of one file, ordered by file offset.
#[derive(Default)]
pub struct ExtentMap {
    /// Sorted runs of entries, each non-empty and at most [`CHUNK_ENTRIES`]
    /// long. Every entry of a chunk comes before every entry of the next.
    chunks: Vec<Vec<Entry>>,
    /// File offset of each chunk's first entry. Kept apart from the chunks
    /// so that a lookup's binary search reads one small array instead of one
    /// chunk per step.
    firsts: Vec<u64>,
    len: usize,
    tables: Tables,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Iterates over `(file_offset, extent)` in file order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, Extent)> + '_ {
        self.chunks.iter().flatten().map(|entry| (entry.file_offset, self.tables.decode(entry)))
    }

    /// Offset just past the last byte covered by an extent (0 when empty).
    pub fn end(&self) -> u64 {
        self.chunks.last().and_then(|chunk| chunk.last()).map(|entry| entry.end(&self.tables)).unwrap_or(0)
    }

    /// Maps `[file_offset, file_offset + extent.len)` to `extent`, trimming or
    /// splitting whatever it overwrites.
    pub fn insert(&mut self, file_offset: u64, extent: Extent) {
        if extent.len == 0 {
            return;
        }
        let end = file_offset.checked_add(extent.len).expect("extent end overflows u64");
        self.punch(file_offset, end);
        let entry = self.tables.encode(file_offset, extent);
        let at = self.lower_bound(file_offset);
        self.insert_at(at, entry);
        self.release_unused();
    }

    /// Drops everything at or beyond `size`.
    pub fn truncate(&mut self, size: u64) {
        self.punch(size, u64::MAX);
        self.release_unused();
    }

    /// Splits `[offset, offset + len)` into extent pieces and holes, in order.
    pub fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset.saturating_add(len);
        let mut out = Vec::new();
        let mut cursor = offset;
        // The entry that starts before `offset` may still cover it.
        let first = self.lower_bound(offset);
        let first = self.previous(first).unwrap_or(first);
        for entry in self.entries_from(first) {
            let key = entry.file_offset;
            if key >= end {
                break;
            }
            let extent_end = entry.end(&self.tables);
            if extent_end <= cursor {
                continue;
            }
            if key > cursor {
                out.push(Piece { file_offset: cursor, len: key - cursor, extent: None });
                cursor = key;
            }
            let piece_end = extent_end.min(end);
            let trimmed = self.tables.decode(entry).skip(cursor - key).keep(piece_end - cursor);
            out.push(Piece { file_offset: cursor, len: piece_end - cursor, extent: Some(trimmed) });
            cursor = piece_end;
        }
        if cursor < end {
            out.push(Piece { file_offset: cursor, len: end - cursor, extent: None });
        }
        out
    }

    /// Removes every mapping inside `[start, end)`, splitting extents that
    /// straddle either boundary.
    fn punch(&mut self, start: u64, end: u64) {
        let first = self.lower_bound(start);
        if let Some(before) = self.previous(first) {
            let (key, extent) = self.get(before);
            let extent_end = key + extent.len;
            if extent_end > start {
                self.replace(before, extent.keep(start - key));
                if extent_end > end {
                    // That extent covered all of `[start, end)`, so nothing else is inside.
                    let tail = self.tables.encode(end, extent.skip(end - key));
                    self.insert_at(first, tail);
                    return;
                }
            }
        }
        let stop = self.lower_bound(end);
        if first == stop {
            return;
        }
        let last = self.previous(stop).expect("a position after `first` has a previous one");
        let (key, extent) = self.get(last);
        let tail = (key + extent.len > end).then(|| extent.skip(end - key));
        self.remove_range(first, stop);
        if let Some(tail) = tail {
            let entry = self.tables.encode(end, tail);
            let at = self.lower_bound(end);
            self.insert_at(at, entry);
        }
    }

    /// Returns the position of the first entry at or after `file_offset`.
    fn lower_bound(&self, file_offset: u64) -> Position {
        // Chunks before `after` start below `file_offset`, so the position
        // is in the last of them or at the start of chunk `after`.
        let after = self.firsts.partition_point(|&first| first < file_offset);
        let Some(chunk) = after.checked_sub(1) else {
            return Position { chunk: 0, index: 0 };
        };
        let index = self.chunks[chunk].partition_point(|entry| entry.file_offset < file_offset);
        if index < self.chunks[chunk].len() {
            Position { chunk, index }
        } else {
            Position { chunk: after, index: 0 }
        }
    }

    fn previous(&self, at: Position) -> Option<Position> {
        if at.index > 0 {
            Some(Position { chunk: at.chunk, index: at.index - 1 })
        } else if at.chunk > 0 {
            Some(Position { chunk: at.chunk - 1, index: self.chunks[at.chunk - 1].len() - 1 })
        } else {
            None
        }
    }

    fn get(&self, at: Position) -> (u64, Extent) {
        let entry = &self.chunks[at.chunk][at.index];
        (entry.file_offset, self.tables.decode(entry))
    }

    /// Overwrites the entry at `at` with one at the same file offset.
    fn replace(&mut self, at: Position, extent: Extent) {
        let file_offset = self.chunks[at.chunk][at.index].file_offset;
        self.chunks[at.chunk][at.index] = self.tables.encode(file_offset, extent);
    }

    fn entries_from(&self, at: Position) -> impl Iterator<Item = &Entry> {
        let skip = at.index;
        self.chunks[at.chunk..].iter().enumerate().flat_map(move |(n, chunk)| if n == 0 { &chunk[skip..] } else { &chunk[..] })
    }

    /// Inserts `entry` at `at`, which must be where its file offset sorts.
    fn insert_at(&mut self, at: Position, entry: Entry) {
        self.len += 1;
        if self.chunks.is_empty() {
            // Exactly one slot, because most files never get a second chunk.
            self.chunks.reserve_exact(1);
            self.firsts.reserve_exact(1);
            self.chunks.push(vec![entry]);
            self.firsts.push(entry.file_offset);
            return;
        }
        // Between two chunks, append to the earlier one so that chunk starts stay put.
        let (chunk, index) = match at.index {
            0 if at.chunk > 0 => (at.chunk - 1, self.chunks[at.chunk - 1].len()),
            _ => (at.chunk, at.index),
        };
        let run = &mut self.chunks[chunk];
        if run.len() < CHUNK_ENTRIES {
            if run.len() == run.capacity() {
                // Grow by doubling up to a whole chunk, so a small file's chunk stays small.
                let target = (run.capacity() * 2).clamp(1, CHUNK_ENTRIES);
                run.reserve_exact(target - run.len());
            }
            run.insert(index, entry);
            if index == 0 {
                self.firsts[chunk] = entry.file_offset;
            }
            return;
        }
        // The chunk is full. At either end, start a new chunk and leave this
        // one full, so that appending or prepending in order packs chunks
        // densely. In the middle, split it in half.
        if index == CHUNK_ENTRIES {
            self.chunks.insert(chunk + 1, vec![entry]);
            self.firsts.insert(chunk + 1, entry.file_offset);
        } else if index == 0 {
            self.chunks.insert(chunk, vec![entry]);
            self.firsts.insert(chunk, entry.file_offset);
        } else {
            let half = CHUNK_ENTRIES / 2;
            let mut upper = Vec::with_capacity(CHUNK_ENTRIES);
            upper.extend(run.drain(half..));
            if index <= half {
                run.insert(index, entry);
            } else {
                upper.insert(index - half, entry);
            }
            self.firsts.insert(chunk + 1, upper[0].file_offset);
            self.chunks.insert(chunk + 1, upper);
        }
    }

    /// Removes the entries from `from` up to but not including `to`.
    fn remove_range(&mut self, from: Position, to: Position) {
        if from.chunk == to.chunk {
            self.chunks[from.chunk].drain(from.index..to.index);
            self.len -= to.index - from.index;
            self.tidy_chunk(from.chunk);
            return;
        }
        let mut removed = self.chunks[from.chunk].len() - from.index;
        self.chunks[from.chunk].truncate(from.index);
        removed += self.chunks[from.chunk + 1..to.chunk].iter().map(Vec::len).sum::<usize>();
        if to.chunk < self.chunks.len() {
            removed += to.index;
            self.chunks[to.chunk].drain(..to.index);
        }
        self.chunks.drain(from.chunk + 1..to.chunk);
        self.firsts.drain(from.chunk + 1..to.chunk);
        self.len -= removed;
        // Tidy the later chunk first, because removing the earlier one shifts it.
        if from.chunk + 1 < self.chunks.len() {
            self.tidy_chunk(from.chunk + 1);
        }
        self.tidy_chunk(from.chunk);
    }

    /// Drops `chunk` if it is empty, or else records its first offset and
    /// shrinks it once it uses half of its capacity. Shrinking to 1.5 times
    /// the length means that a quarter of the entries must go before the
    /// next copy.
    fn tidy_chunk(&mut self, chunk: usize) {
        let run = &mut self.chunks[chunk];
        if run.is_empty() {
            self.chunks.remove(chunk);
            self.firsts.remove(chunk);
            return;
        }
        self.firsts[chunk] = run[0].file_offset;
        if run.capacity() > 4 && run.len() * 2 <= run.capacity() {
            run.shrink_to(run.len() + run.len() / 2);
        }
    }

    /// Frees everything once the map is empty, and drops table slots that
    /// no entry uses once they outnumber the entries.
    fn release_unused(&mut self) {
        if self.len == 0 {
            *self = Self::default();
        } else if self.tables.needs_rebuild(self.len) {
            let mut fresh = Tables::default();
            for entry in self.chunks.iter_mut().flatten() {
                let extent = self.tables.decode(entry);
                *entry = fresh.encode(entry.file_offset, extent);
            }
            self.tables = fresh;
        }
    }
}

impl Clone for ExtentMap {
    /// Copies the map with room for an eighth more chunks, because a clone
    /// is usually changed next. Without it, the first chunk split of a large
    /// clone copies the whole chunk list into a new allocation.
    fn clone(&self) -> Self {
        let spare = self.chunks.len() / 8;
        let mut chunks = Vec::with_capacity(self.chunks.len() + spare);
        chunks.extend(self.chunks.iter().cloned());
        let mut firsts = Vec::with_capacity(self.firsts.len() + spare);
        firsts.extend_from_slice(&self.firsts);
        Self { chunks, firsts, len: self.len, tables: self.tables.clone() }
    }
}

impl PartialEq for ExtentMap {
    /// Compares the extents, not the layout: equal maps may be chunked or
    /// number their segments differently.
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

impl Eq for ExtentMap {}

impl fmt::Debug for ExtentMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    /// Changes applied to both the extent map and a plain model that
    /// remembers, for every byte, which write produced it.
    #[derive(Clone, Debug)]
    enum Op {
        /// A write whose extent is `wide` when its data lies outside its
        /// record, which the map must store unchanged all the same.
        Write { offset: u64, len: u64, wide: bool },
        Truncate { size: u64 },
        Punch { offset: u64, len: u64 },
    }

    const FOUR_GIB: u64 = 1 << 32;

    fn op_strategy() -> impl Strategy<Value = Op> {
        // Offsets cluster in a small window so writes overlap, and that window
        // sits either at 0 or just below 4 GiB so offsets beyond it are covered.
        let base = prop_oneof![Just(0u64), Just(FOUR_GIB - 64)];
        prop_oneof![
            6 => (base.clone(), 0u64..200, 1u64..80, proptest::bool::weighted(0.1))
                .prop_map(|(b, o, l, wide)| Op::Write { offset: b + o, len: l, wide }),
            1 => (base.clone(), 0u64..260).prop_map(|(b, s)| Op::Truncate { size: b + s }),
            1 => (base, 0u64..200, 1u64..80).prop_map(|(b, o, l)| Op::Punch { offset: b + o, len: l }),
        ]
    }

    /// Returns the extent of write `n` of the model: one of three segments,
    /// data at `n << 20`, and a record that starts 40 bytes earlier. A wide
    /// extent's record starts 512 KiB later instead, so that its trimmed
    /// pieces still have their data before their record.
    fn write_extent(n: u64, len: u64, wide: bool) -> Extent {
        let data_offset = n << 20;
        let record_offset = if wide { data_offset + (1 << 19) } else { data_offset - 40 };
        Extent { len, segment: SegmentId::from_u128(u128::from(n % 3)), data_offset, record_offset, record_len: 80 + n as u32 }
    }

    /// Checks the chunk layout and returns the first broken rule.
    fn layout_error(map: &ExtentMap) -> Option<String> {
        let mut count = 0;
        let mut previous_end = 0;
        if map.firsts.len() != map.chunks.len() {
            return Some(format!("{} first offsets for {} chunks", map.firsts.len(), map.chunks.len()));
        }
        for (number, chunk) in map.chunks.iter().enumerate() {
            if chunk.is_empty() || chunk.len() > CHUNK_ENTRIES {
                return Some(format!("chunk {number} holds {} entries", chunk.len()));
            }
            if map.firsts[number] != chunk[0].file_offset {
                return Some(format!("chunk {number} starts at {} but its first offset reads {}", chunk[0].file_offset, map.firsts[number]));
            }
            for entry in chunk {
                let extent = map.tables.decode(entry);
                if extent.len == 0 || entry.file_offset < previous_end {
                    return Some(format!("entry at {} is empty or overlaps the one before", entry.file_offset));
                }
                previous_end = entry.file_offset + extent.len;
                count += 1;
            }
        }
        if count != map.len() {
            return Some(format!("len() is {} but the chunks hold {count} entries", map.len()));
        }
        if map.tables.needs_rebuild(map.len()) {
            return Some("the tables hold too many unused slots".to_owned());
        }
        None
    }

    proptest! {
        #[test]
        fn extent_map_matches_byte_model(ops in proptest::collection::vec(op_strategy(), 1..80)) {
            let mut map = ExtentMap::new();
            // For every byte: the write number, its index in that write, and whether the write was wide.
            let mut model: HashMap<u64, (u64, u64, bool)> = HashMap::new();
            for (n, op) in ops.iter().enumerate() {
                let n = n as u64 + 1;
                match *op {
                    Op::Write { offset, len, wide } => {
                        map.insert(offset, write_extent(n, len, wide));
                        for i in 0..len {
                            model.insert(offset + i, (n, i, wide));
                        }
                    }
                    Op::Truncate { size } => {
                        map.truncate(size);
                        model.retain(|&at, _| at < size);
                    }
                    Op::Punch { offset, len } => {
                        map.punch(offset, offset + len);
                        map.release_unused();
                        model.retain(|&at, _| at < offset || at >= offset + len);
                    }
                }
                prop_assert_eq!(layout_error(&map), None, "after {:?}", op);
            }
            let model_end = model.keys().max().map(|at| at + 1).unwrap_or(0);
            prop_assert_eq!(map.end(), model_end);
            prop_assert_eq!(map.is_empty(), model.is_empty());
            prop_assert_eq!(&map.clone(), &map);
            for window in [0u64, FOUR_GIB - 64] {
                let pieces = map.pieces(window, 300);
                let covered: u64 = pieces.iter().map(|p| p.len).sum();
                prop_assert_eq!(covered, 300);
                let mut cursor = window;
                for piece in pieces {
                    prop_assert_eq!(piece.file_offset, cursor);
                    cursor += piece.len;
                    for i in 0..piece.len {
                        let at = piece.file_offset + i;
                        let got = piece.extent.map(|e| {
                            let n = e.data_offset >> 20;
                            let original = write_extent(n, 1, e.record_offset > e.data_offset);
                            // A trimmed extent keeps its write's segment and record.
                            assert_eq!((e.segment, e.record_offset, e.record_len), (original.segment, original.record_offset, original.record_len));
                            (n, (e.data_offset & ((1 << 20) - 1)) + i, e.record_offset > e.data_offset)
                        });
                        prop_assert_eq!(got, model.get(&at).copied(), "byte {}", at);
                    }
                }
            }
        }
    }

    #[test]
    fn ordered_inserts_fill_chunks() {
        let segment = SegmentId::from_u128(9);
        let count = CHUNK_ENTRIES as u64 * 5 + 1;
        let extent = |index: u64| Extent { len: 10, segment, data_offset: index * 10, record_offset: index * 10, record_len: 10 };
        let mut ascending = ExtentMap::new();
        let mut descending = ExtentMap::new();
        for index in 0..count {
            ascending.insert(index * 10, extent(index));
            descending.insert((count - 1 - index) * 10, extent(count - 1 - index));
        }
        assert_eq!(ascending.chunks.len(), 6);
        assert_eq!(descending.chunks.len(), 6);
        assert_eq!(ascending, descending);
        assert_eq!(layout_error(&ascending), None);
    }

    #[test]
    fn emptied_map_frees_everything() {
        let mut map = ExtentMap::new();
        for index in 0..20u64 {
            let segment = SegmentId::from_u128(u128::from(index));
            map.insert(index * 10, Extent { len: 10, segment, data_offset: 0, record_offset: 0, record_len: 10 });
        }
        map.truncate(0);
        assert!(map.is_empty());
        assert_eq!(map.chunks.capacity(), 0);
        assert_eq!(map.tables.slot_count(), 0);
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
