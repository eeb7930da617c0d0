"""The expanded model directory a build reads: its token layout (every dataset records the layout
its ids were made with) and the tokenizer every text goes through (transcripts, text corpora,
synthesis prompts)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from speechlm import token_layout as tl
from speechlm.data.partials import SpeechDataError
from speechlm.token_layout import TokenLayout


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
    """
    from tokenizers import Tokenizer

    tokenizer_json = {**tokenizer_json, "added_tokens": [e for e in tokenizer_json.get("added_tokens", [])
                                                         if e["id"] < tl.TEXT_VOCAB_SIZE]}
    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    tok.encode_special_tokens = True
    return tok


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Texts -> Llama-3 text ids (add_special_tokens=False) with a `text_tokenizer`, one batched call
    (encode_batch_fast: no offsets, which we do not use)."""
    if not texts:
        return []
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
