//! `atoma db …` settlement verbs on the local ledger, mirroring the contract's settlement entry
//! points: collateral deposits and withdrawals, settling a stack with a commitment, attesting
//! and disputing, claiming funds, closing expired stacks, the ledger's parameters and epoch
//! clock, tickets, and the money totals with their conservation check. `db.rs` dispatches here.

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;

use atoma_ledger::{
    Amount, ComputeUnits, Hash32, Ledger, LedgerParams, NodeSmallId, StackCommitment, StackSmallId,
};

use crate::home::{Home, address_of};

#[derive(Debug, Subcommand)]
pub enum SettleCommand {
    /// Move USDC base units from the owner's balance into a node's collateral.
    DepositCollateral {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The node's small id.
        #[arg(long)]
        node: u64,
        /// USDC base units to deposit.
        #[arg(long)]
        amount: u64,
    },
    /// Move collateral back to the owner's balance (refused while the node has an open ticket).
    WithdrawCollateral {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The node's small id.
        #[arg(long)]
        node: u64,
        /// USDC base units to withdraw.
        #[arg(long)]
        amount: u64,
    },
    /// Open a stack's settlement ticket with a commitment (nodes do this automatically; for
    /// tests and operators). Prints the ticket.
    Settle {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The stack's selected node.
        #[arg(long)]
        node: u64,
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        /// Compute units claimed (at most the stack's).
        #[arg(long)]
        units: u64,
        /// Merkle root over the request log's leaves (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        root: Hash32,
        /// Number of leaves (records) in the log.
        #[arg(long)]
        leaves: u64,
        /// The log blob's id on the data-availability store.
        #[arg(long)]
        blob_id: String,
        /// Blake2b-256 of the log blob (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        blob_hash: Hash32,
        /// Size of the log blob in bytes.
        #[arg(long)]
        blob_size: u64,
    },
    /// As a requested attestor, confirm a stack's commitment. Prints the ticket.
    Attest {
        /// Key that owns the attesting node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The attesting node's small id.
        #[arg(long)]
        node: u64,
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        /// The Merkle root the attestor computed (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        root: Hash32,
    },
    /// As a requested attestor, dispute a stack's commitment. Prints the ticket.
    Dispute {
        /// Key that owns the disputing node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The disputing node's small id.
        #[arg(long)]
        node: u64,
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        /// The Merkle root the attestor computed instead (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        root: Hash32,
        /// The record found wrong (its index in the log), if one.
        #[arg(long)]
        record: Option<u64>,
        /// The first wrong output token of that record, if one.
        #[arg(long)]
        position: Option<u64>,
    },
    /// As a dispute's oracle, resolve it from your own re-execution.
    Resolve {
        /// Key that owns the oracle node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The oracle's small id.
        #[arg(long)]
        node: u64,
        #[arg(long)]
        stack: u64,
        /// The settling node's log re-executes as logged (the attestor loses); without it,
        /// the node cheated (it loses and the user is refunded).
        #[arg(long)]
        node_was_honest: bool,
    },
    /// After a dispute's oracle deadline: slash the silent oracle and draw another.
    ExpireOracle {
        #[arg(long, default_value = "user")]
        key: String,
        #[arg(long)]
        stack: u64,
    },
    /// A stack's dispute as JSON (or `null`).
    ShowDispute {
        #[arg(long)]
        stack: u64,
    },
    /// Claim the funds of settled stacks after their dispute window (all or none).
    Claim {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The stacks' selected node.
        #[arg(long)]
        node: u64,
        /// A stack to claim (repeat for several).
        #[arg(long = "stack", value_name = "STACK", required = true)]
        stacks: Vec<u64>,
    },
    /// Claim a ConfidentialCompute stack directly, without ticket or window.
    ClaimDirect {
        /// Key that owns the node's badge.
        #[arg(long, default_value = "node")]
        key: String,
        /// The stack's selected node.
        #[arg(long)]
        node: u64,
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        /// Compute units claimed (at most the stack's).
        #[arg(long)]
        units: u64,
    },
    /// As the stack's owner, close a stack nobody settled before it expired: full refund.
    CloseExpiredStack {
        /// Key that owns the stack.
        #[arg(long, default_value = "user")]
        key: String,
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
    },
    /// Show the ledger's parameters as JSON.
    Params,
    /// Change some of the ledger's parameters (as key `admin`); prints the new parameters.
    SetParams {
        /// Length of an epoch in milliseconds (0 = only `advance-epoch` moves the clock).
        #[arg(long)]
        epoch_ms: Option<u64>,
        /// Epochs after settlement during which attestations and disputes are accepted.
        #[arg(long)]
        dispute_window_epochs: Option<u64>,
        /// Chance, in permille, that a SamplingConsensus settlement is attested.
        #[arg(long)]
        attestation_probability_permille: Option<u16>,
        /// How many attestation nodes are sampled when it is.
        #[arg(long)]
        attestation_nodes: Option<u16>,
        /// Collateral (USDC base units) every node needs to be sold stacks or to attest.
        #[arg(long)]
        min_collateral: Option<u64>,
        /// Share of its collateral, in permille, a requested attestor loses on a timeout.
        #[arg(long)]
        timeout_slash_permille: Option<u16>,
        /// Epochs after purchase after which an unsettled stack may be closed (0 = never).
        #[arg(long)]
        stack_expiry_epochs: Option<u64>,
        /// Epochs a dispute's oracle has to resolve it.
        #[arg(long)]
        oracle_window_epochs: Option<u64>,
        /// Share of a dispute loser's collateral paid to the oracle (permille).
        #[arg(long)]
        oracle_share_permille: Option<u16>,
        /// Share paid to the honest party (permille); the rest goes to the treasury.
        #[arg(long)]
        honest_share_permille: Option<u16>,
    },
    /// Print the current epoch.
    Epoch,
    /// Move the epoch clock one epoch forward; prints the new epoch.
    AdvanceEpoch,
    /// Show a stack's settlement ticket as JSON (`null` if it has none).
    Ticket {
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
    },
    /// Show the money totals by kind of account and whether money is conserved.
    Totals,
}

