"""Compress to a size: each layer's sparsity and bits chosen from the solver's own errors.

    report = compress(model, tok, target_bits=3.2)       # 3.2 bits per weight, budgeted layers
    report = compress(model, tok, target_size="60MB")    # the whole checkpoint, 60 * 10**6 bytes

Three steps, all with the shared solver and size accounting:

1. **Profile** (:func:`toolkit.walk.budget.profile_layers`): one pass over the *dense* model, block by block. For
   every group of layers that read the same input, one Hessian (all groups of a block from one
   forward pass) and one factorisation per act-order setting; then, for every option of the
   menu (:data:`DEFAULT_MENU`, e.g. ``"4g128"``, ``"50%+3g128"``), the group's layers solved
   stacked, which gives each layer's error ``tr(dW H dW^T)`` for that option: every grid
   without pruning in one sweep (:func:`toolkit.solver.layer.solve_grids`, each row on its own grid,
   the per-column work shared), each pruned option in one :func:`solve_layers` call. To keep
   the cost of many options near that of one compress, each option is solved
   on a random subset of each layer's rows (``profile_rows``, the same rows for every option)
   and the error is scaled up by ``rows / rows solved``. The errors are measured out of
   sample: ``profile_holdout`` (default 0.5) of the calibration windows (the last ones,
   :func:`holdout_windows`) are held out of the Hessian the options are solved with, and each
   error ``tr(dW H_held dW^T)`` (and its weighted form) is taken on theirs. On the windows a
   solve has fitted, its error understates what it does to other text, and by how much differs
   from layer to layer: most where a layer has many input columns for the calibration tokens (a
   ``down_proj`` reading 1536 columns from 2048 tokens looks several times better in sample
   than on other text), least where it has few. Summing in-sample errors, the planner would
   starve exactly the layers whose errors are most understated. The sweep itself always
   solves with every window.
2. **Plan** (:func:`plan_budget`): one option per layer minimising the summed error under the
   byte budget, the errors of different layers made comparable by ``budget_metric`` (default
   ``"fisher"``: each output row and calibration token weighted by the squared gradient of
   the calibration loss with respect to that output, :func:`output_sensitivity`, which makes
   the sum an estimate of the loss increase; ``"relative"``: each error divided by the
   layer's output energy ``tr(W H W^T)``, the report's ``rel_error``; ``"raw"``), by an exact
   multiple-choice knapsack dynamic programme over the layers (:func:`solve_knapsack`) on a
   byte axis discretised to ``r`` bytes. Each option's bytes are rounded *up* to whole units,
   so the plan never exceeds the budget, and any choice that fits in ``budget - layers * r``
   is in the programme's search space (``r`` is chosen so that this slack is at most 0.2% of
   the budget: :attr:`BudgetPlan.rounding_bytes`).
3. **Sweep** (:func:`toolkit.walk.budget.budget_sweep`): the ordinary sequential sweep, block by
   block (:func:`toolkit.walk.sweep.sweep_block`), each layer with its chosen settings. After each block
   the bytes its layers really take are counted; when they differ from the plan (kept codes
   that quantize to exactly 0 are stored as pruned in the compact layout, so a pruned layer can
   take fewer bytes than planned, never more) the remaining layers are planned again with the
   bytes left.

Granularity: one option per *layer* (q, k and v may differ). The layers of a group share the
Hessian and the factorisation, so profiling per layer costs nothing more than per group (each
layer's rows are solved as in its own solve), and a finer choice can only lower the optimum;
each layer stays storable on its own (its format does not depend on its neighbours).

Bytes are those of the checkpoint layout the model will be written in (``budget_layout``, a
layout of :mod:`toolkit.checkpoint.size`): in ``"standard"`` (the layout ``transformers`` loads: every
quantized code stored, pruned weights at the zero point, sparse-only layers dense) pruning saves
no bytes, so pruned options are dropped from the menu before profiling (they cost the same as
the unpruned option and only add error); in ``"compact"`` (kept codes + bitmask,
``save_compressed(layout="compact")``) sparsity saves bytes and the pruned options compete.
Dense tensors and scales count at 16 bits: save a float32 model with
``save_compressed(..., dtype=torch.float16)`` for the file to match.

Mixture-of-experts models: every expert's matrices are budgeted layers (each with a choice of
its own), profiled on the tokens the dense router sends them; each expert's values in the plan
are its errors times its token share (:attr:`BudgetProfile.share`, see :func:`option_values`).
``allocation="owl"`` (compact layout) shifts the unstructured pruned options of each block by
OWL's block shift (:func:`layer_choices`). Both are described in ``docs/size-budget.md``.

Definitions: ``target_bits`` = ``8 * bytes / parameters`` over the *budgeted layers* (every
linear layer and expert matrix inside the decoder blocks that ``ignore`` does not exclude,
including any the plan leaves at 16 bits), scales, zero points and masks included -- the same quantity as
``model_bytes(model, layout=...)["bits_per_weight"]`` after the run. ``target_size`` = the
bytes of the whole checkpoint (:func:`toolkit.checkpoint.size.model_bytes` ``["bytes"]``: the budgeted
layers plus every other tensor dense at 16 bits, tied tensors once), an integer or a string such
as ``"60MB"`` (MB = 10**6 bytes, MiB = 2**20).

The planning (this module) needs no model run; the profile and the budgeted sweep, which walk
the model, are in :mod:`toolkit.walk.budget`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from torch import nn

from toolkit.checkpoint.formats import block_key, partial_group_keys
from toolkit.checkpoint.size import linear_bytes
from toolkit.config.menu import DEFAULT_MENU, METRICS, menu_spec, parse_menu, parse_size
from toolkit.config.options import CompressConfig, LayerSettings, resolve_settings
from toolkit.model import experts
from toolkit.model.layers import LinearRef, find_blocks
from toolkit.plan.allocation import MAX_SPARSITY

__all__ = ["DEFAULT_MENU", "METRICS", "parse_menu", "parse_size", "check_budget_config",
           "wants_budget", "budgeted_layers", "LayerChoices", "layer_choices", "budget_range",
           "budget_bytes", "check_target", "BudgetProfile", "holdout_windows", "solve_knapsack",
           "BudgetPlan", "option_values", "frontier", "plan_budget", "DENSE_BITS"]

log = logging.getLogger("toolkit")

#: Dense tensors and scales are counted at this width (fp16 / bf16 checkpoints).
DENSE_BITS = 16


# ---- the configuration ---------------------------------------------------------------------

def wants_budget(config: CompressConfig) -> bool:
    """True when ``config`` asks for a size (``target_bits`` or ``target_size``)."""
    return config.target_bits is not None or config.target_size is not None


def check_budget_config(config: CompressConfig) -> None:
    """Raise ``ValueError`` for settings a size target cannot be combined with."""
    if config.target_bits is not None and config.target_size is not None:
        raise ValueError(f"give either target_bits or target_size, not both (got "
                         f"target_bits={config.target_bits}, target_size={config.target_size})")
    s = config.settings
    given = [f"{k}={getattr(s, k)!r}" for k, unset in (("sparsity", 0.0), ("pattern", None),
                                                        ("bits", None))
             if getattr(s, k) != unset]
    if given:
        raise ValueError(f"with target_bits/target_size the planner chooses sparsity, pattern, "
                         f"bits and group_size per layer from budget_menu; do not give "
                         f"{', '.join(given)} (put the settings you want in budget_menu, or fix "
                         f"some layers with overrides)")
    if config.allocation != "uniform":
        menu = parse_menu(config.budget_menu)
        if not any(o.changes().get("sparsity") and not o.changes().get("pattern") for o in menu):
            raise ValueError(f"allocation={config.allocation!r} with target_bits/target_size "
                             f"shifts the unstructured pruned options of budget_menu block by "
                             f"block; this menu has none ({config.budget_menu!r}): add one such "
                             f"as '50%+4g128'")
        if config.budget_layout != "compact":
            raise ValueError(f"allocation={config.allocation!r} with target_bits/target_size "
                             f"shifts the pruned options, which save no bytes in the "
                             f"{config.budget_layout!r} layout (the planner drops them there): "
                             f"use budget_layout='compact'")
    if config.refine_iters:
        raise ValueError("refine_iters cannot be combined with target_bits/target_size yet "
                         "(the profile would not measure the re-solved errors)")
    if s.method != "sparsegpt" or s.quant != "gptq":
        raise ValueError(f"target_bits/target_size profile every option with the shared solver: "
                         f"they need method='sparsegpt' and quant='gptq', got "
                         f"method={s.method!r}, quant={s.quant!r}")
    for opt in parse_menu(config.budget_menu):  # each option valid with the global settings
        try:
            CompressConfig(**{**{k: getattr(s, k) for k in s.to_dict()}, **opt.changes(),
                              "block_size": config.block_size})
        except ValueError as e:
            raise ValueError(f"budget_menu option {opt.spec!r} with the global settings: "
                             f"{e}") from None


# ---- the layers and their choices -------------------------------------------------------------

def budgeted_layers(model: nn.Module, config: CompressConfig) -> list[tuple[int, LinearRef]]:
    """``[(block index, layer)]``: every layer the sweep compresses inside the blocks
    (:func:`toolkit.model.experts.find_layers`: linear layers, each expert's matrices, the
    routers with ``routers=True``) that ``ignore`` does not exclude, in block order."""
    name, blocks = find_blocks(model)
    return [(b, r) for b, blk in enumerate(blocks)
            for r in experts.find_layers(blk, f"{name}.{b}", routers=config.routers)
            if config.layer_settings(r.name) is not None]


@dataclass
class LayerChoices:
    """One budgeted layer and the settings it may take (the menu after the global settings and
    ``overrides``, duplicates merged; options this layer's shape cannot take left out).
    ``block_keys``: the settings (:func:`toolkit.checkpoint.formats.block_key`) counted as stored with the
    ``block`` strategy (int8 zero points) in every layer that takes them: those that leave a
    partial last group on some budgeted layer that may take them (the export stores every
    layer of such a setting that way, see :func:`toolkit.checkpoint.formats.partial_group_keys`)."""

    name: str
    block: int
    rows: int
    cols: int
    specs: list[str]
    settings: list[LayerSettings]
    skipped: dict[str, str] = field(default_factory=dict)  # spec -> why it was left out
    block_keys: frozenset = frozenset()

    @property
    def params(self) -> int:
        return self.rows * self.cols

    def option_bytes(self, k: int, layout: str) -> float:
        """Bytes of option ``k`` in ``layout``; an upper bound for pruned options (every weight
        the mask keeps counted as stored; a kept code that lands exactly on 0 is stored as
        pruned in the compact layout) and for a setting in ``block_keys`` that no layer with
        a partial last group ends up taking (then stored with packed zero points)."""
        s = self.settings[k]
        return _settings_bytes(s, self.rows, self.cols, layout,
                               block=block_key(s) in self.block_keys)


def _settings_bytes(s: LayerSettings, rows: int, cols: int, layout: str,
                    block: bool = False) -> float:
    numel = rows * cols
    if not s.active:
        return numel * DENSE_BITS / 8
    kept = None
    if s.pattern is not None:
        kept = numel // s.pattern[1] * (s.pattern[1] - s.pattern[0])
    elif s.sparsity:
        kept = numel - round(s.sparsity * numel)
    terms = linear_bytes(rows, cols, nnz=kept, pattern=s.pattern, sparse=s.prunes,
                         bits=s.bits, group_size=s.group_size, sym=s.sym,
                         act_order=bool(s.act_order and not s.static_groups and s.bits),
                         dense_bits=DENSE_BITS, layout=layout, block=block)
    return float(sum(terms.values()))


def _pruning_saves_nothing(s: LayerSettings, rows: int, cols: int, layout: str) -> bool:
    """Whether ``s`` prunes and yet takes at least the bytes of the same setting without
    pruning in ``layout`` (every pruned option in the ``"standard"`` layout): such an option
    only adds error."""
    if not s.prunes:
        return False
    plain = replace(s, sparsity=0.0, pattern=None)
    return _settings_bytes(plain, rows, cols, layout) <= _settings_bytes(s, rows, cols, layout)


def layer_choices(model: nn.Module, config: CompressConfig, layout: str | None = None,
                  shifts: dict[int, float] | None = None) -> list[LayerChoices]:
    """The :class:`LayerChoices` of every budgeted layer. With ``layout``, options that cost at
    least as many bytes as the same option without pruning are left out (pruning only adds
    error there, e.g. every pruned option in the ``"standard"`` layout). ``shifts``
    (``allocation="owl"``, :func:`toolkit.walk.capture.owl_block_shifts`): block -> a sparsity
    shift added to every unstructured pruned option of that block's layers (kept within
    ``[0, MAX_SPARSITY]``), so that blocks with more outliers are offered lighter pruning and
    the others heavier, as OWL allocates them."""
    menu = parse_menu(config.budget_menu)
    base = config.settings
    out = []
    for b, ref in budgeted_layers(model, config):
        rows, cols = ref.get_weight().shape
        specs, settings, skipped = [], [], {}
        for opt in menu:
            s = resolve_settings(ref.name, replace(base, **opt.changes()), config.ignore,
                                 config.overrides)
            if shifts and s.sparsity > 0 and s.pattern is None:
                s = replace(s, sparsity=round(min(max(s.sparsity + shifts.get(b, 0.0), 0.0),
                                                  MAX_SPARSITY), 4))
            if s.pattern is not None and cols % s.pattern[1]:
                skipped[opt.spec] = f"{cols} columns are not a multiple of {s.pattern[1]}"
                continue
            spec = menu_spec(s.sparsity, s.pattern, s.bits, s.group_size)
            if s in settings:
                skipped[opt.spec] = f"same settings as {specs[settings.index(s)]!r} here"
                continue
            specs.append(spec)  # after overrides: what the layer really gets
            settings.append(s)
        if layout is not None:
            for k in range(len(settings) - 1, -1, -1):
                if _pruning_saves_nothing(settings[k], rows, cols, layout):
                    s = settings[k]
                    skipped[specs[k]] = (f"in the {layout} layout it takes as many bytes as "
                                         f"{menu_spec(0.0, None, s.bits, s.group_size)!r}")
                    del specs[k], settings[k]
        out.append(LayerChoices(ref.name, b, rows, cols, specs, settings, skipped))
    keys = frozenset(partial_group_keys([(s, c.cols) for c in out for s in c.settings]))
    return [replace(c, block_keys=keys) for c in out]


def budget_bytes(choices: list[LayerChoices], dense_rest: float, *, target_bits=None,
                 target_size=None) -> float:
    """The bytes the budgeted layers may take: ``target_bits * params / 8``, or
    ``target_size`` minus the dense rest of the checkpoint."""
    if target_bits is not None:
        return target_bits * sum(c.params for c in choices) / 8
    return float(target_size) - dense_rest


def budget_range(choices: list[LayerChoices], layout: str) -> tuple[float, float]:
    """``(smallest, largest)`` bytes the budgeted layers can take with these choices."""
    lo = sum(min(c.option_bytes(k, layout) for k in range(len(c.specs))) for c in choices)
    hi = sum(max(c.option_bytes(k, layout) for k in range(len(c.specs))) for c in choices)
    return lo, hi


def check_target(choices, layout, dense_rest, target_bits, target_size) -> float:
    if not choices:
        raise ValueError("no layer to budget: every linear layer of the blocks is ignored")
    lo, hi = budget_range(choices, layout)
    params = sum(c.params for c in choices)
    budget = budget_bytes(choices, dense_rest, target_bits=target_bits, target_size=target_size)
    if target_bits is not None:
        lo_v, hi_v, got, unit = 8 * lo / params, 8 * hi / params, target_bits, "bits per weight"
        fmt = "{:.4g}"
    else:
        lo_v, hi_v, got, unit = lo + dense_rest, hi + dense_rest, target_size, "bytes"
        fmt = "{:,.0f}"
    if budget < lo - 1e-6 or budget > hi + 1e-6:
        what = "below the smallest" if budget < lo else "above the largest"
        raise ValueError(
            f"{'target_bits' if target_bits is not None else 'target_size'}={fmt.format(got)} "
            f"{unit} is {what} size this menu can reach in the {layout!r} layout: the "
            f"achievable range is {fmt.format(lo_v)} .. {fmt.format(hi_v)} {unit} "
            f"({len(choices)} layers, {params:,} weights"
            + (f", {dense_rest:,.0f} bytes of dense tensors besides" if target_size else "")
            + ")")
    return budget


# ---- profiling ----------------------------------------------------------------------------

@dataclass
class BudgetProfile:
    """What :func:`profile_layers` measured, reusable for several targets and layouts.

    ``layers``: the :class:`LayerChoices`; ``errors[i][k]``: the solver's error
    ``tr(dW H dW^T)`` of layer ``i`` with option ``k`` (scaled from the rows solved to the whole
    layer; 0 for the 16-bit option; NaN when not measured); ``energy[i]``: ``tr(W H W^T)``;
    ``weighted[i][k]``: the same error with each output row weighted by the layer's
    ``sensitivity`` (None when not measured, see :func:`output_sensitivity`); ``holdout``: how
    many calibration windows were held out of the solves to measure the errors on (``H`` in
    the errors and the energy is theirs; 0: all windows, the solves' own); ``share[i]``: the
    fraction of the measuring windows' tokens that layer ``i`` sees (1 for every layer but the
    experts of a mixture-of-experts model, whose Hessians are means over the tokens the router
    sends them; None: all 1); ``dense_rest``:
    bytes of everything else in the checkpoint (dense, 16 bits); ``seconds``: wall time (of
    which ``sensitivity_seconds`` for the gradient pass); ``rows_fraction``; ``key``: a
    fingerprint of the model's weights, the calibration and the settings (checked when a
    profile is reused).
    """

    layers: list[LayerChoices]
    errors: list[list[float]]
    energy: list[float]
    dense_rest: float
    seconds: float
    rows_fraction: float
    layout: str
    key: str = ""
    weighted: list[list[float]] | None = None
    sensitivity_seconds: float = 0.0
    holdout: int = 0
    share: list[float] | None = None

    def table(self) -> pd.DataFrame:
        """One row per layer and option: ``layer``, ``block``, ``option``, ``error``,
        ``rel_error`` (error / energy), ``weighted_error`` (NaN without sensitivities),
        ``params``, ``share`` (the layer's token share, 1 but for experts)."""
        rows = []
        for i, (c, errs, en) in enumerate(zip(self.layers, self.errors, self.energy)):
            for k, (spec, err) in enumerate(zip(c.specs, errs)):
                rows.append(dict(layer=c.name, block=c.block, option=spec, error=err,
                                 rel_error=err / en if en > 0 else 0.0,
                                 weighted_error=self.weighted[i][k] if self.weighted
                                 else math.nan, params=c.params,
                                 share=self.share[i] if self.share is not None else 1.0))
        return pd.DataFrame(rows)


def holdout_windows(n: int, fraction: float) -> list[int]:
    """The calibration windows the profile holds out (``profile_holdout``): the last
    ``round(fraction * n)`` of ``n``, at least one and at most ``n - 1`` when ``fraction > 0``;
    none when ``fraction == 0`` or there is a single window."""
    if fraction <= 0 or n < 2:
        return []
    k = min(max(round(fraction * n), 1), n - 1)
    return list(range(n - k, n))


# ---- planning -------------------------------------------------------------------------------

def solve_knapsack(costs: list[list[int]], values: list[list[float]],
                   capacity: int) -> tuple[list[int], float, int]:
    """Exact multiple-choice knapsack: choose one option per item so that the summed integer
    cost is at most ``capacity`` and the summed value is smallest.

    Dynamic programme over the items with ``best[c]`` = the smallest value of the items so far
    at total cost exactly ``c``; ``O(items * options * capacity)`` time,
    ``O(items * capacity)`` memory for the choices. Among equal values the smaller total cost
    (then the lower option index) wins. Returns ``(choice per item, value, cost)``; raises
    ``ValueError`` when nothing fits.
    """
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
        raise ValueError(f"capacity must be an integer >= 0, got {capacity!r}")
    if len(costs) != len(values):
        raise ValueError("costs and values must have one list per item")
    cap = int(capacity)
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    width = max((len(c) for c in costs), default=1)
    back = np.full((len(costs), cap + 1), -1, dtype=np.int8 if width < 127 else np.int32)
    for i, (cs, vs) in enumerate(zip(costs, values)):
        if len(cs) != len(vs) or not cs:
            raise ValueError(f"item {i}: costs and values must be non-empty and of equal length")
        new = np.full(cap + 1, np.inf)
        arg = back[i]
        for k, (c, v) in enumerate(zip(cs, vs)):
            c = int(c)
            if c < 0 or not math.isfinite(v):
                raise ValueError(f"item {i} option {k}: cost must be >= 0 and value finite, "
                                 f"got {c}, {v}")
            if c > cap:
                continue
            cand = best[:cap + 1 - c] + v
            better = cand < new[c:]
            new[c:][better] = cand[better]
            arg[c:][better] = k
        best = new
    if not np.isfinite(best).any():
        raise ValueError(f"no choice fits in capacity {cap}")
    end = int(np.argmin(best))  # the first (smallest cost) among the minimal values
    total = float(best[end])
    choice = [0] * len(costs)
    c = end
    for i in range(len(costs) - 1, -1, -1):
        k = int(back[i, c])
        choice[i] = k
        c -= int(costs[i][k])
    return choice, total, end


@dataclass
class BudgetPlan:
    """One option per budgeted layer. ``choice[name]`` = index into the layer's options;
    ``budget`` (bytes the layers may take), ``planned`` (their bytes with the chosen options;
    upper bounds for pruned options in the compact layout), ``value`` (summed normalised
    error), ``resolution`` (bytes per unit of the programme's byte axis),
    ``rounding_bytes`` (``layers * resolution``: every choice that fits in
    ``budget - rounding_bytes`` was in the search space), ``layout``, ``metric``."""

    choice: dict[str, int]
    budget: float
    planned: float
    value: float
    resolution: float
    rounding_bytes: float
    layout: str
    metric: str
    layers: list[LayerChoices]

    def settings(self, name: str) -> LayerSettings:
        c = self._by_name[name]
        return c.settings[self.choice[name]]

    def spec(self, name: str) -> str:
        c = self._by_name[name]
        return c.specs[self.choice[name]]

    def __post_init__(self):
        self._by_name = {c.name: c for c in self.layers}

    @property
    def overrides(self) -> dict:
        """The plan as ``overrides`` for :func:`toolkit.compress` (one exact regex per layer)."""
        return {f"^{re.escape(c.name)}$": self.settings(c.name).to_dict()
                for c in self.layers}

    def counts(self) -> dict[str, int]:
        """How many layers took each option."""
        out: dict[str, int] = {}
        for c in self.layers:
            s = self.spec(c.name)
            out[s] = out.get(s, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def option_values(profile: BudgetProfile, i: int, metric: str) -> list[float]:
    """The values the planner sums for layer ``i``'s options under ``metric``, each times the
    layer's token share (:attr:`BudgetProfile.share`): an expert's error is a mean over the
    tokens routed to it, and what it does to the model is in proportion to how many there are,
    so an expert that few calibration tokens reach gets the cheaper options first."""
    errs = profile.errors[i]
    if len(errs) == 1:
        return [0.0]  # one option: nothing to choose, nothing was measured
    share = profile.share[i] if profile.share is not None else 1.0
    if metric == "fisher":
        if profile.weighted is None:
            raise ValueError("budget_metric='fisher' needs a profile measured with the loss "
                             "gradients (profile_layers(..., sensitivity=True))")
        return [v * share for v in profile.weighted[i]]
    if metric == "raw":
        return [e * share for e in errs]
    en = profile.energy[i]
    return [e / en * share if en > 0 else 0.0 for e in errs]


def frontier(profile: BudgetProfile, i: int, layout: str, metric: str, scale: float = 1.0
             ) -> list[tuple[float, float, int]]:
    """Layer ``i``'s options the planner considers, ``[(bytes, value, option)]`` by increasing
    bytes and decreasing value: those measured, saving bytes where they prune, and not beaten
    on both bytes and value by another option of the layer. ``scale`` multiplies the values
    (the calibrated weight of the layer's kind, :func:`toolkit.walk.budget.calibrate_scales`)."""
    c = profile.layers[i]
    v = [x * scale for x in option_values(profile, i, metric)]
    cand = sorted((c.option_bytes(k, layout), v[k], k) for k in range(len(c.specs))
                  if math.isfinite(v[k])
                  and not _pruning_saves_nothing(c.settings[k], c.rows, c.cols, layout))
    keep, best_v = [], math.inf
    for bts, val, k in cand:
        if val < best_v:
            keep.append((bts, val, k))
            best_v = val
    return keep


def plan_budget(profile: BudgetProfile, *, target_bits: float | None = None,
                target_size=None, budget: float | None = None, layout: str | None = None,
                metric: str = "fisher", layers: list[str] | None = None,
                slack: float = 0.002, scales: dict[str, float] | None = None) -> BudgetPlan:
    """Choose one option per layer minimising the summed error under the byte budget.

    The budget is ``target_bits`` (bits per weight of the budgeted layers), ``target_size``
    (bytes of the whole checkpoint, or a string such as ``"60MB"``), or ``budget`` (bytes of
    the layers ``layers``, default all). ``layout``: the size layout the bytes are counted in
    (default: the profile's). ``metric``: ``"fisher"`` sums the loss-gradient-weighted errors
    (an estimate of the loss increase, see :func:`output_sensitivity`; the profile must have
    them); ``"relative"`` sums ``error / tr(W H W^T)`` (each layer's lost fraction of its
    output energy on the calibration inputs); ``"raw"`` sums ``tr(dW H dW^T)`` as is.
    ``scales`` (layer -> factor, default 1) multiply each layer's values.

    Options whose error was not measured are left out; so is any option another one of the
    same layer beats on both bytes and error, and any pruned option that saves no bytes in
    ``layout`` (a profile measured in the compact layout reused for a standard-layout target:
    its pruned options cost there what the unpruned ones cost, and only add error). Bytes are discretised to ``resolution =
    slack * budget / layers`` bytes (at least 1) and rounded up, so the plan fits the budget
    and the programme is exact on that grid (:func:`solve_knapsack`).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(map(repr, METRICS))}, got "
                         f"{metric!r}")
    layout = layout or profile.layout
    index = {c.name: i for i, c in enumerate(profile.layers)}
    names = [c.name for c in profile.layers] if layers is None else list(layers)
    chosen_layers = [profile.layers[index[n]] for n in names]
    if budget is None:
        if target_size is not None:
            target_size = parse_size(target_size)
        budget = check_target(chosen_layers, layout, profile.dense_rest, target_bits,
                               target_size)
    opts, costs_b, vals = [], [], []
    for n in names:
        keep = frontier(profile, index[n], layout, metric, (scales or {}).get(n, 1.0))
        opts.append([k for _b, _v, k in keep])
        costs_b.append([b for b, _v, _k in keep])
        vals.append([v for _b, v, _k in keep])
    base = sum(min(cs) for cs in costs_b)
    free = budget - base
    if free < -1e-6:
        lo = base
        raise ValueError(f"budget of {budget:,.0f} bytes is below the {lo:,.0f} bytes the "
                         f"measured options of these {len(names)} layers need at least")
    resolution = max(1.0, slack * budget / max(len(names), 1))
    capacity = max(0, math.floor(max(free, 0.0) / resolution))
    costs = [[math.ceil((b - min(cs)) / resolution - 1e-9) for b in cs] for cs in costs_b]
    pick, value, _units = solve_knapsack(costs, vals, capacity)
    choice = {n: opts[j][pick[j]] for j, n in enumerate(names)}
    planned = sum(costs_b[j][pick[j]] for j in range(len(names)))
    return BudgetPlan(choice=choice, budget=budget, planned=planned, value=value,
                      resolution=resolution, rounding_bytes=resolution * len(names),
                      layout=layout, metric=metric, layers=chosen_layers)


