"""Shared, session-scoped fixtures: the real Llama-3 tokenizer and tiny Llama-3.2 models.

Expensive artefacts are built once per test session under one temporary root.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from speechlm.demo import tiny

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
    from speechlm.model.vocab_expansion import expand_vocab

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


def write_synthetic_blend(model_dir: Path, out: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Real indexed datasets in the token layout's formats + a blend file over them:
    audio-only speech in hi and ta (a learnable synthetic codec: each of 30 'words' is a fixed
    run of codes), TTS pairs in hi, and English text; a held-out validation prefix for each."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from speechlm.data.blend_file import Blend
    from speechlm.token_layout import TokenLayout

    layout = TokenLayout.load(model_dir)
    rng = np.random.default_rng(seed)
    words = [rng.integers(0, 65_536, size=int(rng.integers(3, 6))) for _ in range(30)]
    text_words = [rng.integers(1_000, 20_000, size=int(rng.integers(1, 3))) for _ in range(30)]

    def utterance():
        picks = rng.integers(0, len(words), size=int(rng.integers(3, 7)))
        return np.concatenate([text_words[i] for i in picks]), np.concatenate([words[i] for i in picks])

    makers = {
        "audio/hi": lambda: layout.audio_document(utterance()[1]),
        "audio/ta": lambda: layout.audio_document(utterance()[1] + 7),
        "tts/hi": lambda: layout.tts_document(*utterance()),
        "text/en": lambda: layout.text_document(utterance()[0]),
    }
    out.mkdir(parents=True, exist_ok=True)
    train, valid, rows = [], {}, []
    for name, make in makers.items():
        for split, count in (("train", n_docs), ("valid", 40)):
            prefix = str(out / f"{name.replace('/', '_')}_{split}")
            builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
            tokens = 0
            for _ in range(count):
                doc = make()
                tokens += len(doc)
                builder.add_document(doc, [len(doc)])
            builder.finalize(prefix + ".idx")
            if split == "train":
                train.append(prefix)
                rows.append({"name": name, "kind": name.split("/")[0], "language": name.split("/")[1],
                             "prefix": prefix, "tokens": tokens})
            else:
                valid[name] = prefix
    weights = [0.4, 0.3, 0.2, 0.1]
    blend = Blend(layout_hash=layout.layout_hash, train_prefixes=train, train_weights=weights,
                  validation=valid, planned_tokens=0, datasets=rows)
    return blend.write(out / "blend.yaml")


@pytest.fixture(scope="session")
def synthetic_blend(expanded_tiny_dir, tmp_path_factory) -> Path:
    return write_synthetic_blend(expanded_tiny_dir, tmp_path_factory.mktemp("synthetic-blend"))


def convert_to_megatron(hf_dir: Path, out: Path) -> Path:
    """`conversion/hf_to_megatron.py` (TP 1): the checkpoint a recipe's run starts from. Its output
    is kept beside it (`<out>.log`) for tests of the converter itself."""
    proc = subprocess.run([sys.executable, "conversion/hf_to_megatron.py", "--input", str(hf_dir), "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out.with_suffix(".log").write_text(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="session")
def converted_tiny_dir(expanded_tiny_dir, tmp_path_factory) -> Path:
    """`expanded_tiny_dir` as a Megatron checkpoint (checkpoint.pretrained_checkpoint of a run)."""
    return convert_to_megatron(expanded_tiny_dir, tmp_path_factory.mktemp("converted") / "tiny-llama32-speech")


@pytest.fixture(scope="session")
def expanded_tiny_8b_dir(tmp_path_factory) -> Path:
    """A tiny model shaped like Llama-3.1-8B at TP 4 (speechlm.demo.tiny), expanded; same token layout
    as `expanded_tiny_dir`, so `synthetic_blend` serves it too."""
    from speechlm.model.vocab_expansion import expand_vocab

    model = tiny.make_tiny_llama31_8b_shaped(tmp_path_factory.mktemp("tiny-llama31-8b"))
    return expand_vocab(model, tmp_path_factory.mktemp("expanded-8b") / "tiny-llama31-8b-speech").output


@pytest.fixture(scope="session")
def converted_tiny_8b_dir(expanded_tiny_8b_dir, tmp_path_factory) -> Path:
    return convert_to_megatron(expanded_tiny_8b_dir, tmp_path_factory.mktemp("converted-8b") / "tiny-llama31-8b-speech")


# --- S3: a moto server on loopback, shared by every test that needs an S3/R2 endpoint ---------
from s3_fixtures import s3_server  # noqa: E402,F401  (tests/ is on sys.path: rootdir conftest)


# --- the end-to-end demo: run once per session, shared by test_demo and test_synthesize --------
@dataclass
class DemoRun:
    work: Path
    proc: subprocess.CompletedProcess
    seconds: float


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The README's main command (`python -m speechlm.demo`), defaults only, in a fresh work dir."""
    work = tmp_path_factory.mktemp("demo")
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "speechlm.demo", "--workdir", str(work)], cwd=REPO,
                          capture_output=True, text=True, timeout=2400)
    return DemoRun(work, proc, time.time() - started)
