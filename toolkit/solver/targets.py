"""Asymmetric targets: fit the full-precision model's output from the compressed model's inputs.

The plain solver fits each layer to reproduce *its own* output on the inputs it sees in the
compressed model, ``min ||(W - W') X_c||``; the error that earlier layers left in ``X_c`` is never
corrected. With the inputs ``X_d`` the same layer sees in the full-precision model, the layer can
aim at what the full-precision model computes instead:

    min_W' ||W' X_c - W X_d||^2

Write ``H = X_c X_c^T`` and ``D = (X_d - X_c) X_c^T`` (both ``2/n``-scaled, ``cols x cols``). The
least-squares solution with no constraint is

    W* = W X_d X_c^T H^-1 = W + W D H^-1

and, because the residual ``W X_d - W* X_c`` is orthogonal to the rows of ``X_c``,

    ||W' X_c - W X_d||^2 = ||(W' - W*) X_c||^2 + const      for every W'.

So the asymmetric problem *is* the plain one with the target ``W*`` in place of ``W`` and the same
``H``: the one column sweep (prune, quantize or both, masks and grids chosen as it goes) solves
it unchanged, and every guarantee of the sweep carries over. ``H^-1`` is the damped inverse the
sweep already factorised (``(H + λI)^-1 = U^T U``), so ``W*`` costs two matrix products per layer;
when ``X_d = X_c`` then ``D = 0`` and ``W* = W`` exactly, whatever the damping.
"""

from __future__ import annotations

import torch

__all__ = ["asymmetric_target", "CrossAccumulator"]


def asymmetric_target(weight: torch.Tensor, D: torch.Tensor, U: torch.Tensor,
                      perm: torch.Tensor | None = None) -> torch.Tensor:
    """``W* = W + W D (H + λI)^-1`` for one weight (rows x cols), in the weight's dtype.

    ``D``: the cross term ``2/n (X_d - X_c) X_c^T`` (cols x cols, natural column order).
    ``U``/``perm``: the solver's factor of the damped ``H`` (:class:`toolkit.solver.layer.Factor`),
    ``U^T U = (H + λI)^-1`` in the order ``perm`` (None: natural order). The products run in ``U``'s
    dtype (float32, or float64 for float64 Hessians).
    """
    if D.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"D has shape {tuple(D.shape)}, expected ({weight.shape[1]}, "
                         f"{weight.shape[1]}) for a weight with {weight.shape[1]} columns")
    dt = U.dtype
    W = weight.to(device=U.device, dtype=dt)
    G = W @ D.to(device=U.device, dtype=dt)  # W D
    if perm is not None:
        G = G[:, perm]
    T = (G @ U.T) @ U  # W D (H + λI)^-1, in the factor's order
    if perm is not None:
        back = torch.empty_like(T)
        back[:, perm] = T
        T = back
    return (W + T).to(weight.dtype)


class CrossAccumulator:
    """Streaming ``D = 2/n * sum_t (x_d,t - x_c,t) x_c,t^T`` over paired calibration tokens.

    ``add(x_c, x_d)`` takes the inputs a layer sees in the compressed model and in the
    full-precision model for the same tokens (same shape ``(..., cols)``). Used beside the
    :class:`toolkit.solver.hessian.HessianAccumulator` of ``x_c`` (the same ``n``).
    """

    def __init__(self, cols: int, device=None, dtype: torch.dtype = torch.float32,
                 name: str = "layer"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.cols, self.name, self.dtype = cols, name, dtype
        self._S = torch.zeros(cols, cols, dtype=dtype, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x_c: torch.Tensor, x_d: torch.Tensor) -> None:
        """Add a batch of paired inputs (``x_c``: compressed model, ``x_d``: full precision)."""
        if x_c.shape != x_d.shape:
            raise ValueError(f"{self.name}: the compressed and full-precision inputs must pair "
                             f"token by token, got shapes {tuple(x_c.shape)} and "
                             f"{tuple(x_d.shape)}")
        if x_c.shape[-1] != self.cols:
            raise ValueError(f"{self.name}: input has {x_c.shape[-1]} features, the layer "
                             f"expects {self.cols}")
        xc = x_c.reshape(-1, self.cols).to(device=self._S.device, dtype=self.dtype)
        xd = x_d.reshape(-1, self.cols).to(device=self._S.device, dtype=self.dtype)
        self._S.addmm_((xd - xc).T, xc)
        self.nsamples += xc.shape[0]

    @property
    def D(self) -> torch.Tensor:
        """The cross term ``2/n sum (x_d - x_c) x_c^T`` (zeros before any input)."""
        return self._S * (2.0 / self.nsamples) if self.nsamples else self._S.clone()

    @D.setter
    def D(self, value: torch.Tensor) -> None:
        """Replace the cross term (e.g. by its mean over processes; set ``nsamples`` to match)."""
        self._S = value * (self.nsamples / 2.0)
