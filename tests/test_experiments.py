"""The experiment runner edits, scores and restores the model bit for bit; sweeps resume from their cache."""

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from helpers import WeightSnapshot

import memit_lab.experiments as experiments
from memit_lab import LoadedModel, load_model
from memit_lab.cache import read_manifest, write_manifest
from memit_lab.datasets import CounterFactRecord, load_factset
from memit_lab.experiments import (
    METHODS,
    PLANS,
    QUESTIONS,
    Sweep,
    cached_run,
    default_hparams,
    edit_request,
    plan,
    preserved_weights,
    question_slice,
    run_edits,
    scale,
    scaling_sweep,
)
from memit_lab.layer_choice import memit_defaults
from memit_lab.limitations import subject_at_first_token
from memit_lab.memit import MemitHyperParams
from memit_lab.requests import EditRequest
from memit_lab.rome import RomeHyperParams
from memit_lab.zopt import ZParams, ZResult, optimise_z


def test_preserved_weights_restores_bit_for_bit_even_after_an_error(tiny_lm: LoadedModel) -> None:
    before = WeightSnapshot(tiny_lm)

    def failing_edit() -> None:
        with preserved_weights(tiny_lm), torch.no_grad():
            for layer in range(tiny_lm.n_layers):
                tiny_lm.adapter.w_out_parameter(tiny_lm.model, layer).mul_(1.001).add_(1e-3)
            assert not before.unchanged()
            raise KeyError("a failure half-way through an edit")

    with pytest.raises(KeyError, match="half-way"):
        failing_edit()
    assert before.unchanged()


def test_preserved_weights_refuses_to_hide_other_changes() -> None:
    lm = load_model("tiny-llama")
    with pytest.raises(RuntimeError, match="other than W_out"), preserved_weights(lm), torch.no_grad():
        lm.model.get_input_embeddings().weight.add_(1.0)


def _records(n: int) -> list[CounterFactRecord]:
    return load_factset(known=True, relations=["city_country", "country_continent"], n=n)


def test_run_edits_validates_before_touching_anything() -> None:
    lm = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="unknown method"):
        run_edits(lm, _records(2), method="mend")
    with pytest.raises(ValueError, match="n must be between 1 and 2"):
        run_edits(lm, _records(2), method="unedited", n=3)


def test_unedited_run_and_sweep_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gpt2")
    records = _records(4)
    frame = run_edits(lm, records, "unedited", n=3, progress=False)
    assert list(frame.case_id) == [r.case_id for r in records[:3]] and set(frame.n) == {3}
    sweep = scaling_sweep(lm, records, ns=[2, 4], methods=["unedited"], progress=False)
    # The unedited reference is computed once on the largest n, and its prefixes stand for smaller n.
    assert sweep.frame.groupby("n").size().to_dict() == {2: 2, 4: 4}
    pd.testing.assert_frame_equal(
        sweep.frame[sweep.frame.n == 4].reset_index(drop=True)[["case_id", "es", "ns"]],
        run_edits(lm, records, "unedited", progress=False)[["case_id", "es", "ns"]],
    )
    cells = list((tmp_path / "experiments").iterdir())
    assert len([c for c in cells if c.is_dir()]) == 1
    # Resuming: a cached cell is read back, not recomputed (a poisoned but intact entry shows which is used).
    folder = next(c for c in cells if c.is_dir())
    cached = pd.read_csv(folder / "frame.csv")
    cached.loc[0, "es"] = 0.123
    cached.to_csv(folder / "frame.csv", index=False)
    write_manifest(folder, {"edit_seconds": 0.0})
    again = scaling_sweep(lm, records, ns=[2, 4], methods=["unedited"], progress=False)
    poisoned = sweep.frame.es.where(sweep.frame.case_id != records[0].case_id, 0.123)
    assert again.frame.es.tolist() == poisoned.tolist()
    # A damaged entry (a file changed after its manifest) is recomputed, never used.
    (folder / "frame.csv").write_text((folder / "frame.csv").read_text() + "\n")
    fresh = scaling_sweep(lm, records, ns=[2, 4], methods=["unedited"], progress=False)
    pd.testing.assert_frame_equal(fresh.frame, sweep.frame)


