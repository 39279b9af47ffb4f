"""Build the course assignments: one master script per assignment -> a solution and a student notebook.

A master (``notebooks/assignments/masters/NN_name.py``) is a Python script cut into cells by
``# %%`` lines, in the spirit of jupytext's percent format::

    # %% [markdown]           a text cell (each line starts with "# ")
    # %%                      lecture code (locked: students cannot change it)
    # %% setup                the imports every exercise needs (locked)
    # %% solution             an exercise: a typed function whose body sits between
                              ### BEGIN SOLUTION and ### END SOLUTION
    # %% check points=2       a graded check cell: one line, course.check_name(function)
                              (``course = memit_lab.checks.Course()`` in the setup cell)
    # %% ... ignore-output    any cell: its output varies by run (nbval does not compare it)

From it this script writes

* ``solutions/NN_name.ipynb``: every cell as written, solution markers kept, with nbgrader
  cell metadata (solution cells, locked cells, graded checks with points). It is the
  nbgrader *source* notebook: ``nbgrader generate_assignment`` turns it into the release.
* ``student/NN_name.ipynb``: the same, each solution region replaced by nbgrader's own stub
  (``# YOUR CODE HERE`` / ``raise NotImplementedError()``), and each check called with
  ``pending_ok=True`` so that the notebook runs top to bottom with open exercises (the
  check reports "not implemented yet" instead of raising). Self-study copy; for graded work
  use nbgrader's release, whose checks raise on a stub.

Usage::

    python scripts/build_assignments.py            # write both versions of every assignment
    python scripts/build_assignments.py --execute  # ... and execute them in place (outputs committed)
    python scripts/build_assignments.py --check    # exit 1 if a committed notebook drifted from its master
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "notebooks" / "assignments"
MASTERS = ASSIGNMENTS / "masters"
VERSIONS = ("solutions", "student")

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
# nbgrader's ClearSolutions.code_stub["python"], so our student version matches its release
CODE_STUB = "# YOUR CODE HERE\nraise NotImplementedError()"
CHECK_CALL = re.compile(r"^course\.(check_\w+)\((\w+)\)$")
HEADER = re.compile(r"^# %%(.*)$")
NOTES = {
    "solutions": "*Solution version, also the nbgrader source notebook: `nbgrader generate_assignment` makes the "
    "student release from it (see `notebooks/assignments/README.md`).*",
    "student": "*Student version: fill in each cell marked `# YOUR CODE HERE`, run it, then run the check below it. "
    "A check reports `not implemented yet` until your function returns an answer, then tells you whether it is right "
    "and, if not, what it expected, what it got and a hint.*",
}
KERNEL = {"display_name": "Python 3", "language": "python", "name": "python3"}


@dataclass(frozen=True)
class Cell:
    """One cell of a master: its kind, source, grade id, points and whether its output varies."""

    kind: str  # markdown | code | setup | solution | check
    source: str
    grade_id: str
    points: int = 0
    ignore_output: bool = False


def _markdown(lines: list[str]) -> str:
    text = [line[2:] if line.startswith("# ") else line.removeprefix("#") for line in lines]
    return "\n".join(text).strip("\n")


def _grade_id(kind: str, source: str, index: int, attrs: dict[str, str]) -> str:
    if "id" in attrs:
        return attrs["id"]
    if kind == "solution" and (match := re.search(r"^def (\w+)", source, re.M)):
        return match.group(1)
    if kind == "check" and (match := CHECK_CALL.match(source)):
        return match.group(1)
    return f"{kind}-{index:02d}"


def parse_master(path: Path) -> list[Cell]:
    """The cells of a master script, checked: solutions have markers, checks are one call with points."""
    chunks: list[tuple[str, list[str]]] = []
    for line in path.read_text().splitlines():
        if match := HEADER.match(line):
            chunks.append((match.group(1).strip(), []))
        elif chunks:
            chunks[-1][1].append(line)
        elif line.strip():
            raise ValueError(f"{path.name}: text before the first '# %%' cell marker: {line!r}")
    cells = []
    for index, (header, lines) in enumerate(chunks):
        words = header.split()
        flags = {w for w in words if "=" not in w}
        attrs = dict(w.split("=", 1) for w in words if "=" in w)
        kind = (
            "markdown"
            if "[markdown]" in flags
            else next((k for k in ("setup", "solution", "check") if k in flags), "code")
        )
        unknown = flags - {"[markdown]", "setup", "solution", "check", "ignore-output"}
        if unknown or set(attrs) - {"id", "points"}:
            raise ValueError(f"{path.name}, cell {index}: unknown cell options {sorted(unknown) + sorted(attrs)}")
        source = _markdown(lines) if kind == "markdown" else "\n".join(lines).strip("\n")
        cell = Cell(
            kind, source, _grade_id(kind, source, index, attrs), int(attrs.get("points", 0)), "ignore-output" in flags
        )
        _validate(path, cell)
        cells.append(cell)
    ids = [c.grade_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path.name}: grade ids repeat: {sorted({i for i in ids if ids.count(i) > 1})}")
    return cells


def _validate(path: Path, cell: Cell) -> None:
    where = f"{path.name}, cell {cell.grade_id!r}"
    if cell.kind == "solution" and (cell.source.count(BEGIN) != 1 or cell.source.count(END) != 1):
        raise ValueError(f"{where}: a solution cell needs exactly one {BEGIN} ... {END} region")
    if cell.kind == "check" and (not CHECK_CALL.match(cell.source) or cell.points <= 0):
        raise ValueError(f"{where}: a check cell is one line `course.check_name(function)` with points=N (N > 0)")
    if cell.kind != "check" and cell.points:
        raise ValueError(f"{where}: only check cells carry points")


def _student_source(cell: Cell) -> str:
    if cell.kind == "check":
        return CHECK_CALL.sub(r"course.\1(\2, pending_ok=True)", cell.source)
    if cell.kind != "solution":
        return cell.source
    lines, out, inside = cell.source.split("\n"), [], False
    for line in lines:
        if BEGIN in line:
            indent = line[: len(line) - len(line.lstrip())]
            out += [indent + stub for stub in CODE_STUB.split("\n")]
            inside = True
        elif END in line:
            inside = False
        elif not inside:
            out.append(line)
    return "\n".join(out)


def _nbgrader(cell: Cell) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "grade": cell.kind == "check",
        "grade_id": cell.grade_id,
        "locked": cell.kind != "solution",
        "schema_version": 3,
        "solution": cell.kind == "solution",
        "task": False,
    }
    if cell.kind == "check":
        meta["points"] = cell.points
    return meta


def build_notebook(cells: list[Cell], version: str) -> nbformat.NotebookNode:
    """The ``version`` ("solutions" or "student") of an assignment, unexecuted."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    nb_cells = []
    first_markdown = True
    for cell in cells:
        metadata: dict[str, Any] = {"nbgrader": _nbgrader(cell)}
        if cell.ignore_output:
            metadata["tags"] = ["nbval-ignore-output"]
        cell_id = re.sub(r"[^A-Za-z0-9_-]", "-", cell.grade_id)[:64]
        if cell.kind == "markdown":
            source = cell.source + (f"\n\n{NOTES[version]}" if first_markdown else "")
            first_markdown = False
            nb_cells.append(nbformat.v4.new_markdown_cell(source, metadata=metadata, id=cell_id))
        else:
            source = cell.source if version == "solutions" else _student_source(cell)
            nb_cells.append(nbformat.v4.new_code_cell(source, metadata=metadata, id=cell_id))
    language = {"name": "python", "version": "3.11", "mimetype": "text/x-python", "file_extension": ".py"}
    return nbformat.v4.new_notebook(cells=nb_cells, metadata={"kernelspec": KERNEL, "language_info": language})


