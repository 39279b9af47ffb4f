# %% [markdown]
# # Assignment 5 - Null-space editing: AlphaEdit's projector and update
#
# MEMIT's update (eq. 14, assignment 3) writes new memories *against* old ones: $\lambda C_0$ in
# $\Delta = R K_1^\top (\lambda C_0 + K_1 K_1^\top)^{-1}$ pulls $\Delta$ towards leaving $W k_0$ alone, but only
# softly, so every edit moves the outputs of old keys a little, and edit after edit the moves add up. **AlphaEdit**
# (Fang et al., ICLR 2025) replaces the soft trade-off by a hard one: it lets the update act only in directions that
# the old keys (almost) never take. If $P$ projects onto those directions, $P k_0 \approx 0$, then any update of
# the form $\Delta P$ leaves the old memories where they were:
#
# $$(W + \Delta P)\, k_0 = W k_0 + \Delta\, (P k_0) \approx W k_0 .$$
#
# In this assignment you build $P$ from real keys of the bundled model, measure what it protects and what it lets
# through, and implement AlphaEdit's update.
#
# | exercise | you implement | points |
# |---|---|---|
# | 5.1 | `null_space_projector`: $P = \hat U \hat U^\top$ from the spectrum of $C_0$ | 3 |
# | 5.2 | `energy_shares`: how much of the old and of the new keys the null space holds | 2 |
# | 5.3 | `projected_update`: AlphaEdit's update, solved without an inverse | 3 |
#
# Conventions as in assignment 3: keys are **columns** ($K$ is `[d_mlp, n]`), $W$ is `[d_model, d_mlp]`, and every
# solve runs in float64 with `torch.linalg.solve`. Write each function yourself: a check fails a function that
# calls `memit_lab.alphaedit`'s own answer (it is imported only after the check). The lecture notebooks before this
# assignment are `notebooks/03_key_value_memory.ipynb` ($C_0$ and its spectrum) and
# `notebooks/04_multi_layer_update.ipynb` (Algorithm 1); it builds on assignment 3.

# %% setup
import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display
from jaxtyping import Float

from memit_lab import load_model
from memit_lab.checks import Course
from memit_lab.editing import edit_keys
from memit_lab.facts import KNOWN_FACTS
from memit_lab.hparams import AlphaEditHyperParams, MemitHyperParams
from memit_lab.requests import EditRequest
from memit_lab.stats import corpus_keys

torch.manual_seed(0)
torch.set_num_threads(2)
pd.set_option("display.precision", 3)
pd.set_option("display.width", 160)
course = Course()  # runs the checks below and remembers which of your functions passed

# %% [markdown]
# ## 1. The old keys and their spectrum
#
# We cannot see the keys pretraining stored, so, as MEMIT does for $C_0$ (eq. 15), we stand in for them with the keys
# $W_{out}$ reads on ordinary text: layer 3 of the bundled model (one of its edit layers 0-4), at 6,144 token
# positions of the package's corpus. The first 4,096 are $K_0$, whose second moment
#
# $$C_0 = \tfrac{1}{n} K_0 K_0^\top$$
#
# (`[d_mlp, d_mlp]`; the mean, so that its scale, and the threshold below, do not depend on $n$) defines the null
# space; the other 2,048 are **held out**: keys of the same kind of text that $C_0$ never saw, to
# measure whether what protects $K_0$ also protects them. The **edit keys** are the keys of 20 known facts at their
# subject's last token (eq. 19, bare prompts), the keys an edit writes through.

# %%
lm = load_model("smollm2-135m")
layer = 3
hp = AlphaEditHyperParams.for_model(lm)
keys = corpus_keys(lm, layer, n_tokens=6144).double().T
k0, held_out = keys[:, :4096], keys[:, 4096:]
c0 = k0 @ k0.T / k0.shape[1]
facts = KNOWN_FACTS[:20]
requests = [EditRequest(f.template, f.subject, f.target) for f in facts]
k_edit = edit_keys(lm, requests, layer, ("{}",)).double()
w0 = lm.adapter.w_out_weight(lm.model, layer).detach().double()
shapes = {"K0": k0, "held out": held_out, "C0": c0, "edit keys": k_edit}
print(", ".join(f"{name} {tuple(x.shape)}" for name, x in shapes.items()))
print(f"AlphaEdit's settings for this model: threshold {hp.threshold:g}, alpha {hp.alpha:g}, layers {hp.layers}")

