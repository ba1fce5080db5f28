//! Structured outputs on the default model (SmolLM2-135M-Instruct) through the official `openai`
//! Python SDK: 100 generations over five JSON schemas, every one parsed and validated with
//! `jsonschema` in Python (`tests/e2e/structured_outputs.py`). Needs the real model in the cache
//! (`atoma model pull default`) and a Python with `openai`, `cryptography` and `jsonschema`
//! (`scripts/test.sh` makes `.venv` with them; or set ATOMA_TEST_PYTHON).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
#[allow(clippy::print_stderr)] // the client's figures, shown with --nocapture
fn a_hundred_schema_constrained_answers_on_the_default_model_all_validate() {
    let store = atoma_models::ModelStore::new(atoma_models::ModelStore::default_root());
    let model = store.resolve("default").unwrap_or_else(|e| {
        panic!("{e}\n(this test needs the default model: `atoma model pull default`)")
    });
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up_with(home, &model, &[]);
    let mut node = common::start_node(home, &url);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/structured_outputs.py");
    let out = Command::new(python())
        .arg(script)
        .arg(&url)
        .arg(home.join("keys/user.keystore"))
        .arg("1")
        .arg("SmolLM2-135M-Instruct.Q4_1")
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
    assert!(stdout.contains("structured outputs ok"), "{stdout}");
}
