"""Bad input and foreign code: planted ``auto_map`` code never runs without --trust-remote-code, hand-edited
manifests fail before anything is allocated, non-finite values stop a run, --json is strict JSON, binary
calibration text is flagged, and every option is validated before the model is loaded (CLI and recipes alike)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmcompress
from mmcompress.cli import main
from mmcompress.data import CalibrationSet
from mmcompress.finite import NonFiniteError
from .tiny_models import save_tiny, tiny_model, tiny_processor

from .conftest import text_samples


def run_cli(*args, stdin="y\ny\ny\n", env_extra=None, tmp_path=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "mmcompress.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, env=env, timeout=300)


def one_error_line(p, *needles):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


# -- foreign code --------------------------------------------------------------------------------------


def plant(model_dir, marker, file="tokenizer_config.json", auto_map=None, **extra):
    """Plant ``evil.py`` (writes ``marker`` when imported) and point ``file``'s auto_map at it."""
    (model_dir / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("ran")
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, ProcessorMixin
        class EvilConfig(LlamaConfig):
            pass
        class EvilForCausalLM(LlamaForCausalLM):
            pass
        class EvilTok(PreTrainedTokenizerFast):
            pass
        class EvilProcessor(ProcessorMixin):
            pass
    """))
    path = model_dir / file
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg["auto_map"] = auto_map
    cfg.update(extra)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def evil_env(tmp_path):
    # where transformers would copy and import the planted module (never the user's cache)
    return {"HF_MODULES_CACHE": str(tmp_path / "hf_modules")}


def test_planted_tokenizer_code_never_runs_in_eval_or_quantize(tmp_path, tiny_llama_dir, calib_text, evil_env):
    marker = tmp_path / "MARKER"
    plant(tiny_llama_dir, marker, auto_map={"AutoTokenizer": ["evil.EvilTok", None]}, tokenizer_class="EvilTok")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "the quick brown fox " * 8}) for _ in range(3)))
    p = run_cli("eval", tiny_llama_dir, "--ppl", calib_text, "--seqlen", 32, "--max-windows", 1, "--no-progress",
                env_extra=evil_env)
    one_error_line(p, "--trust-remote-code", "evil.EvilTok")
    p = run_cli("quantize", tiny_llama_dir, "--calib", jsonl, "--nsamples", 2, "--output", tmp_path / "q",
                "--no-progress", env_extra=evil_env)
    one_error_line(p, "--trust-remote-code")
    assert "Do you wish to run the custom code" not in p.stdout + p.stderr
    assert not marker.exists() and not (tmp_path / "q").exists()
    # the planted file does run when the user asks for it: the test above can fail
    p = run_cli("eval", tiny_llama_dir, "--ppl", calib_text, "--seqlen", 32, "--max-windows", 1, "--no-progress",
                "--trust-remote-code", env_extra=evil_env)
    assert p.returncode == 0, p.stderr
    assert marker.exists()


def test_planted_config_code_standard_class_or_one_line_error(tmp_path, tiny_llama_dir, calib_text, evil_env):
    marker = tmp_path / "MARKER"
    # a standard architecture with an auto_map: the standard classes are used, the code is not imported
    plant(tiny_llama_dir, marker, file="config.json",
          auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    p = run_cli("eval", tiny_llama_dir, "--ppl", calib_text, "--seqlen", 32, "--max-windows", 1, "--no-progress",
                "--json", env_extra=evil_env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["ppl"] > 1
    # an architecture that only the directory's code defines: one line naming --trust-remote-code
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["architectures"] = ["EvilForCausalLM"]
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    p = run_cli("eval", tiny_llama_dir, "--ppl", calib_text, "--seqlen", 32, "--no-progress", env_extra=evil_env)
    one_error_line(p, "--trust-remote-code", "EvilForCausalLM")
    p = run_cli("quantize", tiny_llama_dir, "--calib", calib_text, "--nsamples", 2, "--seqlen", 16, "--output",
                tmp_path / "q", "--no-progress", env_extra=evil_env)
    one_error_line(p, "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "q").exists()


def test_planted_code_in_an_artifact_never_runs(tmp_path, tiny_llama_dir, calib_text, evil_env):
    art = tmp_path / "art"
    assert main(["quantize", str(tiny_llama_dir), "--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16",
                 "--output", str(art), "--no-progress"]) == 0
    marker = tmp_path / "MARKER"
    plant(art, marker, auto_map={"AutoTokenizer": ["evil.EvilTok", None]}, tokenizer_class="EvilTok")
    plant(art, marker, file="config.json", auto_map={"AutoConfig": "evil.EvilConfig"})
    p = run_cli("eval", art, "--ppl", calib_text, "--seqlen", 32, "--no-progress", env_extra=evil_env)
    one_error_line(p, "--trust-remote-code")
    p = run_cli("export", art, "--check", env_extra=evil_env)  # loads the artifact (config + weights)
    assert p.returncode == 0, p.stderr
    assert not marker.exists()


def test_planted_processor_code_is_not_imported(tmp_path, tokenizer, evil_env):
    from mmcompress.models.processing import save_processor

    d = tmp_path / "omni"
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    model.save_pretrained(d)
    save_processor(tiny_processor("qwen2_5_omni", tok), d)
    marker = tmp_path / "MARKER"
    plant(d, marker, file="preprocessor_config.json", auto_map={"AutoProcessor": "evil.EvilProcessor"},
          processor_class="EvilProcessor")
    plant(d, marker, file="processor_config.json", auto_map={"AutoProcessor": "evil.EvilProcessor"},
          processor_class="EvilProcessor")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": "the quick brown fox"}) for _ in range(2)))
    p = run_cli("quantize", d, "--calib", jsonl, "--output", tmp_path / "q", "--no-progress", "--json",
                env_extra=evil_env)
    assert p.returncode == 0, p.stderr  # the standard Omni processor, built from the same files
    assert not marker.exists()


# -- manifest vs safetensors header ------------------------------------------------------------------------


@pytest.fixture
def rtn_artifact(tmp_path, tiny_llama_dir, calib_text):
    art = tmp_path / "art"
    assert main(["quantize", str(tiny_llama_dir), "--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16",
                 "--output", str(art), "--no-progress"]) == 0
    return art


def _edit_spec(art, fn):
    manifest = json.loads((art / "mmcompress.json").read_text())
    path = "model.layers.1.mlp.down_proj"
    fn(manifest["modules"][path])
    (art / "mmcompress.json").write_text(json.dumps(manifest))
    return path


def test_manifest_with_a_huge_shape_fails_before_allocating(rtn_artifact):
    path = _edit_spec(rtn_artifact, lambda s: s.update(in_features=60000, out_features=60000))  # 3.6 GB of codes
    probe = textwrap.dedent(f"""
        import resource, sys
        import mmcompress
        from mmcompress.export.serialization import load
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load({str(rtn_artifact)!r})
        except ValueError as e:
            print("ERROR", e)
        print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """)
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    out = p.stdout
    assert "ERROR" in out, out + p.stderr
    err = out.split("ERROR", 1)[1].splitlines()[0]
    assert path in err and "weight_codes" in err and "[60000, 60000]" in err and "model.safetensors" in err
    growth = float(out.split("GROWTH_MB")[1])
    assert growth < 300, f"load grew the peak RSS by {growth:.0f} MB before failing"


def test_manifest_dtype_mismatch_names_module_and_cli_is_one_line(rtn_artifact, calib_text, capsys):
    path = _edit_spec(rtn_artifact, lambda s: s.update(dtype="float64", bias=True))
    rc = main(["eval", str(rtn_artifact), "--ppl", str(calib_text), "--seqlen", "32", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and path in err and "mmcompress.json" in err
    assert "F64" in err or "not in model.safetensors" in err


# -- non-finite values -------------------------------------------------------------------------------------


def _poison(model_dir, name, value):
    sd = load_file(str(model_dir / "model.safetensors"))
    sd[name][3, 5] = value
    save_file(sd, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("cmd", [["quantize", "--method", "smoothquant"], ["sparsify", "--method", "teal",
                                                                           "--sparsity", "0.3"]])
def test_non_finite_input_weight_stops_before_writing(tmp_path, tiny_llama_dir, calib_text, capsys, cmd):
    _poison(tiny_llama_dir, "model.layers.1.mlp.down_proj.weight", float("nan"))
    out = tmp_path / "out"
    rc = main([cmd[0], str(tiny_llama_dir), *cmd[1:], "--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16",
               "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "model.layers.1.mlp.down_proj.weight" in err[-1] and "non-finite" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "tiny-llama"]  # no output, no checkpoints


def test_non_finite_activations_name_the_layer(tokenizer):
    """A method that calibrates on the activations (SmoothQuant; RTN reads none, so its walk runs no layer on
    the calibration data: ``Method.data_free``) stops at the layer whose output is not finite."""
    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    # finite weights whose layer overflows: the MLP output of layer 0 becomes infinite
    model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: out * torch.inf)
    with pytest.raises(NonFiniteError, match=r"output of decoder layer 0 \(model\.layers\.0\)"):
        mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "smoothquant", "w8a8",
                            progress=False)


def test_non_finite_method_result_names_the_tensor(tokenizer, monkeypatch):
    from mmcompress.quant.methods import smoothquant

    real = smoothquant.smoothing_factors

    def broken(*a, **kw):
        s = real(*a, **kw)
        s[0] = float("inf")
        return s

    monkeypatch.setattr(smoothquant, "smoothing_factors", broken)
    model, tok = tiny_model("llama", layers=2, tokenizer=tokenizer)
    with pytest.raises(NonFiniteError, match=r"smoothquant result model\.layers\.0\."):
        mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "smoothquant", "w8a8",
                            progress=False)


def test_eval_json_is_strict_json_with_nan_weights(tiny_llama_dir, calib_text, capsys):
    _poison(tiny_llama_dir, "model.layers.0.self_attn.q_proj.weight", float("nan"))
    assert main(["eval", str(tiny_llama_dir), "--ppl", str(calib_text), "--seqlen", "32", "--max-windows", "2",
                 "--json", "--no-progress"]) == 0
    cap = capsys.readouterr()

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    res = json.loads(cap.out.strip().splitlines()[-1], parse_constant=refuse)
    assert res["ppl"] is None and res["tokens"] > 0
    assert "non-finite values written as null" in cap.err and "ppl" in cap.err


# -- binary calibration text -------------------------------------------------------------------------------


def test_binary_calibration_text_error_and_warning(tmp_path, tiny_llama_dir, calib_text, capsys, caplog):
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(b"\x00\x01\xff\xfe\x02\x03" * 3000)
    rc = main(["quantize", str(tmp_path / "no-model-needed"), "--calib", str(garbage), "--output",
               str(tmp_path / "q")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "garbage.txt is not text" in err[0]
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(calib_text.read_bytes() + bytes(range(128, 256)) * 200)
    from mmcompress.models.loading import load_tokenizer

    with caplog.at_level("WARNING"):
        calib = CalibrationSet.from_text_file(mixed, load_tokenizer(tiny_llama_dir), nsamples=2, seqlen=16)
    assert len(calib) == 2
    assert any("binary or invalid UTF-8" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        CalibrationSet.from_text_file(calib_text, load_tokenizer(tiny_llama_dir), nsamples=2, seqlen=16)
    assert not caplog.records


# -- option validation before loading ------------------------------------------------------------------------


OPTION_CASES = [
    (["quantize", "--method", "masquant", "--epochs", "-1"], "--epochs must be an integer >= 0, got -1"),
    (["quantize", "--method", "masquant", "--rank", "-2"], "--rank must be a finite number >= 0"),
    (["quantize", "--method", "masquant", "--rank-floor", "-5"], "--rank-floor must be an integer >= 0"),
    (["quantize", "--method", "masquant", "--train-samples", "0"], "--train-samples must be an integer >= 1"),
    (["quantize", "--method", "masquant", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["quantize", "--method", "masquant", "--cmc-bits", "1"], "--cmc-bits must be an integer in [2, 16]"),
    (["quantize", "--method", "masquant", "--loss-weights", "image=inf"], "--loss-weights must give finite weights"),
    (["quantize", "--method", "mbq", "--loss-weights", "audio=-1"], "--loss-weights must give finite weights"),
    (["quantize", "--method", "smoothquant", "--alpha", "1.5"], "--alpha must be a finite number in [0, 1]"),
    (["quantize", "--group-size", "-3"], "group size must be >= 0"),
    (["quantize", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["quantize", "--seqlen", "0"], "--seqlen must be >= 2"),
    (["sparsify", "--sparsity", "0.4", "--nsamples", "0"], "--nsamples must be >= 1"),
    (["eval", "--max-windows", "0"], "--max-windows must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("argv,expected", OPTION_CASES, ids=[" ".join(c[0][1:]) for c in OPTION_CASES])
def test_options_are_refused_before_the_model_is_loaded(tmp_path, calib_text, capsys, argv, expected):
    # the model directory does not exist: an option error proves the check ran before any loading
    extra = ["--ppl", str(calib_text)] if argv[0] == "eval" else ["--calib", str(calib_text), "--output",
                                                                  str(tmp_path / "out")]
    rc = main([argv[0], str(tmp_path / "missing-model"), *argv[1:], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_recipe_options_use_the_cli_messages(tmp_path, calib_text, capsys):
    def compress(step):
        recipe = tmp_path / "r.json"
        recipe.write_text(json.dumps({"steps": [{"quantize": {"method": "rtn"}}, step]}))
        rc = main(["compress", str(tmp_path / "missing-model"), "--recipe", str(recipe), "--calib", str(calib_text),
                   "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and not (tmp_path / "out").exists()
        return err[0]

    err = compress({"quantize": {"method": "masquant", "bogus_opt": 1}})
    assert "recipe step 2 (masquant): unknown option 'bogus_opt' for method masquant; valid: alpha, " in err
    assert "epochs" in err
    for key, value, cli in [("epochs", -1, "--epochs"), ("lr", float("nan"), "--lr"), ("cmc_bits", 1, "--cmc-bits"),
                            ("rank", -2.0, "--rank")]:
        err = compress({"quantize": {"method": "masquant", key: value}})
        main(["quantize", str(tmp_path / "missing-model"), "--method", "masquant", cli, str(value), "--calib",
              str(calib_text), "--output", str(tmp_path / "out")])
        cli_err = capsys.readouterr().err.strip()
        body = cli_err.split(f"error: {cli} ", 1)[1]
        assert err.endswith(f"recipe step 2 (masquant): {key} {body}"), (err, cli_err)
    err = compress({"sparsify": {"method": "larosa", "sparsity": 1.5}})
    assert "recipe step 2 (larosa): sparsity must be a finite number in [0, 1)" in err
    err = compress({"sparsify": {"method": "cats", "mode": "reference"}})
    assert "recipe step 2 (cats): unknown option 'mode' for method cats; valid: " in err
    main(["sparsify", str(tmp_path / "missing-model"), "--method", "cats", "--sparsity", "0.3", "--mode", "reference",
          "--calib", str(calib_text), "--output", str(tmp_path / "out")])
    cli_err = capsys.readouterr().err.strip()  # the same message, under the flags' names
    assert "error: unknown option --mode for method cats; valid: --max-mlp-sparsity, --plan, --prefill, --sparsity" \
        in cli_err, cli_err
