"""Benchmark: key statistics E[k k^T] for the bundled model's edit layers against plain forward passes.

Same run, same token windows (the default corpus), same batch size:

* full pass:       the whole model, logits included, no hooks;
* truncated pass:  the model run only up to the end of the highest requested layer;
* statistics cold: ``key_second_moment`` with an empty cache (forward + K^T K per layer + writing the cache);
* statistics warm: the same call again (read from the cache).

Goals (issue 10): cold <= 1.2 x the truncated pass; warm < 1 s.

Usage: .venv/bin/python bench/stats.py [--tokens 8192] [--layers 3 4 5 6 7] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Callable

import torch

from memit_lab import TraceDict, load_model
from memit_lab.corpus import corpus_windows
from memit_lab.hooks import StopForward
from memit_lab.stats import key_second_moment


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs (full pass: once)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("smollm2-135m")  # from the usual cache, before the private one is set
    windows = corpus_windows(lm.tokenizer, None, n_tokens=args.tokens, seq_len=args.seq_len)
    batches = [torch.stack(windows[i : i + args.batch_size]) for i in range(0, len(windows), args.batch_size)]
    top = max(args.layers)

    def full_pass() -> None:
        with torch.no_grad():
            for ids in batches:
                lm.model(input_ids=ids, use_cache=False)

    def truncated_pass() -> None:
        with torch.no_grad(), TraceDict(lm.model, [lm.adapter.block(top)], retain_output=False, stop=True):
            for ids in batches:
                with contextlib.suppress(StopForward):
                    lm.model(input_ids=ids, use_cache=False)

    kwargs = dict(n_tokens=args.tokens, batch_size=args.batch_size, seq_len=args.seq_len, progress=False)
    print(f"bundled model, layers {args.layers}, {args.tokens} tokens, batch {args.batch_size}x{args.seq_len}, "
          f"{args.threads} threads")  # fmt: skip
    truncated_pass()  # warm-up (allocator, kernels)
    t_full = best_of(1, full_pass)
    t_trunc = best_of(args.repeats, truncated_pass)
    t_nocache = best_of(args.repeats, lambda: key_second_moment(lm, args.layers, use_cache=False, **kwargs))
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MEMIT_LAB_CACHE"] = cache
        start = time.perf_counter()
        cold = key_second_moment(lm, args.layers, **kwargs)
        t_cold = time.perf_counter() - start
        t_warm = best_of(args.repeats, lambda: key_second_moment(lm, args.layers, **kwargs))
        warm = key_second_moment(lm, args.layers, **kwargs)
    diff = max(float((cold[layer] - warm[layer]).abs().max()) for layer in args.layers)

    rate = args.tokens / t_trunc
    print(f"full forward pass (baseline)         {t_full:8.2f} s")
    print(f"forward pass truncated at layer {top:<3d}  {t_trunc:8.2f} s  ({rate:.0f} tokens/s)")
    print(f"statistics, no cache                 {t_nocache:8.2f} s")
    print(f"statistics, cold (computes + writes) {t_cold:8.2f} s")
    print(f"statistics, cached call              {t_warm:8.3f} s   (goal < 1 s)")
    print(f"ratio statistics / full pass         {t_nocache / t_full:8.2f} x")
    print(f"ratio statistics / truncated pass    {t_nocache / t_trunc:8.2f} x   (goal <= 1.2 x)")
    print(f"ratio cold (with cache write) / truncated {t_cold / t_trunc:5.2f} x")
    print(f"max |cold - cached| difference       {diff:.1e}")


if __name__ == "__main__":
    main()
