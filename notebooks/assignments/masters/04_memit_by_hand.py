# %% [markdown]
# # Assignment 4 — MEMIT by hand
#
# MEMIT (Meng et al., ICLR 2023) writes new facts into a model in two stages. First, for each fact, it finds the
# hidden state $z_i$ that would make the model say the new object (eq. 16). Then it changes the MLP output matrices of
# a range of layers $\mathcal{R}$, lowest first, each with the closed-form update of assignment 3, so that the model
# produces $z_i$ by itself (eq. 19-20, Algorithm 1). In this assignment you build each piece and then run
# Algorithm 1 with your own functions on the bundled model.
#
# | exercise | you implement | points |
# |---|---|---|
# | 4.1 | `edit_position`: where MEMIT reads and writes | 1 |
# | 4.2 | `nll_with_delta`: the loss of eq. 16 | 3 |
# | 4.3 | `average_key`: the keys of eq. 19 | 2 |
# | 4.4 | `layer_update`: eq. 20, then eq. 14 | 2 |
#
# Write each function yourself: a check fails a function that calls `memit_lab`'s own answer to its exercise
# (`last_subject_token`, `target_scores`, `edit_keys`, `insertion_update`, ...). The lecture notebook before this
# assignment is `notebooks/04_multi_layer_update.ipynb`.

# %% setup
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float
from transformers import PreTrainedTokenizerBase

from memit_lab import LoadedModel, Trace, load_model
from memit_lab.checks import Course
from memit_lab.prompts import continuation
from memit_lab.stats import key_second_moment

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 160)
course = Course()  # runs the checks below and remembers which of your functions passed

# %% [markdown]
# ## 1. An edit request, and where it is written
#
# A request names a subject, a prompt template about it and a new object: *"The Eiffel Tower is located in the city
# of" → "Rome"*. Causal tracing (assignment 2) showed that the model recalls a fact through the MLPs of early-middle
# layers **at the subject's last token**; that is where MEMIT reads its keys and writes its values. Tokenizers split
# words in surprising ways, so the position must come from the tokenizer's *offsets* (the character span of each
# token), not from counting words:

# %%
lm = load_model("smollm2-135m")
prompt, subject = "The Eiffel Tower is located in the city of", "Eiffel Tower"
enc = lm.tokenizer(prompt, return_offsets_mapping=True)
display(
    pd.DataFrame(
        {
            "token": [lm.tokenizer.decode([i]) for i in enc.input_ids],
            "characters": [prompt[a:b] for a, b in enc.offset_mapping],
            "offsets": enc.offset_mapping,
        }
    ).T
)

# %% [markdown]
# ### Exercise 4.1 — the edit position
#
# Return the position (an index into `tokenizer(prompt).input_ids`, special tokens included) of the last token that
# overlaps the subject. `tokenizer(prompt, return_offsets_mapping=True).offset_mapping` gives each token's
# `(start, end)` characters; special tokens have `(0, 0)`.


# %% solution
def edit_position(tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str) -> int:
    """Index of the subject's last token in tokenizer(prompt).input_ids."""
    ### BEGIN SOLUTION
    end = prompt.index(subject) + len(subject)
    offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
    return max(i for i, (a, b) in enumerate(offsets) if b > a and a < end)
    ### END SOLUTION


# %% check points=1
course.check_edit_position(edit_position)

# %%
if course.has_passed(course.check_edit_position, edit_position):
    at = edit_position(lm.tokenizer, prompt, subject)
    print(f"MEMIT edits {subject!r} at position {at}, token {lm.tokenizer.decode([enc.input_ids[at]])!r}")

