//! Local disk I/O for the segment log: io_uring when the kernel allows it,
//! `pwrite` otherwise.
//!
//! Policy: every session opens one ring. When `io_uring_setup` fails with
//! `ENOSYS`, `EPERM`, `EACCES` or `ENOMEM` (a kernel without io_uring, or a
//! seccomp profile such as Docker's default that blocks it), the session
//! falls back to positional writes on the calling thread and the process logs
//! this once.
//!
//! Safety: a buffer handed to the ring is owned by the in-flight table of
//! [`DiskWriter`] until its completion is reaped, so the kernel never reads
//! memory that was freed or reused.
//!
//! Errors: a write that fails keeps its buffer in the writer, so that
//! [`DiskWriter::retry_failed`] can write the same bytes again once the
//! cause (a full disk, a transient device error) is gone.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

use io_uring::{opcode, types, IoUring};

mod faults;

#[doc(hidden)]
pub use faults::{LocalFault, LocalFaultCounts, LocalFaults};

/// Alignment of every write and of every buffer given to the kernel, as
/// `O_DIRECT` needs on the file systems we run on.
pub const BLOCK_SIZE: usize = 4096;

/// How the segment log reaches the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoMode {
    /// io_uring when available, `pwrite` otherwise.
    Auto,
    /// io_uring only; failing to set up a ring is an error.
    Uring,
    /// `pwrite` and `pread` only.
    Pwrite,
    /// `pwrite` with writes and fsyncs that fail, tear, stall or land out
    /// of order as the seeded [`LocalFaults`] decide. For tests only.
    #[doc(hidden)]
    Faulty(LocalFaults),
}

impl IoMode {
    /// Reads `CHALK_IO` (`auto`, `uring` or `pwrite`); unset means `auto`.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("CHALK_IO").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(IoMode::Auto),
            Ok("uring") | Ok("io_uring") => Ok(IoMode::Uring),
            Ok("pwrite") => Ok(IoMode::Pwrite),
            Ok(other) => Err(format!("invalid CHALK_IO value {other:?}; use auto, uring or pwrite")),
        }
    }
}

/// A heap buffer aligned to [`BLOCK_SIZE`] whose capacity is a multiple of it.
///
/// Buffers of [`MMAP_MIN_BYTES`] or more are anonymous mappings, whose pages
/// the kernel zeroes on first touch; smaller ones come zeroed from the heap.
/// So every byte is initialised without a zeroing pass over large buffers.
pub struct AlignedBuf {
    ptr: *mut u8,
    cap: usize,
    len: usize,
    /// End of the bytes that an earlier use may have left non-zero: every
    /// byte from `max(len, stale_end)` on is zero. [`padded`](Self::padded)
    /// zeroes the stale bytes of the padding it returns, so a buffer can be
    /// reused without a zeroing pass over its whole capacity.
    stale_end: usize,
    /// The buffer is a mapping of its own rather than a heap allocation.
    mapped: bool,
}

/// Buffers at least this large are mapped rather than allocated.
pub const MMAP_MIN_BYTES: usize = 1 << 20;

