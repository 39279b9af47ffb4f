# %% [markdown]
# # Assignment 3 - The MLP as a least-squares memory, and what lambda does
#
# MEMIT writes thousands of facts with one closed-form solve per layer. The solve comes from reading an MLP's
# output matrix $W_{out}$ as a **linear associative memory**: it maps a key $k$ (the MLP's hidden activation, the
# input of $W_{out}$) to a value $m = W k$ that the MLP adds to the residual stream. In this assignment you derive
# and implement that solve (paper eq. 7-15) and see what its one hyperparameter, $\lambda$, trades.
#
# | exercise | you implement | points |
# |---|---|---|
# | 3.1 | `fit_memory`: the least-squares memory (eq. 7-8) | 2 |
# | 3.2 | `insert_memories`: MEMIT's update with $\lambda$ (eq. 9-15) | 3 |
# | 3.3 | `rank_one_update`: one new key (Sherman-Morrison) | 2 |
# | 3.4 | `rome_update`: ROME's equality-constrained update | 2 |
#
# Conventions: keys and values are stacked as **columns**, $K$ is `[d_mlp, n]`, $M$ is `[d_model, n]`, and
# $W$ is `[d_model, d_mlp]`. Solve linear systems in float64 with `torch.linalg.solve` (never an explicit inverse:
# it is slower and loses accuracy on ill-conditioned matrices, which real key statistics are).
#
# The lecture notebook before this assignment is `notebooks/03_key_value_memory.ipynb`.

# %% setup
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float

from memit_lab import Trace, load_model
from memit_lab.checks import Course
from memit_lab.facts import KNOWN_FACTS
from memit_lab.kv_memory import lambda_sweep
from memit_lab.prompts import last_subject_token
from memit_lab.stats import corpus_keys

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.float_format", "{:.2g}".format)
pd.set_option("display.width", 160)
course = Course()  # runs the checks below and remembers which of your functions passed

# %% [markdown]
# ## 1. A memory that pretraining fitted (eq. 7-8)
#
# Suppose pretraining stored $n$ pairs $(k_i, m_i)$ in $W_0$ as well as a linear map can:
#
# $$W_0 = \arg\min_W \sum_i \lVert W k_i - m_i \rVert^2 = \arg\min_W \lVert W K_0 - M_0 \rVert_F^2 \qquad
# \text{(eq. 7)}$$
#
# Setting the gradient $2 (W K_0 - M_0) K_0^\top$ to zero gives the **normal equations**
#
# $$W_0 K_0 K_0^\top = M_0 K_0^\top \qquad \text{(eq. 8)}$$
#
# $K_0 K_0^\top$ is `[d_mlp, d_mlp]` and invertible when there are more keys than dimensions and they span the
# space. `torch.linalg.solve(A, B)` solves $A X = B$; transpose eq. 8 to put it in that form.
#
# ### Exercise 3.1 - the least-squares memory


