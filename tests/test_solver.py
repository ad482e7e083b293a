"""Value tests of the shared layer solver (issue 3) and of partial last groups (issue 12).

Each test checks numbers, not shapes: exact mask counts, weights that lie exactly on their
group's grid, bit-identical degenerate cases (H = identity: SparseGPT = magnitude pruning, GPTQ =
round-to-nearest), errors below the baselines, and error messages that name the bad argument.
The last part measures the output reconstruction error on real SmolLM2-135M layers (slow).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SMOLLM2_THREADS, torch_threads

from toolkit import capture_hessians
from toolkit.solver.baselines import apply_mask, magnitude_mask, rtn_quantize, wanda_mask
from toolkit.solver.hessian import (
    HessianAccumulator,
    SolverError,
    inverse_cholesky_factor,
    reconstruction_error,
    row_errors,
    stacked_row_errors,
)
from toolkit.solver.layer import (
    GridProblem,
    factorize,
    solve,
    solve_grids,
    solve_grids_many,
    solve_layers,
)
from toolkit.solver.masks import is_nm_valid, nm_mask, prune_lowest
from toolkit.solver.quant import fit_grid, group_bounds

# ----------------------------------------------------------------------------- helpers


def make_problem(rows: int, cols: int, n: int | None = None, seed: int = 0, spread: float = 0.5):
    """A weight, calibration inputs X (n x cols, correlated, unequal channel scales) and
    H = 2/n X^T X."""
    g = torch.Generator().manual_seed(seed)
    n = n or 2 * cols + 16
    scales = torch.exp(spread * torch.randn(cols, generator=g))
    mixing = (torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5) * scales
    X = torch.randn(n, cols, generator=g) @ mixing
    H = 2 / n * X.T @ X
    W = torch.randn(rows, cols, generator=g)
    return W, X, H


def expected_pruned(sparsity: float, rows: int, cols: int) -> int:
    return round(sparsity * rows * cols)


def assert_on_grid(res, bits: int, W_shape) -> None:
    """Every weight equals scale[g] * (code - zero[g]) for its column's group ``g`` (bit for bit),
    codes are in 0..2^bits-1 and each row of each group uses at most 2^bits distinct values."""
    rows, cols = W_shape
    assert res.codes.dtype == torch.uint8 and res.codes.shape == (rows, cols)
    assert int(res.codes.max()) <= 2**bits - 1
    g = res.g_idx.long()
    assert g.shape == (cols,)
    scale = res.scale[:, g]
    zero = res.zero[:, g]
    expected = scale * (res.codes.float() - zero)
    assert torch.equal(res.weight.float(), expected)
    # zero points are integers on the grid
    assert torch.equal(res.zero, res.zero.round())
    assert bool(((res.zero >= 0) & (res.zero <= 2**bits - 1)).all())
    for grp in range(res.scale.shape[1]):
        block = res.weight[:, g == grp].float()
        if block.shape[1] == 0:
            continue
        s = block.sort(dim=1).values
        levels = 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)
        assert int(levels.max()) <= 2**bits


def n_pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("rows,cols,sparsity,block_size", [
    (64, 256, 0.5, 128),
    (37, 300, 0.3, 128),   # cols not a multiple of the block
    (50, 96, 0.77, 16),    # many small blocks: no rounding accumulates across blocks
    (1, 40, 0.5, 8),
    (20, 33, 0.01, 128),   # round(0.01 * 660) = 7
])
def test_unstructured_sparsity_is_exact_and_pruned_weights_are_zero(rows, cols, sparsity, block_size):
    W, _, H = make_problem(rows, cols)
    res = solve(W, H, sparsity=sparsity, block_size=block_size)
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape
    assert n_pruned(res.mask) == expected_pruned(sparsity, rows, cols)
    assert bool((res.weight[~res.mask] == 0).all())
    assert torch.isfinite(res.weight).all()
    assert res.codes is None and res.scale is None


def test_stacked_layers_keep_their_own_exact_sparsity():
    """q, k, v share one H; k's weights are 10x larger, so a pooled budget would prune q and v
    much more than k. Each layer must end with exactly round(sparsity * numel) zeros, and its
    result must be the one it gets when solved alone."""
    W, _, H = make_problem(96, 128, seed=1)
    q, k, v = W[:64], 10 * W[64:80], 0.1 * W[80:]
    res = solve_layers([q, k, v], H, sparsity=0.6, names=["q", "k", "v"])
    for w, r in zip([q, k, v], res):
        assert r.mask.shape == w.shape
        assert n_pruned(r.mask) == expected_pruned(0.6, *w.shape)
        assert bool((r.weight[~r.mask] == 0).all())
        alone = solve(w, H, sparsity=0.6)
        assert torch.equal(alone.mask, r.mask)
        torch.testing.assert_close(alone.weight, r.weight, rtol=1e-4, atol=1e-5)
        assert r.error == pytest.approx(alone.error, rel=1e-4)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), "2:4", (1, 4), (3, 4)])
@pytest.mark.parametrize("bits", [None, 4])
def test_nm_pattern_is_valid_in_every_group(pattern, bits):
    n, m = (int(p) for p in pattern.split(":")) if isinstance(pattern, str) else pattern
    rows, cols = 24, 160  # 160 = one full block of 128 + 32: the pattern crosses block edges
    W, _, H = make_problem(rows, cols, seed=2)
    res = solve(W, H, pattern=pattern, bits=bits, group_size=32)
    pruned_per_group = (~res.mask).reshape(rows, cols // m, m).sum(dim=2)
    assert bool((pruned_per_group == n).all())
    assert is_nm_valid(res.weight, n, m)
    assert is_nm_valid(res.mask, n, m)
    assert bool((res.weight[~res.mask] == 0).all())


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32, 128, 100])
@pytest.mark.parametrize("sym", [False, True])
def test_quantized_weights_lie_on_their_group_grid(bits, group_size, sym):
    rows, cols = 16, 256
    W, _, H = make_problem(rows, cols, seed=3)
    res = solve(W, H, bits=bits, group_size=group_size, sym=sym)
    n_groups = len(group_bounds(cols, group_size))
    assert res.scale.shape == res.zero.shape == (rows, n_groups)
    assert res.mask is None
    assert torch.equal(res.g_idx.long(), torch.arange(cols) // (group_size or cols))
    assert_on_grid(res, bits, W.shape)
    if sym:
        assert bool((res.zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("group_size", [64, 100, None])
def test_joint_prunes_exactly_and_quantizes_the_survivors(group_size):
    rows, cols = 32, 256
    W, _, H = make_problem(rows, cols, seed=4)
    res = solve(W, H, sparsity=0.5, bits=4, group_size=group_size)
    assert n_pruned(res.mask) == expected_pruned(0.5, rows, cols)
    assert bool((res.weight[~res.mask] == 0).all())
    # pruned weights hold the zero point of their group
    zero_full = res.zero[:, res.g_idx.long()]
    assert torch.equal(res.codes[~res.mask].float(), zero_full[~res.mask])
    assert_on_grid(res, 4, W.shape)


def test_joint_nm_with_bits():
    W, _, H = make_problem(16, 128, seed=5)
    res = solve(W, H, pattern=(2, 4), bits=3, group_size=64, sym=True)
    assert is_nm_valid(res.weight, 2, 4)
    assert_on_grid(res, 3, W.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [None, 16])
def test_nothing_to_do_returns_the_weight_unchanged(dtype, bits):
    W, _, H = make_problem(20, 200, seed=6)
    W = W.to(dtype)
    res = solve(W, H, sparsity=0.0, bits=bits, block_size=64)
    assert res.weight.dtype == dtype
    assert torch.equal(res.weight, W)  # bit-identical
    assert res.mask is None and res.codes is None
    assert res.error == 0.0


def test_result_dtype_follows_the_input():
    W, _, H = make_problem(8, 64, seed=7)
    res = solve(W.to(torch.bfloat16), H, sparsity=0.5, bits=4, group_size=32)
    assert res.weight.dtype == torch.bfloat16
    assert bool((res.weight[~res.mask] == 0).all())


# ----------------------------------------------------------------------------- degenerate cases


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.9])
def test_identity_hessian_sparsegpt_is_magnitude_pruning(sparsity):
    """With H = I there is nothing to compensate and w^2 / U_ii^2 ranks like |w|: one block
    over all columns must reproduce magnitude pruning exactly."""
    W, _, _ = make_problem(48, 200, seed=8)
    res = solve(W, torch.eye(200), sparsity=sparsity, block_size=256)
    mask = magnitude_mask(W, sparsity)
    assert torch.equal(res.mask, mask)
    assert torch.equal(res.weight, apply_mask(W, mask))


@pytest.mark.parametrize("block_size", [16, 128])
def test_identity_hessian_nm_is_magnitude_nm(block_size):
    W, _, _ = make_problem(32, 128, seed=9)
    res = solve(W, torch.eye(128), pattern=(2, 4), block_size=block_size)
    mask = magnitude_mask(W, pattern=(2, 4))
    assert torch.equal(res.mask, mask)
    assert torch.equal(res.weight, apply_mask(W, mask))


@pytest.mark.parametrize("bits,group_size,sym,mse", [
    (4, 32, False, False), (4, None, False, False), (3, 100, True, False), (8, 64, False, False),
    (4, 64, False, True), (2, 50, True, True),
])
def test_identity_hessian_gptq_is_round_to_nearest(bits, group_size, sym, mse):
    W, _, _ = make_problem(24, 200, seed=10)
    res = solve(W, torch.eye(200), bits=bits, group_size=group_size, sym=sym, mse=mse,
                block_size=200)
    new, codes, scale, zero = rtn_quantize(W, bits, group_size, sym=sym, mse=mse)
    assert torch.equal(res.weight, new)
    assert torch.equal(res.codes, codes)
    assert torch.equal(res.scale, scale)
    assert torch.equal(res.zero, zero)


def test_identity_hessian_joint_is_magnitude_then_rtn():
    W, _, _ = make_problem(24, 192, seed=11)
    res = solve(W, torch.eye(192), sparsity=0.5, bits=4, group_size=64, block_size=192)
    mask = magnitude_mask(W, 0.5)
    new, codes, _, _ = rtn_quantize(W, 4, 64, keep=mask)
    assert torch.equal(res.mask, mask)
    assert torch.equal(res.weight, new)
    assert torch.equal(res.codes, codes)


# ----------------------------------------------------------------------------- better than baselines


def test_solver_beats_the_baselines_on_a_correlated_hessian():
    W, X, H = make_problem(64, 256, seed=12)
    e = lambda new: reconstruction_error(W, new, H)  # noqa: E731
    assert solve(W, H, sparsity=0.5).error < 0.6 * e(apply_mask(W, magnitude_mask(W, 0.5)))
    assert solve(W, H, sparsity=0.5).error < e(apply_mask(W, wanda_mask(W, H, 0.5)))
    assert solve(W, H, pattern=(2, 4)).error < e(apply_mask(W, magnitude_mask(W, pattern=(2, 4))))
    assert solve(W, H, bits=3, group_size=64).error < e(rtn_quantize(W, 3, 64)[0])
    mask = magnitude_mask(W, 0.5)
    assert (solve(W, H, sparsity=0.5, bits=4, group_size=64).error
            < e(rtn_quantize(W, 4, 64, keep=mask)[0]))


def test_error_is_the_output_reconstruction_error():
    """SolveResult.error = tr(dW H dW^T) = 2/n ||(W - W_new) X^T||^2 with the undamped H."""
    W, X, H = make_problem(16, 96, n=300, seed=13)
    res = solve(W, H, sparsity=0.5, bits=4, group_size=32)
    direct = 2 / X.shape[0] * float(((W - res.weight) @ X.T).pow(2).sum())
    assert res.error == pytest.approx(direct, rel=1e-4)
    assert res.error == pytest.approx(reconstruction_error(W, res.weight, H), rel=1e-6)


@pytest.mark.parametrize("group_size", [32, 48, None])
def test_act_order_stays_on_the_grid_and_beats_rtn(group_size):
    rows, cols = 32, 192
    W, _, H = make_problem(rows, cols, seed=14, spread=1.5)  # very unequal diag H
    res = solve(W, H, bits=4, group_size=group_size, act_order=True)
    assert_on_grid(res, 4, W.shape)
    # groups follow the act-order permutation, with the sizes of group_bounds
    widths = [b - a for a, b in group_bounds(cols, group_size)]
    assert torch.bincount(res.g_idx.long()).tolist() == widths
    perm = torch.argsort(torch.diagonal(H), descending=True)
    expected_gidx = torch.empty(cols, dtype=torch.long)
    expected_gidx[perm] = torch.arange(cols) // (group_size or cols)
    assert torch.equal(res.g_idx.long(), expected_gidx)
    rtn = rtn_quantize(W, 4, group_size)[0]
    assert res.error < reconstruction_error(W, rtn, H)


def test_act_order_joint_with_factor_reuse():
    W, _, H = make_problem(16, 128, seed=15)
    F = factorize(H, act_order=True)
    res = solve(W, F, sparsity=0.5, bits=4, group_size=32, act_order=True)
    assert n_pruned(res.mask) == expected_pruned(0.5, 16, 128)
    assert bool((res.weight[~res.mask] == 0).all())
    assert_on_grid(res, 4, W.shape)


@pytest.mark.parametrize("bits", [None, 4])
def test_fixed_mask_is_kept_and_compensated(bits):
    W, _, H = make_problem(32, 160, seed=16)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(W.shape, generator=g) > 0.4
    (res,) = solve_layers([W], H, masks=[mask], bits=bits, group_size=32)
    assert torch.equal(res.mask, mask)
    assert bool((res.weight[~mask] == 0).all())
    if bits is None:
        # kept weights move (OBS compensation) and the error is below plain masking's
        assert not torch.equal(res.weight[mask], W[mask])
        assert res.error < 0.9 * reconstruction_error(W, apply_mask(W, mask), H)
    else:
        assert_on_grid(res, bits, W.shape)
        assert res.error < reconstruction_error(W, rtn_quantize(W, bits, 32, keep=mask)[0], H)


# ----------------------------------------------------------------------------- issue 12


def test_group_128_on_576_columns_has_a_partial_last_group():
    """576 = 4 x 128 + 64: five grids per row, the last one fitted to the last 64 columns."""
    rows, cols = 48, 576
    W, _, H = make_problem(rows, cols, seed=17)
    res = solve(W, H, bits=4, group_size=128)
    assert res.scale.shape == (rows, 5)
    assert torch.bincount(res.g_idx.long()).tolist() == [128, 128, 128, 128, 64]
    assert_on_grid(res, 4, W.shape)
    rtn = rtn_quantize(W, 4, 128)
    assert rtn[2].shape == (rows, 5)
    assert res.error < reconstruction_error(W, rtn[0], H)
    # the last grid belongs to the last 64 columns alone (H = I: nothing moves before fitting)
    eye = solve(W, torch.eye(cols), bits=4, group_size=128, block_size=1024)
    s, z = fit_grid(W[:, 512:], 4)
    assert torch.equal(eye.scale[:, 4], s) and torch.equal(eye.zero[:, 4], z)


def test_partial_last_group_joint_and_act_order():
    W, _, H = make_problem(32, 576, seed=18)
    joint = solve(W, H, sparsity=0.5, bits=4, group_size=128)
    assert n_pruned(joint.mask) == expected_pruned(0.5, 32, 576)
    assert_on_grid(joint, 4, W.shape)
    ao = solve(W, H, bits=4, group_size=128, act_order=True)
    assert sorted(torch.bincount(ao.g_idx.long()).tolist()) == [64, 128, 128, 128, 128]
    assert_on_grid(ao, 4, W.shape)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kwargs,argname", [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(bits=1), "bits"),
    (dict(bits=9), "bits"),
    (dict(bits=4, group_size=0), "group_size"),
    (dict(bits=4, group_size=2.5), "group_size"),
    (dict(pattern=(4, 2)), "pattern"),
    (dict(pattern="2:4", act_order=True), "act_order"),
    (dict(sparsity=0.5, pattern=(2, 4)), "pattern"),
    (dict(sparsity=0.5, block_size=0), "block_size"),
])
def test_bad_arguments_raise_valueerror_naming_the_argument(kwargs, argname):
    W, _, H = make_problem(8, 64)
    with pytest.raises(ValueError, match=argname):
        solve(W, H, **kwargs)


def test_group_size_that_does_not_divide_cols_is_allowed():
    W, _, H = make_problem(8, 100)
    res = solve(W, H, bits=4, group_size=64)  # 64 + 36
    assert res.scale.shape == (8, 2)


def test_mismatched_hessian_shape():
    W, _, _ = make_problem(8, 64)
    with pytest.raises(ValueError, match=r"q_proj: H has shape \(32, 32\), expected \(64, 64\)"):
        solve(W, torch.eye(32), sparsity=0.5, name="q_proj")


def test_nan_in_weight():
    W, _, H = make_problem(8, 64)
    W[3, 5] = float("nan")
    with pytest.raises(ValueError, match="q_proj: weight contains NaN"):
        solve(W, H, sparsity=0.5, name="q_proj")


def test_nan_in_a_stacked_weight_names_that_layer():
    """The stack is checked once; the message still names the layer that holds the NaN."""
    W, _, H = make_problem(8, 64)
    bad = W.clone()
    bad[2, 7] = float("inf")
    with pytest.raises(ValueError, match="^k_proj: weight contains NaN or inf"):
        solve_layers([W, bad, W], H, bits=4, names=["q_proj", "k_proj", "v_proj"])
    with pytest.raises(ValueError, match="^up_proj: weight contains NaN or inf"):
        solve_grids([W, bad], H, [(4, 32), (3, 32)], names=["gate_proj", "up_proj"])


def test_stacked_row_errors_equal_one_product_per_pair():
    """One product for several (W, W_hat) pairs gives each pair's own per-row errors."""
    g = torch.Generator().manual_seed(3)
    _W, _X, H = make_problem(8, 64)
    H = H.double()
    pairs = [(torch.randn(r, 64, generator=g, dtype=torch.float64),
              torch.randn(r, 64, generator=g, dtype=torch.float64)) for r in (5, 1, 12)]
    got = stacked_row_errors(pairs, H)
    assert [t.shape[0] for t in got] == [5, 1, 12]
    for (W, W_hat), rows in zip(pairs, got):
        torch.testing.assert_close(rows, row_errors(W, W_hat, H), rtol=1e-12, atol=0)
        assert float(rows.sum()) == pytest.approx(reconstruction_error(W, W_hat, H), rel=1e-12)


