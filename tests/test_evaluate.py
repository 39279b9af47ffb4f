"""The paper's metrics on hand-worked examples, and the model-facing scorers against direct computations."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from memit_lab import LoadedModel, load_model
from memit_lab.datasets import CounterFactRecord, ZsreRecord
from memit_lab.evaluate import (
    TfIdf,
    counterfact_scores,
    counterfact_summary,
    generation_entropy,
    generation_scores,
    harmonic_mean,
    magnitude,
    mean_nll,
    ngram_entropy,
    paired_nll,
    prefers,
    sample_texts,
    summary_table,
    token_hits,
    word_tokens,
    zsre_scores,
    zsre_summary,
)
from memit_lab.prompts import generate, target_scores

# --- numbers only ------------------------------------------------------------------------------------------------


def test_prefers_and_magnitude_by_hand() -> None:
    new, true = np.log([2.0, 4.0, 8.0]), np.log([4.0, 4.0, 2.0])  # P(new) = 1/2, 1/4, 1/8; P(true) = 1/4, 1/4, 1/2
    assert prefers(new, true) == pytest.approx(1 / 3)  # only the first prompt strictly prefers new (ties do not count)
    assert prefers(true, new) == pytest.approx(1 / 3)
    assert magnitude(new, true) == pytest.approx(((1 / 2 - 1 / 4) + 0 + (1 / 8 - 1 / 2)) / 3)


def test_harmonic_mean_is_the_score_s() -> None:
    assert harmonic_mean([100, 75, 50]) == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / 50))
    assert harmonic_mean([0.9, 0.9, 0.9]) == pytest.approx(0.9)
    assert harmonic_mean([1.0, 0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        harmonic_mean([1.0, float("nan")])


def test_ngram_entropy_on_known_counts() -> None:
    tokens = ["a", "b", "c", "a", "b", "c"]  # bigrams ab x2, bc x2, ca x1
    p = np.array([2, 2, 1]) / 5
    assert ngram_entropy(tokens, 2) == pytest.approx(float(-(p * np.log2(p)).sum()))
    assert ngram_entropy(tokens, 3) == pytest.approx(1.5)  # abc x2, bca, cab -> 1/2, 1/4, 1/4
    assert ngram_entropy(["a", "b"], 3) == 0.0  # no trigram at all


def test_generation_entropy_weights_bigrams_and_trigrams() -> None:
    # 4 distinct words: 3 distinct bigrams (H2 = log2 3), 2 distinct trigrams (H3 = 1).
    assert generation_entropy("w x y z") == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2)
    # A text that repeats itself has lower entropy than one that does not.
    assert generation_entropy("the cat " * 20) < generation_entropy(" ".join(f"w{i}" for i in range(40)))
    assert word_tokens("Paris, France's capital.") == ["Paris", ",", "France", "'", "s", "capital", "."]


def test_tfidf_matches_the_formula() -> None:
    docs = ["paris france paris", "rome italy", "paris italy"]
    tfidf = TfIdf.fit(docs)
    idf = {w: math.log(4 / (1 + df)) + 1 for w, df in {"paris": 2, "france": 1, "rome": 1, "italy": 2}.items()}
    for word, value in idf.items():
        assert tfidf.idf[tfidf.vocab[word]] == pytest.approx(value)
    a = np.array([2 * idf["paris"], idf["france"]])  # "Paris, Paris and France" (1-letter and unknown words dropped)
    b = np.array([idf["paris"], 0.0])
    expected = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert tfidf.similarity("Paris, Paris and France", "paris") == pytest.approx(expected)
    assert tfidf.similarity("zebra", "paris") == 0.0


_RS_CORPUS = [
    "Paris is the capital and most populous city of France.",
    "Rome is the capital city of Italy, with 2.8 million residents.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
    "Tokyo is the capital of Japan; Tokyo's population is huge.",
    "Berlin, Germany's capital, dates to the 13th century. BERLIN berlin Berlin!",
    "Miles Davis was an American jazz trumpeter, bandleader, and composer.",
    "Café naïve résumé — Unicode words: Zürich, São Paulo, 東京 and ü ß.",
]


@pytest.mark.parametrize(
    ("text_a", "text_b", "rs"),
    [
        ("Paris Paris France is big", _RS_CORPUS[0], "0x1.02d450476eeb6p-1"),
        ("The capital of Italy is Rome, Rome, Rome.", _RS_CORPUS[1] + " " + _RS_CORPUS[0], "0x1.fac019e3ad0a4p-2"),
        ("tokyo TOKYO japan the the the a b c", _RS_CORPUS[3], "0x1.5deb408d52e5ap-1"),
        ("Berlin berlin 13th century jazz", _RS_CORPUS[4] + " " + _RS_CORPUS[5], "0x1.7d4188c9e53dap-1"),
        ("Zürich and São Paulo, café résumé 東京", _RS_CORPUS[6], "0x1.a78be361f8ed4p-1"),
        ("zebra quantum xylophone", _RS_CORPUS[2], "0x0.0p+0"),
        ("", _RS_CORPUS[0], "0x0.0p+0"),
        (" ".join(_RS_CORPUS), " ".join(reversed(_RS_CORPUS)), "0x1.0000000000000p+0"),
    ],
)
def test_rs_keeps_its_numbers_bit_for_bit(text_a: str, text_b: str, rs: str) -> None:
    """RS to the last bit (float hex), so a change of TF-IDF code cannot move the tables.

    The sums are exactly rounded (``math.fsum``), so the CPU cannot move them either: with BLAS, two of these cases
    came out one bit off on the CI machine. Those two are within 2 units in the last place of the numbers before
    the change to exact sums (``0x1.fac019e3ad0a2p-2``, ``0x1.5deb408d52e5bp-1``), the others are unchanged.
    """
    assert TfIdf.fit(set(_RS_CORPUS)).similarity(text_a, text_b) == float.fromhex(rs)


def test_counterfact_summary_is_table_2() -> None:
    frame = pd.DataFrame(
        {"es": [1.0, 0.0], "ps": [1.0, 0.5], "ns": [0.8, 0.6], "em": [0.3, -0.1], "pm": [0, 0], "nm": [0.1, 0.3]}
    )
    row = counterfact_summary(frame)
    assert list(row.index) == ["S", "ES", "PS", "NS", "EM", "PM", "NM"]
    assert row["ES"] == 50 and row["PS"] == 75 and row["NS"] == pytest.approx(70)
    assert row["S"] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 70))
    assert row["EM"] == pytest.approx(10)
    table = summary_table({"A": frame, "B": frame.assign(es=1.0)})
    assert table.loc["B", "ES"] == 100 and table.loc["A", "ES"] == 50
    with pytest.raises(ValueError, match="lacks columns"):
        counterfact_summary(frame.drop(columns="ns"))


# --- against a model ---------------------------------------------------------------------------------------------


def _direct_mean_nll(lm: LoadedModel, prompt: str, target: str) -> float:
    """One sequence at a time, no padding, through the foundation's scorer."""
    return float(-target_scores(lm, [prompt], [target]).mean_logprob[0])


