"""On a CUDA device: a MEMIT edit and a causal trace in float16 / bfloat16 agree with float32 on the CPU.

Marked ``cuda`` and skipped where ``torch.cuda.is_available()`` is false (CI has no GPU):
``pytest -m cuda tests/test_cuda.py`` on a machine with one. ``MEMIT_LAB_TEST_DEVICE=cpu`` runs the same
comparisons against a second copy on the CPU (a dry run of the code paths, slow: emulated bfloat16).
Two ways to use reduced precision:

* the model in float32 and the replayed blocks under autocast (``ZParams.dtype``, ``trace(dtype=...)``),
  the switch [speed] added;
* the model's weights themselves in float16 / bfloat16 (``load_model(..., dtype=...)``), as a user with a
  large model on a small GPU does.

Both are compared with the same edit (same requests, contexts and statistics) or the same trace (same
noise, drawn on the CPU) computed in float32 on the CPU. The tolerances are what reduced precision
allows, not what a wrong computation would pass: a wrong update is ~100 % away, a wrong grid ~0.5.
"""

import dataclasses
import os

import pytest
import torch

from memit_lab import LoadedModel, load_model
from memit_lab.datasets import load_factset
from memit_lab.evaluate import paired_nll
from memit_lab.experiments import edit_request
from memit_lab.memit import MemitHyperParams, apply_memit
from memit_lab.stats import key_second_moment
from memit_lab.tracing import embedding_noise, trace_all
from memit_lab.zopt import context_templates

DEVICE = os.environ.get("MEMIT_LAB_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.slow,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "Eiffel Tower"
REDUCED = ["float16", "bfloat16"]


@pytest.fixture(scope="module")
def cpu_lm() -> LoadedModel:
    return load_model("smollm2-135m")


@pytest.fixture(scope="module")
def reference(cpu_lm: LoadedModel) -> dict[str, object]:
    """The float32 CPU edit of eight known facts: its requests, contexts, statistics, updates and NLLs."""
    requests = [edit_request(r) for r in load_factset(known=True, n=8)]
    hp = MemitHyperParams.for_model(cpu_lm)
    contexts = context_templates(cpu_lm, hp.z.n_contexts, hp.z.context_tokens, seed=hp.z.context_seed)
    moments = key_second_moment(cpu_lm, hp.layers, progress=False)
    result = apply_memit(cpu_lm, requests, hp, contexts=contexts, second_moments=moments)
    try:
        deltas = {layer: _w_out(cpu_lm, layer) - saved for layer, saved in result.backup.saved.items()}
        new, true = _nll(cpu_lm, requests)
    finally:
        result.restore()
    return {"requests": requests, "hp": hp, "contexts": contexts, "moments": moments, "deltas": deltas,
            "wins": new < true}  # fmt: skip


def _w_out(lm: LoadedModel, layer: int) -> torch.Tensor:
    return lm.adapter.w_out_parameter(lm.model, layer).detach().float().cpu()


def _nll(lm: LoadedModel, requests: list) -> tuple[torch.Tensor, torch.Tensor]:
    new, true = paired_nll(lm, [r.text for r in requests], [r.target_new for r in requests],
                           [r.target_true for r in requests])  # fmt: skip
    return torch.as_tensor(new).cpu(), torch.as_tensor(true).cpu()


def _edit_on(lm: LoadedModel, reference: dict, hp: MemitHyperParams, bound: float = 0.1) -> None:
    """Edit ``lm`` as the reference did; compare the updates (relative gap < ``bound``) and the answers; restore."""
    saved_all = {layer: lm.adapter.w_out_parameter(lm.model, layer).detach().clone() for layer in hp.layers}
    moments = {layer: m.to(lm.device) for layer, m in reference["moments"].items()}
    result = apply_memit(lm, reference["requests"], hp, contexts=reference["contexts"], second_moments=moments)
    try:
        for layer, delta_ref in reference["deltas"].items():
            w0 = saved_all[layer].float().cpu()
            # What the weights' own type can hold of the float32 update: W0 + Delta rounded to it, minus W0.
            representable = (w0 + delta_ref).to(lm.dtype).float() - w0
            delta = _w_out(lm, layer) - w0
            relative = float((delta - representable).norm() / representable.norm())
            assert relative < bound, f"layer {layer}: ||Delta - Delta_ref|| / ||Delta_ref|| = {relative:.3g} >= {bound}"
        new, true = _nll(lm, reference["requests"])
        assert torch.equal(new < true, reference["wins"]), "the edit lands on other facts than in float32 on the CPU"
    finally:
        result.restore()
    assert all(torch.equal(lm.adapter.w_out_parameter(lm.model, layer), w) for layer, w in saved_all.items())


@pytest.mark.parametrize("dtype", REDUCED)
def test_memit_on_cuda_with_reduced_precision_replay_matches_float32_on_the_cpu(reference: dict, dtype: str) -> None:
    lm = load_model("smollm2-135m", device=DEVICE)
    hp = reference["hp"]
    _edit_on(lm, reference, dataclasses.replace(hp, z=dataclasses.replace(hp.z, dtype=dtype)))


@pytest.mark.parametrize("dtype", REDUCED)
def test_memit_on_a_cuda_model_held_in_reduced_precision_matches_float32_on_the_cpu(
    reference: dict, dtype: str
) -> None:
    # Keys, hidden states and z are all computed in 16 bits here. Measured with this test on the CPU
    # (MEMIT_LAB_TEST_DEVICE=cpu, 2026-12-03): the gap per layer 0.027-0.035 in float16 and 0.098-0.142 in
    # bfloat16 (3 fewer mantissa bits), the same 7 of 8 facts won; the bounds leave about 2x for the device.
    lm = load_model("smollm2-135m", device=DEVICE, dtype=getattr(torch, dtype))
    _edit_on(lm, reference, reference["hp"], bound={"float16": 0.1, "bfloat16": 0.3}[dtype])


@pytest.mark.parametrize("dtype", REDUCED)
def test_a_causal_trace_on_cuda_in_reduced_precision_matches_float32_on_the_cpu(
    cpu_lm: LoadedModel, dtype: str
) -> None:
    noise = embedding_noise(cpu_lm)
    kw = {"window": 10, "samples": 3, "noise": noise}
    expected = trace_all(cpu_lm, PROMPT, SUBJECT, **kw)  # type: ignore[arg-type]
    replayed = trace_all(load_model("smollm2-135m", device=DEVICE), PROMPT, SUBJECT, dtype=dtype, **kw)  # type: ignore[arg-type]
    held_lm = load_model("smollm2-135m", device=DEVICE, dtype=getattr(torch, dtype))
    held = trace_all(held_lm, PROMPT, SUBJECT, **kw)  # type: ignore[arg-type]
    # Autocast keeps the residual stream and the readout in float32 (tracing's 1e-2 goal, with room for the
    # device's kernels); weights held in 16 bits round every sum of the forward, hence the wider bound.
    for kind, t in expected.items():
        for name, got, bound in (("autocast replay", replayed, 2e-2), (f"weights in {dtype}", held, 5e-2)):
            gap = float((got[kind].scores.float().cpu() - t.scores).abs().max())
            assert gap < bound, f"{kind}, {name}: max |P - P_fp32_cpu| = {gap:.3g} (bound {bound})"
