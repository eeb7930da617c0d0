"""speechlm/evaluate/scoring.py against hand-worked examples: normalisation, CER/WER (Hindi, Tamil,
English), failure checks at the ends of the duration range, per-language summaries, ranking.

Each example spells out the normalised code points, the edits and the result; the numbers are
asserted exactly (a rate is edits / length, the same division the module does)."""

from __future__ import annotations

import statistics

import pytest

from speechlm.evaluate import EvaluationError
from speechlm.evaluate.scoring import (CHARS_PER_SECOND, DURATION_RATIO_RANGE, METRICS, duration_ratio, edits,
                                       expected_seconds, failures, normalize, rank_key, summarize)

# --- normalisation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("zero", [0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66],
                         ids=["deva", "beng", "guru", "gujr", "orya", "taml", "telu", "knda", "mlym"])
def test_every_indic_scripts_digits_become_ascii(zero):
    assert normalize("".join(chr(zero + i) for i in range(10))) == "0123456789"


def test_normalize_rules():
    # casefold, not lower: ß -> ss
    assert normalize("Straße") == normalize("STRASSE") == "strasse"
    # punctuation is a space, so "a,b" is two words; runs of whitespace collapse, ends stripped
    assert normalize("  a,b\t\n c—d!  ") == "a b c d"
    # danda and double danda are punctuation
    assert normalize("है। और॥") == "है और"
    # symbols (S*: ₹ +) are kept, but % is punctuation (Po); spelled-out numbers are not unified with digits
    assert normalize("₹20 + 5%") == "₹20 + 5"
    assert edits("twenty", "20")["char_edits"] == 6  # t->2, w->0, then 4 deletions
    # only punctuation / format characters / whitespace: nothing left
    assert normalize(" ।॥ \u200d\u200c ") == ""


# --- CER / WER: Hindi -------------------------------------------------------------------------------


def test_hindi_danda_and_devanagari_digits():
    # ref "आज १० बजे।" -> "आज 10 बजे": आ ज ␠ 1 0 ␠ ब ज े = 9 code points, 3 words.
    # hyp "आज 10 बजे" (ASCII digits, no danda) normalises to the same: 0 edits.
    assert normalize("आज १० बजे।") == "आज 10 बजे"
    assert edits("आज १० बजे।", "आज 10 बजे") == {"char_edits": 0, "chars": 9, "word_edits": 0, "words": 3,
                                                  "cer": 0.0, "wer": 0.0}
    # hyp "आज 11 बजे": one substitution 0->1; one word substituted (10 -> 11): CER 1/9, WER 1/3.
    assert edits("आज १० बजे।", "आज 11 बजे") == {"char_edits": 1, "chars": 9, "word_edits": 1, "words": 3,
                                                  "cer": 1 / 9, "wer": 1 / 3}


def test_hindi_nukta_nfc_vs_nfd():
    # ज़ typed as one code point U+095B and as ज U+091C + nukta U+093C. U+095B is excluded from
    # composition, so NFC of both is the two code points U+091C U+093C: "ज़रूर" = ज ़ र ू र, 5 code points.
    precomposed, decomposed = "\u095Bरूर", "\u091C\u093Cरूर"
    assert precomposed != decomposed
    assert normalize(precomposed) == normalize(decomposed) == "\u091C\u093C\u0930\u0942\u0930"
    assert edits(precomposed, decomposed) == {"char_edits": 0, "chars": 5, "word_edits": 0, "words": 1,
                                              "cer": 0.0, "wer": 0.0}
    # hyp "जरूर" without the nukta: ज र ू र, one deletion: CER 1/5, the one word wrong: WER 1/1.
    assert edits(precomposed, "जरूर") == {"char_edits": 1, "chars": 5, "word_edits": 1, "words": 1,
                                          "cer": 1 / 5, "wer": 1.0}


def test_hindi_zero_width_joiner_removed():
    # क्‍ष with a ZWJ (U+200D, renders the half form) -> क ् ष, the same 3 code points as plain क्ष.
    assert normalize("क्\u200dष") == "क्ष" == "\u0915\u094d\u0937"
    assert normalize("क्\u200cष") == "क्ष"  # ZWNJ likewise
    assert edits("क्ष", "क्\u200dष")["char_edits"] == 0


def test_empty_hypothesis_is_all_deletions():
    # "नमस्ते दुनिया" = न म स ् त े (6) ␠ द ु न ि य ा (6) = 13 code points, 2 words; hyp "" (or "।",
    # which normalises to ""): 13 character deletions, 2 word deletions: CER 1, WER 1.
    expected = {"char_edits": 13, "chars": 13, "word_edits": 2, "words": 2, "cer": 1.0, "wer": 1.0}
    assert edits("नमस्ते दुनिया", "") == expected
    assert edits("नमस्ते दुनिया", "।") == expected


