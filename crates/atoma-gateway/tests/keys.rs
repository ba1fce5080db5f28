//! Tests of the gateway's API keys and books: key round trips, the secret never stored, holds
//! (refused, settled, released, dropped, left by a crash), and a seeded property test that the
//! books always balance, the journal replays to the stored balances, and the key charges are
//! exactly the node charges plus the margin.

use std::collections::HashMap;
use std::path::Path;

use atoma_gateway::keys::{Hold, KeyError, KeyId, KeyStore, Limits, margin_of};
use rusqlite::Connection;
use rusqlite::types::ValueRef;

const MICRO: u64 = 1_000_000;

fn limits(rpm: u32, tpm: u32) -> Limits {
    Limits {
        requests_per_minute: rpm,
        tokens_per_minute: tpm,
    }
}

#[test]
fn create_authenticate_list_revoke_credit_round_trip() {
    let store = KeyStore::in_memory().unwrap();
    let (a, secret_a) = store.create("alice", 5, limits(60, 1000)).unwrap();
    let (b, secret_b) = store.create("bob", 0, Limits::default()).unwrap();
    assert_ne!(a.id, b.id);
    assert_ne!(secret_a, secret_b);
    assert!(secret_a.starts_with("sk-atoma-"));
    assert_eq!(secret_a.len(), 9 + 43);
    assert_eq!(a.prefix, secret_a[..12]);
    assert_eq!(a.name, "alice");
    assert_eq!(a.balance_micro, 5 * MICRO);
    assert_eq!(
        (a.held_micro, a.spent_node_micro, a.spent_margin_micro),
        (0, 0, 0)
    );
    assert_eq!(a.limits, limits(60, 1000));
    assert!(!a.revoked && a.created_unix > 0);

    assert_eq!(store.authenticate(&secret_a).unwrap(), a);
    assert_eq!(store.authenticate(&secret_b).unwrap(), b);
    assert_eq!(store.get(a.id).unwrap(), a);
    assert_eq!(store.list().unwrap(), vec![a.clone(), b.clone()]);

    let b = store.credit(b.id, 7).unwrap();
    assert_eq!(b.balance_micro, 7 * MICRO);
    let b = store.set_limits(b.id, limits(1, 2)).unwrap();
    assert_eq!(b.limits, limits(1, 2));
    assert_eq!(store.authenticate(&secret_b).unwrap(), b);

    let revoked = store.revoke(a.id).unwrap();
    assert!(revoked.revoked);
    assert_eq!(store.revoke(a.id).unwrap(), revoked, "revoke is idempotent");
    assert!(matches!(store.credit(a.id, 1), Err(KeyError::Revoked)));
    assert!(matches!(store.hold(a.id, 1), Err(KeyError::Revoked)));
    assert_eq!(store.get(a.id).unwrap().balance_micro, 5 * MICRO);

    let ghost = KeyId(999);
    assert!(matches!(
        store.get(ghost),
        Err(KeyError::NotFound(KeyId(999)))
    ));
    assert!(matches!(store.revoke(ghost), Err(KeyError::NotFound(_))));
    assert!(matches!(store.credit(ghost, 1), Err(KeyError::NotFound(_))));
    assert!(matches!(store.hold(ghost, 1), Err(KeyError::NotFound(_))));
    assert!(matches!(store.credit(b.id, 0), Err(KeyError::Invalid(_))));
    assert!(matches!(
        store.create("", 1, Limits::default()),
        Err(KeyError::Invalid(_))
    ));
    assert!(matches!(
        store.create("a\nb", 1, Limits::default()),
        Err(KeyError::Invalid(_))
    ));
    assert!(store.totals().unwrap().is_conserved());
}

#[test]
fn revoked_and_unknown_secrets_fail() {
    let store = KeyStore::in_memory().unwrap();
    let (info, secret) = store.create("k", 1, Limits::default()).unwrap();
    assert!(matches!(
        store.authenticate("sk-atoma-nope"),
        Err(KeyError::Unknown)
    ));
    assert!(matches!(store.authenticate(""), Err(KeyError::Unknown)));
    let mut near = secret.clone();
    near.pop();
    near.push(if secret.ends_with('A') { 'B' } else { 'A' });
    assert!(matches!(store.authenticate(&near), Err(KeyError::Unknown)));
    store.revoke(info.id).unwrap();
    assert!(matches!(
        store.authenticate(&secret),
        Err(KeyError::Revoked)
    ));
}

