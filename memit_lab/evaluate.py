"""How the paper scores an edit: CounterFact's ES/EM, PS/PM, NS/NM, GE, RS and S, and zsRE's token accuracy.

Every probability here is the reference's: a target is scored as ``prompt + " " + target``,
teacher-forced, and summarised by its **mean per-token negative log-likelihood** (NLL);
``P = exp(-NLL)`` is then a per-token geometric-mean probability, so targets of different
lengths compare fairly (:func:`memit_lab.prompts.target_scores` does the forward passes).

CounterFact (paper section 5.2, Table 2; per case, then averaged over cases, in %):

* **ES** efficacy score: share of edit prompts where NLL(new) < NLL(true), i.e. the edited
  model prefers the new object. **EM** efficacy magnitude: mean of P(new) - P(true).
* **PS / PM**: the same over the case's paraphrase prompts, averaged within the case first.
* **NS** neighbourhood score: share of neighbourhood prompts (other subjects, same
  relation, same true object) where NLL(true) < NLL(new) -- they keep their answer.
  **NM**: mean of P(true) - P(new) on them.
* **S**: the harmonic mean of ES, PS and NS.
* **GE** generation entropy (fluency): for each generated text (the generation prompt
  followed by ~100 sampled tokens, top-k 5), the entropies H2 and H3 (base 2) of its
  word bigram and trigram frequency distributions; GE = mean(2/3 H2, 4/3 H3), averaged
  over the case's texts. A model that repeats itself has low GE.
* **RS** reference score (consistency): TF-IDF cosine between the case's generated texts
  (joined) and reference texts about the new object (joined), when the data has them.

zsRE (paper section 5.1, Table 1; in %): efficacy, paraphrase and specificity are
teacher-forced **top-1 token accuracy**: for the question (resp. its rephrase, resp. the
unrelated NQ question ``loc + "?"``), the share of the answer's tokens that are the
model's argmax given the prompt and the answer's earlier tokens.

Two deliberate differences from the reference, both documented where they act: words are
split by a regular expression instead of NLTK's Treebank tokenizer (``"don't"`` gives
``don ' t`` here, ``do n't`` there; rarely matters for entropies of ~100 words), and the
IDF of RS is fitted on the data's own reference texts unless you pass the reference's
Wikipedia IDF (:func:`load_reference_tfidf`).

Example:
    >>> round(harmonic_mean([1.0, 0.5, 0.5]), 4)
    0.6
    >>> round(generation_entropy("a b a b a"), 4)  # 4 bigrams of 2 kinds, 3 trigrams of 2 kinds
    0.9455
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .datasets import CounterFactRecord, ZsreRecord
from .models import LoadedModel
from .prompts import check_prompt, check_target_pairs, continuation, padded_batch, padding_side, target_positions
from .replay import unembed

__all__ = [
    "COUNTERFACT_COLUMNS",
    "TfIdf",
    "counterfact_scores",
    "counterfact_summary",
    "generation_entropy",
    "generation_scores",
    "harmonic_mean",
    "load_reference_tfidf",
    "magnitude",
    "mean_nll",
    "ngram_entropy",
    "paired_nll",
    "prefers",
    "sample_texts",
    "summary_table",
    "token_hits",
    "word_tokens",
    "zsre_scores",
    "zsre_summary",
]

#: Table-2 columns, in the paper's order.
COUNTERFACT_COLUMNS = ("S", "ES", "PS", "NS", "EM", "PM", "NM", "GE", "RS")


# --- the metrics on numbers (no model) ---------------------------------------------------------------------------


def prefers(nll_a: np.ndarray, nll_b: np.ndarray) -> float:
    """Share of prompts where target a is more likely than target b: mean of NLL(a) < NLL(b).

    ES and PS are ``prefers(nll_new, nll_true)``; NS is ``prefers(nll_true, nll_new)``.

    Example:
        >>> prefers(np.array([0.1, 2.0, 0.5]), np.array([1.0, 1.0, 1.0]))
        0.6666666666666666
    """
    return float(np.mean(np.asarray(nll_a) < np.asarray(nll_b)))


def magnitude(nll_a: np.ndarray, nll_b: np.ndarray) -> float:
    """Mean of P(a) - P(b) with P = exp(-mean NLL): EM and PM with a = new, NM with a = true.

    Example:
        >>> round(magnitude(np.log([2.0, 4.0]), np.log([4.0, 4.0])), 4)  # P(a) = 1/2, 1/4; P(b) = 1/4, 1/4
        0.125
    """
    return float(np.mean(np.exp(-np.asarray(nll_a)) - np.exp(-np.asarray(nll_b))))


def harmonic_mean(values: Iterable[float | int]) -> float:
    """Harmonic mean; 0 when any value is 0 (the paper's S of ES, PS, NS).

    Example:
        >>> harmonic_mean([0.9, 0.9, 0.0])
        0.0
    """
    vals = [float(v) for v in values]
    if not vals or any(v < 0 or math.isnan(v) for v in vals):
        raise ValueError(f"harmonic mean needs non-negative numbers, got {vals}")
    return 0.0 if min(vals) == 0 else len(vals) / sum(1 / v for v in vals)


_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and punctuation marks, each its own token (stands in for NLTK's ``word_tokenize``).

    Example:
        >>> word_tokens("Paris, the capital.")
        ['Paris', ',', 'the', 'capital', '.']
    """
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy (bits) of the frequency distribution of a text's n-grams; 0 when it has none.

    Example:
        >>> ngram_entropy(["a", "b", "a", "b"], 2)  # bigrams ab, ba, ab: p = 2/3, 1/3
        0.9182958340544896
    """
    counts = np.array(list(Counter(zip(*(tokens[i:] for i in range(n)), strict=False)).values()), dtype=np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def generation_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """The paper's fluency of one text: mean over n of ``weight_n * H_n`` (bi- and trigram entropies, bits)."""
    tokens = word_tokens(text)
    return float(np.mean([w * ngram_entropy(tokens, n) for n, w in zip(ns, weights, strict=True)]))


# Written by hand on purpose, not scikit-learn's TfidfVectorizer (measured against it, scikit-learn 1.9.1):
# its defaults are these settings -- the same vocabulary and bit-identical IDF -- but the reference's recipe
# (its l2-normalised vectors, then a cosine) moves RS in the last bits on most texts and gives NaN, not 0, for a
# text without a known word; only ``norm=None`` with the cosine below reproduces today's numbers, and that leaves
# scikit-learn ~15 lines of counting for ~200 MB of new dependencies (scipy, narwhals, joblib, threadpoolctl).
_TFIDF_WORD = re.compile(r"(?u)\b\w\w+\b")


@dataclass(frozen=True)
class TfIdf:
    """A TF-IDF vectoriser: lower-cased words of 2+ characters, raw counts times IDF (scikit-learn's defaults).

    Attributes:
        vocab: word -> column.
        idf: ``[n_words]`` inverse document frequencies, ``ln((1 + n_docs) / (1 + df)) + 1``.

    Example:
        >>> tfidf = TfIdf.fit(["Paris is in France", "Rome is in Italy"])
        >>> round(tfidf.similarity("Paris France", "France and Paris"), 4), tfidf.similarity("Paris", "Rome")
        (1.0, 0.0)
    """

    vocab: Mapping[str, int]
    idf: np.ndarray

    @staticmethod
    def words(text: str) -> list[str]:
        return _TFIDF_WORD.findall(text.lower())

    @classmethod
    def fit(cls, documents: Iterable[str]) -> TfIdf:
        """Fit the IDF on a collection of documents."""
        doc_sets = [set(cls.words(d)) for d in documents]
        if not doc_sets:
            raise ValueError("TF-IDF needs at least one document to fit")
        df = Counter(w for words in doc_sets for w in words)
        vocab = {w: i for i, w in enumerate(sorted(df))}
        # math.log, not np.log: numpy picks a SIMD log by CPU, and RS must not move in its last bit between machines.
        idf = np.array([math.log((1 + len(doc_sets)) / (1 + df[w])) + 1 for w in vocab], dtype=np.float64)
        return cls(vocab, idf)

    def vector(self, text: str) -> np.ndarray:
        """``[n_words]`` TF-IDF vector of one text (words outside the vocabulary are ignored)."""
        out = np.zeros(len(self.vocab))
        for word, count in Counter(self.words(text)).items():
            if (column := self.vocab.get(word)) is not None:
                out[column] = count * self.idf[column]
        return out

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two texts' vectors; 0 when either has no word in the vocabulary."""
        a, b = self.vector(text_a), self.vector(text_b)
        # Exactly rounded sums (math.fsum) rather than BLAS, whose summation order depends on the CPU.
        norms = math.sqrt(math.fsum(a * a) * math.fsum(b * b))
        return 0.0 if norms == 0 else math.fsum(a * b) / norms


def load_reference_tfidf(idf_path: str | Path, vocab_path: str | Path) -> TfIdf:
    """The reference's Wikipedia IDF (``idf.npy`` and ``tfidf_vocab.json`` from the paper's data)."""
    vocab = json.loads(Path(vocab_path).read_text())
    idf = np.load(idf_path)
    if len(vocab) != len(idf):
        raise ValueError(
            f"{vocab_path} has {len(vocab)} words but {idf_path} {len(idf)} IDF values; pass a matching pair"
        )
    return TfIdf(vocab, idf)


# --- the model's side: scoring prompts ---------------------------------------------------------------------------


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding, same results in the original order)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[lo : lo + batch_size] for lo in range(0, len(order), batch_size)]