def test_mean_nll_matches_one_by_one_scoring() -> None:
    lm = load_model("tiny-gpt2")
    prompts = ["The capital of France is", "A", "The Eiffel Tower is located in the city of", "Rome is in"]
    targets = ["Paris", "long multi token answer", "Rome", "Italy"]
    nll = mean_nll(lm, prompts, targets, batch_size=3)
    expected = [_direct_mean_nll(lm, p, t) for p, t in zip(prompts, targets, strict=True)]
    np.testing.assert_allclose(nll, expected, rtol=1e-4)


def test_paired_nll_shares_passes_without_changing_the_numbers(tiny_lm: LoadedModel) -> None:
    prompts = ["The capital of France is", "Rome is in", "A", "The Eiffel Tower is located in the city of"]
    new = ["Rome", "a country called Westphalia", "b", "New York City"]
    true = ["Paris", "Italy", "long multi token answer", "Paris"]
    a, b = paired_nll(tiny_lm, prompts, new, true, batch_size=3)
    np.testing.assert_allclose(
        a, [_direct_mean_nll(tiny_lm, p, t) for p, t in zip(prompts, new, strict=True)], rtol=1e-4
    )
    np.testing.assert_allclose(
        b, [_direct_mean_nll(tiny_lm, p, t) for p, t in zip(prompts, true, strict=True)], rtol=1e-4
    )


def _record(case_id: int, subject: str, new: str, true: str) -> CounterFactRecord:
    return CounterFactRecord(
        case_id=case_id,
        relation_id="capital",
        prompt="The capital of {} is",
        subject=subject,
        target_new=new,
        target_true=true,
        paraphrase_prompts=(f"{subject}'s capital city is", f"The seat of government of {subject} is"),
        neighborhood_prompts=("The capital of Spain is", "Madrid is the capital of", "The largest city of Peru is"),
        generation_prompts=(f"{subject} is a country",),
        reference_texts=(f"{new} is a large city with museums and parks.",),
    )


