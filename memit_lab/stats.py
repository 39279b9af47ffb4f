"""Second moment of the keys, E[k k^T], over generic text: the C0 of eq. 15, cached on disk.

The key k at layer l is the input of W_out^l (``[d_mlp]``, the MLP's hidden activation).
MEMIT's update (eq. 14) needs C0 = K0 K0^T for the keys pretraining stored; it is
estimated as lambda * E[k k^T] over keys from ordinary text (uncentred, as in the paper's
code). :func:`key_second_moment` returns E[k k^T]; multiply by lambda yourself.

How it is computed:

* one streamed pass over the corpus (:mod:`memit_lab.corpus`) for all requested layers at
  once, running the model only until the key of the highest one is read (the rest is
  never needed);
* each batch's K^T K is formed in float32 (float64 matrix products would cost more than
  the forward pass on a CPU), only its upper-triangular blocks, and summed in float64
  (:class:`SecondMomentSum`);
* the result for each layer is cached (safetensors, no pickle) under
  :func:`memit_lab.cache.cache_root` ``/stats``, keyed by the model's fingerprint, the
  layer, the digest of the exact token windows used (so the corpus, ``n_tokens`` and
  ``seq_len`` are all in it) and the model's dtype. Entries are written atomically and
  checked (sizes, digests, key) on every read; a damaged or mismatched entry is recomputed,
  never used. A later call for more layers computes only the missing ones. An edited model
  has another fingerprint, so its statistics are computed afresh: take C0 from the model
  before editing (as the paper does) and keep it for a sequence of edits.
* long runs checkpoint their running sums every ``checkpoint_seconds``; calling again after
  an interruption continues from the last checkpoint.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-llama")
    >>> c = key_second_moment(lm, [0, 2], corpus=["Paris is the capital of France."] * 20, n_tokens=64,
    ...                       progress=False, use_cache=False)
    >>> sorted(c), tuple(c[2].shape), c[2].dtype
    ([0, 2], (128, 128), torch.float64)
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .corpus import Corpus, corpus_windows
from .hooks import StopForward, Trace, TraceDict
from .models import LoadedModel

__all__ = [
    "DEFAULT_N_TOKENS",
    "Convergence",
    "SecondMomentSum",
    "StatsKey",
    "corpus_keys",
    "key_second_moment",
    "second_moment_convergence",
]

log = logging.getLogger(__name__)

#: Default sample size: about 20 s for five layers of the bundled model on 2 CPU cores; see
#: ``notebooks/03_key_value_memory.ipynb`` for how the estimate converges.
DEFAULT_N_TOKENS = 20_000
_FILE = "second_moment.safetensors"
_PARTIAL = "sums.safetensors"

#: ``on_batch(tokens_done, running_sums)`` after every batch, for diagnostics (convergence).
BatchCallback = Callable[[int, dict[int, "SecondMomentSum"]], None]


@dataclass(frozen=True)
class StatsKey:
    """What a cached statistic depends on (the layer aside).

    Attributes:
        fingerprint: :meth:`LoadedModel.fingerprint` -- changes when the weights do.
        corpus: digest of the exact token windows (corpus, ``n_tokens`` and ``seq_len``).
        n_tokens: number of keys (positions) averaged.
        seq_len: window length.
        dtype: the model's dtype, e.g. ``"torch.float32"``.
    """

    fingerprint: str
    corpus: str
    n_tokens: int
    seq_len: int
    dtype: str

    def folder(self) -> Path:
        return cache_root() / "stats" / self.fingerprint / f"{self.corpus[:16]}-n{self.n_tokens}-s{self.seq_len}"

    def layer_folder(self, layer: int) -> Path:
        return self.folder() / f"{self.dtype.removeprefix('torch.')}-layer{layer}"

    def partial_folder(self, layers: Sequence[int]) -> Path:
        joined = "-".join(map(str, layers))
        return self.folder() / f"{self.dtype.removeprefix('torch.')}-partial-{joined}"


def _windows_digest(windows: Sequence[torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for window in windows:
        digest.update(len(window).to_bytes(4, "little"))
        digest.update(window.numpy().astype("<i8").tobytes())
    return digest.hexdigest()


def _check_layers(lm: LoadedModel, layers: int | Iterable[int]) -> list[int]:
    requested = [layers] if isinstance(layers, int) else list(layers)
    if not requested:
        raise ValueError("layers is empty; pass the layers whose keys you need, e.g. [3, 4, 5]")
    for layer in requested:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < lm.n_layers:
            raise ValueError(f"layer {layer!r} is not a layer index of this model (0 to {lm.n_layers - 1})")
    return sorted(set(requested))


def _batches(windows: Sequence[torch.Tensor], batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(index of the first window, stacked windows); windows of another length go alone."""
    batches = []
    start = 0
    while start < len(windows):
        end = start + 1
        while end < len(windows) and end - start < batch_size and len(windows[end]) == len(windows[start]):
            end += 1
        batches.append((start, torch.stack(list(windows[start:end]))))
        start = end
    return batches


