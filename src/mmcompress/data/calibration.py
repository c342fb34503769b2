"""Calibration sets: text windows, multimodal JSONL samples or in-memory objects.

A :class:`CalibrationSet` is a list of model-input dicts (``input_ids`` plus, for multimodal
samples, ``pixel_values``/``image_grid_thw``/``input_features``/... as the model's processor makes
them), each with batch size 1, on the CPU.  Sampling is seeded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..fileio import atomic_write, cache_dir
from ..models.modality import input_modality_ids, token_counts

log = logging.getLogger(__name__)


class CalibrationError(ValueError):
    pass


NOT_TEXT_WARN = 0.2  # warn when more than this fraction of the characters is not text


def check_text(text: str, source: str, *, warn: bool = True) -> float:
    """The fraction of ``text`` that is not text: U+FFFD replacement characters (bytes that were not
    UTF-8) and control characters other than newline, tab and carriage return.  Nothing usable left
    is an error; more than :data:`NOT_TEXT_WARN` a warning on stderr (``warn``)."""
    if not text:
        return 0.0
    bad = sum(1 for ch in text if ch == "\ufffd" or (unicodedata.category(ch) in ("Cc", "Cs", "Co", "Cn")
                                                     and ch not in "\n\r\t"))
    frac = bad / len(text)
    if frac > NOT_TEXT_WARN:
        usable = "".join(ch for ch in text if ch.isprintable() and ch != "\ufffd")
        if not any(ch.isalnum() for ch in usable):
            raise CalibrationError(f"{source} is not text ({frac:.0%} of it is binary or invalid UTF-8); "
                                   "nothing usable remains")
        if warn:
            log.warning(f"warning: {source}: {frac:.0%} of the text is binary or invalid UTF-8 (replacement or "
                        "control characters); is it the right file?")
    return frac


@dataclass
class CalibrationSet:
    samples: list[dict]
    source: str = "memory"
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def token_counts(self, token_ids: dict[str, int] | None = None) -> dict[str, int]:
        """Number of calibration tokens per modality (text/image/audio/video)."""
        total = {"text": 0, "image": 0, "audio": 0, "video": 0}
        for s in self.samples:
            ids = input_modality_ids(s, token_ids or {}, decode=False)
            for k, v in token_counts(ids).items():
                total[k] += v
        return total

    def summary(self, token_ids=None) -> dict:
        return {"source": self.source, "nsamples": len(self), "tokens": self.token_counts(token_ids), **self.meta}

    # -- builders --------------------------------------------------------------------------------
    @classmethod
    def from_text(cls, text: str, tokenizer, nsamples: int = 128, seqlen: int = 512, seed: int = 0, source="text") -> "CalibrationSet":
        """``nsamples`` random windows of ``seqlen`` tokens from one tokenised text (seeded)."""
        _check_counts(nsamples, seqlen)
        if not text or not text.strip():
            raise CalibrationError(f"calibration text ({source}) is empty")
        ids = tokenize_text(text, tokenizer)
        if ids.numel() < seqlen:
            raise CalibrationError(f"calibration text ({source}) has {ids.numel()} tokens, fewer than --seqlen {seqlen}")
        rng = random.Random(seed)
        last = ids.numel() - seqlen
        starts = [rng.randint(0, last) for _ in range(nsamples)]
        samples = [{"input_ids": ids[s : s + seqlen].unsqueeze(0).clone()} for s in starts]
        return cls(samples, source=source, meta={"seqlen": seqlen, "seed": seed})

    @classmethod
    def from_text_file(cls, path, tokenizer, nsamples=128, seqlen=512, seed=0) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise CalibrationError(f"calibration file {path} is empty")
        check_text(text, f"calibration file {path}")
        return cls.from_text(text, tokenizer, nsamples, seqlen, seed, source=str(path))

    @classmethod
    def from_records(cls, records: list[dict], processor, nsamples: int | None = None, seqlen: int | None = None,
                     seed: int = 0, source="memory", base_dir=None) -> "CalibrationSet":
        """Samples ``{"text": str, "images": [path | PIL.Image], "audio": [path | array]}`` through
        the model's processor (or tokenizer for text-only records)."""
        if not records:
            raise CalibrationError(f"calibration set ({source}) is empty")
        records = list(records)
        if nsamples is not None and nsamples < len(records):
            rng = random.Random(seed)
            records = rng.sample(records, nsamples)
        samples = [encode_record(r, processor, seqlen=seqlen, base_dir=base_dir) for r in records]
        return cls(samples, source=source, meta={"seed": seed})

    @classmethod
    def from_jsonl(cls, path, processor, nsamples=None, seqlen=None, seed=0) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or "text" not in rec:
                raise CalibrationError(f'{path}:{n}: each line must be an object with a "text" field')
            records.append(rec)
        if not records:
            raise CalibrationError(f"calibration file {path} is empty")
        check_text("\n".join(str(r["text"]) for r in records), f"calibration file {path}")
        return cls.from_records(records, processor, nsamples, seqlen, seed, source=str(path), base_dir=path.parent)


