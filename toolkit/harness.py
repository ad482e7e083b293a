"""Accuracy against size: run many compressions of one model through one harness.

:func:`tradeoff` builds a fresh model for each configuration, compresses it (with
:func:`toolkit.compress` or a bitsandbytes format from :mod:`toolkit.measure.bnb`), counts its bytes
(:func:`toolkit.checkpoint.size.model_bytes`) and measures its perplexity on the *same* token windows
(:func:`toolkit.perplexity`). Every row of the table comes from the same code path, calibration
windows and evaluation windows. :func:`plot_tradeoff` draws the table as a Pareto chart::

    from toolkit import load_model, tradeoff, plot_tradeoff
    base, tok = load_model("smollm2")
    df = tradeoff(lambda: copy.deepcopy(base), tok,
                  [dict(sparsity=0.5), dict(bits=4), dict(bnb="nf4")], "python-docs")
    plot_tradeoff(df, "tradeoff.png")
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace

import pandas as pd
import torch
from torch import nn

from toolkit.api import CompressConfig, compress
from toolkit.checkpoint.size import model_bytes
from toolkit.config.options import label as settings_label
from toolkit.measure.bnb import BnbConfig, bnb_quantize
from toolkit.measure.perplexity import decode_speed, perplexity, window_count
from toolkit.measure.text import (
    DEFAULT_CALIBRATION,
    default_calibration_size,
    get_calibration,
    load_text,
    tokenize_text,
)
from toolkit.runtime.pack import pack, resident_bytes

__all__ = ["tradeoff", "plot_tradeoff", "config_label", "COLUMNS", "to_markdown",
           "NOT_RUN_BY_DESIGN", "NotRunByDesign"]

log = logging.getLogger("toolkit")

COLUMNS = ["method", "sparsity", "bits", "group_size", "bytes", "bits_per_weight", "perplexity",
           "compress_seconds", "model_bits_per_weight", "packed_bits_per_weight",
           "compact_bits_per_weight", "memory_mb", "decode_tokens_per_s", "not_run", "note"]
DENSE = "dense"
#: the note of a row whose layouts differ in size (pruned layers): what each one stores
LAYOUT_NOTE = ("standard layout (the default; transformers and vLLM load it): {standard:.2f} "
               "bits/weight, {what}; layout='compact' (kept {kept} + bitmask; "
               "toolkit.load_compressed only): {compact:.2f}")


@dataclass(frozen=True)
class NotRunByDesign:
    """A combination that :func:`tradeoff` cannot run by design: it becomes a "not run" row.

    A row is "not run" only when its configuration is a ``kind`` and the error it raised is one
    of ``errors`` with a message matching ``message`` (a regular expression, searched from the
    start); its ``not_run`` column then holds ``reason`` and its ``note`` the error itself.
    """

    kind: type
    errors: tuple
    message: str
    reason: str

    def matches(self, config, error: BaseException) -> bool:
        return (isinstance(config, self.kind) and isinstance(error, self.errors)
                and re.match(self.message, str(error)) is not None)


#: The combinations :func:`tradeoff` reports as "not run" rows instead of raising. Every other
#: error of a row -- from ``compress``, the size count, the perplexity, ``pack`` or the decode
#: timing -- propagates, with the row's label in front of its message. The bitsandbytes
#: baselines are optional: without the package (:func:`toolkit.measure.bnb.bnb_quantize` raises
#: ``ImportError("bitsandbytes does not import: ...")``), or on a device where bitsandbytes
#: refuses to quantize a format (it raises ``RuntimeError("bitsandbytes <format> cannot run on
#: <device>: ...")``), their rows are not run. The toolkit's own settings have no entry: a
#: setting ``compress`` refuses is refused before any row runs (``CompressConfig`` validates
#: it), and ``tradeoff`` writes no checkpoint, so no layout can refuse a setting here.
NOT_RUN_BY_DESIGN: tuple[NotRunByDesign, ...] = (
    NotRunByDesign(BnbConfig, (ImportError,), r"bitsandbytes does not import",
                   "bitsandbytes is not installed (pip install -e '.[bnb]')"),
    NotRunByDesign(BnbConfig, (RuntimeError,), r"bitsandbytes \w+ cannot run on \w+",
                   "bitsandbytes cannot run this format on this device"),
)


def _not_run_reason(config, error: BaseException) -> str | None:
    """The reason of the :data:`NOT_RUN_BY_DESIGN` entry that covers ``error``, else None."""
    for entry in NOT_RUN_BY_DESIGN:
        if entry.matches(config, error):
            return entry.reason
    return None


def _with_label(error: BaseException, label: str) -> BaseException:
    """``error`` with ``tradeoff row '<label>': `` in front of its message, of the same type
    where that type takes a message (else a RuntimeError naming it)."""
    message = f"tradeoff row {label!r}: {error}"
    try:
        new = type(error)(message)
    except Exception:  # noqa: BLE001 - a type that does not take one message argument
        new = None
    if new is None or str(new) != message:  # e.g. KeyError quotes its message
        new = RuntimeError(f"tradeoff row {label!r}: {type(error).__name__}: {error}")
    return new


def config_label(config) -> str:
    """A short name for a configuration, e.g. ``"SparseGPT 50% + GPTQ 4-bit g128"``."""
    if config is None or config == DENSE:
        return DENSE
    if isinstance(config, BnbConfig):
        return config.describe().replace("bnb ", "")
    return settings_label(config.settings, extra=config) or DENSE


def _as_config(spec, defaults: dict):
    """``(label, config)`` from a config object, a dict of settings or ``"dense"``/None."""
    label = None
    if isinstance(spec, dict):
        spec = dict(spec)
        label = spec.pop("label", None)
        if "bnb" in spec:
            spec["quant_type"] = spec.pop("bnb")
            spec = BnbConfig(**spec)
        elif not any(spec.get(k) not in (None, 0, 0.0, 16) for k in ("sparsity", "pattern", "bits")):
            spec = DENSE
        else:
            spec = CompressConfig(**{**defaults, **spec})
    if spec is None or spec == DENSE:
        return label or DENSE, DENSE
    if isinstance(spec, str):
        raise ValueError(f"a configuration is a dict of compress() settings, a CompressConfig, "
                         f"a BnbConfig or 'dense'; got {spec!r}")
    if not isinstance(spec, (CompressConfig, BnbConfig)):
        raise ValueError(f"unknown configuration {spec!r}")
    return label or config_label(spec), spec


def _row_fields(config) -> dict:
    if config == DENSE:
        return dict(sparsity=0.0, bits=16, group_size=None)
    if isinstance(config, BnbConfig):
        return dict(sparsity=0.0, bits=config.bits, group_size=config.group_size)
    s = config.settings
    sparsity = 1 - s.pattern[0] / s.pattern[1] if s.pattern is not None else s.sparsity
    return dict(sparsity=sparsity, bits=s.bits if s.bits is not None else 16,
                group_size=s.group_size if s.bits is not None else None)


@contextmanager
def _quiet_bnb_cast():
    """LLM.int8 logs one line per layer call that float32 inputs are cast to float16: mute it."""
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")

    def keep(record):
        return "inputs will be cast" not in record.getMessage()

    bnb_log.addFilter(keep)
    try:
        yield
    finally:
        bnb_log.removeFilter(keep)


def _calib_key(c: CompressConfig):
    return (c.calibration, c.nsamples, c.seqlen, c.seed)


def _eval_ids(eval_text, tokenizer) -> torch.Tensor:
    if isinstance(eval_text, torch.Tensor):
        return eval_text.reshape(-1).long()
    if isinstance(eval_text, str) and eval_text in ("python-docs", "wikitext2", "ptb", "c4"):
        eval_text = load_text(eval_text, split="validation" if eval_text == "c4" else "test")
    elif isinstance(eval_text, str) and len(eval_text) < 4096 and "\n" not in eval_text:
        from pathlib import Path

        if Path(eval_text).is_file():
            eval_text = load_text(eval_text)
    return tokenize_text(tokenizer, eval_text)


def tradeoff(model_factory: Callable[[], nn.Module], tokenizer, configs: Iterable,
             eval_text="python-docs", *, eval_seqlen: int = 512, eval_windows: int | None = 32,
             calibration=None, nsamples: int | None = None, seqlen: int | None = None,
             seed: int = 0, device=None, dense: bool = True, dense_bits: int = 16,
             decode_tokens: int | None = None, decode_prompt: int = 128,
             verbose: bool = False, on_row: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Compress a fresh model per configuration and measure size and perplexity.

    ``model_factory()`` returns a new, uncompressed model each call (e.g.
    ``lambda: copy.deepcopy(base)``). ``configs``: a list of ``dict`` (keywords of
    :func:`toolkit.compress`, e.g. ``dict(sparsity=0.5, bits=4)``; ``dict(bnb="nf4",
    double_quant=True)`` for a bitsandbytes format; an optional ``label``), ``CompressConfig``,
    ``BnbConfig`` or ``"dense"``. With ``dense=True`` a dense row comes first if none is given.

    Every row sees the same calibration windows (``calibration``, ``nsamples`` x ``seqlen``,
    drawn once with ``seed``; defaults as in :func:`toolkit.compress`) and the same evaluation
    windows (``eval_text`` tokenized once, the first ``eval_windows`` windows of
    ``eval_seqlen`` tokens). A configuration that cannot run by design (the combinations of
    :data:`NOT_RUN_BY_DESIGN`: a bitsandbytes format without bitsandbytes, or one that
    bitsandbytes cannot run on this device) gets a row with NaN size and perplexity, the
    reason in ``not_run`` and the error in ``note``: no row is dropped. Any other error of a
    row propagates, with the row's label in its message.

    Returns a DataFrame with the columns :data:`COLUMNS`: ``method``, ``sparsity`` (fraction
    pruned), ``bits`` (16 = not quantized), ``group_size`` (weights per scale; None: one per
    row), ``bytes`` (the whole checkpoint, dense tensors at ``dense_bits``, compressed layers as
    stored by compressed-tensors / bitsandbytes, in the standard layout that
    :func:`toolkit.save_compressed` writes by default), ``bits_per_weight`` (over the compressed
    layers, scales, zero points and masks included; standard layout: pruned-only layers dense,
    pruned + quantized layers every code), ``perplexity``, ``compress_seconds``,
    ``model_bits_per_weight`` (bytes over all parameters), ``packed_bits_per_weight`` (the
    ``"packed"`` layout of :mod:`toolkit.checkpoint.size`: the information itself, the least a format
    needs), ``compact_bits_per_weight`` (``save_compressed(layout="compact")``: kept values or
    codes + bitmask), ``memory_mb`` (the model's weights in memory as it runs, in MB of 10**6
    bytes: after perplexity the compressed layers are packed by :func:`toolkit.runtime.pack` -- int4/int8
    kernels, kept codes + bitmask -- and :func:`toolkit.runtime.pack.resident_bytes` counts every tensor
    of the model; bitsandbytes rows as bitsandbytes holds them; the dense row in its own dtype),
    ``decode_tokens_per_s`` (with ``decode_tokens``: greedy ``generate`` speed with the KV cache,
    batch 1, ``decode_tokens`` new tokens after the first ``decode_prompt`` tokens of the
    evaluation text, on the model as ``memory_mb`` counts it, see
    :func:`toolkit.measure.perplexity.decode_speed`; NaN when ``decode_tokens`` is None, the default:
    it is slow on a CPU), ``not_run`` (empty for a row that ran; else why it could not, from
    :data:`NOT_RUN_BY_DESIGN`), ``note``. ``df.attrs`` records the evaluation and calibration
    settings.
    """
    if decode_tokens is not None and (isinstance(decode_tokens, bool) or
                                      not isinstance(decode_tokens, int) or decode_tokens < 2):
        raise ValueError(f"decode_tokens must be None or an integer >= 2, got {decode_tokens!r}")
    if isinstance(decode_prompt, bool) or not isinstance(decode_prompt, int) or decode_prompt < 1:
        raise ValueError(f"decode_prompt must be an integer >= 1, got {decode_prompt!r}")
    configs = list(configs)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dn, dl = default_calibration_size(device)
    nsamples, seqlen = nsamples or dn, seqlen or dl
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    defaults = dict(calibration=calibration, nsamples=nsamples, seqlen=seqlen, seed=seed,
                    device=str(device), verbose=verbose)
    plan = [_as_config(c, defaults) for c in configs]
    if dense and not any(c == DENSE for _, c in plan):
        plan.insert(0, (DENSE, DENSE))

    ids = _eval_ids(eval_text, tokenizer)
    windows = window_count(ids.numel(), eval_seqlen, eval_windows)
    ids = ids[: windows * eval_seqlen]
    shared = (calibration, nsamples, seqlen, seed)
    calib_ids = None
    if any(isinstance(c, CompressConfig) and _calib_key(c) == shared for _, c in plan):
        # tokenize and draw the shared calibration windows once
        calib_ids = get_calibration(calibration, tokenizer, nsamples=nsamples, seqlen=seqlen,
                                    seed=seed)

    rows = []
    for label, config in plan:
        row = dict(method=label, **_row_fields(config), bytes=math.nan, bits_per_weight=math.nan,
                   perplexity=math.nan, compress_seconds=0.0, model_bits_per_weight=math.nan,
                   packed_bits_per_weight=math.nan, compact_bits_per_weight=math.nan,
                   memory_mb=math.nan, decode_tokens_per_s=math.nan, not_run="", note="")
        model = model_factory()
        try:
            t0 = time.perf_counter()
            if isinstance(config, CompressConfig):
                if calib_ids is not None and _calib_key(config) == shared:
                    config = replace(config, calibration=calib_ids)
                compress(model, tokenizer, config=config)
            elif isinstance(config, BnbConfig):
                bnb_quantize(model, config, device=device)
            row["compress_seconds"] = 0.0 if config == DENSE else time.perf_counter() - t0
            size = model_bytes(model, dense_bits=dense_bits)
            packed = model_bytes(model, dense_bits=dense_bits, layout="packed")
            compact = model_bytes(model, dense_bits=dense_bits, layout="compact")
            row.update(bytes=size["bytes"], bits_per_weight=size["bits_per_weight"],
                       model_bits_per_weight=size["model_bits_per_weight"],
                       packed_bits_per_weight=packed["bits_per_weight"],
                       compact_bits_per_weight=compact["bits_per_weight"])
            if config != DENSE:
                model.to(device)
            with _quiet_bnb_cast():
                row["perplexity"] = perplexity(model, tokenizer, ids, seqlen=eval_seqlen,
                                               device=device, verbose=verbose)
                if isinstance(config, CompressConfig):
                    pack(model)
                row["memory_mb"] = resident_bytes(model) / 1e6
                if decode_tokens is not None:
                    row["decode_tokens_per_s"] = decode_speed(
                        model, ids[:decode_prompt], decode_tokens, device=device)["tokens_per_s"]
        except Exception as e:
            reason = _not_run_reason(config, e)
            if reason is None:
                raise _with_label(e, label) from e
            row.update({k: math.nan for k in ("bytes", "bits_per_weight", "perplexity",
                                              "model_bits_per_weight", "packed_bits_per_weight",
                                              "compact_bits_per_weight", "memory_mb",
                                              "decode_tokens_per_s")})
            row["not_run"] = reason
            row["note"] = f"not run: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            log.warning("%s: %s", label, row["note"])
        if isinstance(config, CompressConfig) and config.settings.prunes and not row["note"] \
                and row["compact_bits_per_weight"] != row["bits_per_weight"]:
            quantized = config.settings.bits is not None
            row["note"] = LAYOUT_NOTE.format(
                standard=row["bits_per_weight"], compact=row["compact_bits_per_weight"],
                what="every code stored" if quantized else "pruned weights stored dense",
                kept="codes" if quantized else "values")
        del model
        rows.append(row)
        if on_row is not None:
            on_row(row)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["group_size"] = df["group_size"].astype("Int64")
    df["bits"] = df["bits"].astype(int)
    df.attrs.update(eval_windows=windows, eval_seqlen=eval_seqlen, nsamples=nsamples,
                    seqlen=seqlen, calibration=calibration if isinstance(calibration, str)
                    else "given", device=str(device), dense_bits=dense_bits,
                    decode_tokens=decode_tokens, decode_prompt=decode_prompt)
    return df