# %% [markdown]
# ## 2. The target hidden state $z$ (eq. 16)
#
# Let $L = \max \mathcal{R}$ be the top edit layer and $h^L$ the output of block $L$ at the subject's last token. MEMIT
# looks for a vector $\delta$ such that the model, with $h^L + \delta$ in place of $h^L$, predicts the new object $o$:
#
# $$\delta = \arg\min_\delta \; \frac{1}{N} \sum_{j=1}^{N} -\log P_{G(h^L \mathrel{+}= \delta)}\left[o \mid x_j \oplus
# p\right], \qquad z = h^L + \delta \qquad \text{(eq. 16)}$$
#
# The $x_j$ are short prefixes (the paper samples them from the model) so that $z$ works in many contexts, not only
# right after the prompt. The paper's code adds a KL term that keeps *"{subject} is a"* predictions unchanged, weight
# decay, and a bound on $\lVert\delta\rVert$; we leave them out here.
#
# The loss scores the new object as a continuation of each prompt, teacher-forced: the model reads the prompt and the
# object's tokens, and the logit at position $t-1$ gives the probability of token $t$.

# %%
text = continuation(prompt, "Rome")
ids = lm.tokenizer(text).input_ids
n_prompt = len(lm.tokenizer(prompt).input_ids)
print(repr(text))
object_tokens = [lm.tokenizer.decode([i]) for i in ids[n_prompt:]]
print("the object's tokens:", object_tokens, "at positions", n_prompt, "to", len(ids) - 1)

# %% [markdown]
# ### Exercise 4.2 — the loss of eq. 16
#
# Return the loss as a one-element tensor that autograd can differentiate with respect to `delta`. Add `delta` to the
# output of block `layer` (`lm.adapter.block(layer)`) at the subject's last token of every prompt: a `Trace` with
# `edit_output=...` and `detach=False` does that. Score the target as a continuation of each prompt:
# `memit_lab.prompts.continuation(prompt, target)` is the text to run, and every token of the target counts (the logit
# that predicts token $t$ sits at position $t-1$). As in the paper's code, $\log P[o \mid \cdot]$ is *averaged* over
# the target's tokens, so that a long object does not outweigh a short one. Pad the batch on the right (the tokenizer
# does). The check compares your loss with `memit_lab.zopt.optimise_z`'s (without its extra terms) at $\delta = 0$
# and after the optimiser's first Adam step.


# %% solution
def nll_with_delta(
    lm: LoadedModel, prompts: list[str], subject: str, target: str, layer: int, delta: Float[torch.Tensor, " d_model"]
) -> Float[torch.Tensor, ""]:
    """-(1/N) sum_j log P(target | prompts[j]), per target token, with delta added to block `layer`'s output at the
    subject's last token (eq. 16)."""
    ### BEGIN SOLUTION
    texts = [continuation(p, target) for p in prompts]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    rows = torch.arange(len(prompts))
    positions = [edit_position(lm.tokenizer, p, subject) for p in prompts]

    def add_delta(out: torch.Tensor, name: str) -> torch.Tensor:
        out = out.clone()
        out[rows, positions] = out[rows, positions] + delta
        return out

    with Trace(lm.model, lm.adapter.block(layer), edit_output=add_delta, detach=False):
        logprobs = lm.model(**enc).logits.log_softmax(-1)
    losses = []
    for j, p in enumerate(prompts):
        start, stop = len(lm.tokenizer(p).input_ids), int(enc.attention_mask[j].sum())
        ids = enc.input_ids[j, start:stop]
        losses.append(-logprobs[j, start - 1 : stop - 1].gather(-1, ids[:, None]).mean())
    return torch.stack(losses).mean()
    ### END SOLUTION


# %% check points=3
course.check_nll_with_delta(nll_with_delta)

# %% [markdown]
# ## 3. Keys (eq. 19) and the share of each layer (eq. 20)
#
# For each layer $l \in \mathcal{R}$, lowest first, MEMIT needs each request's key $k_i^l$: the input of
# $W_{out}^l$ at the subject's last token, averaged over the prefixed prompts (eq. 19), computed **with the updates of
# the lower layers already in place**. $W_{out}^l$ is `lm.adapter.w_out_module(layer)`; a `Trace` with
# `retain_input=True` keeps its input `[batch, pos, d_mlp]`.
#
# ### Exercise 4.3 — the key of one request


