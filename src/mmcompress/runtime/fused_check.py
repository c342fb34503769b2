"""Where the fused decode step and the Python step part (LaRoSA / TEAL / joint / integer models): the module-by-module
comparison behind docs/runtime.md's "Fused step on LaRoSA and joint models" and tests/test_fused_decode.py.

Both steps start every token from the same K/V caches (the Python engine's, copied into the fused
engine's before each step), teacher-forced with the Python step's greedy tokens.  The Python step's
module inputs are captured with hooks, the fused step's with ``FusedStep.trace``; layer by layer, module
by module, the first *discontinuity* between them is reported:

* ``topk``: the two inputs keep different Top-K sets.  ``gap`` = the largest distance of a swapped
  channel's magnitude from the K-th magnitude, ``diff`` = the largest difference of the two inputs, both
  relative to the input's largest magnitude: a swap that round-off can cause has ``gap <= diff``.
* ``threshold`` (TEAL's ``SparseLinear``): the two inputs keep different channels under the projection's
  threshold ``t`` (``|x| >= t``, the kernels' rule).  ``gap`` = the largest distance of a flipped channel's
  magnitude from ``t``, ``diff`` as above: round-off can flip only channels with ``gap <= diff``.
* ``code`` (joint; deployed integer linears, ``IntLinear``): the same kept set (all of the input) but an
  activation code differs (the per-token int8 quantizer):
  ``frac`` = how far the Python step's scaled value ``v / s`` is from the rounding boundary (``k + 1/2``),
  in code steps; ``diff`` as above.

A step with no discontinuity must agree to round-off.  And whatever the step met, every module of the
Python step fed the fused step's inputs (same inputs into one layer) must give the fused step's outputs to
round-off (:func:`layer_mismatch`): that separates a wrong kernel from a discontinuity.  CLI: ``benchmarks/fused_divergence.py``.
"""

from __future__ import annotations

import torch


def _codes(m, x):
    """(kept indices, codes, v / s) of the joint module ``m`` on the input ``x`` (the kernel's arithmetic)."""
    from .fused import _sparse_keep
    from ..sparse.topk import topk_indices

    idx = topk_indices(x, _sparse_keep(m))
    v = x[idx].float()
    if m.input_smoothing is not None:
        v = v / m.input_smoothing[0].float()[idx]
    qmax = 2 ** (m.abits - 1) - 1
    r = v / (v.abs().max() / qmax).clamp(min=1e-10)
    return idx, torch.clamp(torch.round(r), -qmax, qmax), r


def _int_codes(m, x):
    """(codes, v / s) of a deployed integer linear ``m`` (``IntLinear``, ``IntMASLinear`` on its text row)
    on the input ``x``: its per-token activation quantizer, as the kernels compute it."""
    from ..quant.kernels import quantize_act

    v = x.reshape(1, -1)
    if m.input_smoothing is not None:
        v = v / m.input_smoothing[0].to(v.dtype)
    q, sx = quantize_act(v, m.scheme.abits)
    return q.reshape(-1).float(), (v.float() / sx.clamp_min(1e-30)).reshape(-1)


