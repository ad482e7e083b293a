"""Mask selection: which weights to prune, from a saliency score (lower = pruned first).

Masks are boolean, ``True`` where a weight is kept and ``False`` where it is pruned, with the
shape of the weight. The same helpers serve the solver (saliency ``w^2 / U_ii^2``), magnitude
pruning (``|w|``) and Wanda (``|w| * ||x||``).
"""

from __future__ import annotations

import torch

from toolkit.solver.checks import check_pattern, check_sparsity

__all__ = ["prune_lowest", "nm_mask", "check_pattern", "check_sparsity", "is_nm_valid"]


def prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that prunes exactly ``count`` entries of ``score`` with the lowest values.

    Selection by the ``count``-th smallest value (a linear-time select, not a sort); among
    entries equal to that value, the first ones in row-major order are pruned.
    """
    flat = score.reshape(-1)
    if count <= 0:
        return torch.ones(score.shape, dtype=torch.bool, device=score.device)
    if count >= flat.numel():
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    kth = torch.kthvalue(flat, count).values
    pruned = flat <= kth
    extra = int(pruned.sum()) - count
    if extra > 0:  # ties at the threshold: keep the last ones
        ties = torch.nonzero(flat == kth).flatten()
        pruned[ties[len(ties) - extra:]] = False
    return (~pruned).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask pruning the ``n`` lowest scores in every group of ``m`` consecutive columns;
    among equal scores the first columns are pruned (a stable sort: the same choice on every
    machine, where ``topk`` leaves ties to the implementation)."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"pattern {n}:{m} needs a column count divisible by {m}, got {cols}")
    grouped = score.reshape(rows, cols // m, m)
    idx = torch.sort(grouped, dim=2, stable=True).indices[:, :, :n]
    keep = torch.ones_like(grouped, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(rows, cols)


def is_nm_valid(weight_or_mask: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive columns of every row has at least ``n`` zeros
    (for a weight) or ``n`` pruned entries (for a boolean keep-mask)."""
    t = weight_or_mask
    pruned = ~t if t.dtype == torch.bool else t == 0
    rows, cols = pruned.shape
    if cols % m:
        return False
    return bool((pruned.reshape(rows, cols // m, m).sum(dim=2) >= n).all())
