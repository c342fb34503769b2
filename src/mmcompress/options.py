"""Method options: each method's options are one dataclass (:class:`Options`), checked before any model
is loaded.

A field made with :func:`option` carries the option's default, its validator, its help text and, for
the command line, its flag (``--name-with-dashes`` unless given).  Everything else is generated from
the fields, so an option cannot be forgotten by one of them: the ``quantize``/``sparsify`` flags
(:func:`mmcompress.cli.common.add_method_flags`), the recipe keys (:mod:`mmcompress.recipe`), the
artifact's JSON (the method's ``config()``, :meth:`Options.to_json`) and the resume fingerprint
(built from ``config()``).  The CLI, recipe steps and the Python API go through :meth:`Options.check`,
so every caller refuses the same values with the same message; only the name the user typed differs
(``--epochs`` on the command line, ``'epochs'`` in a recipe).  A validator takes the value and returns
it (normalised) or raises :class:`ValueError` with the problem, e.g. ``must be an integer >= 0, got -1``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Callable

Validator = Callable[[object], object]
MIN_BITS, MAX_BITS = 2, 16  # a weight or activation bit width (16 = no quantization; quant.quantizer)


class OptionError(ValueError):
    """``key`` has a bad value (``problem``), or is not an option of ``method`` (``known``: its options)."""

    def __init__(self, key: str, problem: str, known: tuple[str, ...] | None = None, method: str | None = None):
        self.key, self.problem, self.known, self.method = key, problem, known, method
        super().__init__(self.message(repr(key) if known is not None else key))

    def message(self, name: str, valid: tuple[str, ...] | None = None) -> str:
        """The message with the option called ``name`` (a CLI flag or a recipe key); ``valid``: the
        method's options under the names the user types (default: the option names)."""
        if self.known is not None:
            valid = self.known if valid is None else valid
            return (f"unknown option {name} for method {self.method or '?'}; valid: "
                    + (", ".join(valid) if valid else "none (it takes no options)"))
        return f"{name} {self.problem}"


def check_options(table: dict[str, Validator], options: dict, method: str | None = None) -> dict:
    """Validate ``options`` against ``table`` (``{option: validator}``); returns the normalised options."""
    out = {}
    for key, value in options.items():
        if key not in table:
            raise OptionError(key, "", known=tuple(sorted(table)), method=method)
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
        items = [x.strip() for x in v.split(",")] if isinstance(v, str) else v  # "a,b" (a flag) or a list
        if not isinstance(items, (list, tuple)) or not items or any(x not in values for x in items):
            raise ValueError(f"must be a list of {', '.join(values)}, got {v!r}")
        return tuple(items)

    return check


# -- options as dataclass fields ------------------------------------------------------------------------


def option(default, check: Validator, help: str = "", *, flag: str | None = None, cli: bool = True,
           required: bool = False, parse: Callable[[str], object] | None = None):
    """A field of a method's options dataclass.

    ``default`` and ``check`` (the validator); ``help``: one line for ``--help`` (the default is
    appended); ``flag``: the CLI flag when not ``--`` + the name with dashes; ``cli=False``: a recipe and
    Python option only (its name would clash with a flag of the command); ``required``: the flag must be
    given; ``parse``: turns the flag's text into a value (default: from the default's type)."""
    if isinstance(default, (dict, list)):
        raise TypeError("an option's default must be immutable")
    return field(default=default, metadata={"check": check, "help": help, "flag": flag, "cli": cli,
                                            "required": required, "parse": parse})


def override(cls, name: str, *, default=MISSING, check: Validator | None = None):
    """Option ``name`` of options class ``cls`` with another default or validator, for a subclass (AWQ's
    ``loss`` defaults to ``block``; CATS takes two of the three prefill policies)."""
    f = next(f for f in fields(cls) if f.name == name)
    return field(default=f.default if default is MISSING else default,
                 metadata={**f.metadata, **({"check": check} if check else {})})


def flag_of(f) -> str:
    """The CLI flag of option field ``f``."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_table(cls) -> dict[str, Validator]:
    """``{option: validator}`` of an options dataclass (fields made with :func:`option`)."""
    return {f.name: f.metadata["check"] for f in fields(cls)}


def option_values(config) -> dict:
    """``{option: value}`` of an options dataclass instance, in field order."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _json(v):
    if isinstance(v, (tuple, list)):
        return [_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json(x) for k, x in v.items()}
    return v


class Options:
    """Base of a method's options: subclasses are frozen dataclasses whose fields are made with :func:`option`.
    A method names its class (``Options = ...``) and builds it with :meth:`make`."""

    @classmethod
    def check(cls, options: dict, method: str | None = None) -> dict:
        """The given ``options`` validated and normalised (an unknown key or a bad value: :class:`OptionError`)."""
        return check_options(option_table(cls), options, method)

    @classmethod
    def make(cls, options: dict, method: str | None = None):
        """An instance from the given ``options`` (the rest at their defaults), checked."""
        return cls(**cls.check(options, method))

    def values(self) -> dict:
        """``{option: value}`` in field order."""
        return option_values(self)

    def to_json(self) -> dict:
        """The values as JSON types (tuples become lists, dict keys strings): the artifact's ``method``."""
        return {k: _json(v) for k, v in self.values().items()}


@dataclass(frozen=True)
class NoOptions(Options):
    """The options of a method that takes none (RTN)."""
