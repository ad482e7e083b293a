"""How far rounding-level changes move a compressed SmolLM2: two codes x two thread counts.

    python bench/rounding.py --baseline-commit 358dc45 --nsamples 8 --seqlen 256 \
        --eval-windows 8 --eval-seqlen 256

SparseGPT 50% on SmolLM2-135M with this tree and with an older commit of the package (imported
from ``git archive`` as in ``bench/compress.py``), each with 1 and with 2 torch threads: four
compresses that differ only in the order floats are summed (a thread count changes how matrix
products split their sums; the newer sweep batches windows and forms the Hessian as one product
per batch). For each one: perplexity on the evaluation windows, and the share of mask entries
(zero or not) that differ from the first run (this tree, 1 thread), over all layers and for
block 0's layers one by one, where the differences start. Writes
``data/results/rounding_smollm2.csv``.

SmolLM2's weights were stored on a 4-bit grid (Q4_1, blocks of 32) in its GGUF file and are
dequantized on load.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _machine import add_text_flags, describe
from compress import import_baseline

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_text_flags(p)
    p.add_argument("--baseline-commit", default="358dc45", metavar="COMMIT",
                   help="the older commit whose package is compared (default: 358dc45, before "
                        "the batched sweep)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch thread counts to run each code with")
    p.add_argument("--out", default=str(REPO / "data" / "results" / "rounding_smollm2.csv"))
    args = p.parse_args(argv)

    import pandas as pd

    import toolkit
    from toolkit import load_model, perplexity
    from toolkit.measure.text import get_calibration, tokenize_text

    base, tok = load_model("smollm2", dtype=torch.float32)
    ids = get_calibration(args.calibration, tok, nsamples=args.nsamples, seqlen=args.seqlen,
                          seed=0)
    text = Path(args.eval_text).read_text(encoding="utf-8").replace("\r\n", "\n")
    eval_ids = tokenize_text(tok, text)
    windows = min(args.eval_windows, eval_ids.numel() // args.eval_seqlen)
    eval_ids = eval_ids[: windows * args.eval_seqlen]
    codes = [("this tree", toolkit.compress),
             (f"commit {args.baseline_commit}", import_baseline(args.baseline_commit).compress)]
    rows, first = [], None
    for code, compress in codes:
        for threads in args.threads:
            torch.set_num_threads(threads)
            model = copy.deepcopy(base)
            compress(model, tok, sparsity=0.5, calibration=ids, nsamples=args.nsamples,
                     seqlen=args.seqlen, device="cpu", verbose=False)
            masks = {k: v == 0 for k, v in model.state_dict().items()
                     if ".layers." in k and v.dim() == 2}
            ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen, device="cpu",
                             verbose=False)
            if first is None:
                first = masks
            differ = sum(int((masks[k] != first[k]).sum()) for k in masks)
            total = sum(m.numel() for m in masks.values())
            row = dict(code=code, threads=threads, perplexity=ppl,
                       mask_differ_all=differ / total)
            for k in masks:
                if ".layers.0." in k:
                    row[f"mask_differ_block0_{k.split('.')[-2]}"] = \
                        float((masks[k] != first[k]).float().mean())
            rows.append(row)
            print(f"{code:<16} {threads} thread(s): perplexity {ppl:8.3f}; mask entries "
                  f"differing from the first run {100 * row['mask_differ_all']:.2f}%", flush=True)
            del model
    torch.set_num_threads(args.threads[0])
    df = pd.DataFrame(rows).assign(
        setting=f"SparseGPT 50%, calibration {args.nsamples} x {args.seqlen}, perplexity on "
                f"{windows} x {args.eval_seqlen} WikiText-2 test tokens",
        machine=describe())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False, float_format="%.6g")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
