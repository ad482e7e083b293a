"""Mixture-of-experts models: every expert's projections are layers of their own.

Two layouts are found inside a decoder block:

* **fused** (transformers 5.x: Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-MoE,
  Granite-MoE, Phi-MoE, GPT-OSS, ...): an experts module holds 3-D parameters, one matrix per
  expert, e.g. ``gate_up_proj`` ``(experts, 2 * inter, hidden)`` and ``down_proj``
  ``(experts, hidden, inter)``. Each expert's slice is a layer (:class:`ExpertRef`), named like a
  module of the per-expert layout, ``model.layers.0.mlp.experts.3.gate_proj``; a fused
  ``gate_up_proj`` gives two layers, ``gate_proj`` and ``up_proj``, which read the same input and
  share one Hessian and factorisation, like q/k/v. :data:`FUSED_PARTS` is the adapter table (the
  parameter names and the layers they hold); the orientation comes from the module's
  ``is_transposed`` (set by transformers' ``use_experts_implementation``, True for
  ``(experts, in, out)`` storage, e.g. GPT-OSS) or, without it, from the shapes; interleaved
  gate/up rows (``is_concatenated=False``) are supported.
* **per-expert modules** (older transformers, remote code): an ``nn.ModuleList`` of identical
  expert MLPs of ``nn.Linear`` beside a router; each linear is an :class:`ExpertLinearRef`.

The **routers** (the modules that score the experts: a 2-D weight of ``experts`` rows, e.g.
``MixtralTopKRouter``, or an ``nn.Linear`` with one output per expert) and the one-output gates
beside them (Qwen2-MoE's ``shared_expert_gate``) stay dense unless ``routers=True``.

**Hessians.** During the sweep of a block (:func:`toolkit.walk.expert_capture.calibrating`) the experts run their eager
per-expert loop (transformers' batched/grouped implementations are switched off for the block's
step) and every per-expert matrix product is seen: a ``torch`` function mode recognises the
views of a fused parameter passed to ``F.linear`` / ``matmul``, per-expert modules get forward
hooks. With ``expert_hessian="routed"`` (the default) each expert's Hessian comes from the tokens
the router sends it. With ``"all"``, the experts are called a second time with every token sent
to every expert, and that call feeds the Hessians, while the block's output still follows the
router. An expert that receives **no** token under ``"routed"`` gets the all-token Hessian (its
report row says ``hessian = "all tokens (no routed token)"``); the report's ``tokens`` column is
the number of calibration tokens the router sent each expert.

The groups of all experts that play the same part (every ``gate_proj/up_proj``, then every
``down_proj``) are captured in one pass over the calibration windows
(:mod:`toolkit.walk.expert_capture`).

**Nothing is skipped silently.** :func:`check_layers` runs before the sweep: every floating
parameter of two or more dimensions inside the blocks must be a layer the sweep compresses, a
router or gate, an embedding or a bias, or be named by ``ignore``; otherwise ``compress`` raises
:class:`UnsupportedWeights` naming the tensors.

**Records.** A compressed fused slice has no module of its own: its
:class:`~toolkit.config.records.LayerCompression` is kept on the experts module, in the dict
``module.expert_compression`` keyed by ``"{expert}.{layer}"`` (e.g. ``"3.gate_proj"``), see
:meth:`ExpertRef.set_record` and :func:`fused_layers`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.model.layers import LinearRef, find_linears, is_conv1d

__all__ = ["FUSED_PARTS", "RECORDS", "ExpertRef", "ExpertLinearRef", "UnsupportedWeights",
           "ExpertsError", "find_layers", "fused_layers", "fused_params", "is_expert", "check_layers",
           "has_experts", "HESSIAN_SOURCES", "compressed_experts", "checkpoint_names"]

log = logging.getLogger("toolkit")

#: The adapter table: fused 3-D parameter name -> the layers it holds, in row order (of the
#: ``(out, in)`` matrix of one expert). Interleaved layouts alternate the rows instead.
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "gate_up_proj": ("gate_proj", "up_proj"),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
    "down_proj": ("down_proj",),
}

#: Attribute of an experts module holding the records of its compressed slices.
RECORDS = "expert_compression"

#: Values of the report column ``hessian`` for expert layers.
HESSIAN_SOURCES = ("routed", "all tokens", "all tokens (no routed token)")


class ExpertsError(RuntimeError):
    """The experts of a block cannot be followed during calibration (an unknown forward)."""


class UnsupportedWeights(ValueError):
    """Weights inside the blocks that compress cannot handle and that ``ignore`` does not name."""


# ---- the layers ----------------------------------------------------------------------------------

@dataclass(eq=False)
class ExpertRef:
    """One expert's projection inside a fused 3-D parameter, seen as an ``(out, in)`` layer."""

    name: str  # e.g. "model.layers.0.mlp.experts.3.gate_proj"
    module: nn.Module  # the experts module that owns the fused parameter
    param: str  # "gate_up_proj"
    expert: int
    part: int  # index in FUSED_PARTS[param]
    transposed: bool  # stored as (experts, in, out)
    interleaved: bool  # parts alternate rows instead of following each other

    @property
    def layer(self) -> str:
        """The layer's own name, e.g. ``"gate_proj"``."""
        return FUSED_PARTS[self.param][self.part]

    @property
    def key(self) -> str:
        """Key of the record in ``module.expert_compression``: ``"3.gate_proj"``."""
        return f"{self.expert}.{self.layer}"

    @property
    def owner(self) -> nn.Module:
        return self.module

    @property
    def site(self):
        """Where this layer's input appears: one per (parameter, expert)."""
        return (self.param, self.expert)

    @property
    def in_features(self) -> int:
        return self.get_weight().shape[1]

    def get_weight(self) -> torch.Tensor:
        """The expert's matrix (or its part) as (out, in): a view of the fused parameter."""
        w = getattr(self.module, self.param).data[self.expert]
        if self.transposed:
            w = w.T
        parts = len(FUSED_PARTS[self.param])
        if parts == 1:
            return w
        if self.interleaved:
            return w[self.part::parts]
        n = w.shape[0] // parts
        return w[self.part * n:(self.part + 1) * n]

    def set_weight(self, new: torch.Tensor) -> None:
        """Write a new (out, in) matrix into the fused parameter, in place."""
        self.get_weight().copy_(new)

    def set_record(self, comp) -> None:
        """Keep the slice's :class:`~toolkit.config.records.LayerCompression` in the experts module's
        ``expert_compression`` dict, under :attr:`key`."""
        records = getattr(self.module, RECORDS, None)
        if records is None:
            records = {}
            setattr(self.module, RECORDS, records)
        records[self.key] = comp

    def get_record(self):
        """The record :meth:`set_record` kept, or None."""
        return (getattr(self.module, RECORDS, None) or {}).get(self.key)


