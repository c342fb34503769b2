"""Loading Hugging Face model directories (local only; nothing is downloaded).

Every transformers loader here gets ``trust_remote_code`` explicitly (default ``False``): a
directory's ``auto_map`` (Python files shipped next to the weights) is never imported and
transformers never asks on stdin, unless the caller passes ``trust_remote_code=True`` (the CLI's
``--trust-remote-code``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from ..specs import MANIFEST
from .adapters import FAMILIES, UnsupportedModelError, install_call_convention, unsupported_message


def _check_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


class RemoteCodeError(ValueError):
    """A directory needs Python code of its own and ``--trust-remote-code`` was not given."""


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def auto_map_refs(path) -> dict[str, str]:
    """``{"AutoTokenizer": "evil.EvilTokenizer", ...}``: the ``auto_map`` entries of a directory's configs."""
    refs: dict[str, str] = {}
    for fname in REMOTE_CODE_FILES:
        f = Path(path) / fname
        try:
            raw = json.loads(f.read_text()) if f.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        auto_map = raw.get("auto_map") if isinstance(raw, dict) else None
        for k, v in (auto_map or {}).items() if isinstance(auto_map, dict) else ():
            refs.setdefault(k, ", ".join(x for x in v if x) if isinstance(v, (list, tuple)) else str(v))
    return refs


def remote_code_message(path, what: str, keys=()) -> str:
    refs = auto_map_refs(path)
    shown = {k: v for k, v in refs.items() if not keys or k in keys} or refs
    where = "; ".join(f"{k} -> {v}" for k, v in shown.items())
    return (f"{path}: the {what} is Python code shipped in the directory (auto_map {where or '?'}); mmcompress runs "
            "such code only with --trust-remote-code")


@contextmanager
def remote_code_guard(path, what: str, trust_remote_code: bool, keys=()):
    """Turn transformers' "contains custom code" refusal into one line that names ``--trust-remote-code``."""
    try:
        yield
    except ValueError as e:
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise RemoteCodeError(remote_code_message(path, what, keys)) from None
        raise


def read_config(path, *, trust_remote_code: bool = False):
    path = _check_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    model_type = raw.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(unsupported_message(model_type))
    with remote_code_guard(path, "configuration class", trust_remote_code, ("AutoConfig",)):
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                       trust_remote_code=trust_remote_code)


def model_class_for(config, path=None, *, trust_remote_code: bool = False):
    """The transformers class of ``config``; a class that only the directory's own code defines
    (``architectures`` names no transformers class and ``auto_map`` provides it) needs
    ``trust_remote_code`` (then the Auto class imports it)."""
    archs = getattr(config, "architectures", None) or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    auto_map = getattr(config, "auto_map", None) or {}
    remote = [k for k, v in auto_map.items() if k.startswith("AutoModel") and str(v).rpartition(".")[2] in archs]
    if remote:
        if not trust_remote_code:
            raise RemoteCodeError(remote_code_message(path or "model directory", f"model class {archs[0]}", remote))
        return getattr(transformers, remote[0])
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto._model_mapping[type(config)]
        except KeyError:
            continue
    raise UnsupportedModelError(f"no transformers model class for {config.model_type!r}")


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype a checkpoint is stored in (``torch_dtype`` or ``dtype`` of its config.json; float32 if absent)."""
    raw = json.loads((_check_dir(path) / "config.json").read_text())
    for cfg in (raw, raw.get("text_config") or {}, (raw.get("thinker_config") or {}).get("text_config") or {}):
        name = cfg.get("dtype") or cfg.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return torch.float32


def resolve_dtype(path, dtype: torch.dtype | str) -> torch.dtype:
    """``"auto"``: the checkpoint's own dtype; otherwise a dtype name (float32, bfloat16, float16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return checkpoint_dtype(path)
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return value


def load_hf_model(path, dtype: torch.dtype | str = torch.float32, device="cpu", *, trust_remote_code: bool = False):
    """Load a plain Hugging Face model directory.  ``dtype="auto"`` loads in the checkpoint's own dtype
    (bf16 stays bf16).  Artifacts are loaded by :func:`mmcompress.export.serialization.load_model`
    (``mmcompress.load_model``), which takes either kind of directory."""
    if (Path(path) / MANIFEST).is_file():
        raise ValueError(f"{path} is an mmcompress artifact: load it with mmcompress.load_model (or mmcompress.load)")
    config = read_config(path, trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(path, dtype)
    cls = model_class_for(config, path, trust_remote_code=trust_remote_code)
    model = cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code)
    model.eval().to(device)
    model._mmcompress_source = str(path)
    install_call_convention(model)
    return model


def load_tokenizer(path, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with remote_code_guard(path, "tokenizer class", trust_remote_code, ("AutoTokenizer",)):
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=trust_remote_code)
