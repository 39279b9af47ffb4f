"""ROME, MEMIT's single-layer predecessor: one rank-one, equality-constrained update per fact, applied in sequence.

ROME (Meng et al. 2022) writes one fact into W_out of one layer l:

1. v*: the value the MLP at layer l must return at the subject's last token so the model
   says the new object -- the same optimisation as MEMIT's z (eq. 16, with the KL term,
   weight decay and clamp; :func:`memit_lab.zopt.optimise_z`) with delta added at layer l.
   Adding delta to the MLP output m^l or to the block output h^l at that token is the same
   thing (eq. 2: nothing else of block l comes after m^l), so z at layer l serves.
2. k: the key at layer l, averaged over the context prompts (eq. 19's average,
   :func:`memit_lab.editing.edit_keys`).
3. Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k) with v = W k + delta
   (:func:`memit_lab.kv_memory.rome_rank_one_update`): after it, (W + Delta) k = v exactly,
   and among all updates doing so it disturbs the old keys least (C = E[k k^T], eq. 15).

The same key k is used in C^-1 k and in the denominator. The reference code used the
averaged key for the first and the bare prompt's key for the second, which can make the
divisor tiny and the edit destroy the model (the "disabling edits" R-ROME fixed); the
tests check Delta k = delta on the averaged key, which that mix would fail.

Many facts are written one after the other, each on the model the previous one left
(:func:`apply_rome`) -- the "ROME-sequential" of MEMIT's paper, which collapses after some
thousands of edits where MEMIT's batch update holds. Differences from the reference,
besides the key: the clamp and weight decay of delta are relative to ||h^l|| (the
residual stream), not ||m^l||; :data:`memit_lab.hparams.MODEL_DEFAULTS` converts ROME's clamp 4 x ||m^l||
for the bundled model by measurement. Context prompts: ``n_contexts`` of one length
(the reference: ten of 5 tokens and ten of 10).

Example:
    >>> import torch
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> from memit_lab.zopt import ZParams
    >>> lm = load_model("tiny-gptj")
    >>> hp = RomeHyperParams(layer=1, z=ZParams(steps=3, weight_decay=0.0, kl_weight=0.0))
    >>> before = lm.adapter.w_out_weight(lm.model, 1).clone()
    >>> c = {1: torch.eye(lm.d_mlp, dtype=torch.float64)}
    >>> result = apply_rome(lm, [EditRequest("{} is in", "Paris", "Rome")], hp, second_moments=c, contexts=("{}",))
    >>> int(torch.linalg.matrix_rank(lm.adapter.w_out_weight(lm.model, 1) - before))  # one fact: rank one
    1
    >>> result.restore(); torch.equal(lm.adapter.w_out_weight(lm.model, 1), before)
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from .editing import EditResult, NonFiniteUpdateError, WeightBackup, edit_keys, layer_second_moments, solve_device
from .hparams import RomeHyperParams
from .kv_memory import rome_rank_one_update
from .models import LoadedModel
from .requests import EditRequest, check_requests
from .zopt import ZResult, context_templates, optimise_z

__all__ = ["RomeHyperParams", "RomeResult", "apply_rome"]


@dataclass
class RomeResult(EditResult):
    """A sequence of ROME edits: per fact its delta (z optimisation) and the rank-one update's size.

    Attributes:
        layer: the edited layer.
        z: per request, its :class:`memit_lab.zopt.ZResult` (optimised on the model as the
            earlier edits left it).
        delta_norms: ||Delta||_F of each request's rank-one update.
    """

    layer: int = -1
    z: tuple[ZResult, ...] = ()
    delta_norms: tuple[float, ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """One row per edit, in the order applied: z passes, final loss, ||delta|| / ||h||, ||Delta||."""
        return pd.DataFrame(
            {
                "edit": range(len(self.z)),
                "passes": [len(z.losses[0]) for z in self.z],
                "loss_last": [z.losses[0][-1] for z in self.z],
                "delta_rel_norm": [float(z.delta.norm() / z.h.norm()) for z in self.z],
                "update_norm": self.delta_norms,
            }
        )


def apply_rome(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: RomeHyperParams | None = None,
    *,
    layer: int | None = None,
    second_moments: Mapping[int, torch.Tensor] | None = None,
    contexts: Sequence[str] | None = None,
    progress: bool = False,
    on_edit: Callable[[int], None] | None = None,
) -> RomeResult:
    """Write the requests into ``lm`` with ROME, one after the other; undo with ``result.restore()``.

    Each request gets its own rank-one update of W_out^layer, computed on the model the
    earlier requests left (ROME-sequential). The batch is checked first (eq. 5 included).

    Args:
        lm: the model, changed in place (W_out of ``layer`` only).
        requests: the facts, applied in this order.
        hparams: :class:`RomeHyperParams`; ``None`` takes ``RomeHyperParams.for_model(lm)``.
        layer: overrides ``hparams.layer``.
        second_moments: ``{layer: E[k k^T]}`` to use instead of computing (or reading from the
            cache) the statistics of the unedited model.
        contexts: prompt templates for delta and the key (``"{}"`` among them); ``None``
            samples ``hparams.z.n_contexts`` (:func:`memit_lab.zopt.context_templates`).
        progress: a progress bar over the requests.
        on_edit: called after each edit with the number of requests written so far; the model then holds
            exactly the first that many edits, as a run on those requests alone would leave it (each edit
            sees only the model the earlier ones left), so a sweep scores all its prefixes in one run.

    Raises:
        InvalidRequestError, ConflictingRequestsError: bad requests (nothing changed).
        NonFiniteUpdateError: some delta or update is not finite (all earlier edits undone too).
    """
    hp = hparams or RomeHyperParams.for_model(lm)
    if layer is not None:
        hp = hp.replace(layer=layer)
    if hp.layer >= lm.n_layers:
        raise ValueError(f"layer {hp.layer} does not fit a model of {lm.n_layers} layers")
    requests = check_requests(requests, lm.tokenizer)
    seconds = {"stats": 0.0, "z": 0.0, "keys": 0.0, "solve": 0.0}
    start = time.perf_counter()
    c = layer_second_moments(lm, (hp.layer,), second_moments, hp.stats_tokens, progress)[hp.layer]
    seconds["stats"] = time.perf_counter() - start
    if contexts is None:
        contexts = context_templates(lm, hp.z.n_contexts, hp.z.context_tokens, seed=hp.z.context_seed)
    device = solve_device(lm)
    c = c.to(device=device, dtype=torch.float64)
    backup = WeightBackup.of(lm, (hp.layer,))
    zs: list[ZResult] = []
    norms: list[float] = []
    try:
        for request in tqdm(requests, desc=f"ROME at layer {hp.layer}", disable=not progress):
            start = time.perf_counter()
            z = optimise_z(lm, [request], hp.layer, hp.z, contexts=contexts)
            seconds["z"] += time.perf_counter() - start
            if not torch.isfinite(z.z).all():
                raise NonFiniteUpdateError(f"delta of {request.text!r} is not finite; lower the learning rate")
            start = time.perf_counter()
            key = edit_keys(lm, [request], hp.layer, contexts, batch=hp.key_batch)[:, 0].to(device)
            seconds["keys"] += time.perf_counter() - start
            start = time.perf_counter()
            w = lm.adapter.w_out_weight(lm.model, hp.layer).detach().to(device)
            value = w.double() @ key.double() + z.delta[0].to(device).double()
            delta = rome_rank_one_update(w, key, value, c)
            backup.add(hp.layer, delta)
            seconds["solve"] += time.perf_counter() - start
            zs.append(z)
            norms.append(float(delta.norm()))
            if on_edit is not None:
                on_edit(len(zs))
    except BaseException:
        backup.restore()
        raise
    return RomeResult(backup=backup, seconds=seconds, layer=hp.layer, z=tuple(zs), delta_norms=tuple(norms))
