"""The course assignments: masters, generated notebooks, exercise checks, and one nbgrader round trip.

* The committed student and solution notebooks are what the masters generate (they never drift), and
  the executed solution notebooks show every check passed (nbval re-runs them and compares).
* Each check fails on the untouched stub, passes on the master's solution, and rejects plausible wrong
  answers with a message that names the case, the expected value, the answer and the specific mistake.
* nbgrader: generate the release of one assignment from its solution notebook, autograde a copy whose
  stubs a "student" filled in (full points) and the untouched release (zero on every graded cell).
"""

from __future__ import annotations

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

from memit_lab import LoadedModel, Trace, checks
from memit_lab.checks import CheckFailed, CheckResult, NotImplementedYet
from memit_lab.facts import KNOWN_FACTS
from memit_lab.kv_memory import fit_memory, insertion_update, rome_rank_one_update, single_key_update
from memit_lab.prompts import continuation, last_subject_token, subject_token_span
from memit_lab.residual import decompose_resid, direct_logit_attribution, freeze_final_norm, lens_logits
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


def test_there_are_four_assignments_with_graded_checks() -> None:
    assert len(MASTERS) >= 4
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


def _components_without_embedding(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return decompose_resid(cache, layer, pos).vectors[1:]


def _components_one_block_too_many(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return decompose_resid(cache, min(layer + 1, cache.n_layers), pos).vectors


def _components_at_last_position(cache: Any, layer: int, pos: int) -> torch.Tensor:
    return decompose_resid(cache, layer, -1).vectors


def _lens_without_norm(lm: Any, resid: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.get_submodule(lm.adapter.unembed)(resid).float().softmax(-1)


def _lens_log_probs(lm: Any, resid: torch.Tensor) -> torch.Tensor:
    return lens_logits(lm, resid).log_softmax(-1)


def _top1_where_highest(probs: torch.Tensor, target_id: int) -> int | None:
    return int(probs[:, target_id].argmax())


def _top1_counting_from_one(probs: torch.Tensor, target_id: int) -> int | None:
    top = (probs.argmax(-1) == target_id).tolist()
    return top.index(True) + 1 if True in top else None


def _attribution_real_norm(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    with torch.no_grad():
        normed = norm(decompose_resid(cache, pos=pos).vectors).float()
    return normed @ lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()


def _attribution_at_last_position(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    return direct_logit_attribution(lm, cache, target_id, -1).attributions


def _attribution_with_bias(lm: Any, cache: Any, target_id: int, pos: int) -> torch.Tensor:
    frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[pos])
    u = lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()
    return frozen(decompose_resid(cache, pos=pos).vectors.float()) @ u


def _fit_transposed(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return fit_memory(keys, values).T


def _fit_without_inverse(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values @ keys.T


def _fit_in_float32(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    k, m = keys.float(), values.float()
    return (m @ k.T @ torch.linalg.inv(k @ k.T)).double()


def _insert_without_lambda(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return insertion_update(m1 - w0 @ k1, k1, moment)


def _insert_with_m1_for_r(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return insertion_update(m1, k1, lam * moment)


def _insert_transposed(w0: Any, k1: Any, m1: Any, moment: Any, lam: float) -> torch.Tensor:
    return insertion_update(m1 - w0 @ k1, k1, lam * moment).T


def _rank_one_rome_denominator(r: Any, k: Any, c0: Any) -> torch.Tensor:
    u = torch.linalg.solve(c0, k)
    return torch.outer(r, u) / (k @ u)


def _rank_one_transposed(r: Any, k: Any, c0: Any) -> torch.Tensor:
    return single_key_update(r, k, c0).T


def _rome_with_one_plus(w: Any, k: Any, v: Any, c: Any) -> torch.Tensor:
    u = torch.linalg.solve(c, k)
    return torch.outer(v - w @ k, u) / (1 + k @ u)


def _rome_value_for_residual(w: Any, k: Any, v: Any, c: Any) -> torch.Tensor:
    return rome_rank_one_update(torch.zeros_like(w), k, v, c)


def _position_last_token(tokenizer: Any, prompt: str, subject: str) -> int:
    return len(tokenizer(prompt).input_ids) - 1


def _position_first_subject_token(tokenizer: Any, prompt: str, subject: str) -> int:
    return subject_token_span(tokenizer, prompt, subject)[0]


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
    return insertion_update(residuals, keys, c0)


def _update_spread_evenly(keys: Any, residuals: Any, layer: int, layers: list[int], c0: Any) -> torch.Tensor:
    return insertion_update(residuals / len(layers), keys, c0)


def _update_off_by_one(keys: Any, residuals: Any, layer: int, layers: list[int], c0: Any) -> torch.Tensor:
    return insertion_update(residuals / max(1, max(layers) - layer), keys, c0)


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
    (tmp_path / "nbgrader_config.py").write_text('c = get_config()\nc.CourseDirectory.course_id = "memit_lab"\n')
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