@dataclass(eq=False)
class ExpertLinearRef(LinearRef):
    """An ``nn.Linear`` of one expert module in a per-expert ``nn.ModuleList``."""

    owner: nn.Module = None  # the MoE module holding the expert list (and the router)
    experts: nn.ModuleList = None
    expert: int = 0
    layer: str = ""  # name inside the expert module, e.g. "w1"

    @property
    def site(self):
        return ("linear", self.expert, self.layer)


def is_expert(ref) -> bool:
    """True for the layers of one expert (fused slice or per-expert module)."""
    return isinstance(ref, (ExpertRef, ExpertLinearRef))


# ---- discovery -----------------------------------------------------------------------------------

def fused_params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters(recurse=False)
            if p.ndim == 3 and n in FUSED_PARTS}


def _orientation(module: nn.Module, params: dict) -> bool | None:
    """True when the experts are stored (experts, in, out); None when it cannot be told."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    ups = [(n, p) for n, p in params.items() if n != "down_proj"]
    down = params.get("down_proj")
    if not ups or down is None:
        return None
    name, up = ups[0]
    k = len(FUSED_PARTS[name])
    normal = up.shape[1] == k * down.shape[2] and up.shape[2] == down.shape[1]
    flipped = up.shape[2] == k * down.shape[1] and up.shape[1] == down.shape[2]
    return None if normal == flipped else flipped


def fused_layers(module: nn.Module, prefix: str = "") -> list[ExpertRef]:
    """The expert layers of ``module``'s own fused parameters (``[]`` when it has none, or when
    their layout is not one of :data:`FUSED_PARTS` with a known orientation; such parameters are
    then reported by :func:`check_layers`). Ordered expert by expert, parameters in definition
    order."""
    params = fused_params(module)
    if not params or len({p.shape[0] for p in params.values()}) != 1:
        return []
    transposed = _orientation(module, params)
    if transposed is None:
        return []
    interleaved = getattr(module, "is_concatenated", True) is False
    for n, p in params.items():  # the rows must split evenly into the parts
        out = p.shape[2] if transposed else p.shape[1]
        if out % len(FUSED_PARTS[n]):
            return []
    n_experts = next(iter(params.values())).shape[0]
    refs = []
    for e in range(n_experts):
        for pname in params:
            for i, layer in enumerate(FUSED_PARTS[pname]):
                name = f"{prefix}.{e}.{layer}" if prefix else f"{e}.{layer}"
                refs.append(ExpertRef(name, module, pname, e, i, transposed, interleaved))
    return refs


def compressed_experts(model: nn.Module) -> list[tuple[str, nn.Module, list]]:
    """``[(name, experts module, [(ExpertRef, record or None), ...])]`` for every module of
    ``model`` whose fused expert parameters have at least one compressed slice (a record in
    ``module.expert_compression``), in module order; the list holds every slice of the module
    (:func:`fused_layers` order), compressed or not."""
    out = []
    for name, module in model.named_modules():
        records = getattr(module, RECORDS, None)
        if not records:
            continue
        refs = fused_layers(module, name)
        pairs = [(r, records.get(r.key)) for r in refs]
        if any(rec is not None for _, rec in pairs):
            out.append((name, module, pairs))
    return out


def checkpoint_names(model: nn.Module, name: str, module: nn.Module) -> dict[str, str] | None:
    """The per-expert names under which transformers saves (``save_pretrained``) and loads
    (``from_pretrained``, its conversion mapping merges them into the fused parameters) each
    slice of ``module``'s fused parameters: ``{ExpertRef.key: module-like name}``, e.g.
    ``{"3.gate_proj": "model.layers.0.block_sparse_moe.experts.3.w1"}`` for Mixtral (the
    tensor is that name + ``.weight``). None when transformers has no such mapping for the
    model (e.g. GPT-OSS: its checkpoints store the 3-D tensors) or the mapping does not give
    each slice exactly one ``(out, in)`` tensor.

    Found by running transformers' own ``revert_weight_conversion`` on small stand-ins of the
    fused parameters whose entries number their positions (the same experts count, a few rows
    and columns), so any renaming, split or transpose of the mapping is followed."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x: no conversion mapping
        return None
    refs = fused_layers(module, name)
    if not refs:
        return None
    holder = nn.Module()
    proxies, start = {}, 0
    for pname, p in fused_params(module).items():
        k = len(FUSED_PARTS[pname])
        rows, cols = 2 * k, 3  # (out, in) of one expert's stand-in
        shape = (p.shape[0], cols, rows) if refs[0].transposed else (p.shape[0], rows, cols)
        t = torch.arange(start, start + math.prod(shape), dtype=torch.float64).reshape(shape)
        start += t.numel()
        setattr(holder, pname, nn.Parameter(t, requires_grad=False))
        proxies[f"{name}.{pname}"] = t
    try:
        out = revert_weight_conversion(model, dict(proxies))
    except Exception as e:  # noqa: BLE001 - a mapping that does not apply: no names
        log.debug("%s: transformers' reverse conversion failed: %s", name, e)
        return None
    by_first = {}
    for key, t in out.items():
        t = t[0] if isinstance(t, list) else t
        if not key.endswith(".weight") or t.ndim != 2 or not t.numel():
            return None
        by_first[float(t[0, 0])] = (key[:-len(".weight")], t)
    names = {}
    for r in refs:
        w = ExpertRef(r.name, holder, r.param, r.expert, r.part, r.transposed,
                      r.interleaved).get_weight()
        hit = by_first.get(float(w[0, 0]))
        if hit is None or hit[1].shape != w.shape or not torch.equal(hit[1], w):
            return None
        names[r.key] = hit[0]
    if len(set(names.values())) != len(refs) or len(out) != len(refs):
        return None
    return names


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or is_conv1d(m) for m in module.modules())


