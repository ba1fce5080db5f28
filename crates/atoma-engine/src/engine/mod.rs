//! The serving engine: one worker thread running continuous batching over a paged KV cache.
//!
//! `Engine::submit` validates a request, counts it against the bounded waiting queue (one too
//! many is `EngineError::Overloaded`) and returns a `GenerationStream`. The worker loop:
//!
//! 1. takes new requests into the `atoma_scheduler::Scheduler`;
//! 2. drops requests whose stream was dropped or cancelled (their KV blocks are freed at once);
//! 3. asks the scheduler for a step plan (decodes first, then prefill chunks, prefix-cache hits,
//!    preemption when blocks run out) and runs it as one `Model::forward_paged` pass;
//! 4. samples each sampling row with its request's own seeded sampler, emits token events, and
//!    reports sampled tokens and finished requests back to the scheduler.
//!
//! A request's tokens do not depend on the rest of the batch: every per-row operation of the
//! forward pass (quantized matmuls, norms, paged attention) computes a row the same way whatever
//! else is in the pass, and each request has its own sampler. Preempted requests are recomputed
//! from their tokens and keep their sampler, so preemption does not change their output either.
//!
//! `Engine::submit_group` runs several requests with one prompt (OpenAI's `n`): the first is
//! prefilled; when its prompt is computed, each other member samples its first token from the
//! same last-prompt row with its own sampler and is forked from it (the scheduler shares the
//! full KV blocks and the engine copies a partly filled last block), so the prompt is computed
//! once. Every member's output is bit-identical to what it would give alone.
//!
//! `Engine::verify` re-executes a logged request (`crate::verify`) in the same passes, as a
//! background sequence: it waits for live requests, takes leftover budget, is preempted first,
//! and gets the logits of every output position in a teacher-forced prefill.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Instant;

use std::sync::Mutex;

use atoma_scheduler::{
    BlockPool, Scheduler, SchedulerConfig, SchedulerStats, SeqId, SeqOptions, StepResult,
};

/// One member of a submitted group, as the worker receives it.
struct Member {
    req: GenerateRequest,
    constraint: Option<Constraint>,
    events: UnboundedSender<GenerationEvent>,
    cancel: Arc<AtomicBool>,
}
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, GenerateRequest, Generation, GenerationEvent, validate};
use crate::grammar::Constraint;
use crate::loaded::LoadedModel;
use crate::model::{BatchSeq, KernelChoice, KvDtype, PagedKv, select_kernel};
use crate::verify::{Verdict, VerifyRequest, VerifyState};

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// CPU kernel of the quantized matmuls and vector math; fixed once per process (the first
    /// engine's choice holds; `Auto` accepts the level already in use).
    pub kernel: KernelChoice,
    /// Requests that may wait to start; one more is refused as overloaded.
    pub queue_capacity: usize,
    /// Requests generating at once.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass (decodes plus prefill chunks).
    pub max_num_batched_tokens: usize,
    /// Memory for the paged KV cache, in MiB. It always holds at least one full context.
    pub kv_cache_mib: usize,
    /// Exact number of KV blocks, overriding `kv_cache_mib` (tests and experiments).
    pub kv_cache_blocks: Option<usize>,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Compute a prompt prefix shared by several requests once.
    pub enable_prefix_caching: bool,
    /// Element type of the KV cache.
    pub kv_dtype: KvDtype,
    /// Rows with logits a verification may take per step (each holds a vocabulary of `f32`).
    pub max_verify_rows: usize,
    /// Prompt tokens in a step that also decodes (0: no cap), so that a long prompt does not
    /// stall the running streams' next tokens.
    pub max_prefill_while_decoding: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kernel: KernelChoice::Auto,
            queue_capacity: 64,
            max_num_seqs: 32,
            max_num_batched_tokens: 512,
            kv_cache_mib: 512,
            kv_cache_blocks: None,
            block_size: 16,
            enable_prefix_caching: true,
            kv_dtype: KvDtype::default(),
            max_verify_rows: 64,
            max_prefill_while_decoding: 32,
        }
    }
}

impl EngineConfig {
    /// Number of KV blocks for `model` under this budget (at least one context's worth, unless
    /// `kv_cache_blocks` says exactly).
    pub fn kv_blocks(&self, model: &LoadedModel) -> usize {
        let cfg = model.model.config();
        if let Some(n) = self.kv_cache_blocks {
            return n.max(1);
        }
        let per_token = PagedKv::token_bytes(cfg, self.kv_dtype);
        let per_block = per_token * self.block_size.max(1);
        let budget = self.kv_cache_mib * 1024 * 1024 / per_block.max(1);
        budget.max(cfg.context.div_ceil(self.block_size.max(1)))
    }
}

