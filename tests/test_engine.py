import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.engine import capture_inputs
from mmcompress.models import get_adapter

from .conftest import text_samples, tiny_model
from .test_cli import ENV, run_cli

HERE = Path(__file__).parent


def _probe(layers, method="smoothquant"):
    # glibc returns freed large blocks to the OS only below the mmap threshold; pin it so RSS
    # measures live memory rather than allocator caching
    env = {**ENV, "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, str(HERE / "_memprobe.py"), str(layers), method], capture_output=True,
                       text=True, env=env, timeout=300, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_peak_memory_grows_with_one_layer_not_with_depth():
    shallow, deep = _probe(4), _probe(12)
    layer = shallow["layer_bytes"]
    # 8 more layers (134 MB of fp32 weights) must not raise the extra peak by more than half a layer
    assert deep["extra_peak"] - shallow["extra_peak"] < 0.5 * layer, (shallow, deep)
    assert deep["extra_peak"] < 3 * layer, deep


def test_capture_records_per_layer_kwargs_for_gemma3_sliding_and_global(tokenizer):
    model, tok = tiny_model("gemma3", layers=6, tokenizer=tokenizer)
    adapter = get_adapter(model)
    cap = capture_inputs(model, adapter, text_samples(tok, n=2, seqlen=40), progress=False)
    kinds = model.config.layer_types
    assert len(set(kinds)) == 2
    kw = cap.layer_kwargs[0]
    # layers of the same attention type share the same cached position embeddings
    first = {t: kw[i]["position_embeddings"] for i, t in reversed(list(enumerate(kinds)))}
    for i, t in enumerate(kinds):
        assert kw[i]["position_embeddings"] is first[t]
    # and running layer by layer reproduces the model's own forward
    x = cap.hidden[0]
    with torch.no_grad():
        for i, layer in enumerate(adapter.layers):
            x = layer(x, **kw[i])
        ref = model.model(input_ids=text_samples(tok, n=2, seqlen=40)[0]["input_ids"]).last_hidden_state
    assert torch.allclose(model.model.norm(x), ref, atol=1e-5)


def test_kill_after_layer_3_then_resume_is_bit_identical(tmp_path, calib_text):
    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "tiny8", "llama", layers=8)
    args = ["quantize", src, "--method", "smoothquant", "--scheme", "w4a8", "--calib", calib_text, "--nsamples", 4,
            "--seqlen", 32, "--no-progress"]
    run_cli(*args, "--output", tmp_path / "full")
    ckpt = tmp_path / "ck"
    from . import _kill_at_step

    killed = _kill_at_step.run([*args, "--output", tmp_path / "resumed", "--checkpoint-dir", ckpt],
                               kill="checkpoint.state:3@1")  # kill -9 right after layer 3 is committed
    assert killed == -9
    assert not (tmp_path / "resumed").exists()
    assert json.loads((ckpt / "state.json").read_text())["next_layer"] == 4
    run_cli(*args, "--output", tmp_path / "resumed", "--checkpoint-dir", ckpt, "--resume")
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_checkpoint_of_another_method(tmp_path, tokenizer):
    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok))
    ck = tmp_path / "ck"
    mmcompress.quantize(model, calib, "rtn", "w8a8", checkpoint_dir=ck, progress=False)
    model2, _ = tiny_model("llama", layers=3, tokenizer=tokenizer)
    with pytest.raises(RuntimeError, match="another method"):
        mmcompress.quantize(model2, calib, "smoothquant", "w8a8", checkpoint_dir=ck, resume=True, progress=False)
