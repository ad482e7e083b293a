"""Mask-fixed re-solve: the least-squares optimum of the kept weights, after the mask is chosen.

SparseGPT chooses a layer's mask and updates the surviving weights in one left-to-right sweep.
The update is the Optimal Brain Surgeon step for a *fixed column order*: once column ``i`` is
fixed, later columns can no longer help it, so the kept weights it returns are not the optimum
for the mask it chose. This module finishes the job. For the fixed keep-mask ``M`` it solves

    min over Ŵ with Ŵ[~M] = 0 of   tr((W - Ŵ) H_d (W - Ŵ)^T),     H_d = H + λ·mean(diag H)·I

row by row: for row ``r`` with kept columns ``K`` that is the normal equations
``H_d[K, K] ŵ_K = (W H_d)[r, K]``. All rows are solved together by preconditioned conjugate
gradient (one ``rows x cols @ cols x cols`` product per iteration; Jacobi preconditioner
``diag(H_d)``; every row has its own step lengths), warm-started from the solver's weights, so a
few iterations already help and each one only lowers the objective. The damping ``λ`` (the
solver's ``percdamp``) is a ridge pull towards the *dense* weights: it keeps the solve stable when
``H`` is rank-deficient (dead inputs, few calibration tokens) and limits over-fitting to the
calibration set.

With ``bits`` the re-solved weights are put back on a grid. Two ways are tried and the better
kept, row by row:

* ``gptq``: the shared solver re-run with the mask fixed (``solve_layers(..., masks=...)``) and
  quantization on, on the re-solved weights: new grids, rounding errors compensated to the right;
* ``rtn``: round-to-nearest of the re-solved weights on the grids SparseGPT+GPTQ already chose.

**Never worse.** The error ``tr(ΔW H ΔW^T)`` (undamped ``H``, the number the report shows) is a
sum of independent per-row terms (each row has its own mask and its own grids), so the result
takes, for every row, the candidate with the lowest row error among the solver's own result and
the re-solved ones. The layer's error therefore never exceeds the solver's, and the mask — hence
exact unstructured sparsity and every n:m pattern — is untouched.

    >>> res = solve_layers([W], H, sparsity=0.6)
    >>> better = refine_layers([W], res, H, iters=20)[0]   # better.error <= res[0].error
"""

from __future__ import annotations

import time

import torch

from toolkit.solver.checks import check_refine_iters
from toolkit.solver.hessian import row_errors
from toolkit.solver.layer import Factor, SolveResult, solve_layers
from toolkit.solver.quant import dequantize, quantize

__all__ = ["refine_layers", "pcg_masked_lstsq", "row_errors", "check_refine_iters",
           "masked_results"]


@torch.no_grad()
def pcg_masked_lstsq(W: torch.Tensor, keep: torch.Tensor, H: torch.Tensor, X0: torch.Tensor,
                     iters: int, damp: float = 0.0) -> torch.Tensor:
    """``iters`` steps of batched, Jacobi-preconditioned CG on the kept weights of every row.

    Minimises ``tr((W - X) H_d (W - X)^T)`` over ``X`` with ``X[~keep] = 0``, ``H_d = H + damp*I``,
    starting from ``X0`` (its pruned entries are zeroed). All tensors float32 on one device.
    Rows that have converged (zero residual or zero curvature) simply stop moving.
    """
    M = keep.to(W.dtype)
    Hd = H.clone()
    if damp:
        torch.diagonal(Hd).add_(damp)
    diag = torch.diagonal(Hd).clone()
    inv = torch.where(diag > 0, 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny),
                      torch.ones_like(diag))[None, :]
    X = X0 * M
    B = W @ Hd
    R = (B - X @ Hd) * M
    Z = R * inv
    P = Z.clone()
    rz = (R * Z).sum(1)
    # the loop's matrices are reused in place: the same values as fresh tensors, without
    # allocating (and faulting in) four rows x cols buffers per iteration
    AP = torch.empty_like(P)
    tmp = torch.empty_like(P)
    for _ in range(iters):
        torch.matmul(P, Hd, out=AP)
        AP.mul_(M)
        pap = torch.mul(P, AP, out=tmp).sum(1)
        ok = (pap > 0) & (rz > 0)
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        X.addcmul_(alpha[:, None], P)
        R.addcmul_(alpha[:, None], AP, value=-1.0)
        torch.mul(R, inv, out=Z)
        rz_new = torch.mul(R, Z, out=tmp).sum(1)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        P.mul_(beta[:, None]).add_(Z)  # Z + beta * P
        rz = rz_new
    return X * M


