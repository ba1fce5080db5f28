//! Runs the `atoma` binary: bad model files and references end in a one-line error and a
//! non-zero exit (no panic, no backtrace); generation on a tiny model streams text.

use std::path::Path;
use std::process::{Command, Output};

use atoma_engine::Architecture;
use atoma_engine::testing::{TinySpec, write_tiny_gguf};

fn atoma(args: &[&str], cache: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atoma"))
        .args(args)
        .env("ATOMA_MODEL_CACHE", cache)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap()
}

fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{stderr}"
    );
}

fn generate(model: &str, cache: &Path) -> Output {
    atoma(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "hello",
            "-n",
            "4",
            "--temperature",
            "0",
        ],
        cache,
    )
}

#[test]
fn bad_models_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("missing.gguf");
    assert_one_line_error(
        &generate(missing.to_str().unwrap(), d),
        "model file not found",
    );
    let txt = d.join("readme.txt");
    std::fs::write(&txt, "not a model").unwrap();
    assert_one_line_error(&generate(txt.to_str().unwrap(), d), "is not a GGUF file");
    let good = d.join("tiny.gguf");
    write_tiny_gguf(&good, &TinySpec::new(Architecture::Llama)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = d.join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(&generate(cut.to_str().unwrap(), d), "is truncated");
    let mut raw = bytes.clone();
    let key = b"general.architecture";
    let at = raw.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    raw[at..at + 5].copy_from_slice(b"mamba");
    let other = d.join("mamba.gguf");
    std::fs::write(&other, &raw).unwrap();
    assert_one_line_error(
        &generate(other.to_str().unwrap(), d),
        "unsupported model architecture `mamba`",
    );
    assert_one_line_error(
        &generate("no-such-model", d),
        "unknown model `no-such-model`",
    );
    assert_one_line_error(&generate("gemma3", d), "atoma model pull gemma3");
    assert_one_line_error(
        &generate("hf:just-org", d),
        "invalid Hugging Face reference",
    );
}

#[test]
fn generate_streams_text_and_reports_speed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-chat.gguf");
    write_tiny_gguf(&model, &TinySpec::new(Architecture::Gemma3)).unwrap();
    let out = atoma(
        &[
            "generate",
            "-m",
            "tiny-chat",
            "--chat",
            "-p",
            "hello",
            "-n",
            "6",
            "--seed",
            "3",
            "--ignore-eos",
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("tok/s") && stderr.contains("generated: 6 tokens"),
        "{stderr}"
    );
    assert!(stderr.contains("seed 3"), "{stderr}");
    // Same seed, same text.
    let again = atoma(
        &[
            "generate",
            "-m",
            "tiny-chat",
            "--chat",
            "-p",
            "hello",
            "-n",
            "6",
            "--seed",
            "3",
            "--ignore-eos",
        ],
        dir.path(),
    );
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn model_path_and_list() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_gguf(
        &dir.path().join("t.gguf"),
        &TinySpec::new(Architecture::Llama),
    )
    .unwrap();
    let out = atoma(&["model", "path", "t"], dir.path());
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .ends_with("t.gguf")
    );
    let out = atoma(&["model", "list"], dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("default") && stdout.contains("gemma3") && stdout.contains("t.gguf"),
        "{stdout}"
    );
}

