#!/usr/bin/env python
"""A/B of the fused step's sparse work split (fused_step.cpp: output-column units vs split-K row parts) in
ONE process, interleaved step by step, so machine load hits every split alike.

    python benchmarks/fused_split_ab.py llama2-7b:4 --threads 2 --steps 24 [--sparsity 0.4]

Builds the LaRoSA stack (``sparse``: SparseLinear + bf16 residual adapters), its 0 % setting
(``own_kernel_0pct``) and the joint stack (``SparseInt8Linear`` W8A8 + bf16 adapters) as
``stack_decode.py --step fused`` does, then times single fused steps at one position (re-stepping a
position rewrites the same K/V), rotating over the splits ``cols`` (set_split(1): session 32's column
units), ``splitk`` (set_split(2, 1): one row part per thread) and ``splitk2`` (two per thread), and the
default rule (``rule``).  Prints the median ms per (variant, split) and JSON.

``--ab select`` times the Top-K selections instead (session 34): ``topk_row`` (``set_select(1)``: sparse_gemv.cpp's
selection) against ``topk_select`` (``set_select(0)``: the step's AVX-512 one, the default), both on the default
split; ``--ab reduce``: the split-K residual linears (o_proj, down, adapter) reduced by shared units and a barrier
(``set_reduce(0)``, session 33) against by every thread itself, no barrier (``set_reduce(1)``, the default);
``--ab s34``: neither change (``before``), each alone, both (``after``).  ``--profile`` adds, per (variant, setting), thread 0's per-phase own ops / units / barrier waits / split-K
reduction (``FusedStep.profile``, ms per step, medians over the steps).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stack_decode as sd  # noqa: E402

# smollm2-135m's widths (hidden 576, intermediate 1536, 9 heads of 64, 3 K/V heads): the narrow-output case
sd.SHAPES.setdefault("smollm2-135m", dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                          num_key_value_heads=3))
SPLITS = {"cols": (1, 1), "splitk": (2, 1), "splitk2": (2, 2), "rule": (0, 1)}
# --ab: the settings compared, each a list of (FusedStep method, args) applied before its step
SETTINGS = {
    "split": {n: [("set_split", v), ("set_select", (0,)), ("set_reduce", (1,))] for n, v in SPLITS.items()},
    "select": {"topk_row": [("set_split", (0, 1)), ("set_select", (1,)), ("set_reduce", (0,))],
               "topk_select": [("set_split", (0, 1)), ("set_select", (0,)), ("set_reduce", (0,))]},
    "reduce": {"shared": [("set_split", (0, 1)), ("set_select", (0,)), ("set_reduce", (0,))],
               "own": [("set_split", (0, 1)), ("set_select", (0,)), ("set_reduce", (1,))]},
    "s34": {n: [("set_split", (0, 1)), ("set_select", (sel,)), ("set_reduce", (red,))]
            for n, sel, red in (("before", 1, 0), ("select_only", 0, 0), ("reduce_only", 1, 1), ("after", 0, 1))},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("spec", default="llama2-7b:4", nargs="?")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--variants", default="own_kernel_0pct,sparse,joint")
    ap.add_argument("--ab", choices=sorted(SETTINGS), default="split")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from mmcompress.runtime.decode import DecodeEngine

    name, layers = sd.parse_decode_spec(a.spec)
    bf16 = torch.bfloat16
    cfg = sd._llama_config(name, layers, bf16)
    d = cfg.hidden_size
    gen = torch.Generator().manual_seed(0)
    be = "cpu"
    want = a.variants.split(",")

    def adapter():
        m = torch.nn.Linear(d, d, bias=False, dtype=bf16)
        m.weight.requires_grad_(False)
        m.weight.normal_(0.0, d ** -0.5, generator=gen)
        return m

    models = {}
    with torch.no_grad():
        if "sparse" in want:
            models["sparse"] = sd._causal_lm(name, [sd._adapted(sd.dense_kernel_layer(sd._random_layer(cfg, i, bf16, gen),
                                                                                      a.sparsity, be), adapter(), be)
                                                    for i in range(layers)], bf16)
        if "own_kernel_0pct" in want:
            models["own_kernel_0pct"] = sd._causal_lm(name, [sd.dense_kernel_layer(sd._random_layer(cfg, i, bf16, gen),
                                                                                   0.0, be) for i in range(layers)], bf16)
        if "joint" in want:
            models["joint"] = sd._causal_lm(name, [sd._adapted(sd._joint_layer(sd._random_layer(cfg, i, bf16, gen),
                                                                               a.sparsity, "w8a8", be), adapter(), be)
                                                   for i in range(layers)], bf16)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    engines = {}
    for n, m in models.items():
        e = DecodeEngine(m, max_len=16, fused=True)
        assert e.fused, n
        e._reset()
        e._forward(prompt, 0)
        e._step(torch.tensor([[3]]), 8)  # builds the plan
        engines[n] = e
    settings = SETTINGS[a.ab]
    times = {(n, s): [] for n in engines for s in settings}
    prof = {k: [] for k in times}
    keys = list(times)
    nsplit = {}
    print(f"load average before {os.getloadavg()}", flush=True)
    for i in range(a.steps):
        for j in range(len(keys)):
            n, s = keys[(i + j) % len(keys)]
            f = engines[n]._fused
            for meth, args in settings[s]:
                r = getattr(f, meth)(*args)
                if meth == "set_split":
                    nsplit[(n, s)] = r
            if a.profile:
                f.set_profile(True)
            t0 = time.perf_counter()
            f.step(3, 8)
            times[(n, s)].append(time.perf_counter() - t0)
            if a.profile:
                prof[(n, s)].append(f.profile()[0])
                f.set_profile(False)
    print(f"load average after {os.getloadavg()}", flush=True)
    res = {}
    for (n, s), v in times.items():
        v = v[2:]  # the first steps after a split change warm caches
        res[f"{n}/{s}"] = {"median_ms": 1e3 * statistics.median(v), "best_ms": 1e3 * min(v),
                           "split_k_projections": nsplit[(n, s)]}
        print(f"  {n:16s} {s:12s} median {1e3 * statistics.median(v):8.2f} ms  best {1e3 * min(v):8.2f} ms  "
              f"(split-K projections {nsplit[(n, s)]})")
        if a.profile:
            ph = {p: {q: 1e3 * statistics.median(st[p][q] for st in prof[(n, s)][2:]) for q in st0}
                  for p, st0 in prof[(n, s)][0].items()}
            res[f"{n}/{s}"]["profile_ms"] = ph
            tot = {q: sum(ph[p][q] for p in ph) for q in ("own_ops_s", "units_s", "wait_s", "reduce_s")}
            print("      " + "  ".join(f"{p}: {d['own_ops_s']:.3f}/{d['units_s']:.2f}/{d['wait_s']:.3f}/{d['reduce_s']:.3f}"
                                       for p, d in ph.items() if sum(d.values()) > 0)
                  + f"  | own {tot['own_ops_s']:.3f} units {tot['units_s']:.2f} wait {tot['wait_s']:.3f} "
                  f"reduce {tot['reduce_s']:.3f} ms")
    print(json.dumps({"spec": a.spec, "threads": a.threads, "steps": a.steps, "ab": a.ab, "results": res}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
