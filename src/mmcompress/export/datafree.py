"""Data-free RTN: quantize a checkpoint tensor by tensor, from its safetensors shards to the output shards.

RTN with dynamic (per-token) activation quantization needs no calibration data: ``Ŵ = Q_w(W)`` depends
on the weight alone.  So no forward pass and no model in memory:

1. the model skeleton is built on the meta device, only to learn through the model adapter which
   tensors are decoder-layer linears, and the name, dtype and shape of every output tensor (a
   :class:`~mmcompress.quant.linear.QuantLinear` packed on the meta device gives those of its codes,
   step sizes and zero points);
2. the output shards' headers are written first, then each tensor is read from its input shard,
   cast to the load dtype, quantized if it is a decoder linear (``QuantLinear.packed_weight``'s bytes, by a
   one-pass kernel where it is built: :class:`_Pipeline`), so the artifact is byte-identical to the
   in-memory path's, written and freed.

Peak memory is a few linears in flight; the time is about that of reading and writing the checkpoint.  Checkpoints whose
tensor names are not the model's own (transformers renames some on load) take the in-memory path
without a forward pass instead.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import sys
import time
from collections import deque
from pathlib import Path

import torch
from torch import nn

from ..fileio import atomic_output_dir, check_output, require_space
from ..models.adapters import get_adapter
from ..models.loading import model_class_for, read_config
from ..quant.linear import QuantLinear
from ..quant.methods.base import quantize_layer_linears
from ..quant.methods.rtn import RTN
from ..quant.quantizer import QuantScheme
from .shardio import MappedShard, SequentialWriter
from .serialization import _empty_model, build_manifest, load_model, save, write_side_files

MAX_SHARD_BYTES = 5 * 1024**3  # like save_pretrained's shards
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.bool: "BOOL"}


def checkpoint_tensors(model_dir) -> dict[str, Path]:
    """``{tensor name: shard}`` of a safetensors checkpoint (single file or index + shards)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{model_dir}: shard {missing[0]} listed in {index.name} is missing")
        for f in sorted(set(weight_map.values())):
            shard_header(model_dir / f)
        return {k: model_dir / f for k, f in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (only safetensors checkpoints are read)")
    return {k: single for k in shard_header(single) if k != "__metadata__"}


class ShardError(ValueError):
    """A safetensors shard is truncated or not a safetensors file."""


def shard_header(path: Path) -> dict:
    """The header of safetensors file ``path``, checked against the file's size (a truncated shard is an
    error naming it, before anything is read or written)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ShardError(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ShardError(f"{path.name} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path.name} is not a safetensors file (its header is not a JSON object)")
    need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < need:
        raise ShardError(f"{path.name} is truncated: {size} bytes, its header describes {need}")
    return header


def _meta_model(model_dir, dtype: torch.dtype, trust_remote_code: bool = False):
    config = read_config(model_dir, trust_remote_code=trust_remote_code)
    cls = model_class_for(config, model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = _empty_model(cls, config, dtype)
    return model.eval()


def _plan(model: nn.Module, scheme: QuantScheme):
    """Output tensors in order: ``(names, sources, build)`` per unit, the module specs, and the tied
    parameters (``{kept name: other names}``; the checkpoint may store the tensor under any of them).

    A unit is one decoder linear (its weight and bias in, its packed tensors out) or one other tensor."""
    adapter = get_adapter(model)
    linears = {}
    for i in range(len(adapter.layers)):
        for path in adapter.linear_names(i):
            linears[f"{adapter.layer_prefix(i)}.{path}"] = adapter.layers[i].get_submodule(path)
    # tied parameters are stored once, under the name safetensors' save_model keeps (the first sorted)
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    dropped = {n for names in names_of.values() for n in sorted(names)[1:]}
    tied = {sorted(names)[0]: sorted(names)[1:] for names in names_of.values() if len(names) > 1}
    state = {k: v for k, v in model.state_dict().items() if k not in dropped}
    units, specs, seen = [], {}, set()
    for key, t in state.items():
        if key in seen:
            continue
        mod_name = key.rsplit(".", 1)[0]
        if mod_name in linears:
            lin = linears[mod_name]
            q = _meta_quant_linear(lin, scheme, t.dtype)  # names, shapes and dtypes of the stored tensors
            out = {f"{mod_name}.{k}": (v.dtype, tuple(v.shape)) for k, v in q.state_dict().items()}
            sources = [f"{mod_name}.weight"] + ([f"{mod_name}.bias"] if lin.bias is not None else [])
            seen.update(sources)
            specs[mod_name] = q.spec()
            units.append((out, sources, _quantize_unit(mod_name, scheme)))
        else:
            seen.add(key)
            units.append(({key: (t.dtype, tuple(t.shape))}, [key], None))
    return units, specs, tied


def _meta_quant_linear(lin: nn.Module, scheme: QuantScheme, dtype: torch.dtype) -> QuantLinear:
    """The :class:`QuantLinear` that RTN makes of ``lin``, packed, on the meta device (no arithmetic)."""
    q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, scheme, dtype=dtype, device="meta")
    if scheme.wbits < 16:
        q._make_packed_buffers("meta")
    return q


def _quantize_unit(mod_name: str, scheme: QuantScheme):
    """What ``QuantLinear.from_linear(linear, scheme).pack()`` stores, from the weight (and bias) alone."""
    def build(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = tensors[f"{mod_name}.weight"]
        out = {"weight": weight} if scheme.wbits >= 16 else QuantLinear.packed_weight(weight, scheme)
        if f"{mod_name}.bias" in tensors:
            out["bias"] = tensors[f"{mod_name}.bias"]
        return {f"{mod_name}.{k}": v for k, v in out.items()}

    return build


class _ShardReader:
    """Tensors of one safetensors file read with plain ``pread`` (no memory map: the pages read do not
    stay in this process's resident set, so peak memory is one tensor, not the checkpoint)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        n = struct.unpack("<Q", os.pread(self.fd, 8, 0))[0]
        self.header = json.loads(os.pread(self.fd, n, 8))
        self.base = 8 + n
        self.dtypes = {v: k for k, v in _ST_DTYPES.items()}
        if hasattr(os, "posix_fadvise"):  # read in order: a larger read-ahead
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, key: str) -> torch.Tensor:
        info = self.header[key]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if got <= 0:
                raise OSError(f"{self.path.name} is truncated (tensor {key})")
            done += got
        t = torch.frombuffer(buf, dtype=self.dtypes[info["dtype"]]) if buf else torch.empty(0)
        return t.reshape(info["shape"]) if buf else torch.empty(info["shape"], dtype=self.dtypes[info["dtype"]])

    def close(self) -> None:
        os.close(self.fd)


def _header(entries: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None) -> bytes:
    """A safetensors header for ``(name, dtype, shape)`` tensors in this order, as
    ``safetensors.torch.save_file`` writes it: the same bytes (``__metadata__`` only when given)."""
    header, offset = ({"__metadata__": metadata} if metadata else {}), 0
    for name, dtype, shape in entries:
        n = _nbytes((dtype, shape))
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _nbytes(spec) -> int:
    dtype, shape = spec
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def split_shards(units: list, nbytes, max_shard_bytes: int) -> tuple[list[list], list[str]]:
    """Output shards: consecutive units, at most ``max_shard_bytes`` each (a unit is never split), and
    their file names as ``save_pretrained`` names them."""
    shards, size = [[]], 0
    for unit in units:
        b = nbytes(unit)
        if shards[-1] and size + b > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += b
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    return shards, names


def quantize_checkpoint(model_dir, output, scheme: QuantScheme, *, dtype: torch.dtype,
                        max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True, overwrite: bool = False,
                        trust_remote_code: bool = False) -> dict:
    """Write the RTN artifact of the checkpoint in ``model_dir`` to ``output``; returns its description.

    ``output`` follows :func:`fileio.atomic_output_dir` (refused if it exists and is not empty unless
    ``overwrite``, or if it overlaps ``model_dir``)."""
    check_output(output, overwrite=overwrite, inputs=[model_dir])  # refuse before any work
    t0 = time.time()
    model = _meta_model(model_dir, dtype, trust_remote_code)
    sources = checkpoint_tensors(model_dir)
    units, specs, tied = _plan(model, scheme)
    stored_as = {k: k for k in sources}
    for kept, others in tied.items():
        for name in [kept, *others]:
            if kept not in stored_as and name in sources:
                stored_as[kept] = name
    needed = [k for _, srcs, _ in units for k in srcs]
    absent = [k for k in needed if k not in stored_as]
    n_layers = len(get_adapter(model).layers)
    if absent:  # tensor names differ from the model's: load the model, RTN layer by layer, no forward
        return _in_memory(model_dir, output, scheme, dtype, t0, n_layers, trust_remote_code)
    description = _description(scheme, n_layers)
    shards, names = split_shards(units, lambda unit: sum(_nbytes(v) for v in unit[0].values()), max_shard_bytes)
    with atomic_output_dir(output, overwrite=overwrite, inputs=[model_dir]) as tmp:
        headers = [_header([(k, *v) for out, _, _ in shard for k, v in out.items()], {"format": "pt"})
                   for shard in shards]
        require_space(tmp, sum(map(len, headers)) + sum(sum(_nbytes(v) for v in u[0].values()) for u in units),
                      "the artifact")
        jobs = [(tmp / fname, header, shard) for fname, shard, header in zip(names, shards, headers)]
        weight_map, total = _Pipeline(sources, stored_as, scheme, dtype, progress).run(jobs)
        if len(names) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        description["seconds"] = round(time.time() - t0, 2)
        manifest = build_manifest(model, description)
        manifest["modules"] = specs
        write_side_files(tmp, model, manifest, model_dir)
    return description


_EXACT_WIDENING = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}
_AHEAD = 2  # units read ahead of the one being quantized (the reader thread)
_WRITES_IN_FLIGHT = 2  # units handed to the writer thread and not yet written
_POOL = 4  # reused output buffer sets: one being quantized, up to three being written


