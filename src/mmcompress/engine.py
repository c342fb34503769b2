"""The layer-by-layer calibration engine (one pass through the data, one decoder layer at a time).

1. **Capture.** Each decoder layer's ``forward`` is swapped for a recorder that stores its keyword
   arguments (attention mask, RoPE/M-RoPE embeddings, position ids — per layer, since e.g. Gemma3
   alternates sliding and global attention) and returns its input unchanged; a pre-hook on the
   final norm stops the forward.  Vision and audio towers run untouched; no FX tracing.  The input
   hidden states of layer 0 and the per-token modality ids of every sample are cached on the CPU.
   Since every layer's recorder is the identity, anything the model adds to the hidden states
   between two layers shows up as a difference of their recorded inputs (Qwen3-VL's deepstack adds
   visual features at the image positions after its first decoder layers); such injections are
   cached too and added back to the compressed chain (``CapturedInputs.after_layer``).
2. **Walk.** For each layer: move it to the compute device, give the method a
   :class:`LayerContext` (``step(ctx)``; ``ctx.inputs``, ``ctx.modality_ids``, helpers to run the
   layer and to collect linear inputs), then compute the inputs of the next layer with the
   compressed layer (the pass where the method's observers, ``observers(ctx)``, watch the layer's
   modules; :class:`Compose` runs several methods in one walk), and move the layer back.  Peak memory is one layer plus the cached activations.
   A streamed model (:mod:`mmcompress.streaming`, ``quantize``'s default) has its layers on the meta
   device: each is read from the checkpoint before its step and freed once its checkpoint file is
   written.  Under ``torchrun`` each rank captures and walks its own block of the samples, and methods
   combine their statistics through ``ctx.world`` (:mod:`mmcompress.distributed`); with a streamed model
   every rank reads each layer from the checkpoint itself, and rank 0 alone writes it.
3. **Checkpoint.**  After each layer its state is written (``layer_N.safetensors``, the module
   structure in the metadata; a streamed model writes it straight into the artifact it builds), then
   ``state.json`` naming it is replaced atomically: that rename is the one commit point, so a kill at
   any instant resumes from a consistent layer.  Activations are not written: ``resume=True`` captures
   the calibration inputs again, replays the finished layers (uncompressed chain from the input weights,
   compressed chain from the checkpointed layers) and continues bit-identically, if the fingerprint
   (model weights, full method configuration, calibration inputs) matches.  A run thus writes its
   layers once (plus the artifact), not one activation set per layer.  The directory is ours alone and
   locked while in use (:class:`fileio.CheckpointDir`).

**Side sets.**  Named sample sets that travel through the layers with the calibration set but are never
trained on (:class:`SideSet`): MASQuant's per-modality whitening set (``"whitening"``: the uncompressed
chain only) and the held-out report set of the diagnostics (``"heldout"``: both chains, so SQNR is
measured out of sample).  ``ctx.sides[name]`` is a :class:`LayerContext` over that set.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import fileio, finite
from .distributed import DistributedError, World, current as current_world
from .models.adapters import ModelAdapter
from .models.modality import ids_of_tokens, input_modality_ids, modality_context
from .specs import apply_specs, module_specs


class _StopForward(Exception):
    pass


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class CapturedInputs:
    """Cached layer inputs: per sample the hidden states, per-layer kwargs and modality ids."""

    hidden: list[torch.Tensor]  # per sample, [1, L, D] on CPU
    layer_kwargs: list[list[dict]]  # [sample][layer] -> kwargs (shared objects where identical)
    modality: list[torch.Tensor]  # per sample, [1, L] int8
    injections: list[dict[int, torch.Tensor]] = field(default_factory=list)  # [sample] -> {layer: added after it}

    def __len__(self) -> int:
        return len(self.hidden)

    def after_layer(self, j: int, i: int, out: torch.Tensor) -> torch.Tensor:
        """The input of layer ``i + 1`` for sample ``j`` given layer ``i``'s output ``out``."""
        add = self.injections[j].get(i) if self.injections else None
        return out if add is None else out + add.to(out.device, out.dtype)


HELDOUT = "heldout"  # the side set the diagnostics measure on


@dataclass
class SideSet:
    """A sample set carried through the layers next to the calibration set: ``fp`` is its uncompressed
    chain; ``inputs`` its compressed chain (``None`` when only the uncompressed one is needed)."""

    captured: CapturedInputs
    fp: list[torch.Tensor]
    inputs: list[torch.Tensor] | None = None

    def context(self, i: int, layer, adapter, device) -> "LayerContext":
        chain = self.fp if self.inputs is None else self.inputs
        return LayerContext(i, layer, adapter, self.captured, chain, device, fp_inputs=self.fp)

    def advance(self, i: int, fp_outputs, outputs=None) -> None:
        self.fp = [self.captured.after_layer(j, i, o) for j, o in enumerate(fp_outputs)]
        if self.inputs is not None:
            self.inputs = [self.captured.after_layer(j, i, o) for j, o in enumerate(outputs)]


class ReferenceCache:
    """What the uncompressed input model computes during a walk, kept for later walks over the same model
    and samples (``run_layerwise(reference_cache=...)``, ``quantize(reference_cache=...)``): the captured
    layer-0 inputs of each sample set, and the uncompressed chain of every context that keeps one (the
    held-out set of the diagnostics, a method's full-precision targets), layer by layer.  Several methods
    compared on one model (``mmcompress demo``: RTN, SmoothQuant, MASQuant on the same calibration and
    held-out sets) then run the towers and the uncompressed layers once instead of once per method.

    Entries are keyed by a digest of the whole input model (configuration and every parameter and buffer:
    :func:`_tensor_digest`, as the checkpoint fingerprint), of the samples (their tensors' bytes), the
    device and the dtype the layer ran in, so a changed model or sample set misses the cache instead of
    reading another run's activations.  A cached result is the one the first walk computed, so a later walk
    gives the same outputs bit for bit as if it had recomputed them (the computation is deterministic on
    the CPU).  Not used for a streamed model or under ``torchrun``.  Memory: one activation set per layer
    and per cached chain (omni-mini, 8 held-out samples of 192 tokens: about 100 MB)."""

    def __init__(self):
        self._captures: dict[tuple, CapturedInputs] = {}
        self._chains: dict[tuple, list[torch.Tensor]] = {}
        self.hits = 0  # cached results handed out (for tests and reports)

    def capture(self, key: tuple, compute: Callable[[], CapturedInputs]) -> CapturedInputs:
        if key in self._captures:
            self.hits += 1
            return self._captures[key]
        cap = self._captures[key] = compute()
        return cap

    def chain(self, key: tuple) -> list[torch.Tensor] | None:
        out = self._chains.get(key)
        if out is not None:
            self.hits += 1
        return out

    def keep_chain(self, key: tuple, outputs: list[torch.Tensor]) -> None:
        self._chains[key] = outputs


