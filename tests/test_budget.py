"""Compress to a size (toolkit.plan.budget): the knapsack against brute force, the budget on disk,
the chosen settings in the report and the checkpoint, and errors for bad input."""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_model

from toolkit import CompressConfig, compress, save_compressed
from toolkit.checkpoint.saveload import TOOLKIT_NAME, WEIGHTS_NAME, read_header
from toolkit.checkpoint.size import model_bytes
from toolkit.config.menu import DEFAULT_MENU, parse_menu, parse_size
from toolkit.config.options import LayerSettings, add_flags, config_from_args
from toolkit.model.layers import find_blocks
from toolkit.plan.budget import (
    BudgetProfile,
    LayerChoices,
    budgeted_layers,
    layer_choices,
    plan_budget,
    solve_knapsack,
)
from toolkit.walk.budget import profile_layers

# the export layout that writes what each size layout counts (the names differ today)
N, L = 8, 32


def _run(model, **kw):
    return compress(model, calibration=random_ids(N, L), nsamples=N, seqlen=L, verbose=False,
                    **kw)


def _data_bytes(folder) -> int:
    """Bytes of the tensors in the checkpoint's safetensors file (the header excluded)."""
    header = read_header(folder / WEIGHTS_NAME)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
               if k != "__metadata__")


# ---- the dynamic programme -------------------------------------------------------------------

def _brute(costs, values, capacity):
    best = math.inf
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[k] for c, k in zip(costs, pick)) <= capacity:
            best = min(best, sum(v[k] for v, k in zip(values, pick)))
    return best


def test_knapsack_equals_brute_force():
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        items = rng.randint(1, 5)
        costs = [[rng.randint(0, 12) for _ in range(rng.randint(1, 4))] for _ in range(items)]
        values = [[rng.choice([rng.random(), float(rng.randint(0, 5))]) for _ in c]
                  for c in costs]
        capacity = rng.randint(0, 40)
        best = _brute(costs, values, capacity)
        if math.isinf(best):
            with pytest.raises(ValueError, match="no choice fits"):
                solve_knapsack(costs, values, capacity)
            continue
        choice, value, cost = solve_knapsack(costs, values, capacity)
        assert cost == sum(c[k] for c, k in zip(costs, choice)) <= capacity
        assert value == pytest.approx(sum(v[k] for v, k in zip(values, choice)), abs=1e-12)
        assert value == pytest.approx(best, abs=1e-12)
        checked += 1
    assert checked > 200


def test_knapsack_ties_take_the_smaller_cost():
    choice, value, cost = solve_knapsack([[0, 5], [3, 1]], [[1.0, 1.0], [0.0, 0.0]], 10)
    assert (choice, value, cost) == ([0, 1], 1.0, 1)


def test_knapsack_bad_input():
    with pytest.raises(ValueError, match="capacity"):
        solve_knapsack([[1]], [[0.0]], -1)
    with pytest.raises(ValueError, match="finite"):
        solve_knapsack([[1]], [[math.nan]], 3)


def _synthetic_profile(rng, layers=6):
    """A profile with made-up errors over real option bytes (shapes of a small model)."""
    cfg = CompressConfig(target_bits=4.0)
    menu = parse_menu(DEFAULT_MENU)
    out, errors, energy = [], [], []
    base = cfg.settings
    for i in range(layers):
        rows, cols = rng.choice([(64, 64), (32, 64), (128, 64), (64, 128)])
        settings = [LayerSettings(**{**base.to_dict(), **o.changes(),
                                     "pattern": o.pattern}) for o in menu]
        out.append(LayerChoices(f"layer{i}", i // 3, rows, cols, [o.spec for o in menu],
                                settings))
        errors.append([0.0 if not s.active else rng.random() * 2.0 ** -(s.bits or 16)
                       * (1 + 4 * s.sparsity) for s in settings])
        energy.append(1.0 + rng.random())
    return BudgetProfile(layers=out, errors=errors, energy=energy, dense_rest=1000.0,
                         seconds=0.0, rows_fraction=1.0, layout="compact")


def test_compact_profile_reused_for_standard_offers_no_pruned_option():
    """A profile measured in the compact layout keeps its pruned options; planned for the
    standard layout (where they cost what the unpruned ones cost) they must not be chosen, even
    when their measured error is the smaller one."""
    rng = random.Random(3)
    prof = _synthetic_profile(rng, layers=6)
    for c, errs in zip(prof.layers, prof.errors):  # pruning made to look free of error
        for k, s in enumerate(c.settings):
            if s.prunes:
                errs[k] = 0.0
    pruned = [k for k, s in enumerate(prof.layers[0].settings) if s.prunes]
    assert pruned, "the default menu has pruned options"
    for target in (3.3, 4.3):
        std = plan_budget(prof, target_bits=target, layout="standard", metric="relative")
        assert not any(std.settings(c.name).prunes for c in prof.layers), std.counts()
        compact = plan_budget(prof, target_bits=target, layout="compact", metric="relative")
        assert any(compact.settings(c.name).prunes for c in prof.layers), compact.counts()


