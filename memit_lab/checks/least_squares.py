"""Checks of assignment 3, the MLP as a least-squares memory (eq. 7-15).

References: :mod:`memit_lab.kv_memory` (``fit_memory``, ``insertion_update``,
``single_key_update``, ``rome_rank_one_update``), on random float64 matrices and on the keys
and weights of tiny models.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch

from ..kv_memory import fit_memory, insertion_update, rome_rank_one_update, single_key_update
from ..models import load_model
from .answers import describe, relative_gap
from .core import Case, Property, exercise, no_properties
from .inputs import generator, real_keys, spd

__all__ = ["check_fit_memory", "check_insert_memories", "check_rank_one_update", "check_rome_update"]


# -- 3.1 the least-squares memory ---------------------------------------------------------------


@exercise(fit_memory)
def check_fit_memory() -> Iterator[Case]:
    """Exercise 3.1: ``fn(keys, values)`` -> W = argmin ||W K - M||^2 via the normal equations (eq. 7-8).

    ``keys`` is K ``[d_mlp, n]``, ``values`` M ``[d_model, n]`` (float64, n > d_mlp); the
    answer is ``[d_model, d_mlp]``. Property checked first: W K K^T = M K^T.
    """
    g = generator(31)
    inputs = []
    for d_mlp, n, d_model in ((6, 40, 3), (10, 200, 10), (16, 60, 5)):
        k = torch.randn(d_mlp, n, generator=g, dtype=torch.float64)
        m = torch.randn(d_model, n, generator=g, dtype=torch.float64)
        inputs.append((f"random K [{d_mlp}, {n}], M [{d_model}, {n}]", k, m))
    lm = load_model("tiny-gptj")
    keys = real_keys("tiny-gptj", 1, 400)
    w_out = lm.adapter.w_out_weight(lm.model, 1).detach().double()
    noise = 0.01 * torch.randn(w_out.shape[0], keys.shape[1], generator=g, dtype=torch.float64)
    inputs.append(("tiny-gptj layer-1 keys [256, 400], M = W_out K + noise", keys, w_out @ keys + noise))
    for name, k, m in inputs:
        expected = fit_memory(k, m)
        yield Case(
            name,
            (k.clone(), m.clone()),
            expected,
            hint="solve W (K K^T) = M K^T",
            mistakes={
                "transposed: W maps a key [d_mlp] to a value [d_model], so it is [d_model, d_mlp]": expected.T,
                "this is M K^T without the inverse of K K^T: solve W (K K^T) = M K^T": m @ k.T,
            },
            shape_hint="W must be [d_model, d_mlp]: values.shape[0] x keys.shape[0]",
            shape_first=True,
            before=partial(_solves_normal_equations, k, m),
            rtol=1e-6,
            atol=1e-8,
        )


def _solves_normal_equations(k: torch.Tensor, m: torch.Tensor, got: torch.Tensor) -> Iterator[Property]:
    gap = relative_gap((got.double() @ k) @ k.T, m @ k.T)
    yield Property(
        gap < 1e-6,
        "W with W K K^T = M K^T (the normal equations, eq. 8)",
        f"||W K K^T - M K^T|| / ||M K^T|| = {gap:.3g}",
        "solve the normal equations in float64 with torch.linalg.solve",
        answer=got,
    )


# -- 3.2 MEMIT's update with lambda -------------------------------------------------------------


@exercise(insertion_update)
def check_insert_memories() -> Iterator[Case]:
    """Exercise 3.2: ``fn(w0, k1, m1, key_moment, lam)`` -> MEMIT's update Delta (eq. 14-15).

    Delta = R K1^T (C0 + K1 K1^T)^-1 with R = M1 - W0 K1 and C0 = lam * key_moment. Property
    checked first: W0 + Delta is the brute-force least-squares memory for the old keys
    (whose K0 K0^T = C0) together with the new ones.
    """
    g = generator(32)
    for d_mlp, d_model, n0, u, lam in ((6, 4, 30, 2, 30.0), (8, 5, 50, 12, 50.0), (12, 12, 80, 3, 80.0)):
        k0 = torch.randn(d_mlp, n0, generator=g, dtype=torch.float64)
        m0 = torch.randn(d_model, n0, generator=g, dtype=torch.float64)
        k1 = torch.randn(d_mlp, u, generator=g, dtype=torch.float64)
        m1 = torch.randn(d_model, u, generator=g, dtype=torch.float64)
        moment = k0 @ k0.T / lam  # so lam * moment = K0 K0^T exactly
        name = f"random W0 [{d_model}, {d_mlp}], {u} new keys, lambda = {lam:g}"
        yield _update_case(name, fit_memory(k0, m0), k1, m1, moment, lam, (k0, m0))
    keys = real_keys("tiny-llama", 2, 600)
    lm = load_model("tiny-llama")
    w0 = lm.adapter.w_out_weight(lm.model, 2).detach().double()
    k1, k0 = keys[:, :4], keys[:, 4:]
    m1 = w0 @ k1 + torch.randn(w0.shape[0], 4, generator=g, dtype=torch.float64)
    moment = k0 @ k0.T / k0.shape[1]
    name = "tiny-llama layer 2: W_out, 4 new corpus keys, E[k k^T] over 596 others, lambda = 596"
    # W_out is not the exact least-squares memory of these keys, so only the reference comparison applies
    yield _update_case(name, w0, k1, m1, moment, float(k0.shape[1]), None)


def _update_case(
    name: str,
    w0: torch.Tensor,
    k1: torch.Tensor,
    m1: torch.Tensor,
    moment: torch.Tensor,
    lam: float,
    old: tuple[torch.Tensor, torch.Tensor] | None,
) -> Case:
    """One case of eq. 14; ``old`` = the old pairs (K0, M0) whose least-squares memory ``w0`` is, if it is one."""
    r = m1 - w0 @ k1
    expected = insertion_update(r, k1, lam * moment)
    return Case(
        name,
        (w0.clone(), k1.clone(), m1.clone(), moment.clone(), lam),
        expected,
        hint="Delta = R K1^T (C0 + K1 K1^T)^-1 (eq. 14)",
        mistakes={
            "lambda is missing: C0 = lam * key_moment (eq. 15)": insertion_update(r, k1, moment),
            "C0 was divided by lambda: C0 = lam * key_moment (eq. 15)": insertion_update(r, k1, moment / lam),
            "the new keys' own K1 K1^T is missing from the inverse: (C0 + K1 K1^T)^-1": insertion_update(
                r, k1, lam * moment - k1 @ k1.T
            )
            if k1.shape[1] < k1.shape[0]
            else None,
            "R is the residual M1 - W0 K1 (what the new values still lack), not M1 itself": insertion_update(
                m1, k1, lam * moment
            ),
            "transposed: Delta has W0's shape [d_model, d_mlp]": expected.T,
        },
        shape_hint="Delta has W0's shape [d_model, d_mlp]",
        shape_first=True,
        before=no_properties if old is None else partial(_joint_least_squares, w0, *old, k1, m1),
        rtol=1e-6,
        atol=1e-9,
    )


def _joint_least_squares(
    w0: torch.Tensor, k0: torch.Tensor, m0: torch.Tensor, k1: torch.Tensor, m1: torch.Tensor, got: torch.Tensor
) -> Iterator[Property]:
    brute = torch.linalg.lstsq(torch.cat([k0, k1], 1).T, torch.cat([m0, m1], 1).T).solution.T
    gap = relative_gap(w0 + got.double(), brute)
    yield Property(
        gap < 1e-6,
        "W0 + Delta = the least-squares memory of old and new pairs together (brute force, eq. 9-11)",
        f"relative distance {gap:.3g} from it",
        "Delta = R K1^T (C0 + K1 K1^T)^-1, solved in float64 (eq. 14)",
        answer=got,
    )


# -- 3.3 the rank-one form ------------------------------------------------------------------------


@exercise(single_key_update, insertion_update)
def check_rank_one_update() -> Iterator[Case]:
    """Exercise 3.3: ``fn(r, k, c0)`` -> eq. 14 for one key as a rank-one update (Sherman-Morrison).

    Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k), ``[d_model, d_mlp]``. Property checked first:
    Delta (C0 + k k^T) = r k^T, the normal equations of eq. 14 for u = 1.
    """
    g = generator(33)
    for d_model, d_mlp, condition in ((3, 5, 10.0), (6, 6, 1e3), (4, 20, 1e5)):
        r = torch.randn(d_model, generator=g, dtype=torch.float64)
        k = torch.randn(d_mlp, generator=g, dtype=torch.float64)
        c0 = spd(d_mlp, g, condition)
        expected = single_key_update(r, k, c0)
        u = torch.linalg.solve(c0, k)
        yield Case(
            f"random r [{d_model}], k [{d_mlp}], C0 with condition number {condition:g}",
            (r.clone(), k.clone(), c0.clone()),
            expected,
            hint="Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k)",
            mistakes={
                "the 1 + is missing from the denominator: that is ROME's equality-constrained update, which stores "
                "the new pair exactly; eq. 14 weighs it against C0": torch.outer(r, u) / (k @ u),
                "transposed: Delta = r (C0^-1 k)^T is [d_model, d_mlp]": expected.T,
                "the direction is C0^-1 k (solve C0 u = k), not k itself": torch.outer(r, k) / (1 + k @ k),
            },
            shape_hint="Delta is [d_model, d_mlp] = [len(r), len(k)]",
            shape_first=True,
            before=partial(_solves_eq14_for_one_key, r, k, c0),
            rtol=1e-6,
            atol=1e-10,
        )


def _solves_eq14_for_one_key(
    r: torch.Tensor, k: torch.Tensor, c0: torch.Tensor, got: torch.Tensor
) -> Iterator[Property]:
    gap = relative_gap(got.double() @ (c0 + torch.outer(k, k)), torch.outer(r, k))
    yield Property(
        gap < 1e-6,
        "Delta with Delta (C0 + k k^T) = r k^T (eq. 14 for one key)",
        f"||Delta (C0 + k k^T) - r k^T|| / ||r k^T|| = {gap:.3g}",
        "Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k)",
        answer=got,
    )


# -- 3.4 ROME's update ----------------------------------------------------------------------------


@exercise(rome_rank_one_update)
def check_rome_update() -> Iterator[Case]:
    """Exercise 3.4: ``fn(w, k, v, c)`` -> ROME's rank-one update with (W + Delta) k = v exactly.

    Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k). Properties checked first: the new pair is
    stored exactly, and Delta C x = 0 for every x orthogonal to k (it disturbs old keys as
    little as possible in C's metric).
    """
    g = generator(34)
    for d_model, d_mlp, condition in ((3, 5, 10.0), (8, 8, 1e3), (5, 24, 1e4)):
        w = torch.randn(d_model, d_mlp, generator=g, dtype=torch.float64)
        k = torch.randn(d_mlp, generator=g, dtype=torch.float64)
        v = torch.randn(d_model, generator=g, dtype=torch.float64)
        cov = spd(d_mlp, g, condition)
        expected = rome_rank_one_update(w, k, v, cov)
        u = torch.linalg.solve(cov, k)
        yield Case(
            f"random W [{d_model}, {d_mlp}], C with condition number {condition:g}",
            (w.clone(), k.clone(), v.clone(), cov.clone()),
            expected,
            hint="Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k)",
            mistakes={
                "the denominator is k^T C^-1 k (no 1 +): ROME stores the new pair exactly": torch.outer(v - w @ k, u)
                / (1 + k @ u),
                "the residual is v - W k: what the memory still lacks for this key": torch.outer(v, u) / (k @ u),
                "the direction is C^-1 k (solve C u = k), not C k": torch.outer(v - w @ k, cov @ k) / (k @ cov @ k),
                "transposed: Delta has W's shape [d_model, d_mlp]": expected.T,
            },
            shape_hint="Delta has W's shape [d_model, d_mlp]",
            shape_first=True,
            before=partial(_stores_the_pair_with_least_disturbance, w, k, v, cov, condition),
            rtol=1e-6,
            atol=1e-10,
        )


def _stores_the_pair_with_least_disturbance(
    w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cov: torch.Tensor, condition: float, got: torch.Tensor
) -> Iterator[Property]:
    stored = (w + got.double()) @ k
    yield Property(
        relative_gap(stored, v) < 1e-8,
        f"(W + Delta) k = v = {describe(v)}",
        f"(W + Delta) k = {describe(stored)}",
        "ROME's update writes the new pair exactly",
        answer=got,
    )
    basis = torch.linalg.svd(k[None, :]).Vh[1:]  # rows orthogonal to k
    leak = float((got.double() @ cov @ basis.T).norm() / got.double().norm().clamp_min(1e-300))
    yield Property(
        leak < 1e-6 * condition,
        "Delta C x = 0 for every x orthogonal to k (the least disturbance of old keys)",
        f"||Delta C x|| / ||Delta|| up to {leak:.3g}",
        "Delta's rows must lie along C^-1 k",
        answer=got,
    )
