"""Issue 17, measurement side: per-modality whitening sets and the damping rule (item 3), diagnostics on
held-out samples (item 8), one Top-K tie policy for the reference and the CPU kernel (item 10)."""

import copy
import json

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.data.calibration import CalibrationError
from mmcompress.models.adapters import get_adapter
from mmcompress.models.modality import AUDIO, IMAGE, TEXT, modality_ids
from mmcompress.quant.methods import masquant as mq
from mmcompress.quant.quantizer import fake_quantize_weight
from mmcompress.sparse.topk import topk_indices, topk_mask, topk_sparsify

from .conftest import make_audio, make_image, mm_inputs, tiny_model


# -- item 3: whitening data and damping ----------------------------------------------------------


def _modality_only(proc, kind, seed):
    """An image-only or audio-only sample (placeholder tokens only), as the paper's whitening sets."""
    if kind == "image":
        enc = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[make_image(seed)], return_tensors="pt")
    else:
        enc = proc(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[make_audio(1.0 + 0.25 * seed, 300.0 + 40 * seed)],
                   return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}


def _layer0_moments(model, samples):
    """Σ xᵀx of the layer-0 q_proj input over the image and the audio tokens of ``samples`` (fp model)."""
    adapter = get_adapter(model)
    q = adapter.layers[0].self_attn.q_proj
    out, cur = {}, {}
    h = q.register_forward_pre_hook(lambda mod, args: cur.__setitem__("x", args[0].detach().double()))
    try:
        for s in samples:
            with torch.no_grad():
                model(**s)
            x = cur["x"].reshape(-1, cur["x"].shape[-1])
            ids = modality_ids(s["input_ids"], adapter.modality_token_ids).reshape(-1)
            for m in (IMAGE, AUDIO):
                xm = x[ids == m]
                out[m] = out.get(m, 0) + xm.T @ xm
    finally:
        h.remove()
    return out


def _first_whitening_moments(model, calib, monkeypatch, **kw):
    """Run MASQuant and return the covariances given to the first (layer 0, q_proj) whitened fits, and s."""
    calls = []
    real = mq.whitened_low_rank

    def spy(delta_w, moment, rank, damping=1e-6, factor=None):
        calls.append(moment.clone())
        return real(delta_w, moment, rank, damping, factor)

    monkeypatch.setattr(mq, "whitened_low_rank", spy)
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "masquant", "w4a8", progress=False, epochs=0, **kw)
    s = get_adapter(m).layers[0].self_attn.q_proj.input_smoothing.double()
    return {IMAGE: calls[0], AUDIO: calls[1]}, s, m


def test_cmc_whitens_each_modality_with_its_own_set(tokenizer, monkeypatch):
    """With a separate whitening set, C_m is Σ over that set's tokens of modality m of (x / s_m)ᵀ(x / s_m)
    (image-only samples for C_V, audio-only ones for C_A); by default, over the calibration set's."""
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)])
    proc = mm_inputs("qwen2_5_omni", tok)[1]
    whiten = CalibrationSet([_modality_only(proc, "image", 10), _modality_only(proc, "image", 11),
                             _modality_only(proc, "audio", 12)])
    own = _layer0_moments(model, whiten.samples)
    mixed = _layer0_moments(model, calib.samples)

    got, s, m = _first_whitening_moments(model, calib, monkeypatch, whitening=whiten)
    for mod in (IMAGE, AUDIO):
        expect = own[mod] / s[mod][:, None] / s[mod][None, :]
        other = mixed[mod] / s[mod][:, None] / s[mod][None, :]
        assert torch.allclose(got[mod], expect, rtol=1e-4, atol=1e-6 * expect.abs().max())
        assert not torch.allclose(got[mod], other, rtol=1e-2)  # the old behaviour: the calibration tokens
    desc = m._mmcompress_description
    assert desc["method"]["whitening"] == "separate" and desc["whitening"]["tokens"]["audio"] > 0
    assert desc["method_summary"]["whitening"]["set"] == "separate"

    monkeypatch.undo()
    got, s, _ = _first_whitening_moments(model, calib, monkeypatch)
    expect = mixed[IMAGE] / s[IMAGE][:, None] / s[IMAGE][None, :]
    assert torch.allclose(got[IMAGE], expect, rtol=1e-4, atol=1e-6 * expect.abs().max())


