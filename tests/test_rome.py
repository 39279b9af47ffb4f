"""ROME (one layer, rank one, equality-constrained, applied in sequence): tiny models of every family, then the bundled
model."""

import pytest
import torch
from helpers import WeightSnapshot

import memit_lab.rome as rome_module
from memit_lab import LoadedModel
from memit_lab.editing import NonFiniteUpdateError, edit_keys, hidden_at_subject
from memit_lab.facts import KNOWN_FACTS
from memit_lab.methods import edits_applied
from memit_lab.prompts import target_scores, top_predictions
from memit_lab.requests import ConflictingRequestsError, EditRequest, InvalidRequestError, request_from_fact
from memit_lab.rome import RomeHyperParams, apply_rome
from memit_lab.stats import key_second_moment
from memit_lab.zopt import ZParams

REQUESTS = [
    EditRequest("The {} is located in", "Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Japan", "Paris"),
]
CONTEXTS = ("{}", "Paris is the capital of France. {}", "Hello. {}")
LAYER = 1
# Tiny random models have small hidden states: the paper's decay (scaled by 1/||h||^2) would dominate.
TINY = RomeHyperParams(layer=LAYER, z=ZParams(steps=8, clamp=4.0, weight_decay=0.0, kl_weight=0.0, stop="loss"))


def _moments(lm: LoadedModel) -> dict[int, torch.Tensor]:
    return key_second_moment(lm, [LAYER], n_tokens=512, progress=False, use_cache=False)


def _w(lm: LoadedModel) -> torch.Tensor:
    return lm.adapter.w_out_weight(lm.model, LAYER).detach().double().clone()


def test_update_writes_delta_exactly_on_the_averaged_key(tiny_lm: LoadedModel) -> None:
    """(W + Delta) k = W k + delta for the averaged key k, by a rank-one Delta on W_out of one layer only.

    The reference's mix (averaged key in C^-1 k, bare key in the denominator) would scale Delta k by
    (k . C^-1 k) / (k_bare . C^-1 k) and fail this.
    """
    saved = WeightSnapshot(tiny_lm)
    key = edit_keys(tiny_lm, REQUESTS[:1], LAYER, CONTEXTS)[:, 0].double()
    w0 = _w(tiny_lm)
    result = apply_rome(tiny_lm, REQUESTS[:1], TINY, second_moments=_moments(tiny_lm), contexts=CONTEXTS)
    delta_w = _w(tiny_lm) - w0
    wanted = result.z[0].delta[0].double()
    torch.testing.assert_close(delta_w @ key, wanted, rtol=1e-4, atol=1e-5 * float(wanted.norm()))
    assert int(torch.linalg.matrix_rank(delta_w, rtol=1e-5)) == 1
    changed = saved.changed()
    assert changed == {tiny_lm.adapter.w_out_module(LAYER) + ".weight"}
    result.restore()
    assert saved.unchanged()


def test_bare_prompt_reaches_z_and_prediction_moves(tiny_lm: LoadedModel) -> None:
    """With the bare prompt as the only context the key is the bare key: h^l becomes z exactly."""
    r = REQUESTS[0]
    before = float(target_scores(tiny_lm, [r.text], [r.target_new]).mean_logprob[0])
    result = apply_rome(tiny_lm, [r], TINY, second_moments=_moments(tiny_lm), contexts=("{}",))
    z = result.z[0]
    assert float(z.delta.norm()) > 0.1 * float(z.h.norm())  # the optimisation moved
    torch.testing.assert_close(hidden_at_subject(tiny_lm, [r], LAYER), z.z, rtol=1e-4, atol=1e-4)
    after = float(target_scores(tiny_lm, [r.text], [r.target_new]).mean_logprob[0])
    assert after > before and z.losses[0][-1] < z.losses[0][0], (before, after)
    result.restore()