def _router_children(parent: nn.Module, n_experts: int, skip: nn.Module) -> list[nn.Module]:
    """Direct children of an MoE module that score the experts (a 2-D ``weight`` with one row
    per expert) or gate a branch (one row), other than the experts ``skip``."""
    out = []
    for child in parent.children():
        if child is skip:
            continue
        w = getattr(child, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 2 and not is_conv1d(child) \
                and w.shape[0] in (n_experts, 1):
            out.append(child)
    return out


@dataclass
class _MoE:
    """The MoE parts of one block."""

    fused: list[tuple[str, nn.Module]]  # (name, experts module with fused parameters)
    lists: list[tuple[str, nn.Module, nn.ModuleList]]  # (list name, owner, per-expert list)
    routers: dict[int, tuple[str, nn.Module]]  # id(module) -> (name, router/gate module)


def _scan(block: nn.Module) -> _MoE:
    names = {id(m): n for n, m in block.named_modules()}
    fused, lists, routers = [], [], {}
    for name, mod in block.named_modules():
        if fused_params(mod):
            fused.append((name, mod))
        stacked = [p for p in mod.parameters(recurse=False) if p.ndim == 3]
        if stacked:  # experts stored as 3-D tensors (known layout or not): their router
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            for r in _router_children(parent, stacked[0].shape[0], mod):
                routers[id(r)] = (names[id(r)], r)
        for cname, child in mod.named_children():
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and \
                    len({type(c) for c in child}) == 1 and _has_linear(child[0]):
                found = _router_children(mod, len(child), child)
                if any(r.weight.shape[0] == len(child) for r in found):
                    lists.append((f"{name}.{cname}" if name else cname, mod, child))
                    for r in found:
                        routers[id(r)] = (names[id(r)], r)
    return _MoE(fused, lists, routers)


def has_experts(block: nn.Module) -> bool:
    """True when ``block`` holds experts (fused parameters or a per-expert module list)."""
    moe = _scan(block)
    return bool(moe.fused or moe.lists)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def find_layers(block: nn.Module, prefix: str = "", routers: bool = False) -> list:
    """Every layer of ``block`` the sweep compresses, in definition order: ``LinearRef`` for
    ``nn.Linear``/``Conv1D``, :class:`ExpertLinearRef` for the linears of per-expert modules,
    :class:`ExpertRef` for the slices of fused expert parameters. Routers and gates are left out
    unless ``routers`` (then they are ``LinearRef`` too, ``nn.Linear`` or not)."""
    moe = _scan(block)
    in_list = {}
    for _lname, owner, lst in moe.lists:
        for e, expert in enumerate(lst):
            for sub, m in expert.named_modules():
                if isinstance(m, nn.Linear) or is_conv1d(m):
                    in_list[id(m)] = (owner, lst, e, sub)
    fused = {id(m) for _, m in moe.fused}
    linears = {id(r.module): r for r in find_linears(block, prefix)}
    out = []
    for name, mod in block.named_modules():
        full = _join(prefix, name)
        if id(mod) in moe.routers:
            if routers:
                out.append(linears.get(id(mod)) or LinearRef(full, mod))
        elif id(mod) in in_list:
            owner, lst, e, sub = in_list[id(mod)]
            out.append(ExpertLinearRef(full, mod, owner=owner, experts=lst, expert=e, layer=sub))
        elif id(mod) in linears:
            out.append(linears[id(mod)])
        if id(mod) in fused:
            out.extend(fused_layers(mod, full))
    return out


def check_layers(blocks_name: str, blocks, layer_settings, routers: bool = False) -> dict:
    """Check, before anything changes, that every weight inside the blocks is accounted for.

    Every floating parameter of ``ndim >= 2`` must be a layer of :func:`find_layers` (whatever
    its settings), a router or gate (dense unless ``routers``), an ``nn.Embedding`` weight, a
    bias (its name ends in ``bias``), or be named by ``ignore`` (``layer_settings(name)`` is None
    for the tensor's name or its module's). Raises :class:`UnsupportedWeights` naming the
    others. Returns the summary lines for the report: the routers left dense and the tensors
    ``ignore`` left dense (empty dict when there are none).
    """
    unknown, ignored, dense_routers = [], [], []
    router_params = 0
    for b, blk in enumerate(blocks):
        prefix = f"{blocks_name}.{b}"
        covered = set()
        for r in find_layers(blk, prefix, routers=routers):
            if isinstance(r, ExpertRef):
                covered.add(id(getattr(r.module, r.param)))
            else:
                covered.add(id(r.module.weight))
        moe = _scan(blk)
        if not routers:
            for _, (rname, r) in moe.routers.items():
                covered.add(id(r.weight))
                dense_routers.append(_join(prefix, rname))
                router_params += r.weight.numel()
        for name, mod in blk.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in covered or p.ndim < 2 or not p.is_floating_point():
                    continue
                if isinstance(mod, nn.Embedding) or pname.endswith("bias"):
                    continue
                full = _join(_join(prefix, name), pname)
                what = f"{full} {tuple(p.shape)} in {type(mod).__name__}"
                if layer_settings(full) is None or layer_settings(_join(prefix, name)) is None:
                    ignored.append(what)
                else:
                    unknown.append(what)
                covered.add(id(p))
    if unknown:
        shown = "; ".join(unknown[:12]) + (f"; ... ({len(unknown)} in all)"
                                           if len(unknown) > 12 else "")
        raise UnsupportedWeights(
            f"compress cannot handle {len(unknown)} weight tensor(s) inside the decoder blocks "
            f"(not a linear layer, nor fused experts of a known layout: "
            f"{', '.join(FUSED_PARTS)}): {shown}. They would stay dense and the report would "
            "overstate the compression. Pass ignore=[...] with a regex naming them to leave them "
            "dense knowingly (the report then lists them)")
    notes = {}
    if dense_routers:
        notes["routers left dense"] = (f"{len(dense_routers)} tensors, {router_params:,} "
                                       "params (routers=True compresses them)")
    if ignored:
        notes["left dense by ignore"] = "; ".join(ignored)
    return notes
