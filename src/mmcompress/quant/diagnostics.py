"""Per-modality diagnostics of a quantization run, layer by layer and linear by linear.

For every decoder layer ℓ, every quantized linear and every modality m present in the calibration
data (text / image / audio; video counts as text):

* activation statistics of the linear's input over the tokens of m: the largest absolute value,
  the median over channels of the per-channel absmax, and their ratio (an outlier measure);
* SQNR of the quantized linear's output against the original linear on the same input::

      SQNR_m = 10 · log10( Σ_{t∈m} ||y_t||² / Σ_{t∈m} ||y_t − ŷ_t||² )   [dB]

* SQNR of the decoder layer's output, locally (original vs compressed layer on the same input) and
  accumulated (the compressed chain against the original model's chain);
* the same accumulated SQNR per token, summarised by its median over the tokens of m::

      SQNR_m^tok = median_{t∈m} 10 · log10( ||y_t||² / ||y_t − ŷ_t||² )   [dB]

  The pooled SQNR above is an energy ratio, so in a model with an attention-sink token (one token whose
  residual stream is 100× larger than the others) it measures that one token; the token median is not
  moved by it;
* for modality-aware smoothing, the divergence of each modality's smoothing vector from text's
  (mean |log s_m − log s_T|).

**Which data.**  Given held-out samples (``Diagnostics(samples=...)``, ``quantize(report_calib=...)``,
``mmcompress quantize --report-calib``), every figure above is measured on them: the engine carries them
through the layers as the ``"heldout"`` side set, in both chains, and nothing is trained on them.  Without
them the figures are in-sample (the calibration samples the method was fitted to), and the report says so
(``"sqnr_data"``).

The engine calls :meth:`Diagnostics.layer` after a method's step with a copy of the original layer.
:func:`write_report` writes ``diagnostics-<method>-<scheme>.json`` into a directory and redraws the
comparison plot of per-layer SQNR by modality for every run found there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..fileio import atomic_write, atomic_write_text
from ..models.modality import MODALITY_NAMES, TEXT, ids_of_tokens, method_modalities
from .quantizer import absmax


def _sqnr(signal: float, noise: float) -> float | None:
    if signal <= 0:
        return None
    if noise <= 0:
        return float("inf")
    return 10.0 * math.log10(signal / noise)


class _Groups:
    """The tokens of each modality in flat ids ``[T]`` (one ``bincount``, one host sync): ``present``
    (the ids with tokens, ascending), ``n`` (one more than the largest id) and ``index[m]`` (the token
    positions of ``m``; ``None`` when one modality has every token)."""

    __slots__ = ("ids", "present", "n", "index")

    def __init__(self, ids: torch.Tensor):
        self.ids = ids
        counts = torch.bincount(ids).tolist() if ids.numel() else []
        self.present = [m for m, c in enumerate(counts) if c]
        self.n = len(counts)
        self.index = None if len(self.present) < 2 else {m: (ids == m).nonzero().squeeze(1) for m in self.present}

    def rows(self, t: torch.Tensor, m: int) -> torch.Tensor:
        """The rows of ``t`` ``[T, ...]`` that belong to modality ``m``."""
        return t if self.index is None else t.index_select(0, self.index[m])


def _energies(ref: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``||ref_t||²`` and ``||out_t − ref_t||²`` (float64 ``[T]``).  Each token's sum is taken in
    the inputs' precision (float32 for 16-bit inputs; float64 inputs stay float64), only the ``[T]``
    results in float64: the accumulation over tokens and the SQNR's ratio are the float64 part, so the
    figures differ from an all-float64 computation by float32 round-off of one token's sum."""
    ref = ref.detach().reshape(-1, ref.shape[-1])
    out = out.detach().reshape(-1, out.shape[-1])
    if ref.dtype != torch.float64:
        ref, out = ref.float(), out.float()  # no copy for float32
    else:
        out = out.double()
    d = out - ref
    return torch.linalg.vecdot(ref, ref).double(), torch.linalg.vecdot(d, d).double()


