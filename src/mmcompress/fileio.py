"""Safe file output: the one place where mmcompress writes, replaces or deletes files.

Rules (see the README's "Bad input" paragraph):

* **Files** are written to a temporary file in the same directory, flushed to disk and renamed over
  the target (:func:`atomic_write`); the result gets the user's umask, never the 0600 of a temp file.
* **Output directories** (:func:`atomic_output_dir`) are built in a sibling work directory
  ``.NAME.mmcompress-PID-XXXX/`` that carries our marker file (:data:`MARKER`, locked with ``flock``
  while the run is alive).  An existing non-empty output is refused unless ``overwrite=True``;
  even then an output that is, contains or lies inside an input, or is the working directory or one
  of its parents, is refused.  On success the new directory is swapped in with one atomic
  ``renameat2(RENAME_EXCHANGE)`` (elsewhere: the old one is renamed into the work directory, the new
  one renamed in), then the work directory (holding the old output) is deleted.  A kill at any
  instant leaves the old or the new artifact complete at the output path (on the fallback path the
  next run renames the old one back if the kill fell between the two renames).
* **Work directories** that a run needs until it ends (:class:`WorkDir`: a streamed recipe's
  intermediate model) are the same marked, locked siblings of the output, removed at the end.
* **Nothing without our marker is deleted.**  Stale work directories (marker present, lock free,
  owner pid dead) next to an output are cleaned by the next run that writes that output.
* **Checkpoint directories** (:class:`CheckpointDir`): a marker file says they are ours, an
  exclusive lock says they are in use; a user directory without the marker is refused unless empty.

Tests inject faults through :func:`step_hook` (each step of a commit calls :func:`step`); there is
no kill switch in the product.  This module imports nothing from the rest of the package.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

MARKER = ".mmcompress-partial"  # in a work directory next to an output: ours, delete when stale
CHECKPOINT_MARKER = ".mmcompress-checkpoint"  # in a checkpoint directory: ours
CHECKPOINT_LOCK = ".mmcompress-lock"
_TMP_TAG = ".mmcompress-tmp-"  # temporary files: .NAME.mmcompress-tmp-PID-XXXX


class OutputError(ValueError):
    """An output path that mmcompress refuses to write (one line, says what to do)."""


# -- fault-injection hooks (tests) ----------------------------------------------------------------

_hooks: list[Callable[[str], None]] = []


class DiskSpaceError(OSError):
    """Not enough free space for an output (raised before it is written)."""

    def __str__(self) -> str:
        return self.strerror


def require_space(directory, nbytes: int, what: str) -> None:
    """Raise :class:`DiskSpaceError` saying how many bytes ``what`` needs when ``directory``'s file system has
    fewer free (checked before writing, so a previous output is left as it was)."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise DiskSpaceError(errno.ENOSPC, f"not enough disk space for {what}: it needs {nbytes} bytes, "
                                           f"{free} are free in {directory}; nothing was replaced")


def step(name: str) -> None:
    """Mark a step of a commit (``output.swapped``, ``checkpoint.state:3``, ...) for the hooks."""
    for hook in list(_hooks):
        hook(name)


@contextmanager
def step_hook(fn: Callable[[str], None]):
    """Call ``fn(step_name)`` at every commit step while the context is open (tests kill the process there)."""
    _hooks.append(fn)
    try:
        yield fn
    finally:
        _hooks.remove(fn)


# -- modes ---------------------------------------------------------------------------------------


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- cache ---------------------------------------------------------------------------------------


