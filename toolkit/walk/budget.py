"""The size planner's two walks over the model: the profile (every option of every budgeted
layer solved, its error measured) and the budgeted sweep (the plan applied block by block,
the rest planned again when bytes moved). What they compute and why is described in
:mod:`toolkit.plan.budget`, which holds the planning itself (choices, knapsack, plan).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import sys
import time
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from toolkit.checkpoint.formats import block_key, partial_group_keys
from toolkit.checkpoint.size import compressed_weight_bytes, model_bytes
from toolkit.config.menu import parse_size
from toolkit.config.options import CompressConfig, LayerSettings
from toolkit.config.records import LayerCompression
from toolkit.measure.perplexity import perplexity
from toolkit.model import experts
from toolkit.model.experts import is_expert
from toolkit.model.layers import LinearRef, find_blocks, is_conv1d
from toolkit.plan.budget import (
    DENSE_BITS,
    BudgetPlan,
    BudgetProfile,
    LayerChoices,
    budget_range,
    budgeted_layers,
    check_budget_config,
    check_target,
    frontier,
    holdout_windows,
    layer_choices,
    option_values,
    plan_budget,
)
from toolkit.solver.baselines import apply_mask, magnitude_mask, rtn_quantize
from toolkit.solver.hessian import HessianAccumulator, reconstruction_error, stacked_row_errors
from toolkit.solver.layer import GridProblem, factorize, solve_grids_many, solve_layers
from toolkit.walk import expert_capture
from toolkit.walk.capture import owl_block_shifts
from toolkit.walk.sweep import capture_block_inputs, find_groups, run_block, sweep_block

__all__ = ["profile_layers", "budget_choices", "output_sensitivity", "Sensitivity", "BudgetResult",
           "BudgetCollapseError", "GUARD_WINDOWS", "PlanPreview", "search_plan", "SearchResult",
           "calibrate_scales", "Calibration", "layer_kind",
           "budget_sweep"]

log = logging.getLogger("toolkit")

#: The most rows the profile stacks in one sweep of several grids (memory: rows x columns
#: floats, a few times over).
GRID_ROWS = 16384
#: Bytes of Hessians and weights the profile may hold for grid sweeps it has not run yet, so
#: that the same group of several blocks is swept together (:class:`_GridQueue`); 0 sweeps each
#: block's groups as soon as its Hessians are measured.
GRID_QUEUE_BYTES = 1 << 30


def _fingerprint(model: nn.Module, refs: list[LinearRef], ids: torch.Tensor,
                 config: CompressConfig) -> str:
    h = hashlib.sha256()
    h.update(ids.detach().cpu().numpy().tobytes())
    for r in refs:
        w = r.get_weight()
        h.update(r.name.encode())
        h.update(repr((tuple(w.shape), float(w.double().sum()), float(w.double().abs().sum())))
                 .encode())
    keep = {k: v for k, v in config.to_dict().items()
            if k not in ("target_bits", "target_size", "budget_layout", "budget_metric",
                         "budget_guard", "budget_search", "budget_calibrate", "verbose",
                         "device", "calibration", "nsamples", "seqlen")}
    h.update(repr(sorted(keep.items(), key=lambda kv: kv[0])).encode())
    return h.hexdigest()[:16]


def _rows_subset(rows: int, fraction: float, seed: int, index: int) -> torch.Tensor | None:
    n = max(min(rows, 64), math.ceil(fraction * rows))
    if n >= rows:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randperm(rows, generator=g)[:n].sort().values



@dataclass
class Sensitivity:
    """How much the calibration loss reacts to one layer's outputs: ``channel[i]`` = mean over
    the calibration tokens of ``(dL/dy_ti)^2`` and ``token[t]`` = mean over the output channels
    of the same (tokens in calibration order, windows one after the other)."""

    channel: torch.Tensor
    token: torch.Tensor


def output_sensitivity(model: nn.Module, ids: torch.Tensor, refs: list[LinearRef], *,
                       labels: str = "data", seed: int = 0,
                       verbose: bool = False) -> dict[str, Sensitivity]:
    """The :class:`Sensitivity` of each layer of ``refs``: squared gradients of the language
    model loss (the mean next-token loss of each calibration window) with respect to the
    layer's outputs, from one forward and backward pass per window on the model where it is
    (float32, CPU). No parameter gets a gradient (only the activations carry one); the model
    is not changed. ``labels="data"``: the loss of the calibration text's own next tokens (the
    empirical Fisher); ``"model"``: of next tokens drawn from the model's own predictions
    (``seed``), whose squared gradients estimate the Fisher information itself.

    Experts of a mixture-of-experts model (:mod:`toolkit.model.experts`) are followed through
    their eager per-expert loop (:func:`toolkit.walk.expert_capture.watch_output`): ``token``
    then holds the routed tokens only, in the order the expert saw them, and ``channel`` is still
    divided by every calibration token (an expert few tokens reach has small sensitivities).

    Used by the ``"fisher"`` metric: with ``g_ti^2 ~ token[t] * channel[i] / mean(channel)``
    (a rank-one fit of the squared gradients), the diagonal empirical-Fisher estimate of the
    loss increase of a change ``dW``, ``1/2 sum_t sum_i g_ti^2 ((dW x_t)_i)^2``, is proportional
    to ``sum_i channel[i] / mean(channel) * (dW H_s dW^T)_ii`` with the token-weighted input
    Hessian ``H_s = 2/n sum_t token[t] x_t x_t^T``. The token weights matter: tokens with huge
    activations (attention sinks) make large layer errors but have small gradients.
    """
    chan = {r.name: torch.zeros(r.get_weight().shape[0]) for r in refs}
    tok: dict[str, list[torch.Tensor]] = {r.name: [] for r in refs}
    grads_on = {p: p.requires_grad for p in model.parameters()}
    handles = []

    def keep(name):
        def hook(out, part):  # returns None: the output is left as it is
            if isinstance(out, tuple):  # a router module: its scores come first
                out = out[0]

            def on_grad(g):
                g = part(g)
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).cpu()
                chan[name] += g2.sum(0)
                tok[name].append(g2.mean(1))

            if out.requires_grad:
                out.register_hook(on_grad)
        return hook

    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(
        lambda _m, _inp, out: out.detach().requires_grad_(True)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with expert_capture.calibrating(model, [r for r in refs if is_expert(r)]):
            handles += [expert_capture.watch_output(r, keep(r.name)) for r in refs]
            for p in grads_on:
                p.requires_grad_(False)
            gen = torch.Generator(device=device).manual_seed(seed)
            for row in tqdm(ids, desc="profile: loss gradients", unit="window",
                            disable=not verbose):
                x = row[None].to(device)
                with torch.enable_grad():
                    if labels == "model":
                        logits = model(x, use_cache=False).logits[0].float()
                        y = torch.multinomial(logits.detach().softmax(-1), 1,
                                              generator=gen)[:, 0]
                        nn.functional.cross_entropy(logits, y).backward()
                    else:
                        model(x, labels=x, use_cache=False).loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, on in grads_on.items():
            p.requires_grad_(on)
        model.train(was_training)
    n = ids.numel()
    out = {}
    for r in refs:
        name = r.name
        if not is_expert(r) and len(tok[name]) != len(ids):
            raise RuntimeError(f"{name}: got {len(tok[name])} output gradients for "
                               f"{len(ids)} calibration windows")
        out[name] = Sensitivity(channel=chan[name] / n,
                                token=torch.cat(tok[name]) if tok[name] else torch.zeros(0))
    return out



@torch.no_grad()
def _block_hessians(block: nn.Module, groups: list[list[LinearRef]], inputs, dtype,
                    sens: dict[str, Sensitivity] | None, held: list[int] | None = None):
    """From one forward pass per window: one Hessian accumulator per group to solve with (the
    windows not in ``held``), one per group to measure errors with (the ``held`` windows; the
    same as the first without them), and with ``sens`` (the gradients of the measuring windows
    alone) one token-weighted Hessian per layer over those windows (``H_s`` of
    :func:`output_sensitivity`); also returns the block's outputs (the next block's inputs), as
    the dense model computes them.

    Expert layers (inside :func:`toolkit.walk.expert_capture.calibrating`) see the tokens routed
    to them; their token-weighted Hessian is the measuring Hessian times the mean weight of
    their routed tokens (which tokens an expert gets can flip between the gradient pass and
    this one where two router scores tie, so the weights are not matched token by token)."""
    device = inputs.hidden[0].device
    held = set(held or ())
    now = {"window": 0}

    def new(g):
        return HessianAccumulator(g.in_features, device=device, dtype=dtype, name=g.name)

    fit = [new(g[0]) for g in groups]
    measure = [new(g[0]) for g in groups] if held else fit

    def pre(a_fit, a_measure):
        def fn(x):
            (a_measure if now["window"] in held else a_fit).add(x, check=False)
        return fn

    handles = [expert_capture.watch(g[0], pre(a, b)) for g, a, b in zip(groups, fit, measure)]
    weighted: dict[str, HessianAccumulator] = {}
    if sens is not None:
        for g in groups:
            for r in g:
                if is_expert(r):
                    continue
                acc = weighted[r.name] = new(r)
                handles.append(r.module.register_forward_pre_hook(_weighted_hook(
                    acc, sens[r.name].token.to(device),
                    lambda: not held or now["window"] in held)))
    try:
        outputs = []
        for w, h in enumerate(inputs.hidden):
            now["window"] = w
            outputs.append(run_block(block, inputs, h))
    finally:
        for hd in handles:
            hd.remove()
    for acc in [*fit, *(measure if held else []), *weighted.values()]:
        acc.check_finite()  # once, after the pass (each batch unchecked above)
    Hw = {n: a.H for n, a in weighted.items()}
    if sens is not None:
        for g, m in zip(groups, measure):
            for r in g:
                if is_expert(r):
                    t = sens[r.name].token
                    Hw[r.name] = m.H * (float(t.double().mean()) if t.numel() else 0.0)
    return fit, measure, Hw, outputs


def _weighted_hook(acc: HessianAccumulator, token: torch.Tensor, wanted=lambda: True):
    """A pre-hook adding ``token[t] x_t x_t^T`` for the tokens of each call, in order; the
    calls for which ``wanted()`` is false are skipped (``token`` holds the tokens of the
    wanted calls only, those the gradient pass saw)."""
    seen = [0]

    def hook(_m, args):
        if not wanted():
            return
        x = args[0]
        t = x.shape[:-1].numel()
        if seen[0] + t > token.numel():
            raise RuntimeError(f"token weights for {token.numel()} tokens, but the measuring "
                               f"windows hold more ({seen[0] + t} so far)")
        w = token[seen[0]:seen[0] + t].sqrt().to(x.dtype).reshape(x.shape[:-1] + (1,))
        acc.add(x * w, check=False)  # checked once after the pass
        seen[0] += t
    return hook


def peak_rss() -> int:
    """The process's peak resident memory in bytes so far (0 where the OS does not say)."""
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):  # Windows
        return 0
    return kb * (1 if sys.platform == "darwin" else 1024)


