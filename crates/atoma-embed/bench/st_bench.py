#!/usr/bin/env python3
"""sentence-transformers (PyTorch, CPU) on what benches/throughput.rs measures: the same model
directory, the first 160 sentences of bench/sentences.txt in batches of 32 (one encode call per
batch) and one sentence per call, at the same thread count (torch.set_num_threads).

    python3 -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    /tmp/st-venv/bin/python crates/atoma-embed/bench/st_bench.py \
        ~/.cache/atoma/models/all-MiniLM-L6-v2 [--threads N] [--seconds S]
"""

import argparse
import os
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

SENTENCES = 160
BATCH = 32


def measure(seconds, per_pass, calls_per_pass, run_pass):
    run_pass()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - t)
    total = sum(times)
    times.sort()
    return len(times) * per_pass / total, times[len(times) // 2] / calls_per_pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = SentenceTransformer(str(Path(a.model_dir).expanduser()), device="cpu")
    model.eval()
    path = Path(__file__).resolve().parent / "sentences.txt"
    sentences = path.read_text().splitlines()[:SENTENCES]
    assert len(sentences) == SENTENCES
    tokens = sum(len(ids) for ids in model.tokenizer(sentences)["input_ids"])

    def batched():
        for i in range(0, SENTENCES, BATCH):
            model.encode(sentences[i : i + BATCH], batch_size=BATCH, convert_to_numpy=True)

    def single():
        for s in sentences:
            model.encode([s], batch_size=1, convert_to_numpy=True)

    with torch.inference_mode():
        rate_b, med_b = measure(a.seconds, SENTENCES, SENTENCES // BATCH, batched)
        rate_s, med_s = measure(a.seconds / 2, SENTENCES, SENTENCES, single)
    print(
        f"sentence-transformers, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{SENTENCES} sentences ({tokens} tokens, {tokens / SENTENCES:.1f} per sentence)\n"
    )
    print("| calls | embeddings/s | median ms per call |")
    print("|---|---:|---:|")
    print(f"| batches of {BATCH} | {rate_b:.1f} | {med_b * 1e3:.1f} |")
    print(f"| one sentence | {rate_s:.1f} | {med_s * 1e3:.2f} |")


if __name__ == "__main__":
    main()
