"""Pinned whole-model quality: SmolLM2-135M perplexities under the main settings, in float64.

SmolLM2-135M is the offline model (``toolkit.load_model("smollm2")``): its weights were stored
on a 4-bit grid (Q4_1, blocks of 32) in its GGUF file and are dequantized on load, so "dense" is
that model and the 4-bit settings start from weights that were already 4-bit (on other group
boundaries). Each setting compresses a fresh copy of it with the CI calibration size, 8 x 256
tokens of the bundled WikiText-2 validation split, and measures the perplexity on the first 8
windows of 256 tokens of the WikiText-2 test split (conftest's ``smollm2_results``,
``SMOLLM2_CALIB``, ``SMOLLM2_EVAL``).

**Why float64.** With 2,048 calibration tokens many mask and rounding choices are near a tie.
In float32 the order of float sums (set by the thread count, the CPU's vector width and the
torch build) decides some of them, each changed choice changes every later column of its row
and every later layer's inputs, and the perplexities move by 2-5% (GPTQ 3-bit: up to 25%)
between machines with nothing wrong: float32 pins recorded on one machine failed on another.
The tests therefore compute in float64 (the model, the Hessians and the solver:
``conftest.SMOLLM2_DTYPE``). ``bench/quality_spread.py`` measured it
(``data/results/quality_spread.csv``): with 1, 2 and 3 threads and with deterministic
algorithms, every setting that quantizes, and magnitude and Wanda, gives the same perplexity to
9 digits (a grid snaps the weights back each layer, so round-off cannot grow). The two settings
that only prune with SparseGPT still move: their kept weights carry float64 round-off from
layer to layer, which grows through 30 blocks until a mask choice near its threshold flips
(SparseGPT 50%: 1.2%, 2:4: 3.8% between thread counts); the mean layer ``rel_error`` of the
same runs moves by at most 0.5%.

So: every perplexity is pinned within ``TOLERANCE`` (0.5%), except those two, held within
``PRUNE_ONLY_BAND`` (6%: 1.5x the largest move measured); and every Hessian setting's mean
layer ``rel_error`` is pinned within ``ERROR_TOLERANCE`` (1%: twice the largest move measured).
A change to the solver, the masks, the grids, the calibration data or the evaluation that moves
a value beyond these fails here: the bench's two deliberate changes (dampening 0.01 -> 0.1, which
*lowers* these perplexities by 3-15% at this calibration size; calibration halved, which raises
them by 0.6-52%) each fail several checks, and every setting they touch at least one
(``test_tolerances_sit_between_noise_and_change`` reads the bench's file).

Re-recording: when an intended change moves a value, run

    python -m pytest -q -s -m slow tests/test_quality_pinned.py

which prints the measured table (conftest's ``smollm2_quality_results`` prints it); paste the
perplexities here and write in the commit message which change moved which values and why that
is expected. Never re-record to make an unexplained move pass.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import SMOLLM2_SETTINGS

SPREAD = Path(__file__).resolve().parents[1] / "data" / "results" / "quality_spread.csv"

#: Recorded in float64 with the command in the module docstring (Intel Xeon, 2 threads;
#: bench/quality_spread.py has 1 and 3 threads too). Perplexities:
PINNED = {
    "dense": 38.773872,
    "sparsegpt 50%": 77.323126,
    "sparsegpt 2:4": 138.707404,
    "gptq 4-bit g128": 52.281453,
    "gptq 3-bit g128": 171.583932,
    "sparsegpt 50% + gptq 4-bit g128": 107.417904,
    "magnitude 50%": 521.481394,
    "wanda 50%": 83.369521,
    "rtn 4-bit g128": 51.704316,
}
#: ... and the mean over the compressed layers of the report's rel_error (the settings that
#: use a Hessian).
PINNED_ERROR = {
    "sparsegpt 50%": 0.01223415,
    "sparsegpt 2:4": 0.02255939,
    "gptq 4-bit g128": 0.00249383,
    "gptq 3-bit g128": 0.0119745,
    "sparsegpt 50% + gptq 4-bit g128": 0.01379364,
    "wanda 50%": 0.02980006,
}
TOLERANCE = 0.005  # relative, perplexity
PRUNE_ONLY = ("sparsegpt 50%", "sparsegpt 2:4")
PRUNE_ONLY_BAND = 0.06  # relative, perplexity of the settings that only prune with SparseGPT
ERROR_TOLERANCE = 0.01  # relative, mean layer rel_error


def ppl_tolerance(name: str) -> float:
    return PRUNE_ONLY_BAND if name in PRUNE_ONLY else TOLERANCE

def test_pinned_table_names_every_setting():
    assert list(PINNED) == ["dense", *SMOLLM2_SETTINGS]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PINNED))
def test_smollm2_perplexity_is_pinned(smollm2_results, name):
    got, pinned, tol = smollm2_results[name], PINNED[name], ppl_tolerance(name)
    assert abs(got / pinned - 1) <= tol, (
        f"{name}: perplexity {got:.6f}, pinned {pinned:.6f} ({got / pinned - 1:+.2%}, "
        f"tolerance {tol:.1%}); if an intended change moved it, re-record (module docstring) "
        f"and give the reason")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PINNED_ERROR))
def test_smollm2_layer_error_is_pinned(smollm2_quality_results, name):
    got, pinned = smollm2_quality_results[name][1], PINNED_ERROR[name]
    assert abs(got / pinned - 1) <= ERROR_TOLERANCE, (
        f"{name}: mean layer rel_error {got:.8f}, pinned {pinned:.8f} ({got / pinned - 1:+.2%}, "
        f"tolerance {ERROR_TOLERANCE:.0%}); if an intended change moved it, re-record (module "
        f"docstring) and give the reason")


def _spread_rows() -> list[dict]:
    with open(SPREAD, newline="") as f:
        return list(csv.DictReader(f))


def test_tolerances_sit_between_noise_and_change():
    """From bench/quality_spread.py's measurements (float64): the thread count (1, 2, 3) and
    deterministic algorithms move no perplexity beyond two thirds of its tolerance
    (``ppl_tolerance``) and no mean layer rel_error beyond half of ``ERROR_TOLERANCE``; each
    deliberate change
    (dampening 0.01 -> 0.1; calibration halved) moves some value of every setting it affects
    beyond its tolerance, so the slow tests above fail on it; and the recorded values are the
    pins."""
    rows = [r for r in _spread_rows() if r["dtype"] == "float64"]
    noise = [r for r in rows if "regression" not in r["condition"]]
    assert {r["condition"] for r in noise} == {"float64 threads 1", "float64 threads 2",
                                               "float64 threads 3", "float64 deterministic"}
    for r in noise:
        name = r["setting"]
        assert abs(float(r["ppl_ratio"]) - 1) <= ppl_tolerance(name) / 1.5, r
        if r["error_ratio"]:
            assert abs(float(r["error_ratio"]) - 1) <= ERROR_TOLERANCE / 2, r
    for cond in ("float64 regression: percdamp 0.1", "float64 regression: calibration halved"):
        changed = [r for r in rows if r["condition"] == cond]
        assert len(changed) == len(PINNED), cond
        for r in changed:
            name = r["setting"]
            uses_calibration = name in PINNED_ERROR
            touched = uses_calibration and (name != "wanda 50%" or "calibration" in cond)
            ppl_out = abs(float(r["ppl_ratio"]) - 1) > ppl_tolerance(name)
            err_out = bool(r["error_ratio"]) and \
                abs(float(r["error_ratio"]) - 1) > ERROR_TOLERANCE
            if touched:  # a setting the change reaches fails at least one check
                assert ppl_out or err_out, (cond, r)
            else:  # magnitude, RTN (no calibration), Wanda under the dampening (no solve)
                assert not ppl_out and not err_out, (cond, r)
    reference = {r["setting"]: r for r in rows if r["condition"] == "float64 threads 2"}
    for name, pinned in PINNED.items():
        assert abs(float(reference[name]["perplexity"]) / pinned - 1) <= 1e-6, name
    for name, pinned in PINNED_ERROR.items():
        assert abs(float(reference[name]["mean_rel_error"]) / pinned - 1) <= 1e-6, name


@pytest.mark.slow
def test_smollm2_sparsegpt_beats_magnitude_6x_and_joint_beats_3bit(smollm2_results):
    """SmolLM2-135M, the settings of conftest's smollm2_results (in float64; 8 x 256 WikiText-2
    calibration tokens, perplexity on 8 x 256 test tokens; values recorded in
    below). The orderings the README states, each at its measured ratio
    with a 10% margin, so that a setting whose perplexity doubles fails:

    * magnitude 50% / SparseGPT 50% = 6.74 (521.48 / 77.32);
    * Wanda 50% / SparseGPT 50% = 1.078 (83.37 / 77.32): SparseGPT below Wanda;
    * GPTQ 3-bit g128 / joint 50% + 4-bit g128 = 1.597 (171.58 / 107.42): at about 3.2 bits per
      weight the joint sweep beats 3-bit;
    * GPTQ 4-bit g128 / RTN 4-bit g128 = 1.011 (52.28 / 51.70): here GPTQ does *not* beat RTN
      on the whole model. SmolLM2's weights were stored on a 4-bit grid (Q4_1, blocks of 32)
      and dequantized on load, so 4-bit results start from weights that were already 4-bit
      (with other group boundaries), and 2,048 calibration tokens are few; per layer GPTQ's
      error is 0.21-0.36x RTN's (tests/test_solver.py). Held within 10% of that ratio.
    """
    r = smollm2_results
    assert r["dense"] < r["sparsegpt 50%"]
    assert r["magnitude 50%"] / r["sparsegpt 50%"] == pytest.approx(6.744, rel=0.1)
    assert r["wanda 50%"] / r["sparsegpt 50%"] == pytest.approx(1.078, rel=0.1)
    assert r["sparsegpt 50%"] < r["wanda 50%"]
    assert r["gptq 3-bit g128"] / r["sparsegpt 50% + gptq 4-bit g128"] == pytest.approx(
        1.597, rel=0.1)
    assert r["gptq 4-bit g128"] / r["rtn 4-bit g128"] == pytest.approx(1.011, rel=0.1)