@pytest.mark.parametrize("layout", ["standard", "compact"])
def test_plan_is_the_exact_optimum_on_its_grid(layout):
    """The plan fits the budget and is at least as good as the brute-force optimum over the
    true bytes of every choice that fits in budget - rounding_bytes."""
    rng = random.Random(1)
    for trial in range(6):
        prof = _synthetic_profile(rng, layers=5)
        params = sum(c.params for c in prof.layers)
        target = rng.uniform(2.5, 9.0)
        plan = plan_budget(prof, target_bits=target, layout=layout, slack=0.02,
                           metric="relative")
        nbytes = [[c.option_bytes(k, layout) for k in range(len(c.specs))] for c in prof.layers]
        vals = [[e / en for e in errs] for errs, en in zip(prof.errors, prof.energy)]
        budget = target * params / 8
        assert plan.budget == pytest.approx(budget)
        got = sum(nbytes[i][plan.choice[c.name]] for i, c in enumerate(prof.layers))
        assert got == pytest.approx(plan.planned) and got <= budget
        value = sum(vals[i][plan.choice[c.name]] for i, c in enumerate(prof.layers))
        assert value == pytest.approx(plan.value, rel=1e-12)
        best_tight = best_full = math.inf
        # pruning saves no byte in the standard layout: its options do not compete there
        allowed = [[k for k, st in enumerate(c.settings)
                    if layout == "compact" or not st.prunes] for c in prof.layers]
        for pick in itertools.product(*allowed):
            b = sum(n[k] for n, k in zip(nbytes, pick))
            v = sum(x[k] for x, k in zip(vals, pick))
            if b <= budget:
                best_full = min(best_full, v)
            if b <= budget - plan.rounding_bytes:
                best_tight = min(best_tight, v)
        assert best_full - 1e-12 <= value <= best_tight + 1e-12, trial
        assert plan.rounding_bytes == pytest.approx(0.02 * budget)


# ---- parsing ----------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("60MB") == 60_000_000
    assert parse_size("1.5 GiB") == 3 * 2**29
    assert parse_size("123456") == parse_size(123456) == 123456
    assert parse_size(1e6) == 1_000_000
    for bad in ("60 parsecs", "-5MB", 0, True, "MB"):
        with pytest.raises(ValueError, match="target_size"):
            parse_size(bad)


def test_parse_menu():
    menu = parse_menu("16, 4g128,4, 50%+4g128 ,0.6+3row,2:4+2g64,60%")
    assert [o.spec for o in menu] == ["16", "4g128", "50%+4g128", "60%+3row", "2:4+2g64",
                                      "60%"]
    assert menu[3].changes() == dict(sparsity=0.6, pattern=None, bits=3, group_size=None)
    assert menu[4].changes() == dict(sparsity=0.0, pattern=(2, 4), bits=2, group_size=64)
    assert parse_menu([{"sparsity": 0.5, "bits": 4}])[0].spec == "50%+4g128"
    for bad, match in (("4x", "cannot read"), ("1g128", "bits"), ("4g0", "group_size"),
                       ("", "empty"), ([{"sym": True}], "sym")):
        with pytest.raises(ValueError, match=match):
            parse_menu(bad)


def test_flags_come_from_the_options():
    p = argparse.ArgumentParser()
    add_flags(p)
    args = p.parse_args(["--target-size", "60MB", "--budget-menu", "16,4g128,3g128",
                         "--budget-layout", "compact", "--profile-rows", "0.5",
                         "--profile-holdout", "0.25"])
    cfg = config_from_args(args)
    assert (cfg.target_size, cfg.budget_menu, cfg.budget_layout, cfg.profile_rows,
            cfg.profile_holdout) == (60_000_000, ("16", "4g128", "3g128"), "compact", 0.5, 0.25)
    assert config_from_args(p.parse_args(["--target-bits", "3"])).profile_holdout == 0.5
    assert config_from_args(p.parse_args(["--target-bits", "3.2"])).target_bits == 3.2
    assert config_from_args(p.parse_args(["--target-bits", "3"])).budget_guard == 3.0
    assert config_from_args(p.parse_args(["--target-bits", "3", "--budget-guard", "none"])
                            ).budget_guard is None
    assert config_from_args(p.parse_args(["--budget-guard", "5"])).budget_guard == 5.0
    assert CompressConfig(target_bits=3.2).describe() == \
        "budget 3.2 bits/weight standard layout"


# ---- compress to a size on tiny models ------------------------------------------------------

