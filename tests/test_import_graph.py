"""The packages' import graph, built from the source: no cycles, imports go down the layers, and the
product never imports the lab.

Every ``import`` and ``from ... import`` counts, wherever it sits (module level, function bodies,
``if`` blocks): an import moved into a function to dodge a cycle is still an edge.  The check covers
the product (``src/mmcompress``) and the lab package ``src/mmcompress_testbed`` (testbed models and data,
connector weights, the demo).  The lab's benchmark scripts (``benchmarks/``) import the product and are
not a package: nothing in src/ can import them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mmcompress

PACKAGE = Path(mmcompress.__file__).parent
TESTBED = PACKAGE.parent / "mmcompress_testbed"  # the lab package, next to the product in src/


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` of every module under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def import_graph(*roots: Path) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over the modules of the packages ``roots`` (default: the
    product and the testbed), edges between them included.

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; a name
    below a module (``import a.b.f``) resolves to the module that holds it."""
    roots = roots or (PACKAGE, TESTBED)
    modules = {k: v for root in roots for k, v in _modules(root).items()}
    tops = tuple(root.name for root in roots)

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                if target in tops or target.startswith(tuple(t + "." for t in tops)):
                    to = resolve(target)
                    if to and to != name:
                        edges.setdefault(to, node.lineno)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def _describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    inside = set(component)
    edges = [f"    {a} -> {b} (line {line})" for a in component for b, line in sorted(graph[a].items()) if b in inside]
    return f"  {len(component)} modules: {', '.join(component)}\n" + "\n".join(edges)


def test_graph_builder_sees_imports_everywhere(tmp_path):
    pkg = tmp_path / "mmcompress"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import mmcompress.a.thing\n")
    graph = import_graph(pkg)
    assert graph["mmcompress.a"] == {"mmcompress.sub.b": 1}
    assert graph["mmcompress.sub.b"] == {"mmcompress.c": 2}  # inside a function body
    assert graph["mmcompress.c"] == {"mmcompress.a": 1}
    assert strongly_connected(graph) == [["mmcompress.a", "mmcompress.c", "mmcompress.sub.b"]]


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "mmcompress.cli" in graph and "mmcompress_testbed.registry" in graph
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles in src/:\n" + "\n".join(_describe(c, graph) for c in cycles)


# the lab inside src/: the testbed package (the kernel and synthetic-stack benchmarks are scripts in benchmarks/)
LAB = ("mmcompress_testbed",)


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_product_does_not_import_the_lab():
    """The lab plugs in (mmcompress.plugins: entry points); no product module names it in an import."""
    graph = import_graph()
    wrong = [f"{a} -> {b} (line {line})" for a, edges in sorted(graph.items()) if not _in(a, LAB)
             for b, line in sorted(edges.items()) if _in(b, LAB)]
    assert not wrong, "product modules importing lab code:\n" + "\n".join(wrong)
    # and no module of src/mmcompress imports the testbed package
    wrong = [f"{a} -> {b}" for a, edges in graph.items() if _in(a, ["mmcompress"])
             for b in edges if _in(b, ["mmcompress_testbed"])]
    assert not wrong and any(_in(b, ["mmcompress"]) for b in graph["mmcompress_testbed.demo"]), wrong


def test_product_does_not_import_the_benchmark_scripts():
    """``benchmarks/*.py`` (the kernel and synthetic-stack benchmarks among them) run the product; no module
    of src/mmcompress imports one of them (they would be found only when run from benchmarks/)."""
    scripts = {p.stem for p in (PACKAGE.parent.parent / "benchmarks").glob("*.py")} | {"benchmarks", "tests"}
    assert {"kernel_bench", "stack_decode", "speed_common"} <= scripts
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            wrong += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in scripts]
    assert not wrong, "product modules importing benchmark scripts:\n" + "\n".join(wrong)


