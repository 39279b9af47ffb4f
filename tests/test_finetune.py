"""FT-L (W_out of one layer under an L-infinity constraint) and FT-W (every weight of one block, weight decay): tiny
models of every family, then the bundled model."""

import math

import pytest
import torch
from helpers import WeightSnapshot

import memit_lab.finetune as ft_module
from memit_lab import LoadedModel
from memit_lab.editing import NonFiniteUpdateError
from memit_lab.experiments import default_hparams
from memit_lab.facts import KNOWN_FACTS
from memit_lab.finetune import FtHyperParams, FtWHyperParams, apply_ft, apply_ft_w, block_parameters, target_nll
from memit_lab.hparams import FT_W_DECAY_LAW, MODEL_DEFAULTS
from memit_lab.methods import apply_edits, edits_applied, get_method
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


# --- FT-L -----------------------------------------------------------------------------------------------------------


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
    assert changed == {tiny_lm.adapter.w_out_module(LAYER) + ".weight"} == set(result.parameters)
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
    with pytest.raises(ValueError, match=f"choose 0-{tiny_lm.n_layers - 1}"):
        apply_ft(tiny_lm, REQUESTS, hp, layer=tiny_lm.n_layers)
    with pytest.raises(TypeError, match="FtHyperParams"):  # (the tests' run-time type checker may say it first)
        apply_ft(tiny_lm, REQUESTS, FtWHyperParams(layer=LAYER))  # type: ignore[arg-type]
    assert saved.unchanged()

    def poisoned_clip(w: torch.Tensor, w0: torch.Tensor, eps: float) -> None:
        w[0, 0] = float("nan")

    monkeypatch.setattr(ft_module, "clip_change", poisoned_clip)
    with pytest.raises(NonFiniteUpdateError):
        apply_ft(tiny_lm, REQUESTS, hp)
    assert saved.unchanged()
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_edits_applied_with_ft_l_and_its_old_name_restores(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    for name in ("ft-l", "ft"):  # "ft" is FT-L's name from before FT-W existed
        with edits_applied(tiny_lm, REQUESTS, name, FtHyperParams(layer=LAYER, steps=3)) as result:
            assert not saved.unchanged() and isinstance(result, ft_module.FtResult)
        assert saved.unchanged()


# --- FT-W -----------------------------------------------------------------------------------------------------------


def _last_position_nll(lm: LoadedModel, requests: list[EditRequest]) -> torch.Tensor:
    """The reference's FT loss by hand: each prompt alone through the full model, every token of the new object
    scored at the prompt's last position, averaged over the object's tokens, then over the requests."""
    losses = []
    for r in requests:
        prompt = lm.tokenizer(r.text)["input_ids"]
        target = tokenise_prompt(lm, r, "{}", r.target_new).target_ids
        logp = lm.model(input_ids=torch.tensor([prompt])).logits[0, -1].float().log_softmax(-1)
        losses.append(-logp[list(target)].mean())
    return torch.stack(losses).mean()


def _block_names(lm: LoadedModel, layer: int) -> set[str]:
    return {n for n, _ in lm.model.named_parameters() if n.startswith(lm.adapter.block(layer) + ".")}


def test_ft_w_loss_scores_the_object_at_the_prompts_last_position(tiny_lm: LoadedModel) -> None:
    prompts = ft_module._tokenised(tiny_lm, REQUESTS, "last")
    ids, mask = padded_batch(tiny_lm.tokenizer, [p.ids for p in prompts], tiny_lm.device)
    with torch.no_grad():
        got = target_nll(tiny_lm, prompts, ids, mask).mean()
        expected = _last_position_nll(tiny_lm, REQUESTS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ft_w_changes_only_its_block_lowers_the_loss_and_restores(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    layer = tiny_lm.n_layers - 1
    with torch.no_grad():
        start = float(_last_position_nll(tiny_lm, REQUESTS))
    result = apply_ft_w(tiny_lm, REQUESTS, FtWHyperParams(layer=layer, steps=10, lr=1e-3))
    block = _block_names(tiny_lm, layer)
    assert set(result.parameters) == block == set(block_parameters(tiny_lm, layer))
    changed = saved.changed()
    w_out = tiny_lm.adapter.w_out_module(layer) + ".weight"
    attn = {n for n in block if n.startswith(tiny_lm.adapter.attn_module(layer))}
    # Nothing outside the block moves; inside it W_out, W_in, attention and the norms all do.
    assert changed <= block and w_out in changed and changed & attn and len(changed) >= len(block) // 2
    with torch.no_grad():
        end = float(_last_position_nll(tiny_lm, REQUESTS))
    assert result.losses[0] == pytest.approx(start, abs=1e-4) and result.losses[-1] == pytest.approx(end, abs=1e-4)
    assert end < start - 0.1
    assert result.weight_decay == pytest.approx(3 ** FT_W_DECAY_LAW[0] * math.exp(FT_W_DECAY_LAW[1]))
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    result.restore()
    assert saved.unchanged()


def _adam_with_l2_by_hand(
    lm: LoadedModel, batches: list[list[EditRequest]], layer: int, lr: float, decay: float, decoupled: bool = False
) -> dict[str, torch.Tensor]:
    """Adam (betas 0.9, 0.999, eps 1e-8) on block ``layer``, one step per batch, written out: the L2 kind adds
    decay * w to the gradient (torch.optim.Adam's weight_decay); ``decoupled`` (AdamW) shrinks w by lr * decay
    instead. Returns the block's weights after the steps; the model is left as it was."""
    params = block_parameters(lm, layer)
    w = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(v) for n, v in w.items()}
    v2 = {n: torch.zeros_like(v) for n, v in w.items()}
    original = {n: p.detach().clone() for n, p in params.items()}
    for t, batch in enumerate(batches, start=1):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w[n])
        for p in params.values():
            p.requires_grad_(True)
        grads = torch.autograd.grad([_last_position_nll(lm, batch)], list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            p.requires_grad_(False)
            g = torch.zeros_like(w[n]) if g is None else g
            if not decoupled:
                g = g + decay * w[n]
            m[n] = 0.9 * m[n] + 0.1 * g
            v2[n] = 0.999 * v2[n] + 0.001 * g * g
            step = lr * (m[n] / (1 - 0.9**t)) / ((v2[n] / (1 - 0.999**t)).sqrt() + 1e-8)
            w[n] = (w[n] * (1 - lr * decay) if decoupled else w[n]) - step
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(original[n])
    return w


@pytest.mark.parametrize("batch", [3, 1])
def test_ft_w_takes_adams_steps_with_l2_weight_decay(tiny_lm: LoadedModel, batch: int) -> None:
    lm, lr, decay = tiny_lm, 1e-3, 0.5
    layer = 1
    batches = [REQUESTS[lo : lo + batch] for lo in range(0, len(REQUESTS), batch)]
    expected = _adam_with_l2_by_hand(lm, batches, layer, lr, decay)
    without = _adam_with_l2_by_hand(lm, batches, layer, lr, 0.0)
    adamw = _adam_with_l2_by_hand(lm, batches, layer, lr, decay, decoupled=True)
    result = apply_ft_w(lm, REQUESTS, FtWHyperParams(layer=layer, steps=1, lr=lr, weight_decay=decay, batch=batch))
    got = {n: p.detach().clone() for n, p in block_parameters(lm, layer).items()}
    result.restore()

    def off(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        """The share of entries further apart than 1 % of a step."""
        far = sum(int(((a[n] - b[n]).abs() > 1e-2 * lr).sum()) for n in a)
        return far / sum(t.numel() for t in a.values())

    # Adam's step is ~lr * sign(g + decay * w): an entry whose g + decay * w sits at rounding level can flip, so a
    # few in a thousand may differ; a wrong decay (none, or AdamW's decoupled one) moves a large share.
    assert off(got, expected) < 2e-3
    assert off(expected, without) > 0.05 and off(expected, adamw) > 0.05
    assert result.weight_decay == decay and len(result.losses) == 2


def test_ft_w_takes_no_step_on_a_batch_whose_loss_is_already_low(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    result = apply_ft_w(tiny_lm, REQUESTS, FtWHyperParams(layer=LAYER, steps=5, stop_loss=1e6))
    assert saved.unchanged() and len(result.losses) == 2 and result.losses[0] == result.losses[1]
    assert result.max_change == 0.0


def test_ft_w_refuses_bad_input_and_restores_after_a_nan(tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    saved = WeightSnapshot(tiny_lm)
    hp = FtWHyperParams(layer=LAYER, steps=2)
    with pytest.raises(ConflictingRequestsError):
        apply_ft_w(tiny_lm, [REQUESTS[0], EditRequest("The {} is located in", "Eiffel Tower", "Berlin")], hp)
    with pytest.raises(InvalidRequestError):
        apply_ft_w(tiny_lm, [EditRequest("The {} is located in", "Eiffel Tower", "")], hp)
    with pytest.raises(ValueError, match=f"does not fit a model of {tiny_lm.n_layers} layers"):
        apply_ft_w(tiny_lm, REQUESTS, hp.replace(layer=tiny_lm.n_layers))
    with pytest.raises(TypeError, match="FtWHyperParams"):  # (the tests' run-time type checker may say it first)
        apply_ft_w(tiny_lm, REQUESTS, FtHyperParams(layer=LAYER))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ft-w takes FtWHyperParams, got FtHyperParams"):
        apply_edits(tiny_lm, REQUESTS, "ft-w", FtHyperParams(layer=LAYER))
    for bad, match in [
        ({"lr": 0.0}, "lr must be"),
        ({"weight_decay": -1.0}, "weight_decay must be"),
        ({"decay_law": (1.0, math.inf)}, "decay_law must be"),
        ({"loss_at": "first"}, "loss_at must be"),
        ({"steps": 0}, "steps and batch"),
    ]:
        with pytest.raises(ValueError, match=match):
            FtWHyperParams(layer=LAYER, **bad)  # type: ignore[arg-type]
    assert saved.unchanged()

    # The first pass steps; the loss then turns NaN: every weight of the block goes back.
    calls = {"n": 0}
    real = ft_module.target_nll

    def poisoned(*args: object) -> torch.Tensor:
        calls["n"] += 1
        nll = real(*args)  # type: ignore[arg-type]
        return nll * float("nan") if calls["n"] > 1 else nll

    monkeypatch.setattr(ft_module, "target_nll", poisoned)
    with pytest.raises(NonFiniteUpdateError, match="lower lr"):
        apply_ft_w(tiny_lm, REQUESTS, hp)
    assert calls["n"] > 1 and saved.unchanged()
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_the_registry_and_the_experiments_know_both_and_the_old_name(tiny_lm: LoadedModel) -> None:
    assert (get_method("ft").name, get_method("ft-l").label, get_method("ft-w").label) == ("ft-l", "FT-L", "FT-W")
    assert get_method("ft-w").hparams is FtWHyperParams and get_method("ft").hparams is FtHyperParams
    assert default_hparams(tiny_lm, "ft") == default_hparams(tiny_lm, "ft-l") == FtHyperParams.for_model(tiny_lm)
    # Without measurements: the paper's GPT-J block 21 of 28, scaled (3 layers: round(2.25) = 2).
    assert default_hparams(tiny_lm, "ft-w") == FtWHyperParams(layer=2)
    saved = WeightSnapshot(tiny_lm)
    with edits_applied(tiny_lm, REQUESTS, "ft-w", FtWHyperParams(layer=0, steps=2)):
        assert saved.changed() <= _block_names(tiny_lm, 0) and not saved.unchanged()
    assert saved.unchanged()


def test_decay_follows_the_papers_power_law_in_the_number_of_edits() -> None:
    hp = FtWHyperParams(layer=0)
    a, b = FT_W_DECAY_LAW
    assert hp.decay_for(1) == pytest.approx(math.exp(b)) and hp.decay_for(1) == pytest.approx(1.1687, abs=1e-4)
    assert hp.decay_for(10) / hp.decay_for(100) == pytest.approx(10**-a)  # less decay as the edits grow
    assert hp.replace(weight_decay=0.0).decay_for(100) == 0.0


# --- the bundled model ----------------------------------------------------------------------------------------------


def _bundled_requests() -> list[EditRequest]:
    facts = KNOWN_FACTS[:3]
    return [
        request_from_fact(f, next(g.target for g in KNOWN_FACTS if g.relation == f.relation and g.target != f.target))
        for f in facts
    ]


def test_bundled_defaults_raise_the_new_objects(restored_smollm: LoadedModel) -> None:
    lm = restored_smollm
    requests = _bundled_requests()
    texts, new = [r.text for r in requests], [r.target_new for r in requests]
    before = target_scores(lm, texts, new).mean_logprob
    hp = FtHyperParams.for_model(lm).replace(steps=8)  # a shortened run: the first steps do most (CI time)
    assert hp == MODEL_DEFAULTS["smollm2-135m"]["ft-l"].replace(steps=8)
    with edits_applied(lm, requests, "ft-l", hp) as result:
        after = target_scores(lm, texts, new).mean_logprob
    assert isinstance(result, ft_module.FtResult)
    assert hp.norm_constraint is not None and result.max_change <= hp.norm_constraint + 1e-6  # float32 rounding
    assert bool((after > before).all()), (before, after)


def test_bundled_ft_w_defaults_raise_the_new_objects(restored_smollm: LoadedModel) -> None:
    lm = restored_smollm
    requests = _bundled_requests()
    texts, new = [r.text for r in requests], [r.target_new for r in requests]
    before = target_scores(lm, texts, new).mean_logprob
    hp = FtWHyperParams.for_model(lm).replace(steps=8)
    assert hp == MODEL_DEFAULTS["smollm2-135m"]["ft-w"].replace(steps=8)
    with edits_applied(lm, requests, "ft-w", hp) as result:
        after = target_scores(lm, texts, new).mean_logprob
    assert isinstance(result, ft_module.FtResult) and result.layer == hp.layer
    assert bool((after > before).all()), (before, after)
