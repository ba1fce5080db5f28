//! End-to-end: the `atoma` process on 127.0.0.1 answering the official `openai` Python package,
//! plain and streaming, with signatures made in an httpx request hook. Needs a Python with
//! `openai` and `cryptography`: `scripts/test.sh` makes `.venv` with them; or set
//! ATOMA_TEST_PYTHON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use atoma_engine::Architecture;
use atoma_engine::testing::{TinySpec, write_tiny_gguf};

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
fn the_openai_python_client_talks_to_a_node() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let model = home.join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::new(Architecture::Qwen2)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let atoma = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_atoma"));
        c.arg("--home").arg(home).args(args);
        c
    };
    let bind = format!("127.0.0.1:{port}");
    let up = atoma(&[
        "up",
        "--model",
        model.to_str().unwrap(),
        "--bind",
        &bind,
        "--no-run",
    ])
    .output()
    .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let mut node = atoma(&[
        "node",
        "run",
        "--config",
        home.join("node.toml").to_str().unwrap(),
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while ureq::get(&format!("{url}/health")).call().is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the node did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    assert!(stdout.contains("openai e2e ok"), "{stdout}");
}
