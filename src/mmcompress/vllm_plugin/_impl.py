"""The plugin's quantization config, linear method and modality routing (imported by vLLM only).

Per quantized linear with a modality part, for a token of modality ``m`` (rows: 0 text, 1 image,
2 audio) whose input reached the layer as ``x_f = x / s*`` (the export folded ``s*``, normally the
text vector ``s_T``, into the producer)::

    y = K(x_f ⊙ ratio_m) + x_f · left_m · right_m        ratio_m = s_T / s_m,  left_m = diag(s*/s_m) L_m

``K`` is the compressed-tensors scheme vLLM picked for the layer (its per-token activation quantizer
then sees ``x / s_m``, as MASQuant's E17 asks); text tokens (``m = 0``) run ``K(x_f)`` only, exactly
the plain export.  vLLM merges q/k/v and gate/up into one layer: the shards' ratios are applied per
group of shards with the same vector (one kernel call when MASQuant was tied) and the correction
factors are concatenated (``left``) and placed block-diagonally (``right``).

Which token is which: :func:`publish` is called by the model subclasses (``_models``) in
``embed_input_ids`` — the only place where vLLM's model runner shows the scheduled token ids together
with ``is_multimodal`` (positions filled with encoder embeddings) — and cleared after the forward.  A
token is image / audio iff it is such a position and its id is the image / audio placeholder id
written by the export.  Text-only steps, decode steps and models without a subclass see no ids (all
text).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsLinearMethod,
)

from .constants import NAME

SECTION = "mmcompress_masquant"
FORMAT_VERSION = 1
ROW_OF = {"image": 1, "audio": 2}
#: architectures whose vLLM class gets a subclass that publishes token modalities (``_models``)
MODEL_SUBCLASSES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration")


class PluginError(ValueError):
    """The checkpoint cannot be served by the plugin (one line)."""


# -- token modalities -------------------------------------------------------------------------------

#: ``rows`` of the running forward; ``token_rows`` {placeholder id: row}; counters for tests and logs
_STATE: dict[str, Any] = {"rows": None, "token_rows": None, "wrapped": 0, "modality_calls": 0}


def publish(input_ids: torch.Tensor, is_multimodal: torch.Tensor | None) -> None:
    """Record the row (0 text, 1 image, 2 audio) of each scheduled token, or ``None`` when all are text."""
    token_rows = _STATE["token_rows"]
    _STATE["rows"] = None
    if token_rows is None or is_multimodal is None or not bool(is_multimodal.any()):
        return
    rows = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for tok, row in token_rows.items():
        rows[is_multimodal & (input_ids == tok)] = row
    _STATE["rows"] = rows if bool(rows.any()) else None


def clear() -> None:
    _STATE["rows"] = None


def current_rows(n_tokens: int) -> torch.Tensor | None:
    rows = _STATE["rows"]
    if rows is None:
        return None
    if rows.shape[0] > n_tokens:  # not this forward's tokens (cannot happen after a publish; be safe)
        return None
    if rows.shape[0] < n_tokens:  # padded batch: padding is text
        rows = torch.cat([rows, rows.new_zeros(n_tokens - rows.shape[0])])
    return rows


# -- config -----------------------------------------------------------------------------------------


class MASQuantConfig(CompressedTensorsConfig):
    """compressed-tensors + MASQuant's per-modality tensors of ``mmcompress_masquant.safetensors``."""

    def get_name(self):
        return NAME

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        if (hf_quant_cfg.get("quant_method") == "compressed-tensors" and SECTION in hf_quant_cfg
                and user_quant in (None, NAME)):
            return NAME
        return None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "MASQuantConfig":
        section = config.get(SECTION)
        if not isinstance(section, dict):
            raise PluginError(f"{NAME}: the checkpoint's quantization_config has no {SECTION} block "
                              "(export a MASQuant artifact with `mmcompress export --format compressed-tensors`)")
        if section.get("version") != FORMAT_VERSION:
            raise PluginError(f"{NAME}: {SECTION} version {section.get('version')!r} is not supported "
                              f"(this plugin reads version {FORMAT_VERSION}; use matching mmcompress versions)")
        bad = [k for k in section.get("modality_token_ids", {}) if k not in ROW_OF]
        if bad:
            raise PluginError(f"{NAME}: unknown modality {bad[0]!r} in {SECTION}.modality_token_ids")
        base = CompressedTensorsConfig.from_config(dict(config))
        self = cls.__new__(cls)
        self.__dict__.update(base.__dict__)
        self.section = section
        self._side: dict[str, torch.Tensor] | None = None
        _STATE["token_rows"] = {int(v): ROW_OF[k] for k, v in section.get("modality_token_ids", {}).items()}
        return self

    # the side file: read once, at the first layer (model construction runs with the vLLM config set)
    def side_tensors(self) -> dict[str, torch.Tensor]:
        if self._side is None:
            from safetensors.torch import load_file
            from vllm.config import get_current_vllm_config

            model = get_current_vllm_config().model_config.model
            path = Path(model) / self.section.get("file", "mmcompress_masquant.safetensors")
            if not path.is_file():
                raise PluginError(f"{NAME}: {path} not found (the plugin serves local export directories that "
                                  "carry the side file written by `mmcompress export`)")
            self._side = load_file(str(path))
        return self._side

    def shard_keys(self, prefix: str) -> list[str] | None:
        """Side-file keys (``layers.{i}.{path}``) of the checkpoint linears behind vLLM layer ``prefix``."""
        m = re.search(r"(?:^|\.)layers\.(\d+)\.(.+)$", prefix)
        if m is None:
            return None
        i, path = m.groups()
        parent, _, leaf = path.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf, [leaf])
        return [f"layers.{i}.{parent + '.' if parent else ''}{s}" for s in shards]

    def get_quant_method(self, layer, prefix):
        method = super().get_quant_method(layer, prefix)
        if type(method) is not CompressedTensorsLinearMethod:
            return method
        keys = self.shard_keys(prefix)
        side = self.side_tensors()
        if not keys or not any(f"{k}.input_ratio" in side for k in keys):
            return method
        _STATE["wrapped"] += 1
        return MASLinearMethod(method, {k: _shard(side, k) for k in keys}, prefix)


