//! Worker threads of a read-only mount. One thread reads FUSE requests and
//! serves those it can from memory or the local disk. Reads from a
//! remote store, and opens that must copy or check a passthrough file, go
//! to these workers with their reply.
//!
//! Why: a mount served by several FUSE threads pays a thread wake-up on
//! almost every request. On warm small files (open, read from the page
//! cache, release) one thread serves a release and the next open without
//! sleeping in between, while the requests that may wait on the object
//! store, or on a copy of a whole file, still run side by side.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of threads that run jobs in the order they were queued.
pub(crate) struct Workers {
    /// `None` once dropping has begun, which ends the threads.
    queue: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads (at least one).
    pub(crate) fn start(count: usize) -> io::Result<Self> {
        let (queue, jobs) = mpsc::channel::<Job>();
        let jobs = Arc::new(Mutex::new(jobs));
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let jobs = Arc::clone(&jobs);
            let thread = std::thread::Builder::new()
                .name(format!("chalk-fuse-io-{index}"))
                .spawn(move || serve(&jobs))?;
            threads.push(thread);
        }
        Ok(Workers { queue: Some(queue), threads })
    }

    /// Number of threads.
    pub(crate) fn count(&self) -> usize {
        self.threads.len()
    }

    /// Queues `job` for the next free thread.
    pub(crate) fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        // A send fails only if every thread has ended, because the threads
        // hold the receiving end. The job then runs on this thread.
        let unsent = match &self.queue {
            Some(queue) => queue.send(job).err().map(|error| error.0),
            None => Some(job),
        };
        if let Some(job) = unsent {
            job();
        }
    }
}

/// Runs jobs until the queue is closed. A job that panics is logged; its
/// reply is dropped unsent, which fails the request with EIO.
fn serve(jobs: &Mutex<Receiver<Job>>) {
    loop {
        let next = jobs.lock().recv();
        let Ok(job) = next else { return };
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            tracing::error!("a FUSE worker job panicked; its request failed with EIO");
        }
    }
}

impl Drop for Workers {
    /// Closes the queue, lets queued jobs finish and waits for the threads.
    fn drop(&mut self) {
        self.queue = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;

    #[test]
    fn queued_jobs_all_run_before_drop_returns() {
        let done = Arc::new(AtomicUsize::new(0));
        let workers = Workers::start(3).unwrap();
        for _ in 0..100 {
            let done = Arc::clone(&done);
            workers.run(move || {
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        drop(workers);
        assert_eq!(done.load(Ordering::SeqCst), 100);
    }

    #[test]
    fn jobs_run_side_by_side() {
        // Each job waits for the other, so this ends only if two threads
        // run them at the same time.
        let barrier = Arc::new(Barrier::new(2));
        let workers = Workers::start(2).unwrap();
        let (sender, receiver) = mpsc::channel();
        for _ in 0..2 {
            let (barrier, sender) = (Arc::clone(&barrier), sender.clone());
            workers.run(move || {
                barrier.wait();
                sender.send(()).unwrap();
            });
        }
        for _ in 0..2 {
            receiver.recv_timeout(std::time::Duration::from_secs(10)).expect("two jobs did not run side by side");
        }
    }

    #[test]
    fn worker_survives_a_panicking_job() {
        let workers = Workers::start(1).unwrap();
        workers.run(|| panic!("job failure for the test"));
        let (sender, receiver) = mpsc::channel();
        workers.run(move || sender.send(()).unwrap());
        receiver.recv_timeout(std::time::Duration::from_secs(10)).expect("the job after a panic did not run");
    }
}
