"""The skeleton every exercise check shares: cases -> reference -> call -> require -> compare -> named mistakes.

An exercise is a generator of :class:`Case` declarations (the inputs, memit_lab's answer to them, the
properties the right answer has, the hints and the known mistakes, all as data), made into a check by
:func:`exercise`. The check calls the student's function on each case and judges the answer in one order:

1. the call, with memit_lab's own answer to the exercise (its *twins*) refused: a function that calls one
   fails with "write it yourself"; a stub is "not implemented yet"; any other exception names the input
   that broke it;
2. with ``shape_first``, a finite tensor of the reference's shape;
3. the ``before`` properties, which do not depend on memit_lab's implementation;
4. the reference: ``torch.allclose`` for a tensor, ``==`` for a plain value;
5. the ``after`` properties.

The first step that fails raises :class:`CheckFailed` with the hint of the known mistake the answer
reproduces, or else the step's own hint.
"""

from __future__ import annotations

import functools
import numbers
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .answers import Mistakes, close, describe, diagnose, relative_gap

# -- verdicts ------------------------------------------------------------------------------


class CheckFailed(AssertionError):
    """A wrong answer: which check and case, what was expected, what came back, and a hint."""

    def __init__(self, check: str, case: str, expected: str, got: str, hint: str) -> None:
        self.check, self.case, self.expected, self.got, self.hint = check, case, expected, got, hint
        super().__init__(f"{check} failed on {case}\n  expected: {expected}\n  got:      {got}\n  hint:     {hint}")


class NotImplementedYet(CheckFailed):
    """The function still raises ``NotImplementedError``: the exercise is not done yet."""


class CalledTheLibrary(CheckFailed):
    """The function calls memit_lab's own answer to the exercise (a twin the check compares with)."""


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


