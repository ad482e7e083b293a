"""Byte accounting: hand-computed cases, compressed-tensors' own packing, whole models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import random_ids, tiny_model

from toolkit import compress
from toolkit.checkpoint.size import linear_bits, linear_bytes, model_bytes

# ---- standard and compact layouts, by hand -----------------------------------------------


def test_dense_weight():
    assert linear_bytes(4, 8) == {"weight": 4 * 8 * 2}
    assert linear_bytes(4, 8, dense_bits=32) == {"weight": 128}
    assert linear_bytes(4, 8, layout="compact") == {"weight": 4 * 8 * 2}


def test_sparse_bitmask_by_hand():
    # 4 x 10, 17 non-zeros, fp16: values 17*2, bitmask 4 rows * ceil(10/8)=2 bytes,
    # row offsets int64 per row, shape int64[2]
    t = linear_bytes(4, 10, nnz=17, layout="compact")
    assert t == {"compressed": 34, "bitmask": 8, "row_offsets": 32, "shape": 16}
    assert sum(t.values()) == 90


def test_sparse_24_by_hand():
    t = linear_bytes(4, 8, pattern=(2, 4), layout="compact")
    assert t == {"compressed": 4 * 4 * 2, "bitmask": 4, "shape": 16}


def test_other_nm_uses_sparse_bitmask():
    t = linear_bytes(2, 8, pattern=(4, 8), nnz=8, layout="compact")
    assert t == {"compressed": 16, "bitmask": 2, "row_offsets": 16, "shape": 16}


def test_pack_quantized_partial_last_group_by_hand():
    # 33 x 200, 4-bit, g128 -> groups of 128 and 72: G = 2. 128 does not divide 200, so the
    # export uses the block strategy, whose zero points stay int8 (not packed)
    t = linear_bytes(33, 200, bits=4, group_size=128)
    assert t == {
        "weight_packed": 33 * math.ceil(200 * 4 / 32) * 4,  # 25 int32 words per row
        "weight_scale": 33 * 2 * 2,  # fp16 per row and group
        "weight_zero_point": 33 * 2,  # int8 per row and group
        "weight_shape": 16,
    }
    assert sum(t.values()) == 3300 + 132 + 66 + 16
    # a dividing group size: zero points packed along the rows, 33 * 4 bits -> 5 words per group
    assert linear_bytes(33, 256, bits=4, group_size=128)["weight_zero_point"] == 5 * 2 * 4
    # ... unless other layers of these settings need the block strategy (int8, unpacked)
    assert linear_bytes(33, 256, bits=4, group_size=128, block=True)["weight_zero_point"] == \
        33 * 2


def test_pack_quantized_sym_act_order_by_hand():
    # 33 x 100, 3-bit, one grid per row, symmetric: no zero point; act-order adds int32 g_idx
    t = linear_bytes(33, 100, bits=3, group_size=None, sym=True, act_order=True)
    assert t == {"weight_packed": 33 * 10 * 4, "weight_scale": 33 * 2, "weight_g_idx": 400,
                 "weight_shape": 16}
    # asymmetric: 33 rows * 3 bits = 99 bits -> 4 words
    assert linear_bytes(33, 100, bits=3)["weight_zero_point"] == 16


def test_pruned_and_quantized_by_hand():
    # 4 x 256, 512 kept, 4-bit g128 asym: the compact layout stores the kept codes only
    # (512 * 4 bits = 64 words) and a bitmask; the standard layout stores every code
    t = linear_bytes(4, 256, nnz=512, bits=4, group_size=128, layout="compact")
    assert t == {"weight_packed": 64 * 4, "weight_bitmask": 4 * 32, "weight_scale": 4 * 2 * 2,
                 "weight_zero_point": 1 * 2 * 4, "weight_shape": 16}
    assert linear_bytes(4, 256, nnz=512, bits=4, group_size=128) == \
        linear_bytes(4, 256, bits=4, group_size=128) == \
        {"weight_packed": 4 * 32 * 4, "weight_scale": 4 * 2 * 2, "weight_zero_point": 1 * 2 * 4,
         "weight_shape": 16}


def test_standard_layout_stores_sparse_dense():
    assert linear_bytes(4, 10, nnz=17) == {"weight": 80}
    assert linear_bytes(4, 8, pattern=(2, 4)) == {"weight": 64}
    with pytest.raises(ValueError, match="'standard', 'compact', 'packed'"):
        linear_bytes(4, 10, layout="transformers")


# ---- packed layout, by hand ----------------------------------------------------------------


def test_packed_layout_by_hand():
    # 4 x 200, 400 kept, 4-bit g128 asym: codes 400*4 bits, bitmask 800 bits, 8 scales fp16,
    # 8 zero points of 4 bits
    t = linear_bytes(4, 200, nnz=400, bits=4, group_size=128, layout="packed")
    assert t == {"values": 200, "bitmask": 100, "scale": 16, "zero_point": 4}
    assert linear_bits(4, 200, kept=400, sparse="bitmask", bits=4, group_size=128) == 320 * 8


def test_packed_nm_index_bits():
    # 2:4 on 2 x 8: 8 kept fp16 values + 2 index bits each (1 bit per weight)
    assert linear_bytes(2, 8, pattern=(2, 4), layout="packed") == {"values": 16, "index": 2}
    # 4:8 on 1 x 8: 4 kept + 3 index bits each
    assert linear_bytes(1, 8, pattern=(4, 8), layout="packed")["index"] == 1.5


def test_invalid_arguments():
    with pytest.raises(ValueError, match="layout"):
        linear_bytes(2, 2, layout="gguf")
    with pytest.raises(ValueError, match="multiple"):
        linear_bytes(2, 6, pattern=(2, 4))
    with pytest.raises(ValueError, match="nnz"):
        linear_bytes(2, 2, nnz=5)


# ---- against compressed-tensors' own compressor --------------------------------------------


@pytest.mark.parametrize("rows,cols,bits,group_size,sym", [
    (33, 256, 3, 128, False), (40, 96, 4, 32, True), (7, 64, 8, None, False), (16, 64, 2, 16, False),
])
def test_matches_compressed_tensors_pack_quantized(rows, cols, bits, group_size, sym):
    import compressed_tensors.compressors.pack_quantized.base as pq
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups = cols // group_size if group_size else 1
    args = QuantizationArgs(num_bits=bits, group_size=group_size, symmetric=sym,
                            strategy="group" if group_size else "channel")
    state = {"weight": torch.randn(rows, cols, dtype=torch.float16),
             "weight_scale": torch.rand(rows, groups, dtype=torch.float16) + 0.1,
             "weight_zero_point": torch.zeros(rows, groups, dtype=torch.int8)}
    out = pq.PackedQuantizationCompressor.compress(
        state, QuantizationScheme(targets=["Linear"], weights=args))
    stored = {k: v.numel() * v.element_size() for k, v in out.items()}
    assert stored == linear_bytes(rows, cols, bits=bits, group_size=group_size, sym=sym)


def test_matches_compressed_tensors_block_strategy():
    """Partial last group: what the export writes with the format's block strategy."""
    import compressed_tensors.compressors.pack_quantized.base as pq
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    rows, cols, bits, g = 33, 200, 4, 128
    args = QuantizationArgs(num_bits=bits, symmetric=False, strategy="block",
                            block_structure=[1, g])
    state = {"weight": torch.randn(rows, cols, dtype=torch.float16),
             "weight_scale": torch.rand(rows, 2, dtype=torch.float16) + 0.1,
             "weight_zero_point": torch.zeros(rows, 2, dtype=torch.int8)}
    out = pq.PackedQuantizationCompressor.compress(
        state, QuantizationScheme(targets=["Linear"], weights=args))
    stored = {k: v.numel() * v.element_size() for k, v in out.items()}
    assert stored == linear_bytes(rows, cols, bits=bits, group_size=g)


