"""toolkit.runtime.pack: packed inference modules compute what the dequantized model computes.

Tolerances. With ``compute_dtype=torch.float32`` a packed layer differs from the dequantized
``nn.Linear`` only by float32 rounding: the int4 kernel uses ``(q - 8) * scale + zero_f`` with
``zero_f = scale * (8 - z)`` rounded once, and every kernel sums in its own order. Both are
relative errors of a few float32 ulps per layer (observed: 3e-7 of the largest logit after two
blocks), so ``FP32_TOL = 2e-5`` of the largest logit leaves a margin of ~50x and is still ~10^4
below what a wrong code, group, zero point or permutation gives (errors of the size of the
logits). The decode and bitmask paths compute the weights with the solver's own formula
``scale * (q - zero)`` in float32, so their logits are compared for equality. The bfloat16 paths
are checked layer by layer against a float64 reference of the kernel's own bfloat16 inputs, with
the bound of one bfloat16 rounding of the output.
"""

from __future__ import annotations

import copy
import math
import sys

import numpy as np
import pytest
import torch
from conftest import random_ids, tiny_config, tiny_model

from toolkit import compress, load_packed, pack, pack_report, save_compressed
from toolkit.checkpoint.size import linear_bytes
from toolkit.runtime.pack import (
    BitmaskLinear,
    DecodeLinear,
    Int4Linear,
    Int8Linear,
    LayerCodes,
    PackedLinear,
    PackError,
    Sparse24Linear,
    layer_codes,
    module_bytes,
    pack_bits,
    resident_bytes,
    unpack_bits,
)
from toolkit.solver.quant import rtn_quantize

FP32_TOL = 2e-5
CALIB = dict(calibration=random_ids(4, 32, seed=1), nsamples=4, seqlen=32, verbose=False)