// SAFETY: the buffer is plain owned memory; moving it between threads is as
// safe as moving a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn with_capacity(min_cap: usize) -> Self {
        let cap = min_cap.max(BLOCK_SIZE).next_multiple_of(BLOCK_SIZE);
        if cap >= MMAP_MIN_BYTES {
            // SAFETY: an anonymous private mapping with no address hint; the result is checked.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    cap,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if ptr != libc::MAP_FAILED {
                return AlignedBuf { ptr: ptr.cast(), cap, len: 0, stale_end: 0, mapped: true };
            }
        }
        let layout = Layout::from_size_align(cap, BLOCK_SIZE).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, cap, len: 0, stale_end: 0, mapped: false }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap bytes, len <= cap, and all bytes were initialised by alloc_zeroed.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes up to `len` rounded up to a whole block; the padding is zero.
    pub fn padded(&mut self) -> &[u8] {
        let padded = self.len.next_multiple_of(BLOCK_SIZE);
        let stale = self.stale_end.min(padded);
        if stale > self.len {
            // SAFETY: the range lies inside the allocation because padded <= cap.
            unsafe { std::ptr::write_bytes(self.ptr.add(self.len), 0, stale - self.len) };
        }
        // SAFETY: padded <= cap because cap is a multiple of BLOCK_SIZE and len <= cap.
        unsafe { std::slice::from_raw_parts(self.ptr, padded) }
    }

    /// Empties the buffer for reuse, without zeroing its old bytes.
    pub fn clear(&mut self) {
        self.keep_head(0);
    }

    pub fn extend_from_slice(&mut self, data: &[u8]) {
        assert!(self.len + data.len() <= self.cap, "aligned buffer overflow");
        // SAFETY: the destination range lies inside the allocation and cannot overlap `data`,
        // which is borrowed immutably while self is borrowed mutably.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(self.len), data.len()) };
        self.len += data.len();
    }

    /// Keeps only the first `len` bytes. The dropped bytes read as zero in
    /// [`padded`](Self::padded).
    pub fn keep_head(&mut self, len: usize) {
        assert!(len <= self.len);
        self.stale_end = self.stale_end.max(self.len);
        self.len = len;
    }

    /// Keeps only the bytes from `from` on, moved to the front. The bytes
    /// after them read as zero in [`padded`](Self::padded).
    pub fn keep_tail(&mut self, from: usize) {
        assert!(from <= self.len);
        let tail = self.len - from;
        // SAFETY: both ranges lie inside the allocation; `copy` handles overlap.
        unsafe { std::ptr::copy(self.ptr.add(from), self.ptr, tail) };
        self.stale_end = self.stale_end.max(self.len);
        self.len = tail;
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: ptr and cap are those of the mapping made by `with_capacity`, unmapped once.
            unsafe { libc::munmap(self.ptr.cast(), self.cap) };
            return;
        }
        let layout = Layout::from_size_align(self.cap, BLOCK_SIZE).expect("valid layout");
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { alloc::dealloc(self.ptr, layout) };
    }
}

static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Returns true when a failed `io_uring_setup` means "io_uring is not
/// available here" rather than a real error.
pub fn is_unavailable_error(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EPERM | libc::EACCES | libc::ENOMEM))
}

/// Queue depth of each session's ring.
const RING_ENTRIES: u32 = 32;
/// Writes kept in flight before the writer waits for one to complete.
const MAX_IN_FLIGHT: usize = 16;
/// Written buffers kept for reuse by [`DiskWriter::buffer`]. Reusing them
/// saves mapping and faulting in fresh pages for every chunk of the log, at
/// the cost of up to this many idle buffers per writer (16 MiB with the
/// segment log's 1 MiB chunks).
const MAX_RECYCLED: usize = MAX_IN_FLIGHT;

enum Backend {
    Uring(IoUring),
    Pwrite,
    Faulty {
        faults: LocalFaults,
        /// Writes held back by [`LocalFault::Reorder`], applied at the next wait.
        held_back: Vec<(AlignedBuf, u64, RawFd)>,
    },
}

/// Writes aligned buffers to one file at a time, through io_uring or `pwrite`.
pub struct DiskWriter {
    backend: Backend,
    /// Buffers submitted to the ring, by user data, with their file offset
    /// and the descriptor of the file they are written to.
    in_flight: HashMap<u64, (AlignedBuf, u64, RawFd)>,
    next_user_data: u64,
    /// Writes that failed, with their file offset and descriptor, kept for
    /// [`DiskWriter::retry_failed`].
    failed: Vec<(AlignedBuf, u64, RawFd)>,
    /// Buffers whose writes completed, kept for [`DiskWriter::buffer`].
    recycled: Vec<AlignedBuf>,
}

impl DiskWriter {
    /// Opens a writer in `mode`, falling back from io_uring as the module doc describes.
    pub fn new(mode: IoMode) -> std::io::Result<Self> {
        let ring = match &mode {
            IoMode::Pwrite | IoMode::Faulty(_) => None,
            IoMode::Uring => Some(IoUring::new(RING_ENTRIES)?),
            IoMode::Auto => Self::choose_ring(IoUring::new(RING_ENTRIES))?,
        };
        let backend = match (ring, mode) {
            (Some(ring), _) => Backend::Uring(ring),
            (None, IoMode::Faulty(faults)) => Backend::Faulty { faults, held_back: Vec::new() },
            (None, _) => Backend::Pwrite,
        };
        Ok(DiskWriter { backend, in_flight: HashMap::new(), next_user_data: 1, failed: Vec::new(), recycled: Vec::new() })
    }

