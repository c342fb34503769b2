"""The decode engine (``mmcompress.runtime.decode``): the same tokens as HF ``generate`` greedy.

Tiny random models, offline.  Speed is measured by ``mmcompress bench decode``, never here.
"""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant.deployed import IntLinear
from mmcompress.runtime.decode import DecodeEngine, fast_path_problem

from .conftest import text_samples, tiny_model


def _prompt(tok, n=9, seed=1):
    return torch.randint(0, len(tok) - 10, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_greedy(model, ids, n):
    out = type(model).generate(model, ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out


def _artifact(tmp_path, tokenizer, kind, scheme, dtype=torch.float32):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=(kind == "qwen2"), dtype=dtype)
    if scheme:
        mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", scheme, progress=False)
    return mmcompress.save(model, tmp_path / f"{kind}-{scheme}"), tok


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("scheme", ["w8a8", "w4a16", None])
def test_greedy_tokens_equal_hf_generate(tmp_path, tokenizer, kind, scheme):
    path, tok = _artifact(tmp_path, tokenizer, kind, scheme)
    model = mmcompress.load(path)  # the integer runtime
    if scheme:
        assert any(isinstance(m, IntLinear) for m in model.modules())
    ids = _prompt(tok)
    ref = _hf_greedy(model, ids, 16)
    for p in ("fast", "hf"):
        eng = DecodeEngine(model, max_len=32, path=p)
        assert eng.path == p
        got = eng.generate(ids, 16)
        assert torch.equal(got, ref), (p, got[0, 9:].tolist(), ref[0, 9:].tolist())
    # a second generation on the same engine reuses (and overwrites) the static cache
    eng = DecodeEngine(model, max_len=32)
    assert eng.path == "fast"
    eng.generate(_prompt(tok, 12, seed=7), 8)
    assert torch.equal(eng.generate(ids, 16), ref)


def test_logits_equal_hf_forward(tmp_path, tokenizer):
    path, tok = _artifact(tmp_path, tokenizer, "llama", "w8a8")
    model = mmcompress.load(path)
    ids = _prompt(tok, 11)
    eng = DecodeEngine(model, max_len=16)
    eng._reset()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        first = eng._forward(ids[:, :10], 0)
        step = eng._forward(ids[:, 10:], 10)
        # a prompt fed in two chunks (the masked, offset-causal branch) gives the same last logits
        eng2 = DecodeEngine(model, max_len=16)
        eng2._reset()
        eng2._forward(ids[:, :4], 0)
        chunk = eng2._forward(ids[:, 4:10], 4)
    scale = ref.abs().max()
    assert ((first - ref[:, 9]).abs().max() / scale) <= 1e-5
    assert ((step - ref[:, 10]).abs().max() / scale) <= 1e-5
    assert ((chunk - first).abs().max() / scale) <= 1e-5
    # and a wrong cache entry is visible: the check can fail
    eng._kc[0][:, :, 3] += 1.0
    with torch.no_grad():
        bad = eng._forward(ids[:, 10:], 10)
    assert ((bad - ref[:, 10]).abs().max() / scale) > 1e-3


def test_bf16_artifact_decodes(tmp_path, tokenizer):
    """An artifact quantized from a bf16 model runs (issue 22: 'expected m1 and m2 to have the same dtype')."""
    path, tok = _artifact(tmp_path, tokenizer, "llama", "w8a8", dtype=torch.bfloat16)
    model = mmcompress.load(path)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = _prompt(tok)
    got = DecodeEngine(model, max_len=32).generate(ids, 12)
    assert torch.equal(got, _hf_greedy(model, ids, 12))


def test_other_families_take_the_hf_path(tokenizer):
    model, tok = tiny_model("gemma3", tokenizer=tokenizer)
    assert fast_path_problem(model) is not None
    eng = DecodeEngine(model, max_len=32)
    assert eng.path == "hf" and eng.why_hf
    ids = _prompt(tok)
    assert torch.equal(eng.generate(ids, 10), _hf_greedy(model, ids, 10))
    with pytest.raises(ValueError, match="fast decode path"):
        DecodeEngine(model, path="fast")


def test_larosa_artifact_fast_path(tmp_path, tokenizer):
    """LaRoSA's merged form (residual-adapted layers, Top-K projections) on the fast path."""
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    mmcompress.sparsify(model, CalibrationSet(text_samples(tok, n=2)), "larosa", 0.4, progress=False)
    model = mmcompress.load(mmcompress.save(model, tmp_path / "larosa"))
    assert fast_path_problem(model) is None
    ids = _prompt(tok)
    eng = DecodeEngine(model, max_len=32)
    assert any(layer.adapt is not None for layer in eng.layers)
    assert torch.equal(eng.generate(ids, 12), _hf_greedy(model, ids, 12))


def test_sampling_and_stops(tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    ids = _prompt(tok)
    eng = DecodeEngine(model, max_len=40)
    greedy = eng.generate(ids, 12)
    # top-k 1 is greedy; a seeded generator repeats itself; a high temperature differs from greedy
    assert torch.equal(eng.generate(ids, 12, do_sample=True, top_k=1), greedy)
    a = eng.generate(ids, 12, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(3))
    b = eng.generate(ids, 12, do_sample=True, temperature=5.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    c = eng.generate(ids, 12, do_sample=True, top_p=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, greedy)  # top-p 0 keeps only the most likely token
    # stops right after an EOS token
    eos = int(greedy[0, 9 + 3])
    stopped = eng.generate(ids, 12, eos_token_id=eos)
    assert stopped.shape[1] <= 9 + 4 and int(stopped[0, -1]) == eos
    timings = {}
    eng.generate(ids, 5, timings=timings)
    assert timings["prefill_s"] > 0 and len(timings["step_s"]) == 4
    with pytest.raises(ValueError, match="max_len"):
        eng.generate(ids, 40)
    with pytest.raises(ValueError, match="batch 1"):
        eng.generate(torch.cat([ids, ids]), 4)


@pytest.mark.slow
def test_compiled_step_equals_eager(tmp_path, tokenizer, capsys):
    """``compile=True``: the captured single-token step (our integer kernels as custom ops) gives the same
    tokens, or the engine falls back to eager with a notice; either way the tokens are HF's."""
    path, tok = _artifact(tmp_path, tokenizer, "llama", "w8a8")
    model = mmcompress.load(path)
    ids = _prompt(tok)
    ref = _hf_greedy(model, ids, 8)
    eng = DecodeEngine(copy.deepcopy(model), max_len=24, compile=True)
    assert torch.equal(eng.generate(ids, 8), ref)
    assert eng.compiled or "torch.compile" in capsys.readouterr().err  # compiled, or said why not


def test_bench_decode_on_an_artifact(tmp_path, tokenizer, capsys):
    """``mmcompress bench decode DIR --json``: the fields issue 15 lists (functional; no timing assertions)."""
    import json

    from mmcompress.cli import main

    path, _ = _artifact(tmp_path, tokenizer, "llama", "w8a8")
    rc = main(["bench", "decode", str(path), "--prompt", "6", "--tokens", "4", "--rounds", "1", "--threads", "1",
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tok_s", "dense_tok_s", "speedup", "dense_baseline", "weight_bytes", "dense_weight_bytes",
                "peak_rss_bytes", "hf_generate_tok_s"):
        assert key in res, key
    assert res["decode_path"] == "fast" and res["hf_tokens_match"] is True
    assert res["dense_baseline"] in ("engine_fp32", "engine_bf16", "engine_own_kernel_0pct")
    assert 0.4 < res["weight_bytes"] / res["dense_weight_bytes"] < 0.7  # int8 codes + scales vs bf16
    # a plain model directory works too (its own weights are the "compressed" variant)
    plain = tmp_path / "plain"
    model, _ = tiny_model("qwen2", tokenizer=tokenizer)
    model.save_pretrained(plain)
    assert main(["bench", "decode", str(plain), "--prompt", "5", "--tokens", "3", "--rounds", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["artifact"] is False and res["hf_tokens_match"] is True
    assert main(["bench", "decode", str(tmp_path), "--tokens", "2"]) == 1  # no config.json
    assert "not a model directory" in capsys.readouterr().err


def test_densify_keeps_the_function(tmp_path, tokenizer):
    """The dense variants of the benchmark compute what the compressed model approximates."""
    from mmcompress.runtime.bench_decode import densify

    model, tok = tiny_model("llama", tokenizer=tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "smoothquant", "w8a16", progress=False)
    path = mmcompress.save(model, tmp_path / "sq")
    ref = mmcompress.load(path, runtime="reference")
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    dense = densify(ref, torch.float32)
    assert not any(type(m).__name__ in ("QuantLinear", "IntLinear") for m in dense.modules())
    ptrs = {t.data_ptr() for t in list(ref.parameters()) + list(ref.buffers())}
    assert not any(t.data_ptr() in ptrs for t in list(dense.parameters()) + list(dense.buffers()))  # a copy
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())  # the model untouched
    half = densify(ref, torch.bfloat16)
    assert {t.dtype for t in half.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a.bfloat16(), b) for a, b in zip(dense.parameters(), half.parameters()))
    ids = _prompt(tok, 12)
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, dense(input_ids=ids).logits
    assert ((a - b).abs().max() / a.abs().max()) < 1e-4  # w8a16: activations unquantized, same weight


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_shared_input_groups_are_bit_identical(tmp_path, tokenizer, scheme):
    from mmcompress.quant import kernels

    if not kernels._cpu.available():
        pytest.skip("no CPU integer kernel here")
    path, tok = _artifact(tmp_path, tokenizer, "llama", scheme)
    model = mmcompress.load(path)
    eng = DecodeEngine(model, max_len=8)
    layer = eng.layers[0]
    assert layer.qkv is not None and layer.gate_up is not None and layer.o1 is not None and layer.down1 is not None
    x = torch.randn(1, 1, model.config.hidden_size) * 3
    with torch.no_grad():
        for got, mod in zip(layer.qkv(x), (layer.q, layer.k, layer.v)):
            assert torch.equal(got, mod(x))
        for got, mod in zip(layer.gate_up(x), (model.model.layers[0].mlp.gate_proj, model.model.layers[0].mlp.up_proj)):
            assert torch.equal(got, mod(x))
        assert torch.equal(layer.o1(x)[0], layer.o(x))
        y = torch.randn(1, 1, model.config.intermediate_size)
        assert torch.equal(layer.down1(y)[0], layer.down(y))
