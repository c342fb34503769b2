"""GGUF export for llama.cpp (``mmcompress export ART --format gguf --output FILE.gguf``).

llama.cpp runs weight-only block formats: every row of a weight is cut into blocks of 32 input
channels, each with its own scale (``Q8_0``: ``w ≈ d·q``, q ∈ [−127, 127]; ``Q4_0``: q ∈ [−8, 7];
``Q4_1``: ``w ≈ d·q + m``, q ∈ [0, 15]).  Our artifacts hold integer codes on *our* grid (per output
channel or per group, symmetric or not) and may divide their inputs by a smoothing vector at run time.
The export therefore

1. rebuilds each linear's effective float weight ``W_eff = Ŵ ⊘ s`` (the dequantized codes with any
   run-time smoothing ``x / s`` folded into the columns; smoothing that was already folded into a norm
   is in that norm's weight, which is exported as it is);
2. writes it at the closest GGUF type (8-bit → ``Q8_0``; 4-bit symmetric → ``Q4_0``, asymmetric →
   ``Q4_1``), and measures what moving from our grid to llama.cpp's blocks costs: the relative
   Frobenius error ``‖W_gguf − W_eff‖ / ‖W_eff‖`` per linear, reported as mean and max;
3. keeps embeddings and the head in F16 and norms in F32, and carries the tokenizer (BPE vocabulary,
   merges, special tokens, chat template).

llama.cpp has no per-token activation quantization of ours (its ``Q8_0`` kernels quantize activations
to 8 bits in blocks of 32), no per-modality path and no activation sparsity: MASQuant, LaRoSA, TEAL,
CATS and WINA artifacts, multimodal models and families llama.cpp does not share with us are refused
before anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..quant.linear import QuantLinear


class GGUFExportError(ValueError):
    """An artifact that cannot be expressed in GGUF (one-line reason)."""


@dataclass(frozen=True)
class _Arch:
    name: str  # llama.cpp architecture
    permute_qk: bool  # HF rotate-half rope -> llama.cpp's interleaved layout (llama arch only)
    qkv_bias: bool
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name (None: told from the vocabulary)


_ARCHS = {"llama": _Arch("llama", True, False), "mistral": _Arch("llama", True, False),
          "qwen2": _Arch("qwen2", False, True, tokenizer_pre="qwen2")}
_EXPORTABLE_METHODS = ("rtn", "smoothquant", "awq")
_LINEAR_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half row order of q/k to llama.cpp's interleaved pairs (as its converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_type_for(scheme):
    import gguf

    t = gguf.GGMLQuantizationType
    if scheme.wbits == 8:
        return t.Q8_0
    if scheme.wbits == 4:
        return t.Q4_0 if scheme.sym else t.Q4_1
    raise GGUFExportError(f"{scheme.wbits}-bit weights have no GGUF block type here (8 -> Q8_0, 4 -> Q4_0/Q4_1)")


def effective_weight(q: QuantLinear) -> torch.Tensor:
    """``Ŵ ⊘ s``: the dequantized weight with the run-time input smoothing folded into its columns."""
    w = q.quantized_weight().detach().double()
    if q.input_smoothing is not None:
        if q.input_smoothing.shape[0] != 1:
            raise GGUFExportError("per-modality smoothing rows (MASQuant) cannot be expressed in GGUF")
        w = w / q.input_smoothing[0].double()[None, :]
    return w.float()


def check_exportable(manifest: dict, config) -> _Arch:
    """Refuse, with the reason, what GGUF cannot express (before anything is loaded or written)."""
    kind = manifest.get("kind")
    method = manifest.get("method") or {}
    name = method.get("method") if isinstance(method, dict) else method
    if kind != "quantization" or "steps" in manifest:
        raise GGUFExportError(f"GGUF export takes RTN, SmoothQuant or AWQ artifacts; this one is {kind or 'unknown'} "
                              "(activation sparsity, recipes: llama.cpp has no Top-K or residual adapters)")
    if name not in _EXPORTABLE_METHODS:
        why = ("its per-modality smoothing and low-rank correction" if name == "masquant"
               else "its per-token modality weighting" if name == "mbq" else "its method")
        raise GGUFExportError(f"GGUF cannot express {name} ({why}); export RTN, SmoothQuant or AWQ artifacts")
    mt = getattr(config, "model_type", None)
    if mt not in _ARCHS:
        raise GGUFExportError(f"GGUF export supports model types {', '.join(sorted(_ARCHS))}; got {mt!r}")
    return _ARCHS[mt]


def _tokenizer_to_gguf(writer, src: Path, vocab_size: int, arch: _Arch) -> None:
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=False)
    if not getattr(tok, "is_fast", False) or not (src / "tokenizer.json").is_file():
        raise GGUFExportError("GGUF export carries byte-level BPE tokenizers (tokenizer.json); this model has none")
    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = {t.content for t in tok.added_tokens_decoder.values()}
    special = set(tok.all_special_tokens)
    tokens, types = [], []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if t in special
                         else gguf.TokenType.USER_DEFINED if t in added else gguf.TokenType.NORMAL)
    if arch.tokenizer_pre:
        pre = arch.tokenizer_pre
    elif "<|begin_of_text|>" in vocab:
        pre = "llama-bpe"
    elif len(vocab) == 49152 and "<|im_start|>" in vocab:
        pre = "smollm"
    else:
        pre = "default"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(src, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


@torch.no_grad()
def export_gguf(src, output, *, overwrite: bool = False) -> dict:
    """Write the artifact at ``src`` as one GGUF file at ``output`` (atomically); returns a report.

    An existing ``output`` is replaced only with ``overwrite=True``, and never when it lies inside the
    artifact."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("the gguf package is not installed: pip install 'mmcompress[export]'") from None
    from ..fileio import atomic_write
    from ..models.adapters import get_adapter
    from ..models.loading import read_config
    from .serialization import is_artifact, load, read_manifest

    src, output = Path(src), Path(output)
    if not is_artifact(src):
        raise GGUFExportError(f"{src} is not an mmcompress artifact (run `mmcompress quantize` first)")
    real_out, real_src = Path(os.path.realpath(output)), Path(os.path.realpath(src))
    if real_src in real_out.parents or real_out == real_src:
        raise GGUFExportError(f"--output {output} is inside the artifact {src}; choose a path outside it")
    if output.is_dir():
        raise GGUFExportError(f"--output {output} is a directory; give a file name ending in .gguf")
    if output.exists() and not overwrite:
        raise GGUFExportError(f"--output {output} exists; pass --overwrite to replace it or choose another name")
    if not output.parent.is_dir():
        raise GGUFExportError(f"the directory of --output {output} does not exist")
    config = read_config(src)
    arch = check_exportable(read_manifest(src), config)
    model = load(src, runtime="reference")  # the export reads the fake-quant modules
    adapter = get_adapter(model)
    if adapter.routed:
        raise GGUFExportError("multimodal models are not exported to GGUF (their towers and routing are not expressible)")
    tc = adapter.text_config
    n_head, n_kv = tc.num_attention_heads, getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // n_head
    result = {}

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        writer.add_name(src.name)
        writer.add_context_length(getattr(tc, "max_position_embeddings", 4096))
        writer.add_embedding_length(tc.hidden_size)
        writer.add_block_count(len(adapter.layers))
        writer.add_feed_forward_length(tc.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(getattr(tc, "rope_theta", None)
                                        or (getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(float(tc.rms_norm_eps))
        writer.add_vocab_size(tc.vocab_size)
        _tokenizer_to_gguf(writer, src, tc.vocab_size, arch)

        def f16(name, t):
            writer.add_tensor(name, t.detach().float().numpy().astype(np.float16))

        def f32(name, t):
            writer.add_tensor(name, t.detach().float().numpy().astype(np.float32))

        errors, qtypes = [], set()
        f16("token_embd.weight", adapter.embed_tokens.weight)
        f32("output_norm.weight", adapter.final_norm.weight)
        if not getattr(tc, "tie_word_embeddings", False):
            f16("output.weight", adapter.lm_head.weight)
        for i, layer in enumerate(adapter.layers):
            f32(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
            f32(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
            for path, gname in _LINEAR_NAMES.items():
                lin = layer.get_submodule(path)
                if not isinstance(lin, QuantLinear):
                    raise GGUFExportError(f"layer {i} {path} is not quantized; only fully quantized artifacts are exported")
                w = effective_weight(lin)
                if arch.permute_qk and gname in ("attn_q", "attn_k"):
                    w = _permute_rows(w, n_head if gname == "attn_q" else n_kv)
                qtype = gguf_type_for(lin.scheme)
                if w.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                    raise GGUFExportError(f"{path} has {w.shape[1]} input channels, not a multiple of the GGUF "
                                          f"block size {gguf.GGML_QUANT_SIZES[qtype][0]}")
                data = gguf.quants.quantize(w.numpy(), qtype)
                back = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(w.shape).copy())
                errors.append(float((back - w).norm() / w.norm().clamp(min=1e-30)))
                qtypes.add(qtype.name)
                writer.add_tensor(f"blk.{i}.{gname}.weight", data, raw_dtype=qtype)
                if lin.bias is not None:
                    b = lin.bias.detach().float()
                    if arch.permute_qk and gname in ("attn_q", "attn_k"):
                        b = _permute_rows(b, n_head if gname == "attn_q" else n_kv)
                    f32(f"blk.{i}.{gname}.bias", b)
        file_type = {"Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                     "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[sorted(qtypes)[0]]
        writer.add_file_type(file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        result.update(errors=errors, qtypes=qtypes)

    atomic_write(output, write)
    errors, qtypes = result["errors"], result["qtypes"]
    return {"output": str(output), "architecture": arch.name, "gguf_types": sorted(qtypes),
            "bytes": os.path.getsize(output), "linears": len(errors),
            "grid_change_error": {"mean": float(np.mean(errors)), "max": float(np.max(errors))}}
