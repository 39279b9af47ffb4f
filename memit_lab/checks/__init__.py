"""Checks for the course exercises (``notebooks/assignments``): one ``check_*`` function per exercise.

A check calls the student's function on several seeded inputs -- random matrices, the
tiny random models of several architectures, and the bundled model on facts it knows --
and compares each answer with memit_lab's own implementation of the same step. Before
that comparison it tests a property that does not depend on memit_lab's implementation
(the components add up to the hidden state the model computed; the update solves its
normal equations; the edited memory returns the new value), so the student learns *what*
is wrong, not only that it differs.

On a wrong answer a check raises :class:`CheckFailed`, which names the failing case and
says what was expected, what came back and what to try. Where the answer equals a known
mistake (a transposed matrix, a missing lambda, an off-by-one layer, the wrong token
position) the hint names that mistake. A function that calls memit_lab's own answer to the
exercise (its *twin*: ``insertion_update`` for eq. 14, ``decompose_resid`` for eq. 6, ...) fails
with :class:`CalledTheLibrary`, "write it yourself": while the student's function runs, each twin
is replaced by a stand-in that refuses, wherever a module or the notebook holds it. A function that still raises
``NotImplementedError`` fails with :class:`NotImplementedYet`; with ``pending_ok=True``
(the self-study notebooks) the check reports "not implemented yet" instead of raising,
so a notebook with open exercises still runs top to bottom. A check that passes returns a
:class:`CheckResult` listing the cases it ran. A notebook runs its checks through a
:class:`Course`, which remembers which function passed each.

Checks are seeded and take seconds on a CPU.

Layout: :mod:`.core` is the skeleton every check shares (cases -> reference -> call ->
require -> compare -> named mistakes); each exercise is a generator of :class:`~.core.Case`
declarations in the module of its assignment: :mod:`.residual_lens` (1), :mod:`.causal_tracing`
(2), :mod:`.least_squares` (3), :mod:`.memit_by_hand` (4), :mod:`.null_space` (5), sharing the seeded inputs of
:mod:`.inputs` and the comparisons and descriptions of :mod:`.answers`; a :mod:`.course` holds
the record of what passed.

Example:
    >>> import torch
    >>> def fit(keys, values):  # the normal equations W K K^T = M K^T (eq. 8)
    ...     return torch.linalg.solve(keys @ keys.T, keys @ values.T).T
    >>> check_fit_memory(fit).passed
    True
    >>> def stub(keys, values):
    ...     raise NotImplementedError()
    >>> pending = check_fit_memory(stub, pending_ok=True)
    >>> pending.passed, repr(pending).split(": ")[1]
    (False, 'not implemented yet (check_fit_memory will run once it returns an answer)')
"""

from .causal_tracing import (
    check_corrupt_subject,
    check_restored_mlp_window,
    check_restored_probability,
    check_strongest_subject_token,
)
from .core import CalledTheLibrary, Check, CheckFailed, CheckResult, NotImplementedYet
from .course import CHECKS, Course
from .least_squares import check_fit_memory, check_insert_memories, check_rank_one_update, check_rome_update
from .memit_by_hand import check_average_key, check_edit_position, check_layer_update, check_nll_with_delta
from .null_space import check_energy_shares, check_null_space_projector, check_projected_update
from .residual_lens import (
    check_direct_attribution,
    check_first_top1_layer,
    check_lens_probs,
    check_residual_components,
)

__all__ = [
    "CHECKS",
    "CalledTheLibrary",
    "Check",
    "CheckFailed",
    "CheckResult",
    "Course",
    "NotImplementedYet",
    "check_average_key",
    "check_corrupt_subject",
    "check_direct_attribution",
    "check_edit_position",
    "check_energy_shares",
    "check_first_top1_layer",
    "check_fit_memory",
    "check_insert_memories",
    "check_layer_update",
    "check_lens_probs",
    "check_nll_with_delta",
    "check_null_space_projector",
    "check_projected_update",
    "check_rank_one_update",
    "check_residual_components",
    "check_restored_mlp_window",
    "check_restored_probability",
    "check_rome_update",
    "check_strongest_subject_token",
]
