"""MASQuant's calibration on omni-mini at the demo's --quick settings: its time, and how far its result
moves with round-off (docs/methods.md, "Round-off sensitivity").

    python benchmarks/masquant_calibration.py [--threads N] [--seed 0] [--json FILE]
    MMCOMPRESS_NO_CPU_KERNEL=1 python benchmarks/masquant_calibration.py      # the torch chains, no kernels

As in ``mmcompress demo --quick``: 6 calibration samples of the testbed set (seqlen 192), 8 held-out samples
for the diagnostics, W4A8, one epoch; RTN first through the same ReferenceCache (so MASQuant's time excludes
the captures and the uncompressed held-out chain, as in the demo).  Prints MASQuant's seconds and the mean
accumulated held-out SQNR per modality.  Needs the testbed (``mmcompress testbed fetch omni-mini``).
"""

import argparse
import copy
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmcompress.engine import ReferenceCache  # noqa: E402
from mmcompress.models.loading import load_hf_model  # noqa: E402
from mmcompress.quant.api import quantize  # noqa: E402
from mmcompress_testbed.data import calibration_set  # noqa: E402
from mmcompress_testbed.registry import fetch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="calibration seed")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads is not None and a.threads < 1:
        ap.error(f"--threads must be >= 1, got {a.threads}")
    if a.threads:
        torch.set_num_threads(a.threads)
    d = fetch("omni-mini", progress=False)
    base = load_hf_model(d, device="cpu")
    calib = calibration_set("testbed", base, d, nsamples=6, seqlen=192, seed=a.seed)
    held = calibration_set("testbed-heldout", base, d, nsamples=8, seqlen=192, seed=0)
    ref = ReferenceCache()
    with tempfile.TemporaryDirectory() as rep:
        common = dict(device="cpu", progress=False, report_dir=rep, report_calib=held, report_plot=False,
                      reference_cache=ref)
        quantize(copy.deepcopy(base), calib, "rtn", "w4a8", **common)
        t = time.perf_counter()
        quantize(base, calib, "masquant", "w4a8", epochs=1, **common)
        secs = time.perf_counter() - t
        report = json.loads(open(base._mmcompress_description["report"]).read())
    out = {"masquant_s": round(secs, 2), "threads": torch.get_num_threads(), "seed": a.seed,
           "kernels": not os.environ.get("MMCOMPRESS_NO_CPU_KERNEL"),
           "mean_sqnr_accumulated": {k: round(v, 3) for k, v in report["summary"]["mean_sqnr_accumulated"].items()}}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
