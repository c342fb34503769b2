"""The lab's speed benchmarks, ``benchmarks/kernel_bench.py`` (one sparse GEMV vs dense, cold cache) and
``benchmarks/stack_decode.py`` (a synthetic LLaMA-2-7B-shaped stack of the product's modules), on tiny
shapes: their plumbing, byte counts and command lines (no timing assertions), and that the product's
``mmcompress bench`` points to them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .test_kernels import cpu_kernel  # noqa: F401  (the module fixture: builds the extension or skips)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    """The two scripts as modules (benchmarks/ appended to the path: it shadows no installed module)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    import kernel_bench
    import stack_decode

    assert Path(kernel_bench.__file__).parent == BENCHMARKS == Path(stack_decode.__file__).parent
    return kernel_bench, stack_decode


def _json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_parsing(scripts):
    kernel_bench, stack_decode = scripts
    assert kernel_bench.parse_shape("4096x11008") == (4096, 11008)
    with pytest.raises(ValueError):
        kernel_bench.parse_shape("4096")
    assert stack_decode.parse_decode_spec("llama2-7b:3") == ("llama2-7b", 3)
    assert stack_decode.parse_decode_spec("llama2-7b") == ("llama2-7b", 4)
    assert stack_decode.parse_decode_spec("/some/model") is None


def test_kernel_bench_command_line(cpu_kernel, scripts, capsys):
    kernel_bench, _ = scripts
    assert kernel_bench.main(["--shape", "96x200", "--sparsity", "0.5", "--dtype", "fp32", "--repeats", "2",
                              "--cache-mb", "1", "--json"]) == 0
    res = _json_line(capsys)
    assert res["keep"] == 100 and res["backend"] == "cpu" and res["max_rel_err"] < 1e-5
    assert {"dense_us", "sparse_us", "ratio", "topk_share", "kernel_at_0pct_ratio"} <= set(res)
    for bad in (["--shape", "nonsense"], ["--sparsity", "1.0"], ["--scheme", "w4a16"]):
        with pytest.raises(SystemExit) as e:
            kernel_bench.main(bad + ["--cache-mb", "1"])
        assert e.value.code == 2
    assert "--shape" in capsys.readouterr().err


def test_kernel_bench_int8_and_best_dense(cpu_kernel, scripts):
    kernel_bench, _ = scripts
    res = kernel_bench.kernel_benchmark(96, 200, 0.5, "bf16", batch=2, backend="cpu", repeats=1, cache_mb=1,
                                        scheme="w8a8")
    assert res["int8_max_rel_err"] < 1e-5 and res["keep"] == 100
    assert res["best_dense"] in ("torch_bf16", "torch_fp32", "kernel_at_0pct")
    assert res["best_dense_us"] == min(res["torch_bf16_us"], res["torch_fp32_us"], res["kernel_at_0pct_us"])
    assert {"sparse_vs_best_dense", "sparse_vs_torch_bf16", "int8_sparse_vs_best_dense",
            "int8_sparse_vs_torch_bf16"} <= set(res)
    with pytest.raises(ValueError, match="w8a8"):
        kernel_bench.kernel_benchmark(96, 200, 0.5, scheme="w4a16", cache_mb=1)


def test_stack_decode_sparse_tiny(cpu_kernel, scripts):
    _, stack_decode = scripts
    res = stack_decode.synthetic_decode_benchmark("tiny", 1, sparsity=0.5, tokens=2, prompt=3, rounds=1,
                                                  backend="cpu")
    assert res["backend"] == "cpu" and res["topk_calls_per_token"] == 4  # qkv, o, gate/up, down
    assert res["dense_tok_s"] > 0 and res["sparse_tok_s"] > 0 and "adapter_ms_per_token" in res
    # the 7 projections in bf16 (dense) and the same plus the bf16 256x256 residual adapter (LaRoSA)
    proj = 4 * 256 * 256 + 3 * 256 * 688
    assert res["dense_weight_bytes"] == 2 * proj and res["weight_bytes"] == 2 * proj + 2 * 256 * 256


def test_stack_decode_joint_tiny(cpu_kernel, scripts, capsys):
    _, stack_decode = scripts
    args = ["tiny:1", "--sparsity", "0.5", "--scheme", "w8a8", "--tokens", "2", "--prompt", "10", "--rounds", "1",
            "--json"]
    assert stack_decode.main(args) == 0
    res = _json_line(capsys)
    assert {"tok_s", "dense_tok_s", "speedup", "dense_baseline", "weight_bytes", "dense_weight_bytes",
            "peak_rss_bytes"} <= set(res)
    assert res["compressed"] == "joint" and res["dense_baseline"] in ("torch_bf16", "kernel_at_0pct")
    # tiny: hidden 256, intermediate 688; int8 codes + per-output-channel fp32 scale and int32 zero correction,
    # plus the bf16 256x256 adapter (the recipe's default), vs the bf16 projections
    proj = 4 * 256 * 256 + 3 * 256 * 688
    outs = 4 * 256 + 2 * 688 + 256  # q, k, v, o | gate, up | down
    assert res["dense_weight_bytes"] == 2 * proj
    assert res["joint_adapters"] == "float"
    assert res["weight_bytes"] == proj + 8 * outs + 2 * 256 * 256
    # adapters: w8a16 (int8 codes, fp32 scale and zero point per output)
    assert stack_decode.main(args + ["--joint-adapters", "w8a16"]) == 0
    res = _json_line(capsys)
    assert res["joint_adapters"] == "w8a16"
    assert res["weight_bytes"] == proj + 8 * outs + 256 * 256 + 8 * 256


