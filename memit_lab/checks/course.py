"""The course: every exercise's check, and a record, for one notebook session, of the functions that passed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from . import causal_tracing, least_squares, memit_by_hand, null_space, residual_lens
from .core import Check, CheckResult, require_function

#: check name -> check, for the five assignments in order
CHECKS: Mapping[str, Check] = MappingProxyType(
    {
        name: getattr(module, name)
        for module in (residual_lens, causal_tracing, least_squares, memit_by_hand, null_space)
        for name in module.__all__
    }
)


class Course:
    """The checks of one notebook session, and which function passed each.

    A notebook creates one in its setup cell (``course = Course()``) and runs each check through
    it, ``course.check_fit_memory(fit_memory)``. Before a lecture cell runs the student's own
    functions it asks ``course.has_passed(course.check_fit_memory, fit_memory)``: whether this very
    function object passed that check on its last run, so no check runs twice. Re-running an
    exercise cell defines a new function object, which must pass its check again; a failed or
    pending run forgets the function that passed before.

    Example:
        >>> import torch
        >>> def fit(keys, values):
        ...     return torch.linalg.solve(keys @ keys.T, keys @ values.T).T
        >>> course = Course()
        >>> course.has_passed(course.check_fit_memory, fit)
        False
        >>> _ = course.check_fit_memory(fit)
        >>> course.has_passed(course.check_fit_memory, fit), course.has_passed(course.check_rank_one_update, fit)
        (True, False)
    """

    def __init__(self) -> None:
        self._passed: dict[str, Callable[..., Any]] = {}

    def __getattr__(self, name: str) -> Check:
        """``course.check_x``: the check ``check_x``, recording in this course what passed it."""
        check = CHECKS.get(name)
        if check is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

        def recorded(fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
            return self.run(check, fn, pending_ok=pending_ok)

        recorded.__name__ = recorded.__qualname__ = name
        recorded.__doc__ = check.__doc__
        recorded.twins = check.twins  # type: ignore[attr-defined]  # the Check protocol's attribute
        return recorded  # type: ignore[return-value]  # a function with the Check protocol's attributes

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *CHECKS})

    def run(self, check: Check, fn: Callable[..., Any], *, pending_ok: bool = False) -> CheckResult:
        """``check(fn)``, remembering ``fn`` if it passes and forgetting the check's last pass otherwise."""
        require_function(check.__name__, fn)
        self._passed.pop(check.__name__, None)
        result = check(fn, pending_ok=pending_ok)
        if result.passed:
            self._passed[check.__name__] = fn
        return result

    def has_passed(self, check: Callable[..., Any], fn: Callable[..., Any]) -> bool:
        """Whether this very function object ``fn`` passed ``check`` (by name) on its last run in this course."""
        return self._passed.get(getattr(check, "__name__", "")) is fn