def test_committed_cells_are_read_like_cached_ones_and_can_be_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm, records = load_model("tiny-gpt2"), _records(3)
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path / "maker"))
    computed = cached_run(lm, records, "unedited")
    committed = tmp_path / "committed"
    shutil.copytree(tmp_path / "maker" / "experiments", committed, ignore=shutil.ignore_patterns("*.lock"))
    folder = next(committed.iterdir())
    poisoned = pd.read_csv(folder / "frame.csv").assign(es=0.5)  # shows which copy a run reads
    poisoned.to_csv(folder / "frame.csv", index=False)
    write_manifest(folder, {"edit_seconds": 1.5})
    monkeypatch.setattr(experiments, "COMMITTED_CELLS", committed)
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path / "fresh"))
    read = cached_run(lm, records, "unedited")
    assert read.es.tolist() == [0.5] * 3 and read.attrs["edit_seconds"] == 1.5
    assert not (tmp_path / "fresh" / "experiments" / folder.name).exists()  # read in place, not copied
    monkeypatch.setenv("MEMIT_LAB_COMMITTED_CELLS", "0")
    pd.testing.assert_frame_equal(cached_run(lm, records, "unedited"), computed)
    # A committed cell changed after its manifest is never used.
    monkeypatch.delenv("MEMIT_LAB_COMMITTED_CELLS")
    (folder / "frame.csv").write_text((folder / "frame.csv").read_text() + "\n")
    pd.testing.assert_frame_equal(cached_run(lm, records, "unedited"), computed)


def test_agreement_compares_the_same_records_score_by_score() -> None:
    live = pd.DataFrame({"case_id": [3, 1], "method": "memit", "es": [1.0, 0.0], "nm": [0.5, 0.25], "ge": [6.0, 5.0]})
    stored = pd.DataFrame({"case_id": [1, 3], "es": [0.0, 1.0], "nm": [0.2, 0.5]})  # other order, no GE
    table = experiments.agreement(live, stored)
    assert list(table.index) == ["es", "nm"]  # scores both have; method and case_id are not scores
    assert table.loc["nm", "largest |difference|"] == pytest.approx(0.05)
    assert table.loc["es"].tolist() == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="same records"):
        experiments.agreement(live, stored.iloc[:1])


def test_the_committed_cells_are_the_small_plans_sweep_and_intact(smollm: LoadedModel) -> None:
    # Notebooks 04-05 read this sweep; a change of the plan, the fact set or a default that is not followed by
    # scripts/commit_cells.py would make every fresh clone compute it again (correct, but ten minutes slower).
    small = experiments.PLANS["small"]
    records = load_factset(known=True)
    options = {"generation": small.generation, "max_new_tokens": 100}
    missing = [
        (method, n)
        for method in ("unedited", *small.methods)
        for n in (small.sweep_ns[-1:] if method == "unedited" else small.sweep_ns)
        if experiments._committed_cell(
            experiments._cell_key(smollm, records[:n], method, default_hparams(smollm, method), options)
        )
        is None
    ]
    assert not missing, f"not committed: {missing}; run scripts/commit_cells.py"
    cells = [c for c in experiments.COMMITTED_CELLS.iterdir() if c.is_dir()]
    assert all(read_manifest(c, full_check=True) is not None for c in cells)


