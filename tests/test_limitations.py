"""Directed edits: the two-way facts, their multiple-choice scores, and the update's response to keys."""

import numpy as np
import pytest
import torch

from memit_lab import load_model
from memit_lab.evaluate import mean_nll
from memit_lab.hooks import Trace
from memit_lab.limitations import (
    TWO_WAY_FACTS,
    direction_scores,
    forward_requests,
    inverse_requests,
    update_response,
)
from memit_lab.memit import WeightBackup
from memit_lab.requests import check_requests


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
