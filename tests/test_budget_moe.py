"""Compress to a size on mixture-of-experts models and with OWL: every expert is a budgeted layer
whose error counts in proportion to the tokens routed to it, the loss-gradient weights follow
each expert's own outputs, the plan's preview covers the experts, and ``allocation="owl"``
shifts each block's pruned options."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_moe

from toolkit import CompressConfig, compress, load_compressed, save_compressed
from toolkit.checkpoint.size import model_bytes
from toolkit.model.experts import RECORDS, ExpertRef, is_expert
from toolkit.plan.budget import budgeted_layers, layer_choices, option_values, plan_budget
from toolkit.walk.budget import output_sensitivity, profile_layers

N, L = 8, 32
MENU = "16,4g32,3g32,2g32,50%+4g32"


def _routed(model, ids) -> list[dict[int, int]]:
    """Per block, the tokens of ``ids`` the dense model's router sends each expert (top-k of the
    router logits transformers returns), computed apart from the toolkit."""
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        logits = model(ids, output_router_logits=True, use_cache=False).router_logits
    out = []
    for lg in logits:
        top = lg.reshape(-1, lg.shape[-1]).topk(k, dim=-1).indices.flatten()
        out.append({e: int((top == e).sum()) for e in range(lg.shape[-1])})
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_target_bits_plans_every_expert_within_the_budget(family, tmp_path):
    """Every expert's matrices are budgeted layers with a choice of their own; the model ends
    within the budget, counted as stored, and the checkpoint loads back to the same logits."""
    model = tiny_moe(family)
    ids = random_ids(N, L)
    cfg = dict(target_bits=3.5, budget_layout="compact", budget_menu=MENU)
    names = [r.name for _b, r in budgeted_layers(model, CompressConfig(**cfg))]
    slices = [r for _b, r in budgeted_layers(model, CompressConfig(**cfg)) if is_expert(r)]
    assert len(slices) == 2 * 4 * 3  # 2 blocks x 4 experts x gate, up, down
    rep = compress(model, calibration=ids, nsamples=N, seqlen=L, verbose=False, **cfg)
    b = rep.budget
    assert list(b.layers["layer"]) == names
    spent = b.summary["bytes (budgeted layers)"]
    assert spent <= b.summary["budget bytes (layers)"] + 1e-6
    assert b.summary["bits/weight (budgeted)"] <= 3.5
    assert 8 * spent / sum(c.params for c in b.plan.layers) == pytest.approx(
        model_bytes(model, layout="compact")["bits_per_weight"], rel=1e-12)
    # each slice's record says what the plan chose for it
    for r in slices:
        assert r.get_record().settings == b.plan.settings(r.name), r.name
    assert len({b.plan.spec(r.name) for r in slices}) >= 2  # not one setting for all
    with torch.no_grad():
        want = model(ids[:2]).logits
    out = save_compressed(model, tmp_path / "m", layout="compact")
    loaded = load_compressed(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, want)


def test_expert_share_is_its_routed_fraction_of_the_measuring_windows():
    """``profile.share``: 1 for every layer outside the experts, and for each expert the
    tokens of the held-out windows the dense router sends it over all their tokens."""
    model = tiny_moe("mixtral")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.5, budget_layout="compact", budget_menu=MENU,
                         budget_metric="relative")
    prof = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    held = ids[N - prof.holdout:]
    assert prof.holdout == N // 2
    routed = _routed(model, held)
    for c, share in zip(prof.layers, prof.share):
        if ".experts." not in c.name:
            assert share == 1.0, c.name
            continue
        expert = int(c.name.split(".experts.")[1].split(".")[0])
        assert share == routed[c.block][expert] / held.numel(), c.name
    assert sum(s for c, s in zip(prof.layers, prof.share)
               if c.block == 0 and c.name.endswith("down_proj")) == pytest.approx(2.0)  # top-2
    table = prof.table().drop_duplicates("layer").set_index("layer")["share"]
    assert [table[c.name] for c in prof.layers] == prof.share


def test_values_scale_with_the_share_and_an_unreached_expert_takes_the_cheapest():
    model = tiny_moe("mixtral")
    cfg = CompressConfig(target_bits=3.0, budget_layout="standard", budget_menu=MENU,
                         budget_metric="relative")
    prof = profile_layers(model, random_ids(N, L), cfg, device="cpu", verbose=False)
    i = max((j for j, c in enumerate(prof.layers) if c.name.endswith("down_proj")
             and ".experts." in c.name), key=lambda j: prof.share[j])  # the busiest expert
    c = prof.layers[i]
    en = prof.energy[i]
    assert option_values(prof, i, "relative") == [e / en * prof.share[i] for e in prof.errors[i]]
    assert option_values(prof, i, "raw") == [e * prof.share[i] for e in prof.errors[i]]
    base = plan_budget(prof, target_bits=4.5, metric="relative")
    cheapest = min(range(len(c.specs)), key=lambda k: c.option_bytes(k, "standard"))
    assert base.choice[c.name] != cheapest  # with its tokens it is worth more than the least
    alone = copy.copy(prof)
    alone.share = list(prof.share)
    alone.share[i] = 0.0  # no token reaches it: its error costs the model nothing
    assert plan_budget(alone, target_bits=4.5, metric="relative").choice[c.name] == cheapest


def test_expert_loss_gradients_follow_each_experts_own_outputs():
    """The sensitivity of an expert layer comes from the gradients at its own output: one per
    routed token, in every window; a fused gate/up pair gets one row set each."""
    model = tiny_moe("mixtral")
    ids = random_ids(4, 16)
    refs = [r for _b, r in budgeted_layers(model, CompressConfig(target_bits=3.0))]
    sens = output_sensitivity(model, ids, refs)
    routed = _routed(model, ids)
    name = refs[0].name.rsplit(".layers.", 1)[0]
    for r in refs:
        s = sens[r.name]
        assert s.channel.shape == (r.get_weight().shape[0],)
        assert torch.isfinite(s.channel).all() and bool((s.channel >= 0).all())
        if is_expert(r):
            b = int(r.name[len(name) + len(".layers."):].split(".")[0])
            assert s.token.numel() == routed[b][r.expert], r.name
        else:
            assert s.token.numel() == ids.numel(), r.name
    # gate and up of one expert read the same input but answer to different gradients
    gate = sens[f"{name}.layers.0.mlp.experts.0.gate_proj"].channel
    up = sens[f"{name}.layers.0.mlp.experts.0.up_proj"].channel
    assert not torch.equal(gate, up) and float(gate.sum()) > 0 and float(up.sum()) > 0


def test_plan_preview_writes_expert_slices_and_restores_them():
    """For fused expert slices the preview writes ``W + c dW`` for its pass and puts the weights
    back bit for bit; its perplexity is that of a copy with every layer's ``W + c dW`` written
    (``c`` from the relative errors it measured), and the guard refuses or passes as usual."""
    import toolkit.walk.budget as wb
    from toolkit.measure.perplexity import perplexity

    model = tiny_moe("mixtral")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.0, budget_layout="standard", budget_menu=MENU)
    prof = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    plan = plan_budget(prof, target_bits=3.0)
    refs = {r.name: r for _b, r in budgeted_layers(model, cfg)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = ids[-wb.GUARD_WINDOWS:]
    preview = wb.PlanPreview(model, guard, prof, refs)
    got = preview.perplexity(plan.choice)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(getattr(m, RECORDS, None) for m in model.modules())
    ref_model = copy.deepcopy(model)
    ref_refs = {r.name: r for _b, r in budgeted_layers(ref_model, cfg)}
    index = {c.name: i for i, c in enumerate(prof.layers)}
    experts_moved = 0
    for n, k in plan.choice.items():
        i = index[n]
        s = prof.layers[i].settings[k]
        if not s.active or preview.rel[(n, k)] <= 0:
            continue
        w = refs[n].get_weight().float()
        c = math.sqrt(prof.errors[i][k] / prof.energy[i] / preview.rel[(n, k)])
        ref_refs[n].set_weight(w + c * wb._stand_in_delta(w, s))
        experts_moved += isinstance(refs[n], ExpertRef)
    assert experts_moved >= 12
    want = perplexity(ref_model, None, guard, seqlen=L, verbose=False)
    assert got == pytest.approx(want, rel=1e-5)
    assert abs(got / preview.dense - 1) > 1e-4  # the errors moved it (random model: any way)


def test_expert_hessian_all_is_refused_with_a_target():
    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="expert_hessian must be 'routed'"):
        compress(model, calibration=random_ids(4, 16), nsamples=4, seqlen=16, verbose=False,
                 target_bits=4.0, expert_hessian="all")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- OWL -----------------------------------------------------------------------------------

def test_owl_shifts_each_blocks_pruned_options():
    """With ``allocation="owl"`` each block's unstructured pruned options move by the block's
    OWL shift (a band of ``2 * owl_lambda`` whose size-weighted mean is 0), the others stay,
    and the compressed model keeps the budget with the shifted sparsities."""
    from toolkit.walk.capture import block_outlier_ratios, owl_block_shifts

    model = tiny_model("llama", layers=4)
    ids = random_ids(N, L)
    cfg = dict(target_bits=3.6, budget_layout="compact", allocation="owl", owl_lambda=0.1,
               budget_menu="16,4g32,3g32,2:4+4g32,50%+4g32,50%+3g32")
    config = CompressConfig(**cfg)
    names = [r.name for _b, r in budgeted_layers(model, config)]
    shifts = owl_block_shifts(model, ids, names, device="cpu", owl_lambda=0.1)
    stats = block_outlier_ratios(model, ids, dict.fromkeys(names), "cpu")
    assert sorted(shifts) == [0, 1, 2, 3]
    assert max(shifts.values()) - min(shifts.values()) == pytest.approx(0.2)
    total = sum(stats[b][1] for b in shifts)
    assert sum(shifts[b] * stats[b][1] for b in shifts) / total == pytest.approx(0.0, abs=1e-12)
    more = max(stats, key=lambda b: stats[b][0])  # most outliers: pruned least
    assert shifts[more] == min(shifts.values())
    plain = layer_choices(model, config, "compact")
    shifted = layer_choices(model, config, "compact", shifts=shifts)
    for a, c in zip(plain, shifted):
        for s0, s1 in zip(a.settings, c.settings):
            if s0.sparsity and s0.pattern is None:
                assert s1.sparsity == round(s0.sparsity + shifts[c.block], 4)
            else:
                assert s1 == s0
    rep = compress(model, calibration=ids, nsamples=N, seqlen=L, verbose=False, **cfg)
    b = rep.budget
    assert "owl sparsity shifts" in b.summary
    assert b.summary["bits/weight (budgeted)"] <= 3.6
    unstructured = b.layers[b.layers["option"].str.contains("%")]
    assert len(unstructured) >= 1
    for row in unstructured.itertuples():
        assert row.sparsity == pytest.approx(0.5 + shifts[row.block], abs=1e-4)


def test_budgeted_experts_load_right_in_transformers_or_are_refused(tmp_path):
    """A budgeted mixture of experts takes different settings per expert; written in the
    standard layout, transformers either loads it to the toolkit's own logits or refuses it,
    never a silent wrong model."""
    import warnings

    from transformers import AutoModelForCausalLM

    model = tiny_moe("mixtral")
    ids = random_ids(N, L)
    compress(model, calibration=ids, nsamples=N, seqlen=L, verbose=False, target_bits=4.5,
             budget_menu="16,8g32,4g32,3g32")
    settings = {r.get_record().settings for _b, r in budgeted_layers(
        model, CompressConfig(target_bits=4.5)) if is_expert(r)}
    assert len(settings) >= 2  # the experts differ
    with torch.no_grad():
        want = model(ids[:2]).logits
    out = save_compressed(model, tmp_path / "m", layout="standard")
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(ids[:2]).logits, want)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    except Exception as e:  # refused: fine, as long as it says so
        assert str(e)
        return
    with torch.no_grad():
        got = loaded(ids[:2]).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_every_moe_family_with_routers_under_a_target(family):
    """The other layouts of experts (shared experts, a dense first block, (in, out) storage with
    interleaved gate/up), with the routers budgeted too: the routers choose the experts inside
    their forward, so the preview writes their ``W + c dW`` in place (and puts it back)."""
    model = tiny_moe(family)
    ids = random_ids(N, L)
    cfg = dict(target_bits=4.0, routers=True, budget_menu="16,8g32,4g32,3g32")
    refs = [r for _b, r in budgeted_layers(model, CompressConfig(**cfg))]
    plain = {r.name for _b, r in budgeted_layers(model, CompressConfig(**{**cfg,
                                                                        "routers": False}))}
    assert len({r.name for r in refs} - plain) >= 1  # the routers are budgeted layers too
    rep = compress(model, calibration=ids, nsamples=N, seqlen=L, verbose=False, **cfg)
    b = rep.budget
    assert list(b.layers["layer"]) == [r.name for r in refs]
    assert b.summary["bits/weight (budgeted)"] <= 4.0
    assert math.isfinite(b.summary["guard perplexity predicted"])
    for r in refs:
        assert r.get_record().settings == b.plan.settings(r.name), r.name


def test_profile_passes_cut_to_the_hessian_budget_give_the_same_errors(monkeypatch):
    """A mixture-of-experts block is profiled in as few passes over the windows as the Hessian
    budget allows (one here); cut to one group per pass, every error, energy and share is the
    same, bit for bit."""
    import toolkit.walk.expert_capture as ec

    model = tiny_moe("mixtral")
    ids = random_ids(N, L)
    cfg = CompressConfig(target_bits=3.5, budget_menu=MENU, budget_layout="compact")
    passes = []
    real = ec.cut
    monkeypatch.setattr(ec, "cut", lambda *a, **k: passes.append(real(*a, **k)) or passes[-1])
    one = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    assert [len(p) for p in passes] == [1, 1]  # one pass per block
    monkeypatch.setenv("TOOLKIT_MOE_HESSIAN_BYTES", "1")
    passes.clear()
    many = profile_layers(model, ids, cfg, device="cpu", verbose=False)
    assert all(len(x) == 1 for p in passes for x in p) and len(passes[0]) > 4
    assert many.errors == one.errors and many.weighted == one.weighted
    assert many.energy == one.energy and many.share == one.share
