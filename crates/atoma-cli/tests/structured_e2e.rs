//! Structured outputs on the default model (SmolLM2-135M-Instruct) through the official `openai`
//! Python SDK: 100 generations over five JSON schemas, every one parsed and validated with
//! `jsonschema` in Python (`tests/e2e/structured_outputs.py`). Needs the real model in the cache
//! (`atoma model pull default`) and a Python with `openai`, `cryptography` and `jsonschema`
//! (`scripts/test.sh` makes `.venv` with them; or set ATOMA_TEST_PYTHON).

mod common;

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
    let keystore = home.join("keys/user.keystore");
    let (ok, stdout, stderr) = common::run_client(
        "structured_outputs.py",
        &[
            url.as_ref(),
            keystore.as_ref(),
            "1".as_ref(),
            "SmolLM2-135M-Instruct.Q4_1".as_ref(),
        ],
    );
    node.kill().unwrap();
    node.wait().unwrap();
    eprintln!("{stdout}");
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("structured outputs ok"), "{stdout}");
}
