"""Verify `mmcompress export --format gguf` with llama.cpp: wiki perplexity from llama.cpp's logits on the
GGUF file against our own evaluation of the artifact, on the same token windows.

    bash benchmarks/llamacpp_env.sh .venv-llamacpp
    python benchmarks/gguf_verify.py ARTIFACT --llamacpp-python .venv-llamacpp/bin/python [--windows 4 --seqlen 512]

Prints one JSON object: ours, llama.cpp's, their relative difference, the GGUF types and the grid-change
error the export measured.  The target is a difference within 1 %.

``--explain`` adds our perplexity of two float models built from the artifact, to say where a difference
comes from: ``ours_weight_only_ppl`` (the artifact's effective weights, activations not quantized) and
``ours_gguf_weights_ppl`` (the weights exactly as the GGUF file holds them: our effective weights moved to
llama.cpp's 32-blocks and back, embeddings/head through F16; activations not quantized).  Between the
artifact and the first: our per-token activation quantization; between the two: the grid change; between
the second and llama.cpp: llama.cpp's own arithmetic (its Q8_0/Q4 kernels quantize activations to 8-bit
blocks of 32, F16 head).
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
    ap.add_argument("--explain", action="store_true", help="also our perplexity of the weight-only and GGUF-weight "
                                                          "float models (see the docstring)")
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
    res = {"artifact": a.artifact, "ours_ppl": ours, "llamacpp_ppl": theirs,
           "rel_diff": theirs / ours - 1, "gguf_types": report["gguf_types"],
           "grid_change_error": report["grid_change_error"], "tokens": a.windows * (a.seqlen - 1)}
    if a.explain:
        ids_all = torch.tensor(sum(windows, []))
        for key, gguf_weights in (("ours_weight_only_ppl", False), ("ours_gguf_weights_ppl", True)):
            m = _float_model(model, gguf_weights)
            res[key] = perplexity(m, ids_all, seqlen=a.seqlen, progress=False)["ppl"]
            del m
        res["rel_diff_llamacpp_vs_gguf_weights"] = theirs / res["ours_gguf_weights_ppl"] - 1
    print(json.dumps(res))


def _float_model(ref, gguf_weights: bool):
    """fp32 copy of the (reference-runtime) artifact with ``nn.Linear`` of its effective weights (the decode
    benchmark's dense model); ``gguf_weights``: the export's effective weights after the GGUF block round
    trip, embeddings and head through F16."""
    import gguf

    from mmcompress.export.gguf import effective_weight, gguf_type_for
    from mmcompress.quant.linear import QuantLinear
    from mmcompress.runtime.bench_decode import densify

    m = densify(ref, torch.float32)
    if gguf_weights:
        with torch.no_grad():
            for name, q in ref.named_modules():
                if isinstance(q, QuantLinear):
                    w, qt = effective_weight(q).numpy(), gguf_type_for(q.scheme)
                    back = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt).reshape(w.shape)
                    m.get_submodule(name).weight.copy_(torch.from_numpy(back.copy()))
            for mod in {id(x): x for x in (m.get_input_embeddings(), m.get_output_embeddings())}.values():
                mod.weight.copy_(mod.weight.half().float())
    return m.eval()


if __name__ == "__main__":
    sys.exit(main())
