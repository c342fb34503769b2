"""What 8-bit residual adapters cost in accuracy: wiki perplexity of a LaRoSA + W8A8 ``compress --recipe``
artifact with its residual adapters ``r <- r A_l`` in float (the artifact's dtype) and on 8-bit grids.

    PYTHONPATH=src python benchmarks/adapter_bits.py ARTIFACT [--windows 16] [--seqlen 512]

ARTIFACT: a joint artifact saved with float adapters (``adapters: float`` in the recipe's quantize step).
Rows: float; rounded to bf16 (what a bf16 copy of an fp32 artifact's adapters would cost); per-output-channel symmetric RTN (what ``quantize_residual_adapters`` stores, ``w8a16``);
group-wise 64 and 32 for comparison.  The reference (fake-quant) forward is used for every row, so only
the adapters differ.
"""

import argparse

import torch

from mmcompress.data.named import resolve
from mmcompress.eval.perplexity import text_perplexity
from mmcompress.export.serialization import load_model
from mmcompress.models.loading import load_tokenizer
from mmcompress.quant.quantizer import dequantize_weight, quantize_weight
from mmcompress.sparse.merge import ResidualAdaptedLayer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    a = ap.parse_args()
    text = resolve("text", "wiki")()
    tok = load_tokenizer(a.artifact)
    model = load_model(a.artifact, runtime="reference")
    ads = [m.residual_adapter for m in model.modules()
           if isinstance(m, ResidualAdaptedLayer) and m.residual_adapter is not None]
    if not ads or any(type(x) is not torch.nn.Linear for x in ads):
        raise SystemExit("the artifact needs float residual adapters (recipe quantize step with adapters: float)")
    orig = [x.weight.data.clone() for x in ads]
    print(f"{len(ads)} adapters, {orig[0].dtype} {tuple(orig[0].shape)}; wiki test, {a.windows} x {a.seqlen} tokens")
    for name, group in (("float", None), ("bf16", "bf16"), ("int8 per channel (w8a16)", 0), ("int8 g64", 64),
                        ("int8 g32", 32)):
        if a.rows and name not in a.rows.split(","):
            continue
        for x, w in zip(ads, orig):
            if group is None:
                x.weight.data.copy_(w)
            elif group == "bf16":  # rounded to bf16 (round to nearest even), held in the artifact's dtype
                x.weight.data.copy_(w.to(torch.bfloat16).to(w.dtype))
            else:
                q, s, z = quantize_weight(w.float(), 8, group, True)
                x.weight.data.copy_(dequantize_weight(q, s, z, 8, group, True).to(w.dtype))
        r = text_perplexity(model, tok, text, seqlen=a.seqlen, max_windows=a.windows, progress=False)
        print(f"  {name:26s} ppl {r['ppl']:.4f} over {r['tokens']} tokens", flush=True)


if __name__ == "__main__":
    main()
