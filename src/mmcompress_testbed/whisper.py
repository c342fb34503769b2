"""Whisper-base from a CTranslate2 ``model.bin`` -> transformers ``WhisperForConditionalGeneration``.

File layout and name mapping: docs/testbed.md §2.4.  Also: the encoder weights in the Qwen2.5-Omni
``audio_tower`` naming (:func:`omni_audio_tower_state_dict`), for the multimodal builders, and a small
greedy :func:`transcribe` helper.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np

from .fetch import TestbedError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: None}  # 5 = bfloat16

# Whisper-base sizes (the CTranslate2 file does not store a config)
WHISPER_BASE_CONFIG = dict(
    vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
    max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
    pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, activation_function="gelu",
    scale_embedding=False, tie_word_embeddings=True,
)

# the Qwen2.5-Omni thinker ``audio_config`` for a Whisper-base audio tower (output_dim = LM hidden size)
def omni_audio_config(output_dim: int) -> dict:
    return dict(num_mel_bins=80, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, d_model=512,
                output_dim=output_dim, max_source_positions=1500)


SOT, EN, TRANSCRIBE, NO_TIMESTAMPS, EOT = 50258, 50259, 50359, 50363, 50257


# -- the CTranslate2 file ------------------------------------------------------------------------------


def _read_string(fh) -> str:
    (n,) = struct.unpack("<H", fh.read(2))
    raw = fh.read(n)
    if len(raw) != n:
        raise TestbedError("truncated CTranslate2 file (string)")
    return raw.rstrip(b"\0").decode("utf-8")


def read_ct2(path) -> tuple[dict[str, np.ndarray], dict]:
    """Parse a CTranslate2 ``model.bin``: ({name: array}, {"spec", "revision", "aliases"}).

    Aliases are resolved (the alias name maps to the same array as its target).
    """
    path = Path(path)
    variables: dict[str, np.ndarray] = {}
    with open(path, "rb") as fh:
        head = fh.read(4)
        if len(head) != 4:
            raise TestbedError(f"{path} is not a CTranslate2 model file (too short)")
        (version,) = struct.unpack("<I", head)
        if version < 5 or version > 6:
            raise TestbedError(f"{path}: unsupported CTranslate2 binary version {version}")
        spec = _read_string(fh)
        (revision,) = struct.unpack("<I", fh.read(4))
        (count,) = struct.unpack("<I", fh.read(4))
        for _ in range(count):
            name = _read_string(fh)
            (rank,) = struct.unpack("<B", fh.read(1))
            shape = struct.unpack(f"<{rank}I", fh.read(4 * rank)) if rank else ()
            (code,) = struct.unpack("<B", fh.read(1))
            (nbytes,) = struct.unpack("<I", fh.read(4))
            raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise TestbedError(f"{path}: truncated CTranslate2 file (variable {name})")
            if code not in _DTYPES:
                raise TestbedError(f"{path}: unknown dtype code {code} for {name}")
            if code == 5:
                u16 = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                arr = u16.view(np.float32)
            else:
                arr = np.frombuffer(raw, dtype=_DTYPES[code])
            expected = int(np.prod(shape)) if shape else 1
            if arr.size != expected:
                raise TestbedError(f"{path}: {name} has {arr.size} values for shape {shape}")
            variables[name] = arr.reshape(shape)
        aliases = {}
        tail = fh.read(4)
        if len(tail) == 4:
            (n_alias,) = struct.unpack("<I", tail)
            for _ in range(n_alias):
                alias = _read_string(fh)
                target = _read_string(fh)
                aliases[alias] = target
                if target in variables:
                    variables[alias] = variables[target]
    return variables, {"spec": spec, "revision": revision, "version": version, "aliases": aliases}


def _layer_ids(variables, side: str) -> list[int]:
    return sorted({int(m.group(1)) for k in variables if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def ct2_to_hf_state_dict(variables: dict[str, np.ndarray]) -> dict:
    """Map CTranslate2 Whisper variables to ``WhisperForConditionalGeneration`` keys (fp32 tensors)."""
    sd = {}

    def norm(src, dst):
        sd[f"{dst}.weight"] = _t(variables[f"{src}/gamma"])
        sd[f"{dst}.bias"] = _t(variables[f"{src}/beta"])

    def linear(src, dst, bias=True):
        sd[f"{dst}.weight"] = _t(variables[f"{src}/weight"])
        if bias:
            sd[f"{dst}.bias"] = _t(variables[f"{src}/bias"])

    def fused(src, dsts, bias_for):
        w = variables[f"{src}/weight"]
        b = variables[f"{src}/bias"]
        n = len(dsts)
        rows = w.shape[0] // n
        for i, d in enumerate(dsts):
            sd[f"{d}.weight"] = _t(w[i * rows : (i + 1) * rows])
            if d.rsplit(".", 1)[-1] in bias_for:
                sd[f"{d}.bias"] = _t(b[i * rows : (i + 1) * rows])

    for side in ("encoder", "decoder"):
        for i in _layer_ids(variables, side):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            # fused Q,K,V; the key bias is dropped (transformers' Whisper k_proj has no bias)
            fused(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")],
                  bias_for=("q_proj", "v_proj"))
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                fused(f"{src}/attention/linear_1", [f"{dst}.encoder_attn.{p}" for p in ("k_proj", "v_proj")],
                      bias_for=("v_proj",))
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
        norm(f"{side}/layer_norm", f"model.{side}.layer_norm")
        sd[f"model.{side}.embed_positions.weight"] = _t(variables[f"{side}/position_encodings/encodings"])
    for c in ("conv1", "conv2"):
        sd[f"model.encoder.{c}.weight"] = _t(variables[f"encoder/{c}/weight"])
        sd[f"model.encoder.{c}.bias"] = _t(variables[f"encoder/{c}/bias"])
    sd["model.decoder.embed_tokens.weight"] = _t(variables["decoder/embeddings/weight"])
    return sd


def config_from_variables(variables: dict[str, np.ndarray], **overrides) -> dict:
    """Whisper config sizes inferred from the tensors (Whisper-base values for what they don't show)."""
    cfg = dict(WHISPER_BASE_CONFIG)
    emb = variables["decoder/embeddings/weight"]
    conv1 = variables["encoder/conv1/weight"]
    fc1 = variables["encoder/layer_0/ffn/linear_0/weight"]
    n_enc = len(_layer_ids(variables, "encoder"))
    n_dec = len(_layer_ids(variables, "decoder"))
    cfg.update(vocab_size=emb.shape[0], d_model=emb.shape[1], num_mel_bins=conv1.shape[1], encoder_layers=n_enc,
               decoder_layers=n_dec, encoder_ffn_dim=fc1.shape[0],
               decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
               max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
               max_target_positions=variables["decoder/position_encodings/encodings"].shape[0])
    for side in ("encoder", "decoder"):
        heads = variables.get(f"{side}/num_heads", variables.get("num_heads"))
        if heads is not None:
            cfg[f"{side}_attention_heads"] = int(np.asarray(heads).reshape(-1)[0])
    cfg.update(overrides)
    return cfg


def load_ct2_whisper(path, **config_overrides):
    """A ``WhisperForConditionalGeneration`` (fp32, eval mode) with the weights of a CTranslate2 file."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    variables, meta = read_ct2(path)
    if meta["spec"] != "WhisperSpec":
        raise TestbedError(f"{path} holds a {meta['spec']}, not a WhisperSpec")
    config = WhisperConfig(**config_from_variables(variables, **config_overrides))
    sd = ct2_to_hf_state_dict(variables)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]
    if missing or unexpected:
        raise TestbedError(f"CTranslate2 -> transformers mapping incomplete: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    model.tie_weights()
    if model.proj_out.weight.device.type == "meta" or model.proj_out.weight.data_ptr() != \
            model.model.decoder.embed_tokens.weight.data_ptr():
        model.proj_out.weight = model.model.decoder.embed_tokens.weight
    for name, buf in list(model.named_buffers()):
        if buf.device.type == "meta":
            raise TestbedError(f"buffer {name} was not initialised")
    return model.eval()


def _generation_config(ct2_config: dict | None):
    from transformers import GenerationConfig

    ct2_config = ct2_config or {}
    lang_ids = ct2_config.get("lang_ids") or list(range(50259, 50358))
    return lang_ids, GenerationConfig(
        decoder_start_token_id=SOT, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT, max_length=448,
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin", [220, EOT]),
        suppress_tokens=ct2_config.get("suppress_ids", []),
        alignment_heads=ct2_config.get("alignment_heads", []),
        no_timestamps_token_id=NO_TIMESTAMPS, prev_sot_token_id=50361, is_multilingual=True,
        task_to_id={"transcribe": TRANSCRIBE, "translate": 50358},
        forced_decoder_ids=None, return_timestamps=False, max_initial_timestamp_index=50,
    )


def build_whisper(ctx) -> None:
    """Registry builder: ``model.bin`` + ``tokenizer.json`` -> a Whisper HF directory with processor files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizerFast

    model = load_ct2_whisper(ctx.assembled)
    ct2_cfg = json.loads(Path(ctx.files["ct2_config.json"]).read_text()) if "ct2_config.json" in ctx.files else {}
    tok = WhisperTokenizerFast(tokenizer_file=str(ctx.files["tokenizer.json"]), language=None, task=None,
                               predict_timestamps=False)
    lang_ids, gen = _generation_config(ct2_cfg)
    gen.lang_to_id = {tok.convert_ids_to_tokens(i): i for i in lang_ids}
    model.generation_config = gen
    model.save_pretrained(str(ctx.out), max_shard_size="64GB")
    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    WhisperProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(str(ctx.out))


# -- reuse: the encoder for a Qwen2.5-Omni audio tower -----------------------------------------------------


def whisper_encoder_state_dict(model_dir) -> dict:
    """The Whisper-base encoder weights in transformers' ``WhisperEncoder`` naming
    (``conv1.*``, ``conv2.*``, ``embed_positions.weight``, ``layers.i.*``, ``layer_norm.*``), fp32.

    ``model_dir``: a converted whisper-base directory (``registry.fetch("whisper-base")``).
    """
    from safetensors.torch import load_file

    sd = load_file(str(Path(model_dir) / "model.safetensors"))
    prefix = "model.encoder."
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise TestbedError(f"{model_dir} has no Whisper encoder weights")
    return out


def omni_audio_tower_state_dict(model_dir=None, encoder_sd: dict | None = None) -> dict:
    """Whisper encoder weights renamed for ``Qwen2_5OmniAudioEncoder`` (``model.audio_tower``).

    The final encoder ``layer_norm`` becomes ``ln_post``; the sinusoidal position table is dropped (the
    Omni tower computes it itself).  ``proj`` and ``audio_bos_eos_token`` have no Whisper counterpart:
    load with ``strict=False`` and leave them as initialised (see :func:`load_into_omni_audio_tower`).
    """
    sd = encoder_sd if encoder_sd is not None else whisper_encoder_state_dict(model_dir)
    out = {}
    for k, v in sd.items():
        if k.startswith("embed_positions."):
            continue
        if k.startswith("layer_norm."):
            k = "ln_post." + k[len("layer_norm."):]
        out[k] = v
    return out


OMNI_TOWER_RANDOM = ("proj.", "audio_bos_eos_token.")


def load_into_omni_audio_tower(tower, state_dict: dict) -> dict:
    """Copy ``state_dict`` (from :func:`omni_audio_tower_state_dict`) into an Omni audio tower module.

    Returns {"loaded": n, "random": [keys left as initialised]}; raises if any other key is missing
    or unexpected, or a shape differs.
    """
    missing, unexpected = tower.load_state_dict(state_dict, strict=False)
    bad = [k for k in missing if not k.startswith(OMNI_TOWER_RANDOM) and "positional_embedding" not in k]
    if bad or unexpected:
        raise TestbedError(f"Whisper -> Omni audio tower mismatch: missing {bad[:4]}, unexpected {unexpected[:4]}")
    return {"loaded": len(state_dict), "random": sorted(missing)}


# -- a small greedy transcriber (independent of generate()'s Whisper-specific logic) ------------------------


def load_audio_16k(path):
    """Mono float32 samples at 16 kHz from a WAV file (soundfile, else the stdlib wave module)."""
    try:
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        data = data.mean(axis=1)
    except ImportError:
        import wave

        with wave.open(str(path)) as w:
            sr = w.getframerate()
            raw = w.readframes(w.getnframes())
            data = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
            if w.getnchannels() > 1:
                data = data.reshape(-1, w.getnchannels()).mean(axis=1)
    if sr != 16000:
        n = int(round(len(data) * 16000 / sr))
        data = np.interp(np.linspace(0, len(data) - 1, n), np.arange(len(data)), data).astype(np.float32)
    return data


def transcribe(model_dir, audio, max_new_tokens: int = 120, model=None, processor=None) -> str:
    """Greedy English transcription of ``audio`` (a path or 16 kHz float samples) with a Whisper directory."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = processor or WhisperProcessor.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    model = model or WhisperForConditionalGeneration.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True).eval()
    if isinstance(audio, (str, Path)):
        audio = load_audio_16k(audio)
    feats = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([[SOT, EN, TRANSCRIBE, NO_TIMESTAMPS]])
    with torch.no_grad():
        enc = model.model.encoder(feats).last_hidden_state
        for _ in range(max_new_tokens):
            logits = model(encoder_outputs=(enc,), decoder_input_ids=ids, use_cache=False).logits[0, -1]
            nxt = int(logits.argmax())
            if nxt == EOT:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return processor.tokenizer.decode(ids[0, 4:], skip_special_tokens=True).strip()
