"""A synthetic but learnable "codec" for the demo and the tests (nothing like it ships anywhere).

Every word of a small per-language vocabulary has a run of 2-4 codec codes per *speaker* (its
"pronunciation" in that voice; the run's length is the word's, the same for every speaker); an
utterance is one speaker saying its words' runs in order. A model that learned the runs and where
each word starts speaks any new sentence of known words, and, given a reference utterance,
continues in the reference's voice. Held-out sentences (new word combinations, never in a
training split) measure real learning; chance per code is 1 / 65,536, per voice 1 / speakers.

The codec can be read back (`transcribe`: codes -> words and speakers), which is how generated
speech is scored: content accuracy (the right words, in some speaker's voice) and cloning accuracy
(the right words in the reference speaker's voice).

Written like production data: WebDataset shards of `codes.npy` + `json` samples (TTS pairs with
a transcript, unpaired audio without one) and a jsonl text corpus, so the demo reads them with
the same data_prep commands a cluster run uses.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speechlm import atomic
from speechlm.token_layout import CODEC_SIZE, CODES_PER_SECOND, LANGUAGES

DEMO_LANGUAGES = ("hi", "ta", "en")
SPEAKERS = 4
# Syllables per script, and syllables per word: pseudo-words look like the language and take
# 2-4 Llama-3 tokens each (Tamil script costs ~3.5 tokens a syllable, Devanagari ~1.5).
_SYLLABLES = {
    "hi": ([*"कखगचजतदनपबमरलवसह"], ["", "ा", "ि", "ी", "ु", "ू", "े", "ो"], (1, 2)),
    "ta": ([*"கசடதநபமயரலவள"], ["", "ா", "ி", "ீ", "ு", "ூ", "ெ", "ை"], (1, 1)),
    "en": ([*"bdfgklmnprstvz"], ["a", "e", "i", "o", "u"], (2, 3)),
}
RUN_LENGTHS = (2, 4)  # codes per word, inclusive
SENTENCE_WORDS = (3, 5)  # distinct words of an utterance, inclusive
# A cloning prompt's transcript is the reference's words and then the target's: together 3-5
# distinct words, as long as a training utterance (the tiny model learned 3-8-word utterances to
# only 37-70 % content accuracy in the demo's budget; docs/demo.md).
REFERENCE_WORDS = (1, 2)
TARGET_WORDS = (2, 3)
UNKNOWN = None  # transcribe's word for a code that starts no known run


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
    speaker: int = 0

    @property
    def text(self) -> str:
        return " ".join(self.words)


class SyntheticCodec:
    """Words and their code runs per language and speaker; deterministic in `seed`."""

    def __init__(self, languages: tuple[str, ...] = DEMO_LANGUAGES, words_per_language: int = 12,
                 speakers: int = SPEAKERS, seed: int = 0):
        unknown = [lang for lang in languages if lang not in _SYLLABLES or lang not in LANGUAGES]
        if unknown:
            raise ValueError(f"no synthetic vocabulary for {unknown}; available: {sorted(_SYLLABLES)}")
        if speakers < 1:
            raise ValueError(f"speakers: need at least 1, got {speakers}")
        rng = np.random.default_rng(seed)
        self.languages, self.speakers = tuple(languages), speakers
        self.runs: dict[str, dict[str, np.ndarray]] = {}  # language -> word -> (speakers, run length)
        self._readings: dict[str, dict[tuple[int, ...], tuple[str, int]]] = {}
        for lang in self.languages:
            words = _pseudo_words(lang, words_per_language, rng)
            lengths = rng.integers(RUN_LENGTHS[0], RUN_LENGTHS[1] + 1, size=len(words))
            self.runs[lang] = {w: rng.integers(0, CODEC_SIZE, size=(speakers, int(k))).astype(np.int32)
                               for w, k in zip(words, lengths)}
            self._readings[lang] = {tuple(run.tolist()): (w, s) for w, runs in self.runs[lang].items()
                                    for s, run in enumerate(runs)}
            # Reading back is unambiguous only if no run starts another (2^-32 a pair: checked, not assumed).
            starts = {run[:n] for run in self._readings[lang] for n in range(RUN_LENGTHS[0], len(run))}
            if len(self._readings[lang]) != speakers * len(words) or starts & set(self._readings[lang]):
                raise ValueError(f"seed {seed}: two {lang} runs collide; use another seed")

    def codes(self, text: str, language: str, speaker: int = 0) -> np.ndarray:
        """The codec's answer for a sentence of known words in one speaker's voice (int32, 0..65535)."""
        runs = self.runs.get(language)
        if runs is None:
            raise ValueError(f"language {language!r} is not in this codec ({', '.join(self.languages)})")
        if not 0 <= speaker < self.speakers:
            raise ValueError(f"speaker {speaker}: this codec has speakers 0..{self.speakers - 1}")
        missing = [w for w in text.split() if w not in runs]
        if missing or not text.split():
            raise ValueError(f"not a sentence of known {language} words: {text!r} (unknown: {missing})")
        return np.concatenate([runs[w][speaker] for w in text.split()])

    def duration(self, text: str, language: str) -> float:
        """Seconds of the codec's answer for a sentence (the same in every voice: a word's run length is)."""
        return len(self.codes(text, language)) / CODES_PER_SECOND

    def transcribe(self, codes, language: str) -> list[tuple[str | None, int | None]]:
        """Codes -> (word, speaker) per run read, left to right; codes that start no run are read
        as one (UNKNOWN, None) per stretch (as an ASR hears noise: one wrong word), reading
        resuming at each next code."""
        readings = self._readings[language]
        codes = [int(c) for c in codes]
        out, i = [], 0
        while i < len(codes):
            for n in range(RUN_LENGTHS[1], RUN_LENGTHS[0] - 1, -1):
                if (hit := readings.get(tuple(codes[i:i + n]))) is not None:
                    out.append(hit)
                    i += n
                    break
            else:
                if not out or out[-1] != (UNKNOWN, None):
                    out.append((UNKNOWN, None))
                i += 1
        return out

    def random_sentence(self, language: str, rng: np.random.Generator, words: tuple[int, int] = SENTENCE_WORDS,
                        avoid: tuple[str, ...] = ()) -> Sentence:
        vocabulary = [w for w in self.runs[language] if w not in avoid]
        n = int(rng.integers(words[0], words[1] + 1))
        # Distinct words: a repeated word would make "where am I in the sentence" ambiguous.
        chosen = tuple(vocabulary[i] for i in rng.choice(len(vocabulary), size=n, replace=False))
        return Sentence(language, chosen, int(rng.integers(self.speakers)))

    def sentences(self, n_per_language: int, seed: int, exclude: set[str] = frozenset(),
                  words: tuple[int, int] = SENTENCE_WORDS) -> list[Sentence]:
        """`n_per_language` sentences of distinct texts per language, none of them in `exclude`
        (texts); each spoken by a random speaker."""
        rng = np.random.default_rng(seed)
        out: list[Sentence] = []
        for lang in self.languages:
            seen: set[str] = set(exclude)
            while sum(s.language == lang for s in out) < n_per_language:
                s = self.random_sentence(lang, rng, words)
                if s.text not in seen:
                    seen.add(s.text)
                    out.append(s)
        return out


@dataclass(frozen=True)
class CloningItem:
    """A held-out sentence to speak in the voice of `reference` (another utterance of a known speaker)."""
    target: Sentence
    reference: Sentence

    @property
    def joined_text(self) -> str:
        """What the prompt's transcript is: the reference's words, then the target's."""
        return f"{self.reference.text} {self.target.text}"


