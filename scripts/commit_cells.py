"""Re-execute notebooks 04-06 on an empty cache and commit the edit runs they compute (memit_lab/data/cells).

    python scripts/commit_cells.py            # about 13 minutes on two cores

Notebooks 04-06 read their sweeps (Figure 5, Table 1, the relation study, the trade-off grid) through
memit_lab.experiments.cached_run. Computed on a fresh clone, those runs are most of what `make test` would
spend; committed, a fresh clone reads them, and each notebook re-runs one of them live and shows that the
two agree. This script computes them from nothing (a cache with no edit runs in it, committed cells switched off,
the ``small`` plan), executes the three notebooks in place with those runs, then replaces memit_lab/data/cells
with exactly the cells the notebooks read. Run it whenever the notebooks' plan, the fact set or a method's
defaults change (a changed key is otherwise computed again on every fresh clone, correctly but slowly).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("04_multi_layer_update", "05_mass_editing", "06_tradeoffs")
CELLS = ROOT / "memit_lab" / "data" / "cells"


def main() -> None:
    from memit_lab import load_model
    from memit_lab.cache import cache_root

    # The model copy, the statistics and the contexts come from the usual cache (converted here first: in a
    # notebook the conversion's progress bars would land in the committed outputs); only the edit runs start empty.
    load_model("smollm2-135m")
    with tempfile.TemporaryDirectory(prefix="memit_lab_cells_") as cache:
        for part in ("models", "stats", "contexts", "tracing"):
            (cache_root() / part).mkdir(exist_ok=True)
            (Path(cache) / part).symlink_to(cache_root() / part)
        env = {**os.environ, "MEMIT_LAB_CACHE": cache, "MEMIT_LAB_COMMITTED_CELLS": "0", "MEMIT_LAB_SCALE": "small"}
        for name in NOTEBOOKS:
            start = time.perf_counter()
            path = ROOT / "notebooks" / f"{name}.ipynb"
            subprocess.run(
                [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                 "--ExecutePreprocessor.timeout=3600", str(path)],
                check=True, env=env,
            )  # fmt: skip
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        runs = (Path(cache) / "experiments").iterdir()
        computed = sorted(p for p in runs if p.is_dir() and not p.name.startswith("."))
        if CELLS.exists():
            shutil.rmtree(CELLS)
        CELLS.mkdir(parents=True)
        for folder in computed:
            shutil.copytree(folder, CELLS / folder.name)
    size = sum(f.stat().st_size for f in CELLS.rglob("*") if f.is_file())
    print(f"{len(computed)} cells, {size / 1024:.0f} KiB, in {CELLS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