def test_whitening_set_must_cover_every_calibrated_modality(tokenizer):
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=0)[0]])
    proc = mm_inputs("qwen2_5_omni", tok)[1]
    with pytest.raises(ValueError, match="no audio tokens"):
        mmcompress.quantize(model, calib, "masquant", "w4a8", progress=False, epochs=0,
                            whitening=[_modality_only(proc, "image", 3)])
    with pytest.raises(ValueError, match="applies to masquant"):
        mmcompress.quantize(model, calib, "smoothquant", "w4a8", progress=False, whitening=calib)


def _activations(n, d, basis, spec, gen):
    x = (torch.randn(n, d, dtype=torch.float64, generator=gen) * spec.sqrt()) @ basis.T
    x[:, :3] *= 20  # a few outlier channels, as in real decoder inputs
    return x


def test_whitening_damping_holds_out_of_sample():
    """A rank-deficient covariance (fewer calibration tokens than input channels, like 512 image tokens
    for a 576-wide model): the damped whitened fit is finite, beats the unwhitened SVD on held-out tokens
    by a wide margin, and its held-out error is flat in the damping from 1e-8 to 1e-2 (the rule's λ = 1e-6
    is not a tuned value).  With λ = 0 the eigen fallback keeps the factors finite (the old code: NaN)."""
    gen = torch.Generator().manual_seed(0)
    d, dout, rank = 64, 96, 8
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen)).Q
    spec = torch.logspace(0, -3, d, dtype=torch.float64)
    w = torch.randn(dout, d, dtype=torch.float64, generator=gen) * 0.05
    s_t = torch.rand(d, dtype=torch.float64, generator=gen) + 0.5
    s_m = s_t * torch.exp(0.3 * torch.randn(d, dtype=torch.float64, generator=gen))
    delta = w * s_m - fake_quantize_weight((w * s_t).float(), 4).double()
    x_cal = _activations(40, d, basis, spec, gen) / s_m  # 40 < 64 tokens: C has rank 40
    x_test = _activations(4000, d, basis, spec, gen) / s_m
    c = x_cal.T @ x_cal
    assert torch.linalg.matrix_rank(c) < d

    def held_out(left, right):
        assert torch.isfinite(left).all() and torch.isfinite(right).all()
        return float((x_test @ (delta.T - left @ right)).norm() / (x_test @ delta.T).norm())

    plain = held_out(*mq.whitened_low_rank(delta, None, rank))
    errs = {lam: held_out(*mq.whitened_low_rank(delta, c, rank, damping=lam)) for lam in (1e-8, 1e-6, 1e-4, 1e-2)}
    assert errs[1e-6] < 0.6 * plain, (errs, plain)
    assert max(errs.values()) < 1.05 * min(errs.values()), errs
    assert held_out(*mq.whitened_low_rank(delta, c, rank, damping=0.0)) < 0.6 * plain


# -- item 8: diagnostics on held-out samples -----------------------------------------------------


def _sqnr(ref, out):
    return 10 * torch.log10(ref.double().pow(2).sum() / (ref.double() - out.double()).pow(2).sum()).item()


def test_diagnostics_measure_on_the_held_out_set(tokenizer, tmp_path):
    """With ``report_calib`` the report's SQNR is that of the held-out samples: layer 0's accumulated
    text SQNR equals the one recomputed from the saved model's hidden states on those samples, and
    differs from the in-sample figure.  A report set that shares a sample with the calibration set is
    refused."""
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)])
    held = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s, text=" a held out prompt here")[0]
                           for s in (5, 6)], source="held")
    m = copy.deepcopy(model)
    mmcompress.quantize(m, calib, "smoothquant", "w4a8", progress=False, report_dir=tmp_path / "h",
                        report_calib=held, runtime_smoothing=True)
    rep = json.loads((tmp_path / "h" / "diagnostics-smoothquant-w4a8.json").read_text())
    assert rep["sqnr_data"] == {"set": "held-out", "nsamples": 2, "source": "held"}

    refs, outs = [], []
    ad = get_adapter(model)
    for s in held.samples:
        ids = modality_ids(s["input_ids"], ad.modality_token_ids).reshape(-1)
        with torch.no_grad():  # hidden_states[1]: the output of decoder layer 0
            refs.append(model(**s, output_hidden_states=True).hidden_states[1][0][ids == TEXT])
            outs.append(m(**s, output_hidden_states=True).hidden_states[1][0][ids == TEXT])
    expect = _sqnr(torch.cat(refs), torch.cat(outs))
    assert rep["layers"][0]["sqnr_accumulated"]["text"] == pytest.approx(expect, abs=1e-3)

    m2 = copy.deepcopy(model)
    mmcompress.quantize(m2, calib, "smoothquant", "w4a8", progress=False, report_dir=tmp_path / "c",
                        runtime_smoothing=True)
    rep2 = json.loads((tmp_path / "c" / "diagnostics-smoothquant-w4a8.json").read_text())
    assert rep2["sqnr_data"]["set"] == "calibration (in-sample)"
    assert abs(rep2["layers"][0]["sqnr_accumulated"]["text"] - expect) > 1e-3
    # the plot is drawn with the JSON, unless the caller renders the report itself at the end
    assert (tmp_path / "h" / "sqnr_by_modality.png").is_file()
    mmcompress.quantize(copy.deepcopy(model), calib, "rtn", "w4a8", progress=False, report_dir=tmp_path / "n",
                        report_plot=False)
    assert (tmp_path / "n" / "diagnostics-rtn-w4a8.json").is_file()
    assert not (tmp_path / "n" / "sqnr_by_modality.png").exists()

    with pytest.raises(CalibrationError, match="shares 1 of its 2 samples"):
        mmcompress.quantize(copy.deepcopy(model), calib, "rtn", "w4a8", progress=False, report_dir=tmp_path / "x",
                            report_calib=[held[0], calib[1]])


