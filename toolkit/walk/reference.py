"""The full-precision model beside the compressed one, one block at a time.

Asymmetric targets (:mod:`toolkit.solver.targets`) and block reconstruction
(:mod:`toolkit.walk.reconstruct`) need what the *full-precision* model computes at the block being
compressed: the inputs each group of layers sees there (``X_d``) and the block's output. The
sweep keeps a second set of hidden states, :class:`Reference` (one tensor per calibration window,
as many as :class:`toolkit.walk.sweep.BlockInputs` holds), and for each block a frozen copy of the
block taken before any of its layers changes (:class:`BlockReference`). Both streams see the same
windows in the same batches, so their tokens pair one to one.

Memory: one more copy of the calibration hidden states, one more copy of the block, and, when they
fit half the sweep's working memory, the full-precision inputs of the block's groups for every
window (one pass of the copy then serves every group and the block's output); otherwise each
group's inputs are computed again, a batch at a time, when the group needs them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["Reference", "BlockReference"]


class _Stop(Exception):
    pass


class Reference:
    """The full-precision model's hidden states at the current block, one tensor per window."""

    def __init__(self, hidden: list[torch.Tensor]):
        self.hidden = [h.clone() for h in hidden]

    def open(self, block: nn.Module, inputs, batches: list[tuple[int, int]],
             watch: list, memory: int, tokens: int) -> BlockReference:
        """A :class:`BlockReference` for ``block`` (call before any of its layers changes)."""
        return BlockReference(self, block, inputs, batches, watch, memory, tokens)


class BlockReference:
    """A frozen full-precision copy of one block and what it computes on :class:`Reference`'s
    hidden states: the inputs of the modules in ``watch`` (the first layer of each group), batch by
    batch, and the block's outputs.

    ``inputs``: the :class:`~toolkit.walk.sweep.BlockInputs` whose shared arguments (masks, rotary
    embeddings) both streams use; ``batches``: ``[(start, stop), ...]`` windows per batch, those of
    the compressed stream's walk; ``watch``: the first layer of each group
    (:class:`toolkit.model.layers.LinearRef`); ``tokens``: tokens per window (sizes the stored
    inputs).
    """

    def __init__(self, ref: Reference, block: nn.Module, inputs, batches, watch, memory: int,
                 tokens: int):
        self.ref, self.inputs, self.batches = ref, inputs, list(batches)
        self.block = copy.deepcopy(block)
        for p in self.block.parameters():
            p.requires_grad_(False)
        names = {id(m): n for n, m in block.named_modules()}
        mine = dict(self.block.named_modules())
        self.watch = {id(r.module): mine[names[id(r.module)]] for r in watch}
        item = ref.hidden[0].element_size()
        per_window = sum(r.in_features for r in watch) * tokens * item
        self.stored = per_window * len(ref.hidden) <= memory // 2
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._outputs: list[torch.Tensor] | None = None
        if self.stored:
            self._outputs = []
            for b in range(len(self.batches)):
                self._outputs.extend(self._run(b, set(self.watch), None))

    def _run(self, b: int, capture: set[int], stop: int | None) -> list[torch.Tensor]:
        """Run the copy on batch ``b``: keep the inputs of the watched modules in ``capture``, stop
        at module ``stop`` (an id from ``watch``), or return the block's outputs per window."""
        i0, i1 = self.batches[b]
        h = self.ref.hidden
        x = h[i0] if i1 - i0 == 1 else torch.cat(h[i0:i1])
        args, kwargs = self.inputs.shared(i1 - i0)
        seen: set[int] = set()

        def make(key):
            def pre(_module, a):
                if key in capture and key not in seen:
                    seen.add(key)
                    self._inputs[(key, b)] = a[0].detach()
                if key == stop:
                    raise _Stop
            return pre
        handles = [m.register_forward_pre_hook(make(k)) for k, m in self.watch.items()]
        try:
            with torch.no_grad():
                out = self.block(x, *args, **kwargs)
        except _Stop:
            return []
        finally:
            for hd in handles:
                hd.remove()
        out = out[0] if isinstance(out, (tuple, list)) else out
        return list(out.split(1)) if i1 - i0 > 1 else [out]

    def group_input(self, module: nn.Module, b: int) -> torch.Tensor:
        """The input the full-precision block gives ``module`` (a watched module of the original
        block) on batch ``b``. Stored inputs are handed over once and dropped."""
        key = id(module)
        if key not in self.watch:
            raise KeyError("the module is not watched by this BlockReference")
        if (key, b) not in self._inputs:
            self._run(b, {key}, key)
        return self._inputs.pop((key, b))

    def outputs(self) -> list[torch.Tensor]:
        """The full-precision block's output for every window (the reference's next hidden
        states)."""
        if self._outputs is None:
            self._outputs = []
            for b in range(len(self.batches)):
                self._outputs.extend(self._run(b, set(), None))
        return self._outputs

    def close(self) -> None:
        """Advance the reference to the next block's inputs and free the copy."""
        self.ref.hidden = self.outputs()
        self._inputs.clear()
        self._outputs = None
        self.block = None

