"""Bulk I/O for safetensors shards: an output file written front to back without the page cache, and an input
file read through a memory map, a range at a time.

* :class:`SequentialWriter`: the bytes go through a page-aligned staging buffer of 32 MiB and reach the file
  in whole-buffer ``pwrite`` calls opened with ``O_DIRECT`` (benchmarks/shard_io_bench.py on this machine's
  ext4, 2 GiB: 0.07 CPU s and 1.6 s until on disk, against 1.5 CPU s and 6.8 s buffered;
  benchmarks/datafree_results.md).  The last, partial block is written padded and the file cut to its
  size.  Where the file system refuses ``O_DIRECT`` (tmpfs, some network file systems) the same calls run
  buffered.  Writes must come in order (each at the current end).
* :class:`MappedShard`: a tensor's bytes are used in place in a private, never-written memory map of its
  shard (no copy into this process); :meth:`MappedShard.populate` maps its pages ahead of use (another
  thread can do it), :meth:`MappedShard.release` unmaps them again, so the resident set holds only the
  tensors in flight, not the shard.
"""

from __future__ import annotations

import errno
import mmap
import os

import torch

_BLOCK = 4096  # O_DIRECT alignment of buffers, lengths and offsets (the page size covers every block size here)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14


class SequentialWriter:
    """A new file written front to back (see the module docstring); ``close`` finishes it."""

    CHUNK = 32 << 20

    def __init__(self, path):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = hasattr(os, "O_DIRECT")
        try:
            self.fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o666)
        except OSError:
            self.direct = False
            self.fd = os.open(path, flags, 0o666)
        self.buf = mmap.mmap(-1, self.CHUNK)  # anonymous: page-aligned
        self.view = memoryview(self.buf)
        self.fill = 0  # bytes staged
        self.start = 0  # file offset of the staging buffer
        self.closed = False

    @property
    def position(self) -> int:
        return self.start + self.fill

    def write(self, data) -> int:
        """Append the bytes of ``data`` (any buffer)."""
        src = memoryview(data).cast("B")
        n, done = len(src), 0
        while done < n:
            k = min(n - done, self.CHUNK - self.fill)
            self.view[self.fill: self.fill + k] = src[done: done + k]
            self.fill += k
            done += k
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)
        return n

    def copy_from(self, fd: int, offset: int, n: int, what: str = "") -> int:
        """Append ``n`` bytes of file ``fd`` from ``offset`` (read straight into the staging buffer)."""
        done = 0
        while done < n:
            k = min(n - done, self.CHUNK - self.fill)
            got = os.preadv(fd, [self.view[self.fill: self.fill + k]], offset + done)
            if got <= 0:
                raise OSError(f"input ended early{what}")
            self.fill += got
            done += got
            if self.fill == self.CHUNK:
                self._flush(self.CHUNK)
        return n

    def _flush(self, length: int) -> None:
        """Write the first ``length`` staged bytes (a multiple of the block size when direct) at ``start``."""
        done = 0
        while done < length:
            try:
                done += os.pwrite(self.fd, self.view[done:length], self.start + done)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self._buffered()  # the file system refuses O_DIRECT: the same writes, buffered
        self.start += length
        self.fill = 0

    def _buffered(self) -> None:
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY)
        self.direct = False

    def close(self) -> None:
        """Write what is staged (a direct writer pads it to a block, then cuts the file to its size)."""
        if self.closed:
            return
        self.closed = True
        try:
            size, tail = self.position, self.fill
            if tail:
                length = tail + (-tail % _BLOCK if self.direct else 0)
                self.view[tail:length] = bytes(length - tail)
                self._flush(length)
                if length != tail:
                    os.ftruncate(self.fd, size)
        finally:
            os.close(self.fd)
            self.view.release()
            self.buf.close()


class MappedShard:
    """The tensors of one safetensors file, in place in a private read-only use of its memory map."""

    def __init__(self, fd: int, base: int, header: dict, dtypes: dict):
        self.base, self.header, self.dtypes = base, header, dtypes
        size = os.fstat(fd).st_size
        self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else None  # never written: no copies

    def _range(self, name: str) -> tuple[int, int]:
        start, end = self.header[name]["data_offsets"]
        return self.base + start, self.base + end

    def mappable(self, name: str) -> bool:
        """Whether ``name`` can be used in place (non-empty and aligned to its element size)."""
        start, end = self._range(name)
        dtype = self.dtypes[self.header[name]["dtype"]]
        return self.mm is not None and end > start and start % torch.empty(0, dtype=dtype).element_size() == 0

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` viewing the map (valid until the map is closed; :meth:`release` only unmaps pages,
        which a later access maps again)."""
        start, end = self._range(name)
        info = self.header[name]
        t = torch.frombuffer(self.mm, dtype=torch.uint8, count=end - start, offset=start)
        return t.view(self.dtypes[info["dtype"]]).view(info["shape"])

    def _advise(self, name: str, advice: int) -> None:
        start, end = self._range(name)
        lo, hi = start - start % mmap.PAGESIZE, min(end + -end % mmap.PAGESIZE, len(self.mm))
        self.mm.madvise(advice, lo, hi - lo)

    def populate(self, name: str) -> None:
        """Map the pages of ``name`` now (read from disk if needed): its first use does not fault them in."""
        try:
            self._advise(name, _MADV_POPULATE_READ)
        except OSError:  # an older kernel: start the read-ahead only
            self._advise(name, mmap.MADV_WILLNEED)

    def release(self, name: str) -> None:
        """Unmap the pages of ``name`` (they stay in the page cache, not in this process's resident set)."""
        self._advise(name, mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a tensor still views it: closed when that is freed
                pass
