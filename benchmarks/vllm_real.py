"""Real testbed models under vLLM's CPU build next to our runtime: agreement table and serving throughput.

    export MMCOMPRESS_VLLM_PYTHON=/path/to/.venv-vllm/bin/python     # benchmarks/vllm_env.sh
    export PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
    nice -n 10 python benchmarks/vllm_real.py agree --work /tmp/vllm-real
    nice -n 10 python benchmarks/vllm_real.py prepare --work /tmp/vllm-real      # the serving table's artifacts
    flock /tmp/measure.lock python benchmarks/vllm_real.py serve --work /tmp/vllm-real --models smollm2-135m

``agree``: per testbed model (smollm2-135m, qwen2.5-0.5b) and scheme (W8A8, W4A16 group 64 asymmetric, W4A8
per channel; RTN), the artifact and its compressed-tensors export (``tests/test_vllm.real_case``: held-out
wiki windows 8 x 256 tokens, prompts 8 x 32 tokens), vLLM's prompt log-probs and 16-token greedy
continuations (bf16), our runtime's on the same artifact and ids (bf16), and, when greedy identity is no
majority (the test's fallback criterion), the noise floor: our runtime float32 vs bfloat16
(``tests/test_vllm.noise_floor``).  Each measurement is cached as JSON in ``--work`` (delete a file to redo it).

``prepare`` builds (main venv) and ``serve`` measures the serving table's rows (:data:`SERVE_VARIANTS`):
smollm2-135m and qwen2.5-0.5b dense bf16 / RTN W8A8 / W4A16 (g64, asymmetric) / W4A8 (per channel); omni-mini
(Qwen2.5-Omni thinker; vLLM serves its exports in the full Omni layout) dense bf16 / RTN W8A8 / MASQuant W8A8
through the mmcompress plugin (:func:`serve_case`).  Per row, back to back: vLLM (``tests/vllm_runner.py``:
``LLM(..., dtype="bfloat16", enforce_eager=True)``, ``--batch`` prompts of 32 held-out wiki tokens, ``--tokens``
new tokens each with ``ignore_eos``, one untimed warm-up, then batch 1 (the first prompt) and batch ``--batch``;
tok/s = generated tokens / wall time of one ``generate`` call, prefill included), then our runtime on the
directory vLLM's export was made from (the artifact; dense: the bf16 copy): ``mmcompress bench decode``'s
``compressed`` variant alone (``DecodeEngine``, the first prompt, one warm-up, 2 rounds; tok/s = 1 / median
decode step, prefill excluded).  Text prompts only: for omni-mini the plugin's modality path (image/audio
prompt tokens) is not exercised, decode is text in both runtimes.  The 1-minute load average is recorded before
and after each measurement; vLLM's and our logs are kept next to the cached JSON in ``--work``.  No ``nice``
inside: the caller's applies to vLLM and ours alike.  The tables are printed as markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("smollm2-135m", "qwen2.5-0.5b")
#: the serving table's rows per model: RTN W8A8 / W4A16 (group 64, asymmetric) / W4A8 (per channel) for the text
#: models; omni-mini (Qwen2.5-Omni thinker, served by vLLM in the full Omni layout): RTN W8A8 and MASQuant W8A8
#: (tests/test_vllm_plugin.VL_QUANTIZE, exported with --requantize, served through the plugin)
SERVE_VARIANTS = {"smollm2-135m": ("dense", "w8a8", "w4a16", "w4a8"),
                  "qwen2.5-0.5b": ("dense", "w8a8", "w4a16", "w4a8"),
                  "omni-mini": ("dense", "w8a8", "masquant-w8a8")}
_SIDE_FILES = ("chat_template.jinja", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json")


def _load() -> str:
    return open("/proc/loadavg").read().split()[0]


def _cached(path: Path, fn):
    if path.is_file():
        return json.loads(path.read_text())
    res = fn()
    path.write_text(json.dumps(res))
    return res


def serve_prompts(model: str, batch: int) -> list[list[int]]:
    """The serving table's fixed batch: ``batch`` prompts of 32 held-out wiki tokens."""
    from mmcompress_testbed import registry
    from mmcompress_testbed.data import eval_text
    from mmcompress.models.loading import load_tokenizer

    held = load_tokenizer(registry.fetch(model, progress=False))(eval_text("wiki")[:100_000])["input_ids"]
    return [held[i:i + 32] for i in range(500, 500 + batch * 1999, 1999)]


