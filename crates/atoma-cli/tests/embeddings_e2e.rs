//! `/v1/embeddings` end to end: a node serving a tiny chat model and all-MiniLM-L6-v2 (from
//! the model cache: `atoma model pull minilm`), an Embedding task and a stack of it, and the
//! official `openai` Python SDK (`tests/e2e/embeddings_client.py`).

mod common;

use std::path::Path;

use atoma_engine::Architecture;

fn db(home: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["db"];
    all.extend_from_slice(args);
    let out = common::atoma(home, &all).output().unwrap();
    assert!(
        out.status.success(),
        "atoma {all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::String(text.into()))
}

#[test]
#[allow(clippy::print_stderr)] // the client's figures, shown with --nocapture
fn the_openai_sdk_embeds_with_a_stack_of_an_embedding_task() {
    let store = atoma_models::ModelStore::new(atoma_models::ModelStore::default_root());
    let minilm = store.resolve("minilm").unwrap_or_else(|e| {
        panic!("{e}\n(this test needs all-MiniLM-L6-v2: `atoma model pull minilm`)")
    });
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Qwen2, 256);
    let config = home.join("node.toml");
    let mut table: toml::Table = std::fs::read_to_string(&config).unwrap().parse().unwrap();
    let mut embedding = toml::Table::new();
    embedding.insert("model".into(), minilm.to_str().unwrap().into());
    embedding.insert("name".into(), "minilm".into());
    embedding.insert("threads".into(), 1.into());
    table.insert("embedding".into(), embedding.into());
    std::fs::write(&config, table.to_string()).unwrap();
    let task = db(
        home,
        &["create-task", "--model", "minilm", "--role", "embedding"],
    );
    let task = task["small_id"].as_u64().expect("a task id").to_string();
    db(
        home,
        &[
            "subscribe-node-to-task",
            "--node",
            "1",
            "--task",
            &task,
            "--price",
            "1000",
        ],
    );
    let stack = db(
        home,
        &[
            "acquire-stack",
            "--task",
            &task,
            "--units",
            "100000",
            "--price",
            "1000",
        ],
    );
    let stack = stack["small_id"].as_u64().expect("a stack id").to_string();
    let mut node = common::start_node(home, &url);
    let keystore = home.join("keys/user.keystore");
    let (ok, stdout, stderr) = common::run_client(
        "embeddings_client.py",
        &[
            url.as_ref(),
            keystore.as_ref(),
            stack.as_ref(),
            "1".as_ref(),
            "minilm".as_ref(),
            "tiny".as_ref(),
        ],
    );
    node.kill().unwrap();
    node.wait().unwrap();
    eprintln!("{stdout}");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("embeddings ok"), "{stdout}");
}
