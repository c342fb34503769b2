"""AWQ (Lin et al., MLSys 2024): activation-aware per-channel scale search and weight clipping.

For each group of linears reading the same input ``X`` (q/k/v, o, gate/up, down), search the
exponent α on a grid and keep the scales that minimise the error of the **block the group feeds**
(the reference's ``module2inspect``: the attention module for q/k/v, the MLP for gate/up, the linear
itself for o and down), with only the group's readers quantized and everything else in the block
in full precision::

    s = mean_t(|X_t|)^α / sqrt(max · min),   α ∈ {0, 1/n, ..., 1}
    α* = argmin_α Σ_t || B(X_t) − B_{s,α}(X_t) ||²,   B_{s,α}: the readers compute Q_a(X / s) · Q_w(W ⊙ s)ᵀ

``loss="linear"`` (MBQ's default here) measures the readers' outputs instead,
``Σ_readers || X Wᵀ − Q_a(X / s) · Q_w(W ⊙ s)ᵀ ||²`` on a token subsample.  The identity ``s = 1``
(plain RTN of the group) is always a candidate, so the search can never be worse than RTN on its own
objective, whatever the scale family.  The block loss is measured on every calibration sample (the
attention needs whole sequences); ``max_tokens`` bounds the token subsample of the statistics, the
linear loss and the clipping search.

Then ``1/s`` is folded into the producer (norm or linear) and ``s`` into the readers.  Groups whose
division cannot be folded (o under grouped-query attention) are left unscaled, as in AWQ.

**Weight clipping** (``clip=True``, AWQ's default; the reference's ``auto_clip``): for every linear
except those feeding the q·k product (q, k, fused qkv: the reference skips them), per output channel
and quantization group, the range is shrunk to ``max|W| · (1 − i/grid)``, ``i < grid/2``, and the
shrink with the least error of that group's share of the output ``X_g W_gᵀ`` on (up to 512) calibration
tokens is kept; the weight is clamped there before it is quantized.  Ours on top: per output channel the
clipping is kept only if the whole row's output error does not grow (the per-group errors ignore the
cancellation between groups), so clipping never increases a linear's output error on those tokens.

All statistics and inputs come from the full-precision model (the engine's uncompressed chain), as in
the reference (its next-layer inputs are the full-precision layer's outputs) and as every method here.
AWQ is a weight-only method (W4A16 group-128 asymmetric in the paper); with ``abits < 16`` the
activation quantizer is included in the search losses.

:class:`ScaleSearch` is the shared machinery; MBQ (:mod:`.mbq`) changes the scale family and the
per-token weights of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import options as opt
from ...engine import LayerContext, _to
from ...models.adapters import feeds_qk
from ...models.modality import current_modality_ids, method_modalities, modality_context
from ..linear import QuantLinear
from ..quantizer import QuantScheme, _grouped, fake_quantize_activation, fake_quantize_weight
from .base import (QuantMethod, apply_smoothing, quantize_layer_linears, smoothing_foldable,
                   weight_column_absmax)

ALL_GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
BLOCK_ROLES = ("attn_in", "mlp_in")  # the groups whose loss is measured on the module they feed
CLIP_TOKENS = 512  # the reference's n_sample_token


@dataclass(frozen=True)
class ScaleSearchOptions(opt.Options):
    """The scale search's options; AWQ and MBQ differ in the defaults of ``loss`` and ``clip``."""

    grid: int = opt.option(20, opt.integer(1), "scale search: grid points of the exponent α in [0, 1]")
    max_tokens: int = opt.option(4096, opt.integer(1), "scale search: token subsample of the statistics, the "
                                                       "linear loss and the clipping search")
    seed: int = opt.option(0, opt.integer(), "seed of the token subsample", cli=False)  # --seed: calibration's
    loss: str = opt.option("linear", opt.choice("block", "linear"),
                           "scale search scored on the output of the block the group feeds or of its linears",
                           flag="--search-loss")
    clip: bool = opt.option(False, opt.boolean, "weight-clipping search")


