"""Seaborn pictures of :mod:`memit_lab.residual`: the logit-lens heatmap and the attribution bar chart.

Each function returns the figure and the DataFrame it drew, so a notebook or an
assignment can reuse the numbers (or redraw them their own way).

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.residual import logit_lens, run_with_cache
    >>> lm = load_model("tiny-gpt2")
    >>> lens = logit_lens(lm, run_with_cache(lm, "The capital of France is"), "Paris")
    >>> fig, frame = plot_logit_lens(lens)
    >>> len(frame) == len(lens.labels) * len(lens.tokens)
    True
    >>> plt.close(fig)
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .residual import LogitAttribution, LogitLens

__all__ = ["plot_attribution", "plot_logit_lens", "token_label"]


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.get_figure(root=True), ax  # type: ignore[return-value]  # an Axes always sits in a Figure
    fig, new_ax = plt.subplots(figsize=size)
    return fig, new_ax


def token_label(token: str, width: int = 8) -> str:
    """A token as a heatmap cell shows it: spaces as ``␣`` and escapes visible, cut to ``width`` characters.

    Example:
        >>> token_label(" the"), token_label("\\n"), token_label(" Constantinople")
        ('␣the', '\\\\n', '␣Constan')
    """
    return repr(token)[1:-1].replace(" ", "\u2423")[:width]


def plot_logit_lens(
    lens: LogitLens,
    *,
    value: str = "target_prob",
    annotate: bool = True,
    subject: tuple[int, int] | None = None,
    ax: Axes | None = None,
) -> tuple[Figure, pd.DataFrame]:
    """Heatmap of the logit lens: states h^L (rows) by prompt tokens (columns).

    The colour scale is logarithmic (1e-4 to 1): P(target) is below 1e-2 in most cells, where a linear
    scale would leave them all white.

    Args:
        lens: from :func:`memit_lab.residual.logit_lens`.
        value: the colour: ``"target_prob"`` (P of the target) or ``"top_prob"``.
        annotate: write each cell's top-1 token in it (:func:`token_label`: ``␣`` is a space).
        subject: ``(start, end)`` token positions of the subject (end exclusive): framed, their labels in red.
        ax: draw into these axes instead of a new figure.

    Returns:
        the figure and ``lens.to_frame()`` (one row per state and position).
    """
    if value not in ("target_prob", "top_prob"):
        raise ValueError(f"value must be 'target_prob' or 'top_prob', got {value!r}")
    frame = lens.to_frame()
    columns = [f"{pos}:{token_label(token, 12)}" for pos, token in enumerate(lens.tokens)]
    grid = frame.pivot(index="layer", columns="pos", values=value)
    grid.index, grid.columns = list(lens.labels), columns
    fig, ax = _figure(ax, (1.0 * len(columns) + 2.5, 0.32 * len(lens.labels) + 1.8))
    annot = frame.pivot(index="layer", columns="pos", values="top_token").map(token_label)
    sns.heatmap(
        grid.clip(lower=1e-4),
        ax=ax,
        norm=LogNorm(vmin=1e-4, vmax=1.0),
        cmap="viridis",
        annot=annot.to_numpy() if annotate else False,
        fmt="",
        annot_kws={"fontsize": 7},
        cbar_kws={"label": ("P(target)" if value == "target_prob" else "P(top-1 token)") + ", log scale"},
    )
    ax.invert_yaxis()  # h0 at the bottom: the stream flows upwards, as in the paper's figures
    if subject is not None:
        start, end = subject
        ax.add_patch(Rectangle((start, 0), end - start, len(lens.labels), fill=False, edgecolor="red", linewidth=2))
        for pos, label in enumerate(ax.get_xticklabels()):
            if start <= pos < end:
                label.set_color("red")
    ax.set_xlabel("position: token" + ("   (red: the subject)" if subject is not None else ""))
    ax.set_ylabel("residual state (after L blocks)")
    ax.set_title(f"Logit lens: top-1 token in each cell (␣ = space), colour = P({lens.target!r})")
    fig.tight_layout()
    return fig, frame


def plot_attribution(attr: LogitAttribution, *, ax: Axes | None = None) -> tuple[Figure, pd.DataFrame]:
    """Bar chart of direct logit attribution: one bar per attention and MLP output, by block.

    Returns:
        the figure and ``attr.to_frame()`` (one row per component).
    """
    frame = attr.to_frame()
    drawn = frame.assign(block=frame.block.map(lambda b: "emb" if b < 0 else str(b)))
    fig, ax = _figure(ax, (min(14.0, max(6.0, 0.22 * len(frame))), 3.6))
    sns.barplot(drawn, x="block", y="attribution", hue="kind", ax=ax, palette="deep")
    ax.axhline(0.0, color="black", linewidth=0.6)
    quantity = "logit - mean logit" if attr.centred else "logit"
    ax.set_ylabel(f"direct effect on {quantity}")
    ax.set_xlabel("block")
    ax.set_title(f"Direct logit attribution of {attr.target!r} at position {attr.pos} ({attr.token!r})")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    return fig, frame
