"""lm-evaluation-harness on compressed artifacts (optional extra ``[eval]``: ``lm-eval>=0.4``).

The artifact is loaded with :func:`mmcompress.load`, so our ``QuantLinear`` / sparse modules run
(fake-quantized W8A8/W4A8/W4A6 activations, Top-K sparsity, MASQuant's text path); the model is
then handed to lm-eval's ``HFLM`` as an already-built ``pretrained=model`` with its tokenizer.
The class is registered in lm-eval's registry under the name ``mmcompress``.

lm-eval's own ``lm_eval`` command does not discover third-party models, so use one of::

    mmcompress lm-eval DIR --tasks hellaswag,arc_easy [--limit N] [--json]
    python -m mmcompress.eval.lm_eval_adapter --model mmcompress --model_args path=DIR --tasks hellaswag

(the second form is lm-eval's own command line, after registering the ``mmcompress`` model), or in
Python ``import mmcompress.eval.lm_eval_adapter`` before ``lm_eval.simple_evaluate(model="mmcompress",
model_args="path=DIR", ...)``.  lm-eval is imported only when needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..cli.common import CLIError, add_common, add_trust

_CLASS = None


def register_lm_eval_model():
    """Define and register the lm-eval model class ``mmcompress`` (idempotent); returns the class."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise ImportError("lm-eval is not installed: pip install 'mmcompress[eval]'") from None

    @register_model("mmcompress")
    class MMCompressLM(HFLM):
        """An mmcompress artifact (or plain local Hugging Face directory) evaluated by lm-eval.

        ``path`` (alias ``pretrained``): the directory; ``device``: where to run it; ``dtype`` applies to
        plain Hugging Face directories only (artifacts keep their saved dtype)."""

        def __init__(self, path: str | None = None, pretrained=None, device: str | None = "cpu", dtype=None,
                     batch_size=1, max_length=None, trust_remote_code: bool = False, **kwargs):
            import torch

            from ..export.serialization import load_model
            from ..models.loading import load_tokenizer

            path = path or pretrained
            if not isinstance(path, (str, Path)):
                raise ValueError("model_args needs path=DIR (an mmcompress artifact or local HF directory)")
            device = device or "cpu"
            if device == "cuda" and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's default device
            dtype = dtype if dtype not in (None, "auto") else torch.float32
            model = load_model(str(path), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            kwargs.pop("backend", None)
            super().__init__(pretrained=model, tokenizer=load_tokenizer(str(path), trust_remote_code=trust_remote_code), backend="causal",
                             batch_size=batch_size, max_length=max_length, **kwargs)
            self.mmcompress_path = str(path)
            self.mmcompress_description = getattr(model, "_mmcompress_description", None)

    _CLASS = MMCompressLM
    return _CLASS


def __getattr__(name):  # ``from mmcompress.eval.lm_eval_adapter import MMCompressLM`` (imports lm-eval)
    if name == "MMCompressLM":
        return register_lm_eval_model()
    raise AttributeError(name)


def evaluate(path, tasks, *, limit=None, num_fewshot=None, batch_size=1, device="cpu", include_path=None,
             include_defaults: bool = True, seed: int = 0, log_samples: bool = False,
             trust_remote_code: bool = False) -> dict:
    """Run ``lm_eval.simple_evaluate`` on the artifact at ``path``; returns lm-eval's result dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    cls = register_lm_eval_model()
    tasks = [t for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t]
    if not tasks:
        raise ValueError("no tasks given")
    lm = cls(path=str(path), device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=log_samples,
        bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed)


def summarize(results: dict) -> dict:
    """The JSON-friendly part of lm-eval's output: metrics per task, versions, sample counts."""
    per_task = {task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in results["results"].items()}
    return {"results": per_task, "versions": results.get("versions", {}), "n-samples": results.get("n-samples", {}),
            "lm_eval_version": results.get("lm_eval_version") or _version()}


def _version():
    try:
        import importlib.metadata as md

        return md.version("lm_eval")
    except Exception:  # noqa: BLE001
        return None


# -- CLI plugin: ``mmcompress lm-eval`` -----------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("lm-eval", help="evaluate a model or artifact with lm-evaluation-harness tasks")
    p.add_argument("model", help="mmcompress artifact or local Hugging Face directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=float, default=None, help="documents per task (an integer, or a fraction < 1)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", default=1, help="batch size (an integer or 'auto')")
    p.add_argument("--include-path", help="directory of extra task YAML files (local tasks, offline)")
    p.add_argument("--no-default-tasks", action="store_true",
                   help="only index tasks under --include-path (faster start-up)")
    p.add_argument("--seed", type=int, default=0)
    add_common(p)
    add_trust(p)
    p.set_defaults(func=cmd_lm_eval)


def cmd_lm_eval(args) -> dict:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CLIError("lm-eval is not installed: pip install 'mmcompress[eval]'") from None
    if args.no_default_tasks and not args.include_path:
        raise CLIError("--no-default-tasks needs --include-path")
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    batch = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    res = evaluate(args.model, args.tasks, limit=limit, num_fewshot=args.num_fewshot, batch_size=batch,
                   device=args.device, include_path=args.include_path, include_defaults=not args.no_default_tasks,
                   seed=args.seed, trust_remote_code=args.trust_remote_code)
    out = {"model": str(args.model), "tasks": args.tasks.split(","), "limit": limit, **summarize(res)}
    for task, metrics in out["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        print(f"{task}: {shown}", file=sys.stderr)
    return out


def main(argv=None) -> None:
    """lm-eval's own command line with the ``mmcompress`` model registered."""
    register_lm_eval_model()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":  # pragma: no cover
    main()
