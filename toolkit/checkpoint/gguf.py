"""GGUF out: a file llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs, holding the
solver's codes bit for bit.

    report = compress(model, tok, gguf="Q4_K_M")        # every layer on a GGUF grid
    save_gguf(model, "model.gguf", tokenizer=tok)        # written with the gguf package's writer
    print(describe_gguf("model.gguf"))                   # `toolkit info model.gguf`

**Exact or refused.** Every tensor is written so that GGUF's reader (``gguf.quants.dequantize``,
which transformers' ``from_pretrained(..., gguf_file=...)`` uses) gives back the model's weight
exactly, float32 for float32; the writer checks it tensor by tensor by dequantizing what it
packed, and raises instead of writing a file that would load as another model:

=============================  ================================================================
tensor                         stored as
=============================  ================================================================
layer compressed with ``gguf`` its GGUF type: the solver's codes and factors, packed
                               (:func:`pack_codes`; layouts as the reader unpacks them)
embeddings, output (rounded    their GGUF type (``compress(..., gguf=...)`` rounds them to the
by ``compress(gguf=...)``)     preset's types, :mod:`toolkit.plan.gguf`)
any other matrix               the type the source GGUF held it in, when re-encoding it there is
                               exact (a model loaded from a GGUF file: SmolLM2's Q4_1 layers and
                               Q8_0 embeddings); else F16 when every value is an fp16 value;
                               else F32
vectors (norms)                F32
=============================  ================================================================

A layer quantized on the toolkit's uniform grids (``bits=``, not ``gguf=``) has no GGUF type: it
is written exactly in F16/F32 (and the summary says so). LLaMA-family models only (``llama``,
and Mistral, which GGUF stores as ``llama``); the query and key rows are permuted the way GGUF
stores them (transformers and llama.cpp undo it), which moves rows and never splits a block.

**Tokenizer.** Taken over from a GGUF file when the model came from one (the fields
``tokenizer.*``, chat template included), or given as ``tokenizer="path.gguf"``; otherwise built
from a Hugging Face byte-level BPE tokenizer (LLaMA-3, SmolLM, Qwen2, GPT-2 style:
``tokenizer.ggml.model = "gpt2"``). Other tokenizers (SentencePiece) raise an error naming them.

The file is written to a temporary file next to ``path`` and renamed into place; an existing
``path`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: `toolkit info FILE.gguf` needs none
    import torch

    from toolkit.solver.gguf_grids import GGUFGrid

__all__ = ["save_gguf", "describe_gguf", "pack_codes", "verify_gguf", "GGUFSummary",
           "source_gguf_path", "gguf_tensor_names", "SUPPORTED_ARCHITECTURES", "is_gguf",
           "reencodes_exactly", "check_gguf_out", "check_gguf_model"]

log = logging.getLogger("toolkit")

#: model_type -> the GGUF architecture it is written as
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama"}


def is_gguf(path) -> bool:
    """Whether ``path`` is a file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# ---- packing codes into GGUF blocks -----------------------------------------------------------

def _f16(x: np.ndarray) -> np.ndarray:
    """(n,) float32 holding fp16 values -> (n, 2) bytes."""
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def _bits_le(bits: np.ndarray) -> np.ndarray:
    """(n, 8k) array of 0/1 -> (n, k) bytes, element i at bit i % 8 of byte i // 8."""
    return np.packbits(bits.astype(np.uint8), axis=-1, bitorder="little")


def _interleave(q: np.ndarray, group: int, shifts: int, width: int) -> np.ndarray:
    """Pack ``shifts`` values per byte: byte ``(c, b)`` of the result holds, at bits
    ``width * s``, the value ``q[:, c * group * shifts + s * group + b]``."""
    n = q.shape[0]
    q = q.reshape(n, -1, shifts, group).astype(np.uint8)
    out = np.zeros((n, q.shape[1], group), dtype=np.uint8)
    for s in range(shifts):
        out |= q[:, :, s, :] << np.uint8(width * s)
    return out.reshape(n, -1)


