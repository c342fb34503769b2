"""What the subcommands share: the one-line error, the common arguments, ``--calib`` / named sets, and the
method flags generated from the methods' options (:func:`add_method_flags`, :func:`method_options`).

Subcommand modules (``sparse/cli.py``, ``export/cli.py``, ``runtime/cli.py``, ...) import these; the
parser itself is :func:`mmcompress.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path

from ..options import OptionError, flag_of


class CLIError(Exception):
    """An error to report as one line."""


def add_common(p: argparse.ArgumentParser):
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--runtime", choices=["int", "reference"], default=None,
                   help="how loaded artifacts run: int (integer kernels, default) or reference (fake-quant)")


def add_trust(p: argparse.ArgumentParser):
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run Python files shipped in the model directory (a config's auto_map: custom model, "
                        "tokenizer or processor classes, e.g. MiniCPM-Llama3-V-2.5's modeling_minicpmv.py); off by "
                        "default, when such code is never imported")


def add_calib(p: argparse.ArgumentParser, required: bool = True):
    p.add_argument("--calib", required=required,
                   help="calibration data: a text file, a .jsonl file ({'text','images','audio'}), or a testbed name "
                        "(wiki, testbed)" + ("" if required else "; without it, rtn runs data-free (tensor by tensor)"))
    p.add_argument("--nsamples", type=int, default=128, help="number of calibration samples (default 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per text calibration sample (default 512)")
    p.add_argument("--seed", type=int, default=0)


def add_overwrite(p: argparse.ArgumentParser):
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty --output (atomically; never one that is, contains or is "
                        "inside the input, nor the working directory)")


def load_calibration(spec: str, model, model_dir, nsamples: int, seqlen: int, seed: int, *,
                     trust_remote_code: bool = False):
    """Resolve ``--calib``: a file path, or a named set (:mod:`mmcompress.data.named`, e.g. the testbed's)."""
    from ..data.calibration import CalibrationSet
    from ..models.loading import load_tokenizer

    path = Path(spec)
    if path.exists() or "/" in spec or spec.endswith((".txt", ".jsonl")):
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {spec} does not exist")
        if path.suffix == ".jsonl":
            from ..models.processing import load_processor

            return CalibrationSet.from_jsonl(path, load_processor(model_dir, trust_remote_code=trust_remote_code),
                                             nsamples=nsamples, seed=seed)
        return CalibrationSet.from_text_file(path, load_tokenizer(model_dir, trust_remote_code=trust_remote_code),
                                             nsamples, seqlen, seed)
    build = named_set("calibration", spec, "calibration file")
    return build(model, model_dir, nsamples=nsamples, seqlen=seqlen, seed=seed)


def named_set(kind: str, spec: str, what: str):
    """The named set ``spec`` of ``kind`` (:mod:`mmcompress.data.named`), which ``what`` was not."""
    from ..data import named

    try:
        return named.resolve(kind, spec)
    except named.UnknownSet as e:
        raise FileNotFoundError(f"{what} {spec} does not exist and is not a named {kind} set "
                                f"({', '.join(e.known) or 'none installed'})") from None


def check_calib_spec(spec: str, nsamples: int, seqlen: int) -> None:
    """Cheap checks of ``--calib`` before the model is loaded."""
    if nsamples < 1:
        raise CLIError(f"--nsamples must be >= 1, got {nsamples}")
    if seqlen < 2:
        raise CLIError(f"--seqlen must be >= 2, got {seqlen}")
    path = Path(spec)
    if path.exists() or "/" in spec or spec.endswith((".txt", ".jsonl")):
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {spec} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace") if path.stat().st_size else ""
        if not text.strip():
            raise CLIError(f"calibration file {spec} is empty")
        if path.suffix != ".jsonl":
            from ..data.calibration import check_text

            check_text(text, f"calibration file {spec}", warn=False)


def input_paths(model, calib=None) -> list:
    """Paths an --output must not overlap: the model directory and a calibration file."""
    return [model] + ([calib] if calib and Path(calib).exists() else [])


def on_ranks(fn, args):
    """``fn(args)`` on every rank ``torchrun`` started, joined in one process group (gloo on CPU, NCCL on
    CUDA); rank 0's result (printed once), ``None`` on the others."""
    import contextlib

    from ..distributed import joined

    with joined(args.device) as world, contextlib.ExitStack() as stack:
        if world.rank:  # one report on stderr: rank 0's (an error on any rank still reaches main())
            stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        result = fn(args)
    return result if world.rank == 0 else None


def whole_model_notice(command: str, why: str) -> None:
    """The one line saying that ``command`` loads the whole model into memory instead of streaming it."""
    import sys

    print(f"mmcompress {command}: notice: loading the whole model into memory (not streamed: {why})", file=sys.stderr)


# -- method flags, generated from the methods' Options --------------------------------------------------


def method_flags(methods: dict) -> dict[str, list]:
    """``{flag: [(method, field), ...]}``: every command-line option of ``methods`` (``{name: class}``,
    each class with an ``Options`` dataclass), with the methods that take it, in registry order."""
    out: dict[str, list] = {}
    for name, cls in methods.items():
        for f in fields(cls.Options):
            if f.metadata.get("cli", True):
                out.setdefault(flag_of(f), []).append((name, f))
    return out


def add_method_flags(parser: argparse.ArgumentParser, methods: dict, title: str = "method options") -> None:
    """One flag per option of ``methods`` (:func:`method_flags`); a flag several methods take is one flag
    (their defaults are in its help).  Not given, a flag is ``None``: the method's default applies."""
    group = parser.add_argument_group(title, "each flag is the recipe key of the same name (dashes become "
                                             "underscores); a flag --method does not take is an error")
    for flag, uses in method_flags(methods).items():
        group.add_argument(flag, **_flag_arguments(flag, uses, len(methods)))


def _flag_type(f):
    parse = f.metadata.get("parse")
    return parse if parse is not None else type(f.default)


def _flag_arguments(flag: str, uses: list, n_methods: int) -> dict:
    f = uses[0][1]
    if len({u.name for _, u in uses}) > 1 or len({_flag_type(u) for _, u in uses}) > 1:
        raise TypeError(f"{flag}: the methods {', '.join(m for m, _ in uses)} disagree on its option's name or type")
    kw = {"dest": f.name, "default": None, "help": _flag_help(uses, n_methods),
          "required": all(u.metadata.get("required") for _, u in uses)}
    if _flag_type(f) is bool:
        return {**kw, "action": argparse.BooleanOptionalAction}
    kw["type"] = _parse_flag(_flag_type(f))
    checks = [u.metadata["check"] for _, u in uses]
    if all(hasattr(c, "values") for c in checks):
        kw["choices"] = list(dict.fromkeys(v for c in checks for v in c.values))
    return kw


def _parse_flag(parse):
    def run(text: str):
        try:
            return parse(text)
        except (ValueError, TypeError) as e:
            raise argparse.ArgumentTypeError(str(e) if parse not in (int, float) else
                                             f"expected {'an integer' if parse is int else 'a number'}, got {text!r}")
    run.__name__ = getattr(parse, "__name__", "value")
    return run


def _flag_help(uses: list, n_methods: int) -> str:
    """The fields' help, once per distinct text, with the methods that take it when not all do and
    their defaults."""
    def shown(v):
        if isinstance(v, bool):
            return "on" if v else "off"
        return ",".join(map(str, v)) if isinstance(v, tuple) else v

    by_help: dict[str, list] = {}
    for m, f in uses:
        by_help.setdefault(f.metadata.get("help", ""), []).append((m, f.default))
    parts = []
    for text, ms in by_help.items():
        defaults = {repr(d) for _, d in ms}
        if len(defaults) == 1:
            d = ms[0][1]
            default = "" if d is None or all(f.metadata.get("required") for _, f in uses) else f" (default {shown(d)})"
        else:
            default = " (default " + "; ".join(f"{m} {shown(d)}" for m, d in ms) + ")"
        who = "" if len(by_help) == 1 and len(uses) == n_methods else ", ".join(m for m, _ in ms) + ": "
        parts.append(f"{who}{text}{default}")
    return "; ".join(parts).replace("%", "%%")


def method_options(args, methods: dict, method: str) -> dict:
    """The method flags given in ``args`` as the options of ``method`` (a key of ``methods``), checked
    by its ``Options``: a flag it does not take, or a bad value, is a :class:`CLIError` with the
    recipe's message (the flag in place of the key)."""
    flags = method_flags(methods)
    own = {f.name for f in fields(methods[method].Options)}
    valid = tuple(sorted(flag for flag, uses in flags.items() if any(m == method for m, _ in uses)))
    flag_of_key = {uses[0][1].name: flag for flag, uses in flags.items()}
    given = {}
    for flag, uses in flags.items():
        key = uses[0][1].name
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in own:
            raise CLIError(OptionError(key, "", known=(), method=method).message(flag, valid))
        given[key] = value
    try:
        return methods[method].Options.check(given, method)
    except OptionError as e:
        raise CLIError(e.message(flag_of_key.get(e.key, e.key), valid)) from None


def add_resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    p.add_argument("--checkpoint-dir", help="per-layer checkpoints (default: OUTPUT.ckpt)")


def check_not_on_ranks(args, world) -> None:
    """``--resume`` and ``--checkpoint-dir`` are one-process features: refused under ``torchrun``."""
    if world.size > 1:
        for flag, value in (("--resume", args.resume), ("--checkpoint-dir", args.checkpoint_dir)):
            if value:
                raise CLIError(f"{flag} is not supported under torchrun yet")


def add_streaming(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", action="store_true",
                   help="the default: read one decoder layer at a time from the checkpoint (peak memory: one layer "
                        "plus the calibration activations; docs/scaling.md); with this flag a model that cannot be "
                        "streamed is an error instead of a notice and an in-memory load")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model into memory instead of streaming its layers (the same artifact)")


def load_streamed(args, command: str, why_not):
    """The streamed model (:mod:`mmcompress.streaming`), or ``None`` with a one-line notice saying why the
    whole model is loaded instead (an error under ``--stream``); ``why_not(adapter)``: why a streamed run
    would not match the in-memory one, or ``None``."""
    from ..models.adapters import get_adapter
    from ..streaming import StreamError, load_streamed as load

    if args.stream and args.in_memory:
        raise CLIError("--stream and --in-memory exclude each other")
    if args.in_memory:
        return None
    try:
        model = load(args.model, args.dtype, trust_remote_code=args.trust_remote_code)
        why = why_not(get_adapter(model))
    except StreamError as e:
        model, why = None, str(e)
    if why is None:
        return model
    if args.stream:
        raise CLIError(f"--stream: {why}; run with --in-memory")
    del model
    whole_model_notice(command, why)
    return None


def write_artifact(args, command: str, inputs: list, compute, why_not=lambda adapter: None, *,
                   resumable: bool = False):
    """Load ``args.model`` streamed (the default) or whole, run ``compute(model, checkpoint_dir)`` and save
    ``args.output``; returns the model.  The checkpoint directory (ours alone and locked) holds a streamed
    run's finished layers, and a resumable run's checkpoints (``None`` is passed for an in-memory run that
    is not resumable): ``--checkpoint-dir``, else ``OUTPUT.ckpt`` for a resumable run and a new hidden
    directory next to the output for the others.  Its files are removed once the artifact is written, or
    on failure unless a resumable run left something to resume.  A streamed recipe whose steps walk more
    than once writes the previous walk's result as an intermediate model into a work directory of ours
    beside the output (:class:`mmcompress.fileio.WorkDir`), removed at the end whatever happens.

    Under ``torchrun`` (:mod:`mmcompress.distributed`) every rank loads the model the same way (streamed:
    each rank reads each decoder layer from the input shards itself) and calibrates on its block of the
    samples; rank 0 alone has a checkpoint directory (a new hidden one: such a run is not resumable) and
    writes the artifact, the other ranks free each layer once it is done."""
    from ..distributed import current
    from ..engine import is_checkpoint_file
    from ..export.serialization import load_model, save
    from ..fileio import CheckpointDir, WorkDir, check_output

    world = current()
    writer = world.rank == 0
    resumable = resumable and world.size == 1
    out = Path(args.output)
    real_out = check_output(out, overwrite=args.overwrite, inputs=inputs)
    given = getattr(args, "checkpoint_dir", None)
    if given and world.size > 1:
        raise CLIError("--checkpoint-dir is not supported under torchrun yet")
    private = ck = ckpt = None
    if writer and (given or resumable):
        ckpt = Path(given) if given else real_out.parent / f"{real_out.name}.ckpt"
        real_ck = Path(os.path.realpath(ckpt))
        if real_ck == real_out or real_out in real_ck.parents or real_ck in real_out.parents:
            raise CLIError(f"--checkpoint-dir {ckpt} overlaps --output {out}; give a directory outside it")
        check_output(ckpt, overwrite=True, inputs=inputs, flag="--checkpoint-dir")
    elif writer:  # nothing to resume: a new directory of our own next to the output (same file system), removed after
        import tempfile

        real_out.parent.mkdir(parents=True, exist_ok=True)
        ckpt = private = Path(tempfile.mkdtemp(prefix=f".{real_out.name}.ckpt-", dir=real_out.parent))
    if ckpt is not None:  # rank 0's only: it keeps the finished layers
        ck = CheckpointDir(ckpt).open()  # ours alone and locked: a second run on the same output stops here
    work = None  # beside the output: a streamed recipe's intermediate model (streaming.restream), removed after
    try:
        model = load_streamed(args, command, why_not)
        streamed = model is not None
        if streamed and writer:
            work = model._mmcompress_stream.workdir = WorkDir(real_out)
        if not streamed:
            model = load_model(args.model, dtype=args.dtype, runtime="reference",
                               trust_remote_code=args.trust_remote_code)
        compute(model, ck if streamed or resumable else None)
        if streamed and not writer:
            model._mmcompress_stream.close()
        elif streamed:
            from ..streaming import save_streamed

            save_streamed(model, out, ck.path, source_dir=args.model, overwrite=args.overwrite, inputs=inputs)
        elif writer:
            save(model, out, source_dir=args.model, overwrite=args.overwrite, inputs=inputs)
        if ck is not None:
            ck.remove(is_checkpoint_file)
        world.barrier()  # every rank returns once the artifact is there
    except BaseException:
        if ck is not None and not (resumable and (ck.path / "state.json").exists()):  # nothing worth resuming
            ck.remove(is_checkpoint_file)
        raise
    finally:
        if work is not None:
            work.remove()
        if ck is not None:
            ck.close()
        if private is not None and private.is_dir() and not any(private.iterdir()):
            private.rmdir()
    return model
