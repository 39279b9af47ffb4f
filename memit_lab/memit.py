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
``.restore()``; :func:`edits_applied` is the same as a ``with`` block. Bad requests, a z that
is not finite and an update that is not finite are refused with the weights exactly as
they were. Hyper-parameters: :class:`MemitHyperParams` (``for_model`` holds the defaults).

MEND, the paper's third baseline (a trained hyper-network), is out of scope for memit_lab:
it needs a training run per model. The other two baselines are :mod:`memit_lab.rome`
(ROME, one layer, rank one, applied sequentially) and :mod:`memit_lab.finetune` (FT-W).

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-llama")
    >>> c = {l: torch.eye(lm.d_mlp, dtype=torch.float64) for l in (0, 1)}
    >>> r = EditRequest("The capital of {} is", "France", "Rome")
    >>> before = lm.adapter.w_out_weight(lm.model, 0).clone()
    >>> with edits_applied(lm, [r], layers=(0, 1), second_moments=c, contexts=("{}",)) as result:
    ...     changed = not torch.equal(lm.adapter.w_out_weight(lm.model, 0), before)
    >>> changed, torch.equal(lm.adapter.w_out_weight(lm.model, 0), before), list(result.to_frame().layer)
    (True, True, [0, 1])
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .hooks import Trace
from .kv_memory import insertion_update
from .models import LoadedModel
from .requests import EditRequest, check_requests
from .stats import DEFAULT_N_TOKENS, key_second_moment
from .zopt import ZParams, ZResult, context_templates, optimise_z, tokenise_prompt

__all__ = [
    "EditResult",
    "MemitHyperParams",
    "MemitResult",
    "NonFiniteUpdateError",
    "WeightBackup",
    "apply_memit",
    "default_layers",
    "edit_keys",
    "edits_applied",
    "hidden_at_subject",
    "layer_second_moments",
    "solve_device",
]

log = logging.getLogger(__name__)


class NonFiniteUpdateError(FloatingPointError):
    """An update (or a target z) has NaN or infinite entries; nothing was changed."""


