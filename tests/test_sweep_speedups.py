"""The sweep at the cost floor (issue 24): batched windows, outputs reused between passes, the
parallel schedule, Hessians as one product per batch, the memory budget.

The claims tested: reusing kept outputs changes no bit of the result; the sequential schedule
now does about one block's worth of linear-layer work per block (it did about 2.4); batching
and reuse agree with the one-window, nothing-kept schedule to float rounding on every tiny
family (ALiBi batches included); the parallel schedule's Hessians are those of the unchanged
block; the budget bounds the batches; a block that calls its modules in another order than the
probe saw, or that changes a kept output in place, is computed without the reuse.
"""

from __future__ import annotations

import collections
import copy
import logging

import pytest
import torch
from conftest import TINY_FAMILIES, random_ids, tiny_model
from torch import nn

import toolkit.walk.sweep as sweep
from toolkit import compress
from toolkit.config.options import CompressConfig, LayerSettings
from toolkit.model.layers import find_blocks, find_linears
from toolkit.solver.hessian import PANEL, HessianAccumulator, SolverError
from toolkit.walk.capture import capture_hessians
from toolkit.walk.sweep import (
    CPU_SWEEP_MEMORY_MB,
    BlockInputs,
    capture_block_inputs,
    sweep_block,
    sweep_memory,
)

N, L = 8, 32


def _compress(model, nsamples=N, **kw):
    kw.setdefault("sparsity", 0.5)
    return compress(model, calibration=random_ids(nsamples, L), nsamples=nsamples, seqlen=L,
                    verbose=False, **kw)


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def _bitwise_equal(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture()
def no_reuse(monkeypatch):
    """The sweep with its batches but without keeping any output between passes."""
    def plan(self, n, budget):
        self.serve = [set() for _ in self.passes]
        self.store = [set() for _ in self.passes]
        self.last_use = {}
    return lambda: monkeypatch.setattr(sweep._Walk, "_plan", plan)


class LinearWork:
    """Counts the multiply-adds nn.Linear layers really execute (a reused output skips them)."""

    def __init__(self, monkeypatch):
        self.macs = 0
        orig = nn.Linear.forward

        def forward(module, x):
            self.macs += module.weight.numel() * (x.numel() // x.shape[-1])
            return orig(module, x)
        monkeypatch.setattr(nn.Linear, "forward", forward)


# ---- reuse is exact, and cuts the work ------------------------------------------------------

# 32 windows of 32 tokens of a tiny LLaMA take ~3 MiB of activations: with 2 MiB the sweep
# makes one pass per group in batches of 4 windows and keeps every final output (1.5 MiB)
MULTI = dict(nsamples=32, sweep_memory_mb=2)


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.5, bits=4, group_size=32),
                                dict(bits=3, group_size=16, act_order=True)],
                         ids=["prune", "joint", "gptq-act-order"])
def test_reusing_outputs_changes_no_bit(kw, no_reuse):
    model = tiny_model("llama")
    reused, plain = copy.deepcopy(model), copy.deepcopy(model)
    report = _compress(reused, **MULTI, **kw)
    no_reuse()
    report_plain = _compress(plain, **MULTI, **kw)
    assert _bitwise_equal(reused, plain)
    assert report.layers["error"].tolist() == report_plain.layers["error"].tolist()


def test_two_runs_are_bitwise_identical():
    model = tiny_model("qwen2")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _compress(a, bits=4, group_size=32)
    _compress(b, bits=4, group_size=32)
    assert _bitwise_equal(a, b)


def test_sequential_schedule_does_about_one_block_pass_of_linear_work(monkeypatch):
    """Linear multiply-adds of compress() divided by those of one forward through the blocks.
    The old schedule (one window at a time, nothing kept: sweep_memory_mb=0) re-runs the block
    up to each group: 2.37 passes for LLaMA, with the probe (one window in 32). Keeping final
    outputs brings it to one pass plus the probe; so does one forward of every window with each
    group solved at its input (the default when the activations fit); the parallel schedule
    makes two passes, the first stopping at down_proj's input."""
    model = tiny_model("llama")
    ids = random_ids(32, L)
    work = LinearWork(monkeypatch)
    with torch.no_grad():
        model(ids, use_cache=False)
    lm_head = model.lm_head.weight.numel() * ids.numel()
    forward = work.macs - lm_head

    def passes(**kw):
        work.macs = 0
        compress(copy.deepcopy(model), calibration=ids, nsamples=32, seqlen=L, sparsity=0.5,
                 verbose=False, **kw)
        return work.macs / forward
    probe = 1 / 32
    assert passes(sweep_memory_mb=0) == pytest.approx(2.33 + probe, abs=0.01)
    assert passes(sweep_memory_mb=2) == pytest.approx(1 + probe, abs=0.01)
    assert passes() == pytest.approx(1 + probe, abs=0.01)
    assert passes(schedule="parallel") == pytest.approx(1.77 + probe, abs=0.01)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_batches_and_reuse_agree_with_one_window_at_a_time(family):
    """Every family, ALiBi (bloom) included: the model builds the shared arguments of each batch
    size itself. One forward of all windows (the default here) and batches with kept outputs
    (MULTI) agree with the old schedule to float rounding."""
    model = tiny_model(family)
    for kw in (dict(), MULTI):
        new, old = copy.deepcopy(model), copy.deepcopy(model)
        n = kw.get("nsamples", N)
        r_new = _compress(new, **kw)
        r_old = _compress(old, nsamples=n, sweep_memory_mb=0)
        assert _max_diff(new, old) < 1e-4
        assert r_new.layers["sparsity"].tolist() == r_old.layers["sparsity"].tolist()
        err_new, err_old = r_new.layers["error"].to_numpy(), r_old.layers["error"].to_numpy()
        assert abs(err_new - err_old).max() <= 1e-3 * err_old.max()


