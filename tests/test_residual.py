"""Residual stream (eq. 2-6), logit lens and direct logit attribution, against independent computations.

Tolerances: the decomposition is a float32 sum of up to 61 vectors, so it is compared
relative to the norm of the state (1e-5; measured errors are below 1e-6); logits are
compared with an absolute 1e-4 (they are O(10) and pass through one matmul).
"""

import math

import matplotlib
import pytest
import torch
from torch import nn

from memit_lab import LoadedModel, load_model
from memit_lab.prompts import top_predictions
from memit_lab.residual import (
    LogitLens,
    accumulated_resid,
    decompose_resid,
    direct_logit_attribution,
    freeze_final_norm,
    lens_logits,
    logit_lens,
    reconstruction_error,
    resolve_target,
    run_with_cache,
)
from memit_lab.residual_plots import plot_attribution, plot_logit_lens

matplotlib.use("Agg")

PROMPT = "The Eiffel Tower is located in the city of"


def _forward(lm: LoadedModel, prompt: str = PROMPT) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """An independent forward pass, no hooks: (logits [pos, vocab], hidden_states)."""
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model(ids, output_hidden_states=True)
    return out.logits[0], tuple(h[0] for h in out.hidden_states)


def _assert_relative(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    err = ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max()
    assert err <= tol, f"relative error {float(err):.2e} > {tol}"


def _check_decomposition(lm: LoadedModel) -> None:
    cache = run_with_cache(lm, PROMPT)
    _, hidden = _forward(lm)
    # hidden_states[L] is h^L for L < n_layers; the last entry has the final norm applied already.
    for layer in range(lm.n_layers):
        _assert_relative(decompose_resid(cache, layer).sum(), hidden[layer], 1e-5)
    final = decompose_resid(cache).sum()
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    with torch.no_grad():
        _assert_relative(norm(final), hidden[-1], 1e-5)
    assert reconstruction_error(cache) <= 1e-5


def test_decomposition_sums_to_hidden_states(tiny_lm: LoadedModel) -> None:
    _check_decomposition(tiny_lm)


@pytest.mark.slow
def test_decomposition_sums_to_hidden_states_on_bundled_model(smollm: LoadedModel) -> None:
    _check_decomposition(smollm)
    assert len(decompose_resid(run_with_cache(smollm, PROMPT)).labels) == 1 + 2 * 30


def test_both_block_kinds_are_covered() -> None:
    """The tiny models include parallel blocks (GPT-J, NeoX) as well as sequential ones."""
    parallel = {name: load_model(name).is_parallel for name in ("tiny-gptj", "tiny-neox", "tiny-gpt2", "tiny-llama")}
    assert parallel == {"tiny-gptj": True, "tiny-neox": True, "tiny-gpt2": False, "tiny-llama": False}


def test_embedding_is_token_plus_position_embedding(tiny_lm: LoadedModel) -> None:
    """h^0 read from the weights: W_E[token] (+ W_pos[position] where the model has one, GPT-2)."""
    cache = run_with_cache(tiny_lm, PROMPT)
    ids = tiny_lm.tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    expected = tiny_lm.model.get_input_embeddings().weight[ids]
    if tiny_lm.adapter.pos_embed is not None:
        expected = expected + tiny_lm.model.get_submodule(tiny_lm.adapter.pos_embed).weight[: len(ids)]
    torch.testing.assert_close(decompose_resid(cache, 0).sum(), expected)
    torch.testing.assert_close(cache.resid(0), expected)
    labels = decompose_resid(cache, 1).labels
    assert labels == (("embed", "pos_embed") if tiny_lm.adapter.pos_embed else ("embed",)) + ("attn_0", "mlp_0")


def test_accumulated_resid_is_the_running_sum_of_components() -> None:
    lm = load_model("tiny-qwen2")
    cache = run_with_cache(lm, PROMPT)
    states = accumulated_resid(cache, pos=4)
    components = decompose_resid(cache, pos=4)
    assert states.labels == ("h0", "h1", "h2", "h3")
    for layer in range(4):
        torch.testing.assert_close(states.vectors[layer], components.vectors[: 1 + 2 * layer].sum(0))
    assert accumulated_resid(cache, layer=1).vectors.shape == (2, cache.n_pos, lm.d_model)
    frame = accumulated_resid(cache).to_frame()
    assert len(frame) == 4 * cache.n_pos
    row = frame[(frame.label == "h2") & (frame.pos == 4)]
    assert math.isclose(float(row.norm.iloc[0]), float(cache.resid(2)[4].norm()), rel_tol=1e-6)
    assert states.to_frame().label.tolist() == ["h0", "h1", "h2", "h3"]


def test_reconstruction_error_detects_a_missing_component() -> None:
    lm = load_model("tiny-llama")
    cache = run_with_cache(lm, PROMPT)
    cache.activations["blocks.1.mlp_out"] = torch.zeros_like(cache["blocks.1.mlp_out"])
    assert reconstruction_error(cache) > 1e-2


def test_logit_lens_at_last_layer_is_the_models_output(tiny_lm: LoadedModel) -> None:
    logits, _ = _forward(tiny_lm)
    cache = run_with_cache(tiny_lm, PROMPT)
    torch.testing.assert_close(lens_logits(tiny_lm, cache.resid(tiny_lm.n_layers)), logits, rtol=0, atol=1e-4)
    lens = logit_lens(tiny_lm, cache, "Paris")
    probs = logits.softmax(-1)
    assert lens.top_tokens[-1] == tuple(tiny_lm.tokenizer.decode([i]) for i in logits.argmax(-1).tolist())
    torch.testing.assert_close(lens.top_probs[-1], probs.max(-1).values, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lens.target_probs[-1], probs[:, lens.target_id], rtol=1e-4, atol=1e-6)
    # Rank by brute force: where the target falls in each position's sorted distribution.
    order = logits.argsort(-1, descending=True)
    ranks = (order == lens.target_id).float().argmax(-1)
    assert torch.equal(lens.target_ranks[-1], ranks)


@pytest.mark.slow
def test_logit_lens_on_bundled_model_ends_at_its_prediction(smollm: LoadedModel) -> None:
    lens = logit_lens(smollm, run_with_cache(smollm, PROMPT), "Paris")
    (token, prob), *_ = top_predictions(smollm, [PROMPT], k=1)[0]
    assert lens.top_tokens[-1][-1] == token == " Paris"
    assert math.isclose(float(lens.target_probs[-1, -1]), prob, rel_tol=1e-4)
    assert lens.first_top1_layer(-1) is not None and lens.first_top1_layer(-1) > 0


def _randomise_head(lm: LoadedModel) -> None:
    """Give the final norm's gain and bias and the unembedding's bias (where they exist) non-trivial values.

    Fresh models start with gain 1 and biases 0, which would hide a formula that drops them.
    """
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
        for bias in (getattr(norm, "bias", None), unembed.bias):
            if bias is not None:
                bias.copy_(torch.randn_like(bias))


def _hand_attribution(lm: LoadedModel, components: torch.Tensor, final: torch.Tensor, target: int) -> torch.Tensor:
    """W_U[t] . (gamma * P c / s), s from the norm's own formula and epsilon, in float64."""
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    x, c = final.double(), components.double()
    if isinstance(norm, nn.LayerNorm):  # centres, then divides by the standard deviation
        scale = torch.sqrt(x.var(unbiased=False) + norm.eps)
        c = c - c.mean(-1, keepdim=True)
    else:  # RMSNorm: no centring, divides by the root mean square
        scale = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
    w_u = lm.model.get_submodule(lm.adapter.unembed).weight[target].double()
    return (c * norm.weight.double() / scale) @ w_u


def test_randomised_head_reaches_every_bias() -> None:
    """The GPT-J head has both biases; the tests below rely on them being non-zero after randomising."""
    lm = load_model("tiny-gptj")
    _randomise_head(lm)
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    assert norm.bias.abs().min() > 0 and lm.model.get_submodule(lm.adapter.unembed).bias.abs().min() > 0


def test_attribution_sums_to_the_logit_and_matches_a_hand_computation(tiny_lm: LoadedModel) -> None:
    _randomise_head(tiny_lm)
    logits, _ = _forward(tiny_lm)
    cache = run_with_cache(tiny_lm, PROMPT)
    pos = 5
    attr = direct_logit_attribution(tiny_lm, cache, "Paris", pos=pos)
    assert attr.pos == pos and attr.token == cache.tokens[pos]
    assert math.isclose(attr.total, float(logits[pos, attr.target_id]), abs_tol=1e-4)
    components = decompose_resid(cache, pos=pos).vectors
    hand = _hand_attribution(tiny_lm, components, cache.resid(tiny_lm.n_layers)[pos], attr.target_id)
    torch.testing.assert_close(attr.attributions.double(), hand, rtol=1e-4, atol=1e-4)


def test_centred_attribution_sums_to_logit_minus_mean_logit(tiny_lm: LoadedModel) -> None:
    _randomise_head(tiny_lm)
    logits, _ = _forward(tiny_lm)
    attr = direct_logit_attribution(tiny_lm, run_with_cache(tiny_lm, PROMPT), "Paris", centred=True)
    expected = logits[-1, attr.target_id] - logits[-1].mean()
    assert math.isclose(attr.total, float(expected), abs_tol=1e-4)
    assert math.isclose(attr.logit, float(expected), abs_tol=1e-4)


def test_ablation_column_is_the_logit_change_when_a_component_is_removed() -> None:
    """Independently: subtract mlp_1 from the final residual, re-run the true norm and the unembedding."""
    lm = load_model("tiny-gptj")  # LayerNorm and an unembedding bias: both appear in the formula
    _randomise_head(lm)
    logits, _ = _forward(lm)
    cache = run_with_cache(lm, PROMPT)
    attr = direct_logit_attribution(lm, cache, "Paris")
    index = attr.labels.index("mlp_1")
    without = lens_logits(lm, cache.resid(lm.n_layers)[-1] - cache["blocks.1.mlp_out"][-1])[attr.target_id]
    assert math.isclose(float(attr.ablations[index]), float(logits[-1, attr.target_id] - without), abs_tol=1e-4)
    frame = attr.to_frame()
    assert frame.loc[index, ["component", "kind", "block"]].tolist() == ["mlp_1", "mlp", 1]
    assert math.isclose(frame.loc[index, "error"], frame.loc[index, "attribution"] - frame.loc[index, "ablation"])


def test_frozen_norm_is_affine_and_exact_at_the_full_residual(tiny_lm: LoadedModel) -> None:
    _randomise_head(tiny_lm)
    x, y = torch.randn(2, tiny_lm.d_model) * 3
    frozen = freeze_final_norm(tiny_lm, x)
    norm = tiny_lm.model.get_submodule(tiny_lm.adapter.final_norm)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), norm(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frozen(x + y), frozen.linear(x) + frozen.linear(y) + frozen.bias)
        assert not torch.allclose(frozen(x + y), norm(x + y), atol=1e-3)  # the true norm is not affine
    assert frozen.centred == isinstance(norm, nn.LayerNorm)


