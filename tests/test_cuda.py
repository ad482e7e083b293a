"""On a CUDA GPU: the solver, the Hessian and the sweep agree with the CPU.

Run with ``pytest -m cuda`` (bench/gpu.py does, first); every other run deselects these tests
(conftest.py), so a CPU machine never counts them as skipped. Without a GPU, ``-m cuda`` fails
loudly. ``TOOLKIT_CUDA_TEST_DEVICE=cpu`` runs the same tests with the CPU standing in for the GPU
(the check of the tests themselves that ``bench/gpu.py --cpu-smoke`` makes).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import random_ids, tiny_model

import toolkit.walk.sweep as sweep
from toolkit import compress
from toolkit.solver.hessian import HessianAccumulator, reconstruction_error
from toolkit.solver.layer import solve

pytestmark = pytest.mark.cuda
DEVICE = torch.device(os.environ.get("TOOLKIT_CUDA_TEST_DEVICE", "cuda"))


@pytest.fixture(autouse=True)
def _gpu_present():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.fail("no CUDA GPU is present: the cuda tests need one (TOOLKIT_CUDA_TEST_DEVICE=cpu "
                    "runs them on the CPU instead)")


def _problem(rows=384, cols=640, seed=0):
    """A weight and a correlated Hessian 2/n X^T X (float32)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + 0.5 * torch.randn(cols, cols, generator=g) / cols**0.5
    X = torch.randn(4 * cols, cols, generator=g) @ mix
    return torch.randn(rows, cols, generator=g), 2 / X.shape[0] * X.T @ X


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(pattern="2:4"),
                                dict(bits=4, group_size=128),
                                dict(sparsity=0.5, bits=4, group_size=128),
                                dict(bits=4, group_size=128, act_order=True)],
                         ids=["sparsegpt", "2:4", "gptq", "joint", "act-order"])
def test_solver_on_the_device_agrees_with_the_cpu(kw):
    W, H = _problem()
    cpu = solve(W, H, **kw)
    dev = solve(W.to(DEVICE), H.to(DEVICE), **kw)
    assert dev.weight.device.type == DEVICE.type
    if cpu.mask is not None:
        assert int((~dev.mask).sum()) == int((~cpu.mask).sum())  # exact counts on both
        assert float((dev.mask.cpu() == cpu.mask).float().mean()) >= 0.995
    if cpu.codes is not None:
        assert float((dev.codes.cpu() == cpu.codes).float().mean()) >= 0.995
        assert torch.equal(dev.g_idx.cpu(), cpu.g_idx)
    e_dev = reconstruction_error(W, dev.weight.cpu(), H.double())
    assert e_dev == pytest.approx(cpu.error, rel=2e-2)


def test_hessian_on_the_device_equals_the_cpu():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 300, 700, generator=g)
    on_cpu, on_dev = HessianAccumulator(700), HessianAccumulator(700, device=DEVICE)
    for x in X:
        on_cpu.add(x)
        on_dev.add(x.to(DEVICE), check=False)
    on_dev.check_finite()
    assert on_dev.H.device.type == DEVICE.type
    assert float((on_dev.H.cpu() - on_cpu.H).norm() / on_cpu.H.norm()) < 1e-5
    assert torch.equal(on_dev.H, on_dev.H.T)


def test_memory_budget_follows_the_device():
    if DEVICE.type == "cuda":
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        assert sweep.sweep_memory(DEVICE) == total // 4
    else:
        assert sweep.sweep_memory(DEVICE) == sweep.CPU_SWEEP_MEMORY_MB << 20
    assert sweep.sweep_memory(DEVICE, 64) == 64 << 20


@pytest.mark.parametrize("kw", [dict(sparsity=0.5), dict(sparsity=0.5, bits=4, group_size=32)],
                         ids=["prune", "joint"])
def test_compress_on_the_device_agrees_with_the_cpu(kw):
    model = tiny_model("llama")
    ids = random_ids(16, 64)
    on_cpu, on_dev = copy.deepcopy(model), copy.deepcopy(model).to(DEVICE)
    r_cpu = compress(on_cpu, calibration=ids, nsamples=16, seqlen=64, device="cpu",
                     verbose=False, **kw)
    r_dev = compress(on_dev, calibration=ids, nsamples=16, seqlen=64, device=str(DEVICE),
                     verbose=False, **kw)
    assert r_dev.layers["sparsity"].tolist() == r_cpu.layers["sparsity"].tolist()
    for (name, p), q in zip(on_dev.named_parameters(), on_cpu.parameters()):
        if p.dim() == 2 and "layers" in name:
            agree = float(((p.detach().cpu() == 0) == (q.detach() == 0)).float().mean())
            assert agree >= 0.98, (name, agree)
    e_dev, e_cpu = r_dev.layers["error"].to_numpy(), r_cpu.layers["error"].to_numpy()
    assert abs(e_dev - e_cpu).max() <= 0.05 * e_cpu.max()


def test_reuse_is_exact_on_the_device(monkeypatch):
    model = tiny_model("qwen2").to(DEVICE)
    ids = random_ids(16, 64)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compress(a, calibration=ids, nsamples=16, seqlen=64, device=str(DEVICE), verbose=False,
             sparsity=0.5, bits=4, group_size=32)

    def no_plan(self, n, budget):
        self.serve = [set() for _ in self.passes]
        self.store = [set() for _ in self.passes]
        self.last_use = {}
    monkeypatch.setattr(sweep._Walk, "_plan", no_plan)
    compress(b, calibration=ids, nsamples=16, seqlen=64, device=str(DEVICE), verbose=False,
             sparsity=0.5, bits=4, group_size=32)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_probe_measures_the_activations_of_one_window():
    from toolkit.model.layers import find_blocks, find_linears

    model = tiny_model("llama").to(DEVICE)
    _, blocks = find_blocks(model)
    inputs = sweep.capture_block_inputs(model, blocks, random_ids(4, 64), DEVICE)
    assert inputs.hidden[0].device.type == DEVICE.type
    probe = sweep._probe(blocks[0], find_linears(blocks[0], "model.layers.0"), inputs)
    hidden_bytes = 64 * 64 * 4  # one window of the block's input
    assert hidden_bytes * 4 < probe.window_bytes < hidden_bytes * 64
