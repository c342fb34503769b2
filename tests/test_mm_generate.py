"""Greedy multimodal generation with transformers' prefill and the decode engine's steps
(mmcompress.runtime.mmgenerate): the same tokens as ``model.generate`` (and, with the engine's Python step,
bitwise the same step logits) on tiny Qwen2.5-Omni thinkers and Qwen2.5-VL models with audio and image
inputs, fp32, MASQuant's fake-quant and deployed forms; the fused C++ step (the default where it runs) on
dense, RTN, SmoothQuant (run-time smoothing) and MASQuant deployed models: transformers' tokens, and step
logits within round-off of the Python step's; transformers keeps every call the engine does not reproduce."""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.models import modality
from mmcompress.runtime import mmgenerate as mg

from .conftest import make_audio, make_image, mm_inputs, tiny_model


def _inputs(kind, tok, seed):
    x, proc = mm_inputs(kind, tok, seed=seed)
    x["attention_mask"] = torch.ones_like(x["input_ids"])  # as the processors return it
    return x


def _hf(model, x, new=10, **kw):
    return model.generate(**x, max_new_tokens=new, do_sample=False, **kw)


@pytest.fixture(scope="module")
def models(tokenizer):
    return {kind: tiny_model(kind, tokenizer=tokenizer, layers=3)[0] for kind in ("qwen2_5_omni", "qwen2_5_vl")}


@pytest.fixture
def spy(monkeypatch):
    used = []
    plan = mg.mm_plan

    def wrapped(*a):
        p = plan(*a)
        used.append(p is not None)
        return p

    monkeypatch.setattr(mg, "mm_plan", wrapped)
    return used


@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen2_5_vl"])
def test_tokens_and_step_logits_equal_transformers(models, tokenizer, kind, spy):
    model = models[kind]
    for seed in range(3):
        x = _inputs(kind, tokenizer, seed)
        ref = _hf(model, x, 12, return_dict_in_generate=True, output_logits=True)
        assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=12, do_sample=False), ref.sequences)
        assert spy[-1]
        logits = []  # the Python step (fused=False): bitwise
        got = mg._run(model, mg.mm_plan(model, dict(x, max_new_tokens=12, do_sample=False)), logits, fused=False)
        assert torch.equal(got, ref.sequences) and len(logits) == len(ref.logits) == 12
        # the prefill's and every engine step's logits are transformers' own, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(logits, ref.logits)), seed
    # without the mask (transformers then builds text positions): still its tokens
    x.pop("attention_mask")
    assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=8, do_sample=False), _hf(model, x, 8))


def test_eos_and_min_new_tokens_as_transformers(models, tokenizer, spy):
    model = models["qwen2_5_omni"]
    x = _inputs("qwen2_5_omni", tokenizer, 1)
    ref = _hf(model, x, 10)
    L = x["input_ids"].shape[1]
    for at in (0, 2):  # the EOS token is the prefill's token, or the third
        eos = int(ref[0, L + at])
        for kw in ({"eos_token_id": eos}, {"eos_token_id": [eos, 7]}, {"eos_token_id": eos, "min_new_tokens": 6},
                   {"eos_token_id": eos, "min_length": L + 4}):
            got = mg.greedy_generate(model, **x, max_new_tokens=10, do_sample=False, **kw)
            assert spy[-1] and torch.equal(got, _hf(model, x, 10, **kw)), (at, kw)
        first = int((ref[0, L:] == eos).nonzero()[0])  # greedy tokens may repeat: the first EOS stops
        assert mg.greedy_generate(model, **x, max_new_tokens=10, eos_token_id=eos).shape[1] == L + first + 1
    assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=1), _hf(model, x, 1)) and spy[-1]


