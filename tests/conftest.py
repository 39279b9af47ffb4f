"""Shared fixtures: tiny models of every family, and the bundled model loaded once per session."""

import pytest

from memit_lab import LoadedModel, load_model
from memit_lab.tiny import TINY_MODELS

TINY = sorted(TINY_MODELS)


@pytest.fixture(params=TINY)
def tiny_lm(request: pytest.FixtureRequest) -> LoadedModel:
    """Each tiny architecture in turn (fresh weights for every test)."""
    return load_model(request.param)


@pytest.fixture(scope="session")
def smollm() -> LoadedModel:
    """The bundled SmolLM2-135M model; tests must leave its weights as they found them."""
    return load_model("smollm2-135m")
