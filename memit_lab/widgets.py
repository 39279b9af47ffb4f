"""Interactive explorers for JupyterLab: trace a fact, edit it, watch the answers change, undo with one click.

Three panels share one :class:`ExplorerState` (the model, the hyper-parameters, the stack
of applied edits):

* **Trace explorer** -- causal tracing of one prompt (:func:`memit_lab.tracing.trace`):
  the heatmap and the edit layers it suggests;
* **Edit playground** -- one or more facts rewritten with any method of the registry
  (:data:`memit_lab.methods.METHODS`: MEMIT, ROME, FT-L, FT-W, ...); before/after probabilities of the
  new object and greedy generations for each edit prompt, a paraphrase and a neighbour;
  **Undo** puts back the W_out weights the edit overwrote, bit for bit (its
  :meth:`memit_lab.editing.EditResult.restore`);
* **Logit lens** -- what each residual state h^L predicts (paper eq. 2-6), with
  :mod:`memit_lab.residual_plots`' pictures.

This module sits on the top floor: it holds no mathematics. Each button's callback is a
few lines that call a plain function -- :func:`run_trace`, :func:`apply_edit`,
:func:`undo`, :func:`run_lens` -- and show what it returns: a view (a small dataclass with
``.to_frame()`` / ``.plot()``) or a :class:`Message` when the input cannot be used; the
views and their HTML are in :mod:`memit_lab.explorer_views`. Tests call the plain functions
directly.

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
    >>> method_labels()[:3]  # one choice per registered method
    ('MEMIT', 'ROME', 'FT-L')
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as w
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display
from matplotlib.figure import Figure

from .editing import EditResult, WeightBackup
from .explorer_views import (
    EditView,
    FactEdit,
    LensView,
    Message,
    TraceView,
    UndoView,
    View,
    layer_text,
    render,
)
from .facts import KNOWN_FACTS, Fact
from .layer_choice import recommend_layers
from .methods import METHODS, Method, get_method
from .models import LoadedModel
from .prompts import check_prompt, generate, subject_token_span, target_scores
from .requests import EditRequest
from .residual import direct_logit_attribution, logit_lens, run_with_cache
from .stats import key_second_moment
from .tracing import KINDS, CausalTrace, trace
from .zopt import ZParams, context_templates

__all__ = [
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
    "UneditedInputs",
    "apply_edit",
    "default_probes",
    "method_labels",
    "parse_layers",
    "run_lens",
    "run_trace",
    "undo",
]

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


# -- the methods, as the playground names them ------------------------------------------------------------------


def _label(name: str) -> str:
    return METHODS[name].label


def method_labels() -> tuple[str, ...]:
    """The playground's method choices: one per method of the registry, in its order."""
    return tuple(_label(name) for name in METHODS)


def _find_method(choice: str) -> Method | None:
    """The registered method a playground label (``"ROME"``) or a registry name or alias (``"rome"``) names."""
    for name, method in METHODS.items():
        if choice == _label(name):
            return method
    try:
        return get_method(choice)
    except ValueError:
        return None


# What a method's hyper-parameters hold, read from their fields: MEMIT's R is ``layers``, ROME, FT-L and FT-W edit
# one ``layer``; only MEMIT has a λ (``lam``); methods that read E[k k^T] have ``stats_tokens``, those that optimise z
# (eq. 16) a ``z`` with its contexts' settings.


def _edit_layers(hparams: Any) -> tuple[int, ...]:
    return tuple(hparams.layers) if hasattr(hparams, "layers") else (hparams.layer,)


def _has_lam(hparams: Any) -> bool:
    return hasattr(hparams, "lam")


def _with_layers(hparams: Any, layers: tuple[int, ...], lam: float | None) -> Any:
    changes: dict[str, Any] = {"layers": layers} if hasattr(hparams, "layers") else {"layer": layers[0]}
    if lam is not None:
        changes["lam"] = lam
    return hparams.replace(**changes)


# -- state ------------------------------------------------------------------------------------------------------


@dataclass
class _AppliedEdit:
    """An edit on the stack: the method's result (its ``restore`` undoes it), and what it showed."""

    result: EditResult
    view: EditView


