# ruff: noqa: RUF001  (the markdown cells use typographic dashes and signs on purpose)
"""Writes notebooks/02_causal_tracing.ipynb (unexecuted) from the cells below; then execute it with
`.venv/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/02_causal_tracing.ipynb`."""

from pathlib import Path

import nbformat as nbf

cells = []


def md(s: str) -> None:
    cells.append(nbf.v4.new_markdown_cell(s.strip()))


def code(s: str, ignore: bool = False) -> None:
    c = nbf.v4.new_code_cell(s.strip())
    if ignore:
        c.metadata["tags"] = ["nbval-ignore-output"]
    cells.append(c)


md(r"""
# 02 · Causal tracing: where does the model keep a fact?

MEMIT writes new facts into the MLP weights $W_{out}^l$ of a few layers $R$. Which layers? The answer comes from
**causal tracing** (ROME, Meng et al. 2022, section 2), the experiment behind MEMIT's figure 2: break the model's
knowledge of a fact by corrupting the subject, then repair one internal state at a time and watch how much of the
answer comes back.

This notebook traces the bundled model (SmolLM2-135M, 30 layers):

1. the three runs (clean, corrupted, corrupted-with-restoration) for *"The Eiffel Tower is located in the city of"*;
2. the same fact traced three ways: hidden states, MLP outputs, attention outputs (ROME figure 1);
3. the *severed* comparison that separates the MLP path from the attention path (ROME figure 3);
4. the average indirect effect over 20 facts the model knows (ROME figure 2);
5. the edit layers $R$ this evidence recommends for MEMIT, and what it cannot show (the layer-0 confound);
6. a cell to trace a fact of your own.

Everything is computed by `memit_lab.tracing`. You need notebook 01's picture of the residual stream (eq. 2–6).
""")

code(r"""
import matplotlib.pyplot as plt
import pandas as pd
import torch

from memit_lab import load_model
from memit_lab.facts import KNOWN_FACTS
from memit_lab.layer_choice import first_mlp_share, recommend_layers
from memit_lab.memit import MemitHyperParams
from memit_lab.tracing import (
    KINDS,
    average_indirect_effect,
    embedding_noise,
    restored_prob,
    subject_embedding_noise,
    trace,
    trace_all,
)
from memit_lab.tracing_plots import plot_average_effect, plot_recommendation, plot_trace

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 160)
lm = load_model("smollm2-135m")
""")

md(r"""
## 1. Three runs of one prompt

For a fact $(s, r, o)$ = (*Eiffel Tower*, *is located in*, *Paris*) and its prompt:

* **clean run**: the model reads the prompt and gives *Paris* a probability $P[o]$;
* **corrupted run**: Gaussian noise is added to the **embeddings of the subject's tokens**, so the model no longer
  "sees" which landmark is meant; $P_*[o]$ falls. The noise's standard deviation is 3 × a standard deviation of the
  embeddings: ROME's code takes it over the embeddings of its known facts' subjects (`subject_embedding_noise`),
  memit_lab's default over all embedding weights (`embedding_noise`). The cell below prints both; the traces here use
  the default, and section 5 repeats the layer choice with ROME's;
* **corrupted-with-restoration run**: corrupted, except that one internal state — the hidden state $h_i^l$ of
  token $i$ after block $l$ (eq. 2), or the MLP outputs $m_i^l$ (eq. 4), or the attention outputs $a_i^l$ (eq. 3)
  of a window of 10 layers around $l$ — is set back to its clean value. The probability it recovers, minus $P_*[o]$,
  is the **indirect effect** of that state.

The noise is random, so every cell averages several noise draws (ROME: 10; here 2, to keep the notebook within a
few minutes on two CPU cores — the command line `memit-lab trace` uses 10). The draws are seeded: the same call
gives the same numbers.
""")

code(r"""
prompt, subject, target = "The Eiffel Tower is located in the city of", "Eiffel Tower", "Paris"
SAMPLES = 2
print(f"noise standard deviation, 3 x std of all embedding weights (default): {embedding_noise(lm):.3f}")
print(f"noise standard deviation, 3 x std of the known subjects' embeddings (ROME): {subject_embedding_noise(lm):.3f}")
traces = trace_all(lm, prompt, subject, target, samples=SAMPLES)
hidden = traces["hidden"]
start, end = hidden.subject_span
print(f"tokens: {hidden.tokens}")
print(f"subject tokens (corrupted): positions {start}..{end - 1} = {hidden.tokens[start:end]}")
print(f"P({hidden.target!r}): clean {hidden.clean_prob:.3f}, corrupted {hidden.corrupted_prob:.3f}")
""")

