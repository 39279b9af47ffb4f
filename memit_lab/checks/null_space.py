"""Checks of assignment 5, null-space editing (AlphaEdit, Fang et al. 2025).

References: :mod:`memit_lab.alphaedit` (``null_space_projector``, ``null_space_report``,
``null_space_update``) on random keys that lie (almost) in a subspace, so the null space is clear-cut,
and on the bundled model's keys (its default corpus, layer 3, 2,048 tokens; the edit keys of known
facts read with :func:`memit_lab.editing.edit_keys`).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache, partial
from typing import Any

import torch

from ..alphaedit import cached_projector, null_space_projector, null_space_report, null_space_update
from ..editing import edit_keys
from ..facts import KNOWN_FACTS
from ..hparams import AlphaEditHyperParams
from ..models import load_model
from ..requests import EditRequest
from .answers import describe, relative_gap, scalar
from .core import Case, Property, exercise
from .inputs import BUNDLED, generator, real_keys

__all__ = ["check_energy_shares", "check_null_space_projector", "check_projected_update"]

#: the bundled model's layer and sample size for the real cases (a layer of its default edit range 0-4)
REAL_LAYER, REAL_TOKENS = 3, 2_048


# -- inputs ------------------------------------------------------------------------------------------------------


def _subspace_keys(d: int, rank: int, n: int, noise: float, g: torch.Generator) -> torch.Tensor:
    """``[d, n]`` keys that lie in a random ``rank``-dimensional subspace, plus isotropic noise of size ``noise``.

    E[k k^T] then has ``rank`` eigenvalues of order 1 and ``d - rank`` of order ``noise ** 2`` (exactly 0 when
    ``noise == 0`` and ``n >= rank``): a null space with a clear gap above it, so P is well defined.
    """
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -0.7, rank, dtype=torch.float64)  # eigenvalues 1 .. 0.04, never near the threshold
    coords = scales[:, None] * torch.randn(rank, n, generator=g, dtype=torch.float64) * 2
    return basis @ coords + noise * torch.randn(d, n, generator=g, dtype=torch.float64)


def _random_inputs() -> list[tuple[str, torch.Tensor, float]]:
    """(name, keys K0 [d, n], threshold) for the random cases: C0 = K0 K0^T / n."""
    g = generator(51)
    inputs = []
    for d, rank, n, noise in ((8, 5, 40, 1e-3), (16, 10, 100, 1e-3), (24, 6, 30, 1e-4), (20, 12, 15, 0.0)):
        k0 = _subspace_keys(d, rank, n, noise, g)
        null = d - min(rank, n)
        what = "exactly rank-deficient" if noise == 0 else f"noise {noise:g}"
        inputs.append((f"random keys [{d}, {n}] in a {rank}-dim subspace ({what}), null space of dim {null}", k0, 1e-2))
    return inputs


@lru_cache(maxsize=1)
def _real_keys() -> torch.Tensor:
    """``[d_mlp, n]`` corpus keys of the bundled model at :data:`REAL_LAYER` (computed once per session)."""
    return real_keys(BUNDLED, REAL_LAYER, REAL_TOKENS)


def _real_threshold(moment: torch.Tensor) -> float:
    """The bundled model's default threshold moved into the widest gap between neighbouring eigenvalues nearby.

    The spectrum of real keys has no gap: an eigenvalue within rounding of the threshold would make P depend on
    the last bit of the eigensolver. The geometric middle of the widest of the 20 gaps around the default is
    safely between two eigenvalues, so every correct float64 projector agrees to ~1e-10.
    """
    default = AlphaEditHyperParams.for_model(load_model(BUNDLED)).threshold
    eigenvalues = torch.linalg.eigvalsh(moment)
    at = int((eigenvalues < default).sum())
    lo, hi = max(at - 10, 1), min(at + 10, len(eigenvalues) - 1)
    ratios = eigenvalues[lo:hi] / eigenvalues[lo - 1 : hi - 1]
    i = lo + int(ratios.argmax())
    return float((eigenvalues[i - 1] * eigenvalues[i]).sqrt())


@lru_cache(maxsize=1)
def _real_inputs() -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(K0 [d_mlp, n], C0 = K0 K0^T / n, threshold, P) of the bundled model (eigendecomposed once per session)."""
    k0 = _real_keys()
    moment = k0 @ k0.T / k0.shape[1]
    threshold = _real_threshold(moment)
    return k0, moment, threshold, null_space_projector(moment, threshold)


def _fact_keys(facts: tuple[int, ...]) -> torch.Tensor:
    """``[d_mlp, len(facts)]`` edit keys of known facts at :data:`REAL_LAYER` (bare prompts, eq. 19)."""
    lm = load_model(BUNDLED)
    requests = [EditRequest(KNOWN_FACTS[i].template, KNOWN_FACTS[i].subject, "Rome") for i in facts]
    return edit_keys(lm, requests, REAL_LAYER, ("{}",)).double().cpu()