def _full_model_digest(model: nn.Module) -> str:
    """Configuration plus a digest of every parameter and buffer (towers and embeddings too: the capture
    runs them)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in model.state_dict(keep_vars=False).items():
        _tensor_digest(h, name, t)
    return h.hexdigest()[:32]


def _samples_digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        for k in sorted(s):
            v = s[k]
            if isinstance(v, torch.Tensor):
                _hash_tensor(h, k, v)
            else:
                h.update(f"{k}={v!r};".encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: ModelAdapter, samples, device="cpu", desc="capture",
                   progress: bool = True) -> CapturedInputs:
    """Run the model up to the decoder stack for every sample and record what the layers receive."""
    layers = adapter.layers
    n_layers = len(layers)
    hidden, all_kwargs, mods, injections = [], [], [], []
    per_sample: dict[int, dict] = {}

    def injected(i, hidden_states):  # what the model added after layer i - 1
        delta = hidden_states.detach() - per_sample["prev"]
        if bool(delta.ne(0).any()):
            per_sample["inject"][i - 1] = delta.to("cpu")

    def make_recorder(i):
        def recorder(hidden_states, *args, **kwargs):
            if i == 0:
                per_sample["hidden"] = hidden_states.detach().to("cpu")
            else:
                injected(i, hidden_states)
            per_sample["prev"] = hidden_states.detach()
            if args:  # positional extras are not expected from transformers decoder loops
                raise RuntimeError("decoder layer called with unexpected positional arguments")
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
            kwargs.pop("use_cache", None)
            per_sample["kwargs"].append(kwargs)
            return hidden_states

        return recorder

    def stop(module, args):
        injected(n_layers, args[0])
        raise _StopForward

    for i, layer in enumerate(layers):
        layer.forward = make_recorder(i)
    handle = adapter.final_norm.register_forward_pre_hook(stop)
    # Modules between the embedding and layer 0 (towers, embeddings) run on `device`.
    moved = _move_non_layer_modules(model, adapter, device)
    try:
        for sample in tqdm(samples, desc=desc, leave=False, disable=not progress or len(samples) < 4):
            per_sample.clear()
            per_sample["kwargs"] = []
            per_sample["inject"] = {}
            inputs = _to(dict(sample), device)
            try:
                model(**inputs, use_cache=False)
            except _StopForward:
                pass
            if len(per_sample["kwargs"]) != n_layers:
                raise RuntimeError(f"captured {len(per_sample['kwargs'])} of {n_layers} decoder layers")
            hidden.append(per_sample["hidden"])
            all_kwargs.append(_dedupe_kwargs(per_sample["kwargs"]))
            injections.append(dict(per_sample["inject"]))
            ids = sample.get("input_ids")
            if ids is None:
                ids = torch.zeros(per_sample["hidden"].shape[:2], dtype=torch.long)
            mods.append(input_modality_ids({**sample, "input_ids": ids.cpu()}, adapter.modality_token_ids))
    finally:
        handle.remove()
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
        _restore_modules(moved)
    per_sample.clear()
    return CapturedInputs(hidden, all_kwargs, mods, injections)


def _dedupe_kwargs(kwargs_per_layer: list[dict]) -> list[dict]:
    """Move kwargs to CPU once per distinct object (layers usually share them)."""
    cache: dict[int, object] = {}
    out = []
    for kw in kwargs_per_layer:
        d = {}
        for k, v in kw.items():
            if isinstance(v, (torch.Tensor, tuple, list)):
                key = id(v)
                if key not in cache:
                    cache[key] = _to(v, "cpu")
                d[k] = cache[key]
            else:
                d[k] = v
        out.append(d)
    return out


def _move_non_layer_modules(model, adapter, device):
    """Move every parameter and buffer outside the decoder layers to ``device``; return how to undo it.
    Tensors on the meta device stay there: a streamed model's final norm and head are not read for the
    capture pass (they have no data to move)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return []
    in_layers = {id(m) for m in adapter.layers.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in in_layers:
            continue
        for name, p in mod._parameters.items():
            if p is not None and not p.is_meta and p.device != dev:
                moved.append((p, None, p.data))
                p.data = p.data.to(dev)
        for name, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and b.device != dev:
                moved.append((mod, name, b))
                mod._buffers[name] = b.to(dev)
    return moved


def _restore_modules(moved):
    for owner, name, old in moved:
        if name is None:
            owner.data = old
        else:
            owner._buffers[name] = old


@dataclass
class LayerContext:
    """What a method's ``step`` sees for one decoder layer."""

    index: int
    layer: nn.Module
    adapter: ModelAdapter
    captured: CapturedInputs
    inputs: list[torch.Tensor]  # inputs of this layer (compressed chain), CPU
    device: torch.device
    fp_outputs: list[torch.Tensor] | None = None  # outputs of the uncompressed layer (if requested)
    fp_inputs: list[torch.Tensor] | None = None
    info: dict = field(default_factory=dict)  # per-layer metrics a method wants reported
    compute_dtype: torch.dtype | None = None  # set while the layer is upcast for a method's float32 math
    sides: dict[str, "LayerContext"] = field(default_factory=dict)  # side sets (see SideSet), this layer
    world: World = field(default_factory=World)  # the ranks sharing the calibration (mmcompress.distributed)
    sample_ids: range | None = None  # global indices of the samples in ``inputs`` (this rank's block)
    total_samples: int | None = None  # calibration samples over all ranks
    # What the method records about this layer for a resumed run (plain JSON values: a greedy search's
    # chosen levels, an installed threshold): checkpointed with the layer, given back to replayed()
    state: dict = field(default_factory=dict)
    fp_observed: bool = False  # the method's fp_observers watched the pass that computed fp_outputs

    @property
    def n_samples(self) -> int:
        """Calibration samples over all ranks (``len(inputs)`` in one process)."""
        return len(self.inputs) if self.total_samples is None else self.total_samples

    def local_index(self, j: int) -> int | None:
        """Position in ``inputs`` of global sample ``j``, ``None`` where another rank holds it."""
        ids = self.sample_ids if self.sample_ids is not None else range(len(self.inputs))
        return j - ids.start if j in ids else None

    @property
    def modality_ids(self) -> list[torch.Tensor]:
        return self.captured.modality

    def kwargs(self, j: int) -> dict:
        kw = _to(self.captured.layer_kwargs[j][self.index], self.device)
        return kw if self.compute_dtype is None else _cast_floating(kw, self.compute_dtype)

    def run(self, j: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """Run this layer on sample ``j`` (or on ``x`` with sample ``j``'s kwargs); output on device."""
        x = self.inputs[j] if x is None else x
        x = x.to(self.device) if self.compute_dtype is None else x.to(self.device, self.compute_dtype)
        with modality_context(self.captured.modality[j].to(self.device)):
            out = self.layer(x, **self.kwargs(j))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def collect(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor, torch.Tensor], None], inputs=None) -> None:
        """Run every sample through the layer and call ``fn(name, x, ids)`` with the input ``x``
        ``[1, L, in]`` of each named module (``ids`` are the sample's modality ids ``[1, L]``; for a
        module that sees a subset of the tokens, such as an MoE expert's linear, the ids of that subset
        as the module's caller narrowed them with ``modality_context``)."""
        self.watch([(m, functools.partial(fn, name)) for name, m in modules.items()], inputs)

    @torch.no_grad()
    def watch(self, observers, inputs=None, keep: bool = False) -> list[torch.Tensor] | None:
        """Run every sample (of ``inputs``, default ``self.inputs``) through the layer with ``observers``
        (``(module, fn(x, ids))``, as :meth:`collect`'s) hooked on the modules' inputs; the outputs (on the
        CPU) when ``keep``."""
        inputs = self.inputs if inputs is None else inputs
        current = {}

        def hook(fn):
            def h(mod, args):
                fn(args[0], ids_of_tokens(args[0], current["ids"]))
            return h

        handles = [m.register_forward_pre_hook(hook(fn)) for m, fn in observers]
        outputs = []
        try:
            for j in range(len(inputs)):
                current["ids"] = self.captured.modality[j].to(self.device)
                out = self.run(j, inputs[j])
                if keep:
                    outputs.append(out.to("cpu"))
        finally:
            for h in handles:
                h.remove()
        return outputs if keep else None


