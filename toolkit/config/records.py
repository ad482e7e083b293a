"""What a compression run leaves behind: the record kept on each compressed layer and the report.

Both the walk (:mod:`toolkit.walk.sweep`, :mod:`toolkit.walk.stream`) and :mod:`toolkit.checkpoint.saveload` use these;
this module depends on neither, so data flows one way: the API and the command line call the
walk and export, and neither of those imports the API.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from toolkit.config.options import CompressConfig, LayerSettings
from toolkit.measure.text import describe_source

__all__ = ["LayerCompression", "CompressionReport", "build_report", "REPORT_COLUMNS",
           "config_dict"]


@dataclass
class LayerCompression:
    """What was done to a layer; kept on the module as ``module.compression`` for export.

    ``scale``/``zero`` are (out, n_groups) float32 on the CPU; ``g_idx`` maps each input column
    to its group (only needed with act_order). ``error`` is the layer's reconstruction error
    ``tr(dW H dW^T)`` (see :data:`REPORT_COLUMNS`), ``sparsity`` the fraction pruned.
    ``gguf``: with ``settings.gguf``, the GGUF factors of the weight
    (:class:`toolkit.solver.gguf_grids.GGUFGrid`, on the CPU; ``scale``/``zero`` stay None: the
    layer is on no uniform grid, ``settings.bits`` is None).
    """

    settings: LayerSettings
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None
    error: float = 0.0
    sparsity: float = 0.0
    gguf: object = None


#: Columns of ``report.layers``: ``block``; ``layer`` (full module name); ``shape`` (out, in);
#: ``sparsity`` (fraction of the weights the mask prunes); ``zeros`` (fraction of weights equal to
#: 0 afterwards); ``bits`` (16: not quantized); ``group_size``; ``method`` (pruning rule +
#: quantization rule); ``error``: the layer's reconstruction error ``tr(dW H dW^T)`` =
#: ``2/n * ||(W - W_new) X||^2`` over the n calibration tokens X it saw (NaN when no calibration
#: was needed), in the squared units of the layer's outputs, so it grows with the layer's output
#: scale and is comparable between settings of the same layer, not between layers;
#: ``rel_error``: ``error / tr(W H W^T)``, the fraction of the layer's output energy on the
#: calibration inputs that the change lost (0 = exact, 1 = as bad as zeroing the layer),
#: comparable between layers; ``seconds`` (solve time); ``tokens``: the calibration tokens that
#: reached the layer (for a mixture-of-experts expert: the tokens the router sent it; None when
#: no calibration was needed); ``hessian``: for an expert, where its Hessian came from
#: (``"routed"``, ``"all tokens"`` with ``expert_hessian="all"``, or ``"all tokens (no routed
#: token)"`` for an expert the router sent nothing; see :mod:`toolkit.model.experts`), None otherwise.
REPORT_COLUMNS = ["block", "layer", "shape", "sparsity", "zeros", "bits", "group_size", "method",
                  "error", "rel_error", "seconds", "tokens", "hessian"]
#: With block reconstruction (``reconstruct_steps``), two more columns: the block's relative output
#: error ``||out - out_fp||^2 / ||out_fp||^2`` on the calibration windows (``out_fp``: the
#: full-precision block on the full-precision inputs) after the layer solves and after the fit,
#: the same on every row of a block. ``error``/``rel_error`` stay the layer solver's.
BLOCK_COLUMNS = ["block_error_before", "block_error_after"]


@dataclass
class CompressionReport:
    """What :func:`toolkit.compress` did: ``layers`` (one row per layer, columns
    :data:`REPORT_COLUMNS`) and ``summary`` (totals); ``budget``: with a size target, the
    :class:`toolkit.plan.budget.BudgetResult` (choices, bytes, profile), else None."""

    config: CompressConfig
    layers: pd.DataFrame
    summary: dict
    budget: object = None

    def __str__(self) -> str:
        cols = ["block", "layer", "shape", "sparsity", "bits", "group_size", "error", "rel_error",
                "seconds"]
        if len(self.layers) and self.layers["hessian"].notna().any():  # experts: their tokens
            cols += ["tokens", "hessian"]
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


def build_report(config: CompressConfig, rows: list[dict], *, calibration, nsamples: int,
                 seqlen: int, device, extra: dict | None = None) -> CompressionReport:
    """A :class:`CompressionReport` from the sweep's per-layer rows; ``extra`` entries are added
    to the summary after the common ones (method, calibration, sizes, sparsity)."""
    extra_cols = [c for c in BLOCK_COLUMNS if any(c in r for r in rows)]
    layers = pd.DataFrame(rows, columns=REPORT_COLUMNS + extra_cols)
    n_comp = int(sum(s[0] * s[1] for s in layers["shape"])) if len(layers) else 0
    pruned = float((layers["sparsity"] * layers["shape"].map(lambda s: s[0] * s[1])).sum())
    summary = {
        "method": config.describe(),
        "calibration": describe_source(calibration, "train"),
        "nsamples": nsamples,
        "seqlen": seqlen,
        "device": str(device),
        "layers compressed": len(layers),
        "params compressed": n_comp,
        "sparsity (compressed)": pruned / n_comp if n_comp else 0.0,
        **(extra or {}),
    }
    if extra_cols:  # block reconstruction: what it bought, one value per block
        per_block = layers.groupby("block")[extra_cols].first()
        summary["block output error (before -> after reconstruction)"] = (
            f"{per_block[extra_cols[0]].mean():.4g} -> {per_block[extra_cols[1]].mean():.4g} "
            f"(mean over {len(per_block)} blocks; reconstruction kept in "
            f"{int((per_block[extra_cols[1]] < per_block[extra_cols[0]]).sum())})")
    return CompressionReport(config=config, layers=layers, summary=summary)


def config_dict(config: CompressConfig) -> dict:
    """The config as a plain dict (for logs and checkpoints); the calibration is named."""
    return config.to_dict()
