"""The paper's Figures 6 and 7 at any scale: scores per relation, generalisation vs specificity, mixed batches.

* :func:`relation_study` -- each relation's first ``n`` records edited alone (Fig. 6a:
  which relations MEMIT writes well), and the same records in one batch mixing every
  relation (Fig. 7: a mixed batch scores like the average of its parts).
* :func:`tradeoff_grid` -- MEMIT on the same ``n`` records for every lambda (eq. 15) and
  every edit-layer range R (Fig. 6b: generalisation PS against specificity NS).

Every edit is one :func:`memit_lab.experiments.cached_run` (restored afterwards, cached on
disk, so a study that is stopped continues where it was).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .datasets import CounterFactRecord
from .evaluate import counterfact_summary
from .experiments import TargetPool, cached_run, default_hparams
from .hparams import MemitHyperParams
from .models import LoadedModel

__all__ = ["RelationStudy", "Tradeoff", "interleave", "relation_study", "tradeoff_grid"]

_SCORES = ["S", "ES", "PS", "NS"]
T = TypeVar("T")


def interleave(groups: Sequence[Sequence[T]]) -> list[T]:
    """One record of each group in turn (a mixed batch whose every prefix mixes the groups).

    Example:
        >>> interleave([[1, 2, 3], ["a"]])
        [1, 'a', 2, 3]
    """
    out: list[T] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


@dataclass(frozen=True)
class RelationStudy:
    """Per-record scores of each relation edited alone and of all relations mixed in one batch.

    Attributes:
        frame: one row per (condition, record): ``condition`` is ``"unedited"``, ``"alone"``
            (its relation's batch) or ``"mixed"`` (the batch of every relation); ``relation_id``,
            ``es ps ns em pm nm``.
        batch: records per relation in each batch.
    """

    frame: pd.DataFrame
    batch: int

    def summary(self) -> pd.DataFrame:
        """S, ES, PS, NS (x 100) per relation and condition; rows ``(relation, condition)``."""
        rows = {
            key: counterfact_summary(part)[_SCORES]
            for key, part in self.frame.groupby(["relation_id", "condition"], sort=True)
        }
        table = pd.DataFrame(rows).T
        table.index.names = ["relation", "condition"]
        return table

    def plot_relations(self) -> Figure:
        """Figure 6a: ES, PS, NS per relation, each relation edited alone; unedited as grey ticks."""
        summary = self.summary()
        alone = summary.xs("alone", level="condition")
        before = summary.xs("unedited", level="condition")
        order = alone.sort_values("S").index
        fig, axes = plt.subplots(1, 3, figsize=(12, 0.35 * len(order) + 1.5), sharey=True)
        for ax, metric in zip(axes, ["ES", "PS", "NS"], strict=True):
            ax.barh(order, alone.loc[order, metric], color="C0", label="MEMIT, relation alone")
            ax.scatter(before.loc[order, metric], order, marker="|", s=200, color="grey", label="unedited")
            ax.set(xlim=(0, 100), title=metric, xlabel="%")
        axes[0].legend(fontsize="small", loc="lower left")
        fig.suptitle(f"Figure 6a: {self.batch} edits per relation, each relation in its own batch")
        fig.tight_layout()
        return fig

    def plot_mixed(self) -> Figure:
        """Figure 7: each relation's score in the mixed batch against its score edited alone."""
        summary = self.summary()
        alone = summary.xs("alone", level="condition")
        mixed = summary.xs("mixed", level="condition")
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.6))
        for ax, metric in zip(axes, ["ES", "PS", "NS"], strict=True):
            ax.scatter(alone[metric], mixed.loc[alone.index, metric])
            for name in alone.index:
                ax.annotate(name, (alone.loc[name, metric], mixed.loc[name, metric]), fontsize=7)
            lo = min(alone[metric].min(), mixed[metric].min()) - 5
            ax.plot([lo, 100], [lo, 100], color="grey", linestyle="--", linewidth=1)
            ax.set(title=metric, xlabel="edited alone (%)", ylabel="in the mixed batch (%)")
        n_rel = len(alone)
        fig.suptitle(f"Figure 7: {n_rel} relations x {self.batch} edits mixed in one batch of {n_rel * self.batch}")
        fig.tight_layout()
        return fig


