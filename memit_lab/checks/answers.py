"""Reading, comparing and describing a student's answer: the vocabulary of every check's messages."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

#: Known wrong answers, hint -> the wrong answer (None where it does not apply to this case); or a
#: function returning them, so that costly ones are computed only when an answer is wrong.
Mistakes = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


def describe(x: Any) -> str:
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


def close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    """Same shape and ``allclose`` in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=rtol, atol=atol))


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def diagnose(got: torch.Tensor, mistakes: Mistakes) -> str | None:
    """The hint of the first known mistake that ``got`` reproduces."""
    if callable(mistakes):
        mistakes = mistakes()
    for hint, wrong in mistakes.items():
        if isinstance(wrong, torch.Tensor) and close(got, wrong, 1e-4, 1e-6):
            return hint
    return None


def scalar(x: Any) -> float | None:
    """``x`` as a float when it is one number (a Python number or a one-element tensor), else None."""
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return float(x.detach())
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return None


def one_number(got: Any) -> Any:
    """``Case.read`` for an answer that is one number, a Python number or a one-element tensor: a 0-d tensor."""
    number = scalar(got)
    return got if number is None else torch.tensor(number)


def one_element_tensor(got: Any) -> Any:
    """``Case.read`` for an answer that must be a one-element tensor (a loss to differentiate): a 0-d tensor."""
    value = scalar(got) if isinstance(got, torch.Tensor) else None
    return got if value is None else torch.tensor(value)
