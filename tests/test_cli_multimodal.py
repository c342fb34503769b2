import json

import pytest

import mmcompress
from mmcompress.cli import main
from mmcompress.models.processing import load_processor, save_processor
from .tiny_models import tiny_model, tiny_processor

from .conftest import make_image, write_wav


@pytest.fixture
def omni_dir(tmp_path, tokenizer):
    d = tmp_path / "omni"
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    model.save_pretrained(d)
    save_processor(tiny_processor("qwen2_5_omni", tok), d)
    make_image(1).save(tmp_path / "img.png")
    write_wav(tmp_path / "a.wav", 1.5)
    lines = [{"text": "describe the red fox", "images": ["img.png"]}, {"text": "transcribe", "audio": ["a.wav"]},
             {"text": "both", "images": ["img.png"], "audio": ["a.wav"]}, {"text": "just text here"}]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return d


def test_jsonl_calibration_masquant_report(omni_dir, tmp_path, capsys):
    assert type(load_processor(omni_dir)).__name__ == "Qwen2_5OmniProcessor"
    rc = main(["quantize", str(omni_dir), "--method", "masquant", "--scheme", "w4a8", "--calib",
               str(tmp_path / "calib.jsonl"), "--output", str(tmp_path / "q"), "--report", str(tmp_path / "rep"),
               "--epochs", "1", "--json", "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = res["calibration"]["tokens"]
    assert tokens["image"] > 0 and tokens["audio"] > 0 and tokens["text"] > 0
    assert res["method_summary"]["cmc_bytes"] > 0
    report = json.loads((tmp_path / "rep" / "diagnostics-masquant-w4a8.json").read_text())
    lin = report["layers"][0]["linears"]["self_attn.q_proj"]
    assert set(lin["sqnr"]) == {"text", "image", "audio"}
    assert "outlier_ratio" in lin["activations"]["audio"] and "audio" in lin["smoothing_divergence"]
    assert (tmp_path / "rep" / "sqnr_by_modality.png").stat().st_size > 1000
    assert set(report["summary"]["mean_sqnr_accumulated_token_median"]) == {"text", "image", "audio"}
    loaded = mmcompress.load(tmp_path / "q")
    assert (tmp_path / "q" / "preprocessor_config.json").is_file()
    assert loaded.config.model_type == "qwen2_5_omni_thinker"


def test_option_not_for_method_is_an_error(omni_dir, tmp_path, capsys):
    rc = main(["quantize", str(omni_dir), "--method", "rtn", "--epochs", "3", "--calib", str(tmp_path / "calib.jsonl"),
               "--output", str(tmp_path / "q2")])
    assert rc == 1
    assert "unknown option --epochs for method rtn; valid: none" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()


def test_eval_vqa_choice(omni_dir, capsys):
    rc = main(["eval", str(omni_dir), "--vqa", "image-qa-test", "--vqa-choice", "--mm-limit", "1", "--json",
               "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["vqa"]["n"] == 4 and res["vqa_choice"]["n"] == 4
    assert set(res["vqa_choice"]["by_type"]) == {"colour", "shape", "count", "position"}
    assert res["vqa_choice"]["chance"]["shape"] == 1 / 3
    rc = main(["eval", str(omni_dir), "--ppl", "wiki", "--vqa-choice"])
    assert rc == 1 and "--vqa-choice needs --vqa" in capsys.readouterr().err