class _TanhNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.weight


def test_an_unknown_final_norm_is_refused_not_misattributed() -> None:
    lm = load_model("tiny-llama")
    lm.model.set_submodule(lm.adapter.final_norm, _TanhNorm(lm.d_model))
    with pytest.raises(NotImplementedError, match="neither a LayerNorm nor an RMSNorm"):
        freeze_final_norm(lm, torch.randn(lm.d_model) * 3)


def test_first_top1_layer_on_a_hand_made_lens() -> None:
    ranks = torch.tensor([[5, 1, 1], [0, 1, 0], [3, 1, 0], [0, 1, 0], [0, 1, 0]])
    lens = LogitLens(
        labels=tuple(f"h{i}" for i in range(5)),
        tokens=("a", "b", "c"),
        target=" x",
        target_id=7,
        top_tokens=tuple(("?",) * 3 for _ in range(5)),
        top_probs=torch.zeros(5, 3),
        target_probs=torch.zeros(5, 3),
        target_ranks=ranks,
    )
    assert (lens.first_top1_layer(0), lens.top1_from_layer(0)) == (1, 3)
    assert (lens.first_top1_layer(1), lens.top1_from_layer(1)) == (None, None)
    assert (lens.first_top1_layer(-1), lens.top1_from_layer(-1)) == (1, 1)
    with pytest.raises(IndexError, match="out of range"):
        lens.first_top1_layer(3)


