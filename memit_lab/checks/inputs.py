"""Seeded inputs that several assignments' checks share: generators, matrices, real keys."""

from __future__ import annotations

import torch

from ..models import load_model
from ..stats import corpus_keys

#: the bundled model the checks end on (facts it knows)
BUNDLED = "smollm2-135m"


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every random input of a check comes from one."""
    return torch.Generator().manual_seed(seed)


def spd(d: int, g: torch.Generator, condition: float = 1e3) -> torch.Tensor:
    """A random symmetric positive definite ``[d, d]`` matrix (float64) with the given condition number."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, float(torch.log10(torch.tensor(condition))), d, dtype=torch.float64)
    return (q * eigenvalues) @ q.T


def real_keys(model: str, layer: int, n: int) -> torch.Tensor:
    """``[d_mlp, n]`` keys (inputs of W_out) from the package's default corpus, as float64 columns."""
    return corpus_keys(load_model(model), layer, n_tokens=n, seq_len=64).double().T
