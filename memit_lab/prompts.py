"""Prompts and tokens: where the subject sits, how likely a target is, what the model says next.

Subjects are located by character offsets, not by counting tokens of a prefix: BPE
merges across the boundary ("The Eiffel" may split as "The", " E", "iffel"), and
counting prefix tokens then misses by one. Every function here works for both
tokenizer families memit_lab supports -- byte-level BPE (GPT-2, SmolLM2, Qwen2) and
SentencePiece style (Llama-2, with a ``<s>`` token in front).

A *target* is scored as the continuation ``prompt + " " + target`` (one space
between, as in the paper's code), teacher-forced, so multi-token targets work.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

from .models import LoadedModel

__all__ = [
    "SubjectNotFoundError",
    "TargetScores",
    "check_target_pairs",
    "continuation",
    "encode",
    "generate",
    "last_subject_token",
    "last_token_of_chars",
    "padded_batch",
    "padding_side",
    "subject_token_span",
    "target_positions",
    "target_scores",
    "token_span_of_chars",
    "top_predictions",
]

Offsets = Sequence[Sequence[int]]
"""Per token, its ``(start, end)`` characters in the text (a tokenizer's ``offset_mapping``)."""


class SubjectNotFoundError(ValueError):
    """The subject does not occur in the prompt."""


def check_prompt(prompt: str) -> None:
    """Refuse empty or blank prompts with a message that says what to pass."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")


def check_target_pairs(prompts: Sequence[str], targets: Sequence[str]) -> None:
    """Refuse a target list that does not pair up with the prompts, or a blank prompt or target.

    Example:
        >>> check_target_pairs(["The capital of France is"], ["Paris"])
        >>> check_target_pairs(["a b"], ["x", "y"])
        Traceback (most recent call last):
        ...
        ValueError: got 1 prompts but 2 targets; pass one target per prompt
    """
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets; pass one target per prompt")
    for prompt, target in zip(prompts, targets, strict=True):
        check_prompt(prompt)
        if not isinstance(target, str) or not target.strip():
            raise ValueError(f"target must be a non-empty string, got {target!r} (prompt {prompt!r})")


# --- tokens by character offsets ---------------------------------------------------------------------------------


def token_span_of_chars(offsets: Offsets, start: int, end: int) -> tuple[int, int]:
    """Token positions ``[first, stop)`` whose characters overlap characters ``[start, end)``.

    Tokens without characters (special tokens, padding: offsets ``(0, 0)``) never count.

    Example:
        >>> token_span_of_chars([(0, 0), (0, 3), (3, 10), (10, 16), (16, 19)], 4, 16)
        (2, 4)
    """
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not inside:
        raise ValueError(f"no token covers characters {start}..{end}; is the span empty?")
    return inside[0], inside[-1] + 1


def last_token_of_chars(offsets: Offsets, start: int, end: int) -> int:
    """Position of the last token overlapping characters ``[start, end)`` (the subject's last token, eq. 19).

    Example:
        >>> last_token_of_chars([(0, 0), (0, 3), (3, 10), (10, 16), (16, 19)], 4, 16)
        3
    """
    return token_span_of_chars(offsets, start, end)[1] - 1


def target_positions(offsets: Offsets, prompt: str) -> list[int]:
    """Positions of the target's tokens in ``continuation(prompt, target)``: tokens ending after the prompt.

    A token that straddles the boundary (the target's leading space glued to it) is the
    target's; tokens without characters (special tokens, padding) are never.

    Example:
        >>> target_positions([(0, 3), (3, 6), (6, 12), (12, 13)], "The dog")
        [2, 3]
    """
    boundary = len(prompt.rstrip())
    return [i for i, (a, b) in enumerate(offsets) if b > a and b > boundary]


def subject_token_span(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> tuple[int, int]:
    """Token positions ``[start, end)`` covering the first occurrence of ``subject`` in ``prompt``.

    A token belongs to the subject when its characters overlap the subject's
    characters (a leading space glued to the first subject token counts as part of it).
    Positions index the ids that ``tokenizer(prompt)`` produces, special tokens included.

    Example:
        >>> from memit_lab.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer("byte-level")
        >>> start, end = subject_token_span(tok, "The Eiffel Tower is in", "Eiffel Tower")
        >>> tok.convert_ids_to_tokens(tok("The Eiffel Tower is in").input_ids[start:end])
        ['ĠEiffel', 'ĠTower']
    """
    check_prompt(prompt)
    if not subject or not subject.strip():
        raise ValueError("subject must be a non-empty string")
    begin = prompt.find(subject)
    if begin < 0:
        raise SubjectNotFoundError(
            f"subject {subject!r} does not occur in prompt {prompt!r}; write the prompt so it contains "
            "the subject verbatim (same case and spelling)"
        )
    offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    return token_span_of_chars(offsets, begin, begin + len(subject))


def last_subject_token(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> int:
    """Position of the subject's last token -- where MEMIT reads keys and writes values."""
    return subject_token_span(tokenizer, prompt, subject)[1] - 1


# --- batches and padding --------------------------------------------------------------------------------------


def padded_batch(
    tokenizer: PreTrainedTokenizerBase,
    sequences: Sequence[Sequence[int]],
    device: torch.device | str = "cpu",
    *,
    side: Literal["right", "left"] = "right",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences as one padded batch: ids ``[batch, pos]`` and attention mask ``[batch, pos]``.

    Both are ``torch.long``, ``pos`` is the longest sequence's length (0 if all are
    empty), padding uses the tokenizer's pad id on ``side``.

    Example:
        >>> from memit_lab.tiny import tiny_tokenizer
        >>> ids, mask = padded_batch(tiny_tokenizer(), [[5, 6, 7], [8]])
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (load_model does)")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    width = max((len(seq) for seq in sequences), default=0)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def padding_side(tokenizer: PreTrainedTokenizerBase, side: Literal["right", "left"]) -> Iterator[None]:
    """Pad on ``side`` inside the block, then restore the side the tokenizer had before (also on errors).

    Example:
        >>> from memit_lab.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> tok.padding_side = "left"
        >>> with padding_side(tok, "right"):
        ...     tok.padding_side
        'right'
        >>> tok.padding_side
        'left'
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    before = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = before


def encode(lm: LoadedModel, prompts: Sequence[str]) -> BatchEncoding:
    """Tokenise a batch, padded on the right, on the model's device."""
    for prompt in prompts:
        check_prompt(prompt)
    return lm.tokenizer(list(prompts), return_tensors="pt", padding=True).to(lm.device)


def continuation(prompt: str, target: str) -> str:
    """The text scored for ``target`` after ``prompt``: one space between them."""
    return prompt.rstrip() + " " + target.strip()


@dataclass(frozen=True)
class TargetScores:
    """Log-probabilities of target continuations, one entry per (prompt, target) pair.

    Attributes:
        token_logprobs: per pair, ``[n_target_tokens]`` log P of each target token.
        tokens: per pair, the target's tokens as strings.
    """

    token_logprobs: list[torch.Tensor]
    tokens: list[list[str]]

    @property
    def sum_logprob(self) -> torch.Tensor:
        """``[batch]`` log P(target | prompt), the whole sequence."""
        return torch.stack([t.sum() for t in self.token_logprobs])

    @property
    def mean_logprob(self) -> torch.Tensor:
        """``[batch]`` average per-token log P (what the paper's metrics compare)."""
        return torch.stack([t.mean() for t in self.token_logprobs])

    @property
    def prob(self) -> torch.Tensor:
        """``[batch]`` P(target | prompt)."""
        return self.sum_logprob.exp()


@torch.no_grad()
def target_scores(
    lm: LoadedModel, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> TargetScores:
    """Teacher-forced log-probabilities of each ``target`` after its ``prompt``.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-llama")
        >>> s = target_scores(lm, ["The capital of France is"], ["Paris"])
        >>> s.tokens
        [['▁Pari', 's']]
        >>> bool(s.prob[0] < 1)
        True
    """
    check_target_pairs(prompts, targets)
    logprobs: list[torch.Tensor] = []
    tokens: list[list[str]] = []
    for lo in range(0, len(prompts), batch_size):
        chunk = zip(prompts[lo : lo + batch_size], targets[lo : lo + batch_size], strict=True)
        texts = [continuation(p, t) for p, t in chunk]
        enc = lm.tokenizer(texts, return_tensors="pt", padding=True, return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping")
        logits = lm.model(**enc.to(lm.device)).logits.float().log_softmax(-1).cpu()
        for row, prompt in enumerate(prompts[lo : lo + batch_size]):
            # Padding has no characters, so it is never a target position.
            positions = target_positions(offsets[row].tolist(), prompt)
            ids = enc.input_ids[row, positions].cpu()
            # The logit that predicts token i sits at position i - 1.
            logprobs.append(logits[row, torch.tensor(positions) - 1].gather(-1, ids[:, None])[:, 0])
            tokens.append(lm.tokenizer.convert_ids_to_tokens(ids.tolist()))
    return TargetScores(logprobs, tokens)


@torch.no_grad()
def top_predictions(lm: LoadedModel, prompts: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The ``k`` most likely next tokens after each prompt, with probabilities.

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-qwen2")
        >>> preds = top_predictions(lm, ["The Eiffel Tower is in"], k=3)
        >>> len(preds[0]), all(0 <= p <= 1 for _, p in preds[0])
        (3, True)
    """
    enc = encode(lm, prompts)
    logits = lm.model(**enc).logits.float()
    last = enc.attention_mask.sum(1) - 1
    probs = logits[torch.arange(len(prompts)), last].softmax(-1)
    values, ids = probs.topk(k, dim=-1)
    return [
        [(lm.tokenizer.decode([int(i)]), float(v)) for i, v in zip(row_ids, row_vals, strict=True)]
        for row_ids, row_vals in zip(ids.cpu(), values.cpu(), strict=True)
    ]


@torch.no_grad()
def generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 20) -> list[str]:
    """Greedy continuations (the new text only), batched with left padding."""
    for prompt in prompts:
        check_prompt(prompt)
    tokenizer = lm.tokenizer
    with padding_side(tokenizer, "left"):
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(lm.device)
    out = lm.model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
