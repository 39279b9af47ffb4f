"""Checks of assignment 1, the residual stream and the logit lens (eq. 2-6).

References: :mod:`memit_lab.residual` (``decompose_resid``, ``lens_logits``, ``logit_lens``,
``direct_logit_attribution``), on tiny random models whose final norm is randomised and on the
bundled model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from ..facts import KNOWN_FACTS
from ..models import LoadedModel, load_model
from ..prompts import last_subject_token
from ..residual import (
    ResidCache,
    ResidStack,
    accumulated_resid,
    decompose_resid,
    direct_logit_attribution,
    freeze_final_norm,
    lens_logits,
    logit_lens,
    run_with_cache,
)
from .answers import close, describe, relative_gap
from .core import Case, Property, exercise
from .inputs import BUNDLED, generator

__all__ = ["check_direct_attribution", "check_first_top1_layer", "check_lens_probs", "check_residual_components"]

_TINY_RESID = ("tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-neox")
_LENS_HINT = "apply the final norm, then the unembedding, then softmax(dim=-1)"
_TOP1_HINT = "the smallest L with argmax(probs[L]) == target_id (or None)"


# -- inputs --------------------------------------------------------------------------------


def _fact_prompts(seed: int, n: int) -> list[str]:
    """``n`` distinct known-fact prompts, chosen with a seeded generator."""
    order = torch.randperm(len(KNOWN_FACTS), generator=generator(seed)).tolist()
    prompts = list(dict.fromkeys(KNOWN_FACTS[i].prompt for i in order))
    return prompts[:n]


@dataclass(frozen=True)
class _PromptCase:
    """A model, a prompt and where to look in it."""

    model: str
    prompt: str
    layer: int
    pos: int
    lm: LoadedModel = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.model}, {self.prompt!r}, layer={self.layer}, pos={self.pos}"


def _prompt_cases(models: tuple[str, ...], seed: int) -> Iterator[tuple[_PromptCase, ResidCache]]:
    """For each tiny model a random known-fact prompt, layer and position; then the bundled model on a fact.

    On the bundled model the position is the subject's last token of "The Eiffel Tower ..."
    (where MEMIT edits), and the layer a middle one.
    """
    g = generator(seed)
    for model, prompt in zip(models, _fact_prompts(seed, len(models)), strict=True):
        lm = load_model(model)
        _randomise_final_norm(lm, g)
        cache = run_with_cache(lm, prompt)
        layer = int(torch.randint(0, lm.n_layers + 1, (), generator=g))
        pos = int(torch.randint(0, cache.n_pos, (), generator=g))
        yield _PromptCase(model, prompt, layer, pos, lm), cache
    lm = load_model(BUNDLED)
    fact = KNOWN_FACTS[0]
    pos = last_subject_token(lm.tokenizer, fact.prompt, fact.subject)
    yield _PromptCase(BUNDLED, fact.prompt, 12, pos, lm), run_with_cache(lm, fact.prompt)


def _randomise_final_norm(lm: LoadedModel, g: torch.Generator) -> None:
    """Give a fresh tiny model's final norm random gains and biases (they start at 1 and 0, which hides mistakes)."""
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    with torch.no_grad():
        for param in norm.parameters():
            param.copy_(
                1.0 + 0.5 * torch.randn(param.shape, generator=g)
                if param is norm.weight
                else 0.5 * torch.randn(param.shape, generator=g)
            )


# -- 1.1 the terms of the residual stream ----------------------------------------------------


