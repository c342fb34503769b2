"""Real testbed models under vLLM's CPU build next to our runtime: agreement table and serving throughput.

    export MMCOMPRESS_VLLM_PYTHON=/path/to/.venv-vllm/bin/python     # benchmarks/vllm_env.sh
    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vllm_real.py agree --work /tmp/vllm-real
    PYTHONPATH=src HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 nice -n 10 python benchmarks/vllm_real.py serve --work /tmp/vllm-real

``agree``: per testbed model (smollm2-135m, qwen2.5-0.5b) and scheme (W8A8, W4A16 group 64 asymmetric, W4A8
per channel; RTN), the artifact and its compressed-tensors export (``tests/test_vllm.real_case``: held-out
wiki windows 8 x 256 tokens, prompts 8 x 32 tokens), vLLM's prompt log-probs and 16-token greedy
continuations (bf16), our runtime's on the same artifact and ids (bf16), and, when greedy identity is no
majority (the test's fallback criterion), the noise floor: our runtime float32 vs bfloat16
(``tests/test_vllm.noise_floor``).  The same vLLM process then takes the serving table's measurement (below),
so ``serve`` reuses it.  ``serve``: decode throughput of a fixed batch (``--batch`` prompts of 32 wiki
tokens, ``--tokens`` new tokens each, ``ignore_eos``) in vLLM (bf16, batch 1 and ``--batch``; generated
tokens / wall time, prefill included), and ``mmcompress bench decode ARTIFACT --json`` (batch 1, our
integer runtime; 1 / median decode step, prefill excluded) on the same artifacts; dense rows: vLLM serves
the testbed model directory itself, ours is that run's ``engine_bf16`` variant (the artifact's weights
dequantized into bf16 ``nn.Linear``s: the dense model's shapes and cost).  Each measurement is cached as
JSON in ``--work`` (delete a file to redo it) and the load average (``/proc/loadavg``) is recorded before
each.  No ``nice`` inside: the caller's applies to vLLM and ours alike.  The tables are printed as markdown.
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
    from mmcompress_testbed import registry
    from tests.test_vllm import REAL_SCHEMES, _env, real_case, vllm_python

    py = vllm_python()
    rows = []
    for model in models:
        dense = registry.fetch(model, progress=False)
        prompts = serve_prompts(model, batch)
        for name in ["dense"] + list(schemes or REAL_SCHEMES):
            if name == "dense":
                art = export = dense
            else:
                art, export = real_case(model, name, work)[:2]

            def vl():
                job, res = work / f"{model}-{name}.serve.job.json", work / f"{model}-{name}.serve.tmp.json"
                tp = {"prompts": prompts, "batches": [1, batch]}
                job.write_text(json.dumps({"model": str(export), "windows": [], "prompts": [], "max_tokens": tokens,
                                           "dtype": "bfloat16", "throughput": tp}))
                load = _load()
                p = subprocess.run([py, str(ROOT / "tests" / "vllm_runner.py"), str(job), str(res)],
                                   capture_output=True, text=True, env=dict(_env(), OMP_NUM_THREADS=str(threads)))
                if p.returncode != 0:
                    raise RuntimeError((p.stdout + p.stderr)[-3000:])
                return dict(json.loads(res.read_text())["throughput"], load=load)

            def ou():
                load = _load()
                cmd = [sys.executable, "-m", "mmcompress.cli", "bench", "decode", str(art), "--json", "--tokens",
                       str(tokens), "--prompt", "32", "--rounds", "2", "--threads", str(threads)]
                p = subprocess.run(cmd, capture_output=True, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
                if p.returncode != 0:
                    raise RuntimeError((p.stdout + p.stderr)[-3000:])
                return dict(json.loads(p.stdout.strip().splitlines()[-1]), load=load)

            agreed = work / f"{model}-{name}.vllm.json"  # `agree` measured it in its vLLM run (same job)
            a = json.loads(agreed.read_text()) if agreed.is_file() else {}
            same = a.get("throughput", {}).get("max_tokens") == tokens and str(batch) in a["throughput"]["tok_s"]
            v = dict(a["throughput"], load=a["load"]) if same else _cached(work / f"{model}-{name}.serve.vllm.json", vl)
            o = _cached(work / f"{model}-{name}.serve.ours.json", ou) if name != "dense" else None
            rows.append((model, name, v, o))
            print(f"[vllm-serve] {model} {name}: vllm {json.dumps(v)} ours {json.dumps(o)}", flush=True)
    print(f"\n| model | variant | vLLM tok/s, batch 1 | vLLM tok/s, batch {batch} | ours tok/s, batch 1 "
          "(bench decode) | load avg (vLLM / ours) |")
    print("|---|---|---|---|---|---|")
    for i, (model, name, v, o) in enumerate(rows):
        b1, bn = v["tok_s"]["1"], v["tok_s"][str(batch)]
        if o is None:  # dense: our engine's bf16 dense variant, measured in the next row's (the first artifact's) run
            nxt = rows[i + 1][3] if i + 1 < len(rows) and rows[i + 1][0] == model else None
            ot, lo = (nxt["variants_tok_s"]["engine_bf16"], nxt["load"]) if nxt else ("—", "—")
        else:
            ot, lo = o["tok_s"], o["load"]
        print(f"| {model} | {name} | {b1:.1f} | {bn:.1f} | {ot} | {v['load']} / {lo} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("agree", "serve"))
    ap.add_argument("--work", type=Path, required=True, help="artifacts, exports and cached measurements")
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--schemes", nargs="+", default=None, help="w8a8 w4a16 w4a8 (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.what == "agree":
        agree(a.work, a.models, a.schemes, a.batch, a.tokens, a.threads)
    else:
        serve(a.work, a.models, a.schemes, a.batch, a.tokens, a.threads)


if __name__ == "__main__":  # vLLM spawns processes: guard the entry point
    main()