# -- 5.1 the projector -------------------------------------------------------------------------------------------


@exercise(null_space_projector, cached_projector)
def check_null_space_projector() -> Iterator[Case]:
    """Exercise 5.1: ``fn(second_moment, threshold)`` -> P = Û Û^T, Û the eigenvectors of C0 below the threshold.

    ``second_moment`` is C0 = K0 K0^T / n ``[d_mlp, d_mlp]`` (float64). Properties checked first: P is a
    symmetric projector (P = P^T, P^2 = P) of rank = the number of eigenvalues below the threshold, and it
    keeps exactly the old keys' energy below the threshold, ||P K0||^2 / ||K0||^2 = (sum of those eigenvalues)
    / (sum of all), so that an update Delta P changes the outputs W k0 of the old keys by that little.
    """
    inputs = list(_random_inputs())
    k0, _, threshold, _ = _real_inputs()
    inputs.append(
        (f"{BUNDLED} layer {REAL_LAYER}: {k0.shape[1]} corpus keys, threshold {threshold:.3g}", k0, threshold)
    )
    for name, keys, thr in inputs:
        moment = keys @ keys.T / keys.shape[1]
        expected = null_space_projector(moment, thr)
        yield Case(
            name,
            (moment.clone(), thr),
            expected,
            hint="P = Û Û^T with Û = the eigenvectors (columns of torch.linalg.eigh's second output) whose "
            "eigenvalue is below the threshold, in float64",
            mistakes=partial(_projector_mistakes, moment, thr, expected),
            shape_hint="P is [d_mlp, d_mlp]: Û Û^T, not Û^T Û",
            shape_first=True,
            before=partial(_is_the_null_space_projector, keys, moment, thr),
            rtol=1e-6,
            atol=1e-8,
        )


def _is_the_null_space_projector(
    keys: torch.Tensor, moment: torch.Tensor, threshold: float, got: torch.Tensor
) -> Iterator[Property]:
    p = got.double()
    eigenvalues = torch.linalg.eigvalsh(moment)
    rank = int((eigenvalues < threshold).sum())
    asymmetry, idempotence = relative_gap(p, p.T), float((p @ p - p).norm() / max(1.0, float(p.norm())))
    yield Property(
        asymmetry < 1e-8 and idempotence < 1e-6,
        "an orthogonal projector: P = P^T and P P = P",
        f"||P - P^T|| / ||P|| = {asymmetry:.3g}, ||P P - P|| = {idempotence:.3g}",
        "P = Û Û^T with orthonormal columns Û (eigenvectors from torch.linalg.eigh, which are orthonormal)",
        answer=got,
    )
    trace = float(p.trace())
    yield Property(
        abs(trace - rank) < 1e-4,
        f"rank {rank}: the number of eigenvalues below the threshold (trace P = rank for a projector)",
        f"trace P = {trace:.4g}",
        "keep the eigenvectors whose eigenvalue is *below* the threshold (the directions old keys rarely take)",
        answer=got,
    )
    kept = float(eigenvalues[eigenvalues < threshold].clamp_min(0).sum() / eigenvalues.sum())
    leak = float((p @ keys).pow(2).sum() / keys.pow(2).sum())
    yield Property(
        abs(leak - kept) <= 1e-6 * max(kept, 1e-6) + 1e-9,
        f"||P K0||^2 / ||K0||^2 = {kept:.3g}, the old keys' energy below the threshold (so Delta P moves their "
        "outputs that little)",
        f"||P K0||^2 / ||K0||^2 = {leak:.3g}",
        "P must project onto the eigenvectors of C0 below the threshold, so that P K0 ~ 0",
        answer=got,
    )


def _projector_mistakes(moment: torch.Tensor, threshold: float, expected: torch.Tensor) -> dict[str, Any]:
    eigenvalues, vectors = torch.linalg.eigh(moment)
    rows = vectors[eigenvalues < threshold]  # rows of the eigenvector matrix instead of its columns
    return {
        "that projects onto the eigenvectors *above* the threshold (I - P): the null space is where the "
        "eigenvalues are small": torch.eye(len(moment), dtype=torch.float64) - expected,
        "the eigenvectors are the *columns* of torch.linalg.eigh's second output, not its rows": rows.T @ rows,
    }


# -- 5.2 how much of the old and the new keys the null space holds --------------------------------------------------