def _tokenized(lm: LoadedModel, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Ids of ``prompt + " " + target`` and the positions of the target's tokens (found by character offsets)."""
    enc = lm.tokenizer(continuation(prompt, target), return_offsets_mapping=True)
    return list(enc["input_ids"]), target_positions(enc["offset_mapping"], prompt)


Query = list[tuple[int, int]]


@torch.no_grad()
def _query(
    lm: LoadedModel,
    sequences: Sequence[list[int]],
    queries: Sequence[Query],
    *,
    batch_size: int,
    progress: bool,
    desc: str,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence, for each queried ``(position, token)``: log P(token | ids up to position) and "is it the argmax?".

    Batched by length, right padding. The unembedding runs only at the queried positions: over a
    49k-token vocabulary it is a fifth of the forward pass per position, and a prompt queries one to
    three of its dozen positions.
    """
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0), np.zeros(0, dtype=bool))] * len(sequences)
    for batch in tqdm(_batches([len(s) for s in sequences], batch_size), desc=desc, disable=not progress, leave=False):
        ids, mask = padded_batch(lm.tokenizer, [sequences[i] for i in batch], lm.device)
        # The base model's last hidden state is the final norm's output; one unembedding for the whole batch.
        normed = lm.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        rows = [row for row, i in enumerate(batch) for _ in queries[i]]
        flat = [q for i in batch for q in queries[i]]
        pos, tok = (torch.tensor(x, device=normed.device) for x in zip(*flat, strict=True))
        logp = unembed(lm, normed[torch.tensor(rows, device=normed.device), pos]).log_softmax(-1)
        picked = logp.gather(-1, tok[:, None])[:, 0].double().cpu().numpy()
        hits = (logp.argmax(-1) == tok).cpu().numpy()
        lo = 0
        for i in batch:
            out[i] = (picked[lo : lo + len(queries[i])], hits[lo : lo + len(queries[i])])
            lo += len(queries[i])
    return out


def _teacher_forced(ids: list[int], positions: list[int]) -> Query:
    # The logit that predicts token j sits at position j - 1.
    return [(j - 1, ids[j]) for j in positions]


def mean_nll(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "scoring",
) -> np.ndarray:
    """``[n]`` mean per-token NLL of each target after its prompt (the reference's probability).

    The same numbers as :func:`memit_lab.prompts.target_scores`' ``-mean_logprob``, batched by length.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> nll = mean_nll(lm, ["The capital of France is"] * 2, ["Paris", "Rome"])
        >>> nll.shape, bool((nll > 0).all())
        ((2,), True)
    """
    check_target_pairs(prompts, targets)
    tokenized = [_tokenized(lm, p, t) for p, t in zip(prompts, targets, strict=True)]
    queries = [_teacher_forced(ids, pos) for ids, pos in tokenized]
    scored = _query(lm, [ids for ids, _ in tokenized], queries, batch_size=batch_size, progress=progress, desc=desc)
    return np.array([-logp.mean() for logp, _ in scored])


def paired_nll(
    lm: LoadedModel,
    prompts: Sequence[str],
    targets_a: Sequence[str],
    targets_b: Sequence[str],
    *,
    batch_size: int = 32,
    progress: bool = False,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mean_nll` of two targets per prompt (new and true), sharing forward passes where it can.

    When one of the two targets is a single token, the sequence ending in the other one
    already holds its probability (at the last prompt position), so one forward pass
    serves both -- most CounterFact pairs need one sequence instead of two.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> a, b = paired_nll(lm, ["The capital of France is"], ["Rome"], ["Paris"])
        >>> bool(np.allclose(a, mean_nll(lm, ["The capital of France is"], ["Rome"]), atol=1e-5))
        True
    """
    check_target_pairs(prompts, targets_a)
    check_target_pairs(prompts, targets_b)
    sequences: list[list[int]] = []
    queries: list[Query] = []
    # Per pair and target: (sequence index, first query, number of queries).
    where: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []
    for prompt, a, b in zip(prompts, targets_a, targets_b, strict=True):
        (ids_a, pos_a), (ids_b, pos_b) = _tokenized(lm, prompt, a), _tokenized(lm, prompt, b)
        shared = ids_a[: pos_a[0]] == ids_b[: pos_b[0]]
        if shared and (len(pos_a) == 1 or len(pos_b) == 1):
            # Run the longer target's sequence; the one-token target is scored at its first position.
            swap = len(pos_a) == 1 and len(pos_b) > 1
            ids, pos, other = (ids_b, pos_b, ids_a[pos_a[0]]) if swap else (ids_a, pos_a, ids_b[pos_b[0]])
            sequences.append(ids)
            queries.append([*_teacher_forced(ids, pos), (pos[0] - 1, other)])
            mine, theirs = (len(sequences) - 1, 0, len(pos)), (len(sequences) - 1, len(pos), 1)
            where.append((theirs, mine) if swap else (mine, theirs))
        else:
            sequences += [ids_a, ids_b]
            queries += [_teacher_forced(ids_a, pos_a), _teacher_forced(ids_b, pos_b)]
            where.append(((len(sequences) - 2, 0, len(pos_a)), (len(sequences) - 1, 0, len(pos_b))))
    scored = _query(lm, sequences, queries, batch_size=batch_size, progress=progress, desc=desc)

    def nll(seq: int, first: int, count: int) -> float:
        return float(-scored[seq][0][first : first + count].mean())

    return np.array([nll(*wa) for wa, _ in where]), np.array([nll(*wb) for _, wb in where])


def token_hits(
    lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32, progress: bool = False
) -> list[np.ndarray]:
    """Per pair, ``[n_target_tokens]``: is each target token the model's argmax given the prompt and the earlier ones?

    Teacher forcing on ``prompt + " " + target``, as zsRE's metrics are computed.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> hits = token_hits(lm, ["The capital of France is"], ["Paris"])
        >>> hits[0].dtype, len(hits[0]) >= 1
        (dtype('bool'), True)
    """
    check_target_pairs(prompts, targets)
    tokenized = [_tokenized(lm, p, t) for p, t in zip(prompts, targets, strict=True)]
    queries = [_teacher_forced(ids, pos) for ids, pos in tokenized]
    scored = _query(
        lm, [ids for ids, _ in tokenized], queries, batch_size=batch_size, progress=progress, desc="token accuracy"
    )
    return [hits for _, hits in scored]


@torch.no_grad()
def sample_texts(
    lm: LoadedModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Prompt + sampled continuation (top-k), as the paper's fluency and consistency tests generate text.

    Seeded without touching the caller's random state, so the same call gives the same texts.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> a = sample_texts(lm, ["Paris is"], max_new_tokens=5)
        >>> a == sample_texts(lm, ["Paris is"], max_new_tokens=5) and a[0].startswith("Paris is")
        True
    """
    for p in prompts:
        check_prompt(p)
    texts: list[str] = []
    devices = [lm.device] if lm.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=lm.device.type), padding_side(lm.tokenizer, "left"):
        torch.manual_seed(seed)
        for lo in tqdm(range(0, len(prompts), batch_size), desc="generating", disable=not progress, leave=False):
            chunk = list(prompts[lo : lo + batch_size])
            enc = lm.tokenizer(chunk, return_tensors="pt", padding=True).to(lm.device)
            out = lm.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
            new = lm.tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
            texts += [p + t for p, t in zip(chunk, new, strict=True)]
    return texts


# --- CounterFact -----------------------------------------------------------------------------------------------


def counterfact_scores(
    lm: LoadedModel, records: Sequence[CounterFactRecord], *, batch_size: int = 32, progress: bool = True
) -> pd.DataFrame:
    """Per case: ES, EM, PS, PM, NS, NM (fractions in [0, 1] and probability gaps), one forward pass per prompt.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> rec = CounterFactRecord(0, "capital", "The capital of {} is", "France", "Rome", "Paris",
        ...                         ("France's capital is",), ("Paris is the capital of",))
        >>> list(counterfact_scores(lm, [rec], progress=False).columns)
        ['case_id', 'relation_id', 'subject', 'target_true', 'target_new', 'es', 'em', 'ps', 'pm', 'ns', 'nm']
    """
    kinds = ("edit", "paraphrase", "neighborhood")
    rows: list[tuple[int, str]] = []
    prompts: list[str] = []
    for i, r in enumerate(records):
        for kind, texts in zip(kinds, ((r.edit_prompt,), r.paraphrase_prompts, r.neighborhood_prompts), strict=True):
            rows += [(i, kind)] * len(texts)
            prompts += texts
    new, true = paired_nll(
        lm,
        prompts,
        [records[i].target_new for i, _ in rows],
        [records[i].target_true for i, _ in rows],
        batch_size=batch_size,
        progress=progress,
        desc="CounterFact",
    )
    pairs = pd.DataFrame(rows, columns=["record", "kind"]).assign(new=new, true=true)
    groups = dict(list(pairs.groupby(["record", "kind"])))
    out = []
    for i, r in enumerate(records):
        e, p, n = ({c: groups[(i, k)][c].to_numpy() for c in ("new", "true")} for k in kinds)
        out.append(
            {
                "case_id": r.case_id,
                "relation_id": r.relation_id,
                "subject": r.subject,
                "target_true": r.target_true,
                "target_new": r.target_new,
                "es": prefers(e["new"], e["true"]),
                "em": magnitude(e["new"], e["true"]),
                "ps": prefers(p["new"], p["true"]),
                "pm": magnitude(p["new"], p["true"]),
                "ns": prefers(n["true"], n["new"]),
                "nm": magnitude(n["true"], n["new"]),
            }
        )
    return pd.DataFrame(out)


def generation_scores(
    lm: LoadedModel,
    records: Sequence[CounterFactRecord],
    *,
    tfidf: TfIdf | None = None,
    max_new_tokens: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> pd.DataFrame:
    """Per case: GE (fluency of its generation prompts' texts) and RS (TF-IDF cosine to its reference texts).

    ``tfidf`` defaults to one fitted on all the records' reference texts; RS is NaN for a
    case without reference texts.
    """
    if any(not r.generation_prompts for r in records):
        raise ValueError("every record needs generation_prompts for GE/RS; leave generation off for these records")
    if tfidf is None:
        documents = {t for r in records for t in r.reference_texts}
        tfidf = TfIdf.fit(documents) if documents else None
    prompts = [p for r in records for p in r.generation_prompts]
    texts = iter(
        sample_texts(
            lm, prompts, max_new_tokens=max_new_tokens, top_k=top_k, seed=seed, batch_size=batch_size, progress=progress
        )
    )
    out = []
    for r in records:
        generated = [next(texts) for _ in r.generation_prompts]
        rs = (
            tfidf.similarity(" ".join(generated), " ".join(r.reference_texts))
            if tfidf is not None and r.reference_texts
            else float("nan")
        )
        out.append({"case_id": r.case_id, "ge": float(np.mean([generation_entropy(t) for t in generated])), "rs": rs})
    return pd.DataFrame(out)


def counterfact_summary(frame: pd.DataFrame) -> pd.Series:
    """Table-2 row from per-case scores: S, ES, PS, NS, EM, PM, NM (and GE, RS when present), all x 100 as the paper.

    Example:
        >>> frame = pd.DataFrame({"es": [1.0, 1.0], "ps": [1.0, 0.5], "ns": [0.5, 0.5],
        ...                       "em": [0.2, 0.4], "pm": [0.1, 0.1], "nm": [0.0, 0.2]})
        >>> counterfact_summary(frame).round(2).to_dict()
        {'S': 69.23, 'ES': 100.0, 'PS': 75.0, 'NS': 50.0, 'EM': 30.0, 'PM': 10.0, 'NM': 10.0}
    """
    missing = {"es", "ps", "ns", "em", "pm", "nm"} - set(frame.columns)
    if missing:
        raise ValueError(f"per-case frame lacks columns {sorted(missing)}; pass counterfact_scores' output")
    means = {
        c.upper(): 100 * float(frame[c].mean())
        for c in frame.columns
        if c in {"es", "ps", "ns", "em", "pm", "nm", "ge", "rs"}
    }
    means["S"] = harmonic_mean([means["ES"], means["PS"], means["NS"]])
    return pd.Series({c: means[c] for c in COUNTERFACT_COLUMNS if c in means})


def summary_table(frames: Mapping[str, pd.DataFrame], *, digits: int = 1) -> pd.DataFrame:
    """Table 2: one row per method (``{"GPT-2 XL": frame, "MEMIT": frame, ...}``), columns S, ES, PS, NS, ..."""
    table = pd.DataFrame({name: counterfact_summary(f) for name, f in frames.items()}).T
    return table.round(digits)


# --- zsRE --------------------------------------------------------------------------------------------------------


def zsre_scores(
    lm: LoadedModel, records: Sequence[ZsreRecord], *, batch_size: int = 32, progress: bool = True
) -> pd.DataFrame:
    """Per case: efficacy, paraphrase and specificity as teacher-forced top-1 token accuracy (fractions).

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> rec = ZsreRecord(0, "Lyon", "Which country is Lyon in?", "France", "Lyon is in which country?",
        ...                  "nq question: who wrote hamlet", "William Shakespeare")
        >>> list(zsre_scores(lm, [rec], progress=False).columns)
        ['case_id', 'subject', 'target', 'efficacy', 'paraphrase', 'specificity']
    """
    prompts = [p for r in records for p in (r.src, r.rephrase, r.loc_prompt)]
    targets = [t for r in records for t in (r.target, r.target, r.loc_ans)]
    hits = token_hits(lm, prompts, targets, batch_size=batch_size, progress=progress)
    rows = []
    for i, r in enumerate(records):
        src, rephrase, loc = (float(h.mean()) for h in hits[3 * i : 3 * i + 3])
        rows.append(
            {
                "case_id": r.case_id,
                "subject": r.subject,
                "target": r.target,
                "efficacy": src,
                "paraphrase": rephrase,
                "specificity": loc,
            }
        )
    return pd.DataFrame(rows)


def zsre_summary(frame: pd.DataFrame) -> pd.Series:
    """Table-1 row: mean efficacy, paraphrase and specificity over cases, x 100."""
    return 100 * frame[["efficacy", "paraphrase", "specificity"]].mean().rename(str.capitalize)
