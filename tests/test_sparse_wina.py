"""WINA (arXiv 2505.19427) as a baseline: exact at sparsity 0, the weight-informed criterion, exactly
K channels per token, save/load."""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.models.adapters import get_adapter
from mmcompress.sparse.api import measure_sparsity
from mmcompress.sparse.merge import RotatedNorm
from mmcompress.sparse.methods.wina import WinaLinear, orthogonalize_block_inputs

from .conftest import text_samples, tiny_model


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_wina_is_exact_at_sparsity_zero(tokenizer, kind):
    model, tok = tiny_model(kind, tokenizer=tokenizer, seed=4)
    x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 24), generator=torch.Generator().manual_seed(1))}
    ref = model(**x).logits
    m = copy.deepcopy(model)
    mmcompress.sparsify(m, CalibrationSet(text_samples(tok, n=2, seqlen=16)), "wina", 0.0, progress=False)
    assert any(isinstance(mod, RotatedNorm) for mod in m.modules())
    assert _rel(m(**x).logits, ref) < 1e-5


def test_orthogonalization_makes_the_source_columns_orthogonal(tokenizer):
    model, _ = tiny_model("llama", tokenizer=tokenizer, seed=5)
    adapter = get_adapter(model)
    orthogonalize_block_inputs(adapter)
    for layer in adapter.layers:
        for w in (layer.self_attn.k_proj.weight, layer.mlp.gate_proj.weight):
            gram = w.double().T @ w.double()
            off = gram - torch.diag(torch.diagonal(gram))
            assert off.abs().max() < 1e-4 * gram.diagonal().max()


def test_wina_linear_keeps_exactly_k_by_activation_times_column_norm():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 5, bias=True)
    with torch.no_grad():
        lin.weight[:, 0] *= 100  # column 0 carries most of the output
    m = WinaLinear.from_linear(lin, keep=3)
    x = torch.tensor([[[0.05, 1.0, 0.9, 0.8, 0.7, 0.0, 0.0, 0.1]]])
    kept = m.sparsify(x)
    assert int((kept != 0).sum()) == 3
    assert kept[0, 0, 0] == x[0, 0, 0]  # |x|·c ranks the small activation on the heavy column first
    teal_choice = x.abs().topk(3, dim=-1).indices[0, 0].tolist()
    assert 0 not in teal_choice  # plain magnitude would have dropped it
    torch.testing.assert_close(m(x), torch.nn.functional.linear(kept, lin.weight, lin.bias))
    xs = torch.randn(3, 7, 8)
    assert ((m.sparsify(xs) != 0).sum(-1) == 3).all()


def test_wina_reaches_the_target_and_roundtrips(tokenizer, tmp_path):
    model, tok = tiny_model("llama", tokenizer=tokenizer, seed=6)
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=32))
    x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 24), generator=torch.Generator().manual_seed(2))}
    dense = model(**x).logits
    errs = {}
    for method in ("teal", "wina"):
        m = copy.deepcopy(model)
        mmcompress.sparsify(m, calib, method, 0.4, progress=False)
        errs[method] = _rel(m(**x).logits, dense)
        if method == "wina":
            assert abs(measure_sparsity(m, [x])["model_sparsity"] - 0.4) < 0.02
            assert m._mmcompress_description["method"]["model_sparsity"] == pytest.approx(0.4, abs=0.02)
            mmcompress.save(m, tmp_path / "wina")
            loaded = mmcompress.load(tmp_path / "wina")
            torch.testing.assert_close(loaded(**x).logits, m(**x).logits)
    assert 0 < errs["wina"] < 1.0, errs


def test_wina_greedy_plan(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer, seed=7)
    calib = CalibrationSet(text_samples(tok, n=4, seqlen=32))
    mmcompress.sparsify(model, calib, "wina", 0.4, plan="greedy", progress=False)
    info = model._mmcompress_description["method"]
    assert info["plan"] == "greedy" and info["model_sparsity"] == pytest.approx(0.4, abs=0.03)


def test_wina_through_the_cli(tiny_llama_dir, calib_text, tmp_path):
    from mmcompress.cli import main

    out = tmp_path / "w"
    rc = main(["sparsify", str(tiny_llama_dir), "--method", "wina", "--sparsity", "0.3", "--calib", str(calib_text),
               "--nsamples", "2", "--seqlen", "32", "--output", str(out), "--no-progress"])
    assert rc in (0, None) and (out / "mmcompress.json").exists()
    assert main(["sparsify", str(tiny_llama_dir), "--method", "wina", "--sparsity", "0.3", "--plan", "exact",
                 "--calib", str(calib_text), "--output", str(tmp_path / "x")]) not in (0, None)
    assert not (tmp_path / "x").exists()


def test_wina_greedy_resumes_bit_identical(tokenizer, tmp_path):
    """A resumed greedy run rebuilds the search chain and the chosen levels from the finished layers
    (WinaLayers.replayed): the same tensors, module specs and description as an uninterrupted run."""
    import copy

    from mmcompress.engine import run_layerwise
    from mmcompress.models.adapters import get_adapter
    from mmcompress.sparse.methods.wina import WinaLayers
    from mmcompress.specs import module_specs

    model, tok = tiny_model("llama", layers=3, tokenizer=tokenizer, seed=7)
    samples = text_samples(tok, n=4, seqlen=32)

    def run(m, **kw):
        method = WinaLayers(0.4, plan="greedy")
        run_layerwise(m, get_adapter(m), method, samples, progress=False, **kw)
        return method

    ref = copy.deepcopy(model)
    want = run(ref).description()

    def stop(i, info):
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(copy.deepcopy(model), checkpoint_dir=tmp_path / "ck", on_layer_done=stop)
    out = copy.deepcopy(model)
    got = run(out, checkpoint_dir=tmp_path / "ck", resume=True).description()
    assert got == want and len({lv for lvs in want["levels"].values() for lv in lvs}) > 1  # a searched split
    a, b = out.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert module_specs(out) == module_specs(ref)