enum Job {
    /// Requests sharing one prompt (a single request is a group of one): the first is
    /// prefilled, the others forked from it.
    Generate {
        members: Vec<Member>,
        enqueued: Instant,
    },
    Verify {
        req: VerifyRequest,
        constraint: Option<Constraint>,
        reply: oneshot::Sender<Result<Verdict>>,
    },
}

/// A running engine. Cloning gives another handle to the same worker.
#[derive(Clone)]
pub struct Engine {
    model: Arc<LoadedModel>,
    jobs: Sender<Job>,
    waiting: Arc<AtomicUsize>,
    capacity: usize,
    /// Tokens the KV pool holds; a request's prompt plus output must fit.
    kv_tokens: usize,
    kv_dtype: crate::KvDtype,
    stats: Arc<Mutex<EngineStats>>,
    /// False once the worker thread has ended (normally only when it panicked).
    alive: Arc<AtomicBool>,
}

/// Clears the engine's liveness flag when the worker thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Version of the engine's numerics: bump it whenever any kernel, reduction order or sampler
/// change alters a single output bit, so that logs from different numerics are never compared
/// (`Engine::determinism_class`).
pub const NUMERICS_VERSION: u32 = 1;

/// What the engine has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub scheduler: SchedulerStats,
    /// Requests generating now.
    pub running: usize,
    /// KV blocks held by requests (free blocks kept for the prefix cache not included).
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info.name)
            .field("capacity", &self.capacity)
            .field("kv_tokens", &self.kv_tokens)
            .finish()
    }
}

