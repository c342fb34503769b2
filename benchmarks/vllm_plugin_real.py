"""MASQuant's vLLM plugin on a real testbed model: vl-mini on image-qa-test, vLLM against our runtime.

    export MMCOMPRESS_VLLM_PYTHON=/path/to/vllm-venv/bin/python       # benchmarks/vllm_env.sh
    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vllm_plugin_real.py \
        --work /tmp/vl-real --n 200 --out /tmp/vl-real/vqa-200.json

Steps (each cached in ``--work``: delete a file to redo it): ``mmcompress quantize`` vl-mini with MASQuant
W8A8 (``tests/test_vllm_plugin.VL_QUANTIZE``: ``--tie``, whitened CMC, 8 testbed samples of 256 tokens, one
epoch), ``mmcompress export --format compressed-tensors --requantize`` (o_proj under grouped-query
attention), then ``tests/test_vllm_plugin.vqa_compare`` on the first ``--n`` questions of image-qa-test
(``--n`` below 200: the same number per question type): vLLM (float32, ``enforce_eager``, images as pixels
through vLLM's own Qwen2.5-VL vision tower) with the plugin and with ``quantization="compressed-tensors"``
(plain), our runtime (``mmcompress.load``, float32) with and without its modality path; per question the
image prompt (eval/vqa.py's template) and the question as a text-only prompt; greedy answers of at most 6
tokens stopping at end-of-sequence, and prompt log-probs.  Prints the summary as JSON (last line) and writes
summary + every run's raw results to ``--out``.  Times are wall seconds on whatever the machine is doing
(the load average is recorded before and after).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load() -> str:
    return open("/proc/loadavg").read().strip()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="artifact, export and job files (reused)")
    ap.add_argument("--n", type=int, default=200, help="questions of image-qa-test (default all 200)")
    ap.add_argument("--out", type=Path, help="write summary + raw results here (JSON)")
    ap.add_argument("--answers-only", action="store_true",
                    help="our runtime: image prompts with its modality path, answers only (no text path, no prompt "
                         "log-probs, no text prompts): a third of its work, for a busy CPU")
    args = ap.parse_args(argv)

    from mmcompress.eval.vqa import _first_per_type, load_vqa_set
    from tests.test_vllm import vllm_python, _skip_reason
    from tests.test_vllm_plugin import VL_QUANTIZE, vl_mini_case, vqa_compare

    py = vllm_python()
    if py is None:
        sys.exit(_skip_reason())
    args.work.mkdir(parents=True, exist_ok=True)
    load_before = _load()
    t0 = time.perf_counter()
    case = vl_mini_case(args.work)
    if case is None:
        sys.exit("vl-mini is not in the testbed cache (mmcompress testbed fetch vl-mini)")
    prep_s = time.perf_counter() - t0
    art, export = case
    items = load_vqa_set("image-qa-test")
    if args.n < len(items):
        items = _first_per_type(items, max(1, args.n // 4))
    out = vqa_compare(art, export, items, args.work, py, full=not args.answers_only)
    section = json.loads((export / "config.json").read_text())["quantization_config"]["mmcompress_masquant"]
    out["summary"].update(quantize_options=VL_QUANTIZE, export_options=["--requantize"],
                          inexact_linears=len(section.get("inexact_linears", [])),
                          prepare_s=prep_s, load_average_before=load_before, load_average_after=_load(),
                          vllm_python=py)
    if args.out:
        args.out.write_text(json.dumps(out))
    print(json.dumps(out["summary"]))


if __name__ == "__main__":
    main()
