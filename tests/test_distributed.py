"""Distributed calibration under torchrun (gloo, 2 CPU ranks) against one process.

Launches of ``python -m torch.distributed.run --standalone --nproc-per-node 2`` (marked ``dist``:
about two minutes together on 2 idle cores, the three TEAL/CATS cases 60 s more on the shared machine,
run by .ci/run with ``pytest -m dist``): the CLI, streamed as in one process (RTN and SmoothQuant W8A8,
float32 and bf16 with tied embeddings, a WINA + SmoothQuant recipe, LaRoSA's grid and greedy plans,
WINA's greedy plan, TEAL (uniform, greedy) and CATS, and ``--in-memory``: the artifact must be
byte-identical, rank 0 alone writes and prints) and tests/_dist_methods.py (RTN, SmoothQuant, AWQ,
MBQ, MASQuant text-only and with image tokens, LaRoSA).  Both sides run with one thread per process,
so that per-sample kernels are the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mmcompress import cli
from mmcompress.distributed import DistributedError, World

from . import _dist_methods

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def torchrun(*args, cwd) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


class one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


SEARCHES = ("larosa-grid", "larosa-greedy", "wina-greedy")  # plan searches in the walk (tests/test_sparse_search.py)
RECIPE = "steps:\n  - sparsify: {method: wina, sparsity: 0.4}\n  - quantize: {method: smoothquant, scheme: w8a8}\n"


@pytest.mark.dist
@pytest.mark.parametrize("case", ["rtn", "smoothquant", "smoothquant-bf16-tied", "compress", "in-memory",
                                  "larosa-grid", "larosa-greedy", "wina-greedy"])
def test_cli_two_ranks_byte_identical(case, calib_text, tmp_path, capsys):
    """``torchrun --nproc-per-node 2 mmcompress quantize|compress``: streamed like one process (every rank reads
    each layer from the shards, no notice), the samples split 3 + 2, rank 0 alone writes and prints, and the
    artifact has the bytes of the single-process streamed one.  ``in-memory``: the same under ``--in-memory``."""
    from .tiny_models import save_tiny

    if case == "smoothquant-bf16-tied":  # the checkpoint's dtype kept; the tied embedding read for the capture
        model = save_tiny(tmp_path / "tiny-qwen2", "qwen2", layers=3, tie=True, dtype=torch.bfloat16)
    else:
        model = save_tiny(tmp_path / "tiny-llama", "llama", layers=3)
    if case == "compress":
        (tmp_path / "r.yaml").write_text(RECIPE)
        command = ["compress", str(model), "--recipe", str(tmp_path / "r.yaml")]
    elif case in SEARCHES:  # the search samples (4 of 5) split 3 + 1: the losses/errors gathered over the ranks
        method, plan = case.split("-")
        command = ["sparsify", str(model), "--method", method, "--sparsity", "0.5", "--plan", plan]
        calib_text = _diverse_text(tmp_path)
    else:
        method = "rtn" if case == "rtn" else "smoothquant"
        command = ["quantize", str(model), "--method", method, "--scheme", "w8a8"]
    common = [*command, "--calib", str(calib_text), "--nsamples", "5", "--seqlen", "32", "--no-progress", "--json"]
    if case == "in-memory":
        common.append("--in-memory")
    one, two, r = _one_and_two_ranks(common, tmp_path, capsys)
    done = {"quantize": "quantized ", "compress": "compressed ", "sparsify": "sparsified "}[command[0]]
    assert r.stderr.count(done) == 1, r.stderr
    assert "notice:" not in r.stderr, r.stderr  # streamed on every rank (or --in-memory, as asked)
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["rank_tokens"] == [5 * 32]
    assert two["rank_tokens"] == [3 * 32, 2 * 32]  # the work was split, not repeated
    assert sum(two["rank_tokens"]) == sum(one["rank_tokens"])
    if command[0] == "quantize":
        assert two["calibration"] == one["calibration"]
    # LaRoSA's PCA bases come from float64 sums of per-sample moments, which 2 ranks add in another order
    # (docs/distributed.md): the same plan and files, the tensors equal to round-off
    _assert_same_artifact(tmp_path / "one", tmp_path / "two", float_sums=case.startswith("larosa"))
    assert not [p.name for p in tmp_path.iterdir() if ".ckpt" in p.name]  # rank 0's checkpoint directory is gone


@pytest.mark.dist
@pytest.mark.parametrize("method, plan", [("teal", "uniform"), ("teal", "greedy"), ("cats", "exact")])
def test_cli_two_ranks_threshold_methods_byte_identical(method, plan, tmp_path, capsys):
    """TEAL (uniform, greedy) and CATS under ``torchrun --nproc-per-node 2``: their seeded ``|x|`` samples
    are the one process's draws (each rank advances the generator past the other ranks' samples) and the
    values are gathered before the quantile, so the thresholds and the artifact have the single-process
    bytes.  600 tokens per sample: the 64-wide activations are kept whole (38400 values, under the 52429
    per call of 5 samples) and the 128-wide ones drawn from; the greedy plan draws from every one."""
    from .tiny_models import save_tiny

    model = save_tiny(tmp_path / "tiny-llama", "llama", layers=3)
    common = ["sparsify", str(model), "--method", method, "--plan", plan, "--sparsity", "0.5",
              "--calib", str(_diverse_text(tmp_path)), "--nsamples", "5", "--seqlen", "600", "--no-progress", "--json"]
    one, two, _ = _one_and_two_ranks(common, tmp_path, capsys)
    assert one["rank_tokens"] == [5 * 600] and two["rank_tokens"] == [3 * 600, 2 * 600]  # split, not repeated
    assert two["model_sparsity"] == one["model_sparsity"]
    _assert_same_artifact(tmp_path / "one", tmp_path / "two")


def _one_and_two_ranks(common, tmp_path, capsys):
    """``mmcompress COMMON`` in this process (one thread) into tmp_path/one, then under ``torchrun
    --nproc-per-node 2`` into tmp_path/two: both ``--json`` results (the 2-rank one printed once, by rank 0) and
    torchrun's completed process."""
    with one_thread():
        assert cli.main(common + ["--output", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = torchrun("-m", "mmcompress.cli", *common, "--output", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # printed once, by rank 0
    return one, json.loads(lines[0]), r


def _assert_same_artifact(one, two, float_sums: bool = False):
    """The same files with the same bytes (``mmcompress.json``: equal but for the run's seconds).
    ``float_sums``: ``model.safetensors`` holds the same tensors (names, dtypes, shapes), each equal to the
    other within ``1e-8`` of its largest magnitude (float64 sums added in another order differ by about
    ``1e-16`` relative, which the float32 weights show as a few last-bit differences: measured ``6e-10`` of
    the largest magnitude on an AMD EPYC; with a rank's moment left out of the sum they move by more than their
    own magnitude)."""
    files = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == files
    for name in files:
        if float_sums and name == "model.safetensors":
            a, b = load_file(str(one / name)), load_file(str(two / name))
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
                scale = float(a[k].abs().max()) if a[k].numel() else 0.0
                assert torch.allclose(a[k], b[k], rtol=0, atol=1e-8 * scale), (k, float((a[k] - b[k]).abs().max()))
            continue
        a, b = (one / name).read_bytes(), (two / name).read_bytes()
        if name == "mmcompress.json":
            a, b = (_timeless(json.loads(x)) for x in (a, b))
        assert a == b, name


def _diverse_text(tmp_path):
    """Text of random tokens: calib_text's 16 words give LaRoSA's layer-0 moment H a rank below the width,
    whose PCA basis is then not unique (a sum in another order picks another one, as on one process with
    other samples); here H has full rank, and the 2-rank basis is the 1-rank one, bit for bit."""
    from .tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = torch.randint(10, len(tok) - 10, (4000,), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "diverse.txt"
    path.write_text(tok.decode(ids))
    return path


def _timeless(obj):
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


@pytest.mark.parametrize("flag", [["--resume"], ["--checkpoint-dir", "CK"], ["--report", "REP"]])
def test_cli_refuses_what_torchrun_does_not_support(flag, tiny_llama_dir, calib_text, tmp_path, capsys,
                                                    monkeypatch):
    """Under torchrun (a world of 2, as ``on_ranks`` sees it once joined) a flag that needs one process is one
    line before anything is loaded or written."""
    from mmcompress import distributed

    monkeypatch.setattr(distributed, "current", lambda: World(0, 2))
    flag = [str(tmp_path / f) if f.isupper() else f for f in flag]
    out = tmp_path / "out"
    rc = cli.main(["quantize", str(tiny_llama_dir), "--method", "smoothquant", "--calib", str(calib_text),
                   "--nsamples", "4", "--seqlen", "16", "--no-progress", "--output", str(out), *flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err == [f"mmcompress quantize: error: {flag[0]} is not supported under torchrun yet"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.txt", "tiny-llama"])


@pytest.mark.dist
def test_methods_two_ranks_match_one_process(tmp_path):
    r = torchrun(ROOT / "tests" / "_dist_methods.py", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with one_thread():
        for name in _dist_methods.CASES:
            one, tokens = _dist_methods.run_case(name)
            path = tmp_path / "two" / f"{name}.safetensors"
            two = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                two_tokens = json.loads(f.metadata()["rank_tokens"])
            assert len(two_tokens) == 2 and min(two_tokens) > 0 and sum(two_tokens) == sum(tokens), name
            assert one.keys() == two.keys(), name
            fp, q1, q2 = one["logits.fp"], one["logits.q"], two["logits.q"]
            err = (q1 - fp).pow(2).mean().sqrt()
            assert err > 0, name  # the comparison below means something
            if name in ("masquant_vl", "larosa"):
                # float64 sums (CMC / PCA second moments) in another order: the artifact may differ in the
                # last bits (the CMC factors are not unique where the moment is near-singular); the
                # model's output may not move by more than 1e-4 of its quantization error
                assert (q1 - q2).pow(2).mean().sqrt() <= 1e-4 * err, name
                continue
            bad = [k for k in one if not torch.equal(one[k], two[k])]
            assert not bad, (name, bad[:5])


def test_world_blocks_split_contiguously():
    w = World(1, 3)
    assert [list(b) for b in w.blocks(7)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert w.block(7) == range(3, 5)
    assert [w.owner(j, 7) for j in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(DistributedError, match="2 calibration samples cannot be split across 3 ranks"):
        w.block(2)


def test_method_without_distributed_support_refused():
    from mmcompress.engine import Method, run_layerwise
    from mmcompress.models.adapters import get_adapter
    from .tiny_models import tiny_model

    class Local(Method):
        name = "local-statistic"

        def step(self, ctx):
            pass

    model, tok = tiny_model("llama")
    samples = [{"input_ids": torch.arange(8)[None]}] * 2
    with pytest.raises(DistributedError, match="local-statistic does not support distributed calibration"):
        run_layerwise(model, get_adapter(model), Local(), samples, world=World(0, 2), progress=False)


@pytest.mark.parametrize("kw, message", [
    ({"resume": True, "checkpoint_dir": "CK"}, "--resume is not supported under torchrun yet"),
    ({"checkpoint_dir": "CK"}, "checkpoints of a model in memory are not supported under torchrun yet"),
])
def test_engine_refuses_resume_and_in_memory_checkpoints_on_ranks(tmp_path, kw, message):
    """Under torchrun a checkpoint directory holds a streamed model's finished layers on rank 0 only: resuming,
    or checkpointing a model in memory, is one line before any collective."""
    from mmcompress.engine import run_layerwise
    from mmcompress.models.adapters import get_adapter
    from mmcompress.quant.api import make_method
    from .tiny_models import tiny_model

    model, tok = tiny_model("llama")
    kw = {k: str(tmp_path / v) if v == "CK" else v for k, v in kw.items()}
    with pytest.raises(DistributedError, match=message):
        run_layerwise(model, get_adapter(model), make_method("rtn", "w8a8"), [{"input_ids": torch.arange(8)[None]}] * 2,
                      world=World(0, 2), progress=False, **kw)
    assert not (tmp_path / "CK").exists()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number"),
])
def test_bad_world_setup_is_one_line(tiny_llama_dir, calib_text, tmp_path, capsys, monkeypatch, env, message):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rc = cli.main(["quantize", str(tiny_llama_dir), "--method", "smoothquant", "--calib", str(calib_text),
                   "--nsamples", "4", "--seqlen", "16", "--no-progress", "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith(f"mmcompress quantize: error: {message}"), err
    assert not out.exists()
