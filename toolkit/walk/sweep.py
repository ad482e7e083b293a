"""The block-by-block sweep over a decoder-only model.

    calibration ids --embed--> inputs of block 0 (+ every keyword the blocks need, for each
                               batch size the sweep may use)
    for each block, on the compute device:
        probe once (one window): which linear layers read the same input tensor -> groups, in
            forward order; the tree of module calls; the activation bytes of one window
        sequential schedule (the default):
            if the activations of all windows fit the budget: ONE forward of all windows; at
                each group's input (a pre-hook) -> its Hessian, solve the group's layers, and
                the forward goes on through the solved layers -> inputs of the next block
            else, for each group: a pass of the windows, in batches, stopping at the group's
                input -> its Hessian -> solve; then a last pass -> inputs of the next block
        parallel schedule: one pass of the unchanged block -> every group's Hessian; solve all;
            a last pass -> inputs of the next block
        move the block back

Each group sees the inputs produced by the already-compressed earlier groups of its block (in
the sequential schedule). Only one block and the calibration activations live on the device at
a time.

Fewer, cheaper passes. The old walk re-ran the block from its input up to each group, then once
more in full: about 2.4 block passes of linear-layer work for a LLaMA block. The one-forward
mode does one pass. When the windows do not fit at once, the passes reuse what earlier passes
computed: a module's output is *final* once every linear layer called before it returns (the
ones inside it included) is solved, so later passes would compute it again bit for bit. The
sweep keeps such outputs, within the budget, and a later pass takes them instead of calling the
module (q/k/v computed once; the whole attention once o_proj is solved): about one block pass
plus the attention once more. Nothing is model specific: the probe finds the modules and the
order of their calls, and every pass checks that the calls follow that order and that no kept
output was changed in place (if not, the sweep computes everything from there on, as before).
Batches are powers of two (or all windows); :func:`sweep_memory` states the budget. Kept
outputs are bit-for-bit what recomputing gives; the batch size changes results only through
float rounding, and it depends on the block and the budget alone, so a run is reproducible for
a given thread count.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from toolkit.config.options import LayerSettings
from toolkit.config.records import LayerCompression
from toolkit.model import experts
from toolkit.model.layers import LinearRef, find_blocks, find_linears
from toolkit.solver.baselines import apply_mask, magnitude_mask, wanda_mask
from toolkit.solver.gguf_grids import gguf_rtn, gguf_type
from toolkit.solver.hessian import HessianAccumulator, quadratic_form, reconstruction_error
from toolkit.solver.layer import factorize, solve_layers
from toolkit.solver.quant import rtn_quantize
from toolkit.solver.refine import masked_results, refine_layers
from toolkit.solver.targets import CrossAccumulator, asymmetric_target
from toolkit.walk import distributed as dist
from toolkit.walk import expert_capture
from toolkit.walk.reconstruct import reconstruct_block
from toolkit.walk.reference import Reference

__all__ = ["run_sweep", "sweep_block", "capture_block_inputs", "find_groups", "group_hessian",
           "run_block", "BlockInputs", "sweep_memory", "SCHEDULES", "CPU_SWEEP_MEMORY_MB",
           "Reference"]

log = logging.getLogger("toolkit")

SCHEDULES = ("sequential", "parallel")
#: the sweep's working memory on the CPU (``sweep_memory_mb=None``); on CUDA a quarter of the GPU
CPU_SWEEP_MEMORY_MB = 1024


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


class _Deviation(Exception):
    """A pass called the block's modules in another order than the probe saw."""


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _tensors(obj):
    """Every tensor inside ``obj`` (tensors, tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _plain(obj) -> bool:
    """True when ``obj`` is made of tensors, None, numbers, strings, tuples, lists and dicts
    only: an output the sweep may keep and hand back later."""
    if obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(obj, (tuple, list)):
        return all(_plain(o) for o in obj)
    if isinstance(obj, dict):
        return all(_plain(o) for o in obj.values())
    return False


def _nbytes(obj) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def sweep_memory(device, mb: int | None = None) -> int:
    """Bytes the sweep may use on ``device`` besides the block, its Hessians and the calibration
    activations (option ``sweep_memory_mb``; None: a quarter of the GPU's total memory on CUDA,
    :data:`CPU_SWEEP_MEMORY_MB` MiB elsewhere).

    If the activations of every window at once fit in it, each block is one forward of all
    windows; otherwise a quarter of it bounds the activations of a batch and the rest the
    outputs kept between passes. The activations of a window are estimated from the block's
    own outputs (every distinct tensor its modules return, measured by the probe). The budget
    depends on the device's total memory, never on what is free, so a run is reproducible."""
    if mb is not None:
        return int(mb) << 20
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory // 4
    return CPU_SWEEP_MEMORY_MB << 20


