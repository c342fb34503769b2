"""The pieces behind session 40's demo speed-up, each against the form it replaced, in one process
(docs/methods.md "Training cost", docs/runtime.md "The demo's calibration and evaluation").

    python benchmarks/masquant_kernels.py [--repeats 20] [--skip-eval]

* ``weight_fq``: MASQuant's ``Q_w(W ⊙ s)`` forward + backward for a 1536×576 weight (omni-mini's gate/up):
  autograd's torch chain (``fake_quantize_weight(W * s)``) against ``smoothed_fake_quant_weight`` (the kernel).
* ``cmc_fit``: ``whitened_low_rank`` (rank 32) with the whitening factor applied inside the range finder
  against the factor multiplied in first (``top_svd(T @ ΔWᵀ)``), per shape ``in×out``, and the relative
  difference of their ``L R``.
* ``prefill_head`` (needs the testbed's omni-mini; ``--skip-eval`` leaves it out): the RTN W4A8 model's speech
  and image-QA evaluation of ``mmcompress demo --quick`` with the prefill's head on the last position against
  the head on every position (the cut disabled).
Milliseconds (medians of ``--repeats``) and seconds, printed as JSON.
"""

import argparse
import json
import os
import statistics
import time

import torch

from mmcompress.quant.kernels.fake_quant_cpu import available, smoothed_fake_quant_weight
from mmcompress.quant.methods import masquant as mq
from mmcompress.quant.quantizer import fake_quantize_weight


def _ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def weight_fq(repeats):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 576, generator=g) * 0.02
    grad = torch.randn(1536, 576, generator=g)
    s = (torch.rand(576, generator=g) + 0.5).requires_grad_()

    def chain():
        (fake_quantize_weight(w * s, 4, 0, True) * grad).sum().backward()

    def kernel():
        (smoothed_fake_quant_weight(w, s, 4, 0) * grad).sum().backward()

    return {"chain_ms": _ms(chain, repeats), "kernel_ms": _ms(kernel, repeats), "kernel": available()}


def cmc_fit(repeats):
    g = torch.Generator().manual_seed(0)
    out = {}
    for n_in, n_out in ((576, 576), (576, 1536), (4096, 4096), (4096, 1024)):
        x = torch.randn(2 * n_in, n_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n_in, dtype=torch.float64)
        moment = x.T @ x
        dw = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) * 0.01
        factor = mq.whitening(moment)
        t = factor[1]
        r = max(3, repeats // 5) if n_in > 1000 else repeats

        def fly():
            return mq.whitened_low_rank(dw, moment, 32, factor=factor)

        def multiplied():
            p, sv, qh = mq.top_svd(t @ dw.T, 32)
            return torch.linalg.solve_triangular(t, p, upper=True), sv[:, None] * qh

        (l1, r1), (l2, r2) = fly(), multiplied()
        out[f"{n_in}x{n_out}"] = {"on_the_fly_ms": _ms(fly, r), "multiplied_ms": _ms(multiplied, r),
                                  "lr_rel_diff": float((l1 @ r1 - l2 @ r2).norm() / (l2 @ r2).norm())}
    return out


def prefill_head():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.vqa import accuracy
    from mmcompress.models.loading import load_hf_model
    from mmcompress.quant.api import quantize
    from mmcompress.quant.deployed import deploy
    from mmcompress.runtime import mmgenerate
    from mmcompress_testbed.data import calibration_set, processor_for
    from mmcompress_testbed.registry import fetch

    d = fetch("omni-mini", progress=False)
    model = load_hf_model(d, device="cpu")
    proc = processor_for(d)
    quantize(model, calibration_set("testbed", model, d, nsamples=2, seqlen=64, seed=0), "rtn", "w4a8", progress=False)
    deploy(model, "int", quiet=True)
    cut = mmgenerate._last_position

    def evaluate():
        t = time.perf_counter()
        wer = word_error_rate(model, proc, "speech-test", limit=4, kinds=("digits",), max_new_tokens=16)
        t1 = time.perf_counter()
        qa = accuracy(model, proc, "image-qa-test", limit_per_type=2)
        return {"asr_s": round(t1 - t, 3), "vqa_s": round(time.perf_counter() - t1, 3),
                "wer": wer.get("wer_digits", wer["wer"]), "qa": qa["accuracy"]}

    evaluate()  # warm-up
    rows = {}
    for label, hook in (("every_position", lambda mod, args: args), ("last_position", cut)) * 2:
        mmgenerate._last_position = hook
        try:
            rows.setdefault(label, []).append(evaluate())
        finally:
            mmgenerate._last_position = cut
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--skip-eval", action="store_true")
    a = ap.parse_args()
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    res = {"threads": torch.get_num_threads(), "weight_fq": weight_fq(a.repeats), "cmc_fit": cmc_fit(a.repeats)}
    if not a.skip_eval:
        res["prefill_head"] = prefill_head()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