def _stop_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    raise StopForward


@contextlib.contextmanager
def _reading_keys(lm: LoadedModel, layers: Sequence[int]) -> Iterator[dict[int, Trace]]:
    """Traces that keep the input of W_out at each layer; a pass stops once the highest one is read.

    The stopping hook is registered after the recording one on the same module, so it runs
    second: the key is kept, W_out^top and everything above it are never computed.
    """
    names = [lm.adapter.w_out_module(layer) for layer in sorted(layers)]
    with (
        TraceDict(lm.model, names, retain_input=True, retain_output=False) as td,
        Trace(lm.model, names[-1], retain_output=False, edit_input=_stop_forward),
    ):
        yield {layer: td[name] for layer, name in zip(sorted(layers), names, strict=True)}


def _forward(lm: LoadedModel, ids: torch.Tensor) -> None:
    """Run ``ids`` through the model as far as the hooks let it."""
    with contextlib.suppress(StopForward):
        lm.model(input_ids=ids.to(lm.device), use_cache=False)


def _read_keys(trace: Trace) -> Float[torch.Tensor, "n d_mlp"]:
    keys = trace.input
    assert keys is not None  # retain_input=True and the forward pass reached this module
    return keys.reshape(-1, keys.shape[-1])


class SecondMomentSum:
    """Running sum of k k^T over keys given in batches, exact to float32 products and float64 sums.

    Products are the cost here (d_mlp^2 per key per layer, comparable to the forward pass
    on a CPU), so only the upper-triangular blocks of K^T K are formed (5/8 of the work
    with four blocks), each added by one fused ``addmm_`` into a float32 buffer; the buffer
    is folded into a float64 total every ``fold_every`` keys and when the total is read.

    Example:
        >>> import torch
        >>> s = SecondMomentSum()
        >>> s.add(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        >>> s.total()
        tensor([[1., 2.],
                [2., 5.]], dtype=torch.float64)
    """

    def __init__(self, total: torch.Tensor | None = None, *, blocks: int = 4, fold_every: int = 65_536) -> None:
        self._total = total
        self._buffer: torch.Tensor | None = None
        self._pending = 0
        self._blocks = blocks
        self._fold_every = fold_every

    def add(self, keys: Float[torch.Tensor, "n d_mlp"]) -> None:
        """Add k k^T for every row k of ``keys``."""
        keys = keys.float()
        d = keys.shape[1]
        if self._buffer is None:
            self._buffer = torch.zeros(d, d, dtype=torch.float32, device=keys.device)
        edges = [round(i * d / self._blocks) for i in range(self._blocks + 1)]
        for lo, hi in itertools.pairwise(edges):
            if hi > lo:
                self._buffer[lo:hi, lo:].addmm_(keys[:, lo:hi].T, keys[:, lo:])
        self._pending += keys.shape[0]
        if self._pending >= self._fold_every:
            self._fold()

    def _fold(self) -> None:
        if self._buffer is None:
            return
        upper = self._buffer.double()
        symmetric = upper.triu() + upper.triu(1).T
        self._total = symmetric if self._total is None else self._total.to(symmetric.device).add_(symmetric)
        self._buffer.zero_()
        self._pending = 0

    def total(self) -> Float[torch.Tensor, "d_mlp d_mlp"]:
        """The sum so far, ``[d_mlp, d_mlp]`` float64, symmetric."""
        self._fold()
        if self._total is None:
            raise ValueError("no keys have been added yet")
        return self._total


