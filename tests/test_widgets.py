"""The explorers' logic, called the way the buttons call it: results for good input, messages for bad, exact undo."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from helpers import WeightSnapshot

from memit_lab import LoadedModel, load_model
from memit_lab.editing import EditResult
from memit_lab.explorer_views import render
from memit_lab.facts import KNOWN_FACTS, facts_by_relation
from memit_lab.finetune import block_parameters
from memit_lab.hparams import FtHyperParams, MemitHyperParams, RomeHyperParams
from memit_lab.layer_choice import recommend_layers
from memit_lab.methods import METHODS
from memit_lab.requests import EditRequest
from memit_lab.residual import direct_logit_attribution, logit_lens, run_with_cache
from memit_lab.rome import apply_rome
from memit_lab.stats import key_second_moment
from memit_lab.tracing import trace
from memit_lab.widgets import (
    EditView,
    Explorer,
    ExplorerState,
    FactEdit,
    LensView,
    Message,
    TraceView,
    UndoView,
    apply_edit,
    default_probes,
    method_labels,
    parse_layers,
    run_lens,
    run_trace,
    undo,
)
from memit_lab.zopt import ZParams, context_templates

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


# Few z steps and contexts, little text for E[kk^T]: the mechanics of an edit on a tiny model, quick enough for CI.
# (A tiny random model's answers barely move under an edit; whether an edit works is checked on the bundled model.)
LIGHT = MemitHyperParams(layers=(0, 1), z=ZParams(steps=5, n_contexts=1), stats_tokens=1024)
LIGHT_ROME = RomeHyperParams(layer=1, z=ZParams(steps=5, n_contexts=2), stats_tokens=1024)


@pytest.fixture
def gpt2() -> LoadedModel:
    return load_model("tiny-gpt2")


LIGHT_SETTINGS = {"memit": LIGHT, "rome-seq": LIGHT_ROME}


def _light(hparams: Any) -> Any:
    """Any method's hyper-parameters with LIGHT's z and statistics, where it has them."""
    fields = {f.name for f in dataclasses.fields(hparams)}
    return hparams.replace(**{k: getattr(LIGHT, k) for k in ("z", "stats_tokens") if k in fields})


def _state(lm: LoadedModel) -> ExplorerState:
    return ExplorerState(lm, hparams=LIGHT_SETTINGS)


# -- parsing and defaults ----------------------------------------------------------------------------------------


def test_parse_layers_reads_ranges_lists_and_single_layers() -> None:
    assert parse_layers("3-7", 30) == (3, 4, 5, 6, 7)
    assert parse_layers("7, 3,5", 30) == (3, 5, 7)
    assert parse_layers("2-3,3", 30) == (2, 3)
    assert parse_layers("4", 30) == (4,)
    assert parse_layers("", 30) is None


@pytest.mark.parametrize(
    ("text", "hint"), [("3..7", "3-7"), ("7-3", "upwards"), ("a", "one number"), ("2-31", "0..29"), ("-1", "3-7")]
)
def test_parse_layers_explains_what_it_cannot_read(text: str, hint: str) -> None:
    with pytest.raises(ValueError, match=hint):
        parse_layers(text, 30)


def test_default_probes_reword_known_templates_and_pick_a_neighbour_of_the_same_relation() -> None:
    paraphrase, neighbour = default_probes(PROMPT, SUBJECT)
    assert paraphrase == "Visitors to the Eiffel Tower travel to the city of"
    landmarks = [f.prompt for f in facts_by_relation("landmark_city") if f.subject != SUBJECT]
    assert neighbour == landmarks[0]


def test_default_probes_fall_back_to_a_prefix_and_an_unrelated_fact() -> None:
    paraphrase, neighbour = default_probes("My cat {Tom} likes", "Tom")
    assert paraphrase == "Here is a fact. My cat {Tom} likes"
    assert neighbour == KNOWN_FACTS[0].prompt


# -- trace explorer ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "subject", "kind", "samples", "says"),
    [
        ("", SUBJECT, "mlp", 2, "Type a prompt"),
        ("   ", SUBJECT, "mlp", 2, "Type a prompt"),
        (PROMPT, "", "mlp", 2, "Type the subject"),
        (PROMPT, "Colosseum", "mlp", 2, "does not occur in prompt"),
        (PROMPT, "eiffel tower", "mlp", 2, "same case"),
        (PROMPT, SUBJECT, "residual", 2, "kind must be one of"),
        (PROMPT, SUBJECT, "mlp", 0, "noise samples"),
    ],
)
def test_trace_explorer_answers_bad_input_with_a_message(
    gpt2: LoadedModel, prompt: str, subject: str, kind: str, samples: int, says: str
) -> None:
    state = ExplorerState(gpt2)
    result = run_trace(state, prompt, subject, kind, samples)
    assert isinstance(result, Message) and result.level == "error"
    assert says in result.text
    assert state.edits == []


def test_trace_explorer_shows_the_library_trace_and_reports_progress(gpt2: LoadedModel) -> None:
    state = _state(gpt2)
    seen: list[float] = []
    said: list[str] = []

    def report(what: str, done: float) -> None:
        said.append(what)
        seen.append(done)

    result = run_trace(state, PROMPT, SUBJECT, "mlp", 1, progress=report)
    assert isinstance(result, TraceView)
    direct = trace(gpt2, PROMPT, SUBJECT, kind="mlp", window=gpt2.n_layers, samples=1)
    assert torch.equal(result.trace.scores, direct.scores)
    assert seen == sorted(seen) and seen[-1] == 1.0
    # the start, then one report per token column of the grid, then the layer choice
    assert sum(what.startswith("tracing") for what in said) == 1 + len(direct.tokens)
    assert result.layers == LIGHT.layers and result.rome_layer == LIGHT_ROME.layer
    assert result.fact_layers == recommend_layers(gpt2, [direct], 2, samples=1, use_cache=False).layers


# -- logit lens --------------------------------------------------------------------------------------------------


def test_lens_view_is_the_library_lens_for_the_top_prediction(gpt2: LoadedModel) -> None:
    result = run_lens(ExplorerState(gpt2), "The capital of France is")
    assert isinstance(result, LensView)
    cache = run_with_cache(gpt2, "The capital of France is")
    top = int(cache.logits[-1].argmax())
    assert result.lens.target_id == top
    assert torch.equal(result.lens.target_probs, logit_lens(gpt2, cache, top).target_probs)
    assert result.attribution.logit == direct_logit_attribution(gpt2, cache, top).logit


def test_lens_view_takes_a_chosen_target(gpt2: LoadedModel) -> None:
    result = run_lens(ExplorerState(gpt2), "The capital of France is", " Paris ")
    assert isinstance(result, LensView) and result.lens.target == " Paris"


@pytest.mark.parametrize(("prompt", "target", "says"), [("", "", "Type a prompt"), (" ", "Paris", "Type a prompt")])
def test_lens_view_answers_bad_input_with_a_message(gpt2: LoadedModel, prompt: str, target: str, says: str) -> None:
    result = run_lens(ExplorerState(gpt2), prompt, target)
    assert isinstance(result, Message) and says in result.text


# -- edit playground ---------------------------------------------------------------------------------------------

ROME_FACT = FactEdit(PROMPT, SUBJECT, "Rome")


@pytest.mark.parametrize(
    ("facts", "method", "layers", "lam", "says"),
    [
        ([], "MEMIT", None, None, "at least one fact"),
        ([FactEdit("", SUBJECT, "Rome")], "MEMIT", None, None, "fact 1: Type a prompt"),
        ([ROME_FACT, FactEdit(PROMPT, "Louvre", "Rome")], "MEMIT", None, None, "fact 2: subject 'Louvre'"),
        ([FactEdit(PROMPT, SUBJECT, "  ")], "MEMIT", None, None, "type the new object"),
        ([FactEdit(PROMPT, SUBJECT, "Rome", paraphrase=" ")], "MEMIT", None, None, "paraphrase prompt is blank"),
        ([ROME_FACT], "MEND", None, None, "method must be one of MEMIT, ROME"),
        ([ROME_FACT], "MEMIT", "1-x", None, "write them as 3-7"),
        ([ROME_FACT], "MEMIT", "7", None, "layers 0..2"),
        ([ROME_FACT], "MEMIT", [0, 5], None, "layers 0..2"),
        ([ROME_FACT], "MEMIT", None, -1.0, "λ must be a positive number"),
        ([ROME_FACT], "MEMIT", None, float("nan"), "λ must be a positive number"),
        ([ROME_FACT], "ROME", "0-1", None, "ROME edits one layer"),
        ([ROME_FACT], "ROME", "5", None, "layers 0..2"),
        ([FactEdit(PROMPT, SUBJECT, "")], "ROME", None, None, "type the new object"),
    ],
)
def test_edit_playground_answers_bad_input_with_a_message_and_changes_nothing(
    gpt2: LoadedModel, facts: list[FactEdit], method: str, layers: object, lam: float | None, says: str
) -> None:
    state = _state(gpt2)
    before = WeightSnapshot(gpt2)
    result = apply_edit(state, facts, method, layers, lam)  # type: ignore[arg-type]  # bad input on purpose
    assert isinstance(result, Message) and says in result.text
    assert before.unchanged() and state.edits == []


@pytest.mark.parametrize("error", [ValueError("the update is not finite"), RuntimeError("out of memory")])
def test_a_failing_edit_is_rolled_back(gpt2: LoadedModel, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """An edit that writes part of its update and then fails leaves the weights as they were."""

    def half_done(lm: LoadedModel, requests: object, hparams: MemitHyperParams, **kwargs: object) -> None:
        with torch.no_grad():
            lm.adapter.w_out_parameter(lm.model, hparams.layers[0]).add_(1.0)
        raise error

    monkeypatch.setitem(METHODS, "memit", dataclasses.replace(METHODS["memit"], apply=half_done))
    state = _state(gpt2)
    before = WeightSnapshot(gpt2)
    if isinstance(error, ValueError):
        assert apply_edit(state, [ROME_FACT], "MEMIT", "0-1") == Message(str(error))
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            apply_edit(state, [ROME_FACT], "MEMIT", "0-1")
    assert before.unchanged() and state.edits == []


def test_a_failing_rome_edit_is_rolled_back(gpt2: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_done(lm: LoadedModel, requests: object, hparams: RomeHyperParams, **kwargs: object) -> None:
        with torch.no_grad():
            lm.adapter.w_out_parameter(lm.model, hparams.layer).add_(1.0)
        raise ValueError("delta is not finite")

    monkeypatch.setitem(METHODS, "rome-seq", dataclasses.replace(METHODS["rome-seq"], apply=half_done))
    state = _state(gpt2)
    before = WeightSnapshot(gpt2)
    assert apply_edit(state, [ROME_FACT], "ROME", "2") == Message("delta is not finite")
    assert before.unchanged() and state.edits == []


def test_undo_without_an_edit_says_so(gpt2: LoadedModel) -> None:
    result = undo(ExplorerState(gpt2))
    assert isinstance(result, Message) and result.level == "info" and "Nothing to undo" in result.text


def test_edit_then_undo_restores_every_weight_bit_for_bit(gpt2: LoadedModel) -> None:
    state = _state(gpt2)
    before = WeightSnapshot(gpt2)
    edited = apply_edit(state, [ROME_FACT], "MEMIT", "0-1")
    assert isinstance(edited, EditView), edited
    assert before.changed() == {gpt2.adapter.w_out_module(layer) + ".weight" for layer in (0, 1)}
    restored = undo(state)
    assert isinstance(restored, UndoView)
    assert before.unchanged()
    assert restored.p_now == edited.p_before and state.edits == []


@pytest.mark.slow
def test_an_edit_of_the_bundled_model_moves_its_answer_and_undo_moves_it_back(smollm: LoadedModel) -> None:
    """MEMIT with the model's default settings: the new object becomes likely on the edit prompt and its paraphrase."""
    state = ExplorerState(smollm)
    before = WeightSnapshot(smollm)
    try:
        edited = apply_edit(state, [ROME_FACT], "MEMIT")
        assert isinstance(edited, EditView), edited
        p = edited.frame.set_index("probe")
        assert p.p_before["edit prompt"] < 0.05 < 0.5 < p.p_after["edit prompt"]
        assert p.p_after["paraphrase"] > p.p_before["paraphrase"]
        assert edited.frame.generation_after[0].startswith("Rome")
    finally:
        restored = undo(state)
    assert isinstance(restored, UndoView) and restored.p_now == edited.p_before
    assert before.unchanged()


