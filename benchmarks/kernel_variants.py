"""Build a renamed copy of one of our C++ kernel sources as its own torch extension (for A/B benchmarks).

Shared by ``gemv_prefetch.py`` and ``int4_variants.py``: the source text (already renamed to the op
namespace ``ns``) is written under the kernels' build directory and compiled once (cached by content).
"""

import statistics

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
