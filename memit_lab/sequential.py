"""Editing one batch after another, each on the model the earlier ones left, and measuring how the model collapses.

Users of every editing library write a batch, then another, and another; after some
hundreds or thousands of edits the model degrades. :func:`edit_sequentially` reproduces
that for any registered method (:mod:`memit_lab.methods`): ``n`` records in batches of
``batch_size``, batch after batch on the already edited model, with

* the statistics of the **unedited** model for every batch (E[k k^T] and the context
  templates are computed once, before the first batch, as the paper and AlphaEdit's code
  do: the edited model's own would describe another model);
* optionally the keys each batch wrote added to what later batches preserve
  (``preserve_keys``; only methods whose apply function takes ``preserved_keys``):
  MEMIT's C0 becomes lam E[k k^T] + K_p K_p^T (AlphaEdit's sequential-MEMIT baseline),
  AlphaEdit gets its K_p. K_p K_p^T sums k k^T over the keys of every earlier batch,
  read at each edit layer on the model after that batch (as the reference);
* one backup of every W_out before the first batch: ``result.restore()`` puts the
  model back bit for bit, and so does an error half-way.

After every batch the **collapse diagnostics** are taken (one row of the result):

* S / ES / PS / NS (CounterFact, %) on every edit so far, and on the first batch alone
  (``*_first``: does the model still hold what it was told first?);
* per edited layer, ||W - W0||_F / ||W0||_F (``w_change_<layer>``) and the largest
  singular value of the accumulated update W - W0 (``sigma_max_<layer>``): norm growth;
* the perplexity of held-out generic text (:func:`held_out_texts`: documents of the
  default corpus the statistics never read);
* optionally GE (generation entropy, x 100 as Table 2) on the generation prompts of the
  first records (:func:`memit_lab.evaluate.generation_scores`; it samples, so off by default).

:func:`run_sequential` does this for several methods, each from the unedited model, plus
one ``"unedited"`` reference row, and restores the model at the end.

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.datasets import load_factset
    >>> from memit_lab.hparams import MemitHyperParams
    >>> from memit_lab.zopt import ZParams
    >>> lm = load_model("tiny-gpt2")
    >>> hp = MemitHyperParams((0, 1), z=ZParams(steps=2, n_contexts=1), stats_tokens=256)
    >>> probes = Diagnostics(texts=("Paris is the capital of France.",))
    >>> run = edit_sequentially(lm, load_factset(n=4), "memit", batch_size=2, hparams=hp, diagnostics=probes,
    ...                         progress=False)
    >>> run.to_frame()[["method", "batch", "edits"]].values.tolist()
    [['memit', 1, 2], ['memit', 2, 4]]
    >>> run.restore()
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .corpus import smollm2_samples
from .datasets import CounterFactRecord
from .editing import WeightBackup, edit_keys
from .evaluate import counterfact_scores, counterfact_summary, generation_scores
from .experiments import edit_request
from .methods import Method, get_method
from .models import LoadedModel
from .prompts import padded_batch
from .stats import DEFAULT_N_TOKENS, key_second_moment
from .zopt import context_templates

__all__ = ["Diagnostics", "SequentialResult", "edit_sequentially", "held_out_texts", "perplexity", "run_sequential"]

SCORES = ("S", "ES", "PS", "NS")


# --- held-out text and its perplexity -----------------------------------------------------------------------------


def _documents_read(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str], n_tokens: int) -> int:
    """How many leading documents :func:`memit_lab.corpus.corpus_windows` can read for ``n_tokens`` positions.

    It reads documents until their tokens (each followed by end-of-text) cover what the windows
    need, at most ``n_tokens``; the count is where the running total first reaches ``n_tokens``.
    """
    total = 0
    for i, document in enumerate(documents):
        total += len(tokenizer(document, add_special_tokens=False).input_ids) + 1
        if total >= n_tokens:
            return i + 1
    return len(documents)


def held_out_texts(lm: LoadedModel, n_docs: int = 32, *, stats_tokens: int = DEFAULT_N_TOKENS) -> tuple[str, ...]:
    """The last ``n_docs`` documents of the default corpus, which statistics of ``stats_tokens`` never read.

    E[k k^T] (:func:`memit_lab.stats.key_second_moment`) packs the corpus from its first
    document on and stops after ``stats_tokens`` positions; this checks, with ``lm``'s
    tokenizer, that those documents end before the held-out ones begin (the corpus is
    stored in a shuffled order, so the last documents mix topics and registers).

    Example:
        >>> from memit_lab import load_model
        >>> texts = held_out_texts(load_model("tiny-gpt2"), 4, stats_tokens=512)
        >>> len(texts), all(len(t) > 100 for t in texts)
        (4, True)
    """
    documents = list(smollm2_samples())
    read = _documents_read(lm.tokenizer, documents, stats_tokens)
    if n_docs < 1 or read + n_docs > len(documents):
        raise ValueError(
            f"statistics of {stats_tokens} tokens read {read} of the corpus's {len(documents)} documents; "
            f"{n_docs} held-out documents do not fit after them: ask for between 1 and {len(documents) - read}"
        )
    return tuple(documents[-n_docs:])


@torch.no_grad()
def perplexity(lm: LoadedModel, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 8) -> float:
    """exp of the mean next-token NLL over every predicted token of ``texts`` (each cut to ``max_tokens``).

    Example:
        >>> from memit_lab import load_model
        >>> perplexity(load_model("tiny-gpt2"), ["Paris is the capital of France."]) > 1
        True
    """
    sequences = [list(lm.tokenizer(t).input_ids)[:max_tokens] for t in texts]
    total, count = 0.0, 0
    for lo in range(0, len(sequences), batch_size):
        ids, mask = padded_batch(lm.tokenizer, sequences[lo : lo + batch_size], lm.device)
        logp = lm.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        predicted = mask[:, 1:].bool()
        total += float(nll[predicted].double().sum())
        count += int(predicted.sum())
    if count == 0:
        raise ValueError("the texts have no token to predict; pass texts of two tokens or more")
    return math.exp(total / count)


# --- what is measured after each batch ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Diagnostics:
    """What is measured after each batch besides ES / PS / NS and the weights.

    Attributes:
        texts: held-out generic text for the perplexity (:func:`held_out_texts`).
        generation: GE on the generation prompts of the first this-many records (0: none; it samples).
        max_new_tokens: length of each generated text.
    """

    texts: tuple[str, ...]
    generation: int = 0
    max_new_tokens: int = 100

    def __post_init__(self) -> None:
        if not self.texts or self.generation < 0 or self.max_new_tokens < 1:
            raise ValueError(f"Diagnostics needs held-out texts, generation >= 0 and max_new_tokens >= 1: {self}")

    @classmethod
    def for_model(cls, lm: LoadedModel, stats_tokens: int = DEFAULT_N_TOKENS, **options: Any) -> Diagnostics:
        """32 held-out documents of the default corpus (:func:`held_out_texts`) and ``options``."""
        return cls(texts=held_out_texts(lm, stats_tokens=stats_tokens), **options)


def weight_drift(lm: LoadedModel, original: Mapping[int, torch.Tensor], layers: Sequence[int]) -> dict[str, float]:
    """Per layer, ``w_change_<l>`` = ||W - W0||_F / ||W0||_F and ``sigma_max_<l>`` = largest singular value of W - W0.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> weight_drift(lm, WeightBackup.of(lm, [1]).saved, [1])
        {'w_change_1': 0.0, 'sigma_max_1': 0.0}
    """
    out: dict[str, float] = {}
    for layer in sorted(layers):
        w0 = original[layer].double()
        change = lm.adapter.w_out_parameter(lm.model, layer).detach().double() - w0
        out[f"w_change_{layer}"] = float(torch.linalg.matrix_norm(change) / torch.linalg.matrix_norm(w0))
        out[f"sigma_max_{layer}"] = float(torch.linalg.matrix_norm(change, ord=2))
    return out


def _model_diagnostics(
    lm: LoadedModel, records: Sequence[CounterFactRecord], first: int, probes: Diagnostics
) -> dict[str, float]:
    """Scores on ``records`` (and on the first ``first`` of them), held-out perplexity, GE."""
    frame = counterfact_scores(lm, records, progress=False)
    everything, head = counterfact_summary(frame), counterfact_summary(frame.iloc[:first])
    row = {**{k: float(everything[k]) for k in SCORES}, **{f"{k}_first": float(head[k]) for k in SCORES}}
    row["perplexity"] = perplexity(lm, probes.texts)
    if probes.generation:
        chosen = list(records[: probes.generation])
        generated = generation_scores(lm, chosen, max_new_tokens=probes.max_new_tokens, progress=False)
        row["GE"] = 100 * float(generated.ge.mean())
    return row


# --- the plan: checked before anything changes --------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    method: Method
    hparams: Any
    batches: tuple[tuple[CounterFactRecord, ...], ...]
    preserve: bool

    @property
    def accepts(self) -> set[str]:
        """The options the method's apply function takes (``second_moments``, ``contexts``, ``preserved_keys``)."""
        return set(inspect.signature(self.method.apply).parameters)

    @property
    def layers(self) -> tuple[int, ...]:
        """The edit layers, from the hyper-parameters' ``layers`` (MEMIT, AlphaEdit) or ``layer`` (ROME, FT)."""
        return tuple(getattr(self.hparams, "layers", ())) or (int(self.hparams.layer),)


