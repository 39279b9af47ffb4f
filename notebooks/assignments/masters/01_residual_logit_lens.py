# %% [markdown]
# # Assignment 1 — The residual stream and the logit lens
#
# MEMIT edits a fact by adding a vector to one token's hidden state and then changing MLP weights so that the
# model adds that vector by itself. Before editing anything we need the picture that makes this possible: every
# layer of a transformer *adds* its output to a running vector per token, the **residual stream** (paper eq. 2-6).
# In this assignment you take that stream apart on a real model (SmolLM2-135M, bundled with `memit_lab`) and ask
# which layers write the answer.
#
# | exercise | you implement | points |
# |---|---|---|
# | 1.1 | `residual_components`: the terms of eq. 6 | 2 |
# | 1.2 | `lens_probs`: the logit lens | 2 |
# | 1.3 | `first_top1_layer`: reading the lens | 1 |
# | 1.4 | `direct_attribution`: which component writes the answer | 3 |
#
# Each exercise is a function with a typed signature. Below it, a check cell runs your function on random tiny
# models of several architectures and on the bundled model, compares it with `memit_lab`'s implementation, and on a
# mistake tells you what it expected, what it got, and a hint. Write each function yourself: a check fails a function
# that calls `memit_lab`'s own answer to the exercise (the functions it compares with are imported only after it).
#
# The lecture notebook before this assignment is `notebooks/01_residual_stream.ipynb`.

# %% setup
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float

from memit_lab import LoadedModel, load_model
from memit_lab.checks import Course
from memit_lab.facts import KNOWN_FACTS
from memit_lab.prompts import last_subject_token
from memit_lab.residual import (
    ResidCache,
    freeze_final_norm,
    logit_lens,
    reconstruction_error,
    run_with_cache,
)
from memit_lab.residual_plots import plot_attribution, plot_logit_lens

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 160)
course = Course()  # runs the checks below and remembers which of your functions passed

# %% [markdown]
# ## 1. The residual stream (eq. 2-6)
#
# Write $h^l_i$ for the hidden state of token $i$ before block $l$ (blocks are counted from 0, as in the code).
# Block $l$ computes an attention output $a_l$ and an MLP output $m_l$ and **adds** both:
#
# $$h^{l+1}_i = h^l_i + a_{l,i} + m_{l,i} \qquad \text{(eq. 2)}$$
#
# In GPT-2 and Llama the MLP reads $h^l + a_l$ (sequential blocks); in GPT-J and GPT-NeoX attention and MLP both
# read $h^l$ (parallel blocks). Either way the block adds the two outputs, so unrolling eq. 2 gives eq. 6:
#
# $$h^L_i = h^0_i + \sum_{l<L} a_{l,i} + \sum_{l<L} m_{l,i} \qquad \text{(eq. 6)}$$
#
# where $h^0$ is the embedding (GPT-2 also adds a learned position embedding). `run_with_cache` runs a prompt once
# and keeps every term, under names in the style of TransformerLens:
#
# | name | shape | meaning |
# |---|---|---|
# | `embed` | `[pos, d_model]` | token embedding |
# | `pos_embed` | `[pos, d_model]` | position embedding (GPT-2 only) |
# | `blocks.{l}.attn_out` | `[pos, d_model]` | $a_l$ |
# | `blocks.{l}.mlp_out` | `[pos, d_model]` | $m_l$ |
# | `blocks.{l}.resid_pre` | `[pos, d_model]` | $h^l$, the input of block $l$ |
#
# `cache.resid(L)` gives $h^L$ for any $L$ from 0 to `cache.n_layers` (the last one is the final norm's input).

# %%
lm = load_model("smollm2-135m")
fact = KNOWN_FACTS[0]
cache = run_with_cache(lm, fact.prompt)
print(lm)
print("tokens:", cache.tokens)
print("some cached names:", sorted(cache.activations)[:5])
print("h^5 at the last token has shape", tuple(cache.resid(5)[-1].shape))

# %% [markdown]
# ### Exercise 1.1 — the terms of eq. 6
#
# Return the vectors whose sum is $h^L$ at one position, stacked in the order the model adds them:
# `embed`, (`pos_embed` if the cache has it,) `attn_0`, `mlp_0`, `attn_1`, `mlp_1`, …, `attn_{L-1}`, `mlp_{L-1}`.
# For `layer = 0` that is the embedding alone. `pos` may be negative (counting from the end, as in Python).


