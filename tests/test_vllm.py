"""Exports served by vLLM's CPU build (``pytest -m vllm``; real models: ``pytest -m "vllm and real"``).

vLLM lives in its own venv (``benchmarks/vllm_env.sh``, default ``.venv-vllm``; another interpreter with
``MMCOMPRESS_VLLM_PYTHON``): it pins torch / transformers, so mmcompress is not installed there.  Each
test quantizes and exports here, then runs ``tests/vllm_runner.py`` in that venv (token ids in and out)
and compares with our own runtime on the same artifact (``mmcompress.load``, in vLLM's dtype):

* perplexity of the prompt log-probs on held-out windows within 1 %;
* greedy continuations over ``MAX_TOKENS`` tokens: real models, more than half of the prompts identical;
  the tiny random model (argmax margins near zero: identical continuations measured 33-75 %), a mean
  common prefix of at least half the tokens.  All rates are printed.

vLLM's CPU WNA16 kernel has no float32 path (``cpu_gemm_wna16 not implemented for 'Float'``), so both
sides run in bfloat16 (the tiny float32 models are cast); the gap contains the two implementations'
different bf16 accumulation order and, for W8A8, activation codes that round differently.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmcompress
from mmcompress.data import CalibrationSet

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("vllm_runner.py")
MAX_TOKENS = 16
PPL_TOL = 0.01
GREEDY_MIN = 0.5  # "most prompts": strictly more than half identical
FLOOR_SLACK = 1.5  # real activation-quantized exports: vLLM vs ours within 1.5x of ours fp32 vs ours bf16


@functools.cache
def vllm_python() -> str | None:
    """The vLLM venv's python when it imports vllm, else None (the reason is in :func:`_skip_reason`)."""
    py = os.environ.get("MMCOMPRESS_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(py).is_file():
        return None
    ok = subprocess.run([py, "-c", "import vllm"], capture_output=True, env=_env(), timeout=600).returncode == 0
    return py if ok else None


def _skip_reason() -> str:
    py = os.environ.get("MMCOMPRESS_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    what = "does not exist" if not Path(py).is_file() else "cannot import vllm"
    return f"vLLM python {py} {what}: build it with benchmarks/vllm_env.sh (or set MMCOMPRESS_VLLM_PYTHON)"


@pytest.fixture(scope="module")
def vllm_py():
    py = vllm_python()
    if py is None:
        pytest.skip(_skip_reason())
    return py


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    # in-process engine and no worker process: one interpreter start instead of three; threads not pinned
    # to cores (CI machines are shared); 1 GiB of KV cache is plenty for 512-token requests
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="nobind",
               OMP_NUM_THREADS=os.environ.get("MMCOMPRESS_VLLM_THREADS", "2"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               # torchvision's Python part without its CUDA-built extension (see vllm_shim/sitecustomize.py)
               PYTHONPATH=str(Path(__file__).with_name("vllm_shim")))
    return env


def run_vllm(py: str, export: Path, windows: list[list[int]], prompts: list[list[int]], dtype="bfloat16",
             timeout=1200, throughput: dict | None = None, env: dict | None = None) -> dict:
    """Run the runner on ``export``; returns its result plus ``kernels`` (vLLM's "Using ... Kernel" lines).
    ``throughput``: the runner's optional throughput job (``benchmarks/vllm_real.py``), measured in the same
    vLLM process after the agreement requests; ``env``: overrides of :func:`_env`."""
    job = {"model": str(export), "windows": windows, "prompts": prompts, "max_tokens": MAX_TOKENS, "dtype": dtype,
           **({"throughput": throughput} if throughput else {})}
    return run_job(py, RUNNER, job, export, timeout=timeout, env=env)


def run_job(py: str, runner: Path, job: dict, stem: Path, timeout=1200, env: dict | None = None) -> dict:
    """Write ``job`` to ``stem.job.json``, run ``runner JOB RESULT`` with the vLLM python and :func:`_env`
    (plus ``env``), and return ``stem.result.json`` plus ``kernels`` (vLLM's "Using/Selected ... for ..."
    lines); a failure raises with the log's tail."""
    # not with_suffix: "qwen2.5-0.5b-w8a8-ct" would become "qwen2.5-0.job.json" for every qwen export
    job_path, res = stem.with_name(stem.name + ".job.json"), stem.with_name(stem.name + ".result.json")
    job_path.write_text(json.dumps(job))
    p = subprocess.run([py, str(runner), str(job_path), str(res)], capture_output=True, text=True,
                       env=dict(_env(), **(env or {})), timeout=timeout)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise AssertionError(f"vLLM failed on {job['model']} ({stem.name}, exit {p.returncode}):\n{log[-5000:]}")
    out = json.loads(res.read_text())
    out["kernels"] = sorted(set(re.findall(r"(?:Using|Selected) (\w+) for (\w+)", log)))
    return out


@torch.no_grad()
def ours(artifact: Path, windows: list[list[int]], prompts: list[list[int]], dtype=torch.bfloat16) -> dict:
    """Prompt log-probs and greedy continuations of our runtime on the artifact, in vLLM's dtype."""
    model = mmcompress.load(artifact).to(dtype).eval()
    logprobs = []
    for w in windows:
        ids = torch.tensor([w])
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        logprobs.append(lp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
    greedy = []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             do_sample=False, pad_token_id=0)
        greedy.append(out[0, len(p):].tolist())
    return {"prompt_logprobs": logprobs, "greedy": greedy}


def agreement(a: dict, b: dict) -> dict:
    """Perplexities of both, their relative gap, mean |Δ log p| per token, greedy identity and common prefix."""
    def ppl(lps):
        flat = [x for w in lps for x in w]
        return math.exp(-sum(flat) / len(flat))

    pa, pb = ppl(a["prompt_logprobs"]), ppl(b["prompt_logprobs"])
    diffs = [abs(x - y) for wa, wb in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for x, y in zip(wa, wb)]
    same = [ga == gb for ga, gb in zip(a["greedy"], b["greedy"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), len(ga)) for ga, gb in zip(a["greedy"], b["greedy"])]
    return {"ppl_ours": pa, "ppl_vllm": pb, "ppl_rel": abs(pb - pa) / pa, "mean_abs_dlogp": sum(diffs) / len(diffs),
            "max_abs_dlogp": max(diffs), "greedy_identical": sum(same) / len(same),
            "greedy_mean_prefix": sum(prefix) / len(prefix), "prompts": len(same)}


def check(name: str, art: Path, export: Path, windows, prompts, vllm_py: str, expect_kernel: str,
          tiny: bool = False) -> dict:
    v = run_vllm(vllm_py, export, windows, prompts)
    o = ours(art, windows, prompts)
    r = agreement(o, v)
    r.update(kernels=v["kernels"], vllm_load_s=round(v["load_s"], 1), vllm_run_s=round(v["run_s"], 1))
    print(f"\n[vllm] {name}: " + json.dumps(r, default=str))
    assert any(k == expect_kernel for k, _ in v["kernels"]), v["kernels"]
    assert all(len(g) == MAX_TOKENS for g in v["greedy"])
    assert r["ppl_rel"] < PPL_TOL, r
    if tiny:  # a random model's argmax margins are tiny: most of each continuation, not all of most of them
        assert r["greedy_mean_prefix"] >= MAX_TOKENS / 2, r
    elif r["greedy_identical"] <= GREEDY_MIN:
        # activation-quantized RTN models flip activation codes on rounding differences, so two correct
        # implementations drift apart: then vLLM must stay as close to ours as ours in float32 is to ours in
        # bfloat16 (the same artifact, the same ids)
        floor = noise_floor(art, windows, prompts, o)
        print(f"[vllm] {name} noise floor (ours fp32 vs bf16): " + json.dumps(floor))
        assert r["mean_abs_dlogp"] <= FLOOR_SLACK * floor["mean_abs_dlogp"], (r, floor)
        assert r["greedy_mean_prefix"] >= floor["greedy_mean_prefix"] / FLOOR_SLACK, (r, floor)
    return r


# -- tiny random model ----------------------------------------------------------------------------------


def _tiny_artifact(root: Path, scheme):
    from .tiny_models import _CORPUS, tiny_model

    model, tok = tiny_model("llama", hidden=128, intermediate=256, heads=4, kv_heads=2, layers=2)
    with torch.no_grad():  # random init gives near-uniform next-token distributions: sharpen them (x4) so that
        model.lm_head.weight.mul_(4)  # greedy decoding has margins to agree on (lm_head is not quantized)
    ids = tok(_CORPUS * 8)["input_ids"]
    calib = [{"input_ids": torch.tensor([ids[i:i + 32]])} for i in range(0, 128, 32)]
    mmcompress.quantize(model, CalibrationSet(calib), "rtn", scheme, progress=False)
    art = mmcompress.save(model, root / f"tiny-{scheme.name}")
    tok.save_pretrained(art)
    # held-out windows: the corpus text in another order than calibration saw it
    held = tok(" ".join(reversed(_CORPUS.split())) * 6)["input_ids"]
    windows = [held[i:i + 96] for i in range(0, 4 * 96, 96)]
    prompts = [held[i:i + 12] for i in range(5, 5 + 12 * 23, 23)]
    return art, windows, prompts


@pytest.mark.parametrize("name,group,sym,kernel", [
    ("w8a8", None, None, "CPUInt8ScaledMMLinearKernel"),
    ("w4a16", 128, False, "CPUWNA16LinearKernel"),
    ("w4a16", 0, True, "CPUWNA16LinearKernel"),
    ("w4a8", None, None, "Dynamic4bitLinearKernel"),
    ("w4a8", 128, None, "Dynamic4bitLinearKernel"),
])
def test_tiny_export_in_vllm(tmp_path, vllm_py, name, group, sym, kernel):
    from mmcompress.export.compressed_tensors import export_compressed_tensors
    from mmcompress.quant.quantizer import resolve_scheme

    scheme = resolve_scheme(name, group_size=group, sym=sym)
    art, windows, prompts = _tiny_artifact(tmp_path, scheme)
    export_compressed_tensors(art, tmp_path / "ct")
    check(f"tiny {scheme.name}", art, tmp_path / "ct", windows, prompts, vllm_py, kernel, tiny=True)


# -- real models (testbed) --------------------------------------------------------------------------------


REAL_SCHEMES = {"w8a8": "CPUInt8ScaledMMLinearKernel", "w4a16": "CPUWNA16LinearKernel",
                "w4a8": "Dynamic4bitLinearKernel"}


def real_case(model_name: str, name: str, root: Path):
    """RTN ``name`` artifact (W4A16: group 64, asymmetric) of the testbed model and its compressed-tensors
    export under ``root`` (reused when present), held-out wiki windows (8 x 256 tokens) and prompts (8 x 32
    tokens).  None when the model is not in the testbed cache."""
    from mmcompress.export.compressed_tensors import export_compressed_tensors
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.quant.quantizer import resolve_scheme
    from mmcompress_testbed import registry
    from mmcompress_testbed.data import eval_text

    if not (registry.cache_root() / model_name / "testbed.json").is_file() and not os.environ.get("MMCOMPRESS_TESTBED_ALL"):
        return None
    path = registry.fetch(model_name, progress=False)
    tok = load_tokenizer(path)
    held = tok(eval_text("wiki")[:200_000])["input_ids"]
    windows = [held[i:i + 256] for i in range(0, 8 * 4096, 4096)]
    prompts = [held[i:i + 32] for i in range(1000, 1000 + 8 * 3001, 3001)]
    art, export = root / f"{model_name}-{name}", root / f"{model_name}-{name}-ct"
    if not (art / "mmcompress.json").is_file():
        model = load_hf_model(path)
        # W4A16 in groups of 64: vLLM needs whole groups and smollm2's hidden size (576) is no multiple of 128
        scheme = resolve_scheme(name, group_size=64) if name == "w4a16" else resolve_scheme(name)
        mmcompress.quantize(model, CalibrationSet([{"input_ids": torch.tensor([held[-64:]])}]), "rtn", scheme,
                            progress=False)  # RTN reads no activations
        mmcompress.save(model, art)
        tok.save_pretrained(art)
    if not (export / "config.json").is_file():
        export_compressed_tensors(art, export)
    return art, export, windows, prompts


def noise_floor(art: Path, windows, prompts, ours_bf16: dict) -> dict:
    """Our runtime against itself, float32 vs bfloat16, on the same artifact and ids: how far two correct
    implementations of the artifact drift apart from rounding alone (activation-quantized RTN models flip
    activation codes on 1-ulp differences)."""
    a = agreement(ours(art, windows, prompts, torch.float32), ours_bf16)
    return {k: a[k] for k in ("ppl_rel", "mean_abs_dlogp", "max_abs_dlogp", "greedy_identical", "greedy_mean_prefix")}


@pytest.mark.real
@pytest.mark.parametrize("model_name", ["smollm2-135m", "qwen2.5-0.5b"])
@pytest.mark.parametrize("name", list(REAL_SCHEMES))
def test_real_export_in_vllm(tmp_path, vllm_py, model_name, name):
    case = real_case(model_name, name, tmp_path)
    if case is None:
        pytest.skip(f"{model_name} not in the cache (run `mmcompress testbed fetch {model_name}`)")
    art, export, windows, prompts = case
    check(f"{model_name} {name}", art, export, windows, prompts, vllm_py, REAL_SCHEMES[name])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-m", "vllm", "-s"]))