def test_side_sets_survive_resume(tokenizer, tmp_path):
    """Held-out and whitening chains are checkpointed with the layer: a resumed run gives the same
    report and the same weights as an uninterrupted one."""
    from mmcompress.engine import run_layerwise
    from mmcompress.quant.diagnostics import Diagnostics
    from mmcompress.quant.api import make_method
    from mmcompress.quant.quantizer import resolve_scheme

    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = [mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)]
    proc = mm_inputs("qwen2_5_omni", tok)[1]
    held = [mm_inputs("qwen2_5_omni", tok, seed=7)[0]]
    whiten = [_modality_only(proc, "image", 1), _modality_only(proc, "audio", 2)]

    def run(ckpt, stop_after=None):
        m = copy.deepcopy(model)
        meth = make_method("masquant", resolve_scheme("w4a8"), epochs=0)
        meth.set_whitening({"image": 1, "audio": 1})
        diag = Diagnostics(held)

        def stop(i, info):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt

        try:
            run_layerwise(m, get_adapter(m), meth, calib, checkpoint_dir=ckpt, progress=False, diagnostics=diag,
                          side_sets={"whitening": whiten}, on_layer_done=stop)
        except KeyboardInterrupt:
            return None, None
        return m, diag

    full, d_full = run(tmp_path / "a")
    assert run(tmp_path / "b", stop_after=0) == (None, None)
    m = copy.deepcopy(model)
    meth = make_method("masquant", resolve_scheme("w4a8"), epochs=0)
    meth.set_whitening({"image": 1, "audio": 1})
    diag = Diagnostics(held)
    run_layerwise(m, get_adapter(m), meth, calib, checkpoint_dir=tmp_path / "b", resume=True, progress=False,
                  diagnostics=diag, side_sets={"whitening": whiten})
    x = held[0]
    assert torch.equal(m(**x).logits, full(**x).logits)
    last = len(d_full.layers) - 1
    assert diag.layers[-1]["sqnr_accumulated"] == d_full.layers[last]["sqnr_accumulated"]


# -- item 10: one Top-K tie policy ---------------------------------------------------------------


def _brute_force(x, k):
    """The documented rule: rank by |x| (descending), ties by index (ascending); keep the first k."""
    rows = []
    for row in x.float().reshape(-1, x.shape[-1]).tolist():
        order = sorted(range(len(row)), key=lambda i: (-abs(row[i]), i))[:k]
        rows.append(sorted(order))
    return torch.tensor(rows).reshape(*x.shape[:-1], k)


