"""Model surgery for rotated activation sparsity, and the modules it inserts.

Mode M (``merge_rotations``, merged, deployable; docs/methods.md).  Row convention
``y = x Wᵀ``; ``Q_l`` is layer l's basis, the residual stream of layer l lives in basis Q_l::

    readers  (q,k,v | gate,up):  W' = W diag(γ) Q_l          (γ of the norm that feeds them; norm γ → 1)
    writers  (o | down):         W' = Q_lᵀ W,  b' = b Q_l
    embedding                    E' = E Q_1   (and every module writing into the input embeddings:
                                               the vision merger's / audio tower's output projection)
    head                         H' = H diag(γ_f) Q_L      (final norm γ → 1; tied embeddings are untied)
    residual adapter after l:    r ← r A_l,  A_l = Q_lᵀ Q_{l+1}       (``ResidualAdaptedLayer``)

With no sparsity the merged model reproduces the original (computational invariance: RMS(rQ) =
RMS(r)Q).  All products are done in float64, then cast to the model dtype.

``column_scale=True`` (ours, not in the paper): after the merge, each block-input norm gets the
scale ``c = ‖W'_{:,i}‖₂ / mean_i ‖W'_{:,i}‖₂`` (column norms of its readers' merged weights, stacked)
and the readers become ``W' diag(1/c)``.  The product is unchanged, but Top-K on the norm's output now
ranks ``|x̃_i|·‖W'_{:,i}‖`` (the output energy each coordinate carries) instead of ``|x̃_i|``: the
weight-awareness that folding γ took away from the selection, at no run-time cost
(``benchmarks/sparsity_why.py``).

Mode R (``rotate_reference``, the published code's semantics): the residual stream is not rotated;
each block input norm becomes ``RotatedNorm`` = (γ ⊙ RMS(r))·Q_l and the readers become W Q_l, so
Top-K acts on (γ ⊙ RMS(r))·Q_l exactly as the reference's rotate → Top-K → unrotate simulation.

Gemma3 supports Mode R only: its sandwich norms (post_attention_layernorm / post_feedforward_layernorm)
apply γ ⊙ RMS(·) to each block *output* before the residual add.  RMS commutes with Q but γ does
not, so writing those outputs into a rotated residual stream needs an explicit d×d rotation after
each post-norm (two more GEMVs per layer): it is no longer a merge.
"""

from __future__ import annotations

import torch
from torch import nn

from ..specs import apply_specs, module_class, module_specs, register_sparse_module
from .linear import SparseLinear
from .topk import threshold_keep


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- modules -----------------------------------------------------------------------------------


