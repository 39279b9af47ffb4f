"""AlphaEdit (Fang et al., ICLR 2025): MEMIT's update projected onto the null space of the preserved keys.

MEMIT (eq. 14) trades the new memories against the old ones: lambda C0 in
Delta = R K1^T (lambda C0 + K1 K1^T)^-1 pulls the update towards leaving W k0 alone, but
only softly, so edit after edit the old keys drift. AlphaEdit removes the trade-off:

1. **The null space of the old keys.** C = E[k k^T] over generic text (eq. 15,
   :func:`memit_lab.stats.key_second_moment`) = U Lambda U^T. The eigenvectors whose
   eigenvalue is below a threshold, Û = U[:, lambda_i < threshold], span the directions
   the old keys (almost) never take; P = Û Û^T projects onto them
   (:func:`null_space_projector`). Any update of the form Delta = Delta~ P leaves
   W k0 unchanged for every k0 orthogonal to that space, **by construction**.
2. **The update.** Minimise, over Delta~ with Delta = Delta~ P,
   ||Delta~ P K1 - R||^2 + ||Delta~ P K_p||^2 + alpha ||Delta~ P||^2
   (write the new memories, keep the keys K_p that earlier edits wrote, stay small). Its
   solution is Delta = R K1^T P (K_p K_p^T P + K1 K1^T P + alpha I)^-1
   (:func:`null_space_update`); no lambda C0 term is left, P already keeps the old keys.

Everything else is MEMIT's Algorithm 1 (z at L = max(R), keys averaged over contexts
(eq. 19), the residual shared over the layers (eq. 20)): :func:`apply_alphaedit` runs
:mod:`memit_lab.memit`'s layer loop with this solve. As the reference
(``jianghoucheng/AlphaEdit``): P from the *unedited* model's statistics, alpha the
reference's ``L2`` and K_p K_p^T the sum of k k^T over the keys of earlier batches,
read on the model after each batch (:mod:`memit_lab.sequential` keeps it); the system
solved is the transposed one, (P A + alpha I) Delta^T = P K1 R^T with A = K_p K_p^T + K1 K1^T,
as there. Differences: the eigenvectors come from a float64 ``eigh`` of C (the reference: a
float32 SVD, the same vectors for a symmetric C) and the solve is in float64 (there float32).

The threshold depends on the scale of the keys. :func:`null_space_report` measures, per
threshold, the dimension of the null space, the share of the old keys' energy it still
holds (what the update could disturb) and the share of the edit keys' (what it can
write through); :data:`memit_lab.hparams.MODEL_DEFAULTS` gives the bundled model's (5e-3) and why.

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-llama")
    >>> c = {l: torch.diag(torch.linspace(1e-3, 1.0, lm.d_mlp, dtype=torch.float64)) for l in (0, 1)}
    >>> hp = AlphaEditHyperParams((0, 1), threshold=0.5)
    >>> before = lm.adapter.w_out_weight(lm.model, 0).clone()
    >>> result = apply_alphaedit(lm, [EditRequest("The capital of {} is", "France", "Rome")], hp,
    ...                          second_moments=c, contexts=("{}",))
    >>> result.null_dims, not torch.equal(lm.adapter.w_out_weight(lm.model, 0), before)
    ((64, 64), True)
    >>> result.restore(); torch.equal(lm.adapter.w_out_weight(lm.model, 0), before)
    True
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file

from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .editing import NonFiniteUpdateError, layer_second_moments, solve_device
from .hparams import AlphaEditHyperParams
from .memit import LayerLog, MemitResult, check_preserved, check_targets, edit_layers
from .models import LoadedModel
from .requests import EditRequest, check_requests
from .zopt import ZResult, context_templates, optimise_z

__all__ = [
    "AlphaEditHyperParams",
    "AlphaEditResult",
    "apply_alphaedit",
    "cached_projector",
    "null_space_projector",
    "null_space_report",
    "null_space_update",
]

log = logging.getLogger(__name__)

_FILE = "projector.safetensors"


# --- the projector ------------------------------------------------------------------------------------------------


def _check_moment(c: torch.Tensor) -> None:
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not torch.isfinite(c).all():
        raise ValueError(f"E[k k^T] must be a finite square [d_mlp, d_mlp] matrix, got shape {list(c.shape)}")


def null_space_projector(
    second_moment: Float[torch.Tensor, "d_mlp d_mlp"], threshold: float
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """P = Û Û^T, Û the eigenvectors of E[k k^T] = U Lambda U^T whose eigenvalue is below ``threshold``.

    P is the orthogonal projector onto the (near) null space of the preserved keys: P = P^T,
    P^2 = P, and P k = 0 for every k spanned by the eigenvectors at or above the threshold.
    Returned in float64 on the CPU (:func:`cached_projector` keeps it on disk).

    Example:
        >>> c = torch.diag(torch.tensor([4.0, 1.0, 1e-3], dtype=torch.float64))
        >>> null_space_projector(c, 1e-2)
        tensor([[0., 0., 0.],
                [0., 0., 0.],
                [0., 0., 1.]], dtype=torch.float64)
    """
    _check_moment(second_moment)
    if not threshold > 0:
        raise ValueError(f"threshold must be a positive eigenvalue bound, got {threshold}")
    eigenvalues, vectors = torch.linalg.eigh(second_moment.detach().cpu().double())
    null = vectors[:, eigenvalues < threshold]
    return null @ null.T


def _moment_digest(c: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(tuple(c.shape)).encode())
    digest.update(c.detach().cpu().double().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_projector(folder: Path, d_mlp: int) -> torch.Tensor | None:
    if not folder.exists():
        return None
    if read_manifest(folder) is None:
        log.warning("null-space projector cache %s is damaged; recomputing it", folder)
        return None
    p = load_file(folder / _FILE)["projector"]
    return p if p.shape == (d_mlp, d_mlp) and p.dtype == torch.float64 else None


def cached_projector(
    second_moment: Float[torch.Tensor, "d_mlp d_mlp"], threshold: float, *, use_cache: bool = True
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """:func:`null_space_projector`, kept on disk beside the statistics (``cache_root()/stats/null-space``).

    The entry is keyed by a digest of the exact E[k k^T] (so by the model, layer, corpus and
    sample size it came from) and the threshold; written atomically, checked on reading.

    Example:
        >>> c = torch.diag(torch.tensor([4.0, 1e-3], dtype=torch.float64))
        >>> torch.equal(cached_projector(c, 1e-2, use_cache=False), null_space_projector(c, 1e-2))
        True
    """
    _check_moment(second_moment)
    if not use_cache:
        return null_space_projector(second_moment, threshold)
    folder = cache_root() / "stats" / "null-space" / f"{_moment_digest(second_moment)}-t{float(threshold)!r}"
    with locked(folder):
        p = _load_projector(folder, second_moment.shape[0])
        if p is None:
            p = null_space_projector(second_moment, threshold)
            with atomic_dir(folder) as tmp:
                save_file({"projector": p.contiguous()}, tmp / _FILE)
                write_manifest(tmp, {"threshold": float(threshold), "null_dim": round(float(p.trace()))})
    return p


def null_space_report(
    second_moment: Float[torch.Tensor, "d_mlp d_mlp"],
    thresholds: Sequence[float],
    keys: Float[torch.Tensor, "d_mlp n"] | None = None,
) -> pd.DataFrame:
    """Per threshold: the null space's dimension, and how much of the old (and the edit) keys' energy lies in it.

    ``old_energy`` = tr(P C) / tr(C), the share of E[||k||^2] an update through P can still
    disturb (0 would be a true null space); ``edit_energy`` = mean over the columns of
    ``keys`` of ||P k||^2 / ||k||^2, the share of each edit key the update can write through.

    Example:
        >>> c = torch.diag(torch.tensor([4.0, 1.0, 1e-3], dtype=torch.float64))
        >>> null_space_report(c, [1e-2, 2.0]).round(4).to_dict("list")
        {'threshold': [0.01, 2.0], 'null_dim': [1, 2], 'old_energy': [0.0002, 0.2002]}
    """
    eigenvalues, vectors = torch.linalg.eigh(second_moment.detach().cpu().double())
    coords = None if keys is None else (vectors.T @ keys.detach().cpu().double()) ** 2
    rows = []
    for threshold in thresholds:
        null = eigenvalues < threshold
        row = {"threshold": float(threshold), "null_dim": int(null.sum())}
        row["old_energy"] = float(eigenvalues[null].sum() / eigenvalues.sum())
        if coords is not None:
            row["edit_energy"] = float((coords[null].sum(0) / coords.sum(0)).mean())
        rows.append(row)
    return pd.DataFrame(rows)


# --- the update ---------------------------------------------------------------------------------------------------


def null_space_update(
    residuals: Float[torch.Tensor, "d_model u"],
    keys: Float[torch.Tensor, "d_mlp u"],
    projector: Float[torch.Tensor, "d_mlp d_mlp"],
    alpha: float,
    preserved: Float[torch.Tensor, "d_mlp d_mlp"] | None = None,
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """AlphaEdit's update Delta = R K1^T P (K_p K_p^T P + K1 K1^T P + alpha I)^-1, in float64.

    It minimises ||Delta P K1 - R||^2 + ||Delta P K_p||^2 + alpha ||Delta P||^2 with
    Delta = Delta P, so Delta k = 0 wherever P k = 0.

    Args:
        residuals: R, what the new values still lack, ``[d_model, u]``.
        keys: the new keys K1 as columns, ``[d_mlp, u]``.
        projector: P (:func:`null_space_projector`).
        alpha: weight of ||Delta P||^2 (> 0: the system is then always solvable).
        preserved: K_p K_p^T of the keys earlier edits wrote, ``None`` for none.

    Example:
        >>> p = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
        >>> null_space_update(torch.ones(1, 1), torch.tensor([[1.0], [0.0], [5.0]]), p, 1.0)  # k1's null part / 2
        tensor([[0.5000, 0.0000, 0.0000]], dtype=torch.float64)
    """
    if residuals.ndim != 2 or keys.ndim != 2 or residuals.shape[1] != keys.shape[1]:
        raise ValueError(
            f"residuals must be [d_model, u] and keys [d_mlp, u] with the same u, "
            f"got {list(residuals.shape)} and {list(keys.shape)}"
        )
    d = keys.shape[0]
    if projector.shape != (d, d) or (preserved is not None and preserved.shape != (d, d)):
        raise ValueError(f"projector and preserved must be [d_mlp, d_mlp] = [{d}, {d}] to match the keys")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    k = keys.double()
    p = projector.to(k)
    gram = k @ k.T if preserved is None else k @ k.T + preserved.to(k)
    # Delta (A P + alpha I) = R K1^T P  <=>  (P A + alpha I) Delta^T = P K1 R^T, as P and A are symmetric
    system = p @ gram + alpha * torch.eye(d, dtype=torch.float64, device=k.device)
    return torch.linalg.solve(system, p @ (k @ residuals.to(k).T)).T


# --- Algorithm 1 with the projected solve -------------------------------------------------------------------------


@dataclass
class AlphaEditResult(MemitResult):
    """An AlphaEdit batch: what :class:`memit_lab.memit.MemitResult` holds, and each layer's null-space dimension.

    Attributes:
        null_dims: per layer of R, rank of P (directions the update may use, of d_mlp).
    """

    null_dims: tuple[int, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """One row per edit layer: ||Delta||, the residual before and after its update, dim of the null space."""
        return super().to_frame().assign(null_dim=list(self.null_dims))


def _projectors(
    lm: LoadedModel, hp: AlphaEditHyperParams, given: Mapping[int, torch.Tensor] | None, progress: bool
) -> dict[int, torch.Tensor]:
    moments = layer_second_moments(lm, hp.layers, given, hp.stats_tokens, progress)
    return {layer: cached_projector(moments[layer], hp.threshold) for layer in hp.layers}


def _targets(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hp: AlphaEditHyperParams,
    contexts: Sequence[str] | None,
    progress: bool,
) -> ZResult:
    if contexts is None:
        contexts = context_templates(lm, hp.z.n_contexts, hp.z.context_tokens, seed=hp.z.context_seed)
    zres = optimise_z(lm, requests, hp.layers[-1], hp.z, contexts=contexts, progress=progress)
    if not torch.isfinite(zres.z).all():
        raise NonFiniteUpdateError("the optimised z is not finite; lower the learning rate (ZParams.lr)")
    return zres


def apply_alphaedit(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: AlphaEditHyperParams | None = None,
    *,
    second_moments: Mapping[int, torch.Tensor] | None = None,
    contexts: Sequence[str] | None = None,
    preserved_keys: Mapping[int, torch.Tensor] | None = None,
    targets: ZResult | None = None,
    progress: bool = False,
) -> AlphaEditResult:
    """Write every request into ``lm`` at once with AlphaEdit (Algorithm 1, null-space solve); undo with ``restore``.

    Args:
        lm: the model, changed in place (W_out of the edit layers only).
        requests: the facts to write; checked before anything changes.
        hparams: :class:`AlphaEditHyperParams`; ``None`` takes ``AlphaEditHyperParams.for_model(lm)``.
        second_moments: ``{layer: E[k k^T]}`` of the *unedited* model, to build P from, instead of
            computing (or reading from the cache) :func:`memit_lab.stats.key_second_moment`; pass
            them when ``lm`` has been edited before (its own statistics would be another model's).
        contexts: prompt templates for z and the keys (``"{}"`` first); ``None`` samples them.
        preserved_keys: ``{layer: K_p K_p^T}`` (``[d_mlp, d_mlp]``) of the keys earlier batches wrote.
        targets: z already optimised for these requests on this model (as :func:`memit_lab.memit.apply_memit`).
        progress: progress bars.

    Raises:
        InvalidRequestError, ConflictingRequestsError: bad requests (nothing changed).
        NonFiniteUpdateError: z or an update is not finite (every layer restored, nothing changed).
    """
    hp = hparams or AlphaEditHyperParams.for_model(lm)
    if hp.layers[-1] >= lm.n_layers:
        raise ValueError(f"layers {hp.layers} do not fit a model of {lm.n_layers} layers")
    requests = check_requests(requests, lm.tokenizer)
    check_preserved(lm, hp.layers, preserved_keys)
    if targets is not None:
        check_targets(lm, requests, hp.layers[-1], targets, contexts, hp.key_batch)
    log = LayerLog(seconds={})
    start = time.perf_counter()
    projectors = _projectors(lm, hp, second_moments, progress)
    log.timed("stats", start)
    start = time.perf_counter()
    zres = targets or _targets(lm, requests, hp, contexts, progress)
    log.timed("z", start)
    device = solve_device(lm)

    def projected(layer: int, share: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        kept = None if preserved_keys is None else preserved_keys[layer].to(device)
        return null_space_update(share, keys, projectors[layer].to(device), hp.alpha, kept)

    result = edit_layers(lm, requests, hp, zres, zres.contexts, projected, log, progress)
    return AlphaEditResult(
        **{f.name: getattr(result, f.name) for f in dataclasses.fields(result)},
        null_dims=tuple(round(float(projectors[layer].trace())) for layer in hp.layers),
    )
