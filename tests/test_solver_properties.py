"""Property-based tests of the shared layer solver on random shapes and options (hypothesis).

Hypothesis draws the shape (rows 1..40, cols a multiple of 4 in 4..96), the options (sparsity,
n:m pattern, bits 2..8, group sizes that do and do not divide the columns, sym/asym, act_order,
block size) and a seed; the tensors themselves come from a seeded torch generator. Every
example checks the invariants exactly: mask counts, zeros, grid membership, level counts,
degenerate cases against the baselines, and the Hessian's independence from batching.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.solver.baselines import apply_mask, magnitude_mask, rtn_quantize
from toolkit.solver.hessian import HessianAccumulator
from toolkit.solver.layer import solve, solve_layers
from toolkit.solver.quant import group_bounds

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])

rows_st = st.integers(1, 40)
cols_st = st.integers(1, 24).map(lambda k: 4 * k)
seed_st = st.integers(0, 2**31 - 1)
bits_st = st.integers(2, 8)
block_st = st.sampled_from([8, 16, 32, 128])
sparsity_st = st.floats(0.0, 0.95, allow_nan=False)


@st.composite
def group_sizes(draw, cols):
    """None (per row), a divisor-free size, a size that divides cols, or one wider than cols."""
    return draw(st.sampled_from([None, 4, 7, 12, 32, 33, 64, 128, cols, max(1, cols - 3)]))


def problem(rows: int, cols: int, seed: int):
    """A weight and a Hessian from n inputs; n < cols sometimes (singular H, saved by damping)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(max(1, cols // 2), 3 * cols + 1, (1,), generator=g))
    scales = torch.exp(torch.randn(cols, generator=g))
    X = torch.randn(n, cols, generator=g) @ (
        torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5) * scales
    H = 2 / n * X.T @ X
    W = torch.randn(rows, cols, generator=g) * float(torch.exp(torch.randn((), generator=g)))
    return W, H


def pruned(res, shape) -> torch.Tensor:
    """The pruned positions; ``mask`` is None when nothing was to be pruned (sparsity 0)."""
    if res.mask is None:
        return torch.zeros(shape, dtype=torch.bool)
    return ~res.mask


def check_grid(res, bits: int, cols: int, group_size) -> None:
    g = res.g_idx.long()
    widths = [b - a for a, b in group_bounds(cols, group_size)]
    assert torch.bincount(g, minlength=len(widths)).tolist() == widths
    assert res.scale.shape[1] == len(widths)
    assert int(res.codes.max()) <= 2**bits - 1
    expected = res.scale[:, g] * (res.codes.float() - res.zero[:, g])
    assert torch.equal(res.weight, expected)
    for grp in range(len(widths)):
        s = res.weight[:, g == grp].sort(dim=1).values
        assert int((1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)).max()) <= 2**bits


@SETTINGS
@given(rows=rows_st, cols=cols_st, sparsity=sparsity_st, block=block_st, seed=seed_st)
def test_unstructured_sparsity_is_exact(rows, cols, sparsity, block, seed):
    W, H = problem(rows, cols, seed)
    res = solve(W, H, sparsity=sparsity, block_size=block)
    assert (res.mask is None) == (sparsity == 0)
    assert int(pruned(res, W.shape).sum()) == round(sparsity * rows * cols)
    assert bool((res.weight[pruned(res, W.shape)] == 0).all())
    assert torch.isfinite(res.weight).all()
    assert res.error >= 0


@SETTINGS
@given(rows=rows_st, cols=cols_st, nm=st.sampled_from([(1, 4), (2, 4), (3, 4), (4, 8), (2, 8)]),
       bits=st.none() | bits_st, block=block_st, seed=seed_st)
def test_nm_pattern_is_valid_in_every_group(rows, cols, nm, bits, block, seed):
    n, m = nm
    if cols % m:
        n, m = 2, 4
    W, H = problem(rows, cols, seed)
    res = solve(W, H, pattern=(n, m), bits=bits, group_size=16, block_size=block)
    pruned = (~res.mask).reshape(rows, cols // m, m).sum(dim=2)
    assert bool((pruned == n).all())
    assert bool((res.weight[~res.mask] == 0).all())
    if bits is not None:
        check_grid(res, bits, cols, 16)


@SETTINGS
@given(data=st.data(), rows=rows_st, cols=cols_st, bits=bits_st, sym=st.booleans(),
       act_order=st.booleans(), mse=st.booleans(), block=block_st, seed=seed_st)
def test_quantized_weights_lie_on_their_group_grid(data, rows, cols, bits, sym, act_order, mse,
                                                   block, seed):
    group_size = data.draw(group_sizes(cols))
    W, H = problem(rows, cols, seed)
    res = solve(W, H, bits=bits, group_size=group_size, sym=sym, mse=mse, act_order=act_order,
                block_size=block)
    check_grid(res, bits, cols, group_size)
    if sym:
        assert bool((res.zero == 2 ** (bits - 1)).all())


@SETTINGS
@given(data=st.data(), rows=rows_st, cols=cols_st, sparsity=sparsity_st, bits=bits_st,
       sym=st.booleans(), act_order=st.booleans(), block=block_st, seed=seed_st)
def test_joint_prunes_exactly_and_quantizes_the_survivors(data, rows, cols, sparsity, bits, sym,
                                                          act_order, block, seed):
    group_size = data.draw(group_sizes(cols))
    W, H = problem(rows, cols, seed)
    res = solve(W, H, sparsity=sparsity, bits=bits, group_size=group_size, sym=sym,
                act_order=act_order, block_size=block)
    off = pruned(res, W.shape)
    assert int(off.sum()) == round(sparsity * rows * cols)
    assert bool((res.weight[off] == 0).all())
    zero_full = res.zero[:, res.g_idx.long()]
    assert torch.equal(res.codes[off].float(), zero_full[off])
    check_grid(res, bits, cols, group_size)


@SETTINGS
@given(rows=st.lists(st.integers(1, 20), min_size=2, max_size=3), cols=cols_st,
       sparsity=sparsity_st, block=block_st, seed=seed_st)
def test_stacked_layers_keep_their_own_exact_sparsity(rows, cols, sparsity, block, seed):
    W, H = problem(sum(rows), cols, seed)
    parts = list(torch.split(W, rows))
    parts[0] = parts[0] * 100  # very different magnitudes: a pooled budget would be unequal
    res = solve_layers(parts, H, sparsity=sparsity, block_size=block)
    for w, r in zip(parts, res):
        assert r.weight.shape == w.shape
        off = pruned(r, w.shape)
        assert int(off.sum()) == round(sparsity * w.shape[0] * cols)
        assert bool((r.weight[off] == 0).all())


@SETTINGS
@given(rows=rows_st, cols=cols_st, block=block_st, seed=seed_st,
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_nothing_to_do_is_bit_identical(rows, cols, block, seed, dtype):
    W, H = problem(rows, cols, seed)
    W = W.to(dtype)
    res = solve(W, H, sparsity=0.0, bits=None, block_size=block)
    assert res.weight.dtype == dtype
    assert torch.equal(res.weight, W)


@SETTINGS
@given(data=st.data(), rows=rows_st, cols=cols_st, sparsity=sparsity_st, bits=bits_st,
       sym=st.booleans(), seed=seed_st)
def test_identity_hessian_reduces_to_magnitude_and_rtn(data, rows, cols, sparsity, bits, sym,
                                                       seed):
    """H = I, one block over all columns: SparseGPT = magnitude, GPTQ = RTN, joint =
    magnitude then RTN on the survivors, bit for bit."""
    group_size = data.draw(group_sizes(cols))
    W, _ = problem(rows, cols, seed)
    eye = torch.eye(cols)
    block = 128
    prune = solve(W, eye, sparsity=sparsity, block_size=block)
    mask = magnitude_mask(W, sparsity)
    assert torch.equal(~pruned(prune, W.shape), mask)
    assert torch.equal(prune.weight, apply_mask(W, mask))
    quant = solve(W, eye, bits=bits, group_size=group_size, sym=sym, block_size=block)
    new, codes, scale, zero = rtn_quantize(W, bits, group_size, sym=sym)
    assert torch.equal(quant.weight, new) and torch.equal(quant.codes, codes)
    assert torch.equal(quant.scale, scale) and torch.equal(quant.zero, zero)
    joint = solve(W, eye, sparsity=sparsity, bits=bits, group_size=group_size, sym=sym,
                  block_size=block)
    assert torch.equal(~pruned(joint, W.shape), mask)
    assert torch.equal(joint.weight, rtn_quantize(W, bits, group_size, sym=sym, keep=mask)[0])


@SETTINGS
@given(n=st.integers(1, 200), cols=st.integers(1, 48), cuts=st.lists(st.floats(0, 1), max_size=4),
       seed=seed_st)
def test_hessian_does_not_depend_on_batching(n, cols, cuts, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    one = HessianAccumulator(cols)
    one.add(X)
    many = HessianAccumulator(cols)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        many.add(X[a:b])
    exact = 2 / n * X.double().T @ X.double()
    scale = float(exact.norm())
    assert float((many.H.double() - one.H.double()).norm()) <= 1e-6 * scale
    assert float((one.H.double() - exact).norm()) <= 1e-6 * scale