@exercise(decompose_resid)
def check_residual_components() -> Iterator[Case]:
    """Exercise 1.1: ``fn(cache, layer, pos)`` -> the components of h^layer at ``pos`` (eq. 6).

    Expected: ``[component, d_model]``, rows in the order the model adds them: ``embed``,
    (``pos_embed``,) ``attn_0``, ``mlp_0``, ..., ``attn_{layer-1}``, ``mlp_{layer-1}``.
    Property checked first: the rows add up to the hidden state the model computed.
    """
    for case, cache in _prompt_cases(_TINY_RESID, seed=11):
        stack = decompose_resid(cache, case.layer, case.pos)
        yield Case(
            case.name,
            (cache, case.layer, case.pos),
            stack.vectors,
            hint=f"the rows add up, but not in the order {', '.join(stack.labels[:5])}, ...",
            mistakes=_component_mistakes(cache, case.layer, case.pos, stack),
            shape_hint=f"expected {len(stack.labels)} rows ({', '.join(stack.labels[:4])}, ...), "
            "one d_model vector each",
            shape_first=True,
            before=partial(_components_add_up, cache.resid(case.layer)[case.pos], case.layer, case.pos),
            atol=1e-5,
        )


def _components_add_up(resid: torch.Tensor, layer: int, pos: int, got: torch.Tensor) -> Iterator[Property]:
    total = got.double().sum(0)
    yield Property(
        relative_gap(total, resid) < 1e-4,
        f"rows that add up to h^{layer} at pos {pos}: {describe(resid)}",
        f"their sum is {describe(total)}",
        "eq. 6: h^L = embedding + sum over blocks l < L of (attn_l + mlp_l)",
        answer=got,
    )


def _component_mistakes(cache: ResidCache, layer: int, pos: int, stack: ResidStack) -> dict[str, Any]:
    expected = stack.vectors
    n_embed = len(stack.labels) - 2 * layer
    mistakes: dict[str, Any] = {
        "you included block `layer` itself: h^L is the sum up to block L-1 (the input of block L)": (
            decompose_resid(cache, layer + 1, pos).vectors if layer < cache.n_layers else None
        ),
        "the embedding is missing: h^L starts from h^0 = the token embedding (cache['embed'])": expected[1:],
        "the position embedding is missing: GPT-2 adds cache['pos_embed'] to the token embedding": (
            torch.cat([expected[:1], expected[2:]]) if n_embed == 2 else None
        ),
    }
    if cache.check_pos(pos) != cache.n_pos - 1:
        mistakes["that is the last position: use the position `pos` you were given"] = decompose_resid(
            cache, layer, -1
        ).vectors
    if layer > 0:
        blocks = expected[n_embed:].view(-1, 2, expected.shape[-1]).flip(1).reshape(-1, expected.shape[-1])
        mistakes["the order within a block is attention first, then MLP: attn_l, mlp_l"] = torch.cat(
            [expected[:n_embed], blocks]
        )
    return mistakes


# -- 1.2 the logit lens -----------------------------------------------------------------------


@exercise(lens_logits)
def check_lens_probs() -> Iterator[Case]:
    """Exercise 1.2: ``fn(lm, resid)`` -> the logit lens's next-token probabilities ``[..., d_vocab]``.

    Expected: the final norm, the unembedding, then a softmax over the vocabulary, for
    residual states of any leading shape. Property checked first: on the last state
    h^{n_layers} the lens gives the model's own output distribution.
    """
    for case, cache in _prompt_cases(("tiny-gpt2", "tiny-neox", "tiny-qwen2"), seed=12):
        lm, final, own = case.lm, cache.resid(cache.n_layers), cache.logits.softmax(-1)
        yield Case(
            f"{case.model}, {case.prompt!r}, the last state h^{cache.n_layers} at every position",
            (lm, final),
            own,  # the property below already holds the answer to this tolerance
            hint=_LENS_HINT,
            mistakes=partial(_lens_mistakes, lm, final),
            shape_hint="one probability per vocabulary entry: shape [*resid.shape[:-1], d_vocab]",
            shape_first=True,
            before=partial(_is_own_distribution, own),
            rtol=1e-4,
            atol=1e-5,
        )
        states = accumulated_resid(cache).vectors
        yield Case(
            f"{case.model}, {case.prompt!r}, every state h^0..h^{cache.n_layers} at every position",
            (lm, states),
            lens_logits(lm, states).softmax(-1),
            hint=_LENS_HINT,
            mistakes=partial(_lens_mistakes, lm, states),
            rtol=1e-4,
            atol=1e-5,
        )