#[test]
fn node_config_rejects_unknown_keys_and_bad_backends() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, "[api]\nbnd = \"127.0.0.1:1\"\n").unwrap();
    let home = dir.path().to_str().unwrap();
    let out = atoma(
        &[
            "--home",
            home,
            "node",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_one_line_error(&out, "unknown field `bnd`");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        atoma(
            &[
                "--home",
                home,
                "node",
                "run",
                "--config",
                cfg.to_str().unwrap(),
            ],
            dir.path(),
        )
    };
    assert_one_line_error(
        &run("[ledger]\nbackend = \"ethereum\"\n"),
        "expected \"local\" (embedded SQLite) or \"sui\"",
    );
    assert_one_line_error(
        &run("[ledger]\nbackend = \"sui\"\n"),
        "[ledger] backend = \"sui\" needs `rpc_url`",
    );
    assert_one_line_error(
        &run(
            "[ledger]\nbackend = \"sui\"\nrpc_url = \"http://127.0.0.1:1\"\npackage_id = \"0x1\"\natoma_db = \"0x2\"\nusdc_type = \"0x3::usdc::USDC\"\ncontract = \"mainnet\"\n",
        ),
        "contract = \"mainnet\"",
    );
    // A node key that registered nothing is told how to register.
    std::fs::write(&cfg, "").unwrap();
    assert!(
        atoma(&["--home", home, "keys", "new", "node"], dir.path())
            .status
            .success()
    );
    let out = atoma(
        &[
            "--home",
            home,
            "node",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_one_line_error(&out, "atoma db register-node --key node");
}

#[test]
fn local_ledger_commands_and_signing() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let mut full = vec!["--home", home];
        full.extend_from_slice(args);
        atoma(&full, dir.path())
    };
    for k in ["node", "user"] {
        assert!(run(&["keys", "new", k]).status.success());
    }
    assert_one_line_error(&run(&["keys", "new", "user"]), "already exists");
    assert!(
        run(&["db", "register-node", "--key", "node"])
            .status
            .success()
    );
    assert!(
        run(&["db", "create-task", "--model", "tiny"])
            .status
            .success()
    );
    assert!(
        run(&[
            "db",
            "subscribe-node-to-task",
            "--node",
            "1",
            "--task",
            "1",
            "--price",
            "100"
        ])
        .status
        .success()
    );
    assert_one_line_error(
        &run(&[
            "db",
            "acquire-stack",
            "--task",
            "1",
            "--units",
            "1000000",
            "--price",
            "100",
        ]),
        "insufficient balance",
    );
    assert!(
        run(&["db", "faucet", "--to", "user", "--amount", "1000"])
            .status
            .success()
    );
    let out = run(&[
        "db",
        "acquire-stack",
        "--task",
        "1",
        "--units",
        "1000",
        "--price",
        "100",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stack: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stack["selected_node_id"], 1);
    let out = run(&["db", "events"]);
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names.last().map(String::as_str), Some("StackCreatedEvent"));
    // A signed request verifies against the user's address.
    let out = run(&[
        "sign",
        "--stack",
        "1",
        "--body",
        r#"{"model":"tiny","messages":[]}"#,
    ]);
    let signed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let body = signed["body"].as_str().unwrap();
    assert!(body.contains("\"nonce\""), "{body}");
    let sig = signed["headers"]["X-Signature"].as_str().unwrap();
    let signer = atoma_crypto::verify(sig, &atoma_crypto::blake2b256(body.as_bytes())).unwrap();
    let user = String::from_utf8_lossy(&run(&["keys", "show", "user"]).stdout).to_string();
    assert!(user.contains(&atoma_crypto::address_hex(&signer)), "{user}");
}

#[test]
fn a_model_that_fails_to_load_stops_the_node_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_str().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, "GGUF but not really").unwrap();
    let cfg = dir.path().join("node.toml");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        &cfg,
        format!(
            "[engine]\nmodel = {:?}\nname = \"x\"\n[api]\nbind = \"127.0.0.1:{port}\"\n",
            bad.to_str().unwrap()
        ),
    )
    .unwrap();
    assert!(
        atoma(&["--home", home, "keys", "new", "node"], dir.path())
            .status
            .success()
    );
    assert!(
        atoma(&["--home", home, "db", "register-node"], dir.path())
            .status
            .success()
    );
    let out = atoma(
        &[
            "--home",
            home,
            "node",
            "run",
            "--config",
            cfg.to_str().unwrap(),
        ],
        dir.path(),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: loading the model") && last.contains("malformed"),
        "{stderr}"
    );
}
