"""Loaders read the paper's formats, refuse malformed records by name, and the bundled fact set keeps its promises."""

import copy
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from memit_lab.datasets import (
    CounterFactRecord,
    DatasetFormatError,
    load_counterfact,
    load_factset,
    load_records,
    load_snippets,
    load_zsre,
)

FIXTURES = Path(__file__).parent / "fixtures"
COUNTERFACT = FIXTURES / "counterfact_small.json"
SNIPPETS = FIXTURES / "attribute_snippets_small.json"
ZSRE = FIXTURES / "zsre_small.json"


def _write(tmp_path: Path, data: Any, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_counterfact_fixture_reads_every_field() -> None:
    records = load_counterfact(COUNTERFACT, snippets=SNIPPETS)
    assert [r.case_id for r in records] == [11, 12, 13]
    first = records[0]
    assert first.edit_prompt == "The mother tongue of Jean Gabin is"
    assert (first.target_new, first.target_true, first.relation_id) == ("English", "French", "P103")
    assert (first.target_new_id, first.target_true_id) == ("Q1860", "Q150")
    assert len(first.paraphrase_prompts) == 2 and len(first.neighborhood_prompts) == 3
    assert first.attribute_prompts[1] == "Agatha Christie is a native speaker of"
    assert first.generation_prompts == ("Jean Gabin's mother tongue is", "Jean Gabin was born in")
    # RS references are matched on (relation_id, target_new id): two snippets for English, one for Asia.
    assert len(first.reference_texts) == 2 and "English writer" in first.reference_texts[0]
    assert records[1].reference_texts == ("Asia is the largest continent, home to China and India.",)
    # Optional fields may be absent; an id defaults to the object's name.
    assert records[2].attribute_prompts == () and records[2].generation_prompts == ()
    assert records[2].reference_texts == () and records[2].target_new_id == "Portuguese"
    assert records[2].p_true is None and records[2].known is None
    assert load_counterfact(COUNTERFACT, n=1) == [load_counterfact(COUNTERFACT)[0]]


def test_records_are_frozen() -> None:
    record = load_counterfact(COUNTERFACT)[0]
    with pytest.raises(AttributeError):
        record.subject = "someone else"  # type: ignore[misc]  # the point: frozen


MUTATIONS = [
    (lambda r: r.pop("requested_rewrite"), "record 0 (case_id 11): requested_rewrite must be an object"),
    (lambda r: r["requested_rewrite"].update(prompt="The mother tongue is"), "must contain '{}' once"),
    (lambda r: r["requested_rewrite"].update(prompt="{} and {} speak"), "must contain '{}' once"),
    (lambda r: r["requested_rewrite"].update(subject=""), "requested_rewrite.subject must be a non-empty string"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=" "), "target_new.str must be a non-empty string"),
    (lambda r: r["requested_rewrite"].update(target_true="French"), "target_true must be an object"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str="French"), "an edit must change the object"),
    (lambda r: r.update(paraphrase_prompts="Jean Gabin spoke"), "paraphrase_prompts must be a list"),
    (lambda r: r.update(neighborhood_prompts=[]), "neighborhood_prompts must be a list of at least 1"),
    (lambda r: r.update(neighborhood_prompts=["ok", 3]), "neighborhood_prompts[1] must be a non-empty string"),
    (lambda r: r.update(case_id="11"), "case_id must be an integer"),
    (lambda r: r.update(known="yes"), "known must be true or false"),
]


@pytest.mark.parametrize(("mutate", "message"), MUTATIONS)
def test_malformed_counterfact_records_are_refused_by_name(tmp_path: Path, mutate: Any, message: str) -> None:
    data = json.loads(COUNTERFACT.read_text())
    bad = copy.deepcopy(data[0])
    mutate(bad)
    path = _write(tmp_path, [bad, *data[1:]])
    with pytest.raises(DatasetFormatError) as err:
        load_counterfact(path, strict=True)
    assert message in str(err.value)
    assert str(err.value).startswith("record 0")
    # By default the same record is skipped, and reported with the same message.
    with pytest.warns(UserWarning, match="data.json: skipped 1 of 3 records") as caught:
        records = load_counterfact(path)
    assert [r.case_id for r in records] == [12, 13]
    assert [s.index for s in records.skipped] == [0] and message in records.skipped[0].reason
    assert message in str(caught[0].message) and "strict=True" in str(caught[0].message)


def test_skipping_keeps_the_first_of_a_duplicate_and_counts_n_in_usable_records(tmp_path: Path) -> None:
    data = json.loads(COUNTERFACT.read_text())
    broken = {"case_id": 99, "requested_rewrite": {}}
    path = _write(tmp_path, [broken, data[0], data[1], data[1], data[2]])
    with pytest.warns(UserWarning, match="skipped 2 of 5 records"):
        records = load_counterfact(path)
    assert [r.case_id for r in records] == [11, 12, 13]
    assert [s.index for s in records.skipped] == [0, 3]
    assert "record 3: case_id 12 occurs twice" in records.skipped[1].reason
    with pytest.warns(UserWarning, match="skipped 1 of 3 records"):
        first_two = load_counterfact(path, n=2)  # n counts the records kept, not the records read
    assert [r.case_id for r in first_two] == [11, 12] and len(first_two.skipped) == 1
    assert "indices 0, 3" in records.report() and "none skipped" in load_counterfact(COUNTERFACT).report()


def test_a_file_with_no_usable_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="none of the 2 records read is usable"):
        load_counterfact(_write(tmp_path, [{"case_id": 1}, {"case_id": 2}]))
    assert load_counterfact(_write(tmp_path, [])) == []


