//! Shared by the node's settlement and verification tests: a market on a fresh embedded ledger.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use atoma_crypto::{Keypair, address_hex};
use atoma_ledger::{
    Address, Amount, Ledger, LedgerParams, NewTask, NodeSmallId, SecurityLevel, SqliteLedger,
    TaskRole, TaskSmallId,
};

/// The ledger address of a key.
pub fn addr(k: &Keypair) -> Address {
    address_hex(&k.address()).parse().unwrap()
}

/// Ledger parameters under which every stack is attested by one node and a dispute may be
/// raised for `dispute_window_epochs` epochs.
pub fn attest_all(dispute_window_epochs: u64) -> LedgerParams {
    LedgerParams {
        attestation_probability_permille: 1000,
        attestation_nodes: 1,
        dispute_window_epochs,
        ..LedgerParams::default()
    }
}

/// One node of a `market`: its key's secret byte, its price per million compute units and the
/// collateral it deposits (0: none).
pub struct NodeSpec {
    pub secret: u8,
    pub price: u64,
    pub collateral: u64,
}

/// A ledger at `dir/ledger.db` with `params` (set by admin 0x99), one public SamplingConsensus
/// chat task for the model `tiny`, and the `nodes`: registered, serving `tiny`, collateral
/// deposited, subscribed to the task at their price (in that order of small ids).
pub fn market(
    dir: &Path,
    params: LedgerParams,
    nodes: &[NodeSpec],
) -> (Arc<SqliteLedger>, TaskSmallId, Vec<(Keypair, NodeSmallId)>) {
    let ledger = Arc::new(SqliteLedger::open(&dir.join("ledger.db")).unwrap());
    let admin: Address = "0x99".parse().unwrap();
    ledger.set_params(admin, &params).unwrap();
    let task = ledger
        .create_task(
            admin,
            &NewTask {
                role: TaskRole::ChatCompletion,
                model_name: Some("tiny".into()),
                security_level: SecurityLevel::SamplingConsensus,
                minimum_reputation_score: 0,
                is_public: true,
                minimum_collateral: Amount(0),
            },
        )
        .unwrap()
        .small_id;
    let nodes = nodes
        .iter()
        .map(|n| {
            let key = Keypair::from_secret([n.secret; 32]);
            let a = addr(&key);
            let node = ledger.register_node(a).unwrap().small_id;
            ledger.add_node_to_model(a, node, "tiny", 1).unwrap();
            if n.collateral > 0 {
                ledger.faucet(a, Amount(n.collateral)).unwrap();
                ledger
                    .deposit_collateral(a, node, Amount(n.collateral))
                    .unwrap();
            }
            ledger
                .subscribe_node_to_task(a, node, task, Amount(n.price))
                .unwrap();
            (key, node)
        })
        .collect();
    (ledger, task, nodes)
}
