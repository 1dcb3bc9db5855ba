"""Shared fixtures: a tiny random Llama (fast unit tests) and the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import os

import pytest
import torch

# nothing in the test suite may download weights or data
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from repe.models import LoadedModel, load_model, tiny_model


@pytest.fixture(scope="session")
def tiny_lm() -> LoadedModel:
    """4 blocks, d_model 64, random weights (seeded), the embedded model's tokenizer."""
    return tiny_model()


@pytest.fixture(scope="session")
def embedded_lm() -> LoadedModel:
    """The real embedded model, fp32 on CPU."""
    return load_model()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: on a shared, busy machine it avoids OpenMP threads spinning
    against other processes (use with ``pytest.mark.usefixtures("one_torch_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