def test_capture_builds_the_arguments_of_each_batch_size():
    model = tiny_model("bloom")
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, random_ids(6, 16), "cpu")
    assert len(inputs.hidden) == 6 and inputs.hidden[0].shape == (1, 16, 64)
    assert sorted(inputs.batched) == [2, 4, 6]  # powers of two below 6, and all 6
    heads = model.config.n_head
    assert inputs.kwargs["alibi"].shape[0] == heads
    assert inputs.shared(4)[1]["alibi"].shape[0] == 4 * heads
    with pytest.raises(ValueError, match="batches of 3 windows"):
        inputs.shared(3)
    assert capture_block_inputs(model, blocks, random_ids(6, 16), "cpu", 0).batched == {}


# ---- the memory budget ----------------------------------------------------------------------

def test_memory_budget_defaults_and_batch_sizes(monkeypatch):
    assert sweep_memory("cpu") == CPU_SWEEP_MEMORY_MB << 20
    assert sweep_memory("cpu", 0) == 0 and sweep_memory("cpu", 3) == 3 << 20
    model = tiny_model("llama", layers=1)
    _, blocks = find_blocks(model)
    sizes = collections.Counter()
    # completed calls only: the probe and the last pass (captures and Hessian passes stop early)
    blocks[0].register_forward_hook(lambda _m, args, _out: sizes.update([args[0].shape[0]]))

    def batch_sizes(mb, n):
        sizes.clear()
        compress(copy.deepcopy(model), calibration=random_ids(n, L), nsamples=n, seqlen=L,
                 sparsity=0.5, verbose=False, sweep_memory_mb=mb)
        return sorted(sizes)
    assert batch_sizes(0, 8) == [1]  # one window at a time, the old schedule
    assert batch_sizes(None, 8) == [1, 8]  # the probe, then all 8 in one forward
    assert batch_sizes(None, 7) == [1, 7]
    # all windows at once when their activations fit the budget; else batches of a power of
    # two within a quarter of it
    inputs = capture_block_inputs(model, blocks, random_ids(8, L), "cpu")
    refs = find_linears(blocks[0], "model.layers.0")
    window = sweep._probe(blocks[0], refs, inputs).window_bytes
    assert 64 * L * 4 < window < 40 * 64 * L * 4  # more than the block's input, not absurd
    for mb, n in ((1, 8), (1, 64), (2, 64), (1, 100)):
        if n * window <= mb << 20:
            expected = {n}
        else:
            fit = min((mb << 20) // 4 // window, n)
            size = 1 << (fit.bit_length() - 1)
            expected = {size} | {1 << i for i in range(size.bit_length()) if n % size >> i & 1}
        assert batch_sizes(mb, n) == sorted({1} | expected), (mb, n, window)


# ---- the parallel schedule ------------------------------------------------------------------

def test_parallel_schedule_takes_every_hessian_from_the_unchanged_block(monkeypatch):
    model = tiny_model("llama", layers=1)
    ids = random_ids(N, L)
    names = [r.name for r in find_linears(find_blocks(model)[1][0], "model.layers.0")]
    dense = capture_hessians(model, names, ids, batch_size=N)
    seen = {}
    real = sweep._solve_group

    def spy(group, settings, H, *args, **kwargs):
        seen[group[0].name] = None if H is None else H.clone()
        return real(group, settings, H, *args, **kwargs)
    monkeypatch.setattr(sweep, "_solve_group", spy)
    for schedule in ("parallel", "sequential"):
        seen.clear()
        compress(copy.deepcopy(model), calibration=ids, nsamples=N, seqlen=L, sparsity=0.5,
                 verbose=False, schedule=schedule)
        assert list(seen) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                              "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"]
        for name, H in seen.items():
            ref = dense[name].H
            rel = float((H - ref).norm() / ref.norm())
            if schedule == "parallel" or name.endswith("q_proj"):
                assert rel < 1e-5, (schedule, name, rel)
            else:  # later groups see the compressed earlier ones
                assert rel > 1e-3, (schedule, name, rel)


