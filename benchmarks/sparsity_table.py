"""Held-out wiki perplexity of dense, LaRoSA, TEAL and CATS at several model-level sparsities, one run.

    python benchmarks/sparsity_table.py smollm2-135m [--levels 0.25,0.4,0.5] [--seqlen 1024 --windows 16]

Protocol (stated in the output): fp32 weights; calibration = seeded random windows of the testbed
wiki calibration split (disjoint from the evaluation split); perplexity on non-overlapping windows
of the held-out wiki split, all tokens sparsified (paper protocol) unless the row says otherwise.
Each method is calibrated once (dense model chain) and then applied at every level to a fresh copy.
Sparsity columns are model-level (parameter-weighted over q,k,v,o,gate,up,down): the planned value
and the value measured on the evaluation windows (Top-K: equal by construction; thresholds: vary).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="testbed model name (smollm2-135m, qwen2.5-0.5b) or a local HF directory")
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--seqlen", type=int, default=1024, help="evaluation window")
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows (held-out wiki)")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=1024)
    ap.add_argument("--methods", default="larosa,teal,teal-greedy,teal-half,cats",
                    help="comma-separated: larosa, teal, teal-greedy, teal-half, cats, wina, wina-greedy")
    ap.add_argument("--larosa-modes", default="merged", help="merged,reference")
    ap.add_argument("--larosa-plans", default="exact", help="exact,uniform,grid,greedy")
    ap.add_argument("--identity-ablation", action="store_true", help="also run LaRoSA with Q = I (no rotation)")
    ap.add_argument("--column-scale", action="store_true", help="also run merged LaRoSA with --column-scale (ours)")
    ap.add_argument("--extra-levels", default=None,
                    help="levels for the secondary rows (Mode R, Q = I, TEAL half-prefill); default: --levels")
    ap.add_argument("--check-rotated-dense", action="store_true", help="also evaluate the rotated model at sparsity 0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmcompress.eval.perplexity import perplexity
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.sparse import plan as plans
    from mmcompress.sparse.api import measure_sparsity
    from mmcompress.sparse.merge import merge_rotations, rotate_reference
    from mmcompress.sparse.methods.cats import _cats_select, cats
    from mmcompress.sparse.methods.larosa import apply_topk_plan, build_plan, greedy_plan, grid_search
    from mmcompress.engine import Compose, run_layerwise
    from mmcompress.sparse.methods.teal import MagnitudeSampler, _teal_select, teal
    from mmcompress.sparse.rotation import MomentCollector, Rotations, rotation_from_moment

    from mmcompress_testbed.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    from mmcompress_testbed.data import calibration_set, eval_text

    levels = [float(x) for x in args.levels.split(",")]
    extra_levels = [float(x) for x in args.extra_levels.split(",")] if args.extra_levels else levels
    methods = args.methods.split(",")
    tok = load_tokenizer(model_dir)
    base = load_hf_model(model_dir, dtype="float32")
    calib = calibration_set("wiki", base, model_dir, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    ids = tok(eval_text("wiki"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n_win = min(args.windows, ids.numel() // args.seqlen)
    meas_samples = [{"input_ids": ids[i * args.seqlen:(i + 1) * args.seqlen].unsqueeze(0)} for i in range(min(1, n_win))]
    rows = []

    def ppl(model):
        return perplexity(model, ids, seqlen=args.seqlen, max_windows=n_win, progress=False)["ppl"]

    def row(method, level, model, planned, t0, measure=True, **extra):
        p = ppl(model)
        if planned is None:
            measured = 0.0
        elif measure:
            measured = measure_sparsity(model, meas_samples)["model_sparsity"]
        else:  # Top-K: exactly K per token by construction (tests/test_sparse_larosa.py)
            measured = planned
        r = {"method": method, "target": level, "planned": planned, "measured": round(measured, 4), "ppl": p,
             "seconds": round(time.time() - t0, 1), **extra}
        rows.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r

    print(f"# model {args.model} ({model_dir}); eval: held-out wiki, {n_win} windows x {args.seqlen} tokens; "
          f"calibration: wiki calibration split, {args.nsamples} x {args.calib_seqlen} tokens, seed 0; fp32; "
          f"torch threads {args.threads}", file=sys.stderr)
    t0 = time.time()
    dense = row("dense", 0.0, base, None, t0)["ppl"]
    ad0 = get_adapter(base)
    shapes = plans.layer_shapes(ad0)
    costs = {}

    def larosa_rows(mode, rot, t0):
        m = copy.deepcopy(base)
        am = get_adapter(m)
        if mode.startswith("merged"):
            merge_rotations(m, am, rot, column_scale=mode.endswith("colscale"))
        else:
            rotate_reference(m, am, rot)
        if args.check_rotated_dense and not mode.endswith("noQ"):
            row(f"larosa-{mode} (dense, rotated)", 0.0, m, None, t0)
        for plan in args.larosa_plans.split(","):
            for lv in (levels if mode in ("merged", "merged-colscale") else extra_levels):
                t0 = time.time()
                if plan == "grid":
                    chosen = grid_search(m, am, shapes, lv, calib.samples, max_samples=2)
                    apply_topk_plan(m, am, chosen)
                elif plan == "greedy":
                    chosen = greedy_plan(m, am, shapes, lv, calib.samples, progress=False)
                    costs[f"larosa_greedy_{lv}_s"] = round(time.time() - t0, 1)
                else:
                    chosen = build_plan(plan, shapes, lv)
                    apply_topk_plan(m, am, chosen)
                row(f"larosa-{mode}-{plan}", lv, m, round(chosen.model_sparsity(), 4), t0,
                    ratio_in=chosen.info.get("ratio_in"), measure=False)
        del m

    # one pass of the dense chain collects everything: rotation moments (per mode), TEAL and CATS samples
    collectors = {}
    if "larosa" in methods:
        for mode in args.larosa_modes.split(","):
            collectors[mode] = MomentCollector(mode)
    if "teal" in methods or "teal-half" in methods:
        collectors["teal"] = MagnitudeSampler(_teal_select, nsamples=len(calib))
    if "cats" in methods:
        collectors["cats"] = MagnitudeSampler(_cats_select, nsamples=len(calib))

    t0 = time.time()
    run_layerwise(base, ad0, Compose(*collectors.values()), calib.samples, progress=False)
    costs["calibration_pass_s"] = round(time.time() - t0, 1)

    deferred = []
    if "larosa" in methods:
        for mode in args.larosa_modes.split(","):
            t0 = time.time()
            qe = [rotation_from_moment(h) for h in collectors[mode].moments]
            rot = Rotations(mode, [q for q, _ in qe], [e for _, e in qe], tokens=collectors[mode].tokens)
            if args.identity_ablation and mode == "merged":  # Q = I: plain magnitude Top-K on γ-free (M) / γ-scaled (R) inputs
                eye = torch.eye(qe[0][0].shape[0], dtype=torch.float64)
                variants = [(mode, rot), (f"{mode}-noQ", Rotations(mode, [eye] * len(qe), [e for _, e in qe]))]
            else:
                variants = [(mode, rot)]
            if args.column_scale and mode == "merged":
                variants.insert(1, ("merged-colscale", rot))
            for mode, rot in variants:
                if mode in ("merged", "merged-colscale"):
                    larosa_rows(mode, rot, t0)
                else:
                    deferred.append((mode, rot))
    if "teal" in methods or "teal-half" in methods:
        mags = collectors["teal"].values
        for name, prefill in (("teal", "all"), ("teal-half", "last_half")):
            if name not in methods:
                continue
            for lv in (levels if name == "teal" else extra_levels):
                t0 = time.time()
                m = copy.deepcopy(base)
                info = teal(m, get_adapter(m), calib.samples, lv, prefill=prefill, magnitudes=mags, progress=False)
                row(f"{name} (prefill {prefill})", lv, m, info["model_sparsity"], t0)
                del m
    if "teal-greedy" in methods:  # its own layer-wise search over the dense chain, per level
        for lv in levels:
            t0 = time.time()
            m = copy.deepcopy(base)
            info = teal(m, get_adapter(m), calib.samples, lv, plan="greedy", progress=False)
            row("teal-greedy (prefill all)", lv, m, info["model_sparsity"], t0)
            costs[f"teal_greedy_{lv}_s"] = round(time.time() - t0, 1)
            del m
    if "cats" in methods:
        mags = collectors["cats"].values
        for lv in levels:
            t0 = time.time()
            m = copy.deepcopy(base)
            info = cats(m, get_adapter(m), calib.samples, lv, magnitudes=mags, progress=False)
            row("cats", lv, m, info["model_sparsity"], t0, note=info.get("note"))
            del m
    if "wina" in methods or "wina-greedy" in methods:  # WINA (arXiv 2505.19427), the same pipeline and eval
        from mmcompress.sparse.methods.wina import wina
        for name, plan in (("wina", "uniform"), ("wina-greedy", "greedy")):
            if name not in methods:
                continue
            for lv in levels:
                t0 = time.time()
                m = copy.deepcopy(base)
                info = wina(m, get_adapter(m), calib.samples, lv, plan=plan, progress=False)
                row(f"wina ({plan})", lv, m, round(info["model_sparsity"], 4), t0)
                if plan == "greedy":
                    costs[f"wina_greedy_{lv}_s"] = round(time.time() - t0, 1)
                del m
    for mode, rot in deferred:  # secondary LaRoSA rows: Mode R, Q = I
        larosa_rows(mode, rot, time.time())

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n## {args.model}: held-out wiki perplexity ({n_win} x {args.seqlen} tokens; all prompt tokens sparsified "
          f"unless noted; LaRoSA mode M = merged)\n")
    print("| method | target | planned S_model | measured S_model | ppl | Δppl vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        pl = "-" if r["planned"] is None else f"{r['planned']:.4f}"
        print(f"| {r['method']} | {r['target']:.2f} | {pl} | {r['measured']:.4f} | {r['ppl']:.3f} | "
              f"{r['ppl'] - dense:+.3f} |")
    print(f"\ncalibration costs: {json.dumps(costs)}; peak RSS {peak:.2f} GiB")
    by = {(r["method"], r["target"]): r["ppl"] for r in rows}
    for lv in levels:
        lk = next((k for k in by if k[0].startswith("larosa-merged-exact") and k[1] == lv), None)
        tk = ("teal (prefill all)", lv)
        if lk and tk in by:
            dl, dt = by[lk] - dense, by[tk] - dense
            print(f"s={lv:.2f}: LaRoSA Δppl {dl:+.3f} vs TEAL Δppl {dt:+.3f} (ratio {dl / dt if dt else float('nan'):.2f})")
        gk = ("teal-greedy (prefill all)", lv)
        lg = ("larosa-merged-greedy", lv)
        if lg in by and tk in by:
            print(f"s={lv:.2f}: LaRoSA-greedy Δppl {by[lg] - dense:+.3f} vs TEAL Δppl {by[tk] - dense:+.3f} "
                  f"(ratio {(by[lg] - dense) / (by[tk] - dense) if by[tk] != dense else float('nan'):.2f})")
        if lg in by and gk in by:
            print(f"s={lv:.2f}: LaRoSA-greedy Δppl {by[lg] - dense:+.3f} vs TEAL-greedy Δppl {by[gk] - dense:+.3f}")
        if lk and gk in by:
            dl, dg = by[lk] - dense, by[gk] - dense
            print(f"s={lv:.2f}: LaRoSA Δppl {dl:+.3f} vs TEAL-greedy Δppl {dg:+.3f} "
                  f"(ratio {dl / dg if dg else float('nan'):.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dense": dense, "rows": rows, "costs": costs, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
