"""FT-W (fine-tuning W_out of one layer under an L-infinity constraint): tiny models of every family, then the
bundled model."""

import pytest
import torch
from helpers import WeightSnapshot

import memit_lab.finetune as ft_module
from memit_lab import LoadedModel
from memit_lab.editing import NonFiniteUpdateError
from memit_lab.facts import KNOWN_FACTS
from memit_lab.finetune import FtHyperParams, apply_ft, target_nll
from memit_lab.methods import edits_applied
from memit_lab.prompts import padded_batch, target_scores
from memit_lab.requests import ConflictingRequestsError, EditRequest, InvalidRequestError, request_from_fact
from memit_lab.zopt import tokenise_prompt

REQUESTS = [
    EditRequest("The {} is located in", "Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Japan", "Paris"),
    EditRequest("{} plays", "Lionel Messi", "tennis"),
]
LAYER = 1


def _new_logprob(lm: LoadedModel) -> torch.Tensor:
    return target_scores(lm, [r.text for r in REQUESTS], [r.target_new for r in REQUESTS]).mean_logprob


def test_loss_is_the_full_models_teacher_forced_nll(tiny_lm: LoadedModel) -> None:
    prompts = [tokenise_prompt(tiny_lm, r, "{}", r.target_new) for r in REQUESTS]
    ids, mask = padded_batch(tiny_lm.tokenizer, [p.ids for p in prompts], tiny_lm.device)
    got = target_nll(tiny_lm, prompts, ids, mask)
    # Independently: full logits of each prompt alone, the target tokens' log-probabilities.
    expected = torch.stack([-torch.tensor(0.0) - s for s in _new_logprob(tiny_lm)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_only_w_out_of_its_layer_moves_within_eps_and_restores(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    w0 = tiny_lm.adapter.w_out_weight(tiny_lm.model, LAYER).detach().clone()
    before = _new_logprob(tiny_lm)
    eps = 2e-3
    result = apply_ft(tiny_lm, REQUESTS, FtHyperParams(layer=LAYER, steps=10, lr=1e-3, norm_constraint=eps))
    change = tiny_lm.adapter.w_out_weight(tiny_lm.model, LAYER) - w0
    assert float(change.abs().max()) <= eps + 1e-6 and result.max_change == pytest.approx(float(change.abs().max()))
    assert float(change.abs().max()) > 0.9 * eps  # the constraint was active: something was clipped
    changed = saved.changed()
    assert changed == {tiny_lm.adapter.w_out_module(LAYER) + ".weight"}
    after = _new_logprob(tiny_lm)
    assert float(after.mean()) > float(before.mean())
    assert -float(after.mean()) == pytest.approx(result.losses[-1], abs=1e-4)  # the reported loss is the model's
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    result.restore()
    assert saved.unchanged()


def test_unconstrained_fine_tuning_stops_once_the_loss_is_low(tiny_lm: LoadedModel) -> None:
    # A random tiny model cannot make any token very likely (small logits): the threshold is relative.
    r = REQUESTS[0]
    start = -float(target_scores(tiny_lm, [r.text], [r.target_new]).mean_logprob[0])
    stop = start - 0.5
    hp = FtHyperParams(layer=tiny_lm.n_layers - 1, steps=200, lr=3e-2, norm_constraint=None, stop_loss=stop)
    result = apply_ft(tiny_lm, [r], hp)
    assert result.losses[0] == pytest.approx(start, abs=1e-4)
    assert result.losses[-1] < stop <= min(result.losses[:-1])  # stopped at the first pass below the threshold
    assert len(result.losses) < 201
    result.restore()


def test_bad_batches_and_nan_updates_are_refused_with_no_weight_changed(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = WeightSnapshot(tiny_lm)
    hp = FtHyperParams(layer=LAYER, steps=3)
    with pytest.raises(ConflictingRequestsError):
        apply_ft(tiny_lm, [REQUESTS[0], EditRequest("The {} is located in", "Eiffel Tower", "Berlin")], hp)
    with pytest.raises(InvalidRequestError):
        apply_ft(tiny_lm, [EditRequest("The {} is located in", "Eiffel Tower", "")], hp)
    assert saved.unchanged()

    def poisoned_clip(w: torch.Tensor, w0: torch.Tensor, eps: float) -> None:
        w[0, 0] = float("nan")

    monkeypatch.setattr(ft_module, "clip_change", poisoned_clip)
    with pytest.raises(NonFiniteUpdateError):
        apply_ft(tiny_lm, REQUESTS, hp)
    assert saved.unchanged()
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_edits_applied_with_ft_restores(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    with edits_applied(tiny_lm, REQUESTS, "ft", FtHyperParams(layer=LAYER, steps=3)):
        assert not saved.unchanged()
    assert saved.unchanged()


def test_bundled_defaults_raise_the_new_objects(restored_smollm: LoadedModel) -> None:
    lm = restored_smollm
    facts = KNOWN_FACTS[:3]
    requests = [
        request_from_fact(f, next(g.target for g in KNOWN_FACTS if g.relation == f.relation and g.target != f.target))
        for f in facts
    ]
    texts, new = [r.text for r in requests], [r.target_new for r in requests]
    before = target_scores(lm, texts, new).mean_logprob
    hp = FtHyperParams.for_model(lm).replace(steps=8)  # a shortened run: the first steps do most (CI time)
    with edits_applied(lm, requests, "ft", hp) as result:
        after = target_scores(lm, texts, new).mean_logprob
    assert isinstance(result, ft_module.FtResult)
    assert hp.norm_constraint is not None and result.max_change <= hp.norm_constraint + 1e-6  # float32 rounding
    assert bool((after > before).all()), (before, after)
