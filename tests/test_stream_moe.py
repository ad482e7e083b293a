"""Streaming compression of mixture-of-experts models (toolkit.walk.stream): the experts read from
per-expert checkpoint keys exactly as transformers' loader merges them, compressed and written
exactly as save_compressed writes them, resumable; unknown layouts refused before the output
folder is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import test_cli
import torch
from conftest import random_ids, tiny_moe
from test_cli import CALIB, run_main
from test_stream import _assert_same_tensors, _journal, _looks_complete, _tensors

import toolkit
from toolkit.checkpoint.saveload import CheckpointError, load_compressed, save_compressed
from toolkit.walk import stream
from toolkit.walk.stream import InjectedFailure, compress_streaming

tiny_dir, offline = test_cli.tiny_dir, test_cli.offline  # fixtures: a tokenizer, no hub
N, SEQ = 8, 32
IDS = random_ids(N, SEQ)
SETTINGS = {
    "50%": dict(sparsity=0.5),
    "4bit-g32": dict(bits=4, group_size=32, sym=True),
    "50%+4bit-g32": dict(sparsity=0.5, bits=4, group_size=32, sym=True),
}
FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe"]  # qwen2_moe: a shared expert and its gate
#: families whose reading alone is checked (GPT-OSS: fused 3-D tensors on disk; DeepSeek-V3:
#: first block dense, shared experts)
READ_ONLY = ["olmoe", "deepseek_v3", "gpt_oss"]
#: what save_pretrained of transformers 5.24 writes for the experts of block 0
PER_EXPERT_KEY = {
    "mixtral": "model.layers.0.block_sparse_moe.experts.3.w1.weight",
    "qwen3_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
    "qwen2_moe": "model.layers.0.mlp.experts.3.gate_proj.weight",
}


def _kw(**settings) -> dict:
    return dict(calibration=IDS, nsamples=N, seqlen=SEQ, verbose=False, **settings)


def _save(model, folder: Path, shard: str = "60KB") -> Path:
    """save_pretrained, sharded small: the experts of one block span several shards."""
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


def _shards_of(folder: Path, prefix: str) -> set[str]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {f for k, f in index.items() if k.startswith(prefix)}


def _from_pretrained(folder: Path):
    import warnings

    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _in_memory(src: Path, out: Path, **kw):
    model = _from_pretrained(src)
    report = toolkit.compress(model, **kw)
    return save_compressed(model, out, report=report), report


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> a folder of save_pretrained shards of the tiny random MoE (per-expert keys)."""
    root = tmp_path_factory.mktemp("moe_src")
    out = {}
    for family in FAMILIES + READ_ONLY:
        out[family] = _save(tiny_moe(family), root / family)
    return out


