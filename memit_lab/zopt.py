"""The target hidden state z of each edit (paper eq. 16), optimised for many requests at once.

For request i, a vector delta_i is added to the residual stream at the output of the top
edit layer L, at the last subject token, and optimised so the model says the new object
after the prompt and after several short context prefixes x_j (eq. 16)::

    z_i = h_i^L + argmin_delta  1/P sum_j -log P(o_i | x_j + p(s_i, r_i); h^L += delta)

What the paper's code adds, each a field of :class:`ZParams`: a KL term keeping the
subject's other properties (KL(edited || original) of the next-token distribution at the
last subject token of ``"{subject} is a"``, weight ``kl_weight``); weight decay
``weight_decay * ||delta|| / ||h||^2``; after every Adam step delta is projected back into
``||delta|| <= clamp * ||h||``; early stopping when the request's loss falls below
``stop_loss``. The context prefixes are sampled from the model itself (seeded, cached on
disk: :func:`context_templates`).

How it is made fast (none of it changes the optimum):

* delta enters at layer L at the last subject token, so everything before that token
  (all layers) and everything up to layer L (all tokens) is computed **once**, without
  gradients: the tokens before the last subject token become a key/value prefix, and each
  Adam step replays only blocks L+1..end on the tokens from the last subject token on
  (:mod:`memit_lab.replay`);
* rows are grouped by the length of that suffix, one pass per group, so a step computes
  little padding (a prompt's KL row is one token long, its target prompts several);
* logits are computed only where a target token is predicted (and, for the KL term, at
  one position), never for the whole vocabulary at every position;
* all requests of a chunk share one forward/backward pass; the loss is the *sum* of the
  per-request losses, so each delta_i gets exactly its own gradient, Adam (elementwise)
  treats it as if it were alone, and a request that has converged is frozen and leaves
  the batch -- the same optimum as one request at a time (``batched=False``), which the
  tests check;
* each group's index tensors (rows, target positions and tokens, weights) are built once
  per set of active requests, not at every step; a group whose rows are all active is
  replayed without gathering rows; the prefix keeps only the layers above L; the last pass,
  which only measures, runs without autograd (z bit for bit as without these, tested).

Two switches of :class:`ZParams`, off by default, depart from the reference: plateau
stopping (``stop="plateau"``) and blocks in bfloat16 (``dtype="bfloat16"``).

Example:
    >>> from memit_lab import load_model
    >>> from memit_lab.requests import EditRequest
    >>> lm = load_model("tiny-gpt2")
    >>> r = EditRequest("The {} is located in", "Eiffel Tower", "Rome")
    >>> # a random tiny model's hidden states are small: the paper's weight decay and KL term would dominate
    >>> params = ZParams(steps=5, weight_decay=0.0, kl_weight=0.0)
    >>> res = optimise_z(lm, [r], layer=1, params=params, contexts=("{}", "Paris. {}"))
    >>> res.z.shape, res.losses[0][-1] < res.losses[0][0]
    (torch.Size([1, 64]), True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .cache import atomic_dir, cache_root, locked, read_manifest, write_manifest
from .hooks import Trace
from .models import LoadedModel
from .prompts import continuation, last_token_of_chars, padded_batch, padding_side, target_positions
from .replay import PRECISIONS, KeysValues, Recording, autocast, precision, readout, record, replay, unembed
from .requests import EditRequest, check_requests

__all__ = [
    "OPENINGS",
    "TokenisedPrompt",
    "ZParams",
    "ZResult",
    "context_templates",
    "optimise_z",
    "tokenise_prompt",
]

log = logging.getLogger(__name__)

#: The reference's openings for sampled context prefixes.
OPENINGS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class ZParams:
    """Hyper-parameters of the z optimisation (eq. 16); defaults are the paper's code for GPT-J.

    Each knob is checked when the object is made: a value the optimisation cannot use (a
    clamp of 0 would give z = h, a negative weight would reward what it should cost) is a
    ``ValueError`` saying what fits.

    Attributes:
        steps: forward passes at most (the last one only measures; ``steps - 1`` Adam updates).
        lr: Adam learning rate.
        weight_decay: weight of ``||delta|| / ||h||^2`` in the loss.
        kl_weight: weight of KL(edited || original) at the subject's last token of ``kl_template``.
        clamp: ``||delta|| <= clamp * ||h||`` after every step.
        stop_loss: a request stops when its loss falls below this.
        n_contexts: sampled context prefixes (the bare prompt is always used besides them).
        context_tokens: length of each sampled context, in tokens.
        context_seed: seed of the sampler.
        kl_template: the prompt whose next-token distribution the KL term keeps.
        chunk: requests per forward/backward pass. Larger is a little faster per request and costs about
            100 MB per request on the bundled model (z of 32 requests at L = 4, separate runs: chunk 16 89.5 s,
            24 86.8 s with a 3.3 GB peak, 32 83.0 s with 4.1 GB, over the 4 GB that MEMIT aims to stay under).
        stop: ``"plateau"`` (the default; not in the reference) stops a request when its loss falls below
            ``stop_loss``, or its NLL part below ``plateau_nll``, or when its loss fell by less than
            ``plateau_rel`` (relative) over the last ``plateau_window`` passes: requests whose KL term alone
            keeps them above ``stop_loss``, delta at the clamp, no longer run to ``steps``. ``"loss"`` (the
            reference) stops on ``stop_loss`` only. Measured (``bench/memit.py`` part 5, the same 200 fact-set
            edits of the bundled model, one run, 2 AVX2 cores): loss 1,838 s, ES/PS/NS 95.5/94.8/72.1;
            plateau 1,133 s (1.62x), 94.5/93.2/72.9 -- within the 2 points a faster default may cost.
        plateau_nll, plateau_window, plateau_rel: the thresholds of ``stop="plateau"``.
        dtype: ``"float32"`` (default), or ``"bfloat16"`` / ``"float16"``: the replayed blocks L+1..end
            under autocast, with copies of their matrices in that type (delta, the final norm and readout,
            the log-softmax, the KL term and Adam's state stay float32). Where the hardware has no native
            products of that type (CPUs without AVX512-BF16 or AMX), a logged warning and float32. Not the
            reference's arithmetic: z differs slightly.
    """

    steps: int = 25
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_weight: float = 0.0625
    clamp: float = 0.75
    stop_loss: float = 0.05
    n_contexts: int = 5
    context_tokens: int = 10
    context_seed: int = 0
    kl_template: str = "{} is a"
    chunk: int = 16
    stop: str = "plateau"
    plateau_nll: float = 0.05
    plateau_window: int = 3
    plateau_rel: float = 0.02
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "chunk", "context_tokens", "plateau_window"):
            _check_count(name, getattr(self, name), 1)
        _check_count("n_contexts", self.n_contexts, 0)
        _check_number("lr", self.lr, "Adam's step size; the paper's code uses 0.5", positive=True)
        _check_number("clamp", self.clamp, "||delta|| <= clamp * ||h||; clamp=0 would give z = h", positive=True)
        _check_number("weight_decay", self.weight_decay, "0 switches the decay term off", positive=False)
        _check_number("kl_weight", self.kl_weight, "0 switches the KL term off", positive=False)
        _check_number("stop_loss", self.stop_loss, "0 never stops early", positive=False)
        _check_number("plateau_nll", self.plateau_nll, "a request with NLL below it stops", positive=False)
        _check_number("plateau_rel", self.plateau_rel, "relative loss improvement that counts", positive=False)
        if self.stop not in ("loss", "plateau"):
            raise ValueError(f"ZParams.stop must be 'loss' (the reference) or 'plateau', got {self.stop!r}")
        if self.dtype not in PRECISIONS:
            raise ValueError(f"ZParams.dtype must be one of {sorted(PRECISIONS)}, got {self.dtype!r}")
        if not isinstance(self.kl_template, str) or self.kl_template.count("{}") != 1:
            raise ValueError(f"kl_template must contain one '{{}}' for the subject, got {self.kl_template!r}")


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"ZParams.{name} must be an int >= {least}, got {value!r}")


def _check_number(name: str, value: float, hint: str, *, positive: bool) -> None:
    """A finite real number, > 0 (``positive``) or >= 0."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > 0 if positive else value >= 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"ZParams.{name} must be a finite number {bound} ({hint}), got {value!r}")


# --- context prefixes (the x_j of eq. 16) ---------------------------------------------------------------------


def _sample_contexts(lm: LoadedModel, n: int, length: int, seed: int) -> list[str]:
    tokenizer = lm.tokenizer
    openings = [OPENINGS[i % len(OPENINGS)] for i in range(n)]
    with padding_side(tokenizer, "left"):
        enc = tokenizer(openings, return_tensors="pt", padding=True).to(lm.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = lm.model.generate(
            **enc,
            max_new_tokens=length - 1,
            do_sample=True,
            top_k=5,
            top_p=None,
            temperature=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    # The reference's recipe: braces would clash with the subject slot; a full stop separates.
    return [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]


def context_templates(
    lm: LoadedModel, n: int = 5, length: int = 10, *, seed: int = 0, use_cache: bool = True
) -> tuple[str, ...]:
    """``"{}"`` followed by ``n`` context templates ``"<text sampled from the model>. {}"`` (eq. 16's x_j).

    Each text starts with one of :data:`OPENINGS` and is ``length`` tokens long, sampled
    with top-k 5 as the reference does, but seeded; the result is cached on disk per model
    fingerprint, so every run (and every machine with the same weights and torch) sees the
    same prefixes.

    Example:
        >>> from memit_lab import load_model
        >>> t = context_templates(load_model("tiny-neox"), n=2, length=4, use_cache=False)
        >>> t[0], len(t), all(x.endswith(". {}") for x in t[1:])
        ('{}', 3, True)
    """
    if n == 0:
        return ("{}",)
    if not use_cache:
        return ("{}", *_sample_contexts(lm, n, length, seed))
    spec = json.dumps({"model": lm.fingerprint(), "n": n, "length": length, "seed": seed, "v": 1}).encode()
    folder = cache_root() / "contexts" / hashlib.blake2b(spec, digest_size=12).hexdigest()
    with locked(folder):
        if read_manifest(folder) is None:
            with atomic_dir(folder) as tmp:
                (tmp / "contexts.json").write_text(json.dumps(_sample_contexts(lm, n, length, seed)))
                write_manifest(tmp, {"n": n, "length": length, "seed": seed})
        texts = json.loads((folder / "contexts.json").read_text())
    return ("{}", *texts)


# --- tokenised prompts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenisedPrompt:
    """One prompt of eq. 16 as token ids, with where delta goes and which tokens it must predict.

    Attributes:
        ids: the prompt followed by the target's tokens but its last (teacher forcing).
        subject_last: position of the subject's last token (delta is added there).
        predict_at: positions whose logits predict a target token.
        target_ids: the target tokens they predict (empty for a KL prompt).
    """

    ids: tuple[int, ...]
    subject_last: int
    predict_at: tuple[int, ...]
    target_ids: tuple[int, ...]


def tokenise_prompt(lm: LoadedModel, request: EditRequest, context: str, target: str | None) -> TokenisedPrompt:
    """Tokenise ``context`` filled with the request's prompt, followed by `` target`` (teacher-forced).

    The subject is located by characters at its slot in the template (a context text may
    contain the subject's words too). ``target=None`` gives a prompt scored only at the
    subject's last token (the KL prompt).

    Example:
        >>> from memit_lab import load_model
        >>> lm = load_model("tiny-gpt2")
        >>> t = tokenise_prompt(lm, EditRequest("{} is in", "Paris", "Rome"), "{}", "Rome")
        >>> lm.tokenizer.decode(t.ids[t.subject_last]), [lm.tokenizer.decode(i) for i in t.target_ids]
        ('s', [' Rome'])
    """
    prompt = request.formatted(context)
    start = context.index("{}") + request.template.index("{}")
    text = prompt if target is None else continuation(prompt, target)
    enc = lm.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    last = last_token_of_chars(offsets, start, start + len(request.subject))
    if target is None:
        return TokenisedPrompt(tuple(ids[: last + 1]), last, (), ())
    targets = target_positions(offsets, prompt)
    if not targets or targets[0] <= last:
        raise ValueError(f"target {target!r} has no tokens after the subject in {text!r}")
    return TokenisedPrompt(
        tuple(ids[: targets[-1]]), last, tuple(t - 1 for t in targets), tuple(ids[t] for t in targets)
    )


# --- one chunk, split at the last subject token -----------------------------------------------------------------


@dataclass
class _Group:
    """Rows of a chunk whose suffixes have about the same length, with what their Adam steps need, computed once.

    Rows are prompts; ``owner[row]`` is the request (within the chunk) a row belongs to. The
    suffix of a row starts at its last subject token (suffix position 0). Rows are grouped by
    suffix length (:func:`_group_rows`): one batch of all rows padded to the longest suffix
    spent a third of its work on padding on the bundled model's fact set.
    """

    owner: torch.Tensor  # [rows]
    is_kl: torch.Tensor  # [rows] bool
    h_suffix: torch.Tensor  # [rows, suffix, d_model], output of block L
    suffix: Recording  # the suffix pass, blocks L+1..end recorded (to replay with delta added)
    prefix: KeysValues | None  # keys and values of the tokens before the last subject token, layers above L
    predict_at: list[tuple[int, ...]]  # suffix positions, per row
    target_ids: list[tuple[int, ...]]
    final: torch.Tensor  # [rows, d_model] the unedited model's last hidden state at suffix position 0


@dataclass
class _Chunk:
    """The requests optimised together: their prompt rows in groups, and per-request constants."""

    groups: list[_Group]
    n_prompts: int  # target prompts per request, one per context (the NLL is their mean)
    kl_init: torch.Tensor  # [requests, vocab] log-probs of the unedited model at the KL prompt
    h0: torch.Tensor  # [requests, d_model] bare-prompt h^L at the subject's last token


def _layout(
    prompts: Sequence[TokenisedPrompt], device: torch.device, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefixes left-padded, suffixes right-padded, so every row's last subject token is in one column."""
    ids_p, mask_p = padded_batch(tokenizer, [p.ids[: p.subject_last] for p in prompts], side="left")
    ids_s, mask_s = padded_batch(tokenizer, [p.ids[p.subject_last :] for p in prompts])
    pos_p = (mask_p.cumsum(1) - 1).clamp(min=0)
    pos_s = mask_p.sum(1, keepdim=True) + torch.arange(ids_s.shape[1])[None]
    return tuple(t.to(device) for t in (ids_p, mask_p, pos_p, ids_s, mask_s, pos_s))  # type: ignore[return-value]


def _prefix_kv(lm: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> KeysValues:
    """The keys and values of the prefixes (the tokens before each row's last subject token)."""
    kv = record(lm, ids, attention_mask=mask, position_ids=pos, blocks=()).kv
    for tensor in (*kv.keys, *kv.values):
        # Fully padded rows may hold NaN (a query with nothing to attend to); they are
        # masked as keys, but 0 * NaN would still poison the sum.
        tensor.nan_to_num_(0.0)
    return kv


@torch.no_grad()
def _prepare_group(
    lm: LoadedModel, prompts: Sequence[TokenisedPrompt], owner: Sequence[int], is_kl: Sequence[bool], layer: int
) -> _Group:
    """One pass of the unedited model over ``prompts``: the prefixes' key/value cache, block L's output
    on the suffixes, and each block's call above L (to replay with delta added)."""
    ids_p, mask_p, pos_p, ids_s, mask_s, pos_s = _layout(prompts, lm.device, lm.tokenizer)
    prefix = _prefix_kv(lm, ids_p, mask_p, pos_p) if ids_p.shape[1] else None
    with Trace(lm.model, lm.adapter.block(layer)) as trace:
        suffix = record(
            lm, ids_s, attention_mask=torch.cat([mask_p, mask_s], 1), position_ids=pos_s, prefix=prefix,
            blocks=range(layer + 1, lm.n_layers),
        )  # fmt: skip
    assert trace.output is not None and suffix.final is not None
    prefix = None if prefix is None else prefix.above(layer)  # the Adam steps replay only blocks L+1..
    return _Group(
        owner=torch.tensor(owner, device=lm.device),
        is_kl=torch.tensor(is_kl, device=lm.device),
        h_suffix=trace.output,
        suffix=suffix,
        prefix=prefix,
        predict_at=[tuple(t - p.subject_last for t in p.predict_at) for p in prompts],
        target_ids=[p.target_ids for p in prompts],
        final=suffix.final[:, 0],
    )


def _group_rows(lengths: Sequence[int], waste: float = 0.15) -> list[list[int]]:
    """Rows grouped by suffix length: neighbouring lengths share a group while padding stays under ``waste``
    of its tokens (one pass per length would run many small matrix products, slower per token).

    Example:
        >>> _group_rows([1, 5, 5, 1, 6, 9], waste=0.2)
        [[0, 3], [1, 2, 4], [5]]
    """
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    groups: list[list[int]] = []
    for row in order:
        if groups:
            group = groups[-1]
            padded = lengths[row] * (len(group) + 1)
            if padded - sum(lengths[r] for r in group) - lengths[row] <= waste * padded:
                group.append(row)
                continue
        groups.append([row])
    return groups


@torch.no_grad()
def _prepare(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, contexts: Sequence[str], params: ZParams
) -> _Chunk:
    """Tokenise every request's prompts (one per context, then its KL prompt) and prepare them in groups."""
    prompts: list[TokenisedPrompt] = []
    owner, is_kl, bare, kl_row = [], [], [], []
    for i, r in enumerate(requests):
        for context in contexts:
            if context == "{}":
                bare.append(len(prompts))
            prompts.append(tokenise_prompt(lm, r, context, r.target_new))
            owner.append(i)
            is_kl.append(False)
        kl_row.append(len(prompts))
        prompts.append(tokenise_prompt(lm, EditRequest(params.kl_template, r.subject, r.target_new), "{}", None))
        owner.append(i)
        is_kl.append(True)
    groups: list[_Group] = []
    where: dict[int, tuple[int, int]] = {}  # prompt row -> (group, row within it)
    for rows in _group_rows([len(p.ids) - p.subject_last for p in prompts]):
        where.update({row: (len(groups), j) for j, row in enumerate(rows)})
        groups.append(
            _prepare_group(lm, [prompts[r] for r in rows], [owner[r] for r in rows], [is_kl[r] for r in rows], layer)
        )
    h0 = torch.stack([groups[g].h_suffix[j, 0] for g, j in map(where.__getitem__, bare)]).float()
    final = torch.stack([groups[g].final[j] for g, j in map(where.__getitem__, kl_row)])
    return _Chunk(groups=groups, n_prompts=len(contexts), kl_init=unembed(lm, final).log_softmax(-1), h0=h0)


@dataclass
class _Plan:
    """What a step needs of one group for the requests still optimised: index tensors built once per active set.

    ``rows`` is ``None`` when every row of the group takes part (nothing to gather).
    """

    rows: torch.Tensor | None  # [rows] rows of the group taking part
    slot: torch.Tensor  # [rows] each row's request, as an index into the active requests
    where_row: torch.Tensor  # [targets] row (among those taking part) and suffix position of each target token
    where_pos: torch.Tensor  # [targets]
    targets: torch.Tensor  # [targets, 1] the target token ids
    weights: torch.Tensor  # [targets] 1 / (target tokens of its prompt)
    owners: torch.Tensor  # [targets] the target token's request, as an index into the active requests
    kl_rows: torch.Tensor  # [kl rows] rows (among those taking part) of KL prompts
    kl_slot: torch.Tensor  # [kl rows] their requests
    kl_init: torch.Tensor  # [kl rows, vocab] the unedited model's log-probs there


def _plan(group: _Group, chunk: _Chunk, active: torch.Tensor) -> _Plan | None:
    """The plan of ``group`` for the ``active`` requests (ascending); ``None`` when none of its rows is active."""
    rows = torch.isin(group.owner, active).nonzero()[:, 0]
    if not rows.numel():
        return None
    slot = torch.searchsorted(active, group.owner[rows])
    where_row, where_pos, targets, weights, owners, kl_rows = [], [], [], [], [], []
    for j, (row, o) in enumerate(zip(rows.tolist(), slot.tolist(), strict=True)):
        if group.is_kl[row]:
            kl_rows.append(j)
            continue
        pos = group.predict_at[row]
        where_row += [j] * len(pos)
        where_pos += list(pos)
        targets += list(group.target_ids[row])
        weights += [1.0 / len(pos)] * len(pos)
        owners += [o] * len(pos)
    device = group.owner.device

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    kl_slot = slot[index(kl_rows)]
    return _Plan(
        rows=None if rows.numel() == group.owner.numel() else rows,
        slot=slot,
        where_row=index(where_row),
        where_pos=index(where_pos),
        targets=index(targets)[:, None],
        weights=torch.tensor(weights, device=device),
        owners=index(owners),
        kl_rows=index(kl_rows),
        kl_slot=kl_slot,
        kl_init=chunk.kl_init[active[kl_slot]],
    )


def _replay(
    lm: LoadedModel, group: _Group, layer: int, rows: torch.Tensor | None, delta: torch.Tensor
) -> Float[torch.Tensor, "rows suffix d_model"]:
    """Blocks L+1..end on the suffixes of ``rows`` (``None``: all), with ``delta[row]`` added at suffix position 0."""
    h = group.h_suffix if rows is None else group.h_suffix.index_select(0, rows)
    h = torch.cat([(h[:, :1].float() + delta[:, None]).to(h.dtype), h[:, 1:]], dim=1)
    return replay(lm, group.suffix, layer + 1, h, prefix=group.prefix, rows=rows)


def _losses(
    lm: LoadedModel,
    chunk: _Chunk,
    layer: int,
    delta: torch.Tensor,
    active: torch.Tensor,
    params: ZParams,
    plans: Sequence[_Plan | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per active request (``active`` ascending, ``delta[i]`` belongs to ``active[i]``): NLL of the new object
    (mean over prompts of the per-token mean), the weighted KL term, the weighted decay term.

    ``plans``: per group, :func:`_plan` for ``active`` (built here when not given)."""
    if plans is None:
        plans = [_plan(group, chunk, active) for group in chunk.groups]
    n = active.shape[0]
    nll = torch.zeros(n, device=delta.device)
    kl = torch.zeros(n, device=delta.device)
    for group, plan in zip(chunk.groups, plans, strict=True):
        if plan is None:
            continue
        h = _replay(lm, group, layer, plan.rows, delta[plan.slot])
        if plan.targets.numel():
            logp = readout(lm, h[plan.where_row, plan.where_pos]).log_softmax(-1)
            token_nll = -logp.gather(1, plan.targets)[:, 0]
            nll = nll.index_add(0, plan.owners, token_nll * plan.weights)
        if plan.kl_rows.numel():
            kl_h = readout(lm, h[plan.kl_rows, 0]).log_softmax(-1)
            kl = kl.index_add(0, plan.kl_slot, (kl_h.exp() * (kl_h - plan.kl_init)).sum(-1))
    nll = nll / chunk.n_prompts
    wd = delta.norm(dim=-1) / chunk.h0[active].norm(dim=-1) ** 2
    return nll, params.kl_weight * kl, params.weight_decay * wd


def _going(params: ZParams, loss: torch.Tensor, nll: torch.Tensor, curves: Sequence[Sequence[float]]) -> torch.Tensor:
    """Which requests take another step: loss still >= stop_loss (the reference), and with ``stop="plateau"``
    also NLL >= plateau_nll and the loss still improving by plateau_rel over plateau_window passes.

    ``curves``: the active requests' loss curves, the current pass included.
    """
    going = loss >= params.stop_loss
    if params.stop == "plateau":
        w = params.plateau_window
        flat = [len(c) > w and c[-1 - w] - c[-1] < params.plateau_rel * c[-1 - w] for c in curves]
        going &= (nll >= params.plateau_nll) & ~torch.tensor(flat, dtype=torch.bool, device=loss.device)
    return going


def _optimise_chunk(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, contexts: Sequence[str], params: ZParams
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]], list[tuple[float, float, float]]]:
    chunk = _prepare(lm, requests, layer, contexts, params)
    n = len(requests)
    deltas = [torch.zeros(lm.d_model, device=lm.device, requires_grad=True) for _ in range(n)]
    opt = torch.optim.Adam(deltas, lr=params.lr)
    curves: list[list[float]] = [[] for _ in range(n)]
    parts: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * n
    max_norm = params.clamp * chunk.h0.norm(dim=-1)
    active = torch.arange(n, device=lm.device)
    plans = [_plan(group, chunk, active) for group in chunk.groups]
    for step in range(params.steps):
        last = step == params.steps - 1
        delta = torch.stack([deltas[int(i)] for i in active.tolist()])
        with torch.set_grad_enabled(not last):  # the last pass only measures
            nll, kl, wd = _losses(lm, chunk, layer, delta, active, params, plans)
        loss = nll + kl + wd
        for o, i in enumerate(active.tolist()):
            curves[i].append(float(loss[o].detach()))
            parts[i] = (float(nll[o].detach()), float(kl[o].detach()), float(wd[o].detach()))
        going = _going(params, loss.detach(), nll.detach(), [curves[i] for i in active.tolist()])
        if last or not going.any():
            break
        opt.zero_grad(set_to_none=True)
        loss[going].sum().backward()
        for o, i in enumerate(active.tolist()):
            if not going[o]:
                deltas[i].grad = None  # Adam skips it: a converged request stays where it stopped
        opt.step()
        with torch.no_grad():
            for i in active.tolist():
                norm = deltas[i].norm()
                if norm > max_norm[i]:
                    deltas[i].mul_(max_norm[i] / norm)
        if not going.all():
            active = active[going]
            plans = [_plan(group, chunk, active) for group in chunk.groups]
    return chunk.h0, torch.stack([d.detach() for d in deltas]), curves, parts


# --- the public entry point -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZResult:
    """Targets z = h + delta for a batch of requests (eq. 16), with their loss curves.

    Attributes:
        h: ``[n_edits, d_model]`` the unedited hidden state at layer L, subject's last token, bare prompt.
        z: ``[n_edits, d_model]`` the optimised target hidden state.
        losses: per request, the total loss at each forward pass (its length = passes made).
        final_parts: per request, (NLL, KL term, weight-decay term) at the last pass.
        layer: L, where z lives.
        contexts: the prompt templates used (``"{}"`` first).
    """

    h: Float[torch.Tensor, "n_edits d_model"]
    z: Float[torch.Tensor, "n_edits d_model"]
    losses: tuple[tuple[float, ...], ...]
    final_parts: tuple[tuple[float, float, float], ...]
    layer: int
    contexts: tuple[str, ...]

    @property
    def delta(self) -> Float[torch.Tensor, "n_edits d_model"]:
        return self.z - self.h

    def select(self, rows: Sequence[int]) -> ZResult:
        """The targets of the requests at ``rows`` (z of one request does not depend on the others in its batch).

        Example:
            >>> losses = ((1.0,), (2.0,), (3.0,))
            >>> res = ZResult(torch.zeros(3, 2), torch.ones(3, 2), losses, ((0.0, 0.0, 0.0),) * 3, 1, ("{}",))
            >>> res.select([2, 0]).losses
            ((3.0,), (1.0,))
        """
        index = list(rows)
        return dataclasses.replace(
            self,
            h=self.h[index],
            z=self.z[index],
            losses=tuple(self.losses[i] for i in index),
            final_parts=tuple(self.final_parts[i] for i in index),
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per request: steps, first and last loss, NLL/KL/decay parts, ||delta|| / ||h||."""
        rel = (self.delta.norm(dim=-1) / self.h.norm(dim=-1)).tolist()
        return pd.DataFrame(
            [
                {
                    "request": i,
                    "passes": len(c),
                    "loss_first": c[0],
                    "loss_last": c[-1],
                    "nll": p[0],
                    "kl": p[1],
                    "decay": p[2],
                    "delta_rel_norm": r,
                }
                for i, (c, p, r) in enumerate(zip(self.losses, self.final_parts, rel, strict=True))
            ]
        )

    def plot(self, ax: Any = None) -> Any:
        """Loss curves, one line per request (log scale)."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(5.5, 3.5))
        for i, curve in enumerate(self.losses):
            ax.plot(range(len(curve)), curve, marker=".", label=f"#{i}" if len(self.losses) <= 10 else None)
        ax.set(yscale="log", xlabel="Adam step", ylabel="loss (eq. 16 + KL + decay)", title=f"z at layer {self.layer}")
        if len(self.losses) <= 10:
            ax.legend(fontsize="small")
        return ax


def _check_contexts(contexts: Sequence[str]) -> tuple[str, ...]:
    """Templates with one ``{}`` each, the bare ``"{}"`` among them, none twice (h is read at the bare one).

    Example:
        >>> _check_contexts(["{}", "Hello. {}", "{}"])
        Traceback (most recent call last):
        ...
        ValueError: contexts must be distinct, got '{}' 2 times in ('{}', 'Hello. {}', '{}'); drop the repeats
    """
    contexts = tuple(contexts)
    if "{}" not in contexts or any(not isinstance(c, str) or c.count("{}") != 1 for c in contexts):
        raise ValueError(f"contexts must each contain one '{{}}' and include the bare '{{}}'; got {contexts}")
    for context in contexts:
        if contexts.count(context) > 1:
            raise ValueError(
                f"contexts must be distinct, got {context!r} {contexts.count(context)} times in {contexts}; "
                "drop the repeats"
            )
    return contexts


def optimise_z(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    params: ZParams | None = None,
    *,
    contexts: Sequence[str] | None = None,
    batched: bool = True,
    progress: bool = False,
) -> ZResult:
    """Optimise z_i = h_i^L + delta_i for every request (eq. 16, with the reference's additions).

    Args:
        lm: the model (its weights are not changed).
        requests: the edits; checked first (:func:`memit_lab.requests.check_requests`).
        layer: L, the top edit layer (delta is added to block L's output).
        params: :class:`ZParams` (defaults when ``None``).
        contexts: prompt templates with ``{}`` for the prompt; ``None`` samples
            ``params.n_contexts`` of them with :func:`context_templates`. ``"{}"`` (the bare
            prompt) must be among them: h is read there. Each may appear once.
        batched: ``False`` optimises one request at a time (same optimum, slower; for checks).
        progress: show a progress bar over chunks.
    """
    params = params or ZParams()
    requests = check_requests(requests, lm.tokenizer)
    if not 0 <= layer < lm.n_layers:
        raise ValueError(f"layer must be in 0..{lm.n_layers - 1}, got {layer}")
    if contexts is None:
        contexts = context_templates(lm, params.n_contexts, params.context_tokens, seed=params.context_seed)
    contexts = _check_contexts(contexts)
    size = params.chunk if batched else 1
    # Similar lengths share a chunk: less padding.
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].text))
    h = torch.zeros(len(requests), lm.d_model, device=lm.device)
    z = torch.zeros_like(h)
    curves: list[tuple[float, ...]] = [()] * len(requests)
    parts: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)] * len(requests)
    with autocast(lm, precision(lm, params.dtype), range(layer + 1, lm.n_layers)):
        for lo in tqdm(range(0, len(order), size), desc="z (eq. 16)", disable=not progress):
            idx = order[lo : lo + size]
            h0, delta, c, p = _optimise_chunk(lm, [requests[i] for i in idx], layer, contexts, params)
            h[idx], z[idx] = h0, h0 + delta
            for j, i in enumerate(idx):
                curves[i], parts[i] = tuple(c[j]), p[j]
    log.info("z optimised for %d requests at layer %d", len(requests), layer)
    return ZResult(h, z, tuple(curves), tuple(parts), layer, contexts)
