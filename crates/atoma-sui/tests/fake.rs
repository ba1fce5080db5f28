//! The Sui test double over real gRPC on loopback, driven by the real client (`sui-rpc`):
//! signed transactions executed and awaited until checkpointed, refusals before execution
//! (bad signature, wrong sender, stale or foreign objects, wrong shared versions), Move aborts
//! mapped to named errors, idempotent resubmission, and ListEvents paged by sui-rpc's own list
//! driver (which checks the protocol's frame rules). It is a test double, not a Sui node.

use std::time::Duration;

use atoma_crypto::Keypair;
use atoma_ledger::{Amount, Ledger, LedgerError, LedgerEvent, SqliteLedger, TaskSmallId};
use atoma_sui::abort::AbortContext;
use atoma_sui::fake::{FakeSui, default_ids};
use atoma_sui::keys::SuiKey;
use atoma_sui::rpc::{self, GAS_COIN_TYPE};
use atoma_sui::tx::{Call, Contract, Gas, SharedRef, build};
use futures_util::TryStreamExt;
use sui_rpc::Client;
use sui_rpc::proto::sui::rpc::v2 as proto;
use sui_sdk_types::Transaction;

struct Setup {
    fake: FakeSui,
    contract: Contract,
    rt: tokio::runtime::Runtime,
    client: Client,
}

fn setup(admin: &SuiKey) -> Setup {
    let ids = default_ids(admin.address());
    let fake = FakeSui::start(ids.clone(), SqliteLedger::in_memory().unwrap(), 0).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async { Client::new(fake.url()).unwrap() });
    let mut c = client.clone();
    let (db_isv, random_isv) = rt.block_on(async {
        (
            rpc::initial_shared_version(&mut c, ids.db).await.unwrap(),
            rpc::initial_shared_version(&mut c, atoma_sui::tx::RANDOM_ID)
                .await
                .unwrap(),
        )
    });
    Setup {
        contract: Contract {
            package: ids.package,
            db: SharedRef {
                id: ids.db,
                initial_shared_version: db_isv,
            },
            random_initial_shared_version: random_isv,
        },
        fake,
        rt,
        client,
    }
}

impl Setup {
    fn gas(&self, key: &SuiKey) -> Gas {
        let mut c = self.client.clone();
        self.rt.block_on(async {
            let coins = rpc::owned(&c, key.sui_address(), GAS_COIN_TYPE)
                .await
                .unwrap();
            Gas {
                coin: coins[0].obj,
                price: rpc::gas_price(&mut c).await.unwrap(),
                budget: 50_000_000,
            }
        })
    }

    fn tx(&self, key: &SuiKey, call: &Call) -> Transaction {
        build(&self.contract, call, key.sui_address(), &self.gas(key)).unwrap()
    }

    fn send(
        &self,
        tx: &Transaction,
        key: &SuiKey,
    ) -> Result<proto::ExecutedTransaction, tonic::Status> {
        let sig = key.sign(tx).unwrap();
        let mut c = self.client.clone();
        self.rt
            .block_on(rpc::execute(&mut c, tx, &sig, Duration::from_secs(10)))
    }

    fn badge(&self, key: &SuiKey) -> atoma_sui::tx::ObjRef {
        let t = format!("{}::db::NodeBadge", self.contract.package);
        let c = self.client.clone();
        self.rt
            .block_on(rpc::owned(&c, key.sui_address(), &t))
            .unwrap()[0]
            .obj
    }
}

#[test]
fn a_signed_registration_executes_checkpoints_and_emits_its_event() {
    let admin = SuiKey::from_keypair(&Keypair::from_secret([1; 32]));
    let node = SuiKey::from_keypair(&Keypair::from_secret([2; 32]));
    let s = setup(&admin);

    let tx = s.tx(&node, &Call::register_node());
    let done = s.send(&tx, &node).expect("executes");
    assert_eq!(
        done.digest.as_deref(),
        Some(tx.digest().to_string().as_str())
    );
    assert!(done.checkpoint.is_some(), "awaited until checkpointed");
    let events = rpc::outcome(&done, &AbortContext::default()).expect("success");
    let [
        LedgerEvent::NodeRegisteredEvent {
            node_small_id,
            sender,
            badge_id,
        },
    ] = events.as_slice()
    else {
        panic!("one NodeRegisteredEvent, got {events:?}")
    };
    assert_eq!(*sender, node.address());
    // The badge is now the node operator's object, found by type.
    let badge = s.badge(&node);
    assert_eq!(badge.id.to_string(), *badge_id);
    assert_eq!(
        s.fake
            .with_ledger(|l| l.node(*node_small_id).unwrap().owner),
        node.address()
    );

    // The same signed transaction again: the first execution comes back, nothing runs twice.
    let again = s.send(&tx, &node).expect("resubmission");
    assert_eq!(again.digest, done.digest);
    assert_eq!(s.fake.with_ledger(|l| l.nodes().unwrap().len()), 1);
}

