"""The options of :func:`toolkit.compress`: one table, and everything derived from it.

Each :class:`Option` holds a setting's name, default, validation, help text, command-line flag
and how it appears in a short label. From the table :data:`OPTIONS` come

* :class:`LayerSettings`: the per-layer options (``scope="layer"``), what the sweep does to one
  layer, and the keys ``overrides`` accepts (:data:`OVERRIDE_KEYS`);
* :class:`CompressConfig`: every option, a frozen dataclass that validates itself;
* the command-line flags of ``toolkit compress`` / ``toolkit tradeoff`` (:func:`add_flags`,
  :func:`config_from_args`, :func:`parse_value` for ``--grid``);
* the labels: ``CompressConfig.describe()`` (``"sparsegpt 50% + gptq 4-bit g128 asym"``) and
  :func:`label` (``"SparseGPT 50% + GPTQ 4-bit g128"``, the results table).

Adding an option is one entry in :data:`OPTIONS` plus the code that uses it.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, make_dataclass, replace

from toolkit.config.menu import DEFAULT_LAYOUT, METRICS, parse_menu, parse_size
from toolkit.solver.checks import (
    GGUF_PRESETS,
    GGUF_TYPES,
    check_bits,
    check_gguf,
    check_group_size,
    check_pattern,
    check_refine_iters,
    check_sparsity,
)

__all__ = ["Option", "OPTIONS", "LayerSettings", "CompressConfig", "OVERRIDE_KEYS",
           "option", "parse_value", "add_flags", "config_from_args", "label", "options_doc",
           "check_refine_iters", "METHODS", "QUANTS"]

METHODS = ("sparsegpt", "wanda", "magnitude")
QUANTS = ("gptq", "rtn")
_PRETTY = {"sparsegpt": "SparseGPT", "wanda": "Wanda", "magnitude": "magnitude", "gptq": "GPTQ",
           "rtn": "RTN"}


# ---- validators (each raises ValueError naming the option and the allowed values) -----------

def _bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


ALLOCATIONS = ("uniform", "owl")


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


def _int(low: int, what: str = "", allow_none: bool = False):
    def check(value, name):
        if value is None and allow_none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            kind = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"{name} must be {kind}{what}, got {value!r}")
        return value
    return check


def _number(low: float, high: float, what: str = "", high_open: bool = False):
    def check(value, name):
        bad = isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not low <= value <= high or \
            (high_open and value == high)
        if bad:
            rng = f"[{low:g}, {high:g}{')' if high_open else ']'}"
            raise ValueError(f"{name} must be a number in {rng}{what}, got {value!r}")
        return value
    return check


def _regexes(value, name):
    items = (value,) if isinstance(value, str) else tuple(value)
    for p in items:
        _check_regex(p, name)
    return items


def _check_regex(p, name):
    if not isinstance(p, str):
        raise ValueError(f"{name} takes regular expressions as strings, got {p!r}")
    try:
        re.compile(p)
    except re.error as e:
        raise ValueError(f"{name}: {p!r} is not a valid regular expression ({e})") from None


_COMMON_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?")


def _device(value, name):
    if value is None:
        return None
    if isinstance(value, str) and _COMMON_DEVICE.fullmatch(value):
        return value  # valid for torch.device; checked without importing torch (fast CLI)
    import torch

    try:
        torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a torch device string such as 'cpu', 'cuda' or "
                         f"'cuda:1', got {value!r}") from None
    return value


def _passthrough(value, name):
    return value


def _seed(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _owl_m(value, name):
    check_allocation("uniform", owl_m=value)
    return value


def _owl_lambda(value, name):
    check_allocation("uniform", owl_lambda=value)
    return value


def _target_bits(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a number of bits per weight > 0 (e.g. 3.2), or None, "
                         f"got {value!r}")
    return float(value)


def _target_size(value, name):
    return None if value is None else parse_size(value, name)


def _budget_menu(value, name):
    return None if value is None else tuple(o.spec for o in parse_menu(value, name))


def _fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction in (0, 1], got {value!r}")
    return float(value)


def _holdout(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _budget_guard(value, name):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not value > 1:
        raise ValueError(f"{name} must be a number > 1 (a perplexity ratio) or None (no "
                         f"check), got {value!r}")
    return float(value)


def _parse_guard(text: str):
    return None if text.strip().lower() == "none" else _parse_float(text)


def _budget_label(fmt):
    return lambda v, s, long: None if v is None else fmt(v)


# ---- parsers: a command-line string -> a value (then checked) --------------------------------

def _parse_int(text: str):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None


def _parse_float(text: str):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None


def _parse_bool(text: str):
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean (true/false): {text!r}")


def _parse_optional(inner):
    return lambda text: None if text.strip().lower() == "none" else inner(text)


# ---- the table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """One setting of :func:`toolkit.compress`.

    ``check(value, name)`` validates and normalises a value (raising ``ValueError`` that names
    the option and the allowed values); ``parse(text)`` turns a command-line string into a value
    (None: the string itself); ``flag``: the command-line flag (None: not on the command line);
    ``scope``: ``"layer"`` for per-layer settings (in :class:`LayerSettings`, allowed in
    ``overrides``) or ``"run"``; ``label(value, settings, long)``: this option's words in a
    label, or None; ``part``: the label part it belongs to (``"prune"``, ``"quant"`` or its
    own).
    """

    name: str
    default: object
    check: Callable
    help: str
    scope: str = "run"
    flag: str | None = None
    parse: Callable | None = None
    metavar: str | None = None
    label: Callable | None = None
    part: str | None = None
    annotation: str = "object"
    choices: tuple | None = None
    #: the flag's help where it differs from ``help`` (values only Python can pass left out)
    cli_help: str | None = None

    def validate(self, value):
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(repr, self.choices))}, "
                             f"got {value!r}")
        return self.check(value, self.name)


def _method_label(v, s, long):
    return v if long else _PRETTY[v]


def _quant_label(v, s, long):
    return v if long else _PRETTY[v]


def _group_label(v, s, long):
    if getattr(s, "gguf", None) is not None:
        return None  # the GGUF type fixes the blocks
    return f"g{v}" if v else ("per-channel" if long else "per-row")


OPTIONS: tuple[Option, ...] = (
    # per layer: what the solver does (overridable by layer name)
    Option("sparsity", 0.0, lambda v, n: check_sparsity(v, n),
           "unstructured fraction pruned per layer, in [0, 1)", scope="layer", flag="--sparsity",
           parse=_parse_float, label=lambda v, s, long: f"{v:.0%}" if v and s.pattern is None
           else None, part="prune", annotation="float"),
    Option("pattern", None, lambda v, n: check_pattern(v, n),
           "n:m semi-structured sparsity instead, e.g. 2:4 or 4:8 (n of every m consecutive "
           "input weights pruned)", scope="layer", flag="--pattern", metavar="N:M",
           parse=_parse_optional(str),
           label=lambda v, s, long: f"{v[0]}:{v[1]}" if v is not None else None, part="prune",
           annotation="tuple[int, int] | str | None"),
    Option("bits", None, lambda v, n: check_bits(v, n),
           "quantize to 2..8 bits (16 or None: no quantization)", scope="layer", flag="--bits",
           cli_help="quantize to 2..8 bits (16: no quantization; default: none)",
           parse=_parse_int, label=lambda v, s, long: f"{v}-bit" if v is not None else None,
           part="quant", annotation="int | None"),
    Option("gguf", None, lambda v, n: check_gguf(v, n),
           "quantize onto a GGUF block type instead of bits: " + ", ".join(GGUF_TYPES)
           + ", or a llama.cpp preset (" + ", ".join(GGUF_PRESETS) + ": a type per tensor, as "
           "llama.cpp chooses them); the weights are put on exactly the values that type "
           "stores, so save_gguf writes the solver's codes bit for bit (group_size, sym and mse "
           "are not used)", scope="layer", flag="--gguf", metavar="TYPE",
           parse=_parse_optional(str), label=lambda v, s, long: v, part="quant",
           annotation="str | None"),
    Option("group_size", 128, lambda v, n: check_group_size(v, n),
           "columns per quantization grid (128); None or -1: one grid per row. A last narrower "
           "group gets its own grid", scope="layer", flag="--group-size",
           parse=_parse_optional(_parse_int), label=_group_label, part="quant",
           annotation="int | None"),
    Option("sym", False, _bool, "symmetric grids (default asymmetric)", scope="layer",
           flag="--sym", parse=_parse_bool,
           label=lambda v, s, long: None if getattr(s, "gguf", None) is not None else
           (("sym" if v else "asym") if long else ("sym" if v else None)),
           part="quant", annotation="bool"),
    Option("act_order", False, _bool, "GPTQ: visit columns by descending Hessian diagonal",
           scope="layer", flag="--act-order", parse=_parse_bool,
           label=lambda v, s, long: "act-order" if v else None, part="quant",
           annotation="bool"),
    Option("static_groups", False, _bool,
           "quantization groups on the natural column ranges, every grid fitted before the "
           "sweep (GPTQ's static groups); with act_order the columns are still visited by "
           "descending Hessian diagonal, and the result can be saved in the standard format "
           "(compressed-tensors actorder 'weight')", scope="layer", flag="--static-groups",
           parse=_parse_bool, label=lambda v, s, long: "static groups" if v else None,
           part="quant", annotation="bool"),
    Option("mse", False, _bool, "search each grid's clipping range for the smallest error",
           scope="layer", flag="--mse", parse=_parse_bool,
           label=lambda v, s, long: "mse" if v else None, part="quant", annotation="bool"),
    Option("method", "sparsegpt", _passthrough, "pruning rule: sparsegpt, wanda or "
           "magnitude", scope="layer", flag="--method", label=_method_label, part="prune",
           annotation="str", choices=METHODS),
    Option("quant", "gptq", _passthrough, "quantization rule: gptq or rtn (round to "
           "nearest)", scope="layer", flag="--quant", label=_quant_label, part="quant",
           annotation="str", choices=QUANTS),
    Option("refine_iters", 0, lambda v, n: check_refine_iters(v, n),
           "re-solve the kept weights of each pruned layer with this many conjugate-gradient "
           "iterations after its mask is chosen (0 = plain SparseGPT; 20 is plenty); never "
           "raises a layer's error", scope="layer", flag="--refine-iters", metavar="N",
           parse=_parse_int,
           label=lambda v, s, long: (f"re-solve {v} it" if long else f"re-solve {v}") if v
           else None, part="refine", annotation="int"),
    # the whole run
    Option("calibration", None, _passthrough,
           "calibration text: python-docs (offline default), wikitext2 (hub, or the bundled "
           "copy offline), c4, ptb (hub), a text file, a list of strings or a tensor of token "
           "ids", flag="--calibration", metavar="SOURCE",
           cli_help="calibration text: python-docs (offline default), wikitext2 (hub, or the "
                    "bundled copy offline), c4, ptb (hub) or a text file"),
    Option("nsamples", None, _int(1, " (or None for the device default)", allow_none=True),
           "calibration windows (None: 128 on CUDA, 32 on CPU)", flag="--nsamples",
           cli_help="calibration windows (default: 128 on CUDA, 32 on CPU)",
           parse=_parse_int, annotation="int | None"),
    Option("seqlen", None, _int(1, " (or None for the device default)", allow_none=True),
           "tokens per calibration window (None: 2048 on CUDA, 512 on CPU, capped at the "
           "model's context)", flag="--seqlen", parse=_parse_int, annotation="int | None",
           cli_help="tokens per calibration window (default: 2048 on CUDA, 512 on CPU, capped "
                    "at the model's context)"),
    Option("device", None, _device, "where each block is solved (None: CUDA when available, "
           "else CPU); the rest of the model stays where it is", flag="--device",
           cli_help="where each block is solved, e.g. cpu, cuda, cuda:1 (default: CUDA when "
                    "available, else CPU); the rest of the model stays where it is",
           annotation="str | None"),
    Option("ignore", (), _regexes, "regular expressions of layer names to leave alone",
           flag="--ignore", metavar="REGEX", annotation="tuple[str, ...]"),
    Option("overrides", None, _passthrough,
           "{regex: {setting: value}} per-layer settings, e.g. {'down_proj': {'bits': 8}}",
           annotation="dict | None"),
    Option("block_size", 128, _int(1), "solver column block (128)", flag="--block-size",
           parse=_parse_int, annotation="int"),
    Option("percdamp", 0.01, _number(0, 10, high_open=True),
           "Hessian damping, a fraction of mean(diag H) (0.01)", flag="--percdamp",
           parse=_parse_float, annotation="float"),
    Option("seed", 0, _seed, "seed of the calibration window draw",
           flag="--seed", parse=_parse_int, annotation="int"),
    Option("verbose", True, _bool, "progress bar and per-layer log", annotation="bool"),
    Option("hessian_dtype", "float32", _passthrough, "dtype the Hessians are accumulated in",
           flag="--hessian-dtype", annotation="str", choices=("float32", "float64")),
    Option("expert_hessian", "routed", _passthrough,
           "mixture-of-experts models: each expert's Hessian from the tokens the router sends it "
           "(routed), or from every calibration token (all: the experts are called once more "
           "with every token sent to every expert; the block's output still follows the "
           "router). An expert that receives no token gets the all-token Hessian either way; "
           "the report's tokens and hessian columns say which", flag="--expert-hessian",
           label=lambda v, s, long: "all-token expert Hessians" if v == "all" else None,
           annotation="str", choices=("routed", "all")),
    Option("routers", False, _bool,
           "mixture-of-experts models: compress the routers (the layers that score the experts) "
           "and the one-output gates beside them (e.g. Qwen2-MoE's shared_expert_gate) too; by "
           "default they stay dense (small, and every token's choice of experts depends on "
           "them)", flag="--routers", parse=_parse_bool,
           label=lambda v, s, long: "routers compressed" if v else None, annotation="bool"),
    Option("schedule", "sequential", _passthrough,
           "order of the Hessians inside a block: sequential (each group of layers, q/k/v -> o "
           "-> gate/up -> down, is solved on the inputs the already-compressed groups before it "
           "produce) or parallel (every group's Hessian from one pass of the unchanged block, "
           "as the GPTQ/SparseGPT papers' code does)", flag="--schedule",
           label=lambda v, s, long: None if v == "sequential" else (
               f"{v} schedule" if long else v), part="schedule", annotation="str",
           choices=("sequential", "parallel")),
    Option("asymmetric", False, _bool,
           "asymmetric targets: each layer the sweep solves fits the full-precision model's "
           "output from its inputs in the compressed model (min ||W' X_c - W X_d||), correcting "
           "the error earlier layers left; the full-precision hidden states are carried beside "
           "the compressed ones (one more copy of the calibration activations and of one block)",
           flag="--asymmetric", parse=_parse_bool,
           label=lambda v, s, long: "asymmetric targets" if v else None, annotation="bool"),
    Option("reconstruct_steps", 0, _int(0),
           "block reconstruction: after each block's layers are solved, this many Adam steps "
           "(one calibration window each) fit the block's output to the full-precision "
           "block's, pruned weights kept at 0 and quantized weights on their grids (codes "
           "kept, scales refit); never kept if it raises the block's error (0 = off)",
           flag="--reconstruct-steps", metavar="N", parse=_parse_int,
           label=lambda v, s, long: f"block reconstruction {v} steps" if v else None,
           annotation="int"),
    Option("effort", "default", _passthrough,
           "default: today's sweep; max: the most accurate combination the toolkit has, each "
           "part that is left at its default turned on (asymmetric targets, block "
           "reconstruction, the mask-fixed re-solve and OWL allocation for unstructured "
           "pruning; see EFFORT_MAX); slower", flag="--effort", annotation="str",
           label=lambda v, s, long: "effort max" if v == "max" else None,
           choices=("default", "max")),
    Option("sweep_memory_mb", None, _int(0, " (or None for the device default)", allow_none=True),
           "MiB the sweep may use on the compute device besides the block, its Hessians and the "
           "calibration activations: one forward of all windows per block when their "
           "activations fit, else a quarter for a batch of windows and the rest to keep the "
           "outputs of already-solved parts of the block for the next pass (None: a quarter of "
           "the GPU's memory on CUDA, 1024 on the CPU; 0: one window at a time, nothing kept). "
           "Results depend on it only through float rounding", flag="--sweep-memory-mb",
           parse=_parse_optional(_parse_int),
           metavar="MiB", annotation="int | None"),
    Option("allocation", "uniform", _passthrough,
           "per-layer sparsity: uniform, or owl (blocks with more outlier weights pruned less; "
           "the total stays exactly at sparsity)", flag="--allocation",
           label=lambda v, s, long: None if v == "uniform" else (
               f"{v} allocation (M={s.owl_m:g}, lambda={s.owl_lambda:g})" if long
               else f"{v.upper()} allocation"), part="allocation", annotation="str",
           choices=("uniform", "owl")),
    Option("owl_m", 5.0, _owl_m, "owl: outlier threshold, a multiple of the block's mean "
           "|W|*||X|| (5)", flag="--owl-m", parse=_parse_float, annotation="float"),
    Option("owl_lambda", 0.08, _owl_lambda, "owl: largest deviation of a block's sparsity "
           "from sparsity (0.08)", flag="--owl-lambda", parse=_parse_float,
           annotation="float"),
    # compress to a size (toolkit.plan.budget): each layer's option chosen under a byte budget
    Option("target_bits", None, _target_bits,
           "compress to this many bits per weight of the budgeted layers (every linear layer "
           "of the blocks that ignore does not exclude; scales, zero points and masks "
           "included), choosing each layer's sparsity and bits from budget_menu so that the "
           "summed error is smallest", flag="--target-bits", parse=_parse_float, metavar="BITS",
           label=_budget_label(lambda v: f"budget {v:g} bits/weight"), part="budget",
           annotation="float | None"),
    Option("target_size", None, _target_size,
           "compress so that the whole checkpoint (dense tensors at 16 bits) takes at most this "
           "many bytes: an integer or a size such as 60MB or 1.5GiB (MB = 10^6 bytes)",
           flag="--target-size", metavar="SIZE",
           label=_budget_label(lambda v: f"budget {v / 1e6:.1f} MB"), part="budget",
           annotation="int | str | None"),
    Option("budget_layout", DEFAULT_LAYOUT, _passthrough,
           "the checkpoint layout the budget counts bytes in (toolkit.checkpoint.size; save in the same "
           "layout): standard (what transformers and vLLM load: every code stored, sparse-only layers "
           "dense, so sparsity saves nothing) or compact (kept codes + bitmask: sparsity saves "
           "bytes; read by load_compressed)",
           flag="--budget-layout",
           label=lambda v, s, long: f"{v} layout" if long and (
               s.target_bits is not None or s.target_size is not None) else None,
           part="budget", annotation="str", choices=("standard", "compact")),
    Option("budget_menu", None, _budget_menu,
           "the options each layer may take under a target, comma-separated [SPARSITY+]BITS "
           "specs such as 16,8g128,4g128,4g32,3g128,50%+4g128,2:4+4g128 (None: "
           "toolkit.config.menu.DEFAULT_MENU)", flag="--budget-menu", metavar="SPECS",
           cli_help="the options each layer may take under a target, comma-separated "
                    "[SPARSITY+]BITS specs such as 16,8g128,4g128,4g32,3g128,50%+4g128,2:4+4g128 "
                    "(default: the ladder toolkit.config.menu.DEFAULT_MENU)",
           annotation="tuple[str, ...] | None"),
    Option("budget_metric", "fisher", _passthrough,
           "how layers' errors are made comparable under a target: fisher (each output "
           "weighted by the squared gradient of the calibration loss: an estimate of the loss "
           "increase; one extra forward and backward pass), relative (error over the layer's "
           "output energy tr(W H W^T)) or raw (tr(dW H dW^T))", flag="--budget-metric",
           annotation="str", choices=METRICS),
    Option("profile_rows", 0.25, _fraction,
           "under a target, the fraction of each layer's rows the profile solves per option "
           "(at least 64 rows; 1 = all)", flag="--profile-rows", parse=_parse_float,
           annotation="float"),
    Option("profile_holdout", 0.5, _holdout,
           "under a target, the fraction of the calibration windows the profile holds out: "
           "each option is solved on the other windows and its error measured on these (an "
           "error measured on the windows the solve fitted understates what it does to other "
           "text, most for layers with many inputs for few tokens); 0 = solve and measure on "
           "all windows. "
           "The sweep itself always uses every window", flag="--profile-holdout",
           parse=_parse_float, annotation="float"),
    Option("budget_search", 0, _int(0),
           "under a target, steps of a local search after the knapsack (an experiment, off by "
           "default: on SmolLM2 it fits the preview, not the model, see docs/size-budget.md): "
           "each step moves one layer to its next larger option and pays with cheaper options "
           "elsewhere, and keeps the change only when the plan's preview (the model with each "
           "layer's profiled error in place) reads the last calibration windows better; one or "
           "two forward passes over them per step (0 = the knapsack's plan)",
           flag="--budget-search", metavar="STEPS",
           parse=_parse_int, annotation="int"),
    Option("budget_calibrate", False, _bool,
           "under a target, weigh the planner's sum per layer kind (q_proj, down_proj, ...) "
           "by the model's own loss: one preview pass per kind, each kind's layers at their "
           "cheapest option of 3 bits or more, the measured loss increase over the predicted "
           "one is the kind's factor (an experiment, off by default; docs/size-budget.md)",
           flag="--budget-calibrate", parse=_parse_bool, annotation="bool"),
    Option("budget_guard", 3.0, _budget_guard,
           "under a target, the largest perplexity ratio (compressed / dense, on the last "
           "calibration windows) a plan may reach: predicted before the sweep (the plan's "
           "preview, no weight changed; the error names the smallest target that stays "
           "within it) and measured after it; a plan beyond it stops with an error instead of "
           "returning a broken model (None or 'none': no check)", flag="--budget-guard",
           parse=_parse_guard, metavar="RATIO", annotation="float | None"),
)


_BY_NAME = {o.name: o for o in OPTIONS}
OVERRIDE_KEYS = tuple(o.name for o in OPTIONS if o.scope == "layer")


def option(name: str) -> Option:
    """The :class:`Option` called ``name``."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown option {name!r}; options: {', '.join(_BY_NAME)}") from None


