"""Greedy multimodal generation: transformers' prefill, the decode engine's steps.

:func:`greedy_generate` ``(model, **inputs, max_new_tokens=..., do_sample=False)`` returns what
``model.generate(...)`` returns (the ``[1, L + n]`` token tensor) for a Qwen2.5-Omni thinker or a
Qwen2.5-VL model, batch 1, greedy, with audio and/or image inputs:

* **Prefill**: the model's own ``generate`` with one new token (its audio/vision towers, the embedding
  merge, the 3D multimodal-RoPE positions, ``rope_deltas``, a ``DynamicCache``), asked for the prefill's
  raw logits.  The first new token is their argmax (end-of-sequence tokens at ``-inf`` before
  ``min_new_tokens``, as transformers' processor does).  Unless ``fused=False``, the head runs on the last
  prompt position only (the only row generate reads): its logits then equal transformers' to float
  round-off (a one-row GEMM sums in another order), like the fused step's below.
* **Decode**: the prefill's keys and values are copied into a
  :class:`~mmcompress.runtime.decode.DecodeEngine` (fast path, ``text_only=True``) on the text decoder, and
  every further token is one engine step: the **fused C++ step** (:mod:`mmcompress.runtime.fused`, one call
  per token, reading the engine's caches and RoPE table) where it runs the decoder — fp32/bf16 dense and
  deployed integer projections (``IntLinear``: RTN, SmoothQuant with run-time smoothing rows; MASQuant's
  ``IntMASLinear``, see Modality), Qwen2.5-Omni/VL RMSNorms, no forward hooks inside the text decoder or
  on the head (``_step_hooks_problem``) — else the **Python step**, calling the model's own modules
  (embedding, norms, projections — plain, fake-quant or MASQuant —, MLP, head).  ``greedy_generate(...,
  fused=False)`` keeps the Python step (its logits are transformers' bit for bit); the fused step's equal
  the Python step's to float round-off (tests/test_mm_generate.py states the bound), so greedy tokens can
  differ only where two logits are within that round-off.  The RoPE of step ``k`` (``k = 1, 2, ...`` after the
  prefill) is the model's rotary module at the positions transformers passes: its ``_update_model_kwargs_for_generation``
  extends ``position_ids`` ``[4, 1, L]`` (a text row and the three mRoPE rows) by ``last + k`` per row.
  The prompts here end in text, where the three rows agree and equal ``cache_position + rope_deltas``,
  so this is plain RoPE at that position; the rows are computed with the same call, shapes and dtype as
  transformers' step, so the engine's cos/sin are transformers' own
  (:meth:`~mmcompress.runtime.decode.DecodeEngine.set_rope`, before the fused step's plan copies the table).
* **Modality**: a decode step's token is text.  Where a modality router is installed
  (:func:`~mmcompress.models.modality.install_router`), transformers' step publishes all-text ids
  ``[1, 1]`` through it; the Python step publishes the same ids around each step, so per-modality modules
  (MASQuant's rows and CMC terms) take the shared text path exactly as there.  That path is
  ``x / s[TEXT]`` (row 0 of ``input_smoothing``, o_proj's run-time division included) and no low-rank
  correction (``cmc_correction`` is ``None`` for all-text ids), which is what the fused step computes for
  those layers; the route says so with ``DecodeEngine(text_only=True)``, the one condition under which the
  fused step accepts per-modality layers (a plain text engine keeps its Python step for them).

Everything else goes to ``model.generate`` unchanged (:func:`mm_plan` says when): sampling, beams,
processors, stopping criteria, streamers, dict outputs, a padded mask, batches, video inputs, another
model class, a subclass, an instance ``generate``, forward hooks on the modules the engine steps around,
or a text decoder the engine's fast path does not run.  The generation settings are checked as strictly
as :func:`mmcompress.runtime.generate._engine_plan` (the same :func:`~mmcompress.runtime.generate.greedy_settings`).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn

from .decode import MROPE_TEXT_FAMILIES, DecodeEngine, fast_path_problem
from .generate import greedy_settings, plain_prompt

# model class -> its transformers module: these classes exactly, not subclasses (their forward is known)
_CLASSES = {
    "Qwen2_5OmniThinkerForConditionalGeneration": "transformers.models.qwen2_5_omni.modeling_qwen2_5_omni",
    "Qwen2_5_VLForConditionalGeneration": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
}
# model inputs the prefill takes besides input_ids / attention_mask (audio and images, and the token-type
# ids Qwen2.5-VL's processor adds for its position computation; no video)
_MM_INPUTS = ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")


class _TextLM:
    """A multimodal model's text decoder and head as the decode engine reads a causal LM."""

    training = False

    def __init__(self, model: nn.Module):
        self.model = model.model.language_model
        self.lm_head = model.lm_head
        self.config = self.model.config

    def eval(self):
        return self

    def get_input_embeddings(self):
        return self.model.embed_tokens


