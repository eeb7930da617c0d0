"""The demo's synthetic codec (speechlm.demo.synthetic_codec): speakers, reading codes back, the
held-out cloning items, and the two scores the demo reports."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from speechlm.demo import synthetic_codec as sc


@pytest.fixture(scope="module")
def codec():
    return sc.SyntheticCodec()


def test_each_speaker_says_each_word_with_its_own_run_of_one_length(codec):
    assert codec.speakers >= 4
    for lang in codec.languages:
        for word, runs in codec.runs[lang].items():
            assert runs.shape[0] == codec.speakers and sc.RUN_LENGTHS[0] <= runs.shape[1] <= sc.RUN_LENGTHS[1]
            assert len({tuple(r) for r in runs.tolist()}) == codec.speakers, word  # four different voices
    text = " ".join(list(codec.runs["hi"])[:3])
    voices = [codec.codes(text, "hi", s) for s in range(codec.speakers)]
    assert len({len(v) for v in voices}) == 1 and len({tuple(v) for v in voices}) == codec.speakers
    with pytest.raises(ValueError, match="speakers 0..3"):
        codec.codes(text, "hi", 4)


def test_transcribe_reads_words_and_speakers_back(codec):
    words = list(codec.runs["ta"])[:4]
    codes = np.concatenate([codec.runs["ta"][w][s] for w, s in zip(words, (2, 2, 0, 3))])
    assert codec.transcribe(codes, "ta") == list(zip(words, (2, 2, 0, 3)))
    # A stretch of noise is one unknown word; reading resumes at the next run.
    noisy = np.concatenate([codes[:len(codec.runs["ta"][words[0]][2])], [7, 7, 7], codes[len(codec.runs["ta"][words[0]][2]):]])
    assert codec.transcribe(noisy, "ta") == [(words[0], 2), (sc.UNKNOWN, None), *zip(words[1:], (2, 0, 3))]
    assert codec.transcribe([], "ta") == []


def test_scores_count_words_and_voices(codec):
    words = list(codec.runs["en"])[:3]
    plain = {"language": "en", "words": words, "speaker": None}
    clone = {"language": "en", "words": words, "speaker": 1}
    text = " ".join(words)
    right = codec.codes(text, "en", 1).tolist()
    assert sc.speech_scores(codec, {"a": plain, "b": clone}, {"a": codec.codes(text, "en", 3).tolist(), "b": right}) == {
        "items": 2, "cloning_items": 1, "content_accuracy": 1.0, "cloning_accuracy": 1.0, "exact_items": 1.0,
        "cloning_exact": 1.0, "single_voice": 1.0}
    # Right words in another voice: content right, cloning wrong.
    other = sc.speech_scores(codec, {"b": clone}, {"b": codec.codes(text, "en", 2).tolist()})
    assert other["content_accuracy"] == 1.0 and other["cloning_accuracy"] == 0.0 and other["exact_items"] == 0.0
    # A missing last word, an extra word, and no output at all each cost.
    short = codec.codes(" ".join(words[:2]), "en", 1).tolist()
    assert sc.speech_scores(codec, {"b": clone}, {"b": short})["content_accuracy"] == pytest.approx(2 / 3)
    extra = right + codec.runs["en"][words[0]][1].tolist()
    assert sc.speech_scores(codec, {"b": clone}, {"b": extra})["cloning_accuracy"] == pytest.approx(3 / 4)
    assert sc.speech_scores(codec, {"b": clone}, {})["content_accuracy"] == 0.0
    # Mixed voices in an utterance without a reference: content right, not one voice.
    mixed = np.concatenate([codec.runs["en"][w][s] for w, s in zip(words, (0, 1, 0))]).tolist()
    assert sc.speech_scores(codec, {"a": plain}, {"a": mixed})["single_voice"] == 0.0


def test_written_dataset_has_one_speaker_an_utterance_and_unseen_cloning_items(codec, tmp_path):
    import webdataset as wds

    counts = sc.write_dataset(codec, tmp_path, tts_per_language=200, audio_per_language=20,
                              text_paragraphs_per_language=2, heldout_per_language=8)
    assert counts["heldout"] == counts["heldout_cloning"] == 24
    answers = json.loads((tmp_path / "heldout_answers.json").read_text())
    trained = set()
    for sample in wds.WebDataset(sorted(map(str, (tmp_path / "tts").glob("*.tar"))), shardshuffle=False):
        meta = json.loads(sample["json"])
        codes = np.load(io.BytesIO(sample["codes.npy"]))
        assert codec.transcribe(codes, meta["language"]) == [(w, meta["speaker"]) for w in meta["text"].split()]
        trained.add(meta["text"])
    items = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    cloning = [x for x in items if "prompt_codes" in x]
    assert len(cloning) == 24 and {answers[x["id"]]["speaker"] for x in cloning} == set(range(codec.speakers))
    for x in cloning:
        ref = np.load(tmp_path / x["prompt_codes"])
        read = codec.transcribe(ref, x["language"])
        # The reference: a known speaker (the answer's) saying words the target does not contain.
        assert [w for w, _ in read] == x["prompt_text"].split() and {s for _, s in read} == {answers[x["id"]]["speaker"]}
        assert not set(x["prompt_text"].split()) & set(x["text"].split())
        assert f"{x['prompt_text']} {x['text']}" not in trained
    assert not {x["text"] for x in items} & trained
