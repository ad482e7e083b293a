"""Packed inference modules: compressed layers that stay compressed in memory and compute with it.

After :func:`toolkit.compress` a compressed layer is still an ``nn.Linear`` holding dequantized
floats (pruned weights are zeros). :func:`pack` replaces every such layer by a module that keeps
only the compressed form and multiplies with it::

    from toolkit import compress, pack
    compress(model, tok, bits=4)
    print(pack(model))          # per layer: the path it got and its bytes in memory
    model.generate(...)         # same outputs within float tolerance; smaller and faster

Which path a layer gets (the ``path`` column of :func:`pack_report`):

===========  ==================================================================================
``int4``     2..4-bit group-quantized layers: PyTorch's int4 weight-only matmul
             (``aten._weight_int4pack_mm_for_cpu`` on the CPU, ``aten._weight_int4pack_mm`` on
             CUDA) on codes packed two per byte, with one (scale, zero) pair per group. The kernel
             takes groups of 32/64/128/256 columns that divide the (padded) input width, output
             rows in multiples of 16, and computes ``(q - 8) * scale + zero_f`` with a float
             zero; our grids are ``scale * (q - z)`` with an integer ``z``, which is the same
             value with ``zero_f = scale * (8 - z)`` (one rounding). Groups the kernel cannot
             take as they are are run as smaller kernel groups sharing the scale (group 128 on
             576 columns: 9 kernel groups of 64), the last group is padded (codes of weight 0
             and zero inputs), rows are padded to 16: the ``detail`` column says which.
``int8``     5..8-bit layers, and 2..4-bit layers whose group size no int4 kernel group divides
             (16, 48, ...): ``aten._weight_int8pack_mm`` (int8 weights, one scale per row), once
             per group, with ``q - 2**(b-1)`` as the int8 weight and the zero point folded into
             one correction term ``(sum of the group's inputs) * scale * (2**(b-1) - z)``.
``sparse24`` 2:4-pruned (not quantized) layers on CUDA: PyTorch's semi-structured sparse tensor
             (``torch.sparse.to_sparse_semi_structured``, fp16/bf16, CUTLASS or cuSPARSELt).
             CUDA only: on the CPU these layers stay dense (``dense``, reason given).
``bitmask``  pruned + quantized layers with ``joint="bitmask"``: the codes of the kept
             weights only, bit-packed, plus a bitmask of one bit per weight -- the compact
             checkpoint layout (:func:`toolkit.save_compressed`), at most as many bytes --
             decoded to a dense weight at every call. Pruned-only layers too with
             ``pruned="bitmask"`` (kept values + bitmask). The smallest form and a slow one
             (docs/packed-inference.md); by default (``joint="auto"``) pruned + quantized
             layers take the fastest path that holds fewer bytes than the unpacked layer:
             every code on the int4/int8 kernel, pruned weights as the zero-point code.
``decode``   the correct path when no kernel can run (a kernel missing from this torch build or
             device, ``kernels=False``): the codes bit-packed at their own width, decoded to
             a dense weight at every call. The ``detail`` column names the reason.
``dense``    left as it was (e.g. a pruned-only layer on the CPU), with the reason.
===========  ==================================================================================

Compute dtype: the int4 and int8 kernels run in bfloat16 by default (``compute_dtype=None``),
whatever the model's dtype: on the CPU their float32 paths are about 20-30x slower than a dense
float32 matmul (torch 2.13; the kernel table of ``bench/inference.py``,
``data/results/inference_kernels_cpu.csv``) and CUDA's int4 kernel takes bfloat16 only. Inputs are cast to bfloat16 and outputs back, so a float32 model runs its
packed layers at bfloat16 precision (the scales too). ``compute_dtype=torch.float32`` gives the
dequantized model's outputs within float32 rounding, at the slow kernels' speed.

Why PyTorch's own operators and not torchao: on the CPU torchao's int4 layout
(``Int4CPULayout``) calls the same ``_weight_int4pack_mm_for_cpu`` kernel, and its
configurations quantize the weights themselves (their own grids), while ours come from GPTQ and
must be kept code for code; building torchao's tensor subclasses from given codes goes through
internal constructors that change between releases, and each torchao release is built for
particular torch versions. The aten operators take our codes, scales and zero points directly.

The CUDA paths (``int4`` through ``_weight_int4pack_mm``, ``sparse24``) follow PyTorch's
documented operator contracts and are guarded by device checks and a trial call at pack time,
but they have not been run yet: no GPU was available where this was written.

The packed modules are for inference: no gradients. Do not save a packed model with
:func:`toolkit.save_compressed` (:func:`is_packed` tells): save the model before packing, and
:func:`load_packed` loads a checkpoint and packs it. The int4 layouts differ between the CPU and CUDA: pack a model on the
device it will run on.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.model.layers import is_conv1d
from toolkit.solver.quant import codes_on_grid, group_bounds

__all__ = ["pack", "load_packed", "pack_report", "PackReport", "layer_codes", "LayerCodes",
           "pack_bits", "unpack_bits", "resident_bytes", "module_bytes", "is_packed",
           "PackedLinear", "Int4Linear", "Int8Linear", "BitmaskLinear", "DecodeLinear",
           "Sparse24Linear", "PATHS"]

log = logging.getLogger("toolkit")

PATHS = ("int4", "int8", "sparse24", "bitmask", "decode", "dense")
JOINT = ("auto", "codes", "bitmask")
PRUNED = ("dense", "bitmask")
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 kernels take


class PackError(ValueError):
    """A layer cannot take a path; the message is the reason shown in the report."""


# ----------------------------------------------------------------------------------------------
# bit packing
# ----------------------------------------------------------------------------------------------

def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers in ``0 .. 2**bits - 1`` (any shape, flattened in row-major order) into a
    uint8 bit stream, least significant bits first: ``ceil(n * bits / 8)`` bytes.
    ``bits=1`` packs a boolean mask (8 weights per byte, like ``numpy.packbits(...,
    bitorder="little")``)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    v = values.reshape(-1).to(torch.uint8)
    if bits in (1, 2, 4, 8):
        per = 8 // bits
        n = v.numel()
        v = F.pad(v, (0, (-n) % per)).view(-1, per)
        out = torch.zeros(v.shape[0], dtype=torch.uint8, device=v.device)
        for i in range(per):
            out |= v[:, i] << (i * bits)
        return out
    planes = (v[:, None] >> torch.arange(bits, dtype=torch.uint8, device=v.device)) & 1
    return pack_bits(planes.reshape(-1), 1)


@functools.lru_cache(maxsize=8)
def _bit_table(device: str) -> torch.Tensor:
    """(256, 8) bool: the bits of every byte, least significant first."""
    b = torch.arange(256, dtype=torch.int32)
    return ((b[:, None] >> torch.arange(8)) & 1).bool().to(device)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: ``n`` integers (uint8; bool for ``bits=1``)."""
    if bits == 1:
        table = _bit_table(str(packed.device))
        return table.index_select(0, packed.reshape(-1).int()).reshape(-1)[:n]
    if bits in (2, 4, 8):
        if bits == 8:
            return packed.reshape(-1)[:n]
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.reshape(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)[:n]
    planes = unpack_bits(packed, 1, n * bits).view(n, bits).to(torch.uint8)
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (planes * weights).sum(1, dtype=torch.int32).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# the integer codes of a compressed layer
# ----------------------------------------------------------------------------------------------