def _fused_source(folder: Path, family: str = "mixtral") -> Path:
    """A checkpoint that stores the fused 3-D expert tensors under the model's own names (written
    without transformers' reverse conversion), in two shards."""
    from safetensors.torch import save_file

    model = tiny_moe(family)
    model.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
          or not model.config.tie_word_embeddings}
    keys = sorted(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ---- reading: the block as from_pretrained builds it ------------------------------------------

@pytest.mark.parametrize("family", FAMILIES + READ_ONLY + ["fused mixtral"])
def test_blocks_read_as_from_pretrained_builds_them(family, sources, tmp_path):
    """Every tensor the streaming reader builds (fused experts from per-expert keys across
    shards) equals the one from_pretrained builds from the same folder, bit for bit."""
    if family == "fused mixtral":
        src = _fused_source(tmp_path / "fused")
        assert "model.layers.0.mlp.experts.gate_up_proj" in _tensors(src)
    else:
        src = sources[family]
        keys = _tensors(src)
        if family != "gpt_oss":  # the per-expert layout, a block over several shards
            assert PER_EXPERT_KEY.get(family, "model.layers.1.mlp.experts.3.gate_proj.weight") \
                in keys
            assert not any(k.endswith("experts.gate_up_proj") for k in keys)
            assert len(_shards_of(src, "model.layers.1.")) >= 2
    ref = _from_pretrained(src).state_dict()
    model = stream._skeleton(src, torch.float32, False)
    layout = stream._Layout(model, stream._Source(src), torch.float32)
    assert not layout.unmatched
    names = [n for n in ref if n in layout.made]
    assert set(ref) - set(names) <= {"lm_head.weight"}  # tied: read as the embeddings
    got = layout.load(names)
    fused = [n for n in names if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(fused) == (2 if family == "deepseek_v3" else 4)
    assert all(got[n].ndim == 3 for n in fused)
    bad = [n for n in names if got[n].dtype != ref[n].dtype or not torch.equal(got[n], ref[n])]
    assert not bad, bad


# ---- streamed = in memory ----------------------------------------------------------------------

def _assert_same_checkpoint(mem: Path, out: Path) -> None:
    _assert_same_tensors(mem, out)
    assert json.loads((mem / "config.json").read_text()) == \
        json.loads((out / "config.json").read_text())
    meta_m = json.loads((mem / "toolkit_compression.json").read_text())
    meta_s = json.loads((out / "toolkit_compression.json").read_text())
    # everything but the run's summary (timings; "streamed") and the file list (one file vs
    # shards)
    assert set(meta_m) == set(meta_s)
    for k in meta_m:
        if k not in ("summary", "files"):
            assert meta_m[k] == meta_s[k], k
    assert any(e.get("experts") for e in meta_s["layers"].values())


REPORT_COLUMNS = [c for c in toolkit.config.records.REPORT_COLUMNS if c != "seconds"]


def _assert_same_report(mem, streamed) -> None:
    a, b = mem.layers, streamed.layers
    assert len(a) == len(b) and set(a.layer) == set(b.layer)
    a = a.set_index("layer").loc[list(b.layer)].reset_index()  # the same rows, any order
    pd.testing.assert_frame_equal(a[REPORT_COLUMNS], b[REPORT_COLUMNS].reset_index(drop=True))
    for k in ("routers left dense", "left dense by ignore", "params compressed"):
        assert mem.summary.get(k) == streamed.summary.get(k), k


@pytest.mark.parametrize("family, setting", [(f, s) for f in FAMILIES for s in SETTINGS])
def test_stream_equals_in_memory(family, setting, sources, tmp_path):
    """Same tensors bitwise, same config.json and toolkit_compression.json (but the run's
    summary), same report (tokens per expert, Hessian source, routers left dense), the same
    logits through load_compressed."""
    src = sources[family]
    kw = _kw(**SETTINGS[setting])
    mem, report_m = _in_memory(src, tmp_path / "mem", **kw)
    out = tmp_path / "stream"
    report_s = compress_streaming(src, out, **kw)
    _assert_same_checkpoint(mem, out)
    _assert_same_report(report_m, report_s)
    expert_rows = report_s.layers[report_s.layers.hessian.notna()]
    assert len(expert_rows) == 2 * 4 * 3 and set(expert_rows.hessian) == {"routed"}
    x = random_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(x).logits, load_compressed(mem)(x).logits)
    if setting == "50%+4bit-g32":  # pack-quantized per expert, under transformers' names
        keys = _tensors(out)
        stem = PER_EXPERT_KEY[family].removesuffix(".weight")
        assert f"{stem}.weight_packed" in keys
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
        # and transformers loads the streamed (sharded) folder with the same logits
        with torch.no_grad():
            assert torch.equal(_from_pretrained(out)(x).logits, _from_pretrained(mem)(x).logits)


def test_all_token_hessians_and_routers_streamed(sources, tmp_path):
    """expert_hessian="all" and routers=True (Qwen2-MoE: routers and the shared expert's
    one-output gate compressed too), compact layout: streamed = in memory."""
    src = sources["qwen2_moe"]
    kw = _kw(sparsity=0.5, bits=4, group_size=32, expert_hessian="all", routers=True)
    model = _from_pretrained(src)
    report_m = toolkit.compress(model, **kw)
    mem = save_compressed(model, tmp_path / "mem", report=report_m, layout="compact")
    out = tmp_path / "stream"
    report_s = compress_streaming(src, out, layout="compact", **kw)
    _assert_same_checkpoint(mem, out)
    _assert_same_report(report_m, report_s)
    rows = report_s.layers.set_index("layer")
    assert set(rows.hessian.dropna()) == {"all tokens"}
    assert "model.layers.0.mlp.gate" in rows.index
    assert "model.layers.0.mlp.shared_expert_gate" in rows.index
    assert "routers left dense" not in report_s.summary
    x = random_ids(2, 16, seed=3)
    with torch.no_grad():
        assert torch.equal(load_compressed(out)(x).logits, load_compressed(mem)(x).logits)


def test_fused_checkpoint_and_gpt_oss_streamed(sources, tmp_path):
    """Checkpoints storing the fused 3-D experts under the model's names (written without
    reverse conversion; GPT-OSS's own layout) stream too, equal to in memory."""
    kw = _kw(bits=4, group_size=32, sym=True)
    for name, src in (("fused", _fused_source(tmp_path / "fused")),
                      ("gpt_oss", sources["gpt_oss"])):
        mem, report_m = _in_memory(src, tmp_path / f"mem_{name}", **kw)
        out = tmp_path / f"stream_{name}"
        report_s = compress_streaming(src, out, **kw)
        _assert_same_checkpoint(mem, out)
        _assert_same_report(report_m, report_s)


# ---- resuming ----------------------------------------------------------------------------------

def test_resume_after_injected_failure(sources, tmp_path, monkeypatch):
    """Killed after block 0, then resumed: the same files as an uninterrupted run (and as in
    memory), block 0 kept from the first attempt."""
    src = sources["mixtral"]
    kw = _kw(sparsity=0.5, bits=4, group_size=32, sym=True)
    ref = tmp_path / "ref"
    compress_streaming(src, ref, **kw)
    out = tmp_path / "out"
    monkeypatch.setenv(stream.FAIL_ENV, "0")
    with pytest.raises(InjectedFailure):
        compress_streaming(src, out, **kw)
    j = _journal(out)
    assert sorted(j["blocks"]) == ["0"] and not _looks_complete(out)
    assert any(r["entry"].get("experts") for r in j["blocks"]["0"]["records"].values())
    monkeypatch.delenv(stream.FAIL_ENV)
    report = compress_streaming(src, out, **kw)
    assert report.summary["blocks resumed"] == 1
    j = _journal(out)
    assert j["complete"] and [j["blocks"][b]["attempt"] for b in ("0", "1")] == [1, 2]
    _assert_same_tensors(ref, out)
    for name in ("config.json", "model.safetensors.index.json"):
        assert (ref / name).read_text() == (out / name).read_text(), name
    meta_r = json.loads((ref / "toolkit_compression.json").read_text())
    meta_o = json.loads((out / "toolkit_compression.json").read_text())
    assert meta_r["layers"] == meta_o["layers"] and meta_r["files"] == meta_o["files"]
    # the report of the resumed run covers both blocks, experts' token counts included
    experts = report.layers[report.layers.hessian.notna()]
    assert sorted(experts.block.unique()) == [0, 1]
    gate = experts[experts.layer.str.endswith("gate_proj")]
    assert int(gate.tokens.sum()) == 2 * 2 * N * SEQ  # top-2, two blocks


# ---- layouts not understood --------------------------------------------------------------------

def _rewrite_keys(src: Path, fn) -> None:
    """Apply ``fn(key) -> key | None`` (None: drop) to every tensor of the shards and index."""
    from safetensors.torch import load_file, save_file

    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(src.glob("model-*.safetensors")):
        tensors = load_file(shard)
        save_file({fn(k): v for k, v in tensors.items() if fn(k) is not None}, shard,
                  metadata={"format": "pt"})
    index["weight_map"] = {fn(k): f for k, f in index["weight_map"].items() if fn(k) is not None}
    index_path.write_text(json.dumps(index))


def test_unknown_expert_layout_refused_before_the_output_folder(tmp_path):
    """Experts stored under names transformers' conversion mapping does not know: an error
    naming the model type, the parameters missing and the keys nothing takes; no output."""
    src = _save(tiny_moe("mixtral"), tmp_path / "src")
    _rewrite_keys(src, lambda k: k.replace(".w1.weight", ".fc1.weight"))
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as info:
        compress_streaming(src, out, **_kw(sparsity=0.5))
    msg = str(info.value)
    assert "model.layers.0.mlp.experts.gate_up_proj" in msg
    assert "model.layers.0.block_sparse_moe.experts.0.fc1.weight" in msg
    assert "Model type 'mixtral'" in msg and "not understood" in msg
    assert not out.exists()


def test_missing_expert_refused_before_the_output_folder(tmp_path):
    """One expert's tensors missing: the merged tensor's shape differs from the config's."""
    src = _save(tiny_moe("qwen3_moe"), tmp_path / "src")
    _rewrite_keys(src, lambda k: None if ".experts.3." in k and ".layers.1." in k else k)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj.*"
                       r"\[3, 64, 64\].*\[4, 64, 64\]"):
        compress_streaming(src, out, **_kw(sparsity=0.5))
    assert not out.exists()


# ---- the command line --------------------------------------------------------------------------

def test_cli_stream_moe(tiny_dir, offline, tmp_path, capsys):
    """``toolkit compress --stream`` on a MoE folder (with a tokenizer, default calibration
    text, --expert-hessian all): the checkpoint compress + save_compressed writes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    src = _save(tiny_moe("qwen3_moe"), tmp_path / "src")
    tok.save_pretrained(src)
    out = tmp_path / "out"
    # the same thread count as the in-memory run below: float sums must come out the same
    threads = str(torch.get_num_threads())
    status, stdout, err = run_main(
        ["-q", "compress", "--model", src, "--stream", "--out", out, "--bits", "4",
         "--group-size", "32", "--expert-hessian", "all", *CALIB, "--eval", "none",
         "--threads", threads], capsys)
    assert status == 0, err
    model = _from_pretrained(src)
    report = toolkit.compress(model, tok, bits=4, group_size=32, expert_hessian="all",
                              nsamples=4, seqlen=64, verbose=False)
    mem = save_compressed(model, tmp_path / "mem", report=report, tokenizer=tok)
    _assert_same_checkpoint(mem, out)
    assert "routers left dense" in stdout
