"""The paper's Figures 6 and 7 at any scale: scores per relation, generalisation vs specificity, mixed batches.

* :func:`relation_study` -- each relation's first ``n`` records edited alone, and the same
  records in one batch mixing every relation: Fig. 6 (per relation, generalisation PS against
  specificity NS; :meth:`RelationStudy.plot_figure6`), the scores per relation as bars, and
  Fig. 7 (a mixed batch scores like the average of its parts).
* :func:`tradeoff_grid` -- MEMIT on the same ``n`` records for every lambda (eq. 15) and
  every edit-layer range R: PS against NS along lambda (an ablation, not a figure of the paper).

Every edit is one :func:`memit_lab.experiments.cached_run` (restored afterwards, cached on
disk, so a study that is stopped continues where it was).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

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
        """ES, PS, NS per relation: edited alone and in the mixed batch (bars), unedited (grey ticks)."""
        summary = self.summary()
        alone = summary.xs("alone", level="condition")
        before = summary.xs("unedited", level="condition")
        conditions = sorted(set(summary.index.get_level_values("condition")) - {"unedited"})
        order = list(alone.sort_values("S").index)
        y = np.arange(len(order))
        height = 0.8 / len(conditions)
        fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(order) + 1.6), sharey=True)
        for ax, metric in zip(axes, ["ES", "PS", "NS"], strict=True):
            for i, condition in enumerate(conditions):
                part = summary.xs(condition, level="condition").loc[order, metric]
                label = "MEMIT, relation alone" if condition == "alone" else "MEMIT, mixed batch"
                ax.barh(y + (i - (len(conditions) - 1) / 2) * height, part, height=height, color=f"C{i}", label=label)
            ax.scatter(before.loc[order, metric], y, marker="|", s=200, color="grey", label="unedited", zorder=3)
            ax.set(xlim=(0, 100), title=metric, xlabel="%", yticks=y, yticklabels=order)
        axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"Scores per relation, {self.batch} edits per relation")
        fig.tight_layout()
        return fig

    def plot_figure6(self) -> Figure:
        """Figure 6: generalisation (PS) against specificity (NS), one point per relation and condition."""
        summary = self.summary()
        fig, ax = plt.subplots(figsize=(6.5, 4.6))
        styles = {"unedited": ("grey", "x"), "alone": ("C0", "o"), "mixed": ("C1", "s")}
        for condition, (color, marker) in styles.items():
            if condition not in summary.index.get_level_values("condition"):
                continue
            part = summary.xs(condition, level="condition")
            ax.scatter(part.NS, part.PS, color=color, marker=marker, label=condition, zorder=3,
                       facecolors="none" if condition == "mixed" else None, s=60)  # fmt: skip
            if condition == "alone":
                _label_points(ax, part.NS, part.PS, list(part.index))
        ax.set(xlabel="specificity NS (%)", ylabel="generalisation PS (%)", xlim=(-5, 105), ylim=(-5, 105),
               title=f"Figure 6: per relation, {self.batch} edits each")  # fmt: skip
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
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
            _label_points(ax, alone[metric], mixed.loc[alone.index, metric], list(alone.index))
            lo = min(alone[metric].min(), mixed[metric].min()) - 5
            ax.plot([lo, 100], [lo, 100], color="grey", linestyle="--", linewidth=1)
            ax.set(title=metric, xlabel="edited alone (%)", ylabel="in the mixed batch (%)")
        n_rel = len(alone)
        fig.suptitle(f"Figure 7: {n_rel} relations x {self.batch} edits mixed in one batch of {n_rel * self.batch}")
        fig.tight_layout()
        return fig


def _label_points(ax: Any, xs: Iterable[float], ys: Iterable[float], names: Iterable[str]) -> None:
    """Name each point; points on the same spot get their names stacked, not printed over each other."""
    seen: dict[tuple[float, float], int] = {}
    for x, y, name in zip(xs, ys, names, strict=True):
        k = seen.get((round(x, 6), round(y, 6)), 0)
        seen[(round(x, 6), round(y, 6))] = k + 1
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4 - 9 * k), textcoords="offset points")


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
        """Generalisation (PS) against specificity (NS) along lambda, one line per layer range (an ablation of
        eq. 14-15's lambda and of R, not a figure of the paper)."""
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        edited = self.table[self.table.layers != "unedited"]
        for i, (layers, rows) in enumerate(edited.groupby("layers", sort=False)):
            rows = rows.sort_values("lam")
            ax.plot(rows.NS, rows.PS, marker="o", color=f"C{i}", label=f"layers {layers}")
            for _, row in rows.iterrows():
                label = f"λ={row.lam:,.0f}"
                ax.annotate(label, (row.NS, row.PS), fontsize=7, xytext=(3, 3), textcoords="offset points")
        base = self.table[self.table.layers == "unedited"].iloc[0]
        ax.scatter([base.NS], [base.PS], marker="*", s=150, color="grey", label="unedited", zorder=3)
        ax.set(xlabel="specificity NS (%)", ylabel="generalisation PS (%)",
               title=f"lambda and layers: {self.n} edits")  # fmt: skip
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
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
