"""Finding the parts of any decoder-only ``transformers`` model.

No per-family tables: the decoder blocks are the ``nn.ModuleList`` holding
``config.num_hidden_layers`` modules of one class; the layers to compress are the ``nn.Linear``
(and GPT-2 ``Conv1D``) modules inside a block. Which layers read the same input is found by
running the block once (see :mod:`toolkit.walk.sweep`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["find_blocks", "find_linears", "LinearRef", "is_conv1d"]

try:  # GPT-2 style transposed linear layer
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = None


def is_conv1d(module) -> bool:
    """True for GPT-2's transposed linear layer (``transformers.pytorch_utils.Conv1D``)."""
    return Conv1D is not None and isinstance(module, Conv1D)


@dataclass
class LinearRef:
    """A linear layer inside a block, with its weight seen as (out_features, in_features)."""

    name: str  # full name in the model, e.g. "model.layers.3.self_attn.q_proj"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return is_conv1d(self.module)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    def get_weight(self) -> torch.Tensor:
        """The weight as (out, in): a view of the parameter (transposed for Conv1D)."""
        w = self.module.weight.data
        return w.T if self.transposed else w

    def set_weight(self, new: torch.Tensor) -> None:
        """Write a new (out, in) weight into the parameter, in place, keeping its dtype."""
        w = self.module.weight.data
        w.copy_(new.T if self.transposed else new)

    # the record of what was done (toolkit.config.records.LayerCompression); expert slices of fused
    # parameters (toolkit.model.experts.ExpertRef) keep theirs on the experts module instead
    def set_record(self, comp) -> None:
        self.module.compression = comp

    def get_record(self):
        return getattr(self.module, "compression", None)


def _num_layers(config) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int):
            return n
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(name, blocks)``: the ModuleList of decoder blocks.

    Looks for an ``nn.ModuleList`` of ``config.num_hidden_layers`` modules of one class (or, with
    no such config field, the longest ModuleList of identical modules that contain linear
    layers). Raises ``ValueError`` saying what was looked for when there is none.
    """
    n = _num_layers(getattr(model, "config", None))
    candidates = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1:
            continue
        if not any(isinstance(x, nn.Linear) or (Conv1D and isinstance(x, Conv1D))
                   for x in mod[0].modules()):
            continue
        candidates.append((name, mod))
    if n is not None:
        exact = [(nm, m) for nm, m in candidates if len(m) == n]
        if exact:
            return exact[0]
    elif candidates:
        return max(candidates, key=lambda c: len(c[1]))
    raise ValueError(
        f"could not find the decoder blocks of {type(model).__name__}: looked for an "
        f"nn.ModuleList of {n if n is not None else 'N'} identical modules containing linear "
        "layers (config.num_hidden_layers). Is this a transformers decoder-only model?"
    )


def find_linears(block: nn.Module, prefix: str = "") -> list[LinearRef]:
    """All ``nn.Linear`` / ``Conv1D`` layers inside ``block``, in definition order."""
    out = []
    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear) or (Conv1D is not None and isinstance(mod, Conv1D)):
            out.append(LinearRef(f"{prefix}.{name}" if prefix else name, mod))
    return out
