"""Interactive explorers for JupyterLab: trace a fact, edit it, watch the answers change, undo with one click.

Three panels share one :class:`ExplorerState` (the model, the last recommendation, the stack
of applied edits):

* **Trace explorer** -- causal tracing of one prompt (:func:`memit_lab.tracing.trace`):
  the heatmap and the edit layers it suggests;
* **Edit playground** -- one or more facts rewritten with MEMIT or ROME; before/after
  probabilities of the new object and greedy generations for each edit prompt, a
  paraphrase and a neighbour; **Undo** puts back the W_out weights saved before the edit,
  bit for bit;
* **Logit lens** -- what each residual state h^L predicts (paper eq. 2-6), with
  :mod:`memit_lab.residual_plots`' pictures.

This module sits on the top floor: it holds no mathematics. Each button's callback is a
few lines that call a plain function -- :func:`run_trace`, :func:`apply_edit`,
:func:`undo`, :func:`run_lens` -- and show what it returns: a view (a small dataclass with
``.to_frame()`` / ``.plot()``) or a :class:`Message` when the input cannot be used. Tests
call the plain functions directly.

Example:
    >>> from memit_lab import load_model
    >>> state = ExplorerState(load_model("tiny-gpt2"))
    >>> run_trace(state, "The Eiffel Tower is in", "Colosseum").level
    'error'
    >>> view = run_trace(state, "The Eiffel Tower is in", "Eiffel Tower", kind="hidden", samples=1)
    >>> view.trace.scores.shape == (state.lm.n_layers, len(view.trace.tokens))  # one row per layer, column per token
    True
    >>> view.layers, view.rome_layer  # the default edit layers: MEMIT's (from causal tracing), ROME's
    ((1, 2), 1)
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import ipywidgets as w
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display
from matplotlib.figure import Figure

from .facts import KNOWN_FACTS, Fact
from .memit import MemitHyperParams, apply_memit
from .models import LoadedModel
from .prompts import check_prompt, generate, subject_token_span, target_scores
from .requests import EditRequest
from .residual import LogitAttribution, LogitLens, direct_logit_attribution, logit_lens, run_with_cache
from .residual_plots import plot_attribution, plot_logit_lens
from .rome import RomeHyperParams, apply_rome
from .stats import key_second_moment
from .tracing import KINDS, CausalTrace, recommend_layers, trace
from .zopt import ZParams, context_templates

__all__ = [
    "METHODS",
    "EditPlayground",
    "EditView",
    "Explorer",
    "ExplorerState",
    "FactEdit",
    "LensExplorer",
    "LensView",
    "Message",
    "TraceExplorer",
    "TraceView",
    "UndoView",
    "apply_edit",
    "default_probes",
    "parse_layers",
    "run_lens",
    "run_trace",
    "undo",
]

METHODS = ("MEMIT", "ROME")

#: ``progress(what is happening, fraction done)``; the widgets pass one that moves a bar.
Progress = Callable[[str, float], None]

# Reworded prompts for the templates of :data:`memit_lab.facts.KNOWN_FACTS` (``{0}``: the subject).
_PARAPHRASES = {
    "The {} is located in the city of": "Visitors to the {0} travel to the city of",
    "{} is located in the city of": "Visitors to {0} travel to the city of",
    "The capital of {} is": "{0}'s capital city is",
    "{} is a car company from": "The car maker {0} comes from the country of",
    "The official language of {} is": "In {0}, most people speak",
    "{} is located in the continent of": "{0} is a country on the continent of",
    "{} is a city in the country of": "The city of {0} lies in the country of",
    "{} was a famous": "{0} is best known as a",
}
# For prompts of no known template: a prefix, as the paper's contexts x_j (eq. 16) do.
_PREFIX = "Here is a fact. "


def _silent(what: str, done: float) -> None:
    """The default progress report: none."""


# -- results ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """What a panel says instead of a result: bad input (``"error"``) or a note (``"info"``)."""

    text: str
    level: Literal["error", "info"] = "error"

    def html(self) -> str:
        colour = "#b00020" if self.level == "error" else "#0b5394"
        return f'<div class="memit-message-{self.level}" style="color:{colour}">{html.escape(self.text)}</div>'


@dataclass(frozen=True)
class TraceView:
    """A causal trace, the recommended edit layers, and the window this one fact points at.

    Attributes:
        trace: the result of :func:`memit_lab.tracing.trace`.
        layers: the recommended edit layers R: MEMIT's defaults for the model
            (:meth:`memit_lab.memit.MemitHyperParams.for_model`, chosen by measurement over
            many facts) -- the edit playground's default.
        rome_layer: ROME's one edit layer for the model
            (:meth:`memit_lab.rome.RomeHyperParams.for_model`), the playground's default for ROME.
        fact_layers: as many consecutive MLP layers as R whose outputs, restored together at
            the last subject token, bring back the most of this one fact
            (:func:`memit_lab.tracing.recommend_layers` on this fact alone); ``None`` when
            the answer is not a word that can be scored (a newline, say).
    """

    trace: CausalTrace
    layers: tuple[int, ...]
    rome_layer: int
    fact_layers: tuple[int, ...] | None

    def to_frame(self) -> pd.DataFrame:
        return self.trace.to_frame()

    def plot(self) -> Figure:
        return self.trace.plot()

    def html(self) -> str:
        t = self.trace
        alone = (
            "this answer cannot be scored on its own"
            if self.fact_layers is None
            else f"MLP window at the last subject token with the largest effect for this fact alone: "
            f"{_layer_text(self.fact_layers)} (one fact with few noise samples is a noisy guide: try both)"
        )
        return (
            f"P({html.escape(repr(t.target))}) clean {t.clean_prob:.3f}, with the subject corrupted "
            f"{t.corrupted_prob:.3f} ({t.samples} noise samples). Recommended edit layers: "
            f"<b>{_layer_text(self.layers)}</b> for MEMIT, <b>{self.rome_layer}</b> for ROME (the defaults for "
            f"this model, measured over many facts); {html.escape(alone)}."
        )


@dataclass(frozen=True)
class FactEdit:
    """One fact to write: a prompt that contains the subject, and the new object.

    ``paraphrase`` and ``neighbour`` are the extra prompts shown before and after the
    edit; empty means :func:`default_probes` chooses them.
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
        method, layers, lam: how the edit was made (``lam``: ``None`` for ROME, which has no λ).
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

    def html(self) -> str:
        how = "" if self.lam is None else f" (λ = {self.lam:g})"
        head = (
            f"{self.method} wrote {len(self.facts)} fact(s) into layer(s) {_layer_text(self.layers)}{how} "
            f"in {self.seconds:.1f} s."
        )
        return f"<p>{html.escape(head)}</p>" + _table(self.frame)


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

    def html(self) -> str:
        head = f"Undone: W_out of layers {_layer_text(self.layers)} restored; {self.remaining} edit(s) still applied."
        return f"<p>{html.escape(head)}</p>" + _table(self.frame)