def cache_dir(*parts: str) -> Path:
    """``$MMCOMPRESS_CACHE`` (unset or empty: ``~/.cache/mmcompress``) joined with ``parts``: the one
    place the product resolves its cache (compiled kernels under ``torch_extensions/``, token ids under
    ``tokens/``).  Nothing is created."""
    env = os.environ.get("MMCOMPRESS_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "mmcompress"
    return root.joinpath(*parts)


# -- atomic files --------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale_tmp_files(path: Path) -> None:
    """Remove ``.NAME.mmcompress-tmp-PID-*`` files of ``path`` whose writer is dead (and such a
    directory if it holds nothing but a checkpoint marker being written)."""
    for p in path.parent.glob(f".{path.name}{_TMP_TAG}*"):
        try:
            pid = int(p.name[len(f".{path.name}{_TMP_TAG}"):].split("-")[0])
        except ValueError:
            continue
        if _pid_alive(pid) or p.is_symlink():
            continue
        if p.is_file():
            p.unlink(missing_ok=True)
        elif p.is_dir() and all(q.is_file() and q.name.startswith((CHECKPOINT_MARKER, f".{CHECKPOINT_MARKER}{_TMP_TAG}"))
                                for q in p.iterdir()):
            shutil.rmtree(p)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then fsync and rename it over ``path``."""
    path = Path(path)
    _clean_stale_tmp_files(path)
    tmp = path.parent / f".{path.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fchmod(fd, file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        step(f"file.written:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path, obj, **kw) -> Path:
    return atomic_write_text(path, json.dumps(obj, **kw))


# -- output directories --------------------------------------------------------------------------


def _real(path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (both real paths)."""
    return a == b or b in a.parents


def check_output(output, *, overwrite: bool = False, inputs: Iterable = (), flag: str = "--output") -> Path:
    """Refuse an output that would lose data; returns its real path.  Cheap: call it before heavy work."""
    real = _real(output)
    cwd = _real(os.getcwd())
    if _within(cwd, real):
        raise OutputError(f"{flag} {output} is the working directory or one of its parents; choose a new directory")
    for inp in inputs:
        if inp is None:
            continue
        r_in = _real(inp)
        if _within(real, r_in) or _within(r_in, real):
            what = "is" if real == r_in else ("is inside" if _within(real, r_in) else "contains")
            raise OutputError(f"{flag} {output} {what} the input {inp}; choose a directory outside it")
    if real.parent.is_dir():
        clean_stale(real)  # our dead runs' leftovers first (and an old output a killed swap left aside)
    live = _live_writers(real)
    if live:
        raise OutputError(f"{flag} {output} is being written by another mmcompress run (pid {live[0]}); "
                          "wait for it or choose another directory")
    if real.exists() or real.is_symlink():
        if not real.is_dir():
            raise OutputError(f"{flag} {output} exists and is not a directory; choose another path")
        if any(real.iterdir()) and not overwrite:
            raise OutputError(f"{flag} {output} exists and is not empty; pass --overwrite to replace it "
                              "or choose another directory")
    return real


def _work_dirs(real: Path) -> list[Path]:
    return [p for p in real.parent.glob(f".{real.name}.mmcompress-*")
            if p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()]


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None if another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _read_pid(path: Path) -> int | None:
    try:
        return int(json.loads(path.read_text()).get("pid"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _live_writers(real: Path) -> list[int | None]:
    """Pids of live runs writing ``real`` (their work directory's marker is locked); this run's own
    :class:`WorkDir` does not count."""
    live = []
    for work in _work_dirs(real):
        if work in _OWN_WORK_DIRS:
            continue
        fd = _try_lock(work / MARKER)
        if fd is None:
            live.append(_read_pid(work / MARKER))
        else:
            os.close(fd)
    return live


def clean_stale(output) -> list[Path]:
    """Remove our dead runs' work directories next to ``output``; if a run died between renaming the
    old output aside and the new one in (fallback path), first rename the old one back.  Returns what
    was removed."""
    real = _real(output)
    removed = []
    for work in _work_dirs(real):
        pid = _read_pid(work / MARKER)
        if pid is not None and _pid_alive(pid):
            continue
        fd = _try_lock(work / MARKER)
        if fd is None:  # alive
            continue
        try:
            old = work / "old"
            if old.is_dir() and not (real.exists() or real.is_symlink()):
                os.rename(old, real)
            shutil.rmtree(work)
            removed.append(work)
        finally:
            os.close(fd)
    return removed


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _rename_noreplace(a: Path, b: Path) -> None:
    """Rename ``a`` to ``b``; FileExistsError if ``b`` exists (even as an empty directory)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    except (AttributeError, OSError):
        fn = None
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(b))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise OSError(err, os.strerror(err), str(b))
    if b.exists() or b.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(b))
    os.rename(a, b)


@contextmanager
def atomic_output_dir(output, *, overwrite: bool = False, inputs: Iterable = (), flag: str = "--output",
                      exchange: bool = True) -> Iterator[Path]:
    """Yield an empty directory to write; on success it replaces ``output`` atomically.

    Refuses (``OutputError``) what :func:`check_output` refuses.  On an exception only our own work
    directory is removed.  ``exchange=False`` forces the two-rename fallback (tests)."""
    inputs = list(inputs)
    real = check_output(output, overwrite=overwrite, inputs=inputs, flag=flag)
    real.parent.mkdir(parents=True, exist_ok=True)
    work = real.parent / f".{real.name}.mmcompress-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    marker = work / MARKER
    fd = _try_lock(marker)
    try:
        os.write(fd, json.dumps({"pid": os.getpid(), "output": real.name}).encode())
        new = work / "new"
        new.mkdir()
        step("output.created")
        try:
            yield new
            _finish_tree(new)
            step("output.written")
            with _locked_dir(real.parent):  # one commit at a time per parent directory
                _check_exists(real, output, overwrite, flag)
                if real.exists() or real.is_symlink():
                    if not (exchange and _exchange(new, real)):
                        os.rename(real, work / "old")
                        step("output.aside")
                        os.rename(new, real)
                else:
                    os.rename(new, real)
                _fsync_dir(real.parent)
            step("output.swapped")
        except BaseException:
            old = work / "old"
            if old.is_dir() and not (real.exists() or real.is_symlink()):
                os.rename(old, real)  # the fallback failed between its two renames: put the old one back
            shutil.rmtree(work, ignore_errors=True)
            raise
        shutil.rmtree(work, ignore_errors=True)
        step("output.done")
    finally:
        os.close(fd)


def _finish_tree(root: Path) -> None:
    """Give every file and directory under ``root`` the umask's mode (some writers create 0600
    files) and flush them to disk before they become the output."""
    fmode, dmode = file_mode(), dir_mode()
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        if p.is_dir():
            os.chmod(p, dmode)
            _fsync_dir(p)
        elif p.is_file():
            f = os.open(p, os.O_RDONLY)
            try:
                os.fchmod(f, fmode)
                os.fsync(f)
            finally:
                os.close(f)


@contextmanager
def _locked_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _check_exists(real: Path, output, overwrite: bool, flag: str) -> None:
    """At commit time: a run that finished while we were working may have written the output."""
    if (real.exists() or real.is_symlink()) and not overwrite and (not real.is_dir() or any(real.iterdir())):
        raise OutputError(f"{flag} {output} was written by another run while this one was working; "
                          "pass --overwrite to replace it or choose another directory")


_OWN_WORK_DIRS: set[Path] = set()  # this process's live WorkDirs


class WorkDir:
    """A directory of ours beside ``output`` for files a run needs until it ends (a streamed recipe's
    intermediate model, :func:`mmcompress.streaming.restream`): ``.NAME.mmcompress-PID-XXXX/`` with our
    marker, locked while the run lives, as :func:`atomic_output_dir`'s work directory, so a killed run's
    is removed by the next run that writes ``output`` (:func:`clean_stale`).  Created on first use
    (:meth:`create`); :meth:`remove` deletes it and nothing else."""

    def __init__(self, output):
        self.output = _real(output)
        self.path: Path | None = None
        self._fd: int | None = None

    def create(self, name: str) -> Path:
        """A new empty directory ``name`` inside the work directory (made now if it is not there yet)."""
        if self.path is None:
            real = self.output
            real.parent.mkdir(parents=True, exist_ok=True)
            work = real.parent / f".{real.name}.mmcompress-{os.getpid()}-{secrets.token_hex(4)}"
            work.mkdir()
            self._fd = _try_lock(work / MARKER)
            os.write(self._fd, json.dumps({"pid": os.getpid(), "output": real.name, "work": True}).encode())
            self.path = work
            _OWN_WORK_DIRS.add(work)
        sub = self.path / name
        sub.mkdir()
        return sub

    def discard(self, sub: Path) -> None:
        """Delete ``sub``, a directory :meth:`create` made (nothing outside the work directory)."""
        sub = Path(sub)
        if self.path is not None and sub.parent == self.path and sub.is_dir() and not sub.is_symlink():
            shutil.rmtree(sub)

    def remove(self) -> None:
        if self.path is None:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        _OWN_WORK_DIRS.discard(self.path)
        os.close(self._fd)
        self.path = self._fd = None


# -- checkpoint directories ----------------------------------------------------------------------


class CheckpointDir:
    """A checkpoint directory that is ours (marker) and locked while in use.

    ``open()`` refuses a non-empty directory without our marker and a directory locked by another
    run; ``remove()`` deletes the files we wrote (``owned(name)``) and the directory itself only if
    we created it."""

    def __init__(self, path, *, flag: str = "--checkpoint-dir"):
        self.path = Path(path)
        self.flag = flag
        self._fd: int | None = None
        self.created = False

    def open(self) -> "CheckpointDir":
        p = self.path
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise OutputError(f"{self.flag} {p} exists and is not a directory; choose another path")
            ours = (CHECKPOINT_LOCK, f".{CHECKPOINT_MARKER}{_TMP_TAG}")  # a run killed before its marker was in
            if not (p / CHECKPOINT_MARKER).is_file() and any(not q.name.startswith(ours) for q in p.iterdir()):
                raise OutputError(f"{self.flag} {p} exists and is not an mmcompress checkpoint directory; "
                                  "choose an empty or new directory")
        else:  # born with its marker: built under a temporary name, then renamed into place
            p.parent.mkdir(parents=True, exist_ok=True)
            _clean_stale_tmp_files(p)
            tmp = p.parent / f".{p.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            tmp.mkdir()
            try:
                atomic_write_json(tmp / CHECKPOINT_MARKER, {"created": True})
                _rename_noreplace(tmp, p)
                self.created = True
            except FileExistsError:  # another run created it meanwhile: the lock below decides
                pass
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        fd = _try_lock(p / CHECKPOINT_LOCK)
        if fd is None:
            pid = _read_pid(p / CHECKPOINT_LOCK)
            raise OutputError(f"checkpoint directory {p} is in use by another mmcompress run (pid {pid}); "
                              "wait for it to finish or give another --output / --checkpoint-dir")
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid()}).encode())
        marker = p / CHECKPOINT_MARKER
        if marker.is_file():
            try:
                self.created = bool(json.loads(marker.read_text()).get("created"))
            except (OSError, ValueError, AttributeError):
                self.created = False
        else:  # an empty directory of the user's: used, never removed
            atomic_write_json(marker, {"created": False})
            self.created = False
        for q in p.glob(f".*{_TMP_TAG}*"):  # half-written files of a killed run (inside our directory)
            if q.is_file():
                q.unlink()
        return self

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self, owned: Callable[[str], bool]) -> None:
        """Delete our files (those ``owned(name)`` says we wrote), then the directory if we created it."""
        for q in self.path.iterdir():
            if q.is_file() and not q.is_symlink() and owned(q.name):
                q.unlink()
        created = self.created
        (self.path / CHECKPOINT_MARKER).unlink(missing_ok=True)
        (self.path / CHECKPOINT_LOCK).unlink(missing_ok=True)
        self.close()
        if created:
            try:
                self.path.rmdir()  # only if empty: never a file someone else put there
            except OSError:
                pass

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
