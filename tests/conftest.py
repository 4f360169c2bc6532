"""Shared fixtures: a tiny llama model written once per session, no downloads, isolated caches."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _isolated_cai_home(tmp_path_factory, monkeypatch):
    """Every test gets its own CAI_HOME so caches never leak between tests or into ~/.cache."""
    monkeypatch.setenv("CAI_HOME", str(tmp_path_factory.mktemp("cai_home")))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from cai.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from cai.backends.hf import HFBackend

    return HFBackend.from_spec(str(tiny_model_dir), batch_size=4, min_prefix_tokens=16)
