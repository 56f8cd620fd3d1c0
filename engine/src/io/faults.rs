//! Local write and fsync faults for tests: a backend of [`DiskWriter`]
//! that decides each write and each fsync of the segment log from a seed.
//!
//! Only tests construct it, through [`IoMode::Faulty`]. Decision `n` of an
//! injector is a hash of the seed and `n`, so a session that makes the same
//! calls in the same order meets the same faults, and a failure reproduces
//! from the seed it prints.
//!
//! [`DiskWriter`]: super::DiskWriter
//! [`IoMode::Faulty`]: super::IoMode::Faulty

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Sector size that a torn write keeps whole: O_DIRECT writes fail on
/// offsets and lengths that are not multiples of the logical block size.
const TEAR_UNIT_BYTES: usize = 4096;

/// Longest injected delay.
const DELAY_MAX_MICROS: u64 = 2_000;

/// The fault injected into one write or fsync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalFault {
    /// Nothing is written and the call fails with `EIO`.
    Fail,
    /// The call waits up to 2 ms and then succeeds.
    Delay,
    /// A whole-sector prefix of the bytes is written, then the call fails
    /// with `EIO`, as a power cut or a failing device can leave a write.
    Tear,
    /// The write is held back and lands after writes submitted later,
    /// when the writer next waits for its writes. Fsyncs are not reordered.
    Reorder,
    /// The call fails with `ENOSPC`; a write first stores the prefix that
    /// fitted, as a filling disk does.
    NoSpace,
}

impl LocalFault {
    pub const ALL: [LocalFault; 5] = [LocalFault::Fail, LocalFault::Delay, LocalFault::Tear, LocalFault::Reorder, LocalFault::NoSpace];

    fn index(self) -> usize {
        match self {
            LocalFault::Fail => 0,
            LocalFault::Delay => 1,
            LocalFault::Tear => 2,
            LocalFault::Reorder => 3,
            LocalFault::NoSpace => 4,
        }
    }

    fn applies_to_fsync(self) -> bool {
        matches!(self, LocalFault::Fail | LocalFault::Delay | LocalFault::NoSpace)
    }
}

/// Faults injected so far, by kind, and the calls they were drawn for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalFaultCounts {
    pub writes: u64,
    pub fsyncs: u64,
    pub failed: u64,
    pub delayed: u64,
    pub torn: u64,
    pub reordered: u64,
    pub no_space: u64,
}

impl LocalFaultCounts {
    /// Faults of every kind.
    pub fn total(&self) -> u64 {
        self.failed + self.delayed + self.torn + self.reordered + self.no_space
    }
}

impl fmt::Display for LocalFaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} faults in {} writes and {} fsyncs: {} failed, {} delayed, {} torn, {} reordered, {} out of space",
            self.total(),
            self.writes,
            self.fsyncs,
            self.failed,
            self.delayed,
            self.torn,
            self.reordered,
            self.no_space
        )
    }
}

struct Injector {
    seed: u64,
    /// Fault probability per call, in millionths; changed by [`LocalFaults::set_rate`].
    rate_per_million: AtomicU32,
    kinds: Vec<LocalFault>,
    /// Set by [`LocalFaults::set_fsyncs_only`]: writes draw no faults.
    fsyncs_only: AtomicBool,
    next_decision: AtomicU64,
    writes: AtomicU64,
    fsyncs: AtomicU64,
    by_kind: [AtomicU64; 5],
}

/// A seeded source of local write faults, shared by every writer of the
/// stores it is given to. Clones share the seed, the decision sequence and
/// the counts.
#[doc(hidden)]
#[derive(Clone)]
pub struct LocalFaults(Arc<Injector>);

impl fmt::Debug for LocalFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalFaults").field("seed", &self.0.seed).field("rate", &self.rate()).finish_non_exhaustive()
    }
}

impl PartialEq for LocalFaults {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for LocalFaults {}

impl LocalFaults {
    /// Injects a fault of one of `kinds`, picked evenly, into each call with
    /// probability `rate` (0.0 to 1.0). Fsyncs draw only kinds that apply to them.
    pub fn new(seed: u64, rate: f64, kinds: &[LocalFault]) -> Self {
        assert!(!kinds.is_empty(), "give at least one fault kind");
        let injector = Injector {
            seed,
            rate_per_million: AtomicU32::new(Self::per_million(rate)),
            kinds: kinds.to_vec(),
            fsyncs_only: AtomicBool::new(false),
            next_decision: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            by_kind: Default::default(),
        };
        LocalFaults(Arc::new(injector))
    }

