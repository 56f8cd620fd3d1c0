//! Checkpoint objects from the object store: roots, inode pages and
//! directory chunks. libFuzzer reports any panic of a decoder, and the
//! target asserts that whatever decodes encodes and decodes to itself.

#![no_main]

use chalk_engine::format::checkpoint::{self, decode_chunk, decode_page, encode_chunk, encode_page, frame, ObjectType, RootCheckpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input as a whole object, frame included.
    check_root(data);
    check_page(data);
    check_chunk(data);
    let _ = checkpoint::unframe(ObjectType::VersionRecord, data);

    // The frame's CRC keeps random bytes away from the payload decoders,
    // so the input is also framed as a valid payload of each type.
    check_root(&frame(ObjectType::CheckpointRoot, data));
    check_page(&frame(ObjectType::InodePage, data));
    check_chunk(&frame(ObjectType::DirChunk, data));
});

fn check_root(bytes: &[u8]) {
    if let Ok(root) = RootCheckpoint::decode(bytes) {
        assert_eq!(RootCheckpoint::decode(&root.encode()).unwrap(), root);
    }
}

fn check_page(bytes: &[u8]) {
    if let Ok(records) = decode_page(bytes) {
        assert_eq!(decode_page(&encode_page(&records)).unwrap(), records);
    }
}

fn check_chunk(bytes: &[u8]) {
    if let Ok(entries) = decode_chunk(bytes) {
        assert_eq!(decode_chunk(&encode_chunk(&entries)).unwrap(), entries);
    }
}
