"""A synthetic but learnable "codec" for the demo and the tests (nothing like it ships anywhere).

Every word of a small per-language vocabulary has a fixed run of 2-4 codec codes (its
"pronunciation"); a sentence's codes are its words' runs in order. A model that learned the
runs and where each word starts speaks any new sentence of known words exactly, so held-out
sentences (new word combinations, never seen in any training split) measure real learning.
Chance per position is 1 / 65,536.

Written like production data: WebDataset shards of `codes.npy` + `json` samples (TTS pairs with
a transcript, unpaired audio without one) and a jsonl text corpus, so the demo reads them with
the same data_prep commands a cluster run uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm import atomic
from speechlm.token_layout import CODEC_SIZE, CODES_PER_SECOND, LANGUAGES

DEMO_LANGUAGES = ("hi", "ta", "en")
# Syllables per script, and syllables per word: pseudo-words look like the language and take
# 2-4 Llama-3 tokens each (Tamil script costs ~3.5 tokens a syllable, Devanagari ~1.5).
_SYLLABLES = {
    "hi": ([*"कखगचजतदनपबमरलवसह"], ["", "ा", "ि", "ी", "ु", "ू", "े", "ो"], (1, 2)),
    "ta": ([*"கசடதநபமயரலவள"], ["", "ா", "ி", "ீ", "ு", "ூ", "ெ", "ை"], (1, 1)),
    "en": ([*"bdfgklmnprstvz"], ["a", "e", "i", "o", "u"], (2, 3)),
}
RUN_LENGTHS = (2, 4)  # codes per word, inclusive
SENTENCE_WORDS = (3, 5)  # distinct words per sentence, inclusive


def _pseudo_words(language: str, n: int, rng: np.random.Generator) -> list[str]:
    consonants, vowels, (fewest, most) = _SYLLABLES[language]
    words: list[str] = []
    while len(words) < n:
        word = "".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                       for _ in range(int(rng.integers(fewest, most + 1))))
        if word not in words:
            words.append(word)
    return words


@dataclass(frozen=True)
class Sentence:
    language: str
    words: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.words)


class SyntheticCodec:
    """Words and their code runs per language; deterministic in `seed`."""

    def __init__(self, languages: tuple[str, ...] = DEMO_LANGUAGES, words_per_language: int = 12, seed: int = 0):
        unknown = [lang for lang in languages if lang not in _SYLLABLES or lang not in LANGUAGES]
        if unknown:
            raise ValueError(f"no synthetic vocabulary for {unknown}; available: {sorted(_SYLLABLES)}")
        rng = np.random.default_rng(seed)
        self.languages = tuple(languages)
        self.runs: dict[str, dict[str, np.ndarray]] = {}
        for lang in self.languages:
            words = _pseudo_words(lang, words_per_language, rng)
            lengths = rng.integers(RUN_LENGTHS[0], RUN_LENGTHS[1] + 1, size=len(words))
            self.runs[lang] = {w: rng.integers(0, CODEC_SIZE, size=int(k)).astype(np.int32)
                               for w, k in zip(words, lengths)}

    def codes(self, text: str, language: str) -> np.ndarray:
        """The codec's answer for a sentence of known words (int32, 0..65535)."""
        runs = self.runs.get(language)
        if runs is None:
            raise ValueError(f"language {language!r} is not in this codec ({', '.join(self.languages)})")
        missing = [w for w in text.split() if w not in runs]
        if missing or not text.split():
            raise ValueError(f"not a sentence of known {language} words: {text!r} (unknown: {missing})")
        return np.concatenate([runs[w] for w in text.split()])

    def random_sentence(self, language: str, rng: np.random.Generator) -> Sentence:
        words = list(self.runs[language])
        n = int(rng.integers(SENTENCE_WORDS[0], SENTENCE_WORDS[1] + 1))
        # Distinct words: a repeated word would make "where am I in the sentence" ambiguous.
        return Sentence(language, tuple(words[i] for i in rng.choice(len(words), size=n, replace=False)))

    def sentences(self, n_per_language: int, seed: int, exclude: set[Sentence] = frozenset()) -> list[Sentence]:
        """`n_per_language` distinct sentences per language, none of them in `exclude`."""
        rng = np.random.default_rng(seed)
        out: list[Sentence] = []
        for lang in self.languages:
            seen: set[Sentence] = set(exclude)
            while sum(s.language == lang for s in out) < n_per_language:
                s = self.random_sentence(lang, rng)
                if s not in seen:
                    seen.add(s)
                    out.append(s)
        return out


