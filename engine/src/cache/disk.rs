//! The disk tier: blocks and whole segments under `$CHALK_HOME/cache`,
//! shared by every process that uses that directory, bounded in bytes,
//! evicted least recently used first and kept across restarts.
//!
//! Layout under the cache directory:
//!
//! | path                              | contents                                            |
//! |-----------------------------------|-----------------------------------------------------|
//! | `segments/<segment>.seg`          | a whole sealed segment, written here or fetched whole |
//! | `blocks/<segment>/<index:08x>.blk`| one block of a segment, in the block file format    |
//!
//! Block file format, integers little-endian:
//!
//! | offset | size | field                                              |
//! |--------|------|----------------------------------------------------|
//! | 0      | 8    | magic `CHLKBLK1`                                   |
//! | 8      | 2    | format version, 1                                  |
//! | 10     | 2    | zero                                               |
//! | 12     | 4    | payload length in bytes                            |
//! | 16     | 16   | segment id (u128)                                  |
//! | 32     | 8    | block index                                        |
//! | 40     | 4    | CRC32 of the payload                               |
//! | 44     | 4    | CRC32 of bytes 0..44                               |
//! | 48     | len  | segment bytes from `index * BLOCK_BYTES`           |
//!
//! Write order: a temporary file in the block's directory, then a rename, so
//! readers see whole files only. There is no fsync: a block file torn or lost
//! by a crash fails its checks and is fetched again.
//!
//! Invariants:
//! - A block file is returned only after its header CRC, magic, version, key,
//!   length and payload CRC all match; a file that fails is deleted.
//! - Recency is the file's modification time, set when the file is written
//!   and refreshed by a hit once it is older than [`TOUCH_AFTER`].
//! - Usage is estimated from this process's writes. Once the estimate passes
//!   the limit, the process rescans the directories (finding the files of
//!   other processes too) and deletes the oldest files until usage is at
//!   most 90% of the limit.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::config::filesystem_space;
use super::BlockKey;
use crate::error::{EngineError, Result};
use crate::ids::SegmentId;

const MAGIC: &[u8; 8] = b"CHLKBLK1";
const FORMAT_VERSION: u16 = 1;
pub(crate) const HEADER_LEN: usize = 48;

/// A hit refreshes the modification time of a file older than this.
const TOUCH_AFTER: Duration = Duration::from_secs(60);
/// Temporary files older than this are left by a crashed process and deleted by scans.
const STALE_TEMP_AFTER: Duration = Duration::from_secs(3600);
/// Eviction brings usage down to this share of the limit, in percent.
const EVICT_TO_PERCENT: u64 = 90;
/// Blocks are not written while the file system has less than this share free, in percent.
const FREE_SPACE_MIN_PERCENT: u64 = 5;

/// What a lookup found.
pub(crate) enum Load {
    Hit(Vec<u8>),
    Miss,
    /// A file was there but failed its checks; it has been deleted.
    Corrupt,
}

/// What an eviction pass deleted.
#[derive(Debug, Default)]
pub(crate) struct Evicted {
    pub files: u64,
    pub bytes: u64,
    /// Whole segments deleted, which must no longer be read from their files.
    pub segments: Vec<SegmentId>,
}

/// Bytes and files in the disk tier, from a scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub bytes: u64,
    pub blocks: u64,
    pub segments: u64,
}

/// One file found by a scan.
struct Entry {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
    /// Set for a whole segment.
    segment: Option<SegmentId>,
}

pub(crate) struct DiskTier {
    blocks_dir: PathBuf,
    segments_dir: PathBuf,
    limit_bytes: u64,
    /// Estimated bytes in use; `None` until the first write scans the directories.
    used_bytes: Mutex<Option<u64>>,
    /// Held by the thread that runs an eviction pass.
    evicting: Mutex<()>,
    low_space_warned: AtomicBool,
}

impl DiskTier {
    pub fn new(cache_root: &Path, limit_bytes: u64) -> Result<Self> {
        let blocks_dir = cache_root.join("blocks");
        let segments_dir = cache_root.join("segments");
        for dir in [&blocks_dir, &segments_dir] {
            fs::create_dir_all(dir).map_err(|e| EngineError::io("creating cache directory", dir, e))?;
        }
        Ok(DiskTier {
            blocks_dir,
            segments_dir,
            limit_bytes,
            used_bytes: Mutex::new(None),
            evicting: Mutex::new(()),
            low_space_warned: AtomicBool::new(false),
        })
    }

    pub fn segments_dir(&self) -> &Path {
        &self.segments_dir
    }

    fn block_path(&self, key: &BlockKey) -> PathBuf {
        self.blocks_dir.join(key.segment.to_string()).join(format!("{:08x}.blk", key.index))
    }