def test_nan_in_hessian_inputs_names_the_layer():
    acc = HessianAccumulator(16, name="model.layers.2.mlp.down_proj")
    acc.add(torch.randn(10, 16))
    x = torch.randn(4, 16)
    x[1, 2] = float("inf")
    with pytest.raises(SolverError, match="model.layers.2.mlp.down_proj.*calibration inputs"):
        acc.add(x)
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(3, 15))
    assert acc.nsamples == 10  # the bad batches were not added


@pytest.mark.parametrize("kind", ["nan", "negative-definite"])
def test_hessian_that_cannot_be_factorised_raises_solvererror_naming_the_layer(kind):
    W, _, H = make_problem(8, 32)
    if kind == "nan":
        H = H.clone()
        H[0, 0] = float("nan")
    else:
        H = -torch.eye(32) - 0.1 * torch.ones(32, 32)
    with pytest.raises(SolverError, match="model.layers.7.self_attn.o_proj"):
        solve(W, H, sparsity=0.5, name="model.layers.7.self_attn.o_proj")
    with pytest.raises(SolverError, match="o_proj"):
        inverse_cholesky_factor(H, name="o_proj")


def test_indefinite_hessian_is_rescued_by_more_damping():
    """A small negative eigenvalue defeats the default 1% damping; the retry with 10x more
    damping factorises it."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    eig = torch.ones(32)
    eig[0] = -0.05
    H = Q @ torch.diag(eig) @ Q.T
    U = inverse_cholesky_factor(H, percdamp=0.01)
    assert torch.isfinite(U).all()
    W = torch.randn(4, 32, generator=g)
    res = solve(W, H, sparsity=0.5)
    assert torch.isfinite(res.weight).all()


def test_dead_inputs_do_not_break_the_solver():
    W, X, _ = make_problem(16, 64, seed=19)
    X[:, [3, 40]] = 0  # two inputs never fire
    H = 2 / X.shape[0] * X.T @ X
    res = solve(W, H, sparsity=0.5, bits=4, group_size=32)
    assert torch.isfinite(res.weight).all()
    assert n_pruned(res.mask) == expected_pruned(0.5, 16, 64)
    assert_on_grid(res, 4, W.shape)



# ----------------------------------------------------------------------------- several grids


GRIDS = [(4, 128), (4, 32), (3, 128), (3, 64), (2, 128), (8, 128), (5, 100), (3, None)]


@pytest.mark.parametrize("act_order,static_groups",
                         [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("sym,mse", [(False, False), (True, True)])
def test_solve_grids_equals_one_solve_per_grid(act_order, static_groups, sym, mse):
    """One sweep over several grids gives each weight what its own solve gives: the same codes,
    grids, group map and error (rows never interact; only the column loop is shared).
    576 columns: partial last groups for 128 and 100, dead inputs too. In float64: the block
    updates of a taller matrix sum in another order, and in float32 that moves a weight across
    a rounding boundary now and then (0.1% of the 8-bit codes on some CPUs), which would make
    the comparison depend on the machine; in float64 it moves none."""
    W, X, _ = make_problem(24, 576, seed=31)
    X[:, [5, 300]] = 0
    W, X = W.double(), X.double()
    H = 2 / X.shape[0] * X.T @ X
    F = factorize(H, 0.01, act_order)
    g = torch.Generator().manual_seed(32)
    weights = [W + 0.1 * j * torch.randn(W.shape, generator=g, dtype=torch.float64)
               for j in range(len(GRIDS))]
    weights[2] = weights[2][:7]  # another row count
    mixed = solve_grids(weights, F, GRIDS, sym=sym, mse=mse, act_order=act_order,
                        static_groups=static_groups)
    for w, (bits, gs), got in zip(weights, GRIDS, mixed):
        ref = solve(w, F, bits=bits, group_size=gs, sym=sym, mse=mse, act_order=act_order,
                    static_groups=static_groups)
        assert torch.equal(got.codes, ref.codes), (bits, gs)
        torch.testing.assert_close(got.scale, ref.scale, rtol=1e-6, atol=0)
        assert torch.equal(got.zero, ref.zero)
        assert torch.equal(got.g_idx.long(), ref.g_idx.long())
        assert got.error == pytest.approx(ref.error, rel=1e-9) and got.mask is None
        assert got.loss == pytest.approx(ref.loss, rel=1e-9)
        assert_on_grid(got, bits, w.shape)


@pytest.mark.parametrize("act_order,static_groups",
                         [(False, False), (True, False), (True, True)])
def test_solve_grids_many_equals_one_call_per_problem(act_order, static_groups):
    """Problems with their own weights, Hessians and grids (the same group sizes), solved in one
    column loop: each gets bit for bit what its own solve_grids call gives, in float32, with
    problems of other row counts padded beside it."""
    g = torch.Generator().manual_seed(41)
    problems = []
    for k, rows in enumerate((12, 5, 12)):
        W, X, _ = make_problem(rows, 256, seed=50 + k)
        X[:, [3 + k]] = 0  # a dead input
        H = 2 / X.shape[0] * X.T @ X
        weights = [W, W[: max(1, rows // 2)] + 0.1 * torch.randn(max(1, rows // 2), 256,
                                                                  generator=g)]
        grids = [(4, 64), (3, 128)] if k != 1 else [(2, 128), (8, 64)]
        problems.append(GridProblem(weights, H, grids, error_H=H * (1 + k) if k else None))
    together = solve_grids_many(problems, act_order=act_order, static_groups=static_groups,
                                block_size=64)
    assert len(together) == 3
    for p, got in zip(problems, together):
        alone = solve_grids(p.weights, p.H, p.grids, act_order=act_order,
                            static_groups=static_groups, block_size=64, error_H=p.error_H)
        for a, b in zip(got, alone):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.codes, b.codes)
            assert torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
            assert torch.equal(a.g_idx.long(), b.g_idx.long())
            assert a.error == b.error and a.loss == pytest.approx(b.loss, rel=1e-6)
    with pytest.raises(ValueError, match="same number of columns"):
        W, _X, H = make_problem(4, 128, seed=1)
        solve_grids_many([problems[0], GridProblem([W], H, [(4, 64)])])


def test_solve_grids_rejects_bad_grids_naming_them():
    W, _, H = make_problem(8, 64, seed=33)
    with pytest.raises(ValueError, match="one grid each"):
        solve_grids([W, W], H, [(4, 32)])
    with pytest.raises(ValueError, match="bits"):
        solve_grids([W], H, [(9, 32)])
    with pytest.raises(ValueError, match="needs bits"):
        solve_grids([W], H, [(16, 32)], names=["q_proj"])
    with pytest.raises(ValueError, match="group_size"):
        solve_grids([W], H, [(4, 0)])
    with pytest.raises(ValueError, match="64 columns"):
        solve_grids([W, W[:, :32]], H, [(4, 32), (4, 32)])


def test_solvers_build_no_autograd_graph():
    """A weight that requires grad (an nn.Parameter as it sits in a model, with grad mode on):
    every solver returns plain tensors, no graph is recorded over the sweep."""
    W, _X, H = make_problem(16, 64, seed=7)
    p = torch.nn.Parameter(W.clone())
    with torch.enable_grad():
        results = [solve(p, H, sparsity=0.5, bits=4, group_size=32),
                   *solve_layers([p, p], H, bits=4, group_size=32),
                   *solve_grids([p], H, [(3, 32)])]
    for res in results:
        assert not res.weight.requires_grad and res.weight.grad_fn is None


def test_error_measured_with_another_hessian():
    """error_H: the same solve (weights, masks, codes equal), its error tr(dW H2 dW^T) measured
    with another Hessian (other inputs: the size planner's held-out windows), in solve_layers
    and solve_grids; a Hessian of the wrong shape is refused before solving."""
    W, _X, H = make_problem(24, 64, seed=5)
    W2, _X2, H2 = make_problem(24, 64, seed=6)
    kw = dict(sparsity=0.5, bits=4, group_size=32)
    plain = solve_layers([W, W2], H, **kw)
    other = solve_layers([W, W2], H, error_H=H2, **kw)
    for a, b, w in zip(plain, other, (W, W2)):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
        assert a.error == pytest.approx(reconstruction_error(w, a.weight, H), rel=1e-6)
        assert b.error == pytest.approx(reconstruction_error(w, b.weight, H2), rel=1e-6)
        assert b.error != pytest.approx(a.error, rel=1e-2)
    grids = [(3, 32), (4, None)]
    plain = solve_grids([W, W2], H, grids)
    other = solve_grids([W, W2], H, grids, error_H=H2)
    for a, b, w in zip(plain, other, (W, W2)):
        assert torch.equal(a.codes, b.codes)
        assert b.error == pytest.approx(reconstruction_error(w, b.weight, H2), rel=1e-6)
    for bad in (H2[:32, :32], "H2"):
        with pytest.raises(ValueError, match=r"error_H must be None or a tensor of the Hessian's "
                                             r"shape \(64, 64\)"):
            solve_layers([W], H, bits=4, error_H=bad)
        with pytest.raises(ValueError, match="error_H must be"):
            solve_grids([W], H, [(4, 32)], error_H=bad)


# ----------------------------------------------------------------------------- Hessian


def test_hessian_does_not_depend_on_batching_and_equals_2_over_n_xtx():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 75, 48, generator=g) * torch.exp(torch.randn(48, generator=g))
    flat = X.reshape(-1, 48)
    one = HessianAccumulator(48)
    one.add(X)  # (..., cols): every leading index is a sample
    three = HessianAccumulator(48)
    for part in (flat[:100], flat[100:107], flat[107:]):
        three.add(part)
    assert one.nsamples == three.nsamples == 300
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(three.H, one.H) < 1e-6
    exact = 2 / 300 * flat.double().T @ flat.double()
    assert rel(one.H.double(), exact) < 1e-6
    assert rel(three.H.double(), exact) < 1e-6
    f64 = HessianAccumulator(48, dtype=torch.float64)
    for part in (flat[:1], flat[1:]):
        f64.add(part)
    assert rel(f64.H, exact) < 1e-12


# ----------------------------------------------------------------------------- real layers (slow)

REAL_LAYERS = ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def smollm2_layer_errors(smollm2_shared, wikitext_valid):
    """Reconstruction errors 2/n ||(W - W_new) X||^2 of three layers of SmolLM2-135M block 3,
    with X captured by forward hooks on 8 windows x 256 tokens of WikiText-2 validation text,
    in float64 (the model's copy, the Hessians, the solves: in float32 the order of float sums,
    which the CPU sets, flips some 2:4 choices near a tie and moved q_proj's SparseGPT 2:4 /
    magnitude 2:4 ratio from 0.153 on one CPU to 0.141 on another), with SMOLLM2_THREADS
    torch threads."""
    with torch_threads(SMOLLM2_THREADS):
        return _layer_errors(smollm2_shared, wikitext_valid)


def _layer_errors(smollm2_shared, wikitext_valid):
    import copy

    from toolkit.measure.text import get_calibration, tokenize_text

    shared, tok = smollm2_shared
    model = copy.deepcopy(shared).double()
    ids = get_calibration(tokenize_text(tok, wikitext_valid[:200_000]), nsamples=8, seqlen=256)
    block = model.model.layers[3]
    mods = {name: block.get_submodule(name) for name in REAL_LAYERS}
    got = capture_hessians(model, [f"model.layers.3.{n}" for n in REAL_LAYERS], ids,
                           dtype=torch.float64)
    accs = {n: got[f"model.layers.3.{n}"] for n in REAL_LAYERS}

    table = {}
    for name, m in mods.items():
        W = m.weight.detach().clone()
        H = accs[name].H
        assert accs[name].nsamples == 8 * 256
        e = lambda new, W=W, H=H: reconstruction_error(W, new, H)  # noqa: E731
        mask = magnitude_mask(W, 0.5)
        table[name] = {
            "shape": tuple(W.shape),
            "magnitude_50": e(apply_mask(W, mask)),
            "wanda_50": e(apply_mask(W, wanda_mask(W, H, 0.5))),
            "sparsegpt_50": solve(W, H, sparsity=0.5).error,
            "magnitude_2:4": e(apply_mask(W, magnitude_mask(W, pattern=(2, 4)))),
            "sparsegpt_2:4": solve(W, H, pattern=(2, 4)).error,
            "rtn_4bit_g128": e(rtn_quantize(W, 4, 128)[0]),
            "gptq_4bit_g128": solve(W, H, bits=4, group_size=128).error,
            "magnitude_then_rtn": e(rtn_quantize(W, 4, 128, keep=mask)[0]),
            "joint_50_4bit_g128": solve(W, H, sparsity=0.5, bits=4, group_size=128).error,
        }
        assert m.weight.equal(W)  # the model was not modified
    methods = [k for k in next(iter(table.values())) if k != "shape"]
    print("\nSmolLM2-135M block 3, 2/n ||(W - W_new) X||^2 on 8 x 256 WikiText-2 tokens")
    print(f"{'method':22s}" + "".join(f"{n:>18s}" for n in table))
    for k in methods:
        print(f"{k:22s}" + "".join(f"{table[n][k]:18.4g}" for n in table))
    for a, b in [("sparsegpt_50", "magnitude_50"), ("sparsegpt_50", "wanda_50"),
                 ("sparsegpt_2:4", "magnitude_2:4"), ("gptq_4bit_g128", "rtn_4bit_g128"),
                 ("joint_50_4bit_g128", "magnitude_then_rtn")]:
        print(f"{a + ' / ' + b:40s}" + "".join(f"{table[n][a] / table[n][b]:8.4f}" for n in table))
    return table


def ratios(table, a, b):
    return {n: table[n][a] / table[n][b] for n in table}


#: error(a) / error(b) per layer (q_proj, gate_proj, down_proj), in float64, recorded by
#: ``python -m pytest -q -s -m slow tests/test_solver.py -k smollm2`` (the fixture prints them).
#: Re-record the same way, with the reason in the commit message, when an intended change
#: moves them.
LAYER_RATIOS = {
    ("sparsegpt_50", "magnitude_50"): (0.1415, 0.3649, 0.2670),
    ("sparsegpt_50", "wanda_50"): (0.3010, 0.4525, 0.3106),
    ("sparsegpt_2:4", "magnitude_2:4"): (0.1412, 0.3479, 0.2839),
    ("gptq_4bit_g128", "rtn_4bit_g128"): (0.2171, 0.3580, 0.2520),
    ("joint_50_4bit_g128", "magnitude_then_rtn"): (0.1646, 0.3720, 0.2771),
}
LAYER_RATIO_TOLERANCE = 0.05  # relative, per layer: a layer whose error doubles fails


def check_ratios(table, a, b, low, high):
    """Every layer's error(a) / error(b) lies in [low, high] (the range the test's name
    states) and within 5% of its recorded value."""
    got = ratios(table, a, b)
    for (name, r), recorded in zip(got.items(), LAYER_RATIOS[a, b]):
        assert low <= r <= high, (a, b, name, r)
        assert abs(r / recorded - 1) <= LAYER_RATIO_TOLERANCE, (a, b, name, r, recorded)


@pytest.mark.slow
def test_smollm2_sparsegpt_50_is_0p14_to_0p37x_magnitude_and_0p30_to_0p46x_wanda(smollm2_layer_errors):
    """SparseGPT 50% / magnitude 50% and / Wanda 50%, per layer: see LAYER_RATIOS."""
    check_ratios(smollm2_layer_errors, "sparsegpt_50", "magnitude_50", 0.14, 0.37)
    check_ratios(smollm2_layer_errors, "sparsegpt_50", "wanda_50", 0.30, 0.46)


@pytest.mark.slow
def test_smollm2_sparsegpt_2_4_is_0p13_to_0p35x_magnitude_2_4(smollm2_layer_errors):
    check_ratios(smollm2_layer_errors, "sparsegpt_2:4", "magnitude_2:4", 0.13, 0.35)


@pytest.mark.slow
def test_smollm2_gptq_4bit_g128_is_0p21_to_0p36x_rtn(smollm2_layer_errors):
    """GPTQ / RTN (4-bit, group 128, asymmetric), per layer: see LAYER_RATIOS.

    SmolLM2's weights here are dequantized from a Q4_1 GGUF file: they already lie on a 4-bit
    asymmetric grid per block of 32 input columns. With groups of 128 neither RTN nor GPTQ can
    reproduce those grids exactly (so both have a real error); 576-column layers also have a
    partial last group of 64 (issue 12)."""
    # NOTE: the weights were Q4_1 (4-bit, blocks of 32) in the GGUF file; the comparison holds
    # for these already-quantized weights and says nothing about fp16-trained originals.
    check_ratios(smollm2_layer_errors, "gptq_4bit_g128", "rtn_4bit_g128", 0.21, 0.36)


@pytest.mark.slow
def test_smollm2_joint_50_4bit_is_0p16_to_0p38x_magnitude_then_rtn(smollm2_layer_errors):
    """Joint (50% + 4-bit g128 in one sweep) / (magnitude 50%, then RTN 4-bit g128 on the
    survivors), per layer: see LAYER_RATIOS. The weights come from a Q4_1 GGUF (4-bit grid per
    block of 32 columns), see the GPTQ test."""
    # NOTE: weights dequantized from Q4_1 GGUF (4-bit grid per 32 columns), as above.
    check_ratios(smollm2_layer_errors, "joint_50_4bit_g128", "magnitude_then_rtn", 0.16, 0.38)


@pytest.mark.slow
def test_smollm2_layer_shapes(smollm2_layer_errors):
    assert [smollm2_layer_errors[n]["shape"] for n in REAL_LAYERS] == [
        (576, 576), (1536, 576), (576, 1536)]
    assert math.isfinite(sum(v for row in smollm2_layer_errors.values()
                             for k, v in row.items() if k != "shape"))


def test_mask_ties_break_the_same_way_everywhere():
    """Equal scores (e.g. weights of a dead input, all zero) are pruned in column order: the
    n:m choice is a stable sort, the unstructured one prunes the first in row-major order, so
    no implementation detail (topk's order of equal values) can move a mask."""
    score = torch.tensor([[0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 2.0],
                          [5.0, 0.0, 5.0, 0.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    keep = nm_mask(score, 2, 4)
    assert keep.tolist() == [[False, False, True, True, True, False, False, True],
                             [True, False, True, False, False, False, True, True]]
    keep = prune_lowest(score, 5)  # five of the six zeros: the first in row-major order
    assert (~keep).nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 1]]
    keep = prune_lowest(score, 7)  # the six zeros, then the first of the two 1.0s
    assert (~keep).nonzero().tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [0, 5], [1, 1],
                                          [1, 3]]
    keep = prune_lowest(score, 9)  # both 1.0s, then the first of the five 2.0s
    assert (~keep).nonzero().tolist()[-3:] == [[0, 7], [1, 1], [1, 3]]


def test_all_finite_is_exact():
    """all_finite answers as torch.isfinite(x).all() does: NaN or inf anywhere (even where they
    would cancel in a sum), and finite values whose sum overflows."""
    from toolkit.solver.hessian import all_finite

    x = torch.randn(64, 48)
    assert all_finite(x) and all_finite(torch.empty(0, 3))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[17, 5] = bad
        assert not all_finite(y)
    y = x.clone()
    y[0, 0], y[1, 1] = float("inf"), -float("inf")
    assert not all_finite(y)
    big = torch.full((8, 8), 3e38)  # every entry finite, the sum is not
    assert not bool(torch.isfinite(big.sum())) and all_finite(big)
    half = torch.full((8, 8), 6e4, dtype=torch.float16)  # fp16: the sum overflows at 65504
    assert not bool(torch.isfinite(half.sum())) and all_finite(half)
