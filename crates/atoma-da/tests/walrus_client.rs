//! `WalrusClient` against real HTTP servers on loopback: our Walrus-compatible server (whole
//! conformance suite, with and without multi-part content), liars (wrong blob, wrong part),
//! a flaky publisher, a closed port and a body over the server's limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use atoma_da::manifest::{Manifest, Part};
use atoma_da::{BlobStore, DaError, DirStore, WalrusClient, WalrusConfig, conformance, server};
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, put};

/// A server on 127.0.0.1:0 in its own runtime, stopped when dropped.
struct Served {
    addr: SocketAddr,
    _stop: tokio::sync::oneshot::Sender<()>,
    _rt: tokio::runtime::Runtime,
}

impl Served {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn spawn(app: Router) -> Served {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    rt.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Served {
        addr,
        _stop: stop,
        _rt: rt,
    }
}

/// Our server over a fresh directory (kept alive by the returned guard).
fn da_server(body_limit: usize) -> (Served, DirStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = DirStore::open(dir.path()).unwrap();
    (spawn(server::router(store.clone(), body_limit)), store, dir)
}

fn client(url: &str, part_size: usize) -> WalrusClient {
    WalrusClient::new(WalrusConfig {
        part_size,
        retries: 2,
        backoff: Duration::from_millis(5),
        timeout: Duration::from_secs(5),
        ..WalrusConfig::with_url(url)
    })
}

#[test]
fn walrus_client_on_our_server_conforms() {
    let (s, _, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    conformance::run_all(&client(&s.url(), 10 * 1024 * 1024));
}

#[test]
fn walrus_client_with_tiny_parts_conforms() {
    let (s, store, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let c = client(&s.url(), 1000);
    conformance::run_all(&c);
    // Multi-part content really was split: the ref names a manifest, not the content.
    let bytes = conformance::pattern(3500, 1);
    let r = c.put(&bytes).unwrap();
    let m = Manifest::decode(&store.read_raw(&r.blob_id).unwrap().unwrap()).unwrap();
    assert_eq!(m.parts.len(), 4);
    assert_eq!(m.parts[3].size, 500);
    assert_eq!((m.total_size, m.content_hash), (r.size, r.content_hash));
}

#[test]
fn server_answers_in_walrus_shapes() {
    let (s, _, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let url = format!("{}/v1/blobs?epochs=5&deletable=false", s.url());
    let first: serde_json::Value = ureq::put(&url)
        .send_bytes(b"abc")
        .unwrap()
        .into_json()
        .unwrap();
    let obj = &first["newlyCreated"]["blobObject"];
    let id = obj["blobId"].as_str().unwrap().to_owned();
    assert_eq!(id, atoma_da::content_blob_id(b"abc"));
    assert_eq!(obj["size"], 3);
    assert_eq!(obj["encodingType"], "RS2");
    assert_eq!(obj["storage"]["endEpoch"], 5);
    assert_eq!(obj["id"].as_str().unwrap().len(), 66);
    assert_eq!(
        first["newlyCreated"]["resourceOperation"]["registerFromScratch"]["epochsAhead"],
        5
    );
    let again: serde_json::Value = ureq::put(&url)
        .send_bytes(b"abc")
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(again["alreadyCertified"]["blobId"], id.as_str());
    assert_eq!(again["alreadyCertified"]["endEpoch"], 5);
    assert_eq!(again["alreadyCertified"]["event"]["eventSeq"], "0");
    let got = ureq::get(&format!("{}/v1/blobs/{id}", s.url()))
        .call()
        .unwrap();
    assert_eq!(got.content_type(), "application/octet-stream");
    assert_eq!(got.into_string().unwrap(), "abc");
    let missing = atoma_da::content_blob_id(b"missing");
    match ureq::get(&format!("{}/v1/blobs/{missing}", s.url())).call() {
        Err(ureq::Error::Status(404, r)) => {
            let j: serde_json::Value = r.into_json().unwrap();
            assert_eq!(j["error"]["code"], 404);
        }
        other => panic!("{other:?}"),
    }
    for bad in ["..%2Fsecret", "a.b", "%2E%2E%2Fx"] {
        match ureq::get(&format!("{}/v1/blobs/{bad}", s.url())).call() {
            Err(ureq::Error::Status(400, _)) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert_eq!(
        ureq::get(&format!("{}/health", s.url()))
            .call()
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_server_sending_other_bytes_is_caught() {
    let (honest, _, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let r = client(&honest.url(), 1 << 20).put(b"the real log").unwrap();
    let liar =
        spawn(Router::new().route("/v1/blobs/{id}", get(|| async { b"a forged log".to_vec() })));
    match client(&liar.url(), 1 << 20).get(&r) {
        Err(DaError::HashMismatch { blob_id, .. }) => assert_eq!(blob_id, r.blob_id),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_lying_part_inside_a_manifest_is_caught() {
    let (s, store, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let c = client(&s.url(), 1000);
    let content = conformance::pattern(2500, 3);
    let r = c.put(&content).unwrap();
    let m = Manifest::decode(&store.read_raw(&r.blob_id).unwrap().unwrap()).unwrap();
    // A second manifest for the same content whose middle part points at other bytes.
    let other = conformance::pattern(1000, 4);
    let other_id = store.write_raw(&other).unwrap().0;
    let mut forged = m.clone();
    forged.parts[1].blob_id = other_id.clone();
    let forged_id = store.write_raw(&forged.encode().unwrap()).unwrap().0;
    let forged_ref = atoma_da::BlobRef {
        blob_id: forged_id,
        ..r.clone()
    };
    match c.get(&forged_ref) {
        Err(DaError::HashMismatch { blob_id, .. }) => assert_eq!(blob_id, other_id),
        other => panic!("{other:?}"),
    }
    // Also when the lying part claims its own hash: the whole-content hash catches it.
    let mut self_consistent = m;
    self_consistent.parts[1] = Part {
        size: 1000,
        hash: atoma_crypto::blake2b256(&other),
        blob_id: other_id,
    };
    let id = store
        .write_raw(&self_consistent.encode().unwrap())
        .unwrap()
        .0;
    let bad_ref = atoma_da::BlobRef { blob_id: id, ..r };
    assert!(matches!(c.get(&bad_ref), Err(DaError::HashMismatch { .. })));
}

#[test]
fn a_flaky_publisher_is_retried() {
    let (s, _, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let upstream = s.url();
    let puts = Arc::new(AtomicUsize::new(0));
    let seen = puts.clone();
    let flaky = spawn(Router::new().route(
        "/v1/blobs",
        put(move |body: axum::body::Bytes| {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            let upstream = upstream.clone();
            async move {
                if n < 2 {
                    return (StatusCode::SERVICE_UNAVAILABLE, "busy".to_owned());
                }
                let answer = tokio::task::spawn_blocking(move || {
                    ureq::put(&format!("{upstream}/v1/blobs"))
                        .send_bytes(&body)
                        .unwrap()
                        .into_string()
                        .unwrap()
                })
                .await
                .unwrap();
                (StatusCode::OK, answer)
            }
        }),
    ));
    let c = WalrusClient::new(WalrusConfig {
        publisher: flaky.url(),
        aggregator: s.url(),
        backoff: Duration::from_millis(5),
        ..WalrusConfig::default()
    });
    let r = c.put(b"eventually stored").unwrap();
    assert_eq!(puts.load(Ordering::SeqCst), 3);
    assert_eq!(c.get(&r).unwrap(), b"eventually stored");
}

#[test]
fn a_down_server_is_unavailable_after_the_retries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // closed again when the listener drops
    let c = client(&format!("http://127.0.0.1:{port}"), 1 << 20);
    let started = Instant::now();
    match c.put(b"x") {
        Err(DaError::Unavailable { url, attempts, .. }) => {
            assert_eq!(attempts, 3);
            assert!(url.contains(&port.to_string()), "{url}");
        }
        other => panic!("{other:?}"),
    }
    let r = atoma_da::BlobRef {
        blob_id: atoma_da::content_blob_id(b"x"),
        content_hash: atoma_crypto::blake2b256(b"x"),
        size: 1,
    };
    assert!(matches!(
        c.get(&r),
        Err(DaError::Unavailable { attempts: 3, .. })
    ));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_body_over_the_limit_is_rejected_with_413() {
    let (s, _, _dir) = da_server(1024);
    let c = client(&s.url(), 16 << 20);
    // Larger than socket buffers: the server must still answer 413, not break the pipe.
    match c.put(&conformance::pattern(12 << 20, 5)) {
        Err(DaError::Rejected { status: 413, body }) => {
            let j: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(j["error"]["code"], 413);
        }
        other => panic!("{other:?}"),
    }
    c.put(&conformance::pattern(1024, 5)).unwrap();
    // The default limit (16 MiB) admits the public services' 10 MiB parts and more.
    let (s, _, _dir) = da_server(server::DEFAULT_BODY_LIMIT);
    let c = client(&s.url(), 16 << 20);
    let big = conformance::pattern(12 << 20, 6);
    let r = c.put(&big).unwrap();
    assert!(c.get(&r).unwrap() == big);
}

#[test]
fn too_many_requests_is_retried_but_other_4xx_is_not() {
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let s = spawn(Router::new().route(
        "/v1/blobs",
        put(move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "0")],
                        "slow down",
                    )
                } else {
                    (StatusCode::BAD_REQUEST, [("retry-after", "0")], "no")
                }
            }
        }),
    ));
    match client(&s.url(), 1 << 20).put(b"x") {
        Err(DaError::Rejected { status: 400, body }) => assert_eq!(body, "no"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}
