"""Scores of synthesised speech: normalisation, CER/WER, failure checks, per-language summaries.

Normalisation (`normalize`), applied to the reference text and the transcript alike, in this order:
  1. Unicode NFC, so that a nukta letter or a Tamil two-part vowel sign typed decomposed compares
     equal to its precomposed spelling (both become the one NFC sequence);
  2. case folded (`str.casefold`);
  3. every decimal digit of any script (Unicode category Nd: Devanagari ०-९, Bengali, Gurmukhi,
     Gujarati, Odia, Tamil ௦-௯, Telugu, Kannada, Malayalam, ...) to its ASCII digit;
  4. punctuation (Unicode categories P*, the danda । and double danda ॥ included) to a space;
  5. format characters (category Cf: zero-width joiner / non-joiner, which only change how Indic
     text renders) removed;
  6. whitespace runs to one space, leading and trailing whitespace stripped.
Numbers spelled out ("twenty", "बीस") and written in digits ("20") are NOT unified, so an ASR that
writes digits where the reference spells a number out (or the reverse) is charged edits. Symbols
(category S*: ₹, +, =) are kept; "%" and "&" are punctuation (Po) in Unicode and become spaces.

CER: edits (substitutions + deletions + insertions, counted by jiwer) over the Unicode code points
of the normalised text, spaces included; a vowel sign or virama is a code point of its own. WER:
the same over words (the normalised text split at spaces). A language's CER/WER is its items'
edits summed over their reference lengths summed (corpus-level), not a mean of item rates.

Failures of an item: "no_speech_end" (generation hit its token limit), "non_code_tokens" (it
produced tokens that are not codec codes), "empty" (no codes), "too_long" / "too_short" (audio
seconds / expected seconds outside DURATION_RATIO_RANGE, the ends allowed). Expected seconds are the
evaluation line's `duration` (the real recording) when given, else len(normalised text) /
CHARS_PER_SECOND, a rough figure for read speech: give `duration` per line where you can.
"""

from __future__ import annotations

import statistics
import unicodedata

import jiwer

from speechlm.evaluate import EvaluationError

# Read speech, roughly: ~4 codes a character at 50 codes/s (token_layout.CODES_PER_SECOND).
# Speaking rates differ by language and speaker, hence the wide DURATION_RATIO_RANGE.
CHARS_PER_SECOND = 13.0
# audio / expected outside this: "audio far longer or shorter than the text predicts".
DURATION_RATIO_RANGE = (1 / 3, 3.0)
# The metrics a checkpoint can be ranked by, and which direction is better.
METRICS = {"cer": "lower", "wer": "lower", "failure_rate": "lower", "speaker_similarity": "higher"}


def _char(c: str) -> str:
    cat = unicodedata.category(c)
    if cat == "Nd":
        return str(unicodedata.digit(c))
    if cat.startswith("P"):
        return " "  # a space, not nothing: "a,b" is two words
    if cat == "Cf":
        return ""
    return c


def normalize(text: str) -> str:
    """The normalisation of the module docstring."""
    text = unicodedata.normalize("NFC", text).casefold()
    return " ".join("".join(map(_char, text)).split())


def edits(reference: str, hypothesis: str) -> dict:
    """Character and word edits of `hypothesis` against `reference`, both normalised.

    Returns char_edits, chars (reference code points), word_edits, words (reference words) and the
    item's cer, wer. An empty hypothesis is all deletions; a reference with no text is refused."""
    ref, hyp = normalize(reference), normalize(hypothesis)
    if not ref:
        raise EvaluationError(f"reference text {reference!r} has nothing to score after normalisation")
    c = jiwer.process_characters(ref, hyp)
    w = jiwer.process_words(ref, hyp)
    char_edits = c.substitutions + c.deletions + c.insertions
    word_edits = w.substitutions + w.deletions + w.insertions
    chars, words = len(ref), len(ref.split())
    return {"char_edits": char_edits, "chars": chars, "word_edits": word_edits, "words": words,
            "cer": char_edits / chars, "wer": word_edits / words}


def expected_seconds(text: str, duration: float | None) -> float:
    """How long the text should sound: the real recording's `duration` when given, else an estimate."""
    if duration is not None:
        if not duration > 0:
            raise EvaluationError(f"duration must be seconds > 0, got {duration!r}")
        return float(duration)
    n = len(normalize(text))
    if n == 0:
        raise EvaluationError(f"text {text!r} has nothing to speak after normalisation")
    return n / CHARS_PER_SECOND


def duration_ratio(audio_seconds: float, expected_seconds: float) -> float:
    """Audio seconds over expected seconds: 1.0 is as long as the text predicts."""
    if not expected_seconds > 0:
        raise EvaluationError(f"expected seconds must be > 0, got {expected_seconds!r}")
    return audio_seconds / expected_seconds


def failures(stop: str, rejected: int, codes: int, audio_seconds: float, expected_seconds: float) -> list[str]:
    """Why a synthesised item failed, in a fixed order (an empty list: it did not)."""
    out = []
    if stop != "speech_end":
        out.append("no_speech_end")
    if rejected > 0:
        out.append("non_code_tokens")
    if codes == 0:
        out.append("empty")  # no audio: "too_short" would only repeat it
    else:
        ratio = duration_ratio(audio_seconds, expected_seconds)
        low, high = DURATION_RATIO_RANGE
        if ratio > high:
            out.append("too_long")
        elif ratio < low:
            out.append("too_short")
    return out


def _aggregate(records: list[dict]) -> dict:
    sims = [r["speaker_similarity"] for r in records if r.get("speaker_similarity") is not None]
    return {"items": len(records),
            "cer": sum(r["char_edits"] for r in records) / sum(r["chars"] for r in records),
            "wer": sum(r["word_edits"] for r in records) / sum(r["words"] for r in records),
            "failure_rate": sum(bool(r["failures"]) for r in records) / len(records),
            "duration_ratio": statistics.median(r["duration_ratio"] for r in records),
            "speaker_similarity": sum(sims) / len(sims) if sims else None,
            "speaker_items": len(sims)}


def summarize(records: list[dict]) -> dict:
    """{"languages": {lang: table}, "macro": mean over languages, "micro": all items pooled}.

    A table: items, cer, wer (corpus-level), failure_rate, duration_ratio (median),
    speaker_similarity (mean over the items that have one, else None), speaker_items.
    `macro` weighs every language equally whatever its item count; it ranks checkpoints."""
    if not records:
        raise EvaluationError("no scored items to summarise")
    languages = {lang: _aggregate([r for r in records if r["language"] == lang])
                 for lang in sorted({r["language"] for r in records})}
    macro: dict = {}
    for key in ("cer", "wer", "failure_rate", "duration_ratio", "speaker_similarity"):
        # speaker_similarity: over the languages that have one (None when none has)
        values = [t[key] for t in languages.values() if t[key] is not None]
        macro[key] = sum(values) / len(values) if values else None
    return {"languages": languages, "macro": macro, "micro": _aggregate(records)}


def rank_key(summary: dict, metric: str) -> float:
    """The checkpoint's mean-over-languages `metric`, signed so that lower is better (sort ascending)."""
    if metric not in METRICS:
        raise EvaluationError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    value = summary["macro"].get(metric)
    if value is None:
        raise EvaluationError(f"{summary.get('checkpoint', 'a checkpoint')} has no {metric}"
                              + (" (speaker similarity needs --speaker-model and items with a reference)"
                                 if metric == "speaker_similarity" else ""))
    return value if METRICS[metric] == "lower" else -value