@dataclass
class UneditedInputs:
    """What the edits of a session read from the model before it was edited: E[k k^T] and the context prefixes.

    Eq. 15's E[k k^T] (by layer and number of tokens) and eq. 16's context prefixes (by
    number, length and seed) are taken the first time an edit needs them -- from the model
    before its first edit -- and kept for the later ones, as the paper does. The disk caches
    of :func:`memit_lab.stats.key_second_moment` and :func:`memit_lab.zopt.context_templates`
    cannot stand in: they are keyed on the model's fingerprint, which an edit changes, so a
    second edit made while the first is applied would recompute E[k k^T] on the edited model
    and sample its contexts from it. (Speed alone would not need this: on the bundled model a
    repeated ``key_second_moment`` call for 5 layers reads the disk cache in ~0.25 s.)
    """

    second_moments: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    contexts: dict[tuple[int, int, int], tuple[str, ...]] = field(default_factory=dict)

    def second_moments_for(self, lm: LoadedModel, layers: Sequence[int], n_tokens: int) -> dict[int, torch.Tensor]:
        """``{layer: E[k k^T]}`` (each ``[d_mlp, d_mlp]``) over ``n_tokens`` tokens, computed once per layer."""
        missing = [layer for layer in layers if (layer, n_tokens) not in self.second_moments]
        if missing:
            computed = key_second_moment(lm, missing, n_tokens=n_tokens, progress=False)
            self.second_moments.update({(layer, n_tokens): c for layer, c in computed.items()})
        return {layer: self.second_moments[layer, n_tokens] for layer in layers}

    def contexts_for(self, lm: LoadedModel, z: ZParams) -> tuple[str, ...]:
        """Eq. 16's context templates for ``z``'s settings, sampled once."""
        key = (z.n_contexts, z.context_tokens, z.context_seed)
        if key not in self.contexts:
            self.contexts[key] = tuple(context_templates(lm, *key[:2], seed=key[2]))
        return self.contexts[key]


@dataclass
class ExplorerState:
    """What the panels share: the model, the settings and the edits applied so far.

    Attributes:
        lm: the model the panels explore and edit.
        window: layers restored together in MLP / attention traces (ROME: 10; capped at the depth).
        hparams: hyper-parameters to use instead of a method's defaults, by registry name
            (``{"memit": MemitHyperParams(...), "rome-seq": RomeHyperParams(...)}``; aliases such
            as ``"rome"`` are accepted); an edit's layers (and λ) replace theirs.
        edits: the stack of applied edits, newest last; :func:`undo` pops one.
        unedited: E[k k^T] and the context prefixes read before the first edit (:class:`UneditedInputs`).

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.hparams import RomeHyperParams
        >>> list(ExplorerState(load_model("tiny-gpt2"), hparams={"rome": RomeHyperParams(layer=1)}).hparams)
        ['rome-seq']
    """

    lm: LoadedModel
    window: int = 10
    hparams: Mapping[str, Any] = field(default_factory=dict)
    edits: list[_AppliedEdit] = field(default_factory=list)
    unedited: UneditedInputs = field(default_factory=UneditedInputs)

    def __post_init__(self) -> None:
        by_name = {get_method(name).name: hp for name, hp in self.hparams.items()}
        for name, hp in by_name.items():
            expected = METHODS[name].hparams
            if not isinstance(hp, expected):
                raise TypeError(f"hparams[{name!r}] must be a {expected.__name__}, got {type(hp).__name__}")
        self.hparams = by_name


def _hparams(state: ExplorerState, method: Method) -> Any:
    """The state's hyper-parameters for ``method``, else the method's defaults for the model."""
    given = state.hparams.get(method.name)
    return method.defaults(state.lm) if given is None else given


def _default_layers(state: ExplorerState, name: str = "memit") -> tuple[int, ...]:
    return _edit_layers(_hparams(state, get_method(name)))


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
    return TraceView(result, _default_layers(state), _default_layers(state, "rome-seq")[0], fact_layers)


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


def _fact_layers(state: ExplorerState, result: CausalTrace, samples: int) -> tuple[int, ...] | None:
    """:func:`memit_lab.layer_choice.recommend_layers` on the traced fact alone, as wide as MEMIT's default range."""
    n = len(_default_layers(state))
    try:  # the trace is a fact of its own: a prompt, a subject and a target
        return recommend_layers(state.lm, [result], n, samples=samples, seed=result.seed, use_cache=False).layers
    except ValueError:
        return None


# -- the edit playground ----------------------------------------------------------------------------------------