class _Pipeline:
    """Input shards to output shards in three overlapping stages: a reader thread (maps each decoder linear's
    pages in: :class:`~mmcompress.export.shardio.MappedShard`, no copy), the quantization in this thread
    (:mod:`~mmcompress.quant.kernels.rtn_cpu`, one pass per row from the mapped bytes into reused buffers;
    the reference ``QuantLinear.packed_weight`` where the kernel is missing or declines), and a writer
    thread (:class:`~mmcompress.export.shardio.SequentialWriter`: each output shard front to back in 32 MiB
    ``O_DIRECT`` writes).  A tensor stored unchanged (embeddings, norms, ``lm_head`` in the load dtype) is
    read by the writer straight into its staging buffer.  The bytes are those of the sequential loop that
    read, cast, packed and wrote one tensor at a time (tests/test_datafree.py)."""

    def __init__(self, sources: dict[str, Path], stored_as: dict[str, str], scheme: QuantScheme,
                 dtype: torch.dtype, progress: bool):
        self.sources, self.stored_as, self.scheme, self.dtype = sources, stored_as, scheme, dtype
        self.progress = progress
        self.readers = {path: _ShardReader(path) for path in sorted(set(sources.values()))}
        self.maps: dict[Path, MappedShard] = {}
        self.pool: queue.SimpleQueue = queue.SimpleQueue()  # output buffer sets (codes, scale, zero), reused
        self.use_kernel = False

    def _reader(self, key: str) -> tuple[_ShardReader, str]:
        return self.readers[self.sources[self.stored_as[key]]], self.stored_as[key]

    def run(self, jobs) -> tuple[dict[str, str], int]:
        from concurrent.futures import ThreadPoolExecutor

        work = [(path, f, unit) for f, (path, _, shard) in enumerate(jobs) for unit in shard]
        weight_map: dict[str, str] = {}
        self.jobs, self.files = jobs, [None] * len(jobs)  # output shards, opened in order by the writer
        offsets = [len(header) for _, header, _ in jobs]
        try:
            self._size_pool([unit for _, _, unit in work])
            with ThreadPoolExecutor(1, "datafree-read") as reader, ThreadPoolExecutor(1, "datafree-write") as writer:
                reads, writes = deque(), deque()
                for i in range(min(_AHEAD, len(work))):
                    reads.append(reader.submit(self._read, work[i][2]))
                try:
                    self._loop(work, reads, writes, reader, writer, offsets, weight_map)
                except BaseException:
                    for r in reads:  # not started yet: dropped; the executors wait for the rest
                        r.cancel()
                    raise
            for f in range(len(jobs)):
                self._file(f)  # a shard without tensors (none planned so) still gets its header
        finally:
            for w in self.files:
                if w is not None:
                    w.close()
            for m in self.maps.values():
                m.close()
            for r in self.readers.values():
                r.close()
        if self.progress:
            print(file=sys.stderr)
        return weight_map, sum(offsets) - sum(len(header) for _, header, _ in jobs)

    def _file(self, f: int) -> SequentialWriter:
        """Output shard ``f``, created with its header the first time; the shards before it are finished then
        (the writer goes through them in order) and closed, so one staging buffer is in use at a time."""
        if self.files[f] is None:
            for g in range(f):
                if self.files[g] is not None and not self.files[g].closed:
                    self.files[g].close()
            path, header, _ = self.jobs[f]
            self.files[f] = SequentialWriter(path)
            self.files[f].write(header)
        return self.files[f]

    def _loop(self, work, reads, writes, reader, writer, offsets, weight_map) -> None:
        for i, (path, f, (out, srcs, build)) in enumerate(work):
            got, bufs, mapped = reads.popleft().result()
            if i + _AHEAD < len(work):
                reads.append(reader.submit(self._read, work[i + _AHEAD][2]))
            produced = self._produce(got, out, build, bufs)
            places = []
            for k, (dt, shape) in out.items():
                t = produced[k]
                if not isinstance(t, _Copy) and (t.dtype != dt or tuple(t.shape) != shape):
                    raise RuntimeError(f"{k}: produced {t.dtype} {tuple(t.shape)}, planned {dt} {shape}")
                places.append((t, offsets[f]))
                offsets[f] += _nbytes((dt, shape))
                weight_map[k] = path.name
            writes.append(writer.submit(self._write, f, places, bufs, mapped))
            while len(writes) > _WRITES_IN_FLIGHT:
                writes.popleft().result()
            if self.progress and (i + 1) % 50 == 0:
                print(f"\rdata-free rtn: {i + 1}/{len(work)} tensors", end="", file=sys.stderr)
        while writes:
            writes.popleft().result()

    def _size_pool(self, units) -> None:
        """``_POOL`` output buffer sets for the largest quantized linear.  They bound the units in flight: the
        reader waits for one, and the writer always returns them."""
        from ..quant.kernels import rtn_cpu

        if self.scheme.wbits >= 16 or not rtn_cpu.available():
            return
        n_codes = n_scale = 0
        for out, srcs, build in units:
            if build is not None:
                reader, name = self._reader(srcs[0])
                shapes = rtn_cpu.packed_shapes(*reader.header[name]["shape"], self.scheme)
                n_codes = max(n_codes, _nbytes(shapes["weight_codes"]))
                n_scale = max(n_scale, _nbytes(shapes["weight_scale"]))
        if not n_codes:
            return
        self.use_kernel = True
        for path, reader in self.readers.items():
            self.maps[path] = MappedShard(reader.fd, reader.base, reader.header, reader.dtypes)
        for _ in range(_POOL):
            self.pool.put(tuple(torch.empty(n, dtype=torch.uint8) for n in (n_codes, n_scale, n_scale)))

    def _read(self, unit):
        """``({name: tensor or _Copy}, output buffers or None, [mapped names])`` for one unit (the reader
        thread)."""
        out, srcs, build = unit
        got, bufs, mapped = {}, None, []
        for j, k in enumerate(srcs):
            reader, name = self._reader(k)
            src_dtype = reader.dtypes[reader.header[name]["dtype"]]
            want = out[k][0] if build is None else self.dtype
            if (build is None or self.scheme.wbits >= 16) and src_dtype == want:
                got[k] = _Copy(reader, name)  # unchanged bytes: read by the writer into its buffer
            elif j == 0 and build is not None and self.use_kernel and self.maps[reader.path].mappable(name):
                bufs = self.pool.get()  # waits for the writer to return one
                shard = self.maps[reader.path]
                got[k] = shard.tensor(name)
                shard.populate(name)
                mapped.append((shard, name))
            else:
                got[k] = reader.read(name)
        return got, bufs, mapped

    def _produce(self, got: dict, out: dict, build, bufs) -> dict:
        """The unit's output tensors (``_Copy`` markers pass through to the writer)."""
        if build is None or self.scheme.wbits >= 16:  # unchanged names, the load dtype
            return {k: v if isinstance(v, _Copy) else v.to(out[k][0]) for k, v in got.items()}
        weight_key = next(iter(got))
        weight = got[weight_key]
        mod_name = weight_key[: -len(".weight")]
        if bufs is not None and (weight.dtype == self.dtype or (weight.dtype, self.dtype) in _EXACT_WIDENING):
            from ..quant.kernels import rtn_cpu

            shapes = rtn_cpu.packed_shapes(*weight.shape, self.scheme)
            packed = {name: buf[: _nbytes(spec)].view(spec[0]).view(spec[1])
                      for (name, spec), buf in zip(shapes.items(), bufs)}
            if rtn_cpu.quantize_weight_into(weight, self.scheme, packed):  # equals QuantLinear.packed_weight
                produced = {f"{mod_name}.{k}": v for k, v in packed.items()}
                for k, v in got.items():
                    if k != weight_key:
                        produced[f"{mod_name}.bias"] = v.to(self.dtype)
                return produced
        return build({k: v.to(self.dtype) for k, v in got.items()})

    def _write(self, f: int, places: list, bufs, mapped: list) -> None:
        """Append one unit's tensors to output shard ``f`` (the writer thread); return its buffers, unmap its
        input pages."""
        file = self._file(f)
        for t, offset in places:
            if offset != file.position:
                raise RuntimeError(f"{file.path.name}: a tensor planned at {offset} came at {file.position}")
            if isinstance(t, _Copy):
                t.copy_to(file)
            else:
                file.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
        for shard, name in mapped:
            shard.release(name)
        if bufs is not None:
            self.pool.put(bufs)