def _check_size(records: Sequence[Any], n: int | None, batch_size: int) -> int:
    if not all(isinstance(r, CounterFactRecord) for r in records):
        raise TypeError("sequential editing scores CounterFact records (ES/PS/NS); pass CounterFactRecord objects")
    n = len(records) if n is None else n
    if not 1 <= n <= len(records):
        raise ValueError(f"n must be between 1 and {len(records)} (the records given), got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return n


def _plan(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    method: str,
    n: int | None,
    batch_size: int,
    hparams: Any,
    preserve_keys: bool,
) -> _Plan:
    n = _check_size(records, n, batch_size)
    chosen = get_method(method)
    if chosen.name == "ft-w":
        # its edits change every weight of a block, and this backup (and the drift diagnostics) cover W_out only
        raise ValueError("sequential editing backs up and measures W_out only; FT-W changes a whole block: use ft-l")
    hp = chosen.defaults(lm) if hparams is None else hparams
    if not isinstance(hp, chosen.hparams):
        raise TypeError(f"{chosen.name} takes {chosen.hparams.__name__}, got {type(hp).__name__}")
    batches = tuple(tuple(records[lo : min(lo + batch_size, n)]) for lo in range(0, n, batch_size))
    can_preserve = "preserved_keys" in inspect.signature(chosen.apply).parameters
    return _Plan(chosen, hp, batches, preserve_keys and can_preserve)


def _fixed_inputs(lm: LoadedModel, plan: _Plan) -> dict[str, Any]:
    """E[k k^T] and the context templates of the unedited model, for the methods that take them."""
    options: dict[str, Any] = {}
    if "second_moments" in plan.accepts:
        options["second_moments"] = key_second_moment(
            lm, plan.layers, n_tokens=plan.hparams.stats_tokens, progress=False
        )
    if "contexts" in plan.accepts:
        z = plan.hparams.z
        options["contexts"] = context_templates(lm, z.n_contexts, z.context_tokens, seed=z.context_seed)
    return options


def _written_keys(
    lm: LoadedModel, records: Sequence[CounterFactRecord], plan: _Plan, contexts: Sequence[str]
) -> dict[int, torch.Tensor]:
    """K K^T (float64, CPU) of the keys a batch wrote, at each edit layer of the model as it left it."""
    requests = [edit_request(r) for r in records]
    batch = int(getattr(plan.hparams, "key_batch", 64))
    keys = {layer: edit_keys(lm, requests, layer, contexts, batch=batch).double().cpu() for layer in plan.layers}
    return {layer: k @ k.T for layer, k in keys.items()}


# --- the runs -----------------------------------------------------------------------------------------------------


@dataclass
class SequentialResult:
    """Collapse diagnostics after every batch; ``restore()`` undoes every batch (bit for bit).

    Attributes:
        frame: one row per (method, batch); see :meth:`to_frame`.
        backup: every W_out as it was before the first batch (``None`` once handed back by :func:`run_sequential`).
        restored: whether :meth:`restore` ran.
    """

    frame: pd.DataFrame
    backup: WeightBackup | None = field(default=None, repr=False)
    restored: bool = False

    def restore(self) -> None:
        """Put every W_out back as it was before the first batch, bit for bit (idempotent)."""
        if self.backup is not None:
            self.backup.restore()
        self.restored = True

    def to_frame(self) -> pd.DataFrame:
        """One row per (method, batch): ``method batch edits seconds``, S / ES / PS / NS on every edit so far and
        ``*_first`` on the first batch (%), ``perplexity``, ``GE`` (when generated), per edited layer
        ``w_change_<l>`` and ``sigma_max_<l>``, and ``keys_preserved``. A ``method == "unedited"`` row (batch 0)
        is the reference: the first batch scored before editing."""
        return self.frame.copy()

    def plot(self, metrics: Sequence[str] = ("ES", "PS", "NS", "ES_first", "perplexity", "w_change")) -> Figure:
        """Each metric against the number of edits so far, one line per method, the unedited model dashed.

        ``w_change`` and ``sigma_max`` are drawn as their largest value over the edited layers.
        """
        import matplotlib.pyplot as plt

        frame = self.frame.copy()
        for prefix in ("w_change", "sigma_max"):
            columns = [c for c in frame.columns if c.startswith(prefix + "_")]
            if columns:
                frame[prefix] = frame[columns].max(axis=1)
        shown = [m for m in metrics if m in frame.columns]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), squeeze=False)
        for ax, metric in zip(axes[0], shown, strict=True):
            for method, rows in frame.groupby("method", sort=False):
                if method == "unedited":
                    if pd.notna(rows[metric].iloc[0]):
                        ax.axhline(rows[metric].iloc[0], linestyle="--", color="grey", label="unedited")
                else:
                    ax.plot(rows.edits, rows[metric], marker="o", label=method)
            ax.set(xlabel="edits so far", title=metric)
        axes[0][0].legend(fontsize="small")
        fig.tight_layout()
        return fig


