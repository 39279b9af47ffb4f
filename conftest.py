"""Root conftest: runs before any memit_lab module is imported by the tests or doctests.

* Shapes: jaxtyping annotations in memit_lab are checked at run time (beartype) during
  the test suite only -- production code pays nothing for them.
* Offline: the hub is never contacted from tests.
* Determinism: one thread count and seeded RNGs for every test and doctest.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jaxtyping import install_import_hook

_hook = install_import_hook("memit_lab", "beartype.beartype")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