def test_matches_compressed_tensors_bitmask_packing():
    import compressed_tensors.utils.helpers as helpers
    mask = torch.rand(5, 13) > 0.5
    packed = helpers.pack_bitmasks(mask)
    t = linear_bytes(5, 13, nnz=int(mask.sum()), layout="compact")
    assert packed.numel() * packed.element_size() == t["bitmask"]


# ---- whole models ----------------------------------------------------------------------------


def _by_hand(model, dense_bits=16):
    """Sum of dense parameters at dense_bits plus linear_bytes of each compressed weight."""
    total, seen = 0.0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            info = getattr(module, "compression", None)
            if info is not None and name == "weight":
                s = info.settings
                total += sum(linear_bytes(*p.shape, nnz=int((p != 0).sum()), pattern=s.pattern,
                                          sparse=s.prunes, bits=s.bits, group_size=s.group_size,
                                          sym=s.sym, block=bool(s.bits and not s.sym
                                                                and s.group_size)).values())
            else:
                total += p.numel() * dense_bits / 8
    return total


def test_model_bytes_dense_and_tied():
    model = tiny_model("gpt2")  # ties wte and lm_head
    assert model.lm_head.weight is model.transformer.wte.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    size = model_bytes(model)
    assert size["total_params"] == n
    assert size["bytes"] == n * 2 and size["dense_bytes"] == n * 2
    assert size["compressed_params"] == 0 and size["bits_per_weight"] == 16
    assert model_bytes(model, dense_bits=32)["bytes"] == n * 4