    /// Decides what a ring set-up result means in `Auto` mode: a ring, a
    /// fallback to `pwrite` (logged once per process), or an error.
    pub fn choose_ring(result: std::io::Result<IoUring>) -> std::io::Result<Option<IoUring>> {
        match result {
            Ok(ring) => Ok(Some(ring)),
            Err(err) if is_unavailable_error(&err) => {
                if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %err, "io_uring is unavailable, so the segment log falls back to pwrite and pread");
                }
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    pub fn uses_uring(&self) -> bool {
        matches!(self.backend, Backend::Uring(_))
    }

    /// Number of submitted writes whose completion has not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Returns an empty buffer of at least `min_cap` bytes, reusing the
    /// buffer of a completed write when one is large enough.
    pub fn buffer(&mut self, min_cap: usize) -> AlignedBuf {
        match self.recycled.iter().rposition(|buf| buf.capacity() >= min_cap) {
            Some(index) => {
                let mut buf = self.recycled.swap_remove(index);
                buf.clear();
                buf
            }
            None => AlignedBuf::with_capacity(min_cap),
        }
    }

    fn recycle(&mut self, buf: AlignedBuf) {
        if self.recycled.len() < MAX_RECYCLED {
            self.recycled.push(buf);
        }
    }

    /// Lowest file offset still being written, if any.
    pub fn lowest_in_flight_offset(&self) -> Option<u64> {
        self.in_flight.values().map(|(_, off, _)| *off).min()
    }

    /// Starts writing the padded bytes of `buf` at `offset` of `file`. The
    /// buffer stays owned by the writer until the write completes.
    ///
    /// Returns the error of this write or of an earlier one that completed
    /// meanwhile. Either way `buf` is submitted or kept, and the writer
    /// keeps every failed buffer for [`retry_failed`](Self::retry_failed).
    pub fn submit(&mut self, file: &File, mut buf: AlignedBuf, offset: u64) -> std::io::Result<()> {
        assert_eq!(offset % BLOCK_SIZE as u64, 0, "unaligned write offset {offset}");
        match &mut self.backend {
            Backend::Pwrite => {
                if let Err(err) = file.write_all_at(buf.padded(), offset) {
                    self.failed.push((buf, offset, file.as_raw_fd()));
                    return Err(err);
                }
                self.recycle(buf);
                Ok(())
            }
            Backend::Faulty { faults, held_back } => {
                let fault = faults.decide_write();
                if fault == Some(LocalFault::Reorder) {
                    held_back.push((buf, offset, file.as_raw_fd()));
                    return Ok(());
                }
                if let Err(err) = write_with_fault(faults, fault, file, buf.padded(), offset) {
                    self.failed.push((buf, offset, file.as_raw_fd()));
                    return Err(err);
                }
                Ok(())
            }
            Backend::Uring(_) => {
                let mut earlier_error = None;
                while self.in_flight.len() >= MAX_IN_FLIGHT {
                    if let Err(err) = self.reap(1) {
                        earlier_error.get_or_insert(err);
                    }
                }
                let user_data = self.next_user_data;
                self.next_user_data += 1;
                let padded = buf.padded();
                let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), padded.as_ptr(), padded.len() as u32)
                    .offset(offset)
                    .build()
                    .user_data(user_data);
                let Backend::Uring(ring) = &mut self.backend else { unreachable!() };
                // SAFETY: the buffer is moved into `in_flight` right below and stays there until its
                // completion is reaped, and `file` outlives the write because callers drain the writer
                // (`wait_all`) before they close or drop the file.
                unsafe {
                    if ring.submission().push(&entry).is_err() {
                        ring.submit()?;
                        ring.submission().push(&entry).map_err(|_| std::io::Error::other("io_uring submission queue is full"))?;
                    }
                }
                self.in_flight.insert(user_data, (buf, offset, file.as_raw_fd()));
                ring.submit()?;
                earlier_error.map_or(Ok(()), Err)
            }
        }
    }

    /// Waits for at least `want` completions and checks each one. With the
    /// faulty backend, applies the held-back writes instead, last held first.
    fn reap(&mut self, want: usize) -> std::io::Result<()> {
        if let Backend::Faulty { faults, held_back } = &mut self.backend {
            let mut first_error = None;
            while let Some((mut buf, offset, fd)) = held_back.pop() {
                // SAFETY: `fd` belongs to a file that stays open until the writer has no
                // held writes for it (callers drain the writer before closing); ManuallyDrop
                // keeps it open here.
                let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
                let fault = faults.decide_write().filter(|&fault| fault != LocalFault::Reorder);
                if let Err(err) = write_with_fault(faults, fault, &file, buf.padded(), offset) {
                    first_error.get_or_insert(err);
                    self.failed.push((buf, offset, fd));
                }
            }
            return first_error.map_or(Ok(()), Err);
        }
        let Backend::Uring(ring) = &mut self.backend else { return Ok(()) };
        ring.submit_and_wait(want)?;
        let mut first_error = None;
        let completions: Vec<(u64, i32)> = ring.completion().map(|cqe| (cqe.user_data(), cqe.result())).collect();
        for (user_data, result) in completions {
            let Some((mut buf, offset, fd)) = self.in_flight.remove(&user_data) else { continue };
            let expected = buf.padded().len();
            if result < 0 {
                first_error.get_or_insert(std::io::Error::from_raw_os_error(-result));
                self.failed.push((buf, offset, fd));
            } else if (result as usize) == expected {
                self.recycle(buf);
            } else {
                // A short write (the disk filled up, say) is finished with
                // pwrite, which reports the real cause, such as ENOSPC.
                let done = result as usize;
                // SAFETY: `fd` is the descriptor of the file this write was submitted for, which stays
                // open until every write to it is reaped (see `submit`). ManuallyDrop keeps it open here.
                let file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
                if let Err(err) = file.write_all_at(&buf.padded()[done..], offset + done as u64) {
                    first_error.get_or_insert(err);
                    self.failed.push((buf, offset, fd));
                } else {
                    self.recycle(buf);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Waits until every submitted write has completed.
    pub fn wait_all(&mut self) -> std::io::Result<()> {
        let mut result = Ok(());
        if let Backend::Faulty { held_back, .. } = &self.backend {
            if !held_back.is_empty() {
                result = self.reap(held_back.len());
            }
        }
        while !self.in_flight.is_empty() {
            if let Err(err) = self.reap(1) {
                result = result.and(Err(err));
            }
        }
        result
    }

    /// Returns true when a write to `file` failed and was not yet written again.
    pub fn has_failed_writes(&self, file: &File) -> bool {
        self.failed.iter().any(|(_, _, fd)| *fd == file.as_raw_fd())
    }

    /// Writes every failed write to `file` again, after every submitted
    /// write has completed. A write that fails again is kept for the next
    /// retry, and the first such error is returned.
    ///
    /// NOTE: failed writes are matched to `file` by descriptor number, so a
    /// caller must retry or [`discard_failed`](Self::discard_failed) them
    /// before it closes the file and the number can be reused.
    pub fn retry_failed(&mut self, file: &File) -> std::io::Result<()> {
        // Writes that fail while waiting join `failed` and are retried below.
        let _ = self.wait_all();
        let fd = file.as_raw_fd();
        let (mine, others): (Vec<_>, Vec<_>) = std::mem::take(&mut self.failed).into_iter().partition(|(_, _, f)| *f == fd);
        self.failed = others;
        let mut first_error = None;
        for (mut buf, offset, fd) in mine {
            let written = match &self.backend {
                Backend::Faulty { faults, .. } => {
                    let fault = faults.decide_write().filter(|&fault| fault != LocalFault::Reorder);
                    write_with_fault(faults, fault, file, buf.padded(), offset)
                }
                _ => file.write_all_at(buf.padded(), offset),
            };
            if let Err(err) = written {
                first_error.get_or_insert(err);
                self.failed.push((buf, offset, fd));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Forgets the failed writes to `file`, whose bytes are no longer needed.
    pub fn discard_failed(&mut self, file: &File) {
        let fd = file.as_raw_fd();
        self.failed.retain(|(_, _, f)| *f != fd);
    }

    /// Writes the padded bytes of `buf` at `offset` and waits for the write.
    pub fn write_now(&mut self, file: &File, buf: &mut AlignedBuf, offset: u64) -> std::io::Result<()> {
        self.wait_all()?;
        match &mut self.backend {
            Backend::Pwrite => file.write_all_at(buf.padded(), offset),
            Backend::Faulty { faults, .. } => {
                let fault = faults.decide_write().filter(|&fault| fault != LocalFault::Reorder);
                write_with_fault(faults, fault, file, buf.padded(), offset)
            }
            Backend::Uring(ring) => {
                let padded = buf.padded();
                let entry = opcode::Write::new(types::Fd(file.as_raw_fd()), padded.as_ptr(), padded.len() as u32)
                    .offset(offset)
                    .build()
                    .user_data(0);
                let done = Self::run_one(ring, &entry)?;
                // A short write is finished with pwrite, which reports the real cause, such as ENOSPC.
                if done < padded.len() {
                    file.write_all_at(&padded[done..], offset + done as u64)?;
                }
                Ok(())
            }
        }
    }

    /// Flushes the file's data to stable storage (`fdatasync`), after every
    /// submitted write has completed.
    pub fn sync_data(&mut self, file: &File) -> std::io::Result<()> {
        self.wait_all()?;
        match &mut self.backend {
            Backend::Pwrite => file.sync_data(),
            Backend::Faulty { faults, .. } => match faults.decide_fsync() {
                Some(LocalFault::Fail) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
                Some(LocalFault::NoSpace) => Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
                Some(LocalFault::Delay) => {
                    std::thread::sleep(faults.delay());
                    file.sync_data()
                }
                Some(LocalFault::Tear | LocalFault::Reorder) | None => file.sync_data(),
            },
            Backend::Uring(ring) => {
                let entry = opcode::Fsync::new(types::Fd(file.as_raw_fd()))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(0);
                Self::run_one(ring, &entry).map(|_| ())
            }
        }
    }

    /// Submits one entry, waits for its completion and returns its result:
    /// the bytes written by a write, 0 for an fsync.
    fn run_one(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> std::io::Result<usize> {
        // SAFETY: the caller keeps the entry's buffer alive until this function returns, and it
        // returns only after the completion with user data 0 has been reaped.
        unsafe {
            ring.submission().push(entry).map_err(|_| std::io::Error::other("io_uring submission queue is full"))?;
        }
        loop {
            ring.submit_and_wait(1)?;
            let found = ring.completion().find(|cqe| cqe.user_data() == 0).map(|cqe| cqe.result());
            if let Some(result) = found {
                if result < 0 {
                    return Err(std::io::Error::from_raw_os_error(-result));
                }
                return Ok(result as usize);
            }
        }
    }
}

/// Writes `bytes` at `offset` as `fault` decides: in full, after a delay,
/// a whole-sector prefix then an error, or nothing and an error.
fn write_with_fault(faults: &LocalFaults, fault: Option<LocalFault>, file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    match fault {
        None | Some(LocalFault::Reorder) => file.write_all_at(bytes, offset),
        Some(LocalFault::Delay) => {
            std::thread::sleep(faults.delay());
            file.write_all_at(bytes, offset)
        }
        Some(LocalFault::Fail) => Err(std::io::Error::from_raw_os_error(libc::EIO)),
        Some(kind @ (LocalFault::Tear | LocalFault::NoSpace)) => {
            let prefix = faults.prefix_len(bytes.len());
            file.write_all_at(&bytes[..prefix], offset)?;
            let errno = if kind == LocalFault::Tear { libc::EIO } else { libc::ENOSPC };
            Err(std::io::Error::from_raw_os_error(errno))
        }
    }
}

impl Drop for DiskWriter {
    fn drop(&mut self) {
        // Buffers must not be freed while the kernel may still read them.
        if let Err(err) = self.wait_all() {
            tracing::error!(error = %err, "segment write failed while closing the log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn write_blocks(mode: IoMode) -> (bool, Vec<u8>) {
        let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new().create(true).read(true).write(true).open(&path).unwrap();
        let mut writer = DiskWriter::new(mode).unwrap();
        for i in 0..8u8 {
            let mut buf = AlignedBuf::with_capacity(BLOCK_SIZE);
            buf.extend_from_slice(&[i + 1; 100]);
            writer.submit(&file, buf, i as u64 * BLOCK_SIZE as u64).unwrap();
        }
        writer.sync_data(&file).unwrap();
        let mut bytes = Vec::new();
        std::fs::File::open(&path).unwrap().read_to_end(&mut bytes).unwrap();
        (writer.uses_uring(), bytes)
    }

    #[test]
    fn uring_and_pwrite_write_same_bytes() {
        let (uring_used, with_uring) = write_blocks(IoMode::Auto);
        let (pwrite_used, with_pwrite) = write_blocks(IoMode::Pwrite);
        assert!(!pwrite_used);
        assert_eq!(with_uring, with_pwrite);
        assert_eq!(with_uring.len(), 8 * BLOCK_SIZE);
        assert_eq!(with_uring[BLOCK_SIZE * 3], 4);
        assert_eq!(with_uring[BLOCK_SIZE * 3 + 100], 0);
        // This machine allows io_uring; if it stops doing so the fallback is still covered above.
        if std::env::var_os("CHALK_EXPECT_URING").is_some() {
            assert!(uring_used, "io_uring was expected to be available");
        }
    }

    #[test]
    fn reused_buffer_pads_with_zeros() {
        let mut buf = AlignedBuf::with_capacity(4 * BLOCK_SIZE);
        buf.extend_from_slice(&[0xaa; 3 * BLOCK_SIZE]);
        buf.clear();
        buf.extend_from_slice(&[1; 100]);
        let padded = buf.padded();
        assert_eq!(padded.len(), BLOCK_SIZE);
        assert!(padded[..100].iter().all(|&b| b == 1));
        assert!(padded[100..].iter().all(|&b| b == 0), "stale bytes in the padding after clear");

        buf.extend_from_slice(&[2; 2 * BLOCK_SIZE]);
        buf.keep_tail(2 * BLOCK_SIZE + 50);
        let tail = buf.len();
        let padded = buf.padded();
        assert_eq!(padded.len(), BLOCK_SIZE);
        assert!(padded[..tail].iter().all(|&b| b == 2));
        assert!(padded[tail..].iter().all(|&b| b == 0), "stale bytes in the padding after keep_tail");
    }

    #[test]
    fn writer_reuses_completed_buffers() {
        for mode in [IoMode::Auto, IoMode::Pwrite] {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
            let file = std::fs::OpenOptions::new().create(true).read(true).write(true).open(dir.path().join("f")).unwrap();
            let mut writer = DiskWriter::new(mode.clone()).unwrap();
            let mut first = writer.buffer(2 * BLOCK_SIZE);
            first.extend_from_slice(&[7; 2 * BLOCK_SIZE]);
            let first_ptr = first.as_slice().as_ptr();
            writer.submit(&file, first, 0).unwrap();
            writer.wait_all().unwrap();

            let mut second = writer.buffer(2 * BLOCK_SIZE);
            assert_eq!(second.as_slice().as_ptr(), first_ptr, "{mode:?}: the completed buffer was not reused");
            assert!(second.is_empty());
            second.extend_from_slice(&[9; 10]);
            writer.submit(&file, second, 2 * BLOCK_SIZE as u64).unwrap();
            writer.sync_data(&file).unwrap();

            let bytes = std::fs::read(dir.path().join("f")).unwrap();
            assert_eq!(bytes.len(), 3 * BLOCK_SIZE, "{mode:?}");
            assert!(bytes[..2 * BLOCK_SIZE].iter().all(|&b| b == 7), "{mode:?}");
            assert!(bytes[2 * BLOCK_SIZE..2 * BLOCK_SIZE + 10].iter().all(|&b| b == 9), "{mode:?}");
            assert!(bytes[2 * BLOCK_SIZE + 10..].iter().all(|&b| b == 0), "{mode:?}: a reused buffer wrote stale padding");
        }
    }

    #[test]
    fn setup_refusal_falls_back() {
        for errno in [libc::ENOSYS, libc::EPERM, libc::EACCES] {
            let refused = DiskWriter::choose_ring(Err(std::io::Error::from_raw_os_error(errno))).unwrap();
            assert!(refused.is_none(), "errno {errno} did not fall back");
        }
        assert!(DiskWriter::choose_ring(Err(std::io::Error::from_raw_os_error(libc::EINVAL))).is_err());
    }
}
