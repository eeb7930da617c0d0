"""What a text record must be to be written: one of our languages (`normalise_language`) and
long-form text that passes the quality filters (`Filters`, `filter_reason`)."""

from __future__ import annotations


import re
import unicodedata
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from speechlm import token_layout as tl

# Phrases of web page chrome (cookie banners, footers, link bait); matched case-insensitively.
BOILERPLATE_PATTERNS = (
    r"cookie policy", r"use of cookies", r"we use cookies", r"accept (all )?cookies",
    r"all rights reserved", r"click here", r"privacy policy", r"terms (of use|and conditions|of service)",
    r"subscribe to our newsletter", r"sign up for our newsletter", r"enable javascript",
    r"javascript is disabled", r"copyright ©", r"© ?\d{4}", r"powered by (wordpress|blogger)",
    r"read more »", r"share on (facebook|twitter|whatsapp)", r"follow us on",
)
_BOILERPLATE_RE = re.compile("|".join(f"(?:{p})" for p in BOILERPLATE_PATTERNS), re.IGNORECASE)

# Language names and codes seen in corpora -> our codes. Aya writes English names ("Hindi") and
# ISO 639-3 codes ("hin"); FLORES-style codes are "hin_Deva"; BCP 47 "hi-IN".
_ALIASES = {
    "en": ("eng", "english"),
    "as": ("asm", "assamese"),
    "bn": ("ben", "bengali", "bangla"),
    "gu": ("guj", "gujarati"),
    "hi": ("hin", "hindi"),
    "kn": ("kan", "kannada"),
    "ml": ("mal", "malayalam"),
    "mr": ("mar", "marathi"),
    "or": ("ori", "ory", "odia", "oriya"),
    "pa": ("pan", "punjabi", "panjabi"),
    "ta": ("tam", "tamil"),
    "te": ("tel", "telugu"),
}
LANGUAGE_ALIASES = {a: code for code, names in _ALIASES.items() for a in (code, *names)}
assert set(_ALIASES) == set(tl.LANGUAGES)


def normalise_language(value: Any) -> str | None:
    """Our language code for a corpus's language value, "" for another real language, None for
    no usable value. "hi", "HI", "hin", "Hindi", "hin_Deva", "hi-IN" -> "hi"."""
    if not isinstance(value, str) or not value.strip():
        return None
    v = value.strip().lower()
    head = re.split(r"[-_ ]", v, maxsplit=1)[0]
    code = LANGUAGE_ALIASES.get(v) or LANGUAGE_ALIASES.get(head)
    if code:
        return code
    return "" if re.fullmatch(r"[a-z]+", head) else None  # "French", "fra", "fra_Latn": another language


# --- filters -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Filters:
    """Quality filters for long-form text; a threshold of None (or 0 / 1) turns a rule off."""

    min_chars: int = 200
    min_letter_share: float = 0.7
    max_repeated_line_share: float = 0.3
    max_boilerplate_line_share: float = 0.2


# Filter settings per kind of corpus (build_text.py --preset; docs/mixture.md). Web text: the
# defaults above. Instruction pairs (Aya) are short by nature, and answers carry numbers, lists and
# formulas: no length or repeated-line rule and a lower letter share; page chrome is still dropped.
FILTER_PRESETS = {
    "web": Filters(),
    "instruction": Filters(min_chars=0, min_letter_share=0.5, max_repeated_line_share=None),
}
NO_FILTERS = Filters(0, 0.0, None, None)


def resolve_filters(preset: str | None, *, templated: bool, **overrides: float | int | None) -> Filters:
    """A preset (default: instruction for templated records, else web) with the values given in
    `overrides` (Filters' field names; None keeps the preset's)."""
    base = FILTER_PRESETS[preset or ("instruction" if templated else "web")]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _is_letter(ch: str) -> bool:
    # Indic vowel signs and viramas (e.g. "ि", "்") are combining marks (Mn/Mc), not alphabetic
    # to str.isalpha, yet they are part of words: count them as letters.
    return ch.isalpha() or unicodedata.category(ch) in ("Mn", "Mc")


_SPACE, _LETTER, _OTHER = 0, 1, 2
_CLASS_TABLE: np.ndarray | None = None


def _class_table() -> np.ndarray:
    """Class of every Basic Multilingual Plane code point (built once, ~0.1 s): a table lookup
    over the text's code points is ~50x faster than a Python loop over its characters."""
    global _CLASS_TABLE
    if _CLASS_TABLE is None:
        chars = [chr(i) for i in range(0x10000)]
        _CLASS_TABLE = np.array([_SPACE if c.isspace() else _LETTER if _is_letter(c) else _OTHER for c in chars], np.uint8)
    return _CLASS_TABLE


def letter_share(text: str) -> float:
    """Letters (str.isalpha or a combining mark) / non-whitespace characters; 0 for none."""
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    bmp = cps < 0x10000
    counts = np.bincount(_class_table()[cps[bmp]], minlength=3)
    letters, other = int(counts[_LETTER]), int(counts[_OTHER])
    if not bmp.all():  # outside the BMP (emoji, rare scripts): classify one by one
        for cp in cps[~bmp]:
            ch = chr(int(cp))
            if not ch.isspace():
                letters, other = letters + _is_letter(ch), other + (not _is_letter(ch))
    total = letters + other
    return letters / total if total else 0.0


def _lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def repeated_line_share(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (0 for none)."""
    lines = _lines(text)
    return 1.0 - len(set(lines)) / len(lines) if lines else 0.0


# Literal pieces, one of which every boilerplate pattern contains (lower case): a text with
# none of them (most texts) is decided by a few substring scans instead of a regex per line.
_BOILERPLATE_ANCHORS = ("cookie", "rights reserved", "click here", "privacy", "terms ", "newsletter", "javascript",
                        "©", "powered by", "read more", "share on", "follow us")


def boilerplate_line_share(text: str) -> float:
    """Share of the non-blank lines containing a boilerplate phrase (BOILERPLATE_PATTERNS)."""
    low = text.lower()
    if not any(a in low for a in _BOILERPLATE_ANCHORS):
        return 0.0
    lines = _lines(text)
    return sum(1 for s in lines if _BOILERPLATE_RE.search(s)) / len(lines) if lines else 0.0


def filter_reason(text: str, f: Filters) -> str | None:
    """The first filter rule the text fails, or None if it passes."""
    if not text.strip():
        return "empty_text"
    if f.min_chars and len(text) < f.min_chars:
        return "too_short"
    if f.min_letter_share and letter_share(text) < f.min_letter_share:
        return "low_letter_share"
    if f.max_repeated_line_share is not None and f.max_repeated_line_share < 1 and repeated_line_share(text) > f.max_repeated_line_share:
        return "repeated_lines"
    if f.max_boilerplate_line_share is not None and f.max_boilerplate_line_share < 1 and boilerplate_line_share(text) > f.max_boilerplate_line_share:
        return "boilerplate"
    return None
