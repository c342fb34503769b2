"""Method options: one table per method of ``option -> validator``, checked before any model is loaded.

The CLI (flags), recipe steps (keys) and the Python API go through :func:`check_options`, so every
caller refuses the same values with the same message; only the name the user typed differs
(``--epochs`` on the command line, ``epochs`` in a recipe).  A validator takes the value and
returns it (normalised) or raises :class:`ValueError` with the problem, e.g. ``must be an integer
>= 0, got -1``.
"""

from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Callable

Validator = Callable[[object], object]
MIN_BITS, MAX_BITS = 2, 16  # a weight or activation bit width (16 = no quantization; quant.quantizer)


class OptionError(ValueError):
    """``key`` has a bad value (``problem``) or is not an option of the method (``known`` set)."""

    def __init__(self, key: str, problem: str, known: tuple[str, ...] | None = None):
        self.key, self.problem, self.known = key, problem, known
        super().__init__(self.message(key))

    def message(self, name: str) -> str:
        """The message with the option called ``name`` (a CLI flag or a recipe key)."""
        if self.known is not None:
            return f"unknown option {name!r} " + (f"(known: {', '.join(self.known)})" if self.known else
                                                  "(the method takes no options)")
        return f"{name} {self.problem}"


def check_options(table: dict[str, Validator], options: dict) -> dict:
    """Validate ``options`` against ``table``; returns the normalised options."""
    out = {}
    for key, value in options.items():
        if key not in table:
            raise OptionError(key, "", known=tuple(sorted(table)))
        try:
            out[key] = table[key](value)
        except (ValueError, TypeError) as e:
            raise OptionError(key, str(e)) from None
    return out


# -- validators ---------------------------------------------------------------------------------------


def _bound_text(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def integer(lo: int | None = None, hi: int | None = None, *, optional: bool = False) -> Validator:
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(f"must be an integer {_bound_text(lo, hi)}, got {v!r}")
        return v

    return check


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         optional: bool = False) -> Validator:
    """A finite number within the bounds (NaN and infinities are refused)."""
    def check(v):
        if v is None and optional:
            return None
        bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
        if not bad and lo is not None:
            bad = v <= lo if lo_open else v < lo
        if not bad and hi is not None:
            bad = v >= hi if hi_open else v > hi
        if bad:
            bounds = f" {_bound_text(lo, hi, lo_open, hi_open)}" if lo is not None or hi is not None else ""
            raise ValueError(f"must be a finite number{bounds}, got {v!r}")
        return v

    return check


def choice(*values) -> Validator:
    def check(v):
        if v not in values:
            raise ValueError(f"must be one of {', '.join(map(str, values))}, got {v!r}")
        return v

    check.values = values
    return check


def boolean(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def bits(v):
    return integer(MIN_BITS, MAX_BITS)(v)


def subset(*values) -> Validator:
    def check(v):
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)) or not items or any(x not in values for x in items):
            raise ValueError(f"must be a list of {', '.join(values)}, got {v!r}")
        return tuple(items)

    return check


# -- options as dataclass fields ------------------------------------------------------------------------


def option(default, check: Validator):
    """A field of a method's options dataclass: its default and its validator.  The dataclass is then
    the one list of the options: :func:`option_table` gives the validators (CLI, recipes), the method's
    ``config()`` writes :func:`option_values` (the artifact's JSON, the resume fingerprint)."""
    if isinstance(default, (dict, list)):
        raise TypeError("an option's default must be immutable")
    return field(default=default, metadata={"check": check})


def option_table(cls) -> dict[str, Validator]:
    """``{option: validator}`` of an options dataclass (fields made with :func:`option`)."""
    return {f.name: f.metadata["check"] for f in fields(cls)}


def option_values(config) -> dict:
    """``{option: value}`` of an options dataclass instance, in field order."""
    return {f.name: getattr(config, f.name) for f in fields(config)}