md(r"""
### Check: restoring everything the noise touched gives the clean run back

The noise sits on the subject's embeddings only. If we restore the output of the **first** block at every position
from the subject on, every later computation sees clean inputs again (tokens before the subject were never
corrupted), so the probability must come back exactly. `restored_prob` takes any list of `(kind, layer, position)`
states to restore.
""")

code(r"""
everything = [("hidden", 0, pos) for pos in range(start, len(hidden.tokens))]
back = restored_prob(lm, prompt, subject, everything, target=target, samples=SAMPLES)
print(f"expected: {hidden.clean_prob:.3f} (clean)   measured: {back:.3f}")  # the 4th decimal is on a rounding edge
assert abs(back - hidden.clean_prob) < 1e-5
""")

md(r"""
## 2. One fact, traced three ways

Each heatmap has one row per token (subject tokens marked `*`) and one column per layer; the colour is the
probability of *Paris* after restoring that single state. Purple: the hidden state $h_i^l$. Green: the MLP outputs of
the 10 layers centred on $l$. Red: the attention outputs of those 10 layers.

What to look for (ROME's figure 1 on GPT-2 XL shows the same shapes):

* **hidden states**: two bright regions — at the subject in early layers, and at the last token in late layers.
  In between, the information moves from the subject to the last token;
* **MLP**: bright at the subject in early-to-middle layers — the MLPs there *recall* something about the subject;
* **attention**: bright at the last token in later layers — attention *moves* what was recalled to where the answer
  is said.

On this model the MLP map is brightest in the windows that hold layer 0; section 5 measures what that means.
""")

code(r"""
fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
for ax, kind in zip(axes, KINDS, strict=True):
    plot_trace(traces[kind], ax=ax)
plt.show()
""")

md(r"""
The three strongest cells of each kind (`score` = restored probability, `indirect_effect` = score − corrupted):
""")

code(r"""
pd.concat({kind: traces[kind].peaks(3) for kind in KINDS})
""")

md(r"""
Note which subject token matters. With this tokenizer *Eiffel Tower* is split into several pieces, and the
decisive one need not be the **last** subject token (ROME and MEMIT always edit at the last subject token). The
table below gives, for each subject token, the best probability its hidden state recovers in the first 15 layers.
""")

code(r"""
early = hidden.scores[:15, start:end].max(0).values
pd.DataFrame({"token": hidden.tokens[start:end], "best P(Paris), layers 0-14": early.numpy()}).round(3)
""")

md(r"""
### Check: the fast grid equals the one-pass-per-cell loop

The reference code (and `batched=False`) runs one forward pass per cell. `memit_lab` computes the grid without
redoing work the restoration cannot change: layers below the restored one and tokens before it (attention is
causal) are taken from the corrupted run, and all the layers of one token go through the model together. The result
must be the same numbers; here for the MLP column of the last subject token.
""")

code(r"""
last_subject = end - 1
slow = trace(lm, prompt, subject, target, kind="mlp", samples=SAMPLES, positions=[last_subject], batched=False)
diff = float((slow.scores[:, last_subject] - traces["mlp"].scores[:, last_subject]).abs().max())
print(f"expected: max |fast - per-cell| <= 1e-5   measured: {diff <= 1e-5}")
assert diff <= 1e-5
""")

md(r"""
## 3. Severed tracing: is it the MLPs or the attention?

Restoring the hidden state $h_i^l$ at a subject token repairs everything that later reads it: the MLPs of later
layers at that token, and attention that carries it to other tokens. ROME separates the two paths by restoring
$h_i^l$ while **freezing** the MLP outputs (or the attention outputs) of all later layers at that token at their
*corrupted* values. If the MLPs above layer $l$ are where the fact is recalled, freezing them should take away much of
the effect of early layers, and freezing attention much less.
""")

code(r"""
subject_positions = list(range(start, end))
severed = {
    module: trace(lm, prompt, subject, target, severed=module, samples=SAMPLES, positions=subject_positions)
    for module in ("mlp", "attn")
}
decisive = start + int(early.argmax())
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot(hidden.indirect_effect[:, decisive], color="tab:purple", label="hidden state restored")
ax.plot(severed["mlp"].indirect_effect[:, decisive], color="tab:green", label="... later MLPs frozen (corrupted)")
ax.plot(severed["attn"].indirect_effect[:, decisive], color="tab:red", label="... later attention frozen (corrupted)")
ax.set_xlabel("restored layer")
ax.set_ylabel("indirect effect")
ax.set_title(f"Restoring token {hidden.tokens[decisive]!r} (position {decisive})", fontsize=9)
ax.legend(fontsize=8)
plt.show()
""")

