"""Artifacts are plain files: ``config.json`` + ``model.safetensors`` + ``mmcompress.json``.

``mmcompress.json`` records what was done (method, scheme, calibration summary) and, for every
module that a method replaced, a spec from which :func:`load` rebuilds the module before loading its
weights.  Nothing is unpickled: weights are safetensors, descriptions are JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from ..engine import temporary_dir_for
from ..quant.linear import QUANT_MODULES

FORMAT_VERSION = 1
MANIFEST = "mmcompress.json"
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def _register_all() -> None:
    """Import every module that defines compressed module classes (they register themselves)."""
    from ..quant import deployed, methods  # noqa: F401  (MASLinear, IntLinear)
    from ..sparse import merge  # noqa: F401  (ResidualAdaptedLayer, RotatedNorm, ...)
    from ..sparse.methods import wina  # noqa: F401  (WinaLinear)


def _compressed_module_types() -> tuple[type, ...]:
    from ..sparse.registry import SPARSE_MODULES

    _register_all()
    return tuple(QUANT_MODULES.values()) + tuple(SPARSE_MODULES.values())


def module_specs(root: nn.Module) -> dict[str, dict]:
    """``{path: spec}`` of every compressed module under ``root`` (outermost ones only)."""
    types = _compressed_module_types()
    specs: dict[str, dict] = {}
    for name, mod in root.named_modules():
        if isinstance(mod, types) and not any(name.startswith(p + ".") for p in specs):
            specs[name] = mod.spec()
    return specs


def _module_class(name: str):
    from ..sparse.registry import SPARSE_MODULES

    _register_all()
    registry = {**QUANT_MODULES, **SPARSE_MODULES}
    if name not in registry:
        raise ValueError(f"unknown module class {name!r} in {MANIFEST}; is this artifact from a newer mmcompress?")
    return registry[name]


def apply_specs(root: nn.Module, specs: dict[str, dict], device=None) -> None:
    """Replace the modules at the given paths by fresh compressed modules built from their specs.

    A class with ``from_spec_wrapping(spec, existing, device)`` wraps the module that is already at
    the path (e.g. a decoder layer plus a residual adapter) instead of building one from scratch."""
    for path, spec in specs.items():
        cls = _module_class(spec["class"])
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        if hasattr(cls, "from_spec_wrapping"):  # a wrapper around the module already at `path`
            setattr(parent, child, cls.from_spec_wrapping(spec, getattr(parent, child), device=device))
        else:
            setattr(parent, child, cls.from_spec(spec, device=device))


def save(model: nn.Module, output_dir, *, description: dict | None = None, source_dir=None) -> Path:
    """Save a (compressed) model as a plain directory; written to a temporary dir, then renamed."""
    from .. import __version__

    output_dir = Path(output_dir)
    source_dir = source_dir or getattr(model, "_mmcompress_source", None) or getattr(model.config, "_name_or_path", None)
    prior = getattr(model, "_mmcompress_description", {}) or {}
    manifest = {
        "format_version": FORMAT_VERSION,
        "mmcompress_version": __version__,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **prior,
        **(description or {}),
        "modules": module_specs(model),
    }
    with temporary_dir_for(output_dir) as tmp:
        model.config.architectures = [manifest["architecture"]]
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        if source_dir and Path(source_dir).is_dir():
            for fname in _PROCESSOR_FILES:
                src = Path(source_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return output_dir


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


_DEFAULT_RUNTIME = {"runtime": "int"}


def set_default_runtime(runtime: str) -> None:
    """The runtime :func:`load` uses when none is given (the CLI's ``--runtime``)."""
    from ..quant.deployed import RUNTIMES

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    _DEFAULT_RUNTIME["runtime"] = runtime


def load(path, device: str | torch.device = "cpu", runtime: str | None = None) -> nn.Module:
    """Load a directory written by :func:`save` (the same logits as the saved in-memory model).

    ``runtime="int"`` (default) runs packed quantized layers on integer kernels
    (:mod:`mmcompress.quant.deployed`); ``"reference"`` keeps the fake-quant forward."""
    from ..quant.deployed import deploy

    runtime = runtime or _DEFAULT_RUNTIME["runtime"]
    from accelerate import init_empty_weights

    from ..models.loading import model_class_for, read_config

    path = Path(path)
    if not is_artifact(path):
        raise FileNotFoundError(f"{path} is not an mmcompress artifact (no {MANIFEST})")
    manifest = read_manifest(path)
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer mmcompress (format {manifest['format_version']})")
    config = read_config(path)
    cls = model_class_for(config)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    apply_specs(model, manifest.get("modules", {}))
    materialized: dict[int, nn.Parameter] = {}  # keep tied parameters tied
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in materialized:
                    materialized[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False)
                mod._parameters[pname] = materialized[id(p)]
    model.tie_weights()  # tie before loading: a tied pair is stored once
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors in model.safetensors: {unexpected[:5]}")
    if missing:
        current = model.state_dict()
        loaded = {current[k].data_ptr() for k in state if k in current}
        really_missing = [k for k in missing if current[k].data_ptr() not in loaded]
        if really_missing:
            raise ValueError(f"{path}: missing tensors in model.safetensors: {really_missing[:5]}")
    model.eval().to(device)
    model._mmcompress_description = {k: v for k, v in manifest.items() if k != "modules"}
    model._mmcompress_source = str(path)
    _install_runtime(model)
    return deploy(model, runtime)


def _install_runtime(model: nn.Module) -> None:
    """Modality routing for multimodal artifacts (per-token modality ids during prefill)."""
    from ..models.adapters import get_adapter
    from ..models.modality import install_router

    try:
        adapter = get_adapter(model)
    except ValueError:
        return
    if adapter.modality_token_ids:
        install_router(model, adapter.modality_token_ids)
