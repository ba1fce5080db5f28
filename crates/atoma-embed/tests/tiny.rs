//! Hermetic tests on a tiny BERT with seeded random weights (`atoma_embed::testing`): the
//! forward pass and pooling, batch invariance, tokenization and truncation, and every way a
//! model directory or an input can be bad.

use std::path::Path;

use atoma_embed::testing::{CLS, SEP, TinyModel, WORDS};
use atoma_embed::{EmbedError, EmbedInput, EmbedOptions, Embedder};

fn tiny() -> (tempfile::TempDir, Embedder) {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    let m = Embedder::load(dir.path()).unwrap();
    (dir, m)
}

fn id(word: &str) -> u32 {
    5 + WORDS.iter().position(|w| *w == word).unwrap() as u32
}

fn load_err(dir: &Path) -> EmbedError {
    Embedder::load(dir).unwrap_err()
}

#[test]
fn forward_on_random_weights_gives_unit_vectors() {
    let (dir, m) = tiny();
    assert_eq!(m.dimensions(), 32);
    assert_eq!(m.max_tokens(), 16);
    assert_eq!(
        m.model_id(),
        dir.path().file_name().unwrap().to_str().unwrap()
    );
    let out = m
        .embed(&[
            "the cat sat on the mat.".into(),
            "hello world".into(),
            "".into(),
        ])
        .unwrap();
    assert_eq!(out.len(), 3);
    for e in &out {
        assert_eq!(e.vector.len(), 32);
        assert!(e.vector.iter().all(|x| x.is_finite()));
        let norm: f32 = e.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
    assert_eq!(out[0].tokens, 9);
    assert_eq!(out[2].tokens, 2, "an empty text is [CLS] [SEP]");
    assert_ne!(out[0].vector, out[1].vector);
    // The weights' digest is the file's SHA-256 and follows the weights.
    let other = tempfile::tempdir().unwrap();
    TinyModel {
        seed: 8,
        ..TinyModel::default()
    }
    .write(other.path())
    .unwrap();
    assert_ne!(
        Embedder::load(other.path()).unwrap().weights_sha256(),
        m.weights_sha256()
    );
}

#[test]
fn tokenizes_as_bert_with_cls_and_sep_and_truncates_to_max_seq_length() {
    let (_dir, m) = tiny();
    // Lower-cased, punctuation split off, word pieces, unknown words.
    assert_eq!(
        m.tokenize("Hello, WORLD! Unbelievable cats zebra").unwrap(),
        [
            CLS,
            id("hello"),
            id(","),
            id("world"),
            id("!"),
            id("un"),
            id("##believ"),
            id("##able"),
            id("cat"),
            id("##s"),
            1,
            SEP
        ]
    );
    // tokenizer.json's own truncation to 8 and padding are replaced by max_seq_length (16),
    // [CLS] and [SEP] included.
    let long = "the cat sat on the mat . ".repeat(5);
    let ids = m.tokenize(&long).unwrap();
    assert_eq!(ids.len(), 16);
    assert_eq!((ids[0], ids[15]), (CLS, SEP));
    let words: Vec<u32> = ["the", "cat", "sat", "on", "the", "mat", "."]
        .iter()
        .cycle()
        .take(14)
        .map(|w| id(w))
        .collect();
    assert_eq!(ids[1..15], words);
    let e = m
        .embed(&[EmbedInput::Text(&long), "the cat".into()])
        .unwrap();
    assert!(e[0].truncated && !e[1].truncated);
    assert_eq!(e[0].tokens, 16);
    assert_eq!(
        m.embed(&[EmbedInput::Tokens(&ids)]).unwrap()[0].vector,
        e[0].vector
    );
}

#[test]
fn a_vector_does_not_depend_on_the_batch() {
    let (dir, m) = tiny();
    let texts = [
        "the cat sat on the mat.",
        "hello",
        "a big red dog is on the blue mat , the small cat is not",
        "",
        "unbelievable !",
    ];
    let inputs: Vec<EmbedInput<'_>> = texts.iter().map(|t| EmbedInput::Text(t)).collect();
    let together = m.embed(&inputs).unwrap();
    for (input, want) in inputs.iter().zip(&together) {
        assert_eq!(&m.embed(&[*input]).unwrap()[0], want, "{input:?}");
        // Repeated in a batch of copies of another input.
        let crowd = [inputs[2], *input, inputs[2], inputs[0]];
        assert_eq!(&m.embed(&crowd).unwrap()[1], want, "{input:?}");
    }
    for (threads, max_batch_tokens) in [(1, 1), (2, 1), (1, 8192), (3, 20)] {
        let other = Embedder::load_with(
            dir.path(),
            &EmbedOptions {
                threads: Some(threads),
                max_batch_tokens,
                model_id: Some("tiny".into()),
            },
        )
        .unwrap();
        assert_eq!(other.threads(), threads);
        assert_eq!(other.model_id(), "tiny");
        assert_eq!(other.embed(&inputs).unwrap(), together);
    }
}

#[test]
fn bad_inputs_are_named_and_nothing_is_computed() {
    let (_dir, m) = tiny();
    let vocab = TinyModel::default().vocab_size();
    let err = m
        .embed(&["fine".into(), EmbedInput::Tokens(&[CLS, vocab as u32, SEP])])
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("input 1: token id {vocab} is out of the vocabulary (ids are below {vocab})")
    );
    assert!(matches!(
        m.embed(&[EmbedInput::Tokens(&[u32::MAX])]),
        Err(EmbedError::TokenOutOfRange { index: 0, .. })
    ));
    assert!(matches!(
        m.embed(&["a".into(), "b".into(), EmbedInput::Tokens(&[])]),
        Err(EmbedError::EmptyInput { index: 2 })
    ));
    // A single token is a valid input, alone or not.
    let one = m.embed(&[EmbedInput::Tokens(&[CLS])]).unwrap();
    assert_eq!((one[0].tokens, one[0].vector.len()), (1, 32));
    let with = m
        .embed(&["the cat".into(), EmbedInput::Tokens(&[CLS])])
        .unwrap();
    assert_eq!(with[1], one[0]);
    let long = vec![CLS; 17];
    assert!(matches!(
        m.embed(&[EmbedInput::Tokens(&long)]),
        Err(EmbedError::TooManyTokens {
            index: 0,
            tokens: 17,
            max: 16
        })
    ));
    assert!(m.embed(&[]).unwrap().is_empty());
}