#: A prompt watched during an edit: (fact index, probe kind, prompt, new object).
_Probe = tuple[int, str, str, str]


def _probes(facts: Sequence[FactEdit]) -> list[_Probe]:
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


def _scores(lm: LoadedModel, probes: Sequence[_Probe]) -> list[float]:
    """P(new object | prompt) of every probe: the product of its tokens' probabilities."""
    scores = target_scores(lm, [p[2] for p in probes], [p[3] for p in probes])
    return [float(p) for p in scores.prob]


def _generations(lm: LoadedModel, probes: Sequence[_Probe], max_new_tokens: int) -> list[str]:
    return [text.strip() for text in generate(lm, [p[2] for p in probes], max_new_tokens)]


@dataclass(frozen=True)
class _Scored:
    """P(new object) and the greedy continuation of every probe, at one moment."""

    probs: list[float]
    generations: list[str]


def _score(lm: LoadedModel, probes: Sequence[_Probe], max_new_tokens: int) -> _Scored:
    return _Scored(_scores(lm, probes), _generations(lm, probes, max_new_tokens))


def _check_edit_input(
    state: ExplorerState, facts: Sequence[FactEdit], lam: float | None, takes_lam: bool
) -> Message | None:
    if not facts:
        return Message("Add at least one fact: a prompt containing its subject, the subject, and a new object.")
    if takes_lam and not (isinstance(lam, int | float) and math.isfinite(lam) and lam > 0):
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


@dataclass(frozen=True)
class _EditPlan:
    """A checked edit: the method, its label, and its hyper-parameters with the chosen layers (and λ)."""

    method: Method
    label: str
    hparams: Any
    layers: tuple[int, ...]
    lam: float | None


def _plan_edit(
    state: ExplorerState, facts: Sequence[FactEdit], method: str, layers: Sequence[int] | str | None, lam: float | None
) -> _EditPlan | Message:
    """The edit ``apply_edit`` was asked for, with the defaults filled in, or a message saying what is wrong."""
    found = _find_method(method)
    if found is None:
        return Message(f"method must be one of {', '.join(method_labels())}, not {method!r}")
    label, n_layers = _label(found.name), state.lm.n_layers
    hp = _hparams(state, found)
    lam = (hp.lam if lam is None else lam) if _has_lam(hp) else None
    problem = _check_edit_input(state, facts, lam, _has_lam(hp))
    if problem is not None:
        return problem
    try:
        wanted = parse_layers(layers, n_layers) if isinstance(layers, str) else layers
    except ValueError as err:
        return Message(str(err))
    chosen = tuple(sorted(set(wanted))) if wanted else _edit_layers(hp)
    if not all(0 <= layer < n_layers for layer in chosen):
        return Message(f"layers {list(chosen)} do not exist: this model has layers 0..{n_layers - 1}")
    if not hasattr(hp, "layers") and len(chosen) != 1:
        default = _edit_layers(hp)[0]
        return Message(f"{label} edits one layer: type one layer number (the default for this model: {default})")
    return _EditPlan(found, label, _with_layers(hp, chosen, lam), chosen, None if lam is None else float(lam))


def _session_inputs(state: ExplorerState, hparams: Any) -> dict[str, Any]:
    """The method's ``second_moments`` and ``contexts`` options, from the model before its first edit."""
    options: dict[str, Any] = {}
    if hasattr(hparams, "stats_tokens"):
        layers = _edit_layers(hparams)
        options["second_moments"] = state.unedited.second_moments_for(state.lm, layers, hparams.stats_tokens)
    if hasattr(hparams, "z"):
        options["contexts"] = state.unedited.contexts_for(state.lm, hparams.z)
    return options


def _run_edit(state: ExplorerState, plan: _EditPlan, facts: Sequence[FactEdit]) -> EditResult | Message:
    """Apply the planned edit in place; a ``ValueError`` becomes a message, and any failure leaves W_out as it was."""
    # Every registered method rolls back its own failures; the guard keeps the playground's promise (a failed
    # edit changes nothing) for any method, at the cost of one more copy of the edited W_out during the edit.
    guard = WeightBackup.of(state.lm, plan.layers)
    try:
        return plan.method(state.lm, _requests(facts), plan.hparams, **_session_inputs(state, plan.hparams))
    except ValueError as err:
        guard.restore()
        return Message(str(err))
    except BaseException:
        guard.restore()
        raise


