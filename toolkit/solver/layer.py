"""The shared layer solver: SparseGPT pruning, GPTQ quantization, or both, in one column sweep.

Given a weight ``W`` (rows x cols) and the Hessian ``H`` of its inputs, the solver walks the
columns left to right. Each column is replaced by its target (0 where pruned, the nearest grid
value where quantized, itself otherwise); the error this makes is spread over the columns to
its right with the row of ``U``, the upper Cholesky factor of ``H^-1``, that belongs to it. That
is the Optimal Brain Surgeon update for a fixed column order, and the same ``U`` serves every
row: no re-inversion per column or per row.

Columns are processed in blocks of ``block_size``: inside a block the update is applied column
by column; at the end of the block one matrix product carries the block's errors to all columns
on its right (the lazy batch update, where most of the arithmetic happens).

Pruning alone, quantization alone and both are the same loop with a different target, so the
joint mode costs one sweep, not two.

    >>> result = solve(W, H, sparsity=0.5, bits=4, group_size=128)
    >>> result.weight, result.mask, result.codes, result.scale, result.zero, result.error
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from toolkit.solver.gguf_grids import BlockFitter, GGUFGrid, gguf_type
from toolkit.solver.hessian import (
    SolverError,
    all_finite,
    inverse_cholesky_factor,
    stacked_row_errors,
)
from toolkit.solver.masks import check_pattern, check_sparsity, nm_mask, prune_lowest
from toolkit.solver.quant import (
    check_bits,
    check_group_size,
    dequantize,
    fit_grid,
    group_bounds,
    quantize,
)

__all__ = ["solve", "solve_layers", "solve_grids", "solve_grids_many", "GridProblem", "factorize", "Factor", "SolveResult", "SolverError",
           "check_solver_args"]


@dataclass
class SolveResult:
    """What the solver returns for one layer.

    ``weight``: the new weight, in the input's dtype. ``mask``: bool keep-mask (True = kept),
    or None without pruning. ``codes``/``scale``/``zero``: with ``bits``, the integer codes
    (uint8, rows x cols; pruned weights hold the zero point) and the per-row, per-group grid
    parameters (float32, rows x n_groups) such that ``weight = scale[g] * (codes - zero[g])``
    for the group ``g`` of each column. ``g_idx``: group of each column (only differs from
    ``col // group_size`` with ``act_order``). ``loss``: the solver's own running estimate
    ``sum err^2 / 2``. ``error``: ``tr(dW H dW^T)`` with the undamped ``H``, which equals
    ``2/n ||(W - W_new) X||^2``.

    With ``gguf=`` (a GGUF block type): the groups are the type's sub-blocks, ``scale``/``zero``
    their float32 scales and code offsets, ``minimum`` (rows x sub-blocks, or None for the types
    without one) what each sub-block subtracts, so that ``weight = scale * (codes - zero) -
    minimum`` exactly as GGUF's reader computes it; ``gguf`` holds the factors the file stores
    (:class:`toolkit.solver.gguf_grids.GGUFGrid`).
    """

    weight: torch.Tensor
    mask: torch.Tensor | None
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    loss: float
    error: float
    seconds: float
    minimum: torch.Tensor | None = None
    gguf: GGUFGrid | None = None


@dataclass
class Factor:
    """A factorised Hessian, reusable by every layer that reads the same input."""

    H: torch.Tensor  # undamped, original column order (float32 or float64)
    U: torch.Tensor  # upper Cholesky factor of the damped inverse, permuted order (H's dtype)
    perm: torch.Tensor | None  # column order used (act_order), or None for the natural order


def factorize(H: torch.Tensor, percdamp: float = 0.01, act_order: bool = False,
              name: str = "layer") -> Factor:
    """Dampen and factorise ``H`` once; with ``act_order`` columns go by descending ``diag H``
    (ties keep their natural order)."""
    if not isinstance(percdamp, (int, float)) or isinstance(percdamp, bool) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a number >= 0, got {percdamp!r}")
    perm = None
    Hp = H
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        Hp = H.index_select(0, perm).index_select(1, perm)
    U = inverse_cholesky_factor(Hp, percdamp=percdamp, name=name)
    return Factor(H=H, U=U, perm=perm)


def check_solver_args(sparsity=0.0, pattern=None, bits=None, group_size=None, act_order=False,
                      block_size=128):
    """Validate the solver options; returns ``(sparsity, pattern, bits, group_size)`` normalised."""
    sparsity = check_sparsity(sparsity)
    pattern = check_pattern(pattern)
    bits = check_bits(bits)
    group_size = check_group_size(group_size)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if pattern is not None:
        if sparsity:
            raise ValueError(
                f"give either sparsity (unstructured) or pattern (n:m), not both: "
                f"sparsity={sparsity}, pattern={pattern[0]}:{pattern[1]}"
            )
        if act_order:
            raise ValueError(
                "act_order cannot be combined with an n:m pattern: the pattern is defined on "
                "consecutive columns in their natural order, act_order permutes them"
            )
        if block_size % pattern[1]:
            raise ValueError(
                f"block_size ({block_size}) must be a multiple of m={pattern[1]} for pattern "
                f"{pattern[0]}:{pattern[1]}"
            )
    return sparsity, pattern, bits, group_size


def solve(weight: torch.Tensor, H: torch.Tensor | Factor, *, sparsity: float = 0.0,
          pattern=None, bits: int | None = None, group_size: int | None = None,
          sym: bool = False, mse: bool = False, act_order: bool = False,
          static_groups: bool = False, block_size: int = 128, percdamp: float = 0.01,
          name: str = "layer", gguf: str | None = None) -> SolveResult:
    """Prune and/or quantize one layer's weight (rows x cols) against its input Hessian.

    Args:
        weight: the layer weight, rows = outputs, cols = inputs (for GPT-2's ``Conv1D``, pass
            ``weight.T``). Any float dtype; the maths runs in float32 on the weight's device,
            in float64 when the weight is float64 (then float order cannot move a rounding or
            mask choice in practice: the reproducible mode of the quality tests).
        H: the ``cols x cols`` Hessian ``2/n sum x x^T`` or a :class:`Factor` of it.
        sparsity: unstructured fraction in [0, 1). The mask of each column block is chosen when
            the sweep reaches the block, from the saliency ``w^2 / U_ii^2`` of the current
            (already updated) weights. The number pruned by the end of each block is
            ``round(sparsity * rows * cols_so_far)``, so the layer ends with exactly
            ``round(sparsity * rows * cols)`` pruned weights (no block rounding accumulates).
        pattern: n:m semi-structured, ``(2, 4)`` or ``"2:4"``: in every group of m consecutive
            input columns of every row, n are pruned (chosen when the sweep reaches the group).
        bits: 2..8 to quantize (16 or None: no quantization).
        group_size: columns per grid (None or -1: one grid per row). A last group narrower than
            ``group_size`` gets its own grid. Each group's grid is fitted when the sweep reaches
            its first column, to the current weights of the group that survive pruning (for
            columns whose mask is not chosen yet, all weights count).
        sym: symmetric grid (zero point in the middle) instead of asymmetric min/max.
        mse: search the grid's clipping range for the smallest rounding error.
        act_order: visit columns by descending ``diag H`` (groups follow that order; see
            ``SolveResult.g_idx``). Not allowed with ``pattern``.
        static_groups: the groups are the natural column ranges and every group's grid is
            fitted before the sweep, to the weights as given (GPTQ's static groups). With
            ``act_order`` the columns are still visited by descending ``diag H``, but each uses
            the grid of its natural group, so ``g_idx`` stays ``col // group_size``: the layout
            checkpoint formats store (compressed-tensors' ``actorder="weight"``).
        block_size: columns per lazy-update block (128).
        percdamp: dampening ``percdamp * mean(diag H)`` added to the diagonal (ignored when a
            ``Factor`` is passed).
        name: the layer's name, used in error messages.
        gguf: a GGUF block type (``"Q4_0"``, ``"Q4_K"``, ... :data:`toolkit.solver.gguf_grids.TYPES`)
            instead of ``bits``: every weight is put on exactly the values that type stores,
            each block's factors fitted when the sweep reaches it
            (:class:`toolkit.solver.gguf_grids.BlockFitter`); ``group_size``, ``sym`` and ``mse``
            are not used, ``act_order`` and ``static_groups`` are refused (GGUF blocks are
            natural column ranges, fitted in order). Pruned weights take the code nearest 0.
    """
    return solve_layers([weight], H, sparsity=sparsity, pattern=pattern, bits=bits,
                        group_size=group_size, sym=sym, mse=mse, act_order=act_order,
                        static_groups=static_groups, block_size=block_size, percdamp=percdamp,
                        names=[name], gguf=gguf)[0]


SUB_BLOCK = 32


def _sub_block(block_size: int, pattern, dynamic_group_size: int | None) -> tuple[int, bool]:
    """``(columns per sub-block, whether quantization groups start new sub-blocks)``.

    Inside a block the solver updates, after each column, only the columns up to the end of its
    sub-block; a finished sub-block updates the rest of the block with one matrix product. The
    arithmetic is the same (up to float rounding) and far less memory is swept per column. Every
    place that reads columns ahead of the current one must see them up to date: an n:m group
    (inside one sub-block when sub-blocks are multiples of m) and the first column of a
    quantization group, whose grid is fitted to the rest of the group (made a sub-block edge).
    With n:m and groups that are not a multiple of m, the whole block is one sub-block.
    """
    size = SUB_BLOCK
    if pattern is not None:
        m = pattern[1]
        if dynamic_group_size is not None and dynamic_group_size % m:
            return block_size, False
        size = max(m, size // m * m)
    return min(size, block_size), True



def _compensate(W1: torch.Tensor, U1: torch.Tensor, e: torch.Tensor, d: torch.Tensor, i: int,
                b: int) -> None:
    """Column ``i`` is fixed with error ``e = w - target``: scale it by ``1 / U_ii`` (``d``) in
    place and carry it to the columns ``i+1 .. b-1`` of its sub-block (row ``i`` of ``U``)."""
    e.div_(d)
    if i + 1 < b:
        W1[i + 1:b].addr_(U1[i, i + 1:b], e, alpha=-1)


def _carry(W1: torch.Tensor, U1: torch.Tensor, Err1: torch.Tensor, a: int, b: int) -> None:
    """After the sub-block ``a .. b-1``: its errors carried to the rest of the block in one
    matrix product (the lazy batch update, one level down)."""
    if b < W1.shape[0]:
        W1[b:].addmm_(U1[a:b, b:].t(), Err1[a:b], alpha=-1)


def _fit_static(W: torch.Tensor, bounds: list[tuple[int, int]], bits: int, sym: bool, mse: bool,
                keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Static groups: every group's grid fitted on the natural column ranges ``bounds`` of ``W``
    (rows x cols), as ``(scales, zeros)`` of shape (rows, groups). Groups of one width are fitted
    in one call (each row of each group on its own: the values of one call per group)."""
    rows, n = W.shape[0], len(bounds)
    width = bounds[0][1] - bounds[0][0]
    if n > 1 and all(b - a == width for a, b in bounds) and bounds[-1][1] == n * width:
        flat = W[:, :n * width].reshape(rows * n, width)
        k = None if keep is None else keep[:, :n * width].reshape(rows * n, width)
        sc, ze = fit_grid(flat, bits, sym=sym, mse=mse, keep=k)
        return sc.view(rows, n), ze.view(rows, n)
    scales = torch.empty(rows, n, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    for g, (a, b) in enumerate(bounds):
        scales[:, g], zeros[:, g] = fit_grid(W[:, a:b], bits, sym=sym, mse=mse,
                                             keep=None if keep is None else keep[:, a:b])
    return scales, zeros


def _stack_and_factor(weights, H, names, act_order, percdamp):
    """The checks and set-up :func:`solve_layers` and :func:`solve_grids` share: ``weights``
    (2-D, float, finite, the same columns) stacked as float32 rows (float64 when every weight
    is float64: the solver's compute dtype) with the inputs that never
    fired (``diag H == 0``) zeroed, and the factorisation (``H`` factorised here unless it is a
    :class:`Factor` built with this ``act_order``). Returns ``(W, factor, U, perm)`` with ``U``
    row-major and everything on the weights' device."""
    if not weights:
        raise ValueError("weights must be a non-empty list of 2-D tensors")
    cols = weights[0].shape[-1]
    for w, nm in zip(weights, names):
        if w.ndim != 2 or not w.is_floating_point():
            raise ValueError(f"{nm}: weight must be a 2-D float tensor, got {tuple(w.shape)} {w.dtype}")
        if w.shape[1] != cols:
            raise ValueError(f"{nm}: weights stacked together must have the same number of "
                             f"columns: {cols} columns in the first, {w.shape[1]} here")
    Hm = H.H if isinstance(H, Factor) else H
    if Hm.shape != (cols, cols):
        raise ValueError(
            f"{names[0]}: H has shape {tuple(Hm.shape)}, expected ({cols}, {cols}) for a weight "
            f"with {cols} columns"
        )
    device = weights[0].device
    if isinstance(H, Factor):
        if (H.perm is not None) != bool(act_order):
            raise ValueError("the Factor was built with a different act_order setting")
        factor = H
    else:
        factor = factorize(H.to(device), percdamp=percdamp, act_order=act_order, name=names[0])
    # row-major: the sweep reads rows U[i, i+1:]; LAPACK returns the factor column-major, and
    # strided row reads made the in-block updates about 10x slower
    compute = torch.float64 if all(w.dtype == torch.float64 for w in weights) else torch.float32
    U = factor.U.to(device=device, dtype=compute).contiguous()
    perm = None if factor.perm is None else factor.perm.to(device)
    W = torch.cat([w.to(compute) for w in weights], 0)
    if not all_finite(W):  # one check of the stack; then find the weight to name
        for w, nm in zip(weights, names):
            if not all_finite(w):
                raise ValueError(f"{nm}: weight contains NaN or inf")
    dead = torch.diagonal(factor.H).to(device) == 0
    if bool(dead.any()):
        W[:, dead] = 0
    return W, factor, U, perm


def _check_error_hessian(error_H, H: torch.Tensor) -> None:
    """``error_H`` is None or a tensor of the shape of the solve's Hessian ``H``."""
    if error_H is not None and (not isinstance(error_H, torch.Tensor)
                                or error_H.shape != H.shape):
        got = tuple(error_H.shape) if isinstance(error_H, torch.Tensor) else repr(error_H)
        raise ValueError(f"error_H must be None or a tensor of the Hessian's shape "
                         f"{tuple(H.shape)}, got {got}")


@torch.no_grad()
def solve_layers(weights: list[torch.Tensor], H: torch.Tensor | Factor, *, sparsity: float = 0.0,
                 pattern=None, bits: int | None = None, group_size: int | None = None,
                 sym: bool = False, mse: bool = False, act_order: bool = False,
                 static_groups: bool = False, block_size: int = 128, percdamp: float = 0.01,
                 names: list[str] | None = None,
                 masks: list[torch.Tensor] | None = None,
                 error_H: torch.Tensor | None = None,
                 gguf: str | None = None) -> list[SolveResult]:
    """Solve several layers that read the same input (q/k/v; gate/up) in one sweep.

    Their rows are stacked and share one factorisation of ``H``; each layer keeps its own exact
    sparsity (the unstructured mask budget is counted per layer). Options as in :func:`solve`.

    ``masks``: fixed keep-masks (one per layer, True = kept) instead of choosing them: the sweep
    then only compensates (and quantizes) with that mask; ``sparsity``/``pattern`` must be unset.

    ``error_H``: the Hessian each result's ``error`` is measured with, ``tr(dW error_H dW^T)``
    (default ``H`` itself), e.g. that of calibration windows the solve did not see (the size
    planner's held-out windows, :func:`toolkit.walk.budget.profile_layers`).

    ``gguf``: a GGUF block type instead of ``bits`` (see :func:`solve`).

    Inputs that never fired (``diag H == 0``, e.g. a dead feature in the calibration data) have
    no effect on the calibration outputs: their weights are set to 0 before the sweep (as the
    SparseGPT and GPTQ reference code does), so pruning takes them first, whatever the scale of
    ``H``, and quantization stores them exactly.
    """
    t0 = time.perf_counter()
    sparsity, pattern, bits, group_size = check_solver_args(
        sparsity, pattern, bits, group_size, act_order, block_size)
    names = names or [f"layer{i}" for i in range(len(weights))]
    gtype = None
    if gguf is not None:
        gtype = gguf_type(gguf)
        if bits is not None:
            raise ValueError(f"give either bits (a uniform grid) or gguf (a GGUF block type), not "
                             f"both: bits={bits}, gguf={gtype.name!r}")
        if act_order or static_groups:
            raise ValueError(f"gguf={gtype.name!r} cannot be combined with act_order or "
                             "static_groups: GGUF blocks are natural column ranges, fitted as "
                             "the sweep reaches them in order")
    cols = weights[0].shape[-1] if weights else 0
    if weights and pattern is not None and cols % pattern[1]:
        raise ValueError(
            f"{names[0]}: pattern {pattern[0]}:{pattern[1]} needs the column count ({cols}) to be "
            f"divisible by {pattern[1]}"
        )
    W, factor, U, perm = _stack_and_factor(weights, H, names, act_order, percdamp)
    _check_error_hessian(error_H, factor.H)
    device = W.device
    if gtype is not None:  # GGUF grids reproduce the reader's float32 arithmetic
        W, U = W.float(), U.float()

    splits = [w.shape[0] for w in weights]
    static = static_groups and bits is not None
    W_natural = W  # the grids of static groups are fitted on it, before the sweep changes W
    if perm is not None:
        W = W.index_select(1, perm)
    rows = W.shape[0]
    seg_bounds = []
    start = 0
    for r in splits:
        seg_bounds.append((start, start + r))
        start += r

    if masks is not None:
        if sparsity or pattern is not None:
            raise ValueError("give either masks (fixed) or sparsity/pattern (chosen), not both")
        if len(masks) != len(weights) or any(m.shape != w.shape for m, w in zip(masks, weights)):
            raise ValueError("masks must be one bool tensor per weight, with the weight's shape")
        keep = torch.cat([m.to(device=device, dtype=torch.bool) for m in masks], 0)
        if perm is not None:
            keep = keep.index_select(1, perm)
    prune = masks is not None or sparsity > 0 or pattern is not None
    if masks is None:
        keep = torch.ones(rows, cols, dtype=torch.bool, device=device) if prune else None
    pruned_so_far = [0] * len(splits)
    quantizing = bits is not None or gtype is not None
    fitter = minimums = None
    if quantizing:
        if gtype is not None:  # GGUF: the groups are the type's sub-blocks (gguf_grids)
            fitter = BlockFitter(gtype, rows, cols, device=device, name=names[0])
            maxq = gtype.maxq
            bounds = fitter.bounds
            starts = fitter.starts  # col -> (sub-block, end of the weights its fit sees)
        else:
            maxq = 2**bits - 1
            bounds = group_bounds(cols, group_size)
            starts = {a: (g, b) for g, (a, b) in enumerate(bounds)}
        scales = torch.empty(rows, len(bounds), dtype=torch.float32, device=device)
        zeros = torch.empty_like(scales)
        if gtype is not None and gtype.has_min:
            minimums = torch.empty_like(scales)
        natural_group = torch.empty(cols, dtype=torch.int32, device=device)
        for g, (a, b) in enumerate(bounds):
            natural_group[a:b] = g
        if static:  # every grid fitted now, on the natural column ranges
            keep_nat = None
            if masks is not None:
                keep_nat = torch.cat([m.to(device=device, dtype=torch.bool) for m in masks], 0)
            scales[:], zeros[:] = _fit_static(W_natural, bounds, bits, sym, mse, keep_nat)
            # the group of the column at each visiting position
            static_of = (natural_group if perm is None else natural_group[perm]).tolist()
            current_group = -1
    del W_natural
    # the sweep works on W transposed (cols x rows): column i is one contiguous row of WT, and
    # the update of the columns after it is one contiguous slab
    WT = W.t().contiguous()
    del W
    if prune:
        keepT = keep.t().contiguous()
        del keep
    loss = torch.zeros(rows, dtype=WT.dtype, device=device)
    if quantizing:
        codesT = torch.empty(cols, rows, dtype=torch.uint8, device=device)
        cbuf = torch.empty(rows, dtype=WT.dtype, device=device)
    scale = zero = minimum = zcode = None  # the current grid; zcode: what pruned weights get
    dyn_starts = starts if quantizing and not static else {}
    dyn_size = gtype.sub if gtype is not None else group_size
    sub, split_groups = _sub_block(block_size, pattern, dyn_size if dyn_starts else None)
    d_all = torch.diagonal(U)
    d_float = d_all.tolist()  # U_ii as Python numbers (their exact values)

    for i1 in range(0, cols if (prune or quantizing) else 0, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = WT[i1:i2]  # a view: updated in place, then replaced by the block's targets
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1) if quantizing else None
        C1 = torch.empty_like(W1) if quantizing else None  # codes, as floats
        U1 = U[i1:i2, i1:i2]
        d = d_all[i1:i2]
        df = d_float[i1:i2]
        keep1 = keepT[i1:i2] if prune else None

        if sparsity > 0:
            # in the (rows x count) orientation, so that ties break as they always have
            score = W1.t().pow(2) / d.pow(2)[None, :]
            for s, (r0, r1) in enumerate(seg_bounds):
                target = round(sparsity * (r1 - r0) * i2)
                k = min(max(target - pruned_so_far[s], 0), (r1 - r0) * count)
                keep1[:, r0:r1] = prune_lowest(score[r0:r1], k).t()
                pruned_so_far[s] += k
        pruned1 = (~keep1).to(W1.dtype) if prune else None  # 1 where pruned

        # sub-blocks: the in-block update of a column reaches the end of its sub-block; each
        # finished sub-block updates the rest of the block with one matrix product
        edges = set(range(0, count, sub))
        if split_groups:
            edges |= {c - i1 for c in dyn_starts if i1 < c < i2}
        edges = sorted(edges) + [count]
        for a, b in zip(edges[:-1], edges[1:]):
            for i in range(a, b):
                col = i1 + i
                w = W1[i]
                e = Err1[i]
                if pattern is not None and i % pattern[1] == 0:
                    n, m = pattern
                    score = W1[i:i + m].t().pow(2) / d[i:i + m].pow(2)[None, :]
                    km = nm_mask(score, n, m).t()
                    keep1[i:i + m] = km
                    pruned1[i:i + m] = (~km).to(W1.dtype)
                if quantizing:
                    if static:
                        if static_of[col] != current_group:
                            current_group = static_of[col]
                            scale, zero = scales[:, current_group], zeros[:, current_group]
                            zcode = zero
                    elif col in starts:
                        g, gend = starts[col]
                        inblock = min(gend, i2) - i1
                        gw = W1[i:inblock]
                        gk = keep1[i:inblock] if prune else None
                        if gend > i2:  # the group reaches past this block: current values there
                            gw = torch.cat([gw, WT[i2:gend]], 0)
                            if prune:
                                gk = torch.cat([gk, torch.ones_like(WT[i2:gend], dtype=torch.bool)],
                                               0)
                        gk = None if gk is None else gk.t().contiguous()
                        if fitter is not None:
                            # each column's rounding error weighted by what the sweep
                            # charges for it, err^2 / U_jj^2
                            imp = d_all[col:gend].pow(-2)
                            scale, zero, minimum, zcode = fitter.fit(col, gw.t().contiguous(), gk,
                                                                     importance=imp)
                            if minimum is not None:
                                minimums[:, g] = minimum
                        else:
                            scale, zero = fit_grid(gw.t().contiguous(), bits, sym=sym, mse=mse,
                                                   keep=gk)
                            zcode = zero
                        scales[:, g], zeros[:, g] = scale, zero
                    # codes clamp(round(w / scale) + zero, 0, maxq); pruned weights get the zero
                    # point (GGUF: the code nearest 0)
                    quantize(w, scale, zero, maxq, out=cbuf, minimum=minimum)
                    if prune:
                        torch.where(keep1[i], cbuf, zcode, out=C1[i])
                    else:
                        C1[i].copy_(cbuf)
                    q = Q1[i]
                    dequantize(C1[i], scale, zero, out=q, minimum=minimum)
                    torch.sub(w, q, out=e)
                else:  # pruning only: the target is 0 where pruned, w elsewhere
                    torch.mul(w, pruned1[i], out=e)
                _compensate(W1, U1, e, df[i], i, b)
            _carry(W1, U1, Err1, a, b)

        loss += Err1.pow(2).sum(0) / 2
        if quantizing:
            W1.copy_(Q1)
            codesT[i1:i2] = C1.to(torch.uint8)
        else:
            W1.mul_(1 - pruned1)  # the kept weights as they are now, 0 where pruned
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), Err1, alpha=-1)

    W = WT.t()
    keep = keepT.t() if prune else None
    codes = codesT.t() if quantizing else None
    g_idx = None
    if quantizing:
        # dynamic: groups are ranges of visiting positions; static: natural column ranges
        g_idx = natural_group
    if perm is not None:
        inv = torch.argsort(perm)
        W = W.index_select(1, inv)
        if prune:
            keep = keep.index_select(1, inv)
        if quantizing:
            codes = codes.index_select(1, inv)
            if not static:
                g_idx = g_idx[inv]

    results = []
    seconds = time.perf_counter() - t0
    Hf = (factor.H if error_H is None else error_H).to(device)
    news = [W[r0:r1].to(w_in.dtype, memory_format=torch.contiguous_format)
            for (r0, r1), w_in in zip(seg_bounds, weights)]
    errors = stacked_row_errors(list(zip(weights, news)), Hf)  # in H's dtype
    for (r0, r1), new, err in zip(seg_bounds, news, errors):
        results.append(SolveResult(
            weight=new,
            mask=keep[r0:r1].clone() if prune else None,
            codes=codes[r0:r1].clone() if quantizing else None,
            scale=scales[r0:r1].clone() if quantizing else None,
            zero=zeros[r0:r1].clone() if quantizing else None,
            g_idx=g_idx,
            loss=float(loss[r0:r1].sum()),
            error=float(err.sum()),
            seconds=seconds * (r1 - r0) / rows,
            minimum=minimums[r0:r1].clone() if minimums is not None else None,
            gguf=fitter.grid().rows(r0, r1) if fitter is not None else None,
        ))
    return results


@torch.no_grad()
def solve_grids(weights: list[torch.Tensor], H: torch.Tensor | Factor,
                grids: list[tuple[int, int | None]], *, sym: bool = False, mse: bool = False,
                act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                percdamp: float = 0.01, names: list[str] | None = None,
                error_H: torch.Tensor | None = None) -> list[SolveResult]:
    """GPTQ of several weights that read the same input, each on its own grid, in one sweep.

    ``grids[j] = (bits, group_size)`` is the grid of ``weights[j]``; everything else (``sym``,
    ``mse``, ``act_order``, ``static_groups``, ``block_size``) is shared, and there is no
    pruning. Each row's result is that of :func:`solve_layers` with the row's own grid (the
    rows of a GPTQ sweep never interact: they share only ``U``), up to float rounding in the
    block updates; what is shared is the loop over the columns, whose per-column cost does not
    grow with the rows. This is what makes measuring many grids of one layer cheap (the size
    planner's profile: :func:`toolkit.walk.budget.profile_layers`).

    ``error_H``: as in :func:`solve_layers`.
    """
    return solve_grids_many([GridProblem(weights, H, grids, names, error_H)], sym=sym, mse=mse,
                            act_order=act_order, static_groups=static_groups,
                            block_size=block_size, percdamp=percdamp)[0]


@dataclass
class GridProblem:
    """One :func:`solve_grids` call's own arguments, for :func:`solve_grids_many`."""

    weights: list[torch.Tensor]
    H: torch.Tensor | Factor
    grids: list[tuple[int, int | None]]
    names: list[str] | None = None
    error_H: torch.Tensor | None = None


@torch.no_grad()
def solve_grids_many(problems: list[GridProblem], *, sym: bool = False, mse: bool = False,
                     act_order: bool = False, static_groups: bool = False,
                     block_size: int = 128, percdamp: float = 0.01) -> list[list[SolveResult]]:
    """Several :func:`solve_grids` problems (each its own weights, Hessian and grids; the same
    column count and solver options) in one loop over the columns: each problem's results are
    bit for bit those of its own :func:`solve_grids` call. What is shared is the per-column work
    that does not depend on a problem's Hessian (the rounding of every row of every problem at
    once); each problem's updates still use its own factor. On a CPU a column sweep costs
    mostly per column, not per row, so problems of one block's groups (or of several blocks)
    solved together cost little more than one. Bit for bit where the problems' groups start at
    the same columns (the same grids); otherwise a problem's in-block updates are split at the
    others' group starts too, which moves its results by float rounding only.
    """
    t0 = time.perf_counter()
    if not problems:
        return []
    check_solver_args(0.0, None, 4, None, act_order, block_size)
    K = len(problems)
    prepared = []
    for p in problems:
        names = p.names or [f"layer{i}" for i in range(len(p.weights))]
        if not p.weights or len(p.grids) != len(p.weights):
            raise ValueError("weights must be a non-empty list of 2-D tensors with one grid each, "
                             f"got {len(p.weights)} weights and {len(p.grids)} grids")
        grids = [(check_bits(b), check_group_size(g)) for b, g in p.grids]
        for (b, _g), nm in zip(grids, names):
            if b is None:
                raise ValueError(f"{nm}: every grid needs bits in 2..8, got 16/None")
        check_solver_args(0.0, None, grids[0][0], grids[0][1], act_order, block_size)
        W, factor, U, perm = _stack_and_factor(p.weights, p.H, names, act_order, percdamp)
        _check_error_hessian(p.error_H, factor.H)
        prepared.append((W, factor, U, perm, grids))
    cols, device = prepared[0][0].shape[1], prepared[0][0].device
    for W, *_rest in prepared:
        if W.shape[1] != cols:
            raise ValueError(f"problems solved together must have the same number of columns: "
                             f"{cols} in the first, {W.shape[1]} in another")
    dtype = torch.float64 if all(W.dtype == torch.float64 for W, *_r in prepared) else torch.float32
    R = max(W.shape[0] for W, *_r in prepared)
    # the sweep works on (cols, problems, rows): column i of every problem is one contiguous
    # (problems x rows) slab; a problem with fewer rows is padded with zero rows on the grid
    # scale 1, zero 0 (they round to 0 and carry nothing)
    WT = torch.zeros(cols, K, R, dtype=dtype, device=device)
    maxq = torch.ones(K, R, dtype=dtype, device=device)
    scale = torch.ones(K, R, dtype=torch.float32, device=device)  # each row's current grid
    zero = torch.zeros(K, R, dtype=torch.float32, device=device)
    Us, d_float, all_segs, rows_of = [], [], [], []
    perms = [perm for _W, _f, _U, perm, _g in prepared]
    hessians = [factor.H for _W, factor, _U, _p, _g in prepared]
    for k, (W, _factor, U, perm, grids) in enumerate(prepared):
        rows = W.shape[0]
        rows_of.append(rows)
        segs = []  # per weight: rows, grid, group ranges and where each group starts
        start = 0
        for w, (bits, gs) in zip(problems[k].weights, grids):
            bounds = group_bounds(cols, gs)
            natural = torch.empty(cols, dtype=torch.int32, device=device)
            for g, (a, b) in enumerate(bounds):
                natural[a:b] = g
            seg = dict(r0=start, r1=start + w.shape[0], bits=bits, maxq=2**bits - 1,
                       bounds=bounds, natural=natural,
                       starts={a: (g, b) for g, (a, b) in enumerate(bounds)},
                       scales=torch.empty(w.shape[0], len(bounds), dtype=torch.float32,
                                          device=device))
            seg["zeros"] = torch.empty_like(seg["scales"])
            if static_groups:  # every grid fitted now, on the natural column ranges
                seg["scales"][:], seg["zeros"][:] = _fit_static(W[seg["r0"]:seg["r1"]], bounds,
                                                                bits, sym, mse)
                of = natural if perm is None else natural[perm]
                seg["static_idx"] = of.to(torch.long)
            maxq[k, seg["r0"]:seg["r1"]] = float(seg["maxq"])
            segs.append(seg)
            start += w.shape[0]
        all_segs.append(segs)
        WT[:, k, :rows] = (W if perm is None else W.index_select(1, perm)).t().to(dtype)
        Us.append(U.to(dtype))
        d_float.append(torch.diagonal(U).tolist())  # U_ii as Python numbers (exact values)
    del prepared
    # aligned problems (the same segments: rows, grids; e.g. one group of several blocks): each
    # segment's grids of every problem live in one stacked tensor, handled in one operation
    layout = [[(s["r0"], s["r1"], s["bits"], tuple(s["bounds"])) for s in segs]
              for segs in all_segs]
    aligned = K > 1 and all(lay == layout[0] for lay in layout)
    stacked = []  # per segment: (scales, zeros, static_idx or None), each stacked over problems
    if aligned:
        for j in range(len(all_segs[0])):
            sc = torch.stack([segs[j]["scales"] for segs in all_segs])
            ze = torch.stack([segs[j]["zeros"] for segs in all_segs])
            for k, segs in enumerate(all_segs):  # the problems' own grids: views of the stack
                segs[j]["scales"], segs[j]["zeros"] = sc[k], ze[k]
            idx = None
            if static_groups:  # fixed grids: kept as (groups, problems, rows) for the gathers,
                # and each problem's group at each visiting position as (cols, problems)
                idx = torch.stack([segs[j]["static_idx"] for segs in all_segs], 1)
                sc, ze = sc.permute(2, 0, 1).contiguous(), ze.permute(2, 0, 1).contiguous()
            stacked.append((sc, ze, idx))
    loss = torch.zeros(K, R, dtype=dtype, device=device)
    codesT = torch.empty(cols, K, R, dtype=torch.uint8, device=device)
    cbuf = torch.empty(K, R, dtype=dtype, device=device)
    # dynamic groups: the (problem, segment) pairs whose next grid starts at each column
    starting: dict[int, list[tuple[int, int]]] = {}
    if not static_groups:  # aligned: problem -1 stands for all of them
        for k, segs in enumerate(all_segs[:1] if aligned else all_segs):
            k = -1 if aligned else k
            for j, s in enumerate(segs):
                for c in s["starts"]:
                    starting.setdefault(c, []).append((k, j))
    d_cols = torch.tensor(d_float, dtype=dtype, device=device).t().contiguous()  # (cols, K)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = WT[i1:i2]  # (count, K, R), a view
        Err1 = torch.zeros_like(W1)
        Q1 = torch.empty_like(W1)
        C1 = torch.empty_like(W1)
        U1s = [U[i1:i2, i1:i2] for U in Us]
        edges = set(range(0, count, SUB_BLOCK)) | {c - i1 for c in starting if i1 < c < i2}
        edges = sorted(edges) + [count]
        if static_groups:  # every row's grid at every column of the block, gathered at once
            # every problem's rows are written below; only the padding rows need scale 1, zero 0
            scale_blk = torch.empty(count, K, R, dtype=torch.float32, device=device)
            zero_blk = torch.empty_like(scale_blk)
            for k in range(K):
                if rows_of[k] < R:
                    scale_blk[:, k, rows_of[k]:] = 1.0
                    zero_blk[:, k, rows_of[k]:] = 0.0
            if aligned:  # one gather per segment for every problem
                for (sc, ze, idx), s in zip(stacked, all_segs[0]):
                    r0, r1 = s["r0"], s["r1"]
                    at = idx[i1:i2, :, None].expand(count, K, r1 - r0)
                    scale_blk[:, :, r0:r1] = torch.gather(sc, 0, at)
                    zero_blk[:, :, r0:r1] = torch.gather(ze, 0, at)
            else:
                for k, segs in enumerate(all_segs):
                    for s in segs:
                        idx = s["static_idx"][i1:i2]
                        scale_blk[:, k, s["r0"]:s["r1"]] = s["scales"][:, idx].t()
                        zero_blk[:, k, s["r0"]:s["r1"]] = s["zeros"][:, idx].t()
            s_rows, z_rows = scale_blk.unbind(0), zero_blk.unbind(0)
        # the block's column slabs as views, made in one call each (indexing them one by one
        # costs more than the arithmetic on them)
        w_rows, c_rows, q_rows, e_rows = W1.unbind(0), C1.unbind(0), Q1.unbind(0), Err1.unbind(0)
        # each problem's part of the block (its own rows), for its own updates
        W1k = [W1[:, k, :rows_of[k]] for k in range(K)]
        Err1k = [Err1[:, k, :rows_of[k]] for k in range(K)]
        if K > 1:  # U_ii per column, and each problem's own rows of each column's errors
            d_blk = d_cols[i1:i2].unbind(0)
            e_k = [Err1k[k].unbind(0) for k in range(K)]
        for a, b in zip(edges[:-1], edges[1:]):
            for i in range(a, b):
                col = i1 + i
                if static_groups:
                    sc_i, ze_i = s_rows[i], z_rows[i]
                else:
                    sc_i, ze_i = scale, zero
                    for k, j in starting.get(col, ()):  # a segment's next group starts here
                        s = all_segs[max(k, 0)][j]
                        r0, r1 = s["r0"], s["r1"]
                        g, gend = s["starts"][col]
                        if k < 0:  # aligned: every problem's rows of the segment in one fit
                            gw = W1[i:min(gend, i2) - i1, :, r0:r1]
                            if gend > i2:  # the group reaches past this block: current values
                                gw = torch.cat([gw, WT[i2:gend, :, r0:r1]], 0)
                            n = gw.shape[0]
                            sc, ze = fit_grid(gw.permute(1, 2, 0).reshape(K * (r1 - r0), n),
                                              s["bits"], sym=sym, mse=mse)
                            sc, ze = sc.view(K, r1 - r0), ze.view(K, r1 - r0)
                            stacked_sc, stacked_ze, _idx = stacked[j]
                            stacked_sc[:, :, g], stacked_ze[:, :, g] = sc, ze
                            scale[:, r0:r1], zero[:, r0:r1] = sc, ze
                            continue
                        gw = W1[i:min(gend, i2) - i1, k, r0:r1]
                        if gend > i2:  # the group reaches past this block: current values there
                            gw = torch.cat([gw, WT[i2:gend, k, r0:r1]], 0)
                        sc, ze = fit_grid(gw.t().contiguous(), s["bits"], sym=sym, mse=mse)
                        s["scales"][:, g], s["zeros"][:, g] = sc, ze
                        scale[k, r0:r1], zero[k, r0:r1] = sc, ze
                w, c, q, e = w_rows[i], c_rows[i], q_rows[i], e_rows[i]
                torch.div(w, sc_i, out=cbuf).round_().add_(ze_i).clamp_(min=0)
                torch.minimum(cbuf, maxq, out=c)
                dequantize(c, sc_i, ze_i, out=q)
                torch.sub(w, q, out=e)
                if K == 1:
                    _compensate(W1k[0], U1s[0], e[0, :rows_of[0]], d_float[0][col], i, b)
                else:  # what _compensate does: every problem's division at once, then each
                    # problem's rank-one update with its own row of U (addr_, as one problem
                    # alone: a broadcast product rounds differently)
                    e.div_(d_blk[i][:, None])
                    if i + 1 < b:
                        for k in range(K):
                            W1k[k][i + 1:b].addr_(U1s[k][i, i + 1:b], e_k[k][i], alpha=-1)
            for k in range(K):
                _carry(W1k[k], U1s[k], Err1k[k], a, b)
        loss += Err1.pow(2).sum(0) / 2
        W1.copy_(Q1)
        codesT[i1:i2] = C1.to(torch.uint8)
        if i2 < cols:
            for k in range(K):
                WT[i2:, k, :rows_of[k]].addmm_(Us[k][i1:i2, i2:].t(), Err1k[k], alpha=-1)

    seconds = time.perf_counter() - t0
    out = []
    for k, p in enumerate(problems):
        rows, segs = rows_of[k], all_segs[k]
        W, codes = WT[:, k, :rows], codesT[:, k, :rows]  # (cols, rows)
        perm = perms[k]
        inv = None
        if perm is not None:  # back to the natural column order: whole rows of WT gathered
            inv = torch.argsort(perm)
            W, codes = W.index_select(0, inv), codes.index_select(0, inv)
        W, codes = W.t(), codes.t()
        Hf = (hessians[k] if p.error_H is None else p.error_H).to(device)
        news = [W[s["r0"]:s["r1"]].to(w_in.dtype).clone(memory_format=torch.contiguous_format)
                for s, w_in in zip(segs, p.weights)]  # copies: the sweep's buffer can go
        errors = stacked_row_errors(list(zip(p.weights, news)), Hf)
        results = []
        for s, new, err in zip(segs, news, errors):
            r0, r1 = s["r0"], s["r1"]
            g_idx = s["natural"] if perm is None or static_groups else s["natural"][inv]
            own = codes[r0:r1].clone(memory_format=torch.contiguous_format)  # not a view of codesT
            results.append(SolveResult(
                weight=new, mask=None, codes=own, scale=s["scales"], zero=s["zeros"],
                g_idx=g_idx, loss=float(loss[k, r0:r1].sum()), error=float(err.sum()),
                seconds=seconds * (r1 - r0) / (rows * K)))
        out.append(results)
    return out
