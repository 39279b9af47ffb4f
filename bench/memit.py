"""Benchmark: MEMIT's z optimisation (eq. 16) straightforward vs memit_lab's, then MEMIT end to end.

Part 1, same run, same requests, same contexts and hyper-parameters:

* straightforward: all requests in one batch; every Adam step runs the whole model on every
  prompt (delta added by a hook at layer L) and takes full-vocabulary logits at every
  position; a converged request is frozen (no gradient) but still computed;
* memit_lab (:func:`memit_lab.zopt.optimise_z`): lower layers and the tokens before the
  last subject token computed once; blocks L+1..end only on the tokens from the last
  subject token on; logits only where a target is predicted; converged requests leave
  the batch; chunks of ``ZParams.chunk`` requests.

Printed: both times, the ratio (goal >= 5x), the max difference of final losses and of z.

Part 2: ``apply_memit`` end to end for --n-edits (100 and 1000 by default) counterfactual
requests made from the bundled fact set, with z / keys / solve times separately and the
peak memory (resident set of this process, ru_maxrss). Goal: 1,000 edits <= 15 min,
peak <= 4 GB.

Usage: .venv/bin/python bench/memit.py [--n-z 32] [--n-edits 100 1000] [--skip-reference]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Sequence

import torch

from memit_lab import load_model
from memit_lab.hooks import Trace
from memit_lab.models import LoadedModel
from memit_lab.requests import EditRequest
from memit_lab.zopt import ZParams, context_templates, optimise_z, tokenise_prompt


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def straightforward_z(
    lm: LoadedModel, requests: Sequence[EditRequest], layer: int, contexts: Sequence[str], params: ZParams
) -> tuple[torch.Tensor, list[float]]:
    """The textbook batched z optimisation: full forward, full logits, every step. Returns z and final losses."""
    rows = []
    for i, r in enumerate(requests):
        rows += [(i, tokenise_prompt(lm, r, c, r.target_new)) for c in contexts]
        rows.append((i, tokenise_prompt(lm, EditRequest(params.kl_template, r.subject, r.target_new), "{}", None)))
    width = max(len(p.ids) for _, p in rows)
    ids = torch.full((len(rows), width), lm.tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for j, (_, p) in enumerate(rows):
        ids[j, : len(p.ids)] = torch.tensor(p.ids)
        mask[j, : len(p.ids)] = 1
    owner = torch.tensor([i for i, _ in rows])
    subj = torch.tensor([p.subject_last for _, p in rows])
    kl_rows = [j for j, (_, p) in enumerate(rows) if not p.target_ids]
    # every (row, position, target token) of the NLL, with the weight that averages per prompt and per request
    t_row, t_pos, t_tok, t_w, t_own = [], [], [], [], []
    for j, (i, p) in enumerate(rows):
        for pos, tok in zip(p.predict_at, p.target_ids, strict=True):
            t_row.append(j)
            t_pos.append(pos)
            t_tok.append(tok)
            t_w.append(1 / (len(p.target_ids) * len(contexts)))
            t_own.append(i)
    n = len(requests)
    delta = torch.zeros(n, lm.d_model, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def add_delta(out: torch.Tensor, name: str) -> torch.Tensor:
        state["h"] = out.detach()
        out = out.clone()
        out[torch.arange(len(rows)), subj] += delta[owner]
        return out

    with torch.no_grad(), Trace(lm.model, lm.adapter.block(layer)) as trace:
        init = lm.model(input_ids=ids, attention_mask=mask).logits[kl_rows, subj[kl_rows]].log_softmax(-1)
    assert trace.output is not None
    bare = [j for j, (_, p) in enumerate(rows) if p.target_ids][:: len(contexts)]
    h0 = trace.output[bare, subj[bare]]
    opt = torch.optim.Adam([delta], lr=params.lr)
    frozen = torch.zeros(n, dtype=torch.bool)
    final = torch.zeros(n)
    for step in range(params.steps):
        with Trace(lm.model, lm.adapter.block(layer), edit_output=add_delta):
            logp = lm.model(input_ids=ids, attention_mask=mask).logits.log_softmax(-1)
        picked = -logp[t_row, t_pos, t_tok] * torch.tensor(t_w)
        nll = torch.zeros(n).index_add(0, torch.tensor(t_own), picked)
        cur = logp[kl_rows, subj[kl_rows]]
        kl = params.kl_weight * (cur.exp() * (cur - init)).sum(-1)
        wd = params.weight_decay * delta.norm(dim=-1) / h0.norm(dim=-1) ** 2
        loss = nll + kl + wd
        final = torch.where(frozen, final, loss.detach())
        frozen |= loss.detach() < params.stop_loss
        if step == params.steps - 1 or frozen.all():
            break
        opt.zero_grad()
        loss[~frozen].sum().backward()
        before = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[frozen] = before[frozen]  # Adam's momentum would move a converged request: undo it
            norms = delta.norm(dim=-1, keepdim=True)
            limit = params.clamp * h0.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)))
    return h0 + delta.detach(), final.tolist()


def compare_z(lm: LoadedModel, requests: Sequence[EditRequest], layer: int, params: ZParams) -> None:
    contexts = context_templates(lm, params.n_contexts, params.context_tokens, seed=params.context_seed)
    start = time.perf_counter()
    z_ref, loss_ref = straightforward_z(lm, requests, layer, contexts, params)
    t_ref = time.perf_counter() - start
    print(f"straightforward z, {len(requests)} requests: {t_ref:.1f} s ({t_ref / len(requests):.2f} s/edit)")
    start = time.perf_counter()
    res = optimise_z(lm, requests, layer, params, contexts=contexts)
    t_new = time.perf_counter() - start
    loss_new = [c[-1] for c in res.losses]
    print(f"memit_lab z,       {len(requests)} requests: {t_new:.1f} s ({t_new / len(requests):.2f} s/edit)")
    print(f"ratio: {t_ref / t_new:.1f}x (goal >= 5x)")
    print(f"max |final loss difference|: {max(abs(a - b) for a, b in zip(loss_ref, loss_new, strict=True)):.2e}")
    print(f"max |z difference|: {(z_ref - res.z).abs().max().item():.2e} (max |z| {res.z.abs().max().item():.1f})")
