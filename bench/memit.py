"""Benchmark: MEMIT's z optimisation (eq. 16) straightforward vs memit_lab's, then MEMIT end to end.

Part 1, same run, same requests, same contexts and hyper-parameters:

* straightforward: all requests in one batch; every Adam step runs the whole model on every
  prompt (delta added by a hook at layer L) and takes full-vocabulary logits at every
  position; a converged request is frozen (no gradient) but still computed;
* memit_lab (:func:`memit_lab.zopt.optimise_z`): lower layers and the tokens before the
  last subject token computed once; blocks L+1..end only on the tokens from the last
  subject token on; logits only where a target is predicted; converged requests leave
  the batch; chunks of ``ZParams.chunk`` requests.

Printed: both times, the ratio (goal >= 5x), the max difference of final losses and of z; how the passes of the
float32 path with the reference's stopping (``stop="loss"``, the default before plateau stopping) are spent (how
many requests run every pass and end above stop_loss, delta at the clamp); then, for the same requests and
contexts, each variant (``--variants``: plateau stopping -- the default now --, bfloat16, both): time, ratio to
the loss-stop float32 path and max ||z - z_float32|| / ||delta_float32||.

Part 2: ``apply_memit`` end to end for --n-edits (100 and 1000 by default) counterfactual
requests made from the bundled fact set, with z / keys / solve times separately and the
peak memory (resident set of its own process, VmHWM). Goal: 1,000 edits <= 15 min,
peak <= 4 GB.

Part 3: edit quality at --quality-at edits (100 by default): ES / PS / NS of the paper's CounterFact scoring on
memit_lab's fact set, edited and unedited. Goals: ES >= 95, PS >= 80, NS within 5 points of the unedited model.

Part 4 (with --compare-layers): edit quality of the same --compare-n edits written into each given layer range
R (e.g. ``3-7 0-4``: the measured default against causal tracing's recommendation), other settings the defaults.

Part 5 (with --quality-variants): ES / PS / NS of the same --quality-n (200) fact-set edits with the
float32 z and each variant; a variant may become the default only within 2 points on each.

Part 6 (with --zsre N): z for the same N known facts as fact-set requests, as zsRE questions with their true
answers, and as questions with the fact set's new objects: time per edit, passes, tokens replayed, target length,
final NLL (why zsRE-style requests are slower).

Usage: .venv/bin/python bench/memit.py [--n-z 32] [--n-edits 100 1000] [--quality-at 100] [--skip-reference]
       [--skip-baseline] [--variants plateau bf16 plateau+bf16]
       [--compare-layers 3-7 0-4 --compare-n 100] [--quality-variants plateau+bf16 --quality-n 200]
       [--zsre 16 --zsre-variant plateau+bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memit_lab import load_model
from memit_lab.datasets import load_factset
from memit_lab.evaluate import counterfact_scores, counterfact_summary
from memit_lab.experiments import edit_request
from memit_lab.hooks import Trace
from memit_lab.hparams import MemitHyperParams
from memit_lab.memit import apply_memit
from memit_lab.models import LoadedModel
from memit_lab.requests import EditRequest
from memit_lab.zopt import ZParams, context_templates, optimise_z, tokenise_prompt


def peak_gb() -> float:
    """Peak resident memory of this process so far, in GB.

    Linux's VmHWM (the high-water mark of this process's own memory map), not ``ru_maxrss``: a spawned
    child's ru_maxrss starts from its parent's peak (Linux carries it across fork and exec), so after part 1
    it would report part 1's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # other systems: an upper bound


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


def reference_stop(z: ZParams) -> ZParams:
    """The float32 path with the reference's stopping (loss below stop_loss), the default before plateau."""
    return dataclasses.replace(z, stop="loss", dtype="float32")


#: Part 1's variants of the float32 loss-stop path: name -> the ZParams fields they change.
VARIANTS: dict[str, dict[str, Any]] = {
    "plateau": {"stop": "plateau"},
    "bf16": {"dtype": "bfloat16"},
    "plateau+bf16": {"stop": "plateau", "dtype": "bfloat16"},
}


def timed_z(lm: LoadedModel, requests: Sequence[EditRequest], layer: int, params: ZParams, contexts: Any) -> Any:
    start = time.perf_counter()
    res = optimise_z(lm, requests, layer, params, contexts=contexts)
    return res, time.perf_counter() - start


