"""benchmarks/llamacpp_env.sh builds llama.cpp -march=native without AMX (its AMX buffer type crashes on
Q8_0/Q4_0 in llama-cpp-python 0.3.36): the -mno-amx-* flags it adds must win over -march=native, which
ggml's CMake puts after them on the compiler's command line."""

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llamacpp_env.sh"


def _macros(cc: str, flags: list[str]) -> set[str]:
    out = subprocess.run([cc, *flags, "-dM", "-E", "-"], input="", capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def test_script_flags_drop_amx_but_keep_native_simd():
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() != "x86_64":
        pytest.skip("needs an x86-64 C compiler")
    m = re.search(r'NOAMX="(-mno-amx[^"]*)"', SCRIPT.read_text())
    assert m, "llamacpp_env.sh no longer sets NOAMX"
    noamx = m.group(1).split()
    if subprocess.run([cc, *noamx, "-E", "-"], input="", capture_output=True).returncode != 0:
        pytest.skip("compiler without -mno-amx-* (the script then adds nothing)")
    native = _macros(cc, ["-march=native"])
    built = _macros(cc, [*noamx, "-march=native"])  # the order ggml's build uses: CFLAGS first, then -march
    assert not {d for d in built if d.startswith("__AMX")}
    # everything else -march=native turns on stays (AVX-512, VNNI, BF16 on this machine)
    assert {d for d in native if not d.startswith("__AMX")} == built
