"""Benchmark of the shared layer solver: seconds and reconstruction error per method and shape.

For each weight shape (rows x cols) the script builds a Hessian ``H = 2/n X^T X`` from random but
correlated inputs (``X = randn(n, cols) @ mixing``, ``n = 2 * cols``; or, with ``--real``, from
SmolLM2-135M's own activations where the shape matches one of its layers) and a weight, then times

* the solver: SparseGPT 50%, SparseGPT 2:4, GPTQ 4-bit (group 128), joint 50% + 4-bit (group 128),
  each with the Hessian already factorised (the factorisation is timed on its own row, since
  layers that read the same input share it);
* the baselines on the same grids and masks: magnitude 50%, Wanda 50%, round-to-nearest 4-bit.

The error column is ``tr(dW H dW^T) = 2/n ||(W - W_new) X||^2`` (``toolkit.solver.hessian.reconstruction_error``)
and ``rel_error`` divides it by ``tr(W H W^T)``. The solver's arithmetic rate (estimated FLOPs /
seconds) is compared with the machine's float32 matmul rate for a cols x cols @ cols x cols
product, measured in the same run. ``joint / prune`` is the cost of quantizing while pruning in
the same sweep (target <= 1.3).

Methods are timed in interleaved rounds (best of ``--repeats``). Besides wall-clock seconds the
CPU columns give this process's CPU time (and the FLOP fraction against the matmul's CPU-time
rate): on a machine shared with other jobs they move far less than wall-clock time. The load
average is printed and stored with the results; on a busy machine, ``--threads 1`` avoids the
collapse of multi-threaded kernels that wait for a descheduled thread.

    python bench/solver.py                  # all five shapes on the CPU, writes data/results/solver_cpu.csv
    python bench/solver.py --quick          # skip 4096x4096 and 11008x4096
    python bench/solver.py --device cuda --shapes 4096x4096
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pandas as pd
import torch
from _machine import add_threads_flag, apply_threads, describe

from toolkit.solver.baselines import apply_mask, magnitude_mask, rtn_quantize, wanda_mask
from toolkit.solver.hessian import HessianAccumulator, reconstruction_error
from toolkit.solver.layer import factorize, solve
from toolkit.walk.capture import capture_hessians

DEFAULT_SHAPES = ["576x576", "1536x576", "576x1536", "4096x4096", "11008x4096"]
BIG = {"4096x4096", "11008x4096"}
BLOCK = 128
REPO = Path(__file__).resolve().parents[1]


def parse_shape(s: str) -> tuple[int, int]:
    try:
        rows, cols = (int(p) for p in s.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected ROWSxCOLS like 576x1536, got {s!r}") from None
    return rows, cols


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int):
    """Run ``fn`` ``repeats`` times; return (last result, best seconds)."""
    best = float("inf")
    out = None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def matmul_rate(cols: int, device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """Float32 FLOP/s of a cols x cols @ cols x cols product on ``device``: per wall-clock second
    and per second of this process's CPU time (best of ``repeats``)."""
    a = torch.randn(cols, cols, device=device)
    b = torch.randn(cols, cols, device=device)
    a @ b  # warm-up
    best_cpu = float("inf")
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        _, sec = timed(lambda: a @ b, device, 1)
        best_cpu = min(best_cpu, time.process_time() - c0)
        best = min(best, sec)
    return 2 * cols**3 / best, 2 * cols**3 / max(best_cpu, 1e-9)


def solver_flops(rows: int, cols: int, block: int = BLOCK) -> float:
    """Multiply-adds of one sweep, counted as 2 FLOPs each: the in-block rank-1 updates
    (about rows * cols * block) plus the lazy block updates (about rows * cols^2)."""
    flops = 0.0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        b = i2 - i1
        flops += 2 * rows * (b * (b - 1) / 2)  # W1[:, i+1:] -= err * U1[i, i+1:]
        flops += 2 * rows * b * (cols - i2)  # W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return flops


