"""Block reconstruction: after a block's layers are solved, fit the block's output as a whole.

The layer solver fits each matrix alone; a decoder block is a nonlinear function of its layers
(attention's softmax, the MLP's gate), so the best layers one at a time are not the best block.
After the sweep has solved a block, a few optimiser steps (Adam) lower the block's output error

    || block_c(h_c) - block_d(h_d) ||^2 / || block_d(h_d) ||^2

where ``h_c`` are the block's inputs in the compressed model and ``block_d(h_d)`` the
full-precision block's output on the full-precision inputs (:mod:`toolkit.walk.reference`), so
the block also makes up for what earlier blocks lost. What is trained keeps every promise the
solver made:

* a pruned layer's **kept weights** move freely; pruned weights stay exactly 0 (the mask is
  frozen, so the exact sparsity the sweep chose is kept to the weight);
* a quantized layer keeps its **codes**; each grid's scale is refitted (``scale * exp(a)``, one
  ``a`` per row and group), so every weight stays on its grid, pruned weights on the zero
  point, and the checkpoint stores the new scales;
* a GGUF-typed layer keeps the same promise in its GGUF type: its codes stay and each block's
  fp16 scale ``d`` (a K-quant's super-block scale) is refitted, rounded to fp16 at the end, so
  the weights stay values of the type's grid and the file stores the new factors bit for bit
  (with :data:`RECONSTRUCT_QUANTIZED` ``"round"``: the factors stay and the codes move);
* everything else in the block (norms, biases, layers not compressed) stays as it is.

If the steps end with a larger error on the calibration windows than they started from, the
solver's weights are put back: reconstruction never makes a block worse on what it measures.
Under a process group the gradients are averaged over the ranks before every step, so every
rank takes the same steps on the same weights (:mod:`toolkit.walk.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from toolkit.solver.gguf_grids import GGUFGrid, _codes, _fp16, _values
from toolkit.walk import distributed as dist

__all__ = ["reconstruct_block", "check_reconstruct_steps", "RECONSTRUCT_LR", "RECONSTRUCT_AUTOCAST",
           "fast_bfloat16"]

log = logging.getLogger("toolkit")

#: Adam's step size: for the kept weights of pruned layers, relative to each layer's RMS weight;
#: for the log-scales of quantized layers, absolute; for learned rounding
#: (:data:`RECONSTRUCT_QUANTIZED` ``"round"``), relative to the layer's mean grid step
#: (measured on SmolLM2, bench/reconstruct.py)
#: For the log-scales of GGUF layers (``"gguf"``), divided by the type's number of levels
#: (``2**bits``: a finer grid bears a smaller refit). Chosen on tiny random LLaMAs, where the
#: uniform grids' 1e-2 left every 5- and 8-bit fit put back and 0.05 / levels lowered every
#: type's block errors; its effect on SmolLM2: ``bench/llama_cpp.py --effort-max``.
RECONSTRUCT_LR = {"weight": 1e-2, "scale": 1e-2, "round": 5e-2, "gguf": 5e-2}

#: ``"auto"``: the optimiser steps of a float32 block run under bfloat16 autocast where the device
#: multiplies bfloat16 fast (:func:`fast_bfloat16`); ``"off"``: always in the block's dtype. The
#: errors before and after, and the decision to keep or put back, are always computed in the
#: block's dtype; only the gradients' arithmetic changes.
RECONSTRUCT_AUTOCAST = "auto"

#: How a quantized layer trains: ``"scale"`` keeps its codes and refits each grid's scale (the
#: default, measured against the other by ``bench/reconstruct.py --quantized round``); ``"round"``
#: learns the rounding: a latent weight per entry, re-projected on the solver's fixed grid at every
#: step (straight-through gradient), so codes may move to neighbouring levels and scales stay.
RECONSTRUCT_QUANTIZED = "scale"


def fast_bfloat16(device) -> bool:
    """Whether ``device`` has bfloat16 matrix units: a CUDA GPU that supports bfloat16, or a CPU
    with AMX tiles or AVX512-BF16 (elsewhere bfloat16 is emulated and slower than float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(bool(getattr(torch.cpu, probe, lambda: False)())
                   for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return False


def check_reconstruct_steps(v, name="reconstruct_steps"):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0 = no block reconstruction), "
                         f"got {v!r}")
    return v


