//! Criterion micro-benchmarks of the engine's hot paths: segment record
//! encoding and parsing, CRC32 throughput, the per-file extent index at a
//! million extents, and decoding checkpoint inode pages.
//!
//! Run with `cargo bench -p chalk-benches --bench engine`. The memory the
//! extent index uses per extent is measured by the `extent_memory` test of
//! this crate, because it needs a counting allocator.

use std::collections::BTreeMap;
use std::hint::black_box;

use chalk_engine::extent::{Extent, ExtentMap};
use chalk_engine::format::checkpoint::{decode_page, encode_page, InodeRecord, StoredContent};
use chalk_engine::format::record::{encode_record, parse_record, Parsed, RecordType};
use chalk_engine::{Attr, FileKind, Ino, SegmentId, Timestamp};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

/// Extents in the index benchmarks.
const EXTENTS: u64 = 1_000_000;
/// Bytes per extent in the index benchmarks: one 4 KiB write each.
const EXTENT_BYTES: u64 = 4096;
/// Inodes in one checkpoint page, as the engine writes them.
const PAGE_INODES: u64 = 256;

fn extent(segment: SegmentId, index: u64) -> Extent {
    Extent {
        len: EXTENT_BYTES,
        segment,
        data_offset: index * (EXTENT_BYTES + 64) + 40,
        record_offset: index * (EXTENT_BYTES + 64),
        record_len: (EXTENT_BYTES + 64) as u32,
    }
}

/// Returns an index of [`EXTENTS`] adjacent extents, as sequential 4 KiB writes leave it.
fn full_index() -> ExtentMap {
    let segment = SegmentId::generate();
    let mut map = ExtentMap::new();
    for index in 0..EXTENTS {
        map.insert(index * EXTENT_BYTES, extent(segment, index));
    }
    map
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for payload_bytes in [4096usize, 1 << 20] {
        let payload = vec![0xa5u8; payload_bytes];
        group.throughput(Throughput::Bytes(payload_bytes as u64));
        group.bench_with_input(BenchmarkId::new("encode", payload_bytes), &payload, |b, payload| {
            let mut out = Vec::with_capacity(payload.len() + 64);
            b.iter(|| {
                out.clear();
                encode_record(&mut out, RecordType::Data, &[black_box(payload)]);
                black_box(out.len())
            });
        });
        let mut encoded = Vec::new();
        encode_record(&mut encoded, RecordType::Data, &[&payload]);
        group.bench_with_input(BenchmarkId::new("parse", payload_bytes), &encoded, |b, encoded| {
            b.iter(|| match parse_record(black_box(encoded), 0) {
                Parsed::Record(record) => record.payload_len,
                other => panic!("the encoded record does not parse: {other:?}"),
            });
        });
    }
    group.finish();
}

fn crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32");
    for bytes in [4096usize, 1 << 20] {
        let data = vec![0x5au8; bytes];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_with_input(BenchmarkId::from_parameter(bytes), &data, |b, data| {
            b.iter(|| crc32fast::hash(black_box(data)));
        });
    }
    group.finish();
}

fn extent_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("extent_index");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EXTENTS));
    group.bench_function("insert_1m_sequential", |b| b.iter(|| black_box(full_index().len())));

    let map = full_index();
    let offsets: Vec<u64> = {
        // Seeded xorshift, so every run looks up the same offsets.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        (0..EXTENTS)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % (EXTENTS * EXTENT_BYTES)
            })
            .collect()
    };
    group.bench_function("lookup_1m_random_4k", |b| {
        b.iter(|| {
            let mut found = 0;
            for &offset in &offsets {
                found += map.pieces(offset, EXTENT_BYTES).len();
            }
            black_box(found)
        })
    });

    let segment = SegmentId::generate();
    group.throughput(Throughput::Elements(1));
    group.bench_function("overwrite_middle_of_1m", |b| {
        b.iter_batched_ref(
            || map.clone(),
            |map| map.insert(EXTENTS / 2 * EXTENT_BYTES + 100, extent(segment, 7)),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

/// Returns an encoded page of [`PAGE_INODES`] files with `extents` extents each.
fn page(extents: u64) -> Vec<u8> {
    let segment = SegmentId::generate();
    let time = Timestamp { secs: 1_700_000_000, nanos: 0 };
    let mut records = BTreeMap::new();
    for index in 0..PAGE_INODES {
        let ino = Ino(1000 + index);
        let mut map = ExtentMap::new();
        for e in 0..extents {
            map.insert(e * EXTENT_BYTES, extent(segment, index * extents + e));
        }
        let attr = Attr {
            ino,
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            size: extents * EXTENT_BYTES,
            nlink: 1,
            rdev: 0,
            atime: time,
            mtime: time,
            ctime: time,
        };
        let record = InodeRecord {
            attr,
            links: vec![(Ino(1), format!("file-{index:05}").into_bytes())],
            xattrs: BTreeMap::new(),
            content: StoredContent::File(map),
        };
        records.insert(ino, record);
    }
    encode_page(&records)
}

fn checkpoint(c: &mut Criterion) {
    let mut group = c.benchmark_group("checkpoint_page_decode");
    for extents in [1u64, 16] {
        let encoded = page(extents);
        group.throughput(Throughput::Elements(PAGE_INODES));
        group.bench_with_input(BenchmarkId::new("extents_per_file", extents), &encoded, |b, encoded| {
            b.iter(|| decode_page(black_box(encoded)).expect("the page decodes").len())
        });
    }
    group.finish();
}

criterion_group!(benches, records, crc, extent_index, checkpoint);
criterion_main!(benches);
