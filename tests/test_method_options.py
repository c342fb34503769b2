"""Method options as dataclass configs: every field of every method reaches the artifact's JSON
(``config()``), the resume fingerprint and the command line (its flag), and recipe keys and flags are
refused with the same messages.  A field added to a config needs no other edit (the last tests)."""

import contextlib
import dataclasses
import io

import pytest

from mmcompress import options as opt
from mmcompress.cli import build_parser
from mmcompress.cli.common import CLIError, method_options
from mmcompress.engine import _method_digest
from mmcompress.options import OptionError, flag_of
from mmcompress.quant.api import make_method
from mmcompress.quant.methods import QUANT_METHODS
from mmcompress.quant.methods.smoothquant import SmoothQuant, SmoothQuantOptions
from mmcompress.quant.quantizer import resolve_scheme
from mmcompress.recipe import RecipeError, parse_recipe
from mmcompress.sparse.api import make_sparse_method
from mmcompress.sparse.methods import SPARSE_METHODS

# values to try for an option whose validator has no list of choices; the first valid one != default wins
_CANDIDATES = ("free", "uniform", "mbq", 7, 0.25, 3, {"image": 2.0}, "attn_in,mlp_out")
SCHEME = resolve_scheme("w4a8")
QUANT_FIELDS = [(m, f) for m, cls in QUANT_METHODS.items() for f in dataclasses.fields(cls.Options)]
SPARSE_FIELDS = [(m, f) for m, cls in SPARSE_METHODS.items() for f in dataclasses.fields(cls.Options)]


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


def _argv(f: dataclasses.Field, value) -> list[str]:
    """The command-line words that give option ``f`` the value ``value``."""
    flag = flag_of(f)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, dict):
        return [flag, ",".join(f"{k}={v}" for k, v in value.items())]
    return [flag, str(value)]


def _help(command: str) -> list[str]:
    """The words of ``mmcompress COMMAND --help``."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser([command]).parse_args([command, "--help"])
    return out.getvalue().replace(",", " ").split()


def _parse_quantize(words):
    return build_parser(["quantize"]).parse_args(["quantize", "MODEL", "-o", "OUT", *words])


def _parse_sparsify(words):
    return build_parser(["sparsify"]).parse_args(["sparsify", "MODEL", "--calib", "wiki", "-o", "OUT", *words])


@pytest.mark.parametrize("method,field", QUANT_FIELDS, ids=[f"{m}.{f.name}" for m, f in QUANT_FIELDS])
def test_every_quant_option_is_in_the_json_the_fingerprint_and_the_cli(method, field):
    base = make_method(method, SCHEME)
    value = _other_value(field)
    changed = make_method(method, SCHEME, **{field.name: value})
    assert field.name in base.config() and changed.config()[field.name] != base.config()[field.name]
    assert _method_digest(changed, True) != _method_digest(base, True)
    if not field.metadata["cli"]:
        assert flag_of(field) not in _help("quantize") or field.name == "seed"  # --seed: the calibration's
        return
    args = _parse_quantize(["--method", method, *_argv(field, value)])
    assert method_options(args, QUANT_METHODS, method) == {field.name: changed.options.values()[field.name]}


@pytest.mark.parametrize("method,field", SPARSE_FIELDS, ids=[f"{m}.{f.name}" for m, f in SPARSE_FIELDS])
def test_every_sparse_option_is_in_the_json_and_the_cli(method, field):
    base = make_sparse_method(method, sparsity=0.5)
    value = _other_value(field)
    changed = make_sparse_method(method, **{"sparsity": 0.5, field.name: value})
    assert changed.config()[field.name] != base.config()[field.name]
    words = [] if field.name == "sparsity" else ["--sparsity", "0.5"]
    args = _parse_sparsify(["--method", method, *words, *_argv(field, value)])
    assert method_options(args, SPARSE_METHODS, method) == {"sparsity": 0.5, field.name: changed.options.values()[field.name]}


@pytest.mark.parametrize("method,field", SPARSE_FIELDS, ids=[f"{m}.{f.name}" for m, f in SPARSE_FIELDS])
def test_every_sparse_option_is_in_the_resume_fingerprint(method, field):
    """``sparsify --resume`` with another value of any option is refused: the walk's digest changes."""
    base = make_sparse_method(method, sparsity=0.5)
    changed = make_sparse_method(method, **{"sparsity": 0.5, field.name: _other_value(field)})
    walks = base.layer_method(), changed.layer_method()
    if None in walks:  # whole-model stages (LaRoSA merged, basis both): not resumable, refused with --resume
        return
    assert _method_digest(walks[1], False) != _method_digest(walks[0], False)
    again = make_sparse_method(method, sparsity=0.5).layer_method()
    assert _method_digest(again, False) == _method_digest(walks[0], False)  # stable across objects


def test_flags_keep_their_names():
    """The flags the README and the scripts use (the hand-written CLI's), now generated from the fields."""
    q = _help("quantize")
    for flag in ("--alpha", "--epochs", "--lr", "--loss-weights", "--cmc", "--rank", "--rank-floor", "--cmc-target",
                 "--cmc-bits", "--tie", "--train-samples", "--divergence", "--runtime-smoothing", "--search-loss",
                 "--clip", "--no-clip", "--seed", "--whiten-calib"):
        assert flag in q, flag
    s = _help("sparsify")
    for flag in ("--sparsity", "--plan", "--mode", "--prefill", "--basis", "--column-scale"):
        assert flag in s, flag
    with pytest.raises(SystemExit):  # --sparsity is still required
        build_parser(["sparsify"]).parse_args(["sparsify", "MODEL", "--calib", "wiki", "-o", "OUT"])


