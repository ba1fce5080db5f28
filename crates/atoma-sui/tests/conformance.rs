//! The ledger conformance suite against the Sui backend: the real client (`SuiLedger`: Move
//! calls built, signed, executed over gRPC; events ingested with a durable cursor) talking to
//! the loopback Sui test double, extended contract. Test-only operations (faucet, epochs,
//! totals) go to the test double directly.

use atoma_ledger::conformance as c;
use atoma_sui::Flavor;
use atoma_sui::fake::{FakeBacked, actor};

fn fresh() -> FakeBacked {
    c::use_actors(actor);
    FakeBacked::start(Flavor::Extended).expect("test double and client start")
}

#[test]
fn ids_are_sequential_from_one() {
    c::ids_are_sequential_from_one(&fresh());
}

#[test]
fn node_operations_need_the_badge_owner() {
    c::node_operations_need_the_badge_owner(&fresh());
}

#[test]
fn subscription_rules() {
    c::subscription_rules(&fresh());
}

#[test]
fn stacks_sample_only_eligible_nodes() {
    c::stacks_sample_only_eligible_nodes(&fresh());
}

#[test]
fn failed_purchases_change_nothing() {
    c::failed_purchases_change_nothing(&fresh());
}

#[test]
fn concurrent_purchases_keep_balances_exact() {
    c::concurrent_purchases_keep_balances_exact(&fresh());
}

#[test]
fn events_follow_with_a_cursor() {
    c::events_follow_with_a_cursor(&fresh());
}
