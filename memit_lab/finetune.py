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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .editing import EditResult, NonFiniteUpdateError, WeightBackup
from .hparams import FtHyperParams
from .models import LoadedModel
from .prompts import padded_batch
from .requests import EditRequest, check_requests
from .zopt import TokenisedPrompt, tokenise_prompt

__all__ = ["FtHyperParams", "FtResult", "apply_ft", "clip_change"]


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
    inputs = [padded_batch(lm.tokenizer, [p.ids for p in b], lm.device) for b in batches]
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