def _accumulate(
    lm: LoadedModel,
    layers: list[int],
    windows: Sequence[torch.Tensor],
    *,
    batch_size: int,
    progress: bool,
    sums: dict[int, torch.Tensor] | None = None,
    windows_done: int = 0,
    checkpoint: Callable[[int, dict[int, SecondMomentSum]], None] | None = None,
    checkpoint_seconds: float = 60.0,
    on_batch: BatchCallback | None = None,
) -> dict[int, torch.Tensor]:
    """Sums of k k^T over every position of ``windows`` for each layer, in one pass.

    Starts from ``sums`` after ``windows_done`` windows when resuming; ``checkpoint(n, sums)``
    is called at most every ``checkpoint_seconds`` with the number of windows done.
    """
    running = {layer: SecondMomentSum((sums or {}).get(layer)) for layer in layers}
    total = sum(len(w) for w in windows)
    done = sum(len(w) for w in windows[:windows_done])
    last_checkpoint = time.monotonic()
    bar = tqdm(total=total, initial=done, unit="tok", desc=f"E[kk^T] layers {layers}", disable=not progress)
    with torch.no_grad(), _reading_keys(lm, layers) as traces:
        for start, ids in _batches(windows, batch_size):
            if start < windows_done:
                continue
            _forward(lm, ids)
            for layer, trace in traces.items():
                running[layer].add(_read_keys(trace))
            done += ids.numel()
            bar.update(ids.numel())
            if on_batch is not None:
                on_batch(done, running)
            if checkpoint is not None and time.monotonic() - last_checkpoint >= checkpoint_seconds:
                checkpoint(start + len(ids), running)
                last_checkpoint = time.monotonic()
    bar.close()
    return {layer: s.total() for layer, s in running.items()}


def _load_entry(folder: Path, key: StatsKey, layer: int, d_mlp: int) -> torch.Tensor | None:
    """The cached E[k k^T] in ``folder`` if it is intact and made for ``key`` and ``layer``."""
    if not folder.exists():
        return None
    manifest = read_manifest(folder, full_check=True)
    if manifest is None or manifest.get("key") != asdict(key) or manifest.get("layer") != layer:
        log.warning("statistics cache %s is damaged or was made for something else; recomputing it", folder)
        return None
    try:
        moment = load_file(folder / _FILE)["second_moment"]
    except (OSError, KeyError, RuntimeError) as err:  # safetensors raises these on unreadable files
        log.warning("cannot read %s (%s); recomputing it", folder / _FILE, err)
        return None
    # One NaN or inf makes the sum non-finite; summing is 5x cheaper than an elementwise isfinite here.
    if moment.shape != (d_mlp, d_mlp) or moment.dtype != torch.float64 or not torch.isfinite(moment.sum()):
        log.warning("statistics cache %s holds a wrong-shaped or non-finite matrix; recomputing it", folder)
        return None
    return moment


def _save_entry(folder: Path, key: StatsKey, layer: int, moment: torch.Tensor) -> None:
    with atomic_dir(folder) as tmp:
        save_file({"second_moment": moment.contiguous()}, tmp / _FILE)
        write_manifest(tmp, {"key": asdict(key), "layer": layer})


def _load_partial(folder: Path, key: StatsKey, layers: list[int], device: torch.device) -> tuple[dict[int, Any], int]:
    """Running sums and windows done from a checkpoint, or nothing if there is no usable one."""
    if not folder.exists():
        return {}, 0
    manifest = read_manifest(folder, full_check=True)
    if manifest is None or manifest.get("key") != asdict(key) or manifest.get("layers") != layers:
        log.warning("checkpoint %s is damaged or was made for something else; starting over", folder)
        return {}, 0
    tensors = load_file(folder / _PARTIAL)
    log.info("resuming statistics from %s (%d windows done)", folder, manifest["windows_done"])
    return {layer: tensors[f"layer{layer}"].to(device) for layer in layers}, int(manifest["windows_done"])


