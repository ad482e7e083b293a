"""The one line every benchmark prints and stores with its results: what it ran on.

The scripts in ``bench/`` are run as ``python bench/NAME.py``, so this module is importable as
``_machine`` from them (their folder is first on ``sys.path``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(device: str | torch.device | None = None) -> str:
    """``"Linux 6.8 x86_64 | AMD EPYC ... | 2 usable CPU cores, 24 GiB | Python 3.11, torch 2.13
    (threads 2) | device cpu | load average 1.2, 0.9, 0.8"`` (GPU name and count on CUDA)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        import psutil

        ram = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
    except ImportError:
        ram = ""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        dev = f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()}"
    else:
        dev = str(device)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{platform.system()} {platform.release()} {platform.machine()} | {cpu_name()} | "
            f"{cores} usable CPU cores{ram} | Python {platform.python_version()}, torch "
            f"{torch.__version__} (threads {torch.get_num_threads()}) | device {dev} | "
            f"load average {load}")


def add_threads_flag(parser, default: int = 1) -> None:
    """``--threads N``: the torch CPU thread count every benchmark sets and records (results at
    small calibration sizes move with it, since it changes the float summation order)."""
    parser.add_argument("--threads", type=int, default=default,
                        help=f"torch CPU threads, set before anything runs and recorded with the "
                             f"results (default {default})")


def apply_threads(args) -> int:
    """Set the thread count of ``--threads`` and return it."""
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    return torch.get_num_threads()


WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wikitext2"  # bundled (data/README.md)


def add_text_flags(parser) -> None:
    """The calibration and evaluation flags the SmolLM2 benches share: the bundled WikiText-2
    validation text for calibration, its test text for perplexity, and the window sizes."""
    parser.add_argument("--calibration", default=str(WIKITEXT / "wiki.valid.tokens"),
                        help="calibration text (default: WikiText-2 validation)")
    parser.add_argument("--eval-text", default=str(WIKITEXT / "wiki.test.raw"),
                        help="evaluation text (default: WikiText-2 test, raw)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=512)


def smollm2_wikitext(nsamples: int, seqlen: int):
    """SmolLM2-135M in float32 and the bundled WikiText-2: ``(model, tokenizer, dense state,
    calibration ids, test ids)``. Calibration: ``nsamples`` x ``seqlen`` tokens of
    ``wiki.valid.tokens`` (seed 0); test: ``wiki.test.raw`` with ``\\r\\n`` normalised."""
    import copy

    from toolkit import load_model
    from toolkit.measure.text import get_calibration, tokenize_text

    model, tok = load_model("smollm2", dtype=torch.float32)
    dense = copy.deepcopy(model.state_dict())
    calib = get_calibration(str(WIKITEXT / "wiki.valid.tokens"), tok, nsamples=nsamples,
                            seqlen=seqlen, seed=0)
    text = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    return model, tok, dense, calib, tokenize_text(tok, text)
