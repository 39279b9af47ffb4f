"""One table that says where each architecture keeps the parts MEMIT needs.

Everything else in memit_lab reaches into a model only through an :class:`Adapter`,
so supporting a new architecture means adding one entry to :data:`ADAPTERS` (and a
tiny-model test). Paths are dotted module names, as ``model.named_modules()``
spells them; ``{l}`` stands for the layer index.

The parts, in the paper's notation (eq. 2-4)::

    h^l = h^{l-1} + a^l + m^l              (eq. 2)
    m^l = W_out^l  sigma(W_in^l gamma(h))  (eq. 4)

``w_out`` names W_out^l, the matrix MEMIT edits. Its *input* is the key k (the
MLP's hidden activation, ``[.., d_mlp]``); its *output* is the MLP output m^l
(``[.., d_model]``). GPT-2 stores W_out in a ``Conv1D`` whose weight is
``[d_mlp, d_model]`` -- the transpose of ``nn.Linear``'s ``[d_model, d_mlp]`` --
which ``w_out_transposed`` records. The orientation is written down here, never
guessed from a shape (square matrices make shapes ambiguous).

Example:
    >>> from memit_lab.adapters import adapter_for_model_type
    >>> a = adapter_for_model_type("llama")
    >>> a.w_out_module(3)
    'model.layers.3.mlp.down_proj'
    >>> a.parallel
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import nn

__all__ = [
    "ADAPTERS",
    "Adapter",
    "NormKind",
    "UnsupportedArchitectureError",
    "adapter_for_model",
    "adapter_for_model_type",
]


class UnsupportedArchitectureError(ValueError):
    """The model's architecture has no entry in :data:`ADAPTERS`."""


#: The norm gamma of a family: LayerNorm ``weight * (x - mean x) / s(x) + bias`` or RMSNorm ``weight * x / s(x)``.
NormKind = Literal["layernorm", "rmsnorm"]


@dataclass(frozen=True)
class Adapter:
    """Module paths and conventions of one model family.

    Attributes:
        name: a short family name used in messages.
        model_types: the ``config.model_type`` values this entry serves.
        layers: path of the ``nn.ModuleList`` of transformer blocks.
        embed: token embedding module.
        pos_embed: learned absolute position embedding (GPT-2), else ``None``;
            its output is part of h^0.
        final_norm: the norm applied before the unembedding (gamma of the last layer).
        norm_kind: which norm the family uses (its blocks' and the final one), written
            down rather than guessed from the module's class.
        unembed: the unembedding (``lm_head``) module.
        attn, mlp: attention and MLP modules, relative to a block.
        w_out: W_out, relative to a block.
        w_out_transposed: True when the weight is stored ``[d_mlp, d_model]``.
        parallel: True when attention and MLP read the same block input (GPT-J,
            NeoX); a ``str`` names the boolean config attribute that decides (a
            config without it is refused, never given a default).
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str
    mlp: str
    w_out: str
    norm_kind: NormKind
    w_out_transposed: bool = False
    parallel: bool | str = False
    pos_embed: str | None = None

    @property
    def centred_norm(self) -> bool:
        """Whether the norm subtracts the mean first (LayerNorm) or not (RMSNorm)."""
        return self.norm_kind == "layernorm"

    # -- module names -------------------------------------------------------------
    def block(self, layer: int) -> str:
        """Path of block ``layer``."""
        return f"{self.layers}.{layer}"

    def attn_module(self, layer: int) -> str:
        """Path of block ``layer``'s attention (its output is a^l, eq. 3)."""
        return f"{self.layers}.{layer}.{self.attn}"

    def mlp_module(self, layer: int) -> str:
        """Path of block ``layer``'s MLP (its output is m^l, eq. 4)."""
        return f"{self.layers}.{layer}.{self.mlp}"

    def w_out_module(self, layer: int) -> str:
        """Path of W_out^l (input: the key k, output: m^l)."""
        return f"{self.layers}.{layer}.{self.w_out}"

    def is_parallel(self, config: object) -> bool:
        """Whether attention and MLP of a block read the same input (GPT-J, NeoX).

        Example:
            >>> adapter_for_model_type("gpt_neox").is_parallel(object())
            Traceback (most recent call last):
            ...
            ValueError: this gpt-neox config has no 'use_parallel_residual' attribute, ...
        """
        if not isinstance(self.parallel, str):
            return self.parallel
        if not hasattr(config, self.parallel):
            raise ValueError(
                f"this {self.name} config has no {self.parallel!r} attribute, which says whether attention and "
                f"MLP read the same input; set config.{self.parallel} to True or False"
            )
        return bool(getattr(config, self.parallel))

    # -- W_out in the paper's orientation ------------------------------------------
    def w_out_weight(self, model: nn.Module, layer: int) -> Float[torch.Tensor, "d_model d_mlp"]:
        """W_out^l as ``[d_model, d_mlp]`` (m = W k), a view of the live parameter."""
        weight = self.w_out_parameter(model, layer)
        return weight.T if self.w_out_transposed else weight

    def w_out_parameter(self, model: nn.Module, layer: int) -> nn.Parameter:
        """The stored parameter itself, in whatever orientation the model keeps it."""
        param = model.get_submodule(self.w_out_module(layer)).weight
        if not isinstance(param, nn.Parameter):
            raise TypeError(f"{self.w_out_module(layer)}.weight is not a parameter; check the adapter entry")
        return param

    def to_stored(self, delta: Float[torch.Tensor, "d_model d_mlp"]) -> Float[torch.Tensor, "_ _"]:
        """Turn a ``[d_model, d_mlp]`` update into the stored orientation."""
        return delta.T if self.w_out_transposed else delta


