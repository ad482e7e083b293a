"""Peak host memory of streaming (``compress_streaming``) against the in-memory path, on a model
whose size is dominated by its blocks (where streaming pays off most).

    python bench/stream.py                                   # ~0.9 GB LLaMA, 16 blocks of 1024
    python bench/stream.py --hidden 2048 --intermediate 5632 --blocks 24   # ~4.6 GB

A LLaMA with random weights (seed 0) of the given shape is written as safetensors shards; then
two fresh processes compress it with the same settings and the same calibration token ids:

- ``stream``: ``toolkit.walk.stream.compress_streaming(folder, out)``;
- ``memory``: ``from_pretrained`` + ``toolkit.compress`` + ``toolkit.save_compressed``.

Each process reports its peak resident memory (Linux ``VmHWM``) and the resident memory it had
after importing torch, transformers and compressed-tensors, before touching the model (the
same in both: the libraries). The table gives both, the model's share (peak minus libraries)
and the ratio stream / memory of that share, and checks that both checkpoints hold bitwise the
same tensors. Writes data/results/stream_memory.csv (or --out). Random weights: the memory and
time do not depend on the values, the accuracy does and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pandas as pd
import torch
from _machine import describe

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys, time
    import psutil, torch
    import transformers, compressed_tensors.compressors, compressed_tensors.quantization
    import toolkit, toolkit.walk.stream
    from transformers import AutoModelForCausalLM
    mode, src, out, ids, kw = sys.argv[1:6]
    kw = json.loads(kw)
    ids = torch.load(ids)
    torch.set_num_threads(int(kw.pop("threads")))
    base = psutil.Process().memory_info().rss
    t = time.time()
    if mode == "stream":
        toolkit.walk.stream.compress_streaming(src, out, calibration=ids, verbose=False, **kw)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        rep = toolkit.compress(model, calibration=ids, verbose=False, **kw)
        toolkit.save_compressed(model, out, report=rep)
    seconds = time.time() - t
    peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
    print("RESULT " + json.dumps({"baseline": base, "peak": peak, "seconds": seconds}))
""")


def build(folder: Path, args) -> int:
    """Write the random LLaMA to ``folder`` (shards of ``--shard-mb``); its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.blocks, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=max(2048, args.seqlen),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size=f"{args.shard_mb}MB")
    return n


def run(mode: str, src: Path, out: Path, ids: Path, kw: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(kw["threads"]))
    r = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), str(ids),
                        json.dumps(kw)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the {mode} process failed:\n{r.stderr[-4000:]}")
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def same_tensors(a: Path, b: Path) -> bool:
    """Whether the checkpoints ``a`` and ``b`` hold the same tensor names with equal bytes
    (read one tensor at a time)."""
    from safetensors import safe_open

    def index(folder):
        where = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                where.update({k: f for k in h.keys()})
        return where

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return False
    for k in ia:
        with safe_open(str(ia[k]), framework="pt") as ha, safe_open(str(ib[k]), framework="pt") as hb:
            x, y = ha.get_tensor(k), hb.get_tensor(k)
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
    return True


def main(argv=None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--shard-mb", type=int, default=200, help="source shard size (MB)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workdir", default=None,
                   help="where the model and both checkpoints are written (default: a "
                        "temporary folder, removed at the end)")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "stream_memory.csv"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)  # the children's count, so the machine line says it
    machine = describe()
    print(f"machine: {machine}", flush=True)
    tmp = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="toolkit-stream-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        src = tmp / "model"
        if src.exists():
            shutil.rmtree(src)
        t = time.time()
        n_params = build(src, args)
        weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        print(f"model: LLaMA h{args.hidden} i{args.intermediate} x{args.blocks} blocks, vocab "
              f"{args.vocab}: {n_params / 1e6:.1f}M parameters, {weights / 2**20:.0f} MiB of "
              f"float32 weights in {len(list(src.glob('*.safetensors')))} shards "
              f"({time.time() - t:.0f} s to write)", flush=True)
        ids = tmp / "ids.pt"
        torch.manual_seed(1)
        torch.save(torch.randint(0, args.vocab, (args.nsamples, args.seqlen)), ids)
        kw = dict(sparsity=args.sparsity, bits=args.bits, nsamples=args.nsamples,
                  seqlen=args.seqlen, threads=args.threads)
        res = {}
        for mode in ("stream", "memory"):
            out = tmp / f"out-{mode}"
            if out.exists():
                shutil.rmtree(out)
            res[mode] = run(mode, src, out, ids, kw)
            r = res[mode]
            print(f"{mode}: peak {r['peak'] / 2**20:.0f} MiB, libraries "
                  f"{r['baseline'] / 2**20:.0f} MiB, {r['seconds']:.0f} s", flush=True)
        equal = same_tensors(tmp / "out-stream", tmp / "out-memory")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)

    share = {m: r["peak"] - r["baseline"] for m, r in res.items()}
    rows = [dict(mode=m, params_M=round(n_params / 1e6, 1), weights_MiB=round(weights / 2**20),
                 peak_MiB=round(r["peak"] / 2**20), libraries_MiB=round(r["baseline"] / 2**20),
                 model_share_MiB=round(share[m] / 2**20), seconds=round(r["seconds"], 1))
            for m, r in res.items()]
    df = pd.DataFrame(rows)
    df["share_vs_memory"] = [round(share[m] / share["memory"], 3) for m in res]
    df["peak_vs_memory"] = [round(r["peak"] / res["memory"]["peak"], 3) for r in res.values()]
    df["bitwise_equal"] = equal
    df["setting"] = (f"sparsity {args.sparsity} + {args.bits}-bit g128, calibration "
                     f"{args.nsamples} x {args.seqlen} random token ids")
    df["machine"] = machine
    print(df.drop(columns=["setting", "machine"]).to_string(index=False))
    print(f"streaming needs {df.share_vs_memory[0]:.0%} of the in-memory path's memory above the "
          f"libraries ({df.peak_vs_memory[0]:.0%} of its whole peak); checkpoints bitwise equal: "
          f"{equal}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return df


if __name__ == "__main__":
    main()
