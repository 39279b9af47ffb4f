"""Causal tracing against independent expectations: clean and corrupted limits, the per-cell loop, severed models.

Tolerances: the fast grid and the per-cell loop compute the same float32 forward passes
in a different order and batch shape; measured differences are below 1e-9 on the tiny
models (probabilities ~3e-3) and below 1e-6 on the bundled model, so they are compared
with rtol 1e-5 (the issue's bound is 1e-5 absolute).
"""

import json
import math
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
import torch

import memit_lab.layer_choice as layer_choice_module
from memit_lab import LoadedModel, SubjectNotFoundError, load_model
from memit_lab.cache import write_manifest
from memit_lab.cli import main
from memit_lab.facts import KNOWN_FACTS, Fact
from memit_lab.hooks import Trace, TraceDict
from memit_lab.hparams import MODEL_DEFAULTS, MemitHyperParams, default_layers
from memit_lab.layer_choice import NoTraceableFactsError, first_mlp_share, memit_defaults, recommend_layers
from memit_lab.prompts import subject_token_span
from memit_lab.residual import resolve_target
from memit_lab.tracing import (
    CATEGORIES,
    average_indirect_effect,
    category_positions,
    embedding_noise,
    restored_prob,
    subject_embedding_noise,
    trace,
    trace_all,
)
from memit_lab.tracing_plots import plot_average_effect, plot_recommendation, plot_trace

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One thread: on a shared 2-core machine a second thread waits for a busy core at every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def _assert_same_grid(fast: torch.Tensor, slow: torch.Tensor) -> None:
    traced = ~slow.isnan()
    assert torch.equal(traced, ~fast.isnan())
    torch.testing.assert_close(fast[traced], slow[traced], rtol=1e-5, atol=1e-9)
    # The comparison means something only if the cells differ by more than the tolerance.
    assert float(slow[traced].max() - slow[traced].min()) > 1e-3 * float(slow[traced].abs().max())


@pytest.mark.parametrize(("kind", "severed"), [("hidden", None), ("mlp", None), ("attn", None), ("hidden", "mlp")])
def test_batched_grid_equals_the_per_cell_loop(tiny_lm: LoadedModel, kind: str, severed: str | None) -> None:
    kwargs = dict(kind=kind, window=2, samples=3, severed=severed, noise=1.0)
    fast = trace(tiny_lm, PROMPT, SUBJECT, **kwargs)  # type: ignore[arg-type]
    slow = trace(tiny_lm, PROMPT, SUBJECT, batched=False, **kwargs)  # type: ignore[arg-type]
    _assert_same_grid(fast.scores, slow.scores)
    assert (fast.clean_prob, fast.corrupted_prob) == (slow.clean_prob, slow.corrupted_prob)


@pytest.mark.parametrize("batched", [True, False])
def test_progress_is_reported_after_every_token_column(tiny_lm: LoadedModel, batched: bool) -> None:
    seen: list[float] = []
    traced = trace(tiny_lm, PROMPT, SUBJECT, window=2, samples=1, batched=batched, on_progress=seen.append)
    n_pos = len(traced.tokens)
    assert seen == pytest.approx([(i + 1) / n_pos for i in range(n_pos)])
    seen.clear()
    trace_all(tiny_lm, PROMPT, SUBJECT, kinds=("hidden", "mlp"), window=2, samples=1, on_progress=seen.append)
    assert len(seen) == 2 * n_pos and seen == sorted(seen)
    assert seen[n_pos - 1] == pytest.approx(0.5) and seen[-1] == pytest.approx(1.0)


def test_batched_equals_per_cell_on_the_bundled_model(smollm: LoadedModel) -> None:
    # 'iffel' (the subject token that matters here) and the last token, where the answer is said.
    fast = trace(smollm, PROMPT, SUBJECT, samples=2, positions=[2, 9])
    slow = trace(smollm, PROMPT, SUBJECT, samples=2, positions=[2, 9], batched=False)
    assert float((fast.scores[:, [2, 9]] - slow.scores[:, [2, 9]]).abs().max()) <= 1e-5
    assert fast.clean_prob > 0.5 > 0.1 > fast.corrupted_prob  # the noise does remove the fact
    assert float(fast.scores[:10, 2].min()) > 0.3  # early 'iffel' states bring it back
    assert float(fast.scores[-1, 9]) == pytest.approx(fast.clean_prob, rel=1e-5)


