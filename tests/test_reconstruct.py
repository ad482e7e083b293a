"""Block reconstruction (toolkit.walk.reconstruct) and effort="max".

What reconstruction promises, checked on tiny float64 models: pruned weights stay exactly 0 (the
sweep's masks, hence its exact sparsity, are kept to the weight), quantized weights stay on their
grids (same codes; the stored scales are the refitted ones, so a checkpoint loads the same
weights), the block's calibration output error never rises (the solver's weights are put back
otherwise), and it does lower it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from toolkit import compress, load_compressed, save_compressed
from toolkit.config.options import EFFORT_MAX, CompressConfig
from toolkit.walk import reconstruct

RUN = dict(nsamples=16, seqlen=64, verbose=False, hessian_dtype="float64")


def _model(family="llama"):
    return tiny_model(family, hidden=64, layers=3).double()


def _run(family="llama", **kw):
    model = _model(family)
    report = compress(model, calibration=random_ids(16, 64), **RUN, **kw)
    return model, report


def _layers(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "compression")}


def _record_before(monkeypatch) -> dict:
    """Wrap the sweep's call of :func:`reconstruct_block` to keep each layer's solved weight and
    grid just before its block is fitted: ``{layer: (weight (out, in), scale or None)}``."""
    import toolkit.walk.sweep as sweep

    seen = {}
    inner = sweep.reconstruct_block

    def spy(block, refs, *a, **k):
        for r in refs:
            comp = r.get_record()
            seen[r.name] = (r.get_weight().clone(),
                            None if comp is None or comp.scale is None else comp.scale.clone())
        return inner(block, refs, *a, **k)
    monkeypatch.setattr(sweep, "reconstruct_block", spy)
    return seen


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_masks_kept_to_the_weight_and_weights_on_their_grids(family, monkeypatch):
    before = _record_before(monkeypatch)
    fit, rf = _run(family, sparsity=0.5, bits=4, group_size=32, asymmetric=True,
                   reconstruct_steps=24)
    changed = 0
    for name, m in _layers(fit).items():
        w = m.weight.data.T if family == "gpt2" else m.weight.data  # GPT-2 Conv1D: (in, out)
        w0, scale0 = before[name]
        assert torch.equal(w == 0, w0 == 0), name  # the same zeros: masks frozen
        comp = m.compression
        g = torch.arange(w.shape[1]) // 32
        scale, zero = comp.scale.double()[:, g], comp.zero.double()[:, g]
        codes = torch.round(w / scale + zero)
        assert codes.min() >= 0 and codes.max() <= 15, name
        torch.testing.assert_close(w, scale * (codes - zero), rtol=0, atol=1e-6)
        codes0 = torch.round(w0 / scale0.double()[:, g] + zero)
        assert torch.equal(codes, codes0), name  # codes frozen, scales refit
        changed += not torch.equal(comp.scale, scale0)
    assert changed > 0
    n = rf.layers["shape"].map(lambda s: s[0] * s[1])
    assert abs(float((rf.layers["sparsity"] * n).sum()) - round(0.5 * int(n.sum()))) < 1e-6
    blocks = rf.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert (blocks["block_error_after"] <= blocks["block_error_before"]).all()
    assert blocks["block_error_after"].sum() <= 0.97 * blocks["block_error_before"].sum()
    assert "block output error (before -> after reconstruction)" in rf.summary


def test_pruned_layers_move_their_kept_weights_only(monkeypatch):
    before = _record_before(monkeypatch)
    fit, rf = _run(sparsity=0.6, asymmetric=True, reconstruct_steps=24)
    moved = 0
    for name, m in _layers(fit).items():
        w, (w0, _) = m.weight.data, before[name]
        assert torch.equal(w == 0, w0 == 0), name
        moved += int(((w - w0).abs() > 0).sum())
    assert moved > 0
    blocks = rf.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert blocks["block_error_after"].sum() <= 0.9 * blocks["block_error_before"].sum()


def test_a_fit_that_makes_things_worse_is_put_back(monkeypatch):
    base, _ = _run(sparsity=0.5, bits=4, asymmetric=True)
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_LR", {"weight": 50.0, "scale": 5.0})
    fit, rf = _run(sparsity=0.5, bits=4, asymmetric=True, reconstruct_steps=8)
    blocks = rf.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert (blocks["block_error_after"] == blocks["block_error_before"]).all()
    for k, v in base.state_dict().items():
        assert torch.equal(fit.state_dict()[k], v), k
    assert "reconstruction kept in 0" in rf.summary[
        "block output error (before -> after reconstruction)"]


def test_reconstructed_checkpoint_loads_the_same_weights(tmp_path):
    model, report = _run(sparsity=0.5, bits=4, group_size=32, asymmetric=True,
                         reconstruct_steps=16)
    model = model.float()  # checkpoints are written in the model's float dtype
    out = save_compressed(model, tmp_path / "ckpt", report=report)
    loaded = load_compressed(out)
    for name, m in _layers(model).items():
        got = loaded.get_submodule(name).weight.data
        torch.testing.assert_close(got, m.weight.data.to(got.dtype), rtol=0, atol=1e-6)


def test_effort_max_turns_on_what_the_user_left_at_its_default():
    c = CompressConfig(sparsity=0.6, effort="max")
    assert (c.asymmetric, c.reconstruct_steps, c.refine_iters, c.allocation) == (
        True, EFFORT_MAX["reconstruct_steps"], EFFORT_MAX["refine_iters"], "owl")
    c = CompressConfig(pattern="2:4", effort="max")  # n:m: nothing to allocate
    assert (c.refine_iters, c.allocation) == (EFFORT_MAX["refine_iters"], "uniform")
    c = CompressConfig(bits=3, effort="max")  # quantization only: no re-solve, no allocation
    assert (c.asymmetric, c.refine_iters, c.allocation) == (True, 0, "uniform")
    c = CompressConfig(sparsity=0.6, effort="max", refine_iters=5, reconstruct_steps=3)
    assert (c.refine_iters, c.reconstruct_steps) == (5, 3)
    assert CompressConfig(sparsity=0.6).reconstruct_steps == 0  # default effort: today's sweep
    with pytest.raises(ValueError, match="effort must be one of 'default', 'max'"):
        CompressConfig(sparsity=0.5, effort="fast")
    with pytest.raises(ValueError, match="effort='max' does not cover target_bits"):
        CompressConfig(target_bits=4.2, effort="max")
    with pytest.raises(ValueError, match="reconstruct_steps must be an integer >= 0"):
        CompressConfig(sparsity=0.5, reconstruct_steps=-1)


def test_effort_max_runs_and_says_what_each_stage_bought():
    _, report = _run(sparsity=0.6, effort="max")
    s = report.summary
    assert "effort max" in s["method"] and "asymmetric targets" in s["method"]
    assert "block output error (before -> after reconstruction)" in s
    L = report.layers
    n = L["shape"].map(lambda s: s[0] * s[1])
    pruned = float((L["sparsity"] * n).sum())  # OWL moves sparsity between layers, not in total
    assert abs(pruned - round(0.6 * int(n.sum()))) < 1e-6
    assert L["sparsity"].max() > 0.6 > L["sparsity"].min()


def test_reconstruction_refuses_moe():
    from conftest import tiny_moe

    with pytest.raises(ValueError, match="reconstruct_steps=4 does not cover mixture-of-experts"):
        compress(tiny_moe("mixtral"), calibration=random_ids(8, 32), nsamples=8, seqlen=32,
                 sparsity=0.5, reconstruct_steps=4, verbose=False)


def test_streaming_refuses_moe_before_writing(tmp_path):
    from conftest import tiny_moe

    from toolkit.walk.stream import compress_streaming
    src = tmp_path / "moe"
    tiny_moe("mixtral").save_pretrained(src)
    run = dict(calibration=random_ids(8, 32), nsamples=8, seqlen=32, sparsity=0.5,
               verbose=False)
    with pytest.raises(ValueError, match="do not cover mixture-of-experts"):
        compress_streaming(src, tmp_path / "out", asymmetric=True, **run)
    with pytest.raises(ValueError, match="effort='max' turns on allocation='owl'.*"
                                         "asymmetric=True, reconstruct_steps=32, refine_iters=20"):
        compress_streaming(src, tmp_path / "out", effort="max", **run)
    assert not (tmp_path / "out").exists()


def test_command_line_flags_reach_the_config():
    from toolkit.cli import build_parser
    from toolkit.config.options import config_from_args

    args = build_parser().parse_args(["compress", "--sparsity", "0.6", "--effort", "max"])
    c = config_from_args(args)
    assert (c.effort, c.asymmetric, c.reconstruct_steps, c.allocation) == (
        "max", True, EFFORT_MAX["reconstruct_steps"], "owl")
    args = build_parser().parse_args(["compress", "--bits", "3", "--asymmetric",
                                      "--reconstruct-steps", "8"])
    c = config_from_args(args)
    assert (c.effort, c.asymmetric, c.reconstruct_steps) == ("default", True, 8)


def test_learned_rounding_keeps_the_fixed_grid_and_the_masks(monkeypatch):
    """RECONSTRUCT_QUANTIZED="round" (the alternative bench/reconstruct.py measures): codes move
    to other levels of the solver's grid, whose scales stay; pruned weights stay 0."""
    before = _record_before(monkeypatch)
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_QUANTIZED", "round")
    fit, rf = _run(sparsity=0.5, bits=4, group_size=32, asymmetric=True, reconstruct_steps=24)
    moved = 0
    for name, m in _layers(fit).items():
        w, (w0, scale0) = m.weight.data, before[name]
        comp = m.compression
        assert torch.equal(comp.scale, scale0), name  # the grid is the solver's
        g = torch.arange(w.shape[1]) // 32
        scale, zero = comp.scale.double()[:, g], comp.zero.double()[:, g]
        codes = torch.round(w / scale + zero)
        assert codes.min() >= 0 and codes.max() <= 15, name
        torch.testing.assert_close(w, scale * (codes - zero), rtol=0, atol=1e-9)
        assert bool((w[w0 == 0] == 0).all()), name  # pruned (and zero-code) weights stay 0
        moved += int((codes != torch.round(w0 / scale + zero)).sum())
    assert moved > 0
    n = rf.layers["shape"].map(lambda s: s[0] * s[1])
    assert abs(float((rf.layers["sparsity"] * n).sum()) - round(0.5 * int(n.sum()))) < 1e-6
    blocks = rf.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert (blocks["block_error_after"] <= blocks["block_error_before"]).all()
    assert blocks["block_error_after"].sum() < blocks["block_error_before"].sum()
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_QUANTIZED", "codes")
    with pytest.raises(ValueError, match="RECONSTRUCT_QUANTIZED must be 'scale' or 'round'"):
        _run(sparsity=0.5, bits=4, asymmetric=True, reconstruct_steps=2)


