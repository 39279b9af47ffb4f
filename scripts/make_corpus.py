"""Write memit_lab/data/smollm2_samples.jsonl: the default offline corpus for key statistics.

Text sampled from the bundled model (SmolLM2-135M-Instruct, float32, CPU) after varied
plain-text openings: 64 everyday and encyclopedic topics x 6 registers (encyclopedic,
news, personal, surprising fact, historical change, guide). Nucleus sampling (top-p 0.95,
temperature 1), seeded per batch, so a rerun on the same software and CPU reproduces the
file; elsewhere the text may differ token for token but not in kind. The documents are
written in a seeded random order, so any prefix of the corpus (and any two halves) mixes
all topics and registers. Takes 25-50 minutes on 2 cores; the result is committed, so no
one needs to run this to use memit_lab.

Usage: .venv/bin/python scripts/make_corpus.py [--out PATH] [--max-new-tokens 320]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from memit_lab import load_model

TOPICS = [
    "volcanoes", "the French Revolution", "jazz music", "photosynthesis", "football", "Tokyo", "baking bread",
    "the stock market", "the Moon", "ancient Egypt", "honey bees", "the Amazon rainforest", "chess",
    "the printing press", "vaccines", "the Olympic Games", "coffee", "the Roman Empire", "electric cars",
    "the human heart", "Shakespeare", "climate change", "the Internet", "dinosaurs", "the piano", "Mount Everest",
    "the Great Wall of China", "public libraries", "gardening", "the Pacific Ocean", "medieval castles",
    "the telephone", "marathon running", "the Renaissance", "earthquakes", "the city of Paris", "birds of prey",
    "cheese making", "the solar system", "democracy", "railways", "the Nile", "painting with watercolours",
    "the immune system", "Antarctica", "film cameras", "the Beatles", "tea", "the Industrial Revolution",
    "wind power", "the United Nations", "whales", "mathematics", "the desert", "bicycles", "Ancient Greece",
    "the brain", "cotton", "the Vikings", "airports", "rice farming", "museums", "the weather", "sleep",
]  # fmt: skip
# Two blocks of three registers; each block is topic-major so every batch mixes registers.
TEMPLATE_BLOCKS = [
    ["{Topic} is", "Last week, a report about {topic} said that", "I have always been interested in {topic} because"],
    [
        "The most surprising fact about {topic} is that",
        "{Topic} has changed a lot over the last hundred years.",
        "A short guide to {topic}\n\n",
    ],
]


def openings() -> list[str]:
    """The 384 prompts, in generation order."""
    return [
        t.format(topic=topic, Topic=topic[0].upper() + topic[1:])
        for block in TEMPLATE_BLOCKS
        for topic in TOPICS
        for t in block
    ]


def sample(
    prompts: list[str], *, max_new_tokens: int, batch_size: int, seed: int, first: int = 0
) -> list[dict[str, object]]:
    """Continuations of ``prompts[first:]``; the batch starting at prompt ``i`` is seeded with ``seed + i``."""
    lm = load_model("smollm2-135m")
    tok = lm.tokenizer
    tok.padding_side = "left"
    rows: list[dict[str, object]] = []
    for start in range(first, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        torch.manual_seed(seed + start)
        enc = tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = lm.model.generate(
                **enc,
                do_sample=True,
                top_p=0.95,
                top_k=0,
                temperature=1.0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        rows += [{"prompt": p, "text": p + t} for p, t in zip(batch, texts, strict=True)]
        print(f"{start + len(batch)}/{len(prompts)} prompts", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, default=root / "memit_lab" / "data" / "smollm2_samples.jsonl")
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    rows = sample(openings(), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    random.Random(args.seed).shuffle(rows)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} documents to {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