def _check_saved(model, report, tmp_path, layout, name):
    """Save in the budget's layout (fp16) and compare the bytes on disk with the accounting;
    the chosen settings are in the checkpoint's entries."""
    folder = save_compressed(model, tmp_path / name, report=report,
                             layout=layout, dtype=torch.float16)
    on_disk = _data_bytes(folder)
    assert on_disk == model_bytes(model, layout=layout)["bytes"]
    meta = json.loads((folder / TOOLKIT_NAME).read_text())
    chosen = report.budget.layers.set_index("layer")
    entries = meta["layers"]
    for name_, row in chosen.iterrows():
        if row["bits"] == 16 and row["sparsity"] == 0:
            assert name_ not in entries  # left alone: a plain weight
            continue
        s = LayerSettings.from_dict(entries[name_]["settings"])
        assert (s.bits or 16, s.group_size if s.bits else None) == \
            (row["bits"], None if math.isnan(row["group_size"]) else row["group_size"])
        assert (s.sparsity if s.pattern is None else 1 - s.pattern[0] / s.pattern[1]) == \
            row["sparsity"]
    assert meta["summary"]["budget target"] == report.summary["budget target"]
    return on_disk


@pytest.mark.parametrize("target", [2.6, 3.2, 4.2, 6.0])
def test_target_bits_standard_layout(target, tmp_path):
    model = tiny_model("llama")
    params = sum(c.params for c in layer_choices(model, CompressConfig(target_bits=target)))
    report = _run(model, target_bits=target)
    b = report.budget
    spent = b.summary["bytes (budgeted layers)"]
    budget = target * params / 8
    assert b.summary["budget bytes (layers)"] == pytest.approx(budget)
    assert 0.98 * budget <= spent <= budget  # 14 layers only: 1% is not always reachable
    size = model_bytes(model, layout="standard")
    assert size["bits_per_weight"] == pytest.approx(8 * spent / params)
    assert size["compressed_params"] == params
    # pruning saves nothing in this layout: no pruned option was even profiled
    assert all(not s.prunes for c in b.profile.layers for s in c.settings)
    assert (b.layers["bytes"] == b.layers["planned_bytes"]).all() and b.replans == 0
    # one report row per budgeted layer, with the chosen bits
    assert sorted(report.layers["layer"]) == sorted(b.layers["layer"])
    merged = report.layers.set_index("layer").join(b.layers.set_index("layer"), rsuffix="_b")
    assert (merged["bits"] == merged["bits_b"]).all()
    on_disk = _check_saved(model, report, tmp_path, "standard", f"t{target}")
    assert on_disk == pytest.approx(b.summary["checkpoint bytes"])


def test_target_size_compact_layout_on_disk(tmp_path):
    """In the compact layout the pruned options compete; kept codes that land on 0 make a
    layer smaller than planned and the rest is planned again; the file holds the budget."""
    model = tiny_model("llama", layers=4)
    menu = "16,8g128,4g128,3g128,2g128,50%+4g128,50%+3g128,50%+2g128,2:4+3g128"
    base = copy.deepcopy(model)
    rest = model_bytes(model, layout="compact")["bytes"] - \
        2 * sum(c.params for c in layer_choices(model, CompressConfig(target_bits=4)))
    target = int(rest + 2.7 * sum(c.params for c in layer_choices(
        model, CompressConfig(target_bits=4))) / 8)
    report = _run(model, target_size=target, budget_layout="compact",
                  budget_menu=menu, profile_rows=1.0)
    b = report.budget
    assert b.plan.layout == "compact"
    assert any(s.startswith(("50%", "2:4")) for s in b.layers["option"])
    assert (b.layers["bytes"] <= b.layers["planned_bytes"]).all()
    assert b.replans >= 1
    total = model_bytes(model, layout="compact")["bytes"]
    assert 0.99 * target <= total <= target
    on_disk = _check_saved(model, report, tmp_path, "compact", "c")
    assert on_disk == total
    # the same target given as a string
    again = _run(copy.deepcopy(base), target_size=f"{target / 1e3}KB",
                 budget_layout="compact", budget_menu=menu, profile_rows=1.0,
                 profile=b.profile)
    assert again.budget.plan.choice == b.plan.choice if again.budget.replans == 0 else True
    assert again.summary["checkpoint bytes"] <= target


