//! `ExtentMap` against a byte-array model, with enough extents that the
//! map's chunks fill, split and empty at their release size.

use chalk_engine::extent::{Extent, ExtentMap};
use chalk_engine::SegmentId;
use proptest::prelude::*;

/// Bytes of file that the model covers. Writes of up to 600 bytes in it
/// leave several hundred extents, more than one chunk holds.
const WINDOW: u64 = 64 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Write { offset: u64, len: u64 },
    Truncate { size: u64 },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        40 => (0..WINDOW, 1u64..600).prop_map(|(offset, len)| Op::Write { offset, len }),
        1 => (0..WINDOW).prop_map(|size| Op::Truncate { size }),
    ]
}

/// Returns the extent of write `n`: data at `n << 20` in one of five segments, in a
/// record that starts 40 bytes before it.
fn write_extent(n: u64, len: u64) -> Extent {
    let data_offset = n << 20;
    Extent {
        len,
        segment: SegmentId::from_u128(u128::from(n % 5)),
        data_offset,
        record_offset: data_offset - 40,
        record_len: len as u32 + 40,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn map_matches_byte_array(ops in proptest::collection::vec(op_strategy(), 300..1500)) {
        let mut map = ExtentMap::new();
        // For every byte: the write that produced it and the index in that write.
        let mut model: Vec<Option<(u64, u64)>> = vec![None; WINDOW as usize + 600];
        for (n, op) in ops.iter().enumerate() {
            let n = n as u64 + 1;
            match *op {
                Op::Write { offset, len } => {
                    map.insert(offset, write_extent(n, len));
                    for i in 0..len {
                        model[(offset + i) as usize] = Some((n, i));
                    }
                }
                Op::Truncate { size } => {
                    map.truncate(size);
                    model[size as usize..].fill(None);
                }
            }
        }

        let model_end = model.iter().rposition(Option::is_some).map(|at| at as u64 + 1).unwrap_or(0);
        prop_assert_eq!(map.end(), model_end);
        let mut previous_end = 0;
        for (offset, extent) in map.iter() {
            prop_assert!(extent.len > 0, "empty extent at {}", offset);
            prop_assert!(offset >= previous_end, "extent at {} overlaps the one before", offset);
            previous_end = offset + extent.len;
        }
        prop_assert_eq!(map.iter().count(), map.len());

        // Read the whole model in 4 KiB windows, as reads through a mount do.
        for window in (0..model.len() as u64).step_by(4096) {
            let pieces = map.pieces(window, 4096);
            let mut cursor = window;
            for piece in pieces {
                prop_assert_eq!(piece.file_offset, cursor);
                cursor += piece.len;
                for i in 0..piece.len {
                    let at = piece.file_offset + i;
                    let got = piece.extent.map(|e| {
                        let n = e.data_offset >> 20;
                        prop_assert_eq!(e.segment, SegmentId::from_u128(u128::from(n % 5)));
                        prop_assert_eq!(e.record_offset, (n << 20) - 40, "trimmed extent lost its record");
                        Ok((n, (e.data_offset & ((1 << 20) - 1)) + i))
                    }).transpose()?;
                    prop_assert_eq!(got, model.get(at as usize).copied().flatten(), "byte {}", at);
                }
            }
            prop_assert_eq!(cursor, window + 4096);
        }

        let copy = map.clone();
        prop_assert_eq!(&copy, &map);
    }
}