def _cast_floating(obj, dtype):
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_cast_floating(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj


class upcast_layer:
    """Run a method's step on a bf16/fp16 layer in float32, then return the layer to the model dtype.

    On entry every floating parameter and buffer of ``layer`` is cast to float32.  On exit a tensor that
    was there before gets its old dtype back; a tensor of a module the step created is cast to
    ``model_dtype`` unless the module lists it in ``float32_tensors`` (step sizes, smoothing vectors:
    kept in float32 whatever the model dtype, as a step on a bf16 layer would have made them)."""

    def __init__(self, layer: nn.Module, model_dtype: torch.dtype):
        self.layer, self.model_dtype = layer, model_dtype

    def _tensors(self):
        for mod in self.layer.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point():
                        yield mod, store, name, t

    def __enter__(self):
        self.before = {(id(mod), name): t.dtype for mod, _, name, t in self._tensors()}
        self._alive = list(self.layer.modules())  # ids stay unique while we hold the modules
        self._cast(lambda mod, name: torch.float32)
        return self

    def __exit__(self, *exc):
        keep = lambda mod, name: torch.float32 if name in getattr(mod, "float32_tensors", ()) else self.model_dtype
        self._cast(lambda mod, name: self.before.get((id(mod), name)) or keep(mod, name))
        for mod in self.layer.modules():  # dequantized-weight caches were made in float32
            if hasattr(mod, "clear_cache"):
                mod.clear_cache()
        del self._alive
        return False

    @torch.no_grad()
    def _cast(self, dtype_of) -> None:
        for mod, store, name, t in list(self._tensors()):
            dtype = dtype_of(mod, name)
            if t.dtype == dtype:
                continue
            if isinstance(t, nn.Parameter):
                store[name] = nn.Parameter(t.data.to(dtype), requires_grad=t.requires_grad)
            else:
                store[name] = t.to(dtype)


class Method:
    """A compression method over the engine.  Subclasses implement :meth:`step`."""

    name = "method"
    needs_fp_chain = False  # keep the uncompressed chain of activations (targets for learning)
    float32_math = False  # on a bf16/fp16 model, run step() on the layer upcast to float32 (see upcast_layer)
    side_sets: tuple[str, ...] = ()  # names of the side sets (see SideSet) this method can use
    distributed = False  # step() combines every statistic it gathers across ranks (ctx.world): torchrun-ready
    # Calibrates on the model it was given, then changes the layer: its observers watch the pass of the
    # unchanged layer (which computes the next layer's inputs), and observed() changes the layer.  The
    # activation chain it carries is thus the one of its input model (a sparsity method's dense chain),
    # in one pass per layer.  A resumed run replays it the same way: the chain goes through the unchanged
    # layer (read from the input weights), the observers hooked on, then replayed() (not observed()) with
    # the finished layer from the checkpoint.
    observe_then_change = False
    data_free = False  # step() reads no activations (no inputs, no observers): a Sequence keeps no chain for it
    # The layers it writes are final but for settings fixed in finalize() from what the whole walk saw
    # (LaRoSA's grid plan: the layers' K, in their module specs): no later step may share its walk.
    chooses_at_end = False
    # Layer i is finished by observed() of layer i + 1 (LaRoSA merged with basis "both": layer i's residual
    # adapter needs layer i + 1's rotation, fitted on that layer's own pass): the engine keeps layer i in
    # memory, unwritten, until then (ctx.layer of layer i's context is what it writes); the last layer's
    # observed() finishes that layer too.  Peak: two layers.  Such a method walks alone.
    lookahead = False

    def config(self) -> dict:
        return {"method": self.name}

    def prepare(self, model: nn.Module, adapter: ModelAdapter, samples=None) -> None:
        """Called once before the first layer (``samples``: the calibration inputs)."""

    def step(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def fp_observers(self, ctx: LayerContext) -> list[tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], None]]]:
        """Observers of the uncompressed pass: ``(module, fn(x, ids))``, hooked on ``module``'s input (``ids``
        as :meth:`LayerContext.collect` gives them) while the engine runs the calibration samples' uncompressed
        chain through the layer before :meth:`step` (``ctx.fp_inputs`` → ``ctx.fp_outputs``).  A step that takes
        its statistics on that chain gathers them here instead of in a pass of its own; it reads
        ``ctx.fp_observed`` to know whether the pass ran (it does not when a :class:`ReferenceCache` held the
        outputs).  Asked only when that pass will run."""
        return []

    def watch_fp_pass(self, ctx: LayerContext, collector) -> list:
        """:meth:`fp_observers` for a ``collector`` (``observers(layer)``, ``record(name, x, ids)``): remembered
        for ``ctx``'s step, which takes it back with :meth:`fp_collected`."""
        self._fp_pending = (ctx, collector)
        return collector.observers(ctx.layer)

    def fp_collected(self, ctx: LayerContext):
        """The collector that watched ``ctx``'s uncompressed pass, or ``None`` when that pass did not run (the
        step then gathers its statistics itself); forgotten either way."""
        pending, self._fp_pending = getattr(self, "_fp_pending", None), None
        return pending[1] if pending is not None and pending[0] is ctx and ctx.fp_observed else None

    def observers(self, ctx: LayerContext) -> list[tuple[nn.Module, str, Callable[[torch.Tensor], None]]]:
        """Observers of this layer: ``(module, "input" | "output", fn)``.  The engine hooks them on after
        :meth:`step` for the one pass that computes the next layer's inputs (every calibration sample
        through the stepped layer; ``fn`` gets the module's input or output tensor), removes them, then
        calls :meth:`observed`.  Observers see the calibration samples only, not side sets, and are not
        re-run when a resumed run replays finished layers."""
        return []

    def observed(self, ctx: LayerContext) -> None:
        """Called once this layer's observers have seen every calibration sample (a method may change the
        layer here, see ``observe_then_change``; a method that wraps the layer sets ``ctx.layer``)."""

    def first_inputs(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The first layer's inputs as the model this method leaves behind receives them (LaRoSA's merged
        mode rotates the embedding: ``x Q_1``); :class:`Sequence` applies it to the chains after this step."""
        return inputs

    @property
    def resumable(self) -> bool:
        """Whether a checkpointed run can be resumed (:func:`_replay_layer` rebuilds its chains)."""
        return True

    # replayed() runs or reads ctx.layer (a search chain through the layer it leaves): as a step before
    # another in a recipe, whose layer state between the two steps is not checkpointed, it cannot replay
    replay_uses_layer = False

    def layer_structure(self, layer: nn.Module) -> dict:
        """Specs of the modules this method put into ``layer`` (path -> spec), for resume/load."""
        return module_specs(layer)

    def rebuild_layer(self, layer: nn.Module, structure: dict) -> None:
        apply_specs(layer, structure)

    def planned_state(self, i: int, n: int, state: dict) -> dict:
        """The tensors finished layer ``i`` (of ``n``) will have, ``{name in the layer: (dtype, shape)}``, told
        from ``state``: those of another finished layer whose input had the same tensors.  A streamed run
        plans its whole artifact from the first finished layer (:class:`mmcompress.streaming.ArtifactLayout`);
        a layer that comes out otherwise is written twice.  Default: the same tensors."""
        return state

    def replay_unchanged(self, ctx: LayerContext) -> None:
        """A resumed run replays finished layer ``ctx.index``: the unchanged layer (the input weights) is
        ``ctx.layer``, before the finished one replaces it; a method that carries chains through it (a
        recipe's dense chain, :class:`Sequence`) advances them here."""

    def replayed(self, ctx: LayerContext) -> None:
        """A resumed run restored finished layer ``ctx.index`` from its checkpoint (``ctx.layer`` as the walk
        left it, on the device; ``ctx.inputs``: its inputs, before the pass that computes the next layer's;
        ``ctx.state``: what the walk recorded there for this layer): a method that carries something across
        the layers (a search's side chain, its choices, totals for its summary) rebuilds it here, as its
        step and observers had left it (an ``observe_then_change`` method: its observers have just watched
        the unchanged layer's pass, as in the walk).  The per-layer infos (``ctx.info``) come back from the
        checkpoint."""

    def finalize(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """Called once after the last layer."""

    def method_summary(self) -> dict | None:
        """What the method reports about the whole run once finalized (the caller saves it, e.g. as the
        description's ``method_summary``); ``None``: nothing."""
        return None


class _Steps(Method):
    """What :class:`Compose` and :class:`Sequence` share: the parts, their joined name, ``float32_math``
    (any part's) and ``distributed`` (every part's), and the config of every step."""

    def __init__(self, *methods: Method):
        if not methods:
            raise ValueError(f"{type(self).__name__} needs at least one method")
        ahead = [m.name for m in methods if getattr(m, "lookahead", False)]
        if ahead and len(methods) > 1:
            raise ValueError(f"{ahead[0]} finishes each layer after the next one's pass; it needs a walk of its own")
        self.methods = list(methods)
        self.name = "+".join(m.name for m in methods)
        self.float32_math = any(m.float32_math for m in methods)
        self.distributed = all(m.distributed for m in methods)

    def config(self) -> dict:
        return {"method": self.name, "steps": [m.config() for m in self.methods]}

    def planned_state(self, i: int, n: int, state: dict) -> dict:
        for m in self.methods:  # each part's change of the layer, in order
            state = m.planned_state(i, n, state)
        return state


class Compose(_Steps):
    """Several methods over one walk (one capture, one pass per layer): for each layer every method's
    :meth:`~Method.step` runs in order, then one pass feeds every method's observers.  ``needs_fp_chain``,
    ``float32_math`` and ``side_sets`` are the union of the parts'; ``distributed`` holds if it holds for all."""

    def __init__(self, *methods: Method):
        super().__init__(*methods)
        self.needs_fp_chain = any(m.needs_fp_chain for m in methods)
        self.side_sets = tuple(dict.fromkeys(s for m in methods for s in m.side_sets))

    def prepare(self, model, adapter, samples=None) -> None:
        for m in self.methods:
            m.prepare(model, adapter, samples)

    def step(self, ctx: LayerContext) -> None:
        for m in self.methods:
            m.step(ctx)

    def observers(self, ctx: LayerContext):
        return [o for m in self.methods for o in m.observers(ctx)]

    def observed(self, ctx: LayerContext) -> None:
        for m in self.methods:
            m.observed(ctx)

    def replay_unchanged(self, ctx: LayerContext) -> None:
        for m in self.methods:
            m.replay_unchanged(ctx)

    def replayed(self, ctx: LayerContext) -> None:
        for m in self.methods:
            m.replayed(ctx)

    def finalize(self, model, adapter) -> None:
        for m in self.methods:
            m.finalize(model, adapter)


class Sequence(_Steps):
    """Steps applied one after another, each to the model the previous ones left (a recipe: LaRoSA then
    W8A8), in ONE walk: one capture, and for each decoder layer every step in order.

    Step ``k`` sees exactly what a walk of its own over the model of steps ``1..k-1`` would give it.  Call
    ``c_k`` the activation chain of the model after steps ``1..k`` (``c_0``: the input model) and ``L^k``
    layer ``i`` after steps ``1..k``.  For layer ``i``, step ``k`` gets ``ctx.inputs = c_k`` and, if it
    ``needs_fp_chain``, ``ctx.fp_inputs = c_{k-1}`` with ``ctx.fp_outputs = L^{k-1}(c_{k-1})``; a step that
    observes then changes (``observe_then_change``: the sparsity methods) watches the pass of ``c_{k-1}``
    through ``L^{k-1}``.  Passes per layer: one per chain kept, each through the layer state between two
    steps (``L^k`` exists only then): ``c_k`` is kept when step ``k+1`` observes it or needs it as its
    full-precision chain, or step ``k`` reads it as its inputs.  So LaRoSA then RTN runs two passes per
    layer (the dense pass LaRoSA's PCA observes, the compressed pass that feeds the next layer; the
    separate walks ran the same two, in two walks), LaRoSA then SmoothQuant three (SmoothQuant's
    statistics are taken on the sparse model's chain, as its own walk would).  The engine carries the
    last chain (``c_n``, or ``c_{n-1}`` when the last step observes then changes); the others live here.
    Side sets are not supported.  A run resumes (:meth:`resumable`) when the only chain it keeps is the input
    model's ``c_0`` and its last step does not observe then change: a replay passes ``c_0`` through the
    input layer (step 1's observers hooked on, :meth:`replay_unchanged`) and the engine's chain through the
    finished layer; a chain through a layer state between two steps (``L^k``, ``0 < k < n``) cannot be
    rebuilt from the checkpoint, which holds ``L^n`` alone."""

    side_sets = ()

    def __init__(self, *methods: Method):
        super().__init__(*methods)
        early = [m.name for m in methods[:-1] if m.chooses_at_end]
        if early:
            raise ValueError(f"{early[0]} fixes its layers after the walk; the steps after it need a walk of their own")
        last = methods[-1]
        self.observe_then_change = last.observe_then_change
        n = len(methods)
        self._engine_chain = n - 1 if last.observe_then_change else n
        self.needs_fp_chain = False  # c_0 is kept here when a step needs it
        step = dict(enumerate(methods, 1))  # step[k] is step k
        self._kept = [k for k in range(self._engine_chain)
                      if step[k + 1].observe_then_change or step[k + 1].needs_fp_chain
                      or (k >= 1 and not step[k].observe_then_change and not step[k].data_free)]
        self._chains: dict[int, list] | None = None
        self._subs: dict[int, LayerContext] = {}
        self._replay = None

    @property
    def resumable(self) -> bool:
        """See the class docstring: no chain through a layer state between two steps, and no step before
        the last whose replay runs its own layer state (a greedy search's side chain)."""
        return (set(self._kept) <= {0} and self._engine_chain == len(self.methods)
                and all(m.resumable for m in self.methods)
                and not any(m.replay_uses_layer for m in self.methods[:-1]))

    def replay_unchanged(self, ctx: LayerContext) -> None:
        """Resume: ``c_0`` through the input layer ``L^0``, step 1's observers hooked on if it observes then
        changes (its random draws and moments, as the walk took them)."""
        if self._chains is None:
            self._chains = {k: list(ctx.inputs) for k in self._kept}
        self._replay = None
        if 0 in self._kept:
            m = self.methods[0]
            sub = self._sub(ctx, 0, step=1)
            self._replay = (sub, self._pass(ctx, 0, m.observers(sub) if m.observe_then_change else []))

    def replayed(self, ctx: LayerContext) -> None:
        """Resume: every step's :meth:`~Method.replayed` in order on its view of the finished layer (``ctx.layer``,
        ``L^n``), the first layer's inputs mapped as in :meth:`step`, then ``c_0`` advanced."""
        sub0, out0 = self._replay or (None, None)
        for k, m in enumerate(self.methods, 1):
            if m.observe_then_change:  # step 1 (see resumable): it watched c_0 in replay_unchanged
                sub0.layer = ctx.layer
                m.replayed(sub0)
            else:
                fp = k - 1 if m.needs_fp_chain else None  # k == 1 (see resumable)
                m.replayed(self._sub(ctx, k, fp, out0 if fp is not None else None, step=k))
            if ctx.index == 0:
                for j in [j for j in self._kept if j >= k]:
                    self._chains[j] = m.first_inputs(self._chains[j])
                ctx.inputs = m.first_inputs(ctx.inputs)  # the engine's chain is c_n (see resumable)
        if out0 is not None:
            self._chains[0] = [ctx.captured.after_layer(s, ctx.index, o) for s, o in enumerate(out0)]
        self._replay = None

    def prepare(self, model, adapter, samples=None) -> None:
        self._chains = None
        for m in self.methods:
            m.prepare(model, adapter, samples)

    def _chain(self, ctx: LayerContext, k: int) -> list:
        if k == self._engine_chain:
            return ctx.inputs
        return self._chains.get(k, [])  # not kept: a data-free step's, never read

    def _sub(self, ctx: LayerContext, k: int, fp: int | None = None, fp_outputs=None, *, step: int) -> LayerContext:
        """Step ``step``'s view of this layer: chain ``c_k`` as inputs, ``c_fp`` as the full-precision chain, its
        own part of the layer's resume state (``ctx.state[str(step)]``)."""
        from dataclasses import replace

        return replace(ctx, inputs=self._chain(ctx, k), fp_inputs=None if fp is None else self._chain(ctx, fp),
                       fp_outputs=fp_outputs, state=ctx.state.setdefault(str(step), {}))

    @torch.no_grad()
    def _pass(self, ctx: LayerContext, k: int, observers) -> list:
        """Chain ``c_k`` through the layer as it is now (``L^k``), observers hooked on; outputs on the CPU."""
        handles = _hook_observers(observers)
        try:
            return [ctx.run(j, x).to("cpu", x.dtype) for j, x in enumerate(self._chain(ctx, k))]
        finally:
            for h in handles:
                h.remove()

    def step(self, ctx: LayerContext) -> None:
        if self._chains is None:  # the first layer: every chain starts from the captured inputs
            self._chains = {k: list(ctx.inputs) for k in self._kept}
        steps = dict(enumerate(self.methods, 1))
        outs: dict[int, list] = {}
        self._subs = {}
        for k in range(1, len(self.methods) + 1):
            m, prev = steps[k], steps.get(k - 1)
            watching = prev is not None and not prev.observe_then_change  # step k-1's observers: on c_{k-1}
            if k - 1 in self._kept:  # advance c_{k-1} through L^{k-1}, the only time this layer state exists
                sub = self._sub(ctx, k - 1, step=k)
                self._subs[k] = sub
                if m.observe_then_change:
                    m.step(sub)
                obs = (prev.observers(self._subs[k - 1]) if watching else []) + \
                    (m.observers(sub) if m.observe_then_change else [])
                outs[k - 1] = self._pass(ctx, k - 1, obs)
                if watching:
                    prev.observed(self._subs[k - 1])
                if m.observe_then_change:
                    m.observed(sub)
            elif m.observe_then_change:  # the last step, on the engine's chain: hooked by observers()
                sub = self._subs[k] = self._sub(ctx, k - 1, step=k)
                m.step(sub)
            if not m.observe_then_change:
                fp = k - 1 if m.needs_fp_chain else None
                sub = self._subs[k] = self._sub(ctx, k, fp, outs.get(k - 1) if fp is not None else None, step=k)
                m.step(sub)
                if k < self._engine_chain and k not in self._kept:  # data-free: no pass over its chain
                    m.observed(sub)
            ctx.layer = sub.layer
            if ctx.index == 0:  # the chains after this step start from the inputs it maps
                for j in [j for j in self._kept if j >= k]:
                    self._chains[j] = m.first_inputs(self._chains[j])
                if self._engine_chain >= k:
                    ctx.inputs = m.first_inputs(ctx.inputs)
        for j, out in outs.items():
            self._chains[j] = [ctx.captured.after_layer(s, ctx.index, o) for s, o in enumerate(out)]

    def _last(self):
        n = len(self.methods)
        m, prev = self.methods[-1], self.methods[-2] if n > 1 else None
        return n, m, prev

    def observers(self, ctx: LayerContext):
        n, m, prev = self._last()
        if not m.observe_then_change:
            return m.observers(self._subs[n])
        watching = prev is not None and not prev.observe_then_change and n - 1 not in self._kept
        return (prev.observers(self._subs[n - 1]) if watching else []) + m.observers(self._subs[n])

    def observed(self, ctx: LayerContext) -> None:
        n, m, prev = self._last()
        if m.observe_then_change and prev is not None and not prev.observe_then_change and n - 1 not in self._kept:
            prev.observed(self._subs[n - 1])
        m.observed(self._subs[n])
        ctx.layer = self._subs[n].layer

    def finalize(self, model, adapter) -> None:
        for m in self.methods:
            m.finalize(model, adapter)
        self._chains, self._subs = None, {}


def _hook_observers(observers) -> list:
    """Register ``(module, "input" | "output", fn)`` observers; returns the hook handles."""
    handles = []
    for mod, where, fn in observers:
        if where == "input":
            handles.append(mod.register_forward_pre_hook(lambda m, args, fn=fn: fn(args[0])))
        elif where == "output":
            handles.append(mod.register_forward_hook(lambda m, args, out, fn=fn: fn(out)))
        else:
            raise ValueError(f"an observer watches a module's 'input' or 'output', not {where!r}")
    return handles


def _atomic_save_tensors(tensors: dict, path: Path, meta: dict | None = None):
    fileio.atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                                                    metadata=meta))