@pytest.mark.parametrize("layout", ["standard", "compact"])
def test_block_strategy_counted_for_every_layer_of_a_partial_group_setting(layout, tmp_path):
    """A setting whose groups leave a partial last group on some layer (g128 on 192 columns)
    is stored with the block strategy (int8 zero points) in *every* layer that has it, also
    where 128 divides the columns (down_proj, 384). The plan counts that, so the checkpoint
    holds the budget: model_bytes and the bytes on disk equal the report's bytes."""
    model = tiny_model("llama", hidden=192)
    downs = [r.name for _b, r in budgeted_layers(model, CompressConfig(target_bits=3))
             if r.name.endswith("down_proj")]
    assert downs and all(r.get_weight().shape[1] == 384 for _b, r in budgeted_layers(
        model, CompressConfig(target_bits=3)) if r.name in downs)
    target = 3.4
    report = _run(model, target_bits=target, budget_menu="16,8g128,4g128,3g128,2g128",
                  budget_layout=layout, profile_rows=1.0)
    b = report.budget
    size = model_bytes(model, layout=layout)
    assert size["compressed_bytes"] == b.summary["bytes (budgeted layers)"]
    assert 0.98 * target <= size["bits_per_weight"] <= target
    down = b.layers.set_index("layer").loc[downs]
    quantized = down[down["bits"] < 16]
    assert len(quantized)  # a down_proj at g128: its zero points are int8, as stored
    for name, row in quantized.iterrows():
        s = next(c for c in b.plan.layers if c.name == name)
        rows = s.rows
        assert row["bytes"] == rows * 384 * row["bits"] / 8 + rows * 3 * 2 + rows * 3 + 16
    on_disk = _check_saved(model, report, tmp_path, layout, "p")
    assert on_disk == size["bytes"]


def test_profile_is_the_sweeps_solver_and_hessian():
    """With all rows and no windows held out, the profiled error of the first group of block 0
    (the same inputs in the profile and the sweep) equals the sweep's error with the chosen
    option, exactly."""
    model = tiny_model("llama")
    cfg = CompressConfig(target_bits=3.0, profile_rows=1.0, calibration=random_ids(N, L),
                         nsamples=N, seqlen=L, verbose=False, profile_holdout=0.0)
    prof = profile_layers(model, random_ids(N, L), cfg, device="cpu", verbose=False)
    report = compress(model, config=cfg, profile=prof)
    b = report.budget
    first = b.layers[b.layers["block"] == 0].iloc[:3]  # q, k, v: read the embeddings' output
    assert list(first["layer"].str.rsplit(".", n=1).str[-1]) == ["q_proj", "k_proj", "v_proj"]
    for _, row in first.iterrows():
        if row["bits"] != 16:
            assert row["error"] == pytest.approx(row["profile_error"], rel=1e-5)


def test_profile_grids_in_batches_give_the_same_errors(monkeypatch):
    """The profile solves a group's grids in sweeps of at most GRID_ROWS rows: one layer per
    sweep gives the same errors as all grids in one sweep (to float32 rounding)."""
    import toolkit.walk.budget as budget_mod

    model = tiny_model("llama", hidden=128)
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.0, profile_rows=1.0,
                         budget_menu="16,8g128,5g128,4g64,4g32,3g128,2g64")
    whole = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    monkeypatch.setattr(budget_mod, "GRID_ROWS", 1)
    split = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    a, b = whole.table(), split.table()
    measured = a["option"] != "16"
    assert measured.sum() == 6 * len(whole.layers)
    assert (a["error"][measured] > 0).all()
    np.testing.assert_allclose(b["error"], a["error"], rtol=1e-4)
    np.testing.assert_allclose(b["weighted_error"], a["weighted_error"], rtol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_profile_queues_blocks_bit_for_bit(monkeypatch, act_order):
    """The same group of several blocks swept in one column loop (the queue) gives the profile
    of one sweep per group, bit for bit; a queue that holds nothing (GRID_QUEUE_BYTES = 0) and
    one that holds every block agree, with and without act-order + static groups."""
    import toolkit.walk.budget as budget_mod

    model = tiny_model("llama", hidden=128)
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.0, budget_menu="16,8g128,4g64,3g128,2g64",
                         act_order=act_order, static_groups=act_order)
    calls = []
    real = budget_mod.solve_grids_many
    monkeypatch.setattr(budget_mod, "solve_grids_many",
                        lambda problems, **kw: calls.append(len(problems)) or real(problems, **kw))
    together = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    assert max(calls) == len(find_blocks(model)[1])  # each group of every block at once
    calls.clear()
    monkeypatch.setattr(budget_mod, "GRID_QUEUE_BYTES", 0)
    alone = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    assert max(calls) == 1
    assert together.errors == alone.errors and together.weighted == alone.weighted


def test_profile_rows_scale_the_error():
    """A row subset gives an estimate of the same error (scaled to the whole layer)."""
    model = tiny_model("llama", hidden=128)
    ids = random_ids(N, L)
    full = profile_layers(model, ids, CompressConfig(target_bits=3.0, profile_rows=1.0,
                                                     budget_menu="16,4g128,3g128"),
                          device="cpu", verbose=False)
    part = profile_layers(model, ids, CompressConfig(target_bits=3.0, profile_rows=0.5,
                                                     budget_menu="16,4g128,3g128"),
                          device="cpu", verbose=False)
    a, b = full.table(), part.table()
    assert list(a["option"]) == list(b["option"])
    quant = a["option"] != "16"
    ratio = (b["error"][quant] / a["error"][quant])
    assert 0.6 < ratio.median() < 1.4  # an estimate, not the same number
    assert not (ratio == 1).all()


