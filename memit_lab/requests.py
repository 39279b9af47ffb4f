"""Edit requests: "make the model say *new object* after *this prompt about this subject*", checked before any edit.

A request is the paper's (s, r, o*) written as a prompt template with ``{}`` where the
subject goes (``"The {} is located in the city of"``), the subject (``"Eiffel Tower"``)
and the new object (``"Rome"``); the true object is optional and only used for
reports. Requests come from plain dicts, from a JSON file, from CounterFact records
(``requested_rewrite``) or from :class:`memit_lab.facts.Fact`.

:func:`check_requests` refuses a batch **before any weight changes** when

* a template has no ``{}`` (the subject would not be in the prompt), or more than one;
* the subject or the new object is empty;
* the subject cannot be located in the tokenised prompt (with a tokenizer);
* the batch is inconsistent (paper eq. 5): one subject--relation pair is sent to two
  different objects. Least squares would then average the two values, writing neither;
  the error names the conflicting requests. Exact duplicates are harmless and allowed.

Example:
    >>> reqs = requests_from_dicts([{"prompt": "The {} is located in", "subject": "Eiffel Tower",
    ...                              "target_new": "Rome"}])
    >>> reqs[0].text, reqs[0].target_new
    ('The Eiffel Tower is located in', 'Rome')
    >>> check_requests(reqs + [EditRequest("The {} is located in", "Eiffel Tower", "Berlin")])
    Traceback (most recent call last):
    ...
    memit_lab.requests.ConflictingRequestsError: conflicting requests (paper eq. 5: one subject-relation pair, \
one object): #0 and #1 send ('Eiffel Tower', 'The {} is located in') to 'Rome' and 'Berlin'; drop one of them
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from .facts import Fact
from .prompts import SubjectNotFoundError, subject_token_span

__all__ = [
    "ConflictingRequestsError",
    "EditRequest",
    "InvalidRequestError",
    "check_requests",
    "load_requests",
    "request_from_dict",
    "request_from_fact",
    "requests_from_dicts",
]


class InvalidRequestError(ValueError):
    """A request that cannot be edited as written (no subject slot, empty subject or object)."""


class ConflictingRequestsError(ValueError):
    """Two requests send the same subject and relation to different objects (paper eq. 5)."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after ``template.format(subject)`` the model should say ``target_new``.

    Attributes:
        template: the prompt with ``{}`` for the subject, e.g. ``"The capital of {} is"``.
        subject: the subject, e.g. ``"France"``; z and keys are read at its last token.
        target_new: the object to write, e.g. ``"Rome"`` (scored with a leading space).
        target_true: the object the model says now, if known (reports only).
        relation: a relation id; when empty the template stands for the relation (eq. 5 check).
    """

    template: str
    subject: str
    target_new: str
    target_true: str | None = None
    relation: str = ""

    @property
    def text(self) -> str:
        """The edit prompt: the template filled with the subject."""
        return self.template.replace("{}", self.subject)

    @property
    def relation_key(self) -> str:
        return self.relation or self.template

    def formatted(self, context: str) -> str:
        """The prompt placed in a context template (``"... . {}"``), as eq. 16's x_j + p.

        Example:
            >>> EditRequest("{} is in", "Paris", "Rome").formatted("I read that. {}")
            'I read that. Paris is in'
        """
        if not isinstance(context, str) or context.count("{}") != 1:
            raise InvalidRequestError(
                f"context {context!r} must contain exactly one '{{}}' where the prompt goes, e.g. 'I read that. {{}}'"
            )
        return context.replace("{}", self.text)

    def subject_chars(self, context: str) -> tuple[int, int]:
        """Characters ``[start, end)`` of the subject in :meth:`formatted` -- at its slot, even where the
        context's own words repeat it.

        Example:
            >>> r = EditRequest("{} is in", "Paris", "Rome")
            >>> start, end = r.subject_chars("Paris. {}")
            >>> r.formatted("Paris. {}")[start:end], start
            ('Paris', 7)
        """
        self.check()
        self.formatted(context)  # refuses a context without exactly one slot
        start = context.index("{}") + self.template.index("{}")
        return start, start + len(self.subject)

    def check(self) -> None:
        """Raise :class:`InvalidRequestError` unless the request can be edited."""
        if not isinstance(self.template, str) or self.template.count("{}") != 1:
            raise InvalidRequestError(
                f"template {self.template!r} must contain exactly one '{{}}' where the subject goes, "
                "e.g. 'The capital of {} is'"
            )
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise InvalidRequestError(f"request {self.text!r} has an empty subject; give the subject the edit is about")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise InvalidRequestError(f"request {self.text!r} has an empty new object; give the object to write")


def request_from_dict(raw: Mapping[str, Any]) -> EditRequest:
    """An :class:`EditRequest` from a plain dict or a CounterFact record.

    Accepted shapes: ``{"prompt", "subject", "target_new"[, "target_true", "relation"]}`` with
    plain strings, or CounterFact's ``{"requested_rewrite": {"prompt", "subject",
    "target_new": {"str"}, "target_true": {"str"}, "relation_id"}}``.

    Example:
        >>> request_from_dict({"requested_rewrite": {"prompt": "{} plays", "subject": "Messi",
        ...     "target_new": {"str": "tennis"}, "target_true": {"str": "football"}, "relation_id": "P641"}})
        EditRequest(template='{} plays', subject='Messi', target_new='tennis', target_true='football', relation='P641')
    """
    if "requested_rewrite" in raw:
        raw = raw["requested_rewrite"]

    def text(field: str, required: bool = True) -> str | None:
        value = raw.get(field)
        if isinstance(value, Mapping):
            value = value.get("str")
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise InvalidRequestError(f"request field {field!r} must be a string, got {value!r} in {dict(raw)}")
        return value

    template = text("prompt")
    subject = text("subject")
    target_new = text("target_new")
    assert template is not None and subject is not None and target_new is not None
    relation = raw.get("relation_id", raw.get("relation", "")) or ""
    return EditRequest(template, subject, target_new, text("target_true", required=False), str(relation))


def request_from_fact(fact: Fact, target_new: str) -> EditRequest:
    """A counterfactual request from a known fact: same subject and relation, ``target_new`` as object.

    Example:
        >>> from memit_lab.facts import KNOWN_FACTS
        >>> request_from_fact(KNOWN_FACTS[0], "Rome").text
        'The Eiffel Tower is located in the city of'
    """
    return EditRequest(fact.template, fact.subject, target_new, fact.target, fact.relation)


def requests_from_dicts(raws: Iterable[Mapping[str, Any]]) -> list[EditRequest]:
    """:func:`request_from_dict` over a list."""
    return [request_from_dict(raw) for raw in raws]


def load_requests(path: str | os.PathLike[str]) -> list[EditRequest]:
    """Requests from a JSON file holding a list of request dicts (or CounterFact records)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list) or not data:
        raise InvalidRequestError(f"{path} must hold a non-empty JSON list of requests, got {type(data).__name__}")
    return requests_from_dicts(data)


