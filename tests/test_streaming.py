"""``quantize --stream``: one decoder layer in memory at a time, the same artifact bytes as the in-memory path."""

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
    _run(src, calib_text, tmp_path / "memory", method, *extra)
    _run(src, calib_text, tmp_path / "streamed", method, "--stream", *extra)
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
    _run(src, calib_text, tmp_path / "out", "smoothquant", "--stream")
    assert [i for i, _, _ in seen] == [0, 1, 2]
    for i, others, current_meta in seen:
        assert all(others), i
        assert not current_meta, i


def test_streamed_resume_after_interruption_is_byte_identical(tmp_path, calib_text):
    src = save_tiny(tmp_path / "model", "llama", layers=3)
    _run(src, calib_text, tmp_path / "memory", "smoothquant")

    def stop(name):
        if name == "checkpoint.state:1":
            raise KeyboardInterrupt

    argv = ["quantize", str(src), "--method", "smoothquant", "--calib", str(calib_text), "--nsamples", "3",
            "--seqlen", "24", "--no-progress", "--output", str(tmp_path / "streamed"), "--stream"]
    with fileio.step_hook(stop):
        assert main(argv) == 130
    assert not (tmp_path / "streamed").exists()
    state = json.loads((tmp_path / "streamed.ckpt" / "state.json").read_text())
    assert state["next_layer"] == 2
    assert main(argv + ["--resume"]) == 0
    _same_artifact(tmp_path / "memory", tmp_path / "streamed")


def test_streaming_a_renamed_checkpoint_is_refused(tmp_path, calib_text, capsys, tokenizer):
    """transformers renames Qwen2.5-VL's checkpoint tensors on load: --stream cannot find them, and says so."""
    src = save_tiny(tmp_path / "vl", "qwen2_5_vl", tokenizer=tokenizer)
    rc = main(["quantize", str(src), "--method", "smoothquant", "--calib", str(calib_text), "--nsamples", "2",
               "--seqlen", "16", "--no-progress", "--output", str(tmp_path / "out"), "--stream"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "under the model's names (transformers renames it on load); run without --stream" in err[-1]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.ckpt").exists()
