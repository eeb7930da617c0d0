"""The token layout: id arithmetic, document formats, JSON + hash, tokenizer checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from speechlm.demo import tiny
from speechlm import token_layout as tl
from speechlm.token_layout import LayoutMismatchError, TokenLayout

LAYOUTS = [TokenLayout(), TokenLayout(language_tags=True)]


def test_imports_with_numpy_only():
    code = "import sys, speechlm.token_layout; bad = {'torch', 'transformers', 'megatron'} & {m.split('.')[0] for m in sys.modules}; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_constants_and_special_ids():
    assert tl.VOCAB_SIZE == tl.TEXT_VOCAB_SIZE + tl.CODEC_SIZE == 193_792 == 256 * 757
    layout = TokenLayout()
    assert (layout.speech_start_id, layout.speech_end_id, layout.pad_id) == (128011, 128012, 128013)
    assert [layout.lang_id(lang) for lang in tl.LANGUAGES] == list(range(128014, 128026))
    used = set(tl.SPECIALS.values())
    assert not used & {128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010}
    with pytest.raises(ValueError, match="unknown language"):
        layout.lang_id("xx")


def test_id_arithmetic_both_ways():
    codes = np.array([0, 1, 5, 12345, 65535])
    ids = tl.codes_to_ids(codes)
    assert ids.dtype == np.int32 and ids.tolist() == [128256, 128257, 128261, 140601, 193791]
    assert tl.ids_to_codes(ids).tolist() == codes.tolist()
    every = np.arange(tl.CODEC_SIZE)
    assert np.array_equal(tl.ids_to_codes(tl.codes_to_ids(every)), every)
    assert tl.is_speech([128255, 128256, 193791, 193792, 0]).tolist() == [False, True, True, False, False]
    for bad in ([-1], [65536]):
        with pytest.raises(ValueError, match="outside 0..65535"):
            tl.codes_to_ids(bad)
    for bad in ([128255], [193792], [5]):
        with pytest.raises(ValueError, match="not a speech token"):
            tl.ids_to_codes(bad)
    with pytest.raises(ValueError, match="integers"):
        tl.codes_to_ids([1.5])


@pytest.mark.parametrize("layout", LAYOUTS, ids=["plain", "tags"])
def test_documents_round_trip(layout: TokenLayout):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, tl.CODEC_SIZE, 37)
    text = rng.integers(0, 128_000, 11)
    lang = "ta" if layout.language_tags else None
    tag = [layout.lang_id("ta")] if layout.language_tags else []

    audio = layout.audio_document(codes, lang)
    assert audio.dtype == np.int32
    assert audio.tolist() == tag + [128011, *(codes + 128256)] + [128012, tl.EOD_ID]
    d = layout.decode_document(audio)
    assert (d.kind, d.language, d.text_ids.tolist(), d.codes.tolist()) == ("audio", lang, [], codes.tolist())

    tts = layout.tts_document(text, codes, lang)
    assert tts.tolist() == [tl.BOS_ID] + tag + text.tolist() + [128011, *(codes + 128256)] + [128012, tl.EOD_ID]
    prompt = layout.tts_prompt(text, lang)
    assert tts[: len(prompt)].tolist() == prompt.tolist() and prompt[-1] == layout.speech_start_id
    d = layout.decode_document(tts)
    assert (d.kind, d.language, d.text_ids.tolist(), d.codes.tolist()) == ("tts", lang, text.tolist(), codes.tolist())

    doc = layout.text_document(text)
    assert doc.tolist() == [tl.BOS_ID] + text.tolist() + [tl.EOD_ID]
    d = layout.decode_document(doc)
    assert (d.kind, d.language, d.text_ids.tolist(), d.codes.tolist()) == ("text", None, text.tolist(), [])

    # Lengths: the whole document, EOD included, is what fits seq_length.
    n = layout.max_codes_per_audio_document(64)
    assert len(layout.audio_document(np.zeros(n, int), lang)) == 64
    n = layout.max_codes_per_tts_document(64, len(text))
    assert len(layout.tts_document(text, np.zeros(n, int), lang)) == 64
    assert len(layout.text_document(np.zeros(layout.max_text_ids_per_text_document(64), int))) == 64
    pieces = layout.split_audio_codes(np.arange(1000), 64)
    assert np.array_equal(np.concatenate(pieces), np.arange(1000))
    assert all(len(layout.audio_document(p, lang)) <= 64 for p in pieces)


def test_language_tag_rules():
    tagged = TokenLayout(language_tags=True)
    with pytest.raises(ValueError, match="language is required"):
        tagged.audio_document([1])
    with pytest.raises(ValueError, match="unknown language"):
        tagged.tts_document([1], [1], "xx")
    assert TokenLayout().audio_document([1], "hi").tolist() == [128011, 128257, 128012, 128001]  # tags off: ignored
    with pytest.raises(ValueError, match="language tag expected"):
        tagged.decode_document(TokenLayout().audio_document([1]))


@pytest.mark.parametrize(
    "bad",
    [
        [128011, 128257, 128012],  # no EOD
        [128011, 128257, 128001],  # no speech_end
        [5, 6, 128001],  # neither BOS nor speech_start
        [128000, 5, 128011, 7, 128012, 128001],  # a text id where a code should be
        [128000, 5, 128012, 128001],  # speech_end without start: not text either
        [128011, 128012, 128001],  # no codes
    ],
)
def test_decode_rejects_malformed(bad):
    with pytest.raises(ValueError):
        TokenLayout().decode_document(bad)


def test_text_ids_validated():
    layout = TokenLayout()
    for bad in ([128000], [128001], [128011], [128256], [-1]):
        with pytest.raises(ValueError, match="not a text token"):
            layout.text_document(bad)
    with pytest.raises(ValueError, match="non-empty"):
        layout.audio_document([])


def test_json_round_trip_and_hash(tmp_path):
    for layout in LAYOUTS:
        d = tmp_path / str(layout.language_tags)
        d.mkdir()
        path = layout.save(d)
        raw = json.loads(path.read_text())
        assert list(raw) == sorted(raw)
        assert raw["specials"]["<|speech_start|>"] == 128011 and raw["vocab_size"] == tl.VOCAB_SIZE
        assert raw["languages"] == list(tl.LANGUAGES) and raw["language_tags"] == layout.language_tags
        assert raw["layout_hash"] == layout.layout_hash
        assert TokenLayout.load(d) == layout == TokenLayout.from_dict(layout.to_dict())
    assert LAYOUTS[0].layout_hash != LAYOUTS[1].layout_hash

    # A tampered file fails the hash check, and an edited id is refused outright.
    raw = json.loads((tmp_path / "False" / tl.LAYOUT_FILE).read_text())
    raw["layout_hash"] = "0" * 64
    (tmp_path / "False" / tl.LAYOUT_FILE).write_text(json.dumps(raw))
    with pytest.raises(LayoutMismatchError, match="hash mismatch"):
        TokenLayout.load(tmp_path / "False")
    raw = LAYOUTS[0].to_dict()
    raw["specials"] = {**raw["specials"], "<|pad|>": 128002}
    with pytest.raises(LayoutMismatchError, match="specials"):
        TokenLayout.from_dict(raw)


def test_check_compatible():
    plain, tagged = LAYOUTS
    plain.check_compatible(plain.layout_hash, "a checkpoint")
    plain.check_compatible(TokenLayout(), "a checkpoint")
    with pytest.raises(LayoutMismatchError) as e:
        plain.check_compatible(tagged, "blend file x.json")
    msg = str(e.value)
    assert "blend file x.json" in msg and plain.layout_hash in msg and tagged.layout_hash in msg and "language_tags" in msg


@pytest.mark.parametrize("release", ["3.0", "3.2"])
def test_check_tokenizer_unexpanded(tmp_path, release):
    d = tiny.write_llama3_tokenizer(tmp_path, release=release)
    assert TokenLayout().check_tokenizer(d) == "unexpanded"
    # N differs between releases at the same id: the layout picks by id, never by N.
    names = tiny.special_token_names(release)
    assert names[128011] == ("<|reserved_special_token_6|>" if release == "3.0" else "<|reserved_special_token_3|>")


def test_check_tokenizer_rejects(tmp_path):
    d = tiny.write_llama3_tokenizer(tmp_path, release="3.2")
    tok = json.loads((d / "tokenizer.json").read_text())
    for e in tok["added_tokens"]:
        if e["id"] == 128012:
            e["content"] = "<|my_token|>"
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="not a reserved special token"):
        TokenLayout().check_tokenizer(d)
    tok["added_tokens"] = [e for e in tok["added_tokens"] if e["id"] < 128100]
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="128100 tokens"):
        TokenLayout().check_tokenizer(d)