@dataclass
class BlockInputs:
    """Hidden states of every calibration sample, plus the arguments every block call shares.

    ``hidden``: one tensor (1 x seqlen x hidden) per window. ``args``/``kwargs``: the shared
    arguments for one window; ``batched[k]``: ``(args, kwargs)`` for a batch of ``k`` windows
    (the model builds them itself, e.g. attention masks or ALiBi biases of batch size k).
    """

    hidden: list[torch.Tensor]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    batched: dict = field(default_factory=dict)

    def shared(self, k: int) -> tuple[tuple, dict]:
        """The shared ``(args, kwargs)`` for a batch of ``k`` windows."""
        if k == 1:
            return self.args, self.kwargs
        if k not in self.batched:
            raise ValueError(f"no block arguments were captured for batches of {k} windows "
                             f"(captured: 1, {', '.join(map(str, sorted(self.batched)))})")
        return self.batched[k]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                         device, memory_mb: int | None = None) -> BlockInputs:
    """Run the model up to block 0 for each calibration sample and keep block 0's inputs.

    The extra arguments (attention mask, rotary embeddings, positions...) are taken from the
    first sample: all samples have the same length and no padding, so they are the same for all.
    For batches, the model is run once more on the first ``k`` windows for ``k = 2, 4, 8, ...``
    below the number of windows and for all of them (while those arguments take less than a
    sixteenth of :func:`sweep_memory`, ``memory_mb`` as there) to keep the arguments it builds
    for a batch of ``k``.
    """
    hidden, extra = [], {}

    def hook(_module, args, kwargs):
        if extra.get("want_hidden"):
            h = args[0] if args else kwargs["hidden_states"]
            hidden.append(h.to(device))
        if "kwargs" not in extra:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            extra["args"] = _to(args[1:], device)
            extra["kwargs"] = _to(rest, device)
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    embed_device = next(model.parameters()).device
    batched = {}
    try:
        extra["want_hidden"] = True
        for row in ids:
            try:
                model(row[None].to(embed_device), use_cache=False)
            except _Stop:
                pass
        args1, kwargs1 = extra.pop("args"), extra.pop("kwargs")
        extra["want_hidden"] = False
        limit = sweep_memory(device, memory_mb) // 16
        sizes = [k for k in (2 ** i for i in range(1, len(ids).bit_length())) if k < len(ids)]
        for k in sizes + ([len(ids)] if len(ids) > 1 else []):
            if limit <= 0:
                break
            try:
                model(ids[:k].to(embed_device), use_cache=False)
            except _Stop:
                pass
            shared = (extra.pop("args"), extra.pop("kwargs"))
            if _nbytes(shared) > limit:
                break
            batched[k] = shared
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, args=args1, kwargs=kwargs1, batched=batched)


def run_block(block: nn.Module, inputs: BlockInputs, h: torch.Tensor) -> torch.Tensor:
    """The block's output hidden states for the input ``h`` (one window, or a batch of windows
    whose shared arguments were captured), with the shared arguments."""
    args, kwargs = inputs.shared(h.shape[0])
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _input_key(x: torch.Tensor):
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)


# ---- the probe ------------------------------------------------------------------------------

@dataclass
class _Call:
    """One module call seen by the probe, in the order calls start (pre-order)."""

    module: nn.Module
    first: int = 0  # linear-layer calls made before this call starts
    last: int = 0  # ... and when it returns
    end: int = 0  # index (in the list of calls) after this call's nested calls
    bytes: int = 0  # its output, for one window
    macs: int = 0  # multiply-adds per token of the linear layers called inside it
    plain: bool = True  # the output can be kept and handed back


@dataclass
class _Probe:
    groups: list[list[LinearRef]]  # layers reading one input tensor, in call order
    starts: list[int]  # linear-call index at which each group's input is first read
    calls: list[_Call]  # the calls of modules that contain a linear-layer call
    window_bytes: int  # activations of one window: every distinct tensor its modules return


