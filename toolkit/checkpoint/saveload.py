"""Save and load compressed checkpoints in the compressed-tensors format (safetensors only).

    save_compressed(model, "out/", report=report, tokenizer=tok)   # a Hugging Face model folder
    model = load_compressed("out/")                                 # the same logits
    print(describe_checkpoint("out/", verify=True))                 # `toolkit info out/`

Two layouts. ``layout="standard"`` (the default) is what every mainstream reader loads with the
logits of the saved model, or refuses with an error -- never something else:

====================  ===========================================================================
layer                 stored as (``layout="standard"``)
====================  ===========================================================================
quantized (2..8 bit)  ``pack-quantized``: codes packed into int32 (``weight_packed``), one scale
and pruned+quantized  per row and group (``weight_scale``), ``weight_shape``; packed by
                      compressed-tensors' own ``PackedQuantizationCompressor``: the tensors
                      llm-compressor writes. Pruned weights are stored as the zero-point code
                      (they dequantize to exactly 0). Symmetric grids whose group size divides
                      the columns use the ``group`` strategy, one grid per row ``channel``.
asymmetric grids      the format's ``block`` strategy, blocks of 1 x group size (the same
(the default)         grids), zero points unpacked int8 (``weight_zero_point``): the only
                      asymmetric form transformers' plain ``from_pretrained`` reads (5.23+
                      allocates ``group``/``channel`` zero points unpacked and the format packs
                      them: size mismatch). vLLM has no ``block`` scheme for integer weights:
                      ``sym=True`` gives the ``group`` strategy it reads. One grid per row
                      (``group_size=None``) stays ``channel`` with packed zero points.
partial last group    The ``group`` strategy needs ``group_size`` to divide the columns (SmolLM2:
                      576 columns at g128). ``partial_groups="block"`` (default) stores these
                      layers, and every layer quantized with the same settings (one config
                      group, see :func:`toolkit.checkpoint.formats.partial_group_keys`), with the
                      ``block`` strategy; ``partial_groups="error"`` refuses instead.
several schemes       one config group per scheme (``overrides``, a budget plan). transformers'
                      dequantizing load decompresses every non-expert layer with ONE group's
                      scheme: where no scheme decodes all, the file starts with
                      :func:`toolkit.checkpoint.formats.guard_group` (no targets; a group size no
                      layer has), so that path raises instead of loading other weights; the
                      plain loader, vLLM and :func:`load_compressed` read each layer's own group.
act-order             ``static_groups=True`` keeps each column in its natural group: stored as
                      ``actorder="weight"``. Dynamic act-order with groups scatters the columns
                      over the groups (``g_idx``), which compressed-tensors >= 0.20 no longer
                      stores: refused (:func:`check_savable` says so before compressing).
pruned only           a dense ``weight`` (zeros included) and no quantization config, as
                      llm-compressor 0.14 writes it; the sparsity is recorded in
                      ``toolkit_compression.json`` (and, next to quantized layers, in
                      ``sparsity_config`` with format ``dense``).
GPT-2 ``Conv1D``      compressed-tensors quantizes ``nn.Linear`` only (it would load these
(quantized)           layers transposed, without an error): stored as pack-quantized tensors
                      under the toolkit's format name ``toolkit-pack-quantized-conv1d``.
fused MoE experts     slices of 3-D expert parameters (:mod:`toolkit.model.experts`), see
                      :func:`encode_experts`: ``pack-quantized`` per expert under the names
                      transformers' conversion mapping merges back (transformers 5.25 loads
                      them, symmetric only: it merges every expert with one scheme and no zero
                      point, so experts with several schemes or an asymmetric ``block`` scheme
                      are declared ``toolkit-experts-pack-quantized`` instead), the 3-D tensor
                      whole (pruned only), or the toolkit's ``toolkit-experts-pack-quantized`` /
                      ``toolkit-experts-dense``.
====================  ===========================================================================

``layout="compact"`` (opt-in, the smallest file) stores what the standard layout stores densely
in the toolkit's own formats, whose names other readers reject with an error:
pruned+quantized layers as the kept codes only (packed with ``pack_to_int32``) plus a bitmask
(``toolkit-sparse-bitmask-pack-quantized``), pruned-only layers as compressed-tensors' legacy
bitmask tensors (``toolkit-sparse-bitmask``, ``toolkit-sparse-24-bitmask`` for 2:4). Only
:func:`load_compressed` reads them.

Which reader loads what is computed from the files by :func:`checkpoint_readers` (shown by
``toolkit info`` and logged by :func:`save_compressed`), from rules measured with transformers
5.25 + compressed-tensors 0.20.1 and checked against real loads in ``tests/test_readers.py``:
every reader either loads a folder the toolkit wrote with the saved model's logits or refuses
it. :func:`load_compressed` reads every layout and llm-compressor's files (``pack-quantized`` in
both bit layouts, ``naive-quantized``, the legacy ``sparse-bitmask``/``sparse-24-bitmask``,
``actorder="group"`` with ``weight_g_idx``).

Dense tensors (embeddings, norms, biases, uncompressed layers) and scales are written in ``dtype``,
by default the dtype of the checkpoint the model came from (:func:`source_dtype`): a model
loaded in float32 from a bfloat16 checkpoint is saved in bfloat16, so that the bytes on disk match
:func:`toolkit.checkpoint.size.model_bytes` (16-bit dense tensors). Pass ``dtype=`` the model's own dtype
for a bit-exact round trip.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from toolkit.checkpoint.formats import (
    CONV1D_FORMAT,
    EXPERTS_DENSE_FORMAT,
    EXPERTS_FORMAT,
    GUARD_GROUP,
    JOINT_FORMAT,
    MEASURED_WITH,
    MIXED_FORMAT,
    READERS,
    SPARSE24_FORMAT,
    SPARSE_FORMAT,
    TOOLKIT_FORMATS,
    Verdict,
    arrange_groups,
    block_key,
    column_groups,
    dequantize,
    experts_decoders,
    guard_group,
    pack_layout,
    partial_group_keys,
    plan_layers,
    predict_readers,
    unpack_codes,
    unpack_zero_point,
)
from toolkit.config.options import LayerSettings
from toolkit.config.records import LayerCompression, config_dict
from toolkit.model.experts import checkpoint_names, compressed_experts, fused_layers
from toolkit.model.layers import is_conv1d

__all__ = ["save_compressed", "load_compressed", "describe_checkpoint", "checkpoint_info",
           "CheckpointInfo", "check_savable", "is_checkpoint", "checkpoint_readers",
           "readers_summary", "readers_lines", "how_to_load", "source_dtype", "CheckpointError",
           "WEIGHTS_NAME", "TOOLKIT_NAME", "LAYOUTS",
           # the writer/reader pieces that save_compressed and toolkit.walk.stream share
           "compressed_layers", "encode_layer", "encode_experts", "block_keys", "LayerTable",
           "stored_tensors",
           "plain_config",
           "linear_names", "write_model_config", "read_header", "file_sha256",
           "SAFETENSORS_DTYPES", "SAFETENSORS_NAMES"]

log = logging.getLogger("toolkit")

WEIGHTS_NAME = "model.safetensors"
TOOLKIT_NAME = "toolkit_compression.json"
#: 1: the first layout (compact only, standard format names over the toolkit's tensors);
#: 2: layouts "standard" and "compact", the toolkit's own format names in config.json
FORMAT_VERSION = 2
LAYOUTS = ("standard", "compact")
#: Class attribute, True on the packed modules of :mod:`toolkit.runtime` (which compute on their
#: compressed form and hold no dense weight): such a model cannot be saved again.
PACKED_MARK = "toolkit_packed"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, truncated, missing tensors, or inconsistent."""


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def _unstorable_reason(s) -> str | None:
    """Why per-layer settings ``s`` give a layer no layout can store, or None."""
    if s is None or s.bits is None or s.quant != "gptq":
        return None
    if s.act_order and not s.static_groups and s.group_size is not None:
        return (f"act_order with group_size {s.group_size} maps columns to groups out of order, "
                "which compressed-tensors cannot store: add --static-groups / "
                "static_groups=True (or one grid per row: --group-size -1 / group_size=None)")
    return None


def check_savable(config, layout: str = "standard") -> None:
    """Raise ``ValueError`` (one line naming the setting and the fix) when a model compressed
    with ``config`` (a :class:`~toolkit.config.options.CompressConfig`) could not be written by
    :func:`save_compressed` in ``layout``; meant to run before compressing, so a run never ends
    with an unsavable result. The settings of every ``overrides`` entry are checked too.

    One combination cannot be stored in either layout: dynamic act-order with groups
    (``act_order=True``, ``static_groups=False``, a ``group_size``) with GPTQ, whose group index
    ``g_idx`` compressed-tensors 0.20 no longer stores. Column counts are not known here: a
    group size that does not divide a layer's columns is stored with the format's ``block``
    strategy (``partial_groups="block"``, see :func:`save_compressed`).
    """
    _check_layout(layout)
    from dataclasses import replace

    reason = _unstorable_reason(config.settings)
    if reason:
        raise ValueError(reason)
    for pattern, changes in (config.overrides or {}).items():
        reason = _unstorable_reason(replace(config.settings, **changes))
        if reason:
            raise ValueError(f"overrides[{pattern!r}]: {reason}")


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def compressed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the layers of ``model`` that carry a ``compression`` record."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "compression", None) is not None
            and getattr(m, "weight", None) is not None]


