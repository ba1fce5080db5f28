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

mod worker;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::Instant;

use std::sync::Mutex;

use atoma_scheduler::{BlockPool, Scheduler, SchedulerConfig, SchedulerStats};

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
use crate::generate::{GenerateRequest, GenerationEvent, validate};
use crate::grammar::Constraint;
use crate::loaded::LoadedModel;
use crate::model::{KernelChoice, KvDtype, PagedKv, select_kernel};
use crate::verify::{Verdict, VerifyRequest};

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
        let mut worker = worker::Worker {
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
