"""The fused decode step (``mmcompress.runtime.fused``): one C++ call per token, the same logits as the
engine's Python step.

Tiny random Llama and Qwen2 models (Qwen2: q/k/v bias, tied head), dense and every integer scheme,
fp32 and bf16, offline.  Speed is measured by ``mmcompress bench decode``, never here.
"""

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet
from mmcompress.runtime import fused
from mmcompress.runtime.decode import DecodeEngine
from mmcompress.runtime.fused_check import compare, explained

from .conftest import text_samples, tiny_model

pytestmark = pytest.mark.skipif(not fused.load(), reason="no fused CPU kernel here")


def _engines(tmp_path, tokenizer, kind, scheme, dtype, **kw):
    model, tok = tiny_model(kind, tokenizer=tokenizer, tie=(kind == "qwen2"), dtype=dtype, hidden=128,
                            intermediate=256, **kw)
    if scheme:
        mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", scheme, progress=False)
    model = mmcompress.load(mmcompress.save(model, tmp_path / f"{kind}-{scheme}"))
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40)
    assert fu.fused and not py.fused
    return model, tok, py, fu


# fp32: the same arithmetic up to summation order; bf16: both round every op to bf16 (8 bits), and a
# rounding that falls the other way in one residual add moves the logits by a bf16 ulp of the stream
TOL = {torch.float32: 2e-5, torch.bfloat16: 5e-2}


def _steps_agree(py, fu, ids, steps, tol):
    """The same prefill fills both engines' caches, then ``steps`` decode steps teacher-forced with the Python
    step's greedy tokens: the fused step's logits within ``tol`` (relative to the largest) of the Python step's."""
    with torch.no_grad():
        for e in (py, fu):
            e._reset()
            e._forward(ids, 0)
        t = torch.tensor([[5]])
        for i in range(steps):
            lp, lf = py._step(t, ids.shape[1] + i), fu._step(t, ids.shape[1] + i)
            assert lf.dtype == lp.dtype and lf.shape == lp.shape
            err = (lp.float() - lf.float()).abs().max() / lp.float().abs().max()
            assert err < tol, (i, err.item())
            t = lp.argmax(-1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", [None, "w8a8", "w4a8", "w4a16"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_step_logits_equal_python_step(tmp_path, tokenizer, kind, scheme, dtype):
    model, tok, py, fu = _engines(tmp_path, tokenizer, kind, scheme, dtype)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    _steps_agree(py, fu, ids, 24, TOL[dtype])
    if dtype == torch.float32:  # and the whole generation gives the same tokens
        assert torch.equal(fu.generate(ids, 16), py.generate(ids, 16))


def test_bf16_int4_weight_only_uses_the_bf16_kernel(tmp_path, tokenizer):
    """A bf16 W4A16 model takes the bf16-activation int4 kernel inside the fused step (kind 3), as the
    deployed linears do (its logits: test_fused_step_logits_equal_python_step)."""
    from mmcompress.quant.kernels import cpu

    if not cpu.bf16_available():
        pytest.skip("no AVX512_BF16")
    from mmcompress.runtime.fused import _lin_args

    model, tok, py, fu = _engines(tmp_path, tokenizer, "llama", "w4a16", torch.bfloat16)
    for mod in (fu.layers[0].q, fu.layers[0].mlp.gate_proj, fu.layers[0].down):
        assert _lin_args(mod, torch.bfloat16, None)[1][0] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["w4a16", "w8a8", "w4a8"])
