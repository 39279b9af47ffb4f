"""The notebook policy (CONTRIBUTING.md): every notebook is committed executed, in order, clean, with outputs."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "notebooks").rglob("*.ipynb")
    if ".ipynb_checkpoints" not in p.parts
)
PRIVATE = re.compile(r"(/home/\w+|/root/|/Users/\w+|/work/|/tmp/|C:\\\\Users)")


def _code_cells(path: Path) -> list[dict]:  # type: ignore[type-arg]
    return [
        c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()
    ]


def test_there_are_notebooks() -> None:
    assert any(p.name.startswith("00_") for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path: Path) -> None:
    cells = _code_cells(path)
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: run it top to bottom (make notebooks); counts {counts}"
    )
    assert any(c["outputs"] for c in cells), f"{path.name} has no outputs"
    for cell in cells:
        for out in cell["outputs"]:
            assert out["output_type"] != "error", f"{path.name}: a cell raised {out.get('ename')}"
            text = json.dumps({k: v for k, v in out.items() if k != "data"}) + json.dumps(
                {k: v for k, v in out.get("data", {}).items() if k.startswith("text/")}
            )
            assert not PRIVATE.search(text), f"{path.name}: an output shows a private path: {PRIVATE.search(text)}"