def test_bad_targets_name_the_range_and_change_nothing():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"below the smallest.*achievable range is 2\.\d+ \.\. "
                                         r"16 bits per weight"):
        _run(model, target_bits=1.5)
    with pytest.raises(ValueError, match=r"above the largest.*achievable range"):
        _run(model, target_bits=17)
    with pytest.raises(ValueError, match=r"target_size=1,000 bytes is below.*bytes of dense"):
        _run(model, target_size=1000)
    with pytest.raises(ValueError, match="either target_bits or target_size"):
        _run(model, target_bits=3, target_size="1MB")
    with pytest.raises(ValueError, match="do not give bits=4"):
        _run(model, target_bits=3, bits=4)
    with pytest.raises(ValueError, match="allocation='owl'.*use budget_layout='compact'"):
        _run(model, target_bits=3, allocation="owl")
    with pytest.raises(ValueError, match="allocation='owl'.*this menu has none"):
        _run(model, target_bits=3, allocation="owl", budget_layout="compact",
             budget_menu="4g128,2:4+4g128,3g128")
    with pytest.raises(ValueError, match="method='sparsegpt'"):
        _run(model, target_bits=3, quant="rtn")
    with pytest.raises(ValueError, match="pattern.*act_order|act_order"):
        _run(model, target_bits=3, act_order=True, budget_menu="4g128,2:4+4g128")
    with pytest.raises(ValueError, match="only used with target"):
        _run(model, bits=4, profile=object())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(hasattr(m, "compression") for m in model.modules())


def test_reused_profile_must_match():
    model = tiny_model("llama")
    kw = dict(target_bits=4.0, budget_menu="16,4g128,3g128")
    prof = profile_layers(model, random_ids(N, L), CompressConfig(**kw), device="cpu",
                          verbose=False)
    other = tiny_model("llama", seed=1)
    for call in (lambda: _run(other, profile=prof, **kw),
                 lambda: _run(copy.deepcopy(model), profile=prof, percdamp=0.1, **kw),
                 lambda: _run(copy.deepcopy(model), profile=prof, profile_holdout=0.0, **kw),
                 lambda: compress(copy.deepcopy(model), calibration=random_ids(N, L, seed=5),
                                  nsamples=N, seqlen=L, verbose=False, profile=prof, **kw)):
        with pytest.raises(ValueError, match="another model, calibration or settings"):
            call()
    _run(model, profile=prof, **kw)  # the same model, calibration and settings: reused


def test_overrides_and_ignore_shape_the_choices():
    model = tiny_model("llama")
    cfg = CompressConfig(target_bits=4.0, ignore=("k_proj",), overrides={"down_proj": {"bits": 8}},
                         budget_menu="16,4g128,3g128")
    choices = {c.name: c for c in layer_choices(model, cfg)}
    assert not any(n.endswith("k_proj") for n in choices)
    assert len(choices) == len(budgeted_layers(model, cfg)) == 12
    down = choices["model.layers.0.mlp.down_proj"]
    assert down.specs == ["8g128"] and "4g128" in down.skipped  # bits fixed by the override
    report = _run(model, target_bits=5.0, ignore=("k_proj",), overrides={"down_proj": {"bits": 8}},
                  budget_menu="16,4g128,3g128")
    chosen = report.budget.layers.set_index("layer")
    assert (chosen.loc[[n for n in choices if "down_proj" in n], "bits"] == 8).all()
    assert not any(n.endswith("k_proj") for n in report.layers["layer"])


