"""``mmcompress generate`` and ``mmcompress.load(...).generate`` on the decode engine: transformers' greedy
tokens, every artifact dtype, one-line errors, and the fallbacks (no kernel for this CPU; calls the engine
does not reproduce go to transformers).  Tiny random models, offline; no timing assertions."""

import json

import pytest
import torch

import mmcompress
from mmcompress.cli import main
from mmcompress.data import CalibrationSet
from mmcompress.models.loading import load_tokenizer
from .tiny_models import save_tiny
from mmcompress.runtime import generate as rgen
from mmcompress.runtime.decode import DecodeEngine

from .conftest import text_samples

PROMPT = "the quick brown fox jumps over the lazy dog"


def _hf(model, ids, n, **kw):
    """transformers' own generate (never the engine)."""
    return type(model).generate(model, ids, max_new_tokens=n, do_sample=False, **kw)


def _build(tmp_path, kind):
    """A tiny Llama directory compressed as ``kind`` (saved with its tokenizer)."""
    src = save_tiny(tmp_path / "src", "llama", layers=2)
    if kind == "dense":
        return src
    model = mmcompress.load_model(src)
    calib = CalibrationSet(text_samples(load_tokenizer(src), n=2))
    if kind in ("w8a8", "w4a16"):
        mmcompress.quantize(model, calib, "rtn", kind, progress=False)
    elif kind == "smoothquant-w8a8":
        mmcompress.quantize(model, calib, "smoothquant", "w8a8", progress=False)
    elif kind == "larosa":
        mmcompress.sparsify(model, calib, "larosa", 0.4, progress=False)
    elif kind == "joint":
        mmcompress.apply_recipe(model, calib, [{"kind": "sparsify", "method": "larosa", "sparsity": 0.4},
                                               {"kind": "quantize", "method": "rtn", "scheme": "w8a8"}], progress=False)
    return mmcompress.save(model, tmp_path / kind, source_dir=src)


