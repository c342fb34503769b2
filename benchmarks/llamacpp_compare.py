"""Decode tokens/s of our engine next to llama.cpp's at the same bit width, interleaved in one sitting.

    bash benchmarks/llamacpp_env.sh /tmp/llamacpp-venv          # ~6-12 minutes: compiles llama.cpp
    PYTHONPATH=src python benchmarks/llamacpp_compare.py ~/.cache/mmcompress/testbed/smollm2-135m \\
        --llamacpp-venv /tmp/llamacpp-venv --work /tmp/lc-cmp --threads 2 --prompt 16 --tokens 64 --rounds 3 \\
        --out /tmp/lc-cmp/result.json

What it builds in ``--work`` (reused when present):

* our artifacts of MODEL (data-free RTN, ``mmcompress quantize``): W8A8, W8A16 (per-channel int8
  weights), W4A16 (group 64, symmetric), W4A8 (per channel, symmetric);
* GGUF files: llama.cpp's own conversion of MODEL (``convert_hf_to_gguf.py --outtype bf16 / q8_0``, and
  Q4_0 by ``llama_model_quantize`` from the bf16 file), and our exports of the W8A8 artifact (Q8_0) and
  the W4A16 artifact (Q4_0) (``mmcompress export --format gguf``).

Then, for ``--rounds`` rounds, every variant decodes ``--tokens`` greedy tokens after the same
``--prompt``-token prompt, in an order that rotates each round: ours in this process through
:class:`mmcompress.runtime.decode.DecodeEngine` (dense fp32 and bf16 from MODEL, and each artifact on
the integer runtime; the artifacts' LM head as ``--head``, default ``int8``: the fused step's packed int8
copy of the fp32 head, as llama.cpp's files quantize theirs), llama.cpp in a subprocess of its venv (``llamacpp_run.py decode``, one repeat per
call).  Reported per variant: best and median decode tok/s over the rounds (``results``), the same for
the prompt's prefill (``prefill``: prompt tokens / prefill time; ``--prompt 512 --tokens 16`` gives issue
22's prefill row), and the load average
(``/proc/loadavg``) before each round.  The load matters: this machine is shared.

The JSON (stdout, and ``--out``) also holds llama.cpp's system-info line (``AMX_INT8 = 1`` there means a
build with ggml's AMX buffer type, which crashes on Q8_0/Q4_0 in 0.3.36: docs/runtime.md), the greedy
token ids of each llama.cpp file's first run, and, for a llama.cpp variant whose process died, its error
(that variant is then left out of the later rounds instead of ending the comparison).

With ``--only`` only the files and models its variants need are made and loaded (a 1.2 B model's fp32
copy alone is 5 GB); ``--build-only`` makes them and stops.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OURS = {  # name -> quantize flags
    "w8a8": ["--scheme", "w8a8"],
    "w8a16": ["--scheme", "w8a16"],
    "w4a16": ["--scheme", "w4a16", "--group-size", "64", "--sym"],
    "w4a8": ["--scheme", "w4a8"],
}
SAME_BITS = {"w8a8": "llama.cpp Q8_0", "w8a16": "llama.cpp Q8_0", "joint": "llama.cpp Q8_0", "w4a16": "llama.cpp Q4_0", "w4a8": "llama.cpp Q4_0",
             "dense_bf16": "llama.cpp bf16", "dense_fp32": "llama.cpp bf16"}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def summarize(res: dict[str, list[float]]) -> dict:
    """Best, median and every run's tok/s per variant."""
    return {v: {"best_tok_s": round(max(x), 1), "median_tok_s": round(statistics.median(x), 1),
                "runs": [round(t, 1) for t in x]} for v, x in res.items()}


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, **kw)


def wanted(only: set[str], *variants: str) -> bool:
    """Whether ``--only`` (empty: everything) keeps any of ``variants``."""
    return not only or any(v in only for v in variants)


def ours_variants(name: str) -> tuple[str, str]:
    """The variant names that time our model ``name``: the fused step and ``--python-step``'s."""
    return f"ours {name}", f"ours {name} (python step)"


