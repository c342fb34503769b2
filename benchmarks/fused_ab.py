"""Decode tok/s of two source trees of mmcompress (e.g. before / after a change to the fused step), in
one sitting: the trees take turns, one subprocess per measurement, so machine load falls on both alike.

    git archive <old-commit> | tar -x -C /tmp/base          # the "before" tree
    python benchmarks/fused_ab.py --tree before=/tmp/base/src --tree after=src \\
        --model dense_bf16=~/.cache/mmcompress/testbed/smollm2-135m:bfloat16 --model w8a8=/tmp/lc-cmp/art-w8a8 \\
        --threads 2 --prompt 16 --tokens 64 --rounds 3

``--model NAME=PATH[:DTYPE]``: an artifact (``mmcompress.load``) or, with ``:DTYPE``, a plain model
directory loaded in that dtype.  ``--head-after bf16|int8`` runs the "after" tree's engine with that LM
head as an extra variant (``DecodeEngine(head=...)``; trees without the option are never asked for it).
Each measurement: the engine's default step (fused where supported), one warm-up generation, then
``--tokens`` greedy tokens after the same ``--prompt`` tokens; tok/s = decode steps / their summed time
(the prefill excluded).  Prints per (tree, model, head): best and median over the rounds, and the load
average before each round; the last line is JSON.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from llamacpp_compare import loadavg, summarize  # benchmarks/ is sys.path[0] when run as a script

_CHILD = r"""
import json, sys, torch
import mmcompress
from mmcompress.models.loading import load_hf_model, load_tokenizer
from mmcompress.runtime.decode import DecodeEngine
path, dtype, head, threads, prompt, tokens = sys.argv[1:7]
torch.set_num_threads(int(threads))
model = load_hf_model(path, dtype=getattr(torch, dtype)) if dtype else mmcompress.load(path)
tok = load_tokenizer(path)
text = "The history of the city begins in the early medieval period, when a small settlement grew around " * 4
ids = torch.tensor([tok(text).input_ids[: int(prompt)]])
kw = {"head": head} if head != "model" else {}
eng = DecodeEngine(model, max_len=int(prompt) + int(tokens), **kw)
eng.generate(ids, 4)
tm = {}
eng.generate(ids, int(tokens), timings=tm)
print(json.dumps({"tok_s": len(tm["step_s"]) / sum(tm["step_s"]), "fused": eng.fused}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=SRC_DIR")
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH[:DTYPE]")
    ap.add_argument("--head-after", action="append", default=[], choices=("bf16", "int8"),
                    help="also run the last --tree with this LM head")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    trees = [t.split("=", 1) for t in a.tree]
    models = []
    for m in a.model:
        name, spec = m.split("=", 1)
        path, _, dtype = spec.partition(":")
        models.append((name, os.path.expanduser(path), dtype))
    variants = [(t, src, m, "model") for t, src in trees for m in models]
    variants += [(trees[-1][0], trees[-1][1], m, h) for h in a.head_after for m in models]
    res: dict[str, list[float]] = {}
    loads = []
    env0 = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for r in range(a.rounds):
        loads.append(loadavg())
        print(f"round {r + 1}/{a.rounds}, load average {loads[-1]}", file=sys.stderr, flush=True)
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for tree, src, (name, path, dtype), head in order:
            key = f"{tree} {name}" + (f" head={head}" if head != "model" else "")
            out = subprocess.run([sys.executable, "-c", _CHILD, path, dtype, head, str(a.threads), str(a.prompt),
                                  str(a.tokens)], env=dict(env0, PYTHONPATH=str(Path(src).resolve())),
                                 check=True, capture_output=True, text=True).stdout
            v = json.loads(out.strip().splitlines()[-1])
            res.setdefault(key, []).append(v["tok_s"])
            print(f"  {key:40s} {v['tok_s']:8.1f} tok/s{'' if v['fused'] else ' (Python step)'}", file=sys.stderr,
                  flush=True)
    loads.append(loadavg())
    summary = summarize(res)
    print(f"\nbest (median) tok/s, {a.tokens} tokens after {a.prompt}, {a.threads} threads, {a.rounds} rounds; "
          f"load averages {loads}", file=sys.stderr)
    for k, s in summary.items():
        print(f"  {k:40s} {s['best_tok_s']:8.1f} ({s['median_tok_s']:.1f})", file=sys.stderr)
    print(json.dumps({"threads": a.threads, "prompt": a.prompt, "tokens": a.tokens, "rounds": a.rounds,
                      "load_averages": loads, "results": summary}))


if __name__ == "__main__":
    sys.exit(main())
