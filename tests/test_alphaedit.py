"""AlphaEdit: the null-space projector, the projected update against brute force, and edits on every tiny model."""

from typing import Any

import pytest
import torch
from helpers import WeightSnapshot

from memit_lab import LoadedModel, load_model
from memit_lab.alphaedit import (
    AlphaEditHyperParams,
    apply_alphaedit,
    cached_projector,
    null_space_projector,
    null_space_report,
    null_space_update,
)
from memit_lab.hparams import MODEL_DEFAULTS
from memit_lab.memit import MemitHyperParams, apply_memit
from memit_lab.methods import get_method
from memit_lab.requests import EditRequest
from memit_lab.stats import key_second_moment
from memit_lab.zopt import ZParams

REQUESTS = [
    EditRequest("The {} is located in", "Eiffel Tower", "Rome"),
    EditRequest("The capital of {} is", "Japan", "Paris"),
]
CONTEXTS = ("{}", "Hello. {}")
TINY_Z = ZParams(steps=10, lr=0.5, clamp=4.0, weight_decay=0.0, kl_weight=0.0, stop="loss")
LAYERS = (0, 1)


def _unchecked(fn: Any) -> Any:
    """The function without the test-time jaxtyping wrapper: these tests are about its own checks."""
    return getattr(fn, "__wrapped__", fn)


def _random_moment(d: int, small: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A C = U diag(lambda) U^T with ``small`` eigenvalues ~1e-4 and the rest ~1, and its eigenvectors U."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [torch.rand(small, generator=g, dtype=torch.float64) * 1e-4, 1 + torch.rand(d - small, generator=g)]
    )
    return u @ torch.diag(lam) @ u.T, u


# --- the projector --------------------------------------------------------------------------------------------


def test_projector_is_the_orthogonal_projector_onto_the_small_eigenvectors() -> None:
    c, u = _random_moment(12, 5)
    p = null_space_projector(c, 1e-2)
    assert torch.allclose(p, p.T, atol=1e-14) and torch.allclose(p @ p, p, atol=1e-13)
    assert round(float(p.trace())) == 5
    big = u[:, 5:]  # the preserved directions: eigenvalues ~1
    assert float((p @ big).abs().max()) < 1e-13
    assert torch.allclose(p @ u[:, :5], u[:, :5], atol=1e-13)


