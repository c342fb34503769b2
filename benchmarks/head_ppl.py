"""What the fused step's packed LM head (``DecodeEngine(head="bf16" | "int8")``, runtime/fused.py) does to
an artifact: wiki perplexity with the model's head and with the packed head's effective weights, on the
same windows, and greedy decode tokens of the fused step with each head against the model's head.

    PYTHONPATH=src python benchmarks/head_ppl.py /tmp/lc-cmp/art-w8a8 --windows 8 --seqlen 512 --threads 2

Perplexity: the artifact on its integer runtime (prefill forward), with ``lm_head`` untied and replaced by
an ``nn.Linear`` holding ``bf16(W)`` or ``int8_rows(W)`` codes x step sizes (exactly what the packed step
multiplies; the embedding stays the model's, as in the step).  Greedy: ``--prompts`` prompts of 16 tokens
from the same text, 64 new tokens each on the fused step; reported: how many of the new tokens equal the
model head's, and the first position where they differ.  Last line: JSON.
"""

import argparse
import json
import sys

import torch
from torch import nn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import mmcompress
    from mmcompress.eval.perplexity import perplexity
    from mmcompress.models.loading import load_tokenizer
    from mmcompress.runtime.decode import DecodeEngine
    from mmcompress.runtime.fused import int8_rows
    from mmcompress_testbed.data import eval_text

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.artifact)
    ids = tok(eval_text("wiki"), return_tensors="pt").input_ids[0]
    model = mmcompress.load(a.artifact)
    W = model.lm_head.weight.detach()
    res = {"artifact": a.artifact, "dtype": str(W.dtype), "ppl": {}, "greedy": {}}
    orig = model.lm_head
    for head in ("model", "bf16", "int8"):
        if head != "model":  # the untied replacement, for this perplexity only
            lin = nn.Linear(W.shape[1], W.shape[0], bias=False, dtype=W.dtype)
            if head == "bf16":
                lin.weight.data = W.to(torch.bfloat16).to(W.dtype)
            else:
                q, s = int8_rows(W)
                lin.weight.data = (q.float() * s).to(W.dtype)
            model.lm_head = lin
        try:
            with torch.no_grad():
                res["ppl"][head] = perplexity(model, ids[: a.windows * a.seqlen], seqlen=a.seqlen,
                                              progress=False)["ppl"]
        finally:
            model.lm_head = orig
        print(f"  wiki ppl, head {head}: {res['ppl'][head]:.4f}", file=sys.stderr, flush=True)
    prompts = [ids[i * 997: i * 997 + 16][None] for i in range(a.prompts)]
    outs = {}
    for head in ("model", "bf16", "int8"):
        eng = DecodeEngine(model, max_len=16 + a.tokens, fused=True, head=head)
        outs[head] = [eng.generate(p, a.tokens)[0, 16:] for p in prompts]
    for head in ("bf16", "int8"):
        same = sum(int((x == y).sum()) for x, y in zip(outs[head], outs["model"]))
        first = [int((x != y).nonzero()[0]) if (x != y).any() else None for x, y in zip(outs[head], outs["model"])]
        res["greedy"][head] = {"same_tokens": same, "of": a.prompts * a.tokens, "first_difference": first}
        print(f"  greedy, head {head}: {same}/{a.prompts * a.tokens} new tokens as the model head's; first "
              f"difference per prompt {first}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
