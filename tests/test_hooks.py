"""Hooks and adapters on every tiny architecture: the right tensors, the right W_out, clean removal."""

import pytest
import torch

from memit_lab import LoadedModel, Trace, TraceDict
from memit_lab.hooks import get_module

PROMPT = "The Eiffel Tower is located in the city of"


def _ids(lm: LoadedModel) -> torch.Tensor:
    return lm.tokenizer(PROMPT, return_tensors="pt").input_ids


def test_block_outputs_match_hidden_states(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    blocks = [tiny_lm.adapter.block(layer) for layer in range(tiny_lm.n_layers)]
    with TraceDict(tiny_lm.model, blocks) as td:
        hidden = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    # hidden_states[l + 1] is block l's output; the last entry has the final norm applied, so skip it.
    for layer in range(tiny_lm.n_layers - 1):
        got = td[blocks[layer]].output
        assert got is not None and got.shape == (1, ids.shape[1], tiny_lm.d_model)
        torch.testing.assert_close(got, hidden[layer + 1], rtol=0, atol=0)


def test_w_out_times_key_is_mlp_output(tiny_lm: LoadedModel) -> None:
    """m = W_out k (+ bias), with W_out read in the adapter's orientation (eq. 4)."""
    a = tiny_lm.adapter
    names = [a.w_out_module(layer) for layer in range(tiny_lm.n_layers)]
    mlps = [a.mlp_module(layer) for layer in range(tiny_lm.n_layers)]
    with TraceDict(tiny_lm.model, names + mlps, retain_input=True) as td:
        tiny_lm.model(_ids(tiny_lm))
    for layer, (w_name, mlp_name) in enumerate(zip(names, mlps, strict=True)):
        key = td[w_name].input
        assert key is not None and key.shape[-1] == tiny_lm.d_mlp
        w = a.w_out_weight(tiny_lm.model, layer)
        assert w.shape == (tiny_lm.d_model, tiny_lm.d_mlp)
        bias = get_module(tiny_lm.model, w_name).bias
        expected = key @ w.T + (0 if bias is None else bias)
        torch.testing.assert_close(td[mlp_name].output, expected, rtol=1e-5, atol=1e-6)


def test_replacing_output_changes_logits_and_restoring_returns_them(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    before = tiny_lm.model(ids).logits
    with Trace(tiny_lm.model, tiny_lm.adapter.attn_module(1), edit_output=lambda out, _: out * 0 + 1.0):
        edited = tiny_lm.model(ids).logits
    after = tiny_lm.model(ids).logits
    assert (edited - before).abs().max() > 1e-3
    assert torch.equal(before, after)


def test_edit_input_and_stop(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    name = tiny_lm.adapter.w_out_module(0)
    with Trace(tiny_lm.model, name, retain_input=True) as clean:
        tiny_lm.model(ids)
    with Trace(tiny_lm.model, name, retain_input=True, edit_input=lambda x, _: torch.zeros_like(x), stop=True) as t:
        tiny_lm.model(ids)  # StopForward is raised inside and swallowed by the with
    assert t.input is not None and clean.input is not None
    assert torch.count_nonzero(t.input) == 0 and torch.count_nonzero(clean.input) > 0
    bias = get_module(tiny_lm.model, name).bias
    expected = torch.zeros(tiny_lm.d_model) if bias is None else bias
    torch.testing.assert_close(t.output[0, 0], expected)


def test_hooks_are_removed_on_exception() -> None:
    from memit_lab import load_model

    lm = load_model("tiny-llama")
    module = get_module(lm.model, lm.adapter.mlp_module(0))
    with pytest.raises(RuntimeError, match="boom"), Trace(lm.model, lm.adapter.mlp_module(0), retain_input=True):
        raise RuntimeError("boom")
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_unknown_module_name_lists_near_misses() -> None:
    from memit_lab import load_model

    lm = load_model("tiny-gpt2")
    with pytest.raises(KeyError, match=r"transformer\.h\.0\.mlp"):
        Trace(lm.model, "transformer.h.0.mlpp")


def test_shape_annotations_are_checked_during_tests() -> None:
    """The root conftest's jaxtyping hook turns a wrong shape into an error at the call."""
    from jaxtyping import TypeCheckError

    from memit_lab.adapters import adapter_for_model_type

    gpt2 = adapter_for_model_type("gpt2")
    assert gpt2.to_stored(torch.ones(4, 6)).shape == (6, 4)
    with pytest.raises(TypeCheckError):
        gpt2.to_stored(torch.ones(2, 4, 6))