def _class_ok(model) -> bool:
    cls = type(model)
    return _CLASSES.get(cls.__name__) == cls.__module__


def _hooks_on(mods, allowed=frozenset()) -> str | None:
    """Global forward hooks, or hooks on one of ``mods`` other than ``allowed`` (hook ids)."""
    from torch.nn.modules import module as _m

    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return "global forward hooks"
    for m in mods:
        for d in (m._forward_hooks, m._forward_pre_hooks):
            if any(k not in allowed for k in d):
                return f"forward hooks on {type(m).__name__}"
    return None


def _hooks_problem(model) -> str | None:
    """Forward hooks on a module the engine's step does not call (the model, its inner models, the
    decoder layers and their attention, the rotary module), other than the modality router's."""
    router = getattr(model, "_mmcompress_router", None) or ()
    lm = model.model.language_model
    mods = [model, model.model, lm, lm.rotary_emb]
    for layer in lm.layers:
        mods += [layer, layer.self_attn]
    return _hooks_on(mods, {h.id for h in router if hasattr(h, "id")})


def mm_plan(model: nn.Module, kwargs: dict) -> dict | None:
    """The plan for ``greedy_generate(model, **kwargs)`` on the engine, or ``None`` when
    ``model.generate`` must run it (see the module docstring)."""
    if not _class_ok(model) or model.training or "generate" in model.__dict__:
        return None
    kw = dict(kwargs)
    ids, mask = kw.pop("input_ids", None), kw.pop("attention_mask", None)
    if not plain_prompt(ids, mask):
        return None
    mm = {k: kw.pop(k) for k in _MM_INPUTS if k in kw}
    if any(v is not None and not isinstance(v, torch.Tensor) for v in mm.values()):
        return None
    plan = greedy_settings(model, ids, kw)  # anything left that is not a generation setting: None
    if plan is None:
        return None
    if _hooks_problem(model) is not None or fast_path_problem(_TextLM(model), MROPE_TEXT_FAMILIES) is not None:
        return None
    plan["prefill"] = {"input_ids": ids, **({"attention_mask": mask} if mask is not None else {}),
                       **{k: v for k, v in mm.items() if v is not None}}
    if "generation_config" in kw:
        plan["prefill"]["generation_config"] = kw["generation_config"]
    return plan


def greedy_generate(model: nn.Module, *, fused: bool | None = None, **kwargs):
    """``model.generate(**kwargs)``'s tokens, with the decode steps on the engine where :func:`mm_plan`
    allows it (else ``model.generate(**kwargs)`` itself).  ``fused``: the engine's fused C++ step where
    ``fused_problem`` and ``_step_hooks_problem`` allow it (``None``, default: silently; ``True``: one line on stderr when it falls
    back), or the engine's Python step (``False``: transformers' step logits bit for bit)."""
    plan = mm_plan(model, kwargs)
    if plan is None:
        return model.generate(**kwargs)
    return _run(model, plan, fused=fused)


def _step_hooks_problem(model) -> str | None:
    """Forward hooks on a module of the text decoder or the head, which the fused step does not call."""
    lm = model.model.language_model
    return _hooks_on([*lm.modules(), *model.lm_head.modules()])


def _last_position(mod, args):
    """The head's input cut to the last position: transformers' prefill reads only that row of the
    logits, and the head over every prompt position is a fifth of the prefill's work at 49k tokens of
    vocabulary (the Omni thinker's forward takes no ``logits_to_keep``)."""
    return (args[0][:, -1:], *args[1:])


