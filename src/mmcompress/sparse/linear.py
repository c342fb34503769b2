"""A linear layer whose input is Top-K sparsified per token: ``y = S_k(x) Wᵀ + b``.

``backend = "torch"`` is the PyTorch reference path (the oracle in tests).  Kernel backends plug in
behind the same module (see :mod:`mmcompress.sparse.kernels`):

* ``"cpu"``: the C++/OpenMP sparse GEMV (1..8 tokens per call);
* ``"triton"``: Triton kernels on CUDA (1..8 tokens per call): a per-token Top-K threshold kernel and
  a masked GEMV that keeps exactly K channels (ties at the K-th magnitude: lowest indices, as on CPU);
* ``"auto"``: whichever of those fits the weight's device, else ``"torch"``.

Weight layout.  The kernels read the weight input-channel-major, ``WT = Wᵀ`` contiguous ``[in, out]``.
:meth:`SparseLinear.set_backend` re-lays the weight out in place: ``self.weight`` stays an
``[out, in]`` parameter (same name, shape and values, so ``state_dict``, artifacts and
``load_state_dict`` are unchanged), but it becomes the transposed *view* of a contiguous ``WT``
(strides ``(1, out)``), so no second copy is kept.  ``.to(device)`` preserves the layout.
``set_backend("torch")`` restores the row-major ``[out, in]`` layout.

Which tokens use a kernel.  A call whose tokens are single-token steps (decode: ``x [..., 1, in]``), or
any call of at most 8 tokens that the module sparsifies in full, runs the kernel; anything else
(prefill) runs the PyTorch path, a dense GEMM on ``sparsify(x)``, which honours ``sparse_prefill``
(``False``: multi-token calls stay dense) and subclasses overriding :meth:`sparsify`.

Shared selection.  q/k/v (and gate/up) read the same input tensor with the same K: on the CPU backend
the Top-K selection of that exact tensor object is computed once and reused, on the Triton backend
its per-token thresholds (a weak reference plus the tensor's version counter guard the cache, so a new
or modified tensor is always re-selected; during CUDA graph capture the cache is bypassed).
"""

from __future__ import annotations

import time
import weakref

import torch
from torch import nn

from ..specs import register_sparse_module
from .topk import Dense, Selector, Threshold, TopK, select

_BACKENDS = ("torch", "cpu", "triton", "auto")


class _SelectionCache:
    """The last Top-K selection: (weakref to x, x._version, k) -> (indices, values)."""

    def __init__(self):
        self.ref = None
        self.key = None
        self.value = None

    def get(self, x: torch.Tensor, k: int):
        if self.ref is not None and self.ref() is x and self.key == (x._version, k):
            return self.value
        return None

    def put(self, x: torch.Tensor, k: int, value):
        try:
            self.ref = weakref.ref(x)
        except TypeError:
            self.ref = None
            return
        self.key = (x._version, k)
        self.value = value

    def clear(self):
        self.ref = self.key = self.value = None


_SELECTION = _SelectionCache()

# Optional profiler: when a dict, the CPU path adds Top-K selection seconds / calls to it
# (the lab's decode benchmark ``benchmarks/stack_decode.py`` reads it to report the Top-K overhead).
PROFILE: dict | None = None


