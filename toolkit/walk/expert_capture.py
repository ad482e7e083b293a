"""Seeing each expert's inputs during the sweep of a mixture-of-experts block, and their Hessians.

During the sweep of a block (:func:`calibrating`) the experts run their eager per-expert loop
(transformers' batched/grouped implementations are switched off for the block's step) and every
per-expert matrix product is seen: a ``torch`` function mode recognises the views of a fused
parameter passed to ``F.linear`` / ``matmul``, per-expert modules get forward hooks
(:func:`watch`). The groups of all experts that play the same part are captured in one pass over
the calibration windows (:func:`phases`, :func:`phase_hessians`). The experts themselves are
found by :mod:`toolkit.model.experts`, whose docstring describes the layouts and the Hessian
sources (routed or all tokens).
"""

from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from toolkit.model.experts import (
    FUSED_PARTS,
    HESSIAN_SOURCES,
    ExpertRef,
    ExpertsError,
    fused_params,
    is_expert,
)
from toolkit.model.layers import is_conv1d
from toolkit.solver.hessian import HessianAccumulator
from toolkit.walk import distributed as dist

__all__ = ["watch", "watch_output", "calibrating", "complete_groups", "phases", "cut", "hessian_budget",
           "phase_hessians", "Calibration"]

log = logging.getLogger("toolkit")

# ---- calibration: seeing each expert's inputs ----------------------------------------------------

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _SliceCalls(TorchFunctionMode):
    """Sees ``F.linear(x, P[e])`` and ``x @ P[e]`` for the fused parameters of one module."""

    def __init__(self, disp, capture: bool, count: bool):
        super().__init__()
        self.disp, self.capture, self.count = disp, capture, count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        linear = func in _LINEAR
        if (linear or func in _MATMUL) and len(args) >= 1:
            w = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
            hit = self.disp.locate(w)
            if hit is not None:
                pname, e, as_stored = hit
                # F.linear takes (out, in); matmul takes (in, out)
                stored_out_in = as_stored == linear
                if stored_out_in == self.disp.transposed:
                    raise ExpertsError(
                        f"{self.disp.name}.{pname}: the experts use each matrix as "
                        f"{'(out, in)' if stored_out_in else '(in, out)'}, but the layout says "
                        f"{'(in, out)' if self.disp.transposed else '(out, in)'}")
                self.disp.seen((pname, e), args[0], self.capture, self.count)
                out = func(*args, **kwargs)
                if self.capture:
                    for fn in self.disp.outs.get((pname, e), ()):
                        fn(out)
                return out
        return func(*args, **kwargs)


