//! The seeded workload of the kill-and-recover test.
//!
//! `chalk-kill-child` applies the steps to a real session and the test
//! replays the same steps on a plain in-memory tree, so both know, for
//! every sync, exactly which files the published version must hold. Steps
//! depend only on the seed and the tree the workload starts from.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Files of a version: path inside the volume to contents.
pub type Tree = BTreeMap<String, Vec<u8>>;

/// Directory that exists in every version the workload runs on.
pub const SUBDIR: &str = "sub";

/// Paths the workload writes: ten in the volume root, six in [`SUBDIR`].
pub fn file_paths() -> Vec<String> {
    let root = (0..10).map(|i| format!("f{i:02}"));
    let sub = (0..6).map(|i| format!("{SUBDIR}/g{i:02}"));
    root.chain(sub).collect()
}

/// Largest file a `Put` step writes. Some steps span several 1 MiB chunks
/// of the segment writer, so kills also land between block writes.
const PUT_MAX_BYTES: usize = 3 << 20;

/// One change, or a sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Create or replace a whole file.
    Put { path: String, data: Vec<u8> },
    /// Write `data` at `offset` of an existing file, growing it if needed.
    Write { path: String, offset: u64, data: Vec<u8> },
    /// Set the size of an existing file.
    Truncate { path: String, size: u64 },
    /// Rename an existing file, replacing the target.
    Rename { from: String, to: String },
    /// Remove an existing file.
    Unlink { path: String },
    /// Publish everything so far; `number` counts the syncs of this run from 1.
    Sync { number: u64 },
}

/// Formats the message a run stores with its sync `number`, so the test can
/// map versions back to syncs.
pub fn sync_message(seed: u64, number: u64) -> String {
    format!("kill workload seed {seed} sync {number}")
}

/// A seeded generator of steps with the tree they produce.
pub struct Workload {
    rng: StdRng,
    tree: Tree,
    paths: Vec<String>,
    syncs: u64,
    /// Whether a change came after the last sync; a sync is drawn only then,
    /// because a sync without changes publishes no version.
    changed: bool,
}

impl Workload {
    /// Starts from `tree`, the files of the version the run opens.
    pub fn new(seed: u64, tree: Tree) -> Self {
        Workload { rng: StdRng::seed_from_u64(seed), tree, paths: file_paths(), syncs: 0, changed: false }
    }

    /// Returns the tree after every step returned so far.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Draws the next step and applies it to the tree.
    pub fn next_step(&mut self) -> Step {
        loop {
            if let Some(step) = self.draw() {
                self.apply(&step);
                return step;
            }
        }
    }

    fn random_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.rng.fill_bytes(&mut data);
        data
    }

    fn random_path(&mut self) -> String {
        self.paths[self.rng.gen_range(0..self.paths.len())].clone()
    }

    /// Draws a step, or `None` when the drawn kind does not apply to the tree.
    fn draw(&mut self) -> Option<Step> {
        let path = self.random_path();
        let exists = self.tree.contains_key(&path);
        let step = match self.rng.gen_range(0..100) {
            0..=24 => {
                // Mostly small files, sometimes several MiB.
                let len = if self.rng.gen_bool(0.2) { self.rng.gen_range(0..PUT_MAX_BYTES) } else { self.rng.gen_range(0..64 << 10) };
                Step::Put { path, data: self.random_bytes(len) }
            }
            25..=49 if exists => {
                let size = self.tree[&path].len() as u64;
                let offset = self.rng.gen_range(0..=size + 8192);
                let len = self.rng.gen_range(1..256 << 10);
                Step::Write { path, offset, data: self.random_bytes(len) }
            }
            50..=59 if exists => {
                let size = self.tree[&path].len() as u64;
                Step::Truncate { path, size: self.rng.gen_range(0..=size + 65536) }
            }
            60..=74 if exists => {
                let to = self.random_path();
                if to == path {
                    return None;
                }
                Step::Rename { from: path, to }
            }
            75..=84 if exists => Step::Unlink { path },
            85..=99 if self.changed => {
                self.syncs += 1;
                Step::Sync { number: self.syncs }
            }
            _ => return None,
        };
        Some(step)
    }

    fn apply(&mut self, step: &Step) {
        self.changed = !matches!(step, Step::Sync { .. });
        match step {
            Step::Put { path, data } => {
                self.tree.insert(path.clone(), data.clone());
            }
            Step::Write { path, offset, data } => {
                let contents = self.tree.get_mut(path).expect("write steps name existing files");
                let end = *offset as usize + data.len();
                if contents.len() < end {
                    contents.resize(end, 0);
                }
                contents[*offset as usize..end].copy_from_slice(data);
            }
            Step::Truncate { path, size } => {
                self.tree.get_mut(path).expect("truncate steps name existing files").resize(*size as usize, 0);
            }
            Step::Rename { from, to } => {
                let data = self.tree.remove(from).expect("rename steps name existing files");
                self.tree.insert(to.clone(), data);
            }
            Step::Unlink { path } => {
                self.tree.remove(path);
            }
            Step::Sync { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_gives_same_steps() {
        let mut a = Workload::new(9, Tree::new());
        let mut b = Workload::new(9, Tree::new());
        for _ in 0..200 {
            assert_eq!(a.next_step(), b.next_step());
        }
        assert_eq!(a.tree(), b.tree());
    }

    #[test]
    fn steps_only_touch_existing_files() {
        let mut workload = Workload::new(3, Tree::new());
        for _ in 0..500 {
            let before = workload.tree().clone();
            match workload.next_step() {
                Step::Write { path, .. } | Step::Truncate { path, .. } | Step::Unlink { path } => {
                    assert!(before.contains_key(&path), "{path} did not exist");
                }
                Step::Rename { from, to } => {
                    assert!(before.contains_key(&from), "{from} did not exist");
                    assert_ne!(from, to);
                }
                Step::Put { .. } | Step::Sync { .. } => {}
            }
        }
    }
}