def test_bad_layer_and_position_give_clear_errors() -> None:
    lm = load_model("tiny-gpt2")
    cache = run_with_cache(lm, PROMPT)
    for layer in (-1, lm.n_layers + 1):
        with pytest.raises(IndexError, match=r"h\^L exists for L = 0 \(embedding\) to 3"):
            decompose_resid(cache, layer)
        with pytest.raises(IndexError, match="out of range"):
            accumulated_resid(cache, layer)
    for pos in (cache.n_pos, -cache.n_pos - 1):
        with pytest.raises(IndexError, match=f"position {pos} is out of range for a {cache.n_pos}-token prompt"):
            decompose_resid(cache, pos=pos)
        with pytest.raises(IndexError, match="out of range"):
            direct_logit_attribution(lm, cache, "Paris", pos=pos)
    with pytest.raises(KeyError, match=r"blocks\.0\.attn_out"):
        cache["blocks.0.attn"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_unknown_target_gives_a_clear_error(name: str) -> None:
    lm = load_model(name)
    cache = run_with_cache(lm, PROMPT)
    n_vocab = lm.model.get_submodule(lm.adapter.unembed).weight.shape[0]
    for bad_id in (-1, n_vocab):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            logit_lens(lm, cache, bad_id)
    with pytest.raises(ValueError, match="non-empty"):
        direct_logit_attribution(lm, cache, "  ")
    # Not a word of the tiny vocabulary: it starts with a bare space (byte-level) or <unk> (SentencePiece).
    with pytest.raises(ValueError, match="no first token of its own"):
        logit_lens(lm, cache, "日本")
    assert resolve_target(lm, PROMPT, n_vocab - 1)[0] == n_vocab - 1


def test_plots_return_the_figure_and_the_data_they_drew() -> None:
    import matplotlib.pyplot as plt

    lm = load_model("tiny-neox")
    cache = run_with_cache(lm, PROMPT)
    lens = logit_lens(lm, cache, "Paris")
    fig, frame = plot_logit_lens(lens, subject=(1, 3))
    assert frame.equals(lens.to_frame())
    # Every cell is annotated with its top token, escaped, spaces shown as ␣, cut to 8 characters.
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == sorted(repr(t)[1:-1].replace(" ", "\u2423")[:8] for row in lens.top_tokens for t in row)
    colours = [label.get_color() for label in fig.axes[0].get_xticklabels()]
    assert colours[1:3] == ["red", "red"] and "red" not in colours[:1] + colours[3:]
    plt.close(fig)
    attr = direct_logit_attribution(lm, cache, "Paris")
    fig, frame = plot_attribution(attr)
    assert frame.equals(attr.to_frame())
    heights = sorted(round(p.get_height(), 4) for p in fig.axes[0].patches if p.get_height() != 0)
    assert heights == sorted(round(float(v), 4) for v in attr.attributions if v != 0)
    plt.close(fig)
    with pytest.raises(ValueError, match="target_prob"):
        plot_logit_lens(lens, value="rank")