@dataclass
class LayerCodes:
    """A quantized layer as integers: ``weight[r, c] = scale[r, g] * (codes[r, c] - zero[r, g])``
    with ``g`` the group of column ``c``.

    Columns are in *group order*: when act-order left the groups out of column order, ``perm``
    holds the original column of each position (so the layer computes ``x[:, perm] @ W.T``);
    otherwise ``perm`` is None. ``widths``: columns per group, in order. ``codes`` uint8
    (rows x cols); ``scale`` float32 and ``zero`` (integers, float32) (rows x groups); ``mask``
    (bool, rows x cols, in the same column order) marks the non-zero weights of a pruned layer,
    None for a layer that is not pruned.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    widths: list[int]
    bits: int
    perm: torch.Tensor | None
    mask: torch.Tensor | None

    def placed(self, device=None) -> tuple[int, int, torch.device]:
        """``(rows, cols, device)``: the layer's shape and where its packed module goes
        (``device``, default where the codes are)."""
        rows, cols = self.codes.shape
        return rows, cols, torch.device(device or self.codes.device)


def _weight(module) -> torch.Tensor:
    """The (out, in) weight of a Linear or Conv1D module."""
    w = module.weight.detach()
    return w.T if is_conv1d(module) else w


def layer_codes(module: nn.Module, name: str = "layer") -> LayerCodes:
    """The integer codes of a layer quantized by :func:`toolkit.compress` (it carries
    ``module.compression`` with ``scale``/``zero``), recovered from its dequantized weight.

    Raises ``ValueError`` when the layer is not quantized, has no grids, or its weight is not on
    its grids (changed after ``compress``)."""
    comp = getattr(module, "compression", None)
    if comp is None or comp.settings.bits is None:
        raise ValueError(f"{name}: not a quantized layer (no compression record with bits)")
    if comp.scale is None or comp.zero is None:
        raise ValueError(f"{name}: its compression record has no scale/zero point")
    s = comp.settings
    w = _weight(module)
    rows, cols = w.shape
    n_groups = comp.scale.shape[1]
    if comp.g_idx is not None:
        gidx = comp.g_idx.to(torch.long).cpu()
        if gidx.numel() != cols or int(gidx.min()) < 0 or int(gidx.max()) >= n_groups:
            raise ValueError(f"{name}: g_idx does not map its {cols} columns to {n_groups} groups")
    else:
        bounds = group_bounds(cols, s.group_size if n_groups > 1 else None)
        if len(bounds) != n_groups:
            raise ValueError(f"{name}: {n_groups} scales per row for {len(bounds)} groups of "
                             f"{s.group_size} columns")
        gidx = torch.repeat_interleave(torch.arange(n_groups),
                                       torch.tensor([b - a for a, b in bounds]))
    perm = None
    if bool((gidx[1:] < gidx[:-1]).any()):  # out of order: sort the columns by group
        perm = torch.sort(gidx, stable=True).indices
        gidx = gidx[perm]
    widths = torch.bincount(gidx, minlength=n_groups).tolist()
    if min(widths) == 0:
        raise ValueError(f"{name}: a group without columns")
    dev = w.device
    scale = comp.scale.float().to(dev)
    zero = comp.zero.float().to(dev)
    w_sorted = w if perm is None else w[:, perm.to(dev)]
    q = codes_on_grid(w_sorted, scale[:, gidx.to(dev)], zero[:, gidx.to(dev)], s.bits, name)
    mask = (w_sorted != 0) if s.prunes else None
    return LayerCodes(codes=q.to(torch.uint8), scale=scale, zero=zero, widths=widths,
                      bits=s.bits, perm=perm, mask=mask)


# ----------------------------------------------------------------------------------------------
# the modules
# ----------------------------------------------------------------------------------------------

class PackedLinear(nn.Module):
    """Base class: a linear layer ``y = x @ W.T + b`` whose ``W`` is held in a compressed form.

    ``path`` names the kernel (see :data:`PATHS`), ``detail`` what was adapted or why a
    fallback was taken; ``compression`` is the layer's record from :func:`toolkit.compress`.
    Subclasses implement ``_matmul(x2d)`` on a 2-D input in the module's column order.
    """

    path = "?"
    toolkit_packed = True  # checkpoint.saveload.PACKED_MARK: save_compressed refuses such a model

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 compression=None, perm: torch.Tensor | None = None, detail: str = ""):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        # int32 column indices: the 4 bytes per column a checkpoint's g_idx takes
        self.register_buffer("perm", None if perm is None else perm.to(torch.int32),
                             persistent=False)
        self.compression = compression
        self.detail = detail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        y = self._matmul(x2).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _probe(self, device, dtype) -> None:
        """Run the kernel once: a layer it refuses raises :class:`PackError` at pack time."""
        try:
            self._matmul(torch.zeros(1, self.in_features, device=device, dtype=dtype))
        except RuntimeError as e:
            raise PackError(f"the {self.path} kernel refused the layer: "
                            f"{str(e).splitlines()[0]}") from None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"path={self.path}" + (f" ({self.detail})" if self.detail else ""))


def _int4_ops(device: torch.device):
    """``(convert, matmul)`` of the int4 kernels for ``device``, or a PackError."""
    aten = torch.ops.aten
    if device.type == "cpu":
        if not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
            raise PackError(f"this torch ({torch.__version__}) has no CPU int4 kernel "
                            "(_weight_int4pack_mm_for_cpu, torch >= 2.6)")
        return "cpu"
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            raise PackError(f"the CUDA int4 kernel needs compute capability >= 8.0, "
                            f"{torch.cuda.get_device_name(device)} has "
                            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
        return "cuda"
    raise PackError(f"no int4 kernel on {device.type}")


def _int4_plan(widths: list[int], cols: int, rows: int, esize: int):
    """``(kernel group, padded columns)`` taking the fewest bytes, or None: every group but the
    last must be a multiple of the kernel group; the last is padded up to one."""
    best = None
    for gk in INT4_GROUPS:
        if any(w % gk for w in widths[:-1]):
            continue
        kp = cols + (-widths[-1]) % gk
        nbytes = rows * (kp // 2 + kp // gk * 2 * esize)
        key = (nbytes, kp)  # ties: no padding
        if best is None or key < best[2]:
            best = (gk, kp, key)
    return None if best is None else best[:2]


class Int4Linear(PackedLinear):
    """2..4-bit codes on PyTorch's int4 weight-only matmul (see the module docstring)."""

    path = "int4"

    def __init__(self, lc: LayerCodes, bias, compression=None, compute_dtype=torch.bfloat16,
                 device=None):
        rows, cols, device = lc.placed(device)
        if lc.bits > 4:
            raise PackError(f"{lc.bits}-bit codes do not fit the int4 kernel")
        kind = _int4_ops(device)
        if kind == "cuda" and compute_dtype != torch.bfloat16:
            raise PackError("the CUDA int4 kernel computes in bfloat16 only")
        esize = torch.empty(0, dtype=compute_dtype).element_size()
        plan = _int4_plan(lc.widths, cols, rows, esize)
        if plan is None:
            raise PackError(f"no int4 kernel group (32/64/128/256) divides the groups of "
                            f"{lc.widths[0]} columns")
        gk, kp = plan
        np_ = rows + (-rows) % 16
        notes = []
        if gk != lc.widths[0]:
            notes.append(f"groups of {lc.widths[0]} columns run as kernel groups of {gk}")
        if kp != cols:
            notes.append(f"in_features {cols} padded to {kp}")
        if np_ != rows:
            notes.append(f"out_features {rows} padded to {np_}")
        if lc.perm is not None:
            notes.append("act-order: inputs permuted")
        super().__init__(cols, rows, bias, compression, lc.perm, "; ".join(n for n in notes if n))
        self.group, self.kp, self.np = gk, kp, np_
        self.compute_dtype = compute_dtype
        self.kind = kind
        codes = torch.full((np_, kp), 8, dtype=torch.int32, device=device)
        codes[:rows, :cols] = lc.codes.to(device, torch.int32)
        # one (scale, zero_f) per kernel group: each group of ours spans ceil(width / gk)
        reps = torch.tensor([math.ceil(w / gk) for w in lc.widths], device=device)
        scale = torch.zeros(np_, kp // gk, dtype=torch.float64, device=device)
        zf = torch.zeros_like(scale)
        s64 = lc.scale.to(device, torch.float64)
        scale[:rows] = torch.repeat_interleave(s64, reps, dim=1)
        zf[:rows] = torch.repeat_interleave(s64 * (8 - lc.zero.to(device, torch.float64)), reps,
                                            dim=1)
        self.register_buffer("scale_zero", torch.stack([scale, zf], -1).transpose(0, 1)
                             .contiguous().to(compute_dtype))
        try:
            if kind == "cpu":
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            else:  # CUDA takes two codes per byte, the even column in the high nibble
                u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
                tiles = 8 if kp % 128 == 0 else 4 if kp % 64 == 0 else 2
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, tiles)
        except RuntimeError as e:
            raise PackError(f"the int4 packing refused the layer: {str(e).splitlines()[0]}") \
                from None
        self.register_buffer("packed", packed)
        self._probe(packed.device, compute_dtype)

    def _matmul(self, x2):
        if self.packed.device != x2.device:
            raise RuntimeError(f"{type(self).__name__} was packed on {self.packed.device}, the "
                               f"input is on {x2.device}: the int4 layouts differ by device; "
                               "pack the model on the device it runs on")
        x = x2.to(self.compute_dtype)
        if self.kp != self.in_features:
            x = F.pad(x, (0, self.kp - self.in_features))
        x = x.contiguous()
        sz = self.scale_zero
        if sz.dtype != self.compute_dtype:  # e.g. after model.float()
            sz = sz.to(self.compute_dtype)
        if self.kind == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group, sz)
        return y[:, :self.out_features] if self.np != self.out_features else y


