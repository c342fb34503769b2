"""Artifacts made from a bf16 (or fp16) load run: save -> load -> forward / generate / eval.

Every method goes through the CLI from the same fp32 checkpoint twice, once loaded in float32 and
once in the half dtype; the half artifact must load, give finite logits close to the float32
artifact's (relative L2 distance of the logits below ``REL_TOL``) and generate.
"""

import json
import wave

import numpy as np
import pytest
import torch

import mmcompress
from mmcompress.cli import main
from mmcompress.models.loading import load_hf_model
from mmcompress.models.processing import save_processor
from mmcompress.models.tiny import tiny_model, tiny_processor

from .conftest import make_audio, make_image, mm_inputs

# Measured (tiny random models, 2-3 layers): 0.004-0.03 for bf16, less for fp16.  bf16 rounds the
# weights before quantization, so a few codes move by one step; 0.08 leaves room without hiding a
# broken artifact (a wrong scale or a dropped correction gives > 0.3).
REL_TOL = 0.08

TEXT_RUNS = {
    "rtn": ["quantize", "--method", "rtn", "--scheme", "w8a8"],
    "rtn-w4a16": ["quantize", "--method", "rtn", "--scheme", "w4a16"],
    "smoothquant": ["quantize", "--method", "smoothquant", "--scheme", "w8a8"],
    "awq": ["quantize", "--method", "awq", "--scheme", "w4a16"],
    "mbq": ["quantize", "--method", "mbq", "--scheme", "w4a8"],
    "masquant": ["quantize", "--method", "masquant", "--scheme", "w4a8", "--epochs", "1"],
    "larosa": ["sparsify", "--method", "larosa", "--sparsity", "0.4"],
    "teal": ["sparsify", "--method", "teal", "--sparsity", "0.4"],
    "cats": ["sparsify", "--method", "cats", "--sparsity", "0.4"],
    "recipe": ["compress", "--recipe", "RECIPE"],
}


def _run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 0, err
    return err


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def _make(name, model_dir, calib, out, dtype, capsys, tmp_path):
    cmd, *rest = TEXT_RUNS[name]
    if name == "recipe":
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text("steps:\n  - sparsify: {method: larosa, sparsity: 0.4}\n"
                          "  - quantize: {method: rtn, scheme: w8a8}\n")
        rest = ["--recipe", str(recipe)]
    _run([cmd, str(model_dir), *rest, "--calib", str(calib), "--nsamples", "4", "--seqlen", "32",
          "--dtype", dtype, "--output", str(out), "--no-progress"], capsys)
    return out


@pytest.mark.parametrize("name,dtype", [(n, "bfloat16") for n in TEXT_RUNS] + [("rtn", "float16"),
                                                                                ("masquant", "float16")])
def test_half_artifact_runs(name, dtype, tmp_path, tiny_llama_dir, calib_text, capsys):
    ref = mmcompress.load(_make(name, tiny_llama_dir, calib_text, tmp_path / "fp32", "float32", capsys, tmp_path))
    half_dir = _make(name, tiny_llama_dir, calib_text, tmp_path / dtype, dtype, capsys, tmp_path)
    assert json.loads((half_dir / "mmcompress.json").read_text())["dtype"] == dtype
    half = mmcompress.load(half_dir)
    assert all(p.dtype == getattr(torch, dtype) for n, p in half.named_parameters() if "norm" in n)
    x = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(3))
    y_half, y_ref = half(input_ids=x).logits, ref(input_ids=x).logits
    assert y_half.dtype == getattr(torch, dtype) and torch.isfinite(y_half).all()
    y_dense = load_hf_model(tiny_llama_dir)(input_ids=x).logits
    print("REL", name, dtype, _rel(y_half, y_ref), _rel(y_ref, y_dense))
    assert _rel(y_half, y_ref) < max(REL_TOL, _rel(y_ref, y_dense))
    gen = half.generate(input_ids=x, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 28)
    err = _run(["eval", str(half_dir), "--ppl", str(calib_text), "--seqlen", "64", "--max-windows", "2",
                "--no-progress"], capsys)
    ppl = float(err.split("perplexity ")[1].split()[0])
    assert np.isfinite(ppl)


@pytest.fixture
def omni_half(tmp_path, tokenizer):
    d = tmp_path / "omni"
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    model.save_pretrained(d)
    save_processor(tiny_processor("qwen2_5_omni", tok), d)
    make_image(1).save(tmp_path / "img.png")
    pcm = (make_audio(1.5) * 32767).astype(np.int16)
    with wave.open(str(tmp_path / "a.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    lines = [{"text": "describe the red fox", "images": ["img.png"]}, {"text": "transcribe", "audio": ["a.wav"]},
             {"text": "both", "images": ["img.png"], "audio": ["a.wav"]}, {"text": "just text here"}]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return d, tok


def test_masquant_omni_bf16_artifact_runs(tmp_path, omni_half, capsys):
    model_dir, tok = omni_half
    arts = {}
    for dtype in ("float32", "bfloat16"):
        _run(["quantize", str(model_dir), "--method", "masquant", "--scheme", "w4a8", "--epochs", "1",
              "--calib", str(tmp_path / "calib.jsonl"), "--dtype", dtype, "--output", str(tmp_path / dtype),
              "--no-progress"], capsys)
        arts[dtype] = mmcompress.load(tmp_path / dtype)
    spec = json.loads((tmp_path / "bfloat16" / "mmcompress.json").read_text())["modules"]
    q = next(s for p, s in spec.items() if p.endswith("q_proj"))
    assert q["class"] == "MASLinear" and q["dtype"] == "bfloat16" and q["rank"] > 0
    x, _ = mm_inputs("qwen2_5_omni", tok, seed=2)
    y = {k: m(**x).logits for k, m in arts.items()}
    assert y["bfloat16"].dtype == torch.bfloat16 and torch.isfinite(y["bfloat16"]).all()
    print("REL omni", _rel(y["bfloat16"], y["float32"]))
    assert _rel(y["bfloat16"], y["float32"]) < REL_TOL
    gen = arts["bfloat16"].generate(**x, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == x["input_ids"].shape[1] + 3