def awkward_llama(seed: int = 0):
    """2 blocks, hidden 96 (k/v: 48 rows), MLP width 201: partial groups at 64 and 128, an odd
    column count (down_proj), row counts that are not multiples of 16 (gate/up: 201)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config("llama", hidden=96)
    cfg.intermediate_size = 201
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 0
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def awkward():
    return awkward_llama()


IDS = random_ids(2, 24, seed=5)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def compressed(base, **kw):
    m = copy.deepcopy(base)
    compress(m, None, **CALIB, **kw)
    return m


# ---- bit packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip(bits):
    n = 1001  # not a multiple of any packing unit
    v = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(bits),
                      dtype=torch.uint8)
    packed = pack_bits(v, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, n).to(torch.uint8), v)


def test_bitmask_is_numpy_packbits_little():
    m = torch.rand(7, 13, generator=torch.Generator().manual_seed(0)) < 0.5
    ref = np.packbits(m.numpy().reshape(-1), bitorder="little")
    assert np.array_equal(pack_bits(m, 1).numpy(), ref)


# ---- codes --------------------------------------------------------------------------------------

def test_layer_codes_are_the_rtn_codes(awkward):
    m = compressed(awkward, bits=4, group_size=64, quant="rtn")
    orig = dict(awkward.named_modules())
    for name, mod in m.named_modules():
        if getattr(mod, "compression", None) is None:
            continue
        lc = layer_codes(mod, name)
        _, codes, scale, zero = rtn_quantize(orig[name].weight.detach(), 4, 64)
        assert torch.equal(lc.codes, codes), name
        assert torch.equal(lc.scale, scale) and torch.equal(lc.zero, zero)
        assert lc.perm is None and lc.mask is None and sum(lc.widths) == codes.shape[1]
        assert lc.widths[:-1] == [64] * (len(lc.widths) - 1)


def test_bf16_model(awkward):
    """A bfloat16 model: its weights are the grids rounded to bfloat16, the codes still come
    back exactly, and the packed model runs (its logits within bfloat16 noise)."""
    base = copy.deepcopy(awkward).to(torch.bfloat16)
    m = compressed(base, bits=4, group_size=64, quant="rtn")
    orig = dict(base.named_modules())
    for name, mod in m.named_modules():
        if getattr(mod, "compression", None) is not None:
            _, codes, _, _ = rtn_quantize(orig[name].weight.detach(), 4, 64)
            assert torch.equal(layer_codes(mod, name).codes, codes), name
    ref = logits(m).float()
    rep = pack(m)
    assert (rep.layers["path"] == "int4").all()
    assert m.model.layers[0].mlp.up_proj.scale_zero.dtype == torch.bfloat16
    out = logits(m).float()
    assert float((out - ref).abs().max()) <= 0.02 * float(ref.abs().max())


def test_layer_codes_refuse_a_changed_weight(awkward):
    m = compressed(awkward, bits=4, group_size=64, quant="rtn")
    layer = m.model.layers[0].mlp.down_proj
    layer.weight.data[3, 5] += 0.37 * float(layer.compression.scale[3, 0])
    with pytest.raises(ValueError, match="not on its quantization grid"):
        layer_codes(layer, "down_proj")
    with pytest.raises(ValueError, match="not a quantized layer"):
        layer_codes(m.model.layers[0].input_layernorm)


# ---- packed model == dequantized model ----------------------------------------------------------

SETTINGS = {
    "4-bit g64": (dict(bits=4, group_size=64, quant="rtn"), {"int4"}),
    "4-bit g128": (dict(bits=4, group_size=128, quant="rtn"), {"int4"}),
    "4-bit per row": (dict(bits=4, group_size=None, quant="rtn"), {"int4"}),
    "4-bit sym": (dict(bits=4, group_size=32, sym=True, quant="rtn"), {"int4"}),
    "3-bit g32": (dict(bits=3, group_size=32), {"int4"}),
    "4-bit g16": (dict(bits=4, group_size=16, quant="rtn"), {"int8"}),
    "8-bit g64": (dict(bits=8, group_size=64, quant="rtn"), {"int8"}),
    "8-bit per row": (dict(bits=8, group_size=None, quant="rtn"), {"int8"}),
    "act-order": (dict(bits=4, group_size=32, act_order=True), {"int4"}),
    "joint codes": (dict(sparsity=0.5, bits=4, group_size=64), {"int4"}),
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_kernels_equal_dequantized_model_in_fp32(awkward, setting):
    kw, paths = SETTINGS[setting]
    m = compressed(awkward, **kw)
    ref = logits(m)
    rep = pack(m, compute_dtype=torch.float32, joint="codes")
    assert set(rep.layers["path"]) == paths
    assert len(rep.layers) == 14 and not any(isinstance(x, torch.nn.Linear) and
                                             hasattr(x, "compression") for x in m.modules())
    out = logits(m)
    err = float((out - ref).abs().max())
    assert err <= FP32_TOL * float(ref.abs().max()), f"{setting}: max |diff| {err}"


def test_fallbacks_and_adaptations_are_named(awkward):
    base = compressed(awkward, bits=4, group_size=64, quant="rtn")
    # down_proj, 201 columns: groups 64, 64, 64, 9. The layout with the fewest bytes per row:
    # float32 scales: kernel group 64, padded to 256 (128 + 4 * 8 bytes) beats 32 / 224 (112 +
    # 7 * 8); bfloat16 scales: 32 / 224 (112 + 7 * 4) beats 64 / 256 (128 + 4 * 4)
    m = copy.deepcopy(base)
    down = pack(m, compute_dtype=torch.float32).layers.set_index("layer").loc[
        "model.layers.0.mlp.down_proj", "detail"]
    assert down == "in_features 201 padded to 256"
    m = copy.deepcopy(base)
    rep = pack(m).layers.set_index("layer")
    down = rep.loc["model.layers.0.mlp.down_proj", "detail"]
    assert down == "groups of 64 columns run as kernel groups of 32; in_features 201 padded to 224"
    assert module_bytes(m.model.layers[0].mlp.down_proj) == 96 * (112 + 7 * 4)
    up = rep.loc["model.layers.0.mlp.up_proj", "detail"]  # 201 rows, 96 columns: 64 + 32
    assert "out_features 201 padded to 208" in up and "kernel groups of 32" in up
    m = compressed(awkward, bits=4, group_size=16, quant="rtn")
    rep = pack(m).layers
    assert (rep["path"] == "int8").all()
    assert rep["detail"].str.contains("no int4 kernel group .* divides the groups of 16").all()


def test_act_order_permutes_the_inputs(awkward):
    m = compressed(awkward, bits=4, group_size=32, act_order=True)
    gidx = m.model.layers[0].self_attn.q_proj.compression.g_idx
    assert not torch.equal(gidx, torch.arange(96) // 32)  # the groups are out of column order
    ref = logits(m)
    rep = pack(m, compute_dtype=torch.float32)
    assert rep.layers["detail"].str.contains("act-order: inputs permuted").all()
    q = m.model.layers[0].self_attn.q_proj
    assert torch.equal(gidx[q.perm.long()], torch.sort(gidx).values)
    assert float((logits(m) - ref).abs().max()) <= FP32_TOL * float(ref.abs().max())


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, bits=4, group_size=64),
                                dict(pattern="2:4", bits=3, group_size=32, ignore=["down_proj"]),
                                dict(sparsity=0.5, bits=4, group_size=32, act_order=True)],
                         ids=["50%+4bit", "2:4+3bit", "50%+4bit act-order"])
def test_joint_bitmask_is_exact_and_compact(awkward, kw):
    m = compressed(awkward, **kw)
    ref = logits(m)
    sizes = {n: _compact_bytes(x) for n, x in m.named_modules() if hasattr(x, "compression")}
    rep = pack(m, joint="bitmask")
    assert (rep.layers["path"] == "bitmask").all()
    assert rep.layers["why"].str.startswith("joint='bitmask' asked").all()
    if kw.get("act_order"):  # the inputs are permuted: the sums run in another order
        assert float((logits(m) - ref).abs().max()) <= FP32_TOL * float(ref.abs().max())
    else:
        assert torch.equal(logits(m), ref)
    for _, r in rep.layers.iterrows():
        assert r["bytes"] <= sizes[r["layer"]], r["layer"]


def _compact_bytes(module) -> int:
    """Bytes of the layer in the compact checkpoint layout, scales in the layer's dtype."""
    s = module.compression.settings
    w = module.weight.detach()
    rows, cols = w.shape
    g_idx = module.compression.g_idx
    out_of_order = g_idx is not None and bool((g_idx[1:] < g_idx[:-1]).any())
    return int(sum(linear_bytes(rows, cols, nnz=int((w != 0).sum()), sparse=True, bits=s.bits,
                                group_size=s.group_size, sym=s.sym, act_order=out_of_order,
                                dense_bits=8 * w.element_size()).values()))


