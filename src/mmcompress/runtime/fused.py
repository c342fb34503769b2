"""The fused decode step: one C++ call per token for Llama-family decoders (``fused_step.cpp``).

:class:`FusedStep` hands the model's tensors (by reference: embedding, norms, the seven projections of
every layer as the deployed modules hold them, the LM head, the RoPE table) and the decode engine's
K/V caches to ``torch.ops.mmcompress_fused.fused_plan`` once; each decode step is then
``fused_step(plan, token, pos)``: the whole forward of one token in C++, with the dense projections
on our AVX-512 GEMV and the integer ones on the deployed linears' own kernels (``mmcompress_int``).
Same arithmetic as the engine's Python fast path (tests/test_fused_decode.py).

Built with the kernels' machinery (``sparse.kernels.cpu.compile_and_load``), needs the integer
kernels' CPU (AVX-512 VNNI).  :func:`fused_problem` says why a model cannot take it (the engine then
keeps its Python step).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from torch import nn

from ..quant.kernels import cpu as _qcpu
from ..sparse.kernels.cpu import compile_and_load, extension_name

_SRC = Path(__file__).with_name("fused_step.cpp")
_LOCK = threading.Lock()
_STATE: dict = {}
_DTYPES = (torch.float32, torch.bfloat16)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_fused`` is usable."""
    with _LOCK:
        if "error" not in _STATE:  # the step calls the integer kernels' ops: their CPU and build first
            _STATE["error"] = (f"no CPU integer kernels ({_qcpu.error()})" if not _qcpu.available() else
                               compile_and_load(extension_name("mmcompress_fused_step", _SRC), _SRC,
                                                lambda: torch.ops.mmcompress_fused.fused_step, verbose))
    return _STATE["error"] is None


def _linear_problem(m: nn.Module, dtype) -> str | None:
    from ..quant import kernels
    from ..quant.deployed import IntLinear

    if type(m) is nn.Linear:
        if not m.weight.is_contiguous():
            return "a non-contiguous weight"
        return None if m.weight.dtype == dtype else f"{m.weight.dtype} weight in a {dtype} model"
    if type(m) is IntLinear:
        if m.input_sparsifier is not None:
            return "an input sparsifier"
        s = m.input_smoothing
        if s is not None and s.shape[0] != 1:
            return "per-modality smoothing"
        if kernels.path_for(m.scheme, m.in_features, m.weight_codes.device, 1) != "cpu":
            return f"{m.scheme.name} is not on the CPU kernel"
        return None
    return f"{type(m).__name__} layers"


def fused_problem(engine) -> str | None:
    """``None`` if :class:`FusedStep` runs ``engine``'s model (a fast-path engine), else why not."""
    if engine.path != "fast":
        return "not on the fast path"
    if engine.device.type != "cpu":
        return f"device {engine.device.type}"
    if engine.dtype not in _DTYPES:
        return f"dtype {engine.dtype} (fused step: float32, bfloat16)"
    cfg = engine.cfg
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    for name, m in (("lm_head", engine.head),):
        why = _linear_problem(m, engine.dtype)
        if why:
            return f"{name}: {why}"
    for i, l in enumerate(engine.layers):
        if l.adapt is not None:
            return "residual adapters (LaRoSA)"
        for m in (l.ln1, l.ln2):
            if type(m).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm") or m.weight.dtype != engine.dtype:
                return f"layer {i}: norm {type(m).__name__}"
        for m in (l.q, l.k, l.v, l.o, l.mlp.gate_proj, l.mlp.up_proj, l.down):
            why = _linear_problem(m, engine.dtype)
            if why:
                return f"layer {i}: {why}"
    if type(engine.norm).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"):
        return f"final norm {type(engine.norm).__name__}"
    if not load():
        return f"the fused kernel is unavailable ({_STATE['error']})"
    return None


_EMPTY = torch.empty(0)


def _lin_args(m: nn.Module, dtype, prev) -> tuple[list, list, tuple]:
    """(tensors, meta, key) of one projection; ``key`` identifies its prepared input (for sharing)."""
    from ..quant.kernels import KERNEL_BITS, _bf16_ok

    bias = m.bias.detach() if m.bias is not None else _EMPTY
    if type(m) is nn.Linear:
        return ([m.weight.detach(), _EMPTY, _EMPTY, bias, _EMPTY],
                [0, 0, 0, 1, 0, 0, m.out_features, m.in_features], None)
    sch = m.scheme
    group = sch.group_size if 0 < sch.group_size < m.in_features else 0
    bits = KERNEL_BITS[sch.wbits]
    if not sch.weight_only:
        kind = 1
    else:
        kind = 3 if dtype == torch.bfloat16 and bits == 4 and _bf16_ok(m.in_features, group) else 2
    scale, zero = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
                   for t in (m.weight_scale, m.weight_zero))
    s = m.input_smoothing
    smooth = s[0].to(dtype) if s is not None else _EMPTY  # IntLinear divides by the row in x's dtype
    key = (kind, sch.abits, m.in_features, s)
    share = prev is not None and prev[:3] == key[:3] and (
        (s is None and prev[3] is None) or (s is not None and prev[3] is not None and torch.equal(s, prev[3])))
    return ([m.weight_codes, scale, zero, bias, smooth],
            [kind, bits, group, int(sch.sym), sch.abits, int(share), m.out_features, m.in_features], key)


class FusedStep:
    """A plan of ``engine``'s model for ``mmcompress_fused.fused_step`` (call :func:`fused_problem` first).
    ``step(token, pos)`` -> logits ``[1, V]`` in the model dtype; K/V go into ``engine``'s caches."""

    def __init__(self, engine):
        from ..quant.quantizer import _eps

        cfg, dt = engine.cfg, engine.dtype
        l0 = engine.layers[0]
        tensors = [engine.embed.weight.detach().contiguous(), engine.norm.weight.detach(), engine.cos, engine.sin]
        t, m, _ = _lin_args(engine.head, dt, None)
        tensors += t
        meta = [cfg.hidden_size, cfg.num_attention_heads, engine.kv_heads, l0.hd, len(engine.layers), engine.max_len,
                engine.head.out_features, cfg.intermediate_size, int(dt == torch.bfloat16)] + m
        for i, l in enumerate(engine.layers):
            tensors += [l.ln1.weight.detach(), l.ln2.weight.detach(), engine._kc[i], engine._vc[i]]
            prev = None
            for mod in (l.q, l.k, l.v, l.o, l.mlp.gate_proj, l.mlp.up_proj, l.down):
                if mod is l.o or mod is l.mlp.gate_proj or mod is l.down:
                    prev = None  # a new input
                t, m, prev = _lin_args(mod, dt, prev)
                tensors += t
                meta += m
        eps = getattr(engine.norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))
        self._tensors = tensors  # keep what the plan points into alive
        self.plan = torch.ops.mmcompress_fused.fused_plan(tensors, meta, [float(eps), float(l0.scaling), _eps(dt)])
        self._ops = torch.ops.mmcompress_fused

    def step(self, token: int, pos: int) -> torch.Tensor:
        return self._ops.fused_step(self.plan, token, pos)

    def __del__(self):
        try:
            self._ops.fused_free(self.plan)
        except Exception:  # interpreter shutdown
            pass


__all__ = ["FusedStep", "fused_problem", "load"]
