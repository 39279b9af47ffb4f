"""The ``memit-lab`` command line: ``memit-lab demo`` is the first thing a newcomer runs.

Each sub-command is one ``_cmd_*`` function plus its ``_add_*`` argument block; the
logic lives in the library, the CLI only parses, calls and prints.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


#: The fact the tour traces: (prompt, subject).
DEMO_TRACE = ("The Eiffel Tower is located in the city of", "Eiffel Tower")


def _tour_trace(lm: LoadedModel, samples: int) -> None:
    from .tracing import trace

    prompt, subject = DEMO_TRACE
    window = min(10, lm.n_layers)
    result = trace(lm, prompt, subject, kind="mlp", window=window, samples=samples)
    start, end = result.subject_span
    effect = result.indirect_effect  # [layer, pos]
    # The token where restoring MLPs helps most: on the bundled model not the last subject token, where the
    # effect is about zero (a newcomer would read "nowhere").
    strongest = start + int(effect[:, start:end].max(dim=0).values.argmax())
    print(
        f"\n2. Where is the fact? Causal tracing of {prompt!r} -> {result.target!r} (ROME section 2.1):\n"
        f"   P clean {result.clean_prob:.3f}; subject {subject!r} corrupted with noise: {result.corrupted_prob:.3f}.\n"
        f"   Restoring the MLP outputs of {window} layers around layer l at one subject token brings back"
        " (P restored - P corrupted):"
    )
    for pos in sorted({strongest, end - 1}):
        roles = [name for name, at in (("strongest", strongest), ("last", end - 1)) if at == pos]
        print(f"   at {result.tokens[pos]!r} ({' and '.join(roles)} subject token):")
        row = effect[:, pos].tolist()
        for lo in range(0, len(row), 10):
            print("   " + "  ".join(f"l{layer:<2d} {e:+.2f}" for layer, e in enumerate(row[lo : lo + 10], start=lo)))
    single = trace(lm, prompt, subject, kind="mlp", window=1, samples=samples, positions=[strongest])
    _say_what_the_trace_shows(
        effect[:, strongest].tolist(), single.indirect_effect[:, strongest].tolist(), result.tokens[strongest], window
    )


def _say_what_the_trace_shows(effect: list[float], single: list[float], token: str, window: int) -> None:
    """The peak, and whether it comes from windows that hold MLP 0 (the layer-0 confound), with single layers."""
    from .tracing import restored_window

    n = len(effect)
    peak = max(range(n), key=effect.__getitem__)
    print(f"   The largest effect is at {token!r}, l{peak}: {effect[peak]:+.2f}.", end="")
    without_0 = [layer for layer in range(n) if 0 not in restored_window(layer, window, n)]
    if 0 not in restored_window(peak, window, n) or not without_0:
        print(" Those MLPs carry part of what the corrupted subject lost.")
        return
    best = max(without_0, key=effect.__getitem__)
    window_best = restored_window(best, window, n)
    above = max(range(1, n), key=single.__getitem__)
    print(
        f"\n   Every window up to l{without_0[0] - 1} holds MLP 0; the best window without it (l{best}, layers "
        f"{window_best[0]}-{window_best[-1]}) brings back {effect[best]:+.2f}.\n"
        f"   One layer at a time at {token!r}: MLP 0 alone brings back {single[0]:+.2f}, the best other layer "
        f"(MLP {above}) {single[above]:+.2f}.\n"
        "   MLP 0 reads little more than the corrupted embedding, so restoring its output undoes much of the\n"
        "   corruption itself: windows that hold it do not show where the fact is recalled (the layer-0 confound)."
    )


def _tour_edit(lm: LoadedModel, args: argparse.Namespace) -> None:
    from .datasets import load_factset
    from .experiments import edit_demo
    from .hparams import MemitHyperParams, default_layers
    from .layer_choice import NoTraceableFactsError, recommend_layers

    # A model without measured defaults gets R from this trace (the registry's defaults would trace again).
    measured = MemitHyperParams.measured(lm)
    n = len(measured.layers) if measured else len(default_layers(lm.n_layers))
    try:
        rec = recommend_layers(lm, n=n, samples=args.samples)
    except NoTraceableFactsError as err:
        layers = measured.layers if measured else default_layers(lm.n_layers)
        print(f"\n3. Which layers to edit? Tracing the known facts failed ({err}); using {layers}.")
    else:
        layers = rec.layers
        note = f"; measured default {measured.layers[0]}-{measured.layers[-1]}" if measured else ""
        print(
            f"\n3. Which layers to edit? Averaged over {rec.per_fact.shape[0]} known facts, the {rec.n} MLP layers "
            f"that bring back the most are R = {layers[0]}-{layers[-1]} (effect {float(rec.effect.max()):.2f}){note}."
        )
        if 0 in layers:
            print(
                "   That R holds MLP 0: by step 2, part of its effect can be the corrupted token's identity rather\n"
                "   than the fact. Measured defaults are checked by edit quality (memit_lab.hparams.MODEL_DEFAULTS)."
            )
    defaults = measured or MemitHyperParams(tuple(layers))
    records = load_factset(known=True, n=args.edits)
    hparams = defaults.replace(layers=layers, stats_tokens=args.stats_tokens or defaults.stats_tokens)
    print(f"\n4. MEMIT writes {len(records)} counterfactuals at once into layers {layers} (Algorithm 1) ...")
    demo = edit_demo(lm, records, "memit", hparams=hparams)
    print("\n" + demo.report().rstrip())
    print("\nThe model is back as it was. Next: `memit-lab eval`, `memit-lab edit`, or `make lab` for the notebooks.")


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.edits < 1 or args.samples < 1 or (args.stats_tokens is not None and args.stats_tokens < 1):
        raise ValueError("--edits, --samples and --stats-tokens must be at least 1")
    lm = _load(args)
    print(f"{lm}\n\n1. What the model predicts next (top {args.k}):")
    _print_predictions(lm, args.prompts or DEMO_PROMPTS, args.k)
    if args.no_tour:
        return 0
    _tour_trace(lm, args.samples)
    _tour_edit(lm, args)
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="the tour: what the model knows, where a fact lives, which layers to edit, a batch edited and scored",
    )
    _add_common(parser)
    parser.add_argument("prompts", nargs="*", help="prompts to complete (default: a few fact prompts)")
    parser.add_argument("-k", type=int, default=5, help="how many next-token predictions to show")
    parser.add_argument("--edits", type=int, default=10, help="known facts of the fact set to rewrite at once")
    parser.add_argument("--samples", type=int, default=3, help="noise draws per causal-tracing cell")
    parser.add_argument("--stats-tokens", type=int, default=None, help="tokens of text for E[k k^T] (default 20,000)")
    parser.add_argument("--no-tour", action="store_true", help="only show the predictions (step 1)")
    parser.set_defaults(func=_cmd_demo)


def _cmd_trace(args: argparse.Namespace) -> int:
    # Imported here: plotting libraries would slow every other command's start.
    from tqdm import tqdm

    from .tracing import trace
    from .tracing_plots import plot_trace

    lm = _load(args)
    with tqdm(total=100, desc=f"tracing {args.kind}", unit="%", file=sys.stderr) as bar:
        result = trace(
            lm, args.prompt, args.subject, args.target, kind=args.kind, window=args.window, samples=args.samples,
            seed=args.seed, severed=args.severed, on_progress=lambda done: bar.update(round(100 * done) - bar.n),
        )  # fmt: skip
    print(
        f"P({result.target!r}) clean {result.clean_prob:.3f}, corrupted {result.corrupted_prob:.3f} "
        f"(noise {result.noise:.3f} on {result.tokens[slice(*result.subject_span)]}, {result.samples} samples)"
    )
    print(f"\nCells that bring back most of it (restoring {result.kind}):")
    print(result.peaks(args.top).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.out:
        plot_trace(result).savefig(args.out, dpi=150)
        print(f"\nfigure written to {args.out}")
    return 0


def _add_trace(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("trace", help="causal tracing: which states of the model carry a fact")
    _add_common(parser)
    parser.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    parser.add_argument("--subject", required=True, help="the subject as written in the prompt")
    parser.add_argument("--target", default=None, help="the object to trace (default: the model's top-1 token)")
    parser.add_argument("--kind", choices=["hidden", "mlp", "attn"], default="hidden", help="what to restore")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp / attn")
    parser.add_argument("--severed", choices=["mlp", "attn"], default=None, help="freeze later MLP or attention")
    parser.add_argument("--samples", type=int, default=10, help="noise draws averaged per cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--top", type=int, default=5, help="how many peak cells to print")
    parser.add_argument("--out", default=None, help="write the heatmap here (png, pdf, svg)")
    parser.set_defaults(func=_cmd_trace)


def _cmd_eval(args: argparse.Namespace) -> int:
    # Imported here, like trace's: pandas and the model code would slow every other command's start.
    from .datasets import load_factset, load_records
    from .methods import get_method

    method = get_method(args.method).name
    records: Sequence[Any]
    if args.n < 1 or (args.batch_size is not None and args.batch_size < 1):
        raise ValueError("--n and --batch-size must be at least 1")
    if args.data:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the loader's summary; printed below with every index
            loaded = load_records(args.data, snippets=args.snippets, n=args.n, strict=args.strict)
        if loaded.skipped:
            print(loaded.report(show=len(loaded.skipped)) + " Pass --strict to refuse such a file instead.")
        records = loaded
    else:
        records = load_factset(known=True if args.known_only else None)[: args.n]
    lm = _load(args)
    how = "together" if args.batch_size is None else f"in batches of {args.batch_size}, one after another"
    print(f"{len(records)} records from {args.data or 'the bundled fact set'}; editing them with {method} {how}")
    table = (
        _eval_together(lm, records, method, args)
        if args.batch_size is None
        else _eval_sequential(lm, records, method, args)
    )
    if args.out:
        Path(args.out).expanduser().parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(Path(args.out).expanduser())
        print(f"\ntable written to {args.out}")
    return 0


def _eval_together(lm: LoadedModel, records: Sequence[Any], method: str, args: argparse.Namespace) -> Any:
    """Every record edited in one batch, scored against the unedited model: the paper's Table 1 or 2."""
    import pandas as pd

    from .evaluate import summary_table, zsre_summary
    from .experiments import run_edits

    frames = {
        name: run_edits(lm, records, name, generation=args.generation, progress=sys.stderr.isatty())
        for name in ("unedited", method)
    }
    if "efficacy" in frames["unedited"].columns:
        table = pd.DataFrame({name: zsre_summary(frame) for name, frame in frames.items()}).T.round(1)
        print("\nzsRE (%, the paper's Table 1 columns):")
    else:
        table = summary_table(frames)
        print("\nCounterFact (%, the paper's Table 2 columns: S = harmonic mean of ES, PS, NS):")
    print(table.to_string())
    print(f"\nedit wall time: {frames[method].attrs['edit_seconds']:.1f} s for {len(records)} edits")
    return table