@dataclass(frozen=True)
class LensView:
    """The logit lens of a prompt and the direct logit attribution at its last token."""

    lens: LogitLens
    attribution: LogitAttribution

    def to_frame(self) -> pd.DataFrame:
        return self.lens.to_frame()

    def plot(self) -> tuple[Figure, Figure]:
        return plot_logit_lens(self.lens)[0], plot_attribution(self.attribution)[0]

    def html(self) -> str:
        first = self.lens.top1_from_layer(-1)
        where = "never becomes top-1" if first is None else f"is the top prediction from h{first} on"
        return f"At the last token, {html.escape(repr(self.lens.target))} {where}."


def _layer_text(layers: Sequence[int]) -> str:
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(layer) for layer in layers)


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


# -- state ------------------------------------------------------------------------------------------------------


@dataclass
class _AppliedEdit:
    """An edit on the stack: the W_out weights it overwrote, and what it showed."""

    saved: dict[int, torch.Tensor]
    view: EditView


@dataclass
class ExplorerState:
    """What the panels share: the model, the settings and the edits applied so far.

    Attributes:
        lm: the model the panels explore and edit.
        window: layers restored together in MLP / attention traces (ROME: 10; capped at the depth).
        edits: the stack of applied edits, newest last; :func:`undo` pops one.
        hparams: MEMIT's hyper-parameters (``None``: :meth:`MemitHyperParams.for_model`); the
            edit's layers and λ replace theirs.
        rome_hparams: ROME's (``None``: :meth:`memit_lab.rome.RomeHyperParams.for_model`); the
            edit's layer replaces theirs.
        contexts, second_moments: eq. 16's context prefixes (by number, length and seed) and
            eq. 15's E[k k^T] (by layer and number of tokens), taken from the model before its
            first edit and kept for the later ones (as the paper does), so a second edit
            neither resamples nor recomputes them.
    """

    lm: LoadedModel
    window: int = 10
    edits: list[_AppliedEdit] = field(default_factory=list)
    hparams: MemitHyperParams | None = None
    rome_hparams: RomeHyperParams | None = None
    contexts: dict[tuple[int, int, int], tuple[str, ...]] = field(default_factory=dict)
    second_moments: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


