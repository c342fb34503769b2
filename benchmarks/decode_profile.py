"""Where the time of one fused decode step goes: per phase (q/k/v, attention, o_proj, gate/up, down,
LM head, LaRoSA's residual adapters) the milliseconds per token and the bytes each phase reads, for docs/runtime.md.

    PYTHONPATH=src python benchmarks/decode_profile.py /tmp/lc-cmp/art-w8a8 --head int8 \\
        --threads 2 --prompt 16 --tokens 64 --rounds 3

MODEL: an artifact, or a plain model directory with ``--dtype``.  The fused step's own clock (thread 0,
``FusedStep.set_profile``): per phase, thread 0's small ops (residual add, RMSNorm, smoothing and
activation quantization of the phase's input, LaRoSA's Top-K selections — every thread computes these
itself), its share of the
phase's row units (attention: query heads; includes RoPE and the K/V cache write), and its wait at the
barrier that ends the phase (the other thread still working, or descheduled).  Bytes: the weights the
phase's linears read (codes, step sizes, zero points of asymmetric codes, bias; dense weights; for
LaRoSA / joint projections the kept rows' share; for TEAL's threshold projections the mean share of a traced
run, ``threshold_shares``), and for
attention the K/V cache read at the mean position of the run.  GB/s = bytes / the phase's total time.
The best round (lowest total) is printed; the last line is JSON with every round.
"""

import argparse
import json
import sys
from pathlib import Path

import torch


def linear_bytes(m, threshold_share: dict | None = None) -> int:
    """Bytes one decode step reads of ``m`` (sparse projections: the kept rows' share of the weight; for a
    threshold projection, TEAL's, whose kept rows vary per token, the mean share ``threshold_share[id(m)]``
    measured by :func:`threshold_shares`)."""
    from mmcompress.quant.deployed import IntLinear
    from mmcompress.runtime.fused import _sparse_keep
    from mmcompress.sparse.joint import SparseInt8Linear
    from mmcompress.sparse.linear import SparseLinear

    if m is None:
        return 0
    if isinstance(m, SparseInt8Linear):
        n = round(m.weight_q.numel() * _sparse_keep(m) / m.in_features) + 8 * m.out_features  # + scale, zero corr.
    elif isinstance(m, SparseLinear):
        share = (threshold_share or {}).get(id(m), _sparse_keep(m) / m.in_features)
        n = round(m.weight.numel() * m.weight.element_size() * share)
    elif isinstance(m, IntLinear):
        n = m.weight_codes.numel() * m.weight_codes.element_size() + m.weight_scale.numel() * 4
        if not m.scheme.sym:
            n += m.weight_zero.numel() * 4
    else:
        n = m.weight.numel() * m.weight.element_size()
    return n + (m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)


def threshold_kept(fs, layers) -> dict[int, tuple[object, int]]:
    """Of the fused step ``fs``'s last traced step (``FusedStep.trace``), per threshold projection (a
    ``SparseLinear`` in mode ``threshold``: TEAL) of the engine's ``layers``: ``{id(module): (module, rows
    kept)}``, by the kernels' rule (``topk.threshold_keep``) on the input the step traced."""
    from mmcompress.sparse.linear import SparseLinear
    from mmcompress.sparse.topk import threshold_keep

    readers = {"x1": lambda l: (l.q, l.k, l.v), "attn": lambda l: (l.o,),
               "x2": lambda l: (l.mlp.gate_proj, l.mlp.up_proj), "act": lambda l: (l.down,)}
    out = {}
    for tr, l in zip(fs.trace(), layers):
        for name, mods in readers.items():
            for m in mods(l):
                if isinstance(m, SparseLinear) and m.mode == "threshold":
                    out[id(m)] = (m, int(threshold_keep(tr[name], m.threshold).sum()))
    return out