@pytest.mark.parametrize("settings", [
    dict(method="magnitude", sparsity=0.5),
    dict(method="magnitude", pattern="2:4"),
    dict(quant="rtn", bits=4, group_size=48),  # 64 columns: groups of 48 and 16
    dict(method="magnitude", sparsity=0.5, quant="rtn", bits=3, group_size=32),
])
def test_model_bytes_compressed(settings):
    model = tiny_model("llama")
    compress(model, calibration=random_ids(2, 16), nsamples=2, seqlen=16, verbose=False,
             **settings)
    for layout in ("standard", "compact", "packed"):
        size = model_bytes(model, layout=layout)
        linears = [m for m in model.modules() if hasattr(m, "compression")]
        assert size["compressed_params"] == sum(m.weight.numel() for m in linears)
        assert size["bytes"] == pytest.approx(size["dense_bytes"] + size["compressed_bytes"])
        assert size["bits_per_weight"] == pytest.approx(
            8 * size["compressed_bytes"] / size["compressed_params"])
        assert sum(size["terms"].values()) == pytest.approx(size["compressed_bytes"])
    assert model_bytes(model)["bytes"] == pytest.approx(_by_hand(model))
    dense = model_bytes(tiny_model("llama"))
    assert model_bytes(model, layout="compact")["bytes"] < dense["bytes"]
    assert model_bytes(model)["bytes"] <= dense["bytes"]  # standard: pruned-only stays dense


def test_model_bytes_rtn4_per_layer_by_hand():
    model = tiny_model("llama")  # hidden 64, intermediate 128, 2 blocks, 4 heads, 2 kv heads
    compress(model, quant="rtn", bits=4, group_size=128, calibration=random_ids(2, 16),
             nsamples=2, seqlen=16, verbose=False)
    size = model_bytes(model)
    # per block: q,o 64x64; k,v 32x64; gate,up 128x64; down 64x128 -- all 4-bit, one group
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    # asymmetric zero points are stored as int8, one per row and group (the block strategy)
    per_block = sum(r * math.ceil(c * 4 / 32) * 4 + r * 2 + r + 16
                    for r, c in shapes)
    assert size["compressed_bytes"] == 2 * per_block


@pytest.mark.parametrize("settings,layouts,hidden", [
    (dict(method="magnitude", sparsity=0.5), ("standard", "compact"), 64),
    (dict(method="magnitude", pattern="2:4"), ("standard", "compact"), 64),
    (dict(quant="rtn", bits=4, group_size=48), ("standard", "compact"), 64),  # partial groups
    # 96 columns partial, down_proj's 192 divisible: all 14 layers in the block strategy
    (dict(quant="rtn", bits=4, group_size=64), ("standard", "compact"), 96),
    (dict(method="magnitude", sparsity=0.5, quant="rtn", bits=3, group_size=32),
     ("standard", "compact"), 64),
    (dict(method="magnitude", sparsity=0.5, quant="rtn", bits=4, group_size=32, sym=True,
          overrides={"down_proj": {"bits": None}}), ("standard", "compact"), 64),
])
def test_model_bytes_equal_the_exported_tensors(tmp_path, settings, layouts, hidden):
    """The bytes of every tensor save_compressed writes (fp16) equal model_bytes."""
    import safetensors

    import toolkit.checkpoint.saveload as export
    model = tiny_model("llama", hidden=hidden)
    compress(model, calibration=random_ids(2, 16), nsamples=2, seqlen=16, verbose=False,
             **settings)
    for layout in layouts:
        out = tmp_path / layout
        export.save_compressed(model, out, dtype=torch.float16, layout=layout)
        on_disk = 0
        for f in out.glob("*.safetensors"):
            with safetensors.safe_open(str(f), "pt") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    on_disk += t.numel() * t.element_size()
        assert model_bytes(model, dense_bits=16, layout=layout)["bytes"] == on_disk
        if hidden == 96:
            import json

            meta = json.loads((out / export.TOOLKIT_NAME).read_text())
            assert {e["strategy"] for e in meta["layers"].values()} == {"block"}
            assert len(meta["partial_group_layers"]) == 12  # down_proj's 192 columns divide
            # one layer counted alone: asymmetric grids are stored with the block strategy
            # either way (int8 zero points), so the model's keys change nothing
            from toolkit.checkpoint.saveload import block_keys

            down = model.model.layers[0].mlp.down_proj
            alone = model_bytes(down, layout=layout)["compressed_bytes"]
            inside = model_bytes(down, layout=layout,
                                 block_keys=block_keys(model))["compressed_bytes"]
            assert inside == alone
            assert model_bytes(model, layout=layout, block_keys=set())["bytes"] < on_disk