TOKENIZE_CHUNK_CHARS = 1 << 18  # characters per piece of a long text
TOKENIZE_MAX_BATCH = 4  # pieces per tokenizer call (a fast tokenizer encodes a batch's pieces in parallel)
_CUT_CONTEXT = 4096  # characters either side of a cut that must tokenize the same cut and uncut
TOKEN_CACHE_MIN_CHARS = 1 << 20  # texts at least this long have their ids cached on disk (see token_cache_path)
_TOKEN_CACHE_FORMAT = "1"


def tokenize_text(text: str, tokenizer, chunk_chars: int | None = None) -> torch.Tensor:
    """The token ids (1-D int64) of one ``tokenizer(text, add_special_tokens=False)`` call, without its
    memory: a fast tokenizer keeps strings, offsets and masks for every token of a call (about 0.6 GB for
    the 1 M tokens of a 4.7 MB text).  The text is tokenized in pieces of about ``chunk_chars`` cut at
    paragraph breaks (``"\\n\\n"``), each cut only where the text around it tokenizes to the same ids
    cut and uncut (tried before, inside and after the break, since tokenizers attach a newline run to the
    text before or after it); a tokenizer that changes the start of a piece (SentencePiece's prefix space)
    passes no such check, and gets the whole text in one call as before.  Up to :func:`_batch_size`
    pieces go to the tokenizer in one call (one list), which a fast tokenizer encodes in parallel.

    A text of at least :data:`TOKEN_CACHE_MIN_CHARS` characters tokenized by a fast tokenizer has its ids
    cached on disk (:func:`token_cache_path`), so later processes skip the tokenizer."""
    path = token_cache_path(text, tokenizer) if len(text) >= TOKEN_CACHE_MIN_CHARS else None
    if path is not None:
        ids = _read_token_cache(path)
        if ids is not None:
            return ids
    ids = _tokenize_pieces(text, tokenizer, chunk_chars or TOKENIZE_CHUNK_CHARS)
    if path is not None:
        _write_token_cache(path, ids)
    return ids


def _tokenize_pieces(text: str, tokenizer, chunk_chars: int) -> torch.Tensor:
    bounds, start = [], 0
    while start < len(text):
        end = _cut(text, tokenizer, start, chunk_chars)
        bounds.append((start, end))
        start = end
    if len(bounds) == 1:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    ids, batch = [], _batch_size()
    for i in range(0, len(bounds), batch):
        pieces = [text[a:b] for a, b in bounds[i:i + batch]]
        ids.extend(torch.tensor(p, dtype=torch.int64)
                   for p in tokenizer(pieces, add_special_tokens=False)["input_ids"])
    return torch.cat(ids)


def _batch_size() -> int:
    """Pieces per tokenizer call: the CPUs this process may use (at most :data:`TOKENIZE_MAX_BATCH`: each
    piece in flight holds its per-token state), 1 where ``TOKENIZERS_PARALLELISM`` turns parallelism off."""
    if os.environ.get("TOKENIZERS_PARALLELISM", "").strip().lower() in ("off", "false", "f", "no", "n", "0"):
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, TOKENIZE_MAX_BATCH))


# -- token cache -----------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str | None:
    """A digest of what decides ``tokenizer(text, add_special_tokens=False)``'s ids: the fast tokenizer's
    serialized backend (normalizer, pre-tokenizer, model, added tokens, post-processor; truncation and
    padding, which that call turns off, left out), its class, ``split_special_tokens`` and the transformers
    and tokenizers versions.  ``None`` (not cached) for a tokenizer without a serializable backend or whose
    class changes the text or the call in Python (overrides ``__call__`` or ``_encode_plus``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not callable(getattr(backend, "to_str", None)):
        return None
    cls = type(tokenizer)
    call, encode = getattr(cls, "__call__", None), getattr(cls, "_encode_plus", None)
    if (getattr(call, "__module__", None) != "transformers.tokenization_utils_base"
            or getattr(encode, "__module__", None) not in ("transformers.tokenization_utils_tokenizers",
                                                          "transformers.tokenization_utils_fast")):
        return None
    try:
        import tokenizers
        import transformers

        serialized = backend.to_str()
        if backend.truncation is not None or backend.padding is not None:
            state = json.loads(serialized)
            state["truncation"] = state["padding"] = None
            serialized = json.dumps(state, sort_keys=True)
        head = json.dumps({"class": f"{cls.__module__}.{cls.__qualname__}",
                           "split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
                           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
                          sort_keys=True)
    except Exception as e:  # an unusual backend: tokenize without the cache
        log.debug(f"token cache: no fingerprint for {cls.__name__} ({e})")
        return None
    h = hashlib.sha256(head.encode())
    h.update(b"\0")
    h.update(serialized.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def token_cache_path(text: str, tokenizer) -> Path | None:
    """``$MMCOMPRESS_CACHE/tokens/<sha256 of the text and the tokenizer fingerprint>.safetensors``, or
    ``None`` where there is no cache: ``MMCOMPRESS_NO_TOKEN_CACHE`` set (to anything but ``0``), or no
    :func:`tokenizer_fingerprint`."""
    if os.environ.get("MMCOMPRESS_NO_TOKEN_CACHE", "0").strip() not in ("", "0"):
        return None
    fp = tokenizer_fingerprint(tokenizer)
    if fp is None:
        return None
    h = hashlib.sha256(f"mmcompress-tokens-{_TOKEN_CACHE_FORMAT}\0{fp}\0".encode())
    h.update(text.encode("utf-8", "surrogatepass"))
    return cache_dir("tokens", f"{h.hexdigest()}.safetensors")


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.contiguous().numpy().tobytes()).hexdigest()


def _read_token_cache(path: Path) -> torch.Tensor | None:
    """The cached ids (int64), or ``None`` when the entry is missing or unreadable (it is then rewritten)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            ids = f.get_tensor("input_ids")
        if (meta.get("format") != _TOKEN_CACHE_FORMAT or ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64)
                or meta.get("sha256") != _ids_digest(ids)):
            raise ValueError("not a token cache entry, or its ids do not match their digest")
    except Exception as e:  # corrupt, truncated, foreign: recompute and rewrite
        log.debug(f"token cache: ignoring {path} ({e})")
        return None
    return ids.to(torch.int64)


