"""ASR backends for checkpoint evaluation: speech in, one transcript per utterance out.

    asr = load_asr(["synthetic"])                                 # the synthetic codec's inverse (codes only)
    asr = load_asr(["/models/whisper-large-v3"])                  # one Whisper model for every language
    asr = load_asr(["/models/whisper-large-v3", "hi=/models/indicwhisper-hi", "ta=/models/indicwhisper-ta"])
    texts = asr.transcribe(utterances)                            # list[str], in order

Every backend has `needs_audio` (does it read the utterances' wav files, so codes must be decoded
with --codec first) and `transcribe(utterances) -> list[str]`. Whisper models are read from local
directories only (`from_pretrained(dir, local_files_only=True)`: nothing is downloaded); each
directory is checked when the map is built and loaded the first time one of its languages is
transcribed, then kept. Transcripts are raw: normalisation is scoring.py's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from speechlm.evaluate import EvaluationError, Utterance
from speechlm.token_layout import LANGUAGES

SYNTHETIC = "synthetic"
UNKNOWN_WORD = "<unk>"  # what SyntheticASR hears for an unreadable stretch: a wrong word after normalisation
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


class ASR(Protocol):
    needs_audio: bool

    def transcribe(self, utterances: list[Utterance]) -> list[str]: ...


class SyntheticASR:
    """The synthetic codec read back: codes -> its words, an unreadable stretch -> `<unk>`."""

    needs_audio = False

    def __init__(self, codec=None):
        from speechlm.demo.synthetic_codec import SyntheticCodec

        self.codec = codec if codec is not None else SyntheticCodec()

    def transcribe(self, utterances: list[Utterance]) -> list[str]:
        from speechlm.demo.synthetic_codec import UNKNOWN

        out = []
        for u in utterances:
            if u.language not in self.codec.languages:
                raise EvaluationError(f"{u.id}: language {u.language!r} is not in the synthetic codec "
                                      f"({', '.join(self.codec.languages)})")
            words = self.codec.transcribe(u.codes, u.language)
            out.append(" ".join(UNKNOWN_WORD if w is UNKNOWN else w for w, _ in words))
        return out


def check_model_dir(path: str | Path, model_types: set[str], expected: str) -> Path:
    """A local HF model directory whose config.json names one of `model_types`, with weights and a
    preprocessor config: checked before anything loads, so a typo fails at once, not mid-evaluation."""
    d = Path(path)
    if not d.is_dir():
        raise EvaluationError(f"{d}: no such directory (expected {expected})")
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise EvaluationError(f"{d}: no readable config.json ({type(e).__name__}): expected {expected}") from None
    if model_type not in model_types:
        raise EvaluationError(f"{d}: config.json has model_type {model_type!r}, not {' / '.join(sorted(model_types))}: "
                              f"expected {expected}")
    missing = [name for name, ok in (("weights (*.safetensors or pytorch_model*.bin)",
                                      any(any(d.glob(p)) for p in WEIGHT_PATTERNS)),
                                     ("preprocessor_config.json (or processor_config.json)",
                                      any((d / n).is_file() for n in ("preprocessor_config.json", "processor_config.json"))))
               if not ok]
    if missing:
        raise EvaluationError(f"{d}: no {' and no '.join(missing)}: expected {expected}")
    return d


WHISPER = "a local Whisper-family model directory (e.g. a copy of openai/whisper-large-v3 or an IndicWhisper fine-tune)"


def check_whisper_dir(path: str | Path) -> Path:
    d = check_model_dir(path, {"whisper"}, WHISPER)
    if not ((d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()):
        raise EvaluationError(f"{d}: no tokenizer (tokenizer.json or vocab.json + merges.txt): expected {WHISPER}")
    return d


class WhisperASR:
    """A Whisper-family model from a local directory: 16 kHz wav -> text, `batch_size` clips at a time.

    The language is forced (with task "transcribe") when the model's generation config lists it
    (`lang_to_id` has `<|xx|>`); otherwise (a monolingual fine-tune, or a language Whisper lacks,
    such as Odia) the model's own prompt (forced_decoder_ids, or language detection) decides, and
    it says so once per language. Clips longer than 30 s are cut at 30 s by the feature extractor
    (Whisper's window): evaluation utterances are sentences, and a runaway generation fails the
    duration checks anyway. bf16 on cuda, fp32 on cpu.
    """

    needs_audio = True

    def __init__(self, model_dir: str | Path, device: str | None = None, batch_size: int = 8):
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        from speechlm.synthesize.synthesizer import pick_device
        from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

        self.model_dir = check_whisper_dir(model_dir)
        self.device, self.batch_size = pick_device(device), max(1, int(batch_size))
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        print(f"loading ASR {self.model_dir} on {self.device}", flush=True)
        try:
            self.processor = WhisperProcessor.from_pretrained(self.model_dir, local_files_only=True)
            self.model, info = WhisperForConditionalGeneration.from_pretrained(
                self.model_dir, dtype=self.dtype, local_files_only=True, output_loading_info=True)
        except (OSError, ValueError, TypeError) as e:
            raise EvaluationError(f"{self.model_dir}: does not load as {WHISPER}: {type(e).__name__}: {e}") from None
        if info["missing_keys"]:  # e.g. a bare encoder-decoder without its head: it would transcribe noise
            raise EvaluationError(f"{self.model_dir}: weights missing for {sorted(info['missing_keys'])[:5]}: "
                                  f"expected {WHISPER}")
        self.model = self.model.to(self.device).eval()
        rate = self.processor.feature_extractor.sampling_rate
        if rate != SAMPLE_RATE:
            raise EvaluationError(f"{self.model_dir}: its feature extractor expects {rate} Hz audio, not {SAMPLE_RATE}")
        self.lang_to_id = dict(getattr(self.model.generation_config, "lang_to_id", None) or {})
        self._unforced: set[str] = set()

    def generate_kwargs(self, language: str) -> dict:
        """language + task when the model knows the language, else nothing (its own prompt decides)."""
        if f"<|{language}|>" in self.lang_to_id:
            return {"language": language, "task": "transcribe"}
        if language not in self._unforced:
            self._unforced.add(language)
            print(f"ASR {self.model_dir}: no <|{language}|> in its generation config's lang_to_id: "
                  f"transcribing {language} without forcing the language", flush=True)
        return {}

    def transcribe(self, utterances: list[Utterance]) -> list[str]:
        import torch

        from speechlm.synthesize.synthesizer import SynthesisError, read_wav
        from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

        # No codes means nothing was spoken (and no wav written): an empty transcript, not an error.
        silent = [u for u in utterances if u.wav is None and len(u.codes)]
        if silent:
            raise EvaluationError(f"{', '.join(u.id for u in silent[:5])}: no wav to transcribe: the Whisper ASR "
                                  "reads audio (decode the codes with --codec XCODEC2_DIR)")
        out = [""] * len(utterances)
        by_language: dict[str, list[int]] = {}
        for i, u in enumerate(utterances):
            if u.wav is not None:
                by_language.setdefault(u.language, []).append(i)
        for language, rows in by_language.items():  # one generate call forces one language
            kwargs = self.generate_kwargs(language)
            for start in range(0, len(rows), self.batch_size):
                batch = rows[start:start + self.batch_size]
                try:
                    audio = [read_wav(utterances[i].wav) for i in batch]
                except SynthesisError as e:
                    raise EvaluationError(str(e)) from None
                features = self.processor.feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
                with torch.inference_mode():
                    ids = self.model.generate(features.input_features.to(self.device, self.dtype), **kwargs)
                for i, text in zip(batch, self.processor.batch_decode(ids, skip_special_tokens=True)):
                    out[i] = text.strip()
        return out


class WhisperByLanguage:
    """Whisper models per language, with an optional default for the rest; each loaded once, on first use."""

    needs_audio = True

    def __init__(self, dirs: dict[str | None, Path], device: str | None = None, batch_size: int = 8):
        self.dirs = dirs  # language (None: the default) -> model directory, each already checked
        self.device, self.batch_size = device, batch_size
        self._models: dict[Path, WhisperASR] = {}

    def describe(self) -> str:
        return ", ".join(f"{lang or 'default'}={d}" for lang, d in self.dirs.items())

    def model_for(self, language: str) -> WhisperASR:
        d = self.dirs.get(language, self.dirs.get(None))
        if d is None:
            raise EvaluationError(f"no ASR model for language {language!r} (--asr {self.describe()}): give "
                                  f"--asr {language}=DIR or a default --asr DIR")
        key = d.resolve()  # a directory given for several languages loads once
        if key not in self._models:
            self._models[key] = WhisperASR(d, self.device, self.batch_size)
        return self._models[key]

    def transcribe(self, utterances: list[Utterance]) -> list[str]:
        languages = list(dict.fromkeys(u.language for u in utterances))
        uncovered = [lang for lang in languages if lang not in self.dirs and None not in self.dirs]
        if uncovered:  # before loading anything
            raise EvaluationError(f"no ASR model for language(s) {', '.join(uncovered)} (--asr {self.describe()}): "
                                  "give --asr LANG=DIR for each, or a default --asr DIR")
        out = [""] * len(utterances)
        for language in languages:
            rows = [i for i, u in enumerate(utterances) if u.language == language]
            for i, text in zip(rows, self.model_for(language).transcribe([utterances[i] for i in rows])):
                out[i] = text
        return out


def load_asr(specs: list[str], device: str | None = None, batch_size: int = 8) -> ASR:
    """--asr values: ["synthetic"], or directories: "DIR" (the default for every language) and/or
    "LANG=DIR" (that language's model). Directories are checked now, loaded on first use. A
    directory whose name has "=" before any "/" reads as LANG=DIR: write it as ./NAME."""
    if not specs:
        raise EvaluationError(f"no ASR given: --asr {SYNTHETIC}, --asr DIR or --asr LANG=DIR")
    if SYNTHETIC in specs or any(s.partition("=")[2] == SYNTHETIC for s in specs):
        if any(s != SYNTHETIC for s in specs):
            raise EvaluationError(f"--asr {SYNTHETIC} reads the synthetic codec's codes and goes alone, not with "
                                  f"model directories (got {' '.join(specs)})")
        return SyntheticASR()
    dirs: dict[str | None, Path] = {}
    for spec in specs:
        lang, sep, path = spec.partition("=")
        language = lang.strip().lower() if sep and "/" not in lang else None
        if language is None:
            path = spec
        elif language not in LANGUAGES:
            raise EvaluationError(f"--asr {spec}: unknown language {lang!r}; one of {', '.join(LANGUAGES)} "
                                  "(a directory with '=' in its name: write it as ./NAME)")
        if language in dirs:
            raise EvaluationError(f"--asr: two models for {language or 'the default'} ({dirs[language]}, {path})")
        dirs[language] = check_whisper_dir(path)
    return WhisperByLanguage(dirs, device, batch_size)
