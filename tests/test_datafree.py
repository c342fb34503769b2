"""Data-free RTN (``quantize`` without ``--calib``): the same artifact as the in-memory RTN run."""

import json

import pytest
import torch
from safetensors.torch import load_file

import mmcompress
from mmcompress.cli import main
from mmcompress.export.serialization import load_state
from .tiny_models import save_tiny
from mmcompress.export.datafree import quantize_checkpoint
from mmcompress.quant.quantizer import resolve_scheme


def _cli(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.err


def _same_artifact(a, b):
    sa, sb = load_state(a), load_state(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ma, mb = (json.loads((p / "mmcompress.json").read_text()) for p in (a, b))
    assert ma["calibration"]["data_free"] is True and mb["calibration"]["nsamples"] > 0
    skip = {"calibration", "seconds"}
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}
    assert (a / "config.json").read_text() == (b / "config.json").read_text()


@pytest.mark.parametrize("kind,dtype,tie,scheme", [
    ("llama", torch.bfloat16, False, "w8a8"),
    ("qwen2", torch.float32, True, "w4a16"),  # q/k/v biases, tied head, int4 asymmetric groups
    ("gemma3", torch.bfloat16, True, "w4a8"),
])
def test_data_free_equals_in_memory_rtn(tmp_path, tokenizer, calib_text, capsys, monkeypatch, kind, dtype, tie, scheme):
    from mmcompress.export import datafree

    monkeypatch.setattr(datafree, "_in_memory", None)  # these checkpoints stream, tensor by tensor
    src = save_tiny(tmp_path / "m", kind, layers=2, tie=tie, dtype=dtype, tokenizer=tokenizer)
    rc, err = _cli(["quantize", str(src), "--scheme", scheme, "--output", str(tmp_path / "free"), "--no-progress"],
                   capsys)
    assert rc == 0, err
    rc, err = _cli(["quantize", str(src), "--scheme", scheme, "--calib", str(calib_text), "--nsamples", "2",
                    "--seqlen", "16", "--output", str(tmp_path / "mem"), "--no-progress"], capsys)
    assert rc == 0, err
    _same_artifact(tmp_path / "free", tmp_path / "mem")
    assert json.loads((tmp_path / "free" / "mmcompress.json").read_text())["dtype"] == str(dtype)[6:]
    x = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mmcompress.load(tmp_path / "free")(input_ids=x).logits,
                       mmcompress.load(tmp_path / "mem")(input_ids=x).logits)


def test_data_free_shards_like_hugging_face(tmp_path, tokenizer):
    src = save_tiny(tmp_path / "m", "llama", layers=3, dtype=torch.bfloat16, tokenizer=tokenizer)
    quantize_checkpoint(src, tmp_path / "one", resolve_scheme("w8a8"), dtype=torch.bfloat16, progress=False)
    quantize_checkpoint(src, tmp_path / "many", resolve_scheme("w8a8"), dtype=torch.bfloat16,
                        max_shard_bytes=60_000, progress=False)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "many" / "model.safetensors").exists()
    assert all((tmp_path / "many" / s).stat().st_size <= 60_000 + 8192 for s in shards)
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    many = load_state(tmp_path / "many")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    assert sorted(one) == sorted(many) and all(torch.equal(one[k], many[k]) for k in one)
    x = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(mmcompress.load(tmp_path / "one")(input_ids=x).logits,
                       mmcompress.load(tmp_path / "many")(input_ids=x).logits)


def test_data_free_reads_sharded_input(tmp_path, tokenizer):
    from .tiny_models import tiny_model

    model, tok = tiny_model("llama", layers=2, tokenizer=tokenizer, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "single")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for name in ("sharded", "single"):
        quantize_checkpoint(tmp_path / name, tmp_path / f"q-{name}", resolve_scheme("w8a8"), dtype=torch.bfloat16,
                            progress=False)
    a, b = load_state(tmp_path / "q-sharded"), load_state(tmp_path / "q-single")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "sharded" / sorted((tmp_path / "sharded").glob("model-0000*"))[0].name).unlink()
    with pytest.raises(FileNotFoundError, match="shard model-00001"):
        quantize_checkpoint(tmp_path / "sharded", tmp_path / "q-bad", resolve_scheme("w8a8"), dtype=torch.bfloat16,
                            progress=False)
    assert not (tmp_path / "q-bad").exists()