class Int8Linear(PackedLinear):
    """2..8-bit codes on PyTorch's int8 weight-only matmul, one call per group."""

    path = "int8"

    def __init__(self, lc: LayerCodes, bias, compression=None, compute_dtype=torch.bfloat16,
                 device=None, reason: str = ""):
        rows, cols, device = lc.placed(device)
        if not torch._C._dispatch_has_kernel_for_dispatch_key("aten::_weight_int8pack_mm",
                                                             _dispatch_key(device)):
            raise PackError(f"this torch build has no int8 weight-only kernel on {device.type} "
                            "(_weight_int8pack_mm)")
        center = 2 ** (lc.bits - 1)
        notes = [reason] if reason else []
        # the bf16 kernel of torch 2.13 crashes unless a group's width is a multiple of 16
        pads = [(-w) % 16 for w in lc.widths]
        if any(pads):
            notes.append("groups padded to multiples of 16 columns")
        if lc.perm is not None:
            notes.append("act-order: inputs permuted")
        super().__init__(cols, rows, bias, compression, lc.perm, "; ".join(notes))
        self.widths, self.pads = list(lc.widths), pads
        self.compute_dtype = compute_dtype
        blocks, start = [], 0
        for w, p in zip(self.widths, self.pads):
            q = lc.codes[:, start:start + w].to(device, torch.int16) - center
            blocks.append(F.pad(q, (0, p)).to(torch.int8).reshape(-1))
            start += w
        self.register_buffer("weight_int8", torch.cat(blocks))
        self.register_buffer("scale", lc.scale.T.contiguous().to(device, compute_dtype))
        corr = lc.scale.double() * (center - lc.zero.double())  # rows x groups
        self.register_buffer("correction", None if bool((corr == 0).all()) else
                             corr.to(device, compute_dtype))
        self._probe(device, compute_dtype)

    def _matmul(self, x2):
        x = x2.to(self.compute_dtype)
        rows = self.out_features
        y = None
        start = off = 0
        for g, (w, p) in enumerate(zip(self.widths, self.pads)):
            xg = x[:, start:start + w]
            if p:
                xg = F.pad(xg, (0, p))
            wg = self.weight_int8[off:off + rows * (w + p)].view(rows, w + p)
            t = torch._weight_int8pack_mm(xg.contiguous(), wg, self.scale[g])
            y = t if y is None else y + t
            start += w
            off += rows * (w + p)
        if self.correction is not None:
            sums = torch.stack([c.sum(1) for c in x.split(self.widths, dim=1)], 1)
            y = y + sums @ self.correction.T
        return y