impl Engine {
    /// Allocates the KV cache and starts the worker thread for `model`.
    pub fn start(model: LoadedModel, cfg: &EngineConfig) -> Result<Self> {
        select_kernel(cfg.kernel)?;
        if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "block_size, max_num_seqs and max_num_batched_tokens must be at least 1".into(),
            ));
        }
        let model = Arc::new(model);
        let blocks = cfg.kv_blocks(&model);
        let kv = PagedKv::with_dtype(model.model.config(), blocks, cfg.block_size, cfg.kv_dtype);
        tracing::info!(
            blocks,
            block_size = cfg.block_size,
            tokens = blocks * cfg.block_size,
            mib = kv.bytes() / (1024 * 1024),
            "KV cache allocated"
        );
        let sched = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                // The submit-side counter bounds the queue; the scheduler never refuses.
                max_waiting: usize::MAX,
                enable_prefix_caching: cfg.enable_prefix_caching,
                max_logit_rows: cfg.max_verify_rows.max(1),
                max_prefill_while_decoding: cfg.max_prefill_while_decoding,
            },
            BlockPool::new(blocks, cfg.block_size),
        );
        let (jobs, rx) = channel::<Job>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let mut worker = Worker {
            model: model.clone(),
            sched,
            kv,
            active: HashMap::new(),
            followers: HashMap::new(),
            next_id: 0,
            waiting: waiting.clone(),
            stats: stats.clone(),
        };
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        std::thread::Builder::new()
            .name("atoma-engine".into())
            .spawn(move || {
                let _guard = guard;
                worker.run(&rx);
            })
            .map_err(|e| {
                EngineError::InvalidRequest(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Self {
            model,
            jobs,
            waiting,
            capacity: cfg.queue_capacity,
            kv_tokens: blocks * cfg.block_size,
            kv_dtype: cfg.kv_dtype,
            stats,
            alive,
        })
    }

    /// Whether the worker thread is running (false after it panicked: the node is unhealthy).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// What the bits of an output depend on besides the model file and the request: the
    /// numerics version, the device class and the KV cache's element type. Outputs are
    /// identical across CPU vector levels (AVX-512 VNNI, AVX2, scalar), so the class names
    /// the device kind only. A verifier reproduces a logged answer only within its class.
    pub fn determinism_class(&self) -> String {
        let kv = match self.kv_dtype {
            crate::KvDtype::F16 => "f16",
            crate::KvDtype::F32 => "f32",
        };
        format!("atoma-engine/numerics-{NUMERICS_VERSION}/cpu/kv-{kv}")
    }

    /// The loaded model (tokenizer, chat template, info).
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// The loaded model, shared (for work that outlives a borrow of the engine).
    pub fn model_arc(&self) -> Arc<LoadedModel> {
        self.model.clone()
    }

    /// Totals and gauges of the worker (updated after every step).
    pub fn stats(&self) -> EngineStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Requests accepted but not yet started.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Queues a request; events arrive on the returned stream. A grammar is compiled here, on
    /// the caller's thread, so the worker never stalls the batch on it.
    pub fn submit(&self, req: GenerateRequest) -> Result<GenerationStream> {
        let constraint = self.model.compile_grammar(req.grammar.as_ref())?;
        self.submit_compiled(req, constraint)
    }

    /// `submit` with `req.grammar` already compiled (by `LoadedModel::compile_grammar`), for
    /// callers that compile early to refuse a bad grammar before other work.
    pub fn submit_compiled(
        &self,
        req: GenerateRequest,
        constraint: Option<Constraint>,
    ) -> Result<GenerationStream> {
        let mut streams = self.submit_group(vec![(req, constraint)])?;
        streams.pop().ok_or(EngineError::ShutDown)
    }

    /// Submits requests that share one prompt (OpenAI's `n`; their sampling, seeds and
    /// constraints may differ): the prompt is computed once, for the first, and the others are
    /// forked from it. Each counts against the waiting queue; all are accepted or none.
    pub fn submit_group(
        &self,
        reqs: Vec<(GenerateRequest, Option<Constraint>)>,
    ) -> Result<Vec<GenerationStream>> {
        let Some((first, _)) = reqs.first() else {
            return Err(EngineError::InvalidRequest("an empty group".into()));
        };
        let prompt = first.prompt.clone();
        for (req, _) in &reqs {
            if req.prompt != prompt {
                return Err(EngineError::InvalidRequest(
                    "the requests of a group must share their prompt".into(),
                ));
            }
            validate(req, self.model.model.config().context)?;
        }
        if prompt.len() >= self.kv_tokens {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: prompt.len(),
                context: self.kv_tokens,
            });
        }
        let n = reqs.len();
        let accepted = self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w + n <= self.capacity).then_some(w + n)
            });
        if accepted.is_err() {
            return Err(EngineError::Overloaded {
                capacity: self.capacity,
            });
        }
        let mut members = Vec::with_capacity(n);
        let mut streams = Vec::with_capacity(n);
        for (req, constraint) in reqs {
            let (tx, rx) = unbounded_channel();
            let cancel = Arc::new(AtomicBool::new(false));
            streams.push(GenerationStream {
                events: rx,
                cancel: cancel.clone(),
                prompt_tokens: prompt.len(),
            });
            members.push(Member {
                req,
                constraint,
                events: tx,
                cancel,
            });
        }
        let job = Job::Generate {
            members,
            enqueued: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            self.waiting.fetch_sub(n, Ordering::AcqRel);
            return Err(EngineError::ShutDown);
        }
        Ok(streams)
    }

    /// Queues the re-execution of a logged request at low priority; the verdict arrives on the
    /// returned handle (dropping it cancels the work).
    pub fn verify(&self, req: VerifyRequest) -> Result<VerifyHandle> {
        let context = self.model.model.config().context;
        let probe = GenerateRequest::new(req.prompt.clone(), req.max_tokens.max(1));
        validate(
            &GenerateRequest {
                stop: req.stop.clone(),
                sampling: req.sampling.clone(),
                ..probe
            },
            context,
        )?;
        let total = req.prompt.len() + req.output.len();
        if total > context.min(self.kv_tokens) {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: total,
                context: context.min(self.kv_tokens),
            });
        }
        if let Some(&t) = req
            .output
            .iter()
            .find(|&&t| t as usize >= self.model.model.vocab_size())
        {
            return Err(EngineError::InvalidRequest(format!(
                "logged token {t} is outside the vocabulary"
            )));
        }
        let constraint = self.model.compile_grammar(req.grammar.as_ref())?;
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job::Verify {
                req,
                constraint,
                reply,
            })
            .map_err(|_| EngineError::ShutDown)?;
        Ok(VerifyHandle { rx })
    }
}

/// The pending verdict of one re-execution.
#[derive(Debug)]
pub struct VerifyHandle {
    rx: oneshot::Receiver<Result<Verdict>>,
}

