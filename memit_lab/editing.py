"""The editing kernel every method shares: read keys at the subject, keep and restore weights, refuse bad updates.

MEMIT (:mod:`memit_lab.memit`), ROME (:mod:`memit_lab.rome`) and fine-tuning
(:mod:`memit_lab.finetune`) all

* read the model at the subject's last token: the block output h^l (:func:`hidden_at_subject`)
  and the key k^l, the input of W_out^l, averaged over context prompts (eq. 19, :func:`edit_keys`);
* need E[k k^T] of the edited layers (eq. 15, :func:`layer_second_moments`) and a device with
  float64 for the solve (:func:`solve_device`);
* change W_out of some layers in place and promise to put it back bit for bit
  (:class:`WeightBackup`, :class:`EditResult`), refusing an update that is not finite
  (:class:`NonFiniteUpdateError`) with the weights exactly as they were.

This module imports no method; the methods import it. Their hyper-parameters and the per-model
defaults live in :mod:`memit_lab.hparams`.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gpt2")
    >>> backup = WeightBackup.of(lm, [1])
    >>> backup.add(1, torch.ones(lm.d_model, lm.d_mlp))
    >>> torch.equal(lm.adapter.w_out_weight(lm.model, 1), backup.saved[1])
    False
    >>> backup.restore(); torch.equal(lm.adapter.w_out_parameter(lm.model, 1), backup.saved[1])
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from .hooks import Trace
from .models import LoadedModel
from .prompts import padded_batch
from .requests import EditRequest
from .stats import key_second_moment
from .zopt import tokenise_prompt

__all__ = [
    "EditResult",
    "NonFiniteUpdateError",
    "WeightBackup",
    "edit_keys",
    "hidden_at_subject",
    "layer_second_moments",
    "solve_device",
]


class NonFiniteUpdateError(FloatingPointError):
    """An update (or a target z) has NaN or infinite entries; nothing was changed."""


# --- reading the model at the subject -------------------------------------------------------------------------------


def _run_to(
    lm: LoadedModel, module: str, prompts: list[tuple[tuple[int, ...], int]], batch: int, read_input: bool
) -> Float[torch.Tensor, "prompts width"]:
    """Input or output of ``module`` at one position per prompt, running the model no deeper than needed."""
    out = []
    for lo in range(0, len(prompts), batch):
        part = prompts[lo : lo + batch]
        ids, mask = padded_batch(lm.tokenizer, [seq for seq, _ in part], lm.device)
        with (
            torch.no_grad(),
            Trace(lm.model, module, retain_input=read_input, retain_output=not read_input, stop=True) as trace,
        ):
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
        got = trace.input if read_input else trace.output
        assert got is not None
        out.append(got[torch.arange(len(part)), torch.tensor([p for _, p in part])].float())
    return torch.cat(out)


def hidden_at_subject(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, *, batch: int = 64
) -> Float[torch.Tensor, "n_edits d_model"]:
    """h^layer (block output) at the subject's last token of each bare prompt.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gptj")
        >>> hidden_at_subject(lm, [EditRequest("{} is in", "Paris", "Rome")], 1).shape
        torch.Size([1, 64])
    """
    prompts = [tokenise_prompt(lm, r, "{}", None) for r in requests]
    return _run_to(lm, lm.adapter.block(layer), [(p.ids, p.subject_last) for p in prompts], batch, False)


def edit_keys(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, contexts: Sequence[str], *, batch: int = 64
) -> Float[torch.Tensor, "d_mlp n_edits"]:
    """Keys k_i^l (eq. 19): the input of W_out^l at the subject's last token, averaged over contexts.

    As the reference: 1/2 x the bare prompt's key + 1/2 x the mean over the other context
    templates (just the bare key when ``contexts == ("{}",)``).

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-qwen2")
        >>> edit_keys(lm, [EditRequest("{} is in", "Paris", "Rome")], 0, ("{}", "Hello. {}")).shape
        torch.Size([128, 1])
    """
    others = [c for c in contexts if c != "{}"]
    groups = [["{}"]] + ([others] if others else [])
    keys = torch.zeros(lm.d_mlp, len(requests), device=lm.device)
    for group in groups:
        prompts = [tokenise_prompt(lm, r, c, None) for r in requests for c in group]
        k = _run_to(lm, lm.adapter.w_out_module(layer), [(p.ids, p.subject_last) for p in prompts], batch, True)
        keys += k.view(len(requests), len(group), lm.d_mlp).mean(1).T / len(groups)
    return keys


# --- the statistics and the solve -----------------------------------------------------------------------------------


def layer_second_moments(
    lm: LoadedModel, layers: Sequence[int], given: Mapping[int, torch.Tensor] | None, tokens: int, progress: bool
) -> Mapping[int, Float[torch.Tensor, "d_mlp d_mlp"]]:
    """E[k k^T] of every layer (eq. 15): ``given`` after checking its shapes, else computed (or read from the cache)."""
    moments = given if given is not None else key_second_moment(lm, layers, n_tokens=tokens, progress=progress)
    for layer in layers:
        c = moments.get(layer)
        if c is None or tuple(c.shape) != (lm.d_mlp, lm.d_mlp):
            raise ValueError(f"second_moments must hold a [{lm.d_mlp}, {lm.d_mlp}] E[k k^T] for every layer {layers}")
    return moments


def solve_device(lm: LoadedModel) -> torch.device:
    """Where the float64 solves run: the model's device, or the CPU for accelerators without float64."""
    # Apple's MPS has no float64; CPUs and CUDA GPUs do, so the solve stays where the weights are.
    return torch.device("cpu") if lm.device.type == "mps" else lm.device


# --- keeping and restoring the weights ------------------------------------------------------------------------------


@dataclass
class WeightBackup:
    """Copies of W_out of some layers, to put back bit for bit."""

    lm: LoadedModel
    saved: dict[int, torch.Tensor]

    @classmethod
    def of(cls, lm: LoadedModel, layers: Sequence[int]) -> WeightBackup:
        return cls(lm, {layer: lm.adapter.w_out_parameter(lm.model, layer).detach().clone() for layer in layers})

    def restore(self) -> None:
        with torch.no_grad():
            for layer, w in self.saved.items():
                self.lm.adapter.w_out_parameter(self.lm.model, layer).copy_(w)

    def add(self, layer: int, delta: Float[torch.Tensor, "d_model d_mlp"]) -> None:
        """W_out^layer += delta (given ``[d_model, d_mlp]``, any dtype), refusing a non-finite result."""
        if not torch.isfinite(delta).all():
            raise NonFiniteUpdateError(f"the update of layer {layer} has NaN or infinite entries")
        param = self.lm.adapter.w_out_parameter(self.lm.model, layer)
        with torch.no_grad():
            param.add_(self.lm.adapter.to_stored(delta).to(device=param.device, dtype=param.dtype))
            if not torch.isfinite(param).all():
                raise NonFiniteUpdateError(f"W_out of layer {layer} overflows its dtype {param.dtype} after the update")


@dataclass
class EditResult:
    """What an edit changed, and the means to undo it (``restore``): the base of every method's result."""

    backup: WeightBackup = field(repr=False)
    seconds: dict[str, float]
    restored: bool = False

    def restore(self) -> None:
        """Put every edited W_out back as it was, bit for bit (idempotent)."""
        self.backup.restore()
        self.restored = True