def test_memit_cells_of_a_sweep_share_one_z_optimisation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gpt2")
    records = _records(3)
    hp = MemitHyperParams(layers=(0, 1), lam=10.0, z=ZParams(steps=4, n_contexts=2), stats_tokens=2048)
    calls: list[int] = []

    def counted(lm: LoadedModel, requests: list[EditRequest], *args: Any, **kwargs: Any) -> ZResult:
        calls.append(len(requests))
        return optimise_z(lm, requests, *args, **kwargs)

    monkeypatch.setattr(experiments, "optimise_z", counted)
    sweep = scaling_sweep(lm, records, ns=[1, 3], methods=["memit"], hparams={"memit": hp}, progress=False)
    assert calls == [3]  # once, for the largest n
    # The n = 1 cell scores as a run that optimises its own z does.
    alone = run_edits(lm, records[:1], "memit", hparams=hp, progress=False)
    shared = sweep.frame[(sweep.frame.method == "memit") & (sweep.frame.n == 1)].reset_index(drop=True)
    pd.testing.assert_frame_equal(shared[["es", "ps", "ns"]], alone[["es", "ps", "ns"]])
    for col in ("em", "pm", "nm"):
        assert shared[col].tolist() == pytest.approx(alone[col].tolist(), abs=1e-4)


def test_rome_cells_of_a_sweep_come_from_one_sequential_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gpt2")
    records = _records(3)
    hp = RomeHyperParams(layer=1, z=ZParams(steps=4, n_contexts=2), stats_tokens=2048)
    edited: list[int] = []
    real = experiments.apply_rome

    def counted(lm: LoadedModel, requests: list[EditRequest], *args: Any, **kwargs: Any) -> Any:
        edited.append(len(requests))
        return real(lm, requests, *args, **kwargs)

    monkeypatch.setattr(experiments, "apply_rome", counted)
    snap = WeightSnapshot(lm)
    sweep = scaling_sweep(lm, records, ns=[1, 3], methods=["rome-seq"], hparams={"rome-seq": hp}, progress=False)
    assert snap.unchanged() and edited == [3]  # one run of 3 edits, scored after its 1st and 3rd
    # each prefix scores exactly as a run of that many edits alone (a fresh cache, no sharing)
    monkeypatch.setattr(experiments, "apply_rome", real)
    for n in (1, 3):
        alone = run_edits(lm, records[:n], "rome-seq", hparams=hp, progress=False)
        cell = sweep.frame[(sweep.frame.method == "rome-seq") & (sweep.frame.n == n)].reset_index(drop=True)
        for col in ("es", "ps", "ns", "em", "pm", "nm"):
            assert cell[col].tolist() == pytest.approx(alone[col].tolist(), abs=1e-6), (n, col)
    seconds = sweep.seconds[sweep.seconds.method == "rome-seq"].set_index("n").edit_seconds
    assert 0 < seconds[1] < seconds[3]


def test_sweep_summary_table_and_plot() -> None:
    rows = []
    for method, n, es in [("unedited", 1, 0.0), ("unedited", 2, 0.0), ("memit", 1, 1.0), ("memit", 2, 0.5)]:
        for case in range(n):
            rows.append({"method": method, "n": n, "case_id": case, "es": es, "ps": 0.5, "ns": 1.0,
                         "em": 0.1, "pm": 0.0, "nm": 0.2})  # fmt: skip
    sweep = Sweep(pd.DataFrame(rows))
    summary = sweep.summary()
    assert summary.set_index(["method", "n"]).loc[("memit", 2), "ES"] == 50
    table = sweep.table()
    assert list(table.index) == ["unedited", "memit"] and table.loc["memit", "S"] == pytest.approx(60.0)
    assert table.loc["unedited", "S"] == 0.0
    fig = sweep.plot(["ES", "S"])
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"


def test_question_slice_is_zsre_shaped() -> None:
    records = load_factset(relations=["city_country", "team_sport", "book_author"], n=30)
    questions = question_slice(records, n=20)
    assert len(questions) == 20
    edited = {r.subject.lower() for r in records[:20]}
    asked = {r.case_id: QUESTIONS[r.relation_id][0].format(r.subject).rstrip("?").lower() for r in records[20:]}
    spare = {"nq question: " + asked[r.case_id]: r for r in records[20:]}
    for q, r in zip(questions, records[:20], strict=True):
        assert q.target == r.target_true == q.answers[0] and q.alt == r.target_new
        assert q.subject in q.src and q.subject in q.rephrase and q.src != q.rephrase
        # specificity asks about a record that no edit of the batch touches, of another relation
        other = spare[q.loc]
        assert other.subject.lower() not in edited and other.relation_id != r.relation_id
        assert q.loc_ans == other.target_true
    assert len({q.loc for q in questions}) > 1
    with pytest.raises(ValueError, match="none is left for the unrelated"):
        question_slice(records)
    with pytest.raises(ValueError, match="at least two"):
        question_slice(load_factset(relations=["city_country"], n=5))