class _Dispatch:
    """Routes the per-expert inputs of one MoE module to the watchers during the sweep.

    ``forced``: None (the watchers see the routed calls) or the experts to call with every token
    (the watchers see only those calls; the module's output still follows the router).
    ``counts``: routed rows per site since the last reset.
    """

    def __init__(self, name: str, owner: nn.Module, refs: list, all_tokens: bool):
        self.name, self.owner = name, owner
        self.fns: dict = {}
        self.outs: dict = {}  # site -> fns called with the product's output (watch_output)
        self.counts: dict = {}
        self.calls = 0
        self.fused = isinstance(refs[0], ExpertRef)
        self.params = list(fused_params(owner))
        if self.fused:
            self.transposed = refs[0].transposed
            self.n_experts = getattr(owner, refs[0].param).shape[0]
        else:
            self.experts = refs[0].experts
            self.n_experts = len(self.experts)
        self.forced = list(range(self.n_experts)) if all_tokens else None
        self.state = (True, True)  # (capture, count) for per-expert modules
        self._undo = []

    # -- seeing calls
    def locate(self, w):
        if not isinstance(w, torch.Tensor) or w.ndim != 2:
            return None
        ptr = w.untyped_storage().data_ptr()
        for pname in self.params:
            p = getattr(self.owner, pname)
            if p.untyped_storage().data_ptr() != ptr:
                continue
            e, rest = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
            if rest or not 0 <= e < p.shape[0]:
                continue
            shape, stride = tuple(p.shape[1:]), tuple(p.stride()[1:])
            if tuple(w.shape) == shape and tuple(w.stride()) == stride:
                return pname, e, True
            if tuple(w.shape) == shape[::-1] and tuple(w.stride()) == stride[::-1]:
                return pname, e, False
        return None

    def seen(self, site, x, capture: bool, count: bool) -> None:
        self.calls += 1
        if count:
            rows = x.numel() // x.shape[-1] if x.ndim else 0
            self.counts[site] = self.counts.get(site, 0) + rows
        if capture:
            for fn in self.fns.get(site, ()):
                fn(x)

    # -- installing
    def install(self) -> None:
        if self.fused:
            self._install_fused()
        else:
            self._install_list()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _install_fused(self) -> None:
        owner = self.owner
        config = getattr(owner, "config", None)
        impl = getattr(config, "_experts_implementation_internal", None)
        if impl not in (None, "eager"):  # the per-expert loop: every slice is seen
            config._experts_implementation_internal = "eager"
            self._undo.append(lambda: setattr(config, "_experts_implementation_internal", impl))
        previous = self._wrap_forward()
        params = list(inspect.signature(type(owner).forward).parameters)[1:]

        def forward(*args, **kwargs):
            values = list(args) + [kwargs[p] for p in params[len(args):] if p in kwargs]
            hidden = values[0]
            if self.forced is not None:
                if len(values) < 3:
                    raise ExpertsError(f"{self.name}: expert_hessian='all' needs the experts "
                                       "called as (hidden_states, top_k_index, top_k_weights)")
                index, weights = values[1], values[2]
                n = hidden.reshape(-1, hidden.shape[-1]).shape[0]
                every = torch.tensor(self.forced, device=index.device, dtype=index.dtype)
                every = every.expand(n, len(self.forced))
                ones = torch.ones(every.shape, dtype=weights.dtype, device=weights.device)
                self._run_fused(previous, (hidden, every, ones), {}, capture=True,
                                count=False)
                return self._run_fused(previous, args, kwargs, capture=False, count=True)
            return self._run_fused(previous, args, kwargs, capture=True, count=True)

        owner.forward = forward

    def _wrap_forward(self):
        """The module's current forward (an instance-level one, e.g. an offloading hook's, is
        kept and called), to be replaced by ours until :meth:`remove`."""
        owner = self.owner
        had = "forward" in owner.__dict__
        previous = owner.__dict__.get("forward")
        self._undo.append(lambda: setattr(owner, "forward", previous) if had
                          else owner.__dict__.pop("forward", None))
        return owner.forward

    def _run_fused(self, forward, args, kwargs, capture, count):
        before = self.calls
        with _SliceCalls(self, capture, count):
            out = forward(*args, **kwargs)
        hidden = args[0] if args else next(iter(kwargs.values()))
        if self.calls == before and hidden.numel() > 0 and _routes_any(args, kwargs):
            raise ExpertsError(
                f"{self.name} ({type(self.owner).__name__}) ran without one recognisable "
                "per-expert matrix product (F.linear or matmul on a slice of "
                f"{', '.join(fused_params(self.owner))}): its forward is not supported; pass "
                "ignore=[...] naming its parameters to leave them dense")
        return out

    def _install_list(self) -> None:
        for e, expert in enumerate(self.experts):
            for sub, m in expert.named_modules():
                if isinstance(m, nn.Linear) or is_conv1d(m):
                    site = ("linear", e, sub)

                    def hook(_m, args, site=site):
                        capture, count = self.state
                        self.seen(site, args[0], capture, count)

                    self._undo.append(m.register_forward_pre_hook(hook).remove)
        owner = self.owner
        previous = self._wrap_forward()

        def forward(*args, **kwargs):
            if self.forced is None:
                self.state = (True, True)
                return previous(*args, **kwargs)
            self.state = (False, True)
            out = previous(*args, **kwargs)
            hidden = args[0] if args else next(iter(kwargs.values()))
            x = hidden.reshape(-1, hidden.shape[-1])
            self.state = (True, False)
            try:
                for e in self.forced:
                    try:
                        self.experts[e](x)
                    except TypeError as err:
                        raise ExpertsError(
                            f"{self.name}.{e}: expert_hessian='all' calls each expert module "
                            f"with the tokens alone, which it does not accept ({err})") from None
            finally:
                self.state = (True, True)
            return out

        owner.forward = forward


def _routes_any(args, kwargs) -> bool:
    """False when the routing arguments select no expert at all (nothing to see)."""
    values = list(args[1:2]) + list(kwargs.values())[:1]
    return not values or not isinstance(values[0], torch.Tensor) or values[0].numel() > 0


class Calibration:
    """What :func:`calibrating` yields: the dispatchers of the block's MoE modules."""

    def __init__(self, dispatchers: dict):
        self.dispatchers = dispatchers  # id(owner) -> _Dispatch

    def of(self, ref) -> _Dispatch:
        try:
            return self.dispatchers[id(ref.owner)]
        except KeyError:
            raise RuntimeError(f"{ref.name}: expert inputs are only seen inside "
                               "experts.calibrating(block, ...)") from None


_ACTIVE: dict[int, _Dispatch] = {}


