"""Named data sets come from a registry the testbed fills; evaluation takes items and prompts as data."""

from __future__ import annotations

import pytest

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
