"""The MLP's output matrix as a linear key-value memory, and how to write new memories into it (eq. 7-15).

MEMIT reads W_out^l (``[d_model, d_mlp]``) as a linear associative memory: a key k (the
input of W_out, ``[d_mlp]``) is mapped to a value m = W k (``[d_model]``). Keys and values
are stacked as columns: K is ``[d_mlp, n]``, M is ``[d_model, n]``.

* eq. 7-8: pretraining left W0 = argmin_W ||W K0 - M0||^2, so W0 K0 K0^T = M0 K0^T
  (:func:`fit_memory`).
* eq. 9-14: writing u new pairs (K1, M1) while keeping the old ones gives
  Delta = R K1^T (C0 + K1 K1^T)^-1 with R = M1 - W0 K1 (:func:`insertion_update`).
* eq. 15: C0 = K0 K0^T is not known; it is estimated as lambda * E[k k^T] over generic text
  (:func:`memit_lab.stats.key_second_moment`).
* ROME is the single-key case written as an equality constraint: the new pair is stored
  exactly, and among the updates that do so the one that disturbs the old keys least
  (in C's metric) is Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k) (:func:`rome_rank_one_update`).
  Eq. 14 with u = 1 is the same rank-one direction C0^-1 k (Sherman-Morrison,
  :func:`single_key_update`) and tends to ROME's update as lambda -> 0.

How good an update is: :func:`new_memory_error` (how much of the wanted change to the new
values is still missing) and :func:`old_memory_disturbance` (how much the outputs on old
keys move); :func:`lambda_sweep` traces the trade-off lambda sets between them.

All solves run in float64 with Cholesky / ``torch.linalg.solve``, never an explicit inverse.

Example:
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> w0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    >>> k1 = torch.randn(6, 2, generator=g, dtype=torch.float64)
    >>> m1 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    >>> delta = insertion_update(m1 - w0 @ k1, k1, 1e-9 * torch.eye(6, dtype=torch.float64))
    >>> bool(torch.allclose((w0 + delta) @ k1, m1))  # tiny C0: the new pairs are written exactly
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float

__all__ = [
    "LambdaSweep",
    "fit_memory",
    "insertion_update",
    "lambda_sweep",
    "new_memory_error",
    "old_memory_disturbance",
    "rome_rank_one_update",
    "single_key_update",
]


def _check_finite(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{name} has NaN or infinite entries; check the keys/values that produced it")


def _check_square(name: str, c: torch.Tensor, d: int) -> None:
    if c.ndim != 2 or c.shape != (d, d):
        raise ValueError(f"{name} must be [d_mlp, d_mlp] = [{d}, {d}] to match the keys, got {list(c.shape)}")


def _spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with A X = B for a symmetric positive (semi)definite A, in float64.

    Cholesky when A is positive definite (the usual case); ``torch.linalg.solve`` (LU)
    when rounding makes it fail, so a nearly singular A still gets the best answer
    floating point allows rather than an error.
    """
    a = (a + a.T) / 2  # exact symmetry: float sums of K K^T can differ in the last bit
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    try:
        return torch.linalg.solve(a, b)
    except torch.linalg.LinAlgError:
        raise ValueError(
            "the system matrix is singular: C0 (or C) must be positive definite, or the keys must span the space; "
            "use more tokens for the statistics or a larger lambda"
        ) from None


