#!/usr/bin/env python
"""Expand a Hugging Face Llama-3 checkpoint to the speech-token vocabulary (193,792 tokens).

Thin command-line entry point; the logic is in speechlm.model.vocab_expansion.
"""

from __future__ import annotations

import argparse
import sys

from speechlm import token_layout as tl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=(
            f"Expand a Llama-3 HF model directory (safetensors + tokenizer.json) from {tl.TEXT_VOCAB_SIZE} to "
            f"{tl.VOCAB_SIZE} tokens: reserved special tokens become <|speech_start|>, <|speech_end|>, <|pad|> and "
            f"<|lang_xx|> (ids {min(tl.SPECIAL_IDS)}..{max(tl.SPECIAL_IDS)}), codec code c becomes <|s_c|> at id "
            f"{tl.CODEC_OFFSET}+c. New rows are sampled from the multivariate normal of the trained embedding rows; "
            "all other weights are copied unchanged. Writes token_layout.json beside the model."
        ),
        epilog="example: python conversion/expand_vocab.py --input Llama-3.2-1B --output Llama-3.2-1B-speech",
    )
    p.add_argument("--input", required=True, help="HF model directory of an unexpanded Llama-3 model")
    p.add_argument("--output", required=True, help="directory to create (built in a temporary sibling, renamed when complete)")
    p.add_argument("--init-scale", type=float, default=1.0, metavar="S",
                   help="scale of the covariance new rows are drawn with (default 1.0: the trained rows' own covariance)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed for the new rows (default 0)")
    p.add_argument("--language-tags", action="store_true",
                   help="record in token_layout.json that documents carry a <|lang_xx|> tag (the tokens exist either way)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)

    from speechlm.model.vocab_expansion import ExpansionError, expand_vocab

    try:
        summary = expand_vocab(
            args.input, args.output, init_scale=args.init_scale, seed=args.seed,
            language_tags=args.language_tags, overwrite=args.overwrite,
        )
    except (ExpansionError, FileNotFoundError) as e:
        print(f"expand_vocab: error: {e}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