@torch.no_grad()
def _probe(block: nn.Module, layers: list[LinearRef], inputs: BlockInputs) -> _Probe:
    """Run the block once on the first window and record what the sweep needs to know."""
    selected = {id(r.module): r for r in layers}
    linears = {id(r.module) for r in find_linears(block)}
    order: list[tuple] = []
    members: dict[tuple, list[LinearRef]] = {}
    first_call: dict[tuple, int] = {}
    seen = set()
    alive = []  # hold every tensor so no address is reused by a later tensor during the probe
    calls: list[_Call] = []
    stack: list[int] = []
    count = [0]
    out_ptrs = set()
    window_bytes = [0]

    def pre(module, args):
        calls.append(_Call(module, first=count[0]))
        stack.append(len(calls) - 1)
        ref = selected.get(id(module))
        if ref is not None and id(ref) not in seen and args:
            seen.add(id(ref))
            alive.append(args[0])
            key = _input_key(args[0])
            if key not in members:
                members[key] = []
                order.append(key)
                first_call[key] = count[0]
            members[key].append(ref)

    def post(module, args, out):
        c = calls[stack.pop()]
        if id(module) in linears:
            w = module.weight
            c.macs = int(w.numel())
            count[0] += 1
        c.last = count[0]
        c.end = len(calls)
        c.bytes = _nbytes(out)
        c.plain = _plain(out)
        alive.append(out)
        for t in _tensors(out):
            if t.data_ptr() not in out_ptrs:
                out_ptrs.add(t.data_ptr())
                window_bytes[0] += t.numel() * t.element_size()

    handles = []
    for m in block.modules():
        if m is not block:
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    try:
        run_block(block, inputs, inputs.hidden[0])
    finally:
        for h in handles:
            h.remove()
    unused = [r.name for r in layers if id(r) not in seen]
    if unused:
        log.warning("layers never called by their block, left unchanged: %s", ", ".join(unused))
    # the macs of a call: those of every linear call inside it
    for i in reversed(range(len(calls))):
        c = calls[i]
        if c.last > c.first and id(c.module) not in linears:
            c.macs = sum(calls[j].macs for j in range(i + 1, c.end)
                         if id(calls[j].module) in linears)
    # keep the calls that contain a linear-layer call, re-indexed
    keep = [i for i, c in enumerate(calls) if c.last > c.first]
    new_index = {}
    for n, i in enumerate(keep):
        new_index[i] = n
    tracked = []
    for i in keep:
        c = calls[i]
        end = sum(1 for j in keep if j < c.end)
        tracked.append(_Call(c.module, c.first, c.last, end, c.bytes, c.macs, c.plain))
    return _Probe(groups=[members[k] for k in order], starts=[first_call[k] for k in order],
                  calls=tracked, window_bytes=window_bytes[0])


@torch.no_grad()
def find_groups(block: nn.Module, layers: list[LinearRef], inputs: BlockInputs) -> list[list[LinearRef]]:
    """Group the layers that read the same input tensor, in the order the block calls them.

    Runs the block once on the first calibration sample. Layers the block never calls are left
    out (and logged). Blocks with mixture-of-experts layers are watched through
    :func:`toolkit.walk.expert_capture.watch`, which also sees the slices of fused expert parameters.
    """
    if experts.has_experts(block):
        return _watched_groups(block, layers, inputs)
    return _probe(block, layers, inputs).groups

@torch.no_grad()
def _watched_groups(block: nn.Module, layers: list, inputs: BlockInputs) -> list[list]:
    """:func:`find_groups` for blocks with mixture-of-experts layers: :func:`expert_capture.watch` also
    sees the slices of fused expert parameters (which have no module to hook)."""
    order: list[tuple] = []
    members: dict[tuple, list] = {}
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
        handles.append(expert_capture.watch(ref, make_hook(ref)))
    try:
        run_block(block, inputs, inputs.hidden[0])
    finally:
        for h in handles:
            h.remove()
    groups = [members[k] for k in order]
    # MoE: experts that got no token in the probe window are grouped like those that did
    groups = expert_capture.complete_groups(groups, layers, seen)
    seen.update(id(r) for g in groups for r in g)
    unused = [r.name for r in layers if id(r) not in seen]
    if unused:
        log.warning("layers never called by their block, left unchanged: %s", ", ".join(unused))
    return groups


# ---- the passes -----------------------------------------------------------------------------

