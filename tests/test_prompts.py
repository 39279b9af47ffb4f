"""Subject positions, target probabilities and generation, checked against hand-worked and brute-force answers."""

import pytest
import torch

from memit_lab import LoadedModel, SubjectNotFoundError, load_model
from memit_lab.prompts import generate, last_subject_token, subject_token_span, target_scores, top_predictions
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