def test_schedule_option():
    assert CompressConfig(sparsity=0.5).schedule == "sequential"
    cfg = CompressConfig(sparsity=0.5, schedule="parallel")
    assert cfg.describe() == "sparsegpt 50% + parallel schedule"
    with pytest.raises(ValueError, match="schedule must be one of 'sequential', 'parallel'"):
        CompressConfig(sparsity=0.5, schedule="interleaved")
    with pytest.raises(ValueError, match="sweep_memory_mb must be an integer >= 0"):
        CompressConfig(sparsity=0.5, sweep_memory_mb=-1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        sweep_block(nn.Linear(2, 2), 0, [], None, device="cpu", schedule="x")


# ---- blocks that do not follow the probe ----------------------------------------------------

class Flipping(nn.Module):
    """Calls its two layers in the other order from the third call on (the probe is the
    first): the sweep must notice before handing back any kept output."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls < 3:
            return self.c(self.b(self.a(x)))
        return self.c(self.a(self.b(x)))


class InPlace(nn.Module):
    """Adds its input to a layer's output in place: a kept output must not be handed back once
    changed."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(16, 16))
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.inner(x)
        h += x
        return self.b(self.a(h))


def _sweep_custom(block, settings, n=16):
    """16 windows of 1024 tokens (3 MiB of activations) with 2 MiB: batches of 2 windows, one
    pass per group, final outputs kept."""
    g = torch.Generator().manual_seed(0)
    inputs = BlockInputs(hidden=[torch.randn(1, 1024, 16, generator=g) for _ in range(n)],
                         batched={k: ((), {}) for k in (2, 4, 8, 16)})
    plan = [(r, settings) for r in find_linears(block, "blk")]
    rows = sweep_block(block, 0, plan, inputs, device="cpu", memory_mb=2)
    return rows, inputs


@pytest.mark.parametrize("cls", [Flipping, InPlace])
def test_blocks_that_leave_the_probed_path_are_computed_without_reuse(cls, no_reuse, caplog):
    torch.manual_seed(0)
    block = cls()
    settings = LayerSettings(sparsity=0.5)
    a, b = copy.deepcopy(block), copy.deepcopy(block)
    with caplog.at_level(logging.WARNING, logger="toolkit"):
        rows_a, in_a = _sweep_custom(a, settings)
    if cls is Flipping:
        assert "another order than probed" in caplog.text
    no_reuse()
    rows_b, in_b = _sweep_custom(b, settings)
    assert _bitwise_equal(a, b)
    assert [r["error"] for r in rows_a] == [r["error"] for r in rows_b]
    assert all(torch.equal(x, y) for x, y in zip(in_a.hidden, in_b.hidden))


def test_non_finite_activations_name_the_layer():
    model = tiny_model("llama", layers=1)
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(SolverError, match=r"layers\.0\.mlp\.gate_proj.*NaN or inf"):
        _compress(model)


# ---- the Hessian ----------------------------------------------------------------------------

def test_hessian_panels_are_exact_and_symmetric():
    cols = 2 * PANEL + 44  # three panels, the last narrower
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 50, cols, generator=g, dtype=torch.float64)
    acc = HessianAccumulator(cols, dtype=torch.float64)
    acc.add(X[0], check=False)
    acc.add(X[1:])
    flat = X.reshape(-1, cols)
    exact = 2 / flat.shape[0] * flat.T @ flat
    assert acc.nsamples == 150
    assert float((acc.H - exact).abs().max() / exact.abs().max()) < 1e-14
    assert torch.equal(acc.H, acc.H.T)
    more = torch.randn(20, cols, generator=g, dtype=torch.float64)  # adding after reading H
    acc.add(more)
    flat = torch.cat([flat, more])
    exact = 2 / flat.shape[0] * flat.T @ flat
    assert float((acc.H - exact).abs().max() / exact.abs().max()) < 1e-14


def test_unchecked_adds_are_checked_once():
    acc = HessianAccumulator(8, name="model.layers.1.mlp.up_proj")
    acc.add(torch.randn(4, 8), check=False)
    acc.check_finite()
    bad = torch.randn(4, 8)
    bad[2, 5] = float("nan")
    acc.add(bad, check=False)
    with pytest.raises(SolverError, match="model.layers.1.mlp.up_proj: calibration inputs"):
        acc.check_finite()


@pytest.mark.parametrize("kw", [dict(), MULTI, dict(schedule="parallel")],
                         ids=["one-forward", "passes", "parallel"])
def test_block_forwards_build_no_autograd_graph(kw):
    """The parameters of a loaded model require gradients; a forward that recorded them would
    keep every activation of every block alive (it did, once: +250 MiB per SmolLM2 block)."""
    model = tiny_model("llama")
    assert all(p.requires_grad for p in model.parameters())
    grad = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda _m, _a, out: grad.append(out.requires_grad))
    _compress(model, **kw)
    assert grad and not any(grad)
