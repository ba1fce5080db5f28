//! `atoma log show|proof|verify-proof`: request logs of settled stacks. Fetches a stack's log
//! blob from the data-availability store by the ledger's settlement ticket, checks it against
//! the ticket (blob hash and size by the store, then stack, node, leaf count and Merkle root),
//! lists its records, builds a request's inclusion proof (`docs/protocol.md` §3), and checks a
//! proof offline, optionally against the ledger. Owns the proof file's JSON format.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use clap::Subcommand;
use serde::{Deserialize, Serialize};

use atoma_crypto::merkle::{self, Digest};
use atoma_da::{BlobRef, BlobStore, DirStore, WalrusClient, WalrusConfig};
use atoma_ledger::{Hash32, Ledger, SettlementTicket, SqliteLedger, StackSmallId};
use atoma_state::log::StackLog;

use crate::home::Home;

/// Where a stack's ticket and log blob are read from.
#[derive(Debug, clap::Args)]
pub struct Source {
    /// Ledger file holding the stack's settlement ticket (default: <home>/ledger.db).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Base URL of a Walrus-compatible store (aggregator) to fetch the log blob from.
    #[arg(long, conflicts_with = "da_dir")]
    da_url: Option<String>,
    /// Blob directory of a local store to read the log blob from (default: <home>/da).
    #[arg(long)]
    da_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Fetch and check a settled stack's log; print one line per record and the Merkle root.
    Show {
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        #[command(flatten)]
        source: Source,
    },
    /// Prove that a request is in a settled stack's log: prints the inclusion proof as JSON.
    Proof {
        /// The stack's small id.
        #[arg(long)]
        stack: u64,
        /// Blake2b-256 of the request body that was sent (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        request_hash: Hash32,
        /// Write the proof to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        source: Source,
    },
    /// Check an inclusion proof offline; exits non-zero if it does not hold.
    VerifyProof {
        /// The proof file (JSON from `atoma log proof`).
        file: PathBuf,
        /// Also require the proven response to have this hash (64 hex digits).
        #[arg(long, value_parser = parse_hash)]
        response_hash: Option<Hash32>,
        /// Also require the root and leaf count of the stack's ticket in this ledger file.
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
}

/// An inclusion proof of one request in a stack's committed log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InclusionProof {
    stack: u64,
    /// The record's position in the log (0-based).
    index: u64,
    leaf_count: u64,
    request_hash: Hash32,
    response_hash: Hash32,
    /// `Blake2b-256(request_hash ‖ response_hash)`.
    leaf: Hash32,
    /// RFC 6962 audit path, bottom-up.
    path: Vec<Hash32>,
    merkle_root: Hash32,
}

fn parse_hash(s: &str) -> Result<Hash32, String> {
    s.parse()
}

pub fn run(home: &Home, cmd: LogCommand) -> anyhow::Result<()> {
    match cmd {
        LogCommand::Show { stack, source } => show(home, &source, stack),
        LogCommand::Proof {
            stack,
            request_hash,
            out,
            source,
        } => proof(home, &source, stack, request_hash, out.as_deref()),
        LogCommand::VerifyProof {
            file,
            response_hash,
            ledger,
        } => verify_proof(&file, response_hash, ledger.as_deref()),
    }
}

/// Opens an existing ledger file (never creates one).
fn open_ledger(path: &Path) -> anyhow::Result<SqliteLedger> {
    ensure!(path.is_file(), "no ledger at {}", path.display());
    Ok(SqliteLedger::open(path)?)
}

fn ticket_of(l: &SqliteLedger, stack: u64) -> anyhow::Result<SettlementTicket> {
    l.ticket(StackSmallId(stack))?
        .with_context(|| format!("stack {stack} has no settlement ticket (it is not settled yet)"))
}

/// A stack's log, fetched and checked against its ticket.
struct CheckedLog {
    ticket: SettlementTicket,
    log: StackLog,
    leaves: Vec<Digest>,
}

