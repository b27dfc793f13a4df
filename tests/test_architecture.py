"""The shape of the house, read from the source with the standard library's ast (nothing is imported):
- the dashboard (app.py, pages/) imports from core only the read model (core.query), the jobs
  (core.jobs), the figures (core.figures) and the settings (core.settings);
- core/ never imports streamlit;
- core's modules import each other without a cycle.

Every import counts: `import core.x`, `from core import x`, `from core.x import y`, relative imports,
imports inside functions and `importlib.import_module("...")` with a literal name. Imports under
`if TYPE_CHECKING:` do not run, so they do not count. Each checker takes the root folder it reads, so
the tests below also show it catching a bad file in a copy of the tree.
"""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGE_MODULES = ("core.query", "core.jobs", "core.figures", "core.settings")


@dataclasses.dataclass(frozen=True)
class Import:
    path: Path       # relative to the root
    line: int
    module: str      # absolute dotted name, resolved to a module of the tree where it is one

    def where(self) -> str:
        return f"{self.path.as_posix()}:{self.line}"


def module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(root: Path, dotted: str) -> str:
    """The longest prefix of `dotted` that is a module or package under root (`from core import x`
    names module core.x when x is one, else a name in core); `dotted` itself if none is."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        folder = root.joinpath(*parts[:end])
        if folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file():
            return ".".join(parts[:end])
    return dotted


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _nodes_that_run(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:` (their else branch does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _type_checking_only(node):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def imports(root: Path, relative: Path) -> list[Import]:
    """Every import of one file, at any depth, as absolute module names."""
    source = (root / relative).read_text()
    tree = ast.parse(source, filename=str(relative))
    name = module_name(relative)
    package = name if relative.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in _nodes_that_run(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".") if package else []
                if node.level - 1 > len(anchor):
                    raise ValueError(f"{relative}:{node.lineno}: relative import beyond the top package")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            names = [node.args[0].value]
        found += [Import(relative, node.lineno, resolve(root, name)) for name in names]
    return found


def python_files(root: Path, *patterns: str) -> list[Path]:
    return sorted({p.relative_to(root) for pattern in patterns for p in root.glob(pattern)
                   if p.is_file() and "__pycache__" not in p.parts})


def page_import_violations(root: Path) -> list[str]:
    """Imports of core modules other than PAGE_MODULES by app.py or any file under pages/."""
    violations = []
    for relative in python_files(root, "app.py", "pages/**/*.py"):
        for found in imports(root, relative):
            in_core = found.module == "core" or found.module.startswith("core.")
            allowed = any(found.module == m or found.module.startswith(m + ".") for m in PAGE_MODULES)
            if in_core and not allowed:
                violations.append(f"{found.where()} imports {found.module}; pages may import from core "
                                  f"only {', '.join(PAGE_MODULES)}: ask the read model for the view")
    return violations


def streamlit_imports_in_core(root: Path) -> list[str]:
    return [f"{found.where()} imports {found.module}; core/ computes and must run without Streamlit"
            for relative in python_files(root, "core/**/*.py")
            for found in imports(root, relative)
            if found.module == "streamlit" or found.module.startswith("streamlit.")]


def core_import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """For every module of core/, the core modules it imports (each with one place it does)."""
    graph: dict[str, dict[str, Import]] = {}
    for relative in python_files(root, "core/**/*.py"):
        name = module_name(relative)
        edges = graph.setdefault(name, {})
        for found in imports(root, relative):
            in_core = found.module == "core" or found.module.startswith("core.")
            if in_core and found.module != name:
                edges.setdefault(found.module, found)
    return graph


def import_cycles(root: Path) -> list[str]:
    """One cycle per strongly connected group of core modules, as `a -> b -> a` with the file and
    line of each import (Tarjan's algorithm, iterative)."""
    graph = core_import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return [_describe_cycle(graph, group) for group in groups]


def _describe_cycle(graph: dict[str, dict[str, Import]], group: list[str]) -> str:
    """A shortest path from the group's first module back to itself, within the group."""
    members, start = set(group), group[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in previous:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, {})):
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    path = [start]
    while len(path) == 1 or path[-1] != start:
        path.append(previous[path[-1]])
    path.reverse()
    steps = [f"{a} -> {b} ({graph[a][b].where()})" for a, b in zip(path, path[1:])]
    return "import cycle: " + ", ".join(steps)


# --- The real tree ------------------------------------------------------------------------------

def test_pages_import_from_core_only_the_read_model_jobs_figures_and_settings():
    violations = page_import_violations(REPO)
    assert not violations, "\n".join(violations)


def test_core_never_imports_streamlit():
    violations = streamlit_imports_in_core(REPO)
    assert not violations, "\n".join(violations)