@dataclass
class _Trained:
    ref: object  # LinearRef
    key: str  # the weight's name inside the block, for functional_call
    kind: str  # "weight" (kept weights move), "scale" (codes fixed, scales refit) or "round"
    # (rounding learned: latent weights re-projected on the fixed grid at every step)
    param: torch.Tensor
    w0: torch.Tensor  # (out, in) float, the solver's weight
    mask: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # (out, in) the solver's scale of each weight's group
    zero: torch.Tensor | None = None  # (out, in); a GGUF layer: its codes (float)
    group: torch.Tensor | None = None  # column -> group
    maxq: int = 0
    base: torch.Tensor | None = None  # (out, in) scale * (codes - zero), the solver's weight
    width: int = 0  # columns per group when groups are runs of equal width (0: use ``group``)
    grid: GGUFGrid | None = None  # a GGUF layer's factors, on the weight's device (``scale``
    # and ``minimum`` hold their expansion per weight)
    minimum: torch.Tensor | None = None  # (out, in) a GGUF grid's minimum (subtracted), or None

    def exact(self) -> torch.Tensor:
        """The weight the layer keeps after the fit: :meth:`weight`, except for a GGUF layer,
        whose values are recomputed as the GGUF reader does (its refitted ``d`` rounded to fp16),
        so that they are the type's values bit for bit."""
        if self.grid is None:
            return self.weight()
        with torch.no_grad():
            if self.kind == "round":
                return self._gguf_round(exact=True)
            return self.new_grid().values(self.zero).to(self.w0.dtype)

    def new_grid(self) -> GGUFGrid:
        """A GGUF layer's grid after the fit ("scale": ``d`` refitted, in fp16)."""
        if self.kind != "scale":
            return self.grid
        d = self.grid.d * torch.exp(self.param.detach().float())
        return dataclasses.replace(self.grid, d=_fp16(d, nonzero=True))

    def _gguf_round(self, exact: bool = False) -> torch.Tensor:
        t = self.grid.type
        p = self.param.float()
        x = (p if self.minimum is None else p + self.minimum) / self.scale
        code = torch.clamp(torch.round(x) + float(t.offset), 0, t.maxq)  # as gguf_grids._codes
        if exact:
            w = _values(code, self.scale, float(t.offset), self.minimum)
        else:  # straight-through: the value of the nearest code, the gradient of the identity
            q = x + (code - float(t.offset) - x).detach()
            w = self.scale * q if self.minimum is None else self.scale * q - self.minimum
        w = w.to(self.param.dtype)
        return w if self.mask is None else torch.where(self.mask, w, self.w0)

    def weight(self) -> torch.Tensor:
        """The (out, in) weight as a function of the trained parameter."""
        if self.kind == "weight":
            return torch.where(self.mask, self.param, torch.zeros((), dtype=self.param.dtype))
        if self.kind == "round" and self.grid is not None:
            return self._gguf_round()
        if self.kind == "round":  # nearest code of the latent weight; straight-through gradient
            x = self.param / self.scale + self.zero
            q = x + (torch.clamp(torch.round(x), 0, self.maxq) - x).detach()
            w = self.scale * (q - self.zero)
            return w if self.mask is None else torch.where(self.mask, w, torch.zeros((), dtype=w.dtype))
        if self.width:  # one factor per run of columns: a broadcast, no gather
            o, i = self.base.shape
            w = (self.base.view(o, i // self.width, self.width)
                 * torch.exp(self.param).unsqueeze(-1)).view(o, i)
        else:
            w = self.base * torch.exp(self.param[:, self.group])
        return w if self.minimum is None else w - self.minimum  # a GGUF type's minimum stays

    def tensor(self) -> torch.Tensor:
        """What functional_call puts in place of the module's weight (Conv1D: transposed).
        Kept weights of a pruned layer: the parameter itself, whose pruned entries start at 0
        and never get a gradient (:func:`_trainable` masks it), so Adam leaves them exactly 0
        and no masking runs in the forward."""
        if self.kind == "weight":
            w = self.param.to(self.ref.module.weight.dtype)
            return w.T if self.ref.transposed else w
        w = self.weight().to(self.ref.module.weight.dtype)
        return w.T if self.ref.transposed else w


def _trainable(block: nn.Module, refs: list, dtype: torch.dtype) -> list[_Trained]:
    names = {id(m): n for n, m in block.named_modules()}
    out = []
    for ref in refs:
        comp = ref.get_record()
        if comp is None or getattr(ref, "transposed", None) is None or id(ref.module) not in names:
            continue  # expert slices and untouched layers stay as they are
        s = comp.settings
        w0 = ref.get_weight().detach().to(dtype)
        key = f"{names[id(ref.module)]}.weight" if names[id(ref.module)] else "weight"
        if s.gguf is not None:
            t = _trained_gguf(ref, key, comp, w0)
            if t is not None:
                out.append(t)
            continue
        if s.bits is None:
            if not s.prunes:
                continue
            mask = w0 != 0
            param = torch.where(mask, w0, torch.zeros((), dtype=w0.dtype)).requires_grad_(True)
            # pruned entries get no gradient: Adam (no weight decay) keeps them exactly 0
            param.register_hook(lambda g, m=mask: torch.where(m, g, torch.zeros((), dtype=g.dtype)))
            out.append(_Trained(ref, key, "weight", param, w0, mask))
            continue
        if comp.scale is None:
            continue
        cols = w0.shape[1]
        if comp.g_idx is not None:
            group = comp.g_idx.to(w0.device).long()
        elif s.group_size is not None:
            group = torch.arange(cols, device=w0.device) // s.group_size
        else:
            group = torch.zeros(cols, dtype=torch.long, device=w0.device)
        scale = comp.scale.to(device=w0.device, dtype=dtype)[:, group]
        zero = comp.zero.to(device=w0.device, dtype=dtype)[:, group]
        codes = torch.round(w0 / scale + zero)
        if not torch.allclose(scale * (codes - zero), w0, rtol=1e-3, atol=1e-6):
            log.warning("%s: its weights are not on its stored grid; left out of the block "
                        "reconstruction", ref.name)
            continue
        if RECONSTRUCT_QUANTIZED == "round":
            out.append(_Trained(ref, key, "round", w0.clone().requires_grad_(True), w0,
                                mask=(codes != zero) if s.prunes else None, scale=scale,
                                zero=zero, maxq=2 ** s.bits - 1))
            continue
        a = torch.zeros(comp.scale.shape, dtype=dtype, device=w0.device, requires_grad=True)
        width = 0
        if comp.g_idx is None and cols % a.shape[1] == 0:
            width = cols // a.shape[1]
            if not torch.equal(group, torch.arange(cols, device=group.device) // width):
                width = 0
        out.append(_Trained(ref, key, "scale", a, w0, scale=scale, zero=zero,
                            group=group, base=scale * (codes - zero), width=width))
    return out


def _trained_gguf(ref, key: str, comp, w0: torch.Tensor) -> _Trained | None:
    """A GGUF layer's trained form: its codes and its grid's factors, expanded per weight."""
    if not isinstance(comp.gguf, GGUFGrid) or w0.dtype != torch.float32:
        return None  # float64 blocks: the grid's values are float32 (left as they are)
    g = comp.gguf.to(w0.device)
    t = g.type
    try:
        codes = g.codes(w0, ref.name).float()
    except ValueError as e:
        log.warning("%s; left out of the block reconstruction", e)
        return None
    scale, mn = g._expanded(w0.shape[1])
    zcode = _codes(torch.zeros_like(scale), scale, float(t.offset), t.maxq, mn)
    mask = (codes != zcode) if comp.settings.prunes else None
    if RECONSTRUCT_QUANTIZED == "round":
        return _Trained(ref, key, "round", w0.clone().requires_grad_(True), w0, mask=mask,
                        scale=scale, zero=codes, maxq=t.maxq, grid=g, minimum=mn)
    a = torch.zeros(g.d.shape, dtype=w0.dtype, device=w0.device, requires_grad=True)
    base = scale * (codes - float(t.offset))  # the part the block scale d multiplies
    return _Trained(ref, key, "scale", a, w0, scale=scale, zero=codes, grid=g, minimum=mn,
                    base=base, width=t.block)


def _error(block, inputs, x, y, params=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum ||out - y||^2, out)`` for one batch; ``params`` replace the block's weights."""
    args, kwargs = inputs.shared(x.shape[0])
    if params is None:
        out = block(x, *args, **kwargs)
    else:
        out = functional_call(block, params, (x, *args), kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return ((out.to(y.dtype) - y) ** 2).sum(), out


def _sum_over_ranks(*values: float) -> list[float]:
    if not dist.active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    with dist._collective("summing the block reconstruction error"):
        torch.distributed.all_reduce(t)
    return t.tolist()


def _average_grads(params: list[torch.Tensor]) -> None:
    if not dist.active():
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    with dist._collective("averaging the block reconstruction gradients"):
        torch.distributed.all_reduce(flat)
    flat /= dist.world_size()
    i = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[i:i + n].view_as(p.grad))
        i += n


def reconstruct_block(block: nn.Module, refs: list, h_in: list[torch.Tensor],
                      targets: list[torch.Tensor], inputs, batches: list[tuple[int, int]], *,
                      steps: int, batch_windows: int = 1, lr: dict | None = None,
                      outputs: list[torch.Tensor] | None = None
                      ) -> tuple[dict, list[torch.Tensor]]:
    """Fit the solved block's output to the full-precision block's, in place (module docstring).

    ``refs``: the block's compressed layers (their records say what was done); ``h_in``: the
    block's inputs in the compressed model, one tensor per window; ``targets``: the full-precision
    block's outputs, paired with them; ``inputs``: the :class:`~toolkit.walk.sweep.BlockInputs`
    with the shared block arguments; ``batches``: windows per forward for the error passes;
    ``steps``: Adam steps, each on ``batch_windows`` windows (taken in order, cycling);
    ``lr``: :data:`RECONSTRUCT_LR` by default. ``outputs``: the solved block's outputs on
    ``h_in`` when the sweep already has them (its one-forward walk), saving a pass.

    Returns ``(stats, outputs)``: ``stats`` holds ``before``/``after`` (the relative output
    error on every calibration window, summed over ranks), ``kept`` (False when the solver's
    weights were put back) and ``trained`` (layers trained); ``outputs`` the block's outputs
    on ``h_in`` after the fit (the next block's inputs).
    """
    steps = check_reconstruct_steps(steps, "steps")
    lr = {**RECONSTRUCT_LR, **(lr or {})}
    dtype = torch.float64 if targets[0].dtype == torch.float64 else torch.float32
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    if RECONSTRUCT_QUANTIZED not in ("scale", "round"):
        raise ValueError(f"RECONSTRUCT_QUANTIZED must be 'scale' or 'round', got "
                         f"{RECONSTRUCT_QUANTIZED!r}")
    trained = _trainable(block, refs, dtype)

    def full_pass(known=None):
        err = energy = 0.0
        outs = []
        with torch.no_grad():
            for i0, i1 in batches:
                y = targets[i0] if i1 - i0 == 1 else torch.cat(targets[i0:i1])
                if known is None:
                    x = h_in[i0] if i1 - i0 == 1 else torch.cat(h_in[i0:i1])
                    e, out = _error(block, inputs, x, y)
                    outs.extend(out.split(1) if i1 - i0 > 1 else [out])
                else:
                    out = known[i0] if i1 - i0 == 1 else torch.cat(known[i0:i1])
                    e = ((out.to(y.dtype) - y) ** 2).sum()
                err += float(e)
                energy += float((y ** 2).sum())
        err, energy = _sum_over_ranks(err, energy)
        return err / max(energy, 1e-30), (outs if known is None else list(known))

    try:
        before, outs = full_pass(outputs)
        stats = {"before": before, "after": before, "kept": False, "trained": len(trained)}
        if not trained or steps == 0:
            return stats, outs
        groups = []
        for t in trained:
            if t.kind == "weight":
                rms = float(t.w0[t.mask].pow(2).mean().sqrt()) if bool(t.mask.any()) else 0.0
                groups.append({"params": [t.param], "lr": lr["weight"] * max(rms, 1e-12)})
            elif t.grid is not None and t.kind == "scale":
                groups.append({"params": [t.param],
                               "lr": lr["gguf"] / (t.grid.type.maxq + 1)})
            elif t.kind == "round":  # relative to the mean grid step
                step = float(t.scale.abs().mean())
                groups.append({"params": [t.param], "lr": lr["round"] * max(step, 1e-12)})
            else:
                groups.append({"params": [t.param], "lr": lr["scale"]})
        try:  # one kernel per tensor (every group holds one large matrix): 8x the default
            opt = torch.optim.Adam(groups, fused=True)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            opt = torch.optim.Adam(groups)
        dev = trained[0].param.device
        if RECONSTRUCT_AUTOCAST not in ("auto", "off"):
            raise ValueError(f"RECONSTRUCT_AUTOCAST must be 'auto' or 'off', got "
                             f"{RECONSTRUCT_AUTOCAST!r}")
        bf16 = (RECONSTRUCT_AUTOCAST == "auto" and dtype == torch.float32
                and all(p.dtype == torch.float32 for p in block.parameters())
                and fast_bfloat16(dev))
        n = len(h_in)
        k = max(1, min(batch_windows, n))
        if k not in (1, n) and k not in inputs.batched:
            k = 1
        energy = sum(float((y.to(dtype) ** 2).sum()) for y in targets) / n
        for step in range(steps):
            i0 = (step * k) % n
            idx = [(i0 + j) % n for j in range(k)]
            x = torch.cat([h_in[i] for i in idx]) if k > 1 else h_in[idx[0]]
            y = torch.cat([targets[i] for i in idx]) if k > 1 else targets[idx[0]]
            # callers may run under no_grad (compress_streaming)
            with torch.enable_grad(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                     enabled=bf16):
                params = {t.key: t.tensor() for t in trained}
                e, _ = _error(block, inputs, x, y, params)
                loss = e / (energy * k)
                opt.zero_grad(set_to_none=False)
                loss.backward()
            _average_grads([t.param for t in trained])
            opt.step()
            if not math.isfinite(float(loss.detach())):
                break
        saved = [t.ref.get_weight().detach().clone() for t in trained]
        with torch.no_grad():
            for t in trained:
                t.ref.set_weight(t.exact().detach())
        after, new_outs = full_pass()
        if not after < before:  # never worse than the solver's weights on the calibration
            with torch.no_grad():
                for t, w in zip(trained, saved):
                    t.ref.set_weight(w)
            stats["after"] = before
            return stats, outs
        for t in trained:  # the records follow: refit scales
            if t.grid is not None:
                t.ref.get_record().gguf = t.new_grid().to("cpu")
            elif t.kind == "scale":
                comp = t.ref.get_record()
                comp.scale = (comp.scale.to(t.param.device, dtype)
                              * torch.exp(t.param.detach())).float().cpu()
        stats.update(after=after, kept=True)
        return stats, new_outs
    finally:
        for p, g in frozen:
            p.requires_grad_(g)
