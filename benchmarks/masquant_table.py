"""MASQuant vs baselines on a testbed multimodal model, one run, one table.

    python benchmarks/masquant_table.py --model omni-mini --schemes w4a8 w4a6 --nsamples 128 \
        --out runs/masquant-omni-mini

For every scheme: RTN, SmoothQuant, MBQ, MASQuant with CMC (one shared weight) and MASQuant "split"
(one weight per modality, the training form) are calibrated on the SAME samples (the testbed mix of
wiki text, calibration images and speech, disjoint from the test sets), then evaluated on wiki
perplexity, speech-test word error rate (digits; sentences reported too), image-qa-test accuracy (exact
match of the greedy answer, and multiple choice by likelihood: it still ranks methods when W4 breaks
the answer format) and
the mean per-modality SQNR of decoder-layer outputs (pooled over tokens, and the per-token median that
an attention-sink token cannot dominate), measured on held-out samples (``--heldout``, ``testbed-heldout``).  Calibration wall time and peak RSS are
measured per method in this process (ratios are what to compare: the machine is shared).
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path

import psutil
import torch


class PeakRSS:
    def __init__(self):
        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="omni-mini")
    ap.add_argument("--schemes", nargs="+", default=["w4a8", "w4a6"])
    ap.add_argument("--methods", nargs="+", default=["rtn", "smoothquant", "mbq", "masquant", "masquant-split"])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--asr", type=int, default=50, help="speech-test spoken-digit clips")
    ap.add_argument("--vqa", type=int, default=20, help="image-qa-test items per question type")
    ap.add_argument("--heldout", type=int, default=16,
                    help="SQNR on this many testbed-heldout samples (wiki test, image-qa-test, speech-test); 0 = on "
                         "the calibration samples (in-sample, as before issue 17)")
    ap.add_argument("--out", default="runs/masquant")
    ap.add_argument("--skip-dense", action="store_true", help="do not evaluate the unquantized model")
    ap.add_argument("--part", help="run a slice of the table in its own process: rows go to OUT/parts/PART.json "
                                   "(same --out, calibration set and seed for every part); join them with --merge")
    ap.add_argument("--merge", action="store_true", help="join OUT/parts/*.json into one table and render it")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        return merge_parts(out)

    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.perplexity import text_perplexity
    from mmcompress.eval.report import render_report
    from mmcompress.eval.vqa import accuracy, choice_accuracy
    from mmcompress.models.adapters import get_adapter
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.models.processing import load_processor
    from mmcompress.quant.api import quantize
    from mmcompress_testbed.data import calibration_set, eval_text
    from mmcompress_testbed.registry import fetch

    out.mkdir(parents=True, exist_ok=True)
    table = out / "masquant_table.json"
    if args.part:
        (out / "parts").mkdir(exist_ok=True)
        table = out / "parts" / f"{args.part}.json"
    path = fetch(args.model)
    base = load_hf_model(path)
    proc, tok = load_processor(path), load_tokenizer(path)
    wiki = eval_text("wiki")
    calib = calibration_set("testbed", base, path, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
    counts = calib.token_counts(get_adapter(base).modality_token_ids)
    held = (calibration_set("testbed-heldout", base, path, nsamples=args.heldout, seqlen=args.seqlen, seed=0)
            if args.heldout else None)
    print(f"calibration: {len(calib)} samples, tokens {counts}", flush=True)

    has_audio = "audio" in get_adapter(base).modality_token_ids  # vl-mini: text + image only

    def evaluate(model):
        ppl = text_perplexity(model, tok, wiki, seqlen=1024, max_windows=args.ppl_windows, progress=False)
        row = {"wiki_ppl": round(ppl["ppl"], 3)}
        if has_audio:
            asr = word_error_rate(model, proc, "speech-test", limit=args.asr, kinds=("digits",), max_new_tokens=16)
            row["wer_digits"] = asr["wer_digits"]
            row["wer_digits_ins"] = round(asr["errors_digits"]["ins"], 4)  # the part of the WER from extra words
        vqa = accuracy(model, proc, "image-qa-test", limit_per_type=args.vqa)
        choice = choice_accuracy(model, proc, "image-qa-test", limit_per_type=args.vqa)
        return {**row, "image_qa_acc": vqa["accuracy"], "image_qa_by_type": vqa["by_type"],
                "image_qa_choice": choice["accuracy"], "image_qa_choice_by_type": choice["by_type"]}

    rows = [] if args.skip_dense else [{"scheme": "fp32", "method": "dense", **evaluate(base)}]
    if rows:
        print(json.dumps(rows[-1]), flush=True)
    for scheme in args.schemes:
        for name in args.methods:
            method, opts = name, {}
            if name == "smoothquant":
                opts = {"runtime_smoothing": True}  # as MASQuant's baseline: o_proj smoothed too
            elif name == "masquant":
                opts = {"epochs": args.epochs, "cmc": "whitened"}
            elif name == "masquant-split":
                method, opts = "masquant", {"epochs": args.epochs, "cmc": "split"}
            model = copy.deepcopy(base)
            t0 = time.time()
            with PeakRSS() as mem:
                quantize(model, calib, method, scheme, progress=True, report_dir=out, report_tag=name, report_calib=held,
                         **opts)
            secs = time.time() - t0
            rep = json.loads(Path(model._mmcompress_description["report"]).read_text())
            row = {"scheme": scheme, "method": name, **evaluate(model), "calib_s": round(secs, 1),
                   "calib_peak_rss_gib": round(mem.peak / 2**30, 2), "calib_extra_rss_gib": round((mem.peak - mem.base) / 2**30, 2),
                   **{f"sqnr_{m}": round(v, 2) for m, v in rep["summary"].get("mean_sqnr_accumulated", {}).items()},
                   **{f"sqnr_tok_{m}": round(v, 2)
                      for m, v in rep["summary"].get("mean_sqnr_accumulated_token_median", {}).items()}}
            summary = model._mmcompress_description.get("method_summary")
            if summary and "cmc_bytes" in summary:
                row["cmc_overhead"] = {k: summary.get(k) for k in ("cmc_bytes", "cmc_bytes_fraction", "cmc_flops_fraction",
                                                                    "loss_weights")}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            table.write_text(json.dumps({"model": args.model, "calibration_tokens": counts,
                                         "args": vars(args), "rows": rows}, indent=1))
    if not args.part:
        print(render_report(out))


def merge_parts(out: Path) -> None:
    """Join the ``--part`` tables in ``out/parts`` (dense first, then scheme and method order) and render them."""
    from mmcompress.eval.report import render_report

    parts = [json.loads(f.read_text()) for f in sorted((out / "parts").glob("*.json"))]
    if not parts:
        raise SystemExit(f"no part tables in {out / 'parts'}")
    tokens = {json.dumps(p["calibration_tokens"], sort_keys=True) for p in parts}
    if len(tokens) != 1:
        raise SystemExit(f"the parts were calibrated on different data: {sorted(tokens)}")
    order = ["rtn", "smoothquant", "awq", "mbq", "masquant", "masquant-split"]
    rows = [r for p in parts for r in p["rows"]]
    rows.sort(key=lambda r: (r["method"] != "dense", r["scheme"],
                             order.index(r["method"]) if r["method"] in order else len(order)))
    (out / "masquant_table.json").write_text(json.dumps({"model": parts[0]["model"], "calibration_tokens":
                                                         parts[0]["calibration_tokens"], "parts": [p["args"] for p in parts],
                                                         "rows": rows}, indent=1))
    print(render_report(out))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
