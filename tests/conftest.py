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


@pytest.fixture(scope="session")
def expanded_tiny_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """`tiny_llama_dir` expanded to the speech vocabulary (193,792 tokens, no language tags, seed 0)."""
    from speechlm.vocab_expansion import expand_vocab

    return expand_vocab(tiny_llama_dir, tmp_path_factory.mktemp("expanded") / "tiny-llama32-speech").output


REPO = Path(__file__).resolve().parent.parent


def run_torchrun(nproc: int, args: list[str], log: Path, timeout: int = 600, env: dict | None = None):
    """Run `torchrun --nproc-per-node nproc ARGS` (a script path or `-m module`); log to `log`."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a free rendezvous port, so parallel runs never collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={port}", *args]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return proc.returncode, log.read_text()
