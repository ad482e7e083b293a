"""Baseline rules for comparison: magnitude pruning, Wanda, round-to-nearest quantization.

They share the grids (:mod:`toolkit.solver.quant`) and mask helpers (:mod:`toolkit.solver.masks`) of the
solver, so a comparison differs only in the rule, not in the details.
"""

from __future__ import annotations

import torch

from toolkit.solver.masks import check_pattern, check_sparsity, nm_mask, prune_lowest
from toolkit.solver.quant import rtn_quantize

__all__ = ["magnitude_mask", "wanda_mask", "rtn_quantize", "apply_mask"]


def _mask_from_score(score: torch.Tensor, sparsity: float, pattern, per_row: bool) -> torch.Tensor:
    sparsity = check_sparsity(sparsity)
    pattern = check_pattern(pattern)
    if pattern is not None:
        if sparsity:
            raise ValueError("give either sparsity or pattern, not both")
        return nm_mask(score, *pattern)
    if per_row:
        k = round(sparsity * score.shape[1])
        if k == 0:
            return torch.ones_like(score, dtype=torch.bool)
        idx = torch.topk(score, k, dim=1, largest=False).indices
        keep = torch.ones_like(score, dtype=torch.bool)
        keep.scatter_(1, idx, False)
        return keep
    return prune_lowest(score, round(sparsity * score.numel()))


def magnitude_mask(weight: torch.Tensor, sparsity: float = 0.0, pattern=None) -> torch.Tensor:
    """Keep-mask pruning the smallest ``|w|``: exactly ``round(sparsity * numel)`` over the whole
    layer, or n of every m consecutive columns with ``pattern``."""
    return _mask_from_score(weight.float().abs(), sparsity, pattern, per_row=False)


def wanda_mask(weight: torch.Tensor, H: torch.Tensor, sparsity: float = 0.0,
               pattern=None) -> torch.Tensor:
    """Wanda: prune the smallest ``|w_ij| * ||x_j||``, compared within each output row.

    ``||x_j||`` is taken from the Hessian's diagonal (``H_jj = 2/n sum x_j^2``, the same ranking).
    Each row prunes ``round(sparsity * cols)``.
    """
    norms = torch.diagonal(H).float().clamp_min(0).sqrt().to(weight.device)
    return _mask_from_score(weight.float().abs() * norms[None, :], sparsity, pattern, per_row=True)


def apply_mask(weight: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``weight`` with the pruned entries set to exactly 0."""
    return weight * keep.to(weight.dtype)