def profile_memory_note(model: nn.Module, ids: torch.Tensor, choices: list[LayerChoices]) -> str:
    """One line, printed before the profile: what it will hold beyond the model, from the
    shapes (an estimate), and what lowers it."""
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", 0) or 0
    inter = getattr(cfg, "intermediate_size", 0) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    vocab = getattr(cfg, "vocab_size", 0) or 0
    seqlen = ids.shape[-1]
    # the loss-gradient pass keeps one window's activations for its backward pass (float32):
    # per block about 12 hidden-wide and 3 intermediate-wide rows and the attention scores of
    # each head, and the logits with their gradient
    grads = 4 * seqlen * (layers * (12 * hidden + 3 * inter + heads * seqlen) + 3 * vocab)
    # the stacked grids of one group: up to GRID_ROWS rows of the widest layer, a few copies
    cols = max((c.cols for c in choices), default=0)
    grids = 4 * 4 * min(GRID_ROWS, 3 * max((c.rows for c in choices), default=0)) * cols
    inputs = 4 * 2 * ids.numel() * hidden  # the block inputs and outputs of every window
    extra = grads + grids + inputs
    return (f"profile: {len(choices)} layers x {max(len(c.settings) for c in choices)} options; "
            f"about {extra / 1e9:.1f} GB beyond the model (gradient pass of one "
            f"{seqlen}-token window {grads / 1e9:.1f} GB, stacked grids {grids / 1e9:.1f} GB, "
            f"block activations {inputs / 1e9:.1f} GB); lower it with a shorter --seqlen, "
            f"fewer --nsamples or --budget-metric relative (no gradient pass)")


def budget_choices(model: nn.Module, ids: torch.Tensor, config: CompressConfig, layout: str,
                   device=None, allocate: bool = True):
    """``(choices, shifts)``: the :class:`LayerChoices` of every budgeted layer for ``layout``
    and, with ``allocation="owl"`` (and ``allocate``), OWL's sparsity shift of each block
    (:func:`toolkit.walk.capture.owl_block_shifts`, one dense pre-pass), already added to the
    unstructured pruned options; ``shifts`` is None otherwise."""
    shifts = None
    if config.allocation == "owl" and allocate:
        names = [r.name for _b, r in budgeted_layers(model, config)]
        shifts = owl_block_shifts(model, ids, names, device=device, owl_m=config.owl_m,
                                  owl_lambda=config.owl_lambda)
    return layer_choices(model, config, layout, shifts=shifts), shifts


