"""Who loads what: every scheme x layout x reader, in the transformers version the project pins.

Each cell is a real load of a checkpoint written by ``save_compressed``, compared with the
in-memory model's logits: ``equal``, ``error`` (the reader raises) or ``WRONG`` (it returns a
model with other logits and no error). The toolkit's own prediction
(:func:`toolkit.checkpoint.saveload.checkpoint_readers`, what ``toolkit info`` prints) must say the same for
every cell, and no cell may be WRONG: files with several schemes (overrides by bits, group size,
sparsity or grid; budget plans; mixture-of-experts with per-expert settings) load right or are
refused in every reader (transformers' dequantizing path, which decompresses every layer with
one config group's scheme, meets a guard group first and raises). The table "What loads where"
of docs/checkpoints.md is this matrix (``test_readme_table``); regenerate it with
``python tests/test_readers.py``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import random_ids, tiny_model, tiny_moe  # noqa: E402

import toolkit  # noqa: E402
from toolkit.checkpoint.formats import GUARD_GROUP  # noqa: E402
from toolkit.checkpoint.saveload import checkpoint_readers, load_compressed, save_compressed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = random_ids(2, 24, seed=1)
CALIB = dict(calibration=random_ids(8, 32), nsamples=8, seqlen=32, verbose=False)

#: label -> (family, tiny_model keywords, compress keywords)
SCHEMES = {
    "4-bit sym g32": ("llama", {}, dict(bits=4, group_size=32, sym=True)),
    "4-bit asym g32": ("llama", {}, dict(bits=4, group_size=32, sym=False)),
    "3-bit sym g32": ("llama", {}, dict(bits=3, group_size=32, sym=True)),
    "5-bit asym g32": ("llama", {}, dict(bits=5, group_size=32, sym=False)),
    "6-bit sym g32": ("llama", {}, dict(bits=6, group_size=32, sym=True)),
    "8-bit sym per-row": ("llama", {}, dict(bits=8, group_size=None, sym=True)),
    "4-bit asym per-row": ("llama", {}, dict(bits=4, group_size=None, sym=False)),
    "50%": ("llama", {}, dict(sparsity=0.5)),
    "2:4": ("llama", {}, dict(pattern="2:4")),
    "50% + 4-bit asym": ("llama", {}, dict(sparsity=0.5, bits=4, group_size=32, sym=False)),
    "2:4 + 4-bit sym": ("llama", {}, dict(pattern="2:4", bits=4, group_size=32, sym=True)),
    "act-order, static groups": ("llama", {}, dict(bits=4, group_size=32, sym=True,
                                                   act_order=True, static_groups=True)),
    "partial last group (block)": ("llama", dict(hidden=96), dict(bits=4, group_size=64,
                                                                  sym=True)),
    "partial last group, asym": ("llama", dict(hidden=96), dict(bits=4, group_size=64,
                                                                sym=False)),
    # several schemes in one file: overrides by bits, group size, sparsity; a budget plan
    "mixed: 4-bit, down_proj 8-bit": ("llama", {}, dict(bits=4, group_size=32, sym=True,
                                                        overrides={"down_proj": {"bits": 8}})),
    "mixed: 4-bit asym, down_proj 8-bit": ("llama", {}, dict(
        bits=4, group_size=32, sym=False, overrides={"down_proj": {"bits": 8}})),
    "mixed: g32, mlp g16": ("llama", {}, dict(bits=4, group_size=32, sym=True,
                                              overrides={"mlp": {"group_size": 16}})),
    "mixed: g32, o_proj per-row": ("llama", {}, dict(bits=4, group_size=32, sym=True,
                                                     overrides={"o_proj": {"group_size": None}})),
    "mixed: 4-bit, mlp 50% + 4-bit": ("llama", {}, dict(bits=4, group_size=32, sym=True,
                                                        overrides={"mlp": {"sparsity": 0.5}})),
    "mixed: asym g32, mlp sym": ("llama", {}, dict(bits=4, group_size=32, sym=False,
                                                   overrides={"mlp": {"sym": True}})),
    "budget: target_bits 5, sym": ("llama", {}, dict(target_bits=5.0, sym=True,
                                                     budget_menu="8g32,4g32,4g16,3g32")),
    "budget: target_bits 5, asym": ("llama", {}, dict(target_bits=5.0, sym=False,
                                                      budget_menu="8g32,4g32,4g16,3g32")),
    "GPT-2 Conv1D 4-bit sym": ("gpt2", {}, dict(bits=4, group_size=32, sym=True)),
    "GPT-2 Conv1D 50%": ("gpt2", {}, dict(sparsity=0.5)),
    # mixture-of-experts (fused 3-D experts, toolkit.model.experts): per-expert tensors under the names
    # transformers' conversion mapping merges (Mixtral: experts.N.w1/w3/w2), or the toolkit's own
    "MoE Mixtral 4-bit sym g32": ("moe:mixtral", {}, dict(bits=4, group_size=32, sym=True)),
    "MoE Mixtral 4-bit asym g32": ("moe:mixtral", {}, dict(bits=4, group_size=32, sym=False)),
    "MoE Mixtral 4-bit asym g64 (partial last group)": ("moe:mixtral", {}, dict(
        bits=4, group_size=64, sym=False)),
    "MoE Mixtral: attention 8-bit": ("moe:mixtral", {}, dict(
        bits=4, group_size=32, sym=True, overrides={"self_attn": {"bits": 8}})),
    "MoE Mixtral: expert 3 8-bit": ("moe:mixtral", {}, dict(
        bits=4, group_size=32, sym=True, overrides={r"experts\.3\.": {"bits": 8}})),
    "MoE Qwen3-MoE 50%": ("moe:qwen3_moe", {}, dict(sparsity=0.5)),
    "MoE GPT-OSS 4-bit sym g32": ("moe:gpt_oss", {}, dict(bits=4, group_size=32, sym=True)),
    "MoE Mixtral 4-bit sym, expert 2 ignored": ("moe:mixtral", {}, dict(
        bits=4, group_size=32, sym=True, ignore=[r"experts\.2\."])),
}
LAYOUTS = ("standard", "compact")
READERS = ("transformers", "dequantize", "load_compressed")
#: the cells allowed to load wrong: none. (Until issue 32, transformers' dequantizing path read
#: files with several schemes wrong; they now start with a guard group that makes it raise.)
KNOWN_WRONG: set = set()
WORDS = {"loads": "equal", "error": "error", "wrong": "WRONG"}


def _read(folder: Path, reader: str):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    if reader == "load_compressed":
        return load_compressed(folder)
    if reader == "transformers":
        return AutoModelForCausalLM.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=CompressedTensorsConfig(dequantize=True))


def outcome(folder: Path, reader: str, ref: torch.Tensor) -> tuple[str, str]:
    """``("loads" | "error" | "wrong", detail)`` of one real load."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _read(folder, reader).eval()
            with torch.no_grad():
                logits = model(BATCH).logits.float()
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return "error", f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    if torch.equal(logits, ref):
        return "loads", ""
    return "wrong", f"max |diff| {float((logits - ref).abs().max()):.3g}"


