#!/usr/bin/env python
"""Convert a speech-expanded HF Llama-3 model to a Megatron torch_dist checkpoint (Megatron-Bridge AutoBridge).

Thin command-line entry point; the logic is in speechlm.model.conversion.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=(
            "Convert an expanded HF model directory (the output of conversion/expand_vocab.py: safetensors, "
            "tokenizer, token_layout.json) to a Megatron torch_dist checkpoint that speechlm.train / Bridge's "
            "pretrain() and finetune() load as checkpoint.pretrained_checkpoint. The tokenizer, HF config and "
            "token layout are copied into OUTPUT/hf so conversion/megatron_to_hf.py needs nothing else. "
            "TP 1 runs as a plain python process; TP/PP > 1 runs under torchrun with TP x PP processes."
        ),
        epilog=(
            "examples:\n"
            "  python conversion/hf_to_megatron.py --input Llama-3.2-1B-speech --output ckpt/llama1b-speech\n"
            "  torchrun --nproc-per-node 2 conversion/hf_to_megatron.py --input Llama-3.2-1B-speech "
            "--output ckpt/llama1b-speech-tp2 --tp 2\n"
            "then train with: checkpoint.pretrained_checkpoint=ckpt/llama1b-speech"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="expanded HF model directory (has token_layout.json)")
    p.add_argument("--output", required=True, help="checkpoint directory to create (built in a hidden sibling, renamed when complete)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel size of the checkpoint (default 1)")
    p.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline-parallel size (default 1; with tied embeddings prefer PP 1)")
    p.add_argument("--vocab-divisible-by", type=int, default=None, metavar="N",
                   help="pad the vocabulary to a multiple of N x TP, only to match a training run that pads "
                        "(should_pad_vocab). Default: no padding, as speechlm.train trains (193,792 = 256 x 757 "
                        "splits evenly at every TP up to 256)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)

    from speechlm.model.conversion import ConversionError, hf_to_megatron
    from speechlm.token_layout import LayoutMismatchError

    try:
        summary = hf_to_megatron(args.input, args.output, tp=args.tp, pp=args.pp,
                                 vocab_divisible_by=args.vocab_divisible_by, overwrite=args.overwrite)
    except (ConversionError, LayoutMismatchError, FileNotFoundError) as e:
        print(f"hf_to_megatron: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # once, not per torchrun process
        print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
