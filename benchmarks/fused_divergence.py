"""Where the fused decode step and the Python step part on a LaRoSA / joint artifact (docs/runtime.md):
per step, the logit difference and the first discontinuity (a Top-K swap or an activation code flip) of
``mmcompress.runtime.fused_check.compare``, and a summary.

    PYTHONPATH=src python benchmarks/fused_divergence.py ARTIFACT [--steps 32] [--prompts 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import mmcompress
    from mmcompress.runtime.decode import DecodeEngine
    from mmcompress.runtime.fused_check import compare
    from mmcompress.runtime.generate import prepare

    model = prepare(mmcompress.load(a.artifact), quiet=True)
    n = a.prompt_len + a.steps + 1
    py, fu = DecodeEngine(model, max_len=n, fused=False), DecodeEngine(model, max_len=n, fused=True)
    if not fu.fused:
        print("the fused step does not run this model", file=sys.stderr)
        return 1
    vocab = model.get_input_embeddings().num_embeddings
    rows = []
    for p in range(a.prompts):
        ids = torch.randint(0, vocab, (1, a.prompt_len), generator=torch.Generator().manual_seed(p))
        for r in compare(py, fu, ids, a.steps):
            rows.append({"prompt": p, **r})
            f = r["first"]
            what = "none" if f is None else (
                f"layer {f['layer']} {f['input']} ({f['module']}): {f['kind']}, " +
                (f"{f['swapped']} swap(s), gap {f['gap']:.2e} vs input diff {f['diff']:.2e}" if f["kind"] == "topk"
                 else f"{f['codes']} code(s), {f['frac']:.2e} of a step from the boundary, input diff {f['diff']:.2e}"))
            print(f"prompt {p} step {r['step']:2d}: logits {r['logits']:.2e} same token {r['same_token']!s:5s} "
                  f"modules on the same inputs {max(r['modules'].values()):.1e}; first discontinuity: {what}")
    clean = [r["logits"] for r in rows if r["first"] is None]
    flips = [r for r in rows if r["first"] is not None]
    summary = {"steps": len(rows), "modules_max": {k: max(r["modules"][k] for r in rows if k in r["modules"])
                                                    for k in rows[0]["modules"]}, "clean_steps": len(clean), "clean_max_logits": max(clean, default=0.0),
               "discontinuous_steps": len(flips),
               "topk_max_gap_over_diff": max((r["first"]["gap"] / max(r["first"]["diff"], 1e-30) for r in flips
                                              if r["first"]["kind"] == "topk"), default=None),
               "code_max_frac": max((r["first"]["frac"] for r in flips if r["first"]["kind"] == "code"), default=None)}
    print(json.dumps(summary))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
