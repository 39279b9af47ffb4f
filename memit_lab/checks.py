"""Checks for the course exercises (``notebooks/assignments``): one ``check_*`` function per exercise.

A check calls the student's function on several seeded inputs -- random matrices, the
tiny random models of several architectures, and the bundled model on facts it knows --
and compares each answer with memit_lab's own implementation of the same step. Before
that comparison it tests a property that does not depend on memit_lab's implementation
(the components add up to the hidden state the model computed; the update solves its
normal equations; the edited memory returns the new value), so the student learns *what*
is wrong, not only that it differs.

On a wrong answer a check raises :class:`CheckFailed`, which names the failing case and
says what was expected, what came back and what to try. Where the answer equals a known
mistake (a transposed matrix, a missing lambda, an off-by-one layer, the wrong token
position) the hint names that mistake. A function that still raises
``NotImplementedError`` fails with :class:`NotImplementedYet`; with ``pending_ok=True``
(the self-study notebooks) the check reports "not implemented yet" instead of raising,
so a notebook with open exercises still runs top to bottom. A check that passes returns a
:class:`CheckResult` listing the cases it ran.

Checks are seeded and take seconds on a CPU.

Example:
    >>> import torch
    >>> def fit(keys, values):  # the normal equations W K K^T = M K^T (eq. 8)
    ...     return torch.linalg.solve(keys @ keys.T, keys @ values.T).T
    >>> check_fit_memory(fit).passed
    True
    >>> def stub(keys, values):
    ...     raise NotImplementedError()
    >>> pending = check_fit_memory(stub, pending_ok=True)
    >>> pending.passed, repr(pending).split(": ")[1]
    (False, 'not implemented yet (check_fit_memory will run once it returns an answer)')
"""

from __future__ import annotations

import numbers
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any

import torch

from .facts import KNOWN_FACTS
from .hooks import Trace
from .kv_memory import fit_memory, insertion_update, rome_rank_one_update, single_key_update
from .memit import edit_keys, hidden_at_subject
from .models import LoadedModel, load_model
from .prompts import last_subject_token, subject_token_span, target_scores
from .requests import EditRequest
from .residual import (
    ResidCache,
    accumulated_resid,
    decompose_resid,
    direct_logit_attribution,
    freeze_final_norm,
    lens_logits,
    logit_lens,
    run_with_cache,
)
from .stats import corpus_keys
from .tracing import embedding_noise, trace
from .zopt import ZParams, optimise_z

__all__ = [
    "CheckFailed",
    "CheckResult",
    "NotImplementedYet",
    "check_average_key",
    "check_corrupt_subject",
    "check_direct_attribution",
    "check_edit_position",
    "check_first_top1_layer",
    "check_fit_memory",
    "check_insert_memories",
    "check_layer_update",
    "check_lens_probs",
    "check_nll_with_delta",
    "check_rank_one_update",
    "check_residual_components",
    "check_restored_probability",
    "check_rome_update",
    "check_strongest_subject_token",
    "has_passed",
]

BUNDLED = "smollm2-135m"


# -- verdicts ------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A wrong answer: which check and case, what was expected, what came back, and a hint."""

    def __init__(self, check: str, case: str, expected: str, got: str, hint: str) -> None:
        self.check, self.case, self.expected, self.got, self.hint = check, case, expected, got, hint
        super().__init__(f"{check} failed on {case}\n  expected: {expected}\n  got:      {got}\n  hint:     {hint}")


class NotImplementedYet(CheckFailed):
    """The function still raises ``NotImplementedError``: the exercise is not done yet."""


@dataclass(frozen=True, repr=False)
class CheckResult:
    """What a check ran: its name, the function, the cases it passed (or that it is pending).

    Attributes:
        check: the check's name.
        function: the checked function's name.
        cases: one description per case, all passed.
        pending: the function still raises ``NotImplementedError`` (only with ``pending_ok=True``).
    """

    check: str
    function: str
    cases: tuple[str, ...] = ()
    pending: bool = False

    @property
    def passed(self) -> bool:
        return not self.pending

    def __repr__(self) -> str:
        if self.pending:
            return f"... {self.function}: not implemented yet ({self.check} will run once it returns an answer)"
        lines = [f"passed: {self.check}({self.function}) on {len(self.cases)} cases"]
        return "\n".join([*lines, *(f"  - {case}" for case in self.cases)])


# -- the runner ----------------------------------------------------------------------------


