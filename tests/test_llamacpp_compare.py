"""benchmarks/llamacpp_compare.py's file preparation (plumbing only: nothing is built or timed): with
``--only`` it makes just the files the selected variants need."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp_compare.py"


@pytest.fixture
def cmp(monkeypatch):
    spec = importlib.util.spec_from_file_location("llamacpp_compare", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    calls = []
    monkeypatch.setattr(mod, "run", lambda cmd, **kw: calls.append([str(c) for c in cmd]))
    mod.calls = calls
    return mod


def _venv(tmp_path):
    conv = tmp_path / "venv/src/llama_cpp_python-0/vendor/llama.cpp/convert_hf_to_gguf.py"
    conv.parent.mkdir(parents=True)
    conv.write_text("")
    return tmp_path / "venv"


def test_build_only_what_only_needs(cmp, tmp_path):
    venv, work = _venv(tmp_path), tmp_path / "work"
    files = cmp.build(tmp_path / "model", work, venv, {"ours w8a8", "llama.cpp Q4_0"})
    assert set(files["artifacts"]) == {"w8a8"}
    assert set(files["gguf"]) == {"llama.cpp Q4_0"}
    made = [c for c in cmp.calls]
    assert any("quantize" in c and str(work / "art-w8a8") in c for c in made)
    assert not any(str(work / "art-w4a8") in c for c in made)
    # Q4_0 is quantized from llama.cpp's bf16 file, so that one is converted too (but not offered)
    assert any("--outtype" in c and "bf16" in c for c in made)
    assert not any("--outtype" in c and "q8_0" in c for c in made)
    assert not any("export" in c for c in made)


def test_build_everything_without_only(cmp, tmp_path):
    files = cmp.build(tmp_path / "model", tmp_path / "work", _venv(tmp_path))
    assert set(files["artifacts"]) == set(cmp.OURS)
    assert set(files["gguf"]) == {"llama.cpp BF16", "llama.cpp Q8_0", "llama.cpp Q4_0",
                                  "llama.cpp Q8_0, our w8a8 export", "llama.cpp Q4_0, our w4a16 export"}
    assert sum("export" in c for c in cmp.calls) == 2
