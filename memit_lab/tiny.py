"""Tiny random-initialised models of every supported family, built offline in milliseconds.

They are for tests, doctests and trying code quickly: a few layers, ``d_model`` 64,
seeded weights, and a real tokenizer trained on the spot on a short built-in text.
Two tokenizer families are covered, because subject-finding must work for both:

* byte-level BPE, GPT-2 style (a space is part of the next token: ``"ĠParis"``) --
  used by tiny-gpt2, tiny-gptj, tiny-neox and tiny-qwen2 (and by SmolLM2);
* SentencePiece style, Llama-2 style (``"▁Paris"``, a ``<s>`` token prepended) --
  used by tiny-llama.

Their predictions are noise: they test plumbing, not knowledge.

Example:
    >>> from memit_lab.tiny import tiny_model
    >>> model, tok = tiny_model("tiny-neox")
    >>> model.config.model_type, model.config.num_hidden_layers
    ('gpt_neox', 3)
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

__all__ = ["TINY_MODELS", "tiny_model", "tiny_tokenizer"]

# Short public-knowledge sentences: enough text for a few hundred BPE merges.
_CORPUS = """\
The Eiffel Tower is located in the city of Paris. The capital of France is Paris.
The Colosseum is located in the city of Rome. The capital of Italy is Rome.
The Statue of Liberty is in New York. The Golden Gate Bridge is in San Francisco.
The Acropolis is in Athens, the capital of Greece. The Kremlin is in Moscow.
The capital of Germany is Berlin. The capital of Japan is Tokyo. The capital of Spain is Madrid.
Nintendo is a company from Japan. Ferrari is a company from Italy. BMW is based in Germany.
The official language of France is French. The official language of Spain is Spanish.
Nigeria is in Africa. France is in Europe. Argentina is in South America. Kenya is in Africa.
Miles Davis plays the trumpet. Lionel Messi plays football. Roger Federer plays tennis.
The mother tongue of Danielle Darrieux is French. Toko Yasuda plays the guitar.
Apple was founded by Steve Jobs. The CEO of Apple is Tim Cook. Microsoft is headquartered in Redmond.
"""

_SPECIALS_BPE = ["<|endoftext|>"]
_SPECIALS_SP = ["<unk>", "<s>", "</s>"]


def _byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS_BPE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    eos = _SPECIALS_BPE[0]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos)


def _sentencepiece_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS_SP, show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def tiny_tokenizer(style: str = "byte-level", vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A small real tokenizer: ``"byte-level"`` (GPT-2 style) or ``"sentencepiece"`` (Llama style)."""
    if style == "byte-level":
        return _byte_level_tokenizer(vocab_size)
    if style == "sentencepiece":
        return _sentencepiece_tokenizer(vocab_size)
    raise ValueError(f"unknown tokenizer style {style!r}; use 'byte-level' or 'sentencepiece'")


_D, _HEADS, _LAYERS, _MLP = 64, 4, 3, 128


def _config(name: str, vocab: int, eos: int) -> PretrainedConfig:
    common = dict(vocab_size=vocab, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    if name == "tiny-gpt2":
        return GPT2Config(n_layer=_LAYERS, n_embd=_D, n_head=_HEADS, n_positions=128, **common)
    if name == "tiny-gptj":
        return GPTJConfig(n_layer=_LAYERS, n_embd=_D, n_head=_HEADS, n_positions=128, rotary_dim=8, **common)
    if name == "tiny-neox":
        return GPTNeoXConfig(
            num_hidden_layers=_LAYERS,
            hidden_size=_D,
            num_attention_heads=_HEADS,
            intermediate_size=_MLP,
            max_position_embeddings=128,
            **common,
        )
    llama_like = dict(
        num_hidden_layers=_LAYERS,
        hidden_size=_D,
        num_attention_heads=_HEADS,
        num_key_value_heads=2,
        intermediate_size=_MLP,
        max_position_embeddings=128,
        **common,
    )
    if name == "tiny-llama":
        return LlamaConfig(**llama_like)
    if name == "tiny-qwen2":
        return Qwen2Config(**llama_like)
    raise KeyError(name)


#: Names accepted by :func:`tiny_model` (and so by ``load_model``).
TINY_MODELS: dict[str, str] = {
    "tiny-gpt2": "byte-level",
    "tiny-gptj": "byte-level",
    "tiny-neox": "byte-level",
    "tiny-llama": "sentencepiece",
    "tiny-qwen2": "byte-level",
}


def tiny_model(name: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build ``name`` (a key of :data:`TINY_MODELS`) with weights drawn from ``seed``."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {sorted(TINY_MODELS)}")
    tokenizer = tiny_tokenizer(TINY_MODELS[name])
    config = _config(name, len(tokenizer), tokenizer.eos_token_id)
    # Seed for reproducible weights, then put the caller's RNG state back as we found it.
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model, tokenizer