def test_stack_decode_integer_path_tiny(cpu_kernel, scripts, capsys):
    _, stack_decode = scripts
    assert stack_decode.main(["tiny:1", "--scheme", "w8a8", "--tokens", "2", "--prompt", "4", "--rounds", "1",
                              "--json"]) == 0
    res = _json_line(capsys)
    assert res["scheme"] == "w8a8" and res["spec"] == "tiny:1" and res["tok_s"] > 0
    assert set(res["ms_per_token"]) == {"torch_bf16", "torch_fp32", "own_kernel_0pct", "w8a8"}
    assert res["dense_baseline"] in ("torch_bf16", "torch_fp32", "own_kernel_0pct")
    proj = 4 * 256 * 256 + 3 * 256 * 688
    assert res["dense_weight_bytes"] == 2 * proj and proj < res["weight_bytes"] < 1.1 * proj  # int8 codes + scales
    for bad in (["no/such/dir"], ["tiny:0"], ["tiny:1", "--sparsity", "1.5"]):
        with pytest.raises(SystemExit) as e:
            stack_decode.main(bad)
        assert e.value.code == 2
    assert "mmcompress bench decode DIR" in capsys.readouterr().err


def test_product_bench_points_to_the_scripts(capsys):
    from mmcompress.cli import main

    assert main(["bench", "decode", "llama2-7b:4", "--tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "benchmarks/stack_decode.py" in err
    assert main(["bench"]) == 1 and "benchmarks/kernel_bench.py" in capsys.readouterr().err
    assert main(["bench", "kernel", "--shape", "96x200", "--json"]) == 1  # not a product command any more
    err = capsys.readouterr().err
    assert err.strip() == ("mmcompress bench: error: bench kernel is a lab script now: "
                           "python benchmarks/kernel_bench.py --shape 96x200 --json")
    with pytest.raises(SystemExit):  # and not listed
        main(["bench", "--help"])
    out = capsys.readouterr().out.splitlines()
    listed = [line.split()[0] for line in out if line[:4] == "    " and line[4] != " "]  # the subcommands' lines
    assert listed == ["decode"]
    for script in ("kernel_bench.py", "stack_decode.py"):
        assert (BENCHMARKS / script).is_file()


def test_stack_decode_fused_step_tiny(cpu_kernel, scripts, capsys):
    """``--step fused``: every variant, dense baselines included, is a model on DecodeEngine's fused step;
    one that would fall back to the Python step is an error naming ``fused_problem``'s reason."""
    from mmcompress.runtime import fused

    if not fused.load():
        pytest.skip("no fused CPU kernel here")
    _, stack_decode = scripts
    base = ["--tokens", "2", "--prompt", "4", "--rounds", "1", "--step", "fused", "--json"]
    assert stack_decode.main(["tiny64:1", "--scheme", "w8a8"] + base) == 0
    res = _json_line(capsys)
    assert res["step"] == "fused" and res["fused_problem"] is None
    assert res["variants_step"] == {n: "fused" for n in ("dense_bf16", "own_kernel_0pct", "w8a8")}
    assert res["dense_baseline"] in ("dense_bf16", "own_kernel_0pct") and res["compressed"] == "w8a8"
    proj = 4 * 256 * 256 + 3 * 256 * 768
    assert res["dense_weight_bytes"] == 2 * proj and proj < res["weight_bytes"] < 1.1 * proj
    assert res["shell_bytes"] == 2 * (2 * 256 * 256 + 256)  # embedding, head (vocab 256), final norm: bf16
    assert stack_decode.main(["tiny64:1", "--sparsity", "0.5", "--scheme", "w8a8", "--fp32"] + base) == 0
    res = _json_line(capsys)
    assert res["variants_step"] == {n: "fused" for n in ("dense_bf16", "dense_fp32", "own_kernel_0pct", "sparse",
                                                         "sparse_no_adapter", "joint")}
    assert res["compressed"] == "joint" and {"sparse_speedup", "adapter_ms_per_token"} <= set(res)
    # --teal: TEAL at the same level on the fused step too (thresholds from a dense calibration forward)
    assert stack_decode.main(["tiny64:1", "--sparsity", "0.5", "--teal"] + base) == 0
    res = _json_line(capsys)
    assert res["variants_step"]["teal"] == "fused" and res["compressed"] == "sparse"
    assert 0.2 < res["teal_rows_read"] < 0.8 and res["teal_speedup"] > 0
    with pytest.raises(SystemExit):  # a usage error
        stack_decode.main(["tiny64:1", "--sparsity", "0.5", "--teal", "--tokens", "1", "--rounds", "1"])
    assert "--teal is for --step fused" in capsys.readouterr().err
    # tiny's down projection (in 688) is off the integer kernel: W8A8 cannot take the fused step -> an error
    with pytest.raises(RuntimeError, match=r"fall back.*fused_problem: layer 0: w8a8"):
        stack_decode.main(["tiny:1", "--scheme", "w8a8"] + base)
    # the Python mode says which step it ran
    assert stack_decode.main(["tiny64:1", "--scheme", "w8a8", "--tokens", "1", "--prompt", "4", "--rounds", "1",
                              "--json"]) == 0
    res = _json_line(capsys)
    assert res["step"] == "python" and set(res["variants_step"].values()) == {"python"}
