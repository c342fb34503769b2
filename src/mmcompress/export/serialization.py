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

from .. import __version__
from ..fileio import atomic_output_dir
from ..memory import trim_heap
from ..models.adapters import get_adapter
from ..models.loading import load_hf_model, model_class_for, read_config
from ..models import moe as _moe  # noqa: F401  (registers ExpertLinears, the per-expert MoE linears)
from ..quant import methods as _quant_methods  # noqa: F401  (registers MASLinear for apply_specs)
from ..quant.deployed import RUNTIMES, deploy
from ..sparse import merge as _sparse_merge  # noqa: F401  (registers SparseLinear, ResidualAdaptedLayer, RotatedNorm, ...)
from ..sparse.methods import wina as _wina  # noqa: F401  (registers WinaLinear)
from ..specs import MANIFEST, apply_specs, module_specs

FORMAT_VERSION = 1
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def build_manifest(model: nn.Module, description: dict | None = None) -> dict:
    """``mmcompress.json`` of ``model`` (its architecture, dtype, what was done, module specs)."""
    prior = getattr(model, "_mmcompress_description", {}) or {}
    return {
        "format_version": FORMAT_VERSION,
        "mmcompress_version": __version__,
        "architecture": (model.config.architectures or [type(model).__name__])[0],
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        **prior,
        **(description or {}),
        "modules": module_specs(model),
    }


