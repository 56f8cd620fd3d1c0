//! The one mapping from engine errors to errno values, and the one place that
//! logs a failed FUSE operation.

use chalk_engine::EngineError;
use fuser::Errno;

/// Maps an engine error to the errno that the kernel returns to the caller.
///
/// The match is exhaustive with no wildcard arm, so a new engine variant
/// fails to compile here until someone chooses its errno.
pub(crate) fn errno_of(error: &EngineError) -> Errno {
    let code = match error {
        EngineError::NotFound { .. } => libc::ENOENT,
        EngineError::AlreadyExists { .. } => libc::EEXIST,
        EngineError::NotDirectory { .. } => libc::ENOTDIR,
        EngineError::IsDirectory { .. } => libc::EISDIR,
        EngineError::NotPermitted(_) => libc::EPERM,
        EngineError::DirectoryNotEmpty { .. } => libc::ENOTEMPTY,
        EngineError::ReadOnly { .. } => libc::EROFS,
        EngineError::InvalidName { .. } => libc::EINVAL,
        EngineError::NameTooLong { .. } => libc::ENAMETOOLONG,
        EngineError::InvalidPath { .. } => libc::EINVAL,
        EngineError::InvalidArgument(_) => libc::EINVAL,
        EngineError::NoXattr { .. } => libc::ENODATA,
        // The kernel rejects xattr values over 64 KiB (E2BIG) and symlink
        // targets over PATH_MAX (ENAMETOOLONG) before they reach a FUSE
        // server. From a mount, this error therefore means a file offset or
        // size beyond the engine's limit, which write(2) and truncate(2)
        // report as EFBIG.
        EngineError::TooLarge(_) => libc::EFBIG,
        EngineError::Unsupported(_) => libc::ENOTSUP,
        EngineError::TooManyLinks { .. } => libc::ELOOP,
        EngineError::CorruptSegment { .. } => libc::EIO,
        EngineError::CorruptObject { .. } => libc::EIO,
        // Only `sync` returns HeadMoved, and sync is not a FUSE operation.
        EngineError::HeadMoved { .. } => libc::EIO,
        EngineError::Conflict { .. } => libc::EIO,
        EngineError::ObjectStore { .. } => libc::EIO,
        EngineError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        EngineError::NoSpace { .. } => libc::ENOSPC,
    };
    Errno::from_i32(code)
}

/// Maps `error` to an errno and logs the failed operation once, with the
/// operation name, inode and error as fields.
///
/// Failures that ordinary programs cause all the time (a lookup of a missing
/// name, a probe for a missing extended attribute) go to DEBUG. Failures that
/// can mean lost or unreadable data go to ERROR, and the rest to WARN.
pub(crate) fn log_failure(op: &'static str, ino: u64, error: &EngineError) -> Errno {
    let errno = errno_of(error);
    let code = errno.code();
    let expected = matches!(
        (op, error),
        ("lookup", EngineError::NotFound { .. })
            | ("getxattr" | "removexattr", EngineError::NoXattr { .. })
    );
    let data_at_risk = matches!(
        error,
        EngineError::CorruptSegment { .. }
            | EngineError::CorruptObject { .. }
            | EngineError::ObjectStore { .. }
            | EngineError::Io { .. }
            | EngineError::NoSpace { .. }
    );
    if expected {
        tracing::debug!(op, ino, errno = code, error = %error, "FUSE operation failed");
    } else if data_at_risk {
        tracing::error!(op, ino, errno = code, error = %error, "FUSE operation failed");
    } else {
        tracing::warn!(op, ino, errno = code, error = %error, "FUSE operation failed");
    }
    errno
}

/// Logs an operation that the adaptor rejects before calling the engine
/// (unsupported flags or node types) and returns `errno`.
pub(crate) fn log_rejected(op: &'static str, ino: u64, errno: Errno, reason: &'static str) -> Errno {
    tracing::debug!(op, ino, errno = errno.code(), reason, "FUSE operation rejected");
    errno
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn io_error_keeps_its_os_errno() {
        let error = EngineError::Io {
            context: "reading",
            path: PathBuf::from("/x"),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(errno_of(&error).code(), libc::EACCES);
    }

    #[test]
    fn io_error_without_os_errno_is_eio() {
        let error = EngineError::Io {
            context: "reading",
            path: PathBuf::from("/x"),
            source: std::io::Error::other("short read"),
        };
        assert_eq!(errno_of(&error).code(), libc::EIO);
    }

    #[test]
    fn missing_xattr_is_enodata() {
        let error = EngineError::NoXattr { ino: chalk_engine::Ino(5), name: "user.a".into() };
        assert_eq!(errno_of(&error).code(), libc::ENODATA);
    }
}
