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


@pytest.mark.parametrize("argv", [["sparsify", "--method", "larosa", "--sparsity", "0.4"],
                                  ["sparsify", "--method", "larosa", "--sparsity", "0.4", "--basis", "both"],
                                  ["compress", "--recipe", "grid-rtn"]],
                         ids=["attn", "both", "grid-rtn"])
def test_streamed_larosa_writes_each_layer_once_in_place(tmp_path, calib_text, monkeypatch, argv):
    """Issue 21: a streamed LaRoSA run (and a recipe's second walk over a LaRoSA result) plans every layer's
    place in the artifact at the first finished layer, the last layer's (no residual adapter) too, so every
    layer is written there, once: no layer file, no second writing of the artifact from the layers' places
    at the end (the artifact's shards are linked into the output), and the bytes the whole run writes (the
    kernel's count for this process, /proc/self/io) stay within 1.5x the artifact."""
    import os

    from mmcompress import engine, fileio, streaming
    from .test_streaming import _write_bytes
    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "model", "llama", layers=4, hidden=256, intermediate=512)
    recipe = []
    if argv[0] == "compress":
        (tmp_path / "r.yaml").write_text(RECIPES[argv[2]])
        recipe = ["--recipe", str(tmp_path / "r.yaml")]
        argv = argv[:1]
    files, steps, walks_out = [], [], []
    real, real_link = engine._atomic_save_tensors, streaming._link_or_copy

    def layer_file(tensors, path, meta=None):
        files.append(path.name)
        return real(tensors, path, meta)

    def link(src, dst):  # a walk's planned artifact becomes the next walk's input (restream) or the output
        if dst.parent.name.startswith("walk-"):
            walks_out.append(src.stat().st_size)
        return real_link(src, dst)

    monkeypatch.setattr(engine, "_atomic_save_tensors", layer_file)
    monkeypatch.setattr(streaming, "_link_or_copy", link)
    out = tmp_path / "out"
    os.sync()
    before = _write_bytes()
    with fileio.step_hook(steps.append):
        assert main([argv[0], str(src), *argv[1:], *recipe, "--calib", str(calib_text), "--nsamples", "3",
                     "--seqlen", "32", "--no-progress", "--stream", "--output", str(out)]) == 0
    written = _write_bytes() - before
    assert files == []  # every layer went into the planned artifact
    walks = 2 if recipe else 1
    assert steps.count("checkpoint.planned") == walks and steps.count("artifact.filled") == walks, steps
    if written == 0:
        pytest.skip(f"{tmp_path} is on a file system that counts no written bytes (tmpfs)")
    artifact = (out / "model.safetensors").stat().st_size
    side_files = sum(p.stat().st_size for p in out.iterdir() if p.name != "model.safetensors")
    assert len(walks_out) == walks - 1
    intermediate = sum(walks_out)  # a recipe's first walk's result, written once (the next walk's input)
    assert written <= 1.5 * artifact + intermediate + side_files + 64 * 1024, (written, artifact, intermediate)
