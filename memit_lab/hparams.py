"""What each editing method's result depends on besides the model and the requests, and the measured defaults.

One frozen dataclass per method (:class:`MemitHyperParams`, :class:`RomeHyperParams`,
:class:`FtHyperParams` (FT-L), :class:`FtWHyperParams`; z's own knobs are :class:`memit_lab.zopt.ZParams`) and
one table, :data:`MODEL_DEFAULTS`, of the settings measured per model -- the only place defaults live.
``Params.for_model(lm)`` gives the measured ones, else the paper's settings with the layers
scaled from GPT-J (:func:`default_layers`). A model without measured defaults gets better layers
from causal tracing: :func:`memit_lab.layer_choice.default_hparams` (what the method registry,
the CLI and the experiments use).

Example:
    >>> MemitHyperParams(layers=(3, 4)).replace(lam=100.0).lam
    100.0
    >>> RomeHyperParams(layer=-1)
    Traceback (most recent call last):
    ...
    ValueError: layer must be a layer index (>= 0), got -1
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from .models import LoadedModel
from .stats import DEFAULT_N_TOKENS
from .zopt import ZParams

__all__ = [
    "FT_W_DECAY_LAW",
    "MODEL_DEFAULTS",
    "AlphaEditHyperParams",
    "FtHyperParams",
    "FtWHyperParams",
    "MemitHyperParams",
    "RomeHyperParams",
    "default_layers",
]


def default_layers(n_layers: int) -> tuple[int, ...]:
    """A first guess for R without causal tracing: the paper's GPT-J range 3-8 of 28 layers, scaled.

    Better: :func:`memit_lab.layer_choice.recommend_layers`.

    Example:
        >>> default_layers(28), default_layers(3)
        ((3, 4, 5, 6, 7, 8), (0, 1))
    """
    lo, hi = round(0.1 * n_layers), max(round(0.28 * n_layers), 1)
    return tuple(range(min(lo, hi), hi + 1))


_H = TypeVar("_H", bound="_HyperParams")


class _HyperParams:
    """What every method's hyper-parameters share: a registry name, ``replace`` and the measured defaults."""

    method: ClassVar[str]

    def replace(self: _H, **changes: Any) -> _H:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]  # every subclass is a dataclass

    @classmethod
    def measured(cls: type[_H], lm: LoadedModel) -> _H | None:
        """The settings measured for ``lm`` (:data:`MODEL_DEFAULTS`), ``None`` when it has none."""
        found = MODEL_DEFAULTS.get(lm.name, {}).get(cls.method)
        return found if isinstance(found, cls) else None


@dataclass(frozen=True)
class MemitHyperParams(_HyperParams):
    """Everything MEMIT's result depends on besides the model and the requests.

    Attributes:
        layers: R, ascending; z lives at L = max(R).
        lam: lambda of eq. 15 (C0 = lam * E[k k^T]); larger keeps old memories better, writes new ones less.
        z: the z optimisation's parameters (:class:`memit_lab.zopt.ZParams`).
        stats_tokens: tokens of generic text for E[k k^T] (:func:`memit_lab.stats.key_second_moment`).
        key_batch: prompts per forward pass when reading keys and hidden states.
    """

    method: ClassVar[str] = "memit"
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
        """Measured defaults for ``lm`` (:data:`MODEL_DEFAULTS`), else the paper's GPT-J settings with
        :func:`default_layers`. For R from causal tracing use :func:`memit_lab.layer_choice.default_hparams`.

        Example:
            >>> from memit_lab import load_model
            >>> MemitHyperParams.for_model(load_model("tiny-gpt2")).layers
            (0, 1)
        """
        return cls.measured(lm) or cls(default_layers(lm.n_layers))