def test_tiled_codes_give_the_row_major_logits(tmp_path, tokenizer, monkeypatch, scheme, dtype):
    """Codes tiled in memory (``MMCOMPRESS_CODE_LAYOUT=tiles``; the default for int4 codes) and row-major: the
    fused step's logits are identical (kinds 1, 2, 3), and the tiled model saves the artifact's bytes."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, dtype=dtype, hidden=128, intermediate=256)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", scheme, progress=False)
    art = mmcompress.save(model, tmp_path / "art")
    logits = {}
    for layout in ("rows", "tiles"):
        monkeypatch.setenv("MMCOMPRESS_CODE_LAYOUT", layout)
        m = mmcompress.load(art)
        dims = {mod.weight_codes.dim() for mod in m.modules() if hasattr(mod, "weight_codes")}
        assert dims == ({2} if layout == "rows" else {4})
        fu = DecodeEngine(m, max_len=24)
        assert fu.fused
        ids = torch.randint(0, len(tok) - 10, (1, 7), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            fu._reset()
            fu._forward(ids, 0)
            logits[layout] = torch.cat([fu._step(torch.tensor([[5 + i]]), 7 + i) for i in range(8)])
        if layout == "tiles":
            saved = mmcompress.save(m, tmp_path / "again")
            for f in ("model.safetensors",):
                assert (saved / f).read_bytes() == (art / f).read_bytes()
    assert torch.equal(logits["tiles"], logits["rows"])


def test_unsupported_layers_fall_back_with_a_notice_only_when_asked(tmp_path, tokenizer, capsys):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    model.model.layers[1].mlp.down_proj = torch.nn.Sequential(model.model.layers[1].mlp.down_proj)
    e = DecodeEngine(model, max_len=16)
    assert e.path == "fast" and not e.fused
    assert capsys.readouterr().err == ""
    e = DecodeEngine(model, max_len=16, fused=True)
    assert not e.fused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fused decode step unavailable" in err[0] and "Sequential" in err[0]
    ids = torch.randint(0, len(tok) - 10, (1, 5), generator=torch.Generator().manual_seed(2))
    assert e.generate(ids, 4).shape == (1, 9)


def test_generation_reuses_the_plan_across_calls(tmp_path, tokenizer):
    model, tok, py, fu = _engines(tmp_path, tokenizer, "llama", "w8a8", torch.float32)
    a = torch.randint(0, len(tok) - 10, (1, 7), generator=torch.Generator().manual_seed(3))
    b = torch.randint(0, len(tok) - 10, (1, 11), generator=torch.Generator().manual_seed(4))
    first = fu.generate(a, 12)
    plan = fu._fused.plan
    fu.generate(b, 20)
    assert fu._fused.plan == plan and torch.equal(fu.generate(a, 12), first)
    assert torch.equal(first, py.generate(a, 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["bf16", "int8"])
def test_packed_head_logits_within_its_rounding_bound(tmp_path, tokenizer, head, dtype):
    """head="bf16" / "int8": the fused step's own packed copy of the (tied) LM head.  Per logit the change
    against the model's head is at most the head's rounding — bf16: |dw| <= 2^-9 |w|, so
    |dy| <= 2^-9 sum |w x| (bound used: 2^-8, for the fp32 sums); int8 per row: |dw| <= s/2 with
    s = max|w| / 127, so |dy| <= s/2 sum |x| — plus the fused step's own round-off (TOL)."""
    model, tok, py, _ = _engines(tmp_path, tokenizer, "qwen2", "w8a8", dtype)
    fu = DecodeEngine(model, max_len=40, head=head)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(5))
    xs = []
    hook = py.head.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().float().reshape(-1)))
    W = py.head.weight.detach().float()
    worst = 0.0
    try:
        with torch.no_grad():
            for e in (py, fu):
                e._reset()
                e._forward(ids, 0)
            t = torch.tensor([[5]])
            for i in range(16):
                lp, lf = py._step(t, 9 + i), fu._step(t, 9 + i)
                x = xs[-1]
                bound = (2.0 ** -8 * (W.abs() @ x.abs()) if head == "bf16"
                         else W.abs().amax(1) / 254 * x.abs().sum())
                tol = TOL[dtype] * lp.float().abs().max()
                err = (lp.float() - lf.float()).abs()[0]
                assert (err <= bound + tol).all(), (i, (err - bound).max().item())
                worst = max(worst, (err / (bound + tol)).max().item())
                t = lp.argmax(-1, keepdim=True)
    finally:
        hook.remove()
    assert fu._fused.head == ("model" if (head, dtype) == ("bf16", torch.bfloat16) else head)
    assert worst > 0 or fu._fused.head == "model"  # the packed head does change the logits (not a no-op)
    per_weight = {"bf16": 2, "int8": 1}[head]  # bytes the step reads per head weight (+ int8: a scale per row)
    assert W.numel() * per_weight <= fu._fused.head_bytes <= W.numel() * per_weight + 8 * W.shape[0]


def test_int8_rows_round_to_nearest_per_row():
    from mmcompress.runtime.fused import int8_rows

    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 3, 37)[:, None]
    w[5] = 0
    q, s = int8_rows(w)
    assert q.dtype == torch.int8 and s.shape == (37, 1) and q.abs().max() == 127
    assert ((q.float() * s - w).abs() <= s / 2 + 1e-7).all() and (q[5] == 0).all()


def test_packed_head_without_the_fused_step_says_so(tmp_path, tokenizer, capsys):
    model, tok = tiny_model("llama", tokenizer=tokenizer)
    e = DecodeEngine(model, max_len=16, fused=False, head="int8")
    assert not e.fused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the fused decode step" in err[0]
    with pytest.raises(ValueError, match="unknown head"):
        DecodeEngine(model, max_len=16, head="fp8")


# -- LaRoSA (residual adapters, Top-K SparseLinear) and LaRoSA + W8A8 (SparseInt8Linear) ---------------

SPARSE_KINDS = {
    "larosa": [{"kind": "sparsify", "method": "larosa", "sparsity": 0.4}],
    "joint": [{"kind": "sparsify", "method": "larosa", "sparsity": 0.4},
              {"kind": "quantize", "method": "rtn", "scheme": "w8a8"}],
    "joint-w8a16-adapters": [{"kind": "sparsify", "method": "larosa", "sparsity": 0.4},
                             {"kind": "quantize", "method": "rtn", "scheme": "w8a8", "adapters": "w8a16"}],
}


