"""Named data sets come from a registry the testbed fills; evaluation takes items and prompts as data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcompress.data import named


@pytest.fixture
def own_sets(monkeypatch):
    """A private registry state: the real providers, plus whatever the test registers, undone afterwards."""
    named._load_providers()  # into the shared state first: a provider is imported once
    monkeypatch.setattr(named, "_SETS", {k: dict(v) for k, v in named._SETS.items()})


def test_the_testbed_provides_its_sets_on_first_lookup(own_sets):
    assert {"wiki", "shakespeare"} <= set(named.names("text"))
    assert {"wiki", "testbed"} <= set(named.names("calibration"))
    assert "speech-test" in named.names("speech") and "image-qa-test" in named.names("vqa")
    with pytest.raises(named.UnknownSet, match="'nope' is not a named vqa set .*image-qa-test"):
        named.resolve("vqa", "nope")


def test_a_registered_text_set_reaches_the_cli(own_sets, tmp_path):
    from mmcompress.cli import resolve_text

    named.register("text", "my-set", lambda: "one two three")
    assert resolve_text("my-set") == ("my-set", "one two three")
    with pytest.raises(FileNotFoundError, match="not a named text set .*my-set"):
        resolve_text(str(tmp_path / "missing"))


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return "seen" if int(ids[0]) == 1 else "other"


class _PromptProcessor:
    """input_ids say whether the prompt was the test's own (1) or something else (0)."""

    tokenizer = _Tok()

    def __call__(self, text, audio=None, images=None, return_tensors="pt"):
        return {"input_ids": torch.tensor([[7, int(text[0].startswith("MY PROMPT"))]])}


class _EchoModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, max_new_tokens=8, do_sample=False, **kw):
        return torch.cat([input_ids, input_ids[:, 1:]], 1)


def test_evaluation_takes_items_and_prompts(own_sets):
    from PIL import Image

    from mmcompress.eval.asr import word_error_rate
    from mmcompress.eval.vqa import accuracy

    clips = [{"audio": np.zeros(160, np.float32), "transcript": "seen", "kind": "sentence"}]
    named.register("speech", "my-clips", lambda: clips)
    assert word_error_rate(_EchoModel(), _PromptProcessor(), "my-clips", prompt="MY PROMPT")["wer"] == 0.0
    assert word_error_rate(_EchoModel(), _PromptProcessor(), clips)["wer"] == 1.0  # the default prompt
    qa = [{"image": Image.new("RGB", (8, 8)), "question": "q", "answer": "seen", "type": "t"}]
    assert accuracy(_EchoModel(), _PromptProcessor(), qa, prompt="MY PROMPT {question}")["accuracy"] == 1.0
    assert accuracy(_EchoModel(), _PromptProcessor(), qa)["accuracy"] == 0.0
