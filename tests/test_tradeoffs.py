"""Figures 6 and 7: per-relation and mixed batches, and the lambda x layers grid, on a tiny model."""

from pathlib import Path

import pandas as pd
import pytest

from memit_lab import load_model
from memit_lab.datasets import load_factset
from memit_lab.evaluate import counterfact_summary
from memit_lab.experiments import run_edits
from memit_lab.memit import MemitHyperParams
from memit_lab.tradeoffs import interleave, relation_study, tradeoff_grid
from memit_lab.zopt import ZParams

RELATIONS = ["city_country", "country_language"]
# Few z steps and no sampled contexts: the tests check the bookkeeping, not edit quality.
TINY = MemitHyperParams(layers=(0, 1), lam=1.0, z=ZParams(steps=3, n_contexts=0), stats_tokens=512)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))


def test_interleave_alternates_and_keeps_everything() -> None:
    assert interleave([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]
    assert interleave([]) == []


def test_relation_study_runs_each_relation_alone_and_all_mixed() -> None:
    lm = load_model("tiny-llama")
    records = load_factset(relations=RELATIONS, n=40)
    study = relation_study(lm, records, RELATIONS, 2, hparams=TINY, progress=False)
    frame = study.frame
    assert frame.groupby("condition").size().to_dict() == {"alone": 4, "mixed": 4, "unedited": 4}
    for condition in ("alone", "mixed", "unedited"):
        assert frame[frame.condition == condition].groupby("relation_id").size().to_dict() == dict.fromkeys(
            RELATIONS, 2
        )
    # "alone" is exactly the relation's own batch edited by itself.
    first = [r for r in records if r.relation_id == RELATIONS[0]][:2]
    alone = frame[(frame.condition == "alone") & (frame.relation_id == RELATIONS[0])].reset_index(drop=True)
    expected = run_edits(lm, first, "memit", hparams=TINY, progress=False)
    pd.testing.assert_frame_equal(alone[expected.columns], expected, check_dtype=False)
    summary = study.summary()
    assert list(summary.columns) == ["S", "ES", "PS", "NS"] and len(summary) == 6
    assert len(study.plot_relations().axes) == 3 and len(study.plot_mixed().axes) == 3
    fig6 = study.plot_figure6()
    assert {t.get_text() for t in fig6.axes[0].texts} == set(study.summary().xs("alone", level="condition").index)


def test_relation_study_refuses_too_few_records_before_editing() -> None:
    lm = load_model("tiny-llama")
    with pytest.raises(ValueError, match="fewer than n=3"):
        relation_study(lm, load_factset(relations=RELATIONS, n=4), RELATIONS, 3, hparams=TINY, progress=False)


def test_tradeoff_grid_has_every_cell_and_huge_lambda_changes_nothing() -> None:
    lm = load_model("tiny-gpt2")
    records = load_factset(known=True, n=3)
    grid = tradeoff_grid(lm, records, [1.0, 1e12], [(0,), (0, 1)], hparams=TINY, progress=False)
    table = grid.table
    assert list(table.layers) == ["unedited", "0", "0", "0-1", "0-1"] and table.lam.isna().tolist()[0]
    unedited = counterfact_summary(run_edits(lm, records, "unedited", progress=False))
    pd.testing.assert_series_equal(table.iloc[0][unedited.index].astype(float), unedited, check_names=False)
    # Eq. 14 with lambda -> infinity: Delta -> 0, so the probability gaps are the unedited model's.
    for _, row in table[table.lam == 1e12].iterrows():
        assert row[["EM", "PM", "NM"]].astype(float).to_numpy() == pytest.approx(unedited[["EM", "PM", "NM"]], abs=1e-4)
    assert grid.plot().axes[0].get_xlabel() == "specificity NS (%)"