def masters() -> list[Path]:
    return sorted(MASTERS.glob("[0-9][0-9]_*.py"))


def notebook_path(master: Path, version: str) -> Path:
    return ASSIGNMENTS / version / f"{master.stem}.ipynb"


def _sources(nb: nbformat.NotebookNode) -> list[tuple[str, str, Any]]:
    return [(c.cell_type, c.source, c.metadata.get("nbgrader")) for c in nb.cells]


def drifted(master: Path) -> list[str]:
    """Which committed notebooks of ``master`` differ from what it generates (cell types, sources, metadata)."""
    cells = parse_master(master)
    problems = []
    for version in VERSIONS:
        path = notebook_path(master, version)
        if not path.exists():
            problems.append(f"{path.relative_to(ROOT)} is missing")
        elif _sources(nbformat.read(path, as_version=4)) != _sources(build_notebook(cells, version)):
            problems.append(f"{path.relative_to(ROOT)} differs from {master.relative_to(ROOT)}")
    return problems


def execute(path: Path, timeout: int = 600) -> float:
    """Run a notebook top to bottom in its folder and save it with outputs; returns the seconds it took."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def exercise_namespace(master: Path, version: str = "solutions") -> dict[str, Any]:
    """The exercise functions of a master, defined as in ``version`` (setup and solution cells only).

    Runs the setup cell (imports) and every solution cell -- with the student's stubs for
    ``version="student"`` -- in a fresh namespace; the lecture cells, which load models and
    draw plots, are not run.
    """
    namespace: dict[str, Any] = {"__name__": f"assignment_{master.stem}"}
    for cell in parse_master(master):
        if cell.kind in ("setup", "solution"):
            source = cell.source if version == "solutions" else _student_source(cell)
            exec(compile(source, f"{master.name}:{cell.grade_id}", "exec"), namespace)
    return namespace


def checks_of(master: Path) -> list[tuple[str, str, int]]:
    """(check name, function name, points) for each graded check cell of a master."""
    found = []
    for cell in parse_master(master):
        if cell.kind == "check" and (match := CHECK_CALL.match(cell.source)):
            found.append((match.group(1), match.group(2), cell.points))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="master names (stems) to build; default: all")
    parser.add_argument("--execute", action="store_true", help="execute the notebooks in place after writing them")
    parser.add_argument("--check", action="store_true", help="only report notebooks that drifted from their master")
    args = parser.parse_args(argv)
    chosen = [m for m in masters() if not args.names or m.stem in args.names]
    if args.check:
        problems = [p for m in chosen for p in drifted(m)]
        print("\n".join(problems) or f"{len(chosen)} assignments in sync with their masters")
        return 1 if problems else 0
    for master in chosen:
        cells = parse_master(master)
        for version in VERSIONS:
            path = notebook_path(master, version)
            path.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(build_notebook(cells, version), path)
            note = f"executed in {execute(path):.1f} s" if args.execute else "written"
            print(f"{path.relative_to(ROOT)}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
