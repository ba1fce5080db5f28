#!/usr/bin/env python3
"""Records the reference embeddings of all-MiniLM-L6-v2 with sentence-transformers itself
(PyTorch, CPU, float32) into tests/fixtures/minilm-reference.json: for each text, the token ids
its tokenizer gives (truncated to max_seq_length) and the full normalised vector.

    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    /tmp/st-venv/bin/python crates/atoma-embed/bench/reference.py \
        ~/.cache/atoma/models/all-MiniLM-L6-v2
"""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

LONG = " ".join(
    f"Sentence number {i} of a long document that sentence-transformers cuts at 256 tokens."
    for i in range(40)
)

TEXTS = [
    "This is an example sentence",
    "Each sentence is converted",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "Héllo, wörld! Ça va? Naïve café, Ångström and Øresund.",
    "東京は日本の首都です。北京是中国的首都。",
    "Emoji 🚀 and symbols: ©®™ — “quotes”, ½, 3.14159, $1,000,000.",
    "unaffable tokenization of antidisestablishmentarianism",
    "   leading and trailing whitespace\t\n  ",
    "tab\tand\u00a0no-break space, zero\u200bwidth, control\u0007bell",
    "a" * 120 + " is a word longer than one hundred characters",
    "What is the capital of France? Paris is the capital and largest city of France.",
    LONG,
]


def f32(x: float) -> float:
    """The shortest decimal that reads back as the same float32."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def main() -> None:
    model_dir = Path(sys.argv[1]).expanduser()
    torch.set_num_threads(1)
    model = SentenceTransformer(str(model_dir), device="cpu")
    vectors = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True)
    cases = []
    for text, vec in zip(TEXTS, vectors):
        ids = model.tokenize([text])["input_ids"][0].tolist()
        cases.append({"text": text, "ids": ids, "embedding": [f32(x) for x in vec]})
    weights = (model_dir / "model.safetensors").read_bytes()
    out = {
        "model": "all-MiniLM-L6-v2",
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "generator": (
            f"sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__}, CPU float32, batch of {len(TEXTS)}, "
            "crates/atoma-embed/bench/reference.py"
        ),
        "max_seq_length": model.max_seq_length,
        "cases": cases,
    }
    dest = Path(__file__).resolve().parent.parent / "tests/fixtures/minilm-reference.json"
    dest.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(cases)} cases written to {dest}")


if __name__ == "__main__":
    main()
