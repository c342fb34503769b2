"""``quantize`` streams by default: one decoder layer in memory at a time, the same artifact bytes as the
in-memory path (``--in-memory``), and a run writes its layers once."""

from __future__ import annotations

import json

import pytest
import torch

from mmcompress import fileio
from mmcompress.cli import main
from mmcompress.models.tiny import save_tiny


def _run(model_dir, calib, out, method, *extra):
    argv = ["quantize", str(model_dir), "--method", method, "--calib", str(calib), "--nsamples", "3",
            "--seqlen", "24", "--no-progress", "--output", str(out), *map(str, extra)]
    assert main(argv) == 0


def _same_artifact(a, b):
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    ma, mb = (json.loads((d / "mmcompress.json").read_text()) for d in (a, b))
    assert ma["modules"] == mb["modules"] and ma["dtype"] == mb["dtype"]


@pytest.mark.parametrize("kind, dtype, tie", [("llama", "float32", False), ("qwen2", "bfloat16", True)])
@pytest.mark.parametrize("method, extra", [("rtn", []), ("smoothquant", []), ("awq", ["--scheme", "w4a16"]),
                                           ("mbq", ["--scheme", "w4a8"]), ("masquant", ["--scheme", "w4a8", "--epochs", "1"])])
def test_streamed_artifact_is_byte_identical(tmp_path, calib_text, kind, dtype, tie, method, extra):
    src = save_tiny(tmp_path / "model", kind, layers=3, tie=tie, dtype=getattr(torch, dtype))
    _run(src, calib_text, tmp_path / "memory", method, "--in-memory", *extra)
    _run(src, calib_text, tmp_path / "streamed", method, *extra)  # the default
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")
    assert not (tmp_path / "streamed.ckpt").exists() or not any((tmp_path / "streamed.ckpt").iterdir())


def test_streamed_layers_are_released(tmp_path, calib_text, monkeypatch):
    """While layer i is processed, every other decoder layer's parameters are on the meta device."""
    from mmcompress import engine

    src = save_tiny(tmp_path / "model", "llama", layers=3)
    seen = []
    real = engine.LayerContext.__init__

    def spy(self, index, layer, adapter, captured, *a, **kw):
        real(self, index, layer, adapter, captured, *a, **kw)
        layers = list(adapter.layers) if hasattr(adapter, "layers") else []
        seen.append((index, [all(p.is_meta for p in other.parameters()) for k, other in enumerate(layers) if k != index],
                     any(p.is_meta for p in layer.parameters())))

    monkeypatch.setattr(engine.LayerContext, "__init__", spy)
    _run(src, calib_text, tmp_path / "out", "smoothquant")
    assert [i for i, _, _ in seen] == [0, 1, 2]
    for i, others, current_meta in seen:
        assert all(others), i
        assert not current_meta, i


@pytest.mark.parametrize("stop_at", ["checkpoint.layer:1", "checkpoint.state:1", "output.written"])
def test_streamed_resume_after_interruption_is_byte_identical(tmp_path, calib_text, stop_at):
    src = save_tiny(tmp_path / "model", "llama", layers=3)
    _run(src, calib_text, tmp_path / "memory", "smoothquant", "--in-memory")

    def stop(name):
        if name == stop_at:
            raise KeyboardInterrupt

    argv = ["quantize", str(src), "--method", "smoothquant", "--calib", str(calib_text), "--nsamples", "3",
            "--seqlen", "24", "--no-progress", "--output", str(tmp_path / "streamed")]
    with fileio.step_hook(stop):
        assert main(argv) == 130
    assert not (tmp_path / "streamed").exists()
    state = json.loads((tmp_path / "streamed.ckpt" / "state.json").read_text())
    assert state["next_layer"] == {"checkpoint.layer:1": 1, "checkpoint.state:1": 2, "output.written": 3}[stop_at]
    assert set(state["where"].values()) == {"artifact"}  # written into the artifact, no layer files
    assert not list((tmp_path / "streamed.ckpt").glob("layer_*")) and not list((tmp_path / "streamed.ckpt").glob("acts_*"))
    assert main(argv + ["--resume"]) == 0
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")
    assert not (tmp_path / "streamed.ckpt").exists() or not any((tmp_path / "streamed.ckpt").iterdir())


def test_a_layer_that_does_not_fit_the_planned_artifact_goes_to_a_file(tmp_path, calib_text, monkeypatch):
    """The artifact's layout is planned from the first finished layer; a layer that comes out otherwise is
    kept in its own checkpoint file and the artifact is assembled from both, with the same bytes."""
    from mmcompress import streaming

    src = save_tiny(tmp_path / "model", "llama", layers=3)
    _run(src, calib_text, tmp_path / "memory", "awq", "--scheme", "w4a16", "--in-memory")
    real = streaming.ArtifactLayout.fits
    files = []

    def fits(self, tensors, prefix=None):
        if prefix == "model.layers.1.":
            files.append(prefix)
            return False
        return real(self, tensors, prefix)

    monkeypatch.setattr(streaming.ArtifactLayout, "fits", fits)
    _run(src, calib_text, tmp_path / "streamed", "awq", "--scheme", "w4a16")
    assert files == ["model.layers.1."]
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")


def _write_bytes() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/self/io")


@pytest.mark.parametrize("method, extra", [("smoothquant", []), ("masquant", ["--scheme", "w4a8", "--epochs", "1"])])
def test_a_run_writes_its_artifact_about_once(tmp_path, calib_text, method, extra):
    """Issue 21: the bytes a whole run writes (checkpoints, artifact) stay within 1.5x the artifact plus one
    set of calibration activations (here: none is written at all), counted by the kernel for this process
    (/proc/self/io write_bytes, the bytes sent to the storage layer)."""
    import os

    src = save_tiny(tmp_path / "model", "llama", layers=4, hidden=256, intermediate=512)
    nsamples, seqlen, hidden = 3, 24, 256
    os.sync()
    before = _write_bytes()
    _run(src, calib_text, tmp_path / "out", method, *extra)
    written = _write_bytes() - before
    out = tmp_path / "out"
    artifact = (out / "model.safetensors").stat().st_size
    side_files = sum(p.stat().st_size for p in out.iterdir() if p.name != "model.safetensors")
    activations = nsamples * seqlen * hidden * 4 * (2 if method == "masquant" else 1)  # float32; masquant: 2 chains
    assert written <= 1.5 * artifact + activations + side_files + 64 * 1024, (written, artifact, side_files)


def test_streaming_a_renamed_checkpoint_falls_back_with_a_notice(tmp_path, calib_text, capsys, tokenizer):
    """transformers renames Qwen2.5-VL's checkpoint tensors on load: the default run says in one line why it
    loads the whole model; --stream makes that an error."""
    src = save_tiny(tmp_path / "vl", "qwen2_5_vl", tokenizer=tokenizer)
    argv = ["quantize", str(src), "--method", "smoothquant", "--calib", str(calib_text), "--nsamples", "2",
            "--seqlen", "16", "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "out")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    assert len(notes) == 1 and "loading the whole model into memory (not streamed: the checkpoint stores no tensor" \
        in notes[0] and "(transformers renames it on load)" in notes[0], notes
    assert (tmp_path / "out" / "model.safetensors").is_file()
    rc = main(argv + ["--output", str(tmp_path / "forced"), "--stream"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--stream: the checkpoint stores no tensor" in err[-1] and err[-1].endswith("run with --in-memory")
    assert not (tmp_path / "forced").exists() and not (tmp_path / "forced.ckpt").exists()
