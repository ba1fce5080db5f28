//! The Sui wire format, offline: transactions built by the backend verify with `sui-crypto` and
//! hash to the digest `sui-sdk-types` computes (checked against the definition by hand), our own
//! signature verifier agrees with Sui's, keystore entries are the Sui CLI's, and every event's
//! BCS layout matches the contract's struct layout (golden bytes written field by field).

use atoma_crypto::Keypair;
use atoma_ledger::{
    Address, Amount, ComputeUnits, DisputeOutcome, Hash32, LedgerEvent, LedgerParams, NodeSmallId,
    SecurityLevel, StackSmallId, TaskRole, TaskSmallId,
};
use atoma_sui::keys::SuiKey;
use atoma_sui::move_types::{decode_event, encode_deployed, encode_event};
use atoma_sui::tx::{Arg, Call, Contract, Gas, ObjRef, SharedRef, build, decode_call};
use sui_crypto::SuiVerifier;
use sui_crypto::ed25519::Ed25519Verifier;
use sui_sdk_types::{Address as SuiAddress, Digest, UserSignature};

fn contract() -> Contract {
    Contract {
        package: SuiAddress::new([0xa7; 32]),
        db: SharedRef {
            id: SuiAddress::new([0xdb; 32]),
            initial_shared_version: 3,
        },
        random_initial_shared_version: 1,
    }
}

fn obj(tag: u8, version: u64) -> ObjRef {
    ObjRef {
        id: SuiAddress::new([tag; 32]),
        version,
        digest: Digest::new([tag ^ 0xff; 32]),
    }
}

fn settle_tx(key: &SuiKey) -> sui_sdk_types::Transaction {
    let call = Call::try_settle(obj(0xb1, 7), 42, 1_000, &[0x11; 32], &[0x11; 32]);
    let gas = Gas {
        coin: obj(0x9a, 9),
        price: 1_000,
        budget: 50_000_000,
    };
    build(&contract(), &call, key.sui_address(), &gas).expect("builds offline")
}

#[test]
fn a_built_transaction_verifies_and_its_digest_is_the_definition() {
    let kp = Keypair::from_secret([7; 32]);
    let key = SuiKey::from_keypair(&kp);
    let tx = settle_tx(&key);

    // Digest = Blake2b-256("TransactionData::" ‖ BCS(TransactionData)); the signing digest is
    // Blake2b-256 of the intent [0, 0, 0] ‖ BCS(TransactionData).
    let data = bcs::to_bytes(&tx).unwrap();
    let mut salted = b"TransactionData::".to_vec();
    salted.extend_from_slice(&data);
    assert_eq!(tx.digest().inner(), &atoma_crypto::blake2b256(&salted));
    let mut intent = vec![0u8, 0, 0];
    intent.extend_from_slice(&data);
    assert_eq!(tx.signing_digest(), atoma_crypto::blake2b256(&intent));

    let sig = key.sign(&tx).unwrap();
    Ed25519Verifier::new()
        .verify_transaction(&tx, &sig)
        .expect("Sui's verifier accepts it");
    // The same signature, in Sui's serialized form, passes our own verifier and names the sender.
    assert!(matches!(sig, UserSignature::Simple(_)));
    let b64 = sig.to_base64();
    let signer = atoma_crypto::verify(&b64, &tx.signing_digest()).unwrap();
    assert_eq!(signer, kp.address());
    assert_eq!(key.sui_address().into_inner(), kp.address());

    // The verifier checks the signature against the key it carries; whether that key is the
    // sender's is the validator's (and the test double's) separate check.
    let other = SuiKey::from_keypair(&Keypair::from_secret([8; 32]));
    let forged = other.sign(&tx).unwrap();
    let UserSignature::Simple(sui_sdk_types::SimpleSignature::Ed25519 { public_key, .. }) = &forged
    else {
        panic!("ed25519")
    };
    assert_ne!(public_key.derive_address(), tx.sender);
    // Any change to the transaction breaks the signature.
    let mut tampered = tx.clone();
    tampered.gas_payment.budget += 1;
    assert!(
        Ed25519Verifier::new()
            .verify_transaction(&tampered, &sig)
            .is_err()
    );

    // The transaction reads back into the same call.
    let back = decode_call(&tx, contract().package, contract().db.id).unwrap();
    assert_eq!(back.call.function, "try_settle_stack");
    assert_eq!(back.call.args.len(), 7);
    assert_eq!(back.call.args[0], Arg::Db);
    assert_eq!(back.call.args[1], Arg::Object(obj(0xb1, 7)));
    assert_eq!(back.call.args[2], Arg::Pure(42u64.to_le_bytes().to_vec()));
    assert_eq!(back.call.args[6], Arg::Random);
    assert_eq!(
        back.shared,
        vec![
            (contract().db.id, 3, true),
            (atoma_sui::tx::RANDOM_ID, 1, false)
        ]
    );
}

