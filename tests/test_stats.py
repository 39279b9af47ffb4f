"""Key statistics E[k k^T]: exactness against a direct computation, the cache, resuming, bad inputs, corpora."""

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from memit_lab import LoadedModel, load_model
from memit_lab import stats as stats_module
from memit_lab.cache import write_manifest
from memit_lab.corpus import CORPORA, corpus_documents, corpus_windows
from memit_lab.stats import corpus_keys, key_second_moment, second_moment_convergence

TEXT = [
    "The Eiffel Tower is located in the city of Paris, the capital of France.",
    "Nintendo is a company from Japan; its games are played around the world.",
    "The Colosseum in Rome was built by the emperors of the Roman Empire.",
] * 6


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty cache root for the test."""
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    return tmp_path


def _direct_second_moment(lm: LoadedModel, layer: int, windows: list[torch.Tensor]) -> torch.Tensor:
    """E[k k^T] by a plain hook on W_out, a full forward pass per window, and float64 throughout."""
    seen: list[torch.Tensor] = []
    module = lm.model.get_submodule(lm.adapter.w_out_module(layer))
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for window in windows:
                lm.model(window[None])
    finally:
        handle.remove()
    keys = torch.cat(seen).double()
    return keys.T @ keys / len(keys)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """Record the arguments of every call to ``memit_lab.stats.<name>`` (still calling it)."""
    calls: list[Any] = []
    original = getattr(stats_module, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(stats_module, name, spy)
    return calls


def test_second_moment_equals_a_direct_computation(tiny_lm: LoadedModel) -> None:
    layers = [0, 2]
    got = key_second_moment(tiny_lm, layers, corpus=TEXT, n_tokens=200, seq_len=48, batch_size=3, use_cache=False)
    windows = corpus_windows(tiny_lm.tokenizer, TEXT, n_tokens=200, seq_len=48)
    assert sum(map(len, windows)) == 200 and len(windows[-1]) == 200 - 4 * 48
    for layer in layers:
        expected = _direct_second_moment(tiny_lm, layer, windows)
        assert got[layer].dtype == torch.float64 and got[layer].device.type == "cpu"
        assert torch.allclose(got[layer], expected, rtol=1e-5, atol=1e-7 * expected.abs().max())


def test_only_the_layers_needed_are_run(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load_model("tiny-gpt2")
    reached: list[int] = []
    for layer in range(lm.n_layers):
        block = lm.model.get_submodule(lm.adapter.block(layer))
        monkeypatch.setattr(block, "_forward_hooks", {**block._forward_hooks, -layer - 1: _mark(reached, layer)})
    key_second_moment(lm, [0], corpus=TEXT, n_tokens=32, use_cache=False, progress=False)
    assert reached == []  # not even block 0 finished: the pass stops right after W_out of layer 0
    key_second_moment(lm, [1, 0], corpus=TEXT, n_tokens=32, use_cache=False, progress=False)
    assert reached == [0]


def _mark(reached: list[int], layer: int) -> Callable[..., None]:
    def hook(*_: Any) -> None:
        reached.append(layer)

    return hook


def test_second_call_reads_the_cache_and_new_layers_are_added(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lm = load_model("tiny-llama")
    passes = _count_calls(monkeypatch, "_accumulate")
    first = key_second_moment(lm, [0, 1], corpus=TEXT, n_tokens=120, progress=False)
    again = key_second_moment(lm, [1, 0], corpus=TEXT, n_tokens=120, progress=False)
    assert len(passes) == 1
    assert all(torch.equal(first[layer], again[layer]) for layer in (0, 1))
    wider = key_second_moment(lm, [0, 1, 2], corpus=TEXT, n_tokens=120, progress=False)
    assert len(passes) == 2 and passes[1][1] == [2]  # only the missing layer was computed
    assert torch.equal(wider[0], first[0])
    # Each of these is a different statistic: a new pass, not a stale hit.
    key_second_moment(lm, [0], corpus=TEXT, n_tokens=121, progress=False)
    key_second_moment(lm, [0], corpus=TEXT[1:], n_tokens=120, progress=False)
    key_second_moment(lm, [0], corpus=TEXT, n_tokens=120, seq_len=32, progress=False)
    with torch.no_grad():
        lm.adapter.w_out_parameter(lm.model, 0).mul_(1.5)  # an edit changes the fingerprint
    key_second_moment(lm, [0], corpus=TEXT, n_tokens=120, progress=False)
    assert len(passes) == 6
    assert "damaged" not in caplog.text


def test_use_cache_false_writes_nothing(cache: Path) -> None:
    key_second_moment(load_model("tiny-gpt2"), [0], corpus=TEXT, n_tokens=64, use_cache=False, progress=False)
    assert _files(cache) == []


def _cached_file(cache: Path) -> Path:
    (path,) = [p for p in _files(cache) if p.name == "second_moment.safetensors"]
    return path


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "wrong_key", "nan_with_valid_manifest"])
def test_damaged_or_mismatched_cache_is_recomputed(
    cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    lm = load_model("tiny-neox")
    good = key_second_moment(lm, [1], corpus=TEXT, n_tokens=96, progress=False)[1]
    path = _cached_file(cache)
    if damage == "flip_bytes":  # same size, same mtime order: only a digest can tell
        data = bytearray(path.read_bytes())
        data[-64:] = bytes(64)
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "nan_with_valid_manifest":  # intact file, honest digest: only the finiteness check can tell
        poisoned = good.clone()
        poisoned[3, 5] = float("nan")
        save_file({"second_moment": poisoned}, path)
        meta = json.loads((path.parent / "memit_lab_manifest.json").read_text())
        write_manifest(path.parent, {k: v for k, v in meta.items() if k != "files"})
    else:  # an entry that claims another sample size
        manifest = path.parent / "memit_lab_manifest.json"
        meta = json.loads(manifest.read_text())
        meta["key"]["n_tokens"] = 95
        manifest.write_text(json.dumps(meta))
    passes = _count_calls(monkeypatch, "_accumulate")
    with caplog.at_level(logging.WARNING, logger="memit_lab.stats"):
        again = key_second_moment(lm, [1], corpus=TEXT, n_tokens=96, progress=False)[1]
    assert len(passes) == 1 and "recomputing" in caplog.text
    assert torch.equal(again, good)
    assert key_second_moment(lm, [1], corpus=TEXT, n_tokens=96, progress=False)[1].equal(good)  # repaired
    assert len(passes) == 1


def test_an_interrupted_run_resumes_from_its_checkpoint(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lm = load_model("tiny-qwen2")
    args: dict[str, Any] = dict(corpus=TEXT, n_tokens=160, seq_len=16, batch_size=2, progress=False)
    expected = key_second_moment(lm, [0, 2], use_cache=False, **args)  # 10 windows -> 5 batches
    forward = stats_module._forward
    calls: list[int] = []

    def interrupted(lm_: LoadedModel, ids: torch.Tensor) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        forward(lm_, ids)

    monkeypatch.setattr(stats_module, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        key_second_moment(lm, [0, 2], checkpoint_seconds=0.0, **args)
    assert [p.name for p in _files(cache) if p.suffix == ".safetensors"] == ["sums.safetensors"]
    calls.clear()
    monkeypatch.setattr(stats_module, "_forward", lambda lm_, ids: (calls.append(1), forward(lm_, ids)))
    resumed = key_second_moment(lm, [0, 2], checkpoint_seconds=0.0, **args)
    assert len(calls) == 2  # the 3 batches done before the interruption were not run again
    for layer in (0, 2):
        scale = expected[layer].abs().max()
        assert torch.allclose(resumed[layer], expected[layer], rtol=0, atol=1e-6 * scale)  # float32 products
    assert sorted(p.name for p in _files(cache) if p.suffix == ".safetensors") == ["second_moment.safetensors"] * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(layers=[3]), ValueError, r"not a layer index of this model \(0 to 2\)"),
        (dict(layers=[-1]), ValueError, "not a layer index"),
        (dict(layers=[]), ValueError, "layers is empty"),
        (dict(corpus=[]), ValueError, "the corpus is empty"),
        (dict(corpus=[""]), ValueError, "the corpus is empty"),
        (dict(corpus=["Paris."]), ValueError, "fewer than n_tokens=64"),
        (dict(corpus="no/such/file.txt"), ValueError, "neither a named corpus"),
        (dict(corpus=iter([3.5])), TypeError, "yields strings or rows"),
        (dict(n_tokens=0), ValueError, "n_tokens must be"),
        (dict(batch_size=0), ValueError, "batch_size"),
    ],
)
def test_bad_inputs_fail_clearly_and_write_nothing(
    cache: Path, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    call: dict[str, Any] = dict(layers=[0], corpus=TEXT, n_tokens=64, progress=False) | kwargs
    with pytest.raises(error, match=message):
        key_second_moment(load_model("tiny-gpt2"), **call)
    assert _files(cache) == []


def test_corpus_readers(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First text file.")
    (tmp_path / "b.jsonl").write_text('{"text": "Line one."}\n\n{"text": "Line two."}\n')
    assert list(corpus_documents(tmp_path / "a.txt")) == ["First text file."]
    assert list(corpus_documents(str(tmp_path))) == ["First text file.", "Line one.", "Line two."]
    assert list(corpus_documents(iter(["x", "y"]))) == ["x", "y"]
    rows = [{"body": "from a dataset row"}]  # what iterating a datasets.Dataset yields
    assert list(corpus_documents(rows, text_column="body")) == ["from a dataset row"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"no \.txt or \.jsonl"):
        list(corpus_documents(empty))


def _tokens(docs: Iterator[str], tokenizer: Any) -> int:
    return sum(len(tokenizer(d, add_special_tokens=False).input_ids) + 1 for d in docs)


def test_named_corpora_are_there_offline() -> None:
    tokenizer = load_model("tiny-gpt2").tokenizer
    assert set(CORPORA) == {"smollm2-samples", "python-docs"}
    default = list(corpus_documents())
    assert len(default) == 384 and all(d.strip() for d in default)
    assert default == list(corpus_documents("smollm2-samples"))
    docs = list(corpus_documents("python-docs"))
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    windows = corpus_windows(tokenizer, None, n_tokens=1000, seq_len=100)
    assert [len(w) for w in windows] == [100] * 10
    assert _tokens(iter(default[:3]), tokenizer) > 300


def test_windows_start_with_the_tokenizers_prefix() -> None:
    lm = load_model("tiny-llama")  # SentencePiece style: <s> before any text
    bos = lm.tokenizer.bos_token_id
    windows = corpus_windows(lm.tokenizer, TEXT, n_tokens=50, seq_len=20)
    assert [len(w) for w in windows] == [20, 20, 10] and all(int(w[0]) == bos for w in windows)
    assert int((torch.cat(windows) == bos).sum()) == 3  # documents are joined by EOS, not BOS


def test_convergence_snapshots_are_prefix_estimates() -> None:
    lm = load_model("tiny-gptj")
    conv = second_moment_convergence(lm, 1, corpus=TEXT, n_tokens=256, n_points=3, seq_len=16, progress=False)
    assert conv.tokens == (64, 128, 256) and conv.relative_error[-1] == 0.0
    prefix = key_second_moment(lm, [1], corpus=TEXT, n_tokens=64, seq_len=16, use_cache=False, progress=False)[1]
    assert torch.allclose(conv.estimates[0], prefix, rtol=1e-6)
    assert conv.relative_error[0] > conv.relative_error[1] > 0
    assert list(conv.to_frame().columns) == ["layer", "tokens", "relative_error"]


def test_corpus_keys_give_the_same_second_moment() -> None:
    lm = load_model("tiny-llama")
    keys = corpus_keys(lm, 2, corpus=TEXT, n_tokens=100).double()
    moment = key_second_moment(lm, 2, corpus=TEXT, n_tokens=100, use_cache=False, progress=False)[2]
    assert keys.shape == (100, lm.d_mlp)
    assert torch.allclose(keys.T @ keys / 100, moment, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_bundled_model_statistics_match_a_full_pass(smollm: LoadedModel) -> None:
    windows = corpus_windows(smollm.tokenizer, None, n_tokens=256, seq_len=128)
    got = key_second_moment(smollm, [3, 5], n_tokens=256, use_cache=False, progress=False)
    for layer in (3, 5):
        expected = _direct_second_moment(smollm, layer, windows)
        assert torch.allclose(got[layer], expected, rtol=1e-4, atol=1e-6 * expected.abs().max())
        eigenvalues = torch.linalg.eigvalsh(got[layer])
        assert eigenvalues.min() > -1e-6 * eigenvalues.max()  # a second moment is positive semidefinite