@torch.no_grad()
def profile_layers(model: nn.Module, ids: torch.Tensor, config: CompressConfig, *, device,
                   layout: str | None = None, choices: list[LayerChoices] | None = None,
                   sensitivity: bool | None = None, verbose: bool = True) -> BudgetProfile:
    """Measure every budgeted layer's solver error for every option it may take (see the
    module docstring). The model is not changed. ``choices`` default to
    :func:`budget_choices` for ``layout`` (default ``config.budget_layout``; with
    ``allocation="owl"`` the pruned options shifted block by block);
    ``sensitivity`` (default: when ``config.budget_metric`` is ``"fisher"``) also measures
    :func:`output_sensitivity` and the weighted errors."""
    t0 = time.perf_counter()
    layout = layout or config.budget_layout
    if choices is None:
        choices, _shifts = budget_choices(model, ids, config, layout, device)
    if sensitivity is None:
        sensitivity = config.budget_metric == "fisher"
    prof = BudgetProfile(
        layers=choices, errors=[[0.0 if not s.active else math.nan for s in c.settings]
                                for c in choices],
        energy=[0.0] * len(choices), dense_rest=0.0, seconds=0.0,
        rows_fraction=config.profile_rows, layout=layout,
        weighted=[[0.0 if not s.active else math.nan for s in c.settings] for c in choices]
        if sensitivity else None)
    by_name = {c.name: i for i, c in enumerate(choices)}
    blocks_name, blocks = find_blocks(model)
    refs = {r.name: r for _b, r in budgeted_layers(model, config)}
    prof.key = _fingerprint(model, list(refs.values()), ids, config)
    prof.dense_rest = model_bytes(model, DENSE_BITS, layout)["bytes"] - \
        sum(c.params for c in choices) * DENSE_BITS / 8
    if verbose:
        tqdm.write(profile_memory_note(model, ids, choices), file=sys.stderr)
    held = holdout_windows(len(ids), config.profile_holdout)
    fisher = None
    if sensitivity:
        # the weighted errors are measured on the held-out windows alone: their gradients are
        # all the planner uses (token weights and channel weights of the same tokens), so the
        # gradient pass runs on those windows only (every window without a holdout)
        fisher = output_sensitivity(model, ids[held] if held else ids,
                                    [refs[c.name] for c in choices], verbose=verbose)
        prof.sensitivity_seconds = time.perf_counter() - t0
    inputs = capture_block_inputs(model, blocks, ids, device)
    prof.holdout = len(held)
    prof.share = [1.0] * len(choices)
    # tokens of the windows the errors are measured on (an expert's share is its part of them)
    tokens = sum(inputs.hidden[w].shape[:-1].numel()
                 for w in (held or range(len(inputs.hidden))))
    if config.profile_holdout > 0 and not held:
        log.warning("profile_holdout=%g: the calibration has a single window, none to hold "
                    "out; the profile's errors are measured on the windows it solved with",
                    config.profile_holdout)
    dtype = getattr(torch, config.hessian_dtype)
    was_training = model.training
    model.eval()
    bar = tqdm(range(len(blocks)), desc="profiling blocks", unit="block",
               disable=not verbose)
    queue = _GridQueue(GRID_QUEUE_BYTES)
    try:
        for b in bar:
            block = blocks[b]
            home = next(block.parameters()).device
            block.to(device)
            mine = [r for r in experts.find_layers(block, f"{blocks_name}.{b}",
                                                   routers=config.routers)
                    if r.name in by_name]
            with expert_capture.calibrating(block, mine):  # a no-op without experts
                groups = find_groups(block, mine, inputs) if mine else []
                # MoE: as many Hessians per pass over the windows as fit in the budget (twice:
                # solving and measuring); a dense block in one pass
                itemsize = torch.finfo(dtype).bits // 8
                passes = (expert_capture.cut(groups, expert_capture.hessian_budget(device) // 2,
                                             itemsize)
                          if experts.has_experts(block) else [groups])
                outputs = None
                for phase in passes:
                    fit, meas, Hw, outputs = _block_hessians(block, phase, inputs, dtype,
                                                             fisher, held)
                    for group, a_fit, a_meas in zip(phase, fit, meas):
                        _profile_group(prof, group, a_fit, a_meas, Hw, by_name, fisher,
                                       config, device, tokens, queue)
                    del fit, meas, Hw
                    if experts.has_experts(block):
                        queue.flush()  # a MoE block's Hessians are budgeted pass by pass
                if outputs is None:
                    outputs = [run_block(block, inputs, h) for h in inputs.hidden]
            inputs.hidden = outputs
            block.to(home)
        queue.flush()
    finally:
        model.train(was_training)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    prof.seconds = time.perf_counter() - t0
    if verbose:
        tqdm.write(f"profile: {prof.seconds:.0f} s, process peak memory {peak_rss() / 1e9:.2f} "
                   "GB", file=sys.stderr)
    return prof


class _GridQueue:
    """The profile's grid sweeps, held back until enough are queued to solve together: problems
    of the same shape (the same group of other blocks: same columns, rows, grids and options)
    run in one column loop (:func:`toolkit.solver.layer.solve_grids_many`, the results of
    one call each, bit for bit). Each queued problem keeps its Hessians alive, so the queue is
    flushed once they pass ``budget`` bytes (and at the end): a model whose blocks' Hessians are
    large is solved a block at a time, as before."""

    def __init__(self, budget: int):
        self.budget, self.bytes = budget, 0
        self.jobs: list[tuple[tuple, GridProblem, object]] = []
        self.finishers: list = []

    def add(self, jobs, finisher, nbytes: int) -> None:
        self.jobs += jobs
        self.finishers.append(finisher)
        self.bytes += nbytes
        if self.bytes > self.budget:
            self.flush()

    def flush(self) -> None:
        buckets: dict[tuple, list] = {}
        for key, problem, done in self.jobs:
            buckets.setdefault(key, []).append((problem, done))
        for key, items in buckets.items():
            _cols, _rows, _grids, (sym, mse, act_order, static_groups), block_size = key
            results = solve_grids_many([p for p, _d in items], sym=sym, mse=mse,
                                       act_order=act_order, static_groups=static_groups,
                                       block_size=block_size)
            for (_p, done), res in zip(items, results):
                done(res)
        for finish in self.finishers:
            finish()
        self.jobs, self.finishers, self.bytes = [], [], 0


