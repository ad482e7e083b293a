"""Uniform integer grids: fit scale and zero point, quantize to codes, dequantize.

A grid with ``bits`` bits has the integer levels ``0 .. 2**bits - 1``. A weight ``w`` maps to the
code ``q = clamp(round(w / scale) + zero, 0, maxq)`` and back to ``scale * (q - zero)``.

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` is spread over all levels;
* symmetric: the range ``[-max|w|, max|w|]``, with the zero point in the middle.

Both ranges contain 0 and the zero point is an integer, so the code ``zero`` dequantizes to
exactly 0: pruned weights are representable on every grid. Because pruned weights are 0, a
grid fitted to a row whose pruned entries are already zeroed is the grid fitted to the
surviving weights alone (0 always belongs to the range).

Grids are fitted per row of the slice they are given: the solver passes one group of columns at
a time (``group_size``), or all columns for a per-channel grid.
"""

from __future__ import annotations

import torch

from toolkit.solver.checks import check_bits, check_group_size

__all__ = ["fit_grid", "quantize", "dequantize", "fake_quantize", "rtn_quantize", "check_bits",
           "check_group_size", "codes_on_grid"]

def _minmax_params(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int, sym: bool):
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit_grid(
    w: torch.Tensor,
    bits: int,
    sym: bool = False,
    mse: bool = False,
    keep: torch.Tensor | None = None,
    grid_points: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one grid per row of ``w`` (rows x cols). Returns ``(scale, zero)``, each of shape (rows,).

    ``keep`` (bool, same shape) marks the weights that survive pruning; the others are treated
    as 0 (they are fitted as zeros and excluded from the clipping error). With ``mse=True`` the
    range is shrunk by the factors ``1 - i / grid_points`` for ``i < max_shrink * grid_points``
    (1, 0.99, ..., 0.21 by default) and the factor with the smallest
    ``sum |w - deq(q(w))|**norm`` over the kept weights is chosen per row (clipping search).
    """
    maxq = 2**bits - 1
    w = w.float()
    if keep is not None:
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
    zero_t = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zero_t)
    xmax = torch.maximum(w.max(dim=1).values, zero_t)
    scale, zero = _minmax_params(xmin, xmax, maxq, sym)
    if not mse:
        return scale, zero
    weight = None if keep is None else keep.float()
    best = torch.full_like(scale, float("inf"))
    for i in range(int(max_shrink * grid_points)):
        p = 1 - i / grid_points
        s1, z1 = _minmax_params(p * xmin, p * xmax, maxq, sym)
        err = (fake_quantize(w, s1[:, None], z1[:, None], maxq) - w).abs_().pow_(norm)
        if weight is not None:
            err = err * weight
        err = err.sum(dim=1)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int,
             out: torch.Tensor | None = None, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """Integer codes ``clamp(round(w / scale) + zero, 0, maxq)`` (float tensor holding integers);
    written into ``out`` when given (the same values, no temporaries). ``minimum``: the grid
    ``scale * (q - zero) - minimum`` of GGUF's types with a minimum
    (:mod:`toolkit.solver.gguf_grids`): codes ``round((w + minimum) / scale) + zero``."""
    if minimum is not None:
        if out is None:
            return torch.clamp(torch.round((w + minimum) / scale) + zero, 0, maxq)
        return torch.add(w, minimum, out=out).div_(scale).round_().add_(zero).clamp_(0, maxq)
    if out is None:
        return torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return torch.div(w, scale, out=out).round_().add_(zero).clamp_(0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               out: torch.Tensor | None = None, minimum: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``scale * (q - zero)``, less ``minimum`` when given (a product, then a difference:
    the float32 operations of GGUF's reader); written into ``out`` when given."""
    if out is None:
        v = scale * (q - zero)
        return v if minimum is None else v - minimum
    torch.sub(q, zero, out=out).mul_(scale)
    return out if minimum is None else out.sub_(minimum)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``w`` to the nearest grid value (quantize then dequantize)."""
    return dequantize(quantize(w, scale, zero, maxq), scale, zero)


def group_bounds(cols: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column ranges of the groups: ``[(0, g), (g, 2g), ..., (k*g, cols)]``; the last may be narrower."""
    if group_size is None or group_size >= cols:
        return [(0, cols)]
    return [(s, min(s + group_size, cols)) for s in range(0, cols, group_size)]


def rtn_quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    mse: bool = False,
    keep: torch.Tensor | None = None,
):
    """Round-to-nearest baseline on the same grids as the solver.

    Returns ``(new_w, codes, scale, zero)`` with ``codes`` uint8 (rows x cols) and ``scale``/``zero``
    of shape (rows, n_groups). Weights outside ``keep`` are set to exactly 0 (code = zero point).
    """
    bits = check_bits(bits)
    group_size = check_group_size(group_size)
    maxq = 2**bits - 1
    wf = w.float()
    rows, cols = wf.shape
    bounds = group_bounds(cols, group_size)
    scales = torch.empty(rows, len(bounds), dtype=torch.float32, device=w.device)
    zeros = torch.empty_like(scales)
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    out = torch.empty_like(wf)
    for g, (a, b) in enumerate(bounds):
        k = None if keep is None else keep[:, a:b]
        s, z = fit_grid(wf[:, a:b], bits, sym=sym, mse=mse, keep=k)
        q = quantize(wf[:, a:b], s[:, None], z[:, None], maxq)
        if k is not None:
            q = torch.where(k, q, z[:, None].expand_as(q))
        scales[:, g], zeros[:, g] = s, z
        codes[:, a:b] = q.to(torch.uint8)
        out[:, a:b] = dequantize(q, s[:, None], z[:, None])
    return out.to(w.dtype), codes, scales, zeros


def codes_on_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  name: str = "layer") -> torch.Tensor:
    """The integer codes (float tensor of integers) of a weight that lies on its grids.

    ``scale``/``zero`` are per element (the shape of ``w``, e.g. expanded from the per-group
    grids). Raises ``ValueError`` naming the first weight that is off its grid (beyond float
    rounding of ``w``'s dtype): the weight was changed after compression.
    """
    maxq = 2**bits - 1
    wf = w.float()
    q = torch.clamp(torch.round(wf / scale) + zero, 0, maxq)
    err = (scale * (q - zero) - wf).abs()
    tol = 1e-3 * scale + 1e-6 * wf.abs()
    if w.dtype != torch.float32:
        tol = tol + wf.abs() * (torch.finfo(w.dtype).eps * 2)
    if bool((err > tol).any()):
        r, c = divmod(int(torch.argmax(err - tol)), w.shape[1])
        raise ValueError(f"{name}: the weight is not on its quantization grid (row {r}, column "
                         f"{c}: {float(wf[r, c]):.6g} vs "
                         f"{float(scale[r, c] * (q[r, c] - zero[r, c])):.6g}); was it changed "
                         "after compress()?")
    return q