    /// Reads and checks a block file.
    pub fn load(&self, key: &BlockKey) -> Load {
        let path = self.block_path(key);
        let mut file = match File::open(&path) {
            Ok(file) => file,
            Err(_) => return Load::Miss,
        };
        let mut bytes = Vec::new();
        if let Err(err) = file.read_to_end(&mut bytes) {
            tracing::warn!(path = %path.display(), error = %err, "failed to read a cached block; fetching it again");
            return Load::Miss;
        }
        match decode_block(key, &bytes) {
            Ok(()) => {
                touch_if_old(&file);
                bytes.drain(..HEADER_LEN);
                Load::Hit(bytes)
            }
            Err(detail) => {
                tracing::warn!(path = %path.display(), detail = %detail, "deleting a corrupt cached block");
                let _ = fs::remove_file(&path);
                Load::Corrupt
            }
        }
    }

    /// Writes a block file unless the file system is nearly full. Returns what
    /// the eviction pass that the write triggered deleted, if any.
    pub fn store(&self, key: &BlockKey, data: &[u8]) -> Evicted {
        if !self.has_free_space() {
            return Evicted::default();
        }
        let path = self.block_path(key);
        match write_block(key, data, &path) {
            Ok(()) => self.note_added((HEADER_LEN + data.len()) as u64),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "failed to write a block to the disk cache");
                Evicted::default()
            }
        }
    }

    /// Deletes a block file, so the next read fetches the block again.
    pub fn remove(&self, key: &BlockKey) {
        let _ = fs::remove_file(self.block_path(key));
    }

    /// Counts `bytes` just added to the tier (a block or an adopted whole
    /// segment) and evicts when the estimate passes the limit.
    pub fn note_added(&self, bytes: u64) -> Evicted {
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
            self.evict()
        } else {
            Evicted::default()
        }
    }

    /// Rescans the tier and deletes the least recently used files until usage
    /// is at most 90% of the limit. Another thread already evicting makes this a no-op.
    pub fn evict(&self) -> Evicted {
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
            match entry.segment {
                Some(_) => usage.segments += 1,
                None => usage.blocks += 1,
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
        let Some((total, available)) = filesystem_space(&self.blocks_dir) else { return true };
        let enough = available.saturating_mul(100) >= total.saturating_mul(FREE_SPACE_MIN_PERCENT);
        if !enough && !self.low_space_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dir = %self.blocks_dir.display(), available, total,
                "the file system of the disk cache is nearly full, so new blocks are not cached on disk"
            );
        }
        enough
    }

    /// Lists every cached file, deleting stale temporary files and empty block directories.
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
        let dirs = match fs::read_dir(&self.blocks_dir) {
            Ok(dirs) => dirs,
            Err(_) => return entries,
        };
        for dir in dirs.flatten() {
            let dir = dir.path();
            let files = list_files(&dir);
            if files.is_empty() {
                // Fails harmlessly when another process just wrote into it.
                let _ = fs::remove_dir(&dir);
            }
            for file in files {
                if file.path.extension().is_some_and(|e| e == "blk") {
                    entries.push(file);
                } else {
                    remove_if_stale(&file);
                }
            }
        }
        entries
    }
}

/// Regular files directly in `dir`, with their sizes and modification times.
fn list_files(dir: &Path) -> Vec<Entry> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    read.flatten()
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            metadata.is_file().then(|| Entry {
                path: entry.path(),
                bytes: metadata.len(),
                modified: metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                segment: None,
            })
        })
        .collect()
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

fn encode_header(key: &BlockKey, data: &[u8]) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
    header[16..32].copy_from_slice(&key.segment.to_u128().to_le_bytes());
    header[32..40].copy_from_slice(&key.index.to_le_bytes());
    header[40..44].copy_from_slice(&crc32fast::hash(data).to_le_bytes());
    let header_crc = crc32fast::hash(&header[..44]);
    header[44..48].copy_from_slice(&header_crc.to_le_bytes());
    header
}

