"""memit_lab: learn and explore how GPT-style models store facts, and how MEMIT rewrites them.

The package is built in three floors (see CONTRIBUTING.md): the model and its adapter
(``models``, ``adapters``, ``hooks``, ``prompts``); the mathematics, one module per paper
step; and what people touch (plots, the CLI, notebooks).
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
