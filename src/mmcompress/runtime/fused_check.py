"""Where the fused decode step and the Python step part (LaRoSA / joint models): the module-by-module
comparison behind docs/runtime.md's "Fused step on LaRoSA and joint models" and tests/test_fused_decode.py.

Both steps start every token from the same K/V caches (the Python engine's, copied into the fused
engine's before each step), teacher-forced with the Python step's greedy tokens.  The Python step's
module inputs are captured with hooks, the fused step's with ``FusedStep.trace``; layer by layer, module
by module, the first *discontinuity* between them is reported:

* ``topk``: the two inputs keep different Top-K sets.  ``gap`` = the largest distance of a swapped
  channel's magnitude from the K-th magnitude, ``diff`` = the largest difference of the two inputs, both
  relative to the input's largest magnitude: a swap that round-off can cause has ``gap <= diff``.
* ``code`` (joint): the same kept set but an activation code differs (the per-token int8 quantizer):
  ``frac`` = how far the Python step's scaled value ``v / s`` is from the rounding boundary (``k + 1/2``),
  in code steps; ``diff`` as above.

A step with no discontinuity must agree to round-off.  CLI: ``benchmarks/fused_divergence.py``.
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


def first_discontinuity(py_layers, caps: dict, trace: list[dict]) -> dict | None:
    """The first module (in the step's order) whose two inputs select or quantize differently, or ``None``."""
    from .fused import _sparse_keep
    from ..sparse.joint import SparseInt8Linear
    from ..sparse.topk import topk_mask

    for i, l in enumerate(py_layers):
        for name, mods in (("x1", (l.q, l.k, l.v)), ("attn", (l.o,)), ("x2", (l.mlp.gate_proj, l.mlp.up_proj)),
                           ("act", (l.down,))):
            xp, xf = caps[(i, name)].float(), trace[i][name].float()
            amax = xp.abs().max().clamp_min(1e-30)
            diff = ((xp - xf).abs().max() / amax).item()
            for m in mods:
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
    inputs' difference of the K-th magnitude, or an activation code within ``2 * qmax * diff`` code steps
    of its rounding boundary (v / s moves by at most about that when v and s both move by ``diff``)."""
    if first["diff"] > diff_bound:
        return False
    if first["kind"] == "topk":
        return first["gap"] <= first["diff"]
    return first["frac"] <= 2 * 127 * first["diff"]


def compare(py, fu, ids: torch.Tensor, steps: int, tok0: int = 5) -> list[dict]:
    """Per step: ``logits`` (relative difference) and ``first`` (:func:`first_discontinuity`)."""
    caps: dict = {}
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
                out.append({"step": s, "logits": err, "same_token": int(lp.argmax()) == int(lf.argmax()),
                            "first": first_discontinuity(py.layers, caps, fu._fused.trace())})
                t = lp.argmax(-1, keepdim=True)
    finally:
        for h in hooks:
            h.remove()
        fu._fused.set_trace(False)
    return out


__all__ = ["compare", "explained", "first_discontinuity"]