eigenvalues = torch.linalg.eigvalsh(c0)  # ascending
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogy(eigenvalues.flip(0).numpy())
ax.axhline(hp.threshold, color="C3", ls="--", label=f"threshold {hp.threshold:g}")
ax.set(xlabel="eigenvector (largest eigenvalue first)", ylabel="eigenvalue of $C_0$", title=f"$C_0$, layer {layer}")
ax.legend()
print(
    f"eigenvalues from {float(eigenvalues[0]):.2g} to {float(eigenvalues[-1]):.3g};",
    int((eigenvalues < hp.threshold).sum()),
    f"of {len(eigenvalues)} below the threshold",
)

# %% [markdown]
# The spectrum falls smoothly over about three orders of magnitude (0.00038 to 0.322, printed above), with no gap in
# the plot: keys of text use every direction a little, and a few directions a lot. There is no exact null space, so
# AlphaEdit takes the directions whose eigenvalue is below a **threshold** $\tau$ as the null space, a choice we
# measure below.
#
# ## 2. The projector (AlphaEdit's first step)
#
# Write $C_0 = U \Lambda U^\top$ (the eigendecomposition of a symmetric matrix: $U$ orthonormal, its **columns** the
# eigenvectors, $\Lambda$ the eigenvalues). Keep the eigenvectors whose eigenvalue is below $\tau$,
# $\hat U = U[:, \lambda_i < \tau]$, and project onto their span:
#
# $$P = \hat U \hat U^\top .$$
#
# $P$ is symmetric and $P^2 = P$; it removes every eigenvector above the threshold ($P u_i = 0$) and keeps the others.
# Since $\lVert P K_0 \rVert_F^2 = n \operatorname{tr}(P C_0) = n \sum_{\lambda_i < \tau} \lambda_i$, the old keys
# keep in the null space only the energy of the eigenvalues below $\tau$: small, but not zero.
#
# ### Exercise 5.1 - the null-space projector
#
# `torch.linalg.eigh(C)` returns the eigenvalues (ascending) and the eigenvectors as columns. Work in float64.


# %% solution
def null_space_projector(
    second_moment: Float[torch.Tensor, "d_mlp d_mlp"], threshold: float
) -> Float[torch.Tensor, "d_mlp d_mlp"]:
    """P = Û Û^T, Û the eigenvectors of C0 = U diag(lambda) U^T whose eigenvalue is below ``threshold``."""
    ### BEGIN SOLUTION
    eigenvalues, vectors = torch.linalg.eigh(second_moment.double())
    null = vectors[:, eigenvalues < threshold]
    return null @ null.T
    ### END SOLUTION


# %% check points=3
course.check_null_space_projector(null_space_projector)

# %% [markdown]
# ### The consequence, measured
#
# From here on the lecture uses `memit_lab.alphaedit`'s projector (imported now that you have written yours). Take
# a random update $\Delta$ (seeded, the shape of $W_{out}$) and its projected version $\Delta P$, and measure how much
# each moves the outputs $W k$ of three sets of keys, relative to the unprojected $\Delta$:
# $\lVert \Delta P K \rVert_F / \lVert \Delta K \rVert_F$. On the old keys $K_0$ that is what the projection keeps of
# a disturbance; on the held-out keys, whether that carries over to text $C_0$ did not see; on the edit keys, how much
# of an update can still reach them.

# %%
from memit_lab.alphaedit import null_space_projector as library_projector

