"""``mmcompress bench kernel | decode``: sparse-GEMV and sparse-decode speed (the command line: :mod:`mmcompress.bench_cli`).

``mmcompress bench kernel --shape OUTxIN --sparsity P --dtype bf16|fp32 --batch B [--backend cpu]``
    One linear ``W [OUT, IN]`` (``--shape 4096x11008`` is LLaMA-2-7B's down_proj, ``11008x4096`` its
    gate/up_proj).  Cold cache: the benchmark rotates through enough weight copies to exceed the
    last-level cache (``--cache-mb``, default 1200 MB per layout; capped by ``--max-mb``), so every
    call streams its weight from DRAM as in real decoding.  Dense (``F.linear`` on the row-major
    weight, same dtype) and sparse (the backend's kernel on ``WT``, Top-K selection included) are
    timed interleaved in the same process; the reported ratio is median(sparse) / median(dense).
    Also: the kernel at 0% sparsity (no selection) and the Top-K selection alone (its share), torch in
    the other float dtype, and every sparse kernel against the fastest dense GEMV (``best_dense``: torch
    bf16, torch fp32 or our kernel at 0 %) as well as against torch bf16.  ``--scheme w8a8`` adds the
    sparse int8 kernel (Top-K + per-token int8 activations × int8 weights) and that kernel at 0 %.

``mmcompress bench decode SPEC --sparsity P --tokens N``
    ``SPEC`` is a synthetic shape ``llama2-7b:L`` (L LLaMA-2-7B decoder layers, hidden 4096,
    intermediate 11008, 32 heads, random bf16 weights, KV cache; ``llama2-7b`` alone = 4 layers) or a
    model directory (any artifact or plain model: :mod:`mmcompress.runtime.bench_decode`, the decode
    engine on it vs on the dense model vs HF ``generate``).  Synthetic: dense
    layers (row-major ``nn.Linear``, no adapters) vs LaRoSA's merged form (``SparseLinear`` on q/k/v
    sharing one Top-K, o, gate/up sharing one Top-K, down, plus a dense 4096×4096 residual adapter per
    layer; decode steps run it on our GEMV kernel at 0 %), greedy single-token decode after a short
    prompt; reports tokens/s, the speed-up against the fastest dense path (``dense_baseline``: torch in
    ``--dtype`` or our kernel at 0 %), the Top-K and adapter overheads, weight bytes, bytes read per
    token and the effective bandwidth, and the process's peak RSS.  ``--scheme w8a8`` (with
    ``--sparsity``) adds LaRoSA + W8A8 deployed on the sparse int8 kernel (``SparseInt8Linear``, built
    as from a ``compress --recipe`` artifact) and reports it as the compressed variant (``tok_s``).

Shared / oversubscribed machines: OpenMP worker threads spin-wait between parallel regions by default,
which on a CPU shared with other jobs turns every GEMV (dense and sparse alike) into a scheduling
wait.  Run ``OMP_WAIT_POLICY=PASSIVE mmcompress bench ...`` there (it must be set before torch is
imported, hence an environment variable); both the dense and the sparse path run under it.  Results
report the setting as ``omp_wait_policy``.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use bf16 or fp32") from None


def parse_shape(s: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX×,]\s*(\d+)\s*", s)
    if not m:
        raise ValueError(f"--shape must look like OUTxIN (e.g. 4096x11008), got {s!r}")
    out, inn = int(m.group(1)), int(m.group(2))
    if out <= 0 or inn <= 0:
        raise ValueError(f"--shape dimensions must be positive, got {s!r}")
    return out, inn


def _median_us(ts) -> float:
    return statistics.median(ts) * 1e6


# -- kernel ------------------------------------------------------------------------------------


def _int8_weight(w: torch.Tensor):
    """Symmetric per-output-channel int8 codes of ``w`` in the sparse int8 kernel's layout."""
    from .quant.quantizer import quantize_weight
    from .sparse.kernels import pack_int8_weight

    codes, scale, _ = quantize_weight(w.float(), 8, 0, True)
    wq, zc = pack_int8_weight(codes)
    return wq, scale.reshape(-1).contiguous(), zc


def _best_dense(times_us: dict) -> tuple[str, float]:
    """The fastest dense GEMV among the measured ones (torch bf16, torch fp32, our kernel at 0 %)."""
    name = min(times_us, key=times_us.get)
    return name, times_us[name]


