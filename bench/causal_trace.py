"""Benchmark: a full causal-tracing grid (all layers x all tokens x hidden/MLP/attention) on the bundled model,
the batched computation against the per-cell loop, in the same run.

* batched:  ``trace_all(..., batched=True)``: every layer x token x kind, ``--samples`` noise draws.
* per-cell: ``trace(..., batched=False)``: one forward pass per cell with the noise samples as its batch
  (what ROME's reference code does). A full per-cell grid costs minutes on 2 shared cores, so by default it
  runs on a subset of token columns (``--per-cell-positions``, every layer, every kind) and its full-grid time
  is extrapolated as (time per cell) x (cells); each cell is one identical-size forward pass, so the
  extrapolation is linear. ``--full-baseline`` runs the whole per-cell grid instead.
* per-cell, one sample per pass: the same loop with ``samples=1`` (the setting of the issue's 18.9 s
  prototype figure) times ``--samples``, measured on the same subset.

The max difference is taken over every cell the per-cell loop computed. The script also prints the ratio of
arithmetic (multiply-adds in linear layers) between the two methods, which bounds what any exact method can gain.

* batched under bfloat16 autocast (``trace_all(..., dtype="bfloat16")``; skip with ``--no-bf16``): time, ratio
  to float32 and the max difference from the float32 grid and from the per-cell reference.

Usage: .venv/bin/python bench/causal_trace.py [--samples 10] [--threads 2] [--per-cell-positions 2 9] [--no-bf16]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from memit_lab import LoadedModel, load_model
from memit_lab.tracing import KINDS, trace, trace_all

T = TypeVar("T")


def linear_macs(lm: LoadedModel) -> tuple[float, float]:
    """Multiply-adds per token of one block's matrices, and of the unembedding."""
    block = lm.model.get_submodule(lm.adapter.block(0))
    per_block = sum(p.numel() for p in block.parameters() if p.ndim == 2)
    return float(per_block), float(lm.model.get_submodule(lm.adapter.unembed).weight.numel())


def arithmetic_ratio(lm: LoadedModel, n_pos: int, start: int, window: int) -> float:
    """Per-cell over batched multiply-adds for the three kinds (per noise sample)."""
    block, head = linear_macs(lm)
    n = lm.n_layers
    per_cell = len(KINDS) * n * n_pos * n_pos * (n * block + head)
    suffix = sum(n_pos - t for t in range(start, n_pos))
    blocks_run = {
        "hidden": sum(n - 1 - layer for layer in range(n)),
        "mlp": sum(n - max(0, layer - window // 2) for layer in range(n)),
    }
    blocks_run["attn"] = blocks_run["mlp"]
    batched = sum(suffix * blocks_run[k] * block + (n_pos - start) * n * head for k in KINDS)
    return per_cell / batched


def best_of(repeats: int, run: Callable[[], T]) -> tuple[float, T]:
    """The least time of ``repeats`` calls, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-cell-positions", type=int, nargs="+", default=[2, 9])
    parser.add_argument("--full-baseline", action="store_true", help="run the whole per-cell grid")
    parser.add_argument("--repeats", type=int, default=2, help="batched: best of this many runs")
    parser.add_argument("--no-bf16", action="store_true", help="skip the batched grid under bfloat16 autocast")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m")
    kw: dict[str, Any] = {"window": args.window, "samples": args.samples}
    trace(lm, args.prompt, args.subject, samples=1, positions=[0])  # warm-up

    t_fast, fast = best_of(args.repeats, lambda: trace_all(lm, args.prompt, args.subject, **kw))
    low = None
    if not args.no_bf16:
        t_low, low = best_of(args.repeats, lambda: trace_all(lm, args.prompt, args.subject, dtype="bfloat16", **kw))
    n_pos = len(fast["hidden"].tokens)
    positions = None if args.full_baseline else args.per_cell_positions
    n_cols = n_pos if positions is None else len(positions)

    start = time.perf_counter()
    slow = {k: trace(lm, args.prompt, args.subject, kind=k, batched=False, positions=positions, **kw) for k in KINDS}  # type: ignore[arg-type]
    t_slow_measured = time.perf_counter() - start
    start = time.perf_counter()
    for k in KINDS:
        trace(lm, args.prompt, args.subject, kind=k, window=args.window, samples=1, batched=False, positions=positions)
    t_single_measured = time.perf_counter() - start

    cells_measured = len(KINDS) * lm.n_layers * n_cols
    cells_full = len(KINDS) * lm.n_layers * n_pos
    t_slow = t_slow_measured * cells_full / cells_measured
    t_single = t_single_measured * args.samples * cells_full / cells_measured
    diff = max(float((fast[k].scores - slow[k].scores).nan_to_num().abs().max()) for k in KINDS)
    span = fast["hidden"].subject_span

    print(f"bundled model, {args.prompt!r} ({n_pos} tokens, subject at {span[0]}..{span[1] - 1}), "
          f"{lm.n_layers} layers x {n_pos} tokens x 3 kinds = {cells_full} cells, samples={args.samples}, "
          f"window={args.window}, {args.threads} threads")  # fmt: skip
    print(f"batched, full grid (best of {args.repeats})          {t_fast:8.2f} s")
    what = "full grid" if positions is None else f"{cells_measured} cells (positions {positions}, every layer)"
    print(f"per-cell loop, measured on {what}: {t_slow_measured:.2f} s")
    print(f"per-cell loop, full grid{' (extrapolated)' if positions else ''}       {t_slow:8.2f} s")
    print(f"ratio per-cell / batched                    {t_slow / t_fast:8.2f} x")
    print(f"max |batched - per-cell| over {cells_measured} cells     {diff:.1e}")
    print(f"per-cell, one sample per pass (x{args.samples}), full grid {t_single:8.2f} s  "
          f"(ratio {t_single / t_fast:.1f} x)")  # fmt: skip
    if low is not None:
        to_fast = max(float((low[k].scores - fast[k].scores).nan_to_num().abs().max()) for k in KINDS)
        to_slow = max(float((low[k].scores - slow[k].scores).nan_to_num().abs().max()) for k in KINDS)
        print(f"batched, bfloat16 autocast (best of {args.repeats})   {t_low:8.2f} s  ({t_fast / t_low:.2f} x float32)")
        print(f"max |bf16 - float32 batched| full grid {to_fast:.1e}; max |bf16 - per-cell| {to_slow:.1e}")
    print(f"multiply-add ratio per-cell / batched (bound for exact methods) "
          f"{arithmetic_ratio(lm, n_pos, span[0], args.window):.2f} x")  # fmt: skip


if __name__ == "__main__":
    main()