def cloning_items(codec: SyntheticCodec, targets: list[Sentence], seed: int) -> list[CloningItem]:
    """For each target, a reference of words it does not contain, its speaker cycling over all."""
    rng = np.random.default_rng(seed)
    items = []
    for i, t in enumerate(targets):
        ref = codec.random_sentence(t.language, rng, REFERENCE_WORDS, avoid=t.words)
        items.append(CloningItem(t, Sentence(ref.language, ref.words, i % codec.speakers)))
    return items


def write_dataset(codec: SyntheticCodec, out_dir: str | Path, *, tts_per_language: int, audio_per_language: int,
                  text_paragraphs_per_language: int, heldout_per_language: int, shard_size: int = 1000) -> dict:
    """Write the demo's raw data, as production data arrives, into `out_dir`:

    tts/shard-NNNNNN.tar     TTS pairs: `<key>.codes.npy` (int32) + `<key>.json` {text, language, duration, speaker}
    audio/shard-NNNNNN.tar   unpaired speech: the same without a transcript
    text/corpus.jsonl        plain text: paragraphs of sentences, {"text", "language"}
    heldout.jsonl            speechlm.synthesize's batch input (and speechlm.evaluate's evaluation set): per
                             language `heldout_per_language` sentences to speak ({"id", "text",
                             "language", "duration": seconds of the codec's answer}) and as many shorter ones
                             to speak in a reference's voice (+ "prompt_codes": heldout_refs/<id>.npy,
                             "prompt_text"); no training split holds any of their transcripts, nor
                             any reference transcript + " " + target
    heldout_answers.json     per id: {"language", "words", "speaker"} (speaker: the reference's, or null)
    Every training utterance is one speaker throughout. Files appear whole (written beside, then
    renamed); `done.json` last marks the set complete. Temporary names are fixed
    (per_process=False): a rerun overwrites what a killed one left.
    """
    import webdataset as wds

    out = Path(out_dir)
    plain = codec.sentences(heldout_per_language, seed=1)
    targets = codec.sentences(heldout_per_language, seed=6, exclude={s.text for s in plain}, words=TARGET_WORDS)
    cloning = cloning_items(codec, targets, seed=7)
    exclude = {s.text for s in plain + targets} | {c.joined_text for c in cloning}
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
                    codes = codec.codes(s.text, s.language, s.speaker)
                    meta = {"language": s.language, "duration": len(codes) / CODES_PER_SECOND, "speaker": s.speaker}
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
            # 20-30 sentences: a paragraph of 1-syllable Tamil words still passes the 200-character filter.
            sentences = [codec.random_sentence(lang, rng).text for _ in range(int(rng.integers(20, 31)))]
            lines.append(json.dumps({"text": ". ".join(sentences) + ".", "language": lang}, ensure_ascii=False))
    atomic.write_text(out / "text" / "corpus.jsonl", "\n".join(lines) + "\n", per_process=False)

    items, answers = [], {}
    for i, s in enumerate(plain):
        key = f"{s.language}-{i:04d}"
        items.append({"id": key, "text": s.text, "language": s.language, "duration": codec.duration(s.text, s.language)})
        answers[key] = {"language": s.language, "words": list(s.words), "speaker": None}
    (out / "heldout_refs").mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(cloning):
        key, ref = f"{c.target.language}-clone-{i:04d}", c.reference
        with atomic.atomic_path(out / "heldout_refs" / f"{key}.npy", per_process=False) as tmp, open(tmp, "wb") as f:
            np.save(f, codec.codes(ref.text, ref.language, ref.speaker))
        items.append({"id": key, "text": c.target.text, "language": c.target.language,
                      "duration": codec.duration(c.target.text, c.target.language),
                      "prompt_codes": f"heldout_refs/{key}.npy", "prompt_text": ref.text})
        answers[key] = {"language": c.target.language, "words": list(c.target.words), "speaker": ref.speaker}
    atomic.write_text(out / "heldout.jsonl", "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items),
                      per_process=False)
    atomic.write_text(out / "heldout_answers.json", json.dumps(answers, ensure_ascii=False), per_process=False)
    counts.update(tts_pairs=len(tts), audio_segments=len(audio), text_paragraphs=len(lines), heldout=len(plain),
                  heldout_cloning=len(cloning), speakers=codec.speakers)
    atomic.write_text(out / "done.json", json.dumps(counts, indent=1), per_process=False)
    return counts


