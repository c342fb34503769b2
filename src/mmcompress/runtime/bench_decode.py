"""``mmcompress bench decode MODEL_DIR``: tokens/s of the decode engine on a real artifact (or plain model
directory), against the same engine on the dense model and against HF ``generate``, in one process.

Variants, all built from the one directory and decoding the same prompt in interleaved rounds (the order
rotates every round, so machine noise hits them alike):

* ``compressed``: ``mmcompress.load(path)`` (the integer runtime; LaRoSA artifacts on the sparse kernels,
  ``enable_sparse_decode``) through :class:`~mmcompress.runtime.decode.DecodeEngine`.  For a plain
  model directory this is the model as stored.
* dense, the fastest of which is ``dense_baseline``: the same architecture with every quantized or sparse
  linear replaced by an ``nn.Linear`` of its (dequantized, un-smoothed) weight — the original model's
  shapes and cost —, through the same engine, in fp32 (``engine_fp32``), in bf16 (``engine_bf16``) and
  in bf16 with the seven projections on our dense GEMV kernel (the sparse kernel at 0 %,
  ``engine_own_kernel_0pct``; CPU with the kernel only).  For a LaRoSA artifact the residual adapters
  stay in the dense variants (its original weights are not in the artifact).
* ``compressed_python_step``: when the compressed variant takes the fused C++ step
  (:mod:`~mmcompress.runtime.fused`), the same model on the engine's Python step.
* ``hf_generate``: ``model.generate`` (greedy, HF's dynamic cache) on the compressed model; its per-token
  time comes from a logits processor's timestamps.

Per-token times are the decode steps after the first new token (the prefill).  ``tok_s`` = 1 / median
step time of the compressed variant; ``tok_s_best_run`` = the best round's steps / their total time
(the "best of N" convention of issue 22's table).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from .decode import DecodeEngine

_TEXT = ("The history of the city begins in the early medieval period, when a small settlement grew around the "
         "river crossing. Over the following centuries its markets, bridges and churches made it a regional "
         "centre of trade, and its population doubled several times before the industrial age. ")


def _prompt_ids(path, n: int, vocab: int, trust_remote_code: bool) -> torch.Tensor:
    try:
        from ..models.loading import load_tokenizer

        ids = load_tokenizer(path, trust_remote_code=trust_remote_code)(_TEXT * (1 + n // 20)).input_ids[:n]
        if len(ids) == n:
            return torch.tensor([ids])
    except Exception:  # no tokenizer files: deterministic ids
        pass
    return torch.randint(0, min(vocab, 1000), (1, n), generator=torch.Generator().manual_seed(0))


def _tensor_bytes(mods) -> int:
    seen, total = set(), 0
    for m in mods:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _layer_linears(model: nn.Module) -> list[nn.Module]:
    """The weight-carrying modules inside the decoder layers (projections, adapters; not norms)."""
    from ..models.adapters import get_adapter

    layers = get_adapter(model).layers
    return [m for m in layers.modules() if len(list(m.children())) == 0 and any(
        t is not None and t.dim() == 2 for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))]


@torch.no_grad()
def densify(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` (loaded with ``runtime="reference"``) in ``dtype`` whose quantized and sparse
    linears are ``nn.Linear`` of their effective float weight (``Ŵ / s`` for a single smoothing row)."""
    from ..quant.linear import QuantLinear
    from ..sparse.linear import SparseLinear

    model = copy.deepcopy(model)
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            w = m.quantized_weight().float()
            s = m.input_smoothing
            if s is not None:
                w = w / s[0].float()  # y = Q(x / s) Ŵᵀ  ≈  x (Ŵ / s)ᵀ; a per-modality form keeps its text row
        elif isinstance(m, SparseLinear):
            w = m.weight.float()
        else:
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
        if m.bias is not None:
            lin.bias = nn.Parameter(m.bias.detach().float().clone(), requires_grad=False)
        swaps.append((name, lin))
    for name, new in swaps:
        model.set_submodule(name, new)
    return model.to(dtype).eval()


def _own_kernel(model: nn.Module) -> nn.Module | None:
    """``model`` (bf16, dense) with the seven projections of every layer on our dense GEMV kernel."""
    from .dense import PROJECTIONS, dense_kernel_layer
    from ..models.adapters import get_adapter
    from ..sparse.kernels import resolve_backend
    from ..sparse.merge import ResidualAdaptedLayer

    be = resolve_backend("auto", "cpu")
    if be == "torch":
        return None
    try:
        for layer in get_adapter(model).layers:
            base = layer.layer if isinstance(layer, ResidualAdaptedLayer) else layer
            if not all(isinstance(base.get_submodule(p), nn.Linear) for p in PROJECTIONS):
                return None
            dense_kernel_layer(base, 0.0, be)
            if isinstance(layer, ResidualAdaptedLayer):
                layer.set_adapter_backend(be)
    except (AttributeError, ValueError):
        return None
    return model


class _StepClock:
    """A logits processor that timestamps every decoding step of HF ``generate``."""

    def __init__(self):
        self.t = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def _hf_generate(model, ids, tokens):
    from transformers import LogitsProcessorList

    clock = _StepClock()
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    return out, [b - a for a, b in zip(clock.t, clock.t[1:])]