def build(model: Path, work: Path, venv: Path, only: set[str] = frozenset()) -> dict[str, Path]:
    """Our artifacts and the GGUF files in ``work`` (made when missing); with ``only`` (``--only``'s
    variant names) just those its variants need."""
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    env = dict(os.environ)
    exports = {"w8a8": "llama.cpp Q8_0, our w8a8 export", "w4a16": "llama.cpp Q4_0, our w4a16 export"}

    arts = {}
    for name, flags in OURS.items():
        if not wanted(only, *ours_variants(name), exports.get(name, "")):
            continue
        out = work / f"art-{name}"
        if not out.exists():
            run([py, "-m", "mmcompress.cli", "quantize", model, "--method", "rtn", *flags, "--output", out,
                 "--no-progress"], env=env)
        arts[name] = out
    ggufs = {}
    convert = next((venv / "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    for t, needed_by in (("bf16", ("llama.cpp BF16", "llama.cpp Q4_0")), ("q8_0", ("llama.cpp Q8_0",))):
        f = work / f"llamacpp-{t}.gguf"
        if not wanted(only, *needed_by):
            continue
        if not f.exists():
            run([venv / "bin/python", convert, model, "--outtype", t, "--outfile", f], stdout=subprocess.DEVNULL)
        if wanted(only, needed_by[0]):
            ggufs[needed_by[0]] = f
    f = work / "llamacpp-q4_0.gguf"
    if wanted(only, "llama.cpp Q4_0"):
        if not f.exists():
            run([venv / "bin/python", HERE / "llamacpp_run.py", "quantize", work / "llamacpp-bf16.gguf", f, "q4_0"])
        ggufs["llama.cpp Q4_0"] = f
    for name, v in exports.items():
        f = work / f"ours-{name}.gguf"
        if not wanted(only, v):
            continue
        if not f.exists():
            run([py, "-m", "mmcompress.cli", "export", arts[name], "--format", "gguf", "--output", f], env=env)
        ggufs[v] = f
    return {"artifacts": arts, "gguf": ggufs}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--llamacpp-venv", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARTIFACT",
                    help="another artifact of MODEL to time as 'ours NAME' (e.g. joint=DIR, a LaRoSA-40 %% + W8A8 "
                         "compress --recipe artifact, compared with llama.cpp Q8_0)")
    ap.add_argument("--head", choices=("model", "bf16", "int8"), default="int8",
                    help="LM head of our artifacts' fused step (runtime/fused.py; default int8; the dense models "
                         "always use their own)")
    ap.add_argument("--python-step", action="store_true",
                    help="also time each of ours on the engine's Python step (not the fused C++ step)")
    ap.add_argument("--llamacpp-no-extra-bufts", action="store_true",
                    help="load llama.cpp's files with use_extra_bufts=false (no Q4_0 repack, no AMX buffers)")
    ap.add_argument("--out", type=Path, help="also write the JSON result to this file")
    ap.add_argument("--build-only", action="store_true",
                    help="make the files in --work that the run needs (artifacts, GGUF) and stop: run this "
                         "niced before a timing sitting, so the sitting only times")
    a = ap.parse_args()

    import mmcompress
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.runtime.decode import DecodeEngine

    torch.set_num_threads(a.threads)
    only = set(filter(None, a.only.split(",")))
    files = build(a.model, a.work, a.llamacpp_venv, only)
    if a.build_only:
        print(json.dumps({k: {n: str(p) for n, p in v.items()} for k, v in files.items()}))
        return 0
    tok = load_tokenizer(a.model)
    text = "The history of the city begins in the early medieval period, when a small settlement grew around " * 4
    text *= 1 + a.prompt // 64  # about 80 tokens per 4 repeats: enough for any --prompt (512 for the prefill row)
    ids = torch.tensor([tok(text).input_ids[: a.prompt]])
    assert ids.shape[1] == a.prompt, f"the prompt text has only {ids.shape[1]} tokens"
    n = a.prompt + a.tokens
    # with --only, load only the models its variants time
    ours = {k: load_hf_model(a.model, dtype=dt) for k, dt in
            (("dense_fp32", torch.float32), ("dense_bf16", torch.bfloat16)) if wanted(only, *ours_variants(k))}
    extra = dict(e.split("=", 1) for e in a.extra)
    ours.update({name: mmcompress.load(p) for name, p in {**files["artifacts"], **extra}.items()
                 if wanted(only, *ours_variants(name))})
    engines = {k: DecodeEngine(m, max_len=n, head="model" if k.startswith("dense") else a.head)
               for k, m in ours.items()}
    if a.python_step:
        engines.update({f"{k} (python step)": DecodeEngine(ours[k], max_len=n, fused=False)
                        for k, e in list(engines.items()) if e.fused})
    fused = {k: e.fused for k, e in engines.items()}
    for e in engines.values():  # build the fused plans (and the packed heads) before timing
        e.generate(ids, 2)
    heads = {k: (e._fused.head if e._fused is not None else "model") for k, e in engines.items()}
    variants = [f"ours {k}" for k in engines] + list(files["gguf"])
    if only:
        variants = [v for v in variants if v in only]

    lc_info, lc_failed = {}, {}

    def measure(v: str) -> tuple[float, float] | None:
        """(decode tok/s, prefill tok/s of the prompt) of one run of variant ``v``."""
        if v.startswith("ours "):
            tm = {}
            engines[v[5:]].generate(ids, a.tokens, timings=tm)
            return len(tm["step_s"]) / sum(tm["step_s"]), a.prompt / tm["prefill_s"]
        cmd = [a.llamacpp_venv / "bin/python", HERE / "llamacpp_run.py", "decode", files["gguf"][v],
               "--prompt-ids", ",".join(map(str, ids[0].tolist())), "--tokens", a.tokens,
               "--threads", a.threads, "--repeats", 1, "--ctx", n + 8]
        if a.llamacpp_no_extra_bufts:
            cmd.append("--no-extra-bufts")
        p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        if p.returncode != 0:
            lc_failed[v] = f"exit status {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:300]}"
            print(f"  {v}: llama.cpp died ({lc_failed[v]}); left out of the later rounds", file=sys.stderr, flush=True)
            return None
        out = json.loads(p.stdout.strip().splitlines()[-1])
        lc_info.setdefault("system_info", out.get("system_info"))
        lc_info.setdefault("first_ids", {}).setdefault(v, out.get("text_ids"))
        return out["tok_s"], out["prefill_tok_s"]

    for k, e in engines.items():  # warm-up: kernel builds, first-call dispatch
        e.generate(ids, 4)
    res = {v: [] for v in variants}
    pre = {v: [] for v in variants}
    loads = []
    for r in range(a.rounds):
        loads.append(loadavg())
        print(f"round {r + 1}/{a.rounds}, load average {loads[-1]}", file=sys.stderr, flush=True)
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            if v in lc_failed or (t := measure(v)) is None:
                continue
            res[v].append(t[0])
            pre[v].append(t[1])
            print(f"  {v:40s} {t[0]:8.1f} tok/s (prefill {t[1]:.1f} tok/s)", file=sys.stderr, flush=True)
    loads.append(loadavg())
    summary = summarize({v: x for v, x in res.items() if x})
    prefill = summarize({v: x for v, x in pre.items() if x})
    print(f"\n{a.model.name}: {a.tokens} greedy tokens after {a.prompt}, {a.threads} threads, best of {a.rounds} "
          f"(median); load averages {loads}", file=sys.stderr)
    for v, s in summary.items():
        print(f"  {v:40s} {s['best_tok_s']:8.1f} ({s['median_tok_s']:.1f}) tok/s; prefill "
              f"{prefill[v]['best_tok_s']:.1f} ({prefill[v]['median_tok_s']:.1f}) tok/s", file=sys.stderr)
    for v, err in lc_failed.items():
        print(f"  {v:40s} died: {err}", file=sys.stderr)
    doc = json.dumps({"model": str(a.model), "threads": a.threads, "prompt": a.prompt, "tokens": a.tokens,
                      "rounds": a.rounds, "load_averages": loads, "torch": torch.__version__,
                      "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "ours_fused_step": fused, "ours_head": heads,
                      "llamacpp_venv": str(a.llamacpp_venv), "llamacpp_extra_bufts": not a.llamacpp_no_extra_bufts,
                      "llamacpp_system_info": lc_info.get("system_info"), "llamacpp_first_ids": lc_info.get("first_ids", {}),
                      "llamacpp_failed": lc_failed, "results": summary,
                      "prefill": prefill})
    print(doc)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(doc + "\n")


if __name__ == "__main__":
    sys.exit(main())