@register_sparse_module
class ResidualAdaptedLayer(nn.Module):
    """A decoder layer followed by the residual adapter ``r ← r A_l`` (``A_l = Q_lᵀ Q_{l+1}``).

    ``residual_adapter`` is a bias-free linear holding ``A_lᵀ``: a float ``nn.Linear``, or, in a
    quantized artifact (``compress --recipe`` with a quantize step after LaRoSA), a packed 8-bit
    weight-only quantized linear (:func:`mmcompress.sparse.joint.quantize_residual_adapters`).
    Attribute access falls through to the wrapped layer (``wrapper.self_attn`` is
    ``wrapper.layer.self_attn``)."""

    def __init__(self, layer: nn.Module, hidden_size: int, adapter: bool = True, dtype=torch.float32, device=None):
        super().__init__()
        self.layer = layer
        self.hidden_size = hidden_size
        if adapter:
            self.residual_adapter = nn.Linear(hidden_size, hidden_size, bias=False, dtype=dtype, device=device)
            self.residual_adapter.weight.requires_grad_(False)
        else:
            self.residual_adapter = None

    adapter_backend = "torch"  # set_adapter_backend: "cpu"/"auto" runs decode steps on the GEMV kernel

    @property
    def float_adapter(self) -> bool:
        """Whether the adapter is a plain float ``nn.Linear`` (not a quantized module)."""
        return type(self.residual_adapter) is nn.Linear

    def set_adapter_backend(self, backend: str) -> None:
        """Lay a float adapter's weight out for the sparse kernels' dense GEMV (``backend != "torch"``)
        or back to row-major; the adapter stays an ``nn.Linear`` (same name, values, state_dict).  A
        quantized adapter runs its own (integer) forward."""
        from .linear import kernel_layout_weight

        self.adapter_backend = backend
        if self.residual_adapter is not None and self.float_adapter:
            a = self.residual_adapter
            a.weight = kernel_layout_weight(a.weight, backend != "torch")

    def _adapt(self, h):
        from .linear import dense_kernel_linear

        if not self.float_adapter:
            return self.residual_adapter(h)
        return dense_kernel_linear(h, self.residual_adapter.weight, None, self.adapter_backend)

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        if self.residual_adapter is None:
            return out
        if isinstance(out, tuple):
            return (self._adapt(out[0]),) + tuple(out[1:])
        return self._adapt(out)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("layer")
            if inner is None:
                raise
            return getattr(inner, name)

    def spec(self) -> dict:
        w = self.residual_adapter
        spec = {"class": type(self).__name__, "hidden_size": self.hidden_size, "adapter": w is not None,
                "dtype": None, "inner": module_specs(self.layer)}
        if w is not None and self.float_adapter:
            spec["dtype"] = _dtype_name(w.weight.dtype)
        elif w is not None:  # a quantized adapter describes itself
            spec["adapter_module"] = w.spec()
            spec["dtype"] = spec["adapter_module"].get("dtype")
        return spec

    @classmethod
    def from_spec_wrapping(cls, spec: dict, existing: nn.Module, device=None) -> "ResidualAdaptedLayer":
        apply_specs(existing, spec.get("inner", {}), device=device)
        dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else torch.float32
        quantized = spec.get("adapter_module")
        wrapper = cls(existing, spec["hidden_size"], spec["adapter"] and quantized is None, dtype=dtype, device=device)
        if quantized is not None:
            wrapper.residual_adapter = module_class(quantized["class"]).from_spec(quantized, device=device)
        return wrapper


@register_sparse_module
class RotatedNorm(nn.Module):
    """Mode R block input: ``u = norm(x) · Q`` (the norm keeps its γ; ``rotation`` holds Q)."""

    def __init__(self, norm: nn.Module, hidden_size: int, dtype=torch.float32, device=None):
        super().__init__()
        self.norm = norm
        self.hidden_size = hidden_size
        self.rotation = nn.Parameter(torch.eye(hidden_size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x):
        y = self.norm(x)
        return (y.to(self.rotation.dtype) @ self.rotation).to(y.dtype)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "hidden_size": self.hidden_size, "dtype": _dtype_name(self.rotation.dtype)}

    @classmethod
    def from_spec_wrapping(cls, spec: dict, existing: nn.Module, device=None) -> "RotatedNorm":
        return cls(existing, spec["hidden_size"], dtype=getattr(torch, spec["dtype"]), device=device)


@register_sparse_module
class ThresholdedActivation(nn.Module):
    """CATS: ``z = act(x)``, then ``z · 1[|z| ≥ t]`` (wraps the MLP's activation module; the comparison is
    :func:`~mmcompress.sparse.topk.threshold_keep`'s, as TEAL's)."""

    def __init__(self, act: nn.Module, threshold: float = 0.0):
        super().__init__()
        self.act = act
        self.threshold = float(threshold)
        self.sparse_prefill = True

    def forward(self, x):
        z = self.act(x)
        if not self.sparse_prefill and z.dim() >= 2 and z.shape[-2] > 1:
            return z
        return z * threshold_keep(z, self.threshold)

    def spec(self) -> dict:
        return {"class": type(self).__name__, "threshold": self.threshold, "sparse_prefill": self.sparse_prefill}

    @classmethod
    def from_spec_wrapping(cls, spec: dict, existing: nn.Module, device=None) -> "ThresholdedActivation":
        m = cls(existing, spec["threshold"])
        m.sparse_prefill = spec.get("sparse_prefill", True)
        return m


