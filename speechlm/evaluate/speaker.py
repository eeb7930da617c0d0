"""Speaker-similarity backends for checkpoint evaluation: one embedding per utterance, compared by cosine.

    model = load_speaker_model("synthetic")          # the synthetic codec's speakers (codes only)
    model = load_speaker_model("/models/wavlm-base-plus-sv")
    emb = model.embed(utterances)                    # (n, d) float32
    cosine(emb[0], emb[1])                           # in -1..1; 0.0 when either is zero

Every backend has `needs_audio` (does it read the utterances' wav files) and `embed(utterances)`.
Speaker-verification models are read from a local directory only (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from speechlm.evaluate import EvaluationError, Utterance
from speechlm.evaluate.asr import SYNTHETIC, check_model_dir


class SpeakerModel(Protocol):
    needs_audio: bool

    def embed(self, utterances: list[Utterance]) -> np.ndarray: ...


def cosine(a, b) -> float:
    """Cosine similarity of two embeddings; 0.0 when either is all zeros (no voice heard: nothing
    like the reference, rather than NaN in the tables)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings of different sizes: {a.shape[0]} and {b.shape[0]}")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.clip(a @ b / (na * nb), -1.0, 1.0))


class SyntheticSpeakers:
    """Per utterance, how many codes were read in each of the synthetic codec's voices: one voice's
    clips have cosine 1 with each other and 0 with any other voice's (unreadable codes count for nobody)."""

    needs_audio = False

    def __init__(self, codec=None):
        from speechlm.demo.synthetic_codec import SyntheticCodec

        self.codec = codec if codec is not None else SyntheticCodec()

    def embed(self, utterances: list[Utterance]) -> np.ndarray:
        out = np.zeros((len(utterances), self.codec.speakers), np.float32)
        for row, u in enumerate(utterances):
            if u.language not in self.codec.languages:
                raise EvaluationError(f"{u.id}: language {u.language!r} is not in the synthetic codec "
                                      f"({', '.join(self.codec.languages)})")
            runs = self.codec.runs[u.language]
            for word, speaker in self.codec.transcribe(u.codes, u.language):
                if speaker is not None:
                    out[row, speaker] += runs[word].shape[1]  # the run's length: codes in that voice
        return out


XVECTOR = ("a local speaker-verification model directory with an x-vector head (e.g. a copy of "
           "microsoft/wavlm-base-plus-sv or microsoft/unispeech-sat-base-plus-sv)")


class XVectorSpeakers:
    """An x-vector speaker-verification model (transformers' AutoModelForAudioXVector) from a local
    directory: 16 kHz wav -> its `embeddings` output."""

    needs_audio = True

    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch
        from transformers import AutoFeatureExtractor, AutoModelForAudioXVector
        from transformers.models.auto.modeling_auto import MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES

        from speechlm.synthesize.synthesizer import pick_device
        from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

        self.model_dir = check_model_dir(model_dir, set(MODEL_FOR_AUDIO_XVECTOR_MAPPING_NAMES), XVECTOR)
        self.device = pick_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        print(f"loading speaker model {self.model_dir} on {self.device}", flush=True)
        try:
            self.features = AutoFeatureExtractor.from_pretrained(self.model_dir, local_files_only=True)
            self.model, info = AutoModelForAudioXVector.from_pretrained(
                self.model_dir, dtype=dtype, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, TypeError) as e:
            raise EvaluationError(f"{self.model_dir}: does not load as {XVECTOR}: {type(e).__name__}: {e}") from None
        if info["missing_keys"]:  # a bare encoder (no x-vector head) would embed with random weights
            raise EvaluationError(f"{self.model_dir}: weights missing for {sorted(info['missing_keys'])[:5]}: "
                                  f"expected {XVECTOR}")
        self.model = self.model.to(self.device).eval()
        self.dtype = dtype
        rate = getattr(self.features, "sampling_rate", SAMPLE_RATE)
        if rate != SAMPLE_RATE:
            raise EvaluationError(f"{self.model_dir}: its feature extractor expects {rate} Hz audio, not {SAMPLE_RATE}")

    def embed(self, utterances: list[Utterance]) -> np.ndarray:
        import torch

        from speechlm.synthesize.synthesizer import SynthesisError, read_wav
        from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

        missing = [u.id for u in utterances if u.wav is None]
        if missing:
            raise EvaluationError(f"{', '.join(missing[:5])}: no wav to embed: the speaker model reads audio "
                                  "(decode the codes with --codec XCODEC2_DIR)")
        rows = []
        for u in utterances:
            try:
                audio = read_wav(u.wav)
            except SynthesisError as e:
                raise EvaluationError(str(e)) from None
            # One clip at a time: padding a batch changes the embeddings of models that take no
            # attention mask (group-norm feature encoders), and clips are few (one per cloning item).
            inputs = self.features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                      for k, v in inputs.items()}
            with torch.inference_mode():
                rows.append(self.model(**inputs).embeddings[0].float().cpu().numpy())
        d = self.model.config.xvector_output_dim
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, d), np.float32)


def load_speaker_model(spec: str, device: str | None = None) -> SpeakerModel:
    """--speaker-model: "synthetic", or a local x-vector model directory (checked and loaded now)."""
    if spec == SYNTHETIC:
        return SyntheticSpeakers()
    return XVectorSpeakers(spec, device)
