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