@pytest.mark.parametrize("reference", ["", "   ", "।", "॥ । ", "\u200d", "!?"])
def test_reference_without_text_is_refused(reference):
    with pytest.raises(EvaluationError, match="nothing to score"):
        edits(reference, "कुछ")


# --- CER / WER: Tamil -------------------------------------------------------------------------------


def test_tamil_vowel_sign_substitution():
    # ref "கொடு" (give) = க U+0B95, ொ U+0BCA, ட U+0B9F, ு U+0BC1: 4 code points.
    # hyp "கோடு" (line) = க, ோ U+0BCB, ட, ு: one vowel sign substituted: CER 1/4; WER 1/1.
    assert [hex(ord(c)) for c in normalize("கொடு")] == ["0xb95", "0xbca", "0xb9f", "0xbc1"]
    assert edits("கொடு", "கோடு") == {"char_edits": 1, "chars": 4, "word_edits": 1, "words": 1,
                                     "cer": 1 / 4, "wer": 1.0}


def test_tamil_two_part_vowel_typed_decomposed():
    # ொ typed as its two parts ெ U+0BC6 + ா U+0BBE: NFC composes them to U+0BCA: 0 edits over 4.
    assert edits("கொடு", "\u0B95\u0BC6\u0BBE\u0B9F\u0BC1") == {"char_edits": 0, "chars": 4, "word_edits": 0,
                                                             "words": 1, "cer": 0.0, "wer": 0.0}


def test_tamil_digits():
    # ref "௨௦ பேர்." (20 people) -> "20 பேர்" = 2 0 ␠ ப ே ர ் = 7 code points, 2 words; hyp in ASCII digits.
    assert normalize("௨௦ பேர்.") == "20 பேர்"
    assert edits("௨௦ பேர்.", "20 பேர்") == {"char_edits": 0, "chars": 7, "word_edits": 0, "words": 2,
                                            "cer": 0.0, "wer": 0.0}
    # hyp "21 பேர்": 0 -> 1, one substitution over 7; one word over 2.
    assert edits("௨௦ பேர்.", "21 பேர்") == {"char_edits": 1, "chars": 7, "word_edits": 1, "words": 2,
                                            "cer": 1 / 7, "wer": 1 / 2}


# --- CER / WER: English -----------------------------------------------------------------------------


def test_english_case_and_punctuation():
    # "Hello, World!" -> "hello world" (11 code points, 2 words) = the hypothesis "hello world".
    assert edits("Hello, World!", "hello world") == {"char_edits": 0, "chars": 11, "word_edits": 0, "words": 2,
                                                     "cer": 0.0, "wer": 0.0}
    # ref "The cat sat." -> "the cat sat" (11 code points, 3 words); hyp "the bat sat on":
    # characters: c->b (1 substitution) + " on" inserted (3, the space counts) = 4: CER 4/11;
    # words: cat->bat (1 substitution) + "on" inserted = 2: WER 2/3.
    assert edits("The cat sat.", "the bat sat on") == {"char_edits": 4, "chars": 11, "word_edits": 2, "words": 3,
                                                       "cer": 4 / 11, "wer": 2 / 3}


# --- expected duration and failures -----------------------------------------------------------------


def test_expected_seconds():
    assert expected_seconds("आज १० बजे।", 2.4) == 2.4  # the real recording wins
    assert expected_seconds("आज १० बजे।", None) == 9 / CHARS_PER_SECOND  # "आज 10 बजे": 9 code points
    with pytest.raises(EvaluationError, match="nothing to speak"):
        expected_seconds("।", None)
    with pytest.raises(EvaluationError, match="> 0"):
        expected_seconds("text", 0.0)


def test_duration_ratio_range_ends_are_allowed():
    low, high = DURATION_RATIO_RANGE
    assert (low, high) == (1 / 3, 3.0)
    assert duration_ratio(3.0, 2.0) == 1.5
    ok = dict(stop="speech_end", rejected=0, codes=150)
    # expected 3 s: 9 s is exactly 3x (allowed), a hair more is too long; 1 s is exactly 1/3 (allowed)
    assert failures(**ok, audio_seconds=9.0, expected_seconds=3.0) == []
    assert failures(**ok, audio_seconds=9.01, expected_seconds=3.0) == ["too_long"]
    assert failures(**ok, audio_seconds=1.0, expected_seconds=3.0) == []
    assert failures(**ok, audio_seconds=0.99, expected_seconds=3.0) == ["too_short"]
    assert failures(**ok, audio_seconds=3.0, expected_seconds=3.0) == []


