#!/usr/bin/env python
"""Build Megatron indexed datasets of speech documents from WebDataset shards.

Each sample of a shard holds codec codes (an integer .npy, values 0..65535) and a JSON with the
language (and, for --kind tts, the transcript). Documents follow the token layout of --model
(an expanded model dir: token_layout.json + tokenizer):
  audio: [<|lang_x|>] <|speech_start|> codes <|speech_end|> <|end_of_text|>
         (segments longer than --seq-length are split into pieces, each its own document)
  tts:   <|begin_of_text|> [<|lang_x|>] text <|speech_start|> codes <|speech_end|> <|end_of_text|>
         (pairs that do not fit --seq-length are dropped and counted)
Output in --output: <kind>_<lang>_train / <kind>_<lang>_valid prefixes (.bin/.idx) and
manifest.json (documents, tokens, hours, skips by reason, layout hash, settings).

Parallel and resumable: --num-tasks/--task-index (default: SLURM_ARRAY_TASK_COUNT /
SLURM_ARRAY_TASK_ID) split the sorted shard list round-robin; every finished shard is kept under
output/partials/ and skipped by a rerun. A one-task run merges at the end; with several tasks,
run `merge_speech.py --output DIR` (or this script with --merge) once all have finished.
The merged bytes do not depend on the task count or on interruptions.

S3 / R2: the endpoint comes from --endpoint-url, R2_ENDPOINT_URL or AWS_ENDPOINT_URL; keys from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a profile (--profile / AWS_PROFILE). Shards are
streamed (no local copy); a broken transfer resumes with a ranged GET.

Examples:
  build_speech.py --input 's3://speech/pt/shard-{000000..000099}.tar' --model ckpt/llama3-speech \\
      --output data/audio --kind audio
  build_speech.py --input '/data/tts/*.tar' --model ckpt/llama3-speech --output data/tts --kind tts \\
      --text-field transcript --language-field lang
"""

from __future__ import annotations

import argparse
import sys

from speechlm.data import build_cli


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="build_speech.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    build_cli.add_model_options(
        ap, input_help="shards: local paths, directories or globs, s3://bucket/prefix[/], "
        "s3 globs; brace ranges like shard-{000000..000099}.tar are expanded",
        output_help="output directory (one per kind and source)")
    ap.add_argument("--kind", choices=("audio", "tts"), help="audio-only (pretraining) or text+audio (TTS) documents")
    build_cli.add_split_options(
        ap, valid_help="share of samples held out for validation, chosen by a hash of the sample key (default 0.01)")
    ap.add_argument("--language", help="language of samples whose JSON has none (audio: lets samples without JSON through)")
    g = ap.add_argument_group("sample schema")
    g.add_argument("--codes-key", default="codes.npy", help="tar member extension of the codes (default codes.npy)")
    g.add_argument("--meta-key", default="json", help="tar member extension of the metadata JSON (default json)")
    g.add_argument("--text-field", default="text", help="JSON field of the transcript (default text)")
    g.add_argument("--language-field", default="language", help="JSON field of the language code (default language)")
    g.add_argument("--duration-field", default="duration", help="JSON field of the duration in seconds, reported as declared_hours (default duration)")
    build_cli.add_task_options(ap, unit="shard", merge_help="only merge finished partials (same as merge_speech.py)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    build_cli.setup_logging(args.quiet)
    from speechlm.data import speech

    def build(task_index: int) -> dict:
        schema = speech.Schema(args.codes_key, args.meta_key, args.text_field, args.language_field, args.duration_field)
        return speech.build(args.input, args.model, args.output, args.kind, schema=schema, default_language=args.language,
                            **build_cli.build_kwargs(args, task_index))

    return build_cli.run(args, ap, required=("input", "model", "kind"), build=build, merge=speech.merge,
                         format_manifest=speech.format_manifest, unit="shard", merge_command="data_prep/merge_speech.py")


if __name__ == "__main__":
    sys.exit(main())
