"""The integer runtime (``mmcompress.quant.deployed`` / ``quant.kernels``) against the fake-quant reference.

Why the two agree to float round-off: both paths compute the *same* activation codes (one function,
``quantize_activation``, with the reference's arithmetic in the same dtype) and the same weight codes
(the stored ones).  The integer path sums code × code products exactly (int32 per group; the
zero point is removed with the exact activation group sums), so its only rounding is the float
epilogue ``sx · Σ_g Δ_g · int_g``; the reference rounds ``(q·sx) · ((c − z)·Δ)`` and a float sum of K
terms.  The measured bound (fp32): ≤ 1e-6 of the output's scale per layer, ≤ 2e-6 on logits after a
few layers; tests allow 1e-5.
"""

import copy

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.quant import kernels
from mmcompress.quant.deployed import IntLinear, IntMASLinear, deploy
from mmcompress.quant.linear import QuantLinear
from mmcompress.quant.methods.masquant import MASLinear
from mmcompress.quant.quantizer import QuantScheme

from .conftest import mm_inputs, text_samples, tiny_model

TOL = 1e-5  # relative to max |reference|


def _rel_max(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def _packed(out_f, in_f, scheme, seed=0, bias=True, smoothing_rows=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.05 + 0.01)  # offset: asym zero points != mid
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    q = QuantLinear.from_linear(lin, scheme, smoothing_rows=smoothing_rows)
    if smoothing_rows:
        q.input_smoothing.copy_(torch.rand(smoothing_rows, in_f, generator=g) + 0.5)
    return q.pack()


SCHEMES = [QuantScheme(w, a, gsz, sym) for (w, a) in [(8, 8), (4, 8), (4, 6), (4, 16), (8, 16)]
           for gsz in (0, 64, 32) for sym in (True, False)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("tokens", [1, 3, 8, 40])
def test_layer_equals_reference(scheme, tokens):
    q = _packed(72, 256, scheme)
    x = torch.randn(2, tokens, 256) * 3
    x[..., 5] *= 40  # an outlier channel, as in real activations
    ref = q(x)
    d = IntLinear(copy.deepcopy(q))
    y = d(x)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert _rel_max(y, ref) <= TOL


@pytest.mark.parametrize("scheme", [QuantScheme(8, 8, 0, True), QuantScheme(4, 8, 64, False), QuantScheme(4, 6, 0, True),
                                    QuantScheme(4, 16, 64, False)], ids=lambda s: s.name)
def test_torch_path_equals_reference(monkeypatch, scheme):
    """The device-independent path (CUDA's, and CPUs without the kernel) on the same layers."""
    monkeypatch.setattr(kernels, "path_for", lambda *a, **k: "torch")
    q = _packed(40, 192, scheme)
    x = torch.randn(5, 192)
    assert _rel_max(IntLinear(copy.deepcopy(q))(x), q(x)) <= TOL


def test_kernel_is_used_for_decode_when_available():
    s = QuantScheme(4, 8, 64, False)
    assert kernels.path_for(s, 4096, "cpu", rows=1) == ("cpu" if kernels._cpu.available() else "torch")
    assert kernels.path_for(s, 100, "cpu", rows=1) == "torch"  # K not a multiple of 64
    assert kernels.path_for(QuantScheme(3, 8), 4096, "cpu") == "torch"  # 3-bit codes: torch path


@pytest.mark.skipif(not kernels._cpu.available(), reason="needs the CPU kernel (AVX-512 VNNI, a C++ compiler)")
def test_prefill_routing():
    """Prefill (> PREFILL_ROWS tokens): int4 codes with int8 activations stay on our kernel (the torch
    path would unpack every code to int8 on each call); int8 per-channel codes and weight-only layers go
    to torch's GEMMs (docs/runtime.md)."""
    rows = kernels.PREFILL_ROWS + 1
    assert kernels.path_for(QuantScheme(4, 8, 0, True), 576, "cpu", rows=rows) == "cpu"
    assert kernels.path_for(QuantScheme(4, 6, 0, True), 576, "cpu", rows=rows) == "cpu"
    assert kernels.path_for(QuantScheme(8, 8, 0, True), 576, "cpu", rows=rows) == "torch"
    assert kernels.path_for(QuantScheme(4, 16, 128, False), 576, "cpu", rows=rows) == "torch"
    q = _packed(96, 192, QuantScheme(4, 8, 0, True))
    x = torch.randn(rows + 7, 192)
    assert _rel_max(IntLinear(copy.deepcopy(q))(x), q(x)) <= TOL


def test_integer_path_differs_from_a_wrong_weight():
    """The tolerance is tight enough to notice one flipped weight code."""
    q = _packed(16, 128, QuantScheme(8, 8))
    x = torch.randn(3, 128)
    d = IntLinear(copy.deepcopy(q))
    if d.weight_codes.dim() == 4:  # tiled (the CPU kernel's layout): row 3's byte 7 is in tile 0, line 0
        d.weight_codes[0, 0, 3, 7] += 1
    else:
        d.weight_codes[3, 7] += 1
    assert _rel_max(d(x), q(x)) > 10 * TOL


def test_no_float_weight_after_forward():
    """Structure check of the resident-memory claim: only codes, scales and zero points stay."""
    for scheme in (QuantScheme(8, 8), QuantScheme(4, 8, 64, False), QuantScheme(4, 16, 64, False)):
        q = _packed(96, 256, scheme)
        d = IntLinear(q)
        for rows in (1, 40):  # decode (kernel) and prefill (temporary float weight for weight-only)
            d(torch.randn(rows, 256))
        big = 96 * 256 // 4
        tensors = list(d.parameters()) + list(d.buffers()) + [v for v in vars(d).values() if torch.is_tensor(v)]
        floats = [t for t in tensors if t.is_floating_point() and t.numel() >= big]
        assert not floats, [tuple(t.shape) for t in floats]
        codes = d.weight_codes
        assert codes.dtype == (torch.uint8 if scheme.wbits == 4 else torch.int8)
        assert codes.numel() == 96 * 256 // (2 if scheme.wbits == 4 else 1)


@pytest.mark.parametrize("kind,method,scheme", [
    ("llama", "rtn", "w8a8"),
    ("llama", "rtn", "w4a16"),
    ("qwen2", "smoothquant", "w8a8"),
    ("gemma3", "rtn", "w4a8"),
    ("qwen2_5_vl", "smoothquant", "w4a6"),
    ("qwen2_5_omni", "rtn", "w4a8"),
])
def test_save_load_integer_forward(tmp_path, tokenizer, kind, method, scheme):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=(kind == "qwen2"))
    if kind.startswith("qwen2_5"):
        calib = CalibrationSet([mm_inputs(kind, tok, seed=s)[0] for s in range(2)])
        x = mm_inputs(kind, tok, seed=5)[0]
    else:
        calib = CalibrationSet(text_samples(tok, n=2))
        x = {"input_ids": torch.randint(0, len(tok) - 10, (1, 20))}
    mmcompress.quantize(model, calib, method, scheme, progress=False)
    out = mmcompress.save(model, tmp_path / "art")
    ref = mmcompress.load(out, runtime="reference")
    fast = mmcompress.load(out)
    assert not any(isinstance(m, QuantLinear) for m in fast.modules())
    assert any(isinstance(m, IntLinear) for m in fast.modules())
    with torch.no_grad():
        a, b = ref(**x, use_cache=True), fast(**x, use_cache=True)
        assert _rel_max(b.logits, a.logits) <= TOL
        # one decode step (1 token: the kernel path) from each model's own cache
        nxt = a.logits[:, -1:].argmax(-1)
        step = {"input_ids": nxt}
        if kind.startswith("qwen2_5"):
            n = x["input_ids"].shape[1]
            step.update(cache_position=torch.tensor([n]))
        a2 = ref(**step, past_key_values=a.past_key_values, use_cache=True).logits
        b2 = fast(**step, past_key_values=b.past_key_values, use_cache=True).logits
    assert _rel_max(b2, a2) <= TOL


def masquant_omni_artifact(tmp_path, tokenizer):
    """A tiny Omni model quantized by MASQuant W4A8 and saved; returns ``(artifact, tokenizer, inputs)``
    with image and audio tokens."""
    model, tok = tiny_model("qwen2_5_omni", tokenizer=tokenizer)
    calib = CalibrationSet([mm_inputs("qwen2_5_omni", tok, seed=s)[0] for s in range(2)])
    x = mm_inputs("qwen2_5_omni", tok, seed=9, text=" over the lazy dog")[0]
    mmcompress.quantize(model, calib, "masquant", "w4a8", progress=False, epochs=1)
    return mmcompress.save(model, tmp_path / "mas"), tok, x


def test_masquant_image_and_audio_tokens(tmp_path, tokenizer):
    out, tok, x = masquant_omni_artifact(tmp_path, tokenizer)
    ref, fast = mmcompress.load(out, runtime="reference"), mmcompress.load(out)
    mas = [m for m in fast.modules() if isinstance(m, IntMASLinear)]
    assert mas and all(m.cmc_left is not None for m in mas if m.spec()["rank"])
    assert not any(isinstance(m, MASLinear) for m in fast.modules())
    calls = []
    orig = IntMASLinear.correction
    IntMASLinear.correction = lambda self, xs, ids: calls.append(orig(self, xs, ids)) or calls[-1]
    try:
        with torch.no_grad():
            assert _rel_max(fast(**x).logits, ref(**x).logits) <= TOL
            assert any(c is not None for c in calls)  # image/audio tokens took the low-rank correction
            calls.clear()
            g = torch.Generator().manual_seed(0)
            ids = {"input_ids": torch.randint(0, len(tok) - 10, (1, 6), generator=g)}  # text only: nothing extra
            assert _rel_max(fast(**ids).logits, ref(**ids).logits) <= TOL
            assert calls and all(c is None for c in calls)
    finally:
        IntMASLinear.correction = orig


def test_no_kernel_falls_back_with_one_line_notice(capsys):
    q = _packed(32, 128, QuantScheme(8, 12))  # 12-bit activations: no int8 container
    model = torch.nn.Sequential(q, _packed(32, 32, QuantScheme(8, 8)))
    deploy(model)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "w8a12" in err[0] and "reference" in err[0]
    assert isinstance(model[0], QuantLinear) and isinstance(model[1], IntLinear)


def test_deployed_model_saves_the_same_artifact(tmp_path, tokenizer):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", "w4a8", progress=False)
    x = torch.randint(0, len(tok) - 10, (1, 12))
    first = mmcompress.save(model, tmp_path / "a")
    fast = mmcompress.load(first)
    again = mmcompress.load(mmcompress.save(fast, tmp_path / "b"), runtime="reference")
    assert torch.equal(again(input_ids=x).logits, mmcompress.load(first, runtime="reference")(input_ids=x).logits)


def test_cli_runtime_flag(tmp_path, tiny_llama_dir, calib_text, capsys):
    from mmcompress.cli import main
    from mmcompress.export import serialization

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--scheme", "w8a8", "--calib", str(calib_text), "--nsamples", "2",
                 "--seqlen", "32", "-o", str(out), "--no-progress"]) == 0
    try:
        ppl = {}
        for rt in ("reference", "int"):
            assert main(["eval", str(out), "--ppl", str(calib_text), "--seqlen", "32", "--max-windows", "2",
                         "--runtime", rt, "--json", "--no-progress"]) == 0
            assert serialization._DEFAULT_RUNTIME["runtime"] == rt
            import json

            res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            ppl[rt] = next(v for k, v in res.items() if "ppl" in k.lower() or "perplexity" in k.lower())
        assert ppl["int"] == pytest.approx(ppl["reference"], rel=1e-4)
    finally:
        serialization.set_default_runtime("int")


