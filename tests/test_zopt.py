"""z optimisation's inputs (eq. 16): every knob of ZParams checked, contexts checked, the tokenizer left as found.

The optimisation itself (fast loss = full forward loss, batched = one at a time, clamping,
early stopping) is tested in test_memit.py, beside MEMIT, which consumes it.
"""

import math

import pytest

from memit_lab import load_model
from memit_lab.requests import EditRequest
from memit_lab.zopt import ZParams, context_templates, optimise_z

REQUEST = EditRequest("The {} is located in", "Eiffel Tower", "Rome")


@pytest.mark.parametrize(
    ("knob", "bad"),
    [
        ("steps", 0),
        ("chunk", 0),
        ("context_tokens", 0),
        ("n_contexts", -1),
        ("lr", 0.0),
        ("lr", -0.5),
        ("lr", math.inf),
        ("lr", math.nan),
        ("clamp", 0.0),
        ("clamp", -1.0),
        ("clamp", math.inf),
        ("weight_decay", -0.1),
        ("weight_decay", math.nan),
        ("kl_weight", -1.0),
        ("kl_weight", math.inf),
        ("stop_loss", -0.01),
        ("stop_loss", math.nan),
    ],
)
def test_each_knob_is_refused_with_its_name(knob: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"ZParams.{knob} must be"):
        ZParams(**{knob: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(("knob", "bad"), [("steps", 2.5), ("n_contexts", True), ("lr", "0.5")])
def test_a_knob_of_the_wrong_type_is_refused(knob: str, bad: object) -> None:
    # TypeError where the test suite's run-time type checks see it first, else our ValueError.
    with pytest.raises((TypeError, ValueError)):
        ZParams(**{knob: bad})  # type: ignore[arg-type]


def test_the_knobs_limits_are_allowed() -> None:
    params = ZParams(steps=1, chunk=1, context_tokens=1, n_contexts=0, weight_decay=0.0, kl_weight=0.0, stop_loss=0.0)
    assert (params.steps, params.n_contexts, params.kl_weight) == (1, 0, 0.0)
    assert ZParams(lr=1e-3, clamp=1e-6).clamp == 1e-6


def test_a_kl_template_needs_one_subject_slot() -> None:
    for template in ("is a", "{} and {}"):
        with pytest.raises(ValueError, match="kl_template must contain one"):
            ZParams(kl_template=template)


@pytest.mark.parametrize(
    ("contexts", "message"),
    [
        (("{}", "{}"), "contexts must be distinct, got '{}' 2 times"),
        (("{}", "Hello. {}", "Hello. {}"), "contexts must be distinct, got 'Hello. {}' 2 times"),
        (("Hello. {}",), "include the bare"),
        (("{}", "Hello."), "contexts must each contain one"),
    ],
)
def test_bad_contexts_are_refused_before_any_work(contexts: tuple[str, ...], message: str) -> None:
    lm = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match=message):
        optimise_z(lm, [REQUEST], 1, ZParams(steps=2), contexts=contexts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sampling_contexts_leaves_the_padding_side_as_it_was(side: str) -> None:
    # The sampler pads on the left; it used to set the side back to "right" whatever it had been.
    lm = load_model("tiny-neox")
    lm.tokenizer.padding_side = side
    templates = context_templates(lm, n=2, length=3, use_cache=False)
    assert lm.tokenizer.padding_side == side and len(templates) == 3
