"""Huge pages for the decoding commands (``cli.huge_pages_for``): asked of torch before it allocates,
never for the quantize/sparsify commands, never against the user's own ``THP_MEM_ALLOC_ENABLE``."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcompress.cli import HUGE_PAGE_COMMANDS, huge_pages_for

_PROBE = """
import sys
from mmcompress.cli import huge_pages_for
on = huge_pages_for(sys.argv[1])
import torch
w = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)  # 16 MiB, touched
kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0]
print(on, kb)
"""


def test_decoding_commands_ask_for_huge_pages_and_the_user_decides(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh CLI process (restored after the test)
    env = {}
    assert huge_pages_for("bench", env) and env == {"THP_MEM_ALLOC_ENABLE": "1"}
    assert set(HUGE_PAGE_COMMANDS) == {"generate", "bench"}
    for cmd in ("quantize", "sparsify", "compress", "export", "demo", None):
        env = {}
        assert not huge_pages_for(cmd, env) and env == {}
    env = {"THP_MEM_ALLOC_ENABLE": "0"}  # the user's choice stands
    assert not huge_pages_for("generate", env) and env == {"THP_MEM_ALLOC_ENABLE": "0"}


def test_no_effect_once_torch_is_imported():
    import torch  # noqa: F401

    env = {}
    assert not huge_pages_for("bench", env) and env == {}


def _thp_available() -> bool:
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode and Path("/proc/self/smaps_rollup").exists()


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this machine (Linux only)")
def test_a_decoding_command_process_gets_huge_pages_and_quantize_does_not():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    got = {}
    for cmd in ("bench", "quantize"):
        out = subprocess.run([sys.executable, "-c", _PROBE, cmd], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr
        on, kb = out.stdout.split()
        got[cmd] = (on == "True", int(kb))
    assert got["bench"][0] and got["bench"][1] >= 8 << 10  # most of the 16 MiB on 2 MiB pages
    assert not got["quantize"][0] and got["quantize"][1] < got["bench"][1]
