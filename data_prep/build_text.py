#!/usr/bin/env python
"""Build Megatron indexed datasets of text-only documents from jsonl / parquet corpora.

Each record becomes `<|begin_of_text|> text <|end_of_text|>` (the token layout of --model, an
expanded model dir). Texts longer than --seq-length are split into near-equal consecutive
pieces of their token ids, each its own document of at most --seq-length tokens.
Output in --output: <source>_<lang>_train / <source>_<lang>_valid prefixes (.bin/.idx) and
manifest.json (documents, tokens, skips by reason, layout hash, settings).

Text: one field (--text-field, default text) or a template over several fields
(--template aya = "{inputs}\\n\\n{targets}", Aya's prompt and response; or any "{a} ... {b}").
Language: --language-field (codes or names: hi, hin, Hindi, hin_Deva, hi-IN), else the fixed
--language. Records in other languages are skipped and counted.
Quality filters (see docs/mixture.md): --preset web (long-form text: at least 200 characters,
letter share 0.7, repeated lines 0.3, boilerplate lines 0.2) or --preset instruction
(prompt/response pairs such as Aya: no length or repeated-line rule, letter share 0.5,
boilerplate 0.2); the default is instruction with a --template, else web. --min-chars,
--min-letter-share, --max-repeated-lines, --max-boilerplate-lines override single values of the
preset; --no-filters turns them all off.

Parallel and resumable like build_speech.py: --num-tasks/--task-index (default SLURM array
variables) split the sorted input files round-robin; a finished file is kept under
output/partials/ and skipped by a rerun; merge with --merge once all tasks are done.
S3 / R2 inputs: --endpoint-url or R2_ENDPOINT_URL / AWS_ENDPOINT_URL, keys from the AWS chain.

Examples:
  build_text.py --input 's3://corpora/sangraha/hi/*.parquet' --model ckpt/llama3-speech \\
      --output data/text/sangraha --source sangraha --language hi
  build_text.py --input aya/train.parquet --model ckpt/llama3-speech --output data/text/aya \\
      --source aya --template aya --language-field language     (--preset instruction implied)
  build_text.py --input pairs.jsonl --model ckpt/llama3-speech --output data/text/pairs \\
      --source pairs --preset instruction                       (pairs rendered into one field)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="build_text.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", help="input files: local paths, directories or globs, s3://bucket/key, "
                    "s3://bucket/prefix/, s3 globs; brace ranges expanded (.jsonl[.gz], .json[.gz], .parquet)")
    ap.add_argument("--model", help="expanded model dir (token_layout.json + tokenizer.json)")
    ap.add_argument("--output", required=True, help="output directory (one per source)")
    ap.add_argument("--source", help="corpus name (names prefixes and datasets: text/<source>/<lang>)")
    ap.add_argument("--format", choices=("json", "parquet"), help="input format (default: from the file name)")
    ap.add_argument("--seq-length", type=int, default=2048, help="training sequence length; documents never exceed it (default 2048)")
    ap.add_argument("--valid-fraction", type=float, default=0.01,
                    help="share of records held out for validation, by a hash of the text (default 0.01)")
    g = ap.add_argument_group("record schema")
    g.add_argument("--text-field", default="text", help="field holding the text (default text)")
    g.add_argument("--template", help="'aya' or a format string over fields, e.g. '{inputs}\\n\\n{targets}'")
    g.add_argument("--language-field", default="language", help="field holding the language; '' for none (default language)")
    g.add_argument("--language", help="language of records without a language field value")
    g = ap.add_argument_group("quality filters (each flag overrides one value of the preset)")
    g.add_argument("--preset", choices=("web", "instruction"),
                   help="filter settings: web (long-form text) or instruction (prompt/response pairs); "
                        "default instruction with --template, else web")
    g.add_argument("--min-chars", type=int, help="fewest characters (web 200, instruction 0 = off)")
    g.add_argument("--min-letter-share", type=float, help="least share of letters among non-space chars (web 0.7, instruction 0.5)")
    g.add_argument("--max-repeated-lines", type=float, help="most share of lines repeating an earlier one (web 0.3, instruction off; 1 = off)")
    g.add_argument("--max-boilerplate-lines", type=float, help="most share of lines with a boilerplate phrase (both 0.2; 1 = off)")
    g.add_argument("--no-filters", action="store_true", help="turn every quality filter off")
    g = ap.add_argument_group("parallelism")
    g.add_argument("--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT", 1), help="tasks sharing the files (default SLURM_ARRAY_TASK_COUNT or 1)")
    g.add_argument("--task-index", type=int, help="this task, 0-based (default SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, or 0)")
    g.add_argument("--merge", action="store_true", help="only merge finished partials")
    g.add_argument("--no-merge", action="store_true", help="do not merge even when this is the only task")
    g = ap.add_argument_group("S3 / R2")
    g.add_argument("--profile", help="AWS profile (default AWS_PROFILE)")
    g.add_argument("--endpoint-url", help="S3 endpoint (default R2_ENDPOINT_URL or AWS_ENDPOINT_URL)")
    g.add_argument("--max-attempts", type=int, default=10, help="attempts per S3 request and resumes per file (default 10)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("speechlm").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from speechlm import s3
    from speechlm.data import text

    try:
        if args.merge:
            print(text.format_manifest(text.merge(args.output, progress=not args.quiet)))
            return 0
        missing = [f"--{n}" for n in ("input", "model", "source") if getattr(args, n) is None]
        if missing:
            parser().error(f"missing {', '.join(missing)}")
        task_index = args.task_index
        if task_index is None:
            task_index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        if args.no_filters:
            filters = text.Filters(0, 0.0, None, None)
        else:
            preset = args.preset or ("instruction" if args.template is not None else "web")
            flags = dict(min_chars=args.min_chars, min_letter_share=args.min_letter_share,
                         max_repeated_line_share=args.max_repeated_lines, max_boilerplate_line_share=args.max_boilerplate_lines)
            filters = dataclasses.replace(text.FILTER_PRESETS[preset], **{k: v for k, v in flags.items() if v is not None})
        template = args.template
        if template is not None:  # a shell cannot easily pass a newline: accept \n and \t
            template = template.replace("\\n", "\n").replace("\\t", "\t")
        s3s = s3.S3Settings.from_env(profile=args.profile, endpoint_url=args.endpoint_url, max_attempts=args.max_attempts)
        summary = text.build(
            args.input, args.model, args.output, args.source,
            merge_after=args.num_tasks == 1 and not args.no_merge,
            seq_length=args.seq_length, valid_fraction=args.valid_fraction, text_field=args.text_field,
            template=template, language_field=args.language_field or None, default_language=args.language,
            input_format=args.format, filters=filters, num_tasks=args.num_tasks, task_index=task_index,
            s3_settings=s3s, progress=not args.quiet,
        )
    except text.SpeechDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary["failed"]:
        for url, why in summary["failed"]:
            print(f"FAILED {url}: {why}", file=sys.stderr)
        print(f"{len(summary['failed'])} files failed (not marked done): rerun this task to retry them", file=sys.stderr)
        return 1
    if "manifest" in summary:
        print(text.format_manifest(summary["manifest"]))
    else:
        print(f"task {task_index}/{args.num_tasks}: {summary['task_files']} of {summary['files']} files done; "
              f"merge with: data_prep/build_text.py --merge --output {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
