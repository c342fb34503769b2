"""Artifacts made from a bf16 (or fp16) load run: save -> load -> forward / generate / eval.

Every method goes through the CLI from the same fp32 checkpoint twice, once loaded in float32 and
once in the half dtype; the half artifact must load, give finite logits close to the float32
artifact's (relative L2 distance of the logits, bound below) and generate.
"""

import json
import os

import numpy as np
import pytest
import torch

import mmcompress
from mmcompress.cli import main
from mmcompress.models.loading import load_hf_model

from .conftest import mm_inputs
from .test_cli_multimodal import omni_dir  # noqa: F401  (the tiny Omni model + image/audio calibration jsonl)

# The half artifact may differ from the float32 one by as much as compression itself moves the float32
# model (rel. L2 of the logits: artifact vs dense), or by REL_TOL where that is smaller.  bf16 rounds the
# weights before quantization, so codes move by a step and, on these tiny random models, Top-K picks
# flip near ties (LaRoSA and the recipe: 0.27-0.28).  Set MMCOMPRESS_TEST_RECORD=FILE to
# append the measured distances to FILE.
REL_TOL = 0.08


def _record(name, dtype, rel_half, rel_compression):
    path = os.environ.get("MMCOMPRESS_TEST_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"method": name, "dtype": dtype, "rel_half_vs_fp32_artifact": round(rel_half, 4),
                                "rel_fp32_artifact_vs_dense": rel_compression and round(rel_compression, 4)}) + "\n")

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
    a, b = a.detach().float(), b.detach().float()
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
    _record(name, dtype, _rel(y_half, y_ref), _rel(y_ref, y_dense))
    assert _rel(y_half, y_ref) < max(REL_TOL, _rel(y_ref, y_dense))
    gen = half.generate(input_ids=x, max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 28)
    err = _run(["eval", str(half_dir), "--ppl", str(calib_text), "--seqlen", "64", "--max-windows", "2",
                "--no-progress"], capsys)
    ppl = float(err.split("perplexity ")[1].split()[0])
    assert np.isfinite(ppl)


def test_masquant_omni_bf16_artifact_runs(tmp_path, omni_dir, tokenizer, capsys):
    model_dir, tok = omni_dir, tokenizer
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
    _record("masquant-omni", "bfloat16", _rel(y["bfloat16"], y["float32"]), None)
    assert _rel(y["bfloat16"], y["float32"]) < REL_TOL
    gen = arts["bfloat16"].generate(**x, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == x["input_ids"].shape[1] + 3
