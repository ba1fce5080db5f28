//! Shared by the tests that run a real node process: a home with a tiny model set up by
//! `atoma up`, and starting `atoma node run` until `/health` answers 200.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use atoma_engine::Architecture;
use atoma_engine::testing::{TinySpec, write_tiny_gguf};

/// `atoma --home HOME ARGS…` (model cache in HOME too).
pub fn atoma(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_atoma"));
    c.arg("--home")
        .arg(home)
        .args(args)
        .env("ATOMA_MODEL_CACHE", home);
    c
}

/// Writes a tiny model of `arch` as HOME/tiny.gguf and runs `atoma up --no-run` on a free port.
/// Returns the node's base URL.
pub fn set_up(home: &Path, arch: Architecture, context: usize) -> String {
    let model = home.join("tiny.gguf");
    write_tiny_gguf(
        &model,
        &TinySpec {
            context,
            ..TinySpec::new(arch)
        },
    )
    .unwrap();
    set_up_with(home, &model, &[])
}

/// Runs `atoma up --no-run` for `model` (a GGUF path) on a free port, with `extra` arguments.
/// Returns the node's base URL.
pub fn set_up_with(home: &Path, model: &Path, extra: &[&str]) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    let up = atoma(
        home,
        &[
            "up",
            "--model",
            model.to_str().unwrap(),
            "--bind",
            &bind,
            "--no-run",
        ],
    )
    .args(extra)
    .output()
    .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    format!("http://{bind}")
}

/// Starts `atoma node run` with HOME/node.toml and waits until `/health` is 200.
pub fn start_node(home: &Path, url: &str) -> Child {
    let child = atoma(
        home,
        &[
            "node",
            "run",
            "--config",
            home.join("node.toml").to_str().unwrap(),
        ],
    )
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
    child
}

/// The Python with the official `openai` package the end-to-end clients run on: $ATOMA_TEST_PYTHON,
/// else the repository's `.venv` (made by scripts/test.sh).
pub fn python() -> PathBuf {
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

/// Runs the end-to-end client `tests/e2e/<script>` with `args`; returns whether it succeeded,
/// its stdout and its stderr.
pub fn run_client(script: &str, args: &[&OsStr]) -> (bool, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(script);
    let out = Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SIGKILL a child process and reap it.
pub fn kill(child: &mut Child) {
    let _ = child.kill(); // SIGKILL on Unix; Ok or "already exited"
    let _ = child.wait();
}

/// (events, lowest seq, highest seq) in a Sui event index file; zeros while it does not exist.
pub fn indexed(index: &Path) -> (u64, u64, u64) {
    let Ok(c) = rusqlite::Connection::open(index) else {
        return (0, 0, 0);
    };
    c.query_row(
        "SELECT COUNT(*), COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM events",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        },
    )
    .unwrap_or((0, 0, 0))
}
