"""CPU and wall time of writing and reading 2 GiB from Python on one disk: buffered ``pwrite`` vs ``O_DIRECT``
(each then ``fsync``), ``pread`` vs a memory map populated with ``MADV_POPULATE_READ`` (the choices of
``mmcompress.export.shardio``).

    python benchmarks/shard_io_bench.py DIR      # DIR on the disk to measure; two 2 GiB files, deleted after
"""

import mmap
import os
import sys
import time

import numpy as np

N = 2 << 30
CHUNK = 64 << 20


def cpu():
    return time.process_time()


def write(path, direct):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT needs
    buf.write(b"\1" * CHUNK)
    c, w, off = cpu(), time.perf_counter(), 0
    while off < N:
        off += os.pwrite(fd, buf, off)
    c = cpu() - c
    os.fsync(fd)
    os.close(fd)
    print(f"{'O_DIRECT' if direct else 'buffered'} pwrite: {c:.2f} CPU s, {time.perf_counter() - w:.2f} s until fsync returned")


def read(path, mapped):
    fd = os.open(path, os.O_RDONLY)
    c, w = cpu(), time.perf_counter()
    if mapped:
        m = mmap.mmap(fd, N, prot=mmap.PROT_READ)
        for off in range(0, N, CHUNK):
            m.madvise(getattr(mmap, "MADV_POPULATE_READ", 22), off, CHUNK)
            np.frombuffer(m, dtype=np.uint8, count=CHUNK, offset=off)[::4096].sum()
            m.madvise(mmap.MADV_DONTNEED, off, CHUNK)
        m.close()
    else:
        b = memoryview(bytearray(CHUNK))
        off = 0
        while off < N:
            off += os.preadv(fd, [b], off)
    os.close(fd)
    print(f"{'mmap + populate' if mapped else 'pread'}: {cpu() - c:.2f} CPU s, {time.perf_counter() - w:.2f} s")


def main():
    d = sys.argv[1]
    a, b = os.path.join(d, "io_a.bin"), os.path.join(d, "io_b.bin")
    try:
        write(a, False)
        write(b, True)
        for _ in range(2):
            read(a, False)
            read(a, True)
    finally:
        for p in (a, b):
            if os.path.exists(p):
                os.unlink(p)


if __name__ == "__main__":
    main()