def to_markdown(df: pd.DataFrame) -> str:
    """The table as GitHub markdown (no extra dependency), with readable numbers."""
    cols = ["method", "sparsity", "bits", "group_size", "bits_per_weight", "bytes", "perplexity",
            "compress_seconds", "memory_mb", "decode_tokens_per_s", "note"]
    head = ["method", "sparsity", "bits", "group", "bits/weight", "size (MB)", "perplexity",
            "compress (s)", "memory (MB)", "decode (tok/s)", "note"]
    df = df.reindex(columns=list(dict.fromkeys([*df.columns, *cols])))  # older tables: NaN
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] + ["---:"] * 9 + ["---"]) + "|"]
    for _, r in df[cols].iterrows():
        g = "-" if pd.isna(r["group_size"]) else str(int(r["group_size"]))
        if r["bits"] == 8 and g == "-":
            g = "row"
        ppl = "n/a" if pd.isna(r["perplexity"]) else f"{r['perplexity']:.2f}"
        mb = "n/a" if pd.isna(r["bytes"]) else f"{r['bytes'] / 1e6:.1f}"
        bpw = "n/a" if pd.isna(r["bits_per_weight"]) else f"{r['bits_per_weight']:.2f}"
        mem = "-" if pd.isna(r["memory_mb"]) else f"{r['memory_mb']:.1f}"
        tps = "-" if pd.isna(r["decode_tokens_per_s"]) else f"{r['decode_tokens_per_s']:.2f}"
        lines.append(f"| {r['method']} | {r['sparsity']:.0%} | {r['bits']} | {g} | {bpw} | {mb} "
                     f"| {ppl} | {r['compress_seconds']:.0f} | {mem} | {tps} "
                     f"| {r['note'] if isinstance(r['note'], str) else ''} |")
    return "\n".join(lines)