def _cli(args, capsys):
    rc = main(["generate", *map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _reference(path, prompt_ids, n):
    """transformers' greedy tokens on the model as ``generate`` runs it (same load, same kernels)."""
    model = mmcompress.load_model(path, dtype="auto")
    rgen.prepare(model, quiet=True)
    return model, _hf(model, prompt_ids, n)


def _prompt_ids(path):
    return load_tokenizer(path)(PROMPT, return_tensors="pt").input_ids


@pytest.mark.parametrize("kind", ["dense", "w8a8", "w4a16", "smoothquant-w8a8", "larosa", "joint"])
def test_generate_equals_transformers_greedy(tmp_path, kind, capsys):
    path = _build(tmp_path, kind)
    rc, out, err = _cli([path, "--prompt", PROMPT, "--max-new-tokens", 12, "--threads", 1, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    ids = _prompt_ids(path)
    model, ref = _reference(path, ids, 12)
    assert res["decode_path"] == "fast" and res["prompt_tokens"] == ids.shape[1]
    from mmcompress.runtime import fused

    # the fused C++ step wherever the CPU has it (LaRoSA's sparse layers and adapters included)
    assert res["fused"] == fused.load()
    assert res["ids"] == ref[0, ids.shape[1]:].tolist(), (res["ids"], ref[0, ids.shape[1]:].tolist())
    if kind != "dense":
        assert res["artifact"] and res["runtime"] == "int"
        # load(...).generate: the engine, the same tokens
        calls = []
        orig = DecodeEngine.generate

        def spy(self, *a, **k):
            calls.append(1)
            return orig(self, *a, **k)

        DecodeEngine.generate = spy
        try:
            got = model.generate(ids, max_new_tokens=12, do_sample=False)
        finally:
            DecodeEngine.generate = orig
        assert calls and torch.equal(got, ref)
    # streamed: stdout is the generated text
    rc, out, err = _cli([path, "--prompt", PROMPT, "--max-new-tokens", 12], capsys)
    assert rc == 0, err
    assert out == load_tokenizer(path).decode(res["ids"], skip_special_tokens=True) + "\n"
    assert "tokens after" in err


@pytest.mark.parametrize("dtype,scheme", [("bfloat16", "w8a8"), ("bfloat16", "w4a16"), ("float16", "w8a8"),
                                          ("float32", "w4a16")])
def test_every_artifact_dtype_generates(tmp_path, tiny_llama_dir, dtype, scheme, capsys):
    """Issue 22: an artifact quantized from a bf16 load (``quantize --dtype bfloat16``, here data-free RTN)
    failed in ``generate`` with 'expected m1 and m2 to have the same dtype'."""
    out_dir = tmp_path / f"{dtype}-{scheme}"
    assert main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--scheme", scheme, "--dtype", dtype,
                 "--output", str(out_dir), "--no-progress"]) == 0
    capsys.readouterr()
    rc, out, err = _cli([out_dir, "--prompt", PROMPT, "--max-new-tokens", 10, "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["dtype"] == dtype and res["new_tokens"] >= 1
    ids = _prompt_ids(out_dir)
    _, ref = _reference(out_dir, ids, 10)
    if res["fused"] and dtype == "bfloat16":
        # the fused step rounds every op to bf16 as torch does, but sums in another order: its bf16 logits
        # agree to round-off (tests/test_fused_decode.py), not bit for bit, so a near tie can flip a
        # greedy token; the token-exact check runs on the Python step
        rc, out, err = _cli([out_dir, "--prompt", PROMPT, "--max-new-tokens", 10, "--json", "--step", "python"], capsys)
        assert rc == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert not res["fused"]
    assert res["ids"] == ref[0, ids.shape[1]:].tolist()


def test_bad_input_is_one_line(tmp_path, tiny_llama_dir, capsys):
    cases = [
        ([tmp_path / "missing", "--prompt", "hi"], "does not exist"),
        ([tiny_llama_dir, "--prompt", "   "], "--prompt is empty"),
        ([tiny_llama_dir, "--prompt", "hi", "--max-new-tokens", 0], "--max-new-tokens must be >= 1"),
        ([tiny_llama_dir, "--prompt", "hi", "--top-p", 0], "--top-p"),
        ([tmp_path, "--prompt", "hi"], "config.json"),
    ]
    for args, msg in cases:
        rc, out, err = _cli(args, capsys)
        assert rc == 1 and out == "", (args, out)
        assert len(err.strip().splitlines()) == 1 and msg in err, (args, err)
    # a model directory without tokenizer files
    bare = tmp_path / "bare"
    mmcompress.load_model(tiny_llama_dir).save_pretrained(bare)
    capsys.readouterr()
    rc, out, err = _cli([bare, "--prompt", "hi"], capsys)
    assert rc == 1 and out == "" and len(err.strip().splitlines()) == 1 and "tokenizer" in err, err


def test_missing_kernel_falls_back_with_a_notice(tmp_path, monkeypatch, capsys):
    from mmcompress.quant.kernels import cpu as qcpu

    path = _build(tmp_path, "w8a8")
    ids = _prompt_ids(path)
    monkeypatch.setitem(qcpu._STATE, "loaded", False)
    monkeypatch.setitem(qcpu._STATE, "error", "this CPU lacks AVX-512 VNNI")
    monkeypatch.setitem(qcpu._STATE, "bf16", False)
    rc, out, err = _cli([path, "--prompt", PROMPT, "--max-new-tokens", 8, "--json"], capsys)
    assert rc == 0, err
    notice = [line for line in err.splitlines() if "no CPU integer kernel" in line]
    assert len(notice) == 1 and "this CPU lacks AVX-512 VNNI" in notice[0] and "torch path" in notice[0]
    res = json.loads(out.strip().splitlines()[-1])
    _, ref = _reference(path, ids, 8)  # transformers on the same (torch-path) layers
    assert res["ids"] == ref[0, ids.shape[1]:].tolist()


def test_load_generate_routes_only_what_the_engine_reproduces(tmp_path, monkeypatch):
    from transformers import LogitsProcessorList

    path = _build(tmp_path, "w8a8")
    model = mmcompress.load(path)
    ids = _prompt_ids(path)
    used = []
    plan = rgen._engine_plan

    def spy(*a):
        p = plan(*a)
        used.append(p is not None)
        return p

    monkeypatch.setattr(rgen, "_engine_plan", spy)
    ref = _hf(model, ids, 10)
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), ref) and used[-1]
    assert torch.equal(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10),
                       ref) and used[-1]
    # EOS handling and min_new_tokens as transformers: make the 3rd greedy token the EOS token
    eos = int(ref[0, ids.shape[1] + 2])
    for kw in ({"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 6}):
        got = model.generate(ids, max_new_tokens=10, do_sample=False, **kw)
        assert used[-1] and torch.equal(got, _hf(model, ids, 10, **kw)), kw
    assert model.generate(ids, max_new_tokens=10, eos_token_id=eos).shape[1] == ids.shape[1] + 3
    # what the engine does not reproduce: transformers runs it
    model.generate(ids, max_new_tokens=4, do_sample=True, top_k=5)
    assert not used[-1]
    model.generate(ids, max_new_tokens=4, repetition_penalty=1.3)
    assert not used[-1]
    model.generate(ids, max_new_tokens=4, logits_processor=LogitsProcessorList([]))
    assert not used[-1]
    model.generate(torch.cat([ids, ids]), max_new_tokens=4)
    assert not used[-1]
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    model.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert not used[-1]
    out = model.generate(ids, max_new_tokens=4, return_dict_in_generate=True)
    assert not used[-1] and hasattr(out, "sequences")


def test_load_generate_puts_sparse_layers_on_the_decode_kernels(tmp_path):
    """A sparsified artifact's ``load(...).generate`` runs as ``mmcompress generate`` does: its sparse layers
    on the CPU kernels (prepared once, by the first call), so the engine takes its fused step, and the tokens
    are transformers' greedy ones on the same layers."""
    from mmcompress.runtime import fused
    from mmcompress.sparse.kernels import cpu as scpu
    from mmcompress.sparse.linear import sparse_linears

    if not scpu.available():
        pytest.skip(f"no CPU sparse kernel: {scpu.error()}")
    path = _build(tmp_path, "larosa")
    model = mmcompress.load(path)
    assert {m.backend for m in sparse_linears(model)} == {"torch"}  # loaded as saved (the reference layout)
    ids = _prompt_ids(path)
    engines = []
    real = DecodeEngine.generate

    def spy(eng, *a, **kw):
        engines.append(eng)
        return real(eng, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DecodeEngine, "generate", spy)
        got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert {m.backend for m in sparse_linears(model)} == {"cpu"}
    assert len(engines) == 1 and engines[0].fused == fused.load()
    _, ref = _reference(path, ids, 8)
    assert torch.equal(got, ref)


def test_other_families_keep_transformers_generate(tmp_path, tokenizer):
    from .tiny_models import tiny_model

    model, tok = tiny_model("gemma3", tokenizer=tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", "w8a8", progress=False)
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "g3"))
    ids = torch.randint(0, len(tok) - 10, (1, 7), generator=torch.Generator().manual_seed(0))
    assert rgen._engine_plan(loaded, ids, {"max_new_tokens": 5}) is None  # not the fast path
    assert torch.equal(loaded.generate(ids, max_new_tokens=5, do_sample=False), _hf(loaded, ids, 5))


def test_bf16_w4a16_engine_uses_the_modules_kernels(tmp_path, tokenizer):
    """A bf16 W4A16 artifact whose shapes take the bf16-activation kernel (K, group multiples of 128): the
    engine's shared-input groups run that kernel as the modules do (bit-identical), so its tokens are
    transformers'."""
    from .tiny_models import tiny_model
    from mmcompress.quant import kernels

    if not kernels._cpu.bf16_available():
        pytest.skip("no AVX512_BF16 kernel here")
    model, tok = tiny_model("llama", tokenizer=tokenizer, hidden=128, intermediate=256, dtype=torch.bfloat16)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", "w4a16", progress=False)
    loaded = mmcompress.load(mmcompress.save(model, tmp_path / "bf16-w4a16"))
    eng = DecodeEngine(loaded, max_len=32)
    layer, mods = eng.layers[0], loaded.model.layers[0]
    assert all(layer.qkv.bf16_ok) and all(layer.gate_up.bf16_ok) and all(layer.down1.bf16_ok)
    with torch.no_grad():
        x = (torch.randn(1, 1, 128) * 3).bfloat16()
        for got, mod in zip(layer.qkv(x), (layer.q, layer.k, layer.v)):
            assert torch.equal(got, mod(x))
        y = torch.randn(1, 1, 256).bfloat16()
        assert torch.equal(layer.down1(y)[0], mods.mlp.down_proj(y))
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(eng.generate(ids, 12), _hf(loaded, ids, 12))
