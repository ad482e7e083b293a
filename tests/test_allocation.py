"""Non-uniform sparsity allocation (toolkit.plan.allocation): exact totals, OWL rule, validation."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit import compress
from toolkit.api import CompressConfig
from toolkit.plan.allocation import exact_counts, owl_block_sparsities


def _pruned(model, report):
    """Zeros actually present in the compressed layers, and their total size."""
    mods = dict(model.named_modules())
    zeros = total = 0
    for name in report.layers["layer"]:
        w = mods[name].weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros, total


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_owl_total_is_exact(family, sparsity):
    ids = random_ids(8, 32)
    model = tiny_model(family, layers=4)
    r = compress(model, calibration=ids, nsamples=8, seqlen=32, sparsity=sparsity,
                 allocation="owl", owl_lambda=0.1, verbose=False)
    L = r.layers
    sizes = L["shape"].map(lambda s: s[0] * s[1])
    counts = (L["sparsity"] * sizes).round().astype(int)
    total = int(sizes.sum())
    assert int(counts.sum()) == round(sparsity * total)  # exact count
    # the weights agree with the report (random init has no exact zeros of its own)
    zeros, n = _pruned(model, r)
    assert n == total and zeros == round(sparsity * total)
    # non-uniform, spread over a band of width 2 * lambda
    assert 0.01 < L["sparsity"].max() - L["sparsity"].min() <= 2 * 0.1 + 1e-3
    assert "owl" in r.summary["allocation"] and "owl" in r.summary["method"]


def test_uniform_is_unchanged_and_owl_with_refine():
    ids = random_ids(8, 32)
    r = compress(tiny_model("llama"), calibration=ids, nsamples=8, seqlen=32, sparsity=0.5,
                 verbose=False)
    assert r.summary["allocation"] == "uniform"
    r2 = compress(tiny_model("llama", layers=3), calibration=ids, nsamples=8, seqlen=32,
                  sparsity=0.6, allocation="owl", refine_iters=5, bits=4, verbose=False)
    sizes = r2.layers["shape"].map(lambda s: s[0] * s[1])
    assert int((r2.layers["sparsity"] * sizes).round().sum()) == round(0.6 * sizes.sum())


def test_owl_rule():
    # more outliers -> less sparsity; spread 2*lambda; mean preserved
    s = owl_block_sparsities([0.01, 0.02, 0.03], 0.6, 0.08)
    assert s[0] > s[1] > s[2]
    assert s[0] - s[2] == pytest.approx(0.16)
    assert sum(s) / 3 == pytest.approx(0.6)
    assert owl_block_sparsities([0.02, 0.02], 0.5, 0.08) == [0.5, 0.5]
    w = owl_block_sparsities([0.0, 1.0], 0.5, 0.1, weights=[3, 1])
    assert 3 * w[0] + w[1] == pytest.approx(4 * 0.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12), st.data())
def test_exact_counts(sizes, data):
    sp = data.draw(st.lists(st.floats(0, 0.99), min_size=len(sizes), max_size=len(sizes)))
    cap = sum(int(0.99 * n) for n in sizes)
    target = data.draw(st.integers(0, cap))
    counts = exact_counts(sizes, sp, target)
    assert sum(counts) == target
    assert all(0 <= c <= int(0.99 * n) for c, n in zip(counts, sizes))


@pytest.mark.parametrize("kw, arg", [
    (dict(sparsity=0.5, allocation="outlier"), "allocation"),
    (dict(sparsity=0.5, allocation="owl", owl_m=0), "owl_m"),
    (dict(sparsity=0.5, allocation="owl", owl_m="5"), "owl_m"),
    (dict(sparsity=0.5, allocation="owl", owl_lambda=0.9), "owl_lambda"),
    (dict(sparsity=0.5, allocation="owl", owl_lambda=-0.1), "owl_lambda"),
    (dict(pattern="2:4", allocation="owl"), "allocation"),
    (dict(bits=4, allocation="owl"), "allocation"),
])
def test_validation_names_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        CompressConfig(**kw)


def test_config_describe_and_cli_flags():
    from toolkit.cli import build_parser

    cfg = CompressConfig(sparsity=0.6, refine_iters=20, allocation="owl")
    assert "re-solve 20" in cfg.describe() and "owl" in cfg.describe()
    args = build_parser().parse_args(["compress", "--sparsity", "0.6", "--refine-iters", "20",
                                      "--allocation", "owl", "--owl-lambda", "0.1"])
    assert (args.refine_iters, args.allocation, args.owl_lambda) == (20, "owl", 0.1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--allocation", "nope"])


def test_model_untouched_by_prepass():
    from toolkit.config.options import LayerSettings
    from toolkit.walk.capture import allocate

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    alloc = allocate(model, random_ids(4, 16), lambda name: LayerSettings(sparsity=0.5),
                     allocation="owl", device="cpu")
    assert len(alloc) == 14
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_outlier_ratios_equal_a_plain_count(family):
    """The pre-pass shares one window's column norms between the layers fed the same tensor
    (q/k/v, gate/up): its ratios equal a count made from every layer's own inputs, exactly."""
    from toolkit.model.layers import find_blocks, find_linears
    from toolkit.walk.capture import block_outlier_ratios

    model = tiny_model(family)
    ids = random_ids(3, 16)
    _, blocks = find_blocks(model)
    refs = [r for b, blk in enumerate(blocks)
            for r in find_linears(blk, prefix=f"{find_blocks(model)[0]}.{b}")]
    got = block_outlier_ratios(model, ids, {r.name: None for r in refs}, "cpu", owl_m=2.0)
    # the plain count: each layer's squared input norms from its own hook, over the whole model
    sq, handles = {}, []
    for r in refs:
        sq[r.name] = torch.zeros(r.in_features, dtype=torch.float64)

        def hook(_m, args, name=r.name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sq[name] += x.pow(2).sum(0)
        handles.append(r.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i:i + 1], use_cache=False)
    for h in handles:
        h.remove()
    assert sorted(got) == list(range(len(blocks)))
    for b in got:
        mine = [r for r in refs if r.name.startswith(f"{find_blocks(model)[0]}.{b}.")]
        scores = [r.get_weight().float().abs() * sq[r.name].sqrt().float()[None, :] for r in mine]
        total = sum(s.numel() for s in scores)
        mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
        ratio = sum(int((s > 2.0 * mean).sum()) for s in scores) / total
        assert got[b][1] == total
        assert got[b][0] == ratio, b
        assert 0 < got[b][0] < 0.5
