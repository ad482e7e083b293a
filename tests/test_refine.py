"""Mask-fixed re-solve (toolkit.solver.refine): never a higher layer error, masks and n:m kept."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from toolkit import compress
from toolkit.api import CompressConfig
from toolkit.solver.layer import solve_layers
from toolkit.solver.masks import is_nm_valid
from toolkit.solver.refine import pcg_masked_lstsq, refine_layers, row_errors


def _problem(rows=48, cols=64, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols,
                                                                                   generator=g))
    H = 2 / n * X.T @ X
    W = torch.randn(rows, cols, generator=g)
    return W, H


CASES = [dict(sparsity=0.5), dict(sparsity=0.7), dict(pattern="2:4"), dict(pattern="4:8"),
         dict(sparsity=0.6, bits=4, group_size=16), dict(pattern="2:4", bits=3, group_size=32),
         dict(sparsity=0.5, bits=4, group_size=16, act_order=True)]


@pytest.mark.parametrize("kw", CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_resolve_never_worse_and_keeps_mask(kw, seed):
    W, H = _problem(seed=seed)
    W2 = W[:20] * 3
    res = solve_layers([W, W2], H, **kw)
    out = refine_layers([W, W2], res, H, iters=10, bits=kw.get("bits"),
                        group_size=kw.get("group_size"), act_order=kw.get("act_order", False))
    for w, a, b in zip([W, W2], res, out):
        assert b.error <= a.error * (1 + 1e-6) + 1e-9
        # and per row, which is what makes the layer guarantee hold
        assert (row_errors(w, b.weight, H) <= row_errors(w, a.weight, H) * (1 + 1e-5) + 1e-7).all()
        assert torch.equal(b.mask, a.mask)
        assert ((b.weight != 0) <= a.mask).all()  # pruned weights stay exactly 0
        if "pattern" in kw:
            n, m = (int(x) for x in kw["pattern"].split(":"))
            assert is_nm_valid(b.weight, n, m)
        if kw.get("bits"):  # the weight lies on its (possibly new) grids
            g = b.g_idx.long()
            assert torch.allclose(b.weight, b.scale[:, g] * (b.codes.float() - b.zero[:, g]),
                                  atol=1e-5)
    # the re-solve helps on these problems (it is not a no-op)
    assert sum(b.error for b in out) < 0.98 * sum(a.error for a in res)


def test_pcg_reaches_the_masked_least_squares_optimum():
    W, H = _problem(rows=6, cols=24, seed=3)
    keep = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    X = pcg_masked_lstsq(W, keep, H.double().float(), torch.zeros_like(W), iters=200)
    for r in range(W.shape[0]):
        k = keep[r]
        exact = torch.linalg.solve(H[k][:, k].double(), (W[r].double() @ H.double())[k])
        assert torch.allclose(X[r, k].double(), exact, rtol=1e-3, atol=1e-3)
        assert (X[r, ~k] == 0).all()


def test_zero_iterations_and_unpruned_are_untouched():
    W, H = _problem()
    res = solve_layers([W], H, sparsity=0.5)
    assert refine_layers([W], res, H, iters=0) is res
    dense = solve_layers([W], H, bits=4)
    assert refine_layers([W], dense, H, iters=5) is dense


def test_compress_with_refine_lowers_errors_and_keeps_sparsity():
    ids = random_ids(8, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    ra = compress(a, calibration=ids, nsamples=8, seqlen=32, sparsity=0.6, verbose=False)
    rb = compress(b, calibration=ids, nsamples=8, seqlen=32, sparsity=0.6, refine_iters=10,
                  verbose=False)
    assert list(ra.layers["sparsity"]) == list(rb.layers["sparsity"])
    assert rb.layers["error"].sum() < ra.layers["error"].sum()
    assert rb.summary["refine_iters"] == 10 and "re-solve" in rb.summary["method"]
    rc = compress(tiny_model("llama"), calibration=ids, nsamples=8, seqlen=32, pattern="2:4",
                  refine_iters=5, bits=4, verbose=False)
    assert (rc.layers["sparsity"] == 0.5).all()


def test_refine_iters_per_layer_through_overrides():
    """Only the layers an override names are re-solved: in block 0 (same inputs in both runs)
    the attention layers come out bitwise as without re-solve, the MLP layers with lower error."""
    ids = random_ids(8, 32)
    kw = dict(calibration=ids, nsamples=8, seqlen=32, sparsity=0.6, verbose=False)
    plain = compress(tiny_model("llama"), **kw).layers
    mixed = compress(tiny_model("llama"), overrides={r"\.mlp\.": {"refine_iters": 10}},
                     **kw).layers
    b0 = plain["layer"].str.contains(r"layers\.0\.")
    mlp = plain["layer"].str.contains(r"\.mlp\.")
    assert (b0 & mlp).sum() == 3 and (b0 & ~mlp).sum() == 4
    assert list(mixed["error"][b0 & ~mlp]) == list(plain["error"][b0 & ~mlp])
    assert (mixed["error"][b0 & mlp] <= plain["error"][b0 & mlp] * (1 + 1e-6)).all()
    assert mixed["error"][b0 & mlp].sum() < 0.99 * plain["error"][b0 & mlp].sum()
    assert list(mixed["sparsity"]) == list(plain["sparsity"])
    # and the other way round: on everywhere, off for attention
    off = compress(tiny_model("llama"), refine_iters=10,
                   overrides={"self_attn": {"refine_iters": 0}}, **kw).layers
    assert list(off["error"][b0 & ~mlp]) == list(plain["error"][b0 & ~mlp])
    assert list(off["error"][b0 & mlp]) == list(mixed["error"][b0 & mlp])


def test_refine_override_on_a_layer_that_is_not_pruned_is_refused():
    with pytest.raises(ValueError, match=r"overrides\['mlp'\].*refine_iters=5.*sparsity or "
                                         r"pattern"):
        CompressConfig(bits=4, overrides={"mlp": {"refine_iters": 5}})
    with pytest.raises(ValueError, match=r"overrides\['mlp'\].*refine_iters"):
        CompressConfig(sparsity=0.5, overrides={"mlp": {"refine_iters": -2}})


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_refine_iters_validation_names_the_argument(bad):
    with pytest.raises(ValueError, match="refine_iters"):
        CompressConfig(sparsity=0.5, refine_iters=bad)
    with pytest.raises(ValueError, match="refine_iters"):
        CompressConfig(bits=4, refine_iters=5)  # nothing pruned: nothing to re-solve


@pytest.mark.slow
def test_resolve_never_worse_on_real_smollm2_layers(smollm2_shared, wikitext_valid):
    """Block 0 and 5 of SmolLM2-135M with their real calibration Hessians."""
    from toolkit.measure.text import get_calibration
    from toolkit.model.layers import find_blocks, find_linears
    from toolkit.walk.sweep import capture_block_inputs, find_groups, group_hessian, run_block

    model, tok = smollm2_shared
    ids = get_calibration(wikitext_valid, tok, nsamples=8, seqlen=256)
    name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, "cpu")
    with torch.no_grad():
        for b in range(6):
            if b in (0, 5):
                refs = find_linears(blocks[b], f"{name}.{b}")
                for group in find_groups(blocks[b], refs, inputs):
                    H = group_hessian(blocks[b], group, inputs, torch.float32).H
                    ws = [r.get_weight().float().clone() for r in group]
                    for kw in (dict(sparsity=0.7), dict(pattern="2:4"),
                               dict(sparsity=0.5, bits=4, group_size=128)):
                        res = solve_layers(ws, H, **kw)
                        out = refine_layers(ws, res, H, iters=10, bits=kw.get("bits"),
                                            group_size=kw.get("group_size"))
                        for r, a, o in zip(group, res, out):
                            assert o.error <= a.error * (1 + 1e-6), (r.name, kw)
                            assert torch.equal(o.mask, a.mask)
                        if kw.get("sparsity") == 0.7:
                            assert sum(o.error for o in out) < sum(a.error for a in res)
            inputs.hidden = [run_block(blocks[b], inputs, h) for h in inputs.hidden]
