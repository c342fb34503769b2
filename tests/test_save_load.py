import json

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet

from .conftest import mm_inputs, text_samples, tiny_model


@pytest.mark.parametrize("kind,method,scheme", [
    ("llama", "rtn", "w4a16"),
    ("qwen2", "smoothquant", "w8a8"),
    ("gemma3", "smoothquant", "w4a8"),
    ("qwen2_5_omni", "smoothquant", "w4a6"),
])
def test_save_load_same_logits(tmp_path, tokenizer, kind, method, scheme):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=(kind == "qwen2"))
    if kind.startswith("qwen2_5"):
        calib = CalibrationSet([mm_inputs(kind, tok, seed=s)[0] for s in range(2)])
        x = mm_inputs(kind, tok, seed=5)[0]
    else:
        calib = CalibrationSet(text_samples(tok))
        x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 20))}
    mmcompress.quantize(model, calib, method, scheme, progress=False)
    y = model(**x).logits
    out = mmcompress.save(model, tmp_path / "art")
    manifest = json.loads((out / "mmcompress.json").read_text())
    assert manifest["method"]["method"] == method and manifest["scheme"]
    assert all(spec["packed"] for spec in manifest["modules"].values())
    loaded = mmcompress.load(out, runtime="reference")
    assert torch.equal(loaded(**x).logits, y)
    # weights are stored as integer codes: the artifact is smaller than fp32 weights of the linears
    sd = {k: v for k, v in loaded.state_dict().items() if "weight_codes" in k}
    assert sd and all(v.dtype in (torch.int8, torch.uint8) for v in sd.values())


def test_load_rejects_plain_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mmcompress artifact"):
        mmcompress.load(tmp_path)


def test_load_model_takes_either_kind_of_directory(tmp_path, tiny_llama_dir):
    from mmcompress.models.loading import load_hf_model

    plain = mmcompress.load_model(tiny_llama_dir)
    x = torch.randint(0, 100, (1, 12))
    calib = CalibrationSet([{"input_ids": torch.randint(0, 100, (1, 16))} for _ in range(2)])
    mmcompress.quantize(plain, calib, "rtn", "w8a8", progress=False)
    y = plain(input_ids=x).logits
    art = mmcompress.save(plain, tmp_path / "art")
    again = mmcompress.load_model(art, runtime="reference")  # an artifact: mmcompress.load
    assert torch.equal(again(input_ids=x).logits, y)
    with pytest.raises(ValueError, match="is an mmcompress artifact: load it with mmcompress.load_model"):
        load_hf_model(art)  # models/ loads plain directories only