def _save_partial(
    folder: Path, key: StatsKey, layers: list[int], windows_done: int, sums: dict[int, SecondMomentSum]
) -> None:
    with atomic_dir(folder) as tmp:
        save_file({f"layer{layer}": sums[layer].total().cpu().contiguous() for layer in layers}, tmp / _PARTIAL)
        write_manifest(tmp, {"key": asdict(key), "layers": layers, "windows_done": windows_done})


def key_second_moment(
    lm: LoadedModel,
    layers: int | Iterable[int],
    *,
    corpus: Corpus = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    batch_size: int = 16,
    seq_len: int = 128,
    progress: bool = True,
    use_cache: bool = True,
    text_column: str = "text",
    checkpoint_seconds: float = 60.0,
) -> dict[int, Float[torch.Tensor, "d_mlp d_mlp"]]:
    """E[k k^T] of the input of W_out at each layer, over ``n_tokens`` positions of a corpus (eq. 15).

    C0 for eq. 14 is ``lam * key_second_moment(lm, layers)[l]`` (the paper: lam = 1.5e4).

    Args:
        lm: the model.
        layers: layer indices (or one index); all are computed in one pass.
        corpus: ``None`` for the default offline corpus, or anything
            :func:`memit_lab.corpus.corpus_documents` accepts.
        n_tokens: number of positions (keys) to average over.
        batch_size: windows per forward pass (memory vs. speed; does not change the result
            beyond float rounding).
        seq_len: positions per window (capped at the model's context length).
        progress: show a progress bar.
        use_cache: read and write the on-disk cache (``False``: compute, write nothing).
        text_column: field holding the text in ``.jsonl`` files and dataset rows.
        checkpoint_seconds: how often a long run saves its running sums for resuming.

    Returns:
        ``{layer: E[k k^T]}``, each ``[d_mlp, d_mlp]``, float64, on the CPU.
    """
    wanted = _check_layers(lm, layers)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seq_len = min(seq_len, int(getattr(lm.model.config, "max_position_embeddings", seq_len)))
    windows = corpus_windows(lm.tokenizer, corpus, n_tokens=n_tokens, seq_len=seq_len, text_column=text_column)
    if not use_cache:
        sums = _accumulate(lm, wanted, windows, batch_size=batch_size, progress=progress)
        return {layer: (sums[layer] / n_tokens).cpu() for layer in wanted}

    key = StatsKey(lm.fingerprint(), _windows_digest(windows), n_tokens, seq_len, str(lm.dtype))
    with locked(key.folder()):
        result = {layer: _load_entry(key.layer_folder(layer), key, layer, lm.d_mlp) for layer in wanted}
        missing = [layer for layer, moment in result.items() if moment is None]
        if missing:
            partial = key.partial_folder(missing)
            sums, windows_done = _load_partial(partial, key, missing, lm.device)
            sums = _accumulate(
                lm,
                missing,
                windows,
                batch_size=batch_size,
                progress=progress,
                sums=sums,
                windows_done=windows_done,
                checkpoint=lambda n, s: _save_partial(partial, key, missing, n, s),
                checkpoint_seconds=checkpoint_seconds,
            )
            for layer in missing:
                moment = (sums[layer] / n_tokens).cpu()
                _save_entry(key.layer_folder(layer), key, layer, moment)
                result[layer] = moment
            if partial.exists():
                shutil.rmtree(partial)
    return {layer: moment for layer, moment in result.items() if moment is not None}


