"""The on-disk cache of a long text's token ids (data.calibration.tokenize_text / token_cache_path): a hit gives
the ids of the tokenizer bit for bit without calling it; the key follows the text and the tokenizer; a corrupt
entry is recomputed and rewritten; MMCOMPRESS_NO_TOKEN_CACHE turns it off; it lives under $MMCOMPRESS_CACHE."""

import random
from pathlib import Path

import pytest
import torch

from mmcompress import fileio
from mmcompress.data import calibration
from mmcompress.data.calibration import CalibrationSet, token_cache_path, tokenize_text

from .test_calibration_tokenize import TOKENIZERS, _Counting, _text, _whole
from .tiny_models import tiny_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The token cache in a temporary MMCOMPRESS_CACHE, on for texts of 1000 characters or more."""
    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path / "mmc"))
    monkeypatch.delenv("MMCOMPRESS_NO_TOKEN_CACHE", raising=False)
    monkeypatch.setattr(calibration, "TOKEN_CACHE_MIN_CHARS", 1000)
    return tmp_path / "mmc" / "tokens"


def _spy(tok, monkeypatch) -> list:
    """Record every call that reaches the tokenizer's encoder (the instance attribute shadows the class's
    method, so the fingerprint, which looks at the class, is unchanged)."""
    calls, encode = [], tok._encode_plus

    def spy(*a, **kw):
        calls.append(a[0] if a else kw.get("text"))
        return encode(*a, **kw)

    monkeypatch.setattr(tok, "_encode_plus", spy, raising=False)
    return calls


def _entries(cache) -> list[Path]:
    return sorted(cache.glob("*.safetensors")) if cache.is_dir() else []


@pytest.mark.parametrize("kind", ["gpt2-style", "qwen-style"])
def test_hit_gives_the_same_ids_without_the_tokenizer(kind, cache, monkeypatch):
    tok, text = TOKENIZERS[kind](), _text()
    whole = _whole(text, tok)
    calls = _spy(tok, monkeypatch)
    cold = tokenize_text(text, tok, chunk_chars=2000)
    assert calls and torch.equal(cold, whole)
    assert len(_entries(cache)) == 1
    calls.clear()
    warm = tokenize_text(text, tok, chunk_chars=2000)
    assert calls == []
    assert warm.dtype == torch.int64 and warm.shape == whole.shape and torch.equal(warm, whole)


def test_spy_sees_the_tokenizer_when_the_cache_is_off(cache, monkeypatch):
    """The hit test's ``calls == []`` can fail: the same two calls without the cache reach the tokenizer."""
    monkeypatch.setenv("MMCOMPRESS_NO_TOKEN_CACHE", "1")
    tok, text = tiny_tokenizer(), _text()
    calls = _spy(tok, monkeypatch)
    tokenize_text(text, tok, chunk_chars=2000)
    calls.clear()
    assert torch.equal(tokenize_text(text, tok, chunk_chars=2000), _whole(text, tok))
    assert calls and _entries(cache) == []


def test_key_follows_the_text_and_the_tokenizer(cache):
    text = _text()
    a, a2, b = tiny_tokenizer(), tiny_tokenizer(), TOKENIZERS["qwen-style"]()
    key = token_cache_path(text, a)
    assert key is not None and key.parent == cache and key.suffix == ".safetensors"
    assert token_cache_path(text, a2) == key  # an equal tokenizer, another instance
    assert token_cache_path(text + " ", a) != key
    assert token_cache_path(text[:-1], a) != key
    assert token_cache_path(text, b) != key
    small = tiny_tokenizer(vocab_size=300)
    assert len(small) < len(a) and token_cache_path(text, small) != key
    a2.split_special_tokens = True  # special tokens' text split as plain text: other ids
    assert token_cache_path(text, a2) != key
    a2.split_special_tokens = False
    a2.add_tokens(["river war"])  # an added token changes the ids and the key
    assert token_cache_path(text, a2) != key


def test_no_key_without_a_serializable_backend(cache):
    """A wrapper (no backend_tokenizer) or a class that overrides the call is tokenized as before, uncached."""
    text = _text()
    assert token_cache_path(text, _Counting(tiny_tokenizer())) is None
    tok = tiny_tokenizer()

    class Lower(type(tok)):
        def __call__(self, text, **kw):
            return super().__call__(text.lower() if isinstance(text, str) else [t.lower() for t in text], **kw)

    tok.__class__ = Lower
    assert token_cache_path(text, tok) is None
    tokenize_text(text, tok, chunk_chars=2000)
    assert _entries(cache) == []


@pytest.mark.parametrize("damage", ["truncated", "flipped id", "garbage", "empty", "wrong tensor"])
def test_corrupt_entry_is_recomputed_and_rewritten(damage, cache, monkeypatch):
    tok, text = tiny_tokenizer(), _text()
    whole = _whole(text, tok)
    tokenize_text(text, tok, chunk_chars=2000)
    (entry,) = _entries(cache)
    raw = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "flipped id":  # valid safetensors, one id changed: caught by the stored digest
        entry.write_bytes(raw[:-7] + bytes([raw[-7] ^ 1]) + raw[-6:])
    elif damage == "garbage":
        entry.write_bytes(b"\x00\xff" * 300)
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(entry))
    calls = _spy(tok, monkeypatch)
    assert torch.equal(tokenize_text(text, tok, chunk_chars=2000), whole)
    assert calls  # recomputed
    calls.clear()
    assert torch.equal(tokenize_text(text, tok, chunk_chars=2000), whole)
    assert calls == []  # and rewritten
    assert _entries(cache) == [entry]


