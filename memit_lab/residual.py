"""The residual stream (paper eq. 2-6), the logit lens and direct logit attribution.

Every block of a decoder-only transformer *adds* its attention output and its MLP
output to one running vector per token, the residual stream (eq. 2)::

    h^{l+1} = h^l + a_l + m_l

In sequential blocks (GPT-2, Llama, Qwen2) the MLP reads ``h^l + a_l``; in parallel
blocks (GPT-J, NeoX) attention and MLP both read ``h^l``. Either way the block adds
the two outputs, so unrolling eq. 2 gives eq. 6: the state after ``L`` blocks is
exactly ::

    h^L = h^0 + sum_{l<L} a_l + sum_{l<L} m_l

where ``h^0`` is the embedding (the token embedding, plus the learned position
embedding in GPT-2). Blocks are counted from 0, as in the code: block ``l`` writes
``attn_l`` and ``mlp_l`` (the paper, counting from 1, calls them a^{l+1}, m^{l+1});
``h^L`` means "after L blocks" in both.

Activations are cached under TransformerLens-style names:

==========================  ===========================================
``embed``                   token embedding  ``[pos, d_model]``
``pos_embed``               position embedding (only where the model has one)
``blocks.{l}.resid_pre``    h^l, the input of block l
``blocks.{l}.attn_out``     a_l, the attention output (eq. 3)
``blocks.{l}.mlp_out``      m_l, the MLP output (eq. 4)
``blocks.{l}.resid_post``   h^{l+1}, the output of block l
==========================  ===========================================

The logit lens reads any ``h^L`` as if it were the last one: the final norm, then
the unembedding. Direct logit attribution splits the final logit of one token into
one term per component; the final norm is not linear, so its scale is frozen at its
value in the full run (see :class:`FrozenNorm`). All of it works on one prompt.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gptj")
    >>> cache = run_with_cache(lm, "The Eiffel Tower is located in the city of")
    >>> stack = decompose_resid(cache, layer=2, pos=-1)
    >>> stack.labels
    ('embed', 'attn_0', 'mlp_0', 'attn_1', 'mlp_1')
    >>> bool(torch.allclose(stack.sum(), cache.resid(2)[-1], atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
from jaxtyping import Float, Int

from .hooks import TraceDict
from .models import LoadedModel
from .prompts import check_prompt, continuation, target_positions

__all__ = [
    "FrozenNorm",
    "LogitAttribution",
    "LogitLens",
    "ResidCache",
    "ResidStack",
    "accumulated_resid",
    "decompose_resid",
    "direct_logit_attribution",
    "freeze_final_norm",
    "lens_logits",
    "logit_lens",
    "reconstruction_error",
    "resolve_target",
    "run_with_cache",
]


def _check_pos(pos: int, n_pos: int) -> int:
    """``pos`` as a non-negative index; negative positions count from the end, as in Python."""
    if not -n_pos <= pos < n_pos:
        raise IndexError(
            f"position {pos} is out of range for a {n_pos}-token prompt; use 0..{n_pos - 1} (or -1 for the last)"
        )
    return pos % n_pos


# -- the cache -----------------------------------------------------------------------


@dataclass(frozen=True)
class ResidCache:
    """The activations of one forward pass on one prompt, by name (see the module docstring).

    Attributes:
        prompt: the prompt that was run.
        tokens: each position's token as text (``" Paris"``), special tokens included.
        activations: ``[pos, d_model]`` tensors by name.
        logits: the model's own output logits ``[pos, d_vocab]``.
        n_layers: number of blocks.
    """

    prompt: str
    tokens: tuple[str, ...]
    activations: dict[str, Float[torch.Tensor, "pos d_model"]]
    logits: Float[torch.Tensor, "pos d_vocab"]
    n_layers: int

    def __getitem__(self, name: str) -> Float[torch.Tensor, "pos d_model"]:
        if name not in self.activations:
            raise KeyError(f"no activation {name!r}; names are 'embed', 'blocks.0.resid_pre', 'blocks.0.attn_out', ...")
        return self.activations[name]

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def check_layer(self, layer: int) -> int:
        """Refuse a residual-stream layer outside ``0..n_layers`` (``n_layers`` = the final state)."""
        if not 0 <= layer <= self.n_layers:
            raise IndexError(
                f"layer {layer} is out of range: the residual stream h^L exists for L = 0 (embedding) "
                f"to {self.n_layers} (after the last block)"
            )
        return layer

    def check_pos(self, pos: int) -> int:
        """``pos`` as a non-negative index into this prompt's tokens."""
        return _check_pos(pos, self.n_pos)

    def resid(self, layer: int) -> Float[torch.Tensor, "pos d_model"]:
        """h^layer: the residual stream after ``layer`` blocks (0: the embedding; n_layers: the final norm's input)."""
        self.check_layer(layer)
        if layer < self.n_layers:
            return self[f"blocks.{layer}.resid_pre"]
        return self[f"blocks.{layer - 1}.resid_post"]