#[test]
fn missing_files_are_named() {
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let dir = tempfile::tempdir().unwrap();
        TinyModel::default().write(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(name)).unwrap();
        let err = load_err(dir.path());
        assert!(
            matches!(&err, EmbedError::MissingFile { path } if path.ends_with(name)),
            "{err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    let err = load_err(Path::new("/nonexistent/model"));
    assert!(matches!(err, EmbedError::MissingFile { .. }), "{err}");
}

/// A change to a model directory.
type Edit = Box<dyn FnOnce(&Path)>;

/// Loads the tiny model after `edit` changed its directory; the error.
fn broken(edit: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::default().write(dir.path()).unwrap();
    edit(dir.path());
    load_err(dir.path()).to_string()
}

fn replace_in(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from}");
    std::fs::write(path, text.replace(from, to)).unwrap();
}

#[test]
fn bad_directories_are_refused_with_the_file_and_reason() {
    let cases: [(&str, Edit); 8] = [
        (
            "config.json: hidden_act `relu` is not supported",
            Box::new(|d| replace_in(&d.join("config.json"), "\"gelu\"", "\"relu\"")),
        ),
        (
            "config.json: hidden_size 32 is not a multiple of num_attention_heads 5",
            Box::new(|d| {
                replace_in(
                    &d.join("config.json"),
                    "\"num_attention_heads\": 4",
                    "\"num_attention_heads\": 5",
                )
            }),
        ),
        (
            "config.json: key must be a string at line 1 column 2",
            Box::new(|d| std::fs::write(d.join("config.json"), "{not json").unwrap()),
        ),
        (
            "1_Pooling/config.json: only mean pooling is supported",
            Box::new(|d| {
                replace_in(
                    &d.join("1_Pooling/config.json"),
                    "\"pooling_mode_cls_token\": false",
                    "\"pooling_mode_cls_token\": true",
                )
            }),
        ),
        (
            "modules.json: pipeline",
            Box::new(|d| replace_in(&d.join("modules.json"), "models.Normalize", "models.Dense")),
        ),
        (
            "tokenizer",
            Box::new(|d| std::fs::write(d.join("tokenizer.json"), "{}").unwrap()),
        ),
        (
            "model.safetensors",
            Box::new(|d| {
                let p = d.join("model.safetensors");
                let bytes = std::fs::read(&p).unwrap();
                std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
            }),
        ),
        (
            "encoder.layer.1.output.dense.weight",
            Box::new(|d| {
                let mut w = TinyModel::default().weights();
                w.remove("encoder.layer.1.output.dense.weight");
                candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
            }),
        ),
    ];
    for (want, edit) in cases {
        let err = broken(edit);
        assert!(err.contains(want), "expected {want:?} in {err:?}");
        assert!(!err.contains('\n'), "one line: {err:?}");
    }
}

#[test]
fn an_embedder_is_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Embedder>();
    let (_dir, m) = tiny();
    let m = std::sync::Arc::new(m);
    let want = m.embed(&["the red cat".into()]).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let m = m.clone();
            std::thread::spawn(move || m.embed(&["the red cat".into()]).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}
