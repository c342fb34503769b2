"""Never lose a user's files (issue 13, "Data loss"): real directories with sentinel files, kill -9 at
every commit step (checked by hashing the result against an uninterrupted run), concurrent runs,
foreign checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch

import mmcompress
from mmcompress import fileio
from mmcompress.cli import main
from mmcompress.data import CalibrationSet

from . import _kill_at_step as K
from .conftest import text_samples, tiny_model

SENTINEL = "do not delete me"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from .tiny_models import save_tiny

    root = tmp_path_factory.mktemp("assets")
    model = save_tiny(root / "model", "llama", layers=2)
    calib = root / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. Images, audio and text tokens. " * 40)
    return model, calib


def _q(model, calib, out, *extra):
    return ["quantize", str(model), "--method", "rtn", "--calib", str(calib), "--nsamples", "2", "--seqlen", "16",
            "--no-progress", "--output", str(out), *map(str, extra)]


def _sentinel(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "keep.txt").write_text(SENTINEL)
    return d / "keep.txt"


def _digest(d: Path) -> str:
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _main(capsys, argv) -> int:
    capsys.readouterr()  # only this command's stderr counts
    return main([str(a) for a in argv])


def _one_error(capsys, *fragments):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmcompress "), err
    for f in fragments:
        assert f in err[0], err[0]
    return err[0]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".mmcompress-" in p.name or p.name.endswith(".ckpt"))


# -- refusals (in-process: they stop before the model is loaded) ----------------------------------


def test_existing_nonempty_output_is_refused(tmp_path, assets, capsys):
    model, calib = assets
    keep = _sentinel(tmp_path / "out")
    assert _main(capsys, _q(model, calib, tmp_path / "out")) == 1
    _one_error(capsys, "exists and is not empty", "--overwrite")
    assert keep.read_text() == SENTINEL and sorted(os.listdir(tmp_path / "out")) == ["keep.txt"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["input", "parent_of_input", "inside_input", "dotdot"])
def test_overwrite_never_touches_the_input(tmp_path, assets, capsys, where):
    _, calib = assets
    from .tiny_models import save_tiny

    model = save_tiny(tmp_path / "zoo" / "model", "llama", layers=2)
    before = _tree(tmp_path / "zoo")
    out = {"input": model, "parent_of_input": tmp_path / "zoo", "inside_input": model / "sub",
           "dotdot": model / ".." / "model"}[where]
    assert _main(capsys, _q(model, calib, out, "--overwrite")) == 1
    _one_error(capsys, "input", "choose a directory outside it")
    assert _tree(tmp_path / "zoo") == before


@pytest.mark.parametrize("out", [".", ".."])
def test_working_directory_and_its_parents_are_refused(tmp_path, assets, capsys, monkeypatch, out):
    model, calib = assets
    work = tmp_path / "work"
    keep = _sentinel(work)
    monkeypatch.chdir(work)
    assert _main(capsys, _q(model, calib, out, "--overwrite")) == 1
    _one_error(capsys, "working directory")
    assert keep.read_text() == SENTINEL


def test_sparsify_and_export_refuse_and_take_overwrite(tmp_path, assets, capsys, tokenizer):
    model, calib = assets
    keep = _sentinel(tmp_path / "out")
    sp = ["sparsify", str(model), "--method", "teal", "--sparsity", "0.3", "--calib", str(calib), "--nsamples", "2",
          "--seqlen", "16", "--no-progress", "--output"]
    assert _main(capsys, sp + [str(tmp_path / "out")]) == 1
    _one_error(capsys, "--overwrite")
    assert _main(capsys, sp + [str(model), "--overwrite"]) == 1
    _one_error(capsys, "is the input")
    art = tmp_path / "art"
    tiny, _ = tiny_model("llama", layers=1, tokenizer=tokenizer)
    mmcompress.save(mmcompress.quantize(tiny, [{"input_ids": torch.arange(8)[None]}], "rtn", "w8a8", progress=False),
                    art)
    before = _tree(art)
    assert _main(capsys, ["export", art, "--output", tmp_path / "out"]) == 1
    _one_error(capsys, "exists and is not empty", "--overwrite")
    assert _main(capsys, ["export", art, "--output", art, "--overwrite"]) == 1
    _one_error(capsys, "is the input")
    assert keep.read_text() == SENTINEL and _tree(art) == before


def test_sparsify_refuses_an_unrelated_ckpt_directory_and_leaves_it_alone(tmp_path, assets, capsys):
    """``sparsify`` keeps its resumable checkpoints in OUTPUT.ckpt, as ``quantize``: a directory there that is not
    ours is refused in one line, untouched."""
    model, calib = assets
    keep = _sentinel(tmp_path / "out.ckpt")
    assert _main(capsys, ["sparsify", str(model), "--method", "teal", "--sparsity", "0.3", "--calib", str(calib),
                          "--nsamples", "2", "--seqlen", "16", "--no-progress", "--output", str(tmp_path / "out")]) == 1
    _one_error(capsys, "not an mmcompress checkpoint directory")
    assert keep.read_text() == SENTINEL and sorted(os.listdir(tmp_path / "out.ckpt")) == ["keep.txt"]
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_unrelated_output_and_cleans_up(tmp_path, assets):
    model, calib = assets
    _sentinel(tmp_path / "out")
    assert main(_q(model, calib, tmp_path / "out" / ".." / "out", "--overwrite")) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "mmcompress.json").is_file()
    assert _leftovers(tmp_path) == []  # no work directory, no checkpoint directory


def test_user_checkpoint_dir_is_refused_or_kept(tmp_path, assets, capsys):
    model, calib = assets
    keep = _sentinel(tmp_path / "mine")
    assert _main(capsys, _q(model, calib, tmp_path / "out", "--checkpoint-dir", tmp_path / "mine")) == 1
    _one_error(capsys, "not an mmcompress checkpoint directory")
    assert sorted(os.listdir(tmp_path / "mine")) == ["keep.txt"] and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()  # an empty directory of the user: used, and left in place afterwards
    assert main(_q(model, calib, tmp_path / "out", "--checkpoint-dir", tmp_path / "empty")) == 0
    assert (tmp_path / "empty").is_dir() and os.listdir(tmp_path / "empty") == []
    assert keep.read_text() == SENTINEL


def test_report_never_overwrites_a_users_report(tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "report.md").write_text(SENTINEL)
    assert _main(capsys, ["report", str(d)]) == 1
    _one_error(capsys, "report.md exists and was not written by mmcompress", "--output")
    assert (d / "report.md").read_text() == SENTINEL
    assert main(["report", str(d), "--output", str(tmp_path / "rep")]) == 0
    first = (tmp_path / "rep" / "report.md").read_text()
    assert "hidden_size" in first and (d / "report.md").read_text() == SENTINEL
    assert main(["report", str(d), "--output", str(tmp_path / "rep")]) == 0  # our own report is replaced
    assert (tmp_path / "rep" / "report.md").read_text() == first


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_get_the_users_umask(tmp_path, tokenizer, mask):
    old = os.umask(mask)
    try:
        model, _ = tiny_model("llama", layers=1, tokenizer=tokenizer)
        out = mmcompress.save(model, tmp_path / "art")
        single = fileio.atomic_write_text(tmp_path / "one.txt", "x")
    finally:
        os.umask(old)
    for p in [out, *out.rglob("*"), single]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_stale_work_dirs_are_cleaned_only_with_our_marker(tmp_path, tokenizer):
    stale = tmp_path / ".art.mmcompress-999999-dead"
    (stale / "new").mkdir(parents=True)
    (stale / fileio.MARKER).write_text(json.dumps({"pid": 999999}))
    foreign = tmp_path / ".art.mmcompress-123-user"  # the same pattern without our marker
    keep = _sentinel(foreign)
    model, _ = tiny_model("llama", layers=1, tokenizer=tokenizer)
    mmcompress.save(model, tmp_path / "art")
    assert not stale.exists() and keep.read_text() == SENTINEL


def test_a_work_dir_is_ours_and_goes_with_the_run(tmp_path, tokenizer):
    """``fileio.WorkDir`` (a streamed recipe's intermediate model): a marked, locked sibling of the output that
    does not count as another run writing it, deletes its own directories and nothing else, and a killed
    run's is cleaned by the next run on that output."""
    out = tmp_path / "art"
    work = fileio.WorkDir(out)
    sub = work.create("walk-1")
    (sub / "model.safetensors").write_bytes(b"x")
    keep = _sentinel(tmp_path / "mine")
    model, _ = tiny_model("llama", layers=1, tokenizer=tokenizer)
    mmcompress.save(model, out)  # this run's own work directory is no other writer
    assert sub.is_dir() and sub.parent.name.startswith(".art.mmcompress-")
    work.discard(keep.parent)  # not one of its directories
    assert keep.read_text() == SENTINEL
    work.remove()
    assert not sub.parent.exists() and keep.read_text() == SENTINEL and (out / "model.safetensors").is_file()
    dead = tmp_path / ".art.mmcompress-999999-dead"  # a killed run's
    (dead / "walk-1").mkdir(parents=True)
    (dead / fileio.MARKER).write_text(json.dumps({"pid": 999999, "output": "art", "work": True}))
    mmcompress.save(model, out, overwrite=True)
    assert not dead.exists() and keep.read_text() == SENTINEL


def test_fallback_swap_killed_between_renames_restores_the_old_output(tmp_path, assets):
    """Without renameat2(RENAME_EXCHANGE): old renamed aside, then killed; the next run puts it back."""
    model, calib = assets
    out = tmp_path / "out"
    _sentinel(out)
    before = _tree(out)
    assert K.run(_q(model, calib, out, "--overwrite"), kill="output.aside@1", no_exchange=True) == -9
    assert not out.exists()  # the window the fallback has (renameat2 has none)
    fileio.clean_stale(out)
    assert _tree(out) == before and _leftovers(tmp_path) == ["out.ckpt"]  # the checkpoint stays for --resume
    assert K.run(_q(model, calib, out, "--overwrite"), no_exchange=True) == 0
    assert (out / "mmcompress.json").is_file() and _leftovers(tmp_path) == []


# -- kill -9 at every step, concurrent runs, foreign checkpoints (child processes) --------------


def test_kill_at_every_commit_step_then_resume_matches_an_uninterrupted_run(tmp_path, assets):
    model, calib = assets
    steps = tmp_path / "steps.txt"
    old = tmp_path / "old"  # an earlier artifact at the output path: each kill must leave it or the new one
    assert K.run(_q(model, calib, old)) == 0
    old_digest = _digest(old)
    ref = tmp_path / "ref"
    assert K.run(_q(model, calib, ref, "--method", "smoothquant"), record=str(steps)) == 0
    want = _digest(ref)
    assert want != old_digest
    names = steps.read_text().split()
    ck_steps = [s for s in names if not s.startswith("output.")]
    assert sum(s.startswith("checkpoint.state:") for s in names) == 2 and len(ck_steps) >= 9
    assert "checkpoint.planned@1" in names and "artifact.filled@1" in names  # streamed: layers written in place
    out = tmp_path / "out"
    for step in names:
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(old, out)
        args = _q(model, calib, out, "--method", "smoothquant", "--overwrite")
        assert K.run(args, kill=step) == -9, step
        # at any instant the output path holds a complete artifact: the old one or the new one
        assert _digest(out) in (old_digest, want), step
        assert K.run(args + ["--resume"]) == 0, step
        assert _digest(out) == want, step
        assert _leftovers(tmp_path) == [], (step, _leftovers(tmp_path))


def test_two_runs_on_one_output_second_refused_first_unaffected(tmp_path, assets):
    model, calib = assets
    ref = tmp_path / "ref"
    assert K.run(_q(model, calib, ref, "--method", "smoothquant")) == 0
    out, go = tmp_path / "out", tmp_path / "go"
    args = _q(model, calib, out, "--method", "smoothquant")
    first = K.start(args, pause="checkpoint.state:0@1", go=str(go))
    t0 = time.time()
    while not Path(str(go) + ".paused").exists():
        assert time.time() - t0 < 120 and first.is_alive()
        time.sleep(0.05)
    assert K.run(args + ["--overwrite"]) == 1  # at once, while the first holds the checkpoint lock
    go.touch()
    first.join(120)
    assert first.exitcode == 0
    assert _digest(out) == _digest(ref) and _leftovers(tmp_path) == []


def test_second_run_error_names_the_first_runs_pid(tmp_path, assets, capsys):
    model, calib = assets
    out = tmp_path / "out"
    ck = fileio.CheckpointDir(tmp_path / "out.ckpt").open()  # as a running quantize holds it
    try:
        assert _main(capsys, _q(model, calib, out)) == 1
        _one_error(capsys, "in use by another mmcompress run", f"pid {os.getpid()}")
    finally:
        ck.close()
    assert not out.exists()


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, tokenizer):
    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok, n=2, seqlen=16))
    ck = tmp_path / "ck"
    mmcompress.quantize(model, calib, "rtn", "w8a8", checkpoint_dir=ck, progress=False)
    other, _ = tiny_model("llama", layers=3, tokenizer=tokenizer)
    with torch.no_grad():  # the same layer-0 inputs (same embeddings), another layer 2
        other.model.layers[2].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(RuntimeError, match="another model"):
        mmcompress.quantize(other, calib, "rtn", "w8a8", checkpoint_dir=ck, resume=True, progress=False)
    with pytest.raises(RuntimeError, match="another calibration set"):
        mmcompress.quantize(tiny_model("llama", layers=3, tokenizer=tokenizer)[0],
                            CalibrationSet(text_samples(tok, n=3, seqlen=16)), "rtn", "w8a8", checkpoint_dir=ck,
                            resume=True, progress=False)
    with pytest.raises(RuntimeError, match="another method"):
        mmcompress.quantize(tiny_model("llama", layers=3, tokenizer=tokenizer)[0], calib, "rtn", "w4a8",
                            checkpoint_dir=ck, resume=True, progress=False)