# --- hyper-parameters ---------------------------------------------------------------------------------------------


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A first guess for R without causal tracing: the paper's GPT-J range 3-8 of 28 layers, scaled.

    Better: :func:`memit_lab.tracing.recommend_layers`. Example: ``default_layers(28) == (3, ..., 8)``.

    Example:
        >>> default_layers(28), default_layers(3)
        ((3, 4, 5, 6, 7, 8), (0, 1))
    """
    lo, hi = round(0.1 * n_layers), max(round(0.28 * n_layers), 1)
    return tuple(range(min(lo, hi), hi + 1))


@dataclass(frozen=True)
class MemitHyperParams:
    """Everything MEMIT's result depends on besides the model and the requests.

    Attributes:
        layers: R, ascending; z lives at L = max(R).
        lam: lambda of eq. 15 (C0 = lam * E[k k^T]); larger keeps old memories better, writes new ones less.
        z: the z optimisation's parameters (:class:`memit_lab.zopt.ZParams`).
        stats_tokens: tokens of generic text for E[k k^T] (:func:`memit_lab.stats.key_second_moment`).
        key_batch: prompts per forward pass when reading keys and hidden states.
    """

    layers: tuple[int, ...]
    lam: float = 15_000.0
    z: ZParams = field(default_factory=ZParams)
    stats_tokens: int = DEFAULT_N_TOKENS
    key_batch: int = 64

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be a non-empty ascending tuple without repeats, got {self.layers}")
        if not self.lam > 0:
            raise ValueError(f"lam must be positive, got {self.lam}")

    @classmethod
    def for_model(cls, lm: LoadedModel) -> MemitHyperParams:
        """The defaults for ``lm``: measured ones for the bundled model (see :data:`MODEL_DEFAULTS`); else
        R from causal tracing (:meth:`from_tracing` with as many layers as :func:`default_layers` gives,
        cached on disk per model, so traced once) and the paper's GPT-J settings for the rest.

        A model whose vocabulary has none of the tracing facts' objects as a token (tiny test
        tokenizers) gets :func:`default_layers`, with a warning in the log.
        """
        if lm.name in MODEL_DEFAULTS:
            return MODEL_DEFAULTS[lm.name]
        from .tracing import NoTraceableFactsError  # see from_tracing

        guess = default_layers(lm.n_layers)
        try:
            return cls.from_tracing(lm, n=len(guess))
        except NoTraceableFactsError as err:
            log.warning("%s; using the paper's range scaled to %d layers, %s", err, lm.n_layers, guess)
            return cls(guess)

    @classmethod
    def from_tracing(cls, lm: LoadedModel, n: int = 5, **tracing: Any) -> MemitHyperParams:
        """R chosen by causal tracing on ``lm`` (:func:`memit_lab.tracing.recommend_layers`, cached on disk), the
        rest the paper's GPT-J settings: for a model without measured defaults. ``tracing`` goes to
        ``recommend_layers`` (facts, samples, seed...).

        Example:
            >>> from memit_lab import load_model
            >>> from memit_lab.facts import KNOWN_FACTS
            >>> lm = load_model("tiny-gpt2")
            >>> len(MemitHyperParams.from_tracing(lm, n=2, facts=KNOWN_FACTS[:3], samples=2, use_cache=False).layers)
            2
        """
        from .tracing import recommend_layers  # tracing is a sibling module with plots; import it only when asked

        return cls(tuple(recommend_layers(lm, n=n, **tracing).layers))

    def replace(self, **changes: Any) -> MemitHyperParams:
        return dataclasses.replace(self, **changes)


#: Defaults per model. Bundled model: R = 0-4, causal tracing's recommendation (notebook 02: restoring the MLP
#: outputs of layers 0-4 together at the last subject token brings back 0.448 of P(target) on average, those of 3-7
#: 0.119; L = 4 keeps z well below where attention starts moving the fact, ~14). lambda = 1,500, not the paper's
#: 15,000: at one layer eq. 14 writes about d_mlp / (lambda + d_mlp) of the residual (notebook 03), 52% for GPT-J's
#: d_mlp = 16,384 at 15,000 but 9% for this model's 1,536; 1,500 restores the paper's share. The z settings are the
#: paper's GPT-J values.
#: Measured (first 100 records of the fact set edited at once, CounterFact %; unedited S 29.8, ES 24.0, PS 21.5,
#: NS 80.2):
#:
#:   R = 0-4, lambda 1,500:              S 86.6  ES 96.0  PS 94.5  NS 73.4  (the default)
#:   R = 0-4, lambda 5,000:              S 85.5  ES 94.0  PS 91.0  NS 74.2  (larger lambda: NS +0.8, ES -2)
#:   R = 0-4, lambda 1,500, 10 z steps:  S 85.1  ES 93.0  PS 91.0  NS 74.0  (2.1x faster z, ES -3)
#:   R = 3-7, lambda 1,500:              S 84.5  ES 94.0  PS 90.5  NS 72.4  (the earlier default)
#:
#: and on 50 known facts (unedited NS 90.0): R = 3-7 S 87.1, ES 94.0, PS 92.0, NS 77.2; R = 0-4 S 89.9, ES 94.0,
#: PS 95.0, NS 82.0. Earlier, lambda alone (12 counterfactual capitals and CEOs at R = 3-7): residual left at L 0.84
#: at 15,000 vs 0.19 at 1,500, P(new object) 0.00-0.01 vs 0.94-0.99, unrelated facts untouched at both.
MODEL_DEFAULTS: dict[str, MemitHyperParams] = {
    "smollm2-135m": MemitHyperParams(layers=(0, 1, 2, 3, 4), lam=1_500.0),
}


# --- reading the model -----------------------------------------------------------------------------------------


def _run_to(
    lm: LoadedModel, module: str, prompts: list[tuple[tuple[int, ...], int]], batch: int, read_input: bool
) -> Float[torch.Tensor, "prompts width"]:
    """Input or output of ``module`` at one position per prompt, running the model no deeper than needed."""
    out = []
    for lo in range(0, len(prompts), batch):
        part = prompts[lo : lo + batch]
        width = max(len(ids) for ids, _ in part)
        ids = torch.full((len(part), width), lm.tokenizer.pad_token_id, device=lm.device)
        mask = torch.zeros_like(ids)
        for row, (seq, _) in enumerate(part):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
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
                lm_w = self.lm.adapter.w_out_parameter(self.lm.model, layer)
                lm_w.copy_(w)

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
    """What an edit changed, and the means to undo it (``restore``), shared by MEMIT, ROME and FT-W."""

    backup: WeightBackup = field(repr=False)
    seconds: dict[str, float]
    restored: bool = False

    def restore(self) -> None:
        """Put every edited W_out back as it was, bit for bit (idempotent)."""
        self.backup.restore()
        self.restored = True


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


def _check_targets(lm: LoadedModel, requests: Sequence[EditRequest], top: int, targets: ZResult, batch: int) -> None:
    """Refuse z optimised elsewhere: another layer, other requests, or a model edited since (h differs)."""
    if targets.layer != top or targets.z.shape[0] != len(requests):
        raise ValueError(
            f"targets hold {targets.z.shape[0]} z at layer {targets.layer}, but there are {len(requests)} requests "
            f"and L = {top}; optimise them with optimise_z(lm, requests, {top}) or pass targets=None"
        )
    h = hidden_at_subject(lm, requests, top, batch=batch)
    if not torch.allclose(h, targets.h.to(h), rtol=1e-4, atol=1e-4 * float(h.abs().max())):
        raise ValueError(
            "targets were optimised for other requests or on a model whose weights have changed since (h at L "
            "differs); optimise z again for these requests on this model"
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
    progress: bool = False,
) -> MemitResult:
    """Write every request into ``lm`` at once with MEMIT (Algorithm 1); undo with ``result.restore()``.

    Args:
        lm: the model, changed in place (W_out of the edit layers only).
        requests: the facts to write; checked before anything changes.
        hparams: :class:`MemitHyperParams`; ``None`` takes ``MemitHyperParams.for_model(lm)``.
        layers, lam: override those fields of ``hparams``.
        second_moments: ``{layer: E[k k^T]}`` to use instead of computing (or reading from the
            cache) :func:`memit_lab.stats.key_second_moment`.
        contexts: prompt templates for z and the keys (``"{}"`` first); ``None`` samples them
            (:func:`memit_lab.zopt.context_templates`), or takes those of ``targets``.
        targets: z already optimised (eq. 16) for these requests at L = max(R) on this unedited
            model, to share between runs that differ only in lambda or the lower layers (z of a
            request depends on neither, nor on the other requests: :meth:`ZResult.select`).
            Checked against the model's h at L; ``None`` optimises z here.
        progress: progress bars.

    Raises:
        InvalidRequestError, ConflictingRequestsError: bad requests (nothing changed).
        NonFiniteUpdateError: z or an update is not finite (every layer restored, nothing changed).
    """
    hp = hparams or MemitHyperParams.for_model(lm)
    overrides: dict[str, Any] = {}
    if layers is not None:
        overrides["layers"] = tuple(layers)
    if lam is not None:
        overrides["lam"] = float(lam)
    hp = hp.replace(**overrides) if overrides else hp
    if hp.layers[-1] >= lm.n_layers or hp.layers[0] < 0:
        raise ValueError(f"layers {hp.layers} do not fit a model of {lm.n_layers} layers")
    requests = check_requests(requests, lm.tokenizer)
    top = hp.layers[-1]
    if targets is not None:
        _check_targets(lm, requests, top, targets, hp.key_batch)
        contexts = targets.contexts if contexts is None else contexts
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    moments = layer_second_moments(lm, hp.layers, second_moments, hp.stats_tokens, progress)
    seconds["stats"] = time.perf_counter() - start
    if contexts is None:
        contexts = context_templates(lm, hp.z.n_contexts, hp.z.context_tokens, seed=hp.z.context_seed)

    start = time.perf_counter()
    zres = targets or optimise_z(lm, requests, top, hp.z, contexts=contexts, progress=progress)
    seconds["z"] = time.perf_counter() - start
    if not torch.isfinite(zres.z).all():
        raise NonFiniteUpdateError("the optimised z is not finite; lower the learning rate (ZParams.lr)")

    backup = WeightBackup.of(lm, hp.layers)
    norms: list[float] = []
    residuals: list[float] = []
    wanted = (zres.z - zres.h).norm(dim=-1)
    seconds["keys"] = seconds["solve"] = 0.0
    try:
        for i, layer in enumerate(tqdm(hp.layers, desc="layers (eq. 19-20)", disable=not progress)):
            start = time.perf_counter()
            residual = zres.z - hidden_at_subject(lm, requests, top, batch=hp.key_batch)
            residuals.append(float((residual.norm(dim=-1) / wanted).mean()))
            keys = edit_keys(lm, requests, layer, contexts, batch=hp.key_batch)
            seconds["keys"] += time.perf_counter() - start
            start = time.perf_counter()
            device = solve_device(lm)
            share = residual.T.to(device) / (len(hp.layers) - i)
            delta = insertion_update(share, keys.to(device), hp.lam * moments[layer].to(device))
            backup.add(layer, delta)
            norms.append(float(delta.norm()))
            seconds["solve"] += time.perf_counter() - start
        final = zres.z - hidden_at_subject(lm, requests, top, batch=hp.key_batch)
    except BaseException:
        backup.restore()
        raise
    return MemitResult(
        backup=backup,
        seconds=seconds,
        layers=hp.layers,
        z=zres,
        delta_norms=tuple(norms),
        residual_before=tuple(residuals),
        residual_after=float((final.norm(dim=-1) / wanted).mean()),
    )


@contextmanager
def edits_applied(
    lm: LoadedModel, requests: Sequence[EditRequest], method: str = "memit", hparams: Any = None, **kwargs: Any
) -> Iterator[EditResult]:
    """``with edits_applied(lm, requests): ...`` -- the edited model inside, the original after (bit for bit).

    ``method``: ``"memit"`` (:func:`apply_memit`), ``"rome"`` or ``"rome-seq"`` (:func:`memit_lab.rome.apply_rome`,
    sequential) or ``"ft"`` (:func:`memit_lab.finetune.apply_ft`); ``kwargs`` go to that function.
    """
    if method == "memit":
        result: EditResult = apply_memit(lm, requests, hparams, **kwargs)
    elif method in ("rome", "rome-seq"):
        from .rome import apply_rome

        result = apply_rome(lm, requests, hparams, **kwargs)
    elif method == "ft":
        from .finetune import apply_ft

        result = apply_ft(lm, requests, hparams, **kwargs)
    else:
        raise ValueError(f"method must be 'memit', 'rome' or 'ft', got {method!r}")
    try:
        yield result
    finally:
        result.restore()
