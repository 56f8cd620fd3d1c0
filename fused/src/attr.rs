//! Conversions between engine attribute types and the types of `fuser`.

use std::time::SystemTime;

use chalk_engine::{Attr, FileKind, TimeSet, Timestamp};
use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

/// `st_blksize` reported for every inode, in bytes. It equals the largest
/// write request the adaptor accepts, so tools that size their buffers from
/// `st_blksize` send full-size requests.
pub(crate) const BLOCK_SIZE_BYTES: u32 = 1024 * 1024;

pub(crate) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

pub(crate) fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino.0),
        size: attr.size,
        blocks: attr.blocks(),
        atime: attr.atime.to_system_time(),
        mtime: attr.mtime.to_system_time(),
        ctime: attr.ctime.to_system_time(),
        crtime: attr.ctime.to_system_time(),
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: BLOCK_SIZE_BYTES,
        flags: 0,
    }
}

pub(crate) fn time_set(time: TimeOrNow) -> TimeSet {
    match time {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(at) => TimeSet::At(timestamp(at)),
    }
}

pub(crate) fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::from_system_time(time)
}