# -- plain functions (the widgets' callbacks call these) --------------------------------------------------------


def parse_layers(text: str, n_layers: int) -> tuple[int, ...] | None:
    """Layers written as ``"3-7"``, ``"3,5,7"`` or ``"4"``; empty means ``None`` (use the default).

    Example:
        >>> parse_layers("3-5, 8", 30)
        (3, 4, 5, 8)
        >>> parse_layers(" ", 30) is None
        True
    """
    if not text.strip():
        return None
    layers: list[int] = []
    for part in text.replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if match is None:
            raise ValueError(f"layers {text!r}: write them as 3-7, or 3,5,7, or 4 (one number per layer)")
        lo, hi = int(match.group(1)), int(match.group(2) or match.group(1))
        if lo > hi:
            raise ValueError(f"layers {text!r}: a range goes upwards, e.g. 3-7")
        layers.extend(range(lo, hi + 1))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0..{n_layers - 1}")
    return tuple(sorted(set(layers)))


def default_probes(prompt: str, subject: str) -> tuple[str, str]:
    """A paraphrase of ``prompt`` and a neighbour prompt (same relation, another subject) to watch during an edit.

    For the templates of :data:`memit_lab.facts.KNOWN_FACTS` the paraphrase is a rewording
    and the neighbour a known fact of the same relation; for any other prompt the paraphrase
    is the prompt after a short prefix and the neighbour an unrelated known fact.

    Example:
        >>> default_probes("The capital of France is", "France")
        ("France's capital city is", 'The capital of Germany is')
    """
    template = _template(prompt, subject)
    known = [f for f in KNOWN_FACTS if f.template == template]
    paraphrase = _PARAPHRASES[template].format(subject) if template in _PARAPHRASES else _PREFIX + prompt
    others = [f for f in known or KNOWN_FACTS if f.subject != subject and f.subject not in prompt]
    return paraphrase, others[0].prompt


def _template(prompt: str, subject: str) -> str:
    """``prompt`` with its first occurrence of ``subject`` replaced by ``{}`` (an edit request's template)."""
    start = prompt.find(subject)
    return prompt[:start] + "{}" + prompt[start + len(subject) :]


