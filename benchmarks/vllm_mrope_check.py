"""Dense tiny Qwen2.5-VL, no quantization: vLLM's image-prompt log-probs against transformers', with and
without ``mm_token_type_ids`` (which transformers >= 5.x needs to build M-RoPE positions; without it the
image tokens silently get 1-D positions).

    MMCOMPRESS_VLLM_PYTHON=/path/to/.venv-vllm/bin/python PYTHONPATH=src nice -n 19 \\
        python benchmarks/vllm_mrope_check.py --work /tmp/vllm-mrope

Both sides get the same image embeddings (our vision tower's output; vLLM through ``enable_mm_embeds``),
float32.  Prints vLLM minus transformers per prompt position and the maxima.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from safetensors.torch import save_file

    from tests.conftest import make_image
    from tests.test_vllm import _env, vllm_python
    from tests.test_vllm_plugin import IMAGE_PROMPT, SHIM, TEXT_PROMPT
    from tests.tiny_models import tiny_model, tiny_processor

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    work = ap.parse_args().work
    work.mkdir(parents=True, exist_ok=True)
    py = vllm_python()
    if py is None:
        sys.exit("vLLM python not found: set MMCOMPRESS_VLLM_PYTHON (benchmarks/vllm_env.sh)")
    torch.manual_seed(0)
    model, tok = tiny_model("qwen2_5_vl", hidden=128, intermediate=256, heads=4, kv_heads=4, layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
    model = model.float().eval()
    proc = tiny_processor("qwen2_5_vl", tok)
    dense = work / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    proc.image_processor.save_pretrained(dense)
    image = make_image(3)
    image.save(work / "image.png")
    enc = proc(text=[IMAGE_PROMPT], images=[image], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    save_file({"image_embeds": feats.float().contiguous(), "image_grid_thw": enc["image_grid_thw"].contiguous()},
              str(work / "emb.safetensors"))
    job, res = work / "job.json", work / "result.json"
    job.write_text(json.dumps({"model": str(dense), "quantization": None, "max_tokens": 4, "dtype": "float32",
                               "requests": [{"prompt": TEXT_PROMPT},
                                            {"prompt": IMAGE_PROMPT, "image": str(work / "image.png"),
                                             "image_embeds": str(work / "emb.safetensors")}]}))
    p = subprocess.run([py, str(ROOT / "tests" / "vllm_mm_runner.py"), str(job), str(res)],
                       env=dict(_env(), PYTHONPATH=str(SHIM)), capture_output=True, text=True)
    if p.returncode:
        sys.exit((p.stdout + p.stderr)[-3000:])
    v = json.loads(res.read_text())["results"]
    ids = enc["input_ids"]
    assert ids[0].tolist() == v[1]["prompt_token_ids"]

    @torch.no_grad()
    def logprobs(input_ids, **kw):
        lp = torch.log_softmax(model(input_ids=input_ids, **kw).logits[0, :-1].float(), -1)
        return lp.gather(-1, input_ids[0, 1:, None])[:, 0]

    image_kw = {k: enc[k] for k in ("pixel_values", "image_grid_thw")}
    with_types = logprobs(ids, mm_token_type_ids=enc["mm_token_type_ids"], **image_kw)
    without = logprobs(ids, **image_kw)
    vl = torch.tensor(v[1]["prompt_logprobs"])
    t = proc(text=[TEXT_PROMPT], return_tensors="pt")["input_ids"]
    text_gap = (torch.tensor(v[0]["prompt_logprobs"]) - logprobs(t)).abs().max().item()
    print("image tokens at positions", (ids[0] == model.config.image_token_id).nonzero()[:, 0].tolist())
    print("vLLM - transformers (mm_token_type_ids: M-RoPE)  ", [round(x, 4) for x in (vl - with_types).tolist()])
    print("vLLM - transformers (no mm_token_type_ids: 1-D)  ", [round(x, 4) for x in (vl - without).tolist()])
    print(json.dumps({"text_max_abs": text_gap, "image_max_abs_mrope": (vl - with_types).abs().max().item(),
                      "image_max_abs_1d": (vl - without).abs().max().item(),
                      "image_mean_abs_1d": (vl - without).abs().mean().item()}))


if __name__ == "__main__":  # vLLM spawns processes: guard the entry point
    main()
