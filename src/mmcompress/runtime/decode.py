"""The decode engine: greedy or sampled generation for a loaded model with a static KV cache.

``DecodeEngine(model).generate(ids, max_new_tokens)`` returns the same tokens as HF
``model.generate(ids, do_sample=False, max_new_tokens=...)`` (tested on tiny Llama and Qwen2
artifacts, W8A8 and W4A16, integer runtime) without HF's per-token machinery.

Two paths, chosen once per model (:attr:`DecodeEngine.path`):

``"fast"``
    Llama-like decoders (``llama``, ``qwen2``, ``mistral``: pre-norm, RoPE, GQA, gated MLP, no
    sliding window, plain or LaRoSA's residual-adapted layers).  One Python loop over the layers
    that calls the model's own modules for what carries weights (embedding, norms, the seven
    projections — ``nn.Linear``, the deployed ``IntLinear``, ``SparseLinear``,
    ``SparseInt8Linear`` —, the MLP activation, the LM head) and does the rest itself: RoPE from a
    cos/sin table built once with the model's rotary module, K/V written into a preallocated
    ``[1, kv_heads, max_len, head_dim]`` cache per layer, one ``scaled_dot_product_attention`` call on
    the filled part.  No attention-mask construction, cache objects, output dataclasses, logits
    processors or stopping criteria per token.  The arithmetic is HF's (same modules, same RoPE
    formula, same SDPA), so the logits agree to float round-off.  In single-token steps, deployed
    integer linears that read the same input (q/k/v, gate/up) quantize it once and run their kernels
    on the same codes, and every deployed linear calls its kernel directly (:class:`_SharedInput`;
    bit-identical to the modules' own forward).
``"hf"``
    Any other causal LM: the model's own forward with a transformers ``StaticCache`` (preallocated),
    one call per token, without ``generate``'s per-token overhead.

``fused`` (default ``None``: when supported, silently): the fast path's single-token steps run in one
C++ call per token (:mod:`mmcompress.runtime.fused`) when every layer is a plain Llama/Qwen2/Mistral layer
(or a Qwen2.5-Omni/VL text layer, on :mod:`~mmcompress.runtime.mmgenerate`'s route) with ``nn.Linear`` or
deployed integer projections (fp32 or bf16 model, CPU with the integer kernels);
``fused=True`` asks for it and prints one line when it falls back to the Python step; ``fused=False``
keeps the Python step.  Logits equal the Python step's to float round-off (tests/test_fused_decode.py).
``head="bf16" | "int8"`` gives the fused step its own packed copy of a dense LM head (runtime/fused.py:
2 or 1 bytes per weight read per step instead of the model's; the logits then differ by the head's
rounding, bounded there); ``"model"`` (default) keeps the model's head.  Without the fused step the head
is the model's (one line on stderr says so when another was asked for).

``text_only=True`` declares that every token the engine steps is a text token (set by
:mod:`mmcompress.runtime.mmgenerate`, whose decode steps are all text under the modality router).  The fused
step then also runs MASQuant's deployed layers (``IntMASLinear``: per-modality smoothing rows, a low-rank
correction for image/audio tokens) with the text row and no correction, which is what those layers compute
for all-text ids.  It is never inferred: without it a per-modality layer keeps the Python step.

``compile=True`` additionally captures the fast path's single-token step with ``torch.compile`` (the
integer kernels and the activation quantizer ``quantize_act`` are registered with fake implementations so
that the graph keeps them as opaque custom ops).  The step then attends over the whole preallocated cache
under a position mask, so its shapes never change.  If compiling fails (no C++ compiler for inductor, an
op it cannot trace), the engine prints one line on stderr and stays eager.  Experimental: before the
quantizer became one op, the compiled step's greedy tokens on smollm2 W8A8 differed from the eager step's;
inductor still fuses the norms (its own reduction order), so bit-equality with eager is not guaranteed
(docs/runtime.md), and eager is the default.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

FAST_FAMILIES = ("llama", "qwen2", "mistral")
# The text decoders of Qwen2.5-Omni's thinker and Qwen2.5-VL: Qwen2 layers under multimodal RoPE.  Only for
# :mod:`mmcompress.runtime.mmgenerate` (HF prefill, engine decode), which hands the engine the RoPE rows.
MROPE_TEXT_FAMILIES = ("qwen2_5_omni_text", "qwen2_5_vl_text")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class _SharedInput:
    """Deployed integer linears that read the same input (q/k/v; gate/up), for single-token steps: the
    input is smoothed and quantized once, then each weight's kernel runs on the same codes.  The same
    operations, in the same dtypes, as each :class:`~mmcompress.quant.deployed.IntLinear` forward alone,
    so the outputs are bit-identical; holds references to the modules' buffers, no copies."""

    def __init__(self, mods):
        m0 = mods[0]
        self.mods, self.abits, self.smoothing = mods, m0.scheme.abits, m0.input_smoothing
        self.weight_only = m0.scheme.weight_only
        self.args = []
        for m in mods:
            sch = m.scheme
            group = sch.group_size if 0 < sch.group_size < m.in_features else 0
            scale, zero = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
                           for t in (m.weight_scale, m.weight_zero))
            self.args.append((m.weight_codes, scale, zero, 4 if sch.wbits <= 4 else 8, group, sch.sym, m.bias))
        from ..quant.kernels import _bf16_ok

        self.bf16_ok = [_bf16_ok(m.in_features, a[4]) for m, a in zip(mods, self.args)]

    @staticmethod
    def make(mods):
        """A group for ``mods``, or ``None`` when one of them is not a plain deployed linear on our kernel."""
        from ..quant import kernels
        from ..quant.deployed import IntLinear

        if any(type(m) is not IntLinear or m.input_sparsifier is not None for m in mods):
            return None
        m0 = mods[0]
        for m in mods:
            if m.in_features != m0.in_features or m.scheme.abits != m0.scheme.abits:
                return None
            if kernels.path_for(m.scheme, m.in_features, m.weight_codes.device, 1) != "cpu":
                return None
            s = m.input_smoothing
            if (s is None) != (m0.input_smoothing is None) or (s is not None and (
                    s.shape[0] != 1 or not torch.equal(s, m0.input_smoothing))):
                return None
        return _SharedInput(mods)

    def __call__(self, x):
        from ..quant.kernels import quantize_act

        ops = torch.ops.mmcompress_int
        xs = x if self.smoothing is None else x / self.smoothing[0].to(x.dtype)
        xs = xs.reshape(-1, xs.shape[-1])
        if self.weight_only:  # as int_matmul: bf16 activations on the bf16 kernel where it takes the shape
            xf = xs.float().contiguous()
            xb = xs.contiguous() if xs.dtype == torch.bfloat16 else None
            ys = [ops.bf16_act_gemm(xb, c, sc, z, b, g, sym) if xb is not None and b == 4 and ok
                  else ops.float_act_gemm(xf, c, sc, z, b, g, sym) for (c, sc, z, b, g, sym, _), ok in zip(self.args, self.bf16_ok)]
        else:
            xq, sx = quantize_act(xs, self.abits)
            ys = [ops.int8_act_gemm(xq, sx, c, sc, z, b, g, sym) for c, sc, z, b, g, sym, _ in self.args]
        out = []
        for y, a in zip(ys, self.args):
            y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
            out.append(y if a[-1] is None else y + a[-1])
        return out