def speech_scores(codec: SyntheticCodec, answers: dict[str, dict], generated: dict[str, list[int]]) -> dict:
    """Generated codes read back word by word (`transcribe`) against the answers.

    content accuracy  words read right, in any speaker's voice / sum over items of
                      max(words expected, runs read): a missing, extra or unreadable run counts
                      as wrong, so stopping early or late costs.
    cloning accuracy  the same over the items with a reference, counting only words in the
                      reference speaker's voice (chance: 1 / speakers when the words are right).
    exact             items read exactly (for cloning items: every word in the reference's voice).
    single voice      items without a reference whose runs are all one speaker's (training
                      utterances are); an item with a missing id scores as empty.
    Words are aligned in order (difflib), so one extra run does not shift every later word.
    """
    totals = dict.fromkeys(("words", "right", "clone_words", "clone_right", "exact", "clone_exact", "one_voice"), 0)
    n_plain = n_clone = 0
    for key, want in answers.items():
        read = codec.transcribe(generated.get(key, []), want["language"])
        said = [w for w, _ in read]
        pairs = [(i, j) for a, b, n in difflib.SequenceMatcher(None, want["words"], said, autojunk=False).get_matching_blocks()
                 for i, j in zip(range(a, a + n), range(b, b + n))]
        n = max(len(want["words"]), len(read))
        totals["words"] += n
        totals["right"] += len(pairs)
        if want["speaker"] is None:
            n_plain += 1
            totals["exact"] += said == want["words"]
            totals["one_voice"] += len({s for _, s in read}) == 1 and None not in {s for _, s in read}
        else:
            n_clone += 1
            in_voice = sum(read[j][1] == want["speaker"] for _, j in pairs)
            totals["clone_words"] += n
            totals["clone_right"] += in_voice
            exact = said == want["words"] and all(s == want["speaker"] for _, s in read)
            totals["exact"] += exact
            totals["clone_exact"] += exact
    return {"items": n_plain + n_clone, "cloning_items": n_clone,
            "content_accuracy": totals["right"] / max(totals["words"], 1),
            "cloning_accuracy": totals["clone_right"] / totals["clone_words"] if n_clone else None,
            "exact_items": totals["exact"] / max(n_plain + n_clone, 1),
            "cloning_exact": totals["clone_exact"] / n_clone if n_clone else None,
            "single_voice": totals["one_voice"] / n_plain if n_plain else None}