def _tied_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (6, 40), generator=g).to(dtype)  # 7 values in 40 channels: ties everywhere
    x[0] = 1.0  # one magnitude only
    x[1, ::2], x[1, 1::2] = 0.0, -0.0  # signed zeros tie
    x[2] = torch.linspace(-1, 1, 40).to(dtype)  # mirrored magnitudes tie pairwise
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_tie_policy_exactly_k_lowest_index(dtype):
    x = _tied_inputs(dtype)
    for k in (1, 3, 10, 20, 39, 40):
        mask = topk_mask(x, k)
        assert (mask.sum(-1) == k).all()
        assert torch.equal(topk_indices(x, k), _brute_force(x, k))
        assert torch.equal(topk_sparsify(x, k), torch.where(mask, x, torch.zeros_like(x)))
    y = torch.tensor([[1.0, float("nan"), float("inf"), -5.0]], dtype=dtype)
    assert topk_indices(y, 2).tolist() == [[1, 2]]  # NaN ranks above +inf, as in the kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_and_reference_select_the_same_channels_under_ties(dtype):
    from mmcompress.sparse import kernels
    from mmcompress.sparse.kernels import cpu as cpu_backend

    if not cpu_backend.load():
        pytest.skip(f"CPU sparse kernel unavailable: {cpu_backend.error()}")
    x = _tied_inputs(dtype)
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    for k in (1, 3, 10, 20, 39):
        idx_cpu, vals_cpu = kernels.topk_select(x, k, backend="cpu")
        idx_ref, vals_ref = kernels.topk_select(x, k, backend="torch")
        assert torch.equal(idx_cpu, idx_ref) and torch.equal(vals_cpu, vals_ref)
        for b in range(0, 6, 3):  # the kernel takes 1..8 tokens per call
            xb = x[b:b + 3]
            y_cpu = kernels.sparse_linear(xb, w, k, backend="cpu")
            y_ref = kernels.sparse_linear(xb, w, k, backend="torch")
            assert float((y_cpu.float() - y_ref.float()).norm() / y_ref.float().norm()) < 1e-2


# -- the command line ----------------------------------------------------------------------------

from .test_cli_multimodal import omni_dir  # noqa: E402,F401  (fixture)


def test_cli_whitening_and_held_out_report(omni_dir, tmp_path, capsys):
    from mmcompress.cli import main

    lines = [{"text": "", "images": ["img.png"]}, {"text": "", "audio": ["a.wav"]}]
    (tmp_path / "whiten.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    held = [{"text": "what is on this picture", "images": ["img.png"]}, {"text": "a different text sample"}]
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps(x) for x in held))
    calib = str(tmp_path / "calib.jsonl")
    rc = main(["quantize", str(omni_dir), "--method", "masquant", "--scheme", "w4a8", "--calib", calib,
               "--whiten-calib", str(tmp_path / "whiten.jsonl"), "--report-calib", str(tmp_path / "held.jsonl"),
               "--report", str(tmp_path / "rep"), "--epochs", "0", "--output", str(tmp_path / "q"), "--json",
               "--no-progress"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["method_summary"]["whitening"]["tokens"]["image"] > 0
    report = json.loads((tmp_path / "rep" / "diagnostics-masquant-w4a8.json").read_text())
    assert report["sqnr_data"]["set"] == "held-out" and report["sqnr_data"]["nsamples"] == 2
    assert report["method"]["whitening"] == "separate"
    assert set(report["summary"]["mean_sqnr_accumulated"]) == {"text", "image"}  # the held-out set has no audio

    for args, msg in [(["--method", "masquant", "--report-calib", str(tmp_path / "held.jsonl")], "--report-calib needs --report"),
                      (["--method", "rtn", "--whiten-calib", str(tmp_path / "whiten.jsonl")], "--whiten-calib does not apply")]:
        rc = main(["quantize", str(omni_dir), "--calib", calib, "--output", str(tmp_path / "bad"), *args])
        assert rc == 1 and msg in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_reference_cache_shares_the_uncompressed_work_and_changes_nothing(tokenizer, tmp_path):
    """RTN, SmoothQuant and MASQuant on copies of one model with one ``ReferenceCache``: the same reports
    and weights, bit for bit, as three runs without it; the later runs take the captures and the held-out
    uncompressed chain from the cache; a changed input model takes nothing from it."""
    from mmcompress.engine import ReferenceCache

    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)])
    held = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s, text=" a held out prompt here")[0]
                           for s in (5, 6)], source="held")
    runs = (("rtn", {}), ("smoothquant", {"runtime_smoothing": True}), ("masquant", {"epochs": 1}))
    n_layers = len(get_adapter(model).layers)

    def run_all(tag, cache):
        out = {}
        for method, opts in runs:
            m = copy.deepcopy(model)
            before = 0 if cache is None else cache.hits
            mmcompress.quantize(m, calib, method, "w4a8", progress=False, report_dir=tmp_path / tag,
                                report_calib=held, reference_cache=cache, **opts)
            rep = json.loads((tmp_path / tag / f"diagnostics-{method}-w4a8.json").read_text())
            rep.pop("seconds", None)
            out[method] = (rep, m.state_dict(), None if cache is None else cache.hits - before)
        return out

    plain, cached = run_all("plain", None), run_all("cached", ReferenceCache())
    for method, _ in runs:
        assert cached[method][0] == plain[method][0], method
        a, b = plain[method][1], cached[method][1]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
    assert cached["rtn"][2] == 0
    # the two captures and the held-out chain of every layer from RTN's run; SmoothQuant computes the
    # calibration set's uncompressed chain (its statistics' inputs), which MASQuant then takes too
    assert cached["smoothquant"][2] == 2 + n_layers
    assert cached["masquant"][2] == 2 + 2 * n_layers

    cache = ReferenceCache()
    mmcompress.quantize(copy.deepcopy(model), calib, "rtn", "w4a8", progress=False, report_dir=tmp_path / "x",
                        report_calib=held, reference_cache=cache)
    other = copy.deepcopy(model)
    with torch.no_grad():
        get_adapter(other).layers[-1].mlp.down_proj.weight.mul_(1.5)
    mmcompress.quantize(other, calib, "rtn", "w4a8", progress=False, report_dir=tmp_path / "y",
                        report_calib=held, reference_cache=cache)
    assert cache.hits == 0


