"""Perplexity on non-overlapping windows, as in the SparseGPT and GPTQ papers; decode speed."""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from toolkit.measure.text import load_text, tokenize_text

__all__ = ["perplexity", "window_count", "decode_speed"]


def window_count(n_tokens: int, seqlen: int, max_windows: int | None = None,
                 what: str = "the evaluation text") -> int:
    """How many non-overlapping windows of ``seqlen`` tokens ``n_tokens`` holds (at most
    ``max_windows``); ``ValueError`` naming ``what`` when not even one does."""
    windows = n_tokens // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise ValueError(f"{what} has {n_tokens:,} tokens, fewer than one window of {seqlen}")
    return windows


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer=None, text_or_dataset="wikitext2", seqlen: int = 2048,
               max_windows: int | None = None, device=None, verbose: bool = True,
               desc: str = "perplexity") -> float:
    """Perplexity of ``model`` on consecutive, non-overlapping windows of ``seqlen`` tokens.

    ``text_or_dataset``: a string of text, a path to a text file, a source name
    (``"wikitext2"``/``"ptb"`` test split or ``"c4"`` validation through ``datasets``;
    ``"python-docs"``: the offline held-out split), or a 1-D tensor of token ids. The whole text is tokenized once and cut into ``T // seqlen`` windows (the papers'
    protocol; the tail is dropped); ``max_windows`` keeps only the first ones to cap the cost.
    Returns ``exp`` of the mean next-token negative log-likelihood over all windows.
    ``verbose`` shows a progress bar labelled ``desc``.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if isinstance(text_or_dataset, torch.Tensor):
        ids = text_or_dataset.reshape(-1).long()
    else:
        text = load_text(text_or_dataset,
                         split="validation" if text_or_dataset == "c4" else "test")
        ids = tokenize_text(tokenizer, text)
    windows = window_count(ids.numel(), seqlen, max_windows)
    if device is None:
        device = next(model.parameters()).device
    ids = ids[: windows * seqlen].reshape(windows, seqlen)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for row in tqdm(ids, desc=desc, unit="window", disable=not verbose):
        x = row[None].to(device)
        logits = model(x, use_cache=False).logits[0, :-1].float()
        nll = nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
        total += float(nll)
        count += seqlen - 1
    model.train(was_training)
    return math.exp(total / count)


@torch.no_grad()
def decode_speed(model: nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 128,
                 device=None, warmup: bool = True) -> dict:
    """Greedy generation speed with the KV cache: ``model.generate`` on one prompt (batch 1),
    exactly ``new_tokens`` new tokens (end-of-sequence does not stop it). With ``warmup``, a
    2-token ``generate`` on the same prompt runs first, untimed, so that one-time costs (lazy
    initialisation of the model's first call) stay out of the figure.

    Returns ``{"tokens_per_s": (new_tokens - 1) / decode_s, "decode_s": time from the first new
    token to the last, "prefill_s": time to the first new token (the prompt's forward pass),
    "new_tokens": n, "prompt_tokens": p}``: the decode rate leaves the prompt's forward pass
    out, so it is the per-token cost of generating with the cache.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2, got {new_tokens!r}")
    ids = prompt_ids.reshape(1, -1).long()
    if device is None:
        device = next(model.parameters()).device
    ids = ids.to(device)
    stamps: list[float] = []

    class _Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = getattr(config, "eos_token_id", None)
        pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    was_training = model.training
    model.eval()
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                  pad_token_id=pad if pad is not None else 0)
    if warmup:
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         stopping_criteria=StoppingCriteriaList([_Clock()]), **kwargs)
    model.train(was_training)
    made = out.shape[1] - ids.shape[1]
    if made != new_tokens or len(stamps) != new_tokens:
        raise RuntimeError(f"generate made {made} tokens ({len(stamps)} steps), "
                           f"{new_tokens} were asked")
    decode = stamps[-1] - stamps[0]
    return {"tokens_per_s": (new_tokens - 1) / decode if decode > 0 else float("inf"),
            "decode_s": decode, "prefill_s": stamps[0] - t0, "new_tokens": new_tokens,
            "prompt_tokens": ids.shape[1]}