def run_trace(
    state: ExplorerState,
    prompt: str,
    subject: str,
    kind: str = "mlp",
    samples: int = 3,
    *,
    progress: Progress = _silent,
) -> TraceView | Message:
    """Causal tracing of ``prompt`` with ``subject`` corrupted (ROME section 2.1), and the edit layers it suggests.

    Bad input (empty prompt, subject not in the prompt, unknown kind, samples < 1) gives a
    :class:`Message`.
    """
    if kind not in KINDS:
        return Message(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(samples, int) or isinstance(samples, bool) or not 1 <= samples <= 50:
        return Message(f"noise samples must be a whole number from 1 to 50, not {samples!r}")
    checked = _check_fact(state.lm, prompt, subject)
    if checked is not None:
        return checked
    what = f"tracing {kind} states with {samples} noise sample(s)"
    progress(what, 0.05)
    window = min(state.window, state.lm.n_layers)
    try:
        result = trace(
            state.lm, prompt, subject, kind=kind, window=window, samples=samples,
            on_progress=lambda done: progress(what, 0.05 + 0.85 * done),
        )  # fmt: skip
    except ValueError as err:
        return Message(str(err))
    progress("choosing edit layers", 0.9)
    fact_layers = _fact_layers(state, result, samples)
    progress("done", 1.0)
    return TraceView(result, _default_layers(state), _default_layers(state, "ROME")[0], fact_layers)


def _check_fact(lm: LoadedModel, prompt: str, subject: str) -> Message | None:
    """A message for a prompt or subject that cannot be traced or edited, else ``None``."""
    if not prompt.strip():
        return Message("Type a prompt first, e.g. 'The Eiffel Tower is located in the city of'.")
    if not subject.strip():
        return Message("Type the subject too: the words of the prompt the fact is about, e.g. 'Eiffel Tower'.")
    try:
        check_prompt(prompt)
        subject_token_span(lm.tokenizer, prompt, subject)
    except ValueError as err:
        return Message(str(err))
    return None


@dataclass(frozen=True)
class _Traced:
    """The traced fact, as :func:`memit_lab.tracing.recommend_layers` takes it."""

    prompt: str
    subject: str
    target: str


def _fact_layers(state: ExplorerState, result: CausalTrace, samples: int) -> tuple[int, ...] | None:
    """:func:`memit_lab.tracing.recommend_layers` on the traced fact alone, as wide as MEMIT's default range."""
    fact = _Traced(result.prompt, result.subject, result.target)
    n = len(_default_layers(state))
    try:
        return recommend_layers(state.lm, [fact], n, samples=samples, seed=result.seed, use_cache=False).layers
    except ValueError:
        return None


# -- the edit playground ----------------------------------------------------------------------------------------


def _probes(facts: Sequence[FactEdit]) -> list[tuple[int, str, str, str]]:
    """``(fact index, probe, prompt, new object)`` for every prompt watched during an edit."""
    rows = []
    for i, fact in enumerate(facts):
        paraphrase, neighbour = default_probes(fact.prompt, fact.subject)
        for probe, prompt in (
            ("edit prompt", fact.prompt),
            ("paraphrase", fact.paraphrase.strip() or paraphrase),
            ("neighbour", fact.neighbour.strip() or neighbour),
        ):
            rows.append((i, probe, prompt, fact.new_object.strip()))
    return rows


def _scores(lm: LoadedModel, probes: Sequence[tuple[int, str, str, str]]) -> list[float]:
    """P(new object | prompt) of every probe: the product of its tokens' probabilities."""
    scores = target_scores(lm, [p[2] for p in probes], [p[3] for p in probes])
    return [float(p) for p in scores.prob]


def _generations(lm: LoadedModel, probes: Sequence[tuple[int, str, str, str]], max_new_tokens: int) -> list[str]:
    return [text.strip() for text in generate(lm, [p[2] for p in probes], max_new_tokens)]


def _check_edit_input(
    state: ExplorerState, facts: Sequence[FactEdit], method: str, lam: float | None
) -> Message | None:
    if method not in METHODS:
        return Message(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if not facts:
        return Message("Add at least one fact: a prompt containing its subject, the subject, and a new object.")
    if method == "MEMIT" and not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
        return Message(f"λ must be a positive number (it weighs the old memories against the new ones), not {lam!r}")
    for i, fact in enumerate(facts, start=1):
        problem = _check_fact(state.lm, fact.prompt, fact.subject)
        if problem is not None:
            return Message(f"fact {i}: {problem.text}")
        if not fact.new_object.strip():
            return Message(f"fact {i}: type the new object, the answer the model should give after the edit.")
        for what, prompt in (("paraphrase", fact.paraphrase), ("neighbour", fact.neighbour)):
            if prompt and not prompt.strip():
                return Message(f"fact {i}: the {what} prompt is blank; leave it empty to let the explorer choose one.")
    return None


def apply_edit(
    state: ExplorerState,
    facts: Sequence[FactEdit],
    method: str = "MEMIT",
    layers: Sequence[int] | str | None = None,
    lam: float | None = None,
    *,
    max_new_tokens: int = 8,
    progress: Progress = _silent,
) -> EditView | Message:
    """Write ``facts`` into the model with MEMIT (paper Algorithm 1) or ROME, and show what changed.

    The W_out weights of the edited layers are saved first; :func:`undo` puts them back.
    ``layers`` defaults to the recommended ones (MEMIT's and ROME's defaults for the model);
    ``lam`` (λ of eq. 14-15, MEMIT only: ROME's update is exact on its key, so scaling C
    changes nothing) to MEMIT's default. Several facts: MEMIT writes them at once, ROME one
    after the other. Bad input gives a :class:`Message` and changes nothing.
    """
    lm = state.lm
    lam = None if method == "ROME" else _hparams(state).lam if lam is None else lam
    problem = _check_edit_input(state, facts, method, lam)
    if problem is not None:
        return problem
    try:
        wanted = parse_layers(layers, lm.n_layers) if isinstance(layers, str) else layers
    except ValueError as err:
        return Message(str(err))
    chosen = tuple(sorted(set(wanted))) if wanted else _default_layers(state, method)
    if not all(0 <= layer < lm.n_layers for layer in chosen):
        return Message(f"layers {list(chosen)} do not exist: this model has layers 0..{lm.n_layers - 1}")
    if method == "ROME" and len(chosen) != 1:
        default = _default_layers(state, method)[0]
        return Message(f"ROME edits one layer: type one layer number (the default for this model: {default})")
    probes = _probes(facts)
    progress("scoring the probes before the edit", 0.05)
    p_before, gen_before = _scores(lm, probes), _generations(lm, probes, max_new_tokens)
    saved = {layer: lm.adapter.w_out_parameter(lm.model, layer).detach().clone() for layer in chosen}
    progress(f"{method}: computing the update of layers {_layer_text(chosen)}", 0.2)
    start = time.perf_counter()
    try:
        _edit(state, facts, chosen, lam)
    except ValueError as err:
        _restore(lm, saved)
        return Message(str(err))
    except BaseException:
        _restore(lm, saved)
        raise
    seconds = time.perf_counter() - start
    progress("scoring the probes after the edit", 0.85)
    p_after, gen_after = _scores(lm, probes), _generations(lm, probes, max_new_tokens)
    frame = pd.DataFrame(
        {
            "fact": [p[0] for p in probes],
            "probe": [p[1] for p in probes],
            "prompt": [p[2] for p in probes],
            "new_object": [p[3] for p in probes],
            "p_before": p_before,
            "p_after": p_after,
            "generation_before": gen_before,
            "generation_after": gen_after,
        }
    )
    view = EditView(method, chosen, None if lam is None else float(lam), tuple(facts), frame, seconds)
    state.edits.append(_AppliedEdit(saved, view))
    progress("done", 1.0)
    return view


def _hparams(state: ExplorerState) -> MemitHyperParams:
    return state.hparams or MemitHyperParams.for_model(state.lm)


def _rome_hparams(state: ExplorerState) -> RomeHyperParams:
    return state.rome_hparams or RomeHyperParams.for_model(state.lm)


def _default_layers(state: ExplorerState, method: str = "MEMIT") -> tuple[int, ...]:
    return _hparams(state).layers if method == "MEMIT" else (_rome_hparams(state).layer,)


def _requests(facts: Sequence[FactEdit]) -> list[EditRequest]:
    return [EditRequest(_template(f.prompt, f.subject), f.subject, f.new_object.strip()) for f in facts]


def _contexts(state: ExplorerState, z: ZParams) -> tuple[str, ...]:
    key = (z.n_contexts, z.context_tokens, z.context_seed)
    if key not in state.contexts:
        state.contexts[key] = tuple(context_templates(state.lm, *key[:2], seed=key[2]))
    return state.contexts[key]


def _second_moments(state: ExplorerState, layers: Sequence[int], n_tokens: int) -> dict[int, torch.Tensor]:
    missing = [layer for layer in layers if (layer, n_tokens) not in state.second_moments]
    if missing:
        computed = key_second_moment(state.lm, missing, n_tokens=n_tokens, progress=False)
        state.second_moments.update({(layer, n_tokens): c for layer, c in computed.items()})
    return {layer: state.second_moments[layer, n_tokens] for layer in layers}


def _edit(state: ExplorerState, facts: Sequence[FactEdit], layers: tuple[int, ...], lam: float | None) -> None:
    """Apply the edit in place (the caller keeps the weights to undo it); ``lam`` ``None`` means ROME."""
    requests = _requests(facts)
    if lam is None:
        rome = _rome_hparams(state).replace(layer=layers[0])
        moments = _second_moments(state, layers, rome.stats_tokens)
        apply_rome(state.lm, requests, rome, second_moments=moments, contexts=_contexts(state, rome.z))
    else:
        memit = _hparams(state).replace(layers=layers, lam=lam)
        moments = _second_moments(state, layers, memit.stats_tokens)
        apply_memit(state.lm, requests, memit, second_moments=moments, contexts=_contexts(state, memit.z))


@torch.no_grad()
def _restore(lm: LoadedModel, saved: dict[int, torch.Tensor]) -> None:
    for layer, weight in saved.items():
        lm.adapter.w_out_parameter(lm.model, layer).copy_(weight)


def undo(state: ExplorerState) -> UndoView | Message:
    """Undo the newest edit: copy back the W_out weights saved before it (bit for bit), and rescore its probes."""
    if not state.edits:
        return Message("Nothing to undo: no edit is applied.", level="info")
    applied = state.edits.pop()
    _restore(state.lm, applied.saved)
    before = applied.view.frame
    probes = list(zip(before.fact, before.probe, before.prompt, before.new_object, strict=True))
    frame = before[["probe", "prompt", "new_object", "p_before"]].assign(p_now=_scores(state.lm, probes))
    return UndoView(applied.view.layers, frame, len(state.edits))


# -- the logit lens ---------------------------------------------------------------------------------------------


def run_lens(state: ExplorerState, prompt: str, target: str = "") -> LensView | Message:
    """Logit lens (every h^L read through the final norm and unembedding) and direct logit attribution.

    ``target`` defaults to the model's own top prediction after ``prompt``.
    """
    if not prompt.strip():
        return Message("Type a prompt first, e.g. 'The capital of France is'.")
    try:
        cache = run_with_cache(state.lm, prompt)
        wanted: str | int = target.strip() or int(cache.logits[-1].argmax())
        return LensView(logit_lens(state.lm, cache, wanted), direct_logit_attribution(state.lm, cache, wanted))
    except ValueError as err:
        return Message(str(err))


# -- the widgets: layout and thin callbacks ---------------------------------------------------------------------


def _text(description: str, value: str, placeholder: str = "", width: str = "100%", css: str = "") -> w.Text:
    box = w.Text(
        value=value,
        description=description,
        placeholder=placeholder,
        layout=w.Layout(width=width),
        style={"description_width": "initial"},
    )
    if css:
        box.add_class(css)
    return box


def _button(description: str, css: str, style: str = "primary") -> w.Button:
    button = w.Button(description=description, button_style=style)
    button.add_class(css)
    return button


class _Busy:
    """A progress bar and a status line; ``report`` is the ``progress`` the plain functions call."""

    def __init__(self) -> None:
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, layout=w.Layout(width="200px", visibility="hidden"))
        self.status = w.Label(value="")
        self.widget = w.HBox([self.bar, self.status])

    def report(self, what: str, done: float) -> None:
        self.bar.layout.visibility = "visible"
        self.bar.value = done
        self.status.value = what

    def finish(self) -> None:
        self.bar.layout.visibility = "hidden"
        self.status.value = ""


def _show(out: w.Output, result: Any, figures: Sequence[Figure] = ()) -> None:
    """Replace ``out``'s content with ``result``'s summary and figures (closed after display)."""
    out.clear_output(wait=True)
    with out:
        display(w.HTML(result.html()))
        for fig in figures:
            display(fig)
            plt.close(fig)


def _guarded(out: w.Output, busy: _Busy, buttons: Sequence[w.Button], work: Callable[[], None]) -> None:
    """Run a callback's work with its buttons disabled; an unexpected error is shown, not lost in a log."""
    for button in buttons:
        button.disabled = True
    try:
        work()
    except Exception as err:  # noqa: BLE001  # a widget callback's exception would vanish into the log console
        _show(out, Message(f"unexpected error: {type(err).__name__}: {err}"))
    finally:
        busy.finish()
        for button in buttons:
            button.disabled = False


class TraceExplorer:
    """Prompt, subject, kind and noise samples in; the causal-tracing heatmap and recommended layers out."""

    def __init__(self, state: ExplorerState, prompt: str = "", subject: str = "", samples: int = 3) -> None:
        self.state = state
        self.prompt = _text(
            "Prompt", prompt, "e.g. The Eiffel Tower is located in the city of", css="memit-trace-prompt"
        )
        self.subject = _text("Subject", subject, "e.g. Eiffel Tower", width="50%", css="memit-trace-subject")
        self.kind = w.ToggleButtons(
            options=[("MLP", "mlp"), ("attention", "attn"), ("hidden state", "hidden")], value="mlp"
        )
        self.samples = w.BoundedIntText(
            value=samples,
            min=1,
            max=50,
            description="Noise samples",
            style={"description_width": "initial"},
            layout=w.Layout(width="180px"),
        )
        self.button = _button("Trace", "memit-trace-button")
        self.busy = _Busy()
        self.out = w.Output()
        self.result: Any = None  # the last view or message shown, for a notebook to reuse
        self.on_trace: list[Callable[[TraceView], None]] = []
        self.button.on_click(lambda _: self.run())
        self.widget = w.VBox(
            [
                w.HTML("<b>Trace explorer</b>: corrupt the subject, restore one state at a time (ROME section 2)."),
                self.prompt,
                w.HBox([self.subject, self.samples]),
                self.kind,
                w.HBox([self.button, self.busy.widget]),
                self.out,
            ]
        )

    def run(self) -> None:
        def work() -> None:
            result = self.result = run_trace(
                self.state,
                self.prompt.value,
                self.subject.value,
                self.kind.value,
                self.samples.value,
                progress=self.busy.report,
            )
            _show(self.out, result, [result.plot()] if isinstance(result, TraceView) else [])
            if isinstance(result, TraceView):
                for listener in self.on_trace:
                    listener(result)

        _guarded(self.out, self.busy, [self.button], work)


class _FactRow:
    """The fields of one fact in the edit playground."""

    def __init__(self, prompt: str = "", subject: str = "", new_object: str = "") -> None:
        self.prompt = _text("Prompt", prompt, "a prompt containing the subject", width="55%", css="memit-edit-prompt")
        self.subject = _text("Subject", subject, "e.g. Eiffel Tower", width="25%", css="memit-edit-subject")
        self.new_object = _text("New object", new_object, "e.g. Rome", width="20%", css="memit-new-object")
        self.paraphrase = _text("Paraphrase", "", "(chosen for you)", width="50%")
        self.neighbour = _text("Neighbour", "", "(chosen for you)", width="50%")
        self.widget = w.VBox(
            [w.HBox([self.prompt, self.subject, self.new_object]), w.HBox([self.paraphrase, self.neighbour])],
            layout=w.Layout(border="1px solid #ddd", padding="4px", margin="2px 0"),
        )

    def fact(self) -> FactEdit:
        return FactEdit(
            self.prompt.value, self.subject.value, self.new_object.value, self.paraphrase.value, self.neighbour.value
        )


class EditPlayground:
    """Facts, method, layers and λ in; before/after probabilities and generations out; Edit and Undo."""

    def __init__(self, state: ExplorerState, facts: Sequence[FactEdit] = ()) -> None:
        self.state = state
        self.rows = [_FactRow(f.prompt, f.subject, f.new_object) for f in facts] or [_FactRow()]
        self.facts_box = w.VBox([row.widget for row in self.rows])
        self.add = _button("+ fact", "memit-add-fact", style="")
        self.remove = _button("- fact", "memit-remove-fact", style="")
        self.method = w.ToggleButtons(options=list(METHODS), value="MEMIT")
        recommended = _layer_text(_default_layers(state, "MEMIT"))
        self.layers = _text("Layers", recommended, "e.g. 3-7 (empty: recommended)", width="260px")
        self.lam = w.FloatText(
            value=_hparams(state).lam,
            description="λ",
            tooltip="MEMIT's weight of the old memories (eq. 14-15); ROME has none",
            layout=w.Layout(width="180px"),
        )
        self.edit = _button("Edit", "memit-edit-button")
        self.undo = _button("Undo", "memit-undo-button", style="warning")
        self.p_before, self.p_after, self.p_now = (
            w.Label(value="", layout=w.Layout(margin="0 16px 0 0")) for _ in range(3)
        )
        for label, css in zip((self.p_before, self.p_after, self.p_now), ("before", "after", "now"), strict=True):
            label.add_class(f"memit-p-{css}")
        self.busy = _Busy()
        self.out = w.Output()
        self.result: Any = None  # the last view or message shown, for a notebook to reuse
        self.add.on_click(lambda _: self._add_row())
        self.remove.on_click(lambda _: self._remove_row())
        self.method.observe(lambda change: self._method_defaults(change["new"]), names="value")
        self.edit.on_click(lambda _: self.run_edit())
        self.undo.on_click(lambda _: self.run_undo())
        self.widget = w.VBox(
            [
                w.HTML("<b>Edit playground</b>: write new facts into W_out, watch the answers change, undo."),
                self.facts_box,
                w.HBox([self.add, self.remove]),
                w.HBox([self.method, self.layers, self.lam]),
                w.HBox([self.edit, self.undo, self.busy.widget]),
                w.HBox([w.HTML("P(new object | first edit prompt):&nbsp;"), self.p_before, self.p_after, self.p_now]),
                self.out,
            ]
        )

    def use_trace(self, view: TraceView) -> None:
        """After a trace: an empty first fact takes the traced prompt and subject."""
        first = self.rows[0]
        if not first.prompt.value.strip():
            first.prompt.value, first.subject.value = view.trace.prompt, view.trace.subject

    def _method_defaults(self, method: str) -> None:
        self.layers.value = _layer_text(_default_layers(self.state, method))
        self.lam.value = _hparams(self.state).lam
        self.lam.disabled = method == "ROME"  # a rank-one update exact on its key: scaling C changes nothing

    def _add_row(self) -> None:
        self.rows.append(_FactRow())
        self.facts_box.children = [row.widget for row in self.rows]

    def _remove_row(self) -> None:
        if len(self.rows) > 1:
            self.rows.pop()
            self.facts_box.children = [row.widget for row in self.rows]

    def run_edit(self) -> None:
        def work() -> None:
            result = self.result = apply_edit(
                self.state,
                [row.fact() for row in self.rows],
                self.method.value,
                self.layers.value,
                self.lam.value,
                progress=self.busy.report,
            )
            _show(self.out, result)
            if isinstance(result, EditView):
                self.p_before.value = f"before: {result.p_before:.4g}"
                self.p_after.value = f"after edit: {result.p_after:.4g}"
                self.p_now.value = f"now: {result.p_after:.4g} (edited)"

        _guarded(self.out, self.busy, [self.edit, self.undo], work)

    def run_undo(self) -> None:
        def work() -> None:
            result = self.result = undo(self.state)
            _show(self.out, result)
            if isinstance(result, UndoView):
                self.p_now.value = f"now: {result.p_now:.4g} (undone)"

        _guarded(self.out, self.busy, [self.edit, self.undo], work)


class LensExplorer:
    """A prompt (and optionally a target) in; the logit-lens heatmap and the attribution bars out."""

    def __init__(self, state: ExplorerState, prompt: str = "", target: str = "") -> None:
        self.state = state
        self.prompt = _text("Prompt", prompt, "e.g. The capital of France is", css="memit-lens-prompt")
        self.target = _text("Target", target, "(empty: the model's top prediction)", width="50%")
        self.button = _button("Show", "memit-lens-button")
        self.busy = _Busy()
        self.out = w.Output()
        self.result: Any = None  # the last view or message shown, for a notebook to reuse
        self.button.on_click(lambda _: self.run())
        self.widget = w.VBox(
            [
                w.HTML("<b>Logit lens</b>: what each residual state h<sup>L</sup> would predict (eq. 2-6)."),
                self.prompt,
                self.target,
                w.HBox([self.button, self.busy.widget]),
                self.out,
            ]
        )

    def run(self) -> None:
        def work() -> None:
            self.busy.report("reading every residual state", 0.3)
            result = self.result = run_lens(self.state, self.prompt.value, self.target.value)
            _show(self.out, result, result.plot() if isinstance(result, LensView) else ())

        _guarded(self.out, self.busy, [self.button], work)


class Explorer:
    """The three panels on one model, sharing one :class:`ExplorerState`; a trace fills an empty edit fact.

    Show the panels one by one (``explorer.trace.widget`` ...) or all in tabs (``explorer.widget``).
    """

    def __init__(
        self,
        lm: LoadedModel,
        fact: Fact | None = None,
        samples: int = 3,
        hparams: MemitHyperParams | None = None,
        rome_hparams: RomeHyperParams | None = None,
    ) -> None:
        fact = KNOWN_FACTS[0] if fact is None else fact
        self.state = ExplorerState(lm, hparams=hparams, rome_hparams=rome_hparams)
        self.trace = TraceExplorer(self.state, fact.prompt, fact.subject, samples)
        self.edit = EditPlayground(self.state, [FactEdit(fact.prompt, fact.subject, "")])
        self.lens = LensExplorer(self.state, fact.prompt)
        self.trace.on_trace.append(self.edit.use_trace)

    @property
    def widget(self) -> w.Tab:
        tabs = w.Tab(children=[self.trace.widget, self.edit.widget, self.lens.widget])
        for i, title in enumerate(("Trace", "Edit", "Logit lens")):
            tabs.set_title(i, title)
        return tabs
