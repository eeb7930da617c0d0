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
import logging
import os
import sys


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="build_speech.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--input", nargs="+", help="shards: local paths, directories or globs, s3://bucket/prefix[/], "
                    "s3 globs; brace ranges like shard-{000000..000099}.tar are expanded")
    ap.add_argument("--model", help="expanded model dir (token_layout.json + tokenizer.json)")
    ap.add_argument("--output", required=True, help="output directory (one per kind and source)")
    ap.add_argument("--kind", choices=("audio", "tts"), help="audio-only (pretraining) or text+audio (TTS) documents")
    ap.add_argument("--seq-length", type=int, default=2048, help="training sequence length; documents never exceed it (default 2048)")
    ap.add_argument("--valid-fraction", type=float, default=0.01,
                    help="share of samples held out for validation, chosen by a hash of the sample key (default 0.01)")
    ap.add_argument("--language", help="language of samples whose JSON has none (audio: lets samples without JSON through)")
    g = ap.add_argument_group("sample schema")
    g.add_argument("--codes-key", default="codes.npy", help="tar member extension of the codes (default codes.npy)")
    g.add_argument("--meta-key", default="json", help="tar member extension of the metadata JSON (default json)")
    g.add_argument("--text-field", default="text", help="JSON field of the transcript (default text)")
    g.add_argument("--language-field", default="language", help="JSON field of the language code (default language)")
    g.add_argument("--duration-field", default="duration", help="JSON field of the duration in seconds, reported as declared_hours (default duration)")
    g = ap.add_argument_group("parallelism")
    g.add_argument("--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT", 1),
                   help="tasks sharing the shards (default SLURM_ARRAY_TASK_COUNT or 1)")
    g.add_argument("--task-index", type=int, default=None,
                   help="this task, 0-based (default SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0)")
    g.add_argument("--merge", action="store_true", help="only merge finished partials (same as merge_speech.py)")
    g.add_argument("--no-merge", action="store_true", help="do not merge even when this is the only task")
    g = ap.add_argument_group("S3 / R2")
    g.add_argument("--profile", help="AWS profile (default AWS_PROFILE)")
    g.add_argument("--endpoint-url", help="S3 endpoint (default R2_ENDPOINT_URL or AWS_ENDPOINT_URL)")
    g.add_argument("--max-attempts", type=int, default=10, help="attempts per S3 request and resumes per shard (default 10)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # megatron-core logs every partial it reads at INFO: keep the root at WARNING, ours at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("speechlm").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from speechlm import s3
    from speechlm.data import speech

    try:
        if args.merge:
            m = speech.merge(args.output, progress=not args.quiet)
            print(speech.format_manifest(m))
            return 0
        missing = [f"--{n}" for n in ("input", "model", "kind") if getattr(args, n) is None]
        if missing:
            parser().error(f"missing {', '.join(missing)}")
        task_index = args.task_index
        if task_index is None:
            task_index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        schema = speech.Schema(args.codes_key, args.meta_key, args.text_field, args.language_field, args.duration_field)
        s3s = s3.S3Settings.from_env(profile=args.profile, endpoint_url=args.endpoint_url, max_attempts=args.max_attempts)
        summary = speech.build(
            args.input, args.model, args.output, args.kind,
            merge_after=args.num_tasks == 1 and not args.no_merge,
            seq_length=args.seq_length, valid_fraction=args.valid_fraction, schema=schema,
            default_language=args.language, num_tasks=args.num_tasks, task_index=task_index,
            s3_settings=s3s, progress=not args.quiet,
        )
    except speech.SpeechDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["failed"]:
        for url, why in summary["failed"]:
            print(f"FAILED {url}: {why}", file=sys.stderr)
        print(f"{len(summary['failed'])} shards failed (not marked done): rerun this task to retry them", file=sys.stderr)
        return 1
    if "manifest" in summary:
        print(speech.format_manifest(summary["manifest"]))
    else:
        print(f"task {task_index}/{args.num_tasks}: {summary['task_shards']} of {summary['shards']} shards done; "
              f"merge with: data_prep/merge_speech.py --output {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