def relation_study(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    relations: Sequence[str],
    n: int,
    *,
    hparams: MemitHyperParams | None = None,
    mixed: bool = True,
    cache: bool = True,
    progress: bool = True,
) -> RelationStudy:
    """Each relation's first ``n`` records edited alone with MEMIT, then (``mixed``) all of them in one batch.

    Raises:
        ValueError: a relation has fewer than ``n`` records in ``records`` (nothing is edited).
    """
    groups = {r: [x for x in records if x.relation_id == r][:n] for r in relations}
    short = {r: len(g) for r, g in groups.items() if len(g) < n}
    if short or n < 1:
        raise ValueError(f"need n >= 1 records of every relation; these have fewer than n={n}: {short}")
    hparams = hparams or default_hparams(lm, "memit")
    everything = interleave(list(groups.values()))
    runs = [("alone", g) for g in groups.values()] + ([("mixed", everything)] if mixed else [])
    pool = TargetPool(lm, everything, hparams.z)  # alone or mixed, a request's z is the same
    frames = [cached_run(lm, everything, "unedited", cache=cache).assign(condition="unedited")]
    for condition, batch in tqdm(runs, desc="relation study", disable=not progress):
        shared = pool.lazy(batch, hparams.layers[-1])
        frame = cached_run(lm, batch, "memit", hparams=hparams, targets=shared, cache=cache)
        frames.append(frame.assign(condition=condition))
    return RelationStudy(pd.concat(frames, ignore_index=True), n)


@dataclass(frozen=True)
class Tradeoff:
    """Table-2 scores of MEMIT for every (lambda, layer range) on the same records, and the unedited model.

    Attributes:
        table: one row per run: ``lam``, ``layers`` (e.g. ``"3-7"``), S, ES, PS, NS, EM, PM, NM;
            the unedited model has ``lam`` NaN and ``layers`` ``"unedited"``.
        n: edits per run.
    """

    table: pd.DataFrame
    n: int

    def plot(self) -> Figure:
        """Figure 6b: generalisation (PS) against specificity (NS), one line per layer range along lambda."""
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        edited = self.table[self.table.layers != "unedited"]
        for i, (layers, rows) in enumerate(edited.groupby("layers", sort=False)):
            rows = rows.sort_values("lam")
            ax.plot(rows.NS, rows.PS, marker="o", color=f"C{i}", label=f"layers {layers}")
            for _, row in rows.iterrows():
                ax.annotate(f"{row.lam:.0e}", (row.NS, row.PS), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = self.table[self.table.layers == "unedited"].iloc[0]
        ax.scatter([base.NS], [base.PS], marker="*", s=150, color="grey", label="unedited", zorder=3)
        ax.set(xlabel="specificity NS (%)", ylabel="generalisation PS (%)",
               title=f"Figure 6b: {self.n} edits, lambda and layers varied")  # fmt: skip
        ax.legend(fontsize="small")
        fig.tight_layout()
        return fig


def _span(layers: Sequence[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def tradeoff_grid(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    lams: Sequence[float],
    layer_ranges: Sequence[Sequence[int]],
    *,
    hparams: MemitHyperParams | None = None,
    cache: bool = True,
    progress: bool = True,
) -> Tradeoff:
    """MEMIT on all ``records`` for every lambda x layer range (Fig. 6b); other settings from ``hparams``."""
    base = hparams or default_hparams(lm, "memit")
    grid = [(float(lam), tuple(layers)) for layers in layer_ranges for lam in lams]
    unedited = cached_run(lm, records, "unedited", cache=cache)
    rows = [{"lam": np.nan, "layers": "unedited", **counterfact_summary(unedited).to_dict()}]
    pool = TargetPool(lm, records, base.z)  # z depends on the top layer only, not on lambda or the lower layers
    for lam, layers in tqdm(grid, desc="lambda x layers", disable=not progress):
        shared = pool.lazy(records, layers[-1])
        frame = cached_run(
            lm, records, "memit", hparams=base.replace(lam=lam, layers=layers), targets=shared, cache=cache
        )
        rows.append({"lam": lam, "layers": _span(layers), **counterfact_summary(frame).to_dict()})
    return Tradeoff(pd.DataFrame(rows), len(records))