impl VerifyHandle {
    /// Waits for the verdict. An error means the re-execution could not run (not that the log
    /// is wrong).
    pub async fn verdict(self) -> Result<Verdict> {
        self.rx.await.map_err(|_| EngineError::ShutDown)?
    }

    /// Waits for the verdict, blocking the thread (not inside an async runtime).
    pub fn verdict_blocking(self) -> Result<Verdict> {
        self.rx.blocking_recv().map_err(|_| EngineError::ShutDown)?
    }
}

/// One request inside the worker.
struct Active {
    work: Work,
    enqueued: Instant,
    /// Whether it has left the waiting queue (its first pass was planned).
    started: bool,
}

enum Work {
    Generate {
        generation: Generation,
        events: UnboundedSender<GenerationEvent>,
        cancel: Arc<AtomicBool>,
    },
    Verify {
        state: VerifyState,
        reply: oneshot::Sender<Result<Verdict>>,
        /// Position of the row that gives output step 0.
        first_row: usize,
    },
}

impl Active {
    /// Nobody waits for the outcome any more.
    fn abandoned(&self) -> bool {
        match &self.work {
            Work::Generate { events, cancel, .. } => {
                events.is_closed() || cancel.load(Ordering::Relaxed)
            }
            Work::Verify { reply, .. } => reply.is_closed(),
        }
    }

    /// Counted against the waiting queue until it starts.
    fn counted(&self) -> bool {
        matches!(self.work, Work::Generate { .. }) && !self.started
    }

