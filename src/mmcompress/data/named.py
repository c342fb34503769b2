"""Named data sets: ``--calib NAME``, ``--ppl NAME``, ``--asr NAME``, ``--vqa NAME``.

The product ships no data sets.  A provider registers a function per kind and name (:func:`register`):

* ``"calibration"``: ``fn(model, model_dir, nsamples=, seqlen=, seed=)`` -> a ``CalibrationSet``,
* ``"text"``: ``fn()`` -> the evaluation text,
* ``"speech"``: ``fn()`` -> ``[{"audio", "transcript", "kind"}]`` (:func:`mmcompress.eval.asr.word_error_rate`),
* ``"vqa"``: ``fn()`` -> ``[{"image", "question", "answer", "type"}]`` (:mod:`mmcompress.eval.vqa`).

Providers are the modules that installed plugins name (:func:`mmcompress.plugins.set_providers`), imported
the first time a name is looked up (the testbed's ``wiki``, ``shakespeare``, ``testbed``, ``speech-test``,
``image-qa-test``); one that is not installed is skipped.
"""

from __future__ import annotations

from typing import Callable

from .. import plugins

KINDS = ("calibration", "text", "speech", "vqa")

_SETS: dict[str, dict[str, Callable]] = {kind: {} for kind in KINDS}
_loaded: set[str] = set()


class UnknownSet(ValueError):
    """No provider has a set of this kind and name."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"{name!r} is not a named {kind} set (known: {', '.join(known) or 'none installed'})")


def register(kind: str, name: str, fn: Callable) -> None:
    """Add or replace the set ``name`` of ``kind``."""
    if kind not in _SETS:
        raise ValueError(f"unknown kind of data set {kind!r}; expected one of {', '.join(KINDS)}")
    _SETS[kind][name] = fn


def names(kind: str) -> list[str]:
    _load_providers()
    return list(_SETS[kind])


def resolve(kind: str, name: str) -> Callable:
    """The function registered for ``name`` of ``kind``; :class:`UnknownSet` if there is none."""
    if name not in _SETS[kind]:
        _load_providers()
    if name not in _SETS[kind]:
        raise UnknownSet(kind, name, list(_SETS[kind]))
    return _SETS[kind][name]


def _load_providers() -> None:
    for modname in plugins.set_providers():
        if modname not in _loaded:
            _loaded.add(modname)
            plugins.import_optional(modname)
