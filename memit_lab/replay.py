"""Replay: run blocks l..end again on chosen rows and positions of a recorded run.

Causal tracing (restore one state, see what the rest of the model makes of it) and the z
optimisation of eq. 16 (add delta at layer L, read the loss at the top) both change the
residual stream at one layer and need only what the blocks above compute from there. So
one forward pass is *recorded* -- every block's call (the positional and keyword arguments
the model passes it: attention mask, positions, rotary tables ...) and every layer's
attention keys and values -- and then the blocks from layer l on are *replayed* on a new
hidden state ``[rows, pos, d_model]``:

* on chosen rows of the recorded batch (``rows``), or on rows that broadcast against a
  recording of batch 1;
* on the last positions only, the keys and values of the earlier ones given as a
  ``prefix`` (attention is causal: the earlier positions do not see the later ones);
* with or without autograd (whatever mode the caller is in).

The top of the model is read through the adapter (:func:`readout`: its final norm, then its
unembedding), never by assuming what a model's ``base_model`` returns.

This module is the only one that touches transformers' cache classes. What it relies on
(the contract, pinned on every architecture by ``tests/test_replay.py``): the causal LM takes
a ``cache=`` keyword; a :class:`transformers.DynamicCache` can be filled from per-layer keys and
values (``ddp_cache_data``); the model passes that cache object to every block; each layer's
attention calls ``cache.update(keys, values, layer_idx, ...)`` once and attends over what it
returns. When a transformers upgrade breaks any of it, :class:`ReplayContractError` says
which part and names the version.

Example:
    >>> import torch
    >>> from memit_lab import load_model
    >>> from memit_lab.hooks import Trace
    >>> lm = load_model("tiny-llama")
    >>> ids = lm.tokenizer("The Eiffel Tower is located in", return_tensors="pt").input_ids
    >>> with torch.no_grad():
    ...     full = lm.model(ids).logits
    ...     before = record(lm, ids[:, :3])  # the first three tokens: only their keys and values are kept
    ...     with Trace(lm.model, lm.adapter.block(0)) as h1:
    ...         rest = record(lm, ids[:, 3:], prefix=before.kv)
    ...     again = readout(lm, replay(lm, rest, 1, h1.output, prefix=before.kv))
    >>> again.shape == full[:, 3:].shape, bool((again - full[:, 3:]).abs().max() < 1e-5)
    (True, True)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from jaxtyping import Float
from transformers import DynamicCache

from .hooks import Trace
from .models import LoadedModel

__all__ = [
    "PRECISIONS",
    "BlockCall",
    "KeysValues",
    "Recording",
    "ReplayContractError",
    "autocast",
    "precision",
    "readout",
    "record",
    "replay",
    "replay_block",
    "unembed",
]

log = logging.getLogger(__name__)

#: The positional and keyword arguments a model passes one of its blocks.
BlockCall = tuple[tuple[Any, ...], dict[str, Any]]

#: The arithmetic a replay may run in, by name: ``None`` is the model's own (no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ReplayContractError(RuntimeError):
    """The installed transformers no longer behaves as :mod:`memit_lab.replay` relies on."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"transformers {transformers.__version__}: {what}. memit_lab.replay relies on the cache contract of "
            "transformers 5 (see its module docstring); adapt memit_lab/replay.py to this version, or install the "
            "version in pyproject.toml. Tracing still works with batched=False."
        )


