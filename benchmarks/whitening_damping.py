"""CMC's whitened low-rank fit on real omni-mini image / audio activations: held-out error vs damping.

    python benchmarks/whitening_damping.py [--layers 2 15 28] [--images 32] [--clips 16] [--rank 32]

For each chosen decoder layer and the q_proj / gate_proj input: the image (audio) tokens of
``--images + --clips`` samples of ``testbed-whiten`` seed 0 (half image-only, half audio-only) fit the
factors, as many from seed 1 (other images and clips) measure them.  ``s_T`` and ``s_m`` are MASQuant's initial vectors
(E7, α = 0.5: text absmax from 8 wiki windows, modality absmax from the fit set), ``ΔW_m = W ⊙ s_m −
Q_w(W ⊙ s_T)`` at W4 per channel.  Prints the relative error ``||X̃ (ΔWᵀ − L R)|| / ||X̃ ΔWᵀ||`` on the fit
and the held-out tokens, for the unwhitened SVD and damping λ ∈ {0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1}.
"""

from __future__ import annotations

import argparse

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 15, 28])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model
    from mmcompress.models.modality import AUDIO, IMAGE, MODALITY_NAMES, TEXT, modality_ids
    from mmcompress.quant.methods.base import weight_column_absmax
    from mmcompress.quant.methods.masquant import whitened_low_rank
    from mmcompress.quant.methods.smoothquant import smoothing_factors
    from mmcompress.quant.quantizer import fake_quantize_weight
    from mmcompress_testbed.data import calibration_set
    from mmcompress_testbed.registry import fetch

    path = fetch("omni-mini")
    model = load_hf_model(path)
    ad = get_adapter(model)
    n = args.images + args.clips
    fit = calibration_set("testbed-whiten", model, path, nsamples=n, seqlen=128, seed=0)
    test = calibration_set("testbed-whiten", model, path, nsamples=n, seqlen=128, seed=1)
    text = calibration_set("wiki", model, path, nsamples=8, seqlen=128, seed=0)
    paths = [f"{i}.{p}" for i in args.layers for p in ("self_attn.q_proj", "mlp.gate_proj")]
    mods = {p: ad.layers[int(p.split(".")[0])].get_submodule(p.split(".", 1)[1]) for p in paths}

    def collect(samples):
        got = {p: {} for p in paths}
        cur = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, p=p: got[p].setdefault("x", []).append(
            (a[0].detach().double().reshape(-1, a[0].shape[-1]), cur["ids"]))) for p, m in mods.items()]
        try:
            for s in samples:
                cur["ids"] = modality_ids(s["input_ids"], ad.modality_token_ids).reshape(-1)
                with torch.no_grad():
                    model(**s)
        finally:
            for h in hooks:
                h.remove()
        out = {}
        for p in paths:
            xs = got[p]["x"]
            out[p] = {m: torch.cat([x[ids == m] for x, ids in xs]) for m in (TEXT, IMAGE, AUDIO)}
        return out

    xf, xt, xtext = collect(fit.samples), collect(test.samples), collect(text.samples)
    lams = [0.0, 1e-8, 1e-6, 1e-4, 1e-2, 1e-1]
    print(f"fit: {n} testbed-whiten samples, seed 0 (the builder makes half image-only, half audio-only); "
          f"held-out: {n} from seed 1; rank {args.rank}; W4 per channel; relative error fit / held-out")
    print("| layer.linear | modality | fit tokens | d_in | plain SVD | " + " | ".join(f"λ={x:g}" for x in lams) + " |")
    print("|---|---|---|---|---|" + "---|" * len(lams))
    for p in paths:
        w = mods[p].weight.detach().double()
        wmax = weight_column_absmax([mods[p]])
        s_t = smoothing_factors(xtext[p][TEXT].abs().amax(0), wmax, 0.5).clamp(min=1e-2)
        for m in (IMAGE, AUDIO):
            a, b = xf[p][m], xt[p][m]
            s_m = smoothing_factors(a.abs().amax(0), wmax, 0.5).clamp(min=1e-2)
            delta = w * s_m - fake_quantize_weight((w * s_t).float(), 4).double()
            a, b = a / s_m, b / s_m
            c = a.T @ a

            def err(lr):
                left, right = lr
                r = delta.T - left @ right
                return f"{float((a @ r).norm() / (a @ delta.T).norm()):.3f} / {float((b @ r).norm() / (b @ delta.T).norm()):.3f}"

            cells = [err(whitened_low_rank(delta, None, args.rank))]
            cells += [err(whitened_low_rank(delta, c, args.rank, damping=lam)) for lam in lams]
            print(f"| {p} | {MODALITY_NAMES[m]} | {a.shape[0]} | {a.shape[1]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