def _is_own_distribution(own: torch.Tensor, got: torch.Tensor) -> Iterator[Property]:
    yield Property(
        close(got, own, 1e-4, 1e-5),
        f"the model's own next-token probabilities, {describe(own)}",
        describe(got),
        _LENS_HINT,
        answer=got,
    )


def _lens_mistakes(lm: LoadedModel, resid: torch.Tensor) -> dict[str, Any]:
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    logits = lens_logits(lm, resid)
    with torch.no_grad():
        no_norm = unembed(resid).float()
    return {
        "the final norm is missing: the unembedding reads norm(h), as in the model's last step": no_norm.softmax(-1),
        "these are logits: turn them into probabilities with a softmax over the vocabulary": logits,
        "these are log-probabilities: use softmax, not log_softmax": logits.log_softmax(-1),
        "the softmax runs over the wrong dimension: normalise over the vocabulary (dim=-1)": logits.softmax(0),
    }


# -- 1.3 reading the lens ---------------------------------------------------------------------


@exercise()
def check_first_top1_layer() -> Iterator[Case]:
    """Exercise 1.3: ``fn(probs, target_id)`` -> the first layer at which ``target_id`` is the top prediction.

    ``probs`` is the logit lens at one position, ``[layer, d_vocab]`` (row L for h^L);
    the answer is an ``int``, or ``None`` when the target is never top-1. Cases: random
    tables whose answer is known by construction, then the bundled model's lens.
    """
    g = generator(13)
    for answer, n_layer, n_vocab in ((3, 8, 12), (0, 6, 20), (None, 10, 16), (5, 9, 30)):
        probs, target = _lens_table(answer, n_layer, n_vocab, g)
        yield Case(
            f"a random lens table [{n_layer} layers, {n_vocab} tokens], target {target}",
            (probs, target),
            answer,
            hint=f"the answer is {_TOP1_HINT}",
            mistakes=_top1_mistakes(probs, target, answer),
        )
    lm = load_model(BUNDLED)
    for fact in KNOWN_FACTS[:2]:
        cache = run_with_cache(lm, fact.prompt)
        lens = logit_lens(lm, cache, fact.target)
        for pos, where in (
            (-1, "the last token"),
            (last_subject_token(lm.tokenizer, fact.prompt, fact.subject), "the last subject token"),
        ):
            probs = lens_logits(lm, accumulated_resid(cache, pos=pos).vectors).softmax(-1)
            expected = lens.first_top1_layer(pos)
            yield Case(
                f"{BUNDLED}, {fact.prompt!r}, target {lens.target!r} at {where}",
                (probs, lens.target_id),
                expected,
                hint=_TOP1_HINT,
                mistakes=_top1_mistakes(probs, lens.target_id, expected),
            )