def _write_token_cache(path: Path, ids: torch.Tensor) -> None:
    """Store ``ids`` (int32 where they fit) atomically; a cache that cannot be written is skipped."""
    try:
        from safetensors.torch import save_file

        info = torch.iinfo(torch.int32)
        small = ids.numel() == 0 or (int(ids.min()) >= info.min and int(ids.max()) <= info.max)
        stored = ids.to(torch.int32) if small else ids
        meta = {"format": _TOKEN_CACHE_FORMAT, "sha256": _ids_digest(stored)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"input_ids": stored.contiguous()}, str(tmp), metadata=meta))
    except Exception as e:
        log.debug(f"token cache: could not write {path} ({e})")


def _cut(text: str, tokenizer, start: int, chunk_chars: int, tries: int = 8) -> int:
    """Where the piece starting at ``start`` ends: a verified cut near ``start + chunk_chars``, else the end."""
    if len(text) - start <= 2 * chunk_chars:
        return len(text)
    at = start + chunk_chars
    for _ in range(tries):
        br = text.find("\n\n", at, len(text) - chunk_chars)
        if br < 0:
            break
        for cut in (br, br + 1, br + 2):
            lo, hi = max(start, cut - _CUT_CONTEXT), cut + _CUT_CONTEXT
            whole = tokenizer(text[lo:hi], add_special_tokens=False)["input_ids"]
            if whole == (tokenizer(text[lo:cut], add_special_tokens=False)["input_ids"]
                         + tokenizer(text[cut:hi], add_special_tokens=False)["input_ids"]):
                return cut
        at = br + 2
    return len(text)


def _check_counts(nsamples, seqlen):
    if nsamples is None or nsamples < 1:
        raise CalibrationError(f"--nsamples must be >= 1, got {nsamples}")
    if seqlen is None or seqlen < 2:
        raise CalibrationError(f"--seqlen must be >= 2, got {seqlen}")


def _resolve(p, base_dir):
    if isinstance(p, (str, Path)):
        path = Path(p)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"calibration media file {path} does not exist")
        return path
    return p


def encode_record(record: dict, processor, seqlen=None, base_dir=None) -> dict:
    from .media import load_audio, load_image

    images = [load_image(_resolve(p, base_dir)) for p in record.get("images", []) or []]
    audio = [load_audio(_resolve(p, base_dir)) for p in record.get("audio", []) or []]
    text = record["text"]
    tokenizer = getattr(processor, "tokenizer", processor)
    if not images and not audio:
        enc = tokenizer(text, return_tensors="pt")
        out = {"input_ids": enc["input_ids"]}
    else:
        text = _with_placeholders(text, processor, len(images), len(audio))
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if audio:
            kwargs["audio"] = audio
        enc = processor(**kwargs)
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor) and k != "attention_mask"}
    if seqlen is not None and out["input_ids"].shape[1] > seqlen and not images and not audio:
        out["input_ids"] = out["input_ids"][:, :seqlen]
    return out


def _with_placeholders(text: str, processor, n_images: int, n_audio: int) -> str:
    """Prefix one placeholder per image/audio item unless the text already has them."""
    tok = processor.tokenizer
    prefix = ""
    image_token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None)
    audio_token = getattr(processor, "audio_token", None) or getattr(tok, "audio_token", None)
    if n_images and image_token and image_token not in text:
        vb = getattr(tok, "vision_bos_token", "") or ""
        ve = getattr(tok, "vision_eos_token", "") or ""
        prefix += (vb + image_token + ve) * n_images
    if n_audio and audio_token and audio_token not in text:
        ab = getattr(tok, "audio_bos_token", "") or ""
        ae = getattr(tok, "audio_eos_token", "") or ""
        prefix += (ab + audio_token + ae) * n_audio
    return prefix + text
