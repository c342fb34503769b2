"""MASQuant's modality path under vLLM's CPU build through the mmcompress plugin (``pytest -m vllm``).

The vLLM venv (``benchmarks/vllm_env.sh``) has mmcompress installed without dependencies, so vLLM finds
the plugin's ``vllm.general_plugins`` entry point.  One tiny random Qwen2.5-VL (2 layers, hidden 128,
4 heads, 4 KV heads so that every text-smoothing fold is exact) is quantized with MASQuant (tied
vectors, CMC) here, exported (``export_compressed_tensors``), then served by vLLM twice:

* with the plugin (vLLM picks ``mmcompress-masquant`` for the export);
* plain: ``quantization="compressed-tensors"`` (the same files as stock vLLM serves them: text path).

Both run a text prompt and an image prompt (float32) and are compared with our runtime
(``mmcompress.load``, integer path) on the same artifact and the same expanded token ids: prompt
log-probs and greedy continuations.  The image reaches vLLM as our vision tower's output
(``enable_mm_embeds``), so both decoders see the same inputs.  Also compared: the modality path's
*effect* — plugin minus plain in vLLM against our runtime minus its text path (router off).  Expected (and
asserted): on the text prompt the plugin equals the plain export bit for bit (and our runtime to 1e-4); on the
image prompt the plugin equals our runtime and the plain export our text path, position by position, to
1e-4 nats (measured 5e-7).  Our side passes the processor's ``mm_token_type_ids``: without it transformers
gives image tokens 1-D positions instead of M-RoPE (vLLM's), which cost up to 0.05 nats per token here
(``benchmarks/vllm_mrope_check.py``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet

from .conftest import make_image, mm_inputs
from .test_vllm import _env, vllm_py  # noqa: F401 - vllm_py is the shared fixture

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("vllm_mm_runner.py")
SHIM = Path(__file__).with_name("vllm_shim")  # sitecustomize.py: see its docstring
MAX_TOKENS = 8
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|> the quick brown fox"
TEXT_PROMPT = "Images, audio and text tokens flow through one decoder. The quick brown"


def _artifact(root: Path, scheme: str):
    from .tiny_models import tiny_model, tiny_processor
    from mmcompress.quant.quantizer import resolve_scheme

    model, tok = tiny_model("qwen2_5_vl", hidden=128, intermediate=256, heads=4, kv_heads=4, layers=2)
    with torch.no_grad():  # sharpen the random model's next-token distributions (lm_head is not quantized)
        model.lm_head.weight.mul_(4)
    calib = CalibrationSet([mm_inputs("qwen2_5_vl", tok, seed=s)[0] for s in range(4)])
    mmcompress.quantize(model, calib, "masquant", resolve_scheme(scheme), progress=False, epochs=1, tie=True)
    art = mmcompress.save(model, root / f"vl-masquant-{scheme}")
    tok.save_pretrained(art)
    proc = tiny_processor("qwen2_5_vl", tok)
    proc.image_processor.save_pretrained(art)
    return art, tok, proc


def _run(py: str, export: Path, requests: list[dict], quantization: str | None, tag: str,
         dtype: str = "float32") -> dict:
    job, res = export.parent / f"{tag}.job.json", export.parent / f"{tag}.result.json"
    job.write_text(json.dumps({"model": str(export), "quantization": quantization, "requests": requests,
                               "max_tokens": MAX_TOKENS, "dtype": dtype}))
    env = dict(_env(), PYTHONPATH=str(SHIM))  # torchvision's Python part without its CUDA-built extension
    p = subprocess.run([py, str(RUNNER), str(job), str(res)], capture_output=True, text=True, env=env, timeout=1200)
    if p.returncode != 0:
        raise AssertionError(f"vLLM failed on {export} ({tag}, exit {p.returncode}):\n{(p.stdout + p.stderr)[-5000:]}")
    return json.loads(res.read_text())


@torch.no_grad()
def _ours(art: Path, proc, requests: list[dict], vllm_ids: list[list[int]], modalities: bool = True) -> list[dict]:
    """Our runtime on the same ids; ``modalities=False``: its text path for every token (no router)."""
    from PIL import Image

    from mmcompress.models.modality import modality_context

    model = mmcompress.load(art).float().eval()
    if not modalities:
        for h in model._mmcompress_router:
            h.remove()
        model._mmcompress_router = None
    out = []
    for r, ids in zip(requests, vllm_ids):
        kw = {"images": [Image.open(r["image"]).convert("RGB")]} if r.get("image") else {}
        enc = proc(text=[r["prompt"]], return_tensors="pt", **kw)
        assert enc["input_ids"][0].tolist() == ids, "our processor and vLLM's expanded the prompt differently"
        # mm_token_type_ids: without it transformers (5.24) silently gives image prompts 1-D positions
        # instead of M-RoPE (vLLM's): up to 0.04 nats per token on the tiny model's image prompt
        extra = {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        input_ids = enc["input_ids"]
        with modality_context(None):
            lp = torch.log_softmax(model(input_ids=input_ids, **extra).logits[0, :-1].float(), -1)
            gen = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0,
                                 **extra)
        out.append({"prompt_logprobs": lp.gather(-1, input_ids[0, 1:, None])[:, 0].tolist(),
                    "greedy": gen[0, input_ids.shape[1]:].tolist()})
    return out


@torch.no_grad()
def _image_embeds(art: Path, proc, image: Path, out: Path) -> Path:
    """Our vision tower's output for ``image``, for vLLM (``enable_mm_embeds``): what is compared is the
    decoder, not vLLM's vision-tower code."""
    from PIL import Image
    from safetensors.torch import save_file

    model = mmcompress.load(art).float().eval()
    enc = proc(text=[IMAGE_PROMPT], images=[Image.open(image).convert("RGB")], return_tensors="pt")
    feats = model.model.get_image_features(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
    save_file({"image_embeds": feats.float().contiguous(), "image_grid_thw": enc["image_grid_thw"].contiguous()},
              str(out))
    return out


def _gap(a: dict, b: dict) -> dict:
    d = [abs(x - y) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"])]
    return {"mean_abs_dlogp": sum(d) / len(d), "max_abs_dlogp": max(d), "greedy_identical": a["greedy"] == b["greedy"]}


@pytest.mark.parametrize("scheme,kernel", [("w8a8", "CompressedTensorsW8A8Int8")])
def test_masquant_plugin_serves_the_modality_path(tmp_path, vllm_py, scheme, kernel):
    from mmcompress.export.compressed_tensors import export_compressed_tensors, read_export_config

    art, tok, proc = _artifact(tmp_path, scheme)
    report = export_compressed_tensors(art, tmp_path / "ct")
    section = read_export_config(tmp_path / "ct")["mmcompress_masquant"]
    assert section["cmc_linears"] > 0 and section["modalities"] == ["image"], section
    image = tmp_path / "image.png"
    make_image(3).save(image)
    embeds = _image_embeds(art, proc, image, tmp_path / "image_embeds.safetensors")
    requests = [{"prompt": TEXT_PROMPT, "image": None},
                {"prompt": IMAGE_PROMPT, "image": str(image), "image_embeds": str(embeds)}]

    plugin = _run(vllm_py, tmp_path / "ct", requests, None, "plugin")
    plain = _run(vllm_py, tmp_path / "ct", requests, "compressed-tensors", "plain")
    assert plugin["quantization"] == "mmcompress-masquant" and plain["quantization"] == "compressed-tensors"
    assert plugin["plugin"]["wrapped"] == 2 * 3  # per layer: qkv_proj, o_proj, gate_up_proj (down_proj: s = 1)
    assert plugin["plugin"]["modality_calls"] > 0 and plain["plugin"]["modality_calls"] == 0
    ids = [r["prompt_token_ids"] for r in plugin["results"]]
    assert ids == [r["prompt_token_ids"] for r in plain["results"]]
    ours = _ours(art, proc, requests, ids)
    ours_text = _ours(art, proc, requests, ids, modalities=False)
    gaps = {f"{which} {kind}": _gap(res["results"][k], ours[k])
            for which, res in (("plugin", plugin), ("plain", plain)) for k, kind in enumerate(("text", "image"))}
    gaps["plain vs ours-text-path image"] = _gap(plain["results"][1], ours_text[1])
    # the modality path's effect on the image prompt's log-probs, in vLLM (plugin - plain) and in ours
    d_vllm = [a - b for a, b in zip(plugin["results"][1]["prompt_logprobs"], plain["results"][1]["prompt_logprobs"])]
    d_ours = [a - b for a, b in zip(ours[1]["prompt_logprobs"], ours_text[1]["prompt_logprobs"])]
    effect = {"ours_max": max(map(abs, d_ours)), "vllm_max": max(map(abs, d_vllm)),
              "max_abs_difference": max(abs(a - b) for a, b in zip(d_vllm, d_ours))}
    print(f"\n[vllm plugin] {scheme}: " + json.dumps({**gaps, "modality_effect": effect, "plugin": plugin["plugin"],
                                                      "cpu_int8_kernel": plugin["cpu_int8_kernel"]}))
    # text: the plugin takes the plain path, bit for bit, and that is our runtime
    assert plugin["results"][0]["prompt_logprobs"] == plain["results"][0]["prompt_logprobs"]
    assert plugin["results"][0]["greedy"] == plain["results"][0]["greedy"]
    assert gaps["plugin text"]["max_abs_dlogp"] < 1e-4 and gaps["plugin text"]["greedy_identical"], gaps
    # image: the plugin takes the modality path and matches our runtime position by position (float32; measured
    # 5e-7), and the plain export matches our text path; the modality path's effect is the same in both
    assert effect["ours_max"] > 1e-3 and effect["vllm_max"] > 1e-3, effect
    assert gaps["plugin image"]["max_abs_dlogp"] < 1e-4 and gaps["plugin image"]["greedy_identical"], gaps
    assert gaps["plain vs ours-text-path image"]["max_abs_dlogp"] < 1e-4, gaps
    assert effect["max_abs_difference"] < 1e-4, effect


def test_masquant_plugin_in_bfloat16(tmp_path, vllm_py):
    """bfloat16, the dtype a bf16 checkpoint is served in (and on AMX CPUs the one vLLM's int8 AMX kernel
    takes): the plugin loads, takes the modality path on the image prompt, and leaves the text prompt bit for
    bit as stock vLLM serves it.  Not compared position by position with our runtime: bf16 accumulation noise
    (0.02-0.05 nats/token measured on this tiny model) is the size of its modality effect (0.03-0.07)."""
    from mmcompress.export.compressed_tensors import export_compressed_tensors

    art, tok, proc = _artifact(tmp_path, "w8a8")
    export_compressed_tensors(art, tmp_path / "ct")
    image = tmp_path / "image.png"
    make_image(3).save(image)
    embeds = _image_embeds(art, proc, image, tmp_path / "image_embeds.safetensors")
    requests = [{"prompt": TEXT_PROMPT, "image": None},
                {"prompt": IMAGE_PROMPT, "image": str(image), "image_embeds": str(embeds)}]
    plugin = _run(vllm_py, tmp_path / "ct", requests, None, "plugin-bf16", dtype="bfloat16")
    plain = _run(vllm_py, tmp_path / "ct", requests, "compressed-tensors", "plain-bf16", dtype="bfloat16")
    print(f"\n[vllm plugin bf16] modality_calls={plugin['plugin']['modality_calls']} "
          f"image gap plugin-plain={_gap(plugin['results'][1], plain['results'][1])}")
    assert plugin["quantization"] == "mmcompress-masquant" and plugin["plugin"]["modality_calls"] > 0
    assert plugin["results"][0]["prompt_logprobs"] == plain["results"][0]["prompt_logprobs"]
    assert plugin["results"][0]["greedy"] == plain["results"][0]["greedy"]
    assert plugin["results"][1]["prompt_logprobs"] != plain["results"][1]["prompt_logprobs"]