@torch.no_grad()
def engine_decode_benchmark(path, prompt: int = 16, tokens: int = 64, rounds: int = 3, *, compile: bool = False,
                            dense: bool = True, hf: bool = True, sparsity: float | None = None,
                            trust_remote_code: bool = False, log=None) -> dict:
    """See the module docstring.  Returns the JSON-ready result."""
    from .dense import peak_rss_bytes
    from ..export.serialization import is_artifact, load
    from ..models.loading import load_hf_model
    from ..sparse.kernels import resolve_backend
    from ..sparse.decode import enable_sparse_decode
    from ..sparse.linear import sparse_linears
    from ..sparse.topk import keep_count

    path = Path(path)
    t0 = time.time()
    artifact = is_artifact(path)
    if artifact:
        comp = load(path, trust_remote_code=trust_remote_code)
    else:
        comp = load_hf_model(path, dtype="auto", trust_remote_code=trust_remote_code)
    sl = sparse_linears(comp)
    if sparsity is not None:
        if not sl:
            raise ValueError("--sparsity needs a sparsified artifact (no SparseLinear modules)")
        for m in sl:
            if m.mode == "topk":
                m.keep = keep_count(m.in_features, sparsity)
    if sl:
        enable_sparse_decode(comp, resolve_backend("auto", "cpu"))
    n = prompt + tokens
    models = {"compressed": comp}
    if dense:
        ref = load(path, runtime="reference", trust_remote_code=trust_remote_code) if artifact else comp
        models["engine_fp32"] = densify(ref, torch.float32)
        models["engine_bf16"] = densify(ref, torch.bfloat16)
        own = _own_kernel(densify(ref, torch.bfloat16))
        if own is not None:
            models["engine_own_kernel_0pct"] = own
        del ref
    engines = {k: DecodeEngine(m, max_len=n, compile=compile and k == "compressed") for k, m in models.items()}
    if engines["compressed"].fused:  # the same model on the engine's Python step, for the fused step's gain
        engines["compressed_python_step"] = DecodeEngine(comp, max_len=n, fused=False)
    build_s = time.time() - t0
    vocab = getattr(comp.get_input_embeddings(), "num_embeddings", 1000)
    ids = _prompt_ids(path, prompt, vocab, trust_remote_code)
    names = list(engines) + (["hf_generate"] if hf else [])
    steps = {k: [] for k in names}
    runs = {k: [] for k in names}
    out_tokens = {}
    for k in names:  # warm-up (first-call dispatch, kernel builds, compilation)
        if k == "hf_generate":
            _hf_generate(comp, ids, 2)
        else:
            engines[k].generate(ids, min(tokens, 4))
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            if k == "hf_generate":
                out, st = _hf_generate(comp, ids, tokens)
            else:
                tm = {}
                out = engines[k].generate(ids, tokens, timings=tm)
                st = tm["step_s"]
            steps[k].extend(st)
            runs[k].append(len(st) / sum(st))
            out_tokens[k] = out[0, prompt:].tolist()
    med = {k: statistics.median(v) for k, v in steps.items()}
    wb = _tensor_bytes(_layer_linears(comp))
    res = {
        "model": str(path), "artifact": artifact, "threads": torch.get_num_threads(), "prompt": prompt,
        "tokens": tokens, "rounds": rounds, "build_s": round(build_s, 1),
        "decode_path": engines["compressed"].path, "compiled": engines["compressed"].compiled,
        "fused": engines["compressed"].fused, "variants_fused": {k: e.fused for k, e in engines.items()},
        "tok_s": round(1 / med["compressed"], 3), "tok_s_best_run": round(max(runs["compressed"]), 3),
        "weight_bytes": wb,
        "weight_bytes_note": "tensors of the decoder layers' linears (codes, scales, zero points; dense: bf16)",
        "model_bytes": _tensor_bytes(list(comp.modules())),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_note": "whole process: every variant's weights resident",
        "variants_tok_s": {k: round(1 / v, 3) for k, v in med.items()},
        "variants_tok_s_best_run": {k: round(max(v), 3) for k, v in runs.items()},
    }
    base = None
    if dense:
        base = min((k for k in engines if not k.startswith("compressed")), key=med.get)
        res.update({"dense_tok_s": round(1 / med[base], 3), "speedup": round(med[base] / med["compressed"], 3),
                    "dense_baseline": base,
                    "dense_weight_bytes": _tensor_bytes(_layer_linears(models["engine_bf16"]))})
    if hf:
        res["hf_generate_tok_s"] = round(1 / med["hf_generate"], 3)
        res["engine_vs_hf_generate"] = round(med["hf_generate"] / med["compressed"], 3)
        res["hf_tokens_match"] = out_tokens["hf_generate"] == out_tokens["compressed"]
    if log is not None:
        print(f"{path}: decode {tokens} tokens after {prompt}, {rounds} rounds, {res['threads']} threads, path "
              f"{res['decode_path']}{' (compiled)' if res['compiled'] else ''}{' (fused step)' if res['fused'] else ''} (built in {res['build_s']} s)", file=log)
        for k, v in med.items():
            print(f"  {k:24s} {1e3 * v:8.2f} ms/token  {1 / v:8.2f} tok/s (best run {max(runs[k]):8.2f})", file=log)
        print((f"  compressed vs {base}: {res['speedup']:.3f}x; " if dense else "  ")
              + f"linear weights {wb / 1e6:.1f} MB"
              + (f" vs {res['dense_weight_bytes'] / 1e6:.1f} MB bf16" if dense else "")
              + f"; peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB"
              + (f"; vs HF generate {res['engine_vs_hf_generate']:.2f}x, same tokens: {res['hf_tokens_match']}"
                 if hf else ""), file=log)
    return res


__all__ = ["densify", "engine_decode_benchmark"]
