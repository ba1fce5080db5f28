//! Conservation of money under random operation sequences: faucets, collateral in and out,
//! purchases, settlements, attestations (agreeing or not), disputes, claims, direct claims,
//! expiries and epoch changes, many of them refused. After every step, accepted or not, all
//! balances + escrow + collateral + treasury equal everything ever minted.
//!
//! The driver is seeded (SplitMix64), so a failure names the seed and step that reproduce it.

use super::Factory;
use super::settlement::{COLLATERAL, commitment, owner};
use crate::settlement::DisputeClaim;
use crate::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn user(i: u64) -> Address {
    super::addr(50 + i as u8)
}

/// Runs `steps` random operations on a fresh ledger for each seed.
pub fn random_sequences_conserve_money(
    make: Factory<'_>,
    seeds: std::ops::Range<u64>,
    steps: usize,
) {
    for seed in seeds {
        let l = make();
        run_one(l.as_ref(), seed, steps);
    }
}

fn run_one(l: &dyn Ledger, seed: u64, steps: usize) {
    let mut r = Rng(seed);
    l.set_params(
        super::addr(99),
        &LedgerParams {
            attestation_probability_permille: 1000,
            attestation_nodes: 2,
            stack_expiry_epochs: 3,
            min_collateral: Amount(100),
            ..LedgerParams::default()
        },
    )
    .unwrap();
    let levels = [
        SecurityLevel::NoSecurity,
        SecurityLevel::SamplingConsensus,
        SecurityLevel::ConfidentialCompute,
    ];
    let tasks: Vec<TaskSmallId> = levels
        .iter()
        .map(|&level| {
            l.create_task(
                super::addr(99),
                &NewTask {
                    security_level: level,
                    ..super::chat_task("m")
                },
            )
            .unwrap()
            .small_id
        })
        .collect();
    let nodes: Vec<NodeSmallId> = (1..=4u8)
        .map(|i| {
            let n = l.register_node(super::addr(i)).unwrap().small_id;
            l.add_node_to_model(super::addr(i), n, "m", 1).unwrap();
            l.faucet(super::addr(i), Amount(COLLATERAL)).unwrap();
            l.deposit_collateral(super::addr(i), n, Amount(COLLATERAL / 2))
                .unwrap();
            for t in &tasks {
                l.subscribe_node_to_task(super::addr(i), n, *t, Amount(500 + 250 * u64::from(i)))
                    .unwrap();
            }
            n
        })
        .collect();
    let mut stacks: Vec<StackSmallId> = Vec::new();
    let mut log = Vec::new();
    for step in 0..steps {
        let node = nodes[r.below(nodes.len() as u64) as usize];
        // Mostly recent stacks, which are still open.
        let pick = if r.below(3) == 0 {
            r.below(stacks.len() as u64)
        } else {
            (stacks.len() as u64).saturating_sub(1 + r.below(3))
        };
        let stack = stacks.get(pick as usize).copied();
        let amount = Amount([0, 1, 99, 1_000, COLLATERAL, 1 << 40][r.below(6) as usize]);
        let kind = r.below(18);
        let outcome: std::result::Result<String, LedgerError> = match (kind, stack) {
            (0, _) => l.faucet(user(r.below(3)), amount).map(|_| "faucet".into()),
            (1, _) => l.faucet(owner(node), amount).map(|_| "faucet".into()),
            (2, _) => l
                .deposit_collateral(owner(node), node, amount)
                .map(|_| "deposit".into()),
            (3, _) => l
                .withdraw_collateral(owner(node), node, amount)
                .map(|_| "withdraw".into()),
            (4..=6, _) => {
                let req = StackRequest {
                    task_small_id: tasks[r.below(3) as usize],
                    num_compute_units: ComputeUnits(
                        [1, 999, 10_000, 2_000_000][r.below(4) as usize],
                    ),
                    price_per_one_million_compute_units: Amount(
                        [1, 777, 1_000, 3_333][r.below(4) as usize],
                    ),
                };
                l.acquire_stack(user(r.below(3)), &req).map(|s| {
                    stacks.push(s.small_id);
                    format!("buy {}", s.small_id)
                })
            }
            (7 | 8, Some(s)) => {
                let units = l.stack(s).map_or(1, |st| st.num_compute_units.0);
                let claimed = ComputeUnits(r.below(units + 2));
                let seller = if r.below(4) == 0 {
                    node
                } else {
                    l.stack(s).map_or(node, |st| st.selected_node_id)
                };
                l.try_settle_stack(owner(seller), seller, s, claimed, &commitment(1))
                    .map(|_| format!("settle {s}"))
            }
            (9 | 10, Some(s)) => {
                // Half the time, an open ticket that still waits for an attestor.
                let waiting = stacks.iter().rev().copied().find(|s| {
                    l.ticket(*s).ok().flatten().is_some_and(|t| {
                        !t.is_claimed
                            && t.already_attested_nodes.len() < t.requested_attestation_nodes.len()
                    })
                });
                let s = waiting.filter(|_| r.below(2) == 0).unwrap_or(s);
                let asked = l
                    .ticket(s)
                    .ok()
                    .flatten()
                    .and_then(|t| {
                        let n = t.requested_attestation_nodes.len() as u64;
                        t.requested_attestation_nodes
                            .get(r.below(n) as usize)
                            .copied()
                    })
                    .unwrap_or(node);
                let proof = Hash32([if r.below(5) == 0 { 2 } else { 1 }; 32]);
                l.submit_stack_settlement_attestation(owner(asked), asked, s, proof)
                    .map(|_| format!("attest {s}"))
            }
            (11 | 12, Some(s)) => {
                let seller = l.stack(s).map_or(node, |st| st.selected_node_id);
                l.claim_funds(owner(seller), seller, &[s])
                    .map(|_| format!("claim {s}"))
            }
            (13, Some(s)) => {
                let seller = l.stack(s).map_or(node, |st| st.selected_node_id);
                let units = ComputeUnits(r.below(3_000));
                l.claim_funds_for_stacks(owner(seller), seller, &[(s, units)])
                    .map(|_| format!("claim cc {s}"))
            }
            (14, Some(s)) => {
                let who = l.stack(s).map_or(user(0), |st| st.owner);
                l.close_expired_stack(who, s).map(|_| format!("close {s}"))
            }
            (15, Some(s)) => {
                let asked = l
                    .ticket(s)
                    .ok()
                    .flatten()
                    .and_then(|t| t.requested_attestation_nodes.first().copied())
                    .unwrap_or(node);
                let claim = DisputeClaim {
                    attestation_commitment: Hash32([3; 32]),
                    record: Some(r.below(5)),
                    position: None,
                };
                l.start_attestation_dispute(owner(asked), asked, s, &claim)
                    .map(|d| format!("dispute {s} (oracle {:?})", d.oracle))
            }
            (16, Some(s)) => {
                let oracle = l.dispute(s).ok().flatten().and_then(|d| d.oracle);
                match oracle {
                    Some(o) if r.below(3) > 0 => {
                        let honest = r.below(2) == 0;
                        l.resolve_attestation_dispute(owner(o), o, s, honest)
                            .map(|d| format!("resolve {s}: {:?}", d.outcome))
                    }
                    _ => l
                        .expire_dispute_oracle(user(0), s)
                        .map(|d| format!("expire oracle of {s}: {:?}", d.oracle)),
                }
            }
            _ => l.advance_epoch().map(|e| format!("epoch {e}")),
        };
        log.push(match &outcome {
            Ok(what) => what.clone(),
            Err(e) => format!("refused: {e}"),
        });
        if let Err(LedgerError::Storage(e)) = &outcome {
            panic!(
                "seed {seed} step {step}: storage error {e}\n{}",
                log.join("\n")
            );
        }
        let t = l.totals().unwrap();
        assert!(
            t.is_conserved(),
            "seed {seed} step {step}: {t:?} not conserved after:\n{}",
            log.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use crate::Ledger;

    #[test]
    fn the_driver_reaches_every_settlement_path() {
        let l = crate::SqliteLedger::in_memory().unwrap();
        super::run_one(&l, 3, 400);
        let names: Vec<_> = l
            .events_after(crate::EventCursor(0), 10_000)
            .unwrap()
            .into_iter()
            .map(|e| e.event.name())
            .collect();
        let count = |n: &str| names.iter().filter(|x| **x == n).count();
        for event in [
            "StackTrySettleEvent",
            "NewStackSettlementAttestationEvent",
            "StackSettlementTicketClaimedEvent",
            "ClaimedStackEvent",
            "StackExpiredEvent",
            "StackAttestationDisputeEvent",
            "StackDisputeResolvedEvent",
            "NodeSlashedEvent",
        ] {
            assert!(count(event) > 0, "the driver never produced {event}");
        }
    }
}