def _counted_walks(tokenizer, tmp_path, monkeypatch, method, opts, variant):
    """Quantize a tiny Omni model twice with ``method`` (held-out diagnostics on), once under ``variant(True)``
    and once under ``variant(False)`` (each a setting it applies with ``monkeypatch``); per walk the state
    dict, the diagnostics report and the number of ``LayerContext.run`` calls; and the product of the layer and
    calibration-sample counts."""
    from mmcompress.engine import LayerContext

    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(3)])
    held = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s, text=" a held out prompt here")[0]
                           for s in (5, 6)], source="held")
    runs = []
    real_run = LayerContext.run
    monkeypatch.setattr(LayerContext, "run", lambda self, j, x=None: (runs.append(1), real_run(self, j, x))[1])

    def walk(tag, on):
        variant(on)
        runs.clear()
        m = copy.deepcopy(model)
        mmcompress.quantize(m, calib, method, "w4a8", progress=False, report_dir=tmp_path / tag, report_calib=held,
                            **opts)
        rep = json.loads((tmp_path / tag / f"diagnostics-{method}-w4a8.json").read_text())
        rep.pop("seconds", None)
        return m.state_dict(), rep, len(runs)

    return walk("on", True), walk("off", False), len(get_adapter(model).layers) * len(calib)


def _same_walk(a, b):
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_data_free_rtn_runs_no_calibration_chain(tokenizer, tmp_path, monkeypatch):
    """RTN reads no activations: with the diagnostics on a held-out set the walk runs no layer on the
    calibration samples (``Method.data_free``), and the weights and the report are the ones of a walk that
    does, bit for bit."""
    from mmcompress.quant.methods.rtn import RTN

    free, chain, passes = _counted_walks(tokenizer, tmp_path, monkeypatch, "rtn", {},
                                         lambda on: monkeypatch.setattr(RTN, "data_free", on))
    _same_walk(free, chain)
    assert chain[2] - free[2] == passes


@pytest.mark.parametrize("method,opts", [("smoothquant", {"runtime_smoothing": True}), ("masquant", {"epochs": 1})])
def test_statistics_gathered_on_the_uncompressed_pass_save_a_pass_and_change_nothing(tokenizer, tmp_path, monkeypatch,
                                                                                     method, opts):
    """SmoothQuant's and MASQuant's statistics of the uncompressed chain come from the engine's pass that
    computes that chain's outputs (``Method.fp_observers``): one layer pass per sample fewer, and the weights and
    the report of a walk that gathers them in a pass of its own, bit for bit."""
    from mmcompress.quant.methods import QUANT_METHODS

    cls = QUANT_METHODS[method]
    real = cls.fp_observers
    on_fp, own, passes = _counted_walks(
        tokenizer, tmp_path, monkeypatch, method, opts,
        lambda on: monkeypatch.setattr(cls, "fp_observers", real if on else lambda self, ctx: []))
    _same_walk(on_fp, own)
    assert own[2] - on_fp[2] == passes
