"""Multi-process compression (toolkit.walk.distributed) with gloo and 2 CPU processes.

Each test launches its own processes (``torch.multiprocessing``, forkserver) on a free local port.
Tolerances: the all-reduced Hessian is a sum of per-rank means, the single-process one a running
mean, so they agree to float rounding (float64 Hessians: rel. 1e-12; float32: rel. 1e-5). The
compressed models are computed in float64 (the model, the Hessians and the solver), where the
order in which the two sides sum cannot move a rounding or mask choice: the weights agree to
1e-9 absolute, with no weight on another grid point; every rank holds bit-identical weights
(broadcast from the rank that solved them). In float32 the same comparison saw 0.9% of a tiny
Mixtral's weights move on one CPU and none on another: a weight near a rounding tie flips when
the Hessian differs in the last bits, and the error compensation carries the flip along its row
(bench/distributed.py shows a third of the weights of an 8M-parameter model moving in float32,
exactly as many as when one process merely reverses the order of its windows, at the same total
error).
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import random_ids, tiny_model, tiny_moe

WORLD = 2
ATOL = 1e-9  # compressed weights (float64): 2 processes against 1
HIDDEN = 64
CONFIG = dict(sparsity=0.5, bits=4, group_size=32, nsamples=8, seqlen=32,
              verbose=False, hessian_dtype="float64")

pytestmark = pytest.mark.skipif(not tdist.is_available() or not tdist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_and_ids():
    return tiny_model("llama", hidden=HIDDEN, layers=2).double(), random_ids(8, 32)


def _snapshot(model, report=None) -> dict:
    comp = {n: (m.compression.scale, m.compression.zero, m.compression.error)
            for n, m in model.named_modules() if hasattr(m, "compression")}
    out = {"state": {k: v.clone() for k, v in model.state_dict().items()}, "comp": comp}
    if report is not None:
        out["layers"] = report.layers.drop(columns=["seconds"]).to_dict("list")
    return out


def _hessian(model, ids, dtype):
    """The Hessian of block 0's first group (q/k/v), as the sweep computes it."""
    from toolkit.model.layers import find_blocks, find_linears
    from toolkit.walk import distributed
    from toolkit.walk.sweep import capture_block_inputs, find_groups, group_hessian

    name, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, distributed.local_share(ids), "cpu")
    groups = find_groups(blocks[0], find_linears(blocks[0], f"{name}.0"), inputs)
    acc = group_hessian(blocks[0], groups[0], inputs, dtype)
    return acc.H.clone(), acc.nsamples


def _moe64():
    """The tiny Mixtral in float64, its experts computed one by one (transformers' default
    grouped matrix product takes no float64)."""
    model = tiny_moe("mixtral").double()
    model.set_experts_implementation("eager")
    return model


def _worker(rank: int, world: int, port: int, case: str, outdir: str, timeout_s: float) -> None:
    torch.set_num_threads(1)
    out = Path(outdir)
    try:
        tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                 world_size=world, timeout=timedelta(seconds=timeout_s))
        from toolkit import compress
        from toolkit.walk import distributed

        model, ids = _model_and_ids() if case in ("match", "raise") else (None, None)
        if case == "match":
            result = {"H64": _hessian(model, ids, torch.float64),
                      "H32": _hessian(model, ids, torch.float32)}
            report = compress(model, calibration=ids, **CONFIG)
            result.update(_snapshot(model, report))
            result["processes"] = report.summary["processes"]
            torch.save(result, out / f"rank{rank}.pt")
        elif case == "asym":  # asymmetric targets and block reconstruction under 2 processes
            model, ids = _model_and_ids()
            report = compress(model, calibration=ids, asymmetric=True, **CONFIG)
            result = _snapshot(model, report)
            model, ids = _model_and_ids()
            report = compress(model, calibration=ids, asymmetric=True, reconstruct_steps=6,
                              **CONFIG)
            result["recon"] = _snapshot(model, report)
            torch.save(result, out / f"rank{rank}.pt")
        elif case == "moe":  # fused experts: slices solved by either rank, records on the module
            model = _moe64()
            report = compress(model, calibration=random_ids(8, 32), **CONFIG)
            torch.save(_moe_snapshot(model, report), out / f"rank{rank}.pt")
        elif case == "raise":
            import toolkit.walk.sweep as sweep

            if rank == 1:
                def broken(*_a, **_k):
                    raise ValueError("simulated solver failure")
                sweep._solve_group = broken
            compress(model, calibration=ids, **CONFIG)
        elif case in ("hang", "killed"):
            if rank == 1:
                if case == "killed":
                    os._exit(3)  # dies without a word
                time.sleep(600)  # never joins the collective
            distributed.all_reduce_hessian(_FakeAcc())
        (out / f"rank{rank}.ok").write_text("ok")
    except BaseException as e:  # noqa: BLE001 - reported to the test through a file
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}\n{e}\n{traceback.format_exc()}")
    finally:
        if tdist.is_initialized() and case == "match":
            tdist.destroy_process_group()


