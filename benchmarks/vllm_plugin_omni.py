"""omni-mini through vLLM + the MASQuant plugin against our runtime on more prompts than the test's 4 + 4
(issue 16, item 3): ``tests/test_vllm_plugin.omni_compare`` on an existing MASQuant artifact and its Omni-layout
export (``benchmarks/vllm_real.py prepare`` makes both: WORK/omni-mini-masquant-w8a8 and ...-ct).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/vllm_plugin_omni.py ART EXPORT \\
        --vllm-python /tmp/vllm-venv/bin/python --per-type 5 --digits 12 --work /tmp/omni-more

The vLLM venv must have this checkout's mmcompress installed (``benchmarks/vllm_env.sh`` does, editable):
without the plugin vLLM serves the export as plain compressed-tensors, and the summary's
``quantization.plugin`` then says so.  Prints the summary (answers per prompt, agreement per pair) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests/ is a package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("art", type=Path)
    ap.add_argument("export", type=Path)
    ap.add_argument("--vllm-python", required=True)
    ap.add_argument("--per-type", type=int, default=5, help="image-qa-test questions per type (default 5)")
    ap.add_argument("--digits", type=int, default=12, help="speech-test digit clips (default 12)")
    ap.add_argument("--work", type=Path, required=True)
    args = ap.parse_args()

    from mmcompress.eval.asr import load_speech_set
    from mmcompress.eval.vqa import _first_per_type, load_vqa_set
    from tests.test_vllm_plugin import omni_compare

    vqa = _first_per_type(load_vqa_set("image-qa-test"), args.per_type)
    speech = [it for it in load_speech_set("speech-test") if it.get("kind") == "digits"][: args.digits]
    args.work.mkdir(parents=True, exist_ok=True)
    summary = omni_compare(args.art, args.export, vqa, speech, args.work, args.vllm_python)["summary"]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