@pytest.mark.parametrize("kw", [dict(sparsity=0.5, bits=4, group_size=64),
                                dict(sparsity=0.5, bits=8, group_size=32)],
                         ids=["50%+4bit", "50%+8bit"])
def test_joint_default_is_the_fastest_path_smaller_than_dense(awkward, kw):
    """pack() puts pruned + quantized layers on the kernels (every code, pruned weights as the
    zero-point code): fewer bytes than the unpacked layer, the same outputs as joint="codes";
    the report says why and what joint="bitmask" would keep."""
    m = compressed(awkward, **kw)
    dense = {n: x.weight.numel() * x.weight.element_size() for n, x in m.named_modules()
             if hasattr(x, "compression")}
    codes = copy.deepcopy(m)
    pack(codes, joint="codes")
    rep = pack(m)
    kernel = "int4" if kw["bits"] <= 4 else "int8"
    assert (rep.layers["path"] == kernel).all()
    assert rep.layers["why"].str.contains("fewer bytes than the unpacked layer; joint='bitmask' "
                                          "keeps fewer still").all()
    for _, r in rep.layers.iterrows():
        assert r["bytes"] < dense[r["layer"]], r["layer"]
    assert torch.equal(logits(m), logits(codes))
    bitmask = pack(compressed(awkward, **kw), joint="bitmask")
    assert rep.summary["joint layers as joint='bitmask'"] == \
        bitmask.summary["bytes of these layers"]
    assert bitmask.summary["bytes of these layers"] < rep.summary["bytes of these layers"]


def test_decode_path_is_exact(awkward):
    m = compressed(awkward, bits=3, group_size=64, quant="rtn")
    ref = logits(m)
    rep = pack(m, kernels=False)
    assert (rep.layers["path"] == "decode").all()
    assert (rep.layers["detail"] == "kernels=False").all()
    assert torch.equal(logits(m), ref)
    down = m.model.layers[0].mlp.down_proj
    assert module_bytes(down) == math.ceil(96 * 201 * 3 / 8) + 96 * 4 * 4 + math.ceil(96 * 4 * 3 / 8)


def test_pruned_only_layers(awkward):
    m = compressed(awkward, pattern="2:4", method="magnitude", ignore=["down_proj"])
    rep = pack(m)
    assert len(rep.layers) == 12
    assert (rep.layers["path"] == "dense").all()
    assert rep.layers["why"].str.contains("2:4 semi-structured sparse kernels need CUDA; "
                                          "the layer is on cpu").all()
    ref = logits(m)
    rep = pack(m, pruned="bitmask")
    assert (rep.layers["path"] == "bitmask").all()
    assert torch.equal(logits(m), ref)
    w = torch.zeros(64, 64)
    w[:, ::2] = 1.0
    with pytest.raises(PackError, match="need CUDA"):
        Sparse24Linear(w, None)


