"""What a compressed-tensors export of a MASQuant artifact carries for the vLLM plugin.

The compressed-tensors export serves the **text path**: the text smoothing ``s_T`` (or, where a fold
is inexact, a common vector ``s*``) is folded into the producer of each linear's input, so vLLM feeds
the shared integer kernel ``x_f = x / s*``.  MASQuant's deployed layer (E17) computes, for a token of
modality ``m``::

    y = Q_a(x / s_m) Ŵᵀ + b + 1[m ≠ T] (x / s_m) L_m R_m

and ``x / s_m = x_f ⊙ (s* / s_m)``.  With an exact fold (``s* = s_T``) the shared kernel reads the
same weight ``Ŵ`` whatever the modality, so the plugin (:mod:`mmcompress.vllm_plugin`) needs per
smoothed linear and modality only:

* ``input_ratio``  ``[rows, in]`` float32: ``s_T / s_m`` (row 0, text, is all ones), multiplied into
  ``x_f`` before the shared kernel (its per-token activation quantizer then sees ``x / s_m``);
* ``cmc_left``  ``[rows, in, r]`` float32: ``diag(s* / s_m) L_m`` (row 0 zero), so that
  ``x_f · cmc_left = (x / s_m) L_m``;  ``cmc_right`` ``[rows, r, out]`` float32: ``R_m``, with its output
  columns divided like the linear's own output rows where the export folded a reader's vector into them
  (v_proj's rows carry o_proj's ``s*``).

They are written to a side file (:data:`SIDE_FILE`), named ``layers.{i}.{path}.{tensor}`` (``path``
relative to the decoder layer, e.g. ``self_attn.q_proj``), and the weights file gets an index
(``model.safetensors.index.json``) that lists only the stock tensors: vLLM without the plugin and
transformers read only what the index lists, i.e. the plain text-path checkpoint.  The
``quantization_config`` block gains ``mmcompress_masquant`` (:func:`config_section`), which the plugin's
quantization config claims.

Where the fold was inexact (``--requantize``: untied q/k/v, o_proj under grouped-query attention) the
shared weight was re-quantized from ``Ŵ ⊙ (s*/s_T)``, so the ratio still restores ``x / s_m`` up to that
re-quantization; the export report lists those linears (the modality path is then approximate there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIDE_FILE = "mmcompress_masquant.safetensors"
PLUGIN_NOTE = ("text path for stock vLLM and transformers (every token, image and audio tokens included, uses the "
               "text smoothing and the shared weight); MASQuant's per-modality smoothing and cross-modal compensation, "
               "which compressed-tensors cannot express, are in " + SIDE_FILE + " and are served by the mmcompress "
               "vLLM plugin (docs/vllm_plugin.md)")
SECTION = "mmcompress_masquant"
FORMAT_VERSION = 1


def modality_linears(model, adapter) -> dict[str, tuple[int, str]]:
    """``{module name: (layer index, path in the layer)}`` of quantized linears with a non-text part
    (more than one smoothing row, or CMC factors)."""
    from ..quant.linear import QuantLinear

    out = {}
    for i in range(len(adapter.layers)):
        prefix = adapter.layer_prefix(i)
        for path in adapter.linear_names(i):
            q = model.get_submodule(f"{prefix}.{path}")
            if not isinstance(q, QuantLinear):
                continue
            rows = 0 if q.input_smoothing is None else q.input_smoothing.shape[0]
            if rows > 1 or getattr(q, "rank", 0):
                out[f"{prefix}.{path}"] = (i, path)
    return out


@torch.no_grad()
def side_tensors(model, linears: dict[str, tuple[int, str]], folded: dict[str, torch.Tensor],
                 row_scaled: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plugin's tensors for ``linears``; ``folded[name]`` is the vector folded into the linear's
    input producer (``s*``; the text row when nothing was recorded); ``row_scaled[name]`` the divisor
    the export applied to the linear's own output rows (v_proj carries o_proj's ``s*``), which the
    correction's output ``R_m`` must share."""
    out = {}
    for name, (i, path) in linears.items():
        q = model.get_submodule(name)
        s = q.input_smoothing.double()  # [rows, in]
        s_star = folded.get(name, s[0]).double()
        key = f"layers.{i}.{path}"
        out[f"{key}.input_ratio"] = (s[0][None, :] / s).float().contiguous()
        rank = getattr(q, "rank", 0)
        if rank:
            left = q.cmc_left.double() * (s_star[None, :] / s)[:, :, None]  # diag(s*/s_m) L_m
            left[0] = 0
            right = q.cmc_right.double().clone()
            right[0] = 0
            if row_scaled and name in row_scaled:
                right = right / row_scaled[name].double().to(right.device)[None, None, :]
            out[f"{key}.cmc_left"] = left.float().contiguous()
            out[f"{key}.cmc_right"] = right.float().contiguous()
    return out


def present_modalities(tensors: dict[str, torch.Tensor], adapter) -> list[str]:
    """Modalities (with a placeholder token id in the model) whose rows differ from the text path."""
    out = []
    for row, name in ((1, "image"), (2, "audio")):
        if name not in adapter.modality_token_ids:
            continue
        if any(bool((t[row] != (1 if k.endswith(".input_ratio") else 0)).any())
               for k, t in tensors.items() if not k.endswith(".cmc_right")):
            out.append(name)
    return out


def config_section(adapter, linears: dict, tensors: dict, requantized: list[str], present: list[str]) -> dict:
    """The ``quantization_config["mmcompress_masquant"]`` block the plugin claims."""
    ranks = sorted({int(t.shape[-1]) for k, t in tensors.items() if k.endswith(".cmc_left")})
    return {
        "version": FORMAT_VERSION,
        "file": SIDE_FILE,
        "modality_token_ids": {k: int(v) for k, v in adapter.modality_token_ids.items() if k in ("image", "audio")},
        "rows": {"text": 0, "image": 1, "audio": 2},
        "modalities": present,
        "linears": len(linears),
        "cmc_linears": sum(k.endswith(".cmc_left") for k in tensors),
        "cmc_ranks": ranks,
        "inexact_linears": [n for n in requantized if n in linears],
    }


def write_index(tmp: Path) -> None:
    """``model.safetensors.index.json`` for a checkpoint saved as one ``model.safetensors`` (sharded
    saves already have one): loaders that honour the index then ignore :data:`SIDE_FILE`."""
    if (tmp / "model.safetensors.index.json").is_file():
        return
    from safetensors import safe_open

    with safe_open(str(tmp / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    total = (tmp / "model.safetensors").stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in sorted(keys)}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write(tmp: Path, tensors: dict[str, torch.Tensor], section: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp / SIDE_FILE), metadata={"format": "pt", "mmcompress": SECTION})
    write_index(tmp)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"][SECTION] = section
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


__all__ = ["SIDE_FILE", "SECTION", "PLUGIN_NOTE", "present_modalities", "modality_linears", "side_tensors", "config_section", "write", "write_index"]
