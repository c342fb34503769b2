"""Integer matmuls of the deployed quantized linear, behind one dispatch function (:func:`int_matmul`).

Inputs: a float activation matrix ``x`` ``[B, K]`` and a packed weight (``codes``: int8 ``[N, K]`` or
int4 two per byte ``[N, K/2]``; ``scale``/``zero``: float ``[N, G]``, the layout of a packed
:class:`~mmcompress.quant.linear.QuantLinear`).  Output: float32 ``[B, N]`` without bias.

* ``abits <= 8`` (W8A8, W4A8, W4A6): ``x`` becomes per-token int8 codes with the reference quantizer's
  arithmetic (:func:`~mmcompress.quant.quantizer.quantize_activation`), then int8 × int8 products are
  summed exactly in int32 per group, the zero point is removed with the activation group sums, and
  only then the float step sizes are applied.
* ``abits >= 16`` (W4A16, W8A16): float activations × weight codes widened in registers; a bf16 model's
  W4A16 layers multiply its bf16 activations by the codes made bf16 in registers (VDPBF16PS: exact
  products, fp32 sums), on CPUs with AVX512_BF16.

Paths (chosen per call; measurements in ``docs/runtime.md``):

* ``"cpu"``: our AVX-512 VNNI kernel (``int_gemm.cpp``) for 4- and 8-bit weights when ``K`` and the group
  size are multiples of 64: decode (≤ ``PREFILL_ROWS`` tokens), and prefill of int4 weights with int8
  activations and of group-wise weights with int8 activations;
* ``"torch"``: any device, any shape: ``torch._int_mm`` per group (float64 products of the integer
  codes, also exact, where ``_int_mm`` refuses a shape), weight-only by a temporary dequantized weight
  that is dropped after the call.  This is the CUDA path (untuned).

Code layouts: ``codes`` is row-major (``[N, K]`` / ``[N, K/2]``, as saved) or, deployed on the CPU
kernel, tiled ``[N/8, C/64, 8, 64]`` with ``C`` bytes per row (:func:`tile_codes`: line ``j`` of eight rows
side by side, one memory stream per 8-row tile instead of eight).  :func:`tiled_codes` decides: int4 codes
tiled, int8 codes row-major when their rows are long (measured in the fused decode step, docs/runtime.md
"Sitting W");
``MMCOMPRESS_CODE_LAYOUT=tiles`` or ``rows`` sets one layout for both.  The kernels read either; the torch
path un-tiles into a temporary.
"""

from __future__ import annotations

import os

import torch

from ..quantizer import QuantScheme, _eps, dequantize_weight, quantize_activation, unpack_int4
from . import cpu as _cpu

KERNEL_BITS = {w: (4 if w <= 4 else 8) for w in range(2, 9)}  # weight bits -> code container