def linear_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` (and GPT-2 ``Conv1D``) modules of ``model``, in order: a
    standard checkpoint lists those it does not quantize in ``ignore`` (vLLM requires every
    linear layer to be a target or ignored)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _weight_out_in(module) -> torch.Tensor:
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w


def _quant_args(comp, cols: int, block: bool = False):
    """compressed-tensors QuantizationArgs for one layer, and the strategy name: ``block``
    (1 x group size) when ``block`` (the layer's settings are stored that way, see
    :func:`toolkit.checkpoint.formats.partial_group_keys`: asymmetric, or a partial last group
    somewhere) or for a partial last group, else ``channel`` for one grid per row, ``group``
    when the group size divides the columns."""
    from compressed_tensors.quantization import QuantizationArgs

    s = comp.settings
    n_groups = comp.scale.shape[1]
    common = dict(num_bits=s.bits, type="int", symmetric=bool(s.sym))
    if s.act_order:
        common["actorder"] = "weight"
    if n_groups == 1 and not block:
        return QuantizationArgs(strategy="channel", **common), "channel"
    if cols % s.group_size == 0 and not block:
        return QuantizationArgs(strategy="group", group_size=s.group_size, **common), "group"
    return (QuantizationArgs(strategy="block", block_structure=[1, s.group_size], **common),
            "block")


def _codes(w: torch.Tensor, comp, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (0..maxq, int64) of ``w`` on the layer's grids, and the zero points per
    column group expanded to (rows, cols); checks that ``w`` lies on its grids."""
    from toolkit.solver.quant import codes_on_grid, group_bounds

    s = comp.settings
    rows, cols = w.shape
    bounds = group_bounds(cols, s.group_size if comp.scale.shape[1] > 1 else None)
    if len(bounds) != comp.scale.shape[1]:
        raise ValueError(f"{name}: {comp.scale.shape[1]} scales per row for {len(bounds)} groups "
                         f"of {s.group_size} columns")
    widths = torch.tensor([b - a for a, b in bounds])
    if comp.g_idx is not None:
        gidx = comp.g_idx.long().cpu()
        contiguous = torch.repeat_interleave(torch.arange(len(bounds)), widths)
        if not torch.equal(gidx, contiguous):
            raise ValueError("act-order groups")  # caught and reported by the caller
    scale = torch.repeat_interleave(comp.scale.float(), widths, dim=1)
    zero = torch.repeat_interleave(comp.zero.float(), widths, dim=1)
    q = codes_on_grid(w.cpu(), scale, zero, s.bits, name)
    return q.long(), zero.long()


def _pack_quantized(w: torch.Tensor, comp, name: str, partial_groups: str, dtype,
                    block: bool = False) -> tuple:
    """(state dict of the layer with local names, QuantizationArgs, strategy, codes)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationScheme

    rows, cols = w.shape
    args, strategy = _quant_args(comp, cols, block)
    if strategy == "block" and cols % comp.settings.group_size and partial_groups != "block":
        raise ValueError("partial groups")  # caught and reported by the caller
    q, zero = _codes(w, comp, name)
    half = 2 ** (comp.settings.bits - 1)
    scheme = QuantizationScheme(targets=[name], weights=args,
                                format=CompressionFormat.pack_quantized.value)
    widths = torch.tensor(_widths(cols, comp))
    sd = {"weight": comp.scale.float().cpu().repeat_interleave(widths, dim=1) *
          (q - zero).float(), "weight_scale": comp.scale.float().cpu().clone()}
    if not comp.settings.sym:
        sd["weight_zero_point"] = (comp.zero.long().cpu() - half).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.pack_quantized.value)
    out = compressor.compress(sd, scheme)
    out["weight_scale"] = out["weight_scale"].to(dtype)
    return out, args, strategy, q


def _widths(cols: int, comp) -> list[int]:
    from toolkit.solver.quant import group_bounds

    g = comp.settings.group_size if comp.scale.shape[1] > 1 else None
    return [b - a for a, b in group_bounds(cols, g)]


def _mask_24(w: torch.Tensor) -> torch.Tensor:
    """Two kept positions in every 4 consecutive columns: the two largest |w| (the nonzeros)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // 4, 4).abs().float()
    idx = g.topk(2, dim=-1).indices
    m = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return m.reshape(rows, cols)


def _sparse_tensors(w: torch.Tensor, pattern, dtype) -> tuple[dict, str]:
    """The bitmask tensors of compressed-tensors' legacy sparse layouts, keyed by local names,
    and the toolkit format name they are declared under."""
    from compressed_tensors.utils import pack_bitmasks

    rows, cols = w.shape
    shape = torch.tensor([rows, cols]).reshape(-1, 1)
    if pattern is not None and tuple(pattern) == (2, 4) and cols % 4 == 0 and bool(
            ((w.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all()):
        mask = _mask_24(w)
        values = w[mask].reshape(rows, cols // 2).to(dtype)
        return ({"shape": shape, "compressed": values, "bitmask": pack_bitmasks(mask)},
                SPARSE24_FORMAT)
    mask = w != 0
    counts = mask.sum(dim=1)
    offsets = torch.cumsum(counts, 0) - counts
    return ({"shape": shape, "compressed": w[mask].to(dtype), "bitmask": pack_bitmasks(mask),
             "row_offsets": offsets}, SPARSE_FORMAT)


def stored_tensors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Every tensor a checkpoint of ``model`` stores, once: ``[(name, tensor)]`` in module order
    (parameters and persistent buffers), and the tied names ``{alias: name}`` left out
    (e.g. ``lm_head.weight`` tied to the embeddings)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    table = []
    for mname, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + [
                (b, t) for b, t in module.named_buffers(recurse=False)
                if b not in module._non_persistent_buffers_set]:
            if p is None:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen:
                tied[full] = seen[id(p)]
                continue
            seen[id(p)] = full
            table.append((full, p))
    return table, tied


def plain_config(model: nn.Module):
    """The model's config without a loader's quantization_config (GGUF files carry one)."""
    cfg = copy.deepcopy(model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    return cfg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_dtype(value) -> torch.dtype | None:
    """A floating torch dtype from a dtype or its name (``"bfloat16"``, ``"torch.float16"``)."""
    if isinstance(value, torch.dtype):
        return value if value.is_floating_point else None
    if isinstance(value, str):
        dt = getattr(torch, value.replace("torch.", ""), None)
        return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else None
    return None


def source_dtype(model: nn.Module) -> tuple[torch.dtype, str]:
    """The dtype of the checkpoint ``model`` came from, and where that was read:

    1. ``model.toolkit_source_dtype``, set by :func:`toolkit.load_model` (the dtype the source
       declared before it was loaded in float32; bfloat16 for a quantized GGUF file, which
       declares none);
    2. the ``dtype`` (``torch_dtype``) of ``config.json`` in the local folder the model was
       loaded from (``model.name_or_path``);
    3. ``model.config.dtype`` (transformers sets it to the dtype it loaded);
    4. the dtype of the model's floating parameters.
    """
    dt = _as_dtype(getattr(model, "toolkit_source_dtype", None))
    if dt is not None:
        return dt, "the source checkpoint (toolkit.load_model)"
    src = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if src and (Path(str(src)) / "config.json").is_file():
        try:
            data = json.loads((Path(str(src)) / "config.json").read_text())
            dt = _as_dtype(data.get("dtype") or data.get("torch_dtype"))
        except (OSError, ValueError):
            dt = None
        if dt is not None:
            return dt, f"{Path(str(src)) / 'config.json'}"
    dt = _as_dtype(getattr(model.config, "dtype", None))
    if dt is not None:
        return dt, "model.config.dtype"
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, "the model's parameters"
    return torch.float32, "default"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


class LayerTable:
    """Collects :func:`encode_layer` results, in the model's layer order, into what the
    checkpoint's config and ``toolkit_compression.json`` say about the compressed layers.

    :func:`save_compressed` adds every layer at once; :mod:`toolkit.walk.stream` adds them block by
    block (and rebuilds an accumulator from its journal when a run resumes).
    """

    def __init__(self, layout: str):
        _check_layout(layout)
        self.layout = layout
        self.schemes: dict[tuple, list[str]] = OrderedDict()
        self.meta_layers: dict[str, dict] = OrderedDict()
        self.partial: list[str] = []
        self.actorder_bad: list[str] = []
        self.dense_sparse: list[str] = []

    def add(self, name: str, rec: dict) -> None:
        """Record one layer (``rec`` from :func:`encode_layer`, tensors not needed)."""
        if rec.get("partial"):
            self.partial.append(rec["partial"])
        if rec.get("problem") == "actorder":
            self.actorder_bad.append(name)
        if rec.get("problem"):
            return
        if rec.get("scheme") is not None:
            self.schemes.setdefault(tuple(rec["scheme"]), []).append(name)
        if rec.get("dense_sparse"):
            self.dense_sparse.append(name)
        self.meta_layers[name] = rec["entry"]

    def check(self, partial_groups: str) -> None:
        """Raise for layers the format cannot store; log one line for those stored in a
        special way (the details are in ``toolkit_compression.json``)."""
        report_problems(self.actorder_bad, self.partial, self.dense_sparse, partial_groups,
                        self.layout)

    def configs(self, linear: list[str] | None = None) -> dict | None:
        """The ``quantization_config`` of ``config.json`` (None when nothing needs one: a
        standard checkpoint of pruned-only layers is a plain dense model). ``linear``: every
        linear layer of the model (:func:`linear_names`); those not in a config group are
        listed in ``ignore``."""
        self._experts_in_own_format()
        return _build_quantization_config(self.schemes, self.meta_layers, self.layout, linear)

    def _experts_in_own_format(self) -> None:
        """Slices of fused expert parameters stored per expert under transformers' names
        (``pack-quantized``) that transformers could only load wrong are declared in the
        toolkit's :data:`~toolkit.checkpoint.formats.EXPERTS_FORMAT` instead (same tensors), so
        that it and vLLM refuse the file: transformers merges every expert slice with ONE
        config group's scheme (on both of its paths), through a module without zero points.
        That is wrong for experts with several schemes (``overrides`` on some experts, a budget
        plan) and for asymmetric ``block`` schemes (partial last group), which it decodes
        without their zero points and without a check."""
        keys = [k for k, names in self.schemes.items() if k[1] == "pack-quantized" and
                any(self.meta_layers[n].get("experts") for n in names)]
        if not keys:
            return
        experts = {n for k in keys for n in self.schemes[k] if self.meta_layers[n].get("experts")}
        cols = {n: self.meta_layers[n]["shape"][1] for n in experts
                if self.meta_layers[n].get("shape")}
        groups = [(json.loads(k[0]) if k[0] else None, k[1], self.schemes[k]) for k in keys]
        if experts_decoders(groups, cols, experts):
            return  # one of the experts' schemes decodes them all
        args = groups[0][0] or {}
        if len(keys) > 1:
            why = f"{len(keys)} schemes among the experts, none of which decodes all of them"
        elif not args.get("symmetric", True) and args.get("strategy") == "block":
            why = "asymmetric block scheme (decoded without its zero points)"
        else:
            return
        for k in keys:
            names = self.schemes.pop(k)
            rest = [n for n in names if not self.meta_layers[n].get("experts")]
            if rest:
                self.schemes[k] = rest
            for n in names:
                if self.meta_layers[n].get("experts"):
                    self.schemes.setdefault((k[0], EXPERTS_FORMAT), []).append(n)
                    self.meta_layers[n]["format"] = EXPERTS_FORMAT
                    self.meta_layers[n]["own_format"] = why

    def meta(self, dtype, tied: dict, config=None, summary=None, model=None) -> OrderedDict:
        """The content of ``toolkit_compression.json`` (without ``files``): the layers, and the
        run's ``config`` (a CompressConfig) and report ``summary`` when given; ``model`` (the
        module) for its architecture and where it came from."""
        meta = OrderedDict(
            format_version=FORMAT_VERSION, producer="toolkit", layout=self.layout,
            compressed_tensors=_ct_version(), dtype=_dtype_name(dtype),
            model=_model_description(model) if model is not None else {},
            partial_group_layers=[p.split(" ")[0] for p in self.partial],
            dense_sparse_layers=list(self.dense_sparse),
            tied=tied, layers=self.meta_layers)
        if config is not None:
            meta["config"] = _jsonable(config_dict(config))
        if summary is not None:
            meta["summary"] = _jsonable(summary)
        return meta


def block_keys(model: nn.Module) -> set[tuple]:
    """The settings whose layers the standard layout stores with the ``block`` strategy
    (:func:`toolkit.checkpoint.formats.partial_group_keys`) for the compressed layers of ``model``
    (slices of fused expert parameters included)."""
    return partial_group_keys(
        [(m.compression.settings, _weight_out_in(m).shape[1]) for _, m in compressed_layers(model)]
        + [(rec.settings, ref.get_weight().shape[1]) for _, _, pairs in compressed_experts(model)
           for ref, rec in pairs if rec is not None])


class _Slice:
    """One slice of a fused expert parameter seen as a layer by :func:`encode_layer`."""

    def __init__(self, ref, record):
        self.weight = ref.get_weight()
        self.compression = record


def encode_experts(model: nn.Module, layout: str, partial_groups: str, dtype: torch.dtype,
                   blocks: set | frozenset = frozenset()) -> tuple[list, set[str]]:
    """The stored form of the compressed slices of fused expert parameters (see
    :mod:`toolkit.model.experts`): ``([(name, rec)], fused parameter names not stored)``, each
    ``rec`` as :func:`encode_layer` returns it, with an ``experts`` entry in
    ``rec["entry"]`` saying where the slice goes.

    A fused parameter none of whose slices needs tensors of its own (pruned-only slices in the
    standard layout: dense values) is stored whole, as the model holds it; its compressed
    slices are recorded under their own names (format ``dense``). Otherwise every slice of the
    parameter is stored on its own and the 3-D tensor is not: under the per-expert names
    transformers' conversion mapping merges back (:func:`toolkit.model.experts.checkpoint_names`,
    e.g. ``...block_sparse_moe.experts.3.w1`` for Mixtral) when every slice of the experts
    module is ``pack-quantized``; else under the slice's own name
    (``...mlp.experts.3.gate_proj``) in the toolkit's formats (:data:`EXPERTS_FORMAT` for
    pack-quantized slices, :data:`EXPERTS_DENSE_FORMAT` for uncompressed ones), which other
    readers refuse, since they would leave the fused parameter missing without an error."""
    out: list = []
    dropped: set[str] = set()
    for mname, module, pairs in compressed_experts(model):
        recs = {}
        for ref, comp in pairs:
            if comp is None:
                continue
            rec = encode_layer(ref.name, _Slice(ref, comp), layout, partial_groups, dtype, blocks)
            if rec is not None:
                recs[ref.key] = rec
        own = {k for k, r in recs.items() if not r["problem"] and not r["dense_sparse"]}
        split = {ref.param for ref, _ in pairs if ref.key in own}
        names = None
        if all(ref.key in own and recs[ref.key]["entry"]["format"] == "pack-quantized"
               for ref, _ in pairs):
            names = checkpoint_names(model, mname, module)
        for ref, _comp in pairs:
            rec = recs.get(ref.key)
            where = {"module": mname, "param": ref.param, "expert": ref.expert,
                     "layer": ref.layer}
            if ref.param not in split:  # stored whole: the slice's record only
                if rec is not None:
                    rec["tensors"] = {}
                    rec["entry"].update(experts=where, stored=f"{mname}.{ref.param}")
                    out.append((ref.name, rec))
                continue
            name = names[ref.key] if names else ref.name
            if rec is None or rec["dense_sparse"] or rec["problem"]:
                if rec is not None and rec["problem"]:
                    out.append((ref.name, rec))  # refused by LayerTable.check
                    continue
                w = ref.get_weight().detach()
                rows, cols = w.shape
                entry = dict(shape=[rows, cols], format=EXPERTS_DENSE_FORMAT,
                             compressed=rec is not None)
                if rec is not None:  # pruned only (standard layout): its record, stored dense
                    entry.update(rec["entry"], format=EXPERTS_DENSE_FORMAT)
                rec = dict(tensors={f"{name}.weight": w.to(dtype).cpu().contiguous()},
                           entry=entry, scheme=None, dense_sparse=False, partial=None,
                           problem=None)
            else:
                rec["tensors"] = {name + k[len(ref.name):]: v for k, v in rec["tensors"].items()}
                if rec["partial"]:
                    rec["partial"] = name + rec["partial"][len(ref.name):]
                if names is None and rec["entry"]["format"] == "pack-quantized":
                    rec["entry"]["format"] = EXPERTS_FORMAT
                    rec["scheme"] = (rec["scheme"][0], EXPERTS_FORMAT)
            rec["entry"].update(experts=where, stored=name)
            out.append((name, rec))
        dropped.update(f"{mname}.{p}" for p in split)
    return out, dropped


def encode_layer(name: str, module: nn.Module, layout: str, partial_groups: str,
                 dtype: torch.dtype, blocks: set | frozenset = frozenset()) -> dict | None:
    """The stored form of one compressed layer, or None when it is stored as a plain weight.
    ``blocks``: the settings stored with the block strategy (:func:`block_keys`).

    Returns ``{"tensors": {full name: tensor (CPU)}, "entry": toolkit_compression.json entry,
    "scheme": (QuantizationArgs json | None, format) | None, "dense_sparse": bool,
    "partial": "name (cols columns)" | None, "problem": None | "actorder" | "partial"}``; with a
    ``problem`` the layer cannot be stored (see :func:`report_problems`). Everything but
    ``tensors`` is JSON-serialisable.
    """
    _check_layout(layout)
    comp = module.compression
    s = comp.settings
    w = _weight_out_in(module)
    rows, cols = w.shape
    conv = is_conv1d(module)
    prunes = s.prunes and bool((w == 0).any())
    entry = dict(shape=[rows, cols], sparsity=float(comp.sparsity), bits=s.bits,
                 group_size=s.group_size if s.bits is not None else None,
                 sym=s.sym if s.bits is not None else None, act_order=s.act_order,
                 pattern=list(s.pattern) if s.pattern else None, method=s.method,
                 quant=s.quant if s.bits is not None else None, error=float(comp.error),
                 transposed=conv, settings=s.to_dict())
    rec = dict(tensors={}, entry=entry, scheme=None, dense_sparse=False, partial=None,
               problem=None)
    local: dict[str, torch.Tensor]
    if s.bits is not None:
        try:
            local, args, strategy, q = _pack_quantized(w, comp, name, partial_groups, dtype,
                                                       block_key(s) in blocks)
        except ValueError as e:
            if str(e) == "partial groups":
                rec.update(partial=f"{name} ({cols} columns)", problem="partial")
                return rec
            if str(e) == "act-order groups":
                rec.update(problem="actorder")
                return rec
            raise
        if strategy == "block" and cols % s.group_size:
            rec["partial"] = f"{name} ({cols} columns)"
        fmt = "pack-quantized"
        if prunes and layout == "compact":
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
            from compressed_tensors.utils import pack_bitmasks

            mask = (w != 0).cpu()
            half = 2 ** (s.bits - 1)
            kept = (q[mask] - half).to(torch.int8).reshape(1, -1)
            local["weight_packed"] = pack_to_int32(kept, s.bits)
            local["weight_bitmask"] = pack_bitmasks(mask)
            fmt = JOINT_FORMAT
        elif conv:
            fmt = CONV1D_FORMAT
        rec["scheme"] = (args.model_dump_json(), fmt)
        entry.update(format=fmt, strategy=strategy)
    elif s.prunes:
        if layout == "compact":
            local, fmt = _sparse_tensors(w.cpu(), s.pattern, dtype)
            rec["scheme"] = (None, fmt)
        else:  # a plain weight in the module's own orientation
            rec["dense_sparse"] = True
            fmt = "dense"
            local = {"weight": module.weight.detach().to(dtype)}
        entry.update(format=fmt)
    else:
        return None
    rec["tensors"] = {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in local.items()}
    return rec


def report_problems(actorder_bad: list[str], partial: list[str], dense_sparse: list[str],
                    partial_groups: str, layout: str = "standard") -> None:
    """Raise for layers the format cannot store; log one short line for layers stored in a
    special way (``toolkit_compression.json`` lists them)."""
    if actorder_bad:
        raise ValueError(
            f"{len(actorder_bad)} layers (first: {actorder_bad[0]}) were quantized with "
            "act_order and groups: their columns map to groups out of order (g_idx), which "
            "compressed-tensors 0.20 no longer stores; compress with static_groups=True "
            "(--static-groups) or group_size=None")
    if partial and partial_groups == "error":
        raise ValueError(
            f"the group size does not divide the columns of {len(partial)} layers (first: "
            f"{partial[0]}); pass partial_groups='block' to store them with the format's block "
            "strategy (transformers and load_compressed read it, vLLM does not), or use a group "
            "size that divides the columns")
    if partial:
        log.info("stored %d layers whose group size does not divide their columns with the "
                 "format's 'block' strategy (the same grids; transformers prints a "
                 "compressed-tensors warning per such layer as it loads them, harmless: see "
                 "toolkit info); details in %s", len(partial), TOOLKIT_NAME)
    if dense_sparse:
        log.info("stored %d pruned layers as dense weights (layout %r; layout='compact' stores "
                 "bitmasks); details in %s", len(dense_sparse), layout, TOOLKIT_NAME)


def _block_first(item) -> int:
    args = item[0] or {}
    return 0 if args.get("strategy") == "block" else 1


def _build_quantization_config(schemes: dict, meta_layers: dict, layout: str,
                               linear: list[str] | None) -> dict | None:
    """The ``quantization_config`` dict of config.json, laid out as compressed-tensors'
    ``ModelCompressor.update_config`` writes it (standard groups are validated by
    compressed-tensors itself).

    Several schemes in a standard file: the groups are ordered so that transformers, which
    decompresses every expert slice with one group's scheme and (on its dequantizing path) every
    other layer with one group's scheme, takes the right one where one scheme decodes all
    (:func:`toolkit.checkpoint.formats.arrange_groups`); where none does, the file starts with
    :func:`toolkit.checkpoint.formats.guard_group`, which makes that path raise."""
    if not schemes:
        return None
    from compressed_tensors.config import DenseSparsityConfig
    from compressed_tensors.quantization import QuantizationConfig

    items = [(json.loads(args_json) if args_json is not None else None, fmt, list(names))
             for (args_json, fmt), names in schemes.items()]
    standard = not ({fmt for _, fmt in schemes} & set(TOOLKIT_FORMATS))
    guard = False
    if standard:
        experts = {n for n, e in meta_layers.items() if e.get("experts")}
        cols = {n: e["shape"][1] for n, e in meta_layers.items() if e.get("shape")}
        items, guard = arrange_groups(items, cols, experts)
    else:  # compressed-tensors refuses the whole config: the order matters to no reader
        items = sorted(items, key=_block_first)
    width = len(str(len(items) - 1))
    groups = OrderedDict()
    if guard:
        groups[GUARD_GROUP] = guard_group()
    for i, (args, fmt, names) in enumerate(items):
        groups[f"group_{i:0{width}d}"] = {
            "format": fmt, "input_activations": None, "output_activations": None,
            "targets": names, "weights": args}
    formats = {g["format"] for g in groups.values()}
    if len(formats) == 1:
        top = formats.pop()
    else:
        top = MIXED_FORMAT if formats & set(TOOLKIT_FORMATS) else "mixed-precision"
    covered = {n for names in schemes.values() for n in names}
    qc = OrderedDict(
        config_groups=groups, format=top, global_compression_ratio=None,
        ignore=[n for n in (linear or []) if n not in covered], kv_cache_scheme=None,
        quant_method="compressed-tensors", quantization_status="compressed",
        sparsity_config={}, transform_config={}, version=_ct_version())
    # pruned + quantized layers stored densely: the format's place for the sparsity
    joint = [n for n, e in meta_layers.items() if e.get("format") == "pack-quantized"
             and e.get("sparsity", 0) > 0]
    if joint and layout == "standard":
        structures = {("2:4" if e["pattern"] == [2, 4] else
                       f"{e['pattern'][0]}:{e['pattern'][1]}" if e["pattern"] else "unstructured")
                      for n, e in meta_layers.items() if n in joint}
        numel = sum(meta_layers[n]["shape"][0] * meta_layers[n]["shape"][1] for n in joint)
        zeros = sum(meta_layers[n]["sparsity"] * meta_layers[n]["shape"][0] *
                    meta_layers[n]["shape"][1] for n in joint)
        qc["sparsity_config"] = DenseSparsityConfig(
            targets=joint, global_sparsity=zeros / numel,
            sparsity_structure=structures.pop() if len(structures) == 1 else "unstructured",
        ).model_dump()
    if not (formats | {top}) & set(TOOLKIT_FORMATS):
        QuantizationConfig.model_validate(dict(qc))  # a standard file must parse as one
    return qc


def write_model_config(folder: Path, cfg, generation_config, quantization_config: dict | None,
                       dtype) -> None:
    """Write ``config.json`` (with ``quantization_config`` when given) and
    ``generation_config.json`` into ``folder``. ``cfg`` is a plain model config (no loader's
    quantization_config)."""
    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - a generation config is optional
            log.warning("generation_config not saved: %s", e)
    with open(folder / "config.json") as f:
        config_data = json.load(f)
    config_data.pop("quantization_config", None)
    if quantization_config is not None:
        config_data["quantization_config"] = quantization_config
    with open(folder / "config.json", "w") as f:
        json.dump(config_data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _model_description(model: nn.Module) -> dict:
    cfg = model.config
    return {"architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(cfg, "model_type", None),
            "source": str(getattr(model, "toolkit_source", None) or
                          getattr(model, "name_or_path", None) or "") or None}


def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mkdir_private_free(parent: Path, prefix: str) -> Path:
    """A new folder in ``parent`` created with the user's umask (``mkdtemp`` would make it
    0700 and every file in the checkpoint unreadable to the user's group)."""
    for _ in range(100):
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(p)
            return p
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder in {parent}")


@torch.no_grad()
def save_compressed(model: nn.Module, path, report=None, tokenizer=None, overwrite: bool = False,
                    *, dtype: torch.dtype | None = None, layout: str = "standard",
                    partial_groups: str = "block") -> Path:
    """Write ``model`` (compressed by :func:`toolkit.compress`) to the folder ``path``.

    The folder holds ``config.json`` (with the compressed-tensors ``quantization_config``
    describing every quantized layer, when there is one), ``model.safetensors`` (see the module
    docstring), ``toolkit_compression.json`` (per-layer settings and format, the report
    summary, a SHA-256 of the weights file), ``generation_config.json`` and the tokenizer files
    when ``tokenizer`` is given.

    ``layout``: ``"standard"`` (default: what transformers and vLLM read, or refuse) or
    ``"compact"`` (the smallest file, in formats of the toolkit's own that only
    :func:`load_compressed` reads). ``dtype``: dtype of the dense tensors and scales (default:
    :func:`source_dtype`, the dtype of the checkpoint the model came from; pass the model's own
    dtype for a bit-exact round trip). ``partial_groups``: ``"block"`` (default) or ``"error"``.
    Check the settings before compressing with :func:`check_savable`.

    Writing goes to a temporary folder next to ``path`` (created with the user's umask) that is
    renamed into place at the end; an existing ``path`` is refused unless ``overwrite=True``.
    Returns the folder's path.
    """
    from safetensors.torch import save_file

    _check_layout(layout)
    if partial_groups not in ("block", "error"):
        raise ValueError(f"partial_groups must be 'block' or 'error', got {partial_groups!r}")
    if any(getattr(m, PACKED_MARK, False) for m in model.modules()):
        raise ValueError("the model holds packed layers (toolkit.runtime.pack): save the model before "
                         "packing it, or load the checkpoint again with load_compressed")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if dtype is None:
        dtype, _ = source_dtype(model)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype}")

    layers = compressed_layers(model)
    # ---- per-layer compression, checked before anything is written ------------------------
    tensors: dict[str, torch.Tensor] = OrderedDict()
    acc = LayerTable(layout)
    blocks = block_keys(model)
    for name, module in layers:
        rec = encode_layer(name, module, layout, partial_groups, dtype, blocks)
        if rec is not None:
            acc.add(name, rec)
            tensors.update(rec["tensors"])
    expert_recs, fused_dropped = encode_experts(model, layout, partial_groups, dtype, blocks)
    for name, rec in expert_recs:
        acc.add(name, rec)
        tensors.update(rec["tensors"])
    acc.check(partial_groups)

    # ---- the dense rest of the state dict (tied tensors once) ------------------------------
    table, tied = stored_tensors(model)
    stored = {f"{n}.weight" for n, e in acc.meta_layers.items() if not e.get("experts")}
    stored |= fused_dropped
    for full, t in table:
        if full in stored:
            continue
        t = t.detach()
        tensors[full] = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()

    # ---- config -----------------------------------------------------------------------------
    qcfg = acc.configs(linear_names(model))
    meta = acc.meta(dtype, tied, config=getattr(report, "config", None),
                    summary=getattr(report, "summary", None), model=model)

    # ---- write into a temporary folder, then rename into place ------------------------------
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _mkdir_private_free(parent, f".{path.name}.tmp-")
    try:
        write_model_config(tmp, plain_config(model), getattr(model, "generation_config", None),
                           qcfg, dtype)
        save_file(dict(tensors), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "producer": "toolkit"})
        meta["files"] = {WEIGHTS_NAME: {"bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                                        "sha256": file_sha256(tmp / WEIGHTS_NAME)}}
        with open(tmp / TOOLKIT_NAME, "w") as f:
            json.dump(meta, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        verdicts = checkpoint_readers(tmp)
        mode = 0o666 & ~_umask()  # safetensors writes through a 0600 temporary file
        for p in tmp.iterdir():
            if p.is_file():
                os.chmod(p, mode)
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d compressed layers to %s (%s, layout %s, %s)", len(acc.meta_layers), path,
             _human(sum(f.stat().st_size for f in path.iterdir() if f.is_file())), layout,
             _dtype_name(dtype))
    _log_readers(path, verdicts)
    return path


def _log_readers(path: Path, verdicts: dict[str, Verdict]) -> None:
    """What :func:`save_compressed` says about readers: the same verdicts ``toolkit info``
    prints (:func:`checkpoint_readers`). One warning when transformers' plain
    ``from_pretrained`` refuses the folder, naming the way it loads; the full list at INFO."""
    wrong = [k for k, v in verdicts.items() if v.status == "wrong"]
    for key in wrong:  # never for a file the toolkit wrote: tests/test_readers.py holds it
        log.warning("%s would load %s with other weights and no error (%s); please report it",
                    READERS[key], path, verdicts[key].reason)
    plain = verdicts["transformers"]
    if plain.status != "loads":
        log.warning("%s: transformers' from_pretrained refuses it (%s); %s", path, plain.reason,
                    how_to_load(verdicts, path))
    for line in readers_lines(verdicts):
        log.info("%s", line.strip())


def how_to_load(verdicts: dict[str, Verdict], path) -> str:
    """One sentence: the calls that load the folder ``path`` whose readers are ``verdicts``
    (:func:`checkpoint_readers`), plainest first."""
    p = str(path)
    ways = []
    if verdicts["transformers"].status == "loads":
        ways.append(f"AutoModelForCausalLM.from_pretrained({p!r})")
    elif verdicts["dequantize"].status == "loads":
        ways.append(f"AutoModelForCausalLM.from_pretrained({p!r}, quantization_config="
                    "CompressedTensorsConfig(dequantize=True))")
    if verdicts["load_compressed"].status == "loads":
        ways.append(f"toolkit.load_compressed({p!r})")
    if verdicts["vllm"].status == "loads":
        ways.append("vLLM (by its format rules; not run here)")
    if not ways:
        return "no reader here loads it"
    return "load it with " + " or ".join(ways)


def readers_lines(verdicts: dict[str, Verdict], indent: str = "  ") -> list[str]:
    """One line per reader (``loads`` / ``refuses: why``), then how to load it."""
    width = max(len(v) for v in READERS.values())
    return [f"{indent}{READERS[k]:<{width}}  {verdicts[k].text()}" for k in READERS]


def readers_summary(path) -> str:
    """What ``toolkit compress --out DIR`` prints about readers after saving (the same verdicts
    as ``toolkit info DIR``): a heading, one line per reader, and how to load the folder."""
    verdicts = checkpoint_readers(path)
    return "\n".join([f"readers of {path}:"] + readers_lines(verdicts) +
                     [f"  {how_to_load(verdicts, path)}"])


def _ct_version() -> str:
    import compressed_tensors

    return compressed_tensors.__version__


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, torch.Tensor):
        return "tensor" + str(list(obj.shape))
    return str(obj)


def _human(n: float) -> str:
    """Bytes in decimal units: KB = 10^3, MB = 10^6, GB = 10^9 bytes."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------

#: safetensors dtype names -> torch dtypes, and back
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def read_header(file: Path) -> dict:
    """The safetensors header of ``file``, checked against the file size (names the tensor)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{file}: truncated or corrupt: the header claims {n} "
                                      f"bytes, the file has {size}")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > data:
            raise CheckpointError(f"{file}: truncated: tensor {key!r} needs bytes {start}..{end} "
                                  f"of the data section, which has {data}")
        numel = math.prod(info["shape"])
        dt = SAFETENSORS_DTYPES.get(info["dtype"])
        if dt is not None and (end - start) != numel * torch.empty(0, dtype=dt).element_size():
            raise CheckpointError(f"{file}: tensor {key!r} has {end - start} bytes for shape "
                                  f"{info['shape']} {info['dtype']}")
    return header


def _weight_files(path: Path) -> list[Path]:
    index = path / (WEIGHTS_NAME + ".index.json")
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [path / n for n in names]
    single = path / WEIGHTS_NAME
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(f"{path}: only pickle weight files (.bin/.pt) found; "
                              "load_compressed reads safetensors only")
    raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}")


class _Tensors:
    """Lazy access to the tensors of the checkpoint's safetensors files, by name."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        self.headers: dict[Path, dict] = {}
        self.handles = {}
        for file in files:
            header = read_header(file)
            self.headers[file] = header
            try:
                self.handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # noqa: BLE001 - safetensors' own error types vary
                raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from None
            for k in header:
                if k != "__metadata__":
                    self.where[k] = file
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self.where

    def shape(self, key) -> list[int]:
        return list(self.headers[self.where[key]][key]["shape"])

    def shapes(self) -> dict[str, list[int]]:
        return {k: self.shape(k) for k in self.where}

    def get(self, key: str, owner: str = "") -> torch.Tensor:
        if key not in self.where:
            files = ", ".join(str(f) for f in self.headers)
            raise CheckpointError(f"{files}: missing tensor {key!r}"
                                  + (f" (needed by {owner})" if owner else ""))
        self.used.add(key)
        return self.handles[self.where[key]].get_tensor(key)

    def expect(self, key: str, shape, owner: str = "") -> torch.Tensor:
        t = self.get(key, owner)
        if list(t.shape) != list(shape):
            raise CheckpointError(f"{self.where[key]}: tensor {key!r} has shape {list(t.shape)}, "
                                  f"the config implies {list(shape)}"
                                  + (f" ({owner})" if owner else ""))
        return t


def _check_shape_tensor(ts: _Tensors, key: str, rows: int, cols: int) -> None:
    if key not in ts:
        return
    shape = ts.get(key).flatten().tolist()
    if shape != [rows, cols]:
        raise CheckpointError(f"{ts.where[key]}: tensor {key!r} says {shape}, the model config "
                              f"implies {[rows, cols]}")


def _decode_quantized(ts: _Tensors, p, rows: int, cols: int, version, dtype=None):
    """Dense weight ``[rows, cols]`` of a ``pack``/``joint``/``naive``/``int`` layer, and
    ``(scale float32, zero 0..maxq float32, g_idx)`` for its compression record.

    ``dtype``: the dtype the model is loaded in; the scales are cast to it before
    ``(q - zero) * scale`` is computed, as transformers' ``from_pretrained(dtype=...)`` casts
    the stored scales to the model's dtype before compressed-tensors decompresses: a bfloat16
    checkpoint loaded in float32 gives the grid values ``scale * (q - zero)`` exactly (a product
    rounded to bfloat16 would be off the grid). None: the stored dtype."""
    from compressed_tensors.utils import unpack_bitmasks

    name, args = p.name, dict(p.args)
    bits = int(args.get("num_bits") or 8)
    half = 2 ** (bits - 1)
    sym = bool(args.get("symmetric", True))
    g_idx = None
    if f"{name}.weight_g_idx" in ts:  # actorder="group" (compressed-tensors <= 0.19)
        g_idx = ts.expect(f"{name}.weight_g_idx", [cols], name)
    try:
        rix, cix, nr, nc = column_groups(args, rows, cols, g_idx)
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from None
    _check_shape_tensor(ts, f"{name}.weight_shape", rows, cols)
    scale = ts.expect(f"{name}.weight_scale", [nr, nc], name)
    if dtype is not None and dtype.is_floating_point and scale.is_floating_point():
        scale = scale.to(dtype)
    zero = None
    if not sym:
        zkey = f"{name}.weight_zero_point"
        if p.kind in ("pack", "joint") and args.get("strategy") in ("group", "channel"):
            zp = ts.get(zkey, name)
            try:
                layout = pack_layout(zp.shape[0], nr, bits, version)
            except ValueError as e:
                raise CheckpointError(f"{ts.where[zkey]}: tensor {zkey!r}: {e}") from None
            if zp.dim() != 2 or zp.shape[1] != nc:
                raise CheckpointError(f"{ts.where[zkey]}: tensor {zkey!r} has shape "
                                      f"{list(zp.shape)}, the config implies [*, {nc}]")
            zero = unpack_zero_point(zp, bits, nr, layout) - half
        else:
            zero = ts.expect(zkey, [nr, nc], name).long()
    if p.kind == "pack":
        key = f"{name}.weight_packed"
        packed = ts.get(key, name)
        if packed.dim() != 2 or packed.shape[0] != rows:
            raise CheckpointError(f"{ts.where[key]}: tensor {key!r} has shape "
                                  f"{list(packed.shape)}, the config implies [{rows}, *]")
        try:
            layout = pack_layout(packed.shape[1], cols, bits, version)
        except ValueError as e:
            raise CheckpointError(f"{ts.where[key]}: tensor {key!r}: {e}") from None
        q = unpack_codes(packed, bits, cols, layout) - half
    elif p.kind == "joint":
        bitmask = ts.expect(f"{name}.weight_bitmask", [rows, math.ceil(cols / 8)], name)
        mask = unpack_bitmasks(bitmask, [rows, cols])
        k = int(mask.sum())
        packed = ts.expect(f"{name}.weight_packed", [1, math.ceil(k * bits / 32)], name)
        kept = unpack_codes(packed, bits, k).flatten() - half
        q = zero[rix][:, cix].clone() if zero is not None else torch.zeros(rows, cols,
                                                                           dtype=torch.long)
        q[mask] = kept
    else:  # naive / int: int8 codes in "weight"
        q = ts.expect(f"{name}.weight", [rows, cols], name).long()
    w = dequantize(q, scale, zero, rix, cix)
    record = None
    if nr == rows and args.get("strategy") in ("group", "channel", "block"):
        zf = (zero + half).float() if zero is not None else torch.full((nr, nc), float(half))
        record = (scale.float(), zf, g_idx.int() if g_idx is not None else None)
    return w, record


def _decode_sparse(ts: _Tensors, p, rows: int, cols: int):
    from compressed_tensors.utils import unpack_bitmasks

    name = p.name
    _check_shape_tensor(ts, f"{name}.shape", rows, cols)
    bitmask = ts.expect(f"{name}.bitmask", [rows, math.ceil(cols / 8)], name)
    mask = unpack_bitmasks(bitmask, [rows, cols])
    k = int(mask.sum())
    if p.kind == "sparse24":
        values = ts.expect(f"{name}.compressed", [rows, cols // 2], name)
    else:
        values = ts.expect(f"{name}.compressed", [k], name)
        if f"{name}.row_offsets" in ts:
            ts.expect(f"{name}.row_offsets", [rows], name)
    if values.numel() != k:
        raise CheckpointError(f"{ts.where[name + '.compressed']}: tensor '{name}.compressed' "
                              f"holds {values.numel()} values, the bitmask marks {k}")
    out = torch.zeros(rows, cols, dtype=values.dtype)
    out[mask] = values.flatten()
    return out


def _folder_contents(path: Path) -> tuple[list[Path], dict, dict]:
    """``(weight files, toolkit_compression.json content or {}, config.json content)`` of a
    checkpoint folder; errors name what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a model folder)")
    files = _weight_files(path)
    meta = {}
    if (path / TOOLKIT_NAME).is_file():
        with open(path / TOOLKIT_NAME) as f:
            meta = json.load(f)
    with open(path / "config.json") as f:
        config_data = json.load(f)
    return files, meta, config_data


def _verify_files(meta: dict, files: list[Path]) -> list[str]:
    """Problems of the weight files against the sizes and SHA-256 recorded at save time."""
    problems = []
    for file in files:
        info = meta.get("files", {}).get(file.name)
        if not info:
            continue
        size = file.stat().st_size
        if size != info["bytes"]:
            problems.append(f"{file}: {size} bytes, {info['bytes']} were written (truncated or "
                            "replaced)")
        elif file_sha256(file) != info["sha256"]:
            problems.append(f"{file}: SHA-256 differs from the one recorded at save time (the "
                            "file is corrupt)")
    return problems


def _check_files(path: Path, meta: dict, files: list[Path]) -> None:
    problems = _verify_files(meta, files)
    if problems:
        raise CheckpointError(problems[0])


def _stored_dtype(meta: dict, config_data: dict) -> torch.dtype:
    return (_as_dtype(meta.get("dtype")) or
            _as_dtype(config_data.get("dtype") or config_data.get("torch_dtype")) or
            torch.float32)


def is_checkpoint(path) -> bool:
    """Whether the folder ``path`` is a compressed checkpoint that :func:`load_compressed`
    should read: one written by :func:`save_compressed` (it has ``toolkit_compression.json``)
    or any compressed-tensors checkpoint (``quantization_config.quant_method`` is
    ``"compressed-tensors"``, e.g. from llm-compressor), as opposed to a plain Hugging Face
    model folder (which ``from_pretrained`` reads)."""
    p = Path(path)
    if not (p / "config.json").is_file():
        return False
    if (p / TOOLKIT_NAME).is_file():
        return True
    try:
        qc = json.loads((p / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _skeleton(config_data: dict, path: Path, trust_remote_code: bool = False):
    """The architecture on the meta device (None when transformers cannot build it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - describing must work for any folder
        log.debug("cannot build %s on the meta device: %s", path, e)
        return None


@torch.no_grad()
def load_compressed(path, device=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, verify: bool = True) -> nn.Module:
    """Load a compressed checkpoint folder as a dense ``transformers`` model.

    Reads the folders :func:`save_compressed` writes (both layouts, and files of format
    version 1) and compressed-tensors checkpoints of other tools, e.g. llm-compressor 0.10 and
    0.14: ``pack-quantized`` (both bit layouts: compressed-tensors >= 0.19 packs densely, 0.14
    padded each word), ``naive-quantized``, the legacy ``sparse-bitmask``/``sparse-24-bitmask``,
    ``actorder="group"`` with ``weight_g_idx``; ``targets`` and ``ignore`` are resolved like
    compressed-tensors does (module names, ``re:`` patterns, class names such as ``Linear``).
    Formats it cannot decode (marlin-24, float formats) and quantized activations (W8A8: the
    model would run with float activations, so other logits) raise :class:`CheckpointError`.

    Reads safetensors only (no pickle is executed), ``trust_remote_code`` is off unless asked.
    Every compressed layer is dequantized exactly as compressed-tensors does in transformers'
    ``from_pretrained``: ``(q - zero) * scale`` with the stored scales cast to the model's
    ``dtype`` first, so ``dtype=torch.float32`` gives the grid values exactly even from a
    bfloat16 checkpoint (and :func:`toolkit.runtime.pack.pack` recovers every code). ``dtype``:
    default the dtype the checkpoint stores (like ``from_pretrained(dtype="auto")``). ``verify`` checks the SHA-256 recorded at save time.
    Errors (:class:`CheckpointError`, a ``ValueError``) name the file and the tensor. Each
    decompressed layer keeps a ``compression`` record (settings, and scales and zero points
    where the format has them), so :func:`toolkit.model_bytes` counts the loaded model as
    compressed and :func:`save_compressed` can write it again.

    To load straight into packed modules, use :func:`toolkit.load_compressed` with
    ``packed=True`` (or :func:`toolkit.load_packed`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    files, meta, config_data = _folder_contents(path)
    if verify:
        _check_files(path, meta, files)
    qc = config_data.get("quantization_config") or {}
    if qc and qc.get("quant_method") not in (None, "compressed-tensors"):
        raise CheckpointError(f"{path / 'config.json'}: quant_method {qc.get('quant_method')!r} "
                              "is not compressed-tensors")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if dtype is None:
        dtype = _stored_dtype(meta, config_data)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                             trust_remote_code=trust_remote_code)
    model.eval()
    ts = _Tensors(files)
    meta_layers = meta.get("layers") or {}
    plan = plan_layers(model, qc, meta_layers, ts.where)
    version = qc.get("version")
    modules = dict(model.named_modules())
    slices = {(mname, r.param, r.expert, r.layer): r for mname, mod in modules.items()
              for r in fused_layers(mod, mname)}
    filled: dict[tuple, set] = {}  # (experts module, parameter) -> slices read from own tensors
    state = {}
    for name, p in plan.items():
        if p.activations:
            raise CheckpointError(f"{path / 'config.json'}: layer {name} has quantized input "
                                  "activations; load_compressed keeps activations in floating "
                                  "point, which would change the outputs (not supported)")
        if p.kind == "other":
            raise CheckpointError(f"{path / 'config.json'}: layer {name} is stored in format "
                                  f"{p.fmt!r}, which load_compressed cannot decode")
        if p.sparse and p.kind != "dense":
            raise CheckpointError(f"{path / 'config.json'}: layer {name} is {p.fmt} and "
                                  f"{p.sparse} at once (not supported)")
        if p.expert:
            _load_slice(ts, p, meta_layers.get(name) or {}, slices, filled, dtype, version, path)
            continue
        module = modules.get(name)
        if module is None:
            raise CheckpointError(f"{path / 'config.json'}: compressed layer {name!r} is not a "
                                  f"module of {type(model).__name__}")
        transposed = is_conv1d(module)
        w_shape = tuple(module.weight.shape)
        rows, cols = (w_shape[1], w_shape[0]) if transposed else w_shape
        record = None
        if p.kind in ("pack", "joint", "naive", "int"):
            w, record = _decode_quantized(ts, p, rows, cols, version, dtype)
        elif p.kind in ("sparse", "sparse24"):
            w = _decode_sparse(ts, p, rows, cols)
        else:  # stored as a plain weight: read with the dense tensors below
            w = None
        if w is not None:
            state[f"{name}.weight"] = (w.T if transposed else w).to(dtype).contiguous()
        e = meta_layers.get(name)
        if e is not None:
            comp = LayerCompression(settings=_entry_settings(e), error=e["error"],
                                    sparsity=e["sparsity"])
        else:
            comp = LayerCompression(settings=_foreign_settings(p, w), error=float("nan"),
                                    sparsity=float((w == 0).float().mean()) if w is not None
                                    else 0.0)
        if record is not None and comp.settings.bits is not None:
            comp.scale, comp.zero, comp.g_idx = record
        module.compression = comp
    for (mname, pname), keys in filled.items():  # fused parameters rebuilt from their slices
        module = modules[mname]
        missing = [r.name for r in fused_layers(module, mname) if r.param == pname and
                   (r.expert, r.layer) not in keys]
        if missing:
            raise CheckpointError(f"{path}: {mname}.{pname} is stored per expert, but no tensors "
                                  f"for {missing[0]}" + (f" and {len(missing) - 1} more slices"
                                                         if len(missing) > 1 else ""))
        state[f"{mname}.{pname}"] = getattr(module, pname).data
    expected = model.state_dict()
    tied = set((meta.get("tied") or {}).keys())
    for key, ref in expected.items():
        if key in state:
            continue
        if key in ts:
            t = ts.get(key)
            if list(t.shape) != list(ref.shape):
                raise CheckpointError(f"{ts.where[key]}: tensor {key!r} has shape "
                                      f"{list(t.shape)}, the model config implies "
                                      f"{list(ref.shape)}")
            state[key] = t.to(ref.dtype) if t.is_floating_point() else t
    missing = [k for k in expected if k not in state and k not in tied
               and not _tied_by_config(model, k)]
    if missing:
        raise CheckpointError(f"{', '.join(str(f) for f in files)}: missing tensor "
                              f"{missing[0]!r}" + (f" and {len(missing) - 1} more"
                                                   if len(missing) > 1 else ""))
    unused = [k for k in ts.where if k not in ts.used and k not in state]
    if unused:
        log.warning("%s: %d tensors not used by %s (first: %s)", path, len(unused),
                    type(model).__name__, unused[0])
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model


def _load_slice(ts: _Tensors, p, e: dict, slices: dict, filled: dict, dtype, version,
                path: Path) -> None:
    """Read one slice of a fused expert parameter (written by :func:`encode_experts`) into the
    model's parameter, and its record into the experts module."""
    x = p.expert
    ref = slices.get((x["module"], x["param"], int(x["expert"]), x["layer"]))
    if ref is None:
        raise CheckpointError(f"{path / TOOLKIT_NAME}: layer {p.name!r} is expert "
                              f"{x['expert']}'s {x['layer']} of {x['module']}.{x['param']}, "
                              "which the model does not have")
    rows, cols = ref.get_weight().shape
    record = None
    if p.kind in ("pack", "joint"):
        w, record = _decode_quantized(ts, p, rows, cols, version, dtype)
    elif p.kind in ("sparse", "sparse24"):
        w = _decode_sparse(ts, p, rows, cols)
    elif p.fmt == EXPERTS_DENSE_FORMAT:
        w = ts.expect(f"{p.name}.weight", [rows, cols], p.name)
    elif p.kind == "dense":  # its values are in the fused parameter, stored whole
        w = None
    else:
        raise CheckpointError(f"{path / 'config.json'}: expert layer {p.name} is stored in "
                              f"format {p.fmt!r}, which load_compressed cannot decode")
    if w is not None:
        ref.set_weight(w.to(dtype))
        filled.setdefault((x["module"], x["param"]), set()).add((ref.expert, ref.layer))
    if e.get("compressed", True) and "error" in e:
        comp = LayerCompression(settings=_entry_settings(e), error=e["error"],
                                sparsity=e["sparsity"])
        if record is not None and comp.settings.bits is not None:
            comp.scale, comp.zero, comp.g_idx = record
        ref.set_record(comp)


def _entry_settings(e: dict) -> LayerSettings:
    """The layer settings a ``toolkit_compression.json`` entry records (written since format
    version 1 as ``settings``; older entries have the flat keys)."""
    if "settings" in e:
        return LayerSettings.from_dict(e["settings"])
    flat = {k: e.get(k) for k in ("bits", "group_size", "sym", "act_order", "method", "quant")}
    if e.get("pattern"):
        flat["pattern"] = e["pattern"]
    else:
        flat["sparsity"] = e["sparsity"]
    return LayerSettings.from_dict(flat)


def _foreign_settings(p, w) -> LayerSettings:
    """Settings describing a layer another tool wrote (what :func:`toolkit.model_bytes` needs)."""
    d = {}
    a = p.args or {}
    if p.kind in ("pack", "joint", "naive", "int") and a:
        d["bits"] = int(a.get("num_bits") or 8)
        d["sym"] = bool(a.get("symmetric", True))
        d["act_order"] = a.get("actorder") is not None
        strategy = a.get("strategy")
        d["group_size"] = (int(a["group_size"]) if strategy == "group" else
                           int(a["block_structure"][1]) if strategy == "block" else None)
    if p.kind == "sparse24" or p.sparse == "sparse-24-bitmask":
        d["pattern"] = (2, 4)
    elif p.kind in ("sparse", "dense") and w is not None:
        d["sparsity"] = min(float((w == 0).float().mean()), 0.999)
    return LayerSettings.from_dict(d)


def _tied_by_config(model, key: str) -> bool:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return key in keys
    return key in set(keys) and bool(getattr(model.config, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------
# describing
# ----------------------------------------------------------------------------------------------

def _folder_facts(path: Path):
    """Everything :func:`checkpoint_readers` and :func:`describe_checkpoint` read."""
    files, meta, config_data = _folder_contents(path)
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for file in files:
        for key, info in read_header(file).items():
            if key != "__metadata__":
                shapes[key] = list(info["shape"])
                dtypes[key] = info["dtype"]
    qc = config_data.get("quantization_config") or {}
    model = _skeleton(config_data, path)
    plan = plan_layers(model, qc if qc.get("quant_method") in (None, "compressed-tensors")
                       else {}, meta.get("layers") or {}, shapes)
    linear = linear_names(model) if model is not None else None
    return files, meta, config_data, shapes, dtypes, model, plan, linear


def checkpoint_readers(path) -> dict[str, Verdict]:
    """Which readers load the checkpoint folder ``path``: ``{reader: Verdict}`` for the readers
    of :data:`toolkit.checkpoint.formats.READERS` (plain transformers ``from_pretrained``, the same with
    ``CompressedTensorsConfig(dequantize=True)``, :func:`load_compressed`, vLLM). Each verdict
    says ``loads``, ``error`` or ``wrong`` (loads other weights without an error) and why.

    Computed from the files (config, tensor shapes, the module classes of the architecture);
    the transformers rules were measured with transformers 5.24.0 + compressed-tensors 0.20.1
    and are checked against real loads in ``tests/test_readers.py``; the vLLM ones follow its
    compressed-tensors scheme selection code (not run here). Works for the toolkit's folders,
    other compressed-tensors checkpoints and plain model folders.
    """
    _files, meta, config_data, shapes, _dt, _model, plan, linear = _folder_facts(Path(path))
    return predict_readers(config_data, plan, shapes, linear, meta)


@dataclass
class CheckpointInfo:
    """What :func:`checkpoint_info` finds: ``ok`` (with ``verify=True``: True when every weight
    file has the size and SHA-256 recorded at save time, False when one differs -- ``problems``
    says which -- None when nothing was checked: ``verify=False`` or no hashes recorded),
    ``readers`` (:func:`checkpoint_readers`) and ``text`` (what ``toolkit info`` prints: with
    ``verify=True`` the verdict on the checksums first, then the listing)."""

    path: Path
    ok: bool | None
    problems: list[str]
    readers: dict[str, Verdict]
    text: str


def describe_checkpoint(path, verify: bool = False) -> str:
    """The text of :func:`checkpoint_info` (``toolkit info``)."""
    return checkpoint_info(path, verify=verify).text


def checkpoint_info(path, verify: bool = False) -> CheckpointInfo:
    """A summary of a checkpoint folder (``toolkit info``): with ``verify=True`` first whether
    the weight files still have the size and SHA-256 recorded at save time (``checksums ok`` /
    ``checksums FAILED``); then the model; who wrote it, the layout and dtype; for each reader
    whether it ``loads`` the folder or ``refuses`` it (:func:`checkpoint_readers`) and how to
    load it; per compressed layer its format, shape, sparsity, bits, group size and bytes in the
    file (slices of fused expert parameters too, named as stored, with their expert and
    projection); the bytes on disk against the same model in dense fp16. Sizes in decimal units
    (MB = 10^6 bytes). Works for the toolkit's folders, other compressed-tensors checkpoints
    (llm-compressor's) and plain Hugging Face model folders. Returns a :class:`CheckpointInfo`
    (``ok`` False: a command line should exit non-zero)."""
    import transformers

    path = Path(path)
    files, meta, config_data, shapes, dtypes, model, plan, linear = _folder_facts(path)
    qc = config_data.get("quantization_config") or {}
    verdicts = predict_readers(config_data, plan, shapes, linear, meta)

    # ---- the model --------------------------------------------------------------------------
    arch = (config_data.get("architectures") or [None])[0] or \
        (meta.get("model") or {}).get("architecture") or \
        (type(model).__name__ if model is not None else "?")
    dims = []
    for key, label in (("num_hidden_layers", "blocks"), ("n_layer", "blocks"),
                       ("hidden_size", "hidden"), ("n_embd", "hidden"), ("vocab_size", "vocab")):
        if key in config_data and not any(d.endswith(label) for d in dims):
            dims.append(f"{config_data[key]:,} {label}" if label == "vocab" else
                        f"{config_data[key]} {label}")
    source = (meta.get("model") or {}).get("source") or config_data.get("_name_or_path")
    stored = meta.get("dtype") or config_data.get("dtype") or config_data.get("torch_dtype") or "?"
    if meta:
        writer = (f"toolkit (format {meta.get('format_version', 1)}, layout "
                  f"{meta.get('layout', 'compact')}), compressed-tensors "
                  f"{meta.get('compressed_tensors', qc.get('version', '?'))}")
    elif qc:
        fmt = qc.get("format") or (qc.get("sparsity_config") or {}).get("format") or "?"
        writer = (f"{qc.get('quant_method')} {qc.get('version', '?')}, format {fmt} (not the "
                  "toolkit: llm-compressor or another tool)")
    else:
        writer = "a plain model folder (no quantization_config)"

    # ---- files ------------------------------------------------------------------------------
    weight_bytes = sum(f.stat().st_size for f in files)
    all_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    ok, problems, verdict_line = None, [], None
    names = ", ".join(f.name for f in files)
    if not meta.get("files"):
        check = "no hashes recorded"
        if verify:
            verdict_line = (f"checksums: none recorded in {path} (not written by the toolkit): "
                            "nothing to verify")
    elif not verify:
        check = "SHA-256 recorded, not checked (verify=True checks it)"
    else:
        problems = _verify_files(meta, files)
        ok = not problems
        check = "SHA-256 OK" if ok else "DIFFERS: " + "; ".join(problems)
        verdict_line = (f"checksums ok: {names} ({weight_bytes:,} bytes) as recorded at save "
                        "time (size and SHA-256)" if ok else
                        f"checksums FAILED: {'; '.join(problems)}")

    rows = [("model", f"{arch} ({config_data.get('model_type', '?')})"
             + (f", {', '.join(dims)}" if dims else "") + (f"; from {source}" if source else "")),
            ("written by", writer),
            ("dtype", str(stored).replace("torch.", "")),
            ("weights", f"{len(files)} file{'s' if len(files) > 1 else ''}, "
                        f"{weight_bytes:,} bytes ({_human(weight_bytes)}); {check}")]
    width = max(len(k) for k, _ in rows)
    lines = ([verdict_line, ""] if verdict_line else []) + [f"checkpoint {path}"] + \
        [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += ["", f"  readers (transformers rules measured with {MEASURED_WITH}; installed: "
                  f"transformers {transformers.__version__}):"]
    lines += readers_lines(verdicts, indent="    ")
    lines.append(f"    {how_to_load(verdicts, path)}")

    # ---- layers -----------------------------------------------------------------------------
    table = []
    meta_layers = meta.get("layers") or {}
    n_comp = n_zero = 0
    size_of = {k: math.prod(v) * torch.empty(0, dtype=SAFETENSORS_DTYPES[dtypes[k]]).element_size()
               for k, v in shapes.items() if dtypes.get(k) in SAFETENSORS_DTYPES}
    by_prefix: dict[str, int] = {}
    for k, n in size_of.items():
        by_prefix[k.rsplit(".", 1)[0]] = by_prefix.get(k.rsplit(".", 1)[0], 0) + n
    for name, p in plan.items():
        e = meta_layers.get(name, {})
        a = p.args or {}
        shape = list(p.shape) if p.shape else e.get("shape")
        sp = e.get("sparsity")
        if sp is None and p.kind in ("sparse", "sparse24"):
            key = f"{name}.compressed"
            if key in shapes and shape:
                kept = math.prod(shapes[key]) if p.kind == "sparse" else shape[0] * shape[1] / 2
                sp = 1 - kept / (shape[0] * shape[1])
        bits = a.get("num_bits") or e.get("bits")
        group = (a.get("group_size") if a.get("strategy") == "group" else
                 (a.get("block_structure") or [0, 0])[1] if a.get("strategy") == "block" else
                 "row" if a.get("strategy") == "channel" else None) or e.get("group_size")
        extra = []
        if a and not a.get("symmetric", True):
            extra.append("asym")
        if a.get("actorder"):
            extra.append(f"actorder {a['actorder']}")
        whole = e.get("stored") if p.expert else None
        if whole in shapes and shape:  # a slice of a 3-D expert tensor stored whole
            extra.append(f"inside {whole}")
            nbytes = shape[0] * shape[1] * size_of[whole] // max(math.prod(shapes[whole]), 1)
        else:  # its own tensors (a bias is not the layer's)
            nbytes = by_prefix.get(name, 0) - size_of.get(f"{name}.bias", 0)
        if p.expert:
            x = p.expert
            extra.insert(0, f"expert {x['expert']} {x['layer']}")
        if e.get("compressed") is False:
            extra.append("not compressed (stored beside its compressed slices)")
        table.append((name, "x".join(map(str, shape)) if shape else "?", p.fmt,
                      f"{sp:.1%}" if isinstance(sp, (int, float)) else "-",
                      str(bits or 16), str(group or "-"), f"{nbytes:,}", " ".join(extra)))
        if shape and e.get("compressed", True):
            n_comp += shape[0] * shape[1]
            n_zero += (sp or 0) * shape[0] * shape[1]
    if table:
        head = ("layer", "shape", "format", "sparsity", "bits", "group", "bytes", "")
        w = [max(len(r[i]) for r in table + [head]) for i in range(len(head))]
        lines.append("")
        lines.append("  " + "  ".join(f"{h:<{w[i]}}" if i in (0, 2, 7) else f"{h:>{w[i]}}"
                                      for i, h in enumerate(head)).rstrip())
        for r in table:
            lines.append("  " + "  ".join(f"{c:<{w[i]}}" if i in (0, 2, 7) else f"{c:>{w[i]}}"
                                          for i, c in enumerate(r)).rstrip())
        lines.append("")
        n_layers = sum(1 for n in plan if (meta_layers.get(n) or {}).get("compressed", True))
        lines.append(f"  compressed layers: {n_layers}, {n_comp:,} weights, sparsity "
                     f"{n_zero / n_comp:.1%}" if n_comp else
                     f"  compressed layers: {n_layers}")
        n_ex = [p for p in plan.values() if p.expert]
        if n_ex:
            own = sum(1 for p in n_ex if (meta_layers.get(p.name) or {}).get("stored") not in shapes)
            lines.append(f"  expert layers (slices of fused expert parameters): {len(n_ex)}, "
                         f"{own} stored per expert, {len(n_ex) - own} inside their 3-D tensor")

    # ---- sizes ------------------------------------------------------------------------------
    if model is not None:
        n_params = sum(p.numel() for p in model.parameters())  # tied ones once
    else:
        n_params = sum(math.prod(s) for k, s in shapes.items()
                       if dtypes.get(k) in ("F32", "F16", "BF16", "F64"))
    fp16 = 2 * n_params
    lines.append(f"  parameters: {n_params:,} (dense fp16: {fp16:,} bytes, {_human(fp16)})")
    lines.append(f"  weights on disk: {weight_bytes:,} bytes ({_human(weight_bytes)}) = "
                 f"{weight_bytes / fp16:.1%} of dense fp16; folder {all_bytes:,} bytes"
                 if fp16 else f"  weights on disk: {weight_bytes:,} bytes")
    if meta.get("partial_group_layers"):
        lines.append(f"  block strategy (partial last group): "
                     f"{len(meta['partial_group_layers'])} layers")
    partial_blocks = _partial_block_layers(plan)
    if partial_blocks and verdicts["transformers"].status == "loads":
        lines.append(f"  note: {BLOCK_WARNING_NOTE.format(n=partial_blocks)}")
    return CheckpointInfo(path=path, ok=ok, problems=problems, readers=verdicts,
                          text="\n".join(lines))


#: said once, where transformers loads a folder with partial last groups
BLOCK_WARNING_NOTE = (
    "transformers prints compressed-tensors' warning 'block quantization strategy requires "
    "strict division of weight/activation size ...' once per layer whose columns the group "
    "size does not divide ({n} here) as it loads this folder: compressed-tensors 0.20 marks the "
    "warning log-once, but its default log handler ignores the mark. The layers load right (the "
    "last block is narrower, as stored); COMPRESSED_TENSORS_LOG_DISABLED=1 silences it")


def _partial_block_layers(plan: dict) -> int:
    """Layers in the block strategy whose columns the block width does not divide."""
    n = 0
    for p in plan.values():
        a = p.args or {}
        if p.group is not None and a.get("strategy") == "block" and p.shape and \
                p.shape[1] % int((a.get("block_structure") or [1, 1])[1]):
            n += 1
    return n
