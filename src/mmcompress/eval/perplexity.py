"""Perplexity on non-overlapping windows: ``exp(Σ NLL / Σ predicted tokens)``.

Every window of ``seqlen`` tokens predicts its last ``seqlen − 1`` tokens; the average is over the
tokens actually evaluated (also when ``max_windows`` stops early).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seqlen: int = 1024, max_windows: int | None = None,
               device="cpu", progress: bool = True) -> dict:
    if seqlen < 2:
        raise ValueError(f"--seqlen must be >= 2, got {seqlen}")
    ids = input_ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        n_windows = min(n_windows, max_windows)
    nll, count = 0.0, 0
    model.eval()
    for w in tqdm(range(n_windows), desc="ppl", leave=False, disable=not progress):
        x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum")
        nll += float(loss)
        count += seqlen - 1
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": n_windows, "seqlen": seqlen}


def text_perplexity(model, tokenizer, text: str, seqlen: int = 1024, max_windows=None, device="cpu", progress=True) -> dict:
    if not text.strip():
        raise ValueError("the evaluation text is empty")
    # the tokenizer's own special tokens once at the start (Gemma's <bos>; SmolLM2 and Qwen add none)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return perplexity(model, ids, seqlen, max_windows, device, progress)
