"""Generic text for key statistics (eq. 15), available offline, and how it becomes model input.

MEMIT needs C0 ~ lambda * E[k k^T] over the keys a model meets in ordinary text. The paper
used 100,000 Wikipedia articles; nothing like that is on a fresh machine without a
download, so memit_lab ships its own default and accepts yours.

Named corpora:

* ``"smollm2-samples"`` (the default): ~108,000 tokens of English sampled from the bundled
  model (SmolLM2-135M-Instruct) after 384 plain-text openings -- 64 everyday and
  encyclopedic topics in six registers (encyclopedic "X is", news "Last week, a report
  about X said that", personal "I have always been interested in X because", "The most
  surprising fact about X is that", historical change, a short guide), nucleus
  sampling (top-p 0.95, temperature 1). Made once by ``scripts/make_corpus.py`` and
  committed as ``memit_lab/data/smollm2_samples.jsonl``.
  *Bias*: it is the model's own distribution, not human text: fluent but often
  factually wrong, more repetitive and lower in entropy than Wikipedia, sometimes in the
  chat-assistant register the model was tuned on, English only, no code, topics fixed by
  the openings. For the bundled model that is arguably what C0 should describe (the keys
  it produces on text it finds typical); for another model it is foreign text, like any
  corpus. ``notebooks/03_key_value_memory.ipynb`` measures what the choice changes.
* ``"python-docs"``: the Python language reference as shipped with every CPython
  (``pydoc_data.topics``, ~465,000 characters): human-written, technical English about
  programming -- a corpus with the opposite bias, kept for comparison.

Your own text: a path to a ``.txt`` file (one document), a ``.jsonl`` file (one document
per line, in its ``"text"`` field), a folder of such files, an iterable of strings, or an
iterable of rows (mappings, e.g. a local Hugging Face ``datasets.Dataset``) with a text
column.

Documents are tokenized without special tokens, joined with the end-of-text token (as
pretraining packs documents) and cut into windows of ``seq_len`` positions, each starting
with the tokens the tokenizer puts before any text (``<s>`` for Llama-2-style tokenizers,
nothing for GPT-2 and SmolLM2), so windows look like the prompts edits are made on.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gpt2")
    >>> windows = corpus_windows(lm.tokenizer, ["Paris is in France.", "Rome is in Italy."], n_tokens=9, seq_len=4)
    >>> [len(w) for w in windows]
    [4, 4, 1]
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "Corpus",
    "corpus_documents",
    "corpus_windows",
    "python_docs",
    "smollm2_samples",
]

#: What callers may pass as a corpus (``None`` means :data:`DEFAULT_CORPUS`).
Corpus = str | os.PathLike[str] | Iterable[str] | Iterable[Mapping[str, Any]] | None

DEFAULT_CORPUS = "smollm2-samples"


def smollm2_samples() -> Iterator[str]:
    """The default corpus: text sampled from the bundled model (see the module docstring)."""
    path = resources.files("memit_lab") / "data" / "smollm2_samples.jsonl"
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)["text"]


def python_docs() -> Iterator[str]:
    """The Python language reference shipped with CPython, one topic per document."""
    from pydoc_data.topics import topics  # stdlib, but 0.5 MB: load only when asked for

    for name in sorted(topics):
        yield topics[name]


#: Named corpora: name -> function yielding documents.
CORPORA = {"smollm2-samples": smollm2_samples, "python-docs": python_docs}


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield json.loads(line)[text_column]
    else:
        yield path.read_text(encoding="utf-8")


def _path_documents(path: Path, text_column: str) -> Iterator[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ValueError(f"folder {path} holds no .txt or .jsonl files to read text from")
        for file in files:
            yield from _file_documents(file, text_column)
    else:
        yield from _file_documents(path, text_column)


def corpus_documents(corpus: Corpus = None, *, text_column: str = "text") -> Iterator[str]:
    """The documents of a corpus, lazily, in a fixed order.

    Args:
        corpus: ``None`` (the default corpus), a name in :data:`CORPORA`, a path (``.txt``,
            ``.jsonl`` or a folder of them), an iterable of strings, or an iterable of rows
            (mappings, e.g. a ``datasets.Dataset``) holding ``text_column``.
        text_column: the field holding the text in ``.jsonl`` lines and rows.

    Example:
        >>> next(corpus_documents("python-docs"))[:20]
        'The "assert" stateme'
    """
    if corpus is None:
        corpus = DEFAULT_CORPUS
    if isinstance(corpus, str) and corpus in CORPORA:
        yield from CORPORA[corpus]()
    elif isinstance(corpus, str | os.PathLike):
        path = Path(corpus).expanduser()
        if not path.exists():
            raise ValueError(
                f"corpus {str(corpus)[:80]!r} is neither a named corpus ({', '.join(CORPORA)}) nor an existing "
                "file or folder; to use text you have in memory, pass a list of strings"
            )
        yield from _path_documents(path, text_column)
    else:
        for item in corpus:
            if isinstance(item, str):
                yield item
            elif isinstance(item, Mapping):
                yield item[text_column]
            else:
                raise TypeError(f"a corpus yields strings or rows with a {text_column!r} field, got {type(item)}")


def _prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before any text (a BOS token, or nothing)."""
    return list(tokenizer("", add_special_tokens=True).input_ids)


def _token_stream(tokenizer: PreTrainedTokenizerBase, documents: Iterable[str]) -> Iterator[list[int]]:
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False).input_ids
        if ids:
            yield list(ids) + separator


def corpus_windows(
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus = None,
    *,
    n_tokens: int,
    seq_len: int = 128,
    text_column: str = "text",
) -> list[torch.Tensor]:
    """The corpus as model inputs: windows of token ids holding ``n_tokens`` positions in all.

    Every window has ``seq_len`` positions (the tokenizer's prefix, then the packed token
    stream) except the last, which is cut so the total is exactly ``n_tokens``. Only as
    much text as needed is read and tokenized.

    Raises:
        ValueError: the corpus is empty or holds fewer than ``n_tokens`` positions' worth
            of text (the message says how many it has), or ``seq_len`` leaves no room
            after the prefix.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive number of tokens, got {n_tokens}")
    prefix = _prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room for text after the tokenizer's {len(prefix)} prefix tokens")
    windows: list[torch.Tensor] = []
    buffer: list[int] = []
    total = used = 0
    stream = _token_stream(tokenizer, corpus_documents(corpus, text_column=text_column))
    while total < n_tokens:
        size = min(seq_len, n_tokens - total)
        need = max(size - len(prefix), 0)
        while len(buffer) < max(need, 1) and (chunk := next(stream, None)) is not None:
            buffer += chunk
        if len(buffer) < need or (used == 0 and not buffer):
            raise ValueError(
                f"the corpus gives only {total + len(prefix) + len(buffer) if buffer else total} tokens, fewer "
                f"than n_tokens={n_tokens}; pass a smaller n_tokens or more text"
                + ("" if used or buffer else " (the corpus is empty)")
            )
        window, buffer = (prefix + buffer[:need])[:size], buffer[need:]
        windows.append(torch.tensor(window, dtype=torch.long))
        total += size
        used += need
    return windows
