"""lm-eval integration on a compressed tiny model with a local, offline multiple-choice task."""

import json
import os

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet

from .conftest import text_samples, tiny_model

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ITEMS = [
    ("The quick brown fox jumps over the", [" lazy dog", " red sky", " blue", " model"], 0),
    ("Quantization maps real numbers to a small", [" fox", " grid", " dog", " sky"], 1),
    ("0 1 2 3 4 5 6 7 8", [" red", " fox", " 9", " the"], 2),
    ("Images, audio and text tokens flow through one", [" fox", " lazy", " 7", " decoder"], 3),
    ("red green", [" blue", " quick", " jumps", " weights"], 0),
]


@pytest.fixture
def local_task(tmp_path):
    data = tmp_path / "tasks" / "tiny_mc.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (data.parent / "tiny_mc.yaml").write_text(
        "task: mmc_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return data.parent


@pytest.fixture
def artifact(tmp_path, tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "rtn", "w8a8", progress=False)
    out = mmcompress.save(model, tmp_path / "art")
    tok.save_pretrained(out)
    return out


def test_lm_eval_local_task_is_deterministic(artifact, local_task):
    from mmcompress.eval.lm_eval_adapter import MMCompressLM, evaluate, summarize
    from mmcompress.quant.deployed import IntLinear

    lm = MMCompressLM(path=str(artifact))
    assert any(isinstance(m, IntLinear) for m in lm.model.modules())  # our (integer) modules run, not a float copy
    runs = [summarize(evaluate(artifact, "mmc_tiny_mc", include_path=str(local_task), include_defaults=False))
            for _ in range(2)]
    r = runs[0]["results"]["mmc_tiny_mc"]
    assert runs[0]["n-samples"]["mmc_tiny_mc"]["effective"] == len(ITEMS)
    assert 0.0 <= r["acc,none"] <= 1.0
    assert runs[0]["results"] == runs[1]["results"]


def test_lm_eval_cli_json(artifact, local_task, capsys):
    from mmcompress.cli import main

    rc = main(["lm-eval", str(artifact), "--tasks", "mmc_tiny_mc", "--include-path", str(local_task),
               "--no-default-tasks", "--limit", "3", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n-samples"]["mmc_tiny_mc"]["effective"] == 3 and 0 <= out["results"]["mmc_tiny_mc"]["acc,none"] <= 1


def test_registered_under_mmcompress_name():
    from lm_eval.api.registry import get_model

    from mmcompress.eval.lm_eval_adapter import register_lm_eval_model

    assert get_model("mmcompress") is register_lm_eval_model()
    assert torch.__version__  # lm-eval did not replace torch
