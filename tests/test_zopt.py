"""z optimisation (eq. 16): every knob of ZParams checked, contexts checked, the tokenizer left as found; the
exact savings give the previous implementation's z bit for bit; plateau stopping; reduced precision.

The optimisation itself (fast loss = full forward loss, batched = one at a time, clamping,
early stopping) is tested in test_memit.py, beside MEMIT, which consumes it.
"""

import logging
import math
from collections.abc import Sequence

import pytest
import torch

import memit_lab.replay as replay_module
from memit_lab import LoadedModel, load_model
from memit_lab.replay import readout, replay
from memit_lab.requests import EditRequest
from memit_lab.zopt import ZParams, _prepare, context_templates, optimise_z

REQUEST = EditRequest("The {} is located in", "Eiffel Tower", "Rome")
REQUESTS = [
    REQUEST,
    EditRequest("The capital of {} is", "Japan", "Paris"),
    EditRequest("{} plays the sport of", "Lionel Messi", "tennis"),
]
CONTEXTS = ("{}", "Paris is the capital of France. {}", "Hello. {}")
# Tiny random models have small hidden states: the weight decay and KL weights are scaled down to matter, not rule.
TINY_Z = ZParams(steps=8, lr=0.5, clamp=4.0, weight_decay=0.01, kl_weight=0.05, stop_loss=0.0, stop="loss")


