"""The paper's experiments at any scale: edit n facts with MEMIT, sequential ROME, FT-L or FT-W, score, restore.

* :func:`run_edits` -- edit the first ``n`` records with one method, score every record
  (CounterFact: ES/EM, PS/PM, NS/NM and optionally GE/RS; zsRE: token accuracy), and
  restore the weights bit for bit, also when something fails half-way.
* :func:`scaling_sweep` -- :func:`run_edits` over several ``n`` and methods plus the
  unedited model (the paper's Figure 5 and Table 2), each cell cached on disk as soon as
  it is done, so an interrupted sweep continues where it stopped.
* :func:`question_slice` -- zsRE-style question records made from the fact set (Table 1).
* :func:`edit_demo` -- one batch edited and shown before/after, for the command line tour.

Methods (``method=``): ``"memit"`` (all edits at once over a range of layers, Algorithm
1), ``"rome-seq"`` (ROME, one edit after the other, each on the already edited model),
``"ft-l"`` (FT-L: fine-tuning one layer's W_out on all edits at once under an L-infinity
constraint; ``"ft"``, its old name, is an alias), ``"ft-w"`` (FT-W: fine-tuning every weight of
one block with weight decay), ``"unedited"`` (no edit: the reference line). Hyper-parameters are each
method's own dataclass (see :mod:`memit_lab.memit`, :mod:`memit_lab.rome`,
:mod:`memit_lab.finetune`); ``None`` takes its defaults for the model.

Records stay what the data says; the edit itself is requested as "prompt template,
subject, new object" (:class:`CounterFactRecord`'s ``target_new``; for zsRE the record's
``target``, as the paper's code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .datasets import CounterFactRecord, ZsreRecord
from .editing import EditResult, WeightBackup
from .evaluate import (
    COUNTERFACT_COLUMNS,
    counterfact_scores,
    counterfact_summary,
    generation_scores,
    mean_nll,
    zsre_scores,
)
from .methods import ALIASES, get_method, method_names
from .models import LoadedModel
from .requests import EditRequest
from .rome import apply_rome
from .zopt import ZParams, ZResult, optimise_z

__all__ = [
    "COMMITTED_CELLS",
    "METHODS",
    "PLANS",
    "SCALES",
    "EditDemo",
    "Plan",
    "Sweep",
    "TargetPool",
    "agreement",
    "cached_run",
    "default_hparams",
    "edit_demo",
    "edit_request",
    "hparams_table",
    "plan",
    "preserved_weights",
    "question_slice",
    "run_edits",
    "scale",
    "scaling_sweep",
]

log = logging.getLogger(__name__)

METHODS = ("unedited", *method_names(), *ALIASES)
Record = CounterFactRecord | ZsreRecord


# --- how big: the CI-sized default, a medium run, or the full scale ------------------------------------------------

SCALES = ("small", "medium", "full")


def scale() -> str:
    """``"small"`` (default), ``"medium"`` or ``"full"``, from the variable MEMIT_LAB_SCALE.

    Notebooks 05-07 and ``make reproduce`` read it. ``small`` is sized for CI on two CPU cores
    (minutes); ``medium`` edits up to 100 facts with every method (under an hour on two cores,
    the committed ``results/``); ``full`` up to 900 (hours): ``MEMIT_LAB_SCALE=full jupyter lab``
    or ``MEMIT_LAB_SCALE=full make reproduce``.
    """
    value = os.environ.get("MEMIT_LAB_SCALE", "").strip().lower() or "small"
    if value not in SCALES:
        raise ValueError(f"MEMIT_LAB_SCALE={value!r} is not a scale; set it to one of {SCALES} or leave it unset")
    return value


@dataclass(frozen=True)
class Plan:
    """The sizes of the paper's experiments at one scale (notebooks 05-07 and ``scripts/reproduce.py`` share them).

    Attributes:
        scale: ``"small"``, ``"medium"`` or ``"full"``.
        sweep_ns: Figure 5 / Table 2: numbers of edits (the first n known facts of the fact set).
        methods: the editing methods compared.
        generation: GE (and RS) on the first this-many records of every sweep cell.
        table1_n: Table 1: edits on the question-form (zsRE-style) slice.
        relations: Figures 6a and 7: the relations compared.
        per_relation: edits per relation in Figures 6a and 7.
        tradeoff_n: Figure 6b: edits per run.
        lams: Figure 6b: the values of lambda (eq. 15).
        layer_ranges: Figure 6b: the edit-layer ranges R.
    """

    scale: str
    sweep_ns: tuple[int, ...]
    methods: tuple[str, ...]
    generation: int
    table1_n: int
    relations: tuple[str, ...]
    per_relation: int
    tradeoff_n: int
    lams: tuple[float, ...]
    layer_ranges: tuple[tuple[int, ...], ...]


_RELATIONS_SMALL = ("city_country", "company_country", "country_language", "team_sport")
_RELATIONS_FULL = (
    "city_country", "city_continent", "landmark_city", "landmark_country", "company_country", "country_continent",
    "country_language", "team_sport", "person_occupation", "city_state", "book_author", "musician_instrument",
)  # fmt: skip

PLANS: dict[str, Plan] = {
    "small": Plan(
        scale="small",
        sweep_ns=(1, 4, 12),
        methods=("memit", "rome-seq", "ft-l", "ft-w"),
        generation=4,
        table1_n=6,
        relations=_RELATIONS_SMALL,
        per_relation=4,
        tradeoff_n=8,
        lams=(1.5e3, 1.5e4, 1.5e5),
        layer_ranges=((4,), (0, 1, 2, 3, 4)),
    ),
    "medium": Plan(
        scale="medium",
        sweep_ns=(1, 10, 100),
        methods=("memit", "rome-seq", "ft-l", "ft-w"),
        generation=10,
        table1_n=100,
        relations=_RELATIONS_FULL[:8],
        per_relation=8,
        tradeoff_n=24,
        lams=(1.5e2, 1.5e3, 1.5e4, 1.5e5),
        layer_ranges=((4,), (0, 1, 2, 3, 4), (3, 4, 5, 6, 7)),
    ),
    "full": Plan(
        scale="full",
        sweep_ns=(1, 10, 100, 300, 900),
        methods=("memit", "rome-seq", "ft-l", "ft-w"),
        generation=50,
        table1_n=300,
        relations=_RELATIONS_FULL,
        per_relation=15,
        tradeoff_n=50,
        lams=(1.5e2, 1.5e3, 1.5e4, 1.5e5, 1.5e6),
        layer_ranges=((4,), (2, 3, 4), (0, 1, 2, 3, 4), (3, 4, 5, 6, 7)),
    ),
}


def plan() -> Plan:
    """The :class:`Plan` of the current :func:`scale` (``MEMIT_LAB_SCALE``)."""
    return PLANS[scale()]


# --- keeping the model as it was -------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_weights(lm: LoadedModel) -> Iterator[None]:
    """Every W_out is copied on entry and written back on exit (also after an error): bit-for-bit restoration.

    A backstop behind each method's own ``restore()`` (FT-W changes a whole block); the model's
    fingerprint (a strided sample of *every* weight) is compared on exit, so an edit that touched
    anything else and was not undone is reported instead of silently kept.
    """
    backup = WeightBackup.of(lm, range(lm.n_layers))
    before = lm.fingerprint()
    try:
        yield
    finally:
        backup.restore()
        if lm.fingerprint() != before:
            raise RuntimeError("an edit changed weights other than W_out; reload the model, it is not the original")


# --- editing ---------------------------------------------------------------------------------------------------


def edit_request(record: Record) -> EditRequest:
    """The edit a record asks for: its template, subject and new object (zsRE: the record's ``target``)."""
    if isinstance(record, ZsreRecord):
        return EditRequest(record.prompt, record.subject, record.target)
    return EditRequest(record.prompt, record.subject, record.target_new, record.target_true, record.relation_id)


def _apply(
    lm: LoadedModel,
    records: Sequence[Record],
    method: str,
    hparams: Any,
    progress: bool,
    targets: Callable[[], ZResult] | None = None,
) -> EditResult:
    """Write the records' new objects into ``lm`` with ``method`` (the caller restores the weights)."""
    requests = [edit_request(r) for r in records]
    chosen = get_method(method)
    if targets is None:
        return chosen(lm, requests, hparams, progress=progress)
    if chosen.name != "memit":
        raise ValueError(f"targets (precomputed z) apply to MEMIT only, not to {method!r}")
    return chosen(lm, requests, hparams, targets=targets(), progress=progress)


def default_hparams(lm: LoadedModel, method: str) -> Any:
    """The hyper-parameters ``method`` uses for ``lm`` when given ``None`` (``None`` for ``"unedited"``)."""
    if method == "unedited":
        return None
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return get_method(method).defaults(lm)


def _flat_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A hyper-parameter dataclass as ``{field: value}``, nested ones (``z``) as ``z.steps`` etc."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_flat_fields(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = "-".join(map(str, value)) if isinstance(value, tuple) else value
    return out


def hparams_table(lm: LoadedModel, methods: Sequence[str]) -> pd.DataFrame:
    """The default hyper-parameters of ``methods`` for ``lm``, one column per method, one row per knob.

    A knob a method does not have is empty; tuples of layers print as ``0-1-2``. Read it instead of the
    dataclasses' one-line reprs.

    Example:
        >>> from memit_lab import load_model
        >>> table = hparams_table(load_model("tiny-gpt2"), ["memit"])
        >>> table.loc["lam", "memit"], "z.steps" in table.index
        (15000.0, True)
    """
    columns = {m: _flat_fields(default_hparams(lm, m)) for m in methods}
    knobs = list(dict.fromkeys(k for fields in columns.values() for k in fields))
    # built cell by cell: a frame from dicts would turn a column with gaps into floats (steps 25 -> 25.0)
    cells = [[columns[m].get(k, "") for m in methods] for k in knobs]
    return pd.DataFrame(cells, index=knobs, columns=list(methods), dtype=object)


# --- scoring ---------------------------------------------------------------------------------------------------


def _score(
    lm: LoadedModel, records: Sequence[Record], generation: int, max_new_tokens: int, progress: bool
) -> pd.DataFrame:
    if all(isinstance(r, ZsreRecord) for r in records):
        return zsre_scores(lm, [r for r in records if isinstance(r, ZsreRecord)], progress=progress)
    if not all(isinstance(r, CounterFactRecord) for r in records):
        raise TypeError("pass records of one kind: all CounterFactRecord or all ZsreRecord")
    cf = [r for r in records if isinstance(r, CounterFactRecord)]
    frame = counterfact_scores(lm, cf, progress=progress)
    if generation:
        gen = generation_scores(lm, cf[:generation], max_new_tokens=max_new_tokens, progress=progress)
        frame = frame.merge(gen, on="case_id", how="left")
    return frame


def run_edits(
    lm: LoadedModel,
    records: Sequence[Record],
    method: str = "memit",
    n: int | None = None,
    *,
    hparams: Any = None,
    generation: int = 0,
    max_new_tokens: int = 100,
    targets: Callable[[], ZResult] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Edit the first ``n`` records with ``method``, score them, restore the model; one row per record.

    Args:
        lm: the model; its weights are the same bit for bit when this returns (or raises).
        records: CounterFact-format or zsRE records; the first ``n`` (all when ``None``) are edited together.
        method: ``"memit"``, ``"rome-seq"``, ``"ft-l"``, ``"ft-w"`` (any registered name or alias) or ``"unedited"``.
        hparams: the method's hyper-parameter dataclass, ``None`` for its defaults.
        generation: GE and RS are computed on the first ``generation`` records (0: skipped; it samples text).
        max_new_tokens: length of each generated text (the paper: 100).
        targets: MEMIT only: gives the z of the edited records (e.g. :meth:`TargetPool.lazy`), called
            only when the edit runs.

    Returns:
        Per record: ``es em ps pm ns nm`` (CounterFact; ``ge rs`` when generated) or ``efficacy paraphrase
        specificity`` (zsRE), with ``method`` and ``n`` columns; ``frame.attrs["edit_seconds"]`` is the
        wall time of the edit alone, ``frame.attrs["edit_phases"]`` the method's own breakdown of it.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if n is not None and not 1 <= n <= len(records):
        raise ValueError(f"n must be between 1 and {len(records)} (the records given), got {n}")
    chosen = list(records[:n])
    with preserved_weights(lm):
        start = time.perf_counter()
        result = None if method == "unedited" else _apply(lm, chosen, method, hparams, progress, targets)
        edit_seconds = time.perf_counter() - start
        try:
            frame = _score(lm, chosen, generation, max_new_tokens, progress)
        finally:
            if result is not None:  # the method's own undo: FT-W changes a whole block, not only W_out
                result.restore()
    phases = {} if result is None else result.seconds
    frame.insert(0, "method", method)
    frame.insert(1, "n", len(chosen))
    frame.attrs["edit_seconds"] = edit_seconds
    frame.attrs["edit_phases"] = dict(phases)
    return frame


class TargetPool:
    """MEMIT's targets z (eq. 16) for a list of records, optimised once per top layer L and shared by runs.

    z of a request depends on the request, the unedited model, L and the z settings only: not
    on lambda, on the layers below L, nor on the other requests of its batch (each has its own
    delta and loss). Runs on sub-lists of the records (a sweep's prefixes, one relation of a
    mixed batch) or with other lambda / lower layers can therefore share one optimisation.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.datasets import load_factset
        >>> from memit_lab.zopt import ZParams
        >>> lm, recs = load_model("tiny-gpt2"), load_factset(n=3)
        >>> pool = TargetPool(lm, recs, ZParams(steps=2, n_contexts=1))
        >>> pool.lazy(recs[1:], layer=1)().z.shape == (2, lm.d_model)
        True
    """

    def __init__(self, lm: LoadedModel, records: Sequence[Record], params: ZParams) -> None:
        self.lm, self.params = lm, params
        self.requests = [edit_request(r) for r in records]
        self._row = {repr(r): i for i, r in enumerate(records)}
        self._by_layer: dict[int, ZResult] = {}

    def targets(self, layer: int) -> ZResult:
        """z of every record of the pool at ``layer`` (optimised on first use; the model must be unedited)."""
        if layer not in self._by_layer:
            self._by_layer[layer] = optimise_z(self.lm, self.requests, layer, self.params)
        return self._by_layer[layer]

    def lazy(self, records: Sequence[Record], layer: int) -> Callable[[], ZResult]:
        """A function giving z of ``records`` (all in the pool) at ``layer``, optimising only when called."""
        missing = [r for r in records if repr(r) not in self._row]
        if missing:
            raise ValueError(f"{len(missing)} records are not in the pool, e.g. {missing[0]!r}")
        rows = [self._row[repr(r)] for r in records]
        return lambda: self.targets(layer).select(rows)


# --- the sweep, cached cell by cell ------------------------------------------------------------------------------


def _records_digest(records: Sequence[Record]) -> str:
    blob = json.dumps([repr(r) for r in records]).encode()
    return hashlib.blake2b(blob, digest_size=12).hexdigest()


def _cell_key(lm: LoadedModel, records: Sequence[Record], method: str, hparams: Any, options: dict[str, Any]) -> str:
    blob = json.dumps(
        {
            "model": lm.fingerprint(),
            "records": _records_digest(records),
            "method": method,
            "hparams": repr(hparams),
            "options": options,
            "format": 1,
        },
        sort_keys=True,
    ).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


#: The cells of notebooks 04-06 at the ``small`` plan, committed (``scripts/commit_cells.py`` computes them from an
#: empty cache): a fresh clone reads them instead of spending about 13 minutes of edits. Each notebook that reads them
#: re-runs one of them live and shows the two agree. ``MEMIT_LAB_COMMITTED_CELLS=0`` ignores them.
COMMITTED_CELLS = Path(__file__).parent / "data" / "cells"


def _committed_cell(key: str) -> Path | None:
    """The committed copy of the cell ``key``, or ``None`` (none committed, or switched off)."""
    if os.environ.get("MEMIT_LAB_COMMITTED_CELLS", "1").strip() == "0":
        return None
    folder = COMMITTED_CELLS / key
    return folder if read_manifest(folder) is not None else None


def _load_cell(folder: Path) -> pd.DataFrame | None:
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    frame = pd.read_csv(folder / "frame.csv", float_precision="round_trip", keep_default_na=False, na_values=[""])
    frame.attrs["edit_seconds"] = float(manifest["edit_seconds"])
    return frame


def _save_cell(folder: Path, frame: pd.DataFrame) -> None:
    with atomic_dir(folder) as tmp:
        frame.to_csv(tmp / "frame.csv", index=False)
        write_manifest(tmp, {"edit_seconds": frame.attrs["edit_seconds"]})


def cached_run(
    lm: LoadedModel,
    records: Sequence[Record],
    method: str,
    *,
    hparams: Any = None,
    generation: int = 0,
    max_new_tokens: int = 100,
    targets: Callable[[], ZResult] | None = None,
    cache: bool = True,
) -> pd.DataFrame:
    """:func:`run_edits` on all ``records``, read from the on-disk cache when this exact run was done before.

    The key holds the model's fingerprint, the records, the method, its hyper-parameters
    and the scoring options; the entry (a CSV and a manifest) is written atomically under
    ``cache_root()/experiments`` as soon as the run ends, so long studies resume; a cell of
    :data:`COMMITTED_CELLS` is read as if it were in the cache. ``targets``
    (MEMIT's shared z, see :class:`TargetPool`) is not part of the key: it is the z the run would
    compute itself.
    """
    chosen = list(records)
    options = {"generation": generation, "max_new_tokens": max_new_tokens}
    hparams = default_hparams(lm, method) if hparams is None else hparams
    key = _cell_key(lm, chosen, method, hparams, options)
    folder = cache_root() / "experiments" / key
    with locked(folder) if cache else contextlib.nullcontext():
        frame = _load_cell(folder) if cache else None
        committed = _committed_cell(key) if cache and frame is None else None
        if committed is not None:
            frame = _load_cell(committed)
        if frame is None:
            frame = run_edits(lm, chosen, method, hparams=hparams, targets=targets, progress=False, **options)
            if cache:
                _save_cell(folder, frame)
        else:
            log.info("%s n=%d read from %s", method, len(chosen), folder)
    return frame


def agreement(live: pd.DataFrame, stored: pd.DataFrame) -> pd.DataFrame:
    """A run computed now beside the stored run of the same cell (cached or committed): per score, both means and
    the largest per-record difference. Notebooks show it for one cell of what they read from disk.

    Example:
        >>> live = pd.DataFrame({"case_id": [1, 2], "es": [1.0, 0.0], "em": [0.5, -0.25]})
        >>> agreement(live, live.iloc[::-1]).to_dict("index")["em"]
        {'live': 0.125, 'stored': 0.125, 'largest |difference|': 0.0}
    """
    if sorted(live.case_id) != sorted(stored.case_id):
        raise ValueError("live and stored must score the same records (case_id); pass the same cell's two runs")
    scores = [c for c in ("es", "ps", "ns", "em", "pm", "nm", "ge", "rs") if c in live.columns and c in stored.columns]
    a = live.set_index("case_id")[scores].astype(float)
    b = stored.set_index("case_id")[scores].astype(float).loc[a.index]
    return pd.DataFrame({"live": a.mean(), "stored": b.mean(), "largest |difference|": (a - b).abs().max()})


@dataclass(frozen=True)
class Sweep:
    """Per-record scores of every (method, n) cell of a scaling sweep, and the edit times.

    Attributes:
        frame: one row per (method, n, record); ``method == "unedited"`` rows are the reference.
        seconds: wall time of each edit, one row per (method, n).
    """

    frame: pd.DataFrame
    seconds: pd.DataFrame = field(default_factory=pd.DataFrame)

    def summary(self) -> pd.DataFrame:
        """Table-2 numbers (x 100) for every (method, n): S, ES, PS, NS, EM, PM, NM (GE, RS if generated)."""
        rows = []
        for (method, n), cell in self.frame.groupby(["method", "n"], sort=False):
            scores = cell.dropna(axis=1, how="all")
            rows.append({"method": method, "n": n, **counterfact_summary(scores).to_dict()})
        return pd.DataFrame(rows).sort_values(["method", "n"], kind="stable").reset_index(drop=True)

    def table(self, n: int | None = None, digits: int = 1) -> pd.DataFrame:
        """Table 2 at one ``n`` (default: the largest), one row per method, unedited first."""
        summary = self.summary()
        n = int(summary.n.max()) if n is None else n
        at_n = summary[summary.n == n].set_index("method").drop(columns="n")
        order = [m for m in METHODS if m in at_n.index]
        return at_n.loc[order, [c for c in COUNTERFACT_COLUMNS if c in at_n.columns]].round(digits)

    def plot(self, metrics: Sequence[str] = ("ES", "PS", "NS", "S", "GE")) -> Figure:
        """Figure 5: each metric against the number of edits, one line per method, unedited dashed."""
        summary = self.summary()
        metrics = [m for m in metrics if m in summary.columns]
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.0), squeeze=False)
        methods = [m for m in summary.method.unique() if m != "unedited"]
        for ax, metric in zip(axes[0], metrics, strict=True):
            for method, rows in summary.groupby("method", sort=False):
                ax.plot(rows.n, rows[metric], label=method, **_line_style(method, methods))
            ax.set_xscale("log")
            ax.set_xlabel("number of edits")
            ax.set_title(metric)
        axes[0][-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        return fig


def _line_style(method: str, methods: Sequence[str]) -> dict[str, Any]:
    """Figure 5's line for ``method``: unedited dashed grey; the others differ in marker, dash and size, larger
    first, so that methods with equal scores stay visible on top of each other."""
    if method == "unedited":
        return {"linestyle": "--", "color": "grey"}
    i = list(methods).index(method)
    return {
        "marker": "osD^v"[i % 5], "linestyle": ("-", "--", "-.", ":")[i % 4], "markersize": max(9 - 2 * i, 3),
        "markerfacecolor": "none" if i % 2 else None, "alpha": 0.9,
    }  # fmt: skip


def _sequential_prefixes(
    lm: LoadedModel, records: Sequence[Record], ns: Sequence[int], hparams: Any, options: dict[str, Any]
) -> None:
    """Fill the cached cells of ROME-sequential at every n of ``ns`` from one run of max(ns) edits.

    Exact, not an approximation: after its first n edits, a sequential run holds the model a run of n edits
    leaves (each edit sees only the model the earlier ones left; contexts and statistics come from the
    unedited model), so each prefix is scored when the run reaches it (:func:`memit_lab.rome.apply_rome`'s
    ``on_edit``). A cell's edit time is the run's time up to that edit, scoring excluded.
    """
    hparams = default_hparams(lm, "rome-seq") if hparams is None else hparams
    keys = {n: _cell_key(lm, records[:n], "rome-seq", hparams, options) for n in ns}
    folders = {n: cache_root() / "experiments" / key for n, key in keys.items()}
    todo = {n for n in ns if read_manifest(folders[n]) is None and _committed_cell(keys[n]) is None}
    if not todo:
        return
    clock = {"edit": 0.0, "since": time.perf_counter()}

    def score_prefix(done: int) -> None:
        clock["edit"] += time.perf_counter() - clock["since"]
        if done in todo:
            frame = _score(lm, records[:done], options["generation"], options["max_new_tokens"], False)
            frame.insert(0, "method", "rome-seq")
            frame.insert(1, "n", done)
            frame.attrs["edit_seconds"] = clock["edit"]
            _save_cell(folders[done], frame)
        clock["since"] = time.perf_counter()

    requests = [edit_request(r) for r in records[: max(todo)]]
    with preserved_weights(lm):
        apply_rome(lm, requests, hparams, on_edit=score_prefix)


def scaling_sweep(
    lm: LoadedModel,
    records: Sequence[Record],
    ns: Sequence[int],
    methods: Sequence[str] = ("memit", "rome-seq", "ft-l"),
    *,
    hparams: dict[str, Any] | None = None,
    generation: int = 0,
    max_new_tokens: int = 100,
    cache: bool = True,
    progress: bool = True,
) -> Sweep:
    """:func:`run_edits` for every method and n (first n records), plus the unedited model on the largest n.

    Each finished cell is written to ``cache_root()/experiments`` (CSV, atomically), keyed
    by the model's fingerprint, the records, the method, its hyper-parameters and the
    scoring options: calling again with the same arguments reads what is done and computes
    the rest. ``hparams`` maps a method name to its hyper-parameter dataclass.

    MEMIT's z (eq. 16) is optimised once, in its largest-n cell, and shared by the smaller n
    (:class:`TargetPool`): their edit times count keys and solves only. ROME-sequential runs once, to the
    largest n, and is scored at each smaller n on the way (exactly the smaller runs' scores; with ``cache``).
    """
    ns = sorted(set(ns))
    unknown = set(methods) - set(METHODS)
    if unknown or not ns:
        raise ValueError(f"methods must be among {METHODS} and ns non-empty; got {sorted(unknown)}, {ns}")
    # MEMIT from the largest n down: that cell optimises z for all (and its time is a real run's),
    # the smaller ones take their prefix of it.
    order = {m: ns[::-1] if m == "memit" else ns for m in methods}
    cells = [("unedited", ns[-1])] + [(m, n) for m in methods if m != "unedited" for n in order[m]]
    top, pool = 0, None
    if "memit" in methods:  # (the defaults of a model without measured ones cost a causal trace)
        memit_hp = (hparams or {}).get("memit") or default_hparams(lm, "memit")
        top, pool = memit_hp.layers[-1], TargetPool(lm, records[: ns[-1]], memit_hp.z)
    if cache and "rome-seq" in methods:
        options = {"generation": generation, "max_new_tokens": max_new_tokens}
        _sequential_prefixes(lm, list(records), ns, (hparams or {}).get("rome-seq"), options)
    frames, seconds = [], []
    for method, n in tqdm(cells, desc="sweep", disable=not progress):
        settings = (hparams or {}).get(method)
        shared = pool.lazy(records[:n], top) if pool is not None and method == "memit" else None
        frame = cached_run(
            lm, records[:n], method, hparams=settings, generation=generation, max_new_tokens=max_new_tokens,
            targets=shared, cache=cache,
        )  # fmt: skip
        frames.append(frame)
        seconds.append({"method": method, "n": n, "edit_seconds": frame.attrs["edit_seconds"]})
    unedited = frames[0]
    # The unedited model's score of a record does not depend on n: every smaller n is a prefix.
    frames[0:1] = [unedited.iloc[:n].assign(n=n) for n in ns]
    return Sweep(pd.concat(frames, ignore_index=True), pd.DataFrame(seconds))


# --- a zsRE-style slice of the fact set ----------------------------------------------------------------------------

#: Question and rephrase per relation (``{}`` = subject), for :func:`question_slice`.
QUESTIONS: dict[str, tuple[str, str]] = {
    "city_country": ("In which country is the city of {}?", "{} is a city in which country?"),
    "country_continent": ("On which continent is {}?", "{} is a country on which continent?"),
    "company_country": ("Which country is the company {} from?", "{} is a company from which country?"),
    "country_language": ("What is the official language of {}?", "Which language is official in {}?"),
    "person_occupation": ("What was the profession of {}?", "What did {} work as?"),
    "team_sport": ("Which sport do the {} play?", "The {} are a team that plays which sport?"),
    "book_author": ("Who wrote {}?", "{} was written by whom?"),
    "musician_instrument": ("Which instrument did {} play?", "{} was famous for playing which instrument?"),
}


def question_slice(records: Sequence[CounterFactRecord], n: int | None = None) -> list[ZsreRecord]:
    """zsRE-style records from fact-set records whose relation has a question form (see :data:`QUESTIONS`).

    As in zsRE: the question (``src``) and its rephrase; the edit target ``answers[0]`` is
    the *true* object (the paper's code writes the gold answer), ``alt`` the fact set's
    counterfactual. The unrelated question (``loc``, written the way zsRE writes Natural Questions,
    ``"nq question: ..."``) comes from the usable records *after* the first ``n``: a record of another
    relation whose subject is not among the edited ones, so no edit of the batch writes its answer (zsRE's
    own unrelated questions are never edited either), taken in turn.

    Raises:
        ValueError: fewer than two question relations, or no record left over for the unrelated questions
            (pass more records or a smaller ``n``).

    Example:
        >>> from memit_lab.datasets import load_factset
        >>> qs = question_slice(load_factset(relations=["city_country", "team_sport"]), n=3)
        >>> q = qs[0]
        >>> q.src.endswith("?") and q.subject in q.src, q.target == q.answers[0], q.loc[:12]
        (True, True, 'nq question:')
        >>> any(e.subject.lower() in q.loc for q in qs for e in qs)
        False
    """
    usable = [r for r in records if r.relation_id in QUESTIONS]
    if len({r.relation_id for r in usable}) < 2:
        raise ValueError(f"question_slice needs records of at least two of these relations: {sorted(QUESTIONS)}")
    chosen = usable if n is None else usable[:n]
    edited = {r.subject for r in chosen}
    spare = [r for r in usable[len(chosen) :] if r.subject not in edited]
    if not spare:
        raise ValueError(
            f"question_slice: all {len(usable)} question-form records are edited, none is left for the unrelated "
            "questions; pass more records or a smaller n"
        )
    out = []
    for i, r in enumerate(chosen):
        others = [o for o in spare if o.relation_id != r.relation_id] or spare
        other = others[i % len(others)]
        src, rephrase = (q.format(r.subject) for q in QUESTIONS[r.relation_id])
        loc = QUESTIONS[other.relation_id][0].format(other.subject).rstrip("?").lower()
        out.append(
            ZsreRecord(
                case_id=r.case_id,
                subject=r.subject,
                src=src,
                target=r.target_true,
                rephrase=rephrase,
                loc="nq question: " + loc,
                loc_ans=other.target_true,
                answers=(r.target_true,),
                alt=r.target_new,
            )
        )
    return out


# --- the command-line tour -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditDemo:
    """One batch edited: predictions before and after, and Table-2 rows for the unedited and the edited model."""

    method: str
    predictions: pd.DataFrame
    table: pd.DataFrame
    edit_seconds: float

    def report(self) -> str:
        """Plain text for a terminal."""
        out = StringIO()
        out.write(f"{self.method}: {len(self.predictions)} facts edited in {self.edit_seconds:.1f} s\n\n")
        out.write(self.predictions.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
        out.write("\n\nScores (%, the paper's Table 2 columns):\n")
        out.write(self.table.to_string(float_format=lambda x: f"{x:.1f}"))
        return out.getvalue() + "\n"


def edit_demo(
    lm: LoadedModel, records: Sequence[CounterFactRecord], method: str = "memit", *, hparams: Any = None
) -> EditDemo:
    """Edit ``records`` together and show, per fact, P(true) and P(new) on its prompt before and after.

    ``print(edit_demo(lm, load_factset(known=True, n=5)).report())`` is the tour's last step.
    """
    prompts = [r.edit_prompt for r in records]

    def probs() -> tuple[list[float], list[float]]:
        p = np.exp(-mean_nll(lm, prompts * 2, [r.target_true for r in records] + [r.target_new for r in records]))
        return p[: len(records)].tolist(), p[len(records) :].tolist()

    true_before, new_before = probs()
    before = run_edits(lm, records, "unedited", progress=False)
    with preserved_weights(lm):
        start = time.perf_counter()
        _apply(lm, records, method, hparams, progress=False)
        seconds = time.perf_counter() - start
        true_after, new_after = probs()
        after = _score(lm, records, 0, 0, progress=False)
    predictions = pd.DataFrame(
        {
            "prompt": prompts,
            "true": [r.target_true for r in records],
            "new": [r.target_new for r in records],
            "P(true) before": true_before,
            "P(new) before": new_before,
            "P(true) after": true_after,
            "P(new) after": new_after,
        }
    )
    table = pd.DataFrame({"unedited": counterfact_summary(before), method: counterfact_summary(after)}).T
    return EditDemo(method, predictions, table, seconds)
