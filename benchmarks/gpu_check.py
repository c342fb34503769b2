#!/usr/bin/env python
"""GPU check of the Triton sparse kernels (Top-K threshold + masked GEMV).  Target: < 4 minutes on one H100.

    python benchmarks/gpu_check.py                 # all sections
    python benchmarks/gpu_check.py --layers 8 --json $OUT/gpu_check.json

1. correctness: ``topk_threshold`` vs torch.topk's K-th magnitude (exactly equal; kept count: exactly K
   on fp32 data; fp16/bf16 data have ties at the K-th magnitude, which the kernels break by index, keeping
   exactly K as sparse/topk.py does), ``topk_sparse_gemv`` (a "rows" and a "splitk" config + the
   tuned one) vs a float64 reference, the pre-sparsified / scalar-threshold GEMV, ``sparse_linear`` and
   ``SparseLinear(backend="triton")``; fp16/bf16, batch 1/4/8, 7B and odd shapes, sparsity 0..0.9;
2. kernel micro-benchmark on LLaMA-2-7B shapes (triton.testing.do_bench, which flushes L2 between
   runs): dense cuBLAS ``F.linear``; the old path (torch.topk + scatter, then the GEMV on the
   pre-sparsified input) and its parts; the new fused path ``topk_sparse_gemv`` (threshold kernel +
   masked GEMV) and its threshold kernel alone;
3. GEMV-stack decode proxy: per token and layer q,k,v, o, gate,up, down + the dense 4096² residual
   adapter, for LAYERS layers, captured in a CUDA graph (no Python overhead): dense vs the old path
   (4 torch.topk selections per layer, shared by q/k/v and gate/up) vs the fused path
   (``topk_sparse_gemv`` per matrix: 7 threshold kernels per layer) vs shared thresholds (4 threshold
   kernels per layer + masked GEMVs), at 0%, 40% and 50% — the linear-layer part of decode;
4. eager decode: ``synthetic_decode_benchmark`` of ``benchmarks/stack_decode.py`` (HF LlamaDecoderLayer stack, KV
   cache, eager PyTorch, so launch overheads included) dense vs sparse.

Every check / section is guarded: an exception is logged (and counted as a failure in section 1) and
the run goes on.  The per-shape tuning choices (``triton_gemv.TUNE_LOG``: chosen variant/config, time
of every candidate, rejected candidates) are printed and saved.  Exit status 1 if any correctness
check fails.  Results go to stdout (and ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def bench_ms(fn, warmup=10, rep=60):
    from triton.testing import do_bench

    t = do_bench(fn, warmup=warmup, rep=rep)
    return float(t[0] if isinstance(t, (list, tuple)) else t)


def correctness() -> list[str]:
    from mmcompress.sparse.kernels import sparse_linear, sparsify_reference, triton_gemv
    from mmcompress.sparse.linear import SparseLinear
    from mmcompress.sparse.topk import keep_count

    fails = []
    n = 0
    over = []  # kept - K per token on fp16/bf16 data (ties at the threshold)

    def check(name, fn):
        nonlocal n
        n += 1
        try:
            msg = fn()
        except Exception as e:  # a kernel that does not compile / launch: a failure, keep going
            msg = f"{type(e).__name__}: {str(e)[:300]}"
        if msg:
            fails.append(f"{name}: {msg}")

    g = torch.Generator(device="cuda").manual_seed(0)
    # thresholds on fp32 data (continuous: exactly K kept) and long rows (chunked search)
    for B, D in ((1, 4096), (8, 11008), (3, 40000)):
        x = torch.randn(B, D, device="cuda", generator=g)
        for s in (0.0, 0.4, 0.5, 0.9):
            k = keep_count(D, s)

            def thr_fp32(x=x, k=k):
                thr = triton_gemv.topk_threshold(x, k)
                ref = x.abs().topk(k, dim=-1).values[:, -1]
                cnt = (x.abs() >= thr[:, None]).sum(1)
                if not torch.equal(thr, ref):
                    return f"threshold {thr.tolist()[:3]} != topk {ref.tolist()[:3]}"
                if not torch.all(cnt == k):
                    return f"kept {cnt.tolist()} != K={k}"
            check(f"threshold fp32 B={B} D={D} s={s}", thr_fp32)
    for dtype in (torch.float16, torch.bfloat16):
        for B in (1, 4, 8):
            for din, dout in ((4096, 4096), (11008, 4096), (4096, 11008), (1000, 129)):
                x = torch.randn(B, din, device="cuda", generator=g).to(dtype)
                wt = (torch.randn(din, dout, device="cuda", generator=g) / din ** 0.5).to(dtype)
                bias = torch.randn(dout, device="cuda", generator=g).to(dtype)
                for s in (0.0, 0.4, 0.5, 0.9):
                    k = keep_count(din, s)
                    tag = f"{str(dtype)[6:]} B={B} {din}->{dout} s={s}"
                    a = x.float().abs()

                    def thr_check(x=x, k=k, a=a):
                        thr = triton_gemv.topk_threshold(x, k)
                        ref = a.topk(k, dim=-1).values[:, -1]
                        if not torch.equal(thr, ref):
                            return f"threshold {thr.tolist()[:3]} != topk {ref.tolist()[:3]}"
                        kept, above = (a >= thr[:, None]).sum(1), (a > thr[:, None]).sum(1)
                        if not (torch.all(above < k) and torch.all(kept >= k)):
                            return f"kept {kept.tolist()} / above {above.tolist()} vs K={k}"
                        over.extend((kept - k).tolist())
                    check(f"threshold {tag}", thr_check)
                    # reference: the same selection (exactly K, ties by lowest index: sparse/topk.py), float64
                    ref = sparsify_reference(x, k).double() @ wt.double() + bias.double()
                    cfgs = [("rows", 32, 32, 4), ("splitk", 16, 256, 4)] if B > 1 else [("rows", 64, 32, 4),
                                                                                       ("splitk", 64, 128, 4)]
                    # None: the per-shape tuned config (B = 1 only here: tuning compiles every candidate; the
                    # micro-benchmark and the SparseLinear check tune B = 4)
                    for cfg in cfgs + ([None] if B == 1 else []):
                        def fused(cfg=cfg, x=x, wt=wt, bias=bias, k=k, ref=ref):
                            y = triton_gemv.topk_sparse_gemv(x, wt, k, bias, config=cfg)
                            if not (y.dtype == x.dtype and rel(y, ref) < 1e-2):
                                return f"{y.dtype} rel {rel(y, ref):.2e}"
                        check(f"topk_sparse_gemv {cfg or 'tuned'} {tag}", fused)
                    if s in (0.0, 0.5) and din in (4096, 1000) and B == 1:  # the old entry points / public API
                        xs = sparsify_reference(x, k)
                        ref_s = xs.double() @ wt.double() + bias.double()

                        def presparse(x=x, xs=xs, wt=wt, bias=bias, ref_s=ref_s, ref=ref, k=k):
                            y = triton_gemv.sparse_gemv(xs, wt, bias, config=(16, 256, 4))  # legacy 3-tuple
                            if rel(y, ref_s) >= 1e-2:
                                return f"legacy presparsified rel {rel(y, ref_s):.2e}"
                            y = triton_gemv.sparse_gemv(xs, wt, bias)
                            if rel(y, ref_s) >= 1e-2:
                                return f"presparsified rel {rel(y, ref_s):.2e}"
                            y = sparse_linear(x, wt, k, bias, backend="triton")
                            if rel(y, ref) >= 1e-2:
                                return f"sparse_linear rel {rel(y, ref):.2e}"
                            t = 0.8
                            ref_t = torch.where(x.double().abs() >= t, x.double(), 0.0) @ wt.double() + bias.double()
                            y = sparse_linear(x, wt, bias=bias, backend="triton", threshold=t)
                            if rel(y, ref_t) >= 1e-2:
                                return f"sparse_linear threshold rel {rel(y, ref_t):.2e}"
                        check(f"sparse_gemv/sparse_linear {tag}", presparse)
    # SparseLinear module, triton backend: decode steps (kernel; reference with the one tie rule, exactly K)
    # and prefill (PyTorch path, vs the torch-backend module)
    for dtype in (torch.float16, torch.bfloat16):
        lin = torch.nn.Linear(4096, 1024, bias=True, device="cuda", dtype=dtype)
        ref_m = SparseLinear.from_linear(lin, 2048)
        fast = SparseLinear.from_linear(lin, 2048, backend="triton")
        for shape in ((1, 1, 4096), (4, 1, 4096), (2, 33, 4096)):
            x = torch.randn(*shape, device="cuda", generator=g).to(dtype)

            def module(x=x, ref_m=ref_m, fast=fast, lin=lin):
                y = fast(x)
                if x.shape[1] == 1:
                    ref = F.linear(sparsify_reference(x, 2048).double(), lin.weight.double(), lin.bias.double())
                else:
                    ref = ref_m(x)
                if not (y.dtype == x.dtype and rel(y, ref) < 1e-2):
                    return f"{y.dtype} rel {rel(y, ref):.2e}"
            check(f"SparseLinear triton {dtype} {shape}", module)
    log(f"correctness: {n - len(fails)}/{n} passed; fp16/bf16 entries tied at the K-th magnitude beyond K (broken by index): mean "
        f"{statistics.mean(over) if over else 0:.2f}, max {max(over) if over else 0} extra channels per token")
    for f in fails:
        log("  FAIL", f)
    return fails


def microbench() -> list[dict]:
    from mmcompress.sparse.kernels import sparse_linear, sparsify_reference, triton_gemv
    from mmcompress.sparse.topk import keep_count

    rows = []
    shapes = {"q/k/v/o 4096x4096": (4096, 4096), "gate/up 11008x4096": (11008, 4096),
              "down 4096x11008": (4096, 11008)}
    plan = [(torch.bfloat16, 1), (torch.float16, 1), (torch.bfloat16, 4)]
    for dtype, B in plan:
        for name, (dout, din) in shapes.items():
            W = (torch.randn(dout, din, device="cuda") / din ** 0.5).to(dtype)
            WT = W.t().contiguous()
            x = torch.randn(B, din, device="cuda").to(dtype)
            dense = bench_ms(lambda: F.linear(x, W))
            for s in (0.0, 0.4, 0.5, 0.75):
                try:
                    k = keep_count(din, s)
                    triton_gemv.topk_sparse_gemv(x, WT, k)  # tune outside the timing
                    xs = sparsify_reference(x, k)
                    kern = bench_ms(lambda: triton_gemv.sparse_gemv(xs, WT))  # old: GEMV on the pre-sparsified x
                    sel = bench_ms(lambda: sparsify_reference(x, k)) if s > 0 else 0.0  # old: torch.topk + scatter
                    old = bench_ms(lambda: triton_gemv.sparse_gemv(sparsify_reference(x, k), WT))
                    thr = bench_ms(lambda: triton_gemv.topk_threshold(x, k)) if s > 0 else 0.0
                    fused = bench_ms(lambda: triton_gemv.topk_sparse_gemv(x, WT, k))
                    full = bench_ms(lambda: sparse_linear(x, WT, k, backend="triton"))
                except Exception as e:
                    log(f"  {name} {dtype} B={B} s={s}: {type(e).__name__}: {str(e)[:300]}")
                    continue
                r = {"shape": name, "dtype": str(dtype).replace("torch.", ""), "batch": B, "sparsity": s,
                     "dense_us": round(1e3 * dense, 1), "kernel_us": round(1e3 * kern, 1),
                     "select_us": round(1e3 * sel, 1), "old_us": round(1e3 * old, 1),
                     "threshold_us": round(1e3 * thr, 1), "fused_us": round(1e3 * fused, 1),
                     "sparse_linear_us": round(1e3 * full, 1), "old_ratio": round(old / dense, 3),
                     "fused_ratio": round(fused / dense, 3),
                     "config": list(triton_gemv._BEST.get((WT.shape[1], WT.shape[0], B, dtype), ()))}
                rows.append(r)
                log(f"  {name:20s} {r['dtype']} B={B} s={s:.2f}: dense {r['dense_us']:6.1f} | old: select "
                    f"{r['select_us']:5.1f} + kernel {r['kernel_us']:6.1f} = {r['old_us']:6.1f} ({r['old_ratio']:.2f}x) | "
                    f"fused: threshold {r['threshold_us']:5.1f}, total {r['fused_us']:6.1f} ({r['fused_ratio']:.2f}x), "
                    f"sparse_linear {r['sparse_linear_us']:6.1f} us | cfg {r['config']}")
            del W, WT
    return rows


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def _time_replay(g, n=20):
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def gemv_stack(layers: int, dtype=torch.bfloat16) -> dict:
    """The linear layers of ``layers`` LLaMA-2-7B decoder layers for one token, in a CUDA graph."""
    from mmcompress.sparse.kernels import sparsify_reference, triton_gemv
    from mmcompress.sparse.topk import keep_count

    d, f = 4096, 11008
    mats = []  # per layer: name -> (W [out,in], WT [in,out])
    for _ in range(layers):
        lay = {}
        for name, (o, i) in {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (f, d), "up": (f, d),
                             "down": (d, f), "adapter": (d, d)}.items():
            W = (torch.randn(o, i, device="cuda") / i ** 0.5).to(dtype)
            lay[name] = (W, W.t().contiguous() if name != "adapter" else None)
        mats.append(lay)
    xd = torch.randn(1, d, device="cuda").to(dtype)
    xf = torch.randn(1, f, device="cuda").to(dtype)

    def dense_step():
        for lay in mats:
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                F.linear(xf if name == "down" else xd, lay[name][0])

    def old_step(s):  # torch.topk + scatter (4 per layer), GEMV on the pre-sparsified input
        kd, kf = keep_count(d, s), keep_count(f, s)
        sp = (lambda x, k: sparsify_reference(x, k)) if s > 0 else (lambda x, k: x)

        def step():
            for lay in mats:
                xs = sp(xd, kd)  # shared by q, k, v
                for name in ("q", "k", "v"):
                    triton_gemv.sparse_gemv(xs, lay[name][1])
                triton_gemv.sparse_gemv(sp(xd, kd), lay["o"][1])
                xs = sp(xd, kd)  # shared by gate, up
                for name in ("gate", "up"):
                    triton_gemv.sparse_gemv(xs, lay[name][1])
                triton_gemv.sparse_gemv(sp(xf, kf), lay["down"][1])
                F.linear(xd, lay["adapter"][0])  # dense residual adapter
        return step

    def fused_step(s):  # topk_sparse_gemv per matrix: threshold kernel + masked GEMV (7 thresholds per layer)
        kd, kf = keep_count(d, s), keep_count(f, s)

        def step():
            for lay in mats:
                for name in ("q", "k", "v", "o", "gate", "up"):
                    triton_gemv.topk_sparse_gemv(xd, lay[name][1], kd)
                triton_gemv.topk_sparse_gemv(xf, lay["down"][1], kf)
                F.linear(xd, lay["adapter"][0])
        return step

    def shared_step(s):  # one threshold per shared input (4 per layer, as SparseLinear does) + masked GEMVs
        kd, kf = keep_count(d, s), keep_count(f, s)
        thr_fn = (lambda x, k: triton_gemv.topk_threshold(x, k)) if s > 0 else (lambda x, k: None)

        def step():
            for lay in mats:
                t = thr_fn(xd, kd)
                for name in ("q", "k", "v"):
                    triton_gemv.sparse_gemv(xd, lay[name][1], thr=t)
                triton_gemv.sparse_gemv(xd, lay["o"][1], thr=thr_fn(xd, kd))
                t = thr_fn(xd, kd)
                for name in ("gate", "up"):
                    triton_gemv.sparse_gemv(xd, lay[name][1], thr=t)
                triton_gemv.sparse_gemv(xf, lay["down"][1], thr=thr_fn(xf, kf))
                F.linear(xd, lay["adapter"][0])
        return step

    out = {"layers": layers, "dtype": str(dtype).replace("torch.", "")}
    variants = {"old": old_step, "fused": fused_step, "shared": shared_step}
    try:
        dense_ms = _time_replay(_graph(dense_step))
        out["mode"] = "cuda_graph"
        timer = lambda fn: _time_replay(_graph(fn))  # noqa: E731
    except Exception as e:  # capture not possible: eager timings
        log(f"  CUDA graph capture failed ({type(e).__name__}: {e}); timing eagerly")
        torch.cuda.synchronize()

        def timer(fn, n=10):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            return 1e3 * (time.perf_counter() - t) / n

        dense_ms = timer(dense_step)
        out["mode"] = "eager"
    out["dense_ms"] = round(dense_ms, 3)
    for s in (0.0, 0.4, 0.5):
        for vname, make in variants.items():
            if s == 0.0 and vname == "shared":
                continue  # identical to fused at 0% (no threshold)
            try:
                fn = make(s)
                fn()  # tune all shapes outside the capture
                torch.cuda.synchronize()
                ms = timer(fn)
            except Exception as e:
                log(f"  GEMV stack {vname} s={s}: {type(e).__name__}: {str(e)[:300]}")
                continue
            out[f"{vname}_{int(100 * s)}_ms"] = round(ms, 3)
            out[f"{vname}_speedup_{int(100 * s)}"] = round(dense_ms / ms, 3)
    log(f"  GEMV stack ({layers} layers, {out['mode']}): {out}")
    del mats
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32, help="layers for the decode sections (default 32)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip later sections past this many seconds")
    ap.add_argument("--json", help="write all results to this file")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 2
    import triton

    from mmcompress.sparse.kernels import triton_gemv

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    log(f"{res}")

    def save():
        res["seconds"] = round(time.time() - T0, 1)
        res["tuning"] = [{"key": str(t["key"]), "best": t["best"], "ms": {str(c): round(v, 4) for c, v in t["ms"].items()},
                          "rejected": {str(c): v for c, v in t["rejected"].items()}} for t in triton_gemv.TUNE_LOG]
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=str))

    def section(name, fn):
        try:
            res[name] = fn()
        except Exception as e:  # keep going: later sections still report
            import traceback

            log(f"section {name} failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            res[name + "_error"] = f"{type(e).__name__}: {e}"
        save()

    try:
        fails = correctness()
    except Exception as e:
        import traceback

        traceback.print_exc()
        fails = [f"correctness section crashed: {type(e).__name__}: {e}"]
    res["correctness_failures"] = fails
    save()
    if not a.skip_micro and time.time() - T0 < a.budget_s:
        section("micro", microbench)
    if not a.skip_decode and time.time() - T0 < a.budget_s:
        section("gemv_stack", lambda: gemv_stack(a.layers))
    log("tuning (key -> chosen; rows best / splitk best ms; rejected):")
    for t in triton_gemv.TUNE_LOG:
        best_of = {v: min((ms for c, ms in t["ms"].items() if c[0] == v), default=float("nan")) for v in ("rows", "splitk")}
        log(f"  {t['key']} -> {t['best']}; rows {best_of['rows']:.4f} / splitk {best_of['splitk']:.4f} ms; "
            f"rejected {t['rejected'] or 'none'}")
    if not a.skip_decode and time.time() - T0 < a.budget_s:
        def decode():
            from stack_decode import synthetic_decode_benchmark  # benchmarks/, this script's directory

            out = {}
            for s in (0.4, 0.5):
                if time.time() - T0 > a.budget_s:
                    break
                out[str(s)] = synthetic_decode_benchmark("llama2-7b", a.layers, sparsity=s, tokens=a.tokens, prompt=16,
                                                         rounds=2, backend="triton", dtype="bf16", device="cuda",
                                                         log=sys.stdout)
                torch.cuda.empty_cache()
            return out
        section("decode", decode)
    save()
    log(f"done in {res['seconds']} s; correctness {'OK' if not fails else f'{len(fails)} FAILURES'}")
    return 1 if fails else 0

if __name__ == "__main__":
    sys.exit(main())
