"""Run the paper's experiments on the bundled model and write tables (CSV, markdown) and figures (PNG) to results/.

    MEMIT_LAB_SCALE=full python scripts/reproduce.py        # what `make reproduce` runs (hours on a CPU)
    python scripts/reproduce.py --scale medium              # up to 100 edits per method (under an hour)
    python scripts/reproduce.py --scale small               # the notebooks' CI sizes (minutes)

Sizes come from memit_lab.experiments.PLANS. Every edit run is cached on disk, so a run that is
stopped continues where it was, and notebooks 05-07 read the same cache. results/README.md records
the scale, the sizes, the wall time of each step and the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pandas as pd
import torch

from memit_lab import load_model
from memit_lab.datasets import load_factset
from memit_lab.evaluate import zsre_summary
from memit_lab.experiments import PLANS, SCALES, cached_run, question_slice, scale, scaling_sweep
from memit_lab.limitations import TWO_WAY_FACTS, direction_scores, forward_requests, inverse_requests
from memit_lab.methods import edits_applied
from memit_lab.tradeoffs import relation_study, tradeoff_grid


def markdown(table: pd.DataFrame) -> str:
    """A pipe table of ``table`` (index included), numbers to one decimal."""
    frame = table.reset_index()
    cells = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * frame.shape[1]]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def _write(table: pd.DataFrame, out: Path, name: str, note: str) -> str:
    table.to_csv(out / f"{name}.csv")
    text = f"### {name}\n\n{note}\n\n{markdown(table)}\n"
    (out / f"{name}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=SCALES, default=None, help="default: MEMIT_LAB_SCALE, else small")
    parser.add_argument("--out", default="results", help="folder for tables and figures")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    plan = PLANS[args.scale or scale()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device=args.device)
    records = load_factset(known=True)
    sections: list[str] = []
    times: dict[str, float] = {}

    def step(name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr)
        sections.append(fn())
        times[name] = time.perf_counter() - start

    def fig5_table2() -> str:
        sweep = scaling_sweep(lm, records, plan.sweep_ns, plan.methods, generation=plan.generation)
        sweep.plot().savefig(out / "fig5_scaling.png", dpi=130, bbox_inches="tight")
        sweep.summary().to_csv(out / "fig5_scaling.csv", index=False)
        seconds = sweep.seconds.pivot(index="n", columns="method", values="edit_seconds")
        n = max(plan.sweep_ns)
        return _write(sweep.table(), out, "table2_counterfact",
                      f"Table 2 at n = {n} known facts edited together (ROME: in sequence); GE on the first "
                      f"{plan.generation}. Edit wall time (s) per n:\n\n{markdown(seconds)}")  # fmt: skip

    def table1() -> str:
        questions = question_slice(records, n=plan.table1_n)
        table = pd.DataFrame({m: zsre_summary(cached_run(lm, questions, m)) for m in ("unedited", *plan.methods)}).T
        return _write(table, out, "table1_zsre_style", f"Table 1 on {len(questions)} question-form records.")

    def fig6a_fig7() -> str:
        study = relation_study(lm, records, plan.relations, plan.per_relation)
        study.plot_relations().savefig(out / "fig6a_relations.png", dpi=130, bbox_inches="tight")
        study.plot_figure6().savefig(out / "fig6_relations_tradeoff.png", dpi=130, bbox_inches="tight")
        study.plot_mixed().savefig(out / "fig7_mixed.png", dpi=130, bbox_inches="tight")
        return _write(study.summary(), out, "fig6a_fig7_relations",
                      f"MEMIT, {plan.per_relation} edits per relation, alone and all mixed in one batch.")  # fmt: skip

    def fig6b() -> str:
        grid = tradeoff_grid(lm, records[: plan.tradeoff_n], plan.lams, plan.layer_ranges)
        grid.plot().savefig(out / "fig6b_tradeoff.png", dpi=130, bbox_inches="tight")
        return _write(grid.table.set_index(["layers", "lam"]), out, "fig6b_tradeoff",
                      f"MEMIT on {plan.tradeoff_n} edits for every lambda and layer range.")  # fmt: skip

    def limitations() -> str:
        runs = {"unedited": direction_scores(lm, TWO_WAY_FACTS)}
        for name, requests in (("forward edited", forward_requests), ("inverse edited", inverse_requests)):
            with edits_applied(lm, requests(TWO_WAY_FACTS)):
                runs[name] = direction_scores(lm, TWO_WAY_FACTS)
        table = pd.DataFrame(
            {name: 100 * f[["forward_hit", "inverse_hit"]].mean() for name, f in runs.items()}
        ).T.rename(columns={"forward_hit": "forward hit %", "inverse_hit": "inverse hit %"})
        note = "Twelve two-way facts (6 CEOs, 6 moved capitals), multiple choice among 6 (chance 17 %)."
        return _write(table, out, "limitations_directed", note)

    step("Figure 5 and Table 2", fig5_table2)
    step("Table 1", table1)
    step("Figures 6a and 7", fig6a_fig7)
    step("Figure 6b", fig6b)
    step("limitations", limitations)
    timing = markdown(pd.Series(times, name="wall seconds").rename_axis("step").to_frame())
    readme = (
        f"# Results: the paper's experiments on SmolLM2-135M (scale `{plan.scale}`)\n\n"
        f"Written by `scripts/reproduce.py` (`make reproduce`; `MEMIT_LAB_SCALE` = small, medium or full). "
        f"Sizes: {plan}.\n\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"device {args.device}; wall times include everything else running on the machine. Edit runs already in "
        f"the cache (from the notebooks or an interrupted run) are read, not recomputed: a step's time counts only "
        f"what this run computed, the edit times in the tables are those of the runs themselves.\n\n{timing}\n\n"
        + "\n".join(sections)
    )
    (out / "README.md").write_text(readme)
    print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
