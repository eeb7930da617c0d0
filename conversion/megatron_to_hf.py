#!/usr/bin/env python
"""Export a Megatron checkpoint (converted or from training) to a Hugging Face model directory.

Thin command-line entry point; the logic is in speechlm.model.conversion.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from speechlm.model.conversion import VERIFY_TOLERANCE

    tol = ", ".join(f"{k} {v:g}" for k, v in VERIFY_TOLERANCE.items())
    p = argparse.ArgumentParser(
        description=(
            "Export one iteration of a Megatron-Bridge torch_dist checkpoint (a checkpoint.save directory with "
            "iter_XXXXXXX subdirectories, an iter_XXXXXXX directory, or the output of hf_to_megatron.py) to an HF "
            "model + tokenizer + token_layout.json loadable by transformers.AutoModelForCausalLM. Vocabulary "
            "padding is stripped; generation stops at <|speech_end|>. Runs as one process (any training TP)."
        ),
        epilog=(
            "example: python conversion/megatron_to_hf.py --input runs/pt/checkpoints --output exports/pt-latest --verify\n"
            f"--verify tolerances on the max abs logit difference, scaled by max(1, max |logit|): {tol}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input", required=True, help="checkpoint directory (checkpoint.save) or one iter_XXXXXXX directory")
    p.add_argument("--output", required=True, help="HF directory to create (built in a hidden sibling, renamed when complete)")
    p.add_argument("--iteration", type=int, default=None, metavar="N",
                   help="iteration to export (default: latest_checkpointed_iteration.txt); an unknown one lists those available")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype of the HF model (default bf16)")
    p.add_argument("--verify", action="store_true",
                   help="run Megatron and the exported model on a fixed batch of text and speech tokens and fail "
                        "(writing nothing) if the max abs logit difference is above the dtype's tolerance")
    p.add_argument("--hf-source", default=None, metavar="DIR",
                   help="HF directory with config.json, tokenizer and token_layout.json to take metadata from "
                        "(default: the checkpoint's hf/, else what its run_config.yaml names)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = p.parse_args(argv)

    from speechlm.model.conversion import ConversionError, VerificationError, megatron_to_hf
    from speechlm.token_layout import LayoutMismatchError

    try:
        summary = megatron_to_hf(args.input, args.output, iteration=args.iteration, dtype=args.dtype,
                                 verify=args.verify, hf_source=args.hf_source, overwrite=args.overwrite)
    except (ConversionError, LayoutMismatchError, FileNotFoundError) as e:
        print(f"megatron_to_hf: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"megatron_to_hf: verification failed, nothing written:\n{e}", file=sys.stderr)
        return 3
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
