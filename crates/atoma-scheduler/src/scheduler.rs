//! The per-step batch plan (vLLM-V1 style, token-budget driven).
//!
//! Each `schedule()` call plans one forward pass:
//! 1. every running sequence in decode takes one token (oldest first); a sequence that needs a
//!    new block when none is free preempts the newest running sequence, whose blocks go back to
//!    the pool and which returns to the front of the queue to be recomputed later;
//! 2. the remaining token budget goes to prefill chunks: first sequences already mid-prompt, then
//!    waiting ones in arrival order, while fewer than `max_num_seqs` run. A new sequence first
//!    takes the blocks of its longest cached prefix (prefix caching) and computes only the rest.
//!    A step that carries decodes gives prefills at most `max_prefill_while_decoding` tokens:
//!    every running stream waits for the whole step, so a long prompt chunk in it would stall
//!    them all (the inter-token latency spikes); prompts then take more, shorter steps.
//!
//! The engine runs the plan and reports sampled tokens and finished sequences with `complete`.
//! Cancellation (`abort`) returns a sequence's blocks at once. The waiting queue is bounded;
//! one more request is `Overloaded`.
//!
//! *Background* sequences (re-executions that verify logged requests) run at low priority:
//! they are admitted only when no live request waits, their prefill chunks come after live
//! ones, and they are preempted first. They are prefill-only and need the logits of every row
//! from `logits_from` on (`PlanItem::logit_rows`, at most `max_logit_rows` per step), so the
//! prefix cache never stands in for those rows.

use std::collections::{HashMap, VecDeque};

use crate::block_pool::{BlockHash, BlockId, BlockPool};

/// Id of a sequence (one request).
pub type SeqId = u64;

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens in one forward pass (decodes + prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Sequences waiting to start; one more is refused.
    pub max_waiting: usize,
    /// Reuse the KV of identical prompt prefixes.
    pub enable_prefix_caching: bool,
    /// Rows with logits one background sequence may take per step (their logits are kept in
    /// memory: `rows × vocabulary × 4` bytes).
    pub max_logit_rows: usize,
    /// Prefill tokens in a step that also decodes (0: no cap beyond the step's budget).
    pub max_prefill_while_decoding: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_batched_tokens: 512,
            max_num_seqs: 32,
            max_waiting: 256,
            enable_prefix_caching: true,
            max_logit_rows: 64,
            max_prefill_while_decoding: 32,
        }
    }
}

/// Why a sequence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedulerError {
    #[error("the queue is full ({capacity} requests waiting)")]
    Overloaded { capacity: usize },
    #[error("{tokens} tokens need more KV blocks than the whole pool holds ({capacity} tokens)")]
    TooLong { tokens: usize, capacity: usize },
    #[error("sequence {0} already exists")]
    Duplicate(SeqId),
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanItem {
    pub seq: SeqId,
    /// Position of the first token of `tokens`.
    pub start: usize,
    /// Tokens to run at positions `start..start + tokens.len()`.
    pub tokens: Vec<u32>,
    /// The sequence's blocks, covering at least positions `0..start + tokens.len()`.
    pub block_table: Vec<BlockId>,
    /// Whether the last row is sampled (decodes, and the final chunk of a prompt); for a
    /// background sequence, whether this is its last chunk.
    pub sample: bool,
    /// How many trailing rows of `tokens` need logits: `sample as usize` for live sequences,
    /// the rows at or after `logits_from` for background ones.
    pub logit_rows: usize,
}

/// One forward pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub items: Vec<PlanItem>,
    /// Sequences preempted to make room; they will be recomputed from scratch.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    /// Tokens in the pass.
    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.tokens.len()).sum()
    }
}

/// What the engine reports for a sequence after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepResult {
    pub seq: SeqId,
    /// The token sampled from the last row (only for items with `sample`).
    pub sampled: Option<u32>,
    /// The sequence is done (stop, length, cancelled): free its blocks.
    pub finished: bool,
}

/// How a sequence is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeqOptions {
    /// Low priority, prefill-only (verification).
    pub background: bool,
    /// First position whose row needs logits (background sequences); the prefix cache is
    /// used only below it.
    pub logits_from: Option<usize>,
}

#[derive(Debug)]
struct Seq {
    opts: SeqOptions,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose KV is in `blocks`.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the leading full blocks registered or reused (prefix chain).
    hashes: Vec<BlockHash>,
    /// Prompt tokens taken from the prefix cache when the sequence first started (a
    /// recomputation after preemption does not change it: it is what the client is told).
    cached_prompt: Option<usize>,
}

