"""``sparsify --resume`` and ``compress --recipe --resume``: a run killed with SIGKILL at a commit step and
resumed writes the artifact of an uninterrupted run, byte for byte (the replay recomputes the dense chain
the sparsity step observes through the input layers, the compressed chain through the finished ones,
and restores what the walk recorded per layer: greedy levels, installed thresholds)."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from mmcompress import fileio
from mmcompress.cli import main
from . import _kill_at_step as K
from .tiny_models import save_tiny

RECIPE = "steps:\n  - sparsify: {method: larosa, sparsity: 0.4}\n  - quantize: {method: rtn, scheme: w8a8}\n"


@pytest.fixture
def src(tmp_path):
    return save_tiny(tmp_path / "model", "llama", layers=3)


def _argv(cmd, src, calib, out, extra):
    if cmd == "compress":
        recipe = out.parent / "recipe.yaml"
        if not recipe.exists():
            recipe.write_text(RECIPE)
        head = ["compress", src, "--recipe", recipe]
    else:
        head = ["sparsify", src]
    return [str(a) for a in [*head, "--calib", calib, "--nsamples", 3, "--seqlen", 24, "--no-progress",
                             "--output", out, *extra]]


def _manifest(path):
    def timeless(d):  # the run's seconds differ
        if isinstance(d, dict):
            return {k: timeless(v) for k, v in d.items() if k not in ("seconds", "walks")}
        return [timeless(v) for v in d] if isinstance(d, list) else d

    return timeless(json.loads((path / "mmcompress.json").read_text()))


def _same(a, b, what):
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes(), what
    assert _manifest(a) == _manifest(b), what


def _kinds(names: list[str], every: bool) -> list[str]:
    """One kill point per kind of step (``NAME@K``; the digits of a name are its layer): the second
    occurrence where there is one (a layer after a finished one), else the first; ``every=False``: the
    checkpoint's commit steps alone."""
    by_kind: dict[str, list[str]] = {}
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        by_kind.setdefault(re.sub(r"\d+", "N", n), []).append(f"{n}@{seen[n]}")
    picks = [v[min(1, len(v) - 1)] for v in by_kind.values()]
    if not every:
        picks = [p for p in picks if p.startswith(("checkpoint.layer", "checkpoint.state"))]
    return picks