# %% solution
def average_key(lm: LoadedModel, layer: int, prompts: list[str], subject: str) -> Float[torch.Tensor, " d_mlp"]:
    """The input of W_out^layer at the subject's last token, averaged over the prompts (eq. 19)."""
    ### BEGIN SOLUTION
    keys = []
    for p in prompts:
        # stop=True ends the forward pass once W_out^layer has run: the later layers are not needed
        with torch.no_grad(), Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True, stop=True) as trace:
            lm.model(**lm.tokenizer(p, return_tensors="pt"))
        keys.append(trace.input[0, edit_position(lm.tokenizer, p, subject)])
    return torch.stack(keys).mean(0)
    ### END SOLUTION


# %% check points=2
course.check_average_key(average_key)

# %% [markdown]
# What is still missing at the top layer is $z_i - h_i^L$ (recomputed after each layer's update). Layer $l$ takes
# the share
#
# $$r_i^l = \frac{z_i - h_i^L}{L - l + 1} \qquad \text{(eq. 20)}$$
#
# — a fifth at the lowest of five layers, a quarter of what is then left at the next, …, everything that remains at
# $L$ — and writes it with the update of assignment 3, $\Delta^l = R^l K^{l\top} (C_0^l + K^l K^{l\top})^{-1}$
# (eq. 14), where $C_0^l = \lambda\, \mathbb{E}[k k^\top]$ at layer $l$.
#
# ### Exercise 4.4 — one layer of Algorithm 1
#
# `residuals` are the $z_i - h_i^L$ as columns `[d_model, u]`, `keys` the $k_i^l$ as columns `[d_mlp, u]`,
# `layers` the edit range $\mathcal{R}$, `c0` is $C_0^l$. Solve in float64.