def _profile_group(prof, group, a_fit, a_measure, Hw, by_name, fisher, config, device,
                   tokens, queue: _GridQueue):
    """Every option of every layer of one group: one solve per distinct setting with the
    Hessian of ``a_fit``, the group's layers that may take it stacked (each on its row subset),
    each error measured with that of ``a_measure`` (the held-out windows'; ``a_fit`` itself
    without a holdout). Experts: their token share is ``a_measure``'s tokens over ``tokens``;
    one that no measuring token reaches has error 0 for every option (share 0), one that no
    solving token reaches is solved on the measuring Hessian. The grid sweeps (and the weighted
    errors after them) go to ``queue``; the pruned options are solved here."""
    choices = prof.layers
    idx = [by_name[r.name] for r in group]
    if is_expert(group[0]):
        for i in idx:
            prof.share[i] = a_measure.nsamples / tokens if tokens else 0.0
        if a_measure.nsamples == 0:
            for i in idx:
                for k, s in enumerate(choices[i].settings):
                    if s.active:
                        prof.errors[i][k] = 0.0
                        if prof.weighted is not None:
                            prof.weighted[i][k] = 0.0
            return
    H_measure = a_measure.H
    H = a_fit.H if a_fit is not a_measure and a_fit.nsamples else H_measure
    weights, subsets, weights_f = [], [], []
    for r, i in zip(group, idx):
        w = r.get_weight().to(device=device, dtype=torch.float32)
        prof.energy[i] = reconstruction_error(w, torch.zeros_like(w), H_measure)
        sub = _rows_subset(w.shape[0], config.profile_rows, config.seed, i)
        subsets.append(sub)
        weights.append(w if sub is None else w[sub.to(device)])
        if fisher is not None:
            f = fisher[r.name].channel.to(device=device, dtype=H.dtype)
            f = f / f.mean() if f.mean() > 0 else f  # the scale is in the weighted Hessian
            weights_f.append(f if sub is None else f[sub.to(device)])
    buckets: dict[LayerSettings, list[int]] = {}
    for j, i in enumerate(idx):
        if len(choices[i].settings) < 2:
            continue  # one choice: nothing to decide
        for s in choices[i].settings:
            if s.active:
                buckets.setdefault(s, []).append(j)
    factors = {}
    held_out = None if H_measure is H else H_measure

    def factor(act_order):
        if act_order not in factors:
            factors[act_order] = factorize(H, config.percdamp, act_order, name=group[0].name)
        return factors[act_order]

    pending: dict[int, list] = {}  # layer -> [(option, solved weight)] to weight at the end

    def record(s, j, res):
        i = idx[j]
        k = choices[i].settings.index(s)
        scale = 1.0 if subsets[j] is None else choices[i].rows / len(subsets[j])
        prof.errors[i][k] = res.error * scale  # measured with H_measure (error_H)
        if fisher is not None:
            pending.setdefault(j, []).append((k, res.weight))

    # grids without pruning that share the other solver options: one sweep for all of them
    # (solve_grids: the rows of a GPTQ sweep never interact, and the per-column cost is shared)
    grids: dict[tuple, list[tuple[LayerSettings, int]]] = {}
    for s, members in buckets.items():
        if s.bits is not None and not s.prunes:
            shared = (s.sym, s.mse, s.act_order, s.static_groups)
            grids.setdefault(shared, []).extend((s, j) for j in members)
            continue
        results = solve_layers(
            [weights[j] for j in members], factor(s.act_order), sparsity=s.sparsity,
            pattern=s.pattern, bits=s.bits, group_size=s.group_size, sym=s.sym, mse=s.mse,
            act_order=s.act_order, static_groups=s.static_groups, block_size=config.block_size,
            names=[group[j].name for j in members], error_H=held_out)
        for j, res in zip(members, results):
            record(s, j, res)
    jobs, nbytes = [], 0
    for shared, members in grids.items():
        # at most GRID_ROWS rows per sweep (more when one layer alone has more)
        batch, rows = [], 0
        for n, (s, j) in enumerate(members):
            batch.append((s, j))
            rows += weights[j].shape[0]
            nxt = weights[members[n + 1][1]].shape[0] if n + 1 < len(members) else None
            if nxt is not None and rows + nxt <= GRID_ROWS:
                continue
            problem = GridProblem([weights[j] for _s, j in batch], factor(shared[2]),
                                  [(s.bits, s.group_size) for s, _j in batch],
                                  [group[j].name for _s, j in batch], held_out)
            key = (weights[0].shape[1], tuple(weights[j].shape[0] for _s, j in batch),
                   tuple((s.bits, s.group_size) for s, _j in batch), shared,
                   config.block_size)

            def done(results, batch=batch):
                for (s, j), res in zip(batch, results):
                    record(s, j, res)
            jobs.append((key, problem, done))
            nbytes += sum(weights[j].numel() * weights[j].element_size() for _s, j in batch)
            batch, rows = [], 0

    def finish():  # the weighted errors: every option of one layer in one product with its Hw
        for j, solved in pending.items():
            i = idx[j]
            scale = 1.0 if subsets[j] is None else choices[i].rows / len(subsets[j])
            per_rows = stacked_row_errors([(weights[j], w) for _k, w in solved],
                                          Hw[group[j].name])
            for (k, _w), per_row in zip(solved, per_rows):
                prof.weighted[i][k] = float((weights_f[j] * per_row).sum()) * scale
    # what the queued sweep keeps alive: the factor and the Hessians the errors are measured with
    cols = weights[0].shape[1]
    item = torch.finfo(H.dtype).bits // 8
    nbytes += cols * cols * item * (2 + (H_measure is not H) + (len(group) if fisher else 0))
    queue.add(jobs, finish, nbytes)



# ---- the sweep with the plan -------------------------------------------------------------------

@dataclass
class BudgetResult:
    """What a budgeted :func:`toolkit.compress` did (``report.budget``): the ``profile`` (pass
    it as ``compress(..., profile=...)`` to try other targets without profiling again), the
    final ``plan``, ``layers`` (one row per budgeted layer: ``layer``, ``block``, ``option``,
    ``bits``, ``sparsity``, ``group_size``, ``planned_bytes``, ``bytes`` (as stored),
    ``profile_error``, ``profile_rel_error``, ``error`` (after the sweep), ``rel_error``),
    ``summary`` (targets, bytes, timings; with ``budget_guard`` the perplexity on the guard
    windows dense, predicted by the plan's preview and measured after the sweep),
    ``replans`` (how often the remaining layers were planned again)."""

    profile: BudgetProfile
    plan: BudgetPlan
    layers: pd.DataFrame
    summary: dict
    replans: int = 0


def _stored_bytes(ref, layout: str, keys) -> float:
    """Bytes of one layer's weight as stored (its record and its weight, zeros counted), the
    settings in ``keys`` with the block strategy (see :attr:`LayerChoices.block_keys`); a slice
    of a fused expert parameter counted on its own."""
    if isinstance(ref, experts.ExpertRef):
        rec = ref.get_record()
        terms, _numel = compressed_weight_bytes(ref.get_weight(), rec, DENSE_BITS, layout,
                                                block_key(rec.settings) in set(keys))
        return float(sum(terms.values()))
    return model_bytes(ref.module, DENSE_BITS, layout, block_keys=keys)["compressed_bytes"]


