"""Sequential editing: batches equal edits applied by hand, restore bit for bit, diagnostics against brute force."""

import math

import pytest
import torch
from helpers import WeightSnapshot

from memit_lab import LoadedModel, load_model
from memit_lab.corpus import corpus_windows, smollm2_samples
from memit_lab.datasets import load_factset
from memit_lab.editing import edit_keys
from memit_lab.evaluate import counterfact_scores, counterfact_summary
from memit_lab.experiments import edit_request
from memit_lab.hparams import AlphaEditHyperParams, FtHyperParams, MemitHyperParams, RomeHyperParams
from memit_lab.methods import get_method
from memit_lab.sequential import (
    Diagnostics,
    _documents_read,
    edit_sequentially,
    held_out_texts,
    perplexity,
    run_sequential,
)
from memit_lab.stats import key_second_moment
from memit_lab.zopt import ZParams, context_templates

Z = ZParams(steps=4, lr=0.5, clamp=4.0, weight_decay=0.0, kl_weight=0.0, n_contexts=1, context_tokens=4)
TOKENS = 1024
HPARAMS = {
    "memit": MemitHyperParams((0, 1), lam=10.0, z=Z, stats_tokens=TOKENS),
    "alphaedit": AlphaEditHyperParams((0, 1), alpha=1e-2, threshold=1.0, z=Z, stats_tokens=TOKENS),
    "rome-seq": RomeHyperParams(layer=1, z=Z, stats_tokens=TOKENS),
    "ft": FtHyperParams(layer=1, steps=3, lr=1e-2),
}
PROBES = Diagnostics(texts=("Paris is the capital of France and a city of art.", "The Moon orbits the Earth."))


@pytest.fixture(scope="module")
def records() -> list:  # type: ignore[type-arg]
    return load_factset(n=4)


def _by_hand(lm: LoadedModel, batches: list[list], method: str, preserve: bool) -> None:  # type: ignore[type-arg]
    """The method applied batch after batch, the statistics and contexts of the unedited model, K_p summed by hand."""
    hp = HPARAMS[method]
    options = {}
    if method != "ft":
        layers = getattr(hp, "layers", None) or (hp.layer,)
        options["second_moments"] = key_second_moment(lm, layers, n_tokens=TOKENS, progress=False)
        options["contexts"] = context_templates(lm, Z.n_contexts, Z.context_tokens, seed=Z.context_seed)
    gram = None
    for batch in batches:
        requests = [edit_request(r) for r in batch]
        extra = {"preserved_keys": gram} if gram is not None else {}
        get_method(method)(lm, requests, hp, **options, **extra)
        if preserve:
            keys = {l: edit_keys(lm, requests, l, options["contexts"]).double() for l in hp.layers}  # noqa: E741
            written = {layer: k @ k.T for layer, k in keys.items()}
            gram = written if gram is None else {layer: gram[layer] + written[layer] for layer in gram}


@pytest.mark.parametrize(
    ("method", "preserve"), [("memit", True), ("memit", False), ("alphaedit", True), ("rome-seq", True), ("ft", True)]
)
def test_two_batches_equal_the_method_applied_twice_by_hand(method: str, preserve: bool, records: list) -> None:  # type: ignore[type-arg]
    lm = load_model("tiny-gpt2")
    saved = WeightSnapshot(lm)
    run = edit_sequentially(
        lm, records, method, batch_size=2, hparams=HPARAMS[method], preserve_keys=preserve, diagnostics=PROBES,
        progress=False,
    )  # fmt: skip
    edited = {k: v.clone() for k, v in lm.model.state_dict().items()}
    run.restore()
    assert saved.unchanged()
    _by_hand(lm, [records[:2], records[2:]], method, preserve and method in ("memit", "alphaedit"))
    changed = {k for k, v in lm.model.state_dict().items() if not torch.equal(v, saved.saved[k])}
    assert changed and all(torch.equal(lm.model.state_dict()[k], edited[k]) for k in saved.saved)
    assert list(run.to_frame().keys_preserved) == [preserve and method in ("memit", "alphaedit")] * 2


def test_every_method_runs_and_restores_bit_for_bit(tiny_lm: LoadedModel, records: list) -> None:  # type: ignore[type-arg]
    saved = WeightSnapshot(tiny_lm)
    result = run_sequential(
        tiny_lm, records, ("memit", "alphaedit", "rome-seq", "ft"), batch_size=2, hparams=HPARAMS, diagnostics=PROBES,
        progress=False,
    )  # fmt: skip
    assert saved.unchanged()
    frame = result.to_frame()
    # "ft" is an alias: the frame names the method it resolves to
    assert list(frame.method) == ["unedited"] + [m for m in ("memit", "alphaedit", "rome-seq", "ft-l") for _ in (1, 2)]
    assert list(frame.edits) == [0, 2, 4, 2, 4, 2, 4, 2, 4]
    assert frame.iloc[1:][["ES", "PS", "NS", "ES_first", "perplexity"]].notna().all().all()
    assert frame.w_change_0.isna().sum() == 1 + 4  # the unedited row, ROME and FT do not touch layer 0
    fig = result.plot()
    assert len(fig.axes) == 6


