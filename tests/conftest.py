"""Shared, session-scoped fixtures: the real Llama-3 tokenizer and tiny Llama-3.2 models.

Expensive artefacts are built once per test session under one temporary root.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from speechlm import tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a model hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """The real 128,256-token Llama-3 tokenizer as Llama-3.2 ships it."""
    return tiny.write_llama3_tokenizer(tmp_path_factory.mktemp("tokenizer-llama32"), release="3.2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama-3.2-architecture HF model (tied embeddings, GQA) with the real tokenizer."""
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama32"))


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_llama(tmp_path_factory.mktemp("tiny-llama32-untied"), tie_word_embeddings=False, seed=1)
