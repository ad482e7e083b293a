"""Round trips of compressed checkpoints (compressed-tensors format, safetensors only)."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_ids, tiny_model

import toolkit
from toolkit.checkpoint.formats import GUARD_GROUP, READERS
from toolkit.checkpoint.saveload import (
    TOOLKIT_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    check_savable,
    checkpoint_info,
    checkpoint_readers,
    describe_checkpoint,
    is_checkpoint,
    load_compressed,
    save_compressed,
)
from toolkit.config.options import CompressConfig

CONFIGS = {
    "50%": dict(sparsity=0.5),
    "2:4": dict(pattern="2:4"),
    "4bit-g128": dict(bits=4, group_size=128),
    "3bit-g64": dict(bits=3, group_size=64),
    "8bit": dict(bits=8),
    "50%+4bit": dict(sparsity=0.5, bits=4, group_size=128),
}
HIDDEN = 256  # hidden 256, MLP 512: two or four groups of 128 per row


def _compressed(family, hidden=HIDDEN, **kw):
    model = tiny_model(family, hidden=hidden)
    report = toolkit.compress(model, calibration=random_ids(8, 32), nsamples=8, seqlen=32,
                              verbose=False, **kw)
    return model, report


def _header(folder):
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}


def _data_bytes(folder) -> int:
    """The bytes of the tensors in the safetensors file, read from its header (independent of
    toolkit.checkpoint.size); checks that the file is the 8-byte length, the header and exactly those."""
    raw = (folder / WEIGHTS_NAME).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = _header(folder)
    data = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in header.values())
    assert len(raw) == 8 + n + data
    return data


BATCH = random_ids(2, 24, seed=1)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_exact_and_sizes(tmp_path, family, name):
    model, report = _compressed(family, **CONFIGS[name])
    with torch.no_grad():
        ref = model(BATCH).logits
    # 1. float32 (the model's dtype): the stored values are exact, so are the logits
    out = save_compressed(model, tmp_path / "ckpt", report=report)
    loaded = load_compressed(out)
    with torch.no_grad():
        got = loaded(BATCH).logits
    assert torch.equal(got, ref), (got - ref).abs().max()
    cfg = json.loads((out / "config.json").read_text())
    if CONFIGS[name].get("bits"):
        assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    else:  # pruned only: a plain dense folder
        assert "quantization_config" not in cfg
    assert "on disk" in describe_checkpoint(out)

    # 2. float16 dense tensors and scales: the tensor bytes on disk are the size accounting,
    # byte for byte (the file adds only the safetensors header)
    half = save_compressed(model, tmp_path / "half", dtype=torch.float16)
    assert _data_bytes(half) == toolkit.model_bytes(model)["bytes"]
    with torch.no_grad():
        got16 = load_compressed(half, dtype=torch.float32)(BATCH).logits
    assert (got16 - ref).abs().max() < 2e-2

    # 3. the compressed layers shrink as expected against the same layers in fp16: the
    # standard layout stores pruned-only layers dense and every code of quantized ones, the
    # compact layout the kept values / codes and a bitmask
    layers = {n for n, m in model.named_modules() if getattr(m, "compression", None) is not None}
    dense_bytes = 2 * sum(m.weight.numel() for n, m in model.named_modules() if n in layers)
    compact = save_compressed(model, tmp_path / "compact", dtype=torch.float16, layout="compact")
    for folder, limits in ((half, {"50%": 1.0, "2:4": 1.0, "4bit-g128": 0.27, "3bit-g64": 0.22,
                                   "8bit": 0.52, "50%+4bit": 0.27}),
                           (compact, {"50%": 0.6, "2:4": 0.6, "4bit-g128": 0.27,
                                      "3bit-g64": 0.22, "8bit": 0.52, "50%+4bit": 0.25})):
        header = _header(folder)
        comp_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                         if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias"))
        ratio = comp_bytes / dense_bytes
        assert ratio <= limits[name], (folder.name, ratio)
        assert _data_bytes(folder) == toolkit.model_bytes(
            model, layout=folder.name if folder is compact else "standard")["bytes"]
    with torch.no_grad():
        assert torch.equal(load_compressed(compact, dtype=torch.float32)(BATCH).logits, got16)


def test_transformers_from_pretrained_symmetric(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _compressed("llama", bits=4, group_size=128, sym=True)
    out = save_compressed(model, tmp_path / "ckpt")
    assert checkpoint_readers(out)["transformers"].status == "loads"
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(plain(BATCH).logits, model(BATCH).logits)


def test_default_file_loads_in_plain_from_pretrained(tmp_path):
    """compress(model, tok, bits=4) + save_compressed with every default opens with plain
    AutoModelForCausalLM.from_pretrained, with the saved model's logits. The default grid is
    asymmetric (bench/symmetry.py: on SmolLM2 symmetric grids cost +22% perplexity at 4 bits);
    transformers >= 5.23 reads asymmetric zero points only in the format's block strategy, so
    asymmetric layers are stored that way (vLLM refuses it, by its format rules: sym=True gives
    the group strategy it reads)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = tiny_model("llama", hidden=HIDDEN)
    toolkit.compress(model, None, bits=4, calibration=random_ids(8, 32), nsamples=8, seqlen=32,
                     verbose=False)
    assert CompressConfig().sym is False  # the default grid, as measured
    out = save_compressed(model, tmp_path / "ckpt")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    assert group["weights"]["strategy"] == "block" and not group["weights"]["symmetric"]
    assert group["weights"]["block_structure"] == [1, 128]
    readers = checkpoint_readers(out)
    assert [readers[k].status for k in ("transformers", "dequantize", "load_compressed",
                                        "vllm")] == ["loads", "loads", "loads", "error"]
    assert "sym=True" in readers["vllm"].reason
    with torch.no_grad():
        ref = model(BATCH).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(BATCH).logits, ref)
        deq = AutoModelForCausalLM.from_pretrained(
            out, quantization_config=CompressedTensorsConfig(dequantize=True))
        assert torch.equal(deq(BATCH).logits, ref)
        assert torch.equal(load_compressed(out)(BATCH).logits, ref)
    # the zero points stay int8 (unpacked): what model_bytes counts
    assert _data_bytes(save_compressed(model, tmp_path / "half", dtype=torch.float16)) == \
        toolkit.model_bytes(model)["bytes"]