def has_kernel(scheme: QuantScheme, device) -> bool:
    """Whether :func:`int_matmul` runs ``scheme`` on ``device`` (else: the reference forward)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        return False
    return scheme.wbits <= 8 and (scheme.abits <= 8 or scheme.abits >= 16)


PREFILL_ROWS = 16  # above this many tokens, per-channel A8 and weight-only calls go to torch (measured)


def path_for(scheme: QuantScheme, in_features: int, device, rows: int = 1) -> str:
    """``"cpu"`` (our kernel) or ``"torch"`` for a call with ``rows`` tokens (docs/runtime.md)."""
    gs = scheme.group_size if 0 < scheme.group_size < in_features else in_features
    if not (torch.device(device).type == "cpu" and scheme.wbits in (4, 8) and in_features % 64 == 0
            and gs % 64 == 0 and _cpu.available()):
        return "torch"
    if rows > PREFILL_ROWS and (scheme.weight_only or (gs == in_features and scheme.wbits == 8)):
        # prefill: oneDNN's _int_mm on int8 codes / a float GEMM on a temporary weight beat our kernel;
        # int4 codes with int8 activations stay on ours (the torch path would unpack them first)
        return "torch"
    return "cpu"


TILE_ROWS, TILE_BYTES = 8, 64  # tiled codes: 64-byte lines of 8 rows side by side


def tile_codes(codes: torch.Tensor) -> torch.Tensor:
    """Row-major codes ``[N, C]`` (``C`` bytes per row, a multiple of 64; ``N`` of 8) → tiled
    ``[N/8, C/64, 8, 64]`` (a new tensor)."""
    n, c = codes.shape
    return codes.reshape(n // TILE_ROWS, TILE_ROWS, c // TILE_BYTES, TILE_BYTES).transpose(1, 2).contiguous()


def untile_codes(codes: torch.Tensor) -> torch.Tensor:
    """Tiled codes → row-major ``[N, C]`` (a new tensor); row-major codes as they are."""
    if codes.dim() == 2:
        return codes
    t, lines, rows, width = codes.shape
    return codes.transpose(1, 2).reshape(t * rows, lines * width)


CODE_LAYOUTS = ("auto", "tiles", "rows")
INT8_ROWS_FROM = 4096  # auto: int8 codes with rows this long stay row-major (measured at 4096 and 11008; 576 and 1536 tiled)


def tiled_codes(scheme: QuantScheme, in_features: int, out_features: int, device) -> bool:
    """Whether a deployed linear keeps its codes tiled: codes that our CPU kernel runs at decode, rows of a
    multiple of 64 bytes (``K % 64 == 0`` for int8, ``K % 128 == 0`` for int4) and ``N % 8 == 0`` (every row
    in a whole tile) — by default (``MMCOMPRESS_CODE_LAYOUT=auto``) int4 codes, and int8 codes with rows shorter
    than ``INT8_ROWS_FROM``: the fused decode step reads the 7B stack's int8 codes (K = 4096, 11008) faster
    row-major (eight rows' streams at once), smollm2's (K = 576, 1536) and every int4 layout faster tiled
    (docs/runtime.md "Sitting W").  ``tiles`` tiles both, ``rows`` neither."""
    layout = os.environ.get("MMCOMPRESS_CODE_LAYOUT", "auto")
    if layout not in CODE_LAYOUTS:
        raise ValueError(f"MMCOMPRESS_CODE_LAYOUT must be 'auto', 'tiles' or 'rows', got {layout!r}")
    int8 = KERNEL_BITS[scheme.wbits] == 8
    if layout == "rows" or (layout == "auto" and int8 and in_features >= INT8_ROWS_FROM) \
            or out_features % TILE_ROWS or path_for(scheme, in_features, device, 1) != "cpu":
        return False
    return (in_features if int8 else in_features // 2) % TILE_BYTES == 0


_QUANT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def quantize_act(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 codes (contiguous ``[B, K]``) and float32 step sizes (``[B]``) of a 2-D ``x``:
    :func:`~mmcompress.quant.quantizer.quantize_activation`, bit for bit — in one C++ op
    (``mmcompress_int::quantize_act``, opaque to ``torch.compile``) on the CPU kernel's machines, else
    the torch form."""
    if x.device.type == "cpu" and x.dtype in _QUANT_DTYPES and _cpu.available():
        return torch.ops.mmcompress_int.quantize_act(x.contiguous(), bits, _eps(x.dtype))
    xq, sx = quantize_activation(x, bits)
    return xq.contiguous(), sx.float().reshape(-1).contiguous()


def _bf16_ok(in_features: int, group: int) -> bool:
    """Whether the bf16-activation int4 kernel (AVX512_BF16, 128-code blocks) takes this shape."""
    return in_features % 128 == 0 and (group or in_features) % 128 == 0 and _cpu.bf16_available()


def int_matmul(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """``Q_a(x) · Ŵᵀ`` (float32 ``[B, N]``) computed on the integer codes; see the module docstring."""
    bits = KERNEL_BITS[scheme.wbits]
    group = scheme.group_size if 0 < scheme.group_size < in_features else 0
    # step sizes and zero points are float32 (a model cast with .to(torch.bfloat16) casts them too)
    scale, zero = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in (scale, zero))
    if path_for(scheme, in_features, x.device, x.shape[0]) == "cpu":
        ops = torch.ops.mmcompress_int
        if scheme.weight_only:
            if bits == 4 and x.dtype == torch.bfloat16 and _bf16_ok(in_features, group):  # exact bf16 products
                return ops.bf16_act_gemm(x.contiguous(), codes, scale, zero, bits, group, scheme.sym)
            return ops.float_act_gemm(x.float().contiguous(), codes, scale, zero, bits, group, scheme.sym)
        xq, sx = quantize_act(x, scheme.abits)
        return ops.int8_act_gemm(xq, sx, codes, scale, zero, bits, group, scheme.sym)
    codes = untile_codes(codes)
    q = unpack_int4(codes, in_features) if bits == 4 else codes
    if scheme.weight_only:  # a temporary dequantized weight, freed on return
        w = dequantize_weight(q, scale, zero, scheme.wbits, scheme.group_size, scheme.sym)
        return (x @ w.to(x.dtype).t()).float()
    xq, sx = quantize_activation(x, scheme.abits)
    return _torch_int(xq, sx.float(), q, scale, zero, scheme, group)


def _int_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a · bᵀ`` of int8 matrices, exact (int32, or int64 via float64 where ``_int_mm`` refuses)."""
    m = a.shape[0]
    try:
        if a.is_cuda and m <= 16:  # cuBLASLt int8 wants more than 16 rows
            return torch._int_mm(torch.nn.functional.pad(a, (0, 0, 0, 17 - m)), b.t().contiguous())[:m]
        return torch._int_mm(a.contiguous(), b.t().contiguous())
    except RuntimeError:
        return (a.double() @ b.double().t()).round().long()


def _torch_int(xq, sx, q, scale, zero, scheme: QuantScheme, group: int) -> torch.Tensor:
    B, K = xq.shape
    gs = group or K
    pad = (-K) % gs
    if pad:  # zero codes in the padding: no contribution, as in the quantizer's own padding
        xq, q = torch.nn.functional.pad(xq, (0, pad)), torch.nn.functional.pad(q, (0, pad))
    G = (K + pad) // gs
    xg, qg = xq.reshape(B, G, gs), q.reshape(q.shape[0], G, gs)
    # z' = zero point in the stored (shifted) code domain; symmetric: 0
    zc = zero - 2 ** (scheme.wbits - 1) if not scheme.sym else torch.zeros_like(zero)
    xsum = xg.sum(-1, dtype=torch.int64)  # [B, G]
    y = None
    for g in range(G):
        d = _int_dot(xg[:, g], qg[:, g]).long() - xsum[:, g, None] * zc[:, g].long()[None, :]
        term = d.float() * scale[:, g][None, :]
        y = term if y is None else y + term
    return y * sx.reshape(-1, 1)