def _batches(n: int, size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]``: batches of ``size`` windows (a power of two, or all ``n``), the
    rest in smaller powers of two."""
    if size >= n:
        return [(0, n)]
    out, i = [], 0
    while i < n:
        k = size
        while k > n - i:
            k //= 2
        out.append((i, i + k))
        i += k
    return out


@dataclass
class _Pass:
    stop: float  # linear-call index at which the pass ends (inf: runs the whole block)
    pending: float  # first linear-call index of a layer not solved yet (inf: none)


class _Walk:
    """The passes of one block: batches, the hooks that collect Hessians, and the outputs kept
    from one pass for the next."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, probe: _Probe | None,
                 passes: list[_Pass], memory: int, keep_outputs: bool = True):
        self.block = block
        self.inputs = inputs
        n = len(inputs.hidden)
        window = probe.window_bytes if probe is not None else 0
        # every window in one batch when their activations fit the whole budget: the sequential
        # schedule then solves each group inside that one forward (see sweep_block)
        self.single = (probe is not None and n * max(window, 1) <= memory
                       and (n == 1 or n in inputs.batched))
        if self.single:
            size = n
        else:
            size, fit = 1, (memory // 4) // max(window, 1)
            while size * 2 <= min(n, fit) and size * 2 in inputs.batched:
                size *= 2
        self.batch = size
        self.batches = _batches(n, size)
        self.calls = probe.calls if probe is not None else []
        self.passes = passes
        self.serve: list[set[int]] = [set() for _ in passes]
        self.store: list[set[int]] = [set() for _ in passes]
        self.last_use: dict[int, int] = {}
        self.kept: dict[int, dict[int, tuple]] = {}  # call -> batch -> (output, tensors, versions)
        self.caching = (keep_outputs and not self.single and bool(self.calls) and memory > 0
                        and len(passes) > 1)
        if self.caching:
            self._plan(n, memory - memory // 4)
        self.index = 0  # the pass being run

    # -- which outputs to keep ---------------------------------------------------------------
    def _plan(self, n: int, budget: int) -> None:
        calls, passes = self.calls, self.passes
        final_at = {}
        for i, c in enumerate(calls):
            j = next((j for j, p in enumerate(passes) if c.last <= p.pending), None)
            if c.plain and j is not None and j < len(passes) - 1:
                final_at[i] = j
        banned: set[int] = set()
        while True:
            serve = [set() for _ in passes]
            for j in range(len(passes)):
                i = 0
                while i < len(calls):
                    if i in final_at and i not in banned and final_at[i] < j:
                        serve[j].add(i)
                        i = calls[i].end
                    else:
                        i += 1
            live = {}
            for j, s in enumerate(serve):
                for i in s:
                    live[i] = (final_at[i], j)
            use = [sum(calls[i].bytes * n for i, (a, b) in live.items() if a <= t <= b)
                   for t in range(len(passes))]
            if not live or max(use) <= budget:
                break
            t = use.index(max(use))
            at_peak = [i for i, (a, b) in live.items() if a <= t <= b]

            # give up the kept output that saves the least work per byte
            value = {i: calls[i].macs * sum(1 for s in serve if i in s) / max(calls[i].bytes, 1)
                     for i in at_peak}
            banned.add(min(at_peak, key=lambda i: (value[i], i)))
        self.serve = serve
        self.store = [set() for _ in passes]
        for i, (a, _b) in live.items():
            self.store[a].add(i)
        self.last_use = {i: b for i, (_a, b) in live.items()}

    # -- one forward of one batch --------------------------------------------------------------
    def _install(self):
        """Wrap the forward of every module the probe saw calling a linear layer, for this pass:
        follow the calls, hand back kept outputs, keep new ones."""
        state = self.state = {"ptr": 0, "batch": 0}
        serve, store = self.serve[self.index], self.store[self.index]
        calls, kept = self.calls, self.kept
        saved = []

        def make(module, orig):
            def forward(*args, **kwargs):
                i = state["ptr"]
                if i >= len(calls) or calls[i].module is not module:
                    raise _Deviation(f"call {i} is {type(module).__name__}")
                c = calls[i]
                if i in serve:
                    hit = kept.get(i, {}).get(state["batch"])
                    if hit is not None and all(t._version == v for t, v in zip(*hit[1:])):
                        state["ptr"] = c.end
                        return hit[0]
                state["ptr"] = i + 1
                out = orig(*args, **kwargs)
                if state["ptr"] != c.end:
                    raise _Deviation(f"{type(module).__name__} made other calls than probed")
                if i in store:
                    ts = list(_tensors(out))
                    kept.setdefault(i, {})[state["batch"]] = (out, ts, [t._version for t in ts])
                return out
            return forward

        for m in {id(c.module): c.module for c in calls}.values():
            saved.append((m, m.__dict__.get("forward")))
            m.forward = make(m, m.forward)
        return saved

    @staticmethod
    def _uninstall(saved):
        for m, prev in saved:
            if prev is None:
                del m.forward
            else:
                m.forward = prev

    @torch.no_grad()
    def run(self, taps: dict | None = None, stop: set | frozenset = frozenset(),
            collect: bool = False, at_once: bool = False) -> None:
        """One pass over every batch.

        ``taps``: ``{id(module): fn}``; ``fn(x)`` receives the module's input once per batch
        (its first call), after the batch (so that a batch computed again after a deviation
        counts once), or at once, before the module runs, with ``at_once``. The pass ends at a
        module whose id is in ``stop``. ``collect``: the block's outputs replace
        ``inputs.hidden`` (the next block's inputs)."""
        taps = taps or {}
        hidden = self.inputs.hidden
        got: list = []

        def tap(module, args):
            if all(m is not module for m, _ in got):
                got.append((module, args[0]))
                if at_once:
                    taps[id(module)](args[0])
            if id(module) in stop:
                raise _Stop
        handles = [m.register_forward_pre_hook(tap) for m in
                   (m for m in self.block.modules() if id(m) in taps)]
        wrapped = self._install() if self.caching else []
        try:
            for b, (i0, i1) in enumerate(self.batches):
                x = hidden[i0] if i1 - i0 == 1 else torch.cat(hidden[i0:i1])
                args, kwargs = self.inputs.shared(i1 - i0)
                while True:
                    got.clear()
                    if wrapped:
                        self.state.update(ptr=0, batch=b)
                    try:
                        out = self.block(x, *args, **kwargs)
                    except _Stop:
                        out = None
                    except _Deviation as e:
                        log.warning("the block called its modules in another order than probed "
                                    "(%s): no outputs are reused from here on in this block", e)
                        self._uninstall(wrapped)
                        wrapped = []
                        self.caching = False
                        self.kept.clear()
                        continue
                    break
                if not at_once:
                    for module, inp in got:
                        taps[id(module)](inp)
                got.clear()
                if collect and out is not None:
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    hidden[i0:i1] = list(out.split(1)) if i1 - i0 > 1 else [out]
        finally:
            for h in handles:
                h.remove()
            self._uninstall(wrapped)
        # drop what no later pass takes
        for i in [i for i, last in self.last_use.items() if last <= self.index]:
            self.kept.pop(i, None)
        self.index += 1


def _accumulators(groups, device, dtype):
    return [HessianAccumulator(g[0].in_features, device=device, dtype=dtype, name=g[0].name)
            for g in groups]


def _finish(acc: HessianAccumulator) -> HessianAccumulator:
    dist.all_reduce_hessian(acc)  # no-op without a process group
    acc.check_finite()
    return acc


@torch.no_grad()
def group_hessian(block: nn.Module, group: list[LinearRef], inputs: BlockInputs,
                  dtype: torch.dtype, memory_mb: int | None = None) -> HessianAccumulator:
    """One Hessian for the group's shared input, over all calibration samples (batches of
    windows, each forward stopping as soon as the group's input is seen)."""
    device = inputs.hidden[0].device
    probe = _probe(block, group, inputs)
    start = min(probe.starts) if probe.starts else 0
    walk = _Walk(block, inputs, probe, [_Pass(start, start)], sweep_memory(device, memory_mb),
                 keep_outputs=False)
    acc = _accumulators([group], device, dtype)[0]
    first = _first_member(group, probe).module
    walk.run({id(first): _adder(acc)}, stop={id(first)})
    return _finish(acc)


def _adder(acc: HessianAccumulator):
    return lambda x: acc.add(x, check=False)


def _first_member(group: list[LinearRef], probe: _Probe) -> LinearRef:
    """The member of ``group`` the block calls first (all read the same input)."""
    for g in probe.groups:
        if any(r.module is group[0].module for r in g):
            return g[0]
    return group[0]


# ---- solving --------------------------------------------------------------------------------

def _solve_group(group: list[LinearRef], settings: list[LayerSettings], H: torch.Tensor | None,
                 block_size: int, percdamp: float, device,
                 cross: torch.Tensor | None = None) -> list[dict]:
    """Compress the layers of one group (sharing H); returns one report row per layer.

    ``H`` is None when no layer of the group needs it (magnitude / round-to-nearest): the
    layers are then compressed without calibration and their error is reported as NaN.
    ``cross``: the cross term ``D`` of asymmetric targets (:mod:`toolkit.solver.targets`): the
    layers solved by the sweep aim at ``W* = W + W D H^-1`` instead of ``W``, and their errors are
    measured from ``W*`` (the distance that the full-precision output adds a constant to).
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
        use_solver = (s.quantizes and s.quant == "gptq") or (
            s.prunes and s.method == "sparsegpt")
        dense = weights  # magnitude and Wanda masks are chosen on the weights themselves
        if use_solver and cross is not None:  # aim at the full-precision output
            factors[s.act_order] = f = factorize(H, percdamp, s.act_order, name=refs[0].name)
            weights = [asymmetric_target(w, cross.to(w.device), f.U.to(w.device),
                                         None if f.perm is None else f.perm.to(w.device))
                       for w in weights]
        originals = [w.float().clone() for w in weights]
        masks = None
        if s.prunes and s.method != "sparsegpt":
            if s.method == "magnitude":
                masks = [magnitude_mask(w, s.sparsity, s.pattern) for w in dense]
            else:
                masks = [wanda_mask(w, H, s.sparsity, s.pattern) for w in dense]
            weights = [apply_mask(w, m) for w, m in zip(weights, masks)]
        results = None
        # the solver's error is the layer's when it starts from the original weights and its
        # output is what is stored
        solver_error = use_solver and masks is None and not s.refine_iters
        if use_solver:
            if s.act_order not in factors:
                factors[s.act_order] = factorize(H, percdamp, s.act_order, name=refs[0].name)
            solver_bits = s.bits if s.quant == "gptq" else None
            solver_gguf = s.gguf if s.quant == "gptq" else None  # a GGUF block type
            if masks is not None:
                results = solve_layers(weights, factors[s.act_order], bits=solver_bits,
                                       group_size=s.group_size, sym=s.sym, mse=s.mse,
                                       act_order=s.act_order, static_groups=s.static_groups,
                                       block_size=block_size, names=[r.name for r in refs],
                                       masks=masks, gguf=solver_gguf)
            else:
                results = solve_layers(weights, factors[s.act_order], sparsity=s.sparsity,
                                       pattern=s.pattern, bits=solver_bits,
                                       group_size=s.group_size, sym=s.sym, mse=s.mse,
                                       act_order=s.act_order, static_groups=s.static_groups,
                                       block_size=block_size, names=[r.name for r in refs],
                                       gguf=solver_gguf)
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
            stored_as_solved = solver_error
            if s.gguf is not None:  # a GGUF type: the record holds the file's factors
                if results is not None and results[j].gguf is not None:
                    comp.gguf = results[j].gguf.to("cpu")
                else:  # round to nearest onto the same GGUF grid, keeping the mask
                    keep = masks[j] if masks is not None else None
                    w, _codes, grid = gguf_rtn(w, s.gguf, keep, name=ref.name)
                    comp.gguf = grid.to("cpu")
                    stored_as_solved = False
            elif s.bits is not None:
                if results is not None and results[j].scale is not None:
                    comp.scale, comp.zero = results[j].scale.cpu(), results[j].zero.cpu()
                    if s.act_order:
                        comp.g_idx = results[j].g_idx.cpu()
                else:  # round to nearest on the same grid, keeping the mask
                    keep = masks[j] if masks is not None else None
                    w, _codes, sc, zp = rtn_quantize(w, s.bits, s.group_size, s.sym, s.mse, keep)
                    comp.scale, comp.zero = sc.cpu(), zp.cpu()
                    stored_as_solved = False
            ref.set_weight(w)  # copy_ moves it to the parameter's device
            new = ref.get_weight().to(device=device, dtype=torch.float32)
            if H is not None:
                orig = originals[j].to(H.device)
                if stored_as_solved:
                    comp.error = results[j].error
                else:
                    comp.error = reconstruction_error(orig, new.to(H.device), H)
                energy = quadratic_form(orig, H)
                rel_error = comp.error / energy if energy > 0 else 0.0
            else:
                comp.error = rel_error = float("nan")
            pruned = int((~masks[j]).sum()) if masks is not None else 0
            comp.sparsity = pruned / new.numel()
            ref.set_record(comp)  # module.compression, or the experts module's dict (MoE)
            gt = gguf_type(s.gguf) if s.gguf is not None else None
            rows.append(dict(
                layer=ref.name, shape=tuple(new.shape), sparsity=comp.sparsity,
                zeros=float((new == 0).float().mean()),
                bits=s.bits if s.bits is not None else (gt.bits if gt is not None else 16),
                group_size=s.group_size if s.bits is not None else (
                    gt.sub if gt is not None else None),
                method=(s.method if s.prunes else "-") + "+" + (
                    s.quant if s.quantizes else "-") + (f" {gt.name}" if gt is not None else ""),
                error=comp.error,
                rel_error=rel_error,
                seconds=(time.perf_counter() - t0) / len(refs),
            ))
    return rows


def _log_rows(rows: list[dict], b: int) -> None:
    for r in rows:
        r["block"] = b
        log.info("%s: error %.4g, sparsity %.3f, %.2fs", r["layer"], r["error"], r["sparsity"],
                 r["seconds"])


def _sweep_experts_block(block: nn.Module, b: int, selected: list, chosen: dict,
                         inputs: BlockInputs | None, *, device, block_size: int,
                         percdamp: float, hessian_dtype: torch.dtype,
                         expert_hessian: str) -> list[dict]:
    """:func:`sweep_block` for a block with mixture-of-experts layers (:mod:`toolkit.model.experts`):
    the sequential schedule, one window at a time, each phase's expert Hessians from the tokens
    routed to each expert."""
    calibrate = inputs is not None
    rows: list[dict] = []
    # MoE (toolkit.model.experts): eager experts whose per-expert inputs reach experts.watch; the
    # groups of all experts playing one part form a phase whose Hessians take one pass
    with expert_capture.calibrating(block, selected if calibrate else [],
                             all_tokens=expert_hessian == "all") as calib:
        groups = []
        if selected:
            groups = find_groups(block, selected, inputs) if calibrate else [[r] for r in selected]
        itemsize = torch.finfo(hessian_dtype).bits // 8  # phases sized to the memory at hand
        for phase in expert_capture.phases(groups, expert_capture.hessian_budget(device), itemsize):
            need = calibrate and any(chosen[id(r)].needs_hessian for g in phase for r in g)
            if not need:
                found = [(None, None, None)] * len(phase)
            elif experts.is_expert(phase[0][0]):
                found = expert_capture.phase_hessians(phase, inputs.hidden,
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
    return rows


def sweep_block(block: nn.Module, b: int, plan: list, inputs: BlockInputs | None, *, device,
                block_size: int = 128, percdamp: float = 0.01,
                hessian_dtype: torch.dtype = torch.float32, schedule: str = "sequential",
                memory_mb: int | None = None, expert_hessian: str = "routed",
                reference: Reference | None = None, asymmetric: bool = False,
                reconstruct_steps: int = 0) -> list[dict]:
    """One step of the sweep: compress block ``b`` in place and advance ``inputs`` to the next
    block's inputs. Returns the block's report rows.

    ``plan``: ``[(layer, LayerSettings | None), ...]`` for the block's layers
    (:func:`toolkit.model.experts.find_layers`: linear layers and expert slices); ``inputs``: the
    block's inputs (None when no layer needs calibration). ``schedule``: ``"sequential"`` (each
    group's Hessian on the outputs of the compressed groups before it) or ``"parallel"`` (every
    group's Hessian from one pass of the unchanged block). ``memory_mb``: the option
    ``sweep_memory_mb`` (see :func:`sweep_memory`). ``expert_hessian``: ``"routed"`` or ``"all"``
    (see :mod:`toolkit.model.experts`); blocks with mixture-of-experts layers are always walked in the
    sequential schedule, one window at a time. ``reference``: the full-precision model's hidden
    states (:class:`toolkit.walk.reference.Reference`, advanced to the next block here), needed by
    ``asymmetric`` (each group solved by the sweep aims at the full-precision output,
    :mod:`toolkit.solver.targets`) and ``reconstruct_steps`` (that many optimiser steps on the
    block's output error once its layers are solved, :mod:`toolkit.walk.reconstruct`; its rows
    then carry ``block_error_before``/``block_error_after``). The block is moved to ``device``
    for the step and back where it was. :func:`run_sweep` calls this for every block; :mod:`toolkit.walk.stream` calls
    it on blocks loaded one at a time from disk.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULES))}, "
                         f"got {schedule!r}")
    calibrate = inputs is not None
    rows: list[dict] = []
    home = next(block.parameters()).device
    block.to(device)
    chosen = {id(r): s for r, s in plan}
    selected = [r for r, s in plan if s is not None and s.active]
    if experts.has_experts(block):
        if reference is not None:
            raise ValueError("asymmetric targets and block reconstruction do not support "
                             "mixture-of-experts blocks yet (the full-precision model routes "
                             "tokens to other experts, so inputs do not pair)")
        rows = _sweep_experts_block(block, b, selected, chosen, inputs, device=device,
                                    block_size=block_size, percdamp=percdamp,
                                    hessian_dtype=hessian_dtype, expert_hessian=expert_hessian)
        block.to(home)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        return rows
    memory = sweep_memory(device, memory_mb)
    with torch.no_grad():
        probe = _probe(block, selected, inputs) if calibrate else None
    if probe is not None:
        groups, starts = probe.groups, probe.starts
    else:
        groups, starts = [[r] for r in selected], [0] * len(selected)
    needs = [any(chosen[id(r)].needs_hessian for r in g) for g in groups]
    inf = float("inf")
    if not calibrate:
        passes = []
    elif schedule == "parallel" and any(needs):
        last = max(s for s, n in zip(starts, needs) if n)
        passes = [_Pass(last, starts[0]), _Pass(inf, inf)]
    else:
        passes = [_Pass(s, s) for s, n in zip(starts, needs) if n] + [_Pass(inf, inf)]
    walk = _Walk(block, inputs, probe, passes, memory) if calibrate else None
    hdevice = inputs.hidden[0].device if calibrate else None
    bref = None
    recon = bool(reconstruct_steps) and reference is not None and calibrate
    h_in = list(inputs.hidden) if recon else None  # the block's inputs, kept for the fit
    if reference is not None and calibrate:  # the full-precision block, before anything changes
        bref = reference.open(block, inputs, walk.batches,
                              [groups[g][0] for g in range(len(groups)) if needs[g]],
                              memory, tokens=inputs.hidden[0].shape[1])

    def pairs(g):
        """The Hessian (and, with a reference, the cross term) of group ``g``, and the tap that
        feeds them one batch at a time."""
        acc = _accumulators([groups[g]], hdevice, hessian_dtype)[0]
        if bref is None or not asymmetric:
            return acc, None, _adder(acc)
        cross = CrossAccumulator(acc.cols, device=hdevice, dtype=hessian_dtype,
                                 name=groups[g][0].name)
        module, count = groups[g][0].module, [0]

        def tap(x):
            acc.add(x, check=False)
            cross.add(x, bref.group_input(module, count[0]))
            count[0] += 1
        return acc, cross, tap

    def finished(acc, cross):
        H = _finish(acc).H
        if cross is None:
            return H, None
        dist.all_reduce_cross(cross)
        return H, cross.D

    def solve(g, H, D=None):
        new_rows = dist.solve_group(_solve_group, groups[g], [chosen[id(r)] for r in groups[g]],
                                    H, block_size, percdamp, device, cross=D)
        _log_rows(new_rows, b)
        rows.extend(new_rows)

    if calibrate and schedule == "sequential" and walk.single:
        # one forward of all windows: each group is solved at its input, before it runs, and the
        # rest of the forward goes on with it solved; the output is the next block's input
        def solve_here(g):
            def fn(x):
                H = D = None
                if needs[g]:
                    acc, cross, tap = pairs(g)
                    tap(x)
                    H, D = finished(acc, cross)
                solve(g, H, D)
            return fn
        walk.run({id(groups[g][0].module): solve_here(g) for g in range(len(groups))},
                 collect=True, at_once=True)
    elif schedule == "parallel" and calibrate and any(needs):
        todo = [g for g in range(len(groups)) if needs[g]]
        accs = {g: pairs(g) for g in todo}
        last = max(starts[g] for g in todo)
        first = {g: groups[g][0].module for g in todo}
        walk.run({id(first[g]): accs[g][2] for g in todo},
                 stop={id(first[g]) for g in todo if starts[g] == last})
        found = {g: finished(*accs.pop(g)[:2]) for g in todo}
        for g in range(len(groups)):
            H, D = found.pop(g) if g in found else (None, None)
            solve(g, H, D)
            del H, D
    else:
        for g in range(len(groups)):
            H = D = None
            if needs[g] and calibrate:
                acc, cross, tap = pairs(g)
                first = groups[g][0].module
                walk.run({id(first): tap}, stop={id(first)})
                H, D = finished(acc, cross)
                del acc, cross, tap
            solve(g, H, D)
            del H, D
    if calibrate and not recon and not (walk.single and schedule == "sequential"):
        walk.run(collect=True)
    if recon:  # the block's output fitted to the full-precision block's; its outputs go on
        t0 = time.perf_counter()
        stats, inputs.hidden = reconstruct_block(
            block, [r for g in groups for r in g], h_in, bref.outputs(), inputs, walk.batches,
            steps=reconstruct_steps,
            outputs=inputs.hidden if walk.single and schedule == "sequential" else None)
        log.info("block %d reconstruction: output error %.4g -> %.4g (%s, %.1fs)", b,
                 stats["before"], stats["after"], "kept" if stats["kept"] else "solver's kept",
                 time.perf_counter() - t0)
        for r in rows:
            r["block_error_before"], r["block_error_after"] = stats["before"], stats["after"]
        del h_in
    if bref is not None:
        bref.close()
    if calibrate:
        log.debug("block %d: %d windows per batch, %s", b, walk.batch,
                  "one pass" if walk.single and schedule == "sequential" else
                  f"{len(passes)} passes")
    block.to(home)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run_sweep(model: nn.Module, ids: torch.Tensor, layer_settings, *, device, block_size: int = 128,
              percdamp: float = 0.01, hessian_dtype: torch.dtype = torch.float32,
              verbose: bool = True, blocks_name: str | None = None,
              schedule: str = "sequential", memory_mb: int | None = None,
              expert_hessian: str = "routed", routers: bool = False,
              asymmetric: bool = False, reconstruct_steps: int = 0) -> list[dict]:
    """Compress every selected layer of every block, in place. Returns report rows.

    ``layer_settings(name) -> LayerSettings | None`` chooses what to do to each layer. The
    layers are the linear layers and the experts' matrices (:func:`toolkit.model.experts.find_layers`;
    the MoE routers only with ``routers``); a weight of the blocks that is none of these and not
    ignored raises :class:`toolkit.model.experts.UnsupportedWeights` before anything changes.
    ``schedule``, ``memory_mb`` and ``expert_hessian`` as in :func:`sweep_block`.
    ``asymmetric``: every layer the sweep solves aims at the full-precision model's output from
    its inputs in the compressed model (:mod:`toolkit.solver.targets`); the full-precision hidden
    states are carried beside the compressed ones (:mod:`toolkit.walk.reference`).
    ``reconstruct_steps``: block reconstruction after each block's sweep (:func:`sweep_block`).
    """
    name, blocks = find_blocks(model)
    experts.check_layers(name, blocks, layer_settings, routers=routers)
    plan = [[(r, layer_settings(r.name))
             for r in experts.find_layers(blk, prefix=f"{name}.{b}", routers=routers)]
            for b, blk in enumerate(blocks)]
    calibrate = any(s is not None and s.active and s.needs_hessian for p in plan for _, s in p)
    # with a process group each rank runs only its share of the windows (toolkit.walk.distributed)
    inputs = capture_block_inputs(model, blocks, dist.local_share(ids), device, memory_mb) \
        if calibrate else None
    reference = None
    if (asymmetric or reconstruct_steps) and calibrate:
        if any(experts.has_experts(blk) for blk in blocks):
            raise ValueError("asymmetric targets and block reconstruction do not support "
                             "mixture-of-experts models yet "
                             "(the full-precision model routes tokens to other experts, so "
                             "their inputs do not pair token by token)")
        reference = Reference(inputs.hidden)
    # the full-precision stream is needed up to the last block that has a layer to solve
    last = max((b for b, p in enumerate(plan)
                if any(s is not None and s.active and s.needs_hessian for _, s in p)), default=-1)
    rows: list[dict] = []
    bar = tqdm(range(len(blocks)), desc="compressing blocks", unit="block", disable=not verbose)
    for b in bar:
        rows.extend(sweep_block(blocks[b], b, plan[b], inputs, device=device,
                                block_size=block_size, percdamp=percdamp,
                                hessian_dtype=hessian_dtype, schedule=schedule,
                                memory_mb=memory_mb, expert_hessian=expert_hessian,
                                reference=reference if b <= last else None,
                                asymmetric=asymmetric, reconstruct_steps=reconstruct_steps))
        if b == last:
            reference = None  # its hidden states are freed
    return rows
