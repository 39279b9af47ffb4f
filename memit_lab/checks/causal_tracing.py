"""Checks of assignment 2, causal tracing (ROME section 2).

References: :func:`memit_lab.tracing.trace` with exactly the noise it draws: hidden states (2.2), MLP
outputs restored over a window of layers (2.3, ``kind="mlp"``), its heatmaps (2.4), on tiny models and
the bundled model.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from ..facts import KNOWN_FACTS, Fact
from ..models import LoadedModel, load_model
from ..prompts import subject_token_span
from ..tracing import _add_noise, embedding_noise, restored_prob, restored_window, trace, trace_all
from .answers import describe, one_number, scalar
from .core import Case, Property, exercise
from .inputs import BUNDLED, generator

__all__ = [
    "check_corrupt_subject",
    "check_restored_mlp_window",
    "check_restored_probability",
    "check_strongest_subject_token",
]

#: memit_lab's restorations, refused while a student's restoration runs
_TRACING = (trace, trace_all, restored_prob)


# -- 2.1 corrupting the subject ----------------------------------------------------------------------


@exercise(_add_noise)
def check_corrupt_subject() -> Iterator[Case]:
    """Exercise 2.1: ``fn(embeds, span, noise)`` -> the embeddings with ``noise`` added at the subject's tokens.

    ``embeds`` ``[pos, d_model]``, ``span`` = (start, end) with end exclusive, ``noise``
    ``[end - start, d_model]``. The input must be left unchanged. Checked on random tensors
    and on the bundled model's embeddings of a fact.
    """
    g = generator(21)
    inputs = [
        (f"random embeds [9, 16], span {span}", torch.randn(9, 16, generator=g), span)
        for span in ((2, 5), (0, 1), (6, 9))
    ]
    lm = load_model(BUNDLED)
    fact = KNOWN_FACTS[0]
    with torch.no_grad():
        embeds = lm.model.get_submodule(lm.adapter.embed)(lm.tokenizer(fact.prompt, return_tensors="pt").input_ids)[0]
    span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
    inputs.append((f"{BUNDLED} embeddings of {fact.prompt!r}, subject span {span}", embeds, span))
    for name, x, (start, end) in inputs:
        noise = torch.randn(end - start, x.shape[1], generator=g)
        original = x.clone()
        expected = original.clone()
        expected[start:end] += noise
        shifted = original.clone()
        if end < len(original):
            shifted[start + 1 : end + 1] += noise
        yield Case(
            name,
            (x, (start, end), noise.clone()),
            expected,
            hint="embeds with noise added to rows start..end-1 only",
            mistakes={
                "the noise replaced the subject's embeddings: add it to them": torch.cat(
                    [original[:start], noise, original[end:]]
                ),
                "the noise landed one token late: the span's end is exclusive, rows start..end-1": (
                    shifted if end < len(original) else None
                ),
            },
            before=partial(_input_unchanged, x, original),
        )


def _input_unchanged(x: torch.Tensor, original: torch.Tensor, got: Any) -> Iterator[Property]:
    yield Property(
        torch.equal(x, original),
        "the input embeddings left as they were",
        "your function changed its input in place",
        "work on a copy: embeds.clone()",
    )


# -- 2.2 one restoration --------------------------------------------------------------------------


def _tracing_noise(
    lm: LoadedModel, prompt: str, subject: str, scale: float, seed: int, target_id: int, corrupted: float
) -> torch.Tensor:
    """``[subject, d_model]``: the noise :mod:`memit_lab.tracing` adds with ``samples=1`` and ``seed``.

    Handing the student exactly this draw makes the library's own trace the reference. A
    plain forward pass with the noise added to the embeddings must give the library's
    corrupted probability ``corrupted``; if it does not, the two drifted apart and this
    raises (a bug in memit_lab, not in the student's code).
    """
    span = subject_token_span(lm.tokenizer, prompt, subject)
    draws = torch.randn(1, span[1] - span[0], lm.d_model, generator=generator(seed), dtype=torch.float64)
    noise = (scale * draws).to(lm.device, lm.dtype)[0]
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        embeds = lm.model.get_input_embeddings()(ids)
        embeds[0, span[0] : span[1]] += noise
        direct = float(lm.model(inputs_embeds=embeds).logits[0, -1].float().softmax(-1)[target_id])
    if abs(direct - corrupted) > 1e-4:
        raise RuntimeError("memit_lab.checks no longer reproduces memit_lab.tracing's noise draw: fix _tracing_noise")
    return noise


@exercise(*_TRACING)
def check_restored_probability() -> Iterator[Case]:
    """Exercise 2.2: ``fn(lm, prompt, subject, target_id, layer, pos, noise)`` -> P(target) with one state restored.

    The subject's token embeddings get ``noise`` added (the corrupted run); the output of
    block ``layer`` at ``pos`` is set to its value in the clean run; the answer is the
    probability of ``target_id`` after the prompt. The reference is
    :func:`memit_lab.tracing.trace` with the same noise (one sample). Properties checked first:
    restoring a token before the subject changes nothing (causal attention: the noise has
    not reached it), and restoring the last block at the last token gives back the clean
    probability.
    """
    cases = [
        ("tiny-gpt2", KNOWN_FACTS[1], 1, "subject_last"),
        ("tiny-neox", KNOWN_FACTS[0], 0, "before"),
        (BUNDLED, KNOWN_FACTS[0], 29, "last"),
        (BUNDLED, KNOWN_FACTS[0], 4, "subject_last"),
        (BUNDLED, KNOWN_FACTS[2], 3, "before"),
    ]
    for seed, (model, fact, layer, where) in enumerate(cases, start=22):
        lm = load_model(model)
        span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
        n_pos = len(lm.tokenizer(fact.prompt).input_ids)
        pos = {"subject_last": span[1] - 1, "before": span[0] - 1, "last": n_pos - 1}[where]
        target_id, scale = _top_token(lm, fact.prompt), embedding_noise(lm)
        reference = trace(lm, fact.prompt, fact.subject, target_id, noise=scale, samples=1, seed=seed, positions=[pos])
        expected, clean, corrupted = float(reference.scores[layer, pos]), reference.clean_prob, reference.corrupted_prob
        noise = _tracing_noise(lm, fact.prompt, fact.subject, scale, seed, target_id, corrupted)
        yield Case(
            f"{model}, {fact.prompt!r}, restore block {layer} at pos {pos} ({where.replace('_', ' ')})",
            (lm, fact.prompt, fact.subject, target_id, layer, pos, noise.clone()),
            torch.tensor(expected),
            hint="P(target) at the last token, corrupted, with block `layer`'s output at `pos` restored "
            "(memit_lab.tracing.trace(...).scores[layer, pos] with the same noise)",
            mistakes={
                "that is the clean probability: add the noise to the subject's embeddings "
                "(an edit_output Trace on lm.adapter.embed)": torch.tensor(clean),
                "that is the corrupted probability: nothing was restored": (
                    torch.tensor(corrupted) if abs(expected - corrupted) > 1e-4 else None
                ),
                "you restored block `layer`'s input (block layer-1's output): restore its output": (
                    torch.tensor(float(reference.scores[layer - 1, pos])) if layer > 0 else None
                ),
            },
            shape_hint="return one number: P(target_id) at the last position",
            before=partial(_unchanged_before_clean_at_the_end, where, clean, corrupted),
            read=one_number,
            rtol=1e-4,
        )


def _unchanged_before_clean_at_the_end(where: str, clean: float, corrupted: float, got: Any) -> Iterator[Property]:
    """Before the subject the noise has not arrived yet; at the last block and token the clean run decides."""
    number = scalar(got)
    answer = None if number is None else torch.tensor(number)
    if where == "before":
        yield Property(
            number is not None and abs(number - corrupted) < 1e-4,
            f"the corrupted run's probability {corrupted:.4g}: the noise has not reached this token",
            describe(got),
            "corrupt the subject's embeddings only; restore block `layer`'s output",
            answer=answer,
        )
    if where == "last":
        yield Property(
            number is not None and abs(number - clean) < 1e-4,
            f"the clean run's probability {clean:.4g}: the last block's output decides the prediction",
            describe(got),
            "restore the *output* of block `layer` at `pos`; read P at the last token",
            answer=answer,
        )


# -- 2.3 MLP outputs restored over a window of layers -----------------------------------------------------------


@exercise(*_TRACING, restored_window)
def check_restored_mlp_window() -> Iterator[Case]:
    """Exercise 2.3: ``fn(lm, prompt, subject, target_id, layer, window, pos, noise)`` -> P(target) with the MLP
    outputs of ``window`` layers around ``layer`` restored at ``pos``.

    The window is ROME's: ``window // 2`` layers below ``layer``, the rest from ``layer`` up, cut at the
    model's first and last layer. The reference is :func:`memit_lab.tracing.trace` with ``kind="mlp"`` and
    the same noise (one sample). Property checked first: restoring before the subject changes nothing.
    """
    # the bundled model first: a tiny random model's MLPs barely move P(target), so wrong windows can agree there
    cases = [
        (BUNDLED, KNOWN_FACTS[0], 4, 6, "subject_last"),
        ("tiny-gpt2", KNOWN_FACTS[1], 1, 2, "subject_last"),
        ("tiny-llama", KNOWN_FACTS[4], 0, 3, "subject_last"),
        (BUNDLED, KNOWN_FACTS[2], 27, 5, "last"),
        (BUNDLED, KNOWN_FACTS[0], 12, 4, "before"),
    ]
    for seed, (model, fact, layer, window, where) in enumerate(cases, start=61):
        lm = load_model(model)
        span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
        n_pos = len(lm.tokenizer(fact.prompt).input_ids)
        pos = {"subject_last": span[1] - 1, "before": span[0] - 1, "last": n_pos - 1}[where]
        target_id, scale = _top_token(lm, fact.prompt), embedding_noise(lm)
        run = partial(trace, lm, fact.prompt, fact.subject, target_id, noise=scale, samples=1, seed=seed)
        reference = run(kind="mlp", window=window, positions=[pos])
        expected, corrupted = float(reference.scores[layer, pos]), reference.corrupted_prob
        noise = _tracing_noise(lm, fact.prompt, fact.subject, scale, seed, target_id, corrupted)
        layers = list(restored_window(layer, window, lm.n_layers))
        yield Case(
            f"{model}, {fact.prompt!r}, MLPs of a window of {window} around layer {layer} at pos {pos} "
            f"({where.replace('_', ' ')})",
            (lm, fact.prompt, fact.subject, target_id, layer, window, pos, noise.clone()),
            torch.tensor(expected),
            hint=f"restore the MLP outputs (lm.adapter.mlp_module) of layers {layers[0]}..{layers[-1]} at `pos`, "
            "in one corrupted run (memit_lab.tracing.trace(..., kind='mlp', window=window).scores[layer, pos])",
            mistakes=partial(_window_mistakes, lm, fact, target_id, scale, seed, layer, window, pos),
            shape_hint="return one number: P(target_id) at the last position",
            # only the property before the subject applies: restored MLPs at the last token are not the clean run
            before=partial(
                _unchanged_before_clean_at_the_end, where if where == "before" else "", reference.clean_prob, corrupted
            ),
            read=one_number,
            rtol=1e-4,
        )


def _top_token(lm: LoadedModel, prompt: str) -> int:
    with torch.no_grad():
        logits = lm.model(**lm.tokenizer(prompt, return_tensors="pt").to(lm.device)).logits
    return int(logits[0, -1].argmax())


def _window_mistakes(
    lm: LoadedModel, fact: Fact, target_id: int, scale: float, seed: int, layer: int, window: int, pos: int
) -> dict[str, Any]:
    """The usual wrong restorations, each one corrupted run of memit_lab.tracing.restored_prob (same noise)."""

    def prob(states: list[tuple[str, int, int]]) -> torch.Tensor:
        got = restored_prob(lm, fact.prompt, fact.subject, states, target=target_id, noise=scale, samples=1, seed=seed)
        return torch.tensor(got)

    n = lm.n_layers
    right = list(restored_window(layer, window, n))
    upward = list(range(layer, min(n, layer + window)))
    return {
        "only the centre layer's MLP was restored: restore the whole window of `window` layers": (
            prob([("mlp", layer, pos)]) if len(right) > 1 else None
        ),
        "the window starts at `layer`: ROME centres it, window // 2 layers below `layer`": (
            prob([("mlp", w, pos) for w in upward]) if upward != right else None
        ),
        "those are the hidden states (block outputs) of the window: restore the MLP outputs, "
        "lm.adapter.mlp_module(l)": prob([("hidden", w, pos) for w in right]),
        "those are the attention outputs: restore the MLP outputs, lm.adapter.mlp_module(l)": prob(
            [("attn", w, pos) for w in right]
        ),
    }


# -- 2.4 reading the heatmap ----------------------------------------------------------------------


@exercise()
def check_strongest_subject_token() -> Iterator[Case]:
    """Exercise 2.4: ``fn(scores, span)`` -> the subject token whose restoration helps most.

    ``scores`` is a tracing grid ``[layer, pos]`` of P(target) with one state restored;
    ``span`` the subject's (start, end). The answer is the position in ``start..end-1`` with
    the highest score at any layer. Cases: random grids with known answers, then grids that
    :func:`memit_lab.tracing.trace` computes on tiny models (the answer read from its
    ``to_frame()``).
    """
    g = generator(23)
    inputs = []
    for n_layer, n_pos, span, answer in ((12, 8, (1, 4), 2), (10, 9, (3, 6), 5), (8, 7, (2, 5), 2)):
        scores = 0.3 * torch.rand(n_layer, n_pos, generator=g)
        scores[int(torch.randint(0, n_layer, (), generator=g)), answer] = 0.8
        scores[-1, -1] = 0.95  # the last token at the top always recovers most: not a subject token
        scores[:, span[1] - 1] = 0.5 * scores[:, span[1] - 1] + 0.35  # a strong, but not the strongest, last token
        inputs.append((f"a random grid [{n_layer} layers, {n_pos} tokens], subject span {span}", scores, span, answer))
    for model, fact in (("tiny-gpt2", KNOWN_FACTS[3]), ("tiny-llama", KNOWN_FACTS[4])):
        result = trace(load_model(model), fact.prompt, fact.subject, samples=3, seed=23)
        frame = result.to_frame()
        answer = int(frame[frame.subject].nlargest(1, "score").pos.iloc[0])
        name = f"memit_lab.tracing.trace on {model}, {fact.prompt!r}, subject span {result.subject_span}"
        inputs.append((name, result.scores, result.subject_span, answer))
    for name, scores, span, answer in inputs:
        yield Case(
            name,
            (scores.clone(), span),
            answer,
            hint="argmax over the subject's positions of the highest score at any layer",
            mistakes={
                "that is the subject's last token: the question asks which subject token matters most": span[1] - 1,
                "that token is not in the subject: look only at positions start..end-1": int(
                    scores.max(0).values.argmax()
                ),
                "that is the token with the highest *mean* over layers: take the highest score at any layer": span[0]
                + int(scores[:, span[0] : span[1]].mean(0).argmax()),
            },
        )