_MARKERS = ["o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h", "p", "d", "8", "H"]


def plot_tradeoff(df: pd.DataFrame, path=None, *, x: str = "bits_per_weight",
                  title: str | None = None, logy: bool | None = None, footnote: str | None = None,
                  curves: Mapping[str, pd.DataFrame] | None = None):
    """Perplexity against size, one marker per method, the Pareto front as a dashed line and the
    dense model as a horizontal reference line. Returns the matplotlib Figure; with ``path``
    also writes it (PNG at 150 dpi).

    ``curves``: extra series drawn as solid lines over the table, ``{legend label: table}``,
    e.g. the budget curve of ``compress(..., target_bits=...)`` (one run per target). Each
    table needs the ``x`` column and ``perplexity``; its rows with both known are drawn as
    points joined in increasing size, and, when it has a ``label`` column, each point is
    annotated with that text (e.g. the target). Curves are not part of the Pareto front (the
    front is ``df``'s), but they count for the log scale and the axis limits.

    ``x``: the size column (``"bits_per_weight"``, ``"model_bits_per_weight"``,
    ``"packed_bits_per_weight"``, ``"compact_bits_per_weight"`` or ``"bytes"``). ``logy``:
    log-scale perplexity (default: when the perplexities span more than a factor 3). A "not
    run" row (its ``not_run`` column says why, see :data:`NOT_RUN_BY_DESIGN`) has no
    perplexity: it is drawn as a grey ``x`` on the top edge of the axes at its size when the
    size is known, and listed in the legend as ``"<method>: not run (<reason>)"`` either way.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    xlabels = {
        "bits_per_weight": "bits per weight of the compressed layers "
                           "(scales, zero points, masks included)",
        "model_bits_per_weight": "bits per parameter of the whole checkpoint",
        "packed_bits_per_weight": "bits per weight of the compressed layers, packed layout",
        "compact_bits_per_weight": "bits per weight of the compressed layers, compact layout "
                                   "(save_compressed(layout='compact'))",
        "bytes": "checkpoint size (MB)",
    }
    if x not in xlabels:
        raise ValueError(f"x must be one of {', '.join(xlabels)}, got {x!r}")
    series = {}
    for name, curve in (curves or {}).items():
        missing = [c for c in (x, "perplexity") if c not in curve]
        if missing:
            raise ValueError(f"curves[{name!r}] needs the columns {x!r} and 'perplexity', "
                             f"missing {', '.join(map(repr, missing))}")
        c = curve[curve["perplexity"].notna() & curve[x].notna()].copy()
        c["_x"] = c[x] / 1e6 if x == "bytes" else c[x]
        series[name] = c.sort_values("_x", kind="stable")
    data = df[df["perplexity"].notna() & df[x].notna()].copy()
    data["_x"] = data[x] / 1e6 if x == "bytes" else data[x]
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.add_subplot()
    dense = data[data["method"] == DENSE]
    others = data[data["method"] != DENSE]
    if len(dense):
        ref = float(dense["perplexity"].iloc[0])
        ax.axhline(ref, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"dense ({dense['_x'].iloc[0]:.3g} {'MB' if x == 'bytes' else 'bits'}): "
                         f"{ref:.2f}")
    cmap = matplotlib.colormaps["tab20"]
    for i, (_, r) in enumerate(others.iterrows()):
        ax.scatter(r["_x"], r["perplexity"], marker=_MARKERS[i % len(_MARKERS)], s=70,
                   color=cmap(i % 20), edgecolor="black", linewidth=0.5, zorder=3,
                   label=f"{r['method']}: {r['perplexity']:.2f}")
    not_run = df["not_run"].fillna("").astype(str) if "not_run" in df else None
    for _, r in (df[not_run != ""] if not_run is not None else df.iloc[:0]).iterrows():
        size = r[x] / 1e6 if x == "bytes" else r[x]
        known = pd.notna(size)
        # x in data coordinates, y on the top edge of the axes (axes coordinates)
        ax.plot([size] if known else [], [1.0] if known else [], linestyle="none", marker="x",
                markersize=9, markeredgewidth=2, color="0.35", clip_on=False, zorder=4,
                transform=ax.get_xaxis_transform(),
                label=f"{r['method']}: not run ({r['not_run']})")
    front = _pareto(data)
    if len(front) > 1:
        ax.plot(front["_x"], front["perplexity"], linestyle="--", color="tab:red", linewidth=1,
                zorder=2, label="Pareto front")
    palette = matplotlib.colormaps["Dark2"]
    for i, (name, c) in enumerate(series.items()):
        color = palette(i % palette.N)
        ax.plot(c["_x"], c["perplexity"], linestyle="-", marker="o", markersize=6,
                linewidth=1.8, color=color, zorder=4, label=name)
        if "label" in c:
            for _, r in c.iterrows():
                ax.annotate(str(r["label"]), (r["_x"], r["perplexity"]), fontsize=7,
                            color=color, xytext=(4, 4), textcoords="offset points")
    ppl = pd.concat([data["perplexity"], *(c["perplexity"] for c in series.values())])
    if logy is None:
        logy = len(ppl) > 0 and float(ppl.max()) > 3 * float(ppl.min())
    if logy:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))
    ax.set_xlabel(xlabels[x])
    ax.set_ylabel("perplexity (lower is better" + (", log scale)" if logy else ")"))
    ax.set_title(title or "Accuracy against size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if footnote:  # below the axes, with room reserved for it
        lines = footnote.count("\n") + 1
        height = (lines * 7 * 1.35 + 6) / 72 / fig.get_figheight()
        fig.get_layout_engine().set(rect=(0, height, 1, 1 - height))
        fig.text(0.01, 0.005, footnote, fontsize=7, color="0.3", ha="left", va="bottom")
    if path is not None:
        fig.savefig(path, dpi=150)
    return fig


def _pareto(data: pd.DataFrame) -> pd.DataFrame:
    """Rows no other row beats on both size and perplexity, by increasing size."""
    d = data.sort_values(["_x", "perplexity"])
    best, keep = math.inf, []
    for idx, r in d.iterrows():
        if r["perplexity"] < best:
            keep.append(idx)
            best = r["perplexity"]
    return d.loc[keep]
