"""GGUF export: tensors llama.cpp reads, the grid change measured, refusals before anything is written."""

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")

import gguf  # noqa: E402

from mmcompress.cli import main  # noqa: E402
from mmcompress.export.gguf import GGUFExportError, _permute_rows, effective_weight, export_gguf  # noqa: E402
from mmcompress.export.serialization import load  # noqa: E402


def _quantize(model_dir, calib, out, *args):
    rc = main(["quantize", str(model_dir), *args, "--calib", str(calib), "--nsamples", "2", "--seqlen", "32",
               "--output", str(out)])
    assert rc in (0, None)
    return out


@pytest.mark.parametrize("method,scheme,qtype", [("rtn", "w8a8", "Q8_0"), ("smoothquant", "w4a16", "Q4_1"),
                                                 ("rtn", "w4a8", "Q4_0")])
def test_gguf_holds_the_artifacts_weights(tiny_llama_dir, calib_text, tmp_path, method, scheme, qtype):
    extra = ["--runtime-smoothing"] if method == "smoothquant" else []
    art = _quantize(tiny_llama_dir, calib_text, tmp_path / "art", "--method", method, "--scheme", scheme, *extra)
    report = export_gguf(art, tmp_path / "m.gguf")
    assert report["gguf_types"] == [qtype] and report["linears"] == 3 * 7
    assert 0 <= report["grid_change_error"]["mean"] <= report["grid_change_error"]["max"] < 0.2
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {"token_embd.weight", "output_norm.weight", "blk.2.ffn_down.weight"} <= set(tensors)
    model = load(art, runtime="reference") if "runtime" in load.__code__.co_varnames else load(art)
    layer = model.model.layers[1]
    for path, name, heads in (("mlp.up_proj", "ffn_up", None), ("self_attn.k_proj", "attn_k", 2)):
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type.name == qtype
        w = effective_weight(layer.get_submodule(path))
        if heads:
            w = _permute_rows(w, heads)
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        rel = float(np.linalg.norm(back - w.numpy()) / np.linalg.norm(w.numpy()))
        assert rel < 0.2, (path, rel)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == model.config.vocab_size


def test_permutation_matches_llama_cpp_rope_layout():
    """Row r = (head h, half j, pair p) of HF's rotate-half order goes to (h, p, j): interleaved pairs."""
    w = torch.arange(16.0)[:, None]
    out = _permute_rows(w, 2)[:, 0].tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_gguf_refuses_what_it_cannot_express(tiny_llama_dir, calib_text, tmp_path):
    art = _quantize(tiny_llama_dir, calib_text, tmp_path / "mas", "--method", "masquant", "--scheme", "w8a8",
                    "--epochs", "0")
    with pytest.raises(GGUFExportError, match="masquant"):
        export_gguf(art, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    rtn = _quantize(tiny_llama_dir, calib_text, tmp_path / "rtn", "--method", "rtn", "--scheme", "w8a8")
    with pytest.raises(GGUFExportError, match="inside the artifact"):
        export_gguf(rtn, rtn / "m.gguf")
    (tmp_path / "keep.gguf").write_text("user data")
    with pytest.raises(GGUFExportError, match="--overwrite"):
        export_gguf(rtn, tmp_path / "keep.gguf")
    assert (tmp_path / "keep.gguf").read_text() == "user data"
    with pytest.raises(GGUFExportError, match="not an mmcompress artifact"):
        export_gguf(tiny_llama_dir, tmp_path / "y.gguf")


def test_gguf_through_the_cli(tiny_llama_dir, calib_text, tmp_path):
    art = _quantize(tiny_llama_dir, calib_text, tmp_path / "art", "--method", "rtn", "--scheme", "w8a8")
    out = tmp_path / "m.gguf"
    assert main(["export", str(art), "--format", "gguf", "--output", str(out)]) in (0, None)
    assert out.is_file() and gguf.GGUFReader(str(out)).fields["general.architecture"].contents() == "llama"
    before = out.read_bytes()
    assert main(["export", str(art), "--format", "gguf", "--output", str(out)]) not in (0, None)  # exists
    assert out.read_bytes() == before
    assert main(["export", str(art), "--format", "gguf", "--output", str(out), "--overwrite"]) in (0, None)


def test_gguf_warns_when_blocks_round_the_codes_again(tiny_llama_dir, calib_text, tmp_path, capsys):
    """4-bit groups of 128 re-rounded onto llama.cpp's 32-blocks: a one-line warning naming the fix; groups
    of 32 line up with the blocks and get none."""
    for group, warned in ((128, True), (32, False)):
        art = _quantize(tiny_llama_dir, calib_text, tmp_path / f"g{group}", "--method", "rtn", "--scheme", "w4a16",
                        "--group-size", str(group))
        capsys.readouterr()
        assert main(["export", str(art), "--format", "gguf", "--output", str(tmp_path / f"g{group}.gguf")]) in (0, None)
        err = capsys.readouterr().err
        assert ("--group-size 32" in err) is warned, err