/// Checks a whole block file against `key`.
fn decode_block(key: &BlockKey, bytes: &[u8]) -> std::result::Result<(), String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!("file of {} bytes is shorter than the block header", bytes.len()));
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let header_crc = crc32fast::hash(&bytes[..44]);
    if u32_at(44) != header_crc {
        return Err(format!("header CRC32 {:08x} does not match {header_crc:08x}", u32_at(44)));
    }
    if &bytes[0..8] != MAGIC {
        return Err("bad magic".to_owned());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != FORMAT_VERSION {
        return Err(format!("unsupported block format version {version}"));
    }
    let segment = u128::from_le_bytes(bytes[16..32].try_into().expect("16 bytes"));
    let index = u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes"));
    if segment != key.segment.to_u128() || index != key.index {
        return Err(format!("file holds block {index} of segment {}", SegmentId::from_u128(segment)));
    }
    let len = u32_at(12) as usize;
    if bytes.len() - HEADER_LEN != len {
        return Err(format!("payload of {} bytes, header says {len}", bytes.len() - HEADER_LEN));
    }
    let payload_crc = crc32fast::hash(&bytes[HEADER_LEN..]);
    if u32_at(40) != payload_crc {
        return Err(format!("payload CRC32 {:08x} does not match {payload_crc:08x}", u32_at(40)));
    }
    Ok(())
}

/// Writes a block file through a temporary file and a rename.
fn write_block(key: &BlockKey, data: &[u8], path: &Path) -> std::io::Result<()> {
    let dir = path.parent().expect("block paths have a directory");
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{:08x}.tmp-{}", key.index, ulid::Ulid::new()));
    let written = File::create(&tmp).and_then(|mut file| {
        file.write_all(&encode_header(key, data))?;
        file.write_all(data)
    });
    match written.and_then(|()| fs::rename(&tmp, path)) {
        Ok(()) => Ok(()),
        Err(err) => {
            let _ = fs::remove_file(&tmp);
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(limit_bytes: u64) -> (tempfile::TempDir, DiskTier) {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::new(dir.path(), limit_bytes).unwrap();
        (dir, tier)
    }

    #[test]
    fn stored_block_loads_back() {
        let (_dir, tier) = tier(1 << 30);
        let key = BlockKey { segment: SegmentId::generate(), index: 7 };
        assert!(matches!(tier.load(&key), Load::Miss));
        tier.store(&key, b"block bytes");
        match tier.load(&key) {
            Load::Hit(bytes) => assert_eq!(bytes, b"block bytes"),
            _ => panic!("stored block did not load"),
        }
        assert_eq!(tier.usage(), DiskUsage { bytes: (HEADER_LEN + 11) as u64, blocks: 1, segments: 0 });
    }

    #[test]
    fn flipped_byte_is_detected_and_deleted() {
        let (_dir, tier) = tier(1 << 30);
        let key = BlockKey { segment: SegmentId::generate(), index: 0 };
        tier.store(&key, &[5u8; 4096]);
        let path = tier.block_path(&key);
        for at in [3, 20, 45, HEADER_LEN + 100] {
            tier.store(&key, &[5u8; 4096]);
            let mut bytes = fs::read(&path).unwrap();
            bytes[at] ^= 0x10;
            fs::write(&path, &bytes).unwrap();
            assert!(matches!(tier.load(&key), Load::Corrupt), "flip at {at} was not detected");
            assert!(!path.exists(), "corrupt file at {at} was kept");
        }
    }

    #[test]
    fn block_file_of_another_key_is_rejected() {
        let (_dir, tier) = tier(1 << 30);
        let segment = SegmentId::generate();
        let (one, two) = (BlockKey { segment, index: 1 }, BlockKey { segment, index: 2 });
        tier.store(&one, b"one");
        fs::rename(tier.block_path(&one), tier.block_path(&two)).unwrap();
        assert!(matches!(tier.load(&two), Load::Corrupt));
    }

    #[test]
    fn eviction_deletes_oldest_files_first() {
        let block_bytes = 1000;
        let file_bytes = (HEADER_LEN + block_bytes) as u64;
        let (_dir, tier) = tier(file_bytes * 10);
        let segment = SegmentId::generate();
        let base = SystemTime::now() - Duration::from_secs(1000);
        for index in 0..10 {
            let key = BlockKey { segment, index };
            tier.store(&key, &vec![index as u8; block_bytes]);
            let file = File::options().write(true).open(tier.block_path(&key)).unwrap();
            file.set_modified(base + Duration::from_secs(index)).unwrap();
        }
        assert_eq!(tier.usage().blocks, 10);
        // The eleventh block passes the limit: eviction keeps at most 90%, so 9 files.
        let evicted = tier.store(&BlockKey { segment, index: 10 }, &vec![10u8; block_bytes]);
        assert_eq!(evicted.files, 2);
        assert!(matches!(tier.load(&BlockKey { segment, index: 0 }), Load::Miss));
        assert!(matches!(tier.load(&BlockKey { segment, index: 1 }), Load::Miss));
        assert!(matches!(tier.load(&BlockKey { segment, index: 2 }), Load::Hit(_)));
        assert!(matches!(tier.load(&BlockKey { segment, index: 10 }), Load::Hit(_)));
    }
}