def test_diagnostics_match_a_brute_force_recomputation(records: list) -> None:  # type: ignore[type-arg]
    lm = load_model("tiny-llama")
    saved = WeightSnapshot(lm)
    run = edit_sequentially(lm, records, "memit", batch_size=2, hparams=HPARAMS["memit"], diagnostics=PROBES,
                            progress=False)  # fmt: skip
    last = run.to_frame().iloc[-1]
    for layer in (0, 1):
        name = lm.adapter.w_out_module(layer) + ".weight"
        w0, w = saved.saved[name].double(), lm.model.state_dict()[name].double()
        assert last[f"w_change_{layer}"] == pytest.approx(float(torch.norm(w - w0) / torch.norm(w0)), rel=1e-12)
        assert last[f"sigma_max_{layer}"] == pytest.approx(float(torch.linalg.svdvals(w - w0)[0]), rel=1e-9)
    losses = []
    for text in PROBES.texts:  # Hugging Face's own loss: mean next-token NLL of one text
        ids = lm.tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            losses.append((float(lm.model(ids, labels=ids).loss), ids.shape[1] - 1))
    expected = math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))
    assert last.perplexity == pytest.approx(expected, rel=1e-5)
    scores = counterfact_scores(lm, records, progress=False)
    for metric in ("S", "ES", "PS", "NS"):
        assert last[metric] == pytest.approx(counterfact_summary(scores)[metric])
        assert last[metric + "_first"] == pytest.approx(counterfact_summary(scores.iloc[:2])[metric])
    first = run.to_frame().iloc[0]
    assert first.ES_first == first.ES  # at batch 1 the first batch is every edit so far
    run.restore()
    assert saved.unchanged()


def test_held_out_texts_are_documents_the_statistics_never_read() -> None:
    lm = load_model("tiny-gpt2")
    documents = list(smollm2_samples())
    texts = held_out_texts(lm, 8, stats_tokens=2_000)
    read = _documents_read(lm.tokenizer, documents, 2_000)
    assert texts == tuple(documents[-8:]) and read + 8 <= len(documents)
    # the statistics' windows come out the same from the documents before the held-out ones alone
    full = corpus_windows(lm.tokenizer, None, n_tokens=2_000)
    alone = corpus_windows(lm.tokenizer, documents[:read], n_tokens=2_000)
    assert len(full) == len(alone) and all(torch.equal(a, b) for a, b in zip(full, alone, strict=True))
    with pytest.raises(ValueError, match="do not fit"):
        held_out_texts(lm, len(documents), stats_tokens=2_000)


def test_perplexity_refuses_texts_without_a_token_to_predict() -> None:
    with pytest.raises(ValueError, match="no token"):
        perplexity(load_model("tiny-gpt2"), ["a"], max_tokens=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2, "n": 5}, ValueError, "between 1 and 4"),
        ({"batch_size": 2, "n": 0}, ValueError, "between 1 and 4"),
        ({"batch_size": 2, "method": "mend"}, ValueError, "unknown editing method"),
        ({"batch_size": 2, "hparams": FtHyperParams(layer=1)}, TypeError, "MemitHyperParams"),
    ],
)
def test_bad_input_errors_before_anything_changes(kwargs: dict, error: type, match: str, records: list) -> None:  # type: ignore[type-arg]
    lm = load_model("tiny-gptj")
    saved = WeightSnapshot(lm)
    options = {"method": "memit", "diagnostics": PROBES, "progress": False} | kwargs
    with pytest.raises(error, match=match):
        edit_sequentially(lm, records, **options)
    method = options.pop("method")
    if "hparams" in options:
        options["hparams"] = {method: options["hparams"]}
    with pytest.raises(error, match=match):
        run_sequential(lm, records, (method,), **options)
    assert saved.unchanged()


def test_ft_w_is_refused_before_anything_changes() -> None:
    lm = load_model("tiny-gpt2")
    saved = WeightSnapshot(lm)
    with pytest.raises(ValueError, match="FT-W changes a whole block"):
        edit_sequentially(lm, load_factset(n=2), "ft-w", batch_size=1, progress=False)
    assert saved.unchanged()
