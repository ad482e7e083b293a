"""Capture from a running model: the input Hessians of named layers, and the activation
statistics of the OWL allocation (one dense pre-pass through the blocks, one at a time).

The rules that turn the statistics into per-layer sparsities live in
:mod:`toolkit.plan.allocation`; this module only runs the model and collects.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.config.options import check_allocation
from toolkit.model.layers import find_blocks, find_linears, is_conv1d
from toolkit.plan.allocation import MAX_SPARSITY, exact_counts, owl_block_sparsities
from toolkit.solver.hessian import HessianAccumulator
from toolkit.walk.sweep import capture_block_inputs, run_block

__all__ = ["owl_block_shifts", "capture_hessians", "capture_hessian", "block_outlier_ratios", "allocate"]


@torch.no_grad()
def capture_hessians(model, layer_names, calibration: torch.Tensor, *, batch_size: int = 4,
                     dtype: torch.dtype = torch.float32) -> dict[str, HessianAccumulator]:
    """The input Hessians of the layers ``layer_names`` (full module names) of ``model`` on the
    calibration token windows ``calibration`` (nsamples x seqlen), from forward hooks on the
    unchanged model, ``batch_size`` windows per forward. Returns ``{name: accumulator}``
    (``acc.H``, ``acc.nsamples`` tokens). For experiments on single layers (tests, benchmarks,
    tutorials); :func:`toolkit.compress` builds its Hessians block by block instead."""
    names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no layer named {missing[0]!r} in {type(model).__name__}")
    accs, hooks = {}, []
    for n in names:
        w = modules[n].weight
        cols = w.shape[0] if is_conv1d(modules[n]) else w.shape[1]
        accs[n] = HessianAccumulator(cols, dtype=dtype, name=n)
        hooks.append(modules[n].register_forward_pre_hook(
            lambda _m, args, acc=accs[n]: acc.add(args[0])))
    device = next(model.parameters()).device
    try:
        for i in range(0, calibration.shape[0], batch_size):
            model(calibration[i:i + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return accs


def capture_hessian(model, layer_name: str, calibration: torch.Tensor, **kwargs) -> torch.Tensor:
    """The input Hessian ``H = 2/n sum x x^T`` of one layer (see :func:`capture_hessians`)."""
    return capture_hessians(model, [layer_name], calibration, **kwargs)[layer_name].H


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, ids: torch.Tensor, pool: dict[str, object], device,
                         owl_m: float = 5.0) -> dict[int, tuple[float, int]]:
    """Pre-pass over the dense blocks: ``{block: (outlier ratio, pool weights in it)}``.

    ``pool`` maps the names of the layers that take part to anything (their settings). Blocks
    without a pool layer are skipped. The model is not changed.
    """
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
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # one window's input norms

        def make_hook(acc, seen=seen):
            def hook(_m, args):
                x0 = args[0]
                hit = seen.get(id(x0))
                if hit is None or hit[0] is not x0:  # layers fed the same tensor (q/k/v,
                    # gate/up) share its column norms: computed once per window
                    x = x0.reshape(-1, x0.shape[-1]).to(device=device, dtype=torch.float64)
                    hit = seen[id(x0)] = (x0, x.pow(2).sum(0))
                acc.add_(hit[1])
            return hook

        handles = [r.module.register_forward_pre_hook(make_hook(sq[id(r)])) for r in refs]
        try:
            hidden = []
            for h in inputs.hidden:
                hidden.append(run_block(block, inputs, h))
                seen.clear()
            inputs.hidden = hidden
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


def owl_block_shifts(model: nn.Module, ids: torch.Tensor, names, *, device=None,
                     owl_m: float = 5.0, owl_lambda: float = 0.08) -> dict[int, float]:
    """OWL's sparsity shift of each block, ``{block: shift}``: the block sparsities of
    :func:`toolkit.plan.allocation.owl_block_sparsities` around 0 (a band of width
    ``2 * owl_lambda``, the mean weighted by the blocks' sizes exactly 0), from the outlier
    ratios of the layers named in ``names`` (one dense pre-pass, :func:`block_outlier_ratios`).
    The size planner adds it to the pruned options of each block (``target_bits`` with
    ``allocation="owl"``, :func:`toolkit.plan.budget.layer_choices`)."""
    check_allocation("owl", owl_m, owl_lambda)
    stats = block_outlier_ratios(model, ids, dict.fromkeys(names), device, owl_m)
    used = sorted(stats)
    shifts = owl_block_sparsities([stats[b][0] for b in used], 0.0, owl_lambda,
                                  weights=[stats[b][1] for b in used])
    return dict(zip(used, shifts))


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
