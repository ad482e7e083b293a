"""The call exactly as users write it: compress(model, sparsity=0.5, bits=4)."""

from __future__ import annotations

import pytest
import torch
from conftest import SMOLLM2_EVAL, SMOLLM2_THREADS, torch_threads

from toolkit import compress, perplexity
from toolkit.loading import smollm2_gguf_path
from toolkit.model.layers import find_blocks, find_linears


def _check_exact(model, report, sparsity, bits, group_size):
    blocks_name, blocks = find_blocks(model)
    for b, blk in enumerate(blocks):
        for ref in find_linears(blk, f"{blocks_name}.{b}"):
            w = ref.get_weight().float()
            comp = ref.module.compression
            assert comp.sparsity == round(sparsity * w.numel()) / w.numel()
            assert int((w == 0).sum()) >= round(sparsity * w.numel())
            cols = w.shape[1]
            n_groups = -(-cols // group_size)
            assert comp.scale.shape == (w.shape[0], n_groups)
            g = torch.arange(cols) // group_size
            q = w / comp.scale[:, g] + comp.zero[:, g]
            assert torch.equal((comp.scale[:, g] * (q.round() - comp.zero[:, g])), w), ref.name
            assert q.round().min() >= 0 and q.round().max() <= 2**bits - 1
    s = report.summary
    assert s["method"] == "sparsegpt 50% + gptq 4-bit g128 asym"
    assert s["calibration"] == "python-docs"


#: Perplexity after the one-line call in float32 (default calibration: python-docs, 16 x 256
#: tokens; SMOLLM2_EVAL windows; SMOLLM2_THREADS threads), as measured on two machines: 166.54
#: (AMD EPYC) and 149.78 (the CI machine of another kind). In float32 the order of float sums,
#: which the CPU sets, decides some mask and rounding choices at this calibration size, and the
#: value moves by 10% between machines with nothing wrong, so this test checks the call with a
#: band around their middle; the regression check of the same setting is
#: tests/test_quality_pinned.py (float64, where float order cannot move a choice, pinned within
#: 0.5%). The test prints the measured value with ``pytest -s``.
USER_CALL_MEASURED = (149.78, 166.54)
USER_CALL_BAND = 0.2  # relative, around the middle of the measured values


@pytest.mark.slow
def test_smollm2_exactly_as_users_write_it(monkeypatch, wikitext_test):
    """SmolLM2 loaded from its GGUF file as a user would, then the one-line call: every layer
    exactly 50% sparse and on its 4-bit grids, and the perplexity within the band of
    :data:`USER_CALL_BAND` (a broken sweep lands far outside it: magnitude pruning alone gives
    521 on WikiText-2, against 77 for SparseGPT).

    576-column layers with the default group size 128 have 4 full groups and one of 64
    (issue 12). SmolLM2's weights were stored on a 4-bit grid (Q4_1, blocks of 32).
    """
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TOOLKIT_DEFAULT_CALIBRATION", "16x256")  # CI-sized default
    path = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    with torch_threads(SMOLLM2_THREADS):
        report = compress(model, sparsity=0.5, bits=4)
        assert report.summary["nsamples"] == 16 and report.summary["seqlen"] == 256
        _check_exact(model, report, 0.5, 4, 128)
        from toolkit.api import _find_tokenizer

        tok = _find_tokenizer(model)
        ppl = perplexity(model, tok, wikitext_test, verbose=False, **SMOLLM2_EVAL)
    print(f"\nuser call perplexity = {ppl:.4f}")
    middle = sum(USER_CALL_MEASURED) / 2
    assert abs(ppl / middle - 1) <= USER_CALL_BAND, (ppl, USER_CALL_MEASURED)


def test_tiny_model_from_a_local_folder(tmp_path, monkeypatch, smollm2_shared):
    """A tiny random LLaMA saved with a tokenizer; loaded from the folder; the one-line call."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = smollm2_shared
    monkeypatch.setenv("TOOLKIT_DEFAULT_CALIBRATION", "4x128")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    report = compress(model, sparsity=0.5, bits=4)
    assert report.summary["nsamples"] == 4 and report.summary["seqlen"] == 128
    _check_exact(model, report, 0.5, 4, 128)


def test_no_tokenizer_found_fails_before_touching_weights(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pass tokenizer="):
        compress(model, sparsity=0.5, bits=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
