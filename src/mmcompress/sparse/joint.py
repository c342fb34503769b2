"""LaRoSA + W8A8 deployed: the Top-K sparse input and the integer weight executed together.

``compress --recipe`` with a sparsify step followed by ``quantize: {method: rtn, scheme: w8a8}`` saves
every projection as a packed ``QuantLinear`` whose ``input_sparsifier`` is the projection's Top-K
(``y = Q_a(S_k(x) / s) · Ŵᵀ + b``).  That module is the reference (fake-quant) form.
:class:`SparseInt8Linear` is its deployed form, built from it at load time (:func:`deploy`), with the
same artifact: no new tensors, no manifest change (its ``spec()`` and ``state_dict()`` are the
``QuantLinear``'s, so a deployed model saves the very same files).

It keeps only the integer codes (transposed, ``[in, out]`` uint8 = code + 128, so a dropped channel is
a skipped contiguous row), the per-output-channel steps, the zero points, the bias and the optional
run-time smoothing divisor, and runs :func:`~mmcompress.sparse.kernels.sparse_int8_linear`:

* Top-K on ``x`` (the kernel's selection; q/k/v and gate/up share one selection of the same tensor),
* per-token activation codes over the kept values ``v = x_S / s``: ``sa = max|v| / 127``,
  ``qa = rne(v / sa)``,
* ``y_j = sa·Δ_j·Σ_{i∈S} qa_i (c_ij − z_j) + b_j`` with exact int32 accumulation (AVX-512 VNNI).

Against the reference forward in fp32 the only differences are float round-off (the reference
multiplies the dequantized float values; the kernel sums integers exactly and scales once) and the
choice among channels whose magnitudes tie exactly at the K-th (the kernel keeps the lowest indices,
``torch.topk`` leaves it unspecified).  Calls of more than 8 tokens (prefill) run the kernel 8 tokens
at a time (the integer weight is streamed once per chunk; no float copy of it is ever made).

Eligible: a packed ``QuantLinear`` (exactly that class: a method with a per-modality correction keeps
its own forward) with ``wbits <= 8`` per output channel (``group_size`` 0), ``abits <= 8``, at most one
smoothing row, and a Top-K (or dense) input sparsifier.  4-bit codes run through the same int8 layout
(integer path, no 4-bit memory saving).  Anything else stays a ``QuantLinear`` (:func:`deploy` reports
how many modules it left alone).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..engine import Method
from ..quant.linear import QuantLinear
from ..quant.quantizer import pack_int4
from ..specs import register_sparse_module
from . import linear as _linear


@register_sparse_module  # found by module_specs; its spec() is the QuantLinear's, so artifacts never name it
class SparseInt8Linear(nn.Module):
    """Deployed ``QuantLinear`` + Top-K input: integer codes only (see the module docstring)."""

    def __init__(self, quant_spec: dict, in_features: int, out_features: int, keep: int, abits: int,
                 sparse_prefill: bool, device=None):
        super().__init__()
        self.quant_spec = dict(quant_spec)
        self.in_features, self.out_features = in_features, out_features
        self.keep = int(keep)
        self.abits = int(abits)
        self.sparse_prefill = bool(sparse_prefill)
        self.backend = "auto"
        self.float_dtype = getattr(torch, quant_spec.get("dtype", "float32"))
        self.input_sparsifier: nn.Module | None = None
        self.register_buffer("weight_q", torch.zeros(in_features, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("zero_corr", torch.full((out_features,), 128, dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("input_smoothing", None)
        self.bias = None

    # -- construction ------------------------------------------------------------------------------

    @staticmethod
    def eligible(q: nn.Module) -> str | None:
        """``None`` if ``q`` can be deployed, else the reason it cannot."""
        if type(q) is not QuantLinear:
            return "not a plain QuantLinear"
        s = q.scheme
        sp = q.input_sparsifier
        if not q.packed:
            return "not packed"
        if s.wbits > 8 or s.abits > 8:
            return f"scheme {s.name}: the kernel needs <= 8-bit weights and activations"
        if s.group_size and s.group_size < q.in_features:
            return f"scheme {s.name}: group-wise weights"
        if q.input_smoothing is not None and q.input_smoothing.shape[0] > 1:
            return "per-modality smoothing"
        if sp is None or getattr(sp, "mode", None) not in ("topk", "dense") or \
                type(sp).sparsify is not _linear.SparseLinear.sparsify:
            return "no Top-K input sparsifier"
        return None

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: nn.Module) -> "SparseInt8Linear":
        from .kernels import pack_int8_weight

        why = cls.eligible(q)
        if why is not None:
            raise ValueError(f"cannot deploy this QuantLinear on the sparse int8 kernel: {why}")
        s, sp = q.scheme, q.input_sparsifier
        keep = q.in_features if sp.mode == "dense" else sp.keep
        dev = q.weight_codes.device
        m = cls(q.spec(), q.in_features, q.out_features, keep, s.abits, sp.sparse_prefill, device="meta")
        m.input_sparsifier = sp
        wq, zc = pack_int8_weight(q.int_codes(), q.weight_zero, s.wbits, s.sym)
        m.weight_q, m.zero_corr = wq, zc
        m.weight_scale = q.weight_scale.detach().float().clone().to(dev)
        m.weight_zero = q.weight_zero.detach().float().clone().to(dev)
        m.input_smoothing = None if q.input_smoothing is None else q.input_smoothing.detach().float().clone()
        m.bias = None if q.bias is None else nn.Parameter(q.bias.detach().clone(), requires_grad=False)
        return m

    # -- artifact compatibility: the QuantLinear's spec and tensors ---------------------------------

    def spec(self) -> dict:
        return dict(self.quant_spec)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        from .kernels import unpack_int8_weight

        codes = unpack_int8_weight(self.weight_q)
        if self.quant_spec["scheme"]["wbits"] <= 4:
            codes = pack_int4(codes)
        destination[prefix + "weight_codes"] = codes
        destination[prefix + "weight_scale"] = self.weight_scale
        destination[prefix + "weight_zero"] = self.weight_zero
        if self.input_smoothing is not None:
            destination[prefix + "input_smoothing"] = self.input_smoothing
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    # -- forward -------------------------------------------------------------------------------------

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.weight_scale, self.zero_corr))

    def _k(self, x: torch.Tensor) -> int:
        """K for this call; the sparsifier's mode, keep and sparse_prefill are read at call time (as the
        reference forward does), so ``enable_sparse_decode`` or a K override applies here too."""
        sp = self.input_sparsifier
        multi = x.dim() >= 2 and x.shape[-2] > 1
        prefill = getattr(sp, "sparse_prefill", self.sparse_prefill)
        if sp is None:
            return self.in_features if (multi and not prefill) else self.keep
        if sp.mode == "dense" or (multi and not prefill):
            return self.in_features
        return sp.keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import MAX_KERNEL_TOKENS, resolve_backend, sparse_int8_linear, topk_select

        k = self._k(x)
        smooth = None if self.input_smoothing is None else self.input_smoothing[0]
        be = resolve_backend(self.backend, x.device)
        tokens = x.numel() // self.in_features
        kw = dict(bias=self.bias, smooth=smooth, abits=self.abits, backend=be)
        args = (self.weight_q, self.weight_scale.reshape(-1), self.zero_corr)
        if be != "cpu" or tokens == 0:
            return sparse_int8_linear(x, *args, k, **kw)
        if tokens > MAX_KERNEL_TOKENS:  # prefill: the kernel, 8 tokens at a time
            x2 = x.reshape(tokens, self.in_features)
            ys = [sparse_int8_linear(x2[i:i + MAX_KERNEL_TOKENS], *args, k, **kw)
                  for i in range(0, tokens, MAX_KERNEL_TOKENS)]
            return torch.cat(ys).reshape(*x.shape[:-1], self.out_features)
        if k >= self.in_features:
            return sparse_int8_linear(x, *args, k, **kw)
        sel = _linear._SELECTION.get(x, k)  # shared with the other readers of the same tensor
        if sel is None:
            t0 = time.perf_counter() if _linear.PROFILE is not None else 0.0
            sel = topk_select(x, k, backend="cpu")
            if _linear.PROFILE is not None:
                _linear.PROFILE["topk_s"] = _linear.PROFILE.get("topk_s", 0.0) + time.perf_counter() - t0
                _linear.PROFILE["topk_calls"] = _linear.PROFILE.get("topk_calls", 0) + 1
            _linear._SELECTION.put(x, k, sel)
        return sparse_int8_linear(x, *args, indices=sel[0], values=sel[1], **kw)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, keep={self.keep}, "
                f"scheme={self.quant_spec['scheme']}, backend={self.backend}")


def deploy(model: nn.Module, backend: str = "auto") -> tuple[int, int]:
    """Replace every eligible packed ``QuantLinear`` with a Top-K input sparsifier (a LaRoSA/CATS-style
    sparse + quantized projection) by a :class:`SparseInt8Linear`, in place.

    Only where the CPU kernel runs (``backend`` resolving to ``"cpu"`` on the module's device).  Returns
    ``(deployed, left)``: ``left`` counts the sparse quantized projections that are not eligible or have
    no kernel on their device (they keep the reference forward)."""
    from .kernels import resolve_backend

    done = left = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear) or mod.input_sparsifier is None:
            continue
        if SparseInt8Linear.eligible(mod) is not None or resolve_backend(backend, mod.weight_codes.device) != "cpu":
            left += 1  # no sparse integer kernel here (e.g. CUDA): the reference forward stays
            continue
        new = SparseInt8Linear.from_quant_linear(mod)
        new.backend = backend
        model.set_submodule(name, new)
        done += 1
    _linear._SELECTION.clear()
    return done, left


# -- residual adapters of a quantized LaRoSA model --------------------------------------------------

ADAPTER_SCHEMES = ("w8a16", "float")  # what a quantize step after LaRoSA does with the residual adapters


def check_adapter_scheme(scheme) -> str:
    """``scheme`` if it is one of :data:`ADAPTER_SCHEMES`, else ``ValueError`` (the recipe's and the API's check)."""
    if scheme not in ADAPTER_SCHEMES:
        raise ValueError(f"adapters must be one of {', '.join(ADAPTER_SCHEMES)}, not {scheme!r}")
    return scheme


@torch.no_grad()
def quantize_residual_adapters(model: nn.Module, scheme: str = "w8a16") -> int:
    """Store every float residual adapter ``r ← r A_l`` of a merged LaRoSA model as a packed
    weight-only 8-bit ``QuantLinear`` (RTN, one step size per output channel, symmetric); returns how
    many were quantized.  ``scheme="float"`` keeps them as they are (a recipe's default).

    The adapter multiplies the whole residual stream, whose massive-activation channels make per-token
    activation quantization unusable there, so only the weight is quantized: ``r ← r Âᵀ`` with
    ``Â = Δ·rne(A/Δ)``.  At decode this halves the adapters' bytes (bf16 → int8) on the weight-only
    integer kernel, but the error is relative to the whole residual stream, not to one block's
    increment, and it adds up over the layers: on smollm2-135m LaRoSA-40 % + W8A8 the wiki perplexity
    goes from 15.37 (bf16 adapters) to 17.00 (``benchmarks/adapter_bits.py``; g32 grids: 16.01).  Hence
    opt-in."""
    from ..quant.quantizer import resolve_scheme
    from .merge import ResidualAdaptedLayer

    if check_adapter_scheme(scheme) == "float":
        return 0
    sch = resolve_scheme(scheme)
    n = 0
    for mod in model.modules():
        if isinstance(mod, ResidualAdaptedLayer) and mod.residual_adapter is not None and mod.float_adapter:
            mod.residual_adapter = QuantLinear.from_linear(mod.residual_adapter, sch).pack()
            n += 1
    return n


class ResidualAdapterQuant(Method):
    """A recipe's ``adapters: w8a16`` as the last part of its walk: each layer's residual adapter is
    quantized once the layer's output pass is done (``observe_then_change``), so the activation chain and
    the quantization steps before it see the float adapters, as when the adapters were quantized after
    the whole walk (:func:`quantize_residual_adapters`)."""

    name = "residual-adapters"
    observe_then_change = True
    distributed = True

    def __init__(self, scheme: str):
        self.scheme = check_adapter_scheme(scheme)
        self.count = 0

    def config(self) -> dict:
        return {"method": self.name, "scheme": self.scheme}

    def step(self, ctx) -> None:
        pass

    def observed(self, ctx) -> None:
        self.count += quantize_residual_adapters(ctx.layer, self.scheme)