def test_gpt2_conv1d(tmp_path):
    base = tiny_model("gpt2")
    m = compressed(base, bits=4, group_size=32, quant="rtn")
    ref = logits(m, random_ids(1, 16, seed=2))
    rep = pack(m, compute_dtype=torch.float32)
    assert (rep.layers["path"] == "int4").all() and len(rep.layers) == 8
    out = logits(m, random_ids(1, 16, seed=2))
    assert float((out - ref).abs().max()) <= FP32_TOL * float(ref.abs().max())


# ---- bfloat16 kernels, layer by layer -----------------------------------------------------------

def _codes(rows, cols, bits, widths, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = len(widths)
    return LayerCodes(codes=torch.randint(0, 2**bits, (rows, cols), generator=g,
                                          dtype=torch.uint8),
                      scale=torch.rand(rows, groups, generator=g) * 0.02 + 1e-3,
                      zero=torch.randint(0, 2**bits, (rows, groups), generator=g).float(),
                      widths=widths, bits=bits, perm=None, mask=None)


def _dense(lc):
    reps = torch.tensor(lc.widths)
    return (lc.scale.double().repeat_interleave(reps, 1)
            * (lc.codes.double() - lc.zero.double().repeat_interleave(reps, 1)))


def test_int4_bf16_against_its_own_inputs():
    lc = _codes(200, 576, 4, [128] * 4 + [64])
    layer = Int4Linear(lc, None, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(1))
    y = layer(x).double()
    # the kernel's inputs: bf16 x, bf16 scale, bf16 zero_f = scale * (8 - z)
    s = lc.scale.double().to(torch.bfloat16).double()
    zf = (lc.scale.double() * (8 - lc.zero.double())).to(torch.bfloat16).double()
    reps = torch.tensor(lc.widths)
    w = (lc.codes.double() - 8) * s.repeat_interleave(reps, 1) + zf.repeat_interleave(reps, 1)
    xb = x.to(torch.bfloat16).double()
    ref = xb @ w.T
    bound = 2**-8 * (xb.abs() @ w.abs().T) + 1e-6
    assert bool(((y - ref).abs() <= bound).all())
    # and the kernel is not just the bf16 rounding of anything: a wrong zero point is caught
    assert float((xb @ _dense(lc).T - ref).abs().max()) < float(bound.max())


def test_int8_bf16_against_its_own_inputs():
    lc = _codes(64, 200, 8, [64, 64, 64, 8], seed=3)
    layer = Int8Linear(lc, None, compute_dtype=torch.bfloat16)
    assert "groups padded to multiples of 16 columns" in layer.detail
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(4))
    y = layer(x).double()
    xb = x.to(torch.bfloat16).double()
    ref = xb @ _dense(lc).T
    # each group's output and the correction term are rounded to bf16 once, then summed
    terms = 2 * len(lc.widths)
    bound = terms * 2**-8 * (xb.abs() @ _dense(lc).abs().T
                             + xb.abs().sum(1, keepdim=True) * (lc.scale * 128).max()) + 1e-6
    assert bool(((y - ref).abs() <= bound).all())


def test_int4_memory_is_below_a_third_of_fp16():
    # SmolLM2's MLP shape at group 128: 576 columns = 4.5 groups
    lc = _codes(1536, 576, 4, [128] * 4 + [64])
    layer = Int4Linear(lc, None, compute_dtype=torch.bfloat16)
    assert layer.group == 64 and layer.kp == 576  # 9 kernel groups, no padding
    assert module_bytes(layer) == 1536 * 576 // 2 + 9 * 1536 * 2 * 2
    assert module_bytes(layer) / (1536 * 576 * 2) <= 0.35


# ---- report, memory, loading --------------------------------------------------------------------

