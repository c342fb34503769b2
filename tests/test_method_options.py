"""Method options as dataclass fields: every field reaches the artifact's JSON (``config()``) and the
resume fingerprint, so none can be forgotten."""

import dataclasses

import pytest

from mmcompress.engine import _method_digest
from mmcompress.options import OptionError
from mmcompress.quant.api import make_method
from mmcompress.quant.methods.masquant import MASQuant, MASQuantOptions
from mmcompress.quant.quantizer import resolve_scheme

# values to try for an option whose validator has no list of choices; the first valid one != default wins
_CANDIDATES = ("free", "uniform", "mbq", 7, 0.25, 3, {"image": 2.0})


def _other_value(f: dataclasses.Field):
    """A valid value of option ``f`` other than its default."""
    check, default = f.metadata["check"], f.default
    if isinstance(default, bool):
        candidates = [not default]
    elif hasattr(check, "values"):
        candidates = list(check.values)
    elif isinstance(default, int):
        candidates = [default + 1, default - 1]
    elif isinstance(default, float):
        candidates = [default / 2, default * 2]
    else:
        candidates = list(_CANDIDATES)
    for v in candidates:
        try:
            if check(v) != default:
                return v
        except (ValueError, TypeError):
            continue
    raise AssertionError(f"no other valid value found for {f.name}")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(MASQuantOptions)])
def test_every_masquant_option_is_in_the_artifact_json_and_the_fingerprint(field):
    scheme = resolve_scheme("w4a8")
    base = make_method("masquant", scheme)
    f = next(f for f in dataclasses.fields(MASQuantOptions) if f.name == field)
    value = _other_value(f)
    changed = make_method("masquant", scheme, **{field: value})
    assert field in changed.config()
    assert changed.config()[field] != base.config()[field]
    assert _method_digest(changed, True) != _method_digest(base, True)


def test_options_table_is_the_dataclass_and_refuses_unknown_keys():
    assert list(MASQuant.OPTIONS) == [f.name for f in dataclasses.fields(MASQuantOptions)]
    with pytest.raises(OptionError, match="unknown option 'dampnig'"):
        make_method("masquant", resolve_scheme("w4a8"), dampnig=1e-3)
    with pytest.raises(OptionError, match="probe_samples must be an integer >= 1"):
        make_method("masquant", resolve_scheme("w4a8"), probe_samples=0)
