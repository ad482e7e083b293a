"""How far float order moves the real-model quality checks, and how far a real regression does.

    python bench/quality_spread.py      # -> data/results/quality_spread.csv

tests/test_quality_pinned.py checks SmolLM2-135M's quality under the settings of
``tests/conftest.py`` (``SMOLLM2_SETTINGS``: SparseGPT 50% and 2:4, GPTQ 4- and 3-bit g128,
joint 50% + 4-bit, magnitude, Wanda, RTN; 8 x 256 calibration tokens of WikiText-2 validation,
perplexity on 8 x 256 tokens of WikiText-2 test). With 2,048 calibration tokens the order of
float sums, which the thread count, the CPU and the torch build set, decides some mask and
rounding choices, so a perplexity moves by a few percent between machines with nothing wrong.
This bench measures, in one run, on one machine:

* the **spread**: every setting with 1, 2 and 3 torch threads: the perplexity and the mean over
  the compressed layers of the report's ``rel_error`` (the share of each layer's output energy
  the compression lost, on the calibration tokens);
* two deliberate **regressions**, with 2 threads: the dampening raised from 0.01 to 0.1, and the
  calibration halved (4 windows instead of 8).

The test's bands are set from this file (its docstring says how). The CSV is rewritten whole after
each condition, with every row of the run so far. Writes one row per condition
and setting: ``condition``, ``threads``, ``deterministic``, ``setting``, ``perplexity``,
``mean_rel_error``, their ratios to the 2-thread row of the same setting, the machine.
SmolLM2's weights were stored on a 4-bit grid (Q4_1, blocks of 32) and are dequantized on load.
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

#: (condition, threads, deterministic, changes to every setting)
CONDITIONS = [
    ("threads 2", 2, False, {}),
    ("threads 1", 1, False, {}),
    ("regression: percdamp 0.1", 2, False, {"percdamp": 0.1}),
    ("regression: calibration halved", 2, False, {"nsamples": 4}),
    ("threads 3", 3, False, {}),
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
    rows, base = [], {}
    for name, threads, det, changes in CONDITIONS:
        if args.only is not None and name not in args.only:
            continue
        t0 = time.perf_counter()
        res = smollm2_quality(model, tok, valid, test, threads=threads, deterministic=det,
                              **changes)
        machine = describe()
        if name == "threads 2":
            base = res
        for setting, (ppl, err) in res.items():
            b = base.get(setting)
            rows.append(dict(
                condition=name, threads=threads, deterministic=det, setting=setting,
                perplexity=round(ppl, 4), mean_rel_error=round(err, 6) if not math.isnan(err)
                else "", ppl_ratio=round(ppl / b[0], 4) if b else "",
                error_ratio=round(err / b[1], 4) if b and not math.isnan(err) else "",
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