    /// Ends it with an error.
    fn fail(self, msg: &str) {
        let e = EngineError::InvalidRequest(msg.to_string());
        match self.work {
            Work::Generate { events, .. } => {
                let _ = events.send(GenerationEvent::Error(e));
            }
            Work::Verify { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Delivers the outcome of a finished request (generations have sent theirs already).
    fn conclude(self) {
        if let Work::Verify { state, reply, .. } = self.work {
            let v = state.into_verdict().ok_or_else(|| {
                EngineError::InvalidRequest("the re-execution ended without a verdict".into())
            });
            let _ = reply.send(v);
        }
    }
}

struct Worker {
    model: Arc<LoadedModel>,
    sched: Scheduler,
    kv: PagedKv,
    active: HashMap<SeqId, Active>,
    /// Group members waiting for their leader's prompt, by leader: they are forked from it.
    followers: HashMap<SeqId, Vec<(SeqId, Active)>>,
    next_id: SeqId,
    waiting: Arc<AtomicUsize>,
    stats: Arc<Mutex<EngineStats>>,
}

impl Worker {
    fn run(&mut self, jobs: &Receiver<Job>) {
        loop {
            if self.active.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.admit(job),
                    Err(_) => break,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.admit(job);
            }
            self.drop_cancelled();
            if !self.active.is_empty() {
                self.step();
            }
        }
        tracing::debug!("engine worker stopped");
    }

    fn admit(&mut self, job: Job) {
        let id = self.next_id;
        self.next_id += 1;
        let context = self.model.model.config().context;
        let kv_tokens = self.sched.pool().num_blocks() * self.sched.pool().block_size();
        match job {
            Job::Generate { members, enqueued } => {
                let prompt = members[0].req.prompt.clone();
                let max_new = context.min(kv_tokens) - prompt.len();
                if let Err(e) = self.sched.add(id, prompt) {
                    self.waiting.fetch_sub(members.len(), Ordering::AcqRel);
                    for m in members {
                        let _ = m
                            .events
                            .send(GenerationEvent::Error(EngineError::InvalidRequest(
                                e.to_string(),
                            )));
                    }
                    return;
                }
                let mut members = members.into_iter().map(|m| Active {
                    work: Work::Generate {
                        generation: Generation::new(&self.model, &m.req, max_new)
                            .with_constraint(m.constraint),
                        events: m.events,
                        cancel: m.cancel,
                    },
                    enqueued,
                    started: false,
                });
                if let Some(leader) = members.next() {
                    self.active.insert(id, leader);
                }
                let rest: Vec<(SeqId, Active)> = members
                    .map(|a| {
                        let fid = self.next_id;
                        self.next_id += 1;
                        (fid, a)
                    })
                    .collect();
                if !rest.is_empty() {
                    self.followers.insert(id, rest);
                }
            }
            Job::Verify {
                req,
                constraint,
                reply,
            } => {
                let max_new = context.min(kv_tokens) - req.prompt.len();
                let state = VerifyState::new(&self.model, &req, max_new, constraint);
                if let Some(v) = state.verdict() {
                    let _ = reply.send(Ok(v.clone()));
                    return;
                }
                let first_row = req.prompt.len() - 1;
                let opts = SeqOptions {
                    background: true,
                    logits_from: Some(first_row),
                };
                if let Err(e) = self.sched.add_with(id, VerifyState::sequence(&req), opts) {
                    let _ = reply.send(Err(EngineError::InvalidRequest(format!(
                        "cannot re-execute here: {e}"
                    ))));
                    return;
                }
                self.active.insert(
                    id,
                    Active {
                        work: Work::Verify {
                            state,
                            reply,
                            first_row,
                        },
                        enqueued: Instant::now(),
                        started: false,
                    },
                );
            }
        }
    }

    /// Removes a request: frees its blocks, and releases its waiting-queue place if it had not
    /// started.
    fn remove(&mut self, id: SeqId) -> Option<Active> {
        self.sched.abort(id);
        self.promote_followers(id);
        let a = self.active.remove(&id)?;
        if a.counted() {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
        Some(a)
    }

    /// A leader went away before its prompt was computed: its first follower still waiting
    /// takes its place (the prefix cache keeps what was computed), the rest follow it.
    fn promote_followers(&mut self, leader: SeqId) {
        let Some(mut rest) = self.followers.remove(&leader) else {
            return;
        };
        rest.retain(|(_, a)| {
            if a.abandoned() {
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                false
            } else {
                true
            }
        });
        if rest.is_empty() {
            return;
        }
        let (id, a) = rest.remove(0);
        let prompt = match &a.work {
            Work::Generate { generation, .. } => generation.prompt().to_vec(),
            Work::Verify { .. } => return,
        };
        if let Err(e) = self.sched.add(id, prompt) {
            self.waiting.fetch_sub(1 + rest.len(), Ordering::AcqRel);
            a.fail(&e.to_string());
            for (_, f) in rest {
                f.fail(&e.to_string());
            }
            return;
        }
        self.active.insert(id, a);
        if !rest.is_empty() {
            self.followers.insert(id, rest);
        }
    }

    /// The leader `leader` has just sampled from its last prompt row `row` (positions
    /// `0..prompt_len` computed): each follower samples its first token from the same row with
    /// its own sampler, then is forked from the leader's KV. Runs before the scheduler's
    /// `complete`, while the leader's blocks are certainly held.
    fn fork_followers(&mut self, leader: SeqId, prompt_len: usize, row: &[f32], cached: usize) {
        let Some(rest) = self.followers.remove(&leader) else {
            return;
        };
        for (id, mut a) in rest {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if a.abandoned() {
                continue;
            }
            a.started = true;
            let Work::Generate {
                generation, events, ..
            } = &mut a.work
            else {
                continue;
            };
            generation.start(a.enqueued.elapsed());
            let (event, done) = generation.step(&self.model, row);
            let token = event.id;
            if events.send(GenerationEvent::Token(event)).is_err() {
                continue;
            }
            if let Some(reason) = done {
                generation.set_cached_tokens(cached);
                let f = generation.finish(reason);
                let _ = events.send(GenerationEvent::Finished(f));
                continue;
            }
            let forked = match self.sched.fork(leader, id, prompt_len, token) {
                Some(None) => true,
                Some(Some(copy)) => match self.kv.copy_block(copy.src, copy.dst) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot copy a forked block");
                        self.sched.abort(id);
                        false
                    }
                },
                None => false,
            };
            if !forked {
                // No block to copy into: the follower recomputes its prompt (mostly from the
                // prefix cache) before anything that waits.
                let mut tokens = generation.prompt().to_vec();
                tokens.push(token);
                if let Err(e) = self.sched.add_started(id, tokens) {
                    a.fail(&format!("cannot fork: {e}"));
                    continue;
                }
            }
            self.active.insert(id, a);
        }
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<SeqId> = self
            .active
            .iter()
            .filter(|(_, a)| a.abandoned())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(Active {
                work:
                    Work::Generate {
                        mut generation,
                        events,
                        ..
                    },
                ..
            }) = self.remove(id)
                && !events.is_closed()
            {
                let f = generation.finish(FinishReason::Cancelled);
                let _ = events.send(GenerationEvent::Finished(f));
            }
        }
    }