def test_restoring_every_layer_at_every_token_gives_the_clean_probability(tiny_lm: LoadedModel) -> None:
    n_pos = len(tiny_lm.tokenizer(PROMPT).input_ids)
    everything = [("hidden", layer, pos) for layer in range(tiny_lm.n_layers) for pos in range(n_pos)]
    clean = trace(tiny_lm, PROMPT, SUBJECT, samples=2, noise=1.0, positions=[n_pos - 1])
    assert clean.corrupted_prob != pytest.approx(clean.clean_prob, rel=1e-4)
    assert restored_prob(tiny_lm, PROMPT, SUBJECT, everything, samples=2, noise=1.0) == pytest.approx(
        clean.clean_prob, rel=1e-5
    )
    # The noise sits on the subject only: the first block's output from the subject on is already enough.
    start, _ = clean.subject_span
    from_subject = [("hidden", 0, pos) for pos in range(start, n_pos)]
    assert restored_prob(tiny_lm, PROMPT, SUBJECT, from_subject, samples=2, noise=1.0) == pytest.approx(
        clean.clean_prob, rel=1e-5
    )


def test_grid_limits(tiny_lm: LoadedModel) -> None:
    result = trace(tiny_lm, PROMPT, SUBJECT, samples=3, noise=1.0)
    start, _ = result.subject_span
    last_layer, last_pos = tiny_lm.n_layers - 1, len(result.tokens) - 1
    # The last block's output at the last token is the clean final state.
    assert float(result.scores[last_layer, last_pos]) == pytest.approx(result.clean_prob, rel=1e-5)
    # Before the subject, clean and corrupted states agree: restoring them does nothing.
    torch.testing.assert_close(
        result.scores[:, :start], torch.full_like(result.scores[:, :start], result.corrupted_prob), rtol=1e-5, atol=0
    )
    # The last block's output elsewhere never reaches the last token.
    assert torch.allclose(result.scores[last_layer, :last_pos], torch.tensor(result.corrupted_prob).double(), rtol=1e-5)


