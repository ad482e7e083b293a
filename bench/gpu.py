"""One command for a machine with one CUDA GPU: the CUDA tests, then SmolLM2 at the papers' size.

    python bench/gpu.py                  # on a CUDA GPU (about 5 minutes on one H200)
    python bench/gpu.py --cpu-smoke      # no GPU: the same steps on the CPU at tiny sizes
    python bench/gpu.py --cpu-smoke --model tiny --out-dir DIR   # seconds (a random tiny LLaMA)

Steps, each timed:

1. ``pytest -m cuda`` (tests/test_cuda.py: solver, Hessian and sweep on the GPU against the CPU;
   deselected in every other run). A failure is reported and the script goes on, exiting 1 at
   the end.
2. SmolLM2-135M (float32) on the GPU, calibrated on 128 x 2048 tokens of WikiText-2 validation:
   SparseGPT 50%, GPTQ 4-bit g128, and both in one sweep. Per setting: compress seconds (and as
   a ratio to one plain forward of the same calibration windows, measured just before), peak
   GPU memory, perplexity on WikiText-2 test (2048-token windows); per block: seconds and peak
   GPU memory.
3. CPU/GPU agreement of the masks: (a) the same layer problem (block 0's weights and its
   calibration Hessians from the dense model, 128 x 2048 tokens) solved on the GPU and on the
   CPU, SparseGPT 50% and joint: the fraction of mask entries (and codes) that agree; (b) the
   whole compress (SparseGPT 50%) on both devices at 16 x 512 tokens: the mask agreement of
   every layer (block by block it drifts with float rounding) and both perplexities.

Writes ``gpu_compress.csv``, ``gpu_blocks.csv``, ``gpu_agreement.csv`` and ``gpu_tests.txt`` to
``data/results/`` (``--cpu-smoke``: ``gpu_smoke_*`` names, or ``--out-dir``). Without a GPU and
without ``--cpu-smoke`` it says that no GPU is present and exits with status 2.

SmolLM2-135M's weights came from a 4-bit GGUF grid (Q4_1, blocks of 32): 4-bit results start
from weights that were already 4-bit.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from _machine import describe

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext2"

SETTINGS = [
    ("SparseGPT 50%", dict(sparsity=0.5)),
    ("GPTQ 4-bit g128", dict(bits=4, group_size=128)),
    ("SparseGPT 50% + GPTQ 4-bit g128", dict(sparsity=0.5, bits=4, group_size=128)),
]
NO_GPU = ("NO CUDA GPU IS PRESENT on this machine (torch.cuda.is_available() is False): "
          "bench/gpu.py measures a GPU. Run it on a machine with one, or check the script here "
          "with --cpu-smoke.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_cuda_tests(smoke: bool, out: Path) -> tuple[bool, str]:
    """``pytest -m cuda``; in the smoke run the same tests on the CPU."""
    env = dict(os.environ)
    if smoke:
        env["TOOLKIT_CUDA_TEST_DEVICE"] = "cpu"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           str(REPO / "tests" / "test_cuda.py")]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    text = (f"$ {' '.join(cmd[1:])}{' (TOOLKIT_CUDA_TEST_DEVICE=cpu)' if smoke else ''}\n"
            f"exit {r.returncode} after {time.perf_counter() - t0:.0f} s\n{r.stdout[-6000:]}"
            f"{r.stderr[-2000:]}")
    out.write_text(text)
    last = [line for line in r.stdout.strip().splitlines() if line.strip()]
    print(f"[gpu] cuda tests: exit {r.returncode}: {last[-1] if last else '(no output)'}",
          flush=True)
    return r.returncode == 0, text


def tiny_llama():
    """A random 4-block LLaMA (hidden 128) and random token ids: the script's own check."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024)
    return AutoModelForCausalLM.from_config(config).eval()


def forward_seconds(model, ids, device) -> float:
    """Seconds of one plain forward of every window, one at a time."""
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        for row in ids:
            model(row[None].to(device), use_cache=False)
        sync(device)
    return time.perf_counter() - t0


class BlockTimer:
    """Times every ``toolkit.walk.sweep.sweep_block`` call (seconds, peak memory of the device)."""

    def __init__(self, device):
        import toolkit.walk.sweep as sweep

        self.sweep, self.device, self.rows = sweep, device, []
        self.inner = sweep.sweep_block

    def __enter__(self):
        def timed(block, b, *args, **kwargs):
            reset_peak(self.device)
            sync(self.device)
            t0 = time.perf_counter()
            out = self.inner(block, b, *args, **kwargs)
            sync(self.device)
            self.rows.append(dict(block=b, seconds=time.perf_counter() - t0,
                                  peak_gpu_mb=peak_mb(self.device)))
            return out
        self.sweep.sweep_block = timed
        return self

    def __exit__(self, *exc):
        self.sweep.sweep_block = self.inner