# %% solution
def residual_components(cache: ResidCache, layer: int, pos: int) -> Float[torch.Tensor, "component d_model"]:
    """The components of h^layer at position ``pos``, in the order the model adds them (eq. 6)."""
    ### BEGIN SOLUTION
    names = ["embed"] + (["pos_embed"] if "pos_embed" in cache.activations else [])
    for block in range(layer):
        names += [f"blocks.{block}.attn_out", f"blocks.{block}.mlp_out"]
    return torch.stack([cache[name][pos] for name in names])
    ### END SOLUTION


# %% check points=2
course.check_residual_components(residual_components)

# %% [markdown]
# The check first tested that your rows add up to the hidden state the model computed. `memit_lab.residual` has
# the same function, `decompose_resid`, imported only now (the check refuses a `residual_components` that calls it);
# the lecture cells use it from here on, so the rest of the notebook runs whatever state your exercises are in. How
# exact is eq. 6 in float32? The largest relative error over every layer and position:

# %%
from memit_lab.residual import decompose_resid

print("largest relative reconstruction error below 1e-5:", reconstruction_error(cache) < 1e-5)
stack = decompose_resid(cache, layer=8, pos=-1)
print("h^8 at the last token is the sum of", len(stack.labels), "vectors:", stack.labels[:5], "...")
display(stack.to_frame().head(7).round(2))

# %% [markdown]
# ## 2. The logit lens
#
# The model turns its last state into next-token probabilities with a final norm and the unembedding $W_U$:
# $p = \mathrm{softmax}(W_U\, \mathrm{norm}(h^{n}))$. The **logit lens** applies the same two steps to an earlier
# state $h^L$: what would the model say if it stopped after $L$ blocks? The modules are found through the model's
# adapter: `lm.model.get_submodule(lm.adapter.final_norm)` and `lm.model.get_submodule(lm.adapter.unembed)`.
#
# ### Exercise 1.2 — the lens
#
# Return the next-token probabilities for residual states of any leading shape (`[d_model]`, `[pos, d_model]`,
# `[layer, pos, d_model]`, …). Use `torch.no_grad()` and return float32.


# %% solution
def lens_probs(lm: LoadedModel, resid: Float[torch.Tensor, "*batch d_model"]) -> Float[torch.Tensor, "*batch d_vocab"]:
    """softmax(W_U norm(resid)): what the model would predict from the residual state ``resid``."""
    ### BEGIN SOLUTION
    norm = lm.model.get_submodule(lm.adapter.final_norm)
    unembed = lm.model.get_submodule(lm.adapter.unembed)
    with torch.no_grad():
        return unembed(norm(resid)).float().softmax(-1)
    ### END SOLUTION


# %% check points=2
course.check_lens_probs(lens_probs)

# %% [markdown]
# Here is the lens on our prompt (`memit_lab.residual.logit_lens`, drawn by `plot_logit_lens`): rows are $h^0$ (the
# embedding, bottom) to $h^{30}$ (the output, top), columns the prompt's tokens; each cell shows the top token, its
# colour the probability of " Paris".

# %%
lens = logit_lens(lm, cache, fact.target)
fig, frame = plot_logit_lens(lens)

# %% [markdown]
# ### Exercise 1.3 — reading the lens
#
# Given the lens at one position, `probs` of shape `[layer, d_vocab]` (row $L$ is the lens of $h^L$), return the
# first layer $L$ at which `target_id` is the most probable token, or `None` if it never is.


# %% solution
def first_top1_layer(probs: Float[torch.Tensor, "layer d_vocab"], target_id: int) -> int | None:
    """The smallest L with argmax(probs[L]) == target_id, or None."""
    ### BEGIN SOLUTION
    top1 = (probs.argmax(-1) == target_id).nonzero()
    return int(top1[0, 0]) if len(top1) else None
    ### END SOLUTION


# %% check points=1
course.check_first_top1_layer(first_top1_layer)

# %% [markdown]
# Where does the answer appear, at the last token (where the model must say it) and at the subject's last token
# (where, according to the paper, the MLPs write it)? A few facts the model knows:

# %%
rows = []
for known in KNOWN_FACTS[:6:2]:
    known_cache = run_with_cache(lm, known.prompt)
    known_lens = logit_lens(lm, known_cache, known.target)
    subject_pos = last_subject_token(lm.tokenizer, known.prompt, known.subject)
    rows.append(
        {
            "prompt": known.prompt,
            "target": known_lens.target,
            "top-1 at last token from layer": known_lens.first_top1_layer(-1),
            "top-1 at last subject token from layer": known_lens.first_top1_layer(subject_pos),
        }
    )
display(pd.DataFrame(rows))

# %% [markdown]
# The answer becomes the top prediction at the last token only in the last few layers, and never at the subject's
# last token: whatever the early layers store there is not in a form the unembedding reads directly, and attention
# moves it to the last token later. Causal tracing (assignment 2) will locate it properly.
#
# ## 3. Direct logit attribution
#
# Because $h^n$ is a sum, its logit for a target $t$ almost splits into one term per component: the unembedding is
# linear, and the final norm is linear *except* for its division by the scale $s(h^n)$ (the RMS, or the standard
# deviation for LayerNorm). Freeze that scale at its value on the full residual and the norm becomes an affine map
# $y \mapsto w \odot P y / s + b$ ($P$ subtracts the mean for LayerNorm and is the identity for RMSNorm).
# `freeze_final_norm(lm, h)` returns it; its `.linear(y)` is the linear part. Then
#
# $$\mathrm{logit}_t = \sum_c W_U[t] \cdot \mathrm{linear}(c) \;+\; W_U[t]\cdot b
# \;(+\ \text{the unembedding's bias}).$$
#
# On our prompt, at the last token (SmolLM2's final norm is an RMSNorm: nothing is centred, and $b = 0$):

# %%
frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[-1])
print(
    "centred:", frozen.centred, " frozen scale s:", round(frozen.scale, 3), " |b|:", round(float(frozen.bias.norm()), 3)
)

# %% [markdown]
# ### Exercise 1.4 — direct attribution
#
# Return one number per component of the final residual at `pos` (all blocks, in the order of your
# `residual_components(cache, cache.n_layers, pos)`): its direct contribution to the logit of `target_id` at `pos`.
# The unembedding's weight is `[d_vocab, d_model]`.


# %% solution
def direct_attribution(
    lm: LoadedModel, cache: ResidCache, target_id: int, pos: int
) -> Float[torch.Tensor, " component"]:
    """W_U[target] . frozen_norm.linear(c) for each component c of the final residual at ``pos``."""
    ### BEGIN SOLUTION
    components = residual_components(cache, cache.n_layers, pos)
    frozen = freeze_final_norm(lm, cache.resid(cache.n_layers)[pos])
    direction = lm.model.get_submodule(lm.adapter.unembed).weight[target_id].float()
    with torch.no_grad():
        return frozen.linear(components.float()) @ direction
    ### END SOLUTION


# %% check points=3
course.check_direct_attribution(direct_attribution)

# %% [markdown]
# The library's version (`direct_logit_attribution`, imported now that you have written yours) on our fact, with
# the logit measured against the mean logit (`centred=True`: a component that raises every logit alike changes no
# probability). The bars show which attention and MLP outputs push " Paris" up at the last token; the table lists
# the five largest.

# %%
from memit_lab.residual import direct_logit_attribution

attribution = direct_logit_attribution(lm, cache, fact.target, pos=-1, centred=True)
fig, frame = plot_attribution(attribution)
display(frame.sort_values("attribution", ascending=False).head(5)[["component", "attribution"]].round(2))
print("attributions + constant = logit:", round(attribution.total, 3), "vs", round(attribution.logit, 3))

# %% [markdown]
# ## Questions to think about
#
# 1. The largest direct contributions come from late layers, yet MEMIT edits early-middle MLPs. Why is that not a
#    contradiction? (Hint: direct attribution ignores what a component does *through* later layers.)
# 2. Exercise 1.1 said the decomposition is exact. Which step of exercise 1.4 is an approximation, and how would you
#    measure its error? (`attribution.to_frame()` has an `ablation` column; compare it with `attribution`.)