def test_symmetric_default_off_one_flag_away(tmp_path):
    """sym=True: the group strategy (vLLM's WNA16 reads it) and plain from_pretrained."""
    model, _ = _compressed("llama", bits=4, sym=True)
    out = save_compressed(model, tmp_path / "ckpt")
    (group,) = json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"].values()
    assert group["weights"]["strategy"] == "group" and group["weights"]["symmetric"]
    readers = checkpoint_readers(out)
    assert all(v.status == "loads" for k, v in readers.items() if k != "dequantize")


def test_asymmetric_per_row_names_its_loading_path(tmp_path, caplog):
    """A folder plain from_pretrained refuses (asymmetric, one grid per row: zero points packed
    down the rows): save_compressed says so in one warning with the way it loads, the same
    verdicts toolkit info prints."""
    from toolkit.checkpoint.saveload import checkpoint_info, readers_summary

    model, _ = _compressed("llama", bits=4, group_size=None)
    with caplog.at_level(logging.INFO, logger="toolkit"):
        out = save_compressed(model, tmp_path / "ckpt")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "transformers' from_pretrained refuses it" in warnings[0]
    assert "CompressedTensorsConfig(dequantize=True)" in warnings[0]
    assert "toolkit.load_compressed" in warnings[0]
    readers = checkpoint_readers(out)
    assert readers["transformers"].status == "error" and readers["dequantize"].status == "loads"
    info = checkpoint_info(out)
    summary = readers_summary(out)
    for text in (info.text, summary):
        assert "refuses: asymmetric zero points packed along the rows" in text
        assert "CompressedTensorsConfig(dequantize=True)" in text


def test_standard_layout_stores_pruned_layers_dense(tmp_path):
    """Pruned-only: a plain dense folder (no quantization stub), as llm-compressor 0.14 writes
    it; the sparsity is in toolkit_compression.json."""
    from transformers import AutoModelForCausalLM

    model, _ = _compressed("llama", sparsity=0.5)
    out = save_compressed(model, tmp_path / "ckpt")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    meta = json.loads((out / TOOLKIT_NAME).read_text())
    assert {e["format"] for e in meta["layers"].values()} == {"dense"}
    assert all(e["sparsity"] == pytest.approx(0.5, abs=0.01) for e in meta["layers"].values())
    assert len(meta["dense_sparse_layers"]) == 14
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(plain(BATCH).logits, model(BATCH).logits)
    loaded = load_compressed(out)  # the records come back: model_bytes counts it as pruned
    assert toolkit.model_bytes(loaded)["bytes"] == toolkit.model_bytes(model)["bytes"]
    assert toolkit.model_bytes(loaded, layout="compact")["bytes"] == \
        toolkit.model_bytes(model, layout="compact")["bytes"]