def test_env_var_turns_the_cache_off(cache, monkeypatch):
    tok, text = tiny_tokenizer(), _text()
    monkeypatch.setenv("MMCOMPRESS_NO_TOKEN_CACHE", "1")
    assert token_cache_path(text, tok) is None
    assert torch.equal(tokenize_text(text, tok, chunk_chars=2000), _whole(text, tok))
    assert _entries(cache) == []
    monkeypatch.setenv("MMCOMPRESS_NO_TOKEN_CACHE", "0")
    tokenize_text(text, tok, chunk_chars=2000)
    assert len(_entries(cache)) == 1


def test_short_texts_are_not_cached(cache, monkeypatch):
    tok, text = tiny_tokenizer(), _text()
    monkeypatch.setattr(calibration, "TOKEN_CACHE_MIN_CHARS", len(text) + 1)
    tokenize_text(text, tok, chunk_chars=2000)
    assert _entries(cache) == []


def test_cache_dir_follows_mmcompress_cache(tmp_path, monkeypatch):
    from mmcompress.sparse.kernels import cpu

    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path / "elsewhere"))
    assert fileio.cache_dir("tokens") == tmp_path / "elsewhere" / "tokens"
    assert cpu.build_dir("x") == tmp_path / "elsewhere" / "torch_extensions" / "x"
    monkeypatch.delenv("MMCOMPRESS_NO_TOKEN_CACHE", raising=False)
    assert token_cache_path("text", tiny_tokenizer()).parent == tmp_path / "elsewhere" / "tokens"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unset in (lambda: monkeypatch.delenv("MMCOMPRESS_CACHE"), lambda: monkeypatch.setenv("MMCOMPRESS_CACHE", "")):
        unset()
        assert fileio.cache_dir("tokens") == tmp_path / "home" / ".cache" / "mmcompress" / "tokens"


def test_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path / "file"))
    monkeypatch.delenv("MMCOMPRESS_NO_TOKEN_CACHE", raising=False)
    monkeypatch.setattr(calibration, "TOKEN_CACHE_MIN_CHARS", 1000)
    tok, text = tiny_tokenizer(), _text()
    assert torch.equal(tokenize_text(text, tok, chunk_chars=2000), _whole(text, tok))


@pytest.mark.parametrize("value", [7, 2**31 - 1, 2**31, -(2**31) - 1])
def test_stored_int32_where_the_ids_fit(value, tmp_path):
    from safetensors import safe_open

    ids = torch.tensor([0, 5, value, 3], dtype=torch.int64)
    path = tmp_path / "e.safetensors"
    calibration._write_token_cache(path, ids)
    with safe_open(str(path), framework="pt") as f:
        stored = f.get_tensor("input_ids").dtype
    assert stored == (torch.int32 if -(2**31) <= value < 2**31 else torch.int64)
    back = calibration._read_token_cache(path)
    assert back.dtype == torch.int64 and torch.equal(back, ids)


def test_from_text_windows_from_the_cache(cache, monkeypatch):
    tok, text = tiny_tokenizer(), _text()
    monkeypatch.setattr(calibration, "TOKENIZE_CHUNK_CHARS", 1500)
    cold = CalibrationSet.from_text(text, tok, nsamples=6, seqlen=32, seed=7)
    calls = _spy(tok, monkeypatch)
    warm = CalibrationSet.from_text(text, tok, nsamples=6, seqlen=32, seed=7)
    assert calls == [] and len(_entries(cache)) == 1
    whole = _whole(text, tok)
    rng = random.Random(7)
    starts = [rng.randint(0, whole.numel() - 32) for _ in range(6)]
    for c, w, s in zip(cold, warm, starts):
        assert torch.equal(c["input_ids"], w["input_ids"]) and torch.equal(w["input_ids"][0], whole[s:s + 32])


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b"])
def test_wiki_split_cached_ids_are_one_calls(name, tmp_path, monkeypatch):
    """The real calibration split (4.7 MB): cold (batched pieces) and warm (cache) ids equal one tokenizer call's."""
    from mmcompress.models.loading import load_tokenizer

    from mmcompress_testbed import data, registry

    entry = next(m for m in registry.list_models() if m["name"] == name)
    if not entry["cached"]:
        pytest.skip(f"{name} is not in the testbed cache (mmcompress testbed fetch {name})")
    text, tok = data.calibration_text("wiki"), load_tokenizer(Path(entry["path"]))
    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path))  # after the testbed lookups, which it would move
    monkeypatch.delenv("MMCOMPRESS_NO_TOKEN_CACHE", raising=False)
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    whole = _whole(text, tok)
    cold = tokenize_text(text, tok)
    assert len(_entries(tmp_path / "tokens")) == 1
    calls = _spy(tok, monkeypatch)
    warm = tokenize_text(text, tok)
    assert calls == [] and torch.equal(cold, whole) and torch.equal(warm, whole)
