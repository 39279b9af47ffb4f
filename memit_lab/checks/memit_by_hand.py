"""Checks of assignment 4, MEMIT by hand (eq. 16-20, Algorithm 1).

References: :func:`memit_lab.prompts.last_subject_token` (4.1), :func:`memit_lab.zopt.optimise_z`
without its extra terms (4.2), :func:`memit_lab.memit.edit_keys` (4.3) and
:func:`memit_lab.kv_memory.insertion_update` after eq. 20's spread (4.4).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from ..editing import edit_keys, hidden_at_subject
from ..facts import KNOWN_FACTS
from ..hooks import Trace
from ..kv_memory import insertion_update
from ..models import LoadedModel, load_model
from ..prompts import last_subject_token, last_token_of_chars, subject_token_span, target_scores, token_span_of_chars
from ..requests import EditRequest
from ..zopt import ZParams, optimise_z, tokenise_prompt
from .answers import describe, one_element_tensor, relative_gap, scalar
from .core import Case, Property, exercise
from .inputs import BUNDLED, generator, real_keys, spd

__all__ = ["check_average_key", "check_edit_position", "check_layer_update", "check_nll_with_delta"]

_CONTEXTS = ("", "I read this in a book. ", "Here is a fact. ")


# -- 4.1 the edit position -------------------------------------------------------------------------


@exercise(last_subject_token, subject_token_span, last_token_of_chars, token_span_of_chars, tokenise_prompt)
def check_edit_position() -> Iterator[Case]:
    """Exercise 4.1: ``fn(tokenizer, prompt, subject)`` -> the position of the subject's last token.

    Positions index ``tokenizer(prompt).input_ids`` (special tokens included). Property
    checked first: the token there contains the subject's last character.
    """
    for model, facts in (("tiny-gpt2", KNOWN_FACTS[2:4]), ("tiny-llama", KNOWN_FACTS[4:6]), (BUNDLED, KNOWN_FACTS[:3])):
        tok = load_model(model).tokenizer
        for i, fact in enumerate(facts):
            prompt = _CONTEXTS[i % len(_CONTEXTS)] + fact.prompt
            n_tokens, before = len(tok(prompt).input_ids), prompt[: prompt.index(fact.subject)]
            yield Case(
                f"{model} tokenizer, {prompt!r}, subject {fact.subject!r}",
                (tok, prompt, fact.subject),
                last_subject_token(tok, prompt, fact.subject),
                hint="the last token overlapping the subject",
                mistakes={
                    "that is the prompt's last token: MEMIT edits at the subject's last token": n_tokens - 1,
                    "that is the subject's first token: MEMIT edits at its last token": subject_token_span(
                        tok, prompt, fact.subject
                    )[0],
                    "counting the tokens of the text before the subject and of the subject separately does not "
                    "match the tokens of the whole prompt (tokens merge across the boundary): use the tokenizer's "
                    "offsets (return_offsets_mapping=True)": len(tok(before).input_ids)
                    + len(tok(fact.subject, add_special_tokens=False).input_ids)
                    - 1,
                },
                before=partial(_holds_the_last_character, tok, prompt, fact.subject),
            )


def _holds_the_last_character(tok: Any, prompt: str, subject: str, got: Any) -> Iterator[Property]:
    enc = tok(prompt, return_offsets_mapping=True)
    last_char = prompt.index(subject) + len(subject) - 1
    ok = isinstance(got, int) and 0 <= got < len(enc.input_ids)
    a, b = enc.offset_mapping[got] if ok else (0, 0)
    shown = repr(tok.decode([enc.input_ids[got]])) if ok else "no token"
    yield Property(
        ok and a <= last_char < b,
        f"a position whose token contains the subject's last character {prompt[last_char]!r}",
        f"position {got!r}: token {shown}",
        "find the token whose character span (offset mapping) contains the subject's last character",
        answer=got,
    )


# -- 4.2 the loss of eq. 16 with delta ----------------------------------------------------------------


@exercise(target_scores, optimise_z)
def check_nll_with_delta() -> Iterator[Case]:
    """Exercise 4.2: ``fn(lm, prompts, subject, target, layer, delta)`` -> eq. 16's loss, differentiable in delta.

    The loss is -1/N sum_j log P(target | x_j + p), each log P averaged over the target's
    tokens (as the paper's code and :mod:`memit_lab.zopt` do), with ``delta`` added to the
    output of block ``layer`` at the subject's last token of every prompt. The reference is
    :func:`memit_lab.zopt.optimise_z` without its extra terms, run for one Adam step: it
    gives the loss at delta = 0, the step it took and the loss there. Checked: the loss at
    both points, that the gradient reaches delta, and that at delta = 0 it points the way
    the optimiser stepped.
    """
    contexts = tuple(context + "{}" for context in _CONTEXTS)
    # eq. 16 alone (no KL, no weight decay, no clamp), one Adam step, then one more pass to measure
    bare = ZParams(steps=2, lr=0.5, weight_decay=0.0, kl_weight=0.0, clamp=1e6, stop_loss=0.0, n_contexts=0)
    for model, layer, fact, target in (
        ("tiny-gpt2", 1, KNOWN_FACTS[0], "London"),  # 5 tokens
        ("tiny-llama", 0, KNOWN_FACTS[3], "Berlin"),  # 1 token
        (BUNDLED, 6, KNOWN_FACTS[2], "Reykjavik"),  # 4 tokens
    ):
        lm = load_model(model)
        request = EditRequest(fact.template, fact.subject, target)
        prompts = [context.replace("{}", request.text) for context in contexts]
        reference = optimise_z(lm, [request], layer, bare, contexts=contexts)
        (at_zero, at_step), step = reference.losses[0], reference.delta[0].cpu()
        subject_pos = [last_subject_token(lm.tokenizer, p, fact.subject) for p in prompts]
        n_tokens = len(target_scores(lm, prompts[:1], [target]).tokens[0])
        mistakes = partial(_nll_mistakes, lm, prompts, target, layer, subject_pos=subject_pos, n_tokens=n_tokens)
        delta = torch.zeros(lm.d_model).requires_grad_()
        yield Case(
            f"{model}, layer {layer}, {len(prompts)} prompts ending {fact.prompt!r} -> {target!r}, delta = 0",
            (lm, prompts, fact.subject, target, layer, delta),
            mistakes=partial(mistakes, torch.zeros(lm.d_model), at_zero),
            before=partial(_loss_at_zero_reaches_delta, at_zero, delta),
        )
        yield Case(
            f"{model}, layer {layer}, {len(prompts)} prompts -> {target!r}, delta = one Adam step (norm "
            f"{float(step.norm()):.3g})",
            (lm, prompts, fact.subject, target, layer, step.clone()),
            torch.tensor(at_step),
            hint="-(1/N) sum_j mean over the target's tokens of log P(token | x_j + p), with delta added to "
            "block `layer`'s output at the subject's last token",
            mistakes=partial(mistakes, step, at_step),
            shape_hint="return a one-element tensor",
            after=partial(_gradient_against_adams_step, delta, step),
            read=one_element_tensor,
            rtol=1e-3,
            atol=1e-4,
        )


def _loss_at_zero_reaches_delta(at_zero: float, delta: torch.Tensor, got: Any) -> Iterator[Property]:
    """The unedited loss, and a gradient on ``delta`` (the backward pass runs between the two)."""
    value = scalar(got) if isinstance(got, torch.Tensor) else None
    yield Property(
        value is not None and abs(value - at_zero) < 1e-3 * max(1.0, at_zero),
        f"a one-element tensor, the unedited loss {at_zero:.5g} (memit_lab.zopt.optimise_z's first pass)",
        describe(got),
        "return a tensor (not .item(), so gradients flow): the average over prompts of -(mean over the "
        "target's tokens of log P(token | everything before it))",
        answer=None if value is None else torch.tensor(value),
    )
    if isinstance(got, torch.Tensor) and got.requires_grad:
        got.backward()
    grad = delta.grad
    yield Property(
        grad is not None and bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0,
        "a loss whose gradient reaches delta (so Adam can optimise it)",
        "no gradient on delta" if grad is None else f"gradient {describe(grad)}",
        "add delta inside the forward pass (an edit_output hook on the block), without torch.no_grad() "
        "and without detaching",
    )


def _gradient_against_adams_step(delta: torch.Tensor, step: torch.Tensor, got: Any) -> Iterator[Property]:
    """At delta = 0 (the case before), the gradient's signs oppose Adam's first step, -lr * sign(gradient)."""
    grad = delta.grad
    agree = 0.0 if grad is None else float((torch.sign(grad) == -torch.sign(step)).double().mean())
    yield Property(
        agree > 0.95,
        "at delta = 0, a gradient whose signs are opposite to those of memit_lab.zopt's first Adam step "
        "(which is -lr * sign(gradient))",
        f"signs agree on {100 * agree:.0f}% of the entries",
        "the loss must depend on delta the way eq. 16 says: added to block `layer`'s output at the "
        "subject's last token",
    )


def _nll_variant(
    lm: LoadedModel,
    prompts: list[str],
    target: str,
    layer: int,
    delta: torch.Tensor,
    positions: list[int],
    *,
    per_token: bool = True,
) -> float:
    """-mean_j log P(target | prompt_j), per token or summed over the target's tokens, with ``delta`` added to
    block ``layer``'s output at ``positions[j]``: how the check recognises the usual mistakes (the right
    value comes from :func:`memit_lab.zopt.optimise_z`)."""
    rows, cols = torch.arange(len(prompts)), torch.tensor(positions)

    def add(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[rows, cols] += delta.to(out.dtype)
        return out

    with torch.no_grad(), Trace(lm.model, lm.adapter.block(layer), edit_output=add):
        scores = target_scores(lm, prompts, [target] * len(prompts))
    return -float((scores.mean_logprob if per_token else scores.sum_logprob).mean())


def _nll_mistakes(
    lm: LoadedModel,
    prompts: list[str],
    target: str,
    layer: int,
    delta: torch.Tensor,
    expected: float,
    *,
    subject_pos: list[int],
    n_tokens: int,
) -> dict[str, Any]:
    nll = partial(_nll_variant, lm, prompts, target)
    last_pos = [len(lm.tokenizer(p).input_ids) - 1 for p in prompts]
    return {
        "delta went to the prompt's last token: eq. 16 adds it at the subject's last token": torch.tensor(
            nll(layer, delta, last_pos)
        ),
        "delta went to the next block: add it to the output of block `layer` itself": (
            torch.tensor(nll(layer + 1, delta, subject_pos)) if layer + 1 < lm.n_layers else None
        ),
        "delta went to the block before: add it to the output of block `layer` (its input is block layer-1's "
        "output)": torch.tensor(nll(layer - 1, delta, subject_pos)) if layer > 0 else None,
        "the loss is summed over prompts: eq. 16 averages over the prefixes": torch.tensor(expected * len(prompts)),
        f"the target's {n_tokens} tokens were summed: average their log-probabilities, as the paper's code does": (
            torch.tensor(nll(layer, delta, subject_pos, per_token=False)) if n_tokens > 1 else None
        ),
    }


# -- 4.3 the averaged key of eq. 19 -------------------------------------------------------------------


@exercise(edit_keys)
def check_average_key() -> Iterator[Case]:
    """Exercise 4.3: ``fn(lm, layer, prompts, subject)`` -> the key k^l of eq. 19, ``[d_mlp]``.

    The input of W_out^layer at the subject's last token, averaged over the prompts (the
    prefixed versions x_j + p of one request). The reference reads each prompt's key with
    :func:`memit_lab.memit.edit_keys` (each prompt its own request, no further contexts)
    and averages them. Property checked first: the answer is a ``[d_mlp]`` vector.
    """
    for model, layer, fact in (
        ("tiny-gpt2", 2, KNOWN_FACTS[1]),
        ("tiny-neox", 0, KNOWN_FACTS[5]),
        (BUNDLED, 5, KNOWN_FACTS[0]),
    ):
        lm = load_model(model)
        prompts = [context + fact.prompt for context in _CONTEXTS]
        each = [EditRequest(context + fact.template, fact.subject, fact.target) for context in _CONTEXTS]
        keys = edit_keys(lm, each, layer, ("{}",)).T.cpu()
        yield Case(
            f"{model}, layer {layer}, {len(prompts)} prompts ending {fact.prompt!r}",
            (lm, layer, prompts, fact.subject),
            keys.mean(0),
            hint="mean over prompts of W_out's input (not its output) at the subject's last token",
            mistakes=partial(
                _key_mistakes, lm, layer, prompts, EditRequest(fact.template, fact.subject, fact.target), keys
            ),
            shape_hint=f"the key is W_out's input: [d_mlp] = [{lm.d_mlp}], one vector averaged over prompts",
            rtol=1e-4,
            atol=1e-5,
        )


def _key_mistakes(
    lm: LoadedModel, layer: int, prompts: list[str], request: EditRequest, keys: torch.Tensor
) -> dict[str, Any]:
    contexts = tuple(context + "{}" for context in _CONTEXTS)
    return {
        "that is the key at the prompts' last token: eq. 19 reads it at the subject's last token": _keys_at(
            lm, layer, prompts, [len(lm.tokenizer(p).input_ids) - 1 for p in prompts]
        ).mean(0),
        "that is the key of the first prompt only: average over all the prompts": keys[0],
        "that is the sum over prompts: average it": keys.sum(0),
        "that is memit_lab's (and the paper's code's) weighting, 1/2 x the bare prompt + 1/2 x the mean of "
        "the others; this exercise asks for eq. 19's plain mean over the prompts": edit_keys(
            lm, [request], layer, contexts
        )[:, 0].cpu(),
    }


def _keys_at(lm: LoadedModel, layer: int, prompts: list[str], positions: list[int]) -> torch.Tensor:
    """``[n, d_mlp]``: the input of W_out^layer at any one position of each prompt; for keys read at the wrong
    position (the right ones come from :func:`memit_lab.memit.edit_keys`)."""
    rows = []
    for prompt, pos in zip(prompts, positions, strict=True):
        with torch.no_grad(), Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True) as trace:
            lm.model(**lm.tokenizer(prompt, return_tensors="pt").to(lm.device))
        assert trace.input is not None  # the forward pass ran through W_out
        rows.append(trace.input[0, pos].float())
    return torch.stack(rows)


# -- 4.4 one layer of Algorithm 1 ----------------------------------------------------------------------


@exercise(insertion_update)
def check_layer_update() -> Iterator[Case]:
    """Exercise 4.4: ``fn(keys, residuals, layer, layers, c0)`` -> Delta^l of Algorithm 1 (eq. 20 then eq. 14).

    ``residuals`` are z_i - h_i^L ``[d_model, u]`` (what is still missing at the top layer
    L = max(layers)), ``keys`` the k_i^l ``[d_mlp, u]``, ``c0`` = lambda E[k k^T]. This layer
    takes the share r^l = residuals / (L - l + 1) (eq. 20) and writes it with eq. 14:
    Delta = r^l K^T (C0 + K K^T)^-1. Property checked first: Delta (C0 + K K^T) = r^l K^T.
    """
    g = generator(44)
    inputs = []
    for d_model, d_mlp, u, layer in ((4, 10, 3, 3), (6, 12, 2, 5), (5, 8, 4, 7)):
        keys = torch.randn(d_mlp, u, generator=g, dtype=torch.float64)
        residuals = torch.randn(d_model, u, generator=g, dtype=torch.float64)
        name = f"random: {u} edits, d_model {d_model}, d_mlp {d_mlp}, layer {layer} of R = [3, 4, 5, 6, 7]"
        inputs.append((name, keys, residuals, layer, [3, 4, 5, 6, 7], 20.0 * spd(d_mlp, g, 100.0)))
    # real: the keys memit_lab.memit reads for two requests, C0 from corpus keys, residuals at h's scale
    lm = load_model("tiny-llama")
    requests = [EditRequest(f.template, f.subject, "Rome") for f in KNOWN_FACTS[3:5]]
    keys = edit_keys(lm, requests, 1, ("{}",)).double().cpu()
    h = hidden_at_subject(lm, requests, 2).double().cpu()
    residuals = h.norm(dim=-1) * torch.randn(lm.d_model, len(requests), generator=g, dtype=torch.float64) / 8
    corpus = real_keys("tiny-llama", 1, 600)
    name = "tiny-llama: keys of 2 requests at layer 1 of R = [1, 2], C0 = 600 x E[k k^T] over corpus keys"
    inputs.append((name, keys, residuals, 1, [1, 2], corpus @ corpus.T))
    for name, keys, residuals, layer, layers, c0 in inputs:
        share = residuals / (max(layers) - layer + 1)
        expected = insertion_update(share, keys, c0)
        yield Case(
            name,
            (keys.clone(), residuals.clone(), layer, list(layers), c0.clone()),
            expected,
            hint="Delta = r^l K^T (C0 + K K^T)^-1",
            mistakes=_spread_mistakes(keys, residuals, layer, layers, c0, expected),
            shape_hint="Delta has W_out's shape [d_model, d_mlp]",
            shape_first=True,
            before=partial(_solves_eq14_for_the_share, keys, share, c0),
            rtol=1e-6,
            atol=1e-10,
        )


def _solves_eq14_for_the_share(
    keys: torch.Tensor, share: torch.Tensor, c0: torch.Tensor, got: torch.Tensor
) -> Iterator[Property]:
    gap = relative_gap(got.double() @ (c0 + keys @ keys.T), share @ keys.T)
    yield Property(
        gap < 1e-6,
        "Delta (C0 + K K^T) = r^l K^T with r^l = residuals / (L - l + 1) (eq. 20, 14)",
        f"relative mismatch {gap:.3g}",
        "spread first (eq. 20), then solve eq. 14 in float64",
        answer=got,
    )


def _spread_mistakes(
    keys: torch.Tensor, residuals: torch.Tensor, layer: int, layers: list[int], c0: torch.Tensor, expected: torch.Tensor
) -> dict[str, Any]:
    return {
        "the whole residual went into this layer: eq. 20 gives layer l the share 1 / (L - l + 1)": (
            insertion_update(residuals, keys, c0) if layer != max(layers) else None
        ),
        "the share is 1 / (L - l + 1), not 1 / |R|: the residual is recomputed after each layer, so the "
        "lowest layer takes 1/5, the next 1/4 of what is then left, ...": insertion_update(
            residuals / len(layers), keys, c0
        )
        if layer != min(layers)
        else None,
        "off by one: the top layer L takes all that is left, 1 / (L - l + 1) with the + 1": (
            insertion_update(residuals / (max(layers) - layer), keys, c0) if layer != max(layers) else None
        ),
        "transposed: Delta has W_out's shape [d_model, d_mlp]": expected.T,
    }