def synthetic_problem(rows: int, cols: int, device: torch.device, seed: int = 0):
    """A weight and a correlated Hessian: X = randn(n, cols) @ mixing with n = 2 * cols.

    ``mixing`` couples the input channels and gives them unequal scales (a few strong channels,
    as in the activations of real language models).
    """
    g = torch.Generator().manual_seed(seed)
    n = 2 * cols
    scales = torch.exp(0.75 * torch.randn(cols, generator=g))
    mixing = (torch.eye(cols) + torch.randn(cols, cols, generator=g) / cols**0.5) * scales[None, :]
    acc = HessianAccumulator(cols, device=device)
    for chunk in range(0, n, 4096):  # stream X in chunks, as calibration batches would come
        m = min(4096, n - chunk)
        acc.add((torch.randn(m, cols, generator=g) @ mixing).to(device))
    W = (0.02 * torch.randn(rows, cols, generator=g)).to(device)
    return W, acc.H


def smollm2_problems(device: torch.device, nsamples: int = 16, seqlen: int = 256):
    """{(rows, cols): (W, H)} from block 3 of SmolLM2-135M on WikiText-2 validation text."""
    from toolkit.loading import load_model
    from toolkit.measure.text import get_calibration, tokenize_text

    model, tok = load_model("smollm2", dtype=torch.float32)
    path = REPO / "data" / "wikitext2"  # bundled (data/README.md)
    text = (path / "wiki.valid.tokens").read_text(encoding="utf-8")[:400_000]
    ids = get_calibration(tokenize_text(tok, text), nsamples=nsamples, seqlen=seqlen)
    block = model.model.layers[3]
    layers = {"q_proj": block.self_attn.q_proj, "gate_proj": block.mlp.gate_proj,
              "down_proj": block.mlp.down_proj}
    names = {"q_proj": "model.layers.3.self_attn.q_proj", "gate_proj": "model.layers.3.mlp.gate_proj",
             "down_proj": "model.layers.3.mlp.down_proj"}
    got = capture_hessians(model, list(names.values()), ids)
    accs = {k: got[n] for k, n in names.items()}
    return {tuple(m.weight.shape): (m.weight.data.clone().to(device), accs[k].H.to(device))
            for k, m in layers.items()}


