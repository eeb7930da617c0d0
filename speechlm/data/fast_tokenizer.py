"""Llama-3 text ids through tiktoken, where provably the same as the Hugging Face tokenizer's.

`model_dir.text_tokenizer` asks `load` for a fast tokenizer; what it gets encodes a text to the
ids the unexpanded Llama-3 tokenizer gives (HF `tokenizers`, specials as text,
add_special_tokens=False), 2-4x faster per transcript, or None (with the reason), and then the HF
tokenizer is used as before. Either way one log line says which path a process took.

Why the two give the same ids, and what is checked at load (any failure: HF fallback):
  1. the BPE data: a fingerprint of the vocabulary (tokens in id order) and the merges list
     must be a known one (`KNOWN_BPE`: Llama-3's, the same in 3.0/3.1/3.2). Llama-3's merges
     were generated from tiktoken's ranks (each merge ranked by the rank of the token it makes),
     so the HF merge order and tiktoken's rank order agree; for an arbitrary BPE they need not,
     and proving that in general costs more than a fingerprint. A modified or other BPE falls back;
  2. the pipeline around it: no normalizer; exactly Llama-3's pre-tokenizer (its split regex,
     Isolated, then ByteLevel without prefix space or regex); a plain byte-level BPE
     (ignore_merges: a piece in the vocabulary is one token, as in tiktoken; no dropout,
     byte fallback, prefixes or suffixes); no truncation or padding; a post-processor that only
     adds specials when asked (we never ask); every remaining added token special (with
     `encode_special_tokens` HF encodes specials as text, as tiktoken's encode_ordinary does),
     so no added token can match inside a text;
  3. a self-check of the engine: `SELF_CHECK` (every script of token_layout.LANGUAGES, digits,
     whitespace runs, newlines, tabs, emoji, combining marks, special-token and speech-token
     strings, long words) encoded here must hash to `SELF_CHECK_SHA256`, the HF tokenizer's ids
     for the same strings (a test recomputes it with HF, so it cannot go stale). It guards against
     an installed tiktoken (its regex engine, its Unicode tables) that behaves differently, at a
     cost of ~1 ms instead of building the HF tokenizer (~0.3 s) in every task.
The tests (tests/test_fast_tokenizer.py) compare the ids with HF's on a large generated corpus
and on every Unicode code point in several contexts.

Per-word cache: a text whose only whitespace is single ASCII spaces between words (the usual
transcript) is encoded word by word through a dict. This is exact: in Llama-3's regex a match
holds whitespace only as its first character, or is a whitespace run, so with single spaces every
match lies within one " word" segment (the lookahead `(?!\\S)` only follows whitespace, which in
such a text is followed by the word itself), and BPE encodes each match on its own. Anything
else (tabs, newlines, other spaces, double spaces) goes to tiktoken whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Llama-3's pre-tokenizer regex (tokenizer.json and Meta's tiktoken model agree on it).
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
# bpe_fingerprint of BPE models known to give HF's ids through tiktoken (see the module doc).
KNOWN_BPE = {
    "04b371d8bda5374bf4d5815a99b995ac3af6b07d88f4caeec258358c76b910bb": "Llama-3 (128,000 tokens, 280,147 merges)",
}
# Environment override: "hf" forces the Hugging Face tokenizer (the reference); "auto" (default)
# takes the fast path where it is proven.
ENV = "SPEECHLM_TEXT_TOKENIZER"
_CACHE_MAX = 1 << 18  # words per cache (two caches) before both are cleared: ~50-100 MB at most


def _self_check_corpus() -> list[str]:
    """Fixed strings that exercise every branch of the regex and the per-word cache."""
    scripts = {
        "en": "The quick brown fox, 3 dogs & 12,345.67 cats; it's I'LL we'd",
        "as": "অসমীয়া ভাষা অসমৰ ৰাজ্যিক ভাষা",
        "bn": "বাংলা ভাষা দক্ষিণ এশিয়ার একটি ভাষা ১২৩",
        "gu": "ગુજરાતી ભાષા ગુજરાત રાજ્યની ભાષા છે ૧૨",
        "hi": "भारत एक विशाल देश है, यहाँ अनेक भाषाएँ बोली जाती हैं। १२३४",
        "kn": "ಕನ್ನಡ ಭಾರತದ ಕರ್ನಾಟಕ ರಾಜ್ಯದ ಭಾಷೆ ೧೨",
        "ml": "മലയാളം കേരളത്തിലെ ഭാഷയാണ് ൧൨",
        "mr": "मराठी महाराष्ट्राची राजभाषा आहे",
        "or": "ଓଡ଼ିଆ ଓଡ଼ିଶାର ସରକାରୀ ଭାଷା ୧୨",
        "pa": "ਪੰਜਾਬੀ ਪੰਜਾਬ ਦੀ ਭਾਸ਼ਾ ਹੈ ੧੨",
        "ta": "தமிழ் உலகின் மிகப் பழமையான மொழிகளில் ஒன்றாகும் ௧௨",
        "te": "తెలుగు ఆంధ్ర ప్రదేశ్ భాష ౧౨",
    }
    out = list(scripts.values())
    out += [
        "", " ", "  ", "\n", "a\n\nb", "x \t y", "tab\tsep\t", "  lead", "trail  ", "a  b   c",
        "line1\r\nline2\n  line3 \n", "1234567890 007 3.14159 1e10", "emoji 😀👍🏽 👨‍👩‍👧 🇮🇳!",
        "e\u0301 cafe\u0301 n\u0303 \u0915\u094d\u0937", "<|begin_of_text|> <|end_of_text|><|eot_id|>",
        "<|s_5|><|s_65535|> <|speech_start|>x<|speech_end|> <|lang_hi|> <|pad|>",
        "<|reserved_special_token_7|>", "a" * 300, "नमस्ते" * 80, "!!!???...", "'s 'S 'Ll ſ",
        "\u00a0nbsp\u2003em\u3000ideo\u0085nel\u2028ls", "中文 日本語 한국어 Ελληνικά Русский العربية",
        "hello world this is a plain english sentence with words",
        "mixed हिंदी and தமிழ் with 42 numbers",
    ]
    return out


SELF_CHECK = _self_check_corpus()
# ids_digest of SELF_CHECK by the HF tokenizer (tests recompute it)
SELF_CHECK_SHA256 = "e6d5ac94e9d01e1520f1c6f3d83d2d774ed7dba78a3071960d5d48206772be57"


def ids_digest(ids: list[list[int]]) -> str:
    """sha256 of a list of id lists (one line of comma-separated ids per text)."""
    return hashlib.sha256("\n".join(",".join(map(str, x)) for x in ids).encode()).hexdigest()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character each byte is written as in the vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def bpe_fingerprint(model: dict[str, Any]) -> str:
    """sha256 of a BPE model's tokens in id order and its merges (either spelling: "a b" or [a, b])."""
    vocab = model.get("vocab") or {}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    merges = model.get("merges") or []
    h = hashlib.sha256()
    h.update("\n".join(f"{i}\t{t}" for t, i in by_id).encode("utf-8", "surrogatepass"))
    h.update(b"\0")
    h.update("\n".join(m if isinstance(m, str) else " ".join(m) for m in merges).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def structure_problem(tj: dict[str, Any]) -> str | None:
    """Why this tokenizer.json's pipeline (all but the BPE data) is not Llama-3's, or None."""
    if tj.get("normalizer") is not None:
        return "has a normalizer"
    if tj.get("truncation") is not None or tj.get("padding") is not None:
        return "has truncation or padding"
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return "pre-tokenizer is not Split + ByteLevel"
    split, bl = steps
    if not (split.get("type") == "Split" and split.get("pattern") == {"Regex": PATTERN}
            and split.get("behavior") == "Isolated" and split.get("invert") is False):
        return "pre-tokenizer split is not Llama-3's regex (Isolated)"
    if not (bl.get("type") == "ByteLevel" and bl.get("add_prefix_space") is False and bl.get("use_regex") is False):
        return "pre-tokenizer ByteLevel is not (add_prefix_space=False, use_regex=False)"
    m = tj.get("model") or {}
    if m.get("type") != "BPE":
        return "model is not BPE"
    if m.get("dropout") is not None or m.get("unk_token") is not None or m.get("byte_fallback") or m.get("fuse_unk"):
        return "BPE has dropout, an unk token, byte fallback or fuse_unk"
    if m.get("continuing_subword_prefix") or m.get("end_of_word_suffix"):
        return "BPE has a subword prefix or word suffix"
    if m.get("ignore_merges") is not True:
        return "BPE does not ignore merges for whole-word tokens"
    pp = tj.get("post_processor")
    procs = (pp.get("processors") or []) if pp and pp.get("type") == "Sequence" else ([pp] if pp else [])
    if any(p.get("type") not in ("ByteLevel", "TemplateProcessing") for p in procs):
        return "post-processor other than ByteLevel / TemplateProcessing"
    vocab = m.get("vocab") or {}
    for e in tj.get("added_tokens", []):
        if not e.get("special"):
            return f"non-special added token {e.get('content')!r} (would match inside text)"
        if e.get("id", -1) < len(vocab):
            return f"added token {e.get('content')!r} overlaps the BPE vocabulary"
    return None


class FastTextTokenizer:
    """tiktoken over the Llama-3 BPE with a per-word cache; `encode_flat` is the engine, `encode_texts` its lists."""

    path = "tiktoken"

    def __init__(self, tokenizer_json: dict[str, Any]):
        import tiktoken

        dec = _byte_decoder()
        ranks = {bytes(dec[c] for c in tok): i for tok, i in tokenizer_json["model"]["vocab"].items()}
        self._enc = tiktoken.Encoding("speechlm-llama3-text", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._encode = self._enc._core_bpe.encode_ordinary  # encode_ordinary without its Python wrapper
        self._first = _WordCache(self._encode, "")  # word at the start of a text -> its ids
        self._rest = _WordCache(self._encode, " ")  # word after a space -> ids of " " + word

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        flat, lengths = self.encode_flat(texts)
        ends = np.cumsum(lengths)
        return [a.tolist() for a in np.split(flat, ends[:-1])] if texts else []

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int32) and each text's count: what a batch build writes,
        without a Python int per id (the cache holds each word's ids as int32 bytes)."""
        enc, first, rest = self._encode, self._first, self._rest
        if len(rest) > _CACHE_MAX or len(first) > _CACHE_MAX:
            first.clear()
            rest.clear()
        rest_ids, join = rest.__getitem__, b"".join
        parts = []
        for t in texts:
            words = t.split(" ")
            # single-spaced words <=> t.split(" ") == t.split(); a printable text has no whitespace
            # but " ", so substring tests decide it there without the second split
            if ("  " in t or t[:1] == " " or t[-1:] == " " or not t) if t.isprintable() else words != t.split():
                parts.append(np.array(enc(t), np.int32).tobytes())  # not single-spaced words: whole
                continue
            parts.append(first[words[0]] + join(map(rest_ids, words[1:])) if len(words) > 1 else first[words[0]])
        lengths = np.fromiter(map(len, parts), np.int64, len(parts)) >> 2
        return np.frombuffer(join(parts), np.int32), lengths


class _WordCache(dict):
    """word -> int32 bytes of the ids of prefix + word, encoded on first use."""

    def __init__(self, encode, prefix: str):
        super().__init__()
        self._encode, self._prefix = encode, prefix

    def __missing__(self, word: str) -> bytes:
        ids = self[word] = np.array(self._encode(self._prefix + word), np.int32).tobytes()
        return ids


def load(tokenizer_json: dict[str, Any]) -> tuple[FastTextTokenizer | None, str]:
    """(the fast tokenizer, "proven: ...") or (None, why not) for a text tokenizer.json (the one
    `model_dir.text_tokenizer` builds the HF tokenizer from: codec tokens already left out)."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode == "hf":
        return None, f"{ENV}=hf"
    if mode not in ("", "auto"):
        return None, f"{ENV}={mode!r} is not auto or hf"
    problem = structure_problem(tokenizer_json)
    if problem:
        return None, problem
    fp = bpe_fingerprint(tokenizer_json["model"])
    if fp not in KNOWN_BPE:
        return None, f"unknown BPE model (fingerprint {fp[:16]})"
    try:
        tok = FastTextTokenizer(tokenizer_json)
    except ImportError:
        return None, "tiktoken is not installed"
    got = ids_digest(tok.encode_texts(SELF_CHECK)) + ids_digest([tok._encode(t) for t in SELF_CHECK])
    if got != SELF_CHECK_SHA256 * 2:
        return None, "self-check failed: this tiktoken gives other ids than the reference on SELF_CHECK"
    return tok, f"proven: {KNOWN_BPE[fp]}, pipeline checked, self-check passed"
