"""The decode engine behind ``generate``: ``mmcompress.load(...)`` models' ``model.generate`` and the
``mmcompress generate`` command (:mod:`mmcompress.runtime.cli`).

:func:`install_engine_generate` (called by :func:`mmcompress.load`) gives a loaded model a ``generate``
that runs :class:`~mmcompress.runtime.decode.DecodeEngine` where the engine computes exactly what
transformers' ``generate`` would: greedy, batch 1, the engine's fast path (Llama / Qwen2 / Mistral
layouts), an all-ones attention mask, and nothing in the generation config or the call that changes the
tokens (no sampling, beams, repetition penalties, logits processors, stopping criteria, streamers,
multimodal inputs, dict outputs).  Everything else goes to transformers' ``generate`` unchanged, so the
tokens are the same either way.  ``type(model).generate(model, ...)`` always reaches transformers'.
Greedy generation with audio/image inputs (Qwen2.5-Omni thinker, Qwen2.5-VL) has its own route:
:mod:`mmcompress.runtime.mmgenerate` (transformers' prefill, the engine's decode steps).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from .decode import DecodeEngine, fast_path_problem

# Generation-config fields the engine reproduces (beside their defaults): the lengths, the stop and
# special tokens, and settings that do not change greedy tokens.
_LENGTH_KEYS = {"max_new_tokens", "max_length", "min_new_tokens", "min_length"}
_NEUTRAL_KEYS = {"eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache",
                 "transformers_version", "_from_model_config", "cache_implementation", "temperature", "top_k", "top_p",
                 "num_beams", "num_return_sequences", "do_sample", "return_dict_in_generate", "output_scores",
                 "output_logits", "output_attentions", "output_hidden_states", "_commit_hash"}
# ... of which these must hold these values (temperature / top-k / top-p are ignored by greedy search)
_MUST = {"do_sample": (None, False), "num_beams": (None, 1), "num_return_sequences": (None, 1),
         "return_dict_in_generate": (None, False), "output_scores": (None, False), "output_logits": (None, False),
         "output_attentions": (None, False), "output_hidden_states": (None, False)}


def _engine_plan(model: nn.Module, inputs, kwargs: dict) -> dict | None:
    """The engine's arguments for this ``generate`` call, or ``None`` when transformers must run it."""
    if model.training or fast_path_problem(model) is not None:
        return None
    kw = dict(kwargs)
    ids = inputs if inputs is not None else kw.pop("input_ids", None)
    if not plain_prompt(ids, kw.pop("attention_mask", None)):
        return None
    return greedy_settings(model, ids, kw)


def plain_prompt(ids, mask) -> bool:
    """``ids`` is one prompt ``[1, L]`` of integer tokens and ``mask`` is absent or all ones of its shape."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        return False
    if ids.dtype not in (torch.int64, torch.int32):
        return False
    return mask is None or (isinstance(mask, torch.Tensor) and mask.shape == ids.shape and bool((mask == 1).all()))


def greedy_settings(model: nn.Module, ids: torch.Tensor, kw: dict) -> dict | None:
    """The engine's arguments for greedy ``generate`` of ``ids`` ``[1, L]`` with the generation settings
    ``kw`` (the call's keyword arguments less its model inputs; may hold ``generation_config``), or
    ``None`` when anything in them (or in the model's generation config) changes the tokens in a way the
    engine does not reproduce, or when the length is transformers' own default."""
    kw = dict(kw)
    base = kw.pop("generation_config", None) or getattr(model, "generation_config", None)
    if base is None:
        return None
    gc = copy.deepcopy(base)
    unused = gc.update(**kw)  # what is not a generation setting: model inputs, processors, streamers, ...
    if any(v is not None for v in unused.values()):
        return None
    diff = gc.to_diff_dict()
    if any(k not in _LENGTH_KEYS | _NEUTRAL_KEYS for k in diff):
        return None
    if any(diff.get(k) not in ok for k, ok in _MUST.items() if k in diff):
        return None
    L = ids.shape[1]
    if gc.max_new_tokens is not None:
        new = gc.max_new_tokens
    elif diff.get("max_length") is not None:
        new = gc.max_length - L
    else:
        return None  # transformers' own default length: let it apply its rules
    if new < 1:
        return None
    min_new = max(gc.min_new_tokens or 0, (gc.min_length or 0) - L)
    return {"ids": ids, "max_new_tokens": int(new), "min_new_tokens": int(min_new), "eos_token_id": gc.eos_token_id}


def _engine_generate(self, inputs=None, **kwargs):
    """``generate`` of a model loaded by :func:`mmcompress.load` (see the module docstring).  The first call
    puts the sparse layers on the decode kernels (:func:`prepare`, as ``mmcompress generate`` runs them:
    their decode steps on the CPU kernels, so the engine can take its fused step), whichever of the engine
    and transformers then runs it."""
    if not getattr(self, "_mmcompress_prepared", False):
        prepare(self)
        self._mmcompress_prepared = True
    plan = _engine_plan(self, inputs, kwargs)
    if plan is None:  # inputs only when given: remote-code generate()s name their first argument otherwise
        return type(self).generate(self, **kwargs) if inputs is None else type(self).generate(self, inputs, **kwargs)
    ids = plan.pop("ids")
    eng = DecodeEngine(self, max_len=ids.shape[1] + plan["max_new_tokens"], path="fast")
    return eng.generate(ids, **plan)


def install_engine_generate(model: nn.Module) -> nn.Module:
    """Route ``model.generate`` through the decode engine where it applies (in place; returns ``model``)."""
    if not hasattr(type(model), "generate"):
        return model
    model.generate = _engine_generate.__get__(model)
    return model


def kernel_notice(model: nn.Module) -> str | None:
    """One line when a layer of ``model`` runs on a torch fallback because this CPU (or build) has no
    kernel for it, else ``None``."""
    from ..quant.deployed import IntLinear
    from ..quant.kernels import cpu as qcpu
    from ..sparse.kernels import cpu as scpu
    from ..sparse.linear import sparse_linears

    parts = []
    ints = [m for m in model.modules() if isinstance(m, IntLinear) and m.weight_codes.device.type == "cpu"]
    if ints and not qcpu.available():
        parts.append(f"{len(ints)} integer layer(s) on the torch path (no CPU integer kernel: {qcpu.error()})")
    sparse = [m for m in sparse_linears(model) if m.weight.device.type == "cpu"]
    if sparse and not scpu.available():
        parts.append(f"{len(sparse)} sparse layer(s) on the torch path (no CPU sparse kernel: {scpu.error()})")
    return ("mmcompress: " + "; ".join(parts) + " — correct, slower") if parts else None


def prepare(model: nn.Module, quiet: bool = False) -> nn.Module:
    """Sparse layers on the decode kernels (each keeps its saved prefill setting); a one-line notice on
    stderr (unless ``quiet``) when a kernel is missing for this CPU."""
    from ..sparse.decode import set_sparse_backend
    from ..sparse.kernels import cpu as scpu
    from ..sparse.linear import sparse_linears

    sl = sparse_linears(model)
    if sl and sl[0].weight.device.type == "cpu" and scpu.available():
        set_sparse_backend(model, "cpu")
    note = kernel_notice(model)
    if note and not quiet:
        print(note, file=sys.stderr)
    return model


__all__ = ["greedy_settings", "install_engine_generate", "kernel_notice", "prepare"]
