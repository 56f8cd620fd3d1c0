//! The disk tier: blocks and whole segments under `$CHALK_HOME/cache`,
//! shared by every process that uses that directory, bounded in bytes,
//! evicted least recently used first and kept across restarts.
//!
//! Layout under the cache directory:
//!
//! | path                    | contents                                                   |
//! |-------------------------|------------------------------------------------------------|
//! | `segments/<segment>.seg`| a whole sealed segment, written on this host               |
//! | `blocks/<segment>.blk`  | cached blocks of a segment: a sparse file of block slots   |
//!
//! Block `i` of a segment lives in the slot at offset `i * SLOT_BYTES` of
//! its `.blk` file: a 4 KiB header page, then the block's bytes from offset
//! 4096 of the slot. A slot never written is a hole, which reads as zeros
//! and takes no space. One file per segment, rather than one per block,
//! keeps file creation (costly on ext4 once many files were deleted) off
//! the read path. Slot header, integers little-endian:
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 8    | magic `CHLKBLK1`                                   |
//! | 8      | 2    | format version, 1                                  |
//! | 10     | 2    | zero                                               |
//! | 12     | 4    | payload length in bytes, at most `BLOCK_BYTES`     |
//! | 16     | 16   | segment id (u128)                                  |
//! | 32     | 8    | block index                                        |
//! | 40     | 4    | CRC32 of the payload                               |
//! | 44     | 4    | CRC32 of bytes 0..44                               |
//!
//! Write order: the payload, then the header. There is no fsync: a slot
//! torn by a crash or by a concurrent writer fails its checks and is
//! fetched again.
//!
//! Invariants:
//! - A slot is returned only after its header CRC, magic, version, key,
//!   length and payload CRC all match. A slot that fails is punched out.
//! - Recency is the file's modification time, which every write sets and a
//!   hit refreshes once it is older than [`TOUCH_AFTER`].
//! - Usage is the space files take on disk (sparse files count only their
//!   written slots), estimated from this process's writes. A file with
//!   more than one hard link (a whole segment that the `file://` object
//!   store linked as an object) counts as 0 bytes and is never evicted.
//!   Deleting it would free no space, and its bytes belong to the store.
//!   Once the
//!   estimate passes the limit, the process rescans the directories
//!   (finding the files of other processes too) and deletes the least
//!   recently used files until usage is at most 90% of the limit.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::Mutex;

use super::config::filesystem_space;
use super::{BlockKey, BLOCK_BYTES};
use crate::error::{EngineError, Result};
use crate::ids::SegmentId;
use crate::io::{AlignedBuf, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"CHLKBLK1";
const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 48;
/// The header takes a whole page, so that payloads stay page-aligned.
pub const SLOT_HEADER_BYTES: u64 = 4096;
/// Distance between the slots of consecutive blocks in a `.blk` file.
pub const SLOT_BYTES: u64 = SLOT_HEADER_BYTES + BLOCK_BYTES;

/// Directory under the cache that contains the passthrough copies of read-only mounts.
pub const PASSTHROUGH_DIR: &str = "passthrough";

/// A hit refreshes the modification time of a file older than this.
const TOUCH_AFTER: Duration = Duration::from_secs(60);
/// Temporary files older than this are left by a crashed process and deleted by scans.
const STALE_TEMP_AFTER: Duration = Duration::from_secs(3600);
/// Eviction brings usage down to this share of the limit, in percent.
const EVICT_TO_PERCENT: u64 = 90;

/// Result of a lookup.
pub(crate) enum Load {
    /// The block's bytes.
    Hit(Bytes),
    Miss,
    /// A slot was there but failed its checks; it has been punched out.
    Corrupt,
}

/// Files that an eviction pass deleted.
#[derive(Debug, Default)]
pub(crate) struct Evicted {
    pub files: u64,
    pub bytes: u64,
    /// Whole segments deleted, which must no longer be read from their files.
    pub segments: Vec<SegmentId>,
}

/// Space and files of the disk tier, from a scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Space the files take on disk, metadata copies included, without the
    /// files counted in `shared_bytes`.
    pub bytes: u64,
    /// `.blk` files, one per segment with cached blocks.
    pub block_files: u64,
    /// Space the `.blk` files take.
    pub block_bytes: u64,
    /// Whole segment files, shared ones included.
    pub segments: u64,
    /// Space the whole segment files take, without the shared ones.
    pub segment_bytes: u64,
    /// Backing files that a read-only mount made for FUSE passthrough.
    pub passthrough_files: u64,
    pub passthrough_bytes: u64,
    /// Local copies of metadata objects (checkpoint pages, directory
    /// listings, lineage entries) that reads fall back on in an outage.
    pub metadata_files: u64,
    pub metadata_bytes: u64,
    /// Whole segment files that have other hard links, such as the object
    /// of a `file://` store.
    pub shared_segments: u64,
    /// Space those shared files take on disk. Deleting them would free
    /// none of it.
    pub shared_bytes: u64,
}

