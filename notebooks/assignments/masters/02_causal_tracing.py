# %% [markdown]
# # Assignment 2 — Causal tracing: where does the model keep a fact?
#
# MEMIT edits the MLPs of a few early-middle layers at the subject's last token. That choice comes from **causal
# tracing** (ROME, Meng et al. 2022, section 2): break the model's knowledge of the subject by adding noise to the
# subject's embeddings, then repair one hidden state at a time and see which repair brings the answer back. In this
# assignment you implement corruption and restoration, then restore *MLP outputs* over a window of layers (the
# measurement that points MEMIT at its edit layers), and read the resulting heatmaps on the bundled model.
#
# | exercise | you implement | points |
# |---|---|---|
# | 2.1 | `corrupt_subject`: the corrupted run's input | 1 |
# | 2.2 | `restored_probability`: one cell of the heatmap | 3 |
# | 2.3 | `restored_mlp_window`: the MLP outputs of a window of layers restored | 3 |
# | 2.4 | `strongest_subject_token`: reading the heatmap | 1 |
#
# Write each function yourself: a check fails a function that calls `memit_lab.tracing`'s own restorations (it is
# imported only after the exercises that ask for them). The lecture notebook before this assignment is
# `notebooks/02_causal_tracing.ipynb`.

# %% setup
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float

from memit_lab import LoadedModel, Trace, TraceDict, load_model
from memit_lab.checks import Course
from memit_lab.facts import KNOWN_FACTS
from memit_lab.prompts import subject_token_span
from memit_lab.tracing import embedding_noise
from memit_lab.tracing_plots import plot_trace

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 3)
course = Course()  # runs the checks below and remembers which of your functions passed

# %% [markdown]
# ## 1. Three runs
#
# * **clean**: the prompt as it is; the model gives the true object $o$ probability $P_{clean}$;
# * **corrupted**: Gaussian noise $\epsilon \sim \mathcal{N}(0, \nu^2)$ added to the token embeddings of the subject
#   only, with $\nu$ three times the standard deviation of the embeddings; the model loses the subject and
#   $P_{corrupted}(o)$ falls;
# * **corrupted with restoration**: the corrupted run, except that one hidden state, the output of block $l$ at token
#   $i$, is replaced by its value in the clean run. $P_{restored}(o) - P_{corrupted}(o)$ is that state's
#   **indirect effect**: how much of the fact it carries.
#
# ### Exercise 2.1 — corrupting the subject
#
# `embeds` is `[pos, d_model]`, `span` the subject's `(start, end)` positions (end exclusive, as
# `subject_token_span` returns), `noise` is `[end - start, d_model]`. Return a new tensor; do not change `embeds`.


# %% solution
def corrupt_subject(
    embeds: Float[torch.Tensor, "pos d_model"], span: tuple[int, int], noise: Float[torch.Tensor, "subject d_model"]
) -> Float[torch.Tensor, "pos d_model"]:
    """The embeddings with noise added at the subject's positions start..end-1."""
    ### BEGIN SOLUTION
    corrupted = embeds.clone()
    corrupted[span[0] : span[1]] += noise
    return corrupted
    ### END SOLUTION


# %% check points=1
course.check_corrupt_subject(corrupt_subject)

# %% [markdown]
# ### Reading and writing hidden states
#
# A `Trace` on a module keeps its output from a forward pass (`.output`), and with `edit_output=f` replaces that
# output by `f(output, module_name)` on the way. The output of block $l$ is the hidden state $h^{l+1}$ at every
# token, `[batch, pos, d_model]`; the subject's tokens are `subject_token_span(...)`:

# %%
lm = load_model("smollm2-135m")
fact = KNOWN_FACTS[0]
enc = lm.tokenizer(fact.prompt, return_tensors="pt")
tokens = [lm.tokenizer.decode([i]) for i in enc.input_ids[0]]
span = subject_token_span(lm.tokenizer, fact.prompt, fact.subject)
with torch.no_grad(), Trace(lm.model, lm.adapter.block(4)) as clean:
    lm.model(**enc)
