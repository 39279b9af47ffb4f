"""memit_lab: learn and explore how GPT-style models store facts, and how MEMIT rewrites them.

The package stands on four floors; a module imports only from its own floor or the ones below
(``tests/test_architecture.py`` reads this list and checks it, lazy imports included):

1. model and adapters: adapters, tiny, cache, models, hooks, prompts, facts, replay
2. mathematics: residual, tracing, kv_memory, corpus, stats, requests, zopt, datasets, evaluate, limitations
2. mathematics of editing: editing, hparams, memit, rome, finetune, alphaedit
3. orchestration: layer_choice, methods, experiments, tradeoffs, sequential
4. what people touch: residual_plots, tracing_plots, explorer_views, widgets, checks, cli

``editing`` is the kernel every method shares (keys at the subject, weight backup, errors) and
``hparams`` holds every method's hyper-parameters with the measured defaults per model; ``methods``
is the registry the experiments, the CLI and the widgets dispatch through. CONTRIBUTING.md maps
each module to the paper step it implements.
"""

from .adapters import ADAPTERS, Adapter, UnsupportedArchitectureError
from .hooks import Trace, TraceDict
from .models import LoadedModel, ModelNotFoundError, load_model
from .prompts import SubjectNotFoundError, generate, subject_token_span, target_scores, top_predictions

__all__ = [
    "ADAPTERS",
    "Adapter",
    "LoadedModel",
    "ModelNotFoundError",
    "SubjectNotFoundError",
    "Trace",
    "TraceDict",
    "UnsupportedArchitectureError",
    "generate",
    "load_model",
    "subject_token_span",
    "target_scores",
    "top_predictions",
]

__version__ = "0.1.0"