/// One file found by a scan.
struct Entry {
    path: PathBuf,
    /// Space the file takes on disk, or 0 for a shared file.
    bytes: u64,
    /// Set for a file with other hard links, whose bytes the tier does not own.
    shared: bool,
    /// Space a shared file takes on disk, else 0.
    shared_bytes: u64,
    modified: SystemTime,
    /// Set for a whole segment.
    segment: Option<SegmentId>,
}

pub(crate) struct DiskTier {
    blocks_dir: PathBuf,
    segments_dir: PathBuf,
    /// Metadata copies of `CachedStore`, evicted with the blocks.
    objects_dir: PathBuf,
    limit_bytes: u64,
    /// Blocks are not written while the file system has less than this free.
    free_min_bytes: u64,
    /// Estimated bytes in use; `None` until the first write scans the directories.
    used_bytes: Mutex<Option<u64>>,
    /// Held by the thread that runs an eviction pass.
    evicting: Mutex<()>,
    low_space_warned: AtomicBool,
}

impl DiskTier {
    pub fn new(cache_root: &Path, limit_bytes: u64, free_min_bytes: u64) -> Result<Self> {
        let blocks_dir = cache_root.join("blocks");
        let segments_dir = cache_root.join("segments");
        let objects_dir = cache_root.join(crate::store::METADATA_CACHE_DIR);
        for dir in [&blocks_dir, &segments_dir] {
            fs::create_dir_all(dir).map_err(|e| EngineError::io("creating cache directory", dir, e))?;
        }
        Ok(DiskTier {
            blocks_dir,
            segments_dir,
            objects_dir,
            limit_bytes,
            free_min_bytes,
            used_bytes: Mutex::new(None),
            evicting: Mutex::new(()),
            low_space_warned: AtomicBool::new(false),
        })
    }

    pub fn segments_dir(&self) -> &Path {
        &self.segments_dir
    }

    fn blocks_path(&self, segment: SegmentId) -> PathBuf {
        self.blocks_dir.join(format!("{segment}.blk"))
    }