@contextmanager
def calibrating(block: nn.Module, refs, all_tokens: bool = False):
    """For the sweep of one block: run its experts eagerly and route each expert's inputs to
    :func:`watch`-ers. ``all_tokens``: the watchers see calls that send every token to every
    expert (``expert_hessian="all"``). A no-op for blocks without expert layers."""
    by_owner: dict[int, list] = {}
    for r in refs:
        if is_expert(r):
            by_owner.setdefault(id(r.owner), []).append(r)
    dispatchers = {}
    try:
        for key, rs in by_owner.items():
            r = rs[0]  # name of the experts (module or list): the layer's name less its tail
            name = r.name[:-len(f".{r.expert}.{r.layer}")]
            d = _Dispatch(name, r.owner, rs, all_tokens)
            d.install()
            dispatchers[key] = d
            _ACTIVE[key] = d
        yield Calibration(dispatchers)
    finally:
        for key, d in dispatchers.items():
            d.remove()
            _ACTIVE.pop(key, None)


class _Handle:
    def __init__(self, fns: list, fn):
        self.fns, self.fn = fns, fn

    def remove(self) -> None:
        if self.fn in self.fns:
            self.fns.remove(self.fn)


def watch(ref, fn):
    """Call ``fn(x)`` with the layer's input each time the block calls it; returns a handle
    with ``remove()``. Expert layers need :func:`calibrating` around the block's runs."""
    if not is_expert(ref):
        return ref.module.register_forward_pre_hook(lambda _m, args: fn(args[0]))
    d = _ACTIVE.get(id(ref.owner))
    if d is None:
        raise RuntimeError(f"{ref.name}: expert inputs are only seen inside "
                           "experts.calibrating(block, ...)")
    fns = d.fns.setdefault(ref.site, [])
    fns.append(fn)
    return _Handle(fns, fn)


def watch_output(ref, fn):
    """Call ``fn(y, part)`` with the layer's output ``y`` each time the block calls it (tokens
    along the leading dimensions) and ``part``, a function that takes this layer's columns of
    ``y``, or of a tensor shaped like it such as its gradient (the identity but for a part of a
    fused ``gate_up_proj``, whose product holds both parts: hooks go on ``y`` itself, which the
    model goes on using, not on a slice of it); returns a handle with ``remove()``. Fused expert
    layers need :func:`calibrating` around the runs."""
    parts = len(FUSED_PARTS[ref.param]) if isinstance(ref, ExpertRef) else 1

    def part(t):
        if parts == 1:
            return t
        if ref.interleaved:
            return t[..., ref.part::parts]
        n = t.shape[-1] // parts
        return t[..., ref.part * n:(ref.part + 1) * n]

    if not isinstance(ref, ExpertRef):
        return ref.module.register_forward_hook(lambda _m, _args, out: fn(out, part))
    d = _ACTIVE.get(id(ref.owner))
    if d is None:
        raise RuntimeError(f"{ref.name}: expert outputs are only seen inside "
                           "experts.calibrating(block, ...)")

    def call(y):
        fn(y, part)

    fns = d.outs.setdefault(ref.site, [])
    fns.append(call)
    return _Handle(fns, call)


# ---- groups and phases ---------------------------------------------------------------------------

def _family(ref):
    """(owner, layer name): the same projection of every expert of one MoE module."""
    return (id(ref.owner), ref.layer)


def complete_groups(groups: list[list], layers: list, seen: set) -> list[list]:
    """Add the expert layers a probe did not see (no token routed to them in the probe window):
    each gets the grouping of the same projection of an expert that was seen (gate/up of expert
    3 together because gate/up of expert 0 were). Raises :class:`ExpertsError` when no expert
    of a module was seen at all."""
    template = {}
    for g in groups:
        for r in g:
            if is_expert(r):
                template.setdefault(_family(r), tuple(x.layer for x in g))
    missing = [r for r in layers if is_expert(r) and id(r) not in seen]
    by_key = {(id(r.owner), r.expert, r.layer): r for r in layers if is_expert(r)}
    out = list(groups)
    done = set()
    for r in missing:
        if id(r) in done:
            continue
        names = template.get(_family(r))
        if names is None:
            raise ExpertsError(f"{r.name}: the block never called its experts on the probe "
                               "window, so their inputs cannot be told apart")
        g = [by_key[(id(r.owner), r.expert, n)] for n in names
             if (id(r.owner), r.expert, n) in by_key]
        g = [x for x in g if id(x) not in seen and id(x) not in done]
        done.update(id(x) for x in g)
        out.append(g)
    return out


def hessian_budget(device) -> int:
    """Bytes the Hessians of one phase may take: ``TOOLKIT_MOE_HESSIAN_BYTES`` if set, else half
    the free memory of a CUDA device, or a quarter of the host's memory."""
    env = os.environ.get("TOOLKIT_MOE_HESSIAN_BYTES")
    if env:
        return int(float(env))
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def phases(groups: list[list], max_bytes: int | None = None,
           itemsize: int = 4) -> list[list[list]]:
    """Merge the groups of every expert that play the same part into one phase, placed where
    the first of them was: ``[[qkv], [o], [gate/up of every expert], [down of every expert]]``.
    Each phase's Hessians are captured in one pass over the windows; with ``max_bytes`` a phase
    whose Hessians (``cols^2 * itemsize`` each) would take more is cut into consecutive phases
    (more passes, as many Hessians at a time as fit)."""
    merged = _merge(groups)
    if max_bytes is None:
        return merged
    return [part for phase in merged for part in cut(phase, max_bytes, itemsize)]


