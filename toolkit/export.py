"""Save and load compressed checkpoints in the compressed-tensors format (safetensors only).

    save_compressed(model, "out/", report=report, tokenizer=tok)   # a Hugging Face model folder
    model = load_compressed("out/")                                 # the same logits
    print(describe_checkpoint("out/"))                              # `toolkit info out/`

What each compressed layer becomes (compressed-tensors 0.20, the version ``transformers`` 5.x
requires; ``pack_to_int32``, ``pack_bitmasks``, the compressors and the config classes are the
library's own):

====================  ===========================================================================
layer                 stored as
====================  ===========================================================================
quantized (2..8 bit)  ``pack-quantized``: codes packed into int32 (``weight_packed``), one scale
                      per row and group (``weight_scale``), asymmetric zero points packed the same
                      way (``weight_zero_point``), ``weight_shape``. Packed by the library's
                      ``PackedQuantizationCompressor``. Groups that divide the columns use the
                      ``group`` strategy; one grid per row uses ``channel``.
partial last group    The format's ``group`` strategy needs ``group_size`` to divide the columns
                      (SmolLM2: 576 columns at g128). ``partial_groups="block"`` (default) stores
                      these layers with the format's ``block`` strategy, blocks of 1 x group_size,
                      which the format pads itself: the same grids, exactly; compressed-tensors and
                      ``transformers`` load it, but vLLM's kernels need divisible blocks, so a
                      warning names the layers. ``partial_groups="error"`` refuses instead.
act-order             compressed-tensors 0.20 removed ``actorder="group"`` (the per-column group
                      index ``g_idx``). Layers whose groups are still contiguous are stored as
                      usual (``actorder="weight"``: the order only changed the calibration);
                      otherwise ``save_compressed`` raises, naming the layers.
unstructured sparse   ``sparse-bitmask`` (legacy compressed-tensors layout: ``<layer>.shape``,
                      ``.compressed`` (kept values), ``.bitmask`` (1 bit per weight, rows padded to
                      bytes), ``.row_offsets``).
2:4 sparse            ``sparse-24-bitmask`` (``<layer>.shape``, ``.compressed`` (rows x cols/2
                      kept values), ``.bitmask``). Other n:m patterns use ``sparse-bitmask``.
sparse + quantized    compressed-tensors has no joint sparse + packed-int format (its sparse
                      compressors were removed in 0.15; before that sparsity could only be joined
                      with 8-bit/fp8). ``layout="compact"`` (default) stores the kept codes only,
                      packed with ``pack_to_int32``, plus ``weight_bitmask`` (``pack_bitmasks``):
                      the toolkit's extension, read by :func:`load_compressed`.
                      ``layout="transformers"`` stores plain ``pack-quantized`` (the pruned
                      weights are the zero-point code, so nothing is lost; the file is larger).
====================  ===========================================================================

Who loads what: ``transformers.AutoModelForCausalLM.from_pretrained(path)`` (with
compressed-tensors installed) loads checkpoints whose compressed layers are all quantized
``nn.Linear`` layers, i.e. quantization alone, or any sparsity with ``layout="transformers"``
(sparse-only layers are then stored dense: said in the log, in ``sparsity_config`` and in
``toolkit_compression.json``). It does not load the sparse layouts (compressed-tensors >= 0.15
has no sparse decompressor) nor GPT-2 style ``Conv1D`` layers (compressed-tensors quantizes
``nn.Linear`` only): :func:`load_compressed` loads every layout. WARNING: transformers 5.24
does not refuse such a folder: it prints a load report with MISSING/UNEXPECTED keys and
returns a model with re-initialised weights (checked: logits off by ~1). ``toolkit info`` and
``toolkit_compression.json`` (``transformers_loadable``) say which reader a folder needs. Asymmetric quantized
layers (the toolkit's default, ``sym=False``) are written by the library's own compressor, but
transformers 5.24 + compressed-tensors 0.20.1 cannot load them: its loader expects the zero
point unpacked, (rows, groups), while the compressor packs it into int32 along the rows; it
fails with a size-mismatch error. Symmetric quantized checkpoints load and give the same
logits.

Dense tensors (embeddings, norms, biases, uncompressed layers) and scales are written in
``dtype`` (default: the model's own dtype, which makes the round trip exact).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .models import is_conv1d
from .options import LayerSettings
from .records import LayerCompression, config_dict

__all__ = ["save_compressed", "load_compressed", "describe_checkpoint", "CheckpointError",
           "WEIGHTS_NAME", "TOOLKIT_NAME",
           # the writer/reader pieces that save_compressed and toolkit.stream share
           "compressed_layers", "encode_layer", "LayerTable", "stored_tensors", "plain_config",
           "write_model_config", "read_header", "file_sha256", "SAFETENSORS_DTYPES",
           "SAFETENSORS_NAMES"]

log = logging.getLogger("toolkit")

WEIGHTS_NAME = "model.safetensors"
TOOLKIT_NAME = "toolkit_compression.json"
FORMAT_VERSION = 1
# the joint layout has no name in compressed-tensors; this one tells readers it is not theirs
JOINT_FORMAT = "toolkit-sparse-bitmask-pack-quantized"
LAYOUTS = ("compact", "transformers")



class CheckpointError(ValueError):
    """A checkpoint that cannot be read: corrupt, truncated, missing tensors, or inconsistent."""


# ----------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------

def compressed_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, module)]`` of the layers of ``model`` that carry a ``compression`` record."""
    return [(n, m) for n, m in model.named_modules() if getattr(m, "compression", None) is not None
            and getattr(m, "weight", None) is not None]