#[test]
fn the_secret_is_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let store = KeyStore::open(&path).unwrap();
    let (info, secret) = store.create("k", 3, Limits::default()).unwrap();
    let payload = secret.strip_prefix("sk-atoma-").unwrap().to_string();

    // Every value of every table, read through SQLite.
    let conn = Connection::open(&path).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.iter().any(|t| t == "keys"));
    let mut values = 0;
    for table in &tables {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..n {
                values += 1;
                let bytes: Vec<u8> = match row.get_ref(i).unwrap() {
                    ValueRef::Text(t) | ValueRef::Blob(t) => t.to_vec(),
                    other => format!("{other:?}").into_bytes(),
                };
                let text = String::from_utf8_lossy(&bytes);
                assert!(!text.contains(&payload), "payload found in {table}");
                assert!(
                    !contains(&bytes, secret.as_bytes()),
                    "secret found in {table}"
                );
            }
        }
    }
    assert!(values > 0);
    // Only the hash is there.
    let hash: Vec<u8> = conn
        .query_row(
            "SELECT secret_hash FROM keys WHERE id = ?1",
            [info.id.0],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hash, atoma_crypto::blake2b256(secret.as_bytes()).to_vec());
    // And not in the raw files either (database and write-ahead log).
    for file in ["gateway.db", "gateway.db-wal"] {
        if let Ok(raw) = std::fs::read(dir.path().join(file)) {
            assert!(!contains(&raw, payload.as_bytes()), "payload in {file}");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn insufficient_credit_is_refused_with_both_numbers_and_changes_nothing() {
    let store = KeyStore::in_memory().unwrap();
    let (info, _) = store.create("k", 2, Limits::default()).unwrap();
    let err = store.hold(info.id, 2 * MICRO + 1).unwrap_err();
    assert!(matches!(err, KeyError::InsufficientCredit { need, have }
        if need == 2 * MICRO + 1 && have == 2 * MICRO));
    assert!(matches!(store.hold(info.id, u64::MAX),
        Err(KeyError::InsufficientCredit { need: u64::MAX, have }) if have == 2 * MICRO));
    assert_eq!(store.get(info.id).unwrap(), info);
    // Exactly the balance can be held; then nothing more.
    let hold = store.hold(info.id, 2 * MICRO).unwrap();
    assert!(matches!(
        store.hold(info.id, 1),
        Err(KeyError::InsufficientCredit { need: 1, have: 0 })
    ));
    hold.release().unwrap();
    assert_eq!(store.get(info.id).unwrap(), info);
}

#[test]
fn settle_charges_exactly_and_returns_the_rest() {
    let store = KeyStore::in_memory().unwrap();
    let (info, _) = store.create("k", 10, Limits::default()).unwrap();
    let hold = store.hold(info.id, 3 * MICRO).unwrap();
    assert_eq!((hold.key(), hold.micro()), (info.id, 3 * MICRO));
    let k = store.get(info.id).unwrap();
    assert_eq!((k.balance_micro, k.held_micro), (7 * MICRO, 3 * MICRO));
    // 1234 units at 567 base units per million: 1234 × 567 µ, margin 10 %.
    let node = 1234 * 567;
    let margin = margin_of(node, 100);
    assert_eq!(margin, 69_967);
    assert_eq!(hold.settle(node, margin).unwrap(), (node, margin));
    let k = store.get(info.id).unwrap();
    assert_eq!(k.balance_micro, 10 * MICRO - node - margin);
    assert_eq!(k.held_micro, 0);
    assert_eq!((k.spent_node_micro, k.spent_margin_micro), (node, margin));
    assert!(store.totals().unwrap().is_conserved());
}

#[test]
fn a_charge_above_the_hold_is_capped_at_the_hold() {
    let store = KeyStore::in_memory().unwrap();
    let (info, _) = store.create("k", 1, Limits::default()).unwrap();
    let hold = store.hold(info.id, 1000).unwrap();
    assert_eq!(hold.settle(900, 300).unwrap(), (900, 100));
    let hold = store.hold(info.id, 1000).unwrap();
    assert_eq!(hold.settle(u64::MAX, u64::MAX).unwrap(), (1000, 0));
    let k = store.get(info.id).unwrap();
    assert_eq!((k.spent_node_micro, k.spent_margin_micro), (1900, 100));
    assert_eq!(k.balance_micro, MICRO - 2000);
    assert!(store.totals().unwrap().is_conserved());
}

#[test]
fn release_and_drop_give_everything_back() {
    let store = KeyStore::in_memory().unwrap();
    let (info, _) = store.create("k", 4, Limits::default()).unwrap();
    let released = store.hold(info.id, MICRO).unwrap();
    let dropped = store.hold(info.id, 2 * MICRO).unwrap();
    assert_eq!(store.get(info.id).unwrap().held_micro, 3 * MICRO);
    released.release().unwrap();
    assert_eq!(store.get(info.id).unwrap().held_micro, 2 * MICRO);
    drop(dropped);
    assert_eq!(store.get(info.id).unwrap(), info);
    // A zero settle is a release too.
    store.hold(info.id, 5).unwrap().settle(0, 0).unwrap();
    assert_eq!(store.get(info.id).unwrap(), info);
}

#[test]
fn reopening_releases_holds_left_by_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let (id, secret) = {
        let store = KeyStore::open(&path).unwrap();
        let (info, secret) = store.create("k", 5, Limits::default()).unwrap();
        std::mem::forget(store.hold(info.id, 2 * MICRO).unwrap());
        std::mem::forget(store.hold(info.id, 1).unwrap());
        let k = store.get(info.id).unwrap();
        assert_eq!(k.held_micro, 2 * MICRO + 1);
        (info.id, secret)
    };
    let store = KeyStore::open(&path).unwrap();
    let k = store.get(id).unwrap();
    assert_eq!((k.balance_micro, k.held_micro), (5 * MICRO, 0));
    assert_eq!(store.authenticate(&secret).unwrap().id, id);
    assert!(store.totals().unwrap().is_conserved());
    assert_journal_replays(&path);
}

#[test]
fn overflowing_credit_is_refused_not_wrapped() {
    let store = KeyStore::in_memory().unwrap();
    assert!(matches!(
        store.create("k", u64::MAX, Limits::default()),
        Err(KeyError::Invalid(_))
    ));
    let max_units = i64::MAX as u64 / MICRO;
    let (info, _) = store.create("k", max_units, Limits::default()).unwrap();
    assert!(matches!(
        store.credit(info.id, 1),
        Err(KeyError::Invalid(_))
    ));
    assert_eq!(store.get(info.id).unwrap(), info);
    assert_eq!(margin_of(u64::MAX, 1000), u64::MAX);
    assert_eq!(
        margin_of(u64::MAX, 2000),
        u64::MAX,
        "saturates instead of wrapping"
    );
    assert_eq!(margin_of(999, 1), 0);
    assert_eq!(margin_of(1000, 1), 1);
    assert_eq!(margin_of(12_345, 150), 1851);
}

/// Per key: the journal's accounts replayed from zero equal the stored columns.
fn assert_journal_replays(path: &Path) {
    let conn = Connection::open(path).unwrap();
    assert_replays(&conn);
}

fn assert_replays(conn: &Connection) {
    let mut acc: HashMap<(i64, String), i128> = HashMap::new();
    let mut stmt = conn
        .prepare("SELECT key_id, from_account, to_account, amount FROM journal ORDER BY seq")
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let (key, from, to, amount): (i64, String, String, i64) = (
            r.get(0).unwrap(),
            r.get(1).unwrap(),
            r.get(2).unwrap(),
            r.get(3).unwrap(),
        );
        assert!(amount > 0);
        *acc.entry((key, from)).or_default() -= i128::from(amount);
        *acc.entry((key, to)).or_default() += i128::from(amount);
    }
    let mut stmt = conn
        .prepare("SELECT id, granted, balance, held, spent_node, spent_margin FROM keys")
        .unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(r) = rows.next().unwrap() {
        let id: i64 = r.get(0).unwrap();
        let get = |name: &str| acc.get(&(id, name.to_string())).copied().unwrap_or(0);
        let col = |i: usize| i128::from(r.get::<_, i64>(i).unwrap());
        assert_eq!(-get("grant"), col(1), "granted of key {id}");
        assert_eq!(get("balance"), col(2), "balance of key {id}");
        assert_eq!(get("held"), col(3), "held of key {id}");
        assert_eq!(get("spent_node"), col(4), "spent_node of key {id}");
        assert_eq!(get("spent_margin"), col(5), "spent_margin of key {id}");
    }
}