#[test]
fn equal_pure_arguments_share_one_input_and_still_decode_positionally() {
    let key = SuiKey::from_keypair(&Keypair::from_secret([1; 32]));
    let tx = settle_tx(&key);
    let sui_sdk_types::TransactionKind::ProgrammableTransaction(ptb) = &tx.kind else {
        panic!()
    };
    // db, badge, 42, 1000, root (proof = leaf share one input), random.
    assert_eq!(ptb.inputs.len(), 6);
}

#[test]
fn acquire_merges_coins_before_the_random_call() {
    let key = SuiKey::from_keypair(&Keypair::from_secret([2; 32]));
    let call = Call::acquire_stack(obj(0xc0, 4), &[obj(0xc1, 5), obj(0xc2, 6)], 1, 1_000, 9);
    let gas = Gas {
        coin: obj(0x9a, 1),
        price: 1_000,
        budget: 10_000_000,
    };
    let tx = build(&contract(), &call, key.sui_address(), &gas).unwrap();
    let sui_sdk_types::TransactionKind::ProgrammableTransaction(ptb) = &tx.kind else {
        panic!()
    };
    assert!(matches!(
        ptb.commands[0],
        sui_sdk_types::Command::MergeCoins(_)
    ));
    assert!(matches!(
        ptb.commands[1],
        sui_sdk_types::Command::MoveCall(_)
    ));
    let back = decode_call(&tx, contract().package, contract().db.id).unwrap();
    assert_eq!(back.call.merge, vec![obj(0xc1, 5), obj(0xc2, 6)]);
    assert_eq!(back.call.function, "acquire_new_stack_entry");
}

#[test]
fn keystore_entries_are_the_sui_clis() {
    let kp = Keypair::from_secret([9; 32]);
    let entry = kp.to_keystore_entry();
    let sui = sui_crypto::ed25519::Ed25519PrivateKey::from_base64(&entry).unwrap();
    assert_eq!(sui.to_base64(), entry);
    assert_eq!(sui.public_key().derive_address().into_inner(), kp.address());
    // A keystore file read by the backend signs as that address.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sui.keystore");
    atoma_crypto::write_keystore(&path, &[kp.clone(), Keypair::from_secret([3; 32])]).unwrap();
    let signers = atoma_sui::keys::Signers::from_keystore(&path).unwrap();
    assert!(signers.get(Address(kp.address())).is_some());
    assert_eq!(signers.addresses().count(), 2);
}

// ---------------------------------------------------------------------------------------------
// Events: golden bytes built field by field from db.move's struct layouts.

