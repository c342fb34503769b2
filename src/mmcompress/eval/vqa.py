"""Visual question answering metrics.

* :func:`accuracy`: exact-match accuracy of greedy short answers (the task metric).
* :func:`choice_accuracy`: multiple-choice accuracy by likelihood.  For every question the candidate
  answers are the answers of its type in the data set; the prediction is the candidate with the largest
  summed log-probability after the prompt, ``argmax_c Σ_t log p(c_t | image, question, c_<t)``.  It
  still measures what the model sees when quantization has broken its answer *format* (greedy output
  empty or off-topic, so exact match is 0 for every method) and separates methods there; chance is
  1 / (number of candidates of the type).
"""

from __future__ import annotations

import re

from ..data import named
from ._inputs import testbed_prompt, to_model

# The default question template (Qwen2.5-VL image tokens); see AUDIO_PROMPT in mmcompress.eval.asr.
IMAGE_PROMPT = "Image: <|vision_start|><|image_pad|><|vision_end|> Question: {question} Answer:"


def normalize_answer(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^a-z0-9 ]+", " ", text)
    words = text.split()
    return " ".join(words)


def answer(model, processor, image, question: str, *, prompt: str | None = None, max_new_tokens: int = 6) -> str:
    """Greedy short answer to ``question`` about a PIL ``image`` (``prompt``: a template with
    ``{question}``; default the one the model directory names in ``mm_testbed.json``, else
    :data:`IMAGE_PROMPT`)."""
    import torch

    from ..runtime.mmgenerate import greedy_generate

    template = prompt or testbed_prompt(model, "image", IMAGE_PROMPT)
    inputs = processor(text=[template.format(question=question)], images=[image], return_tensors="pt")
    inputs = to_model(model, inputs)
    with torch.no_grad():
        out = greedy_generate(model, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seq = out.sequences if hasattr(out, "sequences") else out
    return processor.tokenizer.decode(seq[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def load_vqa_set(spec):
    """A VQA set: a list of ``{"image", "question", "answer", "type"}``, or the name of one
    (:mod:`mmcompress.data.named`, e.g. the testbed's ``image-qa-test``)."""
    if isinstance(spec, str):
        return named.resolve("vqa", spec)()
    return list(spec)


def _first_per_type(items: list, limit: int | None) -> list:
    """The first ``limit`` items of each question type (all items when ``limit`` is None)."""
    if limit is None:
        return items
    seen: dict = {}
    kept = []
    for it in items:
        t = it.get("type", "all")
        if seen.get(t, 0) < limit:
            kept.append(it)
            seen[t] = seen.get(t, 0) + 1
    return kept


def accuracy(model, processor, dataset="image-qa-test", *, replace_image: str | None = None,
             limit_per_type: int | None = None, progress: bool = False, prompt: str | None = None) -> dict:
    """Exact-match accuracy (normalized: lower case, punctuation removed) overall and per question type
    over ``dataset`` (items or a set name, :func:`load_vqa_set`), asked with ``prompt`` (see :func:`answer`).

    ``replace_image="blank"`` answers every question about a blank white image of the same size instead
    (an ablation)."""
    from tqdm.auto import tqdm

    items = _first_per_type(load_vqa_set(dataset), limit_per_type)
    if replace_image not in (None, "blank"):
        raise ValueError(f"replace_image must be None or 'blank', not {replace_image!r}")
    by_type: dict = {}
    correct = 0
    examples = []
    for it in tqdm(items, desc="vqa", disable=not progress):
        img = it["image"]
        if replace_image == "blank":
            from PIL import Image

            img = Image.new("RGB", img.size, (255, 255, 255))
        pred = answer(model, processor, img, it["question"], prompt=prompt)
        ok = normalize_answer(pred) == normalize_answer(it["answer"])
        correct += ok
        t = it.get("type", "all")
        c, n = by_type.get(t, (0, 0))
        by_type[t] = (c + ok, n + 1)
        if len(examples) < 4 or (not ok and len(examples) < 8):
            examples.append({"q": it["question"], "answer": it["answer"], "pred": pred})
    n = len(items)
    return {"accuracy": correct / n if n else None, "n": n,
            "by_type": {t: c / m for t, (c, m) in by_type.items()}, "examples": examples}


def _answer_logprob(model, processor, image, prompt_text: str, answer_text: str) -> float:
    import torch

    prefix = processor(text=[prompt_text], images=[image], return_tensors="pt")
    full = processor(text=[prompt_text + " " + answer_text], images=[image], return_tensors="pt")
    n = prefix["input_ids"].shape[1]
    ids = full["input_ids"]
    if ids.shape[1] <= n or not torch.equal(ids[0, :n], prefix["input_ids"][0]):
        raise ValueError(f"the answer {answer_text!r} does not tokenize as a continuation of the prompt")
    inputs = to_model(model, full)
    with torch.no_grad():
        logits = model(**inputs).logits[0, n - 1:-1].double()
    return float(torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][0, n:, None]).sum())


def choice_accuracy(model, processor, dataset="image-qa-test", *, limit_per_type: int | None = None,
                    progress: bool = False, prompt: str | None = None) -> dict:
    """Multiple-choice accuracy by likelihood (see the module docstring), overall and per type
    (``dataset`` and ``prompt`` as in :func:`accuracy`)."""
    from tqdm.auto import tqdm

    items = load_vqa_set(dataset)
    candidates: dict = {}
    for it in items:
        candidates.setdefault(it.get("type", "all"), set()).add(it["answer"])
    items = _first_per_type(items, limit_per_type)
    template = prompt or testbed_prompt(model, "image", IMAGE_PROMPT)
    by_type: dict = {}
    correct = 0
    for it in tqdm(items, desc="vqa-choice", disable=not progress):
        t = it.get("type", "all")
        text = template.format(question=it["question"])
        cands = sorted(candidates[t])
        scores = [_answer_logprob(model, processor, it["image"], text, c) for c in cands]
        ok = cands[max(range(len(cands)), key=scores.__getitem__)] == it["answer"]
        correct += ok
        c, m = by_type.get(t, (0, 0))
        by_type[t] = (c + ok, m + 1)
    n = len(items)
    return {"accuracy": correct / n if n else None, "n": n,
            "by_type": {t: c / m for t, (c, m) in by_type.items()},
            "chance": {t: 1.0 / len(candidates[t]) for t in by_type}}
