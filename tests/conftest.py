"""Shared pytest fixtures for dspy_greater."""

import pytest

from dspy_greater.loading import load_optimizer_model


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads or dequantizes a model (tens of seconds on first run)")


@pytest.fixture(scope="session")
def optimizer():
    """(model, tokenizer) of the embedded default optimizer model, float32 on CPU.

    Uses the default cache dir, so only the very first run dequantizes the GGUF (~20 s).
    """
    return load_optimizer_model()
