"""The local search after the knapsack (``budget_search``): it keeps the budget, keeps a change
only when the preview's perplexity drops, and its plan is what the sweep applies."""

from __future__ import annotations

import pytest
from conftest import random_ids, tiny_model

from toolkit import CompressConfig, compress
from toolkit.plan.budget import frontier, plan_budget
from toolkit.walk.budget import PlanPreview, profile_layers, search_plan

N, L = 8, 32
MENU = "16,8g32,4g32,3g32,2g32"


@pytest.fixture(scope="module")
def profiled():
    model = tiny_model("llama")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.5, budget_menu=MENU, budget_metric="relative")
    return model, ids, profile_layers(model, ids, cfg, device="cpu", verbose=False)


class _Fake:
    """A preview whose perplexity is a known function of the plan: the sum over layers of a
    hidden cost per option that the knapsack's values do not know (every layer of block 1 hurts
    ten times what its profiled error says)."""

    def __init__(self, prof):
        self.prof, self.calls = prof, 0
        self.index = {c.name: i for i, c in enumerate(prof.layers)}

    def perplexity(self, choice):
        self.calls += 1
        total = 0.0
        for n, k in choice.items():
            i = self.index[n]
            e = self.prof.errors[i][k] / self.prof.energy[i]
            total += e * (10.0 if self.prof.layers[i].block == 1 else 1.0)
        return 10.0 + total


def test_search_keeps_the_budget_and_only_improvements(profiled):
    _model, _ids, prof = profiled
    plan = plan_budget(prof, target_bits=3.5, metric="relative")
    fake = _Fake(prof)
    res = search_plan(fake, prof, plan.choice, plan.budget, "standard", "relative", 60, seed=1)
    assert fake.calls <= 61
    assert res.history[0] == fake.perplexity(plan.choice)
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))  # never worse
    assert res.history[-1] == fake.perplexity(res.choice)
    assert res.kept >= 3 and res.history[-1] < 0.99 * res.history[0]
    spent = sum(c.option_bytes(res.choice[c.name], "standard") for c in prof.layers)
    assert spent <= plan.budget + 1e-6
    # it moved bytes towards the block whose errors the values underrate
    def bytes_in(choice, block):
        return sum(c.option_bytes(choice[c.name], "standard") for c in prof.layers
                   if c.block == block)
    assert bytes_in(res.choice, 1) > bytes_in(plan.choice, 1)
    # every choice stays on its layer's frontier; no steps: the knapsack's plan
    for i, c in enumerate(prof.layers):
        assert res.choice[c.name] in [k for _b, _v, k in frontier(prof, i, "standard",
                                                                   "relative")]
    same = search_plan(_Fake(prof), prof, plan.choice, plan.budget, "standard", "relative", 0)
    assert same.choice == plan.choice and same.kept == 0


def test_search_with_the_real_preview_and_in_compress(profiled):
    """With the preview itself, the searched plan's preview perplexity is the history's last
    value; ``compress(budget_search=...)`` applies that plan, keeps the budget and reports it."""
    model, ids, prof = profiled
    plan = plan_budget(prof, target_bits=3.5, metric="relative")
    refs = {r.name: r for r in (c for c in _refs(model))}
    preview = PlanPreview(model, ids[-4:], prof, refs)
    res = search_plan(preview, prof, plan.choice, plan.budget, "standard", "relative", 6,
                      seed=0)
    assert res.history[-1] == pytest.approx(preview.perplexity(res.choice), rel=1e-9)
    m = tiny_model("llama")
    rep = compress(m, calibration=ids, nsamples=N, seqlen=L, verbose=False, target_bits=3.5,
                   budget_menu=MENU, budget_metric="relative", budget_search=6, profile=None)
    b = rep.budget
    assert b.summary["budget search"].startswith("6 steps")
    assert b.summary["bits/weight (budgeted)"] <= 3.5 and b.replans == 0
    again = compress(tiny_model("llama"), calibration=ids, nsamples=N, seqlen=L, verbose=False,
                     target_bits=3.5, budget_menu=MENU, budget_metric="relative",
                     budget_search=6, profile=b.profile)  # the search does not change the profile
    assert again.budget.plan.choice == b.plan.choice
    with pytest.raises(ValueError, match="budget_search must be an integer >= 0"):
        CompressConfig(target_bits=3.5, budget_search=-1)