@runtime_checkable
class Check(Protocol):
    """A check: runs a student's function on an exercise's cases; raises :class:`CheckFailed` on a wrong answer."""

    __name__: str
    #: memit_lab's own answers to the exercise, refused while the student's function runs
    twins: tuple[Callable[..., Any], ...]

    def __call__(self, fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult: ...


# -- declarations --------------------------------------------------------------------------


class _Absent:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``Case.expected`` for a case that its properties judge alone (there is no reference answer to compare)
NO_REFERENCE: Any = _Absent("NO_REFERENCE")
#: ``Property.answer`` for a property that no known mistake explains
UNMATCHED: Any = _Absent("UNMATCHED")


@dataclass(frozen=True)
class Property:
    """An independent property of the right answer, and what to say when it does not hold.

    Attributes:
        ok: whether the answer has it.
        expected, got: the property in words, and what the answer gives instead.
        hint: what to try, unless ``answer`` reproduces one of the case's known mistakes.
        answer: the value matched against the case's mistakes (``UNMATCHED``: none explains a failure).
    """

    ok: bool
    expected: str
    got: str
    hint: str
    answer: Any = UNMATCHED


def no_properties(got: Any) -> Iterator[Property]:
    """The default of ``Case.before`` and ``Case.after``."""
    return iter(())


def as_given(got: Any) -> Any:
    """The default of ``Case.read``: the answer itself."""
    return got


@dataclass(frozen=True)
class Case:
    """One input of an exercise and how to judge the answer to it (see the module's docstring for the order).

    Attributes:
        name: the case in words, for the report and the failure message.
        args: what the student's function is called with.
        expected: memit_lab's answer: a tensor is compared within ``rtol``/``atol``, a plain value with ``==``.
        hint: what to try when the answer differs from ``expected`` and matches no known mistake.
        mistakes: the known wrong answers of this case, shared by every step.
        shape_hint: what to say when the answer is not a tensor of ``expected``'s shape (default: ``hint``).
        shape_first: check the shape before the properties (they need a tensor of the right shape).
        before, after: the properties of the answer checked before and after the reference; generators, so
            one may act on the answer (a backward pass) between two properties.
        read: how the answer is read before the comparison (one number -> a 0-d tensor).
    """

    name: str
    args: tuple[Any, ...]
    expected: Any = NO_REFERENCE
    hint: str = ""
    mistakes: Mistakes = field(default_factory=dict)
    shape_hint: str | None = None
    shape_first: bool = False
    before: Callable[[Any], Iterable[Property]] = no_properties
    after: Callable[[Any], Iterable[Property]] = no_properties
    read: Callable[[Any], Any] = as_given
    rtol: float = 1e-5
    atol: float = 1e-6


def exercise(*twins: Callable[..., Any]) -> Callable[[Callable[[], Iterable[Case]]], Check]:
    """Make the generator of an exercise's cases into its check; the check takes the generator's name and docstring.

    ``twins`` are memit_lab's functions that answer the exercise (those the reference comes from):
    while the student's function runs they are replaced, wherever a module or the student's
    notebook holds them, by a stand-in that fails the check with "write it yourself"
    (:func:`twins_refused`).

    Example:
        >>> @exercise()
        ... def check_double() -> Iterator[Case]:
        ...     '''``fn(x)`` -> 2 x.'''
        ...     yield Case("x = [1, 2]", (torch.tensor([1.0, 2.0]),), torch.tensor([2.0, 4.0]), hint="double it")
        >>> check_double(lambda x: 2 * x)
        passed: check_double(<lambda>) on 1 cases
          - x = [1, 2]
        >>> check_double(lambda x: x + 1)
        Traceback (most recent call last):
        memit_lab.checks.core.CheckFailed: check_double failed on x = [1, 2]
          expected: tensor of shape [2] (float32), norm 4.47214, entries [2, 4]
          got:      tensor of shape [2] (float32), norm 3.60555, entries [2, 3] (relative difference 0.224)
          hint:     double it
        >>> def halve(x):  # a library's answer
        ...     return x / 2
        >>> @exercise(halve)
        ... def check_halve() -> Iterator[Case]:
        ...     '''``fn(x)`` -> x / 2.'''
        ...     yield Case("x = [2, 4]", (torch.tensor([2.0, 4.0]),), torch.tensor([1.0, 2.0]), hint="halve it")
        >>> check_halve(lambda x: 0.5 * x).passed
        True
        >>> check_halve(lambda x: halve(x))
        Traceback (most recent call last):
        memit_lab.checks.core.CalledTheLibrary: check_halve failed on x = [2, 4]
          expected: your own computation of this step
          got:      a call to ...halve
          hint:     write it yourself: <lambda> calls ...halve, memit_lab's own answer to this exercise ...
    """
    refused = tuple(twins)

    def make(cases: Callable[[], Iterable[Case]]) -> Check:
        name = cases.__name__

        def check(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
            return run_check(name, fn, cases(), pending_ok=pending_ok, twins=refused)

        check.__name__ = check.__qualname__ = name
        check.__doc__, check.__module__ = cases.__doc__, cases.__module__
        check.twins = refused  # type: ignore[attr-defined]  # the Check protocol's attribute
        return check  # type: ignore[return-value]  # a function with the Check protocol's attributes

    return make


def require_function(check: str, fn: Any) -> None:
    """A check is given the function itself, not its result."""
    if not callable(fn):
        raise TypeError(f"{check} checks a function: pass the function itself (no parentheses), got {fn!r}")


def run_check(
    check: str,
    fn: Callable[..., Any],
    cases: Iterable[Case],
    *,
    pending_ok: bool,
    twins: tuple[Callable[..., Any], ...] = (),
) -> CheckResult:
    """Judge ``fn``'s answer on each case in turn, ``twins`` refused; with ``pending_ok``, a stub ends the check
    quietly, pending."""
    require_function(check, fn)
    judge = _Judge(check, fn, twins)
    try:
        for case in cases:
            judge.case(case)
    except NotImplementedYet:
        if not pending_ok:
            raise
        return CheckResult(check, judge.function, tuple(judge.passed), pending=True)
    return CheckResult(check, judge.function, tuple(judge.passed))


# -- the library's own answers are refused -------------------------------------------------------------------


class _Refused(BaseException):
    """Raised by a twin's stand-in. A BaseException, so that a broad ``except Exception`` in the student's code
    does not swallow it (the stand-in also records the call, for a student who catches even this)."""


def qualified_name(function: Callable[..., Any]) -> str:
    """``memit_lab.kv_memory.insertion_update``: where a function is defined."""
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', repr(function))}"


def _stand_in(original: Callable[..., Any], calls: list[str]) -> Callable[..., Any]:
    name = qualified_name(original)

    @functools.wraps(original)
    def refuse(*args: Any, **kwargs: Any) -> Any:
        calls.append(name)
        raise _Refused(name)

    return refuse


def _namespaces(fn: Callable[..., Any]) -> list[dict[str, Any]]:
    """Every module's namespace, and the student's function's own globals (a notebook, or an exec namespace)."""
    found = [vars(m) for m in list(sys.modules.values()) if isinstance(getattr(m, "__dict__", None), dict)]
    own = getattr(fn, "__globals__", None)
    return [*found, own] if isinstance(own, dict) else found


@contextmanager
def twins_refused(twins: tuple[Callable[..., Any], ...], fn: Callable[..., Any]) -> Iterator[list[str]]:
    """While inside, each of ``twins`` is replaced, under every name any module (or ``fn``'s globals) holds it by,
    with a stand-in that records the call and raises; yields the list of the twins called.

    Replacing the names where they are held, not the function's code, is what ``unittest.mock.patch`` does
    for one location; here it is done for all of them, so ``from memit_lab.kv_memory import insertion_update``
    in the notebook, ``memit_lab.kv_memory.insertion_update`` and a library function that calls it all meet
    the stand-in. Everything is put back on the way out.
    """
    calls: list[str] = []
    if not twins:
        yield calls
        return
    stand_ins = {id(twin): (twin, _stand_in(twin, calls)) for twin in twins}
    patched: list[tuple[dict[str, Any], str, Any]] = []
    try:
        for namespace in _namespaces(fn):
            for key, value in list(namespace.items()):
                entry = stand_ins.get(id(value))
                if entry is not None and value is entry[0]:
                    namespace[key] = entry[1]
                    patched.append((namespace, key, value))
        yield calls
    finally:
        for namespace, key, value in reversed(patched):
            namespace[key] = value


# -- the judge -----------------------------------------------------------------------------


class _Judge:
    """Calls the student's function, compares, and turns mistakes into :class:`CheckFailed`."""

    def __init__(self, check: str, fn: Callable[..., Any], twins: tuple[Callable[..., Any], ...] = ()) -> None:
        self.check, self.fn, self.twins = check, fn, twins
        self.function = getattr(fn, "__name__", repr(fn))
        self.passed: list[str] = []

    def case(self, case: Case) -> None:
        got = self.call(case.name, *case.args)
        if case.shape_first:
            self.tensor(case.name, got, case.expected, case.shape_hint or case.hint, case.mistakes)
        for prop in case.before(got):
            self.require(case.name, prop, case.mistakes)
        if isinstance(case.expected, torch.Tensor):
            self.compare(case, case.read(got))
        elif case.expected is not NO_REFERENCE:
            self.equal(case, got)
        for prop in case.after(got):
            self.require(case.name, prop, case.mistakes)
        self.passed.append(case.name)

    def fail(self, case: str, expected: str, got: str, hint: str) -> CheckFailed:
        return CheckFailed(self.check, case, expected, got, hint)

    def call(self, case: str, *args: Any) -> Any:
        """The student's answer on one case, with the twins refused; their exceptions become failures that say
        which input broke it."""
        itself = [qualified_name(twin) for twin in self.twins if self.fn is twin]  # `my_answer = the_twin`
        if itself:
            raise self.called_the_library(case, itself[0])
        with twins_refused(self.twins, self.fn) as calls:
            try:
                got = self.fn(*args)
            except _Refused:
                got = None  # the calls list names the twin, below
            except NotImplementedError:
                raise NotImplementedYet(
                    self.check,
                    case,
                    "an answer",
                    "NotImplementedError (the stub is still in place)",
                    f"replace `raise NotImplementedError()` in {self.function} with your code, run that cell, "
                    "then run this check again",
                ) from None
            except Exception as err:
                if calls:
                    got = None  # the student's code turned the refusal into another error
                else:
                    raise self.crashed(case, err) from err
        if calls:
            raise self.called_the_library(case, calls[0])
        return got

    def called_the_library(self, case: str, twin: str) -> CalledTheLibrary:
        return CalledTheLibrary(
            self.check,
            case,
            "your own computation of this step",
            f"a call to {twin}",
            f"write it yourself: {self.function} calls {twin}, memit_lab's own answer to this exercise "
            "(the check compares your function with it); build it from the operations the exercise describes",
        )

    def crashed(self, case: str, err: Exception) -> CheckFailed:
        where = traceback.extract_tb(err.__traceback__)[-1]
        return self.fail(
            case,
            "an answer",
            f"{type(err).__name__}: {err}",
            f"{self.function} raised an error on this input (in {where.name}, line {where.lineno}: "
            f"{where.line!r}); the traceback above shows the chain",
        )

    def tensor(self, case: str, got: Any, expected: torch.Tensor, hint: str, mistakes: Mistakes) -> None:
        """``got`` is a tensor of the expected shape (a known mistake of another shape gets its own hint)."""
        if not isinstance(got, torch.Tensor):
            raise self.fail(case, describe(expected), describe(got), "return a torch.Tensor")
        if got.shape != expected.shape:
            raise self.fail(case, describe(expected), describe(got), diagnose(got, mistakes) or hint)
        if not torch.isfinite(got).all():
            raise self.fail(case, describe(expected), describe(got), "your answer has NaN or infinite entries")

    def require(self, case: str, prop: Property, mistakes: Mistakes) -> None:
        """A property of the right answer; on failure the hint of the mistake ``prop.answer`` matches."""
        if prop.ok:
            return
        if prop.answer is UNMATCHED:
            diagnosis = None
        elif isinstance(prop.answer, torch.Tensor):
            diagnosis = diagnose(prop.answer, mistakes)
        else:
            known = mistakes() if callable(mistakes) else mistakes
            diagnosis = next((h for h, v in known.items() if v is not None and v == prop.answer), None)
        raise self.fail(case, prop.expected, prop.got, diagnosis or prop.hint)

    def compare(self, case: Case, got: Any) -> None:
        """``got`` equals the reference within tolerance; otherwise the hint of the matching known mistake."""
        expected, rtol, atol = case.expected, case.rtol, case.atol
        self.tensor(case.name, got, expected, case.shape_hint or case.hint, case.mistakes)
        if close(got, expected, rtol, atol):
            return
        diagnosis = diagnose(got, case.mistakes)
        if diagnosis is None and close(got, expected, 1e3 * rtol, 1e3 * atol):
            diagnosis = (
                f"close (relative difference {relative_gap(got, expected):.2g}) but not within tolerance: "
                "compute in float64 (.double()) and solve with torch.linalg.solve, not an explicit inverse"
            )
        raise self.fail(
            case.name,
            describe(expected),
            f"{describe(got)} (relative difference {relative_gap(got, expected):.3g})",
            diagnosis or case.hint,
        )

    def equal(self, case: Case, got: Any) -> None:
        """``got == expected`` for plain values (ints, None, tuples)."""
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, numbers.Integral) and not isinstance(got, bool):
            got = int(got)
        expected = case.expected
        if got == expected and type(got) is type(expected):
            return
        known = case.mistakes() if callable(case.mistakes) else case.mistakes
        diagnosis = next(
            (h for h, wrong in known.items() if wrong is not None and wrong != expected and got == wrong), None
        )
        raise self.fail(case.name, describe(expected), describe(got), diagnosis or case.hint)