def budget_sweep(model: nn.Module, ids: torch.Tensor, config: CompressConfig, *, device,
                 profile: BudgetProfile | None = None,
                 verbose: bool = True) -> tuple[list[dict], BudgetResult]:
    """Profile (unless ``profile`` is given), plan and compress ``model`` in place to the
    target of ``config``; returns the report rows and a :class:`BudgetResult`. Every check
    (settings, target range, a reused profile, and with ``budget_guard`` the plan's
    :class:`PlanPreview`) happens before any weight changes; with ``budget_guard`` the
    compressed model's perplexity on the guard windows is checked again after the sweep."""
    check_budget_config(config)
    layout, metric = config.budget_layout, config.budget_metric
    target_size = parse_size(config.target_size) if config.target_size is not None else None
    refs = {r.name: r for _b, r in budgeted_layers(model, config)}
    # OWL's shifts of the pruned options (a dense pre-pass; none to take with a profile given)
    choices, shifts = budget_choices(model, ids, config, layout, device,
                                     allocate=profile is None)
    dense_rest = model_bytes(model, DENSE_BITS, layout)["bytes"] - \
        sum(c.params for c in choices) * DENSE_BITS / 8
    check_target(choices, layout, dense_rest, config.target_bits, target_size)
    if profile is None:
        profile = profile_layers(model, ids, config, device=device, layout=layout,
                                 choices=choices, verbose=verbose)
    else:
        if [c.name for c in profile.layers] != [c.name for c in choices] or \
                profile.key != _fingerprint(model, list(refs.values()), ids, config):
            raise ValueError("the profile was measured on another model, calibration or "
                             "settings than this call's: profile again (profile=None)")
        choices = profile.layers
    scales = calibration = None
    guard_ids = ids[-GUARD_WINDOWS:]
    preview = None  # one PlanPreview for the calibration, the guard and the search
    if config.budget_calibrate or config.budget_guard is not None or config.budget_search:
        preview = PlanPreview(model, guard_ids, profile, refs)
    if config.budget_calibrate:  # the sum's weights per layer kind, from the preview
        calibration = calibrate_scales(preview, profile, layout, metric)
        scales = calibration.scales
    plan = plan_budget(profile, target_bits=config.target_bits, target_size=target_size,
                       layout=layout, metric=metric, scales=scales)
    first = plan
    by_name = {c.name: c for c in choices}
    choice = dict(plan.choice)
    planned = {c.name: c.option_bytes(choice[c.name], layout) for c in choices}

    before = predicted = after = None
    searched = None
    if config.budget_guard is not None or config.budget_search:  # before any weight changes
        predicted = preview.perplexity(plan.choice)
        if config.budget_guard is not None:
            before = preview.dense
            _check_preview(preview, predicted, config, profile, plan, layout, metric, choices,
                           dense_rest)
        if config.budget_search:  # keep a change only when the preview reads them better
            searched = search_plan(preview, profile, plan.choice, plan.budget, layout, metric,
                                   config.budget_search, seed=config.seed,
                                   verbose=config.verbose)
            predicted = searched.history[-1]
            choice = dict(searched.choice)
            planned = {c.name: c.option_bytes(choice[c.name], layout) for c in choices}

    # ---- the sequential sweep, block by block, planning the rest again when bytes moved ----
    t0 = time.perf_counter()
    blocks_name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, device)
    rows: list[dict] = []
    actual: dict[str, float] = {}
    modules: dict[str, object] = {}  # layer name -> its ref, for the bytes as stored
    replans = 0
    bar = tqdm(range(len(blocks)), desc="compressing blocks", unit="block",
               disable=not verbose)
    for b in bar:
        step = [(r, by_name[r.name].settings[choice[r.name]] if r.name in by_name else None)
                for r in experts.find_layers(blocks[b], f"{blocks_name}.{b}",
                                             routers=config.routers)]
        block_rows = sweep_block(blocks[b], b, step, inputs, device=device,
                                 block_size=config.block_size, percdamp=config.percdamp,
                                 hessian_dtype=getattr(torch, config.hessian_dtype),
                                 expert_hessian=config.expert_hessian)
        for r, s in step:
            if s is None:
                continue
            if not s.active:  # left at 16 bits: still one of the budgeted layers
                if isinstance(r, experts.ExpertRef):
                    r.set_record(LayerCompression(settings=s))
                else:
                    r.module.compression = LayerCompression(settings=s)
                w = r.get_weight()
                block_rows.append(dict(layer=r.name, shape=tuple(w.shape), sparsity=0.0,
                                       zeros=float((w == 0).float().mean()), bits=16,
                                       group_size=None, method="-+-", error=0.0,
                                       rel_error=0.0, seconds=0.0, block=b))
            actual[r.name] = _stored_bytes(r, layout, by_name[r.name].block_keys)
            modules[r.name] = r
        rows.extend(block_rows)
        moved = any(abs(actual[r.name] - planned[r.name]) > 1e-6 for r, s in step
                    if s is not None)
        rest = [c.name for c in choices if c.block > b]
        if moved and rest and searched is None:  # a searched plan is kept as it is
            sub = plan_budget(profile, budget=plan.budget - sum(actual.values()),
                              layers=rest, layout=layout, metric=metric, scales=scales)
            choice.update(sub.choice)
            planned.update({n: by_name[n].option_bytes(choice[n], layout) for n in rest})
            replans += 1
    seconds = time.perf_counter() - t0
    # as stored: the block strategy for the settings some layer with a partial group took
    # (a subset of the planned keys, so never more bytes than counted above)
    final_keys = partial_group_keys([(by_name[n].settings[choice[n]], by_name[n].cols)
                                     for n in actual])
    actual = {n: _stored_bytes(m, layout, final_keys) for n, m in modules.items()}
    spent = sum(actual.values())
    if spent > plan.budget + 1e-6:
        raise RuntimeError(f"the budgeted layers take {spent:,.0f} bytes, more than the budget "
                           f"of {plan.budget:,.0f}: a bug in the size prediction, please "
                           f"report it")
    if before is not None:
        after = _guard(model, guard_ids, before, config, choices, choice, dense_rest, layout)
    values = {c.name: [v * (scales or {}).get(c.name, 1.0)
                       for v in option_values(profile, i, metric)]
              for i, c in enumerate(profile.layers)}
    final = BudgetPlan(choice=choice, budget=first.budget, planned=sum(planned.values()),
                       value=sum(values[n][choice[n]] for n in choice),
                       resolution=first.resolution, rounding_bytes=first.rounding_bytes,
                       layout=layout, metric=metric, layers=choices)
    result = _result(profile, final, rows, actual, planned, dense_rest, config, seconds,
                     replans)
    if shifts:
        result.summary["owl sparsity shifts"] = (f"{min(shifts.values()):+.3f} .. "
                                                 f"{max(shifts.values()):+.3f} by block")
    if searched is not None:
        result.summary["budget search"] = searched.line()
    if calibration is not None:
        result.summary["budget calibration"] = calibration.line()
    result.summary.update({"guard perplexity dense": before,
                           "guard perplexity predicted": predicted,
                           "guard perplexity": after})
    return rows, result


