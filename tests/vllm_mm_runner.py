"""Run text and image requests on one export under vLLM (run by the vLLM venv's python, not by pytest).

    VLLM_PYTHON tests/vllm_mm_runner.py JOB.json RESULT.json

``JOB.json``: ``model`` (export directory), ``quantization`` (``null``: what vLLM/the plugin picks;
``"compressed-tensors"``: the plain export even with the mmcompress plugin installed), ``requests``
(``{"prompt": text, "image": PNG path or null, "image_embeds": safetensors path or null, "audio": 16 kHz mono
16-bit WAV path or null}``; the
latter holds ``image_embeds`` ``[tokens, hidden]`` and ``image_grid_thw`` ``[1, 3]``), ``max_tokens``, ``dtype``;
optional ``prompt_logprobs`` (default true), ``ignore_eos`` (default true: exactly ``max_tokens`` tokens;
false: stop at the model's end-of-sequence token, as ``generate`` does), ``max_model_len`` (512).
``RESULT.json``: per request the expanded ``prompt_token_ids`` (image placeholders as vLLM's processor
expanded them), ``prompt_logprobs`` (log-prob of tokens 1..n-1; empty when not asked), ``greedy`` ids and
their ``text``; ``quantization`` (the method vLLM used), ``plugin`` (the plugin's counters: layers wrapped,
forwards that took the modality path), ``cpu_int8_kernel``, ``load_s`` / ``run_s``.
Imports nothing from mmcompress except, when installed, the plugin's counters.
"""

import json
import sys
import time


def _wav(path: str):
    """A 16-bit PCM WAV file as (float32 samples in [-1, 1], sampling rate), what vLLM's audio input takes."""
    import wave

    import numpy as np

    with wave.open(path, "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return pcm.astype(np.float32) / 32767, w.getframerate()


def main(job_path: str, result_path: str) -> None:
    import torch

    if hasattr(torch.cpu, "_init_amx"):  # see vllm_runner.py: vLLM's AMX attention does not ask for AMX tiles
        torch.cpu._init_amx()
    from PIL import Image
    from vllm import LLM, SamplingParams
    import vllm

    job = json.loads(open(job_path).read())
    if job.get("dtype", "float32") == "float32" and torch.cpu._is_amx_tile_supported():
        # vLLM 0.32 on AMX CPUs sends int8 W8A8 layers to its AMX kernel by the *weight* dtype, and that kernel
        # takes only bfloat16/half activations (``int8_scaled_mm_with_quant: expect A to be bfloat16 or
        # half``): float32 serving fails, plugin or not.  Route them to vLLM's oneDNN int8 kernel, the one it
        # runs on every CPU without AMX, so the comparison stays in float32 (engine in-process: this patch
        # reaches it).  ``result["cpu_int8_kernel"]`` records it.
        from vllm.model_executor.kernels.linear.scaled_mm import cpu as scaled_mm_cpu

        scaled_mm_cpu.check_cpu_sgl_kernel = lambda n, k, dtype: False
        job["cpu_int8_kernel"] = "onednn (AMX int8 kernel refuses float32)"
    t0 = time.perf_counter()
    kwargs = {"quantization": job["quantization"]} if job.get("quantization") else {}
    llm = LLM(model=job["model"], max_model_len=job.get("max_model_len", 512), enforce_eager=True,
              dtype=job.get("dtype", "float32"), seed=0, distributed_executor_backend="uni",
              limit_mm_per_prompt={"image": 1, "video": 0, "audio": 1}, enable_mm_embeds=True, **kwargs)
    load_s = time.perf_counter() - t0
    inputs = []
    for r in job["requests"]:
        item = {"prompt": r["prompt"]}
        if r.get("image_embeds"):  # precomputed vision-tower output: both sides feed the decoder the same
            from safetensors.torch import load_file

            item["multi_modal_data"] = {"image": load_file(r["image_embeds"])}
        elif r.get("image"):
            item["multi_modal_data"] = {"image": Image.open(r["image"]).convert("RGB")}
        if r.get("audio"):
            item.setdefault("multi_modal_data", {})["audio"] = _wav(r["audio"])
        inputs.append(item)
    t0 = time.perf_counter()
    want_lps = job.get("prompt_logprobs", True)
    params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, prompt_logprobs=0 if want_lps else None,
                            ignore_eos=job.get("ignore_eos", True))
    outs = llm.generate(inputs, params, use_tqdm=False)
    results = []
    for o in outs:
        ids = list(o.prompt_token_ids)
        lps = [o.prompt_logprobs[i][t].logprob for i, t in enumerate(ids) if i > 0] if want_lps else []
        results.append({"prompt_token_ids": ids, "prompt_logprobs": lps, "greedy": list(o.outputs[0].token_ids),
                        "text": o.outputs[0].text})
    try:
        from mmcompress.vllm_plugin._impl import _STATE

        plugin = {"wrapped": _STATE["wrapped"], "modality_calls": _STATE["modality_calls"]}
    except ImportError:
        plugin = None
    try:
        quantization = llm.llm_engine.vllm_config.model_config.quantization
    except AttributeError:
        quantization = None
    result = {"vllm_version": vllm.__version__, "quantization": quantization, "plugin": plugin,
              "cpu_int8_kernel": job.get("cpu_int8_kernel"),
              "results": results, "load_s": load_s, "run_s": time.perf_counter() - t0}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns its engine process: the entry point must be guarded
    main(*sys.argv[1:3])
