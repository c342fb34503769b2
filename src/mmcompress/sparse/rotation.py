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


class MomentCollector(Method):
    """Engine method that only observes: accumulates ``H_l`` of the normalised layer inputs.

    The hooks installed in ``step`` stay active while the engine computes the next layer's inputs
    (so each layer runs once per sample), and are removed at the next step.
    """

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
        self._handles: list = []
        self._current: dict | None = None
        self._world = None

    def config(self) -> dict:
        return {"method": self.name, "mode": self.mode, "basis": self.basis}

    def _flush(self):
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._current is not None:
            cur, self._current = self._current, None
            self.moments.append(self._world.sum(cur["H"]).cpu())
            self.tokens = self._world.sum(cur["n"])

    def step(self, ctx) -> None:
        self._flush()
        groups = {g.name: g for g in ctx.adapter.groups}
        layer = ctx.layer
        d = ctx.adapter.text_config.hidden_size
        cur = {"H": torch.zeros(d, d, dtype=torch.float64, device=ctx.device), "n": 0}
        self._current, self._world = cur, ctx.world
        names = ["attn_in"] + (["mlp_in"] if self.basis == "both" else [])
        for gname in names:
            g = groups[gname]
            norm = layer.get_submodule(g.producer)
            if self.mode == "merged":  # γ-free RMS(r) of the norm's input r
                eps = _norm_eps(norm)

                def hook(mod, args, eps=eps, count=(gname == "attn_in")):
                    x = args[0].reshape(-1, args[0].shape[-1]).double()
                    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                    cur["H"].addmm_(x.T, x)
                    if count:
                        cur["n"] += x.shape[0]

                self._handles.append(norm.register_forward_pre_hook(hook))
            else:  # γ ⊙ RMS(r): the norm's output, as the readers see it

                def hook(mod, args, out, count=(gname == "attn_in")):
                    x = out.reshape(-1, out.shape[-1]).double()
                    cur["H"].addmm_(x.T, x)
                    if count:
                        cur["n"] += x.shape[0]

                self._handles.append(norm.register_forward_hook(hook))

    def finalize(self, model, adapter) -> None:
        self._flush()


@torch.no_grad()
def calibrate_rotations(model, adapter, samples, *, mode: str = "merged", basis: str = "attn", damping: float = 0.01,
                        device="cpu", progress: bool = True) -> Rotations:
    """Streamed PCA of every decoder layer's normalised input (see module docstring)."""
    collector = MomentCollector(mode, basis)
    try:
        run_layerwise(model, adapter, collector, samples, device=device, progress=progress)
    finally:
        collector._flush()
    mats, evals = [], []
    for h in collector.moments:
        q, e = rotation_from_moment(h, damping)
        mats.append(q)
        evals.append(e)
    return Rotations(mode, mats, evals, tokens=collector.tokens, basis=basis)
