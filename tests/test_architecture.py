"""The package's shape: the floors of memit_lab/__init__.py, imports pointing down them, no cycle, short functions.

Imports are read from the source (every ``import`` statement, inside functions too), so a
lazy import cannot hide a cycle.
"""

import ast
import re
from pathlib import Path

import memit_lab

PACKAGE = Path(memit_lab.__file__).parent
MAX_BODY_LINES = 60


def _unit(path: Path) -> str:
    """``memit_lab/x.py`` -> ``x``; a sub-package (``memit_lab/checks/...``) counts as one unit."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _sources() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _imported_units(path: Path, tree: ast.Module) -> set[str]:
    """The package's units ``path`` imports, wherever the import statement stands."""
    here = path.relative_to(PACKAGE).parent.parts
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's own folder
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                parts = base + (node.module.split(".") if node.module else [])
                names = [parts] if node.module else [[*base, alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "memit_lab":
                parts = node.module.split(".")[1:]
                names = [parts] if parts else [[alias.name] for alias in node.names]
            else:
                continue
            found.update(p[0] for p in names if p)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "memit_lab" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path, tree in _sources().items():
        unit = _unit(path)
        if unit == "__init__":
            continue
        graph.setdefault(unit, set()).update(u for u in _imported_units(path, tree) if u != unit)
    return graph


def _floors() -> dict[str, int]:
    """Module -> floor, from the numbered lines of memit_lab/__init__.py's docstring."""
    floors: dict[str, int] = {}
    for number, modules in re.findall(r"^(\d)\. [^:\n]+: (.+)$", memit_lab.__doc__ or "", re.MULTILINE):
        for name in re.findall(r"\w+", modules):
            floors[name] = int(number)
    return floors


def test_every_module_stands_on_one_floor() -> None:
    floors, units = _floors(), set(_graph())
    assert set(floors.values()) == {1, 2, 3, 4}
    assert units == set(floors), f"not on a floor: {sorted(units - set(floors))}; gone: {sorted(set(floors) - units)}"


def test_imports_point_down_the_floors() -> None:
    floors = _floors()
    upward = [
        f"{unit} (floor {floors[unit]}) imports {dep} (floor {floors[dep]})"
        for unit, deps in _graph().items()
        for dep in deps
        if floors[dep] > floors[unit]
    ]
    assert not upward, upward


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (``[a, b, a]``), or ``None`` (depth-first search)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(unit: str) -> list[str] | None:
        state[unit] = "open"
        path.append(unit)
        for dep in sorted(graph.get(unit, ())):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            found = visit(dep) if dep not in state else None
            if found:
                return found
        path.pop()
        state[unit] = "done"
        return None

    for unit in sorted(graph):
        found = visit(unit) if unit not in state else None
        if found:
            return found
    return None


def test_the_import_graph_has_no_cycle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_reader_sees_lazy_imports_and_the_search_finds_cycles() -> None:
    lazy = "def f():\n    from .memit import apply_memit\n    import memit_lab.rome as r\n"
    assert _imported_units(PACKAGE / "finetune.py", ast.parse(lazy)) == {"memit", "rome"}
    assert _imported_units(PACKAGE / "checks" / "x.py", ast.parse("from ..hooks import Trace")) == {"hooks"}
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1 if body and body[-1].end_lineno else 0


def test_no_function_body_is_over_sixty_lines() -> None:
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({_body_lines(node)} lines)"
        for path, tree in _sources().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _body_lines(node) > MAX_BODY_LINES
    ]
    assert not long, long
