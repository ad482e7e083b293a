"""One-shot compression of causal language models.

SparseGPT pruning (unstructured and n:m) and GPTQ quantization, alone or together, driven by
one Hessian-based layer solver (:mod:`toolkit.solver`) and one block-by-block sweep over any
decoder-only ``transformers`` model::

    from toolkit import compress, perplexity
    report = compress(model, tokenizer, sparsity=0.5, bits=4)
    print(report)
"""

from .api import CompressConfig, CompressionReport, compress
from .evaluate import perplexity
from .export import load_compressed, save_compressed
from .models import load_model
from .size import model_bytes
from .solver import solve, solve_layers
from .tradeoff import plot_tradeoff, tradeoff

__all__ = ["compress", "CompressConfig", "CompressionReport", "perplexity", "load_model",
           "model_bytes", "solve", "solve_layers", "save_compressed", "load_compressed",
           "tradeoff", "plot_tradeoff"]
__version__ = "0.1.0"