def _run_batches(
    lm: LoadedModel, plan: _Plan, original: Mapping[int, torch.Tensor], probes: Diagnostics, progress: bool
) -> list[dict[str, Any]]:
    """Every batch of ``plan`` in turn on ``lm`` (W_out was ``original``; the caller restores), diagnosed after each."""
    fixed = _fixed_inputs(lm, plan)
    gram = {layer: torch.zeros(lm.d_mlp, lm.d_mlp, dtype=torch.float64) for layer in plan.layers}
    touched: set[int] = set()
    rows: list[dict[str, Any]] = []
    done: list[CounterFactRecord] = []
    for i, batch in enumerate(tqdm(plan.batches, desc=f"{plan.method.name}: batches", disable=not progress)):
        options = dict(fixed, preserved_keys=gram) if plan.preserve and i > 0 else fixed
        start = time.perf_counter()
        result = plan.method(lm, [edit_request(r) for r in batch], plan.hparams, progress=False, **options)
        seconds = time.perf_counter() - start
        touched |= set(result.backup.saved)
        if plan.preserve:
            for layer, kk in _written_keys(lm, batch, plan, fixed.get("contexts", ("{}",))).items():
                gram[layer] = gram[layer] + kk
        done += batch
        row = {"method": plan.method.name, "batch": i + 1, "edits": len(done), "seconds": seconds}
        row |= _model_diagnostics(lm, done, len(plan.batches[0]), probes)
        rows.append(row | weight_drift(lm, original, sorted(touched)) | {"keys_preserved": plan.preserve})
    return rows


