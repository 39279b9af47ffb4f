"""What the explorers of :mod:`memit_lab.widgets` show: the views (data only) and the HTML each panel renders of them.

A view is a small frozen dataclass with ``.to_frame()`` (and ``.plot()`` where there is a
picture): :class:`TraceView`, :class:`EditView`, :class:`UndoView`, :class:`LensView`, or a
:class:`Message` when the input cannot be used. The HTML lives in one function per view
(:func:`render_trace`, :func:`render_edit`, :func:`render_undo`, :func:`render_lens`,
:func:`render_message`); :func:`render` picks the right one, which is what the panels call.

Example:
    >>> render(Message("Type a prompt first."))
    '<div class="memit-message-error" style="color:#b00020">Type a prompt first.</div>'
    >>> layer_text((3, 4, 5)), layer_text((3, 5))
    ('3-5', '3,5')
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd
from matplotlib.figure import Figure

from .residual import LogitAttribution, LogitLens
from .residual_plots import plot_attribution, plot_logit_lens
from .tracing import CausalTrace
from .tracing_plots import plot_trace

__all__ = [
    "EditView",
    "FactEdit",
    "LensView",
    "Message",
    "TraceView",
    "UndoView",
    "View",
    "layer_text",
    "render",
    "render_edit",
    "render_lens",
    "render_message",
    "render_trace",
    "render_undo",
]


# -- the views --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """What a panel says instead of a result: bad input (``"error"``) or a note (``"info"``)."""

    text: str
    level: Literal["error", "info"] = "error"


@dataclass(frozen=True)
class TraceView:
    """A causal trace, the recommended edit layers, and the window this one fact points at.

    Attributes:
        trace: the result of :func:`memit_lab.tracing.trace`.
        layers: the recommended edit layers R: MEMIT's defaults for the model (the method
            registry's, :data:`memit_lab.methods.METHODS`: measured, else chosen by causal
            tracing over many facts) -- the edit playground's default.
        rome_layer: ROME's one edit layer for the model
            (:meth:`memit_lab.hparams.RomeHyperParams.for_model`), the playground's default for ROME.
        fact_layers: as many consecutive MLP layers as R whose outputs, restored together at
            the last subject token, bring back the most of this one fact
            (:func:`memit_lab.layer_choice.recommend_layers` on this fact alone); ``None`` when
            the answer is not a word that can be scored (a newline, say).
    """

    trace: CausalTrace
    layers: tuple[int, ...]
    rome_layer: int
    fact_layers: tuple[int, ...] | None

    def to_frame(self) -> pd.DataFrame:
        return self.trace.to_frame()

    def plot(self) -> Figure:
        return plot_trace(self.trace)


@dataclass(frozen=True)
class FactEdit:
    """One fact to write: a prompt that contains the subject, and the new object.

    ``paraphrase`` and ``neighbour`` are the extra prompts shown before and after the
    edit; empty means :func:`memit_lab.widgets.default_probes` chooses them.
    """

    prompt: str
    subject: str
    new_object: str
    paraphrase: str = ""
    neighbour: str = ""


@dataclass(frozen=True)
class EditView:
    """What an edit changed: P(new object) and the greedy continuation of every probe, before and after.

    Attributes:
        method, layers, lam: how the edit was made (``method``: the playground's label, e.g.
            ``"MEMIT"``; ``lam``: ``None`` for a method without λ, such as ROME).
        facts: the facts written.
        frame: one row per probe: ``fact`` (index), ``probe`` (edit prompt / paraphrase /
            neighbour), ``prompt``, ``new_object``, ``p_before``, ``p_after`` (P of the new
            object's tokens after the prompt), ``generation_before``, ``generation_after``.
        seconds: wall time of the edit itself.
    """

    method: str
    layers: tuple[int, ...]
    lam: float | None
    facts: tuple[FactEdit, ...]
    frame: pd.DataFrame
    seconds: float = field(compare=False)

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    @property
    def p_before(self) -> float:
        """P(new object | first edit prompt) before the edit."""
        return float(self.frame.p_before.iloc[0])

    @property
    def p_after(self) -> float:
        """P(new object | first edit prompt) after the edit."""
        return float(self.frame.p_after.iloc[0])


@dataclass(frozen=True)
class UndoView:
    """The weights put back, and the probes scored again.

    Attributes:
        layers: the layers whose W_out was restored.
        frame: one row per probe of the undone edit: ``probe``, ``prompt``, ``new_object``,
            ``p_before`` (before the edit), ``p_now`` (after undo).
        remaining: edits still applied.
    """

    layers: tuple[int, ...]
    frame: pd.DataFrame
    remaining: int

    def to_frame(self) -> pd.DataFrame:
        return self.frame

    @property
    def p_now(self) -> float:
        """P(new object | first edit prompt) after undo."""
        return float(self.frame.p_now.iloc[0])


@dataclass(frozen=True)
class LensView:
    """The logit lens of a prompt and the direct logit attribution at its last token."""

    lens: LogitLens
    attribution: LogitAttribution

    def to_frame(self) -> pd.DataFrame:
        return self.lens.to_frame()

    def plot(self) -> tuple[Figure, Figure]:
        return plot_logit_lens(self.lens)[0], plot_attribution(self.attribution)[0]


#: Whatever a panel can show.
View = Message | TraceView | EditView | UndoView | LensView


# -- their HTML -------------------------------------------------------------------------------------------------


def layer_text(layers: Sequence[int]) -> str:
    """Layers as a person types them into the playground: a range ``"3-7"``, else a list ``"3,5"``."""
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(layer) for layer in layers)


def render_message(message: Message) -> str:
    """A coloured line; its CSS class ``memit-message-error`` / ``-info`` is what the browser test looks for."""
    colour = "#b00020" if message.level == "error" else "#0b5394"
    return f'<div class="memit-message-{message.level}" style="color:{colour}">{html.escape(message.text)}</div>'


def render_trace(view: TraceView) -> str:
    """The clean and corrupted probabilities and the recommended layers, in one paragraph."""
    t = view.trace
    alone = (
        "this answer cannot be scored on its own"
        if view.fact_layers is None
        else f"MLP window at the last subject token with the largest effect for this fact alone: "
        f"{layer_text(view.fact_layers)} (one fact with few noise samples is a noisy guide: try both)"
    )
    return (
        f"P({html.escape(repr(t.target))}) clean {t.clean_prob:.3f}, with the subject corrupted "
        f"{t.corrupted_prob:.3f} ({t.samples} noise samples). Recommended edit layers: "
        f"<b>{layer_text(view.layers)}</b> for MEMIT, <b>{view.rome_layer}</b> for ROME (the defaults for "
        f"this model, measured over many facts); {html.escape(alone)}."
    )


def render_edit(view: EditView) -> str:
    """What was written where and how fast, then the probes' table."""
    how = "" if view.lam is None else f" (λ = {view.lam:g})"
    head = (
        f"{view.method} wrote {len(view.facts)} fact(s) into layer(s) {layer_text(view.layers)}{how} "
        f"in {view.seconds:.1f} s."
    )
    return f"<p>{html.escape(head)}</p>" + _table(view.frame)


def render_undo(view: UndoView) -> str:
    """Which W_out came back, how many edits remain, then the probes scored again."""
    head = f"Undone: W_out of layers {layer_text(view.layers)} restored; {view.remaining} edit(s) still applied."
    return f"<p>{html.escape(head)}</p>" + _table(view.frame)


def render_lens(view: LensView) -> str:
    """From which residual state on the target is the top prediction at the last token."""
    first = view.lens.top1_from_layer(-1)
    where = "never becomes top-1" if first is None else f"is the top prediction from h{first} on"
    return f"At the last token, {html.escape(repr(view.lens.target))} {where}."


def render(view: View) -> str:
    """The HTML a panel shows for ``view``."""
    match view:
        case Message():
            return render_message(view)
        case TraceView():
            return render_trace(view)
        case EditView():
            return render_edit(view)
        case UndoView():
            return render_undo(view)
        case LensView():
            return render_lens(view)
    raise TypeError(f"no rendering for {type(view).__name__}")


_HEADERS = {
    "fact": "fact",
    "probe": "probe",
    "prompt": "prompt",
    "new_object": "new object",
    "p_before": "P(new) before",
    "p_after": "P(new) after",
    "p_now": "P(new) now",
    "generation_before": "greedy text before",
    "generation_after": "greedy text after",
}


def _table(frame: pd.DataFrame) -> str:
    """``frame`` as an HTML table with readable headers; texts escaped, probabilities to 4 significant digits."""
    shown = frame.rename(columns=_HEADERS)
    if "fact" in shown:
        shown = shown.assign(fact=shown["fact"] + 1)
    return shown.to_html(index=False, float_format=lambda p: f"{p:.4g}", escape=True, border=0)
