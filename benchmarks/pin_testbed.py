"""Pin the SHA-256 of every file of built testbed models in ``src/mmcompress_testbed/assets/pins.json``.

Build each model in two (or more) separate caches first, e.g. with different thread counts::

    MMCOMPRESS_CACHE=/tmp/a OMP_NUM_THREADS=1 mmcompress testbed fetch omni-mini
    MMCOMPRESS_CACHE=/tmp/b OMP_NUM_THREADS=2 mmcompress testbed fetch omni-mini
    python benchmarks/pin_testbed.py --caches /tmp/a /tmp/b --models smollm2-135m whisper-base omni-mini

The models must have been built with this checkout's recipes (same build id) and the builds must agree
byte for byte; the pins are then written for this machine's library versions (``registry.build_env()``).
Pins of other models are kept when the library versions are unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmcompress_testbed import registry
from mmcompress_testbed.fetch import check_record, read_record


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caches", nargs="+", required=True, help="testbed caches holding independent builds")
    ap.add_argument("--models", nargs="+", required=True)
    args = ap.parse_args(argv)
    env = registry.build_env()
    old = registry.load_pins()
    pins = {"env": env, "models": dict(old.get("models") or {}) if old.get("env") == env else {}}
    for name in args.models:
        entry = registry.MODELS[name]
        hashes = []
        for cache in args.caches:
            d = Path(cache) / name
            ok, reason = check_record(d, entry.build_id, full=True)
            if not ok:
                print(f"{name}: {reason}", file=sys.stderr)
                return 1
            hashes.append({k: v["sha256"] for k, v in read_record(d)["files"].items()})
        differ = sorted(k for h in hashes[1:] for k in set(h) | set(hashes[0]) if h.get(k) != hashes[0].get(k))
        if differ:
            print(f"{name}: the builds differ in {', '.join(sorted(set(differ)))}: not reproducible, not pinned",
                  file=sys.stderr)
            return 1
        pins["models"][name] = {"build_id": entry.build_id, "files": dict(sorted(hashes[0].items()))}
        print(f"{name}: {len(hashes[0])} files agree in {len(hashes)} builds")
    registry.PINS_FILE.write_text(json.dumps(pins, indent=1, sort_keys=True) + "\n")
    print(f"wrote {registry.PINS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
