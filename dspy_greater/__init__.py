"""GReaTer for DSPy: optimize a program's instructions with gradients over a small model's reasoning.

The public names are imported on first use, so that ``import dspy_greater`` (and the command line's
``--help``) does not load torch and DSPy.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Extractor": "dspy_greater.engine.extractor",
    "derive_extractor": "dspy_greater.engine.extractor",
    "ModelSpec": "dspy_greater.models.loading",
    "load_optimizer_model": "dspy_greater.models.loading",
    "GreaterConfig": "dspy_greater.engine.config",
    "SearchResult": "dspy_greater.engine.search",
    "GReaTerTeleprompter": "dspy_greater.teleprompter",
    "GReaTerAdapter": "dspy_greater.targets.adapter",
    "PlainTextLM": "dspy_greater.targets.plain_text",
    "LlamaCppServer": "dspy_greater.targets.llama_cpp",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dspy_greater' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_EXPORTS])