def _weight_out_in(module) -> torch.Tensor:
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w


def _quant_args(comp, cols: int, strategy_partial: str):
    """compressed-tensors QuantizationArgs for one layer, and the strategy name."""
    from compressed_tensors.quantization import QuantizationArgs

    s = comp.settings
    n_groups = comp.scale.shape[1]
    common = dict(num_bits=s.bits, type="int", symmetric=bool(s.sym))
    if s.act_order:
        common["actorder"] = "weight"
    if n_groups == 1:
        return QuantizationArgs(strategy="channel", **common), "channel"
    if cols % s.group_size == 0:
        return QuantizationArgs(strategy="group", group_size=s.group_size, **common), "group"
    return (QuantizationArgs(strategy="block", block_structure=[1, s.group_size], **common),
            "block")


def _codes(w: torch.Tensor, comp, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes (0..maxq, int64) of ``w`` on the layer's grids, and the zero points per
    column group expanded to (rows, cols); checks that ``w`` lies on its grids."""
    from .quant import group_bounds

    s = comp.settings
    rows, cols = w.shape
    maxq = 2**s.bits - 1
    bounds = group_bounds(cols, s.group_size if comp.scale.shape[1] > 1 else None)
    if len(bounds) != comp.scale.shape[1]:
        raise ValueError(f"{name}: {comp.scale.shape[1]} scales per row for {len(bounds)} groups "
                         f"of {s.group_size} columns")
    widths = torch.tensor([b - a for a, b in bounds])
    if comp.g_idx is not None:
        gidx = comp.g_idx.long()
        contiguous = torch.repeat_interleave(torch.arange(len(bounds)), widths)
        if not torch.equal(gidx, contiguous):
            raise ValueError("act-order groups")  # caught and reported by the caller
    scale = torch.repeat_interleave(comp.scale.float(), widths, dim=1)
    zero = torch.repeat_interleave(comp.zero.float(), widths, dim=1)
    wf = w.float()
    q = torch.clamp(torch.round(wf / scale) + zero, 0, maxq)
    err = (scale * (q - zero) - wf).abs()
    tol = 1e-3 * scale + 1e-6 * wf.abs()
    if w.dtype != torch.float32:
        tol = tol + wf.abs() * (torch.finfo(w.dtype).eps * 2)
    if bool((err > tol).any()):
        r, c = divmod(int(torch.argmax(err - tol)), cols)
        raise ValueError(f"{name}: the weight is not on its quantization grid (row {r}, column "
                         f"{c}: {float(wf[r, c]):.6g} vs {float(scale[r, c] * (q[r, c] - zero[r, c])):.6g}); "
                         "was it changed after compress()?")
    return q.long(), zero.long()


def _pack_quantized(w: torch.Tensor, comp, name: str, partial_groups: str, dtype) -> tuple:
    """(state dict of the layer with local names, QuantizationScheme, strategy, codes, zero)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import QuantizationScheme

    rows, cols = w.shape
    args, strategy = _quant_args(comp, cols, partial_groups)
    if strategy == "block" and partial_groups != "block":
        raise ValueError("partial groups")  # caught and reported by the caller
    q, zero = _codes(w, comp, name)
    half = 2 ** (comp.settings.bits - 1)
    scheme = QuantizationScheme(targets=[name], weights=args,
                                format=CompressionFormat.pack_quantized.value)
    sd = {"weight": (comp.scale.float().repeat_interleave(
        torch.tensor(_widths(cols, comp)), dim=1) * (q - zero).float()),
        "weight_scale": comp.scale.float().clone()}
    if not comp.settings.sym:
        sd["weight_zero_point"] = (comp.zero.long() - half).to(torch.int8)
    compressor = BaseCompressor.get_value_from_registry(CompressionFormat.pack_quantized.value)
    out = compressor.compress(sd, scheme)
    out["weight_scale"] = out["weight_scale"].to(dtype)
    return out, scheme, strategy, q, zero


def _widths(cols: int, comp) -> list[int]:
    from .quant import group_bounds

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
    """Legacy compressed-tensors sparse layouts, keyed by local names."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.utils import pack_bitmasks

    rows, cols = w.shape
    shape = torch.tensor([rows, cols]).reshape(-1, 1)
    if pattern is not None and tuple(pattern) == (2, 4) and cols % 4 == 0 and bool(
            ((w.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all()):
        mask = _mask_24(w)
        values = w[mask].reshape(rows, cols // 2).to(dtype)
        return ({"shape": shape, "compressed": values, "bitmask": pack_bitmasks(mask)},
                CompressionFormat.sparse_24_bitmask.value)
    mask = w != 0
    counts = mask.sum(dim=1)
    offsets = torch.cumsum(counts, 0) - counts
    return ({"shape": shape, "compressed": w[mask].to(dtype), "bitmask": pack_bitmasks(mask),
             "row_offsets": offsets}, CompressionFormat.sparse_bitmask.value)


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
    if getattr(cfg, "quantization_config", None) is not None or hasattr(cfg, "quantization_config"):
        try:
            delattr(cfg, "quantization_config")
        except AttributeError:
            pass
    for attr in ("_pre_quantization_dtype",):
        if hasattr(cfg, attr):
            try:
                delattr(cfg, attr)
            except AttributeError:
                pass
    return cfg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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

    :func:`save_compressed` adds every layer at once; :mod:`toolkit.stream` adds them block by
    block (and rebuilds an accumulator from its journal when a run resumes).
    """

    def __init__(self, layout: str):
        self.layout = layout
        self.schemes: dict[tuple, list[str]] = OrderedDict()
        self.meta_layers: dict[str, dict] = OrderedDict()
        self.sparse_targets: dict[str, list[str]] = {}
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
        if rec.get("sparse_fmt"):
            self.sparse_targets.setdefault(rec["sparse_fmt"], []).append(name)
        if rec.get("dense_sparse"):
            self.dense_sparse.append(name)
        self.meta_layers[name] = rec["entry"]

    def check(self, partial_groups: str) -> None:
        """Raise for layers the format cannot store; log the ones stored in a special way."""
        report_problems(self.actorder_bad, self.partial, self.dense_sparse, partial_groups)

    def configs(self):
        """``(quantization_config, sparsity_config)`` of compressed-tensors (either may be None)."""
        return _build_configs(self.schemes, self.meta_layers, self.sparse_targets,
                              self.dense_sparse, self.layout)

    def meta(self, dtype, tied: dict, config=None, summary=None) -> OrderedDict:
        """The content of ``toolkit_compression.json`` (without ``files``): the layers, and the
        run's ``config`` (a CompressConfig) and report ``summary`` when given."""
        from compressed_tensors.config import CompressionFormat

        # transformers 5.x + compressed-tensors 0.20 load packed symmetric Linear layers; an
        # asymmetric one fails there (its loader expects the zero point unpacked), loudly
        toolkit_ready = all(e["format"] in (CompressionFormat.pack_quantized.value,
                                            CompressionFormat.dense.value) and not e["transposed"]
                            and (e["bits"] is None or e["sym"]) for e in self.meta_layers.values())
        meta = OrderedDict(
            format_version=FORMAT_VERSION, producer="toolkit", layout=self.layout,
            compressed_tensors=_ct_version(), dtype=_dtype_name(dtype),
            transformers_loadable=bool(toolkit_ready),
            partial_group_layers=[p.split(" ")[0] for p in self.partial],
            tied=tied, layers=self.meta_layers)
        if config is not None:
            meta["config"] = _jsonable(config_dict(config))
        if summary is not None:
            meta["summary"] = _jsonable(summary)
        return meta


def encode_layer(name: str, module: nn.Module, layout: str, partial_groups: str,
                  dtype: torch.dtype) -> dict | None:
    """The stored form of one compressed layer, or None when it is stored as a plain weight.

    Returns ``{"tensors": {full name: tensor (CPU)}, "entry": toolkit_compression.json entry,
    "scheme": (QuantizationArgs json, format) | None, "sparse_fmt": str | None,
    "dense_sparse": bool, "partial": "name (cols columns)" | None, "problem": None |
    "actorder" | "partial"}``; with a ``problem`` the layer cannot be stored (see
    :func:`report_problems`). Everything but ``tensors`` is JSON-serialisable.
    """
    from compressed_tensors.config import CompressionFormat

    comp = module.compression
    s = comp.settings
    w = _weight_out_in(module)
    rows, cols = w.shape
    prunes = s.prunes and bool((w == 0).any())
    entry = dict(shape=[rows, cols], sparsity=float(comp.sparsity), bits=s.bits,
                 group_size=s.group_size if s.bits is not None else None,
                 sym=s.sym if s.bits is not None else None, act_order=s.act_order,
                 pattern=list(s.pattern) if s.pattern else None, method=s.method,
                 quant=s.quant if s.bits is not None else None, error=float(comp.error),
                 transposed=is_conv1d(module), settings=s.to_dict())
    rec = dict(tensors={}, entry=entry, scheme=None, sparse_fmt=None, dense_sparse=False,
               partial=None, problem=None)
    local: dict[str, torch.Tensor]
    if s.bits is not None:
        try:
            local, scheme, strategy, q, zero = _pack_quantized(w, comp, name, partial_groups,
                                                               dtype)
        except ValueError as e:
            if str(e) == "partial groups":
                rec.update(partial=f"{name} ({cols} columns)", problem="partial")
                return rec
            if str(e) == "act-order groups":
                rec.update(problem="actorder")
                return rec
            raise
        if strategy == "block":
            rec["partial"] = f"{name} ({cols} columns)"
        fmt = CompressionFormat.pack_quantized.value
        if prunes and layout == "compact":
            from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
            from compressed_tensors.utils import pack_bitmasks

            mask = w != 0
            half = 2 ** (s.bits - 1)
            kept = (q[mask] - half).to(torch.int8).reshape(1, -1)
            local["weight_packed"] = pack_to_int32(kept, s.bits)
            local["weight_bitmask"] = pack_bitmasks(mask.cpu())
            fmt = JOINT_FORMAT
        rec["scheme"] = (scheme.weights.model_dump_json(), fmt)
        entry.update(format=fmt, strategy=strategy)
    elif s.prunes:
        if layout == "compact":
            local, fmt = _sparse_tensors(w.cpu(), s.pattern, dtype)
            rec["sparse_fmt"] = fmt
        else:
            rec["dense_sparse"] = True
            fmt = CompressionFormat.dense.value
            local = {"weight": w.to(dtype)}
        entry.update(format=fmt)
    else:
        return None
    rec["tensors"] = {f"{name}.{k}": v.detach().cpu().contiguous() for k, v in local.items()}
    return rec


def report_problems(actorder_bad: list[str], partial: list[str], dense_sparse: list[str],
                    partial_groups: str) -> None:
    """Raise for layers the format cannot store; log the ones stored in a special way."""
    if actorder_bad:
        raise ValueError(
            "these layers were quantized with act_order and groups: their columns map to groups "
            "out of order (g_idx), which compressed-tensors 0.20 no longer stores (actorder="
            "'group' was removed): " + ", ".join(actorder_bad) + ". Compress with "
            "act_order=False, or with group_size=None (one grid per row), to save them.")
    if partial and partial_groups == "error":
        raise ValueError(
            "the compressed-tensors 'group' strategy needs the group size to divide the columns; "
            "these layers end with a narrower group: " + ", ".join(partial) + ". Pass "
            "partial_groups='block' to store them with the format's block strategy (1 x "
            "group_size blocks, padded by the format; loads in compressed-tensors/transformers, "
            "not in vLLM's kernels), or compress with a group size that divides the columns.")
    if partial:
        log.warning("stored with the compressed-tensors 'block' strategy (1 x group_size, last "
                    "block narrower) because the group size does not divide their columns; "
                    "compressed-tensors and transformers load them, vLLM's kernels do not: %s",
                    ", ".join(partial))
    if dense_sparse:
        log.warning("layout='transformers': %d sparse layers are stored dense (compressed-tensors "
                    "%s has no sparse compressor transformers can load): %s", len(dense_sparse),
                    _ct_version(), ", ".join(dense_sparse))


def _build_configs(schemes: dict, meta_layers: dict, sparse_targets: dict,
                   dense_sparse: list[str], layout: str):
    """compressed-tensors ``(QuantizationConfig | None, sparsity config | None)``."""
    from compressed_tensors.config import (
        BitmaskConfig,
        CompressionFormat,
        DenseSparsityConfig,
        Sparse24BitMaskConfig,
    )
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    qcfg = None
    if schemes:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        groups = {}
        for i, ((args_json, fmt), names) in enumerate(schemes.items()):
            ct_fmt = fmt if fmt != JOINT_FORMAT else CompressionFormat.pack_quantized.value
            groups[f"group_{i}"] = QuantizationScheme(
                targets=names, weights=QuantizationArgs.model_validate_json(args_json),
                format=ct_fmt)
        formats = {g.format for g in groups.values()}
        qcfg = QuantizationConfig(
            config_groups=groups, quantization_status=QuantizationStatus.COMPRESSED,
            format=formats.pop() if len(formats) == 1 else
            CompressionFormat.mixed_precision.value,
            ignore=[])
    n_params = sum(e["shape"][0] * e["shape"][1] for e in meta_layers.values())
    n_zero = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in meta_layers.values())
    sparsity_cfg = None
    if sparse_targets or dense_sparse or any(
            e["format"] == JOINT_FORMAT or (e["sparsity"] > 0) for e in meta_layers.values()):
        structures = {("2:4" if e["pattern"] == [2, 4] else
                       f"{e['pattern'][0]}:{e['pattern'][1]}" if e["pattern"] else "unstructured")
                      for e in meta_layers.values() if e["sparsity"] > 0}
        structure = structures.pop() if len(structures) == 1 else "mixed"
        sparse_names = [n for n, e in meta_layers.items() if e["sparsity"] > 0]
        gs = n_zero / n_params if n_params else 0.0
        if dense_sparse or (layout == "transformers"):
            sparsity_cfg = DenseSparsityConfig(targets=sparse_names, global_sparsity=gs,
                                               sparsity_structure=structure)
        elif set(sparse_targets) == {CompressionFormat.sparse_24_bitmask.value}:
            sparsity_cfg = Sparse24BitMaskConfig(targets=sparse_names, global_sparsity=gs)
        else:
            sparsity_cfg = BitmaskConfig(targets=sparse_names, global_sparsity=gs,
                                         sparsity_structure=structure)
    return qcfg, sparsity_cfg