def _edit_frame(probes: Sequence[_Probe], before: _Scored, after: _Scored) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "fact": [p[0] for p in probes],
            "probe": [p[1] for p in probes],
            "prompt": [p[2] for p in probes],
            "new_object": [p[3] for p in probes],
            "p_before": before.probs,
            "p_after": after.probs,
            "generation_before": before.generations,
            "generation_after": after.generations,
        }
    )


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
    """Write ``facts`` into the model with a registered method (MEMIT: paper Algorithm 1), and show what changed.

    ``method`` is a playground label (:func:`method_labels`: ``"MEMIT"``, ``"ROME"``,
    ``"FT-L"``, ``"FT-W"``) or a registry name. :func:`undo` puts the edited weights back, bit for bit.
    ``layers`` defaults to the method's (MEMIT's recommended R, ROME's, FT-L's and FT-W's one layer);
    ``lam`` (λ of eq. 14-15, MEMIT only: ROME's update is exact on its key, so scaling C
    changes nothing) to MEMIT's default. Several facts: MEMIT, FT-L and FT-W write them at once,
    ROME one after the other. Bad input gives a :class:`Message` and changes nothing.
    """
    plan = _plan_edit(state, facts, method, layers, lam)
    if isinstance(plan, Message):
        return plan
    probes = _probes(facts)
    progress("scoring the probes before the edit", 0.05)
    before = _score(state.lm, probes, max_new_tokens)
    progress(f"{plan.label}: computing the update of layers {layer_text(plan.layers)}", 0.2)
    start = time.perf_counter()
    result = _run_edit(state, plan, facts)
    if isinstance(result, Message):
        return result
    seconds = time.perf_counter() - start
    progress("scoring the probes after the edit", 0.85)
    after = _score(state.lm, probes, max_new_tokens)
    view = EditView(plan.label, plan.layers, plan.lam, tuple(facts), _edit_frame(probes, before, after), seconds)
    state.edits.append(_AppliedEdit(result, view))
    progress("done", 1.0)
    return view


def _requests(facts: Sequence[FactEdit]) -> list[EditRequest]:
    return [EditRequest(_template(f.prompt, f.subject), f.subject, f.new_object.strip()) for f in facts]


def undo(state: ExplorerState) -> UndoView | Message:
    """Undo the newest edit (its result's ``restore``: W_out as before it, bit for bit), and rescore its probes."""
    if not state.edits:
        return Message("Nothing to undo: no edit is applied.", level="info")
    applied = state.edits.pop()
    applied.result.restore()
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


def _show(out: w.Output, result: View, figures: Sequence[Figure] = ()) -> None:
    """Replace ``out``'s content with ``result``'s summary and figures (closed after display)."""
    out.clear_output(wait=True)
    with out:
        display(w.HTML(render(result)))
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
        self.method = w.ToggleButtons(options=list(method_labels()), value=_label("memit"))
        self.layers = _text("Layers", "", "e.g. 3-7 (empty: recommended)", width="260px")
        self.lam = w.FloatText(
            description="λ",
            tooltip="MEMIT's weight of the old memories (eq. 14-15); the other methods have none",
            layout=w.Layout(width="180px"),
        )
        self._method_defaults(self.method.value)
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

    def _method_defaults(self, label: str) -> None:
        """The chosen method's default layers and λ; the λ field greyed out for a method without one."""
        found = _find_method(label)
        assert found is not None  # the toggle offers registered methods only
        hp = _hparams(self.state, found)
        self.layers.value = layer_text(_edit_layers(hp))
        if _has_lam(hp):
            self.lam.value = hp.lam
        # ROME: a rank-one update exact on its key, scaling C changes nothing; FT-L and FT-W have no C; AlphaEdit
        # projects its update instead of weighing C.
        self.lam.disabled = not _has_lam(hp)

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

    ``hparams``: as :attr:`ExplorerState.hparams`, by registry name. Show the panels one by one
    (``explorer.trace.widget`` ...) or all in tabs (``explorer.widget``).
    """

    def __init__(
        self,
        lm: LoadedModel,
        fact: Fact | None = None,
        samples: int = 3,
        hparams: Mapping[str, Any] | None = None,
    ) -> None:
        fact = KNOWN_FACTS[0] if fact is None else fact
        self.state = ExplorerState(lm, hparams=hparams or {})
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
