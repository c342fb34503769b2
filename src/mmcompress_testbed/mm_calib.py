"""``--calib testbed`` for the multimodal testbed models: wiki text windows plus a fixed mix of
calibration images (with question + answer text) and speech clips (with prompt + transcript).

Disjoint from the evaluation sets: images come from their own seed stream (``CALIB_IMAGE_SEED``),
speech uses the training voices only (never the held-out test voice), sentences from Wikipedia
articles [8000, 9000) (the test sentences come from the last 400 articles) and digit strings that are
not in ``speech-test``.  For models that are not Qwen2.5-VL / Omni it falls back to the text builder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CALIB_IMAGE_SEED = 3001
CALIB_SPEECH_SEED = 3002
CALIB_VERSION = 1


def _kind(model_dir) -> str | None:
    try:
        mt = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return {"qwen2_5_omni_thinker": "omni", "qwen2_5_vl": "vl"}.get(mt)


def calibration_records(kind: str, n_images: int, n_audio: int, seed: int = 0) -> list[dict]:
    """Multimodal records ``{"text", "images"?, "audio"?}`` (deterministic for a seed)."""
    from mmcompress.eval.asr import AUDIO_PROMPT
    from mmcompress.eval.vqa import IMAGE_PROMPT
    from . import mm_data as D

    recs = []
    rng = random.Random(CALIB_IMAGE_SEED + 1000 * seed)
    qtypes = list(D.QUESTIONS)
    for i in range(n_images):
        qt = qtypes[i % len(qtypes)]
        kw = {"count": 1} if qt == "position" else {}
        img, attrs = D.make_image(rng, **kw)
        q, a = D.qa_for(attrs, qt)
        recs.append({"text": IMAGE_PROMPT.format(question=q) + " " + a, "images": [img]})
    if kind == "omni" and n_audio:
        sents = D.wiki_sentences(8000, 9000)
        n_d = n_audio // 2
        items = D.make_speech_items("digits", n_d, CALIB_SPEECH_SEED + 1000 * seed, D.TRAIN_VOICES,
                                    exclude_digits=D.test_digit_keys())
        items += D.make_speech_items("sentence", n_audio - n_d, CALIB_SPEECH_SEED + 1 + 1000 * seed,
                                     D.TRAIN_VOICES, sentences=sents)
        for it, wav in zip(items, D.render(items)):
            recs.append({"text": AUDIO_PROMPT + " " + it["transcript"], "audio": [wav]})
    return recs


def testbed_multimodal_calibration(model, model_dir, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                                   cache=None):
    """Half wiki text windows, the rest split between images and (Omni) speech clips."""
    from . import data as tb_data

    kind = _kind(model_dir)
    if kind is None:
        return tb_data.wiki_calibration(model, model_dir, nsamples, seqlen, seed, cache)
    from mmcompress.data.calibration import CalibrationSet

    n_text = max(1, nsamples // 2)
    n_mm = nsamples - n_text
    n_audio = n_mm // 2 if kind == "omni" else 0
    n_img = n_mm - n_audio
    text = tb_data.wiki_calibration(model, model_dir, n_text, seqlen, seed, cache)
    proc = tb_data.processor_for(model_dir)
    mm = CalibrationSet.from_records(calibration_records(kind, n_img, n_audio, seed), proc, seed=seed,
                                     source="testbed:mm")
    samples = list(text.samples) + list(mm.samples)
    random.Random(seed).shuffle(samples)
    return CalibrationSet(samples, source=f"testbed:{kind} (wiki text + images"
                          + (" + speech" if kind == "omni" else "") + f", v{CALIB_VERSION})",
                          meta={"seqlen": seqlen, "seed": seed, "n_text": n_text, "n_images": n_img,
                                "n_audio": n_audio})


CALIB_WHITEN_SEED = 3003  # image/speech seed streams of the whitening set (not the calibration ones)


def whitening_records(kind: str, n_images: int, n_audio: int, seed: int = 0) -> list[dict]:
    """Modality-only records, as the paper's CMC whitening sets: an image with only its placeholder
    prefix (no question, no answer), a speech clip with only its prefix (no transcript)."""
    from . import mm_data as D
    from mmcompress.eval.asr import AUDIO_PROMPT
    from mmcompress.eval.vqa import IMAGE_PROMPT

    rng = random.Random(CALIB_WHITEN_SEED + 1000 * seed)
    image_prefix = IMAGE_PROMPT.split(" Question:")[0]
    audio_prefix = AUDIO_PROMPT.split(" Transcribe:")[0]
    recs = [{"text": image_prefix, "images": [D.make_image(rng)[0]]} for _ in range(n_images)]
    if kind == "omni" and n_audio:
        sents = D.wiki_sentences(8000, 9000)
        n_d = n_audio // 2
        items = D.make_speech_items("digits", n_d, CALIB_WHITEN_SEED + 10 + 1000 * seed, D.TRAIN_VOICES,
                                    exclude_digits=D.test_digit_keys())
        items += D.make_speech_items("sentence", n_audio - n_d, CALIB_WHITEN_SEED + 11 + 1000 * seed,
                                     D.TRAIN_VOICES, sentences=sents)
        recs += [{"text": audio_prefix, "audio": [wav]} for wav in D.render(items)]
    return recs


def testbed_whitening(model, model_dir, nsamples: int = 128, seqlen: int = 512, seed: int = 0, cache=None):
    """``--whiten-calib testbed-whiten``: image-only (and, for Omni, audio-only) samples."""
    from . import data as tb_data
    from mmcompress.data.calibration import CalibrationError, CalibrationSet

    kind = _kind(model_dir)
    if kind is None:
        raise CalibrationError("testbed-whiten is for the multimodal testbed models (Qwen2.5-VL / Omni)")
    n_audio = nsamples // 2 if kind == "omni" else 0
    recs = whitening_records(kind, nsamples - n_audio, n_audio, seed)
    cs = CalibrationSet.from_records(recs, tb_data.processor_for(model_dir), seed=seed, source="testbed:whiten")
    return CalibrationSet(cs.samples, source=f"testbed:{kind} whitening (image-only"
                          + (" + audio-only" if n_audio else "") + f", v{CALIB_VERSION})",
                          meta={"seed": seed, "n_images": nsamples - n_audio, "n_audio": n_audio})


def testbed_heldout(model, model_dir, nsamples: int = 16, seqlen: int = 512, seed: int = 0, cache=None):
    """``--report-calib testbed-heldout``: a report set from the testbed's *evaluation* splits (disjoint
    from every calibration set by construction): wiki test windows, and for multimodal models
    image-qa-test images with their question + answer and speech-test clips with their transcript."""
    from . import data as tb_data
    from mmcompress.data.calibration import CalibrationSet

    kind = _kind(model_dir)
    n_text = nsamples if kind is None else max(1, nsamples // 2)
    text = CalibrationSet.from_text(tb_data.eval_text("wiki", cache), tb_data.tokenizer_for(model_dir), n_text,
                                    seqlen, seed, source="testbed:wiki (evaluation split)")
    if kind is None:
        return text
    from . import mm_data as D
    from mmcompress.eval.asr import AUDIO_PROMPT
    from mmcompress.eval.vqa import IMAGE_PROMPT

    n_mm = nsamples - n_text
    n_audio = n_mm // 2 if kind == "omni" else 0
    rng = random.Random(seed)
    qa = D.image_qa_test()
    recs = [{"text": IMAGE_PROMPT.format(question=it["question"]) + " " + it["answer"], "images": [it["image"]]}
            for it in rng.sample(qa, min(len(qa), n_mm - n_audio))]
    if n_audio:
        speech = D.speech_test()
        recs += [{"text": AUDIO_PROMPT + " " + it["transcript"], "audio": [it["audio"]]}
                 for it in rng.sample(speech, min(len(speech), n_audio))]
    mm = CalibrationSet.from_records(recs, tb_data.processor_for(model_dir), seed=seed)
    return CalibrationSet(list(text.samples) + list(mm.samples),
                          source=f"testbed:{kind} held-out (wiki test + image-qa-test"
                          + (" + speech-test" if n_audio else "") + ")",
                          meta={"seed": seed, "n_text": n_text, "n_images": len(mm) - n_audio, "n_audio": n_audio})


def register_calibration_hook():
    try:
        from .data import register_calibration
    except ImportError:  # pragma: no cover
        return
    register_calibration("testbed", testbed_multimodal_calibration)
    register_calibration("testbed-whiten", testbed_whitening)
    register_calibration("testbed-heldout", testbed_heldout)
