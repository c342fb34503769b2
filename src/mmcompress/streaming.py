"""Layer streaming: calibrate a model whose decoder layers are read from its checkpoint one at a time.

``quantize`` streams by default (``--in-memory`` loads the whole model; a model that cannot be streamed
is loaded whole with a one-line notice saying why).  The model skeleton is built with every parameter
on the meta device (buffers such as RoPE frequencies are computed as usual), and tensors are read from
the safetensors shards only when they are used (plain ``pread``, no memory map, as the data-free path
does), under the names transformers gives them on load (Qwen2.5-VL/Omni checkpoints store the language
model under other names: transformers' own renaming rules map them):

1. the parameters outside the decoder layers (embeddings, vision/audio towers) are read for the capture
   pass and dropped after it — nothing the quantization methods do changes them;
2. the engine (:func:`mmcompress.engine.run_layerwise`) reads layer ``i`` just before its step, writes
   the finished layer straight into the artifact being built in the checkpoint directory
   (:class:`ArtifactLayout`, which ``--resume`` reads back) and returns the layer to the meta device;
3. :func:`save_streamed` adds the untouched tensors from the input checkpoint (cast to the load dtype,
   as the in-memory load does) and links the shards into the output.

Peak memory is one decoder layer plus the cached calibration activations (or the embedding table
during the capture pass, whichever is larger), independent of depth; each layer is written once.  The
artifact has the same bytes as the in-memory path's.  ``sparsify`` and ``compress`` stream too: LaRoSA's
merged mode folds its rotations into the embedding and head after the walk, reading them from the
checkpoint then (:meth:`LayerStream.materialize`; a tied head is saved under its own name,
:meth:`LayerStream.untie`); with ``basis="both"`` a layer is written once the next one's pass has fitted
the next basis (two layers in memory).  A recipe whose steps walk again (after LaRoSA's ``grid`` plan or
``basis="both"``) streams the next walk from the previous one's result, written as shards into a work
directory of ours (:func:`restream`; in one process: under ``torchrun`` such a recipe loads the whole
model).  Not streamed: methods that need the whole model before the layer
walk (gradient probes of ``--loss-weights auto`` on multimodal data).  The sparsity plan searches (LaRoSA
grid/greedy, WINA/TEAL greedy) run in the walk and stream.  Under ``torchrun`` every rank streams the layers from the
checkpoint itself (no weights are sent between ranks) and only rank 0 writes them
(:func:`mmcompress.cli.common.write_artifact`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .memory import trim_heap
from .models.adapters import ModelAdapter, get_adapter


class StreamError(ValueError):
    """The checkpoint cannot be streamed (e.g. its tensor names are not the model's)."""


class LayerStream:
    """Reads a model's tensors from its safetensors checkpoint on demand."""

    def __init__(self, model_dir, model: nn.Module, adapter: ModelAdapter, dtype: torch.dtype, *,
                 renamed: bool = True):
        from .export.datafree import checkpoint_tensors

        self.model_dir, self.dtype, self.adapter = Path(model_dir), dtype, adapter
        self.sources = checkpoint_tensors(model_dir)
        # {model's name: checkpoint's name} where they differ (``renamed=False``: saved from this model, as is)
        self.stored = _loaded_names(model, self.sources) if renamed else {}
        self.workdir = None  # a fileio.WorkDir for intermediate models (restream), the caller's to remove
        self.intermediate = None  # the directory of ours this stream reads from (restream), if any
        self._owned = False  # the workdir is this stream's to remove when closed (restream made it)
        self.readers: dict = {}
        self.tied = _tied_names(model)  # saved once (the artifact drops all but one name)
        self.aliases = self.tied  # read from one stored tensor
        self.model, self.layout = model, None
        # each layer's tensors as read, {name in the layer: (dtype, shape)} (the layer's artifact plan, planned_state)
        self.inputs = [_tensor_shapes(layer) for layer in adapter.layers]
        absent = [k for k in _stored_names(model) if self._stored_as(k) is None]
        if absent:
            raise StreamError(f"the checkpoint stores no tensor {absent[0]} under the model's names "
                              "(transformers renames it on load)")

    def _stored_as(self, name: str) -> str | None:
        for n in [name, *self.aliases.get(name, ())]:
            n = self.stored.get(n, n)
            if n in self.sources:
                return n
        return None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name`` (a model state-dict name), floating ones cast to ``dtype`` (default: the load dtype)."""
        from .export.datafree import _ShardReader

        key = self._stored_as(name)
        path = self.sources[key]
        if path not in self.readers:
            self.readers[path] = _ShardReader(path)
        t = self.readers[path].read(key)
        return t.to(dtype or self.dtype) if t.is_floating_point() else t

    def load_layer(self, i: int, layer: nn.Module) -> None:
        """Give every meta parameter of decoder layer ``i`` its tensor from the checkpoint."""
        from . import finite

        _materialize(layer, self.adapter.layer_prefix(i), self.read)
        finite.check_module(layer, "input weight", prefix=self.adapter.layer_prefix(i))

    def untie(self, model: nn.Module) -> None:
        """The model's tied parameters were given separate ones (LaRoSA's merged head): each is saved under
        its own name from now on, still read from the one tensor the checkpoint stores."""
        self.tied = _tied_names(model)

    def materialize(self, model: nn.Module, module: nn.Module) -> None:
        """Read the meta parameters of ``module`` (outside the decoder layers: an embedding, the head) from the
        checkpoint; they stay in memory and are saved from there (a method changed them after the walk)."""
        name = next(n for n, m in model.named_modules() if m is module)
        _materialize(module, name, self.read)

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s parameters as stored (for the checkpoint fingerprint, read before any layer is
        processed: a non-finite input weight stops the run there, before anything is written)."""
        from .finite import NonFiniteError, first_non_finite

        prefix = self.adapter.layer_prefix(i) + "."
        state = {k[len(prefix):]: self.read(k) for k in _stored_names_of(self.adapter.layers[i], prefix)}
        bad = first_non_finite((prefix + k, t) for k, t in state.items())
        if bad is not None:
            raise NonFiniteError(f"non-finite values (NaN/inf) in input weight {bad}; nothing was written")
        return state

    def release_non_layers(self, model: nn.Module, adapter: ModelAdapter) -> None:
        """See :func:`release_non_layers` (the engine calls it here, without importing this module)."""
        release_non_layers(model, adapter)
        trim_heap()

    def released_layer(self, i: int) -> None:
        """Layer ``i`` went back to the meta device: give its memory back to the system (:func:`trim_heap`)."""
        trim_heap()

    def write_layer(self, ckdir, i: int, layer: nn.Module, method=None) -> str | None:
        """Write finished layer ``i`` into the artifact being built in ``ckdir`` (:class:`ArtifactLayout`, planned
        at the first finished layer with :meth:`planned_state`); ``"artifact"``, or ``None`` when the layer does
        not fit the layout (the engine then writes a file)."""
        prefix = self.adapter.layer_prefix(i) + "."
        state = {prefix + k: v.detach().cpu() for k, v in layer.state_dict().items()}
        if self.layout is None:
            self.layout = ArtifactLayout.load(ckdir) or ArtifactLayout.plan(ckdir, self, i, state, method)
        return "artifact" if self.layout.write(state, prefix) else None

    def planned_state(self, i: int, done: int, state: dict, method=None) -> dict:
        """The tensors layer ``i`` will have once finished (``{name in the layer: (dtype, shape)}``), told from
        those of finished layer ``done`` (``state``): the same, less those of the modules whose tensors layer
        ``done``'s input had and layer ``i``'s has not (a walk over a LaRoSA result: the last layer has no
        residual adapter), then as the ``method`` changes them (``planned_state`` of
        :class:`mmcompress.engine.Method`: LaRoSA adds no residual adapter to the last layer).  A layer whose
        input has other tensors still (a model with two kinds of layers) is planned as layer ``done``: it will
        not fit the plan, and the artifact is written again at the end (correct, not in place)."""
        a, b = self.inputs[done], self.inputs[i]
        if a != b:
            mods = lambda names: {n.rpartition(".")[0] for n in names}  # noqa: E731
            gone = [m + "." for m in mods(a) - mods(b) if m]
            state = {k: v for k, v in state.items() if not k.startswith(tuple(gone))}
        if method is not None and hasattr(method, "planned_state"):
            state = method.planned_state(i, len(self.adapter.layers), state)
        return state

    def close(self) -> None:
        for r in self.readers.values():
            r.close()
        self.readers = {}
        if self._owned:
            self.workdir.remove()
            self._owned = False


