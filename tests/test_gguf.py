"""GGUF out (issue 36): the solver's GGUF block grids, save_gguf, and what readers make of the file.

The checks that matter: every tensor of a written file dequantizes (``gguf.quants.dequantize``,
the reader transformers uses) to the model's weight exactly; transformers' ``from_pretrained(...,
gguf_file=...)`` gives the in-memory model's logits and tokenizer; the solver's error on a GGUF
grid is below round-to-nearest's into the same type.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from toolkit import compress, save_gguf
from toolkit.api import CompressConfig
from toolkit.checkpoint.gguf import (
    check_gguf_model,
    check_gguf_out,
    describe_gguf,
    pack_codes,
    verify_gguf,
)
from toolkit.plan.gguf import embedding_types, fallback_type, layer_role, preset_type
from toolkit.solver.gguf_grids import TYPES, gguf_rtn
from toolkit.solver.hessian import reconstruction_error
from toolkit.solver.layer import solve, solve_layers

gguf = pytest.importorskip("gguf")


def _problem(rows=48, cols=512, n=1024, seed=0):
    """Correlated inputs, heavy-tailed weights (the shape of real layers' trouble)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols,
                                                                                  generator=g))
    X = X * torch.rand(cols, generator=g).mul(3).exp()  # a few loud input channels
    H = 2 / n * X.T @ X
    with torch.random.fork_rng():  # the same weights whatever ran before (StudentT takes no
        torch.manual_seed(seed)    # generator)
        W = torch.distributions.StudentT(4).sample((rows, cols)) * 0.02
    return W, H


def _dequant(data, name):
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]))


# ---- the grids ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TYPES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_solver_codes_are_what_gguf_reads(name, sparsity):
    """Packed with the file's layout, the solver's codes dequantize to its weight exactly."""
    W, H = _problem()
    res = solve(W, H, gguf=name, sparsity=sparsity)
    assert torch.equal(res.gguf.codes(res.weight), res.codes)
    back = _dequant(pack_codes(res.codes, res.gguf), name)
    assert back.dtype == torch.float32 and torch.equal(back, res.weight)
    new, codes, grid = gguf_rtn(W, name)
    assert torch.equal(_dequant(pack_codes(codes, grid), name), new)


