"""Edit requests: construction from dicts/records/facts, and refusal of bad batches before anything changes."""

import json
from pathlib import Path

import pytest

from memit_lab.facts import KNOWN_FACTS
from memit_lab.requests import (
    ConflictingRequestsError,
    EditRequest,
    InvalidRequestError,
    check_requests,
    load_requests,
    request_from_dict,
    request_from_fact,
)
from memit_lab.tiny import tiny_tokenizer


def test_plain_dict_and_counterfact_record_give_the_same_request() -> None:
    plain = request_from_dict(
        {"prompt": "{} plays", "subject": "Messi", "target_new": "tennis", "target_true": "football"}
    )
    record = request_from_dict(
        {
            "case_id": 3,
            "requested_rewrite": {
                "prompt": "{} plays",
                "subject": "Messi",
                "target_new": {"str": "tennis", "id": "Q1"},
                "target_true": {"str": "football", "id": "Q2"},
                "relation_id": "",
            },
        }
    )
    assert plain == record
    assert plain.text == "Messi plays"


def test_request_from_fact_keeps_subject_relation_and_true_object() -> None:
    fact = KNOWN_FACTS[0]
    r = request_from_fact(fact, "Rome")
    assert (r.text, r.target_true, r.relation, r.target_new) == (fact.prompt, fact.target, fact.relation, "Rome")


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (EditRequest("The capital of France is", "France", "Rome"), "exactly one '{}'"),
        (EditRequest("The capital of {} is {}", "France", "Rome"), "exactly one '{}'"),
        (EditRequest("The capital of {} is", "  ", "Rome"), "empty subject"),
        (EditRequest("The capital of {} is", "France", ""), "empty new object"),
    ],
)
def test_bad_requests_are_refused_with_a_message(request_: EditRequest, words: str) -> None:
    with pytest.raises(InvalidRequestError, match=words.replace("{", r"\{").replace("}", r"\}")):
        check_requests([EditRequest("{} is in", "Paris", "Rome"), request_])


def test_conflicting_batch_names_both_requests() -> None:
    batch = [
        EditRequest("{} is in", "Paris", "Rome"),
        EditRequest("The capital of {} is", "France", "Rome"),
        EditRequest("The capital of {} is", "France", "Berlin"),
    ]
    with pytest.raises(ConflictingRequestsError, match=r"#1 and #2.*'Rome' and 'Berlin'"):
        check_requests(batch)


def test_same_subject_other_relation_or_exact_duplicate_is_consistent() -> None:
    batch = [
        EditRequest("The capital of {} is", "France", "Rome"),
        EditRequest("The official language of {} is", "France", "German"),
        EditRequest("The capital of {} is", "France", "Rome"),
    ]
    assert check_requests(batch) == batch


def test_relation_id_decides_consistency_when_given() -> None:
    # Two wordings of one relation (same id) may not disagree.
    batch = [
        EditRequest("The capital of {} is", "France", "Rome", relation="capital"),
        EditRequest("{}'s capital city is", "France", "Oslo", relation="capital"),
    ]
    with pytest.raises(ConflictingRequestsError):
        check_requests(batch)


def test_empty_batch_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no requests"):
        check_requests([], tiny_tokenizer("byte-level"))


def test_load_requests_from_json(tmp_path: Path) -> None:
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"prompt": "{} is in", "subject": "Paris", "target_new": "Rome"}]))
    assert load_requests(path) == [EditRequest("{} is in", "Paris", "Rome")]
    path.write_text("{}")
    with pytest.raises(InvalidRequestError, match="non-empty JSON list"):
        load_requests(path)


@pytest.mark.parametrize("context", ["no slot", "{} and {}", "{}{}"])
def test_a_context_needs_exactly_one_slot(context: str) -> None:
    request = EditRequest("{} is in", "Paris", "Rome")
    with pytest.raises(InvalidRequestError, match=r"exactly one '\{\}' where the prompt goes"):
        request.formatted(context)
    with pytest.raises(InvalidRequestError, match="exactly one"):
        request.subject_chars(context)


def test_subject_chars_point_at_the_slot_not_at_an_earlier_mention() -> None:
    request = EditRequest("Where is {}? {} is in", "Paris", "Rome")  # refused: two slots in the template
    with pytest.raises(InvalidRequestError, match="exactly one"):
        request.subject_chars("{}")
    request = EditRequest("The city of {} is in", "Paris", "Rome")
    context = "Paris was rainy. {}"
    start, end = request.subject_chars(context)
    assert request.formatted(context) == "Paris was rainy. The city of Paris is in"
    assert (start, end) == (29, 34) and request.formatted(context)[start:end] == "Paris"
