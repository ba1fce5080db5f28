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
    """(sentences per second, median seconds per call, sentences per CPU second)"""
    run_pass()  # warm-up
    times = []
    start = time.perf_counter()
    cpu = time.process_time()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    total = sum(times)
    done = len(times) * per_pass
    times.sort()
    return done / total, times[len(times) // 2] / calls_per_pass, done / cpu


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
        b = measure(a.seconds, SENTENCES, SENTENCES // BATCH, batched)
        s = measure(a.seconds / 2, SENTENCES, SENTENCES, single)
    print(
        f"sentence-transformers, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{SENTENCES} sentences ({tokens} tokens, {tokens / SENTENCES:.1f} per sentence)\n"
    )
    print("| calls | embeddings/s | median ms per call | embeddings per CPU-second |")
    print("|---|---:|---:|---:|")
    for name, (rate, median, per_cpu) in [(f"batches of {BATCH}", b), ("one sentence", s)]:
        print(f"| {name} | {rate:.1f} | {median * 1e3:.2f} | {per_cpu:.1f} |")


if __name__ == "__main__":
    main()