#: calibration windows (the last ones) the budget guard measures the perplexity on
GUARD_WINDOWS = 4

#: the most bytes of stand-in errors a :class:`PlanPreview` keeps between its passes
PREVIEW_CACHE_BYTES = 1 << 30


def _stand_in_delta(w: torch.Tensor, s: LayerSettings) -> torch.Tensor:
    """``dW`` (float32, (out, in)) of option ``s``'s quick stand-in: magnitude pruning to its
    sparsity or pattern, then round to nearest on its grid."""
    wf = w.float()
    keep = None
    if s.prunes:
        keep = magnitude_mask(wf, 0.0 if s.pattern is not None else s.sparsity, s.pattern)
    new = (rtn_quantize(wf, s.bits, s.group_size, sym=s.sym, keep=keep)[0]
           if s.bits is not None else apply_mask(wf, keep))
    return new - wf


class PlanPreview:
    """The model as a plan would leave it, predicted before any weight changes.

    Each budgeted layer's output gets ``c * dW x`` added (forward hooks; the weights are not
    touched, but for the slices of fused expert parameters, which have no module of their own,
    and for routers, which choose the experts inside their forward: ``W + c dW`` is written
    into them for the pass and the weights restored bit for bit after it), where ``dW`` is the
    error of the option's quick stand-in (:func:`_stand_in_delta`:
    magnitude pruning and round to nearest) and ``c`` scales it so that the layer's relative
    output error on the guard windows, ``||c dW x||^2 / ||W x||^2``, equals the one the profile
    measured for the shared solver with that option (``errors / energy``, on the held-out
    windows, dense inputs; an option it did not measure, the only one of its layer, keeps the
    stand-in's own error). The per-layer errors are thus the solver's; what the stand-in
    adds is how they compound through the model (attention, normalisation, the layers after),
    which the planner's sum of per-layer errors leaves out and which is what makes large
    perturbations (2-bit layers) break a model. :meth:`perplexity` is that model's perplexity
    on ``ids``; :attr:`dense` the unchanged model's (measured in the first pass).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, profile: BudgetProfile,
                 refs: dict[str, LinearRef]):
        self.model, self.ids, self.profile, self.refs = model, ids, profile, refs
        self.index = {c.name: i for i, c in enumerate(profile.layers)}
        self.rel: dict[tuple[str, int], float] = {}  # (layer, option) -> stand-in rel. error
        self.dense: float | None = None
        self._experts = [r for r in refs.values() if is_expert(r)]
        self._deltas: dict[tuple[str, int], torch.Tensor] = {}
        self._cached = 0

    def _delta(self, n: str, k: int) -> torch.Tensor:
        """The stand-in's ``dW`` of layer ``n`` with option ``k`` (float32), kept for the next
        passes while the kept ones take at most :data:`PREVIEW_CACHE_BYTES`."""
        d = self._deltas.get((n, k))
        if d is None:
            d = _stand_in_delta(self.refs[n].get_weight(),
                                self.profile.layers[self.index[n]].settings[k])
            if self._cached + d.numel() * d.element_size() <= PREVIEW_CACHE_BYTES:
                self._deltas[(n, k)] = d
                self._cached += d.numel() * d.element_size()
        return d

    def _ppl(self, install, writes: list | None = None) -> float:
        """Perplexity with the hooks ``install()`` returns in place (removed after) and each
        ``(layer, new weight)`` of ``writes`` written into the layer (restored after, bit for
        bit); fused experts run their eager loop so that the hooks see each expert's inputs."""
        saved, hooks = [], []
        try:
            with expert_capture.calibrating(self.model, self._experts):
                hooks = install()
                for ref, new in writes or ():
                    saved.append((ref, ref.get_weight().clone()))
                    ref.set_weight(new)
                return perplexity(self.model, None, self.ids, seqlen=self.ids.shape[1],
                                  verbose=False)
        finally:
            for h in hooks:
                h.remove()
            for ref, old in reversed(saved):
                ref.set_weight(old)

    def _measure(self, choice: dict[str, int]) -> None:
        """The stand-in's relative error of every (layer, option) of ``choice`` not yet known,
        on the unchanged model (one forward pass, which also gives :attr:`dense`)."""
        need = {n: k for n, k in choice.items() if (n, k) not in self.rel
                and self.profile.layers[self.index[n]].settings[k].active}
        if not need and self.dense is not None:
            return
        sums = {n: [0.0, 0.0] for n in need}

        def install():
            hooks = []
            for n, k in need.items():
                ref = self.refs[n]

                def hook(x, ref=ref, n=n, k=k, acc=sums[n]):
                    w = ref.get_weight()
                    d = self._delta(n, k).to(x.dtype)
                    acc[0] += float(nn.functional.linear(x, d).float().pow(2).sum())
                    acc[1] += float(nn.functional.linear(x, w.to(x.dtype)).float().pow(2).sum())

                hooks.append(expert_capture.watch(ref, hook))
            return hooks

        dense = self._ppl(install)
        if self.dense is None:
            self.dense = dense
        for n, k in need.items():
            d, e = sums[n]
            self.rel[(n, k)] = d / e if e > 0 else 0.0

    def perplexity(self, choice: dict[str, int]) -> float:
        """Perplexity on ``ids`` of the model as ``choice`` (layer -> option) would leave it."""
        self._measure(choice)
        hooks, writes = [], []
        for n, k in choice.items():
            i = self.index[n]
            if not self.profile.layers[i].settings[k].active or self.rel[(n, k)] <= 0:
                continue
            en = self.profile.energy[i]
            want = self.profile.errors[i][k] / en if en > 0 else 0.0
            # an option the profile did not measure (a layer with one option): the stand-in's
            # own error, round to nearest, which the solver's does not exceed in practice
            c = math.sqrt(max(want, 0.0) / self.rel[(n, k)]) if math.isfinite(want) else 1.0
            ref = self.refs[n]
            if isinstance(ref, experts.ExpertRef) or not (
                    isinstance(ref.module, nn.Linear) or is_conv1d(ref.module)):
                # no module of its own (a fused slice), or one whose output is not W x (a
                # router that chooses the experts inside its forward): W + c dW in place
                w = ref.get_weight()
                writes.append((ref, (w.float() + c * self._delta(n, k)).to(w.dtype)))
                continue

            def hook(_m, args, out, n=n, k=k, c=c):
                x = args[0]
                d = (self._delta(n, k) * c).to(x.dtype)
                return out + nn.functional.linear(x, d).to(out.dtype)

            hooks.append(ref.module.register_forward_hook(hook))
        return self._ppl(lambda: hooks, writes)