def _k_scales(sc: np.ndarray, mi: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit minimums -> 12 bytes."""
    sc = sc.astype(np.uint8)
    mi = mi.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mi[:, 0:4] | ((mi[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mi[:, 4:8] & 0x0F) << 4)
    return out


def _q3_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: 16 signed six-bit scales (stored + 32) -> 12 bytes."""
    v = (sc.astype(np.int16) + 32).astype(np.uint8)
    out = np.empty((v.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (v[:, 0:8] & 0x0F) | ((v[:, 8:16] & 0x0F) << 4)
    high = (v >> 4) & 0x03
    out[:, 8:12] = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    return out


def pack_codes(codes: torch.Tensor, grid: GGUFGrid) -> np.ndarray:
    """The GGUF bytes (rows x blocks * bytes per block, uint8) of a weight's ``codes`` (rows x
    cols, uint8 ``0 .. 2**bits - 1``) on ``grid``: the layouts ``gguf.quants`` unpacks."""
    t = grid.type
    rows, cols = codes.shape
    nb = cols // t.block
    q = codes.cpu().numpy().astype(np.uint8).reshape(rows * nb, t.block)
    d = _f16(grid.d.cpu().numpy().reshape(-1))
    m = None if grid.m is None else _f16(grid.m.cpu().numpy().reshape(-1))
    per = t.block // t.sub
    sc = None if grid.sc is None else grid.sc.cpu().numpy().reshape(rows * nb, per)
    mi = None if grid.mi is None else grid.mi.cpu().numpy().reshape(rows * nb, per)
    name = t.name
    if name in ("Q4_0", "Q4_1"):
        parts = [d] + ([m] if m is not None else []) + [_interleave(q, 16, 2, 4)]
    elif name in ("Q5_0", "Q5_1"):
        parts = [d] + ([m] if m is not None else []) + [_bits_le(q >> 4),
                                                          _interleave(q & 0x0F, 16, 2, 4)]
    elif name == "Q8_0":
        parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif name == "Q2_K":
        scales = (sc.astype(np.uint8) | (mi.astype(np.uint8) << 4))
        parts = [scales, _interleave(q, 32, 4, 2), d, m]
    elif name == "Q3_K":
        hmask = _interleave(q >> 2, 32, 8, 1)
        parts = [hmask, _interleave(q & 0x03, 32, 4, 2), _q3_scales(sc), d]
    elif name == "Q4_K":
        parts = [d, m, _k_scales(sc, mi), _interleave(q, 32, 2, 4)]
    elif name == "Q5_K":
        parts = [d, m, _k_scales(sc, mi), _interleave(q >> 4, 32, 8, 1),
                 _interleave(q & 0x0F, 32, 2, 4)]
    elif name == "Q6_K":
        ql = _interleave(q & 0x0F, 64, 2, 4)
        qh = _interleave(q >> 4, 32, 4, 2)
        parts = [ql, qh, sc.astype(np.int8).view(np.uint8), d]
    else:  # pragma: no cover - TYPES and this table move together
        raise ValueError(f"no packer for {name}")
    out = np.concatenate(parts, axis=1)
    assert out.shape[1] == t.nbytes, (name, out.shape)
    return out.reshape(rows, nb * t.nbytes)


# ---- the source GGUF --------------------------------------------------------------------------

def source_gguf_path(model) -> Path | None:
    """The GGUF file ``model`` was loaded from, if :func:`toolkit.load_model` loaded it from one
    (``model.toolkit_source`` names the file, ``config._name_or_path`` its folder), else None."""
    src = getattr(model, "toolkit_source", None)
    folder = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(src, str) or not folder:
        return None
    m = re.search(r"\(([^()]+\.gguf)\)\s*$", src)
    name = m.group(1) if m else (src if src.lower().endswith(".gguf") else None)
    if name is None:
        return None
    for candidate in (Path(folder) / Path(name).name, Path(name)):
        if candidate.is_file() and is_gguf(candidate):
            return candidate
    return None


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


def _field_value(f):
    return f.contents()


# ---- names and layout -------------------------------------------------------------------------

def gguf_tensor_names(model) -> dict[str, str]:
    """``{parameter name: GGUF tensor name}`` for every parameter of a supported model (with
    tied embeddings, the output head shares ``token_embd.weight`` and is left out)."""
    import gguf

    arch = _architecture(model)
    n_blocks = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n_blocks)
    out = {}
    seen_ptrs = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        module, _, suffix = pname.rpartition(".")
        gname = name_map.get_name(module)
        if gname is None:
            raise ValueError(f"save_gguf: no GGUF name for the parameter {pname!r} "
                             f"(architecture {arch})")
        ptr = p.data_ptr()
        if ptr in seen_ptrs:  # tied: written once, under the first name
            continue
        seen_ptrs[ptr] = pname
        out[pname] = f"{gname}.{suffix}"
    return out


def _architecture(model) -> str:
    config = getattr(model, "config", None)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"save_gguf writes LLaMA-family models ({', '.join(SUPPORTED_ARCHITECTURES)}) "
                         f"so far; this model is {mt!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"save_gguf: {flag}=True: GGUF's llama architecture has no biases "
                             "there (transformers would load the file without them)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) \
        else "default"
    if rope_type not in (None, "default"):
        raise ValueError(f"save_gguf: rope type {rope_type!r} is not written yet (only plain "
                         "RoPE): the file would load with other positions")
    return SUPPORTED_ARCHITECTURES[mt]


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:
        return float(rope["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def _permute_rows(n: int, n_head: int) -> torch.Tensor:
    """Row order of a query/key weight in GGUF: within each head, the two halves of the rotary
    dimensions interleaved (transformers' GGUF loader applies the inverse)."""
    import torch

    idx = torch.arange(n)
    return idx.reshape(n_head, 2, n // n_head // 2).transpose(1, 2).reshape(n)


# ---- encoding one tensor ----------------------------------------------------------------------

@dataclass
class _Encoded:
    data: np.ndarray
    qtype: str  # GGMLQuantizationType name
    how: str


def _exact_candidates(w: np.ndarray, source_type: str | None):
    """(type name, data) candidates for a tensor not on a solver grid, smallest first."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if source_type is not None and source_type not in ("F32", "F16"):
        try:
            qt = Q[source_type]
            yield source_type, gguf.quants.quantize(w, qt), "source type, re-encoded exactly"
        except Exception:  # noqa: BLE001 - no quantizer for it, or shapes that do not fit
            pass
    h = w.astype(np.float16)
    if np.array_equal(h.astype(np.float32), w):
        yield "F16", h, "every value an fp16 value"
    yield "F32", w, "float32"


def reencodes_exactly(w: torch.Tensor, qtype: str) -> bool:
    """Whether the gguf package's own quantizer encodes ``w`` (rows x cols) in ``qtype`` with
    every value read back unchanged (a matrix already on a grid of that type, as the layers of
    a model loaded from a GGUF file are). False for the types it has no quantizer for."""
    import gguf

    arr = w.detach().float().cpu().numpy()
    try:
        data = gguf.quants.quantize(arr, gguf.GGMLQuantizationType[qtype])
    except Exception:  # noqa: BLE001 - no quantizer (K-quants), or rows that do not fit
        return False
    return bool(np.array_equal(_dequant(data, qtype).reshape(arr.shape), arr))


def _dequant(data: np.ndarray, qtype: str) -> np.ndarray:
    import gguf
    from gguf import GGMLQuantizationType as Q

    return gguf.quants.dequantize(data, Q[qtype])


def _encode(name: str, w: torch.Tensor, grid: GGUFGrid | None, source_type: str | None,
            perm: torch.Tensor | None, verify: bool = True) -> _Encoded:
    """The GGUF data of one tensor, checked to dequantize to ``w`` (rows permuted by ``perm``)
    exactly (``verify``: by the reader itself, ``gguf.quants.dequantize``; a tensor that is not
    on a solver grid is always checked, to choose its type)."""
    from toolkit.solver.gguf_grids import GGUFGrid

    wf = w.detach().float().cpu()
    if perm is not None:
        wf = wf[perm]
    if grid is not None:
        if perm is not None:
            grid = GGUFGrid(grid.type, *(None if x is None else x[perm]
                                         for x in (grid.d, grid.m, grid.sc, grid.mi)))
        codes = grid.codes(wf, name)
        enc = _Encoded(pack_codes(codes, grid), grid.type.name, "solver codes")
        if not verify:
            return enc
    else:
        arr = wf.numpy()
        if arr.ndim == 1:
            return _Encoded(arr, "F32", "vector")
        for qtype, data, how in _exact_candidates(arr, source_type):
            if qtype == "F32" or np.array_equal(_dequant(data, qtype).reshape(arr.shape), arr):
                return _Encoded(data, qtype, how)
    back = _dequant(enc.data, enc.qtype).reshape(wf.shape)
    if not np.array_equal(back, wf.numpy()):
        bad = int(np.flatnonzero(back.reshape(-1) != wf.numpy().reshape(-1))[0])
        raise ValueError(f"save_gguf: {name} would not load as the model's weight ({enc.qtype}: "
                         f"element {bad} reads {back.reshape(-1)[bad]!r}, the model has "
                         f"{wf.numpy().reshape(-1)[bad]!r}); nothing was written")
    return enc


# ---- the tokenizer ----------------------------------------------------------------------------

def _tokenizer_fields_from_gguf(path) -> list[tuple[str, object, object, object]]:
    """``(key, value, type, sub_type)`` of every ``tokenizer.*`` field of a GGUF file."""
    from gguf import GGUFValueType

    out = []
    for key, f in _reader(path).fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = f.types[0]
        sub = f.types[-1] if main == GGUFValueType.ARRAY else None
        out.append((key, _field_value(f), main, sub))
    return out


_PRE_SPLITS = None


def _pre_name(tok) -> str:
    """The ``tokenizer.ggml.pre`` name of a byte-level BPE tokenizer's pre-tokenizer."""
    global _PRE_SPLITS
    state = json.loads(tok.backend_tokenizer.to_str())
    pre = state.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(splits) == 1:
            pattern = splits[0].get("pattern", {}).get("Regex")
            if _PRE_SPLITS is None:
                from transformers.integrations.gguf import gguf_tokenizer_mapping as gm

                _PRE_SPLITS = {v: k for k, v in reversed(list(gm.GGUF_PRE_TOKENIZER_SPLITS.items()))}
            if pattern in _PRE_SPLITS:
                return _PRE_SPLITS[pattern]
    raise ValueError("save_gguf: the tokenizer's pre-tokenizer is not one GGUF names "
                     f"({json.dumps(pre)[:200]}); pass tokenizer='file.gguf' to take the "
                     "vocabulary from a GGUF file of the same model")


def _tokenizer_fields_from_hf(tok) -> list[tuple[str, object, object, object]]:
    """The ``tokenizer.*`` fields of a Hugging Face byte-level BPE tokenizer (GGUF's ``gpt2``
    vocabulary: tokens in id order, merges, token types, special token ids)."""
    from gguf import GGUFValueType as V
    from gguf import TokenType

    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"save_gguf: {type(tok).__name__} is not a fast (tokenizers) tokenizer; "
                         "GGUF vocabularies are built from byte-level BPE tokenizers here")
    state = json.loads(backend.to_str())
    model = state.get("model", {})
    decoder = (state.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        kind = model.get("type", "?") + (" (SentencePiece-style)" if decoder != "ByteLevel" else "")
        raise ValueError(f"save_gguf builds GGUF vocabularies from byte-level BPE tokenizers "
                         f"(LLaMA-3, SmolLM, Qwen2, GPT-2 style); this tokenizer is {kind}: pass "
                         "tokenizer='file.gguf' to take the vocabulary from a GGUF file")
    vocab = tok.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [int(TokenType.UNUSED)] * n
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = int(TokenType.NORMAL)
    for a in state.get("added_tokens", []):
        types[a["id"]] = int(TokenType.CONTROL if a.get("special") else TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields = [("tokenizer.ggml.model", "gpt2", V.STRING, None),
              ("tokenizer.ggml.pre", _pre_name(tok), V.STRING, None),
              ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
              ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32)]
    if merges:
        fields.append(("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING))
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        tid = getattr(tok, attr, None)
        if isinstance(tid, int):
            fields.append((f"tokenizer.ggml.{key}_token_id", tid, V.UINT32, None))
    fields.append(("tokenizer.ggml.add_bos_token", bool(getattr(tok, "add_bos_token", False)),
                   V.BOOL, None))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str) and template:
        fields.append(("tokenizer.chat_template", template, V.STRING, None))
    return fields


# ---- writing ----------------------------------------------------------------------------------

@dataclass
class GGUFSummary:
    """What :func:`save_gguf` wrote: ``path``, ``bytes`` (the file), ``tensors`` (GGUF name ->
    type), ``how`` (GGUF name -> why that type), ``tokenizer`` (where the vocabulary came from)."""

    path: Path
    bytes: int
    tensors: dict = field(default_factory=dict)
    how: dict = field(default_factory=dict)
    tokenizer: str = ""

    def counts(self) -> dict:
        return dict(Counter(self.tensors.values()).most_common())

    def __str__(self) -> str:
        kinds = ", ".join(f"{n} {t}" for t, n in self.counts().items())
        return (f"{self.path}: {self.bytes / 1e6:.2f} MB, {len(self.tensors)} tensors ({kinds}); "
                f"tokenizer {self.tokenizer}")


_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0",
               "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K",
               "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
               "Q6_K": "MOSTLY_Q6_K", "F16": "MOSTLY_F16", "F32": "ALL_F32"}


def _file_type(tensors: dict, sizes: dict, preset: str | None) -> int:
    from gguf import LlamaFileType

    if preset is not None and hasattr(LlamaFileType, f"MOSTLY_{preset}"):
        return int(getattr(LlamaFileType, f"MOSTLY_{preset}"))
    if preset in _FILE_TYPES:
        return int(getattr(LlamaFileType, _FILE_TYPES[preset]))
    weight = Counter()
    for name, qtype in tensors.items():
        if name.startswith("blk."):
            weight[qtype] += sizes[name]
    main = weight.most_common(1)[0][0] if weight else "F32"
    return int(getattr(LlamaFileType, _FILE_TYPES.get(main, "GUESSED")))


def _grid_of(module):
    """The GGUF grid a module's weight lies on: a compressed layer's record, or the one
    ``compress(gguf=...)`` leaves on the embeddings and the output head."""
    comp = getattr(module, "compression", None)
    grid = getattr(comp, "gguf", None) if comp is not None else None
    return grid if grid is not None else getattr(module, "toolkit_gguf", None)  # grid or type


def check_gguf_out(path, overwrite: bool = False) -> Path:
    """Check where a GGUF file is to be written, before any work (no torch import: the command
    line checks ``--out-gguf`` with it first). Raises ``IsADirectoryError`` for a folder,
    ``FileExistsError`` for an existing file without ``overwrite``, ``FileNotFoundError`` for a
    missing parent folder; returns the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; a GGUF model is one file (e.g. "
                                f"{path / 'model.gguf'})")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.exists():
        raise FileNotFoundError(f"no such folder: {path.parent}")
    return path


def check_gguf_model(model, tokenizer=None) -> str:
    """Raise ``ValueError`` now, before any work, if :func:`save_gguf` could not write ``model``
    with ``tokenizer`` (same meaning as there): a family other than LLaMA's, biases, a RoPE
    variant, or a vocabulary it cannot build. Returns where the vocabulary will come from."""
    _architecture(model)
    return _tokenizer_fields(model, tokenizer)[1]


def _tokenizer_fields(model, tokenizer):
    source = source_gguf_path(model)
    if tokenizer is None:
        if source is None:
            raise ValueError("save_gguf needs tokenizer=...: a Hugging Face tokenizer or a GGUF "
                             "file to take the vocabulary from (the model was not loaded from a "
                             "GGUF file)")
        return _tokenizer_fields_from_gguf(source), f"from {source.name}"
    if isinstance(tokenizer, (str, os.PathLike)):
        if not is_gguf(tokenizer):
            raise ValueError(f"tokenizer={str(tokenizer)!r} is not a GGUF file")
        return _tokenizer_fields_from_gguf(tokenizer), f"from {Path(tokenizer).name}"
    return _tokenizer_fields_from_hf(tokenizer), f"built from {type(tokenizer).__name__}"


def save_gguf(model, path, tokenizer=None, *, overwrite: bool = False, preset: str | None = None,
              name: str | None = None, verify: bool = True) -> GGUFSummary:
    """Write ``model`` (a LLaMA-family ``transformers`` model, typically after
    ``compress(model, tok, gguf=...)``) as one GGUF file at ``path``.

    ``tokenizer``: a Hugging Face tokenizer (byte-level BPE), or the path of a GGUF file to take
    the vocabulary from; None: the GGUF file the model was loaded from (:func:`source_gguf_path`),
    else an error. ``overwrite``: replace an existing file (refused otherwise). ``preset``: the
    ``general.file_type`` to declare (``"Q4_K_M"``; default: the ``gguf=`` that
    ``compress`` ran with, else the most common type of the block tensors). ``name``: ``general.name``. ``verify``: every tensor is dequantized back with
    ``gguf.quants.dequantize`` and compared with the model's weight before anything is written
    (exact float32 equality; a mismatch raises and writes nothing). Returns a
    :class:`GGUFSummary`. See the module docstring for the type each tensor gets.
    """
    import gguf

    path = check_gguf_out(path, overwrite)
    arch = _architecture(model)
    if preset is None:
        preset = getattr(model, "toolkit_gguf_preset", None)
    config = model.config

    # the tokenizer first: its errors come before any tensor is encoded
    source = source_gguf_path(model)
    tok_fields, tok_from = _tokenizer_fields(model, tokenizer)

    source_types = {}
    if source is not None:
        source_types = {t.name: t.tensor_type.name for t in _reader(source).tensors}

    names = gguf_tensor_names(model)
    modules = dict(model.named_modules())
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    params = dict(model.named_parameters(remove_duplicate=False))
    encoded: dict[str, _Encoded] = {}
    shapes = {}
    for pname, gname in names.items():
        p = params[pname]
        mname = pname.rpartition(".")[0]
        grid = _grid_of(modules[mname]) if pname.endswith(".weight") else None
        source_type = source_types.get(gname)
        if isinstance(grid, str):  # a type the weight re-encodes in exactly (the gguf package's)
            source_type, grid = grid, None
        perm = None
        if gname.endswith("attn_q.weight"):
            perm = _permute_rows(p.shape[0], n_head)
        elif gname.endswith("attn_k.weight"):
            perm = _permute_rows(p.shape[0], n_kv)
        encoded[gname] = _encode(f"{pname} ({gname})", p, grid, source_type, perm, verify)
        shapes[gname] = tuple(p.shape)

    if arch == "llama" and not getattr(config, "tie_word_embeddings", False) and \
            "output.weight" not in encoded:
        raise ValueError("save_gguf: the model has an untied output head that has no GGUF name")

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or "model").split("/")[-1])
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(config.num_hidden_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
        writer.add_rope_dimension_count(int(head_dim))
        if head_dim != config.hidden_size // n_head:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(n_kv))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_vocab_size(int(config.vocab_size))
        sizes = {g: int(np.prod(s)) for g, s in shapes.items()}
        writer.add_file_type(_file_type({g: e.qtype for g, e in encoded.items()}, sizes, preset))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("general.quantized_by", "toolkit (SparseGPT/GPTQ solver, GGUF grids)")
        for key, value, vtype, sub in tok_fields:
            writer.add_key_value(key, value, vtype, sub_type=sub)
        for gname, enc in encoded.items():
            if enc.qtype in ("F16", "F32"):
                writer.add_tensor(gname, enc.data)
            else:
                writer.add_tensor(gname, enc.data, raw_shape=enc.data.shape,
                                  raw_dtype=gguf.GGMLQuantizationType[enc.qtype])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    summary = GGUFSummary(path=path, bytes=path.stat().st_size,
                          tensors={g: e.qtype for g, e in encoded.items()},
                          how={g: e.how for g, e in encoded.items()}, tokenizer=tok_from)
    off_grid = [g for g, e in encoded.items() if e.how in ("float32", "every value an fp16 value")
                and g.startswith("blk.")]
    if off_grid:
        log.warning("save_gguf: %d block tensors are on no GGUF grid and were written exactly in "
                    "F16/F32 (compress with gguf=... to store them in a GGUF type): %s",
                    len(off_grid), ", ".join(off_grid[:4]) + (" ..." if len(off_grid) > 4 else ""))
    log.info("%s", summary)
    return summary


# ---- reading back -----------------------------------------------------------------------------

def verify_gguf(path, model) -> dict:
    """Dequantize every tensor of the GGUF file at ``path`` with ``gguf.quants.dequantize`` and
    compare it with ``model``'s weight (query/key rows permuted as GGUF stores them). Returns
    ``{GGUF name: max |difference|}`` (all 0.0 for a file written by :func:`save_gguf` from
    this model)."""
    names = {g: p for p, g in gguf_tensor_names(model).items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    config = model.config
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out = {}
    for t in _reader(path).tensors:
        w = params[names[t.name]].detach().float().cpu()
        if t.name.endswith("attn_q.weight"):
            w = w[_permute_rows(w.shape[0], n_head)]
        elif t.name.endswith("attn_k.weight"):
            w = w[_permute_rows(w.shape[0], n_kv)]
        back = _dequant(np.asarray(t.data), t.tensor_type.name).reshape(w.shape)
        out[t.name] = float(np.abs(back - w.numpy()).max()) if w.numel() else 0.0
    return out


def describe_gguf(path) -> str:
    """A description of a GGUF file for ``toolkit info FILE.gguf``: architecture and shape, the
    tensor types (count, parameters, bytes and bits per weight of each), the tokenizer, size."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    r = _reader(path)

    def get(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 - a field the reader cannot show
            return default

    arch = get("general.architecture", "?")
    lines = [f"{path}: GGUF v{get('GGUF.version', '?')}, {path.stat().st_size / 1e6:.2f} MB"]
    lines.append(f"  name: {get('general.name', '-')}; architecture: {arch}")
    ft = get("general.file_type")
    if ft is not None:
        try:
            ft = gguf.LlamaFileType(ft).name
        except ValueError:
            pass
        lines.append(f"  file type: {ft}")
    shape = [f"{k.split('.', 1)[1]} {get(k)}" for k in (
        f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.feed_forward_length",
        f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv",
        f"{arch}.context_length", f"{arch}.vocab_size") if get(k) is not None]
    if shape:
        lines.append("  " + ", ".join(shape))
    by_type: dict[str, list[int]] = {}
    total_params = total_bytes = 0
    for t in r.tensors:
        n, b = int(t.n_elements), int(t.n_bytes)
        e = by_type.setdefault(t.tensor_type.name, [0, 0, 0])
        e[0] += 1
        e[1] += n
        e[2] += b
        total_params += n
        total_bytes += b
    lines.append(f"  tensors: {len(r.tensors)}, {total_params / 1e6:.2f} M parameters, "
                 f"{total_bytes / 1e6:.2f} MB of tensor data "
                 f"({8 * total_bytes / max(total_params, 1):.3f} bits per parameter)")
    for qtype, (count, n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"    {qtype:>6}: {count:4d} tensors, {n / 1e6:8.2f} M parameters, "
                     f"{b / 1e6:8.2f} MB, {8 * b / max(n, 1):.3f} bits per parameter")
    model_kind = get("tokenizer.ggml.model")
    if model_kind is not None:
        f = r.fields.get("tokenizer.ggml.tokens")
        ntok = len(f.data) if f is not None else "?"
        pre = get("tokenizer.ggml.pre", "-")
        chat = "yes" if "tokenizer.chat_template" in r.fields else "no"
        lines.append(f"  tokenizer: {model_kind} (pre {pre}), {ntok} tokens, chat template {chat}")
    by = get("general.quantized_by")
    if by:
        lines.append(f"  quantized by: {by}")
    return "\n".join(lines)

