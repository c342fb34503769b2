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

:func:`model_decode_speedup` is the same comparison for a compressed model held in memory (the demo's
decode figure): that model on the engine as ``mmcompress.load`` would run it against :func:`dense_variants`
(of the original model when the caller has it), with the same interleaved rounds
(:func:`interleaved_steps`).
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import huge_pages_on
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

    # deepcopy with a memo: the tensors of the linears replaced below are shared (only read), every other
    # floating tensor is copied straight into ``dtype`` (no full-precision copy first; tied weights stay tied)
    memo = {}
    for m in model.modules():
        swapped = isinstance(m, (QuantLinear, SparseLinear))
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if id(t) in memo or t is None:
                continue
            if swapped:
                memo[id(t)] = t
            elif t.is_floating_point():
                c = t.detach().to(dtype, copy=True)
                memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else c
    model = copy.deepcopy(model, memo)
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
    from ..memory import trim_heap
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
    trim_heap()  # the row-major weights the kernel layout replaced: back to the system, not left resident
    return model


def dense_variants(model: nn.Module) -> dict[str, nn.Module]:
    """The dense candidates a decode speed-up is quoted against (the fastest of them), built from ``model``
    (a plain model, or a compressed one in its reference form: :func:`densify`): ``engine_fp32``,
    ``engine_bf16`` and, on a CPU with the sparse kernels, ``engine_own_kernel_0pct`` (bf16, the seven
    projections of every layer on our dense GEMV).  Copies; ``model`` is not changed."""
    out = {"engine_fp32": densify(model, torch.float32), "engine_bf16": densify(model, torch.bfloat16)}
    own = _own_kernel(densify(model, torch.bfloat16))
    if own is not None:
        out["engine_own_kernel_0pct"] = own
    return out


def engine_run(engine: DecodeEngine, ids: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, list[float]]]:
    """``n -> (ids followed by n greedy tokens, the decode steps' seconds)`` of ``engine`` on prompt ``ids``."""
    def run(n):
        tm = {}
        out = engine.generate(ids, n, timings=tm)
        return out, tm["step_s"]
    return run


def interleaved_steps(variants: dict[str, Callable[[int], tuple[torch.Tensor, list[float]]]], tokens: int,
                      rounds: int, prompt: int) -> tuple[dict, dict, dict]:
    """Each variant ``run(n) -> (ids [1, prompt + n], step seconds)`` once for warm-up (``min(tokens, 4)``
    tokens: first-call dispatch, kernel builds), then ``rounds`` rounds of ``tokens`` tokens, the order
    rotating every round so that machine noise hits the variants alike.  Returns ``(steps, runs, tokens)``
    per variant: every step's seconds, each round's tokens/s, the last round's new token ids."""
    names = list(variants)
    steps = {k: [] for k in names}
    runs = {k: [] for k in names}
    out_tokens = {}
    for k in names:
        variants[k](min(tokens, 4))
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            out, st = variants[k](tokens)
            steps[k].extend(st)
            runs[k].append(len(st) / sum(st))
            out_tokens[k] = out[0, prompt:].tolist()
    return steps, runs, out_tokens


def step_of(engine: DecodeEngine) -> tuple[str, str | None]:
    """Which single-token step ``engine`` runs (``"fused"``, ``"python"``: the fast path's Python step, or
    ``"hf"``: the model's own forward) and, when it is not the fused step, why not."""
    if engine.fused:
        return "fused", None
    if engine.path != "fast":
        return "hf", engine.why_hf or "not on the fast path"
    if engine.compiled:
        return "python", "compiled step (torch.compile)"
    from .fused import fused_problem

    return "python", fused_problem(engine)


@torch.no_grad()
def model_decode_speedup(model: nn.Module, prompt_ids: torch.Tensor | None = None, tokens: int = 16,
                         rounds: int = 2, *, baselines: dict[str, nn.Module] | None = None, backend: str = "auto",
                         log=None) -> dict:
    """Decode speed-up of a compressed model held in memory, measured on what the product runs.

    ``model`` (e.g. just sparsified) is put in the state ``mmcompress.load`` gives its artifact (sparse
    linears on the kernel ``backend`` for decode steps, dense prefill: ``enable_sparse_decode``; left so)
    and decoded greedily by :class:`DecodeEngine` (the fused C++ step where ``fused_problem`` allows it,
    else the Python step), interleaved with the dense ``baselines`` on their own engines (default
    :func:`dense_variants` of ``model``; a caller that still has the original model passes
    ``dense_variants(original)``: the original's cost, without e.g. LaRoSA's residual adapters).  Speed-up
    = median step time of the fastest dense variant / the compressed one's.  ``prompt_ids`` ``[1, L]``
    (default 16 deterministic ids).  Returns the JSON-ready result: ``tok_s``, ``dense_tok_s``,
    ``speedup``, ``dense_baseline`` (the fastest dense variant), ``dtype`` (the compressed model's),
    ``decode_path`` (``"fused"``, ``"python"`` or ``"hf"``) and ``fused_problem`` (why not the fused step; ``None`` when it ran),
    every variant's tok/s and step, ``speedup_same_dtype`` (against the dense engine in the compressed
    model's dtype, for information) and the greedy-token agreement with the dense baseline."""
    return models_decode_speedup({"compressed": model}, prompt_ids, tokens, rounds, baselines=baselines,
                                 backend=backend, log=log)["compressed"]