def test_config_describes_layers(tmp_path):
    model, report = _compressed("llama", sparsity=0.5, bits=4, group_size=64,
                                overrides={"down_proj": {"bits": 8}})
    out = save_compressed(model, tmp_path / "ckpt", report=report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # several schemes: a guard group first, which transformers' dequantizing path takes for
    # every layer and fails on (see test_readers.py)
    assert list(qc["config_groups"])[0] == GUARD_GROUP
    assert qc["config_groups"][GUARD_GROUP]["targets"] == []
    groups = [g for k, g in qc["config_groups"].items() if k != GUARD_GROUP]
    bits = {g["weights"]["num_bits"]: g["targets"] for g in groups}
    assert set(bits) == {4, 8}
    assert all(t.endswith("down_proj") for t in bits[8])
    assert {g["format"] for g in groups} == {"pack-quantized"} and qc["format"] == "pack-quantized"
    assert checkpoint_readers(out)["dequantize"].status == "error"
    assert qc["ignore"] == ["lm_head"]  # every other linear layer is a target
    assert qc["sparsity_config"]["format"] == "dense"  # pruned + quantized, stored densely
    assert sorted(qc["sparsity_config"]["targets"]) == sorted(bits[4] + bits[8])
    text = describe_checkpoint(out)
    assert "down_proj" in text and "dense fp16" in text and "64" in text
    assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)
    compact = save_compressed(model, tmp_path / "compact", layout="compact")
    qc = json.loads((compact / "config.json").read_text())["quantization_config"]
    assert {g["format"] for g in qc["config_groups"].values()} == \
        {"toolkit-sparse-bitmask-pack-quantized"}  # no guard: compressed-tensors refuses it
    assert torch.equal(load_compressed(compact)(BATCH).logits, model(BATCH).logits)


