//! Drives the scheduler with a simulated engine and checks every step against a shadow copy:
//! each item carries the right tokens at the right positions, and the paged KV it would attend
//! over (the blocks of its table) holds the right token at every earlier position, through
//! chunked prefill, prefix sharing, preemption and aborts. Outputs under block pressure equal
//! those of a run with a large pool.

use std::collections::HashMap;

use atoma_scheduler::{BlockPool, Scheduler, SchedulerConfig, SchedulerError, SeqId, StepResult};

/// A deterministic "model": the next token depends on the whole history.
fn next_token(history: &[u32]) -> u32 {
    history
        .iter()
        .fold(17u32, |h, &t| h.wrapping_mul(31).wrapping_add(t))
        % 97
        + 3
}

struct Sim {
    sched: Scheduler,
    /// Simulated KV: block → slot → token written there.
    kv: HashMap<u32, HashMap<usize, u32>>,
    shadow: HashMap<SeqId, Vec<u32>>,
    max_new: HashMap<SeqId, usize>,
    prompt_len: HashMap<SeqId, usize>,
    outputs: HashMap<SeqId, Vec<u32>>,
    max_running: usize,
    steps: usize,
    preemptions: usize,
}

impl Sim {
    fn new(cfg: SchedulerConfig, blocks: usize, block_size: usize) -> Self {
        Self {
            sched: Scheduler::new(cfg, BlockPool::new(blocks, block_size)),
            kv: HashMap::new(),
            shadow: HashMap::new(),
            max_new: HashMap::new(),
            prompt_len: HashMap::new(),
            outputs: HashMap::new(),
            max_running: 0,
            steps: 0,
            preemptions: 0,
        }
    }

    fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_new: usize) {
        self.sched.add(id, prompt.clone()).unwrap();
        self.prompt_len.insert(id, prompt.len());
        self.shadow.insert(id, prompt);
        self.max_new.insert(id, max_new);
    }

    /// One step: plan, check, "compute", report.
    fn step(&mut self) -> bool {
        let plan = self.sched.schedule();
        if plan.items.is_empty() {
            return false;
        }
        self.steps += 1;
        self.max_running = self.max_running.max(self.sched.num_running());
        let bs = self.sched.pool().block_size();
        let mut results = Vec::new();
        for it in &plan.items {
            let full = &self.shadow[&it.seq];
            assert_eq!(
                it.tokens,
                full[it.start..it.start + it.tokens.len()],
                "tokens of seq {}",
                it.seq
            );
            assert!(
                it.block_table.len() * bs >= it.start + it.tokens.len(),
                "table covers the chunk"
            );
            for (k, &t) in it.tokens.iter().enumerate() {
                let pos = it.start + k;
                self.kv
                    .entry(it.block_table[pos / bs])
                    .or_default()
                    .insert(pos % bs, t);
            }
            // Attention for the last row sees positions 0..=last through the block table.
            let last = it.start + it.tokens.len() - 1;
            for (pos, &want) in full.iter().enumerate().take(last + 1) {
                let got = self
                    .kv
                    .get(&it.block_table[pos / bs])
                    .and_then(|b| b.get(&(pos % bs)));
                assert_eq!(
                    got,
                    Some(&want),
                    "seq {} position {pos}: KV holds the wrong token",
                    it.seq
                );
            }
            if it.sample {
                let tok = next_token(&full[..=last]);
                let out = self.outputs.entry(it.seq).or_default();
                out.push(tok);
                let done = out.len() >= self.max_new[&it.seq];
                self.shadow.get_mut(&it.seq).unwrap().push(tok);
                results.push(StepResult {
                    seq: it.seq,
                    sampled: Some(tok),
                    finished: done,
                });
            }
        }
        // A preempted sequence keeps its generated tokens; its KV is recomputed later.
        self.preemptions += plan.preempted.len();
        self.sched.complete(&plan, &results);
        true
    }

    fn run(&mut self) {
        while self.step() {
            assert!(self.steps < 100_000, "no progress");
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 1000 + i * 7) % 500 + 1)
        .collect()
}

fn cfg(budget: usize, seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_batched_tokens: budget,
        max_num_seqs: seqs,
        max_waiting: 1000,
        enable_prefix_caching: true,
        max_logit_rows: 4,
        max_prefill_while_decoding: 0,
    }
}

#[test]
fn chunked_prefill_then_decode() {
    let mut sim = Sim::new(cfg(4, 8), 64, 4);
    sim.add(1, prompt(1, 10), 5);
    let plan = sim.sched.schedule();
    assert_eq!(
        (
            plan.items[0].start,
            plan.items[0].tokens.len(),
            plan.items[0].sample
        ),
        (0, 4, false)
    );
    let mut sim = Sim::new(cfg(4, 8), 64, 4);
    sim.add(1, prompt(1, 10), 5);
    sim.run();
    assert_eq!(sim.outputs[&1].len(), 5);
    // 3 prefill chunks (4, 4, 2) + 4 decodes.
    assert_eq!(sim.steps, 3 + 4);
    assert_eq!(sim.sched.pool().num_free(), 64, "all blocks back");
}