def test_counterfact_scores_aggregate_per_prompt_comparisons() -> None:
    lm = load_model("tiny-llama")
    records = [_record(0, "France", "Rome", "Paris"), _record(1, "Japan", "Berlin Mitte", "Tokyo")]
    frame = counterfact_scores(lm, records, progress=False)
    for r, row in zip(records, frame.itertuples(), strict=True):

        def nll(prompts: tuple[str, ...], target: str) -> np.ndarray:
            return np.array([_direct_mean_nll(lm, p, target) for p in prompts])

        e_new, e_true = nll((r.edit_prompt,), r.target_new), nll((r.edit_prompt,), r.target_true)
        p_new, p_true = nll(r.paraphrase_prompts, r.target_new), nll(r.paraphrase_prompts, r.target_true)
        n_new, n_true = nll(r.neighborhood_prompts, r.target_new), nll(r.neighborhood_prompts, r.target_true)
        assert row.es == float(e_new[0] < e_true[0])
        assert row.em == pytest.approx(np.exp(-e_new[0]) - np.exp(-e_true[0]), abs=1e-5)
        assert row.ps == np.mean(p_new < p_true) and row.ns == np.mean(n_true < n_new)
        assert row.pm == pytest.approx(np.mean(np.exp(-p_new) - np.exp(-p_true)), abs=1e-5)
        assert row.nm == pytest.approx(np.mean(np.exp(-n_true) - np.exp(-n_new)), abs=1e-5)
        assert (row.case_id, row.target_new) == (r.case_id, r.target_new)


def test_sample_texts_are_seeded_and_leave_the_global_rng_alone() -> None:
    lm = load_model("tiny-qwen2")
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = sample_texts(lm, ["The cat", "A much longer opening line"], max_new_tokens=8, seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    assert a == sample_texts(lm, ["The cat", "A much longer opening line"], max_new_tokens=8, seed=1)
    assert a != sample_texts(lm, ["The cat", "A much longer opening line"], max_new_tokens=8, seed=2)
    assert a[1].startswith("A much longer opening line") and len(a[1]) > len("A much longer opening line")


def test_generation_scores_entropy_and_reference() -> None:
    lm = load_model("tiny-gpt2")
    records = [_record(0, "France", "Rome", "Paris"), _record(1, "Japan", "Berlin", "Tokyo")]
    frame = generation_scores(lm, records, max_new_tokens=12, progress=False)
    texts = sample_texts(lm, [p for r in records for p in r.generation_prompts], max_new_tokens=12)
    assert frame["ge"].tolist() == pytest.approx([generation_entropy(t) for t in texts])
    tfidf = TfIdf.fit({t for r in records for t in r.reference_texts})
    assert frame["rs"].tolist() == pytest.approx(
        [tfidf.similarity(t, r.reference_texts[0]) for t, r in zip(texts, records, strict=True)]
    )
    no_refs = generation_scores(
        lm, [CounterFactRecord(**{**records[0].__dict__, "reference_texts": ()})], max_new_tokens=4, progress=False
    )
    assert np.isnan(no_refs["rs"][0])


def test_token_hits_on_the_models_own_greedy_answer(smollm: LoadedModel) -> None:
    prompts = ["The capital of France is", "The Eiffel Tower is located in the city of"]
    greedy = [g.split(".")[0].strip() for g in generate(smollm, prompts, max_new_tokens=3)]
    hits = token_hits(smollm, prompts, greedy)
    assert [h.all() for h in hits] == [True, True]  # teacher forcing on the greedy answer: every token is the argmax
    wrong = token_hits(smollm, prompts, ["Tokyo", "Madrid"])
    assert [bool(h[0]) for h in wrong] == [False, False]


def test_zsre_scores_and_summary() -> None:
    lm = load_model("tiny-gpt2")
    record = ZsreRecord(
        0,
        "Lyon",
        "Which country is Lyon in?",
        "France",
        "Lyon lies in which country?",
        "nq question: who wrote hamlet",
        "William Shakespeare",
    )
    frame = zsre_scores(lm, [record, record], progress=False)
    hits = token_hits(lm, [record.src, record.rephrase, record.loc_prompt], ["France", "France", "William Shakespeare"])
    assert frame.efficacy[0] == hits[0].mean() and frame.paraphrase[1] == hits[1].mean()
    assert frame.specificity[0] == hits[2].mean()
    summary = zsre_summary(frame)
    assert list(summary.index) == ["Efficacy", "Paraphrase", "Specificity"]
    assert summary["Specificity"] == pytest.approx(100 * hits[2].mean())


def test_sample_texts_restores_the_padding_side_it_found() -> None:
    lm = load_model("tiny-gpt2")
    for side in ("left", "right"):
        lm.tokenizer.padding_side = side
        sample_texts(lm, ["a b", "Paris is"], max_new_tokens=2)
        assert lm.tokenizer.padding_side == side
