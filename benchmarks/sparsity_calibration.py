"""Cost of LaRoSA's rotation calibration (wall time and peak memory), one model per run.

    python benchmarks/sparsity_calibration.py qwen2.5-0.5b [--nsamples 16 --seqlen 1024 --mode merged]

Streams the dense model chain one decoder layer at a time and accumulates the fp64 second moment of
each layer's normalised input; reports seconds, peak RSS of the process (ru_maxrss, which includes
the fp32 model itself), the calibration token count and the orthogonality of the bases.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--mode", default="merged", choices=["merged", "reference"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model
    from mmcompress.sparse.rotation import calibrate_rotations

    from mmcompress_testbed.registry import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    from mmcompress_testbed.data import calibration_set

    t_load = time.time()
    model = load_hf_model(model_dir, dtype="float32")
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    calib = calibration_set("wiki", model, model_dir, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    t_load = time.time() - t_load
    t0 = time.time()
    rot = calibrate_rotations(model, get_adapter(model), calib.samples, mode=args.mode, progress=False)
    sec = time.time() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    orth = max(float((q.T @ q - torch.eye(q.shape[0], dtype=q.dtype)).abs().max()) for q in rot.matrices)
    print(json.dumps({"model": args.model, "mode": args.mode, "layers": len(rot), "tokens": rot.tokens,
                      "calibration_seconds": round(sec, 1), "load_seconds": round(t_load, 1),
                      "peak_rss_gib": round(peak, 2), "rss_after_load_gib": round(rss_model, 2),
                      "max_orthogonality_error": orth, "threads": args.threads}))


if __name__ == "__main__":
    main()