#[test]
fn decodes_go_first_then_prefill_fills_the_budget() {
    let mut sim = Sim::new(cfg(5, 8), 64, 4);
    sim.add(1, prompt(1, 3), 10);
    assert!(sim.step()); // prefill of seq 1 (3 tokens), sampled
    sim.add(2, prompt(2, 20), 3);
    let plan = sim.sched.schedule();
    assert_eq!(plan.items[0].seq, 1);
    assert_eq!(plan.items[0].tokens.len(), 1, "decode first");
    assert_eq!(
        (plan.items[1].seq, plan.items[1].tokens.len()),
        (2, 4),
        "prefill gets the rest"
    );
}

#[test]
fn shared_prefixes_are_computed_once() {
    let mut sim = Sim::new(cfg(512, 8), 64, 4);
    let system: Vec<u32> = (1..=16).collect();
    let mut a = system.clone();
    a.extend([100, 101, 102]);
    sim.add(1, a, 2);
    sim.run();
    let mut b = system.clone();
    b.extend([200, 201]);
    sim.add(2, b, 2);
    let plan = sim.sched.schedule();
    assert_eq!(plan.items[0].start, 16, "four cached blocks reused");
    assert_eq!(plan.items[0].tokens, vec![200, 201]);
    sim.sched.complete(&plan, &[]);
    // An identical prompt recomputes only its last block (its last token's logits are needed).
    let mut sim = Sim::new(cfg(512, 8), 64, 4);
    sim.add(1, system.clone(), 1);
    sim.run();
    sim.add(2, system.clone(), 1);
    let plan = sim.sched.schedule();
    assert_eq!((plan.items[0].start, plan.items[0].tokens.len()), (12, 4));
}

#[test]
fn preemption_under_block_pressure_gives_the_same_outputs() {
    let reference = {
        let mut sim = Sim::new(cfg(16, 8), 1000, 2);
        for i in 0..6 {
            sim.add(i, prompt(i as u32, 5 + i as usize), 12);
        }
        sim.run();
        sim.outputs
    };
    // 20 blocks of 2 slots: not enough for six sequences of up to 22 tokens at once.
    let mut sim = Sim::new(cfg(16, 8), 20, 2);
    for i in 0..6 {
        sim.add(i, prompt(i as u32, 5 + i as usize), 12);
    }
    sim.run();
    assert!(
        sim.preemptions > 0,
        "the pool is small enough to force preemption"
    );
    assert_eq!(
        sim.outputs, reference,
        "recomputation must not change any output"
    );
    assert_eq!(sim.sched.pool().num_free(), 20, "all blocks back");
}

#[test]
fn preemption_happens_and_is_reported() {
    let mut s = Scheduler::new(cfg(64, 8), BlockPool::new(4, 2));
    s.add(1, vec![1, 2, 3]).unwrap();
    s.add(2, vec![4, 5, 6]).unwrap();
    let plan = s.schedule(); // both prefill: 2 blocks each
    assert_eq!(plan.items.len(), 2);
    let res: Vec<StepResult> = plan
        .items
        .iter()
        .map(|i| StepResult {
            seq: i.seq,
            sampled: Some(9),
            finished: false,
        })
        .collect();
    s.complete(&plan, &res);
    // Both decode position 3 (fits), then position 4 needs a third block each: none left.
    let plan = s.schedule();
    let res: Vec<StepResult> = plan
        .items
        .iter()
        .map(|i| StepResult {
            seq: i.seq,
            sampled: Some(9),
            finished: false,
        })
        .collect();
    s.complete(&plan, &res);
    let plan = s.schedule();
    assert_eq!(plan.preempted, vec![2], "the newest yields");
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(
        plan.items.iter().map(|i| i.seq).collect::<Vec<_>>(),
        vec![1]
    );
}

#[test]
fn abort_frees_blocks_at_once() {
    let mut s = Scheduler::new(cfg(64, 8), BlockPool::new(16, 4));
    s.add(1, prompt(1, 30)).unwrap();
    let plan = s.schedule();
    assert!(s.pool().num_free() < 16);
    s.complete(&plan, &[]);
    assert!(s.abort(1));
    assert_eq!(s.pool().num_free(), 16);
    assert!(!s.abort(1));
    assert!(s.schedule().items.is_empty());
}

#[test]
fn the_waiting_queue_is_bounded() {
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_waiting: 2,
            ..cfg(64, 8)
        },
        BlockPool::new(16, 4),
    );
    s.add(1, vec![1]).unwrap();
    s.add(2, vec![1]).unwrap();
    assert_eq!(
        s.add(3, vec![1]),
        Err(SchedulerError::Overloaded { capacity: 2 })
    );
    assert_eq!(s.add(1, vec![1]), Err(SchedulerError::Duplicate(1)));
    assert_eq!(s.add(4, vec![]), Err(SchedulerError::EmptyPrompt));
    assert!(matches!(
        s.add(5, vec![1; 65]),
        Err(SchedulerError::TooLong { .. })
    ));
}

