"""The layer Hessian ``H = 2/n * sum(x x^T)`` and the inverse Cholesky factor the solver walks.

For a linear layer ``y = W x`` the squared reconstruction error ``||(W - W') X||^2`` is, up to
the factor ``n/2``, the quadratic form ``tr((W - W') H (W - W')^T)``. Every output row shares the
same ``H``: that is what lets one factorisation serve all rows (and every layer that reads the
same input).
"""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "all_finite", "inverse_cholesky_factor", "reconstruction_error",
           "stacked_row_errors",
           "row_errors", "quadratic_form", "SolverError", "PANEL"]



def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite, exactly as ``torch.isfinite(x).all()``, mostly from
    the sum alone (a fraction of the time): a NaN or an inf anywhere makes the sum NaN or inf in
    any order of summation, so a finite sum proves them absent; only a sum that is not finite
    (finite values can overflow it) falls back to the element-wise test."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())

class SolverError(ValueError):
    """Raised when a layer cannot be solved (bad inputs, or a Hessian that will not factorise)."""


PANEL = 128  # Hessian columns per matrix product: only the blocks on and above the diagonal
CONVERT_BYTES = 64 << 20  # inputs of another dtype or device are converted this much at a time


class HessianAccumulator:
    """Streaming ``H = 2/n * sum_i x_i x_i^T`` over the rows of calibration inputs.

    ``add(x)`` takes inputs of shape ``(..., cols)``: every leading index is one sample (token).
    It adds ``x^T x`` to a running sum, computing only the panels of ``PANEL`` rows on and above
    the diagonal (about half the arithmetic of the full product); ``H`` mirrors them and divides
    by ``n / 2`` when read, so the result is exactly symmetric and depends on how the samples
    are batched only through float rounding. Inputs in another dtype (float16 activations into a
    float32 or float64 Hessian) or on another device are converted ``CONVERT_BYTES`` at a time.
    ``name`` is used in error messages.
    """

    def __init__(self, cols: int, device=None, dtype: torch.dtype = torch.float32, name: str = "layer"):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.cols = cols
        self.name = name
        self.dtype = dtype
        self._M = torch.zeros(cols, cols, dtype=dtype, device=device)
        self._is_sum = True  # _M holds the raw sum (upper panels) or the finished H
        self.nsamples = 0
        edges = list(range(0, cols, PANEL)) + [cols] if cols > 2 * PANEL else [0, cols]
        self._panels = list(zip(edges[:-1], edges[1:]))

    @torch.no_grad()
    def add(self, x: torch.Tensor, check: bool = True) -> None:
        """Add a batch of inputs ``x`` of shape (..., cols).

        ``check``: refuse non-finite inputs now (the batch is then not added). The sweep passes
        False and calls :meth:`check_finite` once, after the last batch.
        """
        if x.shape[-1] != self.cols:
            raise SolverError(
                f"{self.name}: input has {x.shape[-1]} features, the layer expects {self.cols}"
            )
        x = x.reshape(-1, self.cols)
        if check and not all_finite(x):
            raise self._non_finite()
        if x.shape[0] == 0:
            return
        if not self._is_sum:  # back from a finished H to the running sum
            self._M.mul_(self.nsamples / 2)
            self._is_sum = True
        step = x.shape[0]
        if x.dtype != self.dtype or x.device != self._M.device:  # converted copies, bounded
            step = max(1, CONVERT_BYTES // (self.cols * self._M.element_size()))
        for i in range(0, x.shape[0], step):
            xi = x[i:i + step].to(device=self._M.device, dtype=self.dtype)
            for a, b in self._panels:
                self._M[a:b, a:].addmm_(xi[:, a:b].T, xi[:, a:])
        self.nsamples += x.shape[0]

    def _non_finite(self) -> SolverError:
        return SolverError(
            f"{self.name}: calibration inputs contain NaN or inf; the model produces "
            "non-finite activations here (check the dtype, e.g. fp16 overflow, or the inputs)"
        )

    def check_finite(self) -> None:
        """Raise :class:`SolverError` naming the layer if any input added so far was NaN or inf
        (they make the sum non-finite)."""
        if not all_finite(self.H):
            raise self._non_finite()

    @property
    def H(self) -> torch.Tensor:
        """The Hessian ``2/n sum x x^T`` (zeros before any input)."""
        if self._is_sum:
            M = self._M
            for a, b in self._panels:  # mirror what lies above the diagonal
                D = M[a:b, a:b]
                D.copy_(torch.triu(D) + torch.triu(D, 1).T)
                if b < self.cols:
                    M[b:, a:b] = M[a:b, b:].T
            if self.nsamples:
                M.mul_(2.0 / self.nsamples)
            self._is_sum = False
        return self._M

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        """Replace the Hessian (e.g. by its sum over processes; set ``nsamples`` to match)."""
        self._M = value
        self._is_sum = False


def inverse_cholesky_factor(
    H: torch.Tensor,
    percdamp: float = 0.01,
    name: str = "layer",
    retries: int = 3,
) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp*I)^-1``, so that ``H^-1 = U^T U``: float64 for a
    float64 ``H``, float32 otherwise.

    Dead inputs (``diag H == 0``) get the mean live diagonal and no off-diagonal terms: their
    weights are then handled with no error propagation (they never influenced the calibration
    outputs). The damping is ``percdamp * mean(diag H)`` over the live inputs, so the result
    does not depend on the scale of ``H``; if a factorisation fails it is retried with 10x more damping,
    ``retries`` times, before a ``SolverError`` naming the layer is raised.
    """
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise SolverError(f"{name}: the Hessian must be square, got shape {tuple(H.shape)}")
    if not all_finite(H):
        raise SolverError(f"{name}: the Hessian contains NaN or inf")
    H = H.to(torch.float64 if H.dtype == torch.float64 else torch.float32).clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, :] = 0
    H[:, dead] = 0
    # the scale of the live inputs sets the damping; a dead input gets that scale on its
    # diagonal (its weights are zeroed by the solver, so it propagates nothing either way)
    mean_diag = diag[~dead].mean() if bool((~dead).any()) else torch.ones((), dtype=H.dtype)
    diag[dead] = mean_diag
    damp = percdamp * mean_diag
    for _ in range(retries + 1):
        Hd = H.clone()
        torch.diagonal(Hd).add_(damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and all_finite(U):
                return U
        damp = damp * 10 if damp > 0 else mean_diag * 1e-3
    raise SolverError(
        f"{name}: the Hessian is not positive definite even with damping "
        f"{float(damp / 10 / mean_diag):.3g} x mean(diag H); more calibration samples or a larger "
        "percdamp may help"
    )


def row_errors(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per-row ``((W - W_hat) H (W - W_hat)^T)_rr``, in ``H``'s dtype; their sum is
    :func:`reconstruction_error`."""
    D = W.to(H.dtype) - W_hat.to(H.dtype)
    return (D @ H).mul_(D).sum(1)


def stacked_row_errors(pairs: list[tuple[torch.Tensor, torch.Tensor]],
                       H: torch.Tensor) -> list[torch.Tensor]:
    """:func:`row_errors` of several ``(W, W_hat)`` pairs with the same columns and one ``H``, in
    one matrix product (the same values up to float rounding; one call instead of many)."""
    if len(pairs) == 1:
        return [row_errors(*pairs[0], H)]
    rows = [W.shape[0] for W, _ in pairs]
    D = torch.empty(sum(rows), H.shape[0], dtype=H.dtype, device=H.device)
    for d, (W, W_hat) in zip(D.split(rows), pairs):  # the differences written in place
        torch.sub(W.to(H.dtype), W_hat.to(H.dtype), out=d)
    return list((D @ H).mul_(D).sum(1).split(rows))


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)`` = ``2/n * ||(W - W_hat) X||^2`` for ``H = 2/n X X^T``."""
    return float(row_errors(W, W_hat, H).sum())


def quadratic_form(W: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(W H W^T)`` in ``H``'s dtype: the layer's output energy ``2/n ||W X||^2``, the
    yardstick of a relative error."""
    W = W.to(H.dtype)
    return float(((W @ H) * W).sum())