def write_side_files(tmp: Path, model: nn.Module, manifest: dict, source_dir) -> None:
    """``config.json``, ``mmcompress.json`` and the tokenizer/processor files of ``source_dir``."""
    model.config.architectures = [manifest["architecture"]]
    model.config.save_pretrained(tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if source_dir and Path(source_dir).is_dir():
        if not type(model).__module__.startswith("transformers."):  # remote code: the model's own files travel
            for src in sorted(Path(source_dir).glob("*.py")):  # with it (imported only under --trust-remote-code)
                if src.is_file():
                    shutil.copyfile(src, tmp / src.name)
        for fname in _PROCESSOR_FILES:
            src = Path(source_dir) / fname
            if src.is_file():
                shutil.copyfile(src, tmp / fname)  # the user's umask, not the source's mode


def save(model: nn.Module, output_dir, *, description: dict | None = None, source_dir=None, overwrite: bool = False,
         inputs=()) -> Path:
    """Save a (compressed) model as a plain directory, atomically (:func:`fileio.atomic_output_dir`).

    An existing non-empty ``output_dir`` is refused unless ``overwrite``; one that overlaps
    ``source_dir`` or ``inputs`` is always refused."""
    output_dir = Path(output_dir)
    source_dir = source_dir or getattr(model, "_mmcompress_source", None) or getattr(model.config, "_name_or_path", None)
    manifest = build_manifest(model, description)
    sources = [source_dir, *inputs] if source_dir and Path(source_dir).exists() else list(inputs)
    with atomic_output_dir(output_dir, overwrite=overwrite, inputs=sources) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        write_side_files(tmp, model, manifest, source_dir)
    return output_dir


def load_state(path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(path / "model.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(str(path / shard)))
    return state


def is_artifact(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path) -> dict:
    return json.loads((Path(path) / MANIFEST).read_text())


def _empty_model(cls, config, dtype):
    if cls.__name__.startswith("Auto"):  # a class from the directory's own code (--trust-remote-code)
        return cls.from_config(config, dtype=dtype, trust_remote_code=True)
    return cls._from_config(config, dtype=dtype)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_header(path) -> dict[str, tuple[str, list[int]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            out[k] = (sl.get_dtype(), list(sl.get_shape()))
    return out


def check_specs(cls, config, dtype, specs: dict, header: dict, where) -> None:
    """Check every manifest spec against the safetensors header before anything is allocated.

    The model skeleton and the spec modules are built on the meta device (no memory); every tensor
    of a spec module must be in the header with the same shape and dtype."""
    from accelerate import init_empty_weights

    if not isinstance(specs, dict):
        raise ValueError(f"{where}: {MANIFEST} 'modules' must be an object")
    with init_empty_weights(include_buffers=True):
        skeleton = _empty_model(cls, config, dtype)
    for mpath, spec in specs.items():
        what = f"{MANIFEST} module {mpath!r} ({spec.get('class') if isinstance(spec, dict) else spec!r})"
        try:
            if not isinstance(spec, dict):
                raise ValueError("the spec is not an object")
            apply_specs(skeleton, {mpath: spec}, device="meta")
        except Exception as e:  # KeyError, TypeError, AttributeError, ... from a hand-edited spec
            raise ValueError(f"{where}: {what}: invalid spec ({type(e).__name__}: {e})") from None
        prefix = mpath + "."
        for name, t in skeleton.get_submodule(mpath).state_dict(prefix=prefix).items():
            want = (_SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)), list(t.shape))
            if name not in header:
                raise ValueError(f"{where}: {what}: tensor {name} ({want[0]} {want[1]}) is not in model.safetensors")
            if header[name] != want:
                raise ValueError(f"{where}: {what}: tensor {name} is {want[0]} {want[1]} by the spec but "
                                 f"{header[name][0]} {header[name][1]} in model.safetensors")
    for name, t in skeleton.state_dict().items():  # the rest of the model (config.json vs the weights)
        if name in header and header[name][1] != list(t.shape):
            raise ValueError(f"{where}: tensor {name} has shape {list(t.shape)} by config.json but "
                             f"{header[name][1]} in model.safetensors")


_DEFAULT_RUNTIME = {"runtime": "int"}


def set_default_runtime(runtime: str) -> None:
    """The runtime :func:`load` uses when none is given (the CLI's ``--runtime``)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")
    _DEFAULT_RUNTIME["runtime"] = runtime


def load(path, device: str | torch.device = "cpu", runtime: str | None = None, *,
         trust_remote_code: bool = False) -> nn.Module:
    """Load a directory written by :func:`save` (the same logits as the saved in-memory model).

    ``runtime="int"`` (default) runs packed quantized layers on integer kernels
    (:mod:`mmcompress.quant.deployed`); ``"reference"`` keeps the fake-quant forward.  The model's
    ``generate`` runs greedy batch-1 calls on the decode engine (:mod:`mmcompress.runtime.generate`)."""
    from accelerate import init_empty_weights

    runtime = runtime or _DEFAULT_RUNTIME["runtime"]
    path = Path(path)
    if not is_artifact(path):
        raise FileNotFoundError(f"{path} is not an mmcompress artifact (no {MANIFEST})")
    try:
        manifest = read_manifest(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path / MANIFEST} must hold a JSON object")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer mmcompress (format {manifest['format_version']})")
    config = read_config(path, trust_remote_code=trust_remote_code)
    cls = model_class_for(config, path, trust_remote_code=trust_remote_code)
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path / MANIFEST}: unknown dtype {manifest.get('dtype')!r}")
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded artifact (data-free RTN of a large model)
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    header = {}
    for shard in shards:
        if not (path / shard).is_file():
            raise FileNotFoundError(f"{path}: {shard} is missing")
        header.update(safetensors_header(path / shard))
    check_specs(cls, config, dtype, manifest.get("modules", {}), header, path)
    with init_empty_weights(include_buffers=False):
        model = _empty_model(cls, config, dtype)
    apply_specs(model, _with_model_dtype(manifest.get("modules", {}), manifest.get("dtype", "float32")))
    materialized: dict[int, nn.Parameter] = {}  # keep tied parameters tied
    for mod in model.modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in materialized:
                    materialized[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False)
                mod._parameters[pname] = materialized[id(p)]
    model.tie_weights()  # tie before loading: a tied pair is stored once
    state = load_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors in model.safetensors: {unexpected[:5]}")
    if missing:
        _check_missing_are_tied(model, state, missing, path)
    del state  # the artifact's tensors, copied into the model
    model.eval().to(device)
    model._mmcompress_description = {k: v for k, v in manifest.items() if k != "modules"}
    model._mmcompress_source = str(path)
    _install_runtime(model)
    from ..runtime.generate import install_engine_generate  # model.generate on the decode engine where exact

    model = install_engine_generate(deploy(model, runtime))
    trim_heap()  # the row-major codes the deployed layouts replaced: back to the system, not left resident
    return model


def _check_missing_are_tied(model: nn.Module, state: dict, missing: list[str], path) -> None:
    """``ValueError`` unless every tensor ``load_state_dict`` reported missing shares its storage with a loaded
    one (a tied pair is stored once).  A function of its own: its state dict of the model holds every packed
    tensor, and must not outlive the check (the codes a deployed layer re-lays would stay resident)."""
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    really_missing = [k for k in missing if current[k].data_ptr() not in loaded]
    if really_missing:
        raise ValueError(f"{path}: missing tensors in model.safetensors: {really_missing[:5]}")


def load_model(path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               runtime: str | None = None, *, trust_remote_code: bool = False) -> nn.Module:
    """A local model directory of either kind: an mmcompress artifact (:func:`load`, with ``runtime``) or
    a plain Hugging Face one (:func:`~mmcompress.models.loading.load_hf_model`, with ``dtype``)."""
    if is_artifact(path):
        return load(path, device=device, runtime=runtime, trust_remote_code=trust_remote_code)
    return load_hf_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _with_model_dtype(specs: dict, dtype: str) -> dict:
    """Artifacts written before the fix recorded float32 (the dtype of the step sizes) in the spec of a
    packed bias-free ``QuantLinear`` of a bf16/fp16 model, so it could not run: it computes in the model dtype."""
    out = {}
    for path, spec in specs.items():
        if (spec.get("packed") and not spec.get("bias") and spec.get("dtype") == "float32" and dtype != "float32"
                and "in_features" in spec and "scheme" in spec):
            spec = dict(spec, dtype=dtype)
        out[path] = spec
    return out


def _install_runtime(model: nn.Module) -> None:
    """Modality routing for multimodal artifacts (per-token modality ids during prefill)."""
    try:
        adapter = get_adapter(model)  # also installs a family's calling convention (MiniCPM-V 2.x)
    except ValueError:
        return
    adapter.install_router()
