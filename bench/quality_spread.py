"""How far float order moves the real-model quality checks, and how far a real regression does.

    python bench/quality_spread.py      # -> data/results/quality_spread.csv

tests/test_quality_pinned.py checks SmolLM2-135M's quality under the settings of
``tests/conftest.py`` (``SMOLLM2_SETTINGS``: SparseGPT 50% and 2:4, GPTQ 4- and 3-bit g128,
joint 50% + 4-bit, magnitude, Wanda, RTN; 8 x 256 calibration tokens of WikiText-2 validation,
perplexity on 8 x 256 tokens of WikiText-2 test). With 2,048 calibration tokens many mask and
rounding choices are near a tie, so in float32 the order of float sums, which the thread count,
the CPU and the torch build set, decides some of them and a perplexity moves by a few percent
between machines with nothing wrong. The tests therefore compute in float64 (the model, the
Hessians, the solver: ``conftest.SMOLLM2_DTYPE``). This bench measures, in one run, on one
machine:

* the **spread** in float64 (what the tests run): every setting with 1, 2 and 3 torch threads,
  and with ``torch.use_deterministic_algorithms(True)``: the perplexity and the mean over the
  compressed layers of the report's ``rel_error`` (the share of each layer's output energy the
  compression lost, on the calibration tokens);
* two deliberate **regressions** in float64, with 2 threads: the dampening raised from 0.01 to
  0.1, and the calibration halved (4 windows instead of 8): the moves the test must catch;
* the same spread in **float32** with 1 and 2 threads: why the tests do not pin float32.

The test's tolerance is set from this file (its docstring says how). The CSV is rewritten whole
after each condition, with every row of the run so far. One row per condition and setting:
``condition``, ``dtype``, ``threads``, ``deterministic``, ``setting``, ``perplexity``,
``mean_rel_error``, their ratios to the float64 2-thread row of the same setting (float32 rows:
to the float32 2-thread row), the machine. SmolLM2's weights were stored on a 4-bit grid (Q4_1,
blocks of 32) and are dequantized on load.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch
from _machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

#: (condition, dtype, threads, deterministic, changes to every setting); the first row of each
#: dtype is the reference of that dtype's ratios
CONDITIONS = [
    ("float64 threads 2", torch.float64, 2, False, {}),
    ("float64 threads 1", torch.float64, 1, False, {}),
    ("float64 threads 3", torch.float64, 3, False, {}),
    ("float64 deterministic", torch.float64, 2, True, {}),
    ("float64 regression: percdamp 0.1", torch.float64, 2, False, {"percdamp": 0.1}),
    ("float64 regression: calibration halved", torch.float64, 2, False, {"nsamples": 4}),
    ("float32 threads 2", torch.float32, 2, False, {}),
    ("float32 threads 1", torch.float32, 1, False, {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "data" / "results" / "quality_spread.csv")
    p.add_argument("--only", nargs="*", default=None, help="condition names to run")
    args = p.parse_args()
    from conftest import smollm2_quality, wikitext_file

    from toolkit import load_model

    model, tok = load_model("smollm2", dtype=torch.float32)
    valid = wikitext_file("wiki.valid.tokens").read_text(encoding="utf-8").replace("\r\n", "\n")
    test = wikitext_file("wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    rows, bases = [], {}
    for name, dtype, threads, det, changes in CONDITIONS:
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        res = smollm2_quality(model, tok, valid, test, threads=threads, deterministic=det,
                              dtype=dtype, **changes)
        machine = describe()
        if name.endswith(" threads 2"):
            bases[dtype] = res
        base = bases.get(dtype, {})
        for setting, (ppl, err) in res.items():
            b = base.get(setting)
            rows.append(dict(
                condition=name, dtype=str(dtype).removeprefix("torch."), threads=threads,
                deterministic=det, setting=setting,
                perplexity=round(ppl, 6), mean_rel_error=round(err, 8) if not math.isnan(err)
                else "", ppl_ratio=round(ppl / b[0], 6) if b else "",
                error_ratio=round(err / b[1], 6) if b and not math.isnan(err) else "",
                machine=machine))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        for r in rows[-len(res):]:
            print(f"   {r['setting']:<34} {r['perplexity']:>9} ({r['ppl_ratio']})  "
                  f"err {r['mean_rel_error']} ({r['error_ratio']})", flush=True)
        _write(args.out, rows)  # the rows of this run so far, the whole file replaced


def _write(out: Path, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    print(f"wrote {out} ({len(rows)} rows)", flush=True)


if __name__ == "__main__":
    main()
