import json

import pytest

from mmcompress.cli import main


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_sparsify_cli_roundtrip(tmp_path, tiny_llama_dir, calib_text, capsys):
    out = tmp_path / "sparse"
    rc = main(["sparsify", str(tiny_llama_dir), "--method", "larosa", "--sparsity", "0.4", "--calib", str(calib_text),
               "--nsamples", "2", "--seqlen", "32", "--output", str(out), "--json", "--no-progress"])
    assert rc == 0
    r = _last_json(capsys)
    assert r["mode"] == "merged" and r["plan"] == "exact" and r["model_sparsity"] == pytest.approx(0.4, abs=0.02)
    rc = main(["eval", str(out), "--ppl", str(calib_text), "--seqlen", "32", "--max-windows", "2", "--json",
               "--no-progress"])
    assert rc == 0
    assert _last_json(capsys)["ppl"] > 1


def test_sparsify_cli_errors(tmp_path, tiny_llama_dir, calib_text, capsys):
    rc = main(["sparsify", str(tiny_llama_dir), "--method", "teal", "--sparsity", "0.4", "--plan", "grid",
               "--calib", str(calib_text), "--output", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grid" in err[0]
    rc = main(["sparsify", str(tiny_llama_dir), "--sparsity", "1.2", "--calib", str(calib_text),
               "--output", str(tmp_path / "o")])
    assert rc == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["teal", "larosa"])
def test_sparsify_cli_greedy_plan_saves_and_reloads(tmp_path, tiny_llama_dir, calib_text, capsys, method):
    out = tmp_path / f"greedy-{method}"
    rc = main(["sparsify", str(tiny_llama_dir), "--method", method, "--sparsity", "0.3", "--plan", "greedy",
               "--calib", str(calib_text), "--nsamples", "2", "--seqlen", "32", "--output", str(out), "--json",
               "--no-progress"])
    assert rc == 0
    r = _last_json(capsys)
    assert r["plan"] == "greedy" and r["model_sparsity"] == pytest.approx(0.3, abs=0.02)
    rc = main(["eval", str(out), "--ppl", str(calib_text), "--seqlen", "32", "--max-windows", "2", "--json",
               "--no-progress"])
    assert rc == 0 and _last_json(capsys)["ppl"] > 1


def test_sparsify_cli_column_scale_saves_and_reloads(tmp_path, tiny_llama_dir, calib_text, capsys):
    import torch

    import mmcompress

    out = tmp_path / "colscale"
    rc = main(["sparsify", str(tiny_llama_dir), "--sparsity", "0.4", "--column-scale", "--calib", str(calib_text),
               "--nsamples", "2", "--seqlen", "32", "--output", str(out), "--json", "--no-progress"])
    assert rc == 0
    assert _last_json(capsys)["model_sparsity"] == pytest.approx(0.4, abs=0.02)
    model = mmcompress.load(out)
    assert model._mmcompress_description["method"]["column_scale"] is True
    from mmcompress.sparse.merge import inner_layer

    norm = inner_layer(model.model.layers[0]).input_layernorm  # the column scale lives in the saved norm weights
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))
    rc = main(["sparsify", str(tiny_llama_dir), "--method", "teal", "--sparsity", "0.4", "--column-scale",
               "--calib", str(calib_text), "--output", str(tmp_path / "o")])
    assert rc == 1 and "--column-scale" in capsys.readouterr().err and not (tmp_path / "o").exists()
