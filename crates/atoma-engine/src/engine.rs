//! The engine handle: a worker thread that owns the compute, fed through a bounded queue.
//!
//! `Engine::submit` tokenizes nothing and blocks on nothing: it validates the request, puts it
//! in the queue (a full queue is `EngineError::Overloaded`) and returns a `GenerationStream`.
//! Dropping the stream cancels the request: the worker notices the closed channel at the next
//! token and moves on. `GenerationStream::cancel` instead ends it with `FinishReason::Cancelled`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Instant;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::error::{EngineError, Result};
use crate::generate::{GenerateRequest, GenerationEvent, run_generation};
use crate::loaded::LoadedModel;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Requests that may wait for the worker; one more is refused as overloaded.
    pub queue_capacity: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { queue_capacity: 64 }
    }
}

struct Job {
    req: GenerateRequest,
    events: UnboundedSender<GenerationEvent>,
    cancel: Arc<AtomicBool>,
    enqueued: Instant,
}

/// A running engine. Cloning gives another handle to the same worker.
#[derive(Clone)]
pub struct Engine {
    model: Arc<LoadedModel>,
    jobs: SyncSender<Job>,
    capacity: usize,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.info.name)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Engine {
    /// Starts the worker thread for `model`.
    pub fn start(model: LoadedModel, cfg: &EngineConfig) -> Result<Self> {
        let model = Arc::new(model);
        let (jobs, rx) = sync_channel::<Job>(cfg.queue_capacity);
        let worker_model = model.clone();
        std::thread::Builder::new()
            .name("atoma-engine".into())
            .spawn(move || worker(&worker_model, &rx))
            .map_err(|e| {
                EngineError::InvalidRequest(format!("cannot start the engine thread: {e}"))
            })?;
        Ok(Self {
            model,
            jobs,
            capacity: cfg.queue_capacity,
        })
    }

    /// The loaded model (tokenizer, chat template, info).
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Queues a request; events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<GenerationStream> {
        let context = self.model.model.config().context;
        if req.prompt.len() >= context {
            return Err(EngineError::PromptTooLong {
                prompt_tokens: req.prompt.len(),
                context,
            });
        }
        req.sampling.validate()?;
        let (tx, rx) = unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let prompt_tokens = req.prompt.len();
        let job = Job {
            req,
            events: tx,
            cancel: cancel.clone(),
            enqueued: Instant::now(),
        };
        match self.jobs.try_send(job) {
            Ok(()) => Ok(GenerationStream {
                events: rx,
                cancel,
                prompt_tokens,
            }),
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded {
                capacity: self.capacity,
            }),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::ShutDown),
        }
    }
}

fn worker(model: &LoadedModel, jobs: &Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        if job.events.is_closed() {
            continue;
        }
        let queued = job.enqueued.elapsed();
        let events = job.events.clone();
        let mut emit = |e: GenerationEvent| job.events.send(e).is_ok() && !job.events.is_closed();
        let res = run_generation(model, &job.req, &job.cancel, queued, &mut emit);
        if let Err(e) = res {
            tracing::warn!(error = %e, "generation failed");
            let _ = events.send(GenerationEvent::Error(e));
        }
    }
    tracing::debug!("engine worker stopped");
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