def _shard(side: dict, key: str) -> dict | None:
    if f"{key}.input_ratio" not in side:
        return None
    return {"ratio": side[f"{key}.input_ratio"], "left": side.get(f"{key}.cmc_left"),
            "right": side.get(f"{key}.cmc_right")}


# -- linear method ----------------------------------------------------------------------------------


class MASLinearMethod(LinearMethodBase):
    """vLLM's compressed-tensors linear method plus MASQuant's modality path (see the module doc)."""

    def __init__(self, inner: CompressedTensorsLinearMethod, shards: dict[str, dict | None], prefix: str):
        self.inner, self.shards, self.prefix = inner, shards, prefix

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype, **extra_weight_attrs):
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise PluginError(f"{NAME}: {self.prefix}: tensor parallelism is not supported by the MASQuant plugin "
                              "(serve with tensor_parallel_size=1, or serve the plain export with "
                              "quantization='compressed-tensors')")
        if len(output_partition_sizes) != len(self.shards):
            raise PluginError(f"{NAME}: {self.prefix}: {len(output_partition_sizes)} output partitions for "
                              f"{len(self.shards)} checkpoint linears")
        self.inner.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                                  params_dtype, **extra_weight_attrs)
        self.in_features, self.out_sizes = input_size_per_partition, list(output_partition_sizes)

    def process_weights_after_loading(self, layer) -> None:
        self.inner.process_weights_after_loading(layer)
        n_in, out_total = self.in_features, sum(self.out_sizes)
        offsets = [sum(self.out_sizes[:j]) for j in range(len(self.out_sizes))]
        ratios, lefts, rights = [], [], []
        for j, (key, sh) in enumerate(self.shards.items()):
            ratio = torch.ones(3, n_in) if sh is None else sh["ratio"].float()
            if ratio.shape != (3, n_in):
                raise PluginError(f"{NAME}: {key}.input_ratio has shape {tuple(ratio.shape)}, expected (3, {n_in})")
            ratios.append(ratio)
            if sh is not None and sh["left"] is not None:
                left, right = sh["left"].float(), sh["right"].float()
                r = left.shape[-1]
                if left.shape != (3, n_in, r) or right.shape != (3, r, self.out_sizes[j]):
                    raise PluginError(f"{NAME}: {key}: CMC factors {tuple(left.shape)} / {tuple(right.shape)} do not "
                                      f"fit a {n_in} -> {self.out_sizes[j]} linear")
                block = torch.zeros(3, r, out_total)
                block[:, :, offsets[j]:offsets[j] + self.out_sizes[j]] = right
                lefts.append(left)
                rights.append(block)
        # shards with the same ratio vector share one kernel call (all of them when MASQuant was tied)
        groups: list[tuple[torch.Tensor, list[int]]] = []
        for j, ratio in enumerate(ratios):
            for g in groups:
                if torch.equal(g[0], ratio):
                    g[1].append(j)
                    break
            else:
                groups.append((ratio, [j]))
        device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        self.groups = [(ratio.to(device), torch.cat([torch.arange(offsets[j], offsets[j] + self.out_sizes[j])
                                                     for j in idx]).to(device)) for ratio, idx in groups]
        self.left = torch.cat(lefts, dim=-1).to(device) if lefts else None  # [3, in, Σr]
        self.right = torch.cat(rights, dim=1).to(device) if rights else None  # [3, Σr, out]

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 2 or bias is not getattr(layer, "bias", None):
            return self.modality_apply(layer, x, bias)
        if id(layer) not in _LAYERS:
            _LAYERS[id(layer)] = (self, layer)
        # an opaque op, so that torch.compile (vLLM's default on CPU without enforce_eager) keeps the
        # per-step modality lookup at run time instead of tracing it once
        return torch.ops.mmcompress.masquant_linear(x, id(layer), sum(self.out_sizes))

    def modality_apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = current_rows(x.shape[0]) if x.dim() == 2 else None
        if rows is None:
            return self.inner.apply(layer, x, bias)
        rows = rows.to(x.device)
        _STATE["modality_calls"] += 1
        out = x.new_empty(x.shape[0], sum(self.out_sizes))
        for m in rows.unique().tolist():
            sel = (rows == m).nonzero().squeeze(1)
            xm = x.index_select(0, sel)
            if m == 0:
                out[sel] = self.inner.apply(layer, xm, bias)
                continue
            if len(self.groups) == 1:
                ym = self.inner.apply(layer, xm * self.groups[0][0][m].to(x.dtype), bias)
            else:
                ym = xm.new_empty(xm.shape[0], out.shape[1])
                for ratio, cols in self.groups:
                    ym[:, cols] = self.inner.apply(layer, xm * ratio[m].to(x.dtype), bias).index_select(1, cols)
            if self.left is not None:
                ym = ym + (xm @ self.left[m].to(x.dtype)) @ self.right[m].to(x.dtype)
            out[sel] = ym
        return out


# -- the opaque op ----------------------------------------------------------------------------------

_LAYERS: dict[int, tuple[MASLinearMethod, torch.nn.Module]] = {}


@torch.library.custom_op("mmcompress::masquant_linear", mutates_args=())
def _masquant_linear(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    method, layer = _LAYERS[layer_id]
    y = method.modality_apply(layer, x, getattr(layer, "bias", None))
    return y.clone() if y.data_ptr() == x.data_ptr() else y


@_masquant_linear.register_fake
def _(x: torch.Tensor, layer_id: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)