# %% solution
def layer_update(
    keys: Float[torch.Tensor, "d_mlp u"],
    residuals: Float[torch.Tensor, "d_model u"],
    layer: int,
    layers: list[int],
    c0: Float[torch.Tensor, "d_mlp d_mlp"],
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Delta^l = r^l K^T (C0 + K K^T)^-1 with r^l = residuals / (L - l + 1) (eq. 20, 14)."""
    ### BEGIN SOLUTION
    share = residuals.double() / (max(layers) - layer + 1)
    k = keys.double()
    return torch.linalg.solve(c0.double() + k @ k.T, k @ share.T).T
    ### END SOLUTION


# %% check points=2
course.check_layer_update(layer_update)

# %% [markdown]
# ## 4. Algorithm 1 with your functions
#
# Two edits on the bundled model with the library's measured settings for it, `MemitHyperParams.for_model(lm)`:
# $\mathcal{R} = \{0, \dots, 4\}$ (where causal tracing puts this model's MLP effect at the last subject token,
# assignment 2), $\lambda = 1{,}500$ and $\mathbb{E}[k k^\top]$ from 20,000 tokens of the package's corpus (computed
# once, about 20 s, then read from the cache). The cell below runs only once your four functions pass their checks
# (in the student version it waits for them); it then
#
# 1. optimises $\delta_i$ with Adam on your `nll_with_delta` (eq. 16; at most 12 steps, stopping once the loss is
#    below 0.05 as the paper's code does) and sets $z_i = h_i^L + \delta_i$;
# 2. for each $l \in \mathcal{R}$, lowest first: reads the keys with your `average_key`, recomputes $h_i^L$, and adds
#    your `layer_update` to $W_{out}^l$;
# 3. measures the new and the old objects' probabilities, then restores the weights.

# %%
ready = all(
    course.has_passed(check, function)
    for check, function in [
        (course.check_edit_position, edit_position),
        (course.check_nll_with_delta, nll_with_delta),
        (course.check_average_key, average_key),
        (course.check_layer_update, layer_update),
    ]
)
print("your functions passed their checks:", ready)

# %%
from memit_lab.hparams import MemitHyperParams
from memit_lab.prompts import target_scores

hp = MemitHyperParams.for_model(lm)
layers, lam, max_steps, stop_loss = list(hp.layers), hp.lam, 12, 0.05
print(f"R = {layers}, lambda = {lam:g}, E[k k^T] from {hp.stats_tokens} tokens")
top = max(layers)
contexts = ["", "I read this in a book. ", "Here is a fact. "]
requests = [
    ("The {} is located in the city of", "Eiffel Tower", "Rome", "Paris"),
    ("The capital of {} is", "Japan", "London", "Tokyo"),
]


def prompts_of(template: str, subject: str) -> list[str]:
    return [context + template.format(subject) for context in contexts]


def top_state(template: str, subject: str) -> torch.Tensor:
    """h^L: block L's output at the subject's last token, averaged over the prompts."""
    states = []
    for p in prompts_of(template, subject):
        with torch.no_grad(), Trace(lm.model, lm.adapter.block(top), stop=True) as trace:
            lm.model(**lm.tokenizer(p, return_tensors="pt"))
        states.append(trace.output[0, edit_position(lm.tokenizer, p, subject)])
    return torch.stack(states).mean(0)


def probabilities() -> pd.DataFrame:
    prompts = [template.format(subject) for template, subject, _, _ in requests]
    new = target_scores(lm, prompts, [r[2] for r in requests]).prob
    old = target_scores(lm, prompts, [r[3] for r in requests]).prob
    return pd.DataFrame({"prompt": prompts, "P(new)": new.numpy(), "P(old)": old.numpy()})


if ready:
    before = probabilities()
    moments = key_second_moment(lm, layers, n_tokens=hp.stats_tokens, progress=False)
    z, curves = [], []
    for template, subject, new, _ in requests:
        delta = torch.zeros(lm.d_model, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=0.5)
        curve = []
        for _ in range(max_steps):
            optimiser.zero_grad()
            loss = nll_with_delta(lm, prompts_of(template, subject), subject, new, top, delta)
            curve.append(round(float(loss.detach()), 2))
            if loss < stop_loss:
                break
            loss.backward()
            optimiser.step()
        curves.append(curve)
        z.append(top_state(template, subject) + delta.detach())
    for (_, subject, new, _), curve in zip(requests, curves, strict=True):
        print(f"eq. 16 loss for {subject} -> {new}, one value per Adam step: {curve}")

    originals = {layer: lm.adapter.w_out_weight(lm.model, layer).detach().clone() for layer in layers}
    report = []
    for layer in layers:
        keys = torch.stack([average_key(lm, layer, prompts_of(t, s), s) for t, s, _, _ in requests], 1)
        residuals = torch.stack([z_i - top_state(t, s) for z_i, (t, s, _, _) in zip(z, requests, strict=True)], 1)
        delta_w = layer_update(keys, residuals, layer, layers, lam * moments[layer])
        with torch.no_grad():
            lm.adapter.w_out_parameter(lm.model, layer).add_(lm.adapter.to_stored(delta_w.float()))
        report.append(
            {
                "layer": layer,
                "|z - h^L| before": round(float(residuals.norm(dim=0).mean()), 2),
                "|Delta|": round(float(delta_w.norm()), 2),
            }
        )
    display(pd.DataFrame(report))
    after = probabilities()
    display(before.merge(after, on="prompt", suffixes=(" before", " after")).round(3))
    with torch.no_grad():
        for layer, weight in originals.items():
            lm.adapter.w_out_weight(lm.model, layer).copy_(weight)
    print("weights restored:", all(torch.equal(lm.adapter.w_out_weight(lm.model, n), w) for n, w in originals.items()))

# %% [markdown]
# ## Questions to think about
#
# 1. The residual $|z - h^L|$ shrinks from layer to layer but not to zero at $L$. Why not? (What does $\lambda$ do?)
# 2. Why are the keys of layer $l$ recomputed *after* the lower layers were updated?
# 3. The paper's code adds a KL term to eq. 16 that keeps *"{subject} is a"* predictions unchanged. What could go
#    wrong without it? Try an edit whose new object is a very common word.
