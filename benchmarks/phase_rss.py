"""Resident memory of one `mmcompress quantize` run, phase by phase (issue 21): the current RSS at each phase
boundary (model skeleton, calibration set and its tokenization, capture, each layer's read / commit, save) and
the highest RSS sampled every 5 ms since the previous boundary.  Same arguments as the CLI:

    PYTHONPATH=src python benchmarks/phase_rss.py quantize MODEL --method smoothquant --scheme w8a8 \\
        --calib wiki --nsamples 8 --seqlen 256 --no-progress --output OUT 2> phases.log

Lines go to stderr as ``[phase] SECONDS > NAME | < NAME  rss MiB  max since last MiB``.
"""

import functools
import resource
import sys
import threading
import time


def rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


hi, t0 = [rss()], time.time()


def _sample():
    while True:
        hi[0] = max(hi[0], rss())
        time.sleep(0.005)


def mark(what: str) -> None:
    r = rss()
    hi[0] = max(hi[0], r)
    print(f"[phase] {time.time() - t0:7.1f}s {what:32s} rss {r:7.0f} MiB  max since last {hi[0]:7.0f} MiB",
          file=sys.stderr, flush=True)
    hi[0] = r


def _wrapped(f, label):
    @functools.wraps(f)
    def g(*a, **k):
        mark(f"> {label}")
        try:
            return f(*a, **k)
        finally:
            mark(f"< {label}")
    return g


def main() -> int:
    threading.Thread(target=_sample, daemon=True).start()
    mark("start")
    from mmcompress import cli, engine, streaming
    from mmcompress.data import calibration

    mark("imports")
    for mod, name in [(streaming, "load_streamed"), (streaming, "save_streamed"), (engine, "capture_inputs"),
                      (calibration, "tokenize_text"), (streaming.LayerStream, "load_layer"),
                      (streaming.LayerStream, "layer_state"), (streaming.LayerStream, "write_layer"),
                      (streaming.LayerStream, "release_non_layers")]:
        setattr(mod, name, _wrapped(getattr(mod, name), name))
    try:  # the testbed's named calibration sets (--calib wiki), when the plugin is installed
        from mmcompress_testbed import data as tb

        for name in list(tb.CALIB_BUILDERS):
            tb.CALIB_BUILDERS[name] = _wrapped(tb.CALIB_BUILDERS[name], f"calib {name}")
    except ImportError:
        pass
    try:
        return cli.main(sys.argv[1:])
    finally:
        mark("end")
        print(f"[phase] peak (ru_maxrss) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
