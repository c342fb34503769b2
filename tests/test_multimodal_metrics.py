"""ASR / VQA metrics and the multimodal data generators (fast, offline)."""

import random

import numpy as np
import pytest
import torch

from mmcompress.eval.asr import edit_distance, edit_ops, wer, wer_breakdown, word_error_rate
from mmcompress.eval.vqa import accuracy, normalize_answer
from mmcompress_testbed import mm_data as D


def test_edit_ops_split_the_distance():
    assert edit_ops(list("abc"), list("abc")) == {"sub": 0, "del": 0, "ins": 0}
    assert edit_ops(list("abc"), list("axc")) == {"sub": 1, "del": 0, "ins": 0}
    assert edit_ops(list("abc"), list("ac")) == {"sub": 0, "del": 1, "ins": 0}
    assert edit_ops(list("ab"), list("aabbb")) == {"sub": 0, "del": 0, "ins": 3}
    assert edit_ops([], list("xy")) == {"sub": 0, "del": 0, "ins": 2}
    def levenshtein(a, b):  # an independent reference (one-row DP)
        prev = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            cur = [i]
            for j, y in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[-1] + 1, prev[j - 1] + (x != y)))
            prev = cur
        return prev[-1]

    rng = __import__("random").Random(0)
    for _ in range(200):  # the counts always sum to the Levenshtein distance
        r = [rng.choice("abc") for _ in range(rng.randrange(0, 7))]
        h = [rng.choice("abcd") for _ in range(rng.randrange(0, 9))]
        ops = edit_ops(r, h)
        assert sum(ops.values()) == levenshtein(r, h) == edit_distance(r, h)
        assert ops["ins"] - ops["del"] == len(h) - len(r)
    b = wer_breakdown(["7 3 9 1", "1 2"], ["seven three nine one one one", "3"])
    assert b == {"wer": pytest.approx(4 / 6), "sub": pytest.approx(1 / 6), "del": pytest.approx(1 / 6),
                 "ins": pytest.approx(2 / 6), "words": 6}


def test_edit_distance_and_wer():
    assert edit_distance("a b c".split(), "a b c".split()) == 0
    assert edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_distance("a b c".split(), "a c".split()) == 1
    assert edit_distance("a b".split(), "a b c d".split()) == 2
    assert edit_distance([], "a b".split()) == 2
    # normalization: case, punctuation, digits spelled out one by one
    assert wer("7 3 9 1", "seven, three, nine, one.") == 0.0
    assert wer("The quick brown fox.", "the quick brown fox") == 0.0
    assert wer("7 3 9 1", "7 3 9") == pytest.approx(0.25)
    assert wer(["1 2", "3 4 5 6"], ["1 2", "3 4"]) == pytest.approx(2 / 6)  # corpus-level
    assert wer("one two", "") == 1.0
    assert wer("a b", "a b c d e") == pytest.approx(1.5)  # insertions can exceed 100 %
    with pytest.raises(ValueError):
        wer(["a"], ["a", "b"])


def test_normalizers():
    assert D.normalize_transcript("Hello, World's END-game 42!") == ["hello", "world's", "end", "game", "four", "two"]
    assert normalize_answer(" Top Left.") == "top left"
    assert normalize_answer("3") == "3"


def test_image_generator_is_deterministic_and_exact():
    a, attrs_a = D.make_image(random.Random(5))
    b, attrs_b = D.make_image(random.Random(5))
    assert attrs_a == attrs_b and np.array_equal(np.asarray(a), np.asarray(b))
    for seed in range(20):
        img, at = D.make_image(random.Random(seed), count=1)
        arr = np.asarray(img).astype(int)
        ink = (np.abs(arr - 255).sum(-1) > 60)
        ys, xs = np.nonzero(ink)
        assert ink.sum() > 50
        top = ys.mean() < 56
        left = xs.mean() < 56
        assert at["position"] == ("top" if top else "bottom") + " " + ("left" if left else "right")
        # the drawn colour is the named one (within the jitter)
        mean = arr[ink].mean(0)
        assert np.abs(mean - np.array(D.COLOURS[at["colour"]])).max() < 40


def test_eval_sets_are_fixed_balanced_and_disjoint():
    qa = D.image_qa_test_items()
    assert len(qa) == 200
    assert {t: sum(1 for x in qa if x["type"] == t) for t in D.QUESTIONS} == {t: 50 for t in D.QUESTIONS}
    assert [x["answer"] for x in qa[:10]] == [x["answer"] for x in D.image_qa_test_items()[:10]]
    sp = D.speech_test_items()
    assert sum(x["kind"] == "digits" for x in sp) == 50 and sum(x["kind"] == "sentence" for x in sp) == 30
    assert {x["voice"] for x in sp} == {D.TEST_VOICE} and D.TEST_VOICE not in D.TRAIN_VOICES
    train_d = D.make_speech_items("digits", 300, 101, D.TRAIN_VOICES, exclude_digits=D.test_digit_keys())
    assert not {tuple(int(c) for c in x["transcript"].split()) for x in train_d} & D.test_digit_keys()
    test_sents = {x["transcript"] for x in sp if x["kind"] == "sentence"}
    assert not test_sents & set(D.wiki_sentences(0, 8000))
    assert not test_sents & set(D.wiki_sentences(8000, 9000))


class _EchoTok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


