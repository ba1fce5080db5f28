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
