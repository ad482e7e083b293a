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

from importlib import import_module

__version__ = "0.1.0"

#: The public names and the module each comes from. They are imported on first use (PEP 562), so
#: that ``import toolkit`` and the command line's ``--help``, ``--version`` and flag errors do not
#: pay for torch and transformers.
_EXPORTS = {
    "compress": "toolkit.api",
    "CompressConfig": "toolkit.config.options",
    "LayerSettings": "toolkit.config.options",
    "CompressionReport": "toolkit.config.records",
    "perplexity": "toolkit.measure.perplexity",
    "load_model": "toolkit.loading",
    "load_compressed": "toolkit.loading",
    "model_bytes": "toolkit.checkpoint.size",
    "solve": "toolkit.solver.layer",
    "solve_layers": "toolkit.solver.layer",
    "save_compressed": "toolkit.checkpoint.saveload",
    "save_gguf": "toolkit.checkpoint.gguf",
    "tradeoff": "toolkit.harness",
    "plot_tradeoff": "toolkit.harness",
    "capture_hessian": "toolkit.walk.capture",
    "capture_hessians": "toolkit.walk.capture",
    "pack": "toolkit.runtime.pack",
    "pack_report": "toolkit.runtime.pack",
    "load_packed": "toolkit.runtime.pack",
    "using_threads": "toolkit.config.threads",
    "default_threads": "toolkit.config.threads",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