@pytest.mark.parametrize("scheme", ["w8a8", "w4a16"])
def test_integer_runtime_after_casting_the_model_to_bf16(tmp_path, scheme):
    """``model.to(torch.bfloat16)`` casts step sizes and zero points too; the kernels take them as float32."""
    import copy

    import mmcompress
    from mmcompress.data import CalibrationSet
    from .tiny_models import tiny_model

    model, tok = tiny_model("llama", seed=11)
    calib = CalibrationSet([{"input_ids": torch.randint(0, len(tok) - 10, (1, 32), generator=torch.Generator().manual_seed(s))}
                            for s in range(2)])
    mmcompress.quantize(model, calib, "rtn", scheme, progress=False)
    art = mmcompress.save(copy.deepcopy(model), tmp_path / "a")
    ref = mmcompress.load(art, runtime="reference").to(torch.bfloat16)
    dep = mmcompress.load(art).to(torch.bfloat16)
    x = torch.randint(0, len(tok) - 10, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = ref(input_ids=x).logits.float(), dep(input_ids=x).logits.float()
    assert torch.isfinite(b).all() and float((a - b).norm() / a.norm()) < 0.05


@pytest.mark.parametrize("scheme", [QuantScheme(4, 8, 128, False), QuantScheme(4, 16, 128, False),
                                    QuantScheme(8, 8, 128, True), QuantScheme(4, 6, 128, True)], ids=lambda s: s.name)
@pytest.mark.parametrize("tokens", [1, 5])
def test_group_that_does_not_divide_k(scheme, tokens):
    """K = 320 with groups of 128 (SmolLM2's 576 is the real case): the last group has 64 codes and the
    kernel takes it (before, such layers fell back to a temporary float weight per call)."""
    q = _packed(48, 320, scheme)
    assert q.weight_scale.shape[-1] == 3
    if kernels._cpu.available():
        assert kernels.path_for(scheme, 320, "cpu", rows=tokens) == "cpu"
    x = torch.randn(tokens, 320) * 2
    assert _rel_max(IntLinear(copy.deepcopy(q))(x), q(x)) <= TOL


@pytest.mark.skipif(not kernels._cpu.bf16_available(), reason="needs the CPU kernel built with AVX512_BF16")
@pytest.mark.parametrize("group,sym", [(128, False), (0, True), (256, False)])
def test_bf16_activation_int4_kernel_is_exact_to_fp32_sums(group, sym):
    """A bf16 model's W4A16 decode: bf16 activations times codes made bf16 in registers.  Each product is
    exact in fp32, so against a float64 computation on the same bf16 inputs the error is fp32 summation
    round-off (measured ≤ 6e-6 of the output's scale; the 128-offset trick costs ~5 of fp32's 24 bits)."""
    scheme = QuantScheme(4, 16, group, sym)
    q = _packed(80, 512, scheme, bias=False)
    x = (torch.randn(3, 512) * 2).bfloat16()
    y = kernels.int_matmul(x, q.weight_codes, q.weight_scale, q.weight_zero, scheme, 512)
    w = q.dequantized_weight() if hasattr(q, "dequantized_weight") else None
    if w is None:
        from mmcompress.quant.quantizer import dequantize_weight, unpack_int4
        w = dequantize_weight(unpack_int4(q.weight_codes, 512), q.weight_scale, q.weight_zero, 4, group, sym)
    exact = x.double() @ w.double().t()
    assert _rel_max(y, exact) <= TOL
    ref = q(x.float())  # the fp32 reference forward on the same inputs
    assert _rel_max(y, ref) <= TOL


@pytest.mark.skipif(not kernels._cpu.available(), reason="needs the CPU integer kernel")
@pytest.mark.parametrize("K,group,sym", [(384, 0, True), (384, 128, False), (320, 64, False), (384, 64, True)])
def test_int4_kernel_row_walk_is_exact(K, group, sym):
    """int8_act_gemm with int4 weights: at one token the rows are walked as ``paired_rows`` does (8-row
    tiles of every other row, then 4-row pairs, 4-row tiles and single rows: N = 95 reaches every stage),
    and with K and the group multiples of 128 the codes go 128 per step, the odd codes' sums (x 16) in
    their own accumulator.  Every sum is an exact integer, so one token at a time must equal, bit for bit,
    the three tokens at once (4-row tiles of 3 tokens), and the per-channel symmetric result must equal
    the float64 formula s * (sum_k xq * q) * sx rounded to float32."""
    from mmcompress.quant.quantizer import unpack_int4

    scheme = QuantScheme(4, 8, group, sym)
    q = _packed(95, K, scheme, bias=False)
    codes, scale, zero = q.weight_codes, q.weight_scale.float().contiguous(), q.weight_zero.float().contiguous()
    g = torch.Generator().manual_seed(1)
    xq = torch.randint(-127, 128, (3, K), generator=g, dtype=torch.int8)
    sx = torch.rand(3, generator=g) + 0.01
    op = torch.ops.mmcompress_int.int8_act_gemm
    y3 = op(xq, sx, codes, scale, zero, 4, group, sym)
    y1 = torch.cat([op(xq[b:b + 1].contiguous(), sx[b:b + 1].contiguous(), codes, scale, zero, 4, group, sym)
                    for b in range(3)])
    assert torch.equal(y1, y3)
    if group == 0 and sym:
        d = xq.long() @ unpack_int4(codes, K).long().t()  # exact integer sums [3, 95]
        exact = (scale.reshape(1, -1).double() * d.double() * sx.reshape(-1, 1).double()).float()
        assert torch.equal(y1, exact)


@pytest.mark.skipif(not kernels._cpu.bf16_available(), reason="needs the CPU kernel built with AVX512_BF16")
@pytest.mark.parametrize("group,sym", [(128, False), (0, True)])
def test_bf16_activation_int4_kernel_one_token_row_walk(group, sym):
    """bf16_act_gemm at one token (``paired_rows``' 8-row tiles of every other row down to single rows;
    N = 95) against float64 on the same inputs, and each token equal to its row of a 3-token call to
    fp32 round-off (bit for bit: the next test)."""
    from mmcompress.quant.quantizer import dequantize_weight, unpack_int4

    scheme = QuantScheme(4, 16, group, sym)
    q = _packed(95, 512, scheme, bias=False)
    x = (torch.randn(3, 512) * 2).bfloat16()
    y1 = torch.cat([kernels.int_matmul(x[b:b + 1], q.weight_codes, q.weight_scale, q.weight_zero, scheme, 512)
                    for b in range(3)])
    y3 = kernels.int_matmul(x, q.weight_codes, q.weight_scale, q.weight_zero, scheme, 512)
    w = dequantize_weight(unpack_int4(q.weight_codes, 512), q.weight_scale, q.weight_zero, 4, group, sym)
    exact = x.double() @ w.double().t()
    assert _rel_max(y1, exact) <= TOL
    assert _rel_max(y1, y3) <= TOL


# -- tiled codes (CPU kernel): the same bytes in the order the kernels stream them ----------------------

def _int_linear(q, layout, monkeypatch):
    monkeypatch.setenv("MMCOMPRESS_CODE_LAYOUT", layout)
    return IntLinear(copy.deepcopy(q))


@pytest.mark.skipif(not kernels._cpu.bf16_available(), reason="needs the CPU kernel built with AVX512_BF16")
@pytest.mark.parametrize("layout", ["rows", "tiles"])
@pytest.mark.parametrize("group,sym", [(128, False), (128, True), (256, False), (0, True)])
def test_bf16_int4_one_token_equals_its_row_of_a_batch_bit_for_bit(group, sym, layout, monkeypatch):
    """One token of groups of 128 takes its own walk in ``bf16_tile`` (each row's group sum into its float
    accumulator at once; tiled codes prefetched ahead): the same sums in the same order as the tiles of several
    tokens, so each token's outputs are bit-identical to its row of a 4-token call, in both code layouts (other
    groups: the same walk for any number of tokens)."""
    scheme = QuantScheme(4, 16, group, sym)
    lin = _int_linear(_packed(96, 1024, scheme, bias=False), layout, monkeypatch)
    assert lin.weight_codes.dim() == (4 if layout == "tiles" else 2)
    x = (torch.randn(4, 1024) * 2).bfloat16()
    args = (lin.weight_codes, lin.weight_scale, lin.weight_zero, scheme, 1024)
    y4 = kernels.int_matmul(x, *args)
    for b in range(4):
        assert torch.equal(kernels.int_matmul(x[b:b + 1], *args), y4[b:b + 1])


TILED_SCHEMES = [QuantScheme(4, 16, 128, False), QuantScheme(4, 16, 0, True), QuantScheme(4, 16, 64, False),
                 QuantScheme(8, 8), QuantScheme(8, 8, 64, False),
                 QuantScheme(4, 8), QuantScheme(4, 8, 128, False), QuantScheme(4, 6, 64, True),
                 QuantScheme(8, 16, 128, False)]


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
@pytest.mark.parametrize("scheme", TILED_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_codes_give_the_row_major_results_bit_for_bit(scheme, dtype, monkeypatch):
    """Tiling reorders the bytes, not the arithmetic: every output identical to the row-major codes' at
    one token (8-row tiles), a few (4-row tiles) and prefill (the torch path un-tiles a temporary)."""
    q = _packed(48, 384, scheme).to(dtype)
    rows, tiles = _int_linear(q, "rows", monkeypatch), _int_linear(q, "tiles", monkeypatch)
    width = 384 if scheme.wbits == 8 else 192
    assert rows.weight_codes.shape == (48, width)
    assert tiles.weight_codes.shape == (6, width // 64, 8, 64)
    assert torch.equal(kernels.untile_codes(tiles.weight_codes), rows.weight_codes)
    for tokens in (1, 3, 16, 40):
        x = (torch.randn(tokens, 384) * 3).to(dtype)
        y_rows, y_tiles = rows(x), tiles(x)
        assert torch.equal(y_tiles, y_rows), tokens
        assert _rel_max(y_tiles, q(x)) <= (TOL if dtype == torch.float32 else 2e-2)


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
@pytest.mark.parametrize("scheme,line,row", [(QuantScheme(4, 16, 128, False), 1, 5), (QuantScheme(8, 8), 3, 2),
                                             (QuantScheme(4, 8), 0, 7)], ids=lambda v: getattr(v, "name", str(v)))
def test_tiled_codes_are_read_in_tile_order(scheme, line, row, monkeypatch):
    """A changed byte of tiled codes changes the output of the row it belongs to, and only that row."""
    q = _packed(16, 256, scheme, bias=False)
    d = _int_linear(q, "tiles", monkeypatch)
    x = torch.randn(1, 256)
    y0 = d(x)
    d.weight_codes[1, line, row, 7] ^= 0x11  # tile 1 (rows 8..15), its 64-byte line `line`, row 8 + row
    diff = (d(x) - y0).abs()[0]
    assert diff[8 + row] > 0 and torch.count_nonzero(diff) == 1


@pytest.mark.parametrize("out_f,in_f,scheme", [(60, 256, QuantScheme(4, 16, 128, False)),  # N % 8 != 0
                                               (48, 192, QuantScheme(4, 16, 64, False)),   # int4 rows of 96 bytes
                                               (48, 200, QuantScheme(8, 8)),                # no kernel (K % 64)
                                               (48, 256, QuantScheme(3, 16, 128, True))])   # no kernel (3 bits)
def test_codes_stay_row_major_where_tiles_do_not_apply(out_f, in_f, scheme, monkeypatch):
    d = _int_linear(_packed(out_f, in_f, scheme), "tiles", monkeypatch)
    assert d.weight_codes.dim() == 2


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
@pytest.mark.parametrize("scheme,K,tiled", [(QuantScheme(4, 16, 128, False), 4096, True), (QuantScheme(4, 8), 4096, True),
                                            (QuantScheme(8, 8), 4096, False), (QuantScheme(8, 16, 128, False), 4096, False),
                                            (QuantScheme(8, 8), 1536, True), (QuantScheme(8, 8), 256, True)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_default_layout_keeps_only_long_int8_rows_row_major(scheme, K, tiled, monkeypatch):
    """``auto`` (the default): int4 codes tiled; int8 codes row-major from ``INT8_ROWS_FROM`` (4096) bytes per
    row, tiled below (the faster layout of each at decode)."""
    monkeypatch.delenv("MMCOMPRESS_CODE_LAYOUT", raising=False)
    assert IntLinear(_packed(16, K, scheme)).weight_codes.dim() == (4 if tiled else 2)
    assert _int_linear(_packed(16, K, scheme), "auto", monkeypatch).weight_codes.dim() == (4 if tiled else 2)


def test_code_layout_setting_is_checked(monkeypatch):
    q = _packed(48, 256, QuantScheme(4, 16, 128, False))
    assert _int_linear(q, "rows", monkeypatch).weight_codes.dim() == 2
    with pytest.raises(ValueError, match="MMCOMPRESS_CODE_LAYOUT must be 'auto', 'tiles' or 'rows', got 'tiled'"):
        _int_linear(q, "tiled", monkeypatch)


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, 128, False), QuantScheme(8, 8)], ids=lambda s: s.name)
def test_tiled_codes_save_row_major_and_load_back(scheme, monkeypatch):
    q = _packed(48, 384, scheme)
    d = _int_linear(q, "tiles", monkeypatch)
    sd = d.state_dict()
    assert torch.equal(sd["weight_codes"], q.weight_codes)  # the artifact's layout
    assert d.weight_codes.dim() == 4  # the module keeps its tiles
    fresh = _int_linear(_packed(48, 384, scheme, seed=1), "tiles", monkeypatch)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight_codes, d.weight_codes)
    x = torch.randn(2, 384)
    assert torch.equal(fresh(x), d(x))


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
def test_tiled_codes_of_the_wrong_shape_are_refused():
    q = _packed(48, 256, QuantScheme(4, 16, 128, False))
    t = kernels.tile_codes(q.weight_codes)
    s, z = q.weight_scale.float().contiguous(), q.weight_zero.float().contiguous()
    with pytest.raises(RuntimeError, match=r"tiled codes: \[N/8, C/64, 8, 64\]"):
        torch.ops.mmcompress_int.float_act_gemm(torch.zeros(1, 256), t.reshape(6, 1, 16, 64), s, z, 4, 128, False)
    with pytest.raises(RuntimeError, match=r"tiled codes: \[N/8, C/64, 8, 64\]"):  # int4 bytes read as int8
        torch.ops.mmcompress_int.float_act_gemm(torch.zeros(1, 256), t, s, z, 8, 128, False)


@pytest.mark.skipif(not kernels._cpu.available(), reason="no CPU integer kernel here")
def test_load_gives_back_the_codes_the_tiles_replaced(tmp_path, tokenizer, monkeypatch):
    """``load`` trims the heap once the row-major codes that the deployed layers re-laid (and the artifact's
    own tensors) are freed: trimming while anything still holds them leaves them resident (session 40's
    W8A8 smollm2 figure: 0.98x of bf16 instead of 0.50x).  Tied embeddings: ``load`` looks up the tied
    (missing) tensors in a state dict of the packed model, which must not outlive the check."""
    import weakref

    from mmcompress.export import serialization

    model, tok = tiny_model("llama", tokenizer=tokenizer, tie=True)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", "w8a8", progress=False)
    art = mmcompress.save(model, tmp_path / "art")
    monkeypatch.setenv("MMCOMPRESS_CODE_LAYOUT", "tiles")  # every code matrix re-laid (the default, too, at this K)
    replaced, deployed, alive_at_trim = [], [], []  # weak references to the packed codes' storages
    real_deploy, real_trim = serialization.deploy, serialization.trim_heap

    def watched_deploy(m, runtime):
        replaced.extend(weakref.ref(q.weight_codes.untyped_storage()) for q in m.modules() if isinstance(q, QuantLinear))
        deployed.append(real_deploy(m, runtime))
        return deployed[-1]

    def watched_trim():  # storages of the old codes still alive that no deployed layer holds (tiles as a view)
        kept = {m.weight_codes.untyped_storage().data_ptr() for m in deployed[0].modules() if isinstance(m, IntLinear)}
        alive_at_trim.append(sum(r() is not None and r().data_ptr() not in kept for r in replaced))
        real_trim()

    monkeypatch.setattr(serialization, "deploy", watched_deploy)
    monkeypatch.setattr(serialization, "trim_heap", watched_trim)
    fast = mmcompress.load(art)
    relaid = [m for m in fast.modules() if isinstance(m, IntLinear) and m.weight_codes.dim() == 4
              and m.weight_codes._base is None]  # tiles in new memory (not a view of the row-major codes)
    assert relaid and len(replaced) == sum(isinstance(m, IntLinear) for m in fast.modules())
    assert alive_at_trim == [0]
