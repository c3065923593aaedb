"""The package's layers, read from its source: backbones <- surgery <- pipeline <- cli, imports at the
top of each file, and no two files that import each other (directly or round a longer loop)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the checkout is the dclsify package
PACKAGE = "dclsify"
# The layers, lowest first: a module may import its own layer and those below. The version module
# stands below them all; the package root (its public names), hear (the HEAR API by its module name) and
# __main__ above them all.
LAYERS = {"_version": 0, "backbones": 1, "surgery": 2, "pipeline": 3, "cli": 4, "hear": 4, "": 4, "__main__": 5}
# The only places that may import the package's own modules inside a function: the CLI's commands
# (so that `dclsify --help` loads no torch) and the root's lazy attributes (PEP 562 __getattr__).
LAZY_ALLOWED = {("cli", None), ("", "__getattr__")}


def package_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name (``dclsify.surgery.dcls``) -> file, for every module of the package under ``root``."""
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[0] not in ("backbones", "surgery", "pipeline") and len(parts) > 1:
            continue  # tests, examples, .ci, a virtual environment: not the package
        name = ".".join((PACKAGE, *parts)).removesuffix(".__init__")
        files[name] = path
    return files


def layer_of(module: str) -> int:
    return LAYERS[module.removeprefix(PACKAGE).lstrip(".").split(".")[0]]


def _resolve(node: ast.ImportFrom | ast.Import, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package's own modules an import statement reads (``from X import name`` reads X.name where
    that is a module of its own, else X)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in known]
    return submodules if len(submodules) == len(node.names) else [target, *submodules]


def imports(files: dict[str, Path]) -> list[tuple[str, int, str, str | None]]:
    """(importing module, line, imported module, enclosing function or None at the top level) for every
    import of the package's own modules."""
    found = []
    known = set(files)
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            function, parent = None, parents.get(node)
            while parent is not None and function is None:
                if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                    function = getattr(parent, "name", "<lambda>")
                parent = parents.get(parent)
            for target in _resolve(node, module, path.name == "__init__.py", known):
                found.append((module, node.lineno, target, function))
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The groups of files that import each other, directly or round a loop (Tarjan's components)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def findings(root: Path = ROOT) -> list[str]:
    """Every import that runs against the layers, every function-level import of the package's own
    modules outside the allowed places, and every cycle between files: one line each."""
    files = package_files(root)
    found, edges = [], set()
    for module, line, target, function in imports(files):
        where = f"{files[module].relative_to(root)}:{line}"
        if target != module:
            edges.add((module, target))
        if layer_of(target) > layer_of(module):
            found.append(f"{where}: {module} imports {target}, a layer above it")
        short = module.removeprefix(PACKAGE).lstrip(".")
        if function is not None and (short, None) not in LAZY_ALLOWED and (short, function) not in LAZY_ALLOWED:
            found.append(f"{where}: {module} imports {target} inside {function}(): imports go at the top of the file")
    for group in cycles({(s, t) for s, t in edges if t in files}):
        found.append(f"cycle between files: {' <-> '.join(str(files[m].relative_to(root)) for m in group)}")
    return found


def test_the_package_imports_one_way_at_the_top_of_each_file():
    found = findings()
    assert not found, f"{len(found)} findings:\n" + "\n".join(found)


def test_the_checker_finds_what_it_is_for(tmp_path):
    """A tree with one of each fault: an import upwards, a function-level import, a cycle."""
    for folder in ("backbones", "surgery", "pipeline"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    root = "from .surgery.root import x\n\n\ndef __getattr__(name):\n    from .pipeline import a\n"
    (tmp_path / "__init__.py").write_text(root)
    (tmp_path / "cli.py").write_text("def command():\n    from dclsify.pipeline import a\n")
    (tmp_path / "_version.py").write_text("__version__ = '0'\n")
    (tmp_path / "backbones" / "x.py").write_text("from .._version import __version__\n")
    (tmp_path / "surgery" / "up.py").write_text("from ..pipeline.a import thing\n")
    (tmp_path / "surgery" / "late.py").write_text("def f():\n    from . import up\n")
    (tmp_path / "surgery" / "root.py").write_text("from dclsify import __version__\n")
    (tmp_path / "pipeline" / "a.py").write_text("from . import b\nthing = 1\n")
    (tmp_path / "pipeline" / "b.py").write_text("from .a import thing\n")
    found = findings(tmp_path)
    assert len(found) == 5, found
    assert found[0] == "surgery/late.py:2: dclsify.surgery.late imports dclsify.surgery.up inside f(): " + (
        "imports go at the top of the file"
    )
    assert found[1] == "surgery/root.py:1: dclsify.surgery.root imports dclsify, a layer above it"
    assert found[2] == "surgery/up.py:1: dclsify.surgery.up imports dclsify.pipeline.a, a layer above it"
    assert found[3:] == [
        "cycle between files: pipeline/a.py <-> pipeline/b.py",
        "cycle between files: __init__.py <-> surgery/root.py",
    ] or found[3:] == [
        "cycle between files: __init__.py <-> surgery/root.py",
        "cycle between files: pipeline/a.py <-> pipeline/b.py",
    ]


@pytest.mark.parametrize("module", ["dclsify.cli", "dclsify.surgery.checkpoint", "dclsify.pipeline.train"])
def test_every_module_is_found(module):
    assert module in package_files()
