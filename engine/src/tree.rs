//! File tree types: inode attributes, inode contents and the requests that
//! change them.
//!
//! Invariants:
//! - A directory's `nlink` is 2 plus its number of subdirectories.
//! - A regular file's `size` may exceed the end of its last extent; the gap
//!   is a hole and reads as zeros.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::extent::ExtentMap;
use crate::ids::Ino;

/// Kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    /// Named pipe; it has no data in the volume.
    Fifo,
    /// Unix domain socket node; it has no data in the volume.
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Directory => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "char-device",
            FileKind::BlockDevice => "block-device",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDevice => 6,
            FileKind::BlockDevice => 7,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(FileKind::File),
            2 => Some(FileKind::Directory),
            3 => Some(FileKind::Symlink),
            4 => Some(FileKind::Fifo),
            5 => Some(FileKind::Socket),
            6 => Some(FileKind::CharDevice),
            7 => Some(FileKind::BlockDevice),
            _ => None,
        }
    }
}

/// Point in time with nanosecond precision, as seconds and nanoseconds since
/// the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(time: SystemTime) -> Self {
        match time.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    Timestamp { secs: -(d.as_secs() as i64), nanos: 0 }
                } else {
                    Timestamp { secs: -(d.as_secs() as i64) - 1, nanos: 1_000_000_000 - d.subsec_nanos() }
                }
            }
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.secs >= 0 {
            UNIX_EPOCH + std::time::Duration::new(self.secs as u64, self.nanos)
        } else {
            UNIX_EPOCH - std::time::Duration::from_secs(self.secs.unsigned_abs())
                + std::time::Duration::from_nanos(self.nanos as u64)
        }
    }

    /// Nanoseconds since the Unix epoch, as stored in version records.
    pub fn as_nanos(self) -> i128 {
        self.secs as i128 * 1_000_000_000 + self.nanos as i128
    }
}

/// Attributes of one inode, as `stat` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits, including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    /// Device number of a device node; 0 for other kinds.
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl Attr {
    /// Number of 512-byte blocks, rounded up from the size.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(512)
    }
}

/// New value for a time attribute in [`SetAttr`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Attribute changes requested by `chmod`, `chown`, `truncate` and
/// `utimensat`. Fields left `None` are unchanged.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

/// Owner and group given to inodes that a request creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Owner {
    /// The owner of the calling process.
    pub fn current() -> Self {
        // SAFETY: getuid and getgid cannot fail and touch no memory.
        unsafe { Owner { uid: libc::getuid(), gid: libc::getgid() } }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// How `rename` treats an existing target (`renameat2` flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameMode {
    /// Replace the target if it exists (plain `rename`).
    Replace,
    /// Fail with `EEXIST` if the target exists (`RENAME_NOREPLACE`).
    NoReplace,
    /// Swap source and target atomically; both must exist (`RENAME_EXCHANGE`).
    Exchange,
}

/// How `setxattr` treats an existing attribute (`XATTR_CREATE`, `XATTR_REPLACE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    CreateOrReplace,
    CreateOnly,
    ReplaceOnly,
}

/// File system statistics reported by `statfs`.
#[derive(Clone, Copy, Debug)]
pub struct StatFs {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_available: u64,
    pub files: u64,
    pub files_free: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// Contents of an inode by kind.
#[derive(Clone, Debug)]
pub(crate) enum Content {
    File(ExtentMap),
    /// Entries by name; values are the child inode and its kind.
    Directory(BTreeMap<Vec<u8>, (Ino, FileKind)>),
    Symlink(Vec<u8>),
    /// FIFO, socket or device node: attributes only.
    Special,
}

/// One inode as held in memory by a session.
#[derive(Clone, Debug)]
pub(crate) struct Inode {
    pub attr: Attr,
    /// Directory entries that name this inode, as (parent, name). A directory
    /// has exactly one, the root none, and a file one per hard link.
    pub links: Vec<(Ino, Vec<u8>)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Content,
}

impl Inode {
    /// Parent directory; the root is its own parent.
    pub fn parent(&self) -> Ino {
        self.links.first().map_or(Ino::ROOT, |(parent, _)| *parent)
    }

    pub fn remove_link(&mut self, parent: Ino, name: &[u8]) {
        if let Some(at) = self.links.iter().position(|(p, n)| *p == parent && n == name) {
            self.links.remove(at);
        }
    }
}

/// Maximum length in bytes of one name in a directory.
pub const NAME_MAX: usize = 255;
/// Maximum length in bytes of a symlink target.
pub const SYMLINK_MAX: usize = 4095;
/// Maximum size in bytes of one extended attribute value (the Linux limit).
pub const XATTR_VALUE_MAX: usize = 65536;
