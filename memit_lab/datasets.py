"""Edit benchmarks as frozen records: CounterFact / MultiCounterFact, zsRE, and memit_lab's own fact set.

Nothing is downloaded: pass a file you have. The formats are the paper's:

* **CounterFact / MultiCounterFact** (a JSON list). Each record::

      {"case_id": 0,
       "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                             "relation_id": "P103",
                             "target_new": {"str": "English", "id": "Q1860"},
                             "target_true": {"str": "French", "id": "Q150"}},
       "paraphrase_prompts": [...], "neighborhood_prompts": [...],
       "attribute_prompts": [...], "generation_prompts": [...]}

  ``paraphrase_prompts`` say the edited fact in other words; ``neighborhood_prompts`` are
  about *other* subjects with the same relation and the same true object (they must keep
  it); ``attribute_prompts`` are about subjects whose true object is the *new* one;
  ``generation_prompts`` start free text (fluency, consistency). The optional snippets
  file (the reference's ``attribute_snippets.json``: a list of ``{"relation_id",
  "target_id", "samples": [{"text": ...}]}``) supplies reference texts about each new
  object for the reference score RS.
* **zsRE** (MEND's question-answering split, a JSON list). Each record::

      {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
       "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
       "rephrase": "What university did Watts Humphrey take part in?",
       "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}

  The paper's code edits towards ``answers[0]`` (``target="answers"``, the default here);
  other libraries use ``alt`` (``target="alt"``).
* **memit_lab's fact set** for the bundled model (``memit_lab/data/``, built by
  ``scripts/build_factset.py``; see the data card there): CounterFact format plus the
  bundled model's ``p_true`` and ``known`` flag, with a snippets file in the reference's
  format. :func:`load_factset` reads it.

Every record is checked when loaded. Real files have a few bad records (zsRE's eval file has
one whose ``alt`` is empty: bad where ``alt`` is the edit target), so by default a malformed
record is **skipped and reported**: the
loaders return a :class:`LoadedRecords` list whose ``.skipped`` names each one (position,
``case_id``, the field to fix) and warn with a summary. ``strict=True`` refuses the file at its
first bad record instead, raising :class:`DatasetFormatError` with the same message.

Example:
    >>> facts = load_factset()
    >>> r = facts[0]
    >>> r.edit_prompt.startswith(r.prompt.split("{}")[0] + r.subject) or r.prompt.startswith("{}")
    True
    >>> r.target_new != r.target_true and len(r.neighborhood_prompts) >= 5
    True
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = [
    "FACTSET_FILE",
    "SNIPPETS_FILE",
    "CounterFactRecord",
    "DatasetFormatError",
    "LoadedRecords",
    "SkippedRecord",
    "ZsreRecord",
    "counterfact_record",
    "load_counterfact",
    "load_factset",
    "load_records",
    "load_snippets",
    "load_zsre",
    "zsre_record",
]

FACTSET_FILE = "factset.json"
SNIPPETS_FILE = "factset_snippets.json"


class DatasetFormatError(ValueError):
    """A dataset file or record does not have the expected shape."""


@dataclass(frozen=True)
class SkippedRecord:
    """A record a loader left out: its position in the file and what is wrong with it."""

    index: int
    reason: str


_R = TypeVar("_R")


class LoadedRecords(list[_R]):
    """The records a loader kept, in file order, with ``skipped``: the malformed ones it left out.

    A plain list in every other way (slicing gives a plain list).
    """

    def __init__(self, records: Iterable[_R] = (), skipped: Iterable[SkippedRecord] = (), *, name: str = "") -> None:
        super().__init__(records)
        self.skipped: tuple[SkippedRecord, ...] = tuple(skipped)
        self.name = name

    def report(self, show: int = 5) -> str:
        """One paragraph: how many records were skipped, which, and why (the first ``show`` reasons)."""
        if not self.skipped:
            return f"{self.name}: {len(self):,} records, none skipped"
        total = len(self) + len(self.skipped)
        reasons = "; ".join(s.reason for s in self.skipped[:show])
        more = f"; and {len(self.skipped) - show:,} more" if len(self.skipped) > show else ""
        return (
            f"{self.name}: skipped {len(self.skipped):,} of {total:,} records "
            f"(indices {', '.join(str(s.index) for s in self.skipped[:show])}{', ...' if more else ''}): "
            f"{reasons}{more}."
        )


@dataclass(frozen=True)
class CounterFactRecord:
    """One CounterFact case: an edit (subject, relation, true object -> new object) and its test prompts.

    Attributes:
        case_id: the record's id in its file.
        relation_id: the relation (a Wikidata id such as ``"P103"`` or a memit_lab name such as ``"city_country"``).
        prompt: the relation's template with ``{}`` for the subject.
        subject: the subject, verbatim as it appears in every subject prompt.
        target_new: the counterfactual object to write.
        target_true: the object the fact has now.
        paraphrase_prompts: the same fact, other wording (generalisation, PS).
        neighborhood_prompts: other subjects, same relation, same true object (specificity, NS).
        attribute_prompts: other subjects whose true object is ``target_new``.
        generation_prompts: openings for free text (fluency GE, consistency RS).
        reference_texts: texts about ``target_new`` for RS (empty when the data has none).
        target_new_id, target_true_id: the objects' ids (Wikidata ids, or the name itself).
        p_true: the bundled model's probability of ``target_true`` after the edit prompt, if measured.
        known: whether the bundled model's top-1 next token starts ``target_true``, if measured.
    """

    case_id: int
    relation_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    reference_texts: tuple[str, ...] = ()
    target_new_id: str = ""
    target_true_id: str = ""
    p_true: float | None = None
    known: bool | None = None

    @property
    def edit_prompt(self) -> str:
        """The prompt the edit is made on: the template filled with the subject."""
        return self.prompt.format(self.subject)


@dataclass(frozen=True)
class ZsreRecord:
    """One zsRE case: a question about a subject, the answer to write, a rephrase and an unrelated NQ question.

    Attributes:
        case_id: position in the file.
        subject: the subject, verbatim inside ``src``.
        src: the question the edit is made on.
        target: the answer written (``answers[0]`` as in the paper's code, or ``alt``).
        rephrase: the same question in other words.
        loc: the unrelated Natural Questions prompt (``"nq question: ..."``).
        loc_ans: its answer.
        answers: all answers the record lists.
        alt: the alternative answer the record lists.
    """

    case_id: int
    subject: str
    src: str
    target: str
    rephrase: str
    loc: str
    loc_ans: str
    answers: tuple[str, ...] = ()
    alt: str = ""

    @property
    def prompt(self) -> str:
        """``src`` as a template, ``{}`` in place of the subject (the form edit requests take)."""
        return self.src.replace(self.subject, "{}", 1)

    @property
    def loc_prompt(self) -> str:
        """The unrelated question as the paper's code scores it: ``loc + "?"``."""
        return self.loc + "?"


# --- validation helpers: each names where the problem is and what to write instead ---------------------------


def _where(index: int, raw: Mapping[str, Any]) -> str:
    case = raw.get("case_id") if isinstance(raw, Mapping) else None
    return f"record {index}" + (f" (case_id {case})" if case is not None else "")


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetFormatError(f"{where}: {field} must be a non-empty string, got {value!r}")
    return value


def _texts(value: Any, field: str, where: str, *, at_least: int = 0) -> tuple[str, ...]:
    if value is None and at_least == 0:
        return ()
    if not isinstance(value, list) or len(value) < at_least:
        raise DatasetFormatError(
            f"{where}: {field} must be a list of at least {at_least} strings, got {type(value).__name__} {value!r:.80}"
        )
    return tuple(_text(v, f"{field}[{i}]", where) for i, v in enumerate(value))


def _mapping(value: Any, field: str, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DatasetFormatError(f"{where}: {field} must be an object (a JSON dict), got {value!r:.80}")
    return value


def _template(prompt: str, where: str) -> str:
    if prompt.count("{}") != 1:
        raise DatasetFormatError(
            f"{where}: requested_rewrite.prompt must contain '{{}}' once (the subject's place), got {prompt!r}"
        )
    return prompt


def _snippet_key(relation_id: str, target_id: str) -> tuple[str, str]:
    return (relation_id, target_id)


def counterfact_record(
    raw: Mapping[str, Any], index: int = 0, snippets: Mapping[tuple[str, str], tuple[str, ...]] | None = None
) -> CounterFactRecord:
    """Check one CounterFact-format dict and turn it into a :class:`CounterFactRecord`.

    Example:
        >>> raw = {"case_id": 7, "requested_rewrite": {"prompt": "{} is a city in the country of",
        ...        "subject": "Lyon", "relation_id": "city_country",
        ...        "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
        ...        "paraphrase_prompts": ["Lyon is in"], "neighborhood_prompts": ["Nice is in"]}
        >>> counterfact_record(raw).edit_prompt
        'Lyon is a city in the country of'
        >>> counterfact_record({"case_id": 8, "requested_rewrite": {}})
        Traceback (most recent call last):
        ...
        memit_lab.datasets.DatasetFormatError: record 0 (case_id 8): requested_rewrite.prompt must be a non-empty ...
    """
    where = _where(index, raw) if isinstance(raw, Mapping) else f"record {index}"
    raw = _mapping(raw, "the record", where)
    rewrite = _mapping(raw.get("requested_rewrite"), "requested_rewrite", where)
    prompt = _template(_text(rewrite.get("prompt"), "requested_rewrite.prompt", where), where)
    subject = _text(rewrite.get("subject"), "requested_rewrite.subject", where)
    new = _mapping(rewrite.get("target_new"), "requested_rewrite.target_new", where)
    true = _mapping(rewrite.get("target_true"), "requested_rewrite.target_true", where)
    target_new = _text(new.get("str"), "requested_rewrite.target_new.str", where)
    target_true = _text(true.get("str"), "requested_rewrite.target_true.str", where)
    if target_new.strip() == target_true.strip():
        raise DatasetFormatError(
            f"{where}: target_new and target_true are both {target_new!r}; an edit must change the object"
        )
    case_id = raw.get("case_id", index)
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise DatasetFormatError(f"{where}: case_id must be an integer, got {case_id!r}")
    relation_id = str(rewrite.get("relation_id", ""))
    new_id = str(new.get("id", target_new))
    p_true = raw.get("p_true")
    known = raw.get("known")
    if p_true is not None and not isinstance(p_true, int | float):
        raise DatasetFormatError(f"{where}: p_true must be a number, got {p_true!r}")
    if known is not None and not isinstance(known, bool):
        raise DatasetFormatError(f"{where}: known must be true or false, got {known!r}")
    return CounterFactRecord(
        case_id=case_id,
        relation_id=relation_id,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=_texts(raw.get("paraphrase_prompts"), "paraphrase_prompts", where, at_least=1),
        neighborhood_prompts=_texts(raw.get("neighborhood_prompts"), "neighborhood_prompts", where, at_least=1),
        attribute_prompts=_texts(raw.get("attribute_prompts"), "attribute_prompts", where),
        generation_prompts=_texts(raw.get("generation_prompts"), "generation_prompts", where),
        reference_texts=(snippets or {}).get(_snippet_key(relation_id, new_id), ()),
        target_new_id=new_id,
        target_true_id=str(true.get("id", target_true)),
        p_true=None if p_true is None else float(p_true),
        known=known,
    )


def zsre_record(raw: Mapping[str, Any], index: int = 0, target: Literal["answers", "alt"] = "answers") -> ZsreRecord:
    """Check one zsRE dict and turn it into a :class:`ZsreRecord` (edit target ``answers[0]`` or ``alt``).

    Example:
        >>> raw = {"subject": "Lyon", "src": "Which country is Lyon in?", "alt": "Italy", "answers": ["France"],
        ...        "rephrase": "Lyon is in which country?", "loc": "nq question: who wrote hamlet",
        ...        "loc_ans": "William Shakespeare"}
        >>> r = zsre_record(raw)
        >>> r.prompt, r.target, zsre_record(raw, target="alt").target
        ('Which country is {} in?', 'France', 'Italy')
    """
    if target not in ("answers", "alt"):
        raise ValueError(f"target must be 'answers' (the paper's code) or 'alt', got {target!r}")
    where = f"record {index}"
    raw = _mapping(raw, "the record", where)
    subject = _text(raw.get("subject"), "subject", where)
    src = _text(raw.get("src"), "src", where)
    if subject not in src:
        raise DatasetFormatError(f"{where}: subject {subject!r} does not occur in src {src!r}; fix one of them")
    answers = _texts(raw.get("answers"), "answers", where, at_least=1)
    alt_raw = raw.get("alt")
    unused = target == "answers" and (alt_raw is None or (isinstance(alt_raw, str) and not alt_raw.strip()))
    alt = "" if unused else _text(alt_raw, "alt", where)  # an empty alt only matters where it is the target
    return ZsreRecord(
        case_id=index,
        subject=subject,
        src=src,
        target=answers[0] if target == "answers" else alt,
        rephrase=_text(raw.get("rephrase"), "rephrase", where),
        loc=_text(raw.get("loc"), "loc", where),
        loc_ans=_text(raw.get("loc_ans"), "loc_ans", where),
        answers=answers,
        alt=alt,
    )


# --- files ------------------------------------------------------------------------------------------------------


def _read_list(path: str | os.PathLike[str], what: str) -> list[Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} not found; pass the path of the JSON file you downloaded")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetFormatError(f"{path.name} is not valid JSON ({err}); {what} files are one JSON list") from err
    if not isinstance(data, list):
        raise DatasetFormatError(
            f"{path.name} holds a JSON {type(data).__name__}; {what} files are one JSON list of records"
        )
    return data


def _check_n(n: int | None) -> None:
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None (all records), got {n}")


def _collect(
    raws: list[Any],
    parse: Callable[[Any, int], _R],
    *,
    name: str,
    n: int | None,
    strict: bool,
    key: Callable[[_R], object] | None = None,
) -> LoadedRecords[_R]:
    """Parse records in order until ``n`` are kept; a bad one is raised (``strict``) or skipped and reported.

    ``key``: records with the same key are duplicates; the first is kept, a later one is bad.
    """
    _check_n(n)
    kept: list[_R] = []
    skipped: list[SkippedRecord] = []
    seen: set[object] = set()
    for index, raw in enumerate(raws):
        if n is not None and len(kept) >= n:
            break
        try:
            record = parse(raw, index)
            case = key(record) if key is not None else None
            if case is not None and case in seen:
                raise DatasetFormatError(
                    f"record {index}: case_id {case} occurs twice in {name}; case ids must be unique"
                )
        except DatasetFormatError as err:
            if strict:
                raise
            skipped.append(SkippedRecord(index, str(err)))
            continue
        if case is not None:
            seen.add(case)
        kept.append(record)
    records = LoadedRecords(kept, skipped, name=name)
    if skipped and not kept:
        raise DatasetFormatError(f"none of the {len(skipped):,} records read is usable. " + records.report())
    if skipped:
        advice = " Fix them, or pass strict=True (CLI: --strict) to refuse such a file."
        warnings.warn(records.report() + advice, stacklevel=4)  # points at the caller of load_*
    return records


def load_snippets(path: str | os.PathLike[str]) -> dict[tuple[str, str], tuple[str, ...]]:
    """Reference texts per (relation_id, target_id), from the reference's ``attribute_snippets.json`` format."""
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for index, raw in enumerate(_read_list(path, "attribute snippets")):
        where = f"snippet entry {index}"
        entry = _mapping(raw, "the entry", where)
        samples = entry.get("samples")
        if not isinstance(samples, list):
            raise DatasetFormatError(f"{where}: samples must be a list of {{'text': ...}} objects, got {samples!r:.80}")
        texts = tuple(
            _text(_mapping(s, f"samples[{i}]", where).get("text"), f"samples[{i}].text", where)
            for i, s in enumerate(samples)
        )
        key = _snippet_key(str(entry.get("relation_id", "")), str(entry.get("target_id", "")))
        out[key] = out.get(key, ()) + texts
    return out


def load_counterfact(
    path: str | os.PathLike[str],
    *,
    snippets: str | os.PathLike[str] | None = None,
    n: int | None = None,
    strict: bool = False,
) -> LoadedRecords[CounterFactRecord]:
    """Read a CounterFact or MultiCounterFact JSON file: its first ``n`` usable records, or all.

    ``snippets``: optional path of the reference's ``attribute_snippets.json`` (reference
    texts for RS, matched by relation id and ``target_new`` id). A malformed record, or a
    ``case_id`` seen before, is skipped and listed in ``.skipped`` (with a warning), or with
    ``strict=True`` refused.

    Example:
        >>> import json, tempfile, warnings
        >>> good = {"case_id": 1, "requested_rewrite": {"prompt": "{} is in", "subject": "Lyon",
        ...         "target_new": {"str": "Italy"}, "target_true": {"str": "France"}},
        ...         "paraphrase_prompts": ["Lyon lies in"], "neighborhood_prompts": ["Nice is in"]}
        >>> path = Path(tempfile.mkdtemp()) / "counterfact.json"
        >>> _ = path.write_text(json.dumps([good, {"case_id": 2}]))
        >>> with warnings.catch_warnings(record=True):
        ...     records = load_counterfact(path)
        >>> [r.case_id for r in records], records.skipped[0].index
        ([1], 1)
    """
    return _counterfact_records(_read_list(path, "CounterFact"), Path(path).name, snippets, n, strict)


def _counterfact_records(
    raws: list[Any], name: str, snippets: str | os.PathLike[str] | None, n: int | None, strict: bool
) -> LoadedRecords[CounterFactRecord]:
    table = load_snippets(snippets) if snippets is not None else None
    return _collect(
        raws, lambda raw, i: counterfact_record(raw, i, table), name=name, n=n, strict=strict, key=lambda r: r.case_id
    )


def load_zsre(
    path: str | os.PathLike[str],
    *,
    target: Literal["answers", "alt"] = "answers",
    n: int | None = None,
    strict: bool = False,
) -> LoadedRecords[ZsreRecord]:
    """Read a zsRE JSON file (MEND's ``zsre_mem_eval.json`` format): its first ``n`` usable records, or all.

    A malformed record is skipped and listed in ``.skipped`` (with a warning), or with
    ``strict=True`` refused.
    """
    return _zsre_records(_read_list(path, "zsRE"), Path(path).name, target, n, strict)


def _zsre_records(
    raws: list[Any], name: str, target: Literal["answers", "alt"], n: int | None, strict: bool
) -> LoadedRecords[ZsreRecord]:
    return _collect(raws, lambda raw, i: zsre_record(raw, i, target), name=name, n=n, strict=strict)


def load_records(
    path: str | os.PathLike[str],
    *,
    n: int | None = None,
    snippets: str | os.PathLike[str] | None = None,
    strict: bool = False,
) -> LoadedRecords[CounterFactRecord] | LoadedRecords[ZsreRecord]:
    """Read a CounterFact or a zsRE file, telling them apart by their first record's fields."""
    raws = _read_list(path, "dataset")  # read once: a 20,000-record file is parsed a single time
    first = next(iter(raws), None)
    if isinstance(first, Mapping) and "requested_rewrite" in first:
        return _counterfact_records(raws, Path(path).name, snippets, n, strict)
    if isinstance(first, Mapping) and "src" in first:
        return _zsre_records(raws, Path(path).name, "answers", n, strict)
    raise DatasetFormatError(
        f"{Path(path).name}: the first record has neither 'requested_rewrite' (CounterFact) nor 'src' (zsRE); "
        "pass a CounterFact / MultiCounterFact or zsRE JSON file"
    )


def load_factset(
    *,
    known: bool | None = None,
    relations: Iterable[str] | None = None,
    n: int | None = None,
    where: Callable[[CounterFactRecord], bool] | None = None,
) -> list[CounterFactRecord]:
    """memit_lab's CounterFact-format fact set for the bundled model (see ``memit_lab/data/README.md``).

    ``known=True`` keeps the facts the bundled model gets right (top-1), ``known=False`` the
    others; ``relations`` keeps those relation ids; ``where`` any other filter; ``n`` then
    keeps the first ``n`` (records are stored in a seeded random order, so any prefix mixes
    relations).
    """
    data = resources.files("memit_lab") / "data"
    with resources.as_file(data / FACTSET_FILE) as facts, resources.as_file(data / SNIPPETS_FILE) as snips:
        records = load_counterfact(facts, snippets=snips, strict=True)  # the bundled file has no bad record
    wanted = None if relations is None else set(relations)
    if wanted is not None and (missing := wanted - {r.relation_id for r in records}):
        raise KeyError(
            f"no relation {sorted(missing)} in the fact set; choose from {sorted({r.relation_id for r in records})}"
        )
    kept = [
        r
        for r in records
        if (known is None or r.known == known)
        and (wanted is None or r.relation_id in wanted)
        and (where is None or where(r))
    ]
    _check_n(n)
    return kept if n is None else kept[:n]
