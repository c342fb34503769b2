"""Write a random Llama checkpoint of TinyLlama's width (hidden 2048, intermediate 5632, GQA 32/4) and any
depth, tensor by tensor (never the whole model in memory), for the scaling measurements of issue 21.

    python benchmarks/random_llama.py OUT_DIR --layers 22 [--hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32]

LLaMA-2-7B shape (13.5 GB; two random layers, then repeated to 32 at disk speed):

    python benchmarks/random_llama.py /tmp/l7b2 --layers 2 --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32
    python benchmarks/random_llama.py /tmp/l7b --layers 32 --hidden 4096 --intermediate 11008 --heads 32 \
        --kv-heads 32 --repeat /tmp/l7b2

The tokenizer is smollm2-135m's from the testbed cache (vocab 49152, so the embedding and head have 49152
rows, not TinyLlama's 32000); the weights are N(0, 0.02) in bfloat16, norms 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path

import torch


def tensors(cfg: dict):
    h, inter, n_kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    kv = h // cfg["num_attention_heads"] * n_kv
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        for name, shape in (("q_proj", (h, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h)), ("o_proj", (h, h))):
            yield p + f"self_attn.{name}.weight", shape
        for name, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            yield p + f"mlp.{name}.weight", shape
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (cfg["vocab_size"], h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--tokenizer", default=str(Path.home() / ".cache/mmcompress/testbed/smollm2-135m"))
    ap.add_argument("--repeat", metavar="DIR", help="copy the weights of a model this script wrote, its layers "
                                                    "repeated to --layers (no random numbers: disk speed)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=False)
    tok = Path(args.tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, out / name)
    vocab = json.loads((tok / "config.json").read_text())["vocab_size"]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.hidden,
           "intermediate_size": args.intermediate, "num_attention_heads": args.heads,
           "num_key_value_heads": args.kv_heads, "num_hidden_layers": args.layers, "vocab_size": vocab,
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
           "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 0}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    header, offset = {}, 0
    for name, shape in tensors(cfg):
        n = torch.Size(shape).numel() * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    if args.repeat:
        return _repeat(Path(args.repeat), out, cfg, raw)
    g = torch.Generator().manual_seed(0)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors(cfg):
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            f.write(t.to(torch.bfloat16).view(-1).view(torch.uint8).numpy().data)
    print(f"{out}: {args.layers} layers, {offset / 1e9:.2f} GB of bfloat16 weights")


def _repeat(src: Path, out: Path, cfg: dict, raw: bytes) -> None:
    """Layer ``i`` of the new checkpoint is layer ``i mod n`` of ``src`` (n layers), copied in the kernel."""
    import os

    with open(src / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    base = 8 + n
    n_src = 1 + max(int(k.split(".")[2]) for k in header if k.startswith("model.layers."))
    with open(src / "model.safetensors", "rb") as fin, open(out / "model.safetensors", "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)) + raw)
        for name, _ in tensors(cfg):
            parts = name.split(".")
            if name.startswith("model.layers."):
                parts[2] = str(int(parts[2]) % n_src)
            start, end = header[".".join(parts)]["data_offsets"]
            done = 0
            while done < end - start:
                done += os.copy_file_range(fin.fileno(), fout.fileno(), end - start - done, base + start + done)
    print(f"{out}: {cfg['num_hidden_layers']} layers repeated from {src} ({n_src} layers)")


if __name__ == "__main__":
    main()