/// With a KV budget of two full 2048-token contexts, paging serves 16 short requests at once:
/// 8× what allocating each request's maximum context up front would allow.
#[test]
fn paging_serves_many_more_short_requests_than_full_allocation() {
    let (context, bs) = (2048, 16);
    let blocks = 2 * context / bs;
    let mut sim = Sim::new(cfg(2048, 64), blocks, bs);
    for i in 0..16 {
        sim.add(i, prompt(i as u32, 64), 64);
    }
    sim.run();
    let up_front = blocks * bs / context;
    assert_eq!(up_front, 2);
    assert_eq!(sim.max_running, 16);
    assert!(sim.max_running >= 4 * up_front);
    assert!(sim.outputs.values().all(|o| o.len() == 64));
}

/// Steps that decode give prefills only `max_prefill_while_decoding` tokens, so a long prompt
/// arriving amid running streams cannot stall them; alone, a prompt gets the whole budget.
#[test]
fn decoding_steps_stay_short_while_prompts_wait() {
    let mut sim = Sim::new(
        SchedulerConfig {
            max_prefill_while_decoding: 32,
            ..cfg(256, 8)
        },
        200,
        8,
    );
    for i in 0..4 {
        sim.add(i, prompt(i as u32, 10), 40);
    }
    // Let the four reach decode.
    while sim.outputs.len() < 4 {
        assert!(sim.step());
    }
    sim.add(9, prompt(9, 300), 5);
    let mut decoding_steps = 0;
    loop {
        let plan = sim.sched.schedule();
        let decodes = plan
            .items
            .iter()
            .filter(|it| it.tokens.len() == 1 && it.sample)
            .count();
        let prefill: usize = plan
            .items
            .iter()
            .filter(|it| it.seq == 9)
            .map(|it| it.tokens.len())
            .sum();
        if decodes > 0 && prefill > 0 {
            decoding_steps += 1;
            assert!(prefill <= 32, "{prefill} prefill tokens in a decoding step");
        }
        // Put the plan back through the simulated engine's bookkeeping.
        let results: Vec<StepResult> = plan
            .items
            .iter()
            .filter(|it| it.sample)
            .map(|it| {
                let full = &sim.shadow[&it.seq];
                let tok = next_token(&full[..it.start + it.tokens.len()]);
                let out = sim.outputs.entry(it.seq).or_default();
                out.push(tok);
                let done = out.len() >= sim.max_new[&it.seq];
                sim.shadow.get_mut(&it.seq).unwrap().push(tok);
                StepResult {
                    seq: it.seq,
                    sampled: Some(tok),
                    finished: done,
                }
            })
            .collect();
        sim.sched.complete(&plan, &results);
        if sim.outputs.get(&9).is_some_and(|o| o.len() >= 5) {
            break;
        }
    }
    assert!(
        decoding_steps >= 300 / 32,
        "the prompt was cut into short chunks"
    );
    // Once nobody decodes, a prompt takes the whole budget.
    let mut alone = Sim::new(
        SchedulerConfig {
            max_prefill_while_decoding: 32,
            ..cfg(256, 8)
        },
        200,
        8,
    );
    alone.add(1, prompt(1, 300), 1);
    let plan = alone.sched.schedule();
    assert_eq!(plan.items[0].tokens.len(), 256);
}

#[test]
fn a_fork_shares_full_blocks_and_copies_a_partial_one() {
    let mut s = Scheduler::new(cfg(64, 8), BlockPool::new(8, 4));
    s.add(1, prompt(1, 10)).unwrap();
    let plan = s.schedule();
    assert_eq!(plan.items[0].tokens.len(), 10);
    let table = plan.items[0].block_table.clone();
    assert_eq!(table.len(), 3, "10 tokens in blocks of 4");
    // After the step that computed the prompt, before `complete`.
    let copy = s
        .fork(1, 2, 10, 42)
        .unwrap()
        .expect("the third block is partly filled");
    assert_eq!(copy.src, table[2]);
    assert!(!table.contains(&copy.dst));
    for &b in &table[..2] {
        assert_eq!(s.pool().refs(b), 2, "full blocks are shared");
    }
    assert_eq!(
        s.pool().refs(table[2]),
        1,
        "the partial block is not shared"
    );
    assert_eq!(s.stats().forks, 1);
    s.complete(
        &plan,
        &[StepResult {
            seq: 1,
            sampled: Some(7),
            finished: false,
        }],
    );
    // Both decode next, each at position 10, in its own last block.
    let plan = s.schedule();
    assert_eq!(plan.items.len(), 2);
    let child = plan.items.iter().find(|i| i.seq == 2).unwrap();
    assert_eq!((child.start, child.tokens.as_slice()), (10, &[42][..]));
    assert_eq!(child.block_table[..2], table[..2]);
    assert_eq!(child.block_table[2], copy.dst);
    // A fork of a prompt that fills whole blocks copies nothing; unknown parents fail.
    assert_eq!(s.fork(1, 3, 8, 5), Some(None));
    assert_eq!(s.fork(99, 4, 8, 5), None);
    s.abort(1);
    s.abort(2);
    s.abort(3);
    assert_eq!(s.pool().num_free(), 8, "every block is back");
}
