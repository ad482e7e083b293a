"""Size accounting: the bytes a checkpoint of a (compressed) model needs.

Every stored number counts, at the width it is stored with. Three layouts:

``layout="standard"`` (the default) is what :func:`toolkit.checkpoint.saveload.save_compressed` writes by
default: compressed-tensors tensors, byte for byte, without the safetensors header and the JSON
files. For a linear layer of ``rows x cols`` (out x in), with dense tensors and scales in a
``d``-byte float (``dense_bits / 8``; 2 for fp16/bf16):

* left dense, or pruned and not quantized: ``weight`` = ``rows * cols * d`` (zeros included).
* quantized to ``b`` bits, groups of ``g`` columns, pruned or not (``pack-quantized``, packed by
  the library's ``pack_to_int32``): ``weight_packed`` = int32 words holding the ``b``-bit codes
  of each row densely (no padding between codes; pruned weights are the zero-point code),
  ``rows * ceil(cols * b / 32) * 4``; ``weight_scale`` = one scale per row and group in the dense
  float, ``rows * G * d`` with ``G = ceil(cols / g)`` (a narrower last group has its own scale;
  ``G = 1`` for one grid per row); ``weight_zero_point`` (asymmetric only) = the ``b``-bit zero
  points packed into int32 along the rows, ``ceil(rows * b / 32) * G * 4`` -- except in the
  format's ``block`` strategy, whose zero points stay int8, ``rows * G``: the export uses it for
  every asymmetric layer (transformers' plain loader reads no other asymmetric form), and for a
  layer whose ``g`` does not divide ``cols`` and every layer quantized with the same settings
  (``block=True``; :func:`toolkit.checkpoint.formats.partial_group_keys`); ``weight_shape`` =
  int64[2], 16 bytes; ``weight_g_idx`` =
  int32 group index per input column, ``cols * 4``, only when act-order left the groups out of
  column order (compressed-tensors 0.20 cannot store it and the export refuses such layers; it
  is counted as older compressed-tensors and GPTQ checkpoints store it).

``layout="compact"`` is what ``save_compressed(layout="compact")`` writes, the smallest file:

* pruned, not quantized, unstructured (and n:m other than 2:4): ``compressed`` = the non-zero
  values, ``nnz * d``; ``bitmask`` = one bit per weight packed along each row
  (``pack_bitmasks``, i.e. ``numpy.packbits``), ``rows * ceil(cols / 8)`` bytes; ``row_offsets``
  = where each row starts in ``compressed``, int64, ``rows * 8``; ``shape`` = int64[2], 16 bytes.
* pruned 2:4, not quantized: ``compressed`` = exactly half the values, ``rows * cols / 2 * d``;
  ``bitmask`` = ``rows * ceil(cols / 8)``; ``shape`` = 16 bytes.
* pruned *and* quantized: as pack-quantized, but ``weight_packed`` holds only the kept codes,
  ``ceil(nnz * b / 32) * 4``, plus ``weight_bitmask``, ``rows * ceil(cols / 8)``.
* quantized only: as in the standard layout.

``layout="packed"``: the information itself, bit-packed with no container overhead -- the
least a format needs:

* values: ``kept * b`` bits (``kept * dense_bits`` unquantized);
* unstructured sparsity: a bitmask of ``rows * cols`` bits;
* n:m sparsity: ``ceil(log2(m))`` index bits per kept value (2:4: 2 bits per kept value, i.e. 1
  bit per weight, the same as a bitmask);
* quantization: ``rows * G`` scales of ``dense_bits`` and, asymmetric, ``rows * G`` zero points of
  ``b`` bits; with out-of-order act-order groups an int32 group index per input column.

Everything else (embeddings, lm_head, norms, biases, layers left alone) is dense in every layout:
``numel * dense_bits``. Tied parameters (embeddings shared with lm_head) count once.

bitsandbytes layers (see :mod:`toolkit.measure.bnb`) count what bitsandbytes serializes, whatever the
layout: 4-bit: the packed data (two codes per byte) + ``quant_state.as_dict(packed=True)``
(absmax per block of 64 as float32, or with double quantization as uint8 + a float32 absmax per
256 blocks + the 256-entry nested code; the 16-entry code; the small JSON blob); LLM.int8: int8
weight + a float32 scale per row (``SCB``) + the 1-byte ``weight_format``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.checkpoint.formats import block_key, partial_group_keys
from toolkit.model.experts import RECORDS, fused_layers
from toolkit.model.layers import is_conv1d

__all__ = ["linear_bits", "linear_bytes", "model_bytes", "compressed_weight_bytes", "SizeBreakdown",
           "LAYOUTS"]

LAYOUTS = ("standard", "compact", "packed")
_INT64, _INT32 = 8, 4


def _check_int(v, name, minimum=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def linear_bytes(rows: int, cols: int, *, nnz: int | None = None,
                 pattern: tuple[int, int] | None = None, sparse: bool | None = None,
                 bits: int | None = None, group_size: int | None = None, sym: bool = False,
                 act_order: bool = False, dense_bits: int = 16,
                 layout: str = "standard", block: bool = False) -> dict[str, float]:
    """The stored terms of one linear weight (``rows x cols``), in bytes, by tensor name.

    ``nnz``: weights kept (non-zero); ``sparse`` (default: ``nnz < rows * cols`` or a pattern)
    says the layer is pruned; ``pattern``: ``(n, m)`` for n:m sparsity. ``bits``: 2..8 to count
    a quantized layer, None for float values. ``group_size``: columns per grid (None: one per
    row). ``act_order``: the columns map to groups out of order, so a group index is stored.
    ``block``: stored with the block strategy even where ``group_size`` divides ``cols``.
    See the module docstring for each term and layout. The terms sum to the layer's bytes; in
    the ``"packed"`` layout they can be fractional (bits / 8).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    _check_int(rows, "rows")
    _check_int(cols, "cols")
    numel = rows * cols
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise ValueError(f"n:m pattern {n}:{m} needs cols ({cols}) to be a multiple of {m}")
        nnz = numel // m * n if nnz is None else nnz
    nnz = numel if nnz is None else _check_int(nnz, "nnz", 0)
    if nnz > numel:
        raise ValueError(f"nnz ({nnz}) is larger than rows * cols ({numel})")
    if sparse is None:
        sparse = pattern is not None or nnz < numel
    d = dense_bits / 8
    groups = 1 if group_size is None else math.ceil(cols / _check_int(group_size, "group_size"))
    if layout == "packed":
        # n:m keeps exactly n of every m slots (a kept weight may happen to be 0)
        kept = numel // pattern[1] * pattern[0] if pattern is not None else nnz
        out = {"values": kept * (bits if bits is not None else dense_bits) / 8}
        if sparse:
            if pattern is not None:
                out["index"] = kept * math.ceil(math.log2(pattern[1])) / 8
            else:
                out["bitmask"] = numel / 8
        if bits is not None:
            out["scale"] = rows * groups * d
            if not sym:
                out["zero_point"] = rows * groups * bits / 8
            if act_order:
                out["g_idx"] = cols * _INT32
        return out
    bitmask = rows * math.ceil(cols / 8)
    if bits is not None:  # pack-quantized
        if sparse and layout == "compact":  # kept codes only + a bitmask
            out = {"weight_packed": math.ceil(nnz * bits / 32) * _INT32,
                   "weight_bitmask": bitmask}
        else:  # every code, pruned weights as the zero-point code
            out = {"weight_packed": rows * math.ceil(cols * bits / 32) * _INT32}
        out["weight_scale"] = rows * groups * d
        if not sym:
            if not block and (groups == 1 or cols % group_size == 0):  # packed along rows
                out["weight_zero_point"] = math.ceil(rows * bits / 32) * groups * _INT32
            else:  # block strategy (asymmetric, or a partial last group): int8 zero points
                out["weight_zero_point"] = rows * groups
        if act_order:
            out["weight_g_idx"] = cols * _INT32
        out["weight_shape"] = 2 * _INT64
        return out
    if not sparse or layout == "standard":
        return {"weight": numel * d}
    if pattern == (2, 4):  # sparse-24-bitmask
        return {"compressed": numel // 2 * d, "bitmask": bitmask, "shape": 2 * _INT64}
    return {"compressed": nnz * d, "bitmask": bitmask,  # sparse-bitmask
            "row_offsets": rows * _INT64, "shape": 2 * _INT64}


def linear_bits(rows: int, cols: int, *, kept: int | None = None, sparse: str | None = None,
                pattern: tuple[int, int] | None = None, bits: int | None = None,
                group_size: int | None = None, sym: bool = False, act_order: bool = False,
                value_bits: int = 16, layout: str = "packed") -> float:
    """Total bits of one linear weight (``sparse``: None, ``"bitmask"`` or ``"nm"``); the sum of
    :func:`linear_bytes` times 8. Kept for callers of the first version."""
    if sparse not in (None, "bitmask", "nm"):
        raise ValueError(f"sparse must be None, 'bitmask' or 'nm', got {sparse!r}")
    if sparse == "nm" and pattern is None:
        raise ValueError("pattern is needed for sparse='nm'")
    terms = linear_bytes(rows, cols, nnz=kept, pattern=pattern if sparse == "nm" else None,
                         sparse=sparse is not None, bits=bits, group_size=group_size, sym=sym,
                         act_order=act_order, dense_bits=value_bits, layout=layout)
    return 8 * sum(terms.values())


class SizeBreakdown(dict):
    """What :func:`model_bytes` returns.

    ``bytes`` (the whole checkpoint), ``dense_bytes`` (tensors left dense), ``compressed_bytes``
    and ``compressed_params`` (the compressed layers' weights), ``total_params`` (tied ones
    once), ``bits_per_weight`` (``8 * compressed_bytes / compressed_params``: the compressed
    layers, scales, zero points and masks included; ``dense_bits`` when nothing is compressed),
    ``model_bits_per_weight`` (``8 * bytes / total_params``), ``terms`` (bytes by stored tensor
    kind, summed over the compressed layers), ``layout``.
    """


def _bnb_weight_bytes(module: nn.Module) -> tuple[dict[str, float], int] | None:
    """Stored bytes and logical numel of a bitsandbytes layer's weight (None: not bnb)."""
    w = getattr(module, "weight", None)
    kind = type(w).__name__
    if kind == "Params4bit":
        qs = w.quant_state
        if qs is None:
            raise ValueError("a bitsandbytes 4-bit layer is not quantized yet (move it to a "
                             "device first)")
        terms = {"packed_4bit": w.numel() * w.element_size()}
        for name, t in qs.as_dict(packed=True).items():
            key = "quant_state" if name.startswith("quant_state.") else name
            terms[key] = terms.get(key, 0) + t.numel() * t.element_size()
        return terms, math.prod(qs.shape)
    if kind == "Int8Params":
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        rows = w.shape[0]
        return {"int8": w.numel(), "SCB": rows * 4 if scb is None else scb.numel() * 4,
                "weight_format": 1}, w.numel()
    return None


def model_bytes(model: nn.Module, dense_bits: int = 16,
                layout: str = "standard", *, block_keys=None) -> SizeBreakdown:
    """Bytes of a checkpoint of ``model`` with dense tensors at ``dense_bits`` (16: fp16/bf16).

    Layers compressed by :func:`toolkit.compress` carry ``module.compression`` (slices of fused
    mixture-of-experts parameters: a record each in ``experts.expert_compression``, see
    :mod:`toolkit.model.experts`) and are counted with :func:`linear_bytes` (non-zeros counted on the
    weight itself), each slice as a layer of its own; bitsandbytes layers
    count what bitsandbytes stores; every other parameter is dense. See the module docstring.

    ``block_keys``: the settings (:func:`toolkit.checkpoint.formats.block_key`) whose layers are stored
    with the ``block`` strategy; default: those of ``model``'s own compressed layers
    (:func:`toolkit.checkpoint.formats.partial_group_keys`). Pass the keys of the whole model to count a
    part of it (one layer, one block) as it is stored in the whole model's checkpoint.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    seen: set[int] = set()
    dense = comp = 0.0
    comp_params = total_params = 0
    terms: dict[str, float] = {}
    blocks = set(block_keys) if block_keys is not None else partial_group_keys(
        [(m.compression.settings, m.weight.shape[0] if is_conv1d(m) else m.weight.shape[1])
         for m in model.modules() if getattr(m, "compression", None) is not None and
         getattr(m, "weight", None) is not None and m.weight.dim() == 2]
        + [(rec.settings, ref.get_weight().shape[1]) for m in model.modules()
           for pairs in _expert_slices(m).values() for ref, rec in pairs])
    for module in model.modules():
        info = getattr(module, "compression", None)
        slices = _expert_slices(module)  # MoE: compressed slices of fused expert parameters
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            layer = None
            if pname == "weight":
                layer = _bnb_weight_bytes(module)
                if layer is None and info is not None:
                    w = p.detach()
                    layer = compressed_weight_bytes(w.T if is_conv1d(module) else w, info,
                                                     dense_bits, layout,
                                                     block_key(info.settings) in blocks)
            parts = [compressed_weight_bytes(ref.get_weight(), rec, dense_bits, layout,
                                              block_key(rec.settings) in blocks)
                     for ref, rec in slices.get(pname, ())]  # each compressed slice: a layer
            if layer is None:  # dense, but for its compressed expert slices
                total_params += p.numel()
                dense += (p.numel() - sum(n for _, n in parts)) * dense_bits / 8
            else:
                total_params += layer[1]
                parts.append(layer)
            for t, numel in parts:
                comp_params += numel
                comp += sum(t.values())
                for k, v in t.items():
                    terms[k] = terms.get(k, 0) + v
    total = dense + comp
    return SizeBreakdown(
        bytes=total,
        dense_bytes=dense,
        compressed_bytes=comp,
        compressed_params=comp_params,
        total_params=total_params,
        bits_per_weight=(8 * comp / comp_params) if comp_params else float(dense_bits),
        model_bits_per_weight=8 * total / total_params if total_params else float(dense_bits),
        terms=terms,
        layout=layout,
    )


def _expert_slices(module) -> dict:
    """``{parameter name: [(ExpertRef, record)]}`` for the compressed slices of a module's fused
    expert parameters (see :mod:`toolkit.model.experts`)."""
    records = getattr(module, RECORDS, None)
    if not records:
        return {}
    out: dict = {}
    for ref in fused_layers(module):
        if records.get(ref.key) is not None:
            out.setdefault(ref.param, []).append((ref, records[ref.key]))
    return out


def compressed_weight_bytes(w, info, dense_bits, layout, block=False):
    """Stored terms and numel of a compressed weight ``w`` seen as (out, in) (``block``: stored
    with the format's block strategy, see :func:`toolkit.checkpoint.formats.partial_group_keys`)."""
    s = info.settings
    w = w.detach()
    rows, cols = w.shape
    nnz = int(torch.count_nonzero(w)) if s.prunes else None
    g_idx = getattr(info, "g_idx", None)
    out_of_order = s.bits is not None and g_idx is not None and s.group_size is not None and \
        not torch.equal(g_idx.cpu().long(), torch.arange(cols) // s.group_size)
    t = linear_bytes(rows, cols, nnz=nnz, pattern=s.pattern,
                     sparse=s.prunes and nnz is not None and nnz < rows * cols, bits=s.bits,
                     group_size=s.group_size, sym=s.sym, act_order=out_of_order,
                     dense_bits=dense_bits, layout=layout, block=block)
    return t, rows * cols
