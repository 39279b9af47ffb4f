"""Shared fixtures: tiny models of every family, and the bundled model loaded once per session."""

from collections.abc import Iterator

import pytest
from helpers import WeightSnapshot

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


@pytest.fixture
def restored_smollm(smollm: LoadedModel) -> Iterator[LoadedModel]:
    """The bundled model, checked after the test to be bit for bit as it was before."""
    saved = WeightSnapshot(smollm)
    yield smollm
    assert saved.unchanged(), f"the test left changed weights: {sorted(saved.changed())[:5]}"