def write_model_config(folder: Path, cfg, generation_config, qcfg, sparsity_cfg, dtype) -> None:
    """Write ``config.json`` (with the quantization/sparsity config) and
    ``generation_config.json`` into ``folder``. ``cfg`` is a plain model config (no loader's
    quantization_config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import CompressionFormat

    cfg.dtype = dtype
    cfg.save_pretrained(folder)
    if generation_config is not None:
        try:
            generation_config.save_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - a generation config is optional
            log.warning("generation_config not saved: %s", e)
    if qcfg is not None:
        ModelCompressor(quantization_config=qcfg).update_config(str(folder))
    with open(folder / "config.json") as f:
        config_data = json.load(f)
    if qcfg is None and sparsity_cfg is not None:
        config_data["quantization_config"] = {
            "quant_method": "compressed-tensors", "version": _ct_version(),
            "format": CompressionFormat.dense.value, "config_groups": {},
            "quantization_status": "compressed"}
    if sparsity_cfg is not None:
        config_data["quantization_config"]["sparsity_config"] = sparsity_cfg.model_dump()
    with open(folder / "config.json", "w") as f:
        json.dump(config_data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


@torch.no_grad()
def save_compressed(model: nn.Module, path, report=None, tokenizer=None, overwrite: bool = False,
                    *, dtype: torch.dtype | None = None, layout: str = "compact",
                    partial_groups: str = "block") -> Path:
    """Write ``model`` (compressed by :func:`toolkit.compress`) to the folder ``path``.

    The folder holds ``config.json`` (with the compressed-tensors ``quantization_config`` and
    ``sparsity_config`` describing every layer's scheme), ``model.safetensors`` (compressed as
    described in the module docstring), ``toolkit_compression.json`` (per-layer settings, the
    layout of each layer, the report summary and a SHA-256 of the weights file),
    ``generation_config.json`` and the tokenizer files when ``tokenizer`` is given.

    ``dtype``: dtype of the dense tensors and scales (default: the model's dtype; pass
    ``torch.float16`` for a half-size fp32 model at a small loss of exactness).
    ``layout``: ``"compact"`` (default, smallest: bitmasks for sparse layers, joint sparse +
    packed codes) or ``"transformers"`` (only what ``transformers`` + compressed-tensors load:
    sparse-only layers dense, sparse + quantized layers as plain ``pack-quantized``).
    ``partial_groups``: ``"block"`` (default) or ``"error"``, see the module docstring.

    Writing goes to a temporary folder next to ``path`` that is renamed into place at the end;
    an existing ``path`` is refused unless ``overwrite=True``. Returns the folder's path.
    """
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if partial_groups not in ("block", "error"):
        raise ValueError(f"partial_groups must be 'block' or 'error', got {partial_groups!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if dtype is None:
        dtype = next(model.parameters()).dtype
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")

    layers = compressed_layers(model)
    # ---- per-layer compression, checked before anything is written ------------------------
    tensors: dict[str, torch.Tensor] = OrderedDict()
    acc = LayerTable(layout)
    for name, module in layers:
        rec = encode_layer(name, module, layout, partial_groups, dtype)
        if rec is not None:
            acc.add(name, rec)
            tensors.update(rec["tensors"])
    acc.check(partial_groups)
    meta_layers = acc.meta_layers

    # ---- the dense rest of the state dict (tied tensors once) ------------------------------
    table, tied = stored_tensors(model)
    stored = {f"{n}.weight" for n in meta_layers}
    for full, t in table:
        if full in stored:
            continue
        t = t.detach()
        tensors[full] = (t.to(dtype) if t.is_floating_point() else t).cpu().contiguous()

    # ---- config -----------------------------------------------------------------------------
    qcfg, sparsity_cfg = acc.configs()
    meta = acc.meta(dtype, tied, config=getattr(report, "config", None),
                    summary=getattr(report, "summary", None))

    # ---- write into a temporary folder, then rename into place ------------------------------
    parent = path.parent if str(path.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        write_model_config(tmp, plain_config(model), getattr(model, "generation_config", None),
                      qcfg, sparsity_cfg, dtype)
        save_file(dict(tensors), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "producer": "toolkit"})
        meta["files"] = {WEIGHTS_NAME: {"bytes": (tmp / WEIGHTS_NAME).stat().st_size,
                                        "sha256": file_sha256(tmp / WEIGHTS_NAME)}}
        with open(tmp / TOOLKIT_NAME, "w") as f:
            json.dump(meta, f, indent=2)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
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
    log.info("saved %d compressed layers to %s (%s)", len(meta_layers), path,
             _human(sum(f.stat().st_size for f in path.iterdir() if f.is_file())))
    return path


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
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
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


def _decompress_quantized(ts: _Tensors, name: str, scheme, rows: int, cols: int, joint: bool):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.utils import unpack_bitmasks

    args = scheme.weights
    bits = args.num_bits
    if args.strategy == "channel":
        n_groups = 1
    elif args.strategy == "group":
        n_groups = math.ceil(cols / args.group_size)
        if cols % args.group_size:
            raise CheckpointError(f"{name}: group strategy with group_size {args.group_size} does "
                                  f"not divide its {cols} columns")
    elif args.strategy == "block":
        br, bc = args.block_structure
        if br != 1:
            raise CheckpointError(f"{name}: block structure {args.block_structure} unsupported")
        n_groups = math.ceil(cols / bc)
    else:
        raise CheckpointError(f"{name}: weight strategy {args.strategy!r} unsupported")
    shape = ts.get(f"{name}.weight_shape", name).flatten().tolist()
    if shape != [rows, cols]:
        raise CheckpointError(f"{ts.where[name + '.weight_shape']}: tensor "
                              f"'{name}.weight_shape' says {shape}, the model config implies "
                              f"{[rows, cols]}")
    sd = {"weight_shape": torch.tensor(shape),
          "weight_scale": ts.expect(f"{name}.weight_scale", [rows, n_groups], name)}
    if not args.symmetric:
        zp_shape = ([math.ceil(rows * bits / 32), n_groups] if args.strategy != "block"
                    else [rows, n_groups])
        sd["weight_zero_point"] = ts.expect(f"{name}.weight_zero_point", zp_shape, name)
    if not joint:
        sd["weight_packed"] = ts.expect(f"{name}.weight_packed",
                                        [rows, math.ceil(cols * bits / 32)], name)
        compressor = BaseCompressor.get_value_from_registry("pack-quantized")
        return compressor.decompress(sd, scheme)["weight"]
    bitmask = ts.expect(f"{name}.weight_bitmask", [rows, math.ceil(cols / 8)], name)
    mask = unpack_bitmasks(bitmask, [rows, cols])
    k = int(mask.sum())
    packed = ts.expect(f"{name}.weight_packed", [1, math.ceil(k * bits / 32)], name)
    kept = unpack_from_int32(packed, bits, torch.Size([1, k])).flatten()
    scale = sd["weight_scale"]
    if args.symmetric:
        zp = None
        codes = torch.zeros(rows, cols, dtype=torch.int8)
    else:
        zp = unpack_from_int32(sd["weight_zero_point"], bits, torch.Size([rows, n_groups]),
                               packed_dim=0) if args.strategy != "block" else \
            sd["weight_zero_point"]
        width = args.group_size if args.strategy == "group" else (
            cols if args.strategy == "channel" else args.block_structure[1])
        codes = torch.repeat_interleave(zp, width, dim=1)[:, :cols].to(torch.int8).clone()
    codes[mask] = kept.to(torch.int8)
    return dequantize(x_q=codes, scale=scale, zero_point=zp, args=args)


def _decompress_sparse(ts: _Tensors, name: str, fmt: str, rows: int, cols: int):
    from compressed_tensors.utils import unpack_bitmasks

    shape = ts.get(f"{name}.shape", name).flatten().tolist()
    if shape != [rows, cols]:
        raise CheckpointError(f"{ts.where[name + '.shape']}: tensor '{name}.shape' says {shape}, "
                              f"the model config implies {[rows, cols]}")
    bitmask = ts.expect(f"{name}.bitmask", [rows, math.ceil(cols / 8)], name)
    mask = unpack_bitmasks(bitmask, [rows, cols])
    k = int(mask.sum())
    if fmt == "sparse-24-bitmask":
        values = ts.expect(f"{name}.compressed", [rows, cols // 2], name)
    else:
        values = ts.expect(f"{name}.compressed", [k], name)
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


def _check_files(path: Path, meta: dict, files: list[Path]) -> None:
    for file in files:
        info = meta.get("files", {}).get(file.name)
        if not info:
            continue
        size = file.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, {info['bytes']} were written "
                                  "(truncated or replaced)")
        if file_sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: SHA-256 differs from the one recorded at save time "
                                  "(the file is corrupt)")


@torch.no_grad()
def load_compressed(path, device=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, verify: bool = True) -> nn.Module:
    """Load a folder written by :func:`save_compressed` (or any pack-quantized / sparse-bitmask
    compressed-tensors checkpoint of a causal LM) as a dense ``transformers`` model.

    Reads safetensors only (no pickle is executed), ``trust_remote_code`` is off unless asked.
    Every compressed layer is decompressed with the stored scales, zero points and masks, so
    the weights are exactly those written. ``verify`` checks the SHA-256 recorded at save time.
    Errors (:class:`CheckpointError`, a ``ValueError``) name the file and the tensor.
    Each decompressed layer keeps a ``compression`` record, so :func:`toolkit.model_bytes`
    counts the loaded model as compressed.
    """
    from compressed_tensors.quantization import QuantizationScheme
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
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype", "").upper(), None) or getattr(
            torch, meta.get("dtype", "float32"), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                             trust_remote_code=trust_remote_code)
    model.eval()
    ts = _Tensors(files)

    # which layer holds what
    layer_fmt: dict[str, tuple[str, object]] = {}
    for group in (qc.get("config_groups") or {}).values():
        scheme = QuantizationScheme.model_validate(group)
        for t in scheme.targets:
            layer_fmt[t] = ("quantized", scheme)
    for name, e in (meta.get("layers") or {}).items():
        fmt = e.get("format")
        if fmt == JOINT_FORMAT:
            if name not in layer_fmt:
                raise CheckpointError(f"{path / 'config.json'}: layer {name} has no "
                                      "quantization scheme in config_groups")
            layer_fmt[name] = ("joint", layer_fmt[name][1])
        elif fmt in ("sparse-bitmask", "sparse-24-bitmask"):
            layer_fmt[name] = (fmt, None)
    sc = qc.get("sparsity_config") or {}
    if sc.get("format") in ("sparse-bitmask", "sparse-24-bitmask"):
        for t in sc.get("targets") or []:
            if t not in layer_fmt and f"{t}.bitmask" in ts:
                layer_fmt[t] = (sc["format"], None)

    modules = dict(model.named_modules())
    state = {}
    for name, (kind, scheme) in layer_fmt.items():
        if name.startswith("re:") or name not in modules:
            raise CheckpointError(f"{path / 'config.json'}: compressed layer {name!r} is not a "
                                  f"module of {type(model).__name__}")
        module = modules[name]
        transposed = is_conv1d(module)
        w_shape = tuple(module.weight.shape)
        rows, cols = (w_shape[1], w_shape[0]) if transposed else w_shape
        if kind in ("quantized", "joint"):
            w = _decompress_quantized(ts, name, scheme, rows, cols, kind == "joint")
        else:
            w = _decompress_sparse(ts, name, kind, rows, cols)
        state[f"{name}.weight"] = (w.T if transposed else w).to(dtype).contiguous()
        e = (meta.get("layers") or {}).get(name)
        if e is not None:
            module.compression = LayerCompression(settings=_entry_settings(e), error=e["error"],
                                                  sparsity=e["sparsity"])
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
        log.warning("%s: tensors not used by %s: %s", path, type(model).__name__,
                    ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""))
    model.load_state_dict(state, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if device is not None:
        model.to(device)
    return model


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


def _tied_by_config(model, key: str) -> bool:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    if isinstance(keys, dict):
        return key in keys
    return key in set(keys) and bool(getattr(model.config, "tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------
# describing
# ----------------------------------------------------------------------------------------------

def describe_checkpoint(path) -> str:
    """A text summary of a checkpoint folder: per compressed layer its format, shape, sparsity,
    bits and group size; the bytes on disk against the same model in dense fp16."""
    path = Path(path)
    files, meta, config_data = _folder_contents(path)
    qc = config_data.get("quantization_config") or {}
    headers = {file: read_header(file) for file in files}
    layer_info: dict[str, dict] = dict(meta.get("layers") or {})
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        for t in group.get("targets", []):
            e = layer_info.setdefault(t, {"format": group.get("format") or qc.get("format")})
            e.setdefault("bits", w.get("num_bits"))
            e.setdefault("group_size", w.get("group_size") if w.get("strategy") != "block"
                         else (w.get("block_structure") or [0, 0])[1])
    # parameter count of the dense model, from the stored shapes
    n_params = 0
    names_done = set()
    for header in headers.values():
        for key, info in header.items():
            if key == "__metadata__":
                continue
            layer = key.rsplit(".", 1)[0]
            if layer in layer_info:
                if layer not in names_done:
                    names_done.add(layer)
                    shp = layer_info[layer].get("shape")
                    if shp is None:
                        for sk in (f"{layer}.weight_shape", f"{layer}.shape"):
                            if sk in header:
                                shp = [0, 0]
                        shp = shp or [0, 0]
                    n_params += shp[0] * shp[1]
                if not key.endswith((".weight_packed", ".weight_scale", ".weight_zero_point",
                                     ".weight_shape", ".weight_bitmask", ".shape", ".compressed",
                                     ".bitmask", ".row_offsets", ".weight")):
                    n_params += math.prod(info["shape"])
            else:
                n_params += math.prod(info["shape"])
    weight_bytes = sum(f.stat().st_size for f in files)
    all_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    lines = [f"checkpoint {path}",
             f"  model: {', '.join(config_data.get('architectures') or ['?'])} "
             f"({config_data.get('model_type', '?')}), dtype {meta.get('dtype', config_data.get('dtype', '?'))}",
             f"  format: compressed-tensors {qc.get('version', '?')}, "
             f"{qc.get('format', 'dense')}"
             + (f", sparsity {(qc.get('sparsity_config') or {}).get('format')}"
                if qc.get("sparsity_config") else "")
             + (f"; layout {meta['layout']}" if meta.get("layout") else ""),
             f"  loads with transformers.from_pretrained: "
             f"{'yes' if meta.get('transformers_loadable', True) else 'no (use toolkit.load_compressed)'}",
             ""]
    if layer_info:
        lines.append(f"  {'layer':<48} {'shape':>12} {'format':<20} {'sparsity':>8} "
                     f"{'bits':>4} {'group':>5}")
        for name, e in layer_info.items():
            shp = "x".join(str(x) for x in e.get("shape", [])) or "?"
            sp = e.get("sparsity")
            lines.append(f"  {name:<48} {shp:>12} {str(e.get('format', '?')):<20} "
                         f"{(f'{sp:.1%}' if isinstance(sp, (int, float)) else '?'):>8} "
                         f"{str(e.get('bits') or 16):>4} {str(e.get('group_size') or '-'):>5}")
        lines.append("")
        shapes = [e["shape"] for e in layer_info.values() if e.get("shape")]
        cp = sum(a * b for a, b in shapes)
        sps = [e.get("sparsity", 0) * e["shape"][0] * e["shape"][1]
               for e in layer_info.values() if e.get("shape")]
        if cp:
            lines.append(f"  compressed layers: {len(layer_info)}, {cp:,} params, "
                         f"sparsity {sum(sps) / cp:.1%}")
    fp16 = n_params * 2
    lines.append(f"  parameters: {n_params:,}")
    lines.append(f"  weights on disk: {weight_bytes:,} bytes ({_human(weight_bytes)}); "
                 f"folder {all_bytes:,} bytes")
    lines.append(f"  dense fp16: {fp16:,} bytes ({_human(fp16)}); on disk / fp16 = "
                 f"{weight_bytes / fp16:.1%}" if fp16 else "  dense fp16: ?")
    if meta.get("partial_group_layers"):
        lines.append(f"  block strategy (partial last group): "
                     f"{len(meta['partial_group_layers'])} layers")
    return "\n".join(lines)