def threshold_shares(eng, ids: torch.Tensor, tokens: int) -> dict[int, float]:
    """The mean share of the rows each threshold projection reads over the ``tokens - 1`` fused decode steps
    after the prompt ``ids`` (:func:`threshold_kept` of each step); ``{id(module): share}``."""
    fs = eng._fused
    kept: dict[int, list[float]] = {}
    calls = []

    def seen(_token):
        calls.append(1)
        if len(calls) == 1:  # the prefill's token: no decode step traced yet
            return
        for key, (m, n) in threshold_kept(fs, eng.layers).items():
            kept.setdefault(key, []).append(n / m.in_features)

    fs.set_trace(True)
    try:
        eng.generate(ids, tokens, on_token=seen)
    finally:
        fs.set_trace(False)
    return {k: sum(v) / len(v) for k, v in kept.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--dtype", default=None, help="plain model directories: float32 or bfloat16")
    ap.add_argument("--head", default="model", choices=("model", "bf16", "int8"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import mmcompress
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.runtime.decode import DecodeEngine
    from mmcompress.runtime.fused import PHASES
    from mmcompress.runtime.generate import prepare

    torch.set_num_threads(a.threads)
    model = load_hf_model(a.model, dtype=getattr(torch, a.dtype)) if a.dtype else mmcompress.load(a.model)
    prepare(model)  # sparse layers on the decode kernels, as `mmcompress generate` runs them
    tok = load_tokenizer(a.model)
    text = "The history of the city begins in the early medieval period, when a small settlement grew around " * 4
    ids = torch.tensor([tok(text).input_ids[: a.prompt]])
    eng = DecodeEngine(model, max_len=a.prompt + a.tokens, fused=True, head=a.head)
    if not eng.fused:
        raise SystemExit("no fused step for this model")
    eng.generate(ids, 4)  # builds the plan
    fs = eng._fused

    L = eng.layers
    elt = eng.dtype.itemsize
    mean_ctx = a.prompt + a.tokens / 2
    kv = sum(2 * eng.kv_heads * l.hd * mean_ctx * elt for l in L)
    share = threshold_shares(eng, ids, a.tokens)
    lb = lambda m: linear_bytes(m, share)  # noqa: E731
    nbytes = {
        "qkv": sum(lb(l.q) + lb(l.k) + lb(l.v) for l in L),
        "attention": kv,
        "o_proj": sum(lb(l.o) for l in L),
        "gate_up": sum(lb(l.mlp.gate_proj) + lb(l.mlp.up_proj) for l in L),
        "down": sum(lb(l.down) for l in L),
        "head": fs.head_bytes,
        "adapter": sum(lb(l.adapter) for l in L),  # LaRoSA's residual adapters
    }
    rounds = []
    for _ in range(a.rounds):
        fs.set_profile(True)
        tm = {}
        eng.generate(ids, a.tokens, timings=tm)
        prof, steps = fs.profile()
        fs.set_profile(False)
        rounds.append({"wall_ms_per_token": 1e3 * sum(tm["step_s"]) / len(tm["step_s"]), "steps": steps,
                       "phases_ms_per_token": {p: {k: 1e3 * v / steps for k, v in d.items()} for p, d in prof.items()}})
    best = min(rounds, key=lambda r: r["wall_ms_per_token"])
    print(f"{a.model} ({eng.dtype}, head {fs.head}): {best['wall_ms_per_token']:.3f} ms/token wall "
          f"({1e3 / best['wall_ms_per_token']:.1f} tok/s), {a.threads} threads, best of {a.rounds}; "
          f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}", file=sys.stderr)
    print(f"  {'phase':10s} {'own ops':>8s} {'units':>8s} {'wait':>8s} {'reduce':>8s} {'total':>8s} ms   {'MB':>7s} {'GB/s':>6s}",
          file=sys.stderr)
    tot = 0.0
    for p in PHASES:
        d = best["phases_ms_per_token"][p]
        t = sum(d.values())
        tot += t
        print(f"  {p:10s} {d['own_ops_s']:8.3f} {d['units_s']:8.3f} {d['wait_s']:8.3f} {d.get('reduce_s', 0):8.3f} {t:8.3f}      "
              f"{nbytes[p] / 1e6:7.2f} {nbytes[p] / 1e6 / t if t else 0:6.1f}", file=sys.stderr)
    allb = sum(nbytes.values())
    print(f"  {'all':10s} {'':8s} {'':8s} {'':8s} {'':8s} {tot:8.3f}      {allb / 1e6:7.2f} {allb / 1e6 / tot:6.1f}",
          file=sys.stderr)
    print(json.dumps({"model": str(a.model), "dtype": str(eng.dtype), "head": fs.head, "threads": a.threads,
                      "prompt": a.prompt, "tokens": a.tokens, "bytes_per_token": nbytes, "rounds": rounds}))


if __name__ == "__main__":
    sys.exit(main())
