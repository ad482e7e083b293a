"""One-shot compression of causal language models.

SparseGPT pruning (unstructured and n:m) and GPTQ quantization, alone or together, driven by
one Hessian-based layer solver (:mod:`toolkit.solver`) and one block-by-block sweep over any
decoder-only ``transformers`` model::

    from toolkit import compress, perplexity
    report = compress(model, tokenizer, sparsity=0.5, bits=4)
    print(report)
"""

from .api import compress
from .evaluate import perplexity
from .export import load_compressed, save_compressed
from .hessian import capture_hessian, capture_hessians
from .models import load_model
from .options import CompressConfig, LayerSettings
from .pack import load_packed, pack, pack_report
from .records import CompressionReport
from .size import model_bytes
from .solver import solve, solve_layers
from .tradeoff import plot_tradeoff, tradeoff

__all__ = ["compress", "CompressConfig", "LayerSettings", "CompressionReport", "perplexity",
           "load_model", "model_bytes", "solve", "solve_layers", "save_compressed",
           "load_compressed", "tradeoff", "plot_tradeoff", "capture_hessian", "capture_hessians",
           "pack", "pack_report", "load_packed"]
__version__ = "0.1.0"
