"""The course assignments: masters, generated notebooks, exercise checks, and one nbgrader round trip.

* The committed student and solution notebooks are what the masters generate (they never drift), and
  the executed solution notebooks show every check passed (nbval re-runs them and compares).
* Each check fails on the untouched stub, passes on the master's solution, and rejects plausible wrong
  answers with a message that names the case, the expected value, the answer and the specific mistake.
* No check can be passed by calling memit_lab's own answer: a function that delegates to an exercise's
  library twin fails with "write it yourself", wherever it imported the twin from, and the twin is put back
  afterwards; no notebook imports an exercise's twin before that exercise's check.
* nbgrader: generate the release of one assignment from its solution notebook, autograde a copy whose
  stubs a "student" filled in (full points) and the untouched release (zero on every graded cell).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from memit_lab import LoadedModel, Trace, TraceDict, alphaedit, checks, editing, kv_memory, prompts, residual, tracing
from memit_lab.checks import CalledTheLibrary, CheckFailed, CheckResult, NotImplementedYet
from memit_lab.checks.core import qualified_name
from memit_lab.facts import KNOWN_FACTS
from memit_lab.kv_memory import fit_memory
from memit_lab.prompts import continuation, last_subject_token, subject_token_span
from memit_lab.requests import EditRequest
from memit_lab.residual import freeze_final_norm
from memit_lab.tracing import embedding_noise, trace

ROOT = Path(__file__).resolve().parents[1]


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_assignments", ROOT / "scripts" / "build_assignments.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = _load_builder()
MASTERS: list[Path] = build.masters()
CHECK_CELLS = [(master, name, fn, points) for master in MASTERS for name, fn, points in build.checks_of(master)]


def _id(value: Any) -> str:
    return value.stem if isinstance(value, Path) else str(value)


# -- masters and notebooks ------------------------------------------------------------------------


def test_there_are_five_assignments_with_graded_checks() -> None:
    assert [m.stem[:2] for m in MASTERS] == ["01", "02", "03", "04", "05"]
    for master in MASTERS:
        assert len(build.checks_of(master)) >= 3, master.name


@pytest.mark.parametrize("master", MASTERS, ids=_id)
def test_committed_notebooks_are_generated_from_their_master(master: Path) -> None:
    assert build.drifted(master) == []


def _check_outputs(path: Path) -> dict[str, str]:
    """grade id -> the text a check cell printed, in a committed notebook."""
    nb = json.loads(path.read_text())
    texts = {}
    for cell in nb["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if meta.get("grade"):
            out = [o for o in cell["outputs"] if o["output_type"] == "execute_result"]
            texts[meta["grade_id"]] = "".join(out[0]["data"]["text/plain"]) if out else ""
    return texts


@pytest.mark.parametrize("master", MASTERS, ids=_id)
def test_solution_notebook_passes_every_check_and_student_notebook_reports_them_pending(master: Path) -> None:
    solution = _check_outputs(build.notebook_path(master, "solutions"))
    student = _check_outputs(build.notebook_path(master, "student"))
    expected = {name: fn for name, fn, _ in build.checks_of(master)}
    assert set(solution) == set(student) == set(expected)
    for name, fn in expected.items():
        assert solution[name].startswith(f"passed: {name}({fn}) on "), solution[name]
        assert student[name].startswith(f"... {fn}: not implemented yet"), student[name]


def test_student_version_replaces_solutions_with_nbgraders_stub_and_relaxes_checks() -> None:
    cells = build.parse_master(MASTERS[0])
    solution, student = build.build_notebook(cells, "solutions"), build.build_notebook(cells, "student")
    for cell, sol, stu in zip(cells, solution.cells, student.cells, strict=True):
        if cell.kind == "solution":
            assert build.BEGIN in sol.source and build.BEGIN not in stu.source
            assert stu.source.endswith("    # YOUR CODE HERE\n    raise NotImplementedError()")
            assert sol.metadata["nbgrader"] | {"solution": True, "locked": False} == sol.metadata["nbgrader"]
        elif cell.kind == "check":
            assert stu.source == sol.source[:-1] + ", pending_ok=True)"
            assert sol.metadata["nbgrader"]["grade"] and sol.metadata["nbgrader"]["points"] == cell.points
        else:
            assert stu.source.startswith(sol.source[:40]) and sol.metadata["nbgrader"]["locked"]


def test_master_errors_are_reported(tmp_path: Path) -> None:
    bad = tmp_path / "99_bad.py"
    bad.write_text("# %% solution\ndef f() -> int:\n    return 1\n")
    with pytest.raises(ValueError, match="BEGIN SOLUTION"):
        build.parse_master(bad)
    bad.write_text("# %% check\ncheck_x(f)\n")
    with pytest.raises(ValueError, match="points=N"):
        build.parse_master(bad)
    bad.write_text("# %% chek points=1\ncheck_x(f)\n")
    with pytest.raises(ValueError, match="unknown cell options"):
        build.parse_master(bad)


# -- stubs fail, solutions pass ------------------------------------------------------------------


@pytest.mark.parametrize(("master", "check", "function", "points"), CHECK_CELLS, ids=_id)
def test_check_fails_on_the_stub_and_says_which_line_to_replace(
    master: Path, check: str, function: str, points: int
) -> None:
    """The solutions passing is nbval's part: it re-runs every check cell of the solution notebooks and compares
    with the committed "passed: ..." outputs, which the test above requires."""
    course = checks.Course()
    run: Callable[..., CheckResult] = getattr(course, check)
    stub = build.exercise_namespace(master, "student")[function]
    with pytest.raises(NotImplementedYet, match=f"raise NotImplementedError\\(\\)` in {function}"):
        run(stub)
    pending = run(stub, pending_ok=True)
    assert pending.pending and not pending.passed and "not implemented yet" in repr(pending)
    assert not course.has_passed(run, stub)


def test_has_passed_remembers_the_function_that_passed_until_the_check_fails() -> None:
    def fit(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(keys @ keys.T, keys @ values.T).T

    def fit_again(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # the same code, re-defined
        return fit(keys, values)

    course = checks.Course()
    assert course.check_fit_memory(fit).passed
    assert course.has_passed(course.check_fit_memory, fit)
    assert course.has_passed(checks.check_fit_memory, fit)  # the check itself names the same record
    assert not course.has_passed(course.check_fit_memory, fit_again)
    assert not course.has_passed(course.check_rank_one_update, fit)
    assert not checks.Course().has_passed(checks.check_fit_memory, fit)  # each course keeps its own record
    with pytest.raises(CheckFailed):
        course.check_fit_memory(_fit_transposed)
    assert not course.has_passed(course.check_fit_memory, fit)


# -- wrong answers are rejected with a specific hint ------------------------------------------------------


# The wrong answers below compute everything themselves: calling an exercise's library twin would fail the check
# with "write it yourself" before the mistake they stand for could be named.


def _components(cache: Any, layer: int, pos: int) -> torch.Tensor:
    names = ["embed"] + (["pos_embed"] if "pos_embed" in cache.activations else [])
    names += [f"blocks.{b}.{part}" for b in range(layer) for part in ("attn_out", "mlp_out")]
    return torch.stack([cache[name][pos] for name in names])


def _components_without_embedding(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return _components(cache, layer, pos)[1:]


def _components_one_block_too_many(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return _components(cache, min(layer + 1, cache.n_layers), pos)


def _components_at_last_position(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return _components(cache, layer, -1)


def _lens_without_norm(lm: Any, resid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.get_submodule(lm.adapter.unembed)(resid).float().softmax(-1)


def _lens_log_probs(lm: Any, resid: torch.Tensor) -> torch.Tensor:
    norm, unembed = lm.model.get_submodule(lm.adapter.final_norm), lm.model.get_submodule(lm.adapter.unembed)
    with torch.no_grad():
        return unembed(norm(resid)).float().log_softmax(-1)


def _top1_where_highest(probs: torch.Tensor, target_id: int) -> int | None:
    return int(probs[:, target_id].argmax())


def _top1_counting_from_one(probs: torch.Tensor, target_id: int) -> int | None:
    top = (probs.argmax(-1) == target_id).tolist()
    return top.index(True) + 1 if True in top else None


def _attribution_real_norm(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    with torch.no_grad():
        normed = norm(_components(cache, cache.n_layers, pos)).float()
    return normed @ lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()


def _attribution_at(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[pos])
    u = lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()
    with torch.no_grad():
        return frozen.linear(_components(cache, cache.n_layers, pos).float()) @ u


def _attribution_at_last_position(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    return _attribution_at(lm, cache, target_id, -1)


def _attribution_with_bias(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[pos])
    u = lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()
    return frozen(_components(cache, cache.n_layers, pos).float()) @ u


def _solve_fit(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    k, m = keys.double(), values.double()
    return torch.linalg.solve(k @ k.T, k @ m.T).T


def _fit_transposed(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return _solve_fit(keys, values).T


def _fit_without_inverse(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values @ keys.T


def _fit_in_float32(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    k, m = keys.float(), values.float()
    return (m @ k.T @ torch.linalg.inv(k @ k.T)).double()


def _eq14(r: torch.Tensor, k: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """Delta = R K^T (C0 + K K^T)^-1 (eq. 14), without memit_lab."""
    k = k.double()
    return torch.linalg.solve(c0.double() + k @ k.T, k @ r.double().T).T


def _insert_without_lambda(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return _eq14(m1 - w0 @ k1, k1, moment)


def _insert_with_m1_for_r(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return _eq14(m1, k1, lam * moment)


def _insert_transposed(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return _eq14(m1 - w0 @ k1, k1, lam * moment).T


def _rank_one_rome_denominator(r: Any, k: Any, c0: Any) -> torch.Tensor:
    u = torch.linalg.solve(c0, k)
    return torch.outer(r, u) / (k @ u)


def _rank_one_transposed(r: Any, k: Any, c0: Any) -> torch.Tensor:
    u = torch.linalg.solve(c0, k)
    return (torch.outer(r, u) / (1 + k @ u)).T


def _rome_with_one_plus(w: Any, k: Any, v: Any, c: Any) -> torch.Tensor:
    u = torch.linalg.solve(c, k)
    return torch.outer(v - w @ k, u) / (1 + k @ u)


def _rome_value_for_residual(w: Any, k: Any, v: Any, c: Any) -> torch.Tensor:
    u = torch.linalg.solve(c, k)
    return torch.outer(v, u) / (k @ u)


def _position_last_token(tokenizer: Any, prompt: str, subject: str) -> int:
    return len(tokenizer(prompt).input_ids) - 1


def _position_first_subject_token(tokenizer: Any, prompt: str, subject: str) -> int:
    start = prompt.index(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
    return min(i for i, (a, b) in enumerate(offsets) if b > a and b > start)


def _nll_at_positions(
    lm: Any, prompts: list[str], target: str, layer: int, delta: Any, pos: list[int], per_token: bool = True
) -> Any:
    rows = torch.arange(len(prompts))

    def add(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[rows, pos] = out[rows, pos] + delta
        return out

    texts = [continuation(p, target) for p in prompts]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    with Trace(lm.model, lm.adapter.block(layer), edit_output=add, detach=False):
        logprobs = lm.model(**enc).logits.log_softmax(-1)
    losses = []
    for j, p in enumerate(prompts):
        start, stop = len(lm.tokenizer(p).input_ids), int(enc.attention_mask[j].sum())
        token_nll = -logprobs[j, start - 1 : stop - 1].gather(-1, enc.input_ids[j, start:stop, None])
        losses.append(token_nll.mean() if per_token else token_nll.sum())
    return torch.stack(losses)


def _nll_delta_at_last_token(lm: Any, prompts: list[str], subject: str, target: str, layer: int, delta: Any) -> Any:
    return _nll_at_positions(
        lm, prompts, target, layer, delta, [len(lm.tokenizer(p).input_ids) - 1 for p in prompts]
    ).mean()


def _nll_summed(lm: Any, prompts: list[str], subject: str, target: str, layer: int, delta: Any) -> Any:
    pos = [last_subject_token(lm.tokenizer, p, subject) for p in prompts]
    return _nll_at_positions(lm, prompts, target, layer, delta, pos).sum()


def _nll_tokens_summed(lm: Any, prompts: list[str], subject: str, target: str, layer: int, delta: Any) -> Any:
    pos = [last_subject_token(lm.tokenizer, p, subject) for p in prompts]
    return _nll_at_positions(lm, prompts, target, layer, delta, pos, per_token=False).mean()


def _key_of(lm: Any, layer: int, prompt: str, pos: int) -> torch.Tensor:
    with torch.no_grad(), Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True) as trace:
        lm.model(**lm.tokenizer(prompt, return_tensors="pt"))
    assert trace.input is not None
    return trace.input[0, pos]


def _key_at_last_token(lm: Any, layer: int, prompts: list[str], subject: str) -> torch.Tensor:
    return torch.stack([_key_of(lm, layer, p, len(lm.tokenizer(p).input_ids) - 1) for p in prompts]).mean(0)


def _key_of_first_prompt(lm: Any, layer: int, prompts: list[str], subject: str) -> torch.Tensor:
    return _key_of(lm, layer, prompts[0], last_subject_token(lm.tokenizer, prompts[0], subject))


def _key_weighted_like_memit(lm: Any, layer: int, prompts: list[str], subject: str) -> torch.Tensor:
    keys = [_key_of(lm, layer, p, last_subject_token(lm.tokenizer, p, subject)) for p in prompts]
    return keys[0] / 2 + torch.stack(keys[1:]).mean(0) / 2


def _update_without_spread(keys: Any, residuals: Any, layer: int, layers: list[int], c0: Any) -> torch.Tensor:
    return _eq14(residuals, keys, c0)


def _update_spread_evenly(keys: Any, residuals: Any, layer: int, layers: list[int], c0: Any) -> torch.Tensor:
    return _eq14(residuals / len(layers), keys, c0)


def _update_off_by_one(keys: Any, residuals: Any, layer: int, layers: list[int], c0: Any) -> torch.Tensor:
    return _eq14(residuals / max(1, max(layers) - layer), keys, c0)


def _corrupt_by_replacing(embeds: torch.Tensor, span: tuple[int, int], noise: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    out[span[0] : span[1]] = noise
    return out


def _corrupt_one_late(embeds: torch.Tensor, span: tuple[int, int], noise: torch.Tensor) -> torch.Tensor:
    out = embeds.clone()
    out[span[0] + 1 : span[1] + 1] += noise[: len(out) - span[0] - 1]
    return out


def _restored_without_noise(
    lm: Any, prompt: str, subject: str, target_id: int, layer: int, pos: int, noise: Any
) -> float:
    with torch.no_grad():
        logits = lm.model(**lm.tokenizer(prompt, return_tensors="pt")).logits
    return float(logits[0, -1].softmax(-1)[target_id])


def _restored_input_of_block(
    lm: Any, prompt: str, subject: str, target_id: int, layer: int, pos: int, noise: Any
) -> float:
    span = subject_token_span(lm.tokenizer, prompt, subject)
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), Trace(lm.model, lm.adapter.block(layer), retain_input=True) as clean:
        lm.model(**enc)

    def corrupt(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[0, span[0] : span[1]] += noise
        return out

    def restore_input(inp: torch.Tensor, name: str) -> torch.Tensor:
        inp = inp.clone()
        inp[0, pos] = clean.input[0, pos]
        return inp

    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter.embed, edit_output=corrupt),
        Trace(lm.model, lm.adapter.block(layer), edit_input=restore_input),
    ):
        logits = lm.model(**enc).logits
    return float(logits[0, -1].softmax(-1)[target_id])


def _strongest_is_last(scores: torch.Tensor, span: tuple[int, int]) -> int:
    return span[1] - 1


def _strongest_anywhere(scores: torch.Tensor, span: tuple[int, int]) -> int:
    return int(scores.max(0).values.argmax())


def _restored_modules(
    lm: Any, prompt: str, subject: str, target_id: int, names: list[str], pos: int, noise: Any
) -> float:
    """P(target) with ``noise`` on the subject's embeddings and the outputs of ``names`` restored at ``pos``."""
    span = subject_token_span(lm.tokenizer, prompt, subject)
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad(), TraceDict(lm.model, names) as clean:
        lm.model(**enc)

    def corrupt(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[0, span[0] : span[1]] += noise
        return out

    def restore(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[0, pos] = clean[name].output[0, pos]
        return out

    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter.embed, edit_output=corrupt),
        TraceDict(lm.model, names, edit_output=restore),
    ):
        logits = lm.model(**enc).logits
    return float(logits[0, -1].softmax(-1)[target_id])