def _adapter(name: str, *model_types: str, **paths: object) -> Adapter:
    return Adapter(name, tuple(model_types), **paths)  # type: ignore[arg-type]  # paths are checked by the dataclass


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    attn="self_attn",
    mlp="mlp",
    w_out="mlp.down_proj",
    norm_kind="rmsnorm",
)

#: The table: one entry per architecture. Add a row to support a new family.
ADAPTERS: tuple[Adapter, ...] = (
    _adapter(
        "gpt2",
        "gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        pos_embed="transformer.wpe",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        mlp="mlp",
        w_out="mlp.c_proj",
        norm_kind="layernorm",
        w_out_transposed=True,
    ),
    _adapter(
        "gptj",
        "gptj",
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        attn="attn",
        mlp="mlp",
        w_out="mlp.fc_out",
        norm_kind="layernorm",
        parallel=True,
    ),
    _adapter(
        "gpt-neox",
        "gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        attn="attention",
        mlp="mlp",
        w_out="mlp.dense_4h_to_h",
        norm_kind="layernorm",
        parallel="use_parallel_residual",
    ),
    _adapter("llama", "llama", **_LLAMA_LIKE),
    _adapter("mistral", "mistral", **_LLAMA_LIKE),
    _adapter("qwen2", "qwen2", **_LLAMA_LIKE),
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` with an adapter."""
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_for_model_type(model_type: str) -> Adapter:
    """The adapter serving ``config.model_type``; a clear error for anything else."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UnsupportedArchitectureError(
        f"memit_lab has no adapter for model_type {model_type!r}. Supported: "
        f"{', '.join(supported_model_types())}. To add one, append an Adapter entry to "
        "memit_lab.adapters.ADAPTERS (see CONTRIBUTING.md)."
    )


def adapter_for_model(model: nn.Module) -> Adapter:
    """The adapter for a loaded Hugging Face model, from its ``config.model_type``.

    A config that does not say what the adapter needs (whether blocks are parallel) is
    refused here, when the model is loaded, not later in the middle of a computation.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no config.model_type; memit_lab needs a Hugging Face "
            f"causal language model of one of: {', '.join(supported_model_types())}."
        )
    adapter = adapter_for_model_type(model_type)
    adapter.is_parallel(config)
    return adapter
