"""Shared pytest fixtures for dspy_greater."""

import pytest

import dspy_greater.teleprompter as tp_module
from dspy_greater.layout import GreaterLayout
from dspy_greater.loading import load_optimizer_model
from dspy_greater.model import OptimizerLM


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads or dequantizes a model (tens of seconds on first run)")


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


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if anything tries to load the optimizer model (input must be checked first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the optimizer model was loaded before the input was validated")

    monkeypatch.setattr(tp_module, "load_optimizer_model", refuse)
