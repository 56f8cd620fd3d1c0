//! Compact in-memory form of an [`Extent`]: 32 bytes in place of 48 plus
//! the 8-byte key.
//!
//! A packed entry stores its segment as a 32-bit slot in a per-map segment
//! table, its length and record length as u32, and its data offset as a
//! u32 distance from the record's start. Every extent that the engine
//! writes fits, because a record is at most `u32::MAX` bytes and contains
//! its data. An extent that does not fit is kept whole in a side table:
//! data outside its record, as a corrupt checkpoint can contain, or a
//! length above `u32::MAX`. So the map stores any `Extent` unchanged, and
//! fsck can still report a bad one.

use super::Extent;
use crate::ids::SegmentId;

/// Marks a slot that indexes [`Tables::wide`] instead of [`Tables::segments`].
const WIDE: u32 = 1 << 31;

/// One extent and its file offset, packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) file_offset: u64,
    record_offset: u64,
    /// Length in bytes, or 0 for a wide entry.
    len: u32,
    /// Index into the segment table, or `WIDE | index` into the wide table.
    slot: u32,
    /// `data_offset - record_offset`.
    data_delta: u32,
    record_len: u32,
}

/// Segment ids and wide extents that the entries of one map refer to.
///
/// Slots are never reused, so a slot whose last entry went away stays until
/// [`Tables::needs_rebuild`] reports that the map should re-encode its entries.
#[derive(Clone, Debug, Default)]
pub(super) struct Tables {
    segments: Vec<SegmentId>,
    /// Indexes into `segments`, sorted by segment id for binary search.
    by_id: Vec<u32>,
    wide: Vec<Extent>,
}

impl Tables {
    /// Packs `extent` at `file_offset`, adding its segment or itself to a table when needed.
    pub(super) fn encode(&mut self, file_offset: u64, extent: Extent) -> Entry {
        let len = u32::try_from(extent.len);
        let data_delta = extent.data_offset.checked_sub(extent.record_offset).and_then(|d| u32::try_from(d).ok());
        match (len, data_delta) {
            (Ok(len), Some(data_delta)) => Entry {
                file_offset,
                record_offset: extent.record_offset,
                len,
                slot: self.segment_slot(extent.segment),
                data_delta,
                record_len: extent.record_len,
            },
            _ => {
                let index = slot_index(self.wide.len());
                self.wide.push(extent);
                Entry { file_offset, record_offset: 0, len: 0, slot: WIDE | index, data_delta: 0, record_len: 0 }
            }
        }
    }

    /// Unpacks `entry` into the extent it was encoded from.
    pub(super) fn decode(&self, entry: &Entry) -> Extent {
        if entry.slot & WIDE != 0 {
            return self.wide[(entry.slot & !WIDE) as usize];
        }
        Extent {
            len: u64::from(entry.len),
            segment: self.segments[entry.slot as usize],
            data_offset: entry.record_offset + u64::from(entry.data_delta),
            record_offset: entry.record_offset,
            record_len: entry.record_len,
        }
    }

    /// Returns whether the tables hold more than twice as many slots as
    /// `live_entries` could use (plus some slack), so that re-encoding every
    /// entry into fresh tables costs no more than the inserts that grew them.
    pub(super) fn needs_rebuild(&self, live_entries: usize) -> bool {
        self.slot_count() > 2 * live_entries + 16
    }

    /// Number of segment and wide slots, used or not.
    pub(super) fn slot_count(&self) -> usize {
        self.segments.len() + self.wide.len()
    }

    /// Returns the slot of `segment`, adding it to the table if it is new.
    fn segment_slot(&mut self, segment: SegmentId) -> u32 {
        // Writes usually go to the newest segment, which is the last one added.
        if let Some(last) = self.segments.len().checked_sub(1) {
            if self.segments[last] == segment {
                return slot_index(last);
            }
        }
        match self.by_id.binary_search_by(|&slot| self.segments[slot as usize].cmp(&segment)) {
            Ok(found) => self.by_id[found],
            Err(position) => {
                let slot = slot_index(self.segments.len());
                // Double from one slot, because most files use one or two segments.
                if self.segments.len() == self.segments.capacity() {
                    self.segments.reserve_exact(self.segments.len().max(1));
                    self.by_id.reserve_exact(self.segments.len().max(1));
                }
                self.segments.push(segment);
                self.by_id.insert(position, slot);
                slot
            }
        }
    }
}

/// Converts a table index to a slot, which must leave the [`WIDE`] bit clear.
fn slot_index(index: usize) -> u32 {
    u32::try_from(index).ok().filter(|&slot| slot & WIDE == 0).expect("extent map tables hold at most 2^31 slots")
}

impl Entry {
    /// Offset just past the entry's last byte, read without decoding a compact entry.
    pub(super) fn end(&self, tables: &Tables) -> u64 {
        if self.slot & WIDE != 0 {
            return self.file_offset + tables.decode(self).len;
        }
        self.file_offset + u64::from(self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(segment: u128, len: u64, data_offset: u64, record_offset: u64) -> Extent {
        Extent { len, segment: SegmentId::from_u128(segment), data_offset, record_offset, record_len: 4160 }
    }

    #[test]
    fn entry_is_32_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn compact_and_wide_round_trip() {
        let mut tables = Tables::default();
        let cases = [
            extent(3, 4096, 1040, 1000),
            extent(1, 1, 7, 7),
            extent(2, 4096, 1000, 1040),
            extent(2, 1 << 33, 0, 0),
            extent(3, 10, (1 << 32) + 5, 5),
            extent(1, u32::MAX as u64, u64::MAX - u32::MAX as u64, u64::MAX - u32::MAX as u64),
        ];
        for (index, case) in cases.into_iter().enumerate() {
            let entry = tables.encode(index as u64 * 10, case);
            assert_eq!(entry.file_offset, index as u64 * 10);
            assert_eq!(tables.decode(&entry), case, "case {index}");
            assert_eq!(entry.end(&tables), index as u64 * 10 + case.len, "case {index}");
        }
        // Cases 2 to 4 are wide: data before the record, a length above
        // u32::MAX, and data more than u32::MAX bytes into the record.
        assert_eq!(tables.segments, vec![SegmentId::from_u128(3), SegmentId::from_u128(1)]);
        assert_eq!(tables.wide.len(), 3);
    }

    #[test]
    fn segment_slots_are_shared() {
        let mut tables = Tables::default();
        let first = tables.encode(0, extent(5, 1, 0, 0));
        let other = tables.encode(1, extent(4, 1, 0, 0));
        let again = tables.encode(2, extent(5, 1, 0, 0));
        assert_eq!(first.slot, again.slot);
        assert_ne!(first.slot, other.slot);
        assert_eq!(tables.segments.len(), 2);
    }
}
