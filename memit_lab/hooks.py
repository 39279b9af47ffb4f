"""Read or replace the input and output of any module, by name, for as long as a ``with`` block lasts.

Two context managers in the spirit of baukit's ``Trace``/``TraceDict``:

* :class:`Trace` watches one module;
* :class:`TraceDict` watches several and gives a dict of :class:`Trace` by name.

Hooks are removed when the block ends, also when it ends with an exception, so no
hook outlives the call that needed it. A module whose output is a tuple (attention
modules return ``(output, weights)``) is read and edited through its first element.

Example:
    >>> import torch
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gpt2")
    >>> ids = lm.tokenizer("The Eiffel Tower is in", return_tensors="pt").input_ids
    >>> with Trace(lm.model, lm.adapter.mlp_module(0)) as t:
    ...     _ = lm.model(ids)
    >>> t.output.shape == (1, ids.shape[1], lm.d_model)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["Trace", "TraceDict", "get_module"]

#: ``edit_output(output, module_name) -> new_output``; ``output`` is the tensor
#: (the first element when the module returns a tuple).
EditFn = Callable[[torch.Tensor, str], torch.Tensor]


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``, with an error that lists near misses."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        prefix = name.rsplit(".", 1)[0]
        near = [n for n, _ in model.named_modules() if n.startswith(prefix)][:8]
        raise KeyError(f"module {name!r} not found in {type(model).__name__}; similar: {near}") from None


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, tensor: torch.Tensor) -> Any:
    return (tensor, *value[1:]) if isinstance(value, tuple) else tensor


_H = TypeVar("_H", bound="_Hooks")


class _Hooks:
    """What both tracers share: a ``with`` block that removes the hooks on exit and ends a stopped pass quietly."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        self.close()
        return exc_type is StopForward


class Trace(_Hooks):
    """Record (and optionally edit) one module's input and output during forward passes.

    Args:
        model: the model that holds the module.
        name: dotted module name.
        retain_input: keep the module's first positional input as ``.input``.
        retain_output: keep its output (first element of a tuple) as ``.output``.
        edit_output: ``fn(output, name) -> new output``; what it returns replaces the
            output for the rest of the forward pass (and is what ``.output`` holds).
        edit_input: ``fn(input, name) -> new input`` for the first positional input.
        detach: store detached tensors (default); ``False`` keeps the autograd graph.
        stop: raise :class:`StopForward` after this module so the rest of the model
            is not computed (catch it with ``Trace`` as the outermost ``with``).

    After each forward pass, ``.input`` / ``.output`` hold that pass's tensors;
    with several passes the last one wins.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        *,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: EditFn | None = None,
        edit_input: EditFn | None = None,
        detach: bool = True,
        stop: bool = False,
    ) -> None:
        self.name = name
        self.module = get_module(model, name)
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        keep = (lambda t: t.detach()) if detach else (lambda t: t)

        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                x = args[0]
                if edit_input is not None:
                    x = edit_input(x, name)
                    args = (x, *args[1:])
                if retain_input:
                    self.input = keep(x)
            else:  # blocks called with hidden_states as a keyword
                x = kwargs.get("hidden_states")
                if x is not None and edit_input is not None:
                    x = edit_input(x, name)
                    kwargs = {**kwargs, "hidden_states": x}
                if retain_input and x is not None:
                    self.input = keep(x)
            return args, kwargs

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            out = output
            if edit_output is not None:
                out = _replace_first(output, edit_output(_first(output), name))
            if retain_output:
                self.output = keep(_first(out))
            if stop:
                raise StopForward()
            return out if edit_output is not None else None

        if retain_input or edit_input is not None:
            self._handles.append(self.module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(hook))

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TraceDict(_Hooks, dict[str, Trace]):
    """Several :class:`Trace` at once: ``td[name].output`` after a forward pass.

    Keyword arguments are those of :class:`Trace` and apply to every module; ``stop``
    stops after the *last* name in the list (handy to run a model only as deep as needed).

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> names = [lm.adapter.w_out_module(l) for l in range(lm.n_layers)]
        >>> ids = lm.tokenizer("Paris is the capital of", return_tensors="pt").input_ids
        >>> with TraceDict(lm.model, names, retain_input=True) as td:
        ...     _ = lm.model(ids)
        >>> [tuple(td[n].input.shape[-1:]) for n in names] == [(lm.d_mlp,)] * lm.n_layers
        True
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str],
        *,
        stop: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        names = list(dict.fromkeys(names))
        try:
            for i, name in enumerate(names):
                self[name] = Trace(model, name, stop=stop and i == len(names) - 1, **kwargs)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every trace's hooks (idempotent)."""
        for trace in self.values():
            trace.close()


class StopForward(Exception):
    """Raised by a hook with ``stop=True`` to end a forward pass early; swallowed by the ``with``."""
