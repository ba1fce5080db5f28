//! KV blocks: a pool of `num_blocks` blocks of `block_size` token slots each.
//!
//! A block in use has a reference count (sequences sharing a cached prefix share its blocks). A
//! block whose count drops to zero goes to the back of the free list but keeps its contents and
//! its prefix hash: until it is handed out again, a new sequence with the same prefix can take it
//! back (a prefix-cache hit). Allocation takes the least recently freed block first, so the most
//! recently used prefixes survive longest.
//!
//! Block hashes chain: hash(parent block's hash, this block's tokens). A hit is confirmed by
//! comparing the tokens too, so a hash collision can never hand out wrong KV.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a KV block in the pool.
pub type BlockId = u32;

/// Chained hash of a full block of tokens and everything before it.
pub type BlockHash = u64;

#[derive(Debug, Clone, Default)]
struct Block {
    refs: u32,
    /// Set once the block is full and its KV computed: (hash, parent hash, tokens).
    cached: Option<(BlockHash, Option<BlockHash>, Vec<u32>)>,
    /// Position in the free list (its key in `free`), when free.
    free_key: Option<u64>,
}

/// The pool of KV blocks.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// Free blocks by release order (oldest first).
    free: BTreeMap<u64, BlockId>,
    next_key: u64,
    /// Prefix cache: hash → block holding that content.
    by_hash: HashMap<BlockHash, BlockId>,
}

/// Hash of a block of `tokens` following the block hashed `parent`.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    // SipHash-1-3 with fixed keys: deterministic across runs and machines.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks of `block_size` slots.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "block size must be positive");
        let mut pool = Self {
            block_size,
            blocks: vec![Block::default(); num_blocks],
            free: BTreeMap::new(),
            next_key: 0,
            by_hash: HashMap::new(),
        };
        for id in 0..num_blocks as BlockId {
            pool.push_free(id);
        }
        pool
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks that can be allocated now (free, cached or not).
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Reference count of a block.
    pub fn refs(&self, id: BlockId) -> u32 {
        self.blocks[id as usize].refs
    }

    fn push_free(&mut self, id: BlockId) {
        let key = self.next_key;
        self.next_key += 1;
        self.free.insert(key, id);
        self.blocks[id as usize].free_key = Some(key);
    }

    fn take_from_free(&mut self, id: BlockId) {
        if let Some(key) = self.blocks[id as usize].free_key.take() {
            self.free.remove(&key);
        }
    }

    /// Takes a block for new contents (evicting its cached prefix, if any).
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (&key, &id) = self.free.iter().next()?;
        self.free.remove(&key);
        let b = &mut self.blocks[id as usize];
        b.free_key = None;
        b.refs = 1;
        if let Some((hash, _, _)) = b.cached.take()
            && self.by_hash.get(&hash) == Some(&id)
        {
            self.by_hash.remove(&hash);
        }
        Some(id)
    }

    /// Drops one reference; at zero the block becomes free (keeping its cached contents).
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        assert!(b.refs > 0, "block {id} released more often than taken");
        b.refs -= 1;
        if b.refs == 0 {
            self.push_free(id);
        }
    }

    /// Takes one more reference to a block in use (a forked sequence sharing it).
    pub fn retain(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        assert!(b.refs > 0, "block {id} is not in use");
        b.refs += 1;
    }

    /// Records that `id` now holds the full block `tokens` after the block hashed `parent`;
    /// returns its hash. A block whose content is already cached elsewhere stays uncached.
    pub fn register(
        &mut self,
        id: BlockId,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size);
        let hash = block_hash(parent, tokens);
        self.by_hash.entry(hash).or_insert(id);
        self.blocks[id as usize].cached = Some((hash, parent, tokens.to_vec()));
        hash
    }

    /// Takes a reference to the cached block holding `tokens` after `parent`, if any.
    pub fn lookup(
        &mut self,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> Option<(BlockId, BlockHash)> {
        let hash = block_hash(parent, tokens);
        let id = *self.by_hash.get(&hash)?;
        match &self.blocks[id as usize].cached {
            Some((h, p, t)) if *h == hash && *p == parent && t == tokens => {}
            _ => return None,
        }
        self.take_from_free(id);
        self.blocks[id as usize].refs += 1;
        Some((id, hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_exhaust() {
        let mut p = BlockPool::new(3, 4);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert_eq!(p.allocate(), None);
        assert_eq!(p.num_free(), 0);
        p.release(b);
        assert_eq!(p.allocate(), Some(b));
        p.release(a);
        p.release(c);
        assert_eq!(p.num_free(), 2);
        // Least recently freed first.
        assert_eq!(p.allocate(), Some(a));
    }

    #[test]
    fn cached_blocks_are_shared_and_survive_until_reused() {
        let mut p = BlockPool::new(2, 2);
        let a = p.allocate().unwrap();
        let h = p.register(a, None, &[1, 2]);
        assert_eq!(p.lookup(None, &[1, 2]), Some((a, h)));
        assert_eq!(p.refs(a), 2);
        assert_eq!(p.lookup(None, &[1, 3]), None);
        assert_eq!(
            p.lookup(Some(7), &[1, 2]),
            None,
            "a different parent is a different prefix"
        );
        p.release(a);
        p.release(a);
        // Free but still cached: a later sequence revives it.
        assert_eq!(p.lookup(None, &[1, 2]), Some((a, h)));
        assert_eq!(p.num_free(), 1);
        p.release(a);
        // Reallocating evicts it.
        let b = p.allocate().unwrap();
        let c = p.allocate().unwrap();
        assert!(b == a || c == a);
        assert_eq!(p.lookup(None, &[1, 2]), None);
    }

    #[test]
    fn hashes_chain_and_are_stable() {
        assert_eq!(block_hash(None, &[1, 2]), block_hash(None, &[1, 2]));
        assert_ne!(
            block_hash(None, &[1, 2]),
            block_hash(Some(block_hash(None, &[0, 0])), &[1, 2])
        );
    }

    #[test]
    #[should_panic(expected = "released more often")]
    fn double_release_is_a_bug() {
        let mut p = BlockPool::new(1, 1);
        let a = p.allocate().unwrap();
        p.release(a);
        p.release(a);
    }
}