def _loaded_names(model: nn.Module, sources) -> dict[str, str]:
    """``{name in the model: name in the checkpoint}`` for the tensors transformers renames on load (e.g.
    Qwen2.5-VL's ``model.*`` -> ``model.language_model.*``), by transformers' own renaming rules.  A tensor
    that a conversion (a merge or split of several tensors) produces is left out: it cannot be read as one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # a transformers without conversion mappings loads the names as stored
        return {}
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    if not renamings and not converters:
        return {}
    meta = model.state_dict()
    out = {}
    for key in sources:
        new, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if new not in meta and key in meta:
            new, converted = rename_source_key(key, [], [], model.base_model_prefix, meta)
        if converted is None and new != key and new in meta:
            out[new] = key
    return out


def _tied_names(model: nn.Module) -> dict[str, list[str]]:
    """``{name: other names of the same parameter}`` for tied parameters."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    return {n: [o for o in names if o != n] for names in names_of.values() if len(names) > 1 for n in names}


def _tensor_shapes(module: nn.Module) -> dict[str, tuple]:
    """``{name: (dtype, shape)}`` of ``module``'s state dict (on the meta device too)."""
    return {k: (v.dtype, tuple(v.shape)) for k, v in module.state_dict(keep_vars=True).items()}


def _stored_names_of(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, _ in module.named_parameters(remove_duplicate=True)]