def test_decode_rope_is_plain_rope_at_cache_position_plus_rope_deltas(models, tokenizer):
    """What the engine relies on, checked in transformers' own run: each decode step's three mRoPE rows are
    equal, at ``cache_position + rope_deltas``, and the rotary module then gives plain RoPE there."""
    model = models["qwen2_5_omni"]
    x = _inputs("qwen2_5_omni", tokenizer, 0)
    L = x["input_ids"].shape[1]
    lm = model.model.language_model
    seen = []
    h = lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        _hf(model, x, 5)
    finally:
        h.remove()
    deltas = model.model.rope_deltas
    assert seen[0].shape[-1] == L and int(deltas) != 0  # the audio and image tokens move the positions
    rot = lm.rotary_emb
    inv = rot.inv_freq.float()
    for k, pos in enumerate(seen[1:], start=1):
        assert pos.shape == (4, 1, 1)
        rows = pos[1:, 0, 0]
        assert torch.equal(rows, torch.full((3,), L + k - 1) + deltas[0, 0])  # cache_position + rope_deltas
        cos, sin = rot(torch.empty(1, 1, 0), pos[1:])
        freqs = rows[0].float() * inv
        emb = torch.cat([freqs, freqs])
        assert torch.equal(cos[0, 0], emb.cos()) and torch.equal(sin[0, 0], emb.sin())


def _masquant(model, tokenizer):
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tokenizer, seed=s)[0] for s in range(3)])
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=1)
    return m


def test_masquant_fake_quant_and_deployed_take_the_text_path_as_transformers(models, tokenizer, spy, monkeypatch):
    from mmcompress.quant.deployed import deploy
    from mmcompress.quant.methods.masquant import MASLinear

    m = _masquant(models["qwen2_5_omni"], tokenizer)
    q = m.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q, MASLinear) and q.rank > 0 and getattr(m, "_mmcompress_router", None) is not None
    seen = []
    fwd = MASLinear.forward

    def record(self, x):
        if self is q:
            ids = modality.current_modality_ids()
            seen.append(None if ids is None else ids.clone())
        return fwd(self, x)

    monkeypatch.setattr(MASLinear, "forward", record)
    for seed in range(2):
        x = _inputs("qwen2_5_omni", tokenizer, seed)
        seen.clear()
        ref = _hf(m, x, 8)
        hf_ids = list(seen)
        seen.clear()
        got = mg.greedy_generate(m, **x, max_new_tokens=8, do_sample=False)
        assert spy[-1] and torch.equal(got, ref), seed
        # the prefill routes audio and image tokens; each decode step sees all-text ids [1, 1], as in transformers'
        assert len(seen) == len(hf_ids) and int(seen[0].max()) == modality.AUDIO
        for a, b in zip(seen[1:], hf_ids[1:]):
            assert a.shape == b.shape == (1, 1) and a.dtype == b.dtype and not a.any() and not b.any()
    monkeypatch.setattr(MASLinear, "forward", fwd)
    deploy(m, "int", quiet=True)  # the integer runtime, as the demo evaluates it
    for seed in range(2):
        x = _inputs("qwen2_5_omni", tokenizer, seed)
        assert torch.equal(mg.greedy_generate(m, **x, max_new_tokens=8, do_sample=False), _hf(m, x, 8)) and spy[-1]


def test_transformers_runs_what_the_engine_does_not_reproduce(models, tokenizer, spy):
    from transformers import LogitsProcessorList

    model = models["qwen2_5_omni"]
    x = _inputs("qwen2_5_omni", tokenizer, 0)
    for kw in ({"do_sample": True, "top_k": 5}, {"repetition_penalty": 1.3}, {"num_beams": 2},
               {"logits_processor": LogitsProcessorList([])}, {"return_dict_in_generate": True},
               {"use_audio_in_video": False}):
        out = mg.greedy_generate(model, **x, max_new_tokens=3, **kw)
        assert not spy[-1], kw
        assert out is not None
    mask = x["attention_mask"].clone()
    mask[0, 0] = 0
    mg.greedy_generate(model, **dict(x, attention_mask=mask), max_new_tokens=3)
    assert not spy[-1]
    mg.greedy_generate(model, **x)  # transformers' own default length
    assert not spy[-1]
    h = model.model.language_model.layers[1].register_forward_hook(lambda *a: None)
    try:
        assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=4), _hf(model, x, 4)) and not spy[-1]
    finally:
        h.remove()
    sub = copy.deepcopy(model)
    sub.__class__ = type("Sub", (type(model),), {})
    mg.greedy_generate(sub, **x, max_new_tokens=3)
    assert not spy[-1]
    llama, _ = tiny_model("llama", tokenizer=tokenizer)
    ids = x["input_ids"].clamp(max=100)
    assert torch.equal(mg.greedy_generate(llama, input_ids=ids, max_new_tokens=3),
                       llama.generate(ids, max_new_tokens=3, do_sample=False)) and not spy[-1]
    # and the engine again once nothing stands in the way
    mg.greedy_generate(model, **x, max_new_tokens=3)
    assert spy[-1]


