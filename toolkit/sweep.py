"""The block-by-block sweep over a decoder-only model.

    calibration ids --embed--> inputs of block 0 (+ every keyword the blocks need)
    for each block, on the compute device:
        probe once: which linear layers read the same input tensor -> groups, in forward order
        for each group: hook it, run the block on the calibration inputs (stopping as soon as
            the group's input is seen), one Hessian, solve every layer of the group
        run the block again -> inputs of the next block
        move the block back

Each group sees the inputs produced by the already-compressed earlier groups of its block.
Only one block and the calibration activations live on the device at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from . import experts
from .baselines import apply_mask, magnitude_mask, wanda_mask
from .hessian import HessianAccumulator, reconstruction_error
from .models import LinearRef, find_blocks
from .options import LayerSettings
from .quant import rtn_quantize
from .records import LayerCompression
from .refine import masked_results, refine_layers
from .solver import factorize, solve_layers

__all__ = ["run_sweep", "sweep_block", "capture_block_inputs", "find_groups", "group_hessian",
           "run_block", "BlockInputs"]

log = logging.getLogger("toolkit")


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class BlockInputs:
    """Hidden states of every calibration sample, plus the arguments every block call shares."""

    hidden: list[torch.Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                         device) -> BlockInputs:
    """Run the model up to block 0 for each calibration sample and keep block 0's inputs.

    The extra arguments (attention mask, rotary embeddings, positions...) are taken from the
    first sample: all samples have the same length and no padding, so they are the same for all.
    """
    hidden, extra = [], {}

    def hook(_module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        hidden.append(h.to(device))
        if not extra:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            extra["args"] = _to(args[1:], device)
            extra["kwargs"] = _to(rest, device)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    embed_device = next(model.parameters()).device
    try:
        for row in ids:
            try:
                model(row[None].to(embed_device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs = extra["kwargs"]
    return BlockInputs(hidden=hidden, args=extra["args"], kwargs=kwargs)


def run_block(block: nn.Module, inputs: BlockInputs, h: torch.Tensor) -> torch.Tensor:
    """The block's output hidden states for the input ``h`` (with the shared arguments)."""
    out = block(h, *inputs.args, **inputs.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_key(x: torch.Tensor):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


@torch.no_grad()
def find_groups(block: nn.Module, layers: list[LinearRef], inputs: BlockInputs) -> list[list[LinearRef]]:
    """Group the layers that read the same input tensor, in the order the block calls them.

    Runs the block once on the first calibration sample. Layers the block never calls are left
    out (and logged).
    """
    order: list[tuple] = []
    members: dict[tuple, list[LinearRef]] = {}
    handles = []
    seen = set()
    alive = []  # hold every input so no address is reused by a later tensor during the probe

    def make_hook(ref):
        def hook(x):  # MoE: experts.watch also sees the slices of fused expert parameters
            if id(ref) in seen:
                return
            seen.add(id(ref))
            alive.append(x)
            key = _input_key(x)
            if key not in members:
                members[key] = []
                order.append(key)
            members[key].append(ref)
        return hook

    for ref in layers:
        handles.append(experts.watch(ref, make_hook(ref)))
    try:
        run_block(block, inputs, inputs.hidden[0])
    finally:
        for h in handles:
            h.remove()
    groups = [members[k] for k in order]
    # MoE: experts that got no token in the probe window are grouped like those that did
    groups = experts.complete_groups(groups, layers, seen)
    seen.update(id(r) for g in groups for r in g)
    unused = [r.name for r in layers if id(r) not in seen]
    if unused:
        log.warning("layers never called by their block, left unchanged: %s", ", ".join(unused))
    return groups


@torch.no_grad()
def group_hessian(block: nn.Module, group: list[LinearRef], inputs: BlockInputs,
                   dtype: torch.dtype) -> HessianAccumulator:
    """One Hessian for the group's shared input, over all calibration samples (each forward
    stops as soon as the group's input is seen)."""
    acc = HessianAccumulator(group[0].in_features, device=inputs.hidden[0].device, dtype=dtype,
                             name=group[0].name)

    def hook(_m, args):
        acc.add(args[0])
        raise _Stop

    handles = [ref.module.register_forward_pre_hook(hook) for ref in group]
    try:
        for h in inputs.hidden:
            try:
                run_block(block, inputs, h)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    dist.all_reduce_hessian(acc)  # no-op without a process group
    return acc


def _solve_group(group: list[LinearRef], settings: list[LayerSettings], H: torch.Tensor | None,
                 block_size: int, percdamp: float, device) -> list[dict]:
    """Compress the layers of one group (sharing H); returns one report row per layer.

    ``H`` is None when no layer of the group needs it (magnitude / round-to-nearest): the
    layers are then compressed without calibration and their error is reported as NaN.
    """
    rows = []
    factors = {}
    # layers with identical settings are stacked and solved in one sweep
    buckets: dict[LayerSettings, list[int]] = {}
    for i, s in enumerate(settings):
        if s.active:
            buckets.setdefault(s, []).append(i)
    for s, idx in buckets.items():
        refs = [group[i] for i in idx]
        t0 = time.perf_counter()
        weights = [r.get_weight().to(device=device) for r in refs]
        originals = [w.float().clone() for w in weights]
        masks = None
        if s.prunes and s.method != "sparsegpt":
            if s.method == "magnitude":
                masks = [magnitude_mask(w, s.sparsity, s.pattern) for w in weights]
            else:
                masks = [wanda_mask(w, H, s.sparsity, s.pattern) for w in weights]
            weights = [apply_mask(w, m) for w, m in zip(weights, masks)]
        use_solver = (s.bits is not None and s.quant == "gptq") or (
            s.prunes and s.method == "sparsegpt")
        results = None
        if use_solver:
            if s.act_order not in factors:
                factors[s.act_order] = factorize(H, percdamp, s.act_order, name=refs[0].name)
            solver_bits = s.bits if s.quant == "gptq" else None
            if masks is not None:
                results = solve_layers(weights, factors[s.act_order], bits=solver_bits,
                                       group_size=s.group_size, sym=s.sym, mse=s.mse,
                                       act_order=s.act_order, static_groups=s.static_groups,
                                       block_size=block_size, names=[r.name for r in refs],
                                       masks=masks)
            else:
                results = solve_layers(weights, factors[s.act_order], sparsity=s.sparsity,
                                       pattern=s.pattern, bits=solver_bits,
                                       group_size=s.group_size, sym=s.sym, mse=s.mse,
                                       act_order=s.act_order, static_groups=s.static_groups,
                                       block_size=block_size, names=[r.name for r in refs])
            weights = [r.weight for r in results]
            if masks is None and results[0].mask is not None:
                masks = [r.mask for r in results]
        if s.refine_iters and masks is not None and H is not None:
            results = refine_layers(
                originals, results or masked_results(weights, masks), factors.get(s.act_order, H),
                iters=s.refine_iters, bits=s.bits if s.quant == "gptq" else None,
                group_size=s.group_size, sym=s.sym, mse=s.mse, act_order=s.act_order,
                static_groups=s.static_groups, block_size=block_size, percdamp=percdamp,
                names=[r.name for r in refs])
            weights = [r.weight for r in results]
        for j, (ref, w) in enumerate(zip(refs, weights)):
            comp = LayerCompression(settings=s)
            if s.bits is not None:
                if results is not None and results[j].scale is not None:
                    comp.scale, comp.zero = results[j].scale.cpu(), results[j].zero.cpu()
                    if s.act_order:
                        comp.g_idx = results[j].g_idx.cpu()
                else:  # round to nearest on the same grid, keeping the mask
                    keep = masks[j] if masks is not None else None
                    w, _codes, sc, zp = rtn_quantize(w, s.bits, s.group_size, s.sym, s.mse, keep)
                    comp.scale, comp.zero = sc.cpu(), zp.cpu()
            ref.set_weight(w)  # copy_ moves it to the parameter's device
            new = ref.get_weight().to(device=device, dtype=torch.float32)
            if H is not None:
                orig = originals[j].to(H.device)
                comp.error = reconstruction_error(orig, new.to(H.device), H)
                energy = reconstruction_error(orig, torch.zeros_like(orig), H)
                rel_error = comp.error / energy if energy > 0 else 0.0
            else:
                comp.error = rel_error = float("nan")
            pruned = int((~masks[j]).sum()) if masks is not None else 0
            comp.sparsity = pruned / new.numel()
            ref.set_record(comp)  # module.compression, or the experts module's dict (MoE)
            rows.append(dict(
                layer=ref.name, shape=tuple(new.shape), sparsity=comp.sparsity,
                zeros=float((new == 0).float().mean()),
                bits=s.bits if s.bits is not None else 16,
                group_size=s.group_size if s.bits is not None else None,
                method=(s.method if s.prunes else "-") + "+" + (s.quant if s.bits else "-"),
                error=comp.error,
                rel_error=rel_error,
                seconds=(time.perf_counter() - t0) / len(refs),
            ))
    return rows


def sweep_block(block: nn.Module, b: int, plan: list, inputs: BlockInputs | None, *, device,
                block_size: int = 128, percdamp: float = 0.01,
                hessian_dtype: torch.dtype = torch.float32,
                expert_hessian: str = "routed") -> list[dict]:
    """One step of the sweep: compress block ``b`` in place and advance ``inputs`` to the next
    block's inputs. Returns the block's report rows.

    ``plan``: ``[(layer, LayerSettings | None), ...]`` for the block's layers
    (:func:`toolkit.experts.find_layers`: linear layers and expert slices); ``inputs``: the
    block's inputs (None when no layer needs calibration); ``expert_hessian``: ``"routed"`` or
    ``"all"`` (see :mod:`toolkit.experts`). The block is moved to ``device`` for the step and
    back where it was. :func:`run_sweep` calls this for every block; :mod:`toolkit.stream` calls
    it on blocks loaded one at a time from disk.
    """
    calibrate = inputs is not None
    rows: list[dict] = []
    home = next(block.parameters()).device
    block.to(device)
    chosen = {id(r): s for r, s in plan}
    selected = [r for r, s in plan if s is not None and s.active]
    # MoE (toolkit.experts): eager experts whose per-expert inputs reach experts.watch; the
    # groups of all experts playing one part form a phase whose Hessians take one pass
    with experts.calibrating(block, selected if calibrate else [],
                             all_tokens=expert_hessian == "all") as calib:
        groups = []
        if selected:
            groups = find_groups(block, selected, inputs) if calibrate else [[r] for r in selected]
        itemsize = torch.finfo(hessian_dtype).bits // 8  # phases sized to the memory at hand
        for phase in experts.phases(groups, experts.hessian_budget(device), itemsize):
            need = calibrate and any(chosen[id(r)].needs_hessian for g in phase for r in g)
            if not need:
                found = [(None, None, None)] * len(phase)
            elif experts.is_expert(phase[0][0]):
                found = experts.phase_hessians(phase, inputs.hidden,
                                               lambda h: run_block(block, inputs, h), calib,
                                               hessian_dtype, inputs.hidden[0].device)
            else:
                acc = group_hessian(block, phase[0], inputs, hessian_dtype)
                found = [(acc.H, acc.nsamples, None)]
            for i, group in enumerate(phase):
                (H, tokens, source), found[i] = found[i], None  # each H freed once solved
                new_rows = dist.solve_group(_solve_group, group, [chosen[id(r)] for r in group],
                                            H, block_size, percdamp, device)
                for r in new_rows:
                    r["block"] = b
                    # MoE: the tokens routed to each expert ({layer: n}), where its H came from
                    r["tokens"] = tokens.get(r["layer"]) if isinstance(tokens, dict) else tokens
                    r["hessian"] = source
                    log.info("%s: error %.4g, sparsity %.3f, %.2fs", r["layer"], r["error"],
                             r["sparsity"], r["seconds"])
                rows.extend(new_rows)
                del H
    if calibrate:
        with torch.no_grad():
            inputs.hidden = [run_block(block, inputs, h) for h in inputs.hidden]
    block.to(home)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_sweep(model: nn.Module, ids: torch.Tensor, layer_settings, *, device, block_size: int = 128,
              percdamp: float = 0.01, hessian_dtype: torch.dtype = torch.float32,
              verbose: bool = True, blocks_name: str | None = None,
              expert_hessian: str = "routed", routers: bool = False) -> list[dict]:
    """Compress every selected layer of every block, in place. Returns report rows.

    ``layer_settings(name) -> LayerSettings | None`` chooses what to do to each layer. The
    layers are the linear layers and the experts' matrices (:func:`toolkit.experts.find_layers`;
    the MoE routers only with ``routers``); a weight of the blocks that is none of these and not
    ignored raises :class:`toolkit.experts.UnsupportedWeights` before anything changes.
    """
    name, blocks = find_blocks(model)
    experts.check_layers(name, blocks, layer_settings, routers=routers)
    plan = [[(r, layer_settings(r.name))
             for r in experts.find_layers(blk, prefix=f"{name}.{b}", routers=routers)]
            for b, blk in enumerate(blocks)]
    calibrate = any(s is not None and s.active and s.needs_hessian for p in plan for _, s in p)
    # with a process group each rank runs only its share of the windows (toolkit.distributed)
    inputs = capture_block_inputs(model, blocks, dist.local_share(ids), device) \
        if calibrate else None
    rows: list[dict] = []
    bar = tqdm(range(len(blocks)), desc="compressing blocks", unit="block", disable=not verbose)
    for b in bar:
        rows.extend(sweep_block(blocks[b], b, plan[b], inputs, device=device,
                                block_size=block_size, percdamp=percdamp,
                                hessian_dtype=hessian_dtype, expert_hessian=expert_hessian))
    return rows