@torch.no_grad()
def models_decode_speedup(models: dict[str, nn.Module], prompt_ids: torch.Tensor | None = None, tokens: int = 16,
                          rounds: int = 2, *, baselines: dict[str, nn.Module] | None = None, backend: str = "auto",
                          log=None) -> dict[str, dict]:
    """:func:`model_decode_speedup` of several compressed models (e.g. TEAL and LaRoSA of one original) in
    one interleaved run: every round decodes each compressed model and each dense baseline once, so they
    share the baselines' runs (and the machine's noise).  ``{name: result}``; ``variants_tok_s`` and
    ``variants_step`` of each result name the model itself ``"compressed"`` and the others by their names.
    ``baselines`` defaults to :func:`dense_variants` of the first model."""
    from ..sparse.decode import enable_sparse_decode
    from ..sparse.joint import SparseInt8Linear
    from ..sparse.kernels import resolve_backend
    from ..sparse.linear import sparse_linears
    from ..sparse.merge import ResidualAdaptedLayer

    if not models:
        raise ValueError("models: one or more compressed models")
    first = next(iter(models.values()))
    dev = next(first.parameters()).device
    be = resolve_backend(backend, dev)
    for model in models.values():
        if sparse_linears(model) or any(isinstance(m, (ResidualAdaptedLayer, SparseInt8Linear)) for m in model.modules()):
            enable_sparse_decode(model, be)
        model.eval()
    if baselines is None:
        baselines = dense_variants(first)
    if not baselines or set(baselines) & (set(models) | {"compressed"}):
        raise ValueError("baselines: one or more dense models, named apart from the compressed ones and 'compressed'")
    if prompt_ids is None:
        vocab = getattr(first.get_input_embeddings(), "num_embeddings", 1000)
        prompt_ids = torch.randint(0, min(vocab, 1000), (1, 16), generator=torch.Generator().manual_seed(0))
    prompt_ids = prompt_ids.to(dev)
    L = prompt_ids.shape[1]
    engines = {k: DecodeEngine(m, max_len=L + tokens) for k, m in {**models, **baselines}.items()}
    steps, runs, toks = interleaved_steps({k: engine_run(e, prompt_ids) for k, e in engines.items()},
                                          tokens, rounds, L)
    med = {k: statistics.median(v) for k, v in steps.items()}
    base = min(baselines, key=med.get)
    out = {}
    for name in models:
        path, why = step_of(engines[name])
        agree = sum(a == b for a, b in zip(toks[name], toks[base])) / max(1, len(toks[base]))
        same = {torch.float32: "engine_fp32", torch.bfloat16: "engine_bf16"}.get(engines[name].dtype)
        label = {name: "compressed"}
        res = {"tokens": tokens, "rounds": rounds, "prompt": L, "threads": torch.get_num_threads(), "backend": be,
               "dtype": str(engines[name].dtype).removeprefix("torch."),
               "tok_s": round(1 / med[name], 3), "dense_tok_s": round(1 / med[base], 3),
               "speedup": round(med[base] / med[name], 3), "dense_baseline": base,
               # against the dense engine in the compressed model's own dtype (not the baseline: for information)
               "speedup_same_dtype": round(med[same] / med[name], 3) if same in med else None,
               "decode_path": path, "fused_problem": why,
               "variants_tok_s": {label.get(k, k): round(1 / v, 3) for k, v in med.items()},
               "variants_step": {label.get(k, k): step_of(e)[0] for k, e in engines.items()},
               "greedy_token_agreement": round(agree, 3)}
        out[name] = res
        if log is not None:
            print(f"decode {tokens} tokens after {L}, {rounds} rounds, {res['threads']} threads: {name} on the "
                  f"{path} step{f' ({why})' if why else ''}", file=log)
            if name == next(iter(models)):
                for k, v in med.items():
                    print(f"  {label.get(k, k):24s} {1e3 * v:8.2f} ms/token  {1 / v:8.2f} tok/s  "
                          f"({step_of(engines[k])[0]} step)", file=log)
            print(f"  {name} vs {base}: {res['speedup']:.3f}x; greedy tokens agree {100 * agree:.0f}%", file=log)
    return out


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
        models.update(dense_variants(ref))
        del ref
    engines = {k: DecodeEngine(m, max_len=n, compile=compile and k == "compressed") for k, m in models.items()}
    if engines["compressed"].fused:  # the same model on the engine's Python step, for the fused step's gain
        engines["compressed_python_step"] = DecodeEngine(comp, max_len=n, fused=False)
    build_s = time.time() - t0
    vocab = getattr(comp.get_input_embeddings(), "num_embeddings", 1000)
    ids = _prompt_ids(path, prompt, vocab, trust_remote_code)
    variants = {k: engine_run(e, ids) for k, e in engines.items()}
    if hf:
        variants["hf_generate"] = lambda n: _hf_generate(comp, ids, n)
    steps, runs, out_tokens = interleaved_steps(variants, tokens, rounds, prompt)
    med = {k: statistics.median(v) for k, v in steps.items()}
    wb = _tensor_bytes(_layer_linears(comp))
    res = {
        "model": str(path), "artifact": artifact, "threads": torch.get_num_threads(), "prompt": prompt,
        "huge_pages": huge_pages_on(),  # the CLI's (cli.huge_pages_for)
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


__all__ = ["dense_variants", "densify", "engine_decode_benchmark", "engine_run", "interleaved_steps",
           "model_decode_speedup", "models_decode_speedup", "step_of"]