/// SplitMix64: a tiny seeded generator, so every failure reproduces from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..=max`.
    fn upto(&mut self, max: u64) -> u64 {
        if max == u64::MAX {
            self.next()
        } else {
            self.next() % (max + 1)
        }
    }
}

/// What the books should say about one key.
#[derive(Clone, Copy, Debug, Default)]
struct Expected {
    granted: u64,
    balance: u64,
    held: u64,
    node: u64,
    margin: u64,
    revoked: bool,
}

#[test]
fn property_the_books_always_balance() {
    for seed in 0..50u64 {
        run_books(seed, 300);
    }
}

fn run_books(seed: u64, steps: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.db");
    let mut store = KeyStore::open(&path).unwrap();
    let reader = Connection::open(&path).unwrap();
    let mut rng = Rng(seed);
    let mut model: HashMap<KeyId, Expected> = HashMap::new();
    let mut ids: Vec<KeyId> = Vec::new();
    let mut holds: Vec<Hold> = Vec::new();
    let (mut sum_node, mut sum_margin) = (0u128, 0u128);

    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let pick = match rng.upto(99) {
            // No hold to close: take one instead.
            p @ 50..=94 if holds.is_empty() => 18 + p % 32,
            p => p,
        };
        match pick {
            _ if ids.is_empty() || pick < 8 => {
                let credit = rng.upto(20);
                let (info, _) = store
                    .create(&format!("key {step}"), credit, Limits::default())
                    .unwrap();
                let micro = credit * MICRO;
                ids.push(info.id);
                model.insert(
                    info.id,
                    Expected {
                        granted: micro,
                        balance: micro,
                        ..Default::default()
                    },
                );
            }
            8..=17 => {
                let id = ids[rng.upto(ids.len() as u64 - 1) as usize];
                let units = 1 + rng.upto(5);
                let e = model.get_mut(&id).unwrap();
                match store.credit(id, units) {
                    Ok(info) => {
                        assert!(!e.revoked, "{ctx}: credited a revoked key");
                        e.granted += units * MICRO;
                        e.balance += units * MICRO;
                        assert_eq!(info.balance_micro, e.balance, "{ctx}");
                    }
                    Err(KeyError::Revoked) => assert!(e.revoked, "{ctx}"),
                    Err(other) => panic!("{ctx}: {other}"),
                }
            }
            18..=49 => {
                let id = ids[rng.upto(ids.len() as u64 - 1) as usize];
                let e = model.get_mut(&id).unwrap();
                // Up to 130 % of the balance (some refused), now and then tiny or zero.
                let size = match rng.upto(9) {
                    0 => rng.upto(3),
                    _ => rng.upto(e.balance + e.balance * 3 / 10 + 10),
                };
                match store.hold(id, size) {
                    Ok(hold) => {
                        assert!(!e.revoked && size <= e.balance, "{ctx}: hold of {size}");
                        assert_eq!((hold.key(), hold.micro()), (id, size));
                        e.balance -= size;
                        e.held += size;
                        holds.push(hold);
                    }
                    Err(KeyError::InsufficientCredit { need, have }) => {
                        assert!(!e.revoked && size > e.balance, "{ctx}");
                        assert_eq!((need, have), (size, e.balance), "{ctx}");
                    }
                    Err(KeyError::Revoked) => assert!(e.revoked, "{ctx}"),
                    Err(other) => panic!("{ctx}: {other}"),
                }
            }
            50..=94 => {
                let hold = holds.swap_remove(rng.upto(holds.len() as u64 - 1) as usize);
                let (id, size) = (hold.key(), hold.micro());
                let e = model.get_mut(&id).unwrap();
                e.held -= size;
                match pick % 4 {
                    0 | 1 => {
                        let permille = rng.upto(300);
                        // Mostly a node charge whose margin fits in the hold; sometimes any
                        // node charge up to the hold, whose margin may be capped.
                        let any = rng.upto(9) == 0;
                        let node = if any {
                            rng.upto(size)
                        } else {
                            rng.upto(size * 1000 / (1000 + permille))
                        };
                        let margin = margin_of(node, permille);
                        let want_margin = margin.min(size - node);
                        assert!(any || want_margin == margin, "{ctx}: margin should fit");
                        let charged = hold.settle(node, margin).unwrap();
                        assert_eq!(charged, (node, want_margin), "{ctx}");
                        e.node += node;
                        e.margin += want_margin;
                        e.balance += size - node - want_margin;
                        sum_node += u128::from(node);
                        sum_margin += u128::from(want_margin);
                    }
                    2 => {
                        hold.release().unwrap();
                        e.balance += size;
                    }
                    _ => {
                        drop(hold);
                        e.balance += size;
                    }
                }
            }
            95..=97 => {
                let id = ids[rng.upto(ids.len() as u64 - 1) as usize];
                assert!(store.revoke(id).unwrap().revoked, "{ctx}");
                model.get_mut(&id).unwrap().revoked = true;
            }
            _ => {
                // Reopen the file: after a crash (holds forgotten, released at open) or after
                // a clean stop (holds dropped, so released first).
                let crash = rng.upto(1) == 0;
                for hold in holds.drain(..) {
                    let e = model.get_mut(&hold.key()).unwrap();
                    e.held -= hold.micro();
                    e.balance += hold.micro();
                    if crash {
                        std::mem::forget(hold);
                    }
                }
                drop(std::mem::replace(
                    &mut store,
                    KeyStore::in_memory().unwrap(),
                ));
                store = KeyStore::open(&path).unwrap();
            }
        }
        check_books(&store, &reader, &model, &holds, sum_node, sum_margin, &ctx);
    }
}