def write_dataset(codec: SyntheticCodec, out_dir: str | Path, *, tts_per_language: int, audio_per_language: int,
                  text_paragraphs_per_language: int, heldout_per_language: int, shard_size: int = 1000) -> dict:
    """Write the demo's raw data, as production data arrives, into `out_dir`:

    tts/shard-NNNNNN.tar     TTS pairs: `<key>.codes.npy` (int32) + `<key>.json` {text, language, duration}
    audio/shard-NNNNNN.tar   unpaired speech: the same without a transcript
    text/corpus.jsonl        plain text: paragraphs of sentences, {"text", "language"}
    heldout.jsonl            {"id", "text", "language"}: sentences no training split contains
    heldout_codes.json       the codec's answer for each held-out id
    Files appear whole (written beside, then renamed); `done.json` last marks the set complete.
    Temporary names are fixed (per_process=False): a rerun overwrites what a killed one left.
    """
    import webdataset as wds

    out = Path(out_dir)
    heldout = codec.sentences(heldout_per_language, seed=1)
    exclude = set(heldout)
    tts = codec.sentences(tts_per_language, seed=2, exclude=exclude)
    audio = codec.sentences(audio_per_language, seed=3, exclude=exclude)
    rng = np.random.default_rng(4)

    def write_shards(kind: str, sentences: list[Sentence], with_text: bool) -> int:
        (out / kind).mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng(5).permutation(len(sentences))  # languages interleaved
        n_shards = 0
        for start in range(0, len(order), shard_size):
            path = out / kind / f"shard-{n_shards:06d}.tar"
            with atomic.atomic_path(path, per_process=False) as tmp, wds.TarWriter(str(tmp)) as sink:
                for i in order[start:start + shard_size]:
                    s = sentences[i]
                    codes = codec.codes(s.text, s.language)
                    meta = {"language": s.language, "duration": len(codes) / CODES_PER_SECOND}
                    if with_text:
                        meta["text"] = s.text
                    sink.write({"__key__": f"{kind}-{s.language}-{i:06d}", "codes.npy": codes, "json": meta})
            n_shards += 1
        return n_shards

    counts = {"tts_shards": write_shards("tts", tts, True), "audio_shards": write_shards("audio", audio, False)}
    (out / "text").mkdir(parents=True, exist_ok=True)
    lines = []
    for lang in codec.languages:
        for _ in range(text_paragraphs_per_language):
            sentences = [codec.random_sentence(lang, rng).text for _ in range(int(rng.integers(10, 16)))]
            lines.append(json.dumps({"text": ". ".join(sentences) + ".", "language": lang}, ensure_ascii=False))
    atomic.write_text(out / "text" / "corpus.jsonl", "\n".join(lines) + "\n", per_process=False)
    ids = [f"{s.language}-{i:04d}" for i, s in enumerate(heldout)]
    heldout_lines = (json.dumps({"id": k, "text": s.text, "language": s.language}, ensure_ascii=False) + "\n"
                     for k, s in zip(ids, heldout))
    atomic.write_text(out / "heldout.jsonl", "".join(heldout_lines), per_process=False)
    atomic.write_text(out / "heldout_codes.json", json.dumps(
        {k: codec.codes(s.text, s.language).tolist() for k, s in zip(ids, heldout)}), per_process=False)
    counts.update(tts_pairs=len(tts), audio_segments=len(audio), text_paragraphs=len(lines), heldout=len(heldout))
    atomic.write_text(out / "done.json", json.dumps(counts, indent=1), per_process=False)
    return counts


def token_accuracy(expected: dict[str, list[int]], generated: dict[str, list[int]]) -> dict[str, float]:
    """Position-by-position agreement of generated codes with the codec's answer.

    accuracy = matching positions / sum over items of max(len(expected), len(generated)): a
    missing or an extra code counts as wrong, so stopping late or early is penalised.
    """
    matches = total = exact = 0
    for key, want in expected.items():
        got = generated.get(key, [])
        n = min(len(want), len(got))
        matches += int(np.sum(np.asarray(want[:n]) == np.asarray(got[:n])))
        total += max(len(want), len(got))
        exact += int(list(want) == list(got))
    return {"accuracy": matches / max(total, 1), "exact_sentences": exact / max(len(expected), 1), "items": len(expected)}
