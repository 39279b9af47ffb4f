"""The registry of editing methods: one entry each, used by the experiments, the CLI and the widgets alike.

A :class:`Method` names what a method is called, the function that applies it, its
hyper-parameter class, how its defaults for a model are found, and one line that describes
it. Adding a method means writing its module (an ``apply_*(lm, requests, hparams, *, progress,
...) -> EditResult`` function on the kernel of :mod:`memit_lab.editing`) and one entry in
:data:`METHODS`; every ``--method`` choice, sweep and explorer then offers it.

Example:
    >>> import torch
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-gpt2")
    >>> sorted(METHODS)
    ['alphaedit', 'ft-l', 'ft-w', 'memit', 'rome-seq']
    >>> get_method("ft").name  # the old name of FT-L, kept as an alias
    'ft-l'
    >>> before = lm.adapter.w_out_weight(lm.model, 2).clone()
    >>> hp = get_method("ft-l").hparams(layer=2, steps=3)
    >>> with edits_applied(lm, [EditRequest("{} is in", "Paris", "Rome")], "ft-l", hp) as result:
    ...     changed = not torch.equal(lm.adapter.w_out_weight(lm.model, 2), before)
    >>> changed, torch.equal(lm.adapter.w_out_weight(lm.model, 2), before), result.restored
    (True, True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .alphaedit import apply_alphaedit
from .editing import EditResult
from .finetune import apply_ft, apply_ft_w
from .hparams import AlphaEditHyperParams, FtHyperParams, FtWHyperParams, MemitHyperParams, RomeHyperParams
from .layer_choice import memit_defaults
from .memit import apply_memit
from .models import LoadedModel
from .requests import EditRequest
from .rome import apply_rome

__all__ = ["ALIASES", "METHODS", "Method", "apply_edits", "edits_applied", "get_method", "method_names"]


@dataclass(frozen=True)
class Method:
    """One editing method as the rest of memit_lab sees it.

    Attributes:
        name: its registry name (``--method`` on the command line, ``method=`` in the experiments).
        apply: ``apply(lm, requests, hparams, **options) -> EditResult``; changes ``lm`` in place,
            ``result.restore()`` undoes it bit for bit.
        hparams: its hyper-parameter dataclass (:mod:`memit_lab.hparams`).
        defaults: the hyper-parameters it uses for a model when given none.
        label: its name as the papers write it (menus, tables).
        description: one line for menus and ``--help``.
    """

    name: str
    apply: Callable[..., EditResult]
    hparams: type
    defaults: Callable[[LoadedModel], Any]
    label: str
    description: str

    def __call__(
        self, lm: LoadedModel, requests: Sequence[EditRequest], hparams: Any = None, **options: Any
    ) -> EditResult:
        """Apply the method with ``hparams`` (``None``: :attr:`defaults` for ``lm``), refusing another method's."""
        hp = self.defaults(lm) if hparams is None else hparams
        if not isinstance(hp, self.hparams):
            raise TypeError(f"{self.name} takes {self.hparams.__name__}, got {type(hp).__name__}")
        return self.apply(lm, requests, hp, **options)


#: Every editing method, by registry name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "memit", apply_memit, MemitHyperParams, memit_defaults, "MEMIT",
            "MEMIT: every edit at once, spread over the layers R (Algorithm 1)",
        ),
        Method(
            "rome-seq", apply_rome, RomeHyperParams, RomeHyperParams.for_model, "ROME",
            "ROME applied sequentially: one rank-one update of one layer per edit",
        ),
        Method(
            "ft-l", apply_ft, FtHyperParams, FtHyperParams.for_model, "FT-L",
            "FT-L: fine-tuning one layer's W_out on every edit at once, each weight kept in an L-inf box around "
            "its old value (alias: ft, its old name)",
        ),
        Method(
            "ft-w", apply_ft_w, FtWHyperParams, FtWHyperParams.for_model, "FT-W",
            "FT-W: fine-tuning every weight of one block on every edit at once, with weight decay and no box "
            "(the MEMIT paper's baseline)",
        ),
        Method(
            "alphaedit", apply_alphaedit, AlphaEditHyperParams, AlphaEditHyperParams.for_model, "AlphaEdit",
            "AlphaEdit: MEMIT's update projected onto the null space of the preserved keys",
        ),
    )
}  # fmt: skip

#: Other names accepted for a method. ``ft`` is FT-L's name from before FT-W was added: old commands and cached
#: experiments that say ``ft`` keep meaning the W_out-in-a-box fine-tuning they ran.
ALIASES: dict[str, str] = {"rome": "rome-seq", "ft": "ft-l"}


def method_names() -> tuple[str, ...]:
    """The registry names, in registry order (the CLI's ``--method`` choices)."""
    return tuple(METHODS)


def get_method(name: str) -> Method:
    """The registered method called ``name`` (or one of its :data:`ALIASES`); a clear error otherwise."""
    key = ALIASES.get(name, name)
    if key not in METHODS:
        raise ValueError(f"unknown editing method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def apply_edits(
    lm: LoadedModel, requests: Sequence[EditRequest], method: str = "memit", hparams: Any = None, **options: Any
) -> EditResult:
    """Write ``requests`` into ``lm`` with the registered ``method``; undo with ``result.restore()``.

    ``options`` go to the method's apply function (``progress``, ``second_moments``, ``contexts``...).
    """
    return get_method(method)(lm, requests, hparams, **options)


@contextmanager
def edits_applied(
    lm: LoadedModel, requests: Sequence[EditRequest], method: str = "memit", hparams: Any = None, **options: Any
) -> Iterator[EditResult]:
    """``with edits_applied(lm, requests): ...`` -- the edited model inside, the original after (bit for bit)."""
    result = apply_edits(lm, requests, method, hparams, **options)
    try:
        yield result
    finally:
        result.restore()
