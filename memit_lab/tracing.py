"""Causal tracing: which hidden states, MLPs and attention layers carry a fact (ROME section 2, MEMIT figure 2).

Three runs of one prompt (ROME, Meng et al. 2022, section 2.1):

* clean: the prompt as it is; the model gives the target ``o`` probability ``P[o]``;
* corrupted: Gaussian noise (3 x a standard deviation of the embeddings: of all embedding
  weights by default, :func:`embedding_noise`; ROME's code takes it over the embeddings of
  known subjects, :func:`subject_embedding_noise`) is added to the subject tokens'
  embeddings; ``P*[o]`` falls;
* corrupted-with-restoration: as corrupted, but one state is set back to its clean
  value -- the hidden state h_i^l (eq. 2), the MLP output m_i^l (eq. 4) or the
  attention output a_i^l (eq. 3), the last two summed over a window of layers centred
  on l. The *indirect effect* of the state is ``P*_{clean state}[o] - P*[o]``.

:func:`trace` fills the grid of every (layer, token) restoration; MEMIT's finding is
that MLP outputs at the *last subject token* in early-middle layers carry the fact,
which is where :func:`memit_lab.layer_choice.recommend_layers` tells MEMIT to write.

How the grid is computed (``batched=True``): restoring a state at token ``t`` in
layer ``l`` changes nothing below layer ``l`` and nothing before token ``t``
(attention is causal). So the corrupted run is computed once, keeping every block's
input and its attention keys and values; each restoration then starts at the first
block it changes, from the cached corrupted state, for tokens ``t..`` only (the keys
and values of tokens ``< t`` come from the corrupted run), with all the layers and
noise samples of one token in one batch that grows as the restorations join it. The
blocks are replayed (:mod:`memit_lab.replay`) with the arguments the model itself passes
them, so no architecture is named here. ``batched=False`` runs the plain loop, one
forward pass per cell, as the reference.

The pictures are in :mod:`memit_lab.tracing_plots`; the choice of MEMIT's edit layers
from these traces in :mod:`memit_lab.layer_choice`.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gpt2")
    >>> result = trace(lm, "The Eiffel Tower is located in", "Eiffel Tower", samples=2)
    >>> result.scores.shape, result.subject_span
    (torch.Size([3, 6]), (1, 3))
    >>> slow = trace(lm, "The Eiffel Tower is located in", "Eiffel Tower", samples=2, batched=False)
    >>> bool((result.scores - slow.scores).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pandas as pd
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .facts import KNOWN_FACTS
from .hooks import Trace, TraceDict
from .models import LoadedModel
from .prompts import check_prompt, subject_token_span
from .replay import KeysValues, Recording, autocast, precision, readout, record, replay_block
from .residual import resolve_target

__all__ = [
    "CATEGORIES",
    "KINDS",
    "AverageEffect",
    "CausalTrace",
    "FactLike",
    "average_indirect_effect",
    "cached_json",
    "category_positions",
    "check_facts",
    "check_trace_settings",
    "embedding_noise",
    "restored_prob",
    "restored_window",
    "subject_embedding_noise",
    "trace",
    "trace_all",
]

#: What a restoration sets back to its clean value: the block output h^{l+1}, or the
#: MLP / attention outputs over a window of layers.
KINDS = ("hidden", "mlp", "attn")

#: Token groups of ROME's figure 2, in prompt order.
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)

#: A state to restore or freeze: (kind, layer, token position).
State = tuple[str, int, int]


@runtime_checkable
class FactLike(Protocol):
    """Anything with a prompt, a subject and a target, such as :class:`memit_lab.facts.Fact`."""

    @property
    def prompt(self) -> str: ...
    @property
    def subject(self) -> str: ...
    @property
    def target(self) -> str: ...


# -- checks and the noise scale ---------------------------------------------------------------------------------


def embedding_noise(lm: LoadedModel, factor: float = 3.0, *, use_cache: bool = True) -> float:
    """memit_lab's noise scale: ``factor`` x the standard deviation of all the token embedding weights.

    The standard deviation is measured once per model (in float64; over a second for the
    bundled model's 28M embedding weights) and kept in the on-disk cache under the model's
    fingerprint, so every trace of the same weights reuses it and an edited model gets its own.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> w = lm.model.get_input_embeddings().weight
        >>> abs(embedding_noise(lm, use_cache=False) - 3 * float(w.double().std())) < 1e-12
        True
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive number of standard deviations, got {factor!r}")
    if not use_cache:
        return factor * _embedding_std(lm)
    folder = cache_root() / "tracing" / f"embedding-std-{lm.fingerprint()}"
    return factor * cached_json(folder, "std.json", lambda: {"std": _embedding_std(lm)})["std"]


def subject_embedding_noise(
    lm: LoadedModel, subjects: Sequence[str] | None = None, factor: float = 3.0, *, use_cache: bool = True
) -> float:
    """ROME's own noise scale: ``factor`` x the standard deviation of the embedding outputs at subject tokens.

    The definition of ROME's code (``collect_embedding_std``): each subject is tokenized on its
    own, the embedding layer's outputs at all its tokens are pooled over the subjects, and the
    standard deviation is taken over every entry of the pool. Subjects default to those of
    :data:`memit_lab.facts.KNOWN_FACTS`, one per fact (a subject of two facts counts twice, as in
    ROME's list of known facts). No special tokens are added: a BOS row is not a subject token.
    With the default subjects the value is cached on disk under the model's fingerprint.
    :func:`embedding_noise` is the other scale (all embedding weights), :func:`trace`'s default.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> ids = lm.tokenizer(["Paris", "Rome"], add_special_tokens=False).input_ids
        >>> rows = lm.model.get_input_embeddings().weight[sum(ids, [])]
        >>> abs(subject_embedding_noise(lm, ["Paris", "Rome"]) - 3 * float(rows.double().std())) < 1e-9
        True
    """
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor must be a positive number of standard deviations, got {factor!r}")
    if subjects is not None:
        return factor * _subject_embedding_std(lm, list(subjects))
    known = [f.subject for f in KNOWN_FACTS]
    if not use_cache:
        return factor * _subject_embedding_std(lm, known)
    folder = cache_root() / "tracing" / f"subject-embedding-std-{lm.fingerprint()}"
    return factor * cached_json(folder, "std.json", lambda: {"std": _subject_embedding_std(lm, known)})["std"]


def _subject_embedding_std(lm: LoadedModel, subjects: list[str]) -> float:
    """Standard deviation (float64, n - 1) of every entry of the embedding outputs at the subjects' tokens."""
    if not subjects or not all(isinstance(s, str) and s.strip() for s in subjects):
        raise ValueError("subjects must be a non-empty list of non-empty strings (the subjects of known facts)")
    ids = lm.tokenizer(subjects, add_special_tokens=False).input_ids
    tokens = torch.tensor([t for row in ids for t in row], device=lm.device)
    with torch.no_grad():
        pooled = lm.model.get_input_embeddings()(tokens).double()
    return float(pooled.std())


def _embedding_std(lm: LoadedModel) -> float:
    """Standard deviation of every embedding weight, two-pass in float64, a block of rows at a time."""
    weights = lm.model.get_input_embeddings().weight.detach()
    mean = float(weights.sum(dtype=torch.float64)) / weights.numel()
    squares = sum(float(((rows.double() - mean) ** 2).sum()) for rows in weights.split(4096))
    return math.sqrt(squares / (weights.numel() - 1))


def cached_json(
    folder: Path, name: str, compute: Callable[[], dict[str, Any]], about: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The JSON file ``name`` of cache ``folder`` (the on-disk cache of tracing's results: the noise scale,
    :func:`memit_lab.layer_choice.recommend_layers`); computed and written (atomically, under a lock) when
    missing or damaged. ``about`` goes into the manifest, to say what the entry was computed from."""
    with locked(folder):
        if read_manifest(folder) is not None:
            cached: dict[str, Any] = json.loads((folder / name).read_text())
            return cached
        value = compute()
        with atomic_dir(folder) as tmp:
            (tmp / name).write_text(json.dumps(value))
            write_manifest(tmp, about)
    return value


def _check_kind(kind: str, window: int, n_layers: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "hidden" and not (isinstance(window, int) and 1 <= window <= n_layers):
        raise ValueError(
            f"window={window!r} does not fit a model of {n_layers} layers; pass window between 1 and {n_layers}"
        )


def check_trace_settings(samples: int, noise: float | None, severed: str | None, kind: str) -> None:
    """Refuse settings :func:`trace` cannot use, with what to pass instead."""
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int (noise draws averaged per cell), got {samples!r}")
    if noise is not None and not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise must be a positive standard deviation (or None for 3 x embedding std), got {noise!r}")
    if severed not in (None, "mlp", "attn"):
        raise ValueError(f"severed must be None, 'mlp' or 'attn', got {severed!r}")
    if severed is not None and kind != "hidden":
        raise ValueError("severed tracing restores hidden states; pass kind='hidden' with severed='mlp' or 'attn'")


def check_facts(facts: Sequence[FactLike]) -> tuple[FactLike, ...]:
    """The facts as a tuple; refused when empty or when one lacks a prompt, subject or target."""
    chosen = tuple(facts)
    if not chosen:
        raise ValueError("facts is empty; pass facts the model knows, e.g. memit_lab.facts.KNOWN_FACTS")
    for fact in chosen:
        if not isinstance(fact, FactLike):
            raise ValueError(f"each fact needs .prompt, .subject and .target (e.g. memit_lab.facts.Fact), got {fact!r}")
    return chosen


def _resolve_target(lm: LoadedModel, prompt: str, target: str | int | None, clean_top: int) -> int:
    if target is None:
        return clean_top
    if isinstance(target, bool) or not isinstance(target, str | int):
        raise ValueError(
            f"target must be a string (its first token is traced) or a token id, got {type(target).__name__} {target!r}"
        )
    return resolve_target(lm, prompt, target)[0]


# -- the clean and corrupted runs -------------------------------------------------------------------------------


@dataclass
class _Run:
    """What one forward pass (clean: batch 1; corrupted: one row per noise sample) leaves behind.

    ``resid[b]`` is the input of block b (h^b), ``resid[n_layers]`` the last block's output;
    ``outputs[kind][b]`` the attention / MLP output of block b; ``kv[b]`` block b's keys
    and values ``[batch, heads, pos, head_dim]``; ``probs`` P(target) per row.
    """

    resid: Float[torch.Tensor, "layer_plus_1 batch pos d_model"]
    outputs: dict[str, Float[torch.Tensor, "layer batch pos d_model"]]
    kv: KeysValues
    logits: Float[torch.Tensor, "batch d_vocab"]


@dataclass
class _Setup:
    """A prompt prepared for tracing: ids, subject span, noise, target and both runs."""

    ids: Int[torch.Tensor, "1 pos"]
    span: tuple[int, int]
    noise: Float[torch.Tensor, "sample subj d_model"]
    scale: float
    target_id: int
    seed: int
    clean: _Run
    corrupt: _Run
    suffixes: dict[int, Recording] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.ids.shape[1])


def _module_name(lm: LoadedModel, kind: str, layer: int) -> str:
    if kind == "hidden":
        return lm.adapter.block(layer)
    return lm.adapter.mlp_module(layer) if kind == "mlp" else lm.adapter.attn_module(layer)


def _add_noise(noise: torch.Tensor, span: tuple[int, int]) -> Callable[[torch.Tensor, str], torch.Tensor]:
    def edit(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[:, span[0] : span[1]] += noise.to(out.dtype)
        return out

    return edit


def _seen(x: torch.Tensor | None, name: str) -> torch.Tensor:
    if x is None:
        raise RuntimeError(f"module {name} did not run; is the adapter entry right?")
    return x


@torch.no_grad()
def _record_run(lm: LoadedModel, ids: torch.Tensor, noise: torch.Tensor | None, span: tuple[int, int]) -> _Run:
    a = lm.adapter
    names = {kind: [_module_name(lm, kind, layer) for layer in range(lm.n_layers)] for kind in KINDS}
    with ExitStack() as stack:
        if noise is not None:
            stack.enter_context(Trace(lm.model, a.embed, edit_output=_add_noise(noise, span)))
        td = stack.enter_context(TraceDict(lm.model, [n for kind in KINDS for n in names[kind]], retain_input=True))
        run = record(lm, ids, blocks=(), logits_to_keep=0)
    assert run.logits is not None
    blocks = names["hidden"]
    resid = torch.stack([*(_seen(td[b].input, b) for b in blocks), _seen(td[blocks[-1]].output, blocks[-1])])
    outputs = {kind: torch.stack([_seen(td[m].output, m) for m in names[kind]]) for kind in ("mlp", "attn")}
    return _Run(resid, outputs, run.kv, run.logits[:, -1].float())


def _prepare(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target: str | int | None,
    noise: float | None,
    samples: int,
    seed: int,
) -> _Setup:
    check_prompt(prompt)
    span = subject_token_span(lm.tokenizer, prompt, subject)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids.to(lm.device)
    scale = embedding_noise(lm) if noise is None else float(noise)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn(samples, span[1] - span[0], lm.d_model, generator=generator, dtype=torch.float64)
    noise_t = (scale * draws).to(lm.device, lm.dtype)
    clean = _record_run(lm, ids, None, span)
    target_id = _resolve_target(lm, prompt, target, int(clean.logits[0].argmax()))
    corrupt = _record_run(lm, ids.expand(samples, -1), noise_t, span)
    return _Setup(ids, span, noise_t, scale, target_id, seed, clean, corrupt)


def _prob(logits: Float[torch.Tensor, "batch d_vocab"], target_id: int) -> float:
    """P(target), averaged over the noise samples (ROME averages probabilities, not logits)."""
    return float(logits.float().softmax(-1)[:, target_id].mean())


# -- the reference: one forward pass per restoration ------------------------------------------------------------


def _state_value(setup: _Setup, kind: str, layer: int, pos: int, run: _Run) -> torch.Tensor:
    """The value a state takes in ``run``: ``[1 or sample, d_model]``."""
    if kind == "hidden":
        return run.resid[layer + 1][:, pos]
    return run.outputs[kind][layer][:, pos]


@torch.no_grad()
def _patched_prob(lm: LoadedModel, setup: _Setup, restore: Sequence[State], freeze: Sequence[State] = ()) -> float:
    """One corrupted forward pass with ``restore`` set to clean and ``freeze`` to corrupted values (ROME's patch)."""
    edits: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for states, run in ((restore, setup.clean), (freeze, setup.corrupt)):
        for kind, layer, pos in states:
            value = _state_value(setup, kind, layer, pos, run)
            edits.setdefault(_module_name(lm, kind, layer), []).append((pos, value))

    def edit(out: torch.Tensor, name: str) -> torch.Tensor:
        for pos, value in edits[name]:
            out[:, pos] = value
        return out

    ids = setup.ids.expand(setup.noise.shape[0], -1)
    with (
        Trace(lm.model, lm.adapter.embed, edit_output=_add_noise(setup.noise, setup.span)),
        TraceDict(lm.model, list(edits), edit_output=edit, retain_output=False),
    ):
        logits = lm.model(input_ids=ids).logits[:, -1]
    return _prob(logits, setup.target_id)


def _check_states(lm: LoadedModel, states: Sequence[State], n_pos: int) -> None:
    for state in states:
        kind, layer, pos = state
        if kind not in KINDS or not 0 <= layer < lm.n_layers or not 0 <= pos < n_pos:
            raise ValueError(
                f"state {state!r} is not (kind, layer, pos) with kind in {KINDS}, layer in 0..{lm.n_layers - 1} and "
                f"pos in 0..{n_pos - 1}"
            )


def restored_prob(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    restore: Sequence[State],
    *,
    freeze: Sequence[State] = (),
    target: str | int | None = None,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
) -> float:
    """P(target) in the corrupted run with some states restored to clean values (ROME's ``trace_with_patch``).

    Args:
        restore: ``(kind, layer, pos)`` states set to their clean values: ``"hidden"`` is
            block ``layer``'s output h^{layer+1} (eq. 2), ``"mlp"`` / ``"attn"`` that block's
            MLP output m (eq. 4) / attention output a (eq. 3).
        freeze: states held at their *corrupted* values (what severed tracing does).
        target, noise, samples, seed: as in :func:`trace`.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-neox")
        >>> prompt = "The capital of France is"
        >>> everything = [("hidden", 0, pos) for pos in range(5)]
        >>> clean = trace(lm, prompt, "France", samples=2).clean_prob
        >>> abs(restored_prob(lm, prompt, "France", everything, samples=2) - clean) < 1e-6
        True
    """
    check_trace_settings(samples, noise, None, "hidden")
    setup = _prepare(lm, prompt, subject, target, noise, samples, seed)
    _check_states(lm, [*restore, *freeze], setup.n_pos)
    return _patched_prob(lm, setup, restore, freeze)


def restored_window(layer: int, window: int, n_layers: int) -> range:
    """The layers restored together for the cell centred on ``layer`` (ROME's window: ``w // 2`` below)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def _cell_states(
    lm: LoadedModel, kind: str, layer: int, pos: int, window: int, severed: str | None
) -> tuple[list[State], list[State]]:
    """What the cell (layer, pos) restores and freezes."""
    if kind != "hidden":
        return [(kind, w, pos) for w in restored_window(layer, window, lm.n_layers)], []
    frozen = [] if severed is None else [(severed, later, pos) for later in range(layer + 1, lm.n_layers)]
    return [("hidden", layer, pos)], frozen


def _column_per_cell(
    lm: LoadedModel, setup: _Setup, kind: str, window: int, severed: str | None, pos: int
) -> torch.Tensor:
    """The reference: one forward pass (over the noise samples) per layer of the column."""
    probs = [
        _patched_prob(lm, setup, *_cell_states(lm, kind, layer, pos, window, severed)) for layer in range(lm.n_layers)
    ]
    return torch.tensor(probs, dtype=torch.float64)


# -- the fast grid: each restoration computed only where it changes something -----------------------------------


@torch.no_grad()
def _suffix_recording(lm: LoadedModel, setup: _Setup, start: int) -> Recording:
    """The clean prompt's tokens ``start..`` recorded with the earlier ones as a key/value prefix.

    Its block calls hold what the model passes each block for those tokens (attention
    mask, positions, rotary tables, ...), batch 1: replaying broadcasts them over the rows.
    """
    if start not in setup.suffixes:
        prefix = setup.clean.kv.before(start) if start else None
        setup.suffixes[start] = record(lm, setup.ids[:, start:], prefix=prefix)
    return setup.suffixes[start]


@dataclass
class _Rows:
    """The restorations of one token under way: one group of noise-sample rows per grid layer."""

    layers: list[int] = field(default_factory=list)
    states: list[torch.Tensor] = field(default_factory=list)

    def join(self, layer: int, state: Float[torch.Tensor, "sample pos d_model"]) -> None:
        self.layers.append(layer)
        self.states.append(state)


@torch.no_grad()
def _column_fast(
    lm: LoadedModel, setup: _Setup, kind: str, window: int, severed: str | None, pos: int
) -> Float[torch.Tensor, " layer"]:
    """Every layer's restoration at token ``pos``, computed for tokens ``pos..`` and the blocks it changes."""
    n, samples = lm.n_layers, setup.noise.shape[0]
    clean, corrupt = setup.clean, setup.corrupt
    recording = _suffix_recording(lm, setup, pos)
    # Which grid layers join before block b, and the state they bring.
    joining: dict[int, list[int]] = {}
    for layer in range(n):
        first = layer + 1 if kind == "hidden" else restored_window(layer, window, n)[0]
        joining.setdefault(first, []).append(layer)
    rows = _Rows()
    x = corrupt.resid[0][:, pos:][:0]
    for b in range(n + 1):
        for layer in joining.get(b, []):
            state = corrupt.resid[b][:, pos:].clone()
            if kind == "hidden":
                state[:, 0] = clean.resid[b][0, pos]
            rows.join(layer, state)
            x = torch.cat([x, state])
        if b == n:
            break
        if not rows.layers:
            continue
        edit = _block_edit(lm, setup, kind, window, severed, pos, b, rows.layers)
        keys, values = (t[:, :, :pos].repeat(len(rows.layers), 1, 1, 1) for t in corrupt.kv.layer(b))
        with ExitStack() as stack:
            if edit is not None:
                stack.enter_context(Trace(lm.model, edit[0], edit_output=edit[1], retain_output=False))
            x = replay_block(lm, recording, b, x, (keys, values))
    probs = readout(lm, x[:, -1]).softmax(-1)[:, setup.target_id].double()
    column = torch.empty(n, dtype=torch.float64)
    column[rows.layers] = probs.view(len(rows.layers), samples).mean(1).cpu()
    return column


def _block_edit(
    lm: LoadedModel, setup: _Setup, kind: str, window: int, severed: str | None, pos: int, b: int, layers: list[int]
) -> tuple[str, Callable[[torch.Tensor, str], torch.Tensor]] | None:
    """Inside block ``b``: restore (kind mlp/attn) or freeze (severed) the module output at the first token."""
    samples = setup.noise.shape[0]
    if kind != "hidden":
        groups = [i for i, layer in enumerate(layers) if b in restored_window(layer, window, lm.n_layers)]
        value = setup.clean.outputs[kind][b][0, pos]
        module = kind
    elif severed is not None:
        groups = list(range(len(layers)))
        value = setup.corrupt.outputs[severed][b][:, pos].repeat(len(groups), 1)
        module = severed
    else:
        return None
    rows = (torch.tensor(groups)[:, None] * samples + torch.arange(samples)).flatten()

    def edit(out: torch.Tensor, name: str) -> torch.Tensor:
        out[rows, 0] = value.to(out.dtype)  # a module's output is in autocast's type under dtype="bfloat16"
        return out

    return _module_name(lm, module, b), edit


def _column_batched(
    lm: LoadedModel, setup: _Setup, kind: str, window: int, severed: str | None, pos: int
) -> torch.Tensor:
    # Before the subject the clean and corrupted runs agree: restoring there changes nothing.
    if pos < setup.span[0]:
        return torch.full((lm.n_layers,), _prob(setup.corrupt.logits, setup.target_id), dtype=torch.float64)
    return _column_fast(lm, setup, kind, window, severed, pos)


def _grid(
    lm: LoadedModel,
    setup: _Setup,
    kind: str,
    window: int,
    severed: str | None,
    positions: Sequence[int],
    batched: bool,
    on_progress: Callable[[float], None],
) -> Float[torch.Tensor, "layer pos"]:
    """Scores of every (layer, position) cell asked for, column by column (NaN elsewhere)."""
    column = _column_batched if batched else _column_per_cell
    scores = torch.full((lm.n_layers, setup.n_pos), math.nan, dtype=torch.float64)
    for done, pos in enumerate(positions, 1):
        scores[:, pos] = column(lm, setup, kind, window, severed, pos)
        on_progress(done / len(positions))
    return scores


# -- the result of one trace ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CausalTrace:
    """P(target) after restoring each (layer, token) state in the corrupted run.

    Attributes:
        prompt, subject: what was traced.
        target: the traced token (text); ``target_id`` its id.
        tokens: the prompt's tokens as text.
        subject_span: token positions ``[start, end)`` of the subject (the corrupted ones).
        kind: ``"hidden"``, ``"mlp"`` or ``"attn"``; ``window`` for the last two.
        severed: ``None``, or the module (``"mlp"`` / ``"attn"``) frozen at its corrupted
            value in the layers above a restored hidden state.
        scores: ``[layer, pos]`` P(target) with that state restored (NaN: not traced).
        clean_prob, corrupted_prob: P(target) clean, and corrupted without restoration.
        noise, samples, seed: the noise's standard deviation, number of draws and seed.
    """

    prompt: str
    subject: str
    target: str
    target_id: int
    tokens: tuple[str, ...]
    subject_span: tuple[int, int]
    kind: str
    window: int
    severed: str | None
    scores: Float[torch.Tensor, "layer pos"]
    clean_prob: float
    corrupted_prob: float
    noise: float
    samples: int
    seed: int

    @property
    def indirect_effect(self) -> Float[torch.Tensor, "layer pos"]:
        """``scores - corrupted_prob``: how much of the answer each state brings back (ROME section 2.1)."""
        return self.scores - self.corrupted_prob

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (layer, token), sorted by layer then position."""
        n_layer, n_pos = self.scores.shape
        start, end = self.subject_span
        return pd.DataFrame(
            {
                "layer": [layer for layer in range(n_layer) for _ in range(n_pos)],
                "pos": list(range(n_pos)) * n_layer,
                "token": list(self.tokens) * n_layer,
                "subject": [start <= pos < end for pos in range(n_pos)] * n_layer,
                "score": self.scores.flatten().numpy(),
                "indirect_effect": self.indirect_effect.flatten().numpy(),
            }
        )

    def peaks(self, k: int = 5) -> pd.DataFrame:
        """The ``k`` cells that bring back most of the answer."""
        return self.to_frame().nlargest(k, "score").reset_index(drop=True)


def _result(
    lm: LoadedModel,
    setup: _Setup,
    prompt: str,
    subject: str,
    kind: str,
    window: int,
    severed: str | None,
    positions: Sequence[int] | None,
    batched: bool,
    on_progress: Callable[[float], None],
    dtype: torch.dtype | None = None,
) -> CausalTrace:
    wanted = list(range(setup.n_pos)) if positions is None else list(positions)
    if not all(isinstance(p, int) and 0 <= p < setup.n_pos for p in wanted):
        raise ValueError(f"positions must be token positions 0..{setup.n_pos - 1}, got {positions!r}")
    with autocast(lm, dtype, range(lm.n_layers)):  # replayed blocks only: clean, corrupted runs and readout stay
        scores = _grid(lm, setup, kind, window, severed, wanted, batched, on_progress)
    return CausalTrace(
        prompt=prompt,
        subject=subject,
        target=lm.tokenizer.decode([setup.target_id]),
        target_id=setup.target_id,
        tokens=tuple(lm.tokenizer.decode([i]) for i in setup.ids[0].tolist()),
        subject_span=setup.span,
        kind=kind,
        window=window,
        severed=severed,
        scores=scores,
        clean_prob=_prob(setup.clean.logits, setup.target_id),
        corrupted_prob=_prob(setup.corrupt.logits, setup.target_id),
        noise=setup.scale,
        samples=int(setup.noise.shape[0]),
        seed=setup.seed,
    )


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target: str | int | None = None,
    *,
    kind: str = "hidden",
    window: int = 10,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    severed: str | None = None,
    positions: Sequence[int] | None = None,
    batched: bool = True,
    on_progress: Callable[[float], None] | None = None,
    dtype: str = "float32",
) -> CausalTrace:
    """Causal tracing of one fact: P(target) with each (layer, token) state restored (ROME section 2.1).

    Args:
        lm: the model.
        prompt: the fact's prompt; it must contain ``subject`` verbatim.
        subject: the subject, whose tokens' embeddings are corrupted.
        target: the object; its first token is traced. ``None``: the clean top-1 token.
        kind: ``"hidden"`` restores block l's output h^{l+1} (eq. 2) at one token;
            ``"mlp"`` / ``"attn"`` restore the MLP (eq. 4) / attention (eq. 3) outputs of the
            ``window`` layers centred on l at one token.
        window: how many layers ``"mlp"`` / ``"attn"`` restore together (ROME: 10).
        noise: standard deviation of the Gaussian noise; ``None``: :func:`embedding_noise`.
        samples: noise draws, averaged (in probability) in every cell.
        seed: seeds the noise, so a trace is reproducible.
        severed: with ``kind="hidden"``, freeze ``"mlp"`` or ``"attn"`` outputs at the
            restored token in every later layer at their corrupted values (ROME figure 3).
        positions: trace only these token positions (the others are NaN).
        batched: the fast computation (see the module docstring); ``False`` runs one
            forward pass per cell, the reference it agrees with to ~1e-7.
        on_progress: called with the fraction of the grid done (0-1] after each token
            column, e.g. to move a progress bar.
        dtype: ``"float32"``, or ``"bfloat16"`` / ``"float16"``: the batched grid's replayed blocks under
            autocast (the clean and corrupted runs, the readout and the probabilities stay float32), where the
            hardware has them natively (else a logged warning and float32); ``batched=False`` ignores it. Not
            the reference's arithmetic: scores differ slightly.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-qwen2")
        >>> t = trace(lm, "The capital of France is", "France", kind="mlp", window=2, samples=3)
        >>> t.to_frame().columns.tolist()
        ['layer', 'pos', 'token', 'subject', 'score', 'indirect_effect']
    """
    _check_kind(kind, window, lm.n_layers)
    check_trace_settings(samples, noise, severed, kind)
    low = precision(lm, dtype)
    setup = _prepare(lm, prompt, subject, target, noise, samples, seed)
    report = on_progress or (lambda fraction: None)
    return _result(lm, setup, prompt, subject, kind, window, severed, positions, batched, report, low)


def trace_all(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target: str | int | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    positions: Sequence[int] | None = None,
    batched: bool = True,
    on_progress: Callable[[float], None] | None = None,
    dtype: str = "float32",
) -> dict[str, CausalTrace]:
    """:func:`trace` for several kinds at once, sharing the clean and corrupted runs (same noise in all).
    ``on_progress`` gets the fraction of all the kinds' grids done; ``dtype`` as for :func:`trace`.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gptj")
        >>> traces = trace_all(lm, "The capital of France is", "France", window=2, samples=2)
        >>> {kind: tuple(t.scores.shape) for kind, t in traces.items()}
        {'hidden': (3, 5), 'mlp': (3, 5), 'attn': (3, 5)}
    """
    for kind in kinds:
        _check_kind(kind, window, lm.n_layers)
        check_trace_settings(samples, noise, None, kind)
    low = precision(lm, dtype)
    setup = _prepare(lm, prompt, subject, target, noise, samples, seed)
    report = on_progress or (lambda fraction: None)

    def part(k: int) -> Callable[[float], None]:
        return lambda fraction: report((k + fraction) / len(kinds))

    return {
        kind: _result(lm, setup, prompt, subject, kind, window, None, positions, batched, part(k), low)
        for k, kind in enumerate(kinds)
    }


# -- the average over many facts (ROME figure 2) ----------------------------------------------------------------


def category_positions(span: tuple[int, int], n_pos: int) -> dict[str, list[int]]:
    """The token positions of each of ROME's figure-2 categories (:data:`CATEGORIES`); some may be empty.

    Example:
        >>> category_positions((1, 4), 10)["middle subject tokens"], category_positions((1, 4), 10)["last token"]
        ([2], [9])
    """
    start, end = span
    last = n_pos - 1
    return {
        "first subject token": [start],
        "middle subject tokens": list(range(start + 1, end - 1)),
        "last subject token": [end - 1],
        "first subsequent token": [end] if end < last else [],
        "further tokens": list(range(end + 1, last)),
        "last token": [last],
    }


@dataclass(frozen=True)
class AverageEffect:
    """Average indirect effect per layer, by token category and kind, over many facts (ROME figure 2).

    Attributes:
        kinds: the traced kinds; ``categories``: :data:`CATEGORIES`.
        effect: ``[kind, category, layer]`` mean over facts of (P restored - P corrupted),
            each fact first averaged over its tokens in the category; NaN where no fact has one.
        counts: per category, how many facts have tokens in it.
        clean_prob, corrupted_prob: mean P(target) clean / corrupted.
        traces: per fact, its traces by kind (the raw material).
    """

    kinds: tuple[str, ...]
    categories: tuple[str, ...]
    effect: Float[torch.Tensor, "kind category layer"]
    counts: tuple[int, ...]
    window: int
    samples: int
    noise: float
    clean_prob: float
    corrupted_prob: float
    traces: tuple[dict[str, CausalTrace], ...]

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (kind, category, layer)."""
        rows = [
            (kind, category, layer, float(self.effect[k, c, layer]))
            for k, kind in enumerate(self.kinds)
            for c, category in enumerate(self.categories)
            for layer in range(self.effect.shape[-1])
        ]
        return pd.DataFrame(rows, columns=["kind", "category", "layer", "effect"])

    def curve(self, kind: str, category: str = "last subject token") -> Float[torch.Tensor, " layer"]:
        """The average indirect effect per layer for one kind and category."""
        return self.effect[self.kinds.index(kind), self.categories.index(category)]


def average_indirect_effect(
    lm: LoadedModel,
    facts: Sequence[FactLike],
    *,
    kinds: Sequence[str] = KINDS,
    window: int = 10,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> AverageEffect:
    """Trace every fact (target: the fact's object) and average the indirect effects by token category.

    The noise scale is measured once for the model (unless given); each fact is traced
    with the same seed, only at the positions some category needs.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> lm = load_model("tiny-llama")
        >>> avg = average_indirect_effect(lm, KNOWN_FACTS[:2], window=2, samples=2, progress=False)
        >>> avg.effect.shape, dict(zip(avg.categories, avg.counts))["last subject token"]
        (torch.Size([3, 6, 3]), 2)
    """
    facts = check_facts(facts)
    for kind in kinds:
        _check_kind(kind, window, lm.n_layers)
    check_trace_settings(samples, noise, None, "hidden")
    scale = embedding_noise(lm) if noise is None else noise
    effects = torch.full((len(facts), len(kinds), len(CATEGORIES), lm.n_layers), math.nan, dtype=torch.float64)
    traces, clean, corrupted = [], [], []
    for f, fact in enumerate(tqdm(facts, desc="tracing facts", disable=not progress)):
        span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
        n_pos = len(lm.tokenizer(fact.prompt).input_ids)
        groups = category_positions(span, n_pos)
        needed = sorted({p for positions in groups.values() for p in positions})
        by_kind = trace_all(
            lm, fact.prompt, fact.subject, fact.target, kinds=kinds, window=window, noise=scale,
            samples=samples, seed=seed, positions=needed,
        )  # fmt: skip
        for k, kind in enumerate(kinds):
            ie = by_kind[kind].indirect_effect
            for c, category in enumerate(CATEGORIES):
                if groups[category]:
                    effects[f, k, c] = ie[:, groups[category]].mean(1)
        traces.append(by_kind)
        clean.append(by_kind[kinds[0]].clean_prob)
        corrupted.append(by_kind[kinds[0]].corrupted_prob)
    counts = tuple(int(n) for n in (~effects[:, 0, :, 0].isnan()).sum(0))
    return AverageEffect(
        kinds=tuple(kinds),
        categories=CATEGORIES,
        effect=effects.nanmean(0),
        counts=counts,
        window=window,
        samples=samples,
        noise=scale,
        clean_prob=sum(clean) / len(clean),
        corrupted_prob=sum(corrupted) / len(corrupted),
        traces=tuple(traces),
    )