# --- scale switch, plans and the cached runner ------------------------------------------------------------------


def test_scale_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMIT_LAB_SCALE", raising=False)
    assert scale() == "small" and plan() is PLANS["small"]
    monkeypatch.setenv("MEMIT_LAB_SCALE", " Full ")
    assert scale() == "full" and plan() is PLANS["full"]
    monkeypatch.setenv("MEMIT_LAB_SCALE", "huge")
    with pytest.raises(ValueError, match="MEMIT_LAB_SCALE='huge' is not a scale"):
        plan()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_plan_fits_the_fact_set(name: str) -> None:
    p = PLANS[name]
    known = load_factset(known=True)
    assert max(p.sweep_ns) <= len(known) and p.tradeoff_n <= len(known)
    assert len(question_slice(known, n=p.table1_n)) == p.table1_n
    per_relation = {r: sum(x.relation_id == r for x in known) for r in p.relations}
    assert min(per_relation.values()) >= p.per_relation, per_relation
    assert set(p.methods) <= set(METHODS) and all(layers == tuple(sorted(layers)) for layers in p.layer_ranges)


def test_cached_run_keys_default_hparams_like_explicit_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    lm = load_model("tiny-gpt2")
    first = cached_run(lm, _records(2), "unedited")
    again = cached_run(lm, _records(2), "unedited", hparams=default_hparams(lm, "unedited"))
    pd.testing.assert_frame_equal(first, again)
    assert len([c for c in (tmp_path / "experiments").iterdir() if c.is_dir()]) == 1
    assert default_hparams(lm, "memit") == memit_defaults(lm)
    with pytest.raises(ValueError, match="unknown method"):
        default_hparams(lm, "mend")


# --- the check on the bundled model ---------------------------------------------------------------------


def test_memit_writes_ten_known_facts_and_run_edits_restores_every_weight(smollm: LoadedModel) -> None:
    # The first ten known facts whose subject does not open the prompt. The first ten as they come include
    # "Facebook is a multinational company from": at the first token the subject sits in the attention sink, and the
    # bare prompt does not read the edit (ES 0.9 with it; test_limitations shows the edit read after any prefix).
    known = load_factset(known=True)
    records = [r for r in known if not subject_at_first_token(smollm, edit_request(r))][:10]
    assert [r.case_id for r in records] == [r.case_id for r in known[:11] if r.subject != "Facebook"]
    before = WeightSnapshot(smollm)
    unedited = run_edits(smollm, records, "unedited", progress=False)
    edited = run_edits(smollm, records, "memit", progress=False)
    assert before.unchanged()
    assert unedited.es.mean() == 0.0  # known facts: the true object wins before
    assert edited.es.mean() == 1.0, list(edited.es)
    assert abs(edited.ns.mean() - unedited.ns.mean()) <= 0.1, (edited.ns.mean(), unedited.ns.mean())
    assert edited.attrs["edit_seconds"] > 0 and set(edited.attrs["edit_phases"]) >= {"z", "keys", "solve"}


def test_hparams_table_lists_each_methods_own_defaults() -> None:
    lm = load_model("tiny-gpt2")
    table = experiments.hparams_table(lm, ["memit", "ft-l"])
    memit, ft = default_hparams(lm, "memit"), default_hparams(lm, "ft-l")
    assert table.loc["layers", "memit"] == "-".join(map(str, memit.layers))
    assert table.loc["z.clamp", "memit"] == memit.z.clamp and table.loc["lam", "memit"] == memit.lam
    assert table.loc["steps", "ft-l"] == ft.steps and type(table.loc["steps", "ft-l"]) is int
    assert table.loc["lam", "ft-l"] == "" and table.loc["norm_constraint", "memit"] == ""
