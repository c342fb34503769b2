"""LaRoSA merged, exact plan, with and without ``column_scale`` (ours), on the same rotations.

    python benchmarks/larosa_column_scale.py smollm2-135m --windows 8 --levels 0.4,0.5 --threads 1

Prints one JSON line per row: dense, then for each level the perplexity without and with the column
scale (held-out wiki, windows × 1024 tokens; rotations from 8 × 512 calibration tokens).
"""

from __future__ import annotations

import argparse
import copy
import json

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--levels", default="0.4")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmcompress.eval.perplexity import perplexity
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.sparse.methods.larosa import larosa
    from mmcompress.sparse.rotation import calibrate_rotations
    from mmcompress_testbed.data import calibration_set, eval_text
    from mmcompress_testbed.registry import resolve_model_dir

    d = resolve_model_dir(args.model)
    tok = load_tokenizer(d)
    base = load_hf_model(d, dtype="float32")
    calib = calibration_set("wiki", base, d, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    ids = tok(eval_text("wiki"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]

    def ppl(m):
        return perplexity(m, ids, seqlen=1024, max_windows=args.windows, progress=False)["ppl"]

    rot = calibrate_rotations(base, get_adapter(base), calib.samples, progress=False)
    print(json.dumps({"model": args.model, "dense": ppl(base)}), flush=True)
    for level in (float(v) for v in args.levels.split(",")):
        for cs in (False, True):
            m = copy.deepcopy(base)
            info = larosa(m, get_adapter(m), calib.samples, level, rotations=rot, column_scale=cs, progress=False)
            print(json.dumps({"level": level, "column_scale": cs, "model_sparsity": info["model_sparsity"],
                              "ppl": ppl(m)}), flush=True)
            del m


if __name__ == "__main__":
    main()