@torch.no_grad()
def kernel_benchmark(out_features: int, in_features: int, sparsity: float = 0.4, dtype="bf16", batch: int = 1,
                     backend: str = "auto", repeats: int = 20, cache_mb: float = 1200.0, max_mb: float = 3000.0,
                     seed: int = 0, scheme: str | None = None, log=None) -> dict:
    """Cold-cache dense vs sparse GEMV, interleaved in one process (see module docstring).

    Dense candidates: torch bf16 and torch fp32 (``F.linear`` on the row-major weight) and our kernel at
    0 % (no selection); every sparse kernel is reported against the fastest of them (``best_dense``) and
    against torch bf16.  ``scheme="w8a8"`` adds the sparse int8 kernel (Top-K, per-token int8 activations,
    int8 weight codes, int32 accumulation) and the same kernel at 0 %."""
    from .sparse.kernels import resolve_backend, sparse_int8_linear, sparse_int8_reference, sparse_linear, topk_select
    from .sparse.topk import keep_count

    dt = _dtype(dtype) if isinstance(dtype, str) else dtype
    if not 1 <= batch <= 8:
        raise ValueError(f"--batch must be 1..8 (decode), got {batch}")
    if scheme not in (None, "w8a8"):
        raise ValueError(f"bench kernel --scheme: only w8a8 has a sparse kernel, got {scheme!r}")
    k = keep_count(in_features, sparsity)
    be = resolve_backend(backend, "cpu")
    nbytes = out_features * in_features * torch.finfo(dt).bits // 8
    # bytes of one copy in every layout: row-major (dt), WT (dt), the other torch dtype, int8
    other = torch.float32 if dt == torch.bfloat16 else torch.bfloat16
    per_copy = 2 * nbytes + out_features * in_features * torch.finfo(other).bits // 8
    per_copy += out_features * in_features if scheme else 0
    ncopy = max(2, math.ceil(cache_mb * 1e6 / nbytes))
    ncopy = max(2, min(ncopy, int(max_mb * 1e6 // per_copy)))
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(out_features, in_features, generator=g) * 0.02).to(dt)
    Ws = [base] + [base.clone() for _ in range(ncopy - 1)]  # distinct memory, same values
    WTs = [w.t().contiguous() for w in Ws]
    Wo = [w.to(other) for w in Ws]
    x = torch.randn(batch, in_features, generator=g).to(dt)
    xo = x.to(other)

    # correctness spot check against the reference on the same selection
    idx, vals = topk_select(x, k, backend=be)  # bf16 inputs have magnitude ties: compare on one selection
    ref = sparse_linear(x.float(), WTs[0].float(), indices=idx, values=vals, backend="torch")
    got = sparse_linear(x, WTs[0], k, backend=be).float()
    rel_err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()

    tname = {torch.bfloat16: "torch_bf16", torch.float32: "torch_fp32"}
    fns = {
        "dense": lambda i: F.linear(x, Ws[i]),
        "sparse": lambda i: sparse_linear(x, WTs[i], k, backend=be),
        "kernel_dense": lambda i: sparse_linear(x, WTs[i], in_features, backend=be),
        tname[other]: lambda i: F.linear(xo, Wo[i]),
    }
    int8_err = None
    if scheme:
        Q = [_int8_weight(w) for w in Ws[:1]]
        Q += [(Q[0][0].clone(), Q[0][1], Q[0][2]) for _ in range(ncopy - 1)]
        fns["int8_sparse"] = lambda i: sparse_int8_linear(x, *Q[i], k, backend=be)
        fns["int8_at_0pct"] = lambda i: sparse_int8_linear(x, *Q[i], in_features, backend=be)
        r8 = sparse_int8_reference(x.float(), *Q[0], k)
        int8_err = ((sparse_int8_linear(x.float(), *Q[0], k, backend=be) - r8).abs().max()
                    / r8.abs().max().clamp_min(1e-12)).item()
    names = list(fns)
    offset = {n: (j * ncopy) // len(names) for j, n in enumerate(names)}  # different copies at the same moment
    times = {n: [] for n in fns}
    for n, f in fns.items():  # warm-up (page faults, thread pool, first-call dispatch)
        for i in range(ncopy):
            f(i)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for i in range(ncopy):
            for n in order:
                j = (i + offset[n]) % ncopy
                t0 = time.perf_counter()
                fns[n](j)
                times[n].append(time.perf_counter() - t0)
    pair = sorted(s / d for s, d in zip(times["sparse"], times["dense"]))
    sel = []
    for _ in range(max(50, repeats * 5)):
        t0 = time.perf_counter()
        topk_select(x, k, backend=be)
        sel.append(time.perf_counter() - t0)
    med = {n: _median_us(v) for n, v in times.items()}
    best = {n: min(v) * 1e6 for n, v in times.items()}
    dense_us, sparse_us, kd_us = med["dense"], med["sparse"], med["kernel_dense"]
    topk_us = _median_us(sel)
    torch_us = {tname[dt]: dense_us, tname[other]: med[tname[other]]}
    best_name, best_us = _best_dense({**torch_us, "kernel_at_0pct": kd_us})
    res = {
        "shape": f"{out_features}x{in_features}", "dtype": str(dt).replace("torch.", ""), "batch": batch,
        "sparsity": sparsity, "keep": k, "backend": be, "threads": torch.get_num_threads(),
        "weight_copies": ncopy, "weight_mb_rotated": round(ncopy * per_copy / 1e6, 1),
        "repeats": repeats, "samples": len(times["dense"]), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "dense_us": round(dense_us, 1), "sparse_us": round(sparse_us, 1),
        "ratio": round(sparse_us / dense_us, 3), "ratio_paired_median": round(pair[len(pair) // 2], 3),
        "ideal_ratio": round(k / in_features, 3),
        "kernel_at_0pct_us": round(kd_us, 1), "kernel_at_0pct_ratio": round(kd_us / dense_us, 3),
        "sparse_vs_kernel_at_0pct": round(sparse_us / kd_us, 3),
        "torch_bf16_us": round(torch_us["torch_bf16"], 1), "torch_fp32_us": round(torch_us["torch_fp32"], 1),
        "best_dense": best_name, "best_dense_us": round(best_us, 1),
        "sparse_vs_best_dense": round(sparse_us / best_us, 3),
        "sparse_vs_torch_bf16": round(sparse_us / torch_us["torch_bf16"], 3),
        "best_of_n_us": {n: round(v, 1) for n, v in best.items()},
        "topk_us": round(topk_us, 1), "topk_share": round(topk_us / sparse_us, 4),
        "dense_gb_s": round(nbytes / (dense_us * 1e-6) / 1e9, 1),
        "kernel_at_0pct_gb_s": round(out_features * in_features * torch.finfo(dt).bits / 8 / (kd_us * 1e-6) / 1e9, 1),
        "max_rel_err": rel_err,
    }
    if scheme:
        i8, i80 = med["int8_sparse"], med["int8_at_0pct"]
        res.update({"scheme": scheme, "int8_sparse_us": round(i8, 1), "int8_at_0pct_us": round(i80, 1),
                    "int8_sparse_vs_best_dense": round(i8 / best_us, 3),
                    "int8_sparse_vs_torch_bf16": round(i8 / torch_us["torch_bf16"], 3),
                    "int8_at_0pct_vs_best_dense": round(i80 / best_us, 3),
                    "int8_sparse_gb_s": round(k * out_features / (i8 * 1e-6) / 1e9, 1),
                    "int8_at_0pct_gb_s": round(in_features * out_features / (i80 * 1e-6) / 1e9, 1),
                    "int8_max_rel_err": int8_err})
    if log is not None:
        print(f"W {res['shape']} {res['dtype']} batch {batch}, sparsity {sparsity} (K={k}/{in_features}), "
              f"backend {be}, {res['threads']} threads, {ncopy} copies ({res['weight_mb_rotated']} MB rotated), "
              f"{res['samples']} samples each (median; best-of-n in the JSON)", file=log)
        print(f"  torch bf16 {res['torch_bf16_us']:9.1f} us   torch fp32 {res['torch_fp32_us']:9.1f} us   "
              f"our kernel at 0% {kd_us:9.1f} us ({res['kernel_at_0pct_gb_s']} GB/s)   best dense: {best_name}",
              file=log)
        print(f"  sparse {sparse_us:9.1f} us  vs best dense {res['sparse_vs_best_dense']:.3f}, vs torch bf16 "
              f"{res['sparse_vs_torch_bf16']:.3f}, vs {res['dtype']} dense {res['ratio']:.3f} (paired median "
              f"{res['ratio_paired_median']:.3f}; ideal {res['ideal_ratio']:.3f})", file=log)
        if scheme:
            print(f"  int8 sparse {res['int8_sparse_us']:9.1f} us  vs best dense {res['int8_sparse_vs_best_dense']:.3f},"
                  f" vs torch bf16 {res['int8_sparse_vs_torch_bf16']:.3f} ({res['int8_sparse_gb_s']} GB/s of codes); "
                  f"int8 at 0% {res['int8_at_0pct_us']:.1f} us ({res['int8_at_0pct_gb_s']} GB/s)", file=log)
        print(f"  top-k selection {topk_us:.1f} us = {100 * res['topk_share']:.2f}% of the sparse call", file=log)
    return res


# -- decode: synthetic LLaMA-2-7B-shaped stack ------------------------------------------------------

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    # a small shape for smoke tests (not a real model)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4),
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
    from .sparse.merge import ResidualAdaptedLayer

    wrapped = ResidualAdaptedLayer(layer, adapter.in_features, adapter=False)
    wrapped.residual_adapter = adapter
    wrapped.set_adapter_backend(backend)
    return wrapped


def _llama_config(name: str, layers: int, dtype):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[name], num_hidden_layers=layers, max_position_embeddings=4096, vocab_size=32000,
                      rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    cfg.dtype = dtype
    return cfg


@torch.no_grad()
def _random_layer(cfg, idx: int, dtype, gen, device="cpu"):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, idx)
    layer = layer.to(dtype=dtype).to_empty(device=device)
    for name, p in layer.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
    return layer.eval()


from .runtime.dense import PROJECTIONS as _PROJ  # noqa: E402  (the synthetic stack runs the product's modules)
from .runtime.dense import dense_kernel_layer as _sparsify_layer  # noqa: E402
from .runtime.dense import peak_rss_bytes as _peak_rss_bytes  # noqa: E402


@torch.no_grad()
def _joint_layer(layer: nn.Module, sparsity: float, scheme: str, backend: str) -> nn.Module:
    """The 7 projections as deployed LaRoSA + ``scheme`` modules (``SparseInt8Linear``), built the way a
    ``compress --recipe`` artifact is: Top-K ``SparseLinear`` → RTN ``QuantLinear`` (packed) → deployed."""
    from .quant.linear import QuantLinear
    from .quant.quantizer import resolve_scheme
    from .sparse.joint import SparseInt8Linear

    _sparsify_layer(layer, sparsity, "torch")
    sch = resolve_scheme(scheme)
    for path in _PROJ:
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
    from .quant.deployed import IntLinear
    from .sparse.joint import SparseInt8Linear

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
    from .sparse.linear import SparseLinear
    from .sparse.topk import keep_count

    for m in layers.modules():
        if isinstance(m, SparseLinear):
            m.keep = keep_count(m.in_features, sparsity)


class _Decoder:
    """One decode stream: its own KV cache; :meth:`step` feeds one token through ``layers``."""

    @torch.no_grad()
    def __init__(self, layers: nn.ModuleList, rotary, cfg, prompt: torch.Tensor):
        from transformers import DynamicCache

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
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from .sparse import linear as sl_mod
    from .sparse.kernels import resolve_backend

    dt = _dtype(dtype) if isinstance(dtype, str) else dtype
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
        _sparsify_layer(inner, sparsity, be)
        sparse_layers.append(_adapted(inner, adapter(), be))
    sparse = nn.ModuleList(sparse_layers)
    joint = None
    if scheme:
        def int8_adapter():  # as a recipe with adapters: w8a16 stores it (quantize_residual_adapters), deployed
            from .quant.deployed import IntLinear
            from .quant.linear import QuantLinear
            from .quant.quantizer import resolve_scheme

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
                sl_mod.PROFILE = {} if prof else None
                per_tok[n].append(streams[n].step(steps[t]))
                if prof:
                    topk["topk_s"] += sl_mod.PROFILE.get("topk_s", 0.0)
                    topk["topk_calls"] += sl_mod.PROFILE.get("topk_calls", 0)
                    topk["tokens"] += 1
                sl_mod.PROFILE = None
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
        "peak_rss_bytes": _peak_rss_bytes(), "peak_rss_note": "whole process: every variant's weights resident",
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


# -- decode: a real (already sparsified) model -------------------------------------------------------


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, tokens: int) -> tuple[list[float], list[int]]:
    from transformers import DynamicCache

    import inspect

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
    from .sparse import linear as sl_mod
    from .sparse.kernels import resolve_backend
    from .sparse.decode import enable_sparse_decode, set_sparse_backend
    from .sparse.linear import sparse_linears
    from .sparse.topk import keep_count

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
            sl_mod.PROFILE = {} if n == "sparse" else None
            ts, tk = _greedy(model, prompt_ids, tokens)
            if n == "sparse":
                topk_s += sl_mod.PROFILE.get("topk_s", 0.0)
                ntok += len(ts)
            sl_mod.PROFILE = None
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

