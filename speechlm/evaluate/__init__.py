"""Checkpoint evaluation (`python -m speechlm.evaluate`): speak a fixed evaluation set with each
checkpoint, transcribe it, score intelligibility per language and speaker similarity, pin the best.

  scoring.py    text normalisation, CER/WER (jiwer), failure checks, per-language tables
  asr.py        ASR backends: Whisper-family models from local directories, the synthetic codec's inverse
  speaker.py    speaker-similarity backends: x-vector models from a local directory, the synthetic speakers
  evaluator.py  the command: checkpoints -> export -> synthesis -> scores, resumable; --pin-best, --watch
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class EvaluationError(ValueError):
    """Bad input or setup (missing checkpoint, bad eval line, unknown language, missing model dir): one clear message."""


@dataclass(frozen=True)
class Utterance:
    """Speech to transcribe or embed: its codes (int32, 0..65535) and, when decoded or recorded, a wav file."""
    id: str
    language: str
    codes: np.ndarray
    wav: Path | None = None  # 16 kHz mono, or any integer-PCM wav (read through synthesizer.read_wav)