_CHECKPOINT_FILE = re.compile(r"(layer_\d{4}\.(safetensors|json)|acts_\d{4}\.safetensors|activations\.safetensors"
                              r"|state\.json|artifact\.json|artifact-model(-\d{5}-of-\d{5})?\.part)")


def is_checkpoint_file(name: str) -> bool:
    """A file name that :func:`run_layerwise` writes into a checkpoint directory."""
    return _CHECKPOINT_FILE.fullmatch(name) is not None


def run_layerwise(
    model: nn.Module,
    adapter: ModelAdapter,
    method: Method,
    samples,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_layer_done: Callable[[int, dict], None] | None = None,
    diagnostics=None,
    side_sets: dict[str, list] | None = None,
    world: World | None = None,
    reference_cache: ReferenceCache | None = None,
) -> list[dict]:
    """Apply ``method`` to every decoder layer of ``model``; returns per-layer info dicts.

    ``side_sets``: ``{name: samples}`` carried through the layers for the method (names it lists in
    ``method.side_sets``); ``diagnostics.samples`` (if set) becomes the ``"heldout"`` side set that the
    diagnostics measure on instead of the calibration samples.

    ``world`` (default: the initialised ``torch.distributed`` process group, else one process): every
    rank passes the same ``samples`` and runs its own block of them (:mod:`mmcompress.distributed`).

    ``reference_cache``: a :class:`ReferenceCache` shared by several walks over the same input model: the
    captures and the uncompressed chains come from it where an earlier walk computed them."""
    device = torch.device(device)
    model.eval()
    world = current_world() if world is None else world
    if world.size > 1:
        if not method.distributed:
            raise DistributedError(f"{method.name} does not support distributed calibration yet; run it in one process")
        if resume:
            raise DistributedError("--resume is not supported under torchrun yet")
        if checkpoint_dir is not None and getattr(model, "_mmcompress_stream", None) is None:
            raise DistributedError("checkpoints of a model in memory are not supported under torchrun yet (a "
                                   "streamed model's rank 0 keeps its finished layers in one, not resumable)")
        if diagnostics is not None:
            raise DistributedError("diagnostics (--report) are not supported under torchrun yet")
    if resume and method.lookahead:
        raise ValueError(f"{method.name} finishes each layer one layer late (LaRoSA merged, basis both), which "
                         "cannot be resumed; run without --resume")
    ckpt = checkpoint_dir
    if ckpt is not None and not isinstance(ckpt, fileio.CheckpointDir):
        ckpt = fileio.CheckpointDir(ckpt).open()
        own_lock = True
    else:
        own_lock = False
    try:
        return _run_layerwise(model, adapter, method, samples, device, ckpt, resume, progress, on_layer_done,
                              diagnostics, side_sets or {}, world, reference_cache)
    finally:
        if own_lock:
            ckpt.close()