    /// Reads and checks the slot of a block.
    pub fn load(&self, key: &BlockKey) -> Load {
        let path = self.blocks_path(key.segment);
        let Ok(file) = File::open(&path) else { return Load::Miss };
        let slot = key.index * SLOT_BYTES;
        let mut header = [0u8; HEADER_LEN];
        match file.read_exact_at(&mut header, slot) {
            Ok(()) => {}
            // The file ends before this slot: never written.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Load::Miss,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "failed to read a cached block; fetching it again");
                return Load::Miss;
            }
        }
        if header.iter().all(|&b| b == 0) {
            return Load::Miss;
        }
        let checked = check_header(key, &header).and_then(|(len, crc)| {
            let mut payload = vec![0u8; len];
            file.read_exact_at(&mut payload, slot + SLOT_HEADER_BYTES)
                .map_err(|e| format!("reading the payload failed: {e}"))?;
            let found = crc32fast::hash(&payload);
            if found != crc {
                return Err(format!("payload CRC32 {found:08x} does not match {crc:08x}"));
            }
            Ok(payload)
        });
        match checked {
            Ok(payload) => {
                touch_if_old(&file);
                Load::Hit(Bytes::from(payload))
            }
            Err(detail) => {
                tracing::warn!(path = %path.display(), block = key.index, detail = %detail, "dropping a corrupt cached block");
                self.remove(key);
                Load::Corrupt
            }
        }
    }

    /// Checks every written slot of a segment's block file without changing
    /// it; returns the index and the reason of each slot that fails.
    pub fn check_file(&self, segment: SegmentId) -> Vec<(u64, String)> {
        let path = self.blocks_path(segment);
        let Ok(file) = File::open(&path) else { return Vec::new() };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut bad = Vec::new();
        for index in 0..len.div_ceil(SLOT_BYTES) {
            let key = BlockKey { segment, index };
            let slot = index * SLOT_BYTES;
            let mut header = [0u8; HEADER_LEN];
            if file.read_exact_at(&mut header, slot).is_err() || header.iter().all(|&b| b == 0) {
                continue;
            }
            let checked = check_header(&key, &header).and_then(|(len, crc)| {
                let mut payload = vec![0u8; len];
                file.read_exact_at(&mut payload, slot + SLOT_HEADER_BYTES)
                    .map_err(|e| format!("reading the payload failed: {e}"))?;
                let found = crc32fast::hash(&payload);
                if found != crc {
                    return Err(format!("payload CRC32 {found:08x} does not match {crc:08x}"));
                }
                Ok(())
            });
            if let Err(detail) = checked {
                bad.push((index, format!("cached block {index} in {}: {detail}", path.display())));
            }
        }
        bad
    }

    /// Writes the slot of a block unless the tier is off or the file system
    /// is nearly full. Returns what the eviction pass that the write
    /// triggered deleted, if any.
    pub fn store(&self, key: &BlockKey, data: &[u8]) -> Evicted {
        self.store_with_crc(key, data, crc32fast::hash(data))
    }

    /// Stores like [`DiskTier::store`], with the CRC32 of `data` that the
    /// fetch computed when it received the bytes.
    pub fn store_with_crc(&self, key: &BlockKey, data: &[u8], crc: u32) -> Evicted {
        assert!(data.len() as u64 <= BLOCK_BYTES, "a block holds at most BLOCK_BYTES");
        // A limit of 0 turns the disk tier off.
        if self.limit_bytes == 0 || !self.has_free_space() {
            return Evicted::default();
        }
        let path = self.blocks_path(key.segment);
        match write_slot(&path, key, data, crc) {
            Ok(()) => self.note_added(SLOT_HEADER_BYTES + data.len() as u64, &path),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "failed to write a block to the disk cache");
                Evicted::default()
            }
        }
    }

    /// Punches out the slot of a block, so the next read fetches it again.
    pub fn remove(&self, key: &BlockKey) {
        let path = self.blocks_path(key.segment);
        let Ok(file) = File::options().write(true).open(&path) else { return };
        // SAFETY: fallocate on a valid descriptor owned by `file`, with a range inside the slot.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (key.index * SLOT_BYTES) as libc::off_t,
                SLOT_BYTES as libc::off_t,
            )
        };
        if rc != 0 {
            // Without hole punching, zeroing the header hides the slot just as well.
            let _ = file.write_all_at(&[0u8; HEADER_LEN], key.index * SLOT_BYTES);
        }
    }

    /// Counts `bytes` just added to the file `written` of the tier (a block
    /// or an adopted whole segment) and evicts when the estimate passes the
    /// limit, sparing `written`.
    pub fn note_added(&self, bytes: u64, written: &Path) -> Evicted {
        let over = {
            let mut used = self.used_bytes.lock();
            let total = match *used {
                Some(total) => total + bytes,
                None => self.scan().iter().map(|e| e.bytes).sum(),
            };
            *used = Some(total);
            total > self.limit_bytes
        };
        if over {
            self.evict(written)
        } else {
            Evicted::default()
        }
    }

    /// Rescans the tier and deletes the least recently used files, except
    /// `spared`, until usage is at most 90% of the limit. Another thread
    /// already evicting makes this a no-op.
    ///
    /// Modification times tick only every few milliseconds, so the file just
    /// written can tie with older ones: sparing it keeps it from going first.
    pub fn evict(&self, spared: &Path) -> Evicted {
        let Some(_guard) = self.evicting.try_lock() else { return Evicted::default() };
        let mut entries = self.scan();
        let mut used: u64 = entries.iter().map(|e| e.bytes).sum();
        let target = (self.limit_bytes as u128 * EVICT_TO_PERCENT as u128 / 100) as u64;
        entries.sort_by_key(|e| e.modified);

        let mut evicted = Evicted::default();
        for entry in entries {
            if used <= target {
                break;
            }
            // Deleting a file with other hard links frees no space.
            if entry.path == spared || entry.shared {
                continue;
            }
            match fs::remove_file(&entry.path) {
                Ok(()) => {
                    used -= entry.bytes;
                    evicted.files += 1;
                    evicted.bytes += entry.bytes;
                    evicted.segments.extend(entry.segment);
                }
                // Another process deleted it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => used -= entry.bytes,
                Err(e) => tracing::warn!(path = %entry.path.display(), error = %e, "failed to evict a cached file"),
            }
        }
        *self.used_bytes.lock() = Some(used);
        if evicted.files > 0 {
            tracing::debug!(files = evicted.files, bytes = evicted.bytes, used, limit = self.limit_bytes, "evicted from the disk cache");
        }
        evicted
    }

    /// Scans the tier and returns its usage.
    pub fn usage(&self) -> DiskUsage {
        let mut usage = DiskUsage::default();
        for entry in self.scan() {
            usage.bytes += entry.bytes;
            usage.shared_bytes += entry.shared_bytes;
            // A scan finds four kinds of files: whole segments, `.blk` files,
            // `.obj` metadata copies and passthrough copies.
            let extension = entry.path.extension().and_then(|e| e.to_str());
            match (entry.segment, extension) {
                (Some(_), _) => {
                    usage.segments += 1;
                    usage.segment_bytes += entry.bytes;
                    usage.shared_segments += u64::from(entry.shared);
                }
                (None, Some("blk")) => {
                    usage.block_files += 1;
                    usage.block_bytes += entry.bytes;
                }
                (None, Some("obj")) => {
                    usage.metadata_files += 1;
                    usage.metadata_bytes += entry.bytes;
                }
                (None, _) => {
                    usage.passthrough_files += 1;
                    usage.passthrough_bytes += entry.bytes;
                }
            }
        }
        usage
    }

    /// Refreshes the recency of a whole segment file that a reader opened.
    pub fn touch_segment(&self, path: &Path) {
        if let Ok(file) = File::open(path) {
            touch_if_old(&file);
        }
    }

    fn has_free_space(&self) -> bool {
        if self.free_min_bytes == 0 {
            return true;
        }
        let Some((total, available)) = filesystem_space(&self.blocks_dir) else { return true };
        let enough = available >= self.free_min_bytes;
        if !enough && !self.low_space_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.blocks_dir.display(), available, total,
                "the file system of the disk cache is nearly full, so new blocks are not cached on disk"
            );
        }
        enough
    }

    /// Lists every cached file, deleting stale temporary files.
    fn scan(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        for file in list_files(&self.segments_dir) {
            // Whole segments are named `<segment>.seg`; anything else is a temporary file.
            let segment = file
                .path
                .file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_suffix(".seg"))
                .and_then(|stem| stem.parse::<SegmentId>().ok());
            match segment {
                Some(id) => entries.push(Entry { segment: Some(id), ..file }),
                None => remove_if_stale(&file),
            }
        }
        for file in list_files(&self.blocks_dir) {
            if file.path.extension().is_some_and(|e| e == "blk") {
                entries.push(file);
            } else {
                remove_if_stale(&file);
            }
        }
        // Passthrough copies of the FUSE adaptor: passthrough/<version>/<inode>.
        let passthrough_dir = self.objects_dir.with_file_name(PASSTHROUGH_DIR);
        for version_dir in fs::read_dir(&passthrough_dir).into_iter().flatten().flatten() {
            for file in list_files(&version_dir.path()) {
                if file.path.extension().is_some_and(|e| e == "tmp") {
                    remove_if_stale(&file);
                } else {
                    entries.push(file);
                }
            }
        }
        for file in list_files(&self.objects_dir) {
            if file.path.extension().is_some_and(|e| e == "obj") {
                entries.push(file);
            } else {
                remove_if_stale(&file);
            }
        }
        entries
    }
}

