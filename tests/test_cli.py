import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(*args, env=None, check=True):
    p = subprocess.run([sys.executable, "-m", "mmcompress.cli", *map(str, args)], capture_output=True, text=True,
                       env=env or ENV, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_version():
    p = run_cli("--version")
    assert p.stdout.startswith("mmcompress ")


def test_quantize_then_eval_end_to_end(tmp_path, tiny_llama_dir, calib_text):
    out = tmp_path / "q"
    p = run_cli("quantize", tiny_llama_dir, "--method", "smoothquant", "--scheme", "w8a8", "--calib", calib_text,
                "--nsamples", 4, "--seqlen", 64, "--output", out, "--json", "--no-progress")
    res = last_json(p.stdout)
    assert res["scheme"] == "w8a8" and res["calibration"]["tokens"]["text"] == 4 * 64
    assert (out / "mmcompress.json").is_file() and (out / "tokenizer.json").is_file()
    assert not Path(f"{out}.ckpt").exists()
    dense = last_json(run_cli("eval", tiny_llama_dir, "--ppl", calib_text, "--seqlen", 128, "--json",
                              "--no-progress").stdout)
    quant = last_json(run_cli("eval", out, "--ppl", calib_text, "--seqlen", 128, "--json", "--no-progress").stdout)
    assert quant["tokens"] == dense["tokens"] > 0
    assert quant["ppl"] > 1 and dense["ppl"] > 1
    assert quant["ppl"] != dense["ppl"]
    assert abs(quant["ppl"] / dense["ppl"] - 1) < 0.5


@pytest.mark.parametrize("case", ["missing_dir", "unsupported", "wbits1", "empty_calib", "missing_calib"])
def test_bad_input_one_line_error_no_output(tmp_path, tiny_llama_dir, calib_text, case):
    model, calib, extra = tiny_llama_dir, calib_text, []
    if case == "missing_dir":
        model = tmp_path / "nope"
    elif case == "unsupported":
        model = tmp_path / "bert"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    elif case == "wbits1":
        extra = ["--wbits", "1"]
    elif case == "empty_calib":
        calib = tmp_path / "empty.txt"
        calib.write_text("")
    elif case == "missing_calib":
        calib = tmp_path / "missing.txt"
    out = tmp_path / "out"
    p = run_cli("quantize", model, "--calib", calib, "--output", out, "--nsamples", 2, "--seqlen", 16, *extra,
                check=False)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists()
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out")]
    if case == "unsupported":
        assert "llama" in lines[0] and "qwen2_5_vl" in lines[0]


def test_quantize_help_names_every_method():
    from mmcompress.cli import build_parser
    from mmcompress.quant.methods import QUANT_METHODS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    method = next(a for a in sub.choices["quantize"]._actions if a.dest == "method")
    assert set(method.help.replace(" ", "").split("|")) == set(QUANT_METHODS)