def _eval_sequential(lm: LoadedModel, records: Sequence[Any], method: str, args: argparse.Namespace) -> Any:
    """Batch after batch on the edited model, with the collapse diagnostics after each (one row per batch)."""
    from .datasets import CounterFactRecord
    from .sequential import Diagnostics, run_sequential

    if not all(isinstance(r, CounterFactRecord) for r in records):
        raise ValueError("--batch-size edits CounterFact-format records only (the fact set or a CounterFact file)")
    probes = Diagnostics.for_model(lm, generation=args.generation)
    result = run_sequential(
        lm, records, [method], batch_size=args.batch_size, diagnostics=probes, progress=sys.stderr.isatty()
    )
    table = result.to_frame().set_index(["method", "batch"])
    shown = [c for c in ("edits", "S", "ES", "PS", "NS", "ES_first", "NS_first", "perplexity", "GE") if c in table]
    drift = [c for c in table.columns if c.startswith(("w_change_", "sigma_max_"))]
    print("\nCollapse diagnostics after each batch (CounterFact %; *_first: the first batch alone):")
    print(table[shown].to_string(float_format=lambda x: f"{x:.1f}"))
    print("\nPer edited layer: ||W - W0|| / ||W0|| and the largest singular value of W - W0:")
    print(table[drift].to_string(float_format=lambda x: f"{x:.3f}"))
    print(f"\nedit wall time: {table.seconds.sum():.1f} s for {len(records)} edits")
    return table


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="edit n facts of a dataset and print the paper's scores")
    _add_common(parser)
    parser.add_argument("--data", default=None, help="CounterFact / MultiCounterFact or zsRE JSON (default: fact set)")
    parser.add_argument("--snippets", default=None, help="attribute_snippets.json for RS (CounterFact only)")
    parser.add_argument(
        "--strict", action="store_true", help="refuse a --data file with a malformed record (default: skip, report)"
    )
    parser.add_argument("--method", choices=_method_choices(), default="memit", help=_method_help())
    parser.add_argument("--n", type=int, default=100, help="edit the first n records (together, or see --batch-size)")
    parser.add_argument("--known-only", action="store_true", help="bundled fact set: only facts the model knows")
    parser.add_argument("--generation", type=int, default=0, help="GE/RS on the first this-many records (slow)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="edit sequentially, this many per batch, with collapse diagnostics"
    )
    parser.add_argument("--out", default=None, help="write the final table as CSV here")
    parser.set_defaults(func=_cmd_eval)


