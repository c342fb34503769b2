"""The demo's decode speed-up of a sparsified model held in memory: greedy decode, dense vs sparse on the
same ``SparseLinear`` modules (``mmcompress.sparse``), interleaved rounds.  The product's benchmark of a
saved artifact is ``mmcompress bench decode DIR`` (``mmcompress.runtime.bench_decode``)."""

from __future__ import annotations

import inspect
import statistics
import time

import torch
from torch import nn
from transformers import DynamicCache

from mmcompress.sparse import linear as sparse_linear_module
from mmcompress.sparse.decode import enable_sparse_decode, set_sparse_backend
from mmcompress.sparse.kernels import resolve_backend
from mmcompress.sparse.linear import sparse_linears
from mmcompress.sparse.topk import keep_count


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, tokens: int) -> tuple[list[float], list[int]]:
    cache = DynamicCache(config=model.config.get_text_config() if hasattr(model.config, "get_text_config")
                         else model.config)
    # transformers >= 5.2x names the argument ``cache`` (``past_key_values`` is deprecated)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    nxt = out.logits[:, -1:].argmax(-1)
    times, toks = [], []
    for _ in range(tokens):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, use_cache=True, **{key: cache})  # the cache object is updated in place
        nxt = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
        toks.append(int(nxt.item()))
    return times, toks


@torch.no_grad()
def model_decode_benchmark(model: nn.Module, tokens: int = 32, prompt_ids: torch.Tensor | None = None,
                           rounds: int = 3, backend: str = "auto", sparsity: float | None = None,
                           log=None) -> dict:
    """Greedy decode of ``tokens`` tokens after a short prompt: dense vs sparse on ``model`` whose
    linears are ``SparseLinear`` (e.g. a LaRoSA artifact).  Dense = every SparseLinear in mode
    ``dense`` on the PyTorch path (row-major weight); sparse = :func:`enable_sparse_decode` (kernel
    backend, dense prefill).  ``sparsity`` overrides every Top-K module's K.  The model is left in the
    sparse-decode state."""
    mods = sparse_linears(model)
    if not mods:
        raise ValueError("the model has no SparseLinear modules: sparsify it first (mmcompress sparsify)")
    dev = next(model.parameters()).device
    be = resolve_backend(backend, dev)
    if sparsity is not None:
        for m in mods:
            if m.mode == "topk":
                m.keep = keep_count(m.in_features, sparsity)
    modes = [m.mode for m in mods]
    prefill = [m.sparse_prefill for m in mods]
    if prompt_ids is None:
        vocab = getattr(model.config.get_text_config(), "vocab_size", 1000)
        prompt_ids = torch.randint(0, min(vocab, 1000), (1, 16), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt_ids.to(dev)
    model.eval()

    def dense_state():
        set_sparse_backend(model, "torch")
        for m in mods:
            m.mode = "dense"

    def sparse_state():
        for m, mode in zip(mods, modes):
            m.mode = mode
        enable_sparse_decode(model, be, sparse_prefill=False)

    per = {"dense": [], "sparse": []}
    topk_s, ntok = 0.0, 0
    toks = {}
    for r in range(rounds):
        for n in (("dense", "sparse") if r % 2 == 0 else ("sparse", "dense")):
            (dense_state if n == "dense" else sparse_state)()
            if r == 0:
                _greedy(model, prompt_ids, 2)  # warm-up
            sparse_linear_module.PROFILE = {} if n == "sparse" else None
            ts, tk = _greedy(model, prompt_ids, tokens)
            if n == "sparse":
                topk_s += sparse_linear_module.PROFILE.get("topk_s", 0.0)
                ntok += len(ts)
            sparse_linear_module.PROFILE = None
            per[n].extend(ts)
            toks[n] = tk
    for m, p in zip(mods, prefill):
        m.sparse_prefill = p
    sparse_state()
    md, ms = statistics.median(per["dense"]), statistics.median(per["sparse"])
    agree = sum(a == b for a, b in zip(toks["dense"], toks["sparse"])) / max(1, tokens)
    res = {"modules": len(mods), "backend": be, "tokens": tokens, "rounds": rounds,
           "dense_tok_s": round(1 / md, 3), "sparse_tok_s": round(1 / ms, 3), "speedup": round(md / ms, 3),
           "topk_ms_per_token": round(1e3 * topk_s / max(1, ntok), 3),
           "topk_share": round(topk_s / max(1, ntok) / ms, 4), "greedy_token_agreement": round(agree, 3)}
    if log is not None:
        print(f"{len(mods)} SparseLinear modules, backend {be}: dense {res['dense_tok_s']} tok/s, sparse "
              f"{res['sparse_tok_s']} tok/s, speed-up {res['speedup']}x, Top-K {res['topk_ms_per_token']} ms/token; "
              f"greedy tokens agree {100 * agree:.0f}%", file=log)
    return res