def bench_shape(W: torch.Tensor, H: torch.Tensor, device: torch.device, repeats: int):
    """Time every method ``repeats`` times, interleaved (so a busy machine slows all of them
    alike), and keep the best time of each.

    ``seconds`` is wall-clock time; for the solver it is ``SolveResult.seconds`` (the sweep, with
    the factorisation given, without the error evaluation). ``cpu_seconds`` (CPU device only) is
    the CPU time of this process, which a machine shared with other jobs inflates much less; for
    the solver the CPU time of the error evaluation that ``solve`` performs is subtracted.
    """
    rows, cols = W.shape
    cpu = device.type == "cpu"
    ref = float(((W @ H) * W).sum())
    rate, cpu_rate = matmul_rate(cols, device)
    flops = solver_flops(rows, cols)
    F = factorize(H)
    err_cpu = float("inf")
    for _ in range(2):
        c0 = time.process_time()
        reconstruction_error(W, W * 0.5, H)
        err_cpu = min(err_cpu, time.process_time() - c0)

    def measure(fn):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        sync(device)
        return out, time.perf_counter() - t0, time.process_time() - c0

    def run_factorize():
        return measure(lambda: factorize(H))

    def solver(**kw):
        def run():
            res, _, cpu_sec = measure(lambda: solve(W, F, **kw))
            return res, res.seconds, max(cpu_sec - err_cpu, 0.0)
        return run

    def baseline(fn):
        return lambda: measure(fn)

    def mag_then_rtn():
        keep = magnitude_mask(W, 0.5)
        return rtn_quantize(W, 4, 128, keep=keep)[0]

    methods = [
        ("factorize (damped inverse Cholesky)", "factorize", run_factorize),
        ("sparsegpt 50%", "solver", solver(sparsity=0.5)),
        ("sparsegpt 2:4", "solver", solver(pattern=(2, 4))),
        ("gptq 4-bit g128", "solver", solver(bits=4, group_size=128)),
        ("joint 50% + 4-bit g128", "solver", solver(sparsity=0.5, bits=4, group_size=128)),
        ("magnitude 50%", "baseline", baseline(lambda: apply_mask(W, magnitude_mask(W, 0.5)))),
        ("magnitude 2:4", "baseline",
         baseline(lambda: apply_mask(W, magnitude_mask(W, pattern=(2, 4))))),
        ("wanda 50%", "baseline", baseline(lambda: apply_mask(W, wanda_mask(W, H, 0.5)))),
        ("rtn 4-bit g128", "baseline", baseline(lambda: rtn_quantize(W, 4, 128)[0])),
        ("magnitude 50% then rtn 4-bit g128", "baseline", baseline(mag_then_rtn)),
    ]
    best = {name: float("inf") for name, _, _ in methods}
    best_cpu = dict(best)
    last = {}
    for _ in range(repeats):
        for name, _, run in methods:
            out, sec, cpu_sec = run()
            best[name] = min(best[name], sec)
            best_cpu[name] = min(best_cpu[name], cpu_sec)
            last[name] = out
    rows_out = []
    for name, kind, _ in methods:
        out = last[name]
        if kind == "factorize":
            error = float("nan")
        elif kind == "solver":
            error = out.error
        else:
            error = reconstruction_error(W, out, H)
        rows_out.append(dict(
            method=name, kind=kind, seconds=best[name],
            cpu_seconds=best_cpu[name] if cpu else float("nan"),
            error=error, rel_error=error / ref,
            flop_fraction=flops / best[name] / rate if kind == "solver" else float("nan"),
            cpu_flop_fraction=(flops / best_cpu[name] / cpu_rate
                               if kind == "solver" and cpu else float("nan")),
            matmul_gflops=rate / 1e9, solver_gflop=flops / 1e9))
    joint, prune = "joint 50% + 4-bit g128", "sparsegpt 50%"
    ratio = best[joint] / best[prune]
    cpu_ratio = best_cpu[joint] / best_cpu[prune] if cpu else float("nan")
    return rows_out, ratio, cpu_ratio


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                   help="comma-separated ROWSxCOLS (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="skip 4096x4096 and 11008x4096")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing repeats, best kept (default: 3 below 4M weights, else 1)")
    p.add_argument("--real", action="store_true",
                   help="use SmolLM2-135M weights and activations for its shapes (loads the model)")
    add_threads_flag(p)
    p.add_argument("--out", default=None, help="CSV path (default data/results/solver_<device>.csv)")
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    apply_threads(args)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.quick:
        shapes = [s for s in shapes if s not in BIG]
    print(f"machine: {describe(device)}")
    real = smollm2_problems(device) if args.real else {}

    records = []
    summary = []
    for s in shapes:
        rows, cols = parse_shape(s)
        if (rows, cols) in real:
            W, H = real[(rows, cols)]
            source = "smollm2 layer 3"
        else:
            W, H = synthetic_problem(rows, cols, device)
            source = "synthetic"
        repeats = args.repeats or (3 if rows * cols <= 4_000_000 else 1)
        out, ratio, cpu_ratio = bench_shape(W, H, device, repeats)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        for r in out:
            r.update(shape=s, rows=rows, cols=cols, hessian=source, device=device.type,
                     threads=torch.get_num_threads(), load=load, repeats=repeats)
        records += out
        summary.append((s, ratio, cpu_ratio))
        shown = ["method", "seconds", "cpu_seconds", "error", "rel_error", "flop_fraction",
                 "cpu_flop_fraction"]
        df = pd.DataFrame(out)[shown]
        print(f"\n{s} (rows x cols), Hessian: {source}, best of {repeats}; "
              f"float32 matmul {out[0]['matmul_gflops']:.1f} GFLOP/s, "
              f"one sweep ~{out[0]['solver_gflop']:.2f} GFLOP")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-"))
        print(f"joint / prune time: {ratio:.2f} wall, {cpu_ratio:.2f} CPU (target <= 1.3)"
              + ("" if min(ratio, cpu_ratio) <= 1.3 else "  ** above target **")
              + f"; load average now {load:.1f}")

    print("\njoint / prune time per shape (wall, CPU): "
          + ", ".join(f"{s}: {r:.2f}, {c:.2f}" for s, r, c in summary))
    out_path = Path(args.out) if args.out else REPO / "data" / "results" / f"solver_{device.type}.csv"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["device", "shape", "rows", "cols", "hessian", "method", "kind", "seconds",
            "cpu_seconds", "error", "rel_error", "flop_fraction", "cpu_flop_fraction",
            "solver_gflop", "matmul_gflops",
            "threads", "repeats", "load"]
    pd.DataFrame(records)[cols].to_csv(out_path, index=False, float_format="%.6g")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
