"""The adapter table answers what code must never guess: the norm kind, whether blocks are parallel."""

from types import SimpleNamespace

import pytest
import torch
from transformers import GPTNeoXConfig

from memit_lab import load_model
from memit_lab.adapters import ADAPTERS, adapter_for_model, adapter_for_model_type
from memit_lab.tiny import TINY_MODELS


def _norm_formula(kind: str, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm written from its definition, with the module's own epsilon."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")  # noqa: B009
    if kind == "layernorm":
        centred = x - x.mean(-1, keepdim=True)
        return norm.weight * centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() + norm.bias
    return norm.weight * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_the_adapter_names_the_norm_every_tiny_model_uses(name: str) -> None:
    lm = load_model(name)
    norms = [lm.model.get_submodule(lm.adapter.final_norm)]
    norms += [m for m in lm.model.get_submodule(lm.adapter.block(0)).modules() if "Norm" in type(m).__name__]
    assert len(norms) >= 2  # the final norm and the block's (one in GPT-J, two elsewhere)
    x = torch.randn(3, lm.d_model, generator=torch.Generator().manual_seed(0))
    for norm in norms:
        torch.testing.assert_close(norm(x), _norm_formula(lm.adapter.norm_kind, norm, x), rtol=1e-5, atol=1e-5)
    assert lm.adapter.centred_norm == (lm.adapter.norm_kind == "layernorm")


def test_every_adapter_says_its_norm_kind() -> None:
    assert {a.name: a.norm_kind for a in ADAPTERS} == {
        "gpt2": "layernorm",
        "gptj": "layernorm",
        "gpt-neox": "layernorm",
        "llama": "rmsnorm",
        "mistral": "rmsnorm",
        "qwen2": "rmsnorm",
    }


def test_a_config_without_the_parallel_attribute_is_refused() -> None:
    neox = adapter_for_model_type("gpt_neox")
    config = GPTNeoXConfig(
        vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    assert neox.is_parallel(config) is True
    config.use_parallel_residual = False
    assert neox.is_parallel(config) is False
    lacking = SimpleNamespace(model_type="gpt_neox")  # a config that does not say
    with pytest.raises(ValueError, match=r"no .use_parallel_residual. attribute.*set config\.use_parallel_residual"):
        neox.is_parallel(lacking)
    model = torch.nn.Module()
    model.config = lacking  # type: ignore[assignment]
    with pytest.raises(ValueError, match="use_parallel_residual"):
        adapter_for_model(model)  # refused when the model is loaded, not later
    assert adapter_for_model_type("gpt2").is_parallel(lacking) is False  # a fixed answer needs no attribute
