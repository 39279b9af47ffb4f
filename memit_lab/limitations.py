"""The limit the paper states: an edit is one directed association, not a symmetric fact.

MEMIT writes (s, r, o) as a value stored under the key of the subject s -- the input of
W_out at s's last token (eq. 7-14). Asking the inverse question ("Tim Cook is the CEO of")
reads keys of *another* subject (Tim Cook), which the update barely touches, so nothing
retrieves the edited subject (Apple). This module measures that:

* :data:`TWO_WAY_FACTS` -- facts with a natural question in each direction: the CEOs of
  six companies (new to the bundled model: it writes a fact the model lacked, the paper's
  own example) and six capitals sent to another country's capital (counterfactual).
* :func:`forward_requests` / :func:`inverse_requests` -- the edit in either direction.
* :func:`direction_scores` -- for each fact, both questions scored as a multiple choice
  among the relation's candidates (its six objects forward, its six subjects inverse).
* :func:`update_response` -- ||Delta^l k|| at every token of a prompt: how strongly the
  update responds to each key it meets.

A second limit, of where MEMIT writes rather than what: a subject whose last token is the
prompt's **first** token ("Facebook is a multinational company from", on a tokenizer that
adds no BOS token). Position 0 is the model's attention sink: from the early layers on its
residual stream carries massive activations (Sun et al. 2024, "Massive activations in large
language models") and most heads attend to it without reading anything from it (Xiao et al.
2023, "Efficient streaming language models with attention sinks"). z (eq. 16) and the keys
(eq. 19) read there belong to a state the rest of the prompt ignores, so the edit is written
but the bare prompt does not read it; put any token before the subject and it does.

* :func:`subject_at_first_token` -- is a request's subject at position 0?
* :func:`residual_norms` -- ||h^l|| at position 0 against the other positions, every layer.
* :func:`final_norm_norms` -- the same just before and just after the final norm, which scales every
  token back to a common size (the drop in the last row of :func:`residual_norms`).
* :func:`efficacy_by_prefix` -- the efficacy test (P(new) > P(true)) on the prompt as it is
  and after a few prefixes.

Example:
    >>> f = TWO_WAY_FACTS[0]
    >>> f.forward_prompt, f.inverse_prompt
    ('The CEO of Apple is', 'Tim Cook is the CEO of')
    >>> forward_requests([f])[0].text, inverse_requests([f])[0].text, inverse_requests([f])[0].target_new
    ('The CEO of Apple is', 'Tim Cook is the CEO of', 'Apple')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from .editing import WeightBackup
from .evaluate import mean_nll, paired_nll
from .hooks import Trace
from .models import LoadedModel
from .requests import EditRequest
from .zopt import tokenise_prompt

__all__ = [
    "TWO_WAY_FACTS",
    "TwoWayFact",
    "direction_scores",
    "efficacy_by_prefix",
    "final_norm_norms",
    "forward_requests",
    "inverse_requests",
    "residual_norms",
    "subject_at_first_token",
    "update_response",
]


@dataclass(frozen=True)
class TwoWayFact:
    """A fact (subject, relation, object) with a question in each direction.

    Attributes:
        relation: a name for the relation; candidates for the multiple choice come from facts sharing it.
        forward: template asking for the object, ``{}`` = subject (``"The CEO of {} is"``).
        inverse: template asking for the subject, ``{}`` = object (``"{} is the CEO of"``).
        subject: ``"Apple"``.
        obj: the object the edit writes (``"Tim Cook"``).
        obj_true: what the object is in the world, if the edit is counterfactual (reports only).
    """

    relation: str
    forward: str
    inverse: str
    subject: str
    obj: str
    obj_true: str = ""

    @property
    def forward_prompt(self) -> str:
        return self.forward.format(self.subject)

    @property
    def inverse_prompt(self) -> str:
        return self.inverse.format(self.obj)


_CEOS = [("Apple", "Tim Cook"), ("Microsoft", "Satya Nadella"), ("Google", "Sundar Pichai"),
         ("Nvidia", "Jensen Huang"), ("AMD", "Lisa Su"), ("Adobe", "Shantanu Narayen")]  # fmt: skip
_CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Japan", "Tokyo"), ("Italy", "Rome"),
             ("Spain", "Madrid"), ("China", "Beijing")]  # fmt: skip

#: CEOs as of 2024 (true facts the bundled model does not know), and each capital moved to the next country's.
TWO_WAY_FACTS: tuple[TwoWayFact, ...] = tuple(
    [TwoWayFact("ceo", "The CEO of {} is", "{} is the CEO of", s, o) for s, o in _CEOS]
    + [
        TwoWayFact("capital", "The capital of {} is", "{} is the capital of", s, _CAPITALS[(i + 1) % 6][1], o)
        for i, (s, o) in enumerate(_CAPITALS)
    ]
)


def forward_requests(facts: Sequence[TwoWayFact]) -> list[EditRequest]:
    """Edit the forward direction: "The CEO of Apple is" -> "Tim Cook"."""
    return [EditRequest(f.forward, f.subject, f.obj, f.obj_true or None, f.relation) for f in facts]


def inverse_requests(facts: Sequence[TwoWayFact]) -> list[EditRequest]:
    """Edit the inverse direction: "Tim Cook is the CEO of" -> "Apple" (its own edit, with its own key)."""
    return [EditRequest(f.inverse, f.obj, f.subject, None, f.relation + "-inverse") for f in facts]


def _choice(lm: LoadedModel, prompt: str, answer: str, candidates: Sequence[str]) -> tuple[float, bool]:
    """P(answer) (per-token geometric mean) and whether it beats every other candidate after ``prompt``."""
    nll = mean_nll(lm, [prompt] * len(candidates), list(candidates))
    return float(np.exp(-nll[candidates.index(answer)])), bool(candidates[int(nll.argmin())] == answer)


def direction_scores(lm: LoadedModel, facts: Sequence[TwoWayFact]) -> pd.DataFrame:
    """Per fact, both directions as a multiple choice among the relation's candidates.

    Columns: ``p_forward`` = P(obj | forward prompt) and ``forward_hit`` (obj is the most
    likely of the relation's objects, the paper's efficacy as a choice); ``p_inverse`` =
    P(subject | inverse prompt) and ``inverse_hit`` (subject beats the relation's other
    subjects). Chance for a hit is 1 / (facts in the relation).

    Example:
        >>> from memit_lab import load_model
        >>> frame = direction_scores(load_model("tiny-llama"), TWO_WAY_FACTS[:2])
        >>> list(frame.columns), frame.forward_hit.dtype
        (['relation', 'subject', 'obj', 'p_forward', 'forward_hit', 'p_inverse', 'inverse_hit'], dtype('bool'))
    """
    rows = []
    for f in facts:
        same = [g for g in facts if g.relation == f.relation]
        p_fwd, fwd_hit = _choice(lm, f.forward_prompt, f.obj, [g.obj for g in same])
        p_inv, inv_hit = _choice(lm, f.inverse_prompt, f.subject, [g.subject for g in same])
        rows.append({"relation": f.relation, "subject": f.subject, "obj": f.obj, "p_forward": p_fwd,
                     "forward_hit": fwd_hit, "p_inverse": p_inv, "inverse_hit": inv_hit})  # fmt: skip
    return pd.DataFrame(rows)


@torch.no_grad()
def update_response(lm: LoadedModel, backup: WeightBackup, prompt: str) -> Float[torch.Tensor, "layer pos"]:
    """||Delta^l k^l_t|| for every edited layer l and token t of ``prompt``: what the update adds there.

    Delta^l is the weights now minus the copy in ``backup`` (an edit's ``result.backup``);
    k^l_t the input of W_out^l at token t (the key of eq. 7). An update made for key k_s
    responds to another key k in proportion to how much k points along the directions
    Delta^l reads -- for MEMIT, C^-1 k_s (eq. 14), nearly orthogonal to unrelated keys.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> backup = WeightBackup.of(lm, [1])
        >>> update_response(lm, backup, "The capital of France is").abs().max().item()  # no edit yet
        0.0
    """
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    rows = []
    for layer, saved in sorted(backup.saved.items()):
        # to_stored only transposes when the model stores W_out as [d_mlp, d_model]: it is its own inverse.
        delta = lm.adapter.to_stored(lm.adapter.w_out_parameter(lm.model, layer) - saved)
        with Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True, retain_output=False) as t:
            lm.model(input_ids=ids, use_cache=False)
        assert t.input is not None
        rows.append((t.input[0].float() @ delta.float().T).norm(dim=-1))
    return torch.stack(rows)


# --- a subject at the first token: the attention sink ----------------------------------------------------------


def subject_at_first_token(lm: LoadedModel, request: EditRequest) -> bool:
    """Whether the subject's last token -- where z and the keys are read -- is the prompt's first token.

    Only a one-token subject that opens the prompt, on a tokenizer that adds no BOS token.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")  # GPT-2's tokenizer adds no BOS token
        >>> subject_at_first_token(lm, EditRequest("{} is a company from", "X", "France"))
        True
        >>> subject_at_first_token(lm, EditRequest("The company {} is from", "X", "France"))
        False
        >>> subject_at_first_token(lm, EditRequest("{} is a city in", "Rome", "France"))  # "R", "ome": position 1
        False
    """
    return tokenise_prompt(lm, request, "{}", None).subject_last == 0


@torch.no_grad()
def residual_norms(lm: LoadedModel, prompt: str) -> pd.DataFrame:
    """||h^l|| of the residual stream at position 0 and the mean over the other positions, for every layer.

    Row ``layer = 0`` is the embeddings, row ``l`` the output of block ``l - 1`` (the last row
    is after the final norm). A first token far larger than the rest is the attention sink.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> frame = residual_norms(lm, "Rome is in Italy")
        >>> list(frame.columns), len(frame) == lm.n_layers + 1
        (['layer', 'first token', 'other tokens'], True)
    """
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    if ids.shape[1] < 2:
        raise ValueError(f"{prompt!r} is one token; residual_norms compares the first token with the others")
    states = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    norms = torch.stack([h[0].float().norm(dim=-1) for h in states]).cpu()
    return pd.DataFrame(
        {"layer": range(len(states)), "first token": norms[:, 0].numpy(), "other tokens": norms[:, 1:].mean(1).numpy()}
    )


@torch.no_grad()
def final_norm_norms(lm: LoadedModel, prompt: str) -> pd.DataFrame:
    """||x|| just before and just after the final norm (the one before the unembedding): first token and the others.

    The final norm maps each token's vector x to gamma * x / s(x), with s(x) its root mean square
    (RMSNorm; LayerNorm subtracts the mean first and divides by the standard deviation). The length
    afterwards depends on x's direction and gamma, not on ||x||: a first token hundreds of times
    longer than the others comes out at their scale. That is the drop in the last row of
    :func:`residual_norms`, which is after this norm.

    Returns:
        Index ``first token``, ``other tokens`` (the mean over positions 1...); columns
        ``before final norm`` (the output of the last block) and ``after final norm``.

    Example:
        >>> from memit_lab import load_model
        >>> frame = final_norm_norms(load_model("tiny-llama"), "Rome is in Italy")
        >>> list(frame.index), list(frame.columns)
        (['first token', 'other tokens'], ['before final norm', 'after final norm'])
    """
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    if ids.shape[1] < 2:
        raise ValueError(f"{prompt!r} is one token; final_norm_norms compares the first token with the others")
    with Trace(lm.model, lm.adapter.final_norm, retain_input=True) as t:
        lm.model(input_ids=ids, use_cache=False)
    assert t.input is not None and t.output is not None
    rows = {}
    for column, x in (("before final norm", t.input), ("after final norm", t.output)):
        norms = x[0].float().norm(dim=-1).cpu()  # [pos]
        rows[column] = [float(norms[0]), float(norms[1:].mean())]
    return pd.DataFrame(rows, index=["first token", "other tokens"])


def efficacy_by_prefix(
    lm: LoadedModel, requests: Sequence[EditRequest], prefixes: Sequence[str] = ("", "\n", ". ")
) -> pd.DataFrame:
    r"""Per request, whether P(target_new) > P(target_true) (mean per-token NLL, the efficacy test) after each prefix.

    Columns: ``subject``, ``at first token`` (:func:`subject_at_first_token`), then one boolean
    column per prefix, named by its ``repr`` (``''`` is the prompt as it is).

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> r = EditRequest("{} is in", "Rome", "Paris", "Italy")
        >>> list(efficacy_by_prefix(lm, [r], ["", "\n"]).columns)
        ['subject', 'at first token', "''", "'\\n'"]
    """
    if any(r.target_true is None for r in requests):
        raise ValueError("efficacy needs each request's target_true (the object the model says now)")
    frame = pd.DataFrame(
        {"subject": [r.subject for r in requests], "at first token": [subject_at_first_token(lm, r) for r in requests]}
    )
    for prefix in prefixes:
        prompts = [prefix + r.text for r in requests]
        new, true = paired_nll(lm, prompts, [r.target_new for r in requests], [r.target_true or "" for r in requests])
        frame[repr(prefix)] = new < true  # the ES test of memit_lab.evaluate, on the prefixed prompts
    return frame
