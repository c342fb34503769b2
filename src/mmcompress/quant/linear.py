"""The quantized linear layer shared by every quantization method.

Forward, for a token ``x`` of modality ``m`` (``m = T`` for text and for every decode step)::

    y = Q_a(x / s_m) · Ŵᵀ + b  (+ a method's per-modality correction, see ``correction``)

* ``Ŵ = Q_w(W')`` with ``W' = W ⊙ s`` already folded in: the weight holds the smoothed weight.
* ``input_smoothing`` (optional, ``[n_rows, in]``) is the run-time divisor ``s_m``: one shared row
  (SmoothQuant where the division cannot be folded into a producer) or one row per modality id
  (MASQuant).  ``None`` when the division was folded offline.
* Two states: *float* (``weight`` is a float parameter, quantized on the fly with straight-through
  rounding, so methods can learn through it) and *packed* (:meth:`pack`: integer codes, step sizes
  and zero points are stored; the forward uses their dequantized weight).  Saved artifacts are packed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.modality import current_modality_ids
from ..specs import SPARSE_MODULES, register_quant_module
from .quantizer import (
    QuantScheme,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_int4,
    quantize_weight,
    unpack_int4,
)


def modality_rows(ids: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Row index per token: its modality id if the layer has a row for it, else text (row 0).

    Video tokens (id 3) therefore use the text row, as in the MASQuant reference."""
    ids = ids.long()
    return torch.where(ids < n_rows, ids, torch.zeros_like(ids))


def smooth(x: torch.Tensor, s: torch.Tensor | None, ids: torch.Tensor | None) -> torch.Tensor:
    """``x / s_m``: the row of the smoothing divisors ``s`` (``[n_rows, in]`` or ``None``) per token."""
    if s is None:
        return x
    if s.shape[0] == 1 or ids is None or ids.shape != x.shape[:-1]:
        return x / s[0].to(x.dtype)
    return x / s.to(x.dtype)[modality_rows(ids, s.shape[0])]


