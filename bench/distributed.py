"""Wall time of ``compress`` on one process against N processes (torch.distributed, gloo on CPU).

    python bench/distributed.py                 # tiny LLaMA, 1 process vs 2, this machine
    python bench/distributed.py --nproc 2 --hidden 512 --nsamples 32

Each configuration runs in fresh processes (the N-process one under ``torchrun``); the time is
that of ``compress`` alone, measured on rank 0 between two barriers (process start-up, imports
and model creation are reported separately as "startup"). The compressed weights of the N-process
run are compared with the first single-process one (max |dW| and the fraction of weights that
differ by more than 1e-5: float-rounding differences -- a different thread count is enough --
flip a few 4-bit rounding ties, and the error compensation then moves the rest of that row a
little). A control row runs one process on the same windows in reverse order (the same
Hessian up to rounding) to show how much of that difference float rounding alone makes. Writes data/results/distributed_cpu.csv (or
distributed_<device>.csv on GPUs).

On a 2-core CPU little gain is expected: one process already uses both cores for its matrix
products, and the 2-process run also computes each block's outputs on half the windows in each
process, while groups of one layer (o_proj, down_proj) are solved by one rank as the other waits.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import describe

REPO = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One process of one measurement (rank 0 writes the result)."""
    t_start = time.perf_counter()
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit import compress
    from toolkit.walk import distributed

    torch.set_num_threads(args.threads)
    distributed.init_from_env(timeout_s=600)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3
                      // 64 * 64, num_hidden_layers=args.blocks, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 1024, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1))
    if args.reverse:  # the same windows in the opposite order: the same Hessian up to rounding
        ids = ids.flip(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if distributed.active():
        distributed.dist.barrier()
    startup = time.perf_counter() - t_start
    t0 = time.perf_counter()
    report = compress(model, calibration=ids, nsamples=args.nsamples, seqlen=args.seqlen,
                      sparsity=0.5, bits=4, device=device, verbose=False)
    if distributed.active():
        distributed.dist.barrier()
    seconds = time.perf_counter() - t0
    if distributed.is_main():
        torch.save({k: v for k, v in model.state_dict().items() if "layers" in k},
                   Path(args.out).with_suffix(".pt"))
        Path(args.out).write_text(json.dumps(dict(
            seconds=seconds, startup=startup, processes=distributed.world_size(),
            layers=len(report.layers), device=report.summary["device"],
            params=sum(p.numel() for p in model.parameters()))))


def run_one(args, nproc: int, threads: int, out: Path, reverse: bool = False) -> dict:
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                f"--master_port={args.port}"]
    cmd += [str(Path(__file__).resolve()), "--worker", "--out", str(out), "--threads", str(threads),
            "--hidden", str(args.hidden), "--blocks", str(args.blocks),
            "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    cmd += ["--reverse"] if reverse else []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    res = json.loads(out.read_text())
    res["wall"] = time.perf_counter() - t0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (2)")
    p.add_argument("--hidden", type=int, default=384, help="hidden size of the tiny LLaMA (384)")
    p.add_argument("--blocks", type=int, default=4, help="decoder blocks (4)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (16)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per window (256)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting; the best counts")
    p.add_argument("--port", type=int, default=29517, help="torchrun master port")
    p.add_argument("--single-threads", default=None,
                   help="thread counts of the 1-process runs on CPU, e.g. 1,2 (default: 1 and all "
                        "cores)")
    p.add_argument("--csv", default=None, help="output table (data/results/distributed_cpu.csv)")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count()
    if gpus:
        settings = [(1, 1, False), (1, 1, True), (min(args.nproc, gpus), 1, False)]
    else:  # the same cores in every setting: 1 process x all threads, N processes x cores/N
        single = [int(t) for t in args.single_threads.split(",")] if args.single_threads \
            else sorted({1, cores})
        settings = [(1, t, False) for t in single] + [(1, single[0], True)] + [
            (args.nproc, max(1, cores // args.nproc), False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = None
        for nproc, threads, reverse in settings:
            best = None
            tag = f"{nproc}_{threads}_{int(reverse)}"
            for r in range(1 if reverse else args.repeats):
                res = run_one(args, nproc, threads, Path(tmp) / f"r{tag}_{r}.json", reverse)
                if best is None or res["seconds"] < best["seconds"]:
                    best = res
            state = torch.load(Path(tmp) / f"r{tag}_0.pt")
            if ref is None:
                ref = state
            diff = max(float((state[k] - ref[k]).abs().max()) for k in ref)
            changed = sum(int(((state[k] - ref[k]).abs() > 1e-5).sum()) for k in ref) / sum(
                ref[k].numel() for k in ref)
            rows.append(dict(machine=describe(), model=f"llama h{args.hidden} x{args.blocks} "
                             f"({best['params'] / 1e6:.1f}M)", calibration=f"{args.nsamples}x"
                             f"{args.seqlen}", method="sparsegpt 50% + gptq 4-bit g128",
                             device=best["device"], processes=nproc, threads_per_process=threads,
                             windows="reversed (control)" if reverse else "as drawn",
                             compress_s=round(best["seconds"], 2), startup_s=round(best["startup"], 2),
                             wall_s=round(best["wall"], 2), max_abs_diff_vs_1proc=f"{diff:.2g}",
                             frac_weights_changed=f"{changed:.2g}"))
    base = rows[0]["compress_s"]
    best_single = min(r["compress_s"] for r in rows if r["processes"] == 1 and
                      r["windows"] == "as drawn")
    for r in rows:
        r["speedup_vs_1proc_1thread"] = round(base / r["compress_s"], 2)
        r["speedup_vs_best_1proc"] = round(best_single / r["compress_s"], 2)
    cols = list(rows[0])
    print(f"machine: {rows[0]['machine']}; model {rows[0]['model']}; calibration "
          f"{rows[0]['calibration']}; best of {args.repeats}")
    print(f"{'processes':>9} {'threads':>7} {'windows':>19} {'compress s':>10} {'startup s':>9} "
          f"{'speedup':>8} {'vs best 1p':>10} {'max |dW|':>9} {'changed':>8}")
    for r in rows:
        print(f"{r['processes']:>9} {r['threads_per_process']:>7} {r['windows']:>19} "
              f"{r['compress_s']:>10.2f} "
              f"{r['startup_s']:>9.2f} {r['speedup_vs_1proc_1thread']:>8.2f} "
              f"{r['speedup_vs_best_1proc']:>10.2f} {r['max_abs_diff_vs_1proc']:>9} "
              f"{r['frac_weights_changed']:>8}")
    out = Path(args.csv) if args.csv else REPO / "data" / "results" / (
        "distributed_cpu.csv" if not gpus else "distributed_gpu.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"table: {out}")


if __name__ == "__main__":
    main()