delta = torch.randn(w0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
thresholds = [1e-3, hp.threshold, 2e-2]
rows = []
for tau in thresholds:
    p = library_projector(c0, tau)
    moved = {
        name: float((delta @ p @ k).norm() / (delta @ k).norm())
        for name, k in [("old keys K0", k0), ("held-out keys", held_out), ("edit keys", k_edit)]
    }
    rows.append({"threshold": tau, "null-space dim": round(float(p.trace())), **moved})
moved = pd.DataFrame(rows).set_index("threshold")
display(moved)
ax = moved.drop(columns="null-space dim").plot.bar(figsize=(6.5, 3), rot=0)
ax.set(ylabel=r"$\|\Delta P K\| / \|\Delta K\|$", title="what a projected update still moves")
p = library_projector(c0, hp.threshold)

# %% [markdown]
# Read the table from top to bottom: a lower threshold gives a smaller null space (179, 756 and 1,279 of 1,536
# directions), so a projected update moves the old keys less (0.085, 0.306, 0.640 of what the unprojected $\Delta$
# moves), and it reaches less of the edit keys too (0.321, 0.653, 0.863). The held-out keys, which $C_0$ never saw,
# are moved more than $K_0$ at every threshold (0.266, 0.572, 0.804): the protection carries over, but only in part.
#
# ## 3. What the null space holds
#
# The table above used one random $\Delta$. The same question without a random draw, as **energies** (squared
# norms, averaged over keys):
#
# * **old share** $= \operatorname{tr}(P C_0) / \operatorname{tr}(C_0)$: the share of the old keys' energy
#   $\mathbb{E}\lVert k_0 \rVert^2$ that lies in the null space, what an update through $P$ can still disturb
#   (0 for a true null space);
# * **edit share** $= \frac{1}{u} \sum_i \lVert P k_i \rVert^2 / \lVert k_i \rVert^2$ over the edit keys $k_i$: how
#   much of each edit key the update can write through (each key counts once, whatever its length).
#
# ### Exercise 5.2 - the two shares
#
# Return the two numbers as a tuple `(old share, edit share)`.


# %% solution
def energy_shares(
    second_moment: Float[torch.Tensor, "d_mlp d_mlp"],
    projector: Float[torch.Tensor, "d_mlp d_mlp"],
    keys: Float[torch.Tensor, "d_mlp u"],
) -> tuple[float, float]:
    """(tr(P C0) / tr(C0), mean over the columns k of ``keys`` of ||P k||^2 / ||k||^2)."""
    ### BEGIN SOLUTION
    c, p, k = second_moment.double(), projector.double(), keys.double()
    old = float(torch.trace(p @ c) / torch.trace(c))
    edit = float(((p @ k).pow(2).sum(0) / k.pow(2).sum(0)).mean())
    return old, edit
    ### END SOLUTION


# %% check points=2
course.check_energy_shares(energy_shares)

# %% [markdown]
# The threshold trades the two shares against each other. `memit_lab.alphaedit.null_space_report` (imported now)
# computes both for many thresholds from one eigendecomposition:

# %%
from memit_lab.alphaedit import null_space_report

sweep = null_space_report(c0, torch.logspace(-4, -1, 13).tolist(), k_edit)
display(sweep.iloc[::2])
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogx(sweep.threshold, sweep.old_energy, "o-", label="old share (what stays exposed)")
ax.semilogx(sweep.threshold, sweep.edit_energy, "o-", label="edit share (what can be written)")
ax.axvline(hp.threshold, color="grey", ls="--", label=f"memit_lab's default {hp.threshold:g}")
ax.set(xlabel=r"threshold $\tau$", ylabel="share of the energy in the null space", ylim=(0, 1))
ax.legend()

# %% [markdown]
# The default threshold, 5e-3, lies between the rows 3.2e-3 (old share 0.051, edit share 0.311) and 1e-2 (0.209,
# 0.574). These shares do not say where to stop; edits do. `memit_lab.hparams` records that measurement on this
# model (50 known facts edited at once, five layers): ES 92 % at 5e-3 against 72 % at 3e-3, where the edits no longer
# land.
#
# ## 4. The projected update (AlphaEdit's second step)
#
# AlphaEdit looks for an update of the form $\tilde\Delta P$ that writes the new memories $R$ (what the values of the
# new keys $K_1$ still lack, as in eq. 14), keeps the keys $K_p$ that *earlier* edits wrote (in sequential editing;
# none for a first batch), and stays small:
#
# $$\min_{\tilde\Delta}\; \lVert \tilde\Delta P K_1 - R \rVert^2 + \lVert \tilde\Delta P K_p \rVert^2
# + \alpha \lVert \tilde\Delta P \rVert^2 .$$
#
# There is no $\lambda C_0$ term: $P$ already keeps the old keys. Setting the gradient to zero gives
# $\tilde\Delta P A P + \alpha \tilde\Delta P = R K_1^\top P$ with $A = K_p K_p^\top + K_1 K_1^\top$, which AlphaEdit
# solves as
#
# $$\Delta = R K_1^\top P \,(A P + \alpha I)^{-1} .$$
#
# That $\Delta$ is itself of the form $\Delta P$: from $\Delta (A P + \alpha I) = R K_1^\top P$,
# $\alpha \Delta = (R K_1^\top - \Delta A) P$, so $\Delta P = \Delta$ (as $P^2 = P$), and it then solves the equation
# above. $A P$ alone is singular (its rank is at most the number of keys), so $\alpha > 0$ is what makes the system
# solvable.
#
# ### Exercise 5.3 - the projected update
#
# `preserved` is $K_p K_p^\top$ (`[d_mlp, d_mlp]`), or `None` when there are no earlier edits. Solve in float64 and
# without an explicit inverse: $P$ and $A$ are symmetric, so transposing gives the system
# $(P A + \alpha I) \Delta^\top = P K_1 R^\top$ for `torch.linalg.solve`.


# %% solution
def projected_update(
    residuals: Float[torch.Tensor, "d_model u"],
    keys: Float[torch.Tensor, "d_mlp u"],
    projector: Float[torch.Tensor, "d_mlp d_mlp"],
    alpha: float,
    preserved: Float[torch.Tensor, "d_mlp d_mlp"] | None = None,
) -> Float[torch.Tensor, "d_model d_mlp"]:
    """Delta = R K1^T P ((K_p K_p^T + K1 K1^T) P + alpha I)^-1, in float64."""
    ### BEGIN SOLUTION
    k, p, r = keys.double(), projector.double(), residuals.double()
    gram = k @ k.T if preserved is None else k @ k.T + preserved.double()
    system = p @ gram + alpha * torch.eye(len(p), dtype=torch.float64)
    return torch.linalg.solve(system, p @ k @ r.T).T
    ### END SOLUTION


# %% check points=3
course.check_projected_update(projected_update)

# %% [markdown]
# ## 5. MEMIT's update and AlphaEdit's on one layer
#
# Two new memories at layer 3: the keys of the first two facts, each with a new value, its current value $W_0 k$ plus
# a random change as large as the value itself (as in assignment 3). We write them with MEMIT's eq. 14
# ($C_0 = \lambda\, \mathbb{E}[k k^\top]$ with this model's $\lambda = 1{,}500$) and with AlphaEdit's update
# (`memit_lab.alphaedit.null_space_update`, imported now; $P$ at the default threshold, $\alpha = 10$), then with
# AlphaEdit again, this time keeping the keys of three *earlier* edits (facts 3-5) in $K_p K_p^\top$. For each we
# measure:
#
# * **new error** $\lVert \Delta K_1 - R \rVert / \lVert R \rVert$: the part of the wanted change still missing;
# * **old / held-out disturbance** $\lVert \Delta K \rVert_F / \lVert W_0 K \rVert_F$ on $K_0$ and on the held-out keys;
# * **earlier edits moved** $\lVert \Delta K_p \rVert_F / \lVert W_0 K_p \rVert_F$ on the earlier edits' keys.

# %%
from memit_lab.alphaedit import null_space_update
from memit_lab.kv_memory import insertion_update

k1, k_earlier = k_edit[:, :2], k_edit[:, 2:5]
change = torch.randn(w0.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
residuals = change * (w0 @ k1).norm(dim=0) / change.norm(dim=0)
lam = MemitHyperParams.for_model(lm).lam
updates = {
    f"MEMIT, lambda {lam:g}": insertion_update(residuals, k1, lam * c0),
    "AlphaEdit": null_space_update(residuals, k1, p, hp.alpha),
    "AlphaEdit, earlier edits kept": null_space_update(residuals, k1, p, hp.alpha, k_earlier @ k_earlier.T),
}


def disturbance(update: torch.Tensor, k: torch.Tensor) -> float:
    return float((update @ k).norm() / (w0 @ k).norm())


compared = pd.DataFrame(
    {
        "new error": {name: float((d @ k1 - residuals).norm() / residuals.norm()) for name, d in updates.items()},
        "old keys K0": {name: disturbance(d, k0) for name, d in updates.items()},
        "held-out keys": {name: disturbance(d, held_out) for name, d in updates.items()},
        "earlier edits": {name: disturbance(d, k_earlier) for name, d in updates.items()},
    }
)
display(compared)
ax = compared.plot.bar(figsize=(7, 3.2), rot=0, logy=True)
ax.set(ylabel="relative size (log)", title=f"two new memories at layer {layer}")

# %% [markdown]
# Compare the rows. MEMIT writes more of $R$ (new error 0.101 against 0.368: AlphaEdit can write only through the part
# of each edit key that lies in the null space, section 3). AlphaEdit moves the old and the held-out keys less (0.013
# against 0.015 on $K_0$, 0.027 against 0.041 held out). Keeping $K_p K_p^\top$ cuts how far the earlier edits' keys
# move from 0.088 to 0.027, and costs almost nothing in new error (0.371). These are the numbers of one layer: in
# Algorithm 1 each layer takes its share of what is still missing (eq. 20), so what one layer cannot write the next
# ones take over.
#
# ## Questions to think about
#
# 1. On real keys $\Delta P$ leaves the old outputs only *almost* unchanged. What sets the size of what remains, and
#    how would you make it smaller? What would that cost?
# 2. What happens to $P$, to the edits and to the old memories as $\tau \to 0$, and as $\tau$ grows past the largest
#    eigenvalue?
# 3. Why must $\alpha$ be positive in exercise 5.3, while MEMIT's eq. 14 needs no such term?
# 4. In sequential editing AlphaEdit keeps building $P$ from the *unedited* model's statistics and adds the earlier
#    edits' keys as $K_p K_p^\top$. Why not recompute $C_0$ (and $P$) on the edited model after each batch?