print("tokens:", tokens)
print("subject tokens", span, "->", tokens[span[0] : span[1]])
norm = float(clean.output[0, span[1] - 1].norm())
print("block 4's output h^5:", tuple(clean.output.shape), " its norm at the last subject token:", round(norm, 2))

# %% [markdown]
# ### Exercise 2.2 — one restoration
#
# Return $P(\text{target\_id})$ at the last token of the corrupted run in which the output of block `layer` at
# position `pos` is restored to its clean value. Two `Trace`s do it: one with `edit_output` on
# `lm.adapter.embed` (the embedding module's output is `[1, pos, d_model]`) that applies your `corrupt_subject`, one
# with `edit_output` on `lm.adapter.block(layer)` that writes the clean state back (read it first in a clean run).
# The check hands your function exactly the noise that `memit_lab.tracing` draws and compares your answer with its
# trace.


# %% solution
def restored_probability(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target_id: int,
    layer: int,
    pos: int,
    noise: Float[torch.Tensor, "subject d_model"],
) -> float:
    """P(target) after the prompt, subject corrupted, block ``layer``'s output at ``pos`` restored."""
    ### BEGIN SOLUTION
    enc = lm.tokenizer(prompt, return_tensors="pt")
    span = subject_token_span(lm.tokenizer, prompt, subject)
    with torch.no_grad(), Trace(lm.model, lm.adapter.block(layer)) as clean:
        lm.model(**enc)

    def corrupt(out: torch.Tensor, name: str) -> torch.Tensor:
        return corrupt_subject(out[0], span, noise)[None]

    def restore(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[0, pos] = clean.output[0, pos]
        return out

    with (
        torch.no_grad(),
        Trace(lm.model, lm.adapter.embed, edit_output=corrupt),
        Trace(lm.model, lm.adapter.block(layer), edit_output=restore),
    ):
        logits = lm.model(**enc).logits
    return float(logits[0, -1].softmax(-1)[target_id])
    ### END SOLUTION


# %% check points=3
course.check_restored_probability(restored_probability)

# %% [markdown]
# ## 2. Which MLPs? Restoring a window of MLP outputs
#
# A hidden state $h^{l+1}_i$ carries everything computed so far at token $i$, so restoring it says *where* the fact
# is, not *which module* put it there. ROME's figure 1 (middle) restores instead the **MLP outputs** $m^{l'}_i$ of
# a window of layers around $l$ at one token, and leaves everything else corrupted: a window of them shows where
# the MLPs together write the fact.
#
# The window for centre layer $l$ and size $w$ is ROME's: the $w$ layers from $l - \lfloor w/2 \rfloor$ up,
# cut at the first and the last layer. For $w = 4$ and $l = 10$ that is layers 8-11; for $l = 0$ it is 0-1.
#
# A `TraceDict` keeps the output of several modules from one forward pass (`td[name].output`); here the MLP outputs
# of the first six layers in the clean run, and how large each is at the last subject token compared with the
# hidden state it is added to:

# %%
mlp_names = [lm.adapter.mlp_module(layer) for layer in range(6)]
with torch.no_grad(), TraceDict(lm.model, [*mlp_names, lm.adapter.block(5)]) as td:
    lm.model(**enc)
sizes = [float(td[name].output[0, span[1] - 1].norm()) for name in mlp_names]
h6 = float(td[lm.adapter.block(5)].output[0, span[1] - 1].norm())
print("||m^l|| at the last subject token, layers 0-5:", [round(x, 1) for x in sizes], f" ||h^6||: {h6:.1f}")

# %% [markdown]
#
# ### Exercise 2.3 - restoring a window of MLP outputs
#
# Return $P(\text{target\_id})$ at the last token of the corrupted run (`noise` added to the subject's
# embeddings, as in 2.2) in which the outputs of the MLPs of the window's layers, `lm.adapter.mlp_module(l)`, are
# set at position `pos` to their clean values. One clean run reads them all; in the corrupted run, one `Trace` per
# window layer with `edit_output` (a `TraceDict` with a list of module names does the same in one context) writes them
# back. Restore only the MLP outputs: the blocks and attention layers around them stay corrupted. The check compares
# your answer with `memit_lab.tracing.trace(..., kind="mlp", window=window)` with the same noise.


# %% solution
def restored_mlp_window(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    target_id: int,
    layer: int,
    window: int,
    pos: int,
    noise: Float[torch.Tensor, "subject d_model"],
) -> float:
    """P(target) after the prompt, subject corrupted, the MLP outputs of ``window`` layers around ``layer``
    restored at ``pos``."""
    ### BEGIN SOLUTION
    lowest = layer - window // 2
    names = [lm.adapter.mlp_module(w) for w in range(max(0, lowest), min(lm.n_layers, lowest + window))]
    enc = lm.tokenizer(prompt, return_tensors="pt")
    span = subject_token_span(lm.tokenizer, prompt, subject)
    with torch.no_grad(), TraceDict(lm.model, names) as clean:
        lm.model(**enc)

    def corrupt(out: torch.Tensor, name: str) -> torch.Tensor:
        return corrupt_subject(out[0], span, noise)[None]

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
    ### END SOLUTION


# %% check points=3
course.check_restored_mlp_window(restored_mlp_window)

# %% [markdown]
# ## 3. The heatmaps
#
# Restoring every (layer, token) cell gives ROME's figure 1. `memit_lab.tracing.trace` computes the whole grid at once
# (it reuses the corrupted run's states below and before each restored cell) and averages several noise draws; here
# three, for *"The Eiffel Tower is located in the city of"*. (It is imported only here: exercises 2.2 and 2.3 ask you
# for single cells of its maps, and their checks refuse a function that calls it.)

# %%
from memit_lab.tracing import trace

result = trace(lm, fact.prompt, fact.subject, fact.target, samples=3, seed=0)
print(f"P({result.target!r}): clean {result.clean_prob:.3f}, corrupted {result.corrupted_prob:.3f}")
fig = plot_trace(result)
display(result.peaks(3).round(3))

# %% [markdown]
# Once your two functions pass their checks, the next cell recomputes one column of this map with your
# `restored_probability`: the subject token `'iffel'`, the brightest of the subject's tokens above, every third layer,
# with one noise draw of the same scale. One draw is noisier than the average of three, but the shape should agree:
# high in the early layers, low in the late ones (by then the fact has moved on to the last token).

# %%
ready = course.has_passed(course.check_corrupt_subject, corrupt_subject) and course.has_passed(
    course.check_restored_probability, restored_probability
)
print("your functions passed their checks:", ready)
if ready:
    noise = embedding_noise(lm) * torch.randn(span[1] - span[0], lm.d_model, generator=torch.Generator().manual_seed(1))
    column = span[0] + 1
    layers = list(range(0, lm.n_layers, 3))
    table = pd.DataFrame(
        {
            "layer": layers,
            "yours (1 draw)": [
                restored_probability(lm, fact.prompt, fact.subject, result.target_id, layer, column, noise)
                for layer in layers
            ],
            "memit_lab (3 draws)": result.scores[layers, column].numpy(),
        }
    )
    display(table.set_index("layer").T.round(2))

# %% [markdown]
# The library's MLP heatmap of the same fact (`kind="mlp"`, a window of 10 layers as in ROME, three noise draws like
# the hidden-state map above) and, next to it, the effect along the layers at the last subject token for both
# kinds of restoration:

# %%
mlp = trace(lm, fact.prompt, fact.subject, fact.target, kind="mlp", window=10, samples=3, seed=0)
fig = plot_trace(mlp)
last_subject = span[1] - 1
along = pd.DataFrame(
    {
        "hidden state": result.scores[:, last_subject].numpy(),
        "MLPs, window 10": mlp.scores[:, last_subject].numpy(),
    },
    index=pd.RangeIndex(lm.n_layers, name="layer"),
)
ax = along.plot(figsize=(6, 3), marker=".", title=f"restored at the last subject token {tokens[last_subject]!r}")
ax.axhline(mlp.corrupted_prob, color="grey", ls="--", lw=1)
ax.set_ylabel("P(' Paris')")
display(along.iloc[::3].T.round(2))

# %% [markdown]
# Read the two curves at the last subject token: restoring the hidden state brings the answer back up to the middle
# layers and then stops helping (the fact has left this token for the last one); restoring the MLP outputs helps
# most for windows centred on the **first layers** and falls off after them. That is where this model's MLPs write
# the fact, and why `memit_lab` edits it at layers 0-4 (`MemitHyperParams.for_model(lm)`; notebook 02 measures it
# over 20 facts). GPT-J's peak is further up, at layers 3-8, MEMIT's range for that model.
#
# Once your function passes its check, the next cell recomputes part of the MLP curve with it (one noise draw, so
# noisier than the library's three):

# %%
if course.has_passed(course.check_restored_mlp_window, restored_mlp_window):
    draw = torch.randn(span[1] - span[0], lm.d_model, generator=torch.Generator().manual_seed(1))
    layers = list(range(0, lm.n_layers, 4))
    yours = [
        restored_mlp_window(
            lm, fact.prompt, fact.subject, mlp.target_id, layer, 10, last_subject, embedding_noise(lm) * draw
        )
        for layer in layers
    ]
    library = mlp.scores[layers, last_subject].numpy()
    table = pd.DataFrame(
        {"yours (1 draw)": yours, "memit_lab (3 draws)": library}, index=pd.Index(layers, name="layer")
    )
    display(table.T.round(2))

# %% [markdown]
# Two regions stand out in ROME's figure 1 and, on this model, in the hidden-state map: **early layers at the
# subject's tokens** (the model has not yet moved the subject's information elsewhere) and **late layers at the last
# token** (the answer has been moved there). The MLP map narrows the first region down to the MLPs of the early
# layers: MEMIT's edit range.
#
# ### Exercise 2.4 — reading the heatmap
#
# Which subject token carries the fact? Given a grid `scores` `[layer, pos]` and the subject's `span`, return the
# position in `start..end-1` whose best restoration (over layers) is highest.


# %% solution
def strongest_subject_token(scores: Float[torch.Tensor, "layer pos"], span: tuple[int, int]) -> int:
    """The subject position with the highest restored probability at any layer."""
    ### BEGIN SOLUTION
    start, end = span
    return start + int(scores[:, start:end].max(0).values.argmax())
    ### END SOLUTION


# %% check points=1
course.check_strongest_subject_token(strongest_subject_token)

# %%
if course.has_passed(course.check_strongest_subject_token, strongest_subject_token):
    best = strongest_subject_token(result.scores, result.subject_span)
    print(f"in the map above, the subject token that carries the most: {best} {result.tokens[best]!r}")

# %% [markdown]
# ## Questions to think about
#
# 1. Restoring a token *before* the subject never helps (check it in the map). Why, in a model with causal
#    attention?
# 2. On this model the decisive subject token of "The Eiffel Tower" may not be its last one (" Tower"). MEMIT still
#    writes at the last subject token. Why can that work? (Hint: what do early attention layers do with the subject's
#    tokens?)
# 3. One noise sample gives a noisy map. What would you average to make it reliable, and what does that cost?
# 4. Why does restoring a *single* MLP output change P(target) so much less than restoring a window of ten? What
#    would a window of all 30 layers at the last subject token measure?
