"""GGUF's block grids: the values a GGUF type can store, fitted block by block as the sweep
reaches them, so that a GGUF file holds the solver's codes bit for bit.

A GGUF tensor is stored row by row, each row cut into blocks of consecutive input columns. Every
type stores, per block, integer codes and a few factors; GGUF's reader (``gguf.quants.dequantize``,
which transformers uses, and llama.cpp's reference dequantization) turns them into float32
values. In every type the value of a code has the form

    value = scale * (code - offset) - minimum        (float32: a product, then a difference)

with one ``scale`` and ``minimum`` per *sub-block* of ``sub`` columns:

=====  =======  =====  ======  ============================  =====================================
type   code     block  sub     scale                         minimum
=====  =======  =====  ======  ============================  =====================================
Q4_0   4 bits   32     32      d (fp16)                      none (offset 8)
Q5_0   5 bits   32     32      d (fp16)                      none (offset 16)
Q8_0   8 bits   32     32      d (fp16)                      none (offset 128: int8 codes)
Q4_1   4 bits   32     32      d (fp16)                      -m (fp16 m: the reader's d*q + m)
Q5_1   5 bits   32     32      d (fp16)                      -m
Q2_K   2 bits   256    16      d * sc (sc 4-bit unsigned)    dmin * mi (mi 4-bit unsigned)
Q3_K   3 bits   256    16      d * sc (sc 6-bit signed)      none (offset 4)
Q4_K   4 bits   256    32      d * sc (sc 6-bit unsigned)    dmin * mi (mi 6-bit unsigned)
Q5_K   5 bits   256    32      d * sc (sc 6-bit unsigned)    dmin * mi (mi 6-bit unsigned)
Q6_K   6 bits   256    16      d * sc (sc 8-bit signed)      none (offset 32)
=====  =======  =====  ======  ============================  =====================================

(d, dmin: fp16, one per block; for the K-quants the block is a 256-column super-block whose
sub-block factors are small integers under d and dmin.) The values here are computed with the
same float32 operations in the same order as the reader, so they are equal to what any GGUF
reader dequantizes, not merely close.

**Fitting as the sweep goes.** :class:`BlockFitter` is what the solver calls when its column sweep
reaches the first column of a sub-block (:func:`toolkit.solver.layer.solve_layers` with
``gguf=``). At a 32-column block (or a K-quant super-block) it fits the block's fp16 factors to
the current weights of the whole block (already updated by the errors of every column to its
left); inside a super-block, each sub-block's integer scale and minimum are chosen again when the
sweep reaches it, under the super-block's factors, from the weights as they are then. Each fit
searches a few candidate scales, each with its least-squares rescale, for the smallest squared
error (round to nearest on the candidate grid), as llama.cpp's reference quantizers do. In the
sweep the squared error of column ``j`` is weighted by ``1 / U_jj^2``, what the sweep charges for
rounding that column (``U`` the Cholesky factor of ``H^-1``): the grid is fitted to the
Hessian's view of the block, as an importance matrix does for llama.cpp, but with the exact
per-column cost. :func:`gguf_rtn` fits unweighted.

**Pruned weights.** GGUF has no sparse type: a pruned weight is stored as the code whose value is
nearest zero (``BlockFitter.fit`` returns it per row). In the types with an offset (Q4_0, Q5_0,
Q8_0, Q3_K, Q6_K) that value is exactly 0; in the types with a minimum it is within half a step of
0. Either way a pruned weight costs as many bits as a kept one.

:func:`gguf_rtn` is the round-to-nearest baseline on the same grids (every block fitted to the
weights as given, no error compensation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.solver.checks import GGUF_TYPES

__all__ = ["GGUFType", "TYPES", "gguf_type", "GGUFGrid", "BlockFitter", "gguf_rtn", "FALLBACK",
           "bits_per_weight", "check_cols"]


@dataclass(frozen=True)
class GGUFType:
    """One GGUF block type: ``value = scale * (code - offset) - minimum`` per sub-block."""

    name: str
    bits: int  # bits of one weight's code
    block: int  # weights per block (the super-block of a K-quant)
    sub: int  # weights sharing one scale (and minimum)
    offset: int  # code offset; 0 for the types with a minimum
    has_min: bool
    nbytes: int  # bytes per block
    scale_bits: int = 0  # K-quants: bits of each sub-block's integer scale (and minimum)
    signed: bool = False  # K-quants without a minimum: signed integer scales

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    @property
    def kquant(self) -> bool:
        return self.block > self.sub

    @property
    def bits_per_weight(self) -> float:
        return self.nbytes * 8 / self.block

    @property
    def scale_range(self) -> tuple[int, int]:
        """The integer sub-block scales a K-quant stores (0 excluded for unsigned ones: a scale
        of 1 represents everything a scale of 0 does)."""
        if self.signed:
            return -(2 ** (self.scale_bits - 1)), 2 ** (self.scale_bits - 1) - 1
        return 1, 2**self.scale_bits - 1

    @property
    def min_max(self) -> int:
        """The largest integer sub-block minimum of a K-quant with minimums."""
        return 2**self.scale_bits - 1


TYPES: dict[str, GGUFType] = {t.name: t for t in (
    GGUFType("Q4_0", 4, 32, 32, 8, False, 18),
    GGUFType("Q4_1", 4, 32, 32, 0, True, 20),
    GGUFType("Q5_0", 5, 32, 32, 16, False, 22),
    GGUFType("Q5_1", 5, 32, 32, 0, True, 24),
    GGUFType("Q8_0", 8, 32, 32, 128, False, 34),
    GGUFType("Q2_K", 2, 256, 16, 0, True, 84, scale_bits=4),
    GGUFType("Q3_K", 3, 256, 16, 4, False, 110, scale_bits=6, signed=True),
    GGUFType("Q4_K", 4, 256, 32, 0, True, 144, scale_bits=6),
    GGUFType("Q5_K", 5, 256, 32, 0, True, 176, scale_bits=6),
    GGUFType("Q6_K", 6, 256, 16, 32, False, 210, scale_bits=8, signed=True),
)}
assert tuple(TYPES) == GGUF_TYPES

#: The 32-column type llama.cpp stores a tensor in when its row length is not a multiple of a
#: K-quant's 256 (llama.cpp's own fallback table; it now uses IQ4_NL for Q2_K/Q3_K, which the
#: solver does not fit: Q4_0, its earlier choice, instead).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

_FP16_MAX = 65504.0
_FP16_TINY = 2.0**-24  # smallest positive fp16 value: a scale is never 0 (codes stay defined)


def gguf_type(name) -> GGUFType:
    """The :class:`GGUFType` called ``name`` (``"Q4_K"``; any case)."""
    if isinstance(name, GGUFType):
        return name
    t = TYPES.get(str(name).upper()) if isinstance(name, str) else None
    if t is None:
        raise ValueError(f"gguf must be one of {', '.join(TYPES)} (a GGUF block type), got "
                         f"{name!r}")
    return t


def _fp16(x: torch.Tensor, nonzero: bool = False) -> torch.Tensor:
    """``x`` rounded to fp16 (kept in float32); ``nonzero``: 0 becomes the smallest fp16 > 0."""
    y = x.clamp(-_FP16_MAX, _FP16_MAX).half().float()
    if nonzero:
        y = torch.where(y == 0, torch.full_like(y, _FP16_TINY), y)
    return y


# ---- grids: values and codes -----------------------------------------------------------------

@dataclass
class GGUFGrid:
    """The fitted factors of one weight (rows x cols) in one GGUF type.

    ``d``: (rows, blocks) fp16 values in float32 (the block scale; a K-quant's super-block
    scale). ``m``: (rows, blocks) the block minimum of Q4_1/Q5_1 (added: ``d*q + m``) or a
    K-quant's super-block minimum factor ``dmin``; None for the types without one. ``sc``/``mi``:
    (rows, sub-blocks) a K-quant's integer sub-block scales and minimums (float32 holding
    integers; ``mi`` None without minimums).
    """

    type: GGUFType
    d: torch.Tensor
    m: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    mi: torch.Tensor | None = None

    def _per_sub(self, x: torch.Tensor) -> torch.Tensor:
        t = self.type
        return x.repeat_interleave(t.block // t.sub, dim=1) if t.kquant else x

    def scale(self) -> torch.Tensor:
        """(rows, sub-blocks) the float32 scale of each sub-block, as the reader computes it."""
        if not self.type.kquant:
            return self.d
        return self._per_sub(self.d) * self.sc

    def minimum(self) -> torch.Tensor | None:
        """(rows, sub-blocks) the float32 amount subtracted from each sub-block's values (None
        for the types without a minimum)."""
        t = self.type
        if not t.has_min:
            return None
        if not t.kquant:
            return -self.m
        return self._per_sub(self.m) * self.mi

    def rows(self, r0: int, r1: int) -> GGUFGrid:
        """The grid of rows ``r0 .. r1 - 1``."""
        def cut(x):
            return None if x is None else x[r0:r1].clone()
        return GGUFGrid(self.type, cut(self.d), cut(self.m), cut(self.sc), cut(self.mi))

    def to(self, device) -> GGUFGrid:
        def move(x):
            return None if x is None else x.to(device)
        return GGUFGrid(self.type, move(self.d), move(self.m), move(self.sc), move(self.mi))

    def _expanded(self, cols: int):
        sub = self.type.sub
        scale = self.scale().repeat_interleave(sub, dim=1)[:, :cols]
        mn = self.minimum()
        return scale, (None if mn is None else mn.repeat_interleave(sub, dim=1)[:, :cols])

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """The float32 values of ``codes`` (rows x cols, integers ``0 .. 2**bits - 1``)."""
        scale, mn = self._expanded(codes.shape[1])
        return _values(codes.float(), scale, float(self.type.offset), mn)

    def codes(self, w: torch.Tensor, name: str = "layer") -> torch.Tensor:
        """The integer codes (uint8) of a weight whose every value lies exactly on this grid.

        Raises ``ValueError`` naming the first weight whose value is not reproduced bit for bit
        (the weight was changed after compression, or is not in float32)."""
        wf = w.float()
        scale, mn = self._expanded(w.shape[1])
        q = _codes(wf, scale, float(self.type.offset), self.type.maxq, mn)
        bad = _values(q, scale, float(self.type.offset), mn) != wf
        if bool(bad.any()):
            r, c = divmod(int(bad.flatten().nonzero()[0]), w.shape[1])
            raise ValueError(
                f"{name}: weight [{r}, {c}] = {float(wf[r, c])!r} is not a value of its "
                f"{self.type.name} grid (nearest {float(_values(q, scale, float(self.type.offset), mn)[r, c])!r}); "
                "was the weight changed after compress(), or cast from float32?")
        return q.to(torch.uint8)


def _codes(w, scale, offset, maxq, minimum=None):
    x = w if minimum is None else w + minimum
    return torch.clamp(torch.round(x / scale) + offset, 0, maxq)


def _values(q, scale, offset, minimum=None):
    v = scale * (q - offset)
    return v if minimum is None else v - minimum


# ---- fitting ---------------------------------------------------------------------------------

def _fit_offset(w: torch.Tensor, t: GGUFType, steps: int = 4,
                wt: torch.Tensor | None = None) -> torch.Tensor:
    """Float scales (rows,) for a grid without minimum: codes ``-offset .. maxq - offset``.

    Candidates map the weight of largest magnitude near the most negative level (as the
    reference quantizers do, which gains the extra negative level) or near the largest positive
    one; each candidate's codes get their least-squares scale; the smallest squared error wins
    (weighted by ``wt``, broadcast to ``w``, when given).
    """
    lo, hi = -t.offset, t.maxq - t.offset
    idx = w.abs().argmax(dim=1, keepdim=True)
    xm = torch.gather(w, 1, idx).squeeze(1)  # the signed weight of largest magnitude
    shifts = torch.arange(-steps, steps + 1, device=w.device, dtype=w.dtype) * (0.9 / steps)
    targets = torch.cat([lo - shifts, hi + shifts])  # the level xm lands on
    safe = torch.where(xm == 0, torch.ones_like(xm), xm)
    iscale = targets[:, None] / safe[None, :]  # (C, rows)
    L = torch.clamp(torch.round(w[None] * iscale[:, :, None]), lo, hi)  # (C, rows, n)
    ww = w if wt is None else w * wt
    sl2 = (L * L).sum(-1) if wt is None else (L * L * wt).sum(-1)
    sxl = (ww[None] * L).sum(-1)
    s = torch.where(sl2 > 0, sxl / sl2.clamp_min(1e-30), torch.zeros_like(sl2))
    err = s * s * sl2 - 2 * s * sxl  # the squared error less sum w^2 (the same for all)
    best = err.argmin(dim=0)
    s = s.gather(0, best[None]).squeeze(0)
    return torch.where(xm == 0, torch.zeros_like(s), s)


def _fit_min(w: torch.Tensor, t: GGUFType, nonneg: bool, steps: int = 10,
             wt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float ``(scale, minimum)`` (rows,) for a grid ``scale * q - minimum``, ``q`` in
    ``0 .. maxq``; ``nonneg``: the minimum must be >= 0 (the K-quants: the range reaches 0).

    Candidates spread ``[min, max]`` over ``maxq + delta`` steps (delta in -1 .. 1); the codes
    of each get the least-squares line ``scale * q + b`` (b <= 0 with ``nonneg``); the smallest
    squared error wins (weighted by ``wt``, broadcast to ``w``, when given)."""
    maxq = t.maxq
    n = w.shape[1] if wt is None else (wt * torch.ones_like(w)).sum(1)[None]
    xmin = w.min(dim=1).values
    xmax = w.max(dim=1).values
    if nonneg:
        xmin = torch.clamp(xmin, max=0)
    rng = xmax - xmin
    flat = rng <= 0
    rng = torch.where(flat, torch.ones_like(rng), rng)
    deltas = torch.arange(-steps, steps + 1, device=w.device, dtype=w.dtype) * (1.0 / steps)
    iscale = (maxq + deltas)[:, None] / rng[None, :]  # (C, rows)
    L = torch.clamp(torch.round((w - xmin[:, None])[None] * iscale[:, :, None]), 0, maxq)
    ww = w if wt is None else w * wt
    Lw = L if wt is None else L * wt
    sl = Lw.sum(-1)
    sl2 = (Lw * L).sum(-1)
    sx = ww.sum(1)[None]
    sxl = (ww[None] * L).sum(-1)
    D = n * sl2 - sl * sl
    ok = D > 0
    Ds = torch.where(ok, D, torch.ones_like(D))
    s = (n * sxl - sx * sl) / Ds
    b = (sl2 * sx - sl * sxl) / Ds
    if nonneg:
        pos = b > 0
        s = torch.where(pos, sxl / sl2.clamp_min(1e-30), s)
        b = torch.where(pos, torch.zeros_like(b), b)
    # candidates whose codes are all equal: the plain min/max grid
    s = torch.where(ok, s, (rng / maxq)[None].expand_as(s))
    b = torch.where(ok, b, xmin[None].expand_as(b))
    s = torch.clamp(s, min=0)
    # sum (w - s L - b)^2, less sum w^2 (the same for every candidate)
    err = s * s * sl2 + n * b * b + 2 * s * b * sl - 2 * s * sxl - 2 * b * sx
    best = err.argmin(dim=0)
    s = s.gather(0, best[None]).squeeze(0)
    b = b.gather(0, best[None]).squeeze(0)
    # a constant row: codes 0, minimum -value
    s = torch.where(flat, torch.zeros_like(s), s)
    b = torch.where(flat, xmin, b)
    return s, -b