def first_discontinuity(py_layers, caps: dict, trace: list[dict]) -> dict | None:
    """The first module (in the step's order) whose two inputs select or quantize differently, or ``None``."""
    from .fused import _sparse_keep
    from ..quant.deployed import IntLinear
    from ..sparse.joint import SparseInt8Linear
    from ..sparse.linear import SparseLinear
    from ..sparse.topk import topk_mask

    for i, l in enumerate(py_layers):
        for name, mods in (("x1", (l.q, l.k, l.v)), ("attn", (l.o,)), ("x2", (l.mlp.gate_proj, l.mlp.up_proj)),
                           ("act", (l.down,))):
            xp, xf = caps[(i, name)].float(), trace[i][name].float()
            amax = xp.abs().max().clamp_min(1e-30)
            diff = ((xp - xf).abs().max() / amax).item()
            for m in mods:
                if isinstance(m, IntLinear) and not m.scheme.weight_only:  # per-token codes of the whole input
                    cp, rp = _int_codes(m, xp)
                    cf, _ = _int_codes(m, xf)
                    if not torch.equal(cp, cf):
                        d = cp != cf
                        frac = ((rp - rp.floor() - 0.5).abs()[d]).min().item()
                        return {"layer": i, "input": name, "module": type(m).__name__, "kind": "code",
                                "codes": int(d.sum()), "frac": frac, "diff": diff}
                    continue
                if not isinstance(m, (SparseLinear, SparseInt8Linear)):
                    continue
                if isinstance(m, SparseLinear) and m.mode == "threshold":  # the kernels' rule: !(|x| < t) in fp32
                    t = torch.tensor(m.threshold, dtype=torch.float32)
                    mp, mf = ~(xp.abs() < t), ~(xf.abs() < t)
                    if not torch.equal(mp, mf):
                        fl = (mp != mf).nonzero().flatten()
                        gap = ((xp.abs()[fl] - t).abs().max() / amax).item()
                        return {"layer": i, "input": name, "module": type(m).__name__, "kind": "threshold",
                                "flipped": len(fl), "gap": gap, "diff": diff}
                    continue
                k = _sparse_keep(m)
                mp, mf = topk_mask(xp, k), topk_mask(xf, k)
                if not torch.equal(mp, mf):
                    kth = xp.abs().sort(descending=True).values[k - 1]
                    sw = (mp != mf).nonzero().flatten()
                    gap = ((xp.abs()[sw] - kth).abs().max() / amax).item()
                    return {"layer": i, "input": name, "module": type(m).__name__, "kind": "topk",
                            "swapped": len(sw) // 2, "gap": gap, "diff": diff}
                if isinstance(m, SparseInt8Linear):
                    _, cp, rp = _codes(m, xp)
                    _, cf, _ = _codes(m, xf)
                    if not torch.equal(cp, cf):
                        d = cp != cf
                        frac = ((rp - rp.floor() - 0.5).abs()[d]).min().item()
                        return {"layer": i, "input": name, "module": type(m).__name__, "kind": "code",
                                "codes": int(d.sum()), "frac": frac, "diff": diff}
    return None


def explained(first: dict, diff_bound: float) -> bool:
    """Whether a discontinuity is one that round-off of the size ``diff_bound`` (relative to the input's
    largest magnitude) can cause: the two inputs differ by at most that, and a Top-K swap is within the
    inputs' difference of the K-th magnitude (a threshold flip: of the threshold), or an activation code
    within ``2 * qmax * diff`` code steps of its rounding boundary (v / s moves by at most about that when v
    and s both move by ``diff``)."""
    if first["diff"] > diff_bound:
        return False
    if first["kind"] in ("topk", "threshold"):
        return first["gap"] <= first["diff"]
    return first["frac"] <= 2 * 127 * first["diff"]


def layer_mismatch(py, fu, trace: list[dict], tok: int, pos: int) -> dict:
    """The same inputs into one layer: every module of the Python engine ``py`` applied to what the fused
    step fed the next module (its trace; the K/V caches of the fused engine ``fu`` after the step), against
    what the fused step computed from them.  Per quantity the largest relative difference over the layers
    (relative to the quantity's largest magnitude): ``x1`` (ln1 of the stream), ``kv`` (k after RoPE and v,
    against the cache entries the step wrote), ``attn`` (attention over the cache), ``x2`` (ln2 of the stream
    after o_proj), ``act`` (SiLU(gate) * up), ``h_mlp`` (the stream after down_proj), ``h`` (after the
    residual adapter).  Round-off-sized whatever discontinuities the step met: each module's selection and
    codes come from its input, which here is the same on both sides."""
    import torch.nn.functional as F

    dt = py.dtype
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()  # noqa: E731
    worst: dict = {}
    put = lambda k, v: worst.__setitem__(k, max(worst.get(k, 0.0), v))  # noqa: E731
    h = py.embed(torch.tensor([[tok]]))
    cos, sin = py.cos[pos:pos + 1][None, None], py.sin[pos:pos + 1][None, None]
    for i, (l, tr) in enumerate(zip(py.layers, trace)):
        f = {k: v.to(dt)[None, None] for k, v in tr.items()}
        put("x1", rel(l.ln1(h), f["x1"]))
        q, k, v = py._attn_qkv(l, f["x1"], cos, sin, 1)
        kc, vc = fu._kc[i][:, :, :pos + 1], fu._vc[i][:, :, :pos + 1]
        put("kv", max(rel(k[:, :, 0], kc[:, :, pos]), rel(v[:, :, 0], vc[:, :, pos])))
        a = F.scaled_dot_product_attention(q, kc, vc, scale=l.scaling, enable_gqa=py.gqa)
        put("attn", rel(a.transpose(1, 2).reshape(1, 1, -1), f["attn"]))
        ha = h + l.o(f["attn"])
        put("x2", rel(l.ln2(ha), f["x2"]))
        put("act", rel(l.act(l.mlp.gate_proj(f["x2"])) * l.mlp.up_proj(f["x2"]), f["act"]))
        put("h_mlp", rel(ha + l.down(f["act"]), f["h_mlp"]))
        if l.adapt is not None:
            put("h", rel(l.adapt(f["h_mlp"]), f["h"]))
        h = f["h"]
    return worst


def compare(py, fu, ids: torch.Tensor, steps: int, tok0: int = 5) -> list[dict]:
    """Per step: ``logits`` (relative difference), ``first`` (:func:`first_discontinuity`) and ``modules``
    (:func:`layer_mismatch`)."""
    caps: dict = {}
    # the Python step's single-token groups of deployed linears call the kernels, not the modules: off here
    # (bit-identical to the modules' forwards), so that the hooks see every module's input
    groups = [(l, l.qkv, l.gate_up, l.o1, l.down1) for l in py.layers]
    for l in py.layers:
        l.qkv = l.gate_up = l.o1 = l.down1 = None
    hooks = [m.register_forward_hook(lambda m, i, o, key=(n, name): caps.__setitem__(key, i[0].detach().reshape(-1)))
             for n, l in enumerate(py.layers)
             for name, m in (("x1", l.q), ("attn", l.o), ("x2", l.mlp.gate_proj), ("act", l.down))]
    out = []
    L = ids.shape[1]
    try:
        with torch.no_grad():
            for e in (py, fu):
                e._reset()
                e._forward(ids, 0)
            fu._step(torch.tensor([[tok0]]), fu.max_len - 1)  # makes the plan (touches only the last position)
            fu._fused.set_trace(True)
            t = torch.tensor([[tok0]])
            for s in range(steps):
                for a, b in zip(fu._kc + fu._vc, py._kc + py._vc):
                    a.copy_(b)
                caps.clear()
                lp, lf = py._step(t, L + s), fu._step(t, L + s)
                err = ((lp.float() - lf.float()).abs().max() / lp.float().abs().max()).item()
                tr = fu._fused.trace()
                first = first_discontinuity(py.layers, caps, tr)
                out.append({"step": s, "logits": err, "same_token": int(lp.argmax()) == int(lf.argmax()),
                            "first": first, "modules": layer_mismatch(py, fu, tr, int(t), L + s)})
                t = lp.argmax(-1, keepdim=True)
    finally:
        for l, *g in groups:
            l.qkv, l.gate_up, l.o1, l.down1 = g
        for h in hooks:
            h.remove()
        fu._fused.set_trace(False)
    return out


__all__ = ["compare", "explained", "first_discontinuity", "layer_mismatch"]