@torch.no_grad()
def run_with_cache(lm: LoadedModel, prompt: str) -> ResidCache:
    """Run ``prompt`` once and cache embedding, block inputs, attention and MLP outputs and block outputs.

    The attention and MLP outputs are read where the modules return them, before the
    block adds them to the stream, so they are a_l and m_l for sequential and parallel
    blocks alike.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> cache = run_with_cache(lm, "The capital of France is")
        >>> cache.tokens
        ('The', ' capital', ' of', ' France', ' is')
        >>> sorted(cache.activations)[:4]
        ['blocks.0.attn_out', 'blocks.0.mlp_out', 'blocks.0.resid_post', 'blocks.0.resid_pre']
    """
    check_prompt(prompt)
    a = lm.adapter
    modules = {"embed": a.embed} | ({"pos_embed": a.pos_embed} if a.pos_embed is not None else {})
    for layer in range(lm.n_layers):
        modules[f"blocks.{layer}.attn_out"] = a.attn_module(layer)
        modules[f"blocks.{layer}.mlp_out"] = a.mlp_module(layer)
    blocks = [a.block(layer) for layer in range(lm.n_layers)]
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    with TraceDict(lm.model, [*modules.values(), *blocks], retain_input=True) as td:
        logits = lm.model(**enc).logits[0].float()
    activations = {name: _output(td, module) for name, module in modules.items()}
    for layer, block in enumerate(blocks):
        activations[f"blocks.{layer}.resid_pre"] = _input(td, block)
        activations[f"blocks.{layer}.resid_post"] = _output(td, block)
    ids = enc.input_ids[0].tolist()
    tokens = tuple(lm.tokenizer.decode([i]) for i in ids)
    return ResidCache(prompt, tokens, activations, logits, lm.n_layers)


def _output(td: TraceDict, name: str) -> torch.Tensor:
    out = td[name].output
    if out is None:
        raise RuntimeError(f"module {name} did not run; is the adapter entry right?")
    return out[0]


def _input(td: TraceDict, name: str) -> torch.Tensor:
    x = td[name].input
    if x is None:
        raise RuntimeError(f"block {name} received no hidden state; is the adapter entry right?")
    return x[0]


# -- eq. 6: decomposition ----------------------------------------------------------------


@dataclass(frozen=True)
class ResidStack:
    """Labelled vectors of the residual stream: components (they add up) or states h^0..h^L.

    Attributes:
        labels: one per vector: ``embed``, ``pos_embed``, ``attn_l``, ``mlp_l`` for
            components; ``h0``, ``h1``, ... for accumulated states.
        vectors: ``[component, pos, d_model]``, or ``[component, d_model]`` at one position.
    """

    labels: tuple[str, ...]
    vectors: Float[torch.Tensor, "component *pos d_model"]

    def sum(self) -> Float[torch.Tensor, "*pos d_model"]:
        """The sum of the vectors (for components: the residual stream, eq. 6)."""
        return self.vectors.sum(0)

    def to_frame(self) -> pd.DataFrame:
        """One row per vector (and position): its label and Euclidean norm."""
        norms = self.vectors.norm(dim=-1).float().cpu()
        if norms.ndim == 1:
            return pd.DataFrame({"label": self.labels, "norm": norms.numpy()})
        n_pos = norms.shape[1]
        return pd.DataFrame(
            {
                "label": [label for label in self.labels for _ in range(n_pos)],
                "pos": list(range(n_pos)) * len(self.labels),
                "norm": norms.flatten().numpy(),
            }
        )


