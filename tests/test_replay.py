"""The replay engine's contract with transformers, on every adapter architecture: replayed = full forward pass.

memit_lab.replay is the one module that relies on transformers' cache internals (tracing and z
optimisation both replay blocks through it). If a transformers upgrade changes them, these tests
fail here, with ReplayContractError naming the version, rather than somewhere in tracing or z.
Tolerances: the same float32 arithmetic in other batch shapes; measured differences are ~1e-7.
"""

import logging

import pytest
import torch
import transformers

import memit_lab.replay as replay_module
from memit_lab import LoadedModel, load_model
from memit_lab.hooks import TraceDict
from memit_lab.replay import (
    Recording,
    ReplayContractError,
    _FrozenPrefix,
    autocast,
    precision,
    readout,
    record,
    replay,
    replay_block,
)
from memit_lab.tracing import trace_all

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is the city of Tokyo",
    "Lionel Messi plays football for a club in Paris",
]
SPLIT = 3  # tokens before it form the prefix


def _ids(lm: LoadedModel) -> torch.Tensor:
    """``[3, pos]`` three prompts cut to the shortest one's length (no padding)."""
    rows = [lm.tokenizer(p).input_ids for p in PROMPTS]
    width = min(len(r) for r in rows)
    assert width > SPLIT + 2
    return torch.tensor([r[:width] for r in rows])


def _blocks(lm: LoadedModel) -> list[str]:
    return [lm.adapter.block(layer) for layer in range(lm.n_layers)]


def _recorded(lm: LoadedModel, ids: torch.Tensor, **kwargs: object) -> tuple[Recording, TraceDict]:
    """A recording, with each block's input kept (the hidden states to replay from)."""
    with torch.no_grad(), TraceDict(lm.model, _blocks(lm), retain_input=True) as td:
        recording = record(lm, ids, **kwargs)  # type: ignore[arg-type]
    return recording, td


def test_replay_without_a_prefix_gives_the_full_forward_logits(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    with torch.no_grad():
        full = tiny_lm.model(ids).logits
        recording, td = _recorded(tiny_lm, ids)
        for first in range(tiny_lm.n_layers):
            again = readout(tiny_lm, replay(tiny_lm, recording, first, td[tiny_lm.adapter.block(first)].input))
            torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)
    assert recording.logits is None and recording.final is not None  # stopped at the final norm
    assert recording.final.shape == (*ids.shape, tiny_lm.d_model)


