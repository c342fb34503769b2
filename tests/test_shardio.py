"""``export.shardio``: the sequential O_DIRECT writer gives the bytes it was handed (chunk boundaries, the padded
and cut last block, reads straight into its buffer, the buffered fallback), and mapped tensors equal the file."""

import errno
import os
import random

import pytest
import torch

from mmcompress.export import shardio
from mmcompress.export.datafree import _ShardReader


def _pieces(seed):
    rng = random.Random(seed)
    return [bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 7, 4096, 5000, 20000, 70000])))
            for _ in range(25)]


@pytest.mark.parametrize("chunk", [8192, 32 << 20])
def test_writer_bytes(tmp_path, chunk, monkeypatch):
    monkeypatch.setattr(shardio.SequentialWriter, "CHUNK", chunk)
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    fd = os.open(src, os.O_RDONLY)
    expected = bytearray()
    w = shardio.SequentialWriter(tmp_path / "out.bin")
    for i, piece in enumerate(_pieces(chunk)):
        if i % 3 == 2:  # from the file, into the staging buffer
            off, n = i * 997, len(piece) % 50_000
            assert w.copy_from(fd, off, n) == n
            expected += src.read_bytes()[off: off + n]
        else:
            w.write(piece)
            expected += piece
        assert w.position == len(expected)
    w.close()
    os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)


def test_writer_falls_back_to_buffered(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT writes (EINVAL): the same bytes, written buffered."""
    monkeypatch.setattr(shardio.SequentialWriter, "CHUNK", 8192)
    real = os.pwrite
    w = shardio.SequentialWriter(tmp_path / "out.bin")
    if not w.direct:
        pytest.skip("no O_DIRECT here")

    def pwrite(fd, data, offset):
        if w.direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = b"".join(_pieces(3))
    w.write(data)
    w.close()
    assert not w.direct and (tmp_path / "out.bin").read_bytes() == data


def test_writer_copy_from_a_truncated_input(tmp_path):
    (tmp_path / "src.bin").write_bytes(b"x" * 100)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    w = shardio.SequentialWriter(tmp_path / "out.bin")
    with pytest.raises(OSError, match="ended early: src.bin"):
        w.copy_from(fd, 50, 100, ": src.bin")
    w.close()
    os.close(fd)


def test_mapped_tensors_equal_the_file(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(300, 70).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.uint8),
               "c": torch.randn(1000), "d": torch.randn(33, 17).half(), "e": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    r = _ShardReader(tmp_path / "t.safetensors")
    m = shardio.MappedShard(r.fd, r.base, r.header, r.dtypes)
    assert not m.mappable("e")
    for name, t in tensors.items():
        if not m.mappable(name):  # empty, or stored at an offset its dtype cannot view
            assert torch.equal(r.read(name), t)
            continue
        mapped = m.tensor(name)
        m.populate(name)
        assert mapped.dtype == t.dtype and torch.equal(mapped, t)
        m.release(name)
        assert torch.equal(mapped, t)  # pages unmapped, mapped again on access
    del mapped
    m.close()
    r.close()
