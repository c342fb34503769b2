"""Issue 21's bad input for large models: a missing or truncated shard fails before any output with the
shard's name; too little disk space leaves the previous output intact and says how many bytes were needed;
a rank that dies under torchrun makes the run exit (no hang)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest

from mmcompress import cli, fileio

from .test_distributed import _env
from .tiny_models import save_tiny

CALIBRATED = ["--method", "smoothquant", "--scheme", "w8a8", "--nsamples", "2", "--seqlen", "16", "--no-progress"]
DATA_FREE = ["--method", "rtn", "--scheme", "w8a8", "--no-progress"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny Llama saved in 7 shards with an index."""
    d = tmp_path_factory.mktemp("sharded")
    model_dir = save_tiny(d / "src", "llama", layers=3)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(d / "m", max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, d / "m" / f)
    shards = sorted((d / "m").glob("model-*.safetensors"))
    assert len(shards) > 3
    return d / "m"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(capsys, args) -> tuple[int, str]:
    rc = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err[-1] if err else ""


def _nothing_written(tmp_path, out="out"):
    return not any(p.name.startswith(out) for p in tmp_path.iterdir())


@pytest.mark.parametrize("mode", [[], ["--in-memory"], "data-free"])
def test_missing_shard_named_before_any_output(sharded, tmp_path, calib_text, capsys, mode):
    model = _copy(sharded, tmp_path / "model")
    gone = sorted(model.glob("model-*.safetensors"))[2]
    gone.unlink()
    opts = DATA_FREE if mode == "data-free" else CALIBRATED + ["--calib", str(calib_text)] + mode
    rc, line = _run(capsys, ["quantize", str(model), *opts, "--output", str(tmp_path / "out")])
    assert rc == 1 and line.startswith("mmcompress quantize: error:") and gone.name in line and "missing" in line
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("mode", [[], ["--in-memory"], "data-free"])
@pytest.mark.parametrize("cut", [1, 4096, "header"])
def test_truncated_shard_named_before_any_output(sharded, tmp_path, calib_text, capsys, mode, cut):
    """The last shard (it holds tensors a streamed run reads only at the end, lm_head) cut short: refused at the
    start, not after the layer walk (which would leave a checkpoint directory behind)."""
    model = _copy(sharded, tmp_path / "model")
    last = sorted(model.glob("model-*.safetensors"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:6] if cut == "header" else data[:-cut])
    opts = DATA_FREE if mode == "data-free" else CALIBRATED + ["--calib", str(calib_text)] + mode
    rc, line = _run(capsys, ["quantize", str(model), *opts, "--output", str(tmp_path / "out")])
    assert rc == 1 and line.startswith("mmcompress quantize: error:") and last.name in line and "truncated" in line
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("mode", ["streamed", "data-free"])
def test_out_of_disk_keeps_previous_output_and_says_bytes_needed(sharded, tmp_path, calib_text, capsys, monkeypatch,
                                                                 mode):
    opts = DATA_FREE if mode == "data-free" else CALIBRATED + ["--calib", str(calib_text)]
    out = tmp_path / "out"
    assert cli.main(["quantize", str(sharded), *opts, "--output", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    artifact = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    capsys.readouterr()
    real = shutil.disk_usage
    free = 5000  # bytes: too few for the artifact
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    rc, line = _run(capsys, ["quantize", str(sharded), *opts, "--output", str(out), "--overwrite"])
    assert rc == 1 and "not enough disk space" in line and f"{free} are free" in line, line
    needed = int(line.split("it needs ")[1].split(" bytes")[0])
    assert needed == artifact  # the artifact's size, headers included
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous output, intact
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "calib.txt") == ["out"]  # no checkpoint, no temp
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: real(p)._replace(free=needed))
    assert cli.main(["quantize", str(sharded), *opts, "--output", str(out), "--overwrite"]) == 0  # just enough


@pytest.mark.dist
def test_dying_rank_ends_the_run(tiny_llama_dir, calib_text, tmp_path):
    """Rank 1 dies in the middle of the layer walk: rank 0, waiting in a collective, is stopped by torchrun and
    the run exits non-zero with rank 1's failure, long before gloo's 30-minute timeout; nothing is written."""
    from pathlib import Path

    entry = Path(__file__).with_name("_dist_die.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(entry),
           "quantize", str(tiny_llama_dir), *CALIBRATED, "--calib", str(calib_text), "--nsamples", "4",
           "--output", str(tmp_path / "out")]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    failure = r.stderr[r.stderr.rfind("Root Cause"):]  # torchrun's report names the rank that died first
    assert re.search(r"rank\s*: 1 ", failure) and re.search(r"exitcode\s*: 3 ", failure), r.stderr[-3000:]
    assert time.time() - t0 < 300
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if ".ckpt" in p.name]  # nor rank 0's (streamed) layers


def test_sigterm_cleans_up(tiny_llama_dir, calib_text, tmp_path):
    """A SIGTERM (``kill``, torchrun stopping the ranks left when one dies, a batch scheduler's time limit) in the
    middle of a streamed walk: the command says so in one line, exits 128 + 15, and removes what it made — its
    hidden checkpoint directory with the partly written artifact — and writes no output."""
    import signal
    from pathlib import Path

    entry = Path(__file__).with_name("_term_entry.py")
    marker = tmp_path / "written"
    run = tmp_path / "run"
    run.mkdir()
    cmd = [sys.executable, str(entry), str(marker), "quantize", str(tiny_llama_dir), *CALIBRATED, "--calib",
           str(calib_text), "--output", str(run / "out")]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not marker.exists():
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.05)
        assert [q.name for q in run.iterdir() if ".ckpt" in q.name]  # the walk's directory exists now ...
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1] == "mmcompress quantize: terminated (SIGTERM)", err[-3000:]
    assert list(run.iterdir()) == []  # ... and is gone, with no output
