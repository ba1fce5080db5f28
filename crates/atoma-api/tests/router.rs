//! Router tests without sockets (`tower::ServiceExt::oneshot`) on a trivial backend: success,
//! bad input, bad auth, replay, wrong node, unknown model, exhausted stack, overload, readiness,
//! streaming, and a client that disconnects mid-stream.

mod common;

use common::*;

#[tokio::test]
async fn chat_completion_is_served_signed_and_metered() {
    let f = fixture(0);
    let (status, body) = send(&f, signed(&f, "/v1/chat/completions", 1, &chat(1, 16))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 7);
    assert_eq!(verify_json(&body).unwrap(), f.node.address());
    let usage = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(
        usage.units_used,
        body["usage"]["total_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage.units_reserved, 0);
    // Tampering with the body breaks the signature check.
    let mut forged = body.clone();
    forged["choices"][0]["message"]["content"] = json!("Lyon");
    assert!(verify_json(&forged).is_err());
}

#[tokio::test]
async fn completions_work_and_cap_at_max_tokens() {
    let f = fixture(0);
    let body = json!({"model": "tiny", "prompt": "Say it", "max_tokens": 3}).to_string();
    let (status, body) = send(&f, signed(&f, "/v1/completions", 1, &body)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "The capital of");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["object"], "text_completion");
}

#[tokio::test]
async fn bad_input_is_400() {
    let f = fixture(0);
    for (body, needle) in [
        ("{not json", "invalid request body"),
        (
            r#"{"model": "tiny", "messages": "hi"}"#,
            "invalid request body",
        ),
        (
            r#"{"model": "tiny", "messages": [], "max_tokens": 5}"#,
            "must not be empty",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "x"}"#,
            "invalid request body",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}"#,
            "role",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 9}"#,
            "temperature",
        ),
        (
            r#"{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 200}"#,
            "`n`",
        ),
    ] {
        let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, body)).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, needle);
    }
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        0,
        "nothing charged"
    );
    let huge = "x".repeat(atoma_api::MAX_BODY_BYTES + 10);
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &huge)).await;
    assert_error(status, &resp, StatusCode::PAYLOAD_TOO_LARGE, "exceeds");
}

#[tokio::test]
async fn auth_failures_are_401() {
    let f = fixture(0);
    let body = chat(1, 5);
    let plain = Request::post("/v1/chat/completions")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, resp) = send(&f, plain).await;
    assert_error(
        status,
        &resp,
        StatusCode::UNAUTHORIZED,
        "missing X-Signature",
    );
    // A signature over another body.
    let mut req = signed(&f, "/v1/chat/completions", 1, &chat(2, 5));
    *req.body_mut() = Body::from(body.clone());
    let (status, resp) = send(&f, req).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "bad X-Signature");
    // Someone else's key on the owner's stack.
    let mallory = Keypair::from_secret([9; 32]);
    let req = Request::post("/v1/chat/completions")
        .header("x-signature", mallory.sign(&blake2b256(body.as_bytes())))
        .header("x-stack-small-id", "1")
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, resp) = send(&f, req).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "does not own");
    // A stack sold to another node.
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 2, &body)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "not to this node");
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 99, &body)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
}

#[tokio::test]
async fn replays_are_refused_but_fresh_nonces_work() {
    let f = fixture(0);
    let req = || signed(&f, "/v1/chat/completions", 1, &chat(7, 5));
    assert_eq!(send(&f, req()).await.0, StatusCode::OK);
    let used = f.meter.usage(StackSmallId(1)).unwrap().units_used;
    let (status, resp) = send(&f, req()).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "replay");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        used,
        "a replay spends nothing"
    );
    assert_eq!(
        send(&f, signed(&f, "/v1/chat/completions", 1, &chat(8, 5)))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn unknown_model_exhausted_stack_overload_and_readiness() {
    let f = fixture(0);
    let other =
        json!({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}).to_string();
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &other)).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "gpt-9");
    // Stack 3 has 20 units; this request reserves its prompt plus 30 output tokens.
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 3, &chat(1, 30))).await;
    assert_error(status, &resp, StatusCode::LOCKED, "compute units left");
    f.backend.overloaded.store(true, Ordering::Relaxed);
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &chat(2, 5)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        0,
        "refused work is not charged"
    );
    f.backend.ready.store(false, Ordering::Relaxed);
    let (status, _) = send(&f, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    f.backend.ready.store(true, Ordering::Relaxed);
    let (status, body) = send(&f, Request::get("/health").body(Body::empty()).unwrap()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (_, models) = send(&f, Request::get("/v1/models").body(Body::empty()).unwrap()).await;
    assert_eq!(models["data"][0]["id"], "tiny");
    let resp = f
        .app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("atoma_requests_total"), "{text}");
    let (status, resp) = send(&f, Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "no such route");
}

#[tokio::test]
async fn streaming_chunks_are_signed_and_usage_is_included() {
    let f = fixture(0);
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "stream_options": {"include_usage": true}, "max_tokens": 50})
        .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut content = String::new();
    for c in &chunks {
        assert_eq!(
            verify_json(c).unwrap(),
            f.node.address(),
            "every chunk is signed"
        );
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
    }
    assert_eq!(content, "The capital of France is Paris.");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 7);
    let u = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(u.units_used, usage["total_tokens"].as_u64().unwrap());
    assert_eq!(u.units_reserved, 0);
}

