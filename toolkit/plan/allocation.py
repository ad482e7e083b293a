"""Non-uniform sparsity: how many weights each layer loses, with the model's total kept exact.

``allocation="uniform"`` prunes every layer to the requested sparsity (plain SparseGPT).
``allocation="owl"`` follows OWL (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): blocks
whose weights carry more *outliers* are pruned less. For decoder block ``b``

    score_ij = |W_ij| * ||X_j||          (Wanda's saliency; ||X_j|| over the calibration tokens)
    D_b      = fraction of the block's scores above  M * mean(block's scores)     (M = owl_m, 5)

The ratios are rescaled to ``[0, 2λ]`` (``λ = owl_lambda``, 0.08) and centred, and block ``b`` is
pruned ``s - (D_b - mean D)``: the block sparsities span a band of width ``2λ`` around the
requested ``s`` (about ``s ± λ``), and average exactly ``s``.

**Where the statistics come from (a pre-pass).** The ratios need every block's input
activations, which the sweep only has one block at a time, and the allocation must be known
before the first layer is pruned for the total to be exact without correction. So
:func:`toolkit.walk.capture.allocate` runs one cheap pre-pass with the sweep's own capture
machinery (:func:`toolkit.walk.sweep.capture_block_inputs`), through the *dense* blocks one at a time on the
compute device (as OWL does: statistics of the uncompressed model), and keeps only the
per-column sums of squares ``||X_j||^2`` (= ``n/2 diag H``) of each layer. It costs one dense
forward over the calibration windows, no Hessian and no solve. (The alternative — allocating
block by block during the sweep with a running correction — would leave the last blocks to
absorb every earlier deviation; the pre-pass gives each block exactly its OWL share.)

**Exact total.** The pool is every layer pruned unstructured (n:m layers keep their pattern and
are left out). The target is ``T = round(sum_l s_l * n_l)`` pruned weights over the pool (``s_l``
the layer's requested sparsity, ``n_l`` its size). The centring is weighted by each block's pool
size, so before rounding the shifted sparsities already sum to ``T``; each layer then gets
``round(s'_l * n_l)`` and the few units of rounding residue go, one each, to the largest layers.
The sparsity handed to the solver for a layer is ``count / n_l`` (or the block's ``s'`` when
that already rounds to ``count``, so layers that share an input still share one solve); the
solver prunes exactly ``round(sparsity * n_l)``, hence exactly ``T`` in total.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

__all__ = ["owl_block_sparsities", "exact_counts", "apply_allocation", "MAX_SPARSITY"]

MAX_SPARSITY = 0.99  # no layer is pruned beyond this by an allocation


def owl_block_sparsities(ratios, sparsity: float, lam: float, weights=None) -> list[float]:
    """OWL: block sparsity ``s - (D_b - mean D)`` with ``D`` rescaled to ``[0, 2λ]``.

    ``weights`` (block sizes) make the mean a weighted one, so that the total is preserved when
    blocks differ in size. Equal ratios give the uniform allocation.
    """
    D = torch.as_tensor(list(ratios), dtype=torch.float64)
    w = torch.ones_like(D) if weights is None else torch.as_tensor(list(weights), dtype=torch.float64)
    span = float(D.max() - D.min()) if len(D) else 0.0
    if span <= 0:
        return [float(sparsity)] * len(D)
    D = (D - D.min()) / span * 2 * lam
    D = D - (D * w).sum() / w.sum()
    return [float(sparsity - d) for d in D]


def exact_counts(sizes: list[int], sparsities: list[float], target: int,
                 max_sparsity: float = MAX_SPARSITY) -> list[int]:
    """Pruned count per layer, ``round(s * n)`` each, corrected so that they sum to ``target``.

    The residue is spread over the layers from the largest down (one unit per layer per pass),
    each staying within ``[0, floor(max_sparsity * n)]``. Raises if the target does not fit.
    """
    caps = [math.floor(max_sparsity * n) for n in sizes]
    counts = [min(max(round(s * n), 0), c) for s, n, c in zip(sparsities, sizes, caps)]
    if not 0 <= target <= sum(caps):
        raise ValueError(f"cannot prune {target} weights from layers that allow {sum(caps)}")
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    residue = target - sum(counts)
    while residue:
        step = 1 if residue > 0 else -1
        share = max(1, abs(residue) // max(len(order), 1))
        moved = 0
        for i in order:
            if not residue:
                break
            room = caps[i] - counts[i] if step > 0 else counts[i]
            k = min(share, room, abs(residue))
            if k > 0:
                counts[i] += step * k
                residue -= step * k
                moved += k
        if not moved:  # pragma: no cover - excluded by the fit check above
            raise ValueError("could not distribute the pruned count")
    return counts


def apply_allocation(layer_settings, sparsities: dict[str, float]):
    """Wrap a settings function so that the layers in ``sparsities`` get their allocated value."""
    def settings(name):
        s = layer_settings(name)
        if s is None or name not in sparsities:
            return s
        return replace(s, sparsity=sparsities[name])
    return settings
