"""Plugins reach the product through the ``mmcompress.plugins`` entry points (mmcompress/plugins.py), and
the wheel holds the product alone (pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import mmcompress

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(mmcompress.__file__).resolve().parents[1]


def _fake_plugin(where: Path) -> Path:
    """An installed-looking distribution (a ``*.dist-info`` with entry points) with one plugin that adds
    the subcommand ``hello`` and the text set ``hello-text``, and one entry point whose module is missing."""
    where.mkdir()
    (where / "fake_mmc_plugin.py").write_text(
        'COMMANDS = {"hello": ("fake_mmc_cmd", "greets the user")}\nNAMED_SETS = ["fake_mmc_sets"]\n')
    (where / "fake_mmc_cmd.py").write_text(
        "def register(sub):\n"
        "    p = sub.add_parser('hello', help='greets the user')\n"
        "    p.add_argument('--json', action='store_true')\n"
        "    p.set_defaults(func=lambda args: {'hello': 'world'})\n")
    (where / "fake_mmc_sets.py").write_text(
        "from mmcompress.data import named\nnamed.register('text', 'hello-text', lambda: 'hello ' * 50)\n")
    info = where / "fake_mmc-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-mmc\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[mmcompress.plugins]\nfake = fake_mmc_plugin\nmissing = fake_mmc_not_installed.plugin\n")
    return where


def _run(code: str, path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), str(SRC)]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_a_plugin_adds_commands_and_sets_through_its_entry_point(tmp_path):
    path = _fake_plugin(tmp_path / "site")
    code = """
import contextlib, io, json, sys
from mmcompress import plugins
from mmcompress.cli import main
from mmcompress.data import named
assert plugins.commands()["hello"] == ("fake_mmc_cmd", "greets the user"), plugins.commands()
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "greets the user" in out.getvalue() and "fake_mmc_cmd" not in sys.modules  # listed, not imported
with contextlib.redirect_stdout(io.StringIO()) as out:
    assert main(["hello", "--json"]) == 0
assert json.loads(out.getvalue().splitlines()[-1]) == {"hello": "world"}
assert "fake_mmc_sets" not in sys.modules
assert named.resolve("text", "hello-text")().startswith("hello hello")
print("ok")
"""
    p = _run(code, path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr


def test_a_plugin_whose_module_is_not_installed_is_skipped(tmp_path):
    path = _fake_plugin(tmp_path / "site")
    (path / "fake_mmc_plugin.py").unlink()  # both entry points now name missing modules
    code = """
from mmcompress import plugins
from mmcompress.cli import main
mods = [m.__name__ for m in plugins.load()]
assert not any(m.startswith("fake_mmc") for m in mods), mods
assert "hello" not in plugins.commands()
print("ok")
"""
    p = _run(code, path)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr


def test_a_broken_plugin_is_an_error_not_skipped(tmp_path):
    path = _fake_plugin(tmp_path / "site")
    (path / "fake_mmc_plugin.py").write_text("import fake_mmc_dependency_that_is_missing\n")
    p = _run("from mmcompress import plugins; plugins.load()", path)
    assert p.returncode != 0 and "fake_mmc_dependency_that_is_missing" in p.stderr


def test_the_wheel_holds_the_product_alone():
    """The packages setuptools puts in the wheel (pyproject's find settings): the product's, and no testbed
    package, no connector weights; the testbed is declared as a plugin, not imported."""
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = cfg["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT / find["where"][0]), include=find["include"])
    assert "mmcompress" in packages and "mmcompress.cli" in packages
    assert not [p for p in packages if "testbed" in p], packages
    data = cfg["tool"]["setuptools"]["package-data"]
    assert set(data) <= set(packages) and not any("testbed" in g or "assets" in g for g in sum(data.values(), []))
    shipped = [f for p in packages for f in (ROOT / "src" / p.replace(".", "/")).iterdir() if f.is_file()]
    assert not [f for f in shipped if f.suffix == ".safetensors"]
    # every C++ kernel source the product compiles on first use is package data (the int kernel was not)
    src = ROOT / "src" / "mmcompress"
    kernels = {str(f.relative_to(src)) for f in shipped if f.suffix == ".cpp"}
    assert kernels and kernels <= {str(f.relative_to(src)) for g in data["mmcompress"] for f in src.glob(g)}, kernels
    eps = cfg["project"]["entry-points"]["mmcompress.plugins"]
    assert eps == {"testbed": "mmcompress_testbed.plugin"}


def test_the_testbed_plugin_is_installed():
    """The installed metadata declares the testbed's entry point (else: pip install -e ".[test]" again)."""
    from mmcompress import plugins

    assert [m.__name__ for m in plugins.load()] == ["mmcompress_testbed.plugin"]
    assert set(plugins.commands()) == {"testbed", "demo"}
    assert plugins.set_providers() == ["mmcompress_testbed.sets"]
