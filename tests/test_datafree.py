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
