"""Shared fixtures: a tiny random Llama (fast unit tests) and the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile

import pytest
import torch

# nothing in the test suite may download weights or data
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the app's workspaces (app.workspace) go to a scratch folder, never the user's ~/repe-workspace
os.environ["REPE_WORKSPACE"] = tempfile.mkdtemp(prefix="repe-test-workspace-")

from repe.models import LoadedModel, load_model, tiny_model

atexit.register(shutil.rmtree, os.environ["REPE_WORKSPACE"], True)


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


class _OldCacheName(logging.Handler):
    """Records transformers' warnings about the KV cache argument's old names (``past_key_values``,
    renamed ``cache`` in transformers 5.24): the project must pass the name the model declares."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "past_key_values" in msg or "cache_params" in msg:
            self.seen.append(f"{record.name}: {msg}")


_OLD_CACHE_NAME = _OldCacheName()
logging.getLogger("transformers").addHandler(_OLD_CACHE_NAME)


@pytest.fixture(autouse=True)
def no_old_cache_name_warning():
    """Fails the test during which transformers first warns about an old cache argument name (it warns
    once per process, so the test that triggers it is the one that fails)."""
    before = len(_OLD_CACHE_NAME.seen)
    yield
    if len(_OLD_CACHE_NAME.seen) > before:
        pytest.fail(f"transformers warned about an old cache argument: {_OLD_CACHE_NAME.seen[-1]}")