def test_bfloat16_steps_keep_every_promise(monkeypatch):
    """Where the device has bfloat16 units the steps of a float32 block run under bfloat16
    autocast (forced here on any CPU); masks, grids and never-worse hold, measured in float32."""
    used = []
    real = torch.autocast

    def spy(device_type, *a, enabled=True, **k):
        used.append(enabled)
        return real(device_type, *a, enabled=enabled, **k)
    monkeypatch.setattr(torch, "autocast", spy)
    monkeypatch.setattr(reconstruct, "fast_bfloat16", lambda device: True)
    before = _record_before(monkeypatch)
    model = tiny_model("llama", hidden=64, layers=3)  # float32
    rf = compress(model, calibration=random_ids(16, 64), nsamples=16, seqlen=64, verbose=False,
                  sparsity=0.5, bits=4, group_size=32, asymmetric=True, reconstruct_steps=16)
    assert used and all(used)
    for name, m in _layers(model).items():
        w, (w0, scale0) = m.weight.data, before[name]
        assert torch.equal(w == 0, w0 == 0), name
        g = torch.arange(w.shape[1]) // 32
        scale, zero = m.compression.scale[:, g], m.compression.zero[:, g]
        codes = torch.round(w / scale + zero)
        assert torch.equal(codes, torch.round(w0 / scale0[:, g] + zero)), name
    blocks = rf.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert (blocks["block_error_after"] <= blocks["block_error_before"]).all()
    assert blocks["block_error_after"].sum() < blocks["block_error_before"].sum()
    used.clear()
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_AUTOCAST", "off")
    compress(tiny_model("llama", hidden=64, layers=3), calibration=random_ids(16, 64),
             nsamples=16, seqlen=64, verbose=False, sparsity=0.5, reconstruct_steps=2,
             asymmetric=True)
    assert used and not any(used)
    used.clear()
    monkeypatch.setattr(reconstruct, "RECONSTRUCT_AUTOCAST", "auto")
    compress(_model(), calibration=random_ids(16, 64), **RUN, sparsity=0.5, reconstruct_steps=2)
    assert used and not any(used)  # float64 blocks: never


def test_fast_bfloat16_answers_for_any_device():
    assert reconstruct.fast_bfloat16("meta") is False
    assert isinstance(reconstruct.fast_bfloat16("cpu"), bool)


@pytest.mark.parametrize("kw", [dict(bits=4, group_size=32), dict(bits=3),
                                 dict(bits=4, group_size=32, act_order=True)])
def test_refit_scales_by_broadcast_equal_the_gathered_ones(kw):
    """Runs of equal groups multiply by broadcast (no gather); the same weights as the general
    column -> group map, and the act-order layers (g_idx) keep the map."""
    from toolkit.model.experts import find_layers

    model, _ = _run(**kw)
    block = model.model.layers[1]
    trained = reconstruct._trainable(block, find_layers(block, prefix="model.layers.1"),
                                     torch.float64)
    assert trained
    for t in trained:
        assert t.width == (0 if kw.get("act_order") else kw.get("group_size", t.w0.shape[1]))
        with torch.no_grad():
            t.param.normal_(0, 0.1)
        general = t.base * torch.exp(t.param[:, t.group])
        torch.testing.assert_close(t.weight(), general, rtol=1e-14, atol=0)
        torch.testing.assert_close(t.base, t.w0, rtol=1e-6, atol=1e-9)