def parse_value(name: str, text: str):
    """A command-line string for option ``name`` turned into a checked value."""
    opt = option(name)
    value = opt.parse(text) if opt.parse is not None else text
    return opt.validate(value)


def _check_combination(values, block_size: int, layer: bool = True) -> None:
    """The checks that involve several per-layer options (``layer``: the settings of one layer,
    as opposed to the global ones, which overrides may still complete)."""
    sparsity, pattern = values.sparsity, values.pattern
    if layer and values.refine_iters and not values.prunes:
        raise ValueError(f"refine_iters={values.refine_iters} re-solves the weights a pruning "
                         f"mask keeps: it needs sparsity or pattern")
    if pattern is not None and sparsity:
        raise ValueError(f"give either sparsity (unstructured) or pattern (n:m), not both: "
                         f"sparsity={sparsity}, pattern={pattern[0]}:{pattern[1]}")
    if pattern is not None and values.act_order:
        raise ValueError("act_order cannot be combined with pattern (n:m acts on the natural "
                         "column order)")
    if pattern is not None and block_size % pattern[1]:
        raise ValueError(f"block_size ({block_size}) must be a multiple of m={pattern[1]}")
    if values.gguf is not None:
        clash = [f"{k}={getattr(values, k)!r}" for k in ("bits", "act_order", "static_groups",
                                                          "refine_iters")
                 if getattr(values, k) not in (None, False, 0)]
        if clash:
            raise ValueError(f"gguf={values.gguf!r} sets the grid of every layer it applies to; "
                             f"it cannot be combined with {', '.join(clash)} (GGUF blocks are "
                             "natural column ranges fitted in order; to give a layer another "
                             "type, use overrides with {'gguf': TYPE}, or {'gguf': None, "
                             "'bits': B} to leave GGUF there)")