# TEAL: threshold SparseLinear on every projection; uniform: q/k/v (gate/up) share one threshold, greedy: each
# projection its own (the tiny models' greedy plan gives q, k and v three different ones, v's 0: keeps all)
TEAL_KINDS = {
    "teal": [{"kind": "sparsify", "method": "teal", "sparsity": 0.4}],
    "teal-greedy": [{"kind": "sparsify", "method": "teal", "sparsity": 0.4, "plan": "greedy"}],
}


def _sparse_model(tmp_path, tokenizer, arch, kind, dtype, hidden=128, intermediate=256):
    from mmcompress.runtime.generate import prepare

    model, tok = tiny_model(arch, tokenizer=tokenizer, tie=(arch == "qwen2"), dtype=dtype, hidden=hidden,
                            intermediate=intermediate)
    recipe = {**SPARSE_KINDS, **TEAL_KINDS}[kind]
    mmcompress.apply_recipe(model, CalibrationSet(text_samples(tok, n=2)), recipe, progress=False)
    model = prepare(mmcompress.load(mmcompress.save(model, tmp_path / f"{arch}-{kind}")), quiet=True)
    return model, tok


def _stepwise_errors(py, fu, ids, steps):
    """Relative logit differences of the fused and the Python step (runtime/fused_check.py: every step from
    the same caches, teacher-forced with the Python step's tokens)."""
    return [r["logits"] for r in compare(py, fu, ids, steps)]


# a step's module inputs may differ by round-off: fp32 a few ulps; bf16 up to two ulps of the largest value
# (2^-7 each relative to it; SiLU(gate) * up is rounded twice)
DIFF = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(SPARSE_KINDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_step_runs_larosa_and_joint_models(tmp_path, tokenizer, arch, kind, dtype):
    """The fused step takes LaRoSA's residual adapters, its Top-K SparseLinear projections and the joint
    artifact's SparseInt8Linear (also with 8-bit adapters) and gives the Python step's logits to round-off."""
    from mmcompress.quant.deployed import IntLinear
    from mmcompress.sparse.joint import SparseInt8Linear
    from mmcompress.sparse.linear import SparseLinear

    model, tok = _sparse_model(tmp_path, tokenizer, arch, kind, dtype)
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40, fused=True)
    assert fu.fused, fused.fused_problem(fu)
    l0 = fu.layers[0]
    proj = SparseLinear if kind == "larosa" else SparseInt8Linear
    assert all(isinstance(m, proj) for m in (l0.q, l0.k, l0.v, l0.o, l0.mlp.gate_proj, l0.mlp.up_proj, l0.down))
    assert l0.adapter is not None and (type(l0.adapter) is IntLinear) == (kind == "joint-w8a16-adapters")
    _assert_steps_match(py, fu, tok, dtype)


def _assert_steps_match(py, fu, tok, dtype, traced=None):
    """16 greedy steps of the Python and the fused step compared (``runtime/fused_check.py``); ``traced``:
    a check run on one traced fused step before the whole-generation comparison."""
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    rows = compare(py, fu, ids, 16)
    # a step in which no selected set and no activation code differs gives the same logits to round-off;
    # a step in which one does (bf16: an input one ulp apart moves a code across its rounding boundary)
    # must part there only because of round-off-sized input differences (runtime/fused_check.py)
    clean = [r["logits"] for r in rows if r["first"] is None]
    assert len(clean) >= len(rows) // 2 and max(clean) < TOL[dtype], rows
    assert all(explained(r["first"], DIFF[dtype]) for r in rows if r["first"] is not None), rows
    # and, discontinuities or not, each module on the fused step's own inputs gives its outputs
    assert all(max(r["modules"].values()) <= DIFF[dtype] for r in rows), rows
    if traced is not None:
        fu._fused.set_trace(True)
        fu._step(torch.tensor([[7]]), 30)
        traced()
        fu._fused.set_trace(False)
    if dtype == torch.float32:  # and a whole generation gives the same tokens
        assert torch.equal(fu.generate(ids, 16), py.generate(ids, 16))