def test_each_edit_is_made_on_the_model_the_previous_one_left(tiny_lm: LoadedModel) -> None:
    moments = _moments(tiny_lm)
    first = apply_rome(tiny_lm, REQUESTS[:1], TINY, second_moments=moments, contexts=CONTEXTS)
    h_second_after_first = hidden_at_subject(tiny_lm, REQUESTS[1:], LAYER)
    w_after_first = _w(tiny_lm)
    first.restore()
    h_second_unedited = hidden_at_subject(tiny_lm, REQUESTS[1:], LAYER)
    assert not torch.allclose(h_second_after_first, h_second_unedited)  # the first edit matters to the second
    both = apply_rome(tiny_lm, REQUESTS, TINY, second_moments=moments, contexts=CONTEXTS)
    torch.testing.assert_close(both.z[1].h, h_second_after_first, rtol=1e-5, atol=1e-6)
    # W = W0 + Delta_1 + Delta_2, with Delta_1 the single edit's update.
    assert float((_w(tiny_lm) - w_after_first).norm()) == pytest.approx(both.delta_norms[1], rel=1e-4)
    assert len(both.to_frame()) == 2
    both.restore()


def test_bad_batches_and_nan_updates_are_refused_with_no_weight_changed(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = WeightSnapshot(tiny_lm)
    moments = _moments(tiny_lm)
    conflicting = [REQUESTS[0], EditRequest("The {} is located in", "Eiffel Tower", "Berlin")]
    with pytest.raises(ConflictingRequestsError):
        apply_rome(tiny_lm, conflicting, TINY, second_moments=moments)
    with pytest.raises(InvalidRequestError):
        apply_rome(tiny_lm, [EditRequest("The Eiffel Tower is in", "Eiffel Tower", "Rome")], TINY)
    assert saved.unchanged()

    real = rome_module.rome_rank_one_update
    calls: list[int] = []

    def nan_on_second_edit(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        delta = real(*args)
        return delta * float("nan") if len(calls) == 2 else delta

    monkeypatch.setattr(rome_module, "rome_rank_one_update", nan_on_second_edit)
    with pytest.raises(NonFiniteUpdateError):
        apply_rome(tiny_lm, REQUESTS, TINY, second_moments=moments, contexts=CONTEXTS)
    assert len(calls) == 2  # the first edit was applied, and undone
    assert saved.unchanged()


def test_edits_applied_with_rome_restores(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    with edits_applied(tiny_lm, REQUESTS, "rome", TINY, second_moments=_moments(tiny_lm), contexts=CONTEXTS):
        assert not saved.unchanged()
    assert saved.unchanged()


# --- the bundled model -----------------------------------------------------------------------------------------


def test_four_known_facts_edited_in_sequence(restored_smollm: LoadedModel) -> None:
    lm = restored_smollm
    chosen = [KNOWN_FACTS[i] for i in (0, 2)] + [f for f in KNOWN_FACTS if f.relation != KNOWN_FACTS[0].relation][:2]
    requests = []
    for f in chosen:
        other = next(g.target for g in KNOWN_FACTS if g.relation == f.relation and g.target != f.target)
        requests.append(request_from_fact(f, other))
    subjects, objects = {f.subject for f in chosen}, {r.target_new for r in requests}
    unrelated = [f for f in KNOWN_FACTS if f.subject not in subjects and f.target not in objects][::4][:6]
    hp = RomeHyperParams.for_model(lm).replace(stats_tokens=8192)
    with edits_applied(lm, requests, "rome", hp) as result:
        new = target_scores(lm, [r.text for r in requests], [r.target_new for r in requests]).mean_logprob
        true = target_scores(lm, [r.text for r in requests], [r.target_true or "" for r in requests]).mean_logprob
        preds = top_predictions(lm, [f.prompt for f in unrelated], k=1)
    assert isinstance(result, rome_module.RomeResult) and result.layer == 4
    assert int((new > true).sum()) >= 3, (new, true)
    kept = [
        f.target.startswith(p[0][0].strip()) and p[0][0].strip() != "" for f, p in zip(unrelated, preds, strict=True)
    ]
    assert sum(kept) >= 5, list(zip([f.prompt for f in unrelated], preds, strict=True))