def test_a_rome_edit_is_the_library_rome_on_one_layer_and_undo_restores_it(gpt2: LoadedModel) -> None:
    """ROME through the playground: the same weights as :func:`apply_rome` with the same settings; no λ."""
    state = _state(gpt2)
    before = WeightSnapshot(gpt2)
    facts = [ROME_FACT, FactEdit("The capital of France is", "France", "Berlin")]
    edited = apply_edit(state, facts, "ROME", lam=-1.0)  # λ is MEMIT's: ignored, not rejected
    assert isinstance(edited, EditView), edited
    assert edited.layers == (LIGHT_ROME.layer,) and edited.lam is None and "λ" not in render(edited)
    assert before.changed() == {gpt2.adapter.w_out_module(LIGHT_ROME.layer) + ".weight"}
    via_widget = WeightSnapshot(gpt2)

    assert isinstance(undo(state), UndoView) and before.unchanged()
    moments = key_second_moment(gpt2, [LIGHT_ROME.layer], n_tokens=LIGHT_ROME.stats_tokens, progress=False)
    contexts = context_templates(gpt2, LIGHT_ROME.z.n_contexts, LIGHT_ROME.z.context_tokens)
    requests = [
        EditRequest("The {} is located in the city of", "Eiffel Tower", "Rome"),
        EditRequest("The capital of {} is", "France", "Berlin"),
    ]
    direct = apply_rome(gpt2, requests, LIGHT_ROME, second_moments=moments, contexts=contexts)
    try:
        assert via_widget.unchanged()
    finally:
        direct.restore()


