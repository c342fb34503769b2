"""The fused decode step: one C++ call per token for Llama-family decoders (``fused_step.cpp``).

:class:`FusedStep` hands the model's tensors (by reference: embedding, norms, the seven projections of
every layer as the deployed modules hold them, the LM head, the RoPE table) and the decode engine's
K/V caches to ``torch.ops.mmcompress_fused.fused_plan`` once; each decode step is then
``fused_step(plan, token, pos)``: the whole forward of one token in C++, with the dense projections
on our AVX-512 GEMV and the integer ones on the deployed linears' own kernels (``mmcompress_int``).
Same arithmetic as the engine's Python fast path (tests/test_fused_decode.py).

The LM head: ``head="model"`` (default) uses the model's own head as is (the logits equal the Python
step's to round-off).  ``head="bf16"`` or ``"int8"`` gives the step its own packed copy of a dense head
— bf16, or int8 codes with one fp32 step size per row (round to nearest, symmetric, max |w| / 127),
run as a weight-only linear on the float activations — so that a decode step reads 2 or 1 bytes per
head weight instead of the model's 4 (a 135M model with a tied 49152 x 576 fp32 head: 113 MB of every
step's reads).  The copy is in addition to the model's head (the prompt's prefill and the Python step use
the model's); the embedding row of each token is still read from the model's embedding (one row per
step).  The logits then differ from the model's by the head's rounding: per logit at most
``2^-8 * sum_k |w_k x_k|`` (bf16) or ``(max_k |w_k| / 254) * sum_k |x_k|`` (int8) plus float round-off,
checked in tests/test_fused_decode.py; what it does to tokens and perplexity: docs/runtime.md.

LaRoSA models (``sparse/merge.py``'s residual-adapted layers with ``SparseLinear`` projections) and the
joint artifact (LaRoSA then W8A8: ``sparse/joint.py``'s ``SparseInt8Linear``) run on the step too: each
sparse projection selects the Top-K of its input (the channels of ``sparse_gemv.cpp``'s selection, the tie
policy of ``sparse/topk.py``, by the step's AVX-512 radix select; q/k/v and gate/up share one selection, as in
the Python step) and runs that file's
sparse GEMV (float weight rows skipped) or sparse int8 GEMV (per-token int8 codes of the kept values,
exact int32 sums) on the kept rows; each residual adapter ``r ← r A`` is one more phase after its layer
(dense, on the same float GEMV at 0 %, or the integer kernel of an 8-bit weight-only adapter).

TEAL models (``SparseLinear`` in mode ``"threshold"``, ``sparse/methods/teal.py``) run on the step too: such a
projection keeps channel ``i`` of the token iff ``|x_i| >= t`` — exactly the Python step's rule, which is
``sparse_gemv.cpp``'s ``threshold_row`` (``!(|x_i| < t)`` on the fp32 values of the token, ``t`` rounded to
float32, NaN kept) — by the step's AVX-512 compare-and-compress (``threshold_select``), however many channels
that is (0 to all), and runs the same sparse GEMV on the kept rows.  q/k/v (gate/up) with the same threshold
select once.  CATS's thresholded activation and a threshold ``SparseInt8Linear`` are not on the step.

Built with the kernels' machinery (``sparse.kernels.cpu.compile_and_load``; the step includes
``quant/kernels/int_gemm.cpp``'s tile kernels and ``sparse/kernels/sparse_gemv.cpp``'s sparse kernels, so
the build name hashes those sources), needs the integer kernels' CPU (AVX-512 VNNI).  :func:`fused_problem` says why a model cannot take it (the engine
then keeps its Python step).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch
from torch import nn

from ..quant.kernels import cpu as _qcpu
from ..sparse.kernels import cpu as _scpu
from ..sparse.kernels.cpu import compile_and_load, extension_name

_SRC = Path(__file__).with_name("fused_step.cpp")
_INCLUDED = (Path(_qcpu.__file__).with_name("int_gemm.cpp"),  # #include'd by fused_step.cpp
             Path(_scpu.__file__).with_name("sparse_gemv.cpp"))
HEADS = ("model", "bf16", "int8")
_LOCK = threading.Lock()
_STATE: dict = {}
_DTYPES = (torch.float32, torch.bfloat16)


def load(verbose: bool = False) -> bool:
    """Build (first time) and load the extension; ``True`` if ``torch.ops.mmcompress_fused`` is usable."""
    with _LOCK:
        if "error" not in _STATE:  # the step calls the integer kernels' ops: their CPU and build first
            _STATE["error"] = (f"no CPU integer kernels ({_qcpu.error()})" if not _qcpu.available() else
                               compile_and_load(_build_name(), _SRC,
                                                lambda: torch.ops.mmcompress_fused.fused_step, verbose))
    return _STATE["error"] is None


def _build_name() -> str:
    h = hashlib.sha256(b"".join(p.read_bytes() for p in _INCLUDED)).hexdigest()[:8]
    return extension_name(f"mmcompress_fused_step_{h}", _SRC)


def _sparse_keep(m: nn.Module) -> int:
    """K of a decode step of a ``SparseLinear`` / ``SparseInt8Linear`` (``in_features``: dense), as their
    forwards read it at call time."""
    from ..sparse.joint import SparseInt8Linear

    if isinstance(m, SparseInt8Linear):
        sp = m.input_sparsifier
        if sp is None:
            return m.keep
        return m.in_features if sp.mode == "dense" else min(int(sp.keep), m.in_features)
    return m.in_features if m.mode == "dense" else min(int(m.keep), m.in_features)


# RMSNorm classes the step computes (the same forward: fp32 mean of squares, rsqrt(var + eps), weight * x):
# Llama/Qwen2/Mistral's, and the text decoders' of Qwen2.5-Omni's thinker and Qwen2.5-VL (mmgenerate's route)
NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen2_5OmniRMSNorm", "Qwen2_5_VLRMSNorm")


def _norm_problem(m: nn.Module, dtype) -> str | None:
    cls = type(m)
    if cls.__name__ not in NORMS or not cls.__module__.startswith("transformers.models."):
        return f"norm {cls.__name__}"
    return None if m.weight.dtype == dtype else f"norm {cls.__name__} with {m.weight.dtype} weights"


def _linear_problem(m: nn.Module, dtype, text_only: bool = False) -> str | None:
    from ..quant import kernels
    from ..quant.deployed import IntLinear, IntMASLinear
    from ..sparse.joint import SparseInt8Linear
    from ..sparse.kernels import resolve_backend
    from ..sparse.linear import SparseLinear
    from ..sparse.merge import PrefillPolicySparseLinear

    if type(m) in (SparseLinear, PrefillPolicySparseLinear):  # a decode step: all of the token's selection (both)
        if m.mode not in ("topk", "dense", "threshold"):
            return f"a {m.mode} sparsifier (fused step: Top-K, threshold)"
        if not m.kernel_layout:
            return "a SparseLinear off the CPU kernel layout (backend 'torch')"
        if m.weight.dtype != dtype:
            return f"{m.weight.dtype} sparse weight in a {dtype} model"
        if m.keep < 1 and m.mode == "topk":
            return "Top-K of 0 channels"
        return None
    if type(m) is SparseInt8Linear:
        sp = m.input_sparsifier
        if sp is not None and (getattr(sp, "mode", None) not in ("topk", "dense")
                               or type(sp).sparsify is not SparseLinear.sparsify):
            return "a SparseInt8Linear whose sparsifier is not a plain Top-K"
        if resolve_backend(m.backend, m.weight_q.device) != "cpu":
            return "a SparseInt8Linear off the CPU kernel"
        if _sparse_keep(m) < 1:
            return "Top-K of 0 channels"
        return None
    if type(m) is nn.Linear:
        if not m.weight.is_contiguous():
            return "a non-contiguous weight"
        return None if m.weight.dtype == dtype else f"{m.weight.dtype} weight in a {dtype} model"
    if type(m) is IntLinear or (text_only and type(m) is IntMASLinear):
        # text_only (an engine whose every step is a text token: mmgenerate's decode steps): a per-modality
        # layer computes x / s[TEXT] and no low-rank correction there (quant/linear.py's smooth with all-text
        # ids, masquant.cmc_correction's None), which is what the step computes with row 0 (TEXT = 0)
        if m.input_sparsifier is not None:
            return "an input sparsifier"
        s = m.input_smoothing
        if s is not None and s.shape[0] != 1 and not text_only:
            return "per-modality smoothing (fused step: text_only engines)"
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
    text_only = bool(getattr(engine, "text_only", False))
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    for name, m in (("lm_head", engine.head),):
        why = _linear_problem(m, engine.dtype, text_only)
        if why:
            return f"{name}: {why}"
    from ..sparse.merge import ThresholdedActivation

    for i, l in enumerate(engine.layers):
        if l.adapter is not None:
            a = l.adapter
            if type(a) is nn.Linear:  # row-major, or the sparse kernels' layout (set_adapter_backend)
                why = (None if a.weight.dtype == engine.dtype else f"{a.weight.dtype} weight in a {engine.dtype} model") \
                    if a.weight.is_contiguous() or a.weight.t().is_contiguous() else "an adapter off the kernel layout"
            else:
                why = _linear_problem(a, engine.dtype, text_only)
            if why:
                return f"layer {i}: residual adapter: {why}"
        if isinstance(l.act, ThresholdedActivation):
            return f"layer {i}: a thresholded activation (CATS)"
        for m in (l.ln1, l.ln2):
            why = _norm_problem(m, engine.dtype)
            if why:
                return f"layer {i}: {why}"
        for m in (l.q, l.k, l.v, l.o, l.mlp.gate_proj, l.mlp.up_proj, l.down):
            why = _linear_problem(m, engine.dtype, text_only)
            if why:
                return f"layer {i}: {why}"
    why = _norm_problem(engine.norm, engine.dtype)
    if why:
        return f"final {why}"
    if not load():
        return f"the fused kernel is unavailable ({_STATE['error']})"
    return None


_EMPTY = torch.empty(0)


def _shares(key, prev) -> bool:
    """Whether a linear with input key ``key`` reads what the previous one (``prev``) prepared."""
    if prev is None or key is None or prev[:-1] != key[:-1]:
        return False
    s, t = key[-1], prev[-1]
    return (s is None and t is None) or (s is not None and t is not None and torch.equal(s, t))


NO_THRESHOLD = -1  # a linear's last meta entry when it has no threshold selection


def f32_bits(t: float) -> int:
    """The bits of ``t`` rounded to float32 (as ``sparse_gemv.cpp``'s ``threshold_gemv`` rounds its threshold),
    as an unsigned int: the plan's meta entry of a threshold selection."""
    return int(torch.tensor(float(t), dtype=torch.float32).view(torch.int32).item()) & 0xFFFFFFFF


def _float_rows(m: nn.Module, bias, keep: int, prev, threshold: float | None = None) -> tuple[list, list, tuple]:
    """Kind 4: a float weight stored as ``WT [in, out]`` (the sparse kernels' layout), ``keep`` rows per token
    (Top-K), or the channels with ``|x| >= threshold`` (TEAL; ``keep`` unused)."""
    thr = NO_THRESHOLD if threshold is None else f32_bits(threshold)
    key = (4, 0, m.in_features, keep, None) if threshold is None else (4, "threshold", m.in_features, thr, None)
    return ([m.weight.detach().t(), _EMPTY, _EMPTY, bias, _EMPTY],
            [4, 0, 0, 1, 0, int(_shares(key, prev)), m.out_features, m.in_features, keep, thr], key)


def _lin_args(m: nn.Module, dtype, prev) -> tuple[list, list, tuple]:
    """(tensors, meta, key) of one projection; ``key`` identifies its prepared input (for sharing)."""
    from ..quant.kernels import KERNEL_BITS, _bf16_ok
    from ..sparse.joint import SparseInt8Linear
    from ..sparse.linear import SparseLinear

    bias = m.bias.detach() if m.bias is not None else _EMPTY
    if type(m) is nn.Linear:
        if not m.weight.is_contiguous():  # a residual adapter in the sparse kernels' layout: WT [in, out]
            return _float_rows(m, bias, m.in_features, prev)
        return ([m.weight.detach(), _EMPTY, _EMPTY, bias, _EMPTY],
                [0, 0, 0, 1, 0, 0, m.out_features, m.in_features, m.in_features, NO_THRESHOLD], None)
    if type(m) is SparseInt8Linear:  # LaRoSA + W8A8: Top-K, per-token codes of the kept values
        keep = _sparse_keep(m)
        s = m.input_smoothing
        smooth = s[0].float().contiguous() if s is not None else _EMPTY
        key = (5, m.abits, m.in_features, keep, s)
        return ([m.weight_q, m.weight_scale.reshape(-1).float().contiguous(), m.zero_corr, bias, smooth],
                [5, 8, 0, 1, m.abits, int(_shares(key, prev)), m.out_features, m.in_features, keep, NO_THRESHOLD],
                key)
    if isinstance(m, SparseLinear):  # float weight rows behind Top-K or a threshold (WT [in, out])
        return _float_rows(m, bias, _sparse_keep(m), prev, m.threshold if m.mode == "threshold" else None)
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
    key = (kind, sch.abits, m.in_features, m.in_features, s)
    return ([m.weight_codes, scale, zero, bias, smooth],
            [kind, bits, group, int(sch.sym), sch.abits, int(_shares(key, prev)), m.out_features, m.in_features,
             m.in_features, NO_THRESHOLD], key)


def _head_args(head: nn.Module, dtype, mode: str) -> tuple[list, list, str]:
    """(tensors, meta, the mode used) of the LM head for ``mode`` (module docstring).  A head that is not
    a dense ``nn.Linear`` (a deployed integer head), or already bf16 for ``"bf16"``, is used as it is."""
    if mode not in HEADS:
        raise ValueError(f"unknown head {mode!r}; expected one of {', '.join(HEADS)}")
    if mode == "model" or type(head) is not nn.Linear or (mode == "bf16" and head.weight.dtype == torch.bfloat16):
        t, m, _ = _lin_args(head, dtype, None)
        return t, m, "model"
    w = head.weight.detach()
    bias = head.bias.detach() if head.bias is not None else _EMPTY
    N, K = w.shape
    if mode == "bf16":
        return ([w.to(torch.bfloat16).contiguous(), _EMPTY, _EMPTY, bias, _EMPTY],
                [0, 0, 0, 1, 0, 0, N, K, K, NO_THRESHOLD], mode)
    if K % 64:
        raise ValueError(f"an int8 head needs a hidden size that is a multiple of 64 (got {K})")
    codes, scale = int8_rows(w)
    return ([codes, scale, torch.zeros_like(scale), bias, _EMPTY], [2, 8, 0, 1, 16, 0, N, K, K, NO_THRESHOLD], mode)


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of ``w`` ``[N, K]``: codes ``round(w / s)`` (int8) and ``s = max|w| / 127``
    (fp32 ``[N, 1]``; a row of zeros gets codes 0 and ``s = 0``, so its logit is exactly 0).  ``codes * s``
    is the head the ``"int8"`` step uses."""
    wf = w.detach().float()
    s = wf.abs().amax(1, keepdim=True) / 127
    q = torch.round(wf / torch.where(s > 0, s, torch.ones_like(s))).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), s.contiguous()


class FusedStep:
    """A plan of ``engine``'s model for ``mmcompress_fused.fused_step`` (call :func:`fused_problem` first).
    ``step(token, pos)`` -> logits ``[1, V]`` in the model dtype; K/V go into ``engine``'s caches.
    ``head``: ``"model" | "bf16" | "int8"`` (module docstring); :attr:`head` is the one used."""

    def __init__(self, engine, head: str = "model"):
        from ..quant.quantizer import _eps

        cfg, dt = engine.cfg, engine.dtype
        l0 = engine.layers[0]
        tensors = [engine.embed.weight.detach().contiguous(), engine.norm.weight.detach(), engine.cos, engine.sin]
        t, m, self.head = _head_args(engine.head, dt, head)
        self.head_bytes = sum(x.numel() * x.element_size() for x in t)
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
            meta.append(int(l.adapter is not None))
            if l.adapter is not None:
                t, m, _ = _lin_args(l.adapter, dt, None)
                tensors += t
                meta += m
        eps = getattr(engine.norm, "variance_epsilon", getattr(cfg, "rms_norm_eps", 1e-6))
        self._tensors = tensors  # keep what the plan points into alive
        self.plan = torch.ops.mmcompress_fused.fused_plan(tensors, meta, [float(eps), float(l0.scaling), _eps(dt)])
        self._ops = torch.ops.mmcompress_fused
        self._cfg, self._hd = cfg, l0.hd

    def step(self, token: int, pos: int) -> torch.Tensor:
        return self._ops.fused_step(self.plan, token, pos)

    def set_profile(self, on: bool) -> None:
        """Start (and zero) or stop the per-phase timing of the steps (thread 0's clock)."""
        self._ops.fused_set_profile(self.plan, bool(on))

    def profile(self) -> tuple[dict, int]:
        """``({phase: {"own_ops_s", "units_s", "wait_s", "reduce_s"}}, steps)``: seconds of thread 0 per phase,
        summed over the steps since :meth:`set_profile` — its own small ops (residual, norm, smoothing,
        activation quantization and Top-K selection of the phase's input), its share of the phase's row units
        (attention: heads; split-K: its row parts), its waits at the phase's barriers, and its share of the
        split-K reduction units (the sub-phase after the row parts)."""
        t, n = self._ops.fused_profile(self.plan)
        return ({ph: dict(zip(("own_ops_s", "units_s", "wait_s", "reduce_s"), map(float, row)))
                 for ph, row in zip(PHASES, t.tolist())}, int(n))

    def set_unit_cols(self, cols: int = 0) -> None:
        """Output columns per work unit of the sparse projections and dense adapters (kinds 4, 5 of
        fused_step.cpp; a multiple of 64; 0: the default).  For measurements."""
        self._ops.fused_set_unit_cols(self.plan, int(cols))

    def set_split(self, mode: int = 0, parts_per_thread: int = 1) -> int:
        """Work split of the sparse projections (kinds 4, 5): ``mode`` 0 = per projection by fused_step.cpp's
        rule (split-K, i.e. row parts with partial sums and a reduction, when every part gets >= 16 kept
        rows), 1 = output-column units only, 2 = split-K always; ``parts_per_thread`` row parts per thread.
        For measurements and tests.  Returns how many projections (adapters included) a step at torch's
        current thread count splits by rows."""
        return int(self._ops.fused_set_split(self.plan, int(mode), int(parts_per_thread)))

    def set_select(self, mode: int = 0) -> None:
        """Top-K selection of the sparse projections: 0 = the step's AVX-512 selection (default,
        ``topk_select``), 1 = ``sparse_gemv.cpp``'s ``topk_row`` (the one before session 34).  Both keep
        the same channels (ties to the lowest index), so the logits are bit-identical; for measurements."""
        self._ops.fused_set_select(self.plan, int(mode))

    def set_reduce(self, mode: int = 1) -> None:
        """How the split-K residual linears (o_proj, down, the residual adapter) are reduced: 1 = every thread
        adds all the row parts itself and goes on without a barrier (default), 0 = the shared reduction units
        and a barrier (session 33).  Same values either way; for measurements."""
        self._ops.fused_set_reduce(self.plan, int(mode))

    def set_trace(self, on: bool) -> None:
        """Record (on) what the next steps compute per layer, for :meth:`trace` (a debugging aid)."""
        self._ops.fused_set_trace(self.plan, bool(on))

    def trace(self) -> list[dict]:
        """Per layer, of the last step (thread 0's copies, fp32): ``x1`` (input norm's output: q/k/v's
        input), ``attn`` (attention output: o_proj's input), ``x2`` (post-attention norm's output: gate/up's
        input), ``act`` (SiLU(gate) * up: down's input), ``h_mlp`` (the residual stream after the MLP) and
        ``h`` (after the residual adapter; ``h_mlp`` without one)."""
        cfg, t = self._cfg, self._ops.fused_trace(self.plan)
        H, A, I = cfg.hidden_size, cfg.num_attention_heads * self._hd, cfg.intermediate_size
        names, sizes = ("x1", "attn", "x2", "act", "h_mlp", "h"), (H, A, H, I, H, H)
        return [dict(zip(names, row.split(sizes))) for row in t]

    def __del__(self):
        try:
            self._ops.fused_free(self.plan)
        except Exception:  # interpreter shutdown
            pass


PHASES = ("qkv", "attention", "o_proj", "gate_up", "down", "head", "adapter")  # fused_step.cpp's phases, in order

__all__ = ["FusedStep", "HEADS", "PHASES", "fused_problem", "int8_rows", "load"]