def test_failure_reasons():
    assert failures("max_new_tokens", 0, 500, 10.0, 3.0) == ["no_speech_end", "too_long"]
    assert failures("speech_end", 2, 150, 3.0, 3.0) == ["non_code_tokens"]
    # no codes: "empty", and no duration verdict on top of it
    assert failures("speech_end", 0, 0, 0.0, 3.0) == ["empty"]
    assert failures("max_new_tokens", 3, 0, 0.0, 3.0) == ["no_speech_end", "non_code_tokens", "empty"]


# --- summaries and ranking --------------------------------------------------------------------------


def _rec(language, char_edits, chars, word_edits, words, fails, ratio, sim):
    return {"language": language, "char_edits": char_edits, "chars": chars, "word_edits": word_edits,
            "words": words, "failures": fails, "duration_ratio": ratio, "speaker_similarity": sim}


RECORDS = [
    _rec("hi", 1, 9, 1, 3, [], 1.0, 0.8),
    _rec("hi", 0, 5, 0, 1, ["too_long"], 3.5, None),
    _rec("hi", 3, 10, 2, 2, [], 0.9, 0.6),
    _rec("ta", 1, 4, 1, 1, ["no_speech_end", "too_long"], 4.0, None),
    _rec("ta", 3, 8, 1, 2, [], 1.2, None),
]


def test_summarize_corpus_level_per_language():
    s = summarize(RECORDS)
    assert list(s["languages"]) == ["hi", "ta"]
    hi, ta = s["languages"]["hi"], s["languages"]["ta"]
    # hi: CER (1+0+3)/(9+5+10) = 4/24 = 1/6, not the mean of item CERs (1/9 + 0 + 3/10)/3 = 0.137...
    #     WER (1+0+2)/(3+1+2) = 3/6; failures 1 of 3; duration ratio median of 0.9, 1.0, 3.5 = 1.0;
    #     speaker similarity (0.8+0.6)/2 = 0.7 over 2 items (the third has none).
    assert hi == {"items": 3, "cer": 1 / 6, "wer": 1 / 2, "failure_rate": 1 / 3, "duration_ratio": 1.0,
                  "speaker_similarity": pytest.approx(0.7), "speaker_items": 2}
    assert hi["cer"] != statistics.mean([1 / 9, 0, 3 / 10])
    # ta: CER (1+3)/(4+8) = 1/3; WER (1+1)/(1+2) = 2/3; failures 1 of 2 (two reasons, one item);
    #     median of 4.0, 1.2 = 2.6; no speaker similarity.
    assert ta == {"items": 2, "cer": 1 / 3, "wer": 2 / 3, "failure_rate": 1 / 2, "duration_ratio": 2.6,
                  "speaker_similarity": None, "speaker_items": 0}


def test_summarize_macro_and_micro():
    s = summarize(RECORDS)
    # macro: every language counts once: CER (1/6 + 1/3)/2 = 1/4, WER (1/2 + 2/3)/2 = 7/12,
    # failure rate (1/3 + 1/2)/2 = 5/12, duration ratio (1.0 + 2.6)/2 = 1.8; speaker similarity over
    # the languages that have one: hi's 0.7.
    assert s["macro"] == pytest.approx({"cer": 1 / 4, "wer": 7 / 12, "failure_rate": 5 / 12,
                                        "duration_ratio": 1.8, "speaker_similarity": 0.7})
    # micro: all 5 items pooled: CER 8/36, WER 5/9, failures 2/5, median of 0.9 1.0 1.2 3.5 4.0 = 1.2
    assert s["micro"] == {"items": 5, "cer": 8 / 36, "wer": 5 / 9, "failure_rate": 2 / 5, "duration_ratio": 1.2,
                          "speaker_similarity": pytest.approx(0.7), "speaker_items": 2}
    with pytest.raises(EvaluationError):
        summarize([])


def test_rank_key_direction():
    assert METRICS == {"cer": "lower", "wer": "lower", "failure_rate": "lower", "speaker_similarity": "higher"}
    good = {"checkpoint": "iter_2000", "macro": {"cer": 0.10, "wer": 0.2, "failure_rate": 0.0,
                                                 "speaker_similarity": 0.9}}
    bad = {"checkpoint": "iter_1000", "macro": {"cer": 0.30, "wer": 0.5, "failure_rate": 0.1,
                                                "speaker_similarity": 0.5}}
    # sorting ascending puts the better checkpoint first for either direction
    for metric in METRICS:
        assert sorted([bad, good], key=lambda s: rank_key(s, metric))[0] is good
    assert rank_key(good, "cer") == 0.10
    assert rank_key(good, "speaker_similarity") == -0.9
    no_speaker = {"checkpoint": "iter_3000", "macro": {"cer": 0.1, "speaker_similarity": None}}
    with pytest.raises(EvaluationError, match="iter_3000 has no speaker_similarity.*--speaker-model"):
        rank_key(no_speaker, "speaker_similarity")
    with pytest.raises(EvaluationError, match="unknown metric"):
        rank_key(good, "bleu")