#[test]
fn refusals_before_execution_change_nothing() {
    let admin = SuiKey::from_keypair(&Keypair::from_secret([1; 32]));
    let node = SuiKey::from_keypair(&Keypair::from_secret([2; 32]));
    let thief = SuiKey::from_keypair(&Keypair::from_secret([3; 32]));
    let s = setup(&admin);
    s.send(&s.tx(&node, &Call::register_node()), &node).unwrap();
    let events_before = s.fake.event_count();

    // Signed by another key than the sender's.
    let tx = s.tx(&node, &Call::register_node());
    let err = s.send(&tx, &thief).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    // A stale gas coin (the version before the registration).
    let mut stale = s.gas(&node);
    stale.coin.version -= 1;
    let tx = build(
        &s.contract,
        &Call::register_node(),
        node.sui_address(),
        &stale,
    )
    .unwrap();
    let err = s.send(&tx, &node).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");

    // Somebody else's badge.
    let call = Call::subscribe(s.badge(&node), 1, 100);
    let err = s.send(&s.tx(&thief, &call), &thief).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("not owned by the sender"), "{err}");

    // A wrong initial shared version of AtomaDb.
    let mut wrong = s.contract;
    wrong.db.initial_shared_version += 1;
    let tx = build(
        &wrong,
        &Call::register_node(),
        node.sui_address(),
        &s.gas(&node),
    )
    .unwrap();
    let err = s.send(&tx, &node).unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    assert_eq!(s.fake.event_count(), events_before);
    assert_eq!(s.fake.with_ledger(|l| l.nodes().unwrap().len()), 1);
}

#[test]
fn a_move_abort_is_a_failed_transaction_with_the_named_error() {
    let admin = SuiKey::from_keypair(&Keypair::from_secret([1; 32]));
    let node = SuiKey::from_keypair(&Keypair::from_secret([2; 32]));
    let s = setup(&admin);
    s.send(&s.tx(&node, &Call::register_node()), &node).unwrap();
    let gas_before = s.gas(&node).coin;

    let call = Call::subscribe(s.badge(&node), 99, 100);
    let done = s
        .send(&s.tx(&node, &call), &node)
        .expect("executed, and failed");
    let cx = AbortContext {
        task: Some(TaskSmallId(99)),
        ..AbortContext::default()
    };
    let err = rpc::outcome(&done, &cx).unwrap_err();
    assert!(
        matches!(err, LedgerError::TaskNotFound(TaskSmallId(99))),
        "{err:?}"
    );
    // The gas coin still moved to a new version; the badge did not.
    assert!(s.gas(&node).coin.version > gas_before.version);
}

#[test]
fn a_stack_purchase_pays_from_the_buyers_usdc_coin() {
    let admin_kp = Keypair::from_secret([1; 32]);
    let admin = SuiKey::from_keypair(&admin_kp);
    let node = SuiKey::from_keypair(&Keypair::from_secret([2; 32]));
    let buyer = SuiKey::from_keypair(&Keypair::from_secret([4; 32]));
    let s = setup(&admin);
    s.send(&s.tx(&node, &Call::register_node()), &node).unwrap();

    // The admin creates a task with the manager badge.
    let manager_type = format!("{}::db::AtomaManagerBadge", s.contract.package);
    let manager =
        s.rt.block_on(rpc::owned(&s.client, admin.sui_address(), &manager_type))
            .unwrap()[0]
            .obj;
    let call = Call::create_task(manager, 0, Some("smollm2".into()), 0, 0, true);
    let done = s.send(&s.tx(&admin, &call), &admin).unwrap();
    let ev = rpc::outcome(&done, &AbortContext::default()).unwrap();
    assert!(
        matches!(ev[0], LedgerEvent::TaskRegisteredEvent { .. }),
        "{ev:?}"
    );

    let sub = Call::subscribe(s.badge(&node), 1, 1_000);
    rpc::outcome(
        &s.send(&s.tx(&node, &sub), &node).unwrap(),
        &AbortContext::default(),
    )
    .unwrap();

    s.fake.faucet(buyer.address(), Amount(5_000)).unwrap();
    let usdc_type = format!("0x2::coin::Coin<{}>", s.fake.ids().usdc_type);
    let coin =
        s.rt.block_on(rpc::owned(&s.client, buyer.sui_address(), &usdc_type))
            .unwrap()
            .remove(0);
    assert_eq!(coin.balance, Some(5_000));
    let call = Call::acquire_stack(coin.obj, &[], 1, 1_000_000, 1_000);
    let done = s.send(&s.tx(&buyer, &call), &buyer).unwrap();
    let ev = rpc::outcome(&done, &AbortContext::default()).unwrap();
    let [LedgerEvent::StackCreatedEvent { owner, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(*owner, buyer.address());
    assert_eq!(
        s.fake.with_ledger(|l| l.balance(buyer.address()).unwrap()),
        Amount(4_000)
    );
    assert!(s.fake.totals().unwrap().is_conserved());

    // ListEvents through sui-rpc's own paging driver (which checks every frame rule), pages of 2.
    let mut req = proto::ListEventsRequest::default();
    let mut opts = proto::QueryOptions::default();
    opts.limit = Some(2);
    req.options = Some(opts);
    let frames: Vec<proto::ListEventsResponse> =
        s.rt.block_on(s.client.list_events(req).try_collect())
            .expect("the driver accepts the frames");
    let names: Vec<String> = frames
        .iter()
        .filter_map(|f| f.event.as_ref())
        .filter_map(|e| rpc::raw_event(e).map(|r| r.name))
        .collect();
    assert_eq!(
        names,
        [
            "NodeRegisteredEvent",
            "TaskRegisteredEvent",
            "NodeSubscribedToTaskEvent",
            "StackCreatedEvent"
        ]
    );
}