/// Regular files directly in `dir`, with the space they take and their modification times.
fn list_files(dir: &Path) -> Vec<Entry> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    read.flatten()
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            let bytes = owned_bytes(&metadata);
            metadata.is_file().then(|| Entry {
                path: entry.path(),
                bytes,
                shared: metadata.nlink() > 1,
                shared_bytes: metadata.blocks() * 512 - bytes,
                modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                segment: None,
            })
        })
        .collect()
}

/// Space that a file of the tier adds to the disk: what it takes, or 0 when
/// it has other hard links. The tier creates no hard links of its own, so
/// the other link is outside it (an object of the `file://` store) and
/// owns the bytes. Reporting them as the tier's would count them twice in
/// the disk space of `$CHALK_HOME` and would evict segments to free space
/// that the deletion never frees.
pub(crate) fn owned_bytes(metadata: &fs::Metadata) -> u64 {
    if metadata.nlink() > 1 {
        0
    } else {
        metadata.blocks() * 512
    }
}

fn remove_if_stale(file: &Entry) {
    let age = SystemTime::now().duration_since(file.modified).unwrap_or_default();
    if age > STALE_TEMP_AFTER {
        let _ = fs::remove_file(&file.path);
    }
}

fn touch_if_old(file: &File) {
    let now = SystemTime::now();
    let old = file
        .metadata()
        .and_then(|m| m.modified())
        .map(|modified| now.duration_since(modified).unwrap_or_default() > TOUCH_AFTER)
        .unwrap_or(false);
    if old {
        // Recency only orders eviction, so a failure here costs nothing else.
        let _ = file.set_modified(now);
    }
}

