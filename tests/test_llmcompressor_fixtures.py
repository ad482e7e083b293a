"""Reading what llm-compressor writes: ``tests/fixtures/llmcompressor`` holds checkpoints made
by llm-compressor 0.14 and 0.10 themselves (README.md there says how, and what each format
stores). ``load_compressed`` must give exactly their reference logits and weights, or refuse
the two formats it cannot read; ``checkpoint_readers`` must predict what transformers really
does with each folder; ``toolkit info`` must describe them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from toolkit.checkpoint.saveload import (
    CheckpointError,
    checkpoint_readers,
    describe_checkpoint,
    is_checkpoint,
    load_compressed,
)

HERE = Path(__file__).resolve().parent / "fixtures" / "llmcompressor"
FIXTURES = sorted(p.parent.name for p in HERE.glob("*/producer.json"))
IDS = torch.arange(16).reshape(1, 16)
#: what load_compressed refuses, and the words that say why
REFUSED = {"llmc0.10-sparse24-w4a16-marlin24": "marlin-24",
           "llmc0.10-sparse24-w8a8": "quantized input activations"}
#: plain dense folders (llm-compressor 0.14 writes pruned-only models without quantization_config)
PLAIN = {"llmc0.14-sparse50", "llmc0.14-sparse24"}


def test_all_fixtures_found():
    assert len(FIXTURES) == 19, FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_load_compressed_gives_the_reference(name):
    folder = HERE / name
    ref = load_file(str(folder / "reference.safetensors"))
    if name in REFUSED:
        with pytest.raises(CheckpointError, match=REFUSED[name]):
            load_compressed(folder)
        return
    model = load_compressed(folder)
    with torch.no_grad():
        logits = model(IDS % ref["logits"].shape[-1]).logits.float()
    assert torch.equal(logits, ref["logits"]), float((logits - ref["logits"]).abs().max())
    weights = {k: v for k, v in ref.items() if k != "logits"}
    assert weights
    for key, want in weights.items():
        module = model.get_submodule(key[: -len(".weight")])
        assert torch.equal(module.weight.float(), want), key
    # the layers llm-compressor compressed, and no other, carry a record (model_bytes counts
    # them); a plain folder has none: nothing in it says which layers were pruned
    compressed = {n for n, m in model.named_modules() if getattr(m, "compression", None)}
    assert compressed == (set() if name in PLAIN else {k[: -len(".weight")] for k in weights})


def _real(folder: Path, dequantize: bool) -> str:
    """What transformers does with the folder: loads (the reference logits), error, wrong."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    transformers.logging.set_verbosity_error()
    ref = load_file(str(folder / "reference.safetensors"))["logits"]
    kw = dict(quantization_config=CompressedTensorsConfig(dequantize=True)) if dequantize else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(folder, **kw).eval()
            with torch.no_grad():
                logits = model(IDS % ref.shape[-1]).logits.float()
    except Exception:  # noqa: BLE001 - any refusal
        return "error"
    return "loads" if torch.equal(logits, ref) else "wrong"


@pytest.mark.parametrize("name", FIXTURES)
def test_reader_predictions_match_transformers(name):
    folder = HERE / name
    said = checkpoint_readers(folder)
    assert said["transformers"].status == _real(folder, False), said["transformers"]
    assert said["dequantize"].status == _real(folder, True), said["dequantize"]
    assert said["load_compressed"].status == ("error" if name in REFUSED else "loads")


def test_predictions_of_the_known_traps():
    """The cases the fixtures README documents, word for word what toolkit info says."""
    legacy = checkpoint_readers(HERE / "llmc0.10-sparse-bitmask")
    assert legacy["transformers"].status == legacy["dequantize"].status == "wrong"
    assert "random initial weights" in legacy["transformers"].reason
    asym = checkpoint_readers(HERE / "llmc0.14-w4a16-asym")
    assert asym["transformers"].status == "error" and asym["dequantize"].status == "loads"
    assert checkpoint_readers(HERE / "llmc0.14-w4a16-sym")["vllm"].status == "loads"
    assert checkpoint_readers(HERE / "llmc0.10-w3a16-g32")["vllm"].status == "error"  # naive


@pytest.mark.parametrize("name", FIXTURES)
def test_is_checkpoint(name):
    assert is_checkpoint(HERE / name) == (name not in PLAIN)


@pytest.mark.parametrize("name", ["llmc0.14-w4a16-sym", "llmc0.14-w4a16-ignore-re",
                                  "llmc0.14-mixed-groups", "llmc0.10-sparse-bitmask",
                                  "llmc0.14-sparse50", "llmc0.10-sparse24-w4a16-marlin24"])
def test_describe(name):
    folder = HERE / name
    text = describe_checkpoint(folder, verify=True)
    ref = load_file(str(folder / "reference.safetensors"))
    layers = [k[: -len(".weight")] for k in ref if k != "logits"]
    config = json.loads((folder / "config.json").read_text())
    assert "LlamaForCausalLM (llama)" in text and "no hashes recorded" in text
    if name in PLAIN:
        assert "plain model folder" in text and "model.layers.0.mlp.down_proj" not in text
    else:
        for layer in layers:  # every compressed layer named, one per line
            assert sum(line.split()[0] == layer for line in text.splitlines()
                       if line.strip()) == 1, layer
        assert f"compressed layers: {len(layers)}," in text
        assert "\n  Linear " not in text
    # the parameter count of the architecture (lm_head untied: 2 x 128 x 64 + blocks + norm)
    h, i, v, n = (config["hidden_size"], config["intermediate_size"], config["vocab_size"],
                  config["num_hidden_layers"])
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    params = 2 * v * h + h + n * (2 * h + 2 * h * h + 2 * h * kv + 3 * h * i)
    assert f"parameters: {params:,} " in text
    for label in ("from_pretrained", "dequantize=True", "load_compressed", "vLLM"):
        assert label in text
