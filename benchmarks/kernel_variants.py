"""Build a renamed copy of one of our C++ kernel sources as its own torch extension (for A/B benchmarks).

Shared by ``gemv_prefetch.py``, ``int4_variants.py`` and ``sparse_int8_variants.py``: the source text (already renamed to the op
namespace ``ns``) is written under the kernels' build directory and compiled once (cached by content).
"""

import argparse
import json
import os
import re
import statistics
import time

import torch

from mmcompress.sparse.kernels import cpu


def build_variant(ns: str, text: str, probe: str):
    """``torch.ops.<ns>`` after compiling ``text``; ``probe`` is an op name that must exist once loaded."""
    d = cpu.build_dir(ns)
    d.mkdir(parents=True, exist_ok=True)
    src = d / f"{ns}.cpp"
    if not src.exists() or src.read_text() != text:
        src.write_text(text)
    err = cpu.compile_and_load(cpu.extension_name(ns, src), src, lambda: getattr(getattr(torch.ops, ns), probe))
    if err:
        raise SystemExit(f"build of {ns} failed: {err}")
    return getattr(torch.ops, ns)


def build_renamed(ns: str, text: str, lib: str, probe: str):
    """:func:`build_variant` of a kernel source whose op library ``lib`` is renamed to ``ns``."""
    text = text.replace(f"TORCH_LIBRARY({lib},", f"TORCH_LIBRARY({ns},").replace(
        f"TORCH_LIBRARY_IMPL({lib},", f"TORCH_LIBRARY_IMPL({ns},")
    return build_variant(ns, text, probe)


def interleaved_times(calls: dict, ncopy: int, repeats: int, clock) -> dict[str, list[float]]:
    """Seconds of every call of ``calls[name](i)``, the variants interleaved (order reversed every other
    repeat) over ``ncopy`` weight copies, so that a loaded machine's slow moments hit every variant alike."""
    names = list(calls)
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for i in range(ncopy):
            for j, n in enumerate(order):
                t0 = clock()
                calls[n](i + 3 * j)
                times[n].append(clock() - t0)
    return times


def report(shape: str, times: dict[str, list[float]], nbytes: dict[str, int], width: int) -> list[dict]:
    """One row per variant (median and best µs, GB/s of ``nbytes``), printed and returned."""
    rows = []
    for n, t in times.items():
        med, best = statistics.median(t), min(t)
        row = {"shape": shape, "path": n, "median_us": round(med * 1e6, 1), "best_us": round(best * 1e6, 1),
               "gb_s_median": round(nbytes[n] / med / 1e9, 2), "gb_s_best": round(nbytes[n] / best / 1e9, 2)}
        rows.append(row)
        print(f"{shape:>11} {n:<{width}} median {row['median_us']:9.1f} us {row['gb_s_median']:6.2f} GB/s   "
              f"best {row['best_us']:9.1f} us {row['gb_s_best']:6.2f} GB/s", flush=True)
    return rows


def warm_time_report(shape: str, calls: dict, copies: dict[str, int], nbytes: dict[str, int], repeats: int, clock,
                     width: int) -> list[dict]:
    """Warm every ``calls[name](i)`` over its ``copies[name]`` weight copies (first touch), time them
    interleaved (:func:`interleaved_times`, call ``i`` on copy ``i % copies[name]``) and :func:`report`."""
    for n, f in calls.items():
        for i in range(copies[n]):
            f(i)
    wrapped = {n: (lambda i, n=n: calls[n](i % copies[n])) for n in calls}
    return report(shape, interleaved_times(wrapped, max(copies.values()), repeats, clock), nbytes, width)


def finish(res: dict, args, what: str) -> None:
    """The load average after the run, one summary line, and the JSON file if asked for."""
    res["loadavg_after"] = os.getloadavg()
    print(f"load average {res['loadavg_before']} -> {res['loadavg_after']} ({args.clock} clock, {args.threads} "
          f"thread(s), {what})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def common_args(doc: str, shapes: str, no_cur_help: str) -> argparse.ArgumentParser:
    """The A/B scripts' shared flags: the versions to time (``--source``, ``--no-cur``), the shapes, batch,
    threads, clock, the cache flush, repeats and ``--json``; a script adds its own before ``parse_args``."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--source", action="append", default=[], metavar="LABEL=FILE")
    ap.add_argument("--no-cur", action="store_true", help=no_cur_help)
    ap.add_argument("--shapes", default=shapes, help="OUTxIN as nn.Linear.weight")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread")
    ap.add_argument("--cache-mb", type=float, default=600.0)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json", default=None)
    return ap


def clock_of(args):
    """The timer ``--clock`` names."""
    return time.thread_time if args.clock == "thread" else time.perf_counter


def build_sources(args, build, ops: dict) -> dict:
    """Each ``--source LABEL=FILE`` built with ``build(label, text)`` into ``ops`` (returned)."""
    for spec in args.source:
        label, _, path = spec.partition("=")
        if not re.fullmatch(r"\w+", label) or not path or label in ops:
            raise SystemExit(f"--source wants a new LABEL=FILE (LABEL: letters, digits, _), got {spec!r}")
        with open(path) as f:
            ops[label] = build(label, f.read())
    return ops
