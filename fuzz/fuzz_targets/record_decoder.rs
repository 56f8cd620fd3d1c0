//! Segment bytes from the disk or the object store. libFuzzer reports any
//! panic of the record parser, the recovery scan or the payload decoders,
//! and the target asserts that every record the scan accepts verifies on
//! its own.

#![no_main]

use chalk_engine::format::record::{self, MetaOp, RecordType, Seal, SegmentHeader};
use chalk_engine::segment;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let report = segment::scan(data);
    let mut expected_offset = 0;
    for raw in &report.records {
        assert_eq!(raw.offset, expected_offset, "records must be contiguous from offset 0");
        assert!(raw.end() <= data.len());
        assert!(record::verify_record(&data[raw.offset..raw.end()]).is_ok(), "accepted record fails verification");
        expected_offset = raw.end();
        decode_payload(raw.record_type, &data[raw.payload_offset..raw.end()]);
    }
    assert_eq!(report.valid_end as usize, expected_offset);
    if let Some((offset, _)) = &report.invalid {
        assert!(*offset as usize >= expected_offset, "invalid bytes reported inside a valid record");
    }

    // Record CRCs keep random bytes away from the payload decoders, so the
    // input is also decoded as a bare payload of every type.
    for record_type in [RecordType::SegmentHeader, RecordType::Meta, RecordType::Seal] {
        decode_payload(record_type, data);
    }
});

/// Decodes a payload; whatever decodes must encode and decode to itself.
fn decode_payload(record_type: RecordType, payload: &[u8]) {
    match record_type {
        RecordType::SegmentHeader => {
            if let Ok(header) = SegmentHeader::decode(payload) {
                assert_eq!(SegmentHeader::decode(&header.encode()).unwrap(), header);
            }
        }
        RecordType::Meta => {
            if let Ok(op) = MetaOp::decode(payload) {
                assert_eq!(MetaOp::decode(&op.encode()).unwrap(), op);
            }
        }
        RecordType::Seal => {
            if let Ok(seal) = Seal::decode(payload) {
                assert_eq!(Seal::decode(&seal.encode()).unwrap(), seal);
            }
        }
        RecordType::Data => {}
    }
}