def fit_memory(
    keys: Float[torch.Tensor, "d_mlp n"],
    values: Float[torch.Tensor, "d_model n"],
    *,
    ridge: float = 0.0,
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """The least-squares memory W0 = argmin_W ||W K - M||^2 + ridge ||W||^2 (eq. 7).

    Solves the normal equations W (K K^T + ridge I) = M K^T (eq. 8) in float64. With
    fewer keys than ``d_mlp`` (n < d_mlp) K K^T is singular and W is not unique: pass
    ``ridge > 0`` for the minimum-norm-like regularised answer.

    Example:
        >>> import torch
        >>> k = torch.randn(3, 10, dtype=torch.float64)
        >>> w = torch.randn(2, 3, dtype=torch.float64)
        >>> bool(torch.allclose(fit_memory(k, w @ k), w))
        True
    """
    if keys.ndim != 2 or values.ndim != 2 or keys.shape[1] != values.shape[1]:
        raise ValueError(
            f"keys must be [d_mlp, n] and values [d_model, n] with the same n, got {list(keys.shape)} and "
            f"{list(values.shape)}"
        )
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    _check_finite(keys=keys, values=values)
    k, m = keys.double(), values.double()
    gram = k @ k.T + ridge * torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    # W gram = M K^T  <=>  gram W^T = K M^T (gram is symmetric)
    return _spd_solve(gram, k @ m.T).T


def insertion_update(
    residuals: Float[torch.Tensor, "d_model u"],
    keys: Float[torch.Tensor, "d_mlp u"],
    c0: Float[torch.Tensor, "d_mlp d_mlp"],
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """MEMIT's batch update Delta = R K1^T (C0 + K1 K1^T)^-1 (eq. 14).

    It minimises ||(W0 + Delta) K0 - M0||^2 + ||(W0 + Delta) K1 - M1||^2 given that W0 already
    solves the old problem (eq. 9-13); C0 = K0 K0^T stands for the old keys (eq. 15:
    lambda * E[k k^T], lambda already multiplied in).

    Args:
        residuals: R = M1 - W0 K1, what the new values still lack, ``[d_model, u]``.
        keys: the new keys K1 as columns, ``[d_mlp, u]``.
        c0: C0, symmetric positive semidefinite ``[d_mlp, d_mlp]``.

    Returns:
        Delta in float64, ``[d_model, d_mlp]``, on the inputs' device (add it to W_out in the
        weights' dtype).

    Example:
        >>> import torch
        >>> r, k = torch.ones(2, 1), torch.tensor([[1.0], [0.0], [0.0]])
        >>> insertion_update(r, k, torch.eye(3))  # (C0 + k k^T)^-1 k = k / 2
        tensor([[0.5000, 0.0000, 0.0000],
                [0.5000, 0.0000, 0.0000]], dtype=torch.float64)
    """
    if residuals.ndim != 2 or keys.ndim != 2 or residuals.shape[1] != keys.shape[1]:
        raise ValueError(
            f"residuals must be [d_model, u] and keys [d_mlp, u] with the same u (one column per new memory), "
            f"got {list(residuals.shape)} and {list(keys.shape)}"
        )
    _check_square("c0", c0, keys.shape[0])
    _check_finite(residuals=residuals, keys=keys, c0=c0)
    k = keys.double()
    c0 = c0.to(device=k.device, dtype=torch.float64)
    # Delta (C0 + K K^T) = R K^T  <=>  (C0 + K K^T) Delta^T = K R^T
    return _spd_solve(c0 + k @ k.T, k @ residuals.to(k.device).double().T).T


def single_key_update(
    residual: Float[torch.Tensor, " d_model"],
    key: Float[torch.Tensor, " d_mlp"],
    c0: Float[torch.Tensor, "d_mlp d_mlp"],
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Eq. 14 for one new memory (u = 1), written as a rank-one update (Sherman-Morrison).

    (C0 + k k^T)^-1 k = C0^-1 k / (1 + k^T C0^-1 k), so
    Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k): a rank-one matrix along C0^-1 k, equal to
    ``insertion_update(r[:, None], k[:, None], c0)``. C0 must be positive definite.

    Example:
        >>> import torch
        >>> r, k = torch.ones(2), torch.tensor([1.0, 0.0, 0.0])
        >>> single_key_update(r, k, torch.eye(3))[:, 0]
        tensor([0.5000, 0.5000], dtype=torch.float64)
    """
    if residual.ndim != 1 or key.ndim != 1:
        raise ValueError(
            f"residual must be [d_model] and key [d_mlp], got {list(residual.shape)} and {list(key.shape)}"
        )
    _check_square("c0", c0, key.shape[0])
    _check_finite(residual=residual, key=key, c0=c0)
    k = key.double()
    u = _spd_solve(c0.to(device=k.device, dtype=torch.float64), k[:, None])[:, 0]
    return torch.outer(residual.to(k.device).double(), u) / (1 + k @ u)


def rome_rank_one_update(
    w: Float[torch.Tensor, "d_model d_mlp"],
    key: Float[torch.Tensor, " d_mlp"],
    value: Float[torch.Tensor, " d_model"],
    c: Float[torch.Tensor, "d_mlp d_mlp"],
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """ROME's equality-constrained rank-one update Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k).

    Among all Delta with (W + Delta) k = v exactly, it is the one that changes the outputs
    on old keys least on average: it minimises tr(Delta C Delta^T) = E||Delta k_old||^2
    when C = E[k k^T]. The same key k is used in C^-1 k and in the denominator (the
    reference code mixed an averaged key and a bare one there, which can make the divisor
    tiny; see reference-details.md). Eq. 14 with u = 1 and C0 = lambda C tends to this
    update as lambda -> 0. The scale of C does not matter.

    Args:
        w: the current W_out, ``[d_model, d_mlp]``.
        key: the key k of the memory to write, ``[d_mlp]``.
        value: the value v the memory must return for it, ``[d_model]``.
        c: the key covariance C (positive definite), ``[d_mlp, d_mlp]``.

    Returns:
        Delta in float64, ``[d_model, d_mlp]``.

    Example:
        >>> import torch
        >>> w, k, v = torch.zeros(2, 3), torch.tensor([2.0, 0.0, 0.0]), torch.tensor([1.0, -1.0])
        >>> rome_rank_one_update(w, k, v, torch.eye(3)) @ k.double()
        tensor([ 1., -1.], dtype=torch.float64)
    """
    if w.ndim != 2 or key.ndim != 1 or value.ndim != 1 or w.shape != (value.shape[0], key.shape[0]):
        raise ValueError(
            f"w must be [d_model, d_mlp], key [d_mlp] and value [d_model]; got {list(w.shape)}, "
            f"{list(key.shape)} and {list(value.shape)}"
        )
    _check_square("c", c, key.shape[0])
    _check_finite(w=w, key=key, value=value, c=c)
    k = key.double()
    u = _spd_solve(c.to(device=k.device, dtype=torch.float64), k[:, None])[:, 0]
    denominator = k @ u
    if not denominator > 0:
        raise ValueError("k^T C^-1 k is not positive: the key is zero or C is not positive definite")
    residual = value.to(k.device).double() - w.to(k.device).double() @ k
    return torch.outer(residual, u) / denominator


def new_memory_error(
    w0: Float[torch.Tensor, "d_model d_mlp"],
    delta: Float[torch.Tensor, "d_model d_mlp"],
    keys: Float[torch.Tensor, "d_mlp u"],
    values: Float[torch.Tensor, "d_model u"],
) -> float:
    """How much of the new memories is not written: ||(W0 + Delta) K1 - M1||_F / ||M1 - W0 K1||_F.

    0 when every new pair is stored exactly, 1 when the update did nothing for them.

    Example:
        >>> import torch
        >>> w0, k, v = torch.zeros(2, 3), torch.eye(3)[:, :1], torch.ones(2, 1)
        >>> new_memory_error(w0, torch.zeros(2, 3), k, v), new_memory_error(w0, v @ k.T, k, v)
        (1.0, 0.0)
    """
    w0, delta, k, m = w0.double(), delta.double().to(w0.device), keys.double(), values.double()
    wanted = torch.linalg.norm(m - w0 @ k)
    if wanted == 0:
        raise ValueError("the new values already equal W0 K1: there is nothing to write")
    return float(torch.linalg.norm((w0 + delta) @ k - m) / wanted)


def old_memory_disturbance(
    w0: Float[torch.Tensor, "d_model d_mlp"],
    delta: Float[torch.Tensor, "d_model d_mlp"],
    c: Float[torch.Tensor, "d_mlp d_mlp"],
) -> float:
    """Relative RMS change of the outputs on old keys: sqrt(tr(Delta C Delta^T) / tr(W0 C W0^T)).

    With C = E[k k^T] over the old keys this is sqrt(E||Delta k||^2 / E||W0 k||^2): the size of
    the change the update makes to an average old memory, relative to that memory's size.
    The scale of C cancels, so C = K0 K0^T works as well.

    Example:
        >>> import torch
        >>> w0 = torch.eye(2)
        >>> round(old_memory_disturbance(w0, 0.1 * w0, torch.eye(2)), 6)
        0.1
    """
    w0, delta, c = w0.double(), delta.double().to(w0.device), c.double().to(w0.device)
    return float(torch.sqrt(torch.trace(delta @ c @ delta.T) / torch.trace(w0 @ c @ w0.T)))


@dataclass(frozen=True)
class LambdaSweep:
    """Eq. 14 solved for several lambda: the trade-off between keeping old memories and writing new ones.

    Attributes:
        lambdas: the covariance weights (C0 = lambda * C).
        new_error: :func:`new_memory_error` for each lambda.
        old_disturbance: :func:`old_memory_disturbance` for each lambda.
    """

    lambdas: tuple[float, ...]
    new_error: tuple[float, ...]
    old_disturbance: tuple[float, ...]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"lambda": self.lambdas, "new_error": self.new_error, "old_disturbance": self.old_disturbance}
        )

    def plot(self, ax: Any = None) -> Any:
        """Both errors against lambda (log scale)."""
        import matplotlib.pyplot as plt
        import seaborn as sns

        if ax is None:
            _, ax = plt.subplots(figsize=(5.5, 3.5))
        long = self.to_frame().melt("lambda", var_name="measure", value_name="relative error")
        sns.lineplot(long, x="lambda", y="relative error", hue="measure", marker="o", ax=ax)
        ax.set(xscale="log", yscale="log", title="What lambda trades (eq. 14-15)")
        return ax


def lambda_sweep(
    w0: Float[torch.Tensor, "d_model d_mlp"],
    keys: Float[torch.Tensor, "d_mlp u"],
    values: Float[torch.Tensor, "d_model u"],
    c: Float[torch.Tensor, "d_mlp d_mlp"],
    lambdas: Sequence[float],
) -> LambdaSweep:
    """Solve eq. 14 with C0 = lambda * C for each lambda and measure both kinds of error.

    Args:
        w0: the memory before the update, ``[d_model, d_mlp]``.
        keys, values: the new pairs K1 ``[d_mlp, u]`` and M1 ``[d_model, u]``.
        c: second moment of the old keys, E[k k^T] (``[d_mlp, d_mlp]``).
        lambdas: positive weights.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> w0, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in [(3, 4), (4, 2), (3, 2)])
        >>> sweep = lambda_sweep(w0, k, v, torch.eye(4, dtype=torch.float64), [0.01, 100.0])
        >>> sweep.new_error[0] < sweep.new_error[1], sweep.old_disturbance[0] > sweep.old_disturbance[1]
        (True, True)
    """
    if not lambdas or min(lambdas) <= 0:
        raise ValueError(f"lambdas must be a non-empty list of positive weights, got {list(lambdas)}")
    residuals = values.double() - w0.double() @ keys.double()
    deltas = [insertion_update(residuals, keys, lam * c.double()) for lam in lambdas]
    return LambdaSweep(
        tuple(float(lam) for lam in lambdas),
        tuple(new_memory_error(w0, d, keys, values) for d in deltas),
        tuple(old_memory_disturbance(w0, d, c) for d in deltas),
    )
