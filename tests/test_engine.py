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


def _interrupted(run, layer: int) -> None:
    """``run(on_layer_done)`` stopped after decoder layer ``layer`` was committed."""
    def stop(i, info):
        if i == layer:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(stop)


@pytest.mark.parametrize("method,options", [("smoothquant", {}), ("masquant", {"epochs": 1})])
def test_resumed_run_describes_every_layer(tmp_path, tokenizer, method, options):
    """A resumed run's description lists every layer's info (the finished ones come back from the
    checkpoint's state.json), and MASQuant's summary counts the finished layers (Method.replayed)."""
    import copy

    from mmcompress.engine import run_layerwise
    from mmcompress.quant.api import make_method
    from mmcompress.quant.quantizer import resolve_scheme

    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok))
    ref = mmcompress.quantize(copy.deepcopy(model), calib, method, "w8a8", progress=False, **options)
    ck = tmp_path / "ck"
    m = copy.deepcopy(model)
    _interrupted(lambda stop: run_layerwise(m, get_adapter(m), make_method(method, resolve_scheme("w8a8"), **options),
                                            calib.samples, checkpoint_dir=ck, on_layer_done=stop, progress=False), 1)
    out = mmcompress.quantize(copy.deepcopy(model), calib, method, "w8a8", progress=False, checkpoint_dir=ck,
                              resume=True, **options)
    a, b = out._mmcompress_description, ref._mmcompress_description
    assert [info["layer"] for info in a["layers"]] == [0, 1, 2]
    dump = lambda d: json.dumps(d, sort_keys=True, default=str)
    assert dump(a["layers"]) == dump(b["layers"])
    assert dump(a.get("method_summary")) == dump(b.get("method_summary"))
    if method == "masquant":
        assert a["method_summary"]["linear_macs_per_token"] > 0


def test_teal_greedy_resumes_with_the_same_draws(tmp_path, tokenizer):
    """TEAL's greedy search draws each layer's magnitude sample with a generator of that layer's own (the
    run's seed and the layer index) and checkpoints its chosen levels: a resumed run picks the same
    thresholds as an uninterrupted one and describes every layer."""
    import copy

    from mmcompress.engine import run_layerwise
    from mmcompress.sparse.methods.teal import GreedyAllocation

    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    samples = text_samples(tok, n=2)
    ref = GreedyAllocation(0.2)
    m = copy.deepcopy(model)
    run_layerwise(m, get_adapter(m), ref, samples, progress=False)
    ck = tmp_path / "ck"
    m = copy.deepcopy(model)
    _interrupted(lambda stop: run_layerwise(m, get_adapter(m), GreedyAllocation(0.2), samples,
                                            checkpoint_dir=ck, on_layer_done=stop, progress=False), 1)
    again = GreedyAllocation(0.2)
    m = copy.deepcopy(model)
    run_layerwise(m, get_adapter(m), again, samples, checkpoint_dir=ck, resume=True, progress=False)
    assert again.description() == ref.description()
    assert again.thresholds == ref.thresholds and len(again.thresholds) == 3