@pytest.mark.parametrize("kind", ["larosa", "joint"])
def test_fused_sparse_units_of_any_width_give_the_same_logits(tmp_path, tokenizer, kind):
    """The sparse kinds' column work units (output columns of WT per unit: 64 up to the 4096 maximum; the
    default widens with the output width, ``sparse_cols``; the split forced to columns) split the columns only: every output's sum over the kept
    rows runs in the same order (int8: exact int32 sums), so the logits are bit-identical."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", kind, torch.float32)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(2))
    logits = {}
    for cols in (0, 64, 128, 4096):
        fu = _prefilled(model, ids)  # the prefill (Python), then fused single-token steps
        torch.ops.mmcompress_fused.fused_set_unit_cols(fu._fused.plan, cols)
        assert fu._fused.set_split(1) == 0  # the column units (not split-K)
        logits[cols] = torch.stack([fu._fused.step(int(t), 9 + n) for n, t in enumerate([5, 17, 3, 8])])
    assert all(torch.equal(logits[0], v) for v in logits.values())
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.mmcompress_fused.fused_set_unit_cols(fu._fused.plan, 8192)


def _split_rows(m) -> int:
    """Kept rows a fused-step projection splits by (split-K): a sparse projection's Top-K (SparseInt8Linear:
    padded to groups of four), a residual adapter in the kernels' layout all of its rows; 0: not a sparse kind."""
    from torch import nn

    from mmcompress.sparse.joint import SparseInt8Linear
    from mmcompress.sparse.linear import SparseLinear

    if isinstance(m, SparseInt8Linear):
        return (fused._sparse_keep(m) + 3) // 4 * 4
    if isinstance(m, SparseLinear):
        return fused._sparse_keep(m)
    if type(m) is nn.Linear and not m.weight.is_contiguous():
        return m.in_features
    return 0


def _prefilled(model, ids):
    """A fused-step engine after the Python prefill of ``ids``, its :class:`FusedStep` built (not yet stepped)."""
    fu = DecodeEngine(model, max_len=40, fused=True)
    fu._reset()
    fu._forward(ids, 0)
    fu._fused = fused.FusedStep(fu, head=fu.head_mode)
    return fu


def _fused_steps(model, ids, split, parts=1):
    """Logits of four fused single-token steps after the Python prefill, the sparse work split forced
    (``FusedStep.set_split``); and how many projections took split-K."""
    fu = _prefilled(model, ids)
    n = fu._fused.set_split(split, parts)
    return torch.stack([fu._fused.step(int(t), ids.shape[1] + i).float() for i, t in enumerate([5, 17, 3, 8])]), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["larosa", "joint"])
def test_fused_split_k_gives_the_python_steps_logits(tmp_path, tokenizer, kind, dtype, monkeypatch):
    """Split-K in the fused step's sparse phases (row parts with partial sums, then a reduction over column
    units that applies the epilogue): on odd widths (hidden 168: q 168, k/v 84 outputs; intermediate 333:
    64-column tails of 40, 20, 13; Top-K of 101 and 200 rows), 1 and 2 threads, one and two parts per thread,
    the logits are the Python step's to round-off (as the column split's), and the column split's to a bound
    measured at <= 3.1e-7 (fp32, relative to the largest logit; bf16: equal); one part is the column split's
    order exactly."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", kind, dtype, hidden=168, intermediate=333)
    n_proj = sum(7 + (_split_rows(l.adapter) > 0) for l in DecodeEngine(model, max_len=40).layers)  # + adapters
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            cols, n_cols = _fused_steps(model, ids, 1)
            assert n_cols == 0
            for parts in (1, 2):
                split, n_split = _fused_steps(model, ids, 2, parts)
                assert n_split == n_proj
                err = ((split - cols).abs().max() / cols.abs().max()).item()
                if nt * parts == 1:  # one part: every sum in the column split's order
                    assert torch.equal(split, cols)
                elif dtype == torch.float32:
                    assert 0 < err < 1e-6, err  # another order (not bit-equal: the split-K path ran)
            # the rule: at these widths every projection's part gets >= 16 kept rows
            assert _fused_steps(model, ids, 0, 1)[1] == n_proj
            # against the Python step, step by step (as test_fused_step_runs_larosa_and_joint_models)
            real = fused.FusedStep

            class SplitK(real):
                def __init__(self, *a, **kw):
                    super().__init__(*a, **kw)
                    assert self.set_split(2, 2) == n_proj

            monkeypatch.setattr(fused, "FusedStep", SplitK)
            py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40, fused=True)
            rows = compare(py, fu, ids, 8)
            monkeypatch.setattr(fused, "FusedStep", real)
            assert isinstance(fu._fused, SplitK)
            clean = [r["logits"] for r in rows if r["first"] is None]
            assert len(clean) >= len(rows) // 2 and max(clean) < TOL[dtype], rows
            assert all(explained(r["first"], DIFF[dtype]) for r in rows if r["first"] is not None), rows
            assert all(max(r["modules"].values()) <= DIFF[dtype] for r in rows), rows
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["larosa", "joint"])
def test_fused_split_k_rule_counts_kept_rows_per_part(tmp_path, tokenizer, kind):
    """The default split (mode 0): split-K for a projection when each of its row parts gets >= 16 kept rows
    (joint: >= 4 groups of four), gate and up only together; else the column units."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", kind, torch.float32)
    fu = _prefilled(model, torch.tensor([[1, 2, 3]]))

    threads = torch.get_num_threads()
    try:
        seen = set()
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for parts in (1, 2, 4, 8, 16):
                np_ = nt * parts
                want = 0
                for l in fu.layers:
                    rows = [_split_rows(m) for m in (l.q, l.k, l.v, l.o, l.down, l.adapter)]
                    want += sum(r > 0 and r >= 16 * np_ for r in rows)
                    want += 2 * all(_split_rows(m) >= 16 * np_ for m in (l.mlp.gate_proj, l.mlp.up_proj))
                got = fu._fused.set_split(0, parts)
                assert got == want, (nt, parts)
                seen.add(got)
        assert len(seen) >= 3  # the rule both ways (all, some, none of the projections)
    finally:
        torch.set_num_threads(threads)