def test_data_free_multimodal(tmp_path, tokenizer, capsys):
    """Qwen2.5-VL (its checkpoint names differ from the module names: the in-memory path, no forward):
    the decoder linears of the language model only; the vision tower stays dense."""
    src = save_tiny(tmp_path / "vl", "qwen2_5_vl", tokenizer=tokenizer)
    rc, err = _cli(["quantize", str(src), "--output", str(tmp_path / "free"), "--no-progress"], capsys)
    assert rc == 0, err
    specs = json.loads((tmp_path / "free" / "mmcompress.json").read_text())["modules"]
    assert specs and all(".language_model.layers." in p or p.startswith("model.layers.") for p in specs)
    assert len(specs) == 2 * 7
    loaded = mmcompress.load(tmp_path / "free")
    assert torch.isfinite(loaded(input_ids=torch.randint(0, 400, (1, 8))).logits).all()


def test_data_driven_methods_need_calib(tmp_path, tiny_llama_dir, capsys):
    for method in ("smoothquant", "awq", "mbq", "masquant"):
        rc, err = _cli(["quantize", str(tiny_llama_dir), "--method", method, "--output", str(tmp_path / "q")], capsys)
        assert rc == 1 and err.strip() == (f"mmcompress quantize: error: --method {method} needs calibration data "
                                           "(--calib); only rtn runs without it")
    rc, err = _cli(["quantize", str(tiny_llama_dir), "--report", str(tmp_path / "r"), "--output", str(tmp_path / "q")],
                   capsys)
    assert rc == 1 and "--report needs --calib" in err
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


