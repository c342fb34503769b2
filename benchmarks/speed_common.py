"""What ``kernel_bench.py`` and ``stack_decode.py`` share: dtype names, ``--threads`` / ``--json``, and
running a benchmark function from the command line (the log on stderr, one JSON line on stdout).

Shared / oversubscribed machines: OpenMP worker threads spin-wait between parallel regions by default,
which on a CPU shared with other jobs turns every GEMV (dense and sparse alike) into a scheduling wait.
Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/...`` there (it must be set before torch is imported,
hence an environment variable); both the dense and the sparse path run under it.  Results report the
setting as ``omp_wait_policy``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
           "fp16": torch.float16, "float16": torch.float16}


def dtype_named(name) -> torch.dtype:
    """``bf16`` / ``fp32`` (or a ``torch.dtype``, returned as is)."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use bf16 or fp32") from None


def add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line on stdout")


def run(parser: argparse.ArgumentParser, bench, argv=None) -> int:
    """Parse ``argv``, set the threads, call ``bench(args)`` (the log goes to stderr); a ``ValueError`` is a
    one-line usage error (exit 2).  ``--json`` prints the result dict as one line (non-finite values as
    null, as ``mmcompress --json`` does)."""
    from mmcompress.finite import json_safe

    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        result = bench(args)
    except ValueError as e:
        parser.error(str(e).strip().splitlines()[0])
    if args.json:
        sys.stdout.write(json.dumps(json_safe(json.loads(json.dumps(result, default=str))), allow_nan=False) + "\n")
    return 0
