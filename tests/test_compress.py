"""compress(): the block-by-block sweep on tiny models of every family, and on SmolLM2-135M."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import TINY_FAMILIES, random_ids, tiny_model
from torch import nn

from toolkit import CompressConfig, compress
from toolkit.model.layers import find_blocks, find_linears
from toolkit.solver.layer import solve
from toolkit.solver.masks import is_nm_valid
from toolkit.walk.sweep import find_groups

CONFIGS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(pattern="2:4"),
    "4bit-g32": dict(bits=4, group_size=32),
    "50%+4bit-g32": dict(sparsity=0.5, bits=4, group_size=32),
}


def _compress_tiny(model, n=8, seqlen=32, **kw):
    return compress(model, calibration=random_ids(n, seqlen), nsamples=n, seqlen=seqlen,
                    verbose=False, **kw)


def _on_grid(ref, bits):
    """True when every weight equals scale * (q - zero) for an integer q in [0, 2^bits - 1]."""
    comp = ref.module.compression
    w = ref.get_weight().float()
    cols = w.shape[1]
    g_idx = comp.g_idx.long() if comp.g_idx is not None else (
        torch.arange(cols) // (comp.settings.group_size or cols))
    s = comp.scale[:, g_idx]
    z = comp.zero[:, g_idx]
    q = w / s + z
    ok_int = torch.allclose(q, q.round(), atol=1e-3)
    in_range = bool(((q.round() >= 0) & (q.round() <= 2**bits - 1)).all())
    exact = torch.equal((s * (q.round() - z)).to(w.dtype), w)
    return ok_int and in_range and exact


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_family(family, name):
    kw = CONFIGS[name]
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _compress_tiny(model, **kw)
    blocks_name, blocks = find_blocks(model)
    refs = [r for b, blk in enumerate(blocks) for r in find_linears(blk, f"{blocks_name}.{b}")]
    assert len(report.layers) == len(refs) > 0
    compressed = {f"{r.name}.weight" for r in refs}
    for ref in refs:
        w = ref.get_weight()
        if "sparsity" in kw:  # exact count per layer (quantization may add zeros, never remove)
            mask_zeros = round(kw["sparsity"] * w.numel())
            row = report.layers[report.layers.layer == ref.name].iloc[0]
            assert row.sparsity == mask_zeros / w.numel()
            if "bits" in kw:
                assert int((w == 0).sum()) >= mask_zeros
            else:
                assert int((w == 0).sum()) == mask_zeros
        if "pattern" in kw:
            assert is_nm_valid(w, 2, 4)
        if "bits" in kw:
            assert _on_grid(ref, kw["bits"]), ref.name
    # everything that is not a compressed linear weight is bit-identical
    for k, v in model.state_dict().items():
        if k not in compressed:
            assert torch.equal(v, before[k]), k
        else:
            assert not torch.equal(v, before[k]), k
    out = model.generate(random_ids(1, 5), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_groups_follow_shared_inputs():
    model = tiny_model("llama", layers=1)
    from toolkit.walk.sweep import capture_block_inputs

    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, random_ids(2, 16), "cpu")
    groups = find_groups(blocks[0], find_linears(blocks[0]), inputs)
    names = [[r.name.split(".")[-1] for r in g] for g in groups]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"],
                     ["down_proj"]]


def test_later_groups_see_compressed_earlier_groups():
    """o_proj must be solved on the inputs produced by the already-compressed q/k/v."""
    model = tiny_model("llama", layers=1)
    reference = copy.deepcopy(model)
    ids = random_ids(8, 32)
    compress(model, calibration=ids, nsamples=8, seqlen=32, sparsity=0.5, verbose=False)
    attn, ref_attn = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    for p in ("q_proj", "k_proj", "v_proj"):
        getattr(ref_attn, p).weight.data.copy_(getattr(attn, p).weight.data)
    xs = []
    h = ref_attn.o_proj.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for row in ids:
            reference(row[None])
    h.remove()
    X = torch.cat(xs).double()
    H = (2 / X.shape[0] * X.T @ X).float()
    expected = solve(ref_attn.o_proj.weight.data, H, sparsity=0.5).weight
    torch.testing.assert_close(attn.o_proj.weight.data, expected, rtol=1e-4, atol=1e-5)
    # and with the uncompressed q/k/v inputs the answer would differ
    assert not torch.equal(model.model.layers[0].self_attn.o_proj.weight.data,
                           reference.model.layers[0].self_attn.o_proj.weight.data)


def test_ignore_and_overrides():
    model = tiny_model("llama")
    down_before = model.model.layers[0].mlp.down_proj.weight.data.clone()
    report = _compress_tiny(model, bits=4, group_size=32, ignore=[r"layers\.0\.mlp\.down_proj"],
                            overrides={r"up_proj": {"bits": 8}, r"self_attn\.v_proj": {"sparsity": 0.5}})
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight.data, down_before)
    assert "model.layers.0.mlp.down_proj" not in set(report.layers.layer)
    rows = report.layers.set_index("layer")
    assert rows.loc["model.layers.1.mlp.up_proj", "bits"] == 8
    assert rows.loc["model.layers.1.mlp.gate_proj", "bits"] == 4
    assert rows.loc["model.layers.0.self_attn.v_proj", "sparsity"] == 0.5
    blocks_name, blocks = find_blocks(model)
    for b, blk in enumerate(blocks):
        for ref in find_linears(blk, f"{blocks_name}.{b}"):
            if ref.name == "model.layers.0.mlp.down_proj":
                continue
            bits = 8 if ref.name.endswith("up_proj") else 4
            assert _on_grid(ref, bits), ref.name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = tiny_model("llama").to(dtype)
    report = _compress_tiny(model, sparsity=0.5, bits=4, group_size=32)
    for p in model.parameters():
        assert p.dtype == dtype
    w = model.model.layers[1].mlp.down_proj.weight
    assert int((w == 0).sum()) >= w.numel() // 2
    assert report.layers.error.notna().all() and (report.layers.error >= 0).all()


def test_methods_and_quant_rules_differ_as_expected():
    """Wanda and magnitude masks, RTN and GPTQ grids: same exact sparsity, different weights."""
    results = {}
    for method in ("sparsegpt", "wanda", "magnitude"):
        m = tiny_model("llama")
        rep = _compress_tiny(m, sparsity=0.5, method=method)
        assert (rep.layers.sparsity == 0.5).all()
        results[method] = m.model.layers[0].mlp.gate_proj.weight.data.clone()
    assert not torch.equal(results["sparsegpt"], results["wanda"])
    assert not torch.equal(results["wanda"], results["magnitude"])
    m = tiny_model("llama")
    w0 = m.model.layers[0].mlp.gate_proj.weight.data.clone()
    _compress_tiny(m, sparsity=0.5, method="magnitude")
    keep = w0.abs() > w0.abs().flatten().kthvalue(w0.numel() // 2).values
    assert torch.equal(m.model.layers[0].mlp.gate_proj.weight.data, w0 * keep)


# ---------------------------------------------------------------- bad input


class NoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def test_model_without_blocks():
    with pytest.raises(ValueError, match="decoder blocks"):
        compress(NoBlocks(), calibration=random_ids(2, 8), nsamples=2, seqlen=8, sparsity=0.5)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(seqlen=512), r"seqlen=512 is longer than the model's context \(256"),
    (dict(nsamples=0), r"nsamples must be a positive integer"),
    (dict(calibration=torch.arange(100), nsamples=4, seqlen=64), r"has 100 tokens.*needs 256"),
    (dict(calibration="some words " * 100), r"tokenizer"),
    (dict(sparsity=1.0), r"sparsity must be"),
    (dict(bits=1), r"bits must be one of 2\.\.8"),
    (dict(method="obs"), r"method must be one of"),
    (dict(pattern="4:2"), r"pattern must satisfy"),
    (dict(overrides={"down": {"bitz": 3}}), r"unknown keys \['bitz'\]"),
    (dict(ignore=["("]), r"not a valid regular expression"),
    (dict(ignore=[".*"]), r"nothing to do"),
    (dict(calibration=torch.full((8, 32), 999)), r"outside the model's vocabulary"),
])
def test_bad_input_leaves_model_untouched(kwargs, pattern):
    model = tiny_model("llama")
    model.config._name_or_path = ""  # no tokenizer to be found
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = dict(calibration=random_ids(8, 32), nsamples=8, seqlen=32, sparsity=0.5,
                    verbose=False)
    settings.update(kwargs)
    if "pattern" in kwargs:
        settings.pop("sparsity")
    with pytest.raises(ValueError, match=pattern):
        compress(model, **settings)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_text_too_short_names_the_need(smollm2_shared):
    model, tok = smollm2_shared
    with pytest.raises(ValueError, match=r"has \d+ tokens; nsamples x seqlen = 4 x 512 needs 2,048"):
        compress(model, tok, calibration="A short text. " * 30, nsamples=4, seqlen=512,
                 sparsity=0.5, verbose=False)


def test_config_mirrors_compress_keywords():
    import inspect

    cfg = CompressConfig(sparsity=0.5, bits=4, overrides={"down_proj": {"bits": 8}})
    assert cfg.describe() == "sparsegpt 50% + gptq 4-bit g128 asym"
    assert cfg.overrides == {"down_proj": {"bits": 8}}
    from dataclasses import FrozenInstanceError

    with pytest.raises(FrozenInstanceError):
        cfg.sparsity = 0.6
    doc = inspect.getdoc(compress)
    for name in ("sparsity", "bits", "pattern", "group_size", "method", "quant", "calibration",
                 "nsamples", "seqlen", "device", "ignore", "overrides", "block_size", "percdamp",
                 "seed"):
        assert re.search(rf"\b{name}\b", doc), name


# ---------------------------------------------------------------- the report
# (the real-model orderings: tests/test_quality_pinned.py, beside the values they come from)


def test_report_summary_is_consistent():
    model = tiny_model("llama")
    report = _compress_tiny(model, sparsity=0.5, bits=4, group_size=32)
    s = report.summary
    assert s["method"] == "sparsegpt 50% + gptq 4-bit g32 asym"
    assert s["nsamples"] == 8 and s["seqlen"] == 32 and s["calibration"] == "token ids"
    assert s["sparsity (compressed)"] == 0.5
    assert s["bytes after"] < s["bytes before (fp16)"]
    # the standard layout stores every code, the compact one the kept codes and a bitmask
    assert s["bytes after, compact"] < s["bytes after"]
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "bits/weight" in text


def test_float64_hessians_agree_with_float32():
    reports = {}
    for hd in ("float32", "float64"):
        model = tiny_model("llama")
        reports[hd] = _compress_tiny(model, sparsity=0.5, bits=4, group_size=32, hessian_dtype=hd)
    e32, e64 = reports["float32"].layers.error, reports["float64"].layers.error
    assert ((e32 - e64).abs() <= 1e-3 * e64.abs() + 1e-6).mean() > 0.9


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_baseline_rules_on_transposed_conv1d_weights(method):
    """GPT-2 keeps its weights transposed (Conv1D): the baselines must handle the strides."""
    model = tiny_model("gpt2")
    report = _compress_tiny(model, sparsity=0.5, method=method, bits=4, group_size=32, quant="rtn")
    assert (report.layers.sparsity == 0.5).all()
    w = model.transformer.h[0].mlp.c_fc.weight
    assert int((w == 0).sum()) >= w.numel() // 2


def test_report_relative_error_and_static_groups():
    """rel_error = error / tr(W H W^T): in (0, 1) for a real compression, 0 where nothing
    changed; static groups with act-order give every layer contiguous groups and a layer error
    within a factor of the dynamic ones (same solver, another grid schedule)."""
    kw = dict(calibration=random_ids(4, 32), nsamples=4, seqlen=32, bits=3, group_size=32,
              act_order=True, verbose=False)
    dyn = compress(tiny_model("llama"), **kw).layers
    sta_model = tiny_model("llama")
    sta = compress(sta_model, static_groups=True, **kw).layers
    for df in (dyn, sta):
        assert ((df["rel_error"] > 0) & (df["rel_error"] < 1)).all()
        cols = list(df.columns)
        assert cols[cols.index("error"):][:3] == ["error", "rel_error", "seconds"]
    ratio = sta["error"] / dyn["error"]
    assert ((ratio > 0.5) & (ratio < 2.0)).all()
    for m in sta_model.modules():
        comp = getattr(m, "compression", None)
        if comp is not None:
            assert torch.equal(comp.g_idx.long(), torch.arange(comp.g_idx.numel()) // 32)
    assert "static groups" in CompressConfig(bits=4, act_order=True, static_groups=True).describe()