def _describe(x: Any) -> str:
    """A short, exact-enough description of a value for a failure message."""
    if isinstance(x, torch.Tensor):
        if x.numel() == 0:
            return f"an empty tensor of shape {list(x.shape)}"
        flat = x.detach().flatten().double().cpu()
        head = ", ".join(f"{v:.4g}" for v in flat[:3].tolist())
        more = ", ..." if flat.numel() > 3 else ""
        return (
            f"tensor of shape {list(x.shape)} ({str(x.dtype).removeprefix('torch.')}), "
            f"norm {float(flat.norm()):.6g}, entries [{head}{more}]"
        )
    text = repr(x)
    return text if len(text) < 120 else text[:117] + "..."


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class _Check:
    """Runs one check: calls the student's function, compares, and turns mistakes into :class:`CheckFailed`.

    Used as a context manager so that, with ``pending_ok``, a stub ends the check quietly
    with a pending :class:`CheckResult` instead of an exception.
    """

    def __init__(self, name: str, fn: Callable[..., Any], pending_ok: bool) -> None:
        if not callable(fn):
            raise TypeError(f"{name} checks a function: pass the function itself (no parentheses), got {fn!r}")
        self.name, self.fn, self.pending_ok = name, fn, pending_ok
        self.function = getattr(fn, "__name__", repr(fn))
        self.cases: list[str] = []
        self.pending = False

    def __enter__(self) -> _Check:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        _PASSED.pop(self.name, None)
        if exc is None:
            _PASSED[self.name] = self.fn
        if isinstance(exc, NotImplementedYet) and self.pending_ok:
            self.pending = True
            return True
        return False

    @property
    def result(self) -> CheckResult:
        return CheckResult(self.name, self.function, tuple(self.cases), self.pending)

    def fail(self, case: str, expected: str, got: str, hint: str) -> CheckFailed:
        return CheckFailed(self.name, case, expected, got, hint)

    def call(self, case: str, *args: Any) -> Any:
        """The student's answer on one case; their exceptions become failures that say which input broke it."""
        try:
            return self.fn(*args)
        except NotImplementedError:
            raise NotImplementedYet(
                self.name,
                case,
                "an answer",
                "NotImplementedError (the stub is still in place)",
                f"replace `raise NotImplementedError()` in {self.function} with your code, run that cell, "
                "then run this check again",
            ) from None
        except Exception as err:
            where = traceback.extract_tb(err.__traceback__)[-1]
            raise self.fail(
                case,
                "an answer",
                f"{type(err).__name__}: {err}",
                f"{self.function} raised an error on this input (in {where.name}, line {where.lineno}: "
                f"{where.line!r}); the traceback above shows the chain",
            ) from err

    def tensor(self, case: str, got: Any, expected: torch.Tensor, hint: str, mistakes: Mistakes) -> None:
        """``got`` is a tensor of the expected shape (a known mistake of another shape gets its own hint)."""
        if not isinstance(got, torch.Tensor):
            raise self.fail(case, _describe(expected), _describe(got), "return a torch.Tensor")
        if got.shape != expected.shape:
            raise self.fail(case, _describe(expected), _describe(got), _diagnose(got, mistakes) or hint)
        if not torch.isfinite(got).all():
            raise self.fail(case, _describe(expected), _describe(got), "your answer has NaN or infinite entries")

    def require(
        self,
        case: str,
        ok: bool,
        expected: str,
        got: str,
        hint: str,
        *,
        answer: Any = None,
        mistakes: Mistakes = {},  # noqa: B006  # read-only default, never mutated
    ) -> None:
        """An independent property of the right answer; on failure the hint of the mistake ``answer`` matches."""
        if not ok:
            if isinstance(answer, torch.Tensor):
                diagnosis = _diagnose(answer, mistakes)
            else:
                known = mistakes() if callable(mistakes) else mistakes
                diagnosis = next((h for h, v in known.items() if v is not None and v == answer), None)
            raise self.fail(case, expected, got, diagnosis or hint)

    def compare(
        self,
        case: str,
        got: Any,
        expected: torch.Tensor,
        *,
        hint: str,
        mistakes: Mistakes = {},  # noqa: B006  # read-only default, never mutated
        rtol: float = 1e-5,
        atol: float = 1e-6,
        shape_hint: str | None = None,
    ) -> None:
        """``got`` equals the reference ``expected``; otherwise the hint of the matching known mistake."""
        self.tensor(case, got, expected, shape_hint or hint, mistakes)
        if _close(got, expected, rtol, atol):
            return
        diagnosis = _diagnose(got, mistakes)
        if diagnosis is None and _close(got, expected, 1e3 * rtol, 1e3 * atol):
            diagnosis = (
                f"close (relative difference {_relative_gap(got, expected):.2g}) but not within tolerance: "
                "compute in float64 (.double()) and solve with torch.linalg.solve, not an explicit inverse"
            )
        raise self.fail(
            case,
            _describe(expected),
            f"{_describe(got)} (relative difference {_relative_gap(got, expected):.3g})",
            diagnosis or hint,
        )

    def equal(self, case: str, got: Any, expected: Any, *, hint: str, mistakes: Mapping[str, Any] = {}) -> None:
        """``got == expected`` for plain values (ints, None, tuples)."""
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, numbers.Integral) and not isinstance(got, bool):
            got = int(got)
        if got == expected and type(got) is type(expected):
            return
        diagnosis = next(
            (h for h, wrong in mistakes.items() if wrong is not None and wrong != expected and got == wrong), None
        )
        raise self.fail(case, _describe(expected), _describe(got), diagnosis or hint)

    def passed(self, case: str) -> None:
        self.cases.append(case)


#: check name -> the function object that passed it last (a failed or pending run removes the entry)
_PASSED: dict[str, Callable[..., Any]] = {}


def has_passed(check: Callable[..., CheckResult], fn: Callable[..., Any]) -> bool:
    """Whether this very function object ``fn`` passed ``check`` on its last run in this session.

    Lets a notebook run a later step with the student's functions only once they are
    right, without running the checks again. Re-running an exercise cell defines a new
    function object, which must pass its check again.

    Example:
        >>> def fit(keys, values):
        ...     return torch.linalg.solve(keys @ keys.T, keys @ values.T).T
        >>> has_passed(check_fit_memory, fit)
        False
        >>> _ = check_fit_memory(fit)
        >>> has_passed(check_fit_memory, fit), has_passed(check_rank_one_update, fit)
        (True, False)
    """
    return _PASSED.get(getattr(check, "__name__", "")) is fn


#: Known wrong answers, hint -> the wrong answer (None where it does not apply to this case); or a
#: function returning them, so that costly ones are computed only when an answer is wrong.
Mistakes = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


def _diagnose(got: torch.Tensor, mistakes: Mistakes) -> str | None:
    """The hint of the first known mistake that ``got`` reproduces."""
    if callable(mistakes):
        mistakes = mistakes()
    for hint, wrong in mistakes.items():
        if isinstance(wrong, torch.Tensor) and _close(got, wrong, 1e-4, 1e-6):
            return hint
    return None


# -- inputs --------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fact_prompts(seed: int, n: int) -> list[str]:
    """``n`` distinct known-fact prompts, chosen with a seeded generator."""
    order = torch.randperm(len(KNOWN_FACTS), generator=_generator(seed)).tolist()
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
    g = _generator(seed)
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


