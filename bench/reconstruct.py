"""Beyond the column sweep on SmolLM2-135M: each stage of effort="max" added one at a time.

For 50%, 60%, 70% unstructured, 2:4, GPTQ 3-bit g128 and 50% + 4-bit g64, every row compresses a
fresh copy of the dense weights (float32) with the same calibration windows (WikiText-2
``wiki.valid.tokens``, ``--nsamples`` x ``--seqlen``, seed 0) and is evaluated on the same windows
(the first ``--eval-windows`` x 512 tokens of ``wiki.test.raw``):

* ``plain``: the sweep as it is by default;
* ``+resolve``: + the mask-fixed re-solve (``refine_iters=20``) and, for unstructured sparsity,
  OWL allocation (the prune settings only);
* ``+asymmetric``: + asymmetric targets (``asymmetric=True``);
* ``effort max``: ``effort="max"``, i.e. all of the above + block reconstruction
  (``reconstruct_steps`` of ``toolkit.config.options.EFFORT_MAX``).

Reported per row: perplexity, its ratio to the plain row and to the anchor (the papers' code,
or llm-compressor for 50% + 4-bit g64, as measured on this setting in issue 35; none for 3-bit),
the exact sparsity (pruned count over the compressed layers' weights), compress seconds and their
ratio to the plain row of the same setting (measured side by side in this run), and the mean
block output error before/after reconstruction. SmolLM2's weights come from a 4-bit grid (Q4_1)
GGUF file. Writes ``data/results/reconstruct_smollm2.csv`` once, at the end.

    python bench/reconstruct.py                      # --threads 2: the CPU figures in the docs
    python bench/reconstruct.py --only 60%,2:4 --out subset.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from _machine import add_threads_flag, apply_threads, describe, smollm2_wikitext

from toolkit import compress, perplexity
from toolkit.config.options import EFFORT_MAX
from toolkit.walk import reconstruct

REPO = Path(__file__).resolve().parents[1]
# (label, settings, anchor perplexity, what the anchor is): issue 35's table, measured on this
# setting (calibration 32 x 512, evaluation 40 x 512) with the papers' code / llm-compressor
SETTINGS = [
    ("60%", dict(sparsity=0.6), 91.06, "SparseGPT paper code"),
    ("2:4", dict(pattern="2:4"), 82.97, "SparseGPT paper code"),
    ("50%+4g64", dict(sparsity=0.5, bits=4, group_size=64), 66.74, "llm-compressor (two passes)"),
    ("3-bit g128", dict(bits=3, group_size=128), None, ""),
    ("70%", dict(sparsity=0.7), 185.6, "SparseGPT paper code"),
    ("50%", dict(sparsity=0.5), 51.04, "SparseGPT paper code"),
]


def _stages(kw: dict) -> list[tuple[str, dict]]:
    prunes = "sparsity" in kw or "pattern" in kw
    resolve = dict(refine_iters=EFFORT_MAX["refine_iters"])
    if "sparsity" in kw:
        resolve["allocation"] = EFFORT_MAX["allocation"]
    stages = [("plain", {})]
    if prunes:
        stages.append(("+resolve", resolve))
    stages.append(("+asymmetric", {**(resolve if prunes else {}), "asymmetric": True}))
    stages.append(("effort max", dict(effort="max")))
    return stages


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of "
                   + ",".join(s[0] for s in SETTINGS).replace("%", "%%"))
    p.add_argument("--stages", default=None,
                   help="comma-separated subset of plain,+resolve,+asymmetric,effort max "
                   "(the plain row is always run: the ratios need it)")
    p.add_argument("--autocast", choices=["auto", "off"], default="auto",
                   help="toolkit.walk.reconstruct.RECONSTRUCT_AUTOCAST: the reconstruction steps "
                   "in bfloat16 where the device has bfloat16 units (auto), or in float32 (off)")
    p.add_argument("--quantized", choices=["scale", "round"], default="scale",
                   help="toolkit.walk.reconstruct.RECONSTRUCT_QUANTIZED: how quantized layers "
                   "train (scales refit with codes kept, or rounding learned)")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "reconstruct_smollm2.csv"))
    add_threads_flag(p, default=2)
    args = p.parse_args(argv)
    threads = apply_threads(args)
    reconstruct.RECONSTRUCT_AUTOCAST = args.autocast
    reconstruct.RECONSTRUCT_QUANTIZED = args.quantized
    stages = {"plain"} | set(args.stages.split(",")) if args.stages else None

    machine = describe(args.device)
    print(machine, flush=True)
    model, tok, dense, calib, test_ids = smollm2_wikitext(args.nsamples, args.seqlen)
    ppl_kw = dict(seqlen=512, max_windows=args.eval_windows, verbose=False, device=args.device)
    model.to(args.device)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for label, kw, anchor, anchor_what in SETTINGS:
        if only and label not in only:
            continue
        plain = None
        for stage, extra in _stages(kw):
            if stages and stage not in stages:
                continue
            model.load_state_dict(dense)
            report = compress(model, tok, calibration=calib, nsamples=args.nsamples,
                              seqlen=args.seqlen, device=args.device, verbose=False,
                              **kw, **extra)
            t = time.perf_counter()
            ppl = perplexity(model, tok, test_ids, **ppl_kw)
            L = report.layers
            weights = int(sum(s[0] * s[1] for s in L["shape"]))
            pruned = int(round(float((L["sparsity"] * L["shape"].map(lambda s: s[0] * s[1])).sum())))
            zeros = sum(int((m.weight == 0).sum()) for _, m in model.named_modules()
                        if hasattr(m, "compression"))
            row = dict(setting=label, stage=stage, settings=report.summary["method"],
                       perplexity=round(ppl, 3), seconds=round(report.summary["seconds"], 1),
                       pruned=pruned, zeros=zeros, weights=weights,
                       sparsity=pruned / weights, anchor=anchor, anchor_is=anchor_what)
            if "block_error_before" in L:
                b = L.groupby("block")[["block_error_before", "block_error_after"]].first()
                row["block_error_before"] = float(b["block_error_before"].mean())
                row["block_error_after"] = float(b["block_error_after"].mean())
            if plain is None:
                plain = row
            row["ppl_vs_plain"] = round(ppl / plain["perplexity"], 4)
            row["ppl_vs_anchor"] = round(ppl / anchor, 4) if anchor else None
            row["seconds_vs_plain"] = round(row["seconds"] / plain["seconds"], 2)
            row["eval_seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(f"{label:>10} {stage:<12} ppl {ppl:8.2f}  x{row['ppl_vs_plain']:.3f} plain"
                  + (f"  x{row['ppl_vs_anchor']:.3f} anchor" if anchor else "")
                  + f"  {row['seconds']:6.0f}s (x{row['seconds_vs_plain']:.2f})"
                  + (f"  block {row['block_error_before']:.4f}->{row['block_error_after']:.4f}"
                     if "block_error_before" in row else ""), flush=True)
    df = pd.DataFrame(rows)
    df["machine"] = machine
    df["threads"] = threads
    df["steps_bf16"] = bool(args.autocast == "auto" and reconstruct.fast_bfloat16(args.device))
    df["quantized"] = args.quantized
    df["setup"] = (f"calibration {args.nsamples} x {args.seqlen} tokens of wiki.valid.tokens "
                   f"(seed 0); evaluation {args.eval_windows} x 512 tokens of wiki.test.raw; "
                   f"SmolLM2-135M from a Q4_1 GGUF, float32")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