def _run_layerwise(model, adapter, method, samples, device, ckpt, resume, progress, on_layer_done, diagnostics,
                   side_samples, world, cache=None):
    unknown = sorted(set(side_samples) - set(method.side_sets))
    if unknown:
        raise ValueError(f"{method.name} does not use the side set(s) {', '.join(unknown)}")
    if side_samples and world.size > 1:
        raise DistributedError("side sets (whitening or held-out samples) are not supported under torchrun yet")
    stream = getattr(model, "_mmcompress_stream", None)  # layers read from the checkpoint one at a time
    if stream is not None and ckpt is None and world.rank == 0:  # the other ranks free their layers unwritten
        raise ValueError("a streamed model needs a checkpoint directory (its finished layers are kept there)")
    # before any method touches it; not under torchrun, where a run cannot be resumed
    model_digest = _model_digest(model, adapter, stream) if ckpt is not None and world.size == 1 else None
    samples = list(samples)
    mine = world.block(len(samples)) if world.size > 1 else range(len(samples))
    method.prepare(model, adapter, samples)  # every rank sees every sample here (e.g. gradient probes)
    if stream is not None or world.size > 1:
        cache = None
    ref_key = (_full_model_digest(model), str(device)) if cache is not None else None

    def capture(ss, desc="capture"):
        run = lambda: capture_inputs(model, adapter, ss, device=device, desc=desc, progress=progress)
        return run() if cache is None else cache.capture((*ref_key, "capture", _samples_digest(ss)), run)

    captured = capture([samples[j] for j in mine])
    _count_tokens(model, world, sum(int(h.shape[1]) for h in captured.hidden))
    inputs = captured.hidden
    layers_path = finite.module_path(model, adapter.layers)
    finite.check_activations(inputs, f"at the input of decoder layer 0 ({layers_path}.0)")
    model_dtype = inputs[0].dtype if inputs else torch.float32
    held_out = diagnostics is not None and bool(getattr(diagnostics, "samples", None))
    fp_inputs = list(inputs) if (method.needs_fp_chain or (diagnostics is not None and not held_out)) else None
    # A data-free step (RTN) reads no activations: when nothing else reads the calibration chain either (no
    # uncompressed targets, the diagnostics on a held-out set or none) the layers are not run on it
    chain = not (method.data_free and fp_inputs is None and not method.observe_then_change)
    if not chain:
        inputs = []
    side_samples = dict(side_samples)
    if held_out:
        side_samples[HELDOUT] = diagnostics.samples
    sides: dict[str, SideSet] = {}
    for name, ss in side_samples.items():
        cap = capture(ss, f"capture {name}")
        finite.check_activations(cap.hidden, f"at the input of decoder layer 0 ({layers_path}.0), {name} set")
        sides[name] = SideSet(cap, list(cap.hidden), list(cap.hidden) if name == HELDOUT else None)
    if stream is not None:
        stream.release_non_layers(model, adapter)  # embeddings, towers: not needed after the captures
    layers = adapter.layers
    start, done_infos = 0, []
    if ckpt is not None:
        fingerprint = {"model": model_digest, "method": _method_digest(method, fp_inputs is not None),
                       "calibration": _calibration_digest(captured),
                       **{f"side set {n}": _calibration_digest(sd.captured) for n, sd in sorted(sides.items())}}
        ckdir = ckpt.path
        state_path = ckdir / "state.json"
        if resume and state_path.exists():
            state = json.loads(state_path.read_text())
            _check_fingerprint(state.get("fingerprint"), fingerprint, ckdir)
            start = state["next_layer"]
            done_infos = [state.get("infos", {}).get(str(i), {"layer": i}) for i in range(start)]
            if start and not method.resumable:
                raise RuntimeError(f"{method.name} runs cannot be resumed (a chain it calibrates on passes through a "
                                   "layer state the checkpoint does not hold); run without --resume")
            # no activations are kept on disk: replay the finished layers to recompute them
            for i in tqdm(range(start), desc="resume", unit="layer", disable=not progress or start < 2):
                structure, tensors = _finished_layer(ckdir, state, i, fingerprint, adapter)
                inputs, fp_inputs = _replay_layer(i, layers, adapter, method, captured, inputs, fp_inputs, sides,
                                                  device, world, mine, len(samples), model_dtype, structure, tensors,
                                                  stream, state.get("states", {}).get(str(i), {}), chain)
        else:  # start afresh: our files only
            if resume:
                print(f"nothing to resume in {ckdir} (no layer was finished): starting from the first layer",
                      file=sys.stderr)
            for p in ckdir.iterdir():
                if p.is_file() and is_checkpoint_file(p.name):
                    p.unlink()
        fp_json = json.dumps(fingerprint, sort_keys=True)
    infos: list[dict] = list(done_infos)  # a resumed run's finished layers come back from state.json
    chain_keys = {None: _samples_digest([samples[j] for j in mine]),
                  **{n: _samples_digest(ss) for n, ss in side_samples.items()}} if cache is not None else {}

    def finish(i, ctx, orig_device):  # layer i is done: back to its device, committed, freed if streamed
        layer = ctx.layer
        for mod in layer.modules():  # caches of dequantized weights are rebuilt on demand
            if hasattr(mod, "clear_cache"):
                mod.clear_cache()
        layer.to(orig_device)
        info = {"layer": i, **ctx.info}
        infos.append(info)
        if ckpt is not None:
            _commit_layer(ckdir, i, layer, method, fingerprint, fp_json, stream, info, ctx.state)
        if stream is not None:  # written to the artifact (or layer_i.safetensors): free it
            layer.to("meta")
            stream.released_layer(i)
        if on_layer_done is not None:
            on_layer_done(i, info)

    held = None  # a lookahead method's layer waiting for the next one: (index, context, device)
    bar = tqdm(range(start, len(layers)), desc=f"{method.name}", unit="layer", disable=not progress,
               initial=start, total=len(layers))
    for i in bar:
        layer, orig_device, ctx = _open_layer(i, layers, adapter, stream, device, captured, inputs, fp_inputs,
                                              world, mine, len(samples))
        ad = ctx.adapter
        ctx.sides = {n: sd.context(i, layer, ad, device) for n, sd in sides.items()}
        fp_layer = copy.deepcopy(layer) if diagnostics is not None else None
        upcast = upcast_layer(layer, model_dtype) if method.float32_math and model_dtype != torch.float32 else None
        contexts = [ctx, *ctx.sides.values()]
        to_keep = _cached_chains(cache, ref_key, chain_keys, layer, i, contexts, [None, *ctx.sides],
                                 upcast is not None) if cache is not None else []
        if upcast is not None:
            upcast.__enter__()
            for c in contexts:
                c.compute_dtype = torch.float32
        watch = method.fp_observers(ctx) if ctx.fp_inputs is not None and ctx.fp_outputs is None else []
        _fp_outputs(contexts, watch)
        method.step(ctx)
        if upcast is not None:
            upcast.__exit__(None, None, None)
        _end_fp32(contexts, model_dtype if upcast is not None else None)
        for key, c in to_keep:
            cache.keep_chain(key, list(c.fp_outputs))
        layer = ctx.layer  # a step may wrap the layer (a recipe's LaRoSA step adds the residual adapter)
        finite.check_module(layer, f"the {method.name} result", prefix=f"{layers_path}.{i}")
        dctx = ctx.sides.get(HELDOUT, ctx)  # diagnostics: on the held-out set when there is one
        known = {}  # outputs the diagnostics already computed (same layer, same inputs)
        if diagnostics is not None:
            known[HELDOUT if dctx is not ctx else None] = diagnostics.layer(dctx, fp_layer)
            del fp_layer
        outputs, side_outputs = _outputs(ctx, sides, method, known, chain)
        method.observed(ctx)
        if method.observe_then_change or ctx.layer is not layer:
            layer = ctx.layer
            finite.check_module(layer, f"the {method.name} result", prefix=f"{layers_path}.{i}")
        finite.check_activations(outputs, f"at the output of decoder layer {i} ({layers_path}.{i})")
        if diagnostics is not None:
            d_out = outputs if dctx is ctx else side_outputs[HELDOUT]
            diagnostics.accumulated(i, d_out, dctx.fp_outputs, dctx.captured.modality)
        inputs, fp_inputs = _advance(ctx, sides, outputs, side_outputs, fp_inputs)
        if getattr(method, "lookahead", False):  # observed() finished the layer held before this one; hold this one
            if held is not None:
                finite.check_module(held[1].layer, f"the {method.name} result", prefix=f"{layers_path}.{held[0]}")
                finish(*held)
            held = (i, ctx, orig_device)
            if i + 1 < len(layers):
                continue
            held = None
        finish(i, ctx, orig_device)
    method.finalize(model, adapter)
    return infos


