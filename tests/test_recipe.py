import copy
import json

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.linear import QuantLinear
from mmcompress.recipe import RecipeError, apply_recipe, load_recipe, parse_recipe

from .conftest import text_samples, tiny_model


def test_recipe_parsing_errors(tmp_path):
    with pytest.raises(RecipeError, match="non-empty list"):
        parse_recipe({"steps": []})
    with pytest.raises(RecipeError, match="unknown step"):
        parse_recipe({"steps": [{"prune": {"method": "x"}}]})
    with pytest.raises(RecipeError, match="cannot follow activation sparsity"):
        parse_recipe({"steps": [{"sparsify": {"method": "larosa"}}, {"quantize": {"method": "masquant"}}]})
    p = tmp_path / "r.yaml"
    p.write_text("steps:\n  - sparsify: {method: larosa, sparsity: 0.4}\n  - quantize: {method: rtn, scheme: w8a8}\n")
    assert [s["kind"] for s in load_recipe(p)] == ["sparsify", "quantize"]
    with pytest.raises(FileNotFoundError):
        load_recipe(tmp_path / "missing.yaml")


def test_larosa_then_w8a8_keeps_topk_and_roundtrips(tmp_path, tokenizer):
    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=48))
    x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 40), generator=torch.Generator().manual_seed(1))}
    sparse_only = copy.deepcopy(model)
    apply_recipe(sparse_only, calib, parse_recipe({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.4}}]}),
                 progress=False)
    joint = copy.deepcopy(model)
    steps = parse_recipe({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.4}},
                                    {"quantize": {"method": "rtn", "scheme": "w8a8"}}]})
    apply_recipe(joint, calib, steps, progress=False)
    q = joint.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.input_sparsifier is not None and q.packed
    # the quantized sparse model stays close to the sparse model (W8A8 is mild) but is not identical
    y_sparse, y_joint = sparse_only(**x).logits, joint(**x).logits
    rel = ((y_joint - y_sparse).norm() / y_sparse.norm()).item()
    assert 0 < rel < 0.3  # tiny random model: quantization noise also flips near-tie Top-K choices
    # the sparsifier really runs: zero fraction of q_proj's effective input is 1 - K/D
    seen = []
    orig = q.input_sparsifier.sparsify
    q.input_sparsifier.sparsify = lambda t: seen.append(orig(t)) or seen[-1]
    joint(**x)
    z = seen[0]
    assert abs(float((z == 0).float().mean()) - (1 - q.input_sparsifier.keep / q.in_features)) < 1e-6
    out = mmcompress.save(joint, tmp_path / "joint")
    desc = json.loads((out / "mmcompress.json").read_text())
    assert desc["kind"] == "recipe" and len(desc["steps"]) == 2
    assert torch.equal(mmcompress.load(out, runtime="reference")(**x).logits, y_joint)


def _step_by_step(model, calib, sparse, quant):
    """The per-step path: the sparsity method's whole-model stages, then a quantization walk of its own."""
    from mmcompress.models.adapters import get_adapter
    from mmcompress.quant.api import quantize
    from mmcompress.sparse.methods.cats import cats
    from mmcompress.sparse.methods.larosa import larosa
    from mmcompress.sparse.methods.teal import teal
    from mmcompress.sparse.methods.wina import wina

    name, opts = sparse
    {"larosa": larosa, "teal": teal, "cats": cats, "wina": wina}[name](model, get_adapter(model), calib.samples, **opts,
                                                                          progress=False)
    quantize(model, calib, quant[0], quant[1], progress=False)
    return model