@pytest.mark.parametrize(
    ("knob", "bad"),
    [
        ("steps", 0),
        ("chunk", 0),
        ("context_tokens", 0),
        ("n_contexts", -1),
        ("lr", 0.0),
        ("lr", -0.5),
        ("lr", math.inf),
        ("lr", math.nan),
        ("clamp", 0.0),
        ("clamp", -1.0),
        ("clamp", math.inf),
        ("weight_decay", -0.1),
        ("weight_decay", math.nan),
        ("kl_weight", -1.0),
        ("kl_weight", math.inf),
        ("stop_loss", -0.01),
        ("stop_loss", math.nan),
        ("stop", "never"),
        ("plateau_window", 0),
        ("plateau_nll", -1.0),
        ("plateau_rel", math.nan),
        ("dtype", "float64"),
    ],
)
def test_each_knob_is_refused_with_its_name(knob: str, bad: float) -> None:
    with pytest.raises(ValueError, match=f"ZParams.{knob} must be"):
        ZParams(**{knob: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(("knob", "bad"), [("steps", 2.5), ("n_contexts", True), ("lr", "0.5")])
def test_a_knob_of_the_wrong_type_is_refused(knob: str, bad: object) -> None:
    # TypeError where the test suite's run-time type checks see it first, else our ValueError.
    with pytest.raises((TypeError, ValueError)):
        ZParams(**{knob: bad})  # type: ignore[arg-type]


def test_the_knobs_limits_are_allowed() -> None:
    params = ZParams(steps=1, chunk=1, context_tokens=1, n_contexts=0, weight_decay=0.0, kl_weight=0.0, stop_loss=0.0)
    assert (params.steps, params.n_contexts, params.kl_weight) == (1, 0, 0.0)
    assert ZParams(lr=1e-3, clamp=1e-6).clamp == 1e-6


def test_a_kl_template_needs_one_subject_slot() -> None:
    for template in ("is a", "{} and {}"):
        with pytest.raises(ValueError, match="kl_template must contain one"):
            ZParams(kl_template=template)


@pytest.mark.parametrize(
    ("contexts", "message"),
    [
        (("{}", "{}"), "contexts must be distinct, got '{}' 2 times"),
        (("{}", "Hello. {}", "Hello. {}"), "contexts must be distinct, got 'Hello. {}' 2 times"),
        (("Hello. {}",), "include the bare"),
        (("{}", "Hello."), "contexts must each contain one"),
    ],
)
def test_bad_contexts_are_refused_before_any_work(contexts: tuple[str, ...], message: str) -> None:
    lm = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match=message):
        optimise_z(lm, [REQUEST], 1, ZParams(steps=2), contexts=contexts)


@pytest.mark.parametrize("side", ["left", "right"])
def test_sampling_contexts_leaves_the_padding_side_as_it_was(side: str) -> None:
    # The sampler pads on the left; it used to set the side back to "right" whatever it had been.
    lm = load_model("tiny-neox")
    lm.tokenizer.padding_side = side
    templates = context_templates(lm, n=2, length=3, use_cache=False)
    assert lm.tokenizer.padding_side == side and len(templates) == 3


# --- the exact savings: the previous implementation's z, bit for bit -------------------------------------------------


def _previous_losses(
    lm: LoadedModel, chunk: object, layer: int, delta: torch.Tensor, active: torch.Tensor, params: ZParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss before the exact savings: index tensors built, rows gathered and autograd on at every pass."""
    n = active.shape[0]
    nll, kl = torch.zeros(n), torch.zeros(n)
    for group in chunk.groups:  # type: ignore[attr-defined]
        rows = torch.isin(group.owner, active).nonzero()[:, 0]
        if not rows.numel():
            continue
        slot = torch.searchsorted(active, group.owner[rows])
        h = group.h_suffix.index_select(0, rows)
        h = torch.cat([(h[:, :1].float() + delta[slot][:, None]).to(h.dtype), h[:, 1:]], dim=1)
        h = replay(lm, group.suffix, layer + 1, h, prefix=group.prefix, rows=rows)
        where_row, where_pos, targets, weights, owners, kl_rows = [], [], [], [], [], []
        for j, (row, o) in enumerate(zip(rows.tolist(), slot.tolist(), strict=True)):
            if group.is_kl[row]:
                kl_rows.append(j)
                continue
            pos = group.predict_at[row]
            where_row += [j] * len(pos)
            where_pos += list(pos)
            targets += list(group.target_ids[row])
            weights += [1.0 / len(pos)] * len(pos)
            owners += [o] * len(pos)
        if targets:
            logp = readout(lm, h[torch.tensor(where_row), torch.tensor(where_pos)]).log_softmax(-1)
            token_nll = -logp.gather(1, torch.tensor(targets)[:, None])[:, 0]
            nll = nll.index_add(0, torch.tensor(owners), token_nll * torch.tensor(weights))
        if kl_rows:
            kl_slot = slot[kl_rows]
            kl_h = readout(lm, h[torch.tensor(kl_rows), 0]).log_softmax(-1)
            init = chunk.kl_init[active[kl_slot]]  # type: ignore[attr-defined]
            kl = kl.index_add(0, kl_slot, (kl_h.exp() * (kl_h - init)).sum(-1))
    wd = delta.norm(dim=-1) / chunk.h0[active].norm(dim=-1) ** 2  # type: ignore[attr-defined]
    return nll / chunk.n_prompts, params.kl_weight * kl, params.weight_decay * wd  # type: ignore[attr-defined]


def _previous_z(
    lm: LoadedModel, requests: Sequence[EditRequest], params: ZParams
) -> tuple[torch.Tensor, list[list[float]]]:
    """The previous Adam loop on one chunk of ``requests`` (in optimise_z's order): z and the loss curves."""
    chunk = _prepare(lm, requests, 1, CONTEXTS, params)
    deltas = [torch.zeros(lm.d_model, requires_grad=True) for _ in requests]
    opt = torch.optim.Adam(deltas, lr=params.lr)
    curves: list[list[float]] = [[] for _ in requests]
    max_norm = params.clamp * chunk.h0.norm(dim=-1)
    active = torch.arange(len(requests))
    for step in range(params.steps):
        delta = torch.stack([deltas[int(i)] for i in active.tolist()])
        loss = sum(_previous_losses(lm, chunk, 1, delta, active, params))
        for o, i in enumerate(active.tolist()):
            curves[i].append(float(loss[o].detach()))
        going = loss.detach() >= params.stop_loss
        if step == params.steps - 1 or not going.any():
            break
        opt.zero_grad(set_to_none=True)
        loss[going].sum().backward()
        for o, i in enumerate(active.tolist()):
            if not going[o]:
                deltas[i].grad = None
        opt.step()
        with torch.no_grad():
            for i in active.tolist():
                if deltas[i].norm() > max_norm[i]:
                    deltas[i].mul_(max_norm[i] / deltas[i].norm())
        active = active[going]
    return chunk.h0 + torch.stack([d.detach() for d in deltas]), curves


def test_exact_savings_give_the_previous_z_bit_for_bit(tiny_lm: LoadedModel) -> None:
    # A stop threshold between the requests' losses at the fourth pass: some stop early, so rows leave the groups.
    requests = sorted(REQUESTS, key=lambda r: len(r.text))  # optimise_z's order within a chunk
    _, free = _previous_z(tiny_lm, requests, TINY_Z)
    fourth = sorted(c[3] for c in free)
    params = ZParams(**{**TINY_Z.__dict__, "stop_loss": (fourth[0] + fourth[1]) / 2})
    z, curves = _previous_z(tiny_lm, requests, params)
    assert len({len(c) for c in curves}) > 1  # requests stopped at different passes
    res = optimise_z(tiny_lm, requests, 1, params, contexts=CONTEXTS)
    assert torch.equal(res.z, z)
    assert [list(c) for c in res.losses] == curves


# --- plateau stopping (not in the reference; off by default) ----------------------------------------------------------


def test_a_request_whose_loss_is_flat_stops_early_on_plateau() -> None:
    lm = load_model("tiny-gpt2")
    flat = ZParams(**{**TINY_Z.__dict__, "lr": 1e-9, "steps": 10})  # delta barely moves: the loss is flat
    assert [len(c) for c in optimise_z(lm, REQUESTS, 1, flat, contexts=CONTEXTS).losses] == [10] * 3
    plateau = ZParams(**{**flat.__dict__, "stop": "plateau"})
    res = optimise_z(lm, REQUESTS, 1, plateau, contexts=CONTEXTS)
    assert [len(c) for c in res.losses] == [plateau.plateau_window + 1] * 3


def test_plateau_stops_a_request_whose_nll_is_below_the_threshold() -> None:
    lm = load_model("tiny-gpt2")
    params = ZParams(**{**TINY_Z.__dict__, "stop": "plateau", "plateau_nll": 1e6})
    res = optimise_z(lm, REQUESTS, 1, params, contexts=CONTEXTS)
    assert [len(c) for c in res.losses] == [1] * 3 and torch.equal(res.z, res.h)


def test_plateau_stops_each_request_at_the_first_pass_that_improved_too_little() -> None:
    lm = load_model("tiny-gpt2")
    free = ZParams(**{**TINY_Z.__dict__, "weight_decay": 0.0, "kl_weight": 0.0, "steps": 10})
    curves = optimise_z(lm, REQUESTS, 1, free, contexts=CONTEXTS).losses
    plateau = ZParams(**{**free.__dict__, "stop": "plateau", "plateau_rel": 1e-3})
    res = optimise_z(lm, REQUESTS, 1, plateau, contexts=CONTEXTS)
    w = plateau.plateau_window
    for c, d in zip(curves, res.losses, strict=True):
        flat = [k for k in range(w, len(c)) if c[k - w] - c[k] < 1e-3 * c[k - w]]
        assert list(d) == list(c[: (flat[0] + 1 if flat else len(c))])  # the same passes until it stops
    assert {len(d) for d in res.losses} != {free.steps}  # some stopped early
    # Improving requests keep going: with no threshold, plateau stopping = the reference on falling curves.
    never = ZParams(**{**plateau.__dict__, "plateau_rel": 0.0, "plateau_nll": 0.0})
    assert optimise_z(lm, REQUESTS, 1, never, contexts=CONTEXTS).losses == curves


# --- reduced precision ------------------------------------------------------------------------------------------------


def test_bfloat16_z_is_close_to_float32(tiny_lm: LoadedModel) -> None:
    # Without the decay term, which on a tiny model's small h (||h|| ~ 0.2) makes the trajectory chaotic: there
    # any rounding moves z by a third of delta. Measured max ||z_bf16 - z_fp32|| / ||delta||: 0.004-0.013.
    params = ZParams(**{**TINY_Z.__dict__, "weight_decay": 0.0})
    f32 = optimise_z(tiny_lm, REQUESTS, 1, params, contexts=CONTEXTS)
    bf16 = optimise_z(tiny_lm, REQUESTS, 1, ZParams(**{**params.__dict__, "dtype": "bfloat16"}), contexts=CONTEXTS)
    relative = ((bf16.z - f32.z).norm(dim=-1) / f32.delta.norm(dim=-1)).max()
    assert relative < 0.03, f"||z_bf16 - z_fp32|| / ||delta|| = {relative:.3g}"
    assert bf16.z.dtype == torch.float32


def test_without_native_bfloat16_z_falls_back_to_float32(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(replay_module, "_native", lambda device_type, dtype: False)
    replay_module._warn_emulated.cache_clear()
    lm = load_model("tiny-gpt2")
    f32 = optimise_z(lm, REQUESTS, 1, TINY_Z, contexts=CONTEXTS)
    with caplog.at_level(logging.WARNING, logger="memit_lab.replay"):
        bf16 = optimise_z(lm, REQUESTS, 1, ZParams(**{**TINY_Z.__dict__, "dtype": "bfloat16"}), contexts=CONTEXTS)
    replay_module._warn_emulated.cache_clear()
    assert torch.equal(bf16.z, f32.z)
    assert "no native bfloat16" in caplog.text