def test_report_and_resident_bytes(awkward):
    dense_bytes = sum(t.numel() * 4 for t in [*awkward.parameters(), *awkward.buffers()])
    assert resident_bytes(awkward) == dense_bytes
    m = compressed(awkward, bits=4, group_size=64, quant="rtn")
    before = pack_report(m)
    assert (before.layers["path"] == "dense").all()
    assert (before.layers["why"] == "not packed yet").all()
    rep = pack(m)
    lay = rep.layers
    assert list(lay.columns) == ["layer", "shape", "bits", "sparsity", "path", "why", "detail",
                                 "bytes", "fp16_bytes"]
    assert (lay["why"] == "int4 kernel: the fastest path").all()
    assert "int4 x14: int4 kernel: the fastest path" in str(rep)
    assert rep.summary["bytes of these layers"] == lay["bytes"].sum()
    assert rep.summary["layers on int4"] == 14
    assert lay.set_index("layer").loc["model.layers.1.mlp.down_proj", "shape"] == (96, 201)
    saved = sum(r["fp16_bytes"] * 2 - r["bytes"] for _, r in lay.iterrows())
    assert resident_bytes(m) == dense_bytes - saved
    assert "int4" in str(rep)


def test_load_packed_equals_packing_in_memory(awkward, tmp_path):
    for i, kw in enumerate([dict(bits=4, group_size=64), dict(sparsity=0.5, bits=4,
                                                                group_size=32),
                            dict(bits=4, group_size=32, sym=True, quant="rtn")]):
        m = compressed(awkward, **kw)
        path = save_compressed(m, tmp_path / f"ckpt{i}")
        records = {n: x.compression for n, x in m.named_modules() if hasattr(x, "compression")}
        pack(m)
        loaded = load_packed(path)
        for n, x in loaded.named_modules():
            if isinstance(x, PackedLinear):
                assert torch.equal(x.compression.scale, records[n].scale.float()), n
                assert torch.equal(x.compression.zero, records[n].zero.float()), n
        assert pack_report(loaded).layers["path"].tolist() == pack_report(m).layers[
            "path"].tolist()
        assert torch.equal(logits(loaded), logits(m))
        from toolkit import load_compressed

        assert torch.equal(logits(load_compressed(path, packed=True)), logits(m))
        with pytest.raises(ValueError, match="packed layers"):  # never written as dense tensors
            save_compressed(m, tmp_path / f"again{i}")
        assert not (tmp_path / f"again{i}").exists()


def test_bad_arguments(awkward):
    m = copy.deepcopy(awkward)
    with pytest.raises(ValueError, match="compute_dtype must be"):
        pack(m, compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="joint must be one of 'auto', 'codes', 'bitmask'"):
        pack(m, joint="dense")
    with pytest.raises(ValueError, match="pruned must be one of 'dense', 'bitmask'"):
        pack(m, pruned="codes")
    with pytest.raises(PackError, match="do not fit the int4 kernel"):
        Int4Linear(_codes(16, 64, 5, [64]), None)


def test_packed_modules_refuse_another_device_layout():
    layer = Int4Linear(_codes(16, 64, 4, [64]), None)
    with pytest.raises(RuntimeError, match="pack the model on the device it runs on"):
        layer._matmul(torch.zeros(1, 64, device="meta"))


def test_classes_are_listed():
    mod = sys.modules["toolkit.runtime.pack"]
    for cls in (Int4Linear, Int8Linear, BitmaskLinear, DecodeLinear, Sparse24Linear):
        assert cls.path in mod.PATHS and cls.__name__ in mod.__all__


# ---- the real model -----------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_packed(smollm2, wikitext_test):
    """SmolLM2 at 4 bits, group 128 (576 columns: partial groups in 6 of 7 layer kinds):
    float32 packing gives the dequantized logits; the default bfloat16 kernels change the
    perplexity by well under 1%; the linear layers take < 0.35 of their fp16 bytes."""
    from toolkit import perplexity

    model, tok = smollm2
    compress(model, tok, bits=4, group_size=128, quant="rtn", verbose=False)
    ids = tok(wikitext_test[:4000], return_tensors="pt").input_ids[:, :32]
    ref = logits(model, ids)
    ppl = perplexity(model, tok, wikitext_test, seqlen=128, max_windows=4, verbose=False)
    fp32 = copy.deepcopy(model)
    rep = pack(fp32, compute_dtype=torch.float32)
    assert (rep.layers["path"] == "int4").all() and len(rep.layers) == 210
    err = float((logits(fp32, ids) - ref).abs().max())
    assert err <= 1e-4 * float(ref.abs().max())  # 30 blocks of float32 rounding
    del fp32
    rep = pack(model)
    assert rep.summary["ratio to fp16"] <= 0.35
    ppl_packed = perplexity(model, tok, wikitext_test, seqlen=128, max_windows=4, verbose=False)
    assert abs(ppl_packed / ppl - 1) < 0.01, (ppl, ppl_packed)