/// Writes a block's slot: the payload, then the header. Uses `O_DIRECT`
/// where the file system allows it, which keeps the cached copy out of the
/// page cache. Without it, a cold read of a large file spent about as much
/// CPU on the disk tier's page cache as on serving the read. A
/// payload that is not aligned to [`BLOCK_SIZE`] in memory is copied into a
/// scratch buffer first. An aligned one, such as an S3 response, is written directly.
fn write_slot(path: &Path, key: &BlockKey, data: &[u8], crc: u32) -> std::io::Result<()> {
    let slot = key.index * SLOT_BYTES;
    let direct = File::options().create(true).write(true).truncate(false).custom_flags(libc::O_DIRECT).open(path);
    let file = match direct {
        Ok(file) => file,
        // tmpfs and some other file systems refuse O_DIRECT.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let file = File::options().create(true).write(true).truncate(false).open(path)?;
            file.write_all_at(data, slot + SLOT_HEADER_BYTES)?;
            return file.write_all_at(&encode_header(key, data, crc), slot);
        }
        Err(e) => return Err(e),
    };
    let aligned = data.as_ptr() as usize % BLOCK_SIZE == 0 && data.len() % BLOCK_SIZE == 0;
    if aligned {
        file.write_all_at(data, slot + SLOT_HEADER_BYTES)?;
    } else {
        SCRATCH.with_borrow_mut(|scratch| {
            let scratch = scratch.get_or_insert_with(|| AlignedBuf::with_capacity(BLOCK_BYTES as usize));
            // `padded` zeroes the padding up to the next BLOCK_SIZE (which
            // stays inside the slot), whatever an earlier block left there.
            scratch.clear();
            scratch.extend_from_slice(data);
            file.write_all_at(scratch.padded(), slot + SLOT_HEADER_BYTES)
        })?;
    }
    let mut header = AlignedBuf::with_capacity(SLOT_HEADER_BYTES as usize);
    header.extend_from_slice(&encode_header(key, data, crc));
    file.write_all_at(header.padded(), slot)
}

thread_local! {
    /// Page-aligned copy of an unaligned payload, for `O_DIRECT`.
    static SCRATCH: std::cell::RefCell<Option<AlignedBuf>> = const { std::cell::RefCell::new(None) };
}

fn encode_header(key: &BlockKey, data: &[u8], crc: u32) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
    header[16..32].copy_from_slice(&key.segment.to_u128().to_le_bytes());
    header[32..40].copy_from_slice(&key.index.to_le_bytes());
    header[40..44].copy_from_slice(&crc.to_le_bytes());
    let header_crc = crc32fast::hash(&header[..44]);
    header[44..48].copy_from_slice(&header_crc.to_le_bytes());
    header
}

