"""One-shot compression of causal language models.

SparseGPT pruning (unstructured and n:m) and GPTQ quantization, alone or together, driven by
one Hessian-based layer solver (:mod:`toolkit.solver.layer`) and one block-by-block sweep over
any decoder-only ``transformers`` model (:mod:`toolkit.walk.sweep`)::

    from toolkit import compress, perplexity
    report = compress(model, tokenizer, sparsity=0.5, bits=4)
    print(report)

This module is the public face: every name a user needs is importable from here, so the
folders below are an implementation detail. The package is layered; a module imports only
from the layers below its own (checked by ``lint-imports``, contract in ``pyproject.toml``)::

    cli.py                    the command line
    tradeoff.py               the accuracy-against-size harness (runs compress many times)
    api.py | loading.py       compress(); load_model() for every kind of --model
    runtime/                  packed modules that compute with compressed weights
    walk/                     the block-by-block sweep, streaming, distributed, capture
    checkpoint/               formats, save/load, size accounting
    plan/                     the options schema, menus, allocation rules, the size planner
    measure/                  text sources, perplexity, bitsandbytes baselines
    model/                    finding blocks, linears, Conv1D and fused experts in a decoder
    solver/                   the math with no model: Hessian, the column sweep, grids, masks
"""

from toolkit.api import compress
from toolkit.checkpoint.saveload import save_compressed
from toolkit.checkpoint.size import model_bytes
from toolkit.config.options import CompressConfig, LayerSettings
from toolkit.config.records import CompressionReport
from toolkit.loading import load_compressed, load_model
from toolkit.measure.perplexity import perplexity
from toolkit.runtime.pack import load_packed, pack, pack_report
from toolkit.solver.layer import solve, solve_layers
from toolkit.tradeoff import plot_tradeoff, tradeoff
from toolkit.walk.capture import capture_hessian, capture_hessians

__all__ = ["compress", "CompressConfig", "LayerSettings", "CompressionReport", "perplexity",
           "load_model", "model_bytes", "solve", "solve_layers", "save_compressed",
           "load_compressed", "tradeoff", "plot_tradeoff", "capture_hessian", "capture_hessians",
           "pack", "pack_report", "load_packed"]
__version__ = "0.1.0"