def _spd(d: int, g: torch.Generator, condition: float = 1e3) -> torch.Tensor:
    """A random symmetric positive definite ``[d, d]`` matrix (float64) with the given condition number."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, float(torch.log10(torch.tensor(condition))), d, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


# -- assignment 1: the residual stream and the logit lens (eq. 2-6) ------------------------------

_TINY_RESID = ("tiny-gpt2", "tiny-gptj", "tiny-llama", "tiny-neox")


def check_residual_components(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 1.1: ``fn(cache, layer, pos)`` -> the components of h^layer at ``pos`` (eq. 6).

    Expected: ``[component, d_model]``, rows in the order the model adds them: ``embed``,
    (``pos_embed``,) ``attn_0``, ``mlp_0``, ..., ``attn_{layer-1}``, ``mlp_{layer-1}``.
    Property checked first: the rows add up to the hidden state the model computed.
    """
    with _Check("check_residual_components", fn, pending_ok) as c:
        for case, cache in _prompt_cases(_TINY_RESID, seed=11):
            got = c.call(case.name, cache, case.layer, case.pos)
            stack = decompose_resid(cache, case.layer, case.pos)
            expected = stack.vectors
            n_embed = len(stack.labels) - 2 * case.layer
            mistakes: dict[str, Any] = {
                "you included block `layer` itself: h^L is the sum up to block L-1 (the input of block L)": (
                    decompose_resid(cache, case.layer + 1, case.pos).vectors if case.layer < cache.n_layers else None
                ),
                "the embedding is missing: h^L starts from h^0 = the token embedding (cache['embed'])": expected[1:],
                "the position embedding is missing: GPT-2 adds cache['pos_embed'] to the token embedding": (
                    torch.cat([expected[:1], expected[2:]]) if n_embed == 2 else None
                ),
            }
            if cache.check_pos(case.pos) != cache.n_pos - 1:
                mistakes["that is the last position: use the position `pos` you were given"] = decompose_resid(
                    cache, case.layer, -1
                ).vectors
            if case.layer > 0:
                blocks = expected[n_embed:].view(-1, 2, expected.shape[-1]).flip(1).reshape(-1, expected.shape[-1])
                mistakes["the order within a block is attention first, then MLP: attn_l, mlp_l"] = torch.cat(
                    [expected[:n_embed], blocks]
                )
            c.tensor(
                case.name,
                got,
                expected,
                f"expected {len(stack.labels)} rows ({', '.join(stack.labels[:4])}, ...), one d_model vector each",
                mistakes,
            )
            resid = cache.resid(case.layer)[case.pos]
            total = got.double().sum(0)
            c.require(
                case.name,
                _relative_gap(total, resid) < 1e-4,
                f"rows that add up to h^{case.layer} at pos {case.pos}: {_describe(resid)}",
                f"their sum is {_describe(total)}",
                "eq. 6: h^L = embedding + sum over blocks l < L of (attn_l + mlp_l)",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(
                case.name,
                got,
                expected,
                hint=f"the rows add up, but not in the order {', '.join(stack.labels[:5])}, ...",
                mistakes=mistakes,
                rtol=1e-5,
                atol=1e-5,
            )
            c.passed(case.name)
    return c.result


def check_lens_probs(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 1.2: ``fn(lm, resid)`` -> the logit lens's next-token probabilities ``[..., d_vocab]``.

    Expected: the final norm, the unembedding, then a softmax over the vocabulary, for
    residual states of any leading shape. Property checked first: on the last state
    h^{n_layers} the lens gives the model's own output distribution.
    """
    with _Check("check_lens_probs", fn, pending_ok) as c:
        for case, cache in _prompt_cases(("tiny-gpt2", "tiny-neox", "tiny-qwen2"), seed=12):
            lm = case.lm
            final = cache.resid(cache.n_layers)
            name = f"{case.model}, {case.prompt!r}, the last state h^{cache.n_layers} at every position"
            got = c.call(name, lm, final)
            own = cache.logits.softmax(-1)
            c.tensor(name, got, own, "one probability per vocabulary entry: shape [*resid.shape[:-1], d_vocab]", {})
            c.require(
                name,
                _close(got, own, 1e-4, 1e-5),
                f"the model's own next-token probabilities, {_describe(own)}",
                _describe(got),
                "apply the final norm, then the unembedding, then softmax(dim=-1)",
                answer=got,
                mistakes=partial(_lens_mistakes, lm, final),
            )
            c.passed(name)
            states = accumulated_resid(cache).vectors
            name = f"{case.model}, {case.prompt!r}, every state h^0..h^{cache.n_layers} at every position"
            got = c.call(name, lm, states)
            expected = lens_logits(lm, states).softmax(-1)
            c.compare(
                name,
                got,
                expected,
                hint="apply the final norm, then the unembedding, then softmax(dim=-1)",
                mistakes=partial(_lens_mistakes, lm, states),
                rtol=1e-4,
                atol=1e-5,
            )
            c.passed(name)
    return c.result


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


def check_first_top1_layer(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 1.3: ``fn(probs, target_id)`` -> the first layer at which ``target_id`` is the top prediction.

    ``probs`` is the logit lens at one position, ``[layer, d_vocab]`` (row L for h^L);
    the answer is an ``int``, or ``None`` when the target is never top-1. Cases: random
    tables whose answer is known by construction, then the bundled model's lens.
    """
    with _Check("check_first_top1_layer", fn, pending_ok) as c:
        g = _generator(13)
        for answer in (3, 0, None, 5):
            probs, target = _lens_table(answer, g)
            name = f"a random lens table [{probs.shape[0]} layers, {probs.shape[1]} tokens], target {target}"
            got = c.call(name, probs, target)
            c.equal(
                name,
                got,
                answer,
                hint="the answer is the smallest L with argmax(probs[L]) == target_id (or None)",
                mistakes=_top1_mistakes(probs, target, answer),
            )
            c.passed(name)
        lm = load_model(BUNDLED)
        for fact in KNOWN_FACTS[:2]:
            cache = run_with_cache(lm, fact.prompt)
            lens = logit_lens(lm, cache, fact.target)
            for pos, where in (
                (-1, "the last token"),
                (last_subject_token(lm.tokenizer, fact.prompt, fact.subject), "the last subject token"),
            ):
                probs = lens_logits(lm, accumulated_resid(cache, pos=pos).vectors).softmax(-1)
                name = f"{BUNDLED}, {fact.prompt!r}, target {lens.target!r} at {where}"
                got = c.call(name, probs, lens.target_id)
                expected = lens.first_top1_layer(pos)
                c.equal(
                    name,
                    got,
                    expected,
                    hint="the smallest L with argmax(probs[L]) == target_id (or None)",
                    mistakes=_top1_mistakes(probs, lens.target_id, expected),
                )
                c.passed(name)
    return c.result


def _lens_table(answer: int | None, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Random probabilities ``[8, 12]`` in which token 7 is first top-1 at layer ``answer`` (and peaks later)."""
    n_layer, n_vocab, target = 8, 12, 7
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


def check_direct_attribution(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 1.4: ``fn(lm, cache, target_id, pos)`` -> each component's direct effect on the target's logit.

    Expected ``[component]``, one entry per row of ``decompose_resid(cache, pos=pos)``: the
    component through the final norm with its scale frozen (``freeze_final_norm(...).linear``)
    and then dotted with the target's unembedding row. Property checked first: the entries
    plus the biases' constant add up to the model's own logit.
    """
    with _Check("check_direct_attribution", fn, pending_ok) as c:
        for case, cache in _prompt_cases(("tiny-gpt2", "tiny-neox", "tiny-llama"), seed=14):
            lm = case.lm
            target_id = int(cache.logits[case.pos].argmax())
            name = f"{case.model}, {case.prompt!r}, pos={case.pos}, target = its top token {target_id}"
            got = c.call(name, lm, cache, target_id, case.pos)
            reference = direct_logit_attribution(lm, cache, target_id, case.pos)
            expected = reference.attributions
            mistakes = _attribution_mistakes(lm, cache, target_id, case.pos)
            c.tensor(name, got, expected, f"one number per component: {len(expected)} entries", mistakes)
            final = cache.resid(cache.n_layers)[case.pos]
            unembed = lm.model.get_submodule(lm.adapter.unembed)
            b = 0.0 if unembed.bias is None else float(unembed.bias[target_id])
            constant = float(freeze_final_norm(lm, final).bias @ unembed.weight[target_id].float()) + b
            logit = float(cache.logits[case.pos, target_id])
            total = float(got.double().sum()) + constant
            c.require(
                name,
                abs(total - logit) <= 1e-3 * max(1.0, abs(logit)),
                f"entries that add up (with the biases' constant {constant:.4g}) to the model's logit {logit:.6g}",
                f"they add up to {total:.6g}",
                "freeze the norm's scale at the full residual (freeze_final_norm), apply "
                "its .linear part to each component, then take the dot product with W_U[target_id]",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(
                name,
                got,
                expected,
                hint="compare with direct_logit_attribution",
                mistakes=mistakes,
                rtol=1e-4,
                atol=1e-5,
            )
            c.passed(name)
    return c.result


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


# -- assignment 3: the MLP as a least-squares memory (eq. 7-15) ---------------------------------


def _real_keys(model: str, layer: int, n: int) -> torch.Tensor:
    """``[d_mlp, n]`` keys (inputs of W_out) from the package's default corpus, as float64 columns."""
    return corpus_keys(load_model(model), layer, n_tokens=n, seq_len=64).double().T


def check_fit_memory(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 3.1: ``fn(keys, values)`` -> W = argmin ||W K - M||^2 via the normal equations (eq. 7-8).

    ``keys`` is K ``[d_mlp, n]``, ``values`` M ``[d_model, n]`` (float64, n > d_mlp); the
    answer is ``[d_model, d_mlp]``. Property checked first: W K K^T = M K^T.
    """
    with _Check("check_fit_memory", fn, pending_ok) as c:
        g = _generator(31)
        inputs = []
        for d_mlp, n, d_model in ((6, 40, 3), (10, 200, 10), (16, 60, 5)):
            k = torch.randn(d_mlp, n, generator=g, dtype=torch.float64)
            inputs.append(
                (
                    f"random K [{d_mlp}, {n}], M [{d_model}, {n}]",
                    k,
                    torch.randn(d_model, n, generator=g, dtype=torch.float64),
                )
            )
        lm = load_model("tiny-gptj")
        keys = _real_keys("tiny-gptj", 1, 400)
        w_out = lm.adapter.w_out_weight(lm.model, 1).detach().double()
        noise = 0.01 * torch.randn(w_out.shape[0], keys.shape[1], generator=g, dtype=torch.float64)
        inputs.append(("tiny-gptj layer-1 keys [256, 400], M = W_out K + noise", keys, w_out @ keys + noise))
        for name, k, m in inputs:
            got = c.call(name, k.clone(), m.clone())
            expected = fit_memory(k, m)
            mistakes = {
                "transposed: W maps a key [d_mlp] to a value [d_model], so it is [d_model, d_mlp]": expected.T,
                "this is M K^T without the inverse of K K^T: solve W (K K^T) = M K^T": m @ k.T,
            }
            c.tensor(name, got, expected, "W must be [d_model, d_mlp]: values.shape[0] x keys.shape[0]", mistakes)
            gap = _relative_gap((got.double() @ k) @ k.T, m @ k.T)
            c.require(
                name,
                gap < 1e-6,
                "W with W K K^T = M K^T (the normal equations, eq. 8)",
                f"||W K K^T - M K^T|| / ||M K^T|| = {gap:.3g}",
                "solve the normal equations in float64 with torch.linalg.solve",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(name, got, expected, hint="solve W (K K^T) = M K^T", mistakes=mistakes, rtol=1e-6, atol=1e-8)
            c.passed(name)
    return c.result


def check_insert_memories(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 3.2: ``fn(w0, k1, m1, key_moment, lam)`` -> MEMIT's update Delta (eq. 14-15).

    Delta = R K1^T (C0 + K1 K1^T)^-1 with R = M1 - W0 K1 and C0 = lam * key_moment. Property
    checked first: W0 + Delta is the brute-force least-squares memory for the old keys
    (whose K0 K0^T = C0) together with the new ones.
    """
    with _Check("check_insert_memories", fn, pending_ok) as c:
        g = _generator(32)
        for d_mlp, d_model, n0, u, lam in ((6, 4, 30, 2, 30.0), (8, 5, 50, 12, 50.0), (12, 12, 80, 3, 80.0)):
            k0 = torch.randn(d_mlp, n0, generator=g, dtype=torch.float64)
            m0 = torch.randn(d_model, n0, generator=g, dtype=torch.float64)
            k1 = torch.randn(d_mlp, u, generator=g, dtype=torch.float64)
            m1 = torch.randn(d_model, u, generator=g, dtype=torch.float64)
            moment = k0 @ k0.T / lam  # so lam * moment = K0 K0^T exactly
            name = f"random W0 [{d_model}, {d_mlp}], {u} new keys, lambda = {lam:g}"
            _check_update(c, name, fn, fit_memory(k0, m0), k1, m1, moment, lam, k0, m0)
        keys = _real_keys("tiny-llama", 2, 600)
        lm = load_model("tiny-llama")
        w0 = lm.adapter.w_out_weight(lm.model, 2).detach().double()
        k1, k0 = keys[:, :4], keys[:, 4:]
        m1 = w0 @ k1 + torch.randn(w0.shape[0], 4, generator=g, dtype=torch.float64)
        moment = k0 @ k0.T / k0.shape[1]
        name = "tiny-llama layer 2: W_out, 4 new corpus keys, E[k k^T] over 596 others, lambda = 596"
        # W_out is not the exact least-squares memory of these keys, so only the reference comparison applies
        _check_update(c, name, fn, w0, k1, m1, moment, float(k0.shape[1]), None, None)
    return c.result


def _check_update(
    c: _Check,
    name: str,
    fn: Callable[..., Any],
    w0: torch.Tensor,
    k1: torch.Tensor,
    m1: torch.Tensor,
    moment: torch.Tensor,
    lam: float,
    k0: torch.Tensor | None,
    m0: torch.Tensor | None,
) -> None:
    got = c.call(name, w0.clone(), k1.clone(), m1.clone(), moment.clone(), lam)
    r = m1 - w0 @ k1
    expected = insertion_update(r, k1, lam * moment)
    mistakes = {
        "lambda is missing: C0 = lam * key_moment (eq. 15)": insertion_update(r, k1, moment),
        "C0 was divided by lambda: C0 = lam * key_moment (eq. 15)": insertion_update(r, k1, moment / lam),
        "the new keys' own K1 K1^T is missing from the inverse: (C0 + K1 K1^T)^-1": insertion_update(
            r, k1, lam * moment - k1 @ k1.T
        )
        if k1.shape[1] < k1.shape[0]
        else None,
        "R is the residual M1 - W0 K1 (what the new values still lack), not M1 itself": insertion_update(
            m1, k1, lam * moment
        ),
        "transposed: Delta has W0's shape [d_model, d_mlp]": expected.T,
    }
    c.tensor(name, got, expected, "Delta has W0's shape [d_model, d_mlp]", mistakes)
    if k0 is not None and m0 is not None:
        brute = torch.linalg.lstsq(torch.cat([k0, k1], 1).T, torch.cat([m0, m1], 1).T).solution.T
        gap = _relative_gap(w0 + got.double(), brute)
        c.require(
            name,
            gap < 1e-6,
            "W0 + Delta = the least-squares memory of old and new pairs together (brute force, eq. 9-11)",
            f"relative distance {gap:.3g} from it",
            "Delta = R K1^T (C0 + K1 K1^T)^-1, solved in float64 (eq. 14)",
            answer=got,
            mistakes=mistakes,
        )
    c.compare(
        name, got, expected, hint="Delta = R K1^T (C0 + K1 K1^T)^-1 (eq. 14)", mistakes=mistakes, rtol=1e-6, atol=1e-9
    )
    c.passed(name)


def check_rank_one_update(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 3.3: ``fn(r, k, c0)`` -> eq. 14 for one key as a rank-one update (Sherman-Morrison).

    Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k), ``[d_model, d_mlp]``. Property checked first:
    Delta (C0 + k k^T) = r k^T, the normal equations of eq. 14 for u = 1.
    """
    with _Check("check_rank_one_update", fn, pending_ok) as c:
        g = _generator(33)
        for d_model, d_mlp, condition in ((3, 5, 10.0), (6, 6, 1e3), (4, 20, 1e5)):
            r = torch.randn(d_model, generator=g, dtype=torch.float64)
            k = torch.randn(d_mlp, generator=g, dtype=torch.float64)
            c0 = _spd(d_mlp, g, condition)
            name = f"random r [{d_model}], k [{d_mlp}], C0 with condition number {condition:g}"
            got = c.call(name, r.clone(), k.clone(), c0.clone())
            expected = single_key_update(r, k, c0)
            u = torch.linalg.solve(c0, k)
            mistakes = {
                "the 1 + is missing from the denominator: that is ROME's equality-constrained update, which stores "
                "the new pair exactly; eq. 14 weighs it against C0": torch.outer(r, u) / (k @ u),
                "transposed: Delta = r (C0^-1 k)^T is [d_model, d_mlp]": expected.T,
                "the direction is C0^-1 k (solve C0 u = k), not k itself": torch.outer(r, k) / (1 + k @ k),
            }
            c.tensor(name, got, expected, "Delta is [d_model, d_mlp] = [len(r), len(k)]", mistakes)
            gap = _relative_gap(got.double() @ (c0 + torch.outer(k, k)), torch.outer(r, k))
            c.require(
                name,
                gap < 1e-6,
                "Delta with Delta (C0 + k k^T) = r k^T (eq. 14 for one key)",
                f"||Delta (C0 + k k^T) - r k^T|| / ||r k^T|| = {gap:.3g}",
                "Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k)",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(
                name,
                got,
                expected,
                hint="Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k)",
                mistakes=mistakes,
                rtol=1e-6,
                atol=1e-10,
            )
            c.passed(name)
    return c.result


def check_rome_update(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 3.4: ``fn(w, k, v, c)`` -> ROME's rank-one update with (W + Delta) k = v exactly.

    Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k). Properties checked first: the new pair is
    stored exactly, and Delta C x = 0 for every x orthogonal to k (it disturbs old keys as
    little as possible in C's metric).
    """
    with _Check("check_rome_update", fn, pending_ok) as c:
        g = _generator(34)
        for d_model, d_mlp, condition in ((3, 5, 10.0), (8, 8, 1e3), (5, 24, 1e4)):
            w = torch.randn(d_model, d_mlp, generator=g, dtype=torch.float64)
            k = torch.randn(d_mlp, generator=g, dtype=torch.float64)
            v = torch.randn(d_model, generator=g, dtype=torch.float64)
            cov = _spd(d_mlp, g, condition)
            name = f"random W [{d_model}, {d_mlp}], C with condition number {condition:g}"
            got = c.call(name, w.clone(), k.clone(), v.clone(), cov.clone())
            expected = rome_rank_one_update(w, k, v, cov)
            u = torch.linalg.solve(cov, k)
            mistakes = {
                "the denominator is k^T C^-1 k (no 1 +): ROME stores the new pair exactly": torch.outer(v - w @ k, u)
                / (1 + k @ u),
                "the residual is v - W k: what the memory still lacks for this key": torch.outer(v, u) / (k @ u),
                "the direction is C^-1 k (solve C u = k), not C k": torch.outer(v - w @ k, cov @ k) / (k @ cov @ k),
                "transposed: Delta has W's shape [d_model, d_mlp]": expected.T,
            }
            c.tensor(name, got, expected, "Delta has W's shape [d_model, d_mlp]", mistakes)
            stored = (w + got.double()) @ k
            c.require(
                name,
                _relative_gap(stored, v) < 1e-8,
                f"(W + Delta) k = v = {_describe(v)}",
                f"(W + Delta) k = {_describe(stored)}",
                "ROME's update writes the new pair exactly",
                answer=got,
                mistakes=mistakes,
            )
            basis = torch.linalg.svd(k[None, :]).Vh[1:]  # rows orthogonal to k
            leak = float((got.double() @ cov @ basis.T).norm() / got.double().norm().clamp_min(1e-300))
            c.require(
                name,
                leak < 1e-6 * condition,
                "Delta C x = 0 for every x orthogonal to k (the least disturbance of old keys)",
                f"||Delta C x|| / ||Delta|| up to {leak:.3g}",
                "Delta's rows must lie along C^-1 k",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(
                name,
                got,
                expected,
                hint="Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k)",
                mistakes=mistakes,
                rtol=1e-6,
                atol=1e-10,
            )
            c.passed(name)
    return c.result


# -- assignment 4: MEMIT by hand (eq. 16-20, Algorithm 1) ------------------------------------------

_CONTEXTS = ("", "I read this in a book. ", "Here is a fact. ")


def check_edit_position(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 4.1: ``fn(tokenizer, prompt, subject)`` -> the position of the subject's last token.

    Positions index ``tokenizer(prompt).input_ids`` (special tokens included). Property
    checked first: the token there contains the subject's last character.
    """
    with _Check("check_edit_position", fn, pending_ok) as c:
        for model, facts in (
            ("tiny-gpt2", KNOWN_FACTS[2:4]),
            ("tiny-llama", KNOWN_FACTS[4:6]),
            (BUNDLED, KNOWN_FACTS[:3]),
        ):
            tok = load_model(model).tokenizer
            for i, fact in enumerate(facts):
                prompt = _CONTEXTS[i % len(_CONTEXTS)] + fact.prompt
                name = f"{model} tokenizer, {prompt!r}, subject {fact.subject!r}"
                got = c.call(name, tok, prompt, fact.subject)
                expected = last_subject_token(tok, prompt, fact.subject)
                enc = tok(prompt, return_offsets_mapping=True)
                last_char = prompt.index(fact.subject) + len(fact.subject) - 1
                ok = isinstance(got, int) and 0 <= got < len(enc.input_ids)
                a, b = enc.offset_mapping[got] if ok else (0, 0)
                shown = repr(tok.decode([enc.input_ids[got]])) if ok else "no token"
                mistakes = {
                    "that is the prompt's last token: MEMIT edits at the subject's last token": len(enc.input_ids) - 1,
                    "that is the subject's first token: MEMIT edits at its last token": subject_token_span(
                        tok, prompt, fact.subject
                    )[0],
                    "counting the tokens of the text before the subject and of the subject separately does not "
                    "match the tokens of the whole prompt (tokens merge across the boundary): use the tokenizer's "
                    "offsets (return_offsets_mapping=True)": len(tok(prompt[: prompt.index(fact.subject)]).input_ids)
                    + len(tok(fact.subject, add_special_tokens=False).input_ids)
                    - 1,
                }
                c.require(
                    name,
                    ok and a <= last_char < b,
                    f"a position whose token contains the subject's last character {prompt[last_char]!r}",
                    f"position {got!r}: token {shown}",
                    "find the token whose character span (offset mapping) contains the subject's last character",
                    answer=got,
                    mistakes=mistakes,
                )
                c.equal(name, got, expected, hint="the last token overlapping the subject", mistakes=mistakes)
                c.passed(name)
    return c.result


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


def check_nll_with_delta(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 4.2: ``fn(lm, prompts, subject, target, layer, delta)`` -> eq. 16's loss, differentiable in delta.

    The loss is -1/N sum_j log P(target | x_j + p), each log P averaged over the target's
    tokens (as the paper's code and :mod:`memit_lab.zopt` do), with ``delta`` added to the
    output of block ``layer`` at the subject's last token of every prompt. The reference is
    :func:`memit_lab.zopt.optimise_z` without its extra terms, run for one Adam step: it
    gives the loss at delta = 0, the step it took and the loss there. Checked: the loss at
    both points, that the gradient reaches delta, and that at delta = 0 it points the way
    the optimiser stepped.
    """
    with _Check("check_nll_with_delta", fn, pending_ok) as c:
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

            name = f"{model}, layer {layer}, {len(prompts)} prompts ending {fact.prompt!r} -> {target!r}, delta = 0"
            zero = torch.zeros(lm.d_model)
            delta = zero.clone().requires_grad_()
            got = c.call(name, lm, prompts, fact.subject, target, layer, delta)
            value = _scalar(got) if isinstance(got, torch.Tensor) else None
            c.require(
                name,
                value is not None and abs(value - at_zero) < 1e-3 * max(1.0, at_zero),
                f"a one-element tensor, the unedited loss {at_zero:.5g} (memit_lab.zopt.optimise_z's first pass)",
                _describe(got),
                "return a tensor (not .item(), so gradients flow): the average over prompts of -(mean over the "
                "target's tokens of log P(token | everything before it))",
                answer=None if value is None else torch.tensor(value),
                mistakes=partial(_nll_mistakes, lm, prompts, target, layer, zero, subject_pos, at_zero, n_tokens),
            )
            if isinstance(got, torch.Tensor) and got.requires_grad:
                got.backward()
            grad = delta.grad
            c.require(
                name,
                grad is not None and bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0,
                "a loss whose gradient reaches delta (so Adam can optimise it)",
                "no gradient on delta" if grad is None else f"gradient {_describe(grad)}",
                "add delta inside the forward pass (an edit_output hook on the block), without torch.no_grad() "
                "and without detaching",
            )
            c.passed(name)

            name = f"{model}, layer {layer}, {len(prompts)} prompts -> {target!r}, delta = one Adam step (norm " \
                f"{float(step.norm()):.3g})"  # fmt: skip
            got = c.call(name, lm, prompts, fact.subject, target, layer, step.clone())
            value = _scalar(got) if isinstance(got, torch.Tensor) else None
            c.compare(
                name,
                got if value is None else torch.tensor(value),
                torch.tensor(at_step),
                hint="-(1/N) sum_j mean over the target's tokens of log P(token | x_j + p), with delta added to "
                "block `layer`'s output at the subject's last token",
                shape_hint="return a one-element tensor",
                mistakes=partial(_nll_mistakes, lm, prompts, target, layer, step, subject_pos, at_step, n_tokens),
                rtol=1e-3,
                atol=1e-4,
            )
            # Adam's first step is -lr * sign(gradient), entry by entry
            agree = 0.0 if grad is None else float((torch.sign(grad) == -torch.sign(step)).double().mean())
            c.require(
                name,
                agree > 0.95,
                "at delta = 0, a gradient whose signs are opposite to those of memit_lab.zopt's first Adam step "
                "(which is -lr * sign(gradient))",
                f"signs agree on {100 * agree:.0f}% of the entries",
                "the loss must depend on delta the way eq. 16 says: added to block `layer`'s output at the "
                "subject's last token",
            )
            c.passed(name)
    return c.result


def _nll_mistakes(
    lm: LoadedModel,
    prompts: list[str],
    target: str,
    layer: int,
    delta: torch.Tensor,
    subject_pos: list[int],
    expected: float,
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


def check_average_key(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 4.3: ``fn(lm, layer, prompts, subject)`` -> the key k^l of eq. 19, ``[d_mlp]``.

    The input of W_out^layer at the subject's last token, averaged over the prompts (the
    prefixed versions x_j + p of one request). The reference reads each prompt's key with
    :func:`memit_lab.memit.edit_keys` (each prompt its own request, no further contexts)
    and averages them. Property checked first: the answer is a ``[d_mlp]`` vector.
    """
    with _Check("check_average_key", fn, pending_ok) as c:
        for model, layer, fact in (
            ("tiny-gpt2", 2, KNOWN_FACTS[1]),
            ("tiny-neox", 0, KNOWN_FACTS[5]),
            (BUNDLED, 5, KNOWN_FACTS[0]),
        ):
            lm = load_model(model)
            prompts = [context + fact.prompt for context in _CONTEXTS]
            name = f"{model}, layer {layer}, {len(prompts)} prompts ending {fact.prompt!r}"
            got = c.call(name, lm, layer, prompts, fact.subject)
            each = [EditRequest(context + fact.template, fact.subject, fact.target) for context in _CONTEXTS]
            keys = edit_keys(lm, each, layer, ("{}",)).T.cpu()
            expected = keys.mean(0)
            contexts = tuple(context + "{}" for context in _CONTEXTS)
            mistakes = {
                "that is the key at the prompts' last token: eq. 19 reads it at the subject's last token": _keys_at(
                    lm, layer, prompts, [len(lm.tokenizer(p).input_ids) - 1 for p in prompts]
                ).mean(0),
                "that is the key of the first prompt only: average over all the prompts": keys[0],
                "that is the sum over prompts: average it": keys.sum(0),
                "that is memit_lab's (and the paper's code's) weighting, 1/2 x the bare prompt + 1/2 x the mean of "
                "the others; this exercise asks for eq. 19's plain mean over the prompts": edit_keys(
                    lm, [EditRequest(fact.template, fact.subject, fact.target)], layer, contexts
                )[:, 0].cpu(),
            }
            c.compare(
                name,
                got,
                expected,
                hint="mean over prompts of W_out's input (not its output) at the subject's last token",
                shape_hint=f"the key is W_out's input: [d_mlp] = [{lm.d_mlp}], one vector averaged over prompts",
                mistakes=mistakes,
                rtol=1e-4,
                atol=1e-5,
            )
            c.passed(name)
    return c.result


def check_layer_update(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 4.4: ``fn(keys, residuals, layer, layers, c0)`` -> Delta^l of Algorithm 1 (eq. 20 then eq. 14).

    ``residuals`` are z_i - h_i^L ``[d_model, u]`` (what is still missing at the top layer
    L = max(layers)), ``keys`` the k_i^l ``[d_mlp, u]``, ``c0`` = lambda E[k k^T]. This layer
    takes the share r^l = residuals / (L - l + 1) (eq. 20) and writes it with eq. 14:
    Delta = r^l K^T (C0 + K K^T)^-1. Property checked first: Delta (C0 + K K^T) = r^l K^T.
    """
    with _Check("check_layer_update", fn, pending_ok) as c:
        g = _generator(44)
        inputs = []
        for d_model, d_mlp, u, layer in ((4, 10, 3, 3), (6, 12, 2, 5), (5, 8, 4, 7)):
            keys = torch.randn(d_mlp, u, generator=g, dtype=torch.float64)
            residuals = torch.randn(d_model, u, generator=g, dtype=torch.float64)
            name = f"random: {u} edits, d_model {d_model}, d_mlp {d_mlp}, layer {layer} of R = [3, 4, 5, 6, 7]"
            inputs.append((name, keys, residuals, layer, [3, 4, 5, 6, 7], 20.0 * _spd(d_mlp, g, 100.0)))
        # real: the keys memit_lab.memit reads for two requests, C0 from corpus keys, residuals at h's scale
        lm = load_model("tiny-llama")
        requests = [EditRequest(f.template, f.subject, "Rome") for f in KNOWN_FACTS[3:5]]
        keys = edit_keys(lm, requests, 1, ("{}",)).double().cpu()
        h = hidden_at_subject(lm, requests, 2).double().cpu()
        residuals = h.norm(dim=-1) * torch.randn(lm.d_model, len(requests), generator=g, dtype=torch.float64) / 8
        corpus = _real_keys("tiny-llama", 1, 600)
        name = "tiny-llama: keys of 2 requests at layer 1 of R = [1, 2], C0 = 600 x E[k k^T] over corpus keys"
        inputs.append((name, keys, residuals, 1, [1, 2], corpus @ corpus.T))
        for name, keys, residuals, layer, layers, c0 in inputs:
            got = c.call(name, keys.clone(), residuals.clone(), layer, list(layers), c0.clone())
            share = residuals / (max(layers) - layer + 1)
            expected = insertion_update(share, keys, c0)
            mistakes = {
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
            c.tensor(name, got, expected, "Delta has W_out's shape [d_model, d_mlp]", mistakes)
            gap = _relative_gap(got.double() @ (c0 + keys @ keys.T), share @ keys.T)
            c.require(
                name,
                gap < 1e-6,
                "Delta (C0 + K K^T) = r^l K^T with r^l = residuals / (L - l + 1) (eq. 20, 14)",
                f"relative mismatch {gap:.3g}",
                "spread first (eq. 20), then solve eq. 14 in float64",
                answer=got,
                mistakes=mistakes,
            )
            c.compare(
                name, got, expected, hint="Delta = r^l K^T (C0 + K K^T)^-1", mistakes=mistakes, rtol=1e-6, atol=1e-10
            )
            c.passed(name)
    return c.result


# -- assignment 2: causal tracing (ROME section 2) ------------------------------------------------


def check_corrupt_subject(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 2.1: ``fn(embeds, span, noise)`` -> the embeddings with ``noise`` added at the subject's tokens.

    ``embeds`` ``[pos, d_model]``, ``span`` = (start, end) with end exclusive, ``noise``
    ``[end - start, d_model]``. The input must be left unchanged. Checked on random tensors
    and on the bundled model's embeddings of a fact.
    """
    with _Check("check_corrupt_subject", fn, pending_ok) as c:
        g = _generator(21)
        inputs = [
            (f"random embeds [9, 16], span {span}", torch.randn(9, 16, generator=g), span)
            for span in ((2, 5), (0, 1), (6, 9))
        ]
        lm = load_model(BUNDLED)
        fact = KNOWN_FACTS[0]
        with torch.no_grad():
            embeds = lm.model.get_submodule(lm.adapter.embed)(lm.tokenizer(fact.prompt, return_tensors="pt").input_ids)[
                0
            ]
        span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
        inputs.append((f"{BUNDLED} embeddings of {fact.prompt!r}, subject span {span}", embeds, span))
        for name, x, (start, end) in inputs:
            noise = torch.randn(end - start, x.shape[1], generator=g)
            original = x.clone()
            got = c.call(name, x, (start, end), noise.clone())
            expected = original.clone()
            expected[start:end] += noise
            c.require(
                name,
                torch.equal(x, original),
                "the input embeddings left as they were",
                "your function changed its input in place",
                "work on a copy: embeds.clone()",
            )
            shifted = original.clone()
            if end < len(original):
                shifted[start + 1 : end + 1] += noise
            mistakes = {
                "the noise replaced the subject's embeddings: add it to them": torch.cat(
                    [original[:start], noise, original[end:]]
                ),
                "the noise landed one token late: the span's end is exclusive, rows start..end-1": (
                    shifted if end < len(original) else None
                ),
            }
            c.compare(name, got, expected, hint="embeds with noise added to rows start..end-1 only", mistakes=mistakes)
            c.passed(name)
    return c.result


def _scalar(x: Any) -> float | None:
    """``x`` as a float when it is one number (a Python number or a one-element tensor), else None."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach())
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return None


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
    draws = torch.randn(1, span[1] - span[0], lm.d_model, generator=_generator(seed), dtype=torch.float64)
    noise = (scale * draws).to(lm.device, lm.dtype)[0]
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    with torch.no_grad():
        embeds = lm.model.get_input_embeddings()(ids)
        embeds[0, span[0] : span[1]] += noise
        direct = float(lm.model(inputs_embeds=embeds).logits[0, -1].float().softmax(-1)[target_id])
    if abs(direct - corrupted) > 1e-4:
        raise RuntimeError("memit_lab.checks no longer reproduces memit_lab.tracing's noise draw: fix _tracing_noise")
    return noise


def check_restored_probability(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 2.2: ``fn(lm, prompt, subject, target_id, layer, pos, noise)`` -> P(target) with one state restored.

    The subject's token embeddings get ``noise`` added (the corrupted run); the output of
    block ``layer`` at ``pos`` is set to its value in the clean run; the answer is the
    probability of ``target_id`` after the prompt. The reference is
    :func:`memit_lab.tracing.trace` with the same noise (one sample). Properties checked first:
    restoring a token before the subject changes nothing (causal attention: the noise has
    not reached it), and restoring the last block at the last token gives back the clean
    probability.
    """
    with _Check("check_restored_probability", fn, pending_ok) as c:
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
            with torch.no_grad():
                logits = lm.model(**lm.tokenizer(fact.prompt, return_tensors="pt").to(lm.device)).logits
            target_id = int(logits[0, -1].argmax())
            scale = embedding_noise(lm)
            reference = trace(
                lm, fact.prompt, fact.subject, target_id, noise=scale, samples=1, seed=seed, positions=[pos]
            )
            expected, clean, corrupted = (
                float(reference.scores[layer, pos]),
                reference.clean_prob,
                reference.corrupted_prob,
            )
            noise = _tracing_noise(lm, fact.prompt, fact.subject, scale, seed, target_id, corrupted)
            name = f"{model}, {fact.prompt!r}, restore block {layer} at pos {pos} ({where.replace('_', ' ')})"
            got = c.call(name, lm, fact.prompt, fact.subject, target_id, layer, pos, noise.clone())
            number = _scalar(got)
            mistakes = {
                "that is the clean probability: add the noise to the subject's embeddings "
                "(an edit_output Trace on lm.adapter.embed)": torch.tensor(clean),
                "that is the corrupted probability: nothing was restored": (
                    torch.tensor(corrupted) if abs(expected - corrupted) > 1e-4 else None
                ),
                "you restored block `layer`'s input (block layer-1's output): restore its output": (
                    torch.tensor(float(reference.scores[layer - 1, pos])) if layer > 0 else None
                ),
            }
            if where == "before":
                c.require(
                    name,
                    number is not None and abs(number - corrupted) < 1e-4,
                    f"the corrupted run's probability {corrupted:.4g}: the noise has not reached this token",
                    _describe(got),
                    "corrupt the subject's embeddings only; restore block `layer`'s output",
                    answer=None if number is None else torch.tensor(number),
                    mistakes=mistakes,
                )
            if where == "last":
                c.require(
                    name,
                    number is not None and abs(number - clean) < 1e-4,
                    f"the clean run's probability {clean:.4g}: the last block's output decides the prediction",
                    _describe(got),
                    "restore the *output* of block `layer` at `pos`; read P at the last token",
                    answer=None if number is None else torch.tensor(number),
                    mistakes=mistakes,
                )
            c.compare(
                name,
                got if number is None else torch.tensor(number),
                torch.tensor(expected),
                hint="P(target) at the last token, corrupted, with block `layer`'s output at `pos` restored "
                "(memit_lab.tracing.trace(...).scores[layer, pos] with the same noise)",
                shape_hint="return one number: P(target_id) at the last position",
                mistakes=mistakes,
                rtol=1e-4,
                atol=1e-6,
            )
            c.passed(name)
    return c.result


def check_strongest_subject_token(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
    """Exercise 2.3: ``fn(scores, span)`` -> the subject token whose restoration helps most.

    ``scores`` is a tracing grid ``[layer, pos]`` of P(target) with one state restored;
    ``span`` the subject's (start, end). The answer is the position in ``start..end-1`` with
    the highest score at any layer. Cases: random grids with known answers, then grids that
    :func:`memit_lab.tracing.trace` computes on tiny models (the answer read from its
    ``to_frame()``).
    """
    with _Check("check_strongest_subject_token", fn, pending_ok) as c:
        g = _generator(23)
        inputs = []
        for n_layer, n_pos, span, answer in ((12, 8, (1, 4), 2), (10, 9, (3, 6), 5), (8, 7, (2, 5), 2)):
            scores = 0.3 * torch.rand(n_layer, n_pos, generator=g)
            scores[int(torch.randint(0, n_layer, (), generator=g)), answer] = 0.8
            scores[-1, -1] = 0.95  # the last token at the top always recovers most: not a subject token
            scores[:, span[1] - 1] = 0.5 * scores[:, span[1] - 1] + 0.35  # a strong, but not the strongest, last token
            inputs.append(
                (f"a random grid [{n_layer} layers, {n_pos} tokens], subject span {span}", scores, span, answer)
            )
        for model, fact in (("tiny-gpt2", KNOWN_FACTS[3]), ("tiny-llama", KNOWN_FACTS[4])):
            result = trace(load_model(model), fact.prompt, fact.subject, samples=3, seed=23)
            frame = result.to_frame()
            answer = int(frame[frame.subject].nlargest(1, "score").pos.iloc[0])
            name = f"memit_lab.tracing.trace on {model}, {fact.prompt!r}, subject span {result.subject_span}"
            inputs.append((name, result.scores, result.subject_span, answer))
        for name, scores, span, answer in inputs:
            got = c.call(name, scores.clone(), span)
            mistakes = {
                "that is the subject's last token: the question asks which subject token matters most": span[1] - 1,
                "that token is not in the subject: look only at positions start..end-1": int(
                    scores.max(0).values.argmax()
                ),
                "that is the token with the highest *mean* over layers: take the highest score at any layer": span[0]
                + int(scores[:, span[0] : span[1]].mean(0).argmax()),
            }
            c.equal(
                name,
                got,
                answer,
                hint="argmax over the subject's positions of the highest score at any layer",
                mistakes=mistakes,
            )
            c.passed(name)
    return c.result