def test_eval_generation_goes_through_the_engine(models, tokenizer, spy, monkeypatch):
    from mmcompress.eval.asr import transcribe
    from mmcompress.eval.vqa import answer

    from .tiny_models import tiny_processor

    model = models["qwen2_5_omni"]
    proc = tiny_processor("qwen2_5_omni", tokenizer)
    audio, image = make_audio(1.5), make_image(3)
    got = (transcribe(model, proc, audio, max_new_tokens=8), answer(model, proc, image, "what color?"))
    assert spy[-2:] == [True, True]
    monkeypatch.setattr(mg, "mm_plan", lambda *a: None)  # transformers' generate throughout
    assert (transcribe(model, proc, audio, max_new_tokens=8), answer(model, proc, image, "what color?")) == got


# -- the fused step on the route ----------------------------------------------------------------------

# Per step, |fused - Python| <= FUSED_TOL * max |Python logit| (fp32).  Both steps compute the same fp32
# operations from the same caches, RoPE rows and weights; they differ in summation order (the GEMVs, the norms'
# mean of squares, attention's softmax sums), about 1e-7 relative per reduction, which three layers and the head
# carry to the logits: measured at most 5.2e-7 over dense/RTN/SmoothQuant/MASQuant x Omni/VL x 3 inputs x 11
# steps (/tmp/s34-mmfused/probe2.py).  The integer rows quantize the same activations to the same codes unless a
# value lies within that round-off of a rounding boundary; such a flip would show as a difference of a code
# step (far above this bound, and explained by mmcompress.runtime.fused_check), and none occurs on these inputs.
FUSED_TOL = 2e-6


@pytest.fixture(scope="module")
def deployed(models, tokenizer):
    """Per kind: dense, and RTN / SmoothQuant (run-time smoothing) / MASQuant W4A8 on the integer runtime."""
    from mmcompress.quant.deployed import deploy

    out = {}
    for kind, base in models.items():
        calib = CalibrationSet([mm_inputs(kind, tokenizer, seed=s)[0] for s in range(3)])
        out[kind, "dense"] = base
        for method, opts in (("rtn", {}), ("smoothquant", {"runtime_smoothing": True}), ("masquant", {"epochs": 1})):
            m = copy.deepcopy(base)
            mmcompress.quantize(m, calib, method, "w4a8", progress=False, **opts)
            out[kind, method] = deploy(m, "int", quiet=True)
    return out


@pytest.fixture
def fused_steps(monkeypatch):
    """How many decode steps ran on the fused step (FusedStep.step calls)."""
    from mmcompress.runtime.fused import FusedStep

    calls = [0]
    step = FusedStep.step

    def counted(self, *a):
        calls[0] += 1
        return step(self, *a)

    monkeypatch.setattr(FusedStep, "step", counted)
    return calls


def _check_layers(model, method):
    """What the deployed rows are, so the test covers what it says (smoothing shapes, the MASQuant class)."""
    from mmcompress.quant.deployed import IntLinear, IntMASLinear

    lm = model.model.language_model
    lins = [m for m in lm.modules() if isinstance(m, IntLinear)]
    if method == "dense":
        assert not lins
        return
    assert len(lins) == 7 * len(lm.layers)
    o = lm.layers[0].self_attn.o_proj
    if method == "rtn":
        assert all(type(m) is IntLinear and m.input_smoothing is None for m in lins)
    elif method == "smoothquant":  # runtime smoothing: o_proj divides by its row at run time
        assert type(o) is IntLinear and o.input_smoothing is not None and o.input_smoothing.shape[0] == 1
    else:  # per-modality rows that differ (text row 0), a low-rank correction for image/audio tokens
        q = lm.layers[0].self_attn.q_proj
        assert type(q) is IntMASLinear and q.input_smoothing.shape[0] > 1 and q.cmc_left is not None
        assert not torch.equal(q.input_smoothing[0], q.input_smoothing[1])


