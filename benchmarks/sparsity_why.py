"""Why does LaRoSA beat TEAL on one model and not on another?  A local, per-layer answer.

For every decoder layer and for the two rotated activations (h1: the input of q/k/v; h3: the input of
gate/up), the relative output error of the reader linears when their input is sparsified at the same
level p, on held-out calibration tokens::

    e = ‖(a − a_s) Wᵀ‖² / ‖a Wᵀ‖²            (summed over the readers and over the tokens)

for three bases of the same product (x̂ = RMS(r) is the γ-free normalised input, γ the norm scale,
W the readers' weights; y = (γ ⊙ x̂) Wᵀ is the same in every basis):

    raw   a = γ ⊙ x̂,   weight W                (what TEAL sparsifies)
    I     a = x̂,       weight W·diag(γ)        (LaRoSA's merged form with Q = I: γ folded)
    PCA   a = x̂ Q,     weight W·diag(γ)·Q      (LaRoSA, Q from the second moment of x̂, damped)

and two selection rules: per-token Top-K (exactly K = round((1 − p)·d) entries kept, LaRoSA) and a
magnitude threshold fitted on other tokens (TEAL; its realised sparsity varies from token to token).
It also reports how concentrated x̂'s energy is in the PCA basis: the fraction of the energy that
the top (1 − p)·d eigen-directions hold (the paper's argument, docs/larosa.md §3.4).

    python benchmarks/sparsity_why.py smollm2-135m --levels 0.25,0.4,0.5 [--fit 8 --held 4 --seqlen 512]

Q and the thresholds are fitted on the first ``--fit`` samples; errors are measured on the next
``--held`` samples, so neither rule is scored on the tokens it was fitted on.
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def _rel_err(a, a_s, w, y_energy):
    """Σ‖(a − a_s)wᵀ‖² / Σ‖a wᵀ‖² over tokens (products in float32, sums in float64)."""
    e = (a - a_s).float() @ w.float().T
    return float(e.double().pow(2).sum() / y_energy)


def topk_keep(a, p):
    k = max(1, round((1.0 - p) * a.shape[-1]))
    idx = a.abs().topk(k, dim=-1).indices
    return torch.zeros_like(a).scatter(-1, idx, a.gather(-1, idx))


def threshold_keep(a, t):
    return torch.where(a.abs() > t, a, torch.zeros_like(a))


def layer_report(xf: dict, xe: dict, gammas: dict, weights: dict, levels, damping: float) -> dict:
    """``xf``/``xe``: block -> γ-free normalised inputs (fit / held-out tokens)."""
    from mmcompress.sparse.rotation import rotation_from_moment

    fit_attn = xf["attn"]
    q, evals = rotation_from_moment(fit_attn.T @ fit_attn, damping=damping)
    energy = evals.clamp(min=0) / evals.clamp(min=0).sum()
    out = {"energy_top": {}}
    for p in levels:
        k = max(1, round((1.0 - p) * q.shape[0]))
        out["energy_top"][p] = float(energy[:k].sum())
    for block in ("attn", "mlp"):
        g, w = gammas[block], weights[block]
        y_energy = float(((xe[block] * g).float() @ w.float().T).double().pow(2).sum())  # the same in every basis
        wq = (w * g) @ q
        c = wq.pow(2).sum(0).sqrt()  # reader column norms in the PCA basis
        c = c / c.mean()
        bases = {
            "raw": (lambda x: x * g, w),
            "I": (lambda x: x, w * g),
            "PCA": (lambda x: x @ q, wq),
            # ours: the PCA basis scaled by the readers' column norms, so that Top-K ranks |x̃_i|·‖W'_{:,i}‖
            # (exact in the merged form: the scale becomes the norm's γ, its inverse goes into the readers)
            "PCA+w": (lambda x: (x @ q) * c, wq / c),
        }
        for bname, (to_basis, weff) in bases.items():
            a_fit, a = to_basis(xf[block]), to_basis(xe[block])
            fit_sorted = torch.sort(a_fit.abs().reshape(-1)).values
            for p in levels:
                out[f"{block}/{bname}/topk/{p}"] = _rel_err(a, topk_keep(a, p), weff, y_energy)
                t = float(fit_sorted[min(fit_sorted.numel() - 1, int(p * fit_sorted.numel()))])
                a_s = threshold_keep(a, t)
                out[f"{block}/{bname}/thr/{p}"] = _rel_err(a, a_s, weff, y_energy)
                out[f"{block}/{bname}/thr_sparsity/{p}"] = float((a_s == 0).double().mean())
        # energy of x̂ kept by Top-K, in the identity and the PCA basis (comparable: ‖x̂Q‖ = ‖x̂‖)
        x = xe[block]
        for p in levels:
            tot = float(x.pow(2).sum())
            out[f"{block}/I/kept_energy/{p}"] = float(topk_keep(x, p).pow(2).sum()) / tot
            out[f"{block}/PCA/kept_energy/{p}"] = float(topk_keep(x @ q, p).pow(2).sum()) / tot
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--levels", default="0.25,0.4,0.5")
    ap.add_argument("--fit", type=int, default=8, help="calibration samples that fit Q and the thresholds")
    ap.add_argument("--held", type=int, default=4, help="further samples on which the errors are measured")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--damping", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the per-layer records here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [float(v) for v in args.levels.split(",")]

    from mmcompress.engine import Method, run_layerwise
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model
    from mmcompress.sparse.rotation import _norm_eps
    from mmcompress_testbed.data import calibration_set
    from mmcompress_testbed.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model = load_hf_model(model_dir, dtype="float32")
    adapter = get_adapter(model)
    calib = calibration_set("wiki", model, model_dir, nsamples=args.fit + args.held, seqlen=args.seqlen, seed=0)
    records = []

    class Observe(Method):
        name = "observe"

        def __init__(self):
            self.handles, self.cur = [], None

        def flush(self):
            for h in self.handles:
                h.remove()
            self.handles = []
            if self.cur is None:
                return
            c = self.cur
            xs = {b: torch.cat(v) for b, v in c["x"].items()}
            nfit = c["nfit"]
            xf = {b: x[:nfit] for b, x in xs.items()}
            xe = {b: x[nfit:] for b, x in xs.items()}
            rec = layer_report(xf, xe, c["gamma"], c["w"], levels, args.damping)
            rec["layer"] = c["index"]
            records.append(rec)
            print(json.dumps({"layer": c["index"], **{k: round(v, 4) for k, v in rec.items()
                                                     if isinstance(v, float) and "/0.4" in k and "/topk/" in k}}),
                  flush=True)
            self.cur = None

        def step(self, ctx):
            self.flush()
            layer = ctx.layer
            groups = {g.name: g for g in ctx.adapter.groups}
            c = {"index": ctx.index, "x": {"attn": [], "mlp": []}, "gamma": {}, "w": {}, "nfit": 0, "calls": 0}
            for block, gname in (("attn", "attn_in"), ("mlp", "mlp_in")):
                g = groups[gname]
                norm = layer.get_submodule(g.producer)
                gamma = norm.weight.detach().double() + ctx.adapter.norm_offset
                c["gamma"][block] = gamma
                c["w"][block] = torch.cat([layer.get_submodule(r).weight.detach().double() for r in g.readers])
                eps = _norm_eps(norm)

                def hook(mod, a, eps=eps, block=block):
                    x = a[0].reshape(-1, a[0].shape[-1]).double()
                    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                    c["x"][block].append(x)
                    if block == "attn":
                        c["calls"] += 1
                        if c["calls"] <= args.fit:
                            c["nfit"] += x.shape[0]

                self.handles.append(norm.register_forward_pre_hook(hook))
            self.cur = c

        def finalize(self, model, adapter):
            self.flush()

    obs = Observe()
    run_layerwise(model, adapter, obs, calib.samples, progress=False)
    obs.flush()

    def mean(key):
        return sum(r[key] for r in records) / len(records)

    print(f"\n## {args.model}: local output error of the readers at equal sparsity "
          f"(mean over {len(records)} layers; Q and thresholds fitted on {args.fit} x {args.seqlen} tokens, "
          f"errors on {args.held} x {args.seqlen} other tokens)\n")
    for p in levels:
        print(f"### p = {p}\n")
        print("| block | Top-K raw (γ⊙x̂) | Top-K, Q = I | Top-K, PCA (LaRoSA) | Top-K, PCA + column norms (ours) "
              "| threshold raw (TEAL) | threshold, Q = I | threshold, PCA | threshold, PCA + column norms "
              "| realised sparsity of the thresholds: raw / I / PCA | x̂ energy kept: Top-K I / PCA / top eigen-directions |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for block in ("attn", "mlp"):
            cells = [f"{100 * mean(f'{block}/{b}/{r}/{p}'):.2f} %" for r in ("topk", "thr")
                     for b in ("raw", "I", "PCA", "PCA+w")]
            cells.append(" / ".join(f"{mean(f'{block}/{b}/thr_sparsity/{p}'):.3f}" for b in ("raw", "I", "PCA")))
            cells.append(f"{mean(f'{block}/I/kept_energy/{p}'):.3f} / {mean(f'{block}/PCA/kept_energy/{p}'):.3f} / "
                         f"{sum(r['energy_top'][p] for r in records) / len(records):.3f}")
            print(f"| {block} (h{1 if block == 'attn' else 3}) | " + " | ".join(cells) + " |")
        ratio = [mean(f"{b}/PCA/topk/{p}") / mean(f"{b}/raw/thr/{p}") for b in ("attn", "mlp")]
        print(f"\nLaRoSA Top-K / TEAL threshold local error: attn {ratio[0]:.2f}, mlp {ratio[1]:.2f}\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "args": vars(args), "layers": records}, f, indent=1,
                      default=lambda o: o if not isinstance(o, float) or math.isfinite(o) else None)


if __name__ == "__main__":
    main()