def test_unknown_keys_and_flags_get_one_message():
    with pytest.raises(OptionError, match="unknown option 'dampnig' for method masquant; valid: alpha, "):
        make_method("masquant", SCHEME, dampnig=1e-3)
    with pytest.raises(RecipeError, match="recipe step 1 \\(masquant\\): unknown option 'dampnig' for method "
                                          "masquant; valid: alpha, "):
        parse_recipe({"steps": [{"quantize": {"method": "masquant", "dampnig": 1e-3}}]})
    with pytest.raises(CLIError, match="unknown option --epochs for method rtn; valid: none"):
        method_options(_parse_quantize(["--epochs", "3"]), QUANT_METHODS, "rtn")
    with pytest.raises(RecipeError, match="unknown option 'epochs' for method rtn; valid: none"):
        parse_recipe({"steps": [{"quantize": {"method": "rtn", "epochs": 3}}]})
    with pytest.raises(CLIError, match="unknown option --alpha for method awq; valid: --clip, --grid, "):
        method_options(_parse_quantize(["--method", "awq", "--alpha", "0.3"]), QUANT_METHODS, "awq")


def test_bad_values_name_the_option_and_its_range():
    with pytest.raises(OptionError, match="^probe_samples must be an integer >= 1, got 0$"):
        make_method("masquant", SCHEME, probe_samples=0)
    with pytest.raises(RecipeError, match="grid must be an integer >= 1, got 0$"):
        parse_recipe({"steps": [{"quantize": {"method": "awq", "grid": 0}}]})
    with pytest.raises(CLIError, match="^--grid must be an integer >= 1, got 0$"):
        method_options(_parse_quantize(["--method", "awq", "--grid", "0"]), QUANT_METHODS, "awq")
    with pytest.raises(CLIError, match="^--prefill must be one of all, none, got 'last_half'$"):
        method_options(_parse_sparsify(["--method", "cats", "--sparsity", "0.3", "--prefill", "last_half"]),
                       SPARSE_METHODS, "cats")
    with pytest.raises(RecipeError, match="sparsity must be a finite number in \\[0, 1\\), got 1.5$"):
        parse_recipe({"steps": [{"sparsify": {"method": "teal", "sparsity": 1.5}}]})


# -- a new field needs no other edit ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _KnobOptions(SmoothQuantOptions):
    new_knob: int = opt.option(3, opt.integer(1), "an option added to a config, nothing else edited")


class _Knob(SmoothQuant):
    name = "knob"
    Options = _KnobOptions


def test_a_field_added_to_a_config_reaches_the_json_the_fingerprint_the_cli_and_recipes(monkeypatch):
    monkeypatch.setitem(QUANT_METHODS, "knob", _Knob)
    base, changed = make_method("knob", SCHEME), make_method("knob", SCHEME, new_knob=5)
    assert base.config()["new_knob"] == 3 and changed.config()["new_knob"] == 5 and changed.new_knob == 5
    assert _method_digest(changed, True) != _method_digest(base, True)
    assert "--new-knob" in _help("quantize")
    args = _parse_quantize(["--method", "knob", "--new-knob", "5", "--alpha", "0.25"])
    assert method_options(args, QUANT_METHODS, "knob") == {"new_knob": 5, "alpha": 0.25}
    with pytest.raises(CLIError, match="^--new-knob must be an integer >= 1, got 0$"):
        method_options(_parse_quantize(["--method", "knob", "--new-knob", "0"]), QUANT_METHODS, "knob")
    with pytest.raises(CLIError, match="unknown option --new-knob for method smoothquant"):
        method_options(_parse_quantize(["--method", "smoothquant", "--new-knob", "5"]), QUANT_METHODS, "smoothquant")
    assert parse_recipe({"steps": [{"quantize": {"method": "knob", "new_knob": 5}}]})[0]["new_knob"] == 5


def test_methods_sharing_a_flag_agree_on_its_type():
    """One flag per option name across the methods of a command (build_parser refuses a disagreement)."""
    for methods in (QUANT_METHODS, SPARSE_METHODS):
        seen = {}
        for m, cls in methods.items():
            for f in dataclasses.fields(cls.Options):
                seen.setdefault(flag_of(f), set()).add(f.name)
        assert all(len(names) == 1 for names in seen.values()), seen


def test_the_artifact_json_of_a_sparsify_run_has_every_option(tokenizer):
    from mmcompress.sparse.api import sparsify

    from .conftest import text_samples, tiny_model

    model, tok = tiny_model("llama", tokenizer=tokenizer, layers=2)
    sparsify(model, text_samples(tok, n=2), "cats", 0.2, max_mlp_sparsity=0.5, progress=False)
    method = model._mmcompress_description["method"]
    config = make_sparse_method("cats", sparsity=0.2, max_mlp_sparsity=0.5).config()
    assert {k: method[k] for k in config if k != "plan"} == {k: v for k, v in config.items() if k != "plan"}
    assert method["max_mlp_sparsity"] == 0.5 and method["plan"] == "cats"  # the plan the run used, not its name
