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


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def _manifest(path):
    def timeless(d):  # the run's seconds differ
        if isinstance(d, dict):
            return {k: timeless(v) for k, v in d.items() if k != "seconds"}
        return [timeless(v) for v in d] if isinstance(d, list) else d

    return timeless(json.loads((path / "mmcompress.json").read_text()))


@pytest.mark.parametrize("argv", [
    ["sparsify", "--method", "larosa", "--sparsity", "0.4"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.3", "--mode", "reference"],
    ["sparsify", "--method", "teal", "--sparsity", "0.4"],
    ["sparsify", "--method", "cats", "--sparsity", "0.3"],
    ["sparsify", "--method", "wina", "--sparsity", "0.4"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.5", "--plan", "grid"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.5", "--plan", "greedy", "--prefill", "last_half"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.5", "--plan", "grid", "--mode", "reference"],
    ["sparsify", "--method", "wina", "--sparsity", "0.4", "--plan", "greedy"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.4", "--basis", "both"],
    ["sparsify", "--method", "larosa", "--sparsity", "0.5", "--basis", "both", "--plan", "greedy"],
    ["compress", "--recipe", "larosa-sq"],
    ["compress", "--recipe", "teal-rtn"],
    ["compress", "--recipe", "grid-rtn"],
    ["compress", "--recipe", "both-grid-rtn"],
], ids=lambda argv: "-".join(a.lstrip("-") for a in argv))
def test_streamed_sparsify_and_compress_write_the_in_memory_artifact(tmp_path, calib_text, capsys, argv):
    """``sparsify`` and ``compress`` stream by default (one decoder layer in memory, two for LaRoSA merged with
    ``--basis both``; LaRoSA's embedding and head folded after the walk from the checkpoint's tensors; a recipe
    whose steps walk again after LaRoSA's grid plan or basis both streams the second walk from the first one's
    result, written beside the output and removed after); ``--in-memory`` gives the same files (tied
    embeddings: the merged model unties them in both)."""
    from .tiny_models import save_tiny

    _streamed_equals_in_memory(tmp_path, calib_text, save_tiny(tmp_path / "tied", "llama", layers=3, tie=True), argv)


RECIPES = {"larosa-sq": "steps:\n  - sparsify: {method: larosa, sparsity: 0.4}\n"
                        "  - quantize: {method: smoothquant, scheme: w8a8}\n",
           "teal-rtn": "steps:\n  - sparsify: {method: teal, sparsity: 0.4}\n  - quantize: {method: rtn, scheme: w8a8}\n",
           "grid-rtn": "steps:\n  - sparsify: {method: larosa, sparsity: 0.5, plan: grid}\n"
                       "  - quantize: {method: rtn, scheme: w8a8}\n",
           "both-grid-rtn": "steps:\n  - sparsify: {method: larosa, sparsity: 0.5, plan: grid, basis: both}\n"
                            "  - quantize: {method: rtn, scheme: w8a8}\n",
           "both-sq": "steps:\n  - sparsify: {method: larosa, sparsity: 0.4, basis: both}\n"
                      "  - quantize: {method: smoothquant, scheme: w8a8}\n"}


def _streamed_equals_in_memory(tmp_path, calib_text, src, argv):
    """``argv`` (a command and its method options, or ``compress --recipe NAME`` of :data:`RECIPES`) on ``src``
    streamed and in memory: the same files."""
    recipe = None
    if argv[0] == "compress":
        recipe = argv[2]
        (tmp_path / "r.yaml").write_text(RECIPES[recipe])
        argv = ["compress", "--recipe", str(tmp_path / "r.yaml")]
    common = [str(src), *argv[1:], "--calib", str(calib_text), "--nsamples", "3", "--seqlen", "32", "--json",
              "--no-progress"]
    assert main([argv[0], *common, "--stream", "--output", str(tmp_path / "streamed")]) == 0
    assert main([argv[0], *common, "--in-memory", "--output", str(tmp_path / "memory")]) == 0
    a, b = _files(tmp_path / "streamed"), _files(tmp_path / "memory")
    assert a.keys() == b.keys()
    for name in a:
        if name == "mmcompress.json":
            assert _manifest(tmp_path / "streamed") == _manifest(tmp_path / "memory")
        else:
            assert a[name] == b[name], name
    assert not [p.name for p in tmp_path.iterdir() if ".ckpt" in p.name]  # the run's own directory is gone
    assert not [p.name for p in tmp_path.iterdir() if ".mmcompress-" in p.name]  # so is the intermediate's
    if recipe in ("grid-rtn", "both-grid-rtn", "both-sq"):  # two walks, the second streamed from the first's result
        assert [w["steps"] for w in _manifest(tmp_path / "streamed")["walks"]] == [[1], [2]]


@pytest.mark.parametrize("argv", [["sparsify", "--method", "larosa", "--sparsity", "0.4", "--basis", "both"],
                                  ["compress", "--recipe", "both-sq"]], ids=["sparsify", "recipe"])
def test_streamed_basis_both_on_a_bf16_qwen2_writes_the_in_memory_artifact(tmp_path, calib_text, argv):
    """LaRoSA merged with ``--basis both`` on a bfloat16 Qwen2 (q/k/v biases, tied embeddings), alone and then
    SmoothQuant from its streamed result: streamed and in memory, the same files."""
    import torch

    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "qwen2", "qwen2", layers=3, tie=True, dtype=torch.bfloat16)
    _streamed_equals_in_memory(tmp_path, calib_text, src, argv)
