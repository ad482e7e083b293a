"""bitsandbytes baselines: NF4, FP4 (with or without double quantization) and LLM.int8.

The formats users already know, applied the way ``transformers`` applies them
(``BitsAndBytesConfig``): every ``nn.Linear`` inside the decoder blocks is replaced by a
bitsandbytes module holding the quantized weight; embeddings, lm_head and norms stay as they
are -- the same layers :func:`toolkit.compress` compresses, so sizes and perplexities compare
layer for layer.

* ``nf4`` / ``fp4``: 4-bit codes (NormalFloat or a 4-bit float), one float32 absmax per block of
  64 weights (``blocksize``). ``double_quant=True`` quantizes the absmax values themselves to
  8 bits (one float32 per 256 of them), saving about 0.37 bits per weight.
* ``int8``: LLM.int8 -- int8 weights with one float32 scale per output row; at run time,
  activation columns above ``threshold`` (6.0, the transformers default) are multiplied in
  16-bit (the outlier decomposition), which costs no storage.

bitsandbytes 0.45+ runs all three on the CPU (checked with 0.50: the 4-bit formats dequantize
and multiply in ``compute_dtype``; int8 uses an int8 matmul).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.model.layers import find_blocks, find_linears

__all__ = ["BnbConfig", "bnb_quantize", "bnb_available", "BNB_FORMATS"]

BNB_FORMATS = ("nf4", "fp4", "int8")


@dataclass(frozen=True)
class BnbConfig:
    """A bitsandbytes format: ``quant_type`` ``"nf4"``, ``"fp4"`` or ``"int8"``."""

    quant_type: str = "nf4"
    double_quant: bool = False
    blocksize: int = 64
    threshold: float = 6.0
    compute_dtype: str | None = None  # None: the model's dtype

    def __post_init__(self):
        if self.quant_type not in BNB_FORMATS:
            raise ValueError(f"quant_type must be one of {', '.join(map(repr, BNB_FORMATS))}, "
                             f"got {self.quant_type!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant must be True or False, got {self.double_quant!r}")
        if self.double_quant and self.quant_type == "int8":
            raise ValueError("double_quant applies to nf4/fp4 only")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize!r}")

    @property
    def bits(self) -> int:
        return 8 if self.quant_type == "int8" else 4

    @property
    def group_size(self) -> int | None:
        """Weights sharing one scale: the absmax block (4-bit) or a whole row (int8: None)."""
        return None if self.quant_type == "int8" else self.blocksize

    def describe(self) -> str:
        if self.quant_type == "int8":
            return "bnb LLM.int8"
        return f"bnb {self.quant_type.upper()}" + (" + double quant" if self.double_quant else "")


def bnb_available() -> tuple[bool, str]:
    """``(True, version)`` when bitsandbytes imports, else ``(False, why)``."""
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"bitsandbytes does not import: {type(e).__name__}: {e}"
    return True, bitsandbytes.__version__


def _dtype(name):
    return getattr(torch, name) if isinstance(name, str) else name


@torch.no_grad()
def bnb_quantize(model: nn.Module, config: BnbConfig | None = None, *, ignore=(),
                 device=None, **kwargs) -> dict:
    """Replace the linear layers inside the decoder blocks of ``model`` by bitsandbytes layers,
    in place. ``config`` or the keywords of :class:`BnbConfig`; ``ignore``: regexes of layer
    names to leave alone; ``device``: where the quantized layers live (default: where each layer
    is; bitsandbytes quantizes when the weight is moved there).

    Returns ``{"layers": n, "params": weights quantized, "seconds": s, "format": ...}``.
    Raises ``ImportError`` without bitsandbytes and ``RuntimeError`` (with bitsandbytes' reason)
    when a format cannot run on the device.
    """
    if config is None:
        config = BnbConfig(**kwargs)
    elif kwargs:
        raise ValueError("pass either config=... or keyword settings, not both")
    ok, why = bnb_available()
    if not ok:
        raise ImportError(why)
    import bitsandbytes as bnb

    t0 = time.perf_counter()
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    blocks_name, blocks = find_blocks(model)
    n_layers = n_params = 0
    for b, block in enumerate(blocks):
        for ref in find_linears(block, f"{blocks_name}.{b}"):
            if any(re.search(p, ref.name) for p in ignore):
                continue
            new = _make_bnb_linear(bnb, ref, config, device)
            parent, attr = _parent(block, ref.name[len(f"{blocks_name}.{b}."):])
            setattr(parent, attr, new)
            n_layers += 1
            n_params += ref.module.weight.numel()
    return {"layers": n_layers, "params": n_params, "seconds": time.perf_counter() - t0,
            "format": config.describe()}


def _parent(root: nn.Module, dotted: str):
    *path, attr = dotted.split(".")
    mod = root
    for p in path:
        mod = getattr(mod, p)
    return mod, attr


def _make_bnb_linear(bnb, ref, config: BnbConfig, device):
    old = ref.module
    w = ref.get_weight().detach()  # (out, in)
    out_f, in_f = w.shape
    bias = getattr(old, "bias", None)
    device = torch.device(device) if device is not None else w.device
    compute = _dtype(config.compute_dtype) or w.dtype
    if config.quant_type == "int8":
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                  threshold=config.threshold, device="meta")
        new.weight = bnb.nn.Int8Params(w.to("cpu", torch.float16 if device.type == "cuda"
                                            else w.dtype).contiguous(),
                                       requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute,
                                compress_statistics=config.double_quant,
                                quant_type=config.quant_type, device="meta")
        new.weight = bnb.nn.Params4bit(w.to("cpu").contiguous(), requires_grad=False,
                                       compress_statistics=config.double_quant,
                                       quant_type=config.quant_type, blocksize=config.blocksize)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().to("cpu"), requires_grad=False)
    try:
        new = new.to(device)  # bitsandbytes quantizes here
        weight = new.weight
        if config.quant_type != "int8" and not getattr(weight, "bnb_quantized", True):
            new.weight = weight._quantize(device)
    except Exception as e:  # noqa: BLE001 - report bitsandbytes' own reason
        raise RuntimeError(f"bitsandbytes {config.quant_type} cannot run on {device}: "
                           f"{type(e).__name__}: {e}") from e
    new.train(old.training)
    return new
