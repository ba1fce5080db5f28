//! The engine's worker thread: the requests it holds, and its loop (admit new requests, drop
//! cancelled ones, plan a step, run it, sample, fork group members, report back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use atoma_scheduler::{Scheduler, SeqId, SeqOptions, StepResult};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::{EngineStats, Job};
use crate::error::{EngineError, Result};
use crate::generate::{FinishReason, Generation, GenerationEvent};
use crate::loaded::LoadedModel;
use crate::model::{BatchSeq, PagedKv};
use crate::verify::{Verdict, VerifyState};

/// One request inside the worker.
pub(super) struct Active {
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

pub(super) struct Worker {
    pub(super) model: Arc<LoadedModel>,
    pub(super) sched: Scheduler,
    pub(super) kv: PagedKv,
    pub(super) active: HashMap<SeqId, Active>,
    /// Group members waiting for their leader's prompt, by leader: they are forked from it.
    pub(super) followers: HashMap<SeqId, Vec<(SeqId, Active)>>,
    pub(super) next_id: SeqId,
    pub(super) waiting: Arc<AtomicUsize>,
    pub(super) stats: Arc<Mutex<EngineStats>>,
}

impl Worker {
    pub(super) fn run(&mut self, jobs: &Receiver<Job>) {
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