class _FakeProcessor:
    """Puts the clip's 'label' into input_ids so that a fake model can 'transcribe' it."""

    tokenizer = _EchoTok()

    def __call__(self, text, audio=None, images=None, return_tensors="pt"):
        if audio is not None:
            n = int(round(float(np.abs(audio[0]).max()) * 10))
            return {"input_ids": torch.tensor([[100, n]])}
        arr = np.asarray(images[0])
        return {"input_ids": torch.tensor([[100, int(arr[0, 0, 0] > 128)]])}


class _FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens=8, do_sample=False, **kw):
        return torch.cat([input_ids, input_ids[:, 1:]], 1)


def test_word_error_rate_and_accuracy_plumbing():
    items = [{"audio": np.full(1600, 0.3, np.float32), "transcript": "3", "kind": "digits"},
             {"audio": np.full(1600, 0.5, np.float32), "transcript": "5", "kind": "digits"},
             {"audio": np.full(1600, 0.4, np.float32), "transcript": "four words", "kind": "sentence"}]
    r = word_error_rate(_FakeModel(), _FakeProcessor(), items)
    assert r["wer_digits"] == 0.0 and r["n_digits"] == 2 and r["n_sentences"] == 1
    assert r["errors_digits"] == {"wer": 0.0, "sub": 0.0, "del": 0.0, "ins": 0.0, "words": r["errors_digits"]["words"]}
    assert r["errors_sentences"]["del"] == pytest.approx(0.5)
    assert r["wer_sentences"] == pytest.approx(0.5)  # "four words" vs "4" (= "four") -> 1 deletion of 2 words
    assert r["wer"] == pytest.approx(1 / 4)
    silent = word_error_rate(_FakeModel(), _FakeProcessor(), items, replace_audio="silence")
    assert silent["wer_digits"] == 1.0

    from PIL import Image

    qa = [{"image": Image.new("RGB", (8, 8), (255, 0, 0)), "question": "q", "answer": "1", "type": "colour"},
          {"image": Image.new("RGB", (8, 8), (0, 0, 0)), "question": "q", "answer": "0", "type": "count"},
          {"image": Image.new("RGB", (8, 8), (0, 0, 0)), "question": "q", "answer": "1", "type": "count"}]
    acc = accuracy(_FakeModel(), _FakeProcessor(), qa)
    assert acc["accuracy"] == pytest.approx(2 / 3)
    assert acc["by_type"] == {"colour": 1.0, "count": 0.5}


def test_choice_accuracy_picks_the_most_likely_candidate(monkeypatch):
    from PIL import Image

    from mmcompress.eval import vqa

    img = Image.new("RGB", (8, 8))
    qa = [{"image": img, "question": "q1", "answer": "red", "type": "colour"},
          {"image": img, "question": "q2", "answer": "blue", "type": "colour"},
          {"image": img, "question": "q3", "answer": "green", "type": "colour"},
          {"image": img, "question": "q4", "answer": "2", "type": "count"}]
    seen = []

    def truthful(model, processor, image, prompt, cand):  # log-likelihood 0 for the true answer, -1 otherwise
        q = prompt.split("Question: ")[1].split(" ")[0]
        seen.append((q, cand))
        return 0.0 if cand == {"q1": "red", "q2": "blue", "q3": "green", "q4": "2"}[q] else -1.0

    monkeypatch.setattr(vqa, "_answer_logprob", truthful)
    r = vqa.choice_accuracy(_FakeModel(), _FakeProcessor(), qa)
    assert r["accuracy"] == 1.0 and r["chance"] == {"colour": pytest.approx(1 / 3), "count": 1.0}
    # candidates are the answers of the question's own type only
    assert {c for q, c in seen if q == "q1"} == {"red", "blue", "green"} and {c for q, c in seen if q == "q4"} == {"2"}
    monkeypatch.setattr(vqa, "_answer_logprob", lambda m, p, i, prompt, cand: -len(cand))  # shortest answer wins
    r = vqa.choice_accuracy(_FakeModel(), _FakeProcessor(), qa)
    assert r["by_type"] == {"colour": pytest.approx(1 / 3), "count": 1.0}  # "red" is the only right pick


class _SeenTok:
    def decode(self, ids, skip_special_tokens=True):
        return "seen" if int(ids[0]) == 1 else "other"


class _PromptProcessor:
    """input_ids say whether the prompt was the test's own (1) or something else (0)."""

    tokenizer = _SeenTok()

    def __call__(self, text, audio=None, images=None, return_tensors="pt"):
        return {"input_ids": torch.tensor([[7, int(text[0].startswith("MY PROMPT"))]])}


def test_evaluation_takes_items_and_prompts(monkeypatch):
    from PIL import Image

    from mmcompress.data import named

    clips = [{"audio": np.zeros(160, np.float32), "transcript": "seen", "kind": "sentence"}]
    monkeypatch.setitem(named._SETS["speech"], "my-clips", lambda: clips)  # a named set, as a provider adds one
    assert word_error_rate(_FakeModel(), _PromptProcessor(), "my-clips", prompt="MY PROMPT")["wer"] == 0.0
    assert word_error_rate(_FakeModel(), _PromptProcessor(), clips)["wer"] == 1.0  # the default prompt
    qa = [{"image": Image.new("RGB", (8, 8)), "question": "q", "answer": "seen", "type": "t"}]
    assert accuracy(_FakeModel(), _PromptProcessor(), qa, prompt="MY PROMPT {question}")["accuracy"] == 1.0
    assert accuracy(_FakeModel(), _PromptProcessor(), qa)["accuracy"] == 0.0
