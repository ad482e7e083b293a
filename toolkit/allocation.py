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
:func:`allocate` runs one cheap pre-pass with the sweep's own capture machinery
(:func:`toolkit.sweep.capture_block_inputs`), through the *dense* blocks one at a time on the
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
from torch import nn

__all__ = ["ALLOCATIONS", "check_allocation", "allocate", "owl_block_sparsities",
           "block_outlier_ratios", "exact_counts", "apply_allocation", "MAX_SPARSITY"]

ALLOCATIONS = ("uniform", "owl")
MAX_SPARSITY = 0.99  # no layer is pruned beyond this by an allocation


def check_allocation(allocation, owl_m=5.0, owl_lambda=0.08) -> str:
    """Validate the allocation rule and its parameters; errors name the argument."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(map(repr, ALLOCATIONS))}, got "
                         f"{allocation!r}")
    if isinstance(owl_m, bool) or not isinstance(owl_m, (int, float)) or not owl_m > 0 or \
            not math.isfinite(owl_m):
        raise ValueError(f"owl_m (outlier threshold, a multiple of the mean score) must be a "
                         f"number > 0, got {owl_m!r}")
    if isinstance(owl_lambda, bool) or not isinstance(owl_lambda, (int, float)) or \
            not 0 <= owl_lambda <= 0.5:
        raise ValueError(f"owl_lambda (largest sparsity deviation of a block) must be a number in "
                         f"[0, 0.5], got {owl_lambda!r}")
    return allocation


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


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, ids: torch.Tensor, pool: dict[str, object], device,
                         owl_m: float = 5.0) -> dict[int, tuple[float, int]]:
    """Pre-pass over the dense blocks: ``{block: (outlier ratio, pool weights in it)}``.

    ``pool`` maps the names of the layers that take part to anything (their settings). Blocks
    without a pool layer are skipped. The model is not changed.
    """
    from .models import find_blocks, find_linears
    from .sweep import capture_block_inputs, run_block

    name, blocks = find_blocks(model)
    refs_of = [[r for r in find_linears(blk, prefix=f"{name}.{b}") if r.name in pool]
               for b, blk in enumerate(blocks)]
    used = [b for b, refs in enumerate(refs_of) if refs]
    out: dict[int, tuple[float, int]] = {}
    if not used:
        return out
    inputs = capture_block_inputs(model, blocks, ids, device)
    for b in range(used[-1] + 1):  # blocks after the last pool layer need not run
        block, refs = blocks[b], refs_of[b]
        home = next(block.parameters()).device
        block.to(device)
        sq = {id(r): torch.zeros(r.in_features, dtype=torch.float64, device=device) for r in refs}

        def make_hook(acc):
            def hook(_m, args):
                x = args[0].reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float64)
                acc.add_(x.pow(2).sum(0))
            return hook

        handles = [r.module.register_forward_pre_hook(make_hook(sq[id(r)])) for r in refs]
        try:
            inputs.hidden = [run_block(block, inputs, h) for h in inputs.hidden]
        finally:
            for h in handles:
                h.remove()
        if refs:
            scores = [r.get_weight().to(device=device, dtype=torch.float32).abs()
                      * sq[id(r)].sqrt().float()[None, :] for r in refs]
            total = sum(sc.numel() for sc in scores)
            mean = sum(float(sc.sum(dtype=torch.float64)) for sc in scores) / total
            outliers = sum(int((sc > owl_m * mean).sum()) for sc in scores)
            out[b] = (outliers / total, total)
        block.to(home)
    return out


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


def allocate(model: nn.Module, ids: torch.Tensor, layer_settings, *, allocation: str = "owl",
             device=None, owl_m: float = 5.0, owl_lambda: float = 0.08) -> dict[str, float]:
    """Per-layer sparsity ``{name: sparsity}`` for the unstructured-pruned layers of ``model``.

    ``layer_settings(name) -> LayerSettings | None`` is the sweep's settings function; the result
    replaces the ``sparsity`` of the layers it names (see the module docstring for the rule and
    the exact-total guarantee). ``allocation="uniform"`` returns ``{}`` (nothing changes).
    """
    check_allocation(allocation, owl_m, owl_lambda)
    if allocation == "uniform":
        return {}
    from .models import find_blocks, find_linears

    name, blocks = find_blocks(model)
    layers = []  # (block, ref, settings)
    for b, blk in enumerate(blocks):
        for r in find_linears(blk, prefix=f"{name}.{b}"):
            s = layer_settings(r.name)
            if s is not None and s.sparsity > 0 and s.pattern is None:
                layers.append((b, r, s))
    if not layers:
        return {}
    pool = {r.name: s for _, r, s in layers}
    stats = block_outlier_ratios(model, ids, pool, device, owl_m)
    blocks_used = sorted(stats)
    shifts = owl_block_sparsities([stats[b][0] for b in blocks_used], 0.0, owl_lambda,
                                  weights=[stats[b][1] for b in blocks_used])
    shift = dict(zip(blocks_used, shifts))
    sizes = [r.module.weight.numel() for _, r, _ in layers]
    wanted = [min(max(s.sparsity + shift[b], 0.0), MAX_SPARSITY) for b, _, s in layers]
    target = round(sum(s.sparsity * n for (_, _, s), n in zip(layers, sizes)))
    counts = exact_counts(sizes, wanted, target)
    out = {}
    for (_, r, _), n, want, c in zip(layers, sizes, wanted, counts):
        sp = want if round(want * n) == c else c / n
        assert round(sp * n) == c and 0 <= sp < 1
        out[r.name] = sp
    return out


def apply_allocation(layer_settings, sparsities: dict[str, float]):
    """Wrap a settings function so that the layers in ``sparsities`` get their allocated value."""
    def settings(name):
        s = layer_settings(name)
        if s is None or name not in sparsities:
            return s
        return replace(s, sparsity=sparsities[name])
    return settings
