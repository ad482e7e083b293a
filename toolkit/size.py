"""Size accounting: the bytes a checkpoint of a (compressed) model needs.

Every stored number counts:

* dense tensors (embeddings, lm_head, norms, biases, layers left alone): ``numel * dense_bits``;
* a compressed linear layer (rows x cols, ``k`` kept weights):
  - values: ``k * bits`` when quantized, else ``k * value_bits`` (16);
  - unstructured sparsity: a bitmask of ``rows * cols`` bits;
  - n:m sparsity: ``ceil(log2(m))`` index bits per kept value (2 bits for 2:4);
  - quantization: per row and group a ``scale_bits`` scale, and for asymmetric grids a zero
    point of ``zero_bits``; with act_order an ``int32`` group index per input column.

Tied parameters (embeddings shared with lm_head) count once.
"""

from __future__ import annotations

import math

from torch import nn

__all__ = ["linear_bits", "model_bytes", "SizeBreakdown"]


def linear_bits(rows: int, cols: int, *, kept: int | None = None, sparse: str | None = None,
                pattern: tuple[int, int] | None = None, bits: int | None = None,
                group_size: int | None = None, sym: bool = False, act_order: bool = False,
                value_bits: int = 16, scale_bits: int = 16, zero_bits: int = 8) -> int:
    """Bits needed to store one linear layer's weight as described in the module docstring.

    ``sparse``: None (dense), ``"bitmask"`` (unstructured) or ``"nm"`` (with ``pattern``).
    """
    numel = rows * cols
    kept = numel if kept is None else kept
    total = kept * (bits if bits is not None else value_bits)
    if sparse == "bitmask":
        total += numel
    elif sparse == "nm":
        if pattern is None:
            raise ValueError("pattern is needed for sparse='nm'")
        total += kept * math.ceil(math.log2(pattern[1]))
    elif sparse is not None:
        raise ValueError(f"sparse must be None, 'bitmask' or 'nm', got {sparse!r}")
    if bits is not None:
        groups = 1 if group_size is None else math.ceil(cols / group_size)
        total += rows * groups * (scale_bits + (0 if sym else zero_bits))
        if act_order and group_size is not None:
            total += cols * 32
    return total


class SizeBreakdown(dict):
    """``bytes``, ``compressed_bytes``, ``dense_bytes``, ``compressed_params``,
    ``bits_per_weight`` (over the compressed layers) and ``total_params``."""


def model_bytes(model: nn.Module, dense_bits: int = 16) -> SizeBreakdown:
    """Bytes of a checkpoint of ``model`` with dense tensors at ``dense_bits`` (16: fp16/bf16).

    Layers compressed by :func:`toolkit.compress` carry ``module.compression`` and are counted
    with :func:`linear_bits`; everything else is dense.
    """
    seen: set[int] = set()
    dense = comp = comp_params = total_params = 0
    for module in model.modules():
        info = getattr(module, "compression", None)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total_params += p.numel()
            if info is not None and pname == "weight":
                s = info.settings
                w = p.detach()
                kept = int((w != 0).sum()) if s.prunes else None
                sparse = None
                if s.pattern is not None:
                    sparse = "nm"
                elif s.sparsity > 0:
                    sparse = "bitmask"
                rows, cols = (w.shape[1], w.shape[0]) if _is_conv1d(module) else w.shape
                comp += linear_bits(rows, cols, kept=kept, sparse=sparse, pattern=s.pattern,
                                    bits=s.bits, group_size=s.group_size, sym=s.sym,
                                    act_order=s.act_order and s.bits is not None)
                comp_params += p.numel()
            else:
                dense += p.numel() * dense_bits
    out = SizeBreakdown(
        bytes=(dense + comp) / 8,
        dense_bytes=dense / 8,
        compressed_bytes=comp / 8,
        compressed_params=comp_params,
        total_params=total_params,
        bits_per_weight=(comp / comp_params) if comp_params else float(dense_bits),
    )
    return out


def _is_conv1d(module) -> bool:
    from .models import Conv1D

    return Conv1D is not None and isinstance(module, Conv1D)