def _lens_table(answer: int | None, n_layer: int, n_vocab: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Random probabilities ``[n_layer, n_vocab]`` in which a random target token is first top-1 at layer
    ``answer`` (and peaks later), or never."""
    target = int(torch.randint(0, n_vocab, (), generator=g))
    logits = torch.randn(n_layer, n_vocab, generator=g, dtype=torch.float64)
    logits[:, target] = logits.max(-1).values - 0.5 - torch.rand(n_layer, generator=g, dtype=torch.float64)
    if answer is not None:
        # top-1 from `answer` on, with a dip below top-1 right after it and the highest probability at the end
        boost = torch.linspace(1.0, 3.0, n_layer - answer, dtype=torch.float64)
        logits[answer:, target] = logits[answer:].max(-1).values + boost
        if answer + 1 < n_layer - 1:
            logits[answer + 1, target] = logits[answer + 1].topk(2).values[1] - 0.3
    return logits.softmax(-1), target


def _top1_mistakes(probs: torch.Tensor, target: int, answer: int | None) -> dict[str, Any]:
    top1 = (probs.argmax(-1) == target).tolist()
    stays = len(top1)
    while stays > 0 and top1[stays - 1]:
        stays -= 1
    return {
        "this is the layer where P(target) is highest; the question is where it first becomes the top-1 token": int(
            probs[:, target].argmax()
        ),
        "off by one: row L of probs is h^L, so return the row index itself": None if answer is None else answer + 1,
        "this is the layer from which the target *stays* top-1; the question asks where it first is top-1": (
            stays if stays < len(top1) else None
        ),
    }


# -- 1.4 direct logit attribution --------------------------------------------------------------


@exercise(direct_logit_attribution)
def check_direct_attribution() -> Iterator[Case]:
    """Exercise 1.4: ``fn(lm, cache, target_id, pos)`` -> each component's direct effect on the target's logit.

    Expected ``[component]``, one entry per row of ``decompose_resid(cache, pos=pos)``: the
    component through the final norm with its scale frozen (``freeze_final_norm(...).linear``)
    and then dotted with the target's unembedding row. Property checked first: the entries
    plus the biases' constant add up to the model's own logit.
    """
    for case, cache in _prompt_cases(("tiny-gpt2", "tiny-neox", "tiny-llama"), seed=14):
        lm = case.lm
        target_id = int(cache.logits[case.pos].argmax())
        expected = direct_logit_attribution(lm, cache, target_id, case.pos).attributions
        yield Case(
            f"{case.model}, {case.prompt!r}, pos={case.pos}, target = its top token {target_id}",
            (lm, cache, target_id, case.pos),
            expected,
            hint="compare with direct_logit_attribution",
            mistakes=_attribution_mistakes(lm, cache, target_id, case.pos),
            shape_hint=f"one number per component: {len(expected)} entries",
            shape_first=True,
            before=partial(_adds_up_to_the_logit, lm, cache, target_id, case.pos),
            rtol=1e-4,
            atol=1e-5,
        )


def _adds_up_to_the_logit(
    lm: LoadedModel, cache: ResidCache, target_id: int, pos: int, got: torch.Tensor
) -> Iterator[Property]:
    final = cache.resid(cache.n_layers)[pos]
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    b = 0.0 if unembed.bias is None else float(unembed.bias[target_id])
    constant = float(freeze_final_norm(lm, final).bias @ unembed.weight[target_id].float()) + b
    logit = float(cache.logits[pos, target_id])
    total = float(got.double().sum()) + constant
    yield Property(
        abs(total - logit) <= 1e-3 * max(1.0, abs(logit)),
        f"entries that add up (with the biases' constant {constant:.4g}) to the model's logit {logit:.6g}",
        f"they add up to {total:.6g}",
        "freeze the norm's scale at the full residual (freeze_final_norm), apply "
        "its .linear part to each component, then take the dot product with W_U[target_id]",
        answer=got,
    )


def _attribution_mistakes(lm: LoadedModel, cache: ResidCache, target_id: int, pos: int) -> dict[str, Any]:
    components = decompose_resid(cache, pos=pos).vectors
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[pos])
    u = lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()
    last = cache.n_pos - 1
    with torch.no_grad():
        return {
            "that is the attribution at the last position: use the position `pos` you were given": (
                direct_logit_attribution(lm, cache, target_id, -1).attributions if pos % cache.n_pos != last else None
            ),
            "you applied the real norm to each component: it is not linear, so freeze its scale at the full "
            "residual (freeze_final_norm(...).linear)": norm(components).float() @ u,
            "the norm's bias was added to every component: use the frozen norm's .linear part, not the whole "
            "frozen norm": frozen(components) @ u,
            "the final norm is missing: the unembedding reads the normed residual": components.float() @ u,
        }
