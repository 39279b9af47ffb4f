"""Where to edit: MEMIT's layer range R, chosen from causal tracing (MEMIT section 3, figure 2).

MEMIT writes a fact into the MLPs of a few consecutive layers R, the ones that mediate the
recall of the subject's facts. Causal tracing measures them: restoring the MLP outputs of a
window of layers at the *last subject token* of a corrupted prompt brings back the answer
most where those MLPs carry it (:func:`memit_lab.tracing.trace` with ``kind="mlp"``).
:func:`recommend_layers` averages that evidence over facts the model knows and picks the
strongest full window; the result is cached on disk, so a model is traced once.

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.facts import KNOWN_FACTS
    >>> rec = recommend_layers(load_model("tiny-gpt2"), KNOWN_FACTS[:2], n=2, samples=1, use_cache=False)
    >>> len(rec.layers), rec.criterion.startswith("R = the n consecutive layers")
    (2, True)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from .cache import cache_root
from .facts import KNOWN_FACTS
from .hooks import TraceDict
from .hparams import MemitHyperParams, default_layers
from .models import LoadedModel
from .prompts import subject_token_span
from .residual import resolve_target
from .tracing import FactLike, cached_json, check_facts, check_trace_settings, embedding_noise, restored_window, trace

__all__ = [
    "LayerRecommendation",
    "NoTraceableFactsError",
    "first_mlp_share",
    "memit_defaults",
    "recommend_layers",
    "traced_memit_hparams",
]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRecommendation:
    """MEMIT's edit layers R, chosen from causal tracing, with the evidence.

    Attributes:
        layers: the recommended R, ``n`` consecutive layers (MEMIT writes z at ``max(R)``).
        effect: ``[layer]`` the average indirect effect, at the last subject token, of
            restoring the MLP outputs of the ``n`` layers centred on each layer.
        per_fact: ``[fact, layer]`` the same for each fact.
        n, samples, noise, seed: the settings; ``criterion``: the rule in words.

    Its picture: :func:`memit_lab.tracing_plots.plot_recommendation`.
    """

    layers: tuple[int, ...]
    effect: Float[torch.Tensor, " layer"]
    per_fact: Float[torch.Tensor, "fact layer"]
    n: int
    samples: int
    noise: float
    seed: int
    criterion: str = (
        "R = the n consecutive layers whose MLP outputs, restored together at the last subject token, bring back "
        "the most of P(target) on average (largest average indirect effect among the full windows of n layers)"
    )

    def to_frame(self) -> pd.DataFrame:
        """One row per centre layer: the window it stands for and its average indirect effect."""
        n_layers = self.effect.shape[0]
        windows = [restored_window(c, self.n, n_layers) for c in range(n_layers)]
        return pd.DataFrame(
            {
                "centre": range(n_layers),
                "window": [f"{w[0]}-{w[-1]}" for w in windows],
                "full_window": [len(w) == self.n for w in windows],
                "effect": self.effect.numpy(),
                "std_error": (self.per_fact.std(0) / math.sqrt(self.per_fact.shape[0])).numpy(),
                "chosen": [tuple(w) == self.layers for w in windows],
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "effect": self.effect.tolist(),
            "per_fact": self.per_fact.tolist(),
            "n": self.n,
            "samples": self.samples,
            "noise": self.noise,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRecommendation:
        return cls(
            layers=tuple(data["layers"]),
            effect=torch.tensor(data["effect"], dtype=torch.float64),
            per_fact=torch.tensor(data["per_fact"], dtype=torch.float64),
            n=data["n"],
            samples=data["samples"],
            noise=data["noise"],
            seed=data["seed"],
        )


def _best_window(effect: Float[torch.Tensor, " layer"], n: int) -> tuple[int, ...]:
    """The full window of ``n`` layers with the largest effect (ties: the lowest).

    Example:
        >>> _best_window(torch.tensor([0.1, 0.5, 0.4, 0.9]), 2)
        (2, 3)
    """
    n_layers = effect.shape[0]
    centres = [c for c in range(n_layers) if len(restored_window(c, n, n_layers)) == n]
    best = max(centres, key=lambda c: (float(effect[c]), -c))
    return tuple(restored_window(best, n, n_layers))


class NoTraceableFactsError(ValueError):
    """None of the default facts' objects is a token of this model's vocabulary, so none can be traced."""


def _default_facts(lm: LoadedModel) -> tuple[FactLike, ...]:
    """Every fourth fact of :data:`memit_lab.facts.KNOWN_FACTS` whose object starts with a token of its own here."""
    usable = []
    for fact in KNOWN_FACTS[::4]:
        try:
            resolve_target(lm, fact.prompt, fact.target)
        except ValueError:
            continue  # e.g. a tiny test vocabulary that spells " Paris" letter by letter
        usable.append(fact)
    if not usable:
        raise NoTraceableFactsError(
            f"no default fact's object is a token of {lm.name}'s vocabulary; pass facts=[...] that the model knows"
        )
    return tuple(usable)


def recommend_layers(
    lm: LoadedModel,
    facts: Sequence[FactLike] | None = None,
    n: int = 5,
    *,
    samples: int = 5,
    noise: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = False,
) -> LayerRecommendation:
    """Choose MEMIT's edit layers R from where the MLPs at the last subject token carry the facts.

    Criterion: for every centre layer c, restore the MLP outputs of the ``n`` layers
    centred on c (ROME's window, ``n // 2`` below c) at the last subject token, and average
    the indirect effect over ``facts``; R is the full window with the largest average
    (MEMIT section 3: the MLPs that mediate the recall of the subject's facts). The result
    is cached on disk per model fingerprint, facts and settings.

    Args:
        facts: facts the model knows (default: every fourth of :data:`memit_lab.facts.KNOWN_FACTS`,
            those whose object is a token of the model's vocabulary).
        n: how many layers R holds (MEMIT: 5-6).
        samples, noise, seed: as in :func:`memit_lab.tracing.trace`.
        use_cache: read and write the on-disk cache.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> lm = load_model("tiny-gpt2")
        >>> rec = recommend_layers(lm, KNOWN_FACTS[:3], n=2, samples=2, use_cache=False)
        >>> len(rec.layers), rec.layers in [(0, 1), (1, 2)]
        (2, True)
    """
    if not isinstance(n, int) or not 1 <= n <= lm.n_layers:
        raise ValueError(
            f"n={n!r} layers do not fit a model of {lm.n_layers} layers; pass n between 1 and {lm.n_layers}"
        )
    check_trace_settings(samples, noise, None, "mlp")
    chosen = _default_facts(lm) if facts is None else check_facts(facts)
    scale = embedding_noise(lm, use_cache=use_cache) if noise is None else float(noise)
    if not use_cache:
        return _recommend(lm, chosen, n, samples, scale, seed, progress)
    key = {
        "model": lm.fingerprint(),
        "facts": [[f.prompt, f.subject, f.target] for f in chosen],
        "n": n,
        "samples": samples,
        "noise": scale,
        "seed": seed,
    }
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    folder = cache_root() / "tracing" / f"layers-{digest}"
    data = cached_json(
        folder, "recommendation.json", lambda: _recommend(lm, chosen, n, samples, scale, seed, progress).to_json(),
        {"key": key},
    )  # fmt: skip
    return LayerRecommendation.from_json(data)


def _recommend(
    lm: LoadedModel, facts: Sequence[FactLike], n: int, samples: int, noise: float, seed: int, progress: bool
) -> LayerRecommendation:
    """Trace each fact's MLPs at its last subject token only, and pick the best window of the mean."""
    columns = []
    for fact in tqdm(facts, desc="tracing MLPs", disable=not progress):
        last = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)[1] - 1
        result = trace(
            lm, fact.prompt, fact.subject, fact.target, kind="mlp", window=n, noise=noise, samples=samples,
            seed=seed, positions=[last],
        )  # fmt: skip
        columns.append(result.indirect_effect[:, last])
    per_fact = torch.stack(columns)
    effect = per_fact.mean(0)
    return LayerRecommendation(_best_window(effect, n), effect, per_fact, n, samples, noise, seed)


# --- the layer-0 confound ----------------------------------------------------------------------------------------


def first_mlp_share(lm: LoadedModel, facts: Sequence[FactLike]) -> pd.DataFrame:
    """How much of block 0's output at each fact's last subject token is MLP 0's output (clean run).

    Where ``|m^0| >> |embedding|`` and ``cos(m^0, h^1) ~ 1`` (h^1: block 0's output, eq. 2), block 0
    writes the token's state almost entirely through MLP 0: restoring MLP 0's output at a
    corrupted token then restores that token's own state, i.e. undoes the corruption, whatever
    the later layers do with it. A window of MLPs holding layer 0 can score high in a trace for
    that reason alone (the layer-0 confound), so its score does not locate recall.

    Returns:
        one row per fact: ``token``, ``mlp0_over_embedding`` (``|m^0| / |e|``) and
        ``cos_mlp0_block0`` (cosine of m^0 and h^1), at the last subject token.

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> list(first_mlp_share(load_model("tiny-llama"), KNOWN_FACTS[:2]).columns)
        ['prompt', 'token', 'mlp0_over_embedding', 'cos_mlp0_block0']
    """
    a = lm.adapter
    names = [a.embed, a.mlp_module(0), a.block(0)]
    rows = []
    for fact in check_facts(facts):
        ids = lm.tokenizer(fact.prompt, return_tensors="pt").input_ids.to(lm.device)
        last = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)[1] - 1
        with torch.no_grad(), TraceDict(lm.model, names) as seen:
            lm.model(ids)
        embedding, mlp, block = (_output(seen[name].output)[0, last].double() for name in names)
        rows.append(
            {
                "prompt": fact.prompt,
                "token": lm.tokenizer.decode(ids[0, last]),
                "mlp0_over_embedding": float(mlp.norm() / embedding.norm()),
                "cos_mlp0_block0": float(torch.cosine_similarity(mlp, block, dim=0)),
            }
        )
    return pd.DataFrame(rows)


def _output(recorded: torch.Tensor | None) -> torch.Tensor:
    if recorded is None:  # only where the forward pass never reached the module
        raise RuntimeError("the forward pass did not run a module first_mlp_share reads")
    return recorded


# --- the defaults of a model without measured ones ---------------------------------------------------------------


def traced_memit_hparams(lm: LoadedModel, n: int = 5, **tracing: Any) -> MemitHyperParams:
    """MEMIT's hyper-parameters with R chosen by causal tracing on ``lm`` (:func:`recommend_layers`, cached on
    disk), the rest the paper's GPT-J settings. ``tracing`` goes to ``recommend_layers`` (facts, samples, seed...).

    Example:
        >>> from memit_lab import load_model
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> lm = load_model("tiny-gpt2")
        >>> len(traced_memit_hparams(lm, n=2, facts=KNOWN_FACTS[:3], samples=2, use_cache=False).layers)
        2
    """
    return MemitHyperParams(tuple(recommend_layers(lm, n=n, **tracing).layers))


def memit_defaults(lm: LoadedModel) -> MemitHyperParams:
    """MEMIT's defaults for ``lm``: the measured ones (:data:`memit_lab.hparams.MODEL_DEFAULTS`), else R from
    causal tracing with as many layers as :func:`memit_lab.hparams.default_layers` gives (traced once, then read
    from the disk cache), else -- a vocabulary in which none of the tracing facts' objects is one token, as in the
    tiny test tokenizers -- :func:`memit_lab.hparams.default_layers`, with a warning in the log.
    """
    measured = MemitHyperParams.measured(lm)
    if measured is not None:
        return measured
    guess = default_layers(lm.n_layers)
    try:
        return traced_memit_hparams(lm, n=len(guess))
    except NoTraceableFactsError as err:
        log.warning("%s; using the paper's range scaled to %d layers, %s", err, lm.n_layers, guess)
        return MemitHyperParams(guess)
