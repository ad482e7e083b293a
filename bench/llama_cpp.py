"""llama.cpp itself on the toolkit's GGUF files, beside llama.cpp's own quantizer, in one run.

    python bench/llama_cpp.py --build     # once: llama.cpp's tools into build/llama.cpp (minutes)
    python bench/llama_cpp.py             # -> data/results/llama_cpp_smollm2.csv

``--build`` takes the llama.cpp sources that the llama-cpp-python source distribution vendors
(``pip download --no-binary :all: llama-cpp-python==LLAMA_CPP_PYTHON``, from PyPI) and builds
their command-line tools with CMake into ``build/llama.cpp`` (git-ignored): ``llama-quantize``,
``llama-imatrix``, ``llama-perplexity`` and ``llama-completion``. The bindings themselves are not
used: they cannot hand an importance matrix to the quantizer, and the tools are the same library.
Nothing here is an install step of the toolkit or part of CI.

SmolLM2-135M in float32 (its weights came from a Q4_1 GGUF file, i.e. from a 4-bit grid) is
written with ``save_gguf`` (every tensor exactly as loaded) as the common source. For each
target (Q4_0, Q4_K, Q3_K, Q2_K as plain types, every tensor in that type as ``--pure`` asks;
Q4_K_M as llama.cpp's preset), three files:

* ``llama.cpp rtn``: ``llama-quantize`` of the source file (round to nearest, llama.cpp's own
  block fits, no importance matrix);
* ``llama.cpp imatrix``: ``llama-quantize --imatrix`` with the importance matrix that
  ``llama-imatrix`` computed on the same calibration text the toolkit uses;
* ``toolkit gptq``: ``compress(model, tok, gguf=TARGET)`` on the calibration windows, written by
  ``save_gguf``;
* ``toolkit gptq asymmetric`` (with ``--asymmetric``): the same with ``asymmetric=True``;
* ``toolkit effort max`` (with ``--effort-max``): the same with ``effort="max"`` (asymmetric
  targets and block reconstruction, whose fit refits each GGUF block's fp16 scale).

Every file is scored twice: by ``llama-perplexity`` (llama.cpp's own protocol: windows of
``--eval-seqlen`` tokens, each scored on its second half, the first ``--eval-windows`` windows of
``wiki.test.raw``) and by ``toolkit.perplexity`` on the model that transformers loads from the
file (``from_pretrained(..., gguf_file=...)``, every token of the same number of windows). Each
row has the file's size and the tensor types llama.cpp chose; the toolkit's Q4_K_M file also
completes a prompt greedily in ``llama-completion`` (column ``completion``). The calibration
text is the ``--nsamples`` windows of ``--seqlen`` tokens the toolkit calibrates on (seed 0),
decoded and written to a file for ``llama-imatrix``.
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _machine import WIKITEXT, add_threads_flag, apply_threads, describe

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "llama.cpp"
LLAMA_CPP_PYTHON = "0.3.36"  # the source distribution whose vendored llama.cpp is built
TOOLS = ["llama-quantize", "llama-imatrix", "llama-perplexity", "llama-completion"]
TARGETS = ["Q4_0", "Q4_K", "Q3_K", "Q2_K", "Q4_K_M"]
PROMPT = "The capital of France is"


def build(jobs: int) -> Path:
    """Build llama.cpp's tools from llama-cpp-python's source distribution into ``BUILD``."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp, "-q"],
                       check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        shutil.rmtree(BUILD, ignore_errors=True)
        subprocess.run(["cmake", "-S", str(src), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF",
                        # a portable x86 build: the native one (AMX, AVX-512) died with SIGILL in
                        # llama-imatrix on machine B
                        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
                        "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF",
                        "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(BUILD), "-j", str(jobs), "--target", *TOOLS],
                       check=True)
    return BUILD / "bin"


def tool(name: str) -> str:
    path = BUILD / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run python bench/llama_cpp.py --build first")
    return str(path)


def run(cmd: list[str]) -> str:
    """Run a llama.cpp tool; its whole output (stdout and stderr), or an error with its tail."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    out = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({p.returncode}):\n{out[-3000:]}")
    return out


def llama_perplexity(path: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    out = run([tool("llama-perplexity"), "-m", str(path), "-f", str(text), "-c", str(ctx),
               "--chunks", str(chunks), "-t", str(threads), "-b", str(ctx)])
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if m is None:
        raise RuntimeError(f"no final estimate in llama-perplexity's output:\n{out[-2000:]}")
    return float(m.group(1))


def tensor_types(path: Path) -> tuple[str, float]:
    """``("TYPE count, ...", bits per weight)`` over the 2-D tensors of the blocks."""
    from collections import Counter

    from gguf import GGUFReader

    r = GGUFReader(str(path))
    blk = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    types = Counter(t.tensor_type.name for t in blk)
    bits = 8 * sum(int(t.n_bytes) for t in blk) / sum(int(t.n_elements) for t in blk)
    return ", ".join(f"{k} {v}" for k, v in types.most_common()), bits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="build llama.cpp's tools and stop")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--only", nargs="+", default=TARGETS, help=f"targets (default {TARGETS})")
    p.add_argument("--asymmetric", action="store_true",
                   help="also the toolkit's row with asymmetric=True (each layer aims at the "
                   "full-precision model's output from the compressed model's inputs)")
    p.add_argument("--effort-max", action="store_true",
                   help="also the toolkit's row with effort='max' (asymmetric targets and block "
                   "reconstruction)")
    p.add_argument("--skip-plain", action="store_true",
                   help="leave out the row 'toolkit gptq' (with --asymmetric/--effort-max)")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "llama_cpp_smollm2.csv"))
    add_threads_flag(p, default=2)
    args = p.parse_args(argv)
    threads = apply_threads(args)
    if args.build:
        print(f"built into {build(max(threads, 1))}")
        return 0

    import pandas as pd
    from transformers import AutoModelForCausalLM

    from toolkit import compress, load_model, perplexity, save_gguf
    from toolkit.measure.text import get_calibration, tokenize_text

    machine = describe("cpu")
    print(machine, flush=True)
    base, tok = load_model("smollm2", dtype=torch.float32)
    calib = get_calibration(str(WIKITEXT / "wiki.valid.tokens"), tok, nsamples=args.nsamples,
                            seqlen=args.seqlen, seed=0)
    text = (WIKITEXT / "wiki.test.raw").read_text(encoding="utf-8").replace("\r\n", "\n")
    eval_ids = tokenize_text(tok, text)
    common = dict(machine=machine, threads=threads,
                  calibration=f"{args.nsamples}x{args.seqlen}",
                  evaluation=f"{args.eval_windows}x{args.eval_seqlen}",
                  llama_cpp=f"vendored by llama-cpp-python {LLAMA_CPP_PYTHON}")
    rows = []

    def write():  # after every row: a run cut short leaves the rows it finished
        df = pd.DataFrame(rows)
        for col, ratio in (("llama_cpp_perplexity", "llama_cpp_vs_rtn"),
                           ("toolkit_perplexity", "toolkit_vs_rtn")):
            rtn = df[df.method == "llama.cpp rtn"].set_index("target")[col]
            df[ratio] = (df[col] / df.target.map(rtn)).round(4)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(args.out, index=False)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib_txt, test_txt = tmp / "calibration.txt", tmp / "test.txt"
        calib_txt.write_text("\n".join(tok.decode(w) for w in calib), encoding="utf-8")
        test_txt.write_text(text, encoding="utf-8")
        source = tmp / "source.gguf"
        save_gguf(copy.deepcopy(base), source)
        t0 = time.perf_counter()
        run([tool("llama-imatrix"), "-m", str(source), "-f", str(calib_txt), "-o",
             str(tmp / "imatrix.gguf"), "-c", str(args.seqlen), "-b", str(args.seqlen),
             "--chunks", str(args.nsamples), "-t", str(threads), "--no-ppl"])
        imatrix_seconds = time.perf_counter() - t0

        def score(target, method, path, seconds, model=None, completion=None):
            llama_ppl = llama_perplexity(path, test_txt, args.eval_seqlen, args.eval_windows,
                                         threads)
            if model is None:
                model = AutoModelForCausalLM.from_pretrained(
                    tmp, gguf_file=path.name, dtype=torch.float32).eval()
            ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen,
                             max_windows=args.eval_windows, device="cpu", verbose=False)
            types, bits = tensor_types(path)
            rows.append(dict(target=target, method=method, llama_cpp_perplexity=llama_ppl,
                             toolkit_perplexity=ppl, file_bytes=path.stat().st_size,
                             layer_bits=bits, layer_types=types, seconds=round(seconds, 1),
                             completion=completion, **common))
            write()
            print(f"{target:7} {method:18} llama.cpp ppl {llama_ppl:9.3f}  toolkit ppl "
                  f"{ppl:9.3f}  {path.stat().st_size / 1e6:6.2f} MB  {types}", flush=True)

        score("source", "dense (float32)", source, 0.0, model=base)
        for target in args.only:
            pure = [] if "_K_" in target else ["--pure"]
            for method, extra in (("llama.cpp rtn", []),
                                  ("llama.cpp imatrix", ["--imatrix", str(tmp / "imatrix.gguf")])):
                out = tmp / f"{target}-{method.split()[-1]}.gguf"
                t0 = time.perf_counter()
                run([tool("llama-quantize"), "--allow-requantize", *pure, *extra, str(source),
                     str(out), target, str(threads)])
                seconds = time.perf_counter() - t0
                score(target, method, out, seconds + (imatrix_seconds if extra else 0.0))
                out.unlink()

            def toolkit_row(method, options, target=target):
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                compress(model, tok, gguf=target, calibration=calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, device="cpu", verbose=False, **options)
                out = tmp / f"{target}-toolkit.gguf"
                save_gguf(model, out, preset=target if "_K_" in target else None)
                seconds = time.perf_counter() - t0
                completion = None
                if target == "Q4_K_M":
                    try:
                        gen = subprocess.run(
                            [tool("llama-completion"), "-m", str(out), "-p", PROMPT, "-n", "24",
                             "--temp", "0", "-t", str(threads), "-no-cnv", "--no-warmup"],
                            capture_output=True, text=True, timeout=600)
                        completion = (gen.stdout.split(PROMPT, 1)[-1].strip()[:200]
                                      if gen.returncode == 0 else
                                      f"llama-completion failed ({gen.returncode}): "
                                      f"{gen.stderr.strip()[-200:]}")
                    except subprocess.TimeoutExpired:
                        completion = "llama-completion timed out"
                score(target, method, out, seconds, model=model, completion=completion)
                out.unlink()

            if not (args.skip_plain and (args.asymmetric or args.effort_max)):
                toolkit_row("toolkit gptq", {})
            if args.asymmetric:
                toolkit_row("toolkit gptq asymmetric", {"asymmetric": True})
            if args.effort_max:
                toolkit_row("toolkit effort max", {"effort": "max"})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
