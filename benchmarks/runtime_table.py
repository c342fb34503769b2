"""Issue 15's table on a real model: tok/s, resident linear-weight bytes and peak RSS of every variant.

    PYTHONPATH=src python benchmarks/runtime_table.py [--model ~/.cache/mmcompress/testbed/smollm2-135m]
        [--variants dense,w8a8,w4a8,w4a16,larosa40,joint] [--out /tmp/mmcompress-runtime] [--threads 2]

Artifacts (built once into ``--out``): ``w8a8``/``w4a8``/``w4a16`` with data-free RTN (the integer
runtime does not depend on how the codes were chosen), ``larosa40`` with ``mmcompress sparsify
--method larosa --sparsity 0.4`` and ``joint`` with ``mmcompress compress`` (LaRoSA-40 % then RTN
W8A8), both calibrated on the testbed's ``wiki`` set.  Then a FRESH process per variant loads it
(``mmcompress.load``, integer runtime, sparse layers on the decode kernels as ``generate`` runs them; the
dense rows: the checkpoint through transformers in bf16, in fp32, and in bf16 with the seven projections of
every layer on our dense GEMV kernel, ``dense-own0``), greedily decodes 16 tokens after a 16-token prompt on
the product's decode engine (``DecodeEngine``, the fused C++ step where the model allows it: the path of
``mmcompress generate`` and ``load(...).generate``; best of 3), and reads its resident set (``VmRSS``) and
peak (``VmHWM``).  Each row says whether it ran the fused step.

Everything but the decoder's linear weights is common to the variants, so

    resident linear bytes (variant) = bf16 linear bytes + VmRSS(variant) - VmRSS(dense bf16)

and its ratio to the bf16 linear bytes is the issue's memory figure (targets: W8A8 <= 0.55,
W4* <= 0.30).  ``held`` is the structural count (bytes of the linears' own tensors).  LaRoSA rows hold
the rotation adapters too.  The speed-up is against the fastest dense row (of the three).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[3]))
import mmcompress
from mmcompress.models.loading import load_hf_model

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from mmcompress.runtime.bench_decode import _own_kernel
from mmcompress.runtime.decode import DecodeEngine
from mmcompress.runtime.generate import prepare

path, kind = sys.argv[1], sys.argv[2]
if kind.startswith("dense"):
    model = load_hf_model(path, dtype=torch.float32 if kind == "dense-fp32" else torch.bfloat16)
    if kind == "dense-own0" and _own_kernel(model) is None:
        raise SystemExit("no CPU GEMV kernel here")
else:
    model = prepare(mmcompress.load(path), quiet=True)
model.eval()
ids = torch.arange(100, 116).reshape(1, -1)
eng = DecodeEngine(model, max_len=32)
times = []
with torch.no_grad():
    eng.generate(ids, 4)  # warm-up: kernel loads, the fused plan
    for _ in range(3):
        t = time.perf_counter()
        out = eng.generate(ids, 16)
        times.append(time.perf_counter() - t)
emb = model.get_output_embeddings()
held = bf16 = 0
seen = set()
for name, m in model.named_modules():  # outermost linear-like modules (a deployed linear's own tensors)
    if m is emb or not (hasattr(m, "in_features") and hasattr(m, "out_features")) or any(
            name.startswith(p + ".") for p in seen):
        continue
    seen.add(name)
    held += sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
    bf16 += 2 * m.in_features * m.out_features
print(json.dumps({"rss": status("VmRSS:"), "peak_rss": status("VmHWM:"), "held_linear_bytes": held,
                  "bf16_linear_bytes": bf16, "tok_s": round(16 / min(times), 2), "tokens": out.shape[1] - 16,
                  "runtime": getattr(model, "_mmcompress_runtime", "hf"), "fused": bool(eng.fused)}))
"""


def child(path: str, kind: str, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-c", CHILD, path, kind, str(threads)], capture_output=True, text=True,
                       env=env)
    if r.returncode:
        raise SystemExit(f"{kind} {path}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def build(variant: str, model: str, art: Path, wiki: str) -> None:
    if (art / "mmcompress.json").exists():
        return
    cli = [sys.executable, "-m", "mmcompress.cli"]
    common = ["--calib", wiki, "--nsamples", "32", "--seqlen", "256", "--dtype", "bfloat16", "--no-progress",
              "--output", str(art)]
    if variant in ("w8a8", "w4a8", "w4a16"):
        import torch

        from mmcompress.export.datafree import quantize_checkpoint
        from mmcompress.quant.quantizer import resolve_scheme

        quantize_checkpoint(model, art, resolve_scheme(variant), dtype=torch.bfloat16, progress=False)
    elif variant == "larosa40":
        subprocess.run(cli + ["sparsify", model, "--method", "larosa", "--sparsity", "0.4"] + common, check=True)
    elif variant == "joint":
        recipe = art.parent / "joint.yaml"
        recipe.write_text("steps:\n  - sparsify: {method: larosa, sparsity: 0.4}\n  - quantize: {method: rtn, scheme: w8a8}\n")
        subprocess.run(cli + ["compress", model, "--recipe", str(recipe)] + common, check=True)
    else:
        raise SystemExit(f"unknown variant {variant}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/mmcompress/testbed/smollm2-135m"))
    ap.add_argument("--variants", default="dense,w8a8,w4a8,w4a16,larosa40,joint")
    ap.add_argument("--wiki", default="wiki")
    ap.add_argument("--out", default="/tmp/mmcompress-runtime")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-only", action="store_true", help="build the artifacts, measure nothing")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.build_only:
        for v in a.variants.split(","):
            if v != "dense":
                build(v, a.model, out / v, a.wiki)
        return
    rows = {k: child(a.model, k, a.threads) for k in ("dense-bf16", "dense-fp32", "dense-own0")}
    for v in a.variants.split(","):
        if v != "dense":
            build(v, a.model, out / v, a.wiki)
            rows[v] = child(str(out / v), v, a.threads)
    base_rss = rows["dense-bf16"]["rss"]
    fastest = max(r["tok_s"] for k, r in rows.items() if k.startswith("dense"))
    print("| variant | tok/s | speed-up | fused step | held linear bytes / bf16 | resident linear bytes / bf16 | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        resident = r["bf16_linear_bytes"] + r["rss"] - base_rss
        r["resident_ratio"] = round(resident / r["bf16_linear_bytes"], 3)
        r["held_ratio"] = round(r["held_linear_bytes"] / r["bf16_linear_bytes"], 3)
        r["speedup"] = round(r["tok_s"] / fastest, 3)
        print(f"| {name} | {r['tok_s']} | {r['speedup']}x | {'yes' if r['fused'] else 'no'} | {r['held_ratio']} | "
              f"{r['resident_ratio']} | {r['peak_rss'] / 2**20:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
