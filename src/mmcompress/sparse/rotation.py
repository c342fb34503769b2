"""LaRoSA rotation calibration: one orthogonal PCA basis ``Q_l`` per decoder layer.

For every decoder layer the uncentred second moment of its normalised input is accumulated in
float64, streaming over calibration tokens one layer at a time through the *dense* model chain
(the layer-by-layer engine: peak memory is one layer plus the cached activations)::

    H_l = Σ_tokens xᵀx,          x = RMS(r)        (mode "merged", M: γ-free, paper Figure 2)
                                 x = γ ⊙ RMS(r)    (mode "reference", R: the published code)

    Q_l = eigenvectors of H_l + 0.01·mean(diag H_l)·I, columns sorted by descending eigenvalue,
          each column's largest-magnitude entry made positive (a deterministic sign).

``basis="attn"`` (default, as the reference) fits Q_l to the attention input only; ``"both"`` adds
the MLP input's second moment (a choice the paper leaves open).  Q_l is used for both blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engine import Method, run_layerwise

MODES = ("merged", "reference")


@dataclass
class Rotations:
    """Per-layer PCA bases ``matrices[l]`` (float64, columns = eigenvectors, descending)."""

    mode: str
    matrices: list[torch.Tensor]
    eigenvalues: list[torch.Tensor]
    tokens: int = 0
    basis: str = "attn"
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.matrices)


def _norm_eps(norm) -> float:
    for attr in ("variance_epsilon", "eps"):
        if hasattr(norm, attr):
            return float(getattr(norm, attr))
    raise TypeError(f"{type(norm).__name__} is not an RMSNorm (no eps)")


def rotation_from_moment(moment: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, eigenvalues)`` of a second-moment matrix: damped, float64, eigenvalues descending."""
    h = moment.double()
    h = 0.5 * (h + h.T)
    shift = damping * h.diagonal().mean()
    h = h + shift * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    evals, evecs = torch.linalg.eigh(h)
    order = torch.argsort(evals, descending=True)
    evals, q = evals[order] - shift, evecs[:, order]
    rows = q.abs().argmax(0)
    signs = torch.sign(q[rows, torch.arange(q.shape[1])])
    signs[signs == 0] = 1
    return q * signs, evals


def norm_moment_observer(norm, mode: str, cur: dict, key: str, count: bool = True):
    """An observer ``(module, where, fn)`` adding ``xᵀx`` to ``cur[key]`` (float64) for the normalised input
    of ``norm``: ``x = RMS(r)`` of its input ``r`` (mode "merged", γ-free) or its output ``γ ⊙ RMS(r)``
    (mode "reference"); ``count``: add the token count to ``cur["n"]``."""
    eps = _norm_eps(norm) if mode == "merged" else None

    def observe(t):
        x = t.reshape(-1, t.shape[-1]).double()
        if eps is not None:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        cur[key].addmm_(x.T, x)
        if count:
            cur["n"] += x.shape[0]

    return norm, "input" if eps is not None else "output", observe


class MomentCollector(Method):
    """Engine method that only observes: accumulates ``H_l`` of the normalised layer inputs through the
    layer context's observers (:meth:`Method.observers`), one pass per layer."""

    name = "larosa-rotation"
    distributed = True  # H_l and the token count are summed over the ranks when a layer is done

    def __init__(self, mode: str = "merged", basis: str = "attn"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if basis not in ("attn", "both"):
            raise ValueError(f"basis must be 'attn' or 'both', got {basis!r}")
        self.mode, self.basis = mode, basis
        self.moments: list[torch.Tensor] = []
        self.tokens = 0
        self._current: dict | None = None

    def config(self) -> dict:
        return {"method": self.name, "mode": self.mode, "basis": self.basis}

    def step(self, ctx) -> None:
        pass  # the layer is not changed: everything happens in the observers

    def observers(self, ctx):
        groups = {g.name: g for g in ctx.adapter.groups}
        d = ctx.adapter.text_config.hidden_size
        cur = self._current = {"H": torch.zeros(d, d, dtype=torch.float64, device=ctx.device), "n": 0}
        return [norm_moment_observer(ctx.layer.get_submodule(groups[gname].producer), self.mode, cur, "H",
                                     count=gname == "attn_in")
                for gname in ["attn_in"] + (["mlp_in"] if self.basis == "both" else [])]

    def observed(self, ctx) -> None:
        cur, self._current = self._current, None
        self.moments.append(ctx.world.sum(cur["H"]).cpu())
        self.tokens = ctx.world.sum(cur["n"])


@torch.no_grad()
def calibrate_rotations(model, adapter, samples, *, mode: str = "merged", basis: str = "attn", damping: float = 0.01,
                        device="cpu", progress: bool = True) -> Rotations:
    """Streamed PCA of every decoder layer's normalised input (see module docstring)."""
    collector = MomentCollector(mode, basis)
    run_layerwise(model, adapter, collector, samples, device=device, progress=progress)
    mats, evals = [], []
    for h in collector.moments:
        q, e = rotation_from_moment(h, damping)
        mats.append(q)
        evals.append(e)
    return Rotations(mode, mats, evals, tokens=collector.tokens, basis=basis)