@dataclass
class SearchResult:
    """What :func:`search_plan` did: the plan it ends with (``choice``), the guard perplexity
    of the best plan after each step (``history[0]``: the knapsack's plan), how many changes
    it kept, and its wall time."""

    choice: dict[str, int]
    history: list[float]
    kept: int
    steps: int
    seconds: float

    def line(self) -> str:
        return (f"{self.steps} steps, {self.kept} changes kept, preview perplexity "
                f"{self.history[0]:.4g} -> {self.history[-1]:.4g}, {self.seconds:.1f}s")


def search_plan(preview: PlanPreview, profile: BudgetProfile, choice: dict[str, int],
                budget: float, layout: str, metric: str, steps: int, *, seed: int = 0,
                verbose: bool = False) -> SearchResult:
    """A local search from a plan (``choice``), with the plan's preview as the measure
    (after EvoPress, which searches per-layer levels with the model's own loss): each step
    moves one layer, drawn at random, to its next larger option on its :func:`frontier`, pays
    for it by moving other layers, drawn at random, one option down each until the plan fits
    ``budget`` again, and keeps the change only when the preview's perplexity on its windows
    drops. The knapsack's sum of per-layer errors leaves out how errors compound through the
    model; the preview does not. ``steps`` forward passes over the preview's windows (the first
    one's stand-ins are computed once and kept while they fit in :data:`PREVIEW_CACHE_BYTES`)."""
    t0 = time.perf_counter()
    rng = random.Random(seed)
    index = {c.name: i for i, c in enumerate(profile.layers)}
    names = list(choice)
    fronts = {n: frontier(profile, index[n], layout, metric) for n in names}
    pos = {n: [k for _b, _v, k in fronts[n]].index(choice[n]) for n in names}
    used = sum(fronts[n][pos[n]][0] for n in names)
    best = preview.perplexity(choice)
    history, kept = [best], 0
    bar = tqdm(range(steps), desc="budget search", unit="step", disable=not verbose)
    for _ in bar:
        ups = [n for n in names if pos[n] + 1 < len(fronts[n])]
        if not ups:
            break
        up = rng.choice(ups)
        new = {up: pos[up] + 1}
        need = used - budget + fronts[up][pos[up] + 1][0] - fronts[up][pos[up]][0]
        payers = [n for n in names if n != up and pos[n] > 0]
        rng.shuffle(payers)
        for n in payers:
            if need <= 1e-6:
                break
            new[n] = pos[n] - 1
            need -= fronts[n][pos[n]][0] - fronts[n][pos[n] - 1][0]
        if need > 1e-6:
            history.append(best)
            continue  # nothing left to pay with
        trial = {n: fronts[n][new.get(n, pos[n])][2] for n in names}
        ppl = preview.perplexity(trial)
        if math.isfinite(ppl) and ppl < best:
            pos.update(new)
            used = sum(fronts[n][pos[n]][0] for n in names)
            best, kept = ppl, kept + 1
        history.append(best)
        bar.set_postfix(perplexity=f"{best:.4g}", kept=kept)
    return SearchResult(choice={n: fronts[n][pos[n]][2] for n in names}, history=history,
                        kept=kept, steps=steps, seconds=time.perf_counter() - t0)


def layer_kind(name: str) -> str:
    """The kind of a budgeted layer: the last part of its name (``q_proj``, ``down_proj``; an
    expert's matrices are of the kind of the same projection)."""
    return name.rsplit(".", 1)[-1]


@dataclass
class Calibration:
    """What :func:`calibrate_scales` measured: ``scales`` (layer -> factor on its values),
    ``kinds`` (kind -> ``(measured loss increase, predicted sum, factor)``), ``seconds``."""

    scales: dict[str, float]
    kinds: dict[str, tuple[float, float, float]]
    seconds: float

    def line(self) -> str:
        return ", ".join(f"{k} x{f:.3g}" for k, (_m, _p, f) in self.kinds.items()) + \
            f" ({self.seconds:.1f}s)"