def passes_report(res: Any, params: ZParams) -> None:
    """How the passes of the loss-stop path are spent: the histogram, and the requests that stall above stop_loss."""
    frame = res.to_frame()
    counts = frame["passes"].value_counts().sort_index()
    print(f"   passes per request (float32): mean {frame['passes'].mean():.1f} of {params.steps}; "
          + ", ".join(f"{k}: {v}" for k, v in counts.items()))  # fmt: skip
    stalled = frame[(frame["passes"] == params.steps) & (frame["loss_last"] >= params.stop_loss)]
    at_clamp = stalled[stalled["delta_rel_norm"] >= params.clamp * (1 - 1e-4)]
    if not len(stalled):
        return
    print(f"   ran all {params.steps} passes and ended above stop_loss {params.stop_loss}: {len(stalled)} of "
          f"{len(frame)} ({len(at_clamp)} with delta at the clamp); their last loss {stalled['loss_last'].min():.3f}"
          f"-{stalled['loss_last'].max():.3f}, NLL part {stalled['nll'].min():.3f}-{stalled['nll'].max():.3f}, "
          f"KL term {stalled['kl'].min():.3f}-{stalled['kl'].max():.3f}")  # fmt: skip


def compare_z(
    lm: LoadedModel,
    requests: Sequence[EditRequest],
    layer: int,
    params: ZParams,
    variants: Sequence[str],
    baseline: bool,
) -> None:
    contexts = context_templates(lm, params.n_contexts, params.context_tokens, seed=params.context_seed)
    if baseline:
        start = time.perf_counter()
        z_ref, loss_ref = straightforward_z(lm, requests, layer, contexts, params)
        t_ref = time.perf_counter() - start
        print(f"straightforward z, {len(requests)} requests: {t_ref:.1f} s ({t_ref / len(requests):.2f} s/edit)")
    res, t_new = timed_z(lm, requests, layer, params, contexts)
    print(f"memit_lab z float32, stop='loss' (the default before plateau), {len(requests)} requests: {t_new:.1f} s "
          f"({t_new / len(requests):.2f} s/edit), {sum(map(len, res.losses))} passes")  # fmt: skip
    if baseline:
        loss_new = [c[-1] for c in res.losses]
        print(f"ratio: {t_ref / t_new:.1f}x (goal >= 5x)")
        print(f"max |final loss difference|: {max(abs(a - b) for a, b in zip(loss_ref, loss_new, strict=True)):.2e}")
        print(f"max |z difference|: {(z_ref - res.z).abs().max().item():.2e} (max |z| {res.z.abs().max().item():.1f})")
    passes_report(res, params)
    delta_norm = res.delta.norm(dim=-1)
    for name in variants:
        other, took = timed_z(lm, requests, layer, dataclasses.replace(params, **VARIANTS[name]), contexts)
        rel = float(((other.z - res.z).norm(dim=-1) / delta_norm).max())
        mean_rel = float(((other.z - res.z).norm(dim=-1) / delta_norm).mean())
        losses = [c[-1] for c in other.losses]
        vs_base = f", {t_ref / took:.1f}x the straightforward" if baseline else ""
        print(f"memit_lab z {name:13} {took:7.1f} s ({took / len(requests):.2f} s/edit): {t_new / took:.2f}x float32"
              f"{vs_base}; {sum(map(len, other.losses))} passes; ||dz|| / ||delta|| max {rel:.3f} mean {mean_rel:.3f}; "
              f"final loss max {max(losses):.3f}, NLL max {max(p[0] for p in other.final_parts):.3f}")  # fmt: skip


def scores_text(scores: Any) -> str:
    """S, ES, PS, NS of a CounterFact summary (x 100) on one line."""
    return "  ".join(f"{c} {scores[c]:5.1f}" for c in ("S", "ES", "PS", "NS"))


# --- part 2: MEMIT end to end, in a fresh process per size (so the peak memory is its own) ----------------------


def _end_to_end(n: int, quality: bool, queue: Any) -> None:
    """Child process: edit ``n`` fact-set records with apply_memit; send back phases, peak memory and scores."""
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    records = load_factset(n=n)
    if len(records) < n:
        queue.put({"n": n, "error": f"the fact set has only {len(records)} records"})
        return
    requests = [edit_request(r) for r in records]
    base = peak_gb()
    start = time.perf_counter()
    result = apply_memit(lm, requests, progress=False)
    total = time.perf_counter() - start
    out: dict[str, Any] = {"n": n, "total": total, "phases": result.seconds, "peak_gb": peak_gb(), "load_gb": base}
    if quality:
        out["edited"] = counterfact_summary(counterfact_scores(lm, records, progress=False)).to_dict()
        result.restore()
        out["unedited"] = counterfact_summary(counterfact_scores(lm, records, progress=False)).to_dict()
    queue.put(out)