@exercise(null_space_report)
def check_energy_shares() -> Iterator[Case]:
    """Exercise 5.2: ``fn(second_moment, projector, keys)`` -> (old share, edit share), two numbers.

    old share = tr(P C0) / tr(C0), the share of the old keys' energy E||k||^2 that lies in the null space
    (what an update through P can still disturb); edit share = the mean over the columns k of ``keys``
    of ||P k||^2 / ||k||^2 (how much of each edit key an update through P can write through). The
    reference is :func:`memit_lab.alphaedit.null_space_report`. Property checked first: both in [0, 1].
    """
    g = generator(52)
    for (name, k0, threshold), u in zip(_random_inputs(), (2, 3, 5, 1), strict=True):
        moment = k0 @ k0.T / k0.shape[1]
        edit = torch.randn(k0.shape[0], u, generator=g, dtype=torch.float64) * torch.logspace(0, 1, u)
        what = "1 random edit key" if u == 1 else f"{u} random edit keys of different norms"
        yield _shares_case(f"{name}, {what}", moment, threshold, edit)
    _, moment, threshold, _ = _real_inputs()
    name = f"{BUNDLED} layer {REAL_LAYER}: corpus C0, threshold {threshold:.3g}, the keys of 4 known facts"
    yield _shares_case(name, moment, threshold, _fact_keys((0, 1, 2, 3)))


def _shares_case(name: str, moment: torch.Tensor, threshold: float, edit: torch.Tensor) -> Case:
    report = null_space_report(moment, [threshold], edit).iloc[0]
    expected = torch.tensor([report.old_energy, report.edit_energy], dtype=torch.float64)
    p = null_space_projector(moment, threshold)
    shares = (p @ edit).pow(2).sum(0) / edit.pow(2).sum(0)
    pooled = (p @ edit).pow(2).sum() / edit.pow(2).sum()
    return Case(
        name,
        (moment.clone(), p.clone(), edit.clone()),
        expected,
        hint="old share = trace(P C0) / trace(C0); edit share = mean over the keys of ||P k||^2 / ||k||^2",
        mistakes={
            "the old share is the share of *dimensions* in the null space, trace(P) / d; the question is the "
            "share of the old keys' *energy*, trace(P C0) / trace(C0)": torch.stack([p.trace() / len(p), expected[1]]),
            "those are the shares outside the null space (1 - share): P holds the null space": 1 - expected,
            "the norms are not squared: energy is ||P k||^2 / ||k||^2": torch.stack(
                [expected[0], (shares.sqrt()).mean()]
            ),
            "the edit keys were pooled, ||P K||^2 / ||K||^2; average each key's own share instead, so a long key "
            "does not outweigh a short one": torch.stack([expected[0], pooled]) if edit.shape[1] > 1 else None,
        },
        shape_hint="return two numbers: (old share, edit share)",
        before=_two_shares,
        read=_as_pair,
        rtol=1e-6,
        atol=1e-9,
    )


def _as_pair(got: Any) -> Any:
    """``Case.read``: two numbers (a tuple, a list or a 2-element tensor) as a float64 tensor ``[2]``."""
    values = list(got) if isinstance(got, tuple | list) else None
    if isinstance(got, torch.Tensor) and got.numel() == 2:
        values = got.flatten().tolist()
    numbers = [scalar(v) for v in values] if values is not None and len(values) == 2 else None
    if numbers is None or any(v is None for v in numbers):
        return got
    return torch.tensor(numbers, dtype=torch.float64)


def _two_shares(got: Any) -> Iterator[Property]:
    pair = _as_pair(got)
    ok = isinstance(pair, torch.Tensor) and pair.shape == (2,) and bool(((pair >= -1e-12) & (pair <= 1 + 1e-12)).all())
    yield Property(
        ok,
        "two shares between 0 and 1: (old share, edit share)",
        describe(got),
        "return a tuple of two numbers, each a ratio of squared norms (energies)",
        answer=pair if isinstance(pair, torch.Tensor) and pair.shape == (2,) else None,
    )


# -- 5.3 the projected update ---------------------------------------------------------------------------------------


