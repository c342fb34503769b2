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
   compressed layer, and move the layer back.  Peak memory is one layer plus the cached activations.
3. **Checkpoint.** After each layer its state and the next layer's inputs are written atomically to
   a checkpoint directory; ``resume=True`` restores finished layers and continues bit-identically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .models.adapters import ModelAdapter
from .models.modality import modality_context, modality_ids


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
            mods.append(modality_ids(ids.cpu(), adapter.modality_token_ids))
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
    """Move every parameter and buffer outside the decoder layers to ``device``; return how to undo it."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return []
    in_layers = {id(m) for m in adapter.layers.modules()}
    moved = []
    for mod in model.modules():
        if id(mod) in in_layers:
            continue
        for name, p in mod._parameters.items():
            if p is not None and p.device != dev:
                moved.append((p, None, p.data))
                p.data = p.data.to(dev)
        for name, b in list(mod._buffers.items()):
            if b is not None and b.device != dev:
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

    @property
    def modality_ids(self) -> list[torch.Tensor]:
        return self.captured.modality

    def kwargs(self, j: int) -> dict:
        return _to(self.captured.layer_kwargs[j][self.index], self.device)

    def run(self, j: int, x: torch.Tensor | None = None) -> torch.Tensor:
        """Run this layer on sample ``j`` (or on ``x`` with sample ``j``'s kwargs); output on device."""
        x = self.inputs[j] if x is None else x
        with modality_context(self.captured.modality[j].to(self.device)):
            out = self.layer(x.to(self.device), **self.kwargs(j))
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def collect(self, modules: dict[str, nn.Module], fn: Callable[[str, torch.Tensor, torch.Tensor], None], inputs=None) -> None:
        """Run every sample through the layer and call ``fn(name, x, ids)`` with the input ``x``
        ``[1, L, in]`` of each named module (``ids`` are the sample's modality ids ``[1, L]``)."""
        inputs = self.inputs if inputs is None else inputs
        current = {}

        def hook(name):
            def h(mod, args):
                fn(name, args[0], current["ids"])
            return h

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        try:
            for j in range(len(inputs)):
                current["ids"] = self.captured.modality[j].to(self.device)
                self.run(j, inputs[j])
        finally:
            for h in handles:
                h.remove()


class Method:
    """A compression method over the engine.  Subclasses implement :meth:`step`."""

    name = "method"
    needs_fp_chain = False  # keep the uncompressed chain of activations (targets for learning)

    def config(self) -> dict:
        return {"method": self.name}

    def prepare(self, model: nn.Module, adapter: ModelAdapter, samples=None) -> None:
        """Called once before the first layer (``samples``: the calibration inputs)."""

    def step(self, ctx: LayerContext) -> None:
        raise NotImplementedError

    def layer_structure(self, layer: nn.Module) -> dict:
        """Specs of the modules this method put into ``layer`` (path -> spec), for resume/load."""
        from .export.serialization import module_specs

        return module_specs(layer)

    def rebuild_layer(self, layer: nn.Module, structure: dict) -> None:
        from .export.serialization import apply_specs

        apply_specs(layer, structure)

    def finalize(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """Called once after the last layer."""


def _atomic_save_tensors(tensors: dict, path: Path, meta: dict | None = None):
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _atomic_write_json(obj, path: Path):
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


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
) -> list[dict]:
    """Apply ``method`` to every decoder layer of ``model``; returns per-layer info dicts."""
    device = torch.device(device)
    model.eval()
    method.prepare(model, adapter, samples)
    captured = capture_inputs(model, adapter, samples, device=device, progress=progress)
    inputs = captured.hidden
    fp_inputs = list(inputs) if (method.needs_fp_chain or diagnostics is not None) else None
    layers = adapter.layers
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    fingerprint = _fingerprint(method, captured)
    if ckpt is not None:
        ckpt.mkdir(parents=True, exist_ok=True)
        state_path = ckpt / "state.json"
        if resume and state_path.exists():
            state = json.loads(state_path.read_text())
            if state.get("fingerprint") != fingerprint:
                raise RuntimeError(f"checkpoint in {ckpt} was made with another method, scheme or calibration set; "
                                   "remove it or run without --resume")
            start = state["next_layer"]
            for i in range(start):
                structure = json.loads((ckpt / f"layer_{i:04d}.json").read_text())
                method.rebuild_layer(layers[i], structure)
                layers[i].load_state_dict(load_file(str(ckpt / f"layer_{i:04d}.safetensors")), strict=True)
            acts = load_file(str(ckpt / "activations.safetensors"))
            inputs = [acts[f"x.{j}"] for j in range(len(captured))]
            if fp_inputs is not None:
                fp_inputs = [acts[f"fp.{j}"] for j in range(len(captured))]
        elif not resume:
            for p in ckpt.glob("*"):
                if p.is_file() and (p.name.startswith("layer_") or p.name in ("state.json", "activations.safetensors")):
                    p.unlink()
    infos: list[dict] = []
    bar = tqdm(range(start, len(layers)), desc=f"{method.name}", unit="layer", disable=not progress,
               initial=start, total=len(layers))
    for i in bar:
        layer = layers[i]
        orig_device = next(layer.parameters()).device
        layer.to(device)
        ctx = LayerContext(i, layer, adapter.at_layer(i), captured, inputs, device, fp_inputs=fp_inputs)
        with torch.no_grad():
            if fp_inputs is not None:
                ctx.fp_outputs = [ctx.run(j, fp_inputs[j]).to("cpu") for j in range(len(captured))]
        fp_layer = copy.deepcopy(layer) if diagnostics is not None else None
        method.step(ctx)
        if diagnostics is not None:
            diagnostics.layer(ctx, fp_layer)
            del fp_layer
        with torch.no_grad():
            outputs = [ctx.run(j).to("cpu") for j in range(len(captured))]
        if diagnostics is not None:
            diagnostics.accumulated(i, outputs, ctx.fp_outputs, captured.modality)
        inputs = [captured.after_layer(j, i, o) for j, o in enumerate(outputs)]
        if fp_inputs is not None:
            fp_inputs = [captured.after_layer(j, i, o) for j, o in enumerate(ctx.fp_outputs)]
        for mod in layer.modules():  # caches of dequantized weights are rebuilt on demand
            if hasattr(mod, "clear_cache"):
                mod.clear_cache()
        layer.to(orig_device)
        info = {"layer": i, **ctx.info}
        infos.append(info)
        if ckpt is not None:
            _atomic_write_json(method.layer_structure(layer), ckpt / f"layer_{i:04d}.json")
            _atomic_save_tensors({k: v.detach().cpu() for k, v in layer.state_dict().items()}, ckpt / f"layer_{i:04d}.safetensors")
            acts = {f"x.{j}": t for j, t in enumerate(inputs)}
            if fp_inputs is not None:
                acts.update({f"fp.{j}": t for j, t in enumerate(fp_inputs)})
            _atomic_save_tensors(acts, ckpt / "activations.safetensors")
            _atomic_write_json({"next_layer": i + 1, "fingerprint": fingerprint}, ckpt / "state.json")
            stop_after = os.environ.get("MMCOMPRESS_DEBUG_EXIT_AFTER_LAYER")
            if stop_after is not None and int(stop_after) == i:
                os._exit(137)  # simulate a killed process (used by the resume test)
        if on_layer_done is not None:
            on_layer_done(i, info)
    method.finalize(model, adapter)
    return infos


def _fingerprint(method: Method, captured: CapturedInputs) -> str:
    h = hashlib.sha256(json.dumps(method.config(), sort_keys=True, default=str).encode())
    for x in captured.hidden:
        h.update(x.float().numpy().tobytes()[:4096])
        h.update(str(tuple(x.shape)).encode())
    return h.hexdigest()[:16]


@contextmanager
def temporary_dir_for(output: str | os.PathLike):
    """Yield a temporary sibling directory that is renamed to ``output`` on success, removed on error."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
