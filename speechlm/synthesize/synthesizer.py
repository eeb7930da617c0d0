"""Text in, speech codes (and audio) out, with an exported HF model (conversion/megatron_to_hf.py).

    python -m speechlm.synthesize --model HF_DIR --text "नमस्ते दुनिया" --language hi --out DIR
    python -m speechlm.synthesize --model HF_DIR --batch items.jsonl --out DIR
    python -m speechlm.synthesize --model HF_DIR --text "..." --language hi --out DIR --prompt-codes REF.npy --prompt-text "..."
    python -m speechlm.synthesize --model HF_DIR --text "..." --language hi --out DIR --prompt-wav REF.wav --prompt-text "..." --codec XCODEC2_DIR

The prompt is the TTS training document up to its first code, built by the token layout from
the transcript tokenized exactly as data_prep/build_speech.py does (`BOS [<|lang_x|>] text
<|speech_start|>`). Voice cloning (docs/synthesis.md): with a reference utterance (its codes, as
in the training shards, and its transcript) the prompt is the TTS document of `reference
transcript + " " + text` (one string, tokenized once) up to and including the reference's codes
(`TokenLayout.cloning_prompt`); the model continues the speech in that voice, and only the new
codes are output. A reference recording (--prompt-wav: an integer-PCM .wav, any rate and
channels) is first turned into codes by XCodec2's encoder from the --codec directory
(xcodec2_encoder.py, loaded once for all items), then used exactly as codes are. Generation
(transformers) stops at `<|speech_end|>` or after a maximum number of tokens derived from the
text (--codes-per-char, or --max-new-tokens). Generated tokens that are not codec codes (text or
special tokens) are rejected and counted, never passed on.

Per item, in --out: <id>.npy (int32 codes 0..65535, the layout of the training shards),
<id>.wav (16 kHz, when --codec names a local XCodec2 model directory and the `xcodec2` package is
installed; otherwise codes only, and it says so), and <id>.json (tokens generated, codes,
rejected, stop reason, seconds of audio, real-time factor), written last: an item with its
.json is finished. A batch run that is interrupted resumes without redoing finished items;
summary.json covers every item of the input at the end.

Batch input: one JSON object per line, {"id", "text", "language"} and, to clone a voice,
"prompt_codes" (a .npy path) or "prompt_wav" (a .wav path; needs --codec), relative to the jsonl
file's directory, with "prompt_text"; ids name the output files ([A-Za-z0-9._-], unique). The
generation limit counts the target text only. Items are generated --batch-size at a time
(left-padded), on GPU in bf16 when one is present, else on CPU in fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import wave
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from speechlm import atomic
from speechlm import token_layout as tl
from speechlm.token_layout import TokenLayout

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DEFAULT_CODES_PER_CHAR = 10.0  # ~4 codes a character in read speech (50 codes/s, ~13 chars/s): 2.5x room
MIN_NEW_TOKENS = 32


class SynthesisError(ValueError):
    """Bad input: a clear message, nothing written for the offending item."""


@dataclass(frozen=True)
class Reference:
    """A voice to clone: an utterance's codes (0..65535) and its transcript."""
    text: str
    codes: np.ndarray
    source: str  # where the codes came from (recorded in the item's .json)


@dataclass(frozen=True)
class Item:
    id: str
    text: str
    language: str
    reference: Reference | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0  # >1 penalises repeated codes, which real speech has (silence)
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature <= 0:
            return {"do_sample": False, "repetition_penalty": self.repetition_penalty}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}


# --- input ------------------------------------------------------------------------------------


def check_item(item: Item) -> Item:
    if not ID_PATTERN.match(item.id):
        raise SynthesisError(f"id {item.id!r}: use 1-128 characters of [A-Za-z0-9._-] (it names the output files)")
    text = item.text.strip() if isinstance(item.text, str) else ""
    if not text:
        raise SynthesisError(f"{item.id}: empty text")
    language = item.language.strip().lower() if isinstance(item.language, str) else ""
    if language not in tl.LANGUAGES:
        raise SynthesisError(f"{item.id}: unknown language {item.language!r}; one of {', '.join(tl.LANGUAGES)}")
    return Item(item.id, text, language, item.reference)  # stripped, as build_speech.py keeps transcripts