def _component_names(cache: ResidCache, layer: int) -> dict[str, str]:
    """Component label -> cached activation name, in the order the model adds them (up to h^layer)."""
    names = {"embed": "embed"} | ({"pos_embed": "pos_embed"} if "pos_embed" in cache.activations else {})
    for block in range(cache.check_layer(layer)):
        names[f"attn_{block}"] = f"blocks.{block}.attn_out"
        names[f"mlp_{block}"] = f"blocks.{block}.mlp_out"
    return names


def decompose_resid(cache: ResidCache, layer: int | None = None, pos: int | None = None) -> ResidStack:
    """The components [embed, (pos_embed,) attn_0, mlp_0, ..., mlp_{L-1}] whose sum is h^L (eq. 6).

    Args:
        cache: from :func:`run_with_cache`.
        layer: L in ``0..n_layers``; ``None`` means ``n_layers`` (the final residual).
        pos: one position (negative counts from the end); ``None`` keeps all.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> cache = run_with_cache(lm, "The capital of France is")
        >>> decompose_resid(cache, layer=1).labels
        ('embed', 'pos_embed', 'attn_0', 'mlp_0')
    """
    names = _component_names(cache, cache.n_layers if layer is None else layer)
    vectors = torch.stack([cache[name] for name in names.values()])
    if pos is not None:
        vectors = vectors[:, cache.check_pos(pos)]
    return ResidStack(tuple(names), vectors)


def accumulated_resid(cache: ResidCache, layer: int | None = None, pos: int | None = None) -> ResidStack:
    """The states h^0, h^1, ..., h^L as the model computed them (labels ``h0`` .. ``hL``).

    ``h^L`` is the running sum of :func:`decompose_resid`'s components; these are the
    cached block inputs (and the last block's output), measured, not summed.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> cache = run_with_cache(lm, "The capital of France is")
        >>> s = accumulated_resid(cache, pos=-1)
        >>> s.labels, tuple(s.vectors.shape)
        (('h0', 'h1', 'h2', 'h3'), (4, 64))
    """
    top = cache.check_layer(cache.n_layers if layer is None else layer)
    vectors = torch.stack([cache.resid(layer) for layer in range(top + 1)])
    if pos is not None:
        vectors = vectors[:, cache.check_pos(pos)]
    return ResidStack(tuple(f"h{layer}" for layer in range(top + 1)), vectors)


def reconstruction_error(cache: ResidCache) -> float:
    """Largest relative error ``||sum of components - h^L|| / ||h^L||`` over every L and position (eq. 6).

    The sum is taken in float64; what remains is the model's own rounding: ~1e-6 in
    float32, ~1e-3 in float16 or bfloat16, where each of its additions is rounded.

    Example:
        >>> from memit_lab import load_model
        >>> cache = run_with_cache(load_model("tiny-neox"), "The capital of France is")
        >>> reconstruction_error(cache) < 1e-6
        True
    """
    components = decompose_resid(cache).vectors.double()
    n_embed = len(components) - 2 * cache.n_layers
    # Running sums in the order the model adds, so h^L is the sum of the first n_embed + 2L components.
    partial = components.cumsum(0)[n_embed - 1 :: 2]
    states = accumulated_resid(cache).vectors.double()
    return float(((partial - states).norm(dim=-1) / states.norm(dim=-1)).max())


# -- the logit lens ------------------------------------------------------------------------