def end_to_end(n: int, quality: bool) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_end_to_end, args=(n, quality, queue))
    child.start()
    out = queue.get()
    child.join()
    if "error" in out:
        print(f"{n} edits: skipped ({out['error']})")
        return
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in out["phases"].items())
    print(f"{n} edits end to end: {out['total']:.1f} s ({out['total'] / n:.2f} s/edit; {phases})")
    print(f"   peak memory (VmHWM of its process): {out['peak_gb']:.2f} GB (after loading: {out['load_gb']:.2f} GB)")
    if quality:
        print(f"   quality at {n} edits (CounterFact %):")
        for name in ("unedited", "edited"):
            print(f"     {name:9} {scores_text(out[name])}")
        ns_gap = out["edited"]["NS"] - out["unedited"]["NS"]
        print(
            f"   goals: ES >= 95: {out['edited']['ES']:.1f}; PS >= 80: {out['edited']['PS']:.1f}; "
            f"NS within 5 of unedited: {ns_gap:+.1f}"
        )


# --- part 4: which layers ------------------------------------------------------------------------------------------


def compare_layers(ranges: Sequence[str], n: int) -> None:
    lm = load_model("smollm2-135m")
    records = load_factset(known=True, n=n)
    requests = [edit_request(r) for r in records]
    unedited = counterfact_summary(counterfact_scores(lm, records, progress=False))
    print(f"   {'unedited':9} {scores_text(unedited)}")
    for text in ranges:
        lo, _, hi = text.partition("-")
        layers = tuple(range(int(lo), int(hi or lo) + 1))
        start = time.perf_counter()
        result = apply_memit(lm, requests, layers=layers)
        took = time.perf_counter() - start
        scores = counterfact_summary(counterfact_scores(lm, records, progress=False))
        result.restore()
        print(f"   R={text:7} {scores_text(scores)}  (residual left at L {result.residual_after:.2f}, {took:.0f} s)")


# --- part 5: does a faster z cost edit quality? ------------------------------------------------------------------


def compare_variants_quality(variants: Sequence[str], n: int) -> None:
    """ES / PS / NS of the same ``n`` fact-set edits with the loss-stop float32 z and with each variant, same run."""
    lm = load_model("smollm2-135m")
    records = load_factset(n=n)
    requests = [edit_request(r) for r in records]
    hp = MemitHyperParams.for_model(lm)
    unedited = counterfact_summary(counterfact_scores(lm, records, progress=False))
    print(f"   {'unedited':14} {scores_text(unedited)}")
    rows: dict[str, Any] = {}
    for name in ["float32", *variants]:
        z = dataclasses.replace(reference_stop(hp.z), **VARIANTS.get(name, {}))
        start = time.perf_counter()
        result = apply_memit(lm, requests, dataclasses.replace(hp, z=z))
        took = time.perf_counter() - start
        rows[name] = counterfact_summary(counterfact_scores(lm, records, progress=False))
        result.restore()
        gaps = "" if name == "float32" else "  (" + ", ".join(
            f"{c} {rows[name][c] - rows['float32'][c]:+.1f}" for c in ("ES", "PS", "NS")) + ")"  # fmt: skip
        print(f"   {name:14} {scores_text(rows[name])}  edit {took:.0f} s ({took / n:.2f} s/edit){gaps}")
    for name in variants:
        worst = max(abs(rows[name][c] - rows["float32"][c]) for c in ("ES", "PS", "NS"))
        print(f"   goal: {name} within 2 points of float32 on ES, PS and NS: worst gap {worst:.1f} "
              f"-> {'holds' if worst <= 2 else 'does not hold'}")  # fmt: skip


# --- part 6: why are zsRE-style requests slower? ---------------------------------------------------------------


def zsre_report(lm: LoadedModel, name: str, requests: Sequence[EditRequest], layer: int, params: ZParams) -> float:
    """Optimise z for ``requests``; print time per edit, passes, suffix and target lengths, final NLL."""
    contexts = context_templates(lm, params.n_contexts, params.context_tokens, params.context_seed)
    res, took = timed_z(lm, requests, layer, params, contexts)
    prompts = [tokenise_prompt(lm, r, "{}", r.target_new) for r in requests]
    suffix = sum(len(p.ids) - p.subject_last for p in prompts) / len(prompts)
    target = sum(len(p.target_ids) for p in prompts) / len(prompts)
    passes = sum(map(len, res.losses)) / len(requests)
    nll = sum(p[0] for p in res.final_parts) / len(requests)
    print(f"   {name:34} {took / len(requests):5.2f} s/edit  passes {passes:4.1f}  tokens from the last subject "
          f"token {suffix:4.1f}  target tokens {target:3.1f}  final NLL {nll:.3f}")  # fmt: skip
    return took / len(requests)