# ---- the per-layer settings -------------------------------------------------------------------

class _LayerSettingsBase:
    """What to do to one layer (the configuration after ``overrides``)."""

    @property
    def prunes(self) -> bool:
        return self.sparsity > 0 or self.pattern is not None

    @property
    def quantizes(self) -> bool:
        """On a grid: a uniform one (``bits``) or a GGUF type (``gguf``)."""
        return self.bits is not None or self.gguf is not None

    @property
    def active(self) -> bool:
        return self.prunes or self.quantizes

    @property
    def needs_hessian(self) -> bool:
        """Magnitude pruning and round-to-nearest need no calibration data; the rest do."""
        return (self.prunes and (self.method != "magnitude" or self.refine_iters > 0)) or (
            self.quantizes and self.quant == "gptq")

    def to_dict(self) -> dict:
        """The settings as plain JSON-able values (pattern as a list)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if d["pattern"] is not None:
            d["pattern"] = list(d["pattern"])
        return d

    @classmethod
    def from_dict(cls, d: dict):
        """Settings from :meth:`to_dict` output (missing keys take their defaults; values are
        validated)."""
        values = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                if v is None and _BY_NAME[f.name].default is not None:
                    continue  # e.g. group_size/sym stored as None for an unquantized layer
                values[f.name] = _BY_NAME[f.name].validate(tuple(v) if isinstance(v, list) else v)
        return cls(**values)


def _dataclass(name: str, options, base, doc: str, extra=()):
    specs = [(o.name, o.annotation, field(default=o.default)) for o in options] + list(extra)
    cls = make_dataclass(name, specs, bases=(base,), frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


LayerSettings = _dataclass(
    "LayerSettings", [o for o in OPTIONS if o.scope == "layer"], _LayerSettingsBase,
    "What to do to one layer (the configuration after ``overrides``); fields: "
    + ", ".join(OVERRIDE_KEYS) + ".")


def label(settings, long: bool = False, extra=None) -> str:
    """A short name for per-layer settings (and the run options ``extra`` holds, e.g. a
    :class:`CompressConfig`): ``"SparseGPT 50% + GPTQ 4-bit g128"``, or with ``long=True``
    ``"sparsegpt 50% + gptq 4-bit g128 asym"``. Empty when nothing is done."""
    parts: dict[str, list[str]] = {}
    show = {"prune": settings.prunes, "quant": settings.quantizes}
    for opt in OPTIONS:
        if opt.label is None:
            continue
        source = settings if opt.scope == "layer" else extra
        if source is None:
            continue
        part = opt.part or opt.name
        if not show.get(part, True):
            continue
        words = opt.label(getattr(source, opt.name), source, long)
        if words:
            parts.setdefault(part, []).append(words)
    if "prune" in parts:  # the rule first: "SparseGPT 50%"
        p = parts["prune"]
        parts["prune"] = [p[-1]] + p[:-1]
    if "quant" in parts:  # "GPTQ 4-bit g128 ..."
        p = parts["quant"]
        parts["quant"] = [p[-1]] + p[:-1]
    return " + ".join(" ".join(words) for words in parts.values())


# ---- the whole configuration ------------------------------------------------------------------

#: What ``effort="max"`` turns on, each only where the setting is left at its default (measured
#: on SmolLM2: bench/reconstruct.py, docs/reconstruction.md). ``refine_iters`` applies to pruning,
#: ``allocation`` to unstructured pruning.
EFFORT_MAX = {"asymmetric": True, "reconstruct_steps": 32, "refine_iters": 20,
              "allocation": "owl"}


class _ConfigBase:
    def __post_init__(self):
        set_ = object.__setattr__
        effort = _BY_NAME["effort"].validate(self.effort)
        set_(self, "effort_set", ())  # the settings effort="max" turned on
        if effort == "max":
            if self.target_bits is not None or self.target_size is not None:
                raise ValueError("effort='max' does not cover target_bits/target_size yet; give "
                                 "sparsity/bits, or leave effort='default'")
            prunes = (self.pattern is not None or (
                isinstance(self.sparsity, (int, float)) and self.sparsity > 0))
            for name, value in EFFORT_MAX.items():
                if name == "refine_iters" and not (prunes and self.method == "sparsegpt"):
                    continue
                if name == "allocation" and not (self.pattern is None and prunes):
                    continue
                if getattr(self, name) == _BY_NAME[name].default:
                    set_(self, name, value)
                    set_(self, "effort_set", (*self.effort_set, name))
        for opt in OPTIONS:
            if opt.name != "overrides":
                set_(self, opt.name, opt.validate(getattr(self, opt.name)))
        base = LayerSettings(**{k: getattr(self, k) for k in OVERRIDE_KEYS})
        _check_combination(base, self.block_size, layer=not self.overrides)
        if self.allocation != "uniform":
            check_allocation(self.allocation, self.owl_m, self.owl_lambda)
            planned = self.target_bits is not None or self.target_size is not None
            if not base.sparsity and not planned:  # with a target: the menu's pruned options
                raise ValueError(
                    f"allocation={self.allocation!r} distributes unstructured sparsity over the "
                    f"layers: it needs sparsity > 0 (an n:m pattern fixes every layer's sparsity "
                    f"at n/m), got sparsity={base.sparsity}")
        set_(self, "overrides", self._check_overrides(base))
        set_(self, "_settings", base)
        if (self.target_bits is not None or self.target_size is not None) and (
                base.gguf is not None or any("gguf" in c for c in (self.overrides or {}).values())):
            raise ValueError("target_bits/target_size do not plan over GGUF types yet: give gguf "
                             "(a type or a preset) without a size target")

    def _check_overrides(self, base):
        if self.overrides is None:
            return None
        if not isinstance(self.overrides, dict):
            raise ValueError("overrides must be a dict mapping a layer-name regex to a dict of "
                             "settings, e.g. {'down_proj': {'bits': 8}}")
        clean = {}
        for p, changes in self.overrides.items():
            _check_regex(p, "overrides")
            if not isinstance(changes, dict):
                raise ValueError(f"overrides[{p!r}] must be a dict of settings")
            bad = set(changes) - set(OVERRIDE_KEYS)
            if bad:
                raise ValueError(f"overrides[{p!r}] has unknown keys {sorted(bad)}; allowed: "
                                 f"{', '.join(OVERRIDE_KEYS)}")
            try:  # the merged per-layer settings must make sense on their own
                merged = {k: option(k).validate(v) for k, v in changes.items()}
                sub = replace(base, **merged)
                _check_combination(sub, self.block_size)
            except ValueError as e:
                raise ValueError(f"overrides[{p!r}] (merged with the global settings): "
                                 f"{e}") from None
            clean[p] = merged
        return clean

    @property
    def settings(self) -> LayerSettings:
        """The per-layer settings before ``ignore`` and ``overrides``."""
        return self._settings

    @property
    def asks_for_work(self) -> bool:
        """False when no layer can change, as far as the settings alone tell (no model needed):
        no sparsity, pattern or bits globally nor in any override, and no size target."""
        if self.target_bits is not None or self.target_size is not None or \
                self._settings.active:
            return True
        return any(replace(self._settings, **changes).active
                   for changes in (self.overrides or {}).values())

    def layer_settings(self, name: str) -> LayerSettings | None:
        """Settings for the layer ``name``: None when ignored; ``overrides`` (regex -> dict)
        apply in order, later ones winning."""
        return resolve_settings(name, self._settings, self.ignore, self.overrides)

    def describe(self) -> str:
        """A short human description, e.g. ``'sparsegpt 50% + gptq 4-bit g128 asym'``."""
        return label(self._settings, long=True, extra=self) or "dense (nothing to do)"

    def to_dict(self) -> dict:
        """The configuration as a plain dict (for logs and checkpoints); the calibration is
        named."""
        d = {o.name: getattr(self, o.name) for o in OPTIONS}
        if type(d["calibration"]).__name__ == "Tensor":
            d["calibration"] = "token ids"
        elif isinstance(d["calibration"], (list, tuple)):
            d["calibration"] = "given text"
        return d


CompressConfig = _dataclass(
    "CompressConfig", OPTIONS, _ConfigBase,
    "All settings of :func:`toolkit.compress` (see :data:`toolkit.config.options.OPTIONS`); validated "
    "on construction.",
    extra=[("_settings", "LayerSettings",
            field(init=False, repr=False, compare=False, default=None))])


def resolve_settings(name: str, base, ignore, overrides):
    """Settings for the layer ``name``: None when a regex of ``ignore`` matches; the
    ``overrides`` whose regex matches apply in order, later ones winning."""
    if any(re.search(p, name) for p in ignore):
        return None
    s = base
    for pattern, changes in (overrides or {}).items():
        if re.search(pattern, name):
            s = replace(s, **changes)
    return s


def options_doc() -> str:
    """The option table as docstring text: ``name (default): help``, per-layer ones first."""
    lines = ["", "    Options (per layer, allowed in ``overrides``):"]
    for scope, title in (("layer", None), ("run", "    Options (the whole run):")):
        if title:
            lines += ["", title]
        for o in OPTIONS:
            if o.scope == scope:
                lines.append(f"        {o.name} ({o.default!r}): {o.help}.")
    return "\n".join(lines) + "\n"


# ---- command-line flags -----------------------------------------------------------------------

def _arg_type(opt: Option):
    def parse(text: str):
        try:
            return parse_value(opt.name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = opt.name  # argparse names the type in some messages
    return parse


def add_flags(parser: argparse.ArgumentParser, names=None) -> None:
    """Add the flags of the options ``names`` (default: every option with a flag)."""
    for opt in OPTIONS:
        if opt.flag is None or (names is not None and opt.name not in names):
            continue
        text = opt.cli_help or opt.help
        kwargs = dict(dest=opt.name, help=text.replace("%", "%%"))  # argparse %-formats help
        if opt.annotation == "bool":
            kwargs.update(action="store_true", default=opt.default)
        elif opt.name == "ignore":
            kwargs.update(nargs="+", default=(), metavar=opt.metavar, type=_arg_type(opt))
        else:
            kwargs.update(type=_arg_type(opt), default=opt.default)
            if opt.choices is not None:
                kwargs["metavar"] = "{" + ",".join(opt.choices) + "}"
            elif opt.metavar:
                kwargs["metavar"] = opt.metavar
        parser.add_argument(opt.flag, **kwargs)


def config_from_args(args: argparse.Namespace, **extra) -> CompressConfig:
    """A :class:`CompressConfig` from parsed flags (options without a flag, or not parsed, keep
    their defaults; ``extra`` sets more)."""
    values = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    if isinstance(values.get("ignore"), list):
        values["ignore"] = tuple(v for group in values["ignore"] for v in
                                 (group if isinstance(group, tuple) else (group,)))
    values.update(extra)
    return CompressConfig(**values)

