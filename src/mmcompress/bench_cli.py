"""``mmcompress bench kernel | decode``: the command line of the speed benchmarks (a CLI plugin).

The benchmarks themselves are in :mod:`mmcompress.bench` (sparse kernel, synthetic sparse decode, an
artifact's decode) and :mod:`mmcompress.quant.bench_decode` (synthetic integer-path decode).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .bench import (SHAPES, kernel_benchmark, model_decode_benchmark, parse_decode_spec, parse_shape,
                    synthetic_decode_benchmark)
from .cli.common import add_common, add_trust
from .quant.bench_decode import quant_decode_benchmark



def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="sparse kernel / sparse decode speed benchmarks")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")

    k = sub.add_parser("kernel", help="one sparse GEMV vs dense, cold cache")
    k.add_argument("--shape", default="4096x11008",
                   help="W's shape OUTxIN as nn.Linear.weight (4096x11008 = LLaMA-2-7B down_proj; 11008x4096 = "
                        "gate/up_proj)")
    k.add_argument("--sparsity", type=float, default=0.4, help="fraction of input channels dropped, in [0, 1)")
    k.add_argument("--dtype", default="bf16", help="bf16 | fp32")
    k.add_argument("--batch", type=int, default=1, help="tokens per call, 1..8")
    k.add_argument("--backend", default="auto", help="cpu | torch | auto (default)")
    k.add_argument("--repeats", type=int, default=20, help="passes over the rotated weight copies (default 20)")
    k.add_argument("--cache-mb", type=float, default=1200.0, help="weight bytes rotated per layout (default 1200)")
    k.add_argument("--max-mb", type=float, default=3000.0, help="cap on all weight copies (default 3000)")
    k.add_argument("--threads", type=int, default=None, help="torch/kernel threads (default: torch's)")
    k.add_argument("--scheme", default=None, help="w8a8: also time the sparse int8 kernel (Top-K + W8A8)")
    add_common(k)
    k.set_defaults(func=cmd_bench_kernel)

    d = sub.add_parser("decode", help="decode tokens/s, dense vs sparse")
    d.add_argument("model", help="llama2-7b:LAYERS (synthetic LLaMA-2-7B-shaped stack, random bf16 weights; "
                                 "default 4 layers), or a model directory (an artifact or a plain model: the decode "
                                 "engine on it vs on the dense model vs HF generate)")
    d.add_argument("--sparsity", type=float, default=None,
                   help="input sparsity of every projection (synthetic default 0.4; for a model it overrides K)")
    d.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (default 16)")
    d.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    d.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default 3)")
    d.add_argument("--backend", default="auto", help="cpu | torch | auto (default)")
    d.add_argument("--dtype", default="bf16", help="synthetic weights dtype (bf16 | fp32)")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--scheme", default=None,
                   help="synthetic stack: without --sparsity, integer-path decode of this scheme (w8a8 | w4a8 | w4a6 | "
                        "w4a16) vs the fastest dense path (torch bf16, torch fp32, our kernel at 0%%); with "
                        "--sparsity, LaRoSA + SCHEME (w8a8) on the sparse int8 kernel")
    d.add_argument("--joint-adapters", choices=("float", "w8a16"), default="float",
                   help="synthetic stack, --sparsity with --scheme: LaRoSA's residual adapters in the stack's dtype "
                        "(the recipe default) or 8-bit weight-only (a recipe with adapters: w8a16)")
    d.add_argument("--compile", action="store_true",
                   help="model directory: capture the compressed model's decode step with torch.compile")
    add_common(d)
    add_trust(d)
    d.set_defaults(func=cmd_bench_decode)

    p.set_defaults(func=_cmd_bench_none)


def _cmd_bench_none(args):
    raise ValueError("choose a benchmark: mmcompress bench kernel | decode (see --help)")


def _threads(args):
    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ValueError("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def cmd_bench_kernel(args) -> dict:
    if args.device != "cpu":
        raise ValueError("bench kernel runs on the CPU here; GPU checks: python benchmarks/gpu_check.py")
    if not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    _threads(args)
    out, inn = parse_shape(args.shape)
    return kernel_benchmark(out, inn, args.sparsity, args.dtype, args.batch, backend=args.backend,
                            repeats=args.repeats, cache_mb=args.cache_mb, max_mb=args.max_mb,
                            scheme=getattr(args, "scheme", None), log=sys.stderr)


def cmd_bench_decode(args) -> dict:
    if args.tokens < 1:
        raise ValueError("--tokens must be >= 1")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    _threads(args)
    spec = parse_decode_spec(args.model)
    if spec is not None:
        if args.device != "cpu":
            raise ValueError("the synthetic decode benchmark runs on the CPU; GPU: python benchmarks/gpu_check.py")
        scheme = getattr(args, "scheme", None)
        if scheme and args.sparsity is None:  # the dense integer path
            return quant_decode_benchmark(spec[0], spec[1], scheme, tokens=args.tokens, prompt=args.prompt,
                                          rounds=args.rounds, log=sys.stderr)
        return synthetic_decode_benchmark(spec[0], spec[1], 0.4 if args.sparsity is None else args.sparsity,
                                          tokens=args.tokens, prompt=args.prompt, rounds=args.rounds,
                                          backend=args.backend, dtype=args.dtype, scheme=scheme, log=sys.stderr,
                                          adapter_bits=8 if args.joint_adapters == "w8a16" else 16)
    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"{args.model} is neither a shape spec ({', '.join(s + ':LAYERS' for s in SHAPES)}) "
                                "nor a model directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    if args.device != "cpu":
        raise ValueError("bench decode of a model directory runs on the CPU")
    if args.prompt < 1:
        raise ValueError("--prompt must be >= 1")
    from .runtime.bench_decode import engine_decode_benchmark

    return engine_decode_benchmark(path, prompt=args.prompt, tokens=args.tokens, rounds=args.rounds,
                                   compile=getattr(args, "compile", False), sparsity=args.sparsity,
                                   trust_remote_code=args.trust_remote_code, log=sys.stderr)