@register_sparse_module
class SparseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, keep: int, dtype=torch.float32, device=None,
                 mode: str = "topk", threshold: float = 0.0, backend: str = "torch"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.keep = int(keep)  # K: channels kept per token (mode "topk")
        self.mode = mode  # "topk" | "threshold" (TEAL) | "dense"
        self.threshold = float(threshold)
        self.backend = "torch"
        self.sparse_prefill = True  # False: tokens of a multi-token call run dense
        if backend != "torch":
            self.set_backend(backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, selector: Selector | int, **kw) -> "SparseLinear":
        """``linear``'s weights behind ``selector`` (:class:`~.topk.TopK`, :class:`~.topk.Threshold`,
        :class:`~.topk.Dense`; an int is ``TopK(k)``)."""
        backend = kw.pop("backend", "torch")
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.in_features,
                dtype=linear.weight.dtype, device=linear.weight.device, **kw)
        m.selector = TopK(int(selector)) if isinstance(selector, int) else selector
        m.weight.data.copy_(linear.weight.data)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.data)
        if backend != "torch":
            m.set_backend(backend)
        return m

    def spec(self) -> dict:
        return {"class": type(self).__name__, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "keep": self.keep, "mode": self.mode, "threshold": self.threshold,
                "sparse_prefill": self.sparse_prefill, "dtype": str(self.weight.dtype).replace("torch.", "")}

    @classmethod
    def from_spec(cls, spec: dict, device=None) -> "SparseLinear":
        m = cls(spec["in_features"], spec["out_features"], spec["bias"], spec["keep"],
                dtype=getattr(torch, spec.get("dtype", "float32")), device=device, mode=spec.get("mode", "topk"),
                threshold=spec.get("threshold", 0.0))
        m.sparse_prefill = spec.get("sparse_prefill", True)
        return m

    @property
    def selector(self) -> Selector:
        """What the module keeps of each token: ``TopK(keep)``, ``Threshold(threshold)`` or ``Dense()``
        (``mode``, ``keep`` and ``threshold`` are its serialised form, the artifact's spec)."""
        if self.mode == "threshold":
            return Threshold(self.threshold)
        return Dense() if self.mode == "dense" else TopK(self.keep)

    @selector.setter
    def selector(self, sel: Selector) -> None:
        if isinstance(sel, TopK):
            self.mode, self.keep = "topk", int(sel.k)
        elif isinstance(sel, Threshold):  # K is not used: the spec keeps the width there
            self.mode, self.keep, self.threshold = "threshold", self.in_features, float(sel.t)
        elif isinstance(sel, Dense):
            self.mode = "dense"
        else:
            raise TypeError(f"a selector is TopK, Threshold or Dense, not {type(sel).__name__}")

    @property
    def sparsity(self) -> float:
        return 1.0 - self.keep / self.in_features

    # -- layout / backend ----------------------------------------------------------------------

    @property
    def weight_t(self) -> torch.Tensor:
        """``Wᵀ [in, out]`` (contiguous once the kernel layout is set; a view, never a copy)."""
        return self.weight.t()

    @property
    def kernel_layout(self) -> bool:
        """True when ``weight`` is the transposed view of a contiguous ``[in, out]`` tensor."""
        return self.weight.t().is_contiguous()

    @torch.no_grad()
    def set_backend(self, backend: str) -> "SparseLinear":
        """Select the backend and lay the weight out for it (in place; returns ``self``)."""
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_BACKENDS)}")
        self.backend = backend
        self.weight = kernel_layout_weight(self.weight, backend != "torch")
        return self

    # -- forward ---------------------------------------------------------------------------------

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sparse_prefill and x.dim() >= 2 and x.shape[-2] > 1:
            return x
        return select(x, self.selector)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or x.dim() == 0:
            return False
        tokens = x.numel() // max(1, x.shape[-1])
        if tokens == 0 or tokens > 8:
            return False
        if x.dim() < 2 or x.shape[-2] == 1:
            return True  # decode steps
        # a short multi-token call: the kernel is exact only if the module sparsifies every token
        return self.mode == "dense" or (self.sparse_prefill and type(self).sparsify is SparseLinear.sparsify)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            return self._kernel_forward(x)
        return torch.nn.functional.linear(self.sparsify(x), self.weight, self.bias)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels import resolve_backend, sparse_linear, topk_select

        be = resolve_backend(self.backend, x.device)
        if be == "torch":
            return torch.nn.functional.linear(self.sparsify(x), self.weight, self.bias)
        if not self.kernel_layout:
            self.set_backend(self.backend)
        wt = self.weight.t()
        k = self.in_features if self.mode == "dense" else self.keep
        if self.mode == "threshold":
            return sparse_linear(x, wt, bias=self.bias, backend=be, threshold=self.threshold)
        if be == "cpu" and k < self.in_features:
            sel = _SELECTION.get(x, k)
            if sel is None:
                t0 = time.perf_counter() if PROFILE is not None else 0.0
                sel = topk_select(x, k, backend="cpu")
                if PROFILE is not None:
                    PROFILE["topk_s"] = PROFILE.get("topk_s", 0.0) + time.perf_counter() - t0
                    PROFILE["topk_calls"] = PROFILE.get("topk_calls", 0) + 1
                _SELECTION.put(x, k, sel)
            return sparse_linear(x, wt, bias=self.bias, backend=be, indices=sel[0], values=sel[1])
        tokens = x.numel() // self.in_features
        if be == "triton" and k < self.in_features and 1 <= tokens <= 8:
            from .kernels import triton_gemv

            xc = x.reshape(tokens, self.in_features).to(wt.dtype)
            # per-token thresholds, shared by q/k/v and gate/up; not while a CUDA graph is being captured (a
            # cached threshold computed outside the graph would be baked in as a stale constant)
            capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
            thr = None if capturing else _SELECTION.get(x, ("triton", k))
            if thr is None:
                thr = triton_gemv.topk_bounds(xc, k)  # (thr, cut): exactly k channels
                if not capturing:
                    _SELECTION.put(x, ("triton", k), thr)
            y = triton_gemv.sparse_gemv(xc, wt, self.bias, thr=thr)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return sparse_linear(x, wt, k, self.bias, backend=be)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, keep={self.keep}, mode={self.mode}, backend={self.backend}"


def kernel_layout_weight(weight: nn.Parameter, kernel: bool) -> nn.Parameter:
    """``weight [out, in]`` as the transposed view of a contiguous ``[in, out]`` tensor (``kernel``) or
    row-major; the same parameter when it already is, else one new parameter (one copy, no second)."""
    if kernel and not weight.t().is_contiguous():
        return nn.Parameter(weight.data.t().contiguous().t(), requires_grad=False)
    if not kernel and not weight.is_contiguous():
        return nn.Parameter(weight.data.contiguous(), requires_grad=False)
    return weight


def dense_kernel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        backend: str = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)``; decode calls (<= 8 tokens) of a kernel-layout weight on the CPU
    run our GEMV kernel at 0 % sparsity (no selection), which streams a bf16 weight faster than
    torch's GEMV on this class of CPU (``benchmarks/kernel_bench.py``).  Used for LaRoSA's residual
    adapters."""
    tokens = x.numel() // max(1, x.shape[-1])
    if backend != "torch" and 1 <= tokens <= 8 and x.device.type == "cpu" and weight.t().is_contiguous() \
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in (torch.float32, torch.bfloat16):
        from .kernels import resolve_backend, sparse_linear

        if resolve_backend(backend, x.device) == "cpu":
            return sparse_linear(x, weight.t(), weight.shape[1], bias, backend="cpu")
    return torch.nn.functional.linear(x, weight, bias)


# -- whole-model helpers -----------------------------------------------------------------------------


def sparse_linears(model: nn.Module) -> list[SparseLinear]:
    return [m for m in model.modules() if isinstance(m, SparseLinear)]