def test_partial_last_group(tmp_path):
    model, _ = _compressed("llama", hidden=96, bits=4, group_size=64)  # 96 = 64 + 32
    with pytest.raises(ValueError, match=r"q_proj \(96 columns\)"):
        save_compressed(model, tmp_path / "refused", partial_groups="error")
    assert not (tmp_path / "refused").exists()
    out = save_compressed(model, tmp_path / "ckpt")
    meta = json.loads((out / "toolkit_compression.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in meta["partial_group_layers"]
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)


def test_act_order_with_dynamic_groups_is_refused(tmp_path):
    """Dynamic act-order with groups maps columns to groups out of order (g_idx), which the
    format cannot store: refused, nothing written."""
    model, _ = _compressed("llama", bits=4, group_size=32, act_order=True)
    gidx = [m.compression.g_idx for m in model.modules()
            if getattr(m, "compression", None) is not None]
    assert len(gidx) == 14
    assert all(not torch.equal(g.long(), torch.arange(g.numel()) // 32) for g in gidx)
    with pytest.raises(ValueError, match="act_order"):
        save_compressed(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_act_order_with_static_groups_round_trips(tmp_path):
    """Static groups with act-order keep g_idx contiguous and round-trip exactly."""
    model, _ = _compressed("llama", bits=4, group_size=32, act_order=True, static_groups=True)
    gidx = [m.compression.g_idx for m in model.modules()
            if getattr(m, "compression", None) is not None]
    assert len(gidx) == 14
    assert all(torch.equal(g.long(), torch.arange(g.numel()) // 32) for g in gidx)
    out = save_compressed(model, tmp_path / "static")
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)


def test_act_order_with_one_grid_per_row_round_trips(tmp_path):
    """One grid per row: act-order needs no group index; the round trip is exact."""
    model, _ = _compressed("llama", bits=4, group_size=None, act_order=True)
    out = save_compressed(model, tmp_path / "rows")
    assert not any(k.endswith("g_idx") for k in _header(out))
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)


def test_atomic_write_and_overwrite(tmp_path, monkeypatch):
    import safetensors.torch

    model, _ = _compressed("llama", hidden=64, bits=4, group_size=32)
    real = safetensors.torch.save_file

    def broken(tensors, filename, metadata=None):
        real({k: tensors[k] for k in list(tensors)[:3]}, filename, metadata=metadata)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        save_compressed(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    out = save_compressed(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        save_compressed(model, out)
    save_compressed(model, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)


@pytest.fixture()
def saved(tmp_path):
    model, _ = _compressed("llama", hidden=64, sparsity=0.5, bits=4, group_size=32)
    return save_compressed(model, tmp_path / "ckpt", layout="compact")


def test_truncated_file(saved):
    f = saved / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_compressed(saved)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor '"):
        load_compressed(saved, verify=False)


def test_corrupt_file(saved):
    f = saved / WEIGHTS_NAME
    raw = bytearray(f.read_bytes())
    raw[-50] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256"):
        load_compressed(saved)
    raw[8:12] = b"\x00\xff{]"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_compressed(saved, verify=False)


def test_missing_tensor(saved):
    from safetensors.torch import load_file, save_file

    f = saved / WEIGHTS_NAME
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight_bitmask"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError,
                       match=r"model.safetensors: missing tensor 'model.layers.1.mlp.up_proj"):
        load_compressed(saved, verify=False)


def test_config_disagrees_with_tensors(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp."):
        load_compressed(saved)


def test_no_pickle(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_compressed(tmp_path)


def test_cli_info(saved, capsys):
    from toolkit.cli import main

    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "sparse" in out and "on disk" in out


def test_default_dtype_is_the_source_checkpoint_dtype(tmp_path):
    """A model loaded in float32 from a bfloat16 checkpoint is saved in bfloat16 (scales and
    dense tensors), so the bytes on disk are what model_bytes (16-bit dense) says."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tiny_model("llama", hidden=128).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"a": 0, "[UNK]": 1}, unk_token="[UNK]"))).save_pretrained(tmp_path / "src")
    for model in (AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32),
                  toolkit.load_model(str(tmp_path / "src"))[0]):
        assert next(model.parameters()).dtype == torch.float32
        report = toolkit.compress(model, bits=4, group_size=64, calibration=random_ids(8, 32),
                                  nsamples=8, seqlen=32, verbose=False)
        out = save_compressed(model, tmp_path / "out", report=report, overwrite=True)
        assert json.loads((out / TOOLKIT_NAME).read_text())["dtype"] == "bfloat16"
        header = _header(out)
        floats = {v["dtype"] for v in header.values() if v["dtype"].startswith(("F", "BF"))}
        assert floats == {"BF16"}
        assert _data_bytes(out) == toolkit.model_bytes(model)["bytes"]
        loaded = load_compressed(out)
        assert next(loaded.parameters()).dtype == torch.bfloat16  # like from_pretrained "auto"
        exact = save_compressed(model, tmp_path / "f32", dtype=torch.float32, overwrite=True)
        with torch.no_grad():
            assert torch.equal(load_compressed(exact)(BATCH).logits, model(BATCH).logits)


def test_float32_load_of_a_bfloat16_file_is_on_the_grid(tmp_path):
    """load_compressed(dtype=torch.float32) of a checkpoint with bfloat16 scales gives every
    weight exactly scale * (q - zero) in float32 -- what transformers' plain float32 load
    gives, logit for logit -- and pack() recovers every code from it."""
    from transformers import AutoModelForCausalLM

    from toolkit.runtime.pack import layer_codes, pack

    for kw in (dict(bits=4, group_size=64), dict(sparsity=0.5, bits=4, group_size=64),
               dict(bits=3, group_size=64, sym=True)):
        model, _ = _compressed("llama", **kw)
        out = save_compressed(model, tmp_path / "bf16", dtype=torch.bfloat16, overwrite=True)
        loaded = load_compressed(out, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        for name, m in loaded.named_modules():
            comp = getattr(m, "compression", None)
            if comp is None:
                continue
            lc = layer_codes(m, name)  # raises when a weight is off its grid
            widths = torch.tensor(lc.widths)
            grid = torch.repeat_interleave(comp.scale, widths, 1) * (
                lc.codes.float() - torch.repeat_interleave(comp.zero, widths, 1))
            assert torch.equal(m.weight, grid), name
            assert comp.scale.dtype == torch.float32 and torch.equal(
                comp.scale, comp.scale.bfloat16().float()), name  # the stored bf16 scales
        with torch.no_grad():
            assert torch.equal(loaded(BATCH).logits, plain(BATCH).logits), kw
        with torch.no_grad():
            ref = loaded(BATCH).logits
        pack(loaded, compute_dtype=torch.float32)
        with torch.no_grad():
            err = float((loaded(BATCH).logits - ref).abs().max())
        assert err <= 2e-5 * float(ref.abs().max()), (kw, err)


def test_files_follow_the_umask(tmp_path):
    import stat

    model, _ = _compressed("llama", hidden=64, bits=4, group_size=32)
    old = os.umask(0o022)
    try:
        out = save_compressed(model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_warnings_are_one_short_line(tmp_path, caplog):
    """A folder every transformers path loads: no warning; the layers stored in the block
    strategy for a partial last group are one INFO line, the readers one line each."""
    model, _ = _compressed("llama", hidden=96, bits=4, group_size=64)
    with caplog.at_level(logging.INFO, logger="toolkit"):
        out = save_compressed(model, tmp_path / "ckpt")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    block = [line for line in info if line.startswith("stored 12 layers whose group size")]
    assert len(block) == 1 and TOOLKIT_NAME in block[0] and len(block[0]) < 300
    assert sum(line.startswith("transformers AutoModelForCausalLM.from_pretrained") and
               " loads" in line for line in info) == 1
    meta = json.loads((out / TOOLKIT_NAME).read_text())
    assert len(meta["partial_group_layers"]) == 12
    # why transformers prints compressed-tensors' warning once per such layer: said once
    assert "compressed-tensors 0.20 marks the warning log-once" in describe_checkpoint(out)


def test_check_savable():
    check_savable(CompressConfig(bits=4, act_order=True, static_groups=True))
    check_savable(CompressConfig(bits=4, act_order=True, group_size=None))
    check_savable(CompressConfig(bits=4, act_order=True, quant="rtn"))  # no g_idx
    check_savable(CompressConfig(sparsity=0.5, act_order=True))  # pruning only
    with pytest.raises(ValueError, match=r"^act_order with group_size 128 maps columns to "
                                         r"groups out of order.*--static-groups") as e:
        check_savable(CompressConfig(bits=4, act_order=True))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"^overrides\['down_proj'\]: act_order with "
                                         r"group_size 32"):
        check_savable(CompressConfig(bits=4, overrides={"down_proj": {"act_order": True,
                                                                      "group_size": 32}}))
    with pytest.raises(ValueError, match="layout must be one of 'standard', 'compact'"):
        check_savable(CompressConfig(bits=4), layout="transformers")


def test_is_checkpoint(tmp_path):
    model, _ = _compressed("llama", hidden=64, sparsity=0.5)
    assert is_checkpoint(save_compressed(model, tmp_path / "ours"))  # no quantization_config
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    assert not is_checkpoint(tmp_path / "plain")
    assert not is_checkpoint(tmp_path / "nothing")


def test_describe_verifies_and_names_readers(tmp_path):
    model, report = _compressed("llama", hidden=64, bits=4, group_size=32, sym=True)
    model.toolkit_source = "tiny-llama"
    out = save_compressed(model, tmp_path / "ckpt", report=report)
    info = checkpoint_info(out, verify=True)
    text = info.text
    assert info.ok is True and info.problems == []
    assert text.splitlines()[0].startswith("checksums ok: model.safetensors (")  # first
    assert "LlamaForCausalLM (llama), 2 blocks, 64 hidden, 128 vocab; from tiny-llama" in text
    assert "SHA-256 OK" in text and "layout standard" in text
    readers = [line for line in text.splitlines() if line.startswith("    ") and
               any(line.strip().startswith(label) for label in READERS.values())]
    assert len(readers) == 4
    assert all(line.split("  ")[-1].split(":")[0].strip() in ("loads", "refuses")
               for line in readers), readers
    assert "load it with AutoModelForCausalLM.from_pretrained(" in text
    # sizes in decimal units: MB = 10^6 bytes
    size = (out / WEIGHTS_NAME).stat().st_size
    assert f"{size:,} bytes ({size / 1e3:,.1f} KB)" in text
    assert "not checked" in describe_checkpoint(out)
    assert checkpoint_info(out).ok is None and not describe_checkpoint(out).startswith("checksums")
    f = out / WEIGHTS_NAME
    raw = bytearray(f.read_bytes())
    raw[-50] ^= 0xFF
    f.write_bytes(bytes(raw))
    info = checkpoint_info(out, verify=True)
    assert info.ok is False and info.problems == [f"{f}: SHA-256 differs from the one recorded "
                                                  "at save time (the file is corrupt)"]
    assert info.text.splitlines()[0] == f"checksums FAILED: {info.problems[0]}"
    assert f"DIFFERS: {f}: SHA-256 differs" in info.text
    # aligned columns: every layer row has its format at the same offset
    rows = [line for line in describe_checkpoint(out).splitlines()
            if line.startswith("  model.layers.")]
    assert len(rows) == 14 and len({line.index("pack-quantized") for line in rows}) == 1


def test_load_then_save_again(tmp_path):
    """load_compressed restores each layer's record with its scales: the loaded model can be
    saved again, to the same tensors."""
    model, _ = _compressed("llama", hidden=64, sparsity=0.5, bits=4, group_size=32)
    first = save_compressed(model, tmp_path / "a")
    again = save_compressed(load_compressed(first), tmp_path / "b")
    a, b = _header(first), _header(again)
    assert a.keys() == b.keys()
    assert {k: v["dtype"] for k, v in a.items()} == {k: v["dtype"] for k, v in b.items()}
    from safetensors.torch import load_file

    ta, tb = load_file(first / WEIGHTS_NAME), load_file(again / WEIGHTS_NAME)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # (file bytes differ: safetensors writes
    # its __metadata__ map in a random order)


def test_files_of_format_version_1_are_flagged(tmp_path):
    """Folders written before the standard layout declared 'pack-quantized' + 'sparse-bitmask'
    over the toolkit's own tensors, which transformers' dequantizing load misread without an
    error. load_compressed still reads them (toolkit_compression.json says what each layer is)
    and toolkit info says which readers cannot."""
    model, _ = _compressed("llama", hidden=64, sparsity=0.5, bits=4, group_size=32, sym=True)
    out = save_compressed(model, tmp_path / "v1", layout="compact")
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["format"] = "pack-quantized"
    for g in qc["config_groups"].values():
        g["format"] = "pack-quantized"
    qc["sparsity_config"] = {"format": "sparse-bitmask", "targets": [], "ignore": [],
                             "global_sparsity": 0.5, "sparsity_structure": "unstructured"}
    (out / "config.json").write_text(json.dumps(cfg))
    meta = json.loads((out / TOOLKIT_NAME).read_text())
    meta["format_version"] = 1
    (out / TOOLKIT_NAME).write_text(json.dumps(meta))
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)
    readers = checkpoint_readers(out)
    assert readers["transformers"].status == "error"
    assert readers["dequantize"].status == "wrong"


@pytest.mark.slow
def test_smollm2_fresh_process(smollm2, wikitext_valid, wikitext_test, tmp_path):
    model, tok = smollm2
    report = toolkit.compress(model, tok, sparsity=0.5, bits=4, calibration=wikitext_valid,
                              nsamples=8, seqlen=128, verbose=False)
    ppl = toolkit.perplexity(model, tok, wikitext_test, seqlen=128, max_windows=8)
    # the default: bfloat16 (what the source declares; a quantized GGUF declares none), the
    # bytes model_bytes counts
    default = save_compressed(model, tmp_path / "default", report=report, tokenizer=tok)
    assert json.loads((default / TOOLKIT_NAME).read_text())["dtype"] == "bfloat16"
    assert _data_bytes(default) == toolkit.model_bytes(model)["bytes"]
    # float32: the exact round trip, in a fresh process
    out = save_compressed(model, tmp_path / "smollm2", report=report, tokenizer=tok,
                          dtype=torch.float32)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"float32 folder: {size:,} bytes; ppl {ppl!r}")
    # the fresh process computes as this one does: the same thread count and algorithms
    # (TOOLKIT_DETERMINISTIC=1 turns deterministic ones on here, which sum in another order)
    code = (
        f"import torch; torch.set_num_threads({torch.get_num_threads()}); "
        f"torch.use_deterministic_algorithms({torch.are_deterministic_algorithms_enabled()}); "
        "import sys, toolkit; from pathlib import Path; "
        "from transformers import AutoTokenizer; from toolkit.checkpoint.saveload import load_compressed; "
        f"p = {str(out)!r}; m = load_compressed(p); t = AutoTokenizer.from_pretrained(p); "
        f"text = Path({str(tmp_path / 'test.txt')!r}).read_text(); "
        "print(repr(toolkit.perplexity(m, t, text, seqlen=128, max_windows=8, verbose=False)))")
    (tmp_path / "test.txt").write_text(wikitext_test)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = float(res.stdout.strip().splitlines()[-1])
    print(f"fresh process ppl {fresh!r}")
    assert fresh == ppl and math.isfinite(fresh)