def _dispatch_key(device: torch.device) -> str:
    return {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}.get(device.type, device.type.upper())


def _regular(widths: list[int]) -> bool:
    """Groups of one width, the last possibly narrower: the columns reshape to (groups, width)
    once padded."""
    return all(w == widths[0] for w in widths[:-1]) and widths[-1] <= widths[0]


def _expand_zero(zero: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """The zero-point code of every column, (rows, padded columns) uint8: for regular groups
    ``groups * width`` columns (the padding is cut after dequantizing), else ``sum(widths)``."""
    rows, groups = zero.shape
    if _regular(widths):
        return zero[:, :, None].expand(rows, groups, widths[0]).reshape(rows, -1)
    return torch.repeat_interleave(zero, torch.tensor(widths, device=zero.device), dim=1)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                widths: list[int], cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``scale * (codes - zero)`` per group, codes as :func:`_expand_zero` lays them out;
    computed in float32 like the solver's grids (so the weights equal the dequantized model's),
    returned as (rows, cols) ``dtype``."""
    rows, groups = scale.shape
    q = codes.float()
    if _regular(widths):
        w = q.view(rows, groups, widths[0])
        w = w.sub_(zero[:, :, None].float()).mul_(scale[:, :, None].float())
        w = w.view(rows, -1)[:, :cols]
    else:
        reps = torch.tensor(widths, device=codes.device)
        w = torch.repeat_interleave(scale.float(), reps, dim=1) * (
            q - torch.repeat_interleave(zero.float(), reps, dim=1))
    return w if dtype == torch.float32 else w.to(dtype)


class DecodeLinear(PackedLinear):
    """Codes bit-packed at their own width, decoded to a dense weight at every call."""

    path = "decode"

    def __init__(self, lc: LayerCodes, bias, compression=None, dtype=torch.float32,
                 device=None, reason: str = ""):
        rows, cols, device = lc.placed(device)
        notes = [reason] + (["act-order: inputs permuted"] if lc.perm is not None else [])
        super().__init__(cols, rows, bias, compression, lc.perm, "; ".join(n for n in notes if n))
        self.bits, self.widths, self.dtype = lc.bits, list(lc.widths), dtype
        self.register_buffer("codes", pack_bits(lc.codes.to(device), lc.bits))
        self.register_buffer("scale", lc.scale.to(device, _scale_dtype(dtype)))
        self.register_buffer("zero", pack_bits(lc.zero.to(device), lc.bits))

    def weight_matrix(self) -> torch.Tensor:
        """The dense (out, in) weight, in the module's column order."""
        rows, cols = self.out_features, self.in_features
        codes = unpack_bits(self.codes, self.bits, rows * cols).view(rows, cols)
        zero = unpack_bits(self.zero, self.bits, self.scale.numel()).view(self.scale.shape)
        padded = _expand_zero(zero, self.widths).shape[1]
        if padded != cols:
            codes = F.pad(codes, (0, padded - cols))
        return _dequantize(codes, self.scale, zero, self.widths, cols, self.dtype)

    def _matmul(self, x2):
        return F.linear(x2.to(self.dtype), self.weight_matrix())


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales are kept in the layer's float dtype (float32 for float32 layers), as the compact
    checkpoint stores them."""
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


class BitmaskLinear(PackedLinear):
    """A pruned layer as one bit per weight (kept or not) plus the kept weights only: their
    codes bit-packed (quantized layers) or their values (pruned-only layers). Decoded to a dense
    weight at every call. At most the bytes of the compact checkpoint layout."""

    path = "bitmask"

    def __init__(self, mask: torch.Tensor, bias, *, lc: LayerCodes | None = None,
                 values: torch.Tensor | None = None, compression=None, dtype=torch.float32,
                 perm=None, device=None):
        rows, cols = mask.shape
        device = torch.device(device or mask.device)
        notes = ["act-order: inputs permuted"] if perm is not None else []
        super().__init__(cols, rows, bias, compression, perm, "; ".join(notes))
        self.dtype = dtype
        self.row_bytes = math.ceil(cols / 8)
        padded = F.pad(mask.to(device), (0, self.row_bytes * 8 - cols))
        self.register_buffer("bitmask", pack_bits(padded, 1).view(rows, self.row_bytes))
        self.nnz = int(mask.sum())
        if lc is not None:
            self.bits, self.widths = lc.bits, list(lc.widths)
            self.register_buffer("kept", pack_bits(lc.codes.to(device)[mask.to(device)],
                                                   lc.bits))
            self.register_buffer("scale", lc.scale.to(device, _scale_dtype(dtype)))
            self.register_buffer("zero", pack_bits(lc.zero.to(device), lc.bits))
        else:
            self.bits = None
            self.register_buffer("kept", values.to(device, dtype).contiguous())

    def weight_matrix(self) -> torch.Tensor:
        """The dense (out, in) weight, in the module's column order."""
        rows, cols = self.out_features, self.in_features
        mask = unpack_bits(self.bitmask, 1, rows * self.row_bytes * 8)
        mask = mask.view(rows, self.row_bytes * 8)[:, :cols]  # the padding bits are 0
        if self.bits is None:
            w = torch.zeros(rows, cols, dtype=self.kept.dtype, device=self.kept.device)
            return w.masked_scatter_(mask, self.kept).to(self.dtype)
        zero = unpack_bits(self.zero, self.bits, self.scale.numel()).view(self.scale.shape)
        codes = _expand_zero(zero, self.widths).contiguous()  # pruned: the zero-point code
        padded = codes.shape[1]
        mask = F.pad(mask, (0, padded - cols)) if padded > cols else mask
        codes.masked_scatter_(mask, unpack_bits(self.kept, self.bits, self.nnz))
        return _dequantize(codes, self.scale, zero, self.widths, cols, self.dtype)

    def _matmul(self, x2):
        return F.linear(x2.to(self.dtype), self.weight_matrix())


