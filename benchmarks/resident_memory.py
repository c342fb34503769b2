"""Resident memory of an artifact's linear weights after ``mmcompress.load`` and 16 decode steps (issue 15).

    PYTHONPATH=src python benchmarks/resident_memory.py [--model ~/.cache/mmcompress/testbed/smollm2-135m]
        [--schemes w8a8,w4a8,w4a16] [--out /tmp/resident]

Each scheme is quantized with data-free RTN (the integer runtime does not depend on how the codes were
chosen) and saved; then a FRESH process per variant (the dense bf16 model, and each artifact through
``mmcompress.load``, integer runtime) loads it, decodes 16 tokens greedily and reads its current
resident set (``VmRSS``).  Everything but the decoder's linear weights is the same in every variant
(embeddings, norms, activations, KV cache, torch itself), so

    resident linear bytes (variant) = bf16 linear bytes + VmRSS(variant) - VmRSS(dense bf16)

and the ratio to the bf16 linear bytes is the issue's figure (target: W8A8 <= 0.55, W4* <= 0.30).  The
structural count (bytes of the buffers the deployed linears hold) is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(2)
import mmcompress
from mmcompress.quant.deployed import IntLinear
from mmcompress.models.loading import load_hf_model

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

path, kind = sys.argv[1], sys.argv[2]
if kind == "dense":
    model = load_hf_model(path, dtype=torch.bfloat16)
else:
    model = mmcompress.load(path)
model.eval()
ids = torch.arange(1, 17).reshape(1, -1)
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
lin = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, IntLinear))
       and m is not model.get_output_embeddings()]
held = sum(t.numel() * t.element_size() for m in lin for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)))
bf16 = sum(2 * m.in_features * m.out_features for m in lin)
print(json.dumps({"rss": rss(), "held_linear_bytes": held, "bf16_linear_bytes": bf16,
                  "int_linears": sum(isinstance(m, IntLinear) for m in lin), "tokens": out.shape[1] - 16}))
"""


def child(path: str, kind: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, path, kind], capture_output=True, text=True, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/mmcompress/testbed/smollm2-135m"))
    ap.add_argument("--schemes", default="w8a8,w4a8,w4a16")
    ap.add_argument("--out", default="/tmp/mmcompress-resident")
    a = ap.parse_args()
    import torch

    from mmcompress.quant.datafree import quantize_checkpoint
    from mmcompress.quant.quantizer import resolve_scheme

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = child(a.model, "dense")
    rows = [{"variant": "dense bf16", **dense, "resident_linear_bytes": dense["bf16_linear_bytes"], "ratio": 1.0}]
    for scheme in a.schemes.split(","):
        art = out / scheme
        if not (art / "mmcompress.json").exists():
            quantize_checkpoint(a.model, art, resolve_scheme(scheme), dtype=torch.bfloat16)
        r = child(str(art), "artifact")
        resident = r["bf16_linear_bytes"] + r["rss"] - dense["rss"]
        rows.append({"variant": scheme, **r, "resident_linear_bytes": resident,
                     "ratio": round(resident / r["bf16_linear_bytes"], 3),
                     "held_ratio": round(r["held_linear_bytes"] / r["bf16_linear_bytes"], 3)})
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