def lens_logits(lm: LoadedModel, resid: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_vocab"]:
    """The final norm and the unembedding applied to any residual state: what the model would say from it.

    On the last state h^{n_layers} this is the model's own output.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-qwen2")
        >>> lens_logits(lm, torch.zeros(2, lm.d_model)).shape == (2, lm.model.config.vocab_size)
        True
    """
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    with torch.no_grad():
        return unembed(norm(resid)).float()


def resolve_target(lm: LoadedModel, prompt: str, target: str | int) -> tuple[int, str]:
    """The token id (and its text) whose logit is studied: the first token of ``target`` after ``prompt``.

    A string is tokenised as the continuation ``prompt + " " + target`` (as
    :func:`memit_lab.prompts.target_scores` does), so ``"Paris"`` gives ``" Paris"``;
    a multi-token target gives its first token. An int is taken as a token id. A target
    whose first token is unknown to the tokenizer, or only whitespace (its word is not
    in the vocabulary), is refused: that token's logit would say nothing about it.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> resolve_target(lm, "The capital of France is", "Paris")[1]
        ' Paris'
    """
    n_vocab = lm.model.get_submodule(lm.adapter.unembed).weight.shape[0]
    if isinstance(target, int):
        if not 0 <= target < n_vocab:
            raise ValueError(f"target token id {target} is not in the vocabulary (0..{n_vocab - 1})")
        return target, lm.tokenizer.decode([target])
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string or a token id, got {target!r}")
    check_prompt(prompt)
    enc = lm.tokenizer(continuation(prompt, target), return_offsets_mapping=True)
    ids = [enc.input_ids[j] for j in target_positions(enc.offset_mapping, prompt)]
    text = lm.tokenizer.decode(ids[:1])
    if not ids or ids[0] == lm.tokenizer.unk_token_id or not text.strip():
        raise ValueError(
            f"target {target!r} has no first token of its own in this model's vocabulary (after the prompt it "
            f"starts with {lm.tokenizer.convert_ids_to_tokens(ids[:2])}); pass a word the tokenizer knows, "
            "or a token id"
        )
    return ids[0], text


@dataclass(frozen=True)
class LogitLens:
    """What each state h^L would predict, at every position, and how it ranks one target.

    Attributes:
        labels: the states, ``h0`` (embedding) .. ``h{n_layers}`` (the model's output).
        tokens: the prompt's tokens, one per position.
        target, target_id: the studied token.
        top_tokens: ``[layer][pos]`` the top-1 token of each state.
        top_probs: ``[layer, pos]`` its probability.
        target_probs: ``[layer, pos]`` the target's probability.
        target_ranks: ``[layer, pos]`` the target's rank (0 = top-1).
    """

    labels: tuple[str, ...]
    tokens: tuple[str, ...]
    target: str
    target_id: int
    top_tokens: tuple[tuple[str, ...], ...]
    top_probs: Float[torch.Tensor, "layer pos"]
    target_probs: Float[torch.Tensor, "layer pos"]
    target_ranks: Int[torch.Tensor, "layer pos"]

    def to_frame(self) -> pd.DataFrame:
        """Long format: one row per (layer, position)."""
        n_layer, n_pos = self.top_probs.shape
        return pd.DataFrame(
            {
                "layer": [layer for layer in range(n_layer) for _ in range(n_pos)],
                "label": [label for label in self.labels for _ in range(n_pos)],
                "pos": list(range(n_pos)) * n_layer,
                "token": list(self.tokens) * n_layer,
                "top_token": [t for row in self.top_tokens for t in row],
                "top_prob": self.top_probs.flatten().cpu().numpy(),
                "target_prob": self.target_probs.flatten().cpu().numpy(),
                "target_rank": self.target_ranks.flatten().cpu().numpy(),
            }
        )

    def first_top1_layer(self, pos: int = -1) -> int | None:
        """The first L at which the target is the top prediction of h^L at ``pos`` (None: never)."""
        top1 = (self.target_ranks[:, _check_pos(pos, len(self.tokens))] == 0).tolist()
        return top1.index(True) if True in top1 else None

    def top1_from_layer(self, pos: int = -1) -> int | None:
        """The L from which the target stays top-1 up to the output (None: not top-1 at the output)."""
        top1 = (self.target_ranks[:, _check_pos(pos, len(self.tokens))] == 0).tolist()
        layer = len(top1)
        while layer > 0 and top1[layer - 1]:
            layer -= 1
        return layer if layer < len(top1) else None


def logit_lens(lm: LoadedModel, cache: ResidCache, target: str | int) -> LogitLens:
    """Apply the final norm and the unembedding to every h^L at every position.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> cache = run_with_cache(lm, "The capital of France is")
        >>> lens = logit_lens(lm, cache, "Paris")
        >>> lens.labels, lens.target
        (('h0', 'h1', 'h2', 'h3'), 'Pari')
    """
    target_id, target_text = resolve_target(lm, cache.prompt, target)
    states = accumulated_resid(cache)
    logprobs = lens_logits(lm, states.vectors).log_softmax(-1)
    top_logprobs, top_ids = logprobs.max(-1)
    target_logprobs = logprobs[..., target_id]
    ranks = (logprobs > target_logprobs[..., None]).sum(-1)
    decode = lm.tokenizer.decode
    top_tokens = tuple(tuple(decode([i]) for i in row) for row in top_ids.tolist())
    return LogitLens(
        states.labels,
        cache.tokens,
        target_text,
        target_id,
        top_tokens,
        top_logprobs.exp(),
        target_logprobs.exp(),
        ranks,
    )


# -- direct logit attribution -------------------------------------------------------------


@dataclass(frozen=True)
class FrozenNorm:
    """The final norm with its scale frozen: ``y -> weight * P y / scale + bias``, an affine map.

    LayerNorm (GPT-2, GPT-J, NeoX) computes ``weight * (x - mean(x)) / s(x) + bias`` with
    ``s(x) = sqrt(var(x) + eps)``; RMSNorm (Llama, Qwen2) computes ``weight * x / s(x)``
    with ``s(x) = sqrt(mean(x^2) + eps)``. Only ``1 / s(x)`` is not linear: centring
    ``P y = y - mean(y)`` is a linear projection. Freezing ``s`` at its value on the full
    residual ``x`` makes the norm affine, so it distributes over the components of eq. 6,
    and at ``y = x`` it gives the norm's true output.

    Attributes:
        weight: the norm's gain ``[d_model]``.
        bias: its output for a zero input ``[d_model]`` (LayerNorm's beta; zero for RMSNorm).
        scale: ``s(x)`` of the full run.
        centred: whether the norm subtracts the mean (LayerNorm) or not (RMSNorm).
    """

    weight: Float[torch.Tensor, " d_model"]
    bias: Float[torch.Tensor, " d_model"]
    scale: float
    centred: bool

    def linear(self, y: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_model"]:
        """``weight * P y / scale``: the linear part, applied to each component."""
        if self.centred:
            y = y - y.mean(-1, keepdim=True)
        return self.weight * y / self.scale

    def __call__(self, y: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_model"]:
        return self.linear(y) + self.bias


@torch.no_grad()
def freeze_final_norm(lm: LoadedModel, resid: Float[torch.Tensor, " d_model"]) -> FrozenNorm:
    """Linearise the model's final norm around the residual ``resid`` (see :class:`FrozenNorm`).

    The scale is read off the norm's own output, ``s = ||weight * P x|| / ||norm(x) - bias||``,
    so the norm's epsilon need not be known; the result is checked against the module.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> x = torch.randn(lm.d_model)
        >>> frozen = freeze_final_norm(lm, x)
        >>> norm = lm.model.get_submodule(lm.adapter.final_norm)
        >>> frozen.centred, bool(torch.allclose(frozen(x), norm(x), atol=1e-5))
        (True, True)
    """
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    centred = lm.adapter.centred_norm
    # The arithmetic runs in float32 whatever the model's dtype; the check allows for the module's own rounding.
    out, bias = norm(resid).float(), norm(torch.zeros_like(resid)).float()
    weight, x = norm.weight.detach().float(), resid.float()
    centred_x = x - x.mean() if centred else x
    frozen = FrozenNorm(weight, bias, float((weight * centred_x).norm() / (out - bias).norm()), centred)
    tol = max(1e-4, 8 * torch.finfo(resid.dtype).eps)
    if not torch.allclose(frozen(x), out, rtol=tol, atol=tol * float(out.abs().max())):
        raise NotImplementedError(
            f"the final norm ({type(norm).__name__}) is neither a LayerNorm nor an RMSNorm of the form "
            "weight * x / s(x); direct logit attribution needs its formula in memit_lab.residual.FrozenNorm"
        )
    return frozen


@dataclass(frozen=True)
class LogitAttribution:
    """Each component's direct contribution to one token's logit at one position.

    ``attributions[c] = u . (weight * P c / s)``, with the final norm's scale ``s``
    frozen from the full run (:class:`FrozenNorm`) and ``u = W_U[t]`` (or, centred,
    ``W_U[t]`` minus the mean row of ``W_U``); they add up, with ``constant`` (the
    biases' share), to the model's logit. ``ablations[c]`` answers the same question
    without freezing: the logit minus the logit recomputed with the true norm after
    removing c from the final residual. Their difference is what freezing costs.

    Attributes:
        labels: the components (:func:`decompose_resid`).
        attributions, ablations: ``[component]``.
        constant: the part no component writes (the norm's and unembedding's biases).
        logit: the model's own logit for the target at ``pos`` (minus the mean logit if centred).
        centred: whether the logit is measured against the mean logit over the vocabulary.
        target, target_id, pos, token: what was attributed, where, and the token there.
    """

    labels: tuple[str, ...]
    attributions: Float[torch.Tensor, " component"]
    ablations: Float[torch.Tensor, " component"]
    constant: float
    logit: float
    centred: bool
    target: str
    target_id: int
    pos: int
    token: str

    @property
    def total(self) -> float:
        """Sum of the attributions plus the constant: the norm-linearised logit (equals ``logit``)."""
        return float(self.attributions.sum()) + self.constant

    def to_frame(self) -> pd.DataFrame:
        """One row per component: label, kind (embed / attn / mlp), block, attribution, ablation, error."""
        kinds = [label.rsplit("_", 1)[0] if label[-1].isdigit() else "embed" for label in self.labels]
        blocks = [int(label.rsplit("_", 1)[1]) if label[-1].isdigit() else -1 for label in self.labels]
        attributions = self.attributions.cpu().numpy()
        ablations = self.ablations.cpu().numpy()
        return pd.DataFrame(
            {
                "component": self.labels,
                "kind": kinds,
                "block": blocks,
                "attribution": attributions,
                "ablation": ablations,
                "error": attributions - ablations,
            }
        )


@torch.no_grad()
def direct_logit_attribution(
    lm: LoadedModel, cache: ResidCache, target: str | int, pos: int = -1, *, centred: bool = False
) -> LogitAttribution:
    """Split the target's final logit at ``pos`` into one direct term per component of eq. 6.

    "Direct" means the path through the residual stream straight to the unembedding;
    what a component does by changing later blocks' inputs is not counted here.
    With ``centred`` the attributed quantity is the target's logit minus the mean
    logit over the vocabulary: a component that raises every logit alike changes no
    probability, and centring gives it no credit.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-neox")
        >>> cache = run_with_cache(lm, "The capital of France is")
        >>> attr = direct_logit_attribution(lm, cache, "Paris")
        >>> attr.labels[:3], abs(attr.total - attr.logit) < 1e-4
        (('embed', 'attn_0', 'mlp_0'), True)
    """
    pos = cache.check_pos(pos)
    target_id, target_text = resolve_target(lm, cache.prompt, target)
    components = decompose_resid(cache, pos=pos)
    final = cache.resid(cache.n_layers)[pos]
    frozen = freeze_final_norm(lm, final)
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    w_u = unembed.weight.float()
    bias = torch.zeros(len(w_u), device=w_u.device) if unembed.bias is None else unembed.bias.float()
    direction, b_target = w_u[target_id], bias[target_id]
    logit = cache.logits[pos, target_id]
    if centred:
        direction, b_target = direction - w_u.mean(0), b_target - bias.mean()
        logit = logit - cache.logits[pos].mean()
    attributions = frozen.linear(components.vectors.float()) @ direction
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    without = norm(final - components.vectors).float() @ direction + b_target
    return LogitAttribution(
        components.labels,
        attributions,
        logit - without,
        float(frozen.bias @ direction + b_target),
        float(logit),
        centred,
        target_text,
        target_id,
        pos,
        cache.tokens[pos],
    )
