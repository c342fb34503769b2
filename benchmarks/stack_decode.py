#!/usr/bin/env python
"""Decode tokens/s of a synthetic LLaMA-2-7B-shaped stack built from the product's own modules: dense vs
LaRoSA's merged form, vs LaRoSA + W8A8, or the deployed integer path vs the fastest dense path.

    python benchmarks/stack_decode.py llama2-7b:4 --sparsity 0.4 [--scheme w8a8 [--joint-adapters w8a16]] --json
    python benchmarks/stack_decode.py llama2-7b:4 --scheme w4a8 --json     # integer path, no sparsity
    python benchmarks/stack_decode.py llama2-7b:4 --scheme w4a8 --step fused --json   # on DecodeEngine's fused step

``SPEC`` is ``NAME[:L]``: L decoder layers (``llama2-7b`` alone = 4) of transformers' ``LlamaDecoderLayer``
with hidden 4096, intermediate 11008, 32 heads, random bf16 weights, a KV cache, greedy single-token
decode after a short prompt (``tiny`` is a small shape for smoke tests).  The projections are the
product's modules, built the way an artifact deploys them (``mmcompress.runtime.dense``,
``mmcompress.sparse``, ``mmcompress.quant.deployed``); this script only builds the stack and times it.

Sparse (``--sparsity``): dense layers (row-major ``nn.Linear``, no adapters) vs LaRoSA's merged form
(``SparseLinear`` on q/k/v sharing one Top-K, o, gate/up sharing one Top-K, down, plus a dense 4096×4096
residual adapter per layer in the product's ``ResidualAdaptedLayer``; decode steps run it on our GEMV
kernel at 0 %); reports tokens/s, the speed-up against the fastest dense path (``dense_baseline``: torch
in ``--dtype`` or our kernel at 0 %), the Top-K and adapter overheads, weight bytes, bytes read per token
and the effective bandwidth, and the process's peak RSS.  ``--scheme w8a8`` (with ``--sparsity``) adds
LaRoSA + W8A8 deployed on the sparse int8 kernel (``SparseInt8Linear``, built as from a ``compress
--recipe`` artifact) and reports it as the compressed variant (``tok_s``).

Integer path (``--scheme`` without ``--sparsity``): dense torch bf16, dense torch fp32, our dense bf16
GEMV kernel (the sparse kernel at 0 %) and the deployed quantized stack (``IntLinear`` on all seven
projections, RTN codes of the random weights).

``--step fused``: the product's own decode path for Llama-family artifacts instead of the layers stepped
in Python.  Every variant, the dense baselines included, is a ``LlamaForCausalLM`` of the same L layers
with a 256-token vocabulary (embedding and head negligible, the same in every variant) decoded by
``DecodeEngine(model, fused=True)``: one C++ call per token (``runtime/fused.py``).  Dense candidates:
``dense_bf16`` (``nn.Linear``: the step's row-major GEMV), ``own_kernel_0pct`` (``SparseLinear`` at 0 %,
the sparse kernels' layout) and, with ``--fp32``, ``dense_fp32``; compressed: the ``IntLinear`` stack,
LaRoSA (``sparse``; ``sparse_no_adapter``) and the joint stack.  A variant the fused step cannot run is an
error naming ``fused_problem``'s reason; the JSON says which step every variant ran (``variants_step``).
``--teal`` (with ``--step fused``) adds TEAL at the same level: the projections as threshold ``SparseLinear``
(no adapters), each threshold the ``--sparsity`` quantile of its input's magnitudes in a dense forward of 64
random calibration ids (TEAL's calibration on the dense chain, ``sparse/methods/teal.py``); its kept fraction
varies per token, so the JSON gives the weight rows it read (``teal_rows_read``, measured on 4 untimed steps).

All variants decode the same tokens in lockstep in one process (order rotating every step), so that
machine noise hits them alike.  The CPU from the command line (``synthetic_decode_benchmark`` also takes
``device="cuda"``: ``benchmarks/gpu_check.py``).  On a shared machine set ``OMP_WAIT_POLICY=PASSIVE``
(``speed_common.py``).  The user's model: ``mmcompress bench decode ARTIFACT``.  (Until session 31 this
was ``mmcompress bench decode llama2-7b:L``.)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

from mmcompress.cli import huge_pages_for
from mmcompress.runtime import huge_pages_on

huge_pages_for("bench")  # the decode commands' huge pages (THP_MEM_ALLOC_ENABLE=0 to compare without), before torch
import torch  # noqa: E402
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from mmcompress.quant.deployed import IntLinear
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.quantizer import resolve_scheme
from mmcompress.runtime.dense import PROJECTIONS, dense_kernel_layer, peak_rss_bytes
from mmcompress.sparse import linear as sparse_linear_module
from mmcompress.sparse.joint import SparseInt8Linear
from mmcompress.sparse.kernels import resolve_backend
from mmcompress.sparse.linear import SparseLinear
from mmcompress.sparse.merge import ResidualAdaptedLayer
from mmcompress.sparse.topk import keep_count
from speed_common import add_run_args, dtype_named, run

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    # a small shape for smoke tests (not a real model)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4),
    # the same with an intermediate size the integer kernels take (in_features % 64, bf16 int4: % 128)
    "tiny64": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=4),
}
DEFAULT_LAYERS = 4


def parse_decode_spec(spec: str):
    """``NAME[:LAYERS]`` for a synthetic stack, else ``None`` (a model directory)."""
    m = re.fullmatch(r"([a-z0-9.\-]+?)(?::(\d+))?", spec.strip().lower())
    if m and m.group(1) in SHAPES:
        n = int(m.group(2)) if m.group(2) else DEFAULT_LAYERS
        if n < 1:
            raise ValueError(f"layer count must be >= 1 in {spec!r}")
        return m.group(1), n
    return None


def _adapted(layer: nn.Module, adapter: nn.Module, backend: str):
    """``layer`` followed by LaRoSA's residual adapter ``r ← r A``: the product's ``ResidualAdaptedLayer``
    (a float adapter runs decode steps on our GEMV kernel at 0 % when ``backend`` is not ``"torch"``, a
    quantized one its integer forward)."""
    wrapped = ResidualAdaptedLayer(layer, adapter.in_features, adapter=False)
    wrapped.residual_adapter = adapter
    wrapped.set_adapter_backend(backend)
    return wrapped


def _llama_config(name: str, layers: int, dtype):
    cfg = LlamaConfig(**SHAPES[name], num_hidden_layers=layers, max_position_embeddings=4096, vocab_size=32000,
                      rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    cfg.dtype = dtype
    return cfg


@torch.no_grad()
def _random_layer(cfg, idx: int, dtype, gen, device="cpu"):
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, idx)
    layer = layer.to(dtype=dtype).to_empty(device=device)
    for name, p in layer.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return layer.eval()


@torch.no_grad()
def _joint_layer(layer: nn.Module, sparsity: float, scheme: str, backend: str) -> nn.Module:
    """The 7 projections as deployed LaRoSA + ``scheme`` modules (``SparseInt8Linear``), built the way a
    ``compress --recipe`` artifact is: Top-K ``SparseLinear`` → RTN ``QuantLinear`` (packed) → deployed."""
    dense_kernel_layer(layer, sparsity, "torch")
    sch = resolve_scheme(scheme)
    for path in PROJECTIONS:
        q = QuantLinear.from_linear(layer.get_submodule(path), sch).pack()
        why = SparseInt8Linear.eligible(q)
        if why is not None:
            raise ValueError(f"--scheme {scheme}: no sparse integer kernel ({why})")
        m = SparseInt8Linear.from_quant_linear(q)
        m.backend = backend
        layer.set_submodule(path, m)
    return layer


def _linear_bytes(mods: nn.Module) -> int:
    """Bytes of the projection and adapter weights (codes + scales for deployed int8 modules)."""
    total = 0
    for m in mods.modules():
        if isinstance(m, SparseInt8Linear):
            total += m.weight_bytes
        elif isinstance(m, IntLinear):
            total += sum(t.numel() * t.element_size() for t in (m.weight_codes, m.weight_scale, m.weight_zero))
        elif isinstance(m, nn.Linear) or (hasattr(m, "keep") and hasattr(m, "weight") and m.weight.dim() == 2):
            total += m.weight.numel() * m.weight.element_size()
    return total


def _set_keep(layers, sparsity: float):
    for m in layers.modules():
        if isinstance(m, SparseLinear):
            m.keep = keep_count(m.in_features, sparsity)


class _Decoder:
    """One decode stream: its own KV cache; :meth:`step` feeds one token through ``layers``."""

    @torch.no_grad()
    def __init__(self, layers: nn.ModuleList, rotary, cfg, prompt: torch.Tensor):
        self.layers, self.rotary = layers, rotary
        self.device = prompt.device
        self.sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
        self.cache = DynamicCache(config=cfg)
        self.pos = prompt.shape[1]
        pos = torch.arange(self.pos, device=self.device).unsqueeze(0)
        h = prompt
        pe = rotary(h, pos)
        for layer in layers:
            h = layer(h, position_ids=pos, cache=self.cache, use_cache=True, position_embeddings=pe)

    @torch.no_grad()
    def step(self, h: torch.Tensor) -> float:
        self.sync()
        t0 = time.perf_counter()
        pos = torch.tensor([[self.pos]], device=self.device)
        pe = self.rotary(h, pos)
        for layer in self.layers:
            h = layer(h, position_ids=pos, cache=self.cache, use_cache=True, position_embeddings=pe)
        self.sync()
        self.pos += 1
        return time.perf_counter() - t0


@torch.no_grad()
def synthetic_decode_benchmark(name: str = "llama2-7b", layers: int = DEFAULT_LAYERS, sparsity: float = 0.4,
                               tokens: int = 16, prompt: int = 16, rounds: int = 3, backend: str = "auto",
                               dtype="bf16", seed: int = 0, device="cpu", scheme: str | None = None,
                               log=None, adapter_bits: int = 16) -> dict:
    """Dense vs LaRoSA (and, with ``scheme``, LaRoSA + ``scheme`` deployed on the sparse int8 kernel) on a
    synthetic stack, all decoding in lockstep in one process.  ``dense_tok_s`` / ``speedup`` are against
    the fastest dense path measured (``dense_baseline``: torch ``dtype`` or our kernel at 0 %)."""
    dt = dtype_named(dtype)
    device = torch.device(device)
    be = resolve_backend(backend, device)
    cfg = _llama_config(name, layers, dt)
    d = cfg.hidden_size
    gen = torch.Generator(device=device).manual_seed(seed)
    t_build = time.time()

    def adapter():
        a = nn.Linear(d, d, bias=False, dtype=dt, device=device)
        a.weight.requires_grad_(False)
        a.weight.normal_(0.0, d ** -0.5, generator=gen)
        return a

    dense = nn.ModuleList(_random_layer(cfg, i, dt, gen, device) for i in range(layers))
    sparse_layers = []
    for i in range(layers):
        inner = _random_layer(cfg, i, dt, gen, device)
        dense_kernel_layer(inner, sparsity, be)
        sparse_layers.append(_adapted(inner, adapter(), be))
    sparse = nn.ModuleList(sparse_layers)
    joint = None
    if scheme:
        def int8_adapter():  # as a recipe with adapters: w8a16 stores it (quantize_residual_adapters), deployed
            return IntLinear(QuantLinear.from_linear(adapter(), resolve_scheme("w8a16")).pack())

        joint = nn.ModuleList(_adapted(_joint_layer(_random_layer(cfg, i, dt, gen, device), sparsity, scheme, be),
                                       int8_adapter() if adapter_bits == 8 else adapter(), be)
                              for i in range(layers))
    rotary = LlamaRotaryEmbedding(cfg).to(device)
    prompt_h = (torch.randn(1, prompt, d, generator=gen, device=device)).to(dt)
    steps = (torch.randn(max(tokens, 1), 1, 1, d, generator=gen, device=device)).to(dt)
    build_s = time.time() - t_build

    adapters = [m.residual_adapter for m in sparse]

    def set_adapters(on: bool):
        for m, a in zip(sparse, adapters):
            m.residual_adapter = a if on else None

    variants = {
        "dense": (dense, None),
        "sparse": (sparse, (sparsity, True)),
        "sparse_no_adapter": (sparse, (sparsity, False)),
        "sparse_0pct_no_adapter": (sparse, (0.0, False)),
        "sparse_0pct": (sparse, (0.0, True)),
    }
    if joint is not None:
        variants["joint"] = (joint, None)
    per_tok = {n: [] for n in variants}
    topk = {"topk_s": 0.0, "topk_calls": 0, "tokens": 0}
    names = list(variants)

    def configure(n):
        mods, setting = variants[n]
        if setting is not None:
            _set_keep(sparse, setting[0])
            set_adapters(setting[1])
        return mods

    # Lockstep: every variant decodes the same token right after the others (own KV caches), so
    # machine noise hits all variants alike; the order rotates every step.
    for r in range(rounds):
        streams = {}
        for n in names:
            streams[n] = _Decoder(configure(n), rotary, cfg, prompt_h)
            streams[n].step(steps[0])  # warm-up step, untimed
        for t in range(tokens):
            rot = (t + r) % len(names)
            for n in names[rot:] + names[:rot]:
                configure(n)
                prof = n == "sparse"
                sparse_linear_module.PROFILE = {} if prof else None
                per_tok[n].append(streams[n].step(steps[t]))
                if prof:
                    topk["topk_s"] += sparse_linear_module.PROFILE.get("topk_s", 0.0)
                    topk["topk_calls"] += sparse_linear_module.PROFILE.get("topk_calls", 0)
                    topk["tokens"] += 1
                sparse_linear_module.PROFILE = None
        del streams
    med = {n: statistics.median(v) for n, v in per_tok.items()}
    best = {n: min(v) for n, v in per_tok.items()}
    topk_ms = 1e3 * topk["topk_s"] / max(1, topk["tokens"])
    adapter_ms = 1e3 * (med["sparse"] - med["sparse_no_adapter"])
    dense_paths = {f"torch_{'bf16' if dt == torch.bfloat16 else 'fp32'}": "dense",
                   "kernel_at_0pct": "sparse_0pct_no_adapter"}
    base_name = min(dense_paths, key=lambda k: med[dense_paths[k]])
    base = dense_paths[base_name]
    comp = "joint" if joint is not None else "sparse"
    # weight bytes: the 7 projections (+ adapters); bytes read per decode step: kept rows only
    dense_bytes = _linear_bytes(dense)
    _set_keep(sparse, sparsity)
    sparse_bytes = _linear_bytes(sparse)
    comp_bytes = _linear_bytes(joint) if joint is not None else sparse_bytes
    adapter_bytes = layers * d * d * torch.finfo(dt).bits // 8
    joint_adapter_bytes = _linear_bytes(nn.ModuleList(m.residual_adapter for m in joint)) if joint is not None else 0
    keep_frac = 1.0 - sparsity
    read = {"dense": dense_bytes, "sparse": adapter_bytes + keep_frac * (sparse_bytes - adapter_bytes),
            "sparse_0pct_no_adapter": sparse_bytes - adapter_bytes}
    if joint is not None:
        read["joint"] = joint_adapter_bytes + keep_frac * (comp_bytes - joint_adapter_bytes)
    res = {
        "spec": f"{name}:{layers}", "layers": layers, "dtype": str(dt).replace("torch.", ""), "backend": be,
        "device": str(device), "scheme": scheme, "joint_adapters": (None if joint is None else
                                                                  "w8a16" if adapter_bits == 8 else "float"),
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "sparsity": sparsity, "tokens": tokens, "prompt": prompt,
        "rounds": rounds, "build_s": round(build_s, 1),
        "compressed": comp, "tok_s": round(1 / med[comp], 3),
        "dense_tok_s": round(1 / med[base], 3), "dense_baseline": base_name,
        "speedup": round(med[base] / med[comp], 3),
        "speedup_best_of_n": round(min(best[v] for v in dense_paths.values()) / best[comp], 3),
        "speedup_vs_torch": round(med["dense"] / med[comp], 3),
        "weight_bytes": comp_bytes, "dense_weight_bytes": dense_bytes,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_note": "whole process: every variant's weights resident",
        "torch_dense_tok_s": round(1 / med["dense"], 3), "kernel_at_0pct_tok_s": round(1 / med["sparse_0pct_no_adapter"], 3),
        "sparse_tok_s": round(1 / med["sparse"], 3),
        "sparse_speedup": round(med[base] / med["sparse"], 3),
        "dense_ms_per_token": round(1e3 * med[base], 2), "sparse_ms_per_token": round(1e3 * med["sparse"], 2),
        "topk_ms_per_token": round(topk_ms, 3), "topk_share": round(topk_ms / (1e3 * med["sparse"]), 4),
        "topk_calls_per_token": round(topk["topk_calls"] / max(1, topk["tokens"]), 2),
        "adapter_ms_per_token": round(adapter_ms, 2), "adapter_share": round(adapter_ms / (1e3 * med["sparse"]), 4),
        "speedup_without_adapters": round(med[base] / med["sparse_no_adapter"], 3),
        "sparse_0pct_vs_dense": round(med["sparse_0pct_no_adapter"] / med["dense"], 3),
        "sparse_0pct_with_adapters_vs_dense": round(med["sparse_0pct"] / med["dense"], 3),
        "speedup_paired_median": round(statistics.median(a / b for a, b in zip(per_tok[base], per_tok[comp])), 3),
        "sparse_0pct_vs_dense_paired_median": round(statistics.median(
            a / b for a, b in zip(per_tok["sparse_0pct_no_adapter"], per_tok["dense"])), 3),
        "ms_per_token": {n: round(1e3 * v, 2) for n, v in med.items()},
        "best_ms_per_token": {n: round(1e3 * v, 2) for n, v in best.items()},
        "weight_gb_read_per_token": {n: round(v / 1e9, 3) for n, v in read.items()},
        "effective_gb_s": {n: round(v / med[n] / 1e9, 2) for n, v in read.items()},
        "effective_gb_s_best": {n: round(v / best[n] / 1e9, 2) for n, v in read.items()},
    }
    if log is not None:
        print(f"{res['spec']} {res['dtype']} decode, {tokens} tokens after a {prompt}-token prompt, {rounds} rounds, "
              f"backend {be}, {res['threads']} threads (built in {res['build_s']} s)", file=log)
        for n, v in med.items():
            gbs = f"  {res['effective_gb_s'][n]:6.2f} GB/s of weights" if n in read else ""
            print(f"  {n:24s} {1e3 * v:9.2f} ms/token (best {1e3 * best[n]:8.2f})  {1 / v:7.3f} tok/s{gbs}", file=log)
        print(f"  {comp} vs fastest dense ({base_name}): {res['speedup']:.3f}x (best-of-n {res['speedup_best_of_n']:.3f}x; "
              f"vs torch {res['speedup_vs_torch']:.3f}x); LaRoSA alone {res['sparse_speedup']:.3f}x "
              f"(without adapters {res['speedup_without_adapters']:.3f}x); Top-K {topk_ms:.3f} ms/token "
              f"({100 * res['topk_share']:.2f}%, {res['topk_calls_per_token']} selections/token); adapters "
              f"{adapter_ms:.2f} ms/token ({100 * res['adapter_share']:.2f}%); weights {comp_bytes / 1e9:.2f} GB vs "
              f"{dense_bytes / 1e9:.2f} GB dense; peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB", file=log)
    return res




# -- the integer path: deployed quantized projections vs the fastest dense path ---------------------

DENSE_VARIANTS = ("torch_bf16", "torch_fp32", "own_kernel_0pct")


def _tensor_bytes(mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def _quantize_layer(layer: nn.Module, scheme) -> nn.Module:
    for path in PROJECTIONS:
        layer.set_submodule(path, IntLinear(QuantLinear.from_linear(layer.get_submodule(path), scheme).pack()))
    return layer


def _proj_modules(layers):
    return [layer.get_submodule(p) for layer in layers for p in PROJECTIONS]


@torch.no_grad()
def quant_decode_benchmark(name: str = "llama2-7b", layers: int = 4, scheme: str = "w8a8", tokens: int = 16,
                           prompt: int = 16, rounds: int = 3, dense: tuple[str, ...] = DENSE_VARIANTS,
                           seed: int = 0, log=None) -> dict:
    """The deployed integer path (``IntLinear`` on the seven projections) vs the fastest of the ``dense``
    variants, each stack built once, all decoding in lockstep (see the module docstring)."""
    sch = resolve_scheme(scheme)
    bf16 = torch.bfloat16
    cfg = _llama_config(name, layers, bf16)
    d = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    stacks: dict[str, nn.ModuleList] = {}
    for v in dense:
        dt = torch.float32 if v == "torch_fp32" else bf16
        ls = [_random_layer(cfg, i, dt, gen) for i in range(layers)]
        if v == "own_kernel_0pct":
            be = resolve_backend("auto", "cpu")
            ls = [dense_kernel_layer(layer, 0.0, be) for layer in ls]
        stacks[v] = nn.ModuleList(ls)
    stacks[sch.name] = nn.ModuleList(_quantize_layer(_random_layer(cfg, i, bf16, gen), sch) for i in range(layers))
    build_s = time.time() - t0
    rotary = LlamaRotaryEmbedding(cfg)
    prompt_h = torch.randn(1, prompt, d, generator=gen)
    steps = torch.randn(tokens, 1, 1, d, generator=gen)

    def dtype_of(v):
        return torch.float32 if v == "torch_fp32" else bf16

    names = list(stacks)
    per_tok = {n: [] for n in names}
    for r in range(rounds):
        streams = {}
        for n in names:
            streams[n] = _Decoder(stacks[n], rotary, cfg, prompt_h.to(dtype_of(n)))
            streams[n].step(steps[0].to(dtype_of(n)))  # warm-up, untimed
        for t in range(tokens):
            rot = (t + r) % len(names)
            for n in names[rot:] + names[:rot]:
                per_tok[n].append(streams[n].step(steps[t].to(dtype_of(n))))
        del streams
    med = {n: statistics.median(v) for n, v in per_tok.items()}
    baseline = min(dense, key=lambda v: med[v])
    q_ms, d_ms = med[sch.name], med[baseline]
    wbytes = _tensor_bytes(_proj_modules(stacks[sch.name]))
    dense_wbytes = _tensor_bytes(_proj_modules(stacks["torch_bf16" if "torch_bf16" in stacks else baseline]))
    res = {
        "spec": f"{name}:{layers}", "scheme": sch.name, "threads": torch.get_num_threads(), "tokens": tokens,
        "huge_pages": huge_pages_on(),
        "prompt": prompt, "rounds": rounds, "build_s": round(build_s, 1),
        "tok_s": round(1 / q_ms, 3), "dense_tok_s": round(1 / d_ms, 3), "speedup": round(d_ms / q_ms, 3),
        "dense_baseline": baseline,
        "speedup_paired_median": round(statistics.median(a / b for a, b in zip(per_tok[baseline], per_tok[sch.name])), 3),
        "weight_bytes": wbytes, "dense_weight_bytes": dense_wbytes,
        "weight_bytes_ratio": round(wbytes / dense_wbytes, 4),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_note": "process peak with every variant resident (one process, interleaved)",
        "ms_per_token": {n: round(1e3 * v, 2) for n, v in med.items()},
        "weight_gb_s": round(wbytes / q_ms / 1e9, 2),
        "dense_weight_gb_s": round(dense_wbytes * (2 if baseline == "torch_fp32" else 1) / d_ms / 1e9, 2),
    }
    if log is not None:
        print(f"{res['spec']} decode {sch.name}, {tokens} tokens after {prompt}, {rounds} rounds, "
              f"{res['threads']} threads (built in {res['build_s']} s)", file=log)
        for n, v in med.items():
            print(f"  {n:18s} {1e3 * v:9.2f} ms/token  {1 / v:7.3f} tok/s", file=log)
        print(f"  {sch.name} vs {baseline}: {res['speedup']:.3f}x; weights {wbytes / 1e6:.0f} MB vs "
              f"{dense_wbytes / 1e6:.0f} MB bf16 ({res['weight_gb_s']} GB/s streamed)", file=log)
    return res


# -- the fused step: every variant a minimal LlamaForCausalLM decoded by DecodeEngine(fused=True) ----

FUSED_VOCAB = 256


@torch.no_grad()
def _causal_lm(name: str, layers: list, dtype, vocab: int = FUSED_VOCAB, seed: int = 0):
    """A ``LlamaForCausalLM`` around ``layers`` (decoder layers as built above, plain or LaRoSA's
    ``ResidualAdaptedLayer``): transformers' model with no layers of its own (embedding, final norm, head
    of ``vocab`` rows, rotary table), the given layers put in.  The same shell for every variant."""
    cfg = _llama_config(name, 0, dtype)
    cfg.vocab_size = vocab
    torch.manual_seed(seed)  # the shell's own init (embedding, head): the same for every variant
    model = LlamaForCausalLM(cfg).to(dtype)
    model.model.layers = nn.ModuleList(layers)
    model.config.num_hidden_layers = len(layers)
    return model.eval()


def _shell_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for m in (model.model.embed_tokens, model.lm_head, model.model.norm)
               for t in m.parameters())


@torch.no_grad()
def _teal_thresholds(model, ids: torch.Tensor, sparsity: float) -> None:
    """TEAL on ``model``'s ``SparseLinear`` projections (kernel layout, at 0 %): each keeps ``|x| >= t``, ``t``
    the ``sparsity`` quantile of its input's magnitudes in a dense forward of ``ids`` (``teal.quantile``; q/k/v
    read one input, so they get one threshold, as gate/up)."""
    from mmcompress.sparse.methods.teal import quantile
    from mmcompress.sparse.topk import Threshold

    mods = [m for m in model.modules() if isinstance(m, SparseLinear)]
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(m, i[0].detach().abs().float().reshape(-1)))
             for m in mods]
    try:
        model(input_ids=ids, use_cache=False)  # dense: keep = in_features, multi-token calls dense
    finally:
        for h in hooks:
            h.remove()
    for m in mods:
        m.selector = Threshold(quantile(seen[m], sparsity))


def _teal_rows_read(engine, steps_ids, pos: int) -> float:
    """The fraction of the TEAL projections' weight rows that ``len(steps_ids)`` fused steps from ``pos`` read
    (``decode_profile.threshold_kept`` of each step; each row is ``out_features`` weights)."""
    from decode_profile import threshold_kept

    read = total = 0
    engine._fused.set_trace(True)
    try:
        for i, t in enumerate(steps_ids):
            engine._step(t, pos + i)
            for m, kept in threshold_kept(engine._fused, engine.layers).values():
                read += kept * m.out_features
                total += m.in_features * m.out_features
    finally:
        engine._fused.set_trace(False)
    return read / total


@torch.no_grad()
def fused_decode_benchmark(name: str = "llama2-7b", layers: int = DEFAULT_LAYERS, scheme: str | None = None,
                           sparsity: float | None = None, tokens: int = 16, prompt: int = 16, rounds: int = 3,
                           seed: int = 0, vocab: int = FUSED_VOCAB, fp32: bool = False, adapter_bits: int = 16,
                           teal: bool = False, rows_layout: bool = False, log=None) -> dict:
    """Every variant — the dense baselines included — as a ``LlamaForCausalLM`` of the same ``layers``
    decoder layers and a ``vocab``-token embedding/head (:func:`_causal_lm`), decoded by the product's
    ``DecodeEngine(model, fused=True)``: one C++ call per token (``runtime/fused.py``).  A variant the
    fused step cannot run is an error (``fused_problem`` says why), never a silent Python step.

    Dense candidates (the fastest is ``dense_baseline``): ``dense_bf16`` (``nn.Linear`` bf16: the step's
    row-major GEMV), ``own_kernel_0pct`` (the projections as ``SparseLinear`` at 0 %, the sparse kernels'
    layout) and, with ``fp32``, ``dense_fp32``.  Compressed: ``scheme`` alone → the deployed ``IntLinear``
    stack; ``sparsity`` → LaRoSA (``sparse``, with its bf16 residual adapters; ``sparse_no_adapter``
    for the adapters' cost), plus with ``scheme`` the joint stack (``SparseInt8Linear``, reported as
    ``tok_s``).  ``teal`` (with ``sparsity``): also TEAL at that level (``teal``: threshold ``SparseLinear``,
    :func:`_teal_thresholds`; reported as ``teal_tok_s`` / ``teal_speedup``, not ``tok_s``).  All engines step
    the same tokens in lockstep (own KV caches, order rotating).  ``rows_layout`` (``scheme`` without ``sparsity``):
    also the same scheme with its codes row-major (``MMCOMPRESS_CODE_LAYOUT=rows``; the deployed default tiles
    int4 codes, ``MMCOMPRESS_CODE_LAYOUT=tiles`` in the environment int8 codes too), reported as ``rows_layout_tok_s`` and ``tiled_over_rows``."""
    from mmcompress.runtime.decode import DecodeEngine
    from mmcompress.runtime.fused import fused_problem

    if scheme is None and sparsity is None:
        raise ValueError("--step fused needs --scheme and/or --sparsity")
    if teal and sparsity is None:
        raise ValueError("--teal needs --sparsity")
    if rows_layout and (sparsity is not None or scheme is None):
        raise ValueError("--rows-layout is for --scheme without --sparsity")
    bf16 = torch.bfloat16
    cfg = _llama_config(name, layers, bf16)
    d = cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    be = resolve_backend("auto", "cpu")
    if be != "cpu":
        raise ValueError("--step fused needs the CPU kernels (resolve_backend gave 'torch')")
    t0 = time.time()
    models: dict[str, nn.Module] = {}
    setting: dict[str, tuple] = {}  # variant -> (keep sparsity, adapters on) of the shared LaRoSA model

    def stack(dt, build=lambda layer: layer):
        return [build(_random_layer(cfg, i, dt, gen)) for i in range(layers)]

    models["dense_bf16"] = _causal_lm(name, stack(bf16), bf16, vocab, seed)
    if fp32:
        models["dense_fp32"] = _causal_lm(name, stack(torch.float32), torch.float32, vocab, seed)

    def adapter():
        a = nn.Linear(d, d, bias=False, dtype=bf16)
        a.weight.requires_grad_(False)
        a.weight.normal_(0.0, d ** -0.5, generator=gen)
        return a

    sch = resolve_scheme(scheme) if scheme else None
    if sparsity is None:  # the integer path
        models["own_kernel_0pct"] = _causal_lm(name, stack(bf16, lambda l: dense_kernel_layer(l, 0.0, be)), bf16,
                                               vocab, seed)
        models[sch.name] = _causal_lm(name, stack(bf16, lambda l: _quantize_layer(l, sch)), bf16, vocab, seed)
        comp = sch.name
        if rows_layout:  # the same scheme, codes kept row-major at deployment
            prev = os.environ.get("MMCOMPRESS_CODE_LAYOUT")
            os.environ["MMCOMPRESS_CODE_LAYOUT"] = "rows"
            try:
                models[f"{sch.name}_rows"] = _causal_lm(name, stack(bf16, lambda l: _quantize_layer(l, sch)), bf16,
                                                        vocab, seed)
            finally:
                if prev is None:
                    os.environ.pop("MMCOMPRESS_CODE_LAYOUT")
                else:
                    os.environ["MMCOMPRESS_CODE_LAYOUT"] = prev
    else:  # LaRoSA: one model, three settings (the kernel at 0 % without adapters is the third dense path)
        lar = _causal_lm(name, [_adapted(dense_kernel_layer(_random_layer(cfg, i, bf16, gen), sparsity, be),
                                         adapter(), be) for i in range(layers)], bf16, vocab, seed)
        for n, st in (("own_kernel_0pct", (0.0, False)), ("sparse", (sparsity, True)),
                      ("sparse_no_adapter", (sparsity, False))):
            models[n], setting[n] = lar, st
        comp = "sparse"
        if sch is not None:
            def int8_adapter():
                return IntLinear(QuantLinear.from_linear(adapter(), resolve_scheme("w8a16")).pack())

            models["joint"] = _causal_lm(name, [_adapted(_joint_layer(_random_layer(cfg, i, bf16, gen), sparsity,
                                                                      scheme, be),
                                                         int8_adapter() if adapter_bits == 8 else adapter(), be)
                                                for i in range(layers)], bf16, vocab, seed)
            comp = "joint"
        if teal:
            models["teal"] = _causal_lm(name, stack(bf16, lambda l: dense_kernel_layer(l, 0.0, be)), bf16, vocab, seed)
            _teal_thresholds(models["teal"], torch.randint(0, vocab, (1, 64), generator=torch.Generator().manual_seed(
                seed + 2)), sparsity)
    lar_adapters = [l.residual_adapter for l in models["sparse"].model.layers] if setting else []

    def configure(n):
        if n in setting:
            keep_sp, adapters_on = setting[n]
            _set_keep(models[n], keep_sp)
            for l, a in zip(models[n].model.layers, lar_adapters):
                l.residual_adapter = a if adapters_on else None

    engines = {}
    for n in models:
        configure(n)  # the engine takes the adapters as they are now; the plan takes K at its first step
        eng = DecodeEngine(models[n], max_len=prompt + tokens + 1, fused=True)
        if not eng.fused:
            why = fused_problem(eng) if eng.path == "fast" else (eng.why_hf or f"path {eng.path}")
            raise RuntimeError(f"--step fused: variant {n!r} would fall back to the Python step "
                               f"(fused_problem: {why})")
        engines[n] = eng
    build_s = time.time() - t0
    tok_gen = torch.Generator().manual_seed(seed + 1)
    prompt_ids = torch.randint(0, vocab, (1, prompt), generator=tok_gen)
    step_ids = torch.randint(0, vocab, (tokens + 1, 1, 1), generator=tok_gen)
    names = list(engines)
    per_tok = {n: [] for n in names}
    # Lockstep, as the Python mode: each engine prefills the prompt (its Python forward, untimed), one
    # untimed step (which builds its fused plan), then every token goes through all engines in turn.
    # The engine's own stepping (the calls DecodeEngine.generate makes), so every step is one fused call.
    for r in range(rounds):
        for n in names:
            configure(n)
            engines[n]._reset()
            engines[n]._forward(prompt_ids, 0)
            engines[n]._step(step_ids[0], prompt)
        for t in range(tokens):
            rot = (t + r) % len(names)
            for n in names[rot:] + names[:rot]:
                configure(n)
                e = engines[n]
                s0 = time.perf_counter()
                e._step(step_ids[t + 1], prompt + 1 + t)
                per_tok[n].append(time.perf_counter() - s0)
    steps_taken = {}
    for n, e in engines.items():  # every step went through the fused plan
        if not (e.fused and e._fused is not None and e._step == e._fused_step):
            raise RuntimeError(f"--step fused: variant {n!r} did not run the fused step")
        steps_taken[n] = "fused"
    teal_read = _teal_rows_read(engines["teal"], step_ids[1:5], prompt + 1) if teal else None  # positions re-written
    med = {n: statistics.median(v) for n, v in per_tok.items()}
    best = {n: min(v) for n, v in per_tok.items()}
    dense_names = [n for n in ("dense_bf16", "dense_fp32", "own_kernel_0pct") if n in med]
    base = min(dense_names, key=med.get)

    def lyr(n):
        return models[n].model.layers

    if sparsity is None:
        wbytes, dense_wbytes = (_tensor_bytes(_proj_modules(lyr(n))) for n in (comp, "dense_bf16"))
    else:
        configure("sparse")
        dense_wbytes, wbytes = _linear_bytes(lyr("dense_bf16")), _linear_bytes(lyr(comp))
    res = {
        "spec": f"{name}:{layers}", "layers": layers, "step": "fused", "variants_step": steps_taken,
        "fused_problem": None, "vocab": vocab, "scheme": sch.name if sch else None, "sparsity": sparsity,
        "joint_adapters": ("w8a16" if adapter_bits == 8 else "float") if comp == "joint" else None,
        "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "tokens": tokens, "prompt": prompt, "rounds": rounds, "build_s": round(build_s, 1),
        "compressed": comp, "tok_s": round(1 / med[comp], 3), "dense_tok_s": round(1 / med[base], 3),
        "dense_baseline": base, "speedup": round(med[base] / med[comp], 3),
        "speedup_best_of_n": round(min(best[n] for n in dense_names) / best[comp], 3),
        "speedup_paired_median": round(statistics.median(a / b for a, b in zip(per_tok[base], per_tok[comp])), 3),
        "weight_bytes": wbytes, "dense_weight_bytes": dense_wbytes, "weight_bytes_ratio": round(wbytes / dense_wbytes, 4),
        "shell_bytes": _shell_bytes(models["dense_bf16"]),
        "shell_note": f"embedding + final norm + {vocab}-row head (bf16), the same in every variant; not in weight_bytes",
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_note": "whole process: every variant's weights resident",
        "variants_tok_s": {n: round(1 / v, 3) for n, v in med.items()},
        "ms_per_token": {n: round(1e3 * v, 2) for n, v in med.items()},
        "best_ms_per_token": {n: round(1e3 * v, 2) for n, v in best.items()},
    }
    if sparsity is not None:
        adapter_ms = 1e3 * (med["sparse"] - med["sparse_no_adapter"])
        res.update({"sparse_tok_s": round(1 / med["sparse"], 3), "sparse_speedup": round(med[base] / med["sparse"], 3),
                    "speedup_without_adapters": round(med[base] / med["sparse_no_adapter"], 3),
                    "adapter_ms_per_token": round(adapter_ms, 2),
                    "adapter_share": round(adapter_ms / (1e3 * med["sparse"]), 4)})
    if rows_layout:
        rn = f"{sch.name}_rows"
        res.update({"rows_layout_tok_s": round(1 / med[rn], 3), "tiled_over_rows": round(med[rn] / med[comp], 3),
                    "rows_layout_speedup": round(med[base] / med[rn], 3)})
    if teal:
        res.update({"teal_tok_s": round(1 / med["teal"], 3), "teal_speedup": round(med[base] / med["teal"], 3),
                    "teal_speedup_best_of_n": round(min(best[n] for n in dense_names) / best["teal"], 3),
                    "teal_rows_read": round(teal_read, 4),
                    "teal_note": "threshold per projection: the --sparsity quantile of its input's |x| on 64 random "
                                 "calibration ids (dense forward); teal_rows_read: the fraction of its weight rows 4 "
                                 "untimed steps read"})
    if log is not None:
        print(f"{res['spec']} decode on the fused step (DecodeEngine(fused=True), vocab {vocab}), {tokens} tokens "
              f"after {prompt}, {rounds} rounds, {res['threads']} threads (built in {res['build_s']} s)", file=log)
        for n, v in med.items():
            print(f"  {n:18s} {1e3 * v:9.2f} ms/token (best {1e3 * best[n]:8.2f})  {1 / v:7.3f} tok/s  [{steps_taken[n]}]",
                  file=log)
        extra = (f"; LaRoSA alone {res['sparse_speedup']:.3f}x (without adapters {res['speedup_without_adapters']:.3f}x, "
                 f"adapters {res['adapter_ms_per_token']:.2f} ms/token)" if sparsity is not None else "")
        print(f"  {comp} vs fastest dense ({base}): {res['speedup']:.3f}x (best-of-n {res['speedup_best_of_n']:.3f}x)"
              f"{extra}; weights {wbytes / 1e6:.0f} MB vs {dense_wbytes / 1e6:.0f} MB bf16; peak RSS "
              f"{res['peak_rss_bytes'] / 1e9:.2f} GB", file=log)
        if teal:
            print(f"  TEAL vs fastest dense ({base}): {res['teal_speedup']:.3f}x (best-of-n "
                  f"{res['teal_speedup_best_of_n']:.3f}x), weight rows read {res['teal_rows_read']:.4f}", file=log)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="decode tokens/s of a synthetic LLaMA-2-7B-shaped stack (the product's "
                                            "modules): dense vs sparse, joint, or the integer path")
    p.add_argument("spec", nargs="?", default="llama2-7b",
                   help=f"NAME[:LAYERS], NAME one of {', '.join(SHAPES)} (default llama2-7b = {DEFAULT_LAYERS} layers)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="input sparsity of every projection (default 0.4; with --scheme and no --sparsity: the "
                        "dense integer path)")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (default 16)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default 3)")
    p.add_argument("--backend", default="auto", help="cpu | torch | auto (default)")
    p.add_argument("--dtype", default="bf16", help="weights dtype of the sparse comparison (bf16 | fp32)")
    p.add_argument("--scheme", default=None,
                   help="without --sparsity, integer-path decode of this scheme (w8a8 | w4a8 | w4a6 | w4a16) vs the "
                        "fastest dense path (torch bf16, torch fp32, our kernel at 0%%); with --sparsity, LaRoSA + "
                        "SCHEME (w8a8) on the sparse int8 kernel")
    p.add_argument("--joint-adapters", choices=("float", "w8a16"), default="float",
                   help="--sparsity with --scheme: LaRoSA's residual adapters in the stack's dtype (the recipe "
                        "default) or 8-bit weight-only (a recipe with adapters: w8a16)")
    p.add_argument("--step", choices=("python", "fused"), default="python",
                   help="python (default): the layers stepped in Python, as above; fused: every variant, dense "
                        "baselines included, a LlamaForCausalLM of the same layers (vocabulary %d) decoded by "
                        "DecodeEngine(fused=True), one C++ call per token (an error if a variant cannot take it)"
                        % FUSED_VOCAB)
    p.add_argument("--teal", action="store_true",
                   help="--step fused with --sparsity: also TEAL at that level (threshold SparseLinear, thresholds "
                        "calibrated on a dense forward of random ids; no adapters)")
    p.add_argument("--rows-layout", action="store_true",
                   help="--step fused with --scheme: also the scheme with its codes row-major "
                        "(MMCOMPRESS_CODE_LAYOUT=rows) in the same run, against the deployed layout (int4 tiled, "
                        "int8 row-major; MMCOMPRESS_CODE_LAYOUT=tiles in the environment tiles int8 codes too)")
    p.add_argument("--fp32", action="store_true",
                   help="--step fused: also the fp32 dense model among the dense baselines (off by default: "
                        "slower than bf16 on the fused step, docs/runtime.md, and 2x the memory)")
    add_run_args(p)
    return p


def _bench(args) -> dict:
    if args.tokens < 1:
        raise ValueError("--tokens must be >= 1")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    spec = parse_decode_spec(args.spec)
    if spec is None:
        raise ValueError(f"{args.spec!r} is not a shape spec ({', '.join(s + ':LAYERS' for s in SHAPES)}); "
                         "a model directory: mmcompress bench decode DIR")
    if args.step == "fused":
        if args.dtype not in ("bf16", "bfloat16") or args.backend not in ("auto", "cpu"):
            raise ValueError("--step fused: bf16 stacks on the CPU kernels (no --dtype / --backend)")
        sparsity = 0.4 if args.sparsity is None and not args.scheme else args.sparsity  # as the Python mode
        return fused_decode_benchmark(spec[0], spec[1], args.scheme, sparsity, tokens=args.tokens,
                                      prompt=args.prompt, rounds=args.rounds, fp32=args.fp32, log=sys.stderr,
                                      adapter_bits=8 if args.joint_adapters == "w8a16" else 16, teal=args.teal,
                                      rows_layout=args.rows_layout)
    if args.teal:
        raise ValueError("--teal is for --step fused")
    if args.rows_layout:
        raise ValueError("--rows-layout is for --step fused")
    if args.fp32:
        raise ValueError("--fp32 is for --step fused (the Python step's integer mode always has torch fp32)")
    if args.scheme and args.sparsity is None:  # the dense integer path
        res = quant_decode_benchmark(spec[0], spec[1], args.scheme, tokens=args.tokens, prompt=args.prompt,
                                     rounds=args.rounds, log=sys.stderr)
    else:
        res = synthetic_decode_benchmark(spec[0], spec[1], 0.4 if args.sparsity is None else args.sparsity,
                                         tokens=args.tokens, prompt=args.prompt, rounds=args.rounds,
                                         backend=args.backend, dtype=args.dtype, scheme=args.scheme, log=sys.stderr,
                                         adapter_bits=8 if args.joint_adapters == "w8a16" else 16)
    res.update(step="python", variants_step={n: "python" for n in res["ms_per_token"]})
    return res


def main(argv=None) -> int:
    return run(build_parser(), _bench, argv)


if __name__ == "__main__":
    sys.exit(main())