def _cache_kv(cache, i):
    layer = cache.layers[i]
    return layer.keys, layer.values


@torch.no_grad()
def _run(model, plan, logits_out: list | None = None, fused: bool | None = None):
    from ..models.modality import modality_context

    ids, new, min_new = plan["ids"], plan["max_new_tokens"], plan["min_new_tokens"]
    eos_id = plan["eos_token_id"]
    eos = sorted(set([eos_id] if isinstance(eos_id, int) else (eos_id or [])))
    L = ids.shape[1]
    lm = model.model.language_model
    seen = []

    def grab(mod, args, kw):
        seen.append(kw.get("position_ids"))

    handles = [lm.register_forward_pre_hook(grab, with_kwargs=True)]
    if fused is not False:  # the head on the last position only (the model's forward has no logits_to_keep)
        handles.append(model.lm_head.register_forward_pre_hook(_last_position))
    try:
        out = type(model).generate(model, **plan["prefill"], max_new_tokens=1, min_new_tokens=None, min_length=0,
                                   do_sample=False, num_beams=1, use_cache=True, return_dict_in_generate=True,
                                   output_logits=True)
    finally:
        for h in handles:
            h.remove()
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    pos = seen[0] if len(seen) == 1 else None
    if cache is None or out.logits is None or not isinstance(pos, torch.Tensor) or pos.dim() != 3 \
            or pos.shape[-1] != L or pos.shape[0] not in (3, 4):
        raise RuntimeError("mmcompress: unexpected prefill from transformers' generate "
                           f"(cache {type(cache).__name__}, {len(seen)} text-model calls)")

    def pick(lg, i):
        if logits_out is not None:
            logits_out.append(lg.detach().float().clone())
        if eos and i < min_new:
            lg = lg.clone()
            lg[..., eos] = float("-inf")
        return lg.argmax(-1, keepdim=True)

    nxt = pick(out.logits[0], 0).to(ids.device)
    toks = [ids, nxt]
    if new == 1 or int(nxt) in eos:
        return torch.cat(toks, dim=1)
    # text_only: every decode step's token is text (module docstring), which lets the fused step run MASQuant's
    # deployed layers on their text row; the engine decides on the fused step below, not at construction
    eng = DecodeEngine(_TextLM(model), max_len=L + new, path="fast", fused=False, families=MROPE_TEXT_FAMILIES,
                       text_only=True)
    if fused is not False:  # the fused plan is built at the first step, after the RoPE rows below
        hooks = _step_hooks_problem(model)
        if hooks is None:
            eng._use_fused(notice=fused is True)
        elif fused:
            print(f"mmcompress: fused decode step unavailable ({hooks}); Python step", file=sys.stderr)
    eng._reset()
    for i in range(len(eng.layers)):
        k, v = _cache_kv(cache, i)
        eng._kc[i][:, :, :L].copy_(k)
        eng._vc[i][:, :, :L].copy_(v)
    # RoPE rows of the decode steps: transformers' position_ids for step k are the prompt's last + k (per row),
    # of which the text model's rotary module reads the three mRoPE rows
    last = pos[..., -1:]
    rows = last[1:] if last.shape[0] == 4 else last
    dummy = torch.empty(1, 1, 0, dtype=eng.dtype, device=eng.device)
    cs = [lm.rotary_emb(dummy, rows + k) for k in range(1, new)]
    eng.set_rope(L, torch.stack([c[0, 0] for c, _ in cs]), torch.stack([s[0, 0] for _, s in cs]))
    routed = getattr(model, "_mmcompress_router", None) is not None and not eng.fused  # the fused step calls no module
    text = torch.zeros(1, 1, dtype=torch.int8, device=eng.device)  # a decode step's ids under the router
    for i in range(1, new):
        with modality_context(text) if routed else contextlib.nullcontext():
            lg = eng._step(nxt.to(eng.device), L + i - 1)
        nxt = pick(lg, i).to(ids.device)
        toks.append(nxt)
        if int(nxt) in eos:
            break
    return torch.cat(toks, dim=1)


__all__ = ["greedy_generate", "mm_plan"]
