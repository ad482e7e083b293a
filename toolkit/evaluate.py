"""Perplexity on non-overlapping windows, as in the SparseGPT and GPTQ papers."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import load_text, tokenize_text

__all__ = ["perplexity", "window_count"]


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

