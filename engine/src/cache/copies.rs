//! Whole-file copies that the FUSE adaptor serves by passthrough, at
//! `cache/passthrough/<version>/<inode>` under the store's local root.
//!
//! The kernel reads such a copy directly, so no record CRC guards those
//! reads. Each copy therefore carries the CRC32 of its contents in the
//! extended attribute [`CHECKSUM_XATTR`], set before the copy is renamed into
//! place. A mount checks a copy against it before its first reuse, and
//! `chalk fsck` checks every copy of the versions it walks.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::ids::{Ino, VersionId};

/// Extended attribute holding a copy's CRC32, as 4 little-endian bytes.
pub const CHECKSUM_XATTR: &str = "user.chalk.crc32";

/// Bytes read per step when a copy is checked.
const CHECK_CHUNK_BYTES: usize = 4 << 20;

/// Directory of the copies of `version`'s files under the store's local root.
pub fn version_dir(local_root: &Path, version: VersionId) -> PathBuf {
    local_root
        .join("cache")
        .join(super::PASSTHROUGH_DIR)
        .join(version.to_string())
}

/// Path of the copy of `ino` of `version` under the store's local root.
pub fn copy_path(local_root: &Path, version: VersionId, ino: Ino) -> PathBuf {
    version_dir(local_root, version).join(ino.0.to_string())
}

/// Records `crc` as the checksum of `file`'s contents.
///
/// Fails with `ErrorKind::Unsupported` where the file system keeps no user
/// extended attributes; such a copy can serve one mount but is never reused.
pub fn set_checksum(file: &File, crc: u32) -> io::Result<()> {
    let name = xattr_name();
    let value = crc.to_le_bytes();
    // SAFETY: the descriptor is owned by `file`; name and value are valid for the call.
    let result = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if result != 0 {
        return Err(unsupported_or(io::Error::last_os_error()));
    }
    Ok(())
}

/// Reason a copy cannot be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyDamage {
    /// The copy has no checksum: it was made by an older release, or its
    /// file system dropped the attribute.
    NoChecksum,
    /// The contents do not match the checksum.
    Mismatch { expected: u32, actual: u32 },
    /// Reading the copy failed.
    Unreadable(String),
}

impl std::fmt::Display for CopyDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyDamage::NoChecksum => write!(f, "the copy carries no {CHECKSUM_XATTR} checksum"),
            CopyDamage::Mismatch { expected, actual } => {
                write!(f, "its contents have CRC32 {actual:08x}, but the copy was made with {expected:08x}")
            }
            CopyDamage::Unreadable(detail) => write!(f, "reading the copy failed: {detail}"),
        }
    }
}

/// Reads all of `file` and checks it against its recorded checksum.
pub fn check_copy(file: &File) -> std::result::Result<(), CopyDamage> {
    let expected = read_checksum(file)?;
    // Reading in order: the kernel reads ahead, and the pages stay cached
    // for the passthrough reads that follow.
    // SAFETY: the descriptor is owned by `file`.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; CHECK_CHUNK_BYTES];
    let mut offset = 0u64;
    loop {
        let read = match file.read_at(&mut buffer, offset) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                return Err(CopyDamage::Unreadable(format!(
                    "at offset {offset}: {error}"
                )))
            }
        };
        hasher.update(&buffer[..read]);
        offset += read as u64;
    }
    let actual = hasher.finalize();
    if actual != expected {
        return Err(CopyDamage::Mismatch { expected, actual });
    }
    Ok(())
}

fn read_checksum(file: &File) -> std::result::Result<u32, CopyDamage> {
    let name = xattr_name();
    let mut value = [0u8; 4];
    // SAFETY: the descriptor is owned by `file`; the buffer is valid for its length.
    let read = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if read < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => Err(CopyDamage::NoChecksum),
            Some(libc::ERANGE) => Err(CopyDamage::Unreadable(format!(
                "{CHECKSUM_XATTR} is longer than 4 bytes"
            ))),
            _ => Err(CopyDamage::Unreadable(format!(
                "reading {CHECKSUM_XATTR}: {error}"
            ))),
        };
    }
    if read != 4 {
        return Err(CopyDamage::Unreadable(format!(
            "{CHECKSUM_XATTR} holds {read} bytes, expected 4"
        )));
    }
    Ok(u32::from_le_bytes(value))
}

fn xattr_name() -> std::ffi::CString {
    std::ffi::CString::new(CHECKSUM_XATTR).expect("no NUL in the attribute name")
}

fn unsupported_or(error: io::Error) -> io::Error {
    if error.raw_os_error() == Some(libc::ENOTSUP) {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("this file system keeps no {CHECKSUM_XATTR} attribute"),
        )
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn copy_with(contents: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("7");
        let mut file = File::create(&path).unwrap();
        file.write_all(contents).unwrap();
        set_checksum(&file, crc32fast::hash(contents)).unwrap();
        (dir, File::open(&path).unwrap())
    }

    #[test]
    fn intact_copy_checks_clean() {
        let contents: Vec<u8> = (0..(9 << 20)).map(|i: u32| (i % 251) as u8).collect();
        let (_dir, file) = copy_with(&contents);
        assert_eq!(check_copy(&file), Ok(()));
    }

    #[test]
    fn flipped_byte_is_a_mismatch() {
        let contents: Vec<u8> = (0..(5 << 20)).map(|i: u32| (i % 13) as u8).collect();
        let (dir, _) = copy_with(&contents);
        let path = dir.path().join("7");
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer
            .write_all_at(&[contents[4_500_000] ^ 0x20], 4_500_000)
            .unwrap();
        let file = File::open(&path).unwrap();
        match check_copy(&file) {
            Err(CopyDamage::Mismatch { expected, actual }) => {
                assert_eq!(expected, crc32fast::hash(&contents));
                assert_ne!(actual, expected);
            }
            other => panic!("a flipped byte was not caught: {other:?}"),
        }
    }

    #[test]
    fn copy_without_checksum_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("3");
        std::fs::write(&path, b"made by an older release").unwrap();
        assert_eq!(
            check_copy(&File::open(&path).unwrap()),
            Err(CopyDamage::NoChecksum)
        );
    }

    #[test]
    fn truncated_copy_is_a_mismatch() {
        let (dir, _) = copy_with(&[7u8; 100_000]);
        let path = dir.path().join("7");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(99_999)
            .unwrap();
        assert!(matches!(
            check_copy(&File::open(&path).unwrap()),
            Err(CopyDamage::Mismatch { .. })
        ));
    }
}
