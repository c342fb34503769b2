"""``quantize`` streams by default: one decoder layer in memory at a time, the same artifact bytes as the
in-memory path (``--in-memory``), and a run writes its layers once."""

from __future__ import annotations

import json

import pytest
import torch

from mmcompress import fileio
from mmcompress.cli import main
from .tiny_models import save_tiny


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
    if written == 0:
        pytest.skip(f"{tmp_path} is on a file system that counts no written bytes (tmpfs)")
    out = tmp_path / "out"
    artifact = (out / "model.safetensors").stat().st_size
    side_files = sum(p.stat().st_size for p in out.iterdir() if p.name != "model.safetensors")
    activations = nsamples * seqlen * hidden * 4 * (2 if method == "masquant" else 1)  # float32; masquant: 2 chains
    assert written <= 1.5 * artifact + activations + side_files + 64 * 1024, (written, artifact, side_files)


@pytest.fixture(params=["qwen2_5_vl", "qwen2_5_omni"])
def mm_dir(request, tmp_path, tokenizer):
    """A tiny VL / Omni model whose checkpoint has the names transformers renames on load, with a
    calibration file of image (and audio) samples, so that the towers run in the capture pass."""
    from mmcompress.models.processing import save_processor
    from .tiny_models import tiny_model, tiny_processor

    from .conftest import make_image, write_wav

    kind = request.param
    d = tmp_path / kind
    model, tok = tiny_model(kind, tokenizer=tokenizer)
    model.save_pretrained(d)
    save_processor(tiny_processor(kind, tok), d)
    make_image(1).save(tmp_path / "img.png")
    lines = [{"text": "describe the red fox", "images": ["img.png"]}, {"text": "just text here"}]
    if kind == "qwen2_5_omni":
        write_wav(tmp_path / "a.wav", 1.0)
        lines.append({"text": "transcribe", "audio": ["a.wav"]})
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return d, tmp_path / "calib.jsonl"


@pytest.mark.parametrize("method, extra", [("smoothquant", []),
                                           ("masquant", ["--scheme", "w4a8", "--epochs", "1", "--loss-weights", "scripted"])])
def test_multimodal_models_stream_with_the_same_bytes(tmp_path, mm_dir, method, extra, capsys):
    """VL / Omni: the checkpoint's names are mapped by transformers' renaming rules, the towers are read
    for the capture pass only, and the artifact is the in-memory one."""
    model_dir, calib = mm_dir
    argv = ["quantize", str(model_dir), "--method", method, "--calib", str(calib), "--no-progress", *extra]
    assert main(argv + ["--output", str(tmp_path / "memory"), "--in-memory"]) == 0
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "streamed"), "--stream"]) == 0  # --stream: refused if not streamed
    assert "notice" not in capsys.readouterr().err
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")


def test_gradient_probes_fall_back_with_a_notice(tmp_path, calib_text, capsys, tokenizer):
    """MASQuant's --loss-weights auto probes gradients through the whole model on multimodal data: the
    default run says so in one line and loads the whole model; --stream makes it an error."""
    src = save_tiny(tmp_path / "vl", "qwen2_5_vl", tokenizer=tokenizer)
    argv = ["quantize", str(src), "--method", "masquant", "--scheme", "w4a8", "--epochs", "1", "--calib",
            str(calib_text), "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    capsys.readouterr()
    assert main(argv + ["--output", str(tmp_path / "out")]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "notice" in line]
    assert len(notes) == 1 and "loading the whole model into memory (not streamed: --method masquant with " \
        "--loss-weights auto probes gradients" in notes[0], notes
    assert main(argv + ["--output", str(tmp_path / "forced"), "--stream"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mmcompress quantize: error: --stream: --method masquant") and \
        err[-1].endswith("run with --in-memory")
    assert not (tmp_path / "forced").exists()


@pytest.mark.parametrize("mode", [[], ["--in-memory"]])
def test_resume_replays_the_uncompressed_chain_in_float32(tmp_path, calib_text, mode):
    """No activations are checkpointed: a resumed MASQuant run on a bfloat16 model recomputes both chains
    through the finished layers (the uncompressed one in float32, as its step ran) and ends bit-identical."""
    src = save_tiny(tmp_path / "model", "qwen2", layers=3, tie=True, dtype=torch.bfloat16)
    extra = ["--scheme", "w4a8", "--epochs", "1", *mode]
    _run(src, calib_text, tmp_path / "ref", "masquant", *extra)

    def stop(name):
        if name == "checkpoint.state:1":
            raise KeyboardInterrupt

    argv = ["quantize", str(src), "--method", "masquant", "--calib", str(calib_text), "--nsamples", "3",
            "--seqlen", "24", "--no-progress", "--output", str(tmp_path / "out"), *extra]
    with fileio.step_hook(stop):
        assert main(argv) == 130
    ck = tmp_path / "out.ckpt"
    assert json.loads((ck / "state.json").read_text())["next_layer"] == 2
    assert not list(ck.glob("acts_*"))
    assert main(argv + ["--resume"]) == 0
    _same_artifact(tmp_path / "ref", tmp_path / "out")
