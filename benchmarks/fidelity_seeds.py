"""RTN vs SmoothQuant vs MASQuant on omni-mini over calibration seeds, SQNR on held-out samples (issue 17).

One row per (scheme, method, seed), each in its own JSON file, so rows can run in parallel processes:

    python benchmarks/fidelity_seeds.py run --scheme w4a8 --method masquant --seed 0 --out runs/fidelity
    python benchmarks/fidelity_seeds.py run --scheme w4a8-g128 --method rtn --seed 0 --out runs/fidelity
    python benchmarks/fidelity_seeds.py run --dense --out runs/fidelity
    python benchmarks/fidelity_seeds.py table --out runs/fidelity      # mean ± std over seeds, Markdown

Calibration: ``--calib testbed`` with ``--nsamples`` samples of ``--seqlen`` tokens (half wiki windows, a
quarter images, a quarter speech clips), seed = the calibration seed.  SQNR: the per-modality SQNR of
every decoder layer's output (compressed chain vs the original model's), averaged over layers, measured
on ``testbed-heldout`` (wiki *test* windows, image-qa-test images, speech-test clips; fixed seed 0, the
same for every row and disjoint from every calibration set).  Task metrics: wiki perplexity on held-out
windows, digit WER on speech-test digit clips, multiple-choice image QA by likelihood.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

METHODS = {"rtn": ("rtn", {}), "smoothquant": ("smoothquant", {"runtime_smoothing": True}),
           "masquant": ("masquant", {}), "masquant-wset": ("masquant", {}),
           "masquant-free": ("masquant", {"divergence": "free"}),
           # the paper's free training with the reference Omni script's full-rank CMC (rank ratio 1)
           "masquant-free-full": ("masquant", {"divergence": "free", "rank": 1.0}),
           # the training form (one quantized weight per modality), under CMC's budget / trained freely
           "masquant-split": ("masquant", {"cmc": "split"}),
           "masquant-split-free": ("masquant", {"cmc": "split", "divergence": "free"})}


def scheme_of(name: str):
    from mmcompress.quant.quantizer import resolve_scheme

    base, _, group = name.partition("-g")
    return resolve_scheme(base, group_size=int(group) if group else None)


def run(args) -> None:
    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.perplexity import text_perplexity
    from mmcompress.eval.vqa import choice_accuracy
    from mmcompress.models.loading import load_hf_model, load_tokenizer
    from mmcompress.models.processing import load_processor
    from mmcompress.quant.api import quantize
    from mmcompress_testbed.data import calibration_set, eval_text
    from mmcompress_testbed.registry import fetch

    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    path = fetch(args.model)
    model = load_hf_model(path)
    tok, proc = load_tokenizer(path), load_processor(path)
    row = {"model": args.model, "args": {k: v for k, v in vars(args).items() if k != "func"}}
    if args.dense:
        name = "dense"
        row.update(scheme="fp32", method="dense", seed=None)
    else:
        method, opts = METHODS[args.method]
        opts = dict(opts)
        if method == "masquant":
            opts["epochs"] = args.epochs
        calib = calibration_set("testbed", model, path, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
        held = calibration_set("testbed-heldout", model, path, nsamples=args.report_nsamples, seqlen=args.seqlen,
                               seed=0)
        extra = {}
        if args.method == "masquant-wset":
            extra["whitening"] = calibration_set("testbed-whiten", model, path, nsamples=args.whiten_nsamples,
                                                 seqlen=args.seqlen, seed=args.seed)
        name = f"{args.scheme}_{args.method}_s{args.seed}"
        t0 = time.time()
        quantize(model, calib, method, scheme_of(args.scheme), progress=False, report_dir=out / "reports" / name,
                 report_calib=held, report_tag=name, **extra, **opts)
        rep = json.loads(Path(model._mmcompress_description["report"]).read_text())
        summ = rep["summary"]
        row.update(scheme=args.scheme, method=args.method, seed=args.seed, calib_s=round(time.time() - t0, 1),
                   sqnr_data=rep["sqnr_data"], calibration=model._mmcompress_description["calibration"],
                   sqnr={m: round(v, 3) for m, v in summ["mean_sqnr_accumulated"].items()},
                   sqnr_tok={m: round(v, 3) for m, v in summ["mean_sqnr_accumulated_token_median"].items()},
                   method_config=model._mmcompress_description["method"])
        ms = model._mmcompress_description.get("method_summary") or {}
        if "loss_weights" in ms:
            row["loss_weights"] = ms["loss_weights"]
    t0 = time.time()
    row["wiki_ppl"] = round(text_perplexity(model, tok, eval_text("wiki"), seqlen=512, max_windows=args.ppl_windows,
                                            progress=False)["ppl"], 3)
    if args.asr:
        row["wer_digits"] = round(word_error_rate(model, proc, "speech-test", kinds=("digits",), limit=args.asr,
                                                  max_new_tokens=16)["wer_digits"], 4)
    if args.vqa:
        row["image_choice"] = round(choice_accuracy(model, proc, "image-qa-test", limit_per_type=args.vqa)["accuracy"],
                                    4)
    row["eval_s"] = round(time.time() - t0, 1)
    (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: row[k] for k in row if k not in ("args", "method_config", "calibration")}), flush=True)


def _fmt(vals, nd=2):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.{nd}f}"
    return f"{statistics.mean(vals):.{nd}f} ± {statistics.stdev(vals):.{nd}f}"


def table(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(Path(args.out, "rows").glob("*.json"))]
    order = list(METHODS)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["scheme"], r["method"]), []).append(r)
    lines = ["| scheme | method | seeds | wiki ppl | digit WER | image choice | held-out SQNR text / image / audio (dB) "
             "| token-median SQNR text / image / audio (dB) |", "|---|---|---|---|---|---|---|---|"]
    for (scheme, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != "dense", kv[0][0],
                                                                        order.index(kv[0][1]) if kv[0][1] in order else 9)):
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"] or 0)) if method != "dense" else "–"
        sq = " / ".join(_fmt([r.get("sqnr", {}).get(m) for r in rs], 1) for m in ("text", "image", "audio"))
        st = " / ".join(_fmt([r.get("sqnr_tok", {}).get(m) for r in rs], 1) for m in ("text", "image", "audio"))
        lines.append(f"| {scheme} | {method} | {seeds} | {_fmt([r['wiki_ppl'] for r in rs])} | "
                     f"{_fmt([r.get('wer_digits') for r in rs])} | {_fmt([r.get('image_choice') for r in rs], 3)} | "
                     f"{sq if method != 'dense' else '–'} | {st if method != 'dense' else '–'} |")
    text = "\n".join(lines)
    (Path(args.out) / "table.md").write_text(text + "\n")
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="omni-mini")
    r.add_argument("--scheme", default="w4a8", help="w4a8, w4a8-g128, ...")
    r.add_argument("--method", default="masquant", choices=list(METHODS))
    r.add_argument("--dense", action="store_true", help="evaluate the unquantized model instead")
    r.add_argument("--seed", type=int, default=0, help="calibration seed")
    r.add_argument("--nsamples", type=int, default=16)
    r.add_argument("--seqlen", type=int, default=128)
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--report-nsamples", type=int, default=16)
    r.add_argument("--whiten-nsamples", type=int, default=16)
    r.add_argument("--ppl-windows", type=int, default=4)
    r.add_argument("--asr", type=int, default=20, help="speech-test digit clips (0: skip)")
    r.add_argument("--vqa", type=int, default=10, help="image-qa-test questions per type, multiple choice (0: skip)")
    r.add_argument("--out", default="runs/fidelity")
    r.set_defaults(func=run)
    t = sub.add_parser("table")
    t.add_argument("--out", default="runs/fidelity")
    t.set_defaults(func=table)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()