class Sparse24Linear(PackedLinear):
    """A 2:4-pruned layer as PyTorch's semi-structured sparse tensor (CUDA, fp16/bf16)."""

    path = "sparse24"

    def __init__(self, weight: torch.Tensor, bias, compression=None, compute_dtype=None):
        rows, cols = weight.shape
        if weight.device.type != "cuda":
            raise PackError(f"2:4 semi-structured sparse kernels need CUDA; the layer is on "
                            f"{weight.device.type}")
        major, _ = torch.cuda.get_device_capability(weight.device)
        if major < 8:
            raise PackError("2:4 semi-structured sparse kernels need compute capability >= 8.0")
        dtype = compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else (
            weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16)
        groups = (weight != 0).reshape(rows, -1, 4).sum(-1) if cols % 4 == 0 else None
        if groups is None or bool((groups > 2).any()):
            raise PackError("the weight is not 2:4 sparse along its rows")
        try:
            from torch.sparse import to_sparse_semi_structured

            sparse = to_sparse_semi_structured(weight.to(dtype).contiguous())
        except (RuntimeError, ImportError) as e:
            raise PackError(f"torch.sparse.to_sparse_semi_structured refused the layer: "
                            f"{str(e).splitlines()[0]}") from None
        super().__init__(cols, rows, bias, compression, None, f"{str(dtype)[6:]}, "
                         f"{type(sparse).__name__.replace('SparseSemiStructuredTensor', '')}")
        self.compute_dtype = dtype
        self.weight_sparse = sparse

    def _apply(self, fn, recurse=True):
        self.weight_sparse = fn(self.weight_sparse)
        return super()._apply(fn, recurse)

    def _matmul(self, x2):
        return F.linear(x2.to(self.compute_dtype).contiguous(), self.weight_sparse)


