"""Whole-model quality of SmolLM2-135M under the main settings, checked so that it holds on any
machine and still fails on a 5% regression.

SmolLM2-135M is the offline model (``toolkit.load_model("smollm2")``): its weights were stored
on a 4-bit grid (Q4_1, blocks of 32) in its GGUF file and are dequantized on load, so "dense" is
that model and the 4-bit settings start from weights that were already 4-bit. Each setting
compresses a fresh copy with 8 x 256 tokens of the bundled WikiText-2 validation split and
measures the perplexity on the first 8 windows of 256 tokens of the test split, with the
session's thread count (conftest's ``smollm2_quality``).

**Why bands, and where they come from.** With 2,048 calibration tokens, the order of float sums
(set by the thread count, the CPU and the torch build) decides some mask and rounding choices, so
a SparseGPT or GPTQ perplexity moves by a few percent between healthy machines.
``bench/quality_spread.py`` measures, in one run, every setting at 1, 2 and 3 threads and under two
deliberate regressions (dampening 0.01 -> 0.1, calibration halved); its CSV,
``data/results/quality_spread.csv``, is what this test reads:

* the **reference** of each setting is its 2-thread row;
* its **band** is 1.5x the largest move over the thread counts (at least 1%);
* besides the perplexity, each setting solved with a Hessian is held to the **mean rel_error**
  of its layers (the share of a layer's output energy lost on the calibration tokens, averaged
  over 210 layers): the average of many layers moves little with float order (measured band), yet
  moves with anything that changes what the solver does;
* on the machine of the recording (same CPU model, torch build and thread count), where the
  computation is the same to the last bit, the perplexity is held to 1% of the reference.

``test_bands_catch_the_recorded_regressions`` checks, on the CSV itself, that each deliberate
regression falls outside the bands for some setting: a band too wide to catch them fails.

Re-recording after an intended change: ``python bench/quality_spread.py`` and commit the CSV with
the reason. Never re-record to make an unexplained move pass.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import SMOLLM2_SETTINGS

RECORDING = Path(__file__).resolve().parents[1] / "data" / "results" / "quality_spread.csv"
SPREAD = ("threads 1", "threads 2", "threads 3")
REFERENCE = "threads 2"
MARGIN = 1.5       # band = MARGIN x the largest move measured over the thread counts
FLOOR = 0.01       # no band narrower than 1%
SAME_MACHINE = 0.01


def _rows() -> list[dict]:
    with open(RECORDING, newline="") as f:
        return list(csv.DictReader(f))


def _value(row: dict, key: str) -> float:
    return float(row[key]) if row[key] not in ("", None) else math.nan


def recorded() -> dict:
    """``{condition: {setting: (perplexity, mean rel_error)}}`` from the CSV."""
    out: dict = {}
    for r in _rows():
        out.setdefault(r["condition"], {})[r["setting"]] = (
            _value(r, "perplexity"), _value(r, "mean_rel_error"))
    return out


def bands(table: dict) -> dict:
    """``{setting: (perplexity band, rel_error band)}`` (relative, NaN where there is no
    rel_error)."""
    out = {}
    for setting, (p0, e0) in table[REFERENCE].items():
        dp = max(abs(table[c][setting][0] / p0 - 1) for c in SPREAD)
        de = max(abs(table[c][setting][1] / e0 - 1) for c in SPREAD) if not math.isnan(e0) \
            else math.nan
        out[setting] = (max(MARGIN * dp, FLOOR), max(MARGIN * de, FLOOR)
                        if not math.isnan(de) else math.nan)
    return out


def recording_machine() -> str:
    return _rows()[0]["machine"]


def same_machine() -> bool:
    """The CPU model, torch build and thread count of this session equal the recording's."""
    import sys

    sys.path.insert(0, str(RECORDING.parents[2] / "bench"))
    from _machine import cpu_name

    m = recording_machine()
    return (f"| {cpu_name()} |" in m and f"torch {torch.__version__} " in m
            and f"(threads {torch.get_num_threads()})" in m)


def test_recording_covers_every_setting():
    table = recorded()
    assert set(SPREAD) <= set(table)
    for condition in SPREAD:
        assert list(table[condition]) == ["dense", *SMOLLM2_SETTINGS], condition


def test_bands_catch_the_recorded_regressions():
    """Each deliberate regression of the recording moves some setting outside its band (so the
    check below would have failed on it), and every band is narrower than 5%."""
    table = recorded()
    b = bands(table)
    assert all(pb < 0.05 for pb, _ in b.values()), b
    regressions = [c for c in table if c.startswith("regression")]
    assert len(regressions) >= 2
    for c in regressions:
        caught = [s for s, (p, e) in table[c].items()
                  if abs(p / table[REFERENCE][s][0] - 1) > b[s][0]
                  or (not math.isnan(e) and abs(e / table[REFERENCE][s][1] - 1) > b[s][1])]
        assert caught, f"{c}: no setting leaves its band"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", *SMOLLM2_SETTINGS])
def test_smollm2_quality_is_within_its_band(smollm2_quality_results, name):
    table = recorded()
    ref_ppl, ref_err = table[REFERENCE][name]
    ppl_band, err_band = bands(table)[name]
    if same_machine():
        ppl_band = SAME_MACHINE
    ppl, err = smollm2_quality_results[name]
    assert abs(ppl / ref_ppl - 1) <= ppl_band, (
        f"{name}: perplexity {ppl:.4f}, recorded {ref_ppl:.4f} ({ppl / ref_ppl - 1:+.2%}, band "
        f"{ppl_band:.2%}); if an intended change moved it, re-record (module docstring)")
    if not math.isnan(ref_err):
        assert abs(err / ref_err - 1) <= err_band, (
            f"{name}: mean rel_error {err:.6f}, recorded {ref_err:.6f} "
            f"({err / ref_err - 1:+.2%}, band {err_band:.2%})")
