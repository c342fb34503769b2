"""Run one export under vLLM and write what it computed (run by the vLLM venv's python, not by pytest).

    VLLM_PYTHON tests/vllm_runner.py JOB.json RESULT.json

``JOB.json``: ``model`` (a compressed-tensors export directory), ``windows`` (token-id lists whose
prompt log-probs are wanted), ``prompts`` (token-id lists continued greedily), ``max_tokens``,
``dtype`` (vLLM's ``dtype``), optional ``max_model_len`` (512) and ``skip_tokenizer_init`` (default true; a
multimodal model's processor needs the tokenizer, e.g. Qwen2.5-Omni).  ``RESULT.json``: ``prompt_logprobs``
(per window, the log-prob of tokens 1..n-1 given their prefix), ``greedy`` (generated ids per prompt),
``vllm_version``, ``load_s``, ``run_s``. Optional ``throughput``: ``{"prompts": [...], "batches": [1, 8]}``:
per batch size ``b``, ``prompts[:b]`` are generated together (``max_tokens`` new tokens each,
``ignore_eos``; ``throughput.max_tokens`` when given, else ``max_tokens``) after one untimed warm-up call, and
``throughput.tok_s[b]`` = generated tokens / wall time (prefill included). Token ids in, token ids out (``skip_tokenizer_init``), so tokenizers never differ
between the two venvs. This file imports nothing from mmcompress: vLLM pins its own torch / transformers,
and mmcompress is not installed in its venv.
"""

import json
import sys
import time


def main(job_path: str, result_path: str) -> None:
    import torch
    # Linux hands AMX tiles only to a process that asked for them (arch_prctl ARCH_REQ_XCOMP_PERM).  vLLM
    # 0.32's CPU attention picks its AMX kernel for bfloat16 on AMX machines without asking; a oneDNN call
    # (e.g. W8A8's int8 GEMM) asks on its behalf, but a model with none (W4A8, W4A16) dies with SIGILL in
    # cpu_attention_with_kv_cache.  Ask first; a no-op (False) on CPUs without AMX.
    if hasattr(torch.cpu, "_init_amx"):
        torch.cpu._init_amx()
    from vllm import LLM, SamplingParams
    import vllm

    job = json.loads(open(job_path).read())
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], max_model_len=job.get("max_model_len", 512), enforce_eager=True,
              dtype=job.get("dtype", "auto"), skip_tokenizer_init=job.get("skip_tokenizer_init", True), seed=0, distributed_executor_backend="uni")
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    windows = [{"prompt_token_ids": w} for w in job["windows"]]
    outs = llm.generate(windows, scoring, use_tqdm=False) if windows else []
    logprobs = []
    for w, o in zip(job["windows"], outs):
        logprobs.append([o.prompt_logprobs[i][tok].logprob for i, tok in enumerate(w) if i > 0])
    greedy_params = SamplingParams(max_tokens=job["max_tokens"], temperature=0.0, detokenize=False, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    outs = llm.generate(prompts, greedy_params, use_tqdm=False) if prompts else []
    greedy = [list(o.outputs[0].token_ids) for o in outs]
    result = {"vllm_version": vllm.__version__, "prompt_logprobs": logprobs, "greedy": greedy,
              "load_s": load_s, "run_s": time.perf_counter() - t0}
    try:  # the quantization method vLLM picked (the MASQuant plugin's name for a MASQuant export)
        result["quantization"] = llm.llm_engine.vllm_config.model_config.quantization
    except AttributeError:
        pass
    if job.get("throughput"):
        tp = job["throughput"]
        greedy_params = SamplingParams(max_tokens=tp.get("max_tokens", job["max_tokens"]), temperature=0.0,
                                       detokenize=False, ignore_eos=True)
        llm.generate([{"prompt_token_ids": tp["prompts"][0]}], greedy_params, use_tqdm=False)  # warm-up
        tok_s, wall = {}, {}
        for b in tp["batches"]:
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in tp["prompts"][:b]], greedy_params, use_tqdm=False)
            wall[b] = time.perf_counter() - t0
            tok_s[b] = sum(len(o.outputs[0].token_ids) for o in outs) / wall[b]
        result["throughput"] = {"tok_s": tok_s, "wall_s": wall, "max_tokens": greedy_params.max_tokens,
                                "prompt_tokens": len(tp["prompts"][0])}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns its engine process: the entry point must be guarded
    main(*sys.argv[1:3])