def test_dtype_auto_is_the_checkpoint_dtype(tmp_path, tokenizer, calib_text, capsys):
    src = save_tiny(tmp_path / "m", "llama", layers=2, dtype=torch.bfloat16, tokenizer=tokenizer)
    calib = ["--calib", str(calib_text), "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    assert _cli(["quantize", str(src), "--method", "smoothquant", "--output", str(tmp_path / "auto"), *calib],
                capsys)[0] == 0
    assert _cli(["quantize", str(src), "--method", "smoothquant", "--dtype", "bfloat16",
                 "--output", str(tmp_path / "bf16"), *calib], capsys)[0] == 0
    assert json.loads((tmp_path / "auto" / "mmcompress.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "bf16" / "model.safetensors").read_bytes()
    rc, err = _cli(["quantize", str(src), "--dtype", "int8", "--output", str(tmp_path / "x")], capsys)
    assert rc == 1 and "--dtype must be auto, float32, bfloat16 or float16" in err


# -- the pipelined writer (reader and writer threads, the one-pass kernel, in-kernel copies) -----------------


def _reference_artifact(src, out, scheme, dtype, max_shard_bytes):
    """The artifact's safetensors files as the sequential loop wrote them before the pipeline (read one
    tensor, cast it, ``QuantLinear.packed_weight`` for a decoder linear, write; then the next)."""
    from mmcompress.export import datafree as D

    model = D._meta_model(src, dtype)
    sources = D.checkpoint_tensors(src)
    units, _, tied = D._plan(model, scheme)
    stored_as = {k: k for k in sources}
    for kept, others in tied.items():
        for name in [kept, *others]:
            if kept not in stored_as and name in sources:
                stored_as[kept] = name
    shards, names = D.split_shards(units, lambda u: sum(D._nbytes(v) for v in u[0].values()), max_shard_bytes)
    readers, weight_map = {}, {}
    out.mkdir()
    for fname, shard in zip(names, shards):
        with open(out / fname, "wb") as f:
            f.write(D._header([(k, *v) for o, _, _ in shard for k, v in o.items()], {"format": "pt"}))
            for o, srcs, build in shard:
                got = {}
                for k in srcs:
                    path = sources[stored_as[k]]
                    readers.setdefault(path, D._ShardReader(path))
                    got[k] = readers[path].read(stored_as[k]).to(o[k][0] if build is None else dtype)
                produced = got if build is None else build(got)
                for k in o:
                    f.write(produced[k].contiguous().view(-1).view(torch.uint8).numpy().data)
                    weight_map[k] = fname
    for r in readers.values():
        r.close()
    return names


def _same_files(new, ref, names):
    assert sorted(p.name for p in new.glob("*.safetensors")) == sorted(names)
    for name in names:
        assert (new / name).read_bytes() == (ref / name).read_bytes(), name


PIPELINE_SCHEMES = ["w8a8", "w4a8", "w4a6", "w4a16", "w8a16", "fp", "w3-g32-asym", "w5-g48", "w2-asym", "w6-g0-asym"]


def _scheme(name):
    if name in ("w8a8", "w4a8", "w4a6", "w4a16", "w8a16", "fp"):
        return resolve_scheme(name)
    bits, *rest = name.split("-")
    group = next((int(r[1:]) for r in rest if r.startswith("g")), 0)
    return resolve_scheme("w8a8", wbits=int(bits[1:]), group_size=group, sym="asym" not in rest)


def _pipeline_case(tmp_path, tokenizer, ckpt_dtype, load_dtype, schemes, shard_sizes):
    src = save_tiny(tmp_path / "m", "qwen2", layers=2, hidden=192, intermediate=321, heads=4, kv_heads=2, tie=True,
                    dtype=ckpt_dtype, tokenizer=tokenizer)
    for name in schemes:
        scheme = _scheme(name)
        for shard_bytes in shard_sizes:
            out, ref = tmp_path / f"{name}-{shard_bytes}", tmp_path / f"ref-{name}-{shard_bytes}"
            quantize_checkpoint(src, out, scheme, dtype=load_dtype, max_shard_bytes=shard_bytes, progress=False)
            names = _reference_artifact(src, ref, scheme, load_dtype, shard_bytes)
            assert (len(names) > 1) == (shard_bytes != D_MAX)
            _same_files(out, ref, names)


def _need_rtn_kernel():
    from mmcompress.quant.kernels import rtn_cpu

    if not rtn_cpu.available():
        pytest.skip(f"no RTN kernel here ({rtn_cpu.error()})")


def test_pipeline_bytes_equal_the_sequential_loop(tmp_path, tokenizer, monkeypatch):
    """Every scheme (group sizes that do not divide the rows, an odd row: down_proj, int4 packing), q/k/v
    biases and tied embeddings (qwen2), one and several output shards: the same bytes as before."""
    from mmcompress.quant.kernels import rtn_cpu

    _need_rtn_kernel()
    calls, real = [], rtn_cpu.quantize_weight_into
    monkeypatch.setattr(rtn_cpu, "quantize_weight_into", lambda *a: calls.append(real(*a)) or calls[-1])
    _pipeline_case(tmp_path, tokenizer, torch.bfloat16, torch.bfloat16, PIPELINE_SCHEMES, (D_MAX,))
    _pipeline_case(tmp_path / "sharded", tokenizer, torch.bfloat16, torch.bfloat16, ["w8a8", "w4a16"], (150_000,))
    assert len(calls) == 14 * (len(PIPELINE_SCHEMES) - 1 + 2) and all(calls)  # the kernel packed every linear


@pytest.mark.parametrize("ckpt_dtype,load_dtype", [
    (torch.float16, torch.float16), (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),  # narrowed before quantizing
    (torch.bfloat16, torch.float32),  # widened (exact: the kernel reads the bf16 bytes)
], ids=lambda d: str(d).split(".")[-1])
def test_pipeline_bytes_other_dtypes(tmp_path, tokenizer, ckpt_dtype, load_dtype):
    _need_rtn_kernel()
    _pipeline_case(tmp_path, tokenizer, ckpt_dtype, load_dtype, ["w8a8", "w4a16", "w3-g32-asym", "fp"], (D_MAX,))


def test_pipeline_without_the_kernel(tmp_path, tokenizer, monkeypatch):
    """No C++ compiler (or ``MMCOMPRESS_NO_CPU_KERNEL``): the reference quantizer, the same bytes."""
    from mmcompress.quant.kernels import rtn_cpu

    monkeypatch.setitem(rtn_cpu._STATE, "loaded", False)
    monkeypatch.setitem(rtn_cpu._STATE, "error", "disabled for the test")
    _pipeline_case(tmp_path, tokenizer, torch.bfloat16, torch.bfloat16, ["w8a8", "w4a16"], (D_MAX, 150_000))
    _pipeline_case(tmp_path / "f32", tokenizer, torch.float32, torch.bfloat16, ["w4a8"], (D_MAX,))


D_MAX = 5 * 1024**3


def test_pipeline_falls_back_on_non_finite_and_negative_zero(tmp_path, tokenizer):
    """A weight with NaN, one with inf and an asymmetric group with -0.0 as its minimum: the kernel leaves
    those tensors to the reference, the bytes are the sequential loop's."""
    from mmcompress.export.serialization import load_state
    from safetensors.torch import save_file

    src = save_tiny(tmp_path / "m", "llama", layers=2, hidden=128, intermediate=256, dtype=torch.bfloat16,
                    tokenizer=tokenizer)
    state = load_state(src)
    state["model.layers.0.self_attn.q_proj.weight"][3, 7] = float("nan")
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    w = state["model.layers.1.mlp.down_proj.weight"]
    w[5] = w[5].abs()
    w[5, 9] = -0.0
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    for name in ("w8a8", "w4a16"):
        quantize_checkpoint(src, tmp_path / name, resolve_scheme(name), dtype=torch.bfloat16, progress=False)
        names = _reference_artifact(src, tmp_path / f"ref-{name}", resolve_scheme(name), torch.bfloat16, D_MAX)
        _same_files(tmp_path / name, tmp_path / f"ref-{name}", names)