# Layers, lowest first: a module imports only from its own layer or lower ones.  A package or module not
# listed here fails the test (place it).  Subcommand modules belong to the CLI layer, wherever they live.
LAYERS = [
    ("ground", ["mmcompress", "mmcompress.fileio", "mmcompress.finite", "mmcompress.specs", "mmcompress.plugins",
                "mmcompress.options", "mmcompress.distributed", "mmcompress.memory"]),
    ("models and data", ["mmcompress.models", "mmcompress.data"]),
    ("engine", ["mmcompress.engine"]),
    ("methods", ["mmcompress.quant", "mmcompress.sparse"]),
    ("artifacts and runtime", ["mmcompress.export", "mmcompress.recipe", "mmcompress.streaming", "mmcompress.runtime",
                               "mmcompress.vllm_plugin"]),
    ("evaluation", ["mmcompress.eval"]),
    ("cli", ["mmcompress.cli", "mmcompress.sparse.cli", "mmcompress.export.cli", "mmcompress.runtime.cli",
             "mmcompress.eval.lm_eval_adapter"]),
    ("lab", list(LAB)),
]
# The imports allowed to go up, each with its reason (the bound: at most 2).  None left: options owns
# the bit range, the diagnostics live in quant/, data-free RTN (an artifact writer) in export/.
UPWARD: set[tuple[str, str]] = set()


def _layer(module: str) -> int:
    best = None  # the longest listed prefix decides (mmcompress.sparse.cli is cli, not methods)
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]) and \
                    (p != "mmcompress" or module == "mmcompress"):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer of test_import_graph.LAYERS"
    return best[0]


def test_imports_go_down_the_layers():
    graph = import_graph()
    up = {(a, b): line for a, edges in graph.items() for b, line in edges.items() if _layer(b) > _layer(a)}
    unexpected = [f"{a} ({LAYERS[_layer(a)][0]}) -> {b} ({LAYERS[_layer(b)][0]}), line {line}"
                  for (a, b), line in sorted(up.items()) if (a, b) not in UPWARD]
    assert not unexpected, "imports from a lower layer to a higher one:\n" + "\n".join(unexpected)
    assert len(UPWARD) <= 2 and set(UPWARD) <= set(up), "UPWARD lists an import that is gone: drop it"


def test_subcommands_import_cli_common_not_the_cli():
    graph = import_graph()
    assert "mmcompress.cli.common" in graph
    assert [a for a, edges in graph.items() if "mmcompress.cli" in edges and not _in(a, ["mmcompress.cli"])] == []


def test_cli_imports_no_lab_code():
    code = ("import mmcompress, mmcompress.cli, sys; "
            "assert not any('testbed' in m for m in sys.modules), sorted(m for m in sys.modules if 'testbed' in m)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_lab_subcommands_load_only_when_asked():
    """Listing the testbed's subcommands reads its plugin table alone; its modules load when one runs."""
    code = """
import contextlib, io, sys
from mmcompress.cli import main
lab = lambda: sorted(m for m in sys.modules if 'testbed' in m or m.endswith('demo'))
out = io.StringIO()
for argv in (["--help"], ["quantize", "--help"], ["eval", "--help"]):
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(argv)
assert lab() == ["mmcompress_testbed", "mmcompress_testbed.plugin"], lab()
assert "testbed" in out.getvalue() and "demo" in out.getvalue()
with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
    main(["testbed", "fetch", "--help"])
assert "--verify" in help_text.getvalue() and "mmcompress_testbed.cli" in lab(), lab()
assert "mmcompress_testbed.demo" not in lab(), lab()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def _prose(path: Path) -> list[str]:
    """The docstrings and comments of a source file."""
    import io
    import tokenize

    text = path.read_text()
    out = [ast.get_docstring(n) or "" for n in ast.walk(ast.parse(text))
           if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out += [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT]
    return out


def test_files_named_in_the_sources_exist():
    """Every file a docstring or comment of src/ names (``docs/methods.md``, ``benchmarks/x.py``,
    ``sparse/topk.py``, ``mmcompress_testbed/multimodal.py``) is in the repository."""
    import re

    root = PACKAGE.parent.parent
    pattern = re.compile(r"(?<![\w.])((?:[\w-]+/)+[\w.-]+\.(?:md|py|sh|cpp|h))\b")
    missing, named = [], 0
    for path in sorted(PACKAGE.parent.rglob("*.py")):
        for piece in _prose(path):
            for name in pattern.findall(piece):
                named += 1
                if not any((base / name).exists() for base in (root, root / "src", PACKAGE, path.parent)):
                    missing.append(f"{path.relative_to(root)}: {name}")
    assert named > 40
    assert not missing, "files named in the sources that are not in the repository:\n" + "\n".join(missing)
