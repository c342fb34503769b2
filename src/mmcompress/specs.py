"""Compressed-module specs: the registry that maps a spec's ``"class"`` to a module class.

Every module a method puts into a model (``QuantLinear``, ``SparseLinear``, a residual adapter, ...)
describes itself as a JSON spec (``spec()``) and is rebuilt from it (``from_spec`` or
``from_spec_wrapping``).  The classes register themselves here when their module is imported
(:func:`register_quant_module`, :func:`register_sparse_module`); whoever rebuilds modules from
specs it did not write (:func:`mmcompress.export.serialization.load`) imports the method packages
first.  The engine (checkpoint/resume), export and the wrapping modules use :func:`module_specs`
and :func:`apply_specs`.  This module imports nothing from the rest of the package.
"""

from __future__ import annotations

from torch import nn

MANIFEST = "mmcompress.json"  # an artifact's description (see mmcompress.export.serialization)

QUANT_MODULES: dict[str, type] = {}
SPARSE_MODULES: dict[str, type] = {}


def register_quant_module(cls):
    QUANT_MODULES[cls.__name__] = cls
    return cls


def register_sparse_module(cls):
    SPARSE_MODULES[cls.__name__] = cls
    return cls


def module_class(name: str) -> type:
    registry = {**QUANT_MODULES, **SPARSE_MODULES}
    if name not in registry:
        raise ValueError(f"unknown module class {name!r} in {MANIFEST}; is this artifact from a newer mmcompress?")
    return registry[name]


def module_specs(root: nn.Module) -> dict[str, dict]:
    """``{path: spec}`` of every compressed module under ``root`` (outermost ones only)."""
    types = tuple(QUANT_MODULES.values()) + tuple(SPARSE_MODULES.values())
    specs: dict[str, dict] = {}
    for name, mod in root.named_modules():
        if isinstance(mod, types) and not any(name.startswith(p + ".") for p in specs):
            specs[name] = mod.spec()
    return specs


def apply_specs(root: nn.Module, specs: dict[str, dict], device=None) -> None:
    """Replace the modules at the given paths by fresh compressed modules built from their specs.

    A class with ``from_spec_wrapping(spec, existing, device)`` wraps the module that is already at
    the path (e.g. a decoder layer plus a residual adapter) instead of building one from scratch."""
    for path, spec in specs.items():
        cls = module_class(spec["class"])
        if hasattr(cls, "from_spec_wrapping"):  # a wrapper around the module already at `path`
            root.set_submodule(path, cls.from_spec_wrapping(spec, root.get_submodule(path), device=device))
        else:
            root.set_submodule(path, cls.from_spec(spec, device=device))
