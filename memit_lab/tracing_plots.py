"""Pictures of causal tracing (:mod:`memit_lab.tracing`) and of the layer choice (:mod:`memit_lab.layer_choice`).

* :func:`plot_trace`: one trace as a heatmap, tokens by layers (ROME figure 1);
* :func:`plot_average_effect`: the average indirect effect per layer by token category (ROME figure 2);
* :func:`plot_recommendation`: the evidence for MEMIT's edit layers R, the chosen window shaded.

Each returns the figure.

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.tracing import trace
    >>> result = trace(load_model("tiny-gpt2"), "The Eiffel Tower is located in", "Eiffel Tower", samples=2)
    >>> fig = plot_trace(result)
    >>> fig.axes[0].get_yticklabels()[1].get_text()
    "' Eiffel'*"
    >>> plt.close(fig)
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .layer_choice import LayerRecommendation
from .tracing import AverageEffect, CausalTrace

__all__ = ["plot_average_effect", "plot_recommendation", "plot_trace"]

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_XLABEL = {
    "hidden": "single restored layer",
    "mlp": "centre of {w} restored MLP layers",
    "attn": "centre of {w} restored attention layers",
}


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.get_figure(root=True), ax  # type: ignore[return-value]  # an Axes always sits in a Figure
    fig, new_ax = plt.subplots(figsize=size)
    return fig, new_ax


def plot_trace(result: CausalTrace, ax: Axes | None = None) -> Figure:
    """Heatmap in the style of ROME's figure 1: tokens (rows, subject marked ``*``) by layers."""
    start, end = result.subject_span
    labels = [f"{tok!r}*" if start <= i < end else repr(tok) for i, tok in enumerate(result.tokens)]
    grid = pd.DataFrame(result.scores.T.numpy(), index=labels, columns=range(result.scores.shape[0]))
    fig, ax = _figure(ax, (0.16 * grid.shape[1] + 2.6, 0.3 * grid.shape[0] + 1.2))
    sns.heatmap(
        grid,
        ax=ax,
        cmap=_CMAPS[result.kind],
        vmin=min(result.corrupted_prob, float(result.scores.nan_to_num(math.inf).min())),
        cbar_kws={"label": f"P({result.target!r})"},
    )
    ax.tick_params(axis="both", labelsize=7)
    ax.set_xlabel(_XLABEL[result.kind].format(w=result.window))
    what = {"hidden": "state", "mlp": "MLP", "attn": "attention"}[result.kind]
    severed = "" if result.severed is None else f", {result.severed} severed"
    ax.set_title(f"Restoring {what} after corrupting the subject{severed}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_average_effect(effect: AverageEffect) -> Figure:
    """One panel per kind, one line per token category, as in ROME's figure 2.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> from memit_lab.tracing import average_indirect_effect
        >>> lm = load_model("tiny-llama")
        >>> avg = average_indirect_effect(lm, KNOWN_FACTS[:2], window=2, samples=1, progress=False)
        >>> fig = plot_average_effect(avg)
        >>> len(fig.axes)
        3
        >>> plt.close(fig)
    """
    frame = effect.to_frame().dropna()
    kinds = effect.kinds
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.4), sharey=True, squeeze=False)
    what = {
        "hidden": "hidden state",
        "mlp": f"MLP (window {effect.window})",
        "attn": f"attention (window {effect.window})",
    }
    for ax, kind in zip(axes[0], kinds, strict=True):
        sns.lineplot(frame[frame.kind == kind], x="layer", y="effect", hue="category", ax=ax, legend=ax is axes[0, 0])
        ax.set_title(f"restoring {what[kind]}", fontsize=9)
        ax.set_ylabel("average indirect effect")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        f"Average indirect effect over {len(effect.traces)} facts ({effect.samples} noise samples each)", fontsize=10
    )
    fig.tight_layout()
    return fig


def plot_recommendation(rec: LayerRecommendation, ax: Axes | None = None) -> Figure:
    """The evidence curve of :func:`memit_lab.layer_choice.recommend_layers`, with the chosen window shaded.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> from memit_lab.layer_choice import recommend_layers
        >>> rec = recommend_layers(load_model("tiny-gpt2"), KNOWN_FACTS[:2], n=2, samples=1, use_cache=False)
        >>> fig = plot_recommendation(rec)
        >>> fig.axes[0].get_legend().get_texts()[0].get_text() == f"R = {rec.layers[0]}-{rec.layers[-1]}"
        True
        >>> plt.close(fig)
    """
    fig, ax = _figure(ax, (6.4, 3.2))
    frame = rec.to_frame()
    ax.errorbar(frame.centre, frame.effect, yerr=frame.std_error, color="tab:green", marker="o", markersize=3)
    ax.axvspan(
        rec.layers[0] - 0.5,
        rec.layers[-1] + 0.5,
        color="tab:green",
        alpha=0.15,
        label=f"R = {rec.layers[0]}-{rec.layers[-1]}",
    )
    ax.set_xlabel(f"centre of {rec.n} restored MLP layers (last subject token)")
    ax.set_ylabel("average indirect effect")
    ax.set_title(f"Where the facts are written: {rec.per_fact.shape[0]} facts, {rec.samples} noise samples", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