@dataclass(frozen=True)
class KeysValues:
    """Per layer, the attention keys and values of some positions, each ``[batch, heads, pos, head_dim]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer], self.values[layer]

    def before(self, pos: int) -> KeysValues:
        """The keys and values of positions ``< pos``."""
        return KeysValues(tuple(k[:, :, :pos] for k in self.keys), tuple(v[:, :, :pos] for v in self.values))

    def above(self, layer: int) -> KeysValues:
        """Only the layers above ``layer`` kept (the others emptied, their memory freed): what replaying
        blocks ``layer + 1..`` reads."""
        keys = tuple(k if i > layer else k.new_empty(0) for i, k in enumerate(self.keys))
        values = tuple(v if i > layer else v.new_empty(0) for i, v in enumerate(self.values))
        return KeysValues(keys, values)

    def select_rows(self, rows: torch.Tensor) -> KeysValues:
        """The keys and values of batch rows ``rows``."""
        return KeysValues(
            tuple(k.index_select(0, rows) for k in self.keys), tuple(v.index_select(0, rows) for v in self.values)
        )


@dataclass(frozen=True)
class Recording:
    """What one recorded forward pass leaves for replaying.

    Attributes:
        calls: per recorded block (by layer), the arguments the model passed it; the block's
            input hidden state ``[batch, pos, d_model]`` is among them.
        kv: per layer, the keys and values attention attended over: the prefix's, then these positions'.
        final: ``[batch, pos, d_model]`` the final norm's output (``None`` when logits were asked for).
        logits: ``[batch, kept, d_vocab]`` the model's logits, when ``logits_to_keep`` was given.
        batch: rows of the recorded pass.
        cache: the cache object the blocks were given (replaced by the prefix when replaying).
    """

    calls: dict[int, BlockCall]
    kv: KeysValues
    final: Float[torch.Tensor, "batch pos d_model"] | None
    logits: Float[torch.Tensor, "batch kept d_vocab"] | None
    batch: int
    cache: object


class _RecordingCache(DynamicCache):
    """A cache, filled with a prefix if any, that keeps each layer's keys and values as attention sees them."""

    def __init__(self, prefix: KeysValues | None) -> None:
        layers = None if prefix is None else list(zip(prefix.keys, prefix.values, strict=True))
        try:
            super().__init__(ddp_cache_data=layers)
        except TypeError as err:
            what = f"DynamicCache(ddp_cache_data=...) no longer builds a cache filled with a prefix ({err})"
            raise ReplayContractError(what) from err
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.seen[layer_idx] = (keys, values)
        return keys, values


