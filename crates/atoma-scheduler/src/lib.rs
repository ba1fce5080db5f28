//! Continuous batching with a paged KV cache, as bookkeeping only: which sequence's tokens run
//! in the next forward pass, at which positions, in which KV blocks. No tensors here; the engine
//! turns a `StepPlan` into one batched forward and reports back with `Scheduler::complete`.
//!
//! - `block_pool`: fixed-size KV blocks with reference counts, a free list in LRU order, and a
//!   prefix cache (chained block hashes), so a prompt prefix shared by many requests is computed
//!   and stored once.
//! - `scheduler`: a bounded waiting queue (overflow is `Overloaded`), and per step decodes first,
//!   then prefill chunks under a token budget and a cap on sequences; when blocks run out, the
//!   newest running sequence is preempted (recomputed later). Background sequences
//!   (verification) run on leftover budget, preempted first, with logits for a range of rows.

pub mod block_pool;
pub mod scheduler;

pub use block_pool::{BlockId, BlockPool};
pub use scheduler::{
    BlockCopy, PlanItem, Scheduler, SchedulerConfig, SchedulerError, SchedulerStats, SeqId,
    SeqOptions, StepPlan, StepResult,
};
