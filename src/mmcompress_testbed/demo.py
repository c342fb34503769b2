"""``mmcompress demo``: what the toolkit does, on real models, in one command.

1. Multimodal quantization on ``omni-mini`` (a Qwen2.5-Omni thinker: SmolLM2-135M decoder, the real
   Whisper-base audio tower, a small trained vision tower): RTN, SmoothQuant and MASQuant at W4A8
   with the same calibration mix of text, images and speech; text perplexity, speech word error rate,
   image question answering accuracy and per-modality SQNR (on held-out samples: `testbed-heldout`).
2. Activation sparsity on ``smollm2-135m``: dense, TEAL and LaRoSA at 40 % model-level sparsity;
   perplexity (in fp32), achieved sparsity and decode speed-up: the sparsified model in bf16 (the dtype it
   is served in) as the product decodes it (``DecodeEngine``: the fused C++ step where the model allows
   it, else the Python step) against the fastest dense path of the original model on the same machine
   (engine fp32, bf16, or bf16 on our GEMV kernel at 0 %), TEAL, LaRoSA and the dense variants interleaved in
   one run (``mmcompress.runtime.bench_decode.models_decode_speedup``); the row says which dense path was fastest
   (``decode_baseline``, the dense row's 1.0) and which step the sparse model took (``decode_path``, with
   the reason when it was not the fused step).

Everything is fetched offline on first use (``mmcompress testbed``).  One table is printed and a
Markdown report with the plots is written to ``--output``: built in a work directory next to it and
moved there when the run has finished (nothing half-written); an existing ``--output`` is replaced only
if it is an earlier demo's (its ``demo.json``) or with ``--overwrite``.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from mmcompress.cli.common import add_common

from .plugin import COMMANDS

SETTINGS = {
    # calibration samples (and their text length), MASQuant options, perplexity windows, ASR clips,
    # VQA items per question type, sparsity calibration samples, decode tokens
    # full: < 15 min on 2 cores (MASQuant's calibration is most of it)
    "full": dict(nsamples=16, seqlen=256, masquant=dict(epochs=2), ppl_windows=4, asr=20, vqa=5,
                 sparse_nsamples=8, tokens=32),
    # --quick: a smoke view (< 3 min on 2 cores); its figures are noisy, the full run is the one to quote
    "quick": dict(nsamples=6, seqlen=192, masquant=dict(epochs=1), ppl_windows=2,
                  asr=4, vqa=2, sparse_nsamples=4, tokens=16),
}


def register(subparsers) -> None:
    d = subparsers.add_parser("demo", help=COMMANDS["demo"][1])
    d.add_argument("--quick", action="store_true", help="fewer samples and evaluation items (about 3 minutes)")
    d.add_argument("--output", default="runs/demo", help="run directory for the JSON, plots and report.md")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--overwrite", action="store_true",
                   help="replace --output even if it is not an earlier demo run (default: refuse a non-empty one)")
    add_common(d)
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> dict:
    result = run_demo(args.output, quick=args.quick, device=args.device, progress=not args.no_progress,
                      runtime=getattr(args, "runtime", None) or "int", overwrite=args.overwrite)
    print(format_table(result["rows"]))
    print(f"report: {result['report']}  ({result['seconds']} s)")
    return result


def _log(msg: str):
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def earlier_demo(output) -> bool:
    """Whether ``output`` is a directory an earlier demo wrote (its ``demo.json`` has rows and settings)."""
    try:
        doc = json.loads((Path(output) / "demo.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"rows", "settings"} <= doc.keys()


def run_demo(output="runs/demo", quick: bool = False, device="cpu", multimodal_model="omni-mini",
             text_model="smollm2-135m", progress: bool = True, runtime: str = "int", overwrite: bool = False) -> dict:
    """``runtime``: how the quantized models are evaluated, as a loaded artifact would run (``int``: the
    integer kernels, ``reference``: the fake-quant forward).  ``output`` is written atomically
    (:func:`mmcompress.fileio.atomic_output_dir`); an existing one is replaced only if it is an earlier
    demo's (:func:`earlier_demo`) or ``overwrite``, refused (``OutputError``) before any work otherwise."""
    from mmcompress.fileio import atomic_output_dir

    final = Path(output)
    with atomic_output_dir(final, overwrite=overwrite or earlier_demo(final)) as work:
        result = _run_demo(work, quick, device, multimodal_model, text_model, progress, runtime)
    result["report"] = str(final / Path(result["report"]).name)
    return result


