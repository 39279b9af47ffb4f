"""The key-value memory algebra (eq. 7-14) against brute-force least squares and closed forms."""

from typing import Any

import pytest
import torch

from memit_lab.kv_memory import (
    fit_memory,
    insertion_update,
    lambda_sweep,
    new_memory_error,
    old_memory_disturbance,
    rome_rank_one_update,
    single_key_update,
)

F64 = torch.float64


def _unchecked(fn: Any) -> Any:
    """The function without the test-time jaxtyping wrapper, whose shape check would fire first:
    these tests are about the function's own checks, the ones users get."""
    return getattr(fn, "__wrapped__", fn)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def _old_keys(g: torch.Generator, d_mlp: int, n: int, cond: float) -> torch.Tensor:
    """n keys whose covariance has condition number about cond**2 (singular values of K0 span cond)."""
    q, _ = torch.linalg.qr(_randn(g, d_mlp, d_mlp))
    spread = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d_mlp, dtype=F64)
    return q @ torch.diag(spread) @ _randn(g, d_mlp, n)


def _stacked_lstsq(k: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """argmin_W ||W K - M||_F by torch.linalg.lstsq on the stacked problem K^T W^T = M^T."""
    return torch.linalg.lstsq(k.T, m.T).solution.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize(
    ("d_model", "d_mlp", "n_old", "u", "lam", "cond"),
    [
        (5, 8, 30, 1, 1.0, 1.0),
        (6, 12, 40, 3, 1.0, 1e2),
        (4, 10, 25, 17, 1.0, 1.0),  # more new memories than key dimensions (u > d_mlp)
        (7, 16, 50, 5, 1.5e4, 1e3),  # the paper's lambda
        (5, 12, 40, 3, 1.0, 1e5),  # ill-conditioned: cond(C0) ~ 1e10
    ],
)
def test_insertion_update_equals_brute_force_least_squares(
    d_model: int, d_mlp: int, n_old: int, u: int, lam: float, cond: float
) -> None:
    g = torch.Generator().manual_seed(d_mlp * 100 + u)
    k0 = _old_keys(g, d_mlp, n_old, cond)
    m0 = _randn(g, d_model, d_mlp) @ k0 + 0.1 * _randn(g, d_model, n_old)  # noisy: W0 does not fit exactly
    w0 = _stacked_lstsq(k0, m0)  # eq. 7
    k1, m1 = _randn(g, d_mlp, u), _randn(g, d_model, u)
    # eq. 9-11 by brute force: weight the old rows by sqrt(lambda) (C0 = lambda K0 K0^T) and solve it all at once.
    root = lam**0.5
    w_brute = _stacked_lstsq(torch.cat([root * k0, k1], 1), torch.cat([root * m0, m1], 1))

    delta = insertion_update(m1 - w0 @ k1, k1, lam * k0 @ k0.T)

    assert delta.dtype == F64 and delta.shape == (d_model, d_mlp)
    assert _rel(w0 + delta, w_brute) < 1e-6
    assert _rel(delta, w_brute - w0) < 1e-6


def test_fit_memory_solves_the_normal_equations() -> None:
    g = torch.Generator().manual_seed(1)
    k, m = _randn(g, 6, 30), _randn(g, 4, 30)
    w = fit_memory(k, m)
    assert _rel(w, _stacked_lstsq(k, m)) < 1e-10
    assert _rel(w @ k @ k.T, m @ k.T) < 1e-10  # eq. 8
    # Fewer keys than dimensions: K K^T is singular, the ridge makes the answer unique.
    k_few, m_few = _randn(g, 6, 3), _randn(g, 4, 3)
    ridge = fit_memory(k_few, m_few, ridge=1e-3)
    expected = m_few @ k_few.T @ torch.linalg.inv(k_few @ k_few.T + 1e-3 * torch.eye(6, dtype=F64))
    assert _rel(ridge, expected) < 1e-8


def test_a_tiny_c0_writes_new_memories_exactly_and_a_huge_one_keeps_the_old() -> None:
    g = torch.Generator().manual_seed(2)
    w0, k1, m1 = _randn(g, 5, 9), _randn(g, 9, 3), _randn(g, 5, 3)
    c = _randn(g, 9, 40)
    c = c @ c.T / 40
    sweep = lambda_sweep(w0, k1, m1, c, [1e-8, 1e-2, 1.0, 1e2, 1e8])
    assert sweep.new_error[0] < 1e-6 and sweep.new_error[-1] > 0.999
    assert sweep.old_disturbance[-1] < 1e-6
    # The trade-off is monotone: more weight on old memories writes the new ones less.
    assert list(sweep.new_error) == sorted(sweep.new_error)
    assert list(sweep.old_disturbance) == sorted(sweep.old_disturbance, reverse=True)
    assert list(sweep.to_frame().columns) == ["lambda", "new_error", "old_disturbance"]


def test_disturbance_is_the_rms_change_on_old_keys() -> None:
    g = torch.Generator().manual_seed(3)
    w0, delta, k0 = _randn(g, 4, 6), _randn(g, 4, 6), _randn(g, 6, 500)
    direct = torch.sqrt(((delta @ k0) ** 2).sum() / ((w0 @ k0) ** 2).sum())
    assert old_memory_disturbance(w0, delta, k0 @ k0.T) == pytest.approx(float(direct), rel=1e-12)
    assert old_memory_disturbance(w0, delta, 7.0 * k0 @ k0.T) == pytest.approx(float(direct), rel=1e-12)


def _one_key_problem(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w, k, v, keys = _randn(g, 5, 8), _randn(g, 8), _randn(g, 5), _randn(g, 8, 60)
    return w, k, v, keys @ keys.T / 60


def test_one_new_memory_gives_a_rank_one_update_along_c0_inverse_k() -> None:
    w, k, v, c = _one_key_problem(4)
    c0 = 3.0 * c
    delta = insertion_update((v - w @ k)[:, None], k[:, None], c0)
    assert _rel(single_key_update(v - w @ k, k, c0), delta) < 1e-12  # Sherman-Morrison
    s = torch.linalg.svdvals(delta)
    assert s[1] / s[0] < 1e-12
    direction = torch.linalg.solve(c0, k)
    right = torch.linalg.svd(delta).Vh[0]
    assert abs(float(right @ direction / direction.norm())) == pytest.approx(1.0, abs=1e-12)


def test_rome_update_is_the_least_disturbing_exact_write() -> None:
    w, k, v, c = _one_key_problem(5)
    delta = rome_rank_one_update(w, k, v, c)
    assert _rel((w + delta) @ k, v) < 1e-12
    # Independent closed form: per row, min d^T C d subject to d . k = r_i, solved as a KKT system.
    d = k.shape[0]
    kkt = torch.zeros(d + 1, d + 1, dtype=F64)
    kkt[:d, :d], kkt[:d, d], kkt[d, :d] = 2 * c, k, k
    rhs = torch.zeros(d + 1, w.shape[0], dtype=F64)
    rhs[d] = v - w @ k
    assert _rel(delta, torch.linalg.solve(kkt, rhs)[:d].T) < 1e-10
    # Any other exact write (add E with E k = 0) disturbs old keys more.
    g = torch.Generator().manual_seed(6)
    e = _randn(g, 5, 8)
    e -= torch.outer(e @ k, k) / (k @ k)
    assert old_memory_disturbance(w, delta + 0.01 * e, c) > old_memory_disturbance(w, delta, c)


def test_eq_14_tends_to_rome_as_lambda_goes_to_zero() -> None:
    w, k, v, c = _one_key_problem(7)
    rome = rome_rank_one_update(w, k, v, c)
    gaps = [_rel(single_key_update(v - w @ k, k, lam * c), rome) for lam in (1.0, 1e-2, 1e-4, 1e-6, 1e-8)]
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[0] > 0.01 and gaps[-1] < 1e-6
    # The scale of C does not change ROME's update.
    assert _rel(rome_rank_one_update(w, k, v, 1e3 * c), rome) < 1e-10


def test_float32_inputs_give_a_float64_update() -> None:
    w, k, v, c = (t.float() for t in _one_key_problem(8))
    assert insertion_update((v - w @ k)[:, None], k[:, None], c).dtype == F64
    assert rome_rank_one_update(w, k, v, c).dtype == F64


def test_new_memory_error_measures_the_unwritten_fraction() -> None:
    w0, k, v = torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)[:, :2], torch.ones(2, 2, dtype=F64)
    half = 0.5 * v @ k.T
    assert new_memory_error(w0, half, k, v) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="nothing to write"):
        new_memory_error(w0, half, k, torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize(
    ("residuals", "keys", "c0", "message"),
    [
        (torch.ones(4, 2), torch.ones(6, 3), torch.eye(6), "same u"),
        (torch.ones(4), torch.ones(6, 1), torch.eye(6), "same u"),
        (torch.ones(4, 2), torch.ones(6, 2), torch.eye(5), r"\[6, 6\]"),
        (torch.full((4, 2), float("nan")), torch.ones(6, 2), torch.eye(6), "residuals has NaN"),
        (torch.ones(4, 2), torch.ones(6, 2), torch.full((6, 6), float("inf")), "c0 has NaN"),
    ],
)
def test_insertion_update_rejects_bad_inputs(
    residuals: torch.Tensor, keys: torch.Tensor, c0: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _unchecked(insertion_update)(residuals, keys, c0)


def test_rank_one_helpers_reject_bad_inputs() -> None:
    w, k, v, c = _one_key_problem(9)
    with pytest.raises(ValueError, match="w must be"):
        _unchecked(rome_rank_one_update)(w.T, k, v, c)
    with pytest.raises(ValueError, match="not positive"):
        rome_rank_one_update(w, torch.zeros_like(k), v, c)
    with pytest.raises(ValueError, match="has NaN"):
        rome_rank_one_update(w, k, v * float("nan"), c)
    with pytest.raises(ValueError, match="residual must be"):
        _unchecked(single_key_update)(v[:, None], k, c)
    # A = 0 is singular under any rounding; LU does not always catch a rank-one K K^T, which rounds to full rank.
    with pytest.raises(ValueError, match="singular"):
        insertion_update((v - w @ k)[:, None], torch.zeros_like(k)[:, None], torch.zeros_like(c))
    with pytest.raises(ValueError, match="lambdas"):
        lambda_sweep(w, k[:, None], v[:, None], c, [0.0])
