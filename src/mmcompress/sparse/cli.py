"""``mmcompress sparsify MODEL --method {larosa,teal,cats,wina} --sparsity P ...`` (a CLI plugin)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli.common import CLIError, add_calib, add_common, add_method_flags, add_overwrite, add_trust, check_calib_spec
from ..cli.common import add_resume, add_streaming, check_not_on_ranks, input_paths, load_calibration, method_options
from ..cli.common import on_ranks
from ..cli.common import write_artifact
from .methods import SPARSE_METHODS


def register(subparsers) -> None:
    p = subparsers.add_parser("sparsify", help="activation sparsity: LaRoSA (rotated Top-K), TEAL, CATS, WINA")
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("--method", default="larosa", choices=list(SPARSE_METHODS))
    add_method_flags(p, SPARSE_METHODS)
    p.add_argument("--dtype", default="auto",
                   help="dtype to load the model in: auto (the checkpoint's, from config.json), float32, bfloat16, float16")
    add_calib(p)
    p.set_defaults(nsamples=16, seqlen=1024)
    p.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
    add_overwrite(p)
    add_resume(p)
    p.add_argument("--no-progress", action="store_true")
    add_streaming(p)
    add_common(p)
    add_trust(p)
    p.set_defaults(func=cmd_sparsify)


def cmd_sparsify(args) -> dict:
    from ..models.adapters import get_adapter
    from ..models.loading import read_config
    from .api import make_sparse_method, sparsify

    options = method_options(args, SPARSE_METHODS, args.method)
    config = SPARSE_METHODS[args.method].Options(**options)  # the flags given, the method's defaults for the rest
    mode = getattr(config, "mode", None)
    if getattr(config, "column_scale", False) and mode != "merged":
        raise CLIError("--column-scale applies to --method larosa --mode merged only")
    check_calib_spec(args.calib, args.nsamples, args.seqlen)
    read_config(args.model, trust_remote_code=args.trust_remote_code)
    from ..distributed import current, launched

    if launched():  # torchrun: each rank calibrates on its block of the samples, rank 0 writes
        return on_ranks(cmd_sparsify, args)
    world = current()
    check_not_on_ranks(args, world)
    inputs = input_paths(args.model, args.calib)

    def compute(model, ck):
        adapter = get_adapter(model)
        if mode == "merged":
            from .merge import supports_merged

            ok, why = supports_merged(adapter)
            if not ok:
                raise CLIError(f"--mode merged is not supported for {adapter.family}: {why}")
        calib = load_calibration(args.calib, model, args.model, args.nsamples, args.seqlen, args.seed,
                                 trust_remote_code=args.trust_remote_code)
        sparsify(model, calib, args.method, device=world.device if world.size > 1 else args.device,
                 progress=not args.no_progress and world.rank == 0, checkpoint_dir=ck, resume=args.resume, **options)

    out = Path(args.output)
    walk = make_sparse_method(args.method, **options).layer_method()  # the options checked before the model is read
    if walk.lookahead and args.resume:
        raise CLIError("--resume: LaRoSA merged --basis both finishes each layer one layer late, which cannot be "
                       "resumed; run without --resume")
    model = write_artifact(args, "sparsify", inputs, compute, resumable=True)
    desc = model._mmcompress_description
    info = desc["method"]
    result = {"output": str(out), "method": args.method, "target": config.sparsity,
              "model_sparsity": info["model_sparsity"], "plan": info.get("plan"), "prefill": config.prefill,
              "calibration": desc["calibration"], "seconds": desc["seconds"]}
    if hasattr(model, "_mmcompress_rank_tokens"):
        result.update(world_size=world.size, rank_tokens=model._mmcompress_rank_tokens)
    if mode is not None:
        result["mode"] = mode
    if "note" in info:
        result["note"] = info["note"]
    print(f"sparsified {args.model} with {args.method}" + (f" (mode {mode})" if mode is not None else "")
          + f": model-level sparsity {info['model_sparsity']:.4f} (target {config.sparsity}, plan {info.get('plan')}, "
          f"prefill {config.prefill}) -> {out} ({desc['seconds']} s)", file=sys.stderr)
    return result
