"""The per-modality SQNR accumulator: pooled energy ratio and the per-token median."""

import math

import torch

from mmcompress.quant.diagnostics import _Acc
from mmcompress.models.modality import AUDIO, TEXT


def test_pooled_sqnr_is_an_energy_ratio_and_token_median_ignores_a_sink_token():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 65, 32, generator=g)
    ref[0, 0] *= 100.0                                   # attention-sink-like token: 10^4 x the energy
    noise = 0.01 * torch.randn(1, 65, 32, generator=g)  # 40 dB on an ordinary token
    noise[0, 0] *= 1000.0                                # sink token: signal ×100, noise ×1000 → 20 dB
    ids = torch.full((65,), TEXT)
    ids[40:] = AUDIO
    acc = _Acc(per_token=True)
    acc.add(ref, ref + noise, ids)
    pooled, med = acc.result(), acc.token_median()
    sig = ref[0, :40].pow(2).sum().item()
    err = noise[0, :40].pow(2).sum().item()
    assert math.isclose(pooled["text"], 10 * math.log10(sig / err), rel_tol=1e-5)
    # the pooled text figure is pulled to the sink token's ~20 dB; the median stays at ~40 dB
    assert pooled["text"] < 25.0
    assert 37.0 < med["text"] < 43.0
    assert 37.0 < med["audio"] < 43.0 and 37.0 < pooled["audio"] < 43.0
    # without per_token the accumulator keeps no per-token values
    plain = _Acc()
    plain.add(ref, ref + noise, ids)
    assert plain.token_median() == {} and plain.result() == pooled


def _reference_sums(pairs):
    """The straightforward form: float64 copies of every output, a boolean mask per modality."""
    sig, err, db = {}, {}, {}
    for ref, out, ids in pairs:
        r = ref.double().reshape(-1, ref.shape[-1])
        e = (out.double().reshape(-1, out.shape[-1]) - r).pow(2).sum(-1)
        s = r.pow(2).sum(-1)
        for m in ids.unique().tolist():
            sel = ids == m
            sig[m] = sig.get(m, 0.0) + float(s[sel].sum())
            err[m] = err.get(m, 0.0) + float(e[sel].sum())
            db.setdefault(m, []).append(10 * torch.log10(s[sel] / e[sel]))
    return sig, err, {m: float(torch.cat(v).float().median()) for m, v in db.items()}


def test_vectorised_accumulation_equals_a_float64_reference():
    from mmcompress.models.modality import IMAGE, MODALITY_NAMES

    g = torch.Generator().manual_seed(1)
    pairs = []
    for T, layout in ((50, (TEXT,)), (70, (TEXT, IMAGE, TEXT)), (33, (AUDIO, TEXT)), (40, (IMAGE, AUDIO, TEXT))):
        ids = torch.cat([torch.full((T // len(layout) + (i < T % len(layout)),), m) for i, m in enumerate(layout)])
        ids = ids[torch.randperm(T, generator=g)] if T == 40 else ids  # scattered modalities too
        ref = torch.randn(1, T, 96, generator=g) * torch.logspace(-2, 2, T)[None, :, None]  # 8 decades of energy
        out = ref + 1e-3 * torch.randn(1, T, 96, generator=g) * ref.abs().amax(-1, keepdim=True)
        pairs.append((ref, out, ids))
    acc = _Acc(per_token=True)
    for ref, out, ids in pairs:
        acc.add(ref, out, ids)
    sig, err, med = _reference_sums(pairs)
    assert sorted(acc.signal) == sorted(sig) == [TEXT, IMAGE, AUDIO]
    for m in sig:  # float32 round-off of each token's sum, nothing more
        assert math.isclose(acc.signal[m], sig[m], rel_tol=1e-6), (m, acc.signal[m], sig[m])
        assert math.isclose(acc.noise[m], err[m], rel_tol=1e-6), (m, acc.noise[m], err[m])
    res, tok = acc.result(), acc.token_median()
    for m in sig:
        name = MODALITY_NAMES[m]
        assert abs(res[name] - 10 * math.log10(sig[m] / err[m])) < 1e-5
        assert abs(tok[name] - med[m]) < 1e-4
    # float64 inputs are summed in float64: equal to the reference to double round-off
    acc64 = _Acc()
    for ref, out, ids in pairs:
        acc64.add(ref.double(), out.double(), ids)
    for m in sig:
        assert math.isclose(acc64.signal[m], sig[m], rel_tol=1e-12) and math.isclose(acc64.noise[m], err[m], rel_tol=1e-12)


def test_input_stats_are_the_per_modality_absmax_and_follow_in_place_changes():
    from mmcompress.quant.diagnostics import _InputStats

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 30, 16, generator=g)
    x[..., 3] = 0.0          # an all-zero channel: +0.0, as |x| gives
    x[..., 5] = -x[..., 5].abs()  # a channel with negative values only
    ids = torch.full((1, 30), TEXT)
    ids[0, 10:20] = AUDIO
    seen = _InputStats()
    groups, amax = seen.of(x, ids)
    assert groups.present == [TEXT, AUDIO]
    for m in (TEXT, AUDIO):
        want = x.reshape(-1, 16)[ids.reshape(-1) == m].abs().amax(0)
        assert torch.equal(amax[m], want)
        assert not torch.signbit(amax[m]).any()
    assert seen.of(x, ids)[1] is amax      # the same input again (q, k, v): not recomputed
    x.mul_(2.0)                            # changed in place: recomputed
    assert torch.equal(seen.of(x, ids)[1][AUDIO], 2 * amax[AUDIO])