def test_fused_step_divides_joint_inputs_by_their_smoothing_row(tmp_path, tokenizer):
    """A SparseInt8Linear's smoothing row (kept values / s before the int8 codes): RTN and SmoothQuant after
    LaRoSA fold theirs into the weights, so the rows are set here, the same on both steps' modules."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", "joint", torch.float32)
    py = DecodeEngine(model, max_len=40, fused=False)
    g = torch.Generator().manual_seed(7)
    for l in py.layers:
        for group in ((l.q, l.k, l.v), (l.mlp.gate_proj, l.mlp.up_proj), (l.o,), (l.down,)):
            s = torch.rand(1, group[0].in_features, generator=g) * 4 + 0.25
            for m in group:
                m.input_smoothing = s
    fu = DecodeEngine(model, max_len=40)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    rows = compare(py, fu, ids, 8)
    assert all(r["first"] is None and r["logits"] < TOL[torch.float32] for r in rows), rows
    for l in py.layers:  # without its rows the fused plan would compute another model
        for m in (l.q, l.k, l.v, l.o, l.mlp.gate_proj, l.mlp.up_proj, l.down):
            m.input_smoothing = None
    assert max(_stepwise_errors(DecodeEngine(model, max_len=40, fused=False), fu, ids, 4)) > 100 * TOL[torch.float32]


def test_fused_sparse_step_notices_a_wrong_k_or_a_missing_adapter(tmp_path, tokenizer, monkeypatch):
    """The comparison above discriminates: a fused plan that keeps one channel fewer per Top-K, or one
    that skips the residual adapters, is far outside its tolerance."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", "joint", torch.float32)
    py = DecodeEngine(model, max_len=40, fused=False)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    good = max(_stepwise_errors(py, DecodeEngine(model, max_len=40), ids, 6))
    assert good < TOL[torch.float32]
    keep = fused._sparse_keep
    monkeypatch.setattr(fused, "_sparse_keep", lambda m: keep(m) - 1)
    assert max(_stepwise_errors(py, DecodeEngine(model, max_len=40), ids, 6)) > 100 * TOL[torch.float32]
    monkeypatch.setattr(fused, "_sparse_keep", keep)
    fu = DecodeEngine(model, max_len=40)
    for layer in fu.layers:
        layer.adapter = None  # the plan is made at the first step: without adapters
    assert max(_stepwise_errors(py, fu, ids, 6)) > 100 * TOL[torch.float32]