class _Layer:
    """What the fast path needs of one decoder layer (references into the model; no copies)."""

    __slots__ = ("ln1", "q", "k", "v", "o", "ln2", "mlp", "adapt", "adapter", "scaling", "hd", "qkv", "gate_up",
                 "act", "down", "o1", "down1")

    def __init__(self, layer: nn.Module):
        from ..sparse.merge import ResidualAdaptedLayer

        self.adapt = self.adapter = None  # LaRoSA's residual adapter: its forward (h -> h A) and its module
        if isinstance(layer, ResidualAdaptedLayer):
            if layer.residual_adapter is not None:
                self.adapt, self.adapter = layer._adapt, layer.residual_adapter
            layer = layer.layer
        att = layer.self_attn
        self.ln1, self.ln2, self.mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
        self.q, self.k, self.v, self.o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        self.scaling, self.hd = att.scaling, att.head_dim
        self.qkv = _SharedInput.make([self.q, self.k, self.v])
        mlp = self.mlp
        self.gate_up = _SharedInput.make([mlp.gate_proj, mlp.up_proj])
        self.act, self.down = mlp.act_fn, mlp.down_proj
        self.o1, self.down1 = _SharedInput.make([self.o]), _SharedInput.make([self.down])  # one-module "groups"


def fast_path_problem(model: nn.Module, families: tuple = FAST_FAMILIES) -> str | None:
    """``None`` if the fast path runs ``model``, else why not (the engine then uses the ``"hf"`` path)."""
    cfg = _text_config(model)
    mt = getattr(cfg, "model_type", None)
    if mt not in families:
        return f"model type {mt!r} (fast path: {', '.join(families)})"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "not a plain decoder-only layout (model.model.{embed_tokens,layers,norm,rotary_emb})"
    if not hasattr(model, "lm_head"):
        return "no lm_head"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window layers"
    if mt == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope == "dynamic":
        return "dynamic RoPE"
    from ..sparse.merge import ResidualAdaptedLayer

    for layer in inner.layers:
        base = layer.layer if isinstance(layer, ResidualAdaptedLayer) else layer
        if type(base).forward is not _decoder_forward(base):
            return f"decoder layer {type(base).__name__} has its own forward"
        att = getattr(base, "self_attn", None)
        if att is None or not all(hasattr(att, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")):
            return f"decoder layer {type(base).__name__} has no standard attention"
        if type(base.mlp).forward is not _mlp_forward(base.mlp):
            return f"MLP {type(base.mlp).__name__} has its own forward"
        if type(att).forward is not _attn_forward(att):
            return f"attention {type(att).__name__} has its own forward"
    return None


def _hf_class(obj, suffix):
    import importlib

    mod = importlib.import_module(type(obj).__module__)
    prefix = type(obj).__name__.split(suffix)[0] if suffix in type(obj).__name__ else ""
    return getattr(mod, prefix + suffix, None)


def _decoder_forward(layer):  # the family's own class: a subclass overriding forward is not ours to skip
    cls = _hf_class(layer, "DecoderLayer")
    return None if cls is None else cls.forward


def _mlp_forward(mlp):
    cls = _hf_class(mlp, "MLP")
    return None if cls is None else cls.forward


def _attn_forward(att):
    cls = _hf_class(att, "Attention")
    return None if cls is None else cls.forward


def _register_fake_kernels() -> None:
    """Shape functions for our custom ops, so that ``torch.compile`` can keep them in a graph."""
    if getattr(_register_fake_kernels, "done", False):
        return
    _register_fake_kernels.done = True
    try:
        from ..quant.kernels import cpu as qcpu

        if qcpu.available():
            @torch.library.register_fake("mmcompress_int::int8_act_gemm")
            def _(xq, sx, w, scale, zero, bits, group, sym):
                return xq.new_empty((xq.shape[0], scale.shape[0]), dtype=torch.float32)

            @torch.library.register_fake("mmcompress_int::float_act_gemm")
            def _(x, w, scale, zero, bits, group, sym):
                return x.new_empty((x.shape[0], scale.shape[0]), dtype=torch.float32)

            @torch.library.register_fake("mmcompress_int::bf16_act_gemm")
            def _(x, w, scale, zero, bits, group, sym):
                return x.new_empty((x.shape[0], scale.shape[0]), dtype=torch.float32)

            @torch.library.register_fake("mmcompress_int::quantize_act")
            def _(x, bits, eps):
                return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)
    except Exception as e:  # already registered elsewhere, or an older torch
        print(f"mmcompress: no fake kernels for torch.compile ({type(e).__name__}: {e})", file=sys.stderr)


class DecodeEngine:
    """Static-cache generation for ``model`` (see the module docstring).  ``max_len`` bounds prompt +
    new tokens; ``path="auto" | "fast" | "hf"``."""

    def __init__(self, model: nn.Module, max_len: int = 2048, *, path: str = "auto", compile: bool = False,
                 fused: bool | None = None, head: str = "model", families: tuple = FAST_FAMILIES,
                 text_only: bool = False):
        from .fused import HEADS

        if path not in ("auto", "fast", "hf"):
            raise ValueError(f"unknown decode path {path!r}; expected auto, fast or hf")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
        self.head_mode = head
        self.text_only = bool(text_only)  # every stepped token is text (module docstring)
        self.model = model.eval()
        self.max_len = int(max_len)
        self.cfg = _text_config(model)
        problem = fast_path_problem(model, families)
        if path == "fast" and problem:
            raise ValueError(f"the fast decode path cannot run this model: {problem}")
        self.path = "hf" if (path == "hf" or problem) else "fast"
        self.why_hf = problem if path == "auto" else None
        emb = model.get_input_embeddings().weight
        self.device, self.dtype = emb.device, emb.dtype
        self.compiled = self.fused = False
        self._fused = None
        if self.path == "fast":
            inner = model.model
            self.embed, self.norm, self.head = inner.embed_tokens, inner.norm, model.lm_head
            self.layers = [_Layer(layer) for layer in inner.layers]
            self.kv_heads = self.cfg.num_key_value_heads
            self.gqa = self.cfg.num_attention_heads != self.kv_heads
            pos = torch.arange(self.max_len, device=self.device)[None]
            with torch.no_grad():
                cos, sin = inner.rotary_emb(torch.empty(0, dtype=self.dtype, device=self.device), pos)
            self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim], the model dtype (as HF hands them over)
            self._kc = self._vc = None
            self._step = self._decode_step
            if compile:
                self._compile()
        if fused is not False and not self.compiled:
            self._use_fused(notice=fused is True)
        if head != "model" and not self.fused:
            print(f"mmcompress: head {head!r} needs the fused decode step; the model's own head", file=sys.stderr)

    def _use_fused(self, notice: bool):
        """Single-token steps in one C++ call (``runtime/fused.py``) when every layer is supported; else
        the Python step, with a one-line notice when the caller asked for the fused step."""
        from .fused import fused_problem

        problem = fused_problem(self) if self.path == "fast" else (self.why_hf or "not on the fast path")
        if problem is None:
            self.fused = True
            self._step = self._fused_step
        elif notice:
            print(f"mmcompress: fused decode step unavailable ({problem}); Python step", file=sys.stderr)

    def set_rope(self, start: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Replace the RoPE rows ``start, start + 1, ...`` (``cos``/``sin`` ``[n, head_dim]``) of the table the
        steps read (a fused plan, which copies the table, is rebuilt at the next step)."""
        end = start + cos.shape[0]
        self.cos, self.sin = self.cos.clone(), self.sin.clone()  # the rotary module's output may be a view
        self.cos[start:end] = cos
        self.sin[start:end] = sin
        self._fused = None

    def _fused_step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        if self._fused is None:
            from .fused import FusedStep

            self._fused = FusedStep(self, head=self.head_mode)  # after _reset: the plan points into the caches
        return self._fused.step(int(tok), pos)

    # -- caches ------------------------------------------------------------------------------------

    def _reset(self):
        if self.path == "hf":
            from transformers import StaticCache

            self._cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            return
        if self._kc is None:
            shape = lambda l: (1, self.kv_heads, self.max_len, l.hd)  # noqa: E731
            self._kc = [torch.zeros(shape(l), dtype=self.dtype, device=self.device) for l in self.layers]
            self._vc = [torch.zeros(shape(l), dtype=self.dtype, device=self.device) for l in self.layers]

    # -- the fast path -------------------------------------------------------------------------------

    def _attn_qkv(self, l: _Layer, x, cos, sin, T):
        q, k, v = l.qkv(x) if (T == 1 and l.qkv is not None) else (l.q(x), l.k(x), l.v(x))
        q = q.view(1, T, -1, l.hd).transpose(1, 2)
        k = k.view(1, T, -1, l.hd).transpose(1, 2)
        v = v.view(1, T, -1, l.hd).transpose(1, 2)
        q = (q * cos) + (_rotate_half(q) * sin)
        k = (k * cos) + (_rotate_half(k) * sin)
        return q, k, v

    @staticmethod
    def _mlp(l: _Layer, x, T):
        if T == 1 and l.gate_up is not None:
            g, u = l.gate_up(x)
            y = l.act(g) * u
            return l.down1(y)[0] if l.down1 is not None else l.down(y)
        return l.mlp(x)

    def _forward(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        """Logits of the last of ``ids`` ``[1, T]`` at positions ``pos0 …``; fills the cache."""
        T = ids.shape[1]
        end = pos0 + T
        h = self.embed(ids)
        cos, sin = self.cos[pos0:end][None, None], self.sin[pos0:end][None, None]
        for i, l in enumerate(self.layers):
            x = l.ln1(h)
            q, k, v = self._attn_qkv(l, x, cos, sin, T)
            kc, vc = self._kc[i], self._vc[i]
            kc[:, :, pos0:end] = k
            vc[:, :, pos0:end] = v
            keys, vals = kc[:, :, :end], vc[:, :, :end]
            if T == 1 or pos0 == 0:
                a = F.scaled_dot_product_attention(q, keys, vals, is_causal=T > 1, scale=l.scaling, enable_gqa=self.gqa)
            else:  # a chunk after earlier tokens: causal with an offset
                mask = torch.ones(T, end, dtype=torch.bool, device=h.device).tril(pos0)
                a = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, scale=l.scaling, enable_gqa=self.gqa)
            a = a.transpose(1, 2).reshape(1, T, -1)
            h = h + (l.o1(a)[0] if T == 1 and l.o1 is not None else l.o(a))
            h = h + self._mlp(l, l.ln2(h), T)
            if l.adapt is not None:
                h = l.adapt(h)
        return self.head(self.norm(h[:, -1:]))[:, -1]

    def _decode_step(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        return self._forward(tok, pos)

    def _static_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token at ``pos`` (a 0-d tensor) over the whole cache under a mask: fixed shapes, for
        ``torch.compile``."""
        h = self.embed(tok)
        cos = self.cos.index_select(0, pos.reshape(1))[None, None]
        sin = self.sin.index_select(0, pos.reshape(1))[None, None]
        mask = (torch.arange(self.max_len, device=h.device) <= pos)[None, None, None]
        for i, l in enumerate(self.layers):
            x = l.ln1(h)
            q, k, v = self._attn_qkv(l, x, cos, sin, 1)
            self._kc[i].index_copy_(2, pos.reshape(1), k)
            self._vc[i].index_copy_(2, pos.reshape(1), v)
            a = F.scaled_dot_product_attention(q, self._kc[i], self._vc[i], attn_mask=mask, scale=l.scaling,
                                               enable_gqa=self.gqa)
            a = a.transpose(1, 2).reshape(1, 1, -1)
            h = h + (l.o1(a)[0] if l.o1 is not None else l.o(a))
            h = h + self._mlp(l, l.ln2(h), 1)
            if l.adapt is not None:
                h = l.adapt(h)
        return self.head(self.norm(h))[:, -1]

    def _compile(self):
        _register_fake_kernels()
        try:
            fn = torch.compile(self._static_step, dynamic=False, fullgraph=False)
        except Exception as e:
            print(f"mmcompress: torch.compile of the decode step unavailable ({type(e).__name__}: {e}); eager",
                  file=sys.stderr)
            return
        self._compiled_fn = fn
        self._step = self._compiled_step
        self.compiled = True

    def _compiled_step(self, tok, pos: int):
        try:
            return self._compiled_fn(tok, torch.tensor(pos, device=self.device))
        except Exception as e:  # inductor without a compiler, an untraceable op, ...
            msg = str(e).strip().splitlines()
            print(f"mmcompress: torch.compile of the decode step failed ({type(e).__name__}: "
                  f"{msg[0] if msg else ''}); eager from here", file=sys.stderr)
            self._step = self._decode_step
            self.compiled = False
            return self._decode_step(tok, pos)

    # -- the hf path ---------------------------------------------------------------------------------

    def _hf_forward(self, ids, pos0):
        # positions follow from the cache (as in generate); pos0 is implied by what the cache holds
        out = self.model(input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # -- generation ------------------------------------------------------------------------------------

    @staticmethod
    def _pick(logits, do_sample, temperature, top_k, top_p, generator):
        if not do_sample:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / max(temperature, 1e-6)
        if top_k and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if top_p < 1.0:
            srt, idx = logits.sort(-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            drop = cum - srt.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
        return torch.multinomial(logits.softmax(-1), 1, generator=generator)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
                 eos_token_id: int | list[int] | None = None, timings: dict | None = None, min_new_tokens: int = 0,
                 on_token=None) -> torch.Tensor:
        """``input_ids`` ``[1, L]`` followed by up to ``max_new_tokens`` tokens (stops after an EOS token
        when ``eos_token_id`` is given; before ``min_new_tokens`` new tokens the EOS tokens' logits are
        ``-inf``, as HF's ``min_new_tokens``).  ``on_token(id)`` is called with each new token as soon as
        it is chosen (streaming).  ``timings``, if a dict, receives ``prefill_s`` and the per-token
        ``step_s`` list (the decode steps, excluding the prefill that yields the first new token)."""
        ids = input_ids.to(self.device)
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError("the decode engine runs batch 1: input_ids must be [1, L]")
        L = ids.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if L + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {L} + {max_new_tokens} new tokens exceed the engine's max_len {self.max_len}")
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        self._reset()
        fwd = self._forward if self.path == "fast" else self._hf_forward
        step = self._step if self.path == "fast" else self._hf_forward
        suppress = sorted(eos) if eos and min_new_tokens > 0 else None

        def pick(lg, i):
            if suppress is not None and i < min_new_tokens:
                lg = lg.clone()
                lg[..., suppress] = float("-inf")
            return self._pick(lg, do_sample, temperature, top_k, top_p, generator)

        out = [ids]
        t0 = time.perf_counter()
        nxt = pick(fwd(ids, 0), 0)
        steps = []
        if timings is not None:
            timings["prefill_s"] = time.perf_counter() - t0
        out.append(nxt)
        if on_token is not None:
            on_token(int(nxt))
        for i in range(1, max_new_tokens):
            if eos and int(nxt) in eos:
                break
            t0 = time.perf_counter()
            nxt = pick(step(nxt, L + i - 1), i)
            steps.append(time.perf_counter() - t0)
            out.append(nxt)
            if on_token is not None:
                on_token(int(nxt))
        if timings is not None:
            timings["step_s"] = steps
        return torch.cat(out, dim=1)


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, **kw) -> torch.Tensor:
    """One-off :meth:`DecodeEngine.generate` with a cache sized for this call."""
    eng = DecodeEngine(model, max_len=input_ids.shape[-1] + max_new_tokens)
    return eng.generate(input_ids, max_new_tokens, **kw)


__all__ = ["DecodeEngine", "FAST_FAMILIES", "MROPE_TEXT_FAMILIES", "fast_path_problem", "generate"]
