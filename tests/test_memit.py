"""z optimisation (eq. 16) and MEMIT's Algorithm 1: tiny models of every family, then the bundled model."""

import pytest
import torch
from helpers import WeightSnapshot

import memit_lab.memit as memit_module
from memit_lab import LoadedModel, load_model
from memit_lab.editing import NonFiniteUpdateError, edit_keys, hidden_at_subject
from memit_lab.hooks import Trace
from memit_lab.memit import MemitHyperParams, apply_memit
from memit_lab.methods import edits_applied
from memit_lab.requests import ConflictingRequestsError, EditRequest, InvalidRequestError
from memit_lab.stats import key_second_moment
from memit_lab.zopt import ZParams, _losses, _prepare, optimise_z, tokenise_prompt

REQUESTS = [
    EditRequest("The {} is located in", "Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Japan", "Paris"),
    EditRequest("{} plays", "Lionel Messi", "tennis"),
]
CONTEXTS = ("{}", "Paris is the capital of France. {}", "Hello. {}")
# Tiny random models have small hidden states (norm ~0.3): the paper's weight decay, scaled by
# 1/||h||^2, would dominate, so the tiny-model checks switch it and the KL term off.
TINY_Z = ZParams(steps=10, lr=0.5, clamp=4.0, weight_decay=0.0, kl_weight=0.0, stop="loss")


