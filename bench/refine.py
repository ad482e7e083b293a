"""Benchmark of issue 10: plain SparseGPT vs mask-fixed re-solve vs re-solve + OWL allocation.

On SmolLM2-135M (offline, ``toolkit.load_model("smollm2")``), for 50%, 60%, 70% unstructured
and 2:4, each row compresses a fresh copy of the dense weights with

* ``plain``: SparseGPT (``refine_iters=0``, ``allocation="uniform"``);
* ``resolve``: SparseGPT + mask-fixed re-solve (``refine_iters=N``);
* ``resolve+owl``: the same + OWL sparsity allocation (unstructured only: an n:m pattern fixes
  every layer at n/m, so there is nothing to allocate).

Every row uses the same calibration windows (WikiText-2 ``wiki.valid.tokens``, drawn once) and
the same evaluation windows (the first ``--eval-windows`` x ``--eval-seqlen`` tokens of
``wiki.test.raw``, ``\\r\\n`` normalised). Reported: perplexity, change vs plain, compress seconds
and the extra seconds vs plain, the total layer error, and for the re-solve rows the number of
layers whose error went up against the solver's own result on the same inputs (must be 0: the
re-solve keeps the better of the two per row). Writes ``data/results/refine_smollm2.csv``.

    OMP_NUM_THREADS=1 python bench/refine.py                # the CPU setting recorded in the CSV
    python bench/refine.py --device cuda --nsamples 128 --seqlen 2048 --eval-windows 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from _machine import add_threads_flag, apply_threads, describe, smollm2_wikitext

import toolkit.walk.sweep as sweep
from toolkit import compress, perplexity

REPO = Path(__file__).resolve().parents[1]
# the targets (60%, 70%) first, so that a cut-short run still answers them
SETTINGS = [("60%", dict(sparsity=0.6)), ("70%", dict(sparsity=0.7)),
            ("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))]


class _ErrorLog:
    """Wraps ``toolkit.walk.sweep.refine_layers`` to record each layer's error before and after."""

    def __init__(self):
        self.pairs: list[tuple[str, float, float]] = []
        self.inner = sweep.refine_layers

    def __call__(self, originals, results, H, **kw):
        out = self.inner(originals, results, H, **kw)
        for name, a, b in zip(kw.get("names") or [""] * len(out), results, out):
            self.pairs.append((name, a.error, b.error))
        return out


def _write(rows, machine, setting, out):
    df = pd.DataFrame(rows)
    df["machine"] = machine
    df["setting_note"] = setting
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    return df


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40, help="0: the whole test split")
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--refine-iters", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None, help="comma-separated subset of 50%%,60%%,70%%,2:4")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "refine_smollm2.csv"))
    add_threads_flag(p)
    args = p.parse_args(argv)
    apply_threads(args)

    machine = describe(args.device)
    print(machine, flush=True)
    model, tok, dense, calib, test_ids = smollm2_wikitext(args.nsamples, args.seqlen)
    ppl_kw = dict(seqlen=args.eval_seqlen, max_windows=args.eval_windows or None, verbose=False,
                  device=args.device)
    model.to(args.device)
    windows = min(test_ids.numel() // args.eval_seqlen, args.eval_windows or 10**9)
    setting = (f"calibration {args.nsamples} x {args.seqlen} tokens of wiki.valid.tokens "
               f"(seed 0); evaluation {windows} x {args.eval_seqlen} tokens of wiki.test.raw; "
               f"refine_iters {args.refine_iters}; OWL M=5, lambda=0.08")
    print(setting, flush=True)
    t = time.perf_counter()
    dense_ppl = perplexity(model, tok, test_ids, **ppl_kw)
    print(f"dense perplexity {dense_ppl:.3f} ({time.perf_counter() - t:.0f}s)", flush=True)

    rows = [dict(setting="dense", variant="dense", perplexity=dense_ppl, seconds=0.0)]
    only = set(args.only.split(",")) if args.only else None
    log = _ErrorLog()
    sweep.refine_layers = log
    try:
        for label, kw in SETTINGS:
            if only and label not in only:
                continue
            variants = [("plain", {}), ("resolve", dict(refine_iters=args.refine_iters))]
            if "sparsity" in kw:
                variants.append(("resolve+owl", dict(refine_iters=args.refine_iters,
                                                     allocation="owl")))
            plain = None
            for vname, extra in variants:
                model.load_state_dict(dense)
                log.pairs.clear()
                report = compress(model, tok, calibration=calib, nsamples=args.nsamples,
                                  seqlen=args.seqlen, device=args.device, verbose=False,
                                  **kw, **extra)
                ppl = perplexity(model, tok, test_ids, **ppl_kw)
                L = report.layers
                row = dict(setting=label, variant=vname, perplexity=ppl,
                           seconds=report.summary["seconds"],
                           total_layer_error=float(L["error"].sum()),
                           sparsity=report.summary["sparsity (compressed)"],
                           layer_sparsity_min=float(L["sparsity"].min()),
                           layer_sparsity_max=float(L["sparsity"].max()))
                if log.pairs:
                    row["layers_worse_than_solver"] = sum(b > a for _, a, b in log.pairs)
                    row["resolve_error_ratio"] = (sum(b for _, _, b in log.pairs)
                                                  / sum(a for _, a, _ in log.pairs))
                if plain is None:
                    plain = row
                    plain_errors = dict(zip(L["layer"], L["error"]))
                else:
                    row["ppl_vs_plain"] = ppl / plain["perplexity"] - 1
                    row["extra_seconds"] = row["seconds"] - plain["seconds"]
                    row["layers_error_above_plain_run"] = int(sum(
                        e > plain_errors[n] for n, e in zip(L["layer"], L["error"])))
                rows.append(row)
                _write(rows, machine, setting, args.out)  # after every row: partial runs count
                print(f"{label:>4} {vname:<12} ppl {ppl:9.3f}  {row.get('ppl_vs_plain', 0):+7.1%}"
                      f"  {row['seconds']:6.0f}s  (+{row.get('extra_seconds', 0):.0f}s)"
                      f"  worse-vs-solver {row.get('layers_worse_than_solver', '-')}", flush=True)
    finally:
        sweep.refine_layers = log.inner

    df = _write(rows, machine, setting, args.out)
    cols = ["setting", "variant", "perplexity", "ppl_vs_plain", "seconds", "extra_seconds",
            "sparsity", "layer_sparsity_min", "layer_sparsity_max", "layers_worse_than_solver",
            "layers_error_above_plain_run"]
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(df[[c for c in cols if c in df]].to_string(index=False))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