fn fetch(home: &Home, source: &Source, stack: u64) -> anyhow::Result<CheckedLog> {
    let ledger_path = source.ledger.clone().unwrap_or_else(|| home.ledger_path());
    let ticket = ticket_of(&open_ledger(&ledger_path)?, stack)?;
    let c = &ticket.commitment;
    let blob = BlobRef {
        blob_id: c.blob_id.clone(),
        content_hash: c.blob_hash.0,
        size: c.blob_size,
    };
    let (store, place): (Box<dyn BlobStore>, String) = match &source.da_url {
        Some(url) => (
            Box::new(WalrusClient::new(WalrusConfig::with_url(url.clone()))),
            url.clone(),
        ),
        None => {
            let dir = source
                .da_dir
                .clone()
                .unwrap_or_else(|| home.root.join("da"));
            let store = DirStore::open(&dir)
                .with_context(|| format!("opening the blob directory {}", dir.display()))?;
            (Box::new(store), dir.display().to_string())
        }
    };
    let bytes = store.get(&blob).with_context(|| {
        format!(
            "fetching the log of stack {stack} (blob {}) from {place}",
            blob.blob_id
        )
    })?;
    let log = StackLog::decode(&bytes).with_context(|| format!("the log of stack {stack}"))?;
    ensure!(
        log.stack_small_id == stack && log.node_small_id == ticket.selected_node_id.0,
        "blob {} is the log of stack {} by node {}, not of stack {stack} by node {}",
        blob.blob_id,
        log.stack_small_id,
        log.node_small_id,
        ticket.selected_node_id
    );
    let leaves = log
        .leaves()
        .with_context(|| format!("the log of stack {stack}"))?;
    ensure!(
        leaves.len() as u64 == c.leaf_count,
        "the log of stack {stack} has {} records, the ticket commits {}",
        leaves.len(),
        c.leaf_count
    );
    let root = Hash32(merkle::root(&leaves));
    ensure!(
        root == c.merkle_root,
        "the log of stack {stack} has Merkle root {root}, the ticket commits {}",
        c.merkle_root
    );
    Ok(CheckedLog {
        ticket,
        log,
        leaves,
    })
}

fn show(home: &Home, source: &Source, stack: u64) -> anyhow::Result<()> {
    let CheckedLog { ticket, log, .. } = fetch(home, source, stack)?;
    let c = &ticket.commitment;
    println!(
        "stack {stack}, node {}: {} records, blob {} ({} bytes)",
        log.node_small_id,
        log.records.len(),
        c.blob_id,
        c.blob_size
    );
    for (i, r) in log.records.iter().enumerate() {
        println!(
            "{i:>5}  request {}  {:<9}  usage {}+{}  seed {}",
            Hash32(r.request_hash()),
            r.finish_reason,
            r.usage_prompt_tokens,
            r.usage_completion_tokens,
            r.seed
        );
    }
    println!("merkle root {} (matches the ticket)", c.merkle_root);
    Ok(())
}

fn proof(
    home: &Home,
    source: &Source,
    stack: u64,
    request_hash: Hash32,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let checked = fetch(home, source, stack)?;
    let index = checked
        .log
        .records
        .iter()
        .position(|r| r.request_hash() == request_hash.0)
        .with_context(|| {
            format!(
                "request {request_hash} is not in the log of stack {stack} ({} records)",
                checked.log.records.len()
            )
        })?;
    let (response_hash, _) = checked.log.records[index]
        .response_hash()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("record {index}"))?;
    let path = merkle::proof(&checked.leaves, index).context("index out of range")?;
    let p = InclusionProof {
        stack,
        index: index as u64,
        leaf_count: checked.leaves.len() as u64,
        request_hash,
        response_hash: Hash32(response_hash),
        leaf: Hash32(checked.leaves[index]),
        path: path.into_iter().map(Hash32).collect(),
        merkle_root: checked.ticket.commitment.merkle_root,
    };
    let json = serde_json::to_string_pretty(&p)?;
    match out {
        Some(file) => {
            std::fs::write(file, format!("{json}\n"))
                .with_context(|| format!("writing {}", file.display()))?;
            eprintln!(
                "proof of request {request_hash} (leaf {index} of {}) written to {}",
                p.leaf_count,
                file.display()
            );
        }
        None => println!("{json}"),
    }
    Ok(())
}

fn verify_proof(
    file: &Path,
    response_hash: Option<Hash32>,
    ledger: Option<&Path>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let p: InclusionProof = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an inclusion proof", file.display()))?;
    let leaf = merkle::leaf(&p.request_hash.0, &p.response_hash.0);
    ensure!(
        leaf == p.leaf.0,
        "the proof's leaf {} is not H(request_hash ‖ response_hash) = {}",
        p.leaf,
        Hash32(leaf)
    );
    if let Some(want) = response_hash
        && want != p.response_hash
    {
        bail!("the proof is for response {}, not {want}", p.response_hash);
    }
    let path: Vec<Digest> = p.path.iter().map(|h| h.0).collect();
    ensure!(
        merkle::verify(&p.merkle_root.0, &leaf, p.index, p.leaf_count, &path),
        "invalid proof: the path does not lead from leaf {} of {} to root {}",
        p.index,
        p.leaf_count,
        p.merkle_root
    );
    let mut against = String::new();
    if let Some(ledger) = ledger {
        let t = ticket_of(&open_ledger(ledger)?, p.stack)?;
        let c = &t.commitment;
        ensure!(
            c.merkle_root == p.merkle_root && c.leaf_count == p.leaf_count,
            "the ledger commits root {} over {} leaves for stack {}, the proof {} over {}",
            c.merkle_root,
            c.leaf_count,
            p.stack,
            p.merkle_root,
            p.leaf_count
        );
        against = format!(" (stack {}'s ticket in {})", p.stack, ledger.display());
    }
    println!(
        "ok: request {} is leaf {} of {} under root {}{against}",
        p.request_hash, p.index, p.leaf_count, p.merkle_root
    );
    Ok(())
}
