//! The wider OpenAI surface on the trivial backend: authorization before work, unknown-stack
//! syncs, parameters refused by name, log-probabilities, echo, token prompts, fingerprint,
//! cached tokens and the tokenizer routes.

mod common;

use common::*;

#[tokio::test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
async fn authorization_comes_before_any_work() {
    let f = fixture(0);
    // 3.5 MB of prompt, signed by a key that owns no stack: refused before parsing or
    // tokenizing anything.
    let big = json!({"model": "tiny", "max_tokens": 4,
                     "messages": [{"role": "user", "content": "word ".repeat(700_000)}]})
    .to_string();
    assert!(big.len() > 3_400_000);
    let stranger = Keypair::from_secret([9; 32]);
    let req = |stack: u64, body: &str, key: &Keypair| {
        Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("x-signature", key.sign(&blake2b256(body.as_bytes())))
            .header("x-stack-small-id", stack.to_string())
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let t = std::time::Instant::now();
    let (status, resp) = send(&f, req(1, &big, &stranger)).await;
    println!(
        "3.5 MB body from a key owning no stack: {status} in {:?}",
        t.elapsed()
    );
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "does not own");
    // A stack sold to another node, an unknown stack: 401, whatever the body.
    let (status, resp) = send(&f, req(2, &big, &f.user)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "not to this node");
    let (status, resp) = send(&f, req(77, "{not json", &f.user)).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
    assert_eq!(
        f.backend.prepared.load(Ordering::Relaxed),
        0,
        "nothing rendered"
    );
    assert_eq!(f.meter.usage(StackSmallId(1)).unwrap().units_used, 0);
}

