"""GReaTer for DSPy: optimize a program's instructions with gradients over a small model's reasoning."""

from dspy_greater.extractor import Extractor, derive_extractor
from dspy_greater.loading import ModelSpec, load_optimizer_model
from dspy_greater.search import GreaterConfig, SearchResult
from dspy_greater.teleprompter import GReaTerTeleprompter

__all__ = [
    "Extractor",
    "GReaTerTeleprompter",
    "GreaterConfig",
    "ModelSpec",
    "SearchResult",
    "derive_extractor",
    "load_optimizer_model",
]
__version__ = "0.1.0"
