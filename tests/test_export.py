"""Round trips of compressed checkpoints (compressed-tensors format, safetensors only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import random_ids, tiny_model

import toolkit
from toolkit.export import (
    WEIGHTS_NAME,
    CheckpointError,
    describe_checkpoint,
    load_compressed,
    save_compressed,
)

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
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "on disk" in describe_checkpoint(out)

    # 2. float16 dense tensors and scales: bytes on disk vs the size accounting
    half = save_compressed(model, tmp_path / "half", dtype=torch.float16)
    on_disk = (half / WEIGHTS_NAME).stat().st_size
    accounted = toolkit.model_bytes(model)["bytes"]
    assert abs(on_disk / accounted - 1) < 0.06, (on_disk, accounted)
    with torch.no_grad():
        got16 = load_compressed(half, dtype=torch.float32)(BATCH).logits
    assert (got16 - ref).abs().max() < 2e-2

    # 3. the compressed layers shrink as expected against the same layers in fp16
    header = _header(half)
    layers = {n for n, m in model.named_modules() if getattr(m, "compression", None) is not None}
    comp_bytes = sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                     if k.rsplit(".", 1)[0] in layers)
    dense_bytes = 2 * sum(m.weight.numel() for n, m in model.named_modules() if n in layers)
    ratio = comp_bytes / dense_bytes
    limit = {"50%": 0.6, "2:4": 0.6, "4bit-g128": 0.27, "3bit-g64": 0.22, "8bit": 0.52,
             "50%+4bit": 0.25}[name]
    assert ratio < limit, ratio


def test_sizes_printed(tmp_path, capsys):
    """Not a check: prints disk bytes vs accounting for every config (llama), for the report."""
    for name, kw in CONFIGS.items():
        model, _ = _compressed("llama", **kw)
        out = save_compressed(model, tmp_path / name, dtype=torch.float16)
        disk = (out / WEIGHTS_NAME).stat().st_size
        acc = toolkit.model_bytes(model)["bytes"]
        with capsys.disabled():
            print(f"\n{name:>10}: disk {disk:,} accounting {acc:,.0f} ratio {disk / acc:.3f}")


def test_transformers_from_pretrained_symmetric(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _compressed("llama", bits=4, group_size=128, sym=True)
    out = save_compressed(model, tmp_path / "ckpt")
    assert json.loads((out / "toolkit_compression.json").read_text())["transformers_loadable"]
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(plain(BATCH).logits, model(BATCH).logits)


def test_transformers_from_pretrained_asymmetric_fails_loudly(tmp_path):
    """transformers 5.24 + compressed-tensors 0.20.1 expect an unpacked zero point: an error,
    never garbage."""
    from transformers import AutoModelForCausalLM

    model, _ = _compressed("llama", bits=4, group_size=128)
    out = save_compressed(model, tmp_path / "ckpt")
    assert not json.loads((out / "toolkit_compression.json").read_text())["transformers_loadable"]
    with pytest.raises(Exception, match="mismatch|size"):
        AutoModelForCausalLM.from_pretrained(out)


def test_transformers_layout_stores_sparse_dense_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _compressed("llama", sparsity=0.5)
    out = save_compressed(model, tmp_path / "ckpt", layout="transformers")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["sparsity_config"]["format"] == "dense"
    assert cfg["sparsity_config"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    plain = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(plain(BATCH).logits, model(BATCH).logits)


def test_config_describes_layers(tmp_path):
    model, report = _compressed("llama", sparsity=0.5, bits=4, group_size=64,
                                overrides={"down_proj": {"bits": 8}})
    out = save_compressed(model, tmp_path / "ckpt", report=report)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = qc["config_groups"].values()
    bits = {g["weights"]["num_bits"]: g["targets"] for g in groups}
    assert set(bits) == {4, 8}
    assert all(t.endswith("down_proj") for t in bits[8])
    assert qc["sparsity_config"]["format"] == "sparse-bitmask"
    text = describe_checkpoint(out)
    assert "down_proj" in text and "dense fp16" in text and "64" in text
    assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)


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


def test_act_order(tmp_path):
    """Dynamic act-order with groups maps columns to groups out of order (g_idx), which the
    format cannot store: refused, nothing written. Static groups with act-order keep g_idx
    contiguous and round-trip exactly; so does one grid per row."""
    model, _ = _compressed("llama", bits=4, group_size=32, act_order=True)
    gidx = [m.compression.g_idx for m in model.modules()
            if getattr(m, "compression", None) is not None]
    assert all(not torch.equal(g.long(), torch.arange(g.numel()) // 32) for g in gidx)
    with pytest.raises(ValueError, match="act_order"):
        save_compressed(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    model, _ = _compressed("llama", bits=4, group_size=32, act_order=True, static_groups=True)
    gidx = [m.compression.g_idx for m in model.modules()
            if getattr(m, "compression", None) is not None]
    assert gidx and all(torch.equal(g.long(), torch.arange(g.numel()) // 32) for g in gidx)
    out = save_compressed(model, tmp_path / "static")
    assert torch.equal(load_compressed(out)(BATCH).logits, model(BATCH).logits)
    # one grid per row: act-order needs no group index
    model, _ = _compressed("llama", bits=4, group_size=None, act_order=True)
    out = save_compressed(model, tmp_path / "rows")
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
    return save_compressed(model, tmp_path / "ckpt")


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


@pytest.mark.slow
def test_smollm2_fresh_process(smollm2, wikitext_valid, wikitext_test, tmp_path):
    model, tok = smollm2
    report = toolkit.compress(model, tok, sparsity=0.5, bits=4, calibration=wikitext_valid,
                              nsamples=8, seqlen=128, verbose=False)
    ppl = toolkit.perplexity(model, tok, wikitext_test, seqlen=128, max_windows=8)
    out = save_compressed(model, tmp_path / "smollm2", report=report, tokenizer=tok)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"\nSmolLM2 50%+4-bit folder: {size:,} bytes, weights "
          f"{(out / WEIGHTS_NAME).stat().st_size:,}; accounting "
          f"{toolkit.model_bytes(model)['bytes']:,.0f} (fp16 dense); ppl {ppl!r}")
    code = (
        "import sys, toolkit; from pathlib import Path; "
        "from transformers import AutoTokenizer; from toolkit.export import load_compressed; "
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