def _copy_side_files(src: Path, dst: Path) -> None:
    import shutil

    for f in _SIDE_FILES:
        if (src / f).is_file() and not (dst / f).is_file():
            shutil.copy(src / f, dst / f)


def serve_case(model: str, name: str, work: Path) -> tuple[Path, Path]:
    """(directory our runtime decodes, directory vLLM serves) of the serving table's row ``model`` / ``name``
    under ``work`` (built when absent, with the caller's venv: the main one).  ``dense``: the testbed model
    cast to bf16 (``save_pretrained``; for omni-mini vLLM gets a copy rewritten into the Omni layout,
    ``nest_in_container``); ``w8a8`` / ``w4a16`` / ``w4a8``: RTN artifact and compressed-tensors export
    (``tests/test_vllm.real_case``; omni-mini: the same RTN, tokenizer and processor files copied, exported in
    the Omni layout); ``masquant-w8a8``: ``tests/test_vllm_plugin.masquant_w8a8_case``."""
    import torch

    import mmcompress
    from mmcompress.data import CalibrationSet
    from mmcompress.export.compressed_tensors import export_compressed_tensors, nest_in_container
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model
    from mmcompress.quant.quantizer import resolve_scheme
    from mmcompress_testbed import registry

    src = registry.fetch(model, progress=False)
    if name == "masquant-w8a8":
        from tests.test_vllm_plugin import masquant_w8a8_case

        return masquant_w8a8_case(work, model)
    if name == "dense":
        ours = work / f"{model}-dense-bf16"
        if not (ours / "config.json").is_file():
            load_hf_model(src, dtype=torch.bfloat16).save_pretrained(ours)
            _copy_side_files(src, ours)
        if model != "omni-mini":
            return ours, ours
        vl = work / f"{model}-dense-bf16-omni"
        if not (vl / "config.json").is_file():
            import shutil

            shutil.copytree(ours, vl)
            nest_in_container(vl, get_adapter(load_hf_model(ours, dtype=torch.bfloat16)).container)
        return ours, vl
    if model != "omni-mini":
        from tests.test_vllm import real_case

        return real_case(model, name, work)[:2]
    art, export = work / f"{model}-{name}", work / f"{model}-{name}-ct"
    if not (art / "mmcompress.json").is_file():
        m = load_hf_model(src)
        ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
        mmcompress.quantize(m, CalibrationSet([{"input_ids": ids}]), "rtn", resolve_scheme(name),
                            progress=False)  # RTN reads no activations
        mmcompress.save(m, art)
        _copy_side_files(src, art)
    if not (export / "config.json").is_file():
        export_compressed_tensors(art, export)
    return art, export


_OURS = """
import json, statistics, sys, time, torch
from mmcompress.export.serialization import is_artifact, load
from mmcompress.models.loading import load_hf_model
from mmcompress.runtime.decode import DecodeEngine
path, tokens, rounds = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
prompt = len(json.loads(sys.argv[6]))
torch.set_num_threads(int(sys.argv[5]))
t0 = time.time()
with torch.no_grad():
    model = load(path) if is_artifact(path) else load_hf_model(path, dtype="auto")
    eng = DecodeEngine(model, max_len=prompt + tokens)
    ids = torch.tensor([json.loads(sys.argv[6])])  # vLLM's batch-1 prompt
    build_s = time.time() - t0
    eng.generate(ids, 4)  # warm-up
    steps = []
    for _ in range(rounds):
        tm = {}
        eng.generate(ids, tokens, timings=tm)
        steps += tm["step_s"]
print(json.dumps({"tok_s": round(1 / statistics.median(steps), 3), "decode_path": eng.path, "fused": eng.fused,
                  "build_s": round(build_s, 1), "steps": len(steps), "threads": torch.get_num_threads()}))
"""