def test_core_modules_import_each_other_without_a_cycle():
    cycles = import_cycles(REPO)
    assert not cycles, "\n".join(cycles)


# --- Each check catches a bad file in a copy of the tree ----------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of the repository's Python sources (core/, pages/, app.py)."""
    for folder in ("core", "pages"):
        shutil.copytree(REPO / folder, tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.jsonl", "*.toml"))
    shutil.copy(REPO / "app.py", tmp_path / "app.py")
    return tmp_path


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("file, source, module", [
    ("pages/9_Bad.py", "import core.metrics\n", "core.metrics"),
    ("pages/9_Bad.py", "from core import graph\n", "core.graph"),
    ("pages/9_Bad.py", "from core.pipeline import RunRequest\n", "core.pipeline"),
    ("pages/9_Bad.py", "import core\n", "core"),
    ("pages/9_Bad.py", "def view():\n    from core.generation import generate_greedy\n", "core.generation"),
    ("pages/9_Bad.py", "import importlib\nstore = importlib.import_module('core.store')\n", "core.store"),
    ("pages/_shared/deep/bad.py", "from core.commands.score import load_score_file\n",
     "core.commands.score"),
    ("app.py", "from core import __version__\n", "core"),
])
def test_a_page_importing_another_core_module_is_named_with_its_line(tree, file, source, module):
    write(tree, file, source)
    line = source.count("\n", 0, source.index("core")) + 1
    expected = f"{file}:{line} imports {module};"
    violations = page_import_violations(tree)
    assert any(v.startswith(expected) for v in violations), violations


def test_pages_may_import_the_four_modules_in_every_form(tmp_path):
    write(tmp_path, "core/query.py", "")
    write(tmp_path, "core/settings.py", "")
    write(tmp_path, "pages/_shared/__init__.py", "from . import widgets\n")
    write(tmp_path, "pages/_shared/widgets.py", "")
    write(tmp_path, "pages/1_Good.py", "import core.query\nfrom core import settings\n"
                                       "from core.jobs import start\ndef f():\n    import core.figures\n")
    write(tmp_path, "app.py", "from core.query import ResultCache\nimport streamlit as st\n")
    assert page_import_violations(tmp_path) == []


@pytest.mark.parametrize("source", [
    "import streamlit as st\n", "from streamlit import session_state\n",
    "import streamlit.components.v1\n", "def show():\n    import streamlit\n"])
def test_streamlit_in_core_is_named_with_its_line(tree, source):
    write(tree, "core/bad.py", source)
    line = source.count("\n", 0, source.index("streamlit")) + 1
    violations = streamlit_imports_in_core(tree)
    assert any(v.startswith(f"core/bad.py:{line} imports streamlit") for v in violations), violations


@pytest.mark.parametrize("a_source, b_source", [
    ("import core.zz_b\n", "from core import zz_a\n"),
    ("from . import zz_b\n", "def late():\n    from core.zz_a import value\n"),
    ("from core.zz_b import value\n", "import importlib\nimportlib.import_module('core.zz_a')\n"),
])
def test_an_import_cycle_in_core_is_named_with_each_import(tree, a_source, b_source):
    write(tree, "core/zz_a.py", a_source + "value = 1\n")
    write(tree, "core/zz_b.py", b_source + "value = 2\n")
    cycles = [c for c in import_cycles(tree) if "core.zz_a" in c]
    assert len(cycles) == 1, import_cycles(tree)
    assert cycles[0].startswith("import cycle: core.zz_a -> core.zz_b (core/zz_a.py:1), "
                                "core.zz_b -> core.zz_a (core/zz_b.py:")


def test_a_longer_cycle_through_a_subpackage_is_found(tmp_path):
    write(tmp_path, "core/__init__.py", "")
    write(tmp_path, "core/a.py", "import core.sub.b\n")
    write(tmp_path, "core/sub/__init__.py", "")
    write(tmp_path, "core/sub/b.py", "from ..c import thing\n")
    write(tmp_path, "core/c.py", "def thing():\n    from core import a\n")
    assert import_cycles(tmp_path) == [
        "import cycle: core.a -> core.sub.b (core/a.py:1), core.sub.b -> core.c (core/sub/b.py:1), "
        "core.c -> core.a (core/c.py:2)"]


def test_imports_only_for_type_checking_make_no_cycle(tmp_path):
    write(tmp_path, "core/a.py", "import core.b\n")
    write(tmp_path, "core/b.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from core.a import A\nelse:\n    import json\n")
    assert import_cycles(tmp_path) == []
    write(tmp_path, "core/b.py", "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n"
                                 "    import core.a\n")
    assert len(import_cycles(tmp_path)) == 1
