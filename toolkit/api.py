"""The entry point: ``compress(model, tokenizer, sparsity=0.5, bits=4)``.

Every keyword of :func:`compress` is a field of :class:`CompressConfig`, a frozen dataclass that
validates itself, so a configuration can be built, checked, stored and reused on its own.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field, fields

import pandas as pd
import torch
from torch import nn

from . import distributed
from .allocation import allocate, apply_allocation, check_allocation
from .data import DEFAULT_CALIBRATION, describe_source, get_calibration
from .masks import check_pattern, check_sparsity
from .models import find_blocks
from .quant import check_bits, check_group_size
from .refine import check_refine_iters
from .size import model_bytes
from .sweep import LayerSettings, resolve_settings, run_sweep

__all__ = ["compress", "CompressConfig", "CompressionReport", "default_calibration_size"]

log = logging.getLogger("toolkit")

METHODS = ("sparsegpt", "wanda", "magnitude")
QUANTS = ("gptq", "rtn")
OVERRIDE_KEYS = ("sparsity", "pattern", "bits", "group_size", "sym", "mse", "act_order",
                 "method", "quant", "refine_iters")


def default_calibration_size(device) -> tuple[int, int]:
    """``(nsamples, seqlen)`` used when not given: 128 x 2048 on CUDA (the papers' setting),
    32 x 512 on CPU (16x fewer tokens, so that a CPU run takes minutes, not hours).

    The environment variable ``TOOLKIT_DEFAULT_CALIBRATION="NxL"`` replaces both (the tests use
    it to keep CI short); the report always states what was used.
    """
    knob = os.environ.get("TOOLKIT_DEFAULT_CALIBRATION")
    if knob:
        try:
            n, L = (int(v) for v in knob.lower().split("x"))
            if n < 1 or L < 1:
                raise ValueError
        except ValueError:
            raise ValueError(f"TOOLKIT_DEFAULT_CALIBRATION must look like '16x256', got {knob!r}") from None
        return n, L
    if torch.device(device).type == "cuda":
        return 128, 2048
    return 32, 512


def _check_choice(value, name, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@dataclass(frozen=True)
class CompressConfig:
    """All settings of :func:`compress` (see there); validated on construction."""

    sparsity: float = 0.0
    bits: int | None = None
    pattern: tuple[int, int] | str | None = None
    group_size: int | None = 128
    sym: bool = False
    act_order: bool = False
    mse: bool = False
    method: str = "sparsegpt"
    quant: str = "gptq"
    calibration: object = None
    nsamples: int | None = None
    seqlen: int | None = None
    device: str | None = None
    ignore: tuple[str, ...] = ()
    overrides: dict | None = None
    block_size: int = 128
    percdamp: float = 0.01
    seed: int = 0
    verbose: bool = True
    hessian_dtype: str = "float32"
    refine_iters: int = 0
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    _settings: LayerSettings = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        set_ = object.__setattr__
        sparsity = check_sparsity(self.sparsity)
        pattern = check_pattern(self.pattern)
        bits = check_bits(self.bits)
        group_size = check_group_size(self.group_size)
        if pattern is not None and sparsity:
            raise ValueError(f"give either sparsity (unstructured) or pattern (n:m), not both: "
                             f"sparsity={sparsity}, pattern={self.pattern!r}")
        if pattern is not None and self.act_order:
            raise ValueError("act_order cannot be combined with pattern (n:m acts on the natural "
                             "column order)")
        for name in ("sym", "act_order", "mse", "verbose"):
            _check_bool(getattr(self, name), name)
        _check_choice(self.method, "method", METHODS)
        _check_choice(self.quant, "quant", QUANTS)
        _check_choice(self.hessian_dtype, "hessian_dtype", ("float32", "float64"))
        check_refine_iters(self.refine_iters)
        check_allocation(self.allocation, self.owl_m, self.owl_lambda)
        if self.allocation != "uniform" and not sparsity:
            raise ValueError(f"allocation={self.allocation!r} distributes unstructured sparsity "
                             f"over the layers: it needs sparsity > 0 (an n:m pattern fixes "
                             f"every layer's sparsity at n/m), got sparsity={sparsity}")
        if self.refine_iters and not (sparsity or pattern is not None or self.overrides):
            raise ValueError(f"refine_iters={self.refine_iters} re-solves the weights a pruning "
                             f"mask keeps: it needs sparsity or pattern")
        for name in ("nsamples", "seqlen"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer (or None for the device "
                                 f"default), got {v!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or \
                self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if pattern is not None and self.block_size % pattern[1]:
            raise ValueError(f"block_size ({self.block_size}) must be a multiple of m={pattern[1]}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or \
                not 0 <= self.percdamp < 10:
            raise ValueError(f"percdamp must be a number in [0, 10), got {self.percdamp!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch device string such as 'cpu', 'cuda' or "
                                 f"'cuda:1', got {self.device!r}") from None
        ignore = (self.ignore,) if isinstance(self.ignore, str) else tuple(self.ignore)
        for p in ignore:
            _check_regex(p, "ignore")
        set_(self, "ignore", ignore)
        if self.overrides is not None:
            if not isinstance(self.overrides, dict):
                raise ValueError("overrides must be a dict mapping a layer-name regex to a dict "
                                 "of settings, e.g. {'down_proj': {'bits': 8}}")
            clean = {}
            for p, changes in self.overrides.items():
                _check_regex(p, "overrides")
                if not isinstance(changes, dict):
                    raise ValueError(f"overrides[{p!r}] must be a dict of settings")
                bad = set(changes) - set(OVERRIDE_KEYS)
                if bad:
                    raise ValueError(f"overrides[{p!r}] has unknown keys {sorted(bad)}; allowed: "
                                     f"{', '.join(OVERRIDE_KEYS)}")
                merged = dict(sparsity=sparsity, pattern=pattern, bits=bits,
                              group_size=group_size, sym=self.sym, mse=self.mse,
                              act_order=self.act_order, method=self.method, quant=self.quant,
                              refine_iters=self.refine_iters)
                merged.update(changes)
                # validate the combination through a config of its own
                try:
                    sub = CompressConfig(**{k: merged[k] for k in OVERRIDE_KEYS},
                                         block_size=self.block_size)
                except ValueError as e:
                    raise ValueError(f"overrides[{p!r}] (merged with the global settings): "
                                     f"{e}") from None
                clean[p] = {k: getattr(sub._settings, k) for k in changes}
            set_(self, "overrides", clean)
        set_(self, "sparsity", sparsity)
        set_(self, "bits", bits)
        set_(self, "pattern", pattern)
        set_(self, "group_size", group_size)
        set_(self, "_settings", LayerSettings(
            sparsity=sparsity, pattern=pattern, bits=bits, group_size=group_size, sym=self.sym,
            mse=self.mse, act_order=self.act_order, method=self.method, quant=self.quant,
            refine_iters=self.refine_iters))

    def describe(self) -> str:
        """A short human description, e.g. ``'sparsegpt 50% + gptq 4-bit g128 asym'``."""
        s = self._settings
        parts = []
        if s.pattern is not None:
            parts.append(f"{s.method} {s.pattern[0]}:{s.pattern[1]}")
        elif s.sparsity:
            parts.append(f"{s.method} {s.sparsity:.0%}")
        if s.bits is not None:
            g = f"g{s.group_size}" if s.group_size else "per-channel"
            parts.append(f"{s.quant} {s.bits}-bit {g} {'sym' if s.sym else 'asym'}"
                         + (" act-order" if s.act_order else ""))
        if self.refine_iters:
            parts.append(f"re-solve {self.refine_iters} it")
        if self.allocation != "uniform":
            parts.append(f"{self.allocation} allocation (M={self.owl_m:g}, "
                         f"lambda={self.owl_lambda:g})")
        return " + ".join(parts) or "dense (nothing to do)"


def _check_regex(p, name):
    if not isinstance(p, str):
        raise ValueError(f"{name} takes regular expressions as strings, got {p!r}")
    try:
        re.compile(p)
    except re.error as e:
        raise ValueError(f"{name}: {p!r} is not a valid regular expression ({e})") from None


@dataclass
class CompressionReport:
    """What :func:`compress` did: ``layers`` (one row per layer) and ``summary`` (totals)."""

    config: CompressConfig
    layers: pd.DataFrame
    summary: dict

    def __str__(self) -> str:
        cols = ["block", "layer", "shape", "sparsity", "bits", "group_size", "error", "seconds"]
        with pd.option_context("display.max_rows", 400, "display.width", 160,
                               "display.float_format", "{:.4g}".format):
            table = self.layers[cols].to_string(index=False) if len(self.layers) else "(no layers)"
        lines = [table, ""]
        for k, v in self.summary.items():
            if isinstance(v, float):
                v = f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
            lines.append(f"{k:>22}: {v}")
        return "\n".join(lines)

    def _repr_html_(self):  # notebooks show the table
        return self.layers._repr_html_()


def _find_tokenizer(model):
    """The model's own tokenizer, loaded offline from where the model came from (or None)."""
    from transformers import AutoTokenizer

    config = getattr(model, "config", None)
    where = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not where:
        return None
    kwargs = {}
    qc = getattr(config, "quantization_config", None)
    gguf = getattr(qc, "gguf_file", None) if qc is not None else None
    if gguf is None and isinstance(qc, dict):
        gguf = qc.get("gguf_file")
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure means "not found offline"
        log.debug("no tokenizer at %s: %s", where, e)
        return None


def calibration_plan(config: CompressConfig, model, device) -> tuple[object, int, int]:
    """``(calibration, nsamples, seqlen)`` after defaults: the offline text, the device's
    calibration size, ``seqlen`` capped at (and checked against) the model's context."""
    calibration = config.calibration if config.calibration is not None else DEFAULT_CALIBRATION
    default_n, default_len = default_calibration_size(device)
    nsamples = config.nsamples or default_n
    context = _context_length(model)
    seqlen = config.seqlen or (min(default_len, context) if context else default_len)
    if context is not None and seqlen > context:
        raise ValueError(f"seqlen={seqlen} is longer than the model's context ({context} tokens)")
    return calibration, nsamples, seqlen


def _context_length(model) -> int | None:
    c = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(c, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def compress(model: nn.Module, tokenizer=None, *, config: CompressConfig | None = None,
             **kwargs) -> CompressionReport:
    """Prune and/or quantize every linear layer inside the decoder blocks of ``model``, in place.

    Typical calls::

        compress(model, sparsity=0.5)              # SparseGPT, unstructured 50%
        compress(model, bits=4)                    # GPTQ 4-bit, groups of 128, asymmetric
        compress(model, sparsity=0.5, bits=4)      # both, in one sweep per layer
        compress(model, tok, pattern="2:4", calibration="wikitext2", nsamples=128, seqlen=2048)

    Keyword arguments (all fields of :class:`CompressConfig`):
        sparsity: unstructured fraction pruned per layer, in [0, 1).
        bits: 2..8 to quantize (None or 16: no quantization).
        pattern: n:m semi-structured sparsity, ``"2:4"`` or ``(2, 4)``.
        group_size: columns per quantization grid (128); None or -1: one grid per row. A last
            narrower group gets its own grid.
        sym: symmetric grids. act_order: GPTQ columns by descending Hessian diagonal.
        mse: clipping search for each grid.
        method: ``"sparsegpt"`` (default), ``"wanda"`` or ``"magnitude"`` (pruning rule).
        quant: ``"gptq"`` (default) or ``"rtn"`` (round to nearest).
        calibration: ``"python-docs"`` (the offline default; None means it), ``"wikitext2"``,
            ``"c4"``, ``"ptb"``, a text file path, a list of strings or a tensor of token ids.
        nsamples, seqlen: calibration windows (None: 128 x 2048 on CUDA, 32 x 512 on CPU,
            ``seqlen`` capped at the model's context).
        device: where each block is solved (None: CUDA when available, else CPU). The rest of
            the model stays where it is.
        ignore: regexes of layer names to leave alone. overrides: ``{regex: {setting: value}}``,
            e.g. ``{"down_proj": {"bits": 8}}`` or ``{"mlp": {"refine_iters": 20}}``; allowed
            keys: sparsity, pattern, bits, group_size, sym, mse, act_order, method, quant,
            refine_iters.
        block_size: solver column block (128). percdamp: Hessian damping (0.01). seed: window
            draw. verbose: progress bar and per-layer log. hessian_dtype: "float32"/"float64".
        refine_iters: after each layer's mask is chosen, re-solve its kept weights for the least
            squares error with this many conjugate-gradient iterations (0: plain SparseGPT; 20 is
            plenty). Never raises a layer's error; masks and n:m patterns stay (toolkit.refine).
        allocation: ``"uniform"`` (every layer at ``sparsity``) or ``"owl"``: blocks with more
            outlier weights are pruned less, in a band of width 2 x ``owl_lambda`` (0.08),
            outliers being scores ``|W|*||X||`` above ``owl_m`` (5) x their block's mean; the
            model's total pruned count stays exactly ``sparsity`` x the pruned layers' size
            (toolkit.allocation). Per-layer values are in ``report.layers["sparsity"]``.

    Returns a :class:`CompressionReport`. Everything is checked before any weight changes; an
    error raised before the first block is solved leaves the model untouched.
    """
    if config is None:
        config = CompressConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass either config=... or keyword settings, not both")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch nn.Module (a transformers model), got "
                         f"{type(model).__name__}")
    t0 = time.perf_counter()
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = distributed.rank_device(device)  # cuda:LOCAL_RANK under a process group
    blocks_name, blocks = find_blocks(model)

    calibration, nsamples, seqlen = calibration_plan(config, model, device)
    if tokenizer is None and not isinstance(calibration, torch.Tensor):
        tokenizer = _find_tokenizer(model)
        if tokenizer is None:
            raise ValueError(
                "no tokenizer was given and none could be found offline where the model was "
                "loaded from: pass tokenizer=..., or calibration= a tensor of token ids"
            )
    ids = get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen,
                          seed=config.seed)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise ValueError(f"calibration token id {int(ids.max())} is outside the model's "
                         f"vocabulary ({vocab}): wrong tokenizer?")

    def settings(name):
        return resolve_settings(name, config._settings, config.ignore, config.overrides)

    allocated = {}
    if config.allocation != "uniform":  # per-layer sparsity from a dense pre-pass (allocation.py)
        allocated = allocate(model, ids, settings, allocation=config.allocation, device=device,
                             owl_m=config.owl_m, owl_lambda=config.owl_lambda)
        settings = apply_allocation(settings, allocated)

    from .models import find_linears
    active = [r.name for b, blk in enumerate(blocks)
              for r in find_linears(blk, f"{blocks_name}.{b}")
              if (s := settings(r.name)) is not None and s.active]
    if not active:
        raise ValueError("nothing to do: give sparsity, pattern or bits (or overrides that set "
                         "them), and make sure ignore does not exclude every layer")

    before = model_bytes(model)
    was_training = model.training
    model.eval()
    try:
        rows = run_sweep(model, ids, settings, device=device, block_size=config.block_size,
                         percdamp=config.percdamp,
                         hessian_dtype=getattr(torch, config.hessian_dtype),
                         verbose=config.verbose and distributed.is_main())
    finally:
        model.train(was_training)
    after = model_bytes(model)
    extra = {
        "processes": distributed.world_size(),
        "refine_iters": config.refine_iters,
        "allocation": config.allocation + (
            f" (layer sparsity {min(allocated.values()):.3f}..{max(allocated.values()):.3f})"
            if allocated else ""),
        "bytes before (fp16)": before["bytes"],
        "bytes after": after["bytes"],
        "bits/weight (compressed)": after["bits_per_weight"],
    }
    report = build_report(config, rows, calibration=calibration, nsamples=nsamples, seqlen=seqlen,
                          device=device, extra=extra)
    report.summary["seconds"] = time.perf_counter() - t0
    summary = report.summary
    log.info("compressed %d layers (%s) in %.1fs", len(report.layers), summary["method"],
             summary["seconds"])
    return report


