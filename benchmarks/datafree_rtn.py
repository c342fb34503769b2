"""Data-free RTN W8A8 (``mmcompress quantize MODEL`` without ``--calib``): time and peak RSS, end to end.

    python benchmarks/datafree_rtn.py smollm2   # smollm2-135m shape, random bf16 weights (target <= 10 s)
    python benchmarks/datafree_rtn.py 7b        # LLaMA-2-7B shape, random bf16, ~13.5 GB (target <= 2x cp)

The random checkpoints are written under ``--workdir`` (default: a new temporary directory in /tmp)
and deleted afterwards.  The 7B-shaped one is written shard by shard (one layer's random tensors,
reused for every layer), never held in memory.  ``cp`` of the same safetensors on the same disk is
timed before and after the quantization run (the page cache favours whichever runs second).
Each command runs under GNU ``/usr/bin/time -v`` (peak RSS = "Maximum resident set size"; cpu_seconds =
user + system time, the better number on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=4096),
}


def run_timed(cmd: list[str]):
    """Run ``cmd`` under /usr/bin/time -v (exit on failure); returns wall seconds and ``field(name)``, a
    number from time's report."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return wall, lambda name: float(re.search(rf"{name}: ([\d.]+)", r.stderr).group(1))


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (GiB)."""
    wall, field = run_timed(cmd)
    return {"seconds": round(wall, 2), "cpu_seconds": round(field(r"User time \(seconds\)") + field(r"System time \(seconds\)"), 2),
            "peak_rss_gib": round(field(r"Maximum resident set size \(kbytes\)") / 2**20, 3)}


def make_smollm2(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES["smollm2"])).to(torch.bfloat16)
    model.save_pretrained(path)


def make_7b(path: Path, layers_per_shard: int = 2) -> None:
    """Write a LLaMA-2-7B-shaped bf16 checkpoint shard by shard (index json like save_pretrained)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    shape = SHAPES["7b"]
    cfg = LlamaConfig(**shape, dtype="bfloat16")
    cfg.architectures = ["LlamaForCausalLM"]
    path.mkdir(parents=True)
    cfg.save_pretrained(path)
    d, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)

    def rand(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    layer = {"input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
             **{f"self_attn.{p}_proj.weight": rand(d, d) for p in "qkvo"},
             "mlp.gate_proj.weight": rand(f, d), "mlp.up_proj.weight": rand(f, d), "mlp.down_proj.weight": rand(d, f)}
    groups = [[("model.embed_tokens.weight", rand(shape["vocab_size"], d))]]
    for start in range(0, n, layers_per_shard):
        groups.append([(f"model.layers.{i}.{k}", v) for i in range(start, min(n, start + layers_per_shard))
                       for k, v in layer.items()])
    groups[-1] += [("model.norm.weight", torch.ones(d, dtype=torch.bfloat16)),
                   ("lm_head.weight", rand(shape["vocab_size"], d))]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: v.clone() for k, v in group}, str(path / name), metadata={"format": "pt"})
        for k, v in group:
            weight_map[k] = name
            total += v.numel() * v.element_size()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--workdir", help="where to put the random checkpoint (default: a temp dir in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix=f"mmc-datafree-{args.shape}-", dir=args.workdir or "/tmp"))
    mmc = [sys.executable, "-m", "mmcompress.cli"]
    try:
        src = work / "model"
        t0 = time.perf_counter()
        (make_smollm2 if args.shape == "smollm2" else make_7b)(src)
        print(f"wrote {src} ({du(src) / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        shards = sorted(src.glob("*.safetensors"))
        result = {"shape": args.shape, "checkpoint_bytes": du(src), "cpus": os.cpu_count(),
                  "load_average": os.getloadavg()[0]}
        if args.shape == "7b":
            (work / "copy").mkdir()
            result["cp_before"] = timed(["cp", *map(str, shards), str(work / "copy")])
            shutil.rmtree(work / "copy")
        cmd = [*mmc, "quantize", str(src), "--method", "rtn", "--scheme", "w8a8", "--output", str(work / "w8a8"),
               "--no-progress"]
        result["rtn_w8a8_data_free"] = timed(cmd)
        result["artifact_bytes"] = du(work / "w8a8")
        if args.shape == "7b":
            (work / "copy").mkdir()
            result["cp_after"] = timed(["cp", *map(str, shards), str(work / "copy")])
            cp = min(result["cp_before"]["seconds"], result["cp_after"]["seconds"])
            result["ratio_to_fastest_cp"] = round(result["rtn_w8a8_data_free"]["seconds"] / cp, 2)
        result["command"] = " ".join(cmd[2:]).replace(str(work), "$WORK")
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