def test_fused_trace_is_the_python_steps_module_inputs(tmp_path, tokenizer):
    """FusedStep.trace (the module-by-module comparison of docs/runtime.md) records, per layer, the inputs
    of q/k/v, o_proj, gate/up and down_proj and the residual stream after the adapter: they equal what the
    Python step feeds its modules, to round-off."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", "joint", torch.float32)
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, key=(n, name): seen.__setitem__(key, i[0].reshape(-1)))
             for n, l in enumerate(py.layers)
             for name, m in (("x1", l.q), ("attn", l.o), ("x2", l.mlp.gate_proj), ("act", l.down))]
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad():
            for e in (py, fu):
                e._reset()
                e._forward(ids, 0)
            fu._step(torch.tensor([[5]]), 39)  # makes the plan (writes only position 39 of the caches)
            fu._fused.set_trace(True)
            py._step(torch.tensor([[5]]), 9)
            fu._step(torch.tensor([[5]]), 9)
            tr = fu._fused.trace()
    finally:
        for h in hooks:
            h.remove()
    assert len(tr) == len(py.layers)
    for (n, name), x in seen.items():
        assert (tr[n][name] - x).abs().max() <= 1e-5 * x.abs().max(), (n, name)
    # the adapter phase: h = h_mlp A (the layer's own adapter forward on the traced stream)
    a = fu.layers[0].adapt(tr[0]["h_mlp"][None, None]).reshape(-1)
    assert (a - tr[0]["h"]).abs().max() <= 1e-5 * a.abs().max() and not torch.allclose(tr[0]["h"], tr[0]["h_mlp"])


def test_fused_topk_selection_keeps_topk_rows_channels():
    """The fused step's AVX-512 Top-K (``topk_select``, session 34) keeps exactly the channels of
    sparse_gemv.cpp's ``topk_row`` and of ``sparse/topk.py`` (NaN largest, ±0 equal, ties at the K-th magnitude
    to the lowest index), with their values: widths with and without a 16-lane tail, ties (bf16 values,
    coarse rounding: the pdep path), bins of more than 256 keys (the two extra radix levels), K = 1, D - 1,
    D and above."""
    from mmcompress.sparse.topk import topk_indices

    assert fused.load()
    op = torch.ops.mmcompress_fused.fused_topk
    g = torch.Generator().manual_seed(0)
    checked = 0
    for d in (1, 7, 16, 17, 333, 4096, 11008):
        for k in sorted({1, max(1, d // 3), max(1, 6 * d // 10), max(1, d - 1), d, d + 5}):
            for kind in ("normal", "rounded", "bf16", "cubed", "special"):
                x = torch.randn(d, generator=g)
                if kind == "rounded":
                    x = (x * 4).round() / 4  # few distinct magnitudes: many ties at the threshold
                elif kind == "bf16":
                    x = x.bfloat16().float()
                elif kind == "cubed":
                    x = x ** 3  # heavy tails: most keys in a few bins
                    x[::7] = 0.0
                elif kind == "special" and d > 3:
                    x[0], x[1], x[2] = -0.0, float("nan"), float("-inf")
                rows, vals = op(x, k, 0)
                ref_rows, ref_vals = op(x, k, 1)
                assert torch.equal(rows, ref_rows), (d, k, kind)
                assert torch.equal(rows.long(), topk_indices(x[None], min(k, d))[0]), (d, k, kind)
                assert torch.equal(vals, x[rows.long()]) or kind == "special", (d, k, kind)
                assert torch.equal(vals.isnan(), x[rows.long()].isnan())
                checked += 1
    assert checked > 150


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["larosa", "joint"])
def test_fused_topk_select_gives_the_same_logits_as_topk_row(tmp_path, tokenizer, kind, dtype):
    """The step's Top-K (``set_select(0)``, the default) and the selection before it (``set_select(1)``:
    sparse_gemv.cpp's ``topk_row``) keep the same channels, so four steps give bit-identical logits (bf16
    activations tie often: the tie policy is exercised)."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", kind, dtype, hidden=168, intermediate=333)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(4))
    logits = {}
    for mode in (1, 0):
        fu = _prefilled(model, ids)
        fu._fused.set_select(mode)
        logits[mode] = torch.stack([fu._fused.step(int(t), 9 + n) for n, t in enumerate([5, 17, 3, 8])])
    assert torch.equal(logits[0], logits[1])
    with pytest.raises(RuntimeError, match="fused_set_select"):
        fu._fused.set_select(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["larosa", "joint"])
def test_fused_residual_linears_reduced_by_every_thread_give_the_same_logits(tmp_path, tokenizer, kind, dtype):
    """Split-K o_proj, down and residual adapter reduced by every thread itself with no barrier after
    (``set_reduce(1)``, the default) add the same partial sums in the same order as the shared reduction
    units (``set_reduce(0)``): bit-identical logits, at 1 and 2 threads, 1 and 2 parts per thread (the
    partial-sum slots of consecutive phases must not overlap, or a fast thread overwrites what a slow one
    still adds)."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", kind, dtype, hidden=168, intermediate=333)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for parts in (1, 2):
                logits = {}
                for mode in (0, 1):
                    fu = _prefilled(model, ids)
                    assert fu._fused.set_split(2, parts) > 0
                    fu._fused.set_reduce(mode)
                    fu._fused.set_profile(True)
                    logits[mode] = torch.stack([fu._fused.step(int(t), 9 + n) for n, t in enumerate([5, 17, 3, 8])])
                    prof, steps = fu._fused.profile()
                    assert steps == 4 and prof["down"]["reduce_s"] > 0 and prof["adapter"]["reduce_s"] > 0
                assert torch.equal(logits[0], logits[1]), (nt, parts)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="fused_set_reduce"):
        fu._fused.set_reduce(2)


# -- TEAL (SparseLinear in mode "threshold": keep |x| >= t) -------------------------------------------------


def _projections(layer):
    return (layer.q, layer.k, layer.v, layer.o, layer.mlp.gate_proj, layer.mlp.up_proj, layer.down)


def _kept_fraction(fu, py_layers) -> float:
    """The fraction of the channels the fused step's last traced step kept, over every projection input (the
    kernels' rule on the traced inputs)."""
    kept = total = 0
    for tr, l in zip(fu._fused.trace(), py_layers):
        for name, mods in (("x1", (l.q, l.k, l.v)), ("attn", (l.o,)), ("x2", (l.mlp.gate_proj, l.mlp.up_proj)),
                           ("act", (l.down,))):
            for m in mods:
                kept += int((~(tr[name].abs() < torch.tensor(m.threshold, dtype=torch.float32))).sum())
                total += tr[name].numel()
    return kept / total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", list(TEAL_KINDS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_step_runs_teal_models(tmp_path, tokenizer, arch, kind, dtype):
    """TEAL's threshold SparseLinear runs on the fused step (it fell back to the Python step before session 35)
    and gives the Python step's logits under the Top-K tests' bounds: the same kept channels (the kernels'
    rule |x| >= t on the same fp32 values and float32 t) and the same sparse GEMV on them, so a step without a
    discontinuity agrees to round-off (TOL: the summation order of the split-K parts and of the other ops, as
    for Top-K), a channel that flips is within the inputs' round-off of t (fused_check ``threshold``), and
    every module on the fused step's own inputs gives its outputs (DIFF); fp32: the same greedy tokens."""
    from mmcompress.sparse.linear import SparseLinear

    model, tok = _sparse_model(tmp_path, tokenizer, arch, kind, dtype)
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40, fused=True)
    assert fu.fused, fused.fused_problem(fu)
    l0 = fu.layers[0]
    assert all(type(m) is SparseLinear and m.mode == "threshold" and m.backend == "cpu" for m in _projections(l0))
    thr = [m.threshold for m in (l0.q, l0.k, l0.v)]
    assert (len(set(thr)) == 1) == (kind == "teal")  # shared (one selection) / three selections

    def kept():  # one traced step: the thresholds really drop channels, not all
        assert 0.3 < _kept_fraction(fu, py.layers) < 0.9

    _assert_steps_match(py, fu, tok, dtype, traced=kept)