def cut(groups: list[list], max_bytes: int, itemsize: int = 4) -> list[list[list]]:
    """``groups`` in order, cut into consecutive runs whose Hessians (``cols^2 * itemsize``
    bytes each) take at most ``max_bytes`` (a group larger than that alone)."""
    out, cur, used = [], [], 0
    for g in groups:
        size = g[0].in_features ** 2 * itemsize
        if cur and used + size > max_bytes:
            out.append(cur)
            cur, used = [], 0
        cur.append(g)
        used += size
    return out + [cur] if cur else out


def _merge(groups: list[list]) -> list[list[list]]:
    out: list[list[list]] = []
    where: dict = {}
    ordinal: dict = {}  # groups of one expert seen so far: its k-th group joins the k-th phase
    for g in groups:
        if not g or not all(is_expert(r) for r in g):
            out.append([g])
            continue
        members = {(id(r.owner), r.expert) for r in g}  # several experts when they share x
        key = (id(g[0].owner), max(ordinal.get(m, 0) for m in members))
        for m in members:
            ordinal[m] = key[1] + 1
        if key in where:
            out[where[key]].append(g)
        else:
            where[key] = len(out)
            out.append([g])
    return out


class _StopForward(Exception):
    """Ends a calibration forward once the phase's module has run."""


def _sum_counts(values: list[int], device) -> list[int]:
    if not dist.active() or not values:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return [int(round(v)) for v in t.tolist()]


@torch.no_grad()
def _capture(phase, windows, run, calib: Calibration, dtype, device, forced=None):
    """One pass: the Hessians of the phase's groups and the routed rows of each."""
    disps = {id(g[0].owner): calib.of(g[0]) for g in phase}
    accs = [HessianAccumulator(g[0].in_features, device=device, dtype=dtype, name=g[0].name)
            for g in phase]
    handles = [watch(g[0], acc.add) for g, acc in zip(phase, accs)]
    saved = {k: d.forced for k, d in disps.items()}

    def stop(_m, _args, _out):
        raise _StopForward

    handles += [d.owner.register_forward_hook(stop) for d in disps.values()]
    for d in disps.values():
        d.counts = {}
        if forced is not None:
            d.forced = forced.get(id(d.owner), [])
    try:
        for h in windows:
            try:
                run(h)
            except _StopForward:
                pass
    finally:
        for hd in handles:
            hd.remove()
        for k, d in disps.items():
            d.forced = saved[k]
    counts = [[disps[id(r.owner)].counts.get(r.site, 0) for r in g] for g in phase]
    return accs, counts


def phase_hessians(phase: list[list], windows, run, calib: Calibration, dtype,
                   device) -> list[tuple]:
    """The Hessians of a phase of expert groups, in one pass over the calibration ``windows``
    (``run(h)`` runs the block on one window). Returns one ``(H, tokens, source)`` per group:
    ``tokens`` maps each layer's name to the calibration tokens the router sent its expert,
    ``source`` is one of :data:`HESSIAN_SOURCES`. Experts that receive no token get the
    all-token Hessian (a second pass, only for them)."""
    accs, counts = _capture(phase, windows, run, calib, dtype, device)
    for acc in accs:
        dist.all_reduce_hessian(acc)  # no-op without a process group
    flat = _sum_counts([n for c in counts for n in c], device)
    tokens, i = [], 0
    for g in phase:
        tokens.append({r.name: n for r, n in zip(g, flat[i:i + len(g)])})
        i += len(g)
    all_mode = [calib.of(g[0]).forced is not None for g in phase]
    out = [(acc.H, t, "all tokens" if a else "routed") for acc, t, a in zip(accs, tokens, all_mode)]
    empty = [i for i, (acc, a) in enumerate(zip(accs, all_mode)) if not a and acc.nsamples == 0]
    if empty:
        forced: dict[int, list[int]] = {}
        for i in empty:
            forced.setdefault(id(phase[i][0].owner), []).append(phase[i][0].expert)
        sub = [phase[i] for i in empty]
        more, _ = _capture(sub, windows, run, calib, dtype, device, forced=forced)
        for i, acc in zip(empty, more):
            dist.all_reduce_hessian(acc)
            out[i] = (acc.H, {r.name: 0 for r in phase[i]}, HESSIAN_SOURCES[2])
            log.info("%s: no calibration token routed to this expert; its Hessian uses every "
                     "token (%d)", phase[i][0].name, acc.nsamples)
    return out