def weight_input(mod: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the weight of a quantized linear ``mod`` (reference or deployed) reads, and the tokens'
    modality ids: ``x`` through its input sparsifier (Top-K, if any), then ``x / s_m`` with the row of
    ``input_smoothing`` selected per token by its modality id."""
    ids = current_modality_ids()
    if mod.input_sparsifier is not None:
        x = mod.input_sparsifier.sparsify(x)
    return smooth(x, mod.input_smoothing, ids), ids


@register_quant_module
class QuantLinear(nn.Module):
    """A linear layer with fake-quantized weights and per-token quantized inputs."""

    float32_tensors = ("weight_scale", "weight_zero", "input_smoothing")  # float32 whatever the model dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        scheme: QuantScheme,
        smoothing_rows: int = 0,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = scheme
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        if smoothing_rows:
            self.register_buffer("input_smoothing", torch.ones(smoothing_rows, in_features, dtype=torch.float32, device=device))
        else:
            self.register_buffer("input_smoothing", None)
        self.packed = False
        self._dequant_cache: torch.Tensor | None = None
        self.input_sparsifier: nn.Module | None = None  # activation sparsity applied before quantization

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, smoothing_rows: int = 0) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme, smoothing_rows,
                dtype=linear.weight.dtype, device=linear.weight.device)
        q.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        if hasattr(linear, "sparsify") and hasattr(linear, "spec"):  # a SparseLinear: keep its Top-K / threshold
            q.input_sparsifier = _weightless_sparsifier(linear.spec())
        return q

    def spec(self) -> dict:
        """A JSON description from which :meth:`from_spec` rebuilds the module before loading weights."""
        return {
            "class": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "scheme": self.scheme.to_dict(),
            "smoothing_rows": 0 if self.input_smoothing is None else int(self.input_smoothing.shape[0]),
            "packed": self.packed,
            "dtype": str(self._float_dtype()).replace("torch.", ""),
            **({"input_sparsifier": self.input_sparsifier.spec()} if self.input_sparsifier is not None else {}),
        }

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "QuantLinear":
        dtype = getattr(torch, spec.get("dtype", "float32"))
        q = cls(spec["in_features"], spec["out_features"], spec["bias"], QuantScheme(**spec["scheme"]),
                spec.get("smoothing_rows", 0), dtype=dtype, device=device)
        if spec.get("packed"):
            q._make_packed_buffers(device)
        if spec.get("input_sparsifier"):
            q.input_sparsifier = _weightless_sparsifier(spec["input_sparsifier"])
        return q

    def _float_dtype(self) -> torch.dtype:
        """The dtype the layer computes in (the model's dtype; step sizes stay float32 when packed)."""
        if self.bias is not None:
            return self.bias.dtype
        return self.weight.dtype if not self.packed else self._weight_dtype_marker.dtype

    # -- packing -------------------------------------------------------------------------------
    def _make_packed_buffers(self, device=None):
        s = self.scheme
        n_groups = 1 if s.group_size <= 0 else -(-self.in_features // s.group_size)
        dtype = self._float_dtype()
        if s.wbits <= 4:
            codes = torch.zeros(self.out_features, (self.in_features + 1) // 2, dtype=torch.uint8, device=device)
        else:
            codes = torch.zeros(self.out_features, self.in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", torch.ones(self.out_features, n_groups, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero", torch.zeros(self.out_features, n_groups, dtype=torch.float32, device=device))
        del self.weight
        self.register_buffer("_weight_dtype_marker", torch.zeros(0, dtype=dtype, device=device), persistent=False)
        self.packed = True

    @staticmethod
    @torch.no_grad()
    def packed_weight(weight: torch.Tensor, scheme: QuantScheme) -> dict[str, torch.Tensor]:
        """The stored form of ``weight``: ``weight_codes`` (int8, or two int4 per uint8), ``weight_scale``
        and ``weight_zero`` (float32, ``[out, n_groups]``)."""
        codes, scale, zero = quantize_weight(weight, scheme.wbits, scheme.group_size, scheme.sym)
        return {"weight_codes": pack_int4(codes) if scheme.wbits <= 4 else codes,
                "weight_scale": scale.float(), "weight_zero": zero.float()}

    @torch.no_grad()
    def pack(self) -> "QuantLinear":
        """Replace the float weight by integer codes + step sizes + zero points (no-op at 16 bits)."""
        if self.packed or self.scheme.wbits >= 16:
            return self
        packed = self.packed_weight(self.weight.data, self.scheme)
        self._make_packed_buffers(self.weight.device)
        for name, t in packed.items():
            getattr(self, name).copy_(t)
        self._dequant_cache = None
        return self

    def int_codes(self) -> torch.Tensor:
        """Signed int8 codes ``[out, in]`` of a packed layer (asymmetric codes are shifted by 2^(b−1))."""
        if self.scheme.wbits <= 4:
            return unpack_int4(self.weight_codes, self.in_features)
        return self.weight_codes

    def quantized_weight(self) -> torch.Tensor:
        """``Ŵ = Q_w(W')`` in the layer's float dtype (differentiable in the float state)."""
        s = self.scheme
        if not self.packed:
            if s.wbits >= 16:
                return self.weight
            return fake_quantize_weight(self.weight.float(), s.wbits, s.group_size, s.sym).to(self.weight.dtype)
        if self._dequant_cache is None or self._dequant_cache.device != self.weight_codes.device:
            w = dequantize_weight(self.int_codes(), self.weight_scale, self.weight_zero, s.wbits, s.group_size, s.sym)
            self._dequant_cache = w.to(self._weight_dtype_marker.dtype)
        return self._dequant_cache

    def clear_cache(self) -> None:
        """Drop the dequantized-weight cache (the engine does this when a layer is offloaded)."""
        self._dequant_cache = None

    def _apply(self, fn, recurse=True):
        self._dequant_cache = None
        return super()._apply(fn, recurse)

    # -- forward -------------------------------------------------------------------------------
    def correction(self, x_smoothed: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
        """A method's extra per-modality term added to the output (MASQuant's CMC); none here."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs, ids = weight_input(self, x)
        xq = fake_quantize_activation(xs, self.scheme.abits)
        y = torch.nn.functional.linear(xq, self.quantized_weight(), self.bias)
        extra = self.correction(xs, ids)
        return y if extra is None else y + extra

    def extra_repr(self) -> str:
        sm = 0 if self.input_smoothing is None else self.input_smoothing.shape[0]
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme.name}, smoothing_rows={sm}, packed={self.packed}")


def _weightless_sparsifier(spec: dict) -> nn.Module:
    """The input sparsifier of a ``SparseLinear`` spec, rebuilt with no weight (``out_features = 0``)."""
    spec = dict(spec, out_features=0, bias=False)
    return SPARSE_MODULES[spec["class"]].from_spec(spec)