def corpus_keys(
    lm: LoadedModel,
    layer: int,
    *,
    corpus: Corpus = None,
    n_tokens: int = 2_048,
    seq_len: int = 128,
    text_column: str = "text",
) -> Float[torch.Tensor, "n_tokens d_mlp"]:
    """The keys themselves (inputs of W_out^layer) at ``n_tokens`` corpus positions, as rows.

    For looking at real keys; for their second moment use :func:`key_second_moment`.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> corpus_keys(lm, 1, corpus=["The Eiffel Tower is in Paris."] * 4, n_tokens=10).shape
        torch.Size([10, 256])
    """
    (layer,) = _check_layers(lm, [layer])
    seq_len = min(seq_len, int(getattr(lm.model.config, "max_position_embeddings", seq_len)))
    windows = corpus_windows(lm.tokenizer, corpus, n_tokens=n_tokens, seq_len=seq_len, text_column=text_column)
    rows = []
    with torch.no_grad(), _reading_keys(lm, [layer]) as traces:
        for _, ids in _batches(windows, 16):
            _forward(lm, ids)
            rows.append(_read_keys(traces[layer]).cpu())
    return torch.cat(rows)


@dataclass(frozen=True)
class Convergence:
    """How the estimate of E[k k^T] settles as tokens are added.

    Attributes:
        layer: the layer.
        tokens: sample sizes at which the estimate was taken (the last is the full sample).
        estimates: E[k k^T] from the first ``tokens[i]`` positions, ``[d_mlp, d_mlp]`` float64.
    """

    layer: int
    tokens: tuple[int, ...]
    estimates: tuple[torch.Tensor, ...]

    @property
    def relative_error(self) -> tuple[float, ...]:
        """||C_n - C_N||_F / ||C_N||_F against the full-sample estimate C_N (so 0 at n = N)."""
        final = self.estimates[-1]
        return tuple(float(torch.linalg.norm(c - final) / torch.linalg.norm(final)) for c in self.estimates)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": self.layer, "tokens": self.tokens, "relative_error": self.relative_error})

    def plot(self, ax: Any = None) -> Any:
        """Relative error against tokens, log-log, with a 1/sqrt(n) guide."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        frame = self.to_frame().iloc[:-1]
        ax.loglog(frame.tokens, frame.relative_error, "o-", label=f"layer {self.layer}")
        first = frame.iloc[0]
        guide = first.relative_error * (first.tokens / frame.tokens) ** 0.5
        ax.loglog(frame.tokens, guide, "--", color="grey", label=r"$\propto 1/\sqrt{n}$")
        ax.set(xlabel="tokens n", ylabel=r"$\|C_n - C_N\|_F / \|C_N\|_F$", title="Convergence of E[k k^T]")
        ax.legend()
        return ax


def second_moment_convergence(
    lm: LoadedModel,
    layer: int,
    *,
    corpus: Corpus = None,
    n_tokens: int = DEFAULT_N_TOKENS,
    n_points: int = 6,
    batch_size: int = 4,
    seq_len: int = 128,
    progress: bool = True,
) -> Convergence:
    """E[k k^T] at ``layer`` from growing prefixes of one corpus sample, in a single pass.

    Prefix sizes double from about ``n_tokens / 2**(n_points - 1)`` (rounded to whole
    batches) up to ``n_tokens``.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> conv = second_moment_convergence(lm, 0, corpus=["Paris is the capital of France."] * 30,
        ...                                  n_tokens=256, n_points=3, seq_len=16, progress=False)
        >>> conv.tokens, conv.relative_error[-1]
        ((64, 128, 256), 0.0)
    """
    (layer,) = _check_layers(lm, [layer])
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2 to show convergence, got {n_points}")
    seq_len = min(seq_len, int(getattr(lm.model.config, "max_position_embeddings", seq_len)))
    windows = corpus_windows(lm.tokenizer, corpus, n_tokens=n_tokens, seq_len=seq_len)
    targets = sorted({max(1, round(n_tokens / 2**i)) for i in range(n_points)})
    snapshots: dict[int, torch.Tensor] = {}

    def snapshot(done: int, sums: dict[int, SecondMomentSum]) -> None:
        while targets and done >= targets[0]:
            targets.pop(0)
            snapshots[done] = (sums[layer].total() / done).cpu()

    _accumulate(lm, [layer], windows, batch_size=batch_size, progress=progress, on_batch=snapshot)
    tokens = tuple(sorted(snapshots))
    return Convergence(layer, tokens, tuple(snapshots[n] for n in tokens))