code(r"""
rows = {
    "hidden state restored": hidden,
    "later MLPs frozen": severed["mlp"],
    "later attention frozen": severed["attn"],
}
pd.DataFrame(
    {
        name: [float(t.indirect_effect[lo:hi, decisive].mean()) for lo, hi in ((0, 10), (10, 20), (20, 30))]
        for name, t in rows.items()
    },
    index=["layers 0-9", "layers 10-19", "layers 20-29"],
).round(3)
""")

md(r"""
## 4. The average over 20 facts (ROME figure 2)

One fact is an anecdote. `average_indirect_effect` traces many facts (target: each fact's true object) and averages
the indirect effect per layer for token groups: the first, middle and last subject token, the first token after the
subject, further tokens, and the last token. The 20 facts below are among `KNOWN_FACTS` (facts the bundled model
ranks first); they are chosen short, so that the average runs in well under a minute. Several have one-token subjects,
where the first and the last subject token coincide.
""")

code(r"""
picked = [19, 20, 21, 22, 23, 24, 25, 26, 27, 29, 37, 41, 47, 48, 49, 50, 51, 57, 94, 95]
facts = [KNOWN_FACTS[i] for i in picked]
pd.DataFrame({"prompt": [f.prompt for f in facts], "target": [f.target for f in facts]})
""")

code(
    r"""
avg = average_indirect_effect(lm, facts, samples=SAMPLES)
""",
    ignore=True,
)

code(r"""
plot_average_effect(avg)
plt.show()
print(f"mean P(target): clean {avg.clean_prob:.3f}, corrupted {avg.corrupted_prob:.3f}")
print("facts with tokens in each group:", dict(zip(avg.categories, avg.counts, strict=True)))
""")

code(r"""
curves = {
    "MLP, last subject token": avg.curve("mlp", "last subject token"),
    "attention, last token": avg.curve("attn", "last token"),
    "hidden, last subject token": avg.curve("hidden", "last subject token"),
}
pd.DataFrame(
    {
        "peak layer": [int(c.argmax()) for c in curves.values()],
        "peak effect": [float(c.max()) for c in curves.values()],
    },
    index=list(curves),
).round(3)
""")

md(r"""
## 5. Where MEMIT should write: the recommended layers $R$

MEMIT's argument (its section 3) is that the MLPs at the **last subject token** in a range of early-middle layers
hold the association, so that is where it spreads each update (eq. 19–20), with the target hidden state $z$ at the
top layer $L = \max(R)$. For GPT-J the paper used $R = \{3, \dots, 8\}$; for another model, causal tracing has to
choose. `recommend_layers` turns the evidence into a rule:

* for every centre layer $c$, restore the MLP outputs of the $n = 5$ layers centred on $c$ at the last subject token
  (5 layers: the width of the range MEMIT edits), for each fact (here the 20 facts of section 4, with the same
  noise draws; called without facts it uses 25 facts of `KNOWN_FACTS` and 5 draws each);
* average the indirect effect over the facts;
* $R$ is the window of $n$ layers with the largest average.

The result is cached on disk under the model's fingerprint: the second call (or the next notebook) gets it at once,
and an edited model gets its own.
""")

code(r"""
rec = recommend_layers(lm, facts, samples=SAMPLES)
plot_recommendation(rec)
plt.show()
print(rec.criterion)
print(f"\nrecommended R for {lm.name}: layers {rec.layers[0]}-{rec.layers[-1]}, z at layer {rec.layers[-1]}")
print(f"memit_lab.memit default for {lm.name}: layers {MemitHyperParams.for_model(lm).layers}")
""")

code(r"""
frame = rec.to_frame()
frame[frame.full_window].nlargest(5, "effect").round(3)
""")

md(r"""
### Check: what do the windows that hold layer 0 measure?

Every full window that holds layer 0 scores high, and the best window without it far lower. Two measurements say
whether that is recall or something simpler:

* **one MLP at a time** (`n = 1`): what each layer's MLP alone brings back at the last subject token;
* **what MLP 0 writes** (`first_mlp_share`, clean runs): at the last subject token, the norm of MLP 0's output $m^0$
  against the token's embedding, and the cosine of $m^0$ with the whole output of block 0 (eq. 2).

The windows are traced again with ROME's noise scale, to see whether the choice depends on it.
""")