def _count_tokens(model: nn.Module, world: World, tokens: int) -> None:
    """Add the calibration tokens each rank pushed through the layers to ``model._mmcompress_rank_tokens``."""
    per_rank = world.gather_ints(tokens)
    old = getattr(model, "_mmcompress_rank_tokens", None)
    if old is not None and len(old) == len(per_rank):
        per_rank = [a + b for a, b in zip(old, per_rank)]
    model._mmcompress_rank_tokens = per_rank


def _commit_layer(ckdir: Path, i: int, layer, method, fingerprint: dict, fp_json: str, stream=None,
                  info: dict | None = None, resume_state: dict | None = None) -> None:
    """Write layer ``i``'s state, then commit it by replacing ``state.json``.  The activations are not
    written: a resumed run recomputes them through the finished layers (:func:`_replay_layer`), so the
    bytes a run writes are its layers, not its layers plus one activation set per layer.  A streamed
    model's stream may write the layer into the artifact it is building instead (``stream.write_layer``,
    which plans it from this layer and ``method.planned_state``: then the layer is written once in the
    whole run)."""
    structure = json.dumps(method.layer_structure(layer), sort_keys=True)
    old = ckdir / "state.json"
    prev = json.loads(old.read_text()) if i and old.exists() else {}
    place = stream.write_layer(ckdir, i, layer, method) if stream is not None and hasattr(stream, "write_layer") \
        else None
    if place is None:
        _atomic_save_tensors({k: v.detach().cpu() for k, v in layer.state_dict().items()},
                             ckdir / f"layer_{i:04d}.safetensors", {"structure": structure, "fingerprint": fp_json})
    structures = prev.get("structures", {})
    if place is not None:  # no layer file to carry it
        structures = {**structures, str(i): structure}
    infos = {**prev.get("infos", {}), str(i): json.loads(json.dumps(info or {"layer": i}, default=str))}
    states = prev.get("states", {})
    if resume_state:  # what the method recorded for a resumed run (LayerContext.state)
        states = {**states, str(i): json.loads(json.dumps(resume_state))}
    state = {"next_layer": i + 1, "fingerprint": fingerprint, "where": {**prev.get("where", {}), str(i): place or "file"},
             "structures": structures, "infos": infos, **({"states": states} if states else {})}
    fileio.step(f"checkpoint.layer:{i}")
    fileio.atomic_write_json(ckdir / "state.json", state, indent=1, sort_keys=True)
    fileio.step(f"checkpoint.state:{i}")


