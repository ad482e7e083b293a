"""Compress time of a mixture-of-experts model against a dense one of the same size, and the
routed against the all-token expert Hessians.

    python bench/moe.py --threads 2                  # writes data/results/moe_cpu.csv

Two random-weight models with the same vocabulary, attention and total parameter count (the
router's few parameters apart): a Mixtral (``--experts`` experts of MLP width ``--inter``,
top-``--top-k``, fused 3-D expert parameters) and a LLaMA whose one MLP is as wide as all the
experts together. Each setting (SparseGPT 50%, GPTQ 4-bit g128) is timed on fresh copies,
``--repeats`` times, the models taking turns, and the median is kept; the ratio to the dense
model's time per compressed parameter is the figure to read (both measured side by side in one
run, so the machine's load affects them alike).

The Mixtral is also compressed with ``expert_hessian="all"`` (every calibration token feeds every
expert's Hessian; the router still decides the block's output), with the normal calibration and
with a starved one (``--starved`` windows) where some experts receive few or no tokens. Quality
is the relative output error on held-out windows, ``||logits - dense logits||^2 /
||dense logits||^2`` (random weights and random token windows: a measure of how well each
compressed model reproduces its dense original, not of language-model quality).
"""

from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path

from _machine import describe

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"sparsegpt 50%": dict(sparsity=0.5), "gptq 4-bit g128": dict(bits=4, group_size=128)}


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.blocks,
                  num_attention_heads=args.hidden // 32, num_key_value_heads=args.hidden // 32,
                  max_position_embeddings=4096)
    torch.manual_seed(0)
    moe = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=args.inter,
                                           num_local_experts=args.experts,
                                           num_experts_per_tok=args.top_k)).eval()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=args.inter * args.experts)
                             ).eval()
    return moe, dense


def output_error(model, dense, ids) -> float:
    import torch

    num = den = 0.0
    with torch.no_grad():
        for row in ids:
            a = model(row[None]).logits.double()
            b = dense(row[None]).logits.double()
            num += float(((a - b) ** 2).sum())
            den += float((b ** 2).sum())
    return num / den


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=256, help="MLP width of one expert")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--starved", type=int, default=1,
                   help="calibration windows of the starved expert-Hessian comparison")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "data" / "results" / "moe_cpu.csv"))
    args = p.parse_args()

    import torch

    from toolkit import compress
    from toolkit.model.experts import ExpertRef, find_layers
    from toolkit.model.layers import find_blocks

    torch.set_num_threads(args.threads)
    machine = describe("cpu")
    moe, dense = build(args)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.nsamples, args.seqlen), generator=gen)
    held_out = torch.randint(0, args.vocab, (args.eval_windows, args.seqlen), generator=gen)
    name, blocks = find_blocks(moe)
    expert_params = sum(r.get_weight().numel() for b, blk in enumerate(blocks)
                        for r in find_layers(blk) if isinstance(r, ExpertRef))
    totals = {"moe": sum(p.numel() for p in moe.parameters()),
              "dense": sum(p.numel() for p in dense.parameters())}
    print(machine)
    print(f"parameters: moe {totals['moe']:,} (experts {expert_params:,}), "
          f"dense {totals['dense']:,}")

    def run(model, calib, **kw):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        report = compress(m, calibration=calib, nsamples=calib.shape[0], seqlen=args.seqlen,
                          verbose=False, device="cpu", **kw)
        return time.perf_counter() - t0, report, m

    run(dense, ids[:1], sparsity=0.5)  # warm-up: first calls pay for allocations and imports
    run(moe, ids[:1], sparsity=0.5)
    rows = []
    for setting, kw in SETTINGS.items():
        times = {"dense": [], "moe routed": [], "moe all": []}
        last = {}
        for _ in range(args.repeats):  # the models take turns
            for label, model, extra in (("dense", dense, {}), ("moe routed", moe, {}),
                                        ("moe all", moe, {"expert_hessian": "all"})):
                sec, report, m = run(model, ids, **kw, **extra)
                times[label].append(sec)
                last[label] = (report, m)
        base = statistics.median(times["dense"]) / last["dense"][0].summary["params compressed"]
        for label, secs in times.items():
            report, m = last[label]
            comp = report.summary["params compressed"]
            tok = report.layers["tokens"][report.layers["hessian"].notna()]
            sec = statistics.median(secs)
            rows.append(dict(
                setting=setting, model=label, calibration=f"{args.nsamples}x{args.seqlen}",
                total_params=totals["dense" if label == "dense" else "moe"],
                params_compressed=comp, expert_params=0 if label == "dense" else expert_params,
                seconds=round(sec, 3), runs=len(secs),
                us_per_param=round(1e6 * sec / comp, 4),
                ratio_to_dense=round(sec / comp / base, 3),
                min_expert_tokens=int(tok.min()) if len(tok) else "",
                experts_without_tokens=int((tok == 0).sum()) // 3 if len(tok) else "",
                output_error=f"{output_error(m, dense if label == 'dense' else moe, held_out):.4g}",
                threads=args.threads, machine=machine))
            print(rows[-1])
    # starved calibration: few tokens per expert
    starved = ids[:args.starved]
    for label, extra in (("moe routed", {}), ("moe all", {"expert_hessian": "all"})):
        sec, report, m = run(moe, starved, sparsity=0.5, **extra)
        tok = report.layers["tokens"][report.layers["hessian"].notna()]
        rows.append(dict(
            setting="sparsegpt 50%", model=label, calibration=f"{args.starved}x{args.seqlen}",
            total_params=totals["moe"], params_compressed=report.summary["params compressed"],
            expert_params=expert_params, seconds=round(sec, 3), runs=1,
            us_per_param=round(1e6 * sec / report.summary["params compressed"], 4),
            ratio_to_dense="", min_expert_tokens=int(tok.min()),
            experts_without_tokens=int((tok == 0).sum()) // 3,
            output_error=f"{output_error(m, moe, held_out):.4g}", threads=args.threads,
            machine=machine))
        print(rows[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
