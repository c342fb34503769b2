"""Plugins: packages that add subcommands and named data sets through the ``mmcompress.plugins``
entry-point group (the repository's testbed, ``src/mmcompress_testbed``, is one; pyproject.toml declares it).

The entry point names a small module, cheap to import, with

* ``COMMANDS = {name: (module, help line)}``: ``module.register(subparsers)`` adds the subcommand.  The
  module is imported only when that subcommand runs (or its ``--help`` is asked); otherwise the
  subcommand is listed with the help line.
* ``NAMED_SETS = [module, ...]``: modules that register named data sets (:mod:`mmcompress.data.named`)
  when imported, the first time a set name is looked up.

The product never imports a plugin by name.  An entry point whose module is not installed (a wheel
built without the testbed) is skipped.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points
from types import ModuleType

GROUP = "mmcompress.plugins"


def import_optional(modname: str) -> ModuleType | None:
    """The module ``modname``, or ``None`` when it (or a package above it) is not installed; an import
    error inside an installed module is raised."""
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            return None
        raise


@cache
def load() -> tuple[ModuleType, ...]:
    """The installed plugins' modules, by entry-point name."""
    modules = []
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        module = import_optional(ep.value.partition(":")[0].strip())
        if module is not None:
            modules.append(module)
    return tuple(modules)


def commands() -> dict[str, tuple[str, str]]:
    """``{subcommand: (module, help line)}`` over the installed plugins."""
    out: dict[str, tuple[str, str]] = {}
    for module in load():
        out.update(getattr(module, "COMMANDS", {}))
    return out


def set_providers() -> list[str]:
    """The modules that register named data sets, over the installed plugins."""
    return [name for module in load() for name in getattr(module, "NAMED_SETS", ())]