def test_output_sensitivity_matches_autograd():
    """f_i = mean over tokens of (dL/dy_i)^2, against retain_grad on the outputs with the
    parameters requiring gradients as usual; the model's flags and gradients are left alone."""
    from toolkit.walk.budget import output_sensitivity

    model = tiny_model("llama")
    ids = random_ids(3, 16)
    refs = [r for _b, r in budgeted_layers(model, CompressConfig(target_bits=4))]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    got = output_sensitivity(model, ids, refs)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model)
    names = {id(m): n for n, m in ref.named_modules()}
    sums = {r.name: 0.0 for r in refs}
    per_token = {r.name: [] for r in refs}
    for row in ids:
        outs = {}

        def grab(m, _i, out, outs=outs):
            out.retain_grad()
            outs[names[id(m)]] = out
        handles = [m.register_forward_hook(grab) for n, m in ref.named_modules() if n in sums]
        ref(row[None], labels=row[None], use_cache=False).loss.backward()
        for h in handles:
            h.remove()
        for n, out in outs.items():
            g2 = out.grad.pow(2).reshape(-1, out.shape[-1])
            sums[n] = sums[n] + g2.sum(0)
            per_token[n].append(g2.mean(1))
    for n, s in sums.items():
        torch.testing.assert_close(got[n].channel, s / ids.numel(), rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(got[n].token, torch.cat(per_token[n]), rtol=1e-4,
                                   atol=1e-12)
        assert got[n].token.shape == (ids.numel(),)
        assert float(got[n].channel.sum()) > 0
        assert float(got[n].token[-1]) == 0  # the last position predicts nothing


def test_fisher_metric_weights_rows():
    """The weighted error of each layer and option is sum_i f_i (dW H dW^T)_ii: equal to the
    plain error when every f_i is the same, and the plan under 'fisher' uses it."""
    model = tiny_model("llama")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=4.0, profile_rows=1.0, budget_metric="fisher",
                         budget_menu="16,4g128,3g128,2g128")
    prof = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    assert prof.weighted is not None and prof.sensitivity_seconds > 0
    t = prof.table()
    quant = t["option"] != "16"
    assert (t.loc[quant, "weighted_error"] > 0).all()
    # a layer's options are ranked alike by both (more bits, less error) but the weights differ
    ratio = t.loc[quant, "weighted_error"] / t.loc[quant, "error"]
    assert ratio.groupby(t.loc[quant, "layer"]).std().max() < 0.5 * ratio.mean()
    assert ratio.groupby(t.loc[quant, "layer"]).mean().std() > 0
    plain = profile_layers(model, ids, replace_metric(cfg, "relative"), device="cpu",
                           verbose=False)
    assert plain.weighted is None
    with pytest.raises(ValueError, match="needs a profile measured with the loss gradients"):
        plan_budget(plain, target_bits=4.0, metric="fisher")
    report = compress(model, config=replace_metric(cfg, "fisher", calibration=ids, nsamples=N,
                                                   seqlen=L, verbose=False), profile=prof)
    assert report.budget.plan.metric == "fisher"


def replace_metric(cfg, metric, **kw):
    from dataclasses import replace

    return replace(cfg, budget_metric=metric, **kw)


@pytest.mark.parametrize("holdout", [0.0, 0.5, 0.25])
def test_fisher_weighted_error_from_first_principles(holdout):
    """Block 0's q_proj: the profile's weighted error equals
    2/n sum_t sum_i channel_i / mean(channel) * token_t * ((W - W_hat) x_t)_i^2 and its plain
    error 2/n sum_t ||(W - W_hat) x_t||^2, computed here from the layer's own inputs, the
    gradients and a separate solve. Without a holdout, W_hat is solved with the Hessian of all
    windows and the sums run over all tokens; with one, W_hat is solved with the Hessian of the
    first windows only and the sums run over the held-out last ``round(holdout * N)`` windows
    (tokens n of them), the energy too."""
    from toolkit.solver.layer import solve
    from toolkit.walk.budget import output_sensitivity

    model = tiny_model("llama")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=4.0, profile_rows=1.0, budget_metric="fisher",
                         budget_menu="16,3g128,50%+4g128", profile_holdout=holdout,
                         budget_layout="compact")
    prof = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    held = round(holdout * N)
    assert prof.holdout == held
    name = "model.layers.0.self_attn.q_proj"
    i = [c.name for c in prof.layers].index(name)
    ref = {r.name: r for _b, r in budgeted_layers(model, cfg)}[name]
    xs = []
    h = ref.module.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for row in ids:
            model(row[None], use_cache=False)
    h.remove()
    fit, measure = (xs, xs) if not held else (xs[:N - held], xs[N - held:])
    X_fit, X = torch.cat(fit).double(), torch.cat(measure).double()
    n = X.shape[0]
    H_fit = (2 / X_fit.shape[0] * X_fit.T @ X_fit).float()
    W = ref.get_weight().detach().clone()
    # the gradients of the measuring windows alone: token and channel weights of those tokens
    sens = output_sensitivity(model, ids[N - held:] if held else ids, [ref])[name]
    token = sens.token.double()
    assert token.shape == (n,)
    if held:  # the channel weights of every window would give another value
        every = output_sensitivity(model, ids, [ref])[name].channel
        assert not torch.allclose(every / every.mean(), sens.channel / sens.channel.mean(),
                                  rtol=1e-2)
    for spec, kw in [("3g128", dict(bits=3, group_size=128)),
                     ("50%+4g128", dict(sparsity=0.5, bits=4, group_size=128))]:
        W_hat = solve(W, H_fit, **kw).weight
        E = (W - W_hat).double() @ X.T  # rows x tokens
        expect = 2 / n * float(((sens.channel / sens.channel.mean()).double()[:, None]
                                * token[None, :] * E.pow(2)).sum())
        k = prof.layers[i].specs.index(spec)
        assert prof.weighted[i][k] == pytest.approx(expect, rel=1e-3)
        assert prof.errors[i][k] == pytest.approx(2 / n * float(E.pow(2).sum()), rel=1e-3)
    assert prof.energy[i] == pytest.approx(
        2 / n * float((W.double() @ X.T).pow(2).sum()), rel=1e-6)