# ----------------------------------------------------------------------------------------------
# pack, its report, loading packed
# ----------------------------------------------------------------------------------------------

def _tensor_bytes(t) -> int:
    if t is None:
        return 0
    inner = [getattr(t, a, None) for a in ("packed", "meta", "packed_t", "meta_t",
                                           "compressed_swizzled_bitmask")]
    if type(t).__name__.startswith("SparseSemiStructured"):
        return sum(x.numel() * x.element_size() for x in inner if isinstance(x, torch.Tensor))
    return t.numel() * t.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of the tensors one module holds itself (parameters, buffers, a semi-structured
    weight; bitsandbytes' quantization state), without its children."""
    total = sum(_tensor_bytes(t) for t in module.parameters(recurse=False))
    total += sum(_tensor_bytes(t) for t in module.buffers(recurse=False))
    total += _tensor_bytes(getattr(module, "weight_sparse", None))
    total += sum(_tensor_bytes(t) for t in _bnb_state(module))
    return total


def _bnb_state(module) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit weight's quantization state (absmax, code, ...; the
    nested state of double quantization). bitsandbytes' CPU path repacks them at the first
    forward call (absmax to bfloat16, double quantization undone), so they depend on when
    they are counted."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    out = []
    for state in (qs, getattr(qs, "state2", None)):
        for attr in ("absmax", "code", "offset"):
            t = getattr(state, attr, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds (parameters and buffers, each storage once; packed
    and semi-structured weights; bitsandbytes' quantization state): the weights in memory as
    the model runs, without activations or the KV cache."""
    seen: set = set()
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False),
                   *_bnb_state(module)]
        for t in tensors:
            key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
            if key in seen:
                continue
            seen.add(key)
            total += t.untyped_storage().nbytes() if t.numel() else 0
        total += _tensor_bytes(getattr(module, "weight_sparse", None))
    return total


def is_packed(model: nn.Module) -> bool:
    """True when ``model`` holds packed layers (:func:`pack` was applied)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


@dataclass
class PackReport:
    """What :func:`pack` did: ``layers`` (one row per compressed layer: ``layer``, ``shape``
    (out, in), ``bits``, ``sparsity``, ``path``, ``why`` (why that path: the fastest that
    holds fewer bytes than the unpacked layer, an argument, a kernel that cannot run here),
    ``detail`` (what was adapted: kernel groups, padding, permuted inputs), ``bytes`` in
    memory, ``fp16_bytes`` of the same weight dense in 16 bits) and ``summary`` (totals, layers
    per path, and for pruned + quantized layers the bytes ``joint="bitmask"`` would keep)."""

    layers: pd.DataFrame
    summary: dict

    def __str__(self) -> str:
        """The per-layer table (without ``why``), then each reason once with its layers'
        paths and count, then the summary."""
        cols = [c for c in self.layers.columns if c != "why"]
        with pd.option_context("display.max_rows", 500, "display.width", 200,
                               "display.max_colwidth", 80):
            table = self.layers[cols].to_string(index=False) if len(self.layers) else \
                "(no layers)"
        lines = [table, ""]
        if len(self.layers):
            lines.append("why:")
            for (path, why), g in self.layers.groupby(["path", "why"], sort=False):
                lines.append(f"  {path} x{len(g)}: {why}")
            lines.append("")
        for k, v in self.summary.items():
            lines.append(f"{k:>34}: {v:,.4g}" if isinstance(v, float) else f"{k:>34}: {v}")
        return "\n".join(lines)

    def _repr_html_(self):
        return self.layers._repr_html_()


def pack_report(model: nn.Module) -> PackReport:
    """The :class:`PackReport` of a model, read from its modules: the packed layers and the
    compressed layers :func:`pack` left dense (with the reason)."""
    rows = []
    for name, m in model.named_modules():
        comp = getattr(m, "compression", None)
        if isinstance(m, PackedLinear):
            path, detail, nbytes = m.path, m.detail, module_bytes(m)
            why = getattr(m, "why", "")
            shape = (m.out_features, m.in_features)
        elif comp is not None and getattr(m, "weight", None) is not None:
            path, detail = "dense", ""
            why = getattr(m, "pack_reason", "not packed yet")
            shape = tuple(_weight(m).shape)
            nbytes = module_bytes(m)
        else:
            continue
        s = comp.settings if comp is not None else None
        rows.append(dict(layer=name, shape=shape,
                         bits=(s.bits or 16) if s is not None else None,
                         sparsity=float(comp.sparsity) if comp is not None else None,
                         path=path, why=why, detail=detail, bytes=nbytes,
                         fp16_bytes=shape[0] * shape[1] * 2))
    layers = pd.DataFrame(rows, columns=["layer", "shape", "bits", "sparsity", "path", "why",
                                         "detail", "bytes", "fp16_bytes"])
    packed_b = int(layers["bytes"].sum()) if len(layers) else 0
    fp16_b = int(layers["fp16_bytes"].sum()) if len(layers) else 0
    summary = {f"layers on {p}": int((layers["path"] == p).sum()) for p in PATHS
               if len(layers) and (layers["path"] == p).any()}
    summary.update({"bytes of these layers": packed_b, "same layers dense fp16": fp16_b,
                    "ratio to fp16": packed_b / fp16_b if fp16_b else float("nan"),
                    "model resident bytes": resident_bytes(model)})
    smallest = [getattr(m, "smallest_bytes", None) for m in model.modules()
                if isinstance(m, PackedLinear)]
    if any(b is not None for b in smallest):
        summary["joint layers as joint='bitmask'"] = sum(b for b in smallest if b is not None)
    return PackReport(layers=layers, summary=summary)


def _check_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32,
                 "float32": torch.float32}.get(dtype, dtype)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be None, torch.bfloat16, torch.float16 or "
                         f"torch.float32, got {dtype!r}")
    return dtype