code(r"""
single = recommend_layers(lm, facts, n=1, samples=SAMPLES)
rome = recommend_layers(lm, facts, samples=SAMPLES, noise=subject_embedding_noise(lm))
windows = frame.set_index("window").effect
rome_windows = rome.to_frame().set_index("window").effect
share = first_mlp_share(lm, facts)
others = single.effect[1:]
print(
    f"MLP 0 alone brings back {single.effect[0]:.3f} (the window 0-4: {windows['0-4']:.3f}); "
    f"the best other single MLP, layer {int(others.argmax()) + 1}: {float(others.max()):.3f}"
)
print(
    f"|m^0| / |embedding| at the last subject token: {share.mlp0_over_embedding.min():.0f} to "
    f"{share.mlp0_over_embedding.max():.0f}; cosine of m^0 with block 0's output: "
    f"at least {share.cos_mlp0_block0.min():.4f}"
)
print(f"R recommended with ROME's noise: layers {rome.layers[0]}-{rome.layers[-1]}")
pd.DataFrame(
    {
        "MLP l alone": single.effect[:10].numpy(),
        "window l..l+4": [windows[f"{first}-{first + 4}"] for first in range(10)],
        "window l..l+4, ROME's noise": [rome_windows[f"{first}-{first + 4}"] for first in range(10)],
    },
    index=pd.Index(range(10), name="l"),
).round(3)
""")

md(r"""
How to read these numbers. The window 0–4 brings back 0.45 of P(target) on average (± 0.04 over facts), and MLP 0
alone brings back 0.44 of it, nearly all. No other single MLP brings back more than 0.016. The measurement of what
MLP 0 writes says why: at the last subject token its output is 24 to 34 times as large as the token's embedding and
points the way block 0's whole output does (cosine ≥ 0.998). Block 0 writes the token's state through MLP 0, so
restoring MLP 0's output at a corrupted token gives back most of that token's clean state: it largely undoes the
corruption itself, whatever the later layers do with the token. This is the **layer-0 confound**, and the windows
that hold MLP 0 do not show where the fact is recalled. Without layer 0 the picture is weak. Windows 1–5 and 2–6
bring back 0.04–0.06. The best windows, 3–7 to 5–9, bring back about 0.11–0.12, an effect spread over several layers
that no single one of them carries alone. ROME's noise scale (0.358 instead of 0.407) moves no window by more than
0.011 and makes the same choice. On this model the trace alone does not pin down $R$: ROME's early-MLP picture
appears only faintly, in windows 3–9.

`recommend_layers`' rule (the largest window) still picks 0–4, the confound included.

memit_lab's default for the bundled model is also $R$ = 0–4 (`MemitHyperParams.for_model`), but that default was
chosen by measuring edits, not by the trace: on the first 100 records of the fact set edited at once —
known to the model or not (the unedited model already scores ES 24.0 on them) — 0–4 scores efficacy 96.0,
paraphrase 94.5 and neighbourhood 73.4 %, against 94.0, 90.5 and 72.4 % for the earlier default 3–7 (the evidence is
next to `memit_lab.hparams.MODEL_DEFAULTS`). Notebook 05 and `results/` edit other records, the first 100 facts the
model *knows* (unedited ES 0), so their figures for 0–4 (ES 94.0, PS 95.5, NS 81.0) differ from these. For any other
model, `memit_lab.layer_choice.memit_defaults` runs this recommendation once and caches it.
""")

md(r"""
## 6. Try your own fact

Change the prompt and the subject (it must appear in the prompt verbatim); `target=None` traces whatever the model
predicts first. The same is available from a terminal:

```
memit-lab trace --prompt "Ludwig van Beethoven was a famous" --subject "Ludwig van Beethoven" --kind mlp --out fig.png
```
""")

code(r"""
my_prompt, my_subject = "Ludwig van Beethoven was a famous", "Ludwig van Beethoven"
mine = trace(lm, my_prompt, my_subject, target=None, kind="mlp", samples=SAMPLES)
print(f"P({mine.target!r}): clean {mine.clean_prob:.3f}, corrupted {mine.corrupted_prob:.3f}")
plot_trace(mine)
plt.show()
mine.peaks(3)
""")

md(r"""
## Summary

* Corrupting the subject's embeddings removes the fact; restoring single states shows where it is carried.
* Hidden states matter at the subject early and at the last token late; attention restorations matter at the last
  token in later layers.
* MLP restorations at the subject score high in every window that holds MLP 0, because MLP 0 writes the token's own
  state (the layer-0 confound). Without layer 0, windows 3–9 bring back about 0.1: a weak early-middle picture.
* Freezing later MLPs (severed tracing) removes more of a subject token's effect than freezing later attention.
* `recommend_layers` turns the average into a range (0–4 here, the confound included); the bundled model's default
  $R$ rests on edit quality instead.
""")

nb = nbf.v4.new_notebook(cells=cells)
nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
nbf.write(nb, Path(__file__).resolve().parents[1] / "notebooks" / "02_causal_tracing.ipynb")