#[tokio::test]
#[allow(clippy::print_stdout)] // the figures of the run, for the issue note
async fn unknown_stacks_cause_few_ledger_syncs_and_new_stacks_are_found() {
    let syncs = Arc::new(AtomicUsize::new(0));
    let counter = syncs.clone();
    let f = fixture_with(0, move |_| {
        let hook: atoma_api::Refresh = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
            // A ledger round trip.
            std::thread::sleep(Duration::from_millis(5));
        });
        Some(hook)
    });
    // The same unknown id, many times: one sync, then refused from memory.
    for i in 0..20 {
        let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 99, &chat(i, 4))).await;
        assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
    }
    assert_eq!(syncs.load(Ordering::Relaxed), 1);
    // Forty made-up ids at once: the syncs coalesce.
    let started = std::time::Instant::now();
    let reqs: Vec<_> = (0..40u64)
        .map(|i| {
            f.app
                .clone()
                .oneshot(signed(&f, "/v1/chat/completions", 1000 + i, &chat(0, 4)))
        })
        .collect();
    for r in futures_util::future::join_all(reqs).await {
        assert_eq!(r.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    let n = syncs.load(Ordering::Relaxed) - 1;
    let gaps = (started.elapsed().as_millis() / 100) as usize + 2;
    println!(
        "40 concurrent unknown stacks: {n} syncs in {:?}",
        started.elapsed()
    );
    assert!(n <= gaps, "{n} syncs for 40 requests");
    assert_eq!(f.backend.prepared.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_stack_bought_a_moment_ago_is_found_by_one_sync() {
    let syncs = Arc::new(AtomicUsize::new(0));
    let counter = syncs.clone();
    let user = Keypair::from_secret([3; 32]);
    let owner: Address = atoma_crypto::address_hex(&user.address()).parse().unwrap();
    let f = fixture_with(0, move |meter| {
        let meter = meter.clone();
        let hook: atoma_api::Refresh = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
            meter
                .upsert_stack(&Stack {
                    small_id: StackSmallId(50),
                    stack_id: "0x50".into(),
                    owner,
                    task_small_id: TaskSmallId(1),
                    selected_node_id: ME,
                    num_compute_units: ComputeUnits(1000),
                    price_per_one_million_compute_units: Amount(1),
                    escrowed: Amount(1),
                    is_claimed: false,
                    created_at_epoch: 0,
                })
                .unwrap();
        });
        Some(hook)
    });
    assert_eq!(f.user.address(), user.address());
    let (status, body) = send(&f, signed(&f, "/v1/chat/completions", 50, &chat(1, 4))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(syncs.load(Ordering::Relaxed), 1);
}

/// `X-Tx-Digest`: the hook gets the digest, and a stack the ledger's event list does not show
/// yet is found through it, even right after the same id was found unknown.
#[tokio::test]
async fn a_purchase_named_by_its_transaction_digest_is_looked_up() {
    const DIGEST: &str = "4vJ9JU1bJJE96FWSJKvHsmmFADCg4gpZQff4P3bkLKi";
    let seen = Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let log = seen.clone();
    let user = Keypair::from_secret([3; 32]);
    let owner: Address = atoma_crypto::address_hex(&user.address()).parse().unwrap();
    let f = fixture_with(0, move |meter| {
        let meter = meter.clone();
        let hook: atoma_api::Refresh = Arc::new(move |digest| {
            log.lock().unwrap().push(digest.map(str::to_string));
            // Only the purchase transaction shows the stack (the event list lags).
            if digest == Some(DIGEST) {
                let s = Stack {
                    small_id: StackSmallId(60),
                    stack_id: "0x60".into(),
                    owner,
                    task_small_id: TaskSmallId(1),
                    selected_node_id: ME,
                    num_compute_units: ComputeUnits(1000),
                    price_per_one_million_compute_units: Amount(1),
                    escrowed: Amount(1),
                    is_claimed: false,
                    created_at_epoch: 0,
                };
                assert!(meter.admit_stack(&s).unwrap());
            }
        });
        Some(hook)
    });
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 60, &chat(1, 4))).await;
    assert_error(status, &resp, StatusCode::UNAUTHORIZED, "unknown");
    let mut req = signed(&f, "/v1/chat/completions", 60, &chat(2, 4));
    req.headers_mut()
        .insert("x-tx-digest", DIGEST.parse().unwrap());
    let (status, body) = send(&f, req).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        *seen.lock().unwrap(),
        vec![None, Some(DIGEST.to_string())],
        "one plain sync, then one with the digest"
    );
    // A digest that is not one: refused by name before any lookup.
    for bad in ["0OIl", "not a digest at all, spaces and all........"] {
        let mut req = signed(&f, "/v1/chat/completions", 61, &chat(3, 4));
        req.headers_mut()
            .insert("x-tx-digest", bad.parse().unwrap());
        let (status, resp) = send(&f, req).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, "X-Tx-Digest");
    }
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn unsupported_parameters_are_refused_by_name_and_harmless_ones_accepted() {
    let f = fixture(0);
    let refused = [
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("modalities", json!(["text", "audio"])),
        ("prediction", json!({"type": "content", "content": "x"})),
        ("response_format", json!({"type": "regex", "regex": "a+"})),
        ("functions", json!([{"name": "f"}])),
        ("function_call", json!("auto")),
        ("web_search_options", json!({})),
        ("reasoning_effort", json!("low")),
        ("verbosity", json!("low")),
        ("store", json!(true)),
    ];
    for (i, (name, value)) in refused.iter().enumerate() {
        let mut body: Value = serde_json::from_str(&chat(i as u32, 4)).unwrap();
        body[*name] = value.clone();
        let (status, resp) =
            send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, &format!("`{name}`"));
    }
    let names: Vec<&str> = atoma_api::openai::UNSUPPORTED
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for (name, _) in &refused {
        assert!(
            names.contains(name),
            "{name} is missing from the README's table"
        );
    }
    for (name, value) in [("suffix", json!("tail")), ("best_of", json!(3))] {
        let mut body = json!({"model": "tiny", "prompt": "hi", "max_tokens": 4});
        body[name] = value;
        let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, &format!("`{name}`"));
    }
    for (body, needle) in [
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            "image_url",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "tool", "content": "42"}]}),
            "tool_call_id",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "function", "content": "42", "name": "f"}]}),
            "`function`",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "a"}]}]}),
            "function",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "assistant", "content": null, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
            "arguments",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "bad name"}}]}),
            "tools[0].function.name",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tool_choice": "required"}),
            "needs `tools`",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": {"type": "function", "function": {"name": "g"}}}),
            "does not declare",
        ),
        (
            json!({"model": "tiny", "prompt": "a",
                   "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "chat completions",
        ),
        (
            json!({"model": "tiny", "prompt": ["a", "b"], "echo": true}),
            "echo",
        ),
        (
            json!({"model": "tiny", "prompt": ["a", "b", "c"], "n": 3}),
            "at most 8 choices",
        ),
        (
            json!({"model": "tiny", "prompt": ["a", ""]}),
            "must not be empty",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "echo": true, "logprobs": 1}),
            "echo",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logit_bias": {"x": 1}}),
            "logit_bias",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "logit_bias": {"5": 101}}),
            "logit_bias",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}),
            "logprobs",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "top_k": -5}),
            "top_k",
        ),
        (json!({"model": "tiny", "prompt": "a", "min_p": 2}), "min_p"),
        (json!({"model": "tiny", "prompt": "a", "n": 0}), "`n`"),
        (
            json!({"model": "tiny", "prompt": "a", "n": 9}),
            "at most 8 choices",
        ),
        (
            json!({"model": "tiny", "prompt": "a", "n": 2, "best_of": 3}),
            "best_of",
        ),
    ] {
        let path = if body.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        let (status, resp) = send(&f, signed(&f, path, 1, &body.to_string())).await;
        assert_error(status, &resp, StatusCode::BAD_REQUEST, needle);
    }
    // Harmless values pass.
    let body = json!({"model": "tiny", "messages": [{"role": "developer", "content": "be brief"},
                                                    {"role": "user", "content": "x"}],
                      "max_tokens": 4, "store": false, "modalities": ["text"], "user": "u-1",
                      "metadata": {"a": "b"}, "service_tier": "auto", "tool_choice": "none",
                      "response_format": {"type": "text"}, "parallel_tool_calls": true,
                      "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                      "logit_bias": {"3": -100, "4": 2.5}});
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(
        f.meter.usage(StackSmallId(1)).unwrap().units_used,
        resp["usage"]["total_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn logprobs_echo_token_prompts_fingerprint_and_cached_tokens() {
    let f = fixture(0);
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                      "logprobs": true, "top_logprobs": 2, "max_tokens": 16});
    let (status, resp) = send(&f, signed(&f, "/v1/chat/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let content = resp["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), 7);
    assert_eq!(content[1]["token"], " capital");
    assert_eq!(content[1]["bytes"], json!(" capital".as_bytes()));
    assert_eq!(content[1]["logprob"], -0.5);
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[1]["top_logprobs"][1]["logprob"], -1.5);
    assert!(
        resp["system_fingerprint"]
            .as_str()
            .unwrap()
            .contains("model-sha256:")
    );
    assert_eq!(resp["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(verify_json(&resp).unwrap(), f.node.address());

    // Streamed: every token's entry arrives once, with the chunk that carries its text.
    let body = json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                      "logprobs": true, "top_logprobs": 1, "max_tokens": 16, "stream": true,
                      "stream_options": {"include_usage": true}});
    let resp = f
        .app
        .clone()
        .oneshot(signed(&f, "/v1/chat/completions", 1, &body.to_string()))
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
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let mut tokens = Vec::new();
    for c in &chunks {
        assert!(c["system_fingerprint"].is_string());
        if let Some(lp) = c["choices"]
            .get(0)
            .and_then(|ch| ch["logprobs"]["content"].as_array())
        {
            tokens.extend(lp.iter().map(|e| e["token"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(tokens.concat(), "The capital of France is Paris.");
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens_details"]["cached_tokens"],
        0
    );

    // Completions: legacy shape, token-id prompts, echo.
    let body = json!({"model": "tiny", "prompt": "x y", "logprobs": 3, "max_tokens": 3});
    let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let lp = &resp["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"], json!(["The", " capital", " of"]));
    assert_eq!(lp["token_logprobs"], json!([-0.5, -0.5, -0.5]));
    assert_eq!(lp["text_offset"], json!([0, 3, 11]));
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    for prompt in [json!([5, 6, 7]), json!([[5, 6, 7]])] {
        let body = json!({"model": "tiny", "prompt": prompt, "echo": true, "max_tokens": 2});
        let (status, resp) = send(&f, signed(&f, "/v1/completions", 1, &body.to_string())).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["choices"][0]["text"], "<5><6><7>The capital");
        assert_eq!(resp["choices"][0]["logprobs"], Value::Null);
    }
}

#[tokio::test]
async fn tokenizer_routes_answer_in_llama_server_shapes() {
    let f = fixture(0);
    let post = |path: &str, body: String| {
        Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    };
    // The trivial backend has no tokenizer: a clear 404 naming the model.
    let (status, resp) = send(&f, post("/tokenize", json!({"content": "hi"}).to_string())).await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "tiny");
    let (status, resp) = send(
        &f,
        post(
            "/tokenize",
            json!({"content": "hi", "model": "gpt-9"}).to_string(),
        ),
    )
    .await;
    assert_error(status, &resp, StatusCode::NOT_FOUND, "gpt-9");
    let (status, resp) = send(&f, post("/detokenize", "{\"tokens\": \"x\"}".into())).await;
    assert_error(
        status,
        &resp,
        StatusCode::BAD_REQUEST,
        "invalid request body",
    );
    let big = json!({"content": "x".repeat(atoma_api::MAX_TOKENIZE_BYTES)}).to_string();
    let (status, resp) = send(&f, post("/tokenize", big)).await;
    assert_error(status, &resp, StatusCode::PAYLOAD_TOO_LARGE, "exceeds");
}