/// The scheduler: waiting queue, running set, and the block pool.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Background sequences waiting (admitted only when `waiting` is empty).
    waiting_bg: VecDeque<SeqId>,
    /// Running sequences, oldest first.
    running: Vec<SeqId>,
    stats: SchedulerStats,
}

/// Running totals, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Planned steps.
    pub steps: u64,
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub prefix_hit_tokens: u64,
    /// Sequences preempted (to be recomputed).
    pub preemptions: u64,
    /// Tokens of live sequences run in prefill chunks (prompts, and recomputations after
    /// preemption): what prompt processing cost.
    pub prefill_tokens: u64,
    /// Sequences forked from another's computed prompt (`fork`): prompts not prefilled again.
    pub forks: u64,
}

/// A KV block to copy before a forked sequence runs: `src`'s slots into `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: BlockId,
    pub dst: BlockId,
}

impl Scheduler {
    /// A scheduler over `pool`.
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            waiting_bg: VecDeque::new(),
            running: Vec::new(),
            stats: SchedulerStats::default(),
        }
    }

    /// The block pool.
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// Totals since the start.
    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Live sequences waiting to start.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Background sequences waiting to start.
    pub fn num_waiting_background(&self) -> usize {
        self.waiting_bg.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Tokens with KV in the cache for `seq`.
    pub fn computed(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.computed)
    }

    /// Queues a new live sequence.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>) -> Result<(), SchedulerError> {
        self.add_with(id, prompt, SeqOptions::default())
    }

    /// Queues a new sequence with `opts`.
    pub fn add_with(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        opts: SeqOptions,
    ) -> Result<(), SchedulerError> {
        if prompt.is_empty() {
            return Err(SchedulerError::EmptyPrompt);
        }
        if self.seqs.contains_key(&id) {
            return Err(SchedulerError::Duplicate(id));
        }
        let capacity = self.pool.num_blocks() * self.pool.block_size();
        if prompt.len() > capacity {
            return Err(SchedulerError::TooLong {
                tokens: prompt.len(),
                capacity,
            });
        }
        let queue = if opts.background {
            &mut self.waiting_bg
        } else {
            &mut self.waiting
        };
        if queue.len() >= self.cfg.max_waiting {
            return Err(SchedulerError::Overloaded {
                capacity: self.cfg.max_waiting,
            });
        }
        queue.push_back(id);
        self.seqs.insert(
            id,
            Seq {
                opts,
                tokens: prompt,
                computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                cached_prompt: None,
            },
        );
        Ok(())
    }

    /// Cancels a sequence and frees its blocks at once. Returns whether it existed.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        for b in seq.blocks {
            self.pool.release(b);
        }
        self.waiting.retain(|&s| s != id);
        self.waiting_bg.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
        true
    }

    fn is_background(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.opts.background)
    }

    /// The sequence to preempt when memory runs out: the newest background one, else the newest.
    fn victim(&self, fallback: SeqId) -> SeqId {
        self.running
            .iter()
            .rev()
            .copied()
            .find(|&id| self.is_background(id))
            .or_else(|| self.running.last().copied())
            .unwrap_or(fallback)
    }

    fn preempt(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            for b in seq.blocks.drain(..) {
                self.pool.release(b);
            }
            seq.hashes.clear();
            seq.computed = 0;
        }
        self.running.retain(|&s| s != id);
        if self.is_background(id) {
            self.waiting_bg.push_front(id);
        } else {
            self.waiting.push_front(id);
        }
    }

    /// Makes `seq`'s blocks cover `upto` positions; false if the pool runs out (partial
    /// allocations are kept, they will be used later).
    fn grow(&mut self, id: SeqId, upto: usize) -> bool {
        let bs = self.pool.block_size();
        loop {
            let have = self.seqs[&id].blocks.len() * bs;
            if have >= upto {
                return true;
            }
            let Some(b) = self.pool.allocate() else {
                return false;
            };
            if let Some(s) = self.seqs.get_mut(&id) {
                s.blocks.push(b);
            }
        }
    }

    /// Shares the cached blocks of `id`'s longest cached prefix (leaving at least one token to
    /// compute, since its logits are needed).
    fn reuse_prefix(&mut self, id: SeqId) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.pool.block_size();
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        if seq.computed != 0 {
            return;
        }
        let mut full = (seq.tokens.len() - 1) / bs;
        if let Some(from) = seq.opts.logits_from {
            // Rows that need logits are computed, never taken from the cache.
            full = full.min(from / bs);
        }
        for b in 0..full {
            let parent = seq.hashes.last().copied();
            match self.pool.lookup(parent, &seq.tokens[b * bs..(b + 1) * bs]) {
                Some((block, hash)) => {
                    seq.blocks.push(block);
                    seq.hashes.push(hash);
                    seq.computed += bs;
                    self.stats.prefix_hit_tokens += bs as u64;
                }
                None => break,
            }
        }
        seq.cached_prompt.get_or_insert(seq.computed);
    }

    /// Prompt tokens of `id` whose KV came from the prefix cache when it started (0 before it
    /// started, or for an unknown id).
    pub fn cached_prompt_tokens(&self, id: SeqId) -> usize {
        self.seqs
            .get(&id)
            .and_then(|s| s.cached_prompt)
            .unwrap_or(0)
    }

    fn item(&self, id: SeqId, len: usize) -> PlanItem {
        let s = &self.seqs[&id];
        let sample = s.computed + len == s.tokens.len();
        let logit_rows = match s.opts.logits_from {
            Some(from) => (s.computed + len).saturating_sub(from.max(s.computed)),
            None => usize::from(sample),
        };
        PlanItem {
            seq: id,
            start: s.computed,
            tokens: s.tokens[s.computed..s.computed + len].to_vec(),
            block_table: s.blocks.clone(),
            sample,
            logit_rows,
        }
    }

    /// Plans the next forward pass.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        self.stats.steps += 1;
        // 1. Decodes, oldest first; preempt the newest when out of blocks.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            if s.tokens.len() - s.computed != 1 {
                i += 1;
                continue;
            }
            let upto = s.computed + 1;
            let mut fits = self.grow(id, upto);
            while !fits {
                let victim = self.victim(id);
                self.preempt(victim);
                plan.preempted.push(victim);
                self.stats.preemptions += 1;
                if victim == id {
                    break;
                }
                fits = self.grow(id, upto);
            }
            if fits {
                plan.items.push(self.item(id, 1));
                budget -= 1;
                i += 1;
            }
        }
        // With decodes in the step, prefills get a small share of it so the step stays short.
        let decodes = plan.items.len();
        let cap = self.cfg.max_prefill_while_decoding;
        if decodes > 0 && cap > 0 {
            budget = budget.min(cap);
        }
        // 2. Prefill chunks: running sequences mid-prompt (live ones first), then waiting ones.
        let mut mid: Vec<SeqId> = self
            .running
            .iter()
            .copied()
            .filter(|id| {
                let s = &self.seqs[id];
                let left = s.tokens.len() - s.computed;
                (left > 1 || (s.opts.background && left > 0))
                    && !plan.items.iter().any(|it| it.seq == *id)
            })
            .collect();
        mid.sort_by_key(|&id| self.is_background(id));
        for id in mid {
            if budget == 0 {
                break;
            }
            if let Some(len) = self.plan_prefill(id, budget) {
                if !self.is_background(id) {
                    self.stats.prefill_tokens += len as u64;
                }
                plan.items.push(self.item(id, len));
                budget -= len;
            }
        }
        // No admissions in a step that had to preempt: memory is short (and the victim would
        // otherwise be readmitted at once and thrash).
        while plan.preempted.is_empty() && budget > 0 && self.running.len() < self.cfg.max_num_seqs
        {
            // Background work only when no live request waits.
            let (id, background) = match (self.waiting.front(), self.waiting_bg.front()) {
                (Some(&id), _) => (id, false),
                (None, Some(&id)) => (id, true),
                (None, None) => break,
            };
            self.reuse_prefix(id);
            match self.plan_prefill(id, budget) {
                Some(len) => {
                    if background {
                        self.waiting_bg.pop_front();
                    } else {
                        self.waiting.pop_front();
                    }
                    self.running.push(id);
                    if !background {
                        self.stats.prefill_tokens += len as u64;
                    }
                    plan.items.push(self.item(id, len));
                    budget -= len;
                }
                None => {
                    // Not even one block: wait for running sequences to free some. Give back
                    // what it holds so others can use it.
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        for b in seq.blocks.drain(..) {
                            self.pool.release(b);
                        }
                        seq.hashes.clear();
                        seq.computed = 0;
                    }
                    break;
                }
            }
        }
        plan
    }

    /// Length of the next prefill chunk of `id` within `budget`, with blocks allocated for it.
    /// A background sequence's chunk takes at most `max_logit_rows` rows that need logits.
    fn plan_prefill(&mut self, id: SeqId, budget: usize) -> Option<usize> {
        let bs = self.pool.block_size();
        let s = &self.seqs[&id];
        let mut want = (s.tokens.len() - s.computed).min(budget);
        let start = s.computed;
        if let Some(from) = s.opts.logits_from {
            let free_rows = from.saturating_sub(start);
            want = want.min(free_rows + self.cfg.max_logit_rows.max(1));
        }
        self.grow(id, start + want);
        let covered = self.seqs[&id].blocks.len() * bs;
        let len = want.min(covered.saturating_sub(start));
        (len > 0).then_some(len)
    }

    /// Starts `child` as a copy of `parent` after `prompt_len` computed tokens, followed by
    /// `first_token` (sampled from the parent's last prompt row): the parent's full blocks are
    /// shared, and a partly filled last block is copied (copy-on-write: the engine must copy
    /// the returned block before the child's next step). Call it after the step that computed
    /// the parent's prompt, before `complete`. `None` if the parent is unknown, has not
    /// computed `prompt_len` tokens in its blocks, or no block is free for the copy; the
    /// caller then adds the child as a new sequence.
    pub fn fork(
        &mut self,
        parent: SeqId,
        child: SeqId,
        prompt_len: usize,
        first_token: u32,
    ) -> Option<Option<BlockCopy>> {
        if self.seqs.contains_key(&child) || prompt_len == 0 {
            return None;
        }
        let bs = self.pool.block_size();
        let p = self.seqs.get(&parent)?;
        if p.tokens.len() < prompt_len || p.blocks.len() * bs < prompt_len {
            return None;
        }
        let full = prompt_len / bs;
        let partial = !prompt_len.is_multiple_of(bs);
        let mut tokens = p.tokens[..prompt_len].to_vec();
        tokens.push(first_token);
        let shared: Vec<BlockId> = p.blocks[..full].to_vec();
        let src = partial.then(|| p.blocks[full]);
        let cached_prompt = p.cached_prompt;
        let opts = p.opts;
        let copy = match src {
            Some(src) => {
                let dst = self.pool.allocate()?;
                Some(BlockCopy { src, dst })
            }
            None => None,
        };
        let mut blocks = Vec::with_capacity(full + 1);
        for &b in &shared {
            self.pool.retain(b);
            blocks.push(b);
        }
        if let Some(c) = copy {
            blocks.push(c.dst);
        }
        self.seqs.insert(
            child,
            Seq {
                opts,
                tokens,
                computed: prompt_len,
                blocks,
                hashes: Vec::new(),
                cached_prompt,
            },
        );
        self.running.push(child);
        self.stats.forks += 1;
        Some(copy)
    }

    /// Adds `id` as a sequence that has already started (its prompt plus the tokens it has
    /// generated), to run before any waiting one: for a fork that could not share blocks.
    pub fn add_started(&mut self, id: SeqId, tokens: Vec<u32>) -> Result<(), SchedulerError> {
        self.add(id, tokens)?;
        self.waiting.retain(|&s| s != id);
        self.waiting.push_front(id);
        Ok(())
    }

    /// Applies the outcome of a step: advances the computed positions of planned sequences,
    /// registers newly full blocks in the prefix cache, appends sampled tokens, frees finished
    /// sequences.
    pub fn complete(&mut self, plan: &StepPlan, results: &[StepResult]) {
        let bs = self.pool.block_size();
        for item in &plan.items {
            let Some(seq) = self.seqs.get_mut(&item.seq) else {
                continue; // aborted meanwhile
            };
            if seq.computed != item.start {
                continue; // preempted meanwhile
            }
            seq.computed += item.tokens.len();
            // Registers full blocks in the prefix cache (a fork's shared blocks again: same
            // content, same hash, so the cache keeps the first holder).
            if self.cfg.enable_prefix_caching {
                while (seq.hashes.len() + 1) * bs <= seq.computed {
                    let b = seq.hashes.len();
                    let parent = seq.hashes.last().copied();
                    let h = self.pool.register(
                        seq.blocks[b],
                        parent,
                        &seq.tokens[b * bs..(b + 1) * bs],
                    );
                    seq.hashes.push(h);
                }
            }
        }
        for r in results {
            if r.finished {
                self.abort(r.seq);
            } else if let (Some(t), Some(seq)) = (r.sampled, self.seqs.get_mut(&r.seq)) {
                seq.tokens.push(t);
            }
        }
    }
}
