"""``mmcompress sparsify MODEL --method {larosa,teal,cats,wina} --sparsity P ...`` (a CLI plugin)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli.common import CLIError, add_calib, add_common, add_overwrite, add_trust, check_calib_spec, input_paths
from ..cli.common import add_streaming, load_calibration, on_ranks, whole_model_notice, write_artifact


def register(subparsers) -> None:
    p = subparsers.add_parser("sparsify", help="activation sparsity: LaRoSA (rotated Top-K), TEAL, CATS, WINA")
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("--method", default="larosa", choices=["larosa", "teal", "cats", "wina"])
    p.add_argument("--sparsity", type=float, required=True,
                   help="target model-level sparsity in [0, 1) (parameter-weighted over q,k,v,o,gate,up,down)")
    p.add_argument("--plan", choices=["exact", "uniform", "grid", "greedy"], default=None,
                   help="LaRoSA: exact (default; exact model-level sparsity), uniform (reference 0.8/1.2 split of a "
                        "nominal level), grid (input/output split searched on calibration loss), greedy (TEAL's block-wise "
                        "greedy search over the four Top-K levels of each layer); TEAL: uniform (default) or greedy "
                        "(TEAL's block-wise greedy split across the seven matrices); WINA: uniform (default) or greedy "
                        "(over the four activations of each layer)")
    p.add_argument("--mode", choices=["merged", "reference"], default="merged",
                   help="LaRoSA: merged (Mode M: γ folded, rotations merged, residual adapters) or reference "
                        "(Mode R: (γ⊙RMS(r))·Q at run time, as the published code)")
    p.add_argument("--prefill", choices=["all", "none", "last_half"], default="all",
                   help="which prompt tokens are sparsified: all (paper protocol), none (dense prefill), "
                        "last_half (TEAL's protocol)")
    p.add_argument("--basis", choices=["attn", "both"], default="attn",
                   help="LaRoSA: fit Q_l to the attention input (reference) or to attention + MLP inputs")
    p.add_argument("--column-scale", action="store_true",
                   help="LaRoSA merged mode (ours): Top-K ranks each rotated coordinate by |x̃_i| times the norm of "
                        "the readers' weight column it multiplies (folded into the norm scale; exact, free at run time)")
    p.add_argument("--dtype", default="auto",
                   help="dtype to load the model in: auto (the checkpoint's, from config.json), float32, bfloat16, float16")
    add_calib(p)
    p.set_defaults(nsamples=16, seqlen=1024)
    p.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
    add_overwrite(p)
    p.add_argument("--no-progress", action="store_true")
    add_streaming(p)
    add_common(p)
    add_trust(p)
    p.set_defaults(func=cmd_sparsify)


def _method_options(args) -> dict:
    """The flags as the method's options, checked against its option table (the recipe's checks) before
    anything is loaded: a flag left at its default is not passed, a flag the method has no option for
    is refused."""
    from ..options import OptionError, check_options
    from .methods import SPARSE_METHODS

    defaults = {"plan": None, "mode": "merged", "prefill": "all", "basis": "attn", "column_scale": False}
    given = {"sparsity": args.sparsity, **{k: getattr(args, k) for k, v in defaults.items() if getattr(args, k) != v}}
    try:
        return check_options(SPARSE_METHODS[args.method].OPTIONS, given)
    except OptionError as e:
        flag = "--" + e.key.replace("_", "-")
        if e.known is not None:
            raise CLIError(f"{flag} does not apply to --method {args.method}") from None
        raise CLIError(e.message(flag)) from None


def cmd_sparsify(args) -> dict:
    from ..fileio import check_output
    from ..export.serialization import load_model, save
    from ..models.adapters import get_adapter
    from ..models.loading import read_config
    from .api import make_sparse_method, sparsify

    options = _method_options(args)
    if args.column_scale and args.mode != "merged":
        raise CLIError("--column-scale applies to --method larosa --mode merged only")
    check_calib_spec(args.calib, args.nsamples, args.seqlen)
    read_config(args.model, trust_remote_code=args.trust_remote_code)
    from ..distributed import current, launched

    if launched():  # torchrun: each rank calibrates on its block of the samples, rank 0 writes
        return on_ranks(cmd_sparsify, args)
    world = current()
    inputs = input_paths(args.model, args.calib)

    def compute(model, ck):
        adapter = get_adapter(model)
        if args.method == "larosa" and args.mode == "merged":
            from .merge import supports_merged

            ok, why = supports_merged(adapter)
            if not ok:
                raise CLIError(f"--mode merged is not supported for {adapter.family}: {why}")
        calib = load_calibration(args.calib, model, args.model, args.nsamples, args.seqlen, args.seed,
                                 trust_remote_code=args.trust_remote_code)
        sparsify(model, calib, args.method, device=world.device if world.size > 1 else args.device,
                 progress=not args.no_progress and world.rank == 0, checkpoint_dir=ck, **options)

    out = Path(args.output)
    if world.size > 1:
        check_output(args.output, overwrite=args.overwrite, inputs=inputs)
        model = load_model(args.model, dtype=args.dtype, runtime="reference", trust_remote_code=args.trust_remote_code)
        if world.rank == 0:
            whole_model_notice("sparsify", "layer streaming is not supported under torchrun yet; every rank loads it")
        compute(model, None)
        if world.rank == 0:
            save(model, out, source_dir=args.model, overwrite=args.overwrite, inputs=inputs)
        world.barrier()
    else:
        walk = make_sparse_method(args.method, **options).layer_method()
        model = write_artifact(args, "sparsify", inputs, compute, lambda adapter: None if walk is not None else
                               "these options need whole-model passes (LaRoSA grid/greedy plans or merged --basis "
                               "both, WINA greedy)")
    desc = model._mmcompress_description
    info = desc["method"]
    result = {"output": str(out), "method": args.method, "target": args.sparsity,
              "model_sparsity": info["model_sparsity"], "plan": info.get("plan"), "prefill": args.prefill,
              "calibration": desc["calibration"], "seconds": desc["seconds"]}
    if hasattr(model, "_mmcompress_rank_tokens"):
        result.update(world_size=world.size, rank_tokens=model._mmcompress_rank_tokens)
    if args.method == "larosa":
        result["mode"] = args.mode
    if "note" in info:
        result["note"] = info["note"]
    print(f"sparsified {args.model} with {args.method}" + (f" (mode {args.mode})" if args.method == "larosa" else "")
          + f": model-level sparsity {info['model_sparsity']:.4f} (target {args.sparsity}, plan {info.get('plan')}, "
          f"prefill {args.prefill}) -> {out} ({desc['seconds']} s)", file=sys.stderr)
    return result
