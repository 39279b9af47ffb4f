"""Directed edits (two-way facts, multiple-choice scores, the update's response to keys) and the first-token limit."""

import numpy as np
import pytest
import torch

from memit_lab import load_model
from memit_lab.datasets import load_factset
from memit_lab.editing import WeightBackup
from memit_lab.evaluate import mean_nll
from memit_lab.experiments import edit_request
from memit_lab.hooks import Trace
from memit_lab.limitations import (
    TWO_WAY_FACTS,
    direction_scores,
    efficacy_by_prefix,
    final_norm_norms,
    forward_requests,
    inverse_requests,
    residual_norms,
    subject_at_first_token,
    update_response,
)
from memit_lab.methods import edits_applied
from memit_lab.models import LoadedModel
from memit_lab.requests import EditRequest, check_requests


def test_two_way_facts_are_a_valid_batch_in_each_direction() -> None:
    lm = load_model("tiny-llama")
    assert len(check_requests(forward_requests(TWO_WAY_FACTS), lm.tokenizer)) == 12
    assert len(check_requests(inverse_requests(TWO_WAY_FACTS), lm.tokenizer)) == 12
    capitals = [f for f in TWO_WAY_FACTS if f.relation == "capital"]
    # Counterfactual capitals: each country gets another country's capital, every capital used once.
    assert all(f.obj != f.obj_true for f in capitals) and {f.obj for f in capitals} == {f.obj_true for f in capitals}


def test_direction_scores_match_brute_force_choice() -> None:
    lm = load_model("tiny-gpt2")
    facts = TWO_WAY_FACTS[6:9]
    frame = direction_scores(lm, facts)
    for f, row in zip(facts, frame.itertuples(), strict=True):
        objs = [g.obj for g in facts]
        nll = [mean_nll(lm, [f.forward_prompt], [o])[0] for o in objs]
        assert row.forward_hit == (objs[int(np.argmin(nll))] == f.obj)
        assert row.p_forward == pytest.approx(np.exp(-nll[objs.index(f.obj)]))
        subjects = [g.subject for g in facts]
        nll_inv = [mean_nll(lm, [f.inverse_prompt], [s])[0] for s in subjects]
        assert row.inverse_hit == (subjects[int(np.argmin(nll_inv))] == f.subject)


def test_update_response_of_a_rank_one_update_is_closed_form() -> None:
    lm = load_model("tiny-gpt2")  # GPT-2 stores W_out transposed: the adapter must undo that
    layer, prompt = 1, "Tim Cook is the CEO of"
    backup = WeightBackup.of(lm, [layer])
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(lm.d_model, generator=g), torch.randn(lm.d_mlp, generator=g)
    backup.add(layer, torch.outer(u, v))  # Delta = u v^T, so ||Delta k|| = ||u|| |v . k|
    response = update_response(lm, backup, prompt)
    backup.restore()
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    with Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True) as t:
        lm.model(input_ids=ids)
    assert t.input is not None
    expected = u.norm() * (t.input[0] @ v).abs()
    assert response.shape == (1, ids.shape[1])
    torch.testing.assert_close(response[0], expected, rtol=1e-4, atol=1e-5)


# --- a subject at the first token ------------------------------------------------------------------------------


def test_subject_at_first_token_follows_the_tokenizer(tiny_lm: LoadedModel) -> None:
    tok = tiny_lm.tokenizer
    opening = EditRequest("{} is a company from", "X", "France")
    # Position 0 exactly when "X" is one token and the tokenizer puts nothing (a BOS token) before it.
    alone = tok("X", add_special_tokens=False)["input_ids"]
    expected = len(alone) == 1 and tok(opening.text)["input_ids"][0] == alone[0]
    assert subject_at_first_token(tiny_lm, opening) == expected
    assert not subject_at_first_token(tiny_lm, EditRequest("The company {} is from", "X", "France"))


def test_residual_norms_are_the_norms_of_each_block_output() -> None:
    lm = load_model("tiny-neox")
    prompt = "The Eiffel Tower is in"
    frame = residual_norms(lm, prompt)
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    blocks = [lm.adapter.block(layer) for layer in range(lm.n_layers - 1)]  # the last row is after the final norm
    with Trace(lm.model, blocks[0]) as first, Trace(lm.model, blocks[-1]) as last:
        lm.model(input_ids=ids)
    for trace, row in ((first, 1), (last, lm.n_layers - 1)):
        out = trace.output[0] if isinstance(trace.output, tuple) else trace.output
        norms = out[0].norm(dim=-1)
        assert frame["first token"][row] == pytest.approx(float(norms[0]), rel=1e-5)
        assert frame["other tokens"][row] == pytest.approx(float(norms[1:].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="one token"):
        residual_norms(lm, "A")


def test_final_norm_norms_before_are_the_last_block_and_after_are_closed_form(tiny_lm: LoadedModel) -> None:
    lm, prompt = tiny_lm, "The Eiffel Tower is located in the city of"
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    with torch.no_grad():  # gamma = 1 (and beta = 0): the norm is then x / s(x) exactly, whatever x's length
        norm.weight.fill_(1.0)
        if getattr(norm, "bias", None) is not None:
            norm.bias.zero_()
    frame = final_norm_norms(lm, prompt)
    with Trace(lm.model, lm.adapter.block(lm.n_layers - 1)) as last:
        lm.model(input_ids=ids)
    out = last.output[0] if isinstance(last.output, tuple) else last.output
    before, x = out[0].norm(dim=-1), out[0].double()  # [pos], [pos, d_model]
    if lm.adapter.centred_norm:
        x = x - x.mean(-1, keepdim=True)
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    s2 = x.pow(2).mean(-1)  # RMS^2, or the variance after centring
    after = (lm.d_model * s2 / (s2 + eps)).sqrt()  # || x / sqrt(s^2 + eps) ||
    assert frame.loc["first token", "before final norm"] == pytest.approx(float(before[0]), rel=1e-5)
    assert frame.loc["other tokens", "before final norm"] == pytest.approx(float(before[1:].mean()), rel=1e-5)
    assert frame.loc["first token", "after final norm"] == pytest.approx(float(after[0]), rel=1e-4)
    assert frame.loc["other tokens", "after final norm"] == pytest.approx(float(after[1:].mean()), rel=1e-4)


def test_final_norm_norms_refuses_a_one_token_prompt() -> None:
    with pytest.raises(ValueError, match="one token"):
        final_norm_norms(load_model("tiny-gpt2"), "A")  # GPT-2 adds no BOS token: one token, nothing to compare


def test_an_edit_of_a_first_token_subject_is_read_only_after_a_prefix(restored_smollm: LoadedModel) -> None:
    smollm = restored_smollm
    facebook = next(r for r in map(edit_request, load_factset(known=True, n=10)) if r.subject == "Facebook")
    assert subject_at_first_token(smollm, facebook)
    # The attention sink. Measured: at the output of block 4 (L, where z is read) 838 against 94 on average for the
    # other tokens; from block 11 on about 24,600 against 150-630.
    norms = residual_norms(smollm, facebook.text)
    ratio = norms["first token"] / norms["other tokens"]
    assert ratio[5] > 5 and ratio.max() > 100, ratio
    with edits_applied(smollm, [facebook]):
        wins = efficacy_by_prefix(smollm, [facebook], ["", "\n", ". "]).iloc[0]
    # Measured: the bare prompt keeps "the United States" (NLL 5.0 for Sweden vs 0.9); any prefix reads the edit
    # (0.02 vs 3.7).
    assert not wins["''"] and wins["'\\n'"] and wins["'. '"], wins
