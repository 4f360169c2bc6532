"""The import graph of ``src/cai``: no module imports itself back, and no internal import hides in a function.

An import inside a function is invisible to a reader of the module's top and to any check of the
top, so a loop can hide there. Each one left must say why it is lazy (an optional dependency, or
a measured slow import such as torch kept out of ``cai --help``) in a trailing ``# lazy:`` comment.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import cai

ROOT = Path(cai.__file__).parent
LAZY = re.compile(r"#\s*lazy:\s*\S")


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module (``cai.stages.label``)."""
    target: str
    """The internal module it imports."""
    line: int
    in_function: bool
    marked_lazy: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The module ``name`` refers to (an attribute's module for ``cai.x.attr``); None outside cai."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def internal_imports(module: str, path: Path) -> list[Import]:
    """Every import of a ``cai`` module in one file (absolute or relative, at any depth)."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def record(name: str, node: ast.stmt, depth: int) -> None:
        target = _resolve(name) if name == "cai" or name.startswith("cai.") else None
        if target is not None:
            text = "\n".join(lines[node.lineno - 1:node.end_lineno])
            found.append(Import(module, target, node.lineno, depth > 0, bool(LAZY.search(text))))

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    record(alias.name, child, depth)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    origin = f"{base}.{child.module}" if child.module else base
                else:
                    origin = child.module or ""
                for alias in child.names:  # `from cai.eval import gold` imports the module cai.eval.gold
                    full = f"{origin}.{alias.name}"
                    record(full if full in MODULES else origin, child, depth)
            visit(child, depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source, filename=str(path)), 0)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in internal_imports(module, path)]


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as ``[a, b, ..., a]``, or None when it has none."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    fake = tmp_path / "x.py"
    fake.write_text("from ..runs import StageRun\n\ndef f():\n    from cai.eval import gold  # lazy: a reason\n"
                    "    import cai.io\n")
    found = internal_imports("cai.stages.x", fake)
    assert [(i.target, i.in_function, i.marked_lazy) for i in found] == [
        ("cai.runs", False, False), ("cai.eval.gold", True, True), ("cai.io", True, False)]


def runtime_targets(imp: Import) -> list[str]:
    """What importing ``imp.target`` runs: the module, and first each package above it that the
    importer is not itself inside (``cai.backends.base`` runs ``cai/backends/__init__.py`` too)."""
    parts = imp.target.split(".")
    above = [".".join(parts[:n]) for n in range(2, len(parts))]
    return [p for p in above if not imp.module.startswith(p + ".")] + [imp.target]


def test_src_cai_has_no_import_cycles():
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        for target in runtime_targets(imp):
            if target != imp.module:
                edges.setdefault(imp.module, set()).add(target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_internal_import_inside_a_function_says_why_it_is_lazy():
    unmarked = list(dict.fromkeys(f"{MODULES[i.module].relative_to(ROOT.parent)}:{i.line} imports {i.target}"
                                  for i in IMPORTS if i.in_function and not i.marked_lazy))
    assert not unmarked, ("move these imports to the top of the module, or end the line with "
                          "'# lazy: <why>' (an optional dependency, or a measured slow import):\n" + "\n".join(unmarked))