def _dense_bytes(module: nn.Module) -> int:
    """Bytes of the layer's weight as it is before packing (its own dtype)."""
    w = module.weight
    return w.numel() * w.element_size()


def _codes_module(name: str, module, comp, lc: LayerCodes, *, compute_dtype, kernels: bool,
                  dtype) -> PackedLinear:
    """Every code of the layer on the fastest path that runs here: the int4 kernel (2..4 bits),
    else the int8 kernel, else ``decode``; ``why`` says which and why."""
    bias = getattr(module, "bias", None)
    kdtype = compute_dtype or torch.bfloat16
    reasons = []
    if kernels:
        if lc.bits <= 4:
            try:
                new = Int4Linear(lc, bias, comp, kdtype)
                new.why = "int4 kernel: the fastest path"
                return new
            except PackError as e:
                reasons.append(str(e))
        else:
            reasons.append(f"{lc.bits}-bit codes do not fit the int4 kernel")
        try:
            new = Int8Linear(lc, bias, comp, kdtype, reason="; ".join(
                r for r in reasons if "do not fit" not in r))
            new.why = "int8 kernel: " + "; ".join(reasons)
            return new
        except PackError as e:
            reasons.append(str(e))
    else:
        reasons.append("kernels=False")
    new = DecodeLinear(lc, bias, comp, dtype=compute_dtype or dtype, reason="; ".join(reasons))
    new.why = "no kernel runs here: " + "; ".join(reasons)
    return new


def _choose(name: str, module: nn.Module, comp, *, compute_dtype, joint: str, pruned: str,
            kernels: bool):
    """The packed module for one compressed layer, or ``(None, reason)`` to leave it dense.
    Every packed module gets a ``why``: the path it took and why (the report's ``why``)."""
    s = comp.settings
    w = _weight(module)
    dtype = w.dtype if w.dtype in COMPUTE_DTYPES else torch.float32
    bias = getattr(module, "bias", None)
    if s.bits is None:  # pruned only
        if s.pattern is not None and tuple(s.pattern) == (2, 4) and w.device.type == "cuda" \
                and kernels:
            try:
                new = Sparse24Linear(w, bias, comp, compute_dtype)
                new.why = "2:4 semi-structured sparse kernel"
                return new, None
            except PackError as e:
                reason = str(e)
        elif s.pattern is not None and tuple(s.pattern) == (2, 4):
            reason = (f"2:4 semi-structured sparse kernels need CUDA; the layer is on "
                      f"{w.device.type}" if kernels else "kernels=False")
        else:
            reason = "unstructured sparsity has no sparse kernel that beats dense here"
        if pruned == "bitmask":
            mask = w != 0
            new = BitmaskLinear(mask, bias, values=w[mask], compression=comp,
                                dtype=compute_dtype or dtype)
            new.why = f"pruned='bitmask' asked: kept values + bitmask ({reason})"
            return new, None
        return None, reason + " (pruned='bitmask' stores kept values + bitmask)"
    lc = layer_codes(module, name)
    if lc.mask is not None and joint == "bitmask":
        new = BitmaskLinear(lc.mask, bias, lc=lc, compression=comp, dtype=compute_dtype or dtype,
                            perm=lc.perm)
        new.why = ("joint='bitmask' asked: the smallest form (kept codes + bitmask), decoded "
                   "to a dense weight at every call")
        return new, None
    new = _codes_module(name, module, comp, lc, compute_dtype=compute_dtype, kernels=kernels,
                        dtype=dtype)
    if lc.mask is None or joint == "codes":
        if joint == "codes" and lc.mask is not None:
            new.why = "joint='codes' asked: " + new.why
        return new, None
    # joint="auto": the fastest path if it holds fewer bytes than the unpacked layer, else the
    # smallest; say what the other form would take
    dense = _dense_bytes(module)
    fast_b, small_b = module_bytes(new), _bitmask_bytes(lc, compute_dtype or dtype, new)
    if fast_b < dense:
        new.why += (" for every code (pruned weights as the zero-point code), fewer bytes than "
                    "the unpacked layer; joint='bitmask' keeps fewer still (kept codes + "
                    "bitmask) but decodes at every call")
        new.smallest_bytes = small_b
        return new, None
    small = BitmaskLinear(lc.mask, bias, lc=lc, compression=comp, dtype=compute_dtype or dtype,
                          perm=lc.perm)
    small.why = (f"the fastest path ({new.path}) would hold no fewer bytes than the unpacked "
                 "layer: kept codes + bitmask, decoded at every call")
    return small, None


