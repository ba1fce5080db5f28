//! SIGKILL the node under load and restart it: no reservation stays stuck and no unit is counted
//! twice. The check reads the node's state database directly: before the restart it must hold
//! open reservations (proof the kill hit requests in flight); after it, none, and the stack's
//! used units must equal the sum of the usage of the requests that were settled.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use atoma_crypto::{blake2b256, read_keystore};
use atoma_engine::Architecture;

/// (units_used, reserved rows, reserved units, settled usage sum) of stack 1, read directly.
fn raw_state(home: &Path) -> (i64, i64, i64, i64) {
    let c = rusqlite::Connection::open(home.join("state.db")).unwrap();
    let used: i64 = c
        .query_row(
            "SELECT units_used FROM stacks WHERE small_id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let (n, reserved): (i64, i64) = c
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(reserved), 0) FROM requests WHERE state = 'reserved'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let settled: i64 = c
        .query_row(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM requests WHERE state = 'settled'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    (used, n, reserved, settled)
}

#[test]
fn sigkill_under_load_then_restart_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Llama, 4096);
    let user = read_keystore(&home.join("keys/user.keystore"))
        .unwrap()
        .remove(0);
    let mut node = common::start_node(home, &url);

    // 32 streaming requests of 400 tokens each: one runs, the rest wait holding reservations.
    let load: Vec<_> = (0..32)
        .map(|i| {
            let (url, user) = (url.clone(), user.clone());
            std::thread::spawn(move || {
                let body = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "go"}],
                                              "max_tokens": 400, "stream": true, "nonce": i})
                .to_string();
                let _ = ureq::post(&format!("{url}/v1/chat/completions"))
                    .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
                    .set("X-Stack-Small-Id", "1")
                    .timeout(Duration::from_secs(30))
                    .send_string(&body)
                    .map(|r| r.into_string());
            })
        })
        .collect();
    // Kill once some requests have settled and others are in flight.
    let t = Instant::now();
    loop {
        let (_, open, _, settled) = raw_state(home);
        if (settled > 0 && open > 0) || t.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    node.kill().unwrap(); // SIGKILL
    node.wait().unwrap();
    for h in load {
        let _ = h.join();
    }
    let (used, open, reserved, settled) = raw_state(home);
    assert!(open > 0, "the kill must hit requests in flight");
    assert_eq!(
        used,
        settled + reserved,
        "before restart: settled usage plus open reservations"
    );

    let mut node = common::start_node(home, &url);
    let (used, open, reserved, settled) = raw_state(home);
    assert_eq!((open, reserved), (0, 0), "no reservation stays stuck");
    assert_eq!(
        used, settled,
        "every unit counted once: used = sum of settled usage"
    );
    // The node serves again on the same stack.
    let body =
        serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "again"}],
                                  "max_tokens": 4, "nonce": "after-restart"})
        .to_string();
    let resp = ureq::post(&format!("{url}/v1/chat/completions"))
        .set("X-Signature", &user.sign(&blake2b256(body.as_bytes())))
        .set("X-Stack-Small-Id", "1")
        .send_string(&body);
    assert_eq!(resp.map(|r| r.status()).unwrap_or(0), 200);
    let (used2, _, _, settled2) = raw_state(home);
    assert!(used2 > used && used2 == settled2);
    node.kill().unwrap();
    node.wait().unwrap();
}
