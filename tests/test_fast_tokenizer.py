"""The tiktoken fast path of the text tokenizer (speechlm.data.fast_tokenizer): the same ids as the
Hugging Face reference (the unexpanded Llama-3 tokenizer, specials as text) on a large generated
corpus and on every Unicode code point, the HF fallback for any tokenizer it cannot prove, and
TTS builds byte-identical whichever path tokenizes."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from speechlm import token_layout as tl
from speechlm.data import fast_tokenizer as ft
from speechlm.data import model_dir, speech

# Characters per script of token_layout.LANGUAGES (Unicode blocks), used to generate text.
SCRIPTS = {
    "en": (0x0041, 0x007A), "as": (0x0980, 0x09FF), "bn": (0x0980, 0x09FF), "gu": (0x0A80, 0x0AFF),
    "hi": (0x0900, 0x097F), "kn": (0x0C80, 0x0CFF), "ml": (0x0D00, 0x0D7F), "mr": (0x0900, 0x097F),
    "or": (0x0B00, 0x0B7F), "pa": (0x0A00, 0x0A7F), "ta": (0x0B80, 0x0BFF), "te": (0x0C00, 0x0C7F),
}
WORDS = {
    "en": "the quick brown fox jumps over it's we'll THEY'RE I'd don't 1990s U.S.A. e-mail".split(),
    "hi": "भारत एक विशाल देश है यहाँ अनेक भाषाएँ बोली जाती हैं। क्षेत्र संस्कृति".split(),
    "ta": "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும் இலங்கையில்".split(),
    "bn": "বাংলা ভাষা দক্ষিণ এশিয়ার".split(), "te": "తెలుగు ఆంధ్ర ప్రదేశ్".split(),
    "ml": "മലയാളം കേരളത്തിലെ ഭാഷയാണ്".split(), "kn": "ಕನ್ನಡ ಕರ್ನಾಟಕ ರಾಜ್ಯದ".split(),
    "gu": "ગુજરાતી ભાષા ગુજરાત".split(), "pa": "ਪੰਜਾਬੀ ਪੰਜਾਬ ਭਾਸ਼ਾ".split(), "or": "ଓଡ଼ିଆ ଓଡ଼ିଶାର ଭାଷା".split(),
    "as": "অসমীয়া ভাষা অসমৰ".split(), "mr": "मराठी महाराष्ट्राची राजभाषा".split(),
}
SPACES = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u2003", "\u3000", "\u200b", "\u0085",
          "\u2028", "\x0b", "\x0c", "\x1c", " \t\n"]
LITERALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|s_5|>", "<|s_65535|>", "<|speech_start|>",
            "<|speech_end|>", "<|lang_hi|>", "<|pad|>", "<|reserved_special_token_3|>", "<|start_header_id|>"]
EXTRAS = ["😀", "👍🏽", "👨‍👩‍👧", "🇮🇳", "\u0301", "\u093c", "\u094d", "\u200d", "\u200c", "'s", "'LL", "'ve", "ſ",
          "...", "!?", "—", "“quoted”", "(x)", "#", "$5", "100%", "3.14", "12,345", "٣٤", "१२३", "௧௨", "中文", "한국어",
          "Ελληνικά", "Русский", "العربية", "\x00", "\x7f", "\ufeff", "\U0001d400"]


def varied_corpus(n: int, seed: int = 0) -> list[str]:
    """Generated text: words and random characters of all 12 languages' scripts, digits, whitespace
    runs, newlines, tabs, emoji, combining marks, literal special/speech token strings, very long
    words, and empty-ish strings, in random mixtures."""
    rng = np.random.default_rng(seed)
    langs = list(SCRIPTS)
    out = ["", " ", "\n", "\t", "  \n\t ", "a", "1", "12345678901234567890", "x" * 5000, "नमस्ते" * 2000,
           "<|s_5|>" * 50, " ".join(LITERALS), "".join(LITERALS)]
    for i in range(n):
        parts = []
        for _ in range(int(rng.integers(1, 30))):
            r = rng.random()
            lang = langs[int(rng.integers(len(langs)))]
            if r < 0.45:
                parts.append(WORDS[lang][int(rng.integers(len(WORDS[lang])))])
            elif r < 0.6:
                lo, hi = SCRIPTS[lang]
                parts.append("".join(chr(int(c)) for c in rng.integers(lo, hi + 1, int(rng.integers(1, 12)))))
            elif r < 0.7:
                parts.append(str(int(rng.integers(0, 10 ** int(rng.integers(1, 12))))))
            elif r < 0.8:
                parts.append(EXTRAS[int(rng.integers(len(EXTRAS)))])
            elif r < 0.87:
                parts.append(LITERALS[int(rng.integers(len(LITERALS)))])
            elif r < 0.9:
                parts.append(WORDS[lang][0] * int(rng.integers(20, 200)))  # a very long word
            else:
                parts.append(SPACES[int(rng.integers(len(SPACES)))])
        sep = " " if i % 3 else SPACES[int(rng.integers(len(SPACES)))]  # 2 in 3: plain single spaces
        text = (" " if i % 3 else sep).join(parts)
        if i % 7 == 0:
            text = text.strip()
        out.append(text)
    return out


def every_code_point() -> list[str]:
    """Every Unicode scalar value of the planes with assigned characters (0-3, 14; surrogates
    excluded), and every 97th of the others (unassigned and private use), in contexts where its
    class matters to the pre-tokenizer regex (letter, digit, whitespace, other, newline) and to BPE."""
    out, chunk = [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or (0x40000 <= cp < 0xE0000 or cp >= 0xF0000) and cp % 97:
            continue
        c = chr(cp)
        chunk.append(f"a{c}a {c}1{c}\n{c}")
        if len(chunk) == 512:
            out.append(" ".join(chunk))
            chunk = []
    out.append(" ".join(chunk))
    return out


@pytest.fixture(scope="module")
def tj(expanded_tiny_dir) -> dict:
    """The text tokenizer.json of an expanded model (codec tokens left out), as text_tokenizer sees it."""
    raw = json.loads((expanded_tiny_dir / "tokenizer.json").read_text())
    return {**raw, "added_tokens": [e for e in raw["added_tokens"] if e["id"] < tl.TEXT_VOCAB_SIZE]}


@pytest.fixture(scope="module")
def reference(llama3_tokenizer_dir):
    """The reference: the unexpanded Llama-3 tokenizer (HF), every special encoded as text."""
    from tokenizers import Tokenizer

    ref = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json"))
    ref.encode_special_tokens = True
    return lambda texts: [e.ids for e in ref.encode_batch_fast(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def fast(tj):
    tok, why = ft.load(tj)
    assert tok is not None, why
    return tok


# --- same ids ------------------------------------------------------------------------------------
def test_fast_path_is_taken_for_llama3(expanded_tiny_dir, caplog, monkeypatch):
    monkeypatch.delenv(ft.ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="speechlm.data.model_dir"):
        _, tok, _ = model_dir.load_model_dir(expanded_tiny_dir, need_tokenizer=True)
    assert isinstance(tok, ft.FastTextTokenizer)
    assert "text tokenizer: tiktoken fast path (proven: Llama-3" in caplog.text


def test_self_check_digest_is_the_references(reference):
    assert ft.ids_digest(reference(ft.SELF_CHECK)) == ft.SELF_CHECK_SHA256


def test_ids_equal_reference_on_varied_corpus(fast, reference):
    corpus = varied_corpus(6_000)
    want = reference(corpus)
    assert fast.encode_texts(corpus) == want  # per-word cache filled here
    assert fast.encode_texts(corpus) == want  # and read back
    assert [fast._encode(t) for t in corpus] == want  # tiktoken alone, no cache
    cached = sum(t.split(" ") == t.split() for t in corpus)
    assert 0.15 * len(corpus) < cached < 0.9 * len(corpus)  # both ways of encoding are exercised
    # the corpus reaches every script, specials as text and long pieces
    flat = {i for ids in want for i in ids}
    assert max(flat) < tl.BOS_ID
    assert sum(len(t) > 1000 for t in corpus) > 10


def test_ids_equal_reference_on_every_code_point(fast, reference):
    texts = every_code_point()
    assert sum(map(len, texts)) > 0x50000 * 10
    want = reference(texts)
    got = fast.encode_texts(texts)
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{len(bad)} chunks differ, first at code point ~{bad[0] * 512:#x}"


def test_transcripts_through_encode_texts(expanded_tiny_dir, reference, monkeypatch):
    """encode_texts (every caller's entry) gives the reference ids on both paths."""
    corpus = varied_corpus(2_000, seed=1)
    raw = json.loads((expanded_tiny_dir / "tokenizer.json").read_text())
    for mode, cls in (("auto", ft.FastTextTokenizer), ("hf", type(None))):
        monkeypatch.setenv(ft.ENV, mode)
        tok = model_dir.text_tokenizer(raw)
        assert isinstance(tok, ft.FastTextTokenizer) == (mode == "auto")
        assert model_dir.encode_texts(tok, corpus) == reference(corpus)
        flat, counts = model_dir.encode_texts_flat(tok, corpus)  # the batch builds' form
        assert flat.dtype == np.int32 and counts.tolist() == [len(ids) for ids in reference(corpus)]
        assert flat.tolist() == [i for ids in reference(corpus) for i in ids]


def test_word_by_word_is_taken_exactly_for_single_spaced_words(fast, monkeypatch):
    """The per-word cache is used exactly for texts where str.split(" ") == str.split(): checked
    for every code point as a word, a separator and at either end, by counting whole-text encodes."""
    whole = []
    monkeypatch.setattr(fast, "_encode", lambda t: whole.append(t) or [])
    monkeypatch.setattr(fast, "_first", ft._WordCache(lambda t: [], ""))
    monkeypatch.setattr(fast, "_rest", ft._WordCache(lambda t: [], " "))
    texts = ["", " ", "a", "a b", "a  b", " a", "a ", "a\nb", "a \n", "a\u00a0b", "a\u3000b", "a b c d", "a\u200db c"]
    for c in map(chr, range(0x110000)):
        texts += [f"a{c}b", f"a {c}", f"{c} a"]
    fast.encode_flat(texts)
    assert whole == [t for t in texts if t.split(" ") != t.split()]


# --- fallback ------------------------------------------------------------------------------------
def _modified(tj: dict, how: str) -> dict:
    t = json.loads(json.dumps(tj))
    m = t["model"]
    if how == "swap_merges":  # same vocabulary, another merge order
        m["merges"][100], m["merges"][101] = m["merges"][101], m["merges"][100]
    elif how == "swapped_ids":  # same tokens and merges, two ids exchanged
        a, b = (next(k for k, v in m["vocab"].items() if v == i) for i in (5000, 5001))
        m["vocab"][a], m["vocab"][b] = 5001, 5000
    elif how == "normalizer":
        t["normalizer"] = {"type": "NFC"}
    elif how == "regex":
        t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = ft.PATTERN.replace("{1,3}", "{1,2}")
    elif how == "byte_level_prefix":
        t["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    elif how == "non_special_added":  # a text-range added token that would match inside text
        next(e for e in t["added_tokens"] if e["id"] == 128100)["special"] = False
    elif how == "no_ignore_merges":
        m["ignore_merges"] = False
    elif how == "truncation":
        t["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    return t


@pytest.mark.parametrize("how", ["swap_merges", "swapped_ids", "normalizer", "regex", "byte_level_prefix",
                                 "non_special_added", "no_ignore_merges", "truncation"])
def test_fallback_for_a_tokenizer_it_cannot_prove(tj, how, caplog):
    t = _modified(tj, how)
    tok, why = ft.load(t)
    assert tok is None and why
    with caplog.at_level(logging.INFO, logger="speechlm.data.model_dir"):
        hf = model_dir.text_tokenizer(t)
    assert not isinstance(hf, ft.FastTextTokenizer)
    assert "text tokenizer: Hugging Face tokenizers (fast path not taken:" in caplog.text


def test_fallback_for_a_different_bpe(tmp_path):
    """A BPE trained here (GPT-2-style byte level, Llama-3's pre-tokenizer): unknown fingerprint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(__import__("tokenizers").Regex(ft.PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(varied_corpus(300, seed=3), trainer)
    t = json.loads(tok.to_str())
    assert ft.structure_problem(t) is None  # the pipeline is Llama-3's: only the data differ
    fast, why = ft.load(t)
    assert fast is None and why.startswith("unknown BPE model")


def test_fallback_when_self_check_fails_or_forced(tj, monkeypatch):
    monkeypatch.setattr(ft, "SELF_CHECK_SHA256", "0" * 64)
    tok, why = ft.load(tj)
    assert tok is None and why.startswith("self-check failed")
    monkeypatch.undo()
    monkeypatch.setenv(ft.ENV, "hf")
    assert ft.load(tj) == (None, f"{ft.ENV}=hf")
    monkeypatch.setenv(ft.ENV, "auto")
    assert ft.load(tj)[0] is not None


# --- byte-identical builds -------------------------------------------------------------------------
# sha256 of every output file of the build below, as the data prep before the fast path (HF
# tokenizer, per-sample path of commit 86542ba) wrote them: the new path must not change a byte.
BUILD_SHA256 = {
    "tts_bn_train.bin": "c46422752ea6bccb133e4cb5baefafe8d79985e52ae6912b2f50f1e31b213e4e",
    "tts_bn_train.idx": "673ef62076aa2f984090df3470b11eb51cd8678480c125e2e3d279f5a96910ff",
    "tts_bn_valid.bin": "b7445965498a5cd17ecc2068f02b70abb53e5fbfc37e053be6cc41e3c9f7fe64",
    "tts_bn_valid.idx": "b8702ece7af5a03cbb64b6ef0f18146e6a8f4e19ce6372db83e4077d74e0c0a3",
    "tts_en_train.bin": "c3c1eac71405fffb35a6336bce27f93c4b18fbc17d4d6056c8fa3d56fb35c4c0",
    "tts_en_train.idx": "a3a5f66381e29c51f588a94ac7bd16f883fe995f1c823da657e12dc69831b6f0",
    "tts_en_valid.bin": "cc1bccd6837a8a9e19715a80054a2ec6b502b9881437241ab263957812881b21",
    "tts_en_valid.idx": "d5215f34e9e39eefaab28afdb51de797014c3e89bc18df723805bb1b2e20e8cd",
    "tts_hi_train.bin": "74f17b83efc7ccfac1ee10d70dde556370e00d9cde63b499f2df563dd84dadb3",
    "tts_hi_train.idx": "dc0e222891ecb9b17208cdc011821e27d724213f1ae40e3aa5dd7ad2f1a7f72d",
    "tts_hi_valid.bin": "66e0038c7a6a3a5eeaa566240cefb3e86874ae03b6a4b92ad8c7bb0221d543e6",
    "tts_hi_valid.idx": "de555c220441f283f7c2dfd9dc4d3ecff49cfaf12b2c477530b1e10381ad4d4c",
    "tts_ta_train.bin": "1fe65890b604fa7051f2418b6de3866884f347c9caa7462ffda45f65648ba0dc",
    "tts_ta_train.idx": "bd5e4050911175862ce15c79970563d441367d9e54cecd310eea146117fb90b5",
    "tts_ta_valid.bin": "63d1f107ab5c9d2800cbba86c8813d2c347944fc62b957790d307239b233c027",
    "tts_ta_valid.idx": "d75fbbac2e2c4481e41060c9648db26527edfdf8846e810729de9d16b1ff8038",
}


def _tts_shards(d: Path) -> list[str]:
    rng = np.random.default_rng(7)
    texts = varied_corpus(900, seed=5)
    langs = ("hi", "ta", "en", "bn")
    paths = []
    for k in range(3):
        path = d / f"shard-{k:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for i in range(300):
                j = k * 300 + i
                n = int(rng.integers(1, 1500)) if j % 11 else 2000  # some too long for 2048 tokens
                meta = {"text": texts[j], "language": langs[j % 4] if j % 50 else langs[(j // 50) % 4],
                        "duration": n / 50}
                tw.write({"__key__": f"s{k}/{i:05d}", "codes.npy": rng.integers(0, tl.CODEC_SIZE, n).astype(np.int32),
                          "json": meta})
        paths.append(str(path))
    return paths


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.iterdir()) if p.suffix in (".bin", ".idx") or p.name == "manifest.json"}


def test_tts_build_is_byte_identical_on_both_paths(expanded_tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    shards = _tts_shards(tmp_path / "in")
    digests = {}
    for mode in ("hf", "auto"):
        monkeypatch.setenv(ft.ENV, mode)
        out = tmp_path / f"out-{mode}"
        m = speech.build(shards, expanded_tiny_dir, out, "tts", valid_fraction=0.05, progress=False)["manifest"]
        digests[mode] = _digests(out)
    assert m["skips"].get("too_long") and m["skips"].get("empty_text") and m["totals"]["documents"] > 500
    assert digests["hf"] == digests["auto"]
    manifest_free = {k: v for k, v in digests["auto"].items() if k != "manifest.json"}
    assert manifest_free == BUILD_SHA256

