"""Acceptance report for a multimodal testbed model.

    python -m mmcompress_testbed.mm_report omni-mini [--quick] [--json out.json]

Measures: speech-test WER (digits / sentences) and the same with the audio replaced by silence;
image-qa-test accuracy per type and the same with a blank image; wiki perplexity of the model and of
its source decoder alone (must be identical); per-modality activation magnitude at the decoder input
(layer 0) and at a middle layer: audio / image tokens vs text tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


@torch.no_grad()
def modality_activation_stats(model, processor, *, layers=(0,), n_items: int = 4, seed: int = 0) -> dict:
    """Per-channel absmax and mean |x| of the decoder-layer inputs, by modality (text / audio / image),
    over a few speech-test-disjoint samples (calibration voices/images).  Returns ratios vs text."""
    from .mm_calib import calibration_records

    tok = processor.tokenizer
    kind = "omni" if hasattr(model.config, "audio_config") else "vl"
    recs = calibration_records(kind, n_items, n_items if kind == "omni" else 0, seed=seed)
    lm_layers = model.model.language_model.layers
    acc: dict = {}
    cur = {}

    def hook(idx):
        def fn(mod, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)[0].float()  # [S, D]
            ids = cur["ids"]
            masks = {"text": torch.ones_like(ids, dtype=torch.bool)}
            for name, tid in (("audio", getattr(tok, "audio_token_id", None)), ("image", tok.image_token_id)):
                if tid is not None:
                    m = ids == tid
                    masks[name] = m
                    masks["text"] &= ~m
            masks["text"][0] = False  # the first position carries extreme values whatever its modality
            for name, m in masks.items():
                if m.any():
                    d = acc.setdefault((idx, name), {"absmax": None, "sum": 0.0, "n": 0})
                    xa = x[m].abs()
                    mx = xa.amax(0)
                    d["absmax"] = mx if d["absmax"] is None else torch.maximum(d["absmax"], mx)
                    d["sum"] += float(xa.mean(1).sum())
                    d["n"] += int(m.sum())
        return fn

    hs = [lm_layers[i].register_forward_pre_hook(hook(i), with_kwargs=True) for i in layers]
    try:
        from mmcompress.data.calibration import encode_record

        for r in recs:
            enc = encode_record(r, processor)
            cur["ids"] = enc["input_ids"][0]
            model(**enc)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for i in layers:
        t = acc.get((i, "text"))
        row = {}
        for name in ("audio", "image"):
            d = acc.get((i, name))
            if d is None or t is None:
                continue
            corr = torch.corrcoef(torch.stack([d["absmax"], t["absmax"]]))[0, 1].item()
            row[name] = {"absmax_ratio": round(float(d["absmax"].mean() / t["absmax"].mean()), 2),
                         "mean_abs_ratio": round((d["sum"] / d["n"]) / (t["sum"] / t["n"]), 2),
                         "absmax_channel_corr_with_text": round(corr, 3), "tokens": d["n"]}
        row["text_tokens"] = t["n"] if t else 0
        out[f"layer{i}"] = row
    return out


def _ppl(model, tok, text, windows):
    from mmcompress.eval.perplexity import text_perplexity

    return text_perplexity(model, tok, text, seqlen=1024, max_windows=windows, progress=False)["ppl"]


def report(name: str, quick: bool = False, cache=None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.vqa import accuracy
    from mmcompress.models.loading import load_hf_model
    from mmcompress.models.processing import load_processor
    from .data import eval_text
    from .multimodal import MODEL_SPECS, REGISTRY_DECODER
    from .registry import fetch

    kind, decoder = MODEL_SPECS[name]
    d = fetch(name, cache=cache)
    model = load_hf_model(d)
    proc = load_processor(d)
    res: dict = {"model": name, "path": str(d)}
    t = time.time()
    lim = 16 if quick else None
    vlim = 10 if quick else None
    if kind == "omni":
        r = word_error_rate(model, proc, "speech-test", limit=lim, progress=True)
        res["asr"] = {k: v for k, v in r.items()}
        s = word_error_rate(model, proc, "speech-test", limit=16, replace_audio="silence", progress=True)
        res["asr_silence"] = {k: v for k, v in s.items()}
        print(f"ASR {time.time() - t:.0f}s: {res['asr']['wer_digits']=} {res['asr']['wer_sentences']=} "
              f"silence {res['asr_silence']['wer_digits']=}", file=sys.stderr)
    t = time.time()
    v = accuracy(model, proc, "image-qa-test", limit_per_type=vlim, progress=True)
    res["vqa"] = v
    b = accuracy(model, proc, "image-qa-test", limit_per_type=10, replace_image="blank", progress=True)
    res["vqa_blank"] = b
    print(f"VQA {time.time() - t:.0f}s: {v['accuracy']=} {v['by_type']} blank {b['accuracy']=} {b['by_type']}",
          file=sys.stderr)
    windows = 2 if quick else 4
    text = eval_text("wiki")
    src_dir = fetch(REGISTRY_DECODER[decoder], cache=cache)
    src = AutoModelForCausalLM.from_pretrained(str(src_dir), trust_remote_code=False, dtype=torch.float32).eval()
    res["wiki_ppl"] = {"model": _ppl(model, proc.tokenizer, text, windows),
                       "decoder_alone": _ppl(src, AutoTokenizer.from_pretrained(str(src_dir), trust_remote_code=False), text, windows),
                       "windows": windows, "seqlen": 1024}
    res["activation_magnitude_vs_text"] = modality_activation_stats(
        model, proc, layers=(0, model.config.text_config.num_hidden_layers // 2))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    res = report(args.name, args.quick)
    s = json.dumps(res, indent=1, default=str)
    if args.json:
        open(args.json, "w").write(s)
    print(s)


if __name__ == "__main__":
    main()