def test_noise_is_seeded_and_scaled() -> None:
    lm = load_model("tiny-qwen2")
    first = trace(lm, PROMPT, SUBJECT, samples=3)
    again = trace(lm, PROMPT, SUBJECT, samples=3)
    other = trace(lm, PROMPT, SUBJECT, samples=3, seed=1)
    assert torch.equal(first.scores, again.scores) and first.corrupted_prob == again.corrupted_prob
    assert first.corrupted_prob != other.corrupted_prob
    weights = lm.model.get_input_embeddings().weight.double()
    expected = 3 * math.sqrt(float(((weights - weights.mean()) ** 2).sum()) / (weights.numel() - 1))
    assert first.noise == pytest.approx(expected, rel=1e-9) == embedding_noise(lm)
    assert trace(lm, PROMPT, SUBJECT, samples=2, noise=0.5).noise == 0.5


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_rome_noise_scale_is_the_std_of_the_embedding_outputs_at_known_subjects(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ROME's collect_embedding_std, done the long way: run the model on each subject alone, keep what the embedding
    # module outputs, pool every subject's rows and take the (n - 1) standard deviation of all their entries.
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model(name)
    pooled = []
    for fact in KNOWN_FACTS:
        ids = torch.tensor([lm.tokenizer.encode(fact.subject, add_special_tokens=False)])
        with torch.no_grad(), Trace(lm.model, lm.adapter.embed) as seen:
            lm.model(ids)
        pooled.append(seen.output[0].double())
    expected = 3 * float(torch.cat(pooled).std())
    assert subject_embedding_noise(lm) == pytest.approx(expected, rel=1e-9)
    assert subject_embedding_noise(lm, use_cache=False) == pytest.approx(expected, rel=1e-9)
    (stored,) = (tmp_path / "tracing").glob("subject-embedding-std-*/std.json")  # cached per model
    assert json.loads(stored.read_text())["std"] == pytest.approx(expected / 3, rel=1e-9)
    assert subject_embedding_noise(lm, factor=1.5) == pytest.approx(expected / 2, rel=1e-9)
    assert subject_embedding_noise(lm, ["Paris"]) != pytest.approx(expected, rel=1e-3)  # its own subjects: not cached
    for bad in ([], ["  "]):
        with pytest.raises(ValueError, match="non-empty list"):
            subject_embedding_noise(lm, bad)
    with pytest.raises(ValueError, match="positive number"):
        subject_embedding_noise(lm, factor=0.0)


def test_noise_scale_is_measured_once_per_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gptj")
    measured = embedding_noise(lm)
    (stored,) = (tmp_path / "tracing").glob("embedding-std-*/std.json")
    entry = stored.parent
    assert json.loads(stored.read_text())["std"] == pytest.approx(measured / 3, rel=1e-12)
    # A later call reads the stored value (planted here, with a valid manifest) instead of measuring again.
    (entry / "std.json").write_text(json.dumps({"std": 0.25}))
    write_manifest(entry)
    assert embedding_noise(lm) == 0.75 == trace(lm, PROMPT, SUBJECT, samples=1, positions=[0]).noise
    assert embedding_noise(lm, factor=2.0) == 0.5
    # Other weights, another model: its own measurement.
    with torch.no_grad():
        lm.model.get_input_embeddings().weight.mul_(2.0)
    assert embedding_noise(lm) == pytest.approx(2 * measured, rel=1e-9)
    assert len(list((tmp_path / "tracing").glob("embedding-std-*/std.json"))) == 2
    with pytest.raises(ValueError, match="factor must be a positive"):
        embedding_noise(lm, factor=0.0)


def _zero_mlps(lm: LoadedModel) -> None:
    """Make every MLP output a constant (its bias): freezing it can then change nothing."""
    with torch.no_grad():
        for layer in range(lm.n_layers):
            lm.adapter.w_out_parameter(lm.model, layer).zero_()


def test_severing_mlps_changes_what_the_mlps_carry(tiny_lm: LoadedModel) -> None:
    kwargs = dict(samples=3, noise=1.0)
    plain = trace(tiny_lm, PROMPT, SUBJECT, **kwargs)  # type: ignore[arg-type]
    severed = trace(tiny_lm, PROMPT, SUBJECT, severed="mlp", **kwargs)  # type: ignore[arg-type]
    start, _ = plain.subject_span
    # Unchanged where no later MLP exists or nothing was corrupted; changed elsewhere.
    torch.testing.assert_close(severed.scores[-1], plain.scores[-1], rtol=1e-6, atol=0)
    torch.testing.assert_close(severed.scores[:, :start], plain.scores[:, :start], rtol=1e-6, atol=0)
    assert float((severed.scores[:-1, start:] - plain.scores[:-1, start:]).abs().max()) > 1e-4 * plain.clean_prob
    # In a model whose MLP outputs do not depend on their input, severing them is a no-op.
    _zero_mlps(tiny_lm)
    plain = trace(tiny_lm, PROMPT, SUBJECT, **kwargs)  # type: ignore[arg-type]
    severed = trace(tiny_lm, PROMPT, SUBJECT, severed="mlp", **kwargs)  # type: ignore[arg-type]
    torch.testing.assert_close(severed.scores, plain.scores, rtol=1e-6, atol=0)
    attn_severed = trace(tiny_lm, PROMPT, SUBJECT, severed="attn", **kwargs)  # type: ignore[arg-type]
    assert float((attn_severed.scores[:-1, start:] - plain.scores[:-1, start:]).abs().max()) > 0


def test_bad_inputs_get_clear_errors() -> None:
    lm = load_model("tiny-gpt2")
    with pytest.raises(SubjectNotFoundError, match="does not occur"):
        trace(lm, PROMPT, "Big Ben", samples=1)
    with pytest.raises(ValueError, match="window=10 does not fit a model of 3 layers"):
        trace(lm, PROMPT, SUBJECT, kind="mlp", samples=1)
    for word in ("   ", "\u200b"):
        with pytest.raises(ValueError, match="target"):
            trace(lm, PROMPT, SUBJECT, word, samples=1)
    for not_text in (["Paris"], 3.5, b"Paris"):
        # TypeError where the test suite's run-time type checks see it first, else our ValueError.
        with pytest.raises((TypeError, ValueError), match="target"):
            trace(lm, PROMPT, SUBJECT, not_text, samples=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind must be one of"):
        trace(lm, PROMPT, SUBJECT, kind="residual", samples=1)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        trace(lm, PROMPT, SUBJECT, samples=0)
    with pytest.raises(ValueError, match="severed tracing restores hidden states"):
        trace(lm, PROMPT, SUBJECT, kind="mlp", window=2, severed="attn", samples=1)
    with pytest.raises(ValueError, match="positions must be token positions"):
        trace(lm, PROMPT, SUBJECT, positions=[99], samples=1)
    with pytest.raises(ValueError, match="state"):
        restored_prob(lm, PROMPT, SUBJECT, [("hidden", 3, 0)], samples=1)


def test_target_token_and_string_agree() -> None:
    lm = load_model("tiny-llama")
    by_text = trace(lm, PROMPT, SUBJECT, "Paris", samples=2, positions=[3])
    by_id = trace(lm, PROMPT, SUBJECT, by_text.target_id, samples=2, positions=[3])
    assert by_text.target == by_id.target and torch.equal(by_text.scores[:, 3], by_id.scores[:, 3])


def test_result_frame_and_plot() -> None:
    lm = load_model("tiny-neox")
    result = trace(lm, PROMPT, SUBJECT, samples=2)
    frame = result.to_frame()
    assert len(frame) == lm.n_layers * len(result.tokens)
    assert frame.subject.sum() == lm.n_layers * 2  # ' Eiffel', ' Tower'
    peak = result.peaks(1).iloc[0]
    assert peak.score == pytest.approx(float(result.scores.max()))
    fig = plot_trace(result)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[1:3] == ["' Eiffel'*", "' Tower'*"] and not labels[0].endswith("*")
    matplotlib.pyplot.close(fig)


def test_category_positions_cover_the_prompt() -> None:
    groups = category_positions((1, 4), 10)
    assert groups == {
        "first subject token": [1],
        "middle subject tokens": [2],
        "last subject token": [3],
        "first subsequent token": [4],
        "further tokens": [5, 6, 7, 8],
        "last token": [9],
    }
    assert category_positions((2, 3), 4)["first subsequent token"] == []  # the next token is the last one


def test_average_indirect_effect_is_the_mean_of_the_traces() -> None:
    lm = load_model("tiny-gptj")
    facts = KNOWN_FACTS[:3]
    avg = average_indirect_effect(lm, facts, window=2, samples=2, noise=1.0, progress=False)
    assert avg.effect.shape == (3, len(CATEGORIES), lm.n_layers)
    # Recompute one curve by hand from full traces of each fact.
    curves = []
    for fact in facts:
        full = trace_all(lm, fact.prompt, fact.subject, fact.target, window=2, samples=2, noise=1.0)["mlp"]
        last = full.subject_span[1] - 1
        curves.append(full.indirect_effect[:, last])
    torch.testing.assert_close(avg.curve("mlp"), torch.stack(curves).mean(0), rtol=1e-5, atol=1e-9)
    frame = avg.to_frame()
    assert len(frame) == 3 * len(CATEGORIES) * lm.n_layers
    matplotlib.pyplot.close(plot_average_effect(avg))


def test_recommend_layers_picks_the_strongest_window_and_caches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-llama")
    facts = KNOWN_FACTS[:3]
    rec = recommend_layers(lm, facts, n=2, samples=2, noise=1.0)
    frame = rec.to_frame()
    full = frame[frame.full_window]
    assert rec.layers == tuple(int(x) for x in full.loc[full.effect.idxmax(), "window"].split("-"))
    assert frame.chosen.sum() == 1 and len(rec.layers) == 2
    # The evidence is the MLP trace at the last subject token, window n, averaged over the facts.
    one = trace(lm, facts[0].prompt, facts[0].subject, facts[0].target, kind="mlp", window=2, samples=2, noise=1.0)
    torch.testing.assert_close(rec.per_fact[0], one.indirect_effect[:, one.subject_span[1] - 1], rtol=1e-5, atol=1e-9)
    (entry,) = (tmp_path / "tracing").glob("layers-*/recommendation.json")
    assert json.loads(entry.read_text())["layers"] == list(rec.layers)
    entry.write_text(json.dumps({**json.loads(entry.read_text()), "layers": [0, 1]}))  # tamper: the manifest notices
    again = recommend_layers(lm, facts, n=2, samples=2, noise=1.0)
    assert again.layers == rec.layers and torch.equal(again.effect, rec.effect)
    with pytest.raises(ValueError, match="n=4 layers do not fit"):
        recommend_layers(lm, facts, n=4)
    matplotlib.pyplot.close(plot_recommendation(rec))


def test_memit_defaults_take_their_layers_from_tracing(
    smollm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gptj")
    n = len(default_layers(lm.n_layers))
    usable = [f for f in KNOWN_FACTS[::4] if _first_token_ok(lm, f)]
    assert 0 < len(usable) < len(KNOWN_FACTS[::4])  # the tiny vocabulary spells some objects letter by letter
    expected = recommend_layers(lm, usable, n=n, use_cache=False)
    assert memit_defaults(lm).layers == expected.layers
    assert len(list((tmp_path / "tracing").glob("layers-*/recommendation.json"))) == 1  # traced once, then read
    # Without tracing, the hyper-parameters' own default is the paper's range scaled.
    assert MemitHyperParams.for_model(lm).layers == default_layers(lm.n_layers)
    # The bundled model keeps its measured defaults; a vocabulary without any traceable object falls back.
    assert memit_defaults(smollm) is MemitHyperParams.for_model(smollm) is MODEL_DEFAULTS["smollm2-135m"]["memit"]
    monkeypatch.setattr(layer_choice_module, "resolve_target", _never_a_token)
    with caplog.at_level("WARNING"):
        assert memit_defaults(lm).layers == default_layers(lm.n_layers)
    assert "pass facts=[...]" in caplog.text
    with pytest.raises(NoTraceableFactsError):
        recommend_layers(lm, n=n, use_cache=False)


def _first_token_ok(lm: LoadedModel, fact: Fact) -> bool:
    try:
        resolve_target(lm, fact.prompt, fact.target)
    except ValueError:
        return False
    return True


def _never_a_token(*args: object) -> None:
    raise ValueError("no token of its own")


def test_cli_trace_prints_peaks_and_writes_the_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fig.png"
    args = ["trace", "--model", "tiny-gpt2", "--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlp"]
    assert main([*args, "--window", "2", "--samples", "2", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "clean" in printed and "corrupted" in printed and f"figure written to {out}" in printed
    assert len([line for line in printed.splitlines() if "True" in line or "False" in line]) == 3
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["trace", "--model", "tiny-gpt2", "--prompt", PROMPT, "--subject", "Big Ben"]) == 2
    assert "does not occur in prompt" in capsys.readouterr().err


def test_first_mlp_share_is_mlp_0_against_the_embedding_and_block_0_output() -> None:
    lm = load_model("tiny-llama")
    facts = KNOWN_FACTS[:3]
    a = lm.adapter
    names = [a.embed, a.attn_module(0), a.mlp_module(0), a.block(0)]
    expected_ratio, expected_cos = [], []
    for fact in facts:
        ids = lm.tokenizer(fact.prompt, return_tensors="pt").input_ids
        last = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)[1] - 1
        with torch.no_grad(), TraceDict(lm.model, names) as seen:
            lm.model(ids)
        e, attn, m, h = (seen[n].output[0, last].double() for n in names)
        assert torch.allclose(e + attn + m, h, atol=1e-5)  # a Llama block: h^1 = e + a^0 + m^0 (eq. 2)
        expected_ratio.append(float(m.norm() / e.norm()))
        expected_cos.append(float(m @ (e + attn + m) / (m.norm() * (e + attn + m).norm())))
    share = first_mlp_share(lm, facts)
    assert share.mlp0_over_embedding.tolist() == pytest.approx(expected_ratio, rel=1e-9)
    assert share.cos_mlp0_block0.tolist() == pytest.approx(expected_cos, abs=1e-6)
    with torch.no_grad():  # m^0 is linear in MLP 0's W_out: twice the weights, twice the ratio
        a.w_out_parameter(lm.model, 0).mul_(2.0)
    assert first_mlp_share(lm, facts).mlp0_over_embedding.tolist() == pytest.approx(
        [2 * r for r in expected_ratio], rel=1e-6
    )


@pytest.mark.slow
def test_block_0_writes_the_subject_token_through_mlp_0_on_the_bundled_model(smollm: LoadedModel) -> None:
    # Notebook 02's reading of the layer-0 confound rests on this measurement (20 traced facts there; 8 here).
    share = first_mlp_share(smollm, KNOWN_FACTS[19:27])
    assert share.mlp0_over_embedding.min() > 10 and share.cos_mlp0_block0.min() > 0.99