#[tokio::test]
async fn a_client_disconnecting_mid_stream_pays_only_what_was_generated() {
    let f = fixture(50);
    let body =
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                      "max_tokens": 50})
        .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body))
        .await
        .unwrap();
    let mut stream = resp.into_body().into_data_stream();
    // Read two chunks, then go away.
    let mut seen = 0;
    while seen < 2 {
        let chunk = stream.next().await.unwrap().unwrap();
        seen += sse_data(std::str::from_utf8(&chunk).unwrap()).len();
    }
    drop(stream);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let u = f.meter.usage(StackSmallId(1)).unwrap();
    assert_eq!(u.units_reserved, 0, "nothing stays reserved");
    let prompt = 1 + 3; // one word plus the trivial backend's 3 template tokens
    assert!(
        u.units_used >= prompt + 2 && u.units_used < prompt + 7,
        "charged {}",
        u.units_used
    );
    assert_eq!(u.settled_requests, 1);
}

/// 200 concurrent requests on a stack that affords about 50: the affordable ones are served,
/// the rest get 423, and the stack's used units equal exactly the sum of the served usages.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_requests_on_a_small_stack() {
    let f = fixture(1);
    // Each request: prompt 2 words + 3 template tokens = 5, max_tokens 7 → reserves 12, uses 12.
    // Stack 4 holds 600 units: 50 requests' worth.
    let owner: Address = atoma_crypto::address_hex(&f.user.address())
        .parse()
        .unwrap();
    f.meter
        .upsert_stack(&Stack {
            small_id: StackSmallId(4),
            stack_id: "0x4".into(),
            owner,
            task_small_id: TaskSmallId(1),
            selected_node_id: ME,
            num_compute_units: ComputeUnits(600),
            price_per_one_million_compute_units: Amount(1),
            escrowed: Amount(1),
            is_claimed: false,
            created_at_epoch: 0,
        })
        .unwrap();
    let f = Arc::new(f);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let body =
                json!({"model": "tiny", "messages": [{"role": "user", "content": "hi there"}],
                              "max_tokens": 7, "nonce": i})
                .to_string();
            send(&f, signed(&f, "/v1/chat/completions", 4, &body)).await
        }));
    }
    let (mut served, mut locked, mut used) = (0, 0, 0);
    for t in tasks {
        let (status, body) = t.await.unwrap();
        match status {
            StatusCode::OK => {
                served += 1;
                used += body["usage"]["total_tokens"].as_u64().unwrap();
            }
            StatusCode::LOCKED => locked += 1,
            other => panic!("unexpected {other}: {body}"),
        }
    }
    let u = f.meter.usage(StackSmallId(4)).unwrap();
    assert_eq!(served + locked, 200);
    assert_eq!(served, 50, "exactly the affordable requests are served");
    assert_eq!(u.units_used, used, "used units = sum of served usage");
    assert_eq!((u.units_used, u.units_reserved), (600, 0));
}

/// Every charged request leaves a log record in the same transaction: the exact body and
/// signature, the answer as sent (JSON or every chunk), token ids and the seed returned to the
/// client; its leaf is recomputable from the record alone.
#[tokio::test]
async fn every_served_request_is_logged_with_verifiable_evidence() {
    use atoma_state::log::{LogRecord, ResponseRecord};
    let f = fixture(0);
    let plain = chat(1, 16);
    let (status, answer) = send(&f, signed(&f, "/v1/chat/completions", 1, &plain)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let streamed = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                          "stream": true, "max_tokens": 3, "seed": 42})
    .to_string();
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &streamed))
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let data = sse_data(&text);
    let log = f.meter.frozen_log(StackSmallId(1)).unwrap();
    assert_eq!(
        log.units,
        f.meter.usage(StackSmallId(1)).unwrap().units_used
    );
    let records: Vec<LogRecord> = log
        .records
        .iter()
        .map(|r| LogRecord::decode(r).unwrap())
        .collect();
    assert_eq!(records.len(), 2);

    let (r0, r1) = (&records[0], &records[1]);
    assert_eq!(r0.request_body, plain.as_bytes());
    assert_eq!(r0.request_signer().unwrap(), f.user.address());
    let (hash, signer) = r0.response_hash().unwrap();
    assert_eq!(signer, Some(f.node.address()));
    assert_eq!(
        answer["response_hash"].as_str().unwrap(),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, hash)
    );
    assert_eq!(r0.output_tokens.len(), 7);
    assert_eq!(r0.finish_reason, "stop");
    assert_eq!(answer["seed"].as_u64(), Some(r0.seed));

    assert_eq!(r1.request_body, streamed.as_bytes());
    assert_eq!(r1.seed, 42);
    assert_eq!(r1.finish_reason, "length");
    assert_eq!((r1.usage_completion_tokens, r1.output_tokens.len()), (3, 3));
    match &r1.response {
        ResponseRecord::Stream(chunks) => {
            assert_eq!(
                chunks.as_slice(),
                &data[..data.len() - 1],
                "the chunks as sent"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(data[data.len() - 2].contains("\"seed\":42"));
    assert_eq!(r1.response_hash().unwrap().1, Some(f.node.address()));
    // The leaves the node commits to are the ones anyone recomputes from the records.
    assert_eq!(log.leaves, vec![r0.leaf().unwrap(), r1.leaf().unwrap()]);
}