def _run_demo(out: Path, quick, device, multimodal_model, text_model, progress, runtime) -> dict:
    import torch

    from mmcompress.eval.perplexity import text_perplexity
    from mmcompress.eval.report import render_report
    from mmcompress.models.loading import load_hf_model
    from mmcompress.quant.api import quantize
    from mmcompress.quant.deployed import deploy

    from .data import calibration_set, eval_text, processor_for, tokenizer_for
    from .registry import fetch

    cfg = SETTINGS["quick" if quick else "full"]
    rows: list[dict] = []
    t_start = time.time()
    wiki = eval_text("wiki")

    # -- 1. multimodal quantization -------------------------------------------------------------
    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.vqa import accuracy

    _log(f"fetching {multimodal_model}")
    mm_dir = fetch(multimodal_model, progress=progress)
    base = load_hf_model(mm_dir, device=device)
    proc = processor_for(mm_dir)
    tok = tokenizer_for(mm_dir)
    calib = calibration_set("testbed", base, mm_dir, nsamples=cfg["nsamples"], seqlen=cfg["seqlen"], seed=0)
    counts = calib.token_counts(__import__("mmcompress.models.adapters", fromlist=["get_adapter"]).get_adapter(base).modality_token_ids)
    _log(f"calibration: {len(calib)} samples, tokens per modality {counts}")
    # SQNR on held-out samples (wiki test windows, image-qa-test, speech-test), not the calibration ones
    held = calibration_set("testbed-heldout", base, mm_dir, nsamples=cfg.get("heldout", 8), seqlen=cfg["seqlen"], seed=0)

    def evaluate_mm(model, name, extra):
        t0 = time.time()
        ppl = text_perplexity(model, tok, wiki, seqlen=cfg["seqlen"], max_windows=cfg["ppl_windows"], device=device,
                              progress=False)["ppl"]
        # spoken digits only (what the connector was trained for), with a short generation budget
        asr = word_error_rate(model, proc, "speech-test", limit=cfg["asr"], kinds=("digits",), max_new_tokens=16)
        vqa = accuracy(model, proc, "image-qa-test", limit_per_type=cfg["vqa"])
        row = {"part": "quantization", "model": multimodal_model, "method": name, "scheme": extra.get("scheme", "fp32"),
               "wiki_ppl": round(ppl, 3), "speech_wer": _r(asr.get("wer_digits", asr["wer"])),
               "image_qa_acc": _r(vqa["accuracy"]), **{k: v for k, v in extra.items() if k != "scheme"},
               "eval_s": round(time.time() - t0, 1)}
        _log(f"{name}: ppl {row['wiki_ppl']}, digit WER {row['speech_wer']}, image QA {row['image_qa_acc']}")
        return row

    rows.append(evaluate_mm(base, "fp32 (dense)", {}))
    from mmcompress.engine import ReferenceCache

    reference = ReferenceCache()  # the three methods share base's captures and uncompressed chains
    # SmoothQuant as MASQuant's baseline: o_proj smoothed too (a run-time division under GQA)
    methods = (("rtn", {}), ("smoothquant", {"runtime_smoothing": True}), ("masquant", dict(cfg["masquant"])))
    for n, (method, opts) in enumerate(methods, 1):
        _log(f"{method} W4A8 on {multimodal_model}")
        model = copy.deepcopy(base) if n < len(methods) else base  # the last one takes base itself
        t0 = time.time()
        quantize(model, calib, method, "w4a8", device=device, progress=progress, report_dir=out, report_calib=held,
                 report_plot=False, reference_cache=reference, **opts)  # render_report draws the plot at the end
        secs = round(time.time() - t0, 1)
        deploy(model, runtime, quiet=True)  # evaluated the way `mmcompress.load` would run the artifact
        report = json.loads(Path(model._mmcompress_description["report"]).read_text())
        sqnr = report["summary"].get("mean_sqnr_accumulated", {})
        extra = {"scheme": "w4a8", "calib_s": secs,
                 **{f"sqnr_{m}": round(v, 2) for m, v in sqnr.items()}}
        rows.append(evaluate_mm(model, method, extra))
        del model
    del base, reference

    # -- 2. activation sparsity -----------------------------------------------------------------
    from mmcompress.sparse.api import measure_sparsity, sparsify

    _log(f"fetching {text_model}")
    tx_dir = fetch(text_model, progress=progress)
    dense = load_hf_model(tx_dir, device=device)
    ttok = tokenizer_for(tx_dir)
    scal = calibration_set("wiki", dense, tx_dir, nsamples=cfg["sparse_nsamples"], seqlen=cfg["seqlen"], seed=0)
    ppl_dense = text_perplexity(dense, ttok, wiki, seqlen=cfg["seqlen"], max_windows=cfg["ppl_windows"], device=device,
                                progress=False)["ppl"]
    # the dense row is the decode baseline (1.0): the fastest dense path, named once a benchmark has run
    dense_row = {"part": "sparsity", "model": text_model, "method": "dense", "sparsity": 0.0,
                 "wiki_ppl": round(ppl_dense, 3), "decode_speedup": 1.0}
    rows.append(dense_row)
    served = {}  # the sparsified models in bf16, decoded together at the end (one interleaved run)
    for method in ("teal", "larosa"):
        _log(f"{method} 40% on {text_model}")
        model = copy.deepcopy(dense)
        t0 = time.time()
        sparsify(model, scal, method=method, sparsity=0.4, device=device, progress=progress)
        secs = round(time.time() - t0, 1)
        ppl = text_perplexity(model, ttok, wiki, seqlen=cfg["seqlen"], max_windows=cfg["ppl_windows"], device=device,
                              progress=False)["ppl"]
        achieved = measure_sparsity(model, scal.samples[:1])["model_sparsity"]
        rows.append({"part": "sparsity", "model": text_model, "method": method, "sparsity": round(achieved, 4),
                     "wiki_ppl": round(ppl, 3), "decode_speedup": None, "decode_baseline": None, "decode_path": None,
                     "decode_speedup_same_dtype": None, "calib_s": secs})
        _log(f"{method}: ppl {rows[-1]['wiki_ppl']}, sparsity {rows[-1]['sparsity']}")
        served[method] = model.to(torch.bfloat16)  # after its fp32 evaluation, the model as it is served
    speeds = {}
    try:
        speeds = _decode_speeds(served, dense, cfg)
    except Exception as e:  # report instead of failing the demo
        _log(f"decode benchmark skipped: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    for row in rows[-len(served):]:
        speed = speeds.get(row["method"], {})
        row.update(decode_speedup=_r(speed.get("speedup")), decode_baseline=speed.get("dense_baseline"),
                   decode_path=_path_cell(speed), decode_speedup_same_dtype=_r(speed.get("speedup_same_dtype")))
        if speed and dense_row.get("decode_baseline") is None:
            dense_row.update(decode_baseline=speed["dense_baseline"],
                             decode_path=speed["variants_step"][speed["dense_baseline"]])
        if speed:
            _log(f"{row['method']}: decode speed-up {row['decode_speedup']} vs {row['decode_baseline']} "
                 f"(step: {row['decode_path']}; tok/s {speed.get('variants_tok_s')})")
    del served
    result = {"rows": rows, "settings": cfg, "quick": quick, "seconds": round(time.time() - t_start, 1),
              "calibration_tokens": counts, "threads": torch.get_num_threads(),
              "notes": ["W4A8 = per-channel symmetric 4-bit weights, per-token dynamic 8-bit activations "
                        "on the decoder's linears; attention matmuls and the KV cache stay in floating point",
                        "omni-mini's decoder was distributed as dequantized 4-bit weights (see docs/testbed.md)",
                        "speech_wer is the word error rate on the spoken-digit clips of speech-test",
                        "LaRoSA numbers come from the merged (Mode M) model",
                        "decode_speedup: the sparse model in bf16 on mmcompress's decode engine against the "
                        "fastest dense path of the original model (decode_baseline), interleaved in one process"]}
    from mmcompress.fileio import atomic_write_text

    atomic_write_text(out / "demo.json", json.dumps(result, indent=1))
    result["report"] = str(render_report(out))
    return result


def _decode_speeds(served: dict, dense, cfg) -> dict[str, dict]:
    """The decode speed-ups of the sparsified models ``served`` (bf16 copies) on the product's engine,
    against the fastest dense variant of the original ``dense``, all in one interleaved run
    (:func:`mmcompress.runtime.bench_decode.models_decode_speedup`: the dense variants are decoded once per
    round for all of them)."""
    from mmcompress.runtime.bench_decode import dense_variants, models_decode_speedup

    return models_decode_speedup(served, tokens=cfg["tokens"], rounds=2, baselines=dense_variants(dense))


def _path_cell(speed: dict) -> str | None:
    """``decode_path`` of a row: the step the sparse model took, and why not the fused one."""
    path = speed.get("decode_path")
    if path is None or path == "fused":
        return path
    return f"{path} (no fused step: {speed.get('fused_problem')})"


def _r(v, nd=4):
    return None if v is None else round(float(v), nd)


def format_table(rows: list[dict]) -> str:
    cols = ["model", "method", "scheme", "sparsity", "wiki_ppl", "speech_wer", "image_qa_acc", "sqnr_text",
            "sqnr_image", "sqnr_audio", "decode_speedup", "decode_baseline", "decode_path"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    table = [cols] + [["–" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
