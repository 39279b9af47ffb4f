"""The ``memit-lab`` command line: ``memit-lab demo`` is the first thing a newcomer runs.

Each sub-command is one ``_cmd_*`` function plus its ``_add_*`` argument block; the
logic lives in the library, the CLI only parses, calls and prints.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from .models import LoadedModel, load_model
from .prompts import top_predictions

DEMO_PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is",
    "The Colosseum is located in the city of",
    "Ferrari is a car company from",
    "The official language of Spain is",
)


@contextmanager
def _spinner(message: str) -> Iterator[None]:
    """Show that something is happening (a model load, say) on stderr; silent when not a terminal."""
    done = threading.Event()
    start = time.perf_counter()

    def spin() -> None:
        frames = "|/-\\"
        i = 0
        while not done.wait(0.2):
            sys.stderr.write(f"\r{message} {frames[i % 4]} {time.perf_counter() - start:4.0f} s")
            sys.stderr.flush()
            i += 1

    thread = threading.Thread(target=spin, daemon=True) if sys.stderr.isatty() else None
    if thread is None:
        sys.stderr.write(f"{message} ...\n")
    else:
        thread.start()
    try:
        yield
    finally:
        done.set()
        if thread is not None:
            thread.join()
            sys.stderr.write(f"\r{message} done in {time.perf_counter() - start:.1f} s\n")


def _load(args: argparse.Namespace) -> LoadedModel:
    with _spinner(f"loading {args.model} on {args.device} (the first load converts it, ~15 s)"):
        return load_model(args.model, device=args.device)


def _print_predictions(lm: LoadedModel, prompts: Sequence[str], k: int) -> None:
    for prompt, preds in zip(prompts, top_predictions(lm, prompts, k=k), strict=True):
        print(f"\n{prompt!r}")
        for token, prob in preds:
            print(f"   {prob:6.3f}  {token!r}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="bundled name, HF id or local folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")


def _cmd_demo(args: argparse.Namespace) -> int:
    lm = _load(args)
    print(f"{lm}\n\nWhat the model predicts next (top {args.k}):")
    _print_predictions(lm, args.prompts or DEMO_PROMPTS, args.k)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="load the bundled model and show what it knows")
    _add_common(parser)
    parser.add_argument("prompts", nargs="*", help="prompts to complete (default: a few fact prompts)")
    parser.add_argument("-k", type=int, default=5, help="how many next-token predictions to show")
    parser.set_defaults(func=_cmd_demo)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memit-lab", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, OSError, KeyError) as err:
        print(f"memit-lab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