def _refs(model):
    from toolkit.plan.budget import budgeted_layers
    return [r for _b, r in budgeted_layers(model, CompressConfig(target_bits=3.5))]


def test_preview_keeps_stand_ins_between_passes(profiled, monkeypatch):
    """The stand-ins are computed once per (layer, option) while they fit the cache, and not at
    all past it (then once per pass and window, as before)."""
    import toolkit.walk.budget as wb

    model, ids, prof = profiled
    plan = plan_budget(prof, target_bits=3.5, metric="relative")
    refs = {r.name: r for r in _refs(model)}
    calls = []
    real = wb._stand_in_delta
    monkeypatch.setattr(wb, "_stand_in_delta", lambda w, s: calls.append(1) or real(w, s))
    preview = PlanPreview(model, ids[-4:], prof, refs)
    first = preview.perplexity(plan.choice)
    n = len(calls)
    active = sum(1 for c in prof.layers if c.settings[plan.choice[c.name]].active)
    assert n == active
    assert preview.perplexity(plan.choice) == first and len(calls) == n
    monkeypatch.setattr(wb, "PREVIEW_CACHE_BYTES", 0)
    small = PlanPreview(model, ids[-4:], prof, refs)
    assert small.perplexity(plan.choice) == pytest.approx(first, rel=1e-12)
    assert len(calls) > 2 * n


class _KindLoss:
    """A preview whose log-perplexity is a known weighted sum: each kind's summed values times
    the kind's weight (weight 0 for o_proj: its errors cost nothing)."""

    WEIGHTS = {"q_proj": 2.0, "k_proj": 0.5, "v_proj": 3.0, "o_proj": 0.0, "gate_proj": 1.0,
               "up_proj": 4.0, "down_proj": 0.25}

    def __init__(self, prof):
        from toolkit.plan.budget import option_values
        self.values = {c.name: option_values(prof, i, "relative")
                       for i, c in enumerate(prof.layers)}

    def perplexity(self, choice):
        import math
        return math.exp(sum(self.WEIGHTS[n.rsplit(".", 1)[-1]] * self.values[n][k]
                            for n, k in choice.items()))


def test_calibrated_factors_recover_each_kinds_weight(profiled):
    """On a loss that is a weighted sum per kind, each kind's factor is its weight exactly; a
    kind whose errors cost nothing takes the median factor of the others; the scales reach the
    plan (uniform scales change nothing; one kind scaled up gets more bytes)."""
    from toolkit.walk.budget import calibrate_scales

    _model, ids, prof = profiled
    cal = calibrate_scales(_KindLoss(prof), prof, "standard", "relative")
    w = _KindLoss.WEIGHTS
    for kind, (_m, _p, f) in cal.kinds.items():
        if w[kind] > 0:
            assert f == pytest.approx(w[kind], rel=1e-9), kind
    assert cal.kinds["o_proj"][2] == pytest.approx(sorted(v for v in w.values() if v > 0)[3])
    assert cal.scales[prof.layers[0].name] == cal.kinds[prof.layers[0].name.rsplit(".", 1)[-1]][2]
    base = plan_budget(prof, target_bits=3.5, metric="relative")
    same = plan_budget(prof, target_bits=3.5, metric="relative",
                       scales={c.name: 7.0 for c in prof.layers})
    assert same.choice == base.choice
    up = plan_budget(prof, target_bits=3.5, metric="relative",
                     scales={c.name: 50.0 if c.name.endswith("down_proj") else 1.0
                             for c in prof.layers})

    def down_bytes(plan):
        return sum(c.option_bytes(plan.choice[c.name], "standard") for c in prof.layers
                   if c.name.endswith("down_proj"))
    assert down_bytes(up) > down_bytes(base)
    m = tiny_model("llama")
    rep = compress(m, calibration=ids, nsamples=N, seqlen=L, verbose=False, target_bits=3.5,
                   budget_menu=MENU, budget_metric="relative", budget_calibrate=True)
    line = rep.budget.summary["budget calibration"]
    assert "q_proj x" in line and "down_proj x" in line
    assert rep.budget.summary["bits/weight (budgeted)"] <= 3.5
