"""Joint compression on a testbed text model: LaRoSA-40 %, W8A8, and LaRoSA-40 % then W8A8, one run.

    python benchmarks/joint_table.py --model smollm2-135m --sparsity 0.4 --scheme w8a8

Prints held-out wiki perplexity and greedy-decode speed (tokens/s, dense-vs-variant ratio measured
in this process) for: dense, LaRoSA alone (sparse kernel decode), W8A8 alone, and the recipe.
The joint model's quantized projections keep their Top-K in front of the quantizer; their decode
runs on the PyTorch path (there is no sparse int8 kernel yet), so its speed is reported as measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def decode_tps(model, prompt, tokens: int, warmup: int = 3) -> float:
    """Greedy decode speed (tokens/s) after ``warmup`` untimed steps (the first sparse step loads the
    compiled kernel, which must not be timed)."""
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        cache = out["cache"]  # transformers 5: the decoding cache is `cache`
        nxt = out.logits[:, -1:].argmax(-1)
        for _ in range(warmup):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out["cache"]
            nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache = out["cache"]
            nxt = out.logits[:, -1:].argmax(-1)
        return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.4)
    ap.add_argument("--scheme", default="w8a8")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    from mmcompress.eval.perplexity import text_perplexity
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.recipe import apply_recipe, parse_recipe
    from mmcompress.sparse.decode import enable_sparse_decode
    from mmcompress_testbed.data import calibration_set, eval_text
    from mmcompress_testbed.registry import fetch

    path = fetch(args.model)
    dense = load_hf_model(path)
    tok = load_tokenizer(path)
    wiki = eval_text("wiki")
    calib = calibration_set("wiki", dense, path, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    prompt = tok("The history of the city begins", return_tensors="pt")["input_ids"]
    variants = {
        "dense": [],
        f"larosa-{int(args.sparsity * 100)}": [{"sparsify": {"method": "larosa", "sparsity": args.sparsity}}],
        args.scheme: [{"quantize": {"method": "rtn", "scheme": args.scheme}}],
        f"larosa-{int(args.sparsity * 100)}+{args.scheme}": [{"sparsify": {"method": "larosa", "sparsity": args.sparsity}},
                                                              {"quantize": {"method": "rtn", "scheme": args.scheme}}],
    }
    rows, dense_tps = [], None
    for name, steps in variants.items():
        model = copy.deepcopy(dense)
        if steps:
            apply_recipe(model, calib, parse_recipe({"steps": steps}), progress=False)
        ppl = text_perplexity(model, tok, wiki, seqlen=args.seqlen, max_windows=args.windows, progress=False)["ppl"]
        if name.startswith("larosa") and "+" not in name:
            enable_sparse_decode(model)
        tps = decode_tps(model, prompt, args.tokens)
        dense_tps = dense_tps or tps
        rows.append({"variant": name, "wiki_ppl": round(ppl, 3), "decode_tok_s": round(tps, 2),
                     "speedup_vs_dense": round(tps / dense_tps, 3)})
        print(json.dumps(rows[-1]), flush=True)
        del model
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows, "threads": torch.get_num_threads()}, f, indent=1)


if __name__ == "__main__":
    main()