def _bitmask_bytes(lc: LayerCodes, dtype, like: PackedLinear) -> int:
    """Bytes a :class:`BitmaskLinear` of ``lc`` would hold (without building it): the bitmask,
    the kept codes and the zero points bit-packed, the scales in ``dtype``; the bias and the
    permutation as ``like`` holds them."""
    rows, cols = lc.codes.shape
    kept = int(lc.mask.sum())
    esize = torch.empty(0, dtype=_scale_dtype(dtype)).element_size()
    extra = sum(_tensor_bytes(t) for t in (like.bias, like.perm))
    return (rows * math.ceil(cols / 8) + math.ceil(kept * lc.bits / 8)
            + math.ceil(lc.zero.numel() * lc.bits / 8) + lc.scale.numel() * esize + extra)


def _release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc ``malloc_trim``), so that
    the process's resident memory shows the weights the dense layers no longer hold."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        name = ctypes.util.find_library("c")
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back explicitly
        pass


@torch.no_grad()
def pack(model: nn.Module, *, compute_dtype=None, joint: str = "auto", pruned: str = "dense",
         kernels: bool = True, verbose: bool = False) -> PackReport:
    """Replace every layer compressed by :func:`toolkit.compress` (or loaded by
    :func:`toolkit.load_compressed`) with a module that keeps its compressed form in memory and
    computes with it, in place; returns a :class:`PackReport` (per layer: the path it took, why,
    and its bytes in memory).

    Each layer takes the fastest path that holds fewer bytes than the unpacked layer: the int4
    kernel (2..4 bits), else the int8 kernel, else ``decode``. ``joint``: what pruned +
    quantized layers become: ``"auto"`` (default: that fastest path, every code stored, pruned
    weights as the zero-point code -- the size of the quantized layer), ``"bitmask"`` (kept
    codes + bitmask, decoded to a dense weight at every call: the smallest form, no more bytes
    than the compact checkpoint layout, and slow) or ``"codes"`` (the fastest path whatever its
    size). ``compute_dtype``: dtype of the int4/int8 kernels (None: bfloat16, their fast path;
    pass ``torch.float32`` for float32 results at the kernels' slow speed) and of the decoded
    weights of the ``bitmask``/``decode`` paths (None: the layer's dtype). ``pruned``:
    pruned-only layers that have no sparse kernel here (unstructured; 2:4 off CUDA) stay
    ``"dense"`` or become ``"bitmask"`` (kept values + bitmask). ``kernels=False`` uses the
    ``decode`` path for every quantized layer (a reference). See the module docstring for the
    paths. The replaced dense weights are freed as packing goes, and the freed heap is handed
    back to the system at the end (glibc), so the process's resident memory drops too.
    """
    compute_dtype = _check_dtype(compute_dtype)
    if joint not in JOINT:
        raise ValueError(f"joint must be one of {', '.join(map(repr, JOINT))}, got {joint!r}")
    if pruned not in PRUNED:
        raise ValueError(f"pruned must be one of {', '.join(map(repr, PRUNED))}, got {pruned!r}")
    if not isinstance(kernels, bool):
        raise ValueError(f"kernels must be True or False, got {kernels!r}")
    names = [n for n, m in model.named_modules()
             if getattr(m, "compression", None) is not None and not isinstance(m, PackedLinear)
             and getattr(m, "weight", None) is not None and m.compression.settings.active]
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="pack", unit="layer", disable=not verbose):
        module = model.get_submodule(name)
        new, reason = _choose(name, module, module.compression, compute_dtype=compute_dtype,
                              joint=joint, pruned=pruned, kernels=kernels)
        if new is None:
            module.pack_reason = reason
            continue
        new.train(False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        del module, new  # the dense weight goes now, not after the last layer
    _release_memory()
    return pack_report(model)


def load_packed(path, *, compute_dtype=None, joint: str = "auto", pruned: str = "dense",
                kernels: bool = True, **load_kwargs) -> nn.Module:
    """:func:`toolkit.load_compressed` followed by :func:`pack`: a checkpoint loaded straight
    into packed modules (the report: :func:`pack_report`). ``load_kwargs`` go to
    ``load_compressed`` (``device``, ``dtype``, ``verify``, ...); the pack options as in
    :func:`pack`."""
    from toolkit.checkpoint.saveload import load_compressed

    model = load_compressed(path, **load_kwargs)
    pack(model, compute_dtype=compute_dtype, joint=joint, pruned=pruned, kernels=kernels)
    return model
