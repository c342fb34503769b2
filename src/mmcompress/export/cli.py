"""``mmcompress export DIR --format compressed-tensors|gguf --output OUT [--check] [--requantize] [--json]``."""

from __future__ import annotations

import sys

from ..cli.common import CLIError, add_common, add_overwrite, add_trust

# above this mean relative weight error of the move to GGUF blocks, warn (smollm2: g32 0.2 %, W8 0.5 %, g128 7.9 %)
GGUF_GRID_WARN = 0.02


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export an artifact to compressed-tensors (served by vLLM) or GGUF (llama.cpp)")
    p.add_argument("model", help="mmcompress artifact directory (from `mmcompress quantize`)")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gguf"],
                   help="compressed-tensors (a directory vLLM serves) or gguf (one file for llama.cpp: RTN, "
                        "SmoothQuant and AWQ artifacts of Llama, Mistral and Qwen2)")
    p.add_argument("--output", "-o", help="output directory, or the .gguf file with --format gguf (written atomically)")
    add_overwrite(p)
    p.add_argument("--check", action="store_true",
                   help="pre-flight only: print the vLLM kernel table and what would be folded; write nothing")
    p.add_argument("--requantize", action="store_true",
                   help="where run-time smoothing cannot be folded exactly (MASQuant untied q/k/v, o_proj under "
                        "grouped-query attention), fold a common vector and re-quantize those linears with RTN")
    p.add_argument("--tensor-parallel-size", "--tp", dest="tp", type=int, default=1,
                   help="check that row-parallel linears split into whole groups on this many GPUs")
    add_common(p)
    add_trust(p)
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> dict:
    from .compressed_tensors import _hardware_line, format_kernel_table

    if args.tp < 1:
        raise CLIError(f"--tensor-parallel-size must be >= 1, got {args.tp}")
    if not args.check and not args.output:
        raise CLIError("--output is required (or use --check)")
    if args.format == "gguf":
        if args.check or args.requantize or args.tp != 1:
            raise CLIError("--check, --requantize and --tensor-parallel-size apply to --format compressed-tensors")
        from .gguf import export_gguf

        report = export_gguf(args.model, args.output, overwrite=args.overwrite)
        err = report["grid_change_error"]
        print(f"exported {args.model} -> {report['output']} ({', '.join(report['gguf_types'])}, {report['linears']} "
              f"linears; moving from our grid to llama.cpp's blocks: relative weight error mean {err['mean']:.2e}, "
              f"max {err['max']:.2e})", file=sys.stderr)
        if err["mean"] > GGUF_GRID_WARN:
            print(f"warning: llama.cpp's 32-blocks round this artifact's codes a second time (mean relative weight "
                  f"error {err['mean']:.1%}; a W4A16 g128 smollm2 lost 37 % perplexity this way): quantize 4-bit "
                  "models for GGUF with --group-size 32", file=sys.stderr)
        return report
    if args.check:
        print(format_kernel_table(), file=sys.stderr)
    from .compressed_tensors import export_compressed_tensors

    report = export_compressed_tensors(args.model, args.output, requantize=args.requantize, tp=args.tp,
                                       check_only=args.check, overwrite=args.overwrite,
                                       trust_remote_code=args.trust_remote_code)
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.check:
        f = report["folds"]
        print(f"{args.model}: {report['scheme']} -> {report['vllm_scheme']} ({report['compression_format']}), "
              f"{_hardware_line(report)}; run-time smoothing folds: "
              f"{f['exact']} exact, {f['inexact']} inexact", file=sys.stderr)
    else:
        print(f"exported {args.model} -> {report['output']} ({report['compression_format']}, "
              f"{report['codes_identical']}/{report['quantized_linears']} linears with the artifact's codes, "
              f"{len(report['requantized'])} re-quantized)", file=sys.stderr)
    if report["dropped"]["note"]:
        print(f"note: {report['dropped']['note']}", file=sys.stderr)
    return report
