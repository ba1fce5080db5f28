#!/usr/bin/env python3
"""Turns the JSON lines of `atoma loadgen` (scripts/bench-serving.sh) into a markdown table
(atoma next to llama-server per workload and concurrency, with the ratio) and a PNG plot of
output tokens/s and TTFT p99 against concurrency for both engines.

    tools/plot-serving.py bench/serving-default.jsonl [--title TEXT]
"""
import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("jsonl")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    src = pathlib.Path(a.jsonl)
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    workloads = sorted({r["workload"] for r in rows})
    engines = sorted({r["engine"] for r in rows})
    get = {(r["engine"], r["workload"], r["concurrency"]): r for r in rows}

    md = [f"# Serving benchmark: {a.title}", ""]
    for w in workloads:
        md += [f"## {w}", "",
               "| conc | engine | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | TPOT ms | output tok/s | req/s |",
               "|---|---|---|---|---|---|---|---|"]
        levels = sorted({r["concurrency"] for r in rows if r["workload"] == w})
        for c in levels:
            for e in engines:
                r = get.get((e, w, c))
                if r:
                    md.append(f"| {c} | {e} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                              f"{r['itl_p50_ms']:.1f} | {r['tpot_mean_ms']:.1f} | "
                              f"{r['output_tok_s']:.1f} | {r['req_s']:.2f} |")
            a_, l_ = get.get(("atoma", w, c)), get.get(("llama-server", w, c))
            if a_ and l_:
                md.append(f"| {c} | **atoma / llama-server** | | | | | "
                          f"**{a_['output_tok_s'] / l_['output_tok_s']:.2f}x** | |")
        one = get.get(("atoma", w, 1))
        top = get.get(("atoma", w, 16))
        if one and top:
            md += ["", f"atoma output tok/s at concurrency 16 / concurrency 1: "
                       f"**{top['output_tok_s'] / one['output_tok_s']:.2f}x**"]
        md.append("")
    out_md = src.with_suffix(".md")
    out_md.write_text("\n".join(md))

    fig, axes = plt.subplots(2, len(workloads), figsize=(6 * len(workloads), 8), squeeze=False)
    for j, w in enumerate(workloads):
        for e in engines:
            pts = sorted((r["concurrency"], r) for r in rows if r["workload"] == w and r["engine"] == e)
            xs = [c for c, _ in pts]
            axes[0][j].plot(xs, [r["output_tok_s"] for _, r in pts], marker="o", label=e)
            axes[1][j].plot(xs, [r["ttft_p99_ms"] / 1000 for _, r in pts], marker="o", label=e)
        for i, ylabel in enumerate(["output tokens/s", "TTFT p99 (s)"]):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(w)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(a.title)
    fig.tight_layout()
    out_png = src.with_suffix(".png")
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_md} and {out_png}")


if __name__ == "__main__":
    main()
