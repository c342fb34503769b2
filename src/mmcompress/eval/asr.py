"""Speech recognition metric for Omni-style models: greedy transcription and word error rate."""

from __future__ import annotations

import re

from ..data import named
from ._inputs import testbed_prompt, to_model

# The default transcription prompt (Qwen2.5-Omni audio tokens).  It starts with a text token: the added
# special tokens of the testbed models have zero embeddings, and a zero vector at position 0 gives NaN
# gradients through SmolLM2 (its first position is the attention sink).
AUDIO_PROMPT = "Audio: <|audio_bos|><|AUDIO|><|audio_eos|> Transcribe:"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def normalize_transcript(text: str) -> list[str]:
    """Lower-case words without punctuation; digits are spelled out one by one ("73" -> "seven three")."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"(\d)", lambda m: f" {DIGIT_WORDS[int(m.group(1))]} ", text)
    text = re.sub(r"[^a-z' ]+", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions all cost 1)."""
    return sum(edit_ops(ref, hyp).values())


def edit_ops(ref: list[str], hyp: list[str]) -> dict:
    """One minimum-cost alignment's edit counts: ``{"sub", "del", "ins"}`` (they sum to ``edit_distance``).

    Ties prefer substitutions, then deletions.  With ``N`` reference words, ``ins / N`` is the part of the
    WER that comes from extra words (e.g. a decoder repeating itself), which a WER above 1 must contain."""
    n, m = len(ref), len(hyp)
    d = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        d[i][0] = i
    for j in range(m + 1):
        d[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]))
    ops = {"sub": 0, "del": 0, "ins": 0}
    i, j = n, m
    while i or j:
        if i and j and d[i][j] == d[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            ops["sub"] += ref[i - 1] != hyp[j - 1]
            i, j = i - 1, j - 1
        elif i and d[i][j] == d[i - 1][j] + 1:
            ops["del"] += 1
            i -= 1
        else:
            ops["ins"] += 1
            j -= 1
    return ops


def wer_breakdown(refs, hyps) -> dict:
    """Corpus word error rate split into substitution, deletion and insertion rates, each over the
    reference words: ``{"wer", "sub", "del", "ins", "words"}`` with ``wer = sub + del + ins``."""
    if isinstance(refs, str):
        refs, hyps = [refs], [hyps]
    if len(refs) != len(hyps):
        raise ValueError("refs and hyps differ in length")
    tot, words = {"sub": 0, "del": 0, "ins": 0}, 0
    for r, h in zip(refs, hyps):
        rw = normalize_transcript(r)
        for k, v in edit_ops(rw, normalize_transcript(h)).items():
            tot[k] += v
        words += len(rw)
    if words == 0:
        raise ValueError("empty references")
    return {"wer": sum(tot.values()) / words, **{k: v / words for k, v in tot.items()}, "words": words}


def wer(refs, hyps) -> float:
    """Corpus word error rate: total word edits / total reference words, after normalization
    (lower case, punctuation removed, digits spelled out one by one)."""
    return wer_breakdown(refs, hyps)["wer"]


def transcribe(model, processor, audio, *, prompt: str | None = None, max_new_tokens: int = 48) -> str:
    """Greedy transcription of one 16 kHz waveform with an Omni thinker and its processor (``prompt``:
    default the one the model directory names in ``mm_testbed.json``, else :data:`AUDIO_PROMPT`)."""
    import torch

    from ..runtime.mmgenerate import greedy_generate

    prompt = prompt or testbed_prompt(model, "audio", AUDIO_PROMPT)
    inputs = to_model(model, processor(text=[prompt], audio=[audio], return_tensors="pt"))
    with torch.no_grad():
        out = greedy_generate(model, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    seq = out.sequences if hasattr(out, "sequences") else out
    new = seq[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def load_speech_set(spec):
    """A speech set: a list of ``{"audio": float32 16 kHz array, "transcript": str, "kind": str}``, or the
    name of one (:mod:`mmcompress.data.named`, e.g. the testbed's ``speech-test``)."""
    if isinstance(spec, str):
        return named.resolve("speech", spec)()
    return list(spec)


def word_error_rate(model, processor, dataset="speech-test", *, replace_audio: str | None = None,
                    limit: int | None = None, progress: bool = False, max_new_tokens: int = 48,
                    kinds: tuple[str, ...] | None = None, prompt: str | None = None) -> dict:
    """Greedy-decode every clip of ``dataset`` (items or a set name, :func:`load_speech_set`) with ``prompt``
    (see :func:`transcribe`) and score it against its transcript (normalized text).

    Returns ``{"wer", "wer_digits", "wer_sentences", "n", "n_digits", "n_sentences", "errors_digits",
    "errors_sentences", "examples"}`` (a part is ``None`` when the set has no such clips); ``errors_*`` is
    ``wer_breakdown`` (substitution, deletion and insertion rates).  ``replace_audio="silence"`` feeds
    zeros of the same length instead of the speech (an ablation: the scores must collapse)."""
    import numpy as np
    from tqdm.auto import tqdm

    items = load_speech_set(dataset)
    if kinds is not None:  # e.g. ("digits",): only the clips of these kinds
        items = [it for it in items if it.get("kind", "sentence") in kinds]
    if limit is not None:
        items = _balanced_head(items, limit)
    refs, hyps, kinds = [], [], []
    for it in tqdm(items, desc="asr", disable=not progress):
        audio = np.asarray(it["audio"], dtype=np.float32)
        if replace_audio == "silence":
            audio = np.zeros_like(audio)
        elif replace_audio is not None:
            raise ValueError(f"replace_audio must be None or 'silence', not {replace_audio!r}")
        hyps.append(transcribe(model, processor, audio, prompt=prompt, max_new_tokens=max_new_tokens))
        refs.append(it["transcript"])
        kinds.append(it.get("kind", "sentence"))
    out = {"wer": wer(refs, hyps), "n": len(refs)}
    for kind, key in (("digits", "digits"), ("sentence", "sentences")):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        errors = wer_breakdown([refs[i] for i in sel], [hyps[i] for i in sel]) if sel else None
        out[f"wer_{key}"] = errors["wer"] if errors else None
        out[f"n_{key}"] = len(sel)
        out[f"errors_{key}"] = errors
    out["examples"] = [{"ref": r, "hyp": h} for r, h in list(zip(refs, hyps))[:3]] + \
        [{"ref": refs[i], "hyp": hyps[i]} for i in range(len(refs)) if kinds[i] == "sentence"][:2]
    return out


def _balanced_head(items, limit):
    """The first ``limit`` items, split evenly over kinds (so a limit keeps digits and sentences)."""
    kinds = sorted({it.get("kind", "sentence") for it in items})
    per = max(1, limit // max(1, len(kinds)))
    out = []
    for k in kinds:
        out += [it for it in items if it.get("kind", "sentence") == k][:per]
    return out
