"""``mmcompress bench decode llama2-7b:4 --scheme w8a8``: integer-path decode vs the fastest dense path.

The synthetic LLaMA-2-7B-shaped stack of :mod:`mmcompress.bench` (random weights), built once per
variant: dense torch bf16, dense torch fp32, our dense bf16 GEMV kernel (the sparse kernel at 0 %,
``sparse_gemv.cpp``), and the deployed quantized stack (:class:`~mmcompress.quant.deployed.IntLinear`
on all seven projections, RTN codes of the random weights).  All variants decode the same tokens in
lockstep (order rotating every step) so that machine noise hits them alike; the baseline is the
fastest dense variant of this run.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from torch import nn

from ..bench import _PROJ, _Decoder, _llama_config, _random_layer, _sparsify_layer
from .deployed import IntLinear
from .linear import QuantLinear
from .quantizer import resolve_scheme

DENSE_VARIANTS = ("torch_bf16", "torch_fp32", "own_kernel_0pct")


def _tensor_bytes(mods) -> int:
    return sum(t.numel() * t.element_size() for m in mods for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def _quantize_layer(layer: nn.Module, scheme) -> nn.Module:
    for path in _PROJ:
        layer.set_submodule(path, IntLinear(QuantLinear.from_linear(layer.get_submodule(path), scheme).pack()))
    return layer


def _proj_modules(layers):
    return [layer.get_submodule(p) for layer in layers for p in _PROJ]


@torch.no_grad()
def quant_decode_benchmark(name: str = "llama2-7b", layers: int = 4, scheme: str = "w8a8", tokens: int = 16,
                           prompt: int = 16, rounds: int = 3, dense: tuple[str, ...] = DENSE_VARIANTS,
                           seed: int = 0, log=None) -> dict:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from ..sparse.kernels import resolve_backend

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
            ls = [_sparsify_layer(layer, 0.0, be) for layer in ls]
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
        "prompt": prompt, "rounds": rounds, "build_s": round(build_s, 1),
        "tok_s": round(1 / q_ms, 3), "dense_tok_s": round(1 / d_ms, 3), "speedup": round(d_ms / q_ms, 3),
        "dense_baseline": baseline,
        "speedup_paired_median": round(statistics.median(a / b for a, b in zip(per_tok[baseline], per_tok[sch.name])), 3),
        "weight_bytes": wbytes, "dense_weight_bytes": dense_wbytes,
        "weight_bytes_ratio": round(wbytes / dense_wbytes, 4),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
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
