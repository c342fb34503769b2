"""``mmcompress demo --output``: refused before any work when it holds someone else's files, replaced only
when it is an earlier demo's, and never half-written (the demo itself runs in CI: .ci/run)."""

from __future__ import annotations

import json

import pytest

from mmcompress.fileio import OutputError
from mmcompress_testbed import demo, registry


class Stop(Exception):
    pass


@pytest.fixture
def no_models(monkeypatch):
    """The demo stops at its first model fetch: everything before it (the output check) has run."""
    calls = []

    def fetch(name, **kw):
        calls.append(name)
        raise Stop(name)

    monkeypatch.setattr(registry, "fetch", fetch)
    return calls


def test_user_directory_is_refused_before_any_work(tmp_path, no_models):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "diagnostics-mine.json").write_text("{}")  # the old demo deleted these in any --output
    with pytest.raises(OutputError, match="not empty"):
        demo.run_demo(out, quick=True, progress=False)
    assert no_models == []
    assert sorted(p.name for p in out.iterdir()) == ["diagnostics-mine.json", "notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_earlier_demo_is_accepted_and_kept_when_the_run_fails(tmp_path, no_models):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"rows": [], "settings": {}}))
    (out / "report.md").write_text("old report")
    with pytest.raises(Stop):
        demo.run_demo(out, quick=True, progress=False)
    assert no_models == ["omni-mini"]  # it got past the output check and started working
    assert (out / "report.md").read_text() == "old report"  # a failed run leaves the earlier one whole
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # and no work directory behind


def test_overwrite_and_earlier_demo_detection(tmp_path, no_models):
    out = tmp_path / "x"
    out.mkdir()
    (out / "demo.json").write_text(json.dumps({"rows": []}))  # not a demo's: no settings
    assert not demo.earlier_demo(out)
    with pytest.raises(OutputError):
        demo.run_demo(out, quick=True, progress=False)
    with pytest.raises(Stop):
        demo.run_demo(out, quick=True, progress=False, overwrite=True)
    assert (out / "demo.json").exists()