def edit_sequentially(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    method: str = "memit",
    *,
    batch_size: int,
    n: int | None = None,
    hparams: Any = None,
    preserve_keys: bool = True,
    diagnostics: Diagnostics | None = None,
    progress: bool = True,
) -> SequentialResult:
    """Edit the first ``n`` records in batches of ``batch_size``, each batch on the model the earlier ones left.

    Args:
        lm: the model, left edited (``result.restore()`` undoes every batch bit for bit; so does an error).
        records: CounterFact-format records, edited in this order.
        method: any registered method (:func:`memit_lab.methods.method_names`).
        batch_size: edits per batch (the last one may be smaller).
        n: how many records to edit (all when ``None``).
        hparams: the method's hyper-parameters (``None``: its defaults for ``lm``).
        preserve_keys: add the keys of earlier batches to what later ones preserve, for the methods that
            can (``preserved_keys``: MEMIT and AlphaEdit); the frame's ``keys_preserved`` says where it applied.
        diagnostics: held-out texts and GE settings; ``None``: :meth:`Diagnostics.for_model`.
        progress: a progress bar over the batches.

    Raises:
        ValueError, TypeError: bad sizes, an unknown method or another method's hyper-parameters
            (before anything changes).
    """
    plan = _plan(lm, records, method, n, batch_size, hparams, preserve_keys)
    probes = diagnostics or Diagnostics.for_model(lm, getattr(plan.hparams, "stats_tokens", DEFAULT_N_TOKENS))
    backup = WeightBackup.of(lm, range(lm.n_layers))
    try:
        rows = _run_batches(lm, plan, backup.saved, probes, progress)
    except BaseException:
        backup.restore()
        raise
    return SequentialResult(pd.DataFrame(rows), backup)