class _Acc:
    def __init__(self, per_token: bool = False):
        self.signal: dict[int, float] = {}
        self.noise: dict[int, float] = {}
        self.per_token = per_token
        self.token_db: dict[int, list[torch.Tensor]] = {}

    def add(self, ref: torch.Tensor, out: torch.Tensor, ids: torch.Tensor, groups: _Groups | None = None):
        """Add the tokens of ``out`` against ``ref`` (``[..., d]``, modality ids ``ids`` ``[T]``; ``groups``:
        ``_Groups(ids)`` when the caller already has it)."""
        g = groups if groups is not None else _Groups(ids)
        sig, err = _energies(ref, out)
        sums = torch.zeros(g.n, 2, dtype=torch.float64, device=sig.device)
        sums.index_add_(0, g.ids.to(sig.device), torch.stack([sig, err], 1))
        sums = sums.tolist()  # one host sync for every modality
        for m in g.present:
            self.signal[m] = self.signal.get(m, 0.0) + sums[m][0]
            self.noise[m] = self.noise.get(m, 0.0) + sums[m][1]
        if self.per_token:
            db = 10.0 * torch.log10(sig.clamp(min=1e-30) / err.clamp(min=1e-30))
            for m in g.present:
                self.token_db.setdefault(m, []).append(g.rows(db, m).float().cpu())

    def result(self) -> dict:
        return {MODALITY_NAMES[m]: _sqnr(self.signal[m], self.noise[m]) for m in sorted(self.signal)}

    def token_median(self) -> dict:
        return {MODALITY_NAMES[m]: float(torch.cat(v).median()) for m, v in sorted(self.token_db.items())}


def _flat_ids(ids: torch.Tensor) -> torch.Tensor:
    ids = ids.reshape(-1).long()
    return method_modalities(ids)


class _InputStats:
    """What the diagnostics take from a linear's input, computed once per input tensor: q/k/v (and
    gate/up) read the same one.  ``groups`` of its tokens' ids and per modality the per-channel absmax."""

    def __init__(self):
        self.clear()

    def of(self, x: torch.Tensor, src_ids: torch.Tensor) -> tuple[_Groups, dict[int, torch.Tensor]]:
        """``(groups, {modality: per-channel max |x| over its tokens})`` of input ``x`` whose tokens have
        the (unflattened) ids ``src_ids``."""
        if x is not self.x or src_ids is not self.src or x._version != self.version:
            g = _Groups(_flat_ids(src_ids).to(x.device))
            x2 = x.detach().reshape(-1, x.shape[-1])
            amax = {}
            for m in g.present:
                amax[m] = absmax(g.rows(x2, m), 0).abs_()  # abs_: +0.0 where a channel is all zeros
            # holding x and the ids keeps the identity check sound (no other tensor can take their ids)
            self.x, self.src, self.version, self.value = x, src_ids, x._version, (g, amax)
        return self.value

    def clear(self):
        self.x = self.src = self.version = self.value = None


