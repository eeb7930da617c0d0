"""The expanded model directory a build reads: its token layout (every dataset records the layout
its ids were made with) and the tokenizer every text goes through (transcripts, text corpora,
synthesis prompts)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from speechlm import token_layout as tl
from speechlm.data.partials import SpeechDataError
from speechlm.token_layout import TokenLayout

log = logging.getLogger(__name__)


def load_model_dir(model_dir: str | Path, need_tokenizer: bool) -> tuple[TokenLayout, Any, str | None]:
    """(layout, `text_tokenizer` or None, sha256 of tokenizer.json or None) of an expanded model dir.

    Refuses a directory without a valid token_layout.json: every dataset must record the layout
    its ids were made with.
    """
    model_dir = Path(model_dir)
    try:
        layout = TokenLayout.load(model_dir)
    except FileNotFoundError:
        raise SpeechDataError(
            f"{model_dir} has no {tl.LAYOUT_FILE}: pass a model directory expanded with "
            "conversion/expand_vocab (it writes the token layout next to the tokenizer)"
        ) from None
    except (tl.LayoutMismatchError, ValueError) as e:
        raise SpeechDataError(f"{model_dir}: token layout refused: {e}") from None
    if not need_tokenizer:
        return layout, None, None
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise SpeechDataError(f"{model_dir} has no tokenizer.json (needed for tts transcripts)")
    try:
        layout.check_tokenizer(model_dir)
    except ValueError as e:
        raise SpeechDataError(f"{model_dir}: tokenizer does not match the token layout: {e}") from None
    data = tok_file.read_bytes()
    return layout, text_tokenizer(json.loads(data)), hashlib.sha256(data).hexdigest()


def text_tokenizer(tokenizer_json: dict[str, Any]) -> Any:
    """The tokenizer of every text we encode (transcripts, text corpora, synthesis prompts), from an
    expanded tokenizer.json: it gives the original Llama-3 tokenizer's ids for any string.

    Text is text whatever token names it spells out: the codec tokens (non-special added tokens,
    which would match a literal "<|s_123|>") are left out, and every special is encoded as text (a
    literal "<|end_of_text|>" must not end a document). Ids 0..128255 are the original's with some
    reserved names changed, and no special name matches, so "<|speech_start|>" gives the same BPE
    pieces as in the original, which had a reserved name at that id. Also faster to encode.

    The reference is HF `tokenizers` with `encode_special_tokens`; where `fast_tokenizer` can prove
    tiktoken gives the same ids (a known Llama-3 BPE, its pipeline, a self-check), that is returned
    instead (2-4x faster per text). One log line says which.
    """
    from speechlm.data import fast_tokenizer

    tokenizer_json = {**tokenizer_json, "added_tokens": [e for e in tokenizer_json.get("added_tokens", [])
                                                         if e["id"] < tl.TEXT_VOCAB_SIZE]}
    fast, why = fast_tokenizer.load(tokenizer_json)
    if fast is not None:
        log.info("text tokenizer: tiktoken fast path (%s)", why)
        return fast
    log.info("text tokenizer: Hugging Face tokenizers (fast path not taken: %s)", why)
    return hf_text_tokenizer(tokenizer_json)


def hf_text_tokenizer(tokenizer_json: dict[str, Any]) -> Any:
    """The reference: HF `tokenizers` over a tokenizer.json without the codec tokens, specials as text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.encode_special_tokens = True
    return tok


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Texts -> Llama-3 text ids (add_special_tokens=False) with a `text_tokenizer`: the fast path's
    own batch, or one batched HF call (encode_batch_fast: no offsets, which we do not use)."""
    if not texts:
        return []
    fast = getattr(tokenizer, "encode_texts", None)
    if fast is not None:
        return fast(texts)
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def encode_texts_flat(tokenizer: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """encode_texts' ids concatenated (int32) and each text's count: a batch build's form."""
    fast = getattr(tokenizer, "encode_flat", None)
    if fast is not None:
        return fast(texts)
    ids = encode_texts(tokenizer, texts)
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32)
    return flat, np.fromiter(map(len, ids), np.int64, len(ids))
