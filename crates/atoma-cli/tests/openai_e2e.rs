//! End-to-end: the `atoma` process on 127.0.0.1 answering the official `openai` Python package,
//! plain and streaming, with signatures made in an httpx request hook. Needs a Python with
//! `openai` and `cryptography`: `scripts/test.sh` makes `.venv` with them; or set
//! ATOMA_TEST_PYTHON.

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

#[test]
#[allow(clippy::print_stderr)] // the client's figures, shown with --nocapture
fn the_openai_python_client_talks_to_a_node() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Qwen2, 2048);
    let mut node = common::start_node(home, &url);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/openai_client.py");
    let out = Command::new(&py)
        .arg(script)
        .arg(&url)
        .arg(home.join("keys/user.keystore"))
        .arg("1")
        .arg("tiny")
        .output()
        .unwrap();
    node.kill().unwrap();
    node.wait().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("openai e2e ok"), "{stdout}");
}