def _moe_snapshot(model, report) -> dict:
    """Weights, the expert slices' records and the report of a compressed tiny Mixtral."""
    comp = {f"{n}.{k}": (c.scale, c.zero, c.error) for n, m in model.named_modules()
            for k, c in getattr(m, "expert_compression", {}).items()}
    return {"state": {k: v.clone() for k, v in model.state_dict().items()}, "comp": comp,
            "layers": report.layers.drop(columns=["seconds"]).to_dict("list")}


class _FakeAcc:
    name = "model.layers.0.self_attn.q_proj"

    def __init__(self):
        self.H = torch.eye(4)
        self.nsamples = 10


def _context():
    """A forkserver that imports torch, transformers and toolkit once for every launch (safe
    like spawn; the imports would otherwise cost each process tens of seconds on a busy CPU)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "transformers",
                                "transformers.models.llama.modeling_llama", "toolkit",
                                "toolkit.walk.distributed", "conftest", __name__])
    return ctx


def _launch(case: str, tmp_path: Path, timeout_s: float = 60, wait_s: float = 120,
            stop_after: int | None = None) -> dict:
    """Start WORLD processes; wait until all have reported (or rank ``stop_after`` has); return
    each rank's report ('ok', the error text, or None if it gave none)."""
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, case, str(tmp_path), timeout_s),
                         daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + wait_s
    watch = procs if stop_after is None else [procs[stop_after]]
    for p in watch:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    result = {}
    for r in range(WORLD):
        ok, err = tmp_path / f"rank{r}.ok", tmp_path / f"rank{r}.err"
        result[r] = "ok" if ok.exists() else (err.read_text() if err.exists() else None)
    result["hung"] = hung
    return result


@pytest.fixture(scope="module", autouse=True)
def _stop_forkserver():
    """Stop the forkserver when the module is done (it would otherwise linger until exit)."""
    yield
    from multiprocessing import forkserver

    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 2-process run and one single-process run of the same compression."""
    from toolkit import compress

    tmp = tmp_path_factory.mktemp("dist")
    status = _launch("match", tmp)
    assert status[0] == "ok" and status[1] == "ok", status
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: float reductions in the same order
    model, ids = _model_and_ids()
    single = {"H64": _hessian(model, ids, torch.float64), "H32": _hessian(model, ids, torch.float32)}
    report = compress(model, calibration=ids, **CONFIG)
    single.update(_snapshot(model, report))
    torch.set_num_threads(threads)
    return single, ranks


def test_all_reduced_hessian_equals_single_process(runs):
    single, ranks = runs
    for r in ranks:
        assert r["H64"][1] == single["H64"][1] == 8 * 32  # every token counted once
        torch.testing.assert_close(r["H64"][0], single["H64"][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["H32"][0], single["H32"][0], rtol=1e-5, atol=1e-6)


def test_compressed_weights_match_single_process(runs):
    single, ranks = runs
    assert ranks[0]["processes"] == WORLD
    worst = _assert_same_model(single, ranks)
    print(f"max |W_2proc - W_1proc| = {worst:.3g}")


def _assert_same_model(single: dict, ranks: list[dict]) -> float:
    """Weights and records of every rank equal the single-process ones (float64 round-off),
    every rank's bit-identical; returns the largest weight difference."""
    worst = 0.0
    for key, w in single["state"].items():
        for r in ranks:
            d = (r["state"][key] - w).abs()
            worst = max(worst, float(d.max()))
            assert float(d.max()) <= ATOL, (key, float(d.max()))
        # every rank holds exactly the same model
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    assert single["comp"].keys() == ranks[0]["comp"].keys() == ranks[1]["comp"].keys()
    for name, (scale, zero, err) in single["comp"].items():
        for r in ranks:
            s, z, e = r["comp"][name]
            torch.testing.assert_close(s, scale, rtol=1e-6, atol=0)
            assert torch.equal(z, zero), name
            assert e == pytest.approx(err, rel=1e-9, abs=1e-12)
    return worst


