"""Where does the perplexity go?  Sparsify one activation (h1 q,k,v input | h2 o input | h3 gate,up
input | h4 down input) at a time, at the same level, with LaRoSA Top-K in the PCA basis (Mode M),
plain Top-K without rotation (Q = I, γ-free) and TEAL thresholds; all other activations dense.

    python benchmarks/sparsity_attribution.py smollm2-135m --level 0.4 [--seqlen 512 --windows 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--level", type=float, default=0.4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--acts", default="h1,h2,h3,h4")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mmcompress.engine import Compose, run_layerwise
    from mmcompress.eval.perplexity import perplexity
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.sparse import plan as plans
    from mmcompress.sparse.merge import inner_layer, merge_rotations
    from mmcompress.sparse.methods.larosa import _set, apply_topk_plan, make_sparse_linear
    from mmcompress.sparse.topk import Threshold
    from mmcompress.sparse.methods.teal import MagnitudeSampler, _teal_select, quantile
    from mmcompress.sparse.rotation import MomentCollector, Rotations, rotation_from_moment
    from mmcompress_testbed.data import calibration_set, eval_text

    from mmcompress_testbed.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    tok = load_tokenizer(model_dir)
    base = load_hf_model(model_dir, dtype="float32")
    ad0 = get_adapter(base)
    shapes = plans.layer_shapes(ad0)
    calib = calibration_set("wiki", base, model_dir, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    ids = tok(eval_text("wiki"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]

    def ppl(m):
        return perplexity(m, ids, seqlen=args.seqlen, max_windows=args.windows, progress=False)["ppl"]

    moments, sampler = MomentCollector("merged"), MagnitudeSampler(_teal_select, nsamples=len(calib))

    run_layerwise(base, ad0, Compose(moments, sampler), calib.samples, progress=False)
    qs = [rotation_from_moment(h)[0] for h in moments.moments]
    eye = torch.eye(qs[0].shape[0], dtype=torch.float64)
    out = {"dense": ppl(base)}
    print(json.dumps({"dense": out["dense"]}), file=sys.stderr, flush=True)
    merged = {}
    for name, mats in (("larosa-M", qs), ("topk-noQ", [eye] * len(qs))):
        m = copy.deepcopy(base)
        merge_rotations(m, get_adapter(m), Rotations("merged", mats, [None] * len(mats)))
        merged[name] = m
    for act in args.acts.split(","):
        levels = [{p: (args.level if p in plans.READERS_OF[act] else 0.0) for p in plans.PROJECTIONS} for _ in shapes]
        plan = plans.per_projection(shapes, levels, "one-activation", args.level)
        for name, m in merged.items():
            if name == "topk-noQ" and act in ("h2", "h4"):  # not rotated: identical to larosa-M
                out[f"{name} {act}"] = out[f"larosa-M {act}"]
                continue
            apply_topk_plan(m, get_adapter(m), plan)
            out[f"{name} {act}"] = ppl(m)
            print(json.dumps({f"{name} {act}": out[f"{name} {act}"]}), file=sys.stderr, flush=True)
        m = copy.deepcopy(base)
        am = get_adapter(m)
        for i, layer in enumerate(am.layers):
            layer = inner_layer(layer)
            t = quantile(sampler.values[i][act], args.level)
            for g in am.groups:
                if plans.GROUP_ACTIVATION[g.name] == act:
                    for path in g.readers:
                        mod = layer.get_submodule(path)
                        _set(layer, path, make_sparse_linear(mod, Threshold(t)))
        out[f"teal {act}"] = ppl(m)
        print(json.dumps({f"teal {act}": out[f"teal {act}"]}), file=sys.stderr, flush=True)
        del m
    print(f"## {args.model}: one activation sparsified at {args.level} (others dense); held-out wiki, "
          f"{args.windows} x {args.seqlen} tokens; dense ppl {out['dense']:.3f}\n")
    print("| activation | LaRoSA Top-K (Mode M, PCA) | Top-K, Q = I | TEAL threshold |")
    print("|---|---|---|---|")
    for act in args.acts.split(","):
        print(f"| {act} | {out[f'larosa-M {act}']:.3f} | {out[f'topk-noQ {act}']:.3f} | {out[f'teal {act}']:.3f} |")


if __name__ == "__main__":
    main()