# %% solution
def fit_memory(
    keys: Float[torch.Tensor, "d_mlp n"], values: Float[torch.Tensor, "d_model n"]
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """W = argmin ||W K - M||^2, from the normal equations W K K^T = M K^T (eq. 8), in float64."""
    ### BEGIN SOLUTION
    k, m = keys.double(), values.double()
    return torch.linalg.solve(k @ k.T, k @ m.T).T
    ### END SOLUTION


# %% check points=2
course.check_fit_memory(fit_memory)

# %% [markdown]
# ## 2. Writing new memories without erasing old ones (eq. 9-15)
#
# Now we want $u$ new pairs $K_1, M_1$ (`[d_mlp, u]`, `[d_model, u]`) stored as well, *keeping* the old ones:
#
# $$W_1 = \arg\min_W \lVert W K_0 - M_0 \rVert^2 + \lVert W K_1 - M_1 \rVert^2 \qquad \text{(eq. 9-11)}$$
#
# Its normal equations are $W_1 (K_0 K_0^\top + K_1 K_1^\top) = M_0 K_0^\top + M_1 K_1^\top$. Write
# $W_1 = W_0 + \Delta$ and subtract eq. 8: everything about the old pairs cancels except $C_0 = K_0 K_0^\top$,
#
# $$\Delta (C_0 + K_1 K_1^\top) = R K_1^\top, \qquad R = M_1 - W_0 K_1 \qquad \text{(eq. 12-14)}$$
#
# $R$ is what the memory still lacks for the new keys. We never see $K_0$ (pretraining's keys), so MEMIT estimates
# $C_0 = \lambda\, \mathbb{E}[k k^\top]$ from keys on generic text (eq. 15): $\lambda$ says how many old keys the
# estimate stands for, and so how much weight keeping them gets against writing the new ones.
#
# ### Exercise 3.2 - MEMIT's update
#
# `key_moment` is $\mathbb{E}[k k^\top]$ (`[d_mlp, d_mlp]`), `lam` is $\lambda$. Return $\Delta$ (`[d_model, d_mlp]`).


# %% solution
def insert_memories(
    w0: Float[torch.Tensor, "d_model d_mlp"],
    k1: Float[torch.Tensor, "d_mlp u"],
    m1: Float[torch.Tensor, "d_model u"],
    key_moment: Float[torch.Tensor, "d_mlp d_mlp"],
    lam: float,
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Delta = R K1^T (lam * E[k k^T] + K1 K1^T)^-1 with R = M1 - W0 K1 (eq. 14-15), in float64."""
    ### BEGIN SOLUTION
    w0, k1, m1 = w0.double(), k1.double(), m1.double()
    residual = m1 - w0 @ k1
    system = lam * key_moment.double() + k1 @ k1.T
    return torch.linalg.solve(system, k1 @ residual.T).T
    ### END SOLUTION


# %% check points=3
course.check_insert_memories(insert_memories)

# %% [markdown]
# ## 3. What lambda trades, on a real layer
#
# We take real keys from layer 4 of the bundled model: $\mathbb{E}[k k^\top]$ from 2,048 tokens of the package's
# default corpus, and as new keys the keys at the last subject token of three facts, read with a hook on the input
# of $W_{out}$. Each fact gets a new value: its current value plus a random change as large as the value itself.
# `lambda_sweep` (from `memit_lab.kv_memory`) solves eq. 14 for several $\lambda$ and measures two errors:
#
# * **new error**: the part of the wanted change $R$ still missing after the update (0 = written exactly);
# * **old disturbance**: how much an average old memory's output moves, relative to its size.

# %%
lm = load_model("smollm2-135m")
layer = 4
keys = corpus_keys(lm, layer, n_tokens=2048).double()
key_moment = keys.T @ keys / len(keys)
w0 = lm.adapter.w_out_weight(lm.model, layer).detach().double()

facts = KNOWN_FACTS[:3]
new_keys = []
for fact in facts:
    with torch.no_grad(), Trace(lm.model, lm.adapter.w_out_module(layer), retain_input=True) as trace:
        lm.model(**lm.tokenizer(fact.prompt, return_tensors="pt"))
    new_keys.append(trace.input[0, last_subject_token(lm.tokenizer, fact.prompt, fact.subject)])
k1 = torch.stack(new_keys, 1).double()
old_values = w0 @ k1
change = torch.randn(old_values.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
m1 = old_values + change * old_values.norm(dim=0) / change.norm(dim=0)
print("keys:", tuple(keys.shape), " E[k k^T]:", tuple(key_moment.shape), " new keys K1:", tuple(k1.shape))

sweep = lambda_sweep(w0, k1, m1, key_moment, [1e-2, 1e0, 1e2, 1.5e4, 1e6])
display(sweep.to_frame())
ax = sweep.plot()

# %% [markdown]
# Small $\lambda$: the new memories are written exactly, and old outputs move most. Large $\lambda$: old memories
# are kept and the new ones are hardly written. The paper's $\lambda = 15{,}000$ (for GPT-J, with statistics from
# Wikipedia) sits where the new values are still mostly written (here new error 0.18: 82% written); in MEMIT the
# part left unwritten at one layer is handed to the next layers (assignment 4). Why so much at a λ ten times
# $d_{mlp}$? For a key typical of the statistics' text $k^\top C^{-1} k \approx d_{mlp}$, and one key alone would be
# written about $d_{mlp} / (\lambda + d_{mlp})$ = 9%; subject keys are far from typical (lecture notebook 03 measures
# $k^\top C^{-1} k$ = 9,314 for the Eiffel Tower's key, six times $d_{mlp}$), so they are written much more. memit_lab's
# MEMIT uses λ = 1,500 for this model (`MemitHyperParams.for_model`).
#
# ## 4. One new key: Sherman-Morrison, and ROME as the limit
#
# For a single new pair ($u = 1$, $K_1 = k$, $R = r$), the inverse of $C_0 + k k^\top$ applied to $k$ has a closed
# form (the Sherman-Morrison formula):
#
# $$(C_0 + k k^\top)^{-1} k = \frac{C_0^{-1} k}{1 + k^\top C_0^{-1} k}
# \quad\Longrightarrow\quad \Delta = \frac{r\, (C_0^{-1} k)^\top}{1 + k^\top C_0^{-1} k}$$
#
# a rank-one matrix whose rows all point along $C_0^{-1} k$.
#
# ### Exercise 3.3 - the rank-one form of eq. 14


# %% solution
def rank_one_update(
    r: Float[torch.Tensor, " d_model"], k: Float[torch.Tensor, " d_mlp"], c0: Float[torch.Tensor, "d_mlp d_mlp"]
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Delta = r (C0^-1 k)^T / (1 + k^T C0^-1 k): eq. 14 for one key, in float64."""
    ### BEGIN SOLUTION
    k = k.double()
    direction = torch.linalg.solve(c0.double(), k)
    return torch.outer(r.double(), direction) / (1 + k @ direction)
    ### END SOLUTION


# %% check points=2
course.check_rank_one_update(rank_one_update)

# %% [markdown]
# ROME (the single-fact method MEMIT grew from) asks for the new pair to be stored **exactly**,
# $(W + \Delta) k = v$, and among all such $\Delta$ takes the one that moves old outputs least on average,
# i.e. minimises $\mathrm{tr}(\Delta C \Delta^\top) = \mathbb{E}\lVert \Delta k_{old} \rVert^2$ with
# $C = \mathbb{E}[k k^\top]$. A Lagrange multiplier gives
#
# $$\Delta = \frac{(v - W k)\,(C^{-1} k)^\top}{k^\top C^{-1} k}$$
#
# ### Exercise 3.4 - ROME's update


# %% solution
def rome_update(
    w: Float[torch.Tensor, "d_model d_mlp"],
    k: Float[torch.Tensor, " d_mlp"],
    v: Float[torch.Tensor, " d_model"],
    c: Float[torch.Tensor, "d_mlp d_mlp"],
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Delta = (v - W k) (C^-1 k)^T / (k^T C^-1 k): stores (k, v) exactly, disturbing old keys least."""
    ### BEGIN SOLUTION
    k = k.double()
    direction = torch.linalg.solve(c.double(), k)
    return torch.outer(v.double() - w.double() @ k, direction) / (k @ direction)
    ### END SOLUTION


# %% check points=2
course.check_rome_update(rome_update)

# %% [markdown]
# The two differ only by the "1 +" in the denominator. With $C_0 = \lambda C$ the Sherman-Morrison denominator is
# $1 + k^\top C^{-1} k / \lambda$, so as $\lambda \to 0$ eq. 14 becomes ROME's update. Once your three updates pass
# their checks, the next cell measures it on the real layer-4 key of the first fact, with your functions: the
# distance of `rank_one_update` from `rome_update` as $\lambda$ shrinks, and whether `rank_one_update` agrees with
# `insert_memories` for one key.

# %%
ready = all(
    course.has_passed(check, function)
    for check, function in [
        (course.check_insert_memories, insert_memories),
        (course.check_rank_one_update, rank_one_update),
        (course.check_rome_update, rome_update),
    ]
)
print("your functions passed their checks:", ready)
if ready:
    k, v = k1[:, 0], m1[:, 0]
    rome = rome_update(w0, k, v, key_moment)
    rows = []
    for lam in [1e4, 1e2, 1e0, 1e-2]:
        delta = rank_one_update(v - w0 @ k, k, lam * key_moment)
        same_as_eq14 = insert_memories(w0, k[:, None], v[:, None], key_moment, lam)
        rows.append(
            {
                "lambda": lam,
                "distance to ROME (relative)": float((delta - rome).norm() / rome.norm()),
                "rank-one form = eq. 14": bool((delta - same_as_eq14).norm() <= 1e-6 * same_as_eq14.norm()),
            }
        )
    display(pd.DataFrame(rows))

# %% [markdown]
# ## Questions to think about
#
# 1. In section 3, why does the *old disturbance* keep falling as $\lambda$ grows, while the *new error* approaches 1?
#    What happens to $\Delta$ as $\lambda \to \infty$?
# 2. `key_moment` came from 2,048 tokens, and $\mathbb{E}[k k^\top]$ is `[1536, 1536]`. What would go wrong in
#    exercise 3.2 with only 1,000 tokens and a very small $\lambda$? (Hint: the rank of $K K^\top$.)
# 3. ROME stores one fact exactly. Why can't MEMIT simply apply ROME once per fact for 10,000 facts?