def test_malformed_files(tmp_path: Path) -> None:
    data = json.loads(COUNTERFACT.read_text())
    with pytest.raises(DatasetFormatError, match="record 2: case_id 12 occurs twice"):
        load_counterfact(_write(tmp_path, [data[0], data[1], data[1]]), strict=True)
    with pytest.raises(DatasetFormatError, match="holds a JSON dict"):
        load_counterfact(_write(tmp_path, {"records": data}))
    (tmp_path / "broken.json").write_text('[{"case_id": 1,')
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        load_counterfact(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="pass the path"):
        load_counterfact(tmp_path / "missing.json")
    with pytest.raises(DatasetFormatError, match=r"snippet entry 0: samples\[0\].text"):
        load_snippets(_write(tmp_path, [{"relation_id": "P1", "target_id": "Q1", "samples": [{"txt": "x"}]}]))


def test_zsre_fixture_and_target_choice() -> None:
    records = load_zsre(ZSRE)
    assert [r.target for r in records] == ["France", "piano"]  # answers[0], as the paper's code
    assert [r.target for r in load_zsre(ZSRE, target="alt")] == ["Belgium", "violin"]
    lyon = records[0]
    assert lyon.prompt == "Which country is {} located in?"
    assert lyon.loc_prompt == "nq question: who wrote the play hamlet?"
    assert records[1].answers == ("piano", "viola") and lyon.loc_ans == "William Shakespeare"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("src", "Who wrote it?", "subject 'Ludwig van Beethoven' does not occur in src"),
        ("answers", [], "answers must be a list of at least 1"),
        ("rephrase", None, "rephrase must be a non-empty string"),
        ("loc_ans", "", "loc_ans must be a non-empty string"),
    ],
)
def test_malformed_zsre_records_are_refused(tmp_path: Path, field: str, value: Any, message: str) -> None:
    data = json.loads(ZSRE.read_text())
    data[1][field] = value
    path = _write(tmp_path, data)
    with pytest.raises(DatasetFormatError) as err:
        load_zsre(path, strict=True)
    assert str(err.value).startswith("record 1: ") and message in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1 of 2 records"):
        records = load_records(path)  # told apart as zsRE, skipping the same way
    assert [r.subject for r in records] == ["Lyon"] and message in records.skipped[0].reason


def test_zsre_alt_target_needs_alt(tmp_path: Path) -> None:
    data = json.loads(ZSRE.read_text())
    del data[0]["alt"]
    assert load_zsre(_write(tmp_path, data))[0].alt == ""
    with pytest.raises(DatasetFormatError, match="record 0: alt must be"):
        load_zsre(_write(tmp_path, data), target="alt", strict=True)


def test_an_empty_alt_is_skipped_only_where_it_is_the_target(tmp_path: Path) -> None:
    """zsRE's eval file has one record whose alt is empty: unused with the paper's target, skipped with alt's."""
    data = json.loads(ZSRE.read_text())
    data[1]["alt"] = ""
    path = _write(tmp_path, data)
    assert [r.alt for r in load_zsre(path, strict=True)] == ["Belgium", ""]
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 records \(indices 1\): record 1: alt must be"):
        records = load_zsre(path, target="alt")
    assert [r.target for r in records] == ["Belgium"]


# --- the bundled fact set ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def factset() -> list[CounterFactRecord]:
    return load_factset()


def test_factset_size_and_shape(factset: list[CounterFactRecord]) -> None:
    relations = Counter(r.relation_id for r in factset)
    assert len(factset) >= 2000 and len(relations) >= 10
    assert min(relations.values()) >= 50
    for r in factset:
        assert r.subject in r.edit_prompt and r.target_new != r.target_true
        assert len(r.paraphrase_prompts) >= 2 and all(r.subject in p for p in r.paraphrase_prompts)
        assert len(r.neighborhood_prompts) >= 5 and not any(
            r.subject == p.split(" is ")[0] for p in r.neighborhood_prompts
        )
        assert len(r.generation_prompts) >= 2 and r.reference_texts
        assert r.p_true is not None and 0 < r.p_true <= 1 and isinstance(r.known, bool)


def test_factset_neighbours_share_the_true_object(factset: list[CounterFactRecord]) -> None:
    """Each neighbourhood prompt is another record's edit prompt with the same relation and true object."""
    truth = {(r.relation_id, r.edit_prompt): r.target_true for r in factset}
    for r in factset:
        assert len(set(r.neighborhood_prompts)) == len(r.neighborhood_prompts)
        for prompt in r.neighborhood_prompts:
            assert prompt != r.edit_prompt and truth[(r.relation_id, prompt)] == r.target_true
        # The counterfactual is one of the relation's objects (its reference text is found under that relation,
        # which the snippets file lists for every object), and attribute prompts hold it as their truth.
        assert r.reference_texts and r.target_new in r.reference_texts[0]
        for prompt in r.attribute_prompts:
            assert truth.get((r.relation_id, prompt), r.target_new) == r.target_new


def test_factset_filters(factset: list[CounterFactRecord]) -> None:
    known = load_factset(known=True)
    assert 0.2 < len(known) / len(factset) < 0.8 and all(r.known for r in known)
    capitals = load_factset(relations=["city_country"], known=True, n=7)
    assert len(capitals) == 7 and {r.relation_id for r in capitals} == {"city_country"}
    assert capitals == [r for r in known if r.relation_id == "city_country"][:7]
    assert load_factset(where=lambda r: r.subject == "Lyon")[0].target_true in {"France", "Europe"}
    with pytest.raises(KeyError, match="no relation"):
        load_factset(relations=["capital_of_mars"])
    # The stored order is shuffled: the first 100 records mix many relations.
    assert len({r.relation_id for r in factset[:100]}) >= 10