CASES = {
    "larosa-merged": ("sparsify", ["--method", "larosa", "--sparsity", "0.4"], True),
    "larosa-merged-in-memory": ("sparsify", ["--method", "larosa", "--sparsity", "0.4", "--in-memory"], False),
    "larosa-greedy": ("sparsify", ["--method", "larosa", "--sparsity", "0.1", "--plan", "greedy",
                                   "--prefill", "last_half"], False),
    "larosa-grid": ("sparsify", ["--method", "larosa", "--sparsity", "0.4", "--plan", "grid"], False),
    "teal-uniform": ("sparsify", ["--method", "teal", "--sparsity", "0.4"], False),
    "teal-greedy": ("sparsify", ["--method", "teal", "--sparsity", "0.1", "--plan", "greedy"], False),
    "cats": ("sparsify", ["--method", "cats", "--sparsity", "0.3"], False),
    "recipe-larosa-rtn": ("compress", [], True),
    "recipe-larosa-rtn-in-memory": ("compress", ["--in-memory"], False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kill_at_each_commit_step_then_resume_is_byte_identical(tmp_path, src, calib_text, case):
    cmd, extra, every = CASES[case]
    ref, out = tmp_path / "ref", tmp_path / "out"
    names: list[str] = []
    with fileio.step_hook(names.append):
        assert main(_argv(cmd, src, calib_text, ref, extra)) == 0
    kills = _kinds(names, every)
    assert any(k.startswith("checkpoint.state:1") for k in kills), kills
    for step in kills:
        if out.exists():
            shutil.rmtree(out)
        args = _argv(cmd, src, calib_text, out, extra + ["--overwrite"])  # a kill after the output was swapped in
        assert K.run(args, kill=step) == -9, step
        assert not (out / "model.safetensors").exists() or step.startswith("output."), step
        state = tmp_path / "out.ckpt" / "state.json"
        if step.startswith("checkpoint.state:1"):  # layers 0 and 1 committed: the resume replays them
            assert json.loads(state.read_text())["next_layer"] == 2, step
        assert main(args + ["--resume"]) == 0, step
        _same(ref, out, step)
        assert not (tmp_path / "out.ckpt").exists() or not any((tmp_path / "out.ckpt").iterdir()), step


def _interrupt(argv, at="checkpoint.state:0"):
    def stop(name):
        if name == at:
            raise KeyboardInterrupt

    with fileio.step_hook(stop):
        assert main(argv) == 130


def _one_error(capsys, *parts):
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("mmcompress ") and all(p in err[0] for p in parts), err


def test_resume_with_other_options_is_a_one_line_error(tmp_path, src, calib_text, capsys):
    out = tmp_path / "out"
    base = ["--method", "teal", "--sparsity", "0.4"]
    _interrupt(_argv("sparsify", src, calib_text, out, base))
    capsys.readouterr()
    for other in (["--method", "teal", "--sparsity", "0.3"], ["--method", "teal", "--sparsity", "0.4", "--prefill", "none"],
                  ["--method", "cats", "--sparsity", "0.4"]):
        assert main(_argv("sparsify", src, calib_text, out, other + ["--resume"])) == 1
        _one_error(capsys, "another method or method configuration", "run without --resume")
    assert main(_argv("sparsify", src, calib_text, out, base + ["--resume"])) == 0


def test_resume_of_a_recipe_with_other_steps_is_a_one_line_error(tmp_path, src, calib_text, capsys):
    out = tmp_path / "out"
    _interrupt(_argv("compress", src, calib_text, out, []))
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("w8a8", "w4a8"))
    capsys.readouterr()
    assert main(_argv("compress", src, calib_text, out, ["--resume"])) == 1
    _one_error(capsys, "another method or method configuration")


def test_resume_with_nothing_to_resume_starts_afresh_with_a_notice(tmp_path, src, calib_text, capsys):
    """As ``quantize --resume``: a run killed before its first layer was committed resumes from layer 0."""
    extra = ["--method", "cats", "--sparsity", "0.3"]
    assert main(_argv("sparsify", src, calib_text, tmp_path / "ref", extra)) == 0
    capsys.readouterr()
    assert main(_argv("sparsify", src, calib_text, tmp_path / "out", extra + ["--resume"])) == 0
    assert "nothing to resume" in capsys.readouterr().err
    _same(tmp_path / "ref", tmp_path / "out", "afresh")


@pytest.mark.parametrize("cmd, extra, message", [
    ("sparsify", ["--method", "larosa", "--sparsity", "0.4", "--basis", "both", "--in-memory"], "one layer late"),
    ("sparsify", ["--method", "larosa", "--sparsity", "0.4", "--basis", "both"], "one layer late"),
    ("compress", ["--in-memory"], "2 walks"),
    ("compress", [], "2 walks"),
])
def test_runs_in_stages_refuse_resume_in_one_line(tmp_path, src, calib_text, capsys, cmd, extra, message):
    if cmd == "compress":  # a grid step before another walks twice
        (tmp_path / "recipe.yaml").write_text("steps:\n  - sparsify: {method: larosa, sparsity: 0.4, plan: grid}\n"
                                              "  - quantize: {method: rtn, scheme: w8a8}\n")
    assert main(_argv(cmd, src, calib_text, tmp_path / "out", extra + ["--resume"])) == 1
    _one_error(capsys, message, "run without --resume")


def test_a_recipe_whose_chains_cannot_be_replayed_says_so(tmp_path, src, calib_text, capsys):
    """LaRoSA then SmoothQuant keeps the sparse model's chain (through a layer state between the two steps,
    which the checkpoint does not hold): killed after a finished layer, it cannot be resumed."""
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("rtn", "smoothquant"))
    out = tmp_path / "out"
    _interrupt(_argv("compress", src, calib_text, out, []), at="checkpoint.state:1")
    capsys.readouterr()
    assert main(_argv("compress", src, calib_text, out, ["--resume"])) == 1
    _one_error(capsys, "cannot be resumed", "run without --resume")