def test_projector_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="square"):
        _unchecked(null_space_projector)(torch.ones(3, 4), 1e-2)
    with pytest.raises(ValueError, match="positive"):
        null_space_projector(torch.eye(3), 0.0)
    with pytest.raises(ValueError, match="threshold"):
        AlphaEditHyperParams((0,), threshold=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        AlphaEditHyperParams((0,), alpha=0.0)


def test_cached_projector_reads_back_what_it_wrote(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MEMIT_LAB_CACHE", str(tmp_path))
    c, _ = _random_moment(10, 3)
    first = cached_projector(c, 1e-2)
    assert list((tmp_path / "stats" / "null-space").iterdir())
    assert torch.equal(cached_projector(c, 1e-2), first)
    assert torch.equal(first, null_space_projector(c, 1e-2))
    assert round(float(cached_projector(c, 2.5).trace())) > 3  # another threshold, another entry


def test_null_space_report_measures_the_energy_shares() -> None:
    c, u = _random_moment(8, 3)
    keys = u[:, :2] + u[:, 6:8]  # half of each key's energy in the null space
    report = null_space_report(c, [1e-2], keys)
    eigenvalues = torch.linalg.eigvalsh(c)
    assert report.null_dim[0] == 3
    assert report.old_energy[0] == pytest.approx(float(eigenvalues[:3].sum() / eigenvalues.sum()))
    assert report.edit_energy[0] == pytest.approx(0.5)


# --- the update against brute force ---------------------------------------------------------------------------


def _brute_force(r: torch.Tensor, k1: torch.Tensor, kp: torch.Tensor, p: torch.Tensor, alpha: float) -> torch.Tensor:
    """argmin over Delta~ of ||Delta~ P K1 - R||^2 + ||Delta~ P K_p||^2 + alpha ||Delta~ P||^2, then Delta = Delta~ P.

    The rows of Delta~ do not interact: each is one stacked least-squares problem, solved by lstsq.
    """
    d = p.shape[0]
    design = torch.cat([(p @ k1).T, (p @ kp).T, alpha**0.5 * p.T])  # [u + n_p + d, d]
    target = torch.cat([r.T, torch.zeros(kp.shape[1] + d, r.shape[0], dtype=torch.float64)])
    tilde = torch.linalg.lstsq(design, target, driver="gelsd").solution.T
    return tilde @ p


@pytest.mark.parametrize("with_preserved", [False, True])
def test_update_solves_the_constrained_least_squares_problem(with_preserved: bool) -> None:
    g = torch.Generator().manual_seed(1)
    c, _ = _random_moment(9, 5)
    p = null_space_projector(c, 1e-2)
    r = torch.randn(4, 3, generator=g, dtype=torch.float64)
    k1 = torch.randn(9, 3, generator=g, dtype=torch.float64)
    kp = torch.randn(9, 2 if with_preserved else 0, generator=g, dtype=torch.float64)
    delta = null_space_update(r, k1, p, 0.7, kp @ kp.T if with_preserved else None)
    assert delta.dtype == torch.float64 and delta.shape == (4, 9)
    assert torch.allclose(delta, _brute_force(r, k1, kp, p, 0.7), atol=1e-10)
    assert float((delta - delta @ p).abs().max()) < 1e-12  # Delta = Delta P: nothing outside the null space


def test_update_refuses_mismatched_shapes() -> None:
    p = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same u"):
        _unchecked(null_space_update)(torch.ones(2, 2), torch.ones(3, 1), p, 1.0)
    with pytest.raises(ValueError, match="projector"):
        _unchecked(null_space_update)(torch.ones(2, 1), torch.ones(3, 1), torch.eye(4), 1.0)


# --- on tiny models -------------------------------------------------------------------------------------------


def _moments(lm: LoadedModel) -> dict[int, torch.Tensor]:
    return key_second_moment(lm, LAYERS, n_tokens=512, progress=False, use_cache=False)


def _threshold(moments: dict[int, torch.Tensor]) -> float:
    """An eigenvalue bound that leaves about half of every layer's directions in the null space."""
    return max(float(torch.linalg.eigvalsh(c).median()) for c in moments.values())


def test_edit_lands_and_restores_bit_for_bit(tiny_lm: LoadedModel) -> None:
    moments = _moments(tiny_lm)
    hp = AlphaEditHyperParams(LAYERS, alpha=1e-3, threshold=_threshold(moments), z=TINY_Z)
    saved = WeightSnapshot(tiny_lm)
    result = apply_alphaedit(tiny_lm, REQUESTS, hp, second_moments=moments, contexts=CONTEXTS)
    assert result.residual_before[0] == pytest.approx(1.0, abs=1e-4)
    assert result.residual_after < 0.5 * result.residual_before[0]
    assert all(0 < dim < tiny_lm.d_mlp for dim in result.null_dims)
    assert list(result.to_frame().columns) == ["layer", "delta_norm", "residual_before", "residual_after", "null_dim"]
    assert saved.changed()
    result.restore()
    assert saved.unchanged()


def test_preserved_directions_keep_their_values(tiny_lm: LoadedModel) -> None:
    """W k after the edit equals W k before for every k outside the null space, up to float32 storage of W."""
    moments = _moments(tiny_lm)
    threshold = _threshold(moments)
    hp = AlphaEditHyperParams(LAYERS, alpha=1e-3, threshold=threshold, z=TINY_Z)
    before = {layer: tiny_lm.adapter.w_out_weight(tiny_lm.model, layer).double().clone() for layer in LAYERS}
    result = apply_alphaedit(tiny_lm, REQUESTS, hp, second_moments=moments, contexts=CONTEXTS)
    try:
        for layer in LAYERS:
            eigenvalues, vectors = torch.linalg.eigh(moments[layer])
            kept = vectors[:, eigenvalues >= threshold]  # the preserved space, as columns
            after = tiny_lm.adapter.w_out_weight(tiny_lm.model, layer).double()
            moved = float(((after - before[layer]) @ kept).norm() / (before[layer] @ kept).norm())
            changed = float((after - before[layer]).norm() / before[layer].norm())
            # the edit itself moves W by ~1e-2 relative; in the preserved space only float32 rounding is left
            assert changed > 1e-4 and moved < 1e-6, (layer, changed, moved)
    finally:
        result.restore()


def test_memit_moves_the_preserved_directions_alphaedit_keeps() -> None:
    """The contrast that makes the test above mean something: MEMIT's update is not confined to the null space."""
    lm = load_model("tiny-gpt2")
    moments = _moments(lm)
    eigenvalues, vectors = torch.linalg.eigh(moments[0])
    kept = vectors[:, eigenvalues >= _threshold(moments)]
    before = lm.adapter.w_out_weight(lm.model, 0).double().clone()
    result = apply_memit(lm, REQUESTS, MemitHyperParams(LAYERS, lam=1.0, z=TINY_Z), second_moments=moments,
                         contexts=CONTEXTS)  # fmt: skip
    moved = float(((lm.adapter.w_out_weight(lm.model, 0).double() - before) @ kept).norm() / (before @ kept).norm())
    result.restore()
    assert moved > 1e-4


def test_bad_input_changes_nothing() -> None:
    lm = load_model("tiny-gptj")
    saved = WeightSnapshot(lm)
    moments = {layer: torch.eye(lm.d_mlp, dtype=torch.float64) for layer in LAYERS}
    with pytest.raises(ValueError, match="do not fit"):
        apply_alphaedit(lm, REQUESTS, AlphaEditHyperParams((0, 9)), second_moments=moments)
    with pytest.raises(ValueError, match="preserved_keys"):
        apply_alphaedit(lm, REQUESTS, AlphaEditHyperParams(LAYERS), second_moments=moments,
                        preserved_keys={0: torch.zeros(2, 2)})  # fmt: skip
    with pytest.raises(ValueError, match="second_moments"):
        apply_alphaedit(lm, REQUESTS, AlphaEditHyperParams(LAYERS, z=TINY_Z), second_moments={0: moments[0]},
                        contexts=CONTEXTS)  # fmt: skip
    assert saved.unchanged()


def test_registered_with_measured_defaults_for_the_bundled_model() -> None:
    method = get_method("alphaedit")
    assert method.hparams is AlphaEditHyperParams and method.apply is apply_alphaedit
    measured = MODEL_DEFAULTS["smollm2-135m"]["alphaedit"]
    assert isinstance(measured, AlphaEditHyperParams) and measured.layers == (0, 1, 2, 3, 4)
