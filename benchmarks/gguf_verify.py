"""Verify `mmcompress export --format gguf` with llama.cpp: wiki perplexity from llama.cpp's logits on the
GGUF file against our own evaluation of the artifact, on the same token windows.

    bash benchmarks/llamacpp_env.sh .venv-llamacpp
    python benchmarks/gguf_verify.py ARTIFACT --llamacpp-python .venv-llamacpp/bin/python [--windows 4 --seqlen 512]

Prints one JSON object: ours, llama.cpp's, their relative difference, the GGUF types and the grid-change
error the export measured.  The target is a difference within 1 %.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--llamacpp-python", required=True)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from mmcompress.eval.perplexity import perplexity
    from mmcompress.export.gguf import export_gguf
    from mmcompress.export.serialization import load
    from mmcompress.models.loading import load_tokenizer
    from mmcompress_testbed.data import eval_text

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.artifact)
    ids = tok(eval_text("wiki"), return_tensors="pt").input_ids[0]
    windows = [ids[i * a.seqlen:(i + 1) * a.seqlen].tolist() for i in range(a.windows)]
    kw = {"runtime": "reference"} if "runtime" in load.__code__.co_varnames else {}
    model = load(a.artifact, **kw)
    ours = perplexity(model, torch.tensor(sum(windows, [])), seqlen=a.seqlen, progress=False)["ppl"]
    with tempfile.TemporaryDirectory() as tmp:
        report = export_gguf(a.artifact, Path(tmp) / "model.gguf")
        (Path(tmp) / "ids.json").write_text(json.dumps(windows))
        out = subprocess.run([a.llamacpp_python, str(Path(__file__).with_name("llamacpp_run.py")), "ppl",
                              str(Path(tmp) / "model.gguf"), str(Path(tmp) / "ids.json"), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
    theirs = json.loads(out.strip().splitlines()[-1])["ppl"]
    print(json.dumps({"artifact": a.artifact, "ours_ppl": ours, "llamacpp_ppl": theirs,
                      "rel_diff": theirs / ours - 1, "gguf_types": report["gguf_types"],
                      "grid_change_error": report["grid_change_error"], "tokens": a.windows * (a.seqlen - 1)}))


if __name__ == "__main__":
    sys.exit(main())
