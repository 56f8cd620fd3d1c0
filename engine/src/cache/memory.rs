//! The memory tier: blocks of one process, bounded in bytes, evicted least
//! recently used first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Block, BlockKey};

/// Blocks in memory with their recency.
pub(crate) struct MemoryTier {
    limit_bytes: u64,
    state: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    /// Each block with the tick of its last use.
    blocks: HashMap<BlockKey, (Arc<Block>, u64)>,
    /// Keys by the tick of their last use, oldest first.
    order: BTreeMap<u64, BlockKey>,
    next_tick: u64,
    bytes: u64,
}

impl Lru {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }
}

impl MemoryTier {
    pub fn new(limit_bytes: u64) -> Self {
        MemoryTier { limit_bytes, state: Mutex::new(Lru::default()) }
    }

    /// Returns a block and marks it as the most recently used.
    pub fn get(&self, key: &BlockKey) -> Option<Arc<Block>> {
        let mut lru = self.state.lock();
        let tick = lru.tick();
        let (block, old_tick) = lru.blocks.get_mut(key)?;
        let block = Arc::clone(block);
        let old_tick = std::mem::replace(old_tick, tick);
        lru.order.remove(&old_tick);
        lru.order.insert(tick, *key);
        Some(block)
    }

    /// Inserts a block as the most recently used, replacing any block under
    /// the same key, and evicts the least recently used blocks until the tier
    /// fits its limit. Returns how many blocks were evicted.
    pub fn insert(&self, key: BlockKey, block: Arc<Block>) -> usize {
        let mut lru = self.state.lock();
        let tick = lru.tick();
        let len = block.len() as u64;
        if let Some((old, old_tick)) = lru.blocks.insert(key, (block, tick)) {
            lru.order.remove(&old_tick);
            lru.bytes -= old.len() as u64;
        }
        lru.order.insert(tick, key);
        lru.bytes += len;

        let mut evicted = 0;
        while lru.bytes > self.limit_bytes {
            let Some((_, oldest)) = lru.order.pop_first() else { break };
            let (old, _) = lru.blocks.remove(&oldest).expect("order and blocks hold the same keys");
            lru.bytes -= old.len() as u64;
            evicted += 1;
        }
        evicted
    }

    /// Drops a block, so the next read fetches it again.
    pub fn remove(&self, key: &BlockKey) {
        let mut lru = self.state.lock();
        if let Some((old, tick)) = lru.blocks.remove(key) {
            lru.order.remove(&tick);
            lru.bytes -= old.len() as u64;
        }
    }

    pub fn contains(&self, key: &BlockKey) -> bool {
        self.state.lock().blocks.contains_key(key)
    }

    /// Bytes and blocks held.
    pub fn usage(&self) -> (u64, u64) {
        let lru = self.state.lock();
        (lru.bytes, lru.blocks.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SegmentId;

    fn key(segment: SegmentId, index: u64) -> BlockKey {
        BlockKey { segment, index }
    }

    #[test]
    fn least_recently_used_block_goes_first() {
        let tier = MemoryTier::new(300);
        let segment = SegmentId::generate();
        for index in 0..3 {
            assert_eq!(tier.insert(key(segment, index), Arc::new(Block::new(vec![0; 100]))), 0);
        }
        // Use block 0, so block 1 is now the least recently used.
        assert!(tier.get(&key(segment, 0)).is_some());
        assert_eq!(tier.insert(key(segment, 3), Arc::new(Block::new(vec![0; 100]))), 1);
        assert!(tier.contains(&key(segment, 0)));
        assert!(!tier.contains(&key(segment, 1)));
        assert!(tier.contains(&key(segment, 2)));
        assert_eq!(tier.usage(), (300, 3));
    }

    #[test]
    fn replacing_a_block_keeps_the_byte_count() {
        let tier = MemoryTier::new(1000);
        let segment = SegmentId::generate();
        tier.insert(key(segment, 0), Arc::new(Block::new(vec![0; 100])));
        tier.insert(key(segment, 0), Arc::new(Block::new(vec![0; 40])));
        assert_eq!(tier.usage(), (40, 1));
        tier.remove(&key(segment, 0));
        assert_eq!(tier.usage(), (0, 0));
    }
}