class ScaleSearch(QuantMethod):
    """Grid search of one shared smoothing vector per group (AWQ / MBQ), then optional weight clipping."""

    groups = ALL_GROUPS
    distributed = True
    needs_fp_chain = True  # statistics and losses on the full-precision model's activations
    Options = ScaleSearchOptions

    # subclasses choose the scale family and the per-token loss weights
    def candidate(self, x_abs_mean, x_absmax, w_absmax, alpha: float) -> torch.Tensor:
        s = x_abs_mean.clamp(min=1e-5).pow(alpha)
        return (s / (s.max() * s.min()).sqrt()).clamp(min=1e-5)

    def token_weights(self, ids: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(self, ctx: LayerContext) -> None:
        layer, adapter = ctx.layer, ctx.adapter
        searched = [g for g in adapter.groups if g.role in self.groups and smoothing_foldable(layer, g, None)]
        clipped = [g for g in adapter.groups if self.clip and _clip_readers(layer, g)]
        gathered = list({g.name: g for g in searched + clipped}.values())
        blocks = {g.name: _block_path(g) for g in searched if self.loss == "block" and g.role in BLOCK_ROLES}
        inputs, calls = self._gather(ctx, gathered, blocks)
        chosen, scales = {}, {}
        for g in searched:  # every search on the full-precision layer, as the reference
            x, ids = inputs[g.name]
            if x.shape[0] == 0:  # an MoE expert no calibration token was routed to: left unscaled
                chosen[g.name] = "no tokens"
                continue
            if g.name in blocks:
                alpha, s = self._search_block(ctx, g, blocks[g.name], calls[g.name], x)
            else:
                alpha, s = self._search(x, ids, g.modules(layer))
            chosen[g.name], scales[g.name] = alpha, s
        quantize_layer_linears(layer, adapter, self.scheme, pack=False)
        for g in searched:
            if g.name in scales:
                apply_smoothing(layer, adapter, g, scales[g.name])
        info = {"alpha": chosen}
        if self.clip:
            info["clipped_rows"] = self._clip(ctx, clipped, inputs, scales)
        for path in adapter.linear_names():
            layer.get_submodule(path).pack()
        ctx.info[self.name] = info

    @torch.no_grad()
    def _gather(self, ctx: LayerContext, groups, blocks: dict | None = None) -> tuple[dict, dict]:
        """A seeded subsample (``max_tokens``, the same on every rank) of each group's input with its
        modality ids; and, for the groups in ``blocks`` (name -> module path), every call of that module
        on this rank's samples: ``(args, kwargs, modality ids, output)`` on the CPU."""
        rng = torch.Generator().manual_seed(self.seed + ctx.index)
        store: dict[str, list] = {g.name: [] for g in groups}
        calls: dict[str, list] = {name: [] for name in (blocks or {})}

        def record(name, x, ids):
            store[name].append((x.detach().reshape(-1, x.shape[-1]).float().cpu(), ids.reshape(-1).cpu()))

        def call_recorder(name):
            def hook(mod, args, kwargs, out):
                out = out[0] if isinstance(out, tuple) else out
                ids = current_modality_ids()
                calls[name].append((_to(args, "cpu"), _to(kwargs, "cpu"), None if ids is None else ids.cpu(),
                                    out.detach().cpu()))
            return hook

        handles = [ctx.layer.get_submodule(path).register_forward_hook(call_recorder(name), with_kwargs=True)
                   for name, path in (blocks or {}).items()]
        try:
            ctx.collect({g.name: g.input_module(ctx.layer) for g in groups}, record, inputs=ctx.fp_inputs)
        finally:
            for h in handles:
                h.remove()
        out = {}
        world = ctx.world
        for g in groups:  # the same order on every rank
            parts = store[g.name] or [(torch.zeros(0, g.modules(ctx.layer)[0].in_features), torch.zeros(0))]
            x = torch.cat([p[0] for p in parts])
            ids = torch.cat([p[1] for p in parts]).long()
            ids = method_modalities(ids)
            counts = world.gather_ints(x.shape[0])  # tokens of each rank's block, in sample order
            total, offset = sum(counts), sum(counts[: world.rank])
            idx = torch.randperm(total, generator=rng)[: self.max_tokens] if total > self.max_tokens else torch.arange(total)
            mine = ((idx >= offset) & (idx < offset + x.shape[0])).nonzero().reshape(-1)
            local = idx[mine] - offset
            out[g.name] = (world.gather_rows(x[local], mine, len(idx)), world.gather_rows(ids[local], mine, len(idx)))
        return out, calls

    def _candidates(self, x, readers):
        """``(α, s)`` pairs: the identity first (α ``None``), then the grid."""
        x_mean = x.abs().mean(0).double()
        x_max = x.abs().amax(0).double()
        w_max = weight_column_absmax(readers).cpu()
        dev = readers[0].weight.device
        ones = torch.ones_like(x_mean, device=dev)
        return [(None, ones)] + [(i / self.grid, self.candidate(x_mean.cpu(), x_max.cpu(), w_max, i / self.grid).to(dev))
                                 for i in range(self.grid + 1)]

    @torch.no_grad()
    def _search(self, x, ids, readers):
        """The linear loss: the readers' outputs on the token subsample."""
        dev = readers[0].weight.device
        candidates = self._candidates(x, readers)
        x = x.to(dev)
        weights = [r.weight.detach().float() for r in readers]
        biasless_ref = [x @ w.T for w in weights]
        tw = self.token_weights(ids)
        tw = None if tw is None else tw.to(dev)[:, None]
        sc = self.scheme
        best = (float("inf"), None, candidates[0][1])
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

    @torch.no_grad()
    def _search_block(self, ctx: LayerContext, group, block_path: str, calls, x):
        """The block loss: the output of the module at ``block_path`` (all calibration samples of every
        rank), with the group's readers quantized under each candidate and the rest of the block as it is."""
        layer = ctx.layer
        best = (float("inf"), None, None)
        for alpha, s in self._candidates(x, group.modules(layer)):
            err = ctx.world.sum(self.block_error(layer, block_path, group.readers, calls, s, ctx.device))
            if err < best[0]:
                best = (err, alpha, s)
        return best[1], best[2].double()

    @torch.no_grad()
    def block_error(self, layer, block_path: str, readers: list[str], calls, s: torch.Tensor, device) -> float:
        """``Σ_t w_t ||B(x_t) − B_s(x_t)||²`` over the recorded ``calls`` of the block: ``B_s`` has the
        readers replaced by quantized linears computing ``Q_a(x / s) Q_w(W ⊙ s)ᵀ + b`` (the block's
        other modules untouched).  ``w_t``: :meth:`token_weights` (1 for AWQ)."""
        block = layer.get_submodule(block_path)
        originals = [layer.get_submodule(p) for p in readers]
        s = s.double()
        try:
            for path, lin in zip(readers, originals):
                q = QuantLinear.from_linear(lin, self.scheme, smoothing_rows=1)
                q.weight.data.copy_((lin.weight.data.double() * s.to(lin.weight.device)[None, :]).to(lin.weight.dtype))
                q.input_smoothing.copy_(s.to(q.input_smoothing)[None, :])
                layer.set_submodule(path, q)
            err = 0.0
            for args, kwargs, ids, ref in calls:
                ids_dev = None if ids is None else ids.to(device)
                with modality_context(ids_dev):
                    out = block(*_to(args, device), **_to(kwargs, device))
                out = out[0] if isinstance(out, tuple) else out
                d = (out.float() - ref.to(device).float()).pow(2).sum(-1).reshape(-1)
                tw = None
                if ids is not None:
                    ids = ids.reshape(-1).long()
                    tw = self.token_weights(method_modalities(ids))
                err += float((d * tw.to(d.device)).sum() if tw is not None and tw.shape == d.shape else d.sum())
        finally:
            for path, lin in zip(readers, originals):
                layer.set_submodule(path, lin)
        return err

    @torch.no_grad()
    def _clip(self, ctx: LayerContext, groups, inputs, scales) -> dict:
        """AWQ's clipping search on each clippable reader (its input as it now reads it: ``x / s``)."""
        done = {}
        for g in groups:
            x, ids = inputs[g.name]
            if x.shape[0] == 0:
                continue
            stride = max(1, x.shape[0] // CLIP_TOKENS)  # the reference's strided token sample
            x, ids = x[::stride][:CLIP_TOKENS], ids[::stride][:CLIP_TOKENS]
            s = scales.get(g.name)
            x = x if s is None else x / s.to(x)
            tw = self.token_weights(ids)
            for path in _clip_readers(ctx.layer, g):
                mod = ctx.layer.get_submodule(path)
                w = mod.weight.data
                bound = clip_bounds(w.float(), x.to(w.device), self.scheme, grid=self.grid,
                                    token_weights=None if tw is None else tw.to(w.device))
                mod.weight.data.copy_(apply_clip(w.float(), bound, self.scheme.group_size).to(w.dtype))
                done[path] = int(torch.isfinite(bound).any(-1).sum())  # output channels clipped
        return done


def _block_path(group) -> str:
    """The module a group's readers feed (the reference's ``module2inspect``): their common parent."""
    parts = [r.split(".")[:-1] for r in group.readers]
    common = []
    for level in zip(*parts):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    return ".".join(common)


def _clip_readers(layer, group) -> list[str]:
    if group.role == "attn_in" and any(feeds_qk(p) for p in group.readers):  # AWQ does not clip q, k
        keep = [p for p in group.readers if not feeds_qk(p)]
    else:
        keep = list(group.readers)
    return [p for p in keep if getattr(layer.get_submodule(p), "input_sparsifier", None) is None
            and not hasattr(layer.get_submodule(p), "sparsify")]


@torch.no_grad()
def clip_bounds(w: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, grid: int = 20, max_shrink: float = 0.5,
                token_weights: torch.Tensor | None = None, rows: int = 64) -> torch.Tensor:
    """AWQ's clipping search for one linear ``w [out, in]`` read by ``x [tokens, in]``: per output channel
    and quantization group the bound ``max|W_g| · (1 − i/grid)``, ``i < max_shrink · grid``, with the least
    (token-weighted) error of the group's share of the output, ``Σ_t (Q_a(x)_g · Q_w(clip W)_g − x_g · W_g)²``.
    A row keeps its bounds only if its full output error does not grow; elsewhere (and for rows left as
    they were) the bound is ``inf``.  Returns ``[out, n_groups]``."""
    sc = scheme
    in_f = w.shape[1]
    xq = fake_quantize_activation(x, sc.abits)
    xg, _ = _grouped(x, sc.group_size)  # [T, G, g]
    xqg, _ = _grouped(xq, sc.group_size)
    tw = torch.ones(x.shape[0], device=x.device) if token_weights is None else token_weights.float()
    out = torch.full((w.shape[0], xg.shape[1]), float("inf"), device=w.device)

    def quantized(wg):  # [R, G, g] -> fake-quantized, same shape
        r = wg.shape[0]
        return _grouped(fake_quantize_weight(wg.reshape(r, -1)[:, :in_f], sc.wbits, sc.group_size, sc.sym),
                        sc.group_size)[0]

    for r0 in range(0, w.shape[0], rows):
        wg, _ = _grouped(w[r0:r0 + rows], sc.group_size)
        ref = torch.einsum("tgk,rgk->rgt", xg, wg)
        org_max = wg.abs().amax(-1)  # [R, G]
        best_err = torch.full_like(org_max, float("inf"))
        best_max = org_max.clone()
        for i in range(int(max_shrink * grid)):
            m = (org_max * (1 - i / grid))[..., None]
            cur = torch.einsum("tgk,rgk->rgt", xqg, quantized(torch.maximum(torch.minimum(wg, m), -m)))
            err = ((cur - ref).pow(2) * tw).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better, m[..., 0], best_max)
        full_ref = ref.sum(1)  # [R, T]
        row_err = lambda q: ((torch.einsum("tgk,rgk->rt", xqg, q) - full_ref).pow(2) * tw).sum(-1)
        keep = row_err(quantized(torch.maximum(torch.minimum(wg, best_max[..., None]), -best_max[..., None]))) \
            <= row_err(quantized(wg))
        clipped = keep[:, None] & (best_max < org_max)
        out[r0:r0 + rows] = torch.where(clipped, best_max, torch.full_like(best_max, float("inf")))
    return out


def apply_clip(w: torch.Tensor, bound: torch.Tensor, group_size: int) -> torch.Tensor:
    """``clamp(W_g, −b_g, b_g)`` per output channel and quantization group (``inf``: unclipped)."""
    wg, _ = _grouped(w, group_size)
    b = bound[..., None].to(wg)
    return torch.maximum(torch.minimum(wg, b), -b).reshape(w.shape[0], -1)[:, : w.shape[1]]


@dataclass(frozen=True)
class AWQOptions(ScaleSearchOptions):
    loss: str = opt.override(ScaleSearchOptions, "loss", default="block")  # the reference's module2inspect
    clip: bool = opt.override(ScaleSearchOptions, "clip", default=True)  # the reference's auto_clip


class AWQ(ScaleSearch):
    name = "awq"
    Options = AWQOptions