@pytest.mark.parametrize("label", method_labels())
def test_every_registered_method_edits_through_the_playground_and_undo_restores_it(
    gpt2: LoadedModel, label: str
) -> None:
    """One edit path for the whole registry: each method writes only what it claims (W_out of its layers, FT-W
    its whole block); undo is bit for bit."""
    state = ExplorerState(gpt2, hparams={name: _light(method.defaults(gpt2)) for name, method in METHODS.items()})
    before = WeightSnapshot(gpt2)
    edited = apply_edit(state, [ROME_FACT], label)
    assert isinstance(edited, EditView), edited
    assert edited.method == label and isinstance(state.edits[-1].result, EditResult)
    w_outs = {gpt2.adapter.w_out_module(layer) + ".weight" for layer in edited.layers}
    if label == "FT-W":
        blocks = {name for layer in edited.layers for name in block_parameters(gpt2, layer)}
        assert w_outs <= before.changed() <= blocks and len(before.changed()) > len(w_outs)
    else:
        assert before.changed() == w_outs
    assert isinstance(undo(state), UndoView) and before.unchanged()


def test_later_edits_reuse_the_statistics_and_contexts_of_the_unedited_model(
    gpt2: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """E[k k^T] and eq. 16's contexts are read once, before the first edit (the disk caches key on edited weights)."""
    calls: list[list[int]] = []

    def counted(lm: LoadedModel, layers: list[int], **kwargs: object) -> dict[int, torch.Tensor]:
        calls.append(list(layers))
        return key_second_moment(lm, layers, **kwargs)  # type: ignore[arg-type]  # the widget's own keywords

    monkeypatch.setattr("memit_lab.widgets.key_second_moment", counted)
    state = _state(gpt2)
    contexts = context_templates(gpt2, LIGHT.z.n_contexts, LIGHT.z.context_tokens, seed=LIGHT.z.context_seed)
    moments = key_second_moment(gpt2, [0, 1], n_tokens=LIGHT.stats_tokens, progress=False)
    assert isinstance(apply_edit(state, [ROME_FACT], "MEMIT", "0-1"), EditView)
    assert isinstance(apply_edit(state, [FactEdit("The capital of France is", "France", "Berlin")], "MEMIT"), EditView)
    assert calls == [[0, 1]]
    key = (LIGHT.z.n_contexts, LIGHT.z.context_tokens, LIGHT.z.context_seed)
    assert state.unedited.contexts == {key: contexts}
    assert all(
        torch.equal(state.unedited.second_moments[layer, LIGHT.stats_tokens], moments[layer]) for layer in (0, 1)
    )
    assert isinstance(undo(state), UndoView) and isinstance(undo(state), UndoView)


def test_explorer_state_refuses_hyper_parameters_of_an_unknown_or_another_method(gpt2: LoadedModel) -> None:
    with pytest.raises(ValueError, match="unknown editing method 'MEND'"):
        ExplorerState(gpt2, hparams={"MEND": LIGHT})
    with pytest.raises(TypeError, match="must be a RomeHyperParams, got MemitHyperParams"):
        ExplorerState(gpt2, hparams={"rome": LIGHT})
    assert ExplorerState(gpt2, hparams={"rome": LIGHT_ROME}).hparams == {"rome-seq": LIGHT_ROME}


def test_views_render_escaped_html() -> None:
    assert (
        render(Message("1 < 2", level="info")) == '<div class="memit-message-info" style="color:#0b5394">1 &lt; 2</div>'
    )


def test_undo_pops_edits_newest_first(gpt2: LoadedModel) -> None:
    state = _state(gpt2)
    original = WeightSnapshot(gpt2)
    first = apply_edit(state, [ROME_FACT], "MEMIT", [0, 1])
    after_first = WeightSnapshot(gpt2)
    second = apply_edit(state, [FactEdit("The capital of France is", "France", "Berlin")], "MEMIT", [1, 2])
    assert isinstance(first, EditView) and isinstance(second, EditView)
    assert len(state.edits) == 2
    assert isinstance(undo(state), UndoView) and after_first.unchanged()
    assert isinstance(undo(state), UndoView) and original.unchanged()
    assert isinstance(undo(state), Message)


def test_the_buttons_call_the_same_functions(gpt2: LoadedModel) -> None:
    """Clicking through the panels: bad input shows a message, Edit shows P(new) rising, Undo brings it back."""
    explorer = Explorer(gpt2, samples=1, hparams=LIGHT_SETTINGS)
    before = WeightSnapshot(gpt2)
    explorer.edit.edit.click()
    assert isinstance(explorer.edit.result, Message) and "new object" in explorer.edit.result.text

    row = explorer.edit.rows[0]
    row.prompt.value = row.subject.value = ""
    explorer.trace.kind.value = "hidden"
    explorer.trace.button.click()
    assert isinstance(explorer.trace.result, TraceView)
    assert (row.prompt.value, row.subject.value) == (explorer.trace.prompt.value, explorer.trace.subject.value)
    assert parse_layers(explorer.edit.layers.value, gpt2.n_layers) == explorer.trace.result.layers
    explorer.edit.method.value = "ROME"
    assert explorer.edit.layers.value == "1" and explorer.edit.lam.disabled
    explorer.edit.method.value = "FT-L"
    assert explorer.edit.layers.value == str(FtHyperParams.for_model(gpt2).layer) and explorer.edit.lam.disabled
    explorer.edit.method.value = "MEMIT"
    assert explorer.edit.layers.value == "0-1" and not explorer.edit.lam.disabled

    explorer.edit.rows[0].new_object.value = "Rome"
    explorer.edit.edit.click()
    edited = explorer.edit.result
    assert isinstance(edited, EditView) and edited.layers == explorer.trace.result.layers
    assert explorer.edit.p_after.value == f"after edit: {edited.p_after:.4g}"
    explorer.edit.undo.click()
    assert explorer.edit.p_now.value == f"now: {edited.p_before:.4g} (undone)"
    assert before.unchanged()

    explorer.lens.button.click()
    assert isinstance(explorer.lens.result, LensView)