def build_matrix(root: Path) -> dict:
    """``{(scheme, layout): {"readers": {reader: (status, detail)}, "predicted": {...}}}``."""
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("toolkit").setLevel(logging.ERROR)
    results = {}
    for label, (family, model_kw, kw) in SCHEMES.items():
        model = (tiny_moe(family[4:], **model_kw) if family.startswith("moe:") else
                 tiny_model(family, **model_kw))
        toolkit.compress(model, **CALIB, **kw)
        with torch.no_grad():
            ref = model(BATCH).logits.float()
        for layout in LAYOUTS:
            folder = root / f"{re.sub(r'[^a-z0-9]+', '-', label.lower())}-{layout}"
            save_compressed(model, folder, layout=layout)
            predicted = {k: v for k, v in checkpoint_readers(folder).items()}
            qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
            groups = [g for g in (qc or {}).get("config_groups", {}) if g != GUARD_GROUP]
            results[(label, layout)] = {
                "readers": {r: outcome(folder, r, ref) for r in READERS},
                "predicted": predicted,
                "groups": len(groups),
            }
    return results


def markdown(results: dict) -> str:
    """The table of docs/checkpoints.md ("What loads where")."""
    head = ("scheme", "layout", "`from_pretrained`", "`dequantize=True`", "`load_compressed`",
            "vLLM (format rules, not run)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, layout), r in results.items():
        cells = [WORDS[r["readers"][k][0]] for k in READERS]
        v = r["predicted"]["vllm"]
        cells.append("loads" if v.status == "loads" else "error")
        lines.append(f"| {label} | {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    return build_matrix(tmp_path_factory.mktemp("readers"))


def test_predictions_match_real_loads(matrix):
    bad = []
    for (label, layout), r in matrix.items():
        for reader in READERS:
            got, detail = r["readers"][reader]
            said = r["predicted"][reader]
            if said.status != got:
                bad.append(f"{label} / {layout} / {reader}: predicted {said.status} "
                           f"({said.reason}), got {got} ({detail})")
    assert not bad, "\n".join(bad)


def test_never_silently_wrong(matrix):
    """Every reader loads every file with the saved model's logits, or raises."""
    assert KNOWN_WRONG == set()
    wrong = {(label, layout, reader): r["readers"][reader][1] for (label, layout), r in
             matrix.items() for reader in READERS if r["readers"][reader][0] == "wrong"}
    assert not wrong, wrong
    # and toolkit info never says a reader loads one of them wrong
    said = {(label, layout, reader) for (label, layout), r in matrix.items()
            for reader, v in r["predicted"].items() if v.status == "wrong"}
    assert not said, said


def test_several_schemes_are_covered(matrix):
    """The rows with several schemes are really several schemes in one file (more than one
    config group besides the guard), in both layouts."""
    for label in SCHEMES:
        if not label.startswith(("mixed:", "budget:", "MoE Mixtral: ")):
            continue
        if label == "mixed: 4-bit, mlp 50% + 4-bit":
            continue  # one scheme in the standard layout (joint layers store every code)
        for layout in LAYOUTS:
            assert matrix[(label, layout)]["groups"] >= 2, (label, layout)


def test_load_compressed_reads_everything(matrix):
    assert all(r["readers"]["load_compressed"][0] == "loads" for r in matrix.values())


#: the standard layout's promise, (plain from_pretrained, dequantize=True), cell by cell:
#: symmetric, asymmetric (stored in the block strategy, whose zero points transformers reads)
#: and pruned-only folders load plainly; asymmetric one-grid-per-row folders (zero points packed
#: down the rows) with dequantize=True; several schemes: plainly, and the dequantizing path
#: (one scheme for every layer) raises on the guard group. Mixture-of-experts: transformers
#: merges every expert with one scheme and no zero point, so asymmetric experts and experts
#: with several schemes are refused (the latter stored in the toolkit's own format)
STANDARD = {
    "4-bit sym g32": ("loads", "loads"),
    "4-bit asym g32": ("loads", "loads"),
    "3-bit sym g32": ("loads", "loads"),
    "5-bit asym g32": ("loads", "loads"),
    "6-bit sym g32": ("loads", "loads"),
    "8-bit sym per-row": ("loads", "loads"),
    "4-bit asym per-row": ("error", "loads"),
    "50%": ("loads", "error"),
    "2:4": ("loads", "error"),
    "50% + 4-bit asym": ("loads", "loads"),
    "2:4 + 4-bit sym": ("loads", "loads"),
    "act-order, static groups": ("loads", "loads"),
    "partial last group (block)": ("loads", "loads"),
    "partial last group, asym": ("loads", "loads"),
    "mixed: 4-bit, down_proj 8-bit": ("loads", "error"),
    "mixed: 4-bit asym, down_proj 8-bit": ("loads", "error"),
    "mixed: g32, mlp g16": ("loads", "error"),
    "mixed: g32, o_proj per-row": ("loads", "error"),
    "mixed: 4-bit, mlp 50% + 4-bit": ("loads", "loads"),
    "mixed: asym g32, mlp sym": ("loads", "error"),
    "budget: target_bits 5, sym": ("loads", "error"),
    "budget: target_bits 5, asym": ("loads", "error"),
    "GPT-2 Conv1D 4-bit sym": ("error", "error"),
    "GPT-2 Conv1D 50%": ("loads", "error"),
    "MoE Mixtral 4-bit sym g32": ("loads", "loads"),
    "MoE Mixtral 4-bit asym g32": ("error", "error"),
    "MoE Mixtral 4-bit asym g64 (partial last group)": ("error", "error"),
    "MoE Mixtral: attention 8-bit": ("loads", "error"),
    "MoE Mixtral: expert 3 8-bit": ("error", "error"),
    "MoE Qwen3-MoE 50%": ("loads", "error"),
    "MoE GPT-OSS 4-bit sym g32": ("error", "error"),
    "MoE Mixtral 4-bit sym, expert 2 ignored": ("error", "error"),
}


def test_standard_layout_loads_in_transformers(matrix):
    assert set(STANDARD) == set(SCHEMES)
    got = {label: (r["readers"]["transformers"][0], r["readers"]["dequantize"][0])
           for (label, layout), r in matrix.items() if layout == "standard"}
    assert got == STANDARD


def test_compact_layout_refused_by_others(matrix):
    """Whatever the compact layout stores in a format of its own, other readers refuse."""
    for (label, layout), r in matrix.items():
        if layout != "compact" or not any(w in label for w in ("%", "2:4", "Conv1D",
                                                                   "GPT-OSS", "ignored")):
            continue
        for reader in ("transformers", "dequantize"):
            assert r["readers"][reader][0] == "error", (label, reader)
        assert r["predicted"]["vllm"].status == "error"


def test_readme_table(matrix):
    table = markdown(matrix)
    readme = (REPO / "docs" / "checkpoints.md").read_text()
    m = re.search(r"<!-- readers-table -->\n(.*?)\n<!-- /readers-table -->", readme, re.S)
    assert m, "docs/checkpoints.md has no <!-- readers-table --> block"
    assert m.group(1).strip() == table, "docs/checkpoints.md table differs; regenerate with " \
        "`python tests/test_readers.py`:\n" + table


if __name__ == "__main__":  # print the table (and every cell's detail) for the README
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        res = build_matrix(Path(d))
    for (label, layout), r in res.items():
        for reader in READERS:
            got, detail = r["readers"][reader]
            said = r["predicted"][reader]
            flag = "" if said.status == got else "   <-- PREDICTION DIFFERS"
            print(f"{label:32} {layout:9} {reader:16} {got:6} {detail[:70]:70} | predicted "
                  f"{said.status}: {said.reason[:60]}{flag}")
        print(f"{label:32} {layout:9} vllm             predicted {r['predicted']['vllm'].text()}")
    print()
    print(markdown(res))
    print(json.dumps({"transformers": __import__("transformers").__version__}))
