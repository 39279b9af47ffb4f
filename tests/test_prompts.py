"""Subject positions, target probabilities and generation, checked against hand-worked and brute-force answers."""

import pytest
import torch

from memit_lab import LoadedModel, SubjectNotFoundError, load_model
from memit_lab.prompts import (
    check_target_pairs,
    continuation,
    generate,
    last_subject_token,
    last_token_of_chars,
    padded_batch,
    padding_side,
    subject_token_span,
    target_positions,
    target_scores,
    token_span_of_chars,
    top_predictions,
)
from memit_lab.tiny import tiny_tokenizer


def _subject_tokens(tok, prompt: str, subject: str) -> list[str]:  # type: ignore[no-untyped-def]
    start, end = subject_token_span(tok, prompt, subject)
    return tok.convert_ids_to_tokens(tok(prompt).input_ids)[start:end]


def test_subject_span_byte_level() -> None:
    tok = tiny_tokenizer("byte-level")
    assert _subject_tokens(tok, "The capital of France is", "France") == ["ĠFrance"]
    assert _subject_tokens(tok, "Paris is the capital of France", "Paris") == ["Pari", "s"]


def test_subject_span_sentencepiece_counts_the_bos_token() -> None:
    tok = tiny_tokenizer("sentencepiece")
    ids = tok("The capital of France is").input_ids
    assert tok.convert_ids_to_tokens(ids)[0] == "<s>"
    assert _subject_tokens(tok, "The capital of France is", "France") == ["▁France"]
    assert _subject_tokens(tok, "Paris is the capital of France", "Paris") == ["▁Pari", "s"]


def test_subject_span_on_the_bundled_tokenizer(smollm: LoadedModel) -> None:
    # Counting the tokens of "The " would be off by one: "The E|iffel" merges differently.
    tokens = _subject_tokens(smollm.tokenizer, "The Eiffel Tower is located in the city of", "Eiffel Tower")
    assert tokens == ["ĠE", "iffel", "ĠTower"]
    assert last_subject_token(smollm.tokenizer, "The Eiffel Tower is located in the city of", "Eiffel Tower") == 3


def test_subject_not_in_prompt_and_empty_prompt() -> None:
    tok = tiny_tokenizer()
    with pytest.raises(SubjectNotFoundError, match="'Louvre' does not occur"):
        subject_token_span(tok, "The Eiffel Tower is in", "Louvre")
    with pytest.raises(ValueError, match="non-empty"):
        subject_token_span(tok, "   ", "Louvre")
    lm = load_model("tiny-gpt2")
    with pytest.raises(ValueError, match="non-empty"):
        top_predictions(lm, [""])
    with pytest.raises(ValueError, match="one target per prompt"):
        target_scores(lm, ["a b"], ["x", "y"])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_target_scores_equal_step_by_step_probabilities(name: str) -> None:
    """Batched teacher forcing == the chain rule computed one token at a time, unbatched."""
    lm = load_model(name)
    prompts = ["The capital of France is", "Miles Davis plays the"]
    targets = ["Paris, France", "trumpet"]
    scores = target_scores(lm, prompts, targets)
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        full = lm.tokenizer(prompt + " " + target).input_ids
        n_prompt = len(lm.tokenizer(prompt).input_ids)
        expected = []
        for pos in range(n_prompt, len(full)):
            with torch.no_grad():
                logits = lm.model(torch.tensor([full[:pos]])).logits[0, -1]
            expected.append(logits.log_softmax(-1)[full[pos]])
        assert len(scores.tokens[i]) == len(full) - n_prompt >= 1
        torch.testing.assert_close(scores.token_logprobs[i], torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_multi_token_target_on_the_bundled_model(smollm: LoadedModel) -> None:
    scores = target_scores(smollm, ["The Statue of Liberty is located in the city of"] * 2, ["New York", "Paris"])
    assert scores.tokens[0] == ["ĠNew", "ĠYork"]
    assert scores.prob[0] > 0.3 > scores.prob[1]


def test_greedy_generation_equals_argmax_loop() -> None:
    lm = load_model("tiny-qwen2")
    prompts = ["The capital of France is", "Rome"]
    out = generate(lm, prompts, max_new_tokens=4)
    for prompt, text in zip(prompts, out, strict=True):
        ids = lm.tokenizer(prompt).input_ids
        for _ in range(4):
            with torch.no_grad():
                ids.append(int(lm.model(torch.tensor([ids])).logits[0, -1].argmax()))
        n = len(lm.tokenizer(prompt).input_ids)
        assert text == lm.tokenizer.decode(ids[n:], skip_special_tokens=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_restores_the_padding_side_it_found(side: str) -> None:
    """generate pads on the left, then gives back the side the caller had (it used to force "right")."""
    lm = load_model("tiny-gpt2")
    lm.tokenizer.padding_side = side
    generate(lm, ["a b", "The capital of France is"], max_new_tokens=2)
    assert lm.tokenizer.padding_side == side


def test_padding_side_restores_the_previous_side_also_on_errors() -> None:
    tok = tiny_tokenizer()
    tok.padding_side = "left"
    seen = []

    def pad_then_fail() -> None:
        with padding_side(tok, "right"):
            seen.append(tok.padding_side)
            raise RuntimeError

    with pytest.raises(RuntimeError):
        pad_then_fail()
    assert seen == ["right"] and tok.padding_side == "left"


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_equals_the_tokenizers_own_padding(side: str) -> None:
    tok = tiny_tokenizer("sentencepiece")
    texts = ["The capital of France is", "a", "Miles Davis plays the trumpet"]
    with padding_side(tok, side):
        enc = tok(texts, return_tensors="pt", padding=True)
    ids, mask = padded_batch(tok, [tok(t).input_ids for t in texts], side=side)  # type: ignore[arg-type]
    assert torch.equal(ids, enc.input_ids) and torch.equal(mask, enc.attention_mask)
    assert ids.dtype == mask.dtype == torch.long
    empty_ids, empty_mask = padded_batch(tok, [[], []])
    assert empty_ids.shape == empty_mask.shape == (2, 0)


def test_padded_batch_refuses_a_tokenizer_without_pad_token() -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        padded_batch(tok, [[1, 2]])


def test_tokens_by_character_offsets() -> None:
    tok = tiny_tokenizer("byte-level")
    prompt, subject = "The Eiffel Tower is in", "Eiffel Tower"
    offsets = tok(prompt, return_offsets_mapping=True)["offset_mapping"]
    begin = prompt.index(subject)
    assert token_span_of_chars(offsets, begin, begin + len(subject)) == subject_token_span(tok, prompt, subject)
    assert last_token_of_chars(offsets, begin, begin + len(subject)) == last_subject_token(tok, prompt, subject)
    with pytest.raises(ValueError, match=r"no token covers characters 3\.\.3"):
        token_span_of_chars(offsets, 3, 3)
    # The target's leading space is glued to its first token; special tokens (no characters) never count.
    text = continuation("The capital of France is ", "Paris")
    enc = tok(text, return_offsets_mapping=True)
    targets = target_positions(enc["offset_mapping"], "The capital of France is ")
    assert tok.decode([enc.input_ids[i] for i in targets]) == " Paris"
    assert target_positions([(0, 0), (0, 3), (0, 0)], "") == [1]


def test_check_target_pairs() -> None:
    check_target_pairs(["a b"], ["c"])
    with pytest.raises(ValueError, match="one target per prompt"):
        check_target_pairs(["a b"], ["x", "y"])
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        check_target_pairs(["a b"], [" "])
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        check_target_pairs([""], ["x"])