class _FrozenPrefix:
    """A stand-in for the cache when replaying one block: "the prefix, then what you give me", storing nothing.

    Attention calls ``cache.update(k, v, layer)`` and attends over what it returns; this one
    prepends the prefix's fixed keys and values, so any number of replays can reuse it (a
    DynamicCache would grow with each). Anything else asked of it is a change of contract.
    """

    def __init__(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.layer, self.keys, self.values = layer, keys, values

    def update(
        self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx != self.layer:
            raise ReplayContractError(f"block {self.layer}'s attention updated the cache of layer {layer_idx}")
        return torch.cat([self.keys, k], dim=-2), torch.cat([self.values, v], dim=-2)

    def __getattr__(self, name: str) -> Any:
        raise ReplayContractError(f"a block asked its cache for {name!r}; only update(keys, values, layer) is known")


def _hook_calls(lm: LoadedModel, blocks: Iterable[int], calls: dict[int, BlockCall]) -> list[Any]:
    """Pre-hooks that keep the arguments each of ``blocks`` is called with."""
    handles = []
    for layer in blocks:

        def keep(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], layer: int = layer) -> None:
            calls[layer] = (args, dict(kwargs))

        block = lm.model.get_submodule(lm.adapter.block(layer))
        handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    return handles


def _check_contract(lm: LoadedModel, cache: _RecordingCache, calls: dict[int, BlockCall]) -> KeysValues:
    """Every layer reported its keys and values; every recorded block was handed the cache."""
    if sorted(cache.seen) != list(range(lm.n_layers)):
        raise ReplayContractError(
            f"{lm.name}: attention reported keys and values through cache.update for layers {sorted(cache.seen)}, "
            f"not for all {lm.n_layers}"
        )
    for layer, (args, kwargs) in calls.items():
        if not any(value is cache for value in (*args, *kwargs.values())):
            raise ReplayContractError(f"{lm.name}: block {layer} was not passed the cache given as cache=")
    return KeysValues(*(tuple(kv) for kv in zip(*(cache.seen[layer] for layer in range(lm.n_layers)), strict=True)))


def record(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    prefix: KeysValues | None = None,
    blocks: Sequence[int] | range | None = None,
    logits_to_keep: int | None = None,
) -> Recording:
    """One forward pass of ``lm`` over ``input_ids`` ``[batch, pos]`` after ``prefix``, recorded for replaying.

    Args:
        attention_mask: ``[batch, prefix + pos]`` (1 = a real token), as the model takes it.
        position_ids: ``[batch, pos]``; by default they follow the prefix.
        prefix: keys and values of the positions before (e.g. another recording's ``kv``).
        blocks: the layers whose calls are kept (default: all).
        logits_to_keep: ``None`` stops after the final norm (no unembedding); else the model's
            own argument (0: logits at every position).

    Hooks the caller holds on the model's modules (e.g. :class:`memit_lab.hooks.Trace`) see this pass.
    """
    cache = _RecordingCache(prefix)
    calls: dict[int, BlockCall] = {}
    inputs: dict[str, Any] = {"input_ids": input_ids, "cache": cache, "use_cache": True}
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    handles = _hook_calls(lm, range(lm.n_layers) if blocks is None else blocks, calls)
    try:
        if logits_to_keep is None:
            with Trace(lm.model, lm.adapter.final_norm, stop=True) as norm:
                lm.model(**inputs)
            final, logits = norm.output, None
        else:
            final, logits = None, lm.model(**inputs, logits_to_keep=logits_to_keep).logits
    finally:
        for handle in handles:
            handle.remove()
    kv = _check_contract(lm, cache, calls)
    return Recording(calls, kv, final, logits, int(input_ids.shape[0]), cache)


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """``value`` restricted to batch ``rows`` (tensors with a leading batch dimension; others as they are)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch:
        return value.index_select(0, rows)
    if isinstance(value, tuple | list):
        return type(value)(_rows(v, rows, batch) for v in value)
    return value


def replay_block(
    lm: LoadedModel,
    recording: Recording,
    layer: int,
    hidden: Float[torch.Tensor, "rows pos d_model"],
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    rows: torch.Tensor | None = None,
) -> Float[torch.Tensor, "rows pos d_model"]:
    """Block ``layer`` on ``hidden`` as the model called it in ``recording``, attending to ``prefix`` too.

    ``prefix`` is this layer's (keys, values) ``[rows, heads, prefix, head_dim]`` of the earlier
    positions. The recorded tensors (mask, positions, ...) are taken at ``rows`` of the recorded
    batch, or broadcast over the rows when ``rows`` is ``None`` (a recording of batch 1).
    """
    if layer not in recording.calls:
        raise ValueError(f"block {layer} was not recorded; record it with blocks=... including {layer}")
    args, kwargs = recording.calls[layer]
    cache = None if prefix is None else _FrozenPrefix(layer, *prefix)

    def swap(value: Any) -> Any:
        if value is recording.cache:
            return cache
        return value if rows is None else _rows(value, rows, recording.batch)

    args = tuple(swap(a) for a in args)
    kwargs = {k: swap(v) for k, v in kwargs.items()}
    if args:
        args = (hidden, *args[1:])
    else:
        kwargs["hidden_states"] = hidden
    out = _call_block(lm, layer, args, kwargs)
    return out[0] if isinstance(out, tuple) else out


def replay(
    lm: LoadedModel,
    recording: Recording,
    first: int,
    hidden: Float[torch.Tensor, "rows pos d_model"],
    *,
    prefix: KeysValues | None = None,
    rows: torch.Tensor | None = None,
) -> Float[torch.Tensor, "rows pos d_model"]:
    """Blocks ``first..end`` on ``hidden`` (block ``first``'s new input): the last block's output.

    ``prefix`` holds the earlier positions' keys and values for every row of the recording;
    with ``rows`` both it and the recorded tensors are taken at those rows.
    """
    for layer in range(first, lm.n_layers):
        kv = None
        if prefix is not None:
            kv = prefix.layer(layer)
            if rows is not None:
                kv = (kv[0].index_select(0, rows), kv[1].index_select(0, rows))
        hidden = replay_block(lm, recording, layer, hidden, kv, rows)
    return hidden


def unembed(lm: LoadedModel, normed: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_vocab"]:
    """Logits (float32) from the final norm's output, through the adapter's unembedding."""
    logits: torch.Tensor = lm.model.get_submodule(lm.adapter.unembed)(normed)
    return logits.float()


def readout(lm: LoadedModel, hidden: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_vocab"]:
    """Logits (float32) from the last block's output: the adapter's final norm, then its unembedding."""
    return unembed(lm, lm.model.get_submodule(lm.adapter.final_norm)(hidden))


# --- reduced precision: blocks under autocast, where the hardware computes it natively -------------------------------


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


#: CPU flags of native low-precision matrix products (AVX512-BF16 / AMX, AVX512-FP16 / AMX-FP16).
_CPU_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


@functools.cache
def _native(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``device_type`` computes ``dtype`` matrix products natively (elsewhere they are emulated: slower)."""
    if device_type == "cuda":
        return dtype is torch.float16 or torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and bool(_cpu_flags() & _CPU_FLAGS[dtype])
    return False


def precision(lm: LoadedModel, name: str) -> torch.dtype | None:
    """The autocast type for ``name`` (a key of :data:`PRECISIONS`) on ``lm``'s device; ``None`` for float32,
    and, with a logged warning, where the hardware lacks it (the replay then runs in float32).

    Example:
        >>> from memit_lab import load_model
        >>> precision(load_model("tiny-gpt2"), "float32") is None
        True
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {name!r}")
    dtype = PRECISIONS[name]
    if dtype is None or lm.dtype != torch.float32:
        return None
    if not _native(lm.device.type, dtype):
        _warn_emulated(lm.device.type, name)
        return None
    return dtype


@functools.cache
def _warn_emulated(device_type: str, name: str) -> None:
    """Once per device type and precision (a replay asks at every step)."""
    log.warning("%s has no native %s matrix products: replaying in float32", device_type, name)


#: Inside :func:`autocast`: the model, the type, and per replayed block its matrices in that type.
_LOW: contextvars.ContextVar[tuple[torch.nn.Module, torch.dtype, dict[int, dict[str, torch.Tensor]]] | None] = (
    contextvars.ContextVar("low_precision_blocks", default=None)
)


@contextlib.contextmanager
def autocast(lm: LoadedModel, dtype: torch.dtype | None, blocks: Iterable[int]) -> Iterator[None]:
    """Inside, :func:`replay_block` runs ``blocks`` under autocast to ``dtype`` (``None``: as they are).

    Copies of those blocks' matrices in ``dtype`` are made on entering and used by every replay
    inside: autocast keeps its casts only of weights that require gradients, so without them each
    replayed block would cast its weights again at every call. Only replayed blocks change: a
    readout or a recording inside still runs in the model's own type. The copies are taken from
    the weights as they are on entering; do not edit the model inside.
    """
    if dtype is None:
        yield
        return
    copies = {
        layer: {
            name: p.detach().to(dtype)
            for name, p in lm.model.get_submodule(lm.adapter.block(layer)).named_parameters()
            if p.ndim == 2
        }
        for layer in blocks
    }
    token = _LOW.set((lm.model, dtype, copies))
    try:
        yield
    finally:
        _LOW.reset(token)


def _call_block(lm: LoadedModel, layer: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Block ``layer`` called on ``args`` and ``kwargs``, in low precision inside :func:`autocast`."""
    block = lm.model.get_submodule(lm.adapter.block(layer))
    low = _LOW.get()
    if low is None or low[0] is not lm.model or layer not in low[2]:
        return block(*args, **kwargs)
    with torch.autocast(device_type=lm.device.type, dtype=low[1]):
        return torch.func.functional_call(block, low[2][layer], args, kwargs, strict=False)