fn parse_hash(s: &str) -> Result<Hash32, String> {
    s.parse()
}

fn print_json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// The money totals with the result of the conservation check.
#[derive(Serialize)]
struct TotalsOut {
    minted: u128,
    balances: u128,
    escrow: u128,
    collateral: u128,
    treasury: u128,
    conserved: bool,
}

pub fn run(home: &Home, l: &dyn Ledger, cmd: SettleCommand) -> anyhow::Result<()> {
    let addr = |key: &str| -> anyhow::Result<_> { Ok(address_of(&home.key(key)?)) };
    match cmd {
        SettleCommand::DepositCollateral { key, node, amount } => {
            let total = l.deposit_collateral(addr(&key)?, NodeSmallId(node), Amount(amount))?;
            print_json(&serde_json::json!({"node": node, "collateral": total.0}))
        }
        SettleCommand::WithdrawCollateral { key, node, amount } => {
            let left = l.withdraw_collateral(addr(&key)?, NodeSmallId(node), Amount(amount))?;
            print_json(&serde_json::json!({"node": node, "collateral": left.0}))
        }
        SettleCommand::Settle {
            key,
            node,
            stack,
            units,
            root,
            leaves,
            blob_id,
            blob_hash,
            blob_size,
        } => {
            let commitment = StackCommitment {
                merkle_root: root,
                leaf_count: leaves,
                blob_id,
                blob_hash,
                blob_size,
            };
            let t = l.try_settle_stack(
                addr(&key)?,
                NodeSmallId(node),
                StackSmallId(stack),
                ComputeUnits(units),
                &commitment,
            )?;
            print_json(&t)
        }
        SettleCommand::Attest {
            key,
            node,
            stack,
            root,
        } => {
            let t = l.submit_stack_settlement_attestation(
                addr(&key)?,
                NodeSmallId(node),
                StackSmallId(stack),
                root,
            )?;
            print_json(&t)
        }
        SettleCommand::Dispute {
            key,
            node,
            stack,
            root,
            record,
            position,
        } => {
            let claim = atoma_ledger::DisputeClaim {
                attestation_commitment: root,
                record,
                position,
            };
            print_json(&l.start_attestation_dispute(
                addr(&key)?,
                NodeSmallId(node),
                StackSmallId(stack),
                &claim,
            )?)
        }
        SettleCommand::Resolve {
            key,
            node,
            stack,
            node_was_honest,
        } => print_json(&l.resolve_attestation_dispute(
            addr(&key)?,
            NodeSmallId(node),
            StackSmallId(stack),
            node_was_honest,
        )?),
        SettleCommand::ExpireOracle { key, stack } => {
            print_json(&l.expire_dispute_oracle(addr(&key)?, StackSmallId(stack))?)
        }
        SettleCommand::ShowDispute { stack } => print_json(&l.dispute(StackSmallId(stack))?),
        SettleCommand::Claim { key, node, stacks } => {
            let ids: Vec<StackSmallId> = stacks.into_iter().map(StackSmallId).collect();
            print_json(&l.claim_funds(addr(&key)?, NodeSmallId(node), &ids)?)
        }
        SettleCommand::ClaimDirect {
            key,
            node,
            stack,
            units,
        } => {
            let claims = [(StackSmallId(stack), ComputeUnits(units))];
            print_json(&l.claim_funds_for_stacks(addr(&key)?, NodeSmallId(node), &claims)?)
        }
        SettleCommand::CloseExpiredStack { key, stack } => {
            let refund = l.close_expired_stack(addr(&key)?, StackSmallId(stack))?;
            print_json(&serde_json::json!({"stack": stack, "refunded": refund.0}))
        }
        SettleCommand::Params => print_json(&l.params()?),
        SettleCommand::SetParams {
            epoch_ms,
            dispute_window_epochs,
            attestation_probability_permille,
            attestation_nodes,
            min_collateral,
            timeout_slash_permille,
            stack_expiry_epochs,
            oracle_window_epochs,
            oracle_share_permille,
            honest_share_permille,
        } => {
            let old = l.params()?;
            let p = LedgerParams {
                epoch_ms: epoch_ms.unwrap_or(old.epoch_ms),
                dispute_window_epochs: dispute_window_epochs.unwrap_or(old.dispute_window_epochs),
                attestation_probability_permille: attestation_probability_permille
                    .unwrap_or(old.attestation_probability_permille),
                attestation_nodes: attestation_nodes.unwrap_or(old.attestation_nodes),
                min_collateral: min_collateral.map_or(old.min_collateral, Amount),
                timeout_slash_permille: timeout_slash_permille
                    .unwrap_or(old.timeout_slash_permille),
                stack_expiry_epochs: stack_expiry_epochs.unwrap_or(old.stack_expiry_epochs),
                oracle_window_epochs: oracle_window_epochs.unwrap_or(old.oracle_window_epochs),
                oracle_share_permille: oracle_share_permille.unwrap_or(old.oracle_share_permille),
                honest_share_permille: honest_share_permille.unwrap_or(old.honest_share_permille),
            };
            p.validate()
                .map_err(anyhow::Error::msg)
                .context("invalid parameters")?;
            l.set_params(address_of(&home.key_or_new("admin")?), &p)?;
            print_json(&l.params()?)
        }
        SettleCommand::Epoch => {
            println!("{}", l.epoch()?);
            Ok(())
        }
        SettleCommand::AdvanceEpoch => {
            println!("{}", l.advance_epoch()?);
            Ok(())
        }
        SettleCommand::Ticket { stack } => print_json(&l.ticket(StackSmallId(stack))?),
        SettleCommand::Totals => {
            let t = l.totals()?;
            print_json(&TotalsOut {
                minted: t.minted,
                balances: t.balances,
                escrow: t.escrow,
                collateral: t.collateral,
                treasury: t.treasury,
                conserved: t.is_conserved(),
            })
        }
    }
}