def masked_results(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> list[SolveResult]:
    """Results for layers pruned without the solver (Wanda, magnitude), to re-solve them too."""
    return [SolveResult(weight=w * m.to(w.dtype), mask=m, codes=None, scale=None, zero=None,
                        g_idx=None, loss=0.0, error=float("nan"), seconds=0.0)
            for w, m in zip(weights, masks)]


def _requantize_rtn(X: torch.Tensor, keep: torch.Tensor, res: SolveResult, bits: int):
    """Round ``X`` to nearest on the grids of ``res`` (same scale/zero per row and group)."""
    maxq = 2**bits - 1
    g = res.g_idx.long()
    sc = res.scale[:, g]
    zp = res.zero[:, g]
    codes = quantize(X, sc, zp, maxq)
    codes = torch.where(keep, codes, zp)
    return dequantize(codes, sc, zp), codes.to(torch.uint8)


@torch.no_grad()
def refine_layers(originals: list[torch.Tensor], results: list[SolveResult],
                  H: torch.Tensor | Factor, *, iters: int, bits: int | None = None,
                  group_size: int | None = None, sym: bool = False, mse: bool = False,
                  act_order: bool = False, static_groups: bool = False, block_size: int = 128,
                  percdamp: float = 0.01, names: list[str] | None = None) -> list[SolveResult]:
    """Re-solve the kept weights of layers that share ``H``, never raising a row's error.

    Args:
        originals: the dense weights (rows x cols each), as given to the solver.
        results: the solver's results for them (masks chosen; with ``bits`` also the grids).
            A result without a mask (nothing pruned) is returned unchanged.
        H: the undamped Hessian of their shared input, or the solver's :class:`Factor` of it.
        iters: conjugate-gradient iterations (0: return ``results`` unchanged).
        bits, group_size, sym, mse, act_order, static_groups, block_size: the quantization
            settings the results
            were made with (``bits=None``: no re-quantization).
        percdamp: the ridge ``λ`` of the re-solve (relative to ``mean(diag H)``).

    Returns new :class:`SolveResult` objects (same masks; ``error`` with the undamped ``H``;
    ``seconds`` = solver seconds + re-solve seconds).
    """
    iters = check_refine_iters(iters, "iters")
    if iters == 0 or not results or any(r.mask is None for r in results):
        return results
    if len(originals) != len(results):
        raise ValueError("refine_layers needs one result per original weight")
    t0 = time.perf_counter()
    names = names or [f"layer{i}" for i in range(len(originals))]
    device = results[0].weight.device
    Hf = (H.H if isinstance(H, Factor) else H).to(device=device, dtype=torch.float32)
    diag = torch.diagonal(Hf)
    damp = percdamp * float(diag[diag > 0].mean()) if bool((diag > 0).any()) else 0.0

    splits = [w.shape[0] for w in originals]
    W = torch.cat([w.to(device=device, dtype=torch.float32) for w in originals], 0)
    keep = torch.cat([r.mask.to(device) for r in results], 0)
    X0 = torch.cat([r.weight.to(device=device, dtype=torch.float32) for r in results], 0)
    X = pcg_masked_lstsq(W, keep, Hf, X0, iters, damp)

    # candidates: (weight, codes, scale, zero) stacked over all rows; the solver's own first
    def cat(attr):
        vals = [getattr(r, attr) for r in results]
        return None if vals[0] is None else torch.cat([v.to(device) for v in vals], 0)

    cands = [(X0, cat("codes"), cat("scale"), cat("zero"))]
    if bits is None:
        cands.append((X, None, None, None))
    else:
        stacked = SolveResult(weight=X0, mask=keep, codes=None, scale=cands[0][2],
                              zero=cands[0][3], g_idx=results[0].g_idx, loss=0.0, error=0.0,
                              seconds=0.0)
        wq, codes = _requantize_rtn(X, keep, stacked, bits)
        cands.append((wq, codes, cands[0][2], cands[0][3]))
        masks = list(torch.split(keep, splits, 0))
        again = solve_layers(list(torch.split(X, splits, 0)), H, bits=bits, group_size=group_size,
                             sym=sym, mse=mse, act_order=act_order,
                             static_groups=static_groups, block_size=block_size,
                             percdamp=percdamp, names=names, masks=masks)
        cands.append((torch.cat([r.weight.float() for r in again], 0),
                      torch.cat([r.codes for r in again], 0),
                      torch.cat([r.scale for r in again], 0),
                      torch.cat([r.zero for r in again], 0)))

    dtypes = [r.weight.dtype for r in results]
    # compare in the model's dtype: what is written back is what counts
    errs = []
    for wc, *_ in cands:
        wr = torch.cat([p.to(dt).float() for p, dt in zip(torch.split(wc, splits, 0), dtypes)], 0)
        errs.append(row_errors(W, wr, Hf))
    best = torch.stack(errs, 0).argmin(0)  # ties go to the solver's own result

    def pick(k):
        base = cands[0][k]
        if base is None:
            return None
        out = base.clone()
        for c, cand in enumerate(cands[1:], start=1):
            sel = best == c
            if cand[k] is not None and bool(sel.any()):
                out[sel] = cand[k][sel].to(out.dtype)
        return out

    weight, codes, scale, zero = (pick(k) for k in range(4))
    seconds = time.perf_counter() - t0
    out = []
    rows = W.shape[0]
    start = 0
    for res, w_in, n in zip(results, originals, splits):
        sl = slice(start, start + n)
        start += n
        new = weight[sl].to(res.weight.dtype)
        out.append(SolveResult(
            weight=new, mask=res.mask,
            codes=codes[sl].clone() if codes is not None else None,
            scale=scale[sl].clone() if scale is not None else None,
            zero=zero[sl].clone() if zero is not None else None,
            g_idx=res.g_idx, loss=res.loss,
            error=float(row_errors(w_in.to(device=device, dtype=torch.float32), new.float(),
                                   Hf).sum()),
            seconds=res.seconds + seconds * n / rows,
        ))
    return out
