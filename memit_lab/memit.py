"""MEMIT's multi-layer batch update (paper Algorithm 1, eq. 16-20), reversible bit for bit.

For a batch of requests (:mod:`memit_lab.requests`) over edit layers R with top layer L:

1. z_i = h_i^L + delta_i, optimised so the model says the new object (eq. 16;
   :func:`memit_lab.zopt.optimise_z`).
2. For each layer l in R, lowest first, with the lower layers' updates in place:

   * keys k_i^l: the input of W_out^l at the subject's last token, averaged as the
     reference does, 1/2 x bare prompt + 1/2 x mean over the context prompts (eq. 19;
     :func:`edit_keys`);
   * the residual still missing, z_i - h_i^L (h^L recomputed on the bare prompt), of which
     this layer takes the share 1 / (layers still to edit) -- 1/(L - l + 1) when R is
     contiguous (eq. 20);
   * Delta^l = R K^T (lam C + K K^T)^-1 (eq. 14, :func:`memit_lab.kv_memory.insertion_update`)
     with C = E[k k^T] from generic text (eq. 15, :func:`memit_lab.stats.key_second_moment`),
     added to W_out^l.

:func:`apply_memit` returns a :class:`MemitResult` with per-layer diagnostics and
``.restore()`` (:func:`memit_lab.methods.edits_applied` is the same as a ``with`` block). Bad
requests, a z that is not finite and an update that is not finite are refused with the weights
exactly as they were. Hyper-parameters: :class:`memit_lab.hparams.MemitHyperParams`. The pieces
every method shares (keys, hidden states, the weight backup) are in :mod:`memit_lab.editing`.

MEND, the paper's third baseline (a trained hyper-network), is out of scope for memit_lab:
it needs a training run per model. The other two baselines are :mod:`memit_lab.rome`
(ROME, one layer, rank one, applied sequentially) and :mod:`memit_lab.finetune` (FT-L, FT-W).

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-llama")
    >>> c = {l: torch.eye(lm.d_mlp, dtype=torch.float64) for l in (0, 1)}
    >>> r = EditRequest("The capital of {} is", "France", "Rome")
    >>> before = lm.adapter.w_out_weight(lm.model, 0).clone()
    >>> result = apply_memit(lm, [r], MemitHyperParams((0, 1)), second_moments=c, contexts=("{}",))
    >>> changed = not torch.equal(lm.adapter.w_out_weight(lm.model, 0), before)
    >>> result.restore()
    >>> changed, torch.equal(lm.adapter.w_out_weight(lm.model, 0), before), list(result.to_frame().layer)
    (True, True, [0, 1])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from .editing import (
    EditResult,
    NonFiniteUpdateError,
    WeightBackup,
    edit_keys,
    hidden_at_subject,
    layer_second_moments,
    solve_device,
)
from .hparams import AlphaEditHyperParams, MemitHyperParams
from .kv_memory import insertion_update
from .models import LoadedModel
from .requests import EditRequest, check_requests
from .zopt import ZResult, context_templates, optimise_z

__all__ = [
    "LayerLog",
    "LayerSolve",
    "MemitHyperParams",
    "MemitResult",
    "apply_memit",
    "check_preserved",
    "check_targets",
    "edit_layers",
    "write_layers",
]


@dataclass
class MemitResult(EditResult):
    """A MEMIT edit: z, and per layer the update's norm and the residual left at L.

    Attributes:
        layers: R.
        z: the z optimisation (loss curves, delta norms).
        delta_norms: ||Delta^l||_F per layer.
        residual_before: per layer, mean over requests of ||z - h^L|| / ||z - h_0^L|| before its update.
        residual_after: the same after the last layer's update.
        seconds: wall time of each phase (z, keys, solve, stats).
    """

    layers: tuple[int, ...] = ()
    z: ZResult | None = None
    delta_norms: tuple[float, ...] = ()
    residual_before: tuple[float, ...] = ()
    residual_after: float = float("nan")

    def to_frame(self) -> pd.DataFrame:
        """One row per edit layer: ||Delta||, relative residual before and after its update."""
        after = (*self.residual_before[1:], self.residual_after)
        return pd.DataFrame(
            {
                "layer": self.layers,
                "delta_norm": self.delta_norms,
                "residual_before": self.residual_before,
                "residual_after": after,
            }
        )

    def plot(self, axes: Any = None) -> Any:
        """Residual remaining at L after each layer's update (eq. 20), and each Delta's norm."""
        import matplotlib.pyplot as plt

        if axes is None:
            _, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        frame = self.to_frame()
        xs = ["start", *map(str, frame.layer)]
        axes[0].plot(xs, [1.0, *frame.residual_after], marker="o")
        axes[0].set(
            xlabel="after updating layer",
            ylabel="||z - h^L|| / ||z - h0||",
            ylim=(0, 1.05),
            title="residual remaining (eq. 20)",
        )
        axes[1].bar(frame.layer.astype(str), frame.delta_norm)
        axes[1].set(xlabel="layer", ylabel="||Delta||_F", title="size of each update")
        return axes


# --- Algorithm 1 ------------------------------------------------------------------------------------------------


def _resolved(
    lm: LoadedModel, hparams: MemitHyperParams | None, layers: Sequence[int] | None, lam: float | None
) -> MemitHyperParams:
    """``hparams`` (or the model's defaults) with the ``layers`` / ``lam`` overrides, checked against the model."""
    hp = hparams or MemitHyperParams.for_model(lm)
    overrides: dict[str, Any] = {}
    if layers is not None:
        overrides["layers"] = tuple(layers)
    if lam is not None:
        overrides["lam"] = float(lam)
    hp = hp.replace(**overrides) if overrides else hp
    if hp.layers[-1] >= lm.n_layers or hp.layers[0] < 0:
        raise ValueError(f"layers {hp.layers} do not fit a model of {lm.n_layers} layers")
    return hp


def check_targets(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    top: int,
    targets: ZResult,
    contexts: Sequence[str] | None,
    batch: int,
) -> None:
    """Refuse z optimised elsewhere: another layer, other requests or contexts, or a model edited since (h differs)."""
    if targets.layer != top or targets.z.shape[0] != len(requests):
        raise ValueError(
            f"targets hold {targets.z.shape[0]} z at layer {targets.layer}, but there are {len(requests)} requests "
            f"and L = {top}; optimise them with optimise_z(lm, requests, {top}) or pass targets=None"
        )
    if contexts is not None and tuple(contexts) != tuple(targets.contexts):
        raise ValueError(
            "contexts differ from those z was optimised with (targets.contexts); pass contexts=None to use "
            "the targets' own, or optimise z again with these contexts"
        )
    h = hidden_at_subject(lm, requests, top, batch=batch)
    if not torch.allclose(h, targets.h.to(h), rtol=1e-4, atol=1e-4 * float(h.abs().max())):
        raise ValueError(
            "targets were optimised for other requests or on a model whose weights have changed since (h at L "
            "differs); optimise z again for these requests on this model"
        )


def check_preserved(lm: LoadedModel, layers: Sequence[int], preserved: Mapping[int, torch.Tensor] | None) -> None:
    """Refuse ``preserved_keys`` without a ``[d_mlp, d_mlp]`` K_p K_p^T for every edit layer."""
    if preserved is None:
        return
    for layer in layers:
        k = preserved.get(layer)
        if k is None or tuple(k.shape) != (lm.d_mlp, lm.d_mlp):
            raise ValueError(f"preserved_keys must hold a [{lm.d_mlp}, {lm.d_mlp}] K_p K_p^T for every layer {layers}")


@dataclass
class LayerLog:
    """What Algorithm 1's layer loop records: per layer ||Delta|| and the residual left before it, and the times."""

    seconds: dict[str, float]
    norms: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)

    def timed(self, phase: str, start: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


#: One layer's solve in Algorithm 1: ``solve(layer, share, keys) -> Delta``, with this layer's share of the
#: residual ``[d_model, u]`` and the keys ``[d_mlp, u]`` on the solve device; MEMIT's is eq. 14, AlphaEdit's
#: its null-space projected update (:mod:`memit_lab.alphaedit`).
LayerSolve = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def write_layers(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: MemitHyperParams | AlphaEditHyperParams,
    zres: ZResult,
    contexts: Sequence[str],
    solve: LayerSolve,
    backup: WeightBackup,
    log: LayerLog,
    progress: bool,
) -> torch.Tensor:
    """Algorithm 1's loop over R, lowest layer first; returns z - h^L after the last update ``[n_edits, d_model]``."""
    top, wanted = hp.layers[-1], (zres.z - zres.h).norm(dim=-1)
    log.seconds["keys"] = log.seconds["solve"] = 0.0
    for i, layer in enumerate(tqdm(hp.layers, desc="layers (eq. 19-20)", disable=not progress)):
        start = time.perf_counter()
        residual = zres.z - hidden_at_subject(lm, requests, top, batch=hp.key_batch)
        log.residuals.append(float((residual.norm(dim=-1) / wanted).mean()))
        keys = edit_keys(lm, requests, layer, contexts, batch=hp.key_batch)  # eq. 19
        log.timed("keys", start)
        start = time.perf_counter()
        device = solve_device(lm)
        share = residual.T.to(device) / (len(hp.layers) - i)  # eq. 20: this layer's share of what is missing
        delta = solve(layer, share, keys.to(device))
        backup.add(layer, delta)
        log.norms.append(float(delta.norm()))
        log.timed("solve", start)
    return zres.z - hidden_at_subject(lm, requests, top, batch=hp.key_batch)


def edit_layers(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: MemitHyperParams | AlphaEditHyperParams,
    zres: ZResult,
    contexts: Sequence[str],
    solve: LayerSolve,
    log: LayerLog,
    progress: bool,
) -> MemitResult:
    """:func:`write_layers` with a backup of R's W_out taken first and put back on any error; its diagnostics."""
    backup = WeightBackup.of(lm, hp.layers)
    try:
        final = write_layers(lm, requests, hp, zres, contexts, solve, backup, log, progress)
    except BaseException:
        backup.restore()
        raise
    wanted = (zres.z - zres.h).norm(dim=-1)
    return MemitResult(
        backup=backup,
        seconds=log.seconds,
        layers=hp.layers,
        z=zres,
        delta_norms=tuple(log.norms),
        residual_before=tuple(log.residuals),
        residual_after=float((final.norm(dim=-1) / wanted).mean()),
    )


def apply_memit(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: MemitHyperParams | None = None,
    *,
    layers: Sequence[int] | None = None,
    lam: float | None = None,
    second_moments: Mapping[int, torch.Tensor] | None = None,
    contexts: Sequence[str] | None = None,
    targets: ZResult | None = None,
    preserved_keys: Mapping[int, torch.Tensor] | None = None,
    progress: bool = False,
) -> MemitResult:
    """Write every request into ``lm`` at once with MEMIT (Algorithm 1); undo with ``result.restore()``.

    Args:
        lm: the model, changed in place (W_out of the edit layers only).
        requests: the facts to write; checked before anything changes.
        hparams: :class:`MemitHyperParams`; ``None`` takes ``MemitHyperParams.for_model(lm)`` (measured
            defaults, else the paper's range scaled; :func:`memit_lab.layer_choice.default_hparams` traces).
        layers, lam: override those fields of ``hparams``.
        second_moments: ``{layer: E[k k^T]}`` to use instead of computing (or reading from the
            cache) :func:`memit_lab.stats.key_second_moment`.
        contexts: prompt templates for z and the keys (``"{}"`` first); ``None`` samples them
            (:func:`memit_lab.zopt.context_templates`), or takes those of ``targets``.
        targets: z already optimised (eq. 16) for these requests at L = max(R) on this unedited
            model, to share between runs that differ only in lambda or the lower layers (z of a
            request depends on neither, nor on the other requests: :meth:`ZResult.select`).
            Checked against the model's h at L and ``contexts``; ``None`` optimises z here.
        preserved_keys: ``{layer: K_p K_p^T}`` (``[d_mlp, d_mlp]``) of keys written by earlier edits, to
            keep as well: C0 = lam * E[k k^T] + K_p K_p^T (sequential MEMIT, as AlphaEdit's baseline;
            :mod:`memit_lab.sequential`).
        progress: progress bars.

    Raises:
        InvalidRequestError, ConflictingRequestsError: bad requests (nothing changed).
        NonFiniteUpdateError: z or an update is not finite (every layer restored, nothing changed).
    """
    hp = _resolved(lm, hparams, layers, lam)
    requests = check_requests(requests, lm.tokenizer)
    check_preserved(lm, hp.layers, preserved_keys)
    top = hp.layers[-1]
    if targets is not None:
        check_targets(lm, requests, top, targets, contexts, hp.key_batch)
        contexts = targets.contexts
    log = LayerLog(seconds={})
    start = time.perf_counter()
    moments = layer_second_moments(lm, hp.layers, second_moments, hp.stats_tokens, progress)
    log.timed("stats", start)
    if contexts is None:
        contexts = context_templates(lm, hp.z.n_contexts, hp.z.context_tokens, seed=hp.z.context_seed)
    start = time.perf_counter()
    zres = targets or optimise_z(lm, requests, top, hp.z, contexts=contexts, progress=progress)
    log.timed("z", start)
    if not torch.isfinite(zres.z).all():
        raise NonFiniteUpdateError("the optimised z is not finite; lower the learning rate (ZParams.lr)")

    def eq14(layer: int, share: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        c0 = hp.lam * moments[layer].to(keys.device)
        if preserved_keys is not None:
            c0 = c0 + preserved_keys[layer].to(c0)
        return insertion_update(share, keys, c0)

    return edit_layers(lm, requests, hp, zres, contexts, eq14, log, progress)