class Diagnostics:
    """Collects the per-layer records of one run."""

    def __init__(self, samples=None, source: str | None = None):
        self.layers: list[dict] = []
        self.samples = list(samples) if samples else None  # held-out samples (None: the calibration samples)
        self.source = source

    def data(self) -> dict:
        """What the SQNR figures were measured on."""
        if self.samples:
            return {"set": "held-out", "nsamples": len(self.samples), "source": self.source}
        return {"set": "calibration (in-sample)"}

    @torch.no_grad()
    def layer(self, ctx, fp_layer) -> list[torch.Tensor]:
        """Record layer ``ctx.index`` (compressed ``ctx.layer`` against ``fp_layer``) and return the
        compressed layer's outputs on ``ctx``'s samples (on the CPU), which the engine carries on instead
        of running the layer a second time."""
        from ..models.modality import modality_context
        from .linear import QuantLinear

        layer = ctx.layer
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        fp_linears = {n: fp_layer.get_submodule(n) for n in linears}
        accs = {n: _Acc() for n in linears}
        act: dict[str, dict[int, torch.Tensor]] = {n: {} for n in linears}  # running per-channel absmax
        current = {}
        seen = _InputStats()

        def hook(name):
            def h(mod, args, output):
                x = args[0]
                g, amax = seen.of(x, ids_of_tokens(x, current["ids"]))  # an MoE expert: its routed tokens
                accs[name].add(fp_linears[name](x), output, g.ids, g)
                run = act[name]
                for m, a in amax.items():
                    prev = run.get(m)
                    run[m] = a.clone() if prev is None else torch.maximum(prev, a, out=prev)
            return h

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        local = _Acc()
        outputs = []
        try:
            for j in range(len(ctx.inputs)):
                ids = _flat_ids(ctx.modality_ids[j]).to(ctx.device)
                current["ids"] = ids
                out = ctx.run(j)
                seen.clear()
                outputs.append(out.to("cpu"))
                with modality_context(ctx.modality_ids[j].to(ctx.device)):
                    ref = fp_layer(ctx.inputs[j].to(ctx.device), **ctx.kwargs(j))
                ref = ref[0] if isinstance(ref, tuple) else ref
                local.add(ref, out, ids)
        finally:
            for h in handles:
                h.remove()
        record = {"layer": ctx.index, "sqnr_local": local.result(), "linears": {}}
        for name, mod in linears.items():
            stats = {}
            for m, amax in act[name].items():
                amax = amax.double().cpu()
                med = float(amax.median())
                stats[MODALITY_NAMES[m]] = {"absmax": float(amax.max()), "median_channel_absmax": med,
                                            "outlier_ratio": float(amax.max()) / med if med > 0 else None}
            entry = {"sqnr": accs[name].result(), "activations": stats}
            s = getattr(mod, "input_smoothing", None)
            if s is not None and s.shape[0] > 1:
                log_s = s.double().clamp(min=1e-12).log()
                entry["smoothing_divergence"] = {MODALITY_NAMES[m]: float((log_s[m] - log_s[0]).abs().mean())
                                                 for m in act[name] if m != TEXT and m < s.shape[0]}
            record["linears"][name] = entry
        self.layers.append(record)
        return outputs

    def accumulated(self, index: int, outputs, fp_outputs, modality) -> None:
        acc = _Acc(per_token=True)
        for y, ref, ids in zip(outputs, fp_outputs, modality):
            acc.add(ref, y, _flat_ids(ids))
        for rec in self.layers:
            if rec["layer"] == index:
                rec["sqnr_accumulated"] = acc.result()
                rec["sqnr_accumulated_token_median"] = acc.token_median()

    def summary(self) -> dict:
        out = {}
        for key in ("sqnr_local", "sqnr_accumulated", "sqnr_accumulated_token_median"):
            vals: dict[str, list] = {}
            for rec in self.layers:
                for m, v in rec.get(key, {}).items():
                    if v is not None and math.isfinite(v):
                        vals.setdefault(m, []).append(v)
            out[f"mean_{key}"] = {m: sum(v) / len(v) for m, v in vals.items()}
        return out


def write_report(report_dir, diagnostics: Diagnostics, description: dict, plot: bool = True) -> Path:
    """Write this run's JSON and (``plot``) redraw the comparison plot of all runs in ``report_dir``."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    method = description.get("method", {}).get("method", "run") if isinstance(description.get("method"), dict) else "run"
    name = f"diagnostics-{method}-{description.get('scheme', '')}".rstrip("-")
    tag = description.get("report_tag")
    if tag:
        name += f"-{tag}"
    data = {"name": name, **{k: v for k, v in description.items() if k != "layers"},
            "sqnr_data": diagnostics.data(), "summary": diagnostics.summary(), "layers": diagnostics.layers}
    path = report_dir / f"{name}.json"
    atomic_write_text(path, json.dumps(data, indent=1, default=_json_default))
    if plot:
        plot_sqnr(report_dir)
    return path


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


PNG_METADATA = {"Software": "mmcompress"}  # how `mmcompress report` knows a plot is its own


def plot_sqnr(report_dir, out_dir=None) -> Path | None:
    """``sqnr_by_modality.png`` (in ``out_dir``, default ``report_dir``): per-layer accumulated SQNR, one
    panel per modality, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    report_dir = Path(report_dir)
    runs = []
    for p in sorted(report_dir.glob("diagnostics-*.json")):
        try:
            runs.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    if not runs:
        return None
    modalities = sorted({m for r in runs for rec in r["layers"] for m in rec.get("sqnr_accumulated", rec.get("sqnr_local", {}))},
                        key=lambda m: ["text", "image", "audio"].index(m) if m in ("text", "image", "audio") else 9)
    fig, axes = plt.subplots(1, len(modalities), figsize=(4.5 * len(modalities), 3.6), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], modalities):
        for r in runs:
            key = "sqnr_accumulated" if any("sqnr_accumulated" in rec for rec in r["layers"]) else "sqnr_local"
            xs, ys = [], []
            for rec in r["layers"]:
                v = rec.get(key, {}).get(m)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs.append(rec["layer"])
                    ys.append(v)
            if xs:
                ax.plot(xs, ys, marker=".", label=r["name"].removeprefix("diagnostics-"))
        ax.set_title(f"{m} tokens")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("SQNR of layer output (dB)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out_dir or report_dir) / "sqnr_by_modality.png"
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png", metadata=PNG_METADATA))
    plt.close(fig)
    return out
