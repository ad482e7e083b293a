"""GGUF out on SmolLM2: round to nearest into each GGUF type against the solver (GPTQ) on the
same grids, each written with ``save_gguf`` and read back.

    python bench/gguf_out.py --nsamples 8 --seqlen 256 --eval-windows 8 --eval-seqlen 256 --threads 1

For each target (Q4_1, Q4_0, Q4_K, Q3_K, Q2_K as plain types, every layer in that type as
``llama-quantize --pure`` does; Q4_K_M as llama.cpp's preset), three ways to put SmolLM2-135M
on the target's grids, all through ``compress(model, tok, gguf=TARGET, ...)`` so that every
layer gets the same type and the embeddings the same treatment:

* ``rtn-ref``: round to nearest by the ``gguf`` package's quantizer (llama.cpp's reference
  rounding, no importance matrix) for every tensor whose type it quantizes (Q4_0, Q4_1, Q5_0,
  Q5_1, Q8_0), the toolkit's round to nearest for the K-quant tensors it has no quantizer for
  (``ref_share``: the fraction of the rounded weights the package rounded);
* ``rtn``: the toolkit's round to nearest on the same grids (``quant="rtn"``: each block's scale
  searched for the smallest squared error);
* ``gptq``: the solver's sweep on the same grids (``quant="gptq"``); the output head (SmolLM2:
  the tied embedding matrix) solved on the Hessian of the final hidden states when it is
  rounded at all.

Each model is written with ``save_gguf`` (its tokenizer taken over from SmolLM2's GGUF file), the
file's every tensor compared with the model's weight after ``gguf.quants.dequantize``
(``verify_max_diff``, 0 = bit for bit) and the file loaded by transformers
(``from_pretrained(..., gguf_file=...)``), whose logits on the first evaluation window are
compared with the in-memory model's (``logits_max_diff``). Perplexity on the evaluation windows;
``file_bytes`` the whole file; ``layer_bits`` the bits per weight of the block layers' tensors.

SmolLM2's hidden size is 576, not a multiple of 256: under a K-quant target every layer but
``down_proj`` takes llama.cpp's fallback type (Q4_K -> Q5_0, Q3_K and Q2_K -> Q4_0), and its tied
embedding matrix is Q8_0 under the preset (as in its own file, where it is already on that grid
and stays unchanged) or the plain type's fallback. Its weights were stored as Q4_1 blocks of 32
in the GGUF file it is loaded from, so the Q4_1 target is nearly lossless for any method: it is
reported, and not a test of the solver. llama.cpp itself reads such files in
``bench/llama_cpp.py``. Writes ``data/results/gguf_smollm2.csv`` (rewritten whole after
each row, so that a run cut short leaves the rows it finished; a complete file has 19 rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import add_text_flags, add_threads_flag, apply_threads, describe

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["Q4_1", "Q4_0", "Q4_K", "Q3_K", "Q2_K", "Q4_K_M"]
METHODS = ["rtn-ref", "rtn", "gptq"]
REFERENCE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # types the gguf package quantizes


def reference_rounding(model, base) -> float:
    """Replace every tensor ``compress(quant="rtn", gguf=...)`` rounded to a type the gguf
    package quantizes by the package's own rounding of the original weight (``base``: the model
    before compression). Returns the fraction of rounded weights replaced."""
    import gguf
    import numpy as np

    originals = dict(base.named_modules())
    done = total = 0
    for name, module in model.named_modules():
        comp = getattr(module, "compression", None)
        grid = getattr(comp, "gguf", None) if comp is not None else None
        holder = "record"
        if grid is None:
            grid, holder = getattr(module, "toolkit_gguf", None), "module"
        if grid is None:
            continue
        qtype = grid if isinstance(grid, str) else grid.type.name
        n = module.weight.numel()
        total += n
        if qtype not in REFERENCE or isinstance(grid, str):
            continue  # a K-quant (no reference quantizer), or already on its grid unchanged
        qt = gguf.GGMLQuantizationType[qtype]
        w = originals[name].weight.detach().float().numpy()
        ref = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).reshape(w.shape)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(ref)))
        if holder == "record":
            comp.gguf = None
        module.toolkit_gguf = qtype  # save_gguf re-encodes it with the same quantizer, exactly
        done += n
    return done / total if total else 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    add_threads_flag(p)
    p.add_argument("--only", nargs="+", default=TARGETS, help=f"targets (default {TARGETS})")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "gguf_smollm2.csv"))
    args = p.parse_args(argv)
    threads = apply_threads(args)

    import pandas as pd
    from transformers import AutoModelForCausalLM

    from toolkit import compress, load_model, perplexity, save_gguf
    from toolkit.checkpoint.gguf import gguf_tensor_names, source_gguf_path, verify_gguf
    from toolkit.measure.text import get_calibration, tokenize_text

    base, tok = load_model("smollm2", dtype=torch.float32)
    machine = describe("cpu")
    print(machine, flush=True)
    ids = get_calibration(args.calibration, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=0)
    text = Path(args.eval_text).read_text(encoding="utf-8").replace("\r\n", "\n")
    eval_ids = tokenize_text(tok, text)
    windows = min(args.eval_windows, eval_ids.numel() // args.eval_seqlen)
    eval_ids = eval_ids[: windows * args.eval_seqlen]
    first = eval_ids[: args.eval_seqlen][None]
    common = dict(machine=machine, threads=threads, calibration=f"{args.nsamples}x{args.seqlen}",
                  evaluation=f"{windows}x{args.eval_seqlen}")

    rows = []
    ppl = perplexity(base, tok, eval_ids, seqlen=args.eval_seqlen, device="cpu", verbose=False)
    src = source_gguf_path(base)
    rows.append(dict(target="source", method="dense (float32)", perplexity=ppl,
                     file_bytes=src.stat().st_size, layer_bits=None, layer_types="Q4_1 (source)",
                     embeddings="Q8_0 (source)", ref_share=None, compress_seconds=0.0,
                     verify_max_diff=None, logits_max_diff=None, **common))
    print(f"dense: perplexity {ppl:.3f}", flush=True)
    block_names = None
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.only:
            for method in METHODS:
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                report = compress(model, tok, gguf=target,
                                  quant="gptq" if method == "gptq" else "rtn", calibration=ids,
                                  nsamples=args.nsamples, seqlen=args.seqlen, device="cpu",
                                  verbose=False)
                seconds = time.perf_counter() - t0
                share = reference_rounding(model, base) if method == "rtn-ref" else None
                path = Path(tmp) / f"{target}-{method}.gguf"
                summary = save_gguf(model, path, preset=target if "_K_" in target else None)
                diff = max(verify_gguf(path, model).values())
                loaded = AutoModelForCausalLM.from_pretrained(
                    tmp, gguf_file=path.name, dtype=torch.float32).eval()
                with torch.no_grad():
                    logits_diff = float((loaded(first).logits - model(first).logits).abs().max())
                del loaded
                if block_names is None:
                    block_names = [g for g in gguf_tensor_names(model).values()
                                   if g.startswith("blk.")]
                ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen, device="cpu",
                                 verbose=False)
                from gguf import GGUFReader

                reader = GGUFReader(str(path))
                blk = [t for t in reader.tensors if t.name in block_names and t.n_elements > 1
                       and len(t.shape) == 2]
                layer_bits = 8 * sum(int(t.n_bytes) for t in blk) / sum(
                    int(t.n_elements) for t in blk)
                s = report.summary
                rows.append(dict(
                    target=target, method=method, perplexity=ppl, file_bytes=summary.bytes,
                    layer_bits=layer_bits, layer_types=s.get("GGUF types (layers)"),
                    embeddings=summary.tensors.get("token_embd.weight"), ref_share=share,
                    compress_seconds=seconds, verify_max_diff=diff, logits_max_diff=logits_diff,
                    **common))
                print(f"{target:7} {method:8} perplexity {ppl:9.3f}  file {summary.bytes / 1e6:6.2f}"
                      f" MB  layers {layer_bits:.3f} bits  verify {diff}  logits {logits_diff:.2g}"
                      f"  {seconds:.0f}s", flush=True)
                path.unlink()
                del model
                pd.DataFrame(rows).to_csv(args.out, index=False)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