def _window_centre_only(
    lm: Any, prompt: str, subject: str, target_id: int, layer: int, window: int, pos: int, noise: Any
) -> float:
    return _restored_modules(lm, prompt, subject, target_id, [lm.adapter.mlp_module(layer)], pos, noise)


def _window_upward(
    lm: Any, prompt: str, subject: str, target_id: int, layer: int, window: int, pos: int, noise: Any
) -> float:
    names = [lm.adapter.mlp_module(w) for w in range(layer, min(lm.n_layers, layer + window))]
    return _restored_modules(lm, prompt, subject, target_id, names, pos, noise)


def _window_of_hidden_states(
    lm: Any, prompt: str, subject: str, target_id: int, layer: int, window: int, pos: int, noise: Any
) -> float:
    low = layer - window // 2
    names = [lm.adapter.block(w) for w in range(max(0, low), min(lm.n_layers, low + window))]
    return _restored_modules(lm, prompt, subject, target_id, names, pos, noise)


def _projector_above(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    kept = vectors[:, eigenvalues >= threshold]
    return kept @ kept.T


def _projector_from_rows(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    rows = vectors[eigenvalues < threshold]
    return rows.T @ rows


def _projector_small_gram(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    null = vectors[:, eigenvalues < threshold]
    return null.T @ null


def _shares_of_dimensions(c: torch.Tensor, p: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    return float(p.trace() / len(p)), float(((p @ k).pow(2).sum(0) / k.pow(2).sum(0)).mean())


def _shares_not_squared(c: torch.Tensor, p: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    return float((p @ c).trace() / c.trace()), float(((p @ k).norm(dim=0) / k.norm(dim=0)).mean())


def _shares_pooled(c: torch.Tensor, p: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
    return float((p @ c).trace() / c.trace()), float((p @ k).pow(2).sum() / k.pow(2).sum())


def _projected(
    r: torch.Tensor, k: torch.Tensor, p: torch.Tensor, alpha: float, preserved: Any, *, rhs_p: bool, system_p: bool
) -> torch.Tensor:
    gram = k @ k.T + (0 if preserved is None else preserved)
    eye = torch.eye(len(p), dtype=torch.float64)
    system = (p @ gram if system_p else gram) + alpha * eye
    return torch.linalg.solve(system, (p if rhs_p else eye) @ k @ r.T).T


def _projected_without_p_on_the_right(r: Any, k: Any, p: Any, alpha: float, preserved: Any = None) -> torch.Tensor:
    return _projected(r, k, p, alpha, preserved, rhs_p=False, system_p=True)


def _projected_without_p_in_the_system(r: Any, k: Any, p: Any, alpha: float, preserved: Any = None) -> torch.Tensor:
    return _projected(r, k, p, alpha, preserved, rhs_p=True, system_p=False)


def _projected_forgetting_earlier_edits(r: Any, k: Any, p: Any, alpha: float, preserved: Any = None) -> torch.Tensor:
    return _projected(r, k, p, alpha, None, rhs_p=True, system_p=True)


def _raises_value_error(*args: Any) -> Any:
    raise ValueError("something inside the student's code")


# check -> (wrong implementation, words the failure's hint must contain)
WRONG: dict[str, list[tuple[Callable[..., Any], str]]] = {
    "check_residual_components": [
        (_components_without_embedding, "the embedding is missing"),
        (_components_one_block_too_many, "you included block `layer` itself"),
        (_components_at_last_position, "use the position `pos`"),
    ],
    "check_lens_probs": [
        (_lens_without_norm, "the final norm is missing"),
        (_lens_log_probs, "use softmax, not log_softmax"),
    ],
    "check_first_top1_layer": [
        (_top1_where_highest, "where P(target) is highest"),
        (_top1_counting_from_one, "off by one"),
    ],
    "check_direct_attribution": [
        (_attribution_real_norm, "you applied the real norm"),
        (_attribution_at_last_position, "use the position `pos`"),
        (_attribution_with_bias, "the norm's bias was added"),
    ],
    "check_fit_memory": [
        (_fit_transposed, "transposed"),
        (_fit_without_inverse, "without the inverse"),
        (_fit_in_float32, "float64"),
    ],
    "check_insert_memories": [
        (_insert_without_lambda, "lambda is missing"),
        (_insert_with_m1_for_r, "R is the residual"),
        (_insert_transposed, "transposed"),
    ],
    "check_rank_one_update": [
        (_rank_one_rome_denominator, "the 1 + is missing"),
        (_rank_one_transposed, "transposed"),
    ],
    "check_edit_position": [
        (_position_last_token, "the prompt's last token"),
        (_position_first_subject_token, "the subject's first token"),
    ],
    "check_nll_with_delta": [
        (_nll_delta_at_last_token, "delta went to the prompt's last token"),
        (_nll_summed, "summed over prompts"),
        (_nll_tokens_summed, "tokens were summed"),
    ],
    "check_average_key": [
        (_key_at_last_token, "the key at the prompts' last token"),
        (_key_of_first_prompt, "the first prompt only"),
        (_key_weighted_like_memit, "memit_lab's (and the paper's code's) weighting"),
    ],
    "check_layer_update": [
        (_update_without_spread, "the whole residual"),
        (_update_spread_evenly, "not 1 / |R|"),
        (_update_off_by_one, "off by one"),
    ],
    "check_corrupt_subject": [
        (_corrupt_by_replacing, "replaced"),
        (_corrupt_one_late, "one token late"),
    ],
    "check_restored_probability": [
        (_restored_without_noise, "add the noise"),
        (_restored_input_of_block, "you restored block `layer`'s input"),
    ],
    "check_strongest_subject_token": [
        (_strongest_is_last, "the subject's last token"),
        (_strongest_anywhere, "not in the subject"),
    ],
    "check_rome_update": [
        (_rome_with_one_plus, "no 1 +"),
        (_rome_value_for_residual, "the residual is v - W k"),
    ],
    "check_restored_mlp_window": [
        (_window_centre_only, "only the centre layer's MLP"),
        (_window_upward, "the window starts at `layer`"),
        (_window_of_hidden_states, "those are the hidden states"),
    ],
    "check_null_space_projector": [
        (_projector_above, "*above* the threshold"),
        (_projector_from_rows, "*columns*"),
        (_projector_small_gram, "not Û^T Û"),
    ],
    "check_energy_shares": [
        (_shares_of_dimensions, "share of *dimensions*"),
        (_shares_not_squared, "not squared"),
        (_shares_pooled, "pooled"),
    ],
    "check_projected_update": [
        (_projected_without_p_on_the_right, "the P on the right-hand side is missing"),
        (_projected_without_p_in_the_system, "the P inside the system is missing"),
        (_projected_forgetting_earlier_edits, "K_p K_p^T are missing"),
    ],
}
WRONG_CASES = [(check, fn, words) for check, cases in WRONG.items() for fn, words in cases]


def test_every_check_is_tried_on_wrong_answers() -> None:
    every = {name for name in checks.__all__ if name.startswith("check_")}
    assert every == set(WRONG) == set(checks.CHECKS)
    assert {check for _, check, _, _ in CHECK_CELLS} == every


@pytest.mark.parametrize(("check", "wrong", "words"), WRONG_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_check_rejects_a_plausible_wrong_answer(check: str, wrong: Callable[..., Any], words: str) -> None:
    with pytest.raises(CheckFailed) as failure:
        getattr(checks, check)(wrong, pending_ok=True)  # pending_ok must not hide a wrong answer
    error = failure.value
    assert not isinstance(error, NotImplementedYet)
    assert words in error.hint, str(error)
    message = str(error)
    assert f"{check} failed on " in message and "\n  expected: " in message and "\n  got:      " in message


def test_a_function_that_crashes_is_reported_with_the_input_that_broke_it() -> None:
    with pytest.raises(CheckFailed, match="ValueError: something inside") as failure:
        checks.check_rank_one_update(_raises_value_error)
    assert "raised an error on this input" in failure.value.hint
    assert "random r [3], k [5]" in failure.value.case


# -- the library's own answers are refused -----------------------------------------------------------------------


def _nll_through_target_scores(lm: Any, texts: list[str], subject: str, target: str, layer: int, delta: Any) -> Any:
    pos = [last_subject_token(lm.tokenizer, p, subject) for p in texts]
    rows = torch.arange(len(texts))

    def add(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[rows, pos] = out[rows, pos] + delta
        return out

    with Trace(lm.model, lm.adapter.block(layer), edit_output=add, detach=False):
        return -prompts.target_scores(lm, texts, [target] * len(texts)).mean_logprob.mean()


_ORIGINALS = [fit_memory]  # out of reach of the refusal, which replaces names in namespaces, not list entries

# check -> functions that only delegate to one of its twins: each must fail, naming the twin
DELEGATES: dict[str, list[tuple[Callable[..., Any], Callable[..., Any]]]] = {
    "check_residual_components": [
        (lambda c, layer, pos: residual.decompose_resid(c, layer, pos).vectors, residual.decompose_resid)
    ],
    "check_lens_probs": [(lambda lm, h: residual.lens_logits(lm, h).softmax(-1), residual.lens_logits)],
    "check_direct_attribution": [
        (
            lambda lm, c, t, pos: residual.direct_logit_attribution(lm, c, t, pos).attributions,
            residual.direct_logit_attribution,
        )
    ],
    "check_corrupt_subject": [
        (lambda e, span, noise: tracing._add_noise(noise, span)(e[None], "")[0], tracing._add_noise)
    ],
    "check_restored_probability": [
        (
            lambda lm, prompt, subject, t, layer, pos, noise: tracing.restored_prob(
                lm, prompt, subject, [("hidden", layer, pos)], target=t, samples=1
            ),
            tracing.restored_prob,
        ),
        (
            lambda lm, prompt, subject, t, layer, pos, noise: float(
                tracing.trace(lm, prompt, subject, t, samples=1, positions=[pos]).scores[layer, pos]
            ),
            tracing.trace,
        ),
    ],
    "check_restored_mlp_window": [
        (
            lambda lm, prompt, subject, t, layer, window, pos, noise: float(
                tracing.trace(lm, prompt, subject, t, kind="mlp", window=window, samples=1, positions=[pos]).scores[
                    layer, pos
                ]
            ),
            tracing.trace,
        ),
    ],
    "check_fit_memory": [(kv_memory.fit_memory, kv_memory.fit_memory)],
    "check_insert_memories": [
        (lambda w0, k1, m1, c, lam: kv_memory.insertion_update(m1 - w0 @ k1, k1, lam * c), kv_memory.insertion_update)
    ],
    "check_rank_one_update": [
        (kv_memory.single_key_update, kv_memory.single_key_update),
        (lambda r, k, c0: kv_memory.insertion_update(r[:, None], k[:, None], c0), kv_memory.insertion_update),
    ],
    "check_rome_update": [(kv_memory.rome_rank_one_update, kv_memory.rome_rank_one_update)],
    "check_edit_position": [
        (prompts.last_subject_token, prompts.last_subject_token),
        (
            lambda tok, prompt, subject: prompts.subject_token_span(tok, prompt, subject)[1] - 1,
            prompts.subject_token_span,
        ),
    ],
    "check_nll_with_delta": [(_nll_through_target_scores, prompts.target_scores)],
    "check_average_key": [
        (
            lambda lm, layer, ps, subject: editing.edit_keys(
                lm, [EditRequest(p.replace(subject, "{}", 1), subject, "Rome") for p in ps], layer, ("{}",)
            ).mean(1),
            editing.edit_keys,
        )
    ],
    "check_layer_update": [
        (
            lambda k, r, layer, layers, c0: kv_memory.insertion_update(r / (max(layers) - layer + 1), k, c0),
            kv_memory.insertion_update,
        )
    ],
    "check_null_space_projector": [(alphaedit.null_space_projector, alphaedit.null_space_projector)],
    "check_energy_shares": [
        (
            lambda c, p, k: tuple(
                alphaedit.null_space_report(c, [1e-2], k).iloc[0][["old_energy", "edit_energy"]].tolist()
            ),
            alphaedit.null_space_report,
        )
    ],
    "check_projected_update": [(alphaedit.null_space_update, alphaedit.null_space_update)],
}
DELEGATE_CASES = [(check, fn, twin) for check, pairs in DELEGATES.items() for fn, twin in pairs]


def test_every_check_with_a_library_twin_is_tried_on_a_function_that_delegates_to_it() -> None:
    with_twins = {name for name, check in checks.CHECKS.items() if check.twins}
    assert with_twins == set(DELEGATES)
    assert set(checks.CHECKS) - with_twins == {"check_first_top1_layer", "check_strongest_subject_token"}
    for name, pairs in DELEGATES.items():
        assert {twin for _, twin in pairs} <= set(checks.CHECKS[name].twins), name


@pytest.mark.parametrize(("check", "delegate", "twin"), DELEGATE_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_a_function_that_calls_the_library_answer_fails_and_the_library_is_put_back(
    check: str, delegate: Callable[..., Any], twin: Callable[..., Any]
) -> None:
    module = importlib.import_module(twin.__module__)
    with pytest.raises(CalledTheLibrary) as failure:
        getattr(checks, check)(delegate, pending_ok=True)  # pending_ok must not hide it either
    assert "write it yourself: " in failure.value.hint
    assert f"calls {qualified_name(twin)}" in failure.value.hint, str(failure.value)
    assert failure.value.got == f"a call to {qualified_name(twin)}"
    assert getattr(module, twin.__name__) is twin  # restored where it lives ...
    assert fit_memory is _ORIGINALS[0]  # ... and where this module imported one


def test_the_refusal_reaches_a_notebook_import_and_survives_a_broad_except() -> None:
    namespace: dict[str, Any] = {}
    exec(  # a notebook's own import, in a namespace no module holds
        "from memit_lab.kv_memory import fit_memory as mine\n"
        "def fit(keys, values):\n"
        "    return mine(keys, values)\n"
        "def careful(keys, values):\n"
        "    try:\n"
        "        return mine(keys, values)\n"
        "    except BaseException:\n"
        "        return (values @ keys.T).double()\n",
        namespace,
    )
    for name in ("fit", "careful"):
        with pytest.raises(CalledTheLibrary, match=r"calls memit_lab\.kv_memory\.fit_memory"):
            checks.check_fit_memory(namespace[name])
    assert namespace["mine"] is fit_memory is _ORIGINALS[0]


TWIN_SOLUTIONS = [(master, check, fn) for master, check, fn, _ in CHECK_CELLS if checks.CHECKS[check].twins]


@pytest.mark.slow
@pytest.mark.parametrize(("master", "check", "function"), TWIN_SOLUTIONS, ids=_id)
def test_the_masters_solution_passes_with_its_twins_refused(master: Path, check: str, function: str) -> None:
    """The other half of the refusal: the real solution never needs the library's answer (nbval re-runs the
    solution notebooks too; this runs the check alone, on the solution as the master defines it)."""
    solution = build.exercise_namespace(master, "solutions")[function]
    assert getattr(checks, check)(solution).passed


def _imported_objects(source: str) -> set[int]:
    """ids of the objects a cell's ``from module import name`` statements bind."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            found.update(id(getattr(module, alias.name)) for alias in node.names if hasattr(module, alias.name))
    return found


@pytest.mark.parametrize("master", MASTERS, ids=_id)
def test_no_notebook_imports_an_exercises_twin_before_its_check(master: Path) -> None:
    imported: set[int] = set()
    for cell in build.parse_master(master):
        if cell.kind == "check" and (match := build.CHECK_CALL.match(cell.source)):
            early = [qualified_name(t) for t in checks.CHECKS[match.group(1)].twins if id(t) in imported]
            assert not early, f"{master.name} imports {early} before {match.group(1)}"
        elif cell.kind != "markdown":
            imported |= _imported_objects(cell.source)
            assert "# fmt:" not in cell.source and "noqa" not in cell.source, f"{master.name}: {cell.grade_id}"


def test_restoration_check_hands_out_exactly_the_noise_memit_lab_tracing_draws(smollm: LoadedModel) -> None:
    fact = KNOWN_FACTS[0]
    scale = embedding_noise(smollm)
    traced = trace(smollm, fact.prompt, fact.subject, noise=scale, samples=1, seed=5, positions=[0])
    noise = checks.causal_tracing._tracing_noise(
        smollm, fact.prompt, fact.subject, scale, 5, traced.target_id, traced.corrupted_prob
    )
    span = subject_token_span(smollm.tokenizer, fact.prompt, fact.subject)
    assert noise.shape == (span[1] - span[0], smollm.d_model)
    assert abs(float(noise.double().std()) - scale) < 0.1 * scale  # drawn at the scale asked for
    with pytest.raises(RuntimeError, match="no longer reproduces"):  # another draw gives another corrupted run
        checks.causal_tracing._tracing_noise(
            smollm, fact.prompt, fact.subject, scale, 6, traced.target_id, traced.corrupted_prob
        )


def test_a_check_needs_the_function_itself() -> None:
    with pytest.raises(TypeError, match=r"no parentheses|parameter 'fn'"):  # beartype answers first in tests
        checks.check_fit_memory(fit_memory(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"no parentheses|parameter 'fn'"):  # also through a course
        checks.Course().check_fit_memory(torch.eye(2))


# -- nbgrader round trip ------------------------------------------------------------------------------------


def _nbgrader(course: Path, *args: str) -> None:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args], cwd=course, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _filled_in(release: dict[str, Any], master: Path) -> dict[str, Any]:
    """The release with every stub replaced by the master's solution, as a student would write it."""
    solutions = {c.grade_id: c.source for c in build.parse_master(master) if c.kind == "solution"}
    filled = json.loads(json.dumps(release))
    for cell in filled["cells"]:
        meta = cell["metadata"].get("nbgrader", {})
        if meta.get("solution"):
            lines = solutions[meta["grade_id"]].split("\n")
            cell["source"] = "\n".join(line for line in lines if build.BEGIN not in line and build.END not in line)
    return filled


def test_nbgrader_round_trip_full_points_when_filled_in_zero_when_untouched(tmp_path: Path) -> None:
    from nbgrader.api import Gradebook

    master = next(m for m in MASTERS if m.stem.startswith("03_"))
    name = master.stem
    (tmp_path / "source" / "a3").mkdir(parents=True)
    shutil.copy(build.notebook_path(master, "solutions"), tmp_path / "source" / "a3" / f"{name}.ipynb")
    config = 'c = get_config()\nc.CourseDirectory.course_id = "memit_lab"\nc.Execute.timeout = 600\n'  # the README's
    (tmp_path / "nbgrader_config.py").write_text(config)
    _nbgrader(tmp_path, "generate_assignment", "a3", "--force")

    release = json.loads((tmp_path / "release" / "a3" / f"{name}.ipynb").read_text())
    ours = build.build_notebook(build.parse_master(master), "student")
    for theirs, mine in zip(release["cells"], ours.cells, strict=True):
        if theirs["metadata"]["nbgrader"].get("solution"):  # our student version stubs exactly as nbgrader does
            assert "".join(theirs["source"]) == mine.source
    for student, notebook in (("filled", _filled_in(release, master)), ("untouched", release)):
        (tmp_path / "submitted" / student / "a3").mkdir(parents=True)
        (tmp_path / "submitted" / student / "a3" / f"{name}.ipynb").write_text(json.dumps(notebook))
    _nbgrader(tmp_path, "autograde", "a3", "--create", "--force")

    points = sum(p for _, _, p in build.checks_of(master))
    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gradebook:
        filled = gradebook.find_submission_notebook(name, "a3", "filled")
        untouched = gradebook.find_submission_notebook(name, "a3", "untouched")
        assert (filled.score, filled.max_score) == (points, points)
        assert {g.name: g.score for g in untouched.grades} == {c: 0.0 for c, _, _ in build.checks_of(master)}
        assert untouched.max_score == points