def masks_of(model) -> dict[str, torch.Tensor]:
    """The keep-mask of every compressed layer (weight != 0)."""
    from toolkit.model.layers import find_blocks, find_linears

    name, blocks = find_blocks(model)
    return {r.name: (r.get_weight() != 0).cpu() for b, blk in enumerate(blocks)
            for r in find_linears(blk, f"{name}.{b}") if hasattr(r.module, "compression")}


def same_problem_agreement(base, calib, device) -> list[dict]:
    """Block 0's layers: calibration Hessians of the dense model (on ``device``), each solved on
    ``device`` and on the CPU from the same weights and Hessian."""
    from toolkit.model.layers import find_blocks, find_linears
    from toolkit.solver.hessian import reconstruction_error
    from toolkit.solver.layer import solve
    from toolkit.walk.capture import capture_hessians

    name, blocks = find_blocks(base)
    refs = find_linears(blocks[0], f"{name}.0")
    accs = capture_hessians(base, [r.name for r in refs], calib, batch_size=8)
    rows = []
    for r in refs:
        H = accs[r.name].H
        W = r.get_weight().float()
        for label, kw in (("SparseGPT 50%", dict(sparsity=0.5)),
                          ("SparseGPT 50% + GPTQ 4-bit g128",
                           dict(sparsity=0.5, bits=4, group_size=128))):
            on_dev = solve(W.to(device), H.to(device), name=r.name, **kw)
            on_cpu = solve(W.cpu(), H.cpu(), name=r.name, **kw)
            Hc = H.cpu().double()
            err_dev = reconstruction_error(W.cpu(), on_dev.weight.cpu(), Hc)
            err_cpu = reconstruction_error(W.cpu(), on_cpu.weight.cpu(), Hc)
            rows.append(dict(
                kind="same problem", setting=label, layer=r.name,
                mask_agreement=float((on_dev.mask.cpu() == on_cpu.mask).float().mean()),
                code_agreement=(float((on_dev.codes.cpu() == on_cpu.codes).float().mean())
                                if on_cpu.codes is not None else float("nan")),
                error_gpu=err_dev, error_cpu=err_cpu,
                error_ratio=err_dev / err_cpu if err_cpu else float("nan")))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU: run every step on the CPU at tiny sizes (checks this script)")
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"],
                   help="smollm2, or a random tiny LLaMA with random tokens (the smoke test)")
    p.add_argument("--nsamples", type=int, default=None, help="default 128 (smoke: 4)")
    p.add_argument("--seqlen", type=int, default=None, help="default 2048 (smoke: 64)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="perplexity windows (default: the whole WikiText-2 test; smoke: 2)")
    p.add_argument("--agree-nsamples", type=int, default=None, help="default 16 (smoke: 2)")
    p.add_argument("--agree-seqlen", type=int, default=None, help="default 512 (smoke: 64)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda first")
    p.add_argument("--out-dir", default=str(REPO / "data" / "results"))
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available()
    if not gpu and not args.cpu_smoke:
        print(NO_GPU, flush=True)
        return 2
    smoke = args.cpu_smoke
    if smoke and gpu:
        print("[gpu] --cpu-smoke: running on the CPU although a GPU is present", flush=True)
    if smoke:
        print("[gpu] CPU SMOKE RUN: no GPU is used; tiny sizes; the figures say nothing about a "
              "GPU", flush=True)
    device = torch.device("cpu" if smoke else "cuda")
    nsamples = args.nsamples or (4 if smoke else 128)
    seqlen = args.seqlen or (64 if smoke else 2048)
    agree_n = args.agree_nsamples or (2 if smoke else 16)
    agree_len = args.agree_seqlen or (64 if smoke else 512)
    eval_windows = args.eval_windows or (2 if smoke else None)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = "gpu_smoke_" if smoke else "gpu_"
    machine = describe(device)
    print(f"[gpu] machine: {machine}", flush=True)
    t_start = time.perf_counter()
    ok = True

    if not args.skip_tests:
        passed, _ = run_cuda_tests(smoke, out / f"{prefix}tests.txt")
        ok &= passed

    from toolkit import compress, perplexity
    from toolkit.measure.text import get_calibration, tokenize_text

    if args.model == "tiny":
        base, tok = tiny_llama(), None
        g = torch.Generator().manual_seed(0)
        vocab = base.config.vocab_size
        calib = torch.randint(0, vocab, (nsamples, seqlen), generator=g)
        small = calib[:agree_n, :agree_len]
        eval_ids = torch.randint(0, vocab, (4 * seqlen,), generator=g)
        data = "random tokens"
    else:
        from toolkit import load_model

        base, tok = load_model("smollm2", dtype=torch.float32)
        calib_text = (WIKITEXT / "wiki.valid.tokens").read_text(encoding="utf-8")
        calib = get_calibration(calib_text, tok, nsamples=nsamples, seqlen=seqlen)
        small = get_calibration(calib_text, tok, nsamples=agree_n, seqlen=agree_len)
        test_text = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8")
        eval_ids = tokenize_text(tok, test_text.replace("\r\n", "\n"))
        data = "WikiText-2 (validation: calibration; test: perplexity)"
    print(f"[gpu] model {args.model}; calibration {nsamples} x {seqlen}; {data}", flush=True)

    def ppl(model):
        return perplexity(model, tok, eval_ids, seqlen=seqlen, max_windows=eval_windows,
                          device=device, verbose=False)

    base.to(device)
    results = [dict(setting="dense", seconds=0.0, forward_seconds=float("nan"),
                    ratio=float("nan"), peak_gpu_mb=0.0, perplexity=ppl(base))]
    print(f"[gpu] dense perplexity {results[0]['perplexity']:.2f}", flush=True)
    blocks = []
    for label, kw in SETTINGS:
        fwd = forward_seconds(base, calib, device)
        model = copy.deepcopy(base)
        reset_peak(device)
        with BlockTimer(device) as timer:
            sync(device)
            t0 = time.perf_counter()
            compress(model, tok, calibration=calib, nsamples=nsamples, seqlen=seqlen,
                     device=str(device), verbose=False, **kw)
            sync(device)
            seconds = time.perf_counter() - t0
        results.append(dict(setting=label, seconds=seconds, forward_seconds=fwd,
                            ratio=seconds / fwd, peak_gpu_mb=peak_mb(device),
                            perplexity=ppl(model)))
        for r in timer.rows:
            blocks.append(dict(setting=label, **r))
        print(f"[gpu] {label}: {seconds:.1f} s ({seconds / fwd:.2f} x one forward of "
              f"{fwd:.1f} s), peak {results[-1]['peak_gpu_mb']:.0f} MiB, perplexity "
              f"{results[-1]['perplexity']:.2f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- CPU/GPU agreement ----------------------------------------------------------------
    t0 = time.perf_counter()
    agreement = same_problem_agreement(base, calib, device)
    whole = {}
    for dev in (device, torch.device("cpu")):
        model = copy.deepcopy(base).to(dev)
        compress(model, tok, calibration=small, nsamples=agree_n, seqlen=agree_len,
                 device=str(dev), verbose=False, sparsity=0.5)
        whole[dev.type if dev.type == "cpu" else "gpu"] = (masks_of(model), ppl(model.to(device)))
        del model
    key = "gpu" if "gpu" in whole else "cpu"
    for layer, m in whole[key][0].items():
        agreement.append(dict(kind=f"whole compress {agree_n}x{agree_len}",
                              setting="SparseGPT 50%", layer=layer,
                              mask_agreement=float((m == whole["cpu"][0][layer]).float().mean()),
                              perplexity_gpu=whole[key][1], perplexity_cpu=whole["cpu"][1]))
    print(f"[gpu] agreement ({time.perf_counter() - t0:.0f} s): same problem, block 0: masks "
          f"{min(a['mask_agreement'] for a in agreement if a['kind'] == 'same problem'):.4f} "
          f"or more; whole compress: perplexity GPU {whole[key][1]:.2f} vs CPU "
          f"{whole['cpu'][1]:.2f}", flush=True)

    common = dict(machine=machine, model=args.model, calibration=f"{nsamples}x{seqlen}",
                  evaluation=f"{eval_windows or 'all'} x {seqlen}", smoke=smoke)
    frames = {"compress": pd.DataFrame(results), "blocks": pd.DataFrame(blocks),
              "agreement": pd.DataFrame(agreement)}
    for name, df in frames.items():
        for k, v in common.items():
            df[k] = v
        df.to_csv(out / f"{prefix}{name}.csv", index=False)
    total = time.perf_counter() - t_start
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(frames["compress"].drop(columns=list(common)).to_string(index=False))
    print(f"[gpu] wrote {', '.join(f'{prefix}{n}.csv' for n in frames)} to {out} "
          f"in {total:.0f} s{'' if ok else '; THE CUDA TESTS FAILED (see the tests file)'}",
          flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
