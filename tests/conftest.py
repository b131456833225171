"""Shared pytest fixtures for dspy_greater."""

import logging

import pytest

import dspy_greater.teleprompter as tp_module
from dspy_greater import GReaTerTeleprompter
from dspy_greater.engine.layout import GreaterLayout
from dspy_greater.models.loading import load_optimizer_model
from dspy_greater.metrics import exact_match
from dspy_greater.engine.model import OptimizerLM


@pytest.fixture(autouse=True, scope="session")
def _package_records_reach_caplog():
    """The package logs as DSPy does (its own handler, not propagated); tests read its records with caplog."""
    logging.getLogger("dspy_greater").propagate = True


@pytest.fixture(scope="session")
def optimizer():
    """(model, tokenizer) of the embedded default optimizer model, float32 on CPU.

    Uses the default cache dir, so only the very first run dequantizes the GGUF (~20 s).
    """
    return load_optimizer_model()


@pytest.fixture(scope="session")
def lm(optimizer):
    """The embedded model wrapped for the search's operations (8 sequences per forward)."""
    model, tokenizer = optimizer
    return OptimizerLM(model, tokenizer, batch_size=8)


@pytest.fixture(scope="session")
def layout(optimizer):
    """The paper's layout on the embedded model's tokenizer."""
    return GreaterLayout(optimizer[1])


TINY_SEARCH = dict(num_steps=1, batch_size=3, max_reasoning_tokens=8, eval_every=1, progress=False,
                   target_candidates=2, num_threads=1)


@pytest.fixture(scope="session")
def tiny_teleprompter(optimizer):
    """Builds a GReaTerTeleprompter on the loaded embedded model with tiny settings (one step, three
    examples, eight reasoning tokens); keyword arguments override them."""

    def make(**overrides):
        settings = {"metric": exact_match, **TINY_SEARCH, **overrides}
        return GReaTerTeleprompter(**settings).use_loaded_model(*optimizer)

    return make


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load the optimizer model (input must be checked first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the optimizer model was loaded before the input was validated")

    monkeypatch.setattr(tp_module, "load_optimizer_model", refuse)