def agree(work: Path, models, schemes, batch: int, tokens: int, threads: int) -> None:
    from tests.test_vllm import (FLOOR_SLACK, GREEDY_MIN, PPL_TOL, REAL_SCHEMES, agreement, noise_floor, ours,
                                 real_case, run_vllm, vllm_python)

    py = vllm_python()
    if py is None:
        sys.exit("vLLM python not found: set MMCOMPRESS_VLLM_PYTHON (benchmarks/vllm_env.sh)")
    rows = []
    for model in models:
        for name in schemes or REAL_SCHEMES:
            case = real_case(model, name, work)
            if case is None:
                print(f"{model}: not in the testbed cache", file=sys.stderr)
                continue
            art, export, windows, prompts = case

            def vl():  # the serving table's vLLM measurement rides along (one vLLM start instead of two)
                load = _load()
                tp = {"prompts": serve_prompts(model, batch), "batches": [1, batch], "max_tokens": tokens}
                v = run_vllm(py, export, windows, prompts, throughput=tp, env={"OMP_NUM_THREADS": str(threads)})
                return dict(v, load=load)

            v = _cached(work / f"{model}-{name}.vllm.json", vl)
            o = _cached(work / f"{model}-{name}.ours.json", lambda: dict(ours(art, windows, prompts), load=_load()))
            r = agreement(o, v)
            # the floor (ours fp32 vs bf16) is what the test falls back on when greedy identity is no majority;
            # measured only then (it costs a second float32 pass of our runtime)
            floor_file = work / f"{model}-{name}.floor.json"
            f = _cached(floor_file, lambda: noise_floor(art, windows, prompts, o)) \
                if r["greedy_identical"] <= GREEDY_MIN or floor_file.is_file() else None
            # the criteria of tests/test_vllm.check
            ok = (any(k == REAL_SCHEMES[name] for k, _ in v["kernels"]) and r["ppl_rel"] < PPL_TOL
                  and (r["greedy_identical"] > GREEDY_MIN or (
                      f is not None and r["mean_abs_dlogp"] <= FLOOR_SLACK * f["mean_abs_dlogp"]
                      and r["greedy_mean_prefix"] >= f["greedy_mean_prefix"] / FLOOR_SLACK)))
            r["test_criteria"] = "pass" if ok else "FAIL"
            rows.append((model, name, r, f, v["kernels"], v["load"], o["load"]))
            print(f"[vllm-real] {model} {name}: " + json.dumps({**r, "floor": f, "kernels": v["kernels"]}), flush=True)
    print("\n| model | export | vLLM kernel | ppl ours | ppl vLLM | rel. gap | mean / max abs d log p | greedy "
          "identical | mean common prefix (/16) | floor: ours fp32 vs bf16 (rel. ppl gap, mean abs d log p, "
          "identical, prefix) | test criteria | load avg (vLLM / ours) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, name, r, f, kernels, lv, lo in rows:
        k = ", ".join(sorted({a for a, b in kernels if b != "EOS"}))
        floor = "—" if f is None else (f"{100 * f['ppl_rel']:.2f} %, {f['mean_abs_dlogp']:.3f}, "
                                       f"{round(f['greedy_identical'] * r['prompts'])}/{r['prompts']}, "
                                       f"{f['greedy_mean_prefix']:.1f}")
        print(f"| {model} | {name} | {k} | {r['ppl_ours']:.3f} | {r['ppl_vllm']:.3f} | {100 * r['ppl_rel']:.2f} % | "
              f"{r['mean_abs_dlogp']:.3f} / {r['max_abs_dlogp']:.2f} | {round(r['greedy_identical'] * r['prompts'])}"
              f"/{r['prompts']} | {r['greedy_mean_prefix']:.1f} | {floor} | {r['test_criteria']} | {lv} / {lo} |")


def serve(work: Path, models, schemes, batch: int, tokens: int, threads: int) -> None:
    from tests.test_vllm import _env, vllm_python

    py = vllm_python()
    if py is None:
        sys.exit("vLLM python not found: set MMCOMPRESS_VLLM_PYTHON (benchmarks/vllm_env.sh)")
    rows = []
    for model in models:
        prompts = serve_prompts(model, batch)
        for name in [n for n in SERVE_VARIANTS[model] if not schemes or n in schemes]:
            art, export = serve_case(model, name, work)

            def vl():
                job, res = work / f"{model}-{name}.serve.job.json", work / f"{model}-{name}.serve.tmp.json"
                tp = {"prompts": prompts, "batches": [1, batch]}
                job.write_text(json.dumps({"model": str(export), "windows": [], "prompts": [], "max_tokens": tokens,
                                           "dtype": "bfloat16", "throughput": tp,
                                           # vLLM's Qwen2.5-Omni processor refuses to start without a tokenizer
                                           "skip_tokenizer_init": model != "omni-mini"}))
                load = _load()
                p = subprocess.run([py, str(ROOT / "tests" / "vllm_runner.py"), str(job), str(res)],
                                   capture_output=True, text=True, env=dict(_env(), OMP_NUM_THREADS=str(threads)))
                (work / f"{model}-{name}.serve.vllm.log").write_text(p.stdout + p.stderr)
                if p.returncode != 0:
                    raise RuntimeError((p.stdout + p.stderr)[-3000:])
                r = json.loads(res.read_text())
                return dict(r["throughput"], quantization=r.get("quantization"), plugin=r.get("plugin"),
                            load_s=r["load_s"], load=load, load_after=_load())

            def ou():
                # `mmcompress bench decode`'s "compressed" variant alone (the CLI also builds and times five
                # dense, Python-step and HF generate variants): DecodeEngine on the directory, 1 / median step
                load = _load()
                p = subprocess.run([sys.executable, "-c", _OURS, str(art), "32", str(tokens), "2", str(threads),
                                    json.dumps(prompts[0])],
                                   capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                (work / f"{model}-{name}.serve.ours.log").write_text(p.stdout + p.stderr)
                if p.returncode != 0:
                    raise RuntimeError((p.stdout + p.stderr)[-3000:])
                return dict(json.loads(p.stdout.strip().splitlines()[-1]), load=load, load_after=_load())

            v = _cached(work / f"{model}-{name}.serve.vllm.json", vl)  # vLLM, then ours, back to back
            o = _cached(work / f"{model}-{name}.serve.ours.json", ou)
            rows.append((model, name, v, o))
            print(f"[vllm-serve] {model} {name}: vllm {json.dumps(v)} ours {json.dumps(o)}", flush=True)
    print(f"\n| model | variant | vLLM quantization | vLLM tok/s, batch 1 | vLLM tok/s, batch {batch} | ours tok/s, "
          "batch 1 (decode path) | load avg 1 min, before / after (vLLM; ours) |")
    print("|---|---|---|---|---|---|---|")
    for model, name, v, o in rows:
        b1, bn = v["tok_s"]["1"], v["tok_s"][str(batch)]
        q = v.get("quantization") or "—"
        path = o["decode_path"] + (", fused step" if o.get("fused") else "")
        print(f"| {model} | {name} | {q} | {b1:.2f} | {bn:.2f} | {o['tok_s']:.2f} ({path}) | "
              f"{v['load']} / {v.get('load_after', '?')}; {o['load']} / {o.get('load_after', '?')} |")


def prepare(work: Path, models, schemes) -> None:
    for model in models:
        for name in [n for n in SERVE_VARIANTS[model] if not schemes or n in schemes]:
            print(model, name, *serve_case(model, name, work), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("agree", "prepare", "serve"))
    ap.add_argument("--work", type=Path, required=True, help="artifacts, exports and cached measurements")
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"default: {' '.join(MODELS)} (agree), {' '.join(SERVE_VARIANTS)} (prepare, serve)")
    ap.add_argument("--schemes", nargs="+", default=None,
                    help="agree: w8a8 w4a16 w4a8; prepare / serve: also dense, masquant-w8a8 (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.models = a.models or list(MODELS if a.what == "agree" else SERVE_VARIANTS)
    if a.what == "agree":
        agree(a.work, a.models, a.schemes, a.batch, a.tokens, a.threads)
    elif a.what == "prepare":
        prepare(a.work, a.models, a.schemes)
    else:
        serve(a.work, a.models, a.schemes, a.batch, a.tokens, a.threads)


if __name__ == "__main__":  # vLLM spawns processes: guard the entry point
    main()
