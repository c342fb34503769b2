"""Long calibration texts are tokenized a piece at a time (data.calibration.tokenize_text) with the ids, and so
the seeded windows, of one tokenizer call over the whole text."""

import random

import pytest
import torch

from mmcompress.data import calibration
from mmcompress.data.calibration import CalibrationSet, tokenize_text

from .tiny_models import tiny_tokenizer

WORDS = ("the of and in to was is for on by with as an at from his that which were are their city river war "
         "king first new century known born modern part also since between during after however").split()


def _text(paragraphs=300, seed=0) -> str:
    """Paragraphs of random words and punctuation, separated by blank lines (some with trailing spaces or
    three newlines, as real files have)."""
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
        para = " ".join(words).capitalize() + rng.choice([".", ".", "!", ". ", "?"])
        paras.append(para)
    return "".join(p + rng.choice(["\n\n", "\n\n", "\n\n", "\n\n\n", " \n\n"]) for p in paras).strip()


def _whole(text, tok):
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]


def _fast(pre_tokenizer, decoder):
    """A byte-level BPE (or Metaspace) fast tokenizer with the given pre-tokenizer, trained on the test text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([_text(200, seed=1)], trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet,
                                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _qwen_style():
    """Qwen2's pre-tokenizer: a newline run attaches to the whitespace before it (\\s*[\\r\\n]+), unlike GPT-2's."""
    from tokenizers import Regex, decoders, pre_tokenizers

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return _fast(pre, decoders.ByteLevel())


def _sentencepiece_style():
    """A Metaspace tokenizer that prepends "▁" to every call: no piece boundary tokenizes as in the whole text."""
    from tokenizers import decoders, pre_tokenizers

    return _fast(pre_tokenizers.Metaspace(prepend_scheme="always"), decoders.Metaspace(prepend_scheme="always"))


TOKENIZERS = {"gpt2-style": tiny_tokenizer, "qwen-style": _qwen_style, "sentencepiece-style": _sentencepiece_style}


class _Counting:
    """Wraps a tokenizer and records the length of every piece it tokenizes for the ids (a list of pieces, or
    one text into a tensor; not the small calls that check a cut) and the number of pieces of each such call."""

    def __init__(self, tok):
        self.tok, self.lengths, self.batches = tok, [], []

    def __call__(self, text, **kw):
        if isinstance(text, list):
            self.lengths.extend(len(t) for t in text)
            self.batches.append(len(text))
        elif kw.get("return_tensors"):
            self.lengths.append(len(text))
            self.batches.append(1)
        return self.tok(text, **kw)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_pieces_give_the_ids_of_one_call(kind, batch, monkeypatch):
    tok = TOKENIZERS[kind]()
    text = _text()
    whole = _whole(text, tok)
    counting = _Counting(tok)
    monkeypatch.setattr(calibration, "_batch_size", lambda: batch)
    ids = tokenize_text(text, counting, chunk_chars=2000)
    assert ids.dtype == torch.int64 and torch.equal(ids, whole)
    assert sum(counting.lengths) == len(text)
    if kind == "sentencepiece-style":
        assert counting.lengths == [len(text)]  # no verified cut: the whole text in one call, as before
    else:
        assert len(counting.lengths) > 5 and max(counting.lengths) < 2 * 2000 + 500  # pieces of about chunk_chars
        assert max(counting.batches) == batch and sum(counting.batches) == len(counting.lengths)


def test_batch_size(monkeypatch):
    """As many pieces per call as CPUs, at most TOKENIZE_MAX_BATCH; one where tokenizers' parallelism is off."""
    monkeypatch.setattr(calibration.os, "sched_getaffinity", lambda pid: set(range(64)))
    for off in ("false", "0", "OFF"):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", off)
        assert calibration._batch_size() == 1
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    assert calibration._batch_size() == calibration.TOKENIZE_MAX_BATCH
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    monkeypatch.setattr(calibration.os, "sched_getaffinity", lambda pid: {0, 1})
    assert calibration._batch_size() == 2


@pytest.mark.parametrize("kind", ["gpt2-style", "qwen-style"])
def test_from_text_windows_unchanged(kind, monkeypatch):
    """The same seed draws the same windows, token for token, as a single tokenizer call gave."""
    tok = TOKENIZERS[kind]()
    text = _text()
    whole = _whole(text, tok)
    rng = random.Random(7)
    starts = [rng.randint(0, whole.numel() - 32) for _ in range(6)]
    monkeypatch.setattr(calibration, "TOKENIZE_CHUNK_CHARS", 1500)
    cs = CalibrationSet.from_text(text, tok, nsamples=6, seqlen=32, seed=7)
    assert [s["input_ids"].tolist() for s in cs] == [whole[s:s + 32].unsqueeze(0).tolist() for s in starts]


def test_short_text_is_one_call():
    tok = _Counting(tiny_tokenizer())
    text = _text(20)
    assert torch.equal(tokenize_text(text, tok, chunk_chars=len(text)), _whole(text, tok.tok))
    assert tok.lengths == [len(text)]


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b"])
def test_wiki_calibration_windows_unchanged(name):
    """``--calib wiki`` on the real calibration split (1 M tokens, cut into pieces) draws the windows that one
    tokenizer call over the split gave."""
    from mmcompress.models.loading import load_tokenizer
    from pathlib import Path

    from mmcompress_testbed import data, registry

    entry = next(m for m in registry.list_models() if m["name"] == name)
    if not entry["cached"]:
        pytest.skip(f"{name} is not in the testbed cache (mmcompress testbed fetch {name})")
    model_dir = Path(entry["path"])
    cs = data.wiki_calibration(None, model_dir, nsamples=8, seqlen=256, seed=3)
    whole = _whole(data.calibration_text("wiki"), load_tokenizer(model_dir))
    rng = random.Random(3)
    starts = [rng.randint(0, whole.numel() - 256) for _ in range(8)]
    assert [s["input_ids"].tolist() for s in cs] == [whole[s:s + 256].unsqueeze(0).tolist() for s in starts]