fn u64le(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn bytes_vec(v: &[u8]) -> Vec<u8> {
    // ULEB128 length (< 128 here) then the bytes.
    let mut out = vec![v.len() as u8];
    out.extend_from_slice(v);
    out
}

fn id(tag: u8) -> String {
    format!("0x{}", format!("{tag:02x}").repeat(32))
}

#[test]
fn deployed_event_layouts_match_the_contract_field_by_field() {
    let owner = Address([0x0e; 32]);
    // StackCreatedEvent{stack_id: ID, stack_small_id, owner: address, task_small_id,
    // selected_node_id, num_compute_units: u64, price_per_one_million_compute_units: u64}
    let ev = LedgerEvent::StackCreatedEvent {
        stack_id: id(0x51),
        stack_small_id: StackSmallId(5),
        owner,
        task_small_id: TaskSmallId(2),
        selected_node_id: NodeSmallId(3),
        num_compute_units: ComputeUnits(1_000),
        price_per_one_million_compute_units: Amount(250),
    };
    let mut want = vec![0x51; 32];
    want.extend(u64le(5));
    want.extend([0x0e; 32]);
    want.extend(u64le(2));
    want.extend(u64le(3));
    want.extend(u64le(1_000));
    want.extend(u64le(250));
    check_deployed(&ev, &want, owner);

    // TaskRegisteredEvent{task_id, task_small_id, role: TaskRole{u16}, model_name:
    // Option<ascii::String>, security_level: SecurityLevel{u16}, minimum_reputation_score: Option<u8>}
    let ev = LedgerEvent::TaskRegisteredEvent {
        task_id: id(0x7a),
        task_small_id: TaskSmallId(1),
        role: TaskRole::Embedding,
        model_name: Some("m".into()),
        security_level: SecurityLevel::SamplingConsensus,
        minimum_reputation_score: None,
    };
    let mut want = vec![0x7a; 32];
    want.extend(u64le(1));
    want.extend([1, 0]);
    want.extend([1, 1, b'm']);
    want.extend([2, 0]);
    want.push(0);
    check_deployed(&ev, &want, owner);

    // NodeSubscriptionUpdatedEvent: node first (unlike NodeSubscribedToTaskEvent).
    let ev = LedgerEvent::NodeSubscriptionUpdatedEvent {
        task_small_id: TaskSmallId(3),
        node_small_id: NodeSmallId(7),
        price_per_one_million_compute_units: Amount(1_000),
        max_num_compute_units: ComputeUnits(1_000_000),
    };
    let want = [u64le(7), u64le(3), u64le(1_000), u64le(1_000_000)].concat();
    check_deployed(&ev, &want, owner);
    let ev = LedgerEvent::NodeSubscribedToTaskEvent {
        task_small_id: TaskSmallId(3),
        node_small_id: NodeSmallId(7),
        price_per_one_million_compute_units: Amount(1_000),
        max_num_compute_units: ComputeUnits(1_000_000),
    };
    let want = [u64le(3), u64le(7), u64le(1_000), u64le(1_000_000)].concat();
    check_deployed(&ev, &want, owner);

    // NodeRegisteredEvent{badge_id, node_small_id}: the sender comes from the chain, beside it.
    let ev = LedgerEvent::NodeRegisteredEvent {
        badge_id: id(0xba),
        node_small_id: NodeSmallId(4),
        sender: owner,
    };
    let want = [vec![0xba; 32], u64le(4)].concat();
    check_deployed(&ev, &want, owner);

    // NodeSubscribedToModelEvent{node_small_id, model_name: ascii, echelon_id: EchelonId{u64}}
    let ev = LedgerEvent::NodeSubscribedToModelEvent {
        node_small_id: NodeSmallId(4),
        model_name: "ab".into(),
        echelon_id: 9,
    };
    let want = [u64le(4), bytes_vec(b"ab"), u64le(9)].concat();
    check_deployed(&ev, &want, owner);

    // StackSettlementTicketEvent{stack, node, units, requested: vector<NodeSmallId>,
    // dispute_settled_at_epoch, committed_stack_proof: vector<u8>}
    let ev = LedgerEvent::StackSettlementTicketEvent {
        stack_small_id: StackSmallId(5),
        selected_node_id: NodeSmallId(3),
        num_claimed_compute_units: ComputeUnits(77),
        requested_attestation_nodes: vec![NodeSmallId(1), NodeSmallId(2)],
        dispute_settled_at_epoch: 12,
        committed_stack_proof: Hash32([0x33; 32]),
    };
    let want = [
        u64le(5),
        u64le(3),
        u64le(77),
        vec![2],
        u64le(1),
        u64le(2),
        u64le(12),
        bytes_vec(&[0x33; 32]),
    ]
    .concat();
    check_deployed(&ev, &want, owner);
}

fn check_deployed(ev: &LedgerEvent, want: &[u8], sender: Address) {
    let (name, got) = encode_deployed(ev).unwrap().expect("a deployed event");
    assert_eq!(got, want, "{name}: deployed layout");
    assert_eq!(
        &decode_event(name, want, sender).unwrap(),
        ev,
        "{name}: decodes"
    );
    // Events without extras encode the same in the extended layout.
    let (_, ext) = encode_event(ev).unwrap();
    assert_eq!(ext, want, "{name}: extended = deployed");
}

/// One value of every event of the catalogue.
fn catalogue() -> Vec<LedgerEvent> {
    let a = Address([0x0e; 32]);
    let h = |b: u8| Hash32([b; 32]);
    vec![
        LedgerEvent::NodeRegisteredEvent {
            badge_id: id(1),
            node_small_id: NodeSmallId(1),
            sender: a,
        },
        LedgerEvent::NodeSubscribedToModelEvent {
            node_small_id: NodeSmallId(1),
            model_name: "smollm2".into(),
            echelon_id: 1,
        },
        LedgerEvent::TaskRegisteredEvent {
            task_id: id(2),
            task_small_id: TaskSmallId(1),
            role: TaskRole::ChatCompletion,
            model_name: None,
            security_level: SecurityLevel::NoSecurity,
            minimum_reputation_score: Some(40),
        },
        LedgerEvent::TaskDeprecationEvent {
            task_id: id(2),
            task_small_id: TaskSmallId(1),
            epoch: 3,
        },
        LedgerEvent::NodeSubscribedToTaskEvent {
            task_small_id: TaskSmallId(1),
            node_small_id: NodeSmallId(2),
            price_per_one_million_compute_units: Amount(5),
            max_num_compute_units: ComputeUnits(6),
        },
        LedgerEvent::NodeSubscriptionUpdatedEvent {
            task_small_id: TaskSmallId(1),
            node_small_id: NodeSmallId(2),
            price_per_one_million_compute_units: Amount(7),
            max_num_compute_units: ComputeUnits(8),
        },
        LedgerEvent::NodeUnsubscribedFromTaskEvent {
            task_small_id: TaskSmallId(1),
            node_small_id: NodeSmallId(2),
        },
        LedgerEvent::StackCreatedEvent {
            stack_id: id(3),
            stack_small_id: StackSmallId(1),
            owner: a,
            task_small_id: TaskSmallId(1),
            selected_node_id: NodeSmallId(2),
            num_compute_units: ComputeUnits(9),
            price_per_one_million_compute_units: Amount(10),
        },
        LedgerEvent::ClaimedStackEvent {
            stack_small_id: StackSmallId(1),
            selected_node_id: NodeSmallId(2),
            num_claimed_compute_units: ComputeUnits(3),
            user_refund_amount: Amount(4),
        },
        LedgerEvent::StackTrySettleEvent {
            stack_small_id: StackSmallId(1),
            selected_node_id: NodeSmallId(2),
            requested_attestation_nodes: vec![NodeSmallId(3)],
            committed_stack_proof: h(1),
            stack_merkle_leaf: h(1),
            num_claimed_compute_units: ComputeUnits(11),
            leaf_count: 4,
            blob_id: "blob-xyz".into(),
            blob_hash: h(2),
            blob_size: 999,
            dispute_settled_at_epoch: 6,
            sample_seed: h(3),
        },
        LedgerEvent::NewStackSettlementAttestationEvent {
            stack_small_id: StackSmallId(1),
            attestation_node_id: NodeSmallId(3),
            committed_stack_proof: h(1),
            stack_merkle_leaf: h(1),
        },
        LedgerEvent::StackSettlementTicketEvent {
            stack_small_id: StackSmallId(1),
            selected_node_id: NodeSmallId(2),
            num_claimed_compute_units: ComputeUnits(11),
            requested_attestation_nodes: vec![NodeSmallId(3)],
            dispute_settled_at_epoch: 6,
            committed_stack_proof: h(1),
        },
        LedgerEvent::StackSettlementTicketClaimedEvent {
            stack_small_id: StackSmallId(1),
            selected_node_id: NodeSmallId(2),
            attestation_nodes: vec![NodeSmallId(3)],
            num_claimed_compute_units: ComputeUnits(11),
            user_refund_amount: Amount(12),
            node_fee: Amount(13),
            attestor_share: Amount(14),
        },
        LedgerEvent::StackAttestationDisputeEvent {
            stack_small_id: StackSmallId(1),
            attestation_commitment: h(4),
            attestation_node_id: NodeSmallId(3),
            original_node_id: NodeSmallId(2),
            original_commitment: h(1),
            record: Some(2),
            position: None,
            oracle_node_id: Some(NodeSmallId(4)),
            deadline_epoch: 9,
        },
        LedgerEvent::DisputeOracleReassignedEvent {
            stack_small_id: StackSmallId(1),
            previous_oracle_node_id: NodeSmallId(4),
            oracle_node_id: None,
            deadline_epoch: 11,
        },
        LedgerEvent::StackDisputeResolvedEvent {
            stack_small_id: StackSmallId(1),
            oracle_node_id: Some(NodeSmallId(4)),
            outcome: DisputeOutcome::NodeCheated,
            slashed_node_id: Some(NodeSmallId(2)),
            slashed_amount: Amount(100),
            oracle_share: Amount(10),
            honest_share: Amount(20),
            user_refund_amount: Amount(30),
        },
        LedgerEvent::StackExpiredEvent {
            stack_small_id: StackSmallId(1),
            owner: a,
            user_refund_amount: Amount(40),
        },
        LedgerEvent::NodeCollateralDepositedEvent {
            node_small_id: NodeSmallId(2),
            amount: Amount(50),
            collateral: Amount(60),
        },
        LedgerEvent::NodeCollateralWithdrawnEvent {
            node_small_id: NodeSmallId(2),
            amount: Amount(5),
            collateral: Amount(55),
        },
        LedgerEvent::NodeSlashedEvent {
            node_small_id: NodeSmallId(2),
            amount: Amount(7),
            reason: "attestation_timeout".into(),
        },
        LedgerEvent::NodeReputationUpdatedEvent {
            node_small_id: NodeSmallId(2),
            reputation_score: 49,
        },
        LedgerEvent::LedgerParamsUpdatedEvent {
            params: LedgerParams {
                min_collateral: Amount(123),
                ..LedgerParams::default()
            },
        },
        LedgerEvent::NodePublicUrlUpdatedEvent {
            node_small_id: NodeSmallId(2),
            public_url: "http://127.0.0.1:1".into(),
        },
    ]
}

#[test]
fn every_event_of_the_catalogue_round_trips_through_its_on_chain_layout() {
    let sender = Address([0x0e; 32]);
    let all = catalogue();
    let mut names: Vec<&str> = all.iter().map(|e| e.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), all.len(), "one value per event type");
    assert_eq!(
        all.len(),
        23,
        "the catalogue has 23 events; a new one needs a layout here"
    );
    for ev in &all {
        let (name, bytes) = encode_event(ev).unwrap();
        assert_eq!(&decode_event(name, &bytes, sender).unwrap(), ev, "{name}");
        // Trailing or missing bytes are refused, never misread.
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            decode_event(name, &longer, sender).is_err(),
            "{name}: trailing byte"
        );
        assert!(
            decode_event(name, &bytes[..bytes.len() - 1], sender).is_err(),
            "{name}: short"
        );
    }
    assert!(decode_event("NoSuchEvent", &[], sender).is_err());
}

#[test]
fn a_deployed_settle_event_decodes_with_an_explicitly_unknown_log_location() {
    let sender = Address([0x0e; 32]);
    let ev = &catalogue()[9];
    let (name, bytes) = encode_deployed(ev).unwrap().unwrap();
    assert_eq!(name, "StackTrySettleEvent");
    let LedgerEvent::StackTrySettleEvent {
        blob_id,
        leaf_count,
        committed_stack_proof,
        ..
    } = decode_event(name, &bytes, sender).unwrap()
    else {
        panic!()
    };
    assert_eq!(blob_id, "");
    assert_eq!(leaf_count, 0);
    assert_eq!(committed_stack_proof, Hash32([1; 32]));
}