/// Checks a slot header against `key`; returns the payload length and CRC32.
fn check_header(key: &BlockKey, header: &[u8; HEADER_LEN]) -> std::result::Result<(usize, u32), String> {
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let header_crc = crc32fast::hash(&header[..44]);
    if u32_at(44) != header_crc {
        return Err(format!("header CRC32 {:08x} does not match {header_crc:08x}", u32_at(44)));
    }
    if &header[0..8] != MAGIC {
        return Err("bad magic".to_owned());
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported block format version {version}"));
    }
    let segment = u128::from_le_bytes(header[16..32].try_into().expect("16 bytes"));
    let index = u64::from_le_bytes(header[32..40].try_into().expect("8 bytes"));
    if segment != key.segment.to_u128() || index != key.index {
        return Err(format!("slot holds block {index} of segment {}", SegmentId::from_u128(segment)));
    }
    let len = u32_at(12) as u64;
    if len > BLOCK_BYTES {
        return Err(format!("payload length {len} is larger than a block"));
    }
    Ok((len as usize, u32_at(40)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(limit_bytes: u64) -> (tempfile::TempDir, DiskTier) {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::new(dir.path(), limit_bytes, 0).unwrap();
        (dir, tier)
    }

    #[test]
    fn usage_splits_bytes_by_kind_of_file() {
        let (dir, tier) = tier(1 << 30);
        tier.store(&BlockKey { segment: SegmentId::generate(), index: 0 }, &[1u8; 8192]);
        let copies = dir.path().join(PASSTHROUGH_DIR).join("version");
        fs::create_dir_all(&copies).unwrap();
        fs::write(copies.join("42"), vec![2u8; 64 * 1024]).unwrap();
        fs::write(copies.join("43"), vec![3u8; 64 * 1024]).unwrap();
        fs::create_dir_all(&tier.objects_dir).unwrap();
        fs::write(tier.objects_dir.join("page.obj"), [4u8; 100]).unwrap();

        let usage = tier.usage();
        assert_eq!(usage.block_files, 1);
        assert!(usage.block_bytes >= SLOT_HEADER_BYTES + 8192, "{usage:?}");
        assert_eq!(usage.passthrough_files, 2);
        assert!(usage.passthrough_bytes >= 128 * 1024, "{usage:?}");
        assert_eq!(usage.metadata_files, 1);
        assert!(usage.metadata_bytes > 0, "{usage:?}");
        assert_eq!(usage.segments, 0);
        let parts = usage.block_bytes + usage.segment_bytes + usage.passthrough_bytes + usage.metadata_bytes;
        assert_eq!(usage.bytes, parts, "{usage:?}");
    }

    fn flip(path: &Path, at: u64) {
        let file = File::options().read(true).write(true).open(path).unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    }

    #[test]
    fn stored_block_loads_back() {
        let (_dir, tier) = tier(1 << 30);
        let key = BlockKey { segment: SegmentId::generate(), index: 7 };
        assert!(matches!(tier.load(&key), Load::Miss));
        tier.store(&key, b"block bytes");
        match tier.load(&key) {
            Load::Hit(bytes) => assert_eq!(&bytes[..], b"block bytes"),
            _ => panic!("stored block did not load"),
        }
        // The slots before it are holes.
        assert!(matches!(tier.load(&BlockKey { index: 3, ..key }), Load::Miss));
        assert!(matches!(tier.load(&BlockKey { index: 8, ..key }), Load::Miss));
        let usage = tier.usage();
        assert_eq!(usage.block_files, 1);
        assert!(usage.bytes >= SLOT_HEADER_BYTES, "sparse file takes {} bytes", usage.bytes);
        assert!(usage.bytes < SLOT_BYTES, "sparse file takes {} bytes", usage.bytes);
    }

    #[test]
    fn nearly_full_file_system_gets_no_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::new(dir.path(), 1 << 30, u64::MAX).unwrap();
        let key = BlockKey { segment: SegmentId::generate(), index: 0 };
        tier.store(&key, b"block bytes");
        assert!(matches!(tier.load(&key), Load::Miss));
        assert_eq!(tier.usage().block_files, 0);
    }

    #[test]
    fn flipped_byte_is_detected_and_punched_out() {
        let (_dir, tier) = tier(1 << 30);
        let key = BlockKey { segment: SegmentId::generate(), index: 2 };
        let path = tier.blocks_path(key.segment);
        let slot = key.index * SLOT_BYTES;
        for at in [3, 20, 45, SLOT_HEADER_BYTES + 100] {
            tier.store(&key, &[5u8; 4096]);
            flip(&path, slot + at);
            assert!(matches!(tier.load(&key), Load::Corrupt), "flip at {at} was not detected");
            assert!(matches!(tier.load(&key), Load::Miss), "corrupt slot at {at} was kept");
        }
    }

    #[test]
    fn slot_of_another_block_is_rejected() {
        let (_dir, tier) = tier(1 << 30);
        let segment = SegmentId::generate();
        let (one, two) = (BlockKey { segment, index: 1 }, BlockKey { segment, index: 2 });
        tier.store(&one, b"one");
        let path = tier.blocks_path(segment);
        let file = File::options().read(true).write(true).open(&path).unwrap();
        let mut slot = vec![0u8; (SLOT_HEADER_BYTES + 3) as usize];
        file.read_exact_at(&mut slot, SLOT_BYTES).unwrap();
        file.write_all_at(&slot, 2 * SLOT_BYTES).unwrap();
        assert!(matches!(tier.load(&two), Load::Corrupt));
        assert!(matches!(tier.load(&one), Load::Hit(_)));
    }

    #[test]
    fn eviction_deletes_least_recently_used_files() {
        let (_dir, tier) = tier(u64::MAX);
        let base = SystemTime::now() - Duration::from_secs(1000);
        let segments: Vec<SegmentId> = (0..10).map(|_| SegmentId::generate()).collect();
        for (i, segment) in segments.iter().enumerate() {
            tier.store(&BlockKey { segment: *segment, index: 0 }, &vec![i as u8; 64 * 1024]);
            let file = File::options().write(true).open(tier.blocks_path(*segment)).unwrap();
            file.set_modified(base + Duration::from_secs(i as u64)).unwrap();
        }
        let per_file = tier.usage().bytes / 10;
        let limited = DiskTier { limit_bytes: per_file * 10, ..tier };
        // The eleventh file passes the limit: eviction keeps at most 90%, so 9 files.
        let evicted = limited.store(&BlockKey { segment: SegmentId::generate(), index: 0 }, &vec![10u8; 64 * 1024]);
        assert_eq!(evicted.files, 2);
        assert!(matches!(limited.load(&BlockKey { segment: segments[0], index: 0 }), Load::Miss));
        assert!(matches!(limited.load(&BlockKey { segment: segments[1], index: 0 }), Load::Miss));
        assert!(matches!(limited.load(&BlockKey { segment: segments[2], index: 0 }), Load::Hit(_)));
        assert_eq!(limited.usage().block_files, 9);
    }

    #[test]
    fn segment_linked_by_store_is_not_counted() {
        let (dir, tier) = tier(u64::MAX);
        let segment = SegmentId::generate();
        let path = tier.segments_dir().join(format!("{segment}.seg"));
        fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        // The object that a `file://` store links to a published segment.
        fs::hard_link(&path, dir.path().join("object")).unwrap();
        let usage = tier.usage();
        assert_eq!(usage.segments, 1);
        assert_eq!(usage.shared_segments, 1);
        assert_eq!(usage.bytes, 0, "the tier counts bytes that belong to the store");
        assert!(usage.shared_bytes >= 1 << 20, "shared bytes: {}", usage.shared_bytes);
    }

    #[test]
    fn eviction_keeps_segment_linked_by_store() {
        let (dir, tier) = tier(u64::MAX);
        let segment = SegmentId::generate();
        let linked = tier.segments_dir().join(format!("{segment}.seg"));
        fs::write(&linked, vec![7u8; 4 << 20]).unwrap();
        fs::hard_link(&linked, dir.path().join("object")).unwrap();
        let old = SystemTime::now() - Duration::from_secs(1000);
        File::options().write(true).open(&linked).unwrap().set_modified(old).unwrap();
        let key = BlockKey { segment: SegmentId::generate(), index: 0 };
        tier.store(&key, &vec![1u8; 64 * 1024]);
        let blocks_bytes = fs::metadata(tier.blocks_path(key.segment)).unwrap().blocks() * 512;

        // The linked segment is the oldest file and four times the limit.
        // It adds no bytes, so the tier is under the limit and keeps everything.
        let limited = DiskTier { limit_bytes: blocks_bytes * 2, ..tier };
        let added = fs::metadata(&linked).map(|m| owned_bytes(&m)).unwrap();
        assert_eq!(added, 0);
        let evicted = limited.note_added(added, &linked);
        assert_eq!(evicted.files, 0);
        let evicted = limited.evict(Path::new("/nonexistent"));
        assert_eq!(evicted.files, 0);
        assert!(linked.exists(), "eviction deleted a segment whose bytes belong to the store");
        assert!(matches!(limited.load(&key), Load::Hit(_)));

        // Over the limit, eviction deletes the block file and still keeps the segment.
        let tight = DiskTier { limit_bytes: blocks_bytes / 2, ..limited };
        let evicted = tight.evict(Path::new("/nonexistent"));
        assert_eq!(evicted.files, 1);
        assert!(evicted.segments.is_empty());
        assert!(linked.exists());
    }
}