@pytest.mark.parametrize("sparse,quant", [
    (("larosa", {"sparsity": 0.4}), ("rtn", "w8a8")),
    (("larosa", {"sparsity": 0.4, "column_scale": True}), ("smoothquant", "w8a8")),
    (("larosa", {"sparsity": 0.3, "mode": "reference", "plan": "uniform"}), ("rtn", "w8a8")),
    (("teal", {"sparsity": 0.4}), ("awq", "w4a16")),
    (("cats", {"sparsity": 0.3}), ("smoothquant", "w8a8")),
    (("wina", {"sparsity": 0.4}), ("rtn", "w8a8")),
])
def test_recipe_is_one_walk_with_the_step_by_step_result(tokenizer, monkeypatch, sparse, quant):
    """A recipe captures once and walks the layers once; the artifact is the one the steps make one walk
    after another (bit-identical here: the same arithmetic on the same chains)."""
    import mmcompress.engine as engine

    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer, tie=sparse[0] == "larosa")
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=48))
    x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 40), generator=torch.Generator().manual_seed(1))}
    ref = _step_by_step(copy.deepcopy(model), calib, sparse, quant)
    captures, walked = [], []
    capture = engine.capture_inputs
    monkeypatch.setattr(engine, "capture_inputs", lambda *a, **k: captures.append(1) or capture(*a, **k))
    name, opts = sparse
    steps = parse_recipe({"steps": [{"sparsify": {"method": name, **opts}},
                                    {"quantize": {"method": quant[0], "scheme": quant[1]}}]})
    one = copy.deepcopy(model)
    apply_recipe(one, calib, steps, progress=False)
    assert len(captures) == 1
    assert one._mmcompress_description["walks"][0]["steps"] == [1, 2]
    a, b = one.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(one(**x).logits, ref(**x).logits)


def test_staged_plans_run_apart_and_adapters_quantize_in_the_walk(tokenizer, monkeypatch):
    """LaRoSA's grid plan sets its K after its walk: it walks alone, the quantization walk after it;
    ``adapters: w8a16`` quantizes each layer's residual adapter in the same walk, after its output pass."""
    import mmcompress.engine as engine
    from mmcompress.sparse.joint import quantize_residual_adapters

    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=48))
    one = copy.deepcopy(model)
    apply_recipe(one, calib, parse_recipe({"steps": [
        {"sparsify": {"method": "larosa", "sparsity": 0.4}},
        {"quantize": {"method": "rtn", "scheme": "w8a8", "adapters": "w8a16"}}]}), progress=False)
    ref = _step_by_step(copy.deepcopy(model), calib, ("larosa", {"sparsity": 0.4}), ("rtn", "w8a8"))
    assert quantize_residual_adapters(ref, "w8a16") == 2
    assert one._mmcompress_description["steps"][1]["residual_adapters"] == {"scheme": "w8a16", "count": 2}
    a, b = one.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    captures = []
    capture = engine.capture_inputs
    monkeypatch.setattr(engine, "capture_inputs", lambda *a, **k: captures.append(1) or capture(*a, **k))
    grid = copy.deepcopy(model)
    apply_recipe(grid, calib, parse_recipe({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.4, "plan": "grid"}},
                                                      {"quantize": {"method": "rtn", "scheme": "w8a8"}}]}), progress=False)
    walks = grid._mmcompress_description["walks"]
    assert [w["steps"] for w in walks] == [[1], [2]] and walks[0]["walk"] == "one layer-by-layer walk"
    assert len(captures) == 2  # the grid's walk (K set after it), then the quantization walk


def test_streamed_recipe_walks_again_from_an_intermediate_it_removes(tmp_path, tokenizer):
    """The Python API on a streamed model (no CLI work directory): the walk after LaRoSA's ``basis: both`` step
    streams its result from a work directory of ours beside the checkpoint directory, deleted when the stream
    is closed (by ``save_streamed``); the artifact equals the in-memory recipe's."""
    from mmcompress.export.serialization import load_model, save
    from mmcompress.fileio import CheckpointDir
    from mmcompress.streaming import load_streamed, save_streamed

    from .tiny_models import save_tiny

    src = save_tiny(tmp_path / "src", "llama", layers=3, tokenizer=tokenizer)
    calib = CalibrationSet(text_samples(tokenizer, n=3, seqlen=32))
    steps = parse_recipe({"steps": [{"sparsify": {"method": "larosa", "sparsity": 0.4, "basis": "both"}},
                                    {"quantize": {"method": "rtn", "scheme": "w8a8"}}]})
    model = load_streamed(src)
    with CheckpointDir(tmp_path / "work" / "ck") as ck:
        apply_recipe(model, calib, steps, progress=False, checkpoint_dir=ck)
        assert model._mmcompress_stream.intermediate.parent.name.startswith(".ck.mmcompress-")
        save_streamed(model, tmp_path / "streamed", ck.path)
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["ck"]
    ref = load_model(src, runtime="reference")  # as `compress --in-memory` loads it
    apply_recipe(ref, calib, steps, progress=False)
    save(ref, tmp_path / "memory", source_dir=src)
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == \
        (tmp_path / "memory" / "model.safetensors").read_bytes()