@pytest.mark.parametrize("method", ["dense", "rtn", "smoothquant", "masquant"])
@pytest.mark.parametrize("kind", ["qwen2_5_omni", "qwen2_5_vl"])
def test_fused_step_route_tokens_as_transformers_logits_as_python_step(deployed, tokenizer, kind, method, spy,
                                                                       fused_steps):
    from mmcompress.runtime.fused import load

    if not load():
        pytest.skip("no fused CPU kernel here")
    model = deployed[kind, method]
    _check_layers(model, method)
    for seed in range(2):
        x = _inputs(kind, tokenizer, seed)
        ref = _hf(model, x, 12)
        before = fused_steps[0]
        assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=12, do_sample=False), ref), seed
        assert spy[-1] and fused_steps[0] - before == 11  # every decode step on the fused step
        plan = mg.mm_plan(model, dict(x, max_new_tokens=12, do_sample=False))
        fu, py = [], []
        assert torch.equal(mg._run(model, plan, fu, fused=True), ref)
        assert torch.equal(mg._run(model, plan, py, fused=False), ref)
        assert len(fu) == len(py) == 12
        # the prefill's logits: the head on the last position only (fused route) against transformers' head on
        # every position (Python route): one row of the same GEMM, summed in another order
        for i, (a, b) in enumerate(zip(fu, py)):
            err = ((a - b).abs().max() / b.abs().max()).item()
            assert err <= FUSED_TOL, (seed, i, err)


def test_the_prefill_runs_the_head_on_the_last_position_unless_fused_is_false(models, tokenizer):
    """transformers' prefill reads one row of the logits: the head sees that row alone, except with
    ``fused=False`` (transformers' logits bit for bit), and the cut leaves no hook behind."""
    model = models["qwen2_5_omni"]
    x = _inputs("qwen2_5_omni", tokenizer, 0)
    plan = mg.mm_plan(model, dict(x, max_new_tokens=1, do_sample=False))
    L = x["input_ids"].shape[1]
    for fused, rows in ((None, 1), (True, 1), (False, L)):
        seen = []
        spy = model.lm_head.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
        try:
            mg._run(model, plan, fused=fused)
        finally:
            spy.remove()
        assert seen == [rows], (fused, seen)
        assert not model.lm_head._forward_pre_hooks


def test_fused_step_needs_the_route_for_per_modality_layers(deployed):
    """MASQuant's deployed layers take the fused step only in a text_only engine (the route's); the plain
    engine keeps its Python step for them, and runs RTN's on the fused step either way."""
    from mmcompress.runtime.decode import MROPE_TEXT_FAMILIES, DecodeEngine
    from mmcompress.runtime.fused import fused_problem, load

    if not load():
        pytest.skip("no fused CPU kernel here")
    for method, plain in (("masquant", "IntMASLinear layers"), ("rtn", None)):
        lm = mg._TextLM(deployed["qwen2_5_omni", method])
        e = DecodeEngine(lm, max_len=32, path="fast", families=MROPE_TEXT_FAMILIES)
        assert (fused_problem(e) is None) == (plain is None) and e.fused == (plain is None)
        if plain:
            assert plain in fused_problem(e)
        e = DecodeEngine(lm, max_len=32, path="fast", families=MROPE_TEXT_FAMILIES, text_only=True)
        assert fused_problem(e) is None and e.fused


def test_fused_route_keeps_the_python_step_for_hooks_and_when_asked(deployed, tokenizer, fused_steps, capsys):
    """A forward hook on a module inside the text decoder (which the fused step would not call): the Python
    step, and the hook runs at every decode step; ``fused=False`` likewise."""
    model = deployed["qwen2_5_omni", "rtn"]
    x = _inputs("qwen2_5_omni", tokenizer, 0)
    ref = _hf(model, x, 6)
    calls = []
    h = model.model.language_model.layers[1].post_attention_layernorm.register_forward_hook(lambda *a: calls.append(1))
    try:
        got = mg.greedy_generate(model, **x, max_new_tokens=6, fused=True)
    finally:
        h.remove()
    assert torch.equal(got, ref) and fused_steps[0] == 0 and len(calls) == 6  # the prefill and 5 steps
    assert "fused decode step unavailable (forward hooks on Qwen2_5OmniRMSNorm)" in capsys.readouterr().err
    assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=6, fused=False), ref) and fused_steps[0] == 0
    assert torch.equal(mg.greedy_generate(model, **x, max_new_tokens=6), ref) and fused_steps[0] == 5