fn check_books(
    store: &KeyStore,
    reader: &Connection,
    model: &HashMap<KeyId, Expected>,
    holds: &[Hold],
    sum_node: u128,
    sum_margin: u128,
    ctx: &str,
) {
    let totals = store.totals().unwrap();
    assert!(totals.is_conserved(), "{ctx}: {totals:?}");
    let keys = store.list().unwrap();
    assert_eq!(keys.len(), model.len(), "{ctx}");
    for k in &keys {
        let e = model[&k.id];
        let got = (
            k.balance_micro,
            k.held_micro,
            k.spent_node_micro,
            k.spent_margin_micro,
        );
        assert_eq!(
            got,
            (e.balance, e.held, e.node, e.margin),
            "{ctx}: key {}",
            k.id
        );
        assert_eq!(
            k.balance_micro + k.held_micro + k.spent_node_micro + k.spent_margin_micro,
            e.granted,
            "{ctx}: key {}",
            k.id
        );
        assert_eq!(k.revoked, e.revoked, "{ctx}");
    }
    let granted: u128 = model.values().map(|e| u128::from(e.granted)).sum();
    let held: u128 = holds.iter().map(|h| u128::from(h.micro())).sum();
    assert_eq!(totals.granted_micro, granted, "{ctx}");
    assert_eq!(totals.held_micro, held, "{ctx}");
    // Key charges = node spend + margin, each exactly as charged by settle.
    assert_eq!(totals.spent_node_micro, sum_node, "{ctx}");
    assert_eq!(totals.spent_margin_micro, sum_margin, "{ctx}");
    assert_replays(reader);
}

#[test]
fn handles_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<KeyStore>();
    send_sync::<atoma_gateway::ratelimit::RateLimiter>();
    send::<Hold>();
    let store = KeyStore::in_memory().unwrap();
    let (info, _) = store.create("k", 1, Limits::default()).unwrap();
    let hold = store.hold(info.id, 10).unwrap();
    std::thread::spawn(move || hold.settle(4, 1).unwrap())
        .join()
        .unwrap();
    assert_eq!(store.get(info.id).unwrap().balance_micro, MICRO - 5);
}