def _unedited_row(lm: LoadedModel, first: Sequence[CounterFactRecord], probes: Diagnostics) -> dict[str, Any]:
    """The reference: the first batch scored on the unedited model, its perplexity and GE."""
    row = {"method": "unedited", "batch": 0, "edits": 0, "seconds": 0.0}
    scores = _model_diagnostics(lm, first, len(first), probes)
    return row | scores | {k: float("nan") for k in SCORES} | {"keys_preserved": False}


def run_sequential(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    methods: Sequence[str] = ("memit", "alphaedit"),
    *,
    batch_size: int,
    n: int | None = None,
    hparams: Mapping[str, Any] | None = None,
    preserve_keys: bool = True,
    diagnostics: Diagnostics | None = None,
    progress: bool = True,
) -> SequentialResult:
    """:func:`edit_sequentially` for each method from the unedited model, plus the unedited reference row.

    Every method is checked before the first edit; the model is restored bit for bit after each
    method (and on an error). ``hparams`` maps method names to hyper-parameters (others: defaults).
    """
    if not methods:
        raise ValueError("methods is empty; pass registered method names, e.g. ('memit', 'alphaedit')")
    plans = [_plan(lm, records, m, n, batch_size, (hparams or {}).get(m), preserve_keys) for m in methods]
    tokens = max(getattr(p.hparams, "stats_tokens", DEFAULT_N_TOKENS) for p in plans)
    probes = diagnostics or Diagnostics.for_model(lm, tokens)
    rows = [_unedited_row(lm, plans[0].batches[0], probes)]
    backup = WeightBackup.of(lm, range(lm.n_layers))
    for plan in plans:
        try:
            rows += _run_batches(lm, plan, backup.saved, probes, progress)
        finally:
            backup.restore()
    return SequentialResult(pd.DataFrame(rows), restored=True)