def test_fused_threshold_selection_is_the_kernels_rule():
    """The fused step's threshold selection (``threshold_select``) keeps exactly the channels with ``|x| >= t``
    as the Python step's kernel decides it (``sparse_gemv.cpp``'s ``threshold_row``: ``!(|x| < t)`` in fp32,
    ``t`` rounded to float32, NaN kept), with their values: values exactly at ±t (kept: ``>=``, not ``>``),
    one float32 ulp below t (dropped), ±0, ±inf, NaN, bf16 values, widths with and without a 16-lane tail,
    t = 0 (keeps all), t = inf (keeps only ±inf and NaN), a t that is not a float32 (rounded as the kernel
    rounds it); and the Python step's op on an identity weight keeps the same channels."""
    assert fused.load()
    op = torch.ops.mmcompress_fused.fused_threshold
    g = torch.Generator().manual_seed(0)
    checked = 0
    for d in (1, 5, 16, 17, 333, 4096):
        for kind in ("normal", "bf16", "special"):
            x = torch.randn(d, generator=g)
            if kind == "bf16":
                x = x.bfloat16().float()
            t_exact = float(x.abs().median())  # exactly some channels' magnitude: ties at t
            if kind == "special" and d > 7:
                below = torch.nextafter(torch.tensor(t_exact), torch.tensor(0.0)).item()
                x[:8] = torch.tensor([t_exact, -t_exact, below, -0.0, 0.0, float("inf"), float("-inf"), float("nan")])
            for t in (t_exact, 0.0, float("inf"), t_exact + 1e-12, 0.1):
                rows, vals = op(x, t)
                t32 = torch.tensor(t, dtype=torch.float32)
                want = (~(x.abs() < t32)).nonzero().flatten()
                assert torch.equal(rows.long(), want), (d, kind, t)
                assert torch.equal(vals.isnan(), x[want].isnan())
                assert torch.equal(vals.nan_to_num(), x[want].nan_to_num()), (d, kind, t)
                if kind == "special" and d > 7 and t == t_exact:
                    assert rows[:2].tolist() == [0, 1] and 2 not in rows.tolist()  # >= t kept, below t dropped
                checked += 1
    assert checked >= 80
    # the Python step's kernel (SparseLinear's threshold decode path): the same channels on an identity weight
    from mmcompress.sparse.kernels import sparse_linear

    x = torch.randn(1, 300, generator=g)
    t = float(x.abs()[0, 7])
    y = sparse_linear(x, torch.eye(300), backend="cpu", threshold=t)
    rows, _ = op(x[0].contiguous(), t)
    assert torch.equal((y[0] != 0).nonzero().flatten(), rows.long())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_teal_thresholds_keeping_no_channel_or_all(tmp_path, tokenizer, dtype):
    """Thresholds that keep no channel of a token (t = inf: the projection gives its bias; the first layer's
    q/k/v and down) and all of them (t = 0: layer 1's o_proj and gate/up), on the column split, split-K forced
    (row parts of zero rows) and the default: the Python step's logits (TOL) and, fp32, tokens."""
    model, tok = _sparse_model(tmp_path, tokenizer, "qwen2", "teal", dtype)  # qwen2: q/k/v bias
    py = DecodeEngine(model, max_len=40, fused=False)
    l0, l1 = py.layers[0], py.layers[1]
    for m in (l0.q, l0.k, l0.v, l0.down):
        m.threshold = float("inf")
    for m in (l1.o, l1.mlp.gate_proj, l1.mlp.up_proj):
        m.threshold = 0.0
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(2))
    real = fused.FusedStep
    for split in (0, 1, 2):
        class Split(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.set_split(split, 2)

        fused.FusedStep = Split
        try:
            fu = DecodeEngine(model, max_len=40)
            rows = compare(py, fu, ids, 6)
        finally:
            fused.FusedStep = real
        assert isinstance(fu._fused, Split)
        assert all(r["first"] is None and r["logits"] < TOL[dtype] for r in rows), (split, rows)
    fu = DecodeEngine(model, max_len=40)
    if dtype == torch.float32:
        assert torch.equal(fu.generate(ids, 12), py.generate(ids, 12))
    # the zero-kept projections really gave only their bias: layer 0's V cache rows of the two fused steps'
    # positions (9, 10) are bias_v, whatever the token
    fu.generate(ids, 3)
    v_rows = fu._vc[0][0, :, 9:11].transpose(0, 1).reshape(2, -1)
    assert torch.equal(v_rows[0], v_rows[1]) and torch.equal(v_rows[0], l0.v.bias.reshape(-1))


def test_fused_teal_step_notices_a_wrong_threshold(tmp_path, tokenizer, monkeypatch):
    """The TEAL comparison discriminates: a plan whose thresholds are 10 % off (or that ignores them: all
    channels kept) is far outside the bound; the exact ones are within it."""
    model, tok = _sparse_model(tmp_path, tokenizer, "llama", "teal", torch.float32)
    py = DecodeEngine(model, max_len=40, fused=False)
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    assert max(_stepwise_errors(py, DecodeEngine(model, max_len=40), ids, 6)) < TOL[torch.float32]
    bits = fused.f32_bits
    monkeypatch.setattr(fused, "f32_bits", lambda t: bits(1.1 * t))
    assert max(_stepwise_errors(py, DecodeEngine(model, max_len=40), ids, 6)) > 100 * TOL[torch.float32]
    monkeypatch.setattr(fused, "f32_bits", lambda t: bits(0.0))
    assert max(_stepwise_errors(py, DecodeEngine(model, max_len=40), ids, 6)) > 100 * TOL[torch.float32]


def test_fused_step_refuses_what_it_does_not_run(tmp_path, tokenizer):
    """What stays on the Python step, with its reason: CATS's thresholded activation, a threshold
    SparseLinear left on the torch backend."""
    from mmcompress.sparse.merge import ThresholdedActivation

    model, tok = _sparse_model(tmp_path, tokenizer, "llama", "teal", torch.float32)
    fu = DecodeEngine(model, max_len=40)
    assert fu.fused and fused.fused_problem(fu) is None
    model.model.layers[1].mlp.act_fn = ThresholdedActivation(model.model.layers[1].mlp.act_fn, 0.01)
    assert fused.fused_problem(DecodeEngine(model, max_len=40, fused=False)) == \
        "layer 1: a thresholded activation (CATS)"
    model.model.layers[1].mlp.act_fn = model.model.layers[1].mlp.act_fn.act
    model.model.layers[0].self_attn.o_proj.set_backend("torch")
    assert fused.fused_problem(DecodeEngine(model, max_len=40, fused=False)) == \
        "layer 0: a SparseLinear off the CPU kernel layout (backend 'torch')"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_int8_rows_in_tiles_of_eight_four_and_one(tmp_path, tokenizer, dtype):
    """The fused step walks row-major int8 codes in 8-row tiles, then 4, then single rows: k/v projections of
    12 rows (one KV head of 12) take the 8- and the 4-row tile, the logits equal the Python step's."""
    model, tok = tiny_model("llama", tokenizer=tokenizer, dtype=dtype, hidden=192, heads=16, kv_heads=1)
    mmcompress.quantize(model, CalibrationSet(text_samples(tok, n=2)), "rtn", "w8a8", progress=False)
    model = mmcompress.load(mmcompress.save(model, tmp_path / "w8a8"))
    kv = model.model.layers[0].self_attn.k_proj
    assert kv.out_features == 12 and kv.weight_codes.dim() == 2  # 12 rows: not whole tiles, row-major
    py, fu = DecodeEngine(model, max_len=40, fused=False), DecodeEngine(model, max_len=40)
    assert fu.fused
    ids = torch.randint(0, len(tok) - 10, (1, 9), generator=torch.Generator().manual_seed(1))
    _steps_agree(py, fu, ids, 8, TOL[dtype])
