"""The token layout: the one place that computes a token id.

ids 0..128255 are the Llama-3 tokenizer, unchanged except that some reserved special tokens
are renamed to our specials (fixed by id from 128011 up); ids 128256..193791 are the 65,536
XCodec2 codes, code c being id 128256 + c (named `<|s_c|>`).

Document formats (each ends with EOD = `<|end_of_text|>`, which Megatron's dataset uses as the
end-of-document token; `[<|lang_x|>]` only when `language_tags` is on):
  audio-only: [<|lang_x|>] <|speech_start|> s... <|speech_end|> EOD
  text+audio: BOS [<|lang_x|>] text <|speech_start|> s... <|speech_end|> EOD
  text-only:  BOS text EOD

This module imports with numpy only: data preparation and checks must not pull in torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Literal

import numpy as np

LANGUAGES = ("en", "as", "bn", "gu", "hi", "kn", "ml", "mr", "or", "pa", "ta", "te")
TEXT_VOCAB_SIZE = 128_256
CODEC_SIZE = 65_536
CODEC_OFFSET = 128_256
VOCAB_SIZE = 193_792  # = 256 * 757: no Megatron vocab padding at TP 1 and 2
BOS_ID = 128_000  # <|begin_of_text|>
EOD_ID = 128_001  # <|end_of_text|>
CODES_PER_SECOND = 50
FORMAT_VERSION = 1
LAYOUT_FILE = "token_layout.json"

BOS_TOKEN = "<|begin_of_text|>"
EOD_TOKEN = "<|end_of_text|>"
CODEC_TOKEN_FORMAT = "<|s_{}|>"

# Our specials take reserved ids from 128011 up. 128004 and 128006-128010 are skipped because
# Llama-3.1/3.2 name them (finetune pad, headers, eom, eot, python_tag): one layout then fits
# base and instruct models of every 3.x release.
FIRST_SPECIAL_ID = 128_011
SPECIAL_NAMES: tuple[str, ...] = ("<|speech_start|>", "<|speech_end|>", "<|pad|>") + tuple(
    f"<|lang_{lang}|>" for lang in LANGUAGES
)
SPECIALS: dict[str, int] = {name: FIRST_SPECIAL_ID + i for i, name in enumerate(SPECIAL_NAMES)}
SPECIAL_IDS = frozenset(SPECIALS.values())
# Ids of trained rows in a Llama-3 checkpoint: the BPE vocabulary plus BOS/EOD. The reserved
# ids 128002..128255 were never trained (and header/eot rows are untrained in base models).
TRAINED_TEXT_IDS = range(0, EOD_ID + 1)

assert CODEC_OFFSET + CODEC_SIZE == VOCAB_SIZE
assert max(SPECIAL_IDS) < TEXT_VOCAB_SIZE and not SPECIAL_IDS & {128004, *range(128006, 128011)}

DocKind = Literal["audio", "tts", "text"]


class LayoutMismatchError(ValueError):
    """An artifact was made with a different token layout than the one in use."""


def codec_token(code: int) -> str:
    return CODEC_TOKEN_FORMAT.format(code)


def codes_to_ids(codes: Any) -> np.ndarray:
    """Codec codes (0..65535) -> token ids (128256 + code), as int32."""
    arr = np.asarray(codes)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codec codes must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= CODEC_SIZE):
        bad = arr[(arr < 0) | (arr >= CODEC_SIZE)][0]
        raise ValueError(f"codec code {int(bad)} is outside 0..{CODEC_SIZE - 1}")
    return (arr + CODEC_OFFSET).astype(np.int32)


def ids_to_codes(ids: Any) -> np.ndarray:
    """Speech token ids (128256..193791) -> codec codes, as int32."""
    arr = np.asarray(ids).astype(np.int64, copy=False)
    if arr.size and (arr.min() < CODEC_OFFSET or arr.max() >= VOCAB_SIZE):
        bad = arr[(arr < CODEC_OFFSET) | (arr >= VOCAB_SIZE)][0]
        raise ValueError(f"token id {int(bad)} is not a speech token (speech ids are {CODEC_OFFSET}..{VOCAB_SIZE - 1})")
    return (arr - CODEC_OFFSET).astype(np.int32)


def is_speech(ids: Any) -> np.ndarray:
    """Boolean mask: which ids are codec tokens."""
    arr = np.asarray(ids)
    return (arr >= CODEC_OFFSET) & (arr < VOCAB_SIZE)


def _text_ids(text_ids: Any) -> np.ndarray:
    arr = np.asarray(text_ids)
    if arr.size == 0:
        return np.zeros(0, np.int32)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 1:
        raise ValueError(f"text ids must be a 1-D integer sequence, got dtype {arr.dtype} shape {arr.shape}")
    arr = arr.astype(np.int64)
    bad = (arr < 0) | (arr >= TEXT_VOCAB_SIZE) | np.isin(arr, list(SPECIAL_IDS | {BOS_ID, EOD_ID}))
    if bad.any():
        raise ValueError(
            f"text id {int(arr[bad][0])} is not a text token: pass ids of tokenizer(text, "
            "add_special_tokens=False) (no BOS/EOD, no speech or layout specials)"
        )
    return arr.astype(np.int32)


def _codes(codes: Any) -> np.ndarray:
    ids = codes_to_ids(codes)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"codes must be a non-empty 1-D sequence, got shape {ids.shape}")
    return ids


@dataclass(frozen=True)
class DecodedDocument:
    kind: DocKind
    language: str | None
    text_ids: np.ndarray
    codes: np.ndarray


@dataclass(frozen=True)
class TokenLayout:
    """The token layout; `language_tags` decides whether documents carry `<|lang_x|>`."""

    language_tags: bool = False

    # --- ids ----------------------------------------------------------------------------------
    speech_start_id = SPECIALS["<|speech_start|>"]
    speech_end_id = SPECIALS["<|speech_end|>"]
    pad_id = SPECIALS["<|pad|>"]
    bos_id = BOS_ID
    eod_id = EOD_ID
    vocab_size = VOCAB_SIZE
    codec_offset = CODEC_OFFSET
    codec_size = CODEC_SIZE
    specials = MappingProxyType(SPECIALS)

    def lang_id(self, lang: str) -> int:
        if lang not in LANGUAGES:
            raise ValueError(f"unknown language {lang!r}; known: {', '.join(LANGUAGES)}")
        return SPECIALS[f"<|lang_{lang}|>"]

    def _tag(self, language: str | None) -> list[int]:
        if not self.language_tags:
            return []
        if language is None:
            raise ValueError("this layout has language tags on: a language is required")
        return [self.lang_id(language)]

    # --- encoders -----------------------------------------------------------------------------
    def audio_document(self, codes: Any, language: str | None = None) -> np.ndarray:
        """[<|lang_x|>] <|speech_start|> s... <|speech_end|> EOD"""
        head = np.array(self._tag(language) + [self.speech_start_id], np.int32)
        tail = np.array([self.speech_end_id, EOD_ID], np.int32)
        return np.concatenate([head, _codes(codes), tail])

    def tts_prompt(self, text_ids: Any, language: str | None = None) -> np.ndarray:
        """BOS [<|lang_x|>] text <|speech_start|>: the TTS document up to the first code."""
        head = np.array([BOS_ID] + self._tag(language), np.int32)
        return np.concatenate([head, _text_ids(text_ids), np.array([self.speech_start_id], np.int32)])

    def cloning_prompt(self, text_ids: Any, reference_codes: Any, language: str | None = None) -> np.ndarray:
        """BOS [<|lang_x|>] text <|speech_start|> reference codes: the TTS document whose text is the
        reference transcript and the target text (`text_ids`, tokenized as one string), up to and
        including the reference's codes. The model continues the speech, in the reference's voice."""
        return np.concatenate([self.tts_prompt(text_ids, language), _codes(reference_codes)])

    def tts_document(self, text_ids: Any, codes: Any, language: str | None = None) -> np.ndarray:
        """BOS [<|lang_x|>] text <|speech_start|> s... <|speech_end|> EOD"""
        tail = np.array([self.speech_end_id, EOD_ID], np.int32)
        return np.concatenate([self.tts_prompt(text_ids, language), _codes(codes), tail])

    def text_document(self, text_ids: Any) -> np.ndarray:
        """BOS text EOD"""
        return np.concatenate([np.array([BOS_ID], np.int32), _text_ids(text_ids), np.array([EOD_ID], np.int32)])

    # --- lengths ------------------------------------------------------------------------------
    # A document counts every token it has, EOD included; the builders keep every document at most
    # seq_length tokens. That makes a document fit in one sample (seq_length + 1 tokens: inputs and
    # shifted labels), not land whole in one: Megatron's GPTDataset (core/datasets/gpt_dataset.py,
    # helpers.cpp build_sample_idx) concatenates an epoch's documents in shuffled order and cuts
    # that stream every seq_length tokens, so samples start at arbitrary offsets into documents. A
    # document of L tokens is whole in a sample only when it starts at most seq_length + 1 - L
    # tokens into one; otherwise it is cut in two and its second part is trained without the first
    # as context (e.g. codes without their transcript). SFT packing (speechlm.data.sft_packing) keeps pairs whole.
    @property
    def audio_overhead(self) -> int:
        """Tokens of an audio document that are not codes: [tag] start end EOD."""
        return 3 + int(self.language_tags)

    @property
    def tts_overhead(self) -> int:
        """Tokens of a TTS document that are neither text nor codes: BOS [tag] start end EOD."""
        return 4 + int(self.language_tags)

    def max_codes_per_audio_document(self, seq_length: int) -> int:
        n = seq_length - self.audio_overhead
        if n < 1:
            raise ValueError(f"seq_length {seq_length} leaves no room for codes")
        return n

    def max_codes_per_tts_document(self, seq_length: int, n_text_ids: int) -> int:
        """How many codes fit with n_text_ids text tokens; <= 0 means the pair cannot fit."""
        return seq_length - self.tts_overhead - n_text_ids

    def max_text_ids_per_text_document(self, seq_length: int) -> int:
        return seq_length - 2

    def split_audio_codes(self, codes: Any, seq_length: int) -> list[np.ndarray]:
        """Split codes into near-equal pieces whose audio documents each fit seq_length tokens."""
        arr = np.asarray(codes)
        cap = self.max_codes_per_audio_document(seq_length)
        n_pieces = max(1, -(-len(arr) // cap))
        return [p for p in np.array_split(arr, n_pieces) if len(p)]

    # --- decoding -----------------------------------------------------------------------------
    def decode_document(self, ids: Any) -> DecodedDocument:
        """Inverse of the encoders; ValueError on anything that is none of the three formats."""
        arr = np.asarray(ids).astype(np.int64)
        if arr.ndim != 1 or arr.size < 2 or arr[-1] != EOD_ID:
            raise ValueError("not a document: expected a 1-D id sequence ending with EOD (128001)")
        body = arr[:-1]
        if body[0] == BOS_ID:
            body = body[1:]
            starts = np.flatnonzero(body == self.speech_start_id)
            if starts.size == 0:  # text-only
                return DecodedDocument("text", None, _text_ids(body), np.zeros(0, np.int32))
            language, body = self._untag(body)
            start = int(np.flatnonzero(body == self.speech_start_id)[0])
            text_ids = _text_ids(body[:start])
            codes = self._speech_part(body[start:])
            return DecodedDocument("tts", language, text_ids, codes)
        language, body = self._untag(body)
        if body.size == 0 or body[0] != self.speech_start_id:
            raise ValueError("not a document: neither BOS nor <|speech_start|> at its start")
        return DecodedDocument("audio", language, np.zeros(0, np.int32), self._speech_part(body))

    def _untag(self, body: np.ndarray) -> tuple[str | None, np.ndarray]:
        if not self.language_tags:
            return None, body
        tags = {SPECIALS[f"<|lang_{lang}|>"]: lang for lang in LANGUAGES}
        if body.size == 0 or int(body[0]) not in tags:
            raise ValueError("not a document of this layout: language tag expected (language_tags is on)")
        return tags[int(body[0])], body[1:]

    def _speech_part(self, part: np.ndarray) -> np.ndarray:
        # part = <|speech_start|> s... <|speech_end|>
        if part.size < 3 or part[0] != self.speech_start_id or part[-1] != self.speech_end_id:
            raise ValueError("not a document: speech must be <|speech_start|> codes... <|speech_end|>")
        return ids_to_codes(part[1:-1])

    # --- serialisation ------------------------------------------------------------------------
    def _canonical(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "text_vocab_size": TEXT_VOCAB_SIZE,
            "codec_offset": CODEC_OFFSET,
            "codec_size": CODEC_SIZE,
            "codec_token_format": CODEC_TOKEN_FORMAT,
            "vocab_size": VOCAB_SIZE,
            "bos_id": BOS_ID,
            "eod_id": EOD_ID,
            "specials": dict(SPECIALS),
            "languages": list(LANGUAGES),
            "language_tags": self.language_tags,
            "codes_per_second": CODES_PER_SECOND,
        }

    @property
    def layout_hash(self) -> str:
        """sha256 of the canonical JSON of the layout (without the hash itself)."""
        text = json.dumps(self._canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {**self._canonical(), "layout_hash": self.layout_hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TokenLayout":
        """Rebuild a layout; refuses one this code cannot reproduce exactly (other ids, version)."""
        if d.get("format_version") != FORMAT_VERSION:
            raise LayoutMismatchError(f"token layout format_version {d.get('format_version')!r}; this code reads {FORMAT_VERSION}")
        layout = cls(language_tags=bool(d.get("language_tags", False)))
        stored = {k: v for k, v in d.items() if k != "layout_hash"}
        ours = layout._canonical()
        differ = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
        if differ:
            raise LayoutMismatchError(f"token layout differs from this code's in: {', '.join(differ)}")
        if "layout_hash" in d and d["layout_hash"] != layout.layout_hash:
            raise LayoutMismatchError(
                f"token layout hash mismatch: stored {d['layout_hash']}, content hashes to {layout.layout_hash}"
            )
        return layout

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / LAYOUT_FILE
        path.write_text(json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "TokenLayout":
        """Read `token_layout.json` from a directory (or the file itself); verifies the hash."""
        path = Path(directory)
        if path.is_dir():
            path = path / LAYOUT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {LAYOUT_FILE} at {path}")
        d = json.loads(path.read_text())
        if "layout_hash" not in d:
            raise LayoutMismatchError(f"{path} has no layout_hash")
        try:
            return cls.from_dict(d)
        except LayoutMismatchError as e:
            raise LayoutMismatchError(f"{path}: {e}") from None

    def check_compatible(self, other: "str | TokenLayout", what: str) -> None:
        """Raise LayoutMismatchError unless `other` (a hash or layout) is this layout; `what` names it."""
        other_hash = other.layout_hash if isinstance(other, TokenLayout) else str(other)
        if other_hash == self.layout_hash:
            return
        detail = ""
        if isinstance(other, TokenLayout):
            a, b = self._canonical(), other._canonical()
            detail = " (differs in: " + ", ".join(k for k in sorted(a) if a[k] != b.get(k)) + ")"
        raise LayoutMismatchError(
            f"{what} was made with token layout {other_hash}, but this run uses {self.layout_hash}{detail}"
        )

    # --- tokenizer check ----------------------------------------------------------------------
    def check_tokenizer(self, tokenizer_or_dir: Any) -> Literal["unexpanded", "expanded"]:
        """Check a Llama-3 tokenizer (object or directory with tokenizer.json) against the layout.

        Unexpanded: 128256 tokens, BOS/EOD in place, every id our specials take is a
        `<|reserved_special_token_N|>` (any N). Expanded: 193792 tokens, our names at our ids and
        `<|s_c|>` at 128256 + c. Returns which; ValueError saying what is wrong otherwise.
        """
        names, size = _tokenizer_names(tokenizer_or_dir)
        for i, want in ((BOS_ID, BOS_TOKEN), (EOD_ID, EOD_TOKEN)):
            if names(i) != want:
                raise ValueError(f"not a Llama-3 tokenizer: id {i} is {names(i)!r}, expected {want!r}")
        if size == TEXT_VOCAB_SIZE:
            for name, i in SPECIALS.items():
                tok = names(i)
                if not (tok or "").startswith("<|reserved_special_token_"):
                    raise ValueError(f"id {i} (for {name}) is {tok!r}, not a reserved special token")
            return "unexpanded"
        if size == VOCAB_SIZE:
            for name, i in SPECIALS.items():
                if names(i) != name:
                    raise ValueError(f"expanded tokenizer has {names(i)!r} at id {i}, expected {name!r}")
            for code in (0, 1, 5, CODEC_SIZE // 2, CODEC_SIZE - 1):
                if names(CODEC_OFFSET + code) != codec_token(code):
                    raise ValueError(
                        f"expanded tokenizer has {names(CODEC_OFFSET + code)!r} at id {CODEC_OFFSET + code}, "
                        f"expected {codec_token(code)!r}"
                    )
            return "expanded"
        raise ValueError(
            f"tokenizer has {size} tokens: a Llama-3 tokenizer has {TEXT_VOCAB_SIZE} "
            f"(or {VOCAB_SIZE} once expanded with this layout)"
        )


def _tokenizer_names(tokenizer_or_dir: Any) -> tuple[Any, int]:
    """(id -> token string, vocabulary size) for a tokenizer object or a tokenizer directory."""
    if isinstance(tokenizer_or_dir, (str, Path)):
        path = Path(tokenizer_or_dir)
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = json.loads(path.read_text())
        table: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
        table.update({e["id"]: e["content"] for e in tok.get("added_tokens", [])})
        size = max(table) + 1 if table else 0
        if len(table) != size:
            raise ValueError(f"{path}: token ids are not contiguous ({len(table)} tokens, max id {size - 1})")
        return table.get, size
    tk = tokenizer_or_dir
    return (lambda i: tk.convert_ids_to_tokens(i)), len(tk)


def all_special_names() -> Iterable[tuple[int, str]]:
    """(id, name) of every token the layout names, specials then codec tokens."""
    yield from ((i, n) for n, i in SPECIALS.items())
    yield from ((CODEC_OFFSET + c, codec_token(c)) for c in range(CODEC_SIZE))