def calibrate_scales(preview: PlanPreview, profile: BudgetProfile, layout: str,
                     metric: str) -> Calibration:
    """One weight per layer kind for the planner's sum, calibrated on the model's own loss (as
    HIGGS calibrates the per-layer weights of its sum): for each kind, every layer of that kind
    takes its cheapest option of 3 bits or more on its :func:`frontier` (the largest error the
    plans mostly use) and every other layer its largest option; the preview's increase of the
    log-perplexity over the all-largest plan, divided by the summed values the planner predicts
    for those options, is the kind's factor (where either is not positive: the median factor
    of the other kinds, 1 without any). ``1 + kinds`` preview passes."""
    t0 = time.perf_counter()
    index = {c.name: i for i, c in enumerate(profile.layers)}
    fronts = {c.name: frontier(profile, i, layout, metric) for i, c in enumerate(profile.layers)}
    top = {n: f[-1][2] for n, f in fronts.items()}
    base = math.log(preview.perplexity(top))
    kinds: dict[str, tuple[float, float, float]] = {}
    by_kind: dict[str, list[str]] = {}
    for n in fronts:
        by_kind.setdefault(layer_kind(n), []).append(n)
    for kind, names in by_kind.items():
        choice, predicted = dict(top), 0.0
        for n in names:
            c = profile.layers[index[n]]
            low = [(b, v, k) for b, v, k in fronts[n] if (c.settings[k].bits or 16) >= 3]
            if not low:
                continue
            _b, v, k = low[0]
            choice[n] = k
            predicted += v - fronts[n][-1][1]
        measured = math.log(preview.perplexity(choice)) - base
        f = measured / predicted if predicted > 0 and measured > 0 and \
            math.isfinite(measured) else math.nan
        kinds[kind] = (measured, predicted, f)
    valid = sorted(f for _m, _p, f in kinds.values() if math.isfinite(f))
    typical = valid[len(valid) // 2] if valid else 1.0  # for a kind that gave no factor
    kinds = {k: (m, p, f if math.isfinite(f) else typical) for k, (m, p, f) in kinds.items()}
    scales = {n: kinds[layer_kind(n)][2] for n in fronts}
    return Calibration(scales=scales, kinds=kinds, seconds=time.perf_counter() - t0)


def _sane_target(preview: PlanPreview, profile: BudgetProfile, layout: str, metric: str,
                 budget: float, limit: float, steps: int = 8) -> tuple[float, float]:
    """The smallest budget (bytes) above ``budget`` whose plan's preview stays within ``limit``
    times the dense perplexity, by bisection (``steps`` halvings of the range up to the largest
    size the menu reaches, whose plan is the dense model); returns ``(bytes, preview ratio)``."""
    _lo, hi = budget_range(profile.layers, layout)
    plan = plan_budget(profile, budget=hi, layout=layout, metric=metric)
    best_ratio = preview.perplexity(plan.choice) / preview.dense
    if not (math.isfinite(best_ratio) and best_ratio <= limit):
        return math.inf, best_ratio
    lo, best = budget, hi
    for _ in range(steps):
        mid = (lo + best) / 2
        plan = plan_budget(profile, budget=mid, layout=layout, metric=metric)
        ratio = preview.perplexity(plan.choice) / preview.dense
        if math.isfinite(ratio) and ratio <= limit:
            best, best_ratio = mid, ratio
        else:
            lo = mid
    return best, best_ratio


class BudgetCollapseError(ValueError):
    """A size target whose plan broke the model (``budget_guard``)."""


def _target_text(config) -> str:
    return (f"target_bits={config.target_bits:g}" if config.target_bits is not None
            else f"target_size={config.target_size!r}")


def _check_preview(preview, predicted, config, profile, plan, layout, metric, choices,
                   dense_rest) -> None:
    """Raise :class:`BudgetCollapseError` before the sweep when the plan's preview exceeds
    ``budget_guard`` times the dense perplexity, naming the smallest target whose plan's
    preview stays within it."""
    ratio = predicted / preview.dense
    if math.isfinite(ratio) and ratio <= config.budget_guard:
        log.info("budget guard: plan predicted to take the perplexity %.2f -> %.2f on %d "
                 "calibration windows (%.2fx, limit %gx)", preview.dense, predicted,
                 len(preview.ids), ratio, config.budget_guard)
        return
    sane, sane_ratio = _sane_target(preview, profile, layout, metric, plan.budget,
                                    config.budget_guard)
    params = sum(c.params for c in choices)
    low = sum((c.settings[plan.choice[c.name]].bits or 16) <= 2 for c in choices)
    if not math.isfinite(sane):
        hint = (f"even the largest size this menu reaches is predicted at {sane_ratio:.3g}x: "
                f"add larger options to budget_menu")
    elif config.target_bits is not None:
        hint = (f"the smallest target predicted to stay within it is target_bits >= "
                f"{math.ceil(800 * sane / params) / 100:.2f} (predicted {sane_ratio:.3g}x)")
    else:
        hint = (f"the smallest target predicted to stay within it is target_size >= "
                f"{math.ceil((dense_rest + sane) / 1e5) / 10:.1f}MB (predicted "
                f"{sane_ratio:.3g}x)")
    raise BudgetCollapseError(
        f"{_target_text(config)}: the plan is predicted to break the model: with each layer's "
        f"profiled error in place its perplexity on the last {len(preview.ids)} calibration "
        f"windows is {predicted:.4g} against {preview.dense:.4g} dense ({ratio:.3g}x, more "
        f"than budget_guard={config.budget_guard:g}x; {low} of {len(choices)} layers planned "
        f"at 2 bits). No weight was changed; {hint}. Pass budget_guard=None (--budget-guard "
        f"none) to compress to this target anyway")


def _guard(model, guard_ids, before, config, choices, choice, dense_rest, layout):
    """Raise :class:`BudgetCollapseError` when the compressed model's perplexity on
    ``guard_ids`` exceeds ``config.budget_guard`` times the dense model's (``before``);
    return that perplexity otherwise."""
    after = perplexity(model, None, guard_ids, seqlen=guard_ids.shape[1], verbose=False)
    ratio = after / before
    if math.isfinite(ratio) and ratio <= config.budget_guard:
        log.info("budget guard: perplexity %.2f -> %.2f on %d calibration windows (%.2fx, "
                 "limit %gx)", before, after, len(guard_ids), ratio, config.budget_guard)
        return after
    low = [c for c in choices if (c.settings[choice[c.name]].bits or 16) <= 2]
    # the smallest budget at which every layer can keep 3 bits or more (a hint, not a promise)
    floor = sum(min(c.option_bytes(k, layout) for k, st in enumerate(c.settings)
                    if (st.bits or 16) >= 3) for c in choices)
    params = sum(c.params for c in choices)
    target = _target_text(config)
    hint = (f"target_bits >= {8 * floor / params:.2f}" if config.target_bits is not None
            else f"target_size >= {(dense_rest + floor) / 1e6:.1f}MB")
    raise BudgetCollapseError(
        f"{target}: the plan broke the model: perplexity on the last {len(guard_ids)} "
        f"calibration windows {after:.4g} after compression against {before:.4g} before "
        f"({ratio:.3g}x, more than budget_guard={config.budget_guard:g}x); {len(low)} of "
        f"{len(choices)} layers were planned at 2 bits, whose error the per-layer profile "
        f"underrates. The model was compressed in place: reload it before using it. A larger "
        f"target keeps the model usable ({hint} lets every layer keep 3 bits or more), or "
        f"pass budget_guard=None (--budget-guard none) to keep such a model anyway")


def _result(profile, plan, rows, actual, planned, dense_rest, config, seconds,
            replans) -> BudgetResult:
    index = {c.name: i for i, c in enumerate(profile.layers)}
    swept = {r["layer"]: r for r in rows}
    table = []
    for c in plan.layers:
        i, k = index[c.name], plan.choice[c.name]
        s = c.settings[k]
        en = profile.energy[i]
        table.append(dict(
            layer=c.name, block=c.block, option=c.specs[k],
            sparsity=(1 - s.pattern[0] / s.pattern[1]) if s.pattern else s.sparsity,
            bits=s.bits or 16, group_size=s.group_size if s.bits else None,
            planned_bytes=planned[c.name], bytes=actual[c.name],
            profile_error=profile.errors[i][k],
            profile_rel_error=profile.errors[i][k] / en if en > 0 else 0.0,
            error=swept.get(c.name, {}).get("error", math.nan),
            rel_error=swept.get(c.name, {}).get("rel_error", math.nan)))
    layers = pd.DataFrame(table)
    params = sum(c.params for c in plan.layers)
    spent = sum(actual.values())
    if config.target_bits is not None:
        target = f"{config.target_bits:g} bits/weight"
    else:
        target = f"{parse_size(config.target_size):,} bytes"
    summary = {
        "budget target": target,
        "budget layout": plan.layout,
        "budget metric": plan.metric,
        "budgeted layers": len(plan.layers),
        "budget bytes (layers)": plan.budget,
        "bytes (budgeted layers)": spent,
        "budget used": spent / plan.budget if plan.budget > 0 else math.nan,
        "bits/weight (budgeted)": 8 * spent / params,
        "checkpoint bytes": dense_rest + spent,
        "options chosen": ", ".join(f"{k} x{v}" for k, v in plan.counts().items()),
        "menu": ",".join(dict.fromkeys(s for c in plan.layers for s in c.specs)),
        "profile seconds": profile.seconds,
        "profile rows": profile.rows_fraction,
        "profile holdout windows": profile.holdout,
        "budget sweep seconds": seconds,
        "replans": replans,
    }
    return BudgetResult(profile=profile, plan=plan, layers=layers, summary=summary,
                        replans=replans)