    fn step(&mut self) {
        let plan = self.sched.schedule();
        if plan.items.is_empty() {
            // Nothing can run: not even one block is free for the oldest waiting request, and
            // nothing runs that could free one. This cannot happen with a pool of at least one
            // context; fail the waiting requests rather than spin.
            let ids: Vec<SeqId> = self.active.keys().copied().collect();
            for id in ids {
                if let Some(a) = self.remove(id) {
                    a.fail("the KV cache cannot hold this request");
                }
            }
            return;
        }
        for item in &plan.items {
            if let Some(a) = self.active.get_mut(&item.seq)
                && !a.started
            {
                if a.counted() {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                }
                a.started = true;
                if let Work::Generate { generation, .. } = &mut a.work {
                    generation.start(a.enqueued.elapsed());
                }
            }
        }
        let batch: Vec<BatchSeq<'_>> = plan
            .items
            .iter()
            .map(|it| BatchSeq {
                tokens: &it.tokens,
                start: it.start,
                block_table: &it.block_table,
                logits: it.logit_rows,
            })
            .collect();
        let logits = self
            .model
            .model
            .forward_paged(&batch, &mut self.kv)
            .and_then(|l| Ok(l.to_vec2::<f32>()?));
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "forward pass failed");
                let msg = format!("forward pass failed: {e}");
                for item in &plan.items {
                    if let Some(a) = self.remove(item.seq) {
                        a.fail(&msg);
                    }
                }
                return;
            }
        };
        let mut results = Vec::with_capacity(plan.items.len());
        let mut forks = Vec::new();
        let mut rows = logits.iter();
        for item in &plan.items {
            let item_rows: Vec<&Vec<f32>> = rows.by_ref().take(item.logit_rows).collect();
            let cached = self.sched.cached_prompt_tokens(item.seq);
            let Some(a) = self.active.get_mut(&item.seq) else {
                continue;
            };
            let (sampled, finished) = match &mut a.work {
                Work::Generate {
                    generation, events, ..
                } => {
                    let Some(row) = item_rows.last() else {
                        continue;
                    };
                    if self.followers.contains_key(&item.seq) {
                        forks.push((
                            item.seq,
                            item.start + item.tokens.len(),
                            (*row).clone(),
                            cached,
                        ));
                    }
                    let (event, done) = generation.step(&self.model, row);
                    let token = event.id;
                    let alive = events.send(GenerationEvent::Token(event)).is_ok();
                    let finished = match (alive, done) {
                        (false, _) => true,
                        (true, Some(reason)) => {
                            generation.set_cached_tokens(cached);
                            let f = generation.finish(reason);
                            let _ = events.send(GenerationEvent::Finished(f));
                            true
                        }
                        (true, None) => false,
                    };
                    (Some(token), finished)
                }
                Work::Verify {
                    state, first_row, ..
                } => {
                    let pos0 = item.start + item.tokens.len() - item_rows.len();
                    for (j, row) in item_rows.iter().enumerate() {
                        state.feed(&self.model, pos0 + j - *first_row, row);
                    }
                    (None, state.verdict().is_some() || item.sample)
                }
            };
            if finished && let Some(a) = self.active.remove(&item.seq) {
                a.conclude();
            }
            results.push(StepResult {
                seq: item.seq,
                sampled,
                finished,
            });
        }
        for (leader, prompt_len, row, cached) in forks {
            self.fork_followers(leader, prompt_len, &row, cached);
        }
        self.sched.complete(&plan, &results);
        self.publish_stats();
    }

    fn publish_stats(&self) {
        let pool = self.sched.pool();
        if let Ok(mut s) = self.stats.lock() {
            *s = EngineStats {
                scheduler: self.sched.stats(),
                running: self.sched.num_running(),
                kv_blocks_used: pool.num_blocks() - pool.num_free(),
                kv_blocks_total: pool.num_blocks(),
            };
        }
    }
}

/// The events of one request.
#[derive(Debug)]
pub struct GenerationStream {
    events: UnboundedReceiver<GenerationEvent>,
    cancel: Arc<AtomicBool>,
    prompt_tokens: usize,
}

impl GenerationStream {
    /// Next event, waiting asynchronously; `None` after the last one.
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        self.events.recv().await
    }

    /// Next event, blocking the thread (not for use inside an async runtime).
    pub fn next_blocking(&mut self) -> Option<GenerationEvent> {
        self.events.blocking_recv()
    }

    /// Asks the engine to stop this request; it ends with `FinishReason::Cancelled`.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Number of prompt tokens of the request.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
}