def _finished_layer(ckdir: Path, state: dict, i: int, fingerprint: dict, adapter: ModelAdapter):
    """``(structure, tensors)`` of finished layer ``i`` from its checkpoint file (or the stream's artifact)."""
    if state.get("where", {}).get(str(i), "file") == "artifact":  # written into a streamed run's artifact
        prefix = adapter.layer_prefix(i) + "."
        tensors = {}
        for part in json.loads((ckdir / "artifact.json").read_text())["parts"]:
            with safe_open(str(ckdir / part), "pt") as f:
                tensors.update({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        return json.loads(state["structures"][str(i)]), tensors
    with safe_open(str(ckdir / f"layer_{i:04d}.safetensors"), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    _check_fingerprint(json.loads(meta.get("fingerprint", "null")), fingerprint, ckdir)
    return json.loads(meta["structure"]), tensors


def _cached_chains(cache, ref_key, chain_keys, layer, i, contexts, names, upcast: bool) -> list:
    """Set ``fp_outputs`` of the contexts whose uncompressed chain ``cache`` holds for layer ``i`` (the layer
    as it is now, before the step); return ``(key, context)`` for the others, to keep once computed."""
    lh = hashlib.sha256()
    for name, t in layer.state_dict().items():
        _tensor_digest(lh, name, t)
    missing = []
    for c, n in zip(contexts, names):
        if c.fp_inputs is None:
            continue
        key = (*ref_key, "chain", chain_keys[n], i, lh.hexdigest()[:32], upcast)
        got = cache.chain(key)
        if got is None:
            missing.append((key, c))
        else:
            c.fp_outputs = list(got)
    return missing


def _fp_outputs(contexts, watch=()) -> None:
    """The uncompressed layer's outputs on every context that keeps an uncompressed chain (and has not
    got them yet: from a :class:`ReferenceCache`); ``watch``: the method's :meth:`~Method.fp_observers`, hooked
    on for the first context's (the calibration samples') pass."""
    with torch.no_grad():
        for n, c in enumerate(contexts):
            if c.fp_inputs is not None and c.fp_outputs is None:
                observers = list(watch) if n == 0 else []
                c.fp_outputs = c.watch(observers, c.fp_inputs, keep=True)
                c.fp_observed = bool(observers)


def _end_fp32(contexts, model_dtype) -> None:
    for c in contexts:
        c.compute_dtype = None
        if model_dtype is not None and c.fp_outputs is not None:
            c.fp_outputs = [t.to(model_dtype) for t in c.fp_outputs]


@torch.no_grad()
def _outputs(ctx, sides, method=None, known=None, chain: bool = True):
    """The stepped layer's outputs on the calibration samples (``method``'s observers hooked on; none
    without a calibration ``chain``) and on the side sets that keep a compressed chain; ``known``: ``{side
    name, or None for the calibration set: outputs}`` already computed on the same inputs (the
    diagnostics'), reused unless observers must see the pass."""
    known = known or {}
    observers = method.observers(ctx) if method is not None else []
    if not chain:
        outputs = []
    elif None in known and not observers:
        outputs = known[None]
    else:
        handles = _hook_observers(observers)
        try:
            outputs = [ctx.run(j).to("cpu") for j in range(len(ctx.captured))]
        finally:
            for h in handles:
                h.remove()
    side_outputs = {n: (known[n] if n in known else [c.run(j).to("cpu") for j in range(len(c.inputs))])
                    if sides[n].inputs is not None else None for n, c in ctx.sides.items()}
    return outputs, side_outputs


def _advance(ctx, sides, outputs, side_outputs, fp_inputs):
    """The inputs of the next layer (compressed chain, uncompressed chain, side sets)."""
    i, captured = ctx.index, ctx.captured
    inputs = [captured.after_layer(j, i, o) for j, o in enumerate(outputs)]
    if fp_inputs is not None:
        fp_inputs = [captured.after_layer(j, i, o) for j, o in enumerate(ctx.fp_outputs)]
    for n, sd in sides.items():
        sd.advance(i, ctx.sides[n].fp_outputs, side_outputs[n])
    return inputs, fp_inputs


def _open_layer(i, layers, adapter, stream, device, captured, inputs, fp_inputs, world, mine, total, state=None):
    """Layer ``i`` read (streamed) and moved to ``device``: ``(layer, its original device, its context)``."""
    layer = layers[i]
    if stream is not None:
        stream.load_layer(i, layer)
    orig_device = next(layer.parameters()).device
    layer.to(device)
    ctx = LayerContext(i, layer, adapter.at_layer(i), captured, inputs, device, fp_inputs=fp_inputs, world=world,
                       sample_ids=mine, total_samples=total, state={} if state is None else state)
    return layer, orig_device, ctx


def _replay_layer(i, layers, adapter, method, captured, inputs, fp_inputs, sides, device, world, mine, total,
                  model_dtype, structure, tensors, stream, state, chain: bool = True):
    """Resume: recompute what finished layer ``i`` passed on, as the walk computed it, and leave the finished
    layer in place (a streamed one freed).  Through the input weights: the uncompressed chain (in float32
    where the method's step ran there), and the chain of a method that observes then changes (its
    observers hooked on, as in the walk); through the checkpointed layer: the compressed chain.  The
    method's :meth:`~Method.replay_unchanged` sees the input layer, :meth:`~Method.replayed` the finished
    one, with ``ctx.state`` as the walk recorded it (``state``)."""
    layer, orig_device, ctx = _open_layer(i, layers, adapter, stream, device, captured, inputs, fp_inputs, world,
                                          mine, total, state)
    ad = ctx.adapter
    ctx.sides = {n: sd.context(i, layer, ad, device) for n, sd in sides.items()}
    contexts = [ctx, *ctx.sides.values()]
    if any(c.fp_inputs is not None for c in contexts):
        upcast = upcast_layer(layer, model_dtype) if method.float32_math and model_dtype != torch.float32 else None
        if upcast is not None:
            upcast.__enter__()
            for c in contexts:
                c.compute_dtype = torch.float32
        _fp_outputs(contexts)
        if upcast is not None:
            upcast.__exit__(None, None, None)
        _end_fp32(contexts, model_dtype if upcast is not None else None)
    outputs = side_outputs = None
    if method.observe_then_change:  # the walk's chain went through the unchanged layer, observed
        outputs, side_outputs = _outputs(ctx, sides, method)
    method.replay_unchanged(ctx)
    layer.to(orig_device)
    layer = _rebuild_finished(layers, i, layer, method, structure)
    layer.load_state_dict(tensors, strict=True)
    layer.to(device)
    for c in contexts:
        c.layer = layer
    method.replayed(ctx)
    if outputs is None:
        outputs, side_outputs = _outputs(ctx, sides, chain=chain)
    inputs, fp_inputs = _advance(ctx, sides, outputs, side_outputs, fp_inputs)
    for mod in layer.modules():
        if hasattr(mod, "clear_cache"):
            mod.clear_cache()
    layer.to(orig_device)
    if stream is not None:
        layer.to("meta")
        stream.released_layer(i)
    return inputs, fp_inputs


def _rebuild_finished(layers, i: int, layer, method, structure: dict):
    """The finished layer's modules from their specs; a wrapper of the whole layer (path ``""``: LaRoSA's
    residual adapter) takes the layer's place in ``layers``."""
    if "" in structure:
        apply_specs(layers, {str(i): structure[""]})
        return layers[i]
    method.rebuild_layer(layer, structure)
    return layer


def _check_fingerprint(found, expected: dict, ckdir: Path) -> None:
    if found == expected:
        return
    if not isinstance(found, dict):
        raise RuntimeError(f"checkpoint in {ckdir} was made by another mmcompress version; "
                           "remove it or run without --resume")
    what = {"model": "another model", "method": "another method or method configuration",
            "calibration": "another calibration set"}
    diff = [what.get(k, k) for k in expected if found.get(k) != expected[k]]
    raise RuntimeError(f"checkpoint in {ckdir} was made with {' and '.join(diff)}; remove it or run without --resume")


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


_DIGEST_ELEMENTS = 1 << 16


def _tensor_digest(h, name: str, t: torch.Tensor) -> None:
    """All bytes of a small tensor; of a large one, two interleaved strided samples of 64 Ki elements
    each (milliseconds per tensor; any other model — a fine-tune, another seed — differs there)."""
    t = t.detach()
    flat = t.reshape(-1)
    if flat.numel() <= 2 * _DIGEST_ELEMENTS:
        _hash_tensor(h, name, t)
        return
    step = -(-flat.numel() // _DIGEST_ELEMENTS)
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    _hash_tensor(h, name, flat[::step])
    _hash_tensor(h, name, flat[step // 2::step])


def _model_digest(model: nn.Module, adapter: ModelAdapter, stream=None) -> str:
    """Hash of the configuration plus a digest of every decoder layer's tensors (of a streamed model:
    read from its checkpoint one layer at a time)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for i, layer in enumerate(adapter.layers):
        lh = hashlib.sha256()
        state = layer.state_dict() if stream is None else {**layer.state_dict(), **stream.layer_state(i)}
        for name, t in state.items():
            _tensor_digest(lh, name, t)
        h.update(f"layer{i}:{lh.hexdigest()};".encode())
        if stream is not None:
            del state
            stream.released_layer(i)
    return h.hexdigest()[:32]


def _method_digest(method: Method, fp_chain: bool) -> str:
    """The method's configuration and every plain attribute of it (a seed a config() forgot counts too)."""
    def plain(v) -> bool:  # JSON all the way down (a recipe's list of step objects is not: its config() is)
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return isinstance(v, (int, float, str, bool, type(None)))

    attrs = {k: v for k, v in sorted(vars(method).items()) if not k.startswith("_") and plain(v)}
    blob = json.dumps({"class": f"{type(method).__module__}.{type(method).__qualname__}", "config": method.config(),
                       "attrs": attrs, "fp_chain": fp_chain}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _calibration_digest(captured: CapturedInputs) -> str:
    """Hash of every captured layer-0 input, its layer-0 keyword tensors and its modality ids."""
    h = hashlib.sha256()

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            _hash_tensor(h, prefix, obj)
        elif isinstance(obj, (tuple, list)):
            for k, o in enumerate(obj):
                walk(f"{prefix}.{k}", o)
        elif isinstance(obj, dict):
            for k in sorted(obj):
                walk(f"{prefix}.{k}", obj[k])
        elif isinstance(obj, (int, float, str, bool, type(None))):
            h.update(f"{prefix}={obj!r};".encode())

    for j in range(len(captured)):
        walk(f"x{j}", captured.hidden[j])
        walk(f"m{j}", captured.modality[j])
        walk(f"kw{j}", captured.layer_kwargs[j][0] if captured.layer_kwargs[j] else {})
    return h.hexdigest()[:32]