def _check_consistent(requests: Sequence[EditRequest]) -> None:
    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(requests):
        key = (r.subject.strip(), r.relation_key)
        j = first.setdefault(key, i)
        if requests[j].target_new.strip() != r.target_new.strip():
            raise ConflictingRequestsError(
                f"conflicting requests (paper eq. 5: one subject-relation pair, one object): #{j} and #{i} send "
                f"{key} to {requests[j].target_new!r} and {r.target_new!r}; drop one of them"
            )


def check_requests(
    requests: Sequence[EditRequest], tokenizer: PreTrainedTokenizerBase | None = None
) -> list[EditRequest]:
    """Check a batch (see the module docstring) and return it as a list; raise before anything changes.

    With a ``tokenizer`` the subject's tokens are also located in every prompt.
    """
    requests = list(requests)
    if not requests:
        raise InvalidRequestError("no requests given; pass at least one EditRequest")
    for i, r in enumerate(requests):
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(f"request #{i} is a {type(r).__name__}; build EditRequest objects")
        r.check()
        if tokenizer is not None:
            try:
                subject_token_span(tokenizer, r.text, r.subject)
            except SubjectNotFoundError as err:
                raise InvalidRequestError(f"request #{i}: {err}") from None
    _check_consistent(requests)
    return requests
