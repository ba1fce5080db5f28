//! End-to-end: the `atoma` process on 127.0.0.1 answering the official `openai` Python package,
//! plain and streaming, with signatures made in an httpx request hook. Needs a Python with
//! `openai` and `cryptography`: `scripts/test.sh` makes `.venv` with them; or set
//! ATOMA_TEST_PYTHON.

mod common;

use atoma_engine::Architecture;

#[test]
#[allow(clippy::print_stderr)] // the client's figures, shown with --nocapture
fn the_openai_python_client_talks_to_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let url = common::set_up(home, Architecture::Qwen2, 2048);
    let mut node = common::start_node(home, &url);
    let keystore = home.join("keys/user.keystore");
    let (ok, stdout, stderr) = common::run_client(
        "openai_client.py",
        &[
            url.as_ref(),
            keystore.as_ref(),
            "1".as_ref(),
            "tiny".as_ref(),
        ],
    );
    node.kill().unwrap();
    node.wait().unwrap();
    assert!(ok, "{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.contains("openai e2e ok"), "{stdout}");
}