REPORT_COLUMNS = ["block", "layer", "shape", "sparsity", "zeros", "bits", "group_size", "method",
                  "error", "seconds"]


def build_report(config: CompressConfig, rows: list[dict], *, calibration, nsamples: int,
                 seqlen: int, device, extra: dict | None = None) -> CompressionReport:
    """A :class:`CompressionReport` from the sweep's per-layer rows; ``extra`` entries are added
    to the summary after the common ones (method, calibration, sizes, sparsity)."""
    layers = pd.DataFrame(rows, columns=REPORT_COLUMNS)
    n_comp = int(sum(s[0] * s[1] for s in layers["shape"])) if len(layers) else 0
    pruned = float((layers["sparsity"] * layers["shape"].map(lambda s: s[0] * s[1])).sum())
    source = describe_source(calibration, "train")
    summary = {
        "method": config.describe(),
        "calibration": source,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "device": str(device),
        "layers compressed": len(layers),
        "params compressed": n_comp,
        "sparsity (compressed)": pruned / n_comp if n_comp else 0.0,
        **(extra or {}),
    }
    return CompressionReport(config=config, layers=layers, summary=summary)


def config_dict(config: CompressConfig) -> dict:
    """The config as a plain dict (for logs and checkpoints); the calibration is named."""
    d = {f.name: getattr(config, f.name) for f in fields(config) if not f.name.startswith("_")}
    if isinstance(d["calibration"], torch.Tensor):
        d["calibration"] = "token ids"
    elif isinstance(d["calibration"], (list, tuple)):
        d["calibration"] = "given text"
    return d