class _Copy:
    """A tensor whose stored bytes are copied unchanged from an input shard (by the writer thread)."""

    def __init__(self, reader: _ShardReader, name: str):
        self.reader, self.name = reader, name

    def copy_to(self, file: SequentialWriter) -> None:
        start, end = self.reader.header[self.name]["data_offsets"]
        file.copy_from(self.reader.fd, self.reader.base + start, end - start,
                       f": {self.reader.path.name} is truncated (tensor {self.name})")


def _description(scheme: QuantScheme, n_layers: int) -> dict:
    """What the in-memory RTN run records, with an empty calibration marked data-free."""
    return {"kind": "quantization", "method": RTN(scheme).config(), "scheme": scheme.name,
            "calibration": {"source": None, "nsamples": 0, "data_free": True,
                            "tokens": {"text": 0, "image": 0, "audio": 0, "video": 0}},
            "layers": [{"layer": i} for i in range(n_layers)]}


def _in_memory(model_dir, output, scheme, dtype, t0, n_layers, trust_remote_code: bool = False) -> dict:
    model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    adapter = get_adapter(model)
    for i, layer in enumerate(adapter.layers):
        quantize_layer_linears(layer, adapter.at_layer(i), scheme)
    description = dict(_description(scheme, n_layers), seconds=round(time.time() - t0, 2))
    save(model, output, description=description, source_dir=model_dir)
    return description