@dataclass(frozen=True)
class RomeHyperParams(_HyperParams):
    """Everything ROME's result depends on besides the model and the requests.

    Attributes:
        layer: l, the one layer whose W_out is edited.
        z: the optimisation of delta (eq. 16; :class:`memit_lab.zopt.ZParams`). The paper's code
            for ROME: 20 steps, lr 0.5, weight decay 0.5, KL weight 0.0625, clamp 4 x ||m^l||.
        stats_tokens: tokens of generic text for C = E[k k^T] (:func:`memit_lab.stats.key_second_moment`).
        key_batch: prompts per forward pass when reading keys.
    """

    method: ClassVar[str] = "rome-seq"
    layer: int
    z: ZParams = field(default_factory=lambda: ZParams(steps=20, clamp=4.0, n_contexts=10, stop="loss"))
    stats_tokens: int = DEFAULT_N_TOKENS
    key_batch: int = 64

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be a layer index (>= 0), got {self.layer}")

    @classmethod
    def for_model(cls, lm: LoadedModel) -> RomeHyperParams:
        """Measured defaults for the bundled model (:data:`MODEL_DEFAULTS`), else the middle of
        :func:`default_layers` (the paper: GPT-J layer 5 of MEMIT's 3-8)."""
        layers = default_layers(lm.n_layers)
        return cls.measured(lm) or cls(layer=layers[len(layers) // 2])


def _check_fine_tuning(hp: FtHyperParams | FtWHyperParams) -> None:
    """What FT-L and FT-W both need: a layer, at least one pass and one request per batch, a positive learning rate."""
    if hp.layer < 0 or hp.steps < 1 or hp.batch < 1:
        raise ValueError(f"layer must be >= 0, steps and batch >= 1: {hp}")
    if not (math.isfinite(hp.lr) and hp.lr > 0):
        raise ValueError(f"lr must be a positive number, got {hp.lr}")


@dataclass(frozen=True)
class FtHyperParams(_HyperParams):
    """Everything FT-L's result depends on besides the model and the requests (W_out of one layer, L-inf box).

    Registry name ``"ft-l"`` (``"ft"`` is its old alias). FT-W, all weights of one block, is :class:`FtWHyperParams`.

    Attributes:
        layer: l, the layer whose W_out is fine-tuned.
        steps: Adam steps at most.
        lr: Adam learning rate.
        norm_constraint: eps of ||W - W_0||_inf <= eps (per entry); ``None`` for none.
        weight_decay: Adam's (L2) weight decay; 0 for none.
        stop_loss: stop when the mean loss falls below this.
        batch: requests per forward/backward pass (the gradient of a step sums over all of them).
    """

    method: ClassVar[str] = "ft-l"
    layer: int
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float | None = 5e-4
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    batch: int = 64

    def __post_init__(self) -> None:
        _check_fine_tuning(self)
        if self.norm_constraint is not None and not self.norm_constraint > 0:
            raise ValueError(f"norm_constraint must be positive (or None for none), got {self.norm_constraint}")

    @classmethod
    def for_model(cls, lm: LoadedModel) -> FtHyperParams:
        """Measured defaults for the bundled model (:data:`MODEL_DEFAULTS`), else the middle of
        :func:`default_layers` with the ROME paper's GPT-2 XL settings."""
        layers = default_layers(lm.n_layers)
        return cls.measured(lm) or cls(layer=layers[len(layers) // 2])


#: The MEMIT paper's FT-W weight decay for n edits: n ** a * exp(b), fitted by its authors for GPT-J (the reference's
#: ``wd_power_law`` in ``hparams/FT/EleutherAI_gpt-j-6B_wd.json``): 1.17 for one edit, 0.071 for 25, 0.021 for 100.
FT_W_DECAY_LAW = (-0.87028798, 0.15589562)


@dataclass(frozen=True)
class FtWHyperParams(_HyperParams):
    """Everything FT-W's result depends on besides the model and the requests (every weight of one block).

    The MEMIT paper's settings (its code's ``EleutherAI_gpt-j-6B_wd.json``): 25 passes, Adam lr 5e-4 with (L2)
    weight decay from :data:`FT_W_DECAY_LAW`, no norm constraint, batches of 64 with a step after each.

    Attributes:
        layer: l, the block whose parameters (attention, MLP and norms) are fine-tuned.
        steps: passes over the requests at most (one Adam step per batch in each).
        lr: Adam learning rate.
        weight_decay: Adam's L2 weight decay (added to the gradient, as ``torch.optim.Adam`` does); ``None``:
            ``n ** a * exp(b)`` with ``(a, b) = decay_law`` for n edits.
        decay_law: (a, b) of the weight decay's power law in the number of edits.
        loss_at: ``"last"``: every token of the new object scored at the prompt's last position (the reference);
            ``"object"``: teacher forcing over the object's tokens (the same for one-token objects).
        stop_loss: a batch whose mean loss is below this takes no step; a pass whose mean is below it ends.
        batch: requests per forward/backward pass and Adam step.
    """

    method: ClassVar[str] = "ft-w"
    layer: int
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float | None = None
    decay_law: tuple[float, float] = FT_W_DECAY_LAW
    loss_at: str = "last"
    stop_loss: float = 1e-2
    batch: int = 64

    def __post_init__(self) -> None:
        _check_fine_tuning(self)
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0 (or None for the power law), got {self.weight_decay}")
        if len(self.decay_law) != 2 or not all(math.isfinite(x) for x in self.decay_law):
            raise ValueError(f"decay_law must be two finite numbers (a, b) of n ** a * exp(b), got {self.decay_law}")
        if self.loss_at not in ("last", "object"):
            raise ValueError(f"loss_at must be 'last' or 'object' (teacher forcing): {self.loss_at!r}")

    def decay_for(self, n_edits: int) -> float:
        """The weight decay used for ``n_edits`` edits.

        Example:
            >>> round(FtWHyperParams(layer=0).decay_for(100), 4), FtWHyperParams(layer=0, weight_decay=0.1).decay_for(7)
            (0.0212, 0.1)
        """
        if self.weight_decay is not None:
            return self.weight_decay
        a, b = self.decay_law
        return n_edits**a * math.exp(b)

    @classmethod
    def for_model(cls, lm: LoadedModel) -> FtWHyperParams:
        """Measured defaults for the bundled model (:data:`MODEL_DEFAULTS`), else the paper's GPT-J layer 21 of
        28, scaled to the model's depth."""
        return cls.measured(lm) or cls(layer=min(lm.n_layers - 1, round(21 / 28 * lm.n_layers)))


@dataclass(frozen=True)
class AlphaEditHyperParams(_HyperParams):
    """Everything AlphaEdit's result depends on besides the model and the requests (:mod:`memit_lab.alphaedit`).

    Attributes:
        layers: R, ascending; z lives at L = max(R) (as MEMIT).
        alpha: weight of ||Delta P||^2 in the projected least squares (the reference's ``L2``, 10 for GPT-2 XL,
            GPT-J and Llama3-8B); it replaces MEMIT's lambda, since P already keeps the old keys.
        threshold: eigenvalues of E[k k^T] below it span the null space P projects onto (the reference's
            ``nullspace_threshold``, 2e-2 for its models; it depends on the scale of the keys, so measure it for
            yours: :data:`MODEL_DEFAULTS` holds the bundled model's).
        z: the z optimisation's parameters (:class:`memit_lab.zopt.ZParams`).
        stats_tokens: tokens of generic text for E[k k^T] (:func:`memit_lab.stats.key_second_moment`).
        key_batch: prompts per forward pass when reading keys and hidden states.
    """

    method: ClassVar[str] = "alphaedit"
    layers: tuple[int, ...]
    alpha: float = 10.0
    threshold: float = 2e-2
    z: ZParams = field(default_factory=ZParams)
    stats_tokens: int = DEFAULT_N_TOKENS
    key_batch: int = 64

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be a non-empty ascending tuple without repeats, got {self.layers}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be a positive eigenvalue bound, got {self.threshold}")

    @classmethod
    def for_model(cls, lm: LoadedModel) -> AlphaEditHyperParams:
        """Measured defaults for ``lm`` (:data:`MODEL_DEFAULTS`), else the reference's settings with
        :func:`default_layers`."""
        return cls.measured(lm) or cls(default_layers(lm.n_layers))


# --- the measured defaults, per model and method ------------------------------------------------------------------

#: MEMIT on the bundled model: R = 0-4, causal tracing's recommendation (notebook 02: restoring the MLP outputs of
#: layers 0-4 together at the last subject token brings back 0.448 of P(target) on average, those of 3-7 0.119;
#: L = 4 keeps z well below where attention starts moving the fact, ~14). lambda = 1,500, not the paper's 15,000:
#: for a key typical of the statistics' text (E[k^T C^-1 k] = d_mlp) eq. 14 writes about d_mlp / (lambda + d_mlp)
#: of the residual at one layer (notebook 03), 52% for GPT-J's d_mlp = 16,384 at 15,000 but 9% for this model's
#: 1,536, so lambda's scale should follow d_mlp. Subject keys are not typical (the Eiffel Tower's at layer 4:
#: k^T C^-1 k = 9,314, ~6 d_mlp, so 38% written at 15,000 and 86% at 1,500): the argument sets the scale, the
#: value comes from the measurement below. The z settings are the paper's GPT-J values.
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
_SMOLLM_MEMIT = MemitHyperParams(layers=(0, 1, 2, 3, 4), lam=1_500.0)

#: ROME on the bundled model: layer 4, the centre of the MLP causal-tracing peak (layers 0-8,
#: shared/docs/bundled-model.md) and inside MEMIT's range 3-7. Clamp: the reference's 4 x ||m^l|| expressed
#: relative to ||h^l|| -- at layer 4, at the subject's last token of the first 50 fact-set edit prompts,
#: ||m^4|| / ||h^4|| is 0.30 on average (median 0.33; layer 3: 0.30), so 4 x ||m|| ~ 1.2 x ||h||.
# ROME keeps the reference's loss stopping until plateau stopping is measured for its v* (bench: MEMIT only).
_SMOLLM_ROME = RomeHyperParams(layer=4, z=ZParams(steps=20, clamp=1.2, n_contexts=10, stop="loss"))

#: FT-L on the bundled model: the same layer as ROME (4, the MLP causal-tracing peak). eps and lr 5e-3, ten
#: times the ROME paper's code: its 5e-4 is ~0.3% of this layer's W_out entry std (0.18) and, measured on 16 known
#: facts of the fact set (CounterFact %, unedited S 0 / ES 0 / PS 3.1 / NS 88.8), writes nothing: ES 0. By eps (= lr):
#: 2e-3 -> ES 12.5, PS 12.5, NS 82.5; 5e-3 -> ES 81.2, PS 31.2, NS 76.2; 2e-2 (lr 5e-3) -> ES 93.8, PS 71.9, NS 60.0;
#: no box (lr 5e-4) -> ES 81.2, PS 56.2, NS 60.0. At 5e-3 the box still binds: most facts are written on their own
#: prompt, few carry over to paraphrases, and neighbours pay -- the constrained fine-tuning baseline of the paper.
_SMOLLM_FT = FtHyperParams(layer=4, steps=25, lr=5e-3, norm_constraint=5e-3)

#: FT-W on the bundled model: the reference's settings (lr 5e-4, weight decay by FT_W_DECAY_LAW), block 22 (GPT-J's
#: 21 of 28 scaled). Measured on 30 known facts (CounterFact %; unedited S 0.0, ES 0.0, PS 1.7, NS 89.3), S / ES / PS
#: / NS by block: 4 33.1/36.7/20.0/74.7; 10 49.4/56.7/40.0/55.3; 16 41.3/36.7/35.0/59.3; 22 50.1/56.7/56.7/40.7;
#: 28 40.5/36.7/36.7/51.3 (FT-L 37.0/53.3/20.0/81.3). Blocks 10 and 22 tie on S (one fact is 3.3 points); lr 2e-3
#: writes more (ES 90-97) and wrecks the neighbours (NS 17-32). Not yet measured: other lr, loss_at="object", 100 edits.
_SMOLLM_FT_W = FtWHyperParams(layer=22)

#: AlphaEdit on the bundled model: MEMIT's R = 0-4 and z settings, the reference's alpha = 10, threshold 5e-3 (not
#: the reference's 2e-2). E[k k^T] of layers 0-4 (20,000 tokens) has no gap in its spectrum: eigenvalues fall smoothly
#: from 0.3-114 to 5e-4-2e-3, so the threshold trades what P protects against what it lets through
#: (:func:`memit_lab.alphaedit.null_space_report`; per layer 0-4, share of the corpus keys' energy left in the null
#: space / share of the edit keys' energy, 50 known facts):
#:
#:   2e-2: null dims 1188-1388 of 1,536, corpus 14 / 36 / 7 / 58 / 49 %, edit keys 40 / 77 / 72 / 77 / 73 %
#:   1e-2:            843-1183,          corpus  7 / 22 / 4 / 30 / 22 %, edit keys 27 / 62 / 54 / 54 / 45 %
#:   5e-3:            345-837,           corpus  4 / 11 / 1 / 10 /  6 %, edit keys 18 / 41 / 29 / 27 / 17 %
#:   3e-3:             57-571,           corpus  2 /  5 / 0 /  3 /  1 %, edit keys 12 / 25 / 13 / 10 /  3 %
#:
#: 2e-2 leaves half of the old keys' energy at layers 3-4 unprotected: not a null space. Editing those 50 facts at
#: once (one z for all, CounterFact %; unedited ES 0, PS 1, NS 90.0, held-out perplexity 18.67; MEMIT S 89.9, ES 94,
#: PS 95, NS 82.0, perplexity 19.12): 2e-2 S 89.9 ES 94 PS 95 NS 82.0 ppl 19.16; 1e-2 S 89.0 ES 94 PS 92 NS 82.0
#: ppl 19.06; 5e-3 S 87.6 ES 92 PS 88 NS 83.2 ppl 19.01; 3e-3 S 73.9 ES 72 PS 66 NS 86.4 ppl 18.85 (residual left
#: at L 0.73: layer 4 keeps 57 directions and the edits no longer land). 5e-3 is the smallest threshold at which
#: the edits still land (ES >= 90) and keeps 89-99 % of the corpus keys' energy out of reach.
_SMOLLM_ALPHAEDIT = AlphaEditHyperParams(layers=(0, 1, 2, 3, 4), threshold=5e-3)

#: Measured defaults: model name -> method name (as in :mod:`memit_lab.methods`) -> hyper-parameters.
MODEL_DEFAULTS: dict[str, dict[str, _HyperParams]] = {
    "smollm2-135m": {
        "memit": _SMOLLM_MEMIT,
        "rome-seq": _SMOLLM_ROME,
        "ft-l": _SMOLLM_FT,
        "ft-w": _SMOLLM_FT_W,
        "alphaedit": _SMOLLM_ALPHAEDIT,
    },
}