@exercise(null_space_update)
def check_projected_update() -> Iterator[Case]:
    """Exercise 5.3: ``fn(residuals, keys, projector, alpha, preserved)`` -> AlphaEdit's update Delta.

    Delta = R K1^T P (K_p K_p^T P + K1 K1^T P + alpha I)^-1 (``preserved`` = K_p K_p^T, or ``None``:
    no earlier edits), ``[d_model, d_mlp]``, float64. Properties checked first: Delta = Delta P (so an old
    key k0 with P k0 = 0 keeps its output: Delta k0 = 0), and the normal equations
    Delta ((K_p K_p^T + K1 K1^T) P + alpha I) = R K1^T P hold.
    """
    g = generator(53)
    for (name, k0, threshold), (u, with_preserved) in zip(
        _random_inputs(), ((2, False), (3, True), (1, False), (4, True)), strict=True
    ):
        d = k0.shape[0]
        p = null_space_projector(k0 @ k0.T / k0.shape[1], threshold)
        keys = torch.randn(d, u, generator=g, dtype=torch.float64)
        residuals = torch.randn(5, u, generator=g, dtype=torch.float64)
        earlier = torch.randn(d, 3, generator=g, dtype=torch.float64) if with_preserved else None
        preserved = None if earlier is None else earlier @ earlier.T
        what = "K_p of 3 earlier keys" if with_preserved else "no earlier edits"
        new = "1 new key" if u == 1 else f"{u} new keys"
        yield _update_case(f"{name}: {new}, {what}, alpha 10", residuals, keys, p, 10.0, preserved, k0)
    k0, _, threshold, p = _real_inputs()
    lm = load_model(BUNDLED)
    keys, earlier = _fact_keys((0, 1)), _fact_keys((2, 3, 4))
    w0 = lm.adapter.w_out_weight(lm.model, REAL_LAYER).detach().double().cpu()
    residuals = (w0 @ keys) * torch.randn(1, 2, generator=g, dtype=torch.float64)  # at the scale of the values
    name = f"{BUNDLED} layer {REAL_LAYER}: 2 facts' keys, P at threshold {threshold:.3g}, K_p of 3 other facts"
    alpha = AlphaEditHyperParams.for_model(lm).alpha
    yield _update_case(f"{name}, alpha {alpha:g}", residuals, keys, p, alpha, earlier @ earlier.T, k0)


def _update_case(
    name: str,
    residuals: torch.Tensor,
    keys: torch.Tensor,
    p: torch.Tensor,
    alpha: float,
    preserved: torch.Tensor | None,
    k0: torch.Tensor,
) -> Case:
    expected = null_space_update(residuals, keys, p, alpha, preserved)
    gram = keys @ keys.T + (0 if preserved is None else preserved)
    eye = torch.eye(len(p), dtype=torch.float64)
    rhs = keys @ residuals.T

    def solved(system: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(system, right).T

    return Case(
        name,
        (residuals.clone(), keys.clone(), p.clone(), alpha, None if preserved is None else preserved.clone()),
        expected,
        hint="Delta = R K1^T P ((K_p K_p^T + K1 K1^T) P + alpha I)^-1: solve the transposed system "
        "(P A + alpha I) Delta^T = P K1 R^T in float64 with torch.linalg.solve",
        mistakes={
            "the P on the right-hand side is missing: R K1^T P, not R K1^T": solved(p @ gram + alpha * eye, rhs),
            "the P inside the system is missing: (A P + alpha I), not (A + alpha I)": solved(
                gram + alpha * eye, p @ rhs
            ),
            "the earlier edits' keys K_p K_p^T are missing from the system": (
                null_space_update(residuals, keys, p, alpha) if preserved is not None else None
            ),
            "transposed: Delta has W_out's shape [d_model, d_mlp]": expected.T,
        },
        shape_hint="Delta has W_out's shape [d_model, d_mlp] = [residuals.shape[0], keys.shape[0]]",
        shape_first=True,
        before=partial(_through_the_null_space, residuals, keys, p, alpha, gram, k0),
        rtol=1e-6,
        atol=1e-10,
    )


def _through_the_null_space(
    residuals: torch.Tensor,
    keys: torch.Tensor,
    p: torch.Tensor,
    alpha: float,
    gram: torch.Tensor,
    k0: torch.Tensor,
    got: torch.Tensor,
) -> Iterator[Property]:
    delta = got.double()
    outside = float((delta - delta @ p).norm() / delta.norm().clamp_min(1e-300))
    moved = float((delta @ k0).norm() / (delta.norm() * k0.norm()).clamp_min(1e-300))
    yield Property(
        outside < 1e-8,
        "Delta = Delta P: every row of Delta in the null space, so that Delta k0 = Delta P k0 ~ 0 for the old keys",
        f"||Delta - Delta P|| / ||Delta|| = {outside:.3g}; the old keys' outputs move by "
        f"||Delta K0|| / (||Delta|| ||K0||) = {moved:.3g}",
        "multiply by P on the right-hand side: Delta = R K1^T P (...)^-1",
        answer=got,
    )
    gap = relative_gap(delta @ (gram @ p + alpha * torch.eye(len(p), dtype=torch.float64)), residuals @ keys.T @ p)
    yield Property(
        gap < 1e-6,
        "Delta ((K_p K_p^T + K1 K1^T) P + alpha I) = R K1^T P (the normal equations of the projected least squares)",
        f"relative mismatch {gap:.3g}",
        "solve (P A + alpha I) Delta^T = P K1 R^T with A = K_p K_p^T + K1 K1^T (K_p K_p^T = 0 when preserved is "
        "None), in float64",
        answer=got,
    )