def test_single_window_profile_says_it_holds_nothing_out(caplog):
    model = tiny_model("llama")
    cfg = CompressConfig(target_bits=4.0, budget_menu="16,4g128,3g128", profile_holdout=0.5)
    with caplog.at_level("WARNING", logger="toolkit"):
        prof = profile_layers(model, random_ids(1, L), cfg, device="cpu", verbose=False)
    assert prof.holdout == 0
    assert "single window, none to hold out" in caplog.text


def test_holdout_windows():
    from toolkit.plan.budget import holdout_windows

    assert holdout_windows(8, 0.5) == [4, 5, 6, 7]
    assert holdout_windows(8, 0.25) == [6, 7]
    assert holdout_windows(8, 0.01) == [7]       # at least one window
    assert holdout_windows(2, 0.9) == [1]        # at least one to solve with
    assert holdout_windows(1, 0.5) == []         # a single window: nothing to hold out
    assert holdout_windows(8, 0.0) == []
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"profile_holdout must be a fraction in \[0, 1\)"):
            CompressConfig(target_bits=3.0, profile_holdout=bad)


def test_plan_preview_is_the_model_with_the_profiled_errors_in_place(monkeypatch):
    """The preview adds to each layer's output its stand-in error scaled to the profiled one:
    the same logits as a copy whose weights are ``W + c dW`` (``dW`` the stand-in's error,
    ``c`` making ``||c dW X||^2 / ||W X||^2`` on the guard windows the profile's relative
    error), the dense logits in the measuring pass, and the model left as it was."""
    import toolkit.walk.budget as wb
    from toolkit.measure.perplexity import perplexity
    from toolkit.model.layers import find_blocks, find_linears

    seen = []

    def logits_ppl(model, tok, ids, seqlen, verbose=False, **kw):  # keeps what the model said
        with torch.no_grad():
            seen.append(model(ids, use_cache=False).logits.double())
        return perplexity(model, tok, ids, seqlen=seqlen, verbose=False)

    monkeypatch.setattr(wb, "perplexity", logits_ppl)
    model = tiny_model("llama")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.0)
    prof = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    plan = plan_budget(prof, target_bits=3.0)
    name, blocks = find_blocks(model)
    refs = {r.name: r for b, blk in enumerate(blocks) for r in find_linears(blk, f"{name}.{b}")}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = ids[-wb.GUARD_WINDOWS:]
    preview = wb.PlanPreview(model, guard, prof, refs)
    got = preview.perplexity(plan.choice)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not r.module._forward_hooks for r in refs.values())
    assert preview.dense == pytest.approx(perplexity(model, None, guard, seqlen=L,
                                                     verbose=False), rel=1e-6)
    # the inputs each layer sees in the dense model, to compute the scales independently
    xs = {n: [] for n in refs}
    hooks = [r.module.register_forward_hook(lambda m, a, o, n=n: xs[n].append(a[0].detach()))
             for n, r in refs.items()]
    perplexity(model, None, guard, seqlen=L, verbose=False)
    for h in hooks:
        h.remove()
    ref_model = copy.deepcopy(model)
    _n, ref_blocks = find_blocks(ref_model)
    ref_refs = {r.name: r for b, blk in enumerate(ref_blocks)
                for r in find_linears(blk, f"{_n}.{b}")}
    index = {c.name: i for i, c in enumerate(prof.layers)}
    active = 0
    for n, k in plan.choice.items():
        i = index[n]
        s = prof.layers[i].settings[k]
        if not s.active:
            continue
        active += 1
        w = refs[n].get_weight().float()
        d = wb._stand_in_delta(w, s)
        x = torch.cat(xs[n]).reshape(-1, w.shape[1]).float()
        rel = float((x @ d.T).pow(2).sum() / (x @ w.T).pow(2).sum())
        assert preview.rel[(n, k)] == pytest.approx(rel, rel=1e-4)
        c = math.sqrt(prof.errors[i][k] / prof.energy[i] / rel)
        ref_refs[n].set_weight(w + c * d)
    assert active >= len(plan.choice) // 2
    want = perplexity(ref_model, None, guard, seqlen=L, verbose=False)
    assert got == pytest.approx(want, rel=1e-6)
    dense, previewed = seen
    with torch.no_grad():
        expect = ref_model(guard, use_cache=False).logits.double()
        plain = model(guard, use_cache=False).logits.double()
    assert torch.allclose(dense, plain, rtol=0, atol=1e-9)
    moved = float((previewed - dense).abs().max())
    assert float((previewed - expect).abs().max()) <= 1e-4 * moved  # exact but float order