@register_sparse_module
class PrefillPolicySparseLinear(SparseLinear):
    """``SparseLinear`` that sparsifies only the last ``sparse_fraction`` of the tokens of a multi-token
    call (TEAL's evaluation protocol uses ½: the first half of a prefill stays dense)."""

    def __init__(self, *args, sparse_fraction: float = 0.5, **kw):
        super().__init__(*args, **kw)
        self.sparse_fraction = float(sparse_fraction)

    def sparsify(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.shape[-2] > 1:
            t = x.shape[-2]
            n = int(t * self.sparse_fraction)
            if n <= 0:
                return x
            return torch.cat([x[..., : t - n, :], super().sparsify(x[..., t - n :, :])], dim=-2)
        return super().sparsify(x)

    @classmethod
    def from_linear(cls, linear: nn.Linear, selector, sparse_fraction: float = 0.5, **kw):
        m = super().from_linear(linear, selector, **kw)
        m.sparse_fraction = float(sparse_fraction)
        return m

    def spec(self) -> dict:
        return {**super().spec(), "sparse_fraction": self.sparse_fraction}

    @classmethod
    def from_spec(cls, spec: dict, device=None):
        m = super().from_spec(spec, device=device)
        m.sparse_fraction = spec.get("sparse_fraction", 0.5)
        return m


# -- helpers -----------------------------------------------------------------------------------


def inner_layer(layer: nn.Module) -> nn.Module:
    return layer.layer if isinstance(layer, ResidualAdaptedLayer) else layer


def embedding_writers(model: nn.Module, adapter) -> list[nn.Linear]:
    """Linears whose outputs are scattered into the text decoder's input embeddings (multimodal
    towers' last projections).  In Mode M they must write in basis Q_1 as the embedding does."""
    out = []
    d = adapter.text_config.hidden_size
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or mod.out_features != d:
            continue
        if any(name.endswith(suffix) for suffix in adapter.embedding_writers):
            out.append(mod)
    return out


# float64 elements of one slice of a weight being rotated (32 MiB): a ``[V, d]`` embedding or head is
# rotated a slice of rows at a time, so the float64 copies never hold the whole matrix (twice)
ROTATE_CHUNK = 1 << 22


@torch.no_grad()
def rotate_rows(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """``w ← w diag(scale) Q`` in float64, cast back to ``w``'s dtype, in place: a slice of rows at a time
    (each row of the product depends on its own row of ``w`` alone)."""
    q = q.double()
    scale = None if scale is None else scale.double()[None, :]
    rows = max(1, ROTATE_CHUNK // max(1, w.shape[-1]))
    for r in range(0, w.shape[0], rows):
        part = w[r: r + rows].double()
        if scale is not None:
            part = part * scale
        w[r: r + rows] = (part @ q).to(w.dtype)


@torch.no_grad()
def _rotate_writer(linear: nn.Linear, q: torch.Tensor) -> None:
    """Output side: ``W' = Qᵀ W``, ``b' = b Q`` (``W`` a slice of columns at a time)."""
    w, q = linear.weight.data, q.double()
    cols = max(1, ROTATE_CHUNK // max(1, w.shape[0]))
    for c in range(0, w.shape[1], cols):
        w[:, c: c + cols] = (q.T @ w[:, c: c + cols].double()).to(w.dtype)
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.data.double() @ q).to(linear.bias.dtype))


@torch.no_grad()
def _rotate_reader(linear: nn.Linear, q: torch.Tensor, gamma: torch.Tensor | None = None) -> None:
    """Input side: ``W' = W diag(γ) Q`` (biases unchanged)."""
    rotate_rows(linear.weight.data, q, gamma)


def _groups(adapter, i: int):
    return {g.name: g for g in adapter.layer_groups(i)}


def _check_rotations(adapter, rotations):
    mats = rotations.matrices if hasattr(rotations, "matrices") else list(rotations)
    n = len(adapter.layers)
    if len(mats) != n:
        raise ValueError(f"{len(mats)} rotations for {n} decoder layers")
    d = adapter.text_config.hidden_size
    for q in mats:
        if tuple(q.shape) != (d, d):
            raise ValueError(f"rotation of shape {tuple(q.shape)} for hidden size {d}")
    return [q.double().cpu() for q in mats]


def supports_merged(adapter) -> tuple[bool, str]:
    why = adapter.sparsity_blocker or adapter.merged_blocker  # the adapter knows the family's structure
    return (False, why) if why else (True, "")


def _scale_readers(adapter, norm: nn.Module, readers: list[nn.Linear]) -> None:
    """``column_scale``: norm scale ← c, readers ← W' diag(1/c), c = stacked column norms / their mean."""
    w = torch.cat([lin.weight.data.double() for lin in readers])
    c = w.pow(2).sum(0).sqrt()
    c = c / c.mean()
    c = c.clamp(min=1e-6)
    for lin in readers:
        lin.weight.data.copy_((lin.weight.data.double() / c[None, :]).to(lin.weight.dtype))
    adapter.set_norm_scale(norm, c * adapter.norm_scale(norm))


@torch.no_grad()
def merge_rotations(model: nn.Module, adapter, rotations, adapter_dtype=None, column_scale: bool = False) -> nn.Module:
    """Mode M: fold every RMSNorm γ into its readers and merge the per-layer rotations into the weights
    (see the module docstring; ``column_scale`` there too).  In place; returns ``model``.  The same
    surgery one layer at a time is :func:`untie_head`, :func:`merge_layer` and :func:`merge_outside`."""
    ok, why = supports_merged(adapter)
    if not ok:
        raise NotImplementedError(f"merged mode is not supported for {adapter.family}: {why}")
    qs = _check_rotations(adapter, rotations)
    if any(isinstance(layer, ResidualAdaptedLayer) for layer in adapter.layers):
        raise ValueError("the model is already merged (ResidualAdaptedLayer found)")
    untie_head(model, adapter)
    n = len(adapter.layers)
    for i in range(n):
        merge_layer(adapter, i, qs[i], qs[i + 1] if i < n - 1 else None, column_scale=column_scale,
                    adapter_dtype=adapter_dtype)
    merge_outside(model, adapter, qs[0], qs[-1])
    return model


def untie_head(model: nn.Module, adapter) -> bool:
    """Give the output head its own weight (it will read ``H diag(γ_f) Q_L`` while the embedding holds
    ``E Q_1``); ``True`` if it was tied.  A streamed model's head stays on the meta device, read from the
    embedding's stored tensor when it is needed (``LayerStream.untie``)."""
    emb, head = adapter.embed_tokens, adapter.lm_head
    if head.weight is not emb.weight and (head.weight.is_meta or head.weight.data_ptr() != emb.weight.data_ptr()):
        return False
    stream = getattr(model, "_mmcompress_stream", None)
    w = head.weight
    head.weight = nn.Parameter(torch.empty_like(w, device="meta") if stream is not None else w.data.clone(),
                               requires_grad=False)
    for cfg in {id(c): c for c in (model.config, adapter.text_config)}.values():
        if hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys") and isinstance(model._tied_weights_keys, dict):
        model._tied_weights_keys = {}
    if stream is not None:
        stream.untie(model)
    return True


@torch.no_grad()
def merge_layer(adapter, i: int, q: torch.Tensor, q_next: torch.Tensor | None, *, column_scale: bool = False,
                adapter_dtype=None) -> "ResidualAdaptedLayer":
    """Mode M for decoder layer ``i`` alone: readers ``W diag(γ) Q_i`` (norm γ → 1), writers ``Q_iᵀ W``, and
    the layer wrapped with its residual adapter ``A_i = Q_iᵀ Q_{i+1}`` (none after the last layer,
    ``q_next=None``); the wrapper replaces the layer in ``adapter.layers`` and is returned."""
    layer = adapter.layers[i]
    if isinstance(layer, ResidualAdaptedLayer):
        raise ValueError("the model is already merged (ResidualAdaptedLayer found)")
    dev = next(layer.parameters()).device
    q = q.double().to(dev)
    groups = _groups(adapter, i)
    for gname in ("attn_in", "mlp_in"):
        g = groups[gname]
        norm = layer.get_submodule(g.producer)
        gamma = adapter.norm_scale(norm)
        for lin in g.modules(layer):
            _rotate_reader(lin, q, gamma)
        adapter.set_norm_scale(norm, torch.ones_like(gamma))
        if column_scale:
            _scale_readers(adapter, norm, g.modules(layer))
    for gname in ("attn_out", "mlp_out"):
        for lin in groups[gname].modules(layer):
            _rotate_writer(lin, q)
    adtype = adapter_dtype or adapter.embed_tokens.weight.dtype
    wrapped = ResidualAdaptedLayer(layer, adapter.text_config.hidden_size, adapter=q_next is not None, dtype=adtype,
                                   device=dev)
    if q_next is not None:  # r' ← r' A, A = Q_iᵀ Q_{i+1}; as a linear, weight = Aᵀ = Q_{i+1}ᵀ Q_i
        wrapped.residual_adapter.weight.data.copy_((q_next.double().to(dev).T @ q).to(adtype))
    adapter.layers[i] = wrapped
    return wrapped


@torch.no_grad()
def merge_outside(model: nn.Module, adapter, q_first: torch.Tensor, q_last: torch.Tensor) -> None:
    """Mode M outside the decoder layers: embedding ``E Q_1`` (and every module writing into the input
    embeddings), head ``H diag(γ_f) Q_L`` with the final norm's γ → 1 (run :func:`untie_head` first).  A
    streamed model's tensors are read from its checkpoint here and kept in memory until it is saved."""
    stream = getattr(model, "_mmcompress_stream", None)
    q_first, q_last = q_first.double().cpu(), q_last.double().cpu()
    emb, head = adapter.embed_tokens, adapter.lm_head
    writers = embedding_writers(model, adapter)
    owners = [model.get_submodule(p.rpartition(".")[0]) for p in adapter.embedding_matrices]
    if stream is not None:
        for mod in (emb, head, adapter.final_norm, *writers, *owners):
            stream.materialize(model, mod)
    rotate_rows(emb.weight.data, q_first)
    for lin in writers:
        _rotate_writer(lin, q_first)
    for path in adapter.embedding_matrices:  # features x @ P (MiniCPM-V's resampler): P' = P Q
        rotate_rows(model.get_parameter(path).data, q_first)
    gamma_f = adapter.norm_scale(adapter.final_norm)
    _rotate_reader(head, q_last, gamma_f)
    adapter.set_norm_scale(adapter.final_norm, torch.ones_like(gamma_f))


@torch.no_grad()
def rotate_reference(model: nn.Module, adapter, rotations) -> nn.Module:
    """Mode R: block-input norms become ``RotatedNorm`` (γ⊙RMS(r))·Q_l and readers W Q_l.  The
    residual stream, embedding and head are untouched.  In place; returns ``model``."""
    qs = _check_rotations(adapter, rotations)
    for i in range(len(adapter.layers)):
        rotate_reference_layer(adapter, i, qs[i])
    return model


@torch.no_grad()
def rotate_reference_layer(adapter, i: int, q: torch.Tensor) -> None:
    """Mode R for decoder layer ``i`` alone."""
    layer = inner_layer(adapter.layers[i])
    q = q.double().to(next(layer.parameters()).device)
    d = adapter.text_config.hidden_size
    groups = _groups(adapter, i)
    for gname in ("attn_in", "mlp_in"):
        g = groups[gname]
        rotate_block_input(layer, g, q, d)
        for lin in g.modules(layer):
            _rotate_reader(lin, q)


def block_input_norm(layer: nn.Module, group) -> nn.Module:
    """The norm that produces ``group``'s input (refused if it is already rotated)."""
    norm = layer.get_submodule(group.producer)
    if isinstance(norm, RotatedNorm):
        raise ValueError("the model is already rotated (RotatedNorm found)")
    return norm


def rotate_block_input(layer: nn.Module, group, q: torch.Tensor, hidden_size: int) -> RotatedNorm:
    """Wrap the norm that produces ``group``'s input so that it outputs ``norm(x)·Q`` (Mode R)."""
    norm = block_input_norm(layer, group)
    w = norm.weight
    rot_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    wrapped = RotatedNorm(norm, hidden_size, dtype=rot_dtype, device=w.device)
    wrapped.rotation.data.copy_(q.to(rot_dtype))
    layer.set_submodule(group.producer, wrapped)
    return wrapped
