"""Benchmark the whole compress() on SmolLM2-135M: time, peak memory and perplexity per setting.

    python bench/compress.py                       # CPU-sized: 32 x 512 calibration tokens
    python bench/compress.py --nsamples 128 --seqlen 2048 --device cuda   # the papers' setting
    python bench/compress.py --threads 2 --only "SparseGPT 50%" --baseline-commit 5bf2591 \
        --out data/results/speed_smollm2.csv     # this tree against an older commit, side by side

Time is reported as a ratio: compress seconds over the seconds of one plain forward of the same
calibration windows through the dense model (one window at a time, no gradients), measured in
the same process right before each compress, so that a shared machine's load cancels out as
far as it can. Both wall-clock and CPU-time ratios are stored (this process's CPU seconds move
far less than wall-clock seconds when other jobs compete for the cores).

Rows: dense / magnitude / Wanda / SparseGPT at 50%, 60%, 70%, 2:4 / RTN and GPTQ at 4 and 3 bits
(g128) / SparseGPT 50% + GPTQ 4-bit. Every row uses the same calibration windows (WikiText-2
validation, bundled in data/wikitext2) and
the same evaluation windows (WikiText-2 test, else python-docs test split). Peak memory is the
process RSS sampled every 20 ms during compress() (above the RSS before it), and CUDA max
allocated on a GPU. Writes data/results/smollm2.csv (or --out).

SmolLM2's weights were stored on a 4-bit grid (Q4_1, blocks of 32) in its GGUF file and are
dequantized on load: 4-bit results start from weights that were already 4-bit.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import io
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch
from _machine import describe

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO / "data" / "wikitext2"  # bundled (data/README.md); toolkit.measure.text.bundled_wikitext2

CONFIGS = [
    ("magnitude 50%", dict(sparsity=0.5, method="magnitude")),
    ("SparseGPT 50% (parallel schedule)", dict(sparsity=0.5, schedule="parallel")),
    ("SparseGPT 50% (one window at a time, nothing kept)", dict(sparsity=0.5, sweep_memory_mb=0)),
    ("Wanda 50%", dict(sparsity=0.5, method="wanda")),
    ("SparseGPT 50%", dict(sparsity=0.5)),
    ("SparseGPT 60%", dict(sparsity=0.6)),
    ("SparseGPT 70%", dict(sparsity=0.7)),
    ("SparseGPT 2:4", dict(pattern="2:4")),
    ("RTN 4-bit g128", dict(bits=4, quant="rtn")),
    ("GPTQ 4-bit g128", dict(bits=4)),
    ("RTN 3-bit g128", dict(bits=3, quant="rtn")),
    ("GPTQ 3-bit g128", dict(bits=3)),
    ("SparseGPT 50% + GPTQ 4-bit g128", dict(sparsity=0.5, bits=4)),
]


class PeakRSS:
    """Samples this process's RSS in a thread; ``peak - start`` is the extra memory used."""

    def __init__(self, every: float = 0.02):
        self.proc = psutil.Process()
        self.every = every

    def __enter__(self):
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def import_baseline(commit: str):
    """The package ``toolkit`` as it was at ``commit`` of this repository, imported under the name
    ``toolkit_baseline`` from a temporary folder (``git archive``), next to this tree's."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", commit, "toolkit"],
                         capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="toolkit-baseline-"))
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(folder, filter="data")
    (folder / "toolkit").rename(folder / "toolkit_baseline")
    sys.path.insert(0, str(folder))
    return importlib.import_module("toolkit_baseline")


def forward_seconds(model, ids, device) -> tuple[float, float]:
    """Wall and CPU seconds of one plain forward of every window, one at a time."""
    model.to(device)
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        for row in ids:
            model(row[None].to(device), use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0


def main(argv=None) -> int:
    import toolkit
    from toolkit import load_model, perplexity
    from toolkit.checkpoint.size import model_bytes
    from toolkit.measure.text import get_calibration, tokenize_text

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--only", nargs="*", help="run only the rows whose name contains one of these")
    p.add_argument("--exact", action="store_true",
                   help="--only names whole row names (e.g. \"SparseGPT 50%%\" alone)")
    p.add_argument("--baseline-commit", default=None, metavar="COMMIT",
                   help="also run each row with the toolkit of this commit, side by side")
    p.add_argument("--repeats", type=int, default=1, help="run every row this many times")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "smollm2.csv"))
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    codes = [("this tree", toolkit.compress)]
    if args.baseline_commit:
        codes.append((f"commit {args.baseline_commit}",
                      import_baseline(args.baseline_commit).compress))

    base, tok = load_model("smollm2", dtype=torch.float32)
    valid, test = WIKITEXT / "wiki.valid.tokens", WIKITEXT / "wiki.test.raw"
    calib_text = valid.read_text(encoding="utf-8")
    eval_text = test.read_text(encoding="utf-8").replace("\r\n", "\n")
    data = "WikiText-2 (validation for calibration, test for perplexity)"
    calib = get_calibration(calib_text, tok, nsamples=args.nsamples, seqlen=args.seqlen)
    eval_ids = tokenize_text(tok, eval_text)
    machine = describe(device)
    print(f"machine: {machine}\ndata: {data}\ncalibration: {args.nsamples} x {args.seqlen} "
          f"tokens; evaluation: {args.eval_windows} x {args.eval_seqlen} tokens\n"
          "SmolLM2-135M weights came from a 4-bit GGUF grid (Q4_1, blocks of 32).", flush=True)

    def ppl(model):
        model.to(device)
        return perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen,
                          max_windows=args.eval_windows, device=device, verbose=False)

    rows = [dict(setting="dense", code="-", repeat=0, perplexity=ppl(base), compress_seconds=0.0,
                 forward_seconds=float("nan"), ratio=float("nan"), cpu_ratio=float("nan"),
                 peak_rss_mb=0.0, cuda_max_alloc_mb=0.0, mb=model_bytes(base)["bytes"] / 1e6,
                 bits_per_weight=16.0)]
    print(rows[-1], flush=True)
    base.cpu()
    for name, kw in CONFIGS:
        if args.only and not any(o.lower() == name.lower() if args.exact else
                                 o.lower() in name.lower() for o in args.only):
            continue
        for repeat in range(args.repeats):
            for code, compress in codes:
                if code != "this tree" and not _accepts(compress, kw):
                    continue  # an option the older code does not have
                fwd, fwd_cpu = forward_seconds(base, calib, device)
                base.cpu()
                model = copy.deepcopy(base)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with PeakRSS() as mem:
                    t0, c0 = time.perf_counter(), time.process_time()
                    compress(model, tok, calibration=calib, nsamples=args.nsamples,
                             seqlen=args.seqlen, device=str(device), verbose=False, **kw)
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                size = model_bytes(model)
                rows.append(dict(
                    setting=name, code=code, repeat=repeat, perplexity=ppl(model),
                    compress_seconds=seconds, forward_seconds=fwd, ratio=seconds / fwd,
                    cpu_ratio=cpu / fwd_cpu, peak_rss_mb=(mem.peak - mem.start) / 2**20,
                    cuda_max_alloc_mb=(torch.cuda.max_memory_allocated(device) / 2**20
                                       if device.type == "cuda" else 0.0),
                    mb=size["bytes"] / 1e6, bits_per_weight=size["bits_per_weight"]))
                print(rows[-1], flush=True)
                del model
    df = pd.DataFrame(rows)
    df["threads"] = torch.get_num_threads()
    df["machine"] = machine
    df["calibration"] = f"{args.nsamples}x{args.seqlen}"
    df["evaluation"] = f"{args.eval_windows}x{args.eval_seqlen}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:.2f}".format):
        print(df.drop(columns=["machine", "calibration", "evaluation"]).to_string(index=False))
    print(f"wrote {args.out}")
    return 0


def _accepts(compress, kw: dict) -> bool:
    """Whether an older ``compress`` knows every option in ``kw``."""
    try:
        config = inspect.signature(compress).parameters
        if any(k not in config for k in kw) and "kwargs" in config:
            module = sys.modules[compress.__module__.rsplit(".", 1)[0] + ".options"]
            names = {o.name for o in module.OPTIONS}
            return all(k in names for k in kw)
    except (KeyError, AttributeError, ValueError):
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