def _bits_preview(threshold, good=1.5, bad=10.0):
    """A stand-in for PlanPreview.perplexity: ``good`` x dense when the plan takes at least
    ``threshold`` bits per weight (standard layout), else ``bad`` x."""
    def fake(self, choice):
        self.dense = 10.0
        layers = self.profile.layers
        bits = 8 * sum(c.option_bytes(choice[c.name], "standard") for c in layers) / \
            sum(c.params for c in layers)
        return 10.0 * (good if bits >= threshold else bad)
    return fake


def test_budget_guard_refuses_a_plan_predicted_to_break_the_model(monkeypatch):
    """A plan whose preview exceeds ``budget_guard`` stops before any weight changes, naming
    the smallest target whose plan's preview stays within the guard (found by bisection);
    when no size of the menu is predicted sane, the message says so."""
    import toolkit.walk.budget as wb

    monkeypatch.setattr(wb.PlanPreview, "perplexity", _bits_preview(3.1))
    monkeypatch.setattr(wb, "perplexity", lambda *a, **k: 12.0)  # the measured guard passes
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(wb.BudgetCollapseError) as e:
        _run(model, target_bits=2.6)
    msg = str(e.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "target_bits=2.6: the plan is predicted to break the model" in msg
    assert "(10x, more than budget_guard=3x" in msg and "No weight was changed" in msg
    assert "budget_guard=None" in msg and "(predicted 1.5x)" in msg
    hint = float(msg.split("target_bits >= ")[1].split(" ")[0])
    assert hint >= 3.1
    report = _run(copy.deepcopy(model), target_bits=hint)  # the hint itself passes the check
    assert report.budget.summary["guard perplexity predicted"] == 15.0
    # the bisection got close: 8 halvings of 2.6 .. 16 bits, plus the knapsack's granularity
    prof = report.budget.profile
    layers = prof.layers
    params = sum(c.params for c in layers)
    below = plan_budget(prof, target_bits=hint - 0.07)
    assert 8 * sum(c.option_bytes(below.choice[c.name], "standard") for c in layers) / \
        params < 3.1
    with pytest.raises(wb.BudgetCollapseError, match=r"target_size >= \d+\.\dMB"):
        _run(copy.deepcopy(model), target_size=int(prof.dense_rest + 2.6 * params / 8))
    monkeypatch.setattr(wb.PlanPreview, "perplexity", _bits_preview(99.0))
    with pytest.raises(wb.BudgetCollapseError, match="even the largest size this menu reaches "
                       "is predicted at 10x: add larger options to budget_menu"):
        _run(copy.deepcopy(model), target_bits=4.0)
    # forced; the profile measured with the guard on serves a call with it off
    report = _run(copy.deepcopy(model), target_bits=2.6, budget_guard=None, profile=prof)
    assert report.budget.summary["guard perplexity predicted"] is None


def test_budget_guard_stops_a_plan_that_breaks_the_model(monkeypatch):
    """A plan whose compressed model's perplexity on the last calibration windows exceeds
    ``budget_guard`` times the dense model's stops with an error naming the ratio, the 2-bit
    layers and a target that keeps 3 bits everywhere; None turns the check off. (The
    perplexities are set here: a tiny random model does not break reliably; SmolLM2 at 2.6 bits
    did, 38.8 -> 6,385 on WikiText-2, data/results/budget_smollm2.csv.)"""
    import toolkit.walk.budget as wb

    seen = []

    def fake_ppl(model, tok, ids, seqlen, verbose=False, **kw):
        seen.append(ids.clone())  # the preview's two passes (dense, predicted), then after
        return 10.0 if len(seen) <= 2 else 100.0

    monkeypatch.setattr(wb, "perplexity", fake_ppl)
    model = tiny_model("llama")
    with pytest.raises(wb.BudgetCollapseError) as e:
        _run(model, target_bits=2.6)
    msg = str(e.value)
    assert "target_bits=2.6: the plan broke the model" in msg and "(10x, more than " \
        "budget_guard=3x)" in msg and "reload it" in msg and "budget_guard=None" in msg
    hint = float(msg.split("target_bits >= ")[1].split(" ")[0])
    assert 3.0 <= hint <= 3.6  # every layer's cheapest >= 3-bit option, with its grid params
    assert len(seen) == 3 and all(torch.equal(seen[0], x) for x in seen)
    assert seen[0].shape == (wb.GUARD_WINDOWS, L)  # the last calibration windows
    assert torch.equal(seen[0], random_ids(N, L)[-wb.GUARD_WINDOWS:])
    seen.clear()
    report = _run(tiny_model("llama"), target_bits=2.6, budget_guard=None)
    assert not seen and report.budget is not None
    seen.clear()
    _run(tiny_model("llama"), target_bits=2.6, budget_guard=20)  # 10x is within 20x
    assert len(seen) == 3
    for bad in (1, 0.5, "3", True):
        with pytest.raises(ValueError, match="budget_guard must be a number > 1"):
            CompressConfig(target_bits=3, budget_guard=bad)