def test_every_rank_has_the_single_process_report(runs):
    single, ranks = runs
    for r in ranks:
        assert r["layers"]["layer"] == single["layers"]["layer"]
        assert r["layers"]["sparsity"] == single["layers"]["sparsity"]
        assert r["layers"]["block"] == single["layers"]["block"]


def test_asymmetric_targets_and_reconstruction_under_two_processes(tmp_path):
    """Asymmetric targets: the cross term is all-reduced like the Hessian, so 2 processes give
    the single process's model (float64 round-off). Block reconstruction: every rank takes the
    same steps (gradients averaged), so the ranks hold bit-identical weights and report the
    same block errors, each block's error no higher than before; its steps see each rank's own
    windows, so it is not compared with one process's steps."""
    from toolkit import compress

    status = _launch("asym", tmp_path, wait_s=240)
    assert status[0] == "ok" and status[1] == "ok", status
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, ids = _model_and_ids()
    report = compress(model, calibration=ids, asymmetric=True, **CONFIG)
    torch.set_num_threads(threads)
    _assert_same_model(_snapshot(model, report), ranks)
    a, b = (r["recon"] for r in ranks)
    for key, w in a["state"].items():
        assert torch.equal(w, b["state"][key]), key
    assert a["layers"]["block_error_after"] == b["layers"]["block_error_after"]
    assert all(x <= y for x, y in zip(a["layers"]["block_error_after"],
                                      a["layers"]["block_error_before"]))
    assert sum(a["layers"]["block_error_after"]) < sum(a["layers"]["block_error_before"])


def test_moe_experts_match_single_process(tmp_path):
    """Fused expert slices spread over the ranks: their weights broadcast, their records (on the
    experts module) gathered, the routed token counts summed over the ranks' windows."""
    from toolkit import compress

    status = _launch("moe", tmp_path, wait_s=300)
    assert status[0] == "ok" and status[1] == "ok", status
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _moe64()
    single = _moe_snapshot(model, compress(model, calibration=random_ids(8, 32), **CONFIG))
    torch.set_num_threads(threads)
    assert len(single["comp"]) == 2 * 4 * 3
    _assert_same_model(single, ranks)
    for r in ranks:
        for col in ("layer", "tokens", "hessian", "sparsity"):
            assert list(map(str, r["layers"][col])) == list(map(str, single["layers"][col])), col


def test_a_failing_rank_fails_all_ranks_with_its_error(tmp_path):
    status = _launch("raise", tmp_path)
    assert not status["hung"]
    for r in range(WORLD):
        assert status[r] is not None and status[r].startswith("ValueError"), status[r]
        assert "simulated solver failure" in status[r]
        assert "raised on rank 1 of 2" in status[r]


def test_a_rank_that_never_arrives_times_out(tmp_path):
    t0 = time.monotonic()
    status = _launch("hang", tmp_path, timeout_s=5, wait_s=60, stop_after=0)
    assert status[0] is not None and status[0].startswith("DistributedError"), status[0]
    assert "rank 0 of 2: summing the Hessian of model.layers.0.self_attn.q_proj failed" in status[0]
    assert "5 s" in status[0] or "process-group timeout" in status[0]
    assert time.monotonic() - t0 < 60


def test_a_killed_rank_makes_the_others_exit(tmp_path):
    status = _launch("killed", tmp_path, timeout_s=20, wait_s=60, stop_after=0)
    assert status[1] is None  # it died silently
    assert status[0] is not None and status[0].startswith("DistributedError"), status[0]
    assert "another rank failed, was killed" in status[0]


def test_without_process_group_nothing_changes():
    from toolkit.walk import distributed

    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    ids = random_ids(3, 8)
    assert distributed.local_share(ids) is ids
    assert distributed.rank_device(torch.device("cuda")) == torch.device("cuda")


def test_assign_spreads_by_cost():
    from toolkit.walk.distributed import assign

    # q (big), k, v (small): q alone on one rank, k and v on the other
    assert assign([100, 25, 25], 2) == [0, 1, 1]
    assert assign([10, 10], 2) == [0, 1]
    assert assign([5], 3) == [0]
