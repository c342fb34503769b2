"""AWQ at full strength (issue 17 item 6): RTN vs AWQ with the per-linear loss and no clipping (the
search before issue 17) vs AWQ with the block-output loss vs AWQ as the reference (block loss + weight
clipping, today's default), on a testbed text model; held-out wiki perplexity.

    OMP_NUM_THREADS=1 python benchmarks/awq_strength.py --model smollm2-135m --scheme w4a16 \\
        --nsamples 8 --seqlen 256 --windows 4 --json runs/awq_strength.json

Calibration: the testbed's ``wiki`` calibration split (``--nsamples`` windows of ``--seqlen`` tokens,
seed ``--seed``); evaluation: held-out wiki windows of 512 tokens.  Prints one JSON line per row and a
Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

ROWS = {"rtn": ("rtn", {}),
        "awq-linear": ("awq", {"loss": "linear", "clip": False}),  # the search before issue 17
        "awq-block": ("awq", {"loss": "block", "clip": False}),
        "awq-block-clip": ("awq", {})}  # today's default: the reference's block loss + weight clipping


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="w4a16", help="w4a16 (g128 asym), w4a8, ... or w4a8-g128")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--windows", type=int, default=4, help="held-out wiki windows of 512 tokens")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of: " + ", ".join(ROWS))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from mmcompress.eval.perplexity import text_perplexity
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.quant.api import quantize
    from mmcompress.quant.quantizer import resolve_scheme
    from mmcompress_testbed.data import calibration_set, eval_text
    from mmcompress_testbed.registry import fetch

    base_name, _, group = args.scheme.partition("-g")
    scheme = resolve_scheme(base_name, group_size=int(group) if group else None)
    path = fetch(args.model)
    base = load_hf_model(path, dtype="float32")
    tok = load_tokenizer(path)
    calib = calibration_set("wiki", base, path, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    text = eval_text("wiki")
    ppl = lambda m: round(text_perplexity(m, tok, text, seqlen=512, max_windows=args.windows, progress=False)["ppl"], 3)
    rows = [{"row": "fp32", "ppl": ppl(base)}]
    print(json.dumps(rows[0]), flush=True)
    for name in args.rows.split(","):
        method, opts = ROWS[name]
        m = copy.deepcopy(base)
        t0 = time.time()
        quantize(m, calib, method, scheme, progress=False, **opts)
        r = {"row": name, "calib_s": round(time.time() - t0, 1), "ppl": ppl(m),
             "method_config": m._mmcompress_description["method"]}
        if method == "awq":
            layers = m._mmcompress_description["layers"]
            r["alpha_layer0"] = layers[0]["awq"]["alpha"]
            r["clipped_rows_layer0"] = layers[0]["awq"].get("clipped_rows")
        rows.append(r)
        print(json.dumps(r), flush=True)
        del m
    print(f"\n{args.model}, {args.scheme} ({scheme.to_dict()}), calibration wiki {args.nsamples} x {args.seqlen} "
          f"seed {args.seed}; held-out wiki perplexity on {args.windows} x 512 tokens\n")
    print("| row | wiki ppl | calibration s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['ppl']:.3f} | {r.get('calib_s', '–')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