def _tiny_moments(lm: LoadedModel, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    # The default corpus: varied text, so E[k k^T] is well conditioned (one repeated sentence
    # gives tiny-gpt2's tokenizer, trained on such sentences, too few tokens and too few directions).
    return key_second_moment(lm, layers, n_tokens=512, progress=False, use_cache=False)


# --- eq. 16: the fast loss is the straightforward loss ----------------------------------------------------------


def _straightforward_loss(
    lm: LoadedModel, requests: list[EditRequest], layer: int, delta: torch.Tensor, params: ZParams
) -> torch.Tensor:
    """Full model, full logits, delta added by a hook at every prompt's subject token: the loss per request."""
    losses = []
    for r, d in zip(requests, delta, strict=True):
        nll = []
        for context in CONTEXTS:
            p = tokenise_prompt(lm, r, context, r.target_new)

            def add(out: torch.Tensor, name: str, at: int = p.subject_last, d: torch.Tensor = d) -> torch.Tensor:
                out = out.clone()
                out[0, at] += d
                return out

            with torch.no_grad(), Trace(lm.model, lm.adapter.block(layer), edit_output=add):
                logp = lm.model(torch.tensor([p.ids])).logits[0].log_softmax(-1)
            nll.append(-logp[list(p.predict_at), list(p.target_ids)].mean())
        kl_prompt = tokenise_prompt(lm, EditRequest(params.kl_template, r.subject, r.target_new), "{}", None)
        with torch.no_grad():
            init = lm.model(torch.tensor([kl_prompt.ids])).logits[0, -1].log_softmax(-1)

            def add_kl(out: torch.Tensor, name: str, d: torch.Tensor = d) -> torch.Tensor:
                out = out.clone()
                out[0, -1] += d
                return out

            with Trace(lm.model, lm.adapter.block(layer), edit_output=add_kl):
                cur = lm.model(torch.tensor([kl_prompt.ids])).logits[0, -1].log_softmax(-1)
        h = hidden_at_subject(lm, [r], layer)[0]
        kl = (cur.exp() * (cur - init)).sum()
        losses.append(torch.stack(nll).mean() + params.kl_weight * kl + params.weight_decay * d.norm() / h.norm() ** 2)
    return torch.stack(losses)


def test_fast_loss_equals_full_forward_loss(tiny_lm: LoadedModel) -> None:
    layer = 1
    params = ZParams(kl_weight=0.5, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    delta = 0.5 * torch.randn(len(REQUESTS), tiny_lm.d_model, generator=g)
    chunk = _prepare(tiny_lm, REQUESTS, layer, CONTEXTS, params)
    assert len(chunk.groups) > 1  # rows of several suffix lengths, each length its own pass
    with torch.no_grad():
        nll, kl, wd = _losses(tiny_lm, chunk, layer, delta, torch.arange(len(REQUESTS)), params)
    expected = _straightforward_loss(tiny_lm, REQUESTS, layer, delta, params)
    torch.testing.assert_close(nll + kl + wd, expected, rtol=1e-4, atol=1e-4)


def test_batched_and_per_request_z_agree(tiny_lm: LoadedModel) -> None:
    batched = optimise_z(tiny_lm, REQUESTS, 1, TINY_Z, contexts=CONTEXTS)
    single = optimise_z(tiny_lm, REQUESTS, 1, TINY_Z, contexts=CONTEXTS, batched=False)
    torch.testing.assert_close(batched.z, single.z, rtol=1e-4, atol=1e-4)
    assert [len(c) for c in batched.losses] == [len(c) for c in single.losses]
    assert all(c[-1] < c[0] for c in batched.losses)  # the optimisation did something


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-gptj", "tiny-neox", "tiny-qwen2"])  # tiny-llama's tokenizer
def test_subject_at_the_first_token_optimises_without_a_prefix_cache(name: str) -> None:  # adds BOS: never at 0
    # Every row of the chunk has its subject at position 0: no prefix, so no key/value cache is passed, and the
    # model must not build one that the Adam steps would keep appending to (it made the second step fail).
    lm = load_model(name)
    subject = next(w for w in ("Paris", "The", "I", "A") if len(lm.tokenizer(w)["input_ids"]) == 1)
    request = EditRequest("{} is located in", subject, "Rome")
    assert tokenise_prompt(lm, request, "{}", "Rome").subject_last == 0
    res = optimise_z(lm, [request], 1, TINY_Z, contexts=("{}",))
    assert len(res.losses[0]) == TINY_Z.steps and res.losses[0][-1] < res.losses[0][0]


def test_converged_request_stops_and_keeps_its_delta(tiny_lm: LoadedModel) -> None:
    # A stop threshold above the first loss: no step is taken, delta stays 0.
    res = optimise_z(tiny_lm, REQUESTS[:2], 1, ZParams(stop_loss=1e6), contexts=CONTEXTS)
    assert [len(c) for c in res.losses] == [1, 1]
    assert torch.equal(res.z, res.h)


def test_delta_is_clamped_relative_to_h(tiny_lm: LoadedModel) -> None:
    params = ZParams(steps=6, lr=5.0, clamp=0.3, weight_decay=0.0, kl_weight=0.0, stop="loss")
    res = optimise_z(tiny_lm, REQUESTS, 1, params, contexts=CONTEXTS)
    ratio = res.delta.norm(dim=-1) / res.h.norm(dim=-1)
    assert (ratio <= 0.3 + 1e-5).all() and (ratio > 0.29).any()


# --- Algorithm 1 on tiny models ------------------------------------------------------------------------------------


def _tiny_hparams(lm: LoadedModel) -> MemitHyperParams:
    return MemitHyperParams(layers=(0, 1), lam=1.0, z=TINY_Z)


def test_edit_changes_prediction_reaches_z_and_restores_bit_for_bit(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    texts = [r.text for r in REQUESTS]
    before = tiny_lm.model(**tiny_lm.tokenizer(texts[:1], return_tensors="pt")).logits[0, -1].softmax(-1)
    moments = _tiny_moments(tiny_lm, (0, 1))
    # The bare prompt only: the keys are then exactly the bare prompt's, so (small lambda) the
    # edited model must reach z on it; with context prefixes the keys are averages and it only nears z.
    result = apply_memit(tiny_lm, REQUESTS, _tiny_hparams(tiny_lm), second_moments=moments, contexts=("{}",))
    after = tiny_lm.model(**tiny_lm.tokenizer(texts[:1], return_tensors="pt")).logits[0, -1].softmax(-1)
    # The prompt's next-token distribution moved. A random tiny model's unembedding is weak (z optimisation
    # lowers the target's loss by only ~0.1 nat), so whether the edit *works* is checked on the bundled model
    # (test_experiments.py, ten known facts); here the claims are structural: z reached, bit-for-bit restore.
    assert (after - before).abs().sum() > 0.01
    # Algorithm 1's promise: h^L at the subject's last token is now z (small lambda: nearly exact).
    assert result.z is not None
    torch.testing.assert_close(hidden_at_subject(tiny_lm, REQUESTS, 1), result.z.z, rtol=1e-3, atol=1e-3)
    assert result.residual_after < 1e-3 < result.residual_before[0]
    changed = saved.changed()
    assert changed == {tiny_lm.adapter.w_out_module(layer) + ".weight" for layer in (0, 1)}
    result.restore()
    assert saved.unchanged()


def test_each_layer_takes_its_share_of_the_residual(tiny_lm: LoadedModel) -> None:
    """Eq. 20 with a huge lambda (each update tiny, so layers barely interact): Delta^l k^l = r / (L - l + 1)."""
    moments = _tiny_moments(tiny_lm, (0, 1))
    hp = MemitHyperParams(layers=(0, 1), lam=1.0, z=TINY_Z)
    keys0 = edit_keys(tiny_lm, REQUESTS, 0, CONTEXTS)
    w0 = tiny_lm.adapter.w_out_weight(tiny_lm.model, 0).detach().clone().double()
    result = apply_memit(tiny_lm, REQUESTS, hp, second_moments=moments, contexts=CONTEXTS)
    assert result.z is not None
    delta0 = tiny_lm.adapter.w_out_weight(tiny_lm.model, 0).double() - w0
    share = (result.z.z - result.z.h).double().T / 2  # first of two layers: half the residual
    # With small lambda eq. 14 writes the share (nearly) exactly onto the keys.
    torch.testing.assert_close(delta0 @ keys0.double(), share, rtol=2e-2, atol=2e-3)
    result.restore()


def test_shared_targets_give_the_weights_of_a_run_of_its_own(tiny_lm: LoadedModel) -> None:
    """z optimised once for a larger batch, then sliced, writes (nearly) the same Delta as MEMIT's own z."""
    moments = _tiny_moments(tiny_lm, (0, 1))
    hp = _tiny_hparams(tiny_lm)
    saved = WeightSnapshot(tiny_lm)
    own = apply_memit(tiny_lm, REQUESTS[1:], hp, second_moments=moments, contexts=CONTEXTS)
    w_own = [tiny_lm.adapter.w_out_weight(tiny_lm.model, layer).detach().clone() for layer in (0, 1)]
    own.restore()
    pooled = optimise_z(tiny_lm, REQUESTS, 1, hp.z, contexts=CONTEXTS).select(range(1, len(REQUESTS)))
    shared = apply_memit(tiny_lm, REQUESTS[1:], hp, second_moments=moments, targets=pooled)
    for layer, w in zip((0, 1), w_own, strict=True):
        torch.testing.assert_close(tiny_lm.adapter.w_out_weight(tiny_lm.model, layer), w, rtol=1e-4, atol=1e-6)
    assert shared.z is pooled and not saved.unchanged()
    shared.restore()
    assert saved.unchanged()


def test_targets_from_elsewhere_are_refused_with_no_weight_changed(tiny_lm: LoadedModel) -> None:
    moments = _tiny_moments(tiny_lm, (0, 1))
    hp = _tiny_hparams(tiny_lm)
    z = optimise_z(tiny_lm, REQUESTS, 1, hp.z, contexts=CONTEXTS)
    saved = WeightSnapshot(tiny_lm)
    with pytest.raises(ValueError, match="L = 0"):  # optimised for another L
        apply_memit(tiny_lm, REQUESTS, hp, layers=(0,), second_moments=moments, targets=z)
    with pytest.raises(ValueError, match="other requests"):  # same count, other requests
        apply_memit(tiny_lm, REQUESTS[::-1], hp, second_moments=moments, targets=z)
    with pytest.raises(ValueError, match="contexts differ"):  # keys would be read at other contexts than z's
        apply_memit(tiny_lm, REQUESTS, hp, second_moments=moments, targets=z, contexts=CONTEXTS[:2])
    assert saved.unchanged()
    with edits_applied(tiny_lm, REQUESTS[:1], hparams=hp, second_moments=moments, contexts=CONTEXTS):
        edited = WeightSnapshot(tiny_lm)
        with pytest.raises(ValueError, match="weights have changed"):  # z of the unedited model
            apply_memit(tiny_lm, REQUESTS, hp, second_moments=moments, targets=z)
        assert edited.unchanged()
    assert saved.unchanged()


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ([REQUESTS[0], EditRequest("The {} is located in", "Eiffel Tower", "Berlin")], ConflictingRequestsError),
        ([EditRequest("The {} is located in", "", "Rome")], InvalidRequestError),
        ([EditRequest("The {} is located in", "Eiffel Tower", " ")], InvalidRequestError),
        ([EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")], InvalidRequestError),
    ],
)
def test_bad_batches_are_refused_with_no_weight_changed(
    tiny_lm: LoadedModel, bad: list[EditRequest], error: type[Exception]
) -> None:
    saved = WeightSnapshot(tiny_lm)
    with pytest.raises(error):
        apply_memit(tiny_lm, bad, _tiny_hparams(tiny_lm), second_moments=_tiny_moments(tiny_lm, (0, 1)))
    assert saved.unchanged()


def test_nan_update_is_refused_with_no_weight_changed(tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first layer's update is fine and applied; the second is NaN: both layers must be put back."""
    real = memit_module.insertion_update
    calls: list[int] = []

    def nan_on_second_layer(residuals: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        delta = real(residuals, keys, c0)
        return delta * float("nan") if len(calls) == 2 else delta

    monkeypatch.setattr(memit_module, "insertion_update", nan_on_second_layer)
    saved = WeightSnapshot(tiny_lm)
    with pytest.raises(NonFiniteUpdateError, match="layer 1"):
        apply_memit(
            tiny_lm, REQUESTS, _tiny_hparams(tiny_lm), second_moments=_tiny_moments(tiny_lm, (0, 1)), contexts=CONTEXTS
        )
    assert len(calls) == 2
    assert saved.unchanged()


def test_edits_applied_restores_also_after_an_error(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    moments = _tiny_moments(tiny_lm, (0, 1))
    inside = []

    def edit_then_fail() -> None:
        with edits_applied(
            tiny_lm, REQUESTS[:1], hparams=_tiny_hparams(tiny_lm), second_moments=moments, contexts=CONTEXTS
        ):
            inside.append(saved.unchanged())
            raise KeyError("inside the block")

    with pytest.raises(KeyError, match="inside the block"):
        edit_then_fail()
    assert inside == [False]
    assert saved.unchanged()


def test_missing_second_moment_is_refused_before_anything_changes(tiny_lm: LoadedModel) -> None:
    saved = WeightSnapshot(tiny_lm)
    with pytest.raises(ValueError, match="every layer"):
        apply_memit(tiny_lm, REQUESTS, _tiny_hparams(tiny_lm), second_moments={0: torch.eye(tiny_lm.d_mlp)})
    assert saved.unchanged()