#: The power of the sweep's per-column cost used as the weights of a block's fit (1: the cost
#: itself). Measured on SmolLM2 by ``bench/gguf_importance.py`` (32 x 512 calibration, 40 x 512
#: WikiText-2 test windows): 0.5 gave Q4_0 35.56 against 36.07 but Q3_K 38.13 against 36.22
#: (opposite directions), so the exact cost stays.
IMPORTANCE_POWER = 1.0

_FIT_ROWS = 1024  # rows per fitting pass: the candidate search holds ~20 copies of them


def _fit_float(w: torch.Tensor, t: GGUFType, coarse: bool = False,
               wt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float grid of each row of ``w``; ``coarse``: fewer candidates (a K-quant's
    provisional sub-block fits, which only set the super-block factors); ``wt``: weights of the
    squared error, (1, n) or the shape of ``w``."""
    if w.shape[0] > _FIT_ROWS:
        wts = [wt] * -(-w.shape[0] // _FIT_ROWS) if wt is None or wt.shape[0] == 1 else \
            torch.split(wt, _FIT_ROWS)
        parts = [_fit_float(c, t, coarse, cw) for c, cw in zip(torch.split(w, _FIT_ROWS), wts)]
        s = torch.cat([p[0] for p in parts])
        return s, (torch.cat([p[1] for p in parts]) if t.has_min else None)
    if t.has_min:
        return _fit_min(w, t, nonneg=t.kquant, steps=2 if coarse else 10, wt=wt)
    return _fit_offset(w, t, steps=2 if coarse else 4, wt=wt), None


def _sq_error(w, scale, minimum, t: GGUFType, wt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row squared error (weighted by ``wt`` when given) of rounding ``w`` (rows x n) to the
    nearest value of the grid with per-row ``scale``/``minimum``; returns ``(error, codes)``."""
    s = scale[:, None]
    mn = None if minimum is None else minimum[:, None]
    q = _codes(w, s, float(t.offset), t.maxq, mn)
    e = (w - _values(q, s, float(t.offset), mn)).pow(2)
    return (e if wt is None else e * wt).sum(1), q


class BlockFitter:
    """The GGUF grids of one weight (``rows x cols``), fitted as the solver's sweep reaches them.

    ``starts`` maps the first column of every sub-block to ``(sub-block index, end)``: the solver
    hands :meth:`fit` the current weights of columns ``col .. end - 1`` (the whole block or
    super-block at its first column, else the sub-block) and quantizes the sub-block's columns
    with the returned grid. :meth:`grid` returns the fitted :class:`GGUFGrid`.
    """

    def __init__(self, gtype, rows: int, cols: int, device=None, name: str = "layer"):
        t = gguf_type(gtype)
        if cols % t.block:
            alt = FALLBACK.get(t.name)
            hint = (f"; llama.cpp stores such tensors as {alt} (gguf={alt!r} for this layer, "
                    f"e.g. through overrides)" if alt and cols % TYPES[alt].block == 0 else "")
            raise ValueError(f"{name}: {t.name} stores rows in blocks of {t.block} columns; this "
                             f"weight has {cols} columns{hint}")
        self.type = t
        self.rows, self.cols = rows, cols
        nb, ns = cols // t.block, cols // t.sub
        z = dict(dtype=torch.float32, device=device)
        self.d = torch.zeros(rows, nb, **z)
        self.m = torch.zeros(rows, nb, **z) if t.has_min else None
        self.sc = torch.zeros(rows, ns, **z) if t.kquant else None
        self.mi = torch.zeros(rows, ns, **z) if t.kquant and t.has_min else None
        self.bounds = [(a, a + t.sub) for a in range(0, cols, t.sub)]
        self.starts = {a: (j, a + (t.block if a % t.block == 0 else t.sub))
                       for j, (a, _b) in enumerate(self.bounds)}
        self._offset = torch.full((rows,), float(t.offset), **z)

    def grid(self) -> GGUFGrid:
        return GGUFGrid(self.type, self.d, self.m, self.sc, self.mi)

    def fit(self, col: int, w: torch.Tensor, keep: torch.Tensor | None = None,
            importance: torch.Tensor | None = None):
        """Fit the grid of the sub-block starting at ``col`` to ``w`` (rows x n: the current
        weights of columns ``col .. starts[col][1] - 1``); ``keep`` marks the weights that
        survive pruning (the others count as zeros); ``importance`` (n,): how much a squared
        rounding error costs in each column (the solver passes ``1 / U_jj^2``, the cost GPTQ's
        sweep charges for it; None: all alike, round to nearest). Returns per-row tensors
        ``(scale, zero, minimum, zero_code)``: the sub-block's grid is ``scale * (code - zero) -
        minimum`` (``minimum`` None without one), and ``zero_code`` is the code whose value is
        nearest 0 (what a pruned weight is stored as)."""
        t = self.type
        j, _end = self.starts[col]
        w = w.float()
        if keep is not None:
            w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
        blk = col // t.block
        wt = None
        if importance is not None:
            imp = importance.float().clamp_min(0).pow(IMPORTANCE_POWER)
            wt = (imp / imp.mean().clamp_min(1e-30))[None, :].to(w.device)
        if not t.kquant:
            s, mn = _fit_float(w, t, wt=wt)
            self.d[:, blk] = _fp16(s, nonzero=True)
            if t.has_min:
                self.m[:, blk] = _fp16(-mn)
        else:
            if col % t.block == 0:
                self._fit_super(blk, w, wt)
            self._fit_sub(j, blk, w[:, :t.sub], None if wt is None else wt[:, :t.sub])
        g = self.grid()
        scale = g.scale()[:, j]
        mn = g.minimum()
        mn = None if mn is None else mn[:, j]
        zcode = _codes(torch.zeros_like(scale), scale, float(t.offset), t.maxq, mn)
        return scale, self._offset, mn, zcode

    def _fit_super(self, blk: int, w: torch.Tensor, wt: torch.Tensor | None = None) -> None:
        """The fp16 super-block factors, from float fits of each sub-block of ``w`` (rows x
        256), so that the largest sub-block scale (minimum) is the largest integer level."""
        t = self.type
        rows, per = w.shape[0], t.block // t.sub
        if wt is not None:
            wt = wt.reshape(per, t.sub).repeat(rows, 1)
        s, mn = _fit_float(w.reshape(rows * per, t.sub), t, coarse=True, wt=wt)
        s = s.reshape(rows, per)
        lo, hi = t.scale_range
        if t.signed:  # the sub-block scale of largest magnitude lands on the most negative level
            idx = s.abs().argmax(dim=1, keepdim=True)
            d = torch.gather(s, 1, idx).squeeze(1) / lo
        else:
            d = s.max(dim=1).values / hi
        self.d[:, blk] = _fp16(d, nonzero=True)
        if t.has_min:
            mn = mn.reshape(rows, per)
            self.m[:, blk] = _fp16(mn.max(dim=1).values / t.min_max)

    def _fit_sub(self, j: int, blk: int, w: torch.Tensor, wt: torch.Tensor | None = None) -> None:
        """The integer scale (and minimum) of sub-block ``j`` under the super-block factors:
        the floor and ceiling of the float fit's ratios, the pair with the smallest error."""
        t = self.type
        d = self.d[:, blk]
        s, mn = _fit_float(w, t, wt=wt)
        lo, hi = t.scale_range
        base = torch.floor(s / d)
        sc_cands = [base, base + 1]
        if t.has_min:
            dm = self.m[:, blk]
            safe = torch.where(dm == 0, torch.ones_like(dm), dm)
            mbase = torch.where(dm == 0, torch.zeros_like(mn), torch.floor(mn / safe))
            mi_cands = [mbase, mbase + 1]
        else:
            dm, mi_cands = None, [None]
        best_err = best_sc = best_mi = None
        for sc in sc_cands:
            sc = sc.clamp(lo, hi)
            if t.signed:  # never 0: a scale of +-1 represents everything 0 does
                sc = torch.where(sc == 0, torch.ones_like(sc), sc)
            scale = d * sc
            for mi in mi_cands:
                minimum = None
                if mi is not None:
                    mi = mi.clamp(0, t.min_max)
                    minimum = dm * mi
                err, _q = _sq_error(w, scale, minimum, t, wt)
                if best_err is None:
                    best_err, best_sc, best_mi = err, sc, mi
                    continue
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_sc = torch.where(better, sc, best_sc)
                if mi is not None:
                    best_mi = torch.where(better, mi, best_mi)
        self.sc[:, j] = best_sc
        if t.has_min:
            self.mi[:, j] = best_mi


@torch.no_grad()
def gguf_rtn(w: torch.Tensor, gtype, keep: torch.Tensor | None = None, name: str = "layer"):
    """Round to nearest onto a GGUF type's grid: every block fitted to the weights as given (no
    error compensation). ``keep``: pruned weights get the code nearest zero. Returns
    ``(new_w, codes, grid)``: ``new_w`` float32 on the grid, ``codes`` uint8, ``grid`` the
    :class:`GGUFGrid`."""
    wf = w.float()
    rows, cols = wf.shape
    fitter = BlockFitter(gtype, rows, cols, device=w.device, name=name)
    t = fitter.type
    codes = torch.empty(rows, cols, dtype=torch.float32, device=w.device)
    for a, (_j, end) in fitter.starts.items():
        k = None if keep is None else keep[:, a:end]
        scale, zero, mn, zcode = fitter.fit(a, wf[:, a:end], k)
        b = a + t.sub
        q = _codes(wf[:, a:b], scale[:, None], float(t.offset), t.maxq,
                   None if mn is None else mn[:, None])
        if keep is not None:
            q = torch.where(keep[:, a:b], q, zcode[:, None].expand_as(q))
        codes[:, a:b] = q
    grid = fitter.grid()
    return grid.values(codes), codes.to(torch.uint8), grid


def bits_per_weight(name: str) -> float:
    """Bits per weight of a GGUF type, its factors included (Q4_K: 4.5)."""
    return gguf_type(name).bits_per_weight


def check_cols(name: str, cols: int) -> bool:
    """Whether rows of ``cols`` columns can be stored in the type ``name``."""
    return cols % gguf_type(name).block == 0

