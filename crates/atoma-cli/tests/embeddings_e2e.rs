//! `/v1/embeddings` end to end: a node serving a tiny chat model and all-MiniLM-L6-v2 (from
//! the model cache: `atoma model pull minilm`), an Embedding task and a stack of it, and the
//! official `openai` Python SDK (`tests/e2e/embeddings_client.py`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use atoma_engine::Architecture;

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("ATOMA_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    assert!(
        venv.is_file(),
        "no Python with `openai`: run scripts/test.sh (it creates .venv) or set ATOMA_TEST_PYTHON"
    );
    venv
}

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
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/embeddings_client.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&url)
        .arg(home.join("keys/user.keystore"))
        .args([stack.as_str(), "1", "minilm", "tiny"])
        .output()
        .unwrap();
    node.kill().unwrap();
    node.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("embeddings ok"), "{stdout}");
}
