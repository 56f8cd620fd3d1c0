//! Memory that the extent index uses per extent, measured with a counting
//! allocator over a million extents, and per file for small files.
//!
//! The target is at most 64 bytes per extent, so that a 1 TiB volume written
//! in 1 MiB records needs about 64 MiB of index.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use chalk_engine::extent::{Extent, ExtentMap};
use chalk_engine::SegmentId;

/// The system allocator, counting the bytes that each thread allocated and
/// has not freed yet.
struct Counting;

thread_local! {
    /// Per thread, so that tests running in parallel threads do not count
    /// each other's allocations.
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

/// Returns the heap bytes that this thread allocated and has not freed yet.
fn live_bytes() -> isize {
    LIVE_BYTES.with(Cell::get)
}

// SAFETY: every method forwards to the system allocator with the same
// arguments, and only adds bookkeeping that does not touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, which is passed on unchanged.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            LIVE_BYTES.with(|live| live.set(live.get() + layout.size() as isize));
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: `pointer` came from `alloc` of this allocator with `layout`.
        unsafe { System.dealloc(pointer, layout) };
        LIVE_BYTES.with(|live| live.set(live.get() - layout.size() as isize));
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const EXTENTS: u64 = 1_000_000;
const MAX_BYTES_PER_EXTENT: f64 = 64.0;
/// Heap bytes that a map of one extent may use, since a volume of many
/// small files has one map per file.
const MAX_ONE_EXTENT_HEAP_BYTES: isize = 128;

/// Returns the `index`th 4 KiB extent of a segment of 4160-byte records.
fn extent(segment: SegmentId, index: u64) -> Extent {
    Extent { len: 4096, segment, data_offset: index * 4160 + 40, record_offset: index * 4160, record_len: 4160 }
}

/// Returns the live heap bytes per extent of an index of [`EXTENTS`]
/// extents that `offset_of` places.
fn bytes_per_extent(offset_of: impl Fn(u64) -> u64) -> f64 {
    let segment = SegmentId::generate();
    let before = live_bytes();
    let mut map = ExtentMap::new();
    for index in 0..EXTENTS {
        map.insert(offset_of(index), extent(segment, index));
    }
    let used = live_bytes() - before;
    assert_eq!(map.len() as u64, EXTENTS);
    drop(map);
    used as f64 / EXTENTS as f64
}

#[test]
fn sequential_extents_stay_bounded() {
    let per_extent = bytes_per_extent(|index| index * 4096);
    println!("extent index, sequential inserts: {per_extent:.1} bytes per extent");
    assert!(
        per_extent <= MAX_BYTES_PER_EXTENT,
        "the extent index uses {per_extent:.1} bytes per extent, more than {MAX_BYTES_PER_EXTENT}"
    );
}

#[test]
fn scattered_extents_stay_bounded() {
    // A multiplicative permutation of 0..EXTENTS inserts in scattered order,
    // which splits B-tree nodes at other points than appending does.
    let per_extent = bytes_per_extent(|index| (index * 7_919 % EXTENTS) * 4096);
    println!("extent index, scattered inserts: {per_extent:.1} bytes per extent");
    assert!(
        per_extent <= MAX_BYTES_PER_EXTENT,
        "the extent index uses {per_extent:.1} bytes per extent, more than {MAX_BYTES_PER_EXTENT}"
    );
}

#[test]
fn small_maps_stay_bounded() {
    let inline = std::mem::size_of::<ExtentMap>();
    let segment = SegmentId::generate();

    let before = live_bytes();
    let empty = ExtentMap::new();
    let empty_heap = live_bytes() - before;

    let before = live_bytes();
    let mut one_extent = ExtentMap::new();
    one_extent.insert(0, extent(segment, 0));
    let one_heap = live_bytes() - before;

    println!("extent index, empty map: {inline} bytes inline and {empty_heap} on the heap");
    println!("extent index, one extent: {inline} bytes inline and {one_heap} on the heap");
    assert_eq!(empty_heap, 0, "an empty map allocates");
    assert!(
        one_heap <= MAX_ONE_EXTENT_HEAP_BYTES,
        "a map of one extent uses {one_heap} heap bytes, more than {MAX_ONE_EXTENT_HEAP_BYTES}"
    );
    assert_eq!(one_extent.len(), 1);
    drop((empty, one_extent));
}