def load_reference(codes_path: str | Path | None, text: Any, item_id: str, *, wav: str | Path | None = None,
                   encode: Callable[[Path], np.ndarray] | None = None) -> Reference | None:
    """A reference utterance from a .npy of codes, or a .wav that `encode` turns into codes, and its
    transcript; None when none of them is given."""
    if codes_path is None and wav is None and text is None:
        return None
    if codes_path is not None and wav is not None:
        raise SynthesisError(f"{item_id}: give the reference as codes or as a recording, not both "
                             "(prompt_codes / prompt_wav)")
    source = codes_path if codes_path is not None else wav
    if source is None:
        raise SynthesisError(f"{item_id}: a prompt text needs its reference: --prompt-codes / prompt_codes "
                             "or --prompt-wav / prompt_wav")
    transcript = text.strip() if isinstance(text, str) else ""
    if not transcript:
        raise SynthesisError(f"{item_id}: the reference {source} has no transcript: give --prompt-text / "
                             "prompt_text (the words spoken in it)")
    if wav is not None:
        if encode is None:
            raise SynthesisError(f"{item_id}: the reference recording {wav} needs --codec DIR (a local "
                                 "HKUSTAudio/xcodec2 checkpoint: its encoder turns the recording into codes)")
        try:
            codes = encode(wav)
        except SynthesisError as e:
            raise SynthesisError(f"{item_id}: {e}") from None
    else:
        try:
            codes = np.load(codes_path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SynthesisError(f"{item_id}: cannot read reference codes {codes_path}: {e}") from None
    if codes.ndim != 1 or codes.size == 0 or not np.issubdtype(codes.dtype, np.integer):
        raise SynthesisError(f"{item_id}: reference codes {source}: need a non-empty 1-D integer array, "
                             f"got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() >= tl.CODEC_SIZE:
        bad = int(codes[(codes < 0) | (codes >= tl.CODEC_SIZE)][0])
        raise SynthesisError(f"{item_id}: reference codes {source}: code {bad} is outside 0..{tl.CODEC_SIZE - 1}")
    return Reference(transcript, codes.astype(np.int32), str(source))


def read_batch(path: str | Path, encode: Callable[[Path], np.ndarray] | None = None) -> list[Item]:
    """Items of a jsonl file; every problem of the file at once, with line numbers. `encode` turns
    prompt_wav recordings into codes (None: no --codec, a prompt_wav is refused)."""
    items, problems, seen = [], [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise SynthesisError("not a JSON object")
                item = check_item(Item(str(rec.get("id", "")), rec.get("text"), rec.get("language")))
                if item.id in seen:
                    raise SynthesisError(f"duplicate id {item.id!r}")
                # Reference paths are relative to the jsonl file; checked last: encoding a recording is slow.
                codes, wav = (rec.get(k) for k in ("prompt_codes", "prompt_wav"))
                codes = Path(path).parent / codes if isinstance(codes, str) else codes
                wav = Path(path).parent / wav if isinstance(wav, str) else wav
                item = replace(item, reference=load_reference(codes, rec.get("prompt_text"), item.id, wav=wav,
                                                              encode=encode))
            except (ValueError, SynthesisError) as e:
                problems.append(f"{path}:{n}: {e}")
                continue
            seen.add(item.id)
            items.append(item)
    if problems:
        raise SynthesisError("bad batch input:\n  " + "\n  ".join(problems[:20]) + (f"\n  ... {len(problems)} in all" if len(problems) > 20 else ""))
    if not items:
        raise SynthesisError(f"{path}: no items")
    return items


# --- prompt and output filtering -----------------------------------------------------------------


def pick_device(device: str | None) -> str:
    """`device`, or cuda when there is one, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class Synthesizer:
    def __init__(self, model_dir: str | Path, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from speechlm.data.model_dir import load_model_dir
        from speechlm.data.partials import SpeechDataError

        try:
            self.layout, self.tokenizer, _ = load_model_dir(model_dir, need_tokenizer=True)
        except SpeechDataError as e:
            raise SynthesisError(str(e)) from None
        self.device = pick_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        if self.model.config.vocab_size < tl.VOCAB_SIZE:
            raise SynthesisError(f"{model_dir}: vocabulary {self.model.config.vocab_size} < {tl.VOCAB_SIZE}: not an expanded model")
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 131_072))

    def prompt(self, item: Item) -> np.ndarray:
        """The TTS training document's prefix: tokenized as build_speech.py does, framed by the layout
        (with a reference: the reference transcript and the text as one, then the reference's codes)."""
        from speechlm.data.model_dir import encode_texts

        ref = item.reference
        ids = encode_texts(self.tokenizer, [f"{ref.text} {item.text}" if ref else item.text])[0]
        if not ids:
            raise SynthesisError(f"{item.id}: text tokenizes to nothing")
        if ref is None:
            return self.layout.tts_prompt(np.array(ids, np.int32), item.language)
        return self.layout.cloning_prompt(np.array(ids, np.int32), ref.codes, item.language)

    def max_new_tokens(self, item: Item, prompt_len: int, codes_per_char: float, cap: int | None) -> int:
        """From the target text alone (a reference's transcript is not spoken again)."""
        n = cap if cap else max(MIN_NEW_TOKENS, math.ceil(codes_per_char * len(item.text))) + 1  # + <|speech_end|>
        room = self.max_positions - prompt_len
        if item.reference is not None and room < n:
            raise SynthesisError(f"{item.id}: the reference ({len(item.reference.codes)} codes) and the text take "
                                 f"{prompt_len} tokens, leaving {max(room, 0)} of the model's {self.max_positions} "
                                 f"positions for the {n} to generate: use a shorter reference")
        return max(1, min(n, room))

    def check(self, items: list[Item], codes_per_char: float, max_new_tokens: int | None) -> None:
        """Every item's prompt and generation limit, before anything is generated: all problems at once."""
        problems = []
        for it in items:
            try:
                self.max_new_tokens(it, len(self.prompt(it)), codes_per_char, max_new_tokens)
            except SynthesisError as e:
                problems.append(str(e))
        if problems:
            raise SynthesisError("\n  ".join(problems[:20]) + (f"\n  ... {len(problems)} in all" if len(problems) > 20 else ""))

    def generate(self, items: list[Item], sampling: Sampling, codes_per_char: float = DEFAULT_CODES_PER_CHAR,
                 max_new_tokens: int | None = None) -> list[dict]:
        """Generate a batch (left-padded); per item: codes, counts and the raw generated ids."""
        import torch

        prompts = [self.prompt(it) for it in items]
        width = max(len(p) for p in prompts)
        pad = self.layout.pad_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.from_numpy(p.astype(np.int64))
            mask[row, width - len(p):] = 1
        limits = [self.max_new_tokens(it, len(p), codes_per_char, max_new_tokens) for it, p in zip(items, prompts)]
        torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max(limits), eos_token_id=self.layout.speech_end_id, pad_token_id=pad,
                                      **sampling.generate_kwargs())
        results = []
        for row, (p, limit) in enumerate(zip(prompts, limits)):
            new = out[row, width:].cpu().numpy()[:limit]
            results.append({"prompt": p, **split_generated(new, self.layout)})
        return results


def split_generated(new_ids: np.ndarray, layout: TokenLayout) -> dict:
    """Generated ids -> codes up to the first <|speech_end|>; every other non-code id is rejected."""
    new_ids = np.asarray(new_ids, dtype=np.int64)
    ends = np.flatnonzero(new_ids == layout.speech_end_id)
    stopped = len(ends) > 0
    body = new_ids[: ends[0]] if stopped else new_ids
    speech = tl.is_speech(body)
    return {"codes": tl.ids_to_codes(body[speech]).astype(np.int32), "rejected": int((~speech).sum()),
            "tokens_generated": int(len(body) + stopped), "stop": "speech_end" if stopped else "max_new_tokens"}


# --- audio ------------------------------------------------------------------------------------


def write_wav(path: Path, samples: np.ndarray) -> None:
    """16-bit mono PCM at 16 kHz (stdlib wave: no audio dependency)."""
    from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE
    pcm = (np.clip(np.asarray(samples, np.float32), -1.0, 1.0) * 32767).astype("<i2")
    # per_process=False: a resumed run overwrites the temporary file a killed run left (see _save_npy).
    with atomic.atomic_path(path, per_process=False) as tmp, wave.open(str(tmp), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def read_wav(path: str | Path) -> np.ndarray:
    """An integer-PCM wav file (8/16/24/32-bit, any channels and rate; stdlib wave) as float32 mono
    samples at 16 kHz: channels averaged, resampled with torchaudio. SynthesisError if unreadable or empty."""
    from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as e:  # absent, truncated header, not RIFF/WAVE, float or compressed
        raise SynthesisError(f"cannot read {path} as a wav file of integer PCM (8/16/24/32-bit): "
                             f"{type(e).__name__}: {e}") from None
    frame = channels * width
    raw = raw[: len(raw) // frame * frame]  # a truncated data chunk ends mid-frame
    if not raw:
        raise SynthesisError(f"{path}: no audio in it (0 samples)")
    if width == 1:  # 8-bit wav is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:  # 24-bit: each sample as the top 3 bytes of a little-endian int32
        b = np.zeros((len(raw) // 3, 4), np.uint8)
        b[:, 1:] = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = b.view("<i4").reshape(-1) / 2.0**31
    else:
        x = np.frombuffer(raw, f"<i{width}") / 2.0 ** (8 * width - 1)
    x = np.asarray(x, np.float32).reshape(-1, channels).mean(axis=1)
    if rate != SAMPLE_RATE:
        import torch
        import torchaudio.functional  # installed with requirements-codec.txt, which encoding needs anyway

        x = torchaudio.functional.resample(torch.from_numpy(x), rate, SAMPLE_RATE).numpy()
    return x


class ReferenceEncoder:
    """Reference recordings (--prompt-wav / prompt_wav) -> codes with the XCodec2 encoder of the
    --codec directory, loaded on first use and then kept, for all items (or its failure, reported
    for each recording)."""

    def __init__(self, codec_dir: str | Path, device: str):
        self.codec_dir, self.device = codec_dir, device
        self._encoder = None
        self._error: str | None = None

    def __call__(self, wav: str | Path) -> np.ndarray:
        from speechlm.synthesize.xcodec2_decoder import SAMPLE_RATE

        samples = read_wav(wav)  # before loading the encoder: a bad file costs nothing
        encoder = self._load()
        t0 = time.perf_counter()
        codes = encoder.encode(samples)
        print(f"{wav}: {len(samples) / SAMPLE_RATE:.2f} s of audio (16 kHz) -> {len(codes)} codes in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        return codes

    def _load(self):
        if self._encoder is None and self._error is None:
            from speechlm.synthesize import xcodec2_encoder

            try:
                self._encoder = xcodec2_encoder.load(self.codec_dir, self.device)
            except xcodec2_encoder.CodecUnavailable as e:
                self._error = f"the XCodec2 encoder of --codec {self.codec_dir} does not load: {e}"
        if self._error is not None:
            raise SynthesisError(self._error)
        return self._encoder


def load_codec(codec_dir: str | None, device: str):
    """An XCodec2 decoder, or None with the reason printed (codes are written either way)."""
    if not codec_dir:
        print("no --codec directory given: writing codes only", flush=True)
        return None
    from speechlm.synthesize import xcodec2_decoder

    try:
        return xcodec2_decoder.load(codec_dir, device)
    except xcodec2_decoder.CodecUnavailable as e:
        print(f"XCodec2 unavailable ({e}): writing codes only", flush=True)
        return None


# --- the run ----------------------------------------------------------------------------------


# A rerun resumes in `out`: fixed temporary names (per_process=False) let it overwrite what a
# killed run left half-written, instead of leaving it behind.
def _save_npy(path: Path, codes: np.ndarray) -> None:
    with atomic.atomic_path(path, per_process=False) as tmp, open(tmp, "wb") as f:
        np.save(f, codes.astype(np.int32))


def _save_json(path: Path, obj: dict) -> None:
    atomic.write_text(path, json.dumps(obj, ensure_ascii=False, indent=1), per_process=False)


def synthesize(synth: Synthesizer, items: list[Item], out: Path, sampling: Sampling, *, batch_size: int = 8,
               codes_per_char: float = DEFAULT_CODES_PER_CHAR, max_new_tokens: int | None = None, codec=None) -> dict:
    """Generate every item without a finished <id>.json in `out`; returns the summary over all items."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [it for it in items if not (out / f"{it.id}.json").is_file()]
    if len(todo) < len(items):
        print(f"resuming: {len(items) - len(todo)} of {len(items)} items already done in {out}", flush=True)
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        t0 = time.perf_counter()
        results = synth.generate(batch, sampling, codes_per_char, max_new_tokens)
        seconds_each = (time.perf_counter() - t0) / len(batch)  # the batch's wall time, shared
        for it, r in zip(batch, results):
            t1 = time.perf_counter()
            _save_npy(out / f"{it.id}.npy", r["codes"])
            wav = None
            if codec is not None and len(r["codes"]):
                write_wav(out / f"{it.id}.wav", codec.decode(r["codes"]))
                wav = f"{it.id}.wav"
            audio_s = len(r["codes"]) / tl.CODES_PER_SECOND
            spent = seconds_each + time.perf_counter() - t1
            ref = it.reference
            stats = {"id": it.id, "text": it.text, "language": it.language,
                     "reference": {"codes": int(len(ref.codes)), "text": ref.text, "source": ref.source} if ref else None,
                     "prompt_tokens": int(len(r["prompt"])), "tokens_generated": r["tokens_generated"],
                     "codes": int(len(r["codes"])), "rejected": r["rejected"], "stop": r["stop"],
                     "audio_seconds": audio_s, "seconds": round(spent, 4),
                     "rtf": round(spent / audio_s, 4) if audio_s else None, "wav": wav}
            _save_json(out / f"{it.id}.json", stats)  # last: marks the item finished
            rtf = f"{stats['rtf']:.3f}" if stats["rtf"] is not None else "-"
            print(f"{it.id}: {stats['tokens_generated']} tokens, {stats['codes']} codes = {audio_s:.2f} s of audio, "
                  f"rejected {stats['rejected']}, stop {stats['stop']}, RTF {rtf}", flush=True)
    return summarize(items, out)


def summarize(items: list[Item], out: Path) -> dict:
    stats = [json.loads((out / f"{it.id}.json").read_text()) for it in items]
    audio = sum(s["audio_seconds"] for s in stats)
    seconds = sum(s["seconds"] for s in stats)
    summary = {"items": len(stats), "codes": sum(s["codes"] for s in stats), "rejected": sum(s["rejected"] for s in stats),
               "stopped_at_speech_end": sum(s["stop"] == "speech_end" for s in stats), "audio_seconds": audio,
               "seconds": seconds, "rtf": seconds / audio if audio else None}
    _save_json(out / "summary.json", summary)
    rtf = f"{summary['rtf']:.3f}" if summary["rtf"] is not None else "-"
    print(f"total: {summary['items']} items, {summary['codes']} codes = {audio:.1f} s of audio, "
          f"rejected {summary['rejected']}, {summary['stopped_at_speech_end']} stopped at <|speech_end|>, RTF {rtf}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m speechlm.synthesize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported HF model directory (token_layout.json + tokenizer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="one transcript to speak")
    src.add_argument("--batch", metavar="JSONL", help='a jsonl file of {"id", "text", "language"} per line')
    p.add_argument("--language", help="language of --text (one of %s)" % ", ".join(tl.LANGUAGES))
    p.add_argument("--id", default="utt", help="output name of --text (default utt)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--prompt-codes", metavar="NPY", help="voice cloning: a reference utterance's codes (int, 0..65535, "
                     "as in the training shards) to continue in its voice; needs --prompt-text")
    ref.add_argument("--prompt-wav", metavar="WAV", help="voice cloning from a recording: a reference .wav (integer "
                     "PCM, any rate and channels), encoded to codes with the XCodec2 encoder of --codec; needs "
                     "--prompt-text")
    p.add_argument("--prompt-text", help="the transcript of the reference utterance (--prompt-codes / --prompt-wav)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--codec", metavar="DIR", help="local XCodec2 model directory (a copy of HKUSTAudio/xcodec2): "
                   "decodes the codes to .wav, and encodes --prompt-wav / prompt_wav recordings")
    g = p.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=Sampling.temperature, help="0 for greedy (default %(default)s)")
    g.add_argument("--top-p", type=float, default=Sampling.top_p, help="default %(default)s")
    g.add_argument("--top-k", type=int, default=Sampling.top_k, help="0 turns it off (default %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=Sampling.repetition_penalty, help="default %(default)s")
    g.add_argument("--seed", type=int, default=Sampling.seed, help="default %(default)s")
    g.add_argument("--codes-per-char", type=float, default=DEFAULT_CODES_PER_CHAR,
                   help="maximum codes per character of text before stopping (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, help="a fixed maximum instead of --codes-per-char")
    g.add_argument("--batch-size", type=int, default=8, help="items generated together (default %(default)s)")
    g.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when present)")
    a = p.parse_args(argv)
    try:
        if a.temperature < 0 or not 0 < a.top_p <= 1 or a.top_k < 0 or a.repetition_penalty <= 0 or a.batch_size < 1:
            raise SynthesisError("need temperature >= 0, 0 < top-p <= 1, top-k >= 0, repetition-penalty > 0, batch-size >= 1")
        if a.codes_per_char <= 0 or (a.max_new_tokens is not None and a.max_new_tokens < 1):
            raise SynthesisError("need --codes-per-char > 0 and --max-new-tokens >= 1")
        # Recordings are encoded here, before the model loads; the encoder is freed once all are.
        encode = ReferenceEncoder(a.codec, pick_device(a.device)) if a.codec else None
        if a.text is not None:
            if not a.language:
                raise SynthesisError("--text needs --language")
            item = check_item(Item(a.id, a.text, a.language))
            items = [replace(item, reference=load_reference(a.prompt_codes, a.prompt_text, a.id, wav=a.prompt_wav,
                                                            encode=encode))]
        else:
            if a.prompt_codes or a.prompt_wav or a.prompt_text:
                raise SynthesisError("--prompt-codes/--prompt-wav/--prompt-text go with --text; a batch gives "
                                     "prompt_codes or prompt_wav, and prompt_text, per line")
            items = read_batch(a.batch, encode)
        del encode
        synth = Synthesizer(a.model, a.device)
        synth.check(items, a.codes_per_char, a.max_new_tokens)
    except (SynthesisError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sampling = Sampling(a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.seed)
    codec = load_codec(a.codec, synth.device)
    synthesize(synth, items, Path(a.out), sampling, batch_size=a.batch_size, codes_per_char=a.codes_per_char,
               max_new_tokens=a.max_new_tokens, codec=codec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
