"""Command line: ``mmcompress quantize | compress | eval | sparsify | export | ...`` (plugins add more).

Each subcommand lives in a function ``cmd_<name>(args)`` returning a dict (the JSON result) or
``None``.  With ``--json`` the result is printed as one JSON object on the last line of stdout.
Errors on bad input are one line on stderr and a non-zero exit status (set ``MMCOMPRESS_DEBUG=1``
for a traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path

from .common import CLIError, load_calibration
# the shared helpers under the short names this module has always used
from .common import add_calib as _add_calib, add_common as _add_common, add_overwrite as _add_overwrite
from .common import add_trust as _add_trust, check_calib_spec as _check_calib_spec, input_paths as _inputs
from .common import add_method_flags, add_resume, add_streaming, check_not_on_ranks, method_options, named_set as _named_set, on_ranks
from .common import write_artifact
from ..plugins import commands as plugin_commands, import_optional

EXIT_USAGE = 2


def build_parser(argv=()) -> argparse.ArgumentParser:
    """The parser; a plugin's subcommand named in ``argv`` (:mod:`mmcompress.plugins`) gets its full parser."""
    from .. import __version__
    from ..quant.methods import QUANT_METHODS

    parser = argparse.ArgumentParser(prog="mmcompress", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mmcompress {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    q = sub.add_parser("quantize", help="post-training quantization of a local Hugging Face model")
    q.add_argument("model", help="local Hugging Face model directory")
    q.add_argument("--method", default="rtn", help=" | ".join(QUANT_METHODS))
    q.add_argument("--scheme", default="w8a8", help="w8a8 | w4a8 | w4a6 | w4a16")
    q.add_argument("--wbits", type=int, help="override the scheme's weight bits (2..16)")
    q.add_argument("--abits", type=int, help="override the scheme's activation bits (2..16; 16 = off)")
    q.add_argument("--group-size", type=int, help="weight group size (0 = per output channel)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric weight grid")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric weight grid")
    add_method_flags(q, QUANT_METHODS)
    q.add_argument("--report", help="write per-modality diagnostics (JSON + PNG plot) into this directory")
    q.add_argument("--report-calib", metavar="SPEC",
                   help="measure the --report diagnostics on this held-out set (a file or testbed name, e.g. "
                        "testbed-heldout; must not share samples with --calib) instead of the calibration samples")
    q.add_argument("--report-nsamples", type=int, default=16, help="samples of --report-calib (default 16)")
    q.add_argument("--whiten-calib", metavar="SPEC",
                   help="MASQuant: whiten CMC with this separate set (e.g. testbed-whiten: image-only and "
                        "audio-only samples, as the paper) instead of the calibration set's tokens")
    q.add_argument("--whiten-nsamples", type=int, default=128, help="samples of --whiten-calib (default 128)")
    q.add_argument("--dtype", default="auto",
                   help="dtype to load the model in: auto (the checkpoint's, from config.json), float32, bfloat16, float16")
    _add_calib(q, required=False)
    q.add_argument("--output", "-o", required=True, help="output directory (written atomically)")
    _add_overwrite(q)
    add_resume(q)
    q.add_argument("--no-progress", action="store_true")
    add_streaming(q)
    _add_common(q)
    _add_trust(q)

    c = sub.add_parser("compress", help="apply a recipe of steps (e.g. LaRoSA then W8A8) and save one artifact")
    c.add_argument("model", help="local Hugging Face model directory")
    c.add_argument("--recipe", required=True, help="recipe file (YAML or JSON) with a list of steps")
    c.add_argument("--dtype", default="auto", help="auto (the checkpoint's dtype), float32, bfloat16, float16")
    _add_calib(c)
    c.add_argument("--output", "-o", required=True)
    _add_overwrite(c)
    add_resume(c)
    c.add_argument("--no-progress", action="store_true")
    add_streaming(c)
    _add_common(c)
    _add_trust(c)

    r = sub.add_parser("report", help="render the JSON results in a run directory as Markdown + PNG plots")
    r.add_argument("run_dir")
    r.add_argument("--output", "-o", help="directory for report.md and the plots (default: RUN_DIR; a report.md "
                                          "there that mmcompress did not write is never replaced)")
    r.add_argument("--json", action="store_true")

    e = sub.add_parser("eval", help="evaluate a model or compressed artifact")
    e.add_argument("model", help="local Hugging Face directory or mmcompress artifact")
    e.add_argument("--ppl", action="append", default=[], help="text file (or testbed split name) for perplexity")
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    e.add_argument("--asr", metavar="NAME", help="speech set for word error rate (e.g. speech-test; Omni models)")
    e.add_argument("--vqa", metavar="NAME", help="image QA set for exact-match accuracy (e.g. image-qa-test)")
    e.add_argument("--vqa-choice", action="store_true",
                   help="with --vqa: also multiple-choice accuracy by likelihood over the answers of each question type "
                        "(still informative when compression has broken the greedy answers)")
    e.add_argument("--mm-limit", type=int, default=None, help="evaluate at most this many ASR clips / VQA items per type")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--no-progress", action="store_true")
    _add_common(e)
    _add_trust(e)

    command = next((a for a in argv if not a.startswith("-")), None)
    for name, (modname, help_line) in plugin_commands().items():  # e.g. the testbed's testbed and demo
        module = import_optional(modname) if name == command else None
        if module is not None:
            module.register(sub)
        else:
            sub.add_parser(name, help=help_line).set_defaults(func=_not_installed(modname))
    for register in _plugins():
        register(sub)
    return parser


def _not_installed(modname: str):
    def run(args):
        raise CLIError(f"{modname} is not installed")
    return run


def _plugins():
    """Subcommands that live next to their feature (sparsify, export, lm-eval, generate and bench)."""
    modules = [import_optional(m) for m in ("mmcompress.sparse.cli", "mmcompress.export.cli",
                                            "mmcompress.eval.lm_eval_adapter",
                                            "mmcompress.runtime.cli")]  # generate, bench
    return [m.register for m in modules if m is not None]


# -- quantize ----------------------------------------------------------------------------------


def _method_options(args) -> dict:
    """The method flags given, as the options of ``--method`` (the recipe's checks and messages)."""
    from ..quant.methods import QUANT_METHODS

    method = args.method.lower()
    if method not in QUANT_METHODS:
        raise CLIError(f"unknown quantization method {args.method!r}; choose one of {', '.join(sorted(QUANT_METHODS))}")
    return method_options(args, QUANT_METHODS, method)


def _check_counts(args, **minimum) -> None:
    """``--flag`` integers (given ones only) against their minimum, before anything is loaded."""
    from ..options import OptionError, check_options, integer

    try:
        check_options({k: integer(lo) for k, lo in minimum.items()},
                      {k: getattr(args, k) for k in minimum if getattr(args, k, None) is not None})
    except OptionError as e:
        raise CLIError(e.message("--" + e.key.replace("_", "-"))) from None


def cmd_quantize(args) -> dict:
    from ..models.adapters import get_adapter
    from ..models.loading import read_config
    from ..quant.api import make_method, quantize
    from ..quant.quantizer import resolve_scheme

    scheme = resolve_scheme(args.scheme, wbits=args.wbits, abits=args.abits, group_size=args.group_size, sym=args.sym)
    options = _method_options(args)
    if args.report_calib and not args.report:
        raise CLIError("--report-calib needs --report")
    if args.whiten_calib and args.method.lower() != "masquant":
        raise CLIError(f"--whiten-calib does not apply to --method {args.method}")
    make_method(args.method, scheme, **options)  # validate before any heavy work
    trust = args.trust_remote_code
    if args.calib is not None:  # the calibration options and file are checked before the model
        _check_calib_spec(args.calib, args.nsamples, args.seqlen)
    read_config(args.model, trust_remote_code=trust)
    if Path(args.model).is_dir():  # a missing or truncated shard is named before anything is written
        from ..export.datafree import checkpoint_tensors

        checkpoint_tensors(args.model)
    if args.calib is None:
        return _quantize_data_free(args, scheme)
    from ..distributed import current, launched

    if launched():
        return on_ranks(cmd_quantize, args)
    world = current()  # under torchrun: each rank calibrates on its block of the samples, rank 0 writes
    if world.size > 1:
        for flag, value in (("--resume", args.resume), ("--report", args.report),
                            ("--checkpoint-dir", args.checkpoint_dir)):
            if value:
                raise CLIError(f"{flag} is not supported under torchrun yet")
    out = Path(args.output)
    inputs = _inputs(args.model, args.calib)

    def compute(model, ck):
        get_adapter(model)
        calib = load_calibration(args.calib, model, args.model, args.nsamples, args.seqlen, args.seed,
                                 trust_remote_code=trust)
        extra = {}
        if args.whiten_calib:
            extra["whitening"] = load_calibration(args.whiten_calib, model, args.model, args.whiten_nsamples,
                                                  args.seqlen, args.seed, trust_remote_code=trust)
        if args.report_calib:
            extra["report_calib"] = load_calibration(args.report_calib, model, args.model, args.report_nsamples,
                                                     args.seqlen, args.seed, trust_remote_code=trust)
        if world.size > 1:
            world.block(len(calib))  # enough samples for every rank, before any work
        quantize(model, calib, args.method, scheme, device=world.device if world.size > 1 else args.device,
                 checkpoint_dir=ck, resume=args.resume, progress=not args.no_progress and world.rank == 0,
                 report_dir=args.report, **extra, **options)

    model = write_artifact(args, "quantize", inputs, compute, lambda adapter: _not_streamable(args, scheme, adapter, options),
                           resumable=True)
    return _quantize_result(args, scheme, out, model)


def _quantize_result(args, scheme, out, model) -> dict:
    desc = model._mmcompress_description
    rank_tokens = model._mmcompress_rank_tokens  # calibration tokens each rank pushed through the layers
    result = {"output": str(out), "method": args.method, "scheme": scheme.name,
              "calibration": desc["calibration"], "seconds": desc["seconds"],
              "world_size": len(rank_tokens), "rank_tokens": rank_tokens}
    if "method_summary" in desc:
        result["method_summary"] = desc["method_summary"]
    if "report" in desc:
        result["report"] = desc["report"]
    print(f"quantized {args.model} with {args.method} {scheme.name} -> {out} ({desc['seconds']} s; "
          f"calibration tokens {desc['calibration']['tokens']}"
          + (f", per rank {rank_tokens}" if len(rank_tokens) > 1 else "") + ")", file=sys.stderr)
    return result


def _not_streamable(args, scheme, adapter, options) -> str | None:
    """Why a streamed run would not match the in-memory one, or ``None``."""
    from ..quant.api import make_method, whole_model_prepare

    if whole_model_prepare(make_method(args.method, scheme, **options), adapter):
        return (f"--method {args.method} with --loss-weights auto probes gradients through the whole model; "
                "give the weights (e.g. --loss-weights scripted) to stream")
    return None


def _quantize_data_free(args, scheme) -> dict:
    """RTN without ``--calib``: tensor by tensor from the input shards to the output shards."""
    from ..models.loading import resolve_dtype
    from ..export.datafree import quantize_checkpoint

    if args.method.lower() != "rtn":
        raise CLIError(f"--method {args.method} needs calibration data (--calib); only rtn runs without it")
    from ..distributed import launched

    if launched() and os.environ.get("RANK", "0") != "0":
        return None  # one pass over the shards, by rank 0: nothing for the other ranks to do
    for flag, value in (("--report", args.report), ("--resume", args.resume)):
        if value:
            raise CLIError(f"{flag} needs --calib (data-free rtn has no calibration pass)")
    desc = quantize_checkpoint(args.model, args.output, scheme, dtype=resolve_dtype(args.model, args.dtype),
                               progress=not args.no_progress, overwrite=args.overwrite,
                               trust_remote_code=args.trust_remote_code)
    print(f"quantized {args.model} with rtn {scheme.name} (data-free) -> {args.output} ({desc['seconds']} s)",
          file=sys.stderr)
    return {"output": str(args.output), "method": "rtn", "scheme": scheme.name, "data_free": True,
            "calibration": desc["calibration"], "seconds": desc["seconds"]}


# -- eval --------------------------------------------------------------------------------------


def resolve_text(spec: str) -> tuple[str, str]:
    """A text file path, or a named evaluation text (:mod:`mmcompress.data.named`); returns (name, text)."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CLIError(f"evaluation file {spec} is empty")
        from ..data.calibration import check_text

        check_text(text, f"evaluation file {spec}")
        return path.name, text
    return spec, _named_set("text", spec, "evaluation file")()


def cmd_eval(args) -> dict:
    from ..eval.perplexity import text_perplexity
    from ..export.serialization import load_model
    from ..models.loading import load_tokenizer

    if not args.ppl and not getattr(args, "asr", None) and not getattr(args, "vqa", None):
        raise CLIError("nothing to evaluate: give --ppl TEXTFILE (or --asr / --vqa NAME)")
    if getattr(args, "vqa_choice", False) and not getattr(args, "vqa", None):
        raise CLIError("--vqa-choice needs --vqa NAME")
    _check_counts(args, seqlen=2, max_windows=1, mm_limit=1)
    texts = [resolve_text(s) for s in args.ppl]
    model = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    result: dict = {"model": str(args.model)}
    for name, text in texts:
        r = text_perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows, device=args.device,
                            progress=not args.no_progress)
        print(f"{name}: perplexity {r['ppl']:.4f} over {r['tokens']} tokens", file=sys.stderr)
        if len(texts) == 1:
            result.update(r)
        result.setdefault("ppl_by_set", {})[name] = r
    if getattr(args, "asr", None) or getattr(args, "vqa", None):
        result.update(_eval_multimodal(model, args))
    return result


def _eval_multimodal(model, args) -> dict:
    from ..models.processing import load_processor

    src = getattr(model, "_mmcompress_source", None) or args.model
    processor = load_processor(src, trust_remote_code=getattr(args, "trust_remote_code", False))
    out: dict = {}
    if args.asr:
        from ..eval.asr import word_error_rate

        r = word_error_rate(model, processor, args.asr, limit=args.mm_limit, progress=not args.no_progress)
        print(f"{args.asr}: WER {r['wer']:.4f} (digits {r['wer_digits']}, sentences {r['wer_sentences']})",
              file=sys.stderr)
        for kind in ("digits", "sentences"):
            if r[f"errors_{kind}"]:
                e = r[f"errors_{kind}"]
                print(f"  {kind}: substitutions {e['sub']:.3f}, deletions {e['del']:.3f}, insertions {e['ins']:.3f} "
                      f"of {e['words']} words", file=sys.stderr)
        out["asr"] = r
    if args.vqa:
        from ..eval.vqa import accuracy

        r = accuracy(model, processor, args.vqa, limit_per_type=args.mm_limit, progress=not args.no_progress)
        print(f"{args.vqa}: accuracy {r['accuracy']:.4f} {r['by_type']}", file=sys.stderr)
        out["vqa"] = r
        if args.vqa_choice:
            from ..eval.vqa import choice_accuracy

            r = choice_accuracy(model, processor, args.vqa, limit_per_type=args.mm_limit, progress=not args.no_progress)
            print(f"{args.vqa}: multiple-choice accuracy {r['accuracy']:.4f} {r['by_type']} (chance {r['chance']})",
                  file=sys.stderr)
            out["vqa_choice"] = r
    return out


def cmd_compress(args) -> dict:
    from ..models.adapters import get_adapter
    from ..models.loading import read_config
    from ..recipe import apply_recipe, load_recipe

    steps = load_recipe(args.recipe)
    trust = args.trust_remote_code
    _check_calib_spec(args.calib, args.nsamples, args.seqlen)
    read_config(args.model, trust_remote_code=trust)
    from ..distributed import current, launched

    if launched():  # torchrun: each rank calibrates on its block of the samples, rank 0 writes
        return on_ranks(cmd_compress, args)
    world = current()
    check_not_on_ranks(args, world)
    inputs = _inputs(args.model, args.calib) + [args.recipe]

    def compute(model, ck):
        get_adapter(model)
        calib = load_calibration(args.calib, model, args.model, args.nsamples, args.seqlen, args.seed,
                                 trust_remote_code=trust)
        apply_recipe(model, calib, steps, device=world.device if world.size > 1 else args.device,
                     progress=not args.no_progress and world.rank == 0, checkpoint_dir=ck, resume=args.resume)

    model = write_artifact(args, "compress", inputs, compute, lambda adapter: _recipe_not_streamable(steps, adapter),
                           resumable=True)
    desc = model._mmcompress_description
    print(f"compressed {args.model} with {len(steps)} steps in {len(desc['walks'])} walk(s) -> {args.output} "
          f"({desc['seconds']} s)", file=sys.stderr)
    return {"output": str(args.output), "steps": [
        {"kind": s["kind"], "method": s.get("method")} for s in steps], "seconds": desc["seconds"],
        "walks": desc["walks"], "descriptions": desc["steps"], "world_size": world.size,
        "rank_tokens": getattr(model, "_mmcompress_rank_tokens", None)}


def _recipe_not_streamable(steps, adapter) -> str | None:
    """Why a streamed recipe would not match the in-memory one (a step that needs the whole model), or ``None``."""
    from ..distributed import current
    from ..quant.api import make_method, whole_model_prepare
    from ..quant.quantizer import resolve_scheme
    from ..sparse.api import make_sparse_method

    for n, step in enumerate(steps, 1):
        opts = {k: v for k, v in step.items() if k not in ("kind", "method", "scheme", "adapters")}
        walk = make_sparse_method(step["method"], **opts).layer_method() if step["kind"] == "sparsify" else None
        if walk is not None and (walk.chooses_at_end or walk.lookahead) and n < len(steps) and current().size > 1:
            return (f"recipe step {n} ({step['method']} with these options) sets its layers after its walk, so the "
                    "steps after it walk again from its result, which is streamed in one process only")
        if step["kind"] == "quantize" and whole_model_prepare(
                make_method(step["method"], resolve_scheme(step.get("scheme", "w8a8")), **opts), adapter):
            return f"recipe step {n} ({step['method']} with loss_weights auto) probes gradients through the whole model"
    return None


def cmd_report(args) -> dict:
    from ..eval.report import render_report

    out = render_report(args.run_dir, getattr(args, "output", None))
    print(out)
    return {"report": str(out), "files": sorted(p.name for p in out.parent.glob("*.png"))}


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "compress": cmd_compress, "report": cmd_report}


class Terminated(BaseException):
    """SIGTERM (a ``kill``, torchrun stopping the other ranks when one dies, a scheduler's time limit) as an
    exception, so that the command's cleanup runs — its own hidden checkpoint and work directories and
    half-written files are removed — as for Ctrl-C.  A ``BaseException``, like ``KeyboardInterrupt``, so that
    no ``except Exception`` on the way swallows it."""


@contextlib.contextmanager
def _terminate_as_exception():
    """While a command runs in the main thread: SIGTERM raises :class:`Terminated` (only where SIGTERM has its
    default action, so a program that handles it itself keeps its handler); the previous handler after."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the cleanup ends the process
        raise Terminated()

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The commands whose time is the decode engine streaming weights back every torch allocation of >= 2 MiB
# with transparent huge pages (torch's THP_MEM_ALLOC_ENABLE, read once, at torch's first allocation).  With
# 4 KiB pages the sparse kernels' scattered rows and the dense GEMV's long streams miss the TLB: the
# 7B-shaped stack decodes 6-16 % faster on them (docs/runtime.md, "Huge pages").  Not the others: `demo`
# (calibration, allocation churn) measured 2-3 s slower with them (more system time zeroing 2 MiB pages), and
# quantize/sparsify's peak-memory figures (docs/scaling.md) were measured on 4 KiB pages (a touched huge page
# rounds an allocation up to 2 MiB).  THP_MEM_ALLOC_ENABLE=0 turns it off.
HUGE_PAGE_COMMANDS = ("generate", "bench")


def huge_pages_for(command: str | None, environ=os.environ) -> bool:
    """Ask torch for huge pages (unless the user set ``THP_MEM_ALLOC_ENABLE``) if ``command`` decodes;
    ``True`` if they are on for this process.  No effect once torch has allocated memory."""
    if command in HUGE_PAGE_COMMANDS and "torch" not in sys.modules:
        environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from ..runtime import huge_pages_on

    return huge_pages_on(environ)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    huge_pages_for(next((a for a in argv if not a.startswith("-")), None))  # before anything imports torch
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    fn = COMMANDS.get(args.command) or getattr(args, "func", None)
    if getattr(args, "runtime", None):
        from ..export.serialization import set_default_runtime

        set_default_runtime(args.runtime)
    try:
        with _terminate_as_exception():
            result = fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"mmcompress {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception as e:  # one line for the user; a traceback only on request
        if os.environ.get("MMCOMPRESS_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mmcompress {args.command}: error: {msg}", file=sys.stderr)
        return 1
    if getattr(args, "json", False) and result is not None:
        from ..finite import json_safe

        nulled: list[str] = []
        result = json_safe(json.loads(json.dumps(result, default=str)), replaced=nulled)
        if nulled:
            print(f"warning: non-finite values written as null in the JSON output: {', '.join(nulled[:8])}"
                  + (f" (and {len(nulled) - 8} more)" if len(nulled) > 8 else ""), file=sys.stderr)
        sys.stdout.write(json.dumps(result, allow_nan=False) + "\n")
    return 0