def _stored_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters(remove_duplicate=True)]


def _materialize(root: nn.Module, prefix: str, read) -> None:
    """Read every meta parameter of ``root`` (and every meta buffer: a layer that went back to the meta device
    after a walk, read again from an intermediate model, :func:`restream`)."""
    prefix = prefix + "." if prefix else ""
    done: dict[int, nn.Parameter] = {}
    for mname, mod in root.named_modules():
        where = f"{prefix}{mname + '.' if mname else ''}"
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                done[id(p)] = nn.Parameter(read(where + pname, p.dtype), requires_grad=p.requires_grad)
            mod._parameters[pname] = done[id(p)]
        for bname, b in list(mod._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if bname in mod._non_persistent_buffers_set:  # not saved: only an empty one can be rebuilt
                if b.numel():
                    raise StreamError(f"{where}{bname}: a buffer that is not saved went to the meta device")
                mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype)
            else:
                mod._buffers[bname] = read(where + bname, b.dtype)


def _in_layers(adapter: ModelAdapter):
    return {id(m) for m in adapter.layers.modules()}


def load_streamed(model_dir, dtype="auto", *, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``model_dir`` with only its non-layer parameters in memory (see module docstring)."""
    from accelerate import init_empty_weights

    from .export.serialization import _empty_model
    from .models.loading import model_class_for, read_config, resolve_dtype

    config = read_config(model_dir, trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(model_dir, dtype)
    cls = model_class_for(config, model_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = _empty_model(cls, config, dtype)
    model.tie_weights()  # a tied pair is stored once
    model.eval()
    adapter = get_adapter(model)
    stream = LayerStream(model_dir, model, adapter, dtype)
    _read_for_capture(model, adapter, stream)
    model._mmcompress_stream = stream
    model._mmcompress_source = str(model_dir)
    return model


def _read_for_capture(model: nn.Module, adapter: ModelAdapter, stream: LayerStream) -> None:
    """Read the meta parameters the capture pass runs: everything outside the decoder layers but the final
    norm and an untied output head (the capture stops before them)."""
    skip = _in_layers(adapter) | {id(m) for m in adapter.final_norm.modules()}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        skip |= {id(head)}
    done: dict[int, nn.Parameter] = {}
    for mname, mod in model.named_modules():
        if id(mod) in skip:
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(stream.read(f"{mname}.{pname}" if mname else pname, p.dtype),
                                               requires_grad=p.requires_grad)
                mod._parameters[pname] = done[id(p)]


def restream(model: nn.Module, checkpoint_dir, workdir=None) -> None:
    """Stream ``model`` on from what a finished walk made, for the next walk (a recipe's steps after a LaRoSA
    ``grid`` step or a ``basis: both`` one walk again): the walk's artifact (its layers from
    ``checkpoint_dir``, what the method changed outside them from memory, the rest from the current source)
    is written as shards into a new directory of ``workdir`` (a :class:`mmcompress.fileio.WorkDir`; default:
    the stream's, else one beside the checkpoint directory that the stream removes when closed), every
    parameter outside the layers goes back to the meta device, and the model is streamed from those shards
    as from an input checkpoint (the capture pass's parameters read at once, each layer before its step).
    The previous intermediate, if any, is deleted.  Bytes written: the intermediate model, once (its shards
    are hard links of the walk's planned artifact where every layer fit the plan)."""
    from contextlib import nullcontext

    from . import fileio

    old: LayerStream = model._mmcompress_stream
    work = workdir or old.workdir
    own = work is None
    if own:
        work = fileio.WorkDir(Path(getattr(checkpoint_dir, "path", checkpoint_dir)))
    n = 1 if old.intermediate is None else int(old.intermediate.name.rpartition("-")[2]) + 1
    target = work.create(f"walk-{n}")
    try:
        _write_shards(model, Path(getattr(checkpoint_dir, "path", checkpoint_dir)), lambda: nullcontext(target))
        release_non_layers(model, old.adapter)
        new = LayerStream(target, model, old.adapter, old.dtype, renamed=False)
    except BaseException:
        work.discard(target)
        if own:
            work.remove()
        raise
    owned, old._owned = own or old._owned, False
    old.close()
    if old.intermediate is not None:
        work.discard(old.intermediate)
    new.workdir, new.intermediate, new._owned = work, target, owned
    _read_for_capture(model, old.adapter, new)
    model._mmcompress_stream = new
    trim_heap()


def release_non_layers(model: nn.Module, adapter: ModelAdapter) -> None:
    """Return the parameters outside the decoder layers to the meta device (after the capture pass)."""
    in_layers = _in_layers(adapter)
    done: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for mod in model.modules():
        if id(mod) in in_layers:
            continue
        for pname, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
                mod._parameters[pname] = done[id(p)]


def _link_or_copy(src: Path, dst: Path) -> None:
    """A second name for ``src`` (no bytes written), or a copy where the two are on different file systems."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


_ST_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")  # safetensors' Dtype order


LAYOUT = "artifact.json"  # in the checkpoint directory: the artifact's planned shards and tensor offsets


def _part_name(fname: str) -> str:
    return "artifact-" + fname.replace(".safetensors", ".part")  # artifact-model.part, artifact-model-00001-of-00002.part


def _artifact_entries(model: nn.Module, stream: "LayerStream", layer_entries) -> tuple[list, dict]:
    """Every tensor of the artifact as ``(name, dtype, shape, source)``, in ``safetensors.torch.save_model``'s
    order, and the tied names it drops (``{dropped: kept}``); ``layer_entries(i, prefix)`` gives layer ``i``'s."""
    from .export.datafree import _ST_DTYPES

    adapter = stream.adapter
    prefixes = [adapter.layer_prefix(i) + "." for i in range(len(adapter.layers))]
    dropped = {o: n for n, others in stream.tied.items() for o in others if n < min(others)}  # as save_model
    entries, seen_layers = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in dropped:
            continue
        i = next((k for k, p in enumerate(prefixes) if name.startswith(p)), None)
        if i is None:
            if t.is_meta:
                entries.append((name, t.dtype, tuple(t.shape), ("src", name)))
            else:  # a buffer computed at construction (saved by the in-memory path too)
                entries.append((name, t.dtype, tuple(t.shape), ("mem", t.detach())))
        elif i not in seen_layers:
            seen_layers.add(i)
            entries.extend(layer_entries(i, prefixes[i]))
    entries.sort(key=lambda e: (-_ST_ORDER.index(_ST_DTYPES[e[1]]), e[0]))  # safetensors' own order: same bytes
    return entries, dropped


class ArtifactLayout:
    """The artifact of a streamed run, written in place while the layers are processed.

    At the first finished layer every tensor's place in the output shards is planned (the other layers'
    tensor names, dtypes and shapes are told from that one's, :meth:`LayerStream.planned_state`: the
    same, but for a layer whose input lacks modules that layer's had, or that the method finishes
    otherwise, such as LaRoSA's last layer without a residual adapter; the tensors outside the layers
    are known from the skeleton), the shards are created at their full size with
    their final headers (``artifact-*.part`` in the checkpoint directory; unwritten regions are holes),
    and each finished layer is written at its offsets.  :func:`save_streamed` then fills in the tensors
    outside the layers and links the shards into the output.  So the layers are written once in the
    whole run, instead of once into checkpoint files and again into the artifact.  A layer that does not
    fit the plan goes to its own checkpoint file, and the artifact is assembled as before."""

    def __init__(self, ckdir, files: list[str], offsets: dict):
        self.ckdir, self.files, self.offsets = Path(ckdir), files, offsets  # offsets: name -> [file, start, dtype, shape]

    @classmethod
    def load(cls, ckdir) -> "ArtifactLayout | None":
        path = Path(ckdir) / LAYOUT
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        if not all((Path(ckdir) / _part_name(f)).is_file() for f in d["files"]):
            return None
        return cls(ckdir, d["files"], d["offsets"])

    @classmethod
    def plan(cls, ckdir, stream: "LayerStream", done: int, state: dict, method=None) -> "ArtifactLayout":
        from . import fileio
        from .export.datafree import MAX_SHARD_BYTES, _header, _nbytes, _ST_DTYPES, split_shards

        p_done = stream.adapter.layer_prefix(done) + "."
        mine = {k[len(p_done):]: (v.dtype, tuple(v.shape)) for k, v in state.items()}

        def layer(i, prefix):
            tensors = mine if i == done else stream.planned_state(i, done, mine, method)
            return [(prefix + k, dt, sh, None) for k, (dt, sh) in tensors.items()]

        entries, dropped = _artifact_entries(stream.model, stream, layer)
        shards, names = split_shards(entries, lambda e: _nbytes((e[1], e[2])), MAX_SHARD_BYTES)
        headers = [_header([(n, dt, sh) for n, dt, sh, _ in shard],
                           dict(sorted(dropped.items()))) for shard in shards]
        fileio.require_space(ckdir, sum(map(len, headers)) + sum(_nbytes((e[1], e[2])) for e in entries),
                             "the artifact")
        offsets = {}
        for fname, shard, header in zip(names, shards, headers):
            pos = len(header)
            part = Path(ckdir) / _part_name(fname)
            part.unlink(missing_ok=True)  # a new file: an old one's data may live on under another name (restream)
            with open(part, "wb") as f:
                f.write(header)
                for n, dt, sh, _ in shard:
                    offsets[n] = [fname, pos, _ST_DTYPES[dt], list(sh)]
                    pos += _nbytes((dt, sh))
                f.truncate(pos)  # the data regions are holes until written
        fileio.atomic_write_json(Path(ckdir) / LAYOUT, {"files": names, "parts": [_part_name(f) for f in names],
                                                        "offsets": offsets})
        fileio.step("checkpoint.planned")
        return cls(ckdir, names, offsets)

    def fits(self, tensors: dict, prefix: str | None = None) -> bool:
        """Every tensor where the plan has it, with its dtype and shape (and, for a layer's ``prefix``, all
        the tensors the plan has under it)."""
        from .export.datafree import _ST_DTYPES

        if prefix is not None and set(tensors) != {n for n in self.offsets if n.startswith(prefix)}:
            return False
        return all(n in self.offsets and self.offsets[n][2:] == [_ST_DTYPES[t.dtype], list(t.shape)]
                   for n, t in tensors.items())

    def write(self, tensors: dict, prefix: str | None = None, sync: bool = True) -> bool:
        """Write ``tensors`` (artifact names) at their planned offsets (and sync them); ``False`` (nothing
        written) if they do not fit the plan."""
        if not self.fits(tensors, prefix):
            return False
        fds = {}
        try:
            for n, t in tensors.items():
                fname, start = self.offsets[n][:2]
                if fname not in fds:
                    fds[fname] = os.open(self.ckdir / _part_name(fname), os.O_WRONLY)
                data = t.contiguous().view(-1).view(torch.uint8).numpy().data
                done = 0
                while done < len(data):
                    done += os.pwrite(fds[fname], data[done:], start + done)
            if sync:
                for fd in fds.values():
                    os.fsync(fd)
        finally:
            for fd in fds.values():
                os.close(fd)
        return True

    def sync(self) -> None:
        for f in self.files:
            fd = os.open(self.ckdir / _part_name(f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def save_streamed(model: nn.Module, output, checkpoint_dir, *, description: dict | None = None, source_dir=None,
                  overwrite: bool = False, inputs=()) -> Path:
    """Write the artifact of a streamed run, sharded above 5 GB like ``save_pretrained``.  Where every layer
    went into the planned artifact (:class:`ArtifactLayout`), the other tensors are written into it from the
    input checkpoint and its shards are linked into the output; otherwise the artifact is written tensor
    by tensor from the layers' places (the planned shards or ``layer_i.safetensors``) and the input."""
    from .export.serialization import build_manifest, write_side_files
    from .fileio import atomic_output_dir

    manifest = build_manifest(model, description)
    output = Path(output)
    try:
        _write_shards(model, Path(checkpoint_dir),
                      lambda: atomic_output_dir(output, overwrite=overwrite, inputs=[p for p in [source_dir, *inputs] if p]),
                      lambda tmp: write_side_files(tmp, model, manifest, source_dir))
    finally:
        model._mmcompress_stream.close()
    return output


def _write_shards(model: nn.Module, ckdir: Path, open_dir, then=None) -> None:
    """The safetensors shards (and index) of a streamed run's artifact, in the directory ``open_dir()`` yields
    (``then(dir)`` adds files to it before it closes): see :func:`save_streamed`."""
    from . import fileio
    from .export.serialization import safetensors_header
    from .export.datafree import MAX_SHARD_BYTES, _header, _nbytes, _ShardReader, _ST_DTYPES, split_shards

    stream: LayerStream = model._mmcompress_stream
    dtypes = {v: k for k, v in _ST_DTYPES.items()}
    state = json.loads((ckdir / "state.json").read_text()) if (ckdir / "state.json").is_file() else {}
    where = state.get("where", {})
    layout = ArtifactLayout.load(ckdir) if any(w == "artifact" for w in where.values()) else None

    def layer_entries(i, prefix):
        if where.get(str(i)) == "artifact":
            return [(n, dtypes[o[2]], tuple(o[3]), ("part", o[0], n)) for n, o in layout.offsets.items()
                    if n.startswith(prefix)]
        path = ckdir / f"layer_{i:04d}.safetensors"
        return [(prefix + k, dtypes[dt], tuple(shape), ("layer", path, k))
                for k, (dt, shape) in safetensors_header(path).items()]

    entries, dropped = _artifact_entries(model, stream, layer_entries)
    shards, names = split_shards(entries, lambda e: _nbytes((e[1], e[2])), MAX_SHARD_BYTES)
    in_place = layout is not None and names == layout.files and all(w == "artifact" for w in where.values()) \
        and len(where) == len(stream.adapter.layers) and \
        all(layout.offsets.get(n, [None])[0] == f for f, shard in zip(names, shards) for n, *_ in shard) and \
        len(entries) == len(layout.offsets)
    readers: dict[Path, _ShardReader] = {}

    def read(src, dt):
        if src[0] == "src":
            return stream.read(src[1], dt)
        if src[0] == "mem":
            return src[1]
        path = ckdir / _part_name(src[1]) if src[0] == "part" else src[1]
        if path not in readers:
            readers[path] = _ShardReader(path)
        return readers[path].read(src[2])

    try:
        if in_place:  # the layers are in the shards already: add the rest, one tensor in memory at a time
            for n, dt, sh, src in entries:
                if src[0] in ("src", "mem") and not layout.write({n: read(src, dt)}, sync=False):
                    raise RuntimeError(f"{n}: read another dtype or shape than planned")
            layout.sync()
            fileio.step("artifact.filled")
        with open_dir() as tmp:
            weight_map, total = {}, 0
            for fname, shard in zip(names, shards):
                if in_place:
                    _link_or_copy(ckdir / _part_name(fname), tmp / fname)
                else:
                    with open(tmp / fname, "wb") as f:
                        f.write(_header([(n, dt, sh) for n, dt, sh, _ in shard],
                                        dict(sorted(dropped.items()))))
                        for n, dt, sh, src in shard:
                            t = read(src, dt)
                            if t.dtype != dt or tuple(t.shape) != sh:
                                raise RuntimeError(f"{n}: read {t.dtype} {tuple(t.shape)}, planned {dt} {sh}")
                            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().data)
                for n, dt, sh, _ in shard:
                    weight_map[n] = fname
                    total += _nbytes((dt, sh))
            if len(names) > 1:
                (tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            if then is not None:
                then(tmp)
    finally:
        for r in readers.values():
            r.close()
