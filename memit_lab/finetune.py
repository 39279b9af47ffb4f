"""FT-W, the paper's fine-tuning baseline: gradient steps on W_out of one layer, each weight kept near its old value.

The plainest way to write facts: minimise the negative log-likelihood of each new object
after its prompt (teacher forcing over the object's tokens, the loss eq. 16 uses without
delta or contexts) by Adam on the one matrix W_out^l, all requests together. Unconstrained,
this overwrites much else the layer knows, so after every step each entry of the change is
clipped to [-eps, eps]: an L-infinity norm constraint ||W - W_0||_inf <= eps (the
"FT-L" / constrained fine-tuning of the ROME and MEMIT papers).

Differences from the reference code, each a choice: the loss covers every token of the
new object (the reference scores them all at the prompt's last position); optional plain
weight decay (the MEMIT paper's FT-W on GPT-J used a weight decay that shrinks with the
number of edits on layer 21, no norm constraint). Logits are computed only where a target
token is predicted, and gradients flow only from layer l up (nothing below requires them).

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
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .memit import EditResult, NonFiniteUpdateError, WeightBackup, default_layers
from .models import LoadedModel
from .requests import EditRequest, check_requests
from .zopt import TokenisedPrompt, tokenise_prompt

__all__ = ["MODEL_DEFAULTS", "FtHyperParams", "FtResult", "apply_ft", "clip_change"]


@dataclass(frozen=True)
class FtHyperParams:
    """Everything FT-W's result depends on besides the model and the requests.

    Attributes:
        layer: l, the layer whose W_out is fine-tuned.
        steps: Adam steps at most.
        lr: Adam learning rate.
        norm_constraint: eps of ||W - W_0||_inf <= eps (per entry); ``None`` for none.
        weight_decay: Adam's (L2) weight decay; 0 for none.
        stop_loss: stop when the mean loss falls below this.
        batch: requests per forward/backward pass (the gradient of a step sums over all of them).
    """

    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = 5e-4
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    batch: int = 64

    def __post_init__(self) -> None:
        if self.layer < 0 or self.steps < 1 or self.batch < 1:
            raise ValueError(f"layer must be >= 0, steps and batch >= 1: {self}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be positive (or None for none), got {self.norm_constraint}")

    @classmethod
    def for_model(cls, lm: LoadedModel) -> FtHyperParams:
        """Measured defaults for the bundled model (:data:`MODEL_DEFAULTS`), else the middle of
        :func:`memit_lab.memit.default_layers` with the ROME paper's GPT-2 XL settings."""
        if lm.name in MODEL_DEFAULTS:
            return MODEL_DEFAULTS[lm.name]
        layers = default_layers(lm.n_layers)
        return cls(layer=layers[len(layers) // 2])

    def replace(self, **changes: Any) -> FtHyperParams:
        return dataclasses.replace(self, **changes)


#: Defaults per model. Bundled model: the same layer as ROME (4, the MLP causal-tracing peak). eps and lr 5e-3, ten
#: times the ROME paper's code: its 5e-4 is ~0.3% of this layer's W_out entry std (0.18) and, measured on 16 known
#: facts of the fact set (CounterFact %, unedited S 0 / ES 0 / PS 3.1 / NS 88.8), writes nothing: ES 0. By eps (= lr):
#: 2e-3 -> ES 12.5, PS 12.5, NS 82.5; 5e-3 -> ES 81.2, PS 31.2, NS 76.2; 2e-2 (lr 5e-3) -> ES 93.8, PS 71.9, NS 60.0;
#: no box (lr 5e-4) -> ES 81.2, PS 56.2, NS 60.0. At 5e-3 the box still binds: most facts are written on their own
#: prompt, few carry over to paraphrases, and neighbours pay -- the constrained fine-tuning baseline of the paper.
MODEL_DEFAULTS: dict[str, FtHyperParams] = {
    "smollm2-135m": FtHyperParams(layer=4, steps=25, lr=5e-3, norm_constraint=5e-3),
}


@dataclass
class FtResult(EditResult):
    """A fine-tuning edit: the loss at each step and how far W_out moved.

    Attributes:
        layer: the fine-tuned layer.
        losses: mean NLL of the new objects before each step (the last entry: after the last step).
        max_change: ||W - W_0||_inf at the end (<= ``norm_constraint``).
        change_norm: ||W - W_0||_F at the end.
    """

    layer: int = -1
    losses: tuple[float, ...] = ()
    max_change: float = 0.0
    change_norm: float = 0.0

    def to_frame(self) -> pd.DataFrame:
        """One row per step: the mean loss."""
        return pd.DataFrame({"step": range(len(self.losses)), "loss": self.losses})


def clip_change(w: Float[torch.Tensor, "*shape"], w0: Float[torch.Tensor, "*shape"], eps: float) -> None:
    """Project ``w`` in place onto ||w - w0||_inf <= eps (the L-infinity ball around the old weights).

    Example:
        >>> w, w0 = torch.tensor([1.0, -1.0, 0.1]), torch.zeros(3)
        >>> clip_change(w, w0, 0.5); w
        tensor([ 0.5000, -0.5000,  0.1000])
    """
    torch.maximum(torch.minimum(w, w0 + eps), w0 - eps, out=w)


def _tokenised(lm: LoadedModel, requests: Sequence[EditRequest]) -> list[TokenisedPrompt]:
    return [tokenise_prompt(lm, r, "{}", r.target_new) for r in requests]


def _batch_inputs(lm: LoadedModel, prompts: Sequence[TokenisedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, : len(p.ids)] = torch.tensor(p.ids)
        mask[row, : len(p.ids)] = 1
    return ids.to(lm.device), mask.to(lm.device)


def target_nll(
    lm: LoadedModel, prompts: Sequence[TokenisedPrompt], ids: torch.Tensor, mask: torch.Tensor
) -> Float[torch.Tensor, " batch"]:
    """Per prompt, the mean negative log-likelihood of its target tokens (teacher-forced), logits only where needed."""
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


def apply_ft(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    hparams: FtHyperParams | None = None,
    *,
    layer: int | None = None,
    progress: bool = False,
) -> FtResult:
    """Fine-tune W_out of one layer on the requests (FT-W, L-infinity constrained); undo with ``result.restore()``.

    Args:
        lm: the model, changed in place (W_out of ``layer`` only).
        requests: the facts; checked first (eq. 5 included).
        hparams: :class:`FtHyperParams`; ``None`` takes ``FtHyperParams.for_model(lm)``.
        layer: overrides ``hparams.layer``.
        progress: a progress bar over the steps.

    Raises:
        InvalidRequestError, ConflictingRequestsError: bad requests (nothing changed).
        NonFiniteUpdateError: the loss or the weights became NaN or infinite (weights restored).
    """
    hp = hparams or FtHyperParams.for_model(lm)
    if layer is not None:
        hp = hp.replace(layer=layer)
    if hp.layer >= lm.n_layers:
        raise ValueError(f"layer {hp.layer} does not fit a model of {lm.n_layers} layers")
    requests = check_requests(requests, lm.tokenizer)
    prompts = _tokenised(lm, requests)
    batches = [prompts[lo : lo + hp.batch] for lo in range(0, len(prompts), hp.batch)]
    inputs = [_batch_inputs(lm, b) for b in batches]
    backup = WeightBackup.of(lm, (hp.layer,))
    param = lm.adapter.w_out_parameter(lm.model, hp.layer)
    w0 = backup.saved[hp.layer]
    opt = torch.optim.Adam([param], lr=hp.lr, weight_decay=hp.weight_decay)
    losses: list[float] = []
    start = time.perf_counter()
    try:
        param.requires_grad_(True)
        for step in tqdm(range(hp.steps + 1), desc=f"FT-W at layer {hp.layer}", disable=not progress):
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for batch, (ids, mask) in zip(batches, inputs, strict=True):
                # The sum over requests, scaled to the mean: each request pulls with the same weight.
                loss = target_nll(lm, batch, ids, mask).sum() / len(prompts)
                if step < hp.steps:
                    loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise NonFiniteUpdateError(f"the fine-tuning loss became {total} at step {step}; lower lr")
            losses.append(total)
            if step == hp.steps or total < hp.stop_loss:
                break
            opt.step()
            if hp.norm_constraint is not None:
                with torch.no_grad():
                    clip_change(param, w0, hp.norm_constraint)
        param.requires_grad_(False)
        if not torch.isfinite(param).all():
            raise NonFiniteUpdateError(f"W_out of layer {hp.layer} has NaN or infinite entries after fine-tuning")
    except BaseException:
        param.requires_grad_(False)
        backup.restore()
        raise
    change = (param.detach() - w0).float()
    return FtResult(
        backup=backup,
        seconds={"ft": time.perf_counter() - start},
        layer=hp.layer,
        losses=tuple(losses),
        max_change=float(change.abs().max()),
        change_norm=float(change.norm()),
    )
