"""The package's shape: no import cycles between mtpx's modules, no source file over ~400 lines without the reason
stated at its top, and no backend checks in a model family's file."""
import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mtpx"
MAX_LINES = 420
LONG_REASON = "Longer than 400 lines because"  # how a long file states why, in its first 15 lines
# every model family's file, and the blocks they share
FAMILY_FILES = sorted(p.relative_to(SRC).as_posix() for p in (SRC / "models").glob("*.py")
                      if p.name not in ("__init__.py", "interface.py", "registry.py", "linear.py", "grouped.py",
                                        "ops.py"))


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """mtpx modules imported when `path` is imported (module level, outside functions and TYPE_CHECKING)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mtpx"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtpx") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def test_no_import_cycles_between_modules():
    # the root package is imported before any of its modules whatever they import: not an edge of its own
    files = {_module(p): p for p in SRC.rglob("*.py") if p != SRC / "__init__.py"}
    graph = {m: {i for i in _top_level_imports(p) if i in files and i != m} for m, p in files.items()}
    for m in list(graph):  # importing a.b.c imports its packages a.b and a first
        for dep in list(graph[m]):
            graph[m].update(p for p in _parents(dep) if p in files and p != m and not m.startswith(p + "."))
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(graph):
        if m not in state:
            visit(m)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@pytest.mark.parametrize("path", sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*")
                                        if p.suffix in (".py", ".cpp", ".h")))
def test_long_files_say_why(path):
    text = (SRC / path).read_text()
    if text.count("\n") > MAX_LINES:
        head = "\n".join(text.splitlines()[:15])
        assert LONG_REASON in head, f"{path} has {text.count(chr(10))} lines and no '{LONG_REASON} ...' at its top"


@pytest.mark.parametrize("path", FAMILY_FILES)
def test_family_files_hold_no_backend_checks(path):
    """How a pass runs is a runner's business (mtpx/runners/): a family file names no device type, kernel module or
    environment switch."""
    text = (SRC / path).read_text()
    for pattern in (r"device\.type\s*==\s*['\"](cuda|cpu)", r"is_cuda", r"from mtpx import kernels", r"os\.environ",
                    r"mtpx\.runners", r"StaticState"):
        assert not re.search(pattern, text), f"{path} matches {pattern!r}"
