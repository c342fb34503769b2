"""AWQ (Lin et al., MLSys 2024): activation-aware per-channel scale search.

For each group of linears reading the same input ``X`` (q/k/v, o, gate/up, down), search the
exponent α on a grid and keep the scales that minimise the group's output error::

    s = mean_t(|X_t|)^α / sqrt(max · min),   α ∈ {0, 1/n, ..., 1}
    α* = argmin_α Σ_readers || X Wᵀ − Q_a(X / s) · Q_w(W ⊙ s)ᵀ ||²

The identity ``s = 1`` (plain RTN of the group) is always a candidate, so the search can never be
worse than RTN on its own objective, whatever the scale family.

then fold ``1/s`` into the producer (norm or linear) and ``s`` into the readers, and quantize.
Groups whose division cannot be folded (o under grouped-query attention) are left unscaled, as in
AWQ.  AWQ is a weight-only method (W4A16 group-128 asymmetric in the paper); with ``abits < 16``
the activation quantizer is included in the search loss.  Weight clipping search is not done.

:class:`ScaleSearch` is the shared machinery; MBQ (:mod:`.mbq`) changes the scale family and the
per-token weights of the loss.
"""

from __future__ import annotations

import torch

from ... import options as opt
from ...engine import LayerContext
from ...models.modality import TEXT, VIDEO
from ..quantizer import QuantScheme, fake_quantize_activation, fake_quantize_weight
from .base import QuantMethod, apply_smoothing, quantize_layer_linears, smoothing_foldable, weight_column_absmax

ALL_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


class ScaleSearch(QuantMethod):
    """Grid search of one shared smoothing vector per group (AWQ / MBQ)."""

    groups = ALL_GROUPS
    distributed = True
    OPTIONS = {"grid": opt.integer(1), "max_tokens": opt.integer(1), "seed": opt.integer()}

    def __init__(self, scheme: QuantScheme, grid: int = 20, max_tokens: int = 4096, seed: int = 0):
        super().__init__(scheme)
        self.grid, self.max_tokens, self.seed = int(grid), int(max_tokens), seed

    def config(self) -> dict:
        return {**super().config(), "grid": self.grid, "max_tokens": self.max_tokens}

    # subclasses choose the scale family and the per-token loss weights
    def candidate(self, x_abs_mean, x_absmax, w_absmax, alpha: float) -> torch.Tensor:
        s = x_abs_mean.clamp(min=1e-5).pow(alpha)
        return (s / (s.max() * s.min()).sqrt()).clamp(min=1e-5)

    def token_weights(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, ctx: LayerContext) -> None:
        layer, adapter = ctx.layer, ctx.adapter
        groups = [g for g in adapter.groups if g.role in self.groups and smoothing_foldable(layer, g, None)]
        inputs = self._gather(ctx, groups)
        quantize_layer_linears(layer, adapter, self.scheme, pack=False)
        chosen = {}
        for g in groups:  # groups in data-flow order; the search of a group uses its own inputs
            x, ids = inputs[g.name]
            if x.shape[0] == 0:  # an MoE expert no calibration token was routed to: left unscaled
                chosen[g.name] = "no tokens"
                continue
            readers = g.modules(layer)
            alpha, s = self._search(x, ids, readers)
            apply_smoothing(layer, adapter, g, s)
            chosen[g.name] = alpha
        for path in adapter.linear_names():
            layer.get_submodule(path).pack()
        ctx.info[self.name] = {"alpha": chosen}

    @torch.no_grad()
    def _gather(self, ctx: LayerContext, groups) -> dict:
        rng = torch.Generator().manual_seed(self.seed + ctx.index)
        store: dict[str, list] = {g.name: [] for g in groups}

        def record(name, x, ids):
            store[name].append((x.detach().reshape(-1, x.shape[-1]).float().cpu(), ids.reshape(-1).cpu()))

        ctx.collect({g.name: g.input_module(ctx.layer) for g in groups}, record)
        out = {}
        world = ctx.world
        for g in groups:  # the same order on every rank
            parts = store[g.name] or [(torch.zeros(0, g.modules(ctx.layer)[0].in_features), torch.zeros(0))]
            x = torch.cat([p[0] for p in parts])
            ids = torch.cat([p[1] for p in parts]).long()
            ids = torch.where(ids == VIDEO, torch.full_like(ids, TEXT), ids)
            counts = world.gather_ints(x.shape[0])  # tokens of each rank's block, in sample order
            total, offset = sum(counts), sum(counts[: world.rank])
            idx = torch.randperm(total, generator=rng)[: self.max_tokens] if total > self.max_tokens else torch.arange(total)
            mine = ((idx >= offset) & (idx < offset + x.shape[0])).nonzero().reshape(-1)
            local = idx[mine] - offset
            out[g.name] = (world.gather_rows(x[local], mine, len(idx)), world.gather_rows(ids[local], mine, len(idx)))
        return out

    @torch.no_grad()
    def _search(self, x, ids, readers):
        dev = readers[0].weight.device
        x = x.to(dev)
        weights = [r.weight.detach().float() for r in readers]
        biasless_ref = [x @ w.T for w in weights]
        tw = self.token_weights(ids)
        tw = None if tw is None else tw.to(dev)[:, None]
        x_mean = x.abs().mean(0).double()
        x_max = x.abs().amax(0).double()
        w_max = weight_column_absmax(readers).to(x_mean.device)
        sc = self.scheme
        ones = torch.ones_like(x_mean, device=dev)
        candidates = [(None, ones)] + [
            (i / self.grid, self.candidate(x_mean.cpu(), x_max.cpu(), w_max.cpu(), i / self.grid).to(dev))
            for i in range(self.grid + 1)]
        best = (float("inf"), None, ones)
        for alpha, s in candidates:  # alpha None: the identity, s = 1
            xs = fake_quantize_activation(x / s.float(), sc.abits)
            err = 0.0
            for w, ref in zip(weights, biasless_ref):
                wq = fake_quantize_weight(w * s.float(), sc.wbits, sc.group_size, sc.sym)
                d = (xs @ wq.T - ref).pow(2)
                err += float((d * tw).sum() if tw is not None else d.sum())
            if err < best[0]:
                best = (err, alpha, s)
        return best[1], best[2].double()


class AWQ(ScaleSearch):
    name = "awq"