@pytest.mark.parametrize("name", list(TYPES))
def test_solver_error_below_round_to_nearest(name):
    W, H = _problem(seed=1)
    res = solve(W, H, gguf=name)
    rtn, _codes, _grid = gguf_rtn(W, name)
    assert res.error < 0.8 * reconstruction_error(W, rtn, H)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_round_to_nearest_fit_not_worse_than_the_reference_quantizer(name):
    """Our round-to-nearest baseline fits its blocks at least as well as the gguf package's
    quantizer (llama.cpp's reference rounding), so the comparison is not against a weak RTN."""
    W, _H = _problem(rows=256)
    new, _c, _g = gguf_rtn(W, name)
    qt = gguf.GGMLQuantizationType[name]
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), qt), qt))
    assert (new - W).pow(2).sum() <= (ref - W).pow(2).sum()


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K", "Q6_K", "Q4_1", "Q2_K", "Q4_K"])
def test_pruned_weights_take_the_code_nearest_zero(name):
    """A pruned weight is stored as the value of its sub-block's grid nearest 0: exactly 0 in
    the offset types; in the types with a minimum within half a step of 0 when the sub-block's
    range holds 0, else the end of the range nearest 0 (a sub-block whose kept weights all
    share a sign: seeds 0-3 of this problem have such sub-blocks under Q2_K)."""
    for seed in range(4):
        W, H = _problem(rows=32, seed=seed)
        res = solve(W, H, gguf=name, sparsity=0.5)
        pruned = ~res.mask
        assert abs(int(pruned.sum()) - W.numel() // 2) <= 1
        vals = res.weight[pruned]
        if not TYPES[name].has_min:  # an offset type: exactly 0
            assert bool((vals == 0).all())
            continue
        sub = TYPES[name].sub
        scale = res.gguf.scale().repeat_interleave(sub, dim=1)[pruned]
        minimum = res.gguf.minimum().repeat_interleave(sub, dim=1)[pruned]
        codes = torch.arange(TYPES[name].maxq + 1, dtype=torch.float32)
        nearest = (scale[:, None] * codes[None, :] - minimum[:, None]).abs().min(1).values
        assert torch.equal(vals.abs(), nearest), (name, seed)
        holds_zero = (minimum >= 0) & (scale * TYPES[name].maxq - minimum >= 0)
        assert bool((vals.abs()[holds_zero] <= scale.abs()[holds_zero] / 2 + 1e-12).all())
        assert float(holds_zero.float().mean()) > 0.9  # the common case


def test_stacked_layers_and_fixed_masks():
    W, H = _problem(rows=40)
    W2 = W[:24] * 2
    masks = [torch.rand_like(W) > 0.3, torch.rand_like(W2) > 0.3]
    out = solve_layers([W, W2], H, gguf="Q4_K", masks=masks)
    for w, r, m in zip([W, W2], out, masks):
        assert r.weight.shape == w.shape and torch.equal(r.mask, m)
        assert torch.equal(_dequant(pack_codes(r.codes, r.gguf), "Q4_K"), r.weight)


def test_grid_refuses_what_it_cannot_store():
    W, H = _problem(cols=576)
    with pytest.raises(ValueError, match="Q4_K stores rows in blocks of 256.*Q5_0"):
        solve(W, H, gguf="Q4_K")
    W, H = _problem()
    with pytest.raises(ValueError, match="gguf must be one of"):
        solve(W, H, gguf="Q7_0")
    with pytest.raises(ValueError, match="not both"):
        solve(W, H, gguf="Q4_0", bits=4)
    with pytest.raises(ValueError, match="act_order"):
        solve(W, H, gguf="Q4_0", act_order=True)
    res = solve(W, H, gguf="Q4_0")
    w = res.weight.clone()
    w[3, 5] += 1e-3
    with pytest.raises(ValueError, match=r"\[3, 5\].*not a value of its Q4_0 grid"):
        res.gguf.codes(w)


def test_config_validates_gguf():
    assert CompressConfig(gguf="q4_k_m").settings.gguf == "Q4_K_M"
    assert CompressConfig(gguf="Q4_K").describe() == "gptq Q4_K"
    with pytest.raises(ValueError, match=r"gguf must be a GGUF type \(Q4_0, .*Q4_K_M"):
        CompressConfig(gguf="Q4")
    for bad in (dict(bits=4), dict(act_order=True), dict(static_groups=True)):
        with pytest.raises(ValueError, match="cannot be combined with"):
            CompressConfig(gguf="Q4_K", **bad)
    with pytest.raises(ValueError, match="do not plan over GGUF types"):
        CompressConfig(gguf="Q4_K", target_bits=4.0)
    # a layer taken out of GGUF by overrides may use a uniform grid
    CompressConfig(gguf="Q4_K", overrides={"down_proj": {"gguf": None, "bits": 8}})


def test_presets_follow_llama_cpp():
    n = 30  # SmolLM2's blocks
    more = [i for i in range(n) if preset_type("Q4_K_M", "attn_v", i, n) == "Q6_K"]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert preset_type("Q4_K_M", "other", 0, n) == "Q4_K"
    assert preset_type("Q3_K_M", "attn_output", 7, n) == "Q4_K"
    assert preset_type("Q3_K_M", "ffn_down", 0, n) == "Q5_K"
    assert layer_role("model.layers.3.self_attn.v_proj") == "attn_v"
    assert layer_role("model.layers.3.mlp.down_proj") == "ffn_down"
    assert fallback_type("Q4_K", 576) == "Q5_0" and fallback_type("Q4_K", 1536) == "Q4_K"
    assert fallback_type("Q3_K", 576) == "Q4_0" and fallback_type("Q4_0", 100) is None
    assert embedding_types("Q4_K_M", True, 576, None) == ("Q8_0", None)
    assert embedding_types("Q4_K_M", False, 1024, 1024) == ("Q4_K", "Q6_K")
    assert embedding_types("Q4_0", True, 576, None) == ("Q4_0", None)


# ---- a tiny LLaMA, written and read back ------------------------------------------------------

@pytest.fixture(scope="module")
def byte_bpe():
    """A 384-token byte-level BPE tokenizer (GGUF's "gpt2" vocabulary) and its training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from toolkit.measure.text import python_docs_text

    text = python_docs_text("test")[:30000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    return tok, text


def _tiny_llama(vocab, tied, hidden=256, seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, eos_token_id=0,
                         tie_word_embeddings=tied)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), **kw)


CASES = [("Q4_K", True, {}), ("Q4_K_M", False, {}), ("Q3_K", False, dict(sparsity=0.5)),
         ("Q5_0", True, dict(quant="rtn")), ("Q2_K", True, {}), ("Q8_0", False, {})]


@pytest.mark.parametrize("gtype,tied,extra", CASES, ids=lambda c: str(c))
def test_written_file_loads_with_the_same_logits(byte_bpe, tmp_path, gtype, tied, extra):
    tok, text = byte_bpe
    model = _tiny_llama(len(tok), tied)
    report = compress(model, tok, gguf=gtype, calibration=[text], nsamples=4, seqlen=64, **extra)
    assert report.summary["GGUF types (layers)"]
    path = tmp_path / "tiny.gguf"
    summary = save_gguf(model, path, tokenizer=tok)
    assert summary.bytes == path.stat().st_size and not list(tmp_path.glob(".*tmp*"))
    # every tensor: the reader's values are the model's, bit for bit
    assert set(verify_gguf(path, model).values()) == {0.0}
    types = set(summary.tensors.values()) - {"F32"}
    assert types <= set(TYPES) and types  # no F16/F32 matrix left behind
    loaded, tok2 = _read_back(path)
    ids = tok(text[:400], return_tensors="pt").input_ids
    assert torch.equal(tok2(text[:400], return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        a, b = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    for (n1, p1), (_n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p1, p2), n1
    info = describe_gguf(path)
    assert "architecture: llama" in info and "tokenizer: gpt2" in info
    for t in types:
        assert f"{t}:" in info


def test_save_gguf_refuses_with_reasons(byte_bpe, tmp_path):
    tok, text = byte_bpe
    model = _tiny_llama(len(tok), True)
    compress(model, tok, gguf="Q4_0", quant="rtn", calibration=[text], nsamples=2, seqlen=32)
    path = tmp_path / "m.gguf"
    save_gguf(model, path, tokenizer=tok)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_gguf(model, path, tokenizer=tok)
    save_gguf(model, path, tokenizer=tok, overwrite=True)
    with pytest.raises(ValueError, match="needs tokenizer"):
        save_gguf(model, tmp_path / "n.gguf")
    # a weight moved off its grid after compress: refused, nothing written
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="up_proj.*not a value of its Q4_0 grid"):
        save_gguf(model, tmp_path / "off.gguf", tokenizer=tok)
    assert not (tmp_path / "off.gguf").exists() and not list(tmp_path.glob(".*tmp*"))


def test_save_gguf_names_what_it_cannot_write(byte_bpe, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok, text = byte_bpe
    ws = Tokenizer(models.BPE(unk_token="[UNK]"))
    ws.pre_tokenizer = pre_tokenizers.Whitespace()
    ws.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=200, special_tokens=["[UNK]"], show_progress=False))
    other = PreTrainedTokenizerFast(tokenizer_object=ws, unk_token="[UNK]")
    model = _tiny_llama(len(tok), True)
    with pytest.raises(ValueError, match="byte-level BPE"):
        save_gguf(model, tmp_path / "m.gguf", tokenizer=other)
    with pytest.raises(ValueError, match="byte-level BPE"):
        check_gguf_model(model, other)  # before any work
    assert check_gguf_model(model, tok).startswith("built from")
    gpt2 = tiny_model("gpt2")
    with pytest.raises(ValueError, match="LLaMA-family.*'gpt2'"):
        save_gguf(gpt2, tmp_path / "g.gguf", tokenizer=tok)
    with pytest.raises(ValueError, match="LLaMA-family.*'gpt2'"):
        check_gguf_model(gpt2, tok)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_gguf_out(tmp_path / "nowhere" / "m.gguf")
    with pytest.raises(IsADirectoryError, match="one file"):
        check_gguf_out(tmp_path)


def test_dense_and_uniform_layers_written_exactly(byte_bpe, tmp_path):
    """Layers on no GGUF grid (ignored, or a uniform grid) are written exactly in F16/F32."""
    tok, text = byte_bpe
    model = _tiny_llama(len(tok), True)
    compress(model, tok, gguf="Q4_K", ignore=["layers\\.1\\.mlp"],
             overrides={"o_proj": {"gguf": None, "bits": 4, "group_size": 64}},
             calibration=[text], nsamples=2, seqlen=32)
    path = tmp_path / "m.gguf"
    summary = save_gguf(model, path, tokenizer=tok)
    assert summary.tensors["blk.1.ffn_up.weight"] == "F32"
    assert summary.tensors["blk.0.attn_output.weight"] in ("F16", "F32")
    assert summary.tensors["blk.0.ffn_up.weight"] == "Q4_K"
    assert set(verify_gguf(path, model).values()) == {0.0}


def test_compress_refuses_gguf_on_half_weights(byte_bpe):
    tok, text = byte_bpe
    model = _tiny_llama(len(tok), True).to(torch.bfloat16)
    with pytest.raises(ValueError, match="only float32 holds"):
        compress(model, tok, gguf="Q4_K", calibration=[text], nsamples=2, seqlen=32)


# ---- SmolLM2 --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_q4_k_m_round_trip(smollm2, tmp_path, wikitext_valid):
    """SmolLM2 (hidden 576: every layer but down_proj falls back from Q4_K to Q5_0), written with
    the tokenizer of its own GGUF file, loads in transformers with the in-memory logits. Blocks
    0 and 1 are compressed (Q6_K for v_proj and down_proj there under Q4_K_M, v_proj's falling
    back to Q8_0), the others keep the Q4_1 blocks they were loaded from (re-encoded
    exactly)."""
    model, tok = smollm2
    report = compress(model, tok, gguf="Q4_K_M", calibration=[wikitext_valid[:20000]],
                      nsamples=2, seqlen=64, ignore=[r"layers\.([2-9]|[12][0-9])\."])
    s = report.summary
    # v_proj's Q6_K (576 columns) falls back to Q8_0, down_proj (1536) keeps it
    assert set(s["GGUF types (layers)"].split(", ")) == {"Q5_0 10", "Q8_0 2", "Q6_K 2"}
    assert s["GGUF embeddings"].startswith("Q8_0 (already on its grid")
    path = tmp_path / "smol.gguf"
    summary = save_gguf(model, path)
    assert summary.tokenizer.startswith("from SmolLM2")
    assert summary.tensors["token_embd.weight"] == "Q8_0"
    assert summary.tensors["blk.1.ffn_down.weight"] == "Q6_K"
    assert summary.tensors["blk.1.ffn_up.weight"] == "Q5_0"
    assert summary.tensors["blk.7.ffn_up.weight"] == "Q4_1"  # as loaded
    loaded, tok2 = _read_back(path)
    ids = tok(wikitext_valid[:600], return_tensors="pt").input_ids[:, :96]
    assert torch.equal(tok2(wikitext_valid[:600], return_tensors="pt").input_ids[:, :96], ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    info = describe_gguf(path)
    assert "MOSTLY_Q4_K_M" in info and "chat template yes" in info


@pytest.mark.slow
def test_smollm2_layers_solver_below_rtn(smollm2_shared, wikitext_valid):
    """Per layer, on SmolLM2's own activations: the solver's error on the GGUF grid is below
    round-to-nearest's into the same type."""
    from toolkit import capture_hessians
    from toolkit.measure.text import get_calibration

    model, tok = smollm2_shared
    ids = get_calibration([wikitext_valid[:40000]], tok, nsamples=2, seqlen=128)
    names = ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj"]
    Hs = capture_hessians(model, names, ids)
    for name, gtype in zip(names, ["Q4_0", "Q3_K"]):
        W = model.get_submodule(name).weight.detach()
        H = Hs[name].H
        res = solve(W, H, gguf=gtype)
        rtn, _c, _g = gguf_rtn(W, gtype)
        assert res.error < 0.8 * reconstruction_error(W, rtn, H), name


def test_numpy_dtype_guard():
    """The packers write uint8 bytes whatever the code tensor's dtype."""
    W, H = _problem(rows=8)
    res = solve(W, H, gguf="Q6_K")
    assert pack_codes(res.codes.to(torch.int32), res.gguf).dtype == np.uint8


# ---- the command line -------------------------------------------------------------------------

def _main(argv, capsys):
    from toolkit.cli import main

    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_out_gguf_then_info(byte_bpe, tmp_path, capsys):
    """``toolkit compress --gguf Q4_0 --out-gguf FILE`` writes what the Python API computes
    (every tensor of the file dequantizes to the API's compressed weight exactly), ``toolkit
    info FILE.gguf`` describes it, and the refusals come before any model is loaded."""
    tok, text = byte_bpe
    folder = tmp_path / "tiny"
    _tiny_llama(len(tok), True).save_pretrained(folder)
    tok.save_pretrained(folder)
    calib = tmp_path / "calib.txt"
    calib.write_text(text, encoding="utf-8")
    out = tmp_path / "tiny-q4_0.gguf"
    args = ["compress", "--model", folder, "--gguf", "Q4_0", "--calibration", calib,
            "--nsamples", 2, "--seqlen", 32, "--eval", "none", "--quiet"]
    status, stdout, err = _main([*args, "--out-gguf", out], capsys)
    assert status == 0, err
    assert "GGUF file" in stdout and "toolkit info" in stdout and "not saved" not in stdout
    # the API on the model and text the command line read, loaded the way it loads them
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compress(model, tok, gguf="Q4_0", calibration=str(calib), nsamples=2, seqlen=32,
             verbose=False)
    assert set(verify_gguf(out, model).values()) == {0.0}

    status, stdout, err = _main(["info", out], capsys)
    assert status == 0, err
    assert "architecture: llama" in stdout and "Q4_0:" in stdout

    # refused before loading, each naming the flag
    before = out.stat().st_mtime_ns
    status, _, err = _main([*args, "--out-gguf", out], capsys)
    assert status != 0 and "--out-gguf" in err and "--overwrite" in err
    assert out.stat().st_mtime_ns == before
    status, _, err = _main([*args, "--out-gguf", tmp_path, "--overwrite"], capsys)
    assert status != 0 and "one file" in err
    status, _, err = _main([*args, "--stream", "--out", tmp_path / "c",
                            "--out-gguf", tmp_path / "s.gguf"], capsys)
    assert status != 0 and "--stream" in err and "--out-gguf" in err
    status, _, err = _main(["info", out, "--verify"], capsys)
    assert status != 0 and "GGUF file records none" in err
    status, _, err = _main(["info", calib], capsys)
    assert status != 0 and "neither a checkpoint folder nor a GGUF file" in err


@pytest.mark.parametrize("gtype,mode,extra", [
    ("Q4_0", "scale", {}), ("Q4_K", "scale", dict(sparsity=0.5)), ("Q5_1", "scale", {}),
    ("Q3_K", "round", dict(sparsity=0.5, asymmetric=True))], ids=str)
def test_block_reconstruction_keeps_gguf_layers_on_their_grids(byte_bpe, tmp_path, monkeypatch,
                                                               gtype, mode, extra):
    """Block reconstruction trains GGUF layers too ("scale": codes kept, each block's d refitted
    and rounded to fp16; "round": factors kept, codes move): the block error drops, and the
    written file still holds the model's weights bit for bit and loads with its logits."""
    from toolkit.walk import reconstruct, sweep

    monkeypatch.setattr(reconstruct, "RECONSTRUCT_QUANTIZED", mode)
    before = {}  # each layer's weight and grid as the solver left them, right before the fit

    def spy(block, refs, *args, **kwargs):
        for r in refs:
            before[r.name] = (r.get_weight().detach().clone(), r.get_record().gguf)
        return reconstruct.reconstruct_block(block, refs, *args, **kwargs)

    monkeypatch.setattr(sweep, "reconstruct_block", spy)
    tok, text = byte_bpe
    model = _tiny_llama(len(tok), True)
    report = compress(model, tok, gguf=gtype, calibration=[text], nsamples=4, seqlen=64,
                      reconstruct_steps=24 if mode == "round" else 12, **extra)
    rows = report.layers.groupby("block")[["block_error_before", "block_error_after"]].first()
    assert (rows.block_error_after < rows.block_error_before).all(), rows
    modules = dict(model.named_modules())
    assert len(before) == 14
    for name, (w0, g0) in before.items():
        m = modules[name]
        w, g = m.weight.detach(), m.compression.gguf
        codes0, codes = g0.codes(w0, name), g.codes(w, name)  # each raises if off its grid
        if mode == "round":  # factors kept, some codes moved
            assert torch.equal(g.d, g0.d) and torch.equal(g.sc, g0.sc), name
        else:  # codes kept, d refitted (fp16 values), the integer sub-block factors kept
            assert torch.equal(codes, codes0), name
            assert torch.equal(g.d, g.d.half().float()) and not torch.equal(g.d, g0.d), name
            if g0.sc is not None:
                assert torch.equal(g.sc, g0.sc), name
        if extra.get("sparsity") and not g.type.has_min:  # pruned weights stay exactly 0
            assert bool((w[w0 == 0] == 0).all()), name
    assert sum(int((modules[n].compression.gguf.codes(modules[n].weight.detach(), n)
                    != before[n][1].codes(before[n][0], n)).sum()) for n in before) > 0 \
        or mode == "scale"
    path = tmp_path / "r.gguf"
    save_gguf(model, path, tokenizer=tok)
    assert set(verify_gguf(path, model).values()) == {0.0}
    loaded, _ = _read_back(path)
    ids = tok(text[:300], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
