"""Benchmark: reading real-size dataset files, against parsing the same JSON alone.

Generated files of the real files' sizes and shapes, in a temporary folder:

* CounterFact: 21,919 records (the real ``counterfact.json``), each with 2 paraphrase, 10
  neighbourhood, 10 attribute and 10 generation prompts, as in the real file; one record in
  every 1,000 malformed (an empty new object), so skipping and reporting is part of the time.
* zsRE: 19,086 records (the real ``zsre_mem_eval.json``), one with an empty ``alt`` as there.

For each: ``json.loads`` of the file (the floor no loader can beat), then ``load_counterfact`` /
``load_zsre`` / ``load_records``; best of ``--repeats``, and the ratio loader / floor.

Goal ([scale]): seconds, not minutes, for a 20,000-record file.

Usage: .venv/bin/python bench/datasets.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memit_lab.datasets import load_counterfact, load_records, load_zsre

COUNTERFACT_SIZE = 21_919
ZSRE_SIZE = 19_086


def counterfact_raw(i: int) -> dict[str, Any]:
    subject = f"Subject number {i}"
    new = "" if i % 1000 == 999 else f"Object {i % 97}"
    return {
        "case_id": i,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "subject": subject,
            "target_new": {"str": new, "id": f"Q{i % 97}"},
            "target_true": {"str": f"Object {(i + 1) % 97}", "id": f"Q{(i + 1) % 97}"},
        },
        "paraphrase_prompts": [f"Some unrelated words {i}. {subject} spoke", f"{subject}'s mother tongue is"],
        "neighborhood_prompts": [f"The mother tongue of neighbour {i}-{j} is" for j in range(10)],
        "attribute_prompts": [f"The mother tongue of speaker {i}-{j} is" for j in range(10)],
        "generation_prompts": [f"{subject} was born in the town of, {j}" for j in range(10)],
    }


def zsre_raw(i: int) -> dict[str, Any]:
    subject = f"Person {i}"
    return {
        "subject": subject,
        "src": f"What university did {subject} attend?",
        "alt": "" if i == 10 else f"University {i % 50}",
        "answers": [f"College {i % 60}"],
        "rephrase": f"Which university did {subject} go to?",
        "loc": f"nq question: who wrote book number {i}",
        "loc_ans": f"Author {i % 70}",
    }


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)  # the skip summary; counted below instead
    with tempfile.TemporaryDirectory() as tmp:
        cf, zs = Path(tmp) / "counterfact.json", Path(tmp) / "zsre_mem_eval.json"
        cf.write_text(json.dumps([counterfact_raw(i) for i in range(COUNTERFACT_SIZE)]))
        zs.write_text(json.dumps([zsre_raw(i) for i in range(ZSRE_SIZE)]))
        cases = [
            (cf, "load_counterfact", lambda: load_counterfact(cf)),
            (cf, "load_records", lambda: load_records(cf)),
            (zs, "load_zsre", lambda: load_zsre(zs)),
            (zs, "load_zsre(target='alt')", lambda: load_zsre(zs, target="alt")),
        ]
        print(f"{'file':<22} {'MB':>6} {'loader':<25} {'kept':>7} {'skipped':>7} {'json s':>7} {'load s':>7} ratio")
        for path, name, load in cases:
            floor = best_of(args.repeats, lambda p=path: json.loads(p.read_text(encoding="utf-8")))
            seconds = best_of(args.repeats, load)
            records = load()
            print(
                f"{path.name:<22} {path.stat().st_size / 1e6:>6.1f} {name:<25} {len(records):>7,} "
                f"{len(records.skipped):>7,} {floor:>7.2f} {seconds:>7.2f} {seconds / floor:.1f}x"
            )


if __name__ == "__main__":
    main()