    fn per_million(rate: f64) -> u32 {
        assert!((0.0..=1.0).contains(&rate), "fault rate {rate} is not between 0 and 1");
        (rate * 1e6).round() as u32
    }

    pub fn seed(&self) -> u64 {
        self.0.seed
    }

    pub fn rate(&self) -> f64 {
        self.0.rate_per_million.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Changes the fault rate from the next call on; 0 stops injecting.
    pub fn set_rate(&self, rate: f64) {
        self.0.rate_per_million.store(Self::per_million(rate), Ordering::Relaxed);
    }

    /// Limits faults to fsyncs when `on`, so that a test can fail a sync's
    /// fsync after its writes landed.
    pub fn set_fsyncs_only(&self, on: bool) {
        self.0.fsyncs_only.store(on, Ordering::Relaxed);
    }

    pub fn counts(&self) -> LocalFaultCounts {
        let injector = &self.0;
        let kind = |fault: LocalFault| injector.by_kind[fault.index()].load(Ordering::Relaxed);
        LocalFaultCounts {
            writes: injector.writes.load(Ordering::Relaxed),
            fsyncs: injector.fsyncs.load(Ordering::Relaxed),
            failed: kind(LocalFault::Fail),
            delayed: kind(LocalFault::Delay),
            torn: kind(LocalFault::Tear),
            reordered: kind(LocalFault::Reorder),
            no_space: kind(LocalFault::NoSpace),
        }
    }

    /// Draws the next pseudo-random number of the decision sequence.
    fn draw(&self) -> u64 {
        let n = self.0.next_decision.fetch_add(1, Ordering::Relaxed);
        splitmix64(self.0.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Decides the fault of one write, if any.
    pub(super) fn decide_write(&self) -> Option<LocalFault> {
        self.0.writes.fetch_add(1, Ordering::Relaxed);
        if self.0.fsyncs_only.load(Ordering::Relaxed) {
            return None;
        }
        self.decide(|_| true)
    }

    /// Decides the fault of one fsync, if any.
    pub(super) fn decide_fsync(&self) -> Option<LocalFault> {
        self.0.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.decide(LocalFault::applies_to_fsync)
    }

    fn decide(&self, allowed: impl Fn(LocalFault) -> bool) -> Option<LocalFault> {
        let roll = self.draw();
        if roll % 1_000_000 >= u64::from(self.0.rate_per_million.load(Ordering::Relaxed)) {
            return None;
        }
        let kinds: Vec<LocalFault> = self.0.kinds.iter().copied().filter(|&kind| allowed(kind)).collect();
        if kinds.is_empty() {
            return None;
        }
        let fault = kinds[(self.draw() % kinds.len() as u64) as usize];
        self.0.by_kind[fault.index()].fetch_add(1, Ordering::Relaxed);
        Some(fault)
    }

    /// Returns how long an injected delay lasts.
    pub(super) fn delay(&self) -> Duration {
        Duration::from_micros(self.draw() % DELAY_MAX_MICROS)
    }

    /// Returns how many bytes of a `len`-byte write a torn or out-of-space
    /// write stores: whole sectors, fewer than `len`, possibly none.
    pub(super) fn prefix_len(&self, len: usize) -> usize {
        let sectors = len / TEAR_UNIT_BYTES;
        if sectors == 0 {
            return 0;
        }
        (self.draw() % sectors as u64) as usize * TEAR_UNIT_BYTES
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_draws_same_faults() {
        let draw_all = |faults: &LocalFaults| (0..1000).map(|_| faults.decide_write()).collect::<Vec<_>>();
        let first = draw_all(&LocalFaults::new(7, 0.1, &LocalFault::ALL));
        let again = draw_all(&LocalFaults::new(7, 0.1, &LocalFault::ALL));
        let other = draw_all(&LocalFaults::new(8, 0.1, &LocalFault::ALL));
        assert_eq!(first, again);
        assert_ne!(first, other);
        let injected = first.iter().filter(|fault| fault.is_some()).count();
        assert!((50..=150).contains(&injected), "{injected} faults in 1000 draws at a 10% rate");
    }

    #[test]
    fn fsyncs_draw_only_fsync_faults() {
        let faults = LocalFaults::new(1, 1.0, &[LocalFault::Tear, LocalFault::Reorder, LocalFault::Fail]);
        for _ in 0..100 {
            assert_eq!(faults.decide_fsync(), Some(LocalFault::Fail));
        }
        assert_eq!(faults.counts().fsyncs, 100);
    }
}
