"""The notebook policy (CONTRIBUTING.md): every notebook is committed executed, in order, clean, with outputs."""

import json
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
PRIVATE = re.compile(r"(/home/\w+|/root/|/Users/\w+|/work/|/tmp/|C:\\\\Users)")


def policy_violations(notebook: dict[str, Any]) -> list[str]:
    """What is wrong with a notebook as committed: not run in order, no outputs, errors, private paths."""
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    problems = []
    counts = [c["execution_count"] for c in cells]
    if counts != list(range(1, len(cells) + 1)):
        problems.append(f"not executed top to bottom in one run (execution counts {counts}); run `make notebooks`")
    if cells and not any(c["outputs"] for c in cells):
        problems.append("committed without outputs")
    for cell in cells:
        for out in cell["outputs"]:
            if out["output_type"] == "error":
                problems.append(f"a cell raised {out.get('ename')}")
            text = json.dumps({k: v for k, v in out.items() if k != "data"}) + json.dumps(
                {k: v for k, v in out.get("data", {}).items() if k.startswith("text/")}
            )
            if match := PRIVATE.search(text):
                problems.append(f"an output shows a private path {match.group(0)!r}")
    return problems


def test_there_are_notebooks() -> None:
    assert any(p.name.startswith("00_") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_policy(path: Path) -> None:
    assert policy_violations(json.loads(path.read_text())) == []


def _notebook(*cells: Any) -> dict[str, Any]:
    return json.loads(nbformat.writes(nbformat.v4.new_notebook(cells=list(cells))))


def test_policy_catches_a_notebook_without_outputs() -> None:
    bare = _notebook(nbformat.v4.new_code_cell("1 + 1"), nbformat.v4.new_code_cell("2 + 2"))
    assert policy_violations(bare) == [
        "not executed top to bottom in one run (execution counts [None, None]); run `make notebooks`",
        "committed without outputs",
    ]


def test_policy_catches_errors_and_private_paths() -> None:
    ok = nbformat.v4.new_code_cell("x", execution_count=1, outputs=[nbformat.v4.new_output("stream", text="fine\n")])
    err = nbformat.v4.new_code_cell(
        "y", execution_count=2, outputs=[nbformat.v4.new_output("error", ename="ValueError", evalue="", traceback=[])]
    )
    path = nbformat.v4.new_code_cell(
        "z", execution_count=3, outputs=[nbformat.v4.new_output("stream", text="saved to /home/alice/x.png\n")]
    )
    assert policy_violations(_notebook(ok)) == []
    assert policy_violations(_notebook(ok, err, path)) == [
        "a cell raised ValueError",
        "an output shows a private path '/home/alice'",
    ]