def _edit_probabilities(lm: LoadedModel, requests: Sequence[Any]) -> tuple[list[float], list[float | None]]:
    """P(new object) and P(true object, when given) after each request's prompt (mean per-token probability)."""
    from .evaluate import mean_nll

    texts = [r.text for r in requests]
    new = mean_nll(lm, texts, [r.target_new for r in requests])
    with_true = [i for i, r in enumerate(requests) if r.target_true]
    true: list[float | None] = [None] * len(requests)
    if with_true:
        nll = mean_nll(lm, [texts[i] for i in with_true], [requests[i].target_true for i in with_true])
        for i, value in zip(with_true, nll, strict=True):
            true[i] = float(math.exp(-value))
    return [float(math.exp(-v)) for v in new], true


def _save_edited(lm: LoadedModel, folder: Path) -> None:
    """safetensors weights + tokenizer that ``load_model(folder)`` reads; written beside, then moved in place."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    lm.model.save_pretrained(partial, safe_serialization=True)
    lm.tokenizer.save_pretrained(partial)
    partial.rename(folder)


def _cmd_edit(args: argparse.Namespace) -> int:
    # Imported here, like trace's: the editing code pulls in pandas and the statistics.
    import pandas as pd

    from .editing import NonFiniteUpdateError
    from .methods import apply_edits
    from .requests import check_requests, load_requests

    requests = load_requests(args.requests)
    out = Path(args.save_to).expanduser() if args.save_to else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--save-to {out} exists and is not an empty folder; choose a new folder")
    lm = _load(args)
    requests = check_requests(requests, lm.tokenizer)  # refused here, before anything is computed
    new_before, true_before = _edit_probabilities(lm, requests)
    start = time.perf_counter()
    try:
        apply_edits(lm, requests, args.method, progress=sys.stderr.isatty())
    except NonFiniteUpdateError as err:
        raise ValueError(f"{err} (the model was left unchanged)") from None
    seconds = time.perf_counter() - start
    new_after, true_after = _edit_probabilities(lm, requests)
    table = pd.DataFrame(
        {
            "prompt": [r.text for r in requests],
            "new": [r.target_new for r in requests],
            "P(new) before": new_before,
            "P(new) after": new_after,
            "true": [r.target_true or "-" for r in requests],
            "P(true) before": true_before,
            "P(true) after": true_after,
        }
    )
    print(f"{args.method}: {len(requests)} edits in {seconds:.1f} s\n")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}", na_rep="-"))
    if out is not None:
        _save_edited(lm, out)
        print(f"\nedited model written to {out}; load it with memit_lab.load_model({str(out)!r})")
    return 0


def _add_edit(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("edit", help="write facts from a JSON file into the model (any method of the registry)")
    _add_common(parser)
    parser.add_argument(
        "--requests", required=True, help='JSON list of {"prompt": "The capital of {} is", "subject", "target_new"}'
    )
    parser.add_argument("--method", choices=_method_choices(), default="memit", help=_method_help())
    parser.add_argument("--save-to", default=None, help="write the edited model (safetensors + tokenizer) here")
    parser.set_defaults(func=_cmd_edit)


def _method_choices() -> list[str]:
    """The registry's method names, and their aliases (``rome`` for ``rome-seq``)."""
    from .methods import ALIASES, method_names

    return [*method_names(), *ALIASES]


def _method_help() -> str:
    from .methods import METHODS

    return "how to edit: " + "; ".join(f"{m.name} = {m.description}" for m in METHODS.values())


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_trace, _add_eval, _add_edit]


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
