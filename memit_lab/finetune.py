"""The papers' fine-tuning baselines: FT-L (W_out of one layer in an L-infinity box) and FT-W (all of one block).

Both write facts the plainest way: minimise the negative log-likelihood of each new object
after its prompt by Adam, all requests together, and differ in what they may change.

* **FT-L** (:func:`apply_ft`, the ROME paper's constrained fine-tuning; the reference code's
  ``hparams/FT/*_constr.json``): only W_out^l, and after every step each entry of the change is
  clipped to [-eps, eps] -- the L-infinity constraint ||W - W_0||_inf <= eps. The loss is
  teacher-forced over every token of the new object (the loss of eq. 16 without delta or
  contexts; the reference scores all of them at the prompt's last position), and the gradient
  of a pass sums over all its batches before the one step.
* **FT-W** (:func:`apply_ft_w`, the MEMIT paper's Tables 1-2; the reference's
  ``hparams/FT/EleutherAI_gpt-j-6B_wd.json``): *every* parameter of block l -- attention,
  MLP (W_in and W_out) and the norms -- with no box, held back only by Adam's L2 weight decay
  wd = n^a * exp(b) for n edits (:data:`memit_lab.hparams.FT_W_DECAY_LAW`). As the reference:
  25 passes, lr 5e-4, one Adam step after each batch of 64 whose mean loss is at least 1e-2,
  every token of the new object scored at the prompt's last position (``loss_at="last"``; the
  same as teacher forcing for one-token objects), stop once a pass's mean loss is below 1e-2.

Logits are computed only where a target token is predicted, and gradients flow only from
layer l up (nothing below requires them). ``result.restore()`` puts back every changed
parameter bit for bit (:class:`BlockBackup` for FT-W).

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-gpt2")
    >>> before = lm.adapter.w_out_weight(lm.model, 2).clone()
    >>> result = apply_ft(lm, [EditRequest("{} is in", "Paris", "Rome")], FtHyperParams(layer=2, steps=5))
    >>> change = lm.adapter.w_out_weight(lm.model, 2) - before
    >>> bool(change.abs().max() <= 5e-4 + 1e-7), result.losses[-1] < result.losses[0]
    (True, True)
    >>> result.restore(); torch.equal(lm.adapter.w_out_weight(lm.model, 2), before)
    True
    >>> result = apply_ft_w(lm, [EditRequest("{} is in", "Paris", "Rome")], FtWHyperParams(layer=1, steps=5))
    >>> len(result.parameters), result.losses[-1] < result.losses[0], round(result.weight_decay, 3)
    (12, True, 1.169)
    >>> result.restore()
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .editing import EditResult, NonFiniteUpdateError, WeightBackup
from .hparams import FtHyperParams, FtWHyperParams
from .models import LoadedModel
from .prompts import padded_batch
from .requests import EditRequest, check_requests
from .zopt import TokenisedPrompt, tokenise_prompt

_H = TypeVar("_H", FtHyperParams, FtWHyperParams)

__all__ = [
    "BlockBackup",
    "FtHyperParams",
    "FtResult",
    "FtWHyperParams",
    "apply_ft",
    "apply_ft_w",
    "block_parameters",
    "clip_change",
]


@dataclass
class FtResult(EditResult):
    """A fine-tuning edit: the loss at each pass and how far the weights moved.

    Attributes:
        layer: the fine-tuned layer.
        losses: mean NLL of the new objects during each pass (the last entry: the final model's).
        max_change: max |W - W_0| over every fine-tuned entry (FT-L: <= ``norm_constraint``).
        change_norm: ||W - W_0||_F over every fine-tuned parameter together.
        parameters: the names of the fine-tuned parameters.
        weight_decay: Adam's L2 weight decay used.
    """

    layer: int = -1
    losses: tuple[float, ...] = ()
    max_change: float = 0.0
    change_norm: float = 0.0
    parameters: tuple[str, ...] = ()
    weight_decay: float = 0.0

    def to_frame(self) -> pd.DataFrame:
        """One row per pass: the mean loss."""
        return pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses})


@dataclass
class BlockBackup(WeightBackup):
    """A :class:`memit_lab.editing.WeightBackup` of W_out^l plus copies of every other parameter of block l.

    ``saved`` holds W_out as for the other methods (so weight-drift diagnostics read it), ``others`` the
    rest by full parameter name; ``restore`` puts all of them back bit for bit.
    """

    others: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_block(cls, lm: LoadedModel, layer: int) -> BlockBackup:
        w_out = lm.adapter.w_out_parameter(lm.model, layer)
        others = {n: p.detach().clone() for n, p in block_parameters(lm, layer).items() if p is not w_out}
        return cls(lm, {layer: w_out.detach().clone()}, others)

    def restore(self) -> None:
        super().restore()
        params = dict(self.lm.model.named_parameters())
        with torch.no_grad():
            for name, w in self.others.items():
                params[name].copy_(w)


def block_parameters(lm: LoadedModel, layer: int) -> dict[str, torch.nn.Parameter]:
    """Every parameter of block ``layer`` by its full name (what FT-W fine-tunes).

    Example:
        >>> from memit_lab import load_model
        >>> sorted(block_parameters(load_model("tiny-llama"), 0))[:2]
        ['model.layers.0.input_layernorm.weight', 'model.layers.0.mlp.down_proj.weight']
    """
    prefix = lm.adapter.block(layer)
    return {f"{prefix}.{n}": p for n, p in lm.model.get_submodule(prefix).named_parameters()}


def clip_change(w: Float[torch.Tensor, "*shape"], w0: Float[torch.Tensor, "*shape"], eps: float) -> None:
    """Project ``w`` in place onto ||w - w0||_inf <= eps (the L-infinity ball around the old weights).

    Example:
        >>> w, w0 = torch.tensor([1.0, -1.0, 0.1]), torch.zeros(3)
        >>> clip_change(w, w0, 0.5); w
        tensor([ 0.5000, -0.5000,  0.1000])
    """
    torch.maximum(torch.minimum(w, w0 + eps), w0 - eps, out=w)


def _tokenised(lm: LoadedModel, requests: Sequence[EditRequest], loss_at: str) -> list[TokenisedPrompt]:
    """Each request's prompt with the positions that predict its new object's tokens.

    ``"object"``: teacher forcing (token t predicted after tokens < t); ``"last"``: the bare prompt, every
    token of the object predicted at its last position (the reference's FT loss).
    """
    prompts = [tokenise_prompt(lm, r, "{}", r.target_new) for r in requests]
    if loss_at == "object":
        return prompts
    return [
        TokenisedPrompt(p.ids[: p.predict_at[0] + 1], p.subject_last, (p.predict_at[0],) * len(p.target_ids),
                        p.target_ids)
        for p in prompts
    ]  # fmt: skip


def target_nll(
    lm: LoadedModel, prompts: Sequence[TokenisedPrompt], ids: torch.Tensor, mask: torch.Tensor
) -> Float[torch.Tensor, " batch"]:
    """Per prompt, the mean negative log-likelihood of its target tokens at ``predict_at``, logits only where needed."""
    rows = [row for row, p in enumerate(prompts) for _ in p.predict_at]
    cols = [pos for p in prompts for pos in p.predict_at]
    targets = torch.tensor([t for p in prompts for t in p.target_ids], device=lm.device)
    # The base model ends with the final norm; the unembedding runs only where a target is predicted.
    final = lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    logp = unembed(final[rows, cols]).float().log_softmax(-1)
    nll = -logp.gather(1, targets[:, None])[:, 0]
    owner = torch.tensor(rows, device=lm.device)
    counts = torch.tensor([len(p.predict_at) for p in prompts], device=lm.device, dtype=nll.dtype)
    return torch.zeros(len(prompts), device=lm.device).index_add(0, owner, nll) / counts


# --- the training loop both methods share -------------------------------------------------------------------------


@dataclass
class _Job:
    """What one fine-tuning run trains, how, and on what."""

    params: dict[str, torch.nn.Parameter]
    originals: dict[str, torch.Tensor]
    opt: torch.optim.Optimizer
    steps: int
    stop_loss: float
    per_batch: bool  # FT-W: an Adam step after each batch; FT-L: one step per pass on the summed gradient
    project: Callable[[], None]  # after every step (FT-L: back into the box)


def _pass(
    lm: LoadedModel, batches: Sequence[Sequence[TokenisedPrompt]], inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    train: Callable[[torch.Tensor], None] | None,
) -> float:  # fmt: skip
    """One pass over the batches; the mean loss over all requests. ``train(nll)`` after each batch's forward."""
    n, total = sum(len(b) for b in batches), 0.0
    with torch.set_grad_enabled(train is not None):
        for batch, (ids, mask) in zip(batches, inputs, strict=True):
            nll = target_nll(lm, batch, ids, mask)
            total += float((nll.sum() / n).detach())
            if train is not None:
                train(nll)
    if not math.isfinite(total):
        raise NonFiniteUpdateError(f"the fine-tuning loss became {total}; lower lr")
    return total


def _fine_tune(
    lm: LoadedModel, prompts: list[TokenisedPrompt], batch: int, job: _Job, desc: str, progress: bool
) -> list[float]:
    """Adam on ``job.params``; the loss of each pass, the last entry the final model's."""
    batches = [prompts[lo : lo + batch] for lo in range(0, len(prompts), batch)]
    inputs = [padded_batch(lm.tokenizer, [p.ids for p in b], lm.device) for b in batches]

    def accumulate(nll: torch.Tensor) -> None:
        # The sum over requests, scaled to the mean: each request pulls with the same weight.
        (nll.sum() / len(prompts)).backward()

    def step_now(nll: torch.Tensor) -> None:
        loss = nll.mean()  # the reference: the mean over the batch, skipped once it is low
        if float(loss.detach()) >= job.stop_loss:
            job.opt.zero_grad(set_to_none=True)
            loss.backward()
            job.opt.step()
            with torch.no_grad():
                job.project()

    losses: list[float] = []
    stopped = False
    for _ in tqdm(range(job.steps), desc=desc, disable=not progress):
        job.opt.zero_grad(set_to_none=True)
        losses.append(_pass(lm, batches, inputs, step_now if job.per_batch else accumulate))
        if stopped := losses[-1] < job.stop_loss:
            break
        if not job.per_batch:
            job.opt.step()
            with torch.no_grad():
                job.project()
    # Per batch, the model moved during the pass it was scored in; summed, only a completed run has.
    if job.per_batch or not stopped:
        losses.append(_pass(lm, batches, inputs, None))
    return losses


def _run(
    lm: LoadedModel, backup: WeightBackup, job: _Job, prompts: list[TokenisedPrompt], *, layer: int, batch: int,
    decay: float, desc: str, progress: bool,
) -> FtResult:  # fmt: skip
    """Train, refuse non-finite weights, summarise the change; any failure puts every weight back first."""
    start = time.perf_counter()
    try:
        for p in job.params.values():
            p.requires_grad_(True)
        losses = _fine_tune(lm, prompts, batch, job, desc, progress)
        bad = [name for name, p in job.params.items() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteUpdateError(f"{bad[0]} has NaN or infinite entries after fine-tuning; lower lr")
    except BaseException:
        backup.restore()
        raise
    finally:
        for p in job.params.values():
            p.requires_grad_(False)
    changes = [(p.detach() - job.originals[name]).float() for name, p in job.params.items()]
    return FtResult(
        backup=backup,
        seconds={"ft": time.perf_counter() - start},
        layer=layer,
        losses=tuple(losses),
        max_change=max(float(c.abs().max()) for c in changes),
        change_norm=math.sqrt(sum(float(c.square().sum()) for c in changes)),
        parameters=tuple(job.params),
        weight_decay=decay,
    )


def _checked(lm: LoadedModel, hp: object, expected: type[_H], layer: int | None, other: str) -> _H:
    """``hp`` of the ``expected`` class, with ``layer`` when given, its layer inside ``lm``; a clear error otherwise."""
    if not isinstance(hp, expected):
        raise TypeError(f"this method takes {expected.__name__}, got {type(hp).__name__} (FT-L/FT-W: see {other})")
    chosen = hp if layer is None else hp.replace(layer=layer)
    if chosen.layer >= lm.n_layers:
        raise ValueError(
            f"layer {chosen.layer} does not fit a model of {lm.n_layers} layers; choose 0-{lm.n_layers - 1}"
        )
    return chosen


# --- the two methods ----------------------------------------------------------------------------------------------


def apply_ft(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: FtHyperParams | None = None,
    *,
    layer: int | None = None,
    progress: bool = False,
) -> FtResult:
    """FT-L: fine-tune W_out of one layer on the requests, L-infinity constrained; undo with ``result.restore()``.

    Args:
        lm: the model, changed in place (W_out of ``layer`` only).
        requests: the facts; checked first (eq. 5 included).
        hparams: :class:`FtHyperParams`; ``None`` takes ``FtHyperParams.for_model(lm)``.
        layer: overrides ``hparams.layer``.
        progress: a progress bar over the passes.

    Raises:
        InvalidRequestError, ConflictingRequestsError, ValueError, TypeError: bad requests, a layer the model
            lacks, FT-W's hyper-parameters (nothing changed).
        NonFiniteUpdateError: the loss or the weights became NaN or infinite (weights restored).
    """
    hp = _checked(lm, FtHyperParams.for_model(lm) if hparams is None else hparams, FtHyperParams, layer, "apply_ft_w")
    prompts = _tokenised(lm, check_requests(requests, lm.tokenizer), "object")
    backup = WeightBackup.of(lm, (hp.layer,))
    param, w0 = lm.adapter.w_out_parameter(lm.model, hp.layer), backup.saved[hp.layer]
    eps = hp.norm_constraint
    job = _Job(
        params={lm.adapter.w_out_module(hp.layer) + ".weight": param},
        originals={lm.adapter.w_out_module(hp.layer) + ".weight": w0},
        opt=torch.optim.Adam([param], lr=hp.lr, weight_decay=hp.weight_decay),
        steps=hp.steps,
        stop_loss=hp.stop_loss,
        per_batch=False,
        project=(lambda: None) if eps is None else (lambda: clip_change(param, w0, eps)),
    )
    return _run(lm, backup, job, prompts, layer=hp.layer, batch=hp.batch, decay=hp.weight_decay,
                desc=f"FT-L at layer {hp.layer}", progress=progress)  # fmt: skip


def apply_ft_w(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: FtWHyperParams | None = None,
    *,
    layer: int | None = None,
    progress: bool = False,
) -> FtResult:
    """FT-W: fine-tune every parameter of one block on the requests, with weight decay; undo with ``result.restore()``.

    Adam's weight decay is the L2 kind (``wd * W`` added to the gradient, ``torch.optim.Adam``'s, as the
    reference), ``hparams.decay_for(len(requests))``.

    Args:
        lm: the model, changed in place (block ``layer`` only: attention, MLP, norms).
        requests: the facts; checked first (eq. 5 included).
        hparams: :class:`FtWHyperParams`; ``None`` takes ``FtWHyperParams.for_model(lm)``.
        layer: overrides ``hparams.layer``.
        progress: a progress bar over the passes.

    Raises:
        InvalidRequestError, ConflictingRequestsError, ValueError, TypeError: bad requests, a layer the model
            lacks, FT-L's hyper-parameters (nothing changed).
        NonFiniteUpdateError: the loss or the weights became NaN or infinite (weights restored).
    """
    hp = _checked(lm, FtWHyperParams.for_model(lm) if hparams is None else hparams, FtWHyperParams, layer, "apply_ft")
    requests = check_requests(requests, lm.tokenizer)
    prompts = _tokenised(lm, requests, hp.loss_at)
    backup = BlockBackup.of_block(lm, hp.layer)
    params = block_parameters(lm, hp.layer)
    w_out = lm.adapter.w_out_parameter(lm.model, hp.layer)
    decay = hp.decay_for(len(requests))
    job = _Job(
        params=params,
        originals={n: backup.saved[hp.layer] if p is w_out else backup.others[n] for n, p in params.items()},
        opt=torch.optim.Adam(list(params.values()), lr=hp.lr, weight_decay=decay),
        steps=hp.steps,
        stop_loss=hp.stop_loss,
        per_batch=True,
        project=lambda: None,  # no norm constraint: the weight decay alone holds the block back
    )
    return _run(lm, backup, job, prompts, layer=hp.layer, batch=hp.batch, decay=decay,
                desc=f"FT-W at block {hp.layer}", progress=progress)  # fmt: skip
