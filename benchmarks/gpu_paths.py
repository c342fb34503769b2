#!/usr/bin/env python
"""CUDA paths of the calibration pipeline (quantize, sparsify, save/load) on tiny random models.

    python benchmarks/gpu_paths.py [--json OUT.json] [--big]

For each method the same model is calibrated twice, on the CPU and on CUDA, from the same samples,
and the two results are compared on the same inputs (relative logit difference), next to the error
of each against full precision.  Rounding can flip a few quantization codes between devices, so the
check is that the CUDA result is as close to full precision as the CPU one (within 10 %), not bitwise.
``--big``: also time MASQuant and LaRoSA calibration on CUDA for a random model with Qwen2.5-0.5B's
decoder shape (24 layers, 896 wide), a timing figure only (random weights).

Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def logits(model, inputs, device):
    model.to(device).eval()
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu()
    model.to("cpu")
    return out


def samples_for(kind, tok, n=4):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package (relative imports)
    from tests.conftest import mm_inputs, text_samples

    if kind in ("qwen2_5_omni", "qwen2_5_vl"):
        out = [mm_inputs(kind, tok, seed=i)[0] for i in range(n)]
        return out, out[0]
    out = text_samples(tok, n=n, seqlen=48)
    return out, out[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--dry", action="store_true", help="run every path on the CPU (checks the script itself)")
    args = ap.parse_args()
    gpu = "cpu" if args.dry else "cuda"
    assert args.dry or torch.cuda.is_available(), "needs CUDA"
    from mmcompress import quantize, sparsify
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builders
    from tiny_models import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    fails, rows = [], []
    cases = [("llama", "rtn", "w8a8", {}), ("llama", "smoothquant", "w8a8", {}), ("llama", "awq", "w4a16", {}),
             ("qwen2_5_omni", "smoothquant", "w4a8", {}), ("qwen2_5_omni", "mbq", "w4a8", {}),
             ("qwen2_5_omni", "masquant", "w4a8", {"epochs": 2}),
             ("qwen2_5_vl", "masquant", "w4a8", {"epochs": 2})]
    for kind, method, scheme, opts in cases:
        base, _ = tiny_model(kind, layers=2, tokenizer=tok)
        calib, probe = samples_for(kind, tok)
        ref = logits(base, probe, "cpu")
        res = {}
        try:
            for dev in ("cpu", gpu):
                m = copy.deepcopy(base)
                torch.manual_seed(0)
                t = time.time()
                quantize(m, calib, method, scheme, device=dev, progress=False, **opts)
                res[dev] = (logits(m, probe, dev), time.time() - t)
        except Exception as e:  # record and go on: one broken path must not hide the others
            log(f"quantize {kind} {method} {scheme} on {dev}: {type(e).__name__}: {e}")
            fails.append(f"quantize {kind} {method} on {dev}: {type(e).__name__}: {e}")
            continue
        e_cpu, e_gpu = rel(res["cpu"][0], ref), rel(res[gpu][0], ref)
        d = rel(res[gpu][0], res["cpu"][0])
        ok = e_gpu <= 1.1 * e_cpu + 1e-4
        rows.append(dict(kind=kind, method=method, scheme=scheme, err_cpu=e_cpu, err_cuda=e_gpu, cuda_vs_cpu=d,
                         s_cpu=res["cpu"][1], s_cuda=res[gpu][1], ok=ok))
        log(f"quantize {kind:13s} {method:11s} {scheme}: err cpu {e_cpu:.4f} cuda {e_gpu:.4f} "
            f"cuda-vs-cpu {d:.4f} ({res['cpu'][1]:.1f}s / {res[gpu][1]:.1f}s) {'ok' if ok else 'FAIL'}")
        if not ok:
            fails.append(f"quantize {kind} {method}")

    for method, kw in (("larosa", {}), ("teal", {}), ("cats", {})):
        base, _ = tiny_model("qwen2", layers=2, tokenizer=tok)
        calib, probe = samples_for("qwen2", tok, n=8)
        ref = logits(base, probe, "cpu")
        res = {}
        try:
            for dev in ("cpu", gpu):
                m = copy.deepcopy(base)
                sparsify(m, calib, method, 0.4, device=dev, progress=False, **kw)
                res[dev] = logits(m, probe, dev)
        except Exception as e:
            log(f"sparsify {method} on {dev}: {type(e).__name__}: {e}")
            fails.append(f"sparsify {method} on {dev}: {type(e).__name__}: {e}")
            continue
        e_cpu, e_gpu, d = rel(res["cpu"], ref), rel(res[gpu], ref), rel(res[gpu], res["cpu"])
        ok = e_gpu <= 1.1 * e_cpu + 1e-3
        rows.append(dict(kind="qwen2", method=method, scheme="sparsity 0.4", err_cpu=e_cpu, err_cuda=e_gpu,
                         cuda_vs_cpu=d, ok=ok))
        log(f"sparsify qwen2 {method:7s} 0.4: err cpu {e_cpu:.4f} cuda {e_gpu:.4f} cuda-vs-cpu {d:.4f} "
            f"{'ok' if ok else 'FAIL'}")
        if not ok:
            fails.append(f"sparsify {method}")

    def save_load():
        # save on a CUDA-calibrated model, load, compare
        import tempfile

        from mmcompress import load, save

        base, _ = tiny_model("qwen2_5_omni", layers=2, tokenizer=tok)
        calib, probe = samples_for("qwen2_5_omni", tok)
        quantize(base, calib, "masquant", "w4a8", device=gpu, progress=False, epochs=1)
        before = logits(base, probe, gpu)
        with tempfile.TemporaryDirectory() as d:
            save(base, Path(d) / "m")
            again = load(Path(d) / "m")
            after = logits(again, probe, gpu)
        r = rel(after, before)
        log(f"save/load of a CUDA-calibrated MASQuant model: rel {r:.2e}")
        rows.append(dict(kind="qwen2_5_omni", method="masquant save/load", rel=r, ok=r < 1e-5))
        if r >= 1e-5:
            fails.append("save/load")

    def big():
        for method, scheme in (("smoothquant", "w4a8"), ("masquant", "w4a8")):
            m, _ = tiny_model("qwen2_5_omni", layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2,
                              tokenizer=tok)
            calib, _ = samples_for("qwen2_5_omni", tok, n=16)
            torch.cuda.synchronize()
            t = time.time()
            quantize(m, calib, method, scheme, device="cuda", progress=False)
            s = time.time() - t
            log(f"big (24 x 896, random) {method} {scheme} on CUDA, 16 samples: {s:.1f} s "
                f"({s / 24:.2f} s/layer), peak CUDA {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
            rows.append(dict(kind="big-omni", method=method, scheme=scheme, seconds=s))
            torch.cuda.reset_peak_memory_stats()

    for section in (save_load,) + ((big,) if args.big else ()):
        try:
            section()
        except Exception as e:
            log(f"{section.__name__}: {type(e).__name__}: {e}")
            fails.append(f"{section.__name__}: {type(e).__name__}: {e}")
    log("FAILURES:\n  " + "\n  ".join(fails) if fails else "all CUDA-path checks passed")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fails": fails,
                                               "device": torch.cuda.get_device_name() if gpu == "cuda" else "cpu"}, indent=1))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