def compare_zsre(n: int, variant: str | None) -> None:
    """The same facts as fact-set requests and as zsRE questions (question_slice): what makes a question slower."""
    from memit_lab.experiments import question_slice

    lm = load_model("smollm2-135m")
    hp = MemitHyperParams.for_model(lm)
    params = dataclasses.replace(hp.z, **VARIANTS.get(variant or "", {}))
    questions = question_slice(load_factset(known=True), n=n)
    by_id = {r.case_id: r for r in load_factset(known=True)}
    facts = [by_id[q.case_id] for q in questions]
    print(f"   z at L = {hp.layers[-1]}, {variant or 'float32'}, the same {n} known facts in three forms:")
    base = zsre_report(lm, "fact set: template -> new object", [edit_request(r) for r in facts], hp.layers[-1], params)
    asked = [EditRequest(q.prompt, q.subject, q.target) for q in questions]
    zsre = zsre_report(lm, "zsRE: question -> true answer", asked, hp.layers[-1], params)
    new = [EditRequest(q.prompt, q.subject, r.target_new) for q, r in zip(questions, facts, strict=True)]
    zsre_new = zsre_report(lm, "question -> the fact set's new object", new, hp.layers[-1], params)
    print(f"   per-edit ratio to the fact set: zsRE {zsre / base:.2f}x, question with the new object "
          f"{zsre_new / base:.2f}x (goal: zsRE within 1.5x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n-z", type=int, default=32, help="requests for the z comparison")
    parser.add_argument("--n-edits", type=int, nargs="*", default=[100, 1000], help="sizes for end-to-end runs")
    parser.add_argument("--quality-at", type=int, default=100, help="score edit quality at this size (0: never)")
    parser.add_argument("--skip-reference", action="store_true", help="skip part 1 (the z comparison)")
    parser.add_argument("--skip-baseline", action="store_true", help="part 1 without the straightforward z")
    parser.add_argument(
        "--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
        help="part 1: switches compared with the loss-stop float32 path (none: that path alone)",
    )  # fmt: skip
    parser.add_argument("--compare-layers", nargs="*", default=[], help="layer ranges for part 4, e.g. 3-7 0-4")
    parser.add_argument("--compare-n", type=int, default=100, help="known facts edited in part 4")
    parser.add_argument(
        "--quality-variants", nargs="*", default=[], choices=list(VARIANTS),
        help="part 5: edit quality of these z variants against float32 on the same --quality-n edits",
    )  # fmt: skip
    parser.add_argument("--quality-n", type=int, default=200, help="fact-set edits scored in part 5")
    parser.add_argument("--zsre", type=int, default=0, help="part 6: facts compared as zsRE")
    parser.add_argument("--zsre-variant", default=None, choices=list(VARIANTS), help="part 6's z variant")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times include any other load on the machine")
    if not args.skip_reference:
        lm = load_model("smollm2-135m")
        hp = MemitHyperParams.for_model(lm)
        requests = [edit_request(r) for r in load_factset(n=args.n_z)]
        print(f"\n== part 1: z optimisation (eq. 16) at layer {hp.layers[-1]}, {reference_stop(hp.z)}")
        compare_z(lm, requests, hp.layers[-1], reference_stop(hp.z), args.variants, baseline=not args.skip_baseline)
        del lm
    for n in args.n_edits:
        print(f"\n== part 2: apply_memit, {n} edits (bundled fact set, default hyper-parameters)")
        end_to_end(n, quality=n == args.quality_at)
    if args.compare_layers:
        print(f"\n== part 4: edit quality by layer range R, {args.compare_n} known facts (CounterFact %)")
        compare_layers(args.compare_layers, args.compare_n)
    if args.quality_variants:
        print(f"\n== part 5: edit quality of z variants, the same {args.quality_n} fact-set edits (CounterFact %)")
        compare_variants_quality(args.quality_variants, args.quality_n)
    if args.zsre:
        print(f"\n== part 6: zsRE-style requests against fact-set requests, {args.zsre} facts")
        compare_zsre(args.zsre, args.zsre_variant)


if __name__ == "__main__":
    main()