def test_recorded_logits_and_keys_values_are_the_models(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    with torch.no_grad():
        full = tiny_lm.model(ids, use_cache=True)
        recording = record(tiny_lm, ids, logits_to_keep=0)
    assert recording.logits is not None and torch.equal(recording.logits, full.logits)
    assert len(recording.kv.keys) == tiny_lm.n_layers == len(recording.calls)
    keys, values = recording.kv.layer(0)
    assert keys.shape[0] == 3 and keys.shape[2] == ids.shape[1] and values.shape == keys.shape


@pytest.mark.parametrize("rows", [None, [2, 0]])
def test_replay_after_a_prefix_gives_the_full_forward_logits(tiny_lm: LoadedModel, rows: list[int] | None) -> None:
    ids = _ids(tiny_lm)
    mask = torch.ones_like(ids)  # the recorded mask then has a batch dimension, which rows must select
    with torch.no_grad():
        full = tiny_lm.model(ids).logits[:, SPLIT:]
        before = record(tiny_lm, ids[:, :SPLIT])
        recording, td = _recorded(tiny_lm, ids[:, SPLIT:], attention_mask=mask, prefix=before.kv)
        index = None if rows is None else torch.tensor(rows)
        expected = full if index is None else full[index]
        for first in range(tiny_lm.n_layers):
            hidden = td[tiny_lm.adapter.block(first)].input
            hidden = hidden if index is None else hidden[index]
            again = readout(tiny_lm, replay(tiny_lm, recording, first, hidden, prefix=before.kv, rows=index))
            torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_replay_gives_the_full_forward_gradient(tiny_lm: LoadedModel) -> None:
    # delta added to block `first`'s input at the first suffix token, on rows 2 and 0; the loss reads the last token.
    ids, first, rows = _ids(tiny_lm), 1, torch.tensor([2, 0])
    target = ids[rows, -1]
    delta = 0.1 * torch.randn(2, tiny_lm.d_model, generator=torch.Generator().manual_seed(0))

    def loss(logits: torch.Tensor) -> torch.Tensor:
        return -logits[:, -1].float().log_softmax(-1)[torch.arange(2), target].sum()

    d_full = delta.clone().requires_grad_(True)

    def add(x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.clone()
        x[:, SPLIT] += d_full
        return x

    with TraceDict(tiny_lm.model, [tiny_lm.adapter.block(first)], edit_input=add):
        loss(tiny_lm.model(ids[rows]).logits).backward()
    with torch.no_grad():
        before = record(tiny_lm, ids[:, :SPLIT])
        recording, td = _recorded(tiny_lm, ids[:, SPLIT:], prefix=before.kv)
    d_replay = delta.clone().requires_grad_(True)
    hidden = td[tiny_lm.adapter.block(first)].input[rows]
    hidden = torch.cat([hidden[:, :1] + d_replay[:, None], hidden[:, 1:]], dim=1)
    replayed = replay(tiny_lm, recording, first, hidden, prefix=before.kv, rows=rows)
    loss(readout(tiny_lm, replayed)).backward()
    assert d_full.grad is not None and d_replay.grad is not None and float(d_full.grad.abs().max()) > 0
    torch.testing.assert_close(d_replay.grad, d_full.grad, rtol=1e-4, atol=1e-6)


def test_a_block_that_is_not_handed_the_cache_breaks_the_contract_loudly(tiny_lm: LoadedModel) -> None:
    # What a transformers upgrade that stopped passing the cache to the blocks would look like.
    block = tiny_lm.model.get_submodule(tiny_lm.adapter.block(0))

    def strip(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:  # type: ignore[type-arg]
        clear = lambda v: None if isinstance(v, transformers.Cache) else v  # noqa: E731
        return tuple(clear(a) for a in args), {k: clear(v) for k, v in kwargs.items()}

    handle = block.register_forward_pre_hook(strip, with_kwargs=True)
    try:
        with pytest.raises(ReplayContractError, match=f"transformers {transformers.__version__}: .*layers \\[1, 2\\]"):
            record(tiny_lm, _ids(tiny_lm))
    finally:
        handle.remove()


def test_a_block_asking_the_prefix_for_more_than_update_breaks_the_contract_loudly() -> None:
    prefix = _FrozenPrefix(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(ReplayContractError, match="asked its cache for 'get_seq_length'"):
        prefix.get_seq_length()
    with pytest.raises(ReplayContractError, match="updated the cache of layer 1"):
        prefix.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 1)


def test_replaying_a_block_that_was_not_recorded_is_refused(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    with torch.no_grad():
        recording = record(tiny_lm, ids, blocks=range(2, tiny_lm.n_layers))
    assert sorted(recording.calls) == list(range(2, tiny_lm.n_layers))
    with pytest.raises(ValueError, match="block 1 was not recorded"):
        replay_block(tiny_lm, recording, 1, torch.zeros(3, ids.shape[1], tiny_lm.d_model))


def test_keys_values_above_a_layer_keep_what_replaying_the_layers_above_reads(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    with torch.no_grad():
        before = record(tiny_lm, ids[:, :SPLIT])
        recording, td = _recorded(tiny_lm, ids[:, SPLIT:], prefix=before.kv)
        hidden = td[tiny_lm.adapter.block(1)].input
        full = replay(tiny_lm, recording, 1, hidden, prefix=before.kv)
        trimmed = before.kv.above(0)
        assert torch.equal(replay(tiny_lm, recording, 1, hidden, prefix=trimmed), full)
    assert trimmed.keys[0].numel() == trimmed.values[0].numel() == 0
    assert all(torch.equal(a, b) for a, b in zip(trimmed.keys[1:], before.kv.keys[1:], strict=True))


# --- reduced precision ---------------------------------------------------------------------------------------------


def test_an_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="precision must be one of \\['bfloat16', 'float16', 'float32'\\]"):
        precision(load_model("tiny-gpt2"), "float64")


def test_precision_falls_back_to_float32_with_a_warning_where_the_hardware_lacks_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lm = load_model("tiny-gpt2")
    monkeypatch.setattr(replay_module, "_native", lambda device_type, dtype: False)
    replay_module._warn_emulated.cache_clear()
    with caplog.at_level(logging.WARNING, logger="memit_lab.replay"):
        assert precision(lm, "bfloat16") is None
        assert precision(lm, "bfloat16") is None
    replay_module._warn_emulated.cache_clear()
    assert caplog.text.count("cpu has no native bfloat16 matrix products") == 1  # once, not at every step


def test_replay_under_bfloat16_autocast_is_close_to_float32(tiny_lm: LoadedModel) -> None:
    ids = _ids(tiny_lm)
    with torch.no_grad():
        recording, td = _recorded(tiny_lm, ids)
        hidden = td[tiny_lm.adapter.block(1)].input
        f32 = readout(tiny_lm, replay(tiny_lm, recording, 1, hidden)).log_softmax(-1)
        with autocast(tiny_lm, torch.bfloat16, range(1, tiny_lm.n_layers)):
            bf16 = readout(tiny_lm, replay(tiny_lm, recording, 1, hidden)).log_softmax(-1)
        # autocast's own casts, without the copies of the weights: the same numbers
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            plain = replay(tiny_lm, recording, 1, hidden)
        assert torch.equal(readout(tiny_lm, plain).log_softmax(-1), bf16)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, f32, rtol=0.0, atol=0.05)


def test_a_causal_trace_under_bfloat16_is_close_to_float32(tiny_lm: LoadedModel) -> None:
    # Tracing's dtype switch: the restored runs under autocast; every grid within 1e-2 of float32 (in probability).
    kw = {"window": 2, "samples": 3}
    f32 = trace_all(tiny_lm, "The capital of France is", "France", **kw)  # type: ignore[arg-type]
    bf16 = trace_all(tiny_lm, "The capital of France is", "France", dtype="bfloat16", **kw)  # type: ignore[arg-type]
    for kind, t in f32.items():
        assert float((bf16[kind].scores - t.scores).abs().max()) < 1e-2, kind
        assert bf16[kind].corrupted_prob == t.corrupted_prob  # the clean and corrupted runs stay float32
