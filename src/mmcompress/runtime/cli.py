"""The decode engine's commands (a CLI plugin):

``mmcompress generate MODEL_DIR --prompt TEXT``: text from an artifact or a plain model directory on the
decode engine (batch 1, greedy unless ``--temperature``), streamed to stdout token by token.

``mmcompress bench decode MODEL_DIR``: tokens/s of the engine on the user's model (``runtime/bench_decode.py``).
The kernel and synthetic-stack benchmarks are lab scripts: ``benchmarks/kernel_bench.py`` and
``benchmarks/stack_decode.py``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..cli.common import CLIError, add_common, add_trust


_LAB_BENCHMARKS = ("the kernel and synthetic-stack benchmarks are lab scripts: python benchmarks/kernel_bench.py, "
                   "python benchmarks/stack_decode.py llama2-7b:4")


def register(subparsers) -> None:
    _register_generate(subparsers)
    _register_bench(subparsers)


def _register_generate(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from an artifact or model directory on the decode engine "
                                               "(batch 1, streamed)")
    g.add_argument("model", help="mmcompress artifact or local Hugging Face model directory")
    g.add_argument("--prompt", required=True, help="the prompt text (tokenized as is, with the tokenizer's special tokens)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (default 64; stops at EOS)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0 = all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--dtype", default="auto", help="plain model directories: auto (the checkpoint's), float32, "
                                                   "bfloat16, float16 (artifacts run in their own dtype)")
    g.add_argument("--compile", action="store_true",
                   help="capture the single-token step with torch.compile (experimental; docs/runtime.md)")
    g.add_argument("--step", choices=("auto", "fused", "python"), default="auto",
                   help="decode step of Llama-family models: fused = one C++ call per token (auto: when every layer "
                        "is supported, else the Python step; fused: the same, with a one-line notice when it falls "
                        "back); python = the engine's Python step")
    g.add_argument("--head", choices=("model", "bf16", "int8"), default="model",
                   help="LM head of the fused step: model = the model's own (default; the reference logits); "
                        "bf16 / int8 = a packed copy (int8: one step size per row) that the step reads in 2 / 1 "
                        "bytes per weight; logits change by the head's rounding (docs/runtime.md)")
    add_common(g)
    add_trust(g)
    g.set_defaults(func=cmd_generate)


def _register_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="decode speed of an artifact or model directory",
                              description="Decode speed of the user's model; " + _LAB_BENCHMARKS + ".")
    sub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    d = sub.add_parser("decode", help="decode tokens/s of an artifact or model directory: the decode engine on it vs "
                                      "on the dense model vs HF generate")
    d.add_argument("model", help="a model directory: an mmcompress artifact or a plain Hugging Face model")
    d.add_argument("--sparsity", type=float, default=None, help="input sparsity of every Top-K projection (overrides K)")
    d.add_argument("--tokens", type=int, default=16, help="decoded tokens per run (default 16)")
    d.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    d.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default 3)")
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--compile", action="store_true", help="capture the compressed model's decode step with torch.compile")
    add_common(d)
    add_trust(d)
    d.set_defaults(func=cmd_bench_decode)
    # the old `bench kernel ...`: unlisted, takes any arguments, answers with where it went
    k = sub.add_parser("kernel", add_help=False, prefix_chars="\0")
    k.add_argument("args", nargs="*")
    k.set_defaults(func=_cmd_bench_none)
    p.set_defaults(func=_cmd_bench_none)


def _cmd_bench_none(args):
    if getattr(args, "bench_command", None) == "kernel":
        raise CLIError("bench kernel is a lab script now: python benchmarks/kernel_bench.py " + " ".join(args.args))
    raise CLIError("choose a benchmark: mmcompress bench decode MODEL_DIR (" + _LAB_BENCHMARKS + ")")


def cmd_bench_decode(args) -> dict:
    from .bench_decode import engine_decode_benchmark

    if args.tokens < 1:
        raise CLIError("--tokens must be >= 1")
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        raise CLIError(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.threads:
        if args.threads < 1:
            raise CLIError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"{args.model} is not a model directory ({_LAB_BENCHMARKS})")
    if not (path / "config.json").is_file():
        raise CLIError(f"{path} is not a model directory (no config.json)")
    if args.device != "cpu":
        raise CLIError("bench decode of a model directory runs on the CPU")
    if args.prompt < 1:
        raise CLIError("--prompt must be >= 1")
    return engine_decode_benchmark(path, prompt=args.prompt, tokens=args.tokens, rounds=args.rounds,
                                   compile=args.compile, sparsity=args.sparsity,
                                   trust_remote_code=args.trust_remote_code, log=sys.stderr)


def _check_args(args) -> None:
    if not args.prompt.strip():
        raise CLIError("--prompt is empty")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None and args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise CLIError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0.0 < args.top_p <= 1.0:
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")


class _Stream:
    """Prints the text of the new tokens as they come (whole-sequence decoding, so multi-byte characters
    split over tokens appear once complete)."""

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        if self.out is None:
            return
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def end(self) -> None:
        if self.out is not None:
            text = self.tok.decode(self.ids, skip_special_tokens=True)
            self.out.write(text[len(self.shown):] + "\n")
            self.out.flush()


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def cmd_generate(args) -> dict:
    from ..export.serialization import is_artifact, load_model
    from ..models.loading import load_tokenizer, read_config
    from .decode import DecodeEngine
    from .generate import prepare

    _check_args(args)
    path = Path(args.model)
    read_config(path, trust_remote_code=args.trust_remote_code)  # a missing directory / config.json: one line
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise CLIError(f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    try:
        tok = load_tokenizer(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        if "trust-remote-code" in str(e):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"{path}: the tokenizer cannot be loaded ({msg})") from None
    ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise CLIError("--prompt gives no tokens")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(path, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    prepare(model)
    load_s = time.perf_counter() - t0
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tok.eos_token_id
    stream = _Stream(tok, None if args.json else sys.stdout)
    sample = args.temperature > 0
    n = args.max_new_tokens
    timings: dict = {}
    if type(model).__name__.endswith("ForCausalLM"):  # text-only decoders: the engine (fast or hf path)
        eng = DecodeEngine(model, max_len=ids.shape[1] + n, compile=args.compile,
                           fused={"auto": None, "fused": True, "python": False}[getattr(args, "step", "auto")],
                           head=getattr(args, "head", "model"))
        out = eng.generate(ids, n, do_sample=sample, temperature=args.temperature or 1.0, top_k=args.top_k,
                           top_p=args.top_p, generator=torch.Generator(device=eng.device).manual_seed(args.seed),
                           eos_token_id=eos, timings=timings, on_token=stream)
        path_used, compiled, fused = eng.path, eng.compiled, eng.fused
        head = eng._fused.head if eng._fused is not None else "model"
    else:  # multimodal wrappers and other heads: transformers' generate, streamed the same way
        path_used, compiled, fused, head = "transformers", False, False, "model"
        out = _hf_generate(model, ids, n, sample, args, stream)
    stream.end()
    steps = timings.get("step_s") or []
    res = {"model": str(path), "artifact": is_artifact(path), "runtime": getattr(model, "_mmcompress_runtime", None),
           "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""), "decode_path": path_used,
           "compiled": compiled, "fused": fused, "head": head, "threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1]),
           "new_tokens": int(out.shape[1] - ids.shape[1]), "ids": out[0, ids.shape[1]:].tolist(),
           "text": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), "load_s": round(load_s, 3)}
    if timings:
        res["prefill_s"] = round(timings["prefill_s"], 4)
        res["tok_s"] = round(len(steps) / sum(steps), 3) if steps and sum(steps) > 0 else None
    print(f"mmcompress generate: {res['new_tokens']} tokens after {res['prompt_tokens']} ({path_used} path"
          + (", compiled" if compiled else "") + (", fused step" if fused else "") + (f"; prefill {res['prefill_s']} s" if timings else "")
          + (f", decode {res['tok_s']} tok/s" if res.get("tok_s") else "") + ")", file=sys.stderr)
    return res


def _hf_generate(model, ids, n, sample, args, stream):
    class _Streamer:  # transformers' streamer protocol: put(prompt), put(token)..., end()
        first = True

        def put(self, value):
            if self.first:
                self.first = False
                return
            for t in value.reshape(-1).tolist():
                stream(int(t))

        def end(self):
            pass

    if sample:
        torch.manual_seed(args.seed)
    kw = dict(do_sample=True, temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p) if sample \
        else dict(do_sample=False)
    dev = model.get_input_embeddings().weight.device
    return type(model).generate(model, ids.to(dev), max_new_tokens=n, streamer=_Streamer(), **kw).cpu()


__all__ = ["cmd_bench_decode", "cmd_generate", "register"]
