"""Loading: the bundled model through its cache, any local folder, tiny models, and clear errors."""

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from memit_lab import LoadedModel, ModelNotFoundError, UnsupportedArchitectureError, load_model
from memit_lab.cache import MANIFEST, cache_root, read_manifest, write_manifest
from memit_lab.models import BUNDLED_MODELS, _gguf_path, bundled_copy
from memit_lab.prompts import top_predictions

EIFFEL = "The Eiffel Tower is located in the city of"


def test_bundled_model_knows_the_eiffel_tower(smollm: LoadedModel) -> None:
    assert (smollm.n_layers, smollm.d_model, smollm.d_mlp, smollm.adapter.name) == (30, 576, 1536, "llama")
    (token, prob), *_ = top_predictions(smollm, [EIFFEL])[0]
    assert token == " Paris" and prob > 0.5


def test_cached_copy_is_bit_identical_to_the_gguf_load(smollm: LoadedModel) -> None:
    gguf = _gguf_path(BUNDLED_MODELS["smollm2-135m"])
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = smollm.tokenizer(EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm.model(ids).logits)
    assert read_manifest(bundled_copy(), full_check=True) is not None


def test_damaged_cache_is_detected_and_rebuilt(
    smollm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = bundled_copy()
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    copy = cache_root() / "models" / good.name
    shutil.copytree(good, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as handle:  # flip bytes in the middle: the header still parses
        handle.seek(weights.stat().st_size // 2)
        handle.write(b"\xff" * 64)
    os.utime(weights)
    assert read_manifest(copy) is None
    lm = load_model("smollm2-135m")
    assert read_manifest(copy, full_check=True) is not None
    ids = smollm.tokenizer(EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, smollm.model(ids).logits)


def test_truncated_file_fails_the_manifest(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    write_manifest(tmp_path)
    assert read_manifest(tmp_path) is not None
    (tmp_path / "a.bin").write_bytes(b"x" * 50)
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST).write_text("{not json")
    assert read_manifest(tmp_path) is None


def test_local_folder_loads(tmp_path: Path) -> None:
    tiny = load_model("tiny-qwen2")
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    ids = tiny.tokenizer(EIFFEL, return_tensors="pt").input_ids
    assert lm.adapter.name == "qwen2"
    assert torch.equal(lm.model(ids).logits, tiny.model(ids).logits)


def test_tiny_models_are_seeded() -> None:
    a, b = load_model("tiny-neox"), load_model("tiny-neox")
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_unknown_name_says_it_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache"):
        load_model("nobody/no-such-model")


def test_unsupported_architecture_lists_supported(tmp_path: Path) -> None:
    config = OPTConfig(num_hidden_layers=1, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=600)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    load_model("tiny-gpt2").tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"'opt'.*gpt2, gptj, gpt_neox, llama"):
        load_model(str(tmp_path))


def test_weights_are_frozen_and_in_eval(tiny_lm: LoadedModel) -> None:
    assert not tiny_lm.model.training
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())


def test_fingerprint_changes_when_a_weight_changes() -> None:
    lm = load_model("tiny-gpt2")
    before = lm.fingerprint()
    with torch.no_grad():
        lm.adapter.w_out_weight(lm.model, 1).add_(1e-3)
    assert lm.fingerprint() != before
